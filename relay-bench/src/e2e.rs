//! End-to-end packets per second through a namespace topology (generator, relay, sink), for
//! the relay and its peers in the same run: the relay with XDP (IPv4 and IPv6, 64 to 1400-byte
//! frames), the relay without it, a minimal stateless XDP NAT, nftables DNAT with masquerade
//! (kernel conntrack forwarding), socat (a userspace forwarder), and for SOCKS5 UDP the relay's
//! UDP ASSOCIATE next to dante's.
//!
//! The generator is the `generate` XDP program run with BPF_PROG_RUN in live-frames mode from
//! the client namespace: it transmits a prepared UDP frame out of the client's interface,
//! again and again (pktgen is not in this kernel). The sink is the `sink` XDP program on the
//! upstream's interface, which counts UDP and drops it. Packets per second are what reached
//! the sink divided by the generator's wall time; CPU per packet is the machine's busy time
//! (/proc/stat) over the same interval divided by those packets.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use relay_common::{
    bench::StatelessNat,
    counters::Counter,
    frame::{socks5_udp_header, Frame},
    packet::{TCP_ACK, TCP_PSH},
};
use relay_lab::{self as lab, BpfMount, Netns};
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
        // Already exited (and reaped): its pid may be someone else's by now.
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
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

/// A `relay run` of the benchmark: stopped for good when dropped (SIGTERM, which leaves XDP
/// attached for a successor, then its pins removed, which detaches it), so that the next
/// peer finds the interfaces free.
struct RelayProc {
    proc: Option<Proc>,
    pins: std::path::PathBuf,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = relay::pin::remove(&self.pins);
        let _ = std::fs::remove_dir_all(lab::state_dir_for(&self.pins));
    }
}

/// `relay run ARGS` in `ns`, once it says it is running.
fn relay(bin: &Path, ns: &Netns, pins: &Path, args: &[&str]) -> anyhow::Result<RelayProc> {
    Ok(RelayProc {
        proc: Some(relay_process(bin, ns, pins, args)?),
        pins: pins.to_path_buf(),
    })
}

/// `relay run ARGS` in `ns`, once it says it is running (a successor included: it says so
/// once it has taken over).
/// `relay run` on both of the relay's interfaces with a configuration file and an XDP mode.
fn relay_with(
    bin: &Path,
    ns: &Netns,
    pins: &Path,
    config: &TempFile,
    mode: &str,
) -> anyhow::Result<RelayProc> {
    let config = config.0.display().to_string();
    let args = [
        "--iface",
        "cli0",
        "--iface",
        "up0",
        "--xdp-mode",
        mode,
        "--config",
        &config,
    ];
    relay(bin, ns, pins, &args)
}

fn relay_process(bin: &Path, ns: &Netns, pins: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let log = std::env::temp_dir().join(format!("{}.log", lab::unique(PREFIX, "log")));
    let child = ns
        .command(bin)
        .arg("run")
        .arg("--pin-dir")
        .arg(pins)
        .arg("--state-dir")
        .arg(lab::state_dir_for(pins))
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

/// Packets lost across a graceful restart under load: the same blast through the relay's
/// forward rule once without and once with a successor taking over in the middle.
#[derive(Serialize, Default)]
pub struct RestartLoss {
    pub sent: u64,
    pub delivered: u64,
    pub baseline_sent: u64,
    pub baseline_delivered: u64,
    /// From starting the successor to the old process's exit.
    pub handover_ms: f64,
    /// What the restart cost: the run's losses beyond the baseline run's rate of loss.
    pub lost_to_restart: f64,
    /// The same blast with the controller killed (SIGKILL) in the middle and a new one
    /// started at once: frames sent and delivered, and how long the new one took from its
    /// start to relaying (program loaded, sessions taken over).
    pub crash_sent: u64,
    pub crash_delivered: u64,
    pub crash_takeover_ms: f64,
    pub lost_to_crash: f64,
}

/// Runs a blast with a handover from `old` to a successor (started with `args`) in the
/// middle; returns the figures and the successor.
fn restart_under_load(
    t: &Topology,
    bin: &Path,
    pins: &Path,
    args: &[&str],
    flows: &[Flow],
    per_flow: u32,
    old: RelayProc,
) -> anyhow::Result<(RestartLoss, RelayProc)> {
    let baseline = t.blast(flows, per_flow, 60)?;
    let mut old = old;
    let mut old_proc = old.proc.take().context("the relay process")?;
    std::mem::forget(old);
    let (blast, successor, handover) = thread::scope(|scope| -> anyhow::Result<_> {
        let blast = scope.spawn(|| t.blast(flows, per_flow, 60));
        // Into the blast's middle (it runs about a second or more).
        thread::sleep(Duration::from_millis(150));
        let start = Instant::now();
        let successor = relay_process(bin, &t.relay, pins, args)?;
        while old_proc.0.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the old relay did not exit after handing over");
            }
            thread::sleep(Duration::from_millis(5));
        }
        let handover = start.elapsed();
        let blast = blast
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
        Ok((blast, successor, handover))
    })?;
    // A crash: SIGKILL in the middle of a blast, and a new controller at once.
    let mut victim = successor;
    let (crash, next, takeover) = thread::scope(|scope| -> anyhow::Result<_> {
        let blast = scope.spawn(|| t.blast(flows, per_flow, 60));
        thread::sleep(Duration::from_millis(150));
        let _ = victim.0.kill();
        let _ = victim.0.wait();
        let start = Instant::now();
        let next = relay_process(bin, &t.relay, pins, args)?;
        let takeover = start.elapsed();
        let blast = blast
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
        Ok((blast, next, takeover))
    })?;
    let baseline_loss = 1.0 - baseline.delivered as f64 / baseline.sent.max(1) as f64;
    let beyond = |sent: u64, delivered: u64| {
        (sent.saturating_sub(delivered) as f64 - baseline_loss * sent as f64).max(0.0)
    };
    Ok((
        RestartLoss {
            sent: blast.sent,
            delivered: blast.delivered,
            baseline_sent: baseline.sent,
            baseline_delivered: baseline.delivered,
            handover_ms: handover.as_secs_f64() * 1000.0,
            lost_to_restart: beyond(blast.sent, blast.delivered),
            crash_sent: crash.sent,
            crash_delivered: crash.delivered,
            crash_takeover_ms: takeover.as_secs_f64() * 1000.0,
            lost_to_crash: beyond(crash.sent, crash.delivered),
        },
        RelayProc {
            proc: Some(next),
            pins: pins.to_path_buf(),
        },
    ))
}

