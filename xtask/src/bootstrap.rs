//! Installs what building and testing the relay needs, idempotently, saying what it does.
//!
//! Every step first checks whether its result is already there, so a second run costs a few
//! process spawns. Nothing here needs to be installed by hand on a fresh Debian bookworm
//! machine with rustup; what cannot be installed is reported as a one-line error.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// The nightly that builds the eBPF crate, as pinned in `relay-ebpf/rust-toolchain.toml` (the
/// same file `relay/build.rs` reads).
pub fn ebpf_toolchain() -> &'static str {
    include_str!("../../relay-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"'))
        .unwrap_or("nightly")
}

/// The LLVM major version of the pinned nightly, which bpf-linker must match.
pub const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and the benchmark use, keyed by a binary each provides.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/ethtool", "ethtool"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/ping", "iputils-ping"),
    ("/usr/bin/iperf3", "iperf3"),
    ("/usr/bin/socat", "socat"),
    ("/usr/bin/curl", "curl"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/sbin/danted", "dante-server"),
    ("/usr/sbin/haproxy", "haproxy"),
    // libfaketime: a relay whose wall clock crosses midnight (quota periods).
    ("/usr/bin/faketime", "faketime"),
    // promtool checks the metrics endpoint's output (the Prometheus server is not started).
    ("/usr/bin/promtool", "prometheus"),
    ("/usr/bin/python3", "python3"),
    // A PostgreSQL server for the fleet tests (each test runs a cluster of its own).
    ("/usr/lib/postgresql/15/bin/postgres", "postgresql-15"),
    // A virtual environment for schemathesis (from PyPI), which fuzzes the management API.
    ("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
    ("/usr/lib/python3/dist-packages/socks.py", "python3-socks"),
];

fn say(msg: &str) {
    eprintln!("[bootstrap] {msg}");
}

/// Runs `cmd`, showing it, and fails with its name if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    say(&format!("running {cmd:?}"));
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it cannot run or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

pub fn llvm_bin() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}/bin"))
}

/// Whether `apt-get update` already ran in this process (once is enough for every install).
static APT_UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs Debian packages, refreshing the package lists once per process.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; install them (`sudo apt-get install {}`) or run as root",
            packages.join(" "),
            packages.join(" ")
        );
    }
    if !APT_UPDATED.swap(true, Ordering::Relaxed) {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The LLVM development packages bpf-linker builds against that are not installed. Checked as
/// packages, not by `llvm-config`: that comes with the runtime package `llvm-22`, which can be
/// installed without the libLLVM.so bpf-linker links against.
fn missing_llvm_dev() -> Vec<String> {
    [
        format!("llvm-{LLVM_MAJOR}-dev"),
        format!("libpolly-{LLVM_MAJOR}-dev"),
    ]
    .into_iter()
    .filter(|p| !deb_installed(p))
    .collect()
}

/// Whether Debian package `pkg` is installed.
fn deb_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", pkg]))
        .is_some_and(|s| s.split_whitespace().last() == Some("installed"))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Everything `cargo xtask build` needs: nightly with rust-src, LLVM's development
/// packages, and bpf-linker built against them.
pub fn build_prerequisites() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs) and was not found")?;
    if !toolchains.lines().any(|l| l.starts_with(toolchain)) {
        say(&format!(
            "installing the Rust toolchain {toolchain} (pinned in relay-ebpf/rust-toolchain.toml: \
             the eBPF crate needs -Z build-std, and its LLVM must be bpf-linker's)"
        ));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))
    .unwrap_or_default();
    // rust-src builds `core` for the BPF target; clippy lints the eBPF crate.
    for component in ["rust-src", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            say(&format!("adding {component} to {toolchain}"));
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }

    let missing = missing_llvm_dev();
    if !missing.is_empty() {
        say(&format!(
            "installing LLVM {LLVM_MAJOR} development packages for bpf-linker"
        ));
        apt_install(&missing.iter().map(String::as_str).collect::<Vec<_>>())?;
    }

    let linker = cargo_bin_dir().join("bpf-linker");
    let have = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        say(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes, once)"
        ));
        let path = format!(
            "{}:{}",
            llvm_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("PATH", path))?;
    }
    Ok(())
}

/// Tools the test suite drives: iproute2, ethtool, iperf3, curl, PySocks and friends.
pub fn test_prerequisites() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        say(&format!("installing test tools: {}", missing.join(" ")));
    }
    apt_install(&missing)?;
    if missing.contains(&"postgresql-15") {
        // The package makes and starts a cluster "main" on port 5432; the tests run clusters
        // of their own on unix sockets, so that one only takes a port: removed.
        if output(Command::new("pg_lsclusters").args(["-h"])).is_some_and(|o| {
            o.lines()
                .any(|l| l.split_whitespace().take(2).eq(["15", "main"]))
        }) {
            say("removing the cluster 15/main the package made (the tests make their own)");
            run(Command::new("pg_dropcluster").args(["--stop", "15", "main"]))?;
        }
    }
    schemathesis()
}

/// Where the tests find schemathesis (its own virtual environment, outside the system's
/// Python packages).
pub const SCHEMATHESIS_VENV: &str = "/usr/local/lib/relay-tests/venv";
/// The version the API's document was last checked with.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Installs schemathesis from PyPI into [`SCHEMATHESIS_VENV`] (once per version).
fn schemathesis() -> anyhow::Result<()> {
    let venv = Path::new(SCHEMATHESIS_VENV);
    let bin = venv.join("bin/schemathesis");
    let have = output(Command::new(venv.join("bin/python3")).args([
        "-c",
        "import importlib.metadata as m; print(m.version('schemathesis'))",
    ]));
    if bin.exists() && have.as_deref().map(str::trim) == Some(SCHEMATHESIS_VERSION) {
        return Ok(());
    }
    say(&format!(
        "installing schemathesis {SCHEMATHESIS_VERSION} into {SCHEMATHESIS_VENV} (fuzzes the management API)"
    ));
    run(Command::new("python3").args(["-m", "venv", SCHEMATHESIS_VENV]))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
    ]))
}

/// Checks only, installs nothing: used to say what is missing.
pub fn report() {
    let linker = cargo_bin_dir().join("bpf-linker");
    let items = [
        ("LLVM development packages", missing_llvm_dev().is_empty()),
        ("bpf-linker", linker.exists()),
    ];
    for (name, ok) in items {
        say(&format!(
            "{name}: {}",
            if ok { "present" } else { "missing" }
        ));
    }
    for (bin, pkg) in TEST_PACKAGES {
        let ok = Path::new(bin).exists();
        say(&format!(
            "{bin} ({pkg}): {}",
            if ok { "present" } else { "missing" }
        ));
    }
}
