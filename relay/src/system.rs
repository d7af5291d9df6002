//! Checks of the host that turn into one-line errors for the operator, and the clock.

use std::{ffi::CString, fs};

use anyhow::{bail, Context as _};

use crate::config::PortRange;

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

/// The name of the driver behind interface `name` ("veth", "mlx5_core", ...), as `ethtool -i`
/// reports it; `None` if the kernel does not say (no such interface, or no driver information).
pub fn driver(name: &str) -> Option<String> {
    use std::os::fd::AsRawFd as _;
    /// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    // SAFETY: `ifreq` is plain old data, valid all zeros.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO reads the NUL-terminated name in `req` and
    // writes one `ethtool_drvinfo` through `ifru_data`, which points at `info`, alive and of
    // that layout for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
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

/// Raises the open-file limit to `want` (if this process may raise the hard limit) or to its
/// hard maximum; returns the limit now. Every UDP session holds a socket.
pub fn raise_fd_limit(want: u64) -> u64 {
    // SAFETY: all-zero is a valid rlimit, which getrlimit fills in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    // Above the hard limit if this process may (CAP_SYS_RESOURCE, before privileges are
    // dropped), up to the kernel's ceiling.
    let ceiling = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    if want > lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: want.min(ceiling),
            rlim_max: want.min(ceiling),
        };
        // SAFETY: `raised` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

/// Whether process `pid` still runs (a zombie, exited but not yet reaped by its parent, does
/// not).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Seconds since the Unix epoch (the wall clock: quota periods, expiry, the store's times).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of the session records' `last_seen`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec, which clock_gettime fills in.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// This network namespace's ephemeral port range (`net.ipv4.ip_local_port_range`, which
/// IPv6 sockets use too).
pub fn ephemeral_ports() -> anyhow::Result<PortRange> {
    let text = fs::read_to_string(EPHEMERAL).with_context(|| format!("reading {EPHEMERAL}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(first)), Some(Ok(last))) if first <= last => Ok(PortRange { first, last }),
        _ => bail!("{EPHEMERAL}: unexpected contents {text:?}"),
    }
}

/// Refuses port ranges (`name`, range) that overlap the ephemeral range: the kernel would hand
/// their ports to other programs' outgoing connections.
pub fn check_not_ephemeral(ranges: &[(&str, PortRange)]) -> anyhow::Result<()> {
    let eph = ephemeral_ports()?;
    for (name, r) in ranges {
        if r.first <= eph.last && eph.first <= r.last {
            bail!(
                "{name} {r} overlaps the ephemeral port range {eph} ({EPHEMERAL}); choose ports \
                 outside it (the defaults are 20000-29999 and 30000-31999)"
            );
        }
    }
    Ok(())
}

/// Port ranges written to `net.ipv4.ip_local_reserved_ports` for as long as this value
/// lives, so that no other program's socket is given one of them by the kernel; removed
/// again on drop (a relay killed with SIGKILL leaves them reserved, which harms nothing).
pub struct ReservedPorts {
    ranges: Vec<PortRange>,
}

/// Parses the reserved-ports list (`"20000-29999,30000-31999"`, or empty).
fn parse_reserved(text: &str) -> Vec<PortRange> {
    text.trim()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn write_reserved(ranges: &[PortRange]) -> anyhow::Result<()> {
    let text = ranges
        .iter()
        .map(PortRange::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // The kernel needs something to parse: an empty list is a lone newline.
    fs::write(RESERVED, format!("{text}\n")).with_context(|| format!("writing {RESERVED}"))
}

impl ReservedPorts {
    /// Adds `ranges` to the reserved ports (keeping what others reserved).
    pub fn reserve(ranges: &[PortRange]) -> anyhow::Result<ReservedPorts> {
        let text = fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
        let mut all = parse_reserved(&text);
        let mut ours = Vec::new();
        for r in ranges {
            if !all.contains(r) {
                all.push(*r);
                ours.push(*r);
            }
        }
        if !ours.is_empty() {
            write_reserved(&all)?;
        }
        Ok(ReservedPorts { ranges: ours })
    }

    /// Takes over a predecessor's reservation: `ranges` are this process's from now on
    /// (reserved if they were not), and the predecessor's `previous` ranges this one does not
    /// use are given back.
    pub fn take_over(
        ranges: &[PortRange],
        previous: &[PortRange],
    ) -> anyhow::Result<ReservedPorts> {
        let text = fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
        let all = parse_reserved(&text);
        let kept = taken_over(&all, ranges, previous);
        if kept != all {
            write_reserved(&kept)?;
        }
        Ok(ReservedPorts {
            ranges: ranges.to_vec(),
        })
    }
}

/// The reserved list after a successor with `ranges` takes over from a predecessor that
/// reserved `previous`: the predecessor's ranges it does not use are given back, everyone
/// else's stay, and its own are there.
fn taken_over(all: &[PortRange], ranges: &[PortRange], previous: &[PortRange]) -> Vec<PortRange> {
    let mut kept: Vec<PortRange> = all
        .iter()
        .copied()
        .filter(|r| !previous.contains(r) || ranges.contains(r))
        .collect();
    for r in ranges {
        if !kept.contains(r) {
            kept.push(*r);
        }
    }
    kept
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        if self.ranges.is_empty() {
            return;
        }
        let Ok(text) = fs::read_to_string(RESERVED) else {
            return;
        };
        let left: Vec<PortRange> = parse_reserved(&text)
            .into_iter()
            .filter(|r| !self.ranges.contains(r))
            .collect();
        let _ = write_reserved(&left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_for_an_interface_that_is_not_there() {
        assert_eq!(driver("relay-no-such0"), None);
        assert_eq!(driver(""), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }

    #[test]
    fn a_successor_keeps_its_ranges_and_gives_back_the_rest() {
        let r = |a, b| PortRange { first: a, last: b };
        let all = [r(80, 80), r(20000, 29999), r(30000, 31999)];
        // The predecessor reserved the two relay ranges; the successor moved the sessions.
        let kept = taken_over(&all, &[r(20000, 29999), r(40000, 40999)], &all[1..]);
        assert_eq!(kept, vec![r(80, 80), r(20000, 29999), r(40000, 40999)]);
    }

    #[test]
    fn a_process_is_alive_until_it_is_a_zombie() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = std::time::Instant::now();
        while alive(pid) && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!alive(pid), "exited, not reaped yet: not alive");
        child.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn reserved_port_lists_parse() {
        let r = |a, b| PortRange { first: a, last: b };
        assert_eq!(parse_reserved("\n"), vec![]);
        assert_eq!(
            parse_reserved("80,20000-29999\n"),
            vec![r(80, 80), r(20000, 29999)]
        );
    }
}

/// The interface of the IPv4 default route with the lowest metric (`/proc/net/route`).
pub fn default_route_interface() -> anyhow::Result<String> {
    let table = fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    default_route_in(&table)
        .ok_or_else(|| anyhow::anyhow!("no IPv4 default route: name the interface with --iface"))
}

/// The default route's interface in a `/proc/net/route` table.
fn default_route_in(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; RTF_UP = 1.
            let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
            (f.get(1)? == &"00000000" && f.get(7)? == &"00000000" && up)
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_owned())))?
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod default_route_tests {
    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(super::default_route_in(table).as_deref(), Some("eth0"));
        let none = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(super::default_route_in(none), None);
    }
}

/// Creates the state directory (and its parents) if needed, readable by root only: it holds
/// who the users are, what they used, their passwords and the API's token.
pub fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))
}

/// Writes `text` to `path` (in a directory it creates as [`private_dir`]) readable by root
/// only, through a new file renamed over the old: a crash leaves the old or the new, whole.
pub fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}
