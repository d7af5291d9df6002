//! Reassembly of the IPv4 fragments of TCP sessions' segments XDP hands to the controller
//! (`SLOW_FRAGMENT`): the host's stack would reassemble them and, having no socket for the
//! session, answer with a reset; here they become the whole segment again, which the slow path
//! relays as it relays any other (cut into fragments again if the route needs it).
//!
//! Bounded: at most [`PENDING`] datagrams at once (the oldest is dropped for a new one), each
//! at most an IP packet's 65,535 bytes, each dropped [`TIMEOUT`] after its first fragment.
//! Overlapping fragments drop their datagram, as Linux does since 2018 (RFC 5722 asks it for
//! IPv6): no fragment rewrites bytes another one brought.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use relay_common::session::FragKey;

/// Datagrams reassembled at once.
pub const PENDING: usize = 64;

/// How long a datagram waits for its missing fragments (TCP resends the segment).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The Ethernet header of the frames XDP hands over (no VLAN tag: see `parse_tcp_fragment`).
const ETH: usize = 14;

/// One fragment, read from its frame.
#[derive(Debug)]
struct Piece<'a> {
    key: FragKey,
    /// Offset of its data in the datagram's payload, in bytes.
    offset: usize,
    more: bool,
    /// The Ethernet and IP headers (the first fragment's become the datagram's).
    headers: &'a [u8],
    data: &'a [u8],
}

fn piece(frame: &[u8]) -> Option<Piece<'_>> {
    let ip = frame.get(ETH..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    let key = FragKey {
        src: ip[12..16].try_into().ok()?,
        dst: ip[16..20].try_into().ok()?,
        id: u16::from_be_bytes([ip[4], ip[5]]),
        _pad: 0,
    };
    Some(Piece {
        key,
        offset: usize::from(frags & 0x1fff) * 8,
        more: frags & 0x2000 != 0,
        headers: &frame[..ETH + ihl],
        data: &ip[ihl..total],
    })
}

/// A datagram being put together.
struct Datagram {
    started: Instant,
    /// What the session's first fragment handed over with (kept for the whole).
    session: u32,
    direction: u32,
    /// The first fragment's Ethernet and IP headers, once it came.
    headers: Option<Vec<u8>>,
    /// Payload byte ranges received, `(start, end)`, and the bytes at their offsets.
    have: Vec<(usize, usize)>,
    payload: Vec<u8>,
    /// The payload's length, once the last fragment came.
    length: Option<usize>,
}

/// What became of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Held until its datagram is complete.
    Held,
    /// The datagram is complete: its frame (the first fragment's Ethernet header, the IP
    /// packet whole), the session and direction its first fragment was handed over with.
    Whole {
        frame: Vec<u8>,
        session: u32,
        direction: u32,
    },
    /// Not a fragment the reassembly can use (malformed), or its datagram was dropped
    /// (overlap, too long); counted by the caller.
    Dropped,
}

/// The datagrams being reassembled.
#[derive(Default)]
pub struct Reassembly {
    pending: HashMap<FragKey, Datagram>,
    /// The sessions of datagrams dropped unfinished (timed out or pushed out), since the last
    /// `take_dropped`.
    dropped: Vec<u32>,
}

