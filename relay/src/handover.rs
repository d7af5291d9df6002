//! Handing a running controller's sockets and connections to its successor, as HAProxy and
//! Envoy do for seamless reloads: the new process asks the old one over a Unix socket, and the
//! old one sends every listening socket, session socket, SOCKS5 connection and association
//! (file descriptors with `SCM_RIGHTS`, their state as JSON), then exits. The sockets never
//! close, so no TCP connection is reset and no datagram queued at a socket is lost; XDP keeps
//! relaying its sessions throughout.
//!
//! The control socket is a `SOCK_SEQPACKET` socket in the abstract namespace, named after the
//! pin directory (abstract names belong to the network namespace, as the relay's interfaces
//! do). Only a peer with the relay's own user id may use it (`SO_PEERCRED`).
//!
//! The exchange, one message each:
//! 1. successor: [`Message::Hello`] (what it wants: take over, or stop the relay);
//! 2. running relay: [`Message::Item`]s, each with its descriptors, then [`Message::End`]
//!    (or [`Message::Refused`], or [`Message::Stopping`]);
//! 3. successor, once its services run on what it received: [`Message::Done`]; the old
//!    process exits.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Version of the exchange; a successor speaking another is refused.
pub const PROTOCOL: u32 = 1;

/// The most descriptors one item carries (a CONNECT: two sockets and two pipes).
const MAX_FDS: usize = 8;

/// Largest message (an association with its destinations and names).
const MAX_MESSAGE: usize = 1 << 20;

/// How long either side waits for the other's next message.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Hand everything over and exit.
    TakeOver,
    /// Detach XDP, remove the pinned state and exit (`relay stop`).
    Stop,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Message {
    Hello {
        protocol: u32,
        layout: u64,
        version: String,
        want: Want,
    },
    Refused {
        why: String,
    },
    Item(Item),
    End {
        /// The port ranges the old process reserved (the successor keeps those it uses and
        /// gives back the others).
        reserved: Vec<(u16, u16)>,
        /// Connections still in their handshake when the old process stopped waiting: they
        /// close with it.
        unfinished: u64,
    },
    Done,
    Stopping,
}

/// One thing handed over, with the descriptors named in its comment.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Item {
    /// The pin directory's lock (its descriptor).
    Lock,
    /// The listening control socket itself: its name is never free for another process to
    /// take.
    Control,
    /// A forward rule's listening socket.
    ForwardListener { addr: SocketAddr },
    /// A TCP forward rule's listening socket.
    TcpListener { addr: SocketAddr },
    /// A forward session's socket (its relay port, connected to the upstream).
    Session { id: u32 },
    /// The SOCKS5 listening socket.
    SocksListener { addr: SocketAddr },
    /// A SOCKS5 CONNECT: client and destination sockets, then (with `pipes`) the read and
    /// write ends of the two splice pipes, whose bytes in flight travel with them.
    Connect(ConnectState),
    /// A SOCKS5 UDP association: the control connection and the association's socket.
    Associate(AssociateState),
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConnectState {
    /// The user (`None`: no authentication).
    pub user: Option<String>,
    /// Where it goes, for the log.
    pub dest: String,
    pub pipes: bool,
    /// A CONNECT the kernel carries (sockmap): what the controller counted of it. Its two
    /// sockets come without pipes.
    #[serde(default)]
    pub kernel: Option<crate::socks5::splice::Carried>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AssociateState {
    pub user: Option<String>,
    pub peer: SocketAddr,
    pub port: u16,
    pub client_ip: IpAddr,
    pub client: Option<SocketAddr>,
    pub local: IpAddr,
    pub contacted: Vec<SocketAddr>,
    pub names: Vec<(String, u16, SocketAddr)>,
    /// Record ids of the association's fast-path flows (their records stay in the maps).
    pub fast: Vec<u32>,
}

/// What a successor received, taken apart by the services that use it.
#[derive(Default)]
pub struct Received {
    pub lock: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    /// Forward rules' listening sockets by protocol and address.
    pub forward: HashMap<(u8, SocketAddr), OwnedFd>,
    pub sessions: HashMap<u32, OwnedFd>,
    pub socks_listener: Option<(SocketAddr, OwnedFd)>,
    pub connects: Vec<(ConnectState, Vec<OwnedFd>)>,
    pub associations: Vec<(AssociateState, Vec<OwnedFd>)>,
    pub reserved: Vec<(u16, u16)>,
    pub unfinished: u64,
}

impl Received {
    /// Files what one item brought.
    fn file(&mut self, item: Item, mut fds: Vec<OwnedFd>) -> anyhow::Result<()> {
        let one = |fds: &mut Vec<OwnedFd>| {
            if fds.len() == 1 {
                fds.pop().ok_or_else(|| anyhow!("missing descriptor"))
            } else {
                Err(anyhow!("{} descriptors where one was expected", fds.len()))
            }
        };
        match item {
            Item::Lock => self.lock = Some(one(&mut fds)?),
            Item::Control => self.control = Some(one(&mut fds)?),
            Item::ForwardListener { addr } => {
                let proto = relay_common::packet::PROTO_UDP;
                self.forward.insert((proto, addr), one(&mut fds)?);
            }
            Item::TcpListener { addr } => {
                let proto = relay_common::packet::PROTO_TCP;
                self.forward.insert((proto, addr), one(&mut fds)?);
            }
            Item::Session { id } => {
                self.sessions.insert(id, one(&mut fds)?);
            }
            Item::SocksListener { addr } => self.socks_listener = Some((addr, one(&mut fds)?)),
            Item::Connect(c) => {
                let want = if c.pipes { 6 } else { 2 };
                if fds.len() != want {
                    bail!("a CONNECT came with {} descriptors, not {want}", fds.len());
                }
                self.connects.push((c, fds));
            }
            Item::Associate(a) => {
                if fds.len() != 2 {
                    bail!("an association came with {} descriptors, not 2", fds.len());
                }
                self.associations.push((a, fds));
            }
        }
        Ok(())
    }
}

/// The abstract socket name for the relay whose state is pinned in `dir`.
fn address(dir: &Path) -> anyhow::Result<UnixAddr> {
    let mut name = b"relay-control:".to_vec();
    let path = dir.as_os_str().as_encoded_bytes();
    if name.len() + path.len() <= 100 {
        name.extend_from_slice(path);
    } else {
        // Too long for sun_path: a digest of it (FNV-1a, only to tell directories apart).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in path {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        name.extend_from_slice(format!("{h:016x}").as_bytes());
    }
    UnixAddr::new_abstract(&name).context("control socket name")
}

fn seqpacket(nonblocking: bool) -> anyhow::Result<OwnedFd> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, flags, None)
        .context("creating a Unix socket")
}

