//! SOCKS5 CONNECT bytes carried by the kernel (sockmap, `connect_path = "kernel"`): the
//! controller puts both sockets of a CONNECT in the pinned `SPLICE` sockhash, and the stream
//! verdict of the XDP object sends what arrives on one out of the other. While both sides keep
//! up no byte enters userspace and no system call runs per chunk; the controller watches for
//! the end of each direction, counts, grants the verdict credit, and forwards what the verdict
//! hands to it: bytes from before the reply, and whatever exceeds the credit while the other
//! side lags (see `relay_common::splice` for the credit and why the order stays exact).
//!
//! [`Splicer`] is the one writer of `SPLICE`, `SPLICE_LINKS` and the creation and removal of
//! `SPLICE_COUNTS` entries (whose counts the verdict alone writes).

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsRawFd as _, RawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{HashMap, MapData, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf,
};
use log::{debug, warn};
use relay_common::{
    maps,
    splice::{SpliceCount, SpliceLink, SPLICE_WINDOW},
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpStream, sync::Notify};

/// The stream verdict's name in the object.
const VERDICT: &str = "splice";

/// The kernel path's maps, and whether new CONNECTs may use it.
pub struct Splicer {
    sockets: Mutex<SockHash<MapData, u64>>,
    links: Mutex<HashMap<MapData, u64, SpliceLink>>,
    counts: Mutex<HashMap<MapData, u64, SpliceCount>>,
    /// The verdict's messages that a socket's peer fell behind, until [`Splicer::watch`]
    /// takes them.
    behind: Mutex<Option<RingBuf<MapData>>>,
    /// Who to wake when a socket's peer fell behind, by cookie (the CONNECT's task).
    waiters: Mutex<StdHashMap<u64, Arc<Notify>>>,
    /// The verdict is attached: new CONNECTs are carried in the kernel.
    enabled: bool,
}

/// What the controller keeps about one CONNECT carried in the kernel (handed over with its
/// sockets). Index 0 is the client's socket, 1 the upstream's.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Socket cookies (0: that socket is not in the sockhash; the controller copies what
    /// arrives on it). A cookie is the kernel's, so it holds in a successor too.
    pub cookies: [u64; 2],
    /// Bytes the controller read from each socket (and wrote to the other).
    pub read: [u64; 2],
    /// Bytes each socket must have taken into its send queue (as `queued` counts them), the
    /// peer's redirected bytes not included: what the controller wrote, from a base taken
    /// before the kernel could send anything out of it.
    pub expect: [u64; 2],
    /// Redirected bytes from each socket already added to the user's account.
    pub accounted: [u64; 2],
    /// Directions (by source socket) that reached their end and were shut down.
    pub done: [bool; 2],
}

