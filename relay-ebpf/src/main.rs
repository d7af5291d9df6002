//! The relay's XDP program.
//!
//! Every frame is parsed once with the shared parser from `relay-common`, classified, counted
//! under exactly one [`Reason`] and given that reason's verdict. A UDP packet that belongs to a
//! session takes one way, whether forwarded or SOCKS5 in either direction: parse, find the
//! session, `relay_common::rewrite::plan`, `relay_common::rewrite::apply` (the one rewrite,
//! shared with the host tests), account, send with XDP_TX or XDP_REDIRECT. Everything else goes
//! to the kernel untouched.
#![no_std]
#![no_main]
// `core` has no `fetch_add` for the BPF target; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::bpf_get_socket_cookie,
    macros::{map, sk_lookup, stream_verdict, xdp},
    maps::{
        lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray,
        PerfEventArray, Queue, RingBuf, SockHash, SockMap,
    },
    programs::{SkBuffContext, SkLookupContext, XdpContext},
    Global,
};
use aya_log_ebpf::debug;
use relay_common::{
    counters::{
        Counter, Open, Reason, Verdict, COUNTER_SLOTS, OPEN_SLOTS, TX_BY_REDIRECT_ALL,
        TX_BY_REDIRECT_SLOTS,
    },
    icmp::{self, IcmpError, NoReply},
    limits::{UserLimit, UserSpent},
    packet::{
        ipv4_header_ok, parse, parse_tcp_fragment, tcp_flags_ok, Headers, Packet, FAMILY_V4,
        FAMILY_V6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    rewrite::{apply, plan, Head, SocksHeader},
    session::{
        AllowKey, Bucket, Event, Flow, FlowKey, FragKey, Listen, ListenKey, Meta, Nexthop,
        NexthopKey, PoolSlot, RuleStats, Session, SlowPath, SlowSegment, SourceKey, UserStats,
        EVENT_CLOSING, EVENT_OPENED, EVENT_RING_BYTES, FLOW_SOCKS, LISTEN_ALLOW_LIST, LISTEN_FULL,
        NEXTHOP_NONE, NEXTHOP_OWN, NEXTHOP_SLOTS, ORIGIN_KERNEL, PORT_SLOTS, RULE_SLOTS,
        RULE_SOCKS, SLOW_FRAGMENT, STATE_ACTIVE, STATE_FREE, TO_CLIENT, TO_UPSTREAM, USER_SLOTS,
    },
};

use relay_common::splice::{
    may_redirect, room, sent_into, tell_behind, within_credit, Room, SpliceCount, SpliceLink,
    SPLICE_BEHIND_RING_BYTES, SPLICE_FELL_BEHIND, SPLICE_NO_CREDIT, SPLICE_NO_PEER, SPLICE_PASSED,
    SPLICE_REDIRECTED, SPLICE_SOCKETS, SPLICE_TOTAL_SLOTS, SPLICE_UNKNOWN,
};
use relay_ebpf::frame::XdpFrame;

/// Packets and bytes per [`Reason`], per CPU. Pinned so that counts survive a controller
/// restart.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// (remote endpoint, local port) -> (session, direction). Sized by the controller.
#[map]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::pinned(2, 0);

/// Session records by index. Sized by the controller.
#[map]
static SESSIONS: Array<Session> = Array::pinned(1, 0);

/// Next hops the controller resolves from the kernel's routes and neighbours.
#[map]
static NEXTHOPS: Array<Nexthop> = Array::pinned(NEXTHOP_SLOTS, 0);

/// What the controller relayed itself, per session. Written by the controller only; declared
/// here so that it is created and pinned with the rest.
#[map]
static SLOWPATH: Array<SlowPath> = Array::pinned(1, 0);

/// Per-rule totals kept by the controller (created and pinned with the rest).
#[map]
static RULES: Array<RuleStats> = Array::pinned(RULE_SLOTS, 0);

/// Per-user SOCKS5 accounting kept by the controller (created and pinned with the rest).
#[map]
static USERS: Array<UserStats> = Array::pinned(USER_SLOTS, 0);

/// UDP port -> 1 + the forward session whose relay-side port it is (0: none). Written by the
/// controller with the session records.
#[map]
static PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);

/// What each `NEXTHOPS` slot is for (written by the controller; read back by the next one).
#[map]
static NEXTHOP_KEYS: Array<NexthopKey> = Array::pinned(NEXTHOP_SLOTS, 0);

/// The pinned state's layout stamp and controller bookkeeping (the controller's alone).
#[map]
static META: Array<Meta> = Array::pinned(1, 0);

/// Addresses and ports on which a rule opens sessions in the kernel (TCP rules). Written by
/// the controller.
#[map]
static LISTEN: HashMap<ListenKey, Listen> = HashMap::pinned(RULE_SLOTS, 0);

/// Listen ports of rules the kernel opens sessions for (indexed by port): bit 0 UDP, bit 1
/// TCP. One array read spares the host's own traffic the `LISTEN` lookups. The controller's.
#[map]
static RULE_PORTS: Array<u8> = Array::pinned(PORT_SLOTS, 0);

/// Free session ids with their relay ports, one queue per pool (`session::POOLS`; a rule's
/// is `Listen::pool`), pushed by the controller, popped by XDP when it opens a session. A
/// pool lends each port once: ports are unique among the sessions of the upstreams whose
/// pool it is. Sized by the controller.
#[map]
static POOL0: Queue<PoolSlot> = Queue::pinned(1, 0);
#[map]
static POOL1: Queue<PoolSlot> = Queue::pinned(1, 0);
#[map]
static POOL2: Queue<PoolSlot> = Queue::pinned(1, 0);
#[map]
static POOL3: Queue<PoolSlot> = Queue::pinned(1, 0);

/// Takes a free id and port from pool `i` (`Listen::pool`). The queue is chosen in each arm
/// and only the slot leaves: the verifier then follows one path after it, not one per queue.
#[inline(always)]
fn pool_pop(i: u16) -> Option<PoolSlot> {
    let popped = match i {
        1 => POOL1.pop(),
        2 => POOL2.pop(),
        3 => POOL3.pop(),
        _ => POOL0.pop(),
    };
    popped.ok().flatten()
}

/// Gives a slot back to pool `i` (a session that could not be opened after all).
#[inline(always)]
fn pool_push(i: u16, slot: PoolSlot) {
    let _ = match i {
        1 => POOL1.push(slot, 0),
        2 => POOL2.push(slot, 0),
        3 => POOL3.push(slot, 0),
        _ => POOL0.push(slot, 0),
    };
}

/// Client addresses that hold their rule's `max_sessions_per_source` (the controller's).
#[map]
static SOURCE_FULL: HashMap<SourceKey, u8> = HashMap::pinned(65536, 0);

