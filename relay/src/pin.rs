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

/// Removes the pins in `dir` (and `dir` itself if it ends up empty).
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}
