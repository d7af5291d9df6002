//! Why a packet got the verdict it got.
//!
//! The XDP program counts every packet it sees in exactly one [`Reason`] slot of the per-CPU
//! `COUNTERS` array. Each reason implies one verdict, so the counts per verdict are sums over
//! reasons and the two can never disagree.

/// XDP verdicts, with the kernel's numeric values (`enum xdp_action`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl Verdict {
    pub const ALL: [Verdict; 5] = [
        Verdict::Aborted,
        Verdict::Drop,
        Verdict::Pass,
        Verdict::Tx,
        Verdict::Redirect,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Aborted => "aborted",
            Verdict::Drop => "drop",
            Verdict::Pass => "pass",
            Verdict::Tx => "tx",
            Verdict::Redirect => "redirect",
        }
    }

    /// The kernel's `XDP_*` value for this verdict.
    pub const fn action(self) -> u32 {
        self as u32
    }

    pub fn from_action(action: u32) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.action() == action)
    }
}

/// Slots of the XDP program's `TX_BY_REDIRECT` list: the interfaces on which a `Tx` verdict
/// leaves by XDP_REDIRECT to the interface the frame came in on (veths, whose peer the kernel
/// does not wake for XDP_TX frames unless the peer has an XDP program).
pub const TX_BY_REDIRECT_SLOTS: usize = 4;
/// A `TX_BY_REDIRECT` entry that stands for every interface.
pub const TX_BY_REDIRECT_ALL: u32 = u32::MAX;

/// The `TX_BY_REDIRECT` list for interfaces `ifindexes`: them, or every interface if they do
/// not fit.
pub fn tx_by_redirect(ifindexes: &[u32]) -> [u32; TX_BY_REDIRECT_SLOTS] {
    let mut list = [0; TX_BY_REDIRECT_SLOTS];
    if ifindexes.len() > TX_BY_REDIRECT_SLOTS {
        list[0] = TX_BY_REDIRECT_ALL;
        return list;
    }
    for (slot, &ifindex) in list.iter_mut().zip(ifindexes) {
        *slot = ifindex;
    }
    list
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal, $name:literal, $verdict:ident; )*) => {
        /// Every reason the XDP program gives a verdict. The numeric value is the slot in the
        /// `COUNTERS` map; values are stable so that pinned counters survive an upgrade.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $variant = $id, )*
        }

        impl Reason {
            /// All reasons, in slot order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            /// Short snake_case name used by `relay stats` and its JSON output.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// The verdict a packet counted under this reason receives.
            pub const fn verdict(self) -> Verdict {
                match self { $(Reason::$variant => Verdict::$verdict,)* }
            }
        }
    };
}

