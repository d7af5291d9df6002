//! A fleet: relays that share their SOCKS5 users, the users' limits and their usage through
//! one PostgreSQL database (`[fleet] database = ...`).
//!
//! The database is never on the packet path. Once a second each relay, on a task of its own:
//! registers itself (`relay_nodes`: name, addresses, version, last contact, traffic); reloads
//! the users if their generation moved (a trigger counts every change to `relay_users`, made
//! by any relay's API or straight in the database); pushes the usage it counted since the
//! last push as one numbered batch; and reads the fleet's totals, which become each user's
//! usage (plus what was counted here since), so a quota is the fleet's.
//!
//! A push is idempotent: a batch carries the relay's next sequence number and the database
//! adds it only if that number is above the one it last took from the relay (in the same
//! transaction), so a batch retried after a lost answer is never counted twice. Until a push
//! is confirmed its batch is kept (and retried as it is); what is counted meanwhile waits in
//! the outbox for the next one. Both are saved in the embedded store, so a restart loses
//! neither. While the database is unreachable the relay keeps serving the users it knows,
//! with their last limits (the store caches them), counts locally and enforces quotas on the
//! last totals plus its own count; the backlog goes up when the database is back.
//!
//! Overshoot of a fleet quota: each relay learns the others' usage at most one sync interval
//! late, so N relays together can carry up to N x (what one carries for the user in a
//! second) past the quota (for a user with a rate: N x rate x 1 s), on top of the single
//! relay's own bound.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, GenericClient, NoTls};

use crate::{
    config::FleetConfig,
    limits::Usage,
    socks5::{server::Server, users::Secret},
    store::{StoredUser, Writer},
};

/// How often a relay syncs with the database.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long connecting (and each sync) may take before it counts as a failure.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The database's schema, as numbered migrations (`relay_schema.version` is how many ran).
const MIGRATIONS: &[&str] = &["
    CREATE TABLE relay_meta (
        id INT PRIMARY KEY CHECK (id = 1),
        users_generation BIGINT NOT NULL
    );
    INSERT INTO relay_meta VALUES (1, 0);
    CREATE TABLE relay_users (
        name TEXT PRIMARY KEY,
        password TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        settings TEXT NOT NULL,
        created BIGINT NOT NULL,
        updated BIGINT NOT NULL
    );
    CREATE FUNCTION relay_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE relay_meta SET users_generation = users_generation + 1;
            RETURN NULL;
        END $$;
    CREATE TRIGGER relay_users_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON relay_users FOR EACH STATEMENT EXECUTE FUNCTION relay_users_changed();
    CREATE TABLE relay_usage (
        name TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        bytes_up BIGINT NOT NULL,
        bytes_down BIGINT NOT NULL,
        PRIMARY KEY (name, period_start)
    );
    CREATE TABLE relay_nodes (
        name TEXT PRIMARY KEY,
        epoch TEXT NOT NULL,
        addresses TEXT NOT NULL,
        version TEXT NOT NULL,
        started BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        pushed_seq BIGINT NOT NULL DEFAULT 0,
        bytes_up BIGINT NOT NULL DEFAULT 0,
        bytes_down BIGINT NOT NULL DEFAULT 0
    );
"];

// Counters are stored as their bit pattern (PostgreSQL has no unsigned 64-bit integer either).
use crate::store::{s, u};

/// One push: usage counted here, by user and period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub seq: u64,
    pub rows: Vec<(String, i64, [u64; 2])>,
}

/// What this relay counted and has not yet seen counted by the database. Pure: the tests
/// drive it without a database.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Book {
    /// Identifies this book: a relay whose local state was lost starts a new one, and the
    /// database then takes its sequence numbers from 1 again.
    pub epoch: String,
    /// The last sequence number the database confirmed.
    pub seq: u64,
    /// The batch sent and not confirmed: retried as it is.
    pub inflight: Option<Batch>,
    /// Counted since, by (user, period start).
    outbox: BTreeMap<String, BTreeMap<i64, [u64; 2]>>,
    /// Each user's usage when last looked at (period start, bytes): kept too, so that what a
    /// stopping relay counts after its last look is counted by the next one.
    seen: HashMap<String, (i64, [u64; 2])>,
}

