//! Next hops: which interface and which MAC addresses a rewritten frame gets.
//!
//! The kernel knows, and the controller asks it over rtnetlink: the routing table says which
//! interface and gateway lead to an address (`RTM_GETROUTE`, what `ip route get` does), the
//! neighbour table says the gateway's MAC (`RTM_GETNEIGH`, `ip neigh get`), and the link says
//! its own MAC and MTU (`RTM_GETLINK`). Sessions refer to a slot of the small `NEXTHOPS` table;
//! the slots are refreshed every second, so a neighbour that becomes reachable or changes its
//! MAC is picked up without touching the sessions, and the fast path pays one array read per
//! packet instead of a `bpf_fib_lookup` (which also insists on IP forwarding being enabled on
//! the interface, something a relay should not need).
//!
//! [`NextHops`] owns the rtnetlink socket on a thread of its own (the round trips block, up to
//! the socket's one-second timeout), answers the queries of new sessions through a channel,
//! refreshes the slots and writes them through [`Datapath`]. A slot is held by the [`Hops`] of
//! every session record that refers to it and freed when the last one is dropped.

use std::{
    collections::HashMap,
    io,
    mem::size_of,
    net::IpAddr,
    os::fd::AsRawFd as _,
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{debug, warn};
use relay_common::{
    packet::{FAMILY_V4, FAMILY_V6},
    session::{Nexthop, NexthopKey, NEXTHOP_NONE, NEXTHOP_SLOTS},
};
use tokio::sync::oneshot;

use crate::datapath::Datapath;

/// Where the routing table sends packets for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub oif: u32,
    /// The gateway, or `None` when the destination is on the link.
    pub gateway: Option<IpAddr>,
    /// The route's own MTU (`ip route ... mtu N`), if it sets one; 0 if not.
    pub mtu: u32,
}

