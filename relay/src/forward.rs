//! Forward rules at run time: the listening sockets (the slow path for new flows), one socket
//! per session (its reserved relay port, and the slow path for replies), expiry, next hops,
//! and recovery of the sessions a previous controller left in the pinned maps.
//!
//! Whether XDP or this code moves a session's bytes, the session is the same: opened, limited,
//! accounted and expired by [`crate::sessions::Table`].

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use aya::Ebpf;
use log::{debug, info, warn};
use relay_common::session::{SlowPath, Traffic, NEXTHOP_NONE, TO_CLIENT, TO_UPSTREAM};
use tokio::{io::Interest, net::UdpSocket, task::AbortHandle};

use crate::{
    config::{Config, ForwardRule},
    datapath::{self, Datapath, Endpoints},
    nexthop,
    sessions::{Entry, Observed, Refusal, RuleLimits, Table},
    udp,
};

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of the XDP program's `last_seen`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec, which clock_gettime fills in.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the kernel and the controller's own relays saw of session `id`: the table's view of
/// liveness and of whether the upstream answered.
fn observe(datapath: Option<&Datapath>, live: &HashMap<u32, Live>, id: u32) -> Observed {
    let kernel = datapath.and_then(|dp| dp.session(id).ok());
    let slow = live.get(&id).map(|l| &l.io.slow);
    let slow_replies = slow.map_or(0, |s| s.packets[TO_CLIENT as usize].load(Ordering::Relaxed));
    Observed {
        kernel_packets: kernel.map_or(0, |s| s.packets()),
        slow_seen: slow.map_or(0, |s| s.last_seen.load(Ordering::Relaxed)),
        answered: kernel.is_some_and(|s| s.traffic[TO_CLIENT as usize].packets > 0)
            || slow_replies > 0,
    }
}

/// One listen port of a forward rule.
pub struct Rule {
    pub index: u16,
    pub listen: SocketAddr,
    socket: UdpSocket,
    /// What a reload may change: limits, allow list, the upstream's address.
    current: std::sync::RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    config: ForwardRule,
    upstream: SocketAddr,
}

impl Rule {
    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn limits(&self) -> RuleLimits {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        RuleLimits {
            max_sessions: c.config.max_sessions,
            idle_timeout: c.config.idle_timeout,
            max_sessions_per_source: c.config.max_sessions_per_source,
            new_sessions_per_second: c.config.new_sessions_per_second,
            new_sessions_burst: c.config.new_sessions_burst,
            unanswered_timeout: c.config.unanswered_timeout,
        }
    }

    fn name(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .name
            .clone()
    }
}

/// Expands configured rules into one entry per listen port, resolving upstream names.
fn expand(config: &Config) -> anyhow::Result<Vec<(SocketAddr, Current)>> {
    let mut out = Vec::new();
    for rule in &config.forward {
        let upstream_ip = rule.resolve_upstream()?;
        for port in rule.listen_ports.first..=rule.listen_ports.last {
            out.push((
                SocketAddr::new(rule.listen_ip, port),
                Current {
                    config: rule.clone(),
                    upstream: SocketAddr::new(upstream_ip, rule.upstream_port(port)),
                },
            ));
        }
    }
    Ok(out)
}

/// Traffic the controller relayed itself for one session, not yet written to `SLOWPATH`.
#[derive(Default)]
struct SlowCounters {
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    last_seen: AtomicU64,
    dirty: AtomicBool,
}

