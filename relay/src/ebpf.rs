//! The embedded XDP program: loading (with pinned maps), attaching, and errors an operator can
//! act on.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use aya::{
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use log::{info, warn};

/// The XDP object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "relay";

/// How to attach: what `--xdp-mode` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode, falling back to generic mode with a warning, and to the
    /// userspace relay if the kernel refuses the program.
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode only: slower, works on every interface.
    Generic,
    /// No XDP: the controller relays every packet itself (same sessions, lower rate).
    Off,
}

/// What the loader needs to size and parameterise the maps.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub pin_dir: std::path::PathBuf,
    /// Most verbose aya-log level the program may emit (0 = off).
    pub log_level: u8,
    /// Sessions the maps hold.
    pub capacity: u32,
    /// Session ports (UDP to them from strangers is dropped).
    pub session_ports: Option<(u16, u16)>,
    /// SOCKS5 UDP ASSOCIATE ports (datagrams to them may have a SOCKS5 header to strip).
    pub socks_ports: Option<(u16, u16)>,
}

impl LoadOptions {
    /// Options for tests and tools: small maps, no port check.
    pub fn new(pin_dir: &Path) -> LoadOptions {
        LoadOptions {
            pin_dir: pin_dir.to_path_buf(),
            log_level: 0,
            capacity: 1024,
            session_ports: None,
            socks_ports: None,
        }
    }
}

/// Creates (or reuses the pinned) maps and loads the program through the verifier.
pub fn load(opts: &LoadOptions) -> anyhow::Result<Ebpf> {
    let mut ebpf = load_maps(opts)?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Parses the object and creates or reuses its pinned maps, sized from `opts`.
pub fn load_maps(opts: &LoadOptions) -> anyhow::Result<Ebpf> {
    use relay_common::maps;
    if OBJECT.is_empty() {
        bail!("this relay binary was built without its XDP program (AYA_BUILD_SKIP); rebuild with `cargo xtask build`");
    }
    let (first, last) = opts.session_ports.unwrap_or((0, 0));
    let (socks_first, socks_last) = opts.socks_ports.unwrap_or((0, 0));
    let flows = opts.capacity.saturating_mul(2);
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_dir)
        .override_global(aya_log::LEVEL, &opts.log_level, false)
        .override_global("SESSION_PORT_FIRST", &first, true)
        .override_global("SESSION_PORT_LAST", &last, true)
        .override_global("SOCKS_PORT_FIRST", &socks_first, true)
        .override_global("SOCKS_PORT_LAST", &socks_last, true)
        .map_max_entries(maps::FLOWS, flows)
        .map_max_entries(maps::SESSIONS, opts.capacity)
        .map_max_entries(maps::SLOWPATH, opts.capacity)
        .load(OBJECT)
        .map_err(|e| match e {
            EbpfError::MapError(e) => anyhow!(e).context(format!(
                "creating or reusing the maps pinned in {} (remove them with `relay unpin` if they are from an incompatible version)",
                opts.pin_dir.display()
            )),
            e => anyhow!(e).context("parsing the XDP object"),
        })?;
    // Pinned maps from an earlier run keep their size; a different capacity needs a reset.
    for (name, want) in [(maps::SESSIONS, opts.capacity), (maps::FLOWS, flows)] {
        let map = ebpf
            .map(name)
            .ok_or_else(|| anyhow!("the XDP object has no map {name}"))?;
        let have = match map {
            aya::maps::Map::Array(m) | aya::maps::Map::HashMap(m) => m.info()?.max_entries(),
            _ => want,
        };
        if have != want {
            bail!(
                "the pinned maps in {} hold {} sessions but the configuration asks for {}; \
                 keep the old capacity, or stop the relay and run `relay unpin` (this drops the sessions)",
                opts.pin_dir.display(),
                if name == maps::FLOWS { have / 2 } else { have },
                opts.capacity
            );
        }
    }
    Ok(ebpf)
}

/// Loads the data-path program (the verifier runs here).
pub fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    program(ebpf)?.load().map_err(rejected)
}

