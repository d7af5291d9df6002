//! Rewrite planning: everything about how a session packet changes, computed as plain data.
//!
//! The XDP program parses a frame, finds its session, calls [`plan`] and applies the result in
//! one place. Nothing here touches packet memory, so every decision and every checksum is
//! tested on the host against a full recomputation.

use crate::{
    checksum::Delta,
    counters::Reason,
    packet::{Headers, FAMILY_V4, FAMILY_V6},
    session::{Nexthop, Target},
};

/// The complete change to one frame: the target's addresses and ports, and these values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub hop_limit: u8,
    /// New IPv4 header checksum (unused for IPv6).
    pub ip_check: u16,
    /// New UDP checksum.
    pub l4_check: u16,
    /// New IPv4 total length or IPv6 payload length.
    pub ip_len: u16,
    /// New UDP length.
    pub l4_len: u16,
    /// Egress interface.
    pub ifindex: u32,
}

/// A change at the start of the UDP payload: a SOCKS5 UDP header removed (client to
/// destination) or added (destination to client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    /// Bytes added (positive) or removed (negative) at the payload's start; always even, so
    /// the rest of the payload keeps its 16-bit alignment in the checksum.
    pub bytes: i32,
    /// The checksum effect of the bytes added or removed.
    pub delta: Delta,
}

impl Resize {
    pub const NONE: Resize = Resize {
        bytes: 0,
        delta: Delta::NONE,
    };
}

/// The SOCKS5 UDP header for `addr` (4 or 16 bytes by family) and `port`: RSV RSV FRAG ATYP
/// ADDR PORT. Returns the header (in a 22-byte buffer) and its length (10 or 22).
#[inline(always)]
pub fn socks_udp_header(family: u8, addr: &[u8; 16], port: u16) -> ([u8; 22], usize) {
    let mut h = [0u8; 22];
    let p = port.to_be_bytes();
    if family == FAMILY_V4 {
        h[3] = 1;
        h[4] = addr[0];
        h[5] = addr[1];
        h[6] = addr[2];
        h[7] = addr[3];
        h[8] = p[0];
        h[9] = p[1];
        (h, 10)
    } else {
        h[3] = 4;
        let mut i = 0;
        while i < 16 {
            h[4 + i] = addr[i];
            i += 1;
        }
        h[20] = p[0];
        h[21] = p[1];
        (h, 22)
    }
}

/// The checksum effect of adding (or removing) a SOCKS5 UDP header for `addr`, `port`.
#[inline(always)]
pub fn socks_header_resize(family: u8, addr: &[u8; 16], port: u16, adding: bool) -> Resize {
    // Header words: 0x0000, ATYP, the address, the port. Zero words change nothing.
    let atyp: u16 = if family == FAMILY_V4 { 1 } else { 4 };
    let mut words = Delta::NONE;
    let mut bump = |w: u16| {
        words = if adding {
            words.replace(0, w)
        } else {
            words.replace(w, 0)
        };
    };
    bump(atyp);
    let n = if family == FAMILY_V4 { 4 } else { 16 };
    let mut i = 0;
    while i < n {
        bump(u16::from_be_bytes([addr[i], addr[i + 1]]));
        i += 2;
    }
    bump(port);
    let len = if family == FAMILY_V4 { 10 } else { 22 };
    Resize {
        bytes: if adding { len } else { -len },
        delta: words,
    }
}

/// Plans the rewrite of a UDP packet of a session toward `target` via `nexthop`, or says why
/// the fast path must leave it to the controller.
#[inline(always)]
pub fn plan(h: &Headers, target: &Target, nexthop: &Nexthop) -> Result<Rewrite, Reason> {
    plan_resized(h, target, nexthop, Resize::NONE)
}

