//! The kernel maps as the controller writes them: [`Datapath`] is the one writer of every map
//! the XDP program reads, for forward rules and SOCKS5 alike.
//!
//! Where each map is written (every write goes through a method of [`Datapath`]):
//!
//! - `FLOWS`, `SESSIONS`, `SLOWPATH`: [`Datapath::install`] and [`Datapath::remove`], called
//!   for forward sessions by `forward::sessions` (open, close) and `forward::recovery`, and for
//!   SOCKS5 flows by [`Datapath::socks_open`] and [`Datapath::socks_close`] (the SOCKS5
//!   server). `SLOWPATH` also by [`Datapath::set_slow`]: the traffic the controller relayed
//!   itself, published by `forward::sessions` once a second and on shutdown.
//! - `NEXTHOPS`: [`Datapath::set_nexthop`], called by the next-hop thread
//!   ([`crate::nexthop::NextHops`]) alone.
//! - `RULES`: [`Datapath::update_rule`]: names and addresses by `forward::rules` (start,
//!   reload); opened, closed and refused sessions by `forward::sessions`.
//! - `USERS`: [`Datapath::set_user`]: the SOCKS5 server's accounts, once a second.
//! - `USER_LIMITS`: [`Datapath::set_user_limit`]: the users' leases, each limits tick.
//! - `EGRESS`: [`Datapath::add_egress`]: the interfaces XDP is attached to, at start.
//! - `PORTS`: with the forward sessions' records, by [`Datapath::install`] and
//!   [`Datapath::remove`]: which session holds a relay port.
//! - `LISTEN`, `RULE_PORTS`, `ALLOW`: [`Datapath::set_listen`], [`Datapath::set_allow`] by
//!   `forward::rules` (start, reload); `LISTEN`'s full flag by [`Datapath::set_listen_full`]
//!   from `forward::sessions` as sessions come and go.
//! - `SOURCE_FULL`: [`Datapath::set_source_full`] by `forward::sessions`.
//! - `POOL0`..`POOL3`: [`Datapath::pool_push`] (free ids and ports lent to the kernel) and
//!   [`Datapath::pool_drain`] by `forward::sessions`; XDP pops.
//!
//! XDP itself writes the records, `HOPS` entries and flows of the sessions it opens (ids it
//! popped from a pool, which nobody else writes until the controller closes them), `RATE`,
//! `KERNEL_OPENS` and `EVENTS` (read by `forward::sessions`).
//!
//! `COUNTERS` is written by the XDP program alone, which also adds to the traffic counters of
//! the `SESSIONS` records it relays for. The record ids of SOCKS5 fast-path flows
//! (after the forward sessions' ids) are handed out here too.
//!
//! Map syscalls are short and never block, so one std mutex guards the handles; nothing that
//! waits (netlink, name resolution, sockets) runs while it is held.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    sync::{Mutex, MutexGuard},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, MapData, Queue},
    Ebpf,
};
use log::debug;
use relay_common::{
    limits::{UserLimit, UserSpent},
    maps,
    packet::{FAMILY_V4, FAMILY_V6, PROTO_UDP},
    session::{
        AllowKey, Flow, FlowKey, Listen, ListenKey, Meta, Nexthop, NexthopKey, PoolSlot, RuleStats,
        Session, SlowPath, SourceKey, Traffic, UserStats, FLOW_SOCKS, LAYOUT, LISTEN_FULL,
        META_MAGIC, RULE_SOCKS, STATE_ACTIVE, TO_CLIENT, TO_UPSTREAM,
    },
};

/// A session's four endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub client: SocketAddr,
    pub front: SocketAddr,
    pub back: SocketAddr,
    pub upstream: SocketAddr,
}

