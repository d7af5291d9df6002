//! End-to-end: restarts under traffic, in namespaces this test creates. Steady UDP flows
//! through a forward rule and through a SOCKS5 association, a CONNECT streaming bytes both
//! ways and an iperf3 UDP run keep going while the controller is replaced three times by a
//! successor that takes everything over (sockets, connections, the XDP link), and once killed
//! with SIGKILL. What the clients notice is counted: datagrams lost, bytes changed, resets.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use relay_common::frame::socks5_udp_header;
use serde_json::Value;
use support::{relay_cmd, stats, ConfigFile, Netns, PinDir, Relay, Topology};

const PASSWORD: &str = "correct horse battery";
const PROXY: &str = "198.18.1.1:1080";
const FORWARD: &str = "198.18.1.1:5000";
const ECHO: &str = "198.18.2.2:6000";
const TCP_ECHO: &str = "198.18.2.2:7000";
/// A TCP forward rule to the TCP echo server: its sessions are opened and carried by XDP.
const TCP_FRONT: &str = "198.18.1.1:7000";

fn config() -> ConfigFile {
    let hash = relay::socks5::users::hash_password(PASSWORD.as_bytes()).unwrap();
    ConfigFile::new(&format!(
        "[[forward]]\nname = \"vpn\"\nlisten = \"{FORWARD}\"\nupstream = \"{ECHO}\"\n\
         allow_private_upstream = true\n\
         [[forward]]\nname = \"iperf3\"\nlisten = \"198.18.1.1:5201\"\nupstream = \"198.18.2.2:5201\"\n\
         allow_private_upstream = true\n\
         [[forward]]\nname = \"tcp\"\nprotocol = \"tcp\"\nlisten = \"{TCP_FRONT}\"\nupstream = \"{TCP_ECHO}\"\n\
         allow_private_upstream = true\n\
         [socks5]\nlisten = \"{PROXY}\"\nconnect_path = \"kernel\"\n\
         [[socks5.users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\
         [policy]\nallow = [\"198.18.2.0/24\"]\n"
    ))
}

/// Room for a few hundred milliseconds of traffic while a test thread is not scheduled (the
/// test machine has two cores for the generators, the echo servers and the relay).
fn big_buffers(s: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a valid int option value on a socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// A steady UDP flow of numbered datagrams from the client namespace, echoed back: how many
/// were sent, and which came back.
struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<thread::JoinHandle<()>>,
    receiver: Option<thread::JoinHandle<Vec<bool>>>,
}

/// Datagrams a flow may send (its receive bitmap's size).
const MAX_SEQ: usize = 4_000_000;

