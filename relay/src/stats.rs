//! Counters as the operator sees them: read from the pinned maps, summed over CPUs, printed as
//! a table or JSON.

use std::{borrow::Borrow, collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray};
use relay_common::{
    counters::{Counter, Open, Reason, Verdict},
    maps,
};
use serde::Serialize;

/// Totals of the data path's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Packets and bytes per verdict.
    pub verdicts: BTreeMap<&'static str, Totals>,
    /// Packets and bytes per reason (every reason, zero or not).
    pub reasons: BTreeMap<&'static str, Totals>,
    /// What became of SYNs that could open a session in the kernel, per cause.
    pub kernel_opens: BTreeMap<&'static str, u64>,
    /// SOCKS5 CONNECT bytes the kernel carried (sockmap), and what it left to the controller.
    pub connect_kernel: BTreeMap<&'static str, u64>,
}

/// Names of the `SPLICE_TOTALS` slots, by slot.
const SPLICE_NAMES: [&str; relay_common::splice::SPLICE_TOTAL_SLOTS as usize] = [
    "redirected_bytes",
    "passed_bytes",
    "no_peer",
    "unknown_socket",
    "no_credit",
    "fell_behind",
];

/// `SPLICE_TOTALS` summed over CPUs, by name.
fn read_splice<M: Borrow<MapData>>(
    map: &PerCpuArray<M, u64>,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut out = BTreeMap::new();
    for (slot, name) in SPLICE_NAMES.iter().enumerate() {
        let per_cpu = map
            .get(&(slot as u32), 0)
            .with_context(|| format!("reading CONNECT totals {name}"))?;
        out.insert(*name, per_cpu.iter().sum());
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, c: &Counter) {
        self.packets += c.packets;
        self.bytes += c.bytes;
    }
}

impl Snapshot {
    /// Sums the per-CPU `COUNTERS` map.
    pub fn read<M: Borrow<MapData>>(
        counters: &PerCpuArray<M, Counter>,
    ) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot::default();
        for v in Verdict::ALL {
            s.verdicts.insert(v.name(), Totals::default());
        }
        for &reason in Reason::ALL {
            let per_cpu = counters
                .get(&(reason as u32), 0)
                .with_context(|| format!("reading counter {}", reason.name()))?;
            let mut t = Totals::default();
            for c in per_cpu.iter() {
                t.add(c);
            }
            s.reasons.insert(reason.name(), t);
            if let Some(v) = s.verdicts.get_mut(reason.verdict().name()) {
                v.packets += t.packets;
                v.bytes += t.bytes;
            }
        }
        Ok(s)
    }

    /// Reads the counters of a loaded program.
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> anyhow::Result<Snapshot> {
        let map = ebpf
            .map(maps::COUNTERS)
            .context("the XDP object has no COUNTERS map")?;
        let counters: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(map).context("COUNTERS is not a per-CPU array")?;
        let mut s = Snapshot::read(&counters)?;
        if let Some(map) = ebpf.map(maps::KERNEL_OPENS) {
            let opens: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(map).context("KERNEL_OPENS is not a per-CPU array")?;
            s.kernel_opens = read_opens(&opens)?;
        }
        if let Some(map) = ebpf.map(maps::SPLICE_TOTALS) {
            let totals: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(map).context("SPLICE_TOTALS is not a per-CPU array")?;
            s.connect_kernel = read_splice(&totals)?;
        }
        Ok(s)
    }

    /// Reads the counters pinned in `pin_dir` by a running (or stopped) relay.
    pub fn from_pin(pin_dir: &Path) -> anyhow::Result<Snapshot> {
        let path = pin_dir.join(maps::COUNTERS);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "no relay counters at {} (is the relay running on this interface?)",
                path.display()
            )
        })?;
        let counters = PerCpuArray::try_from(Map::PerCpuArray(data))
            .context("COUNTERS is not a per-CPU array")?;
        let mut s = Snapshot::read(&counters)?;
        if let Ok(data) = MapData::from_pin(pin_dir.join(maps::KERNEL_OPENS)) {
            let opens: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
                .context("KERNEL_OPENS is not a per-CPU array")?;
            s.kernel_opens = read_opens(&opens)?;
        }
        if let Ok(data) = MapData::from_pin(pin_dir.join(maps::SPLICE_TOTALS)) {
            let totals: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(Map::PerCpuArray(data))
                    .context("SPLICE_TOTALS is not a per-CPU array")?;
            s.connect_kernel = read_splice(&totals)?;
        }
        Ok(s)
    }

    /// SYNs that opened a session in the kernel, or were refused or left to the controller
    /// there, for `cause`.
    pub fn opens(&self, cause: Open) -> u64 {
        self.kernel_opens.get(cause.name()).copied().unwrap_or(0)
    }

    pub fn reason(&self, r: Reason) -> Totals {
        self.reasons.get(r.name()).copied().unwrap_or_default()
    }

    pub fn verdict(&self, v: Verdict) -> Totals {
        self.verdicts.get(v.name()).copied().unwrap_or_default()
    }

    /// The human-readable table `relay stats` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<10} {:>14} {:>16}", "verdict", "packets", "bytes");
        for v in Verdict::ALL {
            let t = self.verdict(v);
            let _ = writeln!(out, "{:<10} {:>14} {:>16}", v.name(), t.packets, t.bytes);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>14} {:>16}",
            "reason", "verdict", "packets", "bytes"
        );
        for &r in Reason::ALL {
            let t = self.reason(r);
            let _ = writeln!(
                out,
                "{:<16} {:<8} {:>14} {:>16}",
                r.name(),
                r.verdict().name(),
                t.packets,
                t.bytes
            );
        }
        if !self.connect_kernel.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "{:<16} {:>14}", "CONNECT kernel", "");
            for (name, v) in &self.connect_kernel {
                let _ = writeln!(out, "{name:<16} {v:>14}");
            }
        }
        out
    }
}

