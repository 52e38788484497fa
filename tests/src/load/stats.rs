//! Latency percentiles over the nodes a change affects, and the coordinator's
//! CPU time and memory read from `/proc`.

use std::time::Duration;

use anyhow::{Context as _, Result};

/// When the affected nodes saw a change, relative to the change.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    /// Nodes the change should reach.
    pub expected: usize,
    /// Nodes it reached before the wait ended.
    pub reached: usize,
    /// Time until half of `expected` had it; `None` if fewer did.
    pub p50: Option<Duration>,
    /// Time until 99 % of `expected` had it.
    pub p99: Option<Duration>,
    /// Time until all of `expected` had it.
    pub p100: Option<Duration>,
}

impl Spread {
    /// Percentiles over `expected` nodes, of which those in `arrivals` got the change.
    pub fn new(expected: usize, mut arrivals: Vec<Duration>) -> Self {
        arrivals.sort_unstable();
        let at = |fraction: f64| {
            let needed = ((expected as f64) * fraction).ceil().max(1.0) as usize;
            arrivals.get(needed - 1).copied()
        };
        Self {
            expected,
            reached: arrivals.len(),
            p50: at(0.50),
            p99: at(0.99),
            p100: at(1.0),
        }
    }

    /// Whether every affected node got the change.
    pub fn complete(&self) -> bool {
        self.reached >= self.expected
    }
}

/// A process's CPU time and peak resident memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// User plus system CPU time so far.
    pub cpu: Duration,
    /// Peak resident set size in bytes (`VmHWM`).
    pub peak_rss: u64,
}

impl Usage {
    /// Reads `/proc/PID/stat` and `/proc/PID/status`.
    pub fn of(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        Ok(Self {
            cpu: cpu_time(&stat).with_context(|| format!("parse /proc/{pid}/stat"))?,
            peak_rss: peak_rss(&status).with_context(|| format!("parse /proc/{pid}/status"))?,
        })
    }
}

/// utime + stime from a `/proc/PID/stat` line. The command name may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn cpu_time(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3 of the line, utime 14, stime 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// `VmHWM` from `/proc/PID/status`, in bytes.
fn peak_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_count_missing_nodes_against_the_change() {
        let all = Spread::new(4, vec![ms(40), ms(10), ms(30), ms(20)]);
        assert_eq!(
            (all.p50, all.p99, all.p100),
            (Some(ms(20)), Some(ms(40)), Some(ms(40)))
        );
        assert!(all.complete());

        let partial = Spread::new(4, vec![ms(10), ms(20), ms(30)]);
        assert_eq!(
            (partial.p50, partial.p99, partial.p100),
            (Some(ms(20)), None, None)
        );
        assert!(!partial.complete());

        let none = Spread::new(0, Vec::new());
        assert_eq!(none.p100, None);
    }

    #[test]
    fn proc_fields_are_found_after_an_odd_command_name() {
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20";
        // SAFETY: as above.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_time(stat), Some(Duration::from_secs_f64(400.0 / hz)));
        assert_eq!(cpu_time("garbage"), None);
        assert_eq!(
            peak_rss("Name:\tx\nVmHWM:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(peak_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_usage() {
        let usage = Usage::of(std::process::id()).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(usage.peak_rss > 0);
    }
}
