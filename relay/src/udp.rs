//! UDP sockets for the slow path: batched receive and send (`recvmmsg`/`sendmmsg`), with the
//! local address of each datagram (IP_PKTINFO / IPV6_PKTINFO) so that a reply leaves from
//! exactly the address the client sent to.

use std::{
    cell::RefCell,
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, RawFd},
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;
/// Room for packet info and an original destination address, IPv6's included.
const CONTROL: usize = 128;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    })
    .map(|_| ())
}

/// A non-blocking UDP socket of `addr`'s family, with packet info on, bound to `addr`.
pub fn bind(addr: SocketAddr, reuse: bool) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); checked before use.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor we own from here on.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    if addr.is_ipv4() {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    } else {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    }
    if reuse {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of length `len`.
    cvt(unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    Ok(socket)
}

/// Sends one datagram from `from` (an address and port of this host, which other sockets
/// bound with SO_REUSEADDR may hold too) to `to`, through a socket made for it and closed at
/// once: the slow path of a session that has no socket of its own.
pub fn send_from(from: SocketAddr, to: SocketAddr, data: &[u8]) -> io::Result<()> {
    let socket = bind(from, true)?;
    socket.send_to(data, to).map(drop)
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub peer: SocketAddr,
    /// The address it was sent to (from packet info), if known.
    pub local: Option<IpAddr>,
    /// The port it was sent to, on a socket that asked for it
    /// ([`recv_original_destination`]).
    pub local_port: Option<u16>,
    /// The datagram was larger than the buffer (never with 64 KiB buffers).
    pub truncated: bool,
}

struct Buffers {
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    control: Vec<[u8; CONTROL]>,
    lens: [usize; BATCH],
    flags: [libc::c_int; BATCH],
}

thread_local! {
    // Receive buffers are per thread and never held across an await, so a thousand idle
    // sessions cost no buffer memory.
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers {
        data: vec![0; BATCH * MAX_DATAGRAM],
        // SAFETY: all-zero is a valid sockaddr_storage.
        names: vec![unsafe { zeroed() }; BATCH],
        control: vec![[0; CONTROL]; BATCH],
        lens: [0; BATCH],
        flags: [0; BATCH],
    });
}

/// Asks for each datagram's original destination address and port (IP_RECVORIGDSTADDR /
/// IPV6_RECVORIGDSTADDR): a socket that datagrams to other ports are handed to learns which.
pub fn recv_original_destination(socket: &UdpSocket) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    match local_addr(socket)? {
        SocketAddr::V4(_) => setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR, 1),
        SocketAddr::V6(_) => setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR, 1),
    }
}

/// Where a datagram was sent, from its control messages: the address (IP_PKTINFO /
/// IPV6_PKTINFO) and, on a socket that asked for it, the port (IP_ORIGDSTADDR /
/// IPV6_ORIGDSTADDR).
fn destination_from_control(control: &[u8], len: usize) -> (Option<IpAddr>, Option<u16>) {
    let (mut addr, mut port) = (None, None);
    // SAFETY: all-zero is a valid msghdr; only the control fields are used by the CMSG macros.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_control = control.as_ptr() as *mut libc::c_void;
    msg.msg_controllen = len;
    // SAFETY: `msg` describes `control`, which the kernel filled with `len` bytes of
    // well-formed cmsgs; the CMSG macros stay inside that buffer, and each message's data is
    // the structure its type says.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = data.cast::<libc::in_pktinfo>().read_unaligned();
                    addr = Some(IpAddr::V4(Ipv4Addr::from(
                        info.ipi_addr.s_addr.to_ne_bytes(),
                    )));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                    addr = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => {
                    let sin = data.cast::<libc::sockaddr_in>().read_unaligned();
                    port = Some(u16::from_be(sin.sin_port));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    let sin6 = data.cast::<libc::sockaddr_in6>().read_unaligned();
                    port = Some(u16::from_be(sin6.sin6_port));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    (addr, port)
}

/// Receives up to [`BATCH`] datagrams without blocking and hands them to `f` as one batch.
/// Returns how many were received (`WouldBlock` when none were waiting).
// Parallel arrays (headers, names, control buffers) are indexed together.
#[allow(clippy::needless_range_loop)]
pub fn recv_batch(fd: RawFd, f: impl FnOnce(&[Datagram<'_>])) -> io::Result<usize> {
    BUFFERS.with(|b| {
        let b = &mut *b.borrow_mut();
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: b.data[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        });
        // SAFETY: all-zero is a valid mmsghdr; every pointer is set below.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..BATCH {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = b.control[i].as_mut_ptr().cast();
            h.msg_controllen = CONTROL;
        }
        // SAFETY: every header points at buffers that outlive the call, with their sizes.
        let n = cvt(unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })? as usize;
        for i in 0..n {
            b.lens[i] = hdrs[i].msg_len as usize;
            b.flags[i] = hdrs[i].msg_hdr.msg_flags;
        }
        let mut batch = Vec::with_capacity(n);
        for i in 0..n {
            let (local, local_port) =
                destination_from_control(&b.control[i], hdrs[i].msg_hdr.msg_controllen);
            let Some(peer) = socket_addr(&b.names[i]) else {
                continue;
            };
            let len = b.lens[i].min(MAX_DATAGRAM);
            batch.push(Datagram {
                data: &b.data[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len],
                peer,
                local,
                local_port,
                truncated: b.flags[i] & libc::MSG_TRUNC != 0,
            });
        }
        f(&batch);
        Ok(n)
    })
}

