//! A background sampler of GPU counters for `colocate gpu monitor` and the lab.
//!
//! Counters come from NVML GPM (Hopper and newer), named after the DCGM fields the seed
//! studies read: SM active (DCGM 1002, GPM SM_UTIL), SM occupancy (1003), tensor active
//! (1004, ANY_TENSOR_UTIL) and DRAM bandwidth (1005). GPM computes a metric between two
//! samples, so each [`Sample`] describes the interval that ends at its time `t`. Where
//! GPM is unsupported the sampler falls back to NVML utilisation rates, marks the
//! samples `source: "utilization"` and leaves occupancy and tensor empty (never zeros).
//!
//! The sampler runs on its own thread and measures its own CPU time
//! ([`Telemetry::sampler_cpu_seconds`]) so its cost on the workload is on record.
mod output;
mod summary;

pub use output::{csv_row, Format, SampleWriter, CSV_HEADER};
pub use summary::{
    percentile_sorted, stat, summarize, summarize_totals, GpuWindow, Stat, TotalSample,
    TotalsWindow, WindowSummary, COUNTER_NAMES, SUMMED,
};

use anyhow::{anyhow, bail, Result};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::{Device, GpmSample, Nvml};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where SM active / DRAM figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterSource {
    /// NVML GPM: the DCGM 1002-1005 equivalents.
    Gpm,
    /// NVML utilisation rates: `sm_active` is the share of time any kernel ran and
    /// `dram_bw` the share of time memory was read or written; coarser than GPM.
    Utilization,
}

impl CounterSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpm => "gpm",
            Self::Utilization => "utilization",
        }
    }
}

/// One GPU over one interval. Percentages are 0-100; `None` = not measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// End of the interval, unix epoch seconds.
    pub t: f64,
    pub gpu: u32,
    pub sm_active: Option<f64>,
    pub sm_occupancy: Option<f64>,
    pub tensor_active: Option<f64>,
    pub dram_bw: Option<f64>,
    pub power_w: Option<f64>,
    pub temp_c: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub mem_used_bytes: Option<u64>,
    pub processes: Vec<ProcSample>,
    pub source: CounterSource,
}

/// A compute process on the GPU at sample time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    pub pid: u32,
    pub name: String,
    pub mem_bytes: u64,
    /// NVML's per-process SM utilisation over the last interval, where it gives one.
    pub sm_util: Option<f64>,
}

/// Everything a sampler recorded, returned by [`Sampler::stop`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Telemetry {
    pub interval_s: f64,
    pub gpus: Vec<u32>,
    pub samples: Vec<Sample>,
    /// Notes a report must show (fallbacks, counters that failed).
    pub notes: Vec<String>,
    /// CPU time the sampler thread used, and the wall time it ran: its cost.
    pub sampler_cpu_seconds: f64,
    pub sampler_wall_seconds: f64,
}

#[derive(Default)]
struct Shared {
    samples: Vec<Sample>,
    notes: Vec<String>,
}

/// A running sampler. Dropping it stops the thread.
pub struct Sampler {
    shared: Arc<Mutex<Shared>>,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<(f64, f64)>>,
    interval: Duration,
    gpus: Vec<u32>,
}

const GPM_METRICS: [GpmMetricId; 4] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
];

impl Sampler {
    /// Starts sampling every `interval` the GPUs given (all when `None`). Fails at once
    /// (with [`crate::NO_GPU`]) when there is no GPU or an index does not exist.
    pub fn start(interval: Duration, gpus: Option<Vec<u32>>) -> Result<Self> {
        if interval < Duration::from_millis(10) {
            bail!("sampling interval {interval:?} is too short (at least 10ms)");
        }
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<u32>>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("gpu-sampler".into())
            .spawn(move || sampler_thread(interval, gpus, sh, ready_tx, stop_rx))
            .map_err(|e| anyhow!("starting the sampler thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(gpus)) => Ok(Self {
                shared,
                stop_tx: Some(stop_tx),
                thread: Some(thread),
                interval,
                gpus,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                bail!("the GPU sampler thread ended before it started")
            }
        }
    }

    /// The GPU indices being sampled.
    pub fn gpus(&self) -> &[u32] {
        &self.gpus
    }

