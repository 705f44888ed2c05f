//! The engine's compute share, movable at run time (issue 18): a cap on the prompt tokens
//! of the embedding requests inside the engine at once, and its admin route.
//!
//! Why this lever: on a shared GPU the embedder's large batches fill every SM and the
//! generator's small decode kernels queue behind them (the H100 study). The embedding
//! queue batches whatever requests it holds up to `--max-num-batched-tokens`; bounding the
//! tokens let in, and each batch by the same cap (`EmbedQueue`: one request larger than
//! the cap is embedded in batches no larger than it), makes its kernels smaller so that
//! they leave the GPU sooner, without restarting the engine. A controller (the gateway's, or an operator) moves it
//! through `POST /admin/compute-share`.
//!
//! Requests past the cap wait (in the server, before the engine thread sees them) until
//! tokens leave; one larger than the cap runs alone, so nothing waits forever. A client
//! that goes away while waiting takes nothing with it.
//!
//! The second lever is pacing: a duty cycle, the percentage of time the embedder may
//! compute. After each batch the engine thread waits so that its batches fill at most that
//! share of the time, which leaves the GPU to the other engines in between.
//!
//! The third lever is an SM partition (`sm_percent`): an embedder started with
//! `--device cuda --sm-partitions 16,32,64` runs each batch on the smallest of those CUDA
//! green contexts with at least that share of the GPU's SMs ([`crate::sm_share`]), so that
//! the SMs outside it stay free for the engines beside it. An engine without partitions
//! refuses the setting (400) and keeps the others as they were.
//!
//! ```text
//! GET  /admin/compute-share  -> {"max_tokens_in_flight": 2048 | null, "duty_percent": 50 | null,
//!                                "sm_percent": 25 | null, "sms": 64 | null,
//!                                "sm_partitions": [16, 32, 64],
//!                                "tokens_in_flight": 512, "waiting": 3}
//! POST /admin/compute-share  {"max_tokens_in_flight": 2048, "duty_percent": 50, "sm_percent": 25}
//!                            (any of them; null lifts that one)
//! ```

use std::sync::Arc;

use axum::extract::Extension;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openai::ErrorBody;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::body::JsonBody;
use super::ApiError;
use crate::sm_share::SmPartitions;

/// The cap and what is inside it now.
#[derive(Debug, Default)]
struct State {
    cap: Option<usize>,
    duty_percent: Option<u32>,
    sm_percent: Option<u32>,
    /// The engine's SM partitions, once its model is loaded (none: the lever is absent).
    partitions: Option<SmPartitions>,
    /// SMs the embedder's batches may use now, as the engine last applied the share.
    sms: Option<u32>,
    in_flight: usize,
    waiting: usize,
}

/// The cap on embedding tokens in the engine, shared by the embedding route and the admin
/// route (an axum `Extension`).
#[derive(Debug, Default)]
pub struct ComputeShare {
    state: Mutex<State>,
    changed: Notify,
}

/// What the admin route answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStatus {
    /// The cap; `None` (`null`): no cap.
    pub max_tokens_in_flight: Option<usize>,
    /// The duty cycle, 1-99 percent of the time; `None` (`null`): no pacing.
    #[serde(default)]
    pub duty_percent: Option<u32>,
    /// The share of the GPU's SMs asked for, 1-99 percent; `None` (`null`): all of them.
    #[serde(default)]
    pub sm_percent: Option<u32>,
    /// SMs the embedder's batches may use now; `None` (`null`): the engine has no SM
    /// partitions.
    #[serde(default)]
    pub sms: Option<u32>,
    /// The engine's SM partitions (`--sm-partitions`, as the driver rounded them); empty:
    /// none, and `sm_percent` is refused.
    #[serde(default)]
    pub sm_partitions: Vec<u32>,
    pub tokens_in_flight: usize,
    pub waiting: usize,
}

impl ComputeShare {
    /// Sets (or, with `None`, lifts) the cap; waiting requests that now fit go at once.
    pub fn set(&self, cap: Option<usize>) {
        self.state.lock().cap = cap;
        self.changed.notify_waiters();
    }

    /// The cap (`None`: none). The embedding queue bounds each batch by it too.
    pub fn cap(&self) -> Option<usize> {
        self.state.lock().cap
    }

    /// Sets (or, with `None`, lifts) the duty cycle; 100 or more is none.
    pub fn set_duty(&self, percent: Option<u32>) {
        self.state.lock().duty_percent = percent.filter(|p| *p < 100);
    }

