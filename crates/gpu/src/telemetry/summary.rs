//! Window summaries of samples: per GPU and counter, mean / p50 / max over the samples
//! whose time falls in the window. Pure functions, so the lab's numbers are unit-tested
//! without a GPU.
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

    #[test]
    fn an_empty_window_keeps_the_gpu_with_no_stats() {
        let w = summarize(&[sample(1.0, 0, Some(5.0))], 10.0, 20.0);
        assert_eq!(w.gpus[0].samples, 0);
        assert!(w.gpus[0].source.is_none());
        assert!(w.gpus[0].sm_active.is_none());
    }
}
