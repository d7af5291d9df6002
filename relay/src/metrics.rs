//! Prometheus metrics over HTTP (`--metrics ADDR`, `GET /metrics`): everything `relay stats`
//! shows, from the same pinned maps, plus the SOCKS5 handshake outcomes and the users' quota
//! left from the store. Built afresh for each scrape (reading the maps blocks, so it runs off
//! the async threads). Users are labels; clients never are, so the series are bounded by the
//! configuration (rules, users) and the code (reasons).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use prometheus::{core::Collector, Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry};
use relay_common::counters::Reason;

use crate::{socks5::gate::Refusals, stats};

/// What a scrape reads.
pub struct Sources {
    pub pin_dir: PathBuf,
    /// The state directory (the store: quota left); `None` without SOCKS5.
    pub state_dir: Option<PathBuf>,
    /// The SOCKS5 server's handshake refusals (kept in the process, not pinned).
    pub refusals: Option<Arc<Refusals>>,
    /// The fleet membership, with `[fleet]`.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// Registers `c` (names and labels are this module's constants: a failure is a bug, reported
/// as an error of the scrape).
fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> anyhow::Result<C> {
    r.register(Box::new(c.clone()))
        .context("registering a metric")?;
    Ok(c)
}

/// A counter family whose values are set from totals read at scrape time.
struct Counters(IntCounterVec);

impl Counters {
    fn new(r: &Registry, name: &str, help: &str, labels: &[&str]) -> anyhow::Result<Counters> {
        let v = IntCounterVec::new(Opts::new(format!("relay_{name}_total"), help), labels)?;
        Ok(Counters(register(r, v)?))
    }

    fn set(&self, labels: &[&str], v: u64) {
        if let Ok(c) = self.0.get_metric_with_label_values(labels) {
            c.inc_by(v);
        }
    }
}

struct Gauges(IntGaugeVec);

impl Gauges {
    fn new(r: &Registry, name: &str, help: &str, labels: &[&str]) -> anyhow::Result<Gauges> {
        let v = IntGaugeVec::new(Opts::new(format!("relay_{name}"), help), labels)?;
        Ok(Gauges(register(r, v)?))
    }

    fn set(&self, labels: &[&str], v: u64) {
        if let Ok(g) = self.0.get_metric_with_label_values(labels) {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }
}

const DIRECTIONS: [&str; 2] = ["to_upstream", "to_client"];

/// The metrics in Prometheus' text format. Blocking (map reads).
pub fn render(src: &Sources) -> anyhow::Result<String> {
    let r = Registry::new();
    let snapshot = stats::Snapshot::from_pin(&src.pin_dir)?;
    let reason_labels = ["reason", "verdict"];
    let packets = Counters::new(
        &r,
        "xdp_packets",
        "Frames the XDP program handled, by the reason it counted them under and its verdict",
        &reason_labels,
    )?;
    let bytes = Counters::new(
        &r,
        "xdp_bytes",
        "Bytes of frames the XDP program handled, by reason and verdict",
        &reason_labels,
    )?;
    for &reason in Reason::ALL {
        let c = snapshot.reason(reason);
        let labels = [reason.name(), reason.verdict().name()];
        packets.set(&labels, c.packets);
        bytes.set(&labels, c.bytes);
    }

    let (live, rules) = stats::sessions_and_rules(&src.pin_dir)?;
    let table = Gauges::new(
        &r,
        "sessions",
        "Live sessions in the kernel's session table (forward rules and SOCKS5 fast-path flows)",
        &[],
    )?;
    table.set(&[], live.len() as u64);
    // Occupancy is relay_sessions / relay_session_capacity.
    if let Some(max) = aya::maps::MapData::from_pin(src.pin_dir.join(relay_common::maps::SESSIONS))
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.max_entries())
    {
        Gauges::new(
            &r,
            "session_capacity",
            "Sessions the kernel's session table holds (session_capacity plus SOCKS5 fast_path_flows)",
            &[],
        )?
        .set(&[], u64::from(max));
    }
    let rule_proto = ["rule", "protocol"];
    let sessions = Gauges::new(
        &r,
        "rule_sessions",
        "Live sessions of a forward rule",
        &rule_proto,
    )?;
    let opened = Counters::new(
        &r,
        "rule_sessions_opened",
        "Sessions a forward rule opened",
        &rule_proto,
    )?;
    let refused = Counters::new(
        &r,
        "rule_sessions_refused",
        "New sessions a forward rule refused, by cause",
        &["rule", "cause"],
    )?;
    let rule_bytes = Counters::new(
        &r,
        "rule_bytes",
        "IP bytes a forward rule relayed (live and ended sessions, XDP and controller)",
        &["rule", "direction"],
    )?;
    for rule in &rules {
        let name = rule.name.as_str();
        sessions.set(&[name, rule.protocol], rule.sessions);
        opened.set(&[name, rule.protocol], rule.opened);
        for (cause, n) in &rule.refused {
            refused.set(&[name, cause], *n);
        }
        let totals = [
            [
                rule.xdp.to_upstream,
                rule.slow_path.to_upstream,
                rule.closed_sessions.to_upstream,
            ],
            [
                rule.xdp.to_client,
                rule.slow_path.to_client,
                rule.closed_sessions.to_client,
            ],
        ];
        for (d, t) in totals.iter().enumerate() {
            rule_bytes.set(&[name, DIRECTIONS[d]], t.iter().map(|x| x.bytes).sum());
        }
    }

