//! `relay-bench`: what `cargo xtask bench` runs. Measures, in one run:
//!
//! 1. in-kernel cost per packet of each fast path under BPF_PROG_TEST_RUN, next to a program
//!    that only swaps MAC addresses and returns XDP_TX, interleaved round by round;
//! 2. the cost of the client-to-upstream path as the session table grows, and the kernel
//!    memory the session maps take per session.
//!
//! BPF_PROG_TEST_RUN repeats a program on the same buffer, so each path is measured on frames
//! whose rewritten form is the next iteration's valid input: two mirrored forward sessions,
//! and chains of SOCKS5 associations for strip and prepend. The reason counters then prove
//! that every iteration took the path being measured.

mod e2e;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use aya::{
    programs::{TestRun as _, TestRunOptions, Xdp},
    Ebpf,
};
use relay::{
    datapath::{self, Datapath, Endpoints},
    ebpf,
    stats::Snapshot,
};
use relay_common::{
    counters::{Reason, Verdict},
    frame::Frame,
    session::{Nexthop, SlowPath, RULE_SOCKS},
};
use relay_lab::{sa, BpfMount};
use serde::Serialize;

/// A session's four endpoints, written as text.
fn ends(client: &str, front: &str, back: &str, upstream: &str) -> Endpoints {
    Endpoints {
        client: sa(client),
        front: sa(front),
        back: sa(back),
        upstream: sa(upstream),
    }
}

/// Out of loopback, the interface BPF_PROG_TEST_RUN pretends frames arrive on: XDP_TX.
const HOP: Nexthop = Nexthop {
    ifindex: 1,
    mtu: 1500,
    src_mac: [0x02, 0, 0, 0, 0, 1],
    dst_mac: [0x02, 0, 0, 0, 0, 2],
    _pad: [0; 2],
};

/// SOCKS5 chain length (and repeat count for the SOCKS5 paths).
const CHAIN: u32 = 16;
/// Repeats per call for the other paths (below the TTL of 255 the frames start with).
const REPEAT: u32 = 200;

/// One loaded object with its maps in a bpffs of its own (unmounted on drop, which frees the
/// maps: a million-session table does not outlive its measurement).
struct Bench {
    dp: Datapath,
    bpf: Ebpf,
    /// The benchmark object, with the MAC-swap reference program.
    reference: Ebpf,
    _held: e2e::Dispatcher,
    _pins: BpfMount,
    next_id: u32,
}

impl Bench {
    fn new(capacity: u32) -> anyhow::Result<Bench> {
        let pins = BpfMount::new(e2e::PREFIX)?;
        let mut opts = ebpf::LoadOptions::new(&pins.path);
        opts.capacity = capacity;
        opts.session_ports = Some((20000, 29999));
        opts.socks_ports = Some((30000, 31999));
        let mut bpf = ebpf::load(&opts)?;
        let mut reference = e2e::load(&["macswap"])?;
        let dp = Datapath::take(&mut bpf)?;
        dp.set_nexthop(0, &HOP)?;
        let held =
            e2e::Dispatcher::hold(&mut [(&mut bpf, &["relay"]), (&mut reference, &["macswap"])])?;
        Ok(Bench {
            dp,
            bpf,
            reference,
            _held: held,
            _pins: pins,
            next_id: 0,
        })
    }

    fn install(&mut self, e: &Endpoints, rule: u16) -> anyhow::Result<()> {
        let record = datapath::record(e, rule, [0, 0], 1);
        self.dp
            .install(self.next_id, &record, &SlowPath::default())?;
        self.next_id += 1;
        Ok(())
    }

    fn program(&self, name: &str) -> anyhow::Result<&Xdp> {
        let program = match self.bpf.program(name) {
            Some(p) => p,
            None => self.reference.program(name).context("program")?,
        };
        Ok(program.try_into()?)
    }