/// Everything the end-to-end part measured.
#[derive(Default)]
pub struct E2e {
    pub peers: Vec<PeerResult>,
    pub new_sessions: SessionRate,
    pub kernel_sessions: SessionRate,
    pub udp_kernel_sessions: SessionRate,
    pub restart: RestartLoss,
    pub tcp: Vec<TcpResult>,
}

/// How fast the controller opens sessions: `flows` new client flows sent at once.
#[derive(Serialize, Default)]
pub struct SessionRate {
    pub flows: u32,
    pub opened: u64,
    pub seconds: f64,
    pub sessions_per_second: f64,
}

#[derive(Serialize)]
pub struct PeerResult {
    pub peer: &'static str,
    /// "UDP forward" or "SOCKS5 UDP": rows are compared with the relay's XDP row of the same
    /// kind, family and frame size.
    pub kind: &'static str,
    pub family: &'static str,
    /// Ethernet frame on the wire, FCS included.
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
    /// Holds the named programs of each loaded object (the relay's and the benchmark's).
    pub fn hold(objects: &mut [(&mut Ebpf, &[&str])]) -> anyhow::Result<Dispatcher> {
        let ns = Netns::new(PREFIX, "d")?;
        let mut i = 0;
        for (bpf, programs) in objects.iter_mut() {
            for name in programs.iter() {
                let (a, b) = (format!("h{i}a"), format!("h{i}b"));
                i += 1;
                ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
                ns.ip(&["link", "set", &a, "up"])?;
                ns.ip(&["link", "set", &b, "up"])?;
                let prog: &mut Xdp = bpf.program_mut(name).context("program")?.try_into()?;
                // Attach from inside the namespace: netlink and ifindex are per namespace. The
                // link lives as long as `bpf`.
                lab::on_this_thread_in(&ns.path(), || prog.attach(&a, XdpMode::Driver))?
                    .with_context(|| format!("attaching {name} to hold it in the dispatcher"))?;
            }
        }
        Ok(Dispatcher { _ns: ns })
    }
}

/// The benchmark's own XDP object (`macswap`, `generate`, `sink`, `nat` and their maps),
/// built with the relay's by `relay`'s build script; the relay never loads it.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("RELAY_BENCH_OBJECT"));

/// Loads the benchmark object and the named programs of it through the verifier.
pub fn load(programs: &[&str]) -> anyhow::Result<Ebpf> {
    if BENCH_OBJECT.is_empty() {
        bail!("relay-bench was built without its XDP object (AYA_BUILD_SKIP); build it with `cargo xtask bench`");
    }
    let mut bpf = aya::Ebpf::load(BENCH_OBJECT).context("loading the benchmark's XDP object")?;
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
    upstream: Netns,
}

/// One flow the generator sends: from `src` to `dst`, each datagram starting with `header`
/// (a SOCKS5 UDP request header, or nothing); or, if `tcp`, segments of an established TCP
/// connection between them.
#[derive(Clone)]
struct Flow {
    src: SocketAddr,
    dst: SocketAddr,
    header: Vec<u8>,
    tcp: bool,
}

/// `n` client ports sending to `dst`.
fn flows(client: IpAddr, dst: SocketAddr, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|f| Flow {
            src: SocketAddr::new(client, 41000 + f),
            dst,
            header: Vec::new(),
            tcp: false,
        })
        .collect()
}

const CLIENT4: &str = "198.18.1.2";
const CLIENT6: &str = "fd00:5a:1::2";

impl Topology {
    fn new() -> anyhow::Result<Topology> {
        let client = Netns::new(PREFIX, "c")?;
        let relay_ns = Netns::new(PREFIX, "r")?;
        let upstream = Netns::new(PREFIX, "u")?;
        lab::veth(
            (&client, "eth0", &["198.18.1.2/24", "fd00:5a:1::2/64"]),
            (&relay_ns, "cli0", &["198.18.1.1/24", "fd00:5a:1::1/64"]),
        )?;
        lab::veth(
            (&relay_ns, "up0", &["198.18.2.1/24", "fd00:5a:2::1/64"]),
            (&upstream, "eth0", &["198.18.2.2/24", "fd00:5a:2::2/64"]),
        )?;
        client.ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd00:5a:1::1"])?;
        upstream.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        upstream.ip(&["-6", "route", "add", "default", "via", "fd00:5a:2::1"])?;
        relay_ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        relay_ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])?;

        let mut generator = load(&["generate", "generate_flows"])?;
        let held = Dispatcher::hold(&mut [(&mut generator, &["generate", "generate_flows"])])?;
        let mut sink = load(&["sink"])?;
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
            upstream,
        })
    }

    fn delivered(&self) -> anyhow::Result<u64> {
        let map = self.sink.map("SINK").context("SINK")?;
        let sink: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        Ok(sink.get(&0, 0)?.iter().map(|c| c.packets).sum())
    }

    /// Sends a few datagrams on each flow from real sockets, so that every session and
    /// association exists (and the next hops have time to resolve) before the run. A TCP
    /// flow gets a real connection instead, returned to be held while the run lasts.
    fn warm_up(&self, flows: &[Flow]) -> anyhow::Result<Vec<TcpStream>> {
        let flows = flows.to_vec();
        let held = self
            .client
            .run(move || -> anyhow::Result<Vec<TcpStream>> {
                let mut held = Vec::new();
                for f in flows {
                    if f.tcp {
                        let s = socket2::Socket::new(
                            socket2::Domain::for_address(f.src),
                            socket2::Type::STREAM,
                            None,
                        )?;
                        // Closed with a RST: the same ports connect again through the next peer.
                        s.set_linger(Some(Duration::ZERO))?;
                        s.set_reuse_address(true)?;
                        s.bind(&f.src.into())?;
                        s.connect_timeout(&f.dst.into(), Duration::from_secs(2))
                            .with_context(|| format!("connecting {} to {}", f.src, f.dst))?;
                        held.push(TcpStream::from(s));
                        continue;
                    }
                    let s = UdpSocket::bind(f.src)?;
                    let mut d = f.header.clone();
                    d.extend_from_slice(b"warm up");
                    for _ in 0..3 {
                        s.send_to(&d, f.dst)?;
                    }
                }
                Ok(held)
            })??;
        thread::sleep(Duration::from_millis(2500));
        Ok(held)
    }

    /// Generates `per_flow` frames of about `frame_bytes` (FCS excluded) on each flow.
    fn blast(&self, flows: &[Flow], per_flow: u32, frame_bytes: usize) -> anyhow::Result<Blast> {
        let (src_mac, dst_mac) = (mac(&self.client, "eth0")?, mac(&self.relay, "cli0")?);
        let frames: Vec<Vec<u8>> = flows
            .iter()
            .map(|f| {
                let l4 = if f.tcp { 20 } else { 8 };
                let headers = if f.src.is_ipv4() { 34 } else { 54 } + l4;
                let mut payload = f.header.clone();
                payload.resize(
                    frame_bytes.saturating_sub(headers).max(f.header.len() + 1),
                    0x5a,
                );
                let frame = if f.tcp {
                    // PSH and ACK: what the sink counts (the connection's own segments pass).
                    Frame::tcp(f.src, f.dst, TCP_PSH | TCP_ACK, &payload)
                } else {
                    Frame::udp(f.src, f.dst, &payload)
                };
                frame.macs(src_mac, dst_mac).build()
            })
            .collect();
        let before = self.delivered()?;
        let jiffies = busy_jiffies();
        let start = Instant::now();
        let sent = self.live("generate", &frames, per_flow)?;
        let secs = start.elapsed().as_secs_f64();
        // Let queued frames land.
        thread::sleep(Duration::from_millis(300));
        Ok(Blast {
            sent,
            delivered: self.delivered()? - before,
            seconds: secs,
            busy_jiffies: busy_jiffies() - jiffies,
            frame_len: frames.first().map_or(0, Vec::len),
        })
    }
}

