//! The management API: HTTP with JSON, on a local address by default, every request
//! authenticated with a bearer token the relay generates into its state directory.
//!
//! Users added here are kept in the store (`store::StoredUser`) and take effect at once, as a
//! reload would apply them; the configuration file's users are shown too (origin `file`) but
//! change only in the file. The document of record is `docs/api/openapi.json`, served at
//! `/v1/openapi.json`; the tests check the server against it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use axum::{
    extract::{FromRequest, Path as UrlPath, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use log::{info, warn};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use subtle::ConstantTimeEq as _;

use crate::{
    config::Spec,
    socks5::{
        server::{Server, UserView},
        users::Origin,
    },
    store::{StoredUser, Writer},
};

/// Where the API listens unless `--api` says otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1090);
/// The token's file in the state directory (0600).
pub const TOKEN_FILE: &str = "api-token";
/// The running relay's API address, for `relay users` (written at start).
pub const URL_FILE: &str = "api-url";
/// The OpenAPI document, served as it is in the repository.
pub const OPENAPI: &str = include_str!("../../docs/api/openapi.json");
/// The largest request body read (a user's settings are a few hundred bytes).
pub const BODY_LIMIT: usize = 16 * 1024;

/// The API's bearer token, made (64 hex digits from the kernel's random bytes, readable by
/// root only) at the first call.
pub fn token(state: &Path) -> anyhow::Result<String> {
    let path = state.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is damaged; remove it for a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let t = crate::socks5::users::random_hex::<32>()?;
    crate::system::write_private(&path, &t)?;
    Ok(t)
}

/// A reload request to the main loop, answered with what happened.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), String>>;

/// What the handlers share.
pub struct Api {
    pub token: String,
    /// `None`: this relay serves no SOCKS5, so it has no users.
    pub socks: Option<Socks>,
    pub reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    pub version: &'static str,
    /// Unix seconds of the start.
    pub started: i64,
}

/// The SOCKS5 side of the API: the server, the store and where clients connect.
pub struct Socks {
    pub server: Arc<Server>,
    pub store: Writer,
    /// Orders changes one at a time.
    pub changing: tokio::sync::Mutex<()>,
    /// The address share links name.
    pub at: SocketAddr,
    /// With a fleet, users live in its database: changes go there first.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(status, msg.into())
    }
    fn not_found(name: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("no user {name:?}"))
    }
    fn internal(e: anyhow::Error) -> ApiError {
        warn!("API: {e:#}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// A JSON body whose rejections (bad JSON, unknown fields, wrong content type, too large) are
/// answered as JSON errors too.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<Value>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(object(v)?)),
            Err(r) => Err(ApiError::new(r.status(), r.body_text())),
        }
    }
}

/// `v` read as `T` if it is a JSON object (serde would also read a struct from an array of
/// its fields in order, which no client means).
fn object<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a JSON object is expected",
        ));
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// The `{name}` of a path; a path that does not decode (bad UTF-8) is a JSON 400.
pub struct Name(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match UrlPath::<String>::from_request_parts(parts, state).await {
            Ok(UrlPath(n)) => Ok(Name(n)),
            Err(r) => Err(ApiError::new(StatusCode::BAD_REQUEST, r.body_text())),
        }
    }
}

/// A user as the API shows it.
#[derive(Serialize)]
pub struct UserOut {
    pub name: String,
    pub origin: Origin,
    pub settings: Spec,
    pub usage: crate::stats::UserUsage,
    /// Client addresses of its live sessions.
    pub clients: Vec<String>,
}

