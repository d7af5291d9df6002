//! The SOCKS5 server's I/O: accepting, driving the handshake state machine, CONNECT relaying
//! and UDP ASSOCIATE relaying. Decisions live in `handshake`, `users` and `policy`.
//!
//! Choices where RFC 1928 is silent follow dante: a UDP association accepts datagrams only
//! from the control connection's client address (and, once seen or if the request named it,
//! only from that port), relays replies only from destinations the client has sent to, drops
//! fragments (FRAG != 0), and ends when the control connection closes.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use log::{debug, info, warn};
use relay_common::socks5::{self as wire, reply, Addr};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

use super::{
    handshake::{reply_bytes, Dest, Event, Handshake},
    users::Users,
};
use crate::{
    config::Socks5Config,
    datapath::{Datapath, Endpoints},
    nexthop::{Hops, NextHops},
    policy::Policy,
    sessions::PortPool,
    udp,
};

/// What one user did (index 0 is everyone without authentication).
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
    /// Requests refused by the destination policy or a limit.
    pub refused: AtomicU64,
    /// UDP datagrams dropped: malformed, fragmented, refused, unsolicited.
    pub udp_dropped: AtomicU64,
    /// What XDP relayed for this user's ended associations.
    pub udp_xdp_packets: [AtomicU64; 2],
    pub udp_xdp_bytes: [AtomicU64; 2],
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The SOCKS5 server.
pub struct Server {
    cfg: Socks5Config,
    users: Arc<Users>,
    policy: Policy,
    handshakes: Arc<Semaphore>,
    ports: Mutex<PortPool>,
    /// Index 0: unauthenticated; user `i` of the configuration is `i + 1`.
    pub accounts: Vec<Account>,
    /// The kernel maps: the UDP fast path's flows, and the accounts published to `USERS`.
    datapath: Arc<Datapath>,
    /// Next hops for fast-path flows; `None` when XDP does not relay.
    nexthops: Option<Arc<NextHops>>,
}

enum Outcome {
    Connect(Dest, Vec<u8>),
    Associate(Dest),
}