/// The per-CPU `KERNEL_OPENS` map summed over CPUs, per rule: `[rule][cause]`.
pub fn kernel_opens_per_rule<M: Borrow<MapData>>(
    map: &PerCpuArray<M, u64>,
) -> anyhow::Result<Vec<[u64; Open::ALL.len()]>> {
    use relay_common::{counters::OPEN_SLOTS, session::RULE_SLOTS};
    let mut out = vec![[0u64; Open::ALL.len()]; RULE_SLOTS as usize];
    for (rule, counts) in out.iter_mut().enumerate() {
        for (i, cause) in Open::ALL.iter().enumerate() {
            let slot = rule as u32 * OPEN_SLOTS + *cause as u32;
            let per_cpu = map
                .get(&slot, 0)
                .with_context(|| format!("reading kernel opens {}", cause.name()))?;
            counts[i] = per_cpu.iter().sum();
        }
    }
    Ok(out)
}

/// `KERNEL_OPENS` summed over CPUs and rules, by cause.
fn read_opens<M: Borrow<MapData>>(
    map: &PerCpuArray<M, u64>,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let per_rule = kernel_opens_per_rule(map)?;
    Ok(Open::ALL
        .iter()
        .enumerate()
        .map(|(i, cause)| (cause.name(), per_rule.iter().map(|r| r[i]).sum()))
        .collect())
}

/// A NUL-padded name from a pinned map.
pub(crate) fn name_of(field: &[u8; 32]) -> String {
    let len = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..len]).into_owned()
}

/// One forward rule's totals: closed sessions plus live ones, split by who relayed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    pub index: u16,
    pub name: String,
    /// "udp" or "tcp".
    pub protocol: &'static str,
    /// Of `opened`, the sessions XDP opened (the rest: the controller).
    pub opened_in_kernel: u64,
    pub listen: String,
    pub upstream: String,
    pub sessions: u64,
    pub opened: u64,
    pub closed: u64,
    pub refused: BTreeMap<&'static str, u64>,
    /// Sessions whose upstream never answered: evicted to make room for a new one, and
    /// closed after `unanswered_timeout`.
    pub evicted_unanswered: u64,
    pub closed_unanswered: u64,
    /// Live sessions' traffic relayed by XDP, client to upstream and back.
    pub xdp: Directions,
    /// Live sessions' traffic the controller relayed itself (first packets, declined ones, or
    /// all of it without XDP).
    pub slow_path: Directions,
    /// Traffic of sessions that have ended (both relayers together).
    pub closed_sessions: Directions,
    /// TCP segments XDP could not carry (next hop unresolved, too big without DF) that the
    /// controller relayed for it (IP bytes before fragmenting; not in `xdp`), and those it
    /// could not.
    pub tcp_slow_relayed: Directions,
    pub tcp_slow_dropped: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Directions {
    pub to_upstream: Totals,
    pub to_client: Totals,
}

