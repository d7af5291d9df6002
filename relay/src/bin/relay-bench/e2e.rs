//! End-to-end packets per second through a namespace topology (generator, relay, sink), for
//! the relay and its peers in the same run: the relay with XDP, the relay without it, nftables
//! DNAT with masquerade (kernel conntrack forwarding), and socat (a userspace forwarder).
//!
//! The generator is the `generate` XDP program run with BPF_PROG_RUN in live-frames mode from
//! the client namespace: it transmits a prepared 64-byte UDP frame out of the client's
//! interface, over and over (pktgen is not in this kernel). The sink is the `sink` XDP program
//! on the upstream's interface, which counts and drops. Packets per second are what reached
//! the sink divided by the generator's wall time; CPU per packet is the machine's busy time
//! (/proc/stat) over the same interval divided by those packets.

use std::{
    fs::File,
    net::UdpSocket,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use relay_common::{counters::Counter, frame::Frame};
use serde::Serialize;

pub struct Ns(String);

impl Ns {
    pub fn new(tag: &str) -> anyhow::Result<Ns> {
        let name = format!("rlyb{}{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = Ns(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut v = vec!["ip", "-n", &self.0];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn exec(&self, args: &[&str]) -> anyhow::Result<()> {
        let net = format!("--net=/run/netns/{}", self.0);
        let mut v = vec!["nsenter", &net];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0)).arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.0);
        thread::spawn(move || -> anyhow::Result<T> {
            let file = File::open(&path)?;
            // SAFETY: setns on this thread only, with an open namespace fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on this thread inside namespace `name`, then returns to this thread's own.
fn on_this_thread_in<T>(name: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let target = File::open(format!("/run/netns/{name}"))?;
    let own = File::open("/proc/self/ns/net")?;
    // SAFETY: setns on this thread only, with an open namespace fd; undone below.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: back to the namespace this thread was in.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns back: {}", std::io::Error::last_os_error());
    }
    Ok(out)
}

pub fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("{args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn mac(ns: &Ns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-j", "link", "show", "dev", iface])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = v[0]["address"].as_str().context("no MAC")?;
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

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

/// Starts `relay run` in `ns` and waits until it runs.
fn relay(ns: &Ns, args: &[&str]) -> anyhow::Result<Proc> {
    let log = std::env::temp_dir().join(format!("rlyb-{}-{}.log", std::process::id(), args.len()));
    let child = ns
        .command(RELAY.get().map(String::as_str).unwrap_or("relay"))
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()?;
    let p = Proc(child);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("relay running")
        {
            return Ok(p);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "relay did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    )
}

static RELAY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

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
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    cpu.iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum()
}

struct Topology {
    client: Ns,
    relay: Ns,
    upstream: Ns,
    sink: Ebpf,
    generator: Ebpf,
    client_ifindex: u32,
    _pins: Vec<PinDir>,
    _held: Dispatcher,
}

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(tag: &str) -> anyhow::Result<(Ebpf, PinDir)> {
    let dir =
        PathBuf::from("/sys/fs/bpf/relay-bench").join(format!("{}-{tag}", std::process::id()));
    relay::pin::prepare(&dir)?;
    Ok((
        relay::ebpf::load_maps(&relay::ebpf::LoadOptions::new(&dir))?,
        PinDir(dir),
    ))
}

impl Topology {
    fn new() -> anyhow::Result<Topology> {
        let t = (Ns::new("c")?, Ns::new("r")?, Ns::new("u")?);
        let (client, relay_ns, upstream) = t;
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &client.0,
            "type",
            "veth",
            "peer",
            "name",
            "cli0",
            "netns",
            &relay_ns.0,
        ])?;
        sh(&[
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            &relay_ns.0,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &upstream.0,
        ])?;
        for (ns, dev, addr) in [
            (&client, "eth0", "198.18.1.2/24"),
            (&relay_ns, "cli0", "198.18.1.1/24"),
            (&relay_ns, "up0", "198.18.2.1/24"),
            (&upstream, "eth0", "198.18.2.2/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for (ns, dev) in [
            (&client, "eth0"),
            (&relay_ns, "cli0"),
            (&relay_ns, "up0"),
            (&upstream, "eth0"),
        ] {
            ns.exec(&["ethtool", "-K", dev, "gro", "on"])?;
        }
        client.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        upstream.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        relay_ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;

        let (mut sink, sink_pin) = load("sink")?;
        let (mut generator, gen_pin) = load("gen")?;
        {
            let p: &mut Xdp = sink.program_mut("sink").context("sink")?.try_into()?;
            p.load()?;
        }
        {
            let p: &mut Xdp = generator
                .program_mut("generate")
                .context("generate")?
                .try_into()?;
            p.load()?;
        }
        // Attach the sink from inside the upstream namespace (netlink is per namespace).
        let sink = upstream.run(move || -> anyhow::Result<Ebpf> {
            let p: &mut Xdp = sink.program_mut("sink").context("sink")?.try_into()?;
            p.attach("eth0", XdpMode::Driver)?;
            Ok(sink)
        })??;
        let client_ifindex = client.run(|| relay::system::ifindex("eth0"))??;
        let mut generator = generator;
        let (held, _) = Dispatcher::hold(&mut generator, &["generate"], "g")?;
        Ok(Topology {
            client,
            relay: relay_ns,
            upstream,
            sink,
            generator,
            client_ifindex,
            _pins: vec![sink_pin, gen_pin],
            _held: held,
        })
    }

    fn delivered(&self) -> anyhow::Result<u64> {
        let map = self.sink.map("SINK").context("SINK")?;
        let sink: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        Ok(sink.get(&0, 0)?.iter().map(|c| c.packets).sum())
    }

    /// Sends one datagram from each of `flows` client ports so that every flow exists.
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

    /// Generates `per_flow` frames for each of `flows` flows; returns (sent, delivered, secs,
    /// busy jiffies).
    fn blast(
        &self,
        flows: u16,
        per_flow: u32,
        frame_bytes: usize,
    ) -> anyhow::Result<(u64, u64, f64, u64)> {
        let src_mac = mac(&self.client, "eth0")?;
        let dst_mac = mac(&self.relay, "cli0")?;
        let payload = vec![0x5au8; frame_bytes.saturating_sub(42)];
        let frames: Vec<Vec<u8>> = (0..flows)
            .map(|f| {
                Frame::udp(
                    std::net::SocketAddr::from(([198, 18, 1, 2], 41000 + f)),
                    "198.18.1.1:5000".parse().expect("addr"),
                    &payload,
                )
                .macs(src_mac, dst_mac)
                .build()
            })
            .collect();
        let before = self.delivered()?;
        let jiffies = busy_jiffies();
        let ifindex = self.client_ifindex;
        let generator: &Xdp = self
            .generator
            .program("generate")
            .context("generate")?
            .try_into()?;
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let start = Instant::now();
        let mut sent = 0u64;
        // The run must happen in the client's namespace, where `ifindex` is eth0.
        let result = on_this_thread_in(&self.client.0, || -> anyhow::Result<()> {
            // One 64-frame batch per call (beyond that, a veth drops what the live-frames run
            // queues before the receiver has polled), round-robin over the flows, so that the
            // receiver drains its ring between calls (its NAPI poll runs when the call returns,
            // on this CPU: generator and relay share the core).
            const CHUNK: u32 = 64;
            for _ in 0..per_flow.div_ceil(CHUNK) {
                for f in &frames {
                    // The kernel wants data_end to be the frame's length.
                    ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
                    generator
                        .test_run(TestRunOptions {
                            data_in: Some(f),
                            ctx_in: Some(&ctx),
                            repeat: CHUNK,
                            attrs: TestRunAttrs::new().xdp_live_frames(64),
                            ..Default::default()
                        })
                        .context("live-frames run")?;
                    sent += u64::from(CHUNK);
                }
            }
            Ok(())
        })?;
        result?;
        let secs = start.elapsed().as_secs_f64();
        // Let queued frames land.
        thread::sleep(Duration::from_millis(300));
        let busy = busy_jiffies() - jiffies;
        Ok((sent, self.delivered()? - before, secs, busy))
    }
}