/// The route in an RTM_NEWROUTE answer (after its 12-byte `rtmsg` header).
fn parse_route(reply: &[u8]) -> Route {
    let mut route = Route {
        oif: 0,
        gateway: None,
        mtu: 0,
    };
    for (kind, data) in attrs(reply, 12) {
        match kind {
            RTA_OIF => route.oif = u32_at(data, 0).unwrap_or(0),
            RTA_GATEWAY => route.gateway = ip_from(data),
            // RTA_VIA: 2-byte family, then the address (IPv4 routes via IPv6).
            RTA_VIA => route.gateway = data.get(2..).and_then(ip_from),
            RTA_METRICS => {
                if let Some((_, mtu)) = attrs(data, 0).find(|(k, _)| *k == RTAX_MTU) {
                    route.mtu = u32_at(mtu, 0).unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    route
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
/// `ndm_flags`: "use" the entry (resolve or confirm it).
const NTF_USE: u8 = 0x01;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_VIA: u16 = 18;
const RTA_SRC: u16 = 2;
const RTA_METRICS: u16 = 8;
const RTAX_MTU: u16 = 2;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
/// Neighbour states whose MAC address can be used (reachable, stale, delay, probe, noarp,
/// permanent).
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// A link's own MAC address and MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// An rtnetlink socket for route queries.
pub struct Netlink {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Netlink { fd, seq: 1 })
    }

    /// Sends one request and returns the body of the answer of type `answer` (`None` when the
    /// kernel answers with an error that means "no such thing").
    fn request(&mut self, kind: u16, body: &[u8], answer: u16) -> io::Result<Option<Vec<u8>>> {
        self.send_request(kind, NLM_F_REQUEST, body, answer)
    }

    fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
        answer: u16,
    ) -> io::Result<Option<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is a readable buffer of the length passed.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: `buf` is a writable buffer of the length passed.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(reply) = find_reply(&buf[..n as usize], self.seq, answer)? {
                return Ok(reply);
            }
        }
    }

    /// `ip route get DST [from SRC]`: the route the kernel would use for packets from `src`
    /// (a relay address, so that source-based rules apply), or `None` if there is none.
    pub fn route_get(&mut self, dst: IpAddr, src: Option<IpAddr>) -> io::Result<Option<Route>> {
        let (family, addr) = family_and_bytes(dst);
        let src = src
            .filter(|s| !s.is_unspecified() && s.is_ipv4() == dst.is_ipv4())
            .map(|s| family_and_bytes(s).1);
        let src_len = src.as_ref().map_or(0, |s| (s.len() * 8) as u8);
        let mut body = vec![family, (addr.len() * 8) as u8, src_len, 0, 0, 0, 0, 0];
        body.extend_from_slice(&0u32.to_ne_bytes());
        push_attr(&mut body, RTA_DST, &addr);
        if let Some(src) = &src {
            push_attr(&mut body, RTA_SRC, src);
        }
        let Some(reply) = self.request(RTM_GETROUTE, &body, RTM_NEWROUTE)? else {
            return Ok(None);
        };
        let route = parse_route(&reply);
        Ok((route.oif != 0).then_some(route))
    }

    /// `ip neigh get ADDR dev OIF`: the neighbour's MAC if the kernel has a usable one.
    pub fn neigh_get(&mut self, addr: IpAddr, oif: u32) -> io::Result<Option<[u8; 6]>> {
        let (family, bytes) = family_and_bytes(addr);
        let mut body = vec![family, 0, 0, 0];
        body.extend_from_slice(&(oif as i32).to_ne_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        push_attr(&mut body, NDA_DST, &bytes);
        let Some(reply) = self.request(RTM_GETNEIGH, &body, RTM_NEWNEIGH)? else {
            return Ok(None);
        };
        let state = u16_at(&reply, 8).unwrap_or(0);
        if state & NUD_USABLE == 0 {
            return Ok(None);
        }
        let mac = attrs(&reply, 12)
            .find(|(k, _)| *k == NDA_LLADDR)
            .and_then(|(_, d)| <[u8; 6]>::try_from(d).ok());
        Ok(mac)
    }

    /// `ip neigh replace ADDR dev OIF use`: makes the kernel resolve the neighbour (or
    /// confirm a stale entry) as if a packet were on its way to it. Packets XDP sends never
    /// pass the neighbour table, so without this an entry only the fast path uses would age
    /// out, and one nobody has sent to yet would never be resolved.
    pub fn neigh_use(&mut self, addr: IpAddr, oif: u32) -> io::Result<()> {
        let (family, bytes) = family_and_bytes(addr);
        let mut body = vec![family, 0, 0, 0];
        body.extend_from_slice(&(oif as i32).to_ne_bytes());
        // ndm_state 0, ndm_flags NTF_USE, ndm_type 0.
        body.extend_from_slice(&0u16.to_ne_bytes());
        body.extend_from_slice(&[NTF_USE, 0]);
        push_attr(&mut body, NDA_DST, &bytes);
        self.send_request(
            RTM_NEWNEIGH,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &body,
            NLMSG_ERROR,
        )
        .map(drop)
    }

    /// A link's MAC address and MTU.
    pub fn link_get(&mut self, ifindex: u32) -> io::Result<Option<Link>> {
        let mut body = vec![0u8, 0, 0, 0];
        body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        body.extend_from_slice(&[0; 8]);
        let Some(reply) = self.request(RTM_GETLINK, &body, RTM_NEWLINK)? else {
            return Ok(None);
        };
        let mut link = Link {
            mac: [0; 6],
            mtu: 0,
        };
        for (kind, data) in attrs(&reply, 16) {
            match kind {
                IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(data).unwrap_or_default(),
                IFLA_MTU => link.mtu = u32_at(data, 0).unwrap_or(0),
                _ => {}
            }
        }
        Ok(Some(link))
    }

    /// The `NEXTHOPS` value for sending to `via` out of `oif` (unresolved: ifindex 0, so the
    /// fast path hands such packets to the controller, whose sending makes the kernel resolve
    /// the neighbour).
    ///
    /// The MTU is the link's, or the route's (`route_mtu`, 0 for none) where it is smaller.
    pub fn nexthop(&mut self, oif: u32, via: IpAddr, route_mtu: u32) -> io::Result<Nexthop> {
        let (Some(link), Some(mac)) = (self.link_get(oif)?, self.neigh_get(via, oif)?) else {
            return Ok(Nexthop::default());
        };
        let mtu = if route_mtu == 0 {
            link.mtu
        } else {
            link.mtu.min(route_mtu)
        };
        Ok(Nexthop {
            ifindex: oif,
            mtu: mtu.min(u32::from(u16::MAX)) as u16,
            src_mac: link.mac,
            dst_mac: mac,
            _pad: [0; 2],
        })
    }
}

fn family_and_bytes(ip: IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

fn push_attr(body: &mut Vec<u8>, kind: u16, data: &[u8]) {
    body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    body.extend_from_slice(&kind.to_ne_bytes());
    body.extend_from_slice(data);
    while !body.len().is_multiple_of(4) {
        body.push(0);
    }
}

/// The attributes of a message body, after its fixed header of `skip` bytes.
fn attrs(body: &[u8], skip: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = skip;
    std::iter::from_fn(move || {
        let len = u16_at(body, at)? as usize;
        let kind = u16_at(body, at + 2)? & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        let data = &body[at + 4..at + len];
        at += (len + 3) & !3;
        Some((kind, data))
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Finds the answer to `seq` in one datagram: `Some(Some(body))` for a message of type
/// `answer`, `Some(None)` for a "not found" error, `None` if the datagram holds no answer.
fn find_reply(buf: &[u8], seq: u32, answer: u16) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32_at(buf, off).unwrap_or(0) as usize;
        let kind = u16_at(buf, off + 4).unwrap_or(0);
        let msg_seq = u32_at(buf, off + 8).unwrap_or(0);
        if len < 16 || off + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &buf[off + 16..off + len];
        if msg_seq == seq {
            if kind == NLMSG_ERROR {
                let errno = u32_at(body, 0).unwrap_or(0) as i32;
                return match -errno {
                    // The acknowledgement asked for.
                    0 if answer == NLMSG_ERROR => Ok(Some(None)),
                    0 => Ok(None),
                    libc::ENETUNREACH
                    | libc::EHOSTUNREACH
                    | libc::ESRCH
                    | libc::ENOENT
                    | libc::ENODEV => Ok(Some(None)),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            if kind == answer {
                return Ok(Some(Some(body.to_vec())));
            }
        }
        off += (len + 3) & !3;
    }
    Ok(None)
}

/// What a slot is for: interface, the address on the link (gateway, or the destination
/// itself), and the route's MTU (0: the link's).
pub type Key = (u32, IpAddr, u32);

/// The slots of `NEXTHOPS` in use, keyed by [`Key`], each with the number of session records
/// that refer to it.
#[derive(Default)]
pub struct Table {
    by_key: HashMap<Key, u16>,
    /// Per slot: its key and how many holders it has (`None`: free).
    slots: Vec<Option<(Key, u32)>>,
    /// Slots freed since, reused before new ones.
    free: Vec<u16>,
}

/// How many slots there are: the map's size, below the "no next hop" marker.
const SLOTS: usize = if (NEXTHOP_SLOTS as usize) < NEXTHOP_NONE as usize {
    NEXTHOP_SLOTS as usize
} else {
    NEXTHOP_NONE as usize
};

impl Table {
    /// Takes a reference on the slot for `(oif, via)`; returns it and whether it was just
    /// allocated (and so must be written before use), or `None` when all are taken.
    pub fn acquire(&mut self, key: Key) -> Option<(u16, bool)> {
        if let Some(&s) = self.by_key.get(&key) {
            if let Some((_, refs)) = self.slots[usize::from(s)].as_mut() {
                *refs += 1;
            }
            return Some((s, false));
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < SLOTS => {
                self.slots.push(None);
                (self.slots.len() - 1) as u16
            }
            None => return None,
        };
        self.slots[usize::from(s)] = Some((key, 1));
        self.by_key.insert(key, s);
        Some((s, true))
    }

    /// Drops a reference on `slot`; returns true when that was the last one and the slot is
    /// free again.
    pub fn release(&mut self, slot: u16) -> bool {
        let Some(entry) = self.slots.get_mut(usize::from(slot)) else {
            return false;
        };
        let Some((key, refs)) = entry.as_mut() else {
            return false;
        };
        *refs -= 1;
        if *refs > 0 {
            return false;
        }
        self.by_key.remove(key);
        *entry = None;
        self.free.push(slot);
        true
    }

    /// Takes a reference on `slot`, which a record left by a previous controller refers to,
    /// for `key` (what that controller wrote down for it; `None` if unknown: the slot is then
    /// held but never refreshed or shared). Call before any [`Table::acquire`].
    pub fn adopt(&mut self, slot: u16, key: Option<Key>) {
        let i = usize::from(slot);
        if i >= SLOTS {
            return;
        }
        while self.slots.len() <= i {
            self.free.push(self.slots.len() as u16);
            self.slots.push(None);
        }
        match (&mut self.slots[i], key) {
            (Some((_, refs)), _) => *refs += 1,
            (entry @ None, Some(key)) => {
                *entry = Some((key, 1));
                self.by_key.entry(key).or_insert(slot);
                self.free.retain(|s| *s != slot);
            }
            (None, None) => {
                // Held under a key nothing can match: an address no route has.
                let key = (
                    u32::MAX,
                    IpAddr::V6(std::net::Ipv6Addr::from(u128::from(slot))),
                    0,
                );
                self.slots[i] = Some((key, 1));
                self.free.retain(|s| *s != slot);
            }
        }
    }

    /// The slots in use, with what each is for.
    pub fn entries(&self) -> impl Iterator<Item = (u16, Key)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|(key, _)| (i as u16, key)))
            .filter(|(_, (oif, _, _))| *oif != u32::MAX)
    }
}

/// The next-hop slots of one session record, [to the upstream, to the client]. Hold it as long
/// as the record is in the maps: dropping it releases the slots.
pub struct Hops {
    slots: [u16; 2],
    owner: Option<mpsc::Sender<Request>>,
}

impl Hops {
    /// No next hops: the controller relays both directions.
    pub fn none() -> Hops {
        Hops {
            slots: [NEXTHOP_NONE; 2],
            owner: None,
        }
    }

    pub fn slots(&self) -> [u16; 2] {
        self.slots
    }
}

impl Drop for Hops {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            for slot in self.slots.into_iter().filter(|s| *s != NEXTHOP_NONE) {
                // The thread is gone only when the process ends.
                let _ = owner.send(Request::Release(slot));
            }
        }
    }
}