impl Directions {
    fn merge(&mut self, o: &Directions) {
        for (t, o) in [
            (&mut self.to_upstream, o.to_upstream),
            (&mut self.to_client, o.to_client),
        ] {
            t.packets += o.packets;
            t.bytes += o.bytes;
        }
    }

    fn add(&mut self, t: &[relay_common::session::Traffic; 2]) {
        self.to_upstream.packets += t[0].packets;
        self.to_upstream.bytes += t[0].bytes;
        self.to_client.packets += t[1].packets;
        self.to_client.bytes += t[1].bytes;
    }
}

/// One live session as `relay sessions` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionReport {
    pub id: u32,
    pub rule: u16,
    /// "udp" or "tcp".
    pub protocol: &'static str,
    /// TCP: "open", or "closing" once both sides sent FIN or one reset; UDP: "open".
    pub state: &'static str,
    /// "kernel" (opened by XDP) or "controller".
    pub opened_by: &'static str,
    pub client: String,
    pub front: String,
    pub back: String,
    pub upstream: String,
    pub idle_seconds: u64,
    pub xdp: Directions,
    pub slow_path: Directions,
}

/// Sessions and rules from the pinned maps.
pub fn sessions_and_rules(pin_dir: &Path) -> anyhow::Result<(Vec<SessionReport>, Vec<RuleReport>)> {
    use relay_common::session::{RULE_SLOTS, STATE_ACTIVE};
    let view = crate::datapath::Datapath::from_pins(pin_dir)?;
    let now = crate::system::monotonic_ns();
    // What the kernel refused or opened per rule (maps from before kernel opens: none).
    let kernel = MapData::from_pin(pin_dir.join(maps::KERNEL_OPENS))
        .ok()
        .and_then(|d| PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(d)).ok())
        .map(|m| kernel_opens_per_rule(&m))
        .transpose()?
        .unwrap_or_default();
    let mut rules: BTreeMap<u16, RuleReport> = BTreeMap::new();
    for index in 0..RULE_SLOTS as u16 {
        let r = view.rules.get(&u32::from(index), 0)?;
        if r.configured == 0 && r.opened == 0 {
            continue;
        }

        let mut report = RuleReport {
            index,
            name: name_of(&r.name),
            protocol: crate::forward::proto_name(r.proto),
            listen: std::net::SocketAddr::new(
                crate::datapath::ip_of(r.family, &r.listen),
                r.listen_port,
            )
            .to_string(),
            upstream: std::net::SocketAddr::new(
                crate::datapath::ip_of(r.family, &r.upstream),
                r.upstream_port,
            )
            .to_string(),
            opened: r.opened,
            closed: r.closed,
            ..Default::default()
        };
        // Refused by the controller, and by the kernel before any session was opened.
        let k = |cause: Open| {
            kernel
                .get(usize::from(index))
                .map_or(0, |c| c[cause as usize])
        };
        for (name, controller, kernel) in [
            ("not_allowed", r.refused_not_allowed, k(Open::NotAllowed)),
            ("rule_limit", r.refused_limit, k(Open::RuleFull)),
            ("table_full", r.refused_full, 0),
            ("no_port", r.refused_no_port, 0),
            ("source_limit", r.refused_source_limit, k(Open::SourceFull)),
            ("rate_limited", r.refused_rate, k(Open::Rate)),
        ] {
            report.refused.insert(name, controller + kernel);
        }
        report.opened_in_kernel = k(Open::Opened);
        report.evicted_unanswered = r.evicted_unanswered;
        report.closed_unanswered = r.closed_unanswered;
        report.closed_sessions.add(&r.retired);
        report.tcp_slow_relayed.add(&r.tcp_slow);
        report.tcp_slow_dropped = r.tcp_slow_dropped;
        rules.insert(index, report);
    }
    let mut sessions = Vec::new();
    for id in 0..view.sessions.len() {
        let s = view.sessions.get(&id, 0)?;
        if s.state != STATE_ACTIVE || crate::datapath::is_socks(&s) {
            continue;
        }
        let slow = view.slow.get(&id, 0)?;
        let e = crate::datapath::endpoints(&s);
        let mut xdp = Directions::default();
        xdp.add(&s.traffic);
        let mut slow_path = Directions::default();
        slow_path.add(&slow.traffic);
        let last = s.last_seen.max(slow.last_seen);
        let report = SessionReport {
            id,
            rule: s.rule,
            protocol: crate::forward::proto_name(s.proto),
            state: if s.proto == relay_common::packet::PROTO_TCP && s.tcp_closing() {
                "closing"
            } else {
                "open"
            },
            opened_by: if s.origin == relay_common::session::ORIGIN_KERNEL {
                "kernel"
            } else {
                "controller"
            },
            client: e.client.to_string(),
            front: e.front.to_string(),
            back: e.back.to_string(),
            upstream: e.upstream.to_string(),
            idle_seconds: now.saturating_sub(last) / 1_000_000_000,
            xdp,
            slow_path,
        };
        if let Some(r) = rules.get_mut(&s.rule) {
            r.sessions += 1;
            r.xdp.add(&s.traffic);
            r.slow_path.add(&slow.traffic);
        }
        sessions.push(report);
    }
    Ok((sessions, rules.into_values().collect()))
}

