//! Where the relay pins its maps, and making sure bpffs is there.
//!
//! Maps are pinned under one directory per interface so that a restarted controller takes
//! over the state of the one before it. In a network namespace other than the host's the
//! directory also names the namespace, so that relays on equally named interfaces in
//! different namespaces never share maps.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use log::warn;

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The default pin directory for `iface`.
pub fn default_dir(iface: &str) -> anyhow::Result<PathBuf> {
    let (netns, is_host) = crate::system::netns()?;
    let mut dir = PathBuf::from(BPFFS).join("relay");
    if !is_host {
        dir.push(format!("netns-{netns}"));
    }
    dir.push(iface);
    Ok(dir)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: all-zero is a valid `statfs`; the kernel fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a writable `statfs`.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts a new bpffs on `path`, creating the directory if needed.
pub fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_encoded_bytes()).context("mount path")?;
    let fstype = CString::new("bpf").context("fs type")?;
    // SAFETY: all pointers are valid NUL-terminated strings or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting a bpffs on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Makes sure `dir` lies on a bpffs and exists. If /sys/fs/bpf is not mounted (as inside
/// `ip netns exec`, which remounts /sys), mounts it, with a warning: such a mount is private to
/// this process's mount namespace, so pins do not outlive it.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        warn!(
            "no bpffs at {BPFFS}; mounting one. If this runs under `ip netns exec` (which remounts \
             /sys), that mount and the pinned state die with this process: start the relay with \
             `nsenter --net=/run/netns/NAME` instead to keep state across restarts"
        );
        mount_bpffs(Path::new(BPFFS))
            .with_context(|| format!("{BPFFS} is not a bpf filesystem and mounting one failed"))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!("pin directory {} is not on a bpf filesystem", dir.display());
    }
    Ok(())
}

/// The pin directory held by one relay: an exclusive `flock(2)` on the directory, released
/// when the process ends however it ends (also by SIGKILL). `relay run` holds it for its
/// whole life and takes it before it opens any pinned map, so a second relay on the same
/// interface stops before it touches the first one's state; `relay unpin` takes it too.
pub struct Lock {
    dir: std::os::fd::OwnedFd,
}

impl Lock {
    /// The lock a predecessor handed over: the same open directory, so the same lock.
    pub fn handed_over(dir: std::os::fd::OwnedFd) -> Lock {
        Lock { dir }
    }

    /// The locked descriptor, to hand over to a successor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.dir.as_fd()
    }
}

/// Takes the lock on `dir` (which must exist), or says that another relay holds it.
pub fn lock(dir: &Path) -> anyhow::Result<Lock> {
    try_lock(dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "another relay is running with the pinned state in {} (one relay per interface; \
             stop it first)",
            dir.display()
        )
    })
}

/// Takes the lock on `dir` (which must exist); `None` while another relay holds it.
pub fn try_lock(dir: &Path) -> anyhow::Result<Option<Lock>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).context("pin directory path")?;
    // SAFETY: `c` is a NUL-terminated path; the flags open a directory for reading only.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!(
            "opening pin directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        bail!("locking pin directory {}: {e}", dir.display());
    }
    Ok(Some(Lock { dir: fd }))
}

/// The pin of the XDP link on `iface` (removing it detaches the program).
pub fn link(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_{iface}"))
}

/// Whether `name` is a pin the relay makes: one of its maps, or an XDP link.
fn is_relay_pin(name: &str) -> bool {
    name.starts_with("link_") || relay_common::maps::PINNED.contains(&name)
}

/// Removes the relay's pins in `dir` (and `dir` itself if it ends up empty): the links first,
/// so the program is off every interface before its maps go. Other files are left alone.
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| is_relay_pin(&n.to_string_lossy()))
        {
            paths.push(path);
        }
    }
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    // A directory with other files in it (a bpffs root's own) stays.
    let _ = fs::remove_dir(dir);
    Ok(())
}
