//! The rule that moves the best-effort limit: additive increase, multiplicative decrease
//! (AIMD, TCP's congestion rule), on the latency tenants' measured p99 against their SLOs.
//!
//! Pure: an observation in, a decision and the new limit out; the loop that feeds it
//! ([`super::control`]) owns the clock. A *pressure* is a measured p99 over its objective
//! (1.0: exactly at the SLO); each tick sees two, the worst among the latency tenants:
//! - `fresh`: over the requests sent since the limit last changed, which alone show the
//!   current limit's effect. Above [`DECREASE_ABOVE`] (near the SLO, not yet over it) the
//!   limit is multiplied by [`DECREASE_FACTOR`] (rounded down, never below `min`): at
//!   once, even on a few samples (their p99 is about their worst), and at most once per
//!   "round trip", as TCP does; without this the limit would fall to `min` on one spike's
//!   lingering samples.
//! - `window`: over every request in the window. Below [`INCREASE_BELOW`] (headroom), and
//!   with at least one fresh request measured, the limit grows by one (never above `max`);
//!   with no latency traffic at all it grows too — but not while latency requests are in
//!   flight with none finished in the window (requests longer than the window, or a wave
//!   of equal ones between its ends): no sample is not no traffic. Growing only on a whole window with
//!   headroom keeps the limit where it is for a window after a decrease, until the samples
//!   of the violation have aged out (a tail latency needs many samples to be read, and a
//!   limit that grew back at once would only miss again); growing only on a fresh sample
//!   takes one step at a time, each seen by a request before the next.
//! - otherwise the limit holds, which is where the rule settles.

/// Pressure above which the limit decreases: a fraction of the SLO, so that the
/// controller acts before the objective is missed.
pub const DECREASE_ABOVE: f64 = 0.85;
/// Pressure below which the limit increases.
pub const INCREASE_BELOW: f64 = 0.7;
/// What a decrease multiplies the limit by.
pub const DECREASE_FACTOR: f64 = 0.5;
/// What an increase adds to the limit.
pub const INCREASE_STEP: u32 = 1;

/// What the controller sees on a tick: the latency tenants' worst pressures (p99 over
/// objective), `None` where there is no sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Over the requests sent since the limit last changed.
    pub fresh: Option<f64>,
    /// Over every request in the window (`None`: no sample).
    pub window: Option<f64>,
    /// A latency request is in flight: with no sample, the limit holds rather than grows.
    pub busy: bool,
}

/// What a tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Increase,
    Decrease,
    Hold,
}

impl Decision {
    /// `increase`, `decrease`, `hold`.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Increase => "increase",
            Decision::Decrease => "decrease",
            Decision::Hold => "hold",
        }
    }
}

/// The pressures the rule acts at: it decreases above `decrease_above` and increases
/// below `increase_below` ([`DECREASE_ABOVE`] and [`INCREASE_BELOW`] unless the deployment
/// says otherwise: `[gateway.control]`). A band nearer 1.0 lets the latency tenants come
/// closer to their SLO before best-effort work is held back; measured on the H200, an SLO
/// of 1.25x the solo TPOT with the default 0.85 held the embedder at its floor at every
/// load (docs/results/2026-12-02-h200-slo-green-controlled/).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    pub increase_below: f64,
    pub decrease_above: f64,
}

impl Default for Band {
    fn default() -> Self {
        Band {
            increase_below: INCREASE_BELOW,
            decrease_above: DECREASE_ABOVE,
        }
    }
}

/// The limit on best-effort requests in flight and its bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    min: u32,
    max: u32,
    limit: u32,
    band: Band,
}

impl Aimd {
    /// A controller between `min` and `max` (swapped if given the wrong way round),
    /// starting at `max`: with no latency traffic yet there is nothing to protect.
    pub fn new(min: u32, max: u32) -> Aimd {
        let (min, max) = (min.min(max), min.max(max));
        Aimd {
            min,
            max,
            limit: max,
            band: Band::default(),
        }
    }

    /// The same controller acting at `band`'s pressures.
    pub fn with_band(mut self, band: Band) -> Aimd {
        self.band = band;
        self
    }