/// One SOCKS5 user's totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserReport {
    pub name: String,
    pub connect_bytes_to_destination: u64,
    pub connect_bytes_to_client: u64,
    pub udp: Directions,
    pub connections: u64,
    pub associations: u64,
    pub active_connections: u64,
    pub active_associations: u64,
    pub auth_failures: u64,
    pub refused: u64,
    pub udp_dropped: u64,
    pub fast_path_refused: u64,
    /// Requests refused by the user's limits (blocked, or over `max_devices`).
    pub limit_refused: u64,
    /// UDP datagrams the controller dropped over the user's rate or quota.
    pub over_limit: u64,
    /// The part of `udp` that XDP relayed (live and ended associations).
    pub udp_xdp: Directions,
}

/// SOCKS5 users from the pinned `USERS` map (those a controller configured or that did
/// anything).
pub fn users(pin_dir: &Path) -> anyhow::Result<Vec<UserReport>> {
    use relay_common::session::{UserStats, USER_SLOTS};
    let path = pin_dir.join(maps::USERS);
    let data =
        MapData::from_pin(&path).with_context(|| format!("no relay maps at {}", path.display()))?;
    let map: aya::maps::Array<MapData, UserStats> = aya::maps::Array::try_from(Map::Array(data))?;
    // What XDP is relaying right now for live associations, per user.
    let mut live: BTreeMap<u16, Directions> = BTreeMap::new();
    if let Ok(view) = crate::datapath::Datapath::from_pins(pin_dir) {
        for id in 0..view.sessions.len() {
            let Ok(s) = view.sessions.get(&id, 0) else {
                continue;
            };
            if s.state == relay_common::session::STATE_ACTIVE && crate::datapath::is_socks(&s) {
                live.entry(s.rule & !relay_common::session::RULE_SOCKS)
                    .or_default()
                    .add(&s.traffic);
            }
        }
    }
    let mut out = Vec::new();
    for i in 0..USER_SLOTS.min(map.len()) {
        let u = map.get(&i, 0)?;
        let active = u.connections + u.associations + u.auth_failures + u.refused;
        if u.configured == 0 || (i == 0 && active == 0) {
            continue;
        }
        let mut udp = Directions::default();
        udp.add(&u.udp);
        let mut udp_xdp = Directions::default();
        udp_xdp.add(&u.udp_xdp);
        if let Some(l) = live.get(&(i as u16)) {
            udp_xdp.merge(l);
        }
        // `udp` is everything the user sent and received: the controller's part plus XDP's.
        udp.merge(&udp_xdp);
        out.push(UserReport {
            name: name_of(&u.name),
            connect_bytes_to_destination: u.tcp_bytes[0],
            connect_bytes_to_client: u.tcp_bytes[1],
            udp,
            connections: u.connections,
            associations: u.associations,
            active_connections: u.active_connections,
            active_associations: u.active_associations,
            auth_failures: u.auth_failures,
            refused: u.refused,
            udp_dropped: u.udp_dropped,
            fast_path_refused: u.fast_path_refused,
            limit_refused: u.limit_refused,
            over_limit: u.over_limit,
            udp_xdp,
        });
    }
    Ok(out)
}