impl UserOut {
    fn new(v: UserView, now: i64) -> UserOut {
        UserOut {
            name: v.row.user.clone(),
            origin: v.origin,
            settings: v.spec,
            usage: crate::stats::UserUsage::of(&v.row, now),
            clients: v.clients.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Links a user hands to a client.
#[derive(Serialize)]
pub struct Links {
    pub tg: String,
    pub tme: String,
    pub url: String,
}

/// A new user or a new password: shown once.
#[derive(Serialize)]
struct Credentials {
    user: UserOut,
    password: String,
    links: Links,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    settings: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPassword {
    #[serde(default)]
    password: Option<String>,
}

/// Connections the API holds at once; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send a request's headers, also while a connection is idle
/// between requests: a connection that says nothing does not hold a slot.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the API until `stop` turns true (before a handover: the successor serves the
/// users from then on). HTTP/1 through hyper with a header deadline and a cap on connections
/// (axum's own `serve` has neither).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(api);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("management API: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async {
                // The guard `wait_for` returns is not kept (it may not cross threads).
                let _ = stop.wait_for(|s| *s).await.map(|_| ());
            } => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            log::debug!("management API: {MAX_CONNECTIONS} connections open; one more closed");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("management API connection: {e}");
            }
        });
    }
}

/// The routes, every one behind the token.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/reload", post(reload))
        .route("/v1/users", get(list).post(add))
        .route("/v1/users/{name}", get(show).patch(change).delete(remove))
        .route("/v1/users/{name}/password", post(password))
        .route("/v1/users/{name}/reset-usage", post(reset_usage))
        .route("/v1/users/{name}/links", get(links))
        .route("/v1/fleet", get(fleet))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(Arc::clone(&api), authorize))
        .with_state(api)
}

/// Lets a request through only with `Authorization: Bearer <token>`.
async fn authorize(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if bool::from(t.as_bytes().ct_eq(api.token.as_bytes())) => next.run(req).await,
        _ => {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a bearer token is needed (the relay's state directory has it: api-token)",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

fn unprocessable(e: anyhow::Error) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))
}

fn unreachable_fleet(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the fleet's database: {e:#} (users cannot change until it is reachable)"),
    )
}

fn socks(api: &Api) -> Result<&Socks, ApiError> {
    api.socks.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this relay serves no SOCKS5 ([socks5] is not configured), so it has no users",
        )
    })
}

/// Runs blocking work (the store, Argon2, reloads) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("task failed: {e}")))?
}

