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
/// A SOCKS5 UDP association's flow to one destination, keyed by the destination and the
/// association port: replies match it directly; the client's datagrams match it through the
/// destination in their SOCKS5 header.
pub const FLOW_SOCKS: u32 = 2;
/// `Session::rule` of a SOCKS5 flow: this bit plus the user's index.
pub const RULE_SOCKS: u16 = 0x8000;

/// `Session::state` values.
pub const STATE_FREE: u8 = 0;
pub const STATE_ACTIVE: u8 = 1;

/// No next hop: packets of this direction take the slow path.
pub const NEXTHOP_NONE: u16 = u16::MAX;
/// The next hop is the session's own, in `HOPS[session]` (written by XDP when it opened
/// the session: the route back to its client).
pub const NEXTHOP_OWN: u16 = u16::MAX - 1;

/// `Session::origin` values.
pub const ORIGIN_CONTROLLER: u8 = 0;
pub const ORIGIN_KERNEL: u8 = 1;

/// Key of `LISTEN`: an address and port a rule opens sessions on in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 4],
}

/// `Listen::flags`: the rule holds `max_sessions` (or the table is full): refuse.
pub const LISTEN_FULL: u16 = 1;
/// `Listen::flags`: the rule has an allow list (in `ALLOW`).
pub const LISTEN_ALLOW_LIST: u16 = 2;

/// Value of `LISTEN`: what a session opened in the kernel on this address becomes.
/// Written by the controller (rules, and the full flag as sessions come and go).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listen {
    pub upstream: [u8; 16],
    /// The relay's address toward the upstream.
    pub back: [u8; 16],
    pub upstream_port: u16,
    pub rule: u16,
    /// `NEXTHOPS` slot toward the upstream.
    pub nexthop: u16,
    /// `LISTEN_*` bits.
    pub flags: u16,
    /// New sessions per second, per CPU, as the nanoseconds each one costs (0: unlimited).
    pub cost_ns: u64,
    /// The most credit a CPU's bucket holds (the burst), in nanoseconds.
    pub burst_ns: u64,
    /// The pool (`POOLS[pool]`) whose ids and ports this rule's sessions take: the one of its
    /// upstream, [`pool_of`].
    pub pool: u16,
    pub _pad: [u16; 3],
}

/// Pools of free session ids and relay ports lent to the kernel (`POOL0`..`POOL3`). A relay
/// port must be unique only among the sessions to one upstream address and port (the
/// upstream's replies are told apart by it), so each pool lends every port of the range
/// once, and the sessions of an upstream take theirs from its pool: upstreams in different
/// pools use the same ports, and the table holds more sessions than there are ports.
pub const POOLS: usize = 4;

/// Slots of each pool's queue for a table of `capacity` sessions: half the table (the
/// controller keeps that much lent while rules open sessions in the kernel, split between the
/// pools in use), so that the controller finds room for the sessions the kernel leaves to it.
pub const fn pool_slots(capacity: u32) -> u32 {
    let half = capacity / 2;
    if half == 0 {
        1
    } else {
        half
    }
}

/// The pool of an upstream address (16 bytes as the maps hold it) and port: a fixed mix,
/// so that an upstream's sessions always share one pool, whoever opened them and whenever.
pub const fn pool_of(upstream: &[u8; 16], port: u16) -> u16 {
    // FNV-1a over the address and the port.
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        h = (h ^ upstream[i] as u32).wrapping_mul(0x0100_0193);
        i += 1;
    }
    h = (h ^ (port >> 8) as u32).wrapping_mul(0x0100_0193);
    h = (h ^ (port & 0xff) as u32).wrapping_mul(0x0100_0193);
    (h % POOLS as u32) as u16
}

/// Value of the `POOL` queue: a free session id with the relay port it uses. The controller
/// pushes them; XDP pops one per session it opens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSlot {
    pub id: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `SOURCE_FULL`: a client address that holds `max_sessions_per_source` sessions on a
/// rule (the controller adds and removes them as it counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub rule: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Data of an `ALLOW` (longest-prefix-match) key: the rule first, so that the prefix length
/// is 32 + the network's bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    /// Network order.
    pub rule: [u8; 2],
    pub family: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// A per-CPU token bucket of `RATE` (indexed by rule), kept by XDP alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Credit in nanoseconds; a session costs `Listen::cost_ns`.
    pub credit: u64,
    pub last: u64,
}