/// `relay stats`: counters, rules, SOCKS5 users.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub counters: Snapshot,
    pub rules: Vec<RuleReport>,
    pub users: Vec<UserReport>,
    /// Who runs on the pinned state, and what restarts did to it.
    pub controller: Option<ControllerReport>,
}

/// The controller bookkeeping of `META`.
#[derive(Serialize, Debug, Clone)]
pub struct ControllerReport {
    /// Version of the relay that last started on these maps.
    pub version: String,
    /// Process id of the running controller; `None` when none runs (XDP may still relay).
    pub pid: Option<u32>,
    pub starts: u64,
    /// Starts that took over sockets and connections from a running controller.
    pub handovers: u64,
    /// Starts after a controller that died without stopping.
    pub crash_recoveries: u64,
    /// SOCKS5 CONNECTs and associations that ended with a controller that died.
    pub lost_connections: u64,
    pub lost_associations: u64,
}

/// The controller bookkeeping pinned in `pin_dir` (`None` for maps without it).
pub fn controller(pin_dir: &Path) -> Option<ControllerReport> {
    use relay_common::session::{Meta, META_MAGIC};
    let data = MapData::from_pin(pin_dir.join(maps::META)).ok()?;
    let map: aya::maps::Array<MapData, Meta> = aya::maps::Array::try_from(Map::Array(data)).ok()?;
    let m = map.get(&0, 0).ok()?;
    (m.magic == META_MAGIC).then(|| ControllerReport {
        version: crate::datapath::version_of(&m),
        pid: (m.pid != 0).then_some(m.pid),
        starts: m.starts,
        handovers: m.handovers,
        crash_recoveries: m.crash_recoveries,
        lost_connections: m.lost_connections,
        lost_associations: m.lost_associations,
    })
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.controller {
            let _ = writeln!(
                out,
                "controller: {} (relay {}); {} starts, {} handovers, {} after a crash \
                 (lost {} CONNECTs, {} associations)\n",
                c.pid
                    .map_or_else(|| "none running".to_owned(), |p| format!("pid {p}")),
                c.version,
                c.starts,
                c.handovers,
                c.crash_recoveries,
                c.lost_connections,
                c.lost_associations
            );
        }
        out.push_str(&self.counters.table());
        if !self.users.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "{:<16} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "socks5 user",
                "tcp bytes ->",
                "tcp bytes <-",
                "udp pkts ->",
                "udp pkts <-",
                "conns",
                "assocs",
                "authfail",
                "refused",
                "limited",
                "overlim"
            );
            for u in &self.users {
                let _ = writeln!(
                    out,
                    "{:<16} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    u.name,
                    u.connect_bytes_to_destination,
                    u.connect_bytes_to_client,
                    u.udp.to_upstream.packets,
                    u.udp.to_client.packets,
                    u.connections,
                    u.associations,
                    u.auth_failures,
                    u.refused,
                    u.limit_refused,
                    u.over_limit
                );
            }
        }
        if self.rules.is_empty() {
            return out;
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<12} {:<5} {:<24} {:<24} {:>8} {:>8} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12}",
            "rule",
            "proto",
            "listen",
            "upstream",
            "sessions",
            "opened",
            "refused",
            "unanswered",
            "xdp pkts ->",
            "xdp pkts <-",
            "slow pkts ->",
            "slow pkts <-"
        );
        for r in &self.rules {
            let _ = writeln!(
                out,
                "{:<12} {:<5} {:<24} {:<24} {:>8} {:>8} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12}",
                r.name,
                r.protocol,
                r.listen,
                r.upstream,
                r.sessions,
                r.opened,
                r.refused.values().sum::<u64>(),
                r.evicted_unanswered + r.closed_unanswered,
                r.xdp.to_upstream.packets,
                r.xdp.to_client.packets,
                r.slow_path.to_upstream.packets,
                r.slow_path.to_client.packets
            );
        }
        out
    }
}

