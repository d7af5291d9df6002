//! The SOCKS5 server's I/O: accepting, driving the handshake state machine, CONNECT relaying
//! and UDP ASSOCIATE relaying. Decisions live in `handshake`, `users` and `policy`.
//!
//! Choices where RFC 1928 is silent follow dante: a UDP association accepts datagrams only
//! from the control connection's client address (and, once seen or if the request named it,
//! only from that port), relays replies only from destinations the client has sent to, drops
//! fragments (FRAG != 0), and ends when the control connection closes.
//!
//! What strangers can hold is bounded: a handshake has one deadline for all of it
//! (`handshake_timeout`), at most `max_handshakes` run at once and at most
//! `max_handshakes_per_source` / `max_connections_per_source` per source (`gate`), password
//! checks run about one per core (`auth`), and every refusal is counted and summarised in the
//! log every few seconds instead of one line per attempt.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use log::{debug, info, warn};
use relay_common::socks5::{self as wire, reply, Addr};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{watch, Semaphore},
    time::{timeout, timeout_at, Instant},
};

use super::{
    auth::{Verdict, Verifier},
    gate::{Refusal, Refusals, SourceGuard, Sources},
    handshake::{reply_bytes, Dest, Event, Handshake},
    splice::{Carried, Splicer},
    users::Users,
};
use crate::{
    config::Socks5Config,
    datapath::{Datapath, Endpoints},
    handover::{AssociateState, ConnectState, Item},
    idle::idle,
    limits::{Block, Budget, Ledger},
    nexthop::{Hops, NextHops},
    policy::Policy,
    sessions::PortPool,
    udp,
};

/// What one user did (index 0 is everyone without authentication, and what happened before a
/// user was known: unknown users' failed logins and refused handshakes).
#[derive(Default)]
pub struct Account {
    pub name: String,
    /// CONNECT bytes: client to destination, destination to client.
    pub tcp_bytes: [AtomicU64; 2],
    /// UDP ASSOCIATE datagrams and payload bytes, each way.
    pub udp_packets: [AtomicU64; 2],
    pub udp_bytes: [AtomicU64; 2],
    pub connections: AtomicU64,
    pub associations: AtomicU64,
    pub active_connections: AtomicU64,
    pub active_associations: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Requests refused by the destination policy or a limit (index 0: handshakes refused).
    pub refused: AtomicU64,
    /// UDP datagrams dropped: malformed, fragmented, refused, unsolicited.
    pub udp_dropped: AtomicU64,
    /// What XDP relayed for this user's ended associations.
    pub udp_xdp_packets: [AtomicU64; 2],
    pub udp_xdp_bytes: [AtomicU64; 2],
    /// Whether the running configuration has this user (a reload may remove it).
    pub configured: AtomicBool,
    /// Fast-path records the user's associations hold now.
    pub fast_flows: AtomicU64,
    /// Destinations relayed by the controller because the user held its share of the
    /// fast-path table.
    pub fast_path_refused: AtomicU64,
    /// The user's limits and usage (`None` for the no-auth pseudo-user before it is set up).
    pub ledger: Mutex<Option<Ledger>>,
    /// What the controller's own paths may still spend until the next limits tick.
    pub spend: Spend,
    /// Why the user may not use the relay now; its sessions end when this becomes `Some`.
    pub blocked: Blocked,
    /// Client addresses of the user's live sessions, with how many each holds (devices).
    devices: Mutex<HashMap<IpAddr, u32>>,
    /// Requests refused because the user is blocked or holds `max_devices` addresses.
    pub limit_refused: AtomicU64,
    /// UDP datagrams the controller dropped over the user's rate or quota.
    pub over_limit: AtomicU64,
    /// The lease last written to `USER_LIMITS`.
    lease: Mutex<Option<relay_common::limits::UserLimit>>,
    /// Record ids of the user's live fast-path flows: with `udp_xdp_bytes` (ended flows),
    /// what XDP carried for a user the kernel does not count itself (no quota, no rate).
    /// Changed together with `udp_xdp_bytes`, under this lock.
    flows: Mutex<HashSet<u32>>,
}

/// The user's current block state, watched by its sessions.
pub struct Blocked(watch::Sender<Option<Block>>);

impl Default for Blocked {
    fn default() -> Blocked {
        Blocked(watch::channel(None).0)
    }
}

impl Blocked {
    pub fn now(&self) -> Option<Block> {
        *self.0.borrow()
    }
}

/// Bytes the controller's paths (splice, its own UDP relaying) may move for a user until the
/// next limits tick: a quota budget and a rate budget per direction, refilled by the tick.
pub struct Spend {
    quota: AtomicI64,
    rate: [AtomicI64; 2],
    tick: tokio::sync::Notify,
}

impl Default for Spend {
    fn default() -> Spend {
        Spend {
            quota: AtomicI64::new(i64::MAX),
            rate: [AtomicI64::new(i64::MAX), AtomicI64::new(i64::MAX)],
            tick: tokio::sync::Notify::new(),
        }
    }
}

/// Takes up to `want` from `a` (nothing if it is spent): what was taken.
fn take_up_to(a: &AtomicI64, want: i64) -> i64 {
    match a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        (v > 0).then(|| v - v.min(want))
    }) {
        Ok(v) => v.min(want),
        Err(_) => 0,
    }
}

impl Spend {
    fn set(&self, b: Budget) {
        self.quota.store(b.quota, Ordering::Relaxed);
        for (r, v) in self.rate.iter().zip(b.rate) {
            r.store(v, Ordering::Relaxed);
        }
        self.tick.notify_waiters();
    }

    /// Takes up to `want` bytes in direction `d` from both budgets.
    fn take(&self, d: usize, want: usize) -> usize {
        let want = want.min(i64::MAX as usize) as i64;
        let r = take_up_to(&self.rate[d], want);
        let q = take_up_to(&self.quota, r);
        if q < r {
            self.rate[d].fetch_add(r - q, Ordering::Relaxed);
        }
        q as usize
    }

    /// Gives back what was taken and not used.
    fn give_back(&self, d: usize, n: usize) {
        let n = n.min(i64::MAX as usize) as i64;
        // Budgets of an unlimited user stay at the top.
        for a in [&self.rate[d], &self.quota] {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(n))
            });
        }
    }

    /// Takes between 1 and `want` bytes in direction `d`, waiting for the next tick while the
    /// budgets are spent (this paces a CONNECT to the user's rate).
    async fn wait(&self, d: usize, want: usize) -> usize {
        loop {
            let tick = self.tick.notified();
            tokio::pin!(tick);
            tick.as_mut().enable();
            let n = self.take(d, want);
            if n > 0 {
                return n;
            }
            tick.await;
        }
    }
}

/// Holds one of a user's device slots (its client address) while a session lives.
struct Device<'a> {
    acct: &'a Account,
    ip: IpAddr,
}

impl Drop for Device<'_> {
    fn drop(&mut self) {
        let mut devices = self.acct.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = devices.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                devices.remove(&self.ip);
            }
        }
    }
}

impl Account {
    /// A device slot for `ip`: refused when the user holds `max` other addresses already.
    fn device(&self, ip: IpAddr, max: Option<u32>) -> Option<Device<'_>> {
        let ip = crate::config::canonical(ip);
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if !devices.contains_key(&ip) && max.is_some_and(|m| devices.len() >= m as usize) {
            return None;
        }
        *devices.entry(ip).or_insert(0) += 1;
        Some(Device { acct: self, ip })
    }

    /// Why a request of this user is refused now, if it is: blocked, or a new address over
    /// the device limit. Otherwise its device slot.
    fn admit(&self, ip: IpAddr) -> Result<Device<'_>, String> {
        let (blocked, max_devices) = {
            let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            match ledger.as_ref() {
                Some(l) => (l.blocked(crate::system::unix_now()), l.limits.max_devices),
                None => (None, None),
            }
        };
        if let Some(b) = blocked.or(self.blocked.now()) {
            return Err(b.name().to_owned());
        }
        self.device(ip, max_devices)
            .ok_or_else(|| format!("holds max_devices ({}) addresses", max_devices.unwrap_or(0)))
    }

    /// What XDP carried for the user, per direction: the kernel's own count (`spent`, read
    /// from `USER_SPENT`) for a metered user, else the user's flows' counters.
    fn kernel_bytes(
        &self,
        metered: bool,
        spent: impl FnOnce() -> [u64; 2],
        dp: &Datapath,
    ) -> [u64; 2] {
        if metered {
            return spent();
        }
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        let live = dp.socks_bytes(flows.iter());
        [0, 1].map(|d| live[d].wrapping_add(self.udp_xdp_bytes[d].load(Ordering::Relaxed)))
    }

    /// The controller's byte counters of the user, per direction (CONNECT and UDP together).
    fn user_bytes(&self) -> [u64; 2] {
        [0, 1].map(|d| {
            self.tcp_bytes[d]
                .load(Ordering::Relaxed)
                .wrapping_add(self.udp_bytes[d].load(Ordering::Relaxed))
        })
    }

    /// Whether bytes of this user are metered (a quota or a rate): they then never take the
    /// kernel CONNECT path, which cannot hold bytes back.
    fn metered(&self) -> bool {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|l| l.limits.meters_bytes())
    }
}

/// The name of account 0: clients without authentication, and what happened before a user
/// was known (failed logins of unknown names, refused handshakes).
pub const NO_AUTH: &str = "(no auth)";

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Destinations (and cached names) one UDP association may have: beyond them its datagrams
/// to new destinations are dropped (counted in `udp_dropped`).
const MAX_DESTINATIONS: usize = 1024;

/// One user holds at most this fraction (1/N) of the fast-path table (`fast_path_flows`).
const FAST_PATH_SHARE: u32 = 4;

/// How often the log summarises refused handshakes.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// TCP keepalive on SOCKS5 sockets: a peer that vanished is noticed about two minutes after
/// its last packet (60 s, then 4 probes 15 s apart), so its descriptors and its place in the
/// user's limits do not stay taken.
fn keepalive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        debug!("SOCKS5: TCP keepalive: {e}");
    }
}

/// A user's (or the no-auth pseudo-user's) right to its sessions.
#[derive(Clone)]
struct Grant {
    account: usize,
    max_connections: u32,
    max_associations: u32,
    /// Set to true when the user is removed or its password changes: its sessions end.
    revoke: Arc<watch::Sender<bool>>,
}

impl Grant {
    fn new(account: usize, max_connections: u32, max_associations: u32) -> Grant {
        Grant {
            account,
            max_connections,
            max_associations,
            revoke: Arc::new(watch::channel(false).0),
        }
    }
}

/// Resolves when `rx`'s user is revoked (or its grant is gone).
async fn revoked(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|r| *r).await;
}

