//! The relay's XDP program.
//!
//! Every frame is parsed once with the shared parser from `relay-common`, classified, counted
//! under exactly one [`Reason`] and given that reason's verdict. Frames the relay does not own
//! are passed to the kernel untouched.
#![no_std]
#![no_main]

mod frame;

use aya_ebpf::{
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use relay_common::{
    counters::{Counter, Reason, COUNTER_SLOTS},
    packet::{parse, Packet, PROTO_TCP, PROTO_UDP},
};

use crate::frame::XdpFrame;

/// Packets and bytes per [`Reason`], per CPU. Pinned so that counts survive a controller
/// restart.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[xdp]
pub fn relay(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let reason = match classify(&ctx, &frame) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, frame.len());
    reason.verdict().action()
}

/// Decides what to do with a frame. `Err` is a frame the parser declined.
#[inline(always)]
fn classify(ctx: &XdpContext, frame: &XdpFrame) -> Result<Reason, Reason> {
    let headers = parse(frame).inspect_err(|reason| {
        let reason = *reason as u32;
        debug!(ctx, "declined frame: reason {}", reason);
    })?;
    Ok(match headers.proto {
        PROTO_UDP => Reason::NoSession,
        PROTO_TCP => Reason::Tcp,
        _ => Reason::OtherL4,
    })
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
