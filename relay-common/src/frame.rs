//! Building whole Ethernet frames on the host, with correct checksums: the inputs and expected
//! outputs of unit tests, BPF_PROG_TEST_RUN fixtures and the benchmark's traffic generator.

use std::{net::IpAddr, net::SocketAddr, vec::Vec};

use crate::checksum::{checksum, transport_checksum};
use crate::packet::{FrameMut, Packet, PROTO_TCP, PROTO_UDP};

/// A frame to build. Start from [`Frame::udp`] and adjust with the builder methods.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub hop_limit: u8,
    /// IPv4 options (padded to a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv4 flags and fragment offset field (host order); 0x4000 is "don't fragment".
    pub ipv4_frag: u16,
    /// Send an IPv4 UDP checksum of 0 ("none").
    pub no_udp_checksum: bool,
    /// TCP flags (ACK by default) and options (a multiple of 4 bytes).
    pub tcp_flags: u8,
    pub tcp_options: Vec<u8>,
    /// TCP sequence number.
    pub tcp_seq: u32,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A SOCKS5 UDP request header (RSV RSV FRAG ATYP DST.ADDR DST.PORT) naming `dest`, written
/// byte by byte here so that tests do not build their expectations with the code they test.
pub fn socks5_udp_header(dest: SocketAddr, frag: u8) -> Vec<u8> {
    let mut h = std::vec![0, 0, frag];
    match dest {
        SocketAddr::V4(a) => {
            h.push(1);
            h.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            h.push(4);
            h.extend_from_slice(&a.ip().octets());
        }
    }
    h.extend_from_slice(&dest.port().to_be_bytes());
    h
}

