//! End-to-end packets per second through a namespace topology (generator, relay, sink), for
//! the relay and its peers in the same run: the relay with XDP, the relay without it, nftables
//! DNAT with masquerade (kernel conntrack forwarding), and socat (a userspace forwarder).
//!
//! The generator is the `generate` XDP program run with BPF_PROG_RUN in live-frames mode from
//! the client namespace: it transmits a prepared UDP frame out of the client's interface,
//! again and again (pktgen is not in this kernel). The sink is the `sink` XDP program on the
//! upstream's interface, which counts UDP and drops it. Packets per second are what reached
//! the sink divided by the generator's wall time; CPU per packet is the machine's busy time
//! (/proc/stat) over the same interval divided by those packets.

use std::{
    fs::File,
    net::UdpSocket,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use relay::lab::{self, BpfMount, Netns};
use relay_common::{counters::Counter, frame::Frame};
use serde::Serialize;

/// Prefix of everything the benchmark creates (swept by `cargo xtask test` after a kill).
pub const PREFIX: &str = "rlyb";

fn mac(ns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let v: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", iface])?)?;
    let s = v[0]["address"].as_str().context("no MAC address")?;
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

/// A child process, stopped (SIGTERM, then SIGKILL) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `relay run ARGS` in `ns`, once it says it is running.
fn relay(bin: &Path, ns: &Netns, pins: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let log = std::env::temp_dir().join(format!("{}.log", lab::unique(PREFIX, "log")));
    let child = ns
        .command(bin)
        .arg("run")
        .arg("--pin-dir")
        .arg(pins)
        .args(args)
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()?;
    let p = Proc(child);
    let start = Instant::now();
    let mut text = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("relay running") {
            let _ = std::fs::remove_file(&log);
            return Ok(p);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&log);
    bail!("the relay did not start: {text}")
}

/// How fast the controller opens sessions: `flows` new client flows sent at once.
#[derive(Serialize)]
pub struct SessionRate {
    pub flows: u32,
    pub opened: u64,
    pub seconds: f64,
    pub sessions_per_second: f64,
}

#[derive(Serialize)]
pub struct PeerResult {
    pub peer: &'static str,
    pub frame_bytes: usize,
    pub sent: u64,
    pub delivered: u64,
    pub mpps: f64,
    pub cpu_ns_per_packet: f64,
}

fn busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    stat.lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse::<u64>().ok())
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum()
}

/// Keeps XDP programs in the kernel's XDP dispatcher for the length of a benchmark: each one
/// attached in driver mode to one end of a veth pair in a private namespace. Without this,
/// every BPF_PROG_TEST_RUN call adds the program to the dispatcher and removes it again,
/// waiting for an RCU grace period each time (tens of milliseconds here).
pub struct Dispatcher {
    _ns: Netns,
}

impl Dispatcher {
    pub fn hold(bpf: &mut Ebpf, programs: &[&str]) -> anyhow::Result<Dispatcher> {
        let ns = Netns::new(PREFIX, "d")?;
        for (i, name) in programs.iter().enumerate() {
            let (a, b) = (format!("h{i}a"), format!("h{i}b"));
            ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ns.ip(&["link", "set", &a, "up"])?;
            ns.ip(&["link", "set", &b, "up"])?;
            let prog: &mut Xdp = bpf.program_mut(name).context("program")?.try_into()?;
            // Attach from inside the namespace: netlink and ifindex are per namespace. The
            // link lives as long as `bpf`.
            lab::on_this_thread_in(&ns.path(), || prog.attach(&a, XdpMode::Driver))?
                .with_context(|| format!("attaching {name} to hold it in the dispatcher"))?;
        }
        Ok(Dispatcher { _ns: ns })
    }
}