/// The allow lists of rules with one (the controller's).
#[map]
static ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::pinned(16384, 1);

/// New-session token buckets per rule and CPU (XDP's alone).
#[map]
static RATE: PerCpuArray<Bucket> = PerCpuArray::pinned(RULE_SLOTS, 0);

/// Sessions XDP opened, for the controller (accounting, expiry, logging).
#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);

/// The next hop back to the client of a session XDP opened (indexed like `SESSIONS`; XDP's).
#[map]
static HOPS: Array<Nexthop> = Array::pinned(1, 0);

/// What became of first packets that could open a session in the kernel, per rule, `Open`
/// cause and CPU (`rule * OPEN_SLOTS + cause`).
#[map]
static KERNEL_OPENS: PerCpuArray<u64> = PerCpuArray::pinned(RULE_SLOTS * OPEN_SLOTS, 0);

/// The sockets of SOCKS5 CONNECTs carried in the kernel, by socket cookie (the controller adds
/// them; a closed socket leaves by itself).
#[map]
static SPLICE: SockHash<u64> = SockHash::pinned(SPLICE_SOCKETS, 0);

/// Where what arrives on a CONNECT socket goes (the controller's; see `relay_common::splice`).
#[map]
static SPLICE_LINKS: HashMap<u64, SpliceLink> = HashMap::pinned(SPLICE_SOCKETS, 0);

/// Bytes the verdict passed and redirected per CONNECT socket (counted by the verdict; created
/// and removed by the controller).
#[map]
static SPLICE_COUNTS: HashMap<u64, SpliceCount> = HashMap::pinned(SPLICE_SOCKETS, 0);

/// IPv4 datagrams in fragments whose first fragment was a TCP session's segment: the session
/// and direction their later fragments go to the controller with (XDP's; least recently used
/// evicted). Not pinned: a fragment in flight across a restart is resent by TCP.
#[map]
static FRAGS: LruHashMap<FragKey, Flow> = LruHashMap::with_max_entries(1024, 0);

/// TCP sessions' segments XDP cannot carry, with their frames, for the controller to relay
/// (`tcp_to_controller`). Not pinned: each controller reads its own program's.
#[map]
static TCP_SLOW: PerfEventArray<SlowSegment> = PerfEventArray::new(0);

/// Cookies of CONNECT sockets whose peer fell behind (the verdict's; the controller closes
/// their receive window until the peer catches up).
#[map]
static SPLICE_BEHIND: RingBuf = RingBuf::pinned(SPLICE_BEHIND_RING_BYTES, 0);

/// What the verdict did, over every socket, per CPU (`SPLICE_*` slots of `relay_common::splice`).
#[map]
static SPLICE_TOTALS: PerCpuArray<u64> = PerCpuArray::pinned(SPLICE_TOTAL_SLOTS, 0);

/// Per-user limits on SOCKS5 datagrams (the controller's; see `relay_common::limits`).
#[map]
static USER_LIMITS: Array<UserLimit> = Array::pinned(USER_SLOTS, 0);

/// Payload bytes XDP carried per user while it had a quota or a rate (XDP's).
#[map]
static USER_SPENT: Array<UserSpent> = Array::pinned(USER_SLOTS, 0);

/// Interfaces a frame may be redirected to (ifindex -> ifindex).
#[map]
static EGRESS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// The session port range: UDP to these ports from anything but a session's upstream is
/// dropped. 0/0 disables the check. Set by the controller at load time.
#[unsafe(no_mangle)]
static SESSION_PORT_FIRST: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static SESSION_PORT_LAST: Global<u16> = Global::new(0);

/// SOCKS5 UDP ASSOCIATE ports: datagrams to them may carry a SOCKS5 header to strip. 0/0: no
/// SOCKS5 fast path.
#[unsafe(no_mangle)]
static SOCKS_PORT_FIRST: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static SOCKS_PORT_LAST: Global<u16> = Global::new(0);

/// Offsets of `bytes_acked`, `snd_una` and `write_seq` in this kernel's `struct tcp_sock`,
/// found in its BTF by the controller at load time (`relay_common::splice::sent_into`). 0:
/// unknown; the CONNECT verdict then redirects within the controller's credit alone.
#[unsafe(no_mangle)]
static TCP_BYTES_ACKED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TCP_SND_UNA: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TCP_WRITE_SEQ: Global<u32> = Global::new(0);

/// Interfaces (ifindexes, 0: none; `TX_BY_REDIRECT_ALL`: every one) on which what would leave
/// by XDP_TX leaves by XDP_REDIRECT to the interface it came in on: the veths the controller
/// attaches to. A veth wakes its peer for redirected frames, but for XDP_TX frames only if the
/// peer has an XDP program, so these could wait in its queue.
#[unsafe(no_mangle)]
static TX_BY_REDIRECT: Global<[u32; TX_BY_REDIRECT_SLOTS]> = Global::new([0; TX_BY_REDIRECT_SLOTS]);

#[xdp]
pub fn relay(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame::new(&ctx);
    let len = frame.len();
    let reason = match classify(&ctx, &mut frame) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, len);
    let verdict = reason.verdict();
    if verdict == Verdict::Tx {
        let ingress = ctx.ingress_ifindex() as u32;
        let listed = TX_BY_REDIRECT.load();
        if listed
            .iter()
            .any(|&i| i != 0 && (i == ingress || i == TX_BY_REDIRECT_ALL))
        {
            // An interface not in `EGRESS` (never one the controller attached to) gets
            // XDP_TX: the helper returns the flags' low bits when its lookup fails.
            let action = Verdict::Tx.action();
            return match EGRESS.redirect(ingress, u64::from(action)) {
                Ok(redirect) => redirect,
                Err(fallback) => fallback,
            };
        }
    }
    verdict.action()
}

/// Decides what to do with a frame. `Err` is a frame the fast path declined.
#[inline(always)]
fn classify(ctx: &XdpContext, frame: &mut XdpFrame) -> Result<Reason, Reason> {
    let parsed = parse(frame);
    if parsed == Err(Reason::Ipv4Fragment) {
        return tcp_fragment(ctx, frame);
    }
    let headers = parsed.inspect_err(|reason| {
        let reason = *reason as u32;
        debug!(ctx, "declined frame: reason {}", reason);
    })?;
    match headers.proto {
        PROTO_UDP => relay_udp(ctx, frame, &headers),
        PROTO_TCP => relay_tcp(ctx, frame, &headers),
        _ => Ok(Reason::OtherL4),
    }
}

/// The `FLOWS` key of a packet: its source (the remote end), destination port, protocol.
#[inline(always)]
fn flow_key(h: &Headers) -> FlowKey {
    FlowKey {
        remote: h.src,
        remote_port: h.src_port,
        local_port: h.dst_port,
        family: h.family,
        proto: h.proto,
        _pad: [0; 2],
    }
}

