//! The rules: one listening socket per listen port (where new flows arrive, and what the fast
//! path declines from clients), the settings a reload may change, and the rules' `RULES`
//! slots (name, addresses).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::{Arc, RwLock},
};

use anyhow::{anyhow, Context as _};
use log::{info, warn};
use relay_common::{
    packet::{PROTO_TCP, PROTO_UDP},
    session::{Listen, ListenKey, RuleStats, LISTEN_ALLOW_LIST, NEXTHOP_NONE, RULE_SLOTS},
};
use tokio::net::{TcpListener, UdpSocket};

use crate::{
    config::{Cidr, Config, ForwardRule},
    datapath::{self, Datapath, Endpoints},
    nexthop::{self, Hops, NextHops},
    sessions::RuleLimits,
    udp,
};

/// A rule's listening socket: where new UDP flows arrive (and what the fast path declines
/// from clients), or the TCP connections XDP leaves to the controller (all of them without
/// XDP).
pub enum Listener {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

impl Listener {
    pub fn udp(&self) -> Option<&UdpSocket> {
        match self {
            Listener::Udp(s) => Some(s),
            Listener::Tcp(_) => None,
        }
    }

    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        match self {
            Listener::Udp(s) => s.as_fd(),
            Listener::Tcp(s) => s.as_fd(),
        }
    }
}

/// What a rule opens sessions in the kernel with: its `LISTEN` entry, the next hop to its
/// upstream it holds, and the allow list written to `ALLOW`.
struct Kernel {
    key: ListenKey,
    _hops: Hops,
    allow: Vec<Cidr>,
}

/// One listen port of a forward rule, for one protocol.
pub struct Rule {
    pub index: u16,
    pub listen: SocketAddr,
    /// `PROTO_UDP` or `PROTO_TCP`.
    pub proto: u8,
    pub socket: Listener,
    /// What a reload may change: limits, allow list, the upstream's address.
    current: RwLock<Current>,
    /// With XDP: where the kernel opens this rule's sessions (`None`: the controller opens
    /// them from its listening socket).
    kernel: std::sync::Mutex<Option<Kernel>>,
    /// Next hops of upstreams a reload replaced, held while sessions may still use them.
    retired_hops: std::sync::Mutex<Vec<Hops>>,
}

/// A rule's settings as the last (re)load left them.
#[derive(Clone)]
pub struct Current {
    pub config: ForwardRule,
    pub upstream: SocketAddr,
}

impl Rule {
    pub fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn limits(&self) -> RuleLimits {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        RuleLimits {
            max_sessions: c.config.max_sessions,
            idle_timeout: if self.proto == PROTO_TCP {
                c.config.tcp_idle_timeout
            } else {
                c.config.idle_timeout
            },
            max_sessions_per_source: c.config.max_sessions_per_source,
            new_sessions_per_second: c.config.new_sessions_per_second,
            new_sessions_burst: c.config.new_sessions_burst,
            unanswered_timeout: c.config.unanswered_timeout,
        }
    }

    pub fn name(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .config
            .name
            .clone()
    }

    /// The `LISTEN` key of a rule (its listen address, the unspecified one included).
    pub fn listen_key(&self) -> ListenKey {
        ListenKey {
            addr: datapath::addr16(self.listen.ip()),
            port: self.listen.port(),
            family: nexthop::family_of(self.listen.ip()),
            proto: self.proto,
            _pad: [0; 4],
        }
    }

