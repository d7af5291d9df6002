//! BPF_PROG_TEST_RUN fixtures: hand-built frames through the real, verified XDP program.
//!
//! Each row is (what, input frame, expected verdict, expected output frame, reason counted).
//! All rows run, then every mismatch is reported at once; the counters the program kept are
//! checked against the reasons the table expects, and the sessions' own counters against the
//! packets the table relays.
//!
//! Expected outputs are built from scratch with the frame builder (full checksums), never by
//! the rewrite code under test.

mod support;

use std::collections::BTreeMap;

// SOCKS5 records' traffic: checked in `fixtures_through_the_verified_program`.

use aya::programs::{TestRun as _, TestRunOptions};
use relay::{
    datapath::{self, Datapath},
    ebpf, pin,
    stats::Snapshot,
};
use relay_common::{
    counters::{Reason, Verdict},
    frame::{socks5_udp_header, Frame},
    packet::PROTO_TCP,
    session::{Nexthop, SlowPath, TO_CLIENT, TO_UPSTREAM},
};
use relay_lab::sa;
use support::{ends, PinDir};

struct Fixture {
    what: &'static str,
    input: Vec<u8>,
    verdict: Verdict,
    /// `None`: the frame must leave untouched.
    output: Option<Vec<u8>>,
    reason: Reason,
    /// A TCP session's packet: (session id, direction) whose counters it adds to.
    session: Option<(u32, u32)>,
}

impl Fixture {
    fn of(mut self, id: u32, direction: u32) -> Fixture {
        self.session = Some((id, direction));
        self
    }
}

/// A frame the relay does not own: passed to the kernel byte for byte.
fn pass(what: &'static str, input: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        what,
        input,
        verdict: Verdict::Pass,
        output: None,
        reason,
        session: None,
    }
}

fn udp4() -> Frame {
    Frame::udp(
        sa("198.18.1.2:41000"),
        sa("198.18.1.1:51820"),
        b"handshake initiation",
    )
}

fn udp6() -> Frame {
    Frame::udp(
        sa("[fd00:5a:1::2]:41000"),
        sa("[fd00:5a:1::1]:51820"),
        b"v6 datagram",
    )
}

/// A frame the relay rewrites: `input` leaves as the same datagram from `src` to `dst`, one
/// hop older, with the next hop's MAC addresses.
/// A frame the relay rewrites and sends back out (XDP_TX): `input` must leave as `output`,
/// one hop older, with `nh`'s MAC addresses.
fn tx(what: &'static str, input: Frame, output: Frame, nh: &Nexthop) -> Fixture {
    Fixture {
        what,
        input: input.build(),
        verdict: Verdict::Tx,
        output: Some(
            output
                .macs(nh.src_mac, nh.dst_mac)
                .hop_limit(input.hop_limit - 1)
                .build(),
        ),
        reason: Reason::RelayedTx,
        session: None,
    }
}

/// `input` leaves as the same datagram from `src` to `dst`.
fn relayed(what: &'static str, input: Frame, src: &str, dst: &str, nh: &Nexthop) -> Fixture {
    let mut out = input.clone();
    out.src = sa(src);
    out.dst = sa(dst);
    tx(what, input, out, nh)
}

fn dropped(what: &'static str, input: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        what,
        input,
        verdict: Verdict::Drop,
        output: None,
        reason,
        session: None,
    }
}

// The sessions the fixtures run against (see `install`).
const V4_CLIENT: &str = "198.18.1.2:40000";
const V4_FRONT: &str = "198.18.1.1:51820";
const V4_BACK: &str = "198.18.2.1:20000";
const V4_UPSTREAM: &str = "198.18.2.2:51820";
const V6_CLIENT: &str = "[fd00:5a:1::2]:40000";
const V6_FRONT: &str = "[fd00:5a:1::1]:51820";
const V6_BACK: &str = "[fd00:5a:2::1]:20001";
const V6_UPSTREAM: &str = "[fd00:5a:2::2]:51820";
const UNRESOLVED_CLIENT: &str = "198.18.1.3:40000";
const SMALL_MTU_CLIENT: &str = "198.18.1.4:40000";
/// A session whose egress is another interface (ifindex 99).
const OTHER_LINK_CLIENT: &str = "198.18.1.5:40000";
/// A session whose record (id 5) was taken by another session after its flows were written.
const STALE_CLIENT: &str = "198.18.1.6:40000";

/// BPF_PROG_TEST_RUN runs the program as if the frame arrived on loopback (ifindex 1): a
/// next hop out of ifindex 1 is XDP_TX.
const TO_UPSTREAM_HOP: Nexthop = Nexthop {
    ifindex: 1,
    mtu: 1500,
    src_mac: [0x02, 0, 0, 0, 2, 1],
    dst_mac: [0x02, 0, 0, 0, 2, 2],
    _pad: [0; 2],
};
const TO_CLIENT_HOP: Nexthop = Nexthop {
    ifindex: 1,
    mtu: 1500,
    src_mac: [0x02, 0, 0, 0, 1, 1],
    dst_mac: [0x02, 0, 0, 0, 1, 2],
    _pad: [0; 2],
};

/// Installs four sessions: IPv4 and IPv6 with resolved next hops, one whose next hop is
/// unresolved, one whose egress MTU is tiny.
fn install(dp: &mut Datapath) {
    dp.set_nexthop(0, &TO_UPSTREAM_HOP).unwrap();
    dp.set_nexthop(1, &TO_CLIENT_HOP).unwrap();
    dp.set_nexthop(2, &Nexthop::default()).unwrap();
    dp.set_nexthop(
        3,
        &Nexthop {
            mtu: 100,
            ..TO_UPSTREAM_HOP
        },
    )
    .unwrap();
    dp.set_nexthop(
        4,
        &Nexthop {
            ifindex: 99,
            ..TO_UPSTREAM_HOP
        },
    )
    .unwrap();
    let sessions = [
        (ends(V4_CLIENT, V4_FRONT, V4_BACK, V4_UPSTREAM), [0, 1]),
        (ends(V6_CLIENT, V6_FRONT, V6_BACK, V6_UPSTREAM), [0, 1]),
        (
            ends(UNRESOLVED_CLIENT, V4_FRONT, "198.18.2.1:20002", V4_UPSTREAM),
            [2, 2],
        ),
        (
            ends(SMALL_MTU_CLIENT, V4_FRONT, "198.18.2.1:20003", V4_UPSTREAM),
            [3, 3],
        ),
        (
            ends(OTHER_LINK_CLIENT, V4_FRONT, "198.18.2.1:20004", V4_UPSTREAM),
            [4, 4],
        ),
        (
            ends(STALE_CLIENT, V4_FRONT, "198.18.2.1:20005", V4_UPSTREAM),
            [0, 1],
        ),
    ];
    for (id, (e, hops)) in sessions.iter().enumerate() {
        let record = datapath::record(e, 0, *hops, 1);
        dp.install(id as u32, &record, &SlowPath::default())
            .unwrap();
    }
    // Record 5 reused by another client: STALE_CLIENT's flows still lead to it.
    let other = ends(
        "198.18.1.7:40000",
        V4_FRONT,
        "198.18.2.1:20006",
        V4_UPSTREAM,
    );
    dp.install(
        5,
        &datapath::record(&other, 0, [0, 1], 1),
        &SlowPath::default(),
    )
    .unwrap();
    // SOCKS5 associations (ids 8 and 9), each approved for one destination.
    let socks = [
        ends(SOCKS_CLIENT, SOCKS_FRONT, SOCKS_BACK, SOCKS_DEST),
        ends(SOCKS6_CLIENT, SOCKS6_FRONT, SOCKS6_BACK, SOCKS6_DEST),
    ];
    for (i, e) in socks.iter().enumerate() {
        let record = datapath::record(e, relay_common::session::RULE_SOCKS | 1, [0, 1], 1);
        dp.install(8 + i as u32, &record, &SlowPath::default())
            .unwrap();
    }
}