    let users = stats::users(&src.pin_dir).unwrap_or_default();
    let user_bytes = Counters::new(
        &r,
        "socks5_user_bytes",
        "SOCKS5 payload bytes of a user, by transport, direction and who carried them (xdp: \
         the kernel's fast path; controller: the controller's copy or splice)",
        &["user", "transport", "direction", "path"],
    )?;
    let user_packets = Counters::new(
        &r,
        "socks5_user_datagrams",
        "SOCKS5 UDP datagrams of a user, by direction and who carried them",
        &["user", "direction", "path"],
    )?;
    let live_connections = Gauges::new(
        &r,
        "socks5_user_connections",
        "Live CONNECTs of a user",
        &["user"],
    )?;
    let live_associations = Gauges::new(
        &r,
        "socks5_user_associations",
        "Live UDP associations of a user",
        &["user"],
    )?;
    let requests = Counters::new(
        &r,
        "socks5_user_requests",
        "SOCKS5 requests and logins of a user, by outcome",
        &["user", "outcome"],
    )?;
    for u in &users {
        let name = u.name.as_str();
        let tcp = [u.connect_bytes_to_destination, u.connect_bytes_to_client];
        let udp = [u.udp.to_upstream, u.udp.to_client];
        let xdp = [u.udp_xdp.to_upstream, u.udp_xdp.to_client];
        for d in 0..2 {
            let dir = DIRECTIONS[d];
            user_bytes.set(&[name, "tcp", dir, "controller"], tcp[d]);
            user_bytes.set(&[name, "udp", dir, "xdp"], xdp[d].bytes);
            let slow = udp[d].bytes.saturating_sub(xdp[d].bytes);
            user_bytes.set(&[name, "udp", dir, "controller"], slow);
            user_packets.set(&[name, dir, "xdp"], xdp[d].packets);
            let slow = udp[d].packets.saturating_sub(xdp[d].packets);
            user_packets.set(&[name, dir, "controller"], slow);
        }
        live_connections.set(&[name], u.active_connections);
        live_associations.set(&[name], u.active_associations);
        for (outcome, n) in [
            ("connect", u.connections),
            ("associate", u.associations),
            ("auth_failed", u.auth_failures),
            ("refused", u.refused),
            ("refused_by_limits", u.limit_refused),
        ] {
            requests.set(&[name, outcome], n);
        }
    }
    // Handshake outcomes over all users. Failed logins of names no user has are counted on
    // the no-auth account (slot 0), as are handshakes refused before a user was known.
    let anonymous = |u: &&stats::UserReport| u.name == crate::socks5::server::NO_AUTH;
    let known = || users.iter().filter(|u| !anonymous(u));
    let outcomes = Counters::new(
        &r,
        "socks5_handshake_outcomes",
        "SOCKS5 handshakes by outcome: success (a CONNECT or association granted), \
         wrong_password, unknown_user, refused (by the destination policy or a limit, after \
         the login); refusals before a user is known are socks5_handshakes_refused",
        &["outcome"],
    )?;
    outcomes.set(
        &["success"],
        users.iter().map(|u| u.connections + u.associations).sum(),
    );
    outcomes.set(&["wrong_password"], known().map(|u| u.auth_failures).sum());
    outcomes.set(
        &["unknown_user"],
        users
            .iter()
            .filter(anonymous)
            .map(|u| u.auth_failures)
            .sum(),
    );
    outcomes.set(&["refused"], known().map(|u| u.refused).sum());

