//! The slow path for TCP sessions' segments XDP cannot carry (`tcp_to_controller`): its next
//! hop has no link-layer address yet, or it is larger than the egress MTU without DF. The
//! host's stack has no socket for them (it would answer with a reset), so XDP hands them here
//! with their frames (`TCP_SLOW`, a perf buffer per CPU) and drops them; this relays each with
//! the same plan and rewrite XDP runs (`relay_common::rewrite`), then sends it through a raw
//! IP socket: the host's stack routes it, holds it while the neighbour is resolved, and takes
//! the fragments this cuts from a packet too big for the route.
//!
//! A TCP segment that reaches the relay in IPv4 fragments comes here too, fragment by
//! fragment, and is relayed once whole (`super::reassembly`).
//!
//! What it relays or cannot relay is counted per rule (`tcp_slow_relayed`,
//! `tcp_slow_dropped` in `relay stats`).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{anyhow, Context as _};
use aya::maps::{
    perf::{PerfEvent, PerfEventArrayBuffer},
    MapData, PerfEventArray,
};
use log::{debug, warn};
use relay_common::{
    frame::HostFrame,
    packet::{parse, tcp_flags_ok, FAMILY_V4, PROTO_TCP},
    rewrite::{apply, plan, Head},
    session::{
        Nexthop, Session, SlowSegment, NEXTHOP_OWN, SLOW_FRAGMENT, STATE_ACTIVE, TO_CLIENT,
        TO_UPSTREAM,
    },
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::reassembly::{Outcome, Reassembly};
use crate::datapath::Datapath;

/// The map's name in the object.
const MAP: &str = "TCP_SLOW";

/// Pages of each CPU's perf buffer (a power of two): 1 MiB, some 680 full-size frames (a
/// sender's burst of a window's worth, while the controller catches up).
const PAGES: usize = 256;

/// The smallest IPv4 MTU every link takes: fragments are cut to it when the route's is unknown.
const MIN_MTU_V4: u16 = 576;

/// The raw sockets segments leave through.
pub struct SlowTcp {
    datapath: Arc<Datapath>,
    v4: Socket,
    v6: Option<Socket>,
    /// Fragments of segments, until their segment is whole (each CPU's buffer is read by its
    /// own task).
    fragments: Mutex<Reassembly>,
}

impl SlowTcp {
    /// Takes the program's `TCP_SLOW` buffers and opens the raw sockets (both need privileges
    /// the controller drops later: call before), then relays what XDP hands over, forever
    /// (tasks on the runtime).
    pub fn start(bpf: &mut aya::Ebpf, datapath: Arc<Datapath>) -> anyhow::Result<()> {
        let raw = |domain| {
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        };
        let v4 = raw(Domain::IPV4).context("opening a raw IPv4 socket")?;
        // A host without IPv6 still relays IPv4.
        let v6 = raw(Domain::IPV6).ok();
        let map = bpf
            .take_map(MAP)
            .ok_or_else(|| anyhow!("the XDP object has no map {MAP}"))?;
        let mut perf: PerfEventArray<MapData> = map.try_into()?;
        let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let slow = Arc::new(SlowTcp {
            datapath,
            v4,
            v6,
            fragments: Mutex::new(Reassembly::default()),
        });
        for cpu in cpus {
            let buf = perf
                .open(cpu, Some(PAGES))
                .with_context(|| format!("opening CPU {cpu}'s buffer of {MAP}"))?;
            let slow = Arc::clone(&slow);
            let mut frame = Vec::new();
            let read = move |buf: &mut PerfEventArrayBuffer<MapData>| {
                buf.for_each(|event| match event {
                    PerfEvent::Sample { head, tail } => {
                        frame.clear();
                        frame.extend_from_slice(head);
                        frame.extend_from_slice(tail);
                        // A defect in handling one record costs that record, not this CPU's
                        // reader for good.
                        let handled =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                slow.handle(&frame)
                            }));
                        if handled.is_err() {
                            warn!(
                                "{MAP}: a record could not be handled (a defect: please report it)"
                            );
                        }
                    }
                    PerfEvent::Lost { count } => {
                        debug!("{MAP}: {count} segments lost (the buffer was full)");
                    }
                });
            };
            let lost = "TCP segments XDP cannot carry are dropped";
            tokio::spawn(async move {
                // SAFETY: the buffer owns its descriptor and keeps it open, unchanged, for its
                // whole life.
                unsafe { crate::readable::each_readable(buf, MAP, lost, read) }.await;
            });
        }
        Ok(())
    }

    /// One record: the [`SlowSegment`], then the frame.
    fn handle(&self, record: &[u8]) {
        let meta_len = std::mem::size_of::<SlowSegment>();
        let Some(meta) = record.get(..meta_len) else {
            return;
        };
        // SAFETY: `meta` holds exactly the bytes of a `SlowSegment` the program wrote; any bit
        // pattern is a valid one, and the read has no alignment requirement.
        let meta = unsafe { meta.as_ptr().cast::<SlowSegment>().read_unaligned() };
        let Some(frame) = record.get(meta_len..meta_len + meta.len as usize) else {
            return;
        };
        if meta.flags & SLOW_FRAGMENT == 0 {
            self.relay_counted(&meta, frame);
            return;
        }
        let (outcome, dropped) = {
            let mut r = self.fragments.lock().unwrap_or_else(|e| e.into_inner());
            let outcome = r.add(frame, meta.session, meta.direction, Instant::now());
            (outcome, r.take_dropped())
        };
        for session in dropped {
            self.count_dropped(session);
        }
        match outcome {
            Outcome::Held => {}
            Outcome::Dropped => self.count_dropped(meta.session),
            Outcome::Whole {
                frame,
                session,
                direction,
            } => {
                // What XDP checks of a whole segment before it relays one (flags a TCP sends).
                let flags_ok = parse(&frame[..]).is_ok_and(|h| tcp_flags_ok(&h));
                if !flags_ok {
                    self.count_dropped(session);
                    return;
                }
                let meta = SlowSegment {
                    session,
                    direction,
                    len: frame.len() as u32,
                    flags: 0,
                };
                self.relay_counted(&meta, &frame);
            }
        }
    }

    /// A datagram of `session` that could not be reassembled: counted as its rule's
    /// `tcp_slow_dropped`.
    fn count_dropped(&self, session: u32) {
        if let Ok(s) = self.datapath.session(session) {
            let _ = self
                .datapath
                .update_rule(s.rule, |r| r.tcp_slow_dropped += 1);
        }
    }

    /// Relays one whole segment's frame and counts what became of it.
    fn relay_counted(&self, meta: &SlowSegment, frame: &[u8]) {
        let Ok(session) = self.datapath.session(meta.session) else {
            return;
        };
        let direction = usize::from(meta.direction == TO_CLIENT);
        let sent = self.relay(meta, &session, frame);
        let _ = self.datapath.update_rule(session.rule, |r| match sent {
            Ok(bytes) => {
                r.tcp_slow[direction].packets += 1;
                r.tcp_slow[direction].bytes += bytes;
            }
            Err(_) => r.tcp_slow_dropped += 1,
        });
        if let Err(e) = sent {
            debug!("TCP segment of session {} not relayed: {e}", meta.session);
        }
    }

    /// Rewrites the frame as XDP would and sends its IP packet (in fragments if it has to);
    /// the IP bytes sent.
    fn relay(&self, meta: &SlowSegment, s: &Session, frame: &[u8]) -> anyhow::Result<u64> {
        if s.state != STATE_ACTIVE || s.proto != PROTO_TCP {
            return Err(anyhow!("the session is gone"));
        }
        let direction = if meta.direction == TO_CLIENT {
            TO_CLIENT
        } else {
            TO_UPSTREAM
        };
        let mut host = HostFrame::new(frame, 0);
        let h = parse(&host).map_err(|r| anyhow!("unparsable frame ({})", r.name()))?;
        // The record may have been reused since XDP handed the segment over: it must still be
        // this flow's, as XDP checked it.
        let (local, local_port, remote, remote_port) = if direction == TO_UPSTREAM {
            (s.front, s.front_port, s.client, s.client_port)
        } else {
            (s.back, s.back_port, s.upstream, s.upstream_port)
        };
        if (h.dst, h.dst_port, h.src, h.src_port) != (local, local_port, remote, remote_port) {
            return Err(anyhow!("the session is gone"));
        }
        // The route's MTU if the next hop is known; the host's stack sends to the link.
        let slot = s.nexthop[direction as usize];
        let hop = if slot == NEXTHOP_OWN {
            self.datapath.hop(meta.session)
        } else {
            self.datapath.nexthop(slot)
        };
        let mtu = hop.map_or(0, |n| n.mtu);
        let through_stack = Nexthop {
            // Any interface: the Ethernet header this writes is cut off, the stack routes.
            ifindex: 1,
            mtu: u16::MAX,
            ..Nexthop::default()
        };
        let p = plan(&h, s.target(direction), &through_stack, Head::Keep)
            .map_err(|r| anyhow!("not relayable ({})", r.name()))?;
        apply(&mut host, &p).map_err(|r| anyhow!("rewrite failed ({})", r.name()))?;
        let ip = host
            .bytes()
            .get(usize::from(p.l3)..)
            .ok_or_else(|| anyhow!("truncated"))?;
        let ip = &ip[..usize::from(p.ip_bytes()).min(ip.len())];
        let to = SocketAddr::new(crate::datapath::ip_of(h.family, p.target.dst), 0);
        if h.family != FAMILY_V4 {
            let v6 = self
                .v6
                .as_ref()
                .ok_or_else(|| anyhow!("no IPv6 raw socket"))?;
            send(v6, ip, to).with_context(|| format!("sending to {}", to.ip()))?;
            return Ok(ip.len() as u64);
        }
        // Fragments to the route's MTU where the next hop is known; else the packet goes as
        // it is, and in fragments of the least MTU if the stack finds it too big.
        let pieces = if mtu != 0 && ip.len() > usize::from(mtu) {
            Some(usize::from(mtu.max(MIN_MTU_V4)))
        } else {
            match send(&self.v4, ip, to) {
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => Some(usize::from(MIN_MTU_V4)),
                Err(e) => return Err(anyhow!(e).context(format!("sending to {}", to.ip()))),
                Ok(()) => None,
            }
        };
        if let Some(mtu) = pieces {
            let pieces = fragment_v4(ip, mtu)
                .ok_or_else(|| anyhow!("too big for the route's MTU {mtu}, and DF set"))?;
            for piece in &pieces {
                send(&self.v4, piece, to)
                    .with_context(|| format!("sending a fragment to {}", to.ip()))?;
            }
        }
        Ok(ip.len() as u64)
    }
}