// TCP rules the kernel opens sessions for (see `install_tcp`).
const TCP_CLIENT: &str = "198.18.1.2:50000";
const TCP_FRONT: &str = "198.18.1.1:443";
const TCP_BACK_IP: &str = "198.18.2.1";
const TCP_UPSTREAM: &str = "198.18.2.2:8443";
const TCP6_CLIENT: &str = "[fd00:5a:1::2]:50000";
const TCP6_FRONT: &str = "[fd00:5a:1::1]:443";
const TCP6_BACK_IP: &str = "fd00:5a:2::1";
const TCP6_UPSTREAM: &str = "[fd00:5a:2::2]:8443";
/// Rules on other ports: a new-session rate of one, full, with an allow list.
const TCP_RATE_FRONT: &str = "198.18.1.1:444";
const TCP_FULL_FRONT: &str = "198.18.1.1:445";
const TCP_ALLOW_FRONT: &str = "198.18.1.1:446";
/// A rule to an upstream of another pool than `TCP_UPSTREAM`'s (see `other_pool_upstream`).
const TCP_OTHER_FRONT: &str = "198.18.1.1:447";
const TCP_OTHER_CLIENT: &str = "198.18.1.8:50000";
/// The id its first session takes; its port is `POOL[0]`'s, which the first IPv4 session
/// holds too (toward `TCP_UPSTREAM`).
const OTHER_POOL_SLOT: (u32, u16) = (11, 21000);

/// The upstream address and port of `TCP_OTHER_FRONT`'s rule: on `TCP_UPSTREAM`'s host, the
/// first port whose pool is not `TCP_UPSTREAM`'s.
fn other_pool_upstream() -> String {
    let first = datapath::pool_of(sa(TCP_UPSTREAM));
    (9000..)
        .map(|port| format!("198.18.2.2:{port}"))
        .find(|u| datapath::pool_of(sa(u)) != first)
        .unwrap()
}

/// A client address holding its share of the rules.
const TCP_GREEDY: &str = "198.18.1.7:50000";
/// The ids and relay ports the pool lends, in order.
const POOL: [(u32, u16); 4] = [(12, 21000), (13, 21001), (14, 21002), (15, 21003)];
/// The way back to a client XDP takes: whence its SYN came (the frame's MACs swapped).
const BACK_HOP: Nexthop = Nexthop {
    ifindex: 1,
    mtu: 1500,
    src_mac: relay_common::frame::RELAY_MAC,
    dst_mac: relay_common::frame::CLIENT_MAC,
    _pad: [0; 2],
};

fn install_tcp(dp: &Datapath) {
    use relay_common::session::{Listen, ListenKey, LISTEN_ALLOW_LIST, LISTEN_FULL};
    let listen = |front: &str, upstream: &str, back: &str, rule: u16, flags: u16, cost: u64| {
        let f = sa(front);
        let u = sa(upstream);
        let key = ListenKey {
            addr: datapath::addr16(f.ip()),
            port: f.port(),
            family: if f.is_ipv4() { 4 } else { 6 },
            proto: PROTO_TCP,
            _pad: [0; 4],
        };
        let value = Listen {
            upstream: datapath::addr16(u.ip()),
            back: datapath::addr16(back.parse().unwrap()),
            upstream_port: u.port(),
            rule,
            nexthop: 0,
            flags,
            cost_ns: cost,
            burst_ns: cost,
            pool: datapath::pool_of(u) as u16,
            _pad: [0; 3],
        };
        dp.set_listen(key, Some(&value)).unwrap();
    };
    listen(TCP_FRONT, TCP_UPSTREAM, TCP_BACK_IP, 1, 0, 0);
    listen(TCP6_FRONT, TCP6_UPSTREAM, TCP6_BACK_IP, 2, 0, 0);
    // One session an hour.
    listen(
        TCP_RATE_FRONT,
        TCP_UPSTREAM,
        TCP_BACK_IP,
        3,
        0,
        3_600_000_000_000,
    );
    listen(TCP_FULL_FRONT, TCP_UPSTREAM, TCP_BACK_IP, 4, LISTEN_FULL, 0);
    listen(
        TCP_ALLOW_FRONT,
        TCP_UPSTREAM,
        TCP_BACK_IP,
        5,
        LISTEN_ALLOW_LIST,
        0,
    );
    listen(
        TCP_OTHER_FRONT,
        &other_pool_upstream(),
        TCP_BACK_IP,
        6,
        0,
        0,
    );
    let allowed: relay::config::Cidr = "198.18.1.0/30".parse().unwrap();
    dp.set_allow(5, &[], &[allowed]).unwrap();
    dp.set_source_full(1, sa(TCP_GREEDY).ip(), true).unwrap();
    // Each into its upstream's pool: the IPv6 rule's session takes the second.
    for (i, slot) in POOL.iter().enumerate() {
        let upstream = if i == 1 { TCP6_UPSTREAM } else { TCP_UPSTREAM };
        assert_eq!(dp.pool_push(datapath::pool_of(sa(upstream)), &[*slot]), 1);
    }
    let other = datapath::pool_of(sa(&other_pool_upstream()));
    assert_eq!(dp.pool_push(other, &[OTHER_POOL_SLOT]), 1);
}

/// A TCP segment from `src` to `dst`.
fn seg(src: &str, dst: &str, flags: u8, data: &[u8]) -> Frame {
    Frame::tcp(sa(src), sa(dst), flags, data)
}

fn with_port(ip: &str, port: u16) -> String {
    std::net::SocketAddr::new(ip.parse().unwrap(), port).to_string()
}

/// The ICMP error a router sends back for `input`, built byte by byte: too big (with the
/// MTU) or, for `None`, time exceeded. From the address `input` went to, to its sender,
/// quoting its IP header and 8 bytes of TCP, back to the sender's MAC.
fn icmp_answer(what: &'static str, input: Frame, too_big: Option<u16>) -> Fixture {
    use relay_common::checksum::{checksum, transport_checksum};
    let bytes = input.build();
    let mut out = Vec::new();
    out.extend_from_slice(&input.src_mac);
    out.extend_from_slice(&input.dst_mac);
    match (input.src.ip(), input.dst.ip()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&s.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut icmp = match too_big {
                Some(mtu) => vec![3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8],
                None => vec![11, 0, 0, 0, 0, 0, 0, 0],
            };
            icmp.extend_from_slice(&bytes[14..42]);
            let c = checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&ip);
            out.extend_from_slice(&icmp);
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 56, 58, 255]);
            out.extend_from_slice(&d.octets());
            out.extend_from_slice(&s.octets());
            let mut icmp = match too_big {
                Some(mtu) => vec![2, 0, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8],
                None => vec![3, 0, 0, 0, 0, 0, 0, 0],
            };
            icmp.extend_from_slice(&bytes[14..62]);
            let c = transport_checksum(&d.octets(), &s.octets(), 58, &icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&icmp);
        }
        _ => unreachable!("one family"),
    }
    Fixture {
        what,
        input: bytes,
        verdict: Verdict::Tx,
        output: Some(out),
        reason: if too_big.is_some() {
            Reason::TcpTooBig
        } else {
            Reason::TcpTtlExpired
        },
        session: None,
    }
}