/// Loads the object's maps in `dir` and the named programs through the verifier.
pub fn load(dir: &Path, programs: &[&str]) -> anyhow::Result<Ebpf> {
    relay::pin::prepare(dir)?;
    let mut bpf = relay::ebpf::load_maps(&relay::ebpf::LoadOptions::new(dir))?;
    for name in programs {
        let p: &mut Xdp = bpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(bpf)
}

struct Topology {
    sink: Ebpf,
    generator: Ebpf,
    _held: Dispatcher,
    client_ifindex: u32,
    client: Netns,
    relay: Netns,
    _upstream: Netns,
}

impl Topology {
    fn new(pins: &BpfMount) -> anyhow::Result<Topology> {
        let client = Netns::new(PREFIX, "c")?;
        let relay_ns = Netns::new(PREFIX, "r")?;
        let upstream = Netns::new(PREFIX, "u")?;
        lab::veth(
            (&client, "eth0", &["198.18.1.2/24"]),
            (&relay_ns, "cli0", &["198.18.1.1/24"]),
        )?;
        lab::veth(
            (&relay_ns, "up0", &["198.18.2.1/24"]),
            (&upstream, "eth0", &["198.18.2.2/24"]),
        )?;
        client.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        upstream.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        relay_ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;

        let mut generator = load(&pins.dir("generator"), &["generate"])?;
        let held = Dispatcher::hold(&mut generator, &["generate"])?;
        let mut sink = load(&pins.dir("sink"), &["sink"])?;
        {
            let p: &mut Xdp = sink.program_mut("sink").context("sink")?.try_into()?;
            lab::on_this_thread_in(&upstream.path(), || p.attach("eth0", XdpMode::Driver))??;
        }
        let client_ifindex =
            lab::on_this_thread_in(&client.path(), || relay::system::ifindex("eth0"))??;
        Ok(Topology {
            sink,
            generator,
            _held: held,
            client_ifindex,
            client,
            relay: relay_ns,
            _upstream: upstream,
        })
    }

    fn delivered(&self) -> anyhow::Result<u64> {
        let map = self.sink.map("SINK").context("SINK")?;
        let sink: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        Ok(sink.get(&0, 0)?.iter().map(|c| c.packets).sum())
    }

    /// Sends a few datagrams from each of `flows` client ports so that every flow exists (and
    /// the next hops have time to resolve).
    fn warm_up(&self, flows: u16) -> anyhow::Result<()> {
        self.client.run(move || -> anyhow::Result<()> {
            for f in 0..flows {
                let s = UdpSocket::bind(("198.18.1.2", 41000 + f))?;
                for _ in 0..3 {
                    s.send_to(b"warm up", ("198.18.1.1", 5000))?;
                }
            }
            Ok(())
        })??;
        thread::sleep(Duration::from_millis(2500));
        Ok(())
    }

    /// Generates `per_flow` frames for each of `flows` flows; returns (sent, delivered,
    /// seconds, busy jiffies).
    fn blast(
        &self,
        flows: u16,
        per_flow: u32,
        frame_bytes: usize,
    ) -> anyhow::Result<(u64, u64, f64, u64)> {
        let (src_mac, dst_mac) = (mac(&self.client, "eth0")?, mac(&self.relay, "cli0")?);
        let payload = vec![0x5au8; frame_bytes.saturating_sub(42)];
        let frames: Vec<Vec<u8>> = (0..flows)
            .map(|f| {
                Frame::udp(
                    std::net::SocketAddr::from(([198, 18, 1, 2], 41000 + f)),
                    std::net::SocketAddr::from(([198, 18, 1, 1], 5000)),
                    &payload,
                )
                .macs(src_mac, dst_mac)
                .build()
            })
            .collect();
        let generator: &Xdp = self
            .generator
            .program("generate")
            .context("generate")?
            .try_into()?;
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&self.client_ifindex.to_ne_bytes());
        let before = self.delivered()?;
        let jiffies = busy_jiffies();
        let start = Instant::now();
        let mut sent = 0u64;
        // The run must happen in the client's namespace, where the ifindex is its eth0. One
        // 64-frame batch per call (beyond that, a veth drops what the live-frames run queues
        // before the receiver has polled), round-robin over the flows, so that the receiver
        // drains its ring between calls: its NAPI poll runs when the call returns, on this
        // CPU, so generator and relay share the core.
        const CHUNK: u32 = 64;
        lab::on_this_thread_in(&self.client.path(), || -> anyhow::Result<()> {
            for _ in 0..per_flow.div_ceil(CHUNK) {
                for f in &frames {
                    // The kernel wants data_end to be the frame's length.
                    ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
                    generator
                        .test_run(TestRunOptions {
                            data_in: Some(f),
                            ctx_in: Some(&ctx),
                            repeat: CHUNK,
                            attrs: TestRunAttrs::new().xdp_live_frames(CHUNK),
                            ..Default::default()
                        })
                        .context("live-frames run")?;
                    sent += u64::from(CHUNK);
                }
            }
            Ok(())
        })??;
        let secs = start.elapsed().as_secs_f64();
        // Let queued frames land.
        thread::sleep(Duration::from_millis(300));
        let busy = busy_jiffies() - jiffies;
        Ok((sent, self.delivered()? - before, secs, busy))
    }
}