fn send(socket: &Socket, packet: &[u8], to: SocketAddr) -> std::io::Result<()> {
    let n = socket.send_to(packet, &SockAddr::from(to))?;
    if n != packet.len() {
        return Err(std::io::Error::other(format!(
            "sent {n} of {} bytes",
            packet.len()
        )));
    }
    Ok(())
}

/// Cuts an IPv4 packet without DF into fragments of at most `mtu` bytes (RFC 791): each
/// carries the header (options only if their "copied" bit says so, after the first), its
/// share of the payload (a multiple of 8 bytes but the last) at its offset, and "more
/// fragments" but the last (unless the packet was a fragment with more to come). The header
/// checksum is left to the raw socket, which fills it. `None`: DF is set, the header is
/// malformed, or `mtu` leaves no room for 8 bytes of payload.
pub fn fragment_v4(packet: &[u8], mtu: usize) -> Option<Vec<Vec<u8>>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if ihl < 20 || total < ihl || packet.len() < total {
        return None;
    }
    let flags = u16::from_be_bytes([packet[6], packet[7]]);
    if flags & 0x4000 != 0 {
        return None;
    }
    let mut first_header = packet[..ihl].to_vec();
    if first_header[4..6] == [0, 0] {
        // The raw socket gives a packet with identification 0 one of its own, each fragment
        // a different one, and the receiver could not put them together.
        first_header[4..6].copy_from_slice(&next_id().to_be_bytes());
    }
    let payload = &packet[ihl..total];
    let later_header = copied_options(&first_header)?;
    let base = usize::from(flags & 0x1fff) * 8;
    let more_after = flags & 0x2000 != 0;
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let header = if at == 0 {
            &first_header[..]
        } else {
            &later_header[..]
        };
        let room = mtu.checked_sub(header.len())? / 8 * 8;
        if room == 0 {
            return None;
        }
        let take = room.min(payload.len() - at);
        let last = at + take == payload.len();
        let mut piece = Vec::with_capacity(header.len() + take);
        piece.extend_from_slice(header);
        piece.extend_from_slice(&payload[at..at + take]);
        let len = u16::try_from(piece.len()).ok()?;
        piece[2..4].copy_from_slice(&len.to_be_bytes());
        let offset = u16::try_from((base + at) / 8).ok()?;
        let mf = if last && !more_after { 0 } else { 0x2000 };
        piece[6..8].copy_from_slice(&(offset | mf).to_be_bytes());
        piece[10..12].copy_from_slice(&[0, 0]);
        out.push(piece);
        at += take;
    }
    Some(out)
}

