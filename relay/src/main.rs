//! `relay`: the controller's command line.

use std::{os::unix::ffi::OsStrExt as _, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{info, warn};
use relay::{
    config::Config,
    datapath::Datapath,
    ebpf,
    forward::Forward,
    handover,
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
    /// The fleet the configuration's `[fleet]` names: its relays, their last contact and
    /// traffic (read from its database).
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Check a configuration file and say what the relay would do with it, without touching
    /// the kernel (exit status 1 if anything would stop it).
    Check {
        /// Configuration file (see examples/relay.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// List, add, change and delete SOCKS5 users (through the running relay's management
    /// API, or in its store when none answers); without a subcommand, list them with their
    /// usage, quota left, expiry, rate and live connections, associations and devices.
    Users {
        /// Interface the relay runs on (names the state directory).
        #[arg(short, long, global = true)]
        iface: Option<String>,
        /// Print the answer as JSON.
        #[arg(long, global = true)]
        json: bool,
        /// The relay's state directory [default: /var/lib/relay/IFACE].
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<relay::users_cli::Action>,
    },
    /// Print an Argon2id hash of a password read from standard input, for
    /// `[[socks5.users]] password_hash`.
    HashPassword,
    /// Restart the relay running on an interface without losing a packet: start a new
    /// `relay run` (this binary, so an upgraded one takes over) with the running one's
    /// arguments; it takes everything over and the old one exits. For systemd's
    /// `ExecReload`.
    Restart {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Stop the relay on an interface for good: detach XDP (which a plain SIGTERM leaves
    /// attached, carrying the sessions for the next start) and remove the pinned state.
    Stop {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Remove the pinned state of an interface (XDP links, sessions, counters) when no relay
    /// runs on it; this detaches XDP.
    Unpin {
        #[arg(short, long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FleetAction {
    /// List the fleet's relays.
    Status {
        /// Configuration file with the `[fleet]` section.
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Interface to attach to; repeat for several (the first names the pin directory).
    /// Without --iface, --config and --forward: the default route's interface, serving a
    /// SOCKS5 proxy on its port 1080 with a user made at the first run (printed with links to
    /// connect).
    #[arg(short, long)]
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
    /// Directory of the relay's own state: the store of users' usage [default:
    /// /var/lib/relay/IFACE].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// The management API (HTTP, JSON, a bearer token kept in the state directory), or `off`
    /// [default: 127.0.0.1:1090].
    #[arg(long, value_name = "ADDR|off")]
    api: Option<String>,
    /// Set when this run is the no-argument default (not a flag).
    #[arg(skip)]
    quickstart: bool,
    /// Log lines as text, or as one JSON object per line (`ts`, `level`, `msg`).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to standard error at `RUST_LOG`'s level (default info), as text or JSON lines.
fn init_logging(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    b.format_target(false);
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write as _;
            let line = serde_json::json!({
                "ts": buf.timestamp().to_string(),
                "level": record.level().as_str(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

fn main() -> ExitCode {
    let cli = Cli::try_parse();
    init_logging(match &cli {
        Ok(Cli {
            command: Command::Run(args),
        }) => args.log_format,
        _ => LogFormat::Text,
    });
    let cli = match cli {
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

/// The state directory: given, or `/var/lib/relay/IFACE`.
fn state_dir(iface: Option<&str>, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match (given, iface) {
        (Some(d), _) => Ok(d),
        (None, Some(i)) if !i.is_empty() && !i.contains('/') && i != "." && i != ".." => {
            Ok(PathBuf::from("/var/lib/relay").join(i))
        }
        _ => anyhow::bail!("no state directory: give --state-dir or --iface"),
    }
}

fn config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        // The default proxy: the same user (and hash) at every read, so that a reload keeps
        // its sessions.
        None if args.quickstart => {
            let state = state_dir(
                args.iface.first().map(String::as_str),
                args.state_dir.clone(),
            )?;
            let (c, _) = relay::quickstart::credentials(&state)?;
            relay::quickstart::config(relay::quickstart::listen_on(&args.iface[0])?, &c)?
        }
        None => Config::default(),
    };
    if let Some(s) = config.socks5.as_mut() {
        let state = state_dir(
            args.iface.first().map(String::as_str),
            args.state_dir.clone(),
        )?;
        if args.quickstart && args.config.is_none() {
            // Its password is known: the API can hand out its links.
            let (c, _) = relay::quickstart::credentials(&state)?;
            for u in &mut s.users {
                u.password = Some(relay::socks5::users::Secret(c.password.clone()));
            }
        }
        // The users added with `relay users add` or the management API.
        let stored = relay::store::Store::open(&state)?.users()?;
        let stored = relay::store::usable_users(&stored);
        relay::socks5::users::merge(&mut s.users, stored);
    }
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
        Command::Run(mut args) => {
            system::require_privileges()?;
            // No interface, file or rule: the main job on an embedded default.
            let quick = args.iface.is_empty() && args.config.is_none() && args.forward.is_empty();
            if quick {
                args.iface.push(system::default_route_interface()?);
                args.quickstart = true;
            }
            let mut ifaces = Vec::new();
            for name in &args.iface {
                ifaces.push((name.clone(), system::ifindex(name)?));
            }
            let config = config(&args)?;
            let banner = match quick {
                true => {
                    let state = state_dir(Some(&args.iface[0]), args.state_dir.clone())?;
                    let (c, new) = relay::quickstart::credentials(&state)?;
                    let at = config.socks5.as_ref().map(|s| s.listen).context("SOCKS5")?;
                    Some(relay::quickstart::instructions(at, &c, new)?)
                }
                false => None,
            };
            let dir = pin_dir(&args.iface[0], args.pin_dir.clone())?;
            let state = state_dir(Some(&args.iface[0]), args.state_dir.clone())?;
            let mode = args.xdp_mode;
            let metrics = args.metrics;
            let api = match args.api.as_deref() {
                Some("off") => None,
                Some(a) => Some((
                    a.parse()
                        .with_context(|| format!("--api: {a:?} is not ADDR:PORT or off"))?,
                    true,
                )),
                None => Some((relay::api::DEFAULT_LISTEN, false)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(
                    Plan {
                        ifaces,
                        config,
                        mode,
                        dir,
                        state,
                        metrics,
                        api,
                        banner,
                    },
                    move || self::config(&args),
                ))
        }
        Command::Fleet {
            action: FleetAction::Status { config, json },
        } => {
            let cfg = Config::from_file(&config)?;
            let fleet = cfg
                .fleet
                .with_context(|| format!("{}: no [fleet] section", config.display()))?;
            let nodes = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(async {
                    let c = relay::fleet::connect(&fleet.database).await?;
                    relay::fleet::nodes(&c, system::unix_now()).await
                })
                .context("the fleet's database")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", relay::fleet::nodes_table(&nodes));
            }
            Ok(())
        }
        Command::Check { config } => {
            let cfg = Config::from_file(&config)?;
            let checked = relay::check::check(&cfg);
            print!("{}", checked.text);
            if checked.problems.is_empty() {
                println!("{}: OK", config.display());
                return Ok(());
            }
            for p in &checked.problems {
                eprintln!("relay: problem: {p}");
            }
            anyhow::bail!(
                "{}: {} problem(s), see above",
                config.display(),
                checked.problems.len()
            )
        }
        Command::Users {
            iface,
            json,
            state_dir: dir,
            action,
        } => {
            let dir = state_dir(iface.as_deref(), dir)?;
            let action = action.unwrap_or(relay::users_cli::Action::List);
            relay::users_cli::run(&dir, action, json)
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
                controller: stats::controller(&dir),
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
        Command::Restart {
            iface,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let dir = pin_dir(&iface, dir)?;
            restart(&iface, &dir)
        }
        Command::Stop {
            iface,
            pin_dir: dir,
        } => {
            system::require_privileges()?;
            let dir = pin_dir(&iface, dir)?;
            if !dir.exists() {
                println!("no relay state at {}: nothing to stop", dir.display());
                return Ok(());
            }
            match pin::try_lock(&dir)? {
                Some(_lock) => {
                    pin::remove(&dir)?;
                    println!(
                        "no relay was running on {iface}; XDP detached and {} removed",
                        dir.display()
                    );
                }
                None => {
                    let peer = handover::connect(&dir)?.with_context(|| {
                        format!(
                            "a relay holds {} but does not answer on its control socket",
                            dir.display()
                        )
                    })?;
                    handover::stop(&peer)?;
                    println!(
                        "stopped the relay on {iface}: XDP detached and {} removed",
                        dir.display()
                    );
                }
            }
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

/// `relay restart`: starts a successor with the running relay's arguments and waits until
/// it has taken over (the old process gone) or failed (then the old one runs on).
fn restart(iface: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let meta = relay::stats::controller(dir).with_context(|| {
        format!(
            "no relay state at {} (is a relay running on {iface}?)",
            dir.display()
        )
    })?;
    let old = meta
        .pid
        .with_context(|| format!("no relay is running on {iface} (start one with `relay run`)"))?;
    let cmdline = std::fs::read(format!("/proc/{old}/cmdline"))
        .with_context(|| format!("reading the arguments of the running relay (pid {old})"))?;
    let args: Vec<std::ffi::OsString> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::ffi::OsStr::from_bytes(a).to_owned())
        .collect();
    if args.get(1).is_none_or(|a| a != "run") {
        anyhow::bail!("pid {old} is not a `relay run` (its arguments: {args:?})");
    }
    let exe = std::env::current_exe().context("finding this relay binary")?;
    let mut command = std::process::Command::new(&exe);
    // systemd's socket for readiness and MAINPID, if the running relay has one and this
    // command was not given it.
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        let environ = std::fs::read(format!("/proc/{old}/environ")).unwrap_or_default();
        if let Some(v) = environ
            .split(|b| *b == 0)
            .find_map(|e| e.strip_prefix(b"NOTIFY_SOCKET="))
        {
            command.env("NOTIFY_SOCKET", std::ffi::OsStr::from_bytes(v));
        }
    }
    // A process group of its own: it outlives this command (and systemd's ExecReload).
    let mut child = command
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the new relay exited ({status}) before taking over; pid {old} runs on");
        }
        if !system::alive(old) {
            println!(
                "restarted the relay on {iface}: pid {old} handed over to pid {}",
                child.id()
            );
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "pid {old} still runs a minute after pid {} started; see their logs",
                child.id()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How a run ends.
enum Exit {
    /// SIGTERM or Ctrl-C: XDP stays attached and carries its sessions until the next start.
    Signal,
    /// Handed over to a successor, which runs on everything now.
    HandedOver,
    /// `relay stop`: XDP detached, pinned state removed.
    Stop(handover::Peer),
}

/// What `relay run` was asked to do, checked.
struct Plan {
    ifaces: Vec<(String, u32)>,
    config: Config,
    mode: ebpf::AttachMode,
    /// The pin directory (bpffs) and the state directory (the store).
    dir: PathBuf,
    state: PathBuf,
    metrics: Option<std::net::SocketAddr>,
    /// The management API's address, and whether it was given (a default that is in use is
    /// a warning, not an error).
    api: Option<(std::net::SocketAddr, bool)>,
    /// Printed once running (the no-argument run's instructions).
    banner: Option<String>,
}

async fn run(plan: Plan, reread: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    use ebpf::AttachMode;
    let Plan {
        ifaces,
        config,
        mode,
        dir,
        state,
        metrics,
        api,
        banner,
    } = plan;
    pin::prepare(&dir)?;
    // Before any pinned map is opened: the directory's lock, or the running relay that holds
    // it, to take over from.
    let (lock, predecessor) = match pin::try_lock(&dir)? {
        Some(lock) => (Some((lock, handover::Control::bind(&dir)?)), None),
        None => match handover::connect(&dir)? {
            Some(peer) => {
                info!(
                    "a relay is running on {}: taking over from it",
                    dir.display()
                );
                (None, Some(peer))
            }
            None => anyhow::bail!(
                "another relay holds {} but does not answer on its control socket (a version \
                 without handover?); stop it first",
                dir.display()
            ),
        },
    };
    let ranges = config.reserved_ranges();
    system::check_not_ephemeral(&ranges)?;
    let port_ranges: Vec<_> = ranges.iter().map(|(_, r)| *r).collect();
    let files = system::raise_fd_limit(u64::from(config.session_capacity) + 4096);
    if u64::from(config.session_capacity) + 64 > files {
        warn!(
            "the open-file limit ({files}) is below session_capacity ({}): each session the controller opens (or all, without XDP) needs a socket",
            config.session_capacity
        );
    }
    let veths: Vec<&(String, u32)> = ifaces
        .iter()
        .filter(|(name, _)| system::driver(name).as_deref() == Some("veth"))
        .collect();
    let opts = ebpf::LoadOptions {
        pin_dir: dir.clone(),
        log_level: log::max_level() as u8,
        capacity: config.session_capacity + config.socks5.as_ref().map_or(0, |s| s.fast_path_flows),
        session_ports: Some((config.session_ports.first, config.session_ports.last)),
        socks_ports: config
            .socks5
            .as_ref()
            .map(|s| (s.udp_ports.first, s.udp_ports.last)),
        tx_by_redirect: veths.iter().map(|(_, index)| *index).collect(),
    };
    let had_pins = dir.join(relay_common::maps::SESSIONS).exists();
    let mut bpf = ebpf::load_maps(&opts)?;
    let mut fast_path = false;
    if mode != AttachMode::Off {
        match ebpf::load_programs(&mut bpf) {
            Ok(()) => fast_path = true,
            // A running relay's program keeps relaying rather than this one giving up XDP.
            Err(e) if mode == AttachMode::Auto && predecessor.is_none() => {
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
    datapath.check_layout(had_pins, &dir)?;
    let splicer = connect_path(&mut bpf, mode, predecessor.is_none())?;
    // What XDP declines of the UDP sessions it opens reaches the controller through a socket
    // lookup program, attached while this controller runs: before a predecessor hands over,
    // so that its socket takes such datagrams over from the predecessor's at once (they wait
    // in it until the sessions are taken over).
    let steering = if fast_path {
        match relay::forward::steer::Steering::attach(&mut bpf) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(
                    "{e:#}; the UDP sessions XDP opens get a socket each, as the controller's own"
                );
                None
            }
        }
    } else {
        None
    };
    // TCP segments XDP cannot carry (next hop unresolved, too big without DF) come to the
    // controller, which relays them through raw sockets (opened now, with the privileges).
    if fast_path {
        if let Err(e) = relay::forward::slowtcp::SlowTcp::start(&mut bpf, Arc::clone(&datapath)) {
            warn!("{e:#}; TCP segments XDP cannot carry are dropped (tcp_uncarried)");
        }
    }
    // Everything is loaded and verified: only now is the running relay asked to hand over
    // (a new program the kernel refuses leaves it running as it was).
    let mut received = match &predecessor {
        Some(peer) => {
            let started = std::time::Instant::now();
            let r = tokio::task::block_in_place(|| handover::take_over(peer))?;
            info!(
                "handed over in {} ms: {} listeners, {} sessions, {} CONNECTs, {} associations",
                started.elapsed().as_millis(),
                r.forward.len() + usize::from(r.socks_listener.is_some()),
                r.sessions.len(),
                r.connects.len(),
                r.associations.len()
            );
            if r.unfinished > 0 {
                warn!(
                    "{} connections were still in their SOCKS5 handshake and closed with the old process",
                    r.unfinished
                );
            }
            r
        }
        None => handover::Received::default(),
    };
    let (_lock, control) = match lock {
        Some(held) => held,
        None => (
            pin::Lock::handed_over(
                received
                    .lock
                    .take()
                    .context("the running relay did not hand over its lock")?,
            ),
            handover::Control::handed_over(
                received
                    .control
                    .take()
                    .context("the running relay did not hand over its control socket")?,
            )?,
        ),
    };
    let _reserved = if predecessor.is_some() {
        let previous: Vec<_> = received
            .reserved
            .iter()
            .map(|(a, b)| relay::config::PortRange {
                first: *a,
                last: *b,
            })
            .collect();
        system::ReservedPorts::take_over(&port_ranges, &previous)?
    } else {
        system::ReservedPorts::reserve(&port_ranges)?
    };
    let pid = std::process::id();
    datapath.update_meta(|m| {
        m.starts += 1;
        m.version = relay_common::session::name32(env!("CARGO_PKG_VERSION"));
        if predecessor.is_some() {
            m.handovers += 1;
        } else if m.pid != 0 {
            m.crash_recoveries += 1;
            m.lost_connections += m.connections;
            m.lost_associations += m.associations;
            warn!(
                "the previous relay (pid {}) ended without stopping: its {} SOCKS5 CONNECTs and {} \
                 associations were lost; taking over its sessions",
                m.pid, m.connections, m.associations
            );
        }
        m.pid = pid;
        m.connections = 0;
        m.associations = 0;
    })?;
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
    // Every next-hop slot a pinned record refers to is held before anyone asks for a new
    // one, so that none is handed out again while a record not taken over yet (a forward
    // session, a SOCKS5 flow of a handed-over association) still uses it; the hold ends once
    // the services have taken over theirs.
    let pinned_slots: Vec<_> = match &nexthops {
        Some(n) => datapath
            .active()
            .iter()
            .map(|(_, record)| n.adopt(record.nexthop))
            .collect(),
        None => Vec::new(),
    };
    let events = if fast_path {
        let map = bpf
            .take_map(relay_common::maps::EVENTS)
            .context("the XDP object has no EVENTS map")?;
        Some(aya::maps::RingBuf::try_from(map).context("map EVENTS has an unexpected type")?)
    } else {
        None
    };
    let forward = Forward::start(
        &config,
        Arc::clone(&datapath),
        nexthops.clone(),
        std::mem::take(&mut received.forward),
        std::mem::take(&mut received.sessions),
        events,
        steering,
    )
    .await?;
    let socks5 = match config.socks5 {
        Some(cfg) => {
            let listener = match received.socks_listener.take() {
                Some((addr, fd)) if addr == cfg.listen => tokio::net::TcpListener::from_std(
                    handover::socket::<std::net::TcpListener>(fd)?,
                )?,
                _ => tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .with_context(|| {
                        format!("SOCKS5: cannot listen on {} (in use?)", cfg.listen)
                    })?,
            };
            // Usage kept across restarts: read after the predecessor handed over (it wrote
            // its last counts first).
            let store = relay::store::Store::open(&state)?;
            let saved = store.load()?;
            let writer = relay::store::Writer::spawn(store, &state)?;
            let at = share_address(&cfg, &ifaces[0].0);
            let fleet = match config.fleet.clone() {
                Some(f) => {
                    info!(
                        "fleet {:?}: users and usage shared through PostgreSQL",
                        f.name
                    );
                    Some(relay::fleet::Fleet::new(f, at.to_string(), writer.clone())?)
                }
                None => None,
            };
            let server = relay::socks5::server::Server::new(
                cfg,
                config.policy,
                Arc::clone(&datapath),
                nexthops.clone(),
                splicer.clone(),
                Some(writer.clone()),
                saved,
            )?;
            server.adopt(
                std::mem::take(&mut received.connects),
                std::mem::take(&mut received.associations),
            );
            Some((server, listener, writer, at, fleet))
        }
        None => {
            datapath.socks_sweep();
            None
        }
    };
    let takeover = predecessor.is_some();
    drop(pinned_slots);
    let names: Vec<String> = ifaces.iter().map(|(n, _)| n.clone()).collect();
    let mut program = ebpf::Attachment::new(bpf, &dir);
    for gone in ebpf::detach_pinned(&dir, fast_path.then_some(&names[..])) {
        info!("XDP detached from {gone} (no longer in this run)");
    }
    if fast_path {
        for name in &names {
            program.attach(name, mode)?;
        }
        if !veths.is_empty() {
            let names: Vec<&str> = veths.iter().map(|(name, _)| name.as_str()).collect();
            info!(
                "veth ({}): frames sent back out the interface they came in on leave by XDP_REDIRECT, not XDP_TX (a veth wakes its peer for XDP_TX frames only if the peer has an XDP program)",
                names.join(", ")
            );
        }
    }
    // The old process may exit now: everything it handed over runs here.
    if let Some(peer) = &predecessor {
        let _ = peer.send(&handover::Message::Done, &[]);
    }
    let control_fd = control.dup()?;
    // Control requests are read on a task of their own: a peer that connects and says
    // nothing holds up only the next peer (for the read timeout), never the signals.
    let (request_tx, mut requests) = tokio::sync::mpsc::channel(1);
    let control_task = tokio::spawn(async move {
        loop {
            let peer = match control.accept().await {
                Ok(p) => p,
                Err(e) => {
                    warn!("control socket: {e:#}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let read = tokio::task::spawn_blocking(move || {
                let m = peer.recv();
                (peer, m)
            })
            .await;
            if let Ok(request) = read {
                if request_tx.send(request).await.is_err() {
                    return;
                }
            }
        }
    });
    let metrics_listener = match metrics {
        Some(addr) => Some(http_listener(addr, "metrics", takeover).await?),
        None => None,
    };
    let (reload_tx, mut reload_requests) = tokio::sync::mpsc::channel(1);
    let api = match api {
        Some((addr, given)) => match http_listener(addr, "management API", takeover).await {
            Ok(l) => {
                let token = relay::api::token(&state)?;
                let socks =
                    socks5
                        .as_ref()
                        .map(|(server, _, writer, at, fleet)| relay::api::Socks {
                            server: Arc::clone(server),
                            store: writer.clone(),
                            changing: tokio::sync::Mutex::new(()),
                            at: *at,
                            fleet: fleet.clone(),
                        });
                let about = serde_json::json!({
                    "url": format!("http://{addr}"),
                    "socks5": socks.as_ref().map(|s| s.at.to_string()),
                });
                system::write_private(
                    &relay::api::url_file(&state),
                    &serde_json::to_string_pretty(&about)?,
                )?;
                let api = relay::api::Api {
                    token,
                    socks,
                    reload: reload_tx,
                    version: env!("CARGO_PKG_VERSION"),
                    started: system::unix_now(),
                };
                Some((l, addr, Arc::new(api)))
            }
            Err(e) if !given => {
                warn!("{e:#}; no management API (give --api ADDR or --api off)");
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    // Loaded, attached, listening: from here on only what running needs.
    relay::privileges::drop_to_runtime_set()?;
    forward.spawn();
    if let Some(listener) = metrics_listener {
        let sources = relay::metrics::Sources {
            pin_dir: dir.clone(),
            state_dir: socks5.as_ref().map(|_| state.clone()),
            refusals: socks5.as_ref().map(|(s, ..)| Arc::clone(&s.refusals)),
            fleet: socks5.as_ref().and_then(|(.., f)| f.clone()),
        };
        let addr = metrics.context("metrics")?;
        tokio::spawn(async move {
            if let Some(l) = listener.await {
                info!("Prometheus metrics on http://{addr}/metrics");
                relay::metrics::serve(l, Arc::new(sources)).await;
            }
        });
    }
    let (api_stop, api_stopped) = tokio::sync::watch::channel(false);
    if let Some((listener, addr, api)) = api {
        if !addr.ip().is_loopback() {
            warn!(
                "management API on {addr}, not a loopback address: it speaks plain HTTP and holds \
                 idle connections; put TLS and a firewall in front of it"
            );
        }
        tokio::spawn(async move {
            if let Some(l) = listener.await {
                info!(
                    "management API on http://{addr}/v1/ (token in {})",
                    relay::api::TOKEN_FILE
                );
                relay::api::serve(l, api, api_stopped).await;
            }
        });
    }
    let fleet = socks5.as_ref().and_then(|(server, _, _, _, fleet)| {
        let f = fleet.clone()?;
        tokio::spawn(Arc::clone(&f).run(Arc::clone(server)));
        Some(f)
    });
    let socks5 = socks5.map(|(server, listener, ..)| {
        tokio::spawn(Arc::clone(&server).publish());
        tokio::spawn(Arc::clone(&server).meter());
        tokio::spawn(Arc::clone(&server).serve(listener));
        server
    });
    info!(
        "relay running on {}, maps pinned in {}; Ctrl-C or SIGTERM stops it (XDP stays attached \
         for the next start), `relay stop` detaches",
        names.join(", "),
        dir.display()
    );
    if let Some(b) = &banner {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b.as_bytes()).and_then(|()| out.flush());
    }
    // Under systemd (Type=notify): ready, and the unit's main process from now on (a
    // successor started by `relay restart` replaces its predecessor there too).
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::MainPid(pid),
        sd_notify::NotifyState::Ready,
    ]) {
        warn!("telling systemd the relay is ready: {e}");
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let exit = loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("waiting for Ctrl-C")?;
                break Exit::Signal;
            }
            _ = term.recv() => break Exit::Signal,
            Some((peer, hello)) = requests.recv() => {
                match hello {
                    Ok(Some((handover::Message::Hello { want: handover::Want::Stop, .. }, _))) => {
                        let _ = peer.send(&handover::Message::Stopping, &[]);
                        break Exit::Stop(peer);
                    }
                    Ok(Some((handover::Message::Hello { want: handover::Want::TakeOver, protocol, layout, version }, _))) => {
                        if protocol != handover::PROTOCOL || layout != relay_common::session::LAYOUT {
                            let why = format!(
                                "relay {version} speaks handover {protocol} with map layout {layout:#x}; \
                                 this one {} with {:#x}",
                                handover::PROTOCOL,
                                relay_common::session::LAYOUT
                            );
                            warn!("refused a takeover: {why}");
                            let _ = peer.send(&handover::Message::Refused { why }, &[]);
                            continue;
                        }
                        info!("relay {version} is taking over: handing everything over");
                        // The successor accepts on the control socket from now on.
                        control_task.abort();
                        // The successor serves the users from now on.
                        api_stop.send_replace(true);
                        if let (Some(f), Some(s)) = (&fleet, &socks5) {
                            f.stop(s).await;
                        }
                        hand_over(peer, &forward, socks5.as_deref(), nexthops.as_deref(), &_lock, control_fd, &port_ranges).await;
                        break Exit::HandedOver;
                    }
                    Ok(other) => warn!("control socket: unexpected {:?}", other.map(|(m, _)| m)),
                    Err(e) => warn!("control socket: {e:#}"),
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let _ = reload_all(&reread, &forward, socks5.as_deref());
            }
            Some(reply) = reload_requests.recv() => {
                info!("management API: reloading the configuration");
                let r = tokio::task::block_in_place(|| reload_all(&reread, &forward, socks5.as_deref()));
                let _ = reply.send(r);
            }
        }
    };
    if !matches!(exit, Exit::HandedOver) {
        // `relay users` goes to the store directly from now on.
        let _ = std::fs::remove_file(relay::api::url_file(&state));
        if let (Some(f), Some(s)) = (&fleet, &socks5) {
            f.stop(s).await;
        }
        if let Some(s) = &socks5 {
            tokio::task::block_in_place(|| s.save_now(std::time::Duration::from_secs(2)));
        }
    }
    match exit {
        Exit::HandedOver => {
            // The successor owns the reserved ports, the links and the maps now.
            std::mem::forget(_reserved);
            program.leave();
            info!("handed over; exiting");
        }
        Exit::Signal => {
            forward.flush();
            let sessions = forward.sessions();
            let _ = datapath.update_meta(|m| {
                if m.pid == pid {
                    m.pid = 0;
                }
            });
            program.leave();
            info!(
                "stopped; XDP stays attached to {} and carries its {sessions} sessions until the \
                 next start takes them over (`relay stop` detaches)",
                names.join(", ")
            );
        }
        Exit::Stop(peer) => {
            program.detach();
            drop(datapath);
            drop(forward);
            pin::remove(&dir)?;
            info!(
                "stopped: XDP detached from {}, {} removed",
                names.join(", "),
                dir.display()
            );
            drop(peer);
        }
    }
    Ok(())
}

/// Re-reads the configuration (the file and the store's users) and applies it; what was not
/// applied is logged and returned.
fn reload_all(
    reread: &impl Fn() -> anyhow::Result<Config>,
    forward: &Forward,
    socks5: Option<&relay::socks5::server::Server>,
) -> Result<(), String> {
    // The store's users are read and applied while no change of users runs.
    let _users = socks5.map(|s| s.users_lock());
    let c = match reread() {
        Ok(c) => c,
        Err(e) => {
            warn!("reload failed, keeping the running configuration: {e:#}");
            return Err(format!("{e:#}"));
        }
    };
    let mut failed = Vec::new();
    if let Err(e) = forward.reload(&c) {
        warn!("forward rules not reloaded, keeping the running ones: {e:#}");
        failed.push(format!("forward rules: {e:#}"));
    }
    let r = match (socks5, c.socks5) {
        (Some(s), Some(cfg)) => s.reload(cfg, c.policy),
        (None, None) => Ok(()),
        _ => Err(anyhow::anyhow!(
            "adding or removing [socks5] needs a restart"
        )),
    };
    if let Err(e) = r {
        warn!("SOCKS5 not reloaded, keeping the running users and policy: {e:#}");
        failed.push(format!("SOCKS5: {e:#}"));
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.join("; ")),
    }
}

/// The address share links name: `public_address`, else the listen address, else (listening
/// on every address) the interface's.
fn share_address(cfg: &relay::config::Socks5Config, iface: &str) -> std::net::SocketAddr {
    let ip = cfg.public_address.unwrap_or(cfg.listen.ip());
    if !ip.is_unspecified() {
        return std::net::SocketAddr::new(ip, cfg.listen.port());
    }
    relay::quickstart::listen_on(iface)
        .map(|a| std::net::SocketAddr::new(a.ip(), cfg.listen.port()))
        .unwrap_or(cfg.listen)
}

/// A local HTTP service's listener. When taking over, the predecessor may hold the address
/// until it exits: then it is bound again every 100 ms, for 5 s, in the background.
async fn http_listener(
    addr: std::net::SocketAddr,
    what: &'static str,
    takeover: bool,
) -> anyhow::Result<
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<tokio::net::TcpListener>> + Send>>,
> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(Box::pin(async move { Some(l) })),
        Err(e) if takeover && e.kind() == std::io::ErrorKind::AddrInUse => {
            Ok(Box::pin(async move {
                for _ in 0..50 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
                        return Some(l);
                    }
                }
                warn!("{what}: {addr} is still in use after the takeover; not serving it");
                None
            }))
        }
        Err(e) => Err(e).with_context(|| format!("{what}: cannot listen on {addr} (in use?)")),
    }
}

/// The old process's side of a takeover: stops every service, sends what they hand over,
/// and waits until the successor says it runs on it.
async fn hand_over(
    peer: handover::Peer,
    forward: &Forward,
    socks5: Option<&relay::socks5::server::Server>,
    nexthops: Option<&NextHops>,
    lock: &pin::Lock,
    control: std::os::fd::OwnedFd,
    reserved: &[relay::config::PortRange],
) {
    use handover::{Item, Message};
    let started = std::time::Instant::now();
    if let Some(n) = nexthops {
        n.stop();
    }
    let mut items: Vec<(Item, Vec<std::os::fd::OwnedFd>)> = Vec::new();
    match handover::dup(lock.fd()) {
        Ok(fd) => items.push((Item::Lock, vec![fd])),
        Err(e) => warn!("handing over the lock: {e:#}"),
    }
    items.push((Item::Control, vec![control]));
    match forward.hand_over() {
        Ok(v) => items.extend(v.into_iter().map(|(i, fd)| (i, vec![fd]))),
        Err(e) => warn!("handing over the forward sockets: {e:#}"),
    }
    let mut unfinished = 0;
    if let Some(s) = socks5 {
        let (v, u) = s.hand_over(std::time::Duration::from_secs(5)).await;
        items.extend(v);
        unfinished = u;
    }
    let count = items.len();
    let reserved: Vec<(u16, u16)> = reserved.iter().map(|r| (r.first, r.last)).collect();
    let sent = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // One item that cannot be sent (its state too large, a descriptor refused) costs that
        // connection, not the whole handover.
        for (item, fds) in items {
            let borrowed: Vec<_> = fds.iter().map(|f| std::os::fd::AsFd::as_fd(f)).collect();
            if let Err(e) = peer.send(&Message::Item(item), &borrowed) {
                let gone = matches!(
                    e.root_cause().downcast_ref::<nix::errno::Errno>(),
                    Some(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET)
                );
                if gone {
                    return Err(e);
                }
                warn!("handover: an item was not sent: {e:#}");
            }
        }
        peer.send(
            &Message::End {
                reserved,
                unfinished,
            },
            &[],
        )?;
        match peer.recv()? {
            Some((Message::Done, _)) => Ok(()),
            other => anyhow::bail!("the successor did not confirm: {:?}", other.map(|(m, _)| m)),
        }
    })
    .await;
    match sent {
        Ok(Ok(())) => info!(
            "handed {count} items over in {} ms",
            started.elapsed().as_millis()
        ),
        Ok(Err(e)) => warn!("handover: {e:#}; exiting anyway (this process no longer serves)"),
        Err(e) => warn!("handover: {e}"),
    }
}

/// Forwards the XDP program's aya-log records to `log`.
/// The SOCKS5 CONNECT kernel path: its maps always (a predecessor's CONNECTs may be carried
/// there), its verdict unless `--xdp-mode off` (then, or if the kernel refuses it, CONNECTs
/// are spliced by the controller).
fn connect_path(
    bpf: &mut aya::Ebpf,
    mode: relay::ebpf::AttachMode,
    fresh: bool,
) -> anyhow::Result<Option<Arc<relay::socks5::splice::Splicer>>> {
    let splicer = Arc::new(relay::socks5::splice::Splicer::take(
        bpf,
        mode != relay::ebpf::AttachMode::Off,
        fresh,
    )?);
    tokio::spawn(Arc::clone(&splicer).watch());
    Ok(Some(splicer))
}

async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let what = "the XDP program's log buffer";
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for its
    // whole life.
    unsafe {
        relay::readable::each_readable(logger, what, "its records are not shown", |l| l.flush())
    }
    .await;
}
