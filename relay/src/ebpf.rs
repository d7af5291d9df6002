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
    /// Driver (native) mode, falling back to generic mode with a warning.
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode only: slower, works on every interface.
    Generic,
}

/// Loads the program into the kernel, reusing maps pinned in `pin_dir` if there are any.
/// `log_level` is the most verbose aya-log level the program may emit (0 = off).
pub fn load(pin_dir: &Path, log_level: u8) -> anyhow::Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this relay binary was built without its XDP program (AYA_BUILD_SKIP); rebuild with `cargo xtask build`");
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .override_global(aya_log::LEVEL, &log_level, false)
        .load(OBJECT)
        .map_err(|e| match e {
            EbpfError::MapError(e) => anyhow!(e).context(format!(
                "creating or reusing the maps pinned in {} (remove that directory if it is from an incompatible version)",
                pin_dir.display()
            )),
            e => anyhow!(e).context("parsing the XDP object"),
        })?;
    let prog: &mut Xdp = program(&mut ebpf)?;
    prog.load().map_err(rejected)?;
    Ok(ebpf)
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
            let why = log
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                })
                .unwrap_or("no verifier message");
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