/// A session found through its flow: id, record, and the direction the packet goes.
struct Found {
    id: u32,
    ptr: *mut Session,
    s: &'static Session,
    direction: u32,
}

/// The session a flow leads to, if the packet is that session's: active, of the packet's
/// family and protocol, addressed to the session's relay address, from the session's own
/// remote end (a record reused since the flow was written belongs to someone else).
#[inline(always)]
fn session_of(frame: &XdpFrame, flow: Flow, h: &Headers) -> Result<Found, Reason> {
    let direction = flow.direction & TO_CLIENT;
    let (ptr, s) = active_session(frame, flow.session, h)?;
    if s.proto != h.proto {
        return Err(Reason::NoSession);
    }
    // Fields of the record, not `Session::local`: a `&[u8; 16]` loses the record's 8-byte
    // alignment, and the BPF backend then compares byte by byte.
    let local = if direction == TO_UPSTREAM {
        s.front
    } else {
        s.back
    };
    if !same(local, h.dst) {
        return Err(Reason::WrongDestination);
    }
    let (remote, remote_port) = if direction == TO_UPSTREAM {
        (s.client, s.client_port)
    } else {
        (s.upstream, s.upstream_port)
    };
    if !same(remote, h.src) || remote_port != h.src_port {
        return Err(Reason::NoSession);
    }
    Ok(Found {
        id: flow.session,
        ptr,
        s,
        direction,
    })
}

/// TCP: a segment of a session is relayed as it is (addresses, ports, TTL and checksums
/// change; sequence numbers, options and window do not); a SYN to a TCP rule opens a session.
/// Everything else is the host's own TCP and passes.
#[inline(always)]
fn relay_tcp(ctx: &XdpContext, frame: &mut XdpFrame, h: &Headers) -> Result<Reason, Reason> {
    let Some(flow) = FLOWS.get_ptr(flow_key(h)) else {
        if h.tcp_flags & TCP_SYN == 0 {
            // Not an opening SYN: the host's own TCP, or a connection the controller relays.
            return Err(Reason::Tcp);
        }
        return open_session(ctx, frame, h).unwrap_or(Err(Reason::Tcp));
    };
    // SAFETY: a pointer the map lookup returned, valid for this program run.
    let flow = unsafe { *flow };
    let found = session_of(frame, flow, h).map_err(|r| match r {
        // A live session's segment: the host's stack has no socket for it and would reset
        // the connection.
        Reason::BadIpChecksum => Reason::TcpUncarried,
        other => other,
    })?;
    if !tcp_flags_ok(h) {
        return Err(Reason::TcpBadFlags);
    }
    let carried = carry(ctx, frame, h, &found, Head::Keep);
    // Only a segment that goes on marks the session (relayed here, or by the controller it
    // was handed to): one answered with ICMP or dropped is sent again by its sender.
    match carried {
        Ok(Reason::TcpTooBig | Reason::TcpTtlExpired) => {}
        Err(r) if r != Reason::TcpToController => {}
        _ => note_tcp_state(h, &found),
    }
    carried
}

/// Hands a segment (or, `flags` [`SLOW_FRAGMENT`], a fragment of one) of TCP session
/// `session` to the controller with its frame (`TCP_SLOW`): `tcp_to_controller`, or
/// `tcp_uncarried` if it could not be handed over (no controller reads the buffer, or it is
/// full). Not inlined: its frame stays off the fast path's.
#[inline(never)]
fn to_controller(ctx: &XdpContext, session: u32, direction: u32, flags: u32) -> Reason {
    use aya_ebpf::{cty::c_void, helpers::generated::bpf_perf_event_output, EbpfContext as _};
    let len = (ctx.data_end() - ctx.data()) as u64;
    let meta = SlowSegment {
        session,
        direction,
        len: len as u32,
        flags,
    };
    // The frame's bytes follow the record (the helper copies them from the packet).
    let flags = (len << 32) | aya_ebpf::bindings::BPF_F_CURRENT_CPU;
    // SAFETY: the helper reads `meta` (on the stack, of the size given) and `len` bytes of
    // the packet this program runs for; the map is the perf event array above.
    let rc = unsafe {
        bpf_perf_event_output(
            ctx.as_ptr(),
            (&raw const TCP_SLOW).cast_mut().cast(),
            flags,
            (&raw const meta).cast_mut().cast::<c_void>(),
            core::mem::size_of::<SlowSegment>() as u64,
        )
    };
    if rc == 0 {
        Reason::TcpToController
    } else {
        Reason::TcpUncarried
    }
}

/// An IPv4 fragment: one of a TCP session's segment goes to the controller, which reassembles
/// the segment and relays it (the host's stack would reassemble it and, having no socket for
/// the session, reset the connection). The first fragment is matched to its session as a
/// whole segment is and notes its datagram in `FRAGS`, where the later ones find it.
/// Anything else (the host's own fragments, or a later fragment that arrived before its
/// first) passes to the kernel.
#[inline(always)]
fn tcp_fragment(ctx: &XdpContext, frame: &XdpFrame) -> Result<Reason, Reason> {
    let Some((h, key, first)) = parse_tcp_fragment(frame) else {
        return Err(Reason::Ipv4Fragment);
    };
    let (session, direction) = if first {
        // No session: the host's own datagram, whose later fragments must not find an older
        // one's entry (identifications repeat).
        let not_ours = || {
            let _ = FRAGS.remove(key);
            Err(Reason::Ipv4Fragment)
        };
        let Some(flow) = FLOWS.get_ptr(flow_key(&h)) else {
            return not_ours();
        };
        // SAFETY: a pointer the map lookup returned, valid for this program run.
        let flow = unsafe { *flow };
        let Ok(found) = session_of(frame, flow, &h) else {
            return not_ours();
        };
        let to = Flow {
            session: found.id,
            direction: found.direction,
        };
        if FRAGS.insert(key, to, 0).is_err() {
            return Err(Reason::Ipv4Fragment);
        }
        (found.id, found.direction)
    } else {
        let Some(to) = FRAGS.get_ptr(key) else {
            return Err(Reason::Ipv4Fragment);
        };
        // SAFETY: as above.
        let to = unsafe { *to };
        // The session must still be the one the first fragment found.
        if active_session(frame, to.session, &h).is_err() {
            return Err(Reason::Ipv4Fragment);
        }
        (to.session, to.direction)
    };
    Err(to_controller(ctx, session, direction, SLOW_FRAGMENT))
}

