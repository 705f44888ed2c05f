//! Batching of embedding requests by a token budget, as text-embeddings-inference does.
//!
//! Requests queue in arrival order; each batch takes inputs from the front (across request
//! boundaries) until the next input would pass `max_batch_tokens` or the batch holds
//! `max_batch_seqs` inputs; a single input longer than the budget still runs alone. A
//! request is answered when all its inputs are embedded; one whose client went away is
//! dropped before its remaining inputs run. The engine's compute share
//! ([`ComputeShare`]), when capped below the budget, is the budget of the next batch: the
//! lever that makes the embedder's kernels smaller on a shared GPU at run time.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::model_api::Embedder;
use crate::scheduler::Admission;
use crate::server::share::ComputeShare;

/// The longest pause pacing makes after one batch.
pub const MAX_PACING_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long to wait after a batch that took `busy` so that batches fill `duty_percent` of
/// the time: `busy x (100 - duty) / duty`, at most [`MAX_PACING_PAUSE`]; none at 100%.
pub fn pacing_pause(busy: std::time::Duration, duty_percent: u32) -> std::time::Duration {
    if duty_percent == 0 || duty_percent >= 100 {
        return std::time::Duration::ZERO;
    }
    (busy * (100 - duty_percent) / duty_percent).min(MAX_PACING_PAUSE)
}

/// An embedding request as the queue takes it.
#[derive(Debug)]
pub struct EmbedRequest {
    pub inputs: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<anyhow::Result<Vec<Vec<f32>>>>,
}

struct Pending {
    req: EmbedRequest,
    results: Vec<Vec<f32>>,
}

/// The queue of embedding requests and its batching rule.
pub struct EmbedQueue {
    queue: VecDeque<Pending>,
    max_batch_tokens: usize,
    max_batch_seqs: usize,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    /// The live cap that bounds each batch below `max_batch_tokens` (none: the budget).
    share: Option<Arc<ComputeShare>>,
    /// The share of SMs the model last ran with (`None`: all), so that a change of
    /// `sm_percent` reaches the model once, before the next batch.
    sm_applied: Option<u32>,
}

impl EmbedQueue {
    pub fn new(
        max_batch_tokens: usize,
        max_batch_seqs: usize,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
    ) -> Self {
        EmbedQueue {
            queue: VecDeque::new(),
            max_batch_tokens: max_batch_tokens.max(1),
            max_batch_seqs: max_batch_seqs.max(1),
            metrics,
            admission,
            share: None,
            sm_applied: None,
        }
    }

    /// Bounds each batch by the compute share's cap as well, read before every batch.
    pub fn with_share(mut self, share: Arc<ComputeShare>) -> Self {
        self.share = Some(share);
        self
    }

    /// The token budget of the next batch: `max_batch_tokens`, or the compute share's cap
    /// when lower.
    fn batch_budget(&self) -> usize {
        let cap = self.share.as_ref().and_then(|s| s.cap());
        cap.map_or(self.max_batch_tokens, |c| c.clamp(1, self.max_batch_tokens))
    }

    /// Queues a request (its admission place is already reserved).
    pub fn add(&mut self, req: EmbedRequest) {
        let n = req.inputs.len();
        self.queue.push_back(Pending {
            req,
            results: Vec::with_capacity(n),
        });
        self.metrics
            .requests_waiting
            .store(self.queue.len() as u64, Relaxed);
    }

    pub fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Embeds one batch and answers the requests it completes. The gauges are current
    /// afterwards on every path (a sweep reads them to see that nothing leaked). Under a
    /// duty cycle (the compute share's pacing) it then waits so that batches fill at most
    /// that share of the time.
    pub fn step(&mut self, model: &mut dyn Embedder) -> anyhow::Result<()> {
        self.apply_sm_share(model);
        let t0 = std::time::Instant::now();
        let result = self.run_batch(model);
        self.metrics.requests_running.store(0, Relaxed);
        self.metrics
            .requests_waiting
            .store(self.queue.len() as u64, Relaxed);
        if let Some(duty) = self.share.as_ref().and_then(|s| s.duty_percent()) {
            std::thread::sleep(pacing_pause(t0.elapsed(), duty));
        }
        result
    }

