//! The embedded XDP program: loading (with pinned maps), attaching, and errors an operator can
//! act on.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    programs::{links::FdLink, xdp::XdpLink, xdp::XdpLinkId, ProgramError, Xdp, XdpMode},
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
    /// Interfaces (ifindexes) on which what would leave by XDP_TX leaves by a redirect to the
    /// interface it came in on: veths, which wake their peer for redirected frames but for
    /// XDP_TX frames only if the peer has an XDP program of its own (`veth_xdp_flush`), so
    /// XDP_TX frames may wait in the peer's queue.
    pub tx_by_redirect: Vec<u32>,
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
            tx_by_redirect: Vec::new(),
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
    let pool = relay_common::session::pool_slots(opts.capacity);
    let [acked, una, seq] = tcp_sock_offsets();
    let tx_by_redirect = relay_common::counters::tx_by_redirect(&opts.tx_by_redirect);
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_dir)
        .override_global(aya_log::LEVEL, &opts.log_level, false)
        .override_global("SESSION_PORT_FIRST", &first, true)
        .override_global("SESSION_PORT_LAST", &last, true)
        .override_global("SOCKS_PORT_FIRST", &socks_first, true)
        .override_global("SOCKS_PORT_LAST", &socks_last, true)
        .override_global("TCP_BYTES_ACKED", &acked, true)
        .override_global("TCP_SND_UNA", &una, true)
        .override_global("TCP_WRITE_SEQ", &seq, true)
        .override_global("TX_BY_REDIRECT", &tx_by_redirect, true)
        .map_max_entries(maps::FLOWS, flows)
        .map_max_entries(maps::SESSIONS, opts.capacity)
        .map_max_entries(maps::SLOWPATH, opts.capacity)
        .map_max_entries(maps::HOPS, opts.capacity)
        .map_max_entries(maps::POOLS[0], pool)
        .map_max_entries(maps::POOLS[1], pool)
        .map_max_entries(maps::POOLS[2], pool)
        .map_max_entries(maps::POOLS[3], pool)
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

/// Byte offsets of `bytes_acked`, `snd_una` and `write_seq` in the running kernel's
/// `struct tcp_sock`, from its BTF, for the CONNECT verdict (`relay_common::splice::sent_into`):
/// zeros if the kernel has no BTF or the fields are not where this build looks (the verdict
/// then redirects within the controller's credit alone). Read once per process.
pub fn tcp_sock_offsets() -> [u32; 3] {
    static OFFSETS: std::sync::OnceLock<[u32; 3]> = std::sync::OnceLock::new();
    *OFFSETS.get_or_init(|| match find_tcp_sock_offsets() {
        Ok(o) => o,
        Err(e) => {
            info!("CONNECT kernel path: {e:#}; the controller paces it instead");
            [0; 3]
        }
    })
}

fn find_tcp_sock_offsets() -> anyhow::Result<[u32; 3]> {
    use btf_rs::{Btf, Type};
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let btf = Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let types = btf
        .resolve_types_by_name("tcp_sock")
        .context("no struct tcp_sock in the kernel's BTF")?;
    let Some(Type::Struct(tcp)) = types.into_iter().find(|t| matches!(t, Type::Struct(_))) else {
        bail!("no struct tcp_sock in the kernel's BTF");
    };
    let mut found = [0u32; 3];
    for m in &tcp.members {
        let Ok(name) = btf.resolve_name(m) else {
            continue;
        };
        // (field, its size in bytes): a field of another size is not the one this reads.
        let slot = match name.as_str() {
            "bytes_acked" => 0,
            "snd_una" => 1,
            "write_seq" => 2,
            _ => continue,
        };
        let want = if slot == 0 { 8 } else { 4 };
        // Through typedefs (`u64`, `u32`) and qualifiers down to the integer.
        let mut ty = btf.resolve_chained_type(m).ok();
        for _ in 0..8 {
            match &ty {
                Some(Type::Typedef(t)) => ty = btf.resolve_chained_type(t).ok(),
                Some(Type::Volatile(t)) => ty = btf.resolve_chained_type(t).ok(),
                _ => break,
            }
        }
        let size = match ty {
            Some(Type::Int(i)) => Some(i.size()),
            _ => None,
        };
        if m.bit_offset() % 8 != 0 || m.bitfield_size().unwrap_or(0) != 0 || size != Some(want) {
            bail!("struct tcp_sock's {name} is not a plain {want}-byte field in this kernel");
        }
        found[slot] = m.bit_offset() / 8;
    }
    if found.contains(&0) {
        bail!("struct tcp_sock lacks bytes_acked, snd_una or write_seq in this kernel's BTF");
    }
    Ok(found)
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

/// Attaches the loaded program to `iface`; the link stays in the program (detached with it).
pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: AttachMode) -> anyhow::Result<XdpMode> {
    attach_link(ebpf, iface, mode).map(|(_, m)| m)
}

fn attach_link(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
) -> anyhow::Result<(XdpLinkId, XdpMode)> {
    let prog = program(ebpf)?;
    let mut attach_in = |m: XdpMode| {
        prog.attach(iface, m)
            .map(|id| (id, m))
            .map_err(|e| attach_error(iface, m, e))
    };
    let attached = match mode {
        AttachMode::Driver => attach_in(XdpMode::Driver)?,
        AttachMode::Generic => attach_in(XdpMode::Skb)?,
        AttachMode::Off => bail!("attach called with --xdp-mode off"),
        AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, XdpMode::Driver),
            Err(e) if already_attached(&e) => return Err(attach_error(iface, XdpMode::Driver, e)),
            Err(e) => {
                warn!(
                    "attaching XDP to {iface} in driver mode: {e}; falling back to generic mode, which is slower"
                );
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .map_err(|e| attach_error(iface, XdpMode::Skb, e))?;
                (id, XdpMode::Skb)
            }
        },
    };
    Ok(attached)
}

