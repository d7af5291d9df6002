//! What the relay's XDP objects share: the frame accessor that implements
//! `relay_common::packet::Packet` over `data`/`data_end`.
//!
//! Two objects are built from this crate: `relay` (`src/main.rs`), the data path the relay
//! loads, and `relay-bench` (`src/bin/relay-bench.rs`), the benchmark's reference and peer
//! programs, which the relay never loads.
#![no_std]
// Inline assembly for misaligned packet loads and stores (frame.rs).
#![feature(asm_experimental_arch)]

pub mod frame;

/// The objects' panic handler (one for both). The verifier rejects a program with a reachable
/// panic, so this is never called.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