    /// The duty cycle in percent (`None`: no pacing).
    pub fn duty_percent(&self) -> Option<u32> {
        self.state.lock().duty_percent
    }

    /// Makes the SM lever available: the engine's partitions (its model is loaded), all
    /// SMs in use until a share is set.
    pub fn set_partitions(&self, partitions: SmPartitions) {
        let mut st = self.state.lock();
        st.sms = Some(partitions.total);
        st.partitions = Some(partitions);
    }

    /// True once the engine has SM partitions to move between.
    pub fn has_partitions(&self) -> bool {
        self.state.lock().partitions.is_some()
    }

    /// Sets (or, with `None`, lifts) the share of SMs; 100 or more is all of them.
    pub fn set_sm_percent(&self, percent: Option<u32>) {
        self.state.lock().sm_percent = percent.filter(|p| *p < 100);
    }

    /// The share of SMs asked for (`None`: all); the engine applies it before each batch.
    pub fn sm_percent(&self) -> Option<u32> {
        self.state.lock().sm_percent
    }

    /// What the engine applied: the SMs its batches may use now.
    pub fn set_sms_in_use(&self, sms: u32) {
        self.state.lock().sms = Some(sms);
    }

    /// The settings and the tokens inside the cap now.
    pub fn status(&self) -> ShareStatus {
        let st = self.state.lock();
        ShareStatus {
            max_tokens_in_flight: st.cap,
            duty_percent: st.duty_percent,
            sm_percent: st.sm_percent,
            sms: st.sms,
            sm_partitions: st
                .partitions
                .as_ref()
                .map(|p| p.sizes.clone())
                .unwrap_or_default(),
            tokens_in_flight: st.in_flight,
            waiting: st.waiting,
        }
    }

    /// Waits until `tokens` fit under the cap (or nothing else is inside), and holds them
    /// until the returned guard drops.
    pub async fn enter(self: &Arc<Self>, tokens: usize) -> TokensInside {
        let mut counted = false;
        loop {
            // Registered before the check, so a release between the check and the wait
            // is not missed.
            let notified = self.changed.notified();
            {
                let mut st = self.state.lock();
                let fits = st.cap.is_none_or(|cap| st.in_flight + tokens <= cap);
                if fits || st.in_flight == 0 {
                    st.in_flight += tokens;
                    if counted {
                        st.waiting -= 1;
                    }
                    return TokensInside {
                        share: self.clone(),
                        tokens,
                    };
                }
                if !counted {
                    st.waiting += 1;
                    counted = true;
                }
            }
            let mut guard = WaitingGuard {
                share: self,
                armed: true,
            };
            notified.await;
            guard.armed = false;
        }
    }
}

/// Counts a waiter out if its request is dropped while it waits.
struct WaitingGuard<'a> {
    share: &'a ComputeShare,
    armed: bool,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.share.state.lock();
            st.waiting = st.waiting.saturating_sub(1);
        }
    }
}

/// Tokens inside the engine; they leave when this drops (the answer is ready or the
/// client went away).
pub struct TokensInside {
    share: Arc<ComputeShare>,
    tokens: usize,
}

impl Drop for TokensInside {
    fn drop(&mut self) {
        {
            let mut st = self.share.state.lock();
            st.in_flight = st.in_flight.saturating_sub(self.tokens);
        }
        self.share.changed.notify_waiters();
    }
}

/// The share as Prometheus gauges (`colocate:` names, as the engine's others).
pub fn render(model_name: &str, st: &ShareStatus) -> String {
    let l = format!("model_name=\"{model_name}\"");
    format!(
        "# HELP colocate:compute_share_max_tokens_in_flight The cap on embedding tokens in the engine at once (-1: none).\n\
         # TYPE colocate:compute_share_max_tokens_in_flight gauge\n\
         colocate:compute_share_max_tokens_in_flight{{{l}}} {}\n\
         # HELP colocate:compute_share_duty_percent The embedder's duty cycle, percent of the time (-1: no pacing).\n\
         # TYPE colocate:compute_share_duty_percent gauge\n\
         colocate:compute_share_duty_percent{{{l}}} {}\n\
         # HELP colocate:compute_share_sm_percent The share of the GPU's SMs asked for the embedder's batches (-1: all).\n\
         # TYPE colocate:compute_share_sm_percent gauge\n\
         colocate:compute_share_sm_percent{{{l}}} {}\n\
         # HELP colocate:compute_share_sms SMs the embedder's batches may use now (-1: no SM partitions).\n\
         # TYPE colocate:compute_share_sms gauge\n\
         colocate:compute_share_sms{{{l}}} {}\n\
         # HELP colocate:compute_share_tokens_in_flight Embedding tokens in the engine now.\n\
         # TYPE colocate:compute_share_tokens_in_flight gauge\n\
         colocate:compute_share_tokens_in_flight{{{l}}} {}\n\
         # HELP colocate:compute_share_waiting Embedding requests waiting for the share.\n\
         # TYPE colocate:compute_share_waiting gauge\n\
         colocate:compute_share_waiting{{{l}}} {}\n",
        st.max_tokens_in_flight.map_or(-1, |c| c as i64),
        st.duty_percent.map_or(-1, i64::from),
        st.sm_percent.map_or(-1, i64::from),
        st.sms.map_or(-1, i64::from),
        st.tokens_in_flight,
        st.waiting
    )
}

