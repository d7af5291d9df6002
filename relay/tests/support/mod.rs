//! Test support: network namespaces the test creates (and always removes), the relay as a
//! child process (always killed), and sockets opened inside a namespace.
//!
//! Every name starts with `rlyt` so that `cargo xtask test` can sweep what a killed run left.
//! Addresses are from 198.18.0.0/15 (RFC 2544, benchmarking) and fd00:5a::/64; they exist only
//! inside the namespaces made here.
#![allow(dead_code)]

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process and call.
pub fn unique(tag: &str) -> String {
    format!(
        "rlyt{}{}{}",
        std::process::id(),
        tag,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let net = format!("--net=/run/netns/{}", self.name);
        let mut v = vec!["nsenter", &net];
        v.extend_from_slice(args);
        sh(&v)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A `Command` for `program` inside the namespace (net namespace only: /sys and bpffs stay
    /// the host's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens live here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `file` is an open namespace fd; setns only changes this thread's netns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Whether an XDP program is attached to `iface`, as `ip link` reports it.
    pub fn xdp_attached(&self, iface: &str) -> bool {
        let out = self.ip(&["link", "show", "dev", iface]);
        out.contains("prog/xdp")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins `a`'s `a_if` and `b`'s `b_if` with a veth pair, brings both up and gives them
/// addresses (CIDR notation, IPv4 and IPv6 lists). Checksum offload is off on both ends so that
/// the frames XDP sees carry complete checksums, as from a real NIC; GRO is switched on once
/// both ends are up, so that frames XDP redirects or transmits into either end are delivered
/// (a veth only accepts XDP frames when its peer runs NAPI).
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, iface, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", iface, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", iface]);
            }
        }
        ns.exec(&["ethtool", "-K", iface, "tx", "off"]);
        ns.ip(&["link", "set", iface, "up"]);
    }
    for (ns, iface) in [(a, a_if), (b, b_if)] {
        ns.exec(&["ethtool", "-K", iface, "gro", "on"]);
    }
}

/// client (198.18.1.2) -- (198.18.1.1) relay (198.18.2.1) -- (198.18.2.2) upstream,
/// with fd00:5a:1::/64 and fd00:5a:2::/64 alongside. The relay forwards between the two.
pub struct Topology {
    pub client: Netns,
    pub relay: Netns,
    pub upstream: Netns,
}

pub const CLIENT_V4: &str = "198.18.1.2";
pub const RELAY_CLIENT_SIDE_V4: &str = "198.18.1.1";
pub const RELAY_UPSTREAM_SIDE_V4: &str = "198.18.2.1";
pub const UPSTREAM_V4: &str = "198.18.2.2";

impl Topology {
    pub fn new() -> Topology {
        let t = Topology {
            client: Netns::new("c"),
            relay: Netns::new("r"),
            upstream: Netns::new("u"),
        };
        veth(
            &t.client,
            "eth0",
            &["198.18.1.2/24", "fd00:5a:1::2/64"],
            &t.relay,
            "cli0",
            &["198.18.1.1/24", "fd00:5a:1::1/64"],
        );
        veth(
            &t.relay,
            "up0",
            &["198.18.2.1/24", "fd00:5a:2::1/64"],
            &t.upstream,
            "eth0",
            &["198.18.2.2/24", "fd00:5a:2::2/64"],
        );
        t.client
            .ip(&["route", "add", "default", "via", "198.18.1.1"]);
        t.client
            .ip(&["-6", "route", "add", "default", "via", "fd00:5a:1::1"]);
        t.upstream
            .ip(&["route", "add", "default", "via", "198.18.2.1"]);
        t.upstream
            .ip(&["-6", "route", "add", "default", "via", "fd00:5a:2::1"]);
        t.relay.sysctl("net.ipv4.ip_forward", "1");
        t.relay.sysctl("net.ipv6.conf.all.forwarding", "1");
        t
    }
}

/// A one-interface topology (see [`Topology::one_nic`]). Fields drop in order: the
/// pass-through program's process first, then the namespaces.
pub struct OneNic {
    _pass: Relay,
    _pass_pin: PinDir,
    pub t: Topology,
    _switch: Netns,
}