async fn status(State(api): State<Arc<Api>>) -> Json<Value> {
    let users = api.socks.as_ref().map(|s| s.server.users_view().len());
    Json(json!({
        "version": api.version,
        "started": crate::limits::format_time(api.started),
        "socks5": api.socks.as_ref().map(|s| s.server.listen_addr().to_string()),
        "users": users,
    }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn reload(State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    api.reload
        .send(tx)
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the relay is stopping"))?;
    match rx.await {
        Ok(Ok(())) => Ok(Json(json!({ "reloaded": true }))),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the relay is stopping",
        )),
    }
}

fn view(s: &Socks, name: &str) -> Result<UserOut, ApiError> {
    let now = crate::system::unix_now();
    s.server
        .users_view()
        .into_iter()
        .find(|v| v.row.user == name)
        .map(|v| UserOut::new(v, now))
        .ok_or_else(|| ApiError::not_found(name))
}

async fn list(State(api): State<Arc<Api>>) -> Result<Json<Vec<UserOut>>, ApiError> {
    let s = socks(&api)?;
    let now = crate::system::unix_now();
    Ok(Json(
        s.server
            .users_view()
            .into_iter()
            .map(|v| UserOut::new(v, now))
            .collect(),
    ))
}

async fn show(State(api): State<Arc<Api>>, Name(name): Name) -> Result<Json<UserOut>, ApiError> {
    Ok(Json(view(socks(&api)?, &name)?))
}

/// The store's users (as they are in the store now) with `change` made, kept in the store and
/// applied to the server; on a refusal neither changes.
async fn apply<T: Send + 'static>(
    api: &Arc<Api>,
    change: impl FnOnce(&Socks, &mut Vec<StoredUser>) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let s = socks(api)?;
    let _one_at_a_time = s.changing.lock().await;
    if let Some(fleet) = &s.fleet {
        // The handlers check the user they change; others are as the fleet has them.
        let r = fleet
            .change_users(&s.server, |users| change(s, users))
            .await;
        return match r {
            Ok(r) => r,
            Err(e) => Err(unreachable_fleet(e)),
        };
    }
    let api = Arc::clone(api);
    blocking(move || {
        let s = socks(&api)?;
        // No reload reads the store and applies it meanwhile.
        let _users = s.server.users_lock();
        let before = s
            .store
            .change(|st| st.users())
            .map_err(ApiError::internal)?;
        let mut after = before.clone();
        let out = change(s, &mut after)?;
        // The handlers check the user they change; one the store has that this version
        // cannot take (written by another) is left out, as at a start.
        let users = crate::store::usable_users(&after);
        // The store first: a change the server took but the store lost would be undone by
        // the next restart.
        s.store
            .change(move |st| st.replace_users(&after))
            .map_err(ApiError::internal)?;
        if let Err(e) = s.server.set_stored_users(users) {
            let _ = s.store.change(move |st| st.replace_users(&before));
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{e:#}")));
        }
        Ok(out)
    })
    .await
}

fn credentials(s: &Socks, name: &str, password: String) -> Result<Credentials, ApiError> {
    Ok(Credentials {
        user: view(s, name)?,
        links: crate::quickstart::share_links(s.at, name, &password),
        password,
    })
}

async fn add(
    State(api): State<Arc<Api>>,
    Body(new): Body<NewUser>,
) -> Result<(StatusCode, Json<Credentials>), ApiError> {
    let s = socks(&api)?;
    let spec: Spec = match new.settings {
        Some(v) => object(v)?,
        None => Spec::default(),
    };
    let (name, given) = (new.name.clone(), new.password);
    let now = crate::system::unix_now();
    let user =
        blocking(move || StoredUser::create(&new.name, given, spec, now).map_err(unprocessable))
            .await?;
    let password = user.password.0.clone();
    apply(&api, move |s, users| {
        let exists = users.iter().any(|u| u.name == user.name)
            || s.server
                .users_view()
                .iter()
                .any(|v| v.row.user == user.name);
        if exists {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("user {:?} exists", user.name),
            ));
        }
        users.push(user);
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(())
    })
    .await?;
    info!("API: added user {name:?}");
    Ok((StatusCode::CREATED, Json(credentials(s, &name, password)?)))
}

/// The stored user `name`, or why it cannot be changed here.
fn stored_mut<'a>(
    users: &'a mut [StoredUser],
    s: &Socks,
    name: &str,
) -> Result<&'a mut StoredUser, ApiError> {
    match users.iter_mut().find(|u| u.name == name) {
        Some(u) => Ok(u),
        None if s.server.users_view().iter().any(|v| v.row.user == name) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("user {name:?} is in the configuration file: change it there and reload"),
        )),
        None => Err(ApiError::not_found(name)),
    }
}

async fn change(
    State(api): State<Arc<Api>>,
    Name(name): Name,
    Body(patch): Body<serde_json::Map<String, Value>>,
) -> Result<Json<UserOut>, ApiError> {
    let s = socks(&api)?;
    let n = name.clone();
    apply(&api, move |s, users| {
        let u = stored_mut(users, s, &n)?;
        u.patch(patch, crate::system::unix_now())
            .map_err(unprocessable)
    })
    .await?;
    info!("API: changed user {name:?}");
    Ok(Json(view(s, &name)?))
}

async fn remove(State(api): State<Arc<Api>>, Name(name): Name) -> Result<StatusCode, ApiError> {
    let n = name.clone();
    apply(&api, move |s, users| {
        stored_mut(users, s, &n)?;
        users.retain(|u| u.name != n);
        Ok(())
    })
    .await?;
    // Its usage goes with it: a user added again under the name starts from zero (a fleet's
    // database dropped it with the user, in the same transaction).
    forget_usage(&api, &name, false).await?;
    info!("API: deleted user {name:?}");
    Ok(StatusCode::NO_CONTENT)
}

