//! The embedded store: per-user usage and status in SQLite in the state directory, so that
//! usage survives restarts and crashes. The controller writes every user's row once a second
//! (one transaction) from a thread of its own and reads them back at start; `relay users`
//! reads them.
//!
//! Schema changes are numbered migrations (SQLite's `user_version`); a store written by a
//! newer relay is refused rather than misread.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use anyhow::Context as _;
use rusqlite::{params, Connection, OptionalExtension as _};

use crate::limits::Usage;

/// The file in the state directory.
pub const FILE: &str = "relay.sqlite";

/// Migrations, in order; `user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: usage and status, per user.
    "CREATE TABLE usage (
        user TEXT PRIMARY KEY NOT NULL,
        period_start INTEGER NOT NULL,
        bytes_up INTEGER NOT NULL,
        bytes_down INTEGER NOT NULL,
        slot INTEGER NOT NULL,
        kernel_up INTEGER NOT NULL,
        kernel_down INTEGER NOT NULL,
        user_up INTEGER NOT NULL,
        user_down INTEGER NOT NULL,
        quota INTEGER,
        period TEXT NOT NULL,
        expires INTEGER,
        rate INTEGER,
        max_devices INTEGER,
        enabled INTEGER NOT NULL,
        blocked TEXT,
        connections INTEGER NOT NULL,
        associations INTEGER NOT NULL,
        devices INTEGER NOT NULL,
        updated INTEGER NOT NULL
    )",
    // 2: users added through the management API or `relay users add`.
    "CREATE TABLE users (
        name TEXT PRIMARY KEY NOT NULL,
        password TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        spec TEXT NOT NULL,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL
    )",
    // 3: a fleet member's usage not yet in the fleet's database (fleet::Book, as JSON).
    "CREATE TABLE fleet (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        book TEXT NOT NULL
    )",
];

/// One user's row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub user: String,
    pub usage: Usage,
    /// The `USERS` slot and the counters the usage was counted up to (see `limits::Ledger`).
    pub slot: u32,
    pub kernel_seen: [u64; 2],
    pub user_seen: [u64; 2],
    // Status, for `relay users`.
    pub quota: Option<u64>,
    pub period: String,
    pub expires: Option<i64>,
    pub rate: Option<u64>,
    pub max_devices: Option<u32>,
    pub enabled: bool,
    pub blocked: Option<String>,
    pub connections: u64,
    pub associations: u64,
    pub devices: u64,
    /// Unix seconds of the write.
    pub updated: i64,
}

/// A user kept in the store (added through the management API or `relay users add`). The
/// password is kept in clear, like the no-argument run's, so that its links can be shown again
/// (the store is root's alone); logins check the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUser {
    pub name: String,
    pub password: crate::socks5::users::Secret,
    pub password_hash: String,
    pub spec: crate::config::Spec,
    /// Unix seconds.
    pub created: i64,
    pub updated: i64,
}

impl StoredUser {
    /// A new user with `settings` (checked as the file's users are) and `password` (given, or
    /// generated): Argon2 hashing makes it slow, so call it off the async threads.
    pub fn create(
        name: &str,
        password: Option<String>,
        settings: crate::config::Spec,
        now: i64,
    ) -> anyhow::Result<StoredUser> {
        // Checked before the slow hash.
        settings.user(name, "")?;
        let (password, password_hash) = hashed_password(password)?;
        let (_, spec) = settings.user(name, &password_hash)?;
        Ok(StoredUser {
            name: name.to_owned(),
            password,
            password_hash,
            spec,
            created: now,
            updated: now,
        })
    }

    /// Its settings changed by `patch`, a JSON merge patch (RFC 7386: a member replaces the
    /// setting, `null` removes it), checked.
    pub fn patch(
        &mut self,
        patch: serde_json::Map<String, serde_json::Value>,
        now: i64,
    ) -> anyhow::Result<()> {
        let mut spec = serde_json::to_value(&self.spec)?;
        merge_patch(&mut spec, serde_json::Value::Object(patch));
        let spec: crate::config::Spec = serde_json::from_value(spec)?;
        let (_, spec) = spec.user(&self.name, &self.password_hash)?;
        self.spec = spec;
        self.updated = now;
        Ok(())
    }

