//! Reassembly of the IPv4 fragments of TCP sessions' segments XDP hands to the controller
//! (`SLOW_FRAGMENT`): the host's stack would reassemble them and, having no socket for the
//! session, answer with a reset; here they become the whole segment again, which the slow path
//! relays as it relays any other (cut into fragments again if the route needs it).
//!
//! Bounded: at most [`PENDING`] datagrams at once, [`PER_SESSION`] of one session (the oldest
//! is dropped for a new one), each at most an IP packet's 65,535 bytes in at most [`PIECES`]
//! pieces, each dropped [`TIMEOUT`] after its first fragment. A fragment that overlaps another
//! drops its datagram (as Linux does since 2018, and RFC 5722 asks for IPv6): no fragment
//! rewrites bytes another one brought; the same fragment twice is held once.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use relay_common::{checksum::checksum, session::FragKey};

/// Datagrams reassembled at once.
pub const PENDING: usize = 64;

/// Datagrams one session has reassembled at once.
pub const PER_SESSION: usize = 8;

/// Pieces one datagram may come in (a 64 KB segment in fragments of a 576-byte MTU is 120).
pub const PIECES: usize = 256;

/// The least IPv4 header.
const MIN_IHL: usize = 20;

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
        if p.data.is_empty() {
            // No data: nothing to place (Linux drops such a fragment too).
            return Outcome::Dropped;
        }
        if !self.pending.contains_key(&p.key) {
            self.make_room(session);
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
        if d.have.contains(&(start, end)) {
            // The same fragment again (a duplicate on the way): nothing new.
            return Outcome::Held;
        }
        let overlaps = d.have.iter().any(|&(s, e)| start < e && s < end);
        // A middle fragment's data comes in multiples of 8 bytes; the last one fixes the
        // length, once; nothing lies past it; the whole fits in an IP packet (with the least
        // header; checked again with the first fragment's once whole); a datagram comes in a
        // bounded number of pieces.
        let misfit = (p.more && p.data.len() % 8 != 0)
            || (!p.more && d.length.is_some_and(|l| l != end))
            || d.length.is_some_and(|l| end > l)
            || (!p.more && d.have.iter().any(|&(_, e)| e > end))
            || MIN_IHL + end > usize::from(u16::MAX)
            || d.have.len() >= PIECES;
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
        let Some(mut frame) = d.headers else {
            return Outcome::Dropped;
        };
        // The first fragment's header is the datagram's (a later one's may be shorter: only
        // copied options go into later fragments).
        let ihl = frame.len() - ETH;
        let Ok(total) = u16::try_from(ihl + d.payload.len()) else {
            return Outcome::Dropped;
        };
        frame.extend_from_slice(&d.payload);
        let ip = &mut frame[ETH..];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        // Whole: no offset, no more fragments, and no DF (a fragment never had it).
        ip[6..8].copy_from_slice(&[0, 0]);
        ip[10..12].copy_from_slice(&[0, 0]);
        let check = checksum(&ip[..ihl]);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        Outcome::Whole {
            frame,
            session: d.session,
            direction: d.direction,
        }
    }

    /// Before a new datagram of `session` is held: a session holding [`PER_SESSION`] gives up
    /// its oldest, and a full table its oldest of all (one client cannot push out everyone
    /// else's).
    fn make_room(&mut self, session: u32) {
        let oldest = |pending: &HashMap<FragKey, Datagram>, of: Option<u32>| {
            pending
                .iter()
                .filter(|(_, d)| of.is_none_or(|s| d.session == s))
                .min_by_key(|(_, d)| d.started)
                .map(|(k, _)| *k)
        };
        let held = self
            .pending
            .values()
            .filter(|d| d.session == session)
            .count();
        let evict = if held >= PER_SESSION {
            oldest(&self.pending, Some(session))
        } else if self.pending.len() >= PENDING {
            oldest(&self.pending, None)
        } else {
            None
        };
        if let Some(d) = evict.and_then(|k| self.pending.remove(&k)) {
            self.dropped.push(d.session);
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
        let c = checksum(&f[ETH..ETH + 20]);
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
        // The second fragment moved 8 bytes into the first's range.
        let mut over = pieces[1].clone();
        let frags = u16::from_be_bytes([over[ETH + 6], over[ETH + 7]]);
        over[ETH + 6..ETH + 8].copy_from_slice(&(frags - 1).to_be_bytes());
        assert_eq!(r.add(&over, 3, 1, now), Outcome::Dropped);
        assert!(r.pending.is_empty());
    }

    #[test]
    fn the_same_fragment_twice_is_held_once() {
        let whole = undf(&segment(2000));
        let mut pieces = cut(&whole, 576);
        pieces.insert(1, pieces[0].clone());
        pieces.push(pieces[2].clone());
        let mut r = Reassembly::default();
        let now = Instant::now();
        let last = pieces.pop().unwrap();
        assert_eq!(whole_again(&mut r, &pieces), Some(whole));
        // Once whole, a late copy starts a datagram of its own, which never completes.
        assert_eq!(r.add(&last, 3, 1, now), Outcome::Held);
    }

    #[test]
    fn fragments_without_data_are_dropped_alone() {
        let whole = undf(&segment(2000));
        let pieces = cut(&whole, 576);
        let mut r = Reassembly::default();
        let now = Instant::now();
        assert_eq!(r.add(&pieces[0], 3, 1, now), Outcome::Held);
        let mut empty = pieces[1][..ETH + 20].to_vec();
        empty[ETH + 2..ETH + 4].copy_from_slice(&20u16.to_be_bytes());
        for _ in 0..1000 {
            assert_eq!(r.add(&empty, 3, 1, now), Outcome::Dropped);
        }
        assert_eq!(whole_again(&mut r, &pieces[1..]), Some(whole));
    }

    #[test]
    fn the_first_fragments_header_is_the_datagrams() {
        // An option that is not copied into later fragments (type 0x44, timestamp): the first
        // fragment's header is 4 bytes longer than the others'.
        let mut whole = Frame::tcp(
            "198.18.1.2:40000".parse().unwrap(),
            "198.18.1.1:443".parse().unwrap(),
            0x18,
            &[9; 2000],
        )
        .ipv4_options(&[0x44, 4, 5, 0])
        .build();
        whole = {
            whole[ETH + 6] = 0;
            whole[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
            let c = checksum(&whole[ETH..ETH + 24]);
            whole[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            whole
        };
        let pieces = cut(&whole, 576);
        assert_eq!(pieces[0][ETH] & 0x0f, 6);
        assert_eq!(pieces[1][ETH] & 0x0f, 5);
        let mut r = Reassembly::default();
        let mut reversed = pieces.clone();
        reversed.reverse();
        assert_eq!(whole_again(&mut r, &reversed), Some(whole));
        // A last fragment with a longer header than the first's (its own options): the
        // datagram keeps the first's, and nothing reads past it.
        let first = cut(&undf(&segment(8)), 28).remove(0);
        assert_eq!(first.len(), ETH + 28);
        let mut last = undf(&segment(40))[..ETH + 60 + 1].to_vec();
        last[ETH] = 0x4f;
        last[ETH + 2..ETH + 4].copy_from_slice(&61u16.to_be_bytes());
        last[ETH + 4..ETH + 6].copy_from_slice(&first[ETH + 4..ETH + 6]);
        last[ETH + 6..ETH + 8].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(r.add(&first, 3, 1, Instant::now()), Outcome::Held);
        match r.add(&last, 3, 1, Instant::now()) {
            Outcome::Whole { frame, .. } => assert_eq!(frame.len(), ETH + 20 + 9),
            other => panic!("{other:?}"),
        }
    }

    /// The first fragment of datagram `id`.
    fn first_of(id: u16) -> Vec<u8> {
        let mut f = cut(&undf(&segment(1200)), 576).remove(0);
        f[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
        f
    }

    #[test]
    fn at_most_pending_datagrams_are_held_the_oldest_goes() {
        let mut r = Reassembly::default();
        let start = Instant::now();
        for i in 0..(PENDING + 3) {
            let now = start + Duration::from_millis(i as u64);
            // One datagram per session.
            assert_eq!(r.add(&first_of(i as u16), i as u32, 1, now), Outcome::Held);
        }
        assert_eq!(r.pending.len(), PENDING);
        assert_eq!(r.take_dropped(), vec![0, 1, 2]);
    }

    #[test]
    fn one_session_cannot_push_out_the_others() {
        let mut r = Reassembly::default();
        let start = Instant::now();
        for i in 0..10u16 {
            assert_eq!(r.add(&first_of(i), 7, 1, start), Outcome::Held);
        }
        for i in 0..(PENDING as u16 * 2) {
            let now = start + Duration::from_millis(u64::from(i) + 1);
            assert_eq!(r.add(&first_of(100 + i), 3, 1, now), Outcome::Held);
        }
        let of = |s: u32| r.pending.values().filter(|d| d.session == s).count();
        assert_eq!((of(3), of(7)), (PER_SESSION, PER_SESSION));
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