    /// All samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.clone()
    }

    /// Samples from position `index` on (for following the stream without copying it all).
    pub fn samples_since(&self, index: usize) -> Vec<Sample> {
        let g = self.lock();
        g.samples
            .get(index..)
            .map(<[Sample]>::to_vec)
            .unwrap_or_default()
    }

    /// Notes so far (fallbacks, failing counters).
    pub fn notes(&self) -> Vec<String> {
        self.lock().notes.clone()
    }

    /// Mean / p50 / max per GPU and counter over `[from, to]` (unix seconds).
    pub fn summarize(&self, from: f64, to: f64) -> WindowSummary {
        summarize(&self.lock().samples, from, to)
    }

    /// Stops the thread and returns everything recorded.
    pub fn stop(mut self) -> Telemetry {
        let (cpu, wall) = self.halt();
        let shared = std::mem::take(&mut *self.lock());
        Telemetry {
            interval_s: self.interval.as_secs_f64(),
            gpus: self.gpus.clone(),
            samples: shared.samples,
            notes: shared.notes,
            sampler_cpu_seconds: cpu,
            sampler_wall_seconds: wall,
        }
    }

    fn halt(&mut self) -> (f64, f64) {
        drop(self.stop_tx.take());
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((0.0, 0.0))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic in the sampler thread poisons the lock; the data is still good.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Now as unix epoch seconds.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Per-GPU sampling state: the device, the previous GPM sample, the last process
/// utilisation timestamp.
struct GpuState<'n> {
    index: u32,
    dev: Device<'n>,
    gpm_prev: Option<GpmSample<'n>>,
    last_proc_ts: Option<u64>,
}

fn sampler_thread(
    interval: Duration,
    wanted: Option<Vec<u32>>,
    shared: Arc<Mutex<Shared>>,
    ready: mpsc::Sender<Result<Vec<u32>>>,
    stop: mpsc::Receiver<()>,
) -> (f64, f64) {
    let cpu0 = thread_cpu_seconds();
    let wall0 = Instant::now();
    let nvml = match crate::nvml::open() {
        Ok(n) => n,
        Err(e) => {
            let _ = ready.send(Err(e));
            return (0.0, 0.0);
        }
    };
    let mut states = match open_gpus(&nvml, wanted, &shared) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return (0.0, 0.0);
        }
    };
    let _ = ready.send(Ok(states.iter().map(|s| s.index).collect()));
    let start = Instant::now();
    let mut tick: u32 = 1;
    loop {
        let next = start + interval * tick;
        let wait = next.saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => break, // stop requested or the Sampler is gone
        }
        let t = now_unix();
        let mut batch = Vec::with_capacity(states.len());
        for st in states.iter_mut() {
            batch.push(sample_one(&nvml, st, t, &shared));
        }
        lock(&shared).samples.extend(batch);
        // Skip ticks missed (a stalled driver call) rather than bursting to catch up.
        tick = (start.elapsed().as_nanos() / interval.as_nanos().max(1)) as u32 + 1;
    }
    (thread_cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64())
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn note(shared: &Mutex<Shared>, msg: String) {
    tracing::warn!("{msg}");
    let mut g = lock(shared);
    if !g.notes.contains(&msg) {
        g.notes.push(msg);
    }
}

fn open_gpus<'n>(
    nvml: &'n Nvml,
    wanted: Option<Vec<u32>>,
    shared: &Mutex<Shared>,
) -> Result<Vec<GpuState<'n>>> {
    let count = nvml.device_count()?;
    let indices = wanted.unwrap_or_else(|| (0..count).collect());
    if indices.is_empty() {
        bail!("no GPUs selected to sample");
    }
    let mut out = Vec::new();
    for index in indices {
        if index >= count {
            bail!(
                "GPU {index} does not exist (this machine has {count}: 0..{})",
                count.saturating_sub(1)
            );
        }
        let dev = nvml.device_by_index(index)?;
        let gpm_prev = if dev.gpm_support().unwrap_or(false) {
            match dev.gpm_sample() {
                Ok(s) => Some(s),
                Err(e) => {
                    note(shared, format!("GPU {index}: GPM sample failed ({e}); using NVML utilization rates instead"));
                    None
                }
            }
        } else {
            note(shared, format!(
                "GPU {index}: GPM counters not supported; SM active and DRAM are NVML utilization rates (time any kernel ran / memory busy), SM occupancy and tensor active are unavailable"
            ));
            None
        };
        out.push(GpuState {
            index,
            dev,
            gpm_prev,
            last_proc_ts: None,
        });
    }
    Ok(out)
}

