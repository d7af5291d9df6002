//! Header parsing shared by the XDP program and the host.
//!
//! The parser is generic over [`Packet`], a bounds-checked view of a frame. The XDP program
//! implements it over `data`/`data_end` (every read is checked against `data_end`, which is
//! what the verifier wants to see); the host implements it over a byte slice, so the very same
//! code is unit-tested here. Everything is `#[inline(always)]`: BPF-to-BPF calls cannot pass
//! or return structs.

use core::mem::size_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::counters::Reason;

/// A frame whose bytes can be read with bounds checks.
pub trait Packet {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;

    /// Reads a `T` at byte offset `off`, or `None` if the frame is too short.
    fn read<T: Copy>(&self, off: usize) -> Option<T>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame whose bytes can also be written, and whose start can move: what the rewrite
/// ([`crate::rewrite::apply`]) needs. The XDP program implements it over `data`/`data_end`
/// (`relay_ebpf::frame::XdpFrame`), the host over a buffer with headroom
/// (`relay_common::frame::HostFrame`), so the one rewrite is tested on the host.
pub trait FrameMut: Packet {
    /// Writes `value` at byte offset `off`, or `None` (nothing written) if the frame is too
    /// short.
    fn write<T: Copy>(&mut self, off: usize, value: T) -> Option<()>;

    /// Moves the frame's start by `delta` bytes, as `bpf_xdp_adjust_head` does: a positive
    /// delta drops bytes at the front, a negative one adds room (of undefined content) there.
    /// Offsets count from the new start afterwards. `None`, with the frame unchanged, if there
    /// is no room in front or fewer than 14 bytes (an Ethernet header) would remain.
    fn adjust_head(&mut self, delta: i32) -> Option<()>;

    /// Moves the frame's end by `delta` bytes, as `bpf_xdp_adjust_tail` does (negative:
    /// shorter). `None`, with the frame unchanged, if it cannot.
    fn adjust_tail(&mut self, delta: i32) -> Option<()>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let bytes = self.get(off..off.checked_add(size_of::<T>())?)?;
        // SAFETY: `bytes` is exactly `size_of::<T>()` readable bytes; `read_unaligned` has no
        // alignment requirement and every `T` used here is plain old data.
        Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
    }
}

/// Address family of a parsed packet. Stored as `u8` in map types.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Whether a TCP segment's flags are ones a TCP sends: not SYN with FIN or RST, not no flags
/// at all, not FIN without ACK (port scans send these), and no SYN carrying data (relayed
/// connections do not use TCP Fast Open; a SYN with data is a probe or a flood that would
/// make the upstream do work).
#[inline(always)]
pub const fn tcp_flags_ok(h: &Headers) -> bool {
    let f = h.tcp_flags;
    let payload = h.l4_len - h.l4_header;
    if f & TCP_SYN != 0 {
        return f & (TCP_FIN | TCP_RST) == 0 && payload == 0;
    }
    if f & (TCP_ACK | TCP_RST) == 0 {
        // No flags, or FIN/PSH/URG without ACK.
        return false;
    }
    true
}

const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();
const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;

/// What the fast path needs to know about an IP packet. Addresses are 16 bytes for both
/// families; an IPv4 address occupies the first 4 bytes and the rest are zero, so that
/// checksum arithmetic over all 16 bytes is correct for both.
// `repr(C)`, 8-aligned, addresses first: the addresses are then 8-aligned, so that the XDP
// program copies and compares them as whole words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Offset of the IP header.
    pub l3: u16,
    /// Offset of the transport header.
    pub l4: u16,
    /// Length of the transport header plus payload, from the IP header.
    pub l4_len: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// IP protocol / IPv6 next header.
    pub proto: u8,
    /// TTL or hop limit.
    pub hop_limit: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...); 0 for UDP.
    pub tcp_flags: u8,
    /// Transport ports in host order (0 for protocols without ports).
    pub src_port: u16,
    pub dst_port: u16,
    /// IPv4 header checksum as on the wire (0 for IPv6).
    pub ip_check: u16,
    /// UDP or TCP checksum as on the wire (0 for other protocols).
    pub l4_check: u16,
    /// Length of the transport header (8 for UDP, TCP's data offset; 0 for others).
    pub l4_header: u16,
}