    /// The user it makes: checked, with its password kept for links.
    pub fn user(&self) -> anyhow::Result<crate::socks5::users::User> {
        let (mut u, _) = self
            .spec
            .user(&self.name, &self.password_hash)
            .with_context(|| format!("stored user {:?}", self.name))?;
        u.password = Some(self.password.clone());
        Ok(u)
    }
}

/// A password to keep and its Argon2id hash (slow): `given` (1 to 255 bytes, what SOCKS5
/// carries) or 20 random letters and digits.
pub fn hashed_password(
    given: Option<String>,
) -> anyhow::Result<(crate::socks5::users::Secret, String)> {
    let password = match given {
        Some(p) if p.is_empty() || p.len() > crate::config::MAX_NAME => {
            anyhow::bail!("a password is 1 to {} bytes", crate::config::MAX_NAME)
        }
        Some(p) => p,
        None => crate::quickstart::password(20)?,
    };
    let hash = crate::socks5::users::hash_password(password.as_bytes())?;
    Ok((crate::socks5::users::Secret(password), hash))
}

/// RFC 7386 JSON merge patch: `patch`'s members replace `target`'s; `null` removes.
fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    use serde_json::Value;
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// The users `stored` makes; one that cannot be taken (settings this version does not accept)
/// is left out with a warning rather than stopping the others.
pub fn usable_users(stored: &[StoredUser]) -> Vec<crate::socks5::users::User> {
    stored
        .iter()
        .filter_map(|u| match u.user() {
            Ok(user) => Some(user),
            Err(e) => {
                log::warn!("{e:#}; left out");
                None
            }
        })
        .collect()
}