/// `GET /admin/compute-share`.
pub async fn get_share(Extension(share): Extension<Arc<ComputeShare>>) -> Response {
    axum::Json(share.status()).into_response()
}

/// `POST /admin/compute-share` with `{"max_tokens_in_flight": N | null, "duty_percent":
/// P | null, "sm_percent": S | null}` (any of them). Nothing changes when one is refused.
pub async fn set_share(
    Extension(share): Extension<Arc<ComputeShare>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let update = parse_update(&body)?;
    if let Some(sm) = update.sm_percent {
        if !share.has_partitions() {
            return Err(ErrorBody::invalid_request(
                format!("`{SM}`: this engine has no SM partitions to move between; start an embedder with --device cuda --sm-partitions 16,32,64 (CUDA green contexts of that many SMs)"),
                Some(SM),
            )
            .into());
        }
        share.set_sm_percent(sm);
    }
    if let Some(cap) = update.cap {
        share.set(cap);
    }
    if let Some(duty) = update.duty_percent {
        share.set_duty(duty);
    }
    Ok((StatusCode::OK, axum::Json(share.status())).into_response())
}

/// What a `POST` changes: each setting it names (`Some(None)`: lift it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ShareUpdate {
    cap: Option<Option<usize>>,
    duty_percent: Option<Option<u32>>,
    sm_percent: Option<Option<u32>>,
}

const CAP: &str = "max_tokens_in_flight";
const DUTY: &str = "duty_percent";
const SM: &str = "sm_percent";