/// What ends a user's live sessions: a reload that removed the user or changed its password
/// (the grant is revoked), or the user becoming blocked (expired, disabled, out of quota).
struct Stop {
    revoked: watch::Receiver<bool>,
    blocked: watch::Receiver<Option<Block>>,
}

impl Stop {
    /// Resolves when the sessions must end, with why.
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            () = revoked(&mut self.revoked) => "the user was removed or changed",
            b = self.blocked.wait_for(Option::is_some) => match b.as_deref() {
                Ok(Some(b)) => b.name(),
                _ => "the user is gone",
            },
        }
    }
}

/// What a reload replaces at once.
struct Current {
    /// The latest settings; those that need a restart are read from `Server::cfg`.
    cfg: Socks5Config,
    users: Arc<Users>,
    grants: HashMap<String, Grant>,
    /// The no-auth pseudo-user, when `allow_no_auth`.
    anonymous: Option<Grant>,
}

/// Accounts by slot of the pinned `USERS` map: a name keeps its slot for the life of the
/// process, across reloads.
struct Accounts {
    list: Vec<Arc<Account>>,
    by_name: HashMap<String, usize>,
}

impl Accounts {
    fn slot(&mut self, name: &str) -> usize {
        if let Some(i) = self.by_name.get(name) {
            return *i;
        }
        self.list.push(Arc::new(Account {
            name: name.to_owned(),
            ..Account::default()
        }));
        let i = self.list.len() - 1;
        self.by_name.insert(name.to_owned(), i);
        i
    }
}

/// The destination policy: as configured (replaced by a reload), with the relay's own
/// addresses (its interfaces', re-read every [`OWN_ADDRESSES_EVERY`], and `public_address`).
struct SharedPolicy {
    configured: RwLock<(Policy, Option<IpAddr>)>,
    current: RwLock<Arc<Policy>>,
}

/// How often the relay's own addresses are read again (an address added or removed while it
/// runs is its own, or no longer, within this).
const OWN_ADDRESSES_EVERY: Duration = Duration::from_secs(2);

impl SharedPolicy {
    fn new(policy: Policy, public: Option<IpAddr>) -> SharedPolicy {
        let p = SharedPolicy {
            configured: RwLock::new((policy, public)),
            current: RwLock::new(Arc::new(Policy::default())),
        };
        p.refresh_own();
        p
    }

    fn check(&self, dest: SocketAddr) -> Result<(), crate::policy::Refused> {
        let p = Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        p.check(dest)
    }

    /// A reload's policy and public address.
    fn set(&self, policy: Policy, public: Option<IpAddr>) {
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) = (policy, public);
        self.refresh_own();
    }

    /// Reads the interfaces' addresses again (getifaddrs: call off the async threads).
    fn refresh_own(&self) {
        let mut p = {
            let c = self.configured.read().unwrap_or_else(|e| e.into_inner());
            let mut p = c.0.clone();
            p.own.extend(c.1);
            p
        };
        p.own.extend(crate::policy::local_addresses());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }
}

/// The SOCKS5 server.
pub struct Server {
    /// The settings it started with (listen address, ports and sizes need a restart).
    cfg: Socks5Config,
    current: RwLock<Arc<Current>>,
    policy: SharedPolicy,
    handshakes: Arc<Semaphore>,
    sources: Arc<Sources>,
    /// Handshakes refused, by reason.
    pub refusals: Arc<Refusals>,
    verifier: Verifier,
    ports: Mutex<PortPool>,
    /// Index 0: unauthenticated; then one per user name ever configured.
    accounts: RwLock<Accounts>,
    /// The kernel maps: the UDP fast path's flows, and the accounts published to `USERS`.
    datapath: Arc<Datapath>,
    /// Next hops for fast-path flows; `None` when XDP does not relay.
    nexthops: Option<Arc<NextHops>>,
    /// The CONNECT kernel path's maps (`None`: every CONNECT is spliced by the controller).
    splicer: Option<Arc<Splicer>>,
    /// Set when handing over to a successor: every task packs up at its next step.
    handing_over: watch::Sender<bool>,
    /// Where the tasks put what they hand over, while handing over.
    handed: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Handed>>>,
    /// Tasks that hold sockets: the accept loop and every client's.
    tasks: Arc<AtomicUsize>,
    /// The embedded store's writer (`None`: usage is not kept across restarts).
    store: Option<crate::store::Writer>,
    /// The rows read from the store at start, for users not set up yet.
    saved: HashMap<String, crate::store::Row>,
    /// Held while usage rows are made and sent to the writer, and while a user's usage is
    /// forgotten: a row made before cannot be written after.
    save_lock: Mutex<()>,
    /// Held by whoever reads the users' sources (the file, the store, the fleet) and applies
    /// them: a reload and a change of users, one at a time, so that neither applies a list
    /// older than the other's.
    users_lock: Mutex<()>,
}

/// A configured user as the management API shows it.
pub struct UserView {
    pub origin: super::users::Origin,
    pub spec: crate::config::Spec,
    /// Usage and status, as written to the store.
    pub row: crate::store::Row,
    /// Client addresses of the user's live sessions.
    pub clients: Vec<IpAddr>,
}

/// How often the users' leases and budgets are renewed while they have live sessions (users
/// without any are looked at every [`IDLE_TICKS`] ticks: expiry and period resets).
pub const LIMITS_TICK: Duration = Duration::from_millis(50);
const IDLE_TICKS: u64 = 20;
/// How often usage is written to the store, in ticks (a crash loses at most this much).
const SAVE_TICKS: u64 = 20;

/// One thing handed over and its descriptors.
pub type Handed = (Item, Vec<OwnedFd>);

/// Counts a task in [`Server::tasks`] while it lives.
struct TaskGuard(Arc<AtomicUsize>);

impl TaskGuard {
    fn new(tasks: &Arc<AtomicUsize>) -> TaskGuard {
        tasks.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(tasks))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands out handed-over descriptors in order, or says one is missing.
fn descriptors(fds: Vec<OwnedFd>) -> impl FnMut() -> anyhow::Result<OwnedFd> {
    let mut fds = fds.into_iter();
    move || {
        fds.next()
            .ok_or_else(|| anyhow::anyhow!("missing descriptor"))
    }
}

/// Resolves once the server hands over (never, if it already did: the caller checks first).
async fn handing_over(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|h| *h).await;
}

enum Outcome {
    Connect(Dest, Vec<u8>),
    Associate(Dest),
}

/// What [`grants`] returns: the grants by user name, the grant of unauthenticated clients
/// (if allowed), and the old grants that must be revoked.
type Granted = (HashMap<String, Grant>, Option<Grant>, Vec<Grant>);

/// The grants of `cfg`'s users, keeping the grant (and so the sessions) of users whose hash
/// did not change; and the old grants that must be revoked.
fn grants(
    cfg: &Socks5Config,
    old: Option<&Current>,
    accounts: &mut Accounts,
) -> anyhow::Result<Granted> {
    let slots = relay_common::session::USER_SLOTS as usize;
    let new_names = cfg
        .users
        .iter()
        .filter(|u| !accounts.by_name.contains_key(&u.name))
        .count();
    if accounts.list.len() + new_names > slots {
        anyhow::bail!(
            "more than {} user names since the relay started (the USERS map's size); restart it",
            slots - 1
        );
    }
    let mut grants = HashMap::new();
    for u in &cfg.users {
        let account = accounts.slot(&u.name);
        let unchanged = old.and_then(|o| {
            let same = o.users.get(&u.name)?.1.password_hash == u.password_hash;
            o.grants.get(&u.name).filter(|_| same)
        });
        let mut grant = Grant::new(account, u.max_connections, u.max_associations);
        if let Some(g) = unchanged {
            grant.revoke = Arc::clone(&g.revoke);
        }
        grants.insert(u.name.clone(), grant);
    }
    let anonymous = cfg.allow_no_auth.then(|| {
        let mut g = Grant::new(0, u32::MAX, u32::MAX);
        if let Some(old) = old.and_then(|o| o.anonymous.as_ref()) {
            g.revoke = Arc::clone(&old.revoke);
        }
        g
    });
    let mut revoked = Vec::new();
    if let Some(o) = old {
        for (name, g) in &o.grants {
            if !grants
                .get(name)
                .is_some_and(|n| Arc::ptr_eq(&n.revoke, &g.revoke))
            {
                revoked.push(g.clone());
            }
        }
        if let (Some(g), None) = (&o.anonymous, &anonymous) {
            revoked.push(g.clone());
        }
    }
    Ok((grants, anonymous, revoked))
}