/// One datagram to send.
pub struct Outgoing<'a> {
    pub data: &'a [u8],
    /// Destination (`None` on a connected socket).
    pub to: Option<SocketAddr>,
    /// Source address to send from (packet info), if it matters.
    pub from: Option<IpAddr>,
}

// Parallel arrays (headers, names, control buffers) are indexed together.
#[allow(clippy::needless_range_loop)]
/// Sends `msgs` with as few `sendmmsg` calls as possible. Returns how many were sent; stops
/// at the first error that is not a full buffer of the batch (reported if nothing was sent).
pub fn send_batch(fd: RawFd, msgs: &[Outgoing<'_>]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in msgs.chunks(BATCH) {
        let n = chunk.len();
        let mut names: Vec<(libc::sockaddr_storage, libc::socklen_t)> = chunk
            .iter()
            .map(|m| {
                m.to.map(sockaddr).unwrap_or((
                    // SAFETY: all-zero is a valid sockaddr_storage (unused: namelen 0).
                    unsafe { zeroed() },
                    0,
                ))
            })
            .collect();
        let mut control = vec![[0u8; CONTROL]; n];
        let mut iov: Vec<libc::iovec> = chunk
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.data.as_ptr() as *mut libc::c_void,
                iov_len: m.data.len(),
            })
            .collect();
        // SAFETY: all-zero is a valid mmsghdr; pointers are set below.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; n];
        for i in 0..n {
            let h = &mut hdrs[i].msg_hdr;
            if names[i].1 != 0 {
                h.msg_name = (&mut names[i].0 as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = names[i].1;
            }
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            if let Some(from) = chunk[i].from {
                h.msg_control = control[i].as_mut_ptr().cast();
                h.msg_controllen = CONTROL;
                // SAFETY: the control buffer is CONTROL bytes, enough for one pktinfo cmsg;
                // CMSG_FIRSTHDR/CMSG_DATA stay inside it.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(h);
                    match from {
                        IpAddr::V4(a) => {
                            (*cmsg).cmsg_level = libc::IPPROTO_IP;
                            (*cmsg).cmsg_type = libc::IP_PKTINFO;
                            (*cmsg).cmsg_len =
                                libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
                            let info = libc::in_pktinfo {
                                ipi_ifindex: 0,
                                ipi_spec_dst: libc::in_addr {
                                    s_addr: u32::from_ne_bytes(a.octets()),
                                },
                                ipi_addr: libc::in_addr { s_addr: 0 },
                            };
                            libc::CMSG_DATA(cmsg)
                                .cast::<libc::in_pktinfo>()
                                .write_unaligned(info);
                            h.msg_controllen =
                                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
                        }
                        IpAddr::V6(a) => {
                            (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                            (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                            (*cmsg).cmsg_len =
                                libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
                            let info = libc::in6_pktinfo {
                                ipi6_addr: libc::in6_addr {
                                    s6_addr: a.octets(),
                                },
                                ipi6_ifindex: 0,
                            };
                            libc::CMSG_DATA(cmsg)
                                .cast::<libc::in6_pktinfo>()
                                .write_unaligned(info);
                            h.msg_controllen =
                                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize;
                        }
                    }
                }
            }
        }
        let mut done = 0;
        while done < n {
            // SAFETY: headers from `done` on point at live buffers with their sizes.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[done..].as_mut_ptr(),
                    (n - done) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if sent + done == 0 {
                    return Err(e);
                }
                return Ok(sent + done);
            }
            done += rc as usize;
        }
        sent += n;
    }
    Ok(sent)
}

/// Gives a socket a receive buffer of `bytes`, beyond `net.core.rmem_max` when the process
/// may (root), so that a burst (many new flows at once) waits instead of being dropped.
pub fn set_receive_buffer(socket: &impl AsRawFd, bytes: i32) {
    let fd = socket.as_raw_fd();
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
    }
}

/// The address a socket is bound to.
pub fn local_addr(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is writable for `len` bytes.
    cvt(unsafe {
        libc::getsockname(
            socket.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    socket_addr(&storage)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown address family"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_carry_payloads_peers_and_local_addresses() {
        let rx = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let rx_addr = rx.local_addr().unwrap();
        let tx = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 1 + usize::from(i) * 30])
            .collect();
        let out: Vec<Outgoing<'_>> = payloads
            .iter()
            .map(|p| Outgoing {
                data: p,
                to: Some(rx_addr),
                from: Some("127.0.0.1".parse().unwrap()),
            })
            .collect();
        assert_eq!(send_batch(tx.as_raw_fd(), &out).unwrap(), 40);
        let mut got = Vec::new();
        while got.len() < 40 {
            match recv_batch(rx.as_raw_fd(), |batch| {
                for d in batch {
                    assert_eq!(d.peer, tx.local_addr().unwrap());
                    assert_eq!(d.local, Some("127.0.0.1".parse().unwrap()));
                    assert!(!d.truncated);
                    got.push(d.data.to_vec());
                }
            }) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
    }

    #[test]
    fn sockaddr_round_trips() {
        for a in ["198.51.100.7:53", "[2001:db8::1]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(socket_addr(&sockaddr(a).0), Some(a));
        }
    }
}