    /// Moves the model onto the SM partition the share asks for, when that changed since
    /// the last batch. A model that cannot is logged once per change and keeps its SMs.
    fn apply_sm_share(&mut self, model: &mut dyn Embedder) {
        let Some(share) = &self.share else { return };
        let want = share.sm_percent();
        if want == self.sm_applied {
            return;
        }
        self.sm_applied = want;
        match model.set_sm_share(want) {
            Ok(sms) => share.set_sms_in_use(sms),
            Err(e) => tracing::warn!("SM share {want:?} not applied: {e:#}"),
        }
    }

    fn run_batch(&mut self, model: &mut dyn Embedder) -> anyhow::Result<()> {
        self.drop_cancelled();
        // (request position in the queue, count of its inputs in this batch)
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut batch: Vec<&[u32]> = Vec::new();
        let mut tokens = 0;
        let budget = self.batch_budget();
        'outer: for (qi, p) in self.queue.iter().enumerate() {
            let mut taken = 0;
            for input in &p.req.inputs[p.results.len()..] {
                let fits = tokens + input.len() <= budget && batch.len() < self.max_batch_seqs;
                if !fits && !batch.is_empty() {
                    if taken > 0 {
                        spans.push((qi, taken));
                    }
                    break 'outer;
                }
                tokens += input.len();
                batch.push(input);
                taken += 1;
            }
            if taken > 0 {
                spans.push((qi, taken));
            }
        }
        if batch.is_empty() {
            // Only requests without inputs: answer them.
            while let Some(p) = self.queue.pop_front() {
                self.finish(p);
            }
            return Ok(());
        }
        self.metrics
            .requests_running
            .store(spans.len() as u64, Relaxed);
        let n = batch.len();
        let out = model.embed(&batch).and_then(|o| {
            if o.len() == n {
                Ok(o)
            } else {
                Err(anyhow::anyhow!(
                    "model returned {} embeddings for {n} inputs",
                    o.len()
                ))
            }
        });
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("embedding failed: {e:#}");
                for _ in 0..spans.len() {
                    if let Some(p) = self.queue.pop_front() {
                        let _ = p.req.reply.send(Err(anyhow::anyhow!(msg.clone())));
                        self.admission.leave();
                    }
                }
                return Err(e);
            }
        };
        self.metrics
            .embedding_sequences
            .fetch_add(n as u64, Relaxed);
        self.metrics.prompt_tokens.fetch_add(tokens as u64, Relaxed);
        let mut it = out.into_iter();
        for &(qi, taken) in &spans {
            self.queue[qi].results.extend(it.by_ref().take(taken));
        }
        while self
            .queue
            .front()
            .is_some_and(|p| p.results.len() == p.req.inputs.len())
        {
            let p = self.queue.pop_front().expect("front exists");
            self.finish(p);
        }
        Ok(())
    }

    fn finish(&mut self, p: Pending) {
        let _ = p.req.reply.send(Ok(p.results));
        self.admission.leave();
    }

    fn drop_cancelled(&mut self) {
        let admission = &self.admission;
        let metrics = &self.metrics;
        self.queue.retain(|p| {
            let keep = !p.req.reply.is_closed();
            if !keep {
                admission.leave();
                metrics.requests_aborted.fetch_add(1, Relaxed);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_api::{ModelInfo, Task};

    /// Embeds each input as `[len, first token]` and records batch sizes.
    struct Fake {
        info: ModelInfo,
        batches: Vec<usize>,
    }

    impl Embedder for Fake {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
            self.batches.push(inputs.iter().map(|i| i.len()).sum());
            Ok(inputs
                .iter()
                .map(|i| vec![i.len() as f32, i[0] as f32])
                .collect())
        }
    }

    fn fake() -> Fake {
        Fake {
            info: ModelInfo {
                architecture: "fake".into(),
                task: Task::Embed,
                vocab_size: 10,
                max_position_embeddings: 512,
                eos_token_ids: vec![],
                kv_bytes_per_token: 0,
                weight_bytes: 0,
            },
            batches: vec![],
        }
    }

    #[test]
    fn batches_by_token_budget_across_requests_in_order() {
        let adm = Arc::new(Admission::new(10));
        let mut q = EmbedQueue::new(10, 100, Arc::new(Metrics::default()), adm.clone());
        let mut rxs = vec![];
        for (k, lens) in [vec![4, 4], vec![3], vec![20], vec![1, 2]]
            .into_iter()
            .enumerate()
        {
            assert!(adm.try_enter());
            let (tx, rx) = oneshot::channel();
            q.add(EmbedRequest {
                inputs: lens.iter().map(|&l| vec![k as u32; l]).collect(),
                reply: tx,
            });
            rxs.push(rx);
        }
        let mut m = fake();
        while q.has_work() {
            q.step(&mut m).unwrap();
        }
        // 4+4 (next 3 would pass 10), 3, 20 alone, 1+2.
        assert_eq!(m.batches, vec![8, 3, 20, 3]);
        let got: Vec<Vec<Vec<f32>>> = rxs
            .into_iter()
            .map(|mut r| r.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(got[0], vec![vec![4.0, 0.0], vec![4.0, 0.0]]);
        assert_eq!(got[2], vec![vec![20.0, 2.0]]);
        assert_eq!(got[3], vec![vec![1.0, 3.0], vec![2.0, 3.0]]);
        assert_eq!(adm.waiting(), 0);
    }

    #[test]
    fn the_compute_share_bounds_each_batch_at_run_time() {
        let adm = Arc::new(Admission::new(10));
        let share = Arc::new(ComputeShare::default());
        let mut q = EmbedQueue::new(100, 100, Arc::new(Metrics::default()), adm.clone())
            .with_share(share.clone());
        let add = |q: &mut EmbedQueue| {
            assert!(adm.try_enter());
            let (tx, rx) = oneshot::channel();
            q.add(EmbedRequest {
                inputs: vec![vec![1; 4]; 6],
                reply: tx,
            });
            rx
        };
        let mut m = fake();
        // capped at 10 tokens: one request's six inputs go two at a time
        share.set(Some(10));
        let mut rx = add(&mut q);
        while q.has_work() {
            q.step(&mut m).unwrap();
        }
        assert_eq!(m.batches, vec![8, 8, 8]);
        assert_eq!(rx.try_recv().unwrap().unwrap().len(), 6);
        // the cap lifted (and one above the budget): the budget again, all at once
        for cap in [None, Some(1000)] {
            share.set(cap);
            m.batches.clear();
            let mut rx = add(&mut q);
            while q.has_work() {
                q.step(&mut m).unwrap();
            }
            assert_eq!(m.batches, vec![24], "cap {cap:?}");
            assert_eq!(rx.try_recv().unwrap().unwrap().len(), 6);
        }
        assert_eq!(adm.waiting(), 0);
    }

    /// A fake with SM partitions: records the share it is moved to before each batch.
    struct Partitioned {
        inner: Fake,
        parts: crate::sm_share::SmPartitions,
        /// (share set, batches embedded before it)
        moves: Vec<(Option<u32>, usize)>,
    }

    impl Embedder for Partitioned {
        fn info(&self) -> &ModelInfo {
            self.inner.info()
        }
        fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
            self.inner.embed(inputs)
        }
        fn sm_partitions(&self) -> Option<crate::sm_share::SmPartitions> {
            Some(self.parts.clone())
        }
        fn set_sm_share(&mut self, percent: Option<u32>) -> anyhow::Result<u32> {
            self.moves.push((percent, self.inner.batches.len()));
            Ok(self.parts.sms(self.parts.pick(percent)))
        }
    }

    #[test]
    fn a_new_sm_share_reaches_the_model_once_before_the_next_batch() {
        let adm = Arc::new(Admission::new(10));
        let share = Arc::new(ComputeShare::default());
        let mut q = EmbedQueue::new(100, 100, Arc::new(Metrics::default()), adm.clone())
            .with_share(share.clone());
        let mut m = Partitioned {
            inner: fake(),
            parts: crate::sm_share::SmPartitions::new(132, [16, 64]),
            moves: Vec::new(),
        };
        share.set_partitions(m.sm_partitions().unwrap());
        let run = |q: &mut EmbedQueue, m: &mut Partitioned| {
            assert!(adm.try_enter());
            let (tx, _rx) = oneshot::channel();
            q.add(EmbedRequest {
                inputs: vec![vec![1; 4]],
                reply: tx,
            });
            while q.has_work() {
                q.step(m).unwrap();
            }
        };
        run(&mut q, &mut m);
        assert!(
            m.moves.is_empty(),
            "no share asked: the model is left alone"
        );
        share.set_sm_percent(Some(25));
        run(&mut q, &mut m);
        run(&mut q, &mut m);
        share.set_sm_percent(None);
        run(&mut q, &mut m);
        assert_eq!(m.moves, vec![(Some(25), 1), (None, 3)]);
        assert_eq!(share.status().sms, Some(132));
        share.set_sm_percent(Some(10));
        run(&mut q, &mut m);
        assert_eq!(share.status().sms, Some(16));
    }

    #[test]
    fn pacing_fills_the_duty_cycle() {
        let ms = std::time::Duration::from_millis;
        assert_eq!(pacing_pause(ms(30), 50), ms(30));
        assert_eq!(pacing_pause(ms(30), 25), ms(90));
        assert_eq!(pacing_pause(ms(30), 75), ms(10));
        assert_eq!(pacing_pause(ms(30), 100), ms(0));
        assert_eq!(pacing_pause(ms(900), 10), MAX_PACING_PAUSE);
        // the queue waits after a batch under a duty cycle (a lower bound: sleeps are at
        // least as long as asked)
        let adm = Arc::new(Admission::new(10));
        let share = Arc::new(ComputeShare::default());
        let mut q = EmbedQueue::new(100, 100, Arc::new(Metrics::default()), adm.clone())
            .with_share(share.clone());
        share.set_duty(Some(1));
        assert!(adm.try_enter());
        let (tx, mut rx) = oneshot::channel();
        q.add(EmbedRequest {
            inputs: vec![vec![1; 4]],
            reply: tx,
        });
        let mut slow = Slow(fake());
        let t0 = std::time::Instant::now();
        q.step(&mut slow).unwrap();
        // 5 ms of work at 1%: the pause is capped at a second, and at least 495 ms
        assert!(t0.elapsed() >= ms(500), "{:?}", t0.elapsed());
        assert_eq!(rx.try_recv().unwrap().unwrap().len(), 1);
    }

    /// An embedder that takes at least 5 ms a batch.
    struct Slow(Fake);

    impl Embedder for Slow {
        fn info(&self) -> &ModelInfo {
            self.0.info()
        }
        fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.0.embed(inputs)
        }
    }

    #[test]
    fn cancelled_request_is_skipped() {
        let adm = Arc::new(Admission::new(10));
        let mut q = EmbedQueue::new(100, 100, Arc::new(Metrics::default()), adm.clone());
        assert!(adm.try_enter());
        let (tx, rx) = oneshot::channel();
        q.add(EmbedRequest {
            inputs: vec![vec![1; 5]],
            reply: tx,
        });
        drop(rx);
        let mut m = fake();
        q.step(&mut m).unwrap();
        assert!(m.batches.is_empty());
        assert!(!q.has_work());
        assert_eq!(adm.waiting(), 0);
    }

    #[test]
    fn gauges_are_zero_once_every_request_is_gone() {
        let adm = Arc::new(Admission::new(10));
        let metrics = Arc::new(Metrics::default());
        let mut q = EmbedQueue::new(100, 100, metrics.clone(), adm.clone());
        let mut rxs = vec![];
        for _ in 0..3 {
            assert!(adm.try_enter());
            let (tx, rx) = oneshot::channel();
            q.add(EmbedRequest {
                inputs: vec![vec![1; 5]],
                reply: tx,
            });
            rxs.push(rx);
        }
        assert_eq!(metrics.requests_waiting.load(Relaxed), 3);
        rxs.clear();
        q.step(&mut fake()).unwrap();
        assert_eq!(metrics.requests_waiting.load(Relaxed), 0);
        assert_eq!(metrics.requests_running.load(Relaxed), 0);
        assert_eq!(metrics.requests_aborted.load(Relaxed), 3);
        assert_eq!(adm.waiting(), 0);
    }
}
