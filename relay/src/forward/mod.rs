//! Forward rules at run time, as two services:
//!
//! - [`rules`]: the listening sockets of the rules (one per listen port), their current
//!   settings and `RULES` labels, and reload;
//! - [`sessions`]: the session table with one socket per session (its reserved relay port, and
//!   the slow path for replies): opening, the controller's own relaying, expiry, closing, and
//!   ([`recovery`]) taking over the sessions a previous controller left in the pinned maps.
//!
//! Whether XDP or this code moves a session's bytes, the session is the same: opened, limited,
//! accounted and expired by [`crate::sessions::Table`]. The maps are written through
//! [`Datapath`], next hops come from [`NextHops`].

mod recovery;
mod rules;
mod sessions;

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

/// The forward rules and their sessions.
pub struct Forward {
    rules: Arc<Rules>,
    sessions: Arc<Sessions>,
    /// The listeners and housekeeping, stopped when handing over.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Forward {
    /// Resolves upstreams, binds the listening sockets and takes over the sessions left in the
    /// pinned maps, with the sockets a predecessor handed over (`listeners` by address,
    /// `sessions` by id; empty after a crash or a stop). Must run inside the tokio runtime.
    /// `nexthops` is `None` when XDP does not relay (`--xdp-mode off`, or the kernel refused
    /// the program).
    pub async fn start(
        config: &Config,
        datapath: Arc<Datapath>,
        nexthops: Option<Arc<NextHops>>,
        listeners: HashMap<SocketAddr, OwnedFd>,
        handed: HashMap<u32, OwnedFd>,
    ) -> anyhow::Result<Forward> {
        let rules = Arc::new(Rules::bind(config, Arc::clone(&datapath), listeners)?);
        let sessions = Arc::new(Sessions::new(
            config,
            Arc::clone(&rules),
            datapath,
            nexthops,
        ));
        sessions.recover(handed).await;
        Ok(Forward {
            rules,
            sessions,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Starts the listeners and, once a second, publishing and expiry.
    pub fn spawn(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.rules.len() {
            tasks.push(tokio::spawn(Arc::clone(&self.sessions).listen(i)).abort_handle());
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
        let mut out = self.rules.hand_over()?;
        out.extend(self.sessions.hand_over()?);
        Ok(out)
    }

    /// Applies a re-read configuration: new limits, allow lists and upstream addresses (names
    /// resolved again) for new sessions; live sessions keep their upstream, and those of
    /// clients an allow list no longer admits are closed now. Settings that need a restart
    /// (listen addresses, session ports, capacity) are named in a warning.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        self.rules.reload(config)?;
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
