//! Window summaries of samples: per GPU and counter, mean / p50 / max over the samples
//! whose time falls in the window; and the totals of a set of GPUs (a deployment across
//! GPUs, issue 19): per sampler tick, power and memory used summed over the GPUs, the other
//! counters averaged, then summarised over the ticks like one GPU. Pure functions, so the
//! lab's numbers are unit-tested without a GPU.
use serde::{Deserialize, Serialize};

use super::{CounterSource, Sample};

/// Mean, median (linear interpolation, as the bench's percentiles) and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    pub p50: f64,
    pub max: f64,
}

/// One GPU's counters over a window. A counter is `None` when no sample in the window
/// had it (e.g. occupancy and tensor without GPM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuWindow {
    pub gpu: u32,
    pub samples: usize,
    /// Where SM active and DRAM came from; `None` for an empty window.
    pub source: Option<CounterSource>,
    pub sm_active: Option<Stat>,
    pub sm_occupancy: Option<Stat>,
    pub tensor_active: Option<Stat>,
    pub dram_bw: Option<Stat>,
    pub power_w: Option<Stat>,
    pub temp_c: Option<Stat>,
    pub sm_clock_mhz: Option<Stat>,
    pub mem_clock_mhz: Option<Stat>,
    pub mem_used_bytes: Option<Stat>,
}

/// Every GPU's counters over `[from, to]` (unix seconds, inclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    pub from: f64,
    pub to: f64,
    pub gpus: Vec<GpuWindow>,
}

/// Mean, p50 and max of `values`; `None` when empty.
pub fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    Some(Stat {
        mean,
        p50: percentile_sorted(&v, 50.0),
        max: v[v.len() - 1],
    })
}

/// Percentile of sorted values by linear interpolation between closest ranks.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.len() == 1 {
        return sorted[0];
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Summarises the samples of every GPU seen in `samples` over `[from, to]`. GPUs with no
/// sample in the window still appear (with `samples: 0`) so a report can say so.
pub fn summarize(samples: &[Sample], from: f64, to: f64) -> WindowSummary {
    let mut gpus: Vec<u32> = samples.iter().map(|s| s.gpu).collect();
    gpus.sort_unstable();
    gpus.dedup();
    let gpus = gpus
        .into_iter()
        .map(|gpu| {
            let win: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.gpu == gpu && s.t >= from && s.t <= to)
                .collect();
            let col = |f: &dyn Fn(&Sample) -> Option<f64>| {
                stat(&win.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
            };
            GpuWindow {
                gpu,
                samples: win.len(),
                source: win.last().map(|s| s.source),
                sm_active: col(&|s| s.sm_active),
                sm_occupancy: col(&|s| s.sm_occupancy),
                tensor_active: col(&|s| s.tensor_active),
                dram_bw: col(&|s| s.dram_bw),
                power_w: col(&|s| s.power_w),
                temp_c: col(&|s| s.temp_c),
                sm_clock_mhz: col(&|s| s.sm_clock_mhz.map(f64::from)),
                mem_clock_mhz: col(&|s| s.mem_clock_mhz.map(f64::from)),
                mem_used_bytes: col(&|s| s.mem_used_bytes.map(|b| b as f64)),
            }
        })
        .collect();
    WindowSummary { from, to, gpus }
}

/// Counters whose total over several GPUs is their sum (the rest are averaged).
pub const SUMMED: [&str; 2] = ["power_w", "mem_used_bytes"];

/// Several GPUs at one sampler tick (the sampler reads every GPU of a tick at the same
/// `t`): power and memory used summed, the rest averaged over the GPUs. A counter is
/// `None` unless every GPU of the set reported it at this tick, so a sum never silently
/// leaves a GPU out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotalSample {
    pub t: f64,
    pub sm_active: Option<f64>,
    pub sm_occupancy: Option<f64>,
    pub tensor_active: Option<f64>,
    pub dram_bw: Option<f64>,
    pub power_w: Option<f64>,
    pub temp_c: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub mem_clock_mhz: Option<f64>,
    pub mem_used_bytes: Option<f64>,
}

