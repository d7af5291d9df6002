//! Taking over the sessions a previous controller left in the pinned maps: same relay ports,
//! same records, same next-hop slots. The program that relays them may be running all along
//! (its link outlives the controller), so a record it may be reading is never rewritten: the
//! next-hop slots its records refer to are taken over as they are (see
//! [`crate::nexthop::NextHops::adopt`]), and only sessions that no longer match a rule are
//! removed. A session's socket comes from the predecessor when it handed over (datagrams
//! queued on it included), or is bound again after a crash.

use std::{collections::HashMap, os::fd::OwnedFd, sync::Arc};

use log::{info, warn};
use relay_common::session::{Session, NEXTHOP_NONE, TO_CLIENT};

use super::sessions::{Sessions, Start};
use crate::{
    datapath::{self, Endpoints},
    nexthop::Hops,
    sessions::Entry,
    system::monotonic_ns,
};

impl Sessions {
    /// Takes over every pinned forward session that still matches a rule, with its socket
    /// from `handed` if a predecessor handed it over; removes the others. SOCKS5 records are
    /// left to the SOCKS5 server (associations a predecessor handed over keep theirs).
    pub(super) async fn recover(self: &Arc<Self>, mut handed: HashMap<u32, OwnedFd>) {
        let now = monotonic_ns();
        let (mut kept, mut dropped) = (0, 0);
        for (id, record) in self.datapath.active() {
            if datapath::is_socks(&record) {
                continue;
            }
            let ends = datapath::endpoints(&record);
            // A TCP session the kernel opened has no socket and no relay of its own in the
            // controller; a UDP one has no socket either (what XDP declines of it reaches the
            // controller's steered socket) but is restored below, for what it sends.
            if super::sessions::kernel_opened(&record)
                && record.proto == relay_common::packet::PROTO_TCP
            {
                if self.recover_kernel(id, &record, &ends, now) {
                    kept += 1;
                } else {
                    let _ = self.datapath.remove(id);
                    dropped += 1;
                }
                continue;
            }
            let Some((rule, socket)) = self.reclaim(id, &record, &ends, handed.remove(&id), now)
            else {
                let _ = self.datapath.remove(id);
                dropped += 1;
                continue;
            };
            let (hops, in_maps) = self.hops_of(&record, &ends).await;
            let start = Start {
                id,
                rule,
                ends,
                socket,
                hops,
                slow: self.datapath.slow(id).unwrap_or_default(),
                traffic: record.traffic,
                now,
                in_maps,
            };
            match self.restore(start) {
                Ok(()) => kept += 1,
                Err(e) => {
                    warn!("session {id}: not restored: {e:#}");
                    self.forget(id);
                    let _ = self.datapath.remove(id);
                    dropped += 1;
                }
            }
        }
        self.finish_recovery();
        if kept + dropped > 0 {
            info!("took over {kept} sessions from the pinned maps ({dropped} no longer match the rules)");
        }
    }

    /// The next hops of a pinned record, and whether the record stays as it is. Its slots are
    /// taken over where they are. A record without any (written while XDP did not relay)
    /// gets new ones and is written again: the program never writes such a record (it
    /// declines its packets before counting them), so nothing it counts is lost.
    async fn hops_of(&self, record: &Session, ends: &Endpoints) -> (Hops, bool) {
        let Some(nexthops) = self.nexthops() else {
            return (Hops::none(), true);
        };
        if record.nexthop == [NEXTHOP_NONE; 2] && ends.same_family() {
            return (self.ask_hops(ends).await, false);
        }
        (nexthops.adopt(record.nexthop), true)
    }

    /// Takes pinned session `id` back into the table with its socket (`handed`, or bound
    /// again; none for a session XDP opened); `None` if no rule matches it any more or its
    /// port cannot be had.
    fn reclaim(
        &self,
        id: u32,
        record: &Session,
        ends: &Endpoints,
        handed: Option<OwnedFd>,
        now: u64,
    ) -> Option<(u16, Option<std::net::UdpSocket>)> {
        let rule =
            self.rules
                .matching(record.rule, record.proto, ends.front.port(), ends.upstream)?;
        // A client the rule no longer admits (its allow list changed while no controller
        // ran) does not get its session back.
        if !rule.current().config.client_allowed(ends.client.ip()) {
            info!("session {id} of {}: no longer allowed; closed", ends.client);
            return None;
        }
        // A restart does not count as idle time.
        let mut entry = Entry::new(id, rule.index, ends.client, ends.back.port(), now)
            .in_pool(datapath::pool_of(ends.upstream));
        let slow = self.datapath.slow(id).unwrap_or_default();
        entry.answered = record.answered() || slow.traffic[TO_CLIENT as usize].packets > 0;
        if !self.reserve_recovered(entry) {
            return None;
        }
        if super::sessions::kernel_opened(record) {
            if self.socketless(ends.upstream) {
                return Some((rule.index, None));
            }
            // XDP relays it either way: without a socket only what XDP declines of it is lost.
            return match super::sessions::port_socket(ends.back.port(), ends.upstream) {
                Ok(s) => Some((rule.index, Some(s))),
                Err(e) => {
                    warn!("session {id}: cannot re-bind {}: {e}", ends.back);
                    Some((rule.index, None))
                }
            };
        }
        let socket = match handed {
            Some(fd) => crate::handover::socket::<std::net::UdpSocket>(fd)
                .map_err(|e| warn!("session {id}: handed-over socket: {e:#}")),
            None => super::sessions::port_socket(ends.back.port(), ends.upstream)
                .map_err(|e| warn!("session {id}: cannot re-bind {}: {e}", ends.back)),
        };
        match socket {
            Ok(s) => Some((rule.index, Some(s))),
            Err(()) => {
                self.forget(id);
                None
            }
        }
    }
}