impl Book {
    pub fn new(epoch: String) -> Book {
        Book {
            epoch,
            ..Book::default()
        }
    }

    /// Counts what `usage` grew by since it was last looked at (a new period counts from 0).
    pub fn collect(&mut self, name: &str, usage: &Usage) {
        if let Some(&(period, bytes)) = self.seen.get(name) {
            let delta = if period == usage.period_start {
                [
                    usage.bytes[0].saturating_sub(bytes[0]),
                    usage.bytes[1].saturating_sub(bytes[1]),
                ]
            } else {
                usage.bytes
            };
            if delta != [0, 0] {
                let e = self
                    .outbox
                    .entry(name.to_owned())
                    .or_default()
                    .entry(usage.period_start)
                    .or_default();
                e[0] = e[0].saturating_add(delta[0]);
                e[1] = e[1].saturating_add(delta[1]);
            }
        }
        self.seen
            .insert(name.to_owned(), (usage.period_start, usage.bytes));
    }

    /// The batch to push: the unconfirmed one, else the outbox (emptied into it).
    pub fn batch(&mut self) -> Option<Batch> {
        if self.inflight.is_none() && !self.outbox.is_empty() {
            let rows = std::mem::take(&mut self.outbox)
                .into_iter()
                .flat_map(|(n, periods)| periods.into_iter().map(move |(p, b)| (n.clone(), p, b)))
                .collect();
            self.inflight = Some(Batch {
                seq: self.seq + 1,
                rows,
            });
        }
        self.inflight.clone()
    }

    /// The database took batch `seq`.
    pub fn pushed(&mut self, seq: u64) {
        if self.inflight.as_ref().is_some_and(|b| b.seq == seq) {
            self.inflight = None;
            self.seq = seq;
        }
    }

    /// The user's usage is the fleet's `total` (which holds every confirmed push) plus what
    /// was counted here since. Called after a confirmed push, with nothing in flight.
    pub fn settle(&mut self, name: &str, usage: &mut Usage, total: [u64; 2]) {
        self.collect(name, usage);
        let mine = self
            .outbox
            .get(name)
            .and_then(|p| p.get(&usage.period_start))
            .copied()
            .unwrap_or_default();
        usage.bytes = [
            total[0].saturating_add(mine[0]),
            total[1].saturating_add(mine[1]),
        ];
        self.seen
            .insert(name.to_owned(), (usage.period_start, usage.bytes));
    }

    /// Drops what is held for `name` (its usage was reset or it was deleted).
    pub fn forget(&mut self, name: &str) {
        self.outbox.remove(name);
        self.seen.remove(name);
        if let Some(b) = &mut self.inflight {
            b.rows.retain(|r| r.0 != name);
        }
    }

    /// Bytes waiting to be pushed (the unconfirmed batch and the outbox).
    pub fn backlog(&self) -> u64 {
        let out: u64 = self
            .outbox
            .values()
            .flat_map(|p| p.values())
            .map(|b| b[0] + b[1])
            .sum();
        let inflight: u64 = self
            .inflight
            .iter()
            .flat_map(|b| &b.rows)
            .map(|r| r.2[0] + r.2[1])
            .sum();
        out + inflight
    }
}

/// A relay as the fleet sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: String,
    pub addresses: String,
    pub version: String,
    pub started: String,
    pub last_seen: String,
    /// Seconds since its last contact (when read).
    pub seconds_since: i64,
    /// Bytes its users moved, client to destination and back, as pushed.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Opens a connection (the driver's connection task runs on its own).
pub async fn connect(database: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio::time::timeout(TIMEOUT, tokio_postgres::connect(database, NoTls))
        .await
        .context("connecting timed out")?
        .context("connecting")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("fleet database connection ended: {e}");
        }
    });
    Ok(client)
}

