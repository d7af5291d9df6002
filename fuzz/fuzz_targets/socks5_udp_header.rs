//! The SOCKS5 UDP header parser (used by the controller; the XDP program reads the same
//! layout): never panics, and a parsed header round-trips through the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_common::socks5::{encode_udp_header, parse_udp_header};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse_udp_header(data) {
        assert!(h.payload <= data.len());
        let mut out = [0u8; 300];
        let n = encode_udp_header(&h.addr, &mut out).expect("a parsed address encodes");
        let again = parse_udp_header(&out[..n]).expect("re-parses").expect("whole");
        assert_eq!(again.addr, h.addr);
    }
});
