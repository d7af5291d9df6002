//! The relay's XDP program.
//!
//! Every frame is parsed once with the shared parser from `relay-common`, classified, counted
//! under exactly one [`Reason`] and given that reason's verdict. A UDP packet that belongs to a
//! session is rewritten as `relay_common::rewrite::plan` says, in one place ([`apply`]), and
//! sent with XDP_TX or XDP_REDIRECT. Everything else goes to the kernel untouched.
#![no_std]
#![no_main]
// `core` has no `fetch_add` for the BPF target; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod frame;

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
    Global,
};
use aya_log_ebpf::debug;
use relay_common::{
    counters::{Counter, Reason, COUNTER_SLOTS},
    packet::{parse, Headers, Packet, FAMILY_V4, PROTO_TCP, PROTO_UDP},
    rewrite::{plan, Rewrite},
    session::{
        Flow, FlowKey, Nexthop, RuleStats, Session, SlowPath, Target, UserStats, NEXTHOP_NONE,
        NEXTHOP_SLOTS, RULE_SLOTS, STATE_ACTIVE, TO_CLIENT, USER_SLOTS,
    },
};

use crate::frame::XdpFrame;

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

/// Interfaces a frame may be redirected to (ifindex -> ifindex).
#[map]
static EGRESS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// The session port range: UDP to these ports from anything but a session's upstream is
/// dropped. 0/0 disables the check. Set by the controller at load time.
#[unsafe(no_mangle)]
static SESSION_PORT_FIRST: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static SESSION_PORT_LAST: Global<u16> = Global::new(0);

#[xdp]
pub fn relay(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let len = frame.len();
    let reason = match classify(&ctx, &frame) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, len);
    reason.verdict().action()
}

/// Decides what to do with a frame. `Err` is a frame the fast path declined.
#[inline(always)]
fn classify(ctx: &XdpContext, frame: &XdpFrame) -> Result<Reason, Reason> {
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

/// The fast path: find the session, plan, apply, account, send.
#[inline(always)]
fn relay_udp(ctx: &XdpContext, frame: &XdpFrame, h: &Headers) -> Result<Reason, Reason> {
    let key = FlowKey {
        remote: h.src,
        remote_port: h.src_port,
        local_port: h.dst_port,
        family: h.family,
        proto: PROTO_UDP,
        _pad: [0; 2],
    };
    let Some(flow) = FLOWS.get_ptr(key) else {
        let (first, last) = (SESSION_PORT_FIRST.load(), SESSION_PORT_LAST.load());
        if first != 0 && h.dst_port >= first && h.dst_port <= last {
            return Err(Reason::WrongSource);
        }
        return Err(Reason::NoSession);
    };
    // SAFETY: a pointer the map lookup returned, valid for this program run.
    let flow = unsafe { *flow };
    let session = SESSIONS
        .get_ptr_mut(flow.session)
        .ok_or(Reason::NoSession)?;
    // SAFETY: a pointer into the array map's value, valid for this program run. The controller
    // only writes whole records of free or retired sessions, so the fields read here are
    // consistent for an active one.
    let s = unsafe { &*session };
    if s.state != STATE_ACTIVE || s.family != h.family {
        return Err(Reason::NoSession);
    }
    let direction = flow.direction & TO_CLIENT;
    if *s.local(direction) != h.dst {
        return Err(Reason::WrongDestination);
    }
    let hop = s.nexthop[direction as usize];
    if hop == NEXTHOP_NONE {
        return Err(Reason::NoNexthop);
    }
    let nexthop = NEXTHOPS.get(hop as u32).ok_or(Reason::NoNexthop)?;
    let target = s.target(direction);
    let rewrite = plan(h, &target, nexthop)?;
    apply(frame, h, &target, &rewrite).ok_or(Reason::Truncated)?;

    let traffic = &s.traffic[direction as usize];
    let ip_len = (h.l4 - h.l3) as u64 + h.l4_len as u64;
    // SAFETY: the counters live in the map value; atomics because two CPUs may relay the same
    // session at once (one per direction, or RSS spreading a flow).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &traffic.packets as *const u64 as *mut u64,
            1,
        );
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &traffic.bytes as *const u64 as *mut u64,
            ip_len,
        );
        // A plain store: any CPU's recent time is as good as another's.
        (*session).last_seen = bpf_ktime_get_coarse_ns();
    }

    if rewrite.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Reason::RelayedTx);
    }
    match EGRESS.redirect(rewrite.ifindex, 0) {
        Ok(_) => Ok(Reason::RelayedRedirect),
        Err(_) => Err(Reason::RedirectFailed),
    }
}

/// Writes a planned rewrite into the frame: the one place packet bytes change.
#[inline(always)]
fn apply(frame: &XdpFrame, h: &Headers, t: &Target, rw: &Rewrite) -> Option<()> {
    frame.write(0, rw.dst_mac)?;
    frame.write(6, rw.src_mac)?;
    let l3 = h.l3 as usize;
    let l4 = h.l4 as usize;
    if h.family == FAMILY_V4 {
        frame.write(l3 + 8, rw.hop_limit)?;
        frame.write(l3 + 10, rw.ip_check.to_be_bytes())?;
        frame.write(l3 + 12, [t.src[0], t.src[1], t.src[2], t.src[3]])?;
        frame.write(l3 + 16, [t.dst[0], t.dst[1], t.dst[2], t.dst[3]])?;
    } else {
        frame.write(l3 + 7, rw.hop_limit)?;
        frame.write(l3 + 8, *t.src)?;
        frame.write(l3 + 24, *t.dst)?;
    }
    frame.write(l4, t.src_port.to_be_bytes())?;
    frame.write(l4 + 2, t.dst_port.to_be_bytes())?;
    frame.write(l4 + 6, rw.l4_check.to_be_bytes())
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