/// Timeouts both ways, and buffers that take the largest message (the default send buffer
/// of about 200 KiB would refuse a big association's state with EMSGSIZE).
fn set_timeouts(fd: &OwnedFd) {
    let t = nix::sys::time::TimeVal::new(WAIT.as_secs() as i64, 0);
    let _ = socket::setsockopt(fd, sockopt::ReceiveTimeout, &t);
    let _ = socket::setsockopt(fd, sockopt::SendTimeout, &t);
    for size in [2 * MAX_MESSAGE, MAX_MESSAGE + 64 * 1024] {
        if socket::setsockopt(fd, sockopt::SndBufForce, &size).is_ok() {
            break;
        }
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &size);
    }
}

/// The running relay's end: listens for a successor (or `relay stop`).
pub struct Control {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl Control {
    /// Listens on the control socket of `dir`. Call right after taking the pin directory's
    /// lock, so that the name is never free while a relay runs here.
    pub fn bind(dir: &Path) -> anyhow::Result<Control> {
        let fd = seqpacket(true)?;
        socket::bind(fd.as_raw_fd(), &address(dir)?).with_context(|| {
            format!(
                "binding the control socket of {} (another process holds its name)",
                dir.display()
            )
        })?;
        socket::listen(&fd, socket::Backlog::new(4).context("backlog")?)
            .context("listening on the control socket")?;
        Control::register(fd)
    }

    /// The listening control socket a predecessor handed over.
    pub fn handed_over(fd: OwnedFd) -> anyhow::Result<Control> {
        let fd: OwnedFd = socket::<std::os::unix::net::UnixListener>(fd)?.into();
        Control::register(fd)
    }

    /// The listening descriptor, duplicated, to hand over.
    pub fn dup(&self) -> anyhow::Result<OwnedFd> {
        use std::os::fd::AsFd as _;
        dup(self.fd.get_ref().as_fd())
    }

    fn register(fd: OwnedFd) -> anyhow::Result<Control> {
        // SAFETY: the AsyncFd owns the descriptor for its whole life and nothing else
        // closes or replaces it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| anyhow!("registering the control socket: {}", e.into_parts().1))?;
        Ok(Control { fd })
    }