/// TCP: sessions opened by the kernel on a SYN, both directions, closing, strangers, bad
/// flags, refusals. In order: the first rows open the sessions the later ones use.
fn tcp_table() -> Vec<Fixture> {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    let mss = [2, 4, 0x05, 0xb4, 1, 3, 3, 7];
    let back = with_port(TCP_BACK_IP, POOL[0].1);
    let back6 = with_port(TCP6_BACK_IP, POOL[1].1);
    let up =
        |what, input: Frame, src: &str, dst: &str| relayed(what, input, src, dst, &TO_UPSTREAM_HOP);
    let down = |what, input: Frame, src: &str, dst: &str| relayed(what, input, src, dst, &BACK_HOP);
    let syn = seg(TCP_CLIENT, TCP_FRONT, SYN, b"").tcp_options(&mss);
    let other = other_pool_upstream();
    let shared = with_port(TCP_BACK_IP, OTHER_POOL_SLOT.1);
    assert_eq!(shared, back, "the same relay port as the first session");
    vec![
        up(
            "TCP SYN opens a session (IPv4)",
            syn.clone(),
            &back,
            TCP_UPSTREAM,
        )
        .of(12, 0),
        up(
            "TCP SYN to an upstream of another pool: a session on the same relay port",
            seg(TCP_OTHER_CLIENT, TCP_OTHER_FRONT, SYN, b""),
            &shared,
            &other,
        )
        .of(OTHER_POOL_SLOT.0, 0),
        down(
            "TCP SYN-ACK from that upstream to the shared port: to its own client",
            seg(&other, &shared, SYN | ACK, b""),
            TCP_OTHER_FRONT,
            TCP_OTHER_CLIENT,
        )
        .of(OTHER_POOL_SLOT.0, 1),
        up(
            "TCP SYN retransmitted: the same session",
            syn.clone(),
            &back,
            TCP_UPSTREAM,
        )
        .of(12, 0),
        down(
            "TCP SYN-ACK from the upstream",
            seg(TCP_UPSTREAM, &back, SYN | ACK, b"").tcp_options(&mss),
            TCP_FRONT,
            TCP_CLIENT,
        )
        .of(12, 1),
        up(
            "TCP data from the client",
            seg(TCP_CLIENT, TCP_FRONT, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n"),
            &back,
            TCP_UPSTREAM,
        )
        .of(12, 0),
        down(
            "TCP data from the upstream (odd length)",
            seg(TCP_UPSTREAM, &back, ACK | PSH, &[0x5a; 1001]),
            TCP_FRONT,
            TCP_CLIENT,
        )
        .of(12, 1),
        up(
            "TCP data with IPv4 options from the client: carried, options untouched",
            seg(TCP_CLIENT, TCP_FRONT, ACK | PSH, b"with options").ipv4_options(&[7, 7, 4]),
            &back,
            TCP_UPSTREAM,
        )
        .of(12, 0),
        down(
            "TCP data with IPv4 options from the upstream",
            seg(TCP_UPSTREAM, &back, ACK, &[0x11; 333]).ipv4_options(&[68, 8, 5, 0, 1, 2, 3, 4]),
            TCP_FRONT,
            TCP_CLIENT,
        )
        .of(12, 1),
        dropped(
            "TCP IPv4 options and a wrong header checksum",
            {
                let mut f = seg(TCP_CLIENT, TCP_FRONT, ACK, b"x")
                    .ipv4_options(&[7, 7, 4])
                    .build();
                f[14 + 22] ^= 1;
                f
            },
            Reason::TcpUncarried,
        ),
        dropped(
            "TCP IPv4 options and TTL 1: dropped, no ICMP quoting options is built",
            seg(TCP_CLIENT, TCP_FRONT, ACK, b"late")
                .ipv4_options(&[7, 7, 4])
                .hop_limit(1)
                .build(),
            Reason::TcpUncarried,
        ),
        pass(
            "TCP a stranger's segment to a session's relay port",
            seg("198.18.2.3:8443", &back, ACK, b"x").build(),
            Reason::Tcp,
        ),
        pass(
            "TCP a stranger's SYN to a session's relay port",
            seg("198.18.2.3:8443", &back, SYN, b"").build(),
            Reason::Tcp,
        ),
        pass(
            "TCP the upstream's segment to another relay port",
            seg(TCP_UPSTREAM, &with_port(TCP_BACK_IP, 21999), ACK, b"x").build(),
            Reason::Tcp,
        ),
        dropped(
            "TCP a session segment without flags",
            seg(TCP_CLIENT, TCP_FRONT, 0, b"").build(),
            Reason::TcpBadFlags,
        ),
        dropped(
            "TCP a session segment with FIN but no ACK",
            seg(TCP_CLIENT, TCP_FRONT, FIN | PSH | 0x20, b"").build(),
            Reason::TcpBadFlags,
        ),
        icmp_answer(
            "TCP a session segment with TTL 1: ICMP time exceeded",
            seg(TCP_CLIENT, TCP_FRONT, ACK, b"late").hop_limit(1),
            None,
        ),
        icmp_answer(
            "TCP a segment too big for the upstream's link: ICMP fragmentation needed",
            seg(TCP_CLIENT, TCP_FRONT, ACK, &[0x33; 1461]),
            Some(1500),
        ),
        dropped(
            "TCP a segment too big, without DF: handed to the controller (TCP_SLOW)",
            {
                let mut f = seg(TCP_CLIENT, TCP_FRONT, ACK, &[0x33; 1461]);
                f.ipv4_frag = 0;
                f.build()
            },
            Reason::TcpToController,
        ),
        dropped(
            "TCP a segment's first IPv4 fragment: handed to the controller, its datagram noted",
            seg(TCP_CLIENT, TCP_FRONT, ACK, &[0x44; 64])
                .fragment(true, 0)
                .build(),
            Reason::TcpToController,
        ),
        dropped(
            "TCP a later fragment of that datagram: handed to the controller",
            seg(TCP_CLIENT, TCP_FRONT, ACK, &[0x44; 64])
                .fragment(false, 4)
                .build(),
            Reason::TcpToController,
        ),
        pass(
            "TCP a first fragment of the same client's with no session (the identification \
             again): the host's, and the datagram noted before is forgotten",
            seg("198.18.1.2:50001", TCP_FRONT, ACK, &[0x44; 64])
                .fragment(true, 0)
                .build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "TCP a later fragment of that identification now: the host's",
            seg(TCP_CLIENT, TCP_FRONT, ACK, &[0x44; 64])
                .fragment(false, 4)
                .build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "TCP a later fragment of a datagram whose first XDP has not seen: the host's",
            seg("198.18.1.9:50000", TCP_FRONT, ACK, &[0x44; 64])
                .fragment(false, 4)
                .build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "TCP a first fragment of a flow without a session: the host's",
            seg("198.18.1.9:50000", TCP_FRONT, ACK, &[0x44; 64])
                .fragment(true, 0)
                .build(),
            Reason::Ipv4Fragment,
        ),
        up(
            "TCP FIN from the client",
            seg(TCP_CLIENT, TCP_FRONT, FIN | ACK, b""),
            &back,
            TCP_UPSTREAM,
        )
        .of(12, 0),
        down(
            "TCP RST from the upstream",
            seg(TCP_UPSTREAM, &back, RST | ACK, b""),
            TCP_FRONT,
            TCP_CLIENT,
        )
        .of(12, 1),
        up(
            "TCP SYN opens a session (IPv6)",
            seg(TCP6_CLIENT, TCP6_FRONT, SYN, b"").tcp_options(&mss),
            &back6,
            TCP6_UPSTREAM,
        )
        .of(13, 0),
        down(
            "TCP SYN-ACK from the upstream (IPv6)",
            seg(TCP6_UPSTREAM, &back6, SYN | ACK, b""),
            TCP6_FRONT,
            TCP6_CLIENT,
        )
        .of(13, 1),
        up(
            "TCP data both ways (IPv6)",
            seg(TCP6_CLIENT, TCP6_FRONT, ACK, &[0xa5; 1200]),
            &back6,
            TCP6_UPSTREAM,
        )
        .of(13, 0),
        icmp_answer(
            "TCP a segment too big (IPv6): ICMPv6 packet too big",
            seg(TCP6_CLIENT, TCP6_FRONT, ACK, &[0x44; 1441]),
            Some(1500),
        ),
        icmp_answer(
            "TCP a FIN too big (IPv6): ICMPv6 packet too big, and the session is not closing",
            seg(TCP6_CLIENT, TCP6_FRONT, FIN | ACK, &[0x44; 1441]),
            Some(1500),
        ),
        icmp_answer(
            "TCP hop limit 1 (IPv6): ICMPv6 time exceeded",
            seg(TCP6_UPSTREAM, &back6, ACK, b"late").hop_limit(1),
            None,
        ),
        dropped(
            "TCP SYN with data to a rule",
            seg("198.18.1.2:50001", TCP_FRONT, SYN, b"fast open").build(),
            Reason::TcpBadFlags,
        ),
        dropped(
            "TCP SYN+FIN to a rule",
            seg("198.18.1.2:50002", TCP_FRONT, SYN | FIN, b"").build(),
            Reason::TcpBadFlags,
        ),
        dropped(
            "TCP SYN+RST to a rule",
            seg("198.18.1.2:50003", TCP_FRONT, SYN | RST, b"").build(),
            Reason::TcpBadFlags,
        ),
        pass(
            "TCP SYN-ACK to a rule's port (the host's own)",
            seg("198.18.1.2:50004", TCP_FRONT, SYN | ACK, b"").build(),
            Reason::Tcp,
        ),
        pass(
            "TCP SYN to a port without a rule",
            seg("198.18.1.2:50005", "198.18.1.1:22", SYN, b"").build(),
            Reason::Tcp,
        ),
        dropped(
            "TCP SYN from an address holding its share",
            seg(TCP_GREEDY, TCP_FRONT, SYN, b"").build(),
            Reason::OpenRefused,
        ),
        up(
            "TCP SYN within the rule's rate",
            seg("198.18.1.2:50006", TCP_RATE_FRONT, SYN, b""),
            &with_port(TCP_BACK_IP, POOL[2].1),
            TCP_UPSTREAM,
        ),
        dropped(
            "TCP SYN over the rule's rate",
            seg("198.18.1.2:50007", TCP_RATE_FRONT, SYN, b"").build(),
            Reason::OpenRefused,
        ),
        pass(
            "TCP SYN to a full rule: the controller decides",
            seg("198.18.1.2:50008", TCP_FULL_FRONT, SYN, b"").build(),
            Reason::OpenToController,
        ),
        dropped(
            "TCP SYN from outside the rule's allow list",
            seg("198.18.1.9:50009", TCP_ALLOW_FRONT, SYN, b"").build(),
            Reason::OpenRefused,
        ),
        up(
            "TCP SYN from inside the rule's allow list",
            seg("198.18.1.3:50010", TCP_ALLOW_FRONT, SYN, b""),
            &with_port(TCP_BACK_IP, POOL[3].1),
            TCP_UPSTREAM,
        ),
        up(
            "TCP RST from the client",
            seg("198.18.1.3:50010", TCP_ALLOW_FRONT, RST | ACK, b""),
            &with_port(TCP_BACK_IP, POOL[3].1),
            TCP_UPSTREAM,
        ),
        up(
            "TCP a new SYN on the same addresses and ports while the session lingers: it reopens",
            seg("198.18.1.3:50010", TCP_ALLOW_FRONT, SYN, b""),
            &with_port(TCP_BACK_IP, POOL[3].1),
            TCP_UPSTREAM,
        ),
        pass(
            "TCP SYN with the pool empty: to the controller's listener",
            seg("198.18.1.2:50011", TCP_FRONT, SYN, b"").build(),
            Reason::OpenToController,
        ),
    ]
}

const SOCKS_CLIENT: &str = "198.18.1.2:45000";
const SOCKS_FRONT: &str = "198.18.1.1:30000";
const SOCKS_BACK: &str = "198.18.2.1:30000";
const SOCKS_DEST: &str = "198.18.2.2:53";
const SOCKS6_CLIENT: &str = "[fd00:5a:1::2]:45000";
const SOCKS6_FRONT: &str = "[fd00:5a:1::1]:30001";
const SOCKS6_BACK: &str = "[fd00:5a:2::1]:30001";
const SOCKS6_DEST: &str = "[fd00:5a:2::2]:443";

fn wrapped(dest: &str, data: &[u8]) -> Vec<u8> {
    let mut w = socks5_udp_header(sa(dest), 0);
    w.extend_from_slice(data);
    w
}

/// A client's SOCKS5 datagram leaves without its header, from the association's back side.
fn strip(
    what: &'static str,
    client: &str,
    front: &str,
    back: &str,
    dest: &str,
    data: &[u8],
) -> Fixture {
    strip_tagged(what, client, front, back, dest, data, None)
}

/// [`strip`], with an 802.1Q tag on the way in and out if `vlan` says so.
fn strip_tagged(
    what: &'static str,
    client: &str,
    front: &str,
    back: &str,
    dest: &str,
    data: &[u8],
    vlan: Option<u16>,
) -> Fixture {
    let input = Frame::udp(sa(client), sa(front), &wrapped(dest, data));
    let output = Frame::udp(sa(back), sa(dest), data);
    match vlan {
        Some(v) => tx(what, input.vlan(v), output.vlan(v), &TO_UPSTREAM_HOP),
        None => tx(what, input, output, &TO_UPSTREAM_HOP),
    }
}

/// A destination's reply reaches the client with the SOCKS5 header naming the destination.
fn prepend(
    what: &'static str,
    client: &str,
    front: &str,
    back: &str,
    dest: &str,
    data: &[u8],
) -> Fixture {
    prepend_tagged(what, client, front, back, dest, data, None)
}

/// [`prepend`], with an 802.1Q tag on the way in and out if `vlan` says so.
fn prepend_tagged(
    what: &'static str,
    client: &str,
    front: &str,
    back: &str,
    dest: &str,
    data: &[u8],
    vlan: Option<u16>,
) -> Fixture {
    let input = Frame::udp(sa(dest), sa(back), data);
    let output = Frame::udp(sa(front), sa(client), &wrapped(dest, data));
    match vlan {
        Some(v) => tx(what, input.vlan(v), output.vlan(v), &TO_CLIENT_HOP),
        None => tx(what, input, output, &TO_CLIENT_HOP),
    }
}

fn socks_table() -> Vec<Fixture> {
    let data = b"a DNS query or a QUIC packet, forty bytes";
    let odd = b"an odd-length datagram, forty-three bytes!!";
    let mut frag = wrapped(SOCKS_DEST, data);
    frag[2] = 1;
    let mut domain = vec![0, 0, 0, 3, 7];
    domain.extend_from_slice(b"example");
    domain.extend_from_slice(&53u16.to_be_bytes());
    domain.extend_from_slice(data);
    vec![
        strip(
            "SOCKS5 IPv4: strip toward the destination",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            data,
        ),
        prepend(
            "SOCKS5 IPv4: prepend toward the client",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            data,
        ),
        strip(
            "SOCKS5 IPv4: odd length, strip",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            odd,
        ),
        prepend(
            "SOCKS5 IPv4: odd length, prepend",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            odd,
        ),
        strip(
            "SOCKS5 IPv6: strip toward the destination",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            data,
        ),
        prepend(
            "SOCKS5 IPv6: prepend toward the client",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            data,
        ),
        strip(
            "SOCKS5 IPv6: odd length, strip",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            odd,
        ),
        prepend(
            "SOCKS5 IPv6: odd length, prepend",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            odd,
        ),
        // 802.1Q: the header blocks that move are 46 and 66 bytes.
        strip_tagged(
            "SOCKS5 IPv4 802.1Q: strip",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            data,
            Some(5),
        ),
        prepend_tagged(
            "SOCKS5 IPv4 802.1Q: prepend",
            SOCKS_CLIENT,
            SOCKS_FRONT,
            SOCKS_BACK,
            SOCKS_DEST,
            data,
            Some(5),
        ),
        strip_tagged(
            "SOCKS5 IPv6 802.1Q: strip",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            odd,
            Some(4094),
        ),
        prepend_tagged(
            "SOCKS5 IPv6 802.1Q: prepend",
            SOCKS6_CLIENT,
            SOCKS6_FRONT,
            SOCKS6_BACK,
            SOCKS6_DEST,
            odd,
            Some(4094),
        ),
        dropped(
            "SOCKS5 FRAG != 0 is dropped",
            Frame::udp(sa(SOCKS_CLIENT), sa(SOCKS_FRONT), &frag).build(),
            Reason::SocksFragment,
        ),
        pass(
            "SOCKS5 domain name goes to the controller",
            Frame::udp(sa(SOCKS_CLIENT), sa(SOCKS_FRONT), &domain).build(),
            Reason::SocksSlowPath,
        ),
        pass(
            "SOCKS5 destination not approved yet",
            Frame::udp(
                sa(SOCKS_CLIENT),
                sa(SOCKS_FRONT),
                &wrapped("198.18.2.3:53", data),
            )
            .build(),
            Reason::SocksSlowPath,
        ),
        pass(
            "SOCKS5 from another port of the client's address",
            Frame::udp(
                sa("198.18.1.2:45001"),
                sa(SOCKS_FRONT),
                &wrapped(SOCKS_DEST, data),
            )
            .build(),
            Reason::SocksSlowPath,
        ),
        pass(
            "SOCKS5 garbage header",
            Frame::udp(sa(SOCKS_CLIENT), sa(SOCKS_FRONT), &[0xff; 12]).build(),
            Reason::SocksSlowPath,
        ),
        pass(
            "SOCKS5 datagram of no approved flow, no socket on the port: not provably the \
             relay's, passed",
            Frame::udp(sa(SOCKS_CLIENT), sa("198.18.1.1:30002"), &[0xff; 12]).build(),
            Reason::SocksSlowPath,
        ),
    ]
}

fn session_table() -> Vec<Fixture> {
    let payload = b"a WireGuard data packet, more or less";
    let c2u = Frame::udp(sa(V4_CLIENT), sa(V4_FRONT), payload);
    let u2c = Frame::udp(sa(V4_UPSTREAM), sa(V4_BACK), payload);
    let c2u6 = Frame::udp(sa(V6_CLIENT), sa(V6_FRONT), payload);
    let u2c6 = Frame::udp(sa(V6_UPSTREAM), sa(V6_BACK), payload);
    let mut bad_ip_check = c2u.build();
    bad_ip_check[24] ^= 0x40;
    let mut v6_zero_check = c2u6.build();
    v6_zero_check[60..62].copy_from_slice(&[0, 0]);
    vec![
        relayed(
            "IPv4 client to upstream",
            c2u.clone(),
            V4_BACK,
            V4_UPSTREAM,
            &TO_UPSTREAM_HOP,
        ),
        relayed(
            "IPv4 upstream to client",
            u2c.clone(),
            V4_FRONT,
            V4_CLIENT,
            &TO_CLIENT_HOP,
        ),
        relayed(
            "IPv6 client to upstream",
            c2u6.clone(),
            V6_BACK,
            V6_UPSTREAM,
            &TO_UPSTREAM_HOP,
        ),
        relayed(
            "IPv6 upstream to client",
            u2c6.clone(),
            V6_FRONT,
            V6_CLIENT,
            &TO_CLIENT_HOP,
        ),
        relayed(
            "IPv4 UDP checksum 0 stays 0",
            c2u.clone().no_udp_checksum(),
            V4_BACK,
            V4_UPSTREAM,
            &TO_UPSTREAM_HOP,
        ),
        relayed(
            "odd payload length",
            Frame::udp(sa(V4_CLIENT), sa(V4_FRONT), b"odd"),
            V4_BACK,
            V4_UPSTREAM,
            &TO_UPSTREAM_HOP,
        ),
        relayed(
            "large IPv6 payload",
            Frame::udp(sa(V6_UPSTREAM), sa(V6_BACK), &[0xa5; 1400]),
            V6_FRONT,
            V6_CLIENT,
            &TO_CLIENT_HOP,
        ),
        relayed(
            "802.1Q tag is kept",
            c2u.clone().vlan(100),
            V4_BACK,
            V4_UPSTREAM,
            &TO_UPSTREAM_HOP,
        ),
        pass(
            "TTL 1 goes to the slow path",
            c2u.clone().hop_limit(1).build(),
            Reason::TtlExpiring,
        ),
        pass(
            "hop limit 1 goes to the slow path",
            c2u6.clone().hop_limit(1).build(),
            Reason::TtlExpiring,
        ),
        pass(
            "IP options on a session flow",
            c2u.clone().ipv4_options(&[1, 1, 1, 1]).build(),
            Reason::Ipv4Options,
        ),
        pass(
            "fragment of a session flow",
            c2u.clone().fragment(true, 0).build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "unknown client",
            Frame::udp(sa("198.18.1.9:40000"), sa(V4_FRONT), payload).build(),
            Reason::NoSession,
        ),
        dropped(
            "stranger to a session port",
            Frame::udp(sa("203.0.113.9:53"), sa(V4_BACK), payload).build(),
            Reason::WrongSource,
        ),
        dropped(
            "upstream address, wrong port, to a session port",
            Frame::udp(sa("198.18.2.2:9999"), sa(V4_BACK), payload).build(),
            Reason::WrongSource,
        ),
        pass(
            "stranger to a session-range port no session holds (another service's)",
            Frame::udp(sa("203.0.113.9:53"), sa("198.18.2.1:25000"), payload).build(),
            Reason::NoSession,
        ),
        pass(
            "stranger to a session's port at another address of the host",
            Frame::udp(sa("203.0.113.9:53"), sa("198.18.2.77:20000"), payload).build(),
            Reason::NoSession,
        ),
        pass(
            "routed through the host to a session-range port (no socket here): passed",
            Frame::udp(sa("203.0.113.9:53"), sa("203.0.113.80:25001"), payload).build(),
            Reason::NoSession,
        ),
        pass(
            "routed through the host to a rule's listen port (no socket here): passed",
            Frame::udp(sa("198.18.1.9:40000"), sa("203.0.113.80:51820"), payload).build(),
            Reason::NoSession,
        ),
        pass(
            "a new client of a rule: to the rule's listening socket",
            Frame::udp(sa("198.18.1.9:40000"), sa(V4_FRONT), payload).build(),
            Reason::NoSession,
        ),
        dropped(
            "a live session's packet for the controller (next hop unresolved), no socket \
             (no controller runs): no ICMP",
            Frame::udp(sa(V4_UPSTREAM), sa("198.18.2.1:20002"), payload).build(),
            Reason::NoSocket,
        ),
        pass(
            "a flow whose record another session has taken since",
            Frame::udp(sa(STALE_CLIENT), sa(V4_FRONT), payload).build(),
            Reason::NoSession,
        ),
        pass(
            "802.1Q tag, egress on another link: left to the kernel untouched",
            Frame::udp(sa(OTHER_LINK_CLIENT), sa(V4_FRONT), payload)
                .vlan(100)
                .build(),
            Reason::VlanOtherLink,
        ),
        pass(
            "session flow to another local address",
            Frame::udp(sa(V4_CLIENT), sa("198.18.1.99:51820"), payload).build(),
            Reason::WrongDestination,
        ),
        pass(
            "next hop not resolved yet",
            Frame::udp(sa(UNRESOLVED_CLIENT), sa(V4_FRONT), payload).build(),
            Reason::NoNexthop,
        ),
        pass(
            "larger than the egress MTU",
            Frame::udp(sa(SMALL_MTU_CLIENT), sa(V4_FRONT), &[0; 200]).build(),
            Reason::TooBig,
        ),
        pass(
            "bad IPv4 header checksum",
            bad_ip_check,
            Reason::BadIpChecksum,
        ),
        pass("IPv6 UDP checksum 0", v6_zero_check, Reason::BadUdpChecksum),
    ]
}

fn with(mut f: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

fn table() -> Vec<Fixture> {
    let v4 = udp4().build();
    let v6 = udp6().build();
    vec![
        pass("IPv4 UDP without a session", v4.clone(), Reason::NoSession),
        pass("IPv6 UDP without a session", v6.clone(), Reason::NoSession),
        pass(
            "802.1Q-tagged IPv4 UDP",
            udp4().vlan(7).build(),
            Reason::NoSession,
        ),
        pass(
            "IPv4 UDP with checksum 0",
            udp4().no_udp_checksum().build(),
            Reason::NoSession,
        ),
        pass(
            "QinQ (two tags)",
            with(udp4().vlan(7).build(), 16, &[0x81, 0x00]),
            Reason::VlanStacked,
        ),
        pass("IPv4 TCP", udp4().proto(PROTO_TCP).build(), Reason::Tcp),
        pass("IPv6 TCP", udp6().proto(PROTO_TCP).build(), Reason::Tcp),
        pass("ICMP", udp4().proto(1).build(), Reason::OtherL4),
        pass("ARP", with(v4.clone(), 12, &[0x08, 0x06]), Reason::NotIp),
        pass(
            "IPv4 header cut short",
            v4[..30].to_vec(),
            Reason::Truncated,
        ),
        pass(
            "UDP header cut short (IPv6)",
            v6[..58].to_vec(),
            Reason::Truncated,
        ),
        pass(
            "IPv4 total length beyond the frame",
            with(v4.clone(), 16, &[0x05, 0xdc]),
            Reason::Truncated,
        ),
        pass(
            "IHL below 5",
            with(v4.clone(), 14, &[0x44]),
            Reason::BadIpHeader,
        ),
        pass(
            "version 6 in an IPv4 ethertype",
            with(v4.clone(), 14, &[0x65]),
            Reason::BadIpHeader,
        ),
        pass(
            "IPv4 options (IHL 6)",
            udp4().ipv4_options(&[1, 1, 1, 1]).build(),
            Reason::Ipv4Options,
        ),
        pass(
            "first fragment",
            udp4().fragment(true, 0).build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "later fragment",
            udp4().fragment(false, 100).build(),
            Reason::Ipv4Fragment,
        ),
        pass(
            "IPv6 fragment header",
            with(v6.clone(), 20, &[44]),
            Reason::Ipv6Extension,
        ),
        pass(
            "UDP length disagrees with IP",
            with(v4.clone(), 38, &[0x00, 0x09]),
            Reason::BadUdpLength,
        ),
    ]
}

fn load(pin: &PinDir) -> aya::Ebpf {
    load_with(pin, Vec::new())
}

fn load_with(pin: &PinDir, tx_by_redirect: Vec<u32>) -> aya::Ebpf {
    pin::prepare(pin.path()).expect("bpffs");
    let mut opts = ebpf::LoadOptions::new(pin.path());
    opts.tx_by_redirect = tx_by_redirect;
    opts.capacity = 16;
    opts.session_ports = Some((20000, 29999));
    opts.socks_ports = Some((30000, 31999));
    ebpf::load(&opts).expect("the verifier accepts the program")
}

/// The sockets a running controller (and another service) would hold in the namespace the
/// fixtures run in: whether the program finds one decides between passing a declined frame
/// to the kernel and dropping it (no ICMP while no controller runs).
fn sockets() -> Vec<std::net::UdpSocket> {
    [
        // Association ports (both families: a dual-stack socket).
        "[::]:30000",
        // A rule's listening socket.
        "[::]:51820",
        // Another service on a session-range port, and on a session's port at another
        // address of the host.
        "0.0.0.0:25000",
        "198.18.2.77:20000",
    ]
    .iter()
    .map(|a| std::net::UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
    .collect()
}

/// One frame through the program: its verdict and the frame as it left.
fn test_run(prog: &aya::programs::Xdp, what: &str, input: &[u8]) -> (Option<Verdict>, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN failed: {e}"));
    out.truncate(r.data_size_out as usize);
    (Verdict::from_action(r.return_value), out)
}

/// How frames the table sends back out (verdict `Tx`) leave in a run of it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SendBack {
    /// XDP_TX, as on a NIC.
    Tx,
    /// XDP_REDIRECT to the interface the frame came in on (loopback), as on a veth.
    Redirect,
    /// Loaded as for a veth, but the interface is not one the controller attached to (not in
    /// `EGRESS`): XDP_TX after all.
    RedirectNotInEgress,
    /// Loaded for a veth that is another interface (attached too): XDP_TX on this one.
    RedirectOnAnother,
}

fn fixtures_in_a_namespace(send_back: SendBack) {
    // A namespace of its own: BPF_PROG_TEST_RUN looks sockets up in the caller's.
    let ns = support::Netns::new("fx");
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["addr", "add", "198.18.2.77/32", "dev", "lo"]);
    let failures = ns.run(move || run_fixtures(send_back));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn fixtures_through_the_verified_program() {
    fixtures_in_a_namespace(SendBack::Tx);
}

/// Loaded for a veth, the program sends what the table sends back out with XDP_REDIRECT to
/// the interface it came in on, rewritten and counted the same (the veth peer is then woken
/// for it, which it is not for XDP_TX frames unless the peer has an XDP program); on the
/// other interfaces, and if the veth is not in `EGRESS`, with XDP_TX as before.
#[test]
fn fixtures_sent_back_by_redirect_for_a_veth() {
    fixtures_in_a_namespace(SendBack::Redirect);
    fixtures_in_a_namespace(SendBack::RedirectNotInEgress);
    fixtures_in_a_namespace(SendBack::RedirectOnAnother);
}

fn run_fixtures(send_back: SendBack) -> Vec<String> {
    let _sockets = sockets();
    let pin = PinDir::new();
    // BPF_PROG_TEST_RUN's frames come in on loopback (ifindex 1 in this namespace).
    let veths = match send_back {
        SendBack::Tx => vec![],
        SendBack::Redirect | SendBack::RedirectNotInEgress => vec![1],
        SendBack::RedirectOnAnother => vec![99],
    };
    let mut bpf = load_with(&pin, veths);
    let mut dp = Datapath::take(&mut bpf).expect("maps");
    install(&mut dp);
    if matches!(send_back, SendBack::Redirect | SendBack::RedirectOnAnother) {
        dp.add_egress(1).expect("loopback in EGRESS");
    }
    install_tcp(&dp);
    // The controller's side of `TCP_SLOW`: a buffer per CPU, as `forward::slowtcp` opens.
    let mut slow: aya::maps::PerfEventArray<aya::maps::MapData> = bpf
        .take_map("TCP_SLOW")
        .expect("TCP_SLOW")
        .try_into()
        .expect("a perf event array");
    let mut slow_buffers: Vec<_> = aya::util::online_cpus()
        .expect("online CPUs")
        .into_iter()
        .map(|cpu| slow.open(cpu, None).expect("a perf buffer"))
        .collect();
    let prog = ebpf::program(&mut bpf).expect("program");
    let mut failures = Vec::new();
    let mut expected_counts: BTreeMap<Reason, (u64, u64)> = BTreeMap::new();
    let mut fixtures = table();
    fixtures.extend(session_table());
    fixtures.extend(socks_table());
    fixtures.extend(tcp_table());
    for f in &fixtures {
        let (verdict, out) = test_run(prog, f.what, &f.input);
        let want_out = f.output.as_ref().unwrap_or(&f.input);
        let want = match (f.verdict, send_back) {
            (Verdict::Tx, SendBack::Redirect) => Verdict::Redirect,
            (v, _) => v,
        };
        if verdict != Some(want) {
            failures.push(format!("{}: verdict {verdict:?}, want {want:?}", f.what));
        }
        if &out != want_out {
            failures.push(format!(
                "{}: output differs\n  got  {:02x?}\n  want {:02x?}",
                f.what, out, want_out
            ));
        }
        let e = expected_counts.entry(f.reason).or_default();
        e.0 += 1;
        e.1 += f.input.len() as u64;
    }

    // What XDP handed to the controller: each such segment, once, with the session and
    // direction it belongs to and its frame byte for byte.
    let mut handed = Vec::new();
    for b in &mut slow_buffers {
        b.for_each(|e| {
            if let aya::maps::perf::PerfEvent::Sample { head, tail } = e {
                handed.push([head, tail].concat());
            }
        });
    }
    let want: Vec<&Fixture> = fixtures
        .iter()
        .filter(|f| f.reason == Reason::TcpToController)
        .collect();
    if handed.len() != want.len() {
        failures.push(format!(
            "TCP_SLOW holds {} records, want {}",
            handed.len(),
            want.len()
        ));
    }
    for (record, f) in handed.iter().zip(&want) {
        let meta_len = std::mem::size_of::<relay_common::session::SlowSegment>();
        let word = |at: usize| {
            record
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        };
        let frame = record.get(meta_len..meta_len + f.input.len());
        let meta = (word(0), word(4), word(8), word(12));
        let len = Some(f.input.len() as u32);
        // A fragment (more fragments, or an offset) says so, for the controller to
        // reassemble its segment.
        let fragment = u16::from_be_bytes([f.input[20], f.input[21]]) & 0x3fff != 0;
        let flags = Some(if fragment {
            relay_common::session::SLOW_FRAGMENT
        } else {
            0
        });
        if meta != (Some(12), Some(TO_UPSTREAM), len, flags) || frame != Some(&f.input[..]) {
            failures.push(format!(
                "{}: handed over as session/direction/length/flags {meta:?}, frame {}",
                f.what,
                if frame == Some(&f.input[..]) {
                    "intact"
                } else {
                    "differs"
                }
            ));
        }
    }

    // Per-session counters: IP bytes of what each session relayed, per direction.
    let ip_len = |f: &Fixture| {
        let h = relay_common::packet::parse(&f.input[..]).expect("parses");
        u64::from(h.l4 - h.l3) + u64::from(h.l4_len)
    };
    let mut want_traffic = [[(0u64, 0u64); 2]; 2];
    for f in fixtures.iter().filter(|f| {
        f.verdict == Verdict::Tx && !f.what.starts_with("SOCKS5") && !f.what.starts_with("TCP")
    }) {
        let h = relay_common::packet::parse(&f.input[..]).expect("parses");
        let session = usize::from(h.family == relay_common::packet::FAMILY_V6);
        let direction = if h.src_port == 40000 {
            TO_UPSTREAM
        } else {
            TO_CLIENT
        } as usize;
        want_traffic[session][direction].0 += 1;
        want_traffic[session][direction].1 += ip_len(f);
    }
    for (id, want) in want_traffic.iter().enumerate() {
        let s = dp.session(id as u32).expect("session");
        for (d, (t, want)) in s.traffic.iter().zip(want).enumerate() {
            let got = (t.packets, t.bytes);
            if got != *want {
                failures.push(format!(
                    "session {id} direction {d}: counted {got:?}, want {want:?}"
                ));
            }
        }
    }

    // TCP sessions the kernel opened: their counters, records and what the kernel reported.
    let mut tcp_traffic: BTreeMap<(u32, u32), (u64, u64)> = BTreeMap::new();
    for f in &fixtures {
        if let Some(key) = f.session {
            let e = tcp_traffic.entry(key).or_default();
            e.0 += 1;
            e.1 += ip_len(f);
        }
    }
    for ((id, d), want) in &tcp_traffic {
        let s = dp.session(*id).expect("session");
        let t = s.traffic[*d as usize];
        if (t.packets, t.bytes) != *want {
            failures.push(format!(
                "TCP session {id} direction {d}: counted {:?}, want {want:?}",
                (t.packets, t.bytes)
            ));
        }
    }
    let s = dp.session(12).expect("session");
    if (s.proto, s.origin, s.fin, s.rst, s.acked, s.rule) != (PROTO_TCP, 1, [1, 0], 1, 1, 1) {
        failures.push(format!(
            "TCP session 12: proto {} origin {} fin {:?} rst {} acked {} rule {}, want a \
             kernel-opened TCP session of rule 1 whose client completed the handshake and sent \
             FIN, and whose upstream reset",
            s.proto, s.origin, s.fin, s.rst, s.acked, s.rule
        ));
    }
    // A FIN the relay answered with ICMP instead of relaying it (the client sends it again,
    // smaller) does not start the session's closing.
    let s6 = dp.session(13).expect("session");
    if (s6.fin, s6.rst) != ([0, 0], 0) {
        failures.push(format!(
            "TCP session 13: fin {:?} rst {}, want neither: no FIN or RST was relayed",
            s6.fin, s6.rst
        ));
    }
    // The allow-list rule's session was reset, then reopened by a new SYN: it no longer
    // closes, and counts as unanswered again.
    let again = dp.session(POOL[3].0).expect("session");
    if (again.fin, again.rst, again.acked) != ([0, 0], 0, 0) {
        failures.push(format!(
            "TCP session {}: fin {:?} rst {} acked {}, want a reopened session (none set)",
            POOL[3].0, again.fin, again.rst, again.acked
        ));
    }
    // The rate rule's session saw only its SYN (and no answer): half-open.
    let half = dp.session(POOL[2].0).expect("session");
    if half.acked != 0 || half.answered() {
        failures.push(format!(
            "a session that saw only a SYN counts as answered: {half:?}"
        ));
    }
    let s13 = dp.session(13).expect("session");
    let e = datapath::endpoints(&s13);
    if e != ends(
        TCP6_CLIENT,
        TCP6_FRONT,
        &with_port(TCP6_BACK_IP, 21001),
        TCP6_UPSTREAM,
    ) {
        failures.push(format!("TCP session 13: endpoints {e:?}"));
    }
    let shared = datapath::endpoints(&dp.session(OTHER_POOL_SLOT.0).expect("session"));
    if shared
        != ends(
            TCP_OTHER_CLIENT,
            TCP_OTHER_FRONT,
            &with_port(TCP_BACK_IP, OTHER_POOL_SLOT.1),
            &other_pool_upstream(),
        )
    {
        failures.push(format!("TCP session of another pool: endpoints {shared:?}"));
    }

    let snapshot = Snapshot::from_ebpf(&bpf).expect("counters");
    {
        use relay_common::counters::Open;
        let want = [
            // The four of `POOL`, and the one of another pool on a shared port.
            (Open::Opened, 5),
            (Open::SourceFull, 1),
            (Open::Rate, 1),
            (Open::RuleFull, 1),
            (Open::NotAllowed, 1),
            (Open::PoolEmpty, 1),
            (Open::Raced, 0),
            (Open::RingFull, 0),
        ];
        for (cause, n) in want {
            if snapshot.opens(cause) != n {
                failures.push(format!(
                    "kernel opens {}: {}, want {n}",
                    cause.name(),
                    snapshot.opens(cause)
                ));
            }
        }
    }
    for &reason in Reason::ALL {
        let got = snapshot.reason(reason);
        let (packets, bytes) = expected_counts.get(&reason).copied().unwrap_or_default();
        if (got.packets, got.bytes) != (packets, bytes) {
            failures.push(format!(
                "counter {}: {} packets / {} bytes, want {packets} / {bytes}",
                reason.name(),
                got.packets,
                got.bytes
            ));
        }
    }
    for v in Verdict::ALL {
        let got = snapshot.verdict(v).packets;
        let want = fixtures.iter().filter(|f| f.verdict == v).count() as u64;
        if got != want {
            failures.push(format!("{} verdicts counted {got}, want {want}", v.name()));
        }
    }
    if failures.is_empty() {
        return failures;
    }
    vec![format!(
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    )]
}

#[test]
fn pinned_counters_survive_a_reload() {
    let pin = PinDir::new();
    let frame = udp4().build();
    for round in 1..=2u64 {
        let mut bpf = load(&pin);
        // An unknown flow: counted under no_session in the pinned counters.
        let prog = ebpf::program(&mut bpf).expect("program");
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        })
        .expect("test run");
        let s = Snapshot::from_ebpf(&bpf).expect("counters");
        assert_eq!(
            s.reason(Reason::NoSession).packets,
            round,
            "a reloaded program must reuse the pinned counters"
        );
    }
    let from_pin = Snapshot::from_pin(pin.path()).expect("read pinned counters");
    assert_eq!(from_pin.reason(Reason::NoSession).packets, 2);
}