impl Endpoints {
    /// Whether XDP can relay this session: one address family on both sides.
    pub fn same_family(&self) -> bool {
        let v4 = self.client.is_ipv4();
        [self.front, self.back, self.upstream]
            .iter()
            .all(|a| a.is_ipv4() == v4)
    }
}

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut x = [0; 16];
            x[..4].copy_from_slice(&a.octets());
            x
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The pool (`relay_common::session::POOLS`) whose ports the sessions to `upstream` take.
pub fn pool_of(upstream: SocketAddr) -> usize {
    usize::from(relay_common::session::pool_of(
        &addr16(upstream.ip().to_canonical()),
        upstream.port(),
    ))
}

pub fn ip_of(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// The endpoints a session record describes (IPv4-mapped addresses of a mixed-family session
/// come back as IPv4).
pub fn endpoints(s: &Session) -> Endpoints {
    let sa =
        |a: &[u8; 16], p: u16| SocketAddr::new(crate::config::canonical(ip_of(s.family, a)), p);
    Endpoints {
        client: sa(&s.client, s.client_port),
        front: sa(&s.front, s.front_port),
        back: sa(&s.back, s.back_port),
        upstream: sa(&s.upstream, s.upstream_port),
    }
}

/// The two flow keys of a session of protocol `proto`: client side and upstream side.
pub fn flow_keys(e: &Endpoints, proto: u8) -> [FlowKey; 2] {
    let key = |remote: SocketAddr, local_port: u16| FlowKey {
        remote: addr16(remote.ip()),
        remote_port: remote.port(),
        local_port,
        family: family(remote.ip()),
        proto,
        _pad: [0; 2],
    };
    [
        key(e.client, e.front.port()),
        key(e.upstream, e.back.port()),
    ]
}

/// An address as IPv6 (IPv4-mapped if need be).
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Whether a record is a SOCKS5 association's flow to one destination.
pub fn is_socks(s: &Session) -> bool {
    s.rule & RULE_SOCKS != 0
}

/// The one flow key of a SOCKS5 record: the destination and the association port.
pub fn socks_key(e: &Endpoints) -> FlowKey {
    FlowKey {
        remote: addr16(e.upstream.ip()),
        remote_port: e.upstream.port(),
        local_port: e.back.port(),
        family: family(e.upstream.ip()),
        proto: PROTO_UDP,
        _pad: [0; 2],
    }
}

/// The record `SESSIONS` holds for a new session. A session whose two sides differ in family
/// (an IPv4 client relayed to an IPv6 upstream) is stored with IPv6 (mapped) addresses and no
/// next hops, so the controller relays all of it.
pub fn record(e: &Endpoints, rule: u16, nexthop: [u16; 2], now: u64) -> Session {
    let same = e.same_family();
    let a = |ip: IpAddr| if same { addr16(ip) } else { mapped(ip) };
    Session {
        client: a(e.client.ip()),
        front: a(e.front.ip()),
        back: a(e.back.ip()),
        upstream: a(e.upstream.ip()),
        client_port: e.client.port(),
        front_port: e.front.port(),
        back_port: e.back.port(),
        upstream_port: e.upstream.port(),
        nexthop,
        rule,
        family: if same {
            family(e.client.ip())
        } else {
            FAMILY_V6
        },
        state: STATE_ACTIVE,
        proto: PROTO_UDP,
        last_seen: now,
        ..Session::default()
    }
}

/// The relay version a `META` record names.
pub fn version_of(meta: &Meta) -> String {
    match crate::stats::name_of(&meta.version) {
        v if v.is_empty() => "(unknown)".into(),
        v => v,
    }
}

/// Owned handles on the maps.
struct Maps {
    flows: HashMap<MapData, FlowKey, Flow>,
    sessions: Array<MapData, Session>,
    nexthops: Array<MapData, Nexthop>,
    slow: Array<MapData, SlowPath>,
    rules: Array<MapData, RuleStats>,
    users: Array<MapData, UserStats>,
    egress: DevMapHash<MapData>,
    ports: Array<MapData, u32>,
    nexthop_keys: Array<MapData, NexthopKey>,
    meta: Array<MapData, Meta>,
    listen: HashMap<MapData, ListenKey, Listen>,
    pools: Vec<Queue<MapData, PoolSlot>>,
    source_full: HashMap<MapData, SourceKey, u8>,
    allow: LpmTrie<MapData, AllowKey, u8>,
    hops: Array<MapData, Nexthop>,
    rule_ports: Array<MapData, u8>,
    user_limits: Array<MapData, UserLimit>,
    user_spent: Array<MapData, UserSpent>,
    /// Free record ids for SOCKS5 fast-path flows.
    socks_free: Vec<u32>,
    /// All record ids set aside for them.
    socks_ids: Range<u32>,
}

/// The one writer of the kernel maps (see the module documentation).
pub struct Datapath {
    maps: Mutex<Maps>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the XDP object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Takes the maps out of a loaded object. No record ids are set aside for SOCKS5 flows
    /// until [`Datapath::with_socks_ids`].
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Datapath> {
        Ok(Datapath {
            maps: Mutex::new(Maps {
                flows: take(ebpf, maps::FLOWS)?,
                sessions: take(ebpf, maps::SESSIONS)?,
                nexthops: take(ebpf, maps::NEXTHOPS)?,
                slow: take(ebpf, maps::SLOWPATH)?,
                rules: take(ebpf, maps::RULES)?,
                users: take(ebpf, maps::USERS)?,
                egress: take(ebpf, maps::EGRESS)?,
                ports: take(ebpf, maps::PORTS)?,
                nexthop_keys: take(ebpf, maps::NEXTHOP_KEYS)?,
                meta: take(ebpf, maps::META)?,
                listen: take(ebpf, maps::LISTEN)?,
                pools: maps::POOLS
                    .iter()
                    .map(|name| take(ebpf, name))
                    .collect::<anyhow::Result<_>>()?,
                source_full: take(ebpf, maps::SOURCE_FULL)?,
                allow: take(ebpf, maps::ALLOW)?,
                hops: take(ebpf, maps::HOPS)?,
                rule_ports: take(ebpf, maps::RULE_PORTS)?,
                user_limits: take(ebpf, maps::USER_LIMITS)?,
                user_spent: take(ebpf, maps::USER_SPENT)?,
                socks_free: Vec::new(),
                socks_ids: 0..0,
            }),
        })
    }

    /// Checks the layout stamp of the pinned maps before anything else reads them: maps this
    /// build did not make are refused, never misread. Fresh maps get this build's stamp;
    /// `had_pins` says whether the maps existed before this process loaded them (pinned maps
    /// without a stamp are from a relay older than the stamp).
    pub fn check_layout(&self, had_pins: bool, dir: &std::path::Path) -> anyhow::Result<Meta> {
        let mut m = self.lock();
        let mut meta = m.meta.get(&0, 0).context("reading META")?;
        let stop = "stop it with `relay stop` (this ends its sessions), then start this relay";
        if meta.magic == 0 {
            if had_pins {
                anyhow::bail!(
                    "the maps pinned in {} were made by an earlier relay without a layout \
                     stamp, which this one cannot read safely; {stop}",
                    dir.display()
                );
            }
            meta = Meta {
                magic: META_MAGIC,
                layout: LAYOUT,
                ..Meta::default()
            };
            m.meta.set(0, meta, 0).context("writing META")?;
        } else if meta.magic != META_MAGIC || meta.layout != LAYOUT {
            anyhow::bail!(
                "the maps pinned in {} were made by relay {} with another map layout \
                 ({:#x}; this one reads {LAYOUT:#x}); {stop}",
                dir.display(),
                version_of(&meta),
                meta.layout
            );
        }
        Ok(meta)
    }

    /// The controller bookkeeping in `META`.
    pub fn meta(&self) -> anyhow::Result<Meta> {
        self.lock().meta.get(&0, 0).context("reading META")
    }

    pub fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> anyhow::Result<()> {
        let mut m = self.lock();
        let mut meta = m.meta.get(&0, 0).context("reading META")?;
        f(&mut meta);
        m.meta.set(0, meta, 0).context("writing META")
    }

    /// Every account in `USERS` (what the previous controller published).
    pub fn users(&self) -> Vec<UserStats> {
        let m = self.lock();
        (0..m.users.len())
            .filter_map(|i| m.users.get(&i, 0).ok())
            .filter(|u| u.name[0] != 0)
            .collect()
    }

    /// Removes the SOCKS5 fast-path records no association holds (those of associations
    /// that ended with a previous controller); returns how many.
    pub fn socks_sweep(&self) -> usize {
        let ids: Vec<u32> = {
            let m = self.lock();
            let free: std::collections::HashSet<u32> = m.socks_free.iter().copied().collect();
            (0..m.sessions.len())
                .filter(|id| {
                    m.sessions
                        .get(id, 0)
                        .is_ok_and(|s| s.state == STATE_ACTIVE && is_socks(&s))
                })
                .filter(|id| free.contains(id) || !m.socks_ids.contains(id))
                .collect()
        };
        for id in &ids {
            let _ = self.remove(*id);
        }
        ids.len()
    }

    /// Takes a SOCKS5 fast-path record a predecessor handed over back into use; its record.
    pub fn socks_adopt(&self, id: u32) -> Option<Session> {
        let mut m = self.lock();
        let s = m.sessions.get(&id, 0).ok()?;
        if s.state != STATE_ACTIVE || !is_socks(&s) {
            return None;
        }
        let before = m.socks_free.len();
        m.socks_free.retain(|i| *i != id);
        (m.socks_free.len() < before).then_some(s)
    }

    pub fn set_nexthop_key(&self, slot: u16, key: &NexthopKey) -> anyhow::Result<()> {
        self.lock()
            .nexthop_keys
            .set(u32::from(slot), key, 0)
            .context("writing NEXTHOP_KEYS")
    }

    pub fn nexthop_key(&self, slot: u16) -> anyhow::Result<NexthopKey> {
        self.lock()
            .nexthop_keys
            .get(&u32::from(slot), 0)
            .context("reading NEXTHOP_KEYS")
    }

    /// Sets the record ids `ids` aside for SOCKS5 fast-path flows (handed out lowest first).
    pub fn with_socks_ids(self, ids: Range<u32>) -> Datapath {
        let mut m = self.lock();
        m.socks_free = ids.clone().rev().collect();
        m.socks_ids = ids;
        drop(m);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock is a bug; the handles are still the best we have.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the maps pinned in `dir` (for `relay stats` and `relay sessions`).
    pub fn from_pins(dir: &std::path::Path) -> anyhow::Result<PinnedView> {
        let open = |name: &str| -> anyhow::Result<MapData> {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| {
                format!(
                    "no relay maps at {} (is the relay running on this interface?)",
                    path.display()
                )
            })
        };
        Ok(PinnedView {
            sessions: Array::try_from(aya::maps::Map::Array(open(maps::SESSIONS)?))?,
            slow: Array::try_from(aya::maps::Map::Array(open(maps::SLOWPATH)?))?,
            rules: Array::try_from(aya::maps::Map::Array(open(maps::RULES)?))?,
        })
    }

    /// Kernel memory the session maps take (FLOWS, SESSIONS, SLOWPATH), from the kernel's
    /// own accounting (`memlock` in fdinfo).
    pub fn session_memory(&self) -> u64 {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fds = {
            let m = self.lock();
            [
                m.flows.map().fd().as_fd().as_raw_fd(),
                m.sessions.map().fd().as_fd().as_raw_fd(),
                m.slow.map().fd().as_fd().as_raw_fd(),
                m.hops.map().fd().as_fd().as_raw_fd(),
            ]
        };
        fds.iter()
            .filter_map(|fd| std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok())
            .filter_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// The flow `key` leads to, if any (a session the kernel may have opened).
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.lock().flows.get(key, 0).ok()
    }

    /// Marks UDP relay port `port` as session `id`'s (strangers' datagrams to it are dropped):
    /// for a session the kernel opened, once the controller holds the port with its socket.
    pub fn set_port(&self, port: u16, id: u32) -> anyhow::Result<()> {
        self.lock()
            .ports
            .set(u32::from(port), id + 1, 0)
            .context("writing PORTS")
    }

    /// Where a rule opens sessions in the kernel (`None`: no longer).
    pub fn set_listen(&self, key: ListenKey, value: Option<&Listen>) -> anyhow::Result<()> {
        let mut m = self.lock();
        let bit = if key.proto == PROTO_UDP { 1 } else { 2 };
        let port = u32::from(key.port);
        let bits = m.rule_ports.get(&port, 0).unwrap_or(0);
        match value {
            Some(v) => {
                m.listen.insert(key, v, 0).context("writing LISTEN")?;
                m.rule_ports
                    .set(port, bits | bit, 0)
                    .context("writing RULE_PORTS")
            }
            None => {
                let _ = m.listen.remove(&key);
                // Another address may listen on the port still: the bit stays (a lookup
                // that finds nothing costs only the host's traffic to that port).
                let _ = bits;
                Ok(())
            }
        }
    }

    /// Clears what a predecessor left in `LISTEN`, `ALLOW` and `SOURCE_FULL`: the rules are
    /// armed again from this configuration, and the shares counted again.
    pub fn clear_kernel_rules(&self) {
        let mut m = self.lock();
        let keys: Vec<ListenKey> = m.listen.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.listen.remove(&k);
            let _ = m.rule_ports.set(u32::from(k.port), 0, 0);
        }
        let keys: Vec<_> = m.allow.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.allow.remove(&k);
        }
        let keys: Vec<SourceKey> = m.source_full.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.source_full.remove(&k);
        }
    }

    /// Sets or clears a kernel rule's full flag (it holds `max_sessions`).
    pub fn set_listen_full(&self, key: ListenKey, full: bool) -> anyhow::Result<()> {
        let mut m = self.lock();
        let Ok(mut v) = m.listen.get(&key, 0) else {
            return Ok(());
        };
        let flags = if full {
            v.flags | LISTEN_FULL
        } else {
            v.flags & !LISTEN_FULL
        };
        if flags == v.flags {
            return Ok(());
        }
        v.flags = flags;
        m.listen.insert(key, v, 0).context("writing LISTEN")
    }

    /// Replaces rule `rule`'s allow list in `ALLOW` (`old` are the networks it had).
    pub fn set_allow(
        &self,
        rule: u16,
        old: &[crate::config::Cidr],
        new: &[crate::config::Cidr],
    ) -> anyhow::Result<()> {
        let key = |c: &crate::config::Cidr| {
            let data = AllowKey {
                rule: rule.to_be_bytes(),
                family: family(c.addr),
                _pad: 0,
                addr: addr16(c.addr),
            };
            Key::new(32 + u32::from(c.len), data)
        };
        let mut m = self.lock();
        for c in old {
            let _ = m.allow.remove(&key(c));
        }
        for c in new {
            m.allow.insert(&key(c), 1, 0).context("writing ALLOW")?;
        }
        Ok(())
    }

    /// Marks (or unmarks) a client address as holding its share of a kernel rule.
    pub fn set_source_full(&self, rule: u16, ip: IpAddr, full: bool) -> anyhow::Result<()> {
        let key = SourceKey {
            addr: addr16(ip),
            rule,
            family: family(ip),
            _pad: 0,
        };
        let mut m = self.lock();
        if full {
            m.source_full
                .insert(key, 1, 0)
                .context("writing SOURCE_FULL")
        } else {
            let _ = m.source_full.remove(&key);
            Ok(())
        }
    }

    /// Lends free session ids and ports to the kernel's pool `pool`; returns how many it took
    /// (the pool may be full).
    pub fn pool_push(&self, pool: usize, slots: &[(u32, u16)]) -> usize {
        let mut m = self.lock();
        let Some(queue) = m.pools.get_mut(pool) else {
            return 0;
        };
        slots
            .iter()
            .take_while(|(id, port)| {
                let slot = PoolSlot {
                    id: *id,
                    port: *port,
                    _pad: 0,
                };
                queue.push(slot, 0).is_ok()
            })
            .count()
    }

    /// Takes up to `max` ids and ports back from the kernel's queue of pool `pool` (the ones
    /// lent first).
    pub fn pool_drain(&self, pool: usize, max: usize) -> Vec<PoolSlot> {
        let mut m = self.lock();
        let Some(queue) = m.pools.get_mut(pool) else {
            return Vec::new();
        };
        std::iter::from_fn(|| queue.pop(0).ok()).take(max).collect()
    }

    /// Makes `ifindex` a possible redirect target.
    pub fn add_egress(&self, ifindex: u32) -> anyhow::Result<()> {
        self.lock()
            .egress
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to the redirect map"))
    }

    /// Installs session `id`: the record first, then the flows that lead to it.
    pub fn install(&self, id: u32, s: &Session, slow: &SlowPath) -> anyhow::Result<()> {
        self.lock().install(id, s, slow)
    }

    /// Removes session `id`: flows first (no new packet finds it), then the record, whose
    /// final counters are returned.
    pub fn remove(&self, id: u32) -> anyhow::Result<(Session, SlowPath)> {
        self.lock().remove(id)
    }

    pub fn session(&self, id: u32) -> anyhow::Result<Session> {
        self.lock().sessions.get(&id, 0).context("reading SESSIONS")
    }

    pub fn slow(&self, id: u32) -> anyhow::Result<SlowPath> {
        self.lock().slow.get(&id, 0).context("reading SLOWPATH")
    }

    pub fn set_slow(&self, id: u32, v: &SlowPath) -> anyhow::Result<()> {
        self.lock().slow.set(id, v, 0).context("writing SLOWPATH")
    }

    pub fn nexthop(&self, slot: u16) -> anyhow::Result<Nexthop> {
        self.lock()
            .nexthops
            .get(&u32::from(slot), 0)
            .context("reading NEXTHOPS")
    }

    /// The next hop back to the client of a session XDP opened (`HOPS`, XDP's).
    pub fn hop(&self, id: u32) -> anyhow::Result<Nexthop> {
        self.lock().hops.get(&id, 0).context("reading HOPS")
    }

    pub fn set_nexthop(&self, slot: u16, nh: &Nexthop) -> anyhow::Result<()> {
        self.lock()
            .nexthops
            .set(u32::from(slot), nh, 0)
            .context("writing NEXTHOPS")
    }

    pub fn update_rule(&self, rule: u16, f: impl FnOnce(&mut RuleStats)) -> anyhow::Result<()> {
        let mut m = self.lock();
        let mut r = m.rules.get(&u32::from(rule), 0).context("reading RULES")?;
        f(&mut r);
        m.rules.set(u32::from(rule), r, 0).context("writing RULES")
    }

    /// Publishes one SOCKS5 account to `USERS`.
    pub fn set_user(&self, index: u32, stats: &UserStats) -> anyhow::Result<()> {
        self.lock()
            .users
            .set(index, stats, 0)
            .context("writing USERS")
    }

    /// What XDP carried for a user while it had limits (`USER_SPENT`, XDP's; zeros if unread).
    pub fn user_spent(&self, index: u32) -> [u64; 2] {
        self.lock()
            .user_spent
            .get(&index, 0)
            .map_or([0, 0], |s| s.bytes)
    }

    /// Sets a user's lease in `USER_LIMITS` (see `relay_common::limits`).
    pub fn set_user_limit(&self, index: u32, limit: &UserLimit) -> anyhow::Result<()> {
        self.lock()
            .user_limits
            .set(index, limit, 0)
            .context("writing USER_LIMITS")
    }

    /// Active sessions in the maps (after a restart: the state to take over).
    pub fn active(&self) -> Vec<(u32, Session)> {
        let m = self.lock();
        (0..m.sessions.len())
            .filter_map(|id| {
                let s = m.sessions.get(&id, 0).ok()?;
                (s.state == STATE_ACTIVE).then_some((id, s))
            })
            .collect()
    }

    /// Puts one SOCKS5 (association, destination) pair in the fast path with the next hops
    /// `nexthop` ([to the destination, to the client]); returns its record id, or `None` when
    /// XDP cannot carry it (mixed families, no free id, the flow table full).
    pub fn socks_open(&self, ends: Endpoints, user: u16, nexthop: [u16; 2]) -> Option<u32> {
        if !ends.same_family() {
            return None;
        }
        let mut m = self.lock();
        let id = m.socks_free.pop()?;
        let rule = RULE_SOCKS | (user & !RULE_SOCKS);
        let record = record(&ends, rule, nexthop, crate::system::monotonic_ns());
        match m.install(id, &record, &SlowPath::default()) {
            Ok(()) => Some(id),
            Err(e) => {
                debug!(
                    "SOCKS5 flow {} -> {} not in the fast path: {e:#}",
                    ends.client, ends.upstream
                );
                m.socks_free.push(id);
                None
            }
        }
    }

    /// Takes a SOCKS5 pair out of the fast path; returns what XDP relayed for it.
    pub fn socks_close(&self, id: u32) -> [Traffic; 2] {
        let mut m = self.lock();
        let traffic = m
            .remove(id)
            .map_or([Traffic::default(); 2], |(s, _)| s.traffic);
        m.socks_free.push(id);
        traffic
    }

    /// Packets XDP has carried for the fast-path flows `ids` of a SOCKS5 association, both
    /// directions: an association whose socket hears nothing is still alive while this grows.
    pub fn socks_packets(&self, ids: impl IntoIterator<Item = u32>) -> u64 {
        let m = self.lock();
        ids.into_iter()
            .filter_map(|id| m.sessions.get(&id, 0).ok())
            .map(|s| s.packets())
            .sum()
    }

    /// Bytes XDP relayed for SOCKS5 flows `ids`, per direction (their records' counters).
    pub fn socks_bytes<'a>(&self, ids: impl IntoIterator<Item = &'a u32>) -> [u64; 2] {
        let m = self.lock();
        let mut out = [0u64; 2];
        for s in ids.into_iter().filter_map(|id| m.sessions.get(id, 0).ok()) {
            for (o, t) in out.iter_mut().zip(s.traffic) {
                *o = o.wrapping_add(t.bytes);
            }
        }
        out
    }
}