/// Frames a live-frames run sends per call: one 64-frame batch (beyond that, a veth drops
/// what the run queues before the receiver has polled).
const CHUNK: u32 = 64;

impl Topology {
    /// Runs XDP program `program` of the generator in live-frames mode from the client
    /// namespace (where the ifindex is its eth0): each of `frames` about `per_frame` times,
    /// one batch at a time, round-robin, so that the receiver drains its ring between calls
    /// (its NAPI poll runs when the call returns, on this CPU: generator and relay share the
    /// core). Returns the frames sent.
    fn live(&self, program: &str, frames: &[Vec<u8>], per_frame: u32) -> anyhow::Result<u64> {
        let generator: &Xdp = self
            .generator
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&self.client_ifindex.to_ne_bytes());
        let mut sent = 0u64;
        lab::on_this_thread_in(&self.client.path(), || -> anyhow::Result<()> {
            for _ in 0..per_frame.div_ceil(CHUNK) {
                for f in frames {
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
        Ok(sent)
    }
}

struct Blast {
    sent: u64,
    delivered: u64,
    seconds: f64,
    busy_jiffies: u64,
    frame_len: usize,
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

/// How fast the kernel opens sessions through one rule: `n` first packets (TCP SYNs or UDP
/// datagrams), each from a new source (the `generate_flows` program), blasted at a rule
/// from the client namespace; the rate is the sessions XDP opened (`KERNEL_OPENS`) over the
/// blast's wall time, with the controller taking each one in through the event ring
/// meanwhile on the other CPU.
fn kernel_open_rate(
    t: &Topology,
    relay_bin: &Path,
    pins: &Path,
    n: u32,
    tcp: bool,
) -> anyhow::Result<SessionRate> {
    let protocol = if tcp { "tcp" } else { "udp" };
    // Every session needs a relay port: the widest range below the ephemeral ports.
    let capacity = n.saturating_mul(2).max(10_000);
    let config =
        TempFile(std::env::temp_dir().join(format!("{}.toml", lab::unique(PREFIX, "tcp"))));
    std::fs::write(
        &config.0,
        format!(
            "[relay]\nsession_capacity = {capacity}\nsession_ports = \"1024-32767\"\n\n\
             [[forward]]\nprotocol = \"{protocol}\"\nlisten = \"198.18.1.1:40000\"\n\
             upstream = \"198.18.2.2:7000\"\nallow_private_upstream = true\n\
             max_sessions_per_source = {capacity}\n\
             new_sessions_per_second = 4294967295\nnew_sessions_burst = 4294967295\n"
        ),
    )?;
    let _relay = relay_with(relay_bin, &t.relay, pins, &config, "auto")?;
    let opens: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
        MapData::from_pin(pins.join(relay_common::maps::KERNEL_OPENS))?,
    ))?;
    let opened = || -> anyhow::Result<u64> {
        Ok(opens
            // Rule 0's slot (the only rule).
            .get(&(relay_common::counters::Open::Opened as u32), 0)?
            .iter()
            .sum())
    };
    let (src_mac, dst_mac) = (mac(&t.client, "eth0")?, mac(&t.relay, "cli0")?);
    let (src, dst) = ("198.18.1.2:1000".parse()?, "198.18.1.1:40000".parse()?);
    let first = if tcp {
        Frame::tcp(src, dst, 0x02, b"")
    } else {
        Frame::udp(src, dst, b"first datagram")
    };
    let first = first.macs(src_mac, dst_mac).build();
    let before = opened()?;
    let start = Instant::now();
    let sent = t.live("generate_flows", &[first], n)?;
    let seconds = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    let got = opened()? - before;
    Ok(SessionRate {
        flows: sent as u32,
        opened: got,
        seconds,
        sessions_per_second: got as f64 / seconds,
    })
}

/// One TCP measurement through one peer: bulk transfer (iperf3, one stream) or new
/// connections (connect, one byte each way, close).
#[derive(Serialize)]
pub struct TcpResult {
    pub peer: &'static str,
    /// "bulk", "connections" (forward rules), "connect bulk" or "connect messages" (SOCKS5
    /// CONNECT).
    pub test: &'static str,
    /// Bulk: Gbit/s received; connections and messages: per second.
    pub rate: f64,
    /// Bulk: the machine's busy CPU seconds per gigabyte moved, the endpoints (iperf3 client
    /// and server, which are the same for every peer) included; connections: busy CPU
    /// microseconds per connection, the same way.
    pub cpu: f64,
    /// What the run did: seconds, or connections made of those tried.
    pub detail: String,
}

/// USER_HZ: /proc/stat counts busy time in hundredths of a second.
const HZ: f64 = 100.0;

impl TcpResult {
    /// A bulk transfer of `bytes` in `secs` with `busy` jiffies of CPU.
    fn bulk(peer: &'static str, test: &'static str, bytes: u64, secs: f64, busy: u64) -> Self {
        let gb = bytes as f64 / 1e9;
        TcpResult {
            peer,
            test,
            rate: gb * 8.0 / secs,
            cpu: busy as f64 / HZ / gb,
            detail: format!("{gb:.2} GB in {secs:.1} s"),
        }
    }

    /// `n` connections or round trips in `secs` with `busy` jiffies; `detail` says which.
    fn each(
        peer: &'static str,
        test: &'static str,
        n: u32,
        secs: f64,
        busy: u64,
        detail: String,
    ) -> Self {
        TcpResult {
            peer,
            test,
            rate: f64::from(n) / secs,
            cpu: busy as f64 / HZ / f64::from(n.max(1)) * 1e6,
            detail,
        }
    }
}

/// A TCP server in `ns` on `addr` that answers each connection's first byte with one byte
/// and closes: the far end of the connection-rate test.
fn one_byte_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
    for _ in 0..2 {
        let l = listener.try_clone()?;
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(&b);
                }
            }
        });
    }
    Ok(())
}