impl Headers {
    /// Offset of the address pair in the IP header (source first, destination right after).
    pub const fn addr_offset(&self) -> usize {
        self.l3 as usize + if self.family == FAMILY_V4 { 12 } else { 8 }
    }

    /// Address length for this family.
    pub const fn addr_len(&self) -> usize {
        if self.family == FAMILY_V4 {
            4
        } else {
            16
        }
    }
}

/// One's-complement sum of an option-less IPv4 header (0xffff when its checksum is right).
#[inline(always)]
fn ipv4_header_sum(ip: &Ipv4Hdr) -> u16 {
    let mut sum = ((ip.vihl as u32) << 8 | ip.tos as u32)
        + u16::from_be_bytes(ip.tot_len) as u32
        + u16::from_be_bytes(ip.id) as u32
        + u16::from_be_bytes(ip.frags) as u32
        + ((ip.ttl as u32) << 8 | ip.proto as u32)
        + u16::from_be_bytes(ip.check) as u32;
    sum += u16::from_be_bytes([ip.src_addr[0], ip.src_addr[1]]) as u32
        + u16::from_be_bytes([ip.src_addr[2], ip.src_addr[3]]) as u32
        + u16::from_be_bytes([ip.dst_addr[0], ip.dst_addr[1]]) as u32
        + u16::from_be_bytes([ip.dst_addr[2], ip.dst_addr[3]]) as u32;
    crate::checksum::fold(sum)
}