    /// Whether the kernel opens this rule's sessions.
    pub fn in_kernel(&self) -> bool {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Lets the kernel open this rule's sessions: resolves the next hop to the upstream and
    /// writes the rule's `LISTEN` entry and allow list. Without a next hop (a route by an
    /// interface XDP is not attached to, or mixed families) the controller's listener keeps
    /// relaying every connection.
    pub async fn arm(&self, datapath: &Datapath, nexthops: &NextHops) -> anyhow::Result<()> {
        let current = self.current();
        let upstream = current.upstream;
        if upstream.is_ipv4() != self.listen.is_ipv4() {
            info!(
                "rule {}: {} and its upstream differ in family; the controller relays it",
                current.config.name, self.listen
            );
            return Ok(());
        }
        let back = back_address(upstream)
            .with_context(|| format!("rule {}: no route to {upstream}", current.config.name))?;
        let ends = Endpoints {
            client: upstream,
            front: back,
            back,
            upstream,
        };
        let hops = nexthops.ask(&ends).await;
        let slot = hops.slots()[0];
        if slot == NEXTHOP_NONE {
            info!(
                "rule {}: {upstream} is not reached by an interface XDP is attached to; the controller relays its connections",
                current.config.name
            );
            return Ok(());
        }
        // A new slot's neighbour may still be resolving: until it is, XDP would leave every
        // SYN to the controller. Wait for it a moment (the resolver gives up after half a
        // second and refreshes once a second after that).
        for _ in 0..50 {
            if datapath.nexthop(slot).is_ok_and(|n| n.ifindex != 0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let limits = self.limits();
        let (cost_ns, burst_ns) = rate(
            limits.new_sessions_per_second,
            limits.new_sessions_burst,
            aya::util::nr_cpus().map_or(1, |n| n.max(1) as u64),
        );
        let allow = current.config.allow.clone();
        let mut kernel = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let old_allow = kernel.as_ref().map_or(&[][..], |k| &k.allow[..]);
        datapath.set_allow(self.index, old_allow, &allow)?;
        let value = Listen {
            upstream: datapath::addr16(upstream.ip()),
            back: datapath::addr16(back.ip()),
            upstream_port: upstream.port(),
            rule: self.index,
            nexthop: slot,
            flags: if allow.is_empty() {
                0
            } else {
                LISTEN_ALLOW_LIST
            },
            cost_ns,
            burst_ns,
            pool: datapath::pool_of(upstream) as u16,
            _pad: [0; 3],
        };
        let key = self.listen_key();
        datapath.set_listen(key, Some(&value))?;
        if let Some(old) = kernel.replace(Kernel {
            key,
            _hops: hops,
            allow,
        }) {
            self.retired_hops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(old._hops);
        }
        Ok(())
    }

    /// Stops the kernel opening this rule's sessions (the rule is reloaded or the relay
    /// stops without a successor).
    pub fn disarm(&self, datapath: &Datapath) {
        if let Some(k) = self.kernel.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = datapath.set_listen(k.key, None);
            let _ = datapath.set_allow(self.index, &k.allow, &[]);
        }
    }
}

/// A rule's new-session rate as XDP's per-CPU buckets take it: nanoseconds per session on
/// one CPU, and the most credit one holds. (0, 0): no limit.
fn rate(per_second: u32, burst: u32, cpus: u64) -> (u64, u64) {
    if per_second == u32::MAX {
        return (0, 0);
    }
    let per_cpu = (u64::from(per_second) / cpus).max(1);
    let cost = 1_000_000_000 / per_cpu;
    let burst = (u64::from(burst) / cpus).max(1);
    (cost, cost.saturating_mul(burst))
}

/// The relay's address toward `upstream`: the source the kernel's routes pick.
fn back_address(upstream: SocketAddr) -> std::io::Result<SocketAddr> {
    let any: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("a valid address")
    } else {
        "[::]:0".parse().expect("a valid address")
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(upstream)?;
    probe.local_addr()
}

/// Expands configured rules into one entry per listen port and protocol, resolving upstream
/// names.
fn expand(config: &Config) -> anyhow::Result<Vec<(SocketAddr, u8, Current)>> {
    let mut out = Vec::new();
    for rule in &config.forward {
        let upstream_ip = rule.resolve_upstream()?;
        let protos = [
            (rule.protocols.udp, PROTO_UDP),
            (rule.protocols.tcp, PROTO_TCP),
        ];
        for (_, proto) in protos.into_iter().filter(|(on, _)| *on) {
            for port in rule.listen_ports.first..=rule.listen_ports.last {
                out.push((
                    SocketAddr::new(rule.listen_ip, port),
                    proto,
                    Current {
                        config: rule.clone(),
                        upstream: SocketAddr::new(upstream_ip, rule.upstream_port(port)),
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// "udp" or "tcp", for messages.
pub fn proto_name(proto: u8) -> &'static str {
    if proto == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// Writes a rule's name and addresses into its `RULES` slot.
fn label(r: &mut RuleStats, listen: SocketAddr, proto: u8, c: &Current) {
    r.name = relay_common::session::name32(&c.config.name);
    r.proto = proto;
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

/// The rules, indexed as in `RULES`.
pub struct Rules {
    rules: Vec<Rule>,
    datapath: Arc<Datapath>,
}

impl Rules {
    /// Resolves upstreams, binds the listening sockets (or takes those of `handed`, from a
    /// predecessor, with datagrams and connections still queued) and labels every `RULES`
    /// slot (the unused ones as not configured). Handed-over sockets no rule listens on any
    /// more are closed.
    pub fn bind(
        config: &Config,
        datapath: Arc<Datapath>,
        mut handed: HashMap<(u8, SocketAddr), OwnedFd>,
    ) -> anyhow::Result<Rules> {
        let mut rules = Vec::new();
        for (listen, proto, current) in expand(config)? {
            let rule = &current.config;
            let in_use = || {
                format!(
                    "rule {}: cannot listen on {}/{listen} (in use by another program?)",
                    rule.name,
                    proto_name(proto)
                )
            };
            let socket = match (proto, handed.remove(&(proto, listen))) {
                (PROTO_TCP, Some(fd)) => Listener::Tcp(
                    TcpListener::from_std(crate::handover::socket::<std::net::TcpListener>(fd)?)
                        .context("registering a listening socket")?,
                ),
                (PROTO_TCP, None) => {
                    Listener::Tcp(crate::forward::tcp::listen(listen).with_context(in_use)?)
                }
                (_, handed) => {
                    let std = match handed {
                        Some(fd) => crate::handover::socket::<std::net::UdpSocket>(fd)?,
                        None => udp::bind(listen, false).with_context(in_use)?,
                    };
                    // New flows arrive here in bursts (a VPN server's clients after a move).
                    udp::set_receive_buffer(&std, 8 << 20);
                    Listener::Udp(
                        UdpSocket::from_std(std).context("registering a listening socket")?,
                    )
                }
            };
            let index = u16::try_from(rules.len())
                .ok()
                .filter(|i| u32::from(*i) < RULE_SLOTS)
                .ok_or_else(|| anyhow!("too many listen ports (at most {RULE_SLOTS})"))?;
            let idle = if proto == PROTO_TCP {
                rule.tcp_idle_timeout
            } else {
                rule.idle_timeout
            };
            info!(
                "rule {}: {}/{listen} -> {} (idle timeout {}s, at most {} sessions)",
                rule.name,
                proto_name(proto),
                current.upstream,
                idle.as_secs(),
                rule.max_sessions
            );
            rules.push(Rule {
                index,
                listen,
                proto,
                socket,
                current: RwLock::new(current),
                kernel: std::sync::Mutex::new(None),
                retired_hops: std::sync::Mutex::new(Vec::new()),
            });
        }
        for (proto, addr) in handed.keys() {
            info!(
                "{}/{addr}: no rule listens here any more; closed",
                proto_name(*proto)
            );
        }
        for index in 0..RULE_SLOTS as u16 {
            let rule = rules.get(usize::from(index));
            datapath.update_rule(index, |r| {
                r.configured = u8::from(rule.is_some());
                if let Some(rule) = rule {
                    label(r, rule.listen, rule.proto, &rule.current());
                }
            })?;
        }
        Ok(Rules { rules, datapath })
    }

    /// The listening sockets, duplicated for a successor.
    pub fn hand_over(&self) -> anyhow::Result<Vec<(crate::handover::Item, OwnedFd)>> {
        self.rules
            .iter()
            .map(|r| {
                let item = if r.proto == PROTO_TCP {
                    crate::handover::Item::TcpListener { addr: r.listen }
                } else {
                    crate::handover::Item::ForwardListener { addr: r.listen }
                };
                Ok((item, crate::handover::dup(r.socket.as_fd())?))
            })
            .collect()
    }

    /// Lets the kernel open the rules' sessions (see [`Rule::arm`]).
    pub async fn arm(&self, nexthops: &NextHops) {
        for rule in &self.rules {
            if let Err(e) = rule.arm(&self.datapath, nexthops).await {
                warn!("{e:#}; the controller relays the rule's connections");
            }
        }
    }

    /// The rules, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn get(&self, index: u16) -> Option<&Rule> {
        self.rules.get(usize::from(index))
    }

    /// The limits of rule `index`, `None` if there is no such rule.
    pub fn limits(&self, index: u16) -> Option<RuleLimits> {
        self.get(index).map(Rule::limits)
    }

    /// The rule a pinned session belongs to: same index, protocol, listen port and upstream.
    pub fn matching(
        &self,
        index: u16,
        proto: u8,
        listen_port: u16,
        upstream: SocketAddr,
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.index == index
                && r.proto == proto
                && r.listen.port() == listen_port
                && r.current().upstream == upstream
        })
    }

    /// Re-resolves and applies the rules of `config`: limits, allow lists and upstreams of
    /// every listen address that is still configured. Listen addresses that were added or
    /// removed need a restart: they are named in a warning, and the rest is applied.
    /// Returns the TCP rules whose kernel entry must be armed again.
    pub fn reload(&self, config: &Config) -> anyhow::Result<Vec<u16>> {
        let mut expanded = expand(config)?;
        let mut rearm = Vec::new();
        for rule in &self.rules {
            let Some(at) = expanded
                .iter()
                .position(|(l, p, _)| *l == rule.listen && *p == rule.proto)
            else {
                warn!(
                    "rule {}: {} is no longer configured; it keeps running until a restart",
                    rule.name(),
                    rule.listen
                );
                continue;
            };
            let (_, _, new) = expanded.swap_remove(at);
            let old = rule.current();
            if old.upstream != new.upstream {
                info!(
                    "rule {}: new sessions go to {} (was {})",
                    new.config.name, new.upstream, old.upstream
                );
            }
            let _ = self
                .datapath
                .update_rule(rule.index, |r| label(r, rule.listen, rule.proto, &new));
            *rule.current.write().unwrap_or_else(|e| e.into_inner()) = new;
            if rule.in_kernel() {
                rearm.push(rule.index);
            }
        }
        for (listen, proto, new) in expanded {
            warn!(
                "rule {}: a new listen address {}/{listen} needs a restart (sessions survive one)",
                new.config.name,
                proto_name(proto)
            );
        }
        Ok(rearm)
    }

    /// Whether rule `index`, as it is now, admits `client` (sessions of a rule that is gone
    /// are left to expiry).
    pub fn admits(&self, index: u16, client: SocketAddr) -> bool {
        self.get(index)
            .is_none_or(|r| r.current().config.client_allowed(client.ip()))
    }
}