impl TotalSample {
    /// Every counter by the name [`GpuWindow`]'s fields have, where measured.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        [
            ("sm_active", self.sm_active),
            ("sm_occupancy", self.sm_occupancy),
            ("tensor_active", self.tensor_active),
            ("dram_bw", self.dram_bw),
            ("power_w", self.power_w),
            ("temp_c", self.temp_c),
            ("sm_clock_mhz", self.sm_clock_mhz),
            ("mem_clock_mhz", self.mem_clock_mhz),
            ("mem_used_bytes", self.mem_used_bytes),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

impl Sample {
    /// Every counter by the name [`GpuWindow`]'s fields have, where measured.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        [
            ("sm_active", self.sm_active),
            ("sm_occupancy", self.sm_occupancy),
            ("tensor_active", self.tensor_active),
            ("dram_bw", self.dram_bw),
            ("power_w", self.power_w),
            ("temp_c", self.temp_c),
            ("sm_clock_mhz", self.sm_clock_mhz.map(f64::from)),
            ("mem_clock_mhz", self.mem_clock_mhz.map(f64::from)),
            ("mem_used_bytes", self.mem_used_bytes.map(|b| b as f64)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

/// The totals of `gpus` over `[from, to]`: one [`TotalSample`] per tick in the window at
/// which every GPU of the set has a sample, and their mean / p50 / max.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotalsWindow {
    pub from: f64,
    pub to: f64,
    /// The GPUs added up, in index order.
    pub gpus: Vec<u32>,
    /// Ticks in the window with a sample of every GPU of the set.
    pub ticks: usize,
    /// Ticks in the window that missed some GPU of the set (left out).
    pub partial_ticks: usize,
    pub sm_active: Option<Stat>,
    pub sm_occupancy: Option<Stat>,
    pub tensor_active: Option<Stat>,
    pub dram_bw: Option<Stat>,
    pub power_w: Option<Stat>,
    pub temp_c: Option<Stat>,
    pub sm_clock_mhz: Option<Stat>,
    pub mem_clock_mhz: Option<Stat>,
    pub mem_used_bytes: Option<Stat>,
    /// The ticks themselves, in time order.
    pub series: Vec<TotalSample>,
}

/// One tick's total over the samples `at` (one per GPU of the set): sums of [`SUMMED`],
/// means of the rest; a counter some GPU lacks is `None`.
fn total_of(t: f64, at: &[&Sample]) -> TotalSample {
    let all = |f: &dyn Fn(&Sample) -> Option<f64>| -> Option<Vec<f64>> {
        at.iter().map(|s| f(s)).collect::<Option<Vec<f64>>>()
    };
    let mean = |f: &dyn Fn(&Sample) -> Option<f64>| {
        all(f).map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64)
    };
    let sum = |f: &dyn Fn(&Sample) -> Option<f64>| all(f).map(|v| v.iter().sum::<f64>());
    TotalSample {
        t,
        sm_active: mean(&|s| s.sm_active),
        sm_occupancy: mean(&|s| s.sm_occupancy),
        tensor_active: mean(&|s| s.tensor_active),
        dram_bw: mean(&|s| s.dram_bw),
        power_w: sum(&|s| s.power_w),
        temp_c: mean(&|s| s.temp_c),
        sm_clock_mhz: mean(&|s| s.sm_clock_mhz.map(f64::from)),
        mem_clock_mhz: mean(&|s| s.mem_clock_mhz.map(f64::from)),
        mem_used_bytes: sum(&|s| s.mem_used_bytes.map(|b| b as f64)),
    }
}

/// The totals of `gpus` (each once; order does not matter) over `[from, to]`, from the
/// samples of every tick that has one sample of each of them.
pub fn summarize_totals(samples: &[Sample], gpus: &[u32], from: f64, to: f64) -> TotalsWindow {
    let mut set = gpus.to_vec();
    set.sort_unstable();
    set.dedup();
    let mut ticks: Vec<f64> = samples
        .iter()
        .filter(|s| s.t >= from && s.t <= to && set.contains(&s.gpu))
        .map(|s| s.t)
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let mut series = Vec::new();
    let mut partial_ticks = 0;
    for t in ticks {
        let at: Vec<&Sample> = set
            .iter()
            .filter_map(|g| samples.iter().find(|s| s.t == t && s.gpu == *g))
            .collect();
        if at.len() == set.len() && !set.is_empty() {
            series.push(total_of(t, &at));
        } else {
            partial_ticks += 1;
        }
    }
    let col = |f: &dyn Fn(&TotalSample) -> Option<f64>| {
        stat(&series.iter().filter_map(f).collect::<Vec<_>>())
    };
    TotalsWindow {
        from,
        to,
        ticks: series.len(),
        partial_ticks,
        sm_active: col(&|s| s.sm_active),
        sm_occupancy: col(&|s| s.sm_occupancy),
        tensor_active: col(&|s| s.tensor_active),
        dram_bw: col(&|s| s.dram_bw),
        power_w: col(&|s| s.power_w),
        temp_c: col(&|s| s.temp_c),
        sm_clock_mhz: col(&|s| s.sm_clock_mhz),
        mem_clock_mhz: col(&|s| s.mem_clock_mhz),
        mem_used_bytes: col(&|s| s.mem_used_bytes),
        gpus: set,
        series,
    }
}

impl GpuWindow {
    /// Every counter's stat by field name, where measured.
    pub fn stats(&self) -> Vec<(&'static str, Stat)> {
        named_stats([
            self.sm_active,
            self.sm_occupancy,
            self.tensor_active,
            self.dram_bw,
            self.power_w,
            self.temp_c,
            self.sm_clock_mhz,
            self.mem_clock_mhz,
            self.mem_used_bytes,
        ])
    }
}

impl TotalsWindow {
    /// Every counter's stat by field name, where measured.
    pub fn stats(&self) -> Vec<(&'static str, Stat)> {
        named_stats([
            self.sm_active,
            self.sm_occupancy,
            self.tensor_active,
            self.dram_bw,
            self.power_w,
            self.temp_c,
            self.sm_clock_mhz,
            self.mem_clock_mhz,
            self.mem_used_bytes,
        ])
    }
}

/// The counter names, in the order of [`GpuWindow`]'s fields.
pub const COUNTER_NAMES: [&str; 9] = [
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_bw",
    "power_w",
    "temp_c",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "mem_used_bytes",
];

fn named_stats(v: [Option<Stat>; 9]) -> Vec<(&'static str, Stat)> {
    COUNTER_NAMES
        .into_iter()
        .zip(v)
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, gpu: u32, sm: Option<f64>) -> Sample {
        Sample {
            t,
            gpu,
            sm_active: sm,
            sm_occupancy: sm.map(|v| v / 2.0),
            tensor_active: None,
            dram_bw: Some(10.0),
            power_w: Some(100.0 + t),
            temp_c: Some(40.0),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            mem_used_bytes: Some(1 << 30),
            processes: Vec::new(),
            source: CounterSource::Gpm,
        }
    }

