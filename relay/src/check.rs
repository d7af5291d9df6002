//! `relay check --config FILE`: validates a configuration and says what the relay would do
//! with it, without touching the kernel (no map, no program, no socket bound).

use std::fmt::Write as _;

use crate::{
    config::{Config, ForwardRule},
    limits::{format_time, Limits},
};

/// What a check found: the description, and the problems that would stop a start or a
/// rule (empty: the configuration is good).
pub struct Checked {
    pub text: String,
    pub problems: Vec<String>,
}

fn cidrs(list: &[crate::config::Cidr]) -> String {
    list.iter()
        .map(|c| format!("{}/{}", c.addr, c.len))
        .collect::<Vec<_>>()
        .join(", ")
}

use crate::stats::megabytes as mb;

fn limits_text(l: &Limits) -> String {
    let mut parts = Vec::new();
    if !l.enabled {
        parts.push("disabled".to_owned());
    }
    if let Some(q) = l.quota {
        parts.push(format!("quota {} per period ({})", mb(q), l.period));
    }
    if let Some(e) = l.expires {
        parts.push(format!("expires {}", format_time(e)));
    }
    if let Some(r) = l.rate {
        parts.push(format!("rate {}/s each way, burst {}", mb(r), mb(l.burst)));
    }
    if let Some(d) = l.max_devices {
        parts.push(format!("at most {d} devices"));
    }
    if parts.is_empty() {
        "no limits".to_owned()
    } else {
        parts.join(", ")
    }
}

fn rule_text(out: &mut String, r: &ForwardRule) {
    let proto = match (r.protocols.udp, r.protocols.tcp) {
        (true, true) => "udp+tcp",
        (false, true) => "tcp",
        _ => "udp",
    };
    let upstream = match r.resolve_upstream() {
        Ok(ip) => format!("{} ({ip})", r.upstream_host),
        // Not a problem: a running relay resolves again (every SIGHUP) and the rule waits.
        Err(e) => format!("{} (not now: {e:#})", r.upstream_host),
    };
    let _ = writeln!(
        out,
        "  {} [{proto}]: {}:{} -> {upstream}:{}",
        r.name, r.listen_ip, r.listen_ports, r.upstream_ports
    );
    let clients = if r.allow.is_empty() {
        "any client".to_owned()
    } else {
        format!("clients in {}", cidrs(&r.allow))
    };
    let _ = writeln!(
        out,
        "    {clients}; at most {} sessions, {} per client address, {} new per second \
         (bursts of {}); idle {:?} (TCP {:?}), unanswered {:?}",
        r.max_sessions,
        r.max_sessions_per_source,
        r.new_sessions_per_second,
        r.new_sessions_burst,
        r.idle_timeout,
        r.tcp_idle_timeout,
        r.unanswered_timeout
    );
}

