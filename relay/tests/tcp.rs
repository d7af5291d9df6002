//! End-to-end: TCP forward rules, in namespaces this test creates. Real TCP connections from
//! the client namespace to an echo server (and iperf3) in the upstream's, through the relay:
//! every byte is checked both ways, and the counters say that the kernel opened the sessions
//! and XDP carried the segments.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{packets, raise_fd_limit, rule, stats, ConfigFile, Netns, PinDir, Relay, Topology};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A TCP echo server on `addr` in `ns`: echoes every byte, and closes its side once the
/// client has closed its own (so half-closes are visible to clients).
fn echo_server(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr) {
    let std = ns.run(move || std::net::TcpListener::bind(addr).expect("bind echo server"));
    std.set_nonblocking(true).expect("non-blocking");
    rt.spawn(async move {
        let listener = TcpListener::from_std(std).expect("listener");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// `n` unconnected TCP sockets made in `ns` (a socket's namespace is the one it was made in).
fn sockets(ns: &Netns, n: usize, v6: bool) -> Vec<TcpSocket> {
    let raw = ns.run(move || {
        (0..n)
            .map(|_| {
                let domain = if v6 {
                    socket2::Domain::IPV6
                } else {
                    socket2::Domain::IPV4
                };
                let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
                s.set_nonblocking(true).expect("non-blocking");
                std::net::TcpStream::from(s)
            })
            .collect::<Vec<_>>()
    });
    raw.into_iter().map(TcpSocket::from_std_stream).collect()
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    // xorshift: different bytes per connection, no two connections alike.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connects, sends `data`, half-closes, reads everything back until the server closes; the
/// echo must be byte-exact.
async fn echo_once(socket: TcpSocket, to: SocketAddr, data: Vec<u8>) -> Result<(), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut back);
    let (wr, rd) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .map_err(|_| format!("echo timed out with {} of {} bytes", back.len(), data.len()))?;
    wr.map_err(|e| format!("write: {e}"))?;
    rd.map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err(format!(
            "echo differs: {} bytes back for {} sent",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

fn opens(s: &Value, cause: &str) -> u64 {
    s["kernel_opens"][cause].as_u64().unwrap_or(0)
}

fn reason(s: &Value, r: &str) -> u64 {
    support::reason_packets(s, r)
}

const V4: &str = "198.18.1.1:7000";

/// A TCP rule to the echo server whose sessions wait at most 5 s for their handshake.
const SHORT_TIMEOUTS: &str = r#"
[[forward]]
name = "tcp"
protocol = "tcp"
listen = "198.18.1.1:7000"
upstream = "198.18.2.2:7000"
allow_private_upstream = true
unanswered_timeout = "5s"
idle_timeout = "60s"
"#;

/// One connection from the client namespace to `to`.
fn connect(rt: &tokio::runtime::Runtime, t: &Topology, to: SocketAddr) -> TcpStream {
    let socket = sockets(&t.client, 1, to.is_ipv6()).remove(0);
    rt.block_on(socket.connect(to)).expect("connect")
}

/// Writes `what` on `s` and reads the same bytes back within 5 s.
fn ping(rt: &tokio::runtime::Runtime, s: &mut TcpStream, what: &[u8]) {
    rt.block_on(async {
        s.write_all(what).await.expect("write");
        let mut back = vec![0u8; what.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, what);
    })
}
const V6: &str = "[fd00:5a:1::1]:7000";

/// The relay with an IPv4 and an IPv6 TCP rule to the upstream's echo server.
fn start(t: &Topology, pin: &PinDir, extra: &[&str]) -> Relay {
    let mut args = vec!["--max-sessions-per-source", "20000"];
    args.extend_from_slice(extra);
    Relay::forwarding(
        &t.relay,
        pin,
        &[
            "tcp:198.18.1.1:7000=198.18.2.2:7000",
            "tcp:[fd00:5a:1::1]:7000=[fd00:5a:2::2]:7000",
        ],
        &args,
    )
}

/// A test's runtime, namespaces and pin directory, with the echo servers running.
struct Lab {
    rt: tokio::runtime::Runtime,
    t: Topology,
    pin: PinDir,
}

fn lab() -> Lab {
    let rt = runtime();
    let t = Topology::new();
    echo_servers(&rt, &t);
    Lab {
        rt,
        t,
        pin: PinDir::new(),
    }
}

fn echo_servers(rt: &tokio::runtime::Runtime, t: &Topology) {
    echo_server(rt, &t.upstream, "198.18.2.2:7000".parse().unwrap());
    echo_server(rt, &t.upstream, "[fd00:5a:2::2]:7000".parse().unwrap());
}

/// Runs `n` echoes at once from the client namespace to `to`, payloads of varied lengths;
/// returns the failures.
fn concurrent(rt: &tokio::runtime::Runtime, t: &Topology, to: SocketAddr, n: usize) -> Vec<String> {
    let socks = sockets(&t.client, n, to.is_ipv6());
    rt.block_on(async {
        let tasks: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let len = 1 + (i * 7919) % 150_000;
                tokio::spawn(echo_once(s, to, payload(i as u64, len)))
            })
            .collect();
        let mut failures = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            if let Err(e) = t.await.expect("task") {
                failures.push(format!("connection {i}: {e}"));
            }
        }
        failures
    })
}

#[test]
fn a_thousand_concurrent_connections_echo_byte_exact_through_xdp() {
    raise_fd_limit();
    let Lab { rt, t, pin } = lab();
    // Fresh links: IPv6 neighbour discovery waits for the link-local address's duplicate
    // address detection (a second or two) before the relay can resolve the upstream.
    std::thread::sleep(Duration::from_secs(2));
    let _relay = start(&t, &pin, &[]);
    let failures = concurrent(&rt, &t, V4.parse().unwrap(), 1000);
    assert!(
        failures.is_empty(),
        "{} of 1000 failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let failures = concurrent(&rt, &t, V6.parse().unwrap(), 100);
    assert!(failures.is_empty(), "IPv6: {failures:?}");
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(
        opens(&s, "opened"),
        1100,
        "every connection opened in the kernel: {s}"
    );
    assert_eq!(reason(&s, "open_to_controller"), 0, "{s}");
    let r = rule(&s, "forward0");
    assert_eq!(r["protocol"], "tcp");
    assert_eq!(
        r["opened"].as_u64(),
        Some(1000),
        "the controller learnt of each: {r}"
    );
    assert!(
        packets(&r["xdp"]["to_upstream"]) + packets(&r["closed_sessions"]["to_upstream"]) > 1000,
        "XDP carried the segments: {r}"
    );
    assert_eq!(packets(&r["slow_path"]["to_upstream"]), 0, "{r}");
}

#[test]
fn ten_thousand_short_connections_in_a_row() {
    raise_fd_limit();
    let Lab { rt, t, pin } = lab();
    let _relay = start(&t, &pin, &["--session-capacity", "40000"]);
    let to: SocketAddr = V4.parse().unwrap();
    let mut failures = Vec::new();
    for chunk in 0..10 {
        let socks = sockets(&t.client, 1000, false);
        rt.block_on(async {
            for (i, s) in socks.into_iter().enumerate() {
                let n = chunk * 1000 + i;
                if let Err(e) = echo_once(s, to, payload(n as u64, 1 + n % 300)).await {
                    failures.push(format!("connection {n}: {e}"));
                }
            }
        });
        assert!(failures.len() < 10, "failures: {failures:?}");
    }
    assert!(failures.is_empty(), "{failures:?}");
    let s = stats(&t.relay, "cli0", &pin);
    let opened = opens(&s, "opened");
    let to_controller = reason(&s, "open_to_controller");
    assert_eq!(opened + to_controller, 10_000, "{s}");
    assert!(opened >= 9_000, "the kernel opened most of them: {s}");
}

/// A listener on `addr` in `ns`, for a runtime to take.
fn listener(ns: &Netns, addr: &'static str) -> std::net::TcpListener {
    let std = ns.run(move || std::net::TcpListener::bind(addr).expect("bind upstream"));
    std.set_nonblocking(true).expect("non-blocking");
    std
}

#[test]
fn half_close_and_resets_reach_the_other_side() {
    let rt = runtime();
    let t = Topology::new();
    let pin = PinDir::new();
    // One upstream reads to the end, then answers and closes (it sees the client's half-close
    // and answers after it) and reports how its read ended; one resets every connection once
    // it has read a byte.
    let answering = listener(&t.upstream, "198.18.2.2:7000");
    let resetting = listener(&t.upstream, "198.18.2.2:7001");
    let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<usize>>();
    rt.spawn(async move {
        let answering = TcpListener::from_std(answering).expect("listener");
        while let Ok((mut s, _)) = answering.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let r = s.read_to_end(&mut got).await;
                if r.is_ok() {
                    let _ = s
                        .write_all(format!("read {} bytes", got.len()).as_bytes())
                        .await;
                    let _ = s.shutdown().await;
                }
                let _ = ended.send(r);
            });
        }
    });
    rt.spawn(async move {
        let resetting = TcpListener::from_std(resetting).expect("listener");
        while let Ok((mut s, _)) = resetting.accept().await {
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let _relay = Relay::forwarding(
        &t.relay,
        &pin,
        &[
            "tcp:198.18.1.1:7000=198.18.2.2:7000",
            "tcp:198.18.1.1:7001=198.18.2.2:7001",
        ],
        &[],
    );
    let mut socks = sockets(&t.client, 3, false);
    rt.block_on(async {
        // Half-close: the client's FIN reaches the upstream, whose answer still comes back.
        let mut s = socks
            .remove(0)
            .connect(V4.parse().unwrap())
            .await
            .expect("connect");
        s.write_all(&payload(1, 100_000)).await.expect("write");
        s.shutdown().await.expect("half-close");
        let answer = read_all(&mut s)
            .await
            .expect("the answer after the half-close");
        assert_eq!(answer, b"read 100000 bytes");
        let how = endings.recv().await.expect("the upstream reports");
        assert_eq!(how.expect("a clean end"), 100_000);

        // The client resets: the upstream's read fails with a reset.
        let s = socks
            .remove(0)
            .connect(V4.parse().unwrap())
            .await
            .expect("connect");
        let mut s = s;
        s.write_all(b"about to reset").await.expect("write");
        s.set_zero_linger().expect("linger 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        let how = tokio::time::timeout(Duration::from_secs(5), endings.recv())
            .await
            .expect("the upstream hears of the reset")
            .expect("a report");
        assert_eq!(
            how.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the client's RST reached the upstream"
        );

        // The upstream resets: the client's read fails with a reset.
        let to: SocketAddr = "198.18.1.1:7001".parse().unwrap();
        let mut s = socks.remove(0).connect(to).await.expect("connect");
        s.write_all(b"x").await.expect("write");
        let r = tokio::time::timeout(Duration::from_secs(5), read_all(&mut s))
            .await
            .expect("the client hears of the reset");
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the upstream's RST reached the client"
        );
    });
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(opens(&s, "opened"), 3, "{s}");
    assert_eq!(reason(&s, "tcp_uncarried"), 0, "{s}");
}

/// Reads what `s` sends until it closes or resets.
async fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.map(|_| v)
}

#[test]
fn iperf3_tcp_both_ways_through_a_forward_rule() {
    let t = Topology::new();
    let pin = PinDir::new();
    let _relay = Relay::forwarding(
        &t.relay,
        &pin,
        &["tcp:198.18.1.1:5201=198.18.2.2:5201"],
        &[],
    );
    for reverse in [false, true] {
        let _server = support::Group({
            use std::os::unix::process::CommandExt as _;
            t.upstream
                .command("iperf3")
                .args(["-s", "-1", "-B", "198.18.2.2", "-p", "5201"])
                .stdout(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .expect("iperf3 server")
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut client = t.client.command("iperf3");
        client.args(["-c", "198.18.1.1", "-p", "5201", "-t", "3", "-J"]);
        if reverse {
            client.arg("-R");
        }
        let out = client.output().expect("iperf3 client");
        assert!(
            out.status.success(),
            "iperf3 (reverse {reverse}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
        let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            received > 10_000_000,
            "iperf3 moved {received} bytes: {report}"
        );
    }
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(
        opens(&s, "opened"),
        4,
        "two connections per run, both in the kernel: {s}"
    );
    let r = rule(&s, "forward0");
    let carried = packets(&r["xdp"]["to_upstream"])
        + packets(&r["closed_sessions"]["to_upstream"])
        + packets(&r["xdp"]["to_client"])
        + packets(&r["closed_sessions"]["to_client"]);
    assert!(carried > 10_000, "XDP carried the segments: {r}");
    assert_eq!(reason(&s, "tcp_uncarried"), 0, "{s}");
}

#[test]
fn userspace_fallback_relays_tcp_rules() {
    raise_fd_limit();
    let Lab { rt, t, pin } = lab();
    let _relay = start(&t, &pin, &["--xdp-mode", "off"]);
    let failures = concurrent(&rt, &t, V4.parse().unwrap(), 100);
    assert!(failures.is_empty(), "{failures:?}");
    let failures = concurrent(&rt, &t, V6.parse().unwrap(), 20);
    assert!(failures.is_empty(), "{failures:?}");
    // Counted in the rule when each connection ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(&t.relay, "cli0", &pin);
        let r = rule(&s, "forward0");
        if r["closed"].as_u64() == Some(100) {
            assert_eq!(r["opened"].as_u64(), Some(100), "{r}");
            assert!(
                r["closed_sessions"]["to_upstream"]["bytes"].as_u64() > Some(100_000),
                "{r}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "connections not counted: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The userspace path (`--xdp-mode off`) ends a connection idle for the rule's idle_timeout,
/// as the kernel's session ends, and keeps one that talks.
#[test]
fn the_userspace_path_ends_idle_connections_and_keeps_talking_ones() {
    let Lab { rt, t, pin } = lab();
    let config = ConfigFile::new(&SHORT_TIMEOUTS.replace("\"60s\"", "\"10s\""));
    let mut args = support::config_args(&pin, &config);
    args.extend(["--xdp-mode", "off"]);
    let _relay = Relay::start(&t.relay, &args);
    let mut quiet = connect(&rt, &t, V4.parse().unwrap());
    let mut talking = connect(&rt, &t, V4.parse().unwrap());
    ping(&rt, &mut quiet, b"once");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(14) {
        ping(&rt, &mut talking, b"still here");
        std::thread::sleep(Duration::from_secs(2));
    }
    let ended = rt.block_on(async {
        let mut b = [0u8; 16];
        let _ = quiet.write_all(b"anyone?").await;
        tokio::time::timeout(Duration::from_secs(3), quiet.read(&mut b)).await
    });
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection was ended: {ended:?}"
    );
    ping(&rt, &mut talking, b"and on");
}

#[test]
fn an_idle_connection_outlives_the_unanswered_timeout_and_survives_a_restart() {
    let Lab { rt, t, pin } = lab();
    let config = ConfigFile::new(SHORT_TIMEOUTS);
    let relay = Relay::with_config(&t.relay, &pin, &config);
    let mut s = connect(&rt, &t, V4.parse().unwrap());
    let ping = |s: &mut TcpStream, what: &[u8]| ping(&rt, s, what);
    ping(&mut s, b"first");
    // Longer than the unanswered timeout, shorter than the idle one.
    std::thread::sleep(Duration::from_secs(8));
    ping(&mut s, b"after eight idle seconds");
    // No controller: XDP goes on relaying the session.
    assert!(relay.stop(libc::SIGTERM), "the relay stops cleanly");
    ping(&mut s, b"while no controller runs");
    let _relay = Relay::with_config(&t.relay, &pin, &config);
    ping(&mut s, b"after the restart");
    let out = support::relay_cmd(
        &t.relay,
        &[
            "sessions",
            "--iface",
            "cli0",
            "--pin-dir",
            pin.arg(),
            "--json",
        ],
    );
    let sessions: Value = serde_json::from_slice(&out.stdout).expect("sessions JSON");
    let listed = sessions.to_string();
    assert!(
        listed.contains("\"protocol\":\"tcp\"") && listed.contains("\"opened_by\":\"kernel\""),
        "the taken-over session is listed: {listed}"
    );
    // Closing both ways ends the session after a short linger.
    rt.block_on(async {
        s.shutdown().await.expect("shutdown");
        let rest = read_all(&mut s).await.expect("read to the end");
        assert!(rest.is_empty());
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(&t.relay, "cli0", &pin);
        if rule(&s, "tcp")["sessions"].as_u64() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed session lingers on: {s}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A client that reconnects from the same address and port right after its connection was
/// reset (while the session lingers) gets a working connection that outlives the linger: the
/// kernel reopens the session instead of the controller closing it under the new connection.
#[test]
fn a_connection_reusing_the_ports_of_one_just_reset_outlives_the_linger() {
    let Lab { rt, t, pin } = lab();
    let config = ConfigFile::new(SHORT_TIMEOUTS);
    let _relay = Relay::with_config(&t.relay, &pin, &config);
    let from: SocketAddr = "198.18.1.2:46000".parse().unwrap();
    let bound = || {
        let s = t.client.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_address(true).expect("SO_REUSEADDR");
            s.bind(&from.into()).expect("bind the client's port");
            s.set_nonblocking(true).expect("non-blocking");
            std::net::TcpStream::from(s)
        });
        rt.block_on(TcpSocket::from_std_stream(s).connect(V4.parse().unwrap()))
            .expect("connect")
    };
    let mut first = bound();
    ping(&rt, &mut first, b"the first connection");
    first.set_zero_linger().expect("SO_LINGER 0");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut second = bound();
    ping(&rt, &mut second, b"the second, on the same ports");
    // Past the 10 s linger the reset started.
    std::thread::sleep(LINGER + Duration::from_secs(3));
    ping(&rt, &mut second, b"after the linger");
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(rule(&s, "tcp")["sessions"], 1, "{s}");
}

/// How long a closed TCP session lingers.
const LINGER: Duration = relay::config::TCP_LINGER;

/// The relay's way to the upstream takes 1300-byte packets; both ends' links take 1500, so
/// both announce an MSS of 1460 and the client's full segments are too big for the relay.
fn smaller_route_to_the_upstream(t: &Topology) {
    let route = [
        "route",
        "replace",
        "198.18.2.0/24",
        "dev",
        "up0",
        "mtu",
        "1300",
    ];
    t.relay.ip(&route);
}

#[test]
fn a_smaller_route_mtu_is_found_by_path_mtu_discovery() {
    let Lab { rt, t, pin } = lab();
    smaller_route_to_the_upstream(&t);
    let _relay = start(&t, &pin, &[]);
    let failures = concurrent(&rt, &t, V4.parse().unwrap(), 4);
    assert!(failures.is_empty(), "{failures:?}");
    let s = stats(&t.relay, "cli0", &pin);
    assert!(
        reason(&s, "tcp_too_big") > 0,
        "the relay answered too-big segments with ICMP: {s}"
    );
    assert_eq!(opens(&s, "opened"), 4, "{s}");
    assert_eq!(reason(&s, "tcp_uncarried"), 0, "{s}");
}

/// `n` IPv4 client sockets in `ns` with path MTU discovery off: their segments leave without
/// DF.
fn sockets_without_df(ns: &Netns, n: usize) -> Vec<TcpSocket> {
    let socks = sockets(ns, n, false);
    socks.iter().for_each(without_df);
    socks
}

/// Turns path MTU discovery off on a client socket: its segments leave without DF.
fn without_df(s: &TcpSocket) {
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: setsockopt reads one c_int from `dont`, on a socket this test owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const dont).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_MTU_DISCOVER");
}

/// Each socket connects to `to` and echoes 200 KB of its own; what went wrong, per socket.
fn echo_each(rt: &tokio::runtime::Runtime, socks: Vec<TcpSocket>, to: SocketAddr) -> Vec<String> {
    rt.block_on(async {
        let tasks: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(echo_once(s, to, payload(i as u64, 200_000))))
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.expect("task") {
                failures.push(e);
            }
        }
        failures
    })
}

/// The same smaller route MTU for a client that does not set DF (path MTU discovery off):
/// XDP cannot carry its full segments and no ICMP is due; the controller relays them in
/// fragments that fit (without that they were dropped, and the connection stalled on its
/// retransmissions of the same size).
#[test]
fn segments_too_big_without_df_are_fragmented_by_the_controller() {
    let Lab { rt, t, pin } = lab();
    smaller_route_to_the_upstream(&t);
    let _relay = start(&t, &pin, &[]);
    let to: SocketAddr = V4.parse().unwrap();
    let failures = echo_each(&rt, sockets_without_df(&t.client, 4), to);
    assert!(failures.is_empty(), "{failures:?}");
    let s = stats(&t.relay, "cli0", &pin);
    all_relayed_by_the_controller(&s);
    assert_eq!(reason(&s, "tcp_too_big"), 0, "no DF, no ICMP: {s}");
}

/// XDP handed segments of the client's to the controller, which relayed them (none dropped
/// on either side).
fn all_relayed_by_the_controller(s: &Value) {
    assert!(
        reason(s, "tcp_to_controller") > 0,
        "XDP handed segments to the controller: {s}"
    );
    let relayed = &rule(s, "forward0")["tcp_slow_relayed"]["to_upstream"]["packets"];
    assert!(
        relayed.as_u64() > Some(0),
        "the controller relayed them: {s}"
    );
    assert_eq!(rule(s, "forward0")["tcp_slow_dropped"], 0, "{s}");
    assert_eq!(reason(s, "tcp_uncarried"), 0, "{s}");
}

/// A client behind a router that reaches the relay through a link of a smaller MTU, without
/// DF: its full segments arrive at the relay in IPv4 fragments. XDP hands them to the
/// controller, which reassembles each segment and relays it; before, they went to the relay
/// host's stack, which reassembled them, found no socket and reset the connection.
#[test]
fn segments_arriving_in_fragments_are_reassembled_and_relayed() {
    let Lab { rt, t, pin } = lab();
    let behind = Netns::new("b");
    support::veth(
        &behind,
        "eth0",
        &["198.18.9.2/24"],
        &t.client,
        "lan0",
        &["198.18.9.1/24"],
    );
    behind.ip(&["route", "add", "default", "via", "198.18.9.1"]);
    t.client.sysctl("net.ipv4.ip_forward", "1");
    t.client.ip(&[
        "route",
        "replace",
        "198.18.1.0/24",
        "dev",
        "eth0",
        "mtu",
        "1000",
    ]);
    t.relay
        .ip(&["route", "add", "198.18.9.0/24", "via", "198.18.1.2"]);
    let _relay = start(&t, &pin, &[]);
    let to: SocketAddr = V4.parse().unwrap();
    let failures = echo_each(&rt, sockets_without_df(&behind, 4), to);
    let s = stats(&t.relay, "cli0", &pin);
    assert!(failures.is_empty(), "{failures:?}: {s}");
    all_relayed_by_the_controller(&s);
}

/// After a connection without DF (relayed by the controller, nothing sent back to the client
/// since), a new connection from the same client with DF: its too-big segments are answered
/// with ICMP "fragmentation needed", which must reach the client at once. Before, XDP sent
/// those answers with XDP_TX into the relay's veth, whose peer (GRO, no XDP program) the
/// kernel does not wake for XDP_TX frames: they waited in its queue, and the connection
/// stalled in most runs.
#[test]
fn path_mtu_discovery_works_after_a_connection_without_df() {
    let Lab { rt, t, pin } = lab();
    smaller_route_to_the_upstream(&t);
    let _relay = start(&t, &pin, &[]);
    let to: SocketAddr = V4.parse().unwrap();
    // Three rounds (the stall showed in about two runs of three); the client forgets the
    // path MTU it learnt before each.
    for round in 0..3 {
        t.client.ip(&["route", "flush", "cache"]);
        let failures = echo_each(&rt, sockets_without_df(&t.client, 1), to);
        assert!(
            failures.is_empty(),
            "without DF, round {round}: {failures:?}"
        );
        let answered = reason(&stats(&t.relay, "cli0", &pin), "tcp_too_big");
        let failures = echo_each(&rt, sockets(&t.client, 1, false), to);
        let s = stats(&t.relay, "cli0", &pin);
        assert!(
            failures.is_empty(),
            "with DF, round {round}: {failures:?}: {s}"
        );
        assert!(
            reason(&s, "tcp_too_big") > answered,
            "round {round}: the relay answered the too-big segments with ICMP: {s}"
        );
    }
}

/// While the relay cannot resolve the upstream's link-layer address (its ARP replies are
/// dropped, its neighbour entry flushed), XDP has no next hop for the session; it hands the
/// segments to the controller, whose raw socket leaves them with the host's stack, which
/// holds them until the neighbour answers. Nothing is dropped as `tcp_uncarried`.
#[test]
fn segments_while_the_next_hop_is_unresolved_go_through_the_controller() {
    let Lab { rt, t, pin } = lab();
    let _relay = start(&t, &pin, &[]);
    let mut c = connect(&rt, &t, V4.parse().unwrap());
    ping(&rt, &mut c, b"before");
    // No ARP reply reaches the relay's stack from now on.
    for cmd in [
        "add table arp relaytest",
        "add chain arp relaytest in { type filter hook input priority 0; policy accept; }",
        "add rule arp relaytest in arp operation reply drop",
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        t.relay.exec(&args);
    }
    t.relay.ip(&["neigh", "flush", "dev", "up0"]);
    // The next-hop thread looks again within a second and finds the neighbour unresolved.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = t.relay.ip(&["neigh", "show", "198.18.2.2", "dev", "up0"]);
        if out.contains("INCOMPLETE") || out.contains("FAILED") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the neighbour stayed resolved: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let before = stats(&t.relay, "cli0", &pin);
    // Bytes sent now wait in the host's neighbour queue until ARP answers again.
    let data = payload(7, 20_000);
    rt.block_on(c.write_all(&data)).expect("write");
    std::thread::sleep(Duration::from_millis(300));
    t.relay
        .exec(&["nft", "delete", "table", "arp", "relaytest"]);
    let mut back = vec![0u8; data.len()];
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
            .await
            .expect("the echo once the neighbour answered")
            .expect("echo");
    });
    assert_eq!(back, data);
    let s = stats(&t.relay, "cli0", &pin);
    let handed = reason(&s, "tcp_to_controller") - reason(&before, "tcp_to_controller");
    assert!(handed > 0, "XDP handed the segments over: {s}");
    let relayed = &rule(&s, "forward0")["tcp_slow_relayed"]["to_upstream"]["packets"];
    assert!(
        relayed.as_u64() > Some(0),
        "the controller relayed them: {s}"
    );
    assert_eq!(reason(&s, "tcp_uncarried"), 0, "{s}");
}

/// Half-open connections (a SYN whose sender never completes the handshake: a spoofed
/// source, a SYN flood) end after the unanswered timeout, although the upstream answered
/// them; an established connection stays.
#[test]
fn half_open_connections_end_after_the_unanswered_timeout() {
    let Lab { rt, t, pin } = lab();
    let config = ConfigFile::new(SHORT_TIMEOUTS);
    let _relay = Relay::with_config(&t.relay, &pin, &config);
    let to: SocketAddr = V4.parse().unwrap();
    let mut established = connect(&rt, &t, to);
    // The client namespace never answers the upstream's SYN-ACKs (no RST either), like a
    // spoofed source: 20 SYNs from raw sockets.
    t.client.exec(&[
        "nft",
        "add table inet halfopen; add chain inet halfopen out { type filter hook output priority 0; }; \
         add rule inet halfopen out tcp flags rst drop",
    ]);
    t.client.run(move || {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::TCP),
        )
        .expect("raw socket");
        for port in 61000..61020u16 {
            let src: SocketAddr = SocketAddr::new("198.18.1.2".parse().unwrap(), port);
            let frame = relay_common::frame::Frame::tcp(src, to, 0x02, b"").build();
            // The TCP header (checksummed for these addresses), after Ethernet and IPv4.
            raw.send_to(&frame[34..54], &to.into()).expect("send SYN");
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(rule(&s, "tcp")["sessions"], 21, "{s}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = stats(&t.relay, "cli0", &pin);
        let r = rule(&s, "tcp");
        if r["sessions"] == 1 {
            assert_eq!(r["closed_unanswered"], 20, "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "half-open sessions linger: {r}");
        std::thread::sleep(Duration::from_millis(500));
    }
    ping(&rt, &mut established, b"still here");
}