    #[test]
    fn stats_interpolate_the_median() {
        let s = stat(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Stat {
                mean: 2.5,
                p50: 2.5,
                max: 4.0
            }
        );
        assert_eq!(
            stat(&[7.0]).unwrap(),
            Stat {
                mean: 7.0,
                p50: 7.0,
                max: 7.0
            }
        );
        assert!(stat(&[]).is_none());
        assert_eq!(percentile_sorted(&[0.0, 10.0], 90.0), 9.0);
    }

    #[test]
    fn the_window_selects_samples_by_time_and_gpu() {
        let mut samples = Vec::new();
        for i in 0..10 {
            samples.push(sample(i as f64, 0, Some(i as f64 * 10.0)));
            samples.push(sample(i as f64, 1, None));
        }
        let w = summarize(&samples, 2.0, 5.0);
        assert_eq!(w.gpus.len(), 2);
        let g0 = &w.gpus[0];
        assert_eq!((g0.gpu, g0.samples), (0, 4));
        assert_eq!(
            g0.sm_active.unwrap(),
            Stat {
                mean: 35.0,
                p50: 35.0,
                max: 50.0
            }
        );
        assert_eq!(g0.sm_occupancy.unwrap().max, 25.0);
        assert_eq!(g0.power_w.unwrap().mean, 103.5);
        assert!(g0.tensor_active.is_none());
        let g1 = &w.gpus[1];
        assert_eq!(g1.samples, 4);
        assert!(
            g1.sm_active.is_none(),
            "a counter nobody measured is absent, not zero"
        );
        assert_eq!(g1.dram_bw.unwrap().mean, 10.0);
    }