impl Server {
    pub fn new(
        cfg: Socks5Config,
        policy: Policy,
        datapath: Arc<Datapath>,
        nexthops: Option<Arc<NextHops>>,
        splicer: Option<Arc<Splicer>>,
        store: Option<crate::store::Writer>,
        saved: HashMap<String, crate::store::Row>,
    ) -> anyhow::Result<Arc<Server>> {
        let users = Arc::new(Users::new(cfg.users.clone())?);
        let mut accounts = Accounts {
            list: Vec::new(),
            by_name: HashMap::new(),
        };
        accounts.list.push(Arc::new(Account {
            name: NO_AUTH.into(),
            configured: AtomicBool::new(true),
            ..Account::default()
        }));
        let (grants, anonymous, _) = grants(&cfg, None, &mut accounts)?;
        // Totals go on from what the previous controller published.
        let pinned = datapath.users();
        for a in &accounts.list {
            a.configured.store(true, Ordering::Relaxed);
            let name = relay_common::session::name32(&a.name);
            if let Some(p) = pinned.iter().find(|p| p.name == name) {
                a.continue_from(p);
            }
        }
        let server = Arc::new(Server {
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes as usize)),
            sources: Arc::default(),
            refusals: Arc::default(),
            verifier: Verifier::per_core()?,
            ports: Mutex::new(PortPool::new(cfg.udp_ports)),
            current: RwLock::new(Arc::new(Current {
                cfg: cfg.clone(),
                users,
                grants,
                anonymous,
            })),
            policy: SharedPolicy::new(policy, cfg.public_address),
            accounts: RwLock::new(accounts),
            datapath,
            nexthops,
            splicer,
            cfg,
            handing_over: watch::channel(false).0,
            handed: Mutex::new(None),
            tasks: Arc::default(),
            store,
            saved,
            save_lock: Mutex::new(()),
            users_lock: Mutex::new(()),
        });
        let cfg = server.cfg.clone();
        // The first tick waits for `adopt`: a handed-over association's flows count toward
        // its user's usage from there on.
        server.set_up_limits(&cfg, false);
        Ok(server)
    }

    /// Gives every configured user its limits: a new ledger (taking up the usage the store
    /// had for the name) or new limits for the one it has. Then, if `tick`, one tick, so that
    /// the kernel's leases and who is blocked are right before the next request.
    fn set_up_limits(&self, cfg: &Socks5Config, tick: bool) {
        let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        let limits_of = |name: &str| {
            cfg.users
                .iter()
                .find(|u| u.name == name)
                .map(|u| u.limits.clone())
        };
        for (i, a) in accounts.list.iter().enumerate() {
            let limits = if i == 0 {
                Some(crate::limits::Limits::default())
            } else {
                limits_of(&a.name)
            };
            let Some(limits) = limits else { continue };
            let mut ledger = a.ledger.lock().unwrap_or_else(|e| e.into_inner());
            match ledger.as_mut() {
                Some(l) => l.set_limits(limits),
                None => {
                    let spent = || self.datapath.user_spent(i as u32);
                    let kernel = a.kernel_bytes(limits.meters_bytes(), spent, &self.datapath);
                    let user = a.user_bytes();
                    let saved = (i != 0).then(|| self.saved.get(&a.name)).flatten();
                    *ledger = Some(match saved {
                        // The counters the usage was counted up to are this slot's: what
                        // moved since (while this relay restarted) is counted too.
                        Some(row)
                            if row.slot == i as u32
                                && (row.quota.is_some() || row.rate.is_some())
                                    == limits.meters_bytes() =>
                        {
                            Ledger::new(limits, row.usage, row.kernel_seen, row.user_seen)
                        }
                        Some(row) => Ledger::new(limits, row.usage, kernel, user),
                        None => Ledger::new(limits, Default::default(), kernel, user),
                    });
                }
            }
        }
        drop(accounts);
        if tick {
            self.meter_once(true);
        }
    }

    /// Renews the users' leases and budgets every [`LIMITS_TICK`] and writes usage to the
    /// store every [`SAVE_TICKS`], until the server hands over (which saves one last time).
    pub async fn meter(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LIMITS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let over = self.handing_over.subscribe();
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            if *over.borrow() {
                return;
            }
            n += 1;
            self.meter_once(n.is_multiple_of(IDLE_TICKS));
            if n.is_multiple_of(SAVE_TICKS) {
                self.save_usage();
            }
        }
    }

    /// One limits tick: for each user with live sessions (every user if `all`), counts what
    /// moved, and applies the ledger's decisions: the kernel's lease, the controller's budget,
    /// the block state (which ends the user's sessions).
    fn meter_once(&self, all: bool) {
        let accounts = self.accounts();
        let mono = crate::system::monotonic_ns();
        let now = crate::system::unix_now();
        for (i, a) in accounts.iter().enumerate() {
            let live = a.active_connections.load(Ordering::Relaxed)
                + a.active_associations.load(Ordering::Relaxed);
            if live == 0 && !all {
                continue;
            }
            let tick = {
                let mut ledger = a.ledger.lock().unwrap_or_else(|e| e.into_inner());
                let Some(l) = ledger.as_mut() else { continue };
                let metered = l.limits.meters_bytes();
                let spent = || self.datapath.user_spent(i as u32);
                let kernel = a.kernel_bytes(metered, spent, &self.datapath);
                l.tick(mono, now, kernel, a.user_bytes())
            };
            {
                let mut lease = a.lease.lock().unwrap_or_else(|e| e.into_inner());
                if *lease != Some(tick.kernel) {
                    match self.datapath.set_user_limit(i as u32, &tick.kernel) {
                        Ok(()) => *lease = Some(tick.kernel),
                        Err(e) => debug!("SOCKS5 user {}: {e:#}", a.name),
                    }
                }
            }
            a.spend.set(tick.budget);
            let was = a.blocked.now();
            if was != tick.blocked {
                a.blocked.0.send_replace(tick.blocked);
                match tick.blocked {
                    Some(b) => info!("SOCKS5 user {:?}: {}; its sessions end", a.name, b.name()),
                    None if tick.reset => {
                        info!(
                            "SOCKS5 user {:?}: a new quota period; usage from zero",
                            a.name
                        )
                    }
                    None => info!("SOCKS5 user {:?}: may use the relay again", a.name),
                }
            }
        }
    }

    /// Sends every user's usage and status to the store's writer (a user removed since the
    /// start is written while it has usage: it keeps it if it comes back).
    fn save_usage(&self) {
        let Some(store) = &self.store else { return };
        let _held = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let rows = self
            .rows()
            .into_iter()
            .filter_map(|(row, a)| {
                (a.configured.load(Ordering::Relaxed) || row.usage.total() > 0).then_some(row)
            })
            .collect();
        store.save(rows);
    }

    /// Every user's usage and status (users with a ledger: configured now or since the start),
    /// with its account.
    fn rows(&self) -> Vec<(crate::store::Row, Arc<Account>)> {
        let accounts = self.accounts();
        let now = crate::system::unix_now();
        let mut rows = Vec::new();
        for (i, a) in accounts.iter().enumerate().skip(1) {
            let ledger = a.ledger.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = ledger.as_ref() else { continue };
            let lim = &l.limits;
            rows.push((
                crate::store::Row {
                    user: a.name.clone(),
                    usage: l.usage,
                    slot: i as u32,
                    kernel_seen: l.kernel_seen,
                    user_seen: l.user_seen,
                    quota: lim.quota,
                    period: lim.period.to_string(),
                    expires: lim.expires,
                    rate: lim.rate,
                    max_devices: lim.max_devices,
                    enabled: lim.enabled && a.configured.load(Ordering::Relaxed),
                    blocked: a.blocked.now().map(|b| b.name().to_owned()),
                    connections: a.active_connections.load(Ordering::Relaxed),
                    associations: a.active_associations.load(Ordering::Relaxed),
                    devices: a.devices.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
                    updated: now,
                },
                Arc::clone(a),
            ));
        }
        rows
    }

    /// The configured users with their settings, usage, status and live clients, by name.
    pub fn users_view(&self) -> Vec<UserView> {
        let current = self.current();
        let mut out = Vec::new();
        for (row, a) in self.rows() {
            let configured = a.configured.load(Ordering::Relaxed);
            let Some((_, user)) = current.users.get(&row.user).filter(|_| configured) else {
                continue;
            };
            let mut clients: Vec<IpAddr> = {
                let d = a.devices.lock().unwrap_or_else(|e| e.into_inner());
                d.keys().copied().collect()
            };
            clients.sort();
            out.push(UserView {
                origin: user.origin,
                spec: crate::config::Spec::of(user),
                row,
                clients,
            });
        }
        out.sort_by(|a, b| a.row.user.cmp(&b.row.user));
        out
    }

    /// Calls `f` with each configured user's name and usage (under its ledger's lock): the
    /// fleet counts what moved and sets the fleet's totals.
    pub fn with_usages(&self, mut f: impl FnMut(&str, &mut crate::limits::Usage)) {
        for a in self.accounts().iter().skip(1) {
            if !a.configured.load(Ordering::Relaxed) {
                continue;
            }
            let mut ledger = a.ledger.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = ledger.as_mut() {
                f(&a.name, &mut l.usage);
            }
        }
    }

    /// Serialises reading the users' sources and applying them (see `users_lock`).
    pub fn users_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.users_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The users of the store take effect now: the file's users as last loaded, with
    /// `stored` (whose names the file does not have). Users gone or with a new password have
    /// their sessions ended, as by a reload.
    pub fn set_stored_users(&self, stored: Vec<super::users::User>) -> anyhow::Result<()> {
        let mut cfg = self.current().cfg.clone();
        super::users::merge(&mut cfg.users, stored);
        let policy = self
            .policy
            .configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        self.reload(cfg, policy)
    }

    /// Starts the user's usage from zero now (the quota is whole again), running `then` (the
    /// store's change) before any later usage row is written. Whether the user is known.
    pub fn reset_usage(
        &self,
        name: &str,
        then: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<bool> {
        let account = {
            let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
            accounts
                .by_name
                .get(name)
                .map(|i| Arc::clone(&accounts.list[*i]))
        };
        {
            let _held = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = &account {
                let mut ledger = a.ledger.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(l) = ledger.as_mut() {
                    l.usage.bytes = [0, 0];
                }
            }
            then()?;
        }
        if account.is_some() {
            info!("SOCKS5 user {name:?}: usage reset to zero");
            self.meter_once(true);
            self.save_usage();
        }
        Ok(account.is_some())
    }

    /// Counts what moved since the last tick and writes it to the store, waiting (at most
    /// `wait`) until it is on disk: before handing over or stopping.
    pub fn save_now(&self, wait: Duration) {
        self.meter_once(true);
        self.save_usage();
        if let Some(store) = &self.store {
            if !store.flush(wait) {
                warn!(
                    "store {}: usage not written within {wait:?}",
                    store.path().display()
                );
            }
        }
    }

    /// Puts something a task hands over where [`Server::hand_over`] collects it.
    fn ship(&self, item: Item, fds: Vec<OwnedFd>) {
        if let Some(tx) = self
            .handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send((item, fds));
        }
    }

    /// Hands everything over to a successor: the listener stops accepting, every CONNECT and
    /// association stops at its next step and gives its sockets (and splice pipes, with the
    /// bytes in them) and state; handshakes under way finish first, for at most `wait`. The
    /// accounts are published one last time; nothing here writes a map afterwards. Returns
    /// the items and how many connections were still in their handshake at the deadline
    /// (they close when this process exits).
    pub async fn hand_over(&self, wait: Duration) -> (Vec<Handed>, u64) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        *self.handed.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.handing_over.send_replace(true);
        let deadline = Instant::now() + wait;
        while self.tasks.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unfinished = self.tasks.load(Ordering::SeqCst) as u64;
        *self.handed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut items = Vec::new();
        while let Ok(h) = rx.try_recv() {
            items.push(h);
        }
        self.publish_once();
        tokio::task::block_in_place(|| self.save_now(Duration::from_secs(2)));
        (items, unfinished)
    }

    /// Takes over the CONNECTs and associations a predecessor handed over (users the
    /// configuration no longer has are closed), and removes the SOCKS5 fast-path records no
    /// handed-over association holds.
    pub fn adopt(
        self: &Arc<Self>,
        connects: Vec<(ConnectState, Vec<OwnedFd>)>,
        associations: Vec<(AssociateState, Vec<OwnedFd>)>,
    ) {
        let (mut kept, mut closed) = (0, 0);
        for (state, fds) in connects {
            match self.adopt_connect(state, fds) {
                Ok(()) => kept += 1,
                Err(e) => {
                    debug!("SOCKS5: a handed-over CONNECT closed: {e:#}");
                    closed += 1;
                }
            }
        }
        let mut assocs = 0;
        for (state, fds) in associations {
            match self.adopt_association(state, fds) {
                Ok(()) => assocs += 1,
                Err(e) => {
                    debug!("SOCKS5: a handed-over association closed: {e:#}");
                    closed += 1;
                }
            }
        }
        // The users' first limits tick: leases and blocks before the first request, usage
        // counted from the counters as they are with the handed-over flows in.
        self.meter_once(true);
        let swept = self.datapath.socks_sweep();
        if kept + assocs + closed > 0 {
            info!(
                "SOCKS5: took over {kept} CONNECTs and {assocs} associations ({closed} closed: \
                 their users are gone)"
            );
        }
        if swept > 0 {
            debug!("SOCKS5: removed {swept} fast-path flows of associations that ended");
        }
    }

    /// The grant of a handed-over session's user, as the configuration has it now.
    fn grant_of(&self, user: &Option<String>) -> anyhow::Result<Grant> {
        let cur = self.current();
        match user {
            Some(name) => cur.grants.get(name).cloned(),
            None => cur.anonymous.clone(),
        }
        .ok_or_else(|| anyhow::anyhow!("user {user:?} is gone"))
    }

    /// A handed-over connection of `ip`, counted against its source like any other.
    fn adopted_source(&self, ip: IpAddr) -> anyhow::Result<SourceGuard> {
        let mut source = self.sources.admit(ip, u32::MAX, u32::MAX).map_err(|_| {
            anyhow::anyhow!("per-source bookkeeping refused a handed-over connection")
        })?;
        source.handshake_done();
        Ok(source)
    }

    /// What ends the sessions of `grant`'s user (subscribed now: what happens from here on).
    fn stop_of(&self, grant: &Grant) -> Stop {
        Stop {
            revoked: grant.revoke.subscribe(),
            blocked: self.account(grant.account).blocked.0.subscribe(),
        }
    }

    fn user_of(&self, account: usize) -> Option<String> {
        (account != 0).then(|| self.account(account).name.clone())
    }

    fn adopt_connect(
        self: &Arc<Self>,
        state: ConnectState,
        fds: Vec<OwnedFd>,
    ) -> anyhow::Result<()> {
        let grant = self.grant_of(&state.user)?;
        let mut next = descriptors(fds);
        let client: std::net::TcpStream = crate::handover::socket(next()?)?;
        let upstream: std::net::TcpStream = crate::handover::socket(next()?)?;
        // A CONNECT the kernel carries comes with what the controller counted of it; one that
        // was spliced, with its two pipes (bytes in flight included).
        let (kernel, pipes) = match state.kernel {
            Some(carried) => {
                let splicer = self.splicer.clone().ok_or_else(|| {
                    anyhow::anyhow!("a CONNECT carried in the kernel, but its maps are not here")
                })?;
                (Some((splicer, carried)), None)
            }
            None => {
                let mut pipe = || -> anyhow::Result<Pipe> {
                    Ok(Pipe {
                        read: next()?,
                        write: next()?,
                    })
                };
                (None, Some([pipe()?, pipe()?]))
            }
        };
        let client = TcpStream::from_std(client)?;
        let upstream = TcpStream::from_std(upstream)?;
        let source = self.adopted_source(client.peer_addr()?.ip())?;
        let acct = self.account(grant.account);
        acct.active_connections.fetch_add(1, Ordering::Relaxed);
        let stop = self.stop_of(&grant);
        let server = Arc::clone(self);
        let guard = TaskGuard::new(&self.tasks);
        let ip = client.peer_addr()?.ip();
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = Active(&acct.active_connections);
            let _device = acct.device(ip, None);
            let dest = &state.dest;
            match (kernel, pipes) {
                (Some((splicer, carried)), _) => {
                    server
                        .relay_kernel(
                            &splicer, client, upstream, carried, &acct, &grant, dest, stop,
                        )
                        .await
                }
                (None, Some(pipes)) => {
                    server
                        .relay_connect(client, upstream, pipes, &acct, &grant, dest, stop)
                        .await
                }
                (None, None) => {}
            }
            drop(source);
        });
        Ok(())
    }

    fn adopt_association(
        self: &Arc<Self>,
        state: AssociateState,
        fds: Vec<OwnedFd>,
    ) -> anyhow::Result<()> {
        let grant = self.grant_of(&state.user)?;
        let mut next = descriptors(fds);
        let control: std::net::TcpStream = crate::handover::socket(next()?)?;
        let socket: std::net::UdpSocket = crate::handover::socket(next()?)?;
        let control = TcpStream::from_std(control)?;
        let socket = UdpSocket::from_std(socket)?;
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claim(state.port);
        let acct = self.account(grant.account);
        let mut assoc = Association {
            port: state.port,
            account: grant.account as u16,
            fast: Vec::new(),
            client_ip: state.client_ip,
            client: state.client,
            local: state.local,
            contacted: state.contacted.into_iter().collect(),
            names: state
                .names
                .into_iter()
                .map(|(n, p, a)| ((n, p), a))
                .collect(),
        };
        for id in state.fast {
            let Some(record) = self.datapath.socks_adopt(id) else {
                continue;
            };
            let hops = match &self.nexthops {
                Some(n) => n.adopt(record.nexthop),
                None => Hops::none(),
            };
            acct.fast_flows.fetch_add(1, Ordering::Relaxed);
            acct.flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
            assoc.fast.push(FastFlow { id, _hops: hops });
        }
        let source = self.adopted_source(state.peer.ip())?;
        acct.active_associations.fetch_add(1, Ordering::Relaxed);
        let stop = self.stop_of(&grant);
        let server = Arc::clone(self);
        let guard = TaskGuard::new(&self.tasks);
        let peer = state.peer;
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = Active(&acct.active_associations);
            let _device = acct.device(peer.ip(), None);
            server
                .run_association(control, socket, peer, &acct, assoc, stop)
                .await;
            drop(source);
        });
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    fn current(&self) -> Arc<Current> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every account, by slot.
    fn accounts(&self) -> Vec<Arc<Account>> {
        let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        accounts.list.clone()
    }

    /// The account in slot `i` (every slot handed out exists for the process's life).
    pub fn account(&self, i: usize) -> Arc<Account> {
        let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&accounts.list[i.min(accounts.list.len() - 1)])
    }

    /// Applies a re-read configuration: users, their limits and passwords, `allow_no_auth`,
    /// timeouts, per-source caps and the destination policy, all at once. The CONNECTs and
    /// associations of users that were removed or whose password changed end now. Settings
    /// that need a restart are named in a warning and keep their running values.
    pub fn reload(&self, cfg: Socks5Config, policy: Policy) -> anyhow::Result<()> {
        let old = self.current();
        let users = Arc::new(Users::new(cfg.users.clone())?);
        let restart: Vec<&str> = [
            ("listen", cfg.listen != self.cfg.listen),
            ("udp_ports", cfg.udp_ports != self.cfg.udp_ports),
            (
                "public_address",
                cfg.public_address != self.cfg.public_address,
            ),
            (
                "udp_idle_timeout",
                cfg.udp_idle_timeout != self.cfg.udp_idle_timeout,
            ),
            (
                "max_handshakes",
                cfg.max_handshakes != self.cfg.max_handshakes,
            ),
            (
                "fast_path_flows",
                cfg.fast_path_flows != self.cfg.fast_path_flows,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        if !restart.is_empty() {
            warn!(
                "SOCKS5: {} changed; that needs a restart, the running values stay",
                restart.join(", ")
            );
        }
        let (grants, anonymous, revoked) = {
            let mut accounts = self.accounts.write().unwrap_or_else(|e| e.into_inner());
            let r = grants(&cfg, Some(&old), &mut accounts)?;
            for (i, a) in accounts.list.iter().enumerate() {
                let configured = i == 0 || r.0.values().any(|g| g.account == i);
                a.configured.store(configured, Ordering::Relaxed);
            }
            r
        };
        let mut added: Vec<String> = grants
            .keys()
            .filter(|n| !old.grants.contains_key(*n))
            .cloned()
            .collect();
        let mut removed: Vec<String> = old
            .grants
            .keys()
            .filter(|n| !grants.contains_key(*n))
            .cloned()
            .collect();
        added.sort();
        removed.sort();
        let changed = revoked.len().saturating_sub(removed.len());
        self.policy.set(policy, cfg.public_address);
        self.verifier.retain(&users);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Current {
            cfg,
            users,
            grants,
            anonymous,
        });
        let cfg = self.current().cfg.clone();
        self.set_up_limits(&cfg, true);
        // After the swap, so that a handshake finishing now finds the new grants.
        for g in &revoked {
            g.revoke.send_replace(true);
        }
        info!(
            "SOCKS5 reloaded: {} users (added: {:?}, removed: {:?}, {changed} with a new password or no-auth turned off; their sessions were ended)",
            self.current().grants.len(),
            added,
            removed
        );
        Ok(())
    }

    /// Counts a handshake refused before a user was known.
    fn refuse(&self, why: Refusal) {
        self.refusals.count(why);
        if why != Refusal::AuthFailed {
            add(&self.account(0).refused, 1);
        }
    }

    /// Accepts clients forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        info!(
            "SOCKS5 on {} ({} users{})",
            self.cfg.listen,
            self.cfg.users.len(),
            if self.cfg.allow_no_auth {
                ", no-auth allowed"
            } else {
                ""
            }
        );
        tokio::spawn(Arc::clone(&self.refusals).log_every(REFUSALS_LOGGED_EVERY));
        let own = Arc::clone(&self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OWN_ADDRESSES_EVERY);
            loop {
                tick.tick().await;
                let server = Arc::clone(&own);
                let _ = tokio::task::spawn_blocking(move || server.policy.refresh_own()).await;
            }
        });
        let _guard = TaskGuard::new(&self.tasks);
        let mut over = self.handing_over.subscribe();
        loop {
            let accepted = tokio::select! {
                biased;
                () = handing_over(&mut over) => {
                    match crate::handover::dup(listener.as_fd()) {
                        Ok(fd) => self.ship(Item::SocksListener { addr: self.cfg.listen }, vec![fd]),
                        Err(e) => warn!("SOCKS5: handing over the listener: {e:#}"),
                    }
                    return;
                }
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!("SOCKS5 accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let cur = self.current();
            let source = match self.sources.admit(
                peer.ip(),
                cur.cfg.max_handshakes_per_source,
                cur.cfg.max_connections_per_source,
            ) {
                Ok(g) => g,
                Err(why) => {
                    self.refuse(why);
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.handshakes).try_acquire_owned() else {
                self.refuse(Refusal::Slots);
                continue;
            };
            let deadline = Instant::now() + cur.cfg.handshake_timeout;
            let server = Arc::clone(&self);
            let guard = TaskGuard::new(&self.tasks);
            tokio::spawn(async move {
                let _guard = guard;
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                server.client(stream, peer, permit, source, deadline).await;
            });
        }
    }

    async fn client(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        mut source: SourceGuard,
        deadline: Instant,
    ) {
        let outcome = self.handshake(&mut stream, peer, deadline).await;
        drop(permit);
        source.handshake_done();
        let (grant, outcome) = match outcome {
            Ok(o) => o,
            Err(Some(why)) => {
                self.refuse(why);
                return;
            }
            Err(None) => return,
        };
        // Subscribed before anything else: a revocation from now on is seen.
        let stop = self.stop_of(&grant);
        match outcome {
            Outcome::Connect(dest, early) => self.connect(stream, grant, dest, early, stop).await,
            Outcome::Associate(dest) => {
                self.associate(stream, peer, grant.account, dest, stop)
                    .await
            }
        }
        // `source` counts this connection until here.
        drop(source);
    }

    /// Runs the handshake until `deadline`: the grant and what the client asked for, or why
    /// it was refused (`None`: the client went away).
    async fn handshake(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Result<(Grant, Outcome), Option<Refusal>> {
        let cur = self.current();
        let mut hs = Handshake::new(cur.cfg.allow_no_auth);
        let mut buf = [0u8; 1024];
        let mut event = Event::NeedMore;
        let mut failed = Refusal::Protocol;
        loop {
            match event {
                Event::NeedMore => {
                    let n = match timeout_at(deadline, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        Ok(_) => return Err(None),
                        Err(_) => {
                            debug!("SOCKS5 {peer}: handshake timed out");
                            return Err(Some(Refusal::Timeout));
                        }
                    };
                    event = hs.feed(&buf[..n]);
                }
                Event::Send(bytes) => {
                    match timeout_at(deadline, stream.write_all(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(None),
                        Err(_) => return Err(Some(Refusal::Timeout)),
                    }
                    event = hs.feed(&[]);
                }
                Event::Verify { user, password } => {
                    let users = Arc::clone(&self.current().users);
                    let ok = match self
                        .verifier
                        .verify(&users, &user, &password, deadline)
                        .await
                    {
                        Verdict::Ok => true,
                        Verdict::Wrong => false,
                        Verdict::Busy => {
                            debug!("SOCKS5 {peer}: no password check before the deadline");
                            return Err(Some(Refusal::AuthBusy));
                        }
                    };
                    if !ok {
                        let idx = self.current().grants.get(&user).map_or(0, |g| g.account);
                        add(&self.account(idx).auth_failures, 1);
                        debug!("SOCKS5 {peer}: authentication failed for {user:?}");
                        failed = Refusal::AuthFailed;
                    }
                    event = hs.verified(&user, ok);
                }
                Event::Request {
                    command,
                    dest,
                    early,
                } => {
                    // The grants as they are now: a reload during the handshake counts.
                    let now = self.current();
                    let grant = match hs.user() {
                        Some(u) => now.grants.get(u).cloned(),
                        None => now.anonymous.clone(),
                    };
                    let Some(grant) = grant else {
                        let unbound =
                            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
                        let _ = timeout_at(
                            deadline,
                            stream.write_all(&reply_bytes(reply::NOT_ALLOWED, unbound)),
                        )
                        .await;
                        return Err(Some(Refusal::AuthFailed));
                    };
                    return Ok((
                        grant,
                        if command == wire::CMD_CONNECT {
                            Outcome::Connect(dest, early)
                        } else {
                            Outcome::Associate(dest)
                        },
                    ));
                }
                Event::Close { send, why } => {
                    let _ = timeout_at(deadline, stream.write_all(&send)).await;
                    debug!("SOCKS5 {peer}: {why}");
                    return Err(Some(failed));
                }
            }
        }
    }

    /// The user's (max_connections, max_associations) now; nothing for a removed user.
    fn limit(&self, account: usize) -> (u32, u32) {
        let cur = self.current();
        if account == 0 {
            return cur
                .anonymous
                .as_ref()
                .map_or((0, 0), |_| (u32::MAX, u32::MAX));
        }
        cur.grants
            .values()
            .find(|g| g.account == account)
            .map_or((0, 0), |g| (g.max_connections, g.max_associations))
    }

    /// The user's limits for a new request from `peer`: its device slot, or `None` when they
    /// refuse it (counted, logged, and answered "not allowed" on `stream`).
    async fn limits_admit<'a>(
        &self,
        acct: &'a Account,
        peer: SocketAddr,
        stream: &mut TcpStream,
    ) -> Option<Device<'a>> {
        match acct.admit(peer.ip()) {
            Ok(d) => Some(d),
            Err(why) => {
                add(&acct.refused, 1);
                add(&acct.limit_refused, 1);
                debug!("SOCKS5 {peer}: user {:?} refused: {why}", acct.name);
                let unbound = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
                let _ = stream
                    .write_all(&reply_bytes(reply::NOT_ALLOWED, unbound))
                    .await;
                None
            }
        }
    }

    async fn admit(&self, dest: &Dest) -> Result<Vec<SocketAddr>, u8> {
        let candidates: Vec<SocketAddr> = match dest {
            Dest::Ip(a) => vec![*a],
            Dest::Domain(name, port) => match tokio::net::lookup_host((name.as_str(), *port)).await
            {
                Ok(addrs) => addrs.collect(),
                Err(_) => return Err(reply::HOST_UNREACHABLE),
            },
        };
        if candidates.is_empty() {
            return Err(reply::HOST_UNREACHABLE);
        }
        let allowed: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|a| self.policy.check(*a).is_ok())
            .collect();
        if allowed.is_empty() {
            if let Err(why) = self.policy.check(candidates[0]) {
                debug!("SOCKS5: {dest} refused: {}", why.name());
            }
            return Err(reply::NOT_ALLOWED);
        }
        Ok(allowed)
    }

    async fn connect(
        &self,
        mut client: TcpStream,
        grant: Grant,
        dest: Dest,
        early: Vec<u8>,
        stop: Stop,
    ) {
        let acct = self.account(grant.account);
        let acct = &*acct;
        let unbound = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let Ok(peer) = client.peer_addr() else { return };
        let Some(_device) = self.limits_admit(acct, peer, &mut client).await else {
            return;
        };
        // The slot is taken before connecting, so that requests arriving together cannot all
        // pass the check; it is given back whatever happens next.
        let max = u64::from(grant.max_connections);
        if acct
            .active_connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            add(&acct.refused, 1);
            let _ = client
                .write_all(&reply_bytes(reply::NOT_ALLOWED, unbound))
                .await;
            return;
        }
        let _slot = Active(&acct.active_connections);
        let addrs = match self.admit(&dest).await {
            Ok(a) => a,
            Err(code) => {
                add(&acct.refused, u64::from(code == reply::NOT_ALLOWED));
                let _ = client.write_all(&reply_bytes(code, unbound)).await;
                return;
            }
        };
        let connect_timeout = self.current().cfg.connect_timeout;
        let mut last = reply::HOST_UNREACHABLE;
        let mut upstream = None;
        for a in addrs {
            match timeout(connect_timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    upstream = Some(s);
                    break;
                }
                Ok(Err(e)) => {
                    last = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => reply::CONNECTION_REFUSED,
                        std::io::ErrorKind::NetworkUnreachable => reply::NETWORK_UNREACHABLE,
                        _ => reply::HOST_UNREACHABLE,
                    }
                }
                Err(_) => last = reply::TTL_EXPIRED,
            }
        }
        let Some(mut upstream) = upstream else {
            let _ = client.write_all(&reply_bytes(last, unbound)).await;
            return;
        };
        let _ = upstream.set_nodelay(true);
        keepalive(&upstream);
        let bound = upstream.local_addr().unwrap_or(unbound);
        // Bytes the client sent after its request go first; then, on the kernel path, both
        // sockets are added before the reply, so that what the client sends after it is
        // carried in the kernel from its first byte.
        if !early.is_empty() && upstream.write_all(&early).await.is_ok() {
            add(&acct.tcp_bytes[0], early.len() as u64);
        }
        let kernel = self.current().cfg.connect_path == crate::config::ConnectPath::Kernel;
        // A metered user's bytes are spliced: the kernel path cannot hold bytes back.
        let splicer = self
            .splicer
            .as_ref()
            .filter(|s| kernel && s.enabled() && !acct.metered());
        let carried = splicer.and_then(|s| s.start(&client, &upstream));
        if client
            .write_all(&reply_bytes(reply::SUCCEEDED, bound))
            .await
            .is_err()
        {
            if let (Some(s), Some(c)) = (splicer, carried) {
                drop((client, upstream));
                s.end(&c);
            }
            return;
        }
        add(&acct.connections, 1);
        if let (Some(s), Some(mut c)) = (splicer, carried) {
            s.link_upstream(&mut c, &client, &upstream);
            let dest = dest.to_string();
            self.relay_kernel(s, client, upstream, c, acct, &grant, &dest, stop)
                .await;
            return;
        }
        // Bytes move with splice(2) through a pipe each way, never through userspace. The
        // pipes are handed over with the sockets, bytes in flight included.
        let pipes = match (Pipe::new(), Pipe::new()) {
            (Ok(p1), Ok(p2)) => [p1, p2],
            (Err(e), _) | (_, Err(e)) => {
                warn!("SOCKS5 CONNECT to {dest}: no pipe for splice ({e}); closing");
                return;
            }
        };
        let dest = dest.to_string();
        self.relay_connect(client, upstream, pipes, acct, &grant, &dest, stop)
            .await;
    }

    /// Relays an established CONNECT until either side is done, the connection idles out,
    /// the user is revoked, or the server hands over (then the sockets and pipes go to the
    /// successor as they are).
    #[allow(clippy::too_many_arguments)]
    async fn relay_connect(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        pipes: [Pipe; 2],
        acct: &Account,
        grant: &Grant,
        dest: &str,
        mut stop: Stop,
    ) {
        // Bytes moved either way on this connection (for the idle timeout).
        let moved = AtomicU64::new(0);
        let idle_timeout = self.current().cfg.connect_idle_timeout;
        let mut over = self.handing_over.subscribe();
        if *over.borrow() {
            self.ship_connect(client, upstream, pipes, grant, dest);
            return;
        }
        // Each direction ends on EOF by shutting down the other side's writing half, so a
        // half-closed connection keeps flowing the other way.
        let relay = async {
            tokio::join!(
                splice_copy(&client, &upstream, &pipes[0], acct, 0, &moved),
                splice_copy(&upstream, &client, &pipes[1], acct, 1, &moved)
            );
        };
        let handed = tokio::select! {
            () = relay => false,
            () = ended(&moved, idle_timeout, &mut stop, dest) => false,
            () = handing_over(&mut over) => true,
        };
        if handed {
            self.ship_connect(client, upstream, pipes, grant, dest);
        }
    }

    /// Watches a CONNECT the kernel carries until both directions are done, the connection
    /// idles out, the user is revoked, or the server hands over (then the sockets and what the
    /// controller counted go to the successor; the kernel keeps carrying meanwhile).
    #[allow(clippy::too_many_arguments)]
    async fn relay_kernel(
        &self,
        splicer: &Splicer,
        client: TcpStream,
        upstream: TcpStream,
        carried: Carried,
        acct: &Account,
        grant: &Grant,
        dest: &str,
        mut stop: Stop,
    ) {
        let moved = AtomicU64::new(0);
        let idle_timeout = self.current().cfg.connect_idle_timeout;
        let state = Mutex::new(carried);
        let sockets = [&client, &upstream];
        let relay = async {
            tokio::join!(
                self.kernel_direction(splicer, sockets, 0, &state, acct, &moved, idle_timeout),
                self.kernel_direction(splicer, sockets, 1, &state, acct, &moved, idle_timeout)
            )
        };
        // Every quarter second while bytes move, backing off to a few seconds (and a quarter
        // of the idle timeout) while none do: the kernel's counts into the account, and a look
        // for a side that reset (the controller neither reads nor writes the sockets the
        // kernel carries, so it would not see one otherwise, and the kernel would take the
        // other side's bytes for nothing).
        let tallying = async {
            let busy = Duration::from_millis(250);
            let quiet = (idle_timeout / 4).clamp(busy, Duration::from_secs(4));
            let mut every = busy;
            // What each socket's receiver acknowledged: bytes the kernel still delivers from
            // its queue while nothing new is redirected (a slow client catching up) keep the
            // connection from idling out.
            let mut acked = [0u64; 2];
            loop {
                tokio::time::sleep(every).await;
                let mut any = tally(splicer, &state, acct, &moved);
                for (s, last) in sockets.iter().zip(acked.iter_mut()) {
                    let now = super::splice::acked(s.as_raw_fd()).unwrap_or(*last);
                    if now != *last {
                        *last = now;
                        add(&moved, 1);
                        any = true;
                    }
                }
                every = if any { busy } else { (every * 2).min(quiet) };
                if sockets.iter().any(|s| super::splice::reset(s.as_raw_fd())) {
                    debug!("SOCKS5 CONNECT to {dest}: one side reset; resetting the other");
                    return;
                }
            }
        };
        let handed = tokio::select! {
            (a, b) = relay => {
                if a == Direction::Failed || b == Direction::Failed {
                    // Bytes the kernel took may be unread: closing would send FIN, not RST.
                    let _ = client.set_zero_linger();
                    let _ = upstream.set_zero_linger();
                }
                a == Direction::Stopped || b == Direction::Stopped
            }
            () = tallying => {
                let _ = client.set_zero_linger();
                let _ = upstream.set_zero_linger();
                false
            }
            () = ended(&moved, idle_timeout, &mut stop, dest) => false,
        };
        tally(splicer, &state, acct, &moved);
        let carried = state.into_inner().unwrap_or_else(|e| e.into_inner());
        if handed {
            self.ship_kernel(client, upstream, carried, grant, dest);
        } else {
            drop((client, upstream));
            splicer.end(&carried);
        }
    }

    /// One direction of a CONNECT the kernel carries (`d`: 0 from the client, 1 from the
    /// upstream): forwards what the verdict hands to the controller, and at the end waits
    /// until what the kernel redirected is in the other socket, then shuts its writing half.
    #[allow(clippy::too_many_arguments)]
    async fn kernel_direction(
        &self,
        splicer: &Splicer,
        sockets: [&TcpStream; 2],
        d: usize,
        state: &Mutex<Carried>,
        acct: &Account,
        moved: &AtomicU64,
        limit: Duration,
    ) -> Direction {
        let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
        if lock().done[d] {
            return Direction::Done;
        }
        let (from, to) = (sockets[d], sockets[1 - d]);
        let mut over = self.handing_over.subscribe();
        let mut buf = Vec::new();
        let mut end = Direction::Failed;
        // `from`'s receive window is closed (the clamp it had is kept here) while its peer is
        // behind: when the verdict says so (it redirects the overflow meanwhile), and while the
        // controller holds bytes the verdict handed over (only once it has forwarded all of
        // them can the kernel take over again, which a sender faster than `to` would otherwise
        // never let happen). It opens once `to` has caught up and the kernel is linked.
        let mut clamped: Option<libc::c_int> = None;
        let unclamp = |clamped: &mut Option<libc::c_int>| {
            if let Some(was) = clamped.take() {
                let _ = super::splice::unclamp_window(from.as_raw_fd(), was);
            }
        };
        let cookie = lock().cookies[d];
        // Both sockets in the sockhash: the kernel can carry this direction (else the
        // controller copies all of it, as splice would, and never stops the sender).
        let linkable = cookie != 0 && lock().cookies[1 - d] != 0;
        // The kernel must be linked again: bytes were handed over, or the sender was stopped.
        let mut due = false;
        let behind = splicer.waiter(cookie);
        // Closes the window, and lets the verdict redirect what it had offered.
        // Given back at most `SPLICE_OFFERED_MAX`: a sender whose peer fell behind needs no
        // larger window, and then all it may send past the window fits the overflow.
        let clamp = || {
            use relay_common::splice::SPLICE_OFFERED_MAX;
            let was = super::splice::clamp_window(from.as_raw_fd()).ok()?;
            let was = match u64::try_from(was) {
                Ok(w) if w > 0 => w.min(SPLICE_OFFERED_MAX),
                _ => SPLICE_OFFERED_MAX,
            };
            splicer.offer(cookie, was);
            libc::c_int::try_from(was).ok()
        };
        loop {
            let holds_nothing = {
                let c = lock();
                splicer.count(cookie).passed == c.read[d]
            };
            tokio::select! {
                biased;
                () = handing_over(&mut over) => {
                    unclamp(&mut clamped);
                    return Direction::Stopped;
                }
                () = behind.notified(), if clamped.is_none() && linkable => {
                    // Unless `to` caught up meanwhile (the message is old).
                    if waiting(splicer, to, d, state) > relay_common::splice::SPLICE_WINDOW {
                        clamped = clamp();
                        due = true;
                    }
                    continue;
                }
                linked = relink(splicer, [from, to], d, state, limit, clamped.is_some()), if due && holds_nothing => {
                    if linked {
                        due = false;
                        unclamp(&mut clamped);
                    } else {
                        // `to` did not catch up within `limit`, or failed (the tally
                        // notices a reset): look again a little later.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
                r = from.readable() => if r.is_err() { break },
            }
            // Only bytes the verdict passed (rare) come here: the buffer is made on first use.
            if buf.is_empty() {
                buf.resize(1 << 16, 0);
            }
            let n = match from.try_read(&mut buf) {
                Ok(0) => {
                    end = Direction::Done;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            };
            if linkable {
                due = true;
                if clamped.is_none() {
                    clamped = clamp();
                } else {
                    let _ = super::splice::close_window(from.as_raw_fd());
                }
            }
            if !forward(splicer, to, d, state, &buf[..n], acct, moved, limit).await {
                break;
            }
        }
        unclamp(&mut clamped);
        let (want, cookie) = {
            let c = lock();
            (c.expect[1 - d], c.cookies[d])
        };
        let want = want + splicer.count(cookie).redirected;
        if !super::splice::flushed(to, want, limit).await {
            debug!("SOCKS5 CONNECT: bytes the kernel redirected did not leave in {limit:?}");
        }
        // SAFETY: shutdown(2) on a socket we hold; it only ends our sending.
        unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
        lock().done[d] = true;
        end
    }

    fn ship_kernel(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        carried: Carried,
        grant: &Grant,
        dest: &str,
    ) {
        let fds = (|| -> anyhow::Result<Vec<OwnedFd>> {
            Ok(vec![
                crate::handover::dup(client.as_fd())?,
                crate::handover::dup(upstream.as_fd())?,
            ])
        })();
        match fds {
            Ok(fds) => self.ship(
                Item::Connect(ConnectState {
                    user: self.user_of(grant.account),
                    dest: dest.to_owned(),
                    pipes: false,
                    kernel: Some(carried),
                }),
                fds,
            ),
            Err(e) => warn!("SOCKS5 CONNECT to {dest}: not handed over: {e:#}"),
        }
    }

    fn ship_connect(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        pipes: [Pipe; 2],
        grant: &Grant,
        dest: &str,
    ) {
        let fds = (|| -> anyhow::Result<Vec<OwnedFd>> {
            let [p1, p2] = pipes;
            Ok(vec![
                crate::handover::dup(client.as_fd())?,
                crate::handover::dup(upstream.as_fd())?,
                p1.read,
                p1.write,
                p2.read,
                p2.write,
            ])
        })();
        match fds {
            Ok(fds) => self.ship(
                Item::Connect(ConnectState {
                    user: self.user_of(grant.account),
                    dest: dest.to_owned(),
                    pipes: true,
                    kernel: None,
                }),
                fds,
            ),
            Err(e) => warn!("SOCKS5 CONNECT to {dest}: not handed over: {e:#}"),
        }
    }

    async fn associate(
        &self,
        mut control: TcpStream,
        peer: SocketAddr,
        account: usize,
        dest: Dest,
        stop: Stop,
    ) {
        let acct = self.account(account);
        let acct = &*acct;
        let unbound = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let Some(_device) = self.limits_admit(acct, peer, &mut control).await else {
            return;
        };
        // The slot is taken before anything is bound, as for CONNECT: associations requested
        // together cannot all pass the check; it is given back whatever happens next.
        let (_, max_assoc) = self.limit(account);
        let max = u64::from(max_assoc);
        if acct
            .active_associations
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            add(&acct.refused, 1);
            let _ = control
                .write_all(&reply_bytes(reply::NOT_ALLOWED, unbound))
                .await;
            return;
        }
        let _slot = Active(&acct.active_associations);
        let Ok(local) = control.local_addr() else {
            return;
        };
        // An IPv4 client of a `[::]` listener reached an IPv4-mapped address: its association
        // is an IPv4 one, advertised as a plain IPv4 address.
        let local_ip = crate::config::canonical(local.ip());
        let Some((socket, port)) = self.bind_association(local_ip) else {
            let _ = control
                .write_all(&reply_bytes(reply::GENERAL_FAILURE, unbound))
                .await;
            return;
        };
        let advertised = SocketAddr::new(self.cfg.public_address.unwrap_or(local_ip), port);
        if control
            .write_all(&reply_bytes(reply::SUCCEEDED, advertised))
            .await
            .is_err()
        {
            self.release(port);
            return;
        }
        add(&acct.associations, 1);
        debug!("SOCKS5 {peer}: UDP association on {advertised}");
        // The request may name the client's port (0.0.0.0:0 when it does not know it yet).
        let client_port = match dest {
            Dest::Ip(a) if a.port() != 0 => Some(a.port()),
            _ => None,
        };
        let assoc = Association {
            client_ip: crate::config::canonical(peer.ip()),
            client: client_port.map(|p| SocketAddr::new(crate::config::canonical(peer.ip()), p)),
            local: local_ip,
            port,
            account: account as u16,
            contacted: HashSet::new(),
            names: HashMap::new(),
            fast: Vec::new(),
        };
        self.run_association(control, socket, peer, acct, assoc, stop)
            .await;
    }

    /// Relays an association until its control connection closes, it idles out, the user is
    /// revoked, or the server hands over (then its sockets and state go to the successor,
    /// and its fast-path flows stay in the maps for it).
    async fn run_association(
        &self,
        mut control: TcpStream,
        socket: UdpSocket,
        peer: SocketAddr,
        acct: &Account,
        mut assoc: Association,
        mut stop: Stop,
    ) {
        let mut over = self.handing_over.subscribe();
        let mut probe = [0u8; 64];
        // XDP's packet count for the association when it was last idle-checked.
        let mut xdp_packets = 0;
        let mut handed = *over.borrow();
        while !handed {
            tokio::select! {
                () = handing_over(&mut over) => handed = true,
                // A reload removed the user or changed its password, or it is blocked now.
                why = stop.wait() => {
                    debug!("SOCKS5 {peer}: {why}; closing the UDP association");
                    break;
                }
                // The association lives as long as its control connection.
                r = control.read(&mut probe) => {
                    if matches!(r, Ok(0) | Err(_)) {
                        break;
                    }
                }
                r = timeout(self.cfg.udp_idle_timeout, socket.readable()) => {
                    match r {
                        Err(_) => {
                            // Datagrams XDP carries never reach the socket: the association
                            // is idle only if XDP's count did not move either.
                            let now = self
                                .datapath
                                .socks_packets(assoc.fast.iter().map(|f| f.id));
                            if now != xdp_packets {
                                xdp_packets = now;
                                continue;
                            }
                            debug!("SOCKS5 {peer}: UDP association idle; closing");
                            break;
                        }
                        Ok(Err(_)) => break,
                        Ok(Ok(())) => self.datagrams(&socket, &mut assoc, acct).await,
                    }
                }
            }
        }
        if handed {
            self.ship_association(control, socket, peer, assoc);
            return;
        }
        // Out of the fast path first, so that nothing more is relayed for it, then account
        // what XDP carried (and let the flow's next hops go).
        let mut live = acct.flows.lock().unwrap_or_else(|e| e.into_inner());
        for flow in assoc.fast.drain(..) {
            acct.fast_flows.fetch_sub(1, Ordering::Relaxed);
            for (d, t) in self.datapath.socks_close(flow.id).iter().enumerate() {
                add(&acct.udp_xdp_packets[d], t.packets);
                add(&acct.udp_xdp_bytes[d], t.bytes);
            }
            live.remove(&flow.id);
        }
        drop(live);
        drop(socket);
        self.release(assoc.port);
    }

    fn ship_association(
        &self,
        control: TcpStream,
        socket: UdpSocket,
        peer: SocketAddr,
        assoc: Association,
    ) {
        let fds = crate::handover::dup(control.as_fd())
            .and_then(|c| Ok(vec![c, crate::handover::dup(socket.as_fd())?]));
        let fds = match fds {
            Ok(f) => f,
            Err(e) => {
                warn!("SOCKS5 {peer}: association not handed over: {e:#}");
                return;
            }
        };
        let state = AssociateState {
            user: self.user_of(usize::from(assoc.account)),
            peer,
            port: assoc.port,
            client_ip: assoc.client_ip,
            client: assoc.client,
            local: assoc.local,
            contacted: assoc.contacted.iter().copied().collect(),
            names: assoc
                .names
                .iter()
                .map(|((n, p), a)| (n.clone(), *p, *a))
                .collect(),
            fast: assoc.fast.iter().map(|f| f.id).collect(),
        };
        // The flows' records stay for the successor; their next-hop slots are its now.
        for flow in assoc.fast {
            std::mem::forget(flow._hops);
        }
        self.ship(Item::Associate(state), fds);
    }

    fn bind_association(&self, local: IpAddr) -> Option<(UdpSocket, u16)> {
        let unspecified = if local.is_ipv4() {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        for _ in 0..64 {
            // A random free port: handed out in order, the next one could be guessed and
            // claimed by a neighbour behind the same carrier NAT with the first datagram.
            let pick = super::users::random::<8>().map_or(0, u64::from_ne_bytes);
            let port = self
                .ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take_nth(pick)?;
            match udp::bind(SocketAddr::new(unspecified, port), false) {
                Ok(s) => return UdpSocket::from_std(s).ok().map(|s| (s, port)),
                Err(_) => self.release(port),
            }
        }
        None
    }

    fn release(&self, port: u16) {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(port);
    }

    /// Relays what is waiting on an association's socket.
    async fn datagrams(&self, socket: &UdpSocket, assoc: &mut Association, acct: &Account) {
        let fd = socket.as_raw_fd();
        // Collect first (the receive buffers are borrowed), resolve names after.
        let mut work: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let _ = socket.try_io(Interest::READABLE, || {
            udp::recv_batch(fd, |batch| {
                for d in batch {
                    if !d.truncated {
                        work.push((d.peer, d.data.to_vec()));
                    }
                }
            })
        });
        let mut to_send: Vec<(SocketAddr, Vec<u8>, bool)> = Vec::new();
        for (from, data) in work {
            let from_client = crate::config::canonical(from.ip()) == assoc.client_ip
                && assoc.client.is_none_or(|c| c.port() == from.port());
            if from_client {
                assoc.client.get_or_insert(from);
                match self.client_datagram(assoc, &data).await {
                    Some((dest, payload)) => to_send.push((dest, payload, true)),
                    None => add(&acct.udp_dropped, 1),
                }
            } else if assoc.contacted.contains(&from) {
                let Some(client) = assoc.client else { continue };
                let mut out = vec![0u8; 3 + 19 + data.len()];
                let addr = match from {
                    SocketAddr::V4(a) => Addr::V4(a.ip().octets(), a.port()),
                    SocketAddr::V6(a) => Addr::V6(a.ip().octets(), a.port()),
                };
                let Some(n) = wire::encode_udp_header(&addr, &mut out) else {
                    continue;
                };
                out.truncate(n);
                out.extend_from_slice(&data);
                to_send.push((client, out, false));
            } else {
                // Not the client, not a destination it contacted: dropped, like dante.
                add(&acct.udp_dropped, 1);
            }
        }
        for (to, bytes, upstream) in to_send {
            // Within the user's rate and quota, or dropped (as XDP drops it).
            let d = usize::from(!upstream);
            let taken = acct.spend.take(d, bytes.len());
            if taken < bytes.len() {
                acct.spend.give_back(d, taken);
                add(&acct.over_limit, 1);
                continue;
            }
            let from = (!upstream).then_some(assoc.local);
            let out = [udp::Outgoing {
                data: &bytes,
                to: Some(to),
                from,
            }];
            if udp::send_batch(fd, &out).is_ok() {
                let d = usize::from(!upstream);
                add(&acct.udp_packets[d], 1);
                add(&acct.udp_bytes[d], bytes.len() as u64);
            }
        }
    }

    /// A datagram from the client: its destination and payload, or `None` to drop it.
    async fn client_datagram(
        &self,
        assoc: &mut Association,
        data: &[u8],
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let header = wire::parse_udp_header(data).ok()??;
        if header.frag != 0 {
            return None;
        }
        let payload = data.get(header.payload..)?.to_vec();
        let dest = match header.addr {
            Addr::V4(ip, p) => SocketAddr::from((ip, p)),
            Addr::V6(ip, p) => SocketAddr::from((ip, p)),
            Addr::Domain(name, p) => {
                let name = std::str::from_utf8(name).ok()?.to_owned();
                match assoc.names.get(&(name.clone(), p)) {
                    Some(a) => *a,
                    None => {
                        let a = tokio::net::lookup_host((name.as_str(), p))
                            .await
                            .ok()?
                            .find(|a| a.is_ipv4() == assoc.local.is_ipv4())?;
                        if assoc.names.len() < MAX_DESTINATIONS {
                            assoc.names.insert((name, p), a);
                        }
                        a
                    }
                }
            }
        };
        if dest.is_ipv4() != assoc.local.is_ipv4() || self.policy.check(dest).is_err() {
            return None;
        }
        // One association cannot fill memory (or the fast path) with destinations.
        if !assoc.contacted.contains(&dest) && assoc.contacted.len() >= MAX_DESTINATIONS {
            return None;
        }
        if assoc.contacted.insert(dest) {
            self.approve(assoc, dest).await;
        }
        Some((dest, payload))
    }
}

impl Server {
    /// Lets XDP relay between the association's client and `dest` from now on.
    async fn approve(&self, assoc: &mut Association, dest: SocketAddr) {
        let (Some(nexthops), Some(client)) = (&self.nexthops, assoc.client) else {
            return;
        };
        // The address the upstream side leaves from: what the kernel picks for `dest`.
        let back = std::net::UdpSocket::bind(SocketAddr::new(
            if dest.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            },
            0,
        ))
        .and_then(|s| s.connect(dest).and_then(|()| s.local_addr()));
        let Ok(back) = back else { return };
        let ends = Endpoints {
            client,
            front: SocketAddr::new(assoc.local, assoc.port),
            back: SocketAddr::new(back.ip(), assoc.port),
            upstream: dest,
        };
        // A user holds at most its share of the fast-path table; the rest of its
        // destinations are relayed by the controller.
        let account = {
            let accounts = self.accounts.read().unwrap_or_else(|e| e.into_inner());
            accounts.list.get(usize::from(assoc.account)).cloned()
        };
        let Some(account) = account else { return };
        let share = u64::from((self.cfg.fast_path_flows / FAST_PATH_SHARE).max(1));
        if account.fast_flows.load(Ordering::Relaxed) >= share {
            add(&account.fast_path_refused, 1);
            return;
        }
        let hops = nexthops.ask(&ends).await;
        if let Some(id) = self.datapath.socks_open(ends, assoc.account, hops.slots()) {
            add(&account.fast_flows, 1);
            account
                .flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
            assoc.fast.push(FastFlow { id, _hops: hops });
        }
    }
}

struct Association {
    /// The association's port (BND.PORT).
    port: u16,
    /// Index of the user's account.
    account: u16,
    /// Fast-path flows of approved destinations.
    fast: Vec<FastFlow>,
    client_ip: IpAddr,
    /// The client's address, once known.
    client: Option<SocketAddr>,
    /// The relay address the client reached (replies leave from it).
    local: IpAddr,
    contacted: HashSet<SocketAddr>,
    names: HashMap<(String, u16), SocketAddr>,
}

/// One (association, destination) pair XDP relays.
struct FastFlow {
    /// Its record id.
    id: u32,
    /// The next hops its record refers to, held until the record is gone.
    _hops: Hops,
}

/// Gives back a slot of an `active_*` count on drop.
struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when a CONNECT is to be closed: nothing moved for `timeout`, or its user was
/// removed or changed.
async fn ended(moved: &AtomicU64, timeout: Duration, stop: &mut Stop, dest: &str) {
    tokio::select! {
        () = idle(moved, timeout) => debug!("SOCKS5 CONNECT to {dest}: idle; closing"),
        why = stop.wait() => debug!("SOCKS5 CONNECT to {dest}: {why}; closing"),
    }
}

/// How one direction of a CONNECT the kernel carries ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Its end reached the other side.
    Done,
    /// A side failed (a reset, a write that could not be made).
    Failed,
    /// The server hands over; the successor goes on with it.
    Stopped,
}