/// Whether the IPv4 header of a parsed packet has a right checksum (IPv6 has none). Not part
/// of [`parse`]: only packets the relay rewrites need it, not everything it passes.
#[inline(always)]
pub fn ipv4_header_ok<P: Packet + ?Sized>(pkt: &P, h: &Headers) -> bool {
    if h.family != FAMILY_V4 {
        return true;
    }
    let Some(ip) = pkt.read::<Ipv4Hdr>(h.l3 as usize) else {
        return false;
    };
    let ihl = (h.l4 - h.l3) as usize;
    if ihl == Ipv4Hdr::LEN {
        return ipv4_header_sum(&ip) == 0xffff;
    }
    // Options (TCP only): their words count too.
    let mut sum = u32::from(ipv4_header_sum(&ip));
    for i in 0..MAX_OPTION_WORDS {
        let at = Ipv4Hdr::LEN + 4 * i;
        if at >= ihl {
            break;
        }
        let Some(w) = pkt.read::<[u8; 4]>(h.l3 as usize + at) else {
            return false;
        };
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    crate::checksum::fold(sum) == 0xffff
}

/// IPv4 options are at most 40 bytes.
const MAX_OPTION_WORDS: usize = 10;

/// IPv6 next-header values that are extension headers, not transports.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// An IPv4 fragment of a TCP segment (no VLAN tag), which [`parse`] declines as
/// `Ipv4Fragment`: its headers (the ports only in the first fragment, which must hold them;
/// 0 in the others), the datagram it belongs to, and whether it is the first. `None` for
/// anything else.
pub fn parse_tcp_fragment<P: Packet + ?Sized>(
    pkt: &P,
) -> Option<(Headers, crate::session::FragKey, bool)> {
    let eth: EthHdr = pkt.read(0)?;
    if eth.ether_type != ETH_P_IPV4 {
        return None;
    }
    let l3 = EthHdr::LEN;
    let ip: Ipv4Hdr = pkt.read(l3)?;
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let frags = u16::from_be_bytes(ip.frags);
    if ip.vihl >> 4 != 4
        || ihl < Ipv4Hdr::LEN
        || total < ihl
        || l3 + total > pkt.len()
        || ip.proto != PROTO_TCP
        || frags & 0x3fff == 0
    {
        return None;
    }
    let mut h = Headers {
        l3: l3 as u16,
        l4: (l3 + ihl) as u16,
        l4_len: (total - ihl) as u16,
        family: FAMILY_V4,
        proto: PROTO_TCP,
        hop_limit: ip.ttl,
        tcp_flags: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        ip_check: u16::from_be_bytes(ip.check),
        l4_check: 0,
        l4_header: 0,
    };
    h.src[..4].copy_from_slice(&ip.src_addr);
    h.dst[..4].copy_from_slice(&ip.dst_addr);
    let first = frags & 0x1fff == 0;
    if first {
        // The first fragment: its ports must be in it (a tinier one is not a TCP's).
        if total - ihl < 4 {
            return None;
        }
        let ports: [u8; 4] = pkt.read(l3 + ihl)?;
        h.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        h.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    let key = crate::session::FragKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        id: u16::from_be_bytes(ip.id),
        _pad: 0,
    };
    Some((h, key, first))
}

/// Parses Ethernet (with at most one 802.1Q/802.1ad tag), IPv4 (honouring IHL) or IPv6, and the
/// ports of UDP and TCP. Returns the reason to leave the packet alone when it is not a whole,
/// unfragmented IP packet the fast path could own.
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(pkt: &P) -> Result<Headers, Reason> {
    let eth: EthHdr = pkt.read(0).ok_or(Reason::Truncated)?;
    let mut ether_type = eth.ether_type;
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: VlanHdr = pkt.read(l3).ok_or(Reason::Truncated)?;
        ether_type = vlan.ether_type;
        l3 += VlanHdr::LEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Err(Reason::VlanStacked);
        }
    }

    let mut h = Headers {
        l3: l3 as u16,
        l4: 0,
        l4_len: 0,
        family: 0,
        proto: 0,
        hop_limit: 0,
        tcp_flags: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        ip_check: 0,
        l4_check: 0,
        l4_header: 0,
    };

    if ether_type == ETH_P_IPV4 {
        let ip: Ipv4Hdr = pkt.read(l3).ok_or(Reason::Truncated)?;
        let ihl = (ip.vihl & 0x0f) as usize * 4;
        let total = u16::from_be_bytes(ip.tot_len) as usize;
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || total < ihl {
            return Err(Reason::BadIpHeader);
        }
        if l3 + total > pkt.len() {
            return Err(Reason::Truncated);
        }
        // More-fragments flag or a non-zero offset: some fragment of a datagram.
        if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
            return Err(Reason::Ipv4Fragment);
        }
        // Options are carried untouched for TCP (a session's segment the host would answer
        // with a reset); a UDP datagram with options goes to the controller's sockets.
        if ihl > Ipv4Hdr::LEN && ip.proto != PROTO_TCP {
            return Err(Reason::Ipv4Options);
        }
        h.family = FAMILY_V4;
        h.proto = ip.proto;
        h.hop_limit = ip.ttl;
        h.ip_check = u16::from_be_bytes(ip.check);
        h.l4 = (l3 + ihl) as u16;
        h.l4_len = (total - ihl) as u16;
        h.src[..4].copy_from_slice(&ip.src_addr);
        h.dst[..4].copy_from_slice(&ip.dst_addr);
    } else if ether_type == ETH_P_IPV6 {
        let ip: Ipv6Hdr = pkt.read(l3).ok_or(Reason::Truncated)?;
        if ip.vcf[0] >> 4 != 6 {
            return Err(Reason::BadIpHeader);
        }
        let payload = u16::from_be_bytes(ip.payload_len) as usize;
        let next = ip.next_hdr;
        if is_ipv6_extension(next) {
            return Err(Reason::Ipv6Extension);
        }
        if l3 + Ipv6Hdr::LEN + payload > pkt.len() {
            return Err(Reason::Truncated);
        }
        h.family = FAMILY_V6;
        h.proto = next;
        h.hop_limit = ip.hop_limit;
        h.l4 = (l3 + Ipv6Hdr::LEN) as u16;
        h.l4_len = payload as u16;
        h.src = ip.src_addr;
        h.dst = ip.dst_addr;
    } else {
        return Err(Reason::NotIp);
    }

    if h.proto == IpProto::Udp as u8 {
        let udp: UdpHdr = pkt.read(h.l4 as usize).ok_or(Reason::Truncated)?;
        if u16::from_be_bytes(udp.len) != h.l4_len || (h.l4_len as usize) < UdpHdr::LEN {
            return Err(Reason::BadUdpLength);
        }
        h.src_port = u16::from_be_bytes(udp.src);
        h.dst_port = u16::from_be_bytes(udp.dst);
        h.l4_check = u16::from_be_bytes(udp.check);
        h.l4_header = UdpHdr::LEN as u16;
    } else if h.proto == IpProto::Tcp as u8 {
        // Ports, seq, ack, data offset, flags, window, checksum, urgent pointer.
        let tcp: [u8; 20] = pkt.read(h.l4 as usize).ok_or(Reason::Truncated)?;
        let header = (tcp[12] >> 4) as u16 * 4;
        if header < 20 || header > h.l4_len {
            return Err(Reason::BadTcpHeader);
        }
        h.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        h.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        h.tcp_flags = tcp[13];
        h.l4_check = u16::from_be_bytes([tcp[16], tcp[17]]);
        h.l4_header = header;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    #[test]
    fn ipv4_udp() {
        let f = Frame::udp(sa("10.0.0.1:5000"), sa("10.0.0.2:51820"), b"hello").build();
        let h = parse(&f[..]).unwrap();
        assert_eq!(h.family, FAMILY_V4);
        assert_eq!(h.proto, PROTO_UDP);
        assert_eq!((h.l3, h.l4, h.l4_len), (14, 34, 13));
        assert_eq!(h.src, v4([10, 0, 0, 1]));
        assert_eq!(h.dst, v4([10, 0, 0, 2]));
        assert_eq!((h.src_port, h.dst_port), (5000, 51820));
        assert_eq!(h.hop_limit, 64);
        assert_eq!(h.addr_offset(), 26);
        assert!(ipv4_header_ok(&f[..], &h));
        let mut bad = f.clone();
        bad[24] ^= 0x10;
        let hb = parse(&bad[..]).unwrap();
        assert!(
            !ipv4_header_ok(&bad[..], &hb),
            "a flipped checksum bit is noticed"
        );
        let v6 = Frame::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), b"x").build();
        assert!(
            ipv4_header_ok(&v6[..], &parse(&v6[..]).unwrap()),
            "IPv6 has no header checksum"
        );
    }

    #[test]
    fn ipv6_udp_and_tcp() {
        let f = Frame::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), &[7; 100]).build();
        let h = parse(&f[..]).unwrap();
        assert_eq!(
            (h.family, h.proto, h.l4, h.l4_len),
            (FAMILY_V6, PROTO_UDP, 54, 108)
        );
        assert_eq!(h.addr_offset(), 22);
        let t = Frame::udp(sa("[fd00::1]:443"), sa("[fd00::2]:80"), b"x").proto(PROTO_TCP);
        let h = parse(&t.build()[..]).unwrap();
        assert_eq!((h.proto, h.src_port, h.dst_port), (PROTO_TCP, 443, 80));
    }

    #[test]
    fn tcp_headers_flags_and_data_offsets() {
        let f = Frame::tcp(sa("198.18.1.2:1000"), sa("198.18.1.1:443"), 0x12, b"data")
            .tcp_options(&[2, 4, 5, 0xb4])
            .build();
        let h = parse(&f[..]).unwrap();
        assert_eq!(
            (
                h.proto,
                h.src_port,
                h.dst_port,
                h.tcp_flags,
                h.l4_header,
                h.l4_len
            ),
            (PROTO_TCP, 1000, 443, 0x12, 24, 28)
        );
        assert_eq!(h.l4_check, u16::from_be_bytes([f[50], f[51]]));
        // Data offset below 5 words, or beyond the segment.
        let mut bad = f.clone();
        bad[46] = 0x40;
        assert_eq!(parse(&bad[..]), Err(Reason::BadTcpHeader));
        bad[46] = 0xf0;
        assert_eq!(parse(&bad[..]), Err(Reason::BadTcpHeader));
        // A TCP header cut short.
        let short = Frame::tcp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), 0x10, b"").build();
        let mut cut = short[..14 + 20 + 12].to_vec();
        cut[17] = 32;
        assert_eq!(parse(&cut[..]), Err(Reason::Truncated));
    }

    #[test]
    fn tcp_flags_a_tcp_never_sends_are_refused() {
        let h = |flags: u8, data: &[u8]| {
            parse(&Frame::tcp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), flags, data).build()[..])
                .unwrap()
        };
        for (flags, data, ok) in [
            (TCP_SYN, &b""[..], true),
            (TCP_SYN | TCP_ACK, b"", true),
            (TCP_ACK, b"data", true),
            (TCP_ACK | TCP_FIN, b"", true),
            (TCP_RST, b"", true),
            (TCP_RST | TCP_ACK, b"", true),
            (TCP_SYN, b"fast open", false),
            (TCP_SYN | TCP_FIN, b"", false),
            (TCP_SYN | TCP_RST, b"", false),
            (0, b"", false),
            (TCP_FIN, b"", false),
            (TCP_FIN | 0x08 | 0x20, b"", false),
        ] {
            assert_eq!(tcp_flags_ok(&h(flags, data)), ok, "flags {flags:#04x}");
        }
    }

    #[test]
    fn one_vlan_tag_is_skipped_two_are_declined() {
        let f = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"v")
            .vlan(42)
            .build();
        let h = parse(&f[..]).unwrap();
        assert_eq!((h.l3, h.l4), (18, 38));
        let mut qinq = f.clone();
        // Turn the inner ethertype into another 802.1Q tag.
        qinq[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(parse(&qinq[..]), Err(Reason::VlanStacked));
    }

    #[test]
    fn tcp_fragments_are_recognised_with_their_datagram() {
        let (src, dst) = (sa("198.18.1.2:40000"), sa("198.18.1.1:443"));
        let first = Frame::tcp(src, dst, 0x18, &[7; 64])
            .fragment(true, 0)
            .build();
        assert_eq!(parse(&first[..]), Err(Reason::Ipv4Fragment));
        let (h, key, is_first) = parse_tcp_fragment(&first[..]).expect("a TCP fragment");
        assert!(is_first);
        assert_eq!(
            (h.src_port, h.dst_port, h.proto, h.l4),
            (40000, 443, PROTO_TCP, 34)
        );
        assert_eq!((key.src, key.dst), ([198, 18, 1, 2], [198, 18, 1, 1]));
        let later = Frame::tcp(src, dst, 0x18, &[7; 64])
            .fragment(false, 10)
            .build();
        let (h2, key2, is_first) = parse_tcp_fragment(&later[..]).expect("a TCP fragment");
        assert!(!is_first);
        assert_eq!(
            (h2.src_port, h2.dst_port),
            (0, 0),
            "no ports in a later fragment"
        );
        assert_eq!(key2, key, "the same datagram");
        // Not fragments, or not TCP: none of its business.
        let whole = Frame::tcp(src, dst, 0x18, &[7; 64]).build();
        assert_eq!(parse_tcp_fragment(&whole[..]), None);
        let udp = Frame::udp(src, dst, &[7; 64]).fragment(true, 0).build();
        assert_eq!(parse_tcp_fragment(&udp[..]), None);
        // A first fragment too short for the ports.
        let mut tiny = Frame::tcp(src, dst, 0x18, &[]).fragment(true, 0).build();
        tiny.truncate(14 + 20 + 2);
        tiny[16..18].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(parse_tcp_fragment(&tiny[..]), None);
    }

    #[test]
    fn ihl_is_honoured_and_options_are_declined_for_udp_only() {
        let f = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"o")
            .ipv4_options(&[1, 1, 1, 1])
            .build();
        assert_eq!(parse(&f[..]), Err(Reason::Ipv4Options));
        // TCP: parsed past the options, which the header checksum covers.
        let options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let f = Frame::tcp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), 0x18, b"data")
            .ipv4_options(&options)
            .build();
        let h = parse(&f[..]).unwrap();
        assert_eq!((h.l3, h.l4, h.src_port, h.dst_port), (14, 14 + 32, 1, 2));
        assert_eq!(h.tcp_flags, 0x18);
        assert!(ipv4_header_ok(&f[..], &h));
        for at in [14 + 22, 14 + 30] {
            let mut bad = f.clone();
            bad[at] ^= 0x40;
            assert!(
                !ipv4_header_ok(&bad[..], &parse(&bad[..]).unwrap()),
                "a changed option byte at {at} breaks the checksum"
            );
        }
    }

    #[test]
    fn fragments_are_declined() {
        let base = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"f");
        let first = base.clone().fragment(true, 0).build();
        let later = base.fragment(false, 185).build();
        assert_eq!(parse(&first[..]), Err(Reason::Ipv4Fragment));
        assert_eq!(parse(&later[..]), Err(Reason::Ipv4Fragment));
    }

    #[test]
    fn non_ip_and_other_protocols() {
        let mut arp = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"").build();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp[..]), Err(Reason::NotIp));
        let icmp = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"ping").proto(1);
        let h = parse(&icmp.build()[..]).unwrap();
        assert_eq!((h.proto, h.src_port, h.dst_port), (1, 0, 0));
    }

    #[test]
    fn every_truncation_is_reported_never_panics() {
        let frames = [
            Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), &[1; 64])
                .vlan(3)
                .build(),
            Frame::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), &[1; 64]).build(),
        ];
        for f in frames {
            for cut in 0..f.len() - 1 {
                let r = parse(&f[..cut]);
                assert!(
                    matches!(r, Err(Reason::Truncated)),
                    "cut at {cut} of {}: {r:?}",
                    f.len()
                );
            }
        }
    }

    #[test]
    fn inconsistent_lengths() {
        let f = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), &[0; 32]).build();
        let mut bad_ihl = f.clone();
        bad_ihl[14] = 0x44;
        assert_eq!(parse(&bad_ihl[..]), Err(Reason::BadIpHeader));
        let mut bad_version = f.clone();
        bad_version[14] = 0x65;
        assert_eq!(parse(&bad_version[..]), Err(Reason::BadIpHeader));
        let mut total_too_small = f.clone();
        total_too_small[16..18].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse(&total_too_small[..]), Err(Reason::BadIpHeader));
        let mut udp_len = f.clone();
        udp_len[38..40].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(parse(&udp_len[..]), Err(Reason::BadUdpLength));
        let mut v6_ext = Frame::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), b"e").build();
        v6_ext[20] = 44; // fragment header
        assert_eq!(parse(&v6_ext[..]), Err(Reason::Ipv6Extension));
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        // 1-byte payload: the frame is padded to 60 bytes but UDP length stays 9.
        let f = Frame::udp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), b"p").build();
        assert_eq!(f.len(), 60);
        assert_eq!(parse(&f[..]).unwrap().l4_len, 9);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x1234_5678_u32;
        let mut buf = [0u8; 128];
        for i in 0..50_000 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = state as u8;
            }
            // Make most inputs look like IP so that the deeper branches run.
            buf[12..14].copy_from_slice(if i % 2 == 0 {
                &[0x08, 0]
            } else {
                &[0x86, 0xdd]
            });
            let len = (state as usize) % buf.len();
            let _ = parse(&buf[..len]);
        }
    }
}
