//! Forward sessions with their sockets: opening one for a new client (its relay port held by a
//! socket connected to the upstream), relaying what the fast path declines (or everything,
//! without XDP) both ways, publishing the controller's own counters, expiry and closing.
//!
//! The table itself ([`crate::sessions::Table`]) is pure; this adds the sockets, the maps (through
//! [`Datapath`]) and the next hops (from [`NextHops`]). A std mutex guards the table and the
//! live sessions; it is never held across an await or a netlink round trip.

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
use log::{debug, warn};
use relay_common::{
    packet::{PROTO_TCP, PROTO_UDP},
    session::{
        Event, Session, SlowPath, Traffic, EVENT_CLOSING, EVENT_OPENED, ORIGIN_KERNEL, POOLS,
        STATE_ACTIVE, TO_CLIENT, TO_UPSTREAM,
    },
};
use tokio::{io::Interest, net::UdpSocket, task::AbortHandle};

use super::{
    rules::{Listener, Rule, Rules},
    tcp,
};
use crate::{
    config::Config,
    datapath::{self, Datapath, Endpoints},
    nexthop::{Answer, Hops, NextHops},
    sessions::{Entry, Observed, Refusal, Table},
    system::monotonic_ns,
    udp,
};

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
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
    /// Counters that go on from what a previous controller published.
    fn continuing(pinned: &SlowPath) -> SlowCounters {
        let c = SlowCounters::default();
        for d in 0..2 {
            c.packets[d].store(pinned.traffic[d].packets, Ordering::Relaxed);
            c.bytes[d].store(pinned.traffic[d].bytes, Ordering::Relaxed);
        }
        c
    }

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
    /// The session's own socket (bound to its relay port, connected to the upstream); none
    /// for a UDP session XDP opened: what XDP declines of its upstream's datagrams reaches
    /// the controller's steered socket ([`Sessions::steered`]), and what it declines of its
    /// client's is sent from its port by [`send_upstream`].
    socket: Option<UdpSocket>,
    slow: SlowCounters,
    opened: u64,
    /// The next-hop slots its record refers to; released when the session is gone (after
    /// its record left the maps).
    _hops: Hops,
}

struct Live {
    io: Arc<SessionIo>,
    /// The relay of its socket's datagrams (a session with a socket).
    task: Option<AbortHandle>,
}

struct State {
    table: Table,
    live: HashMap<u32, Live>,
    last_refusal_log: HashMap<&'static str, Instant>,
    /// What the kernel was last told is full: rules (`LISTEN_FULL`) and (rule, client
    /// address) pairs (`SOURCE_FULL`), so that a map is written only when that changes.
    full_rules: std::collections::HashSet<u16>,
    full_sources: std::collections::HashSet<(u16, IpAddr)>,
}

/// What [`Sessions::start`] installs (or takes over) and starts relaying.
pub(super) struct Start {
    pub id: u32,
    pub rule: u16,
    pub ends: Endpoints,
    pub socket: Option<std::net::UdpSocket>,
    pub hops: Hops,
    /// The controller's counters so far (and when the session was opened).
    pub slow: SlowPath,
    /// What XDP relayed so far.
    pub traffic: [Traffic; 2],
    pub now: u64,
    /// The record is in the maps already (a previous controller's, which the running
    /// program may be reading): it is not written again.
    pub in_maps: bool,
}

/// A session of a batch being opened: reserved, its next hops asked for.
struct Pending {
    id: u32,
    ends: Endpoints,
    socket: std::net::UdpSocket,
    answer: Answer,
    /// The client's datagrams of the batch, relayed once the session is installed.
    datagrams: Vec<(Vec<u8>, u64)>,
}

/// A client's datagram for which no session was found, kept until one is opened.
struct First {
    client: SocketAddr,
    local: Option<IpAddr>,
    data: Vec<u8>,
    now: u64,
}

/// The forward sessions.
pub struct Sessions {
    pub(super) rules: Arc<Rules>,
    pub(super) datapath: Arc<Datapath>,
    /// `None`: XDP does not relay, and sessions get no next hops.
    nexthops: Option<Arc<NextHops>>,
    /// The session port range (a reload cannot change it).
    ports: crate::config::PortRange,
    state: Mutex<State>,
    /// TCP connections the controller relays itself.
    proxied: Arc<tcp::Proxied>,
    /// Ids and ports kept lent to the kernel's pool while a rule opens sessions there.
    pool_target: usize,
    /// Per family (IPv4, IPv6): what XDP declines of the UDP sessions it opens reaches the
    /// controller's steered socket ([`super::steer`]); without one (the kernel refused the
    /// lookup program, or there is no IPv6 loopback), each such session gets a socket of
    /// its own, as the controller's do.
    steered: [bool; 2],
}