/// Records in the session what a relayed segment says about the connection: the client's
/// first ACK (the handshake completed), a FIN from either side, a RST (the controller
/// lingers, then closes), a new SYN from the client while it lingers (it reopens).
#[inline(always)]
fn note_tcp_state(h: &Headers, found: &Found) {
    let s = found.s;
    if found.direction == TO_UPSTREAM
        && h.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && (s.fin[0] | s.fin[1] | s.rst) != 0
    {
        // A new connection on the same addresses and ports while the old one lingers (as
        // conntrack reopens such an entry): the session starts over, unanswered; the
        // controller, finding it no longer closing when the linger ends, keeps it.
        // SAFETY: `found.ptr` points into the SESSIONS array value; one-byte stores.
        unsafe {
            (*found.ptr).fin = [0, 0];
            (*found.ptr).rst = 0;
            (*found.ptr).acked = 0;
        }
        return;
    }
    if found.direction == TO_UPSTREAM
        && h.tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK
        && found.s.acked == 0
    {
        // The client completed the handshake (a plain store of 1, once).
        // SAFETY: `found.ptr` points into the SESSIONS array value.
        unsafe { (*found.ptr).acked = 1 };
    }
    if h.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        // SAFETY: `found.ptr` points into the SESSIONS array value; one-byte stores of 1,
        // which no other writer undoes while the session lives.
        let first = unsafe {
            let flag = if h.tcp_flags & TCP_RST != 0 {
                &mut (*found.ptr).rst
            } else {
                &mut (*found.ptr).fin[(found.direction & 1) as usize]
            };
            let first = *flag == 0;
            *flag = 1;
            first
        };
        if first {
            // The controller lingers and closes; a full ring leaves it to the idle timeout.
            let event = Event {
                id: found.id,
                kind: EVENT_CLOSING,
            };
            let _ = EVENTS.output::<Event>(&event, 0);
        }
    }
}

/// The first packet of a flow (a TCP SYN, a UDP datagram) addressed to a rule the kernel
/// opens sessions for: `None` if no rule listens there. If the rule's allow list, its limits
/// and the client's share admit it, the session is opened here: an id and relay port from
/// its rule's pool, the record and both flows written, the controller told through `EVENTS`, and the
/// packet relayed. What the kernel cannot open (no free port, next hop unresolved, the ring
/// full) passes to the controller's listening socket, which opens the session (UDP) or
/// relays the connection (TCP) itself.
#[inline(always)]
fn open_session(
    ctx: &XdpContext,
    frame: &mut XdpFrame,
    h: &Headers,
) -> Option<Result<Reason, Reason>> {
    let bit = if h.proto == PROTO_TCP { 2 } else { 1 };
    if RULE_PORTS
        .get(u32::from(h.dst_port))
        .is_none_or(|b| *b & bit == 0)
    {
        return None;
    }
    let lk = ListenKey {
        addr: h.dst,
        port: h.dst_port,
        family: h.family,
        proto: h.proto,
        _pad: [0; 4],
    };
    // A rule on the unspecified address listens on all of them.
    let any = ListenKey {
        addr: [0; 16],
        ..lk
    };
    // SAFETY: references into the map's values, valid for this program run.
    let l = unsafe { LISTEN.get(lk).or_else(|| LISTEN.get(any)) }?;
    Some(open_with(ctx, frame, h, l))
}

#[inline(always)]
fn open_with(
    ctx: &XdpContext,
    frame: &mut XdpFrame,
    h: &Headers,
    l: &Listen,
) -> Result<Reason, Reason> {
    if h.proto == PROTO_TCP {
        // SYN with FIN or RST, or with data, to a rule: a scan or a flood.
        if !tcp_flags_ok(h) {
            return Err(Reason::TcpBadFlags);
        }
        if h.tcp_flags & TCP_ACK != 0 {
            // A SYN-ACK to a listen port answers the host's own connection.
            return Err(Reason::Tcp);
        }
    }
    if !ipv4_header_ok(frame, h) {
        return Err(Reason::BadIpChecksum);
    }
    let rule = l.rule;
    admit(h, l).map_err(|cause| {
        open_count(rule, cause);
        if cause == Open::RuleFull {
            // The controller makes room (evicts a session the upstream never answered) or
            // refuses.
            Reason::OpenToController
        } else {
            Reason::OpenRefused
        }
    })?;
    let to_controller = |cause: Open| {
        open_count(rule, cause);
        Reason::OpenToController
    };
    NEXTHOPS
        .get(u32::from(l.nexthop))
        .filter(|n| n.ifindex != 0)
        .ok_or_else(|| to_controller(Open::NoNexthop))?;
    let back_hop = route_back(ctx).ok_or_else(|| to_controller(Open::NoRoute))?;
    // Reserved first: everything after it can be undone.
    let mut event = EVENTS
        .reserve::<Event>(0)
        .ok_or_else(|| to_controller(Open::RingFull))?;
    let pool = l.pool;
    let Some(slot) = pool_pop(pool) else {
        event.discard(0);
        return Err(to_controller(Open::PoolEmpty));
    };
    let (Some(record), Some(hop)) = (SESSIONS.get_ptr_mut(slot.id), HOPS.get_ptr_mut(slot.id))
    else {
        event.discard(0);
        pool_push(pool, slot);
        return Err(to_controller(Open::PoolEmpty));
    };
    // SAFETY: pointers into the SESSIONS and HOPS array values of an id this program took
    // from the pool: free, so nobody else writes them; no flow leads to it until the flows
    // below are inserted.
    unsafe {
        *hop = back_hop;
        let r = &mut *record;
        r.client = h.src;
        r.front = h.dst;
        r.back = l.back;
        r.upstream = l.upstream;
        r.client_port = h.src_port;
        r.front_port = h.dst_port;
        r.back_port = slot.port;
        r.upstream_port = l.upstream_port;
        r.nexthop = [l.nexthop, NEXTHOP_OWN];
        r.rule = l.rule;
        r.family = h.family;
        r.proto = h.proto;
        r.origin = ORIGIN_KERNEL;
        r.fin = [0; 2];
        r.rst = 0;
        r.acked = 0;
        r.last_seen = 0;
        r.traffic = Default::default();
        r.state = STATE_ACTIVE;
    }
    let client = flow_key(h);
    let upstream = FlowKey {
        remote: l.upstream,
        remote_port: l.upstream_port,
        local_port: slot.port,
        family: h.family,
        proto: h.proto,
        _pad: [0; 2],
    };
    const BPF_NOEXIST: u64 = 1;
    let to_upstream = Flow {
        session: slot.id,
        direction: TO_UPSTREAM,
    };
    let to_client = Flow {
        session: slot.id,
        direction: TO_CLIENT,
    };
    let undo = |slot: PoolSlot| {
        // SAFETY: as above; the record is this program's until it is back in the pool.
        unsafe { (*record).state = STATE_FREE };
        pool_push(pool, slot);
    };
    if FLOWS.insert(client, to_upstream, BPF_NOEXIST).is_err() {
        // Another CPU opened this flow a moment ago (a retransmitted SYN, a burst of
        // datagrams spread over CPUs): this packet takes the controller's way.
        event.discard(0);
        undo(slot);
        return Err(to_controller(Open::Raced));
    }
    if FLOWS.insert(upstream, to_client, BPF_NOEXIST).is_err() {
        let _ = FLOWS.remove(client);
        event.discard(0);
        undo(slot);
        return Err(to_controller(Open::Raced));
    }
    event.write(Event {
        id: slot.id,
        kind: EVENT_OPENED,
    });
    event.submit(0);
    open_count(rule, Open::Opened);
    // SAFETY: as above; from here on the session is live.
    let s = unsafe { &*record };
    let found = Found {
        id: slot.id,
        ptr: record,
        s,
        direction: TO_UPSTREAM,
    };
    carry(ctx, frame, h, &found, Head::Keep)
}

