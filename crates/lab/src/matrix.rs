//! The plan: every condition to measure, in the order that reuses deployments.
//!
//! Co-located conditions come from the cross product of the axes (or the explicit list);
//! solo baselines are implied for every engine at every load level it sees co-located, so
//! that each co-located throughput has a solo figure at the same offered load. Solo runs
//! go first because `"50% of solo"` rates need the solo capacity (the engine alone at its
//! workloads' base load) before they can be resolved.
//!
//! A scaling experiment (`copies`) runs some engines in several copies: a condition then
//! holds a subset of the engines, each with its count (`4 small + 1 large`); copy `i` of an
//! engine is deploy's replica `NAME-i`, each its own tenant (`tenants`). The solo baseline of
//! an engine is one copy alone, and stands for every copy.

use std::collections::BTreeMap;
use std::time::Duration;

use deploy::Sharing;
use serde::{Deserialize, Serialize};

use crate::layout::Placement;
use crate::spec::{Experiment, Kind, LoadOverride, Rate, StepDef, WorkloadDef};

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
    /// A load step in the window: the load from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepDef>,
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
            step: None,
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
        if let Some(st) = o.step {
            l.step = Some(st);
        }
        l
    }

    /// Short text for labels: `c=4`, `rate=50%solo`, `b=8`, a step `step@50%:c=64`.
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
        if let Some(st) = &self.step {
            parts.push(format!("step{}", st.short()));
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
    /// Load per active workload (each copy of a workload runs this load).
    pub loads: BTreeMap<String, LoadLevel>,
    /// Copies of each engine of `engines` (a scaling experiment); empty when the
    /// experiment asks for none, and then every engine runs once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub copies: BTreeMap<String, u32>,
    /// Under the gateway's SLO controller: the template's priorities and SLOs, every
    /// workload through the gateway (labels say `controlled`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
    /// Where each engine of `engines` runs (its GPUs and TP size) when the experiment's
    /// conditions name layouts (`layout`); empty otherwise, and in results written before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, Placement>,
    /// The study's baseline (`baseline = true`): the hypotheses are judged against it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub baseline: bool,
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
        let key = deployment_label(
            self.sharing,
            &self.engines,
            &self.copies,
            &self.mps_split,
            &self.memory_split,
        );
        let key = if self.control {
            format!("{key} {CONTROLLED}")
        } else {
            key
        };
        key + &crate::layout::label_text(&self.engines, &self.placements, self.is_solo())
    }

    /// Copies of `engine` in this condition: 0 when it does not run, else its count (1
    /// without a scaling experiment).
    pub fn copies_of(&self, engine: &str) -> u32 {
        if !self.engines.iter().any(|e| e == engine) {
            return 0;
        }
        self.copies.get(engine).copied().unwrap_or(1)
    }

    /// Engine copies in all.
    pub fn instances(&self) -> u32 {
        self.engines.iter().map(|e| self.copies_of(e)).sum()
    }
}

/// What a controlled condition's label says after its sharing mode and splits.
pub const CONTROLLED: &str = "controlled";