impl Server {
    pub fn new(
        cfg: Socks5Config,
        mut policy: Policy,
        datapath: Arc<Datapath>,
        nexthops: Option<Arc<NextHops>>,
    ) -> anyhow::Result<Arc<Server>> {
        let users = Users::new(cfg.users.clone())?;
        let mut accounts: Vec<Account> =
            (0..=cfg.users.len()).map(|_| Account::default()).collect();
        accounts[0].name = "(no auth)".into();
        for (i, name) in users.names() {
            accounts[i + 1].name = name;
        }
        policy.own.extend(crate::policy::local_addresses());
        Ok(Arc::new(Server {
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes as usize)),
            ports: Mutex::new(PortPool::new(cfg.udp_ports)),
            users: Arc::new(users),
            policy,
            accounts,
            datapath,
            nexthops,
            cfg,
        }))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.cfg.listen
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
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("SOCKS5 accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.handshakes).try_acquire_owned() else {
                debug!("SOCKS5: too many handshakes in progress; closing {peer}");
                continue;
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                server.client(stream, peer, permit).await;
            });
        }
    }

    async fn client(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let outcome = self.handshake(&mut stream, peer).await;
        drop(permit);
        let Some((account, outcome)) = outcome else {
            return;
        };
        match outcome {
            Outcome::Connect(dest, early) => self.connect(stream, account, dest, early).await,
            Outcome::Associate(dest) => self.associate(stream, peer, account, dest).await,
        }
    }

    async fn handshake(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Option<(usize, Outcome)> {
        let mut hs = Handshake::new(self.cfg.allow_no_auth);
        let mut buf = [0u8; 1024];
        let mut event = Event::NeedMore;
        let step = self.cfg.handshake_timeout;
        loop {
            match event {
                Event::NeedMore => {
                    let n = match timeout(step, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        Ok(_) => return None,
                        Err(_) => {
                            debug!("SOCKS5 {peer}: handshake timed out");
                            return None;
                        }
                    };
                    event = hs.feed(&buf[..n]);
                }
                Event::Send(bytes) => {
                    timeout(step, stream.write_all(&bytes)).await.ok()?.ok()?;
                    event = hs.feed(&[]);
                }
                Event::Verify { user, password } => {
                    let users = Arc::clone(&self.users);
                    let name = user.clone();
                    let ok = tokio::task::spawn_blocking(move || users.verify(&name, &password))
                        .await
                        .unwrap_or(false);
                    if !ok {
                        let idx = self.users.get(&user).map_or(0, |(i, _)| i + 1);
                        add(&self.accounts[idx].auth_failures, 1);
                        info!("SOCKS5 {peer}: authentication failed for {user:?}");
                    }
                    event = hs.verified(&user, ok);
                }
                Event::Request {
                    command,
                    dest,
                    early,
                } => {
                    let account = hs
                        .user()
                        .and_then(|u| self.users.get(u))
                        .map_or(0, |(i, _)| i + 1);
                    return Some((
                        account,
                        if command == wire::CMD_CONNECT {
                            Outcome::Connect(dest, early)
                        } else {
                            Outcome::Associate(dest)
                        },
                    ));
                }
                Event::Close { send, why } => {
                    let _ = timeout(step, stream.write_all(&send)).await;
                    debug!("SOCKS5 {peer}: {why}");
                    return None;
                }
            }
        }
    }

    fn limit(&self, account: usize) -> (u32, u32) {
        if account == 0 {
            return (u32::MAX, u32::MAX);
        }
        self.cfg
            .users
            .get(account - 1)
            .map_or((0, 0), |u| (u.max_connections, u.max_associations))
    }

    /// Resolves and checks a destination: the addresses the policy allows, or the reply code.
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

    async fn connect(&self, mut client: TcpStream, account: usize, dest: Dest, early: Vec<u8>) {
        let acct = &self.accounts[account];
        let unbound = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let (max_conns, _) = self.limit(account);
        if acct.active_connections.load(Ordering::Relaxed) >= u64::from(max_conns) {
            add(&acct.refused, 1);
            let _ = client
                .write_all(&reply_bytes(reply::NOT_ALLOWED, unbound))
                .await;
            return;
        }
        let addrs = match self.admit(&dest).await {
            Ok(a) => a,
            Err(code) => {
                add(&acct.refused, u64::from(code == reply::NOT_ALLOWED));
                let _ = client.write_all(&reply_bytes(code, unbound)).await;
                return;
            }
        };
        let mut last = reply::HOST_UNREACHABLE;
        let mut upstream = None;
        for a in addrs {
            match timeout(self.cfg.connect_timeout, TcpStream::connect(a)).await {
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
        let bound = upstream.local_addr().unwrap_or(unbound);
        if client
            .write_all(&reply_bytes(reply::SUCCEEDED, bound))
            .await
            .is_err()
        {
            return;
        }
        add(&acct.connections, 1);
        add(&acct.active_connections, 1);
        if !early.is_empty() && upstream.write_all(&early).await.is_ok() {
            add(&acct.tcp_bytes[0], early.len() as u64);
        }
        // Each direction ends on EOF by shutting down the other side's writing half, so a
        // half-closed connection keeps flowing the other way. Bytes move with splice(2)
        // through a pipe, never through userspace, where the kernel allows it.
        match (Pipe::new(), Pipe::new()) {
            (Ok(p1), Ok(p2)) => {
                tokio::join!(
                    splice_copy(&client, &upstream, p1, &acct.tcp_bytes[0]),
                    splice_copy(&upstream, &client, p2, &acct.tcp_bytes[1])
                );
            }
            _ => {
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::join!(
                    pipe(cr, uw, &acct.tcp_bytes[0]),
                    pipe(ur, cw, &acct.tcp_bytes[1])
                );
            }
        }
        acct.active_connections.fetch_sub(1, Ordering::Relaxed);
    }

    async fn associate(
        &self,
        mut control: TcpStream,
        peer: SocketAddr,
        account: usize,
        dest: Dest,
    ) {
        let acct = &self.accounts[account];
        let unbound = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let (_, max_assoc) = self.limit(account);
        if acct.active_associations.load(Ordering::Relaxed) >= u64::from(max_assoc) {
            add(&acct.refused, 1);
            let _ = control
                .write_all(&reply_bytes(reply::NOT_ALLOWED, unbound))
                .await;
            return;
        }
        let Ok(local) = control.local_addr() else {
            return;
        };
        let Some((socket, port)) = self.bind_association(local.ip()) else {
            let _ = control
                .write_all(&reply_bytes(reply::GENERAL_FAILURE, unbound))
                .await;
            return;
        };
        let advertised = SocketAddr::new(self.cfg.public_address.unwrap_or(local.ip()), port);
        if control
            .write_all(&reply_bytes(reply::SUCCEEDED, advertised))
            .await
            .is_err()
        {
            self.release(port);
            return;
        }
        add(&acct.associations, 1);
        add(&acct.active_associations, 1);
        debug!("SOCKS5 {peer}: UDP association on {advertised}");
        // The request may name the client's port (0.0.0.0:0 when it does not know it yet).
        let client_port = match dest {
            Dest::Ip(a) if a.port() != 0 => Some(a.port()),
            _ => None,
        };
        let mut assoc = Association {
            client_ip: crate::config::canonical(peer.ip()),
            client: client_port.map(|p| SocketAddr::new(peer.ip(), p)),
            local: local.ip(),
            port,
            account: account as u16,
            contacted: HashSet::new(),
            names: HashMap::new(),
            fast: Vec::new(),
        };
        let mut probe = [0u8; 64];
        // XDP's packet count for the association when it was last idle-checked.
        let mut xdp_packets = 0;
        loop {
            tokio::select! {
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
        // Out of the fast path first, so that nothing more is relayed for it, then account
        // what XDP carried (and let the flow's next hops go).
        for flow in assoc.fast.drain(..) {
            for (d, t) in self.datapath.socks_close(flow.id).iter().enumerate() {
                add(&acct.udp_xdp_packets[d], t.packets);
                add(&acct.udp_xdp_bytes[d], t.bytes);
            }
        }
        drop(socket);
        self.release(port);
        acct.active_associations.fetch_sub(1, Ordering::Relaxed);
    }

    fn bind_association(&self, local: IpAddr) -> Option<(UdpSocket, u16)> {
        let unspecified = if local.is_ipv4() {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        for _ in 0..64 {
            let port = self
                .ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()?;
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
                        assoc.names.insert((name, p), a);
                        a
                    }
                }
            }
        };
        if dest.is_ipv4() != assoc.local.is_ipv4() || self.policy.check(dest).is_err() {
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
        let hops = nexthops.for_session(&ends).await;
        if let Some(id) = self.datapath.socks_open(ends, assoc.account, hops.slots()) {
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

/// Copies until EOF, counting bytes, then shuts down the writer.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                add(bytes, n as u64);
            }
        }
    }
    let _ = to.shutdown().await;
}

impl Account {
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
            configured: 1,
            udp_xdp: [0, 1].map(|d| Traffic {
                packets: l(&self.udp_xdp_packets[d]),
                bytes: l(&self.udp_xdp_bytes[d]),
            }),
        }
    }
}

impl Server {
    /// Publishes the accounts to the pinned `USERS` map once a second, forever.
    pub async fn publish(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for (i, a) in self.accounts.iter().enumerate() {
                if let Err(e) = self.datapath.set_user(i as u32, &a.snapshot()) {
                    debug!("publishing SOCKS5 accounts: {e:#}");
                    break;
                }
            }
        }
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
/// shuts down `to` for writing. Counts the bytes moved.
async fn splice_copy(from: &TcpStream, to: &TcpStream, pipe: Pipe, bytes: &AtomicU64) {
    use std::os::fd::AsRawFd as _;
    const CHUNK: usize = 1 << 16;
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    'outer: loop {
        if from.readable().await.is_err() {
            break;
        }
        let n = match from.try_io(Interest::READABLE, || splice(src, pw, CHUNK)) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
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
    }
    // SAFETY: shutdown(2) on a socket we hold; it only ends our sending.
    unsafe { libc::shutdown(dst, libc::SHUT_WR) };
}