impl Sessions {
    pub fn new(
        config: &Config,
        rules: Arc<Rules>,
        datapath: Arc<Datapath>,
        nexthops: Option<Arc<NextHops>>,
        steered: [bool; 2],
    ) -> Sessions {
        Sessions {
            rules,
            datapath,
            nexthops,
            steered,
            ports: config.session_ports,
            state: Mutex::new(State {
                table: Table::new(config.session_capacity, config.session_ports),
                live: HashMap::new(),
                last_refusal_log: HashMap::new(),
                full_rules: Default::default(),
                full_sources: Default::default(),
            }),
            proxied: Arc::default(),
            pool_target: pool_target(config),
        }
    }

    /// Takes back every id a predecessor lent to the kernel's pool (they are free unless a
    /// session holds them, which recovery finds). Call before recovery.
    pub(super) async fn drain_pool(&self) {
        let drained: usize = (0..POOLS)
            .map(|pool| self.datapath.pool_drain(pool, usize::MAX).len())
            .sum();
        if drained > 0 {
            debug!("took {drained} ids back from the kernel's pool");
            // A SYN that popped an id just before writes its record within microseconds;
            // recovery must see it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps the kernel's pools of free ids and ports filled while rules open sessions
    /// there: the pools of those rules' upstreams share the target in proportion to the
    /// sessions each holds (equally at first), so that a pool nobody uses does not keep ids
    /// the busy ones need. A pool holding far more than its share is drained and lent its
    /// share again.
    pub(super) fn refill(&self) {
        if self.pool_target == 0 {
            return;
        }
        let pools: std::collections::BTreeSet<usize> = self
            .rules
            .iter()
            .filter(|r| r.in_kernel())
            .map(|r| datapath::pool_of(r.current().upstream))
            .collect();
        let targets: Vec<usize> = {
            let st = self.lock();
            let weight = |pool: usize| st.table.held(pool) + 1;
            let total: usize = pools.iter().map(|&p| weight(p)).sum();
            // At most half a pool's ports: the controller's own sessions of the pool need some.
            let cap = (st.table.ports_per_pool() / 2).max(1);
            (0..POOLS)
                .map(|pool| {
                    if pools.contains(&pool) {
                        (self.pool_target * weight(pool) / total).clamp(1, cap)
                    } else {
                        // No rule takes sessions from it (any more): its slots come back.
                        0
                    }
                })
                .collect()
        };
        // Taken back first (outside the lock: a drain is a system call per slot), so that
        // what is lent next fits beside what stays. Slots XDP popped just before stay lent:
        // their sessions' events adopt them.
        for (pool, &target) in targets.iter().enumerate() {
            let have = self.lock().table.lent(pool);
            if (target == 0 && have > 0) || have > 2 * target + 64 {
                let back: Vec<u32> = self
                    .datapath
                    .pool_drain(pool, usize::MAX)
                    .iter()
                    .map(|s| s.id)
                    .collect();
                self.lock().table.unlend(back);
            }
        }
        let mut st = self.lock();
        for (pool, &target) in targets.iter().enumerate() {
            let have = st.table.lent(pool);
            if target == 0 || have >= target.div_ceil(2) {
                continue;
            }
            let slots = st.table.lend(pool, target - have);
            let pushed = self.datapath.pool_push(pool, &slots);
            if pushed < slots.len() {
                st.table.unlend(slots[pushed..].iter().map(|(id, _)| *id));
            }
        }
    }

    /// Reads what XDP reports through `EVENTS`, forever: sessions it opened (taken into the
    /// table for accounting, limits and expiry) and sessions that started closing.
    pub(super) async fn events(self: Arc<Self>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
        let read = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>| {
            let mut events = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Event>() {
                    // SAFETY: the ring holds `Event`s written by the XDP program; the length
                    // was checked and the read is unaligned-safe.
                    events.push(unsafe { item.as_ptr().cast::<Event>().read_unaligned() });
                }
            }
            let now = monotonic_ns();
            for e in events {
                match e.kind {
                    EVENT_OPENED => {
                        self.kernel_opened(e.id, now);
                    }
                    EVENT_CLOSING => self.kernel_closing(e.id, now),
                    _ => {}
                }
            }
            self.refill();
        };
        let lost = "kernel-opened sessions are not accounted";
        // SAFETY: the ring's descriptor belongs to the map it wraps, which lives as long as
        // the ring; it is never closed or replaced meanwhile.
        unsafe { crate::readable::each_readable(ring, "the kernel's event ring", lost, read) }
            .await;
    }

    /// XDP opened session `id`: take it into the table and count it against the limits; a
    /// UDP session also gets its socket (the relay port held, and what the fast path
    /// declines relayed), returned.
    fn kernel_opened(self: &Arc<Self>, id: u32, now: u64) -> Option<Arc<SessionIo>> {
        let record = self.datapath.session(id).ok()?;
        if record.state != STATE_ACTIVE || record.origin != ORIGIN_KERNEL {
            return None;
        }
        let ends = datapath::endpoints(&record);
        let rule = self.rules.get(record.rule)?;
        let mut st = self.lock();
        let entry = Entry::new(id, rule.index, ends.client, ends.back.port(), now)
            .in_pool(datapath::pool_of(ends.upstream));
        if !st.table.adopt(entry) {
            // Recovered already (an event from before a restart).
            return st.live.get(&id).map(|l| Arc::clone(&l.io));
        }
        // The kernel learns that a client's share or the rule is full a moment after the
        // controller counts it: a session it opened past a limit ends at once, refused.
        let limits = rule.limits();
        let over_source = st.table.sessions_of_source(rule.index, ends.client.ip())
            > limits.max_sessions_per_source;
        let over_rule = st.table.sessions_of(rule.index) + self.proxied.of_rule(rule.index)
            > limits.max_sessions;
        if over_source || over_rule {
            st.table.close(id);
            let _ = self.datapath.remove(id);
            let why = if over_source {
                Refusal::SourceLimit
            } else {
                Refusal::RuleLimit
            };
            self.refused(&mut st, rule, ends.client, why);
            self.kernel_limits(&mut st, rule, ends.client.ip());
            return None;
        }
        let _ = self.datapath.update_rule(rule.index, |r| r.opened += 1);
        // Its idle time and age, for `relay sessions` (XDP keeps no clock).
        let _ = self.datapath.set_slow(
            id,
            &SlowPath {
                last_seen: now,
                opened: unix_seconds(),
                ..SlowPath::default()
            },
        );
        self.kernel_limits(&mut st, rule, ends.client.ip());
        debug!(
            "session {id} opened in the kernel: {} -> {} | {} -> {}",
            ends.client, ends.front, ends.back, ends.upstream
        );
        if record.proto == PROTO_TCP {
            return None;
        }
        // No socket of its own: a session the kernel opens costs the controller no system
        // call and no descriptor (a burst of them would otherwise hit the open-file limit).
        let socket = if self.socketless(ends.upstream) {
            None
        } else {
            match port_socket(ends.back.port(), ends.upstream) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(
                        "session {id}: its relay port {} cannot be held ({e}); XDP relays it, \
                         but what XDP declines of its upstream's datagrams is lost",
                        ends.back.port()
                    );
                    None
                }
            }
        };
        let _ = self.datapath.set_port(ends.back.port(), id);
        let start = Start {
            id,
            rule: rule.index,
            ends,
            socket,
            // The rule holds the slot to the upstream; the way back is the record's own.
            hops: crate::nexthop::Hops::none(),
            slow: SlowPath {
                last_seen: now,
                opened: unix_seconds(),
                ..SlowPath::default()
            },
            traffic: record.traffic,
            now,
            in_maps: true,
        };
        match self.start(&mut st, start) {
            Ok(io) => Some(io),
            Err(e) => {
                warn!("session {id}: {e:#}");
                None
            }
        }
    }

    /// XDP relayed a FIN or RST of session `id`: once both sides have closed (or either
    /// reset) it lingers briefly and closes.
    fn kernel_closing(&self, id: u32, now: u64) {
        if self
            .datapath
            .session(id)
            .is_ok_and(|s| s.state == STATE_ACTIVE && s.tcp_closing())
        {
            self.lock().table.set_closing(id, now);
        }
    }

    /// Tells the kernel which rules and client addresses hold their limits, from the table
    /// (after recovery, a reload).
    pub(super) fn recount(&self) {
        let mut st = self.lock();
        // The maps were cleared at start, or a reload changed the limits: tell them afresh.
        st.full_rules.clear();
        st.full_sources.clear();
        for rule in self.rules.iter() {
            let _ = self.datapath.set_listen_full(rule.listen_key(), false);
        }
        for (rule, ip) in st.table.sources() {
            if let Some(rule) = self.rules.get(rule) {
                self.kernel_limits(&mut st, rule, ip);
            }
        }
        for rule in self.rules.iter() {
            self.kernel_limits(&mut st, rule, IpAddr::from([0u8; 4]));
        }
    }

    /// Tells the kernel whether rule `rule` and the client address `ip` hold their limits,
    /// when that changed.
    fn kernel_limits(&self, st: &mut State, rule: &Rule, ip: IpAddr) {
        if !rule.in_kernel() {
            return;
        }
        let limits = rule.limits();
        let proxied = self.proxied.of_rule(rule.index);
        let full = st.table.sessions_of(rule.index) + proxied >= limits.max_sessions;
        if full != st.full_rules.contains(&rule.index) {
            let _ = self.datapath.set_listen_full(rule.listen_key(), full);
            if full {
                st.full_rules.insert(rule.index);
            } else {
                st.full_rules.remove(&rule.index);
            }
        }
        let source = st.table.sessions_of_source(rule.index, ip) >= limits.max_sessions_per_source;
        if source != st.full_sources.contains(&(rule.index, ip)) {
            let _ = self.datapath.set_source_full(rule.index, ip, source);
            if source {
                st.full_sources.insert((rule.index, ip));
            } else {
                st.full_sources.remove(&(rule.index, ip));
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the UDP sessions XDP opens to `upstream` go without a socket of their own.
    pub(super) fn socketless(&self, upstream: SocketAddr) -> bool {
        self.steered[usize::from(upstream.is_ipv6())]
    }

    /// Takes session `entry` (found in the pinned maps) into the table; false if it cannot be.
    pub(super) fn reserve_recovered(&self, entry: Entry) -> bool {
        self.lock().table.recover(entry)
    }

    /// Takes over a session the kernel opened (no socket: its bytes never reach the
    /// controller); false if no rule matches it any more.
    pub(super) fn recover_kernel(
        &self,
        id: u32,
        record: &Session,
        ends: &datapath::Endpoints,
        now: u64,
    ) -> bool {
        let Some(rule) =
            self.rules
                .matching(record.rule, record.proto, ends.front.port(), ends.upstream)
        else {
            return false;
        };
        if !rule.current().config.client_allowed(ends.client.ip()) {
            return false;
        }
        let mut entry = Entry::new(id, rule.index, ends.client, ends.back.port(), now)
            .in_pool(datapath::pool_of(ends.upstream));
        entry.answered = record.answered();
        let mut st = self.lock();
        if !st.table.recover(entry) {
            return false;
        }
        if record.tcp_closing() {
            st.table.set_closing(id, now);
        }
        true
    }

    /// Gives a session back (it could not be restored or installed).
    pub(super) fn forget(&self, id: u32) {
        self.lock().table.close(id);
    }

    /// Frees the ids no recovered session holds; call once, after recovery.
    pub(super) fn finish_recovery(&self) {
        self.lock().table.finish_recovery();
    }

    pub(super) fn nexthops(&self) -> Option<&Arc<NextHops>> {
        self.nexthops.as_ref()
    }

    /// Asks for the next hops of a session (to be awaited): none without XDP, or when the
    /// families differ (XDP does not translate them).
    pub(super) fn ask_hops(&self, ends: &Endpoints) -> Answer {
        match &self.nexthops {
            Some(n) if ends.same_family() => n.ask(ends),
            _ => Answer::none(),
        }
    }

    /// Receives on rule `i`'s listening socket, forever: datagrams of known clients are relayed
    /// at once; the others open sessions once the batch is read.
    pub async fn listen(self: Arc<Self>, i: usize) {
        let Some(rule) = u16::try_from(i).ok().and_then(|i| self.rules.get(i)) else {
            return;
        };
        let socket = match &rule.socket {
            Listener::Udp(s) => s,
            Listener::Tcp(l) => {
                let proxied = Arc::clone(&self.proxied);
                return tcp::serve(rule, l, proxied, Arc::clone(&self.datapath)).await;
            }
        };
        let fd = socket.as_raw_fd();
        loop {
            if let Err(e) = socket.readable().await {
                warn!("rule {}: listening socket failed: {e}", rule.name());
                return;
            }
            let mut firsts = Vec::new();
            let r = socket.try_io(Interest::READABLE, || {
                udp::recv_batch(fd, |batch| {
                    let now = monotonic_ns();
                    firsts.extend(
                        batch
                            .iter()
                            .filter_map(|d| self.client_datagram(rule, d, now)),
                    );
                })
            });
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("rule {}: receiving: {e}", rule.name());
                }
            }
            self.open_batch(rule, firsts).await;
        }
    }

    /// A datagram from a client on a rule's listening socket: one the fast path declined
    /// (relayed now), or one of a client without a session (returned, to open one).
    fn client_datagram(&self, rule: &Rule, d: &udp::Datagram<'_>, now: u64) -> Option<First> {
        if d.truncated {
            warn!(
                "rule {}: dropped a truncated datagram from {}",
                rule.name(),
                d.peer
            );
            return None;
        }
        let io = {
            let mut st = self.lock();
            let Some(id) = st.table.find(rule.index, d.peer) else {
                return Some(First {
                    client: d.peer,
                    local: d.local,
                    data: d.data.to_vec(),
                    now,
                });
            };
            st.table.touch(id, now);
            st.live.get(&id).map(|l| Arc::clone(&l.io))
        };
        if let Some(io) = io {
            send_upstream(&io, d.data, now);
        }
        None
    }

    /// Opens the sessions of a batch's new clients: each is reserved (table entry, socket)
    /// and its next hops asked for, all before the first answer is awaited, so that the
    /// next-hop thread answers them back to back; then each is installed and its datagrams
    /// (all of the batch's, in order) are relayed.
    async fn open_batch(self: &Arc<Self>, rule: &Rule, firsts: Vec<First>) {
        let mut pending: Vec<Pending> = Vec::new();
        for first in firsts {
            if let Some(p) = pending.iter_mut().find(|p| p.ends.client == first.client) {
                p.datagrams.push((first.data, first.now));
                continue;
            }
            // A session an earlier batch opened meanwhile.
            let existing = {
                let mut st = self.lock();
                st.table.find(rule.index, first.client).map(|id| {
                    st.table.touch(id, first.now);
                    st.live.get(&id).map(|l| Arc::clone(&l.io))
                })
            };
            match existing {
                Some(Some(io)) => {
                    send_upstream(&io, &first.data, first.now);
                    continue;
                }
                Some(None) => continue,
                None => {}
            }
            // A session the kernel opened a moment ago, whose event is still on its way: the
            // datagram (one the fast path declined) goes through it.
            if let Some(flow) = self.datapath.flow(&client_key(rule, first.client)) {
                if let Some(io) = self.kernel_opened(flow.session, first.now) {
                    send_upstream(&io, &first.data, first.now);
                }
                continue;
            }
            let Some((id, ends, socket)) = self.reserve(rule, first.client, first.local, first.now)
            else {
                continue;
            };
            pending.push(Pending {
                id,
                answer: self.ask_hops(&ends),
                ends,
                socket,
                datagrams: vec![(first.data, first.now)],
            });
        }
        for p in pending {
            let hops = p.answer.await;
            let now = p.datagrams.first().map_or(0, |(_, now)| *now);
            if let Some(io) = self.install_new(rule, p.id, p.ends, p.socket, hops, now) {
                for (data, now) in &p.datagrams {
                    send_upstream(&io, data, *now);
                }
            }
        }
    }

    fn refused(&self, st: &mut State, rule: &Rule, client: SocketAddr, why: Refusal) {
        let _ = self.datapath.update_rule(rule.index, |r| match why {
            Refusal::NotAllowed => r.refused_not_allowed += 1,
            Refusal::RuleLimit => r.refused_limit += 1,
            Refusal::Full => r.refused_full += 1,
            Refusal::NoPort => r.refused_no_port += 1,
            Refusal::SourceLimit => r.refused_source_limit += 1,
            Refusal::RateLimited => r.refused_rate += 1,
        });
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

    /// Installs a reserved session with its next hops in the maps and starts relaying its
    /// replies.
    fn install_new(
        self: &Arc<Self>,
        rule: &Rule,
        id: u32,
        ends: Endpoints,
        socket: std::net::UdpSocket,
        hops: Hops,
        now: u64,
    ) -> Option<Arc<SessionIo>> {
        let client = ends.client;
        let mut st = self.lock();
        // Still the entry reserved above (nothing else closes one this young, but the lock
        // was let go).
        if st
            .table
            .get(id)
            .is_none_or(|e| e.rule != rule.index || e.client != client)
        {
            return None;
        }
        let start = Start {
            id,
            rule: rule.index,
            ends,
            socket: Some(socket),
            hops,
            slow: SlowPath {
                opened: unix_seconds(),
                ..SlowPath::default()
            },
            traffic: [Traffic::default(); 2],
            now,
            in_maps: false,
        };
        let io = match self.start(&mut st, start) {
            Ok(io) => io,
            Err(e) => {
                warn!(
                    "rule {}: session for {client} not installed: {e:#}",
                    rule.name()
                );
                st.table.close(id);
                return None;
            }
        };
        let _ = self.datapath.update_rule(rule.index, |r| r.opened += 1);
        debug!(
            "session {id} opened: {} -> {} | {} -> {}",
            ends.client, ends.front, ends.back, ends.upstream
        );
        Some(io)
    }

    /// A table entry for `client` with its socket and endpoints, or `None` (refused, or no
    /// socket).
    fn reserve(
        &self,
        rule: &Rule,
        client: SocketAddr,
        local: Option<IpAddr>,
        now: u64,
    ) -> Option<(u32, Endpoints, std::net::UdpSocket)> {
        let current = rule.current();
        let allowed = current.config.client_allowed(client.ip());
        let pool = datapath::pool_of(current.upstream);
        let open = |st: &mut State| {
            let State { table, live, .. } = st;
            table.open(
                rule.index,
                pool,
                rule.limits(),
                client,
                allowed,
                now,
                |id| observe(&self.datapath, live, id),
            )
        };
        let mut opened = open(&mut self.lock());
        if matches!(opened, Err(Refusal::NoPort | Refusal::Full)) {
            // The ports or ids it needs may be lent to the kernel, which handed this client
            // over while its pool was dry for a moment (and full again since): take a few
            // back (from its pool, or from any for an id) and try once more, with the
            // new-session token the refusal took given back.
            let mut back = 0;
            for p in (0..POOLS).filter(|&p| opened == Err(Refusal::Full) || p == pool) {
                if back > 0 {
                    break;
                }
                let ids: Vec<u32> = self
                    .datapath
                    .pool_drain(p, RECLAIM)
                    .iter()
                    .map(|s| s.id)
                    .collect();
                back += ids.len();
                self.lock().table.unlend(ids);
            }
            if back > 0 {
                let mut st = self.lock();
                st.table.give_back_token(rule.index, rule.limits());
                opened = open(&mut st);
            }
        }
        let mut st = self.lock();
        let entry = match opened {
            Ok(o) => {
                if let Some(evicted) = o.evicted {
                    debug!(
                        "rule {}: evicted the unanswered session of {} for {client}",
                        rule.name(),
                        evicted.client
                    );
                    let _ = self
                        .datapath
                        .update_rule(evicted.rule, |r| r.evicted_unanswered += 1);
                    self.close_entry(&mut st, evicted, "evicted, never answered");
                }
                o.entry
            }
            Err(why) => {
                self.refused(&mut st, rule, client, why);
                return None;
            }
        };
        let socket = match session_socket(&mut st.table, &entry, current.upstream) {
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
        Some((entry.id, ends, socket))
    }

    /// Takes over a session found in the pinned maps (see [`Sessions::start`]).
    pub(super) fn restore(self: &Arc<Self>, s: Start) -> anyhow::Result<()> {
        let mut st = self.lock();
        self.start(&mut st, s).map(drop)
    }

    /// Installs a session in the maps (unless it is there already) and spawns its reply
    /// relay.
    fn start(self: &Arc<Self>, st: &mut State, s: Start) -> anyhow::Result<Arc<SessionIo>> {
        if !s.in_maps {
            let mut record = datapath::record(&s.ends, s.rule, s.hops.slots(), s.now);
            record.traffic = s.traffic;
            self.datapath.install(s.id, &record, &s.slow)?;
        }
        let io = Arc::new(SessionIo {
            id: s.id,
            rule: s.rule,
            ends: s.ends,
            socket: s
                .socket
                .map(UdpSocket::from_std)
                .transpose()
                .context("registering a session socket")?,
            slow: SlowCounters::continuing(&s.slow),
            opened: s.slow.opened,
            _hops: s.hops,
        });
        let task = io
            .socket
            .is_some()
            .then(|| tokio::spawn(Arc::clone(self).replies(Arc::clone(&io))).abort_handle());
        st.live.insert(
            s.id,
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
        let Some(socket) = &io.socket else { return };
        let name = format!("session {}", io.id);
        receive(socket, &name, |batch| {
            let from_upstream = batch
                .iter()
                .filter(|d| !d.truncated && d.peer == io.ends.upstream)
                .map(|d| d.data);
            self.to_client(&io, from_upstream, monotonic_ns());
        })
        .await;
    }

    /// Relays what reaches the steered socket ([`super::steer`]), forever: datagrams from the
    /// upstreams of the UDP sessions XDP opened that it declined. Each goes to its session's
    /// client, from the address the client sends to; one that matches no session (it ended
    /// meanwhile) is dropped.
    pub(super) async fn steered(self: Arc<Self>, socket: UdpSocket) {
        receive(&socket, "steered datagrams", |batch| {
            let now = monotonic_ns();
            for d in batch.iter().filter(|d| !d.truncated) {
                let Some(port) = d.local_port else { continue };
                let io = {
                    let st = self.lock();
                    st.table
                        .on_port_in(port, datapath::pool_of(d.peer))
                        .and_then(|id| st.live.get(&id))
                        .map(|l| Arc::clone(&l.io))
                };
                let Some(io) = io.filter(|io| io.ends.upstream == d.peer) else {
                    debug!(
                        "steered datagram from {} to port {port}: no session",
                        d.peer
                    );
                    continue;
                };
                self.to_client(&io, std::iter::once(d.data), now);
            }
        })
        .await;
    }

    /// Sends datagrams of session `io`'s upstream to its client through the rule's listening
    /// socket, from the address the client sends to, and counts them.
    fn to_client<'a>(&self, io: &SessionIo, data: impl Iterator<Item = &'a [u8]>, now: u64) {
        let Some(listener) = self.rules.get(io.rule).and_then(|r| r.socket.udp()) else {
            return;
        };
        let out: Vec<udp::Outgoing<'_>> = data
            .map(|data| udp::Outgoing {
                data,
                to: Some(io.ends.client),
                from: Some(io.ends.front.ip()),
            })
            .collect();
        match udp::send_batch(listener.as_raw_fd(), &out) {
            Ok(n) => {
                for m in &out[..n] {
                    io.slow.add(TO_CLIENT, m.data.len(), now);
                }
            }
            Err(e) => debug!("session {}: sending to the client: {e}", io.id),
        }
    }

    /// Once a second: publish slow-path counters, expire idle sessions.
    pub fn housekeeping(&self) {
        self.expire();
        self.refill();
    }

    /// Publishes slow-path counters, closes expired sessions.
    fn expire(&self) {
        let now = monotonic_ns();
        let mut st = self.lock();
        let st = &mut *st;
        // Publish what the controller relayed, so `relay sessions` and a successor see it.
        for live in st.live.values() {
            if live.io.slow.dirty.swap(false, Ordering::Relaxed) {
                let _ = self
                    .datapath
                    .set_slow(live.io.id, &live.io.slow.snapshot(live.io.opened));
            }
        }
        let expired = {
            let State { table, live, .. } = &mut *st;
            let datapath = &self.datapath;
            table.expired(
                now,
                |r| self.rules.limits(r),
                |id| observe(datapath, live, id),
            )
        };
        // Traffic XDP carried goes into the session's pinned slow-path record, where `relay
        // sessions` reads the idle time (the XDP program keeps no clock).
        for id in &expired.carried {
            if let Some(l) = st.live.get(id) {
                l.io.slow.last_seen.fetch_max(now, Ordering::Relaxed);
                l.io.slow.dirty.store(true, Ordering::Relaxed);
            } else if let Ok(mut slow) = self.datapath.slow(*id) {
                // A session the kernel opened: no socket, no live counters.
                slow.last_seen = now;
                let _ = self.datapath.set_slow(*id, &slow);
            }
        }
        for id in &expired.unanswered {
            if let Some(rule) = st.table.get(*id).map(|e| e.rule) {
                let _ = self
                    .datapath
                    .update_rule(rule, |r| r.closed_unanswered += 1);
            }
        }
        for id in expired.closed {
            self.close(st, id, "idle or closed");
        }
    }

    /// Closes the sessions `allowed(rule, client)` no longer admits (a reload changed an
    /// allow list); returns how many.
    pub fn revoke(&self, allowed: impl Fn(u16, SocketAddr) -> bool) -> usize {
        let mut st = self.lock();
        let ids = st.table.revoked(allowed);
        for id in &ids {
            self.close(&mut st, *id, "no longer allowed");
        }
        ids.len()
    }

    /// Closes a session: stop its relay, take it out of the maps, account its traffic. Its
    /// next hops are released once the last reference to it is gone.
    fn close(&self, st: &mut State, id: u32, why: &str) {
        match st.table.close(id) {
            Some(entry) => self.close_entry(st, entry, why),
            None => {
                if let Some(task) = st.live.remove(&id).and_then(|l| l.task) {
                    task.abort();
                }
            }
        }
    }

    /// The I/O and map side of closing `entry`, which the table has let go of already.
    fn close_entry(&self, st: &mut State, entry: Entry, why: &str) {
        let id = entry.id;
        let live = st.live.remove(&id);
        if let Some(task) = live.as_ref().and_then(|l| l.task.as_ref()) {
            task.abort();
        }
        let mut retired = [Traffic::default(); 2];
        match self.datapath.remove(id) {
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
        // UDP sessions to other upstreams may share the port (one per pool): strangers'
        // datagrams to it are still dropped while one of them lives.
        let udp = |id: &u32| {
            st.table
                .get(*id)
                .and_then(|e| self.rules.get(e.rule))
                .is_some_and(|r| r.proto == PROTO_UDP)
        };
        if let Some(other) = (0..POOLS)
            .filter_map(|pool| st.table.on_port_in(entry.port, pool))
            .find(udp)
        {
            let _ = self.datapath.set_port(entry.port, other);
        }
        let _ = self.datapath.update_rule(entry.rule, |r| {
            r.closed += 1;
            for (total, t) in r.retired.iter_mut().zip(retired) {
                total.packets += t.packets;
                total.bytes += t.bytes;
            }
        });
        if let Some(rule) = self.rules.get(entry.rule) {
            self.kernel_limits(st, rule, entry.client.ip());
        }
        debug!("session {id} of {} closed ({why})", entry.client);
    }

    pub fn len(&self) -> usize {
        self.lock().table.len()
    }

    pub fn capacity(&self) -> u32 {
        self.lock().table.capacity()
    }

    /// The session port range the table was made with.
    pub fn ports(&self) -> crate::config::PortRange {
        self.ports
    }

    /// Stops relaying (a successor takes over): every session task ends, the controller's
    /// counters are published, and the session sockets are returned, duplicated, by id (the
    /// sessions XDP opened have none: the successor finds them in the maps).
    pub fn hand_over(&self) -> anyhow::Result<Vec<(crate::handover::Item, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd as _;
        let st = self.lock();
        let mut out = Vec::with_capacity(st.live.len());
        for live in st.live.values() {
            if let Some(task) = &live.task {
                task.abort();
            }
            let _ = self
                .datapath
                .set_slow(live.io.id, &live.io.slow.snapshot(live.io.opened));
            if let Some(socket) = &live.io.socket {
                out.push((
                    crate::handover::Item::Session { id: live.io.id },
                    crate::handover::dup(socket.as_fd())?,
                ));
            }
        }
        Ok(out)
    }

    /// Publishes the slow-path counters one last time (on shutdown).
    pub fn flush(&self) {
        let st = self.lock();
        for live in st.live.values() {
            let _ = self
                .datapath
                .set_slow(live.io.id, &live.io.slow.snapshot(live.io.opened));
        }
    }
}

/// What the kernel and the controller's own relays saw of session `id`: the table's view of
/// liveness, and of whether the upstream answered.
fn observe(datapath: &Datapath, live: &HashMap<u32, Live>, id: u32) -> Observed {
    let kernel = datapath.session(id).ok();
    let slow = live.get(&id).map(|l| &l.io.slow);
    let slow_replies = slow.map_or(0, |s| s.packets[TO_CLIENT as usize].load(Ordering::Relaxed));
    Observed {
        closing: kernel.is_some_and(|s| s.proto == PROTO_TCP && s.tcp_closing()),
        kernel_packets: kernel.map_or(0, |s| s.packets()),
        slow_seen: slow.map_or(0, |s| s.last_seen.load(Ordering::Relaxed)),
        answered: kernel.is_some_and(|s| s.answered()) || slow_replies > 0,
    }
}

/// How many free ids and ports the controller keeps lent to the kernel when rules open
/// sessions there: enough for a burst of new flows between two refills (the controller
/// refills after every batch of events and once a second), and never more than half the
/// table, so that the controller finds room for the sessions the kernel leaves to it.
fn pool_target(config: &Config) -> usize {
    if config.forward.is_empty() {
        return 0;
    }
    (config.session_capacity as usize / 2).clamp(1, 1 << 20)
}

/// The client-side flow key of `client` on UDP rule `rule`.
fn client_key(rule: &Rule, client: SocketAddr) -> relay_common::session::FlowKey {
    relay_common::session::FlowKey {
        remote: datapath::addr16(client.ip()),
        remote_port: client.port(),
        local_port: rule.listen.port(),
        family: crate::nexthop::family_of(client.ip()),
        proto: rule.proto,
        _pad: [0; 2],
    }
}

/// Whether a pinned record is one the kernel opened (no socket of its own).
pub(super) fn kernel_opened(record: &Session) -> bool {
    record.origin == ORIGIN_KERNEL
}

/// Lent slots the controller takes back from a kernel queue for one client it has no room
/// for (a bounded cost per refused datagram).
const RECLAIM: usize = 16;

/// Receives batches of datagrams on `socket` until it fails, handing each to `f` (`what`
/// names the socket in debug messages).
async fn receive(socket: &UdpSocket, what: &str, mut f: impl FnMut(&[udp::Datagram<'_>])) {
    let fd = socket.as_raw_fd();
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let r = socket.try_io(Interest::READABLE, || udp::recv_batch(fd, |b| f(b)));
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::WouldBlock {
                debug!("{what}: receiving: {e}");
            }
        }
    }
}

/// Relays a client's datagram to the upstream through the session's socket (a plain
/// non-blocking send: tokio's `try_send` refuses until the reactor has seen the socket
/// writable, which a brand-new socket has not), or, for a session XDP opened, from its relay
/// port through a socket made for the send.
fn send_upstream(io: &SessionIo, data: &[u8], now: u64) {
    let sent = match &io.socket {
        Some(socket) => {
            let out = [udp::Outgoing {
                data,
                to: None,
                from: None,
            }];
            udp::send_batch(socket.as_raw_fd(), &out).map(drop)
        }
        None => udp::send_from(io.ends.back, io.ends.upstream, data),
    };
    match sent {
        Ok(()) => io.slow.add(TO_UPSTREAM, data.len(), now),
        Err(e) => debug!("session {}: sending upstream: {e}", io.id),
    }
}

/// A session's socket: bound to its relay port, connected to its upstream. With
/// SO_REUSEADDR: sessions to upstreams of different pools share relay ports, each socket
/// connected to its own upstream (the kernel delivers a datagram to the socket connected to
/// its sender); a port another program holds without it stays refused.
pub(super) fn port_socket(port: u16, upstream: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = udp::bind(SocketAddr::new(unspecified(upstream.is_ipv4()), port), true)?;
    s.connect(upstream)?;
    Ok(s)
}

/// A new session's socket on its port, or on the next free one if another program holds it.
fn session_socket(
    table: &mut Table,
    entry: &Entry,
    upstream: SocketAddr,
) -> anyhow::Result<std::net::UdpSocket> {
    let mut port = entry.port;
    for _ in 0..64 {
        match port_socket(port, upstream) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                port = table
                    .replace_port(entry.id)
                    .ok_or_else(|| anyhow!("no free session port"))?;
            }
            Err(e) => return Err(anyhow!(e).context(format!("session port {port} to {upstream}"))),
        }
    }
    Err(anyhow!(
        "64 session ports in a row are taken by other programs"
    ))
}
