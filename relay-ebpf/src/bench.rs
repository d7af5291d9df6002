//! Programs for `cargo xtask bench` only; the relay never attaches them.
//!
//! - `macswap`: the reference the fast path is compared with: swap the MAC addresses, XDP_TX.
//! - `generate`: XDP_TX as is; run with BPF_PROG_RUN in live-frames mode it sends a prepared
//!   frame out of an interface at line rate (a packet generator where pktgen is missing).
//! - `sink`: counts the UDP that arrives and drops it (the receiving end of a benchmark).

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use relay_common::{counters::Counter, packet::Packet as _};

use crate::frame::XdpFrame;

#[map]
static SINK: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn macswap(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let Some(macs) = frame.read::<[u8; 12]>(0) else {
        return xdp_action::XDP_PASS;
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    match frame.write(0, swapped) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

#[xdp]
pub fn generate(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Counts and drops UDP; passes the rest (ARP and neighbour discovery must keep working).
#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let len = frame.len() as u64;
    match relay_common::packet::parse(&frame) {
        Ok(h) if h.proto == relay_common::packet::PROTO_UDP => {}
        _ => return xdp_action::XDP_PASS,
    }
    if let Some(c) = SINK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP is not preempted on its CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
    xdp_action::XDP_DROP
}