/// How the program got onto an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment in this mode.
    New(XdpMode),
    /// The link a previous controller pinned now runs this program (replaced atomically).
    TookOver,
}

/// Whether this kernel attaches XDP through bpf_link (5.9 and later), which can be pinned to
/// outlive the controller and updated in place.
fn has_bpf_link() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 9, 0))
}

/// The loaded object while the relay runs: the one owner of its program and of the XDP links.
/// A link is pinned beside the maps (`link_IFACE`), so the program stays attached and keeps
/// relaying when the controller exits, however it exits; the next controller replaces the
/// program on the same link (`bpf_link_update`, atomic: no packet sees no program). (The maps
/// were taken out of the object before, by [`crate::datapath::Datapath::take`].)
pub struct Attachment {
    ebpf: Ebpf,
    dir: PathBuf,
    /// The links this process holds (their pins keep them attached after it exits).
    links: Vec<FdLink>,
    /// No bpf_link on this kernel: the program detaches when the controller exits.
    legacy: bool,
}

impl Attachment {
    pub fn new(ebpf: Ebpf, dir: &Path) -> Attachment {
        Attachment {
            ebpf,
            dir: dir.to_path_buf(),
            links: Vec::new(),
            legacy: !has_bpf_link(),
        }
    }

    /// Puts the program on `iface`: on the link a previous controller pinned if there is
    /// one (atomically replacing its program), else on a new link, pinned.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> anyhow::Result<Attached> {
        if self.legacy {
            warn!(
                "this kernel has no bpf_link for XDP: the program detaches when the relay \
                 stops, and restarts are not hitless"
            );
            return attach(&mut self.ebpf, iface, mode).map(Attached::New);
        }
        let pin = crate::pin::link(&self.dir, iface);
        if pin.exists() {
            match self.take_over(iface, &pin) {
                Ok(()) => {
                    info!("{iface}: took over the pinned XDP link; program replaced atomically");
                    return Ok(Attached::TookOver);
                }
                Err(e) => {
                    warn!(
                        "{iface}: the pinned XDP link cannot be taken over ({e:#}); attaching anew"
                    );
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let (id, m) = attach_link(&mut self.ebpf, iface, mode)?;
        let link = program(&mut self.ebpf)?
            .take_link(id)
            .context("taking the XDP link")?;
        let link = FdLink::try_from(link).context("the XDP attachment is not a bpf_link")?;
        // The pin holds the link; this process keeps its own reference until it exits.
        let pinned = link
            .pin(&pin)
            .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
        let link = FdLink::from(pinned);
        self.links.push(link);
        info!("attached to {iface} in {} mode", mode_name(m));
        Ok(Attached::New(m))
    }

    fn take_over(&mut self, iface: &str, pin: &Path) -> anyhow::Result<()> {
        let pinned = aya::programs::links::PinnedLink::from_pin(pin).context("opening the pin")?;
        let link = XdpLink::try_from(FdLink::from(pinned)).context("not an XDP link")?;
        let prog = program(&mut self.ebpf)?;
        let id = prog
            .attach_to_link(link)
            .with_context(|| format!("replacing the program on {iface}'s link"))?;
        let link = prog.take_link(id).context("taking the XDP link")?;
        self.links
            .push(FdLink::try_from(link).context("the XDP attachment is not a bpf_link")?);
        Ok(())
    }

    /// Leaves the program attached for the next controller (pinned links); on a kernel
    /// without bpf_link it detaches.
    pub fn leave(mut self) {
        if self.legacy {
            self.unload();
        }
    }

    /// Detaches the program from every interface (removes the link pins) and unloads it.
    pub fn detach(mut self) {
        detach_pinned(&self.dir, None);
        self.links.clear();
        self.unload();
    }

    fn unload(&mut self) {
        for (_, p) in self.ebpf.programs_mut() {
            if let Ok(xdp) = <&mut Xdp>::try_from(p) {
                let _ = xdp.unload();
            }
        }
    }
}

/// Removes the pinned XDP links in `dir` (which detaches them), except those of `keep`.
/// Returns the interfaces detached.
pub fn detach_pinned(dir: &Path, keep: Option<&[String]>) -> Vec<String> {
    let mut gone = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return gone;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_prefix("link_") else {
            continue;
        };
        if keep.is_some_and(|k| k.iter().any(|i| i == iface)) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            gone.push(iface.to_owned());
        }
    }
    gone
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
    use super::{find_tcp_sock_offsets, verifier_reason};

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

    /// This machine's kernel has BTF: the offsets are found, distinct, and inside a
    /// `tcp_sock` (which is larger than 1 KiB on every kernel with these fields).
    #[test]
    fn finds_the_tcp_sock_fields_in_the_kernels_btf() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return;
        }
        let [acked, una, seq] = find_tcp_sock_offsets().expect("offsets");
        assert!(
            acked > 1024 && una > 1024 && seq > 1024,
            "{acked} {una} {seq}"
        );
        assert!(acked != una && una != seq && acked % 8 == 0 && una % 4 == 0 && seq % 4 == 0);
    }
}
