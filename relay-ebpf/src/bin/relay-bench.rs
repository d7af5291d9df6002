//! The benchmark's XDP object (`cargo xtask bench` only): the relay never loads it, and
//! none of its maps are in the relay's object.
//!
//! - `macswap`: the reference the fast path is compared with: swap the MAC addresses, XDP_TX.
//! - `generate`: XDP_TX as is; run with BPF_PROG_RUN in live-frames mode it sends a prepared
//!   frame out of an interface at line rate (a packet generator where pktgen is missing).
//! - `generate_flows`: like `generate`, for TCP SYNs or UDP datagrams: every run changes the
//!   source port and address (with both checksums), so one live-frames run sends that many
//!   new flows.
//! - `sink`: counts the UDP (and the session-rate run's SYNs, to port 7000, and the TCP forward
//!   run's segments, to port 6001) that arrive and drops them (the receiving end of a benchmark).
//! - `nat`: a minimal stateless NAT, the fastest thing an XDP relay could be (one rule, no
//!   sessions, no counters, a fixed next hop): the peer the relay's end-to-end rate is
//!   compared with.
//! - `nat_fib`: the same NAT with a `bpf_fib_lookup` per packet for its next hop, as XDP
//!   forwarders commonly do (the relay caches next hops instead).

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use relay_common::{bench::StatelessNat, checksum::Delta, counters::Counter, packet::Packet as _};

use relay_ebpf::frame::XdpFrame;

#[map]
static SINK: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

#[map]
static NAT: Array<StatelessNat> = Array::with_max_entries(1, 0);

