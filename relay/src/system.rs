//! Checks of the host that turn into one-line errors for the operator, and the clock.

use std::{ffi::CString, fs};

use anyhow::{bail, Context as _};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(line.trim(), 16).context("parsing CapEff")
}

/// Refuses to go on without the privileges to load BPF and attach XDP.
pub fn require_privileges() -> anyhow::Result<()> {
    let caps = effective_caps()?;
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        return Ok(());
    }
    bail!("relay needs root (or CAP_BPF and CAP_NET_ADMIN) to load and attach its XDP program; run it with sudo")
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = CString::new(name).with_context(|| format!("invalid interface name {name:?}"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("no network interface named {name:?} in this network namespace (see `ip link`)");
    }
    Ok(index)
}

/// The kernel gives the initial network namespace this fixed inode number
/// (`PROC_NET_INIT_INO`); every other namespace gets a dynamic one.
const INIT_NETNS_INO: u64 = 0xEFFF_FFF9;

/// Inode of this process's network namespace, and whether it is the host's initial one.
pub fn netns() -> anyhow::Result<(u64, bool)> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino();
    Ok((ours, ours == INIT_NETNS_INO))
}

/// Raises the open-file limit to its hard maximum: every session holds a socket.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: all-zero is a valid rlimit, which getrlimit fills in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of the session records' `last_seen`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec, which clock_gettime fills in.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