/// `n` connections to `to` from the client namespace, two at a time (one per core): connect,
/// one byte each way, close. Returns how many succeeded, the wall time and busy jiffies.
fn connections(t: &Topology, to: SocketAddr, n: u32) -> anyhow::Result<(u32, f64, u64)> {
    let sockets: Vec<Vec<socket2::Socket>> = t.client.run(move || -> anyhow::Result<_> {
        (0..2)
            .map(|_| {
                (0..n / 2)
                    .map(|_| {
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        // Closed with a RST: no TIME_WAIT to run out of ports with.
                        s.set_linger(Some(Duration::ZERO))?;
                        Ok(s)
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(anyhow::Error::from)
    })??;
    let jiffies = busy_jiffies();
    let start = Instant::now();
    let done: u32 = thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .into_iter()
            .map(|batch| {
                scope.spawn(move || {
                    let (mut ok, mut failed_in_a_row) = (0u32, 0u32);
                    for s in batch {
                        // A peer that does not work here: stop, the count says so.
                        if failed_in_a_row >= 10 {
                            break;
                        }
                        let addr = socket2::SockAddr::from(to);
                        if s.connect_timeout(&addr, Duration::from_secs(2)).is_err() {
                            failed_in_a_row += 1;
                            continue;
                        }
                        let mut c = TcpStream::from(s);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut b = [0u8; 1];
                        if c.write_all(b"x").is_ok() && c.read_exact(&mut b).is_ok() {
                            ok += 1;
                            failed_in_a_row = 0;
                        } else {
                            failed_in_a_row += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    Ok((
        done,
        start.elapsed().as_secs_f64(),
        busy_jiffies() - jiffies,
    ))
}

/// iperf3 (one stream, `seconds`) from the client namespace to `to`; returns bytes received,
/// the wall time and busy jiffies.
fn bulk(t: &Topology, to: SocketAddr, seconds: u32) -> anyhow::Result<(u64, f64, u64)> {
    let server = t
        .upstream
        .command("iperf3")
        .args(["-s", "-1", "-B", "198.18.2.2", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _server = Proc(server);
    thread::sleep(Duration::from_millis(300));
    let jiffies = busy_jiffies();
    let start = Instant::now();
    let out = t
        .client
        .command("iperf3")
        .args([
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()?;
    let (elapsed, busy) = (start.elapsed().as_secs_f64(), busy_jiffies() - jiffies);
    if !out.status.success() {
        bail!(
            "iperf3 through {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3 through {to}: {e}");
    }
    if bytes == 0 {
        bail!("iperf3 through {to} moved nothing");
    }
    Ok((bytes, elapsed, busy))
}

/// A TCP server in `ns` on `addr` that accepts connections and holds them, silent: the far
/// end of the TCP forward run's connections (the sink drops the segments generated on them).
fn holding_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
    thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    Ok(())
}

/// TCP through each peer on the same topology: the relay with XDP (sessions opened in the
/// kernel), nftables DNAT with masquerade (conntrack), HAProxy in TCP mode (one thread), and
/// the relay without XDP (userspace, a connection per client). Each forwards
/// 198.18.1.1:40000 to iperf3 on 198.18.2.2:5201 and 198.18.1.1:40001 to a one-byte server
/// on 198.18.2.2:7001. The two that forward packets (the relay with XDP and nftables) also
/// forward 198.18.1.1:40002 to 198.18.2.2:6001, where the generator sends 64-byte segments
/// on established connections (`TCP_FORWARD`, in `r`'s results: packets per second).
fn tcp_peers(
    r: &mut Runner,
    relay_bin: &Path,
    pins: &BpfMount,
    smoke: bool,
) -> anyhow::Result<Vec<TcpResult>> {
    let t = r.t;
    let (seconds, conns) = if smoke { (1, 400) } else { (5, 4000) };
    one_byte_server(&t.upstream, "198.18.2.2:7001".parse()?)?;
    holding_server(&t.upstream, "198.18.2.2:6001".parse()?)?;
    let segments: Vec<Flow> = (0..16)
        .map(|f| Flow {
            src: SocketAddr::from(([198, 18, 1, 2], 42000 + f)),
            dst: SocketAddr::from(([198, 18, 1, 1], 40002)),
            header: Vec::new(),
            tcp: true,
        })
        .collect();
    let bulk_to: SocketAddr = "198.18.1.1:40000".parse()?;
    let conn_to: SocketAddr = "198.18.1.1:40001".parse()?;
    let mut out = Vec::new();
    let mut measure = |peer: &'static str| -> anyhow::Result<()> {
        eprintln!("[bench] {peer}: TCP bulk and new connections");
        let (bytes, secs, busy) = bulk(t, bulk_to, seconds)?;
        out.push(TcpResult::bulk(peer, "bulk", bytes, secs, busy));
        let (done, secs, busy) = connections(t, conn_to, conns)?;
        let detail = format!("{done} of {conns} in {secs:.2} s");
        out.push(TcpResult::each(
            peer,
            "connections",
            done,
            secs,
            busy,
            detail,
        ));
        Ok(())
    };
    let config =
        TempFile(std::env::temp_dir().join(format!("{}.toml", lab::unique(PREFIX, "tcpf"))));
    std::fs::write(
        &config.0,
        "[relay]\nsession_capacity = 40000\nsession_ports = \"1024-32767\"\n\n\
         [[forward]]\nprotocol = \"tcp\"\nlisten = \"198.18.1.1:40000\"\n\
         upstream = \"198.18.2.2:5201\"\nallow_private_upstream = true\n\n\
         [[forward]]\nprotocol = \"tcp\"\nlisten = \"198.18.1.1:40001\"\n\
         upstream = \"198.18.2.2:7001\"\nallow_private_upstream = true\n\
         max_sessions_per_source = 40000\n\
         new_sessions_per_second = 1000000\nnew_sessions_burst = 1000000\n\n\
         [[forward]]\nprotocol = \"tcp\"\nlisten = \"198.18.1.1:40002\"\n\
         upstream = \"198.18.2.2:6001\"\nallow_private_upstream = true\n",
    )?;
    {
        let _relay = relay_with(relay_bin, &t.relay, &pins.dir("tcp-xdp"), &config, "auto")?;
        measure(RELAY_XDP)?;
        // 60 bytes before the FCS, as the UDP rows: 64-byte frames, 6 bytes of payload.
        r.measure(RELAY_XDP, TCP_FORWARD, &segments, 60)?;
    }
    nft(
        t,
        "table ip relaybenchtcp {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  \
         tcp dport 40000 dnat to 198.18.2.2:5201\n  tcp dport 40001 dnat to 198.18.2.2:7001\n  \
         tcp dport 40002 dnat to 198.18.2.2:6001\n }\n \
         chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"up0\" masquerade\n }\n}\n",
    )?;
    measure(NFT)?;
    // The generated segments repeat one sequence number: conntrack, which checks TCP windows,
    // would call them invalid and leave them un-NATed. Liberal window tracking accepts them
    // (and spares nftables that check, in its favour).
    t.relay.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.netfilter.nf_conntrack_tcp_be_liberal=1",
    ])?;
    r.measure(NFT, TCP_FORWARD, &segments, 60)?;
    t.relay.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.netfilter.nf_conntrack_tcp_be_liberal=0",
    ])?;
    t.relay
        .exec(&["nft", "delete", "table", "ip", "relaybenchtcp"])?;
    {
        let cfg =
            TempFile(std::env::temp_dir().join(format!("{}.cfg", lab::unique(PREFIX, "hap"))));
        std::fs::write(
            &cfg.0,
            "global\n  maxconn 8000\n  nbthread 1\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             listen bulk\n  bind 198.18.1.1:40000\n  server u 198.18.2.2:5201\n\
             listen conns\n  bind 198.18.1.1:40001\n  server u 198.18.2.2:7001\n",
        )?;
        let haproxy = t
            .relay
            .command("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        let mut haproxy = Proc(haproxy);
        thread::sleep(Duration::from_millis(500));
        if let Some(status) = haproxy.0.try_wait()? {
            bail!("haproxy exited at start ({status})");
        }
        measure(HAPROXY)?;
    }
    {
        let _relay = relay_with(relay_bin, &t.relay, &pins.dir("tcp-off"), &config, "off")?;
        measure(RELAY_OFF)?;
    }
    Ok(out)
}

/// SOCKS5 UDP ASSOCIATE from `client` (the address its datagrams will come from) through the
/// proxy at `proxy`, with username/password if given; returns the control connection (the
/// association lives as long as it) and the relay address to send datagrams to.
fn associate(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    client: SocketAddr,
) -> anyhow::Result<(TcpStream, SocketAddr)> {
    let (mut c, head) = socks_request(proxy, user, 3, client)?;
    let ip: IpAddr = match head[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a)?;
            a.into()
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a)?;
            a.into()
        }
        t => bail!("UDP ASSOCIATE reply with address type {t}"),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port)?;
    let ip = if ip.is_unspecified() { proxy.ip() } else { ip };
    Ok((c, SocketAddr::new(ip, u16::from_be_bytes(port))))
}

/// A connection to the SOCKS5 server at `proxy`, greeted and (with `user`) authenticated.
fn socks_greet(proxy: SocketAddr, user: Option<(&str, &str)>) -> anyhow::Result<TcpStream> {
    let mut c = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))
        .with_context(|| format!("connecting to the SOCKS5 server at {proxy}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let method = if user.is_some() { 2 } else { 0 };
    c.write_all(&[5, 1, method])?;
    let mut reply = [0u8; 2];
    c.read_exact(&mut reply)?;
    if reply != [5, method] {
        bail!(
            "the SOCKS5 server chose method {} (wanted {method})",
            reply[1]
        );
    }
    if let Some((name, password)) = user {
        let mut auth = vec![1, name.len() as u8];
        auth.extend_from_slice(name.as_bytes());
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        c.write_all(&auth)?;
        c.read_exact(&mut reply)?;
        if reply[1] != 0 {
            bail!("the SOCKS5 server refused the username and password");
        }
    }
    Ok(c)
}

/// A SOCKS5 request (`command` 1 CONNECT or 3 UDP ASSOCIATE) for the IPv4 `addr` on a
/// connection greeted and authenticated; returns it with the reply's first 4 bytes (the bound
/// address follows).
fn socks_request(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    command: u8,
    addr: SocketAddr,
) -> anyhow::Result<(TcpStream, [u8; 4])> {
    let mut c = socks_greet(proxy, user)?;
    let IpAddr::V4(ip) = addr.ip() else {
        bail!("IPv4 addresses only");
    };
    let mut request = vec![5, command, 0, 1];
    request.extend_from_slice(&ip.octets());
    request.extend_from_slice(&addr.port().to_be_bytes());
    c.write_all(&request)?;
    let mut head = [0u8; 4];
    c.read_exact(&mut head)?;
    if head[1] != 0 {
        bail!(
            "SOCKS5 command {command} refused with reply code {}",
            head[1]
        );
    }
    Ok((c, head))
}

/// A CONNECT through the SOCKS5 server at `proxy` to `dest` (IPv4).
fn socks_connect(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    dest: SocketAddr,
) -> anyhow::Result<TcpStream> {
    let (mut c, head) = socks_request(proxy, user, 1, dest)?;
    // The bound address: IPv4 or IPv6, and the port.
    let mut bound = vec![0u8; if head[3] == 4 { 18 } else { 6 }];
    c.read_exact(&mut bound)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(c)
}

/// The far end of the CONNECT runs, on 198.18.2.2:7003: a connection that starts with `B`
/// is read to its end and answered with the byte count (8 bytes); one that starts with `E`
/// has everything echoed.
fn connect_server(ns: &Netns) -> anyhow::Result<()> {
    let listener = ns.run(|| std::net::TcpListener::bind("198.18.2.2:7003"))??;
    thread::spawn(move || {
        for c in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut c = c;
                let mut mode = [0u8; 1];
                if c.read_exact(&mut mode).is_err() {
                    return;
                }
                let mut buf = vec![0u8; 65536];
                let mut total = 0u64;
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            if mode[0] == b'E' && c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                if mode[0] == b'B' {
                    let _ = c.write_all(&total.to_be_bytes());
                }
            });
        }
    });
    Ok(())
}

/// CONNECT through each SOCKS5 server: bulk (bytes one way, counted at the far end) and
/// 1 KB request/response messages; CPU per gigabyte and per message. The relay's CONNECT
/// either stays in the kernel (sockmap: a stream verdict sends each chunk out of the other
/// socket) or moves with splice(2) through a pipe driven by the controller; dante copies
/// through userspace.
fn connect_peers(
    t: &Topology,
    relay_bin: &Path,
    pins: &BpfMount,
    smoke: bool,
) -> anyhow::Result<Vec<TcpResult>> {
    let (bulk_bytes, messages): (u64, u32) = if smoke {
        (50 << 20, 1000)
    } else {
        (1 << 30, 20_000)
    };
    connect_server(&t.upstream)?;
    let dest: SocketAddr = "198.18.2.2:7003".parse()?;
    let mut out = Vec::new();
    let mut measure = |peer: &'static str,
                       proxy: SocketAddr,
                       user: Option<(&'static str, &'static str)>|
     -> anyhow::Result<()> {
        eprintln!("[bench] {peer}: SOCKS5 CONNECT bulk and 1 KB messages");
        let (bytes, secs, busy) = t.client.run(move || -> anyhow::Result<(u64, f64, u64)> {
            let mut c = socks_connect(proxy, user, dest)?;
            let chunk = vec![0x5au8; 65536];
            let jiffies = busy_jiffies();
            let start = Instant::now();
            c.write_all(b"B")?;
            let mut sent = 0u64;
            while sent < bulk_bytes {
                c.write_all(&chunk)?;
                sent += chunk.len() as u64;
            }
            c.shutdown(std::net::Shutdown::Write)?;
            let mut count = [0u8; 8];
            c.read_exact(&mut count)?;
            let got = u64::from_be_bytes(count);
            if got != sent {
                bail!("the far end counted {got} of {sent} bytes");
            }
            Ok((
                sent,
                start.elapsed().as_secs_f64(),
                busy_jiffies() - jiffies,
            ))
        })??;
        out.push(TcpResult::bulk(peer, "connect bulk", bytes, secs, busy));
        let (secs, busy) = t.client.run(move || -> anyhow::Result<(f64, u64)> {
            let mut c = socks_connect(proxy, user, dest)?;
            c.set_nodelay(true)?;
            c.write_all(b"E")?;
            let msg = [0xa5u8; 1024];
            let mut back = [0u8; 1024];
            let jiffies = busy_jiffies();
            let start = Instant::now();
            for _ in 0..messages {
                c.write_all(&msg)?;
                c.read_exact(&mut back)?;
            }
            Ok((start.elapsed().as_secs_f64(), busy_jiffies() - jiffies))
        })??;
        let detail = format!("{messages} round trips in {secs:.2} s");
        out.push(TcpResult::each(
            peer,
            "connect messages",
            messages,
            secs,
            busy,
            detail,
        ));
        Ok(())
    };
    for (peer, path) in [(RELAY_SOCKMAP, "kernel"), (RELAY_SPLICE, "splice")] {
        let config = socks_config(&format!("connect_path = \"{path}\"\n"))?;
        let _relay = relay_with(
            relay_bin,
            &t.relay,
            &pins.dir(&format!("socks-connect-{path}")),
            &config,
            "auto",
        )?;
        measure(
            peer,
            "198.18.1.1:1080".parse()?,
            Some(("bench", SOCKS_PASSWORD)),
        )?;
    }
    {
        let _pass = relay(
            relay_bin,
            &t.relay,
            &pins.dir("pass-connect"),
            &["--iface", "cli0"],
        )?;
        let _dante = dante(t)?;
        measure(DANTE, "198.18.1.1:1081".parse()?, None)?;
    }
    Ok(out)
}

/// One association per flow (client ports 41000 and up), each datagram addressed to the sink.
fn socks_flows(
    t: &Topology,
    proxy: SocketAddr,
    user: Option<(&'static str, &'static str)>,
    n: u16,
) -> anyhow::Result<(Vec<TcpStream>, Vec<Flow>)> {
    let header = socks5_udp_header(SocketAddr::from(([198, 18, 2, 2], 6000)), 0);
    t.client
        .run(move || -> anyhow::Result<(Vec<TcpStream>, Vec<Flow>)> {
            let mut controls = Vec::new();
            let mut flows = Vec::new();
            for f in 0..n {
                let src = SocketAddr::from(([198, 18, 1, 2], 41000 + f));
                let (control, relay) = associate(proxy, user, src)?;
                controls.push(control);
                flows.push(Flow {
                    src,
                    dst: relay,
                    header: header.clone(),
                    tcp: false,
                });
            }
            Ok((controls, flows))
        })?
}

/// Runs `nft -f -` with `rules` in the relay's namespace.
fn nft(t: &Topology, rules: &str) -> anyhow::Result<()> {
    let mut nft = t
        .relay
        .command("nft")
        .arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin.write_all(rules.as_bytes())?;
    }
    if !nft.wait()?.success() {
        bail!("nft rejected the DNAT rules");
    }
    Ok(())
}

/// The peers measured.
pub const RELAY_XDP: &str = "relay (XDP)";
pub const RELAY_OFF: &str = "relay without XDP (userspace)";
pub const RELAY_FLEET: &str = "relay (XDP, fleet store in PostgreSQL)";
pub const NAT: &str = "stateless XDP NAT (minimal)";
pub const NAT_FIB: &str = "stateless XDP NAT (minimal, bpf_fib_lookup per packet)";
pub const NFT: &str = "nftables DNAT + masquerade";
pub const SOCAT: &str = "socat (userspace forwarder)";
pub const DANTE: &str = "dante";
pub const HAPROXY: &str = "HAProxy (TCP mode, one thread)";
pub const RELAY_SPLICE: &str = "relay (CONNECT with splice)";
pub const RELAY_SOCKMAP: &str = "relay (CONNECT in the kernel, sockmap)";
/// What they relay.
pub const FORWARD: &str = "UDP forward";
/// Segments of established TCP connections through a forward rule.
pub const TCP_FORWARD: &str = "TCP forward";
pub const SOCKS: &str = "SOCKS5 UDP";

struct Runner<'a> {
    t: &'a Topology,
    per_flow: u32,
    results: Vec<PeerResult>,
}

impl Runner<'_> {
    fn measure(
        &mut self,
        peer: &'static str,
        kind: &'static str,
        flows: &[Flow],
        bytes: usize,
    ) -> anyhow::Result<()> {
        let held = self.t.warm_up(flows)?;
        let b = self.t.blast(flows, self.per_flow, bytes)?;
        drop(held);
        let family = if flows.first().is_some_and(|f| f.src.is_ipv6()) {
            "IPv6"
        } else {
            "IPv4"
        };
        eprintln!(
            "[bench] {peer}, {kind} {family} ({} B): {} of {} delivered in {:.2} s",
            b.frame_len + 4,
            b.delivered,
            b.sent,
            b.seconds
        );
        self.results.push(PeerResult {
            peer,
            kind,
            family,
            frame_bytes: b.frame_len + 4,
            sent: b.sent,
            delivered: b.delivered,
            mpps: b.delivered as f64 / b.seconds / 1e6,
            cpu_ns_per_packet: b.busy_jiffies as f64 / HZ * 1e9 / (b.delivered.max(1) as f64),
        });
        Ok(())
    }
}

