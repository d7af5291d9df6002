//! The kernel's view of a relay session: the map types the controller writes and the XDP
//! program reads.
//!
//! A session joins four endpoints:
//!
//! ```text
//! client ──▶ front (rule's listen address:port)   relay   back (session port) ──▶ upstream
//! client ◀── front                                        back ◀── upstream
//! ```
//!
//! Two `FLOWS` entries (one per direction) map the packet's remote endpoint and local port to a
//! session index; `SESSIONS[index]` holds the endpoints, next hops, counters and last-seen time.

/// Direction of a flow: client to upstream, or upstream to client.
pub const TO_UPSTREAM: u32 = 0;
pub const TO_CLIENT: u32 = 1;

/// `Session::state` values.
pub const STATE_FREE: u8 = 0;
pub const STATE_ACTIVE: u8 = 1;

/// No next hop: packets of this direction take the slow path.
pub const NEXTHOP_NONE: u16 = u16::MAX;

/// Lookup key of `FLOWS`: the packet's source (the remote end) and destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub remote: [u8; 16],
    /// Host order.
    pub remote_port: u16,
    /// Host order.
    pub local_port: u16,
    pub family: u8,
    pub proto: u8,
    /// Explicit padding so that the key has no uninitialised bytes.
    pub _pad: [u8; 2],
}

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Index into `SESSIONS`.
    pub session: u32,
    /// [`TO_UPSTREAM`] or [`TO_CLIENT`].
    pub direction: u32,
}

/// Packets and bytes (IP packets: L3 header and payload) in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of `SESSIONS` (an array indexed by session index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub client: [u8; 16],
    /// The relay address the client sends to.
    pub front: [u8; 16],
    /// The relay address the upstream sees.
    pub back: [u8; 16],
    pub upstream: [u8; 16],
    pub client_port: u16,
    pub front_port: u16,
    pub back_port: u16,
    pub upstream_port: u16,
    /// `NEXTHOPS` index per direction ([`TO_UPSTREAM`], [`TO_CLIENT`]), or [`NEXTHOP_NONE`].
    pub nexthop: [u16; 2],
    /// Index of the forward rule, for per-rule accounting.
    pub rule: u16,
    pub family: u8,
    /// [`STATE_FREE`] or [`STATE_ACTIVE`].
    pub state: u8,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet the XDP program relayed.
    pub last_seen: u64,
    /// Traffic relayed by XDP per direction.
    pub traffic: [Traffic; 2],
}

/// Value of `NEXTHOPS`: where and how to send a rewritten frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nexthop {
    /// Egress interface; 0 = unresolved.
    pub ifindex: u32,
    /// Largest IP packet the egress takes.
    pub mtu: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl Session {
    /// Where a packet of `direction` goes: new source, new destination and ports. Borrows
    /// the addresses, which in the XDP program live in map memory, not on the small stack.
    #[inline(always)]
    pub fn target(&self, direction: u32) -> Target<'_> {
        if direction == TO_UPSTREAM {
            Target {
                src: &self.back,
                dst: &self.upstream,
                src_port: self.back_port,
                dst_port: self.upstream_port,
            }
        } else {
            Target {
                src: &self.front,
                dst: &self.client,
                src_port: self.front_port,
                dst_port: self.client_port,
            }
        }
    }

    /// The relay address a packet of `direction` must be addressed to.
    #[inline(always)]
    pub fn local(&self, direction: u32) -> &[u8; 16] {
        if direction == TO_UPSTREAM {
            &self.front
        } else {
            &self.back
        }
    }
}

/// New addresses and ports of a rewritten packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
}

/// Capacity of `NEXTHOPS`.
pub const NEXTHOP_SLOTS: u32 = 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all four): `repr(C)`, `Copy`, only integers and byte arrays, with every padding
    // byte spelled out as a field, so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Session {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Nexthop {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Flow>(), 8);
        assert_eq!(size_of::<Nexthop>(), 4 + 2 + 6 + 6 + 2);
        // 4 addresses, 4 ports, 2 next hops, rule, family, state, last_seen, traffic.
        assert_eq!(size_of::<Session>(), 64 + 8 + 4 + 2 + 1 + 1 + 8 + 32);
        assert_eq!(align_of::<Session>(), 8);
    }
}

/// Request to the `resolve` program (run by the controller with BPF_PROG_TEST_RUN): where
/// would the kernel send a packet to `dst` out of `ifindex`?
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveRequest {
    pub dst: [u8; 16],
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The `resolve` program's answer, written over the request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveReply {
    /// `bpf_fib_lookup`'s result: 0 = success, 7 = no neighbour, other >0 = no route (see
    /// `BPF_FIB_LKUP_RET_*`), <0 = error.
    pub result: i32,
    pub ifindex: u32,
    pub mtu: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Frame size for the `resolve` program: large enough for both structs and for XDP's
/// minimum test input.
pub const RESOLVE_FRAME: usize = 64;