/// Forwards `bytes` the verdict handed over (direction `d`) to `to`: after what
/// the kernel redirected before them, which waits in the kernel's queue for `to` until it is
/// in `to`'s send queue. False if `to` failed.
#[allow(clippy::too_many_arguments)]
async fn forward(
    splicer: &Splicer,
    to: &TcpStream,
    d: usize,
    state: &Mutex<Carried>,
    bytes: &[u8],
    acct: &Account,
    moved: &AtomicU64,
    limit: Duration,
) -> bool {
    let (expect, cookie) = {
        let c = state.lock().unwrap_or_else(|e| e.into_inner());
        (c.expect[1 - d], c.cookies[d])
    };
    let before = expect + splicer.count(cookie).redirected;
    if !super::splice::flushed(to, before, limit).await || write_all(to, bytes).await.is_err() {
        return false;
    }
    let n = bytes.len() as u64;
    {
        let mut c = state.lock().unwrap_or_else(|e| e.into_inner());
        c.read[d] += n;
        c.expect[1 - d] += n;
    }
    add(&acct.tcp_bytes[d], n);
    add(moved, n);
    true
}

/// Bytes redirected toward `to` (direction `d`) that are not in its send queue yet: they wait
/// in the kernel's queue for it, which nothing else bounds (the send queue has its own limit).
fn waiting(splicer: &Splicer, to: &TcpStream, d: usize, state: &Mutex<Carried>) -> u64 {
    let c = *state.lock().unwrap_or_else(|e| e.into_inner());
    let owed = c.expect[1 - d] + splicer.count(c.cookies[d]).redirected;
    super::splice::queued(to.as_raw_fd())
        .map(|q| owed.saturating_sub(q))
        .unwrap_or(relay_common::splice::SPLICE_WINDOW)
}

