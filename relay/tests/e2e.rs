//! End-to-end: the relay binary attached to a veth inside namespaces this test creates, real
//! sockets sending real traffic through it.

mod support;

use std::{
    net::UdpSocket,
    process::Command,
    time::{Duration, Instant},
};

use support::{
    reason_packets, relay_bin, relay_cmd, stats, PinDir, Relay, Topology, CLIENT_V4, UPSTREAM_V4,
};

/// Sends `n` numbered datagrams from the client to the upstream through the relay namespace
/// and returns the payloads the upstream received.
fn send_through(t: &Topology, n: usize) -> Vec<Vec<u8>> {
    let rx = t
        .upstream
        .run(|| UdpSocket::bind((UPSTREAM_V4, 9000)).expect("bind upstream"));
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let tx = t
        .client
        .run(|| UdpSocket::bind((CLIENT_V4, 0)).expect("bind client"));
    for i in 0..n {
        let payload = format!("datagram {i} through the relay");
        tx.send_to(payload.as_bytes(), (UPSTREAM_V4, 9000))
            .expect("send");
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < n {
        match rx.recv_from(&mut buf) {
            Ok((len, _)) => got.push(buf[..len].to_vec()),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn counters_move_with_traffic_and_relay_stop_detaches() {
    let t = Topology::new();
    let pin = PinDir::new();
    let relay = Relay::start(&t.relay, &["--iface", "cli0", "--pin-dir", pin.arg()]);
    assert!(
        relay.log().contains("attached to cli0 in driver mode"),
        "{}",
        relay.log()
    );
    assert!(t.relay.xdp_attached("cli0"));

    let got = send_through(&t, 50);
    assert_eq!(
        got.len(),
        50,
        "every datagram passes through to the kernel and on"
    );
    for (i, payload) in got.iter().enumerate() {
        assert_eq!(
            payload,
            format!("datagram {i} through the relay").as_bytes()
        );
    }
    let s = stats(&t.relay, "cli0", &pin);
    assert!(
        reason_packets(&s, "no_session") >= 50,
        "50 UDP datagrams without a session are counted: {s}"
    );
    assert!(s["verdicts"]["pass"]["packets"].as_u64().unwrap_or(0) >= 50);
    assert_eq!(s["verdicts"]["drop"]["packets"].as_u64(), Some(0));

    assert!(relay.stop(libc::SIGINT), "Ctrl-C exits cleanly");
    assert!(
        t.relay.xdp_attached("cli0"),
        "the program stays attached after Ctrl-C, for the next start"
    );
    support::relay_stop(&t.relay, &pin);
    assert!(
        !t.relay.xdp_attached("cli0"),
        "`relay stop` detaches the program"
    );
    assert!(
        !pin.path().join("COUNTERS").exists(),
        "`relay stop` removes the pinned state"
    );
}

#[test]
fn sigterm_leaves_xdp_attached_and_a_restart_takes_over_pinned_counters() {
    let t = Topology::new();
    let pin = PinDir::new();
    let relay = Relay::start(&t.relay, &["--iface", "cli0", "--pin-dir", pin.arg()]);
    assert_eq!(send_through(&t, 20).len(), 20);
    assert!(relay.stop(libc::SIGTERM), "SIGTERM exits cleanly");
    assert!(t.relay.xdp_attached("cli0"), "XDP stays attached");
    let before = reason_packets(&stats(&t.relay, "cli0", &pin), "no_session");
    assert!(before >= 20);

    let relay = Relay::start(&t.relay, &["--iface", "cli0", "--pin-dir", pin.arg()]);
    assert_eq!(send_through(&t, 20).len(), 20);
    let after = reason_packets(&stats(&t.relay, "cli0", &pin), "no_session");
    assert!(
        after >= before + 20,
        "the restarted relay counts on from the pinned state: {before} then {after}"
    );
    assert!(
        relay.log().contains("took over the pinned XDP link"),
        "{}",
        relay.log()
    );
    drop(relay);
}

#[test]
fn generic_mode_on_request() {
    let t = Topology::new();
    let pin = PinDir::new();
    let relay = Relay::start(
        &t.relay,
        &[
            "--iface",
            "cli0",
            "--pin-dir",
            pin.arg(),
            "--xdp-mode",
            "generic",
        ],
    );
    assert!(relay.log().contains("in generic mode"), "{}", relay.log());
    let link = t.relay.ip(&["link", "show", "dev", "cli0"]);
    assert!(link.contains("xdpgeneric"), "{link}");
    assert_eq!(send_through(&t, 10).len(), 10);
    assert!(reason_packets(&stats(&t.relay, "cli0", &pin), "no_session") >= 10);
    support::relay_stop(&t.relay, &pin);
    assert!(!t.relay.xdp_attached("cli0"));
    let mut relay = relay;
    assert!(
        relay.child.wait().is_ok_and(|s| s.success()),
        "the stopped relay exits cleanly"
    );
}

/// The one line an operator sees on stderr, and the exit code.
fn refusal(out: &std::process::Output) -> (String, Option<i32>) {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line, no backtrace: {err}");
    assert!(!err.contains("panicked"), "{err}");
    (err, out.status.code())
}

#[test]
fn refuses_an_interface_that_does_not_exist() {
    let t = Topology::new();
    let out = relay_cmd(&t.relay, &["run", "--iface", "nosuch0"]);
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no network interface named \"nosuch0\""),
        "{err}"
    );
}

#[test]
fn refuses_to_run_without_root() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            relay_bin(),
            "run",
            "--iface",
            "lo",
        ])
        .output()
        .expect("setpriv");
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("relay needs root"), "{err}");
}