/// An identification for a packet that had none (0): never 0, different for each.
fn next_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(1);
    loop {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            return id;
        }
    }
}

/// The header for fragments after the first: the fixed 20 bytes, then only the options
/// whose "copied" bit is set, padded to a multiple of 4 with end-of-options.
fn copied_options(header: &[u8]) -> Option<Vec<u8>> {
    let mut out = header.get(..20)?.to_vec();
    let mut i = 20;
    while i < header.len() {
        let kind = header[i];
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let len = usize::from(*header.get(i + 1)?);
                if len < 2 || i + len > header.len() {
                    return None;
                }
                if kind & 0x80 != 0 {
                    out.extend_from_slice(&header[i..i + len]);
                }
                i += len;
            }
        }
    }
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out[0] = 0x40 | u8::try_from(out.len() / 4).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 packet of `payload` bytes (0, 1, 2, ...) with `options` after the header.
    fn packet(payload: usize, options: &[u8], flags: u16) -> Vec<u8> {
        let ihl = 20 + options.len();
        let mut p = vec![0u8; ihl];
        p[0] = 0x40 | (ihl / 4) as u8;
        p[2..4].copy_from_slice(&((ihl + payload) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&flags.to_be_bytes());
        p[8] = 63;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 1, 1]);
        p[16..20].copy_from_slice(&[198, 18, 2, 2]);
        p[20..].copy_from_slice(options);
        p.extend((0..payload).map(|i| i as u8));
        p
    }

    /// Puts fragments back together by offset, as the receiver does: the payload, and
    /// whether the last one ends the packet.
    fn reassemble(pieces: &[Vec<u8>]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut ended = false;
        for p in pieces {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let flags = u16::from_be_bytes([p[6], p[7]]);
            let at = usize::from(flags & 0x1fff) * 8;
            assert_eq!(at, out.len(), "fragments in order, without gaps");
            assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
            assert_eq!(&p[4..6], &pieces[0][4..6], "one identification for all");
            out.extend_from_slice(&p[ihl..]);
            ended = flags & 0x2000 == 0;
        }
        (out, ended)
    }

    #[test]
    fn a_packet_too_big_for_the_route_is_cut_into_fragments_that_fit() {
        let p = packet(1460, &[], 0);
        let pieces = fragment_v4(&p, 1280).expect("fragments");
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            &pieces[0][4..6],
            &[0x12, 0x34],
            "the identification is kept"
        );
        assert!(pieces.iter().all(|f| f.len() <= 1280));
        // All but the last carry a multiple of 8 payload bytes.
        assert_eq!((pieces[0].len() - 20) % 8, 0);
        let (payload, ended) = reassemble(&pieces);
        assert_eq!(payload, p[20..]);
        assert!(ended, "the last fragment has MF clear");
        // A 576-byte route: more, smaller fragments.
        let pieces = fragment_v4(&p, 576).unwrap();
        assert_eq!(pieces.len(), 3);
        assert_eq!(reassemble(&pieces).0, p[20..]);
    }

    #[test]
    fn a_packet_without_identification_gets_one_for_all_its_fragments() {
        let mut p = packet(1460, &[], 0);
        p[4..6].copy_from_slice(&[0, 0]);
        let pieces = fragment_v4(&p, 576).unwrap();
        let id = &pieces[0][4..6];
        assert_ne!(id, &[0, 0]);
        assert!(
            pieces.iter().all(|f| &f[4..6] == id),
            "one identification for all"
        );
    }

    #[test]
    fn df_set_is_not_fragmented() {
        assert_eq!(fragment_v4(&packet(1460, &[], 0x4000), 1280), None);
    }

    #[test]
    fn a_fragment_cut_again_keeps_its_offset_and_more_fragments() {
        // The first 1480 bytes of a larger packet (MF set, offset 0) cut to 576.
        let p = packet(1480, &[], 0x2000);
        let pieces = fragment_v4(&p, 576).unwrap();
        let (payload, ended) = reassemble(&pieces);
        assert_eq!(payload, p[20..]);
        assert!(!ended, "more fragments still follow the original one");
        // A fragment at offset 185 (1480 bytes in).
        let p = packet(600, &[], 185);
        let pieces = fragment_v4(&p, 576).unwrap();
        let first = u16::from_be_bytes([pieces[0][6], pieces[0][7]]);
        assert_eq!(first & 0x1fff, 185);
        let second = u16::from_be_bytes([pieces[1][6], pieces[1][7]]);
        assert_eq!(usize::from(second & 0x1fff) * 8, 1480 + 552);
    }

    #[test]
    fn only_copied_options_go_into_later_fragments() {
        // A copied option (security, type 130, 4 bytes), a NOP, a record-route (7, not
        // copied, 7 bytes) and end-of-options padding: 12 bytes.
        let options = [130, 4, 0xaa, 0xbb, 1, 7, 7, 4, 0, 0, 0, 0];
        let p = packet(1200, &options, 0);
        let pieces = fragment_v4(&p, 600).unwrap();
        assert_eq!(&pieces[0][20..32], &options, "the first keeps every option");
        for later in &pieces[1..] {
            assert_eq!(later[0] & 0x0f, 6, "20 bytes and the 4-byte copied option");
            assert_eq!(&later[20..24], &[130, 4, 0xaa, 0xbb]);
        }
        assert_eq!(reassemble(&pieces).0, p[32..]);
    }

    #[test]
    fn malformed_headers_and_tiny_mtus_are_refused() {
        assert_eq!(fragment_v4(&[0x45, 0, 0], 576), None, "truncated");
        let mut p = packet(100, &[], 0);
        p[2..4].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(fragment_v4(&p, 64), None, "total length past the buffer");
        assert_eq!(
            fragment_v4(&packet(100, &[], 0), 24),
            None,
            "no room for 8 bytes"
        );
        let bad_option = packet(100, &[68, 40, 0, 0], 0);
        assert_eq!(
            fragment_v4(&bad_option, 64),
            None,
            "an option longer than the header"
        );
    }
}