/// The object the relay loads holds the relay's program and maps only: the benchmark's
/// programs and maps (`macswap`, `sink`, `nat`, `SINK`, `NAT`) are in an object of their own.
#[test]
fn the_relay_object_is_the_relays_only() {
    let pin = PinDir::new();
    let bpf = load(&pin);
    let mut programs: Vec<&str> = bpf.programs().map(|(name, _)| name).collect();
    programs.sort_unstable();
    assert_eq!(programs, ["relay", "session_port", "splice"]);
    let mut maps: Vec<&str> = bpf
        .maps()
        .map(|(name, _)| name)
        .filter(|name| !name.starts_with('.'))
        .collect();
    maps.sort_unstable();
    assert_eq!(
        maps,
        [
            "ALLOW",
            "AYA_LOGS",
            "COUNTERS",
            "EGRESS",
            "EVENTS",
            "FLOWS",
            "FRAGS",
            "HOPS",
            "KERNEL_OPENS",
            "LISTEN",
            "META",
            "NEXTHOPS",
            "NEXTHOP_KEYS",
            "POOL0",
            "POOL1",
            "POOL2",
            "POOL3",
            "PORTS",
            "RATE",
            "RULES",
            "RULE_PORTS",
            "SESSIONS",
            "SLOWPATH",
            "SLOW_SOCKETS",
            "SOURCE_FULL",
            "SPLICE",
            "SPLICE_BEHIND",
            "SPLICE_COUNTS",
            "SPLICE_LINKS",
            "SPLICE_TOTALS",
            "TCP_SLOW",
            "USERS",
            "USER_LIMITS",
            "USER_SPENT",
        ]
    );
}

