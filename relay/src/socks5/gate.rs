//! What a stranger can hold at the SOCKS5 port: caps per source on handshakes and
//! connections, and counters (with a rate-limited log summary) for everything refused
//! before a user is known.
//!
//! A source is an IPv4 address or an IPv6 /64 (one subscriber's usual allocation, which a
//! client can pick addresses from at will). A source's entry exists only while it has a
//! connection open, so the table is never larger than the connections themselves.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use log::info;

/// Why a connection was closed before (or during) its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Refusal {
    /// Every handshake slot (`max_handshakes`) was taken.
    Slots,
    /// The source had `max_handshakes_per_source` handshakes running.
    SourceHandshakes,
    /// The source had `max_connections_per_source` connections open.
    SourceConnections,
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
    /// Unknown user or wrong password.
    AuthFailed,
    /// No password check could start before the deadline.
    AuthBusy,
    /// Not SOCKS5, malformed, no acceptable method, unsupported command or address type.
    Protocol,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Slots,
        Refusal::SourceHandshakes,
        Refusal::SourceConnections,
        Refusal::Timeout,
        Refusal::AuthFailed,
        Refusal::AuthBusy,
        Refusal::Protocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Slots => "all handshake slots taken",
            Refusal::SourceHandshakes => "per-source handshake cap",
            Refusal::SourceConnections => "per-source connection cap",
            Refusal::Timeout => "handshake timeout",
            Refusal::AuthFailed => "authentication failed",
            Refusal::AuthBusy => "password checks busy",
            Refusal::Protocol => "protocol error",
        }
    }
}

/// Counters of refusals, one per reason.
#[derive(Default)]
pub struct Refusals {
    counts: [AtomicU64; Refusal::ALL.len()],
    /// What the last summary reported.
    reported: Mutex<[u64; Refusal::ALL.len()]>,
}

impl Refusals {
    pub fn count(&self, why: Refusal) {
        self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: Refusal) -> u64 {
        self.counts[why as usize].load(Ordering::Relaxed)
    }

    /// "N handshakes refused (reason n, ...)" for what changed since the last call, if
    /// anything did.
    pub fn summary(&self) -> Option<String> {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let now: Vec<u64> = Refusal::ALL.iter().map(|r| self.get(*r)).collect();
        let new: Vec<(Refusal, u64)> = Refusal::ALL
            .iter()
            .zip(now.iter().zip(reported.iter()))
            .map(|(r, (n, old))| (*r, n - old))
            .filter(|(_, d)| *d > 0)
            .collect();
        reported.copy_from_slice(&now);
        if new.is_empty() {
            return None;
        }
        let total: u64 = new.iter().map(|(_, d)| d).sum();
        let reasons: Vec<String> = new
            .iter()
            .map(|(r, d)| format!("{} {d}", r.name()))
            .collect();
        Some(format!(
            "{total} SOCKS5 handshake{} refused ({})",
            if total == 1 { "" } else { "s" },
            reasons.join(", ")
        ))
    }

    /// Logs [`Refusals::summary`] every `every`, forever (one line however big the flood).
    pub async fn log_every(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(line) = self.summary() {
                info!("{line} in the last {}s", every.as_secs());
            }
        }
    }
}

/// The part of an address that makes a source: an IPv4 address, or an IPv6 /64.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match crate::config::canonical(ip) {
        IpAddr::V6(a) => {
            let bits = u128::from(a) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[derive(Default, Debug)]
struct Held {
    handshakes: u32,
    connections: u32,
}

/// Connections and handshakes per source.
#[derive(Default)]
pub struct Sources {
    held: Mutex<HashMap<IpAddr, Held>>,
}

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection and a handshake for `ip`'s source, or says which cap is reached.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_handshakes: u32,
        max_connections: u32,
    ) -> Result<SourceGuard, Refusal> {
        let source = source_of(ip);
        let mut held = self.lock();
        let h = held.entry(source).or_default();
        let refused = if h.connections >= max_connections {
            Some(Refusal::SourceConnections)
        } else if h.handshakes >= max_handshakes {
            Some(Refusal::SourceHandshakes)
        } else {
            None
        };
        if let Some(why) = refused {
            if h.connections == 0 {
                held.remove(&source);
            }
            return Err(why);
        }
        h.connections += 1;
        h.handshakes += 1;
        Ok(SourceGuard {
            sources: Arc::clone(self),
            source,
            handshaking: true,
        })
    }

    /// Sources with a connection open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A source's connection (and, until [`SourceGuard::handshake_done`], handshake); given back
/// on drop.
pub struct SourceGuard {
    sources: Arc<Sources>,
    source: IpAddr,
    handshaking: bool,
}

impl SourceGuard {
    /// The handshake is over; the connection stays counted.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            if let Some(h) = self.sources.lock().get_mut(&self.source) {
                h.handshakes = h.handshakes.saturating_sub(1);
            }
        }
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut held = self.sources.lock();
        if let Some(h) = held.get_mut(&self.source) {
            if self.handshaking {
                h.handshakes = h.handshakes.saturating_sub(1);
            }
            h.connections = h.connections.saturating_sub(1);
            if h.connections == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_nothing_left_behind() {
        let s = Arc::new(Sources::default());
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let mut g1 = s.admit(a, 2, 3).unwrap();
        let _g2 = s.admit(a, 2, 3).unwrap();
        assert_eq!(s.admit(a, 2, 3).err(), Some(Refusal::SourceHandshakes));
        // Another source is not affected.
        let other = s.admit("198.51.100.2".parse().unwrap(), 2, 3).unwrap();
        g1.handshake_done();
        let g3 = s.admit(a, 2, 3).unwrap();
        assert_eq!(s.admit(a, 2, 3).err(), Some(Refusal::SourceConnections));
        drop((g1, g3, other));
        drop(_g2);
        assert!(s.is_empty(), "entries go with their last connection");
        // A refused stranger leaves nothing either.
        assert!(s.admit(a, 0, 0).is_err());
        assert!(s.is_empty());
    }

    #[test]
    fn an_ipv6_source_is_a_64() {
        let s = Arc::new(Sources::default());
        let _g = s.admit("2001:db8:1:2::1".parse().unwrap(), 1, 10).unwrap();
        assert_eq!(
            s.admit("2001:db8:1:2:ffff::9".parse().unwrap(), 1, 10)
                .err(),
            Some(Refusal::SourceHandshakes)
        );
        assert!(s.admit("2001:db8:1:3::1".parse().unwrap(), 1, 10).is_ok());
        assert_eq!(
            source_of("::ffff:198.51.100.7".parse().unwrap()),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_summary_reports_what_changed_once() {
        let r = Refusals::default();
        assert_eq!(r.summary(), None);
        for _ in 0..1000 {
            r.count(Refusal::Timeout);
        }
        r.count(Refusal::AuthFailed);
        assert_eq!(
            r.summary().as_deref(),
            Some(
                "1001 SOCKS5 handshakes refused (handshake timeout 1000, authentication failed 1)"
            )
        );
        assert_eq!(r.summary(), None, "nothing new");
        r.count(Refusal::Slots);
        assert_eq!(
            r.summary().as_deref(),
            Some("1 SOCKS5 handshake refused (all handshake slots taken 1)")
        );
        assert_eq!(r.get(Refusal::Timeout), 1000);
    }
}