/// The settings of a body: `max_tokens_in_flight` a whole number of at least 1,
/// `duty_percent` and `sm_percent` whole numbers from 1 to 100 (100: no pacing, all
/// SMs), each or null; one at least.
fn parse_update(body: &[u8]) -> Result<ShareUpdate, ErrorBody> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ErrorBody::invalid_request(format!("the body is not valid JSON: {e}"), None)
    })?;
    let Some(map) = v.as_object() else {
        return Err(ErrorBody::invalid_request(
            "send a JSON object: {\"max_tokens_in_flight\": 2048, \"duty_percent\": 50, \"sm_percent\": 25} (any of them; null lifts one)",
            None,
        ));
    };
    if let Some(k) = map.keys().find(|k| ![CAP, DUTY, SM].contains(&k.as_str())) {
        return Err(ErrorBody::invalid_request(
            format!("unknown field `{k}`: the settings are {CAP}, {DUTY} and {SM}"),
            Some(k),
        ));
    }
    if map.is_empty() {
        return Err(ErrorBody::invalid_request(
            format!("`{CAP}`, `{DUTY}` or `{SM}` is required (null lifts it)"),
            Some(CAP),
        ));
    }
    let whole = |name: &str, min: u64, max: u64| -> Result<Option<Option<u64>>, ErrorBody> {
        match map.get(name) {
            None => Ok(None),
            Some(serde_json::Value::Null) => Ok(Some(None)),
            Some(n) => match n.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(Some(n))),
                _ => Err(ErrorBody::invalid_request(
                    format!("`{name}` must be a whole number from {min} to {max} or null, got {n}"),
                    Some(name),
                )),
            },
        }
    };
    let cap = whole(CAP, 1, usize::MAX as u64)?;
    let duty = whole(DUTY, 1, 100)?;
    let sm = whole(SM, 1, 100)?;
    Ok(ShareUpdate {
        cap: cap.map(|c| c.map(|n| n as usize)),
        duty_percent: duty.map(|d| d.map(|n| n as u32)),
        sm_percent: sm.map(|d| d.map(|n| n as u32)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn settings_are_read_strictly() {
        let ok = |b: &[u8]| parse_update(b).unwrap();
        assert_eq!(
            ok(br#"{"max_tokens_in_flight": 512}"#),
            ShareUpdate {
                cap: Some(Some(512)),
                ..ShareUpdate::default()
            }
        );
        assert_eq!(ok(br#"{"max_tokens_in_flight": null}"#).cap, Some(None));
        assert_eq!(
            ok(br#"{"duty_percent": 25, "max_tokens_in_flight": null}"#),
            ShareUpdate {
                cap: Some(None),
                duty_percent: Some(Some(25)),
                sm_percent: None
            }
        );
        assert_eq!(ok(br#"{"sm_percent": 25}"#).sm_percent, Some(Some(25)));
        assert_eq!(ok(br#"{"sm_percent": null}"#).sm_percent, Some(None));
        assert_eq!(ok(br#"{"duty_percent": null}"#).duty_percent, Some(None));
        for bad in [
            &br#"{"max_tokens_in_flight": 0}"#[..],
            br#"{"max_tokens_in_flight": -3}"#,
            br#"{"max_tokens_in_flight": 1.5}"#,
            br#"{"max_tokens_in_flight": "9"}"#,
            br#"{"duty_percent": 0}"#,
            br#"{"duty_percent": 101}"#,
            br#"{"duty_percent": 50.5}"#,
            br#"{"sm_percent": 0}"#,
            br#"{"sm_percent": 101}"#,
            br#"{"sm_percent": "25"}"#,
            br#"{}"#,
            br#"{"max_tokens": 9}"#,
            br#"[1]"#,
            b"{",
        ] {
            let e = parse_update(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(bad));
        }
        // 100% is no pacing
        let share = ComputeShare::default();
        share.set_duty(Some(100));
        assert_eq!(share.duty_percent(), None);
        share.set_duty(Some(40));
        assert_eq!(share.status().duty_percent, Some(40));
        assert!(render("m", &share.status())
            .contains("colocate:compute_share_duty_percent{model_name=\"m\"} 40\n"));
    }

    #[test]
    fn the_sm_share_shows_the_partitions_and_what_is_in_use() {
        let share = ComputeShare::default();
        let text = render("m", &share.status());
        assert!(
            text.contains("colocate:compute_share_sms{model_name=\"m\"} -1\n"),
            "{text}"
        );
        assert!(!share.has_partitions());
        share.set_partitions(SmPartitions::new(132, [16, 64]));
        share.set_sm_percent(Some(100));
        assert_eq!(share.sm_percent(), None);
        share.set_sm_percent(Some(25));
        share.set_sms_in_use(64);
        let st = share.status();
        assert_eq!(
            (st.sm_percent, st.sms, st.sm_partitions.clone()),
            (Some(25), Some(64), vec![16, 64])
        );
        let text = render("m", &st);
        assert!(text.contains("colocate:compute_share_sm_percent{model_name=\"m\"} 25\n"));
        assert!(text.contains("colocate:compute_share_sms{model_name=\"m\"} 64\n"));
    }

    #[tokio::test]
    async fn requests_past_the_cap_wait_until_tokens_leave() {
        let share = Arc::new(ComputeShare::default());
        share.set(Some(100));
        let a = share.enter(60).await;
        let s2 = share.clone();
        let b = tokio::spawn(async move { s2.enter(60).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            share.status(),
            ShareStatus {
                max_tokens_in_flight: Some(100),
                duty_percent: None,
                sm_percent: None,
                sms: None,
                sm_partitions: vec![],
                tokens_in_flight: 60,
                waiting: 1
            }
        );
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(1), b)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(share.status().tokens_in_flight, 60);
        assert_eq!(share.status().waiting, 0);
        // larger than the cap: runs alone once nothing else is inside
        let s2 = share.clone();
        let big = tokio::spawn(async move { s2.enter(500).await.tokens });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!big.is_finished());
        drop(b);
        assert_eq!(big.await.unwrap(), 500);
    }

    #[tokio::test]
    async fn raising_or_lifting_the_cap_releases_waiters_and_leavers_are_not_counted() {
        let share = Arc::new(ComputeShare::default());
        share.set(Some(10));
        let _a = share.enter(10).await;
        let s2 = share.clone();
        let w = tokio::spawn(async move { s2.enter(5).await.tokens });
        let s3 = share.clone();
        let gone = tokio::spawn(async move { s3.enter(5).await.tokens });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(share.status().waiting, 2);
        gone.abort();
        let _ = gone.await;
        assert_eq!(share.status().waiting, 1);
        share.set(None);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .unwrap()
                .unwrap(),
            5
        );
        assert_eq!(share.status().waiting, 0);
    }
}
