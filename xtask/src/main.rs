//! `cargo xtask`: the relay's build, run and test entry points.

mod bootstrap;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use relay_lab::sweep;

#[derive(Parser)]
#[command(about = "Build, run and test the relay")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the build and test prerequisites (nightly rust-src, LLVM, bpf-linker, test tools).
    Bootstrap {
        /// Only report what is present and what is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build the XDP program and the controller.
    Build {
        /// Build the controller without optimizations.
        #[arg(long)]
        debug: bool,
    },
    /// Build, load and attach to an interface, and run the controller in the foreground.
    Run {
        /// Interface to attach to [default: the default route's, with a SOCKS5 proxy on port
        /// 1080 when no other arguments are given].
        #[arg(short, long)]
        iface: Option<String>,
        /// Run inside this network namespace (from `ip netns add`).
        #[arg(long)]
        netns: Option<String>,
        /// Build the controller without optimizations.
        #[arg(long)]
        debug: bool,
        /// Further arguments for `relay run` (after `--`).
        #[arg(last = true)]
        relay_args: Vec<OsString>,
    },
    /// Run every test layer: unit tests, BPF_PROG_TEST_RUN fixtures, end-to-end namespaces;
    /// then the linters.
    Test {
        /// Skip formatting and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure the fast paths (in-kernel cost against a MAC-swap reference, cost and memory
    /// as the session table grows); writes target/bench/results.{md,json} and a plot.
    Bench {
        /// A short run that only checks the benchmark works (numbers not meaningful).
        #[arg(long)]
        smoke: bool,
    },
    /// Check formatting and run clippy on the host crates and the eBPF crate.
    Lint,
    /// Format the code.
    Fmt,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo` from the workspace root, with cargo's bin directory (bpf-linker) on PATH.
fn cargo() -> Command {
    // Plain `cargo` (rustup's proxy), not $CARGO, so that RUSTUP_TOOLCHAIN can pick nightly.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = home {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![home.join("bin")];
        paths.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    cmd
}

/// A command as a person would type it (no environment, no directory).
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn status(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", describe(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(&cmd));
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    bootstrap::build_prerequisites()?;
    let mut cmd = cargo();
    cmd.args(["build", "--package", "relay"]);
    if release {
        cmd.arg("--release");
    }
    status(cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("relay"))
}

/// Runs `cargo test`, passing its output through, and adds up its "test result" lines.
fn run_tests(mut cmd: Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", describe(&cmd)))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| part.trim().strip_suffix(word))
                        .and_then(|n| n.trim().rsplit(' ').next().and_then(|n| n.parse().ok()))
                        .unwrap_or(0)
                };
                passed += num(" passed");
                failed += num(" failed");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("{passed} passed, {failed} failed");
        bail!("`{}` failed ({status})", describe(&cmd));
    }
    Ok((passed, failed))
}

fn bench(smoke: bool) -> anyhow::Result<()> {
    bootstrap::build_prerequisites()?;
    bootstrap::test_prerequisites()?;
    clean_stale_test_state();
    let mut build = cargo();
    // The benchmark starts the relay binary itself.
    build.args([
        "build",
        "--release",
        "--package",
        "relay",
        "--package",
        "relay-bench",
    ]);
    status(build)?;
    let out = workspace_root().join("target").join("bench");
    let mut run = Command::new(workspace_root().join("target/release/relay-bench"));
    run.arg("--out").arg(&out);
    if smoke {
        run.arg("--smoke");
    }
    status(run)?;
    for file in ["results.json", "results.md", "cost_vs_sessions.svg"] {
        if !out.join(file).exists() {
            bail!("the benchmark did not write {}", out.join(file).display());
        }
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Whether a namespace, mount or temp file name is one a test (`rlyt`) or benchmark (`rlyb`)
/// process made (see `relay_lab::unique`) that is no longer running: a run going on at the same time
/// keeps its own.
fn stale(name: &str) -> bool {
    ["rlyt", "rlyb"]
        .iter()
        .filter_map(|prefix| sweep::owner(name, prefix))
        .any(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether the host's /sys/fs/bpf is a mounted bpffs, and what it holds (names, sorted).
fn host_bpffs() -> (bool, Vec<String>) {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf"));
    let mut names: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort_unstable();
    (mounted, names)
}

/// Removes the namespaces, private bpffs mounts and temp files a killed test or benchmark run
/// left behind. A run that ends, even by a failed assertion or a signal, removes its own.
fn clean_stale_test_state() {
    sweep::sweep(stale, |what| eprintln!("[test] stale: {what}"));
}

fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    status(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "relay-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(clippy)?;
    // The eBPF crate only builds for the BPF target, with the pinned nightly (through
    // RUSTUP_TOOLCHAIN, which does not depend on the `cargo +toolchain` proxy syntax).
    let mut ebpf = cargo();
    ebpf.env("RUSTUP_TOOLCHAIN", bootstrap::ebpf_toolchain())
        .args([
            "clippy",
            "--package",
            "relay-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env(
            "CARGO_TARGET_DIR",
            workspace_root().join("target").join("ebpf-lint"),
        )
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
    status(ebpf)
}

fn dispatch(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Bootstrap { check: true } => {
            bootstrap::report();
            Ok(())
        }
        Cmd::Bootstrap { check: false } => {
            bootstrap::build_prerequisites()?;
            bootstrap::test_prerequisites()
        }
        Cmd::Build { debug } => build(!debug).map(|path| eprintln!("built {}", path.display())),
        Cmd::Run {
            iface,
            netns,
            debug,
            relay_args,
        } => {
            let relay = build(!debug)?;
            let mut cmd = match &netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/run/netns/{ns}")).arg(&relay);
                    c
                }
                None => Command::new(&relay),
            };
            cmd.arg("run");
            if let Some(iface) = &iface {
                cmd.args(["--iface", iface]);
            }
            cmd.args(&relay_args);
            eprintln!("[run] {}", describe(&cmd));
            status(cmd)
        }
        Cmd::Test { no_lint, filter } => {
            if !is_root() {
                bail!("the test suite loads BPF programs and creates network namespaces: run it as root");
            }
            bootstrap::build_prerequisites()?;
            bootstrap::test_prerequisites()?;
            clean_stale_test_state();
            let before = host_bpffs();
            let mut test = cargo();
            test.args(["test", "--workspace", "--exclude", "relay-ebpf"]);
            if let Some(f) = &filter {
                test.args(["--", f]);
            }
            let (passed, failed) = run_tests(test)?;
            if !no_lint {
                lint()?;
            }
            // Only checks that the benchmark runs and writes its files; not a timed test.
            bench(true)?;
            // Tests pin into private bpffs mounts of their own: the host's must be as it was
            // (a relay run on a default pin directory would mount one there, and the kernel
            // would fill it with its own iterators).
            let after = host_bpffs();
            if after != before {
                bail!(
                    "the tests changed the host's /sys/fs/bpf: before {before:?}, after {after:?}"
                );
            }
            println!("{passed} passed, {failed} failed");
            Ok(())
        }
        Cmd::Bench { smoke } => {
            if !is_root() {
                bail!("the benchmark loads BPF programs: run it as root");
            }
            bench(smoke)
        }
        Cmd::Lint => {
            bootstrap::build_prerequisites()?;
            lint()
        }
        Cmd::Fmt => {
            let mut fmt = cargo();
            fmt.args(["fmt", "--all"]);
            status(fmt)
        }
    }
}