impl Reassembly {
    /// Adds the fragment in `frame`, which XDP handed over for `session` in `direction`.
    pub fn add(&mut self, frame: &[u8], session: u32, direction: u32, now: Instant) -> Outcome {
        self.expire(now);
        let Some(p) = piece(frame) else {
            return Outcome::Dropped;
        };
        if !self.pending.contains_key(&p.key) && self.pending.len() >= PENDING {
            if let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, d)| d.started)
                .map(|(k, _)| *k)
            {
                if let Some(d) = self.pending.remove(&oldest) {
                    self.dropped.push(d.session);
                }
            }
        }
        let d = self.pending.entry(p.key).or_insert_with(|| Datagram {
            started: now,
            session,
            direction,
            headers: None,
            have: Vec::new(),
            payload: Vec::new(),
            length: None,
        });
        let (start, end) = (p.offset, p.offset + p.data.len());
        let ihl = p.headers.len() - ETH;
        let overlaps = d.have.iter().any(|&(s, e)| start < e && s < end);
        // A middle fragment's data comes in multiples of 8 bytes; the last one fixes the
        // length, once; nothing lies past it; the whole fits in an IP packet.
        let misfit = (p.more && p.data.len() % 8 != 0)
            || (!p.more && d.length.is_some_and(|l| l != end))
            || d.length.is_some_and(|l| end > l)
            || (!p.more && d.have.iter().any(|&(_, e)| e > end))
            || ihl + end > usize::from(u16::MAX);
        if overlaps || misfit {
            self.pending.remove(&p.key);
            return Outcome::Dropped;
        }
        if p.offset == 0 {
            d.session = session;
            d.direction = direction;
            d.headers = Some(p.headers.to_vec());
        }
        if !p.more {
            d.length = Some(end);
        }
        if d.payload.len() < end {
            d.payload.resize(end, 0);
        }
        d.payload[start..end].copy_from_slice(p.data);
        d.have.push((start, end));
        let complete = d.headers.is_some()
            && d.length
                .is_some_and(|l| d.have.iter().map(|&(s, e)| e - s).sum::<usize>() == l);
        if !complete {
            return Outcome::Held;
        }
        let Some(d) = self.pending.remove(&p.key) else {
            return Outcome::Dropped;
        };
        let mut frame = d.headers.unwrap_or_default();
        frame.extend_from_slice(&d.payload);
        let ip = &mut frame[ETH..];
        let total = (ip.len() as u16).to_be_bytes();
        ip[2..4].copy_from_slice(&total);
        // Whole: no offset, no more fragments; DF as the first fragment had it (never set on
        // a fragment, so clear).
        ip[6..8].copy_from_slice(&[0, 0]);
        ip[10..12].copy_from_slice(&[0, 0]);
        let check = header_checksum(&ip[..ihl]);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        Outcome::Whole {
            frame,
            session: d.session,
            direction: d.direction,
        }
    }

    /// The sessions of the datagrams dropped unfinished since the last call, one entry each.
    pub fn take_dropped(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dropped)
    }

    fn expire(&mut self, now: Instant) {
        let dropped = &mut self.dropped;
        self.pending.retain(|_, d| {
            let keep = now.duration_since(d.started) < TIMEOUT;
            if !keep {
                dropped.push(d.session);
            }
            keep
        });
    }
}

