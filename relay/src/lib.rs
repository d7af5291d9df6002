//! The relay's controller: loads and attaches the XDP program, owns the pinned maps and serves
//! statistics. `main.rs` is a thin command-line shell around these modules.

pub mod config;
pub mod ebpf;
pub mod pin;
pub mod stats;
pub mod system;
