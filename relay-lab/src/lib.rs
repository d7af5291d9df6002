//! `relay-lab`: network namespaces and private bpffs mounts for the test suite and the
//! benchmark. A development crate: a dev-dependency of `relay`, a dependency of `relay-bench`
//! and `xtask`; nothing here is in the `relay` binary. Everything here removes what it created when dropped, also when a test
//! panics halfway: namespaces are deleted (which detaches their XDP programs and destroys their
//! veth pairs) and bpffs mounts are unmounted (which unpins everything in them).
//!
//! Names start with a prefix (`rlyt` for tests, `rlyb` for the benchmark) and the process id.
//! Drops do not run when a process is stopped by a signal, so the first name a process takes
//! also arms a handler for SIGINT, SIGTERM and SIGHUP that stops the process's children (relays,
//! peers), removes everything named after this process, and then lets the signal end it.
//! `cargo xtask test` sweeps what a SIGKILLed run left.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicI32, AtomicU32, Ordering},
        Once,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

pub mod postgres;
pub mod sweep;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `{prefix}{pid}{tag}{n}`. The first call arms the
/// clean-up on signals for names with this prefix.
pub fn unique(prefix: &'static str, tag: &str) -> String {
    clean_up_on_signals(prefix);
    format!(
        "{prefix}{}{tag}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A socket address written in a test or benchmark (panics on a typo).
pub fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().expect("socket address")
}

/// Write end of the pipe the signal handler writes the signal number into.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; one byte from a live local to the pipe.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// On SIGINT, SIGTERM or SIGHUP: stop this process's children, remove the namespaces, mounts
/// and temp files named `{prefix}{pid}...`, then die of the signal. A signal the process
/// ignores (a background job's SIGINT) stays ignored. Once per process.
fn clean_up_on_signals(prefix: &'static str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors of a live array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        thread::spawn(move || {
            let mut byte = 0u8;
            // SAFETY: read(2) of one byte into a live local from our pipe.
            if unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) } != 1 {
                return;
            }
            let sig = libc::c_int::from(byte);
            let pid = std::process::id();
            eprintln!("signal {sig}: removing this run's namespaces, mounts and processes");
            stop_children(pid);
            crate::sweep::sweep(|n| crate::sweep::owner(n, prefix) == Some(pid), |_| {});
            // SAFETY: back to the default action, then the signal ends the process as it
            // would have without the handler.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        });
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction with a zeroed struct and a handler that only calls write(2);
            // the old action is read first so that an ignored signal stays ignored.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                act.sa_flags = libc::SA_RESTART;
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    });
}

/// SIGTERM to every child of `pid`, SIGKILL to those still there after two seconds.
fn stop_children(pid: u32) {
    let children = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                // pid (comm) state ppid ...: comm may hold spaces, so after the last ')'.
                let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                (ppid.parse::<u32>().ok()? == pid).then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect()
    };
    for child in children() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        // Reap what exited, so that it stops counting as a child.
        // SAFETY: waitpid on any child, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        if children().is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for child in children() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
}

/// Runs a command; its stdout, or an error with its output.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let (program, rest) = args.split_first().context("empty command")?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on this thread inside the namespace at `path`, then returns to this thread's own.
pub fn on_this_thread_in<T>(path: &Path, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let target = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let own = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    // SAFETY: setns on this thread only, with an open namespace fd; undone below.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let out = f();
    // SAFETY: back to the namespace this thread was in.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns back: {}", std::io::Error::last_os_error());
    }
    Ok(out)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &'static str, tag: &str) -> anyhow::Result<Netns> {
        let name = unique(prefix, tag);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command inside the namespace (network namespace only: /sys, bpffs and mounts
    /// stay the host's).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let net = format!("--net={}", self.path().display());
        let mut v = vec!["nsenter", &net];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// A `Command` for `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it opens live here.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = self.path();
        thread::spawn(move || on_this_thread_in(&path, f))
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins `a`'s `a_if` and `b`'s `b_if` with a veth pair, gives them addresses (CIDR; IPv6
/// without duplicate address detection) and brings them up. Checksum offload is off on both
/// ends so that the frames XDP sees carry complete checksums, as from a real NIC; GRO is
/// switched on once both ends are up, so that frames XDP redirects into either end are
/// delivered (a veth only accepts XDP frames when its peer runs NAPI).
pub fn veth(
    (a, a_if, a_addrs): (&Netns, &str, &[&str]),
    (b, b_if, b_addrs): (&Netns, &str, &[&str]),
) -> anyhow::Result<()> {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])?;
    for (ns, iface, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", iface, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", addr, "dev", iface])?;
            }
        }
        ns.exec(&["ethtool", "-K", iface, "tx", "off"])?;
        ns.ip(&["link", "set", iface, "up"])?;
    }
    for (ns, iface) in [(a, a_if), (b, b_if)] {
        ns.exec(&["ethtool", "-K", iface, "gro", "on"])?;
    }
    Ok(())
}

/// Mounts a new bpffs on `path` (created if needed) with mount(8).
fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(path)
        .output()
        .context("running mount")?;
    if !out.status.success() {
        bail!(
            "mounting a bpffs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bpffs of its own, mounted on a fresh directory and unmounted on drop, so that pinned maps
/// never outlive the test or benchmark that made them, and nothing is left under /sys/fs/bpf.
pub struct BpfMount {
    pub path: PathBuf,
}

impl BpfMount {
    pub fn new(prefix: &'static str) -> anyhow::Result<BpfMount> {
        let path = std::env::temp_dir().join(format!("{}-bpf", unique(prefix, "m")));
        if let Err(e) = mount_bpffs(&path) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(BpfMount { path })
    }

    /// A directory for pins inside this mount.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; a lazy unmount cannot leave it half-mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
        let _ = std::fs::remove_dir_all(state_dir_for(&self.path));
    }
}

/// The relay state directory (its store) that goes with a pin directory in tests and
/// benchmarks: one per pin directory, so that runs never share a store and a successor finds
/// its predecessor's; removed with the mount, and named after it so that the sweep of a
/// killed run ([`sweep`]) removes it too.
pub fn state_dir_for(pin_dir: &std::path::Path) -> PathBuf {
    let tmp = std::env::temp_dir();
    // A pin directory inside a mount of ours (the benchmark's): named after both.
    let name = pin_dir
        .strip_prefix(&tmp)
        .unwrap_or(pin_dir)
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    tmp.join(format!("{name}-state"))
}