/// Lets the kernel carry direction `d` again once the controller holds nothing the verdict
/// handed over (it forwarded every byte passed so far) and `to` keeps up again (less than half
/// the window waits for its send queue; this waits for that, for at most `limit`): links
/// `from` at the verdict's `passed` count, so that the next chunk is redirected, behind what
/// the controller wrote. A chunk the verdict hands over meanwhile leaves `passed` past the
/// link's: it and the next still come to the controller, which tries again after forwarding
/// them. Where the verdict cannot read `tcp_sock`, the link carries the controller's credit:
/// what the window leaves. Whether it linked.
async fn relink(
    splicer: &Splicer,
    [from, to]: [&TcpStream; 2],
    d: usize,
    state: &Mutex<Carried>,
    limit: Duration,
    holding: bool,
) -> bool {
    use relay_common::splice::{SpliceLink, SPLICE_WINDOW};
    let lock = || *state.lock().unwrap_or_else(|e| e.into_inner());
    let c = lock();
    let (cookie, peer) = (c.cookies[d], c.cookies[1 - d]);
    if cookie == 0 || peer == 0 || splicer.count(cookie).passed != c.read[d] {
        return false;
    }
    // Everything the kernel redirected toward `to` and the controller wrote to it: what its
    // send queue must have taken once nothing waits in the kernel's queue for it (which
    // nothing else bounds; the send queue has its own limit).
    let owed = c.expect[1 - d] + splicer.count(cookie).redirected;
    let target = owed.saturating_sub(SPLICE_WINDOW / 2);
    // `from`'s window stays closed meanwhile, if the caller closed it.
    let hold = holding.then(|| from.as_raw_fd());
    if !super::splice::flushed_holding(to, target, limit, hold).await {
        return false;
    }
    let c = lock();
    let count = splicer.count(cookie);
    if count.passed != c.read[d] {
        return false;
    }
    let waiting = waiting(splicer, to, d, state);
    splicer.link(
        cookie,
        SpliceLink {
            peer,
            drained: count.passed,
            allow: count.redirected + SPLICE_WINDOW.saturating_sub(waiting),
            expect: c.expect[1 - d],
            offered: 0,
        },
    );
    true
}