/// The IPv4 header checksum of `header` (whose checksum field reads 0).
fn header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::frame::Frame;

    /// A TCP segment with `len` bytes of payload, as a whole frame.
    fn segment(len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        Frame::tcp(
            "198.18.1.2:40000".parse().unwrap(),
            "198.18.1.1:443".parse().unwrap(),
            0x18,
            &payload,
        )
        .build()
    }

    /// `whole` cut into fragments of at most `mtu` bytes of IP packet.
    fn cut(whole: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        crate::forward::slowtcp::fragment_v4(&whole[ETH..], mtu)
            .expect("fragments")
            .into_iter()
            .map(|ip| [&whole[..ETH], &ip[..]].concat())
            .collect()
    }

    fn whole_again(r: &mut Reassembly, pieces: &[Vec<u8>]) -> Option<Vec<u8>> {
        let now = Instant::now();
        let mut out = None;
        for p in pieces {
            match r.add(p, 3, 1, now) {
                Outcome::Held => {}
                Outcome::Whole {
                    frame,
                    session,
                    direction,
                } => {
                    assert_eq!((session, direction), (3, 1));
                    out = Some(frame);
                }
                Outcome::Dropped => return None,
            }
        }
        out
    }

    /// The segment without DF (the frame builder sets it; a fragmented one has none): what
    /// reassembly gives back.
    fn undf(whole: &[u8]) -> Vec<u8> {
        let mut f = whole.to_vec();
        f[ETH + 6] = 0;
        f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
        let c = header_checksum(&f[ETH..ETH + 20]);
        f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
        f
    }

    #[test]
    fn fragments_in_any_order_give_the_segment_back_byte_for_byte() {
        let whole = undf(&segment(3000));
        let mut pieces = cut(&whole, 576);
        assert!(pieces.len() > 5);
        let mut r = Reassembly::default();
        assert_eq!(whole_again(&mut r, &pieces), Some(whole.clone()));
        pieces.reverse();
        assert_eq!(whole_again(&mut r, &pieces), Some(whole.clone()));
        pieces.swap(1, 3);
        assert_eq!(whole_again(&mut r, &pieces), Some(whole));
        assert!(r.pending.is_empty());
    }

    #[test]
    fn a_missing_fragment_holds_its_datagram_until_the_timeout() {
        let whole = undf(&segment(2000));
        let pieces = cut(&whole, 576);
        let mut r = Reassembly::default();
        let now = Instant::now();
        for p in &pieces[1..] {
            assert_eq!(r.add(p, 3, 1, now), Outcome::Held);
        }
        assert_eq!(r.pending.len(), 1);
        // The next fragment, of another datagram, after the timeout: the held one is gone,
        // counted.
        let mut other = cut(&whole, 576).remove(0);
        other[ETH + 4..ETH + 6].copy_from_slice(&[0xbe, 0xef]);
        assert_eq!(r.add(&other, 3, 1, now + TIMEOUT), Outcome::Held);
        assert_eq!(r.pending.len(), 1);
        assert_eq!(r.take_dropped(), vec![3]);
        assert!(r.take_dropped().is_empty());
    }

    #[test]
    fn overlapping_fragments_drop_their_datagram() {
        let whole = undf(&segment(2000));
        let pieces = cut(&whole, 576);
        let mut r = Reassembly::default();
        let now = Instant::now();
        assert_eq!(r.add(&pieces[0], 3, 1, now), Outcome::Held);
        // The first fragment again: its bytes overlap what came.
        assert_eq!(r.add(&pieces[0], 3, 1, now), Outcome::Dropped);
        assert!(r.pending.is_empty());
    }

    #[test]
    fn at_most_pending_datagrams_are_held_the_oldest_goes() {
        let mut r = Reassembly::default();
        let start = Instant::now();
        for i in 0..(PENDING + 3) {
            let mut f = cut(&undf(&segment(1200)), 576).remove(0);
            // Another datagram each: its identification.
            f[ETH + 4..ETH + 6].copy_from_slice(&(i as u16).to_be_bytes());
            let now = start + Duration::from_millis(i as u64);
            assert_eq!(r.add(&f, 3, 1, now), Outcome::Held);
        }
        assert_eq!(r.pending.len(), PENDING);
        assert_eq!(r.take_dropped(), vec![3; 3]);
    }

    #[test]
    fn malformed_and_too_long_fragments_are_dropped() {
        let mut r = Reassembly::default();
        let now = Instant::now();
        assert_eq!(r.add(&[0u8; 20], 3, 1, now), Outcome::Dropped);
        let mut f = cut(&undf(&segment(1200)), 576).remove(0);
        // An offset that puts its end past 65,535 bytes.
        f[ETH + 6..ETH + 8].copy_from_slice(&(0x2000u16 | 0x1fff).to_be_bytes());
        assert_eq!(r.add(&f, 3, 1, now), Outcome::Dropped);
        // A middle fragment whose data is not a multiple of 8 bytes.
        let mut odd = cut(&undf(&segment(1200)), 576).remove(0);
        let total = u16::from_be_bytes([odd[ETH + 2], odd[ETH + 3]]) - 1;
        odd[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(r.add(&odd, 3, 1, now), Outcome::Dropped);
    }
}