impl Flow {
    /// Sends `rate` datagrams a second through `socket` to `to`, each `head` followed by its
    /// sequence number; the echo comes back with `reply_head` bytes before the number.
    fn start(
        socket: UdpSocket,
        to: SocketAddr,
        head: Vec<u8>,
        reply_head: usize,
        rate: u64,
    ) -> Flow {
        big_buffers(&socket);
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let rx = socket.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&sent));
        let sender = thread::spawn(move || {
            let start = Instant::now();
            let mut seq: u64 = 0;
            let mut dgram = head.clone();
            while !flag.load(Ordering::Relaxed) && (seq as usize) < MAX_SEQ {
                // Paced: what is due by now, at most 64 at once (inside a veth's XDP ring).
                let due = start.elapsed().as_micros() as u64 * rate / 1_000_000;
                for _ in 0..due.saturating_sub(seq).min(64) {
                    dgram.truncate(head.len());
                    dgram.extend_from_slice(&seq.to_be_bytes());
                    dgram.extend_from_slice(&[0x5a; 24]);
                    if socket.send_to(&dgram, to).is_ok() {
                        seq += 1;
                        count.store(seq, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_micros(500));
            }
        });
        let flag = Arc::clone(&stop);
        let receiver = thread::spawn(move || {
            let mut got = vec![false; MAX_SEQ];
            let mut buf = [0u8; 2048];
            let mut quiet_since: Option<Instant> = None;
            loop {
                match rx.recv_from(&mut buf) {
                    Ok((n, _)) if n >= reply_head + 8 => {
                        let seq =
                            u64::from_be_bytes(buf[reply_head..reply_head + 8].try_into().unwrap());
                        if let Some(slot) = got.get_mut(seq as usize) {
                            *slot = true;
                        }
                        quiet_since = None;
                    }
                    _ => {
                        if flag.load(Ordering::Relaxed) {
                            // Stopped, and nothing came for a while: all that will come came.
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(1) {
                                return got;
                            }
                        }
                    }
                }
            }
        });
        Flow {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Stops sending; returns (sent, lost).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.take().unwrap().join().unwrap();
        let got = self.receiver.take().unwrap().join().unwrap();
        let sent = self.sent.load(Ordering::Relaxed);
        let received = got[..sent as usize].iter().filter(|g| **g).count() as u64;
        let mut gaps = Vec::new();
        let mut i = 0;
        while i < sent as usize && gaps.len() < 10 {
            if !got[i] {
                let start = i;
                while i < sent as usize && !got[i] {
                    i += 1;
                }
                gaps.push((start, i - start));
            }
            i += 1;
        }
        if !gaps.is_empty() {
            eprintln!("first gaps (sequence number, length): {gaps:?}");
        }
        (sent, sent - received)
    }
}

/// 20,000 datagrams a second through the forward rule, echoed back.
fn forward_flow(t: &Topology) -> Flow {
    Flow::start(
        t.client.run(|| UdpSocket::bind("198.18.1.2:0").unwrap()),
        FORWARD.parse().unwrap(),
        Vec::new(),
        0,
        20_000,
    )
}

/// Logs in as alice and sends `request`; returns the control connection and the reply's
/// bound address.
fn socks_request(request: &[u8]) -> (TcpStream, SocketAddr) {
    let mut c = TcpStream::connect(PROXY).expect("connect to the proxy");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&[5, 1, 2]).unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"alice");
    auth.push(PASSWORD.len() as u8);
    auth.extend_from_slice(PASSWORD.as_bytes());
    c.write_all(&auth).unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(b, [1, 0], "alice logs in");
    c.write_all(request).unwrap();
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], [5, 0, 0, 1], "request granted: {reply:?}");
    let bnd = SocketAddr::from((
        [reply[4], reply[5], reply[6], reply[7]],
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    c.set_read_timeout(None).unwrap();
    (c, bnd)
}

fn request(command: u8, to: &str) -> Vec<u8> {
    let a: SocketAddr = to.parse().unwrap();
    let SocketAddr::V4(a) = a else { unreachable!() };
    let mut r = vec![5, command, 0, 1];
    r.extend_from_slice(&a.ip().octets());
    r.extend_from_slice(&a.port().to_be_bytes());
    r
}

/// A UDP echo server in the upstream namespace, with buffers for the moments its thread is
/// not scheduled (a drop there would not be the relay's).
fn udp_echo(ns: &Netns) -> Arc<AtomicBool> {
    let socket = ns.run(|| UdpSocket::bind(ECHO).expect("bind UDP echo"));
    big_buffers(&socket);
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    stop
}

/// The UDP counters of a namespace (`/proc/net/snmp`), for a failure message: buffer
/// overflows there are the test machine's, not the relay's.
fn udp_counters(ns: &Netns) -> String {
    ns.exec(&["cat", "/proc/net/snmp"])
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Datagrams the test network's veths could not take because a 256-frame ring was full (the
/// receiving side's softirq had no CPU for a moment; a real NIC's rings are larger and drained
/// by hardware): what the relay's XDP sent into a full ring (`xdp_xmit_errors` of its veths),
/// and what the client's and upstream's own sends met a full ring with (UDP `SndbufErrors`:
/// the kernel drops those silently, the sender sees success).
fn veth_ring_overflows(t: &Topology) -> u64 {
    let xmit: u64 = ["cli0", "up0"]
        .iter()
        .map(|i| {
            t.relay
                .exec(&["ethtool", "-S", i])
                .lines()
                .filter(|l| l.contains("xdp_xmit_errors"))
                .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    let sndbuf = |ns: &Netns| -> u64 {
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "SndbufErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    xmit + sndbuf(&t.client) + sndbuf(&t.upstream)
}

/// A TCP echo server in the upstream namespace.
fn tcp_echo(ns: &Netns) {
    let listener = ns.run(|| TcpListener::bind(TCP_ECHO).expect("bind TCP echo"));
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut conn = conn;
                let mut back = conn.try_clone().unwrap();
                let mut buf = [0u8; 65536];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if back.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = back.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 9)) as u8
}

/// A CONNECT streaming a byte pattern to the TCP echo server and checking every byte that
/// comes back.
struct Stream {
    stop: Arc<AtomicBool>,
    writer: thread::JoinHandle<Result<u64, String>>,
    reader: thread::JoinHandle<Result<u64, String>>,
}

impl Stream {
    /// A CONNECT through the SOCKS5 server to the TCP echo server.
    fn start(ns: &Netns) -> Stream {
        let (c, _) = ns.run(|| socks_request(&request(1, TCP_ECHO)));
        Stream::over(c)
    }

    /// A connection through the TCP forward rule to the TCP echo server.
    fn direct(ns: &Netns) -> Stream {
        Stream::over(ns.run(|| TcpStream::connect(TCP_FRONT).expect("connect through the rule")))
    }

    fn over(c: TcpStream) -> Stream {
        let mut w = c.try_clone().unwrap();
        let mut r = c;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let writer = thread::spawn(move || {
            let mut at: u64 = 0;
            let mut chunk = vec![0u8; 4096];
            let start = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                // About 2 MB/s.
                if at > start.elapsed().as_millis() as u64 * 2000 {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                }
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(at + k as u64);
                }
                w.write_all(&chunk)
                    .map_err(|e| format!("write at {at}: {e}"))?;
                at += chunk.len() as u64;
            }
            w.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            Ok(at)
        });
        let reader = thread::spawn(move || {
            let mut at: u64 = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(at),
                    Ok(n) => {
                        for b in &buf[..n] {
                            if *b != pattern(at) {
                                return Err(format!("byte {at} changed"));
                            }
                            at += 1;
                        }
                    }
                    Err(e) => return Err(format!("read at {at}: {e}")),
                }
            }
        });
        Stream {
            stop,
            writer,
            reader,
        }
    }

    /// Stops writing; returns (bytes written, bytes echoed back intact) or the error a side
    /// saw (a reset, a changed byte).
    fn finish(self) -> Result<(u64, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.join().unwrap()?;
        let read = self.reader.join().unwrap()?;
        Ok((written, read))
    }
}