impl Frame {
    /// A UDP datagram from `src` to `dst` (same family) carrying `payload`.
    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Frame {
        Frame {
            dst_mac: RELAY_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            proto: PROTO_UDP,
            hop_limit: 64,
            ipv4_options: Vec::new(),
            ipv4_frag: 0x4000,
            no_udp_checksum: false,
            tcp_flags: 0x10,
            tcp_options: Vec::new(),
            tcp_seq: 1,
            payload: payload.to_vec(),
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Frame {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn vlan(mut self, vid: u16) -> Frame {
        self.vlan = Some(vid);
        self
    }

    pub fn proto(mut self, proto: u8) -> Frame {
        self.proto = proto;
        self
    }

    pub fn hop_limit(mut self, ttl: u8) -> Frame {
        self.hop_limit = ttl;
        self
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Frame {
        self.ipv4_options = options.to_vec();
        while !self.ipv4_options.len().is_multiple_of(4) {
            self.ipv4_options.push(0);
        }
        self
    }

    /// Marks the datagram as a fragment: `more` fragments follow, at `offset` (8-byte units).
    pub fn fragment(mut self, more: bool, offset: u16) -> Frame {
        self.ipv4_frag = (u16::from(more) << 13) | (offset & 0x1fff);
        self
    }

    /// A TCP segment from `src` to `dst` with `flags` carrying `payload`.
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Frame {
        let mut f = Frame::udp(src, dst, payload);
        f.proto = PROTO_TCP;
        f.tcp_flags = flags;
        f
    }

    pub fn tcp_options(mut self, options: &[u8]) -> Frame {
        self.tcp_options = options.to_vec();
        self
    }

    pub fn tcp_seq(mut self, seq: u32) -> Frame {
        self.tcp_seq = seq;
        self
    }

    pub fn no_udp_checksum(mut self) -> Frame {
        self.no_udp_checksum = true;
        self
    }

    /// The transport segment (header and payload) with its checksum filled in.
    fn segment(&self, src: &[u8], dst: &[u8]) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&self.src.port().to_be_bytes());
        seg.extend_from_slice(&self.dst.port().to_be_bytes());
        let check_at = match self.proto {
            PROTO_UDP => {
                seg.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                Some(6)
            }
            PROTO_TCP => {
                // seq, ack, data offset, flags, window, checksum, urgent pointer, options.
                seg.extend_from_slice(&self.tcp_seq.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]);
                let offset = (20 + self.tcp_options.len()) / 4;
                seg.extend_from_slice(&[(offset as u8) << 4, self.tcp_flags, 0xff, 0xff]);
                seg.extend_from_slice(&[0, 0, 0, 0]);
                seg.extend_from_slice(&self.tcp_options);
                Some(16)
            }
            _ => None,
        };
        seg.extend_from_slice(&self.payload);
        if let Some(at) = check_at {
            let skip = self.proto == PROTO_UDP && self.no_udp_checksum;
            if !skip {
                let c = transport_checksum(src, dst, self.proto, &seg);
                seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        seg
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let seg = self.segment(&s.octets(), &d.octets());
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ipv4_options.len();
                let mut ip = Vec::with_capacity(ihl);
                ip.push(0x40 | (ihl / 4) as u8);
                ip.push(0);
                ip.extend_from_slice(&((ihl + seg.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&0x1234u16.to_be_bytes());
                ip.extend_from_slice(&self.ipv4_frag.to_be_bytes());
                ip.push(self.hop_limit);
                ip.push(self.proto);
                ip.extend_from_slice(&[0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ipv4_options);
                let c = checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
                f.extend_from_slice(&seg);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let seg = self.segment(&s.octets(), &d.octets());
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(seg.len() as u16).to_be_bytes());
                f.push(self.proto);
                f.push(self.hop_limit);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&seg);
            }
            _ => panic!("Frame::build: source and destination families differ"),
        }
        // Ethernet minimum (without FCS).
        while f.len() < 60 {
            f.push(0);
        }
        f
    }
}

/// The host's [`FrameMut`]: a frame in a buffer with headroom in front, as a driver gives an
/// XDP program, so that the rewrite the XDP program runs (`rewrite::apply`) runs here too.
/// The headroom is filled with 0xee, so that a byte the rewrite should have written but did
/// not shows up in a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFrame {
    buf: Vec<u8>,
    start: usize,
}

/// Headroom XDP guarantees in front of a frame (`XDP_PACKET_HEADROOM`).
pub const XDP_HEADROOM: usize = 256;

impl HostFrame {
    /// `frame` with `headroom` bytes of room in front of it.
    pub fn new(frame: &[u8], headroom: usize) -> HostFrame {
        let mut buf = std::vec![0xee; headroom];
        buf.extend_from_slice(frame);
        HostFrame {
            buf,
            start: headroom,
        }
    }

    /// The frame's bytes, from its current start.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Room left in front of the frame.
    pub fn headroom(&self) -> usize {
        self.start
    }
}

impl Packet for HostFrame {
    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.bytes().read(off)
    }
}

impl FrameMut for HostFrame {
    fn write<T: Copy>(&mut self, off: usize, value: T) -> Option<()> {
        let at = self.start.checked_add(off)?;
        let bytes = self
            .buf
            .get_mut(at..at.checked_add(core::mem::size_of::<T>())?)?;
        // SAFETY: `bytes` is exactly `size_of::<T>()` writable bytes; `write_unaligned` has no
        // alignment requirement, and every `T` written here is plain old data.
        unsafe { bytes.as_mut_ptr().cast::<T>().write_unaligned(value) };
        Some(())
    }

    fn adjust_head(&mut self, delta: i32) -> Option<()> {
        let start = self.start.checked_add_signed(delta as isize)?;
        // The kernel's rule: at least an Ethernet header must remain.
        if start.checked_add(14)? > self.buf.len() {
            return None;
        }
        self.start = start;
        Some(())
    }

    fn adjust_tail(&mut self, delta: i32) -> Option<()> {
        let end = self.buf.len().checked_add_signed(delta as isize)?;
        if end < self.start.checked_add(14)? {
            return None;
        }
        self.buf.resize(end, 0xee);
        Some(())
    }
}