reasons! {
    /// The frame carries neither IPv4 nor IPv6 (ARP, LLDP, ...).
    NotIp = 0, "not_ip", Pass;
    /// More than one VLAN tag (QinQ); left to the kernel.
    VlanStacked = 1, "vlan_stacked", Pass;
    /// The frame ends inside a header it announces.
    Truncated = 2, "truncated", Pass;
    /// IP version, header length or total length is inconsistent.
    BadIpHeader = 3, "bad_ip_header", Pass;
    /// IPv4 fragment (first or later); reassembly is the kernel's job.
    Ipv4Fragment = 4, "ipv4_fragment", Pass;
    /// IPv4 header with options.
    Ipv4Options = 5, "ipv4_options", Pass;
    /// IPv6 with an extension header before the transport header.
    Ipv6Extension = 6, "ipv6_extension", Pass;
    /// TCP of no relay session and to no TCP rule's listen address: the host's own.
    Tcp = 7, "tcp", Pass;
    /// Any other transport protocol (ICMP, SCTP, ...).
    OtherL4 = 8, "other_l4", Pass;
    /// UDP length field disagrees with the IP payload length.
    BadUdpLength = 9, "bad_udp_length", Pass;
    /// UDP that belongs to no session in the maps.
    NoSession = 10, "no_session", Pass;
    /// Relayed: rewritten and sent back out of the interface it came in on.
    RelayedTx = 11, "relayed_tx", Tx;
    /// Relayed: rewritten and redirected to another interface.
    RelayedRedirect = 12, "relayed_redirect", Redirect;
    /// Session packet whose TTL/hop limit would expire; the controller relays it.
    TtlExpiring = 13, "ttl_expiring", Pass;
    /// Session packet whose next hop is not resolved yet; the controller relays it.
    NoNexthop = 14, "no_nexthop", Pass;
    /// Session packet larger than the egress MTU; the controller relays it.
    TooBig = 15, "too_big", Pass;
    /// UDP to a live session's relay port and address from anyone but that session's
    /// upstream (to other ports or addresses it passes: the host's own traffic).
    WrongSource = 16, "wrong_source", Drop;
    /// Session packet with a wrong IPv4 header checksum: left to the kernel, which drops it.
    BadIpChecksum = 17, "bad_ip_checksum", Pass;
    /// Session packet with an impossible UDP checksum (0 over IPv6): left to the kernel.
    BadUdpChecksum = 18, "bad_udp_checksum", Pass;
    /// Session packet to a relay address that is not the session's: not ours.
    WrongDestination = 19, "wrong_destination", Pass;
    /// The egress interface was not in the redirect map; the frame was lost.
    RedirectFailed = 20, "redirect_failed", Aborted;
    /// SOCKS5 UDP datagram with FRAG != 0: dropped (fragmentation is not supported).
    SocksFragment = 21, "socks_fragment", Drop;
    /// SOCKS5 UDP datagram the fast path leaves to the controller: a domain name, a
    /// destination not yet approved, another sender, a malformed header, or no headroom for a
    /// reply's SOCKS5 header (the frame is untouched).
    SocksSlowPath = 22, "socks_slow_path", Pass;
    /// A rewrite failed after its first change to the frame (the SOCKS5 head move): dropped,
    /// never passed on half-rewritten.
    AdjustFailed = 23, "adjust_failed", Aborted;
    /// A session packet with a VLAN tag whose egress is another link (where that tag would
    /// be wrong): left to the kernel, whose VLAN device delivers it to the controller.
    VlanOtherLink = 24, "vlan_other_link", Pass;
    /// A live session's packet the fast path declines (it would go to the controller) while
    /// no socket will take it: no controller runs (a restart, a crash). Dropped, so that the
    /// peer hears no ICMP "port unreachable" and keeps its flow; the next controller takes
    /// over.
    NoSocket = 25, "no_socket", Drop;
    /// TCP header whose data offset is below 20 bytes or beyond the segment.
    BadTcpHeader = 26, "bad_tcp_header", Pass;
    /// A segment of a TCP session, or a SYN to a TCP rule, with flags no TCP sends (SYN with
    /// FIN or RST, no flags at all, FIN without ACK) or a SYN carrying data: dropped, never
    /// relayed into a session.
    TcpBadFlags = 27, "tcp_bad_flags", Drop;
    /// A TCP session's segment neither the fast path nor the controller can carry (a wrong
    /// IPv4 header checksum, as a router drops it; one the controller could not be handed:
    /// no controller runs, or its buffer is full): dropped, because the host's stack, which
    /// has no socket for it, would answer with a reset; the sender retransmits.
    TcpUncarried = 28, "tcp_uncarried", Drop;
    /// A flow's first packet (TCP SYN, UDP datagram) to a rule, refused by its allow list,
    /// the client's share, the rule's limit or its new-session rate (the cause, per rule, is
    /// in `KERNEL_OPENS`): dropped.
    OpenRefused = 29, "open_refused", Drop;
    /// A flow's first packet to a rule the kernel could not open a session for (no free relay
    /// port in the pool, the upstream's next hop unresolved, the event ring full, the same
    /// flow opened on another CPU that instant): passed to the controller's listening socket,
    /// which opens the session (UDP) or relays the connection (TCP) itself.
    OpenToController = 30, "open_to_controller", Pass;
    /// A TCP session's segment larger than the egress MTU, with DF set: answered with ICMP
    /// "fragmentation needed" / "packet too big" naming the MTU, sent back by the link it came
    /// in on (path MTU discovery: the sender retransmits it smaller). Without DF (IPv4) it is
    /// `tcp_uncarried`.
    TcpTooBig = 31, "tcp_too_big", Tx;
    /// A TCP session's segment whose TTL or hop limit would expire: answered with ICMP "time
    /// exceeded", as a router does (traceroute through the relay works).
    TcpTtlExpired = 32, "tcp_ttl_expired", Tx;
    /// A SOCKS5 datagram of a user who may send nothing now (expired, disabled, out of
    /// quota): dropped; the controller closes the user's associations.
    UserBlocked = 33, "user_blocked", Drop;
    /// A SOCKS5 datagram beyond what is left of its user's data quota: dropped.
    UserOverQuota = 34, "user_over_quota", Drop;
    /// A SOCKS5 datagram beyond its user's bandwidth limit this instant: dropped.
    UserOverRate = 35, "user_over_rate", Drop;
    /// A TCP session's segment the fast path cannot carry (its next hop unresolved, larger
    /// than the egress MTU without DF): handed to the controller (`TCP_SLOW`), which relays
    /// it with the same rewrite through the host's stack (which resolves the neighbour; the
    /// controller fragments). Dropped here.
    TcpToController = 36, "tcp_to_controller", Drop;
}