impl Maps {
    fn install(&mut self, id: u32, s: &Session, slow: &SlowPath) -> anyhow::Result<()> {
        self.slow.set(id, slow, 0).context("writing SLOWPATH")?;
        self.sessions.set(id, s, 0).context("writing SESSIONS")?;
        if is_socks(s) {
            let flow = Flow {
                session: id,
                direction: FLOW_SOCKS,
            };
            if let Err(e) = self.flows.insert(socks_key(&endpoints(s)), flow, 0) {
                let _ = self.sessions.set(id, Session::default(), 0);
                return Err(anyhow!(e).context("writing FLOWS (is the flow table full?)"));
            }
            return Ok(());
        }
        // Mixed-family sessions get flows too: without them the fast path would take the
        // upstream's replies to the session port for a stranger's. Their record (IPv6 family,
        // no next hops) makes the fast path hand every packet to the controller.
        let keys = flow_keys(&endpoints(s), s.proto);
        for (direction, key) in [TO_UPSTREAM, TO_CLIENT].into_iter().zip(keys) {
            let flow = Flow {
                session: id,
                direction,
            };
            if let Err(e) = self.flows.insert(key, flow, 0) {
                let _ = self.flows.remove(&keys[0]);
                let _ = self.sessions.set(id, Session::default(), 0);
                return Err(anyhow!(e).context("writing FLOWS (is the flow table full?)"));
            }
        }
        // The relay port is now the session's: strangers' datagrams to it are dropped.
        self.ports
            .set(u32::from(s.back_port), id + 1, 0)
            .context("writing PORTS")
    }

