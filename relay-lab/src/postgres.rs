//! A PostgreSQL server of a test's or benchmark's own: a fresh cluster in a temporary
//! directory, run as the `postgres` user, listening on a unix socket only (in that directory:
//! reachable from every network namespace, no address taken), with a database `relay`.
//! Stopped and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// Debian's PostgreSQL 15 server programs.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: PathBuf,
    child: Option<Child>,
}

/// A command run as the `postgres` user in `dir` (setpriv execs it: its pid is the
/// program's, so a signal reaches it).
fn as_postgres(dir: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "postgres",
        "--regid",
        "postgres",
        "--init-groups",
        "--",
    ])
    .current_dir(dir)
    .env("HOME", dir);
    c
}

fn check(what: &str, out: std::io::Result<std::process::Output>) -> anyhow::Result<String> {
    let out = out.with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Postgres {
    /// A new cluster, started, with the database `relay`; `prefix` names the directory (so
    /// that a sweep of the prefix removes it).
    pub fn start(prefix: &'static str) -> anyhow::Result<Postgres> {
        if !Path::new(BIN).join("postgres").exists() {
            bail!("{BIN}/postgres is missing: Debian's postgresql-15 (`cargo xtask test` installs it)");
        }
        let dir = std::env::temp_dir().join(crate::unique(prefix, "pg"));
        std::fs::create_dir_all(&dir)?;
        let d = dir.to_str().context("utf-8 temp dir")?;
        crate::sh(&["chown", "postgres", d])?;
        crate::sh(&["chmod", "0755", d])?;
        let mut pg = Postgres {
            dir: dir.clone(),
            child: None,
        };
        let data = dir.join("data");
        check(
            "initdb",
            as_postgres(&dir)
                .arg(format!("{BIN}/initdb"))
                .args(["-D", data.to_str().context("utf-8")?])
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .output(),
        )?;
        pg.resume()?;
        pg.psql("postgres", "CREATE DATABASE relay")?;
        Ok(pg)
    }

    /// Starts the server (again) and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let child = as_postgres(&self.dir)
            .arg(format!("{BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "unix_socket_permissions=0777"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("PostgreSQL did not start in {}", self.dir.display())
    }

    /// Stops the server (a fast shutdown: clients are disconnected).
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// The connection string for the relay's `[fleet] database`.
    pub fn conn(&self) -> String {
        format!("host={} user=postgres dbname=relay", self.dir.display())
    }

    /// Runs `sql` in database `db`: its output, unaligned, one row per line.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        check(
            sql,
            as_postgres(&self.dir)
                .arg("psql")
                .arg("-X")
                .arg("-h")
                .arg(&self.dir)
                .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
                .output(),
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.pause();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