impl Splicer {
    /// Takes the maps from the loaded object; with `attach`, loads the stream verdict and
    /// attaches it to `SPLICE` (if the kernel refuses, with a warning, CONNECTs are spliced by
    /// the controller). `fresh`: no relay ran on these maps
    /// just before (no handover), so every link and count left behind is stale.
    pub fn take(bpf: &mut Ebpf, attach: bool, fresh: bool) -> anyhow::Result<Splicer> {
        let take = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| anyhow!("the XDP object has no map {name}"))
        };
        let sockets: SockHash<MapData, u64> = take(bpf, maps::SPLICE)?.try_into()?;
        let links: HashMap<MapData, u64, SpliceLink> = take(bpf, maps::SPLICE_LINKS)?.try_into()?;
        let counts: HashMap<MapData, u64, SpliceCount> =
            take(bpf, maps::SPLICE_COUNTS)?.try_into()?;
        let behind: RingBuf<MapData> = take(bpf, maps::SPLICE_BEHIND)?.try_into()?;
        let enabled = attach
            && match attach_verdict(bpf, &sockets) {
                Ok(()) => true,
                Err(e) => {
                    warn!("{e:#}; SOCKS5 CONNECTs are spliced by the controller");
                    false
                }
            };
        let splicer = Splicer {
            sockets: Mutex::new(sockets),
            links: Mutex::new(links),
            counts: Mutex::new(counts),
            behind: Mutex::new(Some(behind)),
            waiters: Mutex::new(StdHashMap::new()),
            enabled,
        };
        if fresh {
            splicer.clear();
        }
        Ok(splicer)
    }

    /// Whether new CONNECTs are carried in the kernel.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Reads the verdict's messages that a socket's peer fell behind, forever, and wakes the
    /// CONNECT that waits for them (call once, in the runtime).
    pub async fn watch(self: Arc<Self>) {
        let Some(ring) = self.behind.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let read = |ring: &mut RingBuf<MapData>| {
            let mut cookies = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(bytes) = item.get(..8) {
                    cookies.push(u64::from_ne_bytes(bytes.try_into().unwrap_or_default()));
                }
            }
            let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            for c in cookies {
                if let Some(w) = waiters.get(&c) {
                    w.notify_one();
                }
            }
        };
        let lost = "a CONNECT whose client falls behind goes through the controller";
        // SAFETY: the ring's descriptor belongs to the map it wraps, which lives as long as
        // the ring; it is never closed or replaced meanwhile.
        unsafe { crate::readable::each_readable(ring, "the CONNECT verdict's ring", lost, read) }
            .await;
    }

    /// What wakes when the peer of the socket `cookie` falls behind (until [`Splicer::unwatch`]).
    pub fn waiter(&self, cookie: u64) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(waiters.entry(cookie).or_default())
    }

    /// Stops waking anyone for `cookie`.
    pub fn unwatch(&self, cookie: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie);
    }

    /// Drops every link and count (their sockets closed with a controller that did not hand
    /// them over).
    fn clear(&self) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<u64> = links.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = links.remove(&k);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<u64> = counts.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = counts.remove(&k);
        }
    }

    /// Puts a socket in the sockhash, sending what arrives on it out of `peer` (0: to the
    /// controller), whose send queue has taken `expect` bytes (as [`queued`] counts them).
    /// Returns its cookie, or 0 if it could not be added (then nothing changed).
    fn add(&self, s: &TcpStream, peer: u64, expect: u64) -> u64 {
        match self.try_add(s, peer, expect) {
            Ok(cookie) => cookie,
            Err(e) => {
                debug!("CONNECT socket not carried in the kernel: {e:#}");
                0
            }
        }
    }

    fn try_add(&self, s: &TcpStream, peer: u64, expect: u64) -> anyhow::Result<u64> {
        let cookie = cookie(s.as_raw_fd())?;
        let fd = s.as_raw_fd();
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cookie, SpliceCount::default(), 0)?;
        self.link(
            cookie,
            SpliceLink {
                peer,
                drained: 0,
                allow: SPLICE_WINDOW,
                expect,
                offered: 0,
            },
        );
        let added = self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cookie, fd, 0);
        if let Err(e) = added {
            self.forget(cookie);
            return Err(e.into());
        }
        // Bytes that arrived before the socket was added wait in its receive queue until the
        // next "data ready"; raising it now sends them through the verdict, in order, before
        // anything newer.
        kick(fd)?;
        Ok(cookie)
    }

    /// Sets where what arrives on `cookie` goes.
    pub fn link(&self, cookie: u64, link: SpliceLink) {
        if cookie == 0 {
            return;
        }
        if let Err(e) = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cookie, link, 0)
        {
            debug!("CONNECT link {cookie}: {e}");
        }
    }

    /// Lets the verdict redirect `offered` more bytes from `cookie` toward a peer that fell
    /// behind: the receive window the sender had been offered before the controller closed it.
    pub fn offer(&self, cookie: u64, offered: u64) {
        if cookie == 0 {
            return;
        }
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(link) = links.get(&cookie, 0) {
            let _ = links.insert(cookie, SpliceLink { offered, ..link }, 0);
        }
    }

    /// What the verdict counted for `cookie` (zero for a socket it does not carry).
    pub fn count(&self, cookie: u64) -> SpliceCount {
        if cookie == 0 {
            return SpliceCount::default();
        }
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cookie, 0)
            .unwrap_or_default()
    }

    /// Drops a socket's link and count (its socket is closed, or never made it in).
    pub fn forget(&self, cookie: u64) {
        if cookie == 0 {
            return;
        }
        self.unwatch(cookie);
        let _ = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie);
        let _ = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cookie);
    }

    /// Forgets both sockets of a CONNECT that ended (call once they are closed).
    pub fn end(&self, c: &Carried) {
        for k in c.cookies {
            self.forget(k);
        }
    }

    /// Puts a CONNECT on the kernel path: the upstream's socket first, holding what it sends
    /// in its receive queue until [`Splicer::link_upstream`] (the client must get the reply
    /// first; what came before it was added goes to the controller), then the client's,
    /// linked to the upstream at once. Call after the early bytes went to the
    /// upstream and before the reply; `None` if neither socket could be added.
    pub fn start(&self, client: &TcpStream, upstream: &TcpStream) -> Option<Carried> {
        let up = self.add(upstream, 0, 0);
        if up != 0 {
            // Until it is linked, what the upstream sends waits in its receive queue rather
            // than going to the controller (TCP signals "data ready" only past the low-water
            // mark, which the kernel caps at half the buffer); linking lowers it again.
            let _ = set_rcvlowat(upstream.as_raw_fd(), libc::c_int::MAX);
        }
        // The base is taken before the client's bytes can be redirected into the upstream.
        let base = queued(upstream.as_raw_fd()).unwrap_or(0);
        let cl = self.add(client, up, base);
        if up == 0 && cl == 0 {
            return None;
        }
        Some(Carried {
            cookies: [cl, up],
            expect: [0, base],
            ..Carried::default()
        })
    }

    /// Once the reply is in the client's socket: what the upstream sends goes to the client
    /// from now on (after whatever the controller still holds of it).
    pub fn link_upstream(&self, c: &mut Carried, client: &TcpStream, upstream: &TcpStream) {
        c.expect[0] = queued(client.as_raw_fd()).unwrap_or(0);
        self.link(
            c.cookies[1],
            SpliceLink {
                peer: c.cookies[0],
                drained: c.read[1],
                allow: SPLICE_WINDOW,
                expect: c.expect[0],
                offered: 0,
            },
        );
        // What arrived since `start` goes through the verdict now, after the reply.
        if c.cookies[1] != 0 {
            let _ = kick(upstream.as_raw_fd());
        }
    }
}