/// Whether rule `l` admits a new session of this client here, in the controller's order:
/// its allow list, the client's share (`SOURCE_FULL`), room (the controller sets
/// `LISTEN_FULL`: a full rule is the controller's to decide, which may evict), its rate.
#[inline(always)]
fn admit(h: &Headers, l: &Listen) -> Result<(), Open> {
    if l.flags & LISTEN_ALLOW_LIST != 0 {
        let data = AllowKey {
            rule: l.rule.to_be_bytes(),
            family: h.family,
            _pad: 0,
            addr: h.src,
        };
        let bits = if h.family == FAMILY_V4 { 32 } else { 128 };
        if ALLOW.get(Key::new(32 + bits, data)).is_none() {
            return Err(Open::NotAllowed);
        }
    }
    let source = SourceKey {
        addr: h.src,
        rule: l.rule,
        family: h.family,
        _pad: 0,
    };
    // SAFETY: a lookup whose value is not used past this statement.
    if unsafe { SOURCE_FULL.get(source) }.is_some() {
        return Err(Open::SourceFull);
    }
    if l.flags & LISTEN_FULL != 0 {
        return Err(Open::RuleFull);
    }
    if l.cost_ns != 0 {
        let bucket = RATE.get_ptr_mut(u32::from(l.rule)).ok_or(Open::Rate)?;
        // SAFETY: this CPU's slot of a per-CPU array; XDP is not preempted on its CPU. A
        // clock read only when a session would open, never per relayed packet.
        unsafe {
            let now = aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns();
            let b = &mut *bucket;
            let credit = (b.credit + now.saturating_sub(b.last)).min(l.burst_ns);
            b.last = now;
            if credit < l.cost_ns {
                b.credit = credit;
                return Err(Open::Rate);
            }
            b.credit = credit - l.cost_ns;
        }
    }
    Ok(())
}

/// The next hop back to a client whose SYN just arrived: the way it came (the link it came
/// in by, the neighbour that delivered it), as a host with symmetric routes answers; the
/// link's MTU from the kernel. None when the link's MTU cannot be read.
#[inline(always)]
fn route_back(ctx: &XdpContext) -> Option<Nexthop> {
    let macs: [u8; 12] = XdpFrame::new(ctx).read(0)?;
    let ifindex = ctx.ingress_ifindex() as u32;
    let mut mtu: u32 = 0;
    // SAFETY: the helper reads and writes `mtu` on our stack; with a length of 0 it checks
    // the packet itself and reports the device's MTU.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_check_mtu(ctx.ctx as *mut _, ifindex, &mut mtu, 0, 0)
    };
    if rc != 0 || mtu == 0 {
        return None;
    }
    let mut hop = Nexthop {
        ifindex,
        mtu: mtu.min(0xffff) as u16,
        src_mac: [0; 6],
        dst_mac: [0; 6],
        _pad: [0; 2],
    };
    hop.dst_mac.copy_from_slice(&macs[6..12]);
    hop.src_mac.copy_from_slice(&macs[..6]);
    Some(hop)
}

#[inline(always)]
fn open_count(rule: u16, cause: Open) {
    let slot = u32::from(rule) * OPEN_SLOTS + cause as u32;
    if let Some(c) = KERNEL_OPENS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP is not preempted on its CPU.
        unsafe { *c += 1 };
    }
}

