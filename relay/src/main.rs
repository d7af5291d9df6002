//! `relay`: the controller's command line.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{info, warn};
use relay::{
    config::Config,
    datapath::Datapath,
    ebpf,
    forward::Forward,
    nexthop::NextHops,
    pin,
    stats::{self, Snapshot},
    system,
};
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
    /// Load the XDP program, attach it, and relay the configured forward rules in the
    /// foreground until Ctrl-C or SIGTERM.
    Run(RunArgs),
    /// Print the data path's counters and the forward rules' totals.
    Stats {
        /// Interface the relay runs on (the first one given to `relay run`).
        #[arg(short, long)]
        iface: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Directory on bpffs of the pinned maps [default: /sys/fs/bpf/relay/IFACE].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// List the live sessions.
    Sessions {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Print an Argon2id hash of a password read from standard input, for
    /// `[[socks5.users]] password_hash`.
    HashPassword,
    /// Remove the pinned maps of an interface (its sessions and counters). The relay must be
    /// stopped.
    Unpin {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Interface to attach to; repeat for several (the first names the pin directory).
    #[arg(short, long, required = true)]
    iface: Vec<String>,
    /// Configuration file (see examples/relay.toml).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// A forward rule LISTEN=UPSTREAM, e.g. 0.0.0.0:51820=vpn.example.net:51820 (repeatable;
    /// added to the file's rules, with the defaults of a two-line rule).
    #[arg(long, value_name = "LISTEN=UPSTREAM")]
    forward: Vec<String>,
    /// Let --forward rules reach loopback, private and other internal upstreams.
    #[arg(long)]
    allow_private_upstream: bool,
    /// Idle timeout of --forward rules (e.g. 300s, 5m).
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Sessions one client address may hold on each --forward rule [default: 256].
    #[arg(long)]
    max_sessions_per_source: Option<u32>,
    /// Sessions the kernel maps hold [default: 10000 or the file's].
    #[arg(long)]
    session_capacity: Option<u32>,
    /// Relay-side session ports, FIRST-LAST [default: 20000-29999 or the file's].
    #[arg(long)]
    session_ports: Option<String>,
    /// XDP attach mode (`off`: the controller relays everything itself).
    #[arg(long, value_enum, default_value = "auto")]
    xdp_mode: ebpf::AttachMode,
    /// Directory on bpffs for the pinned maps [default: /sys/fs/bpf/relay/IFACE].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
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

fn config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_flags(&relay::config::Flags {
        session_capacity: args.session_capacity,
        session_ports: args.session_ports.as_deref(),
        forward: &args.forward,
        allow_private_upstream: args.allow_private_upstream,
        idle_timeout: args.idle_timeout.as_deref(),
        max_sessions_per_source: args.max_sessions_per_source,
    })?;
    Ok(config)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            system::require_privileges()?;
            let mut ifaces = Vec::new();
            for name in &args.iface {
                ifaces.push((name.clone(), system::ifindex(name)?));
            }
            let config = config(&args)?;
            let dir = pin_dir(&args.iface[0], args.pin_dir.clone())?;
            let mode = args.xdp_mode;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(ifaces, config, mode, dir, move || self::config(&args)))
        }
        Command::Stats {
            iface,
            json,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let dir = pin_dir(&iface, dir)?;
            let counters = Snapshot::from_pin(&dir)?;
            let (_, rules) = stats::sessions_and_rules(&dir)?;
            let users = stats::users(&dir)?;
            let report = stats::Report {
                counters,
                rules,
                users,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Sessions {
            iface,
            json,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let (sessions, _) = stats::sessions_and_rules(&pin_dir(&iface, dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                print!("{}", stats::sessions_table(&sessions));
            }
            Ok(())
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("empty password (type it on standard input, then Enter)");
            }
            println!(
                "{}",
                relay::socks5::users::hash_password(password.as_bytes())?
            );
            Ok(())
        }
        Command::Unpin {
            iface,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let dir = pin_dir(&iface, dir)?;
            if dir.exists() {
                let _lock = pin::lock(&dir)?;
                pin::remove(&dir)?;
            }
            println!("removed {}", dir.display());
            Ok(())
        }
    }
}

async fn run(
    ifaces: Vec<(String, u32)>,
    config: Config,
    mode: ebpf::AttachMode,
    dir: PathBuf,
    reread: impl Fn() -> anyhow::Result<Config>,
) -> anyhow::Result<()> {
    use ebpf::AttachMode;
    pin::prepare(&dir)?;
    // Before any pinned map is opened: a second relay on this interface stops here.
    let _lock = pin::lock(&dir)?;
    let ranges = config.reserved_ranges();
    system::check_not_ephemeral(&ranges)?;
    let _reserved =
        system::ReservedPorts::reserve(&ranges.iter().map(|(_, r)| *r).collect::<Vec<_>>())?;
    let files = system::raise_fd_limit();
    if u64::from(config.session_capacity) + 64 > files {
        warn!(
            "the open-file limit ({files}) is below session_capacity ({}): each session needs a socket",
            config.session_capacity
        );
    }
    let opts = ebpf::LoadOptions {
        pin_dir: dir.clone(),
        log_level: log::max_level() as u8,
        capacity: config.session_capacity + config.socks5.as_ref().map_or(0, |s| s.fast_path_flows),
        session_ports: Some((config.session_ports.first, config.session_ports.last)),
        socks_ports: config
            .socks5
            .as_ref()
            .map(|s| (s.udp_ports.first, s.udp_ports.last)),
    };
    let mut bpf = ebpf::load_maps(&opts)?;
    let mut fast_path = false;
    if mode != AttachMode::Off {
        match ebpf::load_programs(&mut bpf) {
            Ok(()) => fast_path = true,
            Err(e) if mode == AttachMode::Auto => {
                warn!("{e:#}; relaying in userspace only (same rules and sessions, lower rate)");
            }
            Err(e) => return Err(e),
        }
    } else {
        info!("--xdp-mode off: the controller relays every packet itself");
    }
    // The services: the maps' one writer, next hops on their own thread, the forward rules
    // with their sessions, the SOCKS5 server; the loaded object attaches and detaches.
    let socks_ids = config.session_capacity
        ..config.session_capacity + config.socks5.as_ref().map_or(0, |s| s.fast_path_flows);
    let datapath = Arc::new(Datapath::take(&mut bpf)?.with_socks_ids(socks_ids));
    let egress: Vec<u32> = ifaces.iter().map(|(_, i)| *i).collect();
    let nexthops = if fast_path {
        match aya_log::EbpfLogger::init(&mut bpf) {
            Ok(logger) => {
                tokio::spawn(forward_logs(logger));
            }
            Err(e) => warn!("the XDP program's log records are not forwarded: {e}"),
        }
        for index in &egress {
            datapath.add_egress(*index)?;
        }
        Some(Arc::new(NextHops::start(Arc::clone(&datapath), egress)?))
    } else {
        None
    };
    let forward = Forward::start(&config, Arc::clone(&datapath), nexthops.clone()).await?;
    let mut program = ebpf::Attachment::new(bpf);
    if fast_path {
        for (name, _) in &ifaces {
            program.attach(name, mode)?;
        }
    }
    let socks5 = match config.socks5 {
        Some(cfg) => {
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("SOCKS5: cannot listen on {} (in use?)", cfg.listen))?;
            let server =
                relay::socks5::server::Server::new(cfg, config.policy, datapath, nexthops)?;
            Some((server, listener))
        }
        None => None,
    };
    // Loaded, attached, listening: from here on only what running needs.
    relay::privileges::drop_to_runtime_set()?;
    forward.spawn();
    let socks5 = socks5.map(|(server, listener)| {
        tokio::spawn(Arc::clone(&server).publish());
        tokio::spawn(Arc::clone(&server).serve(listener));
        server
    });
    let names: Vec<&str> = ifaces.iter().map(|(n, _)| n.as_str()).collect();
    info!(
        "relay running on {}, maps pinned in {}; Ctrl-C or SIGTERM stops it",
        names.join(", "),
        dir.display()
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("waiting for Ctrl-C")?;
                break;
            }
            _ = term.recv() => break,
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                match reread() {
                    Err(e) => warn!("reload failed, keeping the running configuration: {e:#}"),
                    Ok(c) => {
                        if let Err(e) = forward.reload(&c) {
                            warn!("forward rules not reloaded, keeping the running ones: {e:#}");
                        }
                        let r = match (&socks5, c.socks5) {
                            (Some(s), Some(cfg)) => s.reload(cfg, c.policy),
                            (None, None) => Ok(()),
                            _ => Err(anyhow::anyhow!("adding or removing [socks5] needs a restart")),
                        };
                        if let Err(e) = r {
                            warn!("SOCKS5 not reloaded, keeping the running users and policy: {e:#}");
                        }
                    }
                }
            }
        }
    }
    forward.flush();
    let sessions = forward.sessions();
    // The pinned maps (and sessions) stay.
    program.detach();
    info!(
        "detached from {}; {sessions} sessions kept in {} for the next start",
        names.join(", "),
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
