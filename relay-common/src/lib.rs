//! Types shared by the relay's XDP program (`relay-ebpf`) and its controller (`relay`), and the
//! pure packet logic both use: header parsing, checksum arithmetic and rewrite planning.
//!
//! The crate is `no_std` so that it compiles for the BPF target; the `std` feature adds the
//! host-only frame builder and the `user` feature adds `aya::Pod` impls for the map types.
#![no_std]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod bench;
pub mod checksum;
pub mod counters;
#[cfg(any(test, feature = "std"))]
pub mod frame;
pub mod icmp;
pub mod limits;
pub mod packet;
pub mod rewrite;
pub mod session;
pub mod socks5;
pub mod splice;

/// Names of the maps, as the controller looks them up and pins them.
pub mod maps {
    pub const COUNTERS: &str = "COUNTERS";
    pub const FLOWS: &str = "FLOWS";
    pub const SESSIONS: &str = "SESSIONS";
    pub const NEXTHOPS: &str = "NEXTHOPS";
    pub const EGRESS: &str = "EGRESS";
    pub const SLOWPATH: &str = "SLOWPATH";
    pub const RULES: &str = "RULES";
    pub const USERS: &str = "USERS";
    pub const PORTS: &str = "PORTS";
    pub const NEXTHOP_KEYS: &str = "NEXTHOP_KEYS";
    pub const META: &str = "META";
    pub const LISTEN: &str = "LISTEN";
    /// `session::POOLS` queues, one per pool.
    pub const POOLS: [&str; crate::session::POOLS] = ["POOL0", "POOL1", "POOL2", "POOL3"];
    pub const SOURCE_FULL: &str = "SOURCE_FULL";
    pub const ALLOW: &str = "ALLOW";
    pub const RATE: &str = "RATE";
    pub const EVENTS: &str = "EVENTS";
    pub const HOPS: &str = "HOPS";
    pub const KERNEL_OPENS: &str = "KERNEL_OPENS";
    pub const RULE_PORTS: &str = "RULE_PORTS";
    pub const SPLICE: &str = "SPLICE";
    pub const SPLICE_LINKS: &str = "SPLICE_LINKS";
    pub const SPLICE_COUNTS: &str = "SPLICE_COUNTS";
    pub const SPLICE_TOTALS: &str = "SPLICE_TOTALS";
    pub const SPLICE_BEHIND: &str = "SPLICE_BEHIND";
    pub const USER_LIMITS: &str = "USER_LIMITS";
    pub const USER_SPENT: &str = "USER_SPENT";
    /// Every map the relay pins.
    pub const PINNED: &[&str] = &[
        COUNTERS,
        FLOWS,
        SESSIONS,
        NEXTHOPS,
        SLOWPATH,
        RULES,
        USERS,
        PORTS,
        NEXTHOP_KEYS,
        META,
        LISTEN,
        POOLS[0],
        POOLS[1],
        POOLS[2],
        POOLS[3],
        SOURCE_FULL,
        ALLOW,
        RATE,
        EVENTS,
        HOPS,
        KERNEL_OPENS,
        RULE_PORTS,
        SPLICE,
        SPLICE_LINKS,
        SPLICE_COUNTS,
        SPLICE_TOTALS,
        SPLICE_BEHIND,
        USER_LIMITS,
        USER_SPENT,
    ];
}