/// An `EVENTS` ring entry: something XDP did to session `id` (the record has the rest).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub id: u32,
    /// [`EVENT_OPENED`] or [`EVENT_CLOSING`].
    pub kind: u32,
}

/// XDP opened the session.
pub const EVENT_OPENED: u32 = 0;
/// XDP relayed the session's first FIN of one side, or its first RST.
pub const EVENT_CLOSING: u32 = 1;

/// Size of the `EVENTS` ring in bytes (a power of two; 16 bytes per event with its header).
pub const EVENT_RING_BYTES: u32 = 1 << 22;

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

/// Key of `FRAGS`: an IPv4 datagram in fragments (source, destination, identification), whose
/// first fragment XDP found to be a TCP session's segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub _pad: u16,
}

/// `SlowSegment::flags`: the frame is an IPv4 fragment of the session's segment, for the
/// controller to reassemble before relaying.
pub const SLOW_FRAGMENT: u32 = 1;

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
    /// `PROTO_UDP` or `PROTO_TCP`.
    pub proto: u8,
    /// [`ORIGIN_CONTROLLER`] or [`ORIGIN_KERNEL`]: who opened the session (a kernel-opened
    /// one has no socket; its next hop back to the client is in `HOPS`).
    pub origin: u8,
    /// TCP: 1 once XDP relayed a FIN from the client (`[TO_UPSTREAM]`) or the upstream
    /// (`[TO_CLIENT]`); plain stores of 1, one byte each, so that two CPUs never race on a
    /// shared word. The controller lingers and closes from them.
    pub fin: [u8; 2],
    /// TCP: 1 once XDP relayed a RST either way.
    pub rst: u8,
    /// TCP: 1 once the client sent a segment with ACK and without SYN: it completed the
    /// handshake. A SYN from a spoofed address never gets this far, so its session stays
    /// unanswered (short timeout, evictable) even though the upstream answered it.
    pub acked: u8,
    pub _pad: [u8; 2],
    /// CLOCK_MONOTONIC (coarse) nanoseconds of when the controller wrote the record. The XDP
    /// program keeps no clock: the controller learns that a session is alive from `traffic`.
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

/// Value of `NEXTHOP_KEYS` (indexed like `NEXTHOPS`): what a next-hop slot is for, so that a
/// controller taking over from another rebuilds its slot table from the pinned maps and
/// keeps every slot the records refer to. Written by the next-hop thread before the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NexthopKey {
    /// The address on the link (gateway, or the destination itself).
    pub via: [u8; 16],
    /// The route's interface.
    pub oif: u32,
    /// The route's MTU (0: the link's).
    pub route_mtu: u32,
    /// `FAMILY_V4` or `FAMILY_V6`; 0: the slot is free.
    pub family: u8,
    pub _pad: [u8; 7],
}

impl Session {
    /// Whether the session has answered traffic: the upstream sent something back, and for
    /// TCP the client also completed the handshake (no half-open connection counts).
    pub fn answered(&self) -> bool {
        self.traffic[TO_CLIENT as usize].packets > 0
            && (self.proto != crate::packet::PROTO_TCP || self.acked != 0)
    }

    /// TCP: both sides have sent FIN, or one RST: the connection is over once its last
    /// segments (the final ACK, a retransmission) have passed.
    pub fn tcp_closing(&self) -> bool {
        self.rst != 0 || (self.fin[0] != 0 && self.fin[1] != 0)
    }

    /// Packets XDP relayed for the session, both directions: the controller's sign of life
    /// (the XDP program keeps no clock).
    pub fn packets(&self) -> u64 {
        self.traffic[0].packets + self.traffic[1].packets
    }

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
}

/// New addresses and ports of a rewritten packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
}

/// Value of `SLOWPATH` (indexed like `SESSIONS`): what the controller relayed itself for a
/// session. Written only by the controller; pinned so that `relay sessions` and a restarted
/// controller see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowPath {
    pub traffic: [Traffic; 2],
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet the controller relayed.
    pub last_seen: u64,
    /// CLOCK_REALTIME seconds when the session was opened.
    pub opened: u64,
}

/// What XDP hands the controller with a TCP session's segment it cannot carry (`TCP_SLOW`,
/// followed by the frame's bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowSegment {
    pub session: u32,
    /// [`TO_UPSTREAM`] or [`TO_CLIENT`].
    pub direction: u32,
    /// Bytes of the frame that follows.
    pub len: u32,
    /// [`SLOW_FRAGMENT`] or 0.
    pub flags: u32,
}

