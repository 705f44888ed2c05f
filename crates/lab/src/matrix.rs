//! The plan: every condition to measure, in the order that reuses deployments.
//!
//! Co-located conditions come from the cross product of the axes (or the explicit list);
//! solo baselines are implied for every engine at every load level it sees co-located, so
//! that each co-located throughput has a solo figure at the same offered load. Solo runs
//! go first because `"50% of solo"` rates need the solo capacity (the engine alone at its
//! workloads' base load) before they can be resolved.

use std::collections::BTreeMap;
use std::time::Duration;

use deploy::Sharing;
use serde::{Deserialize, Serialize};

use crate::spec::{Experiment, Kind, LoadOverride, Rate, WorkloadDef};

/// How a condition's engines share the GPU: one engine alone (a solo baseline, deployed
/// time-sliced), or all of them in one of deploy's sharing modes. In results.json and
/// labels: `solo`, `timeslice`, `mps`, `mig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ConditionSharing {
    /// One engine alone: its baseline.
    Solo,
    /// Every engine together, shared this way.
    Shared(Sharing),
}

impl ConditionSharing {
    /// Whether this is a solo baseline.
    pub fn is_solo(self) -> bool {
        self == ConditionSharing::Solo
    }

    /// The sharing mode of the deployment (a solo engine runs time-sliced, alone).
    pub fn deployed(self) -> Sharing {
        match self {
            ConditionSharing::Solo => Sharing::Timeslice,
            ConditionSharing::Shared(m) => m,
        }
    }
}

impl std::fmt::Display for ConditionSharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConditionSharing::Solo => f.write_str("solo"),
            ConditionSharing::Shared(m) => f.write_str(m.name()),
        }
    }
}

impl From<ConditionSharing> for String {
    fn from(s: ConditionSharing) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for ConditionSharing {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "solo" => Ok(ConditionSharing::Solo),
            other => other
                .parse()
                .map(ConditionSharing::Shared)
                .map_err(|why| format!("{why}, or solo")),
        }
    }
}

/// The offered load of one workload in one condition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadLevel {
    /// Closed loop: requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Open loop: request rate (possibly relative to solo, resolved at run time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Embed: inputs per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
}

impl LoadLevel {
    /// The base load of a workload as written in `[[workloads]]`.
    pub fn base(w: &WorkloadDef) -> Self {
        LoadLevel {
            concurrency: if w.rate.is_some() {
                None
            } else {
                w.concurrency
            },
            rate: w.rate,
            batch: w
                .batch
                .or(if w.kind == Kind::Embed { Some(1) } else { None }),
        }
    }

    /// The base load with an override applied.
    pub fn with(self, o: &LoadOverride) -> Self {
        let mut l = self;
        if let Some(c) = o.concurrency {
            l.concurrency = Some(c);
            l.rate = None;
        }
        if let Some(r) = o.rate {
            l.rate = Some(r);
            l.concurrency = None;
        }
        if let Some(b) = o.batch {
            l.batch = Some(b);
        }
        l
    }

    /// Short text for labels: `c=4`, `rate=50%solo`, `b=8`.
    pub fn short(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.concurrency {
            parts.push(format!("c={c}"));
        }
        match self.rate {
            Some(Rate::PerSecond(r)) => parts.push(format!("rate={r}/s")),
            Some(Rate::OfSolo(p)) => parts.push(format!("rate={p}%solo")),
            None => {}
        }
        if let Some(b) = self.batch {
            parts.push(format!("b={b}"));
        }
        parts.join(" ")
    }
}

/// One measured cell of the matrix (one repetition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Human-readable and unique across the plan, without the repetition.
    pub label: String,
    /// Repetition index, from 1.
    pub repetition: u32,
    /// Solo, or the sharing mode of the engines together.
    pub sharing: ConditionSharing,
    /// Engines deployed (one for solo, all for co-located).
    pub engines: Vec<String>,
    /// MPS active-thread percentage per engine (same order as `engines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps_split: Option<Vec<u32>>,
    /// GPU memory fraction per engine (same order as `engines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_split: Option<Vec<f64>>,
    /// Load per active workload.
    pub loads: BTreeMap<String, LoadLevel>,
}

impl Condition {
    /// Unique id of this repetition: `label #rep`.
    pub fn id(&self) -> String {
        format!("{} #{}", self.label, self.repetition)
    }

