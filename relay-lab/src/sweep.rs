//! Removes what test and benchmark runs leave behind when they are killed: network namespaces,
//! private bpffs mounts in the temp directory, and temp files, chosen by name (see
//! [`crate::unique`]). Used by the signal handler of a run and by `cargo xtask test`.

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

/// The process that made `name` with `prefix`: names are `{prefix}{pid}{tag}...`, tags start
/// with a letter.
pub fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    if !rest[digits..].starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn names_say_which_process_made_them() {
        assert_eq!(owner("rlyb123c7", "rlyb"), Some(123));
        assert_eq!(owner("rlyb123m6-bpf", "rlyb"), Some(123));
        assert_eq!(owner("rlyb1234c7", "rlyb"), Some(1234));
        assert_eq!(owner("rlyt123c7", "rlyb"), None, "another prefix");
        assert_eq!(owner("rlyb123", "rlyb"), None, "no tag");
        assert_eq!(owner("rlybc7", "rlyb"), None, "no pid");
    }
}
