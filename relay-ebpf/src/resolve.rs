//! `resolve`: the controller's window on the kernel's FIB and neighbour table.
//!
//! Never attached. The controller runs it with BPF_PROG_TEST_RUN on a frame holding a
//! `ResolveRequest`; it asks `bpf_fib_lookup` (egress view, so IP forwarding need not be on)
//! and writes a `ResolveReply` over the frame. Keeping this lookup out of the per-packet path is
//! what lets the fast path cost a map read instead of a FIB walk.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LOOKUP_OUTPUT},
    helpers::generated::bpf_fib_lookup,
    macros::xdp,
    programs::XdpContext,
    EbpfContext as _,
};
use relay_common::{
    packet::{Packet as _, FAMILY_V4},
    session::{ResolveReply, ResolveRequest},
};

use crate::frame::XdpFrame;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[xdp]
pub fn resolve(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let Some(req) = frame.read::<ResolveRequest>(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (integers and unions of integers).
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.ifindex = req.ifindex;
    if req.family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([req.dst[0], req.dst[1], req.dst[2], req.dst[3]]);
    } else {
        params.family = AF_INET6;
        let d = req.dst;
        params.__bindgen_anon_4.ipv6_dst = [
            u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
            u32::from_ne_bytes([d[4], d[5], d[6], d[7]]),
            u32::from_ne_bytes([d[8], d[9], d[10], d[11]]),
            u32::from_ne_bytes([d[12], d[13], d[14], d[15]]),
        ];
    }
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size passed; `ctx` is
    // this program's context.
    let result = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let reply = ResolveReply {
        result: result as i32,
        ifindex: params.ifindex,
        // SAFETY: after the lookup the kernel has written `mtu_result` in this union.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        src_mac: params.smac,
        dst_mac: params.dmac,
        _pad: [0; 2],
    };
    match frame.write(0, reply) {
        Some(()) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}