    /// The next peer with this process's user id.
    pub async fn accept(&self) -> anyhow::Result<Peer> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                    .map_err(std::io::Error::from)
            });
            let raw = match accepted {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let cred = socket::getsockopt(&fd, sockopt::PeerCredentials)
                .context("reading the peer's credentials")?;
            if cred.uid() != nix::unistd::geteuid().as_raw() {
                log::warn!(
                    "control socket: refused a peer with uid {} (pid {})",
                    cred.uid(),
                    cred.pid()
                );
                continue;
            }
            set_timeouts(&fd);
            return Ok(Peer::new(fd));
        }
    }
}

/// One side of a control connection (blocking; use it off the async threads).
pub struct Peer {
    fd: OwnedFd,
    /// The receive buffer, reused for every message (a handover of ten thousand sessions is
    /// ten thousand messages).
    buf: std::sync::Mutex<Vec<u8>>,
}

impl Peer {
    fn new(fd: OwnedFd) -> Peer {
        Peer {
            fd,
            buf: std::sync::Mutex::new(vec![0u8; MAX_MESSAGE]),
        }
    }
}

/// Connects to the relay running on `dir`; `None` if none listens.
pub fn connect(dir: &Path) -> anyhow::Result<Option<Peer>> {
    let fd = seqpacket(false)?;
    match socket::connect(fd.as_raw_fd(), &address(dir)?) {
        Ok(()) => {
            // Abstract names can be bound by anyone: only a listener with this process's
            // user id is a relay to talk to.
            let cred = socket::getsockopt(&fd, sockopt::PeerCredentials)
                .context("reading the control socket's credentials")?;
            if cred.uid() != nix::unistd::geteuid().as_raw() {
                bail!(
                    "the control socket of {} is held by pid {} of uid {}, not a relay of this \
                     user; refusing to talk to it",
                    dir.display(),
                    cred.pid(),
                    cred.uid()
                );
            }
            set_timeouts(&fd);
            Ok(Some(Peer::new(fd)))
        }
        Err(nix::errno::Errno::ECONNREFUSED) | Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(anyhow!(e).context("connecting to the running relay's control socket")),
    }
}

impl Peer {
    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(message).context("encoding a control message")?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("sending a control message")?;
        Ok(())
    }

    /// The next message and its descriptors; `None` when the other side closed.
    pub fn recv(&self) -> anyhow::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf[..])];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| match e {
                nix::errno::Errno::EAGAIN => anyhow!("no answer within {}s", WAIT.as_secs()),
                e => anyhow!(e),
            })
            .context("receiving a control message")?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().context("reading control data")? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel installed these descriptors for us just now.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, fds, truncated)
        };
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        if truncated {
            bail!("a control message was truncated");
        }
        let message = serde_json::from_slice(&buf[..len]).context("decoding a control message")?;
        Ok(Some((message, fds)))
    }

    /// Waits until the other side closes its end (the old process has exited).
    pub fn wait_closed(&self) {
        while let Ok(Some(_)) = self.recv() {}
    }
}

/// The successor's side: asks the relay on the other end of `peer` to hand over, and
/// receives everything it sends.
pub fn take_over(peer: &Peer) -> anyhow::Result<Received> {
    peer.send(
        &Message::Hello {
            protocol: PROTOCOL,
            layout: relay_common::session::LAYOUT,
            version: env!("CARGO_PKG_VERSION").into(),
            want: Want::TakeOver,
        },
        &[],
    )?;
    let mut received = Received::default();
    loop {
        match peer.recv()? {
            None => bail!("the running relay closed the control connection mid-handover"),
            Some((Message::Item(item), fds)) => received.file(item, fds)?,
            Some((
                Message::End {
                    reserved,
                    unfinished,
                },
                _,
            )) => {
                received.reserved = reserved;
                received.unfinished = unfinished;
                return Ok(received);
            }
            Some((Message::Refused { why }, _)) => bail!("the running relay refused: {why}"),
            Some((other, _)) => bail!("unexpected control message {other:?}"),
        }
    }
}

/// Asks the relay on the other end of `peer` to stop (detach XDP, remove its pinned state)
/// and waits until it has exited.
pub fn stop(peer: &Peer) -> anyhow::Result<()> {
    peer.send(
        &Message::Hello {
            protocol: PROTOCOL,
            layout: relay_common::session::LAYOUT,
            version: env!("CARGO_PKG_VERSION").into(),
            want: Want::Stop,
        },
        &[],
    )?;
    match peer.recv()? {
        Some((Message::Stopping, _)) => {
            peer.wait_closed();
            Ok(())
        }
        Some((Message::Refused { why }, _)) => bail!("the running relay refused: {why}"),
        other => bail!(
            "unexpected answer from the running relay: {:?}",
            other.map(|(m, _)| m)
        ),
    }
}