/// Value of `RULES` (indexed by rule): totals the controller keeps per forward rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Traffic of closed sessions (XDP and slow path together); live sessions are in
    /// `SESSIONS` and `SLOWPATH`.
    pub retired: [Traffic; 2],
    pub opened: u64,
    pub closed: u64,
    pub refused_not_allowed: u64,
    pub refused_limit: u64,
    pub refused_full: u64,
    pub refused_no_port: u64,
    /// Refused: the client address had `max_sessions_per_source` sessions already.
    pub refused_source_limit: u64,
    /// Refused: over the rule's `new_sessions_per_second`.
    pub refused_rate: u64,
    /// Unanswered sessions closed to make room for a new one.
    pub evicted_unanswered: u64,
    /// Sessions closed because the upstream never answered within `unanswered_timeout`.
    pub closed_unanswered: u64,
    /// TCP segments XDP handed to the controller (`tcp_to_controller`) that it relayed, per
    /// direction (IP bytes before fragmenting).
    pub tcp_slow: [Traffic; 2],
    /// Such segments it could not relay (no session any more, a send refused).
    pub tcp_slow_dropped: u64,
    /// The rule's name (NUL-padded UTF-8), for `relay stats`.
    pub name: [u8; 32],
    pub listen: [u8; 16],
    pub upstream: [u8; 16],
    pub listen_port: u16,
    pub upstream_port: u16,
    pub family: u8,
    /// 1 while a controller runs with this rule.
    pub configured: u8,
    /// `PROTO_UDP` or `PROTO_TCP` (0 from maps older than TCP rules: UDP).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `USERS` (indexed by SOCKS5 user; 0 is unauthenticated): the controller's
/// per-user accounting, pinned so that `relay stats` can show it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserStats {
    /// NUL-padded UTF-8 name.
    pub name: [u8; 32],
    /// CONNECT bytes, client to destination and back.
    pub tcp_bytes: [u64; 2],
    /// UDP ASSOCIATE datagrams and payload bytes, client to destination and back.
    pub udp: [Traffic; 2],
    pub connections: u64,
    pub associations: u64,
    pub active_connections: u64,
    pub active_associations: u64,
    pub auth_failures: u64,
    pub refused: u64,
    pub udp_dropped: u64,
    /// 1 while a controller runs with this user.
    pub configured: u64,
    /// UDP datagrams and payload bytes XDP relayed for ended associations (live ones are in
    /// their `SESSIONS` records).
    pub udp_xdp: [Traffic; 2],
    /// Destinations left to the controller because the user held its share of the fast-path
    /// table already.
    pub fast_path_refused: u64,
    /// Requests refused by the user's limits: blocked (expired, disabled, out of quota) or a
    /// new address over `max_devices`.
    pub limit_refused: u64,
    /// UDP datagrams the controller dropped over the user's rate or quota (XDP's drops are
    /// the `user_*` reasons).
    pub over_limit: u64,
}

/// Capacity of `USERS`.
pub const USER_SLOTS: u32 = 1024;

/// A name as the 32-byte NUL-padded field of `RULES` and `USERS` (cut at 32 bytes).
pub fn name32(name: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let n = name.len().min(32);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// Capacity of `RULES`: forward rules per relay.
pub const RULE_SLOTS: u32 = 256;

/// Entries of `PORTS`: one per UDP port. `PORTS[port]` is 1 + the index of the forward
/// session whose relay-side (back) port it is, or 0.
pub const PORT_SLOTS: u32 = 65536;

/// Capacity of `NEXTHOPS`.
pub const NEXTHOP_SLOTS: u32 = 1024;

/// Value of `META` (one entry): what the pinned state is and who runs it. A controller reads
/// it before it trusts any other pinned map: `magic` and `layout` must be its own, or it
/// refuses to start (never misreads a record of another layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// [`META_MAGIC`] once a controller has stamped the maps.
    pub magic: u64,
    /// [`LAYOUT`] of the controller that created the maps.
    pub layout: u64,
    /// Version of the relay that last ran on these maps (NUL-padded).
    pub version: [u8; 32],
    /// Process id of the controller running on these maps; 0 when none is (it stopped
    /// without a successor, or never started). Non-zero at a start without a handover: the
    /// previous controller died (SIGKILL, crash).
    pub pid: u32,
    pub _pad: u32,
    /// Controllers started on these maps.
    pub starts: u64,
    /// Starts that took over from a running controller (sockets and connections handed over).
    pub handovers: u64,
    /// Starts after a controller that died without stopping.
    pub crash_recoveries: u64,
    /// SOCKS5 CONNECTs and associations that ended with a controller that died (as it last
    /// published them).
    pub lost_connections: u64,
    pub lost_associations: u64,
    /// Live SOCKS5 CONNECTs and associations, published by the controller once a second.
    pub connections: u64,
    pub associations: u64,
}

