//! The ICMP error a router sends back for a packet it will not forward, built in place from
//! that packet: the relay sends it for a TCP session's segment that is too big for the
//! egress (with DF set, so path MTU discovery works) or whose TTL would expire.
//!
//! Generic over [`FrameMut`], like the rewrite: the XDP program runs it over
//! `data`/`data_end`, the host tests over a buffer with headroom against messages built from
//! scratch. The message quotes the packet's IP header and the first 8 bytes of its transport
//! header (RFC 792; for IPv6, RFC 4443 asks for as much as fits, which a sender needs no more
//! of than this to find its connection), goes from the address the packet was sent to, to
//! its sender, and leaves by the link it came in on (the frame's MAC addresses swapped).

use crate::{
    checksum::fold,
    packet::{FrameMut, Headers, FAMILY_V4},
};

/// Which error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// "Fragmentation needed and DF set" (IPv4) / "packet too big" (IPv6), with the MTU the
    /// sender must fit.
    TooBig { mtu: u16 },
    /// "Time exceeded in transit": the TTL or hop limit would reach zero.
    TimeExceeded,
}

/// Bytes put in front of the packet: IPv4 header 20 + ICMP header 8, or IPv6 header 40 +
/// ICMPv6 header 8 (see [`reply`]).
const V4_HEAD: usize = 28;
const V6_HEAD: usize = 48;
/// Bytes quoted: the IP header and 8 bytes of the transport header.
const V4_QUOTE: usize = 28;
const V6_QUOTE: usize = 48;