    /// Runs `frame` through `program` `calls` times with `repeat`; returns the per-packet
    /// times the kernel reported for each call.
    fn run(
        &self,
        program: &str,
        frame: &[u8],
        repeat: u32,
        calls: u32,
        want: Verdict,
    ) -> anyhow::Result<Vec<f64>> {
        let prog = self.program(program)?;
        let mut out = vec![0u8; frame.len() + 512];
        let mut times = Vec::with_capacity(calls as usize);
        for _ in 0..calls {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    repeat,
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN")?;
            if Verdict::from_action(r.return_value) != Some(want) {
                bail!("{program}: verdict {} instead of {want:?}", r.return_value);
            }
            times.push(r.duration.as_nanos() as f64);
        }
        Ok(times)
    }

    fn counters(&self) -> anyhow::Result<Snapshot> {
        Snapshot::from_ebpf(&self.bpf)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Two mirrored sessions: each one's rewritten frame is the other's input, both ways.
fn install_cycle(b: &mut Bench) -> anyhow::Result<()> {
    b.install(
        &ends(
            "198.18.1.2:40000",
            "198.18.1.1:51820",
            "198.18.2.1:20000",
            "198.18.2.2:51821",
        ),
        0,
    )?;
    b.install(
        &ends(
            "198.18.2.1:20000",
            "198.18.2.2:51821",
            "198.18.1.2:40000",
            "198.18.1.1:51820",
        ),
        0,
    )
}

/// SOCKS5 chains: stripping one header after another, and prepending one after another.
fn install_socks_chains(b: &mut Bench) -> anyhow::Result<()> {
    let user = RULE_SOCKS | 1;
    for k in 1..=CHAIN as u16 {
        let client = if k == 1 {
            "198.18.1.2:40000".to_owned()
        } else {
            format!("198.18.2.1:{}", 30000 + k - 2)
        };
        let front = if k == 1 {
            "198.18.1.1".to_owned()
        } else {
            "198.18.2.2".to_owned()
        };
        let e = Endpoints {
            client: sa(&client),
            front: SocketAddr::new(front.parse()?, 30000 + k - 1),
            back: SocketAddr::new("198.18.2.1".parse()?, 30000 + k - 1),
            upstream: SocketAddr::new("198.18.2.2".parse()?, 30000 + k),
        };
        b.install(&e, user)?;
    }
    for k in 1..=CHAIN as u16 {
        let upstream = if k == 1 {
            "198.18.3.2:53".to_owned()
        } else {
            format!("198.18.3.1:{}", 31000 + k - 2)
        };
        let back_addr = if k == 1 { "198.18.3.3" } else { "198.18.3.4" };
        let e = Endpoints {
            client: SocketAddr::new("198.18.3.4".parse()?, 31000 + k),
            front: SocketAddr::new("198.18.3.1".parse()?, 31000 + k - 1),
            back: SocketAddr::new(back_addr.parse()?, 31000 + k - 1),
            upstream: sa(&upstream),
        };
        b.install(&e, user)?;
    }
    Ok(())
}

/// The frames each path starts from.
fn frames() -> BTreeMap<&'static str, Vec<u8>> {
    let payload = [0x42u8; 18]; // 64-byte frames for the forward paths
    let mut f = BTreeMap::new();
    f.insert(
        "reference",
        Frame::udp(sa("198.18.1.2:40000"), sa("198.18.1.1:51820"), &payload).build(),
    );
    f.insert(
        "forward_to_upstream",
        Frame::udp(sa("198.18.1.2:40000"), sa("198.18.1.1:51820"), &payload)
            .hop_limit(255)
            .build(),
    );
    f.insert(
        "forward_to_client",
        Frame::udp(sa("198.18.2.2:51821"), sa("198.18.2.1:20000"), &payload)
            .hop_limit(255)
            .build(),
    );
    f.insert(
        "not_ours",
        Frame::udp(sa("198.18.9.9:1234"), sa("198.18.1.1:4321"), &payload).build(),
    );
    let mut nested = Vec::new();
    for k in 1..=CHAIN as u16 {
        let hop = SocketAddr::new("198.18.2.2".parse().unwrap(), 30000 + k);
        nested.extend_from_slice(&relay_common::frame::socks5_udp_header(hop, 0));
    }
    nested.extend_from_slice(&payload);
    f.insert(
        "socks5_strip",
        Frame::udp(sa("198.18.1.2:40000"), sa("198.18.1.1:30000"), &nested)
            .hop_limit(255)
            .build(),
    );
    f.insert(
        "socks5_prepend",
        Frame::udp(sa("198.18.3.2:53"), sa("198.18.3.3:31000"), &payload)
            .hop_limit(255)
            .build(),
    );
    f
}

#[derive(Serialize)]
struct PathCost {
    path: &'static str,
    ns_per_packet: f64,
    ratio_to_reference: f64,
    packets: u64,
}

#[derive(Serialize)]
struct ScalePoint {
    sessions: u32,
    ns_per_packet: f64,
    reference_ns_per_packet: f64,
    ratio_to_reference: f64,
    kernel_bytes_per_session: f64,
}

#[derive(Serialize)]
struct Results {
    machine: String,
    kernel: String,
    smoke: bool,
    in_kernel: Vec<PathCost>,
    scale: Vec<ScalePoint>,
    end_to_end: Vec<e2e::PeerResult>,
    new_sessions: e2e::SessionRate,
    /// TCP sessions the kernel opened (SYNs from new sources through one rule).
    kernel_sessions: e2e::SessionRate,
    /// UDP sessions the kernel opened (first datagrams from new sources through one rule).
    udp_kernel_sessions: e2e::SessionRate,
    restart: e2e::RestartLoss,
    /// TCP bulk transfer and new connections through the relay and its peers.
    tcp: Vec<e2e::TcpResult>,
    targets: Vec<Target>,
}

/// One of the project's performance targets, as this run measured it.
#[derive(Serialize)]
struct Target {
    target: &'static str,
    measured: String,
    met: bool,
}

/// The relay's XDP rate over a peer's, both 64-byte IPv4 (or the smallest frames measured).
fn e2e_ratio(e: &[e2e::PeerResult], kind: &str, peer: &str) -> Option<f64> {
    let row = |name: &str| {
        e.iter()
            .filter(|p| p.peer == name && p.kind == kind && p.family == "IPv4")
            .min_by_key(|p| p.frame_bytes)
    };
    Some(row(e2e::RELAY_XDP)?.mpps / row(peer)?.mpps)
}

fn targets(r: &Results) -> Vec<Target> {
    let (in_kernel, scale, e) = (&r.in_kernel, &r.scale, &r.end_to_end);
    let (kernel, udp_kernel) = (&r.kernel_sessions, &r.udp_kernel_sessions);
    let restart = &r.restart;
    let mut t = Vec::new();
    let mut ratio = |target: &'static str, got: Option<f64>, ok: fn(f64) -> bool, unit: &str| {
        if let Some(v) = got {
            t.push(Target {
                target,
                measured: format!("{v:.2}{unit}"),
                met: ok(v),
            });
        }
    };
    let forward = in_kernel
        .iter()
        .filter(|c| c.path.starts_with("forward"))
        .map(|c| c.ratio_to_reference)
        .reduce(f64::max);
    ratio(
        "forward path ≤ 3x MAC-swap XDP_TX (in kernel)",
        forward,
        |v| v <= 3.0,
        "x",
    );
    let cost = |name: &str| {
        in_kernel
            .iter()
            .find(|c| c.path == name)
            .map(|c| c.ns_per_packet)
    };
    let socks = in_kernel
        .iter()
        .filter(|c| c.path == "socks5_strip" || c.path == "socks5_prepend")
        .map(|c| c.ratio_to_reference)
        .reduce(f64::max);
    ratio(
        "SOCKS5 strip and prepend ≤ 4x MAC-swap XDP_TX (in kernel)",
        socks,
        |v| v <= 4.0,
        "x",
    );
    let limits = ["strip", "prepend"]
        .iter()
        .filter_map(|p| Some(cost(&format!("socks5_{p}_limited"))? / cost(&format!("socks5_{p}"))?))
        .reduce(f64::max);
    ratio(
        "SOCKS5 datagram with per-user limits ≤ 1.3x the same without limits (in kernel)",
        limits,
        |v| v <= 1.3,
        "x",
    );
    let growth = match (scale.first(), scale.last()) {
        (Some(a), Some(b)) if scale.len() > 1 => Some(b.ns_per_packet / a.ns_per_packet),
        _ => None,
    };
    ratio(
        "cost per packet at the largest table ≤ 1.2x at the smallest",
        growth,
        |v| v <= 1.2,
        "x",
    );
    let memory = scale
        .iter()
        .map(|p| p.kernel_bytes_per_session)
        .reduce(f64::max);
    ratio(
        "≤ 256 B of kernel memory per session",
        memory,
        |v| v <= 256.0,
        " B",
    );
    use e2e::{DANTE, FORWARD, NAT, NAT_FIB, NFT, RELAY_OFF, SOCAT, SOCKS};
    /// Target, traffic, peer, and whether the relay's rate over the peer's meets it.
    type PeerTarget = (&'static str, &'static str, &'static str, fn(f64) -> bool);
    let peers: [PeerTarget; 6] = [
        ("≥ 5x nftables DNAT (64 B)", FORWARD, NFT, |v| v >= 5.0),
        (
            "≥ 15x a userspace forwarder: socat (64 B)",
            FORWARD,
            SOCAT,
            |v| v >= 15.0,
        ),
        (
            "≥ 15x a recvmmsg/sendmmsg forwarder: the relay's userspace mode (64 B)",
            FORWARD,
            RELAY_OFF,
            |v| v >= 15.0,
        ),
        (
            "≥ 0.9x a minimal stateless XDP NAT with a fixed next hop (64 B)",
            FORWARD,
            NAT,
            |v| v >= 0.9,
        ),
        (
            "≥ 1.2x a minimal stateless XDP NAT calling bpf_fib_lookup per packet (64 B)",
            FORWARD,
            NAT_FIB,
            |v| v >= 1.2,
        ),
        (
            "≥ 10x dante, SOCKS5 UDP ASSOCIATE (64 B)",
            SOCKS,
            DANTE,
            |v| v >= 10.0,
        ),
    ];
    for (target, kind, peer, ok) in peers {
        ratio(target, e2e_ratio(e, kind, peer), ok, "x");
    }
    // The relay's own rate over the fleet-store relay's: the fleet's per-packet cost relative
    // to the embedded store's.
    ratio(
        "per-packet cost with a fleet store ≤ 1.1x the embedded store's (SOCKS5 UDP, 64 B)",
        e2e_ratio(e, SOCKS, e2e::RELAY_FLEET),
        |v| v <= 1.1,
        "x",
    );
    ratio(
        "≥ 500k new sessions per second through one rule (TCP, opened in the kernel)",
        (kernel.flows > 0).then_some(kernel.sessions_per_second),
        |v| v >= 500_000.0,
        "/s",
    );
    ratio(
        "≥ 500k new sessions per second through one rule (UDP, opened in the kernel)",
        (udp_kernel.flows > 0).then_some(udp_kernel.sessions_per_second),
        |v| v >= 500_000.0,
        "/s",
    );
    // TCP per core as UDP is measured: 64-byte segments on established connections from the
    // generator, the relay's rate over nftables'. (Bulk iperf3 rates and CPU per GB are in
    // `tcp`: there nftables forwards what GRO merged, up to 64 KB per packet.)
    ratio(
        "TCP forward ≥ 4x nftables DNAT (64 B segments of established connections)",
        e2e_ratio(e, e2e::TCP_FORWARD, NFT),
        |v| v >= 4.0,
        "x",
    );
    ratio(
        "zero packets lost to a graceful restart under load (XDP-carried flows)",
        (restart.sent > 0).then_some(restart.lost_to_restart),
        |v| v < 1.0,
        " packets",
    );
    ratio(
        "zero packets lost to a controller crash under load (XDP-carried flows)",
        (restart.crash_sent > 0).then_some(restart.lost_to_crash),
        |v| v < 1.0,
        " packets",
    );
    t
}

/// One path measured in the kernel: its frame, the program, the verdict and reason every
/// iteration must get, and the SOCKS5 user's limits flags while it runs (`None`: untouched).
#[derive(Clone, Copy)]
struct KernelPath {
    name: &'static str,
    frame: &'static str,
    prog: &'static str,
    repeat: u32,
    verdict: Verdict,
    reason: Reason,
    user: Option<u32>,
}

/// In-kernel cost of every path, interleaved with the reference, round by round.
fn kernel_costs(rounds: u32, calls: u32) -> anyhow::Result<Vec<PathCost>> {
    let mut b = Bench::new(64)?;
    install_cycle(&mut b)?;
    install_socks_chains(&mut b)?;
    let frames = frames();
    // The SOCKS5 user's `USER_LIMITS` flags per path: none (a user without limits), or a
    // rate and a quota (leases that are never reached: the cost of checking and counting).
    use relay_common::limits::{LIMIT_COUNT, LIMIT_QUOTA, LIMIT_RATE};
    let unlimited = Some(0);
    let limited = Some(LIMIT_COUNT | LIMIT_RATE | LIMIT_QUOTA);
    let socks = |name, frame, user| KernelPath {
        name,
        frame,
        prog: "relay",
        repeat: CHAIN,
        verdict: Verdict::Tx,
        reason: Reason::RelayedTx,
        user,
    };
    let other = |name, prog, verdict, reason| KernelPath {
        name,
        frame: name,
        prog,
        repeat: REPEAT,
        verdict,
        reason,
        user: None,
    };
    let paths = [
        other("reference", "macswap", Verdict::Tx, Reason::NotIp),
        other(
            "forward_to_upstream",
            "relay",
            Verdict::Tx,
            Reason::RelayedTx,
        ),
        other("forward_to_client", "relay", Verdict::Tx, Reason::RelayedTx),
        other("not_ours", "relay", Verdict::Pass, Reason::NoSession),
        socks("socks5_strip", "socks5_strip", unlimited),
        socks("socks5_prepend", "socks5_prepend", unlimited),
        socks("socks5_strip_limited", "socks5_strip", limited),
        socks("socks5_prepend_limited", "socks5_prepend", limited),
    ];
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut packets: BTreeMap<&str, u64> = BTreeMap::new();
    for _ in 0..rounds {
        for p in &paths {
            let KernelPath {
                name,
                frame,
                prog,
                repeat,
                verdict,
                reason,
                user,
            } = *p;
            if let Some(flags) = user {
                let lease = relay_common::limits::UserLimit {
                    allow: [u64::MAX; 2],
                    quota_allow: u64::MAX,
                    flags,
                    _pad: 0,
                };
                b.dp.set_user_limit(1, &lease)?;
            }
            let before = b.counters()?.reason(reason).packets;
            let t = b.run(prog, &frames[frame], repeat, calls, verdict)?;
            if prog == "relay" {
                // Every iteration of every call must have taken the path measured.
                let got = b.counters()?.reason(reason).packets - before;
                let want = u64::from(repeat) * u64::from(calls);
                if got != want {
                    bail!(
                        "{name}: {got} of {want} iterations were counted as {}",
                        reason.name()
                    );
                }
            }
            times.entry(name).or_default().extend(t);
            *packets.entry(name).or_default() += u64::from(repeat) * u64::from(calls);
        }
    }
    let reference = median(times["reference"].clone());
    Ok(paths
        .iter()
        .map(|KernelPath { name, .. }| {
            let ns = median(times[name].clone());
            PathCost {
                path: name,
                ns_per_packet: ns,
                ratio_to_reference: ns / reference,
                packets: packets[name],
            }
        })
        .collect())
}

/// The client-to-upstream cost with `sessions` sessions in the maps, and their memory.
fn scale_point(sessions: u32, calls: u32) -> anyhow::Result<ScalePoint> {
    let mut b = Bench::new(sessions + 2)?;
    install_cycle(&mut b)?;
    // Fill the table: IPv4 clients, one session each.
    for i in 0..sessions.saturating_sub(2) {
        let client = SocketAddr::from((
            [
                10 + (i >> 24) as u8,
                (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ],
            40000,
        ));
        let e = Endpoints {
            client,
            front: sa("198.18.1.1:51820"),
            back: SocketAddr::new("198.18.2.1".parse()?, 20000 + (i % 10000) as u16),
            upstream: SocketAddr::from((
                [172, 16 + ((i >> 16) & 0xf) as u8, (i >> 8) as u8, i as u8],
                51820,
            )),
        };
        b.install(&e, 0)?;
    }
    let frames = frames();
    let mut ours = Vec::new();
    let mut reference = Vec::new();
    for _ in 0..5 {
        reference.extend(b.run("macswap", &frames["reference"], REPEAT, calls, Verdict::Tx)?);
        ours.extend(b.run(
            "relay",
            &frames["forward_to_upstream"],
            REPEAT,
            calls,
            Verdict::Tx,
        )?);
    }
    let (ns, r) = (median(ours), median(reference));
    Ok(ScalePoint {
        sessions,
        ns_per_packet: ns,
        reference_ns_per_packet: r,
        ratio_to_reference: ns / r,
        kernel_bytes_per_session: b.dp.session_memory() as f64 / f64::from(sessions + 2),
    })
}

/// One row per peer of a bulk test and its companion (new connections, or messages).
fn tcp_table(m: &mut String, tcp: &[e2e::TcpResult], (bulk, other): (&str, &str), header: &str) {
    let _ = writeln!(m, "{header}");
    let _ = writeln!(m, "|---|---:|---:|---:|---:|");
    for b in tcp.iter().filter(|t| t.test == bulk) {
        let c = tcp.iter().find(|t| t.peer == b.peer && t.test == other);
        let _ = writeln!(
            m,
            "| {} | {:.2} | {:.2} | {} | {} |",
            b.peer,
            b.rate,
            b.cpu,
            c.map_or("—".into(), |c| format!("{:.0} ({})", c.rate, c.detail)),
            c.map_or("—".into(), |c| format!("{:.1}", c.cpu)),
        );
    }
    let _ = writeln!(m);
}

fn markdown(r: &Results) -> String {
    let mut m = String::new();
    if !r.targets.is_empty() {
        let _ = writeln!(m, "## Against the targets\n");
        let _ = writeln!(m, "| target | this run | |");
        let _ = writeln!(m, "|---|---:|---|");
        for t in &r.targets {
            let verdict = if t.met { "met" } else { "**not met**" };
            let _ = writeln!(m, "| {} | {} | {verdict} |", t.target, t.measured);
        }
        let _ = writeln!(m);
    }
    if !r.end_to_end.is_empty() {
        let _ = writeln!(
            m,
            "## End to end: packets per second through one relay (veth, one run)\n"
        );
        let _ = writeln!(
            m,
            "| traffic | peer | frame | delivered | Mpps | CPU ns/packet | relay (XDP) is × faster |"
        );
        let _ = writeln!(m, "|---|---|---:|---:|---:|---:|---:|");
        for p in &r.end_to_end {
            let ours = r
                .end_to_end
                .iter()
                .find(|o| {
                    o.peer == e2e::RELAY_XDP
                        && o.kind == p.kind
                        && o.family == p.family
                        && o.frame_bytes == p.frame_bytes
                })
                .map(|o| format!("{:.1}", o.mpps / p.mpps))
                .unwrap_or_else(|| "—".to_owned());
            let _ = writeln!(
                m,
                "| {} {} | {} | {} B | {} of {} | {:.3} | {:.0} | {ours} |",
                p.kind,
                p.family,
                p.peer,
                p.frame_bytes,
                p.delivered,
                p.sent,
                p.mpps,
                p.cpu_ns_per_packet,
            );
        }
        let _ = writeln!(m);
    }
    for (k, what) in [
        (&r.kernel_sessions, "TCP SYNs"),
        (&r.udp_kernel_sessions, "UDP first datagrams"),
    ] {
        if k.flows > 0 {
            let _ = writeln!(
                m,
                "## New sessions opened in the kernel: {what}\n\n{} {what} from new sources through one rule: {} sessions opened in {:.3} s: {:.0} sessions/s\n",
                k.flows, k.opened, k.seconds, k.sessions_per_second
            );
        }
    }
    if !r.tcp.is_empty() {
        let _ = writeln!(
            m,
            "## TCP forward: bulk transfer and new connections (veth, one run)\n\n\
             Bulk: one iperf3 stream; CPU is the whole machine's busy time per GB moved, \
             iperf3's client and server included (the same for every peer). Connections: \
             connect, one byte each way, close, two at a time; CPU per connection likewise.\n"
        );
        tcp_table(
            &mut m,
            &r.tcp,
            ("bulk", "connections"),
            "| peer | bulk Gbit/s | CPU s/GB | connections/s | CPU µs/connection |",
        );
        let _ = writeln!(
            m,
            "## SOCKS5 CONNECT (veth, one run)\n\nOne CONNECT each: bulk bytes one way \
             (counted at the far end), then 1 KB request/response messages on another. CPU as \
             above, the client and server included.\n"
        );
        tcp_table(
            &mut m,
            &r.tcp,
            ("connect bulk", "connect messages"),
            "| peer | bulk Gbit/s | CPU s/GB | 1 KB round trips/s | CPU µs/round trip |",
        );
    }
    let n = &r.new_sessions;
    if n.flows > 0 {
        let _ = writeln!(
            m,
            "## New sessions from real sockets\n\n{} client sockets each sent a first datagram at once; the controller counted {} of them opened (taken in from the kernel's events; no socket each since 2032c26) in {:.3} s: {:.0} sessions/s\n",
            n.flows, n.opened, n.seconds, n.sessions_per_second
        );
    }
    let x = &r.restart;
    if x.sent > 0 {
        let _ = writeln!(
            m,
            "## A graceful restart under load\n\nA successor took over (sockets, XDP link) in \
             {:.0} ms in the middle of a blast through the forward rule: {} of {} frames \
             delivered; the same blast without a restart: {} of {}. Lost to the restart: {:.0} \
             packets.\n\nThe same blast with the controller killed (SIGKILL) in its middle and a \
             new one started at once, which was relaying {:.0} ms after its start: {} of {} \
             delivered. Lost to the crash: {:.0} packets.\n",
            x.handover_ms,
            x.delivered,
            x.sent,
            x.baseline_delivered,
            x.baseline_sent,
            x.lost_to_restart,
            x.crash_takeover_ms,
            x.crash_delivered,
            x.crash_sent,
            x.lost_to_crash
        );
    }
    let _ = writeln!(m, "## In-kernel cost per packet (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        m,
        "| path | ns/packet | × MAC-swap reference | packets measured |"
    );
    let _ = writeln!(m, "|---|---:|---:|---:|");
    for c in &r.in_kernel {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {:.2} | {} |",
            c.path, c.ns_per_packet, c.ratio_to_reference, c.packets
        );
    }
    let _ = writeln!(m, "\n## Cost and memory as the session table grows\n");
    let _ = writeln!(m, "| sessions | ns/packet (client to upstream) | × reference | × cost at the smallest table | kernel bytes/session |");
    let _ = writeln!(m, "|---:|---:|---:|---:|---:|");
    let base = r.scale.first().map_or(f64::NAN, |p| p.ns_per_packet);
    for p in &r.scale {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {:.2} | {:.2} | {:.0} |",
            p.sessions,
            p.ns_per_packet,
            p.ratio_to_reference,
            p.ns_per_packet / base,
            p.kernel_bytes_per_session
        );
    }
    let _ = writeln!(
        m,
        "\nMachine: {} — kernel {}{}",
        r.machine,
        r.kernel,
        if r.smoke {
            " — smoke run (numbers not meaningful)"
        } else {
            ""
        }
    );
    m
}

