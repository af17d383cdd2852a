//! Shared by the side-by-side benchmarks (`sds_fanout`, `csi_compare`): wall-clock stamps
//! that several processes agree on, percentiles, medians over repeated runs, `/proc`
//! sampling of a process's CPU time and RSS, and PNG charts (plotters, bitmap backend).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME): the one clock every process on the
/// machine reads alike, so a child's stamps and the parent's can be subtracted.
/// The wall-clock minute a run happened, for result headers (`2026-12-06 05:30 UTC`).
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Where the benchmarks write their PNGs and tables (committed, read by BENCHMARKS.md).
pub fn results_dir() -> PathBuf {
    let dir = std::env::var_os("SB_BENCH_RESULTS").map_or_else(
        || svid_bridge::testing::manifest_dir().join("benches/results"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A comma-separated list of numbers from the environment, or `default`.
pub fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v}: not a list of numbers"))
            })
            .collect(),
        _ => default.to_vec(),
    }
}

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------ statistics ----

/// Nearest-rank percentile of unsorted values; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

pub fn max(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::max)
}

/// The median of several runs' values and their spread (min, max).
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let mid = s.len() / 2;
        let median = if s.len().is_multiple_of(2) {
            (s[mid - 1] + s[mid]) / 2.0
        } else {
            s[mid]
        };
        Some(Summary {
            median,
            min: s[0],
            max: s[s.len() - 1],
            runs: s.len(),
        })
    }

    /// `median (min–max)` with `digits` decimals; the spread only for several runs.
    pub fn show(&self, digits: usize) -> String {
        if self.runs > 1 {
            format!(
                "{:.d$} ({:.d$}–{:.d$})",
                self.median,
                self.min,
                self.max,
                d = digits
            )
        } else {
            format!("{:.d$}", self.median, d = digits)
        }
    }
}

/// Metric name → one value per run, for one (system, size) cell.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    pub values: BTreeMap<String, Vec<f64>>,
}

impl Cell {
    pub fn push(&mut self, metric: &str, value: Option<f64>) {
        if let Some(v) = value {
            self.values.entry(metric.to_owned()).or_default().push(v);
        }
    }

    pub fn summary(&self, metric: &str) -> Option<Summary> {
        self.values.get(metric).and_then(|v| Summary::of(v))
    }

    pub fn median(&self, metric: &str) -> Option<f64> {
        self.summary(metric).map(|s| s.median)
    }
}

/// `b / a` formatted as a ratio, `–` when either is missing.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.2}×", b / a),
        _ => "–".to_owned(),
    }
}

pub fn show(s: Option<Summary>, digits: usize) -> String {
    s.map_or_else(|| "–".to_owned(), |s| s.show(digits))
}

// ------------------------------------------------------------------------- /proc ----

/// CPU time (ns, summed over the process's live threads from `/proc/<pid>/task/*/schedstat`,
/// which counts in nanoseconds where `/proc/<pid>/stat` counts 10 ms ticks) and RSS.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub t_ns: u64,
    pub cpu_ns: u64,
    pub rss_kib: u64,
    /// utime + stime from `/proc/<pid>/stat` (includes exited threads), in ns.
    pub stat_cpu_ns: u64,
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(base.join("status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut cpu_ns = 0u64;
    for task in std::fs::read_dir(base.join("task")).ok()?.flatten() {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            cpu_ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let stat = std::fs::read_to_string(base.join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after_comm[0] is field 3; utime = field 14, stime = field 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ProcSample {
        t_ns: now_ns(),
        cpu_ns,
        rss_kib,
        stat_cpu_ns: ticks * 10_000_000,
    })
}

/// Samples a set of processes every `interval` on a thread of its own until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<BTreeMap<String, Vec<ProcSample>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pids: Vec<(String, u32)>, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let data: Arc<Mutex<BTreeMap<String, Vec<ProcSample>>>> = Arc::default();
        let (s, d) = (stop.clone(), data.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (name, pid) in &pids {
                    if let Some(x) = sample(*pid) {
                        d.lock().unwrap().entry(name.clone()).or_default().push(x);
                    }
                }
                std::thread::sleep(interval);
            }
        });
        Sampler {
            stop,
            data,
            thread: Some(thread),
        }
    }

    /// Takes one sample of each process now (window edges), besides the periodic ones.
    pub fn mark(&self, pids: &[(String, u32)]) {
        for (name, pid) in pids {
            if let Some(x) = sample(*pid) {
                let mut d = self.data.lock().unwrap();
                let v = d.entry(name.clone()).or_default();
                v.push(x);
                v.sort_by_key(|s| s.t_ns);
            }
        }
    }

    pub fn finish(mut self) -> BTreeMap<String, Vec<ProcSample>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.data.lock().unwrap())
    }
}

/// The sample nearest to `t_ns` (CPU is linearly interpolated between neighbours).
pub fn cpu_at(samples: &[ProcSample], t_ns: u64) -> Option<f64> {
    let after = samples.iter().position(|s| s.t_ns >= t_ns)?;
    if after == 0 {
        return Some(samples[0].cpu_ns as f64);
    }
    let (a, b) = (samples[after - 1], samples[after]);
    let frac = (t_ns - a.t_ns) as f64 / (b.t_ns - a.t_ns).max(1) as f64;
    Some(a.cpu_ns as f64 + frac * (b.cpu_ns as f64 - a.cpu_ns as f64))
}

/// CPU nanoseconds spent in `[from, to]`.
pub fn cpu_between(samples: &[ProcSample], from: u64, to: u64) -> Option<f64> {
    Some(cpu_at(samples, to)? - cpu_at(samples, from)?)
}

/// Largest RSS seen in `[from, to]`.
pub fn rss_max_between(samples: &[ProcSample], from: u64, to: u64) -> Option<u64> {
    samples
        .iter()
        .filter(|s| s.t_ns >= from && s.t_ns <= to)
        .map(|s| s.rss_kib)
        .max()
}

/// RSS of the last sample at or before `t`.
pub fn rss_at(samples: &[ProcSample], t: u64) -> Option<u64> {
    samples
        .iter()
        .rev()
        .find(|s| s.t_ns <= t)
        .map(|s| s.rss_kib)
}

/// A line about the machine for the report: CPU model, cores, memory, kernel.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Writes `text` to `dir/name` and says so.
pub fn write_result(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("wrote {}", path.display());
}