impl SlowCounters {
    fn add(&self, direction: u32, bytes: usize, now: u64) {
        let d = direction as usize & 1;
        self.packets[d].fetch_add(1, Ordering::Relaxed);
        self.bytes[d].fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_seen.fetch_max(now, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn snapshot(&self, opened: u64) -> SlowPath {
        let t = |d: usize| Traffic {
            packets: self.packets[d].load(Ordering::Relaxed),
            bytes: self.bytes[d].load(Ordering::Relaxed),
        };
        SlowPath {
            traffic: [t(0), t(1)],
            last_seen: self.last_seen.load(Ordering::Relaxed),
            opened,
        }
    }
}

/// A live session's I/O side.
struct SessionIo {
    id: u32,
    rule: u16,
    ends: Endpoints,
    socket: UdpSocket,
    slow: SlowCounters,
    opened: u64,
}

struct Live {
    io: Arc<SessionIo>,
    task: AbortHandle,
}

struct State {
    table: Table,
    live: HashMap<u32, Live>,
    datapath: Option<Datapath>,
    ebpf: Option<Ebpf>,
    netlink: Option<nexthop::Netlink>,
    nexthops: nexthop::Table,
    last_refusal_log: HashMap<&'static str, Instant>,
    /// Record ids for SOCKS5 flows, after the forward sessions' ids.
    socks_free: Vec<u32>,
}

/// The controller: rules, sessions, and the state behind them.
pub struct Controller {
    rules: Vec<Rule>,
    state: Mutex<State>,
    /// XDP relays established sessions (false: `--xdp-mode off` or the kernel refused).
    fast_path: bool,
    /// Interfaces the program is attached to; only these can be next-hop egresses.
    egress: Vec<u32>,
}

/// Writes a rule's name and addresses into its `RULES` slot.
fn label(r: &mut relay_common::session::RuleStats, listen: SocketAddr, c: &Current) {
    r.name = relay_common::session::name32(&c.config.name);
    // Mixed families are shown IPv6 (mapped), like the session records.
    let same = listen.is_ipv4() == c.upstream.is_ipv4();
    let a = |ip: IpAddr| match (same, ip) {
        (false, IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
        _ => datapath::addr16(ip),
    };
    r.listen = a(listen.ip());
    r.upstream = a(c.upstream.ip());
    r.listen_port = listen.port();
    r.upstream_port = c.upstream.port();
    r.family = if same {
        nexthop::family_of(listen.ip())
    } else {
        relay_common::packet::FAMILY_V6
    };
}

/// What the controller starts from.
pub struct Setup {
    pub config: Config,
    pub ebpf: Option<Ebpf>,
    pub datapath: Option<Datapath>,
    pub fast_path: bool,
    pub egress: Vec<u32>,
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

impl Controller {
    /// Resolves upstreams, binds the listening sockets and takes over the sessions left in the
    /// pinned maps. Must run inside the tokio runtime; XDP is attached afterwards.
    pub fn new(setup: Setup) -> anyhow::Result<Arc<Controller>> {
        let Setup {
            config,
            ebpf,
            datapath,
            fast_path,
            egress,
        } = setup;
        let mut rules = Vec::new();
        for (listen, current) in expand(&config)? {
            let rule = &current.config;
            let std = udp::bind(listen, false).with_context(|| {
                format!(
                    "rule {}: cannot listen on {listen} (in use by another program?)",
                    rule.name
                )
            })?;
            let index = u16::try_from(rules.len())
                .ok()
                .filter(|i| u32::from(*i) < relay_common::session::RULE_SLOTS)
                .ok_or_else(|| {
                    anyhow!(
                        "too many listen ports (at most {})",
                        relay_common::session::RULE_SLOTS
                    )
                })?;
            info!(
                "rule {}: {listen} -> {} (idle timeout {}s, at most {} sessions)",
                rule.name,
                current.upstream,
                rule.idle_timeout.as_secs(),
                rule.max_sessions
            );
            // New flows arrive here in bursts (a VPN server's clients after a move, say).
            udp::set_receive_buffer(&std, 8 << 20);
            rules.push(Rule {
                index,
                listen,
                socket: UdpSocket::from_std(std).context("registering a listening socket")?,
                current: std::sync::RwLock::new(current),
            });
        }
        let netlink = if fast_path {
            Some(nexthop::Netlink::open().context("opening an rtnetlink socket")?)
        } else {
            None
        };
        let mut datapath = datapath;
        if let Some(dp) = datapath.as_mut() {
            for index in 0..relay_common::session::RULE_SLOTS as u16 {
                let rule = rules.get(usize::from(index));
                dp.update_rule(index, |r| {
                    r.configured = u8::from(rule.is_some());
                    if let Some(rule) = rule {
                        label(r, rule.listen, &rule.current());
                    }
                })?;
            }
        }
        let controller = Arc::new(Controller {
            rules,
            state: Mutex::new(State {
                table: Table::new(config.session_capacity, config.session_ports),
                live: HashMap::new(),
                datapath,
                ebpf,
                netlink,
                nexthops: nexthop::Table::default(),
                last_refusal_log: HashMap::new(),
                socks_free: {
                    let first = config.session_capacity;
                    let n = config.socks5.as_ref().map_or(0, |s| s.fast_path_flows);
                    (first..first + n).rev().collect()
                },
            }),
            fast_path,
            egress,
        });
        controller.recover();
        Ok(controller)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mutable access to the loaded object (to attach the program).
    pub fn with_ebpf<T>(&self, f: impl FnOnce(&mut Ebpf) -> T) -> Option<T> {
        self.lock().ebpf.as_mut().map(f)
    }

    /// Starts the listeners and the housekeeping task.
    pub fn spawn(self: &Arc<Self>) {
        for i in 0..self.rules.len() {
            let c = Arc::clone(self);
            tokio::spawn(async move { c.listen(i).await });
        }
        let c = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                c.housekeeping();
            }
        });
    }

    async fn listen(self: Arc<Self>, i: usize) {
        let rule = &self.rules[i];
        loop {
            if let Err(e) = rule.socket.readable().await {
                warn!("rule {}: listening socket failed: {e}", rule.name());
                return;
            }
            let fd = rule.socket.as_raw_fd();
            let r = rule.socket.try_io(Interest::READABLE, || {
                udp::recv_batch(fd, |batch| {
                    let now = monotonic_ns();
                    for d in batch {
                        self.from_client(rule, d, now);
                    }
                })
            });
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("rule {}: receiving: {e}", rule.name());
                }
            }
        }
    }

