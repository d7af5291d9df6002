//! What XDP declines of the UDP sessions it opened, which have no socket of their own: a
//! datagram from such a session's upstream that the fast path cannot relay (a fragment, a
//! next hop not resolved yet, too big for the client's link) is passed to the host's stack,
//! whose socket lookup would find nothing on the session port and answer "port unreachable".
//! The `session_port` socket-lookup program, attached to this namespace while the controller
//! runs, hands such datagrams to one socket of the controller per family (`SLOW_SOCKETS`);
//! [`crate::forward::Sessions::steered`] reads them and relays them to the client.
//!
//! The link and the sockets are this controller's: they go when its process exits. A
//! successor attaches its own before it asks for the handover, and its program replaces
//! the predecessor's choice. While no controller runs the fast path drops what it declines
//! of those sessions, counted as `no_socket`.

use std::os::fd::AsRawFd as _;

use log::warn;

use crate::udp;
use anyhow::{anyhow, Context as _};
use aya::{
    maps::SockMap,
    programs::{sk_lookup::SkLookupLink, SkLookup},
    Ebpf,
};

/// The socket-lookup program's name in the object.
const PROGRAM: &str = "session_port";
const MAP: &str = "SLOW_SOCKETS";
/// Receive buffer of each steered socket.
const STEERED_BUFFER: i32 = 8 << 20;

/// The attached lookup program and the sockets it hands datagrams to.
pub struct Steering {
    /// IPv4, then IPv6 (when this host has IPv6 loopback).
    pub sockets: Vec<std::net::UdpSocket>,
    /// The families that have a socket (IPv4, IPv6).
    families: [bool; 2],
    /// Detached when dropped (when this process exits).
    _link: SkLookupLink,
}

impl Steering {
    /// Makes the sockets, puts them in `SLOW_SOCKETS` and attaches the lookup program to the
    /// current network namespace.
    pub fn attach(bpf: &mut Ebpf) -> anyhow::Result<Steering> {
        let mut map: SockMap<_> = bpf
            .take_map(MAP)
            .ok_or_else(|| anyhow!("the XDP object has no map {MAP}"))?
            .try_into()?;
        let mut sockets = Vec::new();
        for (slot, local) in [(0u32, "127.0.0.1:0"), (1, "[::1]:0")] {
            // Loopback, so that nothing from outside reaches the socket by its own port.
            let socket = match udp::bind(local.parse()?, false) {
                Ok(s) => s,
                Err(e) if slot == 1 => {
                    warn!("no IPv6 loopback ({e}): the IPv6 sessions XDP opens get a socket each");
                    break;
                }
                Err(e) => return Err(anyhow!(e).context("binding the steered-datagram socket")),
            };
            udp::recv_original_destination(&socket)?;
            // Room for a burst while the controller is busy (or taking over).
            udp::set_receive_buffer(&socket, STEERED_BUFFER);
            map.set(slot, &socket.as_raw_fd(), 0)
                .with_context(|| format!("writing {MAP}"))?;
            sockets.push(socket);
        }
        let prog: &mut SkLookup = bpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("the XDP object has no program {PROGRAM}"))?
            .try_into()?;
        prog.load().context("loading the socket-lookup program")?;
        let netns = std::fs::File::open("/proc/self/ns/net").context("opening this namespace")?;
        let id = prog
            .attach(netns)
            .context("attaching the socket-lookup program to this namespace")?;
        let link = prog.take_link(id)?;
        Ok(Steering {
            families: [true, sockets.len() > 1],
            sockets,
            _link: link,
        })
    }

    /// The families (IPv4, IPv6) whose sessions XDP opens need no socket of their own.
    pub fn families(&self) -> [bool; 2] {
        self.families
    }
}