    /// Whether this is a solo baseline.
    pub fn is_solo(&self) -> bool {
        self.sharing.is_solo()
    }

    /// Two conditions with the same key run on the same deployment (only the load differs).
    pub fn deployment_key(&self) -> String {
        deployment_label(
            self.sharing,
            &self.engines,
            &self.mps_split,
            &self.memory_split,
        )
    }
}

fn deployment_label(
    sharing: ConditionSharing,
    engines: &[String],
    mps: &Option<Vec<u32>>,
    mem: &Option<Vec<f64>>,
) -> String {
    let mut s = match sharing {
        ConditionSharing::Solo => format!("solo {}", engines.join("+")),
        ConditionSharing::Shared(m) => m.to_string(),
    };
    if let Some(m) = mps {
        s.push_str(&format!(
            " sm {}",
            m.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ));
    } else if sharing == ConditionSharing::Shared(Sharing::Mps) {
        s.push_str(" default");
    }
    if let Some(m) = mem {
        s.push_str(&format!(
            " mem {}",
            m.iter()
                .map(|p| format!("{p}"))
                .collect::<Vec<_>>()
                .join("/")
        ));
    }
    s
}

fn label(
    sharing: ConditionSharing,
    engines: &[String],
    mps: &Option<Vec<u32>>,
    mem: &Option<Vec<f64>>,
    loads: &BTreeMap<String, LoadLevel>,
) -> String {
    let l = loads
        .iter()
        .map(|(w, l)| format!("{w} {}", l.short()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{}: {l}", deployment_label(sharing, engines, mps, mem))
}

/// A co-located cell before repetitions and labels.
struct Cell {
    sharing: Sharing,
    mps: Option<Vec<u32>>,
    mem: Option<Vec<f64>>,
    loads: BTreeMap<String, LoadLevel>,
}

/// Builds the ordered plan of an experiment, every repetition included.
pub fn plan(exp: &Experiment) -> Vec<Condition> {
    let engines = exp.engines();
    let base: BTreeMap<String, LoadLevel> = exp
        .workloads
        .iter()
        .map(|w| (w.name.clone(), LoadLevel::base(w)))
        .collect();
    let cells = colocated_cells(exp, &base);

    // Solo baselines: per engine, its base load first (the capacity), then every other
    // load level its workloads see co-located.
    let mut out = Vec::new();
    for e in &engines {
        let mine: Vec<&str> = exp
            .workloads
            .iter()
            .filter(|w| &w.engine == e)
            .map(|w| w.name.as_str())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let restrict = |loads: &BTreeMap<String, LoadLevel>| -> BTreeMap<String, LoadLevel> {
            loads
                .iter()
                .filter(|(w, _)| mine.contains(&w.as_str()))
                .map(|(w, l)| (w.clone(), *l))
                .collect()
        };
        let mut levels = vec![restrict(&base)];
        for c in &cells {
            let r = restrict(&c.loads);
            if !levels.contains(&r) {
                levels.push(r);
            }
        }
        let solo_engines = vec![e.clone()];
        for loads in levels {
            push_reps(
                exp,
                &mut out,
                ConditionSharing::Solo,
                &solo_engines,
                None,
                None,
                loads,
            );
        }
    }
    for c in cells {
        let sharing = ConditionSharing::Shared(c.sharing);
        push_reps(exp, &mut out, sharing, &engines, c.mps, c.mem, c.loads);
    }
    out
}

fn push_reps(
    exp: &Experiment,
    out: &mut Vec<Condition>,
    sharing: ConditionSharing,
    engines: &[String],
    mps: Option<Vec<u32>>,
    mem: Option<Vec<f64>>,
    loads: BTreeMap<String, LoadLevel>,
) {
    let label = label(sharing, engines, &mps, &mem, &loads);
    for repetition in 1..=exp.repetitions {
        out.push(Condition {
            label: label.clone(),
            repetition,
            sharing,
            engines: engines.to_vec(),
            mps_split: mps.clone(),
            memory_split: mem.clone(),
            loads: loads.clone(),
        });
    }
}

fn colocated_cells(exp: &Experiment, base: &BTreeMap<String, LoadLevel>) -> Vec<Cell> {
    if exp.engines().len() < 2 {
        return Vec::new();
    }
    if let Some(list) = &exp.conditions {
        return list
            .iter()
            .map(|c| Cell {
                sharing: c.sharing,
                mps: c.mps_split.clone(),
                mem: c.memory_split.clone(),
                loads: base
                    .iter()
                    .map(|(w, l)| {
                        let l = c.load.get(w).map(|o| l.with(o)).unwrap_or(*l);
                        (w.clone(), l)
                    })
                    .collect(),
            })
            .collect();
    }
    let axes = exp.axes.clone().unwrap_or_default();
    let sharing = if axes.sharing.is_empty() {
        vec![Sharing::Timeslice]
    } else {
        axes.sharing.clone()
    };
    let mems: Vec<Option<Vec<f64>>> = if axes.memory_split.is_empty() {
        vec![None]
    } else {
        axes.memory_split.iter().cloned().map(Some).collect()
    };
    // Load levels per workload, crossed over workloads.
    let mut load_sets: Vec<BTreeMap<String, LoadLevel>> = vec![BTreeMap::new()];
    for (w, b) in base {
        let levels = match axes.load.get(w) {
            None => vec![*b],
            Some(axis) => {
                let mut loops: Vec<LoadOverride> = axis
                    .concurrency
                    .iter()
                    .map(|&c| LoadOverride {
                        concurrency: Some(c),
                        ..Default::default()
                    })
                    .chain(axis.rate.iter().map(|&r| LoadOverride {
                        rate: Some(r),
                        ..Default::default()
                    }))
                    .collect();
                if loops.is_empty() {
                    loops.push(LoadOverride::default());
                }
                let batches: Vec<Option<u32>> = if axis.batch.is_empty() {
                    vec![None]
                } else {
                    axis.batch.iter().copied().map(Some).collect()
                };
                let mut v = Vec::new();
                for lo in &loops {
                    for bt in &batches {
                        let o = LoadOverride { batch: *bt, ..*lo };
                        v.push(b.with(&o));
                    }
                }
                v
            }
        };
        load_sets = load_sets
            .into_iter()
            .flat_map(|set| {
                levels.iter().map(move |l| {
                    let mut s = set.clone();
                    s.insert(w.clone(), *l);
                    s
                })
            })
            .collect();
    }
    let mut cells = Vec::new();
    for &s in &sharing {
        let mps: Vec<Option<Vec<u32>>> = if s == Sharing::Mps {
            let mut v: Vec<Option<Vec<u32>>> = Vec::new();
            if axes.mps_default || axes.mps_split.is_empty() {
                v.push(None);
            }
            v.extend(axes.mps_split.iter().cloned().map(Some));
            v
        } else {
            vec![None]
        };
        for m in &mps {
            for mem in &mems {
                for loads in &load_sets {
                    cells.push(Cell {
                        sharing: s,
                        mps: m.clone(),
                        mem: mem.clone(),
                        loads: loads.clone(),
                    });
                }
            }
        }
    }
    cells
}

/// Estimated wall time of a plan: windows plus one start-up per engine each time the
/// deployment changes.
pub fn estimate(exp: &Experiment, plan: &[Condition]) -> Duration {
    let mut total = Duration::ZERO;
    let mut last: Option<String> = None;
    for c in plan {
        let key = c.deployment_key();
        if last.as_ref() != Some(&key) {
            total += exp.startup_estimate * c.engines.len() as u32;
            last = Some(key);
        }
        total += exp.warmup + exp.duration;
    }
    total
}

/// The dry-run text: one line per condition and the estimated time.
pub fn describe(exp: &Experiment, plan: &[Condition]) -> String {
    let mut s = format!(
        "experiment {:?}: {} conditions ({} distinct x {} repetitions), warm-up {}, window {}\n",
        exp.name,
        plan.len(),
        plan.len() / exp.repetitions.max(1) as usize,
        exp.repetitions,
        humantime::format_duration(exp.warmup),
        humantime::format_duration(exp.duration),
    );
    let mut last = None;
    for (i, c) in plan.iter().enumerate() {
        let key = c.deployment_key();
        let marker = if last.as_ref() != Some(&key) {
            "up "
        } else {
            "   "
        };
        last = Some(key);
        s.push_str(&format!("{:>4}  {marker} {}\n", i + 1, c.id()));
    }
    s.push_str(&format!(
        "estimated time: {} (start-up estimate {} per engine per deployment)\n",
        humantime::format_duration(Duration::from_secs(estimate(exp, plan).as_secs())),
        humantime::format_duration(exp.startup_estimate)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Experiment;

    const BASE: &str = r#"
name = "t"
warmup = "1s"
duration = "2s"
startup_estimate = "5s"
repetitions = 2
[deployment]
[[deployment.engines]]
name = "gen"
[[deployment.engines]]
name = "emb"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 4
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 2
batch = 8
"#;

    #[test]
    fn cross_product_with_implied_solo() {
        let e = Experiment::parse(&format!(
            "{BASE}[axes]\nsharing=[\"timeslice\",\"mps\"]\nmps_split=[[70,30],[50,50]]\n[axes.load.vec]\nconcurrency=[2]\nrate=[\"50% of solo\"]\n"
        ))
        .unwrap();
        let p = plan(&e);
        // co-located: timeslice (1) + mps default + 2 splits (3) = 4 deployments x 2 loads = 8
        // solo: gen at c=4 (1); emb at c=2 b=8 and rate=50% b=8 (2) = 3
        // x 2 repetitions
        assert_eq!(p.len(), (8 + 3) * 2);
        assert!(p[0].is_solo() && p[0].engines == vec!["gen"]);
        // the capacity (base load) of emb comes before its relative-rate solo run
        let emb_solo: Vec<_> = p
            .iter()
            .filter(|c| c.is_solo() && c.engines == vec!["emb"])
            .collect();
        assert_eq!(emb_solo[0].loads["vec"].concurrency, Some(2));
        assert_eq!(emb_solo[2].loads["vec"].rate, Some(Rate::OfSolo(50.0)));
        // ids are unique
        let mut ids: Vec<_> = p.iter().map(|c| c.id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), p.len());
        // all solo first
        let first_coloc = p.iter().position(|c| !c.is_solo()).unwrap();
        assert!(p[first_coloc..].iter().all(|c| !c.is_solo()));
    }

    /// results.json keeps the sharing of a condition as the strings it always had, so
    /// older files (and `--resume`) read the same conditions.
    #[test]
    fn condition_sharing_is_written_as_before() {
        for (s, text) in [
            (ConditionSharing::Solo, "solo"),
            (ConditionSharing::Shared(Sharing::Timeslice), "timeslice"),
            (ConditionSharing::Shared(Sharing::Mps), "mps"),
            (ConditionSharing::Shared(Sharing::Mig), "mig"),
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<ConditionSharing>(&json).unwrap(), s);
            assert_eq!(s.to_string(), text);
        }
        let e = serde_json::from_str::<ConditionSharing>("\"alone\"").unwrap_err();
        assert!(
            e.to_string().contains("unknown sharing mode \"alone\""),
            "{e}"
        );
        let old = r#"{"label":"solo gen: chat c=4","repetition":1,"sharing":"solo","engines":["gen"],"loads":{"chat":{"concurrency":4}}}"#;
        let c: Condition = serde_json::from_str(old).unwrap();
        assert!(c.is_solo());
        assert_eq!(c.sharing.deployed(), Sharing::Timeslice);
        assert_eq!(serde_json::to_string(&c).unwrap(), old);
    }

    #[test]
    fn estimate_counts_startups_once_per_deployment() {
        let e = Experiment::parse(BASE).unwrap();
        let p = plan(&e);
        // solo gen, solo emb, timeslice: 3 deployments, 1+1+2 engines x 5s; 6 windows x 3s
        assert_eq!(p.len(), 6);
        assert_eq!(estimate(&e, &p), Duration::from_secs(20 + 18));
        let d = describe(&e, &p);
        assert!(d.contains("estimated time: 38s"), "{d}");
    }

    #[test]
    fn explicit_conditions() {
        let e = Experiment::parse(&format!(
            "{BASE}[[conditions]]\nsharing=\"mps\"\nmps_split=[70,30]\nmemory_split=[0.5,0.4]\n[conditions.load.chat]\nconcurrency=16\n"
        ))
        .unwrap();
        let p = plan(&e);
        let c = p.iter().find(|c| !c.is_solo()).unwrap();
        assert_eq!(c.mps_split, Some(vec![70, 30]));
        assert_eq!(c.loads["chat"].concurrency, Some(16));
        assert_eq!(c.loads["vec"].batch, Some(8));
        // gen solo at base c=4 and at c=16
        assert_eq!(
            p.iter()
                .filter(|c| c.is_solo() && c.engines == vec!["gen"])
                .count(),
            4
        );
    }
}
