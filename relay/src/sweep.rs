//! Removes what test and benchmark runs leave behind when they are killed: network namespaces,
//! private bpffs mounts in the temp directory, and temp files, chosen by name (see
//! `lab::unique`). Only `std` and the `ip` and `umount` commands, so that `xtask` includes this
//! file as a module of its own without depending on the relay crate.

use std::{path::Path, process::Command};

/// Removes every namespace, bpffs mount under the temp directory and temp directory entry
/// whose name `ours` accepts; `say` reports each removal.
pub fn sweep(ours: impl Fn(&str) -> bool, say: impl Fn(&str)) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if ours(name) {
                say(&format!("removing namespace {name}"));
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let tmp = std::env::temp_dir();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(target), Some("bpf")) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let target = Path::new(target);
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if target.parent() == Some(tmp.as_path()) && ours(name) {
            say(&format!("unmounting bpffs {}", target.display()));
            let _ = Command::new("umount").arg("-l").arg(target).status();
            let _ = std::fs::remove_dir(target);
        }
    }
    // Logs, configuration files and web roots (mounts are gone by now).
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        if ours(&entry.file_name().to_string_lossy()) {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Whether `name` was made by process `pid` with `prefix` (`{prefix}{pid}{tag}...`, tags
/// starting with a letter, so that pid 12 does not claim pid 123's names).
pub fn made_by(name: &str, prefix: &str, pid: u32) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(&pid.to_string()))
        .is_some_and(|tag| tag.starts_with(|c: char| c.is_ascii_alphabetic()))
}

#[cfg(test)]
mod tests {
    use super::made_by;

    #[test]
    fn names_belong_to_one_process() {
        assert!(made_by("rlyb123c7", "rlyb", 123));
        assert!(made_by("rlyb123m6-bpf", "rlyb", 123));
        assert!(!made_by("rlyb1234c7", "rlyb", 123), "another pid");
        assert!(!made_by("rlyt123c7", "rlyb", 123), "another prefix");
        assert!(!made_by("rlyb123", "rlyb", 123), "no tag");
    }
}