/// Brings the schema to this version (one relay at a time: an advisory lock).
pub async fn migrate(client: &mut Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7235441);
         CREATE TABLE IF NOT EXISTS relay_schema (version INT NOT NULL)",
    )
    .await?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM relay_schema", &[])
        .await?
    {
        Some(r) => r.get(0),
        None => {
            tx.execute("INSERT INTO relay_schema VALUES (0)", &[])
                .await?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        bail!(
            "the database was set up by a newer relay (schema {version}; this one knows {known})"
        );
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(m)
            .await
            .with_context(|| format!("migration {}", i + 1))?;
    }
    tx.execute("UPDATE relay_schema SET version = $1", &[&known])
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The fleet's users.
pub async fn users(c: &impl GenericClient) -> anyhow::Result<Vec<StoredUser>> {
    let rows = c
        .query(
            "SELECT name, password, password_hash, settings, created, updated FROM relay_users \
             ORDER BY name",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let settings: String = r.get(3);
        // A row this version cannot read (written by hand, or by a newer relay) is left out;
        // the others are served.
        match serde_json::from_str(&settings) {
            Ok(spec) => out.push(StoredUser {
                spec,
                name,
                password: Secret(r.get(1)),
                password_hash: r.get(2),
                created: r.get(4),
                updated: r.get(5),
            }),
            Err(e) => warn!("fleet user {name:?}: settings not understood ({e}); left out"),
        }
    }
    Ok(out)
}

/// The relays of the fleet.
pub async fn nodes(c: &impl GenericClient, now: i64) -> anyhow::Result<Vec<Node>> {
    let rows = c
        .query(
            "SELECT name, addresses, version, started, last_seen, bytes_up, bytes_down \
             FROM relay_nodes ORDER BY name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let last: i64 = r.get(4);
            Node {
                name: r.get(0),
                addresses: r.get(1),
                version: r.get(2),
                started: crate::limits::format_time(r.get(3)),
                last_seen: crate::limits::format_time(last),
                seconds_since: now.saturating_sub(last),
                bytes_up: u(r.get(5)),
                bytes_down: u(r.get(6)),
            }
        })
        .collect())
}

/// `relay fleet status` as a table.
pub fn nodes_table(nodes: &[Node]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<20} {:<24} {:<10} {:>12} {:>12} {:>12}\n",
        "RELAY", "ADDRESSES", "VERSION", "LAST SEEN", "UP", "DOWN"
    );
    for n in nodes {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<10} {:>10}s ago {:>12} {:>12}",
            n.name,
            n.addresses,
            n.version,
            n.seconds_since,
            crate::stats::megabytes(n.bytes_up),
            crate::stats::megabytes(n.bytes_down)
        );
    }
    out
}

/// A relay's membership of the fleet: its connection, its book, its sync task.
pub struct Fleet {
    pub cfg: FleetConfig,
    /// The relay's addresses as the fleet shows them.
    pub addresses: String,
    client: tokio::sync::Mutex<Option<Client>>,
    book: Mutex<Book>,
    /// Set before handing over or stopping: no more syncs (the book is saved for the next).
    stopped: AtomicBool,
    /// Whether the last sync succeeded.
    up: AtomicBool,
    store: Writer,
    started: i64,
}

impl Fleet {
    /// The fleet membership with the book the store kept (or a new one).
    pub fn new(cfg: FleetConfig, addresses: String, store: Writer) -> anyhow::Result<Arc<Fleet>> {
        let book = store.change(|st| st.fleet_book())?;
        let book = match book {
            Some(text) => serde_json::from_str(&text).context("the store's fleet book")?,
            None => Book::new(crate::socks5::users::random_hex::<16>()?),
        };
        Ok(Arc::new(Fleet {
            cfg,
            addresses,
            client: tokio::sync::Mutex::new(None),
            book: Mutex::new(book),
            stopped: AtomicBool::new(false),
            up: AtomicBool::new(false),
            store,
            started: crate::system::unix_now(),
        }))
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the book to the store (blocking).
    fn save_book(&self) -> anyhow::Result<()> {
        let text = serde_json::to_string(&*self.book())?;
        self.store.change(move |st| st.set_fleet_book(&text))
    }

    /// Stops syncing (after the sync under way, if any), counts what moved since the last
    /// sync and saves the book: before a handover or a stop.
    pub async fn stop(self: &Arc<Self>, server: &Arc<Server>) {
        {
            // A sync holds the connection while it runs: none runs after this.
            let _connection = self.client.lock().await;
            self.stopped.store(true, Ordering::SeqCst);
            let mut book = self.book();
            server.with_usages(|n, usage| book.collect(n, usage));
        }
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || me.save_book()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("fleet: saving the usage not yet pushed: {e:#}"),
            Err(e) => warn!("fleet: saving the usage not yet pushed: {e}"),
        }
    }

