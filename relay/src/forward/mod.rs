//! Forward rules at run time, as two services:
//!
//! - [`rules`]: the listening sockets of the rules (one per listen port), their current
//!   settings and `RULES` labels, and reload;
//! - [`sessions`]: the session table with one socket per session the controller opened (its
//!   reserved relay port, and the slow path for replies; the sessions XDP opens have none, and
//!   [`steer`] hands what XDP declines of them to the controller): opening, the controller's
//!   own relaying, expiry, closing, and ([`recovery`]) taking over the sessions a previous
//!   controller left in the pinned maps.
//!
//! Whether XDP or this code moves a session's bytes, the session is the same: opened, limited,
//! accounted and expired by [`crate::sessions::Table`]. The maps are written through
//! [`Datapath`], next hops come from [`NextHops`].

mod reassembly;
mod recovery;
mod rules;
mod sessions;
pub mod slowtcp;
pub mod steer;
pub mod tcp;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};

use crate::{config::Config, datapath::Datapath, nexthop::NextHops};

use self::{rules::Rules, sessions::Sessions};

pub use self::rules::proto_name;

/// The forward rules and their sessions.
pub struct Forward {
    rules: Arc<Rules>,
    sessions: Arc<Sessions>,
    /// The listeners and housekeeping, stopped when handing over.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The kernel's event ring, until [`Forward::spawn`] starts reading it.
    events: Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
    /// The socket lookup that hands the controller what XDP declines of the UDP sessions
    /// it opened (none without XDP).
    steering: Mutex<Option<steer::Steering>>,
}

impl Forward {
    /// Resolves upstreams, binds the listening sockets and takes over the sessions left in the
    /// pinned maps, with the sockets a predecessor handed over (`listeners` by address,
    /// `sessions` by id; empty after a crash or a stop). Must run inside the tokio runtime.
    /// `nexthops` is `None` when XDP does not relay (`--xdp-mode off`, or the kernel refused
    /// the program).
    ///
    /// TCP rules open their sessions in the kernel when XDP relays (`events` is its ring):
    /// the pool a predecessor filled is taken back, the pinned sessions recovered, the rules
    /// armed and the pool filled again.
    pub async fn start(
        config: &Config,
        datapath: Arc<Datapath>,
        nexthops: Option<Arc<NextHops>>,
        listeners: HashMap<(u8, SocketAddr), OwnedFd>,
        handed: HashMap<u32, OwnedFd>,
        events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
        steering: Option<steer::Steering>,
    ) -> anyhow::Result<Forward> {
        datapath.clear_kernel_rules();
        let rules = Arc::new(Rules::bind(config, Arc::clone(&datapath), listeners)?);
        let sessions = Arc::new(Sessions::new(
            config,
            Arc::clone(&rules),
            datapath,
            nexthops.clone(),
            steering
                .as_ref()
                .map_or([false; 2], steer::Steering::families),
        ));
        sessions.drain_pool().await;
        sessions.recover(handed).await;
        if let Some(n) = &nexthops {
            rules.arm(n).await;
        }
        sessions.recount();
        sessions.refill();
        Ok(Forward {
            rules,
            sessions,
            tasks: Mutex::new(Vec::new()),
            events: Mutex::new(events.filter(|_| nexthops.is_some())),
            steering: Mutex::new(steering),
        })
    }

    /// Starts the listeners and, once a second, publishing and expiry.
    pub fn spawn(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.rules.len() {
            tasks.push(tokio::spawn(Arc::clone(&self.sessions).listen(i)).abort_handle());
        }
        if let Some(ring) = self.events.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tasks.push(tokio::spawn(Arc::clone(&self.sessions).events(ring)).abort_handle());
        }
        if let Some(steering) = &mut *self.steering.lock().unwrap_or_else(|e| e.into_inner()) {
            for socket in steering.sockets.drain(..) {
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(s) => tasks
                        .push(tokio::spawn(Arc::clone(&self.sessions).steered(s)).abort_handle()),
                    Err(e) => warn!("registering the steered-datagram socket: {e}"),
                }
            }
        }
        let sessions = Arc::clone(&self.sessions);
        let housekeeping = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                sessions.housekeeping();
            }
        });
        tasks.push(housekeeping.abort_handle());
    }

    /// Stops every task (a successor takes over) and returns the listening and session
    /// sockets to hand over, duplicated. Nothing here writes a map afterwards.
    pub fn hand_over(&self) -> anyhow::Result<Vec<(crate::handover::Item, OwnedFd)>> {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // The socket-lookup program stays attached until this process exits: the successor's,
        // attached before it asked for the handover, replaces its choice meanwhile.
        let mut out = self.rules.hand_over()?;
        out.extend(self.sessions.hand_over()?);
        Ok(out)
    }

    /// Applies a re-read configuration: new limits, allow lists and upstream addresses (names
    /// resolved again) for new sessions; live sessions keep their upstream, and those of
    /// clients an allow list no longer admits are closed now. Settings that need a restart
    /// (listen addresses, session ports, capacity) are named in a warning.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let rearm = self.rules.reload(config)?;
        if !rearm.is_empty() {
            if let Some(nexthops) = self.sessions.nexthops().cloned() {
                let rules = Arc::clone(&self.rules);
                let sessions = Arc::clone(&self.sessions);
                tokio::spawn(async move {
                    for index in rearm {
                        if let Some(rule) = rules.get(index) {
                            if let Err(e) = rule.arm(&sessions.datapath, &nexthops).await {
                                warn!("{e:#}; the controller relays the rule's new connections");
                                rule.disarm(&sessions.datapath);
                            }
                        }
                    }
                    sessions.recount();
                });
            }
        }
        let revoked = self
            .sessions
            .revoke(|rule, client| self.rules.admits(rule, client));
        if revoked > 0 {
            info!("closed {revoked} sessions of clients the rules no longer allow");
        }
        if config.session_capacity != self.sessions.capacity() {
            warn!("relay.session_capacity changes need `relay unpin` and a restart; keeping the old one");
        }
        if config.session_ports != self.sessions.ports() {
            warn!("relay.session_ports changes need a restart (sessions survive one); keeping the old ones");
        }
        info!("configuration reloaded");
        Ok(())
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Publishes the slow-path counters one last time (on shutdown).
    pub fn flush(&self) {
        self.sessions.flush();
    }
}