enum Request {
    /// Slots for packets to two addresses (to the upstream, to the client), each sent from a
    /// relay address (the session's back and front).
    Acquire {
        to: [(IpAddr, IpAddr); 2],
        reply: oneshot::Sender<Hops>,
    },
    Release(u16),
    /// Slots a record left by a previous controller refers to, held from now on.
    Adopt([u16; 2]),
    /// Stop (the process hands over to a successor, which writes `NEXTHOPS` from now on).
    Stop,
}

/// The next hops [`NextHops::ask`] was asked for.
pub struct Answer(Option<oneshot::Receiver<Hops>>);

impl Answer {
    /// No question asked: no next hops (the controller relays both directions).
    pub fn none() -> Answer {
        Answer(None)
    }
}

impl std::future::Future for Answer {
    type Output = Hops;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Hops> {
        match self.0.as_mut() {
            None => std::task::Poll::Ready(Hops::none()),
            Some(rx) => std::pin::Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Hops::none())),
        }
    }
}

/// The next-hop service: the rtnetlink socket and the slot table, on their own thread.
pub struct NextHops {
    requests: mpsc::Sender<Request>,
}

impl NextHops {
    /// Opens the rtnetlink socket and starts the thread that owns it. `egress` are the
    /// interfaces XDP is attached to: only these can be a next hop's interface.
    pub fn start(datapath: Arc<Datapath>, egress: Vec<u32>) -> anyhow::Result<NextHops> {
        let netlink = Netlink::open().context("opening an rtnetlink socket")?;
        let (requests, rx) = mpsc::channel();
        let mut resolver = Resolver {
            netlink,
            table: Table::default(),
            datapath,
            egress,
            requests: requests.clone(),
            retries: 0,
        };
        std::thread::Builder::new()
            .name("nexthops".into())
            .spawn(move || resolver.run(&rx))
            .context("starting the next-hop thread")?;
        Ok(NextHops { requests })
    }