/// Opens `flows` sessions at once (one datagram from each of `flows` new client sockets) and
/// times how long until the controller has opened them all (its `opened` counter).
fn session_rate(
    t: &Topology,
    relay_bin: &str,
    pin: &str,
    flows: u32,
) -> anyhow::Result<SessionRate> {
    // The rule's `opened` counter, read straight from the pinned map (a cheap poll that does
    // not compete with the relay for the CPU).
    let _ = relay_bin;
    let rules: aya::maps::Array<MapData, relay_common::session::RuleStats> =
        aya::maps::Array::try_from(aya::maps::Map::Array(MapData::from_pin(
            std::path::Path::new(pin).join(relay_common::maps::RULES),
        )?))?;
    let opened = || -> anyhow::Result<u64> { Ok(rules.get(&0, 0)?.opened) };
    let before = opened()?;
    let start = Instant::now();
    let sockets = t.client.run(move || -> anyhow::Result<Vec<UdpSocket>> {
        let mut v = Vec::with_capacity(flows as usize);
        for _ in 0..flows {
            let s = UdpSocket::bind("198.18.1.2:0")?;
            s.send_to(b"hello", ("198.18.1.1", 5000))?;
            v.push(s);
        }
        Ok(v)
    })??;
    // Until all are open, or nothing changed for a second; the rate counts up to the last one.
    let (mut got, mut last_change) = (0, start.elapsed());
    while start.elapsed() - last_change < Duration::from_secs(1) {
        let now = opened()? - before;
        if now != got {
            got = now;
            last_change = start.elapsed();
        }
        if got >= u64::from(flows) {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let seconds = last_change.as_secs_f64();
    drop(sockets);
    Ok(SessionRate {
        flows,
        opened: got,
        seconds,
        sessions_per_second: got as f64 / seconds,
    })
}

/// Runs every peer in one topology.
pub fn run(relay_bin: &str, smoke: bool) -> anyhow::Result<(Vec<PeerResult>, SessionRate)> {
    let _ = RELAY.set(relay_bin.to_owned());
    let t = Topology::new()?;
    let flows: u16 = 16;
    let per_flow: u32 = if smoke { 2_048 } else { 131_072 };
    let hz = 100.0; // USER_HZ
    let mut results = Vec::new();
    let mut measure = |peer: &'static str, t: &Topology, bytes: usize| -> anyhow::Result<()> {
        t.warm_up(flows)?;
        let (sent, delivered, secs, busy) = t.blast(flows, per_flow, bytes)?;
        results.push(PeerResult {
            peer,
            frame_bytes: bytes.max(60) + 4,
            sent,
            delivered,
            mpps: delivered as f64 / secs / 1e6,
            cpu_ns_per_packet: busy as f64 / hz * 1e9 / (delivered.max(1) as f64),
        });
        eprintln!("[bench] {peer} ({bytes} B): {delivered} of {sent} delivered in {secs:.2} s");
        if std::env::var_os("RELAY_BENCH_DEBUG").is_some() {
            for (ns, dev) in [
                (&t.client, "eth0"),
                (&t.relay, "cli0"),
                (&t.relay, "up0"),
                (&t.upstream, "eth0"),
            ] {
                let out = ns.command("ethtool").args(["-S", dev]).output()?;
                eprintln!(
                    "{} {dev}: {}",
                    ns.0,
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| !l.ends_with(": 0"))
                        .collect::<Vec<_>>()
                        .join(" |")
                );
            }
        }
        Ok(())
    };
    let pin = |tag: &str| {
        PathBuf::from("/sys/fs/bpf/relay-bench").join(format!("{}-{tag}", std::process::id()))
    };
    let forward = "198.18.1.1:5000=198.18.2.2:6000";
    let rate;
    {
        let p = pin("xdp");
        let _r = relay(
            &t.relay,
            &[
                "--iface",
                "cli0",
                "--iface",
                "up0",
                "--pin-dir",
                p.to_str().unwrap_or_default(),
                "--forward",
                forward,
                "--allow-private-upstream",
            ],
        )?;
        measure("relay (XDP)", &t, 60)?;
        if !smoke {
            measure("relay (XDP)", &t, 1396)?;
        }
        let flows = if smoke { 500 } else { 5000 };
        eprintln!("[bench] opening {flows} sessions at once");
        rate = Some(session_rate(
            &t,
            relay_bin,
            p.to_str().unwrap_or_default(),
            flows,
        )?);
        drop(_r);
        let _ = std::fs::remove_dir_all(&p);
    }
    // The peers: the relay's program on cli0 without rules passes everything (a veth accepts
    // generated frames only when its peer runs XDP), and the peer does the relaying.
    let pass_pin = pin("pass");
    let _pass = relay(
        &t.relay,
        &[
            "--iface",
            "cli0",
            "--pin-dir",
            pass_pin.to_str().unwrap_or_default(),
        ],
    )?;
    {
        let p = pin("off");
        let _r = relay(
            &t.relay,
            &[
                "--iface",
                "cli0",
                "--xdp-mode",
                "off",
                "--pin-dir",
                p.to_str().unwrap_or_default(),
                "--forward",
                forward,
                "--allow-private-upstream",
            ],
        )?;
        measure("relay without XDP (userspace)", &t, 60)?;
        drop(_r);
        let _ = std::fs::remove_dir_all(&p);
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
        measure("nftables DNAT + masquerade", &t, 60)?;
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
        let _s = Proc(socat);
        thread::sleep(Duration::from_millis(300));
        measure("socat (userspace forwarder)", &t, 60)?;
    }
    drop(_pass);
    let _ = std::fs::remove_dir_all(&pass_pin);
    let _ = &t.upstream;
    Ok((results, rate.context("no session rate")?))
}