/// Starts `name`'s usage from zero: in the fleet's database (if `fleet_too`), in the store,
/// in the ledger.
async fn forget_usage(api: &Arc<Api>, name: &str, fleet_too: bool) -> Result<(), ApiError> {
    if let Some(f) = socks(api)?.fleet.as_ref().filter(|_| fleet_too) {
        f.reset_usage(name).await.map_err(unreachable_fleet)?;
    }
    let api = Arc::clone(api);
    let name = name.to_owned();
    blocking(move || {
        let s = socks(&api)?;
        let store = s.store.clone();
        let n = name.clone();
        s.server
            .reset_usage(&name, move || store.change(move |st| st.reset_usage(&n)))
            .map_err(ApiError::internal)?;
        Ok(())
    })
    .await
}

async fn password(
    State(api): State<Arc<Api>>,
    Name(name): Name,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Credentials>, ApiError> {
    let s = socks(&api)?;
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    // The body is optional: none (or empty) generates a password.
    let given = match body.is_empty() {
        true => None,
        false => {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            object::<NewPassword>(v)?.password
        }
    };
    let (secret, hash) =
        blocking(move || crate::store::hashed_password(given).map_err(unprocessable)).await?;
    let (n, password) = (name.clone(), secret.0.clone());
    apply(&api, move |s, users| {
        let u = stored_mut(users, s, &n)?;
        u.password = secret;
        u.password_hash = hash;
        u.updated = crate::system::unix_now();
        Ok(())
    })
    .await?;
    info!("API: new password for user {name:?}; its sessions were ended");
    Ok(Json(credentials(s, &name, password)?))
}

async fn reset_usage(
    State(api): State<Arc<Api>>,
    Name(name): Name,
) -> Result<Json<UserOut>, ApiError> {
    let s = socks(&api)?;
    view(s, &name)?;
    forget_usage(&api, &name, true).await?;
    Ok(Json(view(s, &name)?))
}

async fn links(
    State(api): State<Arc<Api>>,
    Name(name): Name,
) -> Result<Json<Credentials>, ApiError> {
    let s = socks(&api)?;
    let store = s.store.clone();
    let stored =
        blocking(move || store.change(|st| st.users()).map_err(ApiError::internal)).await?;
    match stored.into_iter().find(|u| u.name == name) {
        Some(u) => Ok(Json(credentials(s, &name, u.password.0)?)),
        None => {
            view(s, &name)?;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "user {name:?} is in the configuration file, which keeps only its password's \
                     hash: no link can be made"
                ),
            ))
        }
    }
}

async fn fleet(State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let f = api
        .socks
        .as_ref()
        .and_then(|s| s.fleet.as_ref())
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "this relay is in no fleet"))?;
    let nodes = f.nodes().await.map_err(unreachable_fleet)?;
    Ok(Json(json!({
        "name": f.cfg.name,
        "backlog_bytes": f.backlog(),
        "relays": nodes,
    })))
}

/// Where the running relay's API is (written at start for `relay users`).
pub fn url_file(state: &Path) -> PathBuf {
    state.join(URL_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_made_once_and_private() {
        let dir = std::env::temp_dir().join(format!("relay-api-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = token(&dir).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(token(&dir).unwrap(), t);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_document_is_json_and_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/status",
            "/v1/openapi.json",
            "/v1/reload",
            "/v1/users",
            "/v1/users/{name}",
            "/v1/users/{name}/password",
            "/v1/users/{name}/reset-usage",
            "/v1/users/{name}/links",
            "/v1/fleet",
        ] {
            assert!(paths.contains_key(p), "{p} is not in docs/api/openapi.json");
        }
        assert_eq!(
            paths.len(),
            9,
            "a route in the document that the server lacks"
        );
    }
}