/// SQLite integers are signed 64-bit: counters are stored as their bit pattern.
pub(crate) fn s(v: u64) -> i64 {
    v as i64
}
pub(crate) fn u(v: i64) -> u64 {
    v as u64
}

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, migrating it to this version's schema.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        crate::system::private_dir(dir)?;
        let path = dir.join(FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("cannot open the store {}", path.display()))?;
        let mut store = Store { conn };
        store
            .migrate()
            .with_context(|| format!("the store {}", path.display()))?;
        Ok(store)
    }

    /// Opens an existing store read-only (`relay users`): `None` if there is none.
    pub fn open_existing(dir: &Path) -> anyhow::Result<Option<Store>> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open the store {}", path.display()))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != MIGRATIONS.len() as i64 {
            anyhow::bail!(
                "the store {} has schema version {version}, this relay reads {}",
                path.display(),
                MIGRATIONS.len()
            );
        }
        Ok(Some(Store { conn }))
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        // WAL: a write does not block readers (`relay users`), and a crash loses at most the
        // transaction under way.
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.conn.busy_timeout(Duration::from_secs(2))?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            anyhow::bail!(
                "it was written by a newer relay (schema version {version}; this one knows {known})"
            );
        }
        let tx = self.conn.transaction()?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(m)
                .with_context(|| format!("migration {}", i + 1))?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(())
    }

    /// Every row, by user name.
    pub fn load(&self) -> anyhow::Result<HashMap<String, Row>> {
        let mut stmt = self.conn.prepare(
            "SELECT user, period_start, bytes_up, bytes_down, slot, kernel_up, kernel_down,
                    user_up, user_down, quota, period, expires, rate, max_devices, enabled,
                    blocked, connections, associations, devices, updated FROM usage",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Row {
                user: r.get(0)?,
                usage: Usage {
                    period_start: r.get(1)?,
                    bytes: [u(r.get(2)?), u(r.get(3)?)],
                },
                slot: r.get(4)?,
                kernel_seen: [u(r.get(5)?), u(r.get(6)?)],
                user_seen: [u(r.get(7)?), u(r.get(8)?)],
                quota: r.get::<_, Option<i64>>(9)?.map(u),
                period: r.get(10)?,
                expires: r.get(11)?,
                rate: r.get::<_, Option<i64>>(12)?.map(u),
                max_devices: r.get(13)?,
                enabled: r.get(14)?,
                blocked: r.get(15)?,
                connections: u(r.get(16)?),
                associations: u(r.get(17)?),
                devices: u(r.get(18)?),
                updated: r.get(19)?,
            })
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let row = row?;
            out.insert(row.user.clone(), row);
        }
        Ok(out)
    }

    /// The users kept in the store, by name.
    pub fn users(&self) -> anyhow::Result<Vec<StoredUser>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, password, password_hash, spec, created, updated FROM users ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, password, password_hash, spec, created, updated) = row?;
            let spec = serde_json::from_str(&spec)
                .with_context(|| format!("stored user {name:?}: its settings are damaged"))?;
            out.push(StoredUser {
                name,
                password: crate::socks5::users::Secret(password),
                password_hash,
                spec,
                created,
                updated,
            });
        }
        Ok(out)
    }

    /// Adds or replaces a user.
    pub fn put_user(&mut self, u: &StoredUser) -> anyhow::Result<()> {
        put_user(&self.conn, u)
    }

    /// Makes the stored users exactly `users` (the fleet's, cached here), in one transaction.
    pub fn replace_users(&mut self, users: &[StoredUser]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM users", [])?;
        for u in users {
            put_user(&tx, u)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The fleet book kept at the last sync or stop.
    pub fn fleet_book(&mut self) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT book FROM fleet WHERE id = 1", [], |r| r.get(0))
            .optional()?)
    }

    pub fn set_fleet_book(&mut self, book: &str) -> anyhow::Result<()> {
        self.conn
            .execute("INSERT OR REPLACE INTO fleet VALUES (1, ?1)", params![book])?;
        Ok(())
    }

    /// Removes a user and its usage; whether it was there.
    pub fn delete_user(&mut self, name: &str) -> anyhow::Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM users WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM usage WHERE user = ?1", params![name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Forgets a user's usage (the relay is not running: it starts from zero at the next).
    pub fn reset_usage(&mut self, name: &str) -> anyhow::Result<()> {
        self.conn
            .execute("DELETE FROM usage WHERE user = ?1", params![name])?;
        Ok(())
    }

    /// Writes `rows` in one transaction.
    pub fn save(&mut self, rows: &[Row]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO usage VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                  ?19, ?20)",
            )?;
            for r in rows {
                stmt.execute(params![
                    r.user,
                    r.usage.period_start,
                    s(r.usage.bytes[0]),
                    s(r.usage.bytes[1]),
                    r.slot,
                    s(r.kernel_seen[0]),
                    s(r.kernel_seen[1]),
                    s(r.user_seen[0]),
                    s(r.user_seen[1]),
                    r.quota.map(s),
                    r.period,
                    r.expires,
                    r.rate.map(s),
                    r.max_devices,
                    r.enabled,
                    r.blocked,
                    s(r.connections),
                    s(r.associations),
                    s(r.devices),
                    r.updated,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn put_user(conn: &Connection, u: &StoredUser) -> anyhow::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO users VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            u.name,
            u.password.0,
            u.password_hash,
            serde_json::to_string(&u.spec)?,
            u.created,
            u.updated
        ],
    )?;
    Ok(())
}

/// The store's writer thread: rows sent to it are written in order; a flush waits until what
/// was sent before it is on disk. SQLite blocks, so it never runs on the async threads.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

/// Work on the store other than usage (the users' changes), run on the writer's thread in
/// order with the usage writes; it sends its own result.
type Change = Box<dyn FnOnce(&mut Store) + Send>;

enum Job {
    Save(Vec<Row>),
    Flush(mpsc::Sender<()>),
    Change(Change),
}

