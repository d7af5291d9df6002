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
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
    Global,
};
use aya_log_ebpf::debug;
use relay_common::{
    counters::{Counter, Reason, Verdict, COUNTER_SLOTS},
    packet::{ipv4_header_ok, parse, Headers, Packet, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP},
    rewrite::{apply, plan, Head, SocksHeader},
    session::{
        Flow, FlowKey, Meta, Nexthop, NexthopKey, RuleStats, Session, SlowPath, UserStats,
        FLOW_SOCKS, NEXTHOP_NONE, NEXTHOP_SLOTS, PORT_SLOTS, RULE_SLOTS, STATE_ACTIVE, TO_CLIENT,
        TO_UPSTREAM, USER_SLOTS,
    },
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

#[xdp]
pub fn relay(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame::new(&ctx);
    let len = frame.len();
    let reason = match classify(&ctx, &mut frame) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, len);
    reason.verdict().action()
}

/// Decides what to do with a frame. `Err` is a frame the fast path declined.
#[inline(always)]
fn classify(ctx: &XdpContext, frame: &mut XdpFrame) -> Result<Reason, Reason> {
    let headers = parse(frame).inspect_err(|reason| {
        let reason = *reason as u32;
        debug!(ctx, "declined frame: reason {}", reason);
    })?;
    match headers.proto {
        PROTO_UDP => relay_udp(ctx, frame, &headers),
        PROTO_TCP => Ok(Reason::Tcp),
        _ => Ok(Reason::OtherL4),
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
    let key = FlowKey {
        remote: h.src,
        remote_port: h.src_port,
        local_port: h.dst_port,
        family: h.family,
        proto: PROTO_UDP,
        _pad: [0; 2],
    };
    let Some(flow) = FLOWS.get_ptr(key) else {
        let (first, last) = (SOCKS_PORT_FIRST.load(), SOCKS_PORT_LAST.load());
        if first != 0 && h.dst_port >= first && h.dst_port <= last {
            return socks_to_destination(ctx, frame, h);
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
    let direction = flow.direction & TO_CLIENT;
    let (session, s) = active_session(frame, flow.session, h)?;
    let local = if direction == TO_UPSTREAM {
        s.front
    } else {
        s.back
    };
    if !same(local, h.dst) {
        return Err(Reason::WrongDestination);
    }
    // The flow led to this record; it must also be the packet's own session (a record
    // reused since the flow was written belongs to someone else).
    let (remote, remote_port) = if direction == TO_UPSTREAM {
        (s.client, s.client_port)
    } else {
        (s.upstream, s.upstream_port)
    };
    if !same(remote, h.src) || remote_port != h.src_port {
        return Err(Reason::NoSession);
    }
    carry(ctx, frame, h, (session, s), direction, Head::Keep)
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
    (session, s): (*mut Session, &Session),
    direction: u32,
    head: Head,
) -> Result<Reason, Reason> {
    let declined = |reason: Reason| {
        if reason.verdict() == Verdict::Pass && !socket_for(ctx, h) {
            Reason::NoSocket
        } else {
            reason
        }
    };
    let plan = nexthop_of(s, direction)
        .and_then(|nexthop| plan(h, s.target(direction), nexthop, head))
        .map_err(declined)?;
    same_link_if_tagged(ctx, h, plan.ifindex).map_err(declined)?;
    apply(frame, &plan)?;
    // SOCKS5 accounting counts UDP payload bytes, as the controller does; forward rules count
    // IP bytes.
    let bytes = if head == Head::Keep {
        plan.ip_bytes()
    } else {
        plan.payload_bytes()
    };
    account(session, direction, bytes);
    send(ctx, plan.ifindex)
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
fn nexthop_of(s: &Session, direction: u32) -> Result<&'static Nexthop, Reason> {
    let hop = s.nexthop[(direction & 1) as usize];
    if hop == NEXTHOP_NONE {
        return Err(Reason::NoNexthop);
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
    carry(ctx, frame, h, (session, s), TO_UPSTREAM, strip)
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
    carry(ctx, frame, h, (session, s), TO_CLIENT, prepend)
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

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