    /// Two GPUs of one deployment: per tick, power and memory add up and utilisation is
    /// the mean; a tick that misses a GPU is left out of the totals rather than summed short.
    #[test]
    fn totals_sum_power_and_memory_and_average_utilisation() {
        let mut samples = Vec::new();
        for i in 0..4 {
            let t = 10.0 + i as f64;
            let mut a = sample(t, 0, Some(80.0));
            a.power_w = Some(400.0 + i as f64);
            a.mem_used_bytes = Some(70 << 30);
            let mut b = sample(t, 1, Some(20.0));
            b.power_w = Some(200.0);
            b.mem_used_bytes = Some(30 << 30);
            b.sm_clock_mhz = Some(1780);
            samples.push(a);
            samples.push(b);
        }
        // GPU 2 is not part of the deployment; GPU 1 misses the last tick
        samples.push(sample(11.0, 2, Some(100.0)));
        samples.push(sample(14.0, 0, Some(90.0)));
        let w = summarize_totals(&samples, &[1, 0, 1], 10.0, 14.0);
        assert_eq!(w.gpus, vec![0, 1]);
        assert_eq!((w.ticks, w.partial_ticks), (4, 1));
        let p = w.power_w.unwrap();
        assert_eq!((p.mean, p.max), (601.5, 603.0));
        assert_eq!(w.mem_used_bytes.unwrap().mean, (100u64 << 30) as f64);
        assert_eq!(w.sm_active.unwrap().mean, 50.0);
        assert_eq!(w.sm_occupancy.unwrap().mean, 25.0);
        assert_eq!(w.sm_clock_mhz.unwrap().mean, 1880.0);
        assert!(w.tensor_active.is_none(), "no GPU measured it");
        assert_eq!(w.series[0].t, 10.0);
        assert_eq!(w.series[0].power_w, Some(600.0));
        // one GPU's totals are that GPU's own figures
        let one = summarize_totals(&samples, &[0], 10.0, 13.0);
        let alone = summarize(&samples, 10.0, 13.0);
        assert_eq!(one.power_w, alone.gpus[0].power_w);
        assert_eq!(one.sm_active, alone.gpus[0].sm_active);
        // a counter one GPU lacks at a tick is absent from that tick, not summed short
        let mut gap = samples.clone();
        gap[1].power_w = None;
        let w = summarize_totals(&gap, &[0, 1], 10.0, 13.0);
        assert_eq!(w.series[0].power_w, None);
        assert_eq!(w.power_w.unwrap().max, 603.0);
        assert_eq!(w.ticks, 4);
        // stats by name, in field order
        let names: Vec<&str> = w.stats().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "sm_active",
                "sm_occupancy",
                "dram_bw",
                "power_w",
                "temp_c",
                "sm_clock_mhz",
                "mem_clock_mhz",
                "mem_used_bytes"
            ]
        );
        assert_eq!(alone.gpus[1].stats().len(), 8);
        assert!(summarize_totals(&samples, &[], 0.0, 99.0).series.is_empty());
    }

    #[test]
    fn an_empty_window_keeps_the_gpu_with_no_stats() {
        let w = summarize(&[sample(1.0, 0, Some(5.0))], 10.0, 20.0);
        assert_eq!(w.gpus[0].samples, 0);
        assert!(w.gpus[0].source.is_none());
        assert!(w.gpus[0].sm_active.is_none());
    }
}