impl Writer {
    pub fn spawn(store: Store, dir: &Path) -> anyhow::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let path = dir.join(FILE);
        let shown = path.display().to_string();
        let mut store = store;
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let mut failing = false;
                for job in rx {
                    match job {
                        Job::Save(rows) => match store.save(&rows) {
                            Ok(()) if failing => {
                                log::info!("store {shown}: writing again");
                                failing = false;
                            }
                            Ok(()) => {}
                            Err(e) if !failing => {
                                log::warn!("store {shown}: cannot write usage ({e:#}); will retry");
                                failing = true;
                            }
                            Err(_) => {}
                        },
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                        Job::Change(change) => change(&mut store),
                    }
                }
            })
            .context("cannot start the store's thread")?;
        Ok(Writer { tx, path })
    }

    pub fn save(&self, rows: Vec<Row>) {
        let _ = self.tx.send(Job::Save(rows));
    }

    /// Runs `change` on the writer's thread after what was sent before, and waits (blocking)
    /// for its result: one writer for the store, whoever changes it.
    pub fn change<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Store) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = mpsc::channel();
        let job = move |st: &mut Store| {
            let _ = tx.send(change(st));
        };
        self.tx
            .send(Job::Change(Box::new(job)))
            .map_err(|_| anyhow::anyhow!("the store's writer has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the store's writer has stopped"))?
    }

    /// Waits (blocking, at most `wait`) until everything sent so far is written.
    pub fn flush(&self, wait: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Job::Flush(tx)).is_ok() && rx.recv_timeout(wait).is_ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("relay-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rows_round_trip_including_counters_above_i64() {
        let dir = tempdir("roundtrip");
        let mut st = Store::open(&dir).unwrap();
        let row = Row {
            user: "alice".into(),
            usage: Usage {
                period_start: 1_800_000_000,
                bytes: [u64::MAX - 1, 42],
            },
            slot: 3,
            kernel_seen: [u64::MAX, 7],
            user_seen: [1, 2],
            quota: Some(10_000_000),
            period: "monthly:5".into(),
            expires: Some(1_900_000_000),
            rate: None,
            max_devices: Some(2),
            enabled: true,
            blocked: Some("expired".into()),
            connections: 4,
            associations: 5,
            devices: 2,
            updated: 1_800_000_123,
        };
        st.save(std::slice::from_ref(&row)).unwrap();
        let mut newer = row.clone();
        newer.usage.bytes[1] = 43;
        st.save(std::slice::from_ref(&newer)).unwrap();
        drop(st);
        // A second open migrates nothing and reads the latest row.
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.load().unwrap().get("alice"), Some(&newer));
        let ro = Store::open_existing(&dir).unwrap().unwrap();
        assert_eq!(ro.load().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_merge_patch_replaces_and_removes_settings_and_checks_them() {
        let mut v = serde_json::json!({"quota": 5, "rate": 7, "enabled": true});
        merge_patch(
            &mut v,
            serde_json::json!({"quota": null, "rate": 9, "max_devices": 2}),
        );
        assert_eq!(
            v,
            serde_json::json!({"rate": 9, "enabled": true, "max_devices": 2})
        );
        let mut u = StoredUser {
            name: "bob".into(),
            password: crate::socks5::users::Secret("pw".into()),
            password_hash: String::new(),
            spec: crate::config::Spec {
                quota: Some(100),
                ..Default::default()
            },
            created: 1,
            updated: 1,
        };
        let patch = |v: serde_json::Value| v.as_object().unwrap().clone();
        u.patch(patch(serde_json::json!({"quota": null, "rate": 1000})), 2)
            .unwrap();
        assert_eq!(
            (u.spec.quota, u.spec.rate, u.updated),
            (None, Some(1000), 2)
        );
        // A setting out of range changes nothing.
        let e = u
            .patch(patch(serde_json::json!({"rate": 0})), 3)
            .unwrap_err();
        assert!(format!("{e:#}").contains("rate"), "{e:#}");
        assert_eq!((u.spec.rate, u.updated), (Some(1000), 2));
        assert!(crate::store::hashed_password(Some(String::new())).is_err());
        assert!(crate::store::hashed_password(Some("x".repeat(256))).is_err());
    }

    #[test]
    fn a_store_from_a_newer_relay_is_refused() {
        let dir = tempdir("newer");
        drop(Store::open(&dir).unwrap());
        let c = Connection::open(dir.join(FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = format!("{:#}", Store::open(&dir).err().unwrap());
        assert!(e.contains("newer relay"), "{e}");
        assert!(Store::open_existing(&tempdir("none")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_writer_writes_before_flush_returns() {
        let dir = tempdir("writer");
        let w = Writer::spawn(Store::open(&dir).unwrap(), &dir).unwrap();
        w.save(vec![Row {
            user: "bob".into(),
            period: "never".into(),
            ..Row::default()
        }]);
        assert!(w.flush(Duration::from_secs(5)));
        let rows = Store::open_existing(&dir).unwrap().unwrap().load().unwrap();
        assert!(rows.contains_key("bob"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
