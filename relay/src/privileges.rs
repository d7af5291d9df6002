//! Giving up what the controller no longer needs once its program is loaded and attached.
//!
//! Loading BPF, pinning maps, mounting bpffs and raising limits need root. Running, the
//! controller needs only: CAP_NET_ADMIN (XDP detach on exit, SO_RCVBUFFORCE, the port
//! reservation sysctl), CAP_BPF (the maps it holds are reached through descriptors it already
//! has; kept for the pinned objects of later starts) and CAP_NET_BIND_SERVICE (session or
//! association ports below 1024, if configured). [`drop_to_runtime_set`] keeps exactly those
//! (of what the process had), empties the bounding and inheritable sets, and sets
//! no_new_privs, so that nothing the process runs later can regain the rest.
//!
//! Linux keeps capabilities per thread, and the tokio runtime's threads exist already when
//! the program is attached. The change is therefore made on every thread: each one is sent a
//! real-time signal whose handler makes the same three system calls (all async-signal-safe),
//! and the result is then read back from `/proc/self/task/*/status` for every thread.

use std::{
    fs,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use log::info;

pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_BPF: u32 = 39;

/// The capabilities the running controller keeps.
pub const RUNTIME_SET: u64 = (1 << CAP_NET_ADMIN) | (1 << CAP_BPF) | (1 << CAP_NET_BIND_SERVICE);

const CAP_LAST: u32 = 63;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What every thread's handler applies (set before the signals are sent).
static KEEP_LOW: AtomicU32 = AtomicU32::new(0);
static KEEP_HIGH: AtomicU32 = AtomicU32::new(0);
/// Threads that have applied it.
static DONE: AtomicU32 = AtomicU32::new(0);

/// Drops this thread's capabilities to the `KEEP_*` set: bounding set (where permitted),
/// no_new_privs, then effective/permitted/inheritable. Only raw system calls: it runs in a
/// signal handler.
fn apply_on_this_thread() {
    let keep = u64::from(KEEP_LOW.load(Ordering::SeqCst))
        | u64::from(KEEP_HIGH.load(Ordering::SeqCst)) << 32;
    for cap in 0..=CAP_LAST {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL for capabilities this kernel does
            // not know and EPERM without CAP_SETPCAP are both fine to ignore.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a valid version-3 header and two data words, as the kernel
    // expects; it only lowers this thread's sets.
    unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    DONE.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_signal(_: libc::c_int) {
    apply_on_this_thread();
}

/// One thread's capability sets and no_new_privs flag, from its status file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCaps {
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
    pub no_new_privs: bool,
}

/// Parses the capability lines of a `/proc/.../status` file.
pub fn parse_status(status: &str) -> ThreadCaps {
    let mut c = ThreadCaps::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let hex = || u64::from_str_radix(value.trim(), 16).unwrap_or(u64::MAX);
        match key {
            "CapEff" => c.effective = hex(),
            "CapPrm" => c.permitted = hex(),
            "CapBnd" => c.bounding = hex(),
            "NoNewPrivs" => c.no_new_privs = value.trim() == "1",
            _ => {}
        }
    }
    c
}

/// Every thread of this process, with its capabilities.
fn threads() -> anyhow::Result<Vec<(libc::pid_t, ThreadCaps)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // A thread that ended meanwhile has no status any more: skip it.
        if let Ok(status) = fs::read_to_string(entry.path().join("status")) {
            out.push((tid, parse_status(&status)));
        }
    }
    Ok(out)
}

/// A thread's id, name and scheduler state (for an error naming it).
fn describe(tid: libc::pid_t) -> String {
    let status = fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map_or("?", str::trim)
            .to_owned()
    };
    format!("{tid} ({}, {})", field("Name:"), field("State:"))
}

/// Keeps only [`RUNTIME_SET`] (of what the process has) on every thread, with an empty
/// bounding set where the process may change it, and no_new_privs. Checks the result on
/// every thread and fails if one did not follow.
pub fn drop_to_runtime_set() -> anyhow::Result<()> {
    let before = parse_status(
        &fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?,
    );
    let keep = before.permitted & RUNTIME_SET;
    let may_bound = before.effective & (1 << CAP_SETPCAP) != 0;
    KEEP_LOW.store(keep as u32, Ordering::SeqCst);
    KEEP_HIGH.store((keep >> 32) as u32, Ordering::SeqCst);
    let sig = libc::SIGRTMIN() + 5;
    // SAFETY: an all-zero sigaction is valid; the handler is an `extern "C"` function that
    // makes only async-signal-safe system calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            bail!(
                "installing the privilege-dropping handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let done = |c: &ThreadCaps| {
        c.effective == keep
            && c.permitted == keep
            && c.no_new_privs
            && (!may_bound || c.bounding == keep)
    };
    // SAFETY: getpid(2) and gettid(2) cannot fail.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    // A thread takes the signal when it next returns from the kernel: one in a long system
    // call (a program being verified, a busy machine's scheduler) is waited for.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: Vec<libc::pid_t> = threads()?
            .into_iter()
            .filter(|(_, c)| !done(c))
            .map(|(tid, _)| tid)
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let named: Vec<String> = pending.iter().map(|tid| describe(*tid)).collect();
            bail!(
                "could not drop privileges on threads {} (they kept their capabilities)",
                named.join(", ")
            );
        }
        for tid in pending {
            if tid == me {
                apply_on_this_thread();
            } else {
                // SAFETY: tgkill(2) to a thread of this very process, with the signal whose
                // handler was installed above.
                unsafe { libc::tgkill(pid, tid, sig) };
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    info!(
        "privileges dropped: capabilities {keep:#x} kept (net_admin, bpf, net_bind_service), \
         no_new_privs set, on {} threads",
        DONE.load(Ordering::SeqCst)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let c = parse_status(
            "Name:\trelay\nCapInh:\t0000000000000000\nCapPrm:\t0000008000001400\n\
             CapEff:\t0000008000001400\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t1\n",
        );
        assert_eq!(c.effective, RUNTIME_SET);
        assert_eq!(c.permitted, RUNTIME_SET);
        assert_eq!(c.bounding, 0x1ff_ffff_ffff);
        assert!(c.no_new_privs);
    }
}