    /// True for a pressure near or over the SLO (NaN, never produced, counts as one: the
    /// rule must not loosen on a broken measurement).
    fn high(&self, p: f64) -> bool {
        p.is_nan() || p > self.band.decrease_above
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// `(min, max)`.
    pub fn bounds(&self) -> (u32, u32) {
        (self.min, self.max)
    }

    /// One tick: the decision and the limit after it.
    pub fn step(&mut self, obs: Observation) -> Decision {
        let decision = match (obs.fresh, obs.window) {
            (Some(p), _) if self.high(p) => Decision::Decrease,
            (_, None) if !obs.busy => Decision::Increase,
            (_, None) => Decision::Hold,
            (Some(_), Some(w)) if w < self.band.increase_below => Decision::Increase,
            _ => Decision::Hold,
        };
        self.limit = match decision {
            Decision::Increase => self.limit.saturating_add(INCREASE_STEP).min(self.max),
            Decision::Decrease => {
                ((f64::from(self.limit) * DECREASE_FACTOR).floor() as u32).max(self.min)
            }
            Decision::Hold => self.limit,
        };
        decision
    }
}

/// The worst of several pressures (`None` when none; NaN wins).
pub fn worst(pressures: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    pressures
        .into_iter()
        .flatten()
        .fold(None, |acc: Option<f64>, p| {
            Some(acc.map_or(p, |a| if p > a || p.is_nan() { p } else { a }))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl Observation {
        /// No latency request in the window.
        const IDLE: Observation = Observation {
            fresh: None,
            window: None,
            busy: false,
        };

        /// The same pressure fresh and over the window.
        fn steady(p: f64) -> Observation {
            Observation {
                fresh: Some(p),
                window: Some(p),
                busy: true,
            }
        }
    }

    fn pressure() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            (0.0f64..5.0).prop_map(Some),
            Just(Some(f64::NAN)),
            Just(Some(f64::INFINITY)),
        ]
    }

    fn observation() -> impl Strategy<Value = Observation> {
        (pressure(), pressure(), any::<bool>()).prop_map(|(fresh, window, busy)| Observation {
            fresh,
            window,
            busy,
        })
    }

    #[test]
    fn a_band_nearer_the_slo_lets_the_limit_grow_where_the_default_holds_it() {
        // 1.15x solo against an SLO of 1.25x: pressure 0.92
        let steady = Observation::steady(0.92);
        let mut default = Aimd::new(1, 8);
        let mut near = Aimd::new(1, 8).with_band(Band {
            increase_below: 0.95,
            decrease_above: 1.0,
        });
        for _ in 0..4 {
            default.step(steady);
            near.step(steady);
        }
        assert_eq!(
            default.limit(),
            1,
            "0.92 is above 0.85: halved to the floor"
        );
        assert_eq!(
            near.limit(),
            8,
            "0.92 is below 0.95: it grew and stays at max"
        );
        assert_eq!(near.step(Observation::steady(1.1)), Decision::Decrease);
        assert_eq!(near.limit(), 4);
        assert_eq!(near.step(Observation::steady(0.97)), Decision::Hold);
    }

    #[test]
    fn the_rule_on_examples() {
        let mut c = Aimd::new(1, 16);
        assert_eq!(c.limit(), 16);
        assert_eq!(c.step(Observation::steady(2.0)), Decision::Decrease);
        assert_eq!(c.limit(), 8);
        // nothing sent since, the window still shows the violation: hold
        let after = Observation {
            fresh: None,
            window: Some(2.0),
            busy: true,
        };
        assert_eq!(c.step(after), Decision::Hold);
        // fresh requests are fine, but the window has not forgotten: hold
        let better = Observation {
            fresh: Some(0.3),
            window: Some(2.0),
            busy: true,
        };
        assert_eq!(c.step(better), Decision::Hold);
        assert_eq!(c.limit(), 8);
        assert_eq!(c.step(Observation::steady(0.8)), Decision::Hold);
        assert_eq!(c.step(Observation::steady(0.1)), Decision::Increase);
        assert_eq!(c.limit(), 9);
        for _ in 0..10 {
            c.step(Observation::steady(1.0));
        }
        assert_eq!(c.limit(), 1, "never below min");
        let mut z = Aimd::new(0, 4);
        for _ in 0..3 {
            z.step(Observation::steady(9.0));
        }
        assert_eq!(z.limit(), 0, "min 0 pauses best-effort work");
        z.step(Observation::IDLE);
        assert_eq!(z.limit(), 1, "and the first increase lets one through");
        // latency requests in flight and none finished in the window: not idle, hold
        let waiting = Observation {
            fresh: None,
            window: None,
            busy: true,
        };
        assert_eq!(z.step(waiting), Decision::Hold);
        assert_eq!(z.limit(), 1);
        assert_eq!(Aimd::new(9, 3).bounds(), (3, 9));
    }

    #[test]
    fn the_worst_pressure() {
        assert_eq!(worst([]), None);
        assert_eq!(worst([None, None]), None);
        assert_eq!(worst([Some(0.2), None, Some(0.5)]), Some(0.5));
        assert!(worst([Some(0.1), Some(f64::NAN), Some(0.2)])
            .unwrap()
            .is_nan());
    }

    proptest! {
        /// Whatever it sees, the limit stays within [min, max].
        #[test]
        fn the_limit_stays_within_its_bounds(
            min in 0u32..50,
            span in 0u32..200,
            obs in proptest::collection::vec(observation(), 0..300),
        ) {
            let max = min + span;
            let mut c = Aimd::new(min, max);
            for o in obs {
                c.step(o);
                prop_assert!(c.limit() >= min && c.limit() <= max, "{} not in [{min}, {max}]", c.limit());
            }
        }

        /// Fresh requests near or over the SLO: the limit falls (to at most half) unless
        /// already at min, whatever the window shows. A window with headroom and a fresh
        /// request measured within it (or no latency traffic at all: no sample and none in
        /// flight): it grows by one unless at max. Otherwise it holds.
        #[test]
        fn it_decreases_under_pressure_and_increases_with_headroom(
            min in 0u32..20,
            span in 0u32..100,
            warm in proptest::collection::vec(observation(), 0..50),
            obs in observation(),
        ) {
            let max = min + span;
            let mut c = Aimd::new(min, max);
            for o in warm {
                c.step(o);
            }
            let before = c.limit();
            let d = c.step(obs);
            let fresh_high = obs.fresh.is_some_and(|p| p.is_nan() || p > DECREASE_ABOVE);
            let headroom = (obs.window.is_none() && !obs.busy)
                || (obs.fresh.is_some() && obs.window.is_some_and(|p| p < INCREASE_BELOW));
            if fresh_high {
                prop_assert_eq!(d, Decision::Decrease);
                prop_assert!(c.limit() == min || c.limit() <= before / 2, "{before} -> {}", c.limit());
                if before > min { prop_assert!(c.limit() < before); }
            } else if headroom {
                prop_assert_eq!(d, Decision::Increase);
                prop_assert_eq!(c.limit(), (before + 1).min(max));
            } else {
                prop_assert_eq!(d, Decision::Hold);
                prop_assert_eq!(c.limit(), before);
            }
        }

        /// Against a plant whose latency grows with the best-effort work in flight (a line
        /// from `base` with no best-effort work, first above DECREASE_ABOVE at some limit
        /// L*) and a window that remembers the last `memory` ticks, the limit converges:
        /// after a settling time it stays within [max(min, L*/2), L*] (or at max when L*
        /// lies beyond it), and the latency never sits where the SLO is missed outright.
        #[test]
        fn it_converges_against_a_monotone_plant(
            min in 0u32..4,
            max in 4u32..256,
            base in 0.0f64..0.6,
            k in 0.001f64..0.15,
            memory in 1usize..30,
        ) {
            let plant = |l: u32| base + k * f64::from(l);
            let l_star = (0..).find(|&l| plant(l) > DECREASE_ABOVE).unwrap();
            let mut c = Aimd::new(min, max);
            let settle = (2 * max as usize + 64) * (memory + 1);
            let mut recent: std::collections::VecDeque<f64> = Default::default();
            let mut seen = Vec::new();
            for t in 0..settle + 400 {
                let p = plant(c.limit());
                recent.push_back(p);
                if recent.len() > memory {
                    recent.pop_front();
                }
                let obs = Observation { fresh: Some(p), window: worst(recent.iter().map(|p| Some(*p))), busy: true };
                c.step(obs);
                if t >= settle {
                    seen.push(c.limit());
                }
            }
            let hi = *seen.iter().max().unwrap();
            let lo = *seen.iter().min().unwrap();
            let top = l_star.min(max).max(min);
            prop_assert!(hi <= top, "above the crossing point: {hi} > {top} (L* = {l_star})");
            let bottom = (l_star / 2).max(min).min(top);
            prop_assert!(lo >= bottom, "{lo} below {bottom} (L* = {l_star})");
            if l_star > min {
                for l in seen {
                    prop_assert!(plant(l) <= 1.0, "missed the SLO at limit {l}");
                }
            }
        }
    }
}