/// Adds what the kernel redirected since the last look to the user's account and `moved`.
/// Whether anything was.
fn tally(splicer: &Splicer, state: &Mutex<Carried>, acct: &Account, moved: &AtomicU64) -> bool {
    let mut c = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut any = false;
    for d in 0..2 {
        let now = splicer.count(c.cookies[d]).redirected;
        if now > c.accounted[d] {
            let delta = now - c.accounted[d];
            c.accounted[d] = now;
            add(&acct.tcp_bytes[d], delta);
            add(moved, delta);
            any = true;
        }
    }
    any
}

/// Writes all of `bytes` to a socket shared by reference.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Account {
    /// Takes up the cumulative counters of a pinned record (not the live counts, which the
    /// sessions taken over add themselves).
    fn continue_from(&self, p: &relay_common::session::UserStats) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        for d in 0..2 {
            set(&self.tcp_bytes[d], p.tcp_bytes[d]);
            set(&self.udp_packets[d], p.udp[d].packets);
            set(&self.udp_bytes[d], p.udp[d].bytes);
            set(&self.udp_xdp_packets[d], p.udp_xdp[d].packets);
            set(&self.udp_xdp_bytes[d], p.udp_xdp[d].bytes);
        }
        set(&self.connections, p.connections);
        set(&self.associations, p.associations);
        set(&self.auth_failures, p.auth_failures);
        set(&self.refused, p.refused);
        set(&self.udp_dropped, p.udp_dropped);
        set(&self.fast_path_refused, p.fast_path_refused);
        set(&self.limit_refused, p.limit_refused);
        set(&self.over_limit, p.over_limit);
    }

    /// The pinned form of this account.
    pub fn snapshot(&self) -> relay_common::session::UserStats {
        use relay_common::session::{Traffic, UserStats};
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UserStats {
            name: relay_common::session::name32(&self.name),
            tcp_bytes: [l(&self.tcp_bytes[0]), l(&self.tcp_bytes[1])],
            udp: [0, 1].map(|d| Traffic {
                packets: l(&self.udp_packets[d]),
                bytes: l(&self.udp_bytes[d]),
            }),
            connections: l(&self.connections),
            associations: l(&self.associations),
            active_connections: l(&self.active_connections),
            active_associations: l(&self.active_associations),
            auth_failures: l(&self.auth_failures),
            refused: l(&self.refused),
            udp_dropped: l(&self.udp_dropped),
            configured: u64::from(self.configured.load(Ordering::Relaxed)),
            udp_xdp: [0, 1].map(|d| Traffic {
                packets: l(&self.udp_xdp_packets[d]),
                bytes: l(&self.udp_xdp_bytes[d]),
            }),
            fast_path_refused: l(&self.fast_path_refused),
            limit_refused: l(&self.limit_refused),
            over_limit: l(&self.over_limit),
        }
    }
}

