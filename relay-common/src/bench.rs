//! Types of the benchmark's own XDP programs (`relay-ebpf`'s `bench` module); the relay never
//! uses them.

/// The one rule of the `nat` program, a minimal stateless NAT that `cargo xtask bench`
/// compares the relay with: IPv4 UDP to `match_port` gets `to` as destination address,
/// `to_port` as destination port and `src` as source address (the source port is kept), the
/// MAC addresses of the next hop, and is redirected out of `ifindex`. Ports are in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatelessNat {
    pub ifindex: u32,
    pub match_port: [u8; 2],
    pub to_port: [u8; 2],
    pub src: [u8; 4],
    pub to: [u8; 4],
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, only integers and byte arrays, no padding (4+2+2+4+4+6+6 = 28, a
// multiple of the 4-byte alignment; checked below).
unsafe impl aya::Pod for StatelessNat {}

#[cfg(test)]
mod tests {
    #[test]
    fn stateless_nat_has_no_padding() {
        assert_eq!(core::mem::size_of::<super::StatelessNat>(), 28);
    }
}