    /// Syncs every [`SYNC_EVERY`] until stopped.
    pub async fn run(self: Arc<Self>, server: Arc<Server>) {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut generation = None;
        let mut failing = false;
        loop {
            tick.tick().await;
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let error =
                match tokio::time::timeout(TIMEOUT, self.sync(&server, &mut generation)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("timed out".to_owned()),
                };
            self.up.store(error.is_none(), Ordering::Relaxed);
            match error {
                None if failing => {
                    failing = false;
                    info!("fleet database reachable again; the usage counted meanwhile is pushed");
                }
                None => {}
                Some(e) => {
                    // Counted here meanwhile: what waits for the database (and its metric).
                    {
                        let mut book = self.book();
                        server.with_usages(|n, usage| book.collect(n, usage));
                    }
                    *self.client.lock().await = None;
                    if !failing {
                        failing = true;
                        warn!(
                            "fleet database unreachable ({e}); serving the users known with their \
                             last limits and counting usage here until it is back"
                        );
                    }
                }
            }
            let me = Arc::clone(&self);
            let saved = tokio::task::spawn_blocking(move || me.save_book()).await;
            if let Ok(Err(e)) = saved {
                warn!("fleet: saving the usage not yet pushed: {e:#}");
            }
        }
    }

    /// The connection, (re)opened and the schema checked if needed.
    async fn client(&self) -> anyhow::Result<tokio::sync::MappedMutexGuard<'_, Client>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let mut c = connect(&self.cfg.database).await?;
            migrate(&mut c).await?;
            *guard = Some(c);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |c| {
            c.as_mut().expect("set above")
        }))
    }

    /// One sync: register, users, push, totals.
    async fn sync(&self, server: &Arc<Server>, generation: &mut Option<i64>) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        let now = crate::system::unix_now();
        let epoch = self.book().epoch.clone();
        c.execute(
            "INSERT INTO relay_nodes (name, epoch, addresses, version, started, last_seen)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET
                pushed_seq = CASE WHEN relay_nodes.epoch = EXCLUDED.epoch
                             THEN relay_nodes.pushed_seq ELSE 0 END,
                epoch = EXCLUDED.epoch, addresses = EXCLUDED.addresses,
                version = EXCLUDED.version, started = EXCLUDED.started,
                last_seen = EXCLUDED.last_seen",
            &[
                &self.cfg.name,
                &epoch,
                &self.addresses,
                &env!("CARGO_PKG_VERSION"),
                &self.started,
                &now,
            ],
        )
        .await?;
        let g: i64 = c
            .query_one("SELECT users_generation FROM relay_meta WHERE id = 1", &[])
            .await?
            .get(0);
        if *generation != Some(g) {
            let list = users(&*c).await?;
            // Users that cannot be taken here (more names than this process has slots for)
            // do not stop the usage from going up.
            if let Err(e) = self.take_users(server, list).await {
                warn!("fleet: the users of generation {g} not applied: {e:#}");
            }
            *generation = Some(g);
        }
        let batch = {
            let mut book = self.book();
            server.with_usages(|n, usage| book.collect(n, usage));
            book.batch()
        };
        if let Some(b) = batch {
            push(&mut c, &self.cfg.name, &b).await?;
            self.book().pushed(b.seq);
        }
        // Only the current periods of the users this relay serves.
        let (mut names, mut periods) = (Vec::new(), Vec::new());
        server.with_usages(|n, usage| {
            names.push(n.to_owned());
            periods.push(usage.period_start);
        });
        let rows = c
            .query(
                "SELECT u.name, u.period_start, u.bytes_up, u.bytes_down FROM relay_usage u
                 JOIN unnest($1::text[], $2::bigint[]) AS w(name, period_start)
                 ON u.name = w.name AND u.period_start = w.period_start",
                &[&names, &periods],
            )
            .await?;
        let totals: HashMap<(String, i64), [u64; 2]> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), [u(r.get(2)), u(r.get(3))]))
            .collect();
        let mut book = self.book();
        if book.inflight.is_none() {
            server.with_usages(|n, usage| {
                let total = totals
                    .get(&(n.to_owned(), usage.period_start))
                    .copied()
                    .unwrap_or_default();
                book.settle(n, usage, total);
            });
        }
        Ok(())
    }

    /// The fleet's users become this relay's (cached in the store for a start without the
    /// database).
    async fn take_users(&self, server: &Arc<Server>, list: Vec<StoredUser>) -> anyhow::Result<()> {
        let users = crate::store::usable_users(&list);
        let store = self.store.clone();
        let server = Arc::clone(server);
        tokio::task::spawn_blocking(move || {
            // The cache and the server change together, with no reload in between.
            let _users = server.users_lock();
            store.change(move |st| st.replace_users(&list))?;
            server.set_stored_users(users)
        })
        .await
        .context("applying the fleet's users")?
    }

    /// Changes the fleet's users in one transaction (serialised with every other relay's
    /// changes), then applies them here at once. The database must be reachable.
    pub async fn change_users<T, E>(
        &self,
        server: &Arc<Server>,
        change: impl FnOnce(&mut Vec<StoredUser>) -> Result<T, E>,
    ) -> anyhow::Result<Result<T, E>> {
        tokio::time::timeout(TIMEOUT, self.change_users_now(server, change))
            .await
            .context("timed out")?
    }

    async fn change_users_now<T, E>(
        &self,
        server: &Arc<Server>,
        change: impl FnOnce(&mut Vec<StoredUser>) -> Result<T, E>,
    ) -> anyhow::Result<Result<T, E>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT 1 FROM relay_meta WHERE id = 1 FOR UPDATE", &[])
            .await?;
        let before = users(&tx).await?;
        let mut after = before.clone();
        let out = match change(&mut after) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        for b in &before {
            if !after.iter().any(|a| a.name == b.name) {
                tx.execute("DELETE FROM relay_users WHERE name = $1", &[&b.name])
                    .await?;
                tx.execute("DELETE FROM relay_usage WHERE name = $1", &[&b.name])
                    .await?;
                self.book().forget(&b.name);
            }
        }
        for a in &after {
            if !before.contains(a) {
                tx.execute(
                    "INSERT INTO relay_users VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET password = EXCLUDED.password,
                        password_hash = EXCLUDED.password_hash, settings = EXCLUDED.settings,
                        updated = EXCLUDED.updated",
                    &[
                        &a.name,
                        &a.password.0,
                        &a.password_hash,
                        &serde_json::to_string(&a.spec)?,
                        &a.created,
                        &a.updated,
                    ],
                )
                .await?;
            }
        }
        tx.commit().await?;
        drop(c);
        self.take_users(server, after).await?;
        Ok(Ok(out))
    }

    /// Forgets a user's usage fleet-wide (reset or deleted).
    pub async fn reset_usage(&self, name: &str) -> anyhow::Result<()> {
        tokio::time::timeout(TIMEOUT, async {
            let c = self.client().await?;
            c.execute("DELETE FROM relay_usage WHERE name = $1", &[&name])
                .await?;
            self.book().forget(name);
            anyhow::Ok(())
        })
        .await
        .context("timed out")?
    }

    /// The fleet's relays.
    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        tokio::time::timeout(TIMEOUT, async {
            let c = self.client().await?;
            nodes(&*c, crate::system::unix_now()).await
        })
        .await
        .context("timed out")?
    }

    /// Whether the last sync with the database succeeded.
    pub fn database_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes waiting for the database.
    pub fn backlog(&self) -> u64 {
        self.book().backlog()
    }
}