    fn remove(&mut self, id: u32) -> anyhow::Result<(Session, SlowPath)> {
        let s = self.sessions.get(&id, 0).context("reading SESSIONS")?;
        if s.state == STATE_ACTIVE && is_socks(&s) {
            let _ = self.flows.remove(&socks_key(&endpoints(&s)));
        } else if s.state == STATE_ACTIVE {
            for key in flow_keys(&endpoints(&s), s.proto) {
                // Missing keys are fine: a failed install or an earlier partial removal.
                let _ = self.flows.remove(&key);
            }
            let port = u32::from(s.back_port);
            if self.ports.get(&port, 0).is_ok_and(|v| v == id + 1) {
                let _ = self.ports.set(port, 0, 0);
            }
        }
        // Read again: the fast path may have counted packets until the flows went away.
        let last = self.sessions.get(&id, 0).context("reading SESSIONS")?;
        let slow = self.slow.get(&id, 0).context("reading SLOWPATH")?;
        self.sessions
            .set(id, Session::default(), 0)
            .context("clearing SESSIONS")?;
        self.slow
            .set(id, SlowPath::default(), 0)
            .context("clearing SLOWPATH")?;
        Ok((last, slow))
    }
}

/// Read-only handles on pinned maps, for the operator's commands.
pub struct PinnedView {
    pub sessions: Array<MapData, Session>,
    pub slow: Array<MapData, SlowPath>,
    pub rules: Array<MapData, RuleStats>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::session::NEXTHOP_NONE;