/// `4 small + 1 large`: the engine set of a scaling step.
pub fn copies_text(engines: &[String], copies: &BTreeMap<String, u32>) -> String {
    engines
        .iter()
        .map(|e| format!("{} {e}", copies.get(e).copied().unwrap_or(1)))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn deployment_label(
    sharing: ConditionSharing,
    engines: &[String],
    copies: &BTreeMap<String, u32>,
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
    if !copies.is_empty() {
        s.push_str(&format!(" [{}]", copies_text(engines, copies)));
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn label(
    sharing: ConditionSharing,
    engines: &[String],
    copies: &BTreeMap<String, u32>,
    mps: &Option<Vec<u32>>,
    mem: &Option<Vec<f64>>,
    loads: &BTreeMap<String, LoadLevel>,
    control: bool,
) -> String {
    let l = loads
        .iter()
        .map(|(w, l)| format!("{w} {}", l.short()))
        .collect::<Vec<_>>()
        .join(", ");
    let controlled = if control {
        format!(" {CONTROLLED}")
    } else {
        String::new()
    };
    format!(
        "{}{controlled}: {l}",
        deployment_label(sharing, engines, copies, mps, mem)
    )
}

/// A co-located cell before repetitions and labels.
#[derive(PartialEq)]
struct Cell {
    sharing: Sharing,
    /// The engines it runs, in template order.
    engines: Vec<String>,
    /// Their copies (empty without a scaling experiment).
    copies: BTreeMap<String, u32>,
    mps: Option<Vec<u32>>,
    mem: Option<Vec<f64>>,
    loads: BTreeMap<String, LoadLevel>,
    control: bool,
    /// Where each engine runs (empty without layouts), and whether it is the baseline.
    place: Placing,
}

/// A condition's placements and baseline mark, as one argument.
#[derive(Debug, Clone, Default, PartialEq)]
struct Placing {
    placements: BTreeMap<String, Placement>,
    baseline: bool,
}

impl Cell {
    fn instances(&self) -> u32 {
        self.engines
            .iter()
            .map(|e| self.copies.get(e).copied().unwrap_or(1))
            .sum()
    }
}

/// Whether the experiment asks for copies anywhere.
fn uses_copies(exp: &Experiment) -> bool {
    exp.axes.as_ref().is_some_and(|a| !a.copies.is_empty())
        || exp
            .conditions
            .iter()
            .flatten()
            .any(|c| !c.copies.is_empty())
}

/// The engines a set of copy counts runs (template order, those with a count of at least
/// one; an engine not named runs once) and each one's count; without copies, every engine
/// and an empty map.
fn engine_set(
    exp: &Experiment,
    copies: &BTreeMap<String, u32>,
    with_copies: bool,
) -> (Vec<String>, BTreeMap<String, u32>) {
    let engines: Vec<String> = exp
        .engines()
        .into_iter()
        .filter(|e| copies.get(e).copied().unwrap_or(1) > 0)
        .collect();
    let counts = if with_copies {
        engines
            .iter()
            .map(|e| (e.clone(), copies.get(e).copied().unwrap_or(1)))
            .collect()
    } else {
        BTreeMap::new()
    };
    (engines, counts)
}

/// Builds the ordered plan of an experiment, every repetition included: the solo baselines,
/// then the co-located conditions, those of one deployment back to back.
pub fn plan(exp: &Experiment) -> Vec<Condition> {
    let engines = exp.engines();
    let base: BTreeMap<String, LoadLevel> = exp
        .workloads
        .iter()
        .map(|w| (w.name.clone(), LoadLevel::base(w)))
        .collect();
    let cells = colocated_cells(exp, &base);

    // Solo baselines: per engine, its base load first (the capacity), then every other
    // load level its workloads see co-located. An engine that no co-located cell runs
    // (a scaling experiment that leaves it out) has none. With layouts, the same in each
    // placement the engine has co-located: *vs solo* compares it with itself on those GPUs.
    let mut out = Vec::new();
    for e in &engines {
        let mine: Vec<&str> = exp
            .workloads
            .iter()
            .filter(|w| &w.engine == e)
            .map(|w| w.name.as_str())
            .collect();
        if mine.is_empty() || (!cells.is_empty() && !cells.iter().any(|c| c.engines.contains(e))) {
            continue;
        }
        let restrict = |loads: &BTreeMap<String, LoadLevel>| -> BTreeMap<String, LoadLevel> {
            loads
                .iter()
                .filter(|(w, _)| mine.contains(&w.as_str()))
                .map(|(w, l)| (w.clone(), *l))
                .collect()
        };
        let mut places: Vec<Option<&Placement>> = Vec::new();
        for c in cells.iter().filter(|c| c.engines.contains(e)) {
            let p = c.place.placements.get(e);
            if !places.contains(&p) {
                places.push(p);
            }
        }
        if places.is_empty() {
            places.push(None);
        }
        let mut levels = Vec::new();
        for p in places {
            levels.push((p, restrict(&base)));
            for c in cells.iter().filter(|c| c.engines.contains(e)) {
                let r = (p, restrict(&c.loads));
                if c.place.placements.get(e) == p && !levels.contains(&r) {
                    levels.push(r);
                }
            }
        }
        let solo_engines = vec![e.clone()];
        for (p, loads) in levels {
            let place = Placing {
                placements: p.map(|p| (e.clone(), p.clone())).into_iter().collect(),
                baseline: false,
            };
            push_reps(
                exp,
                &mut out,
                ConditionSharing::Solo,
                &solo_engines,
                BTreeMap::new(),
                None,
                None,
                loads,
                false,
                place,
            );
        }
    }
    let mut colocated = Vec::new();
    for c in cells {
        let sharing = ConditionSharing::Shared(c.sharing);
        push_reps(
            exp,
            &mut colocated,
            sharing,
            &c.engines,
            c.copies,
            c.mps,
            c.mem,
            c.loads,
            c.control,
            c.place,
        );
    }
    out.extend(grouped_by_deployment(exp, colocated));
    out
}

/// `conds` with those that share a deployment back to back, in the order each deployment
/// first appears: every start-up is paid once (a vLLM pair takes minutes to start), where
/// the listed order would stop and start the same engines again between other cells. A
/// controlled condition's SLO relative to solo is part of its deployment
/// (`control_slo::plan_key`).
fn grouped_by_deployment(exp: &Experiment, conds: Vec<Condition>) -> Vec<Condition> {
    let mut groups: Vec<(String, Vec<Condition>)> = Vec::new();
    for c in conds {
        let key = crate::control_slo::plan_key(exp, &c);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(c),
            None => groups.push((key, vec![c])),
        }
    }
    groups.into_iter().flat_map(|(_, g)| g).collect()
}

#[allow(clippy::too_many_arguments)]
fn push_reps(
    exp: &Experiment,
    out: &mut Vec<Condition>,
    sharing: ConditionSharing,
    engines: &[String],
    copies: BTreeMap<String, u32>,
    mps: Option<Vec<u32>>,
    mem: Option<Vec<f64>>,
    loads: BTreeMap<String, LoadLevel>,
    control: bool,
    place: Placing,
) {
    let label = label(sharing, engines, &copies, &mps, &mem, &loads, control);
    // where the engines run goes after the deployment's words, before the loads
    let at = crate::layout::label_text(engines, &place.placements, sharing.is_solo());
    let label = match label.split_once(": ") {
        Some((deployment, loads)) if !at.is_empty() => format!("{deployment}{at}: {loads}"),
        _ => label,
    };
    for repetition in 1..=exp.repetitions {
        out.push(Condition {
            label: label.clone(),
            repetition,
            sharing,
            engines: engines.to_vec(),
            mps_split: mps.clone(),
            memory_split: mem.clone(),
            loads: loads.clone(),
            copies: copies.clone(),
            control,
            placements: place.placements.clone(),
            baseline: place.baseline,
        });
    }
}

/// The workloads of `engines`, with their load.
fn loads_of(
    exp: &Experiment,
    engines: &[String],
    loads: BTreeMap<String, LoadLevel>,
) -> BTreeMap<String, LoadLevel> {
    loads
        .into_iter()
        .filter(|(w, _)| exp.workload(w).is_some_and(|d| engines.contains(&d.engine)))
        .collect()
}

/// Co-located cells with two or more engine copies in all (fewer is a solo baseline).
fn colocated_cells(exp: &Experiment, base: &BTreeMap<String, LoadLevel>) -> Vec<Cell> {
    let with_copies = uses_copies(exp);
    if exp.engines().len() < 2 && !with_copies {
        return Vec::new();
    }
    let mut cells: Vec<Cell> = Vec::new();
    // load levels of a workload whose engine a step leaves out make the same cell again
    for mut c in all_cells(exp, base, with_copies) {
        if c.instances() < 2 {
            continue;
        }
        // the same cell twice is measured once; a baseline mark on either stays
        let mark = c.place.baseline;
        let mut merged = false;
        for o in cells.iter_mut() {
            c.place.baseline = o.place.baseline;
            if *o == c {
                o.place.baseline |= mark;
                merged = true;
                break;
            }
        }
        if !merged {
            c.place.baseline = mark;
            cells.push(c);
        }
    }
    cells
}

fn all_cells(exp: &Experiment, base: &BTreeMap<String, LoadLevel>, with_copies: bool) -> Vec<Cell> {
    if let Some(list) = &exp.conditions {
        return list
            .iter()
            .map(|c| {
                let (engines, copies) = engine_set(exp, &c.copies, with_copies);
                let loads = base
                    .iter()
                    .map(|(w, l)| {
                        let l = c.load.get(w).map(|o| l.with(o)).unwrap_or(*l);
                        (w.clone(), l)
                    })
                    .collect();
                let placements = crate::layout::resolve(exp, &engines, &c.layout);
                Cell {
                    sharing: c.sharing,
                    loads: loads_of(exp, &engines, loads),
                    engines,
                    copies,
                    mps: c.mps_split.clone(),
                    mem: c.memory_split.clone(),
                    control: c.control,
                    place: Placing {
                        placements,
                        baseline: c.baseline,
                    },
                }
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
    // Copy counts per engine, crossed over engines (an engine not named runs once).
    let mut copy_sets: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new()];
    for (e, counts) in &axes.copies {
        copy_sets = copy_sets
            .into_iter()
            .flat_map(|set| {
                counts.iter().map(move |&n| {
                    let mut s = set.clone();
                    s.insert(e.clone(), n);
                    s
                })
            })
            .collect();
    }
    // the SLO controller off, on, or both (in the order given)
    let mut controls: Vec<bool> = Vec::new();
    for &c in &axes.control {
        if !controls.contains(&c) {
            controls.push(c);
        }
    }
    if controls.is_empty() {
        controls.push(false);
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
                for set in &copy_sets {
                    let (engines, copies) = engine_set(exp, set, with_copies);
                    // MIG slices share no SMs: nothing for the controller to move
                    for &control in controls.iter().filter(|&&c| !(c && s == Sharing::Mig)) {
                        for loads in &load_sets {
                            cells.push(Cell {
                                sharing: s,
                                engines: engines.clone(),
                                copies: copies.clone(),
                                mps: m.clone(),
                                mem: mem.clone(),
                                loads: loads_of(exp, &engines, loads.clone()),
                                control,
                                place: Placing::default(),
                            });
                        }
                    }
                }
            }
        }
    }
    cells
}

/// Estimated wall time of a plan: windows, one start-up per engine copy each time the
/// deployment changes, and the drain allowance ([`drain_allowance`]) after each window
/// with whole responses.
pub fn estimate(exp: &Experiment, plan: &[Condition]) -> Duration {
    let mut total = Duration::ZERO;
    let mut last: Option<String> = None;
    for c in plan {
        let key = crate::control_slo::plan_key(exp, c);
        if last.as_ref() != Some(&key) {
            total += exp.startup_estimate * c.instances();
            last = Some(key);
        }
        total += exp.warmup + exp.duration;
        if !whole_workloads(exp, c).is_empty() {
            total += drain_allowance(exp);
        }
    }
    total
}

/// The wait the estimate allows after a window with whole responses (every embed workload,
/// gen presets not streamed): bench waits for those in flight at the window's end, about
/// one E2EL. Nothing is measured before the run, so the estimate takes `drain_estimate`, or
/// else the warm-up, which should itself last an E2EL.
pub fn drain_allowance(exp: &Experiment) -> Duration {
    exp.drain_estimate.unwrap_or(exp.warmup)
}

/// The workloads of `c` whose responses come whole.
fn whole_workloads<'a>(exp: &'a Experiment, c: &Condition) -> Vec<&'a str> {
    c.loads
        .keys()
        .filter_map(|w| exp.workload(w))
        .filter(|w| w.whole_responses())
        .map(|w| w.name.as_str())
        .collect()
}

