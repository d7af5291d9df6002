//! Builds the XDP objects (`relay-ebpf`) with aya-build and places them in `OUT_DIR`:
//! `relay`, which `src/ebpf.rs` embeds, and `relay-bench`, the benchmark's programs, which the
//! relay does not embed. The directory is passed on (`links` metadata `objects`) to the build
//! script of `relay-bench`, which embeds that one, so the eBPF crate is built once.
//!
//! With `AYA_BUILD_SKIP=1` (clippy, rustdoc, quick checks without bpf-linker) empty
//! placeholders are written instead; the controller then refuses to load with a clear message.

use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo::metadata=objects={}", out_dir.display());
    if skip {
        for object in ["relay", "relay-bench"] {
            fs::write(out_dir.join(object), []).context("writing a placeholder eBPF object")?;
        }
        return Ok(());
    }
    let manifest = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let root = manifest.join("../relay-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // relay-common is a path dependency of relay-ebpf; cargo does not see that from here.
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../relay-common/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../relay-ebpf/rust-toolchain.toml").display()
    );
    aya_build::build_ebpf(
        [Package {
            name: "relay-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(pinned_toolchain()?),
    )
}

/// The nightly that builds the XDP objects, as pinned in `relay-ebpf/rust-toolchain.toml`.
fn pinned_toolchain() -> anyhow::Result<&'static str> {
    include_str!("../relay-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"'))
        .ok_or_else(|| anyhow!("relay-ebpf/rust-toolchain.toml names no channel"))
}