    /// Holds the slots `slots` of a record a previous controller left in the maps (with the
    /// keys it wrote down in `NEXTHOP_KEYS`); the slots stay where they are, so the record is
    /// not rewritten. Requests are answered in order: call before asking for new slots.
    pub fn adopt(&self, slots: [u16; 2]) -> Hops {
        // A session's own next hop (`NEXTHOP_OWN`, in `HOPS`) is no slot of this table.
        let slots = slots.map(|s| {
            if u32::from(s) < relay_common::session::NEXTHOP_SLOTS {
                s
            } else {
                NEXTHOP_NONE
            }
        });
        if slots.iter().all(|s| *s == NEXTHOP_NONE) {
            return Hops::none();
        }
        let _ = self.requests.send(Request::Adopt(slots));
        Hops {
            slots,
            owner: Some(self.requests.clone()),
        }
    }

    /// Stops the thread: from now on nothing here writes `NEXTHOPS`.
    pub fn stop(&self) {
        let _ = self.requests.send(Request::Stop);
    }

    /// Asks for the next hops of a session between `ends.client` and `ends.upstream` and
    /// returns the answer to await; a direction without one (no route, a route by an
    /// interface without XDP, the table full) gets [`NEXTHOP_NONE`] and takes the slow path.
    /// The question is sent at once, so a batch of new sessions asks all its questions
    /// before it waits for the first answer and the next-hop thread answers them back to
    /// back.
    pub fn ask(&self, ends: &crate::datapath::Endpoints) -> Answer {
        let (reply, answer) = oneshot::channel();
        let to = [
            (ends.upstream.ip(), ends.back.ip()),
            (ends.client.ip(), ends.front.ip()),
        ];
        if self.requests.send(Request::Acquire { to, reply }).is_err() {
            return Answer(None);
        }
        Answer(Some(answer))
    }
}

