//! `relay users ...`: lists and changes the SOCKS5 users through the running relay's
//! management API, or in the store directly when no relay answers there (the next start, or a
//! reload, takes the change up).

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context as _};
use serde_json::{json, Map, Value};

use crate::{
    config::Spec,
    store::{Row, Store, StoredUser},
};

#[derive(clap::Subcommand)]
pub enum Action {
    /// List the users with their usage, limits and live sessions (the default).
    List,
    /// Add a user; its password (generated unless given) is printed once, with its links.
    Add {
        name: String,
        /// The password [default: 20 random letters and digits].
        #[arg(long)]
        password: Option<String>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Change a user's settings (`none` removes one); `--new-password` replaces its
    /// password (its sessions end) and prints the new one.
    Set {
        name: String,
        #[command(flatten)]
        settings: Settings,
        #[arg(long)]
        new_password: bool,
    },
    /// Delete a user: its sessions end at once, its usage is forgotten.
    Del { name: String },
    /// Print a user's links (Telegram, socks5h://) and QR code.
    Link { name: String },
    /// Start a user's usage from zero (a used-up quota is whole again).
    Reset { name: String },
}

/// A user's settings on the command line: the names and forms of `[[socks5.users]]`.
#[derive(clap::Args, Default)]
pub struct Settings {
    /// Bytes per period, both directions (`50GB`, `500MiB`), or `none`.
    #[arg(long, value_name = "SIZE|none")]
    quota: Option<String>,
    /// `never`, `daily`, `monthly`, `monthly:DAY` (UTC), or `none`.
    #[arg(long, value_name = "PERIOD|none")]
    quota_period: Option<String>,
    /// RFC 3339 time or a date (UTC midnight) after which the user is refused, or `none`.
    #[arg(long, value_name = "TIME|none")]
    expires: Option<String>,
    /// Bytes per second each way (`2MB`), or `none`.
    #[arg(long, value_name = "SIZE|none")]
    rate: Option<String>,
    /// Bytes above the rate at once, or `none` (a tenth of a second's).
    #[arg(long, value_name = "SIZE|none")]
    burst: Option<String>,
    /// Distinct client addresses at once, or `none`.
    #[arg(long, value_name = "N|none")]
    max_devices: Option<String>,
    /// CONNECTs at once, or `none` (256).
    #[arg(long, value_name = "N|none")]
    max_connections: Option<String>,
    /// UDP associations at once, or `none` (the default).
    #[arg(long, value_name = "N|none")]
    max_associations: Option<String>,
    /// Let the user in again.
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Refuse the user (its sessions end) without deleting it.
    #[arg(long)]
    disable: bool,
}

impl Settings {
    /// The settings as a JSON merge patch: a value for each given, `null` for `none`.
    pub fn patch(&self) -> anyhow::Result<Map<String, Value>> {
        let mut out = Map::new();
        let mut put = |key: &str, v: &Option<String>, parse: fn(&str) -> anyhow::Result<Value>| {
            if let Some(v) = v {
                let value = match v.as_str() {
                    "none" => Value::Null,
                    v => parse(v).with_context(|| format!("--{}", key.replace('_', "-")))?,
                };
                out.insert(key.to_owned(), value);
            }
            anyhow::Ok(())
        };
        let size = |v: &str| Ok(json!(crate::limits::parse_bytes(v)?));
        let count = |v: &str| {
            Ok(json!(v.parse::<u32>().map_err(|_| anyhow::anyhow!(
                "{v:?} is not a whole number"
            ))?))
        };
        let text = |v: &str| Ok(json!(v));
        put("quota", &self.quota, size)?;
        put("quota_period", &self.quota_period, text)?;
        put("expires", &self.expires, text)?;
        put("rate", &self.rate, size)?;
        put("burst", &self.burst, size)?;
        put("max_devices", &self.max_devices, count)?;
        put("max_connections", &self.max_connections, count)?;
        put("max_associations", &self.max_associations, count)?;
        if self.enable || self.disable {
            out.insert("enabled".into(), json!(self.enable));
        }
        Ok(out)
    }
}

/// What the running relay wrote about its API at start.
struct Running {
    url: String,
    token: String,
}

/// Runs `action` against the relay whose state directory is `dir`.
pub fn run(dir: &Path, action: Action, json: bool) -> anyhow::Result<()> {
    let about: Option<Value> = std::fs::read(crate::api::url_file(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let at: Option<SocketAddr> = about
        .as_ref()
        .and_then(|a| a["socks5"].as_str())
        .and_then(|a| a.parse().ok());
    let running = about
        .as_ref()
        .and_then(|a| a["url"].as_str())
        .map(|url| -> anyhow::Result<Running> {
            let token = std::fs::read_to_string(dir.join(crate::api::TOKEN_FILE))
                .with_context(|| format!("reading the API token in {}", dir.display()))?;
            Ok(Running {
                url: url.to_owned(),
                token: token.trim().to_owned(),
            })
        })
        .transpose()?;
    let out = match running {
        Some(r) => match with_retries(&r, &action) {
            Err(Fallback::NotRunning(e)) => {
                eprintln!(
                    "relay: no relay answers at {} ({e}): changing the store in {} directly; a \
                     running relay takes it up at its next reload (SIGHUP) or start",
                    r.url,
                    dir.display()
                );
                direct(dir, &action)?
            }
            Err(Fallback::Failed(e)) => return Err(e),
            Ok(v) => v,
        },
        None => direct(dir, &action)?,
    };
    print(&action, &out, at, json)
}

/// [`via_api`], tried again for a few seconds while nothing answers: the relay wrote its
/// address, so it runs, or is handing over to a successor that binds it in a moment.
fn with_retries(r: &Running, action: &Action) -> Result<Value, Fallback> {
    let start = std::time::Instant::now();
    loop {
        match via_api(r, action) {
            Err(Fallback::NotRunning(_)) if start.elapsed() < std::time::Duration::from_secs(3) => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

enum Fallback {
    NotRunning(String),
    Failed(anyhow::Error),
}

/// One API call: the JSON answer, or the API's error as one line.
fn call(r: &Running, method: &str, path: &str, body: Option<Value>) -> Result<Value, Fallback> {
    let req = ureq::request(method, &format!("{}{path}", r.url))
        .set("Authorization", &format!("Bearer {}", r.token))
        .timeout(std::time::Duration::from_secs(30));
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match resp {
        Ok(resp) if resp.status() == 204 => Ok(Value::Null),
        Ok(resp) => resp
            .into_json()
            .map_err(|e| Fallback::Failed(anyhow::anyhow!("the API's answer: {e}"))),
        // Another relay's API on the address this one had (its token is not ours).
        Err(ureq::Error::Status(401, _)) => Err(Fallback::NotRunning(
            "the API there does not take this relay's token".into(),
        )),
        Err(ureq::Error::Status(code, resp)) => {
            let msg = resp
                .into_json::<Value>()
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("HTTP {code}"));
            Err(Fallback::Failed(anyhow::anyhow!("{msg}")))
        }
        // Nothing listens there: no relay runs (or not with its API).
        Err(e) if e.kind() == ureq::ErrorKind::ConnectionFailed => {
            Err(Fallback::NotRunning(e.to_string()))
        }
        // Anything else (a timeout after the request went out) may have changed the users:
        // never also change the store.
        Err(e) => Err(Fallback::Failed(anyhow::anyhow!(
            "{e}; the relay may or may not have made the change: `relay users` shows"
        ))),
    }
}

fn enc(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn via_api(r: &Running, action: &Action) -> Result<Value, Fallback> {
    let failed = |e: anyhow::Error| Fallback::Failed(e);
    match action {
        Action::List => call(r, "GET", "/v1/users", None),
        Action::Add {
            name,
            password,
            settings,
        } => {
            let mut s = settings.patch().map_err(failed)?;
            s.retain(|_, v| !v.is_null());
            let mut body = json!({ "name": name, "settings": s });
            if let Some(p) = password {
                body["password"] = json!(p);
            }
            call(r, "POST", "/v1/users", Some(body))
        }
        Action::Set {
            name,
            settings,
            new_password,
        } => {
            let patch = settings.patch().map_err(failed)?;
            if patch.is_empty() && !new_password {
                return Err(failed(anyhow::anyhow!(
                    "nothing to change: give a setting or --new-password"
                )));
            }
            let mut out = Value::Null;
            if !patch.is_empty() {
                let path = format!("/v1/users/{}", enc(name));
                out = call(r, "PATCH", &path, Some(Value::Object(patch)))?;
            }
            if *new_password {
                let path = format!("/v1/users/{}/password", enc(name));
                out = call(r, "POST", &path, None)?;
            }
            Ok(out)
        }
        Action::Del { name } => call(r, "DELETE", &format!("/v1/users/{}", enc(name)), None),
        Action::Link { name } => call(r, "GET", &format!("/v1/users/{}/links", enc(name)), None),
        Action::Reset { name } => call(
            r,
            "POST",
            &format!("/v1/users/{}/reset-usage", enc(name)),
            None,
        ),
    }
}

/// The action on the store itself (no relay answers): the same checks as the API's.
fn direct(dir: &Path, action: &Action) -> anyhow::Result<Value> {
    if !dir.join(crate::store::FILE).exists() && !matches!(action, Action::Add { .. }) {
        bail!(
            "no store in {} (has a relay with [socks5] run there?)",
            dir.display()
        );
    }
    let mut store = Store::open(dir)?;
    if !matches!(action, Action::List) && store.fleet_book()?.is_some() {
        bail!(
            "this relay is in a fleet: its users live in the fleet's database; change them \
             through a running relay's API (`relay users` on a relay that runs) or in the database"
        );
    }
    let users = store.users()?;
    let find =
        |name: &str| -> anyhow::Result<StoredUser> {
            users.iter().find(|u| u.name == name).cloned().with_context(|| {
            format!("no user {name:?} in the store (users of the configuration file change there)")
        })
        };
    let now = crate::system::unix_now();
    match action {
        Action::List => {
            let rows = store.load()?;
            let mut out = Vec::new();
            for u in &users {
                let row = rows.get(&u.name).cloned().unwrap_or_else(|| Row {
                    user: u.name.clone(),
                    period: u.spec.quota_period.clone().unwrap_or("never".into()),
                    enabled: u.spec.enabled,
                    ..Row::default()
                });
                out.push(
                    json!({ "name": u.name, "origin": "api", "usage": usage_json(&row, now) }),
                );
            }
            for (name, row) in &rows {
                if !users.iter().any(|u| &u.name == name) {
                    out.push(
                        json!({ "name": name, "origin": "file", "usage": usage_json(row, now) }),
                    );
                }
            }
            out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            Ok(Value::Array(out))
        }
        Action::Add {
            name,
            password,
            settings,
        } => {
            if users.iter().any(|u| &u.name == name) {
                bail!("user {name:?} exists");
            }
            let mut patch = settings.patch()?;
            patch.retain(|_, v| !v.is_null());
            let spec: Spec = serde_json::from_value(Value::Object(patch))?;
            let user = StoredUser::create(name, password.clone(), spec, now)?;
            store.put_user(&user)?;
            Ok(json!({ "user": { "name": name }, "password": user.password.0 }))
        }
        Action::Set {
            name,
            settings,
            new_password,
        } => {
            let mut u = find(name)?;
            u.patch(settings.patch()?, now)?;
            if *new_password {
                (u.password, u.password_hash) = crate::store::hashed_password(None)?;
            }
            store.put_user(&u)?;
            Ok(match new_password {
                true => json!({ "user": { "name": name }, "password": u.password.0 }),
                false => json!({ "name": name, "settings": u.spec }),
            })
        }
        Action::Del { name } => {
            find(name)?;
            store.delete_user(name)?;
            Ok(Value::Null)
        }
        Action::Link { name } => Ok(json!({ "password": find(name)?.password.0 })),
        Action::Reset { name } => {
            store.reset_usage(name)?;
            Ok(json!({ "name": name }))
        }
    }
}

fn usage_json(row: &Row, now: i64) -> Value {
    serde_json::to_value(crate::stats::UserUsage::of(row, now)).unwrap_or(Value::Null)
}

/// Prints the answer: JSON as it is, or for people.
fn print(action: &Action, out: &Value, at: Option<SocketAddr>, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    let share = |name: &str, password: &str| -> anyhow::Result<String> {
        Ok(match at {
            Some(at) => crate::quickstart::share_text(at, name, password)?,
            None => "(no links: the relay has not written its SOCKS5 address yet; start it)\n"
                .to_owned(),
        })
    };
    match action {
        Action::List => {
            let users = out
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|u| serde_json::from_value(u["usage"].clone()).ok())
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", crate::stats::UsersReport { users }.table());
        }
        Action::Add { name, .. } | Action::Set { name, .. } if out["password"].is_string() => {
            let password = out["password"].as_str().unwrap_or_default();
            let what = match action {
                Action::Add { .. } => "added",
                _ => "has a new password",
            };
            println!("user {name:?} {what}; password: {password}\n");
            print!("{}", share(name, password)?);
        }
        Action::Set { name, .. } => println!("user {name:?} changed"),
        Action::Add { name, .. } => println!("user {name:?} added"),
        Action::Del { name } => println!("user {name:?} deleted; its sessions ended"),
        Action::Link { name } => {
            let password = out["password"]
                .as_str()
                .context("the answer has no password")?;
            print!("{}", share(name, password)?);
        }
        Action::Reset { name } => println!("usage of {name:?} reset to zero"),
    }
    Ok(())
}
