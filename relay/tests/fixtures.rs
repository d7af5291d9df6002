//! BPF_PROG_TEST_RUN fixtures: hand-built frames through the real, verified XDP program.
//!
//! Each row is (what, input frame, expected verdict, expected output frame, reason counted).
//! All rows run, then every mismatch is reported at once; the counters the program kept are
//! checked against the reasons the table expects.

mod support;

use std::{collections::BTreeMap, net::SocketAddr};

use aya::programs::{TestRun as _, TestRunOptions};
use relay::{ebpf, pin, stats::Snapshot};
use relay_common::{
    counters::{Reason, Verdict},
    frame::Frame,
    packet::PROTO_TCP,
};
use support::PinDir;

struct Fixture {
    what: &'static str,
    input: Vec<u8>,
    verdict: Verdict,
    /// `None`: the frame must leave untouched.
    output: Option<Vec<u8>>,
    reason: Reason,
}

/// A frame the relay does not own: passed to the kernel byte for byte.
fn pass(what: &'static str, input: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        what,
        input,
        verdict: Verdict::Pass,
        output: None,
        reason,
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn udp4() -> Frame {
    Frame::udp(
        sa("198.18.1.2:40000"),
        sa("198.18.1.1:51820"),
        b"handshake initiation",
    )
}

fn udp6() -> Frame {
    Frame::udp(
        sa("[fd00:5a:1::2]:40000"),
        sa("[fd00:5a:1::1]:51820"),
        b"v6 datagram",
    )
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
    pin::prepare(&pin.0).expect("bpffs");
    ebpf::load(&pin.0, 0).expect("the verifier accepts the program")
}

#[test]
fn fixtures_through_the_verified_program() {
    let pin = PinDir::new();
    let mut bpf = load(&pin);
    let prog = ebpf::program(&mut bpf).expect("program");
    let mut failures = Vec::new();
    let mut expected_counts: BTreeMap<Reason, (u64, u64)> = BTreeMap::new();
    let fixtures = table();
    for f in &fixtures {
        let mut out = vec![0u8; f.input.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&f.input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN failed: {e}", f.what));
        out.truncate(r.data_size_out as usize);
        let verdict = Verdict::from_action(r.return_value);
        let want_out = f.output.as_ref().unwrap_or(&f.input);
        if verdict != Some(f.verdict) {
            failures.push(format!(
                "{}: verdict {:?}, want {:?}",
                f.what, verdict, f.verdict
            ));
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

    let snapshot = Snapshot::from_ebpf(&bpf).expect("counters");
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
    let pass = snapshot.verdict(Verdict::Pass).packets;
    let want_pass = fixtures
        .iter()
        .filter(|f| f.verdict == Verdict::Pass)
        .count() as u64;
    if pass != want_pass {
        failures.push(format!("pass verdicts counted {pass}, want {want_pass}"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn pinned_counters_survive_a_reload() {
    let pin = PinDir::new();
    let frame = udp4().build();
    for round in 1..=2u64 {
        let mut bpf = load(&pin);
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
    let from_pin = Snapshot::from_pin(&pin.0).expect("read pinned counters");
    assert_eq!(from_pin.reason(Reason::NoSession).packets, 2);
}