/// Keeps XDP programs in the kernel's XDP dispatcher for the length of a benchmark: each one
/// attached in driver mode to one end of a veth pair in a private namespace. Without this,
/// every BPF_PROG_TEST_RUN call adds the program to the dispatcher and removes it again,
/// waiting for an RCU grace period each time (tens of milliseconds here).
pub struct Dispatcher {
    _ns: Ns,
}

impl Dispatcher {
    pub fn hold(
        bpf: &mut Ebpf,
        programs: &[&'static str],
        tag: &str,
    ) -> anyhow::Result<(Dispatcher, Vec<aya::programs::xdp::XdpLinkId>)> {
        let ns = Ns::new(tag)?;
        let mut links = Vec::new();
        for (i, name) in programs.iter().enumerate() {
            let (a, b) = (format!("h{i}a"), format!("h{i}b"));
            ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ns.ip(&["link", "set", &a, "up"])?;
            ns.ip(&["link", "set", &b, "up"])?;
            let prog: &mut Xdp = bpf.program_mut(name).context("program")?.try_into()?;
            // Attach from inside the namespace: netlink and ifindex are per namespace.
            let r = on_this_thread_in(&ns.0, || prog.attach(&a, XdpMode::Driver))?;
            links
                .push(r.with_context(|| format!("attaching {name} to hold it in the dispatcher"))?);
        }
        Ok((Dispatcher { _ns: ns }, links))
    }
}
