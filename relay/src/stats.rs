//! Counters as the operator sees them: read from the pinned maps, summed over CPUs, printed as
//! a table or JSON.

use std::{borrow::Borrow, collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray};
use relay_common::{
    counters::{Counter, Reason, Verdict},
    maps,
};
use serde::Serialize;

/// Totals of the data path's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Packets and bytes per verdict.
    pub verdicts: BTreeMap<&'static str, Totals>,
    /// Packets and bytes per reason (every reason, zero or not).
    pub reasons: BTreeMap<&'static str, Totals>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, c: &Counter) {
        self.packets += c.packets;
        self.bytes += c.bytes;
    }
}

impl Snapshot {
    /// Sums the per-CPU `COUNTERS` map.
    pub fn read<M: Borrow<MapData>>(
        counters: &PerCpuArray<M, Counter>,
    ) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot::default();
        for v in Verdict::ALL {
            s.verdicts.insert(v.name(), Totals::default());
        }
        for &reason in Reason::ALL {
            let per_cpu = counters
                .get(&(reason as u32), 0)
                .with_context(|| format!("reading counter {}", reason.name()))?;
            let mut t = Totals::default();
            for c in per_cpu.iter() {
                t.add(c);
            }
            s.reasons.insert(reason.name(), t);
            if let Some(v) = s.verdicts.get_mut(reason.verdict().name()) {
                v.packets += t.packets;
                v.bytes += t.bytes;
            }
        }
        Ok(s)
    }

    /// Reads the counters of a loaded program.
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> anyhow::Result<Snapshot> {
        let map = ebpf
            .map(maps::COUNTERS)
            .context("the XDP object has no COUNTERS map")?;
        let counters: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(map).context("COUNTERS is not a per-CPU array")?;
        Snapshot::read(&counters)
    }

    /// Reads the counters pinned in `pin_dir` by a running (or stopped) relay.
    pub fn from_pin(pin_dir: &Path) -> anyhow::Result<Snapshot> {
        let path = pin_dir.join(maps::COUNTERS);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "no relay counters at {} (is the relay running on this interface?)",
                path.display()
            )
        })?;
        let counters = PerCpuArray::try_from(Map::PerCpuArray(data))
            .context("COUNTERS is not a per-CPU array")?;
        Snapshot::read(&counters)
    }

    pub fn reason(&self, r: Reason) -> Totals {
        self.reasons.get(r.name()).copied().unwrap_or_default()
    }

    pub fn verdict(&self, v: Verdict) -> Totals {
        self.verdicts.get(v.name()).copied().unwrap_or_default()
    }

    /// The human-readable table `relay stats` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<10} {:>14} {:>16}", "verdict", "packets", "bytes");
        for v in Verdict::ALL {
            let t = self.verdict(v);
            let _ = writeln!(out, "{:<10} {:>14} {:>16}", v.name(), t.packets, t.bytes);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>14} {:>16}",
            "reason", "verdict", "packets", "bytes"
        );
        for &r in Reason::ALL {
            let t = self.reason(r);
            let _ = writeln!(
                out,
                "{:<16} {:<8} {:>14} {:>16}",
                r.name(),
                r.verdict().name(),
                t.packets,
                t.bytes
            );
        }
        out
    }
}
