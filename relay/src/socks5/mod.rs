//! The SOCKS5 front door: RFC 1928 with RFC 1929 username/password.

pub mod auth;
pub mod gate;
pub mod handshake;
pub mod server;
pub mod splice;
pub mod users;