/// Loads the stream verdict and attaches it to `SPLICE` (replacing a predecessor's).
fn attach_verdict(bpf: &mut Ebpf, sockets: &SockHash<MapData, u64>) -> anyhow::Result<()> {
    let prog: &mut SkSkb = bpf
        .program_mut(VERDICT)
        .ok_or_else(|| anyhow!("the XDP object has no program {VERDICT}"))?
        .try_into()?;
    prog.load().context("loading the CONNECT stream verdict")?;
    let link = prog
        .attach(sockets.fd())
        .context("attaching the CONNECT stream verdict to its sockhash")?;
    // The attachment lives with the pinned map, not with this process: a successor replaces
    // it, and sockets keep the verdict they were added with. So the link is never detached.
    std::mem::forget(prog.take_link(link)?);
    Ok(())
}

const SO_COOKIE: libc::c_int = 57;

/// One socket option's value, of the type the kernel writes for it.
fn sockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> std::io::Result<T> {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`, which has room for a `T`; every
    // `T` used here (integers, `tcp_info`) is valid zeroed or partly written.
    let rc = unsafe { libc::getsockopt(fd, level, name, v.as_mut_ptr().cast(), &raw mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zeroed, then (partly) written by the kernel: see above.
    Ok(unsafe { v.assume_init() })
}

/// The kernel's cookie of a socket (stable for its life, the key of the sockhash).
pub fn cookie(fd: RawFd) -> std::io::Result<u64> {
    sockopt(fd, libc::SOL_SOCKET, SO_COOKIE)
}

/// Sets SO_RCVLOWAT to 1 (its default), which makes TCP signal "data ready" if bytes wait.
pub fn kick(fd: RawFd) -> std::io::Result<()> {
    set_rcvlowat(fd, 1)
}

/// Sets SO_RCVLOWAT: below it TCP does not signal "data ready", so on a socket in the sockhash
/// the verdict does not run and arriving bytes wait in the receive queue (TCP caps it at half
/// the receive buffer).
pub fn set_rcvlowat(fd: RawFd, bytes: libc::c_int) -> std::io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Closes a socket's receive window to the least TCP allows (`TCP_WINDOW_CLAMP`): the sender
/// stops once it has sent what the window already offered. Returns the clamp to restore.
pub fn clamp_window(fd: RawFd) -> std::io::Result<libc::c_int> {
    let was = sockopt::<libc::c_int>(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP)?;
    close_window(fd)?;
    Ok(was)
}

/// Sets the least window clamp TCP allows (again: its receive buffer tuning raises the clamp
/// when it grows the buffer, as bytes are taken from the socket).
pub fn close_window(fd: RawFd) -> std::io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, 1)
}

/// Gives a socket back the window clamp [`clamp_window`] returned (TCP's receive buffer
/// tuning raises it from there as before).
pub fn unclamp_window(fd: RawFd, was: libc::c_int) -> std::io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, was)
}

fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads one c_int from `v`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes a TCP socket has taken into its send queue since it connected (acknowledged plus
/// still queued), up to a constant: only differences of it mean anything.
pub fn queued(fd: RawFd) -> std::io::Result<u64> {
    let acked = acked(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut outq) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// Bytes of a TCP socket its receiver acknowledged, in the units of [`queued`].
pub fn acked(fd: RawFd) -> std::io::Result<u64> {
    tcp_info(fd).map(|i| i.tcpi_bytes_acked)
}

fn tcp_info(fd: RawFd) -> std::io::Result<libc::tcp_info> {
    sockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// `tcpi_state` of a connection that is over (reset, or closed both ways).
const TCP_CLOSE: u8 = 7;

/// Whether a socket's connection failed (a reset, or sending into one): its pending error,
/// taken. A connection that closed in order has none (its state alone says nothing: a socket
/// whose side closed first reads `TCP_CLOSE` after a normal end, too). The controller neither
/// reads nor writes the sockets the kernel carries, so it would not see a reset otherwise.
pub fn reset(fd: RawFd) -> bool {
    sockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR).map_or(true, |err| err != 0)
}

/// Waits until `to` has taken `want` bytes (as [`queued`] counts them) into its send queue, or
/// for at most `limit` without progress: the bytes the kernel redirected into it are sent by a kernel worker,
/// and shutting down its writing half before they are in would lose them.
pub async fn flushed(to: &TcpStream, want: u64, limit: Duration) -> bool {
    flushed_holding(to, want, limit, None).await
}

/// [`flushed`], keeping the receive window of `hold` closed meanwhile (TCP's receive buffer
/// tuning may open it again as bytes are taken from the socket).
pub async fn flushed_holding(
    to: &TcpStream,
    want: u64,
    limit: Duration,
    hold: Option<RawFd>,
) -> bool {
    let mut start = tokio::time::Instant::now();
    let mut step = Duration::from_micros(200);
    // `limit` counts from the last progress: a slow receiver that keeps taking bytes is
    // waited for.
    let mut last = None;
    loop {
        if let Some(fd) = hold {
            let _ = close_window(fd);
        }
        match queued(to.as_raw_fd()) {
            Ok(q) if q >= want => return true,
            Ok(q) => {
                if last.is_some_and(|l| q > l) {
                    start = tokio::time::Instant::now();
                }
                last = Some(q);
            }
            Err(_) => return false,
        }
        // A connection that is over takes nothing more (its queue was dropped with it).
        if tcp_info(to.as_raw_fd()).is_ok_and(|i| i.tcpi_state == TCP_CLOSE) {
            return false;
        }
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(20));
    }
}