/// Runs every peer in one topology; pins go to directories of `pins`.
pub fn run(relay_bin: &Path, pins: &BpfMount, smoke: bool) -> anyhow::Result<E2e> {
    let t = Topology::new()?;
    let n: u16 = 16;
    let mut r = Runner {
        t: &t,
        per_flow: if smoke { 2_048 } else { 131_072 },
        results: Vec::new(),
    };
    let v4 = flows(
        CLIENT4.parse()?,
        SocketAddr::from(([198, 18, 1, 1], 5000)),
        n,
    );
    let v6 = flows(CLIENT6.parse()?, "[fd00:5a:1::1]:5000".parse()?, n);
    let forward = [
        "--forward",
        "198.18.1.1:5000=198.18.2.2:6000",
        "--forward",
        "[fd00:5a:1::1]:5000=[fd00:5a:2::2]:6000",
        "--allow-private-upstream",
        // The generator's flows, and the sessions opened at once below, all come from one
        // address: lift the per-address share a real rule keeps.
        "--max-sessions-per-source",
        "100000",
    ];

    let xdp_pins = pins.dir("relay-xdp");
    let relay_xdp = relay(
        relay_bin,
        &t.relay,
        &xdp_pins,
        &[&["--iface", "cli0", "--iface", "up0"][..], &forward].concat(),
    )?;
    r.measure(RELAY_XDP, FORWARD, &v4, 60)?;
    r.measure(RELAY_XDP, FORWARD, &v6, 60)?;
    eprintln!("[bench] a graceful restart under load");
    let relay_args = [&["--iface", "cli0", "--iface", "up0"][..], &forward].concat();
    let (restart, relay_xdp) = restart_under_load(
        &t,
        relay_bin,
        &xdp_pins,
        &relay_args,
        &v4,
        if smoke { 16_384 } else { r.per_flow },
        relay_xdp,
    )?;
    if !smoke {
        for bytes in [508, 1396] {
            r.measure(RELAY_XDP, FORWARD, &v4, bytes)?;
            r.measure(RELAY_XDP, FORWARD, &v6, bytes)?;
        }
    }
    let flows_at_once = if smoke { 500 } else { 5000 };
    eprintln!("[bench] opening {flows_at_once} sessions at once");
    let rate = session_rate(&t, &xdp_pins, flows_at_once)?;
    drop(relay_xdp);
    // At most as many as there are relay ports (1024-32767).
    let syns = if smoke { 20_000 } else { 30_000 };
    eprintln!("[bench] {syns} new TCP connections opened in the kernel");
    let kernel_rate = kernel_open_rate(&t, relay_bin, &pins.dir("relay-tcp"), syns, true)?;
    // Every UDP session also gets a socket in the relay: within its open-file limit.
    let flows = if smoke { 10_000 } else { 15_000 };
    eprintln!("[bench] {flows} new UDP flows opened in the kernel");
    let udp_rate = kernel_open_rate(&t, relay_bin, &pins.dir("relay-udp"), flows, false)?;

    // The minimal stateless XDP NAT on cli0, redirecting to up0.
    {
        let mut nat = load(&["nat", "nat_fib"])?;
        let rule = StatelessNat {
            ifindex: lab::on_this_thread_in(&t.relay.path(), || relay::system::ifindex("up0"))??,
            match_port: 5000u16.to_be_bytes(),
            to_port: 6000u16.to_be_bytes(),
            src: [198, 18, 2, 1],
            to: [198, 18, 2, 2],
            src_mac: mac(&t.relay, "up0")?,
            dst_mac: mac(&t.upstream, "eth0")?,
        };
        let mut map: Array<&mut MapData, StatelessNat> =
            Array::try_from(nat.map_mut("NAT").context("NAT map")?)?;
        map.set(0, rule, 0)?;
        let p: &mut Xdp = nat.program_mut("nat").context("nat")?.try_into()?;
        let link = lab::on_this_thread_in(&t.relay.path(), || p.attach("cli0", XdpMode::Driver))??;
        r.measure(NAT, FORWARD, &v4, 60)?;
        p.detach(link)?;
        // The same NAT with a FIB lookup per packet, the upstream's neighbour resolved first
        // (an unresolved one passes the packet to the kernel).
        t.relay
            .exec(&["ping", "-q", "-c", "1", "-W", "1", "198.18.2.2"])?;
        let p: &mut Xdp = nat.program_mut("nat_fib").context("nat_fib")?.try_into()?;
        let link = lab::on_this_thread_in(&t.relay.path(), || p.attach("cli0", XdpMode::Driver))??;
        r.measure(NAT_FIB, FORWARD, &v4, 60)?;
        p.detach(link)?;
    }

    // The other peers: the relay's program on cli0 without rules passes everything (a veth
    // accepts generated frames only when its peer runs XDP), and the peer does the relaying.
    let pass = relay(relay_bin, &t.relay, &pins.dir("pass"), &["--iface", "cli0"])?;
    {
        let _off = relay(
            relay_bin,
            &t.relay,
            &pins.dir("relay-off"),
            &[&["--iface", "cli0", "--xdp-mode", "off"][..], &forward].concat(),
        )?;
        r.measure(RELAY_OFF, FORWARD, &v4, 60)?;
    }
    nft(
        &t,
        "table ip relaybench {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  udp dport 5000 dnat to 198.18.2.2:6000\n }\n chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"up0\" masquerade\n }\n}\n\
         table ip6 relaybench6 {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  udp dport 5000 dnat to [fd00:5a:2::2]:6000\n }\n chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"up0\" masquerade\n }\n}\n",
    )?;
    r.measure(NFT, FORWARD, &v4, 60)?;
    r.measure(NFT, FORWARD, &v6, 60)?;
    t.relay
        .exec(&["nft", "delete", "table", "ip", "relaybench"])?;
    t.relay
        .exec(&["nft", "delete", "table", "ip6", "relaybench6"])?;
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
        r.measure(SOCAT, FORWARD, &v4, 60)?;
    }
    // dante's UDP ASSOCIATE, while the pass-through relay still runs on cli0.
    {
        let _dante = dante(&t)?;
        let (_controls, flows) = socks_flows(&t, "198.18.1.1:1081".parse()?, None, n)?;
        r.measure(DANTE, SOCKS, &flows, 60)?;
    }
    drop(pass);

    // The relay's SOCKS5 UDP ASSOCIATE, with XDP and without.
    // And with XDP and a fleet store (PostgreSQL, synced every second: the database is off
    // the packet path), measured next to the embedded store's run.
    let pg = lab::postgres::Postgres::start(PREFIX)?;
    let embedded = socks_config("")?;
    let fleet = socks_config_then(
        "",
        &format!("[fleet]\ndatabase = \"{}\"\nname = \"bench\"\n", pg.conn()),
    )?;
    for (peer, mode, config, dir) in [
        (RELAY_XDP, "auto", &embedded, "socks-auto"),
        (RELAY_FLEET, "auto", &fleet, "socks-fleet"),
        (RELAY_OFF, "off", &embedded, "socks-off"),
    ] {
        let _relay = relay_with(relay_bin, &t.relay, &pins.dir(dir), config, mode)?;
        let (_controls, flows) = socks_flows(
            &t,
            "198.18.1.1:1080".parse()?,
            Some(("bench", SOCKS_PASSWORD)),
            n,
        )?;
        r.measure(peer, SOCKS, &flows, 60)?;
    }
    drop(pg);
    let mut tcp = tcp_peers(&mut r, relay_bin, pins, smoke)?;
    tcp.extend(connect_peers(&t, relay_bin, pins, smoke)?);
    Ok(E2e {
        peers: r.results,
        new_sessions: rate,
        kernel_sessions: kernel_rate,
        udp_kernel_sessions: udp_rate,
        restart,
        tcp,
    })
}