/// Describes `cfg` and collects what is wrong with it beyond what parsing checked (password
/// hashes). Upstream names are resolved and shown; one that does not resolve now is shown as
/// such, not a problem (a running relay resolves again).
pub fn check(cfg: &Config) -> Checked {
    let mut out = String::new();
    let mut problems = Vec::new();
    let _ = writeln!(
        out,
        "Sessions: up to {} in the kernel maps, relay-side ports {}.",
        cfg.session_capacity, cfg.session_ports
    );
    if cfg.forward.is_empty() {
        let _ = writeln!(out, "Forward rules: none.");
    } else {
        let _ = writeln!(out, "Forward rules ({}):", cfg.forward.len());
        for r in &cfg.forward {
            rule_text(&mut out, r);
        }
    }
    match &cfg.socks5 {
        None => {
            let _ = writeln!(out, "SOCKS5: off.");
        }
        Some(s) => {
            let _ = writeln!(
                out,
                "SOCKS5 on {} (UDP ASSOCIATE ports {}, CONNECT by {}){}:",
                s.listen,
                s.udp_ports,
                match s.connect_path {
                    crate::config::ConnectPath::Kernel => "the kernel (sockmap)",
                    crate::config::ConnectPath::Splice => "splice",
                },
                if s.allow_no_auth {
                    "; WARNING: no authentication allowed (an open proxy)"
                } else {
                    ""
                }
            );
            if let Err(e) = crate::socks5::users::Users::new(s.users.clone()) {
                problems.push(format!("SOCKS5 users: {e:#}"));
            }
            if s.users.is_empty() && !s.allow_no_auth {
                let _ = writeln!(
                    out,
                    "  no users in the file: clients are refused until users are added with \
                     `relay users add` (or the management API)"
                );
            }
            for u in &s.users {
                let _ = writeln!(
                    out,
                    "  user {:?}: {}; at most {} CONNECTs and {} associations at once",
                    u.name,
                    limits_text(&u.limits),
                    u.max_connections,
                    u.max_associations
                );
            }
        }
    }
    if let Some(f) = &cfg.fleet {
        let _ = writeln!(
            out,
            "fleet: this relay is {:?}; users, limits and usage shared through PostgreSQL \
             (the connection is not tried here; `relay fleet status` does)",
            f.name
        );
    }
    let p = &cfg.policy;
    let _ = writeln!(
        out,
        "Destinations: {}{}{}{}; never the relay's own addresses unless allowed.",
        if p.allow.is_empty() {
            "public addresses (no loopback, private, link-local, multicast)".to_owned()
        } else {
            format!("only {}", cidrs(&p.allow))
        },
        if p.deny.is_empty() {
            String::new()
        } else {
            format!(", never {}", cidrs(&p.deny))
        },
        if p.allow_ports.is_empty() {
            String::new()
        } else {
            let ports: Vec<String> = p.allow_ports.iter().map(|r| r.to_string()).collect();
            format!(", only ports {}", ports.join(", "))
        },
        if p.deny_ports.is_empty() {
            String::new()
        } else {
            let ports: Vec<String> = p.deny_ports.iter().map(|r| r.to_string()).collect();
            format!(", never ports {}", ports.join(", "))
        },
    );
    Checked {
        text: out,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_is_described_and_a_bad_hash_is_a_problem() {
        let good = "$argon2id$v=19$m=19456,t=2,p=1$78uEBMWrN8igmbz+11VHPQ$KxJ1FCRT//sSd/Alf06Jp8O9qgVCkvAlQF2yNPjpsZk";
        let bad = "$argon2id$v=19$m=4096,t=2,p=1$c2FsdHNhbHRzYWx0$KxJ1FCRT//sSd/Alf06Jp8O9qgVCkvAlQF2yNPjpsZk";
        let text = |hash: &str| {
            format!(
                "[[forward]]\nlisten = \"0.0.0.0:51820\"\nupstream = \"198.51.100.7:51820\"\n\
                 [socks5]\nlisten = \"0.0.0.0:1080\"\n[[socks5.users]]\nname = \"bob\"\n\
                 password_hash = \"{hash}\"\nquota = \"5 GB\"\nrate = \"1 MB\"\n"
            )
        };
        let c = check(&Config::from_toml(&text(good)).unwrap());
        assert!(
            c.text
                .contains("forward0 [udp]: 0.0.0.0:51820 -> 198.51.100.7"),
            "{}",
            c.text
        );
        assert!(c.text.contains("SOCKS5 on 0.0.0.0:1080"), "{}", c.text);
        assert!(
            c.text.contains("user \"bob\": quota 5000.0 MB"),
            "{}",
            c.text
        );
        assert!(
            c.problems.iter().all(|p| !p.contains("SOCKS5")),
            "{:?}",
            c.problems
        );
        let c = check(&Config::from_toml(&text(bad)).unwrap());
        assert!(
            c.problems
                .iter()
                .any(|p| p.contains("m (memory, KiB) = 4096")),
            "{:?}",
            c.problems
        );
    }
}