/// Whether a UDP socket of this namespace would receive the packet.
#[inline(always)]
fn socket_for(ctx: &XdpContext, h: &Headers) -> bool {
    use aya_ebpf::{
        bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
        helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release},
    };
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if h.family == FAMILY_V4 {
        // SAFETY: writing plain-data fields of the union's IPv4 member.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes([h.src[0], h.src[1], h.src[2], h.src[3]]);
            t.daddr = u32::from_ne_bytes([h.dst[0], h.dst[1], h.dst[2], h.dst[3]]);
            t.sport = h.src_port.to_be();
            t.dport = h.dst_port.to_be();
        }
        12
    } else {
        // SAFETY: as above, the IPv6 member; the addresses are copied as network-order words.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(h.src);
            t.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(h.dst);
            t.sport = h.src_port.to_be();
            t.dport = h.dst_port.to_be();
        }
        36
    };
    // SAFETY: the helper reads `size` bytes of `tuple` (on our stack) and returns a socket
    // reference or null; a reference is released at once, as the verifier demands.
    unsafe {
        let sk = bpf_sk_lookup_udp(
            ctx.ctx as *mut _,
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}

/// The fast path: find the flow, then the session, plan, apply, account, send.
#[inline(always)]
fn relay_udp(ctx: &XdpContext, frame: &mut XdpFrame, h: &Headers) -> Result<Reason, Reason> {
    let Some(flow) = FLOWS.get_ptr(flow_key(h)) else {
        let (first, last) = (SOCKS_PORT_FIRST.load(), SOCKS_PORT_LAST.load());
        if first != 0 && h.dst_port >= first && h.dst_port <= last {
            return socks_to_destination(ctx, frame, h);
        }
        if let Some(opened) = open_session(ctx, frame, h) {
            return opened;
        }
        let (first, last) = (SESSION_PORT_FIRST.load(), SESSION_PORT_LAST.load());
        if first != 0 && h.dst_port >= first && h.dst_port <= last && held(h) {
            return Err(Reason::WrongSource);
        }
        return Err(Reason::NoSession);
    };
    // SAFETY: a pointer the map lookup returned, valid for this program run.
    let flow = unsafe { *flow };
    if flow.direction == FLOW_SOCKS {
        return socks_to_client(ctx, frame, h, flow.session);
    }
    let found = session_of(frame, flow, h)?;
    carry(ctx, frame, h, &found, Head::Keep)
}

/// A packet of a session whose flow, record and addresses all matched: plan, apply,
/// account, send. Such a packet is addressed to the relay itself, so one the fast path
/// declines here goes to the controller's socket; if no socket will take it (no controller
/// runs: a restart, a crash), it is dropped and counted as `no_socket` instead of the kernel
/// answering "port unreachable", which makes clients give up. Only declined packets pay for
/// the socket lookup.
#[inline(always)]
fn carry(
    ctx: &XdpContext,
    frame: &mut XdpFrame,
    h: &Headers,
    found: &Found,
    head: Head,
) -> Result<Reason, Reason> {
    let (session, s, direction) = (found.ptr, found.s, found.direction);
    let declined = |reason: Reason| {
        if reason.verdict() != Verdict::Pass {
            reason
        } else if h.proto == PROTO_TCP {
            // No socket would take it (the host's stack would reset the connection): the
            // controller relays it.
            to_controller(ctx, found.id, found.direction, 0)
        } else if !socket_for(ctx, h) {
            Reason::NoSocket
        } else {
            reason
        }
    };
    let nexthop = nexthop_of(found.id, s, direction).map_err(declined)?;
    let plan = match plan(h, s.target(direction), nexthop, head) {
        Ok(p) => p,
        // What a router answers for a packet it will not forward. Not answered: one too big
        // (without DF) goes the declined way (the controller fragments it); one whose TTL is
        // spent has none (a router drops it too).
        Err(reason @ (Reason::TooBig | Reason::TtlExpiring)) if h.proto == PROTO_TCP => {
            let (kind, answered) = if reason == Reason::TooBig {
                (IcmpError::TooBig { mtu: nexthop.mtu }, Reason::TcpTooBig)
            } else {
                (IcmpError::TimeExceeded, Reason::TcpTtlExpired)
            };
            return match icmp::reply(frame, h, kind) {
                Ok(()) => Ok(answered),
                Err(NoReply::Declined) if reason == Reason::TooBig => Err(declined(reason)),
                Err(NoReply::Declined) => Err(Reason::TcpUncarried),
                Err(NoReply::Broken) => Err(Reason::AdjustFailed),
            };
        }
        Err(reason) => return Err(declined(reason)),
    };
    same_link_if_tagged(ctx, h, plan.ifindex).map_err(declined)?;
    // SOCKS5 accounting counts UDP payload bytes, as the controller does; forward rules count
    // IP bytes.
    let bytes = if head == Head::Keep {
        plan.ip_bytes()
    } else {
        let bytes = plan.payload_bytes();
        within_limits(s.rule, direction, bytes)?;
        bytes
    };
    apply(frame, &plan)?;
    account(session, direction, bytes);
    send(ctx, plan.ifindex)
}

/// A SOCKS5 datagram of `bytes` payload bytes against its user's limits: counted as spent if
/// within them. A user without limits costs the one array read.
#[inline(always)]
fn within_limits(rule: u16, direction: u32, bytes: u16) -> Result<(), Reason> {
    let user = u32::from(rule & !RULE_SOCKS);
    let Some(limit) = USER_LIMITS.get(user) else {
        return Ok(());
    };
    if limit.flags == 0 {
        return Ok(());
    }
    let spent = USER_SPENT.get_ptr_mut(user).ok_or(Reason::UserBlocked)?;
    // SAFETY: a pointer into the array map's value, valid for this program run; read as a
    // copy (another CPU may add to it meanwhile: the check may pass one datagram too many
    // per CPU, see `relay_common::limits`).
    let now = unsafe { *spent };
    relay_common::limits::check(limit, &now, direction, u64::from(bytes))?;
    // SAFETY: as above; an atomic add because CPUs share the user's counter.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &(*spent).bytes[(direction & 1) as usize] as *const u64 as *mut u64,
            u64::from(bytes),
        );
    }
    Ok(())
}

/// The active session `id` of the packet's family, for a packet whose IPv4 header checksum is
/// right (checked here, once a packet is known to be the relay's, not for every frame).
#[inline(always)]
fn active_session(
    frame: &XdpFrame,
    id: u32,
    h: &Headers,
) -> Result<(*mut Session, &'static Session), Reason> {
    if !ipv4_header_ok(frame, h) {
        return Err(Reason::BadIpChecksum);
    }
    let session = SESSIONS.get_ptr_mut(id).ok_or(Reason::NoSession)?;
    // SAFETY: a pointer into the array map's value, valid for this program run. The controller
    // only writes whole records of free or retired sessions, so the fields read here are
    // consistent for an active one.
    let s = unsafe { &*session };
    if s.state != STATE_ACTIVE || s.family != h.family {
        return Err(Reason::NoSession);
    }
    Ok((session, s))
}

/// Whether two addresses are equal, compared as two 8-byte words each. Taken by value: a
/// field of a session record is then loaded as the 8-aligned words it is, where comparing
/// `[u8; 16]` references loads byte by byte (the BPF backend assumes they may be misaligned).
#[inline(always)]
fn same(a: [u8; 16], b: [u8; 16]) -> bool {
    u128::from_ne_bytes(a) == u128::from_ne_bytes(b)
}

#[inline(always)]
fn nexthop_of(id: u32, s: &Session, direction: u32) -> Result<&'static Nexthop, Reason> {
    let hop = s.nexthop[(direction & 1) as usize];
    if hop == NEXTHOP_NONE {
        return Err(Reason::NoNexthop);
    }
    if hop == NEXTHOP_OWN {
        return HOPS.get(id).ok_or(Reason::NoNexthop);
    }
    NEXTHOPS.get(hop as u32).ok_or(Reason::NoNexthop)
}

/// Adds one packet of `ip_len` bytes to a session's counters.
#[inline(always)]
fn account(session: *mut Session, direction: u32, ip_len: u16) {
    // SAFETY: `session` points into the SESSIONS array value; atomics because two CPUs may
    // relay the same session at once (one per direction, or RSS spreading a flow).
    unsafe {
        let traffic = &(*session).traffic[(direction & 1) as usize];
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &traffic.packets as *const u64 as *mut u64,
            1,
        );
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &traffic.bytes as *const u64 as *mut u64,
            ip_len as u64,
        );
    }
    // No clock read here: it would cost about a fifth of the fast path. The controller sees
    // that a session is alive from its packet counters changing.
}

/// Whether a UDP packet with no flow is addressed to a live forward session's relay port and
/// address: a stranger's packet to it (dropped). Anything else to a session-range port is
/// the host's own business (another service, another address of the NIC, a reply to the
/// host's own socket) and passes.
#[inline(always)]
fn held(h: &Headers) -> bool {
    let Some(entry) = PORTS.get(u32::from(h.dst_port)) else {
        return false;
    };
    if *entry == 0 {
        return false;
    }
    let Some(s) = SESSIONS.get(*entry - 1) else {
        return false;
    };
    s.state == STATE_ACTIVE && s.family == h.family && same(s.back, h.dst)
}