/// The dry-run text: one line per condition and the estimated time, and how the SLOs
/// relative to solo are set (`control_slo`).
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
        let key = crate::control_slo::plan_key(exp, c);
        let marker = if last.as_ref() != Some(&key) {
            "up "
        } else {
            "   "
        };
        last = Some(key);
        s.push_str(&format!("{:>4}  {marker} {}\n", i + 1, c.id()));
    }
    let drained = plan
        .iter()
        .filter(|c| !whole_workloads(exp, c).is_empty())
        .count();
    let drain = if drained == 0 {
        String::new()
    } else {
        let mut names: Vec<&str> = plan.iter().flat_map(|c| whole_workloads(exp, c)).collect();
        names.sort_unstable();
        names.dedup();
        format!(
            ", and a drain of {} after each of the {drained} windows with whole responses ({}: about one E2EL, taken as {})",
            humantime::format_duration(drain_allowance(exp)),
            names.join(", "),
            if exp.drain_estimate.is_some() {
                "drain_estimate"
            } else {
                "the warm-up; set drain_estimate to change it"
            }
        )
    };
    s.push_str(&format!(
        "estimated time: {} (start-up estimate {} per engine copy per deployment{drain})\n",
        humantime::format_duration(Duration::from_secs(estimate(exp, plan).as_secs())),
        humantime::format_duration(exp.startup_estimate)
    ));
    for line in crate::control_slo::plan_lines(exp, plan) {
        s.push_str(&line);
        s.push('\n');
    }
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

    /// Listed conditions alternate between two deployments; the plan runs each deployment's
    /// conditions back to back, in the order the deployments first appear, so that each
    /// starts once.
    #[test]
    fn conditions_of_one_deployment_run_back_to_back() {
        let e = Experiment::parse(&format!(
            "{}{}",
            BASE.replace("repetitions = 2", "repetitions = 1"),
            r#"
[[conditions]]
sharing = "timeslice"
load.chat = { concurrency = 8 }
[[conditions]]
sharing = "mps"
load.chat = { concurrency = 8 }
[[conditions]]
sharing = "timeslice"
load.chat = { concurrency = 16 }
[[conditions]]
sharing = "mps"
load.chat = { concurrency = 16 }
"#
        ))
        .unwrap();
        let p = plan(&e);
        let coloc: Vec<(String, Option<u32>)> = p
            .iter()
            .filter(|c| !c.is_solo())
            .map(|c| (c.deployment_key(), c.loads["chat"].concurrency))
            .collect();
        let ts = coloc[0].0.clone();
        let mps = coloc[2].0.clone();
        assert_ne!(ts, mps);
        assert_eq!(
            coloc,
            vec![
                (ts.clone(), Some(8)),
                (ts, Some(16)),
                (mps.clone(), Some(8)),
                (mps, Some(16))
            ]
        );
        // solo gen at 4, 8, 16 (1 start), solo emb (1), timeslice (2 engines), mps (2)
        let starts = Duration::from_secs(5) * (1 + 1 + 2 + 2);
        let windows = Duration::from_secs(3) * p.len() as u32;
        let drains = Duration::from_secs(1) * 5; // the embedder's 5 windows
        assert_eq!(estimate(&e, &p), starts + windows + drains);
    }

    #[test]
    fn estimate_counts_startups_once_per_deployment() {
        let e = Experiment::parse(BASE).unwrap();
        let p = plan(&e);
        // solo gen, solo emb, timeslice: 3 deployments, 1+1+2 engines x 5s; 6 windows x 3s;
        // the embedder's responses come whole: a drain of one warm-up (1s) after each of
        // the 4 windows it runs in
        assert_eq!(p.len(), 6);
        assert_eq!(estimate(&e, &p), Duration::from_secs(20 + 18 + 4));
        let d = describe(&e, &p);
        assert!(d.contains("estimated time: 42s"), "{d}");
        assert!(
            d.contains("a drain of 1s after each of the 4 windows with whole responses (vec: about one E2EL, taken as the warm-up; set drain_estimate to change it)"),
            "{d}"
        );
        let e = Experiment::parse(&BASE.replace(
            "startup_estimate",
            "drain_estimate = \"3s\"\nstartup_estimate",
        ))
        .unwrap();
        assert_eq!(estimate(&e, &p), Duration::from_secs(20 + 18 + 12));
        assert!(describe(&e, &p).contains("taken as drain_estimate)"));
        // streamed gen alone drains nothing
        let gen_only: Vec<Condition> = p.iter().filter(|c| c.engines == ["gen"]).cloned().collect();
        assert_eq!(estimate(&e, &gen_only), Duration::from_secs(5 + 3 * 2));
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

    const SCALING: &str = r#"
name = "s"
warmup = "1s"
duration = "2s"
startup_estimate = "5s"
[deployment]
[[deployment.engines]]
name = "small"
port = 18100
[[deployment.engines]]
name = "large"
task = "embed"
port = 18200
[[workloads]]
name = "chat"
engine = "small"
kind = "generate"
concurrency = 2
[[workloads]]
name = "vec"
engine = "large"
kind = "embed"
concurrency = 2
"#;

    /// `axes.copies` crosses copy counts per engine: steps with fewer than two copies in
    /// all are the solo baselines; an engine left out runs none of its workloads there.
    #[test]
    fn copies_axis_makes_scaling_steps() {
        let e = Experiment::parse(&format!(
            "{SCALING}[axes]\ncopies = {{ small = [1, 2, 3, 4, 10], large = [0, 1] }}\n"
        ))
        .unwrap();
        let p = plan(&e);
        let co: Vec<&Condition> = p.iter().filter(|c| !c.is_solo()).collect();
        // small 2,3,4,10 alone; small 1,2,3,4,10 with one large
        assert_eq!(
            co.len(),
            9,
            "{:#?}",
            co.iter().map(|c| &c.label).collect::<Vec<_>>()
        );
        let alone = co
            .iter()
            .find(|c| c.copies_of("small") == 4 && c.copies_of("large") == 0)
            .unwrap();
        assert_eq!(alone.engines, vec!["small"]);
        assert_eq!(alone.loads.keys().collect::<Vec<_>>(), vec!["chat"]);
        assert_eq!(alone.instances(), 4);
        assert_eq!(alone.label, "timeslice [4 small]: chat c=2");
        let mixed = co
            .iter()
            .find(|c| c.copies_of("small") == 4 && c.copies_of("large") == 1)
            .unwrap();
        assert_eq!(
            mixed.label,
            "timeslice [4 small + 1 large]: chat c=2, vec c=2 b=1"
        );
        assert_eq!(mixed.instances(), 5);
        assert!(co.iter().all(|c| c.instances() >= 2));
        // one solo per engine (one copy), run first
        let solo: Vec<&Condition> = p.iter().filter(|c| c.is_solo()).collect();
        assert_eq!(solo.len(), 2);
        assert!(solo
            .iter()
            .all(|c| c.copies.is_empty() && c.instances() == 1));
        // a step's start-up counts every copy
        let ten = co.iter().find(|c| c.copies_of("small") == 10).unwrap();
        assert_eq!(
            estimate(&e, &[(*ten).clone()]),
            Duration::from_secs(10 * 5 + 3)
        );
        // results.json keeps copies; files without them read as before
        let json = serde_json::to_string(mixed).unwrap();
        assert!(json.contains(r#""copies":{"large":1,"small":4}"#), "{json}");
        assert_eq!(&serde_json::from_str::<Condition>(&json).unwrap(), *mixed);
    }

    #[test]
    fn explicit_conditions_name_their_copies() {
        let e = Experiment::parse(&format!(
            "{SCALING}[[conditions]]\nsharing = \"timeslice\"\ncopies = {{ small = 4, large = 1 }}\n[[conditions]]\nsharing = \"timeslice\"\ncopies = {{ small = 3, large = 0 }}\n"
        ))
        .unwrap();
        let co: Vec<Condition> = plan(&e).into_iter().filter(|c| !c.is_solo()).collect();
        assert_eq!(co.len(), 2);
        assert_eq!(co[0].copies_of("small"), 4);
        assert_eq!(co[1].engines, vec!["small"]);
        assert_eq!(co[1].copies_of("large"), 0);
        // the pair without copies keeps its label
        let pair = Experiment::parse(SCALING).unwrap();
        let co: Vec<Condition> = plan(&pair).into_iter().filter(|c| !c.is_solo()).collect();
        assert_eq!(co[0].label, "timeslice: chat c=2, vec c=2 b=1");
        assert!(co[0].copies.is_empty());
        assert_eq!(co[0].copies_of("small"), 1);
    }

    /// A single engine in copies is a scaling experiment of its own.
    #[test]
    fn one_engine_in_copies() {
        let one = SCALING
            .split("[[deployment.engines]]\nname = \"large\"")
            .next()
            .unwrap()
            .to_string()
            + "[[workloads]]\nname = \"chat\"\nengine = \"small\"\nkind = \"generate\"\nconcurrency = 2\n";
        let e =
            Experiment::parse(&format!("{one}[axes]\ncopies = {{ small = [1, 2, 3] }}\n")).unwrap();
        let p = plan(&e);
        assert_eq!(p.len(), 3, "solo, 2 and 3 copies");
        assert_eq!(p[2].label, "timeslice [3 small]: chat c=2");
    }
}
