//! TCP forward rules in userspace: the connections XDP leaves to the controller (the kernel
//! could not open a session: no free relay port in the pool, the upstream's next hop
//! unresolved, the event ring full) and every connection without XDP (`--xdp-mode off`, or
//! an upstream no attached interface reaches). Each is accepted, checked against the rule
//! (allow list, `max_sessions`, `max_sessions_per_source`), connected to the upstream within
//! the rule's `unanswered_timeout` and copied both ways, half-closes included, until both
//! sides closed or nothing moved for the rule's `idle_timeout` (then both are reset, as the
//! kernel's session would end); its bytes count in the rule's totals when it ends.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use std::{sync::atomic::AtomicU64, time::Duration};

use log::{debug, warn};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};

use super::rules::Rule;
use crate::{
    datapath::Datapath,
    idle::{idle, Counted},
};

/// A listening TCP socket for a rule (address reuse, so that a restart can bind at once).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // One family per rule: an IPv6 rule does not take IPv4 clients (mapped).
        socket2::SockRef::from(&socket).set_only_v6(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Connections the controller relays now, per rule and per (rule, client address).
#[derive(Default)]
pub struct Proxied {
    per_rule: Mutex<HashMap<u16, u32>>,
    per_source: Mutex<HashMap<(u16, IpAddr), u32>>,
}

/// Why a connection was refused (and counted in the rule's `RULES` slot).
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    NotAllowed,
    RuleLimit,
    SourceLimit,
}

/// A proxied connection's place in the counts; given back when dropped.
struct Held {
    proxied: Arc<Proxied>,
    rule: u16,
    source: IpAddr,
}

impl Proxied {
    fn hold(self: &Arc<Self>, rule: &Rule, client: SocketAddr) -> Result<Held, Refused> {
        let current = rule.current();
        if !current.config.client_allowed(client.ip()) {
            return Err(Refused::NotAllowed);
        }
        let limits = rule.limits();
        let mut per_rule = self.per_rule.lock().unwrap_or_else(|e| e.into_inner());
        let mut per_source = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_rule.entry(rule.index).or_default();
        if *n >= limits.max_sessions {
            return Err(Refused::RuleLimit);
        }
        let s = per_source.entry((rule.index, client.ip())).or_default();
        if *s >= limits.max_sessions_per_source {
            return Err(Refused::SourceLimit);
        }
        *n += 1;
        *s += 1;
        Ok(Held {
            proxied: Arc::clone(self),
            rule: rule.index,
            source: client.ip(),
        })
    }

    /// Connections the controller relays for rule `index`.
    pub fn of_rule(&self, index: u16) -> u32 {
        self.per_rule
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut per_rule = self
            .proxied
            .per_rule
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_rule.get_mut(&self.rule) {
            *n = n.saturating_sub(1);
        }
        let mut per_source = self
            .proxied
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (self.rule, self.source);
        if let Some(n) = per_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_source.remove(&key);
            }
        }
    }
}

/// Accepts on a TCP rule's listener forever, relaying each connection on its own task.
pub async fn serve(
    rule: &Rule,
    listener: &TcpListener,
    proxied: Arc<Proxied>,
    datapath: Arc<Datapath>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("rule {}: accepting: {e}", rule.name());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let upstream = rule.current().upstream;
        let limits = rule.limits();
        let timeouts = (limits.unanswered_timeout, limits.idle_timeout);
        let (index, name) = (rule.index, rule.name());
        // The limits are checked here, before the connection costs a task.
        let held = match proxied.hold(rule, peer) {
            Ok(h) => h,
            Err(why) => {
                debug!("rule {name}: refused a connection from {peer}: {why:?}");
                let _ = datapath.update_rule(index, |r| match why {
                    Refused::NotAllowed => r.refused_not_allowed += 1,
                    Refused::RuleLimit => r.refused_limit += 1,
                    Refused::SourceLimit => r.refused_source_limit += 1,
                });
                // Dropping the stream closes it.
                continue;
            }
        };
        let datapath = Arc::clone(&datapath);
        tokio::spawn(async move {
            let _held = held;
            let _ = datapath.update_rule(index, |r| r.opened += 1);
            let bytes = relay(client, upstream, timeouts).await;
            let (up, down) = match &bytes {
                Ok(b) => *b,
                Err((b, e)) => {
                    debug!("rule {name}: connection of {peer}: {e}");
                    *b
                }
            };
            if bytes.is_err() && (up, down) == (0, 0) {
                let _ = datapath.update_rule(index, |r| r.closed_unanswered += 1);
            }
            let _ = datapath.update_rule(index, |r| {
                r.closed += 1;
                r.retired[0].bytes += up;
                r.retired[1].bytes += down;
            });
        });
    }
}

/// Connects to `upstream` within the first of `timeouts` and copies both ways until both
/// sides have closed, or nothing moved either way for the second (the rule's idle timeout);
/// returns the bytes carried each way.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    (timeout, idle_timeout): (Duration, Duration),
) -> Result<(u64, u64), ((u64, u64), io::Error)> {
    let mut server = match tokio::time::timeout(timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(((0, 0), e)),
        Err(_) => {
            return Err((
                (0, 0),
                io::Error::new(io::ErrorKind::TimedOut, "the upstream did not answer"),
            ))
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let moved = AtomicU64::new(0);
    let r = {
        let (cr, mut cw) = client.split();
        let (sr, mut sw) = server.split();
        let mut cr = Counted {
            inner: cr,
            moved: &moved,
        };
        let mut sr = Counted {
            inner: sr,
            moved: &moved,
        };
        // Each direction ends by shutting the other side's writing half: a half-close passes.
        let up = async {
            let n = tokio::io::copy(&mut cr, &mut sw).await?;
            sw.shutdown().await?;
            Ok::<u64, io::Error>(n)
        };
        let down = async {
            let n = tokio::io::copy(&mut sr, &mut cw).await?;
            cw.shutdown().await?;
            Ok::<u64, io::Error>(n)
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r,
            () = idle(&moved, idle_timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle for longer than the rule's idle_timeout",
            )),
        }
    };
    if r.is_err() {
        // A reset (or another error) on one side resets the other, as the relay in the
        // kernel passes a RST on: closing normally would tell it "end of data". An idle
        // connection ends the same way, as the kernel's session would (its flows removed).
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    r.map_err(|e| ((0, 0), e))
}