/// `Meta::magic` of stamped maps: "relaymap".
pub const META_MAGIC: u64 = u64::from_le_bytes(*b"relaymap");

/// Bump when a map's meaning changes without its size changing.
const LAYOUT_REVISION: u64 = 4;

/// The layout of the pinned maps this build reads and writes: every shared type's size and
/// the manual revision, mixed (FNV-1a). A controller refuses maps stamped with another.
pub const LAYOUT: u64 = {
    use core::mem::size_of;
    let parts = [
        LAYOUT_REVISION,
        size_of::<FlowKey>() as u64,
        size_of::<Flow>() as u64,
        size_of::<Session>() as u64,
        size_of::<Nexthop>() as u64,
        size_of::<NexthopKey>() as u64,
        size_of::<SlowPath>() as u64,
        size_of::<RuleStats>() as u64,
        size_of::<UserStats>() as u64,
        size_of::<Meta>() as u64,
        size_of::<crate::counters::Counter>() as u64,
        size_of::<ListenKey>() as u64,
        size_of::<Listen>() as u64,
        size_of::<PoolSlot>() as u64,
        size_of::<SourceKey>() as u64,
        size_of::<AllowKey>() as u64,
        size_of::<Bucket>() as u64,
        size_of::<Event>() as u64,
        size_of::<crate::limits::UserLimit>() as u64,
        size_of::<crate::limits::UserSpent>() as u64,
        size_of::<crate::splice::SpliceLink>() as u64,
        size_of::<crate::splice::SpliceCount>() as u64,
        crate::counters::OPEN_SLOTS as u64,
        EVENT_RING_BYTES as u64,
        PORT_SLOTS as u64,
        NEXTHOP_SLOTS as u64,
        USER_SLOTS as u64,
        RULE_SLOTS as u64,
        crate::counters::COUNTER_SLOTS as u64,
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < parts.len() {
        h ^= parts[i];
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
};

#[cfg(feature = "user")]
mod pod {
    // All of these are `repr(C)`, `Copy`, only integers and byte arrays, with every padding
    // byte spelled out as a field (checked by `layouts_have_no_implicit_padding`).

    // SAFETY: as above: any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: `repr(C)`, plain integers and byte arrays, no padding (4 + 4 + 2 + 2).
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Session {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Nexthop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NexthopKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlowPath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Meta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UserStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Listen {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PoolSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
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
        assert_eq!(size_of::<NexthopKey>(), 16 + 4 + 4 + 1 + 7);
        assert_eq!(size_of::<Meta>(), 8 + 8 + 32 + 4 + 4 + 7 * 8);
        // 4 addresses, 4 ports, 2 next hops, rule, family, state, proto, origin, fin, rst,
        // pad, last_seen, traffic.
        assert_eq!(
            size_of::<Session>(),
            64 + 8 + 4 + 2 + 1 + 1 + 1 + 1 + 2 + 1 + 3 + 8 + 32
        );
        assert_eq!(size_of::<ListenKey>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<Listen>(), 32 + 8 + 8 + 8 + 8);
        assert_eq!(size_of::<PoolSlot>(), 8);
        assert_eq!(size_of::<SourceKey>(), 16 + 4);
        assert_eq!(size_of::<AllowKey>(), 4 + 16);
        assert_eq!(size_of::<Bucket>(), 16);
        assert_eq!(align_of::<Session>(), 8);
    }

    #[test]
    fn upstreams_spread_over_every_pool_and_keep_theirs() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 2, 2]);
        let pools: [u16; 16] = core::array::from_fn(|i| pool_of(&addr, 6000 + i as u16));
        for p in 0..POOLS as u16 {
            assert!(pools.contains(&p), "pool {p} unused by 16 ports: {pools:?}");
        }
        assert!(pools.iter().all(|p| usize::from(*p) < POOLS));
        assert_eq!(
            pool_of(&addr, 6000),
            pools[0],
            "the same upstream, the same pool"
        );
        assert_eq!(pool_slots(0), 1);
        assert_eq!(pool_slots(10_000), 5_000);
    }
}