/// One's-complement sum of the words of `a` (16 bytes; the first `len` count).
#[inline(always)]
fn sum_addr(mut sum: u32, a: &[u8; 16], len: usize) -> u32 {
    let mut i = 0;
    while i < len && i < 16 {
        sum += u16::from_be_bytes([a[i], a[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// One's-complement sum of `n` bytes (a multiple of 4) of the frame at `off`, read 4 bytes
/// at a time, so that nothing large sits on the stack.
#[inline(always)]
fn sum_frame<F: FrameMut + ?Sized>(frame: &F, off: usize, n: usize) -> Option<u32> {
    let mut sum = 0u32;
    let mut i = 0;
    while i < n {
        let w: [u8; 4] = frame.read(off + i)?;
        sum += u16::from_be_bytes([w[0], w[1]]) as u32 + u16::from_be_bytes([w[2], w[3]]) as u32;
        i += 4;
    }
    Some(sum)
}

/// Why [`reply`] did not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReply {
    /// Not answered, the frame untouched: what a router would not answer this way (an IPv4
    /// packet without DF is fragmented, not refused) or a layout this does not build (a VLAN
    /// tag, IPv4 options). The packet goes whatever other way its caller has.
    Declined,
    /// Failed after the frame changed (`adjust_failed`): it can only be dropped.
    Broken,
}

/// Turns the frame into the ICMP error `kind` for it, or says why not ([`NoReply`]).
///
/// The frame grows at its front by the new IP and ICMP headers: the packet's own IP header
/// and transport header then sit 14 bytes (its old Ethernet header, read first) further on,
/// which is exactly where the message quotes them, so nothing is copied; the Ethernet header
/// is written afresh in front and the frame is cut after the quote.
#[inline(always)]
pub fn reply<F: FrameMut + ?Sized>(
    frame: &mut F,
    h: &Headers,
    kind: IcmpError,
) -> Result<(), NoReply> {
    // The quote is the IP header and 8 bytes of TCP where they lie: an IPv4 header with
    // options is not built here.
    if h.l3 != 14 || (h.family == FAMILY_V4 && h.l4 != 14 + 20) {
        return Err(NoReply::Declined);
    }
    let v4 = h.family == FAMILY_V4;
    let (head, quote) = if v4 {
        (V4_HEAD, V4_QUOTE)
    } else {
        (V6_HEAD, V6_QUOTE)
    };
    if frame.len() < 14 + quote {
        return Err(NoReply::Declined);
    }
    if v4 && matches!(kind, IcmpError::TooBig { .. }) {
        // Flags and fragment offset: DF is 0x4000.
        let frags: [u8; 2] = frame.read(20).ok_or(NoReply::Declined)?;
        if frags[0] & 0x40 == 0 {
            return Err(NoReply::Declined);
        }
    }
    let macs: [u8; 12] = frame.read(0).ok_or(NoReply::Declined)?;
    let quoted = sum_frame(frame, 14, quote).ok_or(NoReply::Declined)?;
    frame.adjust_head(-(head as i32)).ok_or(NoReply::Declined)?;
    // From here on the frame has changed.
    let done = if v4 {
        write_v4(frame, h, kind, &macs, quoted)
    } else {
        write_v6(frame, h, kind, &macs, quoted)
    };
    done.ok_or(NoReply::Broken)
}

/// The Ethernet header back to the sender.
#[inline(always)]
fn ethernet<F: FrameMut + ?Sized>(frame: &mut F, macs: &[u8; 12], ether_type: u16) -> Option<()> {
    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..].copy_from_slice(&ether_type.to_be_bytes());
    frame.write(0, eth)
}

/// The ICMP type, code and the 32-bit word after the checksum, as two words each.
#[inline(always)]
fn icmp_words(kind: IcmpError, v4: bool) -> ([u8; 2], [u8; 4]) {
    match (kind, v4) {
        (IcmpError::TooBig { mtu }, true) => {
            let m = mtu.to_be_bytes();
            ([3, 4], [0, 0, m[0], m[1]])
        }
        (IcmpError::TooBig { mtu }, false) => ([2, 0], u32::from(mtu).to_be_bytes()),
        (IcmpError::TimeExceeded, true) => ([11, 0], [0; 4]),
        (IcmpError::TimeExceeded, false) => ([3, 0], [0; 4]),
    }
}

/// One's-complement sum of the ICMP header's words (its checksum field zero).
#[inline(always)]
fn header_sum(type_code: [u8; 2], rest: [u8; 4]) -> u32 {
    u16::from_be_bytes(type_code) as u32
        + u16::from_be_bytes([rest[0], rest[1]]) as u32
        + u16::from_be_bytes([rest[2], rest[3]]) as u32
}

#[inline(always)]
fn write_v4<F: FrameMut + ?Sized>(
    frame: &mut F,
    h: &Headers,
    kind: IcmpError,
    macs: &[u8; 12],
    quoted: u32,
) -> Option<()> {
    const TOTAL: u16 = (20 + 8 + V4_QUOTE) as u16;
    ethernet(frame, macs, 0x0800)?;
    // Version and IHL, TOS (internetwork control, as routers send their errors), length,
    // id 0, no flags, TTL 64, ICMP; from the address the packet went to, to its sender.
    let ip_sum = sum_addr(
        sum_addr(0x45c0 + TOTAL as u32 + 0x4001, &h.dst, 4),
        &h.src,
        4,
    );
    frame.write(14, [0x45u8, 0xc0])?;
    frame.write(16, TOTAL.to_be_bytes())?;
    frame.write(18, [0u8, 0, 0, 0, 64, 1])?;
    frame.write(24, (!fold(ip_sum)).to_be_bytes())?;
    frame.write(26, [h.dst[0], h.dst[1], h.dst[2], h.dst[3]])?;
    frame.write(30, [h.src[0], h.src[1], h.src[2], h.src[3]])?;
    icmp_header(frame, 34, kind, true, quoted, 14 + TOTAL as usize)
}

#[inline(always)]
fn write_v6<F: FrameMut + ?Sized>(
    frame: &mut F,
    h: &Headers,
    kind: IcmpError,
    macs: &[u8; 12],
    quoted: u32,
) -> Option<()> {
    const PAYLOAD: u16 = (8 + V6_QUOTE) as u16;
    ethernet(frame, macs, 0x86dd)?;
    frame.write(14, [0x60u8, 0, 0, 0])?;
    frame.write(18, PAYLOAD.to_be_bytes())?;
    // Next header ICMPv6, hop limit 255 (as neighbour discovery and routers send).
    frame.write(20, [58u8, 255])?;
    frame.write(22, h.dst)?;
    frame.write(38, h.src)?;
    // Pseudo header (source, destination, length, next header) and the quote; the ICMPv6
    // header's words are added with it.
    let pseudo = sum_addr(sum_addr(PAYLOAD as u32 + 58, &h.dst, 16), &h.src, 16);
    icmp_header(
        frame,
        54,
        kind,
        false,
        pseudo + quoted,
        14 + 40 + PAYLOAD as usize,
    )
}

/// Writes the ICMP (or ICMPv6) header at `at`, its checksum over `partial` and its own words,
/// and cuts the frame at `end`.
#[inline(always)]
fn icmp_header<F: FrameMut + ?Sized>(
    frame: &mut F,
    at: usize,
    kind: IcmpError,
    v4: bool,
    partial: u32,
    end: usize,
) -> Option<()> {
    let (type_code, rest) = icmp_words(kind, v4);
    let sum = partial + header_sum(type_code, rest);
    frame.write(at, type_code)?;
    frame.write(at + 2, (!fold(sum)).to_be_bytes())?;
    frame.write(at + 4, rest)?;
    let len = frame.len() as i32;
    frame.adjust_tail(end as i32 - len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checksum::checksum,
        frame::{Frame, HostFrame, CLIENT_MAC, RELAY_MAC, XDP_HEADROOM},
        packet::parse,
    };
    use std::{net::SocketAddr, vec::Vec};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn answer(input: &[u8], kind: IcmpError) -> Result<Vec<u8>, NoReply> {
        let mut f = HostFrame::new(input, XDP_HEADROOM);
        let h = parse(&f).unwrap();
        reply(&mut f, &h, kind).map(|()| f.bytes().to_vec())
    }

    #[test]
    fn ipv4_fragmentation_needed_quotes_the_segment_and_checks_out() {
        let mut seg = Frame::tcp(
            sa("198.18.1.2:50000"),
            sa("198.18.1.1:443"),
            0x10,
            &[7; 1400],
        );
        seg.ipv4_frag = 0x4000;
        let input = seg.build();
        let out = answer(&input, IcmpError::TooBig { mtu: 1280 }).unwrap();
        assert_eq!(out.len(), 14 + 20 + 8 + 28);
        assert_eq!(&out[..6], &CLIENT_MAC, "back to the sender's MAC");
        assert_eq!(&out[6..12], &RELAY_MAC);
        let ip = &out[14..34];
        assert_eq!(
            (ip[0], ip[9], &ip[12..16], &ip[16..20]),
            (0x45, 1, &[198, 18, 1, 1][..], &[198, 18, 1, 2][..])
        );
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
        assert_eq!(checksum(ip), 0, "IP header checksum");
        let icmp = &out[34..];
        assert_eq!(
            (icmp[0], icmp[1], u16::from_be_bytes([icmp[6], icmp[7]])),
            (3, 4, 1280)
        );
        assert_eq!(checksum(icmp), 0, "ICMP checksum");
        assert_eq!(
            &icmp[8..],
            &input[14..42],
            "the quote: IP header and 8 bytes of TCP"
        );
        // What the kernel would parse back: an ICMP packet to the client.
        let h = parse(&out[..]).unwrap();
        assert_eq!((h.proto, h.family), (1, 4));
    }

    #[test]
    fn ipv4_without_df_is_not_refused_with_icmp() {
        let mut seg = Frame::tcp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), 0x10, &[1; 100]);
        seg.ipv4_frag = 0;
        let input = seg.build();
        assert_eq!(
            answer(&input, IcmpError::TooBig { mtu: 100 }),
            Err(NoReply::Declined)
        );
        // Time exceeded needs no DF.
        let out = answer(&input, IcmpError::TimeExceeded).unwrap();
        assert_eq!((out[34], out[35]), (11, 0));
        assert_eq!(checksum(&out[34..]), 0);
    }

    #[test]
    fn ipv6_packet_too_big_and_time_exceeded_check_out() {
        let input =
            Frame::tcp(sa("[fd00::2]:50000"), sa("[fd00::1]:443"), 0x18, &[9; 1300]).build();
        for (kind, want) in [
            (IcmpError::TooBig { mtu: 1280 }, (2u8, 0u8)),
            (IcmpError::TimeExceeded, (3, 0)),
        ] {
            let out = answer(&input, kind).unwrap();
            assert_eq!(out.len(), 14 + 40 + 8 + 48);
            assert_eq!(&out[..6], &CLIENT_MAC);
            let ip = &out[14..54];
            assert_eq!(
                (ip[0], ip[6], u16::from_be_bytes([ip[4], ip[5]])),
                (0x60, 58, 56)
            );
            assert_eq!(
                &ip[8..24],
                &input[38..54],
                "from the address the packet went to"
            );
            assert_eq!(&ip[24..40], &input[22..38], "to its sender");
            let icmp = &out[54..];
            assert_eq!((icmp[0], icmp[1]), want);
            let c = crate::checksum::transport_checksum(&ip[8..24], &ip[24..40], 58, &{
                let mut z = icmp.to_vec();
                z[2] = 0;
                z[3] = 0;
                z
            });
            assert_eq!(u16::from_be_bytes([icmp[2], icmp[3]]), c, "ICMPv6 checksum");
            if let IcmpError::TooBig { .. } = kind {
                assert_eq!(
                    u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
                    1280
                );
            }
            assert_eq!(&icmp[8..], &input[14..62]);
        }
    }

    #[test]
    fn a_tagged_frame_is_declined_untouched() {
        let input = Frame::tcp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), 0x10, b"x")
            .vlan(7)
            .build();
        assert_eq!(
            answer(&input, IcmpError::TimeExceeded),
            Err(NoReply::Declined)
        );
    }
}