#[test]
fn stats_without_a_relay_says_so() {
    let t = Topology::new();
    let pin = PinDir::new();
    let out = relay_cmd(
        &t.relay,
        &["stats", "--iface", "cli0", "--pin-dir", pin.arg()],
    );
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("is the relay running"), "{err}");
}

#[test]
fn a_second_relay_on_the_same_interface_is_refused() {
    let t = Topology::new();
    let pin = PinDir::new();
    let _first = Relay::start(&t.relay, &["--iface", "cli0", "--pin-dir", pin.arg()]);
    let other = PinDir::new();
    let start = Instant::now();
    let out = relay_cmd(
        &t.relay,
        &["run", "--iface", "cli0", "--pin-dir", other.arg()],
    );
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("attaching XDP to cli0"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(
        t.relay.xdp_attached("cli0"),
        "the first relay stays attached"
    );
}

/// A second `relay run` with the same pinned state takes over from the first: the first hands
/// its sockets over and exits, and the pinned rules are the second's. `relay unpin` is
/// refused while a relay runs.
#[test]
fn a_second_relay_on_the_same_pins_takes_over() {
    let t = Topology::new();
    let pin = PinDir::new();
    let mut first = Relay::forwarding(&t.relay, &pin, &["198.18.1.1:5000=198.18.2.2:6000"], &[]);
    let before = stats(&t.relay, "cli0", &pin);
    assert_eq!(before["rules"][0]["listen"], "198.18.1.1:5000", "{before}");
    let second = Relay::forwarding(&t.relay, &pin, &["198.18.1.1:5005=198.18.2.2:6005"], &[]);
    let status = first.child.wait().expect("the first relay exits");
    assert!(status.success(), "{}", first.log());
    assert!(
        first.log().contains("handed over; exiting"),
        "{}",
        first.log()
    );
    assert!(
        second.log().contains("took over the pinned XDP link"),
        "{}",
        second.log()
    );
    let after = stats(&t.relay, "cli0", &pin);
    assert_eq!(after["rules"][0]["listen"], "198.18.1.1:5005", "{after}");
    assert!(t.relay.xdp_attached("cli0") && t.relay.xdp_attached("up0"));

    let out = relay_cmd(
        &t.relay,
        &["unpin", "--iface", "cli0", "--pin-dir", pin.arg()],
    );
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("another relay is running"), "{err}");
    assert!(pin.path().join("COUNTERS").exists(), "nothing was unpinned");
}