/// What the next-hop thread owns.
struct Resolver {
    netlink: Netlink,
    table: Table,
    datapath: Arc<Datapath>,
    egress: Vec<u32>,
    /// For the [`Hops`] it hands out, which release through it.
    requests: mpsc::Sender<Request>,
    /// Quick looks left while a new slot's neighbour is being resolved.
    retries: u32,
}

/// How often, and how many times, an unresolved new slot is looked at again before the
/// once-a-second refresh takes over (half a second in all).
const RETRY: Duration = Duration::from_millis(20);
const RETRIES: u32 = 25;

impl Resolver {
    /// Answers requests, and refreshes every slot once a second (requests or not).
    fn run(&mut self, rx: &mpsc::Receiver<Request>) {
        let mut next = Instant::now() + Duration::from_secs(1);
        loop {
            match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Request::Acquire { to, reply }) => {
                    let hops = Hops {
                        slots: to.map(|(dst, src)| self.acquire(dst, src)),
                        owner: Some(self.requests.clone()),
                    };
                    // A caller that went away drops the answer, which releases the slots.
                    let _ = reply.send(hops);
                }
                Ok(Request::Release(slot)) => {
                    // A freed slot is written again before it is handed out again.
                    self.table.release(slot);
                }
                Ok(Request::Adopt(slots)) => {
                    for slot in slots.into_iter().filter(|s| *s != NEXTHOP_NONE) {
                        let key = self
                            .datapath
                            .nexthop_key(slot)
                            .ok()
                            .and_then(|k| key_of(&k));
                        self.table.adopt(slot, key);
                    }
                }
                Ok(Request::Stop) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Not while this thread holds a sender itself, but that is no reason to spin.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if self.retries > 0 {
                next = next.min(Instant::now() + RETRY);
            }
            if Instant::now() >= next {
                let slots: Vec<_> = self.table.entries().collect();
                let mut unresolved = false;
                for (slot, key) in slots {
                    unresolved |= !self.refresh(slot, key, false);
                }
                // A neighbour being resolved is looked at again soon: until then its
                // sessions take the slow path, where the kernel queues only a few packets
                // while it resolves.
                self.retries = if unresolved {
                    self.retries.saturating_sub(1)
                } else {
                    0
                };
                next = Instant::now()
                    + if self.retries > 0 {
                        RETRY
                    } else {
                        Duration::from_secs(1)
                    };
            }
        }
    }

    /// A `NEXTHOPS` slot for packets to `dst`, or [`NEXTHOP_NONE`] (slow path) when the route
    /// leaves by an interface XDP is not attached to, or there is no route.
    fn acquire(&mut self, dst: IpAddr, src: IpAddr) -> u16 {
        // From the relay's address, so that source-based rules apply; if the kernel will not
        // answer for that source, as any packet to `dst` would be routed.
        let route = self
            .netlink
            .route_get(dst, Some(src))
            .or_else(|_| self.netlink.route_get(dst, None));
        let route = match route {
            Ok(Some(r)) => r,
            Ok(None) => {
                debug!("no route to {dst}: its packets take the slow path");
                return NEXTHOP_NONE;
            }
            Err(e) => {
                debug!("route to {dst}: {e}");
                return NEXTHOP_NONE;
            }
        };
        if !self.egress.contains(&route.oif) {
            debug!(
                "the route to {dst} leaves by ifindex {}, which XDP is not attached to: slow path",
                route.oif
            );
            return NEXTHOP_NONE;
        }
        let via = route.gateway.unwrap_or(dst);
        let key = (route.oif, via, route.mtu);
        let Some((slot, new)) = self.table.acquire(key) else {
            warn!("the next-hop table is full; sessions via {via} use the slow path");
            return NEXTHOP_NONE;
        };
        if new {
            // What the slot is for first, so that a successor can take it over.
            if let Err(e) = self.datapath.set_nexthop_key(slot, &pinned_key(key)) {
                warn!("next hop {via}: {e:#}");
            }
            if !self.refresh(slot, key, true) {
                self.retries = RETRIES;
            }
        }
        slot
    }

    /// Asks the kernel about slot `slot` again and writes the answer. On an error a slot in
    /// use keeps its last answer; a `new` one (which may still hold the answer for another
    /// next hop, freed since) is written unresolved.
    ///
    /// Returns whether the slot is resolved now.
    fn refresh(&mut self, slot: u16, (oif, via, mtu): Key, new: bool) -> bool {
        // Resolve it, or keep it fresh: sessions XDP alone carries never make the kernel
        // look at the neighbour.
        if let Err(e) = self.netlink.neigh_use(via, oif) {
            debug!("next hop {via}: resolving: {e}");
        }
        let entry = match self.netlink.nexthop(oif, via, mtu) {
            Ok(entry) => entry,
            Err(e) => {
                debug!("next hop {via}: {e}");
                if !new {
                    return true;
                }
                Nexthop::default()
            }
        };
        if let Err(e) = self.datapath.set_nexthop(slot, &entry) {
            warn!("next hop {via}: {e:#}");
        }
        entry.ifindex != 0
    }
}