/// A small SVG line chart: cost per packet against session count (log scale).
fn plot(r: &Results) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let xs: Vec<f64> = r
        .scale
        .iter()
        .map(|p| f64::from(p.sessions).log10())
        .collect();
    let ymax = r
        .scale
        .iter()
        .map(|p| p.ns_per_packet.max(p.reference_ns_per_packet))
        .fold(1.0, f64::max)
        * 1.2;
    let (xmin, xmax) = (
        xs.first().copied().unwrap_or(0.0),
        xs.last()
            .copied()
            .unwrap_or(1.0)
            .max(xs.first().copied().unwrap_or(0.0) + 1.0),
    );
    let px = |x: f64| pad + (x - xmin) / (xmax - xmin) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - y / ymax * (h - 2.0 * pad);
    let line = |vals: Vec<f64>, color: &str| {
        let pts: Vec<String> = xs
            .iter()
            .zip(&vals)
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let dots: String = xs
            .iter()
            .zip(&vals)
            .map(|(x, y)| {
                format!(
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#,
                    px(*x),
                    py(*y)
                )
            })
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>{dots}"#,
            pts.join(" ")
        )
    };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">relay: in-kernel cost per packet vs sessions</text><line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/><text x="{}" y="{}" text-anchor="middle">sessions (log scale)</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">ns per packet</text>"#,
        w / 2.0,
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for p in &r.scale {
        let x = px(f64::from(p.sessions).log10());
        svg += &format!(
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            h - pad + 16.0,
            p.sessions
        );
    }
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        svg += &format!(
            r#"<text x="{}" y="{:.1}" text-anchor="end">{:.0}</text>"#,
            pad - 6.0,
            py(y) + 4.0,
            y
        );
    }
    svg += &line(r.scale.iter().map(|p| p.ns_per_packet).collect(), "#c0392b");
    svg += &line(
        r.scale.iter().map(|p| p.reference_ns_per_packet).collect(),
        "#7f8c8d",
    );
    svg += &format!(
        r##"<text x="{}" y="{}" fill="#c0392b">relay, client to upstream</text><text x="{}" y="{}" fill="#7f8c8d">MAC-swap reference</text></svg>"##,
        w - 230.0,
        pad + 10.0,
        w - 230.0,
        pad + 28.0
    );
    svg
}