/// Opens `flows` sessions at once (one datagram from each of `flows` new client sockets) and
/// times how long until the controller has opened them all, watching the rule's `opened`
/// counter in the pinned `RULES` map (a cheap poll that does not compete for the CPU).
fn session_rate(t: &Topology, pins: &Path, flows: u32) -> anyhow::Result<SessionRate> {
    let rules: aya::maps::Array<MapData, relay_common::session::RuleStats> =
        aya::maps::Array::try_from(aya::maps::Map::Array(MapData::from_pin(
            pins.join(relay_common::maps::RULES),
        )?))?;
    let opened = || -> anyhow::Result<u64> { Ok(rules.get(&0, 0)?.opened) };
    let before = opened()?;
    let start = Instant::now();
    let sockets = t.client.run(move || -> anyhow::Result<Vec<UdpSocket>> {
        (0..flows)
            .map(|_| {
                let s = UdpSocket::bind("198.18.1.2:0")?;
                s.send_to(b"hello", ("198.18.1.1", 5000))?;
                Ok(s)
            })
            .collect()
    })??;
    // Until all are open, or nothing changed for a second; the rate counts up to the last one.
    let (mut got, mut last_change) = (0, start.elapsed());
    while start.elapsed() - last_change < Duration::from_secs(1) && got < u64::from(flows) {
        let now = opened()? - before;
        if now != got {
            got = now;
            last_change = start.elapsed();
        }
        thread::sleep(Duration::from_millis(2));
    }
    drop(sockets);
    let seconds = last_change.as_secs_f64();
    Ok(SessionRate {
        flows,
        opened: got,
        seconds,
        sessions_per_second: got as f64 / seconds,
    })
}

/// Runs every peer in one topology; pins go to directories of `pins`.
pub fn run(
    relay_bin: &Path,
    pins: &BpfMount,
    smoke: bool,
) -> anyhow::Result<(Vec<PeerResult>, SessionRate)> {
    let t = Topology::new(pins)?;
    let flows: u16 = 16;
    let per_flow: u32 = if smoke { 2_048 } else { 131_072 };
    let user_hz = 100.0;
    let mut results = Vec::new();
    let mut measure = |peer: &'static str, bytes: usize| -> anyhow::Result<()> {
        t.warm_up(flows)?;
        let (sent, delivered, secs, busy) = t.blast(flows, per_flow, bytes)?;
        eprintln!("[bench] {peer} ({bytes} B): {delivered} of {sent} delivered in {secs:.2} s");
        results.push(PeerResult {
            peer,
            frame_bytes: bytes.max(60) + 4,
            sent,
            delivered,
            mpps: delivered as f64 / secs / 1e6,
            cpu_ns_per_packet: busy as f64 / user_hz * 1e9 / (delivered.max(1) as f64),
        });
        Ok(())
    };
    let forward = [
        "--forward",
        "198.18.1.1:5000=198.18.2.2:6000",
        "--allow-private-upstream",
    ];

    let xdp_pins = pins.dir("relay-xdp");
    let relay_xdp = relay(
        relay_bin,
        &t.relay,
        &xdp_pins,
        &[&["--iface", "cli0", "--iface", "up0"][..], &forward].concat(),
    )?;
    measure("relay (XDP)", 60)?;
    if !smoke {
        measure("relay (XDP)", 1396)?;
    }
    let flows_at_once = if smoke { 500 } else { 5000 };
    eprintln!("[bench] opening {flows_at_once} sessions at once");
    let rate = session_rate(&t, &xdp_pins, flows_at_once)?;
    drop(relay_xdp);

    // The peers: the relay's program on cli0 without rules passes everything (a veth accepts
    // generated frames only when its peer runs XDP), and the peer does the relaying.
    let _pass = relay(relay_bin, &t.relay, &pins.dir("pass"), &["--iface", "cli0"])?;
    {
        let _off = relay(
            relay_bin,
            &t.relay,
            &pins.dir("relay-off"),
            &[&["--iface", "cli0", "--xdp-mode", "off"][..], &forward].concat(),
        )?;
        measure("relay without XDP (userspace)", 60)?;
    }
    {
        let rules = "table ip relaybench {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  udp dport 5000 dnat to 198.18.2.2:6000\n }\n chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"up0\" masquerade\n }\n}\n";
        let mut nft = t
            .relay
            .command("nft")
            .arg("-f")
            .arg("-")
            .stdin(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = nft.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(rules.as_bytes())?;
        }
        if !nft.wait()?.success() {
            bail!("nft rejected the DNAT rules");
        }
        measure("nftables DNAT + masquerade", 60)?;
        t.relay
            .exec(&["nft", "delete", "table", "ip", "relaybench"])?;
    }
    {
        let socat = t
            .relay
            .command("socat")
            .args([
                "-u",
                "UDP4-RECV:5000,bind=198.18.1.1,rcvbuf=4194304",
                "UDP4-SENDTO:198.18.2.2:6000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let _socat = Proc(socat);
        thread::sleep(Duration::from_millis(300));
        measure("socat (userspace forwarder)", 60)?;
    }
    Ok((results, rate))
}