    fn e(client: &str, front: &str, back: &str, upstream: &str) -> Endpoints {
        Endpoints {
            client: client.parse().unwrap(),
            front: front.parse().unwrap(),
            back: back.parse().unwrap(),
            upstream: upstream.parse().unwrap(),
        }
    }

    #[test]
    fn records_round_trip_to_endpoints() {
        for ends in [
            e(
                "198.51.100.2:4000",
                "192.0.2.1:51820",
                "192.0.2.1:20000",
                "203.0.113.7:51820",
            ),
            e(
                "[2001:db8::2]:4000",
                "[2001:db8::1]:443",
                "[2001:db8:1::1]:20001",
                "[2001:db8:2::7]:443",
            ),
            // Mixed families: stored mapped, read back as they were.
            e(
                "198.51.100.2:4000",
                "192.0.2.1:51820",
                "[2001:db8:1::1]:20002",
                "[2001:db8:2::7]:51820",
            ),
        ] {
            let r = record(&ends, 3, [NEXTHOP_NONE; 2], 9);
            assert_eq!(endpoints(&r), ends);
            assert_eq!((r.rule, r.state, r.last_seen), (3, STATE_ACTIVE, 9));
        }
    }

    #[test]
    fn flow_keys_are_the_remote_ends_and_local_ports() {
        let ends = e(
            "198.51.100.2:4000",
            "192.0.2.1:51820",
            "192.0.2.1:20000",
            "203.0.113.7:51820",
        );
        let [c, u] = flow_keys(&ends, PROTO_UDP);
        assert_eq!(
            (c.remote_port, c.local_port, c.family),
            (4000, 51820, FAMILY_V4)
        );
        assert_eq!(&c.remote[..4], &[198, 51, 100, 2]);
        assert_eq!((u.remote_port, u.local_port), (51820, 20000));
        assert_eq!(&u.remote[..4], &[203, 0, 113, 7]);
    }
}