/// [`plan`] for a packet whose payload also grows or shrinks at its start (`resize`).
#[inline(always)]
pub fn plan_resized(
    h: &Headers,
    target: &Target,
    nexthop: &Nexthop,
    resize: Resize,
) -> Result<Rewrite, Reason> {
    if h.family == FAMILY_V6 && h.l4_check == 0 {
        return Err(Reason::BadUdpChecksum);
    }
    if h.hop_limit <= 1 {
        return Err(Reason::TtlExpiring);
    }
    if nexthop.ifindex == 0 {
        return Err(Reason::NoNexthop);
    }
    let new_l4 = h.l4_len as i32 + resize.bytes;
    if new_l4 < 8 {
        return Err(Reason::BadUdpLength);
    }
    let l3_header = (h.l4 - h.l3) as u32;
    let new_packet = l3_header + new_l4 as u32;
    if new_packet > nexthop.mtu as u32 || new_packet > 0xffff {
        return Err(Reason::TooBig);
    }
    let new_l4 = new_l4 as u16;
    let (old_ip_len, new_ip_len) = if h.family == FAMILY_V4 {
        ((l3_header as u16) + h.l4_len, new_packet as u16)
    } else {
        (h.l4_len, new_l4)
    };

    let alen = h.addr_len();
    let addrs = Delta::NONE
        .replace_addr(&h.src, target.src, alen)
        .replace_addr(&h.dst, target.dst, alen);
    let ports = Delta::NONE
        .replace(h.src_port, target.src_port)
        .replace(h.dst_port, target.dst_port)
        // The UDP length is in the pseudo header and in the UDP header: twice.
        .replace(h.l4_len, new_l4)
        .replace(h.l4_len, new_l4)
        .add(resize.delta);
    let hop_limit = h.hop_limit - 1;
    let ip_check = if h.family == FAMILY_V4 {
        // TTL shares a 16-bit word with the protocol.
        let proto = h.proto as u16;
        addrs
            .replace(
                (h.hop_limit as u16) << 8 | proto,
                (hop_limit as u16) << 8 | proto,
            )
            .replace(old_ip_len, new_ip_len)
            .apply(h.ip_check)
    } else {
        0
    };
    Ok(Rewrite {
        dst_mac: nexthop.dst_mac,
        src_mac: nexthop.src_mac,
        hop_limit,
        ip_check,
        l4_check: addrs.add(ports).apply_udp(h.l4_check),
        ip_len: new_ip_len,
        l4_len: new_l4,
        ifindex: nexthop.ifindex,
    })
}

/// Applies `rw` to a frame in a byte slice: the host's version of what the XDP program does,
/// used to check plans against full recomputation and to build expected fixture outputs.
#[cfg(any(test, feature = "std"))]
pub fn apply_to_slice(frame: &mut [u8], h: &Headers, t: &Target, rw: &Rewrite) {
    frame[0..6].copy_from_slice(&rw.dst_mac);
    frame[6..12].copy_from_slice(&rw.src_mac);
    let l3 = h.l3 as usize;
    let l4 = h.l4 as usize;
    if h.family == FAMILY_V4 {
        frame[l3 + 2..l3 + 4].copy_from_slice(&rw.ip_len.to_be_bytes());
        frame[l3 + 8] = rw.hop_limit;
        frame[l3 + 10..l3 + 12].copy_from_slice(&rw.ip_check.to_be_bytes());
        frame[l3 + 12..l3 + 16].copy_from_slice(&t.src[..4]);
        frame[l3 + 16..l3 + 20].copy_from_slice(&t.dst[..4]);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&rw.ip_len.to_be_bytes());
        frame[l3 + 7] = rw.hop_limit;
        frame[l3 + 8..l3 + 24].copy_from_slice(t.src);
        frame[l3 + 24..l3 + 40].copy_from_slice(t.dst);
    }
    frame[l4..l4 + 2].copy_from_slice(&t.src_port.to_be_bytes());
    frame[l4 + 2..l4 + 4].copy_from_slice(&t.dst_port.to_be_bytes());
    frame[l4 + 4..l4 + 6].copy_from_slice(&rw.l4_len.to_be_bytes());
    frame[l4 + 6..l4 + 8].copy_from_slice(&rw.l4_check.to_be_bytes());
}

