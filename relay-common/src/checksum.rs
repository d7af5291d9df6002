//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All 16-bit words are taken as they appear on the wire, read big-endian
//! (`u16::from_be_bytes`), and checksums are returned the same way, so that
//! `checksum.to_be_bytes()` is what goes into the header.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of `bytes` (an odd trailing byte is padded with zero), added to `sum`.
/// Not folded; call [`fold`] at the end.
#[inline(always)]
pub fn sum_bytes(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        // Fold early so that arbitrarily long inputs cannot overflow.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_be_bytes([*last, 0]) as u32;
    }
    sum
}

/// The checksum of `bytes` (the complement of their one's-complement sum).
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_bytes(0, bytes))
}

/// Sum of the IPv4/IPv6 pseudo header for a transport checksum.
/// `src`/`dst` are 4 or 16 bytes; `len` is the transport length.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u32 {
    let mut sum = sum_bytes(0, src);
    sum = sum_bytes(sum, dst);
    sum += proto as u32;
    sum += len >> 16;
    sum += len & 0xffff;
    sum
}

/// Transport (UDP/TCP) checksum over a pseudo header and `segment` (whose checksum field must
/// be zero). For UDP a result of 0 is sent as 0xffff (RFC 768).
pub fn transport_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let sum = pseudo_header_sum(src, dst, proto, segment.len() as u32);
    let c = !fold(sum_bytes(sum, segment));
    if c == 0 && proto == crate::packet::PROTO_UDP {
        0xffff
    } else {
        c
    }
}

/// An incremental checksum update: the accumulated effect of replacing some 16-bit words by
/// others (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`). Build it with [`Delta::replace`] and
/// friends, then apply it to any number of checksums that cover the same words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    pub const NONE: Delta = Delta(0);

    /// Accounts for the word `old` being replaced by `new`.
    #[inline(always)]
    pub const fn replace(self, old: u16, new: u16) -> Delta {
        let s = self.0 + (!old) as u32 + new as u32;
        Delta((s & 0xffff) + (s >> 16))
    }

    /// Accounts for the first `len` bytes (4 for IPv4, 16 for IPv6) of an address being
    /// replaced.
    #[inline(always)]
    pub const fn replace_addr(self, old: &[u8; 16], new: &[u8; 16], len: usize) -> Delta {
        let mut d = self;
        let mut i = 0;
        while i < len && i < 16 {
            d = d.replace(
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
        d
    }

    /// Combines two deltas.
    #[inline(always)]
    pub const fn add(self, other: Delta) -> Delta {
        let s = self.0 + other.0;
        Delta((s & 0xffff) + (s >> 16))
    }

    /// Applies the update to checksum `check`.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u32 + self.0)
    }

    /// Applies the update to a UDP checksum: 0 ("no checksum", IPv4 only) stays 0, and a
    /// computed 0 is sent as 0xffff.
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        let c = self.apply(check);
        if c == 0 {
            0xffff
        } else {
            c
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_bytes(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        // A real IPv4 header (checksum b861).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(checksum(&zeroed), 0xb861);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(sum_bytes(0, &[0x12, 0x34, 0x56])), 0x1234 + 0x5600);
    }

    /// A tiny deterministic generator so the property test needs no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next() as u8)
        }
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut rng = Lcg(7);
        for _ in 0..20_000 {
            let mut data: [u8; 40] = rng.bytes();
            let before = checksum(&data);
            // Replace an address-sized span and a port.
            let old_addr: [u8; 16] = data[8..24].try_into().unwrap();
            let new_addr: [u8; 16] = rng.bytes();
            let old_port = u16::from_be_bytes([data[30], data[31]]);
            let new_port = rng.next() as u16;
            data[8..24].copy_from_slice(&new_addr);
            data[30..32].copy_from_slice(&new_port.to_be_bytes());
            let delta = Delta::NONE
                .replace_addr(&old_addr, &new_addr, 16)
                .replace(old_port, new_port);
            let after = checksum(&data);
            // One's complement has two zeros; both verify, so compare by verification.
            let inc = delta.apply(before);
            assert!(
                inc == after || (inc == 0xffff && after == 0) || (inc == 0 && after == 0xffff),
                "incremental {inc:04x} != recomputed {after:04x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_zero_result_becomes_ffff() {
        let d = Delta::NONE.replace(0x1234, 0x4321);
        assert_eq!(d.apply_udp(0), 0);
        // Find a checksum whose update computes to zero.
        let check = (0..=0xffffu16)
            .find(|c| *c != 0 && d.apply(*c) == 0)
            .expect("some checksum updates to 0");
        assert_eq!(d.apply_udp(check), 0xffff);
    }
}