/// Starts a successor while `old` runs; returns it once `old` has handed over and exited.
fn take_over(ns: &Netns, pin: &PinDir, config: &ConfigFile, mut old: Relay) -> Relay {
    let new = Relay::start(ns, &support::config_args(pin, config));
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = old.child.try_wait() {
            assert!(
                status.success(),
                "the old relay exits cleanly:\n{}",
                old.log()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the old relay did not exit after handing over:\n{}\nnew:\n{}",
            old.log(),
            new.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        old.log().contains("handed over; exiting"),
        "old:\n{}",
        old.log()
    );
    new
}

/// What a failure message needs: the namespaces' UDP counters, the veths' and the relay's.
fn diagnose(t: &Topology, pin: &PinDir) -> String {
    format!(
        "client {}; upstream {}; veths: {} {}; relay {}",
        udp_counters(&t.client),
        udp_counters(&t.upstream),
        t.relay.exec(&["ethtool", "-S", "cli0"]).replace('\n', " "),
        t.relay.exec(&["ethtool", "-S", "up0"]).replace('\n', " "),
        stats(&t.relay, "cli0", pin)
    )
}

/// No packet got a verdict that loses it: nothing dropped for want of a socket (no
/// controller), nothing lost in a redirect or a half-done rewrite.
fn relay_lost_nothing(s: &Value) {
    for reason in [
        "no_socket",
        "redirect_failed",
        "adjust_failed",
        "wrong_source",
    ] {
        assert_eq!(support::reason_packets(s, reason), 0, "{reason}: {s}");
    }
}

fn xdp_packets(s: &Value) -> u64 {
    ["relayed_tx", "relayed_redirect"]
        .iter()
        .map(|r| support::reason_packets(s, r))
        .sum()
}

#[test]
fn graceful_restarts_and_a_crash_lose_nothing_xdp_carries() {
    support::raise_fd_limit();
    let t = Topology::new();
    let pin = PinDir::new();
    let config = config();
    let echo = udp_echo(&t.upstream);
    tcp_echo(&t.upstream);
    let _iperf3 = support::Iperf3::serve(&t);
    let mut relay = Relay::start(&t.relay, &support::config_args(&pin, &config));
    thread::sleep(Duration::from_millis(300));
    let iperf = support::Iperf3::client(&t, "4M", 9);

    let ring = veth_ring_overflows(&t);
    let forward = forward_flow(&t);
    let (control, bnd) = t.client.run(|| socks_request(&request(3, "0.0.0.0:0")));
    let association = Flow::start(
        t.client.run(|| UdpSocket::bind("198.18.1.2:0").unwrap()),
        bnd,
        socks5_udp_header(ECHO.parse().unwrap(), 0),
        10,
        10_000,
    );
    let stream = Stream::start(&t.client);
    let direct = Stream::direct(&t.client);
    thread::sleep(Duration::from_millis(1500));
    let before = stats(&t.relay, "cli0", &pin);

    for round in 0..3 {
        relay = take_over(&t.relay, &pin, &config, relay);
        assert!(
            relay.log().contains("took over ")
                && relay
                    .log()
                    .contains("SOCKS5: took over 1 CONNECTs and 1 associations"),
            "round {round}: the successor runs everything its predecessor ran:\n{}",
            relay.log()
        );
        thread::sleep(Duration::from_millis(1500));
    }

    let (forward_sent, forward_lost) = forward.finish();
    let (assoc_sent, assoc_lost) = association.finish();
    let (written, echoed) = stream.finish().expect("the CONNECT never broke");
    // The TCP rule's connection goes on through the crash below.
    drop(control);
    let (iperf_sent, iperf_lost, sum) = support::Iperf3::result(iperf);
    let ring = veth_ring_overflows(&t) - ring;
    eprintln!(
        "across 3 handovers: forward rule {forward_sent} sent, {forward_lost} lost; \
         association {assoc_sent} sent, {assoc_lost} lost; iperf3 {iperf_sent} sent, \
         {iperf_lost} lost; CONNECT {written} bytes written, {echoed} echoed intact; \
         {ring} datagrams the test's veth rings could not take"
    );
    assert!(
        forward_sent > 50_000,
        "the forward flow sent {forward_sent}"
    );
    assert!(assoc_sent > 25_000, "the association sent {assoc_sent}");
    assert!(iperf_sent > 3000, "iperf3 sent {iperf_sent}: {sum}");
    assert!(written > 5_000_000, "the CONNECT carried {written} bytes");
    assert_eq!(echoed, written, "every CONNECT byte came back, in order");
    assert_eq!(
        support::rule(&stats(&t.relay, "cli0", &pin), "tcp")["sessions"],
        1,
        "the TCP rule's session was taken over each time"
    );
    // Nothing is lost by the relay. A datagram the relay's XDP sent into a veth whose ring
    // was full at that moment is the test network's loss (counted by the kernel), not the
    // relay's: with two cores shared by generators, echo servers and the starting relay,
    // the receiving namespace's softirq is sometimes late.
    assert!(
        forward_lost + assoc_lost + iperf_lost <= ring,
        "{forward_lost} + {assoc_lost} + {iperf_lost} datagrams lost, {ring} of them in full veth rings: {}",
        diagnose(&t, &pin)
    );
    let after = stats(&t.relay, "cli0", &pin);
    relay_lost_nothing(&after);
    assert!(
        xdp_packets(&after) > xdp_packets(&before) + 100_000,
        "the flows went through XDP across the restarts: {after}"
    );
    assert_eq!(after["controller"]["handovers"], 3, "{after}");
    // The CONNECT was carried in the kernel (sockmap) through the handovers, and its user's
    // account counts every byte once, each way (the CONNECT has ended: published within 1 s).
    let carried = |s: &serde_json::Value| {
        s["connect_kernel"]["redirected_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        carried(&after) - carried(&before) > written,
        "the kernel carried the CONNECT's bytes: {after}"
    );
    thread::sleep(Duration::from_millis(1500));
    let published = stats(&t.relay, "cli0", &pin);
    let alice = published["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == "alice"))
        .expect("alice's account");
    assert_eq!(alice["connect_bytes_to_destination"], written, "{alice}");
    assert_eq!(alice["connect_bytes_to_client"], written, "{alice}");

    // A crash: the fast path carries on without a controller, the next one takes over.
    let ring = veth_ring_overflows(&t);
    let forward = forward_flow(&t);
    // An association the crash will take with it (published within a second), and a
    // forward session whose client will send what the fast path leaves to the controller.
    let (lost_control, _) = t.client.run(|| socks_request(&request(3, "0.0.0.0:0")));
    let probe = t.client.run(|| {
        let s = UdpSocket::bind("198.18.1.2:0").unwrap();
        s.connect(FORWARD).unwrap();
        s
    });
    probe
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(round_trip_on(&probe), "the probe's session is open");
    thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(relay.child.id() as i32, libc::SIGKILL) };
    let _ = relay.child.wait();
    // While no controller runs, datagrams of a live session that the fast path declines
    // (TTL 1: the relay cannot forward them) are dropped and counted; no ICMP
    // port-unreachable tells the client to give up (its connected socket would see a refused
    // connection).
    probe.set_ttl(1).unwrap();
    let mut buf = [0u8; 64];
    let refused = (0..3)
        .filter(|_| {
            probe.send(b"ttl 1").unwrap();
            probe
                .recv(&mut buf)
                .err()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .count();
    assert_eq!(
        refused, 0,
        "no ICMP port-unreachable while no controller ran"
    );
    thread::sleep(Duration::from_millis(500));
    let relay = Relay::start(&t.relay, &support::config_args(&pin, &config));
    assert!(
        relay.log().contains("ended without stopping") && relay.log().contains("took over "),
        "the next controller takes over after a crash:\n{}",
        relay.log()
    );
    thread::sleep(Duration::from_millis(1000));
    let (sent, lost) = forward.finish();
    let (written, echoed) = direct
        .finish()
        .expect("the TCP rule's connection never broke: not at 3 handovers, not at a crash");
    assert!(
        written > 10_000_000,
        "the TCP rule's connection carried {written} bytes"
    );
    assert_eq!(echoed, written, "every byte came back, in order");
    let ring = veth_ring_overflows(&t) - ring;
    eprintln!("across a SIGKILL: forward rule {sent} sent, {lost} lost; {ring} datagrams the veth rings could not take");
    assert!(sent > 40_000, "the forward flow sent {sent}");
    assert!(
        lost <= ring,
        "XDP carried the flow while no controller ran: {lost} of {sent} lost, {ring} in full veth rings: {}",
        diagnose(&t, &pin)
    );
    let s = stats(&t.relay, "cli0", &pin);
    assert_eq!(
        support::reason_packets(&s, "no_socket"),
        3,
        "the session's TTL-1 datagrams, dropped while no controller ran: {s}"
    );
    for reason in ["redirect_failed", "adjust_failed", "wrong_source"] {
        assert_eq!(support::reason_packets(&s, reason), 0, "{reason}: {s}");
    }
    assert_eq!(s["controller"]["crash_recoveries"], 1, "{s}");
    assert_eq!(s["controller"]["lost_connections"], 0, "{s}");
    assert_eq!(
        s["controller"]["lost_associations"], 1,
        "the association the crash took, counted: {s}"
    );
    drop(lost_control);

    // `relay stop`: detached, state gone.
    support::relay_stop(&t.relay, &pin);
    assert!(!t.relay.xdp_attached("cli0") && !t.relay.xdp_attached("up0"));
    let left: Vec<String> = std::fs::read_dir(pin.path())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".debug"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left after `relay stop`: {left:?}");
    echo.store(true, Ordering::Relaxed);
    drop(relay);
}

/// Kills a process this test did not spawn itself (a successor `relay restart` started) when
/// the test ends, however it ends.
/// One UDP round trip through the forward rule to the echo server, from a new client.
fn round_trip(ns: &Netns) -> bool {
    let s = ns.run(|| {
        let s = UdpSocket::bind("198.18.1.2:0").unwrap();
        s.connect(FORWARD).unwrap();
        s
    });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    round_trip_on(&s)
}

/// One round trip through the forward rule on a socket connected to it (three tries).
fn round_trip_on(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    (0..3).any(|_| {
        s.send(b"ping through the relay").unwrap();
        matches!(s.recv(&mut buf), Ok(22))
    })
}

/// `relay restart` (systemd's ExecReload) starts a successor with the running relay's
/// arguments, which takes over; a relay refuses pinned maps of another layout, with one line
/// that says what to do, and leaves them alone.
#[test]
fn relay_restart_hands_over_and_other_layouts_are_refused() {
    let t = Topology::new();
    let pin = PinDir::new();
    let config = config();
    let echo = udp_echo(&t.upstream);
    let mut old = Relay::start(&t.relay, &support::config_args(&pin, &config));
    assert!(round_trip(&t.client));
    let (status, out, _guard) = support::relay_restart(&t.relay, &pin);
    let s = stats(&t.relay, "cli0", &pin);
    let new = s["controller"]["pid"].as_u64().unwrap_or(0) as u32;
    assert!(status.success(), "relay restart: {out}");
    assert!(out.contains(&format!("handed over to pid {new}")), "{out}");
    assert!(old.child.wait().unwrap().success(), "{}", old.log());
    assert_eq!(s["controller"]["handovers"], 1, "{s}");
    assert!(round_trip(&t.client), "the successor relays");

    support::relay_stop(&t.relay, &pin);
    let start = Instant::now();
    while relay::system::alive(new) && start.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!relay::system::alive(new), "the stopped relay exited");

    // Maps of another layout (an older or newer relay's, whose records this one would
    // misread): refused before anything is read or written.
    let relay = Relay::start(&t.relay, &support::config_args(&pin, &config));
    assert!(relay.stop(libc::SIGTERM));
    {
        use relay_common::session::Meta;
        let data = aya::maps::MapData::from_pin(pin.path().join("META")).unwrap();
        let mut meta: aya::maps::Array<_, Meta> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        let mut m = meta.get(&0, 0).unwrap();
        m.layout ^= 1;
        meta.set(0, m, 0).unwrap();
    }
    let out = relay_cmd(
        &t.relay,
        &[&["run"][..], &support::config_args(&pin, &config)].concat(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(!out.status.success());
    assert!(
        last.contains("with another map layout") && last.contains("relay stop"),
        "{err}"
    );
    assert!(
        t.relay.xdp_attached("cli0"),
        "the running program is left alone"
    );
    echo.store(true, Ordering::Relaxed);
}
