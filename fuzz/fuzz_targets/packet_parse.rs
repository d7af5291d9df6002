//! The frame parser the XDP program runs, on arbitrary frames: never panics, and offsets it
//! returns lie inside the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_common::packet::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse(data) {
        assert!(usize::from(h.l3) < data.len() && usize::from(h.l4) <= data.len());
        assert!(usize::from(h.l4) + usize::from(h.l4_len) <= data.len());
    }
});