/// The host's version of a resized rewrite: rewrite the headers in place, then remove or
/// insert `resize.bytes` at the start of the payload (`inserted` are the new bytes).
#[cfg(any(test, feature = "std"))]
pub fn apply_resized(
    frame: &mut std::vec::Vec<u8>,
    h: &Headers,
    t: &Target,
    rw: &Rewrite,
    resize: Resize,
    inserted: &[u8],
) {
    apply_to_slice(frame, h, t, rw);
    let at = h.l4 as usize + 8;
    if resize.bytes < 0 {
        frame.drain(at..at + (-resize.bytes) as usize);
    } else {
        let tail = frame.split_off(at);
        frame.extend_from_slice(inserted);
        frame.extend_from_slice(&tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{frame::Frame, packet::parse};
    use std::net::{IpAddr, SocketAddr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addr16(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(a) => {
                let mut x = [0; 16];
                x[..4].copy_from_slice(&a.octets());
                x
            }
            IpAddr::V6(a) => a.octets(),
        }
    }

    /// Owned endpoints a test can borrow a [`Target`] from.
    struct Endpoints([u8; 16], [u8; 16], u16, u16);

    impl Endpoints {
        fn target(&self) -> Target<'_> {
            Target {
                src: &self.0,
                dst: &self.1,
                src_port: self.2,
                dst_port: self.3,
            }
        }
    }

    fn target(src: &str, dst: &str) -> Endpoints {
        let (s, d) = (sa(src), sa(dst));
        Endpoints(addr16(s.ip()), addr16(d.ip()), s.port(), d.port())
    }

    const NH: Nexthop = Nexthop {
        ifindex: 7,
        mtu: 1500,
        src_mac: [2, 0, 0, 0, 0, 0xaa],
        dst_mac: [2, 0, 0, 0, 0, 0xbb],
        _pad: [0; 2],
    };

    /// Plans, applies on the host, and compares with a frame built from scratch for the new
    /// endpoints: every byte, including both checksums, must match.
    fn check(input: Frame, new_src: &str, new_dst: &str) {
        let mut bytes = input.build();
        let h = parse(&bytes[..]).unwrap();
        let e = target(new_src, new_dst);
        let rw = plan(&h, &e.target(), &NH).unwrap();
        apply_to_slice(&mut bytes, &h, &e.target(), &rw);
        let mut want = input.clone();
        want.src = sa(new_src);
        want.dst = sa(new_dst);
        want.hop_limit -= 1;
        want.src_mac = NH.src_mac;
        want.dst_mac = NH.dst_mac;
        let want = want.build();
        assert_eq!(bytes, want, "rewrite of {input:?}");
        assert_eq!(rw.ifindex, 7);
    }

    #[test]
    fn ipv4_rewrite_matches_a_frame_built_from_scratch() {
        for payload in [&b""[..], b"x", b"odd length!", &[0xff; 1000]] {
            check(
                Frame::udp(sa("198.18.1.2:40000"), sa("198.18.1.1:51820"), payload),
                "198.18.2.1:61000",
                "198.18.2.2:51820",
            );
        }
    }

    #[test]
    fn ipv6_rewrite_matches_a_frame_built_from_scratch() {
        for payload in [&b""[..], b"y", b"an odd payload", &[0x5a; 1200]] {
            check(
                Frame::udp(
                    sa("[fd00:5a:1::2]:40000"),
                    sa("[fd00:5a:1::1]:443"),
                    payload,
                ),
                "[fd00:5a:2::1]:61001",
                "[2001:db8::77]:443",
            );
        }
    }

    #[test]
    fn vlan_tagged_frames_keep_their_tag() {
        check(
            Frame::udp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), b"tagged").vlan(12),
            "198.18.2.1:3",
            "198.18.2.2:4",
        );
    }

    #[test]
    fn ipv4_checksum_zero_stays_zero() {
        let input = Frame::udp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), b"nocsum").no_udp_checksum();
        let mut bytes = input.build();
        let h = parse(&bytes[..]).unwrap();
        let e = target("198.18.2.1:3", "198.18.2.2:4");
        let rw = plan(&h, &e.target(), &NH).unwrap();
        assert_eq!(rw.l4_check, 0);
        apply_to_slice(&mut bytes, &h, &e.target(), &rw);
        let mut want = input.clone();
        want.src = sa("198.18.2.1:3");
        want.dst = sa("198.18.2.2:4");
        want.hop_limit -= 1;
        want = want.macs(NH.src_mac, NH.dst_mac);
        assert_eq!(bytes, want.build());
    }

    /// Stripping a SOCKS5 header (client to destination) gives exactly the frame a
    /// destination would receive, and prepending one (destination to client) exactly the
    /// frame a client expects: both checked against frames built from scratch.
    #[test]
    fn socks_strip_and_prepend_match_frames_built_from_scratch() {
        use crate::packet::FAMILY_V6;
        let cases = [
            (
                "198.18.1.2:40000",
                "198.18.1.1:30000",
                "198.18.2.1:30000",
                "198.18.2.2:53",
                FAMILY_V4,
            ),
            (
                "[fd00:5a:1::2]:40000",
                "[fd00:5a:1::1]:30001",
                "[fd00:5a:2::1]:30001",
                "[fd00:5a:2::2]:443",
                FAMILY_V6,
            ),
        ];
        for (client, front, back, dest, family) in cases {
            for payload in [&b""[..], b"x", b"even", &[0x5a; 999]] {
                let d = sa(dest);
                let daddr = addr16(d.ip());
                let (hdr, hlen) = socks_udp_header(family, &daddr, d.port());
                // Client to destination: header + payload in, payload out.
                let mut wrapped = hdr[..hlen].to_vec();
                wrapped.extend_from_slice(payload);
                let input = Frame::udp(sa(client), sa(front), &wrapped);
                let mut bytes = input.build();
                bytes.truncate(14 + if family == FAMILY_V4 { 20 } else { 40 } + 8 + wrapped.len());
                let h = parse(&bytes[..]).unwrap();
                let e = target(back, dest);
                let resize = socks_header_resize(family, &daddr, d.port(), false);
                let rw = plan_resized(&h, &e.target(), &NH, resize).unwrap();
                apply_resized(&mut bytes, &h, &e.target(), &rw, resize, &[]);
                let mut want = Frame::udp(sa(back), sa(dest), payload)
                    .macs(NH.src_mac, NH.dst_mac)
                    .hop_limit(63);
                want.payload = payload.to_vec();
                let mut want = want.build();
                want.truncate(bytes.len().max(60));
                while bytes.len() < 60 {
                    bytes.push(0);
                }
                assert_eq!(bytes, want, "strip {family} {}", payload.len());

                // Destination to client: payload in, header + payload out.
                let input = Frame::udp(sa(dest), sa(back), payload);
                let mut bytes = input.build();
                bytes.truncate(14 + if family == FAMILY_V4 { 20 } else { 40 } + 8 + payload.len());
                let h = parse(&bytes[..]).unwrap();
                let e = target(front, client);
                let resize = socks_header_resize(family, &daddr, d.port(), true);
                let rw = plan_resized(&h, &e.target(), &NH, resize).unwrap();
                apply_resized(&mut bytes, &h, &e.target(), &rw, resize, &hdr[..hlen]);
                let want = Frame::udp(sa(front), sa(client), &wrapped)
                    .macs(NH.src_mac, NH.dst_mac)
                    .hop_limit(63)
                    .build();
                while bytes.len() < 60 {
                    bytes.push(0);
                }
                assert_eq!(bytes, want, "prepend {family} {}", payload.len());
            }
        }
    }

    #[test]
    fn declines_what_the_fast_path_cannot_do() {
        let e = target("198.18.2.1:3", "198.18.2.2:4");
        let t = e.target();
        let base = Frame::udp(sa("198.18.1.2:1"), sa("198.18.1.1:2"), &[0; 100]);
        let h = |f: Frame| parse(&f.build()[..]).unwrap();
        assert_eq!(
            plan(&h(base.clone().hop_limit(1)), &t, &NH),
            Err(Reason::TtlExpiring)
        );
        assert_eq!(
            plan(&h(base.clone().hop_limit(0)), &t, &NH),
            Err(Reason::TtlExpiring)
        );
        assert!(plan(&h(base.clone().hop_limit(2)), &t, &NH).is_ok());
        let unresolved = Nexthop { ifindex: 0, ..NH };
        assert_eq!(
            plan(&h(base.clone()), &t, &unresolved),
            Err(Reason::NoNexthop)
        );
        // 20 + 8 + 100 = 128 bytes of IP packet.
        let small = Nexthop { mtu: 127, ..NH };
        assert_eq!(plan(&h(base.clone()), &t, &small), Err(Reason::TooBig));
        let exact = Nexthop { mtu: 128, ..NH };
        assert!(plan(&h(base.clone()), &t, &exact).is_ok());
        let mut v6 = Frame::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), b"z").build();
        v6[60..62].copy_from_slice(&[0, 0]);
        let e6 = target("[fd00::3]:3", "[fd00::4]:4");
        let t6 = e6.target();
        assert_eq!(
            plan(&parse(&v6[..]).unwrap(), &t6, &NH),
            Err(Reason::BadUdpChecksum)
        );
    }
}