impl Topology {
    /// One interface: client (198.18.3.2, fd00:5a:3::2), upstream (198.18.3.3, fd00:5a:3::3)
    /// and the relay's `eth0` (198.18.3.1, fd00:5a:3::1) on one bridged segment, so relayed
    /// frames leave by the interface they came in on (XDP_TX).
    ///
    /// A veth delivers frames XDP transmits into it reliably only when its peer runs an XDP
    /// program (with GRO alone most are lost). A real NIC puts them on the wire; here the
    /// bridge port facing the relay gets a relay without rules, which passes everything.
    pub fn one_nic() -> OneNic {
        let t = Topology {
            client: Netns::new("c"),
            relay: Netns::new("r"),
            upstream: Netns::new("u"),
        };
        let switch = Netns::new("s");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        for (ns, port, v4, v6) in [
            (&t.relay, "p1", "198.18.3.1/24", "fd00:5a:3::1/64"),
            (&t.client, "p2", "198.18.3.2/24", "fd00:5a:3::2/64"),
            (&t.upstream, "p3", "198.18.3.3/24", "fd00:5a:3::3/64"),
        ] {
            veth(ns, "eth0", &[v4, v6], &switch, port, &[]);
            switch.ip(&["link", "set", port, "master", "br0"]);
        }
        let pass_pin = PinDir::new();
        let pass = Relay::start(&switch, &["--iface", "p1", "--pin-dir", pass_pin.arg()]);
        OneNic {
            _pass: pass,
            _pass_pin: pass_pin,
            t,
            _switch: switch,
        }
    }
}

/// Raises this process's open-file limit (tests open thousands of sockets).
pub fn raise_fd_limit() {
    // SAFETY: all-zero is a valid rlimit, which getrlimit fills in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is valid and writable.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// A UDP echo server on a thread inside a namespace; stops on drop.
pub struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Echo {
    pub fn start(ns: &Netns, addr: std::net::SocketAddr) -> Echo {
        let socket = ns.run(move || std::net::UdpSocket::bind(addr).expect("bind echo"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut echoed = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    if socket.send_to(&buf[..n], peer).is_ok() {
                        echoed += 1;
                    }
                }
            }
            echoed
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server and returns how many datagrams it echoed.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Path of the relay binary under test.
pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_relay")
}

/// A pin directory private to one test, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        PinDir(PathBuf::from("/sys/fs/bpf/relay-test").join(unique("p")))
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 pin path")
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `relay run`, killed on drop.
pub struct Relay {
    pub child: Child,
    log: PathBuf,
}

impl Relay {
    /// Starts `relay run` in `ns` with `args` and waits until it says it is running.
    pub fn start(ns: &Netns, args: &[&str]) -> Relay {
        let log = std::env::temp_dir().join(format!("{}.log", unique("log")));
        let file = File::create(&log).expect("log file");
        let child = ns
            .command(relay_bin())
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn relay");
        let mut relay = Relay { child, log };
        relay.wait_for_log("relay running", Duration::from_secs(20));
        relay
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the relay's log contains `needle`; panics with the log if it exits or
    /// times out first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("relay exited ({status}) before {needle:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {needle:?} in relay log:\n{}",
            self.log()
        );
    }

    /// Sends `signal` and waits for the relay to exit; returns whether it exited cleanly.
    pub fn stop(mut self, signal: i32) -> bool {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs the relay binary with `args` in `ns` and returns its output.
pub fn relay_cmd(ns: &Netns, args: &[&str]) -> Output {
    ns.command(relay_bin())
        .args(args)
        .output()
        .expect("run relay")
}

/// `relay stats --json` in `ns`, parsed.
pub fn stats(ns: &Netns, iface: &str, pin: &PinDir) -> serde_json::Value {
    let out = relay_cmd(
        ns,
        &["stats", "--iface", iface, "--pin-dir", pin.arg(), "--json"],
    );
    assert!(
        out.status.success(),
        "relay stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

/// Packets counted under `reason` in a stats JSON document.
pub fn reason_packets(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["reasons"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reason {reason} in {stats}"))
}
