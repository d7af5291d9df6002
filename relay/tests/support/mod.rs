//! Test support: network namespaces the test creates (and always removes), the relay as a
//! child process (always killed), and sockets opened inside a namespace.
//!
//! Built on `relay-lab`: every name starts with `rlyt` so that `cargo xtask test` can sweep
//! what a killed run left. Addresses are from 198.18.0.0/15 (RFC 2544, benchmarking) and
//! fd00:5a::/48; they exist only inside the namespaces made here.
#![allow(dead_code)]

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use relay_lab as lab;

/// Test-local names: `rlyt`, the process id, `tag`, a counter.
pub fn unique(tag: &str) -> String {
    lab::unique("rlyt", tag)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    lab::sh(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A network namespace the test created, deleted on drop (also when the test panics). The
/// methods panic with the command's output when something fails: this is test set-up.
pub struct Netns(lab::Netns);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        Netns(lab::Netns::new("rlyt", tag).unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &[&str]) -> String {
        self.0.ip(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        self.0.exec(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A `Command` for `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        self.0.command(program)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens live here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.run(f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Whether an XDP program is attached to `iface`, as `ip link` reports it.
    pub fn xdp_attached(&self, iface: &str) -> bool {
        self.ip(&["link", "show", "dev", iface])
            .contains("prog/xdp")
    }
}

/// A veth pair between two test namespaces (see `relay_lab::veth`).
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    lab::veth((&a.0, a_if, a_addrs), (&b.0, b_if, b_addrs)).unwrap_or_else(|e| panic!("{e:#}"));
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
/// namespaces, then the switch.
pub struct OneNic {
    pub t: Topology,
    _switch: Netns,
}

impl Topology {
    /// One interface: client (198.18.3.2, fd00:5a:3::2), upstream (198.18.3.3, fd00:5a:3::3)
    /// and the relay's `eth0` (198.18.3.1, fd00:5a:3::1) on one bridged segment, so relayed
    /// frames leave by the interface they came in on.
    ///
    /// The bridge port facing the relay is a plain veth end (GRO, no XDP program): as in a
    /// container, where the host's end of the relay's veth has none. The kernel's veth wakes
    /// such a peer for redirected frames but not for XDP_TX ones, which would wait in its
    /// queue; on a veth the relay sends them back out by redirect.
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
        OneNic { t, _switch: switch }
    }
}

/// Raises this process's open-file limit (tests open thousands of sockets).
pub fn raise_fd_limit() {
    // Tests run as root: above the hard limit too (tens of thousands of client sockets).
    relay::system::raise_fd_limit(1 << 20);
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

/// A pin directory private to one test: a bpffs of its own, unmounted on drop (also when the
/// test panics), so no pinned map outlives the test and nothing is left under /sys/fs/bpf.
pub struct PinDir(pub lab::BpfMount);

impl PinDir {
    pub fn new() -> PinDir {
        PinDir(lab::BpfMount::new("rlyt").unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0.path
    }

    pub fn arg(&self) -> &str {
        self.0.path.to_str().expect("utf-8 pin path")
    }

    /// The relay's state directory in this test (its store), removed with the mount.
    pub fn state(&self) -> PathBuf {
        lab::state_dir_for(&self.0.path)
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
        Relay::start_env(ns, args, &[])
    }

    /// [`Relay::start`] with more environment variables.
    pub fn start_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Relay {
        let log = std::env::temp_dir().join(format!("{}.log", unique("log")));
        let file = File::create(&log).expect("log file");
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if !args.iter().any(|a| a == "--state-dir") {
            if let Some(i) = args.iter().position(|a| a == "--pin-dir") {
                let state = lab::state_dir_for(std::path::Path::new(&args[i + 1]));
                args.extend(["--state-dir".into(), state.to_string_lossy().into_owned()]);
            }
        }
        let child = ns
            .command(relay_bin())
            .arg("run")
            .args(&args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RELAY_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
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
        // RELAY_TEST_KEEP_LOGS=1 keeps every relay's log (with RELAY_TEST_RUST_LOG=debug, say)
        // for a failure that needs a predecessor's log too.
        if std::env::var_os("RELAY_TEST_KEEP_LOGS").is_some() {
            eprintln!("relay log kept in {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A configuration file for one test, removed on drop (also when the test panics).
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("cfg")));
        std::fs::write(&path, text).expect("write the configuration");
        ConfigFile(path)
    }

    pub fn rewrite(&self, text: &str) {
        std::fs::write(&self.0, text).expect("rewrite the configuration");
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Relay {
    /// `relay run` on the relay of a [`Topology`] (both its interfaces) with `--forward` rules
    /// (to the topology's upstream, an internal address) and `extra` arguments.
    pub fn forwarding(ns: &Netns, pin: &PinDir, rules: &[&str], extra: &[&str]) -> Relay {
        let mut args = vec!["--iface", "cli0", "--iface", "up0", "--pin-dir", pin.arg()];
        for r in rules {
            args.extend_from_slice(&["--forward", r]);
        }
        args.push("--allow-private-upstream");
        args.extend_from_slice(extra);
        Relay::start(ns, &args)
    }

    /// `relay run` on the relay of a [`Topology`] (both its interfaces) with `config`.
    pub fn with_config(ns: &Netns, pin: &PinDir, config: &ConfigFile) -> Relay {
        Relay::start(ns, &config_args(pin, config))
    }

    /// [`Relay::with_config`] with more environment variables and arguments.
    pub fn with_config_env(
        ns: &Netns,
        pin: &PinDir,
        config: &ConfigFile,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Relay {
        let mut args = config_args(pin, config);
        args.extend_from_slice(extra);
        Relay::start_env(ns, &args, env)
    }
}

/// Runs the relay binary with `args` in `ns` and returns its output.
pub fn relay_cmd(ns: &Netns, args: &[&str]) -> Output {
    ns.command(relay_bin())
        .args(args)
        .output()
        .expect("run relay")
}

/// Kills a process on drop (a successor `relay restart` started, which is not our child).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 != 0 {
            // SAFETY: kill(2) of a pid this test learned from the relay it runs.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// `relay restart` on the relay of `pin` in `ns` (its output in a file: the successor it
/// starts inherits it and outlives the command). Returns its status, its output, and the
/// successor (killed when the guard drops), read from the relay's stats.
pub fn relay_restart(ns: &Netns, pin: &PinDir) -> (std::process::ExitStatus, String, KillOnDrop) {
    let log = std::env::temp_dir().join(unique("restart-log"));
    let file = File::create(&log).unwrap();
    let status = ns
        .command(relay_bin())
        .args(["restart", "--iface", "cli0", "--pin-dir", pin.arg()])
        .env(
            "RUST_LOG",
            std::env::var("RELAY_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .expect("relay restart");
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let s = stats(ns, "cli0", pin);
    let new = s["controller"]["pid"].as_u64().unwrap_or(0) as u32;
    (status, out, KillOnDrop(new))
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

/// Rule `name` in a stats JSON document.
pub fn rule<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no rule {name} in {s}"))
}

/// The `packets` of a totals object in a stats JSON document.
pub fn packets(v: &serde_json::Value) -> u64 {
    v["packets"].as_u64().unwrap_or(0)
}

/// Packets counted under `reason` in a stats JSON document.
pub fn reason_packets(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["reasons"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reason {reason} in {stats}"))
}

/// A session's four endpoints, written as text.
pub fn ends(client: &str, front: &str, back: &str, upstream: &str) -> relay::datapath::Endpoints {
    relay::datapath::Endpoints {
        client: lab::sa(client),
        front: lab::sa(front),
        back: lab::sa(back),
        upstream: lab::sa(upstream),
    }
}

/// A child started in a process group of its own (`Command::process_group(0)`), killed with
/// everything it forked when dropped, also when the test panics (socat forks one process per
/// connection, which would outlive a plain kill of its parent).
pub struct Group(pub Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group our own child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The arguments of `relay run` on the relay of a [`Topology`] (both its interfaces) with
/// `config`.
pub fn config_args<'a>(pin: &'a PinDir, config: &'a ConfigFile) -> Vec<&'a str> {
    vec![
        "--iface",
        "cli0",
        "--iface",
        "up0",
        "--pin-dir",
        pin.arg(),
        "--config",
        config.arg(),
    ]
}

/// `relay stop` on the relay of a [`Topology`]; it must succeed.
pub fn relay_stop(ns: &Netns, pin: &PinDir) {
    let out = relay_cmd(ns, &["stop", "--iface", "cli0", "--pin-dir", pin.arg()]);
    assert!(
        out.status.success(),
        "relay stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An iperf3 server on the upstream of a [`Topology`] (198.18.2.2:5201), reached at
/// 198.18.1.1:5201: the UDP test traffic through the relay's forward rule on that port (the
/// test's to configure), the TCP control connection through socat in the relay namespace.
pub struct Iperf3 {
    _server: Group,
    _control: Group,
}

impl Iperf3 {
    pub fn serve(t: &Topology) -> Iperf3 {
        use std::os::unix::process::CommandExt as _;
        let server = t
            .upstream
            .command("iperf3")
            .args(["-s", "-1", "-B", "198.18.2.2", "-p", "5201"])
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("iperf3 server");
        let control = t
            .relay
            .command("socat")
            .args([
                "TCP-LISTEN:5201,bind=198.18.1.1,reuseaddr,fork",
                "TCP:198.18.2.2:5201",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("socat");
        Iperf3 {
            _server: Group(server),
            _control: Group(control),
        }
    }

    /// Starts a UDP run of `seconds` at `rate` (iperf3's `-b`) from the client namespace.
    pub fn client(t: &Topology, rate: &str, seconds: u32) -> Child {
        t.client
            .command("iperf3")
            .args([
                "-c",
                "198.18.1.1",
                "-p",
                "5201",
                "-u",
                "-b",
                rate,
                "-l",
                "1000",
            ])
            .args(["-t", &seconds.to_string(), "-J"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iperf3 client")
    }

    /// A finished client run's datagrams sent and lost, with its summary for messages.
    pub fn result(client: Child) -> (u64, u64, serde_json::Value) {
        let out = client.wait_with_output().expect("iperf3 client");
        assert!(
            out.status.success(),
            "iperf3: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
        let sum = report["end"]["sum"].clone();
        let sent = sum["packets"].as_u64().unwrap_or(0);
        let lost = sum["lost_packets"].as_u64().unwrap_or(u64::MAX);
        (sent, lost, sum)
    }
}

/// A PostgreSQL server of the test's own (see `relay_lab::postgres`); set-up errors panic.
pub struct Postgres(lab::postgres::Postgres);

impl Postgres {
    pub fn start() -> Postgres {
        Postgres(lab::postgres::Postgres::start("rlyt").unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn resume(&mut self) {
        self.0.resume().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn pause(&mut self) {
        self.0.pause();
    }

    pub fn conn(&self) -> String {
        self.0.conn()
    }

    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.0.psql(db, sql).unwrap_or_else(|e| panic!("{e:#}"))
    }
}
