//! The relay's controller: loads and attaches the XDP program, owns the pinned maps and serves
//! statistics. `main.rs` is a thin command-line shell around these modules.

pub mod api;
pub mod check;
pub mod config;
pub mod datapath;
pub mod ebpf;
pub mod fleet;
pub mod forward;
pub mod handover;
pub mod idle;
pub mod limits;
pub mod metrics;
pub mod nexthop;
pub mod pin;
pub mod policy;
pub mod privileges;
pub mod quickstart;
pub mod readable;
pub mod sessions;
pub mod socks5;
pub mod stats;
pub mod store;
pub mod system;
pub mod udp;
pub mod users_cli;