    if let Some(store) = src
        .state_dir
        .as_deref()
        .and_then(|d| crate::store::Store::open_existing(d).ok().flatten())
    {
        let left = Gauges::new(
            &r,
            "socks5_user_quota_remaining_bytes",
            "Bytes left of a user's quota this period",
            &["user"],
        )?;
        let used = Gauges::new(
            &r,
            "socks5_user_period_bytes",
            "Bytes a user moved this quota period, both directions (starts again at zero with \
             each period)",
            &["user"],
        )?;
        let devices = Gauges::new(
            &r,
            "socks5_user_devices",
            "Client addresses a user has sessions from",
            &["user"],
        )?;
        for row in store.load()?.values() {
            let name = row.user.as_str();
            used.set(&[name], row.usage.total());
            devices.set(&[name], row.devices);
            if let Some(q) = row.quota {
                left.set(&[name], q.saturating_sub(row.usage.total()));
            }
        }
    }

    if let Some(refusals) = &src.refusals {
        let hs = Counters::new(
            &r,
            "socks5_handshakes_refused",
            "SOCKS5 handshakes refused before a user was known, by reason",
            &["reason"],
        )?;
        for why in crate::socks5::gate::Refusal::ALL {
            let reason = why.name().replace([' ', '-'], "_");
            hs.set(&[&reason], refusals.get(why));
        }
    }

    if let Some(f) = &src.fleet {
        Gauges::new(
            &r,
            "fleet_database_up",
            "1 if the last sync with the fleet's database succeeded, else 0",
            &[],
        )?
        .set(&[], u64::from(f.database_up()));
        Gauges::new(
            &r,
            "fleet_backlog_bytes",
            "Usage counted here and not yet in the fleet's database",
            &[],
        )?
        .set(&[], f.backlog());
    }

    if let Some(c) = stats::controller(&src.pin_dir) {
        let starts = Counters::new(
            &r,
            "controller_starts",
            "Controllers started on these maps: all, those that took over from a running one, \
             those after one that died",
            &["kind"],
        )?;
        starts.set(&["all"], c.starts);
        starts.set(&["handover"], c.handovers);
        starts.set(&["crash_recovery"], c.crash_recoveries);
    }

    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&r.gather(), &mut out)
        .context("encoding the metrics")?;
    String::from_utf8(out).context("encoding the metrics")
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, src: Arc<Sources>) {
    use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let src = Arc::clone(&src);
            async move {
                match tokio::task::spawn_blocking(move || render(&src)).await {
                    Ok(Ok(text)) => (
                        StatusCode::OK,
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                        .into_response(),
                    Ok(Err(e)) => {
                        log::warn!("metrics: {e:#}");
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
                    }
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        log::warn!("metrics server: {e}");
    }
}