/// A frame with a VLAN tag keeps it when it is rewritten, which is right only when it leaves
/// by the link it came in on (XDP_TX). Checked before anything is rewritten.
#[inline(always)]
fn same_link_if_tagged(ctx: &XdpContext, h: &Headers, ifindex: u32) -> Result<(), Reason> {
    if h.l3 != 14 && ifindex as usize != ctx.ingress_ifindex() {
        return Err(Reason::VlanOtherLink);
    }
    Ok(())
}

/// XDP_TX if the egress is the ingress interface, else XDP_REDIRECT through `EGRESS`.
#[inline(always)]
fn send(ctx: &XdpContext, ifindex: u32) -> Result<Reason, Reason> {
    if ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Reason::RelayedTx);
    }
    match EGRESS.redirect(ifindex, 0) {
        Ok(_) => Ok(Reason::RelayedRedirect),
        Err(_) => Err(Reason::RedirectFailed),
    }
}

/// A client's SOCKS5 UDP datagram to a destination the controller has approved for its
/// association: strip the header, rewrite, send from the association's port.
#[inline(always)]
fn socks_to_destination(
    ctx: &XdpContext,
    frame: &mut XdpFrame,
    h: &Headers,
) -> Result<Reason, Reason> {
    let at = h.l4 as usize + 8;
    let head: [u8; 4] = frame.read(at).ok_or(Reason::SocksSlowPath)?;
    if head[0] != 0 || head[1] != 0 {
        return Err(Reason::SocksSlowPath);
    }
    if head[2] != 0 {
        return Err(Reason::SocksFragment);
    }
    let mut dest = [0u8; 16];
    let (family, port) = if head[3] == 1 {
        let b: [u8; 6] = frame.read(at + 4).ok_or(Reason::SocksSlowPath)?;
        dest[..4].copy_from_slice(&b[..4]);
        (FAMILY_V4, u16::from_be_bytes([b[4], b[5]]))
    } else if head[3] == 4 {
        let b: [u8; 18] = frame.read(at + 4).ok_or(Reason::SocksSlowPath)?;
        dest.copy_from_slice(&b[..16]);
        (FAMILY_V6, u16::from_be_bytes([b[16], b[17]]))
    } else {
        // A domain name: the controller resolves it.
        return Err(Reason::SocksSlowPath);
    };
    if family != h.family {
        return Err(Reason::SocksSlowPath);
    }
    let key = FlowKey {
        remote: dest,
        remote_port: port,
        local_port: h.dst_port,
        family,
        proto: PROTO_UDP,
        _pad: [0; 2],
    };
    let flow = FLOWS.get_ptr(key).ok_or(Reason::SocksSlowPath)?;
    // SAFETY: a pointer the map lookup returned, valid for this program run.
    let flow = unsafe { *flow };
    if flow.direction != FLOW_SOCKS {
        return Err(Reason::SocksSlowPath);
    }
    let (session, s) = active_session(frame, flow.session, h).map_err(|r| match r {
        Reason::NoSession => Reason::SocksSlowPath,
        other => other,
    })?;
    // Only the association's client, to the address it reached.
    if !same(s.client, h.src) || s.client_port != h.src_port || !same(s.front, h.dst) {
        return Err(Reason::SocksSlowPath);
    }
    // The header just read, FRAG 0: what the plan removes.
    let strip = Head::Strip(SocksHeader::new(family, &dest, port));
    let found = Found {
        id: flow.session,
        ptr: session,
        s,
        direction: TO_UPSTREAM,
    };
    carry(ctx, frame, h, &found, strip)
}

/// A destination's reply to an association: rewrite toward the client and prepend the SOCKS5
/// header naming the destination.
#[inline(always)]
fn socks_to_client(
    ctx: &XdpContext,
    frame: &mut XdpFrame,
    h: &Headers,
    id: u32,
) -> Result<Reason, Reason> {
    let (session, s) = active_session(frame, id, h)?;
    if !same(s.back, h.dst) {
        return Err(Reason::WrongDestination);
    }
    if !same(s.upstream, h.src) || s.upstream_port != h.src_port {
        return Err(Reason::NoSession);
    }
    let prepend = Head::Prepend(SocksHeader::new(s.family, &s.upstream, s.upstream_port));
    let found = Found {
        id,
        ptr: session,
        s,
        direction: TO_CLIENT,
    };
    carry(ctx, frame, h, &found, prepend)
}

#[inline(always)]
fn count(reason: Reason, len: usize) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of a map value that lives as long as the map; XDP programs are
        // not preempted on their CPU, so nothing else writes this slot concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        }
    }
}

/// The stream verdict of CONNECT sockets: what arrives on one socket goes out of its peer
/// (`bpf_sk_redirect_hash`, no copy to userspace), unless the controller must see it first
/// (`relay_common::splice::may_redirect`) or the peer has used its credit
/// (`within_credit`): then it is passed to the socket's own receive queue, and the controller
/// reads and forwards it.
#[stream_verdict]
pub fn splice(ctx: SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    if len == 0 {
        // A chunk without bytes: a FIN that came alone. Redirected, it would reach the
        // peer's send path as a zero-byte send, which the kernel takes for a broken pipe
        // (EPIPE on the peer socket, and nothing more sent out of it: the bytes redirected
        // after it would be lost). Passed, it ends the stream in this socket's own queue,
        // where the controller reads the end and shuts the peer's writing half itself.
        return SK_PASS;
    }
    // SAFETY: the helper reads the socket of the skb this program was called for.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(count) = SPLICE_COUNTS.get_ptr_mut(cookie) else {
        total(SPLICE_UNKNOWN, 1);
        return SK_PASS;
    };
    // SAFETY: map values live while the map does; `passed` is written only here, and the
    // kernel runs a socket's verdict for one chunk at a time (under the socket's lock).
    // The link is copied once: the controller may replace it meanwhile (a preallocated
    // hash reuses elements), and every decision below must see one version of it.
    let (link, held) = unsafe { (SPLICE_LINKS.get(cookie).copied(), *count) };
    if let Some(link) = &link {
        if may_redirect(link, &held) {
            // The peer's progress is read only once the controller's credit is used up.
            let queued = if within_credit(link, &held, len) {
                None
            } else {
                peer_sent(link.peer)
            };
            let room = room(link, &held, len, queued);
            if room == Room::Full {
                // The peer fell behind: this chunk and the next go to the controller, whose
                // reading follows the peer, so the sender's window closes meanwhile.
                total(SPLICE_NO_CREDIT, 1);
            } else if SPLICE.redirect_skb(&ctx, link.peer, 0) == i64::from(SK_PASS) {
                // SAFETY: as above; atomic because the controller reads it meanwhile.
                unsafe {
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                        &raw mut (*count).redirected,
                        len,
                    );
                }
                total(SPLICE_REDIRECTED, len);
                if room == Room::Behind && tell_behind(&held) {
                    // Into the overflow: the controller stops the sender. Told again a quarter
                    // window later should this message be lost (the ring full).
                    // SAFETY: as above (`behind` is written only here).
                    unsafe { (*count).behind = held.redirected + len };
                    if SPLICE_BEHIND.output::<u64>(&cookie, 0).is_ok() {
                        total(SPLICE_FELL_BEHIND, 1);
                    }
                }
                return SK_PASS;
            } else {
                total(SPLICE_NO_PEER, 1);
            }
        }
    }
    // SAFETY: as above.
    unsafe { (*count).passed = held.passed.wrapping_add(len) };
    total(SPLICE_PASSED, len);
    SK_PASS
}