/// Duplicates a descriptor for sending (the sender's own copy closes when it exits).
pub fn dup(fd: BorrowedFd<'_>) -> anyhow::Result<OwnedFd> {
    fd.try_clone_to_owned().context("duplicating a descriptor")
}

/// Makes a received descriptor a std socket of type `T` in non-blocking mode.
pub fn socket<T: From<OwnedFd> + std::os::fd::AsFd>(fd: OwnedFd) -> anyhow::Result<T> {
    let s = T::from(fd);
    socket2::SockRef::from(&s)
        .set_nonblocking(true)
        .context("making a handed-over socket non-blocking")?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Peer, Peer) {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (Peer::new(a), Peer::new(b))
    }

    #[test]
    fn sockets_and_their_state_cross_with_the_items() {
        use std::os::fd::AsFd as _;
        let (old, new) = pair();
        let session = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let lock = std::fs::File::open("/").unwrap();
        old.send(&Message::Item(Item::Lock), &[lock.as_fd()])
            .unwrap();
        old.send(&Message::Item(Item::Session { id: 7 }), &[session.as_fd()])
            .unwrap();
        old.send(
            &Message::End {
                reserved: vec![(20000, 29999)],
                unfinished: 2,
            },
            &[],
        )
        .unwrap();
        let mut got = Received::default();
        loop {
            match new.recv().unwrap().unwrap() {
                (Message::Item(item), fds) => got.file(item, fds).unwrap(),
                (
                    Message::End {
                        reserved,
                        unfinished,
                    },
                    fds,
                ) => {
                    assert!(fds.is_empty());
                    assert_eq!((reserved, unfinished), (vec![(20000, 29999)], 2));
                    break;
                }
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
        assert!(got.lock.is_some());
        // The very socket: same address, and a datagram sent to it arrives on the copy.
        let copy: std::net::UdpSocket = socket(got.sessions.remove(&7).unwrap()).unwrap();
        assert_eq!(copy.local_addr().unwrap(), session.local_addr().unwrap());
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .send_to(b"still here", session.local_addr().unwrap())
            .unwrap();
        drop(session);
        let mut buf = [0u8; 16];
        std::thread::sleep(Duration::from_millis(20));
        let (n, _) = copy.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
        drop(old);
        assert!(new.recv().unwrap().is_none(), "end of the conversation");
    }

    /// An association with as many resolved names as it may hold, each as long as DNS allows,
    /// crosses in one message (it did not fit the default send buffer).
    #[test]
    fn the_largest_association_state_crosses() {
        use std::os::fd::AsFd as _;
        let (old, new) = pair();
        set_timeouts(&old.fd);
        set_timeouts(&new.fd);
        let addr: SocketAddr = "198.18.2.2:53".parse().unwrap();
        let state = AssociateState {
            user: Some("alice".into()),
            peer: addr,
            port: 30000,
            client_ip: addr.ip(),
            client: Some(addr),
            local: addr.ip(),
            contacted: vec![addr; 1024],
            names: (0..1024)
                .map(|i| (format!("{i:0>253}"), 443, addr))
                .collect(),
            fast: (0..1024).collect(),
        };
        let (control, socket) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        old.send(
            &Message::Item(Item::Associate(state)),
            &[control.as_fd(), socket.as_fd()],
        )
        .expect("sent in one message");
        match new.recv().unwrap().unwrap() {
            (Message::Item(Item::Associate(a)), fds) => {
                assert_eq!((a.names.len(), fds.len()), (1024, 2));
            }
            (other, _) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn items_with_the_wrong_descriptors_are_refused() {
        let mut got = Received::default();
        assert!(got.file(Item::Session { id: 1 }, Vec::new()).is_err());
        let state = ConnectState {
            user: None,
            dest: "x".into(),
            pipes: true,
            kernel: None,
        };
        let fd = std::fs::File::open("/").unwrap().into();
        assert!(got.file(Item::Connect(state), vec![fd]).is_err());
    }

    #[test]
    fn long_pin_directories_get_a_short_name() {
        let short = address(Path::new("/sys/fs/bpf/relay/eth0")).unwrap();
        let long = address(Path::new(&format!("/sys/fs/bpf/{}", "x".repeat(200)))).unwrap();
        let other = address(Path::new(&format!("/sys/fs/bpf/{}", "y".repeat(200)))).unwrap();
        assert!(short
            .as_abstract()
            .unwrap()
            .ends_with(b"/sys/fs/bpf/relay/eth0"));
        assert!(long.as_abstract().unwrap().len() < 108);
        assert_ne!(long.as_abstract(), other.as_abstract());
    }
}