    /// A datagram from a client on a rule's listening socket: the first of a new session, or
    /// one the fast path declined.
    fn from_client(self: &Arc<Self>, rule: &Rule, d: &udp::Datagram<'_>, now: u64) {
        if d.truncated {
            warn!(
                "rule {}: dropped a truncated datagram from {}",
                rule.name(),
                d.peer
            );
            return;
        }
        let io = {
            let mut st = self.lock();
            match st.table.find(rule.index, d.peer) {
                Some(id) => {
                    st.table.touch(id, now);
                    st.live.get(&id).map(|l| Arc::clone(&l.io))
                }
                None => self.open(&mut st, rule, d.peer, d.local, now),
            }
        };
        let Some(io) = io else { return };
        // A plain non-blocking send: tokio's `try_send` refuses until the reactor has seen the
        // socket writable, which a brand-new socket has not.
        let out = [udp::Outgoing {
            data: d.data,
            to: None,
            from: None,
        }];
        match udp::send_batch(io.socket.as_raw_fd(), &out) {
            Ok(_) => io.slow.add(TO_UPSTREAM, d.data.len(), now),
            Err(e) => debug!("session {}: sending upstream: {e}", io.id),
        }
    }

    fn refused(&self, st: &mut State, rule: &Rule, client: SocketAddr, why: Refusal) {
        if let Some(dp) = st.datapath.as_mut() {
            let _ = dp.update_rule(rule.index, |r| match why {
                Refusal::NotAllowed => r.refused_not_allowed += 1,
                Refusal::RuleLimit => r.refused_limit += 1,
                Refusal::Full => r.refused_full += 1,
                Refusal::NoPort => r.refused_no_port += 1,
                Refusal::SourceLimit => r.refused_source_limit += 1,
                Refusal::RateLimited => r.refused_rate += 1,
            });
        }
        let last = st
            .last_refusal_log
            .entry(why.name())
            .or_insert_with(|| Instant::now() - Duration::from_secs(10));
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            let msg = match why {
                Refusal::NotAllowed => "client not in the rule's allow list",
                Refusal::RuleLimit => "the rule's max_sessions reached",
                Refusal::Full => "session table full (raise relay.session_capacity)",
                Refusal::NoPort => "no free session port (widen relay.session_ports)",
                Refusal::SourceLimit => "the address has max_sessions_per_source sessions",
                Refusal::RateLimited => "over the rule's new_sessions_per_second",
            };
            warn!(
                "rule {}: refused a session for {client}: {msg}",
                rule.name()
            );
        }
    }

    /// Opens a session: reserve its port with a socket connected to the upstream, install it
    /// in the maps, start relaying its replies.
    fn open(
        self: &Arc<Self>,
        st: &mut State,
        rule: &Rule,
        client: SocketAddr,
        local: Option<IpAddr>,
        now: u64,
    ) -> Option<Arc<SessionIo>> {
        let current = rule.current();
        let allowed = current.config.client_allowed(client.ip());
        let opened = {
            let State {
                table,
                datapath,
                live,
                ..
            } = &mut *st;
            table.open(rule.index, rule.limits(), client, allowed, now, |id| {
                observe(datapath.as_ref(), live, id)
            })
        };
        let entry = match opened {
            Ok(o) => {
                if let Some(evicted) = o.evicted {
                    debug!(
                        "rule {}: evicted the unanswered session of {} for {client}",
                        rule.name(),
                        evicted.client
                    );
                    if let Some(dp) = st.datapath.as_mut() {
                        let _ = dp.update_rule(evicted.rule, |r| r.evicted_unanswered += 1);
                    }
                    self.close_entry(st, evicted);
                }
                o.entry
            }
            Err(why) => {
                self.refused(st, rule, client, why);
                return None;
            }
        };
        let socket = match self.session_socket(st, &entry, current.upstream) {
            Ok(s) => s,
            Err(e) => {
                warn!(
                    "rule {}: no socket for a session of {client}: {e:#}",
                    rule.name()
                );
                st.table.close(entry.id);
                return None;
            }
        };
        let back = match udp::local_addr(&socket) {
            Ok(a) => a,
            Err(e) => {
                warn!("session socket address: {e}");
                st.table.close(entry.id);
                return None;
            }
        };
        let front_ip = local
            .filter(|ip| !ip.is_unspecified())
            .unwrap_or(rule.listen.ip());
        let ends = Endpoints {
            client,
            front: SocketAddr::new(front_ip, rule.listen.port()),
            back,
            upstream: current.upstream,
        };
        let io = match self.start(st, entry.id, rule.index, ends, socket, unix_seconds(), now) {
            Ok(io) => io,
            Err(e) => {
                warn!(
                    "rule {}: session for {client} not installed: {e:#}",
                    rule.name()
                );
                st.table.close(entry.id);
                return None;
            }
        };
        if let Some(dp) = st.datapath.as_mut() {
            let _ = dp.update_rule(rule.index, |r| r.opened += 1);
        }
        debug!(
            "session {} opened: {} -> {} | {} -> {}",
            entry.id, ends.client, ends.front, ends.back, ends.upstream
        );
        Some(io)
    }

    /// A socket bound to the session's port (or the next free one) and connected upstream.
    fn session_socket(
        &self,
        st: &mut State,
        entry: &Entry,
        upstream: SocketAddr,
    ) -> anyhow::Result<std::net::UdpSocket> {
        let mut port = entry.port;
        for _ in 0..64 {
            match udp::bind(
                SocketAddr::new(unspecified(upstream.is_ipv4()), port),
                false,
            ) {
                Ok(s) => {
                    s.connect(upstream)
                        .with_context(|| format!("connecting to {upstream}"))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    port = st
                        .table
                        .replace_port(entry.id)
                        .ok_or_else(|| anyhow!("no free session port"))?;
                }
                Err(e) => return Err(anyhow!(e).context(format!("binding session port {port}"))),
            }
        }
        Err(anyhow!(
            "64 session ports in a row are taken by other programs"
        ))
    }

    /// Installs a session in the maps (with its next hops) and spawns its reply relay.
    #[allow(clippy::too_many_arguments)]
    fn start(
        self: &Arc<Self>,
        st: &mut State,
        id: u32,
        rule: u16,
        ends: Endpoints,
        socket: std::net::UdpSocket,
        opened: u64,
        now: u64,
    ) -> anyhow::Result<Arc<SessionIo>> {
        let nexthop = if self.fast_path && ends.same_family() {
            [
                self.nexthop_for(st, ends.upstream.ip()),
                self.nexthop_for(st, ends.client.ip()),
            ]
        } else {
            [NEXTHOP_NONE; 2]
        };
        let slow = SlowCounters::default();
        let snapshot = slow.snapshot(opened);
        if let Some(dp) = st.datapath.as_mut() {
            dp.install(id, &datapath::record(&ends, rule, nexthop, now), &snapshot)?;
        }
        let io = Arc::new(SessionIo {
            id,
            rule,
            ends,
            socket: UdpSocket::from_std(socket).context("registering a session socket")?,
            slow,
            opened,
        });
        let c = Arc::clone(self);
        let task = tokio::spawn(c.replies(Arc::clone(&io))).abort_handle();
        st.live.insert(
            id,
            Live {
                io: Arc::clone(&io),
                task,
            },
        );
        Ok(io)
    }

    /// Relays what reaches a session's socket (replies the fast path declined, or all of them
    /// without XDP) to the client, from exactly the address the client sent to.
    async fn replies(self: Arc<Self>, io: Arc<SessionIo>) {
        let Some(rule) = self.rules.get(usize::from(io.rule)) else {
            return;
        };
        let listener = rule.socket.as_raw_fd();
        let fd = io.socket.as_raw_fd();
        loop {
            if io.socket.readable().await.is_err() {
                return;
            }
            let r = io.socket.try_io(Interest::READABLE, || {
                udp::recv_batch(fd, |batch| {
                    let now = monotonic_ns();
                    let out: Vec<udp::Outgoing<'_>> = batch
                        .iter()
                        .filter(|d| !d.truncated && d.peer == io.ends.upstream)
                        .map(|d| udp::Outgoing {
                            data: d.data,
                            to: Some(io.ends.client),
                            from: Some(io.ends.front.ip()),
                        })
                        .collect();
                    match udp::send_batch(listener, &out) {
                        Ok(n) => {
                            for m in &out[..n] {
                                io.slow.add(TO_CLIENT, m.data.len(), now);
                            }
                        }
                        Err(e) => debug!("session {}: sending to the client: {e}", io.id),
                    }
                })
            });
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::WouldBlock {
                    debug!("session {}: receiving: {e}", io.id);
                }
            }
        }
    }

    /// A `NEXTHOPS` slot for packets to `dst`, or [`NEXTHOP_NONE`] (slow path) when the route
    /// leaves by an interface XDP is not attached to, or there is no route.
    fn nexthop_for(&self, st: &mut State, dst: IpAddr) -> u16 {
        let Some(netlink) = st.netlink.as_mut() else {
            return NEXTHOP_NONE;
        };
        let route = match netlink.route_get(dst) {
            Ok(Some(r)) => r,
            Ok(None) => {
                debug!("no route to {dst}: its packets take the slow path");
                return NEXTHOP_NONE;
            }
            Err(e) => {
                debug!("route to {dst}: {e}");
                return NEXTHOP_NONE;
            }
        };
        if !self.egress.contains(&route.oif) {
            debug!(
                "the route to {dst} leaves by ifindex {}, which XDP is not attached to: slow path",
                route.oif
            );
            return NEXTHOP_NONE;
        }
        let via = route.gateway.unwrap_or(dst);
        let Some((slot, new)) = st.nexthops.slot(route.oif, via) else {
            warn!("the next-hop table is full; sessions via {via} use the slow path");
            return NEXTHOP_NONE;
        };
        if new {
            self.refresh_slot(st, slot, route.oif, via);
        }
        slot
    }

    fn refresh_slot(&self, st: &mut State, slot: u16, oif: u32, via: IpAddr) {
        let State {
            netlink, datapath, ..
        } = st;
        let (Some(netlink), Some(dp)) = (netlink.as_mut(), datapath.as_mut()) else {
            return;
        };
        match netlink.nexthop(oif, via) {
            Ok(entry) => {
                if let Err(e) = dp.set_nexthop(slot, &entry) {
                    warn!("next hop {via}: {e:#}");
                }
            }
            Err(e) => debug!("next hop {via}: {e}"),
        }
    }

    /// Once a second: publish slow-path counters, expire idle sessions, refresh next hops.
    fn housekeeping(&self) {
        let now = monotonic_ns();
        let mut st = self.lock();
        let st = &mut *st;
        // Publish what the controller relayed, so `relay sessions` and a successor see it.
        if let Some(dp) = st.datapath.as_mut() {
            for live in st.live.values() {
                if live.io.slow.dirty.swap(false, Ordering::Relaxed) {
                    let _ = dp.set_slow(live.io.id, &live.io.slow.snapshot(live.io.opened));
                }
            }
        }
        let expired = {
            let State {
                table,
                datapath,
                live,
                ..
            } = &mut *st;
            let rules = &self.rules;
            table.expired(
                now,
                |r| rules.get(usize::from(r)).map(Rule::limits),
                |id| observe(datapath.as_ref(), live, id),
            )
        };
        // Traffic XDP carried goes into the session's pinned slow-path record, where `relay
        // sessions` reads the idle time (the XDP program keeps no clock).
        for id in &expired.carried {
            if let Some(l) = st.live.get(id) {
                l.io.slow.last_seen.fetch_max(now, Ordering::Relaxed);
                l.io.slow.dirty.store(true, Ordering::Relaxed);
            }
        }
        for id in &expired.unanswered {
            if let Some(rule) = st.table.get(*id).map(|e| e.rule) {
                if let Some(dp) = st.datapath.as_mut() {
                    let _ = dp.update_rule(rule, |r| r.closed_unanswered += 1);
                }
            }
        }
        for id in expired.closed {
            self.close(st, id);
        }
        let slots: Vec<_> = st.nexthops.entries().collect();
        for (slot, oif, via) in slots {
            self.refresh_slot(st, slot, oif, via);
        }
    }

    /// Closes a session: stop its relay, take it out of the maps, account its traffic.
    fn close(&self, st: &mut State, id: u32) {
        if let Some(entry) = st.table.close(id) {
            self.close_entry(st, entry);
        }
    }

    /// The I/O and map side of closing `entry`, which the table has let go of already.
    fn close_entry(&self, st: &mut State, entry: Entry) {
        let id = entry.id;
        let live = st.live.remove(&id);
        if let Some(l) = &live {
            l.task.abort();
        }
        let mut retired = [Traffic::default(); 2];
        if let Some(dp) = st.datapath.as_mut() {
            match dp.remove(id) {
                Ok((session, slow_pinned)) => {
                    // The live counters are newer than what was last published.
                    let slow = live
                        .as_ref()
                        .map_or(slow_pinned, |l| l.io.slow.snapshot(l.io.opened));
                    for (d, r) in retired.iter_mut().enumerate() {
                        r.packets = session.traffic[d].packets + slow.traffic[d].packets;
                        r.bytes = session.traffic[d].bytes + slow.traffic[d].bytes;
                    }
                }
                Err(e) => warn!("session {id}: removing from the maps: {e:#}"),
            }
            let _ = dp.update_rule(entry.rule, |r| {
                r.closed += 1;
                for (total, t) in r.retired.iter_mut().zip(retired) {
                    total.packets += t.packets;
                    total.bytes += t.bytes;
                }
            });
        }
        debug!("session {id} of {} closed (idle)", entry.client);
    }

    /// Takes over the sessions a previous controller left in the pinned maps. Runs before XDP
    /// is attached, so rewriting records cannot race with the fast path.
    fn recover(self: &Arc<Self>) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(found) = st.datapath.as_ref().map(Datapath::active) else {
            return;
        };
        let now = monotonic_ns();
        let (mut kept, mut dropped) = (0, 0);
        for (id, record) in found {
            if datapath::is_socks(&record) {
                // SOCKS5 associations end with their control connections, which a restart
                // closes: their fast-path flows go too.
                if let Some(dp) = st.datapath.as_mut() {
                    let _ = dp.remove(id);
                }
                continue;
            }
            let ends = datapath::endpoints(&record);
            let rule = self.rules.iter().find(|r| {
                r.index == record.rule
                    && r.listen.port() == ends.front.port()
                    && r.current().upstream == ends.upstream
            });
            let slow_pinned = st
                .datapath
                .as_ref()
                .and_then(|dp| dp.slow(id).ok())
                .unwrap_or_default();
            let restored = rule.and_then(|rule| {
                // A restart does not count as idle time.
                let mut entry = Entry::new(id, rule.index, ends.client, ends.back.port(), now);
                entry.answered = record.traffic[TO_CLIENT as usize].packets > 0
                    || slow_pinned.traffic[TO_CLIENT as usize].packets > 0;
                if !st.table.recover(entry) {
                    return None;
                }
                let socket = udp::bind(ends.back, false)
                    .and_then(|s| s.connect(ends.upstream).map(|()| s))
                    .map_err(|e| warn!("session {id}: cannot re-bind {}: {e}", ends.back))
                    .ok()?;
                Some((rule.index, socket))
            });
            match restored {
                Some((rule, socket)) => {
                    // Keep the counters; new next-hop slots replace the old controller's.
                    let traffic = record.traffic;
                    let started = self.start(st, id, rule, ends, socket, slow_pinned.opened, now);
                    match started {
                        Ok(io) => {
                            for d in 0..2 {
                                io.slow.packets[d]
                                    .store(slow_pinned.traffic[d].packets, Ordering::Relaxed);
                                io.slow.bytes[d]
                                    .store(slow_pinned.traffic[d].bytes, Ordering::Relaxed);
                            }
                            if let Some(dp) = st.datapath.as_mut() {
                                if let Ok(mut s) = dp.session(id) {
                                    s.traffic = traffic;
                                    let _ = dp.install(id, &s, &slow_pinned);
                                }
                            }
                            kept += 1;
                        }
                        Err(e) => {
                            warn!("session {id}: not restored: {e:#}");
                            st.table.close(id);
                            dropped += 1;
                        }
                    }
                }
                None => {
                    if let Some(dp) = st.datapath.as_mut() {
                        let _ = dp.remove(id);
                    }
                    dropped += 1;
                }
            }
        }
        st.table.finish_recovery();
        if kept + dropped > 0 {
            info!("took over {kept} sessions from the pinned maps ({dropped} no longer match the rules)");
        }
    }

    /// Applies a re-read configuration: new limits, allow lists and upstream addresses (names
    /// resolved again) for new sessions; live sessions keep their upstream. Listen addresses
    /// cannot change without a restart, which keeps the sessions anyway.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let expanded = expand(config)?;
        let same_listeners = expanded.len() == self.rules.len()
            && expanded
                .iter()
                .zip(&self.rules)
                .all(|((l, _), r)| *l == r.listen);
        if !same_listeners {
            anyhow::bail!(
                "the listen addresses changed; restart the relay to apply that (sessions survive a restart)"
            );
        }
        let mut st = self.lock();
        for ((_, new), rule) in expanded.into_iter().zip(&self.rules) {
            let old = rule.current();
            if old.upstream != new.upstream {
                info!(
                    "rule {}: new sessions go to {} (was {})",
                    new.config.name, new.upstream, old.upstream
                );
            }
            if let Some(dp) = st.datapath.as_mut() {
                let _ = dp.update_rule(rule.index, |r| label(r, rule.listen, &new));
            }
            *rule.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        }
        // A lower capacity or other table-wide change needs a restart as well.
        if config.session_capacity != st.table.capacity() {
            warn!("relay.session_capacity changes need `relay unpin` and a restart; keeping the old one");
        }
        info!("configuration reloaded");
        Ok(())
    }

    /// Puts one SOCKS5 (association, destination) pair in the fast path; returns its record
    /// id, or `None` when XDP cannot carry it (no fast path, mixed families, table full).
    pub fn socks_open(&self, ends: Endpoints, user: u16) -> Option<u32> {
        if !self.fast_path || !ends.same_family() {
            return None;
        }
        let mut st = self.lock();
        let st = &mut *st;
        let id = st.socks_free.pop()?;
        let nexthop = [
            self.nexthop_for(st, ends.upstream.ip()),
            self.nexthop_for(st, ends.client.ip()),
        ];
        let rule = relay_common::session::RULE_SOCKS | (user & !relay_common::session::RULE_SOCKS);
        let record = datapath::record(&ends, rule, nexthop, monotonic_ns());
        match st
            .datapath
            .as_mut()?
            .install(id, &record, &SlowPath::default())
        {
            Ok(()) => Some(id),
            Err(e) => {
                debug!(
                    "SOCKS5 flow {} -> {} not in the fast path: {e:#}",
                    ends.client, ends.upstream
                );
                st.socks_free.push(id);
                None
            }
        }
    }

    /// Takes a SOCKS5 pair out of the fast path; returns what XDP relayed for it.
    pub fn socks_close(&self, id: u32) -> [Traffic; 2] {
        let mut st = self.lock();
        let traffic = st
            .datapath
            .as_mut()
            .and_then(|dp| dp.remove(id).ok())
            .map_or([Traffic::default(); 2], |(s, _)| s.traffic);
        st.socks_free.push(id);
        traffic
    }

    /// Packets XDP has carried for the fast-path sessions `ids` of a SOCKS5 association, both
    /// directions: an association whose socket hears nothing is still alive while this grows.
    pub fn socks_packets(&self, ids: &[u32]) -> u64 {
        let st = self.lock();
        let Some(dp) = st.datapath.as_ref() else {
            return 0;
        };
        ids.iter()
            .filter_map(|id| dp.session(*id).ok())
            .map(|s| s.packets())
            .sum()
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.lock().table.len()
    }

    /// Publishes the slow-path counters one last time (on shutdown).
    pub fn flush(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(dp) = st.datapath.as_mut() {
            for live in st.live.values() {
                let _ = dp.set_slow(live.io.id, &live.io.slow.snapshot(live.io.opened));
            }
        }
    }
}