/// What became of a flow's first packet (a TCP SYN, a UDP datagram) that could open a
/// session in the kernel: one slot per rule and cause in the per-CPU `KERNEL_OPENS` array.
/// `Opened` is a session opened and its first packet relayed; the refusals drop it
/// (`open_refused`); the rest pass it to the controller (`open_to_controller`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Open {
    Opened = 0,
    /// Refused: not in the rule's allow list.
    NotAllowed = 1,
    /// To the controller: the rule holds `max_sessions`; the controller evicts a session its
    /// upstream never answered to make room, or refuses.
    RuleFull = 2,
    /// Refused: the client's address holds `max_sessions_per_source` on the rule.
    SourceFull = 3,
    /// Refused: over the rule's `new_sessions_per_second`.
    Rate = 4,
    /// To the controller: no free relay port in the pool.
    PoolEmpty = 5,
    /// To the controller: the upstream's next hop is not resolved.
    NoNexthop = 6,
    /// To the controller: no route back to the client, or not one XDP can send by.
    NoRoute = 7,
    /// To the controller: the event ring was full.
    RingFull = 8,
    /// To the controller: another CPU opened the same flow at the same moment.
    Raced = 9,
}

impl Open {
    pub const ALL: [Open; 10] = [
        Open::Opened,
        Open::NotAllowed,
        Open::RuleFull,
        Open::SourceFull,
        Open::Rate,
        Open::PoolEmpty,
        Open::NoNexthop,
        Open::NoRoute,
        Open::RingFull,
        Open::Raced,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Open::Opened => "opened",
            Open::NotAllowed => "not_allowed",
            Open::RuleFull => "rule_full",
            Open::SourceFull => "source_full",
            Open::Rate => "rate_limited",
            Open::PoolEmpty => "pool_empty",
            Open::NoNexthop => "no_nexthop",
            Open::NoRoute => "no_route",
            Open::RingFull => "ring_full",
            Open::Raced => "raced",
        }
    }
}

/// Slots per rule in `KERNEL_OPENS` (room for more causes without a new layout).
pub const OPEN_SLOTS: u32 = 16;

/// Number of slots in the `COUNTERS` map. Larger than the number of reasons so that a newer
/// program with more reasons can reuse a pinned map.
pub const COUNTER_SLOTS: u32 = 64;

/// One counter slot: packets and bytes (whole frames as the program saw them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: `Counter` is `repr(C)`, `Copy`, made of two u64 with no padding.
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tx_by_redirect_list_names_its_interfaces_or_all() {
        use super::{tx_by_redirect, TX_BY_REDIRECT_ALL};
        assert_eq!(tx_by_redirect(&[]), [0; 4]);
        assert_eq!(tx_by_redirect(&[7, 9]), [7, 9, 0, 0]);
        assert_eq!(tx_by_redirect(&[1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(
            tx_by_redirect(&[1, 2, 3, 4, 5]),
            [TX_BY_REDIRECT_ALL, 0, 0, 0]
        );
    }

    use super::*;

    #[test]
    fn reason_slots_are_dense_unique_and_fit_the_map() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} is not in slot order", r.name());
        }
        assert!((Reason::ALL.len() as u32) < COUNTER_SLOTS);
        let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len(), "duplicate reason name");
    }

    #[test]
    fn verdict_round_trips_through_action() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_action(v.action()), Some(v));
        }
        assert_eq!(Verdict::from_action(2), Some(Verdict::Pass));
        assert_eq!(Verdict::from_action(99), None);
    }
}