/// Frames `generate_flows` has sent, per CPU: the next one's source.
#[map]
static SYN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn macswap(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let Some(macs) = frame.read::<[u8; 12]>(0) else {
        return xdp_action::XDP_PASS;
    };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    match frame.write(0, swapped) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

#[xdp]
pub fn generate(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// A prepared IPv4 frame (Ethernet, IPv4 without options, then a TCP SYN or a UDP datagram)
/// sent again and again, each time from another source: port 1024 + n mod 64000, address
/// 198.18.(64 + n / 64000 / 256).x.
#[xdp]
pub fn generate_flows(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let Some(seq) = SYN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot of a per-CPU array; XDP is not preempted on its CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    // The transport checksum: TCP's at 16 into its header, UDP's at 6.
    let Some(proto) = frame.read::<u8>(23) else {
        return xdp_action::XDP_ABORTED;
    };
    let check_at = if proto == relay_common::packet::PROTO_UDP {
        40
    } else {
        50
    };
    let (Some(addr), Some(port), Some(ip_check), Some(tcp_check)) = (
        frame.read::<[u8; 2]>(28),
        frame.read::<[u8; 2]>(34),
        frame.read::<[u8; 2]>(24),
        frame.read::<[u8; 2]>(check_at),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let (old_addr, old_port) = (u16::from_be_bytes(addr), u16::from_be_bytes(port));
    let new_port = 1024 + (n % 64000) as u16;
    let new_addr = 0x4000u16.wrapping_add((n / 64000) as u16);
    let ip = Delta::NONE.replace(old_addr, new_addr);
    let tcp = ip.replace(old_port, new_port);
    let ip_check = ip.apply(u16::from_be_bytes(ip_check));
    let l4_check = if proto == relay_common::packet::PROTO_UDP {
        tcp.apply_udp(u16::from_be_bytes(tcp_check))
    } else {
        tcp.apply(u16::from_be_bytes(tcp_check))
    };
    let written = frame
        .write(28, new_addr.to_be_bytes())
        .and_then(|()| frame.write(34, new_port.to_be_bytes()))
        .and_then(|()| frame.write(24, ip_check.to_be_bytes()))
        .and_then(|()| frame.write(check_at, l4_check.to_be_bytes()));
    match written {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

/// The upstream port of the TCP forward run's connections.
const TCP_SINK_PORT: u16 = 6001;

/// Counts and drops UDP, the session-rate run's SYNs and the TCP forward run's segments;
/// passes the rest (ARP and neighbour
/// discovery, and the TCP connections of other measurements, must keep working).
#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    let frame = XdpFrame::new(&ctx);
    let len = frame.len() as u64;
    match relay_common::packet::parse(&frame) {
        Ok(h) if h.proto == relay_common::packet::PROTO_UDP => {}
        // The SYNs of the session-rate run (to port 7000): nothing answers them.
        Ok(h)
            if h.proto == relay_common::packet::PROTO_TCP
                && h.tcp_flags == 0x02
                && h.dst_port == 7000 => {}
        // The generated segments of the TCP forward run (PSH and ACK, to port 6001); that
        // run's connections themselves (handshake, RST) pass to the server.
        Ok(h)
            if h.proto == relay_common::packet::PROTO_TCP
                && h.tcp_flags == 0x18
                && h.dst_port == TCP_SINK_PORT => {}
        _ => return xdp_action::XDP_PASS,
    }
    if let Some(c) = SINK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP is not preempted on its CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
    xdp_action::XDP_DROP
}

/// The stateless NAT: Ethernet + IPv4 without options + UDP to the rule's port, rewritten
/// with incremental checksums (addresses, TTL, port) and redirected to the rule's fixed next
/// hop; everything else passes.
#[xdp]
pub fn nat(ctx: XdpContext) -> u32 {
    stateless_nat(&ctx, false)
}

/// The same NAT asking the kernel's FIB for the next hop of every packet (`bpf_fib_lookup`:
/// egress interface and both MAC addresses), as XDP forwarders commonly do; a packet whose
/// next hop is not resolved passes to the kernel.
#[xdp]
pub fn nat_fib(ctx: XdpContext) -> u32 {
    stateless_nat(&ctx, true)
}

/// The next hop of a packet from `src` to `dst` (IPv4, `tot_len` bytes) that came in on
/// `ctx`'s interface, from the kernel's FIB: (egress ifindex, source MAC, destination MAC).
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    src: [u8; 4],
    dst: [u8; 4],
    tot_len: u16,
) -> Option<(u32, [u8; 6], [u8; 6])> {
    use aya_ebpf::{
        bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup, EbpfContext as _,
    };
    // SAFETY: a plain C struct of integers and unions of integers: all zeros is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = 17;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the helper reads and writes `p`, on the stack and of the size given, for the
    // packet this program runs for.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc == 0).then_some((p.ifindex, p.smac, p.dmac))
}

#[inline(always)]
fn stateless_nat(ctx: &XdpContext, fib: bool) -> u32 {
    let frame = XdpFrame::new(ctx);
    let Some(rule) = NAT.get(0).copied() else {
        return xdp_action::XDP_PASS;
    };
    // Ethernet, IPv4 without options and UDP: 42 bytes at fixed offsets.
    let Some(h) = frame.read::<[u8; 42]>(0) else {
        return xdp_action::XDP_PASS;
    };
    let (eth, ip, udp) = (&h[..14], &h[14..34], &h[34..42]);
    // IPv4, IHL 5, UDP, not a fragment, TTL left to decrement, the rule's port.
    if eth[12..14] != [0x08, 0x00]
        || ip[0] != 0x45
        || ip[9] != 17
        || (ip[6] & 0x3f) != 0
        || ip[7] != 0
        || ip[8] <= 1
        || udp[2..4] != rule.match_port
    {
        return xdp_action::XDP_PASS;
    }
    let addr = |b: &[u8]| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&b[..4]);
        a
    };
    let (old_src, old_dst) = (addr(&ip[12..16]), addr(&ip[16..20]));
    let (new_src, new_dst) = (addr(&rule.src), addr(&rule.to));
    let addrs = Delta::NONE
        .replace_addr(&old_src, &new_src, 4)
        .replace_addr(&old_dst, &new_dst, 4);
    let ttl = Delta::NONE.replace(
        u16::from_be_bytes([ip[8], ip[9]]),
        u16::from_be_bytes([ip[8] - 1, ip[9]]),
    );
    let port = Delta::NONE.replace(
        u16::from_be_bytes(rule.match_port),
        u16::from_be_bytes(rule.to_port),
    );
    let ip_check = addrs.add(ttl).apply(u16::from_be_bytes([ip[10], ip[11]]));
    let udp_check = addrs
        .add(port)
        .apply_udp(u16::from_be_bytes([udp[6], udp[7]]));
    let (ifindex, src_mac, dst_mac) = if fib {
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
        match fib_next_hop(ctx, rule.src, rule.to, tot_len) {
            Some(hop) => hop,
            None => return xdp_action::XDP_PASS,
        }
    } else {
        (rule.ifindex, rule.src_mac, rule.dst_mac)
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst_mac);
    macs[6..].copy_from_slice(&src_mac);
    let written = frame
        .write(0, macs)
        .and_then(|()| frame.write(22, ip[8] - 1))
        .and_then(|()| frame.write(24, ip_check.to_be_bytes()))
        .and_then(|()| frame.write(26, rule.src))
        .and_then(|()| frame.write(30, rule.to))
        .and_then(|()| frame.write(36, rule.to_port))
        .and_then(|()| frame.write(40, udp_check.to_be_bytes()));
    if written.is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a BPF helper call with plain integer arguments.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