pub fn sessions_table(sessions: &[SessionReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:>4} {:<5} {:<40} {:<40} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "id",
        "rule",
        "proto",
        "client -> front",
        "back -> upstream",
        "idle",
        "xdp ->",
        "xdp <-",
        "slow ->",
        "slow <-"
    );
    for s in sessions {
        let _ = writeln!(
            out,
            "{:>6} {:>4} {:<5} {:<40} {:<40} {:>5}s {:>10} {:>10} {:>10} {:>10}",
            s.id,
            s.rule,
            s.protocol,
            format!("{} -> {}", s.client, s.front),
            format!("{} -> {}", s.back, s.upstream),
            s.idle_seconds,
            s.xdp.to_upstream.packets,
            s.xdp.to_client.packets,
            s.slow_path.to_upstream.packets,
            s.slow_path.to_client.packets
        );
    }
    out
}

/// Bytes as megabytes for a table (`12.3 MB`).
pub fn megabytes(v: u64) -> String {
    format!("{:.1} MB", v as f64 / 1e6)
}

/// One SOCKS5 user's usage and limits, as `relay users` shows them (from the store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UserUsage {
    pub name: String,
    /// Payload bytes this period: client to destination, back, and both.
    pub used_to_destination: u64,
    pub used_to_client: u64,
    pub used: u64,
    pub quota: Option<u64>,
    pub quota_left: Option<u64>,
    /// `never`, `daily`, `monthly:DAY`.
    pub period: String,
    /// RFC 3339 start of the period (none for `never`).
    pub period_start: Option<String>,
    pub expires: Option<String>,
    /// Bytes per second each way.
    pub rate: Option<u64>,
    pub max_devices: Option<u32>,
    /// `ok`, or why the user is refused: `disabled`, `expired`, `out of quota`.
    pub state: String,
    /// Live figures (as of `updated`; zero when the relay is not running).
    pub connections: u64,
    pub associations: u64,
    pub devices: u64,
    pub updated: String,
    /// Whether the relay wrote this within the last few seconds (it is running).
    pub running: bool,
}

impl UserUsage {
    /// A user's row of the store as `relay users` and the API show it, at `now` (live figures
    /// count only when the row was written in the last few seconds).
    pub fn of(r: &crate::store::Row, now: i64) -> UserUsage {
        use crate::limits::format_time;
        let running = now.saturating_sub(r.updated) <= 5;
        let live = |v: u64| if running { v } else { 0 };
        UserUsage {
            name: r.user.clone(),
            used_to_destination: r.usage.bytes[0],
            used_to_client: r.usage.bytes[1],
            used: r.usage.total(),
            quota: r.quota,
            quota_left: r.quota.map(|q| q.saturating_sub(r.usage.total())),
            period: r.period.clone(),
            period_start: (r.usage.period_start != 0).then(|| format_time(r.usage.period_start)),
            expires: r.expires.map(format_time),
            rate: r.rate,
            max_devices: r.max_devices,
            state: match (&r.blocked, r.enabled) {
                (Some(b), _) => b.clone(),
                (None, false) => "disabled".into(),
                (None, true) => "ok".into(),
            },
            connections: live(r.connections),
            associations: live(r.associations),
            devices: live(r.devices),
            updated: format_time(r.updated),
            running,
        }
    }
}

/// `relay users`.
#[derive(Clone, Debug, Serialize)]
pub struct UsersReport {
    pub users: Vec<UserUsage>,
}

impl UsersReport {
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mb = megabytes;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let mut out = format!(
            "{:<16} {:>12} {:>12} {:>12} {:<10} {:<20} {:>12} {:>5} {:>5} {:>5} {}\n",
            "USER",
            "USED",
            "QUOTA",
            "LEFT",
            "PERIOD",
            "EXPIRES",
            "RATE/S",
            "CONN",
            "ASSOC",
            "DEV",
            "STATE"
        );
        for u in &self.users {
            let _ = writeln!(
                out,
                "{:<16} {:>12} {:>12} {:>12} {:<10} {:<20} {:>12} {:>5} {:>5} {:>5} {}",
                u.name,
                mb(u.used),
                opt(u.quota.map(mb)),
                opt(u.quota_left.map(mb)),
                u.period,
                opt(u.expires.clone()),
                opt(u.rate.map(mb)),
                u.connections,
                u.associations,
                u.devices,
                u.state,
            );
        }
        if self.users.iter().any(|u| !u.running) {
            out.push_str("(no relay wrote these in the last seconds: live figures shown as 0)\n");
        }
        out
    }
}