/// The pinned form of a slot's key.
fn pinned_key((oif, via, mtu): Key) -> NexthopKey {
    NexthopKey {
        via: crate::datapath::addr16(via),
        oif,
        route_mtu: mtu,
        family: family_of(via),
        _pad: [0; 7],
    }
}

/// A slot's key from its pinned form (`None` for a slot never written).
fn key_of(k: &NexthopKey) -> Option<Key> {
    (k.family != 0).then(|| (k.oif, crate::datapath::ip_of(k.family, &k.via), k.route_mtu))
}

pub fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn rta(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    }

    #[test]
    fn route_answers_give_interface_gateway_and_mtu() {
        let mut body = vec![2, 32, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
        body.extend(rta(RTA_OIF, &7u32.to_ne_bytes()));
        body.extend(rta(RTA_GATEWAY, &[198, 18, 2, 254]));
        let mut metrics = rta(3, &9u32.to_ne_bytes());
        metrics.extend(rta(RTAX_MTU, &1400u32.to_ne_bytes()));
        body.extend(rta(RTA_METRICS, &metrics));
        let r = parse_route(&body);
        assert_eq!(
            r,
            Route {
                oif: 7,
                gateway: Some("198.18.2.254".parse().unwrap()),
                mtu: 1400
            }
        );
        let plain = parse_route(&body[..12 + 8 + 8]);
        assert_eq!(plain.mtu, 0, "no metrics: the link's MTU applies");
    }

    #[test]
    fn asks_the_kernel_with_a_source_address() {
        // Read-only queries in this process's namespace; 127.0.0.1 is a local source.
        let mut nl = Netlink::open().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let route = nl.route_get(lo, Some(lo)).unwrap().unwrap();
        assert_eq!(route.gateway, None);
        assert!(nl
            .route_get(lo, Some(IpAddr::from([0u8; 4])))
            .unwrap()
            .is_some());
    }

    #[test]
    fn finds_the_answer_and_its_attributes() {
        let mut body = vec![2, 32, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
        body.extend(rta(RTA_DST, &[203, 0, 113, 7]));
        body.extend(rta(RTA_OIF, &3u32.to_ne_bytes()));
        body.extend(rta(RTA_GATEWAY, &[198, 18, 2, 254]));
        let reply = find_reply(&nlmsg(RTM_NEWROUTE, 9, &body), 9, RTM_NEWROUTE).unwrap();
        let got = reply.unwrap().unwrap();
        let a: Vec<(u16, Vec<u8>)> = attrs(&got, 12).map(|(k, d)| (k, d.to_vec())).collect();
        assert_eq!(a[1], (RTA_OIF, 3u32.to_ne_bytes().to_vec()));
        assert_eq!(a[2], (RTA_GATEWAY, vec![198, 18, 2, 254]));
        assert_eq!(
            find_reply(&nlmsg(RTM_NEWROUTE, 8, &body), 9, RTM_NEWROUTE).unwrap(),
            None,
            "other seq"
        );
    }

    #[test]
    fn not_found_and_errors() {
        for errno in [libc::ENETUNREACH, libc::ENOENT] {
            let e = (-errno).to_ne_bytes();
            assert_eq!(
                find_reply(&nlmsg(NLMSG_ERROR, 1, &e), 1, RTM_NEWNEIGH).unwrap(),
                Some(None)
            );
        }
        let other = (-libc::EPERM).to_ne_bytes();
        assert!(find_reply(&nlmsg(NLMSG_ERROR, 1, &other), 1, RTM_NEWNEIGH).is_err());
        assert!(
            find_reply(&[0xff; 20], 1, RTM_NEWNEIGH).is_err(),
            "garbage is an error, not a panic"
        );
        let broken_attr = [8u8, 0, 1, 0, 1, 2];
        assert_eq!(
            attrs(&broken_attr, 0).count(),
            0,
            "an attribute past the end is ignored"
        );
    }

    #[test]
    fn asks_the_kernel_about_loopback() {
        // Read-only queries in this process's namespace: the route to 127.0.0.1 is on `lo`.
        let mut nl = Netlink::open().unwrap();
        let route = nl
            .route_get("127.0.0.1".parse().unwrap(), None)
            .unwrap()
            .unwrap();
        assert_eq!(route.gateway, None);
        let link = nl.link_get(route.oif).unwrap().unwrap();
        assert_eq!(link.mac, [0; 6], "loopback has an all-zero MAC");
        assert!(link.mtu >= 1500);
        assert_eq!(nl.link_get(u32::MAX >> 1).unwrap(), None, "no such link");
    }

    #[test]
    fn slots_are_shared_and_bounded() {
        let mut t = Table::default();
        let gw: IpAddr = "198.18.2.254".parse().unwrap();
        assert_eq!(t.acquire((3, gw, 0)), Some((0, true)));
        assert_eq!(t.acquire((4, gw, 0)), Some((1, true)));
        assert_eq!(t.acquire((3, gw, 0)), Some((0, false)), "shared, not new");
        for i in 2..NEXTHOP_SLOTS {
            assert!(t.acquire((5, IpAddr::from((i).to_be_bytes()), 0)).is_some());
        }
        assert_eq!(t.acquire((9, gw, 0)), None, "full");
    }

    #[test]
    fn slots_taken_over_stay_where_the_records_point() {
        // A predecessor's records use slots 3 (twice) and 5; slot 5's key is unknown.
        let mut t = Table::default();
        let gw: IpAddr = "198.18.2.254".parse().unwrap();
        t.adopt(3, Some((7, gw, 0)));
        t.adopt(3, Some((7, gw, 0)));
        t.adopt(5, None);
        t.adopt(NEXTHOP_NONE, None);
        assert_eq!(
            t.acquire((7, gw, 0)),
            Some((3, false)),
            "the same next hop shares it"
        );
        let other: IpAddr = "198.18.2.253".parse().unwrap();
        let (slot, new) = t.acquire((7, other, 0)).unwrap();
        assert!(
            new && slot != 3 && slot != 5,
            "a free slot, not a taken-over one: {slot}"
        );
        assert!(
            !t.release(3) && !t.release(3),
            "two records still use slot 3"
        );
        assert!(t.release(3));
        // The slot of unknown purpose is held, never refreshed, freed with its record.
        assert!(t.entries().all(|(s, _)| s != 5));
        assert!(t.release(5));
        let mut seen = std::collections::HashSet::new();
        while let Some((s, _)) = t.acquire((8, IpAddr::from((seen.len() as u32).to_be_bytes()), 0))
        {
            assert!(seen.insert(s), "slot {s} handed out twice");
        }
        assert_eq!(
            seen.len() + 1,
            SLOTS,
            "every slot but the one in use is free again"
        );
    }

    #[test]
    fn slots_are_freed_when_their_last_session_ends() {
        // More distinct on-link peers over time than there are slots, never more at once:
        // each gets a slot (a table that never frees would refuse the 1025th).
        let mut t = Table::default();
        let peer = |i: u32| IpAddr::from(i.to_be_bytes());
        for i in 0..3 * NEXTHOP_SLOTS {
            let (slot, new) = t.acquire((3, peer(i), 0)).expect("a slot for every peer");
            assert!(new);
            assert!(t.release(slot), "its only session ended");
        }
        assert_eq!(t.entries().count(), 0);
        // A slot two sessions share lives until the second ends, then is reused.
        let (a, _) = t.acquire((3, peer(1), 0)).unwrap();
        assert_eq!(t.acquire((3, peer(1), 0)), Some((a, false)));
        assert!(!t.release(a), "one session still uses it");
        assert_eq!(t.entries().collect::<Vec<_>>(), vec![(a, (3, peer(1), 0))]);
        assert!(t.release(a));
        assert_eq!(t.acquire((4, peer(2), 0)), Some((a, true)), "reused");
        assert!(!t.release(NEXTHOP_NONE), "not a slot");
    }
}