/// The session and association port ranges are reserved from the kernel's own port choices
/// while the relay runs, and given back when it stops; a range inside the ephemeral range is
/// refused at start.
#[test]
fn session_ports_are_reserved_while_the_relay_runs() {
    let t = Topology::new();
    let pin = PinDir::new();
    let reserved = || {
        t.relay
            .exec(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
    };
    assert_eq!(reserved().trim(), "");
    let relay = Relay::forwarding(&t.relay, &pin, &["198.18.1.1:5000=198.18.2.2:6000"], &[]);
    assert_eq!(reserved().trim(), "20000-29999");
    assert!(relay.stop(libc::SIGTERM));
    assert_eq!(reserved().trim(), "", "given back on exit");

    let out = relay_cmd(
        &t.relay,
        &[
            "run",
            "--iface",
            "cli0",
            "--pin-dir",
            pin.arg(),
            "--session-ports",
            "40000-40999",
        ],
    );
    let (err, code) = refusal(&out);
    assert_eq!(code, Some(1));
    assert!(err.contains("overlaps the ephemeral port range"), "{err}");
}

/// Once attached, every thread of the relay keeps only CAP_NET_ADMIN, CAP_BPF and
/// CAP_NET_BIND_SERVICE, with the same bounding set and no_new_privs; it still relays and
/// still exits cleanly on SIGTERM, leaving XDP attached for the next start.
#[test]
fn the_running_relay_keeps_only_the_capabilities_it_needs() {
    let t = Topology::new();
    let pin = PinDir::new();
    let relay = Relay::forwarding(&t.relay, &pin, &["198.18.1.1:5000=198.18.2.2:6000"], &[]);
    let tasks = format!("/proc/{}/task", relay.child.id());
    let mut threads = 0;
    for entry in std::fs::read_dir(&tasks).expect("task list") {
        let status =
            std::fs::read_to_string(entry.expect("task").path().join("status")).unwrap_or_default();
        if status.is_empty() {
            continue;
        }
        threads += 1;
        let c = relay::privileges::parse_status(&status);
        assert_eq!(c.effective, relay::privileges::RUNTIME_SET, "{status}");
        assert_eq!(c.permitted, relay::privileges::RUNTIME_SET, "{status}");
        assert_eq!(c.bounding, relay::privileges::RUNTIME_SET, "{status}");
        assert!(c.no_new_privs, "{status}");
    }
    assert!(threads > 1, "the runtime's threads were checked too");
    assert_eq!(send_through(&t, 5).len(), 5, "the host still forwards");
    assert!(relay.stop(libc::SIGTERM), "a clean exit");
    assert!(t.relay.xdp_attached("cli0"), "XDP stays for the next start");
    let s = stats(&t.relay, "cli0", &pin);
    assert!(s["controller"]["pid"].is_null(), "no controller runs: {s}");
}

/// `relay check` says what a configuration would do without root or the kernel, and a
/// configuration with a problem ends with one line and exit status 1.
#[test]
fn check_describes_a_configuration_and_names_its_problems() {
    let hash = relay::socks5::users::hash_password(b"pw").unwrap();
    let text = |hash: &str| {
        format!(
            "[[forward]]\nlisten = \"0.0.0.0:51820\"\nupstream = \"198.51.100.7:51820\"\n\
             [socks5]\nlisten = \"0.0.0.0:1080\"\n[[socks5.users]]\nname = \"alice\"\n\
             password_hash = \"{hash}\"\nquota = \"10 GB\"\nquota_period = \"monthly\"\n"
        )
    };
    let good = support::ConfigFile::new(&text(&hash));
    // As nobody, without capabilities: the check needs neither.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(relay_bin())
        .args(["check", "--config", good.arg()])
        .output()
        .expect("setpriv");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("forward0 [udp]: 0.0.0.0:51820 -> 198.51.100.7"),
        "{said}"
    );
    assert!(
        said.contains("user \"alice\": quota 10000.0 MB per period (monthly:1)"),
        "{said}"
    );
    assert!(said.trim_end().ends_with(": OK"), "{said}");

    let bad = support::ConfigFile::new(&text("hunter2"));
    let out = Command::new(relay_bin())
        .args(["check", "--config", bad.arg()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("relay hash-password"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `--log-format json`: every line the relay logs is one JSON object with a time, a level
/// and the message.
#[test]
fn json_log_lines() {
    let t = Topology::new();
    let pin = PinDir::new();
    let relay = Relay::start(
        &t.relay,
        &[
            "--iface",
            "cli0",
            "--pin-dir",
            pin.arg(),
            "--log-format",
            "json",
        ],
    );
    let log = relay.log();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
        assert!(
            ["INFO", "WARN", "ERROR", "DEBUG"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(v["msg"].is_string(), "{line}");
        lines += 1;
    }
    assert!(log.contains("relay running") && lines > 1, "{log}");
}

/// A child process killed (and reaped) on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `relay run` with no arguments (the test's pin and state directories aside) in a namespace
/// whose default route leaves by a veth: a SOCKS5 proxy on that interface's port 1080 whose
/// printed curl line works, with Telegram's links and a QR code; a second run keeps the user.
#[test]
fn without_arguments_a_socks5_proxy_that_curl_can_use() {
    let t = Topology::new();
    let pin = PinDir::new();
    // The internet: a web server on a public address (TEST-NET-3, which exists only inside
    // the upstream namespace), reached by the relay's default route out of up0.
    t.relay
        .ip(&["route", "add", "default", "via", UPSTREAM_V4, "dev", "up0"]);
    t.upstream
        .ip(&["addr", "add", "203.0.113.80/32", "dev", "eth0"]);
    // A minimal web server (python's looks its own address up in DNS, which is not here).
    let listener = t
        .upstream
        .run(|| std::net::TcpListener::bind("203.0.113.80:8080").unwrap());
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut c in listener.incoming().flatten() {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello through the default proxy\n";
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let state = pin.state();
    let run = || {
        let out = std::env::temp_dir().join(support::unique("stdout"));
        let child = Child(
            t.relay
                .command(relay_bin())
                .args(["run", "--pin-dir", pin.arg(), "--state-dir"])
                .arg(&state)
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("relay run"),
        );
        let start = Instant::now();
        let mut text = String::new();
        while start.elapsed() < Duration::from_secs(20)
            && !text.contains("QR")
            && !text.contains('█')
        {
            std::thread::sleep(Duration::from_millis(100));
            text = std::fs::read_to_string(&out).unwrap_or_default();
        }
        let _ = std::fs::remove_file(&out);
        (child, text)
    };
    let (relay, text) = run();
    let proxy = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("curl:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "--proxy").nth(1))
        .unwrap_or_else(|| panic!("no curl line in:\n{text}"))
        .to_owned();
    assert!(
        proxy.starts_with("socks5h://relay:") && proxy.ends_with("@198.18.2.1:1080"),
        "{proxy}"
    );
    assert!(
        text.contains("tg://socks?server=198.18.2.1&port=1080&user=relay&pass="),
        "{text}"
    );
    assert!(
        text.contains("https://t.me/socks?server=198.18.2.1"),
        "{text}"
    );
    let mut fetched = String::new();
    for _ in 0..20 {
        let out = t
            .client
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "--proxy",
                &proxy,
                "http://203.0.113.80:8080/hello.txt",
            ])
            .output()
            .expect("curl");
        fetched = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fetched, "hello through the default proxy\n");
    drop(relay);
    // A second run: the same user and password.
    let (_relay, again) = run();
    assert!(again.contains(&proxy), "{again}");
    assert!(again.contains("the same as before"), "{again}");
}