/// Per-user limits in the verified program: a SOCKS5 user's datagrams are carried while its
/// lease allows them and dropped, counted under the reason, past its quota or rate or while
/// it is blocked; what is carried is counted in `USER_SPENT`.
#[test]
fn user_limits_in_the_verified_program() {
    let ns = support::Netns::new("fxl");
    ns.ip(&["link", "set", "lo", "up"]);
    let failures = ns.run(run_user_limits);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run_user_limits() -> Vec<String> {
    use relay_common::limits::{UserLimit, LIMIT_BLOCKED, LIMIT_COUNT, LIMIT_QUOTA, LIMIT_RATE};
    let pin = PinDir::new();
    let mut bpf = load(&pin);
    let dp = Datapath::take(&mut bpf).expect("maps");
    dp.set_nexthop(0, &TO_UPSTREAM_HOP).unwrap();
    dp.set_nexthop(1, &TO_CLIENT_HOP).unwrap();
    // User 2's association (record 8) and one of user 3, who has no limits (record 9).
    let e = ends(SOCKS_CLIENT, SOCKS_FRONT, SOCKS_BACK, SOCKS_DEST);
    let rule = |user: u16| relay_common::session::RULE_SOCKS | user;
    dp.install(
        8,
        &datapath::record(&e, rule(2), [0, 1], 1),
        &SlowPath::default(),
    )
    .unwrap();
    let e6 = ends(SOCKS6_CLIENT, SOCKS6_FRONT, SOCKS6_BACK, SOCKS6_DEST);
    dp.install(
        9,
        &datapath::record(&e6, rule(3), [0, 1], 1),
        &SlowPath::default(),
    )
    .unwrap();
    let prog = ebpf::program(&mut bpf).expect("program");
    let data = [7u8; 100];
    let up = strip("", SOCKS_CLIENT, SOCKS_FRONT, SOCKS_BACK, SOCKS_DEST, &data);
    let down = prepend("", SOCKS_CLIENT, SOCKS_FRONT, SOCKS_BACK, SOCKS_DEST, &data);
    let up6 = strip(
        "",
        SOCKS6_CLIENT,
        SOCKS6_FRONT,
        SOCKS6_BACK,
        SOCKS6_DEST,
        &data,
    );
    let len = data.len() as u64;
    let mut failures = Vec::new();
    let mut run = |what: &str, f: &Fixture, want: Result<(), Reason>| {
        let (verdict, out) = test_run(prog, what, &f.input);
        let (want_verdict, want_out) = match want {
            Ok(()) => (Some(Verdict::Tx), f.output.clone().unwrap()),
            Err(reason) => (Some(reason.verdict()), f.input.clone()),
        };
        if verdict != want_verdict || out != want_out {
            failures.push(format!(
                "{what}: verdict {verdict:?}, want {want_verdict:?} ({want:?})"
            ));
        }
    };
    // Counted only: carried both ways.
    let count = UserLimit {
        flags: LIMIT_COUNT,
        ..UserLimit::default()
    };
    dp.set_user_limit(2, &count).unwrap();
    run("counted, to the destination", &up, Ok(()));
    run("counted, to the client", &down, Ok(()));
    // Toward the client the SOCKS5 header is counted too (as the controller counts it).
    let len_down = len + 10;
    // A quota lease of one more datagram toward the client: it passes, the next is dropped.
    let spent = dp.user_spent(2);
    let quota = UserLimit {
        quota_allow: spent[0] + spent[1] + len_down,
        flags: LIMIT_COUNT | LIMIT_QUOTA,
        ..count
    };
    dp.set_user_limit(2, &quota).unwrap();
    run("within the quota lease", &down, Ok(()));
    run("past the quota lease", &up, Err(Reason::UserOverQuota));
    run(
        "past the quota lease, the other way",
        &down,
        Err(Reason::UserOverQuota),
    );
    // A rate lease of one more datagram toward the client, none toward the destination.
    let spent = dp.user_spent(2);
    let rate = UserLimit {
        allow: [spent[0], spent[1] + len_down],
        flags: LIMIT_COUNT | LIMIT_RATE,
        ..count
    };
    dp.set_user_limit(2, &rate).unwrap();
    run("within the rate lease", &down, Ok(()));
    run("past the rate lease", &down, Err(Reason::UserOverRate));
    run("no rate lease this way", &up, Err(Reason::UserOverRate));
    dp.set_user_limit(
        2,
        &UserLimit {
            flags: LIMIT_COUNT | LIMIT_BLOCKED,
            ..count
        },
    )
    .unwrap();
    run("blocked", &up, Err(Reason::UserBlocked));
    // A user without limits (flags 0): carried, not counted by the kernel.
    run("a user without limits", &up6, Ok(()));
    let got = dp.user_spent(2);
    if got != [len, 3 * len_down] {
        failures.push(format!(
            "USER_SPENT[2] = {got:?}, want [{len}, {}]",
            3 * len_down
        ));
    }
    if dp.user_spent(3) != [0, 0] {
        failures.push(format!(
            "USER_SPENT[3] = {:?}, want nothing",
            dp.user_spent(3)
        ));
    }
    let s = Snapshot::from_ebpf(&bpf).expect("counters");
    for (reason, n) in [
        (Reason::UserOverQuota, 2),
        (Reason::UserOverRate, 2),
        (Reason::UserBlocked, 1),
        (Reason::RelayedTx, 5),
    ] {
        if s.reason(reason).packets != n {
            failures.push(format!(
                "{}: {} packets, want {n}",
                reason.name(),
                s.reason(reason).packets
            ));
        }
    }
    failures
}