/// What the CONNECT socket with cookie `peer` has taken into its send queue
/// (`relay_common::splice::sent_into`), read from its `tcp_sock`; `None` if the offsets are
/// unknown or the socket is gone.
#[inline(always)]
fn peer_sent(peer: u64) -> Option<u64> {
    use aya_ebpf::{
        cty::c_void,
        helpers::generated::{
            bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_release, bpf_skc_to_tcp_sock,
        },
    };
    let (acked_at, una_at, seq_at) = (
        TCP_BYTES_ACKED.load(),
        TCP_SND_UNA.load(),
        TCP_WRITE_SEQ.load(),
    );
    if acked_at == 0 || una_at == 0 || seq_at == 0 {
        return None;
    }
    let key = peer;
    // SAFETY: a lookup in the sockhash by a key on the stack; the kernel returns the socket
    // with a reference taken (or null), released below on every path.
    let sk = unsafe {
        bpf_map_lookup_elem(
            (&raw const SPLICE).cast_mut().cast(),
            (&raw const key).cast(),
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the referenced socket from the lookup; the helper returns it as a
    // `tcp_sock` if it is one, else null.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>();
    let (mut acked, mut una, mut seq) = (0u64, 0u32, 0u32);
    // SAFETY: reads of 8 and 4 bytes at offsets inside the `tcp_sock` (from the kernel's own
    // BTF) of a socket held by the reference above; the helper checks each read and fails
    // instead of faulting.
    let read = !tp.is_null()
        && unsafe {
            bpf_probe_read_kernel(
                (&raw mut acked).cast::<c_void>(),
                8,
                tp.wrapping_add(acked_at as usize).cast(),
            ) == 0
                && bpf_probe_read_kernel(
                    (&raw mut una).cast::<c_void>(),
                    4,
                    tp.wrapping_add(una_at as usize).cast(),
                ) == 0
                && bpf_probe_read_kernel(
                    (&raw mut seq).cast::<c_void>(),
                    4,
                    tp.wrapping_add(seq_at as usize).cast(),
                ) == 0
        };
    // SAFETY: releases the reference the lookup took, once.
    unsafe { bpf_sk_release(sk) };
    read.then(|| sent_into(acked, una, seq))
}

#[inline(always)]
fn total(slot: u32, n: u64) {
    if let Some(t) = SPLICE_TOTALS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot; the verdict is not preempted on its CPU.
        unsafe { *t += n };
    }
}

/// The running controller's socket for what XDP declines of the UDP sessions it opened
/// (which have no socket of their own): index 0 IPv4, 1 IPv6. Not pinned: each controller
/// loads its own with the lookup program that uses it, and its socket leaves the map when
/// it closes.
#[map]
static SLOW_SOCKETS: SockMap = SockMap::with_max_entries(2, 0);

/// Socket lookup (attached to the namespace while a controller runs): a UDP datagram the
/// host's stack is to deliver to a session port, from the upstream of a session XDP opened,
/// goes to the controller's socket (`SLOW_SOCKETS`), which relays it to the client as it
/// relays what reaches a session socket. Connected sockets (the sessions the controller
/// opened) are found before this runs; anything else is left to the normal lookup.
#[sk_lookup]
pub fn session_port(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // The verifier takes only loads at constant offsets of the context itself: each field is
    // read on its own, through a volatile load the compiler cannot merge or offset.
    macro_rules! field {
        ($($f:tt)+) => {
            // SAFETY: the context points at the kernel's lookup description for this run;
            // the field is a plain integer.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*l).$($f)+)) }
        };
    }
    if field!(protocol) != u32::from(PROTO_UDP) {
        return SK_PASS;
    }
    let local_port = field!(local_port);
    let port = local_port as u16;
    let (first, last) = (SESSION_PORT_FIRST.load(), SESSION_PORT_LAST.load());
    if first == 0 || port < first || port > last || local_port > 0xffff {
        return SK_PASS;
    }
    let (mut remote, mut local) = ([0u8; 16], [0u8; 16]);
    let family = field!(family);
    let (family, slot) = if family == 2 {
        remote[..4].copy_from_slice(&field!(remote_ip4).to_ne_bytes());
        local[..4].copy_from_slice(&field!(local_ip4).to_ne_bytes());
        (FAMILY_V4, 0)
    } else if family == 10 {
        let words = [
            field!(remote_ip6[0]),
            field!(remote_ip6[1]),
            field!(remote_ip6[2]),
            field!(remote_ip6[3]),
        ];
        let local_words = [
            field!(local_ip6[0]),
            field!(local_ip6[1]),
            field!(local_ip6[2]),
            field!(local_ip6[3]),
        ];
        // SAFETY: four network-order words are sixteen address bytes.
        remote = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) };
        // SAFETY: as above.
        local = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(local_words) };
        (FAMILY_V6, 1)
    } else {
        return SK_PASS;
    };
    let key = FlowKey {
        remote,
        remote_port: u16::from_be(field!(remote_port)),
        local_port: port,
        family,
        proto: PROTO_UDP,
        _pad: [0; 2],
    };
    // SAFETY: references into map values, valid for this program run.
    let Some(flow) = (unsafe { FLOWS.get(key) }) else {
        return SK_PASS;
    };
    if flow.direction != TO_CLIENT {
        return SK_PASS;
    }
    match SESSIONS.get(flow.session) {
        Some(s) if s.state == STATE_ACTIVE && s.origin == ORIGIN_KERNEL && same(s.back, local) => {}
        _ => return SK_PASS,
    }
    // Replacing what an earlier program chose: during a handover the predecessor's program,
    // attached before this one, runs until it exits, and this controller's socket takes
    // over at once. With no socket here (this controller is going, or has no IPv6 loopback
    // and gave those sessions sockets of their own), nothing is chosen and the normal lookup
    // decides: XDP, which looks sockets up the same way before it passes anything of these
    // sessions, drops and counts as `no_socket` what would find none.
    const BPF_SK_LOOKUP_F_REPLACE: u64 = 1;
    let _ = SLOW_SOCKETS.redirect_sk_lookup(&ctx, slot, BPF_SK_LOOKUP_F_REPLACE);
    SK_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