/// The XDP program in a loaded object.
pub fn program(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("the XDP object has no program named {PROGRAM:?}"))?
        .try_into()
        .context("the program in the XDP object is not an XDP program")
}

/// Turns a program load failure into one line that says why the kernel refused, keeping the
/// whole verifier log available at debug level.
fn rejected(e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = format!("{verifier_log:?}");
            log::debug!("verifier log:\n{log}");
            let why = verifier_reason(&log);
            anyhow!("the kernel rejected the XDP program ({io_error}): verifier says: {why} (full log with RUST_LOG=debug)")
        }
        e => anyhow!(e).context("loading the XDP program"),
    }
}

/// The line of a verifier log that says why the program was refused: the last one that is
/// not a statistics line.
pub fn verifier_reason(log: &str) -> &str {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .unwrap_or("no verifier message")
}

/// Whether an attach error says another XDP program already holds the interface.
fn already_attached(e: &ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST)) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// The operator's view of a failed attach.
fn attach_error(iface: &str, mode: XdpMode, e: ProgramError) -> anyhow::Error {
    if already_attached(&e) {
        anyhow!(
            "attaching XDP to {iface}: another XDP program is already attached \
             (another relay? see `ip link show {iface}`)"
        )
    } else {
        anyhow!(e).context(format!(
            "attaching XDP to {iface} in {} mode",
            mode_name(mode)
        ))
    }
}

/// Attaches the loaded program to `iface`.
pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: AttachMode) -> anyhow::Result<XdpMode> {
    let prog = program(ebpf)?;
    let mut attach_in = |m: XdpMode| {
        prog.attach(iface, m)
            .map(|_| m)
            .map_err(|e| attach_error(iface, m, e))
    };
    let attached = match mode {
        AttachMode::Driver => attach_in(XdpMode::Driver)?,
        AttachMode::Generic => attach_in(XdpMode::Skb)?,
        AttachMode::Off => bail!("attach called with --xdp-mode off"),
        AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(_) => XdpMode::Driver,
            Err(e) if already_attached(&e) => return Err(attach_error(iface, XdpMode::Driver, e)),
            Err(e) => {
                warn!(
                    "attaching XDP to {iface} in driver mode: {e}; falling back to generic mode, which is slower"
                );
                prog.attach(iface, XdpMode::Skb)
                    .map_err(|e| attach_error(iface, XdpMode::Skb, e))?;
                XdpMode::Skb
            }
        },
    };
    info!("attached to {iface} in {} mode", mode_name(attached));
    Ok(attached)
}

/// The loaded object while the relay runs: the one owner of its program, which it attaches
/// to interfaces and detaches on the way out. (The maps were taken out of it before, by
/// [`crate::datapath::Datapath::take`].)
pub struct Attachment {
    ebpf: Ebpf,
}

impl Attachment {
    pub fn new(ebpf: Ebpf) -> Attachment {
        Attachment { ebpf }
    }

    /// Attaches the program to `iface` (see [`attach`]).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> anyhow::Result<XdpMode> {
        attach(&mut self.ebpf, iface, mode)
    }

    /// Detaches the program from every interface; the pinned maps (and sessions) stay.
    pub fn detach(mut self) {
        for (_, p) in self.ebpf.programs_mut() {
            if let Ok(xdp) = <&mut Xdp>::try_from(p) {
                let _ = xdp.unload();
            }
        }
    }
}

pub fn mode_name(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Driver => "driver",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::verifier_reason;

    #[test]
    fn verifier_reason_skips_statistics() {
        let log = "0: R1=ctx() R10=fp0\n; let p = ...\n12: (61) r2 = *(u32 *)(r3 +0)\n\
                   invalid access to packet, off=0 size=4, R3(id=0,off=0,r=0)\n\
                   R3 offset is outside of the packet\n\
                   processed 13 insns (limit 1000000) max_states_per_insn 0\n\
                   stack depth 0\nverification time 52 usec\n\n";
        assert_eq!(verifier_reason(log), "R3 offset is outside of the packet");
        assert_eq!(verifier_reason(""), "no verifier message");
    }
}