/// `kernel_only`: only the BPF_PROG_TEST_RUN parts (in-kernel cost and scale), for quick
/// comparisons while working on the XDP program.
fn run(out: &Path, smoke: bool, kernel_only: bool) -> anyhow::Result<()> {
    relay::system::require_privileges()?;
    let (rounds, calls, sizes): (u32, u32, &[u32]) = if smoke {
        (1, 20, &[1_000, 10_000])
    } else {
        (5, 400, &[1_000, 10_000, 100_000, 1_000_000])
    };
    eprintln!("[bench] in-kernel cost of each path ({rounds} rounds of {calls} calls)");
    let in_kernel = kernel_costs(rounds, calls)?;
    let mut scale = Vec::new();
    for &n in sizes {
        eprintln!("[bench] {n} sessions");
        scale.push(scale_point(n, calls)?);
    }
    eprintln!("[bench] end to end: generator -> relay -> sink, and the peers");
    let relay_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("relay"))
        .context("no directory for the relay binary")?;
    // Each session holds a socket in the relay and one in this process's client.
    relay::system::raise_fd_limit(1 << 20);
    let pins = BpfMount::new(e2e::PREFIX)?;
    let e = if kernel_only {
        e2e::E2e::default()
    } else {
        e2e::run(&relay_bin, &pins, smoke)?
    };
    let e2e::E2e {
        peers: end_to_end,
        new_sessions,
        kernel_sessions,
        udp_kernel_sessions,
        restart,
        tcp,
    } = e;
    let mut results = Results {
        machine: format!(
            "{} CPUs, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| c
                    .lines()
                    .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned)))
                .unwrap_or_default()
        ),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        smoke,
        targets: Vec::new(),
        in_kernel,
        scale,
        end_to_end,
        new_sessions,
        kernel_sessions,
        udp_kernel_sessions,
        restart,
        tcp,
    };
    results.targets = targets(&results);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = markdown(&results);
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(out.join("cost_vs_sessions.svg"), plot(&results))?;
    println!("{md}");
    eprintln!(
        "[bench] wrote {}/results.json, results.md, cost_vs_sessions.svg",
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    // Quiet unless RUST_LOG asks (e.g. RUST_LOG=debug for a refused program's verifier log).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let mut smoke = false;
    let mut kernel_only = false;
    let mut out = PathBuf::from("target/bench");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--kernel-only" => kernel_only = true,
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            other => {
                eprintln!("relay-bench: unknown argument {other:?} (use --smoke, --kernel-only, --out DIR)");
                return ExitCode::from(2);
            }
        }
    }
    let result = run(&out, smoke, kernel_only);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
