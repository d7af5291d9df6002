//! Taking over the sessions a previous controller left in the pinned maps: same relay ports,
//! same counters, new next hops. Runs before XDP is attached, so rewriting records cannot race
//! with the fast path.

use std::sync::Arc;

use log::{info, warn};
use relay_common::session::{Session, TO_CLIENT};

use super::sessions::{Sessions, Start};
use crate::{
    datapath::{self, Endpoints},
    sessions::Entry,
    system::monotonic_ns,
    udp,
};

impl Sessions {
    /// Restores every pinned session that still matches a rule; removes the others (and every
    /// SOCKS5 flow: associations end with their control connections, which a restart closes).
    pub(super) async fn recover(self: &Arc<Self>) {
        let now = monotonic_ns();
        let (mut kept, mut dropped) = (0, 0);
        for (id, record) in self.datapath.active() {
            if datapath::is_socks(&record) {
                let _ = self.datapath.remove(id);
                continue;
            }
            let ends = datapath::endpoints(&record);
            let Some((rule, socket)) = self.reclaim(id, &record, &ends, now) else {
                let _ = self.datapath.remove(id);
                dropped += 1;
                continue;
            };
            // Keep the counters; new next-hop slots replace the old controller's.
            let start = Start {
                id,
                rule,
                ends,
                socket,
                hops: self.ask_hops(&ends).await,
                slow: self.datapath.slow(id).unwrap_or_default(),
                traffic: record.traffic,
                now,
            };
            match self.restore(start) {
                Ok(()) => kept += 1,
                Err(e) => {
                    warn!("session {id}: not restored: {e:#}");
                    self.forget(id);
                    dropped += 1;
                }
            }
        }
        self.finish_recovery();
        if kept + dropped > 0 {
            info!("took over {kept} sessions from the pinned maps ({dropped} no longer match the rules)");
        }
    }

    /// Takes pinned session `id` back into the table and re-binds its relay port; `None` if
    /// no rule matches it any more or its port cannot be had.
    fn reclaim(
        &self,
        id: u32,
        record: &Session,
        ends: &Endpoints,
        now: u64,
    ) -> Option<(u16, std::net::UdpSocket)> {
        let rule = self
            .rules
            .matching(record.rule, ends.front.port(), ends.upstream)?;
        // A client the rule no longer admits (its allow list changed while no controller
        // ran) does not get its session back.
        if !rule.current().config.client_allowed(ends.client.ip()) {
            info!("session {id} of {}: no longer allowed; closed", ends.client);
            return None;
        }
        // A restart does not count as idle time.
        let mut entry = Entry::new(id, rule.index, ends.client, ends.back.port(), now);
        let slow = self.datapath.slow(id).unwrap_or_default();
        entry.answered = record.traffic[TO_CLIENT as usize].packets > 0
            || slow.traffic[TO_CLIENT as usize].packets > 0;
        if !self.reserve_recovered(entry) {
            return None;
        }
        let socket = udp::bind(ends.back, false)
            .and_then(|s| s.connect(ends.upstream).map(|()| s))
            .map_err(|e| warn!("session {id}: cannot re-bind {}: {e}", ends.back));
        match socket {
            Ok(s) => Some((rule.index, s)),
            Err(()) => {
                self.forget(id);
                None
            }
        }
    }
}