impl Server {
    /// Publishes the accounts to the pinned `USERS` map once a second, until the server hands
    /// over (which publishes them one last time).
    pub async fn publish(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let over = self.handing_over.subscribe();
        loop {
            tick.tick().await;
            if *over.borrow() {
                return;
            }
            self.publish_once();
        }
    }

    /// Writes every account to `USERS`, and the live CONNECTs and associations to `META` (what
    /// a crash would lose, counted by the next controller).
    fn publish_once(&self) {
        let accounts = self.accounts();
        let (mut connections, mut associations) = (0, 0);
        for (i, a) in accounts.iter().enumerate() {
            let snap = a.snapshot();
            connections += snap.active_connections;
            associations += snap.active_associations;
            if let Err(e) = self.datapath.set_user(i as u32, &snap) {
                debug!("publishing SOCKS5 accounts: {e:#}");
                break;
            }
        }
        let _ = self.datapath.update_meta(|m| {
            m.connections = connections;
            m.associations = associations;
        });
    }
}

/// A pipe for splice(2), closed on drop.
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        use std::os::fd::FromRawFd as _;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are fresh and ours.
        Ok(unsafe {
            Pipe {
                read: std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                write: std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

/// Bytes waiting in a pipe.
fn pipe_len(read: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, on a pipe we hold.
    let rc = unsafe { libc::ioctl(read, libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

fn splice(from: i32, to: i32, len: usize) -> std::io::Result<usize> {
    // SAFETY: splice between two descriptors we hold; no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `from` to `to` with splice(2) through `pipe` until EOF or an error, then
/// shuts down `to` for writing. Takes what it reads from the user's budget for direction `d`
/// (waiting for the next limits tick when it is spent: a rate limit paces the connection)
/// and counts what it moved (in the account and `moved`).
async fn splice_copy(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    acct: &Account,
    d: usize,
    moved: &AtomicU64,
) {
    let bytes = &acct.tcp_bytes[d];
    const CHUNK: usize = 1 << 16;
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    // Bytes a predecessor left in the pipe (it handed over mid-copy) go first.
    let mut carried = pipe_len(pr);
    'outer: loop {
        let n = if carried > 0 {
            std::mem::take(&mut carried)
        } else {
            if from.readable().await.is_err() {
                break;
            }
            let allowed = acct.spend.wait(d, CHUNK).await;
            let r = from.try_io(Interest::READABLE, || splice(src, pw, allowed));
            acct.spend
                .give_back(d, allowed - r.as_ref().map_or(0, |n| (*n).min(allowed)));
            match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        };
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                break 'outer;
            }
            match to.try_io(Interest::WRITABLE, || splice(pr, dst, left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break 'outer,
            }
        }
        add(bytes, n as u64);
        add(moved, n as u64);
    }
    // SAFETY: shutdown(2) on a socket we hold; it only ends our sending.
    unsafe { libc::shutdown(dst, libc::SHUT_WR) };
}