fn sample_one(nvml: &Nvml, st: &mut GpuState<'_>, t: f64, shared: &Mutex<Shared>) -> Sample {
    let dev = &st.dev;
    let mut s = Sample {
        t,
        gpu: st.index,
        sm_active: None,
        sm_occupancy: None,
        tensor_active: None,
        dram_bw: None,
        power_w: dev.power_usage().ok().map(|mw| mw as f64 / 1000.0),
        temp_c: dev.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
        sm_clock_mhz: dev.clock_info(Clock::SM).ok(),
        mem_clock_mhz: dev.clock_info(Clock::Memory).ok(),
        mem_used_bytes: dev.memory_info().ok().map(|m| m.used),
        processes: Vec::new(),
        source: CounterSource::Gpm,
    };
    let mut gpm_ok = false;
    if let Some(prev) = st.gpm_prev.take() {
        match dev.gpm_sample() {
            Ok(cur) => {
                match gpm_metrics_get(nvml, &prev, &cur, &GPM_METRICS) {
                    Ok(values) => {
                        let v: Vec<Option<f64>> = values
                            .into_iter()
                            .map(|r| r.ok().map(|m| m.value))
                            .collect();
                        s.sm_active = v[0];
                        s.sm_occupancy = v[1];
                        s.tensor_active = v[2];
                        s.dram_bw = v[3];
                        gpm_ok = true;
                    }
                    Err(e) => note(
                        shared,
                        format!("GPU {}: GPM metrics failed ({e})", st.index),
                    ),
                }
                st.gpm_prev = Some(cur);
            }
            Err(e) => {
                note(
                    shared,
                    format!(
                        "GPU {}: GPM sample failed ({e}); retrying next interval",
                        st.index
                    ),
                );
                st.gpm_prev = Some(prev);
            }
        }
    }
    if !gpm_ok {
        s.source = CounterSource::Utilization;
        if let Ok(u) = dev.utilization_rates() {
            s.sm_active = Some(u.gpu as f64);
            s.dram_bw = Some(u.memory as f64);
        }
    }
    s.processes = processes(nvml, st);
    s
}

fn processes(nvml: &Nvml, st: &mut GpuState<'_>) -> Vec<ProcSample> {
    let Ok(procs) = st.dev.running_compute_processes() else {
        return Vec::new();
    };
    if procs.is_empty() {
        return Vec::new();
    }
    let mut sm: HashMap<u32, f64> = HashMap::new();
    if let Ok(util) = st.dev.process_utilization_stats(st.last_proc_ts) {
        for u in util {
            st.last_proc_ts = Some(st.last_proc_ts.unwrap_or(0).max(u.timestamp));
            sm.insert(u.pid, u.sm_util as f64);
        }
    }
    procs
        .into_iter()
        .map(|p| ProcSample {
            pid: p.pid,
            name: process_name(nvml, p.pid),
            mem_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => b,
                UsedGpuMemory::Unavailable => 0,
            },
            sm_util: sm.get(&p.pid).copied(),
        })
        .collect()
}

/// The command name from /proc (cheap), else NVML's view (processes of other
/// containers), else "?".
fn process_name(nvml: &Nvml, pid: u32) -> String {
    if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        return comm.trim().to_string();
    }
    nvml.sys_process_name(pid, 64)
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_the_sampler_says_so() {
        // On CI (no driver) this is the NO_GPU error; on a GPU machine it must start.
        match Sampler::start(Duration::from_millis(100), None) {
            Err(e) => assert!(e.to_string().starts_with(crate::NO_GPU), "{e:#}"),
            Ok(s) => {
                std::thread::sleep(Duration::from_millis(350));
                let t = s.stop();
                assert!(!t.samples.is_empty());
            }
        }
    }

    #[test]
    fn absurd_intervals_are_refused() {
        let err = Sampler::start(Duration::from_millis(1), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let a = thread_cpu_seconds();
        let mut x = 0u64;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_seconds() - a > 0.01);
    }
}
