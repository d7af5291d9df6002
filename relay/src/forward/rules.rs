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
use relay_common::session::{RuleStats, RULE_SLOTS};
use tokio::net::UdpSocket;

use crate::{
    config::{Config, ForwardRule},
    datapath::{self, Datapath},
    nexthop,
    sessions::RuleLimits,
    udp,
};

/// One listen port of a forward rule.
pub struct Rule {
    pub index: u16,
    pub listen: SocketAddr,
    pub socket: UdpSocket,
    /// What a reload may change: limits, allow list, the upstream's address.
    current: RwLock<Current>,
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
            idle_timeout: c.config.idle_timeout,
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

/// Writes a rule's name and addresses into its `RULES` slot.
fn label(r: &mut RuleStats, listen: SocketAddr, c: &Current) {
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

/// The rules, indexed as in `RULES`.
pub struct Rules {
    rules: Vec<Rule>,
    datapath: Arc<Datapath>,
}

impl Rules {
    /// Resolves upstreams, binds the listening sockets (or takes those of `handed`, from a
    /// predecessor, with datagrams still queued) and labels every `RULES` slot (the unused
    /// ones as not configured). Handed-over sockets no rule listens on any more are closed.
    pub fn bind(
        config: &Config,
        datapath: Arc<Datapath>,
        mut handed: HashMap<SocketAddr, OwnedFd>,
    ) -> anyhow::Result<Rules> {
        let mut rules = Vec::new();
        for (listen, current) in expand(config)? {
            let rule = &current.config;
            let std = match handed.remove(&listen) {
                Some(fd) => crate::handover::socket::<std::net::UdpSocket>(fd)?,
                None => udp::bind(listen, false).with_context(|| {
                    format!(
                        "rule {}: cannot listen on {listen} (in use by another program?)",
                        rule.name
                    )
                })?,
            };
            let index = u16::try_from(rules.len())
                .ok()
                .filter(|i| u32::from(*i) < RULE_SLOTS)
                .ok_or_else(|| anyhow!("too many listen ports (at most {RULE_SLOTS})"))?;
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
                current: RwLock::new(current),
            });
        }
        for addr in handed.keys() {
            info!("{addr}: no rule listens here any more; closed");
        }
        for index in 0..RULE_SLOTS as u16 {
            let rule = rules.get(usize::from(index));
            datapath.update_rule(index, |r| {
                r.configured = u8::from(rule.is_some());
                if let Some(rule) = rule {
                    label(r, rule.listen, &rule.current());
                }
            })?;
        }
        Ok(Rules { rules, datapath })
    }

    /// The listening sockets, duplicated for a successor.
    pub fn hand_over(&self) -> anyhow::Result<Vec<(crate::handover::Item, OwnedFd)>> {
        use std::os::fd::AsFd as _;
        self.rules
            .iter()
            .map(|r| {
                Ok((
                    crate::handover::Item::ForwardListener { addr: r.listen },
                    crate::handover::dup(r.socket.as_fd())?,
                ))
            })
            .collect()
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

    /// The rule a pinned session belongs to: same index, listen port and upstream.
    pub fn matching(&self, index: u16, listen_port: u16, upstream: SocketAddr) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.index == index && r.listen.port() == listen_port && r.current().upstream == upstream
        })
    }

    /// Re-resolves and applies the rules of `config`: limits, allow lists and upstreams of
    /// every listen address that is still configured. Listen addresses that were added or
    /// removed need a restart: they are named in a warning, and the rest is applied.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let mut expanded = expand(config)?;
        for rule in &self.rules {
            let Some(at) = expanded.iter().position(|(l, _)| *l == rule.listen) else {
                warn!(
                    "rule {}: {} is no longer configured; it keeps running until a restart",
                    rule.name(),
                    rule.listen
                );
                continue;
            };
            let (_, new) = expanded.swap_remove(at);
            let old = rule.current();
            if old.upstream != new.upstream {
                info!(
                    "rule {}: new sessions go to {} (was {})",
                    new.config.name, new.upstream, old.upstream
                );
            }
            let _ = self
                .datapath
                .update_rule(rule.index, |r| label(r, rule.listen, &new));
            *rule.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        }
        for (listen, new) in expanded {
            warn!(
                "rule {}: a new listen address {listen} needs a restart (sessions survive one)",
                new.config.name
            );
        }
        Ok(())
    }

    /// Whether rule `index`, as it is now, admits `client` (sessions of a rule that is gone
    /// are left to expiry).
    pub fn admits(&self, index: u16, client: SocketAddr) -> bool {
        self.get(index)
            .is_none_or(|r| r.current().config.client_allowed(client.ip()))
    }
}
