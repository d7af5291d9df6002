//! `relay`: the controller's command line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{info, warn};
use relay::{ebpf, pin, stats::Snapshot, system};
use tokio::signal::unix::{signal, SignalKind};

/// An eBPF/XDP packet relay: relayed packets are rewritten and sent in the driver's XDP path;
/// the controller handles handshakes, sessions and statistics.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to an interface and run the controller in the foreground.
    Run {
        /// Interface to attach to.
        #[arg(short, long)]
        iface: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: ebpf::AttachMode,
        /// Directory on bpffs for the pinned maps [default: /sys/fs/bpf/relay/IFACE].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Print the data path's counters.
    Stats {
        /// Interface the relay runs on.
        #[arg(short, long)]
        iface: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Directory on bpffs of the pinned maps [default: /sys/fs/bpf/relay/IFACE].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Remove the pinned maps of an interface (its sessions and counters). The relay must be
    /// stopped.
    Unpin {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pin_dir(iface: &str, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    given.map_or_else(|| pin::default_dir(iface), Ok)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            iface,
            xdp_mode,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            system::ifindex(&iface)?;
            let dir = pin_dir(&iface, dir)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(iface, xdp_mode, dir))
        }
        Command::Stats {
            iface,
            json,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let snapshot = Snapshot::from_pin(&pin_dir(&iface, dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.table());
            }
            Ok(())
        }
        Command::Unpin {
            iface,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let dir = pin_dir(&iface, dir)?;
            pin::remove(&dir)?;
            println!("removed {}", dir.display());
            Ok(())
        }
    }
}

async fn run(iface: String, mode: ebpf::AttachMode, dir: PathBuf) -> anyhow::Result<()> {
    pin::prepare(&dir)?;
    let mut bpf = ebpf::load(&dir, log::max_level() as u8)?;
    match aya_log::EbpfLogger::init(&mut bpf) {
        Ok(logger) => {
            tokio::spawn(forward_logs(logger));
        }
        Err(e) => warn!("the XDP program's log records are not forwarded: {e}"),
    }
    ebpf::attach(&mut bpf, &iface, mode)?;
    info!(
        "relay running on {iface}, maps pinned in {}; Ctrl-C or SIGTERM stops it",
        dir.display()
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    drop(bpf);
    info!(
        "detached from {iface}; pinned maps kept in {}",
        dir.display()
    );
    Ok(())
}

/// Forwards the XDP program's aya-log records to `log`.
async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for its whole
    // life, which the AsyncFd now owns.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the XDP program's log buffer: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("polling the XDP program's log buffer: {e}");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