/// Adds batch `b` to the totals unless the database already took it (one transaction).
async fn push(c: &mut Client, node: &str, b: &Batch) -> anyhow::Result<()> {
    let tx = c.transaction().await?;
    let taken: i64 = tx
        .query_one(
            "SELECT pushed_seq FROM relay_nodes WHERE name = $1 FOR UPDATE",
            &[&node],
        )
        .await?
        .get(0);
    if s(b.seq) <= taken {
        // Counted already: the answer to an earlier try was lost.
        tx.commit().await?;
        return Ok(());
    }
    let (mut up, mut down) = (0u64, 0u64);
    for (name, period, bytes) in &b.rows {
        tx.execute(
            "INSERT INTO relay_usage VALUES ($1, $2, $3, $4)
             ON CONFLICT (name, period_start) DO UPDATE SET
                bytes_up = relay_usage.bytes_up + EXCLUDED.bytes_up,
                bytes_down = relay_usage.bytes_down + EXCLUDED.bytes_down",
            &[name, period, &s(bytes[0]), &s(bytes[1])],
        )
        .await?;
        up = up.wrapping_add(bytes[0]);
        down = down.wrapping_add(bytes[1]);
    }
    tx.execute(
        "UPDATE relay_nodes SET pushed_seq = $2, bytes_up = bytes_up + $3,
            bytes_down = bytes_down + $4 WHERE name = $1",
        &[&node, &s(b.seq), &s(up), &s(down)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(period: i64, up: u64, down: u64) -> Usage {
        Usage {
            period_start: period,
            bytes: [up, down],
        }
    }

    #[test]
    fn a_retried_batch_is_the_same_and_new_bytes_wait_for_the_next() {
        let mut b = Book::new("e".into());
        b.collect("bob", &usage(0, 100, 10));
        assert_eq!(b.batch(), None, "the first look is the baseline");
        b.collect("bob", &usage(0, 150, 30));
        let first = b.batch().unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(first.rows, vec![("bob".to_owned(), 0, [50, 20])]);
        // The push failed (database down): more is counted meanwhile.
        b.collect("bob", &usage(0, 170, 30));
        assert_eq!(b.batch(), Some(first.clone()), "retried as it was");
        assert_eq!(b.backlog(), 90);
        b.pushed(1);
        let second = b.batch().unwrap();
        assert_eq!(
            (second.seq, second.rows),
            (2, vec![("bob".to_owned(), 0, [20, 0])])
        );
        b.pushed(2);
        assert_eq!(b.batch(), None);
        assert_eq!(b.backlog(), 0);
    }

    #[test]
    fn settling_makes_usage_the_fleets_total_plus_what_is_not_pushed() {
        let mut b = Book::new("e".into());
        let mut u = usage(0, 1000, 0);
        b.collect("bob", &u);
        // The fleet holds 5000 (others' and ours); 40 more were counted here since.
        u.bytes[0] += 40;
        b.settle("bob", &mut u, [5000, 300]);
        assert_eq!(u.bytes, [5040, 300]);
        // Counting goes on from there; the 40 and what follows are pushed next.
        u.bytes[0] += 60;
        b.collect("bob", &u);
        assert_eq!(
            b.batch().unwrap().rows,
            vec![("bob".to_owned(), 0, [100, 0])]
        );
    }

    #[test]
    fn a_new_period_counts_from_zero_and_forget_drops_a_user() {
        let mut b = Book::new("e".into());
        b.collect("bob", &usage(100, 500, 500));
        b.collect("bob", &usage(200, 30, 5));
        b.collect("eve", &usage(200, 1, 1));
        b.collect("eve", &usage(200, 9, 1));
        b.forget("eve");
        assert_eq!(
            b.batch().unwrap().rows,
            vec![("bob".to_owned(), 200, [30, 5])]
        );
    }

    #[test]
    fn the_book_survives_a_restart_with_what_was_seen() {
        let mut b = Book::new("e".into());
        b.collect("bob", &usage(0, 0, 0));
        b.collect("bob", &usage(0, 7, 0));
        let text = serde_json::to_string(&b).unwrap();
        let mut again: Book = serde_json::from_str(&text).unwrap();
        assert_eq!(again.epoch, "e");
        assert_eq!(again.backlog(), 7);
        // The next relay's usage (from the store, written after the book) holds 5 bytes
        // counted after the last look: they are counted, the 7 are not counted twice.
        again.collect("bob", &usage(0, 12, 0));
        assert_eq!(
            again.batch().unwrap().rows,
            vec![("bob".to_owned(), 0, [12, 0])]
        );
    }
}