const SOCKS_PASSWORD: &str = "bench-password";

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The relay's configuration for the SOCKS5 runs: one user, the sink's network allowed.
/// The SOCKS5 server's configuration (`extra`: more `[socks5]` settings).
fn socks_config(extra: &str) -> anyhow::Result<TempFile> {
    socks_config_then(extra, "")
}

/// [`socks_config`] with `tail` (more sections) at the end.
fn socks_config_then(extra: &str, tail: &str) -> anyhow::Result<TempFile> {
    let hash = relay::socks5::users::hash_password(SOCKS_PASSWORD.as_bytes())?;
    let f = TempFile(std::env::temp_dir().join(format!("{}.toml", lab::unique(PREFIX, "cfg"))));
    std::fs::write(
        &f.0,
        format!(
            "[socks5]\nlisten = \"198.18.1.1:1080\"\n{extra}\
             [[socks5.users]]\nname = \"bench\"\npassword_hash = \"{hash}\"\nmax_associations = 64\n\
             [policy]\nallow = [\"198.18.2.0/24\"]\n{tail}"
        ),
    )?;
    Ok(f)
}

/// dante (Debian's dante-server) in the relay's namespace: SOCKS5 on 198.18.1.1:1081, UDP
/// ASSOCIATE allowed from the client's network to the sink's, no authentication (it changes
/// the handshake only, not the datagrams).
fn dante(t: &Topology) -> anyhow::Result<(Proc, TempFile)> {
    let conf =
        TempFile(std::env::temp_dir().join(format!("{}.conf", lab::unique(PREFIX, "dante"))));
    std::fs::write(
        &conf.0,
        "logoutput: /dev/null\n\
         internal: 198.18.1.1 port = 1081\n\
         external: 198.18.2.1\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.unprivileged: nobody\n\
         client pass { from: 198.18.1.0/24 to: 0.0.0.0/0 }\n\
         socks pass { from: 198.18.1.0/24 to: 198.18.2.0/24 command: udpassociate connect }\n\
         socks pass { from: 198.18.2.0/24 to: 198.18.1.0/24 command: udpreply }\n",
    )?;
    let pid = TempFile(std::env::temp_dir().join(format!("{}.pid", lab::unique(PREFIX, "dante"))));
    let child = t
        .relay
        .command("danted")
        .arg("-f")
        .arg(&conf.0)
        .arg("-p")
        .arg(&pid.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut p = Proc(child);
    // Until it accepts connections.
    let start = Instant::now();
    loop {
        let up = t.client.run(|| {
            TcpStream::connect_timeout(
                &"198.18.1.1:1081".parse().expect("address"),
                Duration::from_millis(200),
            )
            .is_ok()
        })?;
        if up {
            break;
        }
        if let Some(status) = p.0.try_wait()? {
            bail!("danted exited ({status}); is Debian's dante-server installed? (`cargo xtask bench` installs it)");
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("dante did not start listening on 198.18.1.1:1081");
        }
        thread::sleep(Duration::from_millis(100));
    }
    drop(pid);
    Ok((p, conf))
}
