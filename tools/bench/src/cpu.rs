//! Where the CPU time of a measured phase went: this process (custody's
//! relay, consumer and producers, or the ceiling's client), PostgreSQL (every
//! `postgres` process: backends, WAL writer, checkpointer …), nats-server,
//! and everything else on the machine. On a machine where all of them share
//! the same cores, the sum per message is what bounds a rate: at 2 cores a
//! pipeline cannot go faster than 2 s of CPU per second divided by the CPU
//! seconds each message costs, whoever spends them.
//!
//! Read from /proc (the `procfs` crate); Linux only. Elsewhere (or if /proc
//! cannot be read) the meter reports nothing and the figures say so.

use std::collections::HashMap;
use std::time::Duration;

use procfs::CurrentSI;
use serde::Serialize;

/// Processes are grouped by their command name (`comm`).
const GROUPS: [(&str, &str); 3] = [
    ("custody", "this process"),
    ("postgres", "postgres"),
    ("nats-server", "nats-server"),
];

/// Cumulative CPU seconds per group, and of the whole machine, at one moment.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// pid → (group, CPU seconds so far); a process that ended between two
    /// snapshots is lost from the second one (its time is not counted).
    by_pid: HashMap<i32, (usize, f64)>,
    /// Busy CPU seconds of all cores (user + nice + system + irq + softirq + steal).
    machine_busy: f64,
    /// Everything the kernel counts on all cores (busy + idle + iowait).
    machine_total: f64,
}

/// CPU seconds spent during a phase, per group.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// Wall-clock seconds of the phase.
    pub wall_s: f64,
    /// CPU seconds of this benchmark process.
    pub this_process_s: f64,
    /// CPU seconds of all `postgres` processes.
    pub postgres_s: f64,
    /// CPU seconds of `nats-server`.
    pub nats_server_s: f64,
    /// Busy CPU seconds of the whole machine (the three above and anything else).
    pub machine_busy_s: f64,
    /// Cores' worth of capacity the machine had during the phase.
    pub cores: f64,
}

impl CpuUse {
    /// Busy CPU seconds not spent by the three groups (other work on the machine).
    pub fn other_s(&self) -> f64 {
        (self.machine_busy_s - self.this_process_s - self.postgres_s - self.nats_server_s).max(0.0)
    }

    /// Fraction of the machine's capacity that was busy.
    pub fn busy_share(&self) -> f64 {
        if self.wall_s <= 0.0 || self.cores <= 0.0 {
            return 0.0;
        }
        self.machine_busy_s / (self.wall_s * self.cores)
    }
}

impl CpuSnapshot {
    /// The CPU time of every process of interest and of the machine, now.
    /// `None` where /proc cannot be read.
    pub fn take() -> Option<CpuSnapshot> {
        let tps = procfs::ticks_per_second() as f64;
        let me = std::process::id() as i32;
        let mut by_pid = HashMap::new();
        for p in procfs::process::all_processes().ok()?.flatten() {
            // processes come and go; one that vanished is simply skipped
            let Ok(stat) = p.stat() else { continue };
            let group = if stat.pid == me {
                Some(0)
            } else {
                GROUPS
                    .iter()
                    .skip(1)
                    .position(|(comm, _)| stat.comm == *comm)
                    .map(|i| i + 1)
            };
            if let Some(g) = group {
                by_pid.insert(stat.pid, (g, (stat.utime + stat.stime) as f64 / tps));
            }
        }
        let kernel = procfs::KernelStats::current().ok()?;
        let t = &kernel.total;
        let secs = |ticks: u64| ticks as f64 / tps;
        let busy = secs(t.user + t.nice + t.system)
            + secs(t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0));
        let total = busy + secs(t.idle + t.iowait.unwrap_or(0));
        Some(CpuSnapshot {
            by_pid,
            machine_busy: busy,
            machine_total: total,
        })
    }

    /// What was spent from `self` to `later`, a phase of `wall` seconds.
    pub fn until(&self, later: &CpuSnapshot, wall: Duration) -> CpuUse {
        let mut groups = [0.0f64; GROUPS.len()];
        for (pid, (g, s)) in &later.by_pid {
            // a process started during the phase counts from zero
            let before = self.by_pid.get(pid).map_or(0.0, |(_, b)| *b);
            groups[*g] += (s - before).max(0.0);
        }
        let wall_s = wall.as_secs_f64();
        let total = later.machine_total - self.machine_total;
        let busy = later.machine_busy - self.machine_busy;
        CpuUse {
            wall_s,
            this_process_s: groups[0],
            postgres_s: groups[1],
            nats_server_s: groups[2],
            machine_busy_s: busy.max(0.0),
            cores: if wall_s > 0.0 { total / wall_s } else { 0.0 },
        }
    }
}

/// Measures one phase: `start` before it, `stop` after.
pub struct CpuMeter {
    start: Option<CpuSnapshot>,
    began: std::time::Instant,
}

impl CpuMeter {
    /// Start measuring now.
    pub fn start() -> CpuMeter {
        CpuMeter {
            start: CpuSnapshot::take(),
            began: std::time::Instant::now(),
        }
    }

    /// What the phase since `start` used (`None` without /proc).
    pub fn stop(self) -> Option<CpuUse> {
        let end = CpuSnapshot::take()?;
        Some(self.start?.until(&end, self.began.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_burning_cpu_is_counted() -> anyhow::Result<()> {
        let Some(before) = CpuSnapshot::take() else {
            // not Linux: nothing to check
            return Ok(());
        };
        // Burn CPU until the snapshot counts 0.15 s of it, bounded by 20 s of
        // wall time: a counter that does not see this process's CPU never
        // gets there and fails; a loaded machine only makes it take longer
        // (a wall-clock budget of 0.3 s failed under load).
        let began = std::time::Instant::now();
        let mut x = 0u64;
        let used = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
            let now = CpuSnapshot::take().ok_or_else(|| anyhow::anyhow!("/proc went away"))?;
            let used = before.until(&now, began.elapsed());
            if used.this_process_s >= 0.15 || began.elapsed() > Duration::from_secs(20) {
                break used;
            }
        };
        assert!(used.this_process_s >= 0.15, "{used:?}");
        // the machine's counters (/proc/stat) and the process's are read a
        // moment apart and both count in clock ticks (10 ms): allow 5 ticks
        assert!(
            used.machine_busy_s + 0.05 >= used.this_process_s,
            "{used:?}"
        );
        assert!(used.cores >= 1.0, "{used:?}");
        Ok(())
    }
}
