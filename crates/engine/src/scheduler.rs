//! Continuous batching for a [`Generator`] (vLLM v1's scheduler).
//!
//! One step = one call of `Generator::step`. Each step is built under a token budget
//! (`--max-num-batched-tokens`) with **chunked prefill**: first every running sequence gets
//! its share, oldest first (one token for a decoding sequence, the next chunk of its prompt
//! for one still prefilling), then waiting requests are admitted in arrival order while the
//! budget, `--max-num-seqs` and free KV blocks allow, each with as much of its prompt as the
//! remaining budget holds. So a request joins the running batch at the next step, decodes
//! never stall behind a long prompt, and a long prompt is spread over several steps.
//!
//! Prefix caching: a request being admitted first takes the cached blocks that hold the
//! longest whole-block prefix of its tokens (all but the last, which must be computed to
//! sample from) and starts computing after them; every block a step fills is filed for
//! later requests ([`BlockManager::match_prefix`], [`BlockManager::commit`]). A preempted
//! sequence takes its own blocks back this way when they are still cached.
//!
//! KV blocks: a waiting request is admitted only when the blocks for its chunk are free
//! (otherwise it waits). When a running sequence needs a block and none is free, the
//! newest running sequence is preempted: its blocks are freed and it goes back to the front
//! of the queue to be recomputed (prompt plus what it generated so far) later. A request
//! whose client went away (its event channel closed) is dropped and its blocks freed at
//! the start of the next step.
//!
//! The scheduler is owned by one thread (the model is not `Sync`); requests arrive through
//! [`crate::worker`], results leave through each request's output stage
//! ([`crate::detok::RequestOutput`]: detokenization, stop strings, its event channel).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::UnboundedSender;

use crate::detok::{Detokenize, RequestOutput};
use crate::kv::{BlockManager, BlockTable};
use crate::metrics::Metrics;
use crate::model_api::{Generator, SampleSpec, SeqStep};

/// Sampling and stopping parameters of one request, validated by the server.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// At least 1.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// `None`: a random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// EOS and stop strings cannot end generation before this many tokens.
    pub min_tokens: usize,
    /// Prefix-cache blocks are shared only between requests of the same salt (vLLM's
    /// `cache_salt`); `None` is a salt of its own.
    pub cache_salt: Option<String>,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: vec![],
            ignore_eos: false,
            min_tokens: 0,
            cache_salt: None,
        }
    }
}

/// What a request hears back, in order: any number of `Text`, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// New output text (never empty, never a broken UTF-8 character).
    Text(String),
    /// The end: the last text (possibly empty), why, and the token counts.
    Done {
        text: String,
        finish_reason: &'static str,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    Error(String),
}

/// A generation request as the scheduler takes it.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// The client reads the text as it comes (`stream`). A request neither streamed nor
    /// stopped by strings has its text decoded once, when it ends
    /// ([`RequestOutput::new`]).
    pub streamed: bool,
    pub events: UnboundedSender<GenEvent>,
    pub arrival: Instant,
}

/// Bounded admission (`--max-waiting`): counts requests accepted but not yet started. The
/// server reserves a place before sending a request in; the scheduler frees it when the
/// request first runs (or is dropped). Beyond the bound the server answers 503.
#[derive(Debug)]
pub struct Admission {
    waiting: AtomicUsize,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Admission {
            waiting: AtomicUsize::new(0),
            max,
        }
    }

    /// Reserves a place; false when the queue is full.
    pub fn try_enter(&self) -> bool {
        self.waiting
            .fetch_update(Relaxed, Relaxed, |w| (w < self.max).then_some(w + 1))
            .is_ok()
    }

    /// Frees a place.
    pub fn leave(&self) {
        let _ = self
            .waiting
            .fetch_update(Relaxed, Relaxed, |w| Some(w.saturating_sub(1)));
    }

    /// Requests accepted and not yet started (places in use).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// The bound (`--max-waiting`).
    pub fn capacity(&self) -> usize {
        self.max
    }
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Prompt plus output never exceed this.
    pub max_model_len: usize,
}

/// One sequence in the scheduler.
struct Seq {
    /// Prompt then output.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    table: BlockTable,
    params: GenParams,
    rng: rand::rngs::StdRng,
    /// Detokenizes, applies stop strings and sends the request's events.
    output: RequestOutput,
    arrival: Instant,
    last_token_at: Option<Instant>,
    /// Has run at least once (its admission place is freed, its prompt counted).
    started: bool,
    /// Set when the sequence must leave the batch at the end of this step.
    done: bool,
}

impl Seq {
    fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The continuous-batching scheduler of a generator.
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: BlockManager,
    waiting: VecDeque<Seq>,
    /// In admission order: the last one is the newest (preempted first).
    running: Vec<Seq>,
    eos: Vec<u32>,
    /// Handed to each request's output stage.
    detok: Arc<dyn Detokenize>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    /// Reused per step: (index into `running`, tokens to run).
    plan: Vec<(usize, usize)>,
    uniforms: Vec<f32>,
    /// When the last step ended with sequences still running (the start of a step gap).
    busy_since: Option<Instant>,
}

impl Scheduler {
    pub fn new(
        cfg: SchedulerConfig,
        kv: BlockManager,
        eos: Vec<u32>,
        detok: Arc<dyn Detokenize>,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
    ) -> Self {
        metrics.kv_blocks_total.store(kv.total() as u64, Relaxed);
        Scheduler {
            cfg,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            eos,
            detok,
            metrics,
            admission,
            plan: Vec::new(),
            uniforms: Vec::new(),
            busy_since: None,
        }
    }

    /// Queues a request (its admission place is already reserved).
    pub fn add(&mut self, req: GenRequest) {
        let rng = match req.params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_entropy(),
        };
        let prompt_len = req.prompt.len();
        let mut tokens = req.prompt;
        // Never sized by the client's number alone: the context bounds the output too.
        let room = self.cfg.max_model_len.saturating_sub(prompt_len);
        tokens.reserve(req.params.max_tokens.min(room));
        self.waiting.push_back(Seq {
            tokens,
            prompt_len,
            computed: 0,
            table: BlockTable::default(),
            output: RequestOutput::new(
                self.detok.clone(),
                req.params.stop.clone(),
                req.streamed,
                req.events,
            ),
            params: req.params,
            rng,
            arrival: req.arrival,
            last_token_at: None,
            started: false,
            done: false,
        });
        self.update_gauges();
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The KV block manager (tests, metrics).
    pub fn kv(&self) -> &BlockManager {
        &self.kv
    }

    /// Number of running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Number of waiting sequences (new and preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Runs one step: drops cancelled requests, schedules, runs the model, hands out
    /// tokens. A model error fails the requests of this step and is returned.
    pub fn step(&mut self, model: &mut dyn Generator) -> anyhow::Result<()> {
        self.drop_cancelled();
        self.schedule();
        // Published before the step too, so a client that sees a token also sees the
        // blocks its sequence holds (the end-of-step update alone lags the first token).
        self.update_gauges();
        if self.plan.is_empty() {
            self.busy_since = None;
            return Ok(());
        }
        // One uniform per sampling sequence, drawn before the steps borrow the sequences.
        self.uniforms.clear();
        for &(i, n) in &self.plan {
            let s = &mut self.running[i];
            if s.computed + n == s.tokens.len() {
                self.uniforms.push(s.rng.gen::<f32>());
            }
        }
        let result = {
            let mut k = 0;
            let steps: Vec<SeqStep<'_>> = self
                .plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    let samples = s.computed + n == s.tokens.len();
                    let sample = samples.then(|| {
                        let uniform = self.uniforms[k];
                        k += 1;
                        SampleSpec {
                            temperature: s.params.temperature,
                            top_p: s.params.top_p,
                            top_k: s.params.top_k,
                            uniform,
                            // With ignore_eos an EOS is just another token: masking it
                            // would only cost the fast greedy path.
                            masked: if !s.params.ignore_eos && s.output_len() < s.params.min_tokens
                            {
                                &self.eos
                            } else {
                                &[]
                            },
                        }
                    });
                    SeqStep {
                        tokens: &s.tokens[s.computed..s.computed + n],
                        start_pos: s.computed,
                        block_table: s.table.ids(),
                        sample,
                    }
                })
                .collect();
            let mixed = self.plan.iter().any(|&(_, n)| n > 1);
            let start = Instant::now();
            if let Some(end) = self.busy_since {
                self.metrics.step_gap.observe_duration(start - end);
            }
            let r = model.step(&steps);
            let took = start.elapsed();
            if mixed {
                &self.metrics.step_mixed
            } else {
                &self.metrics.step_decode
            }
            .observe_duration(took);
            r
        };
        let sampled = match result {
            Ok(t) if t.len() == self.uniforms.len() => t,
            Ok(t) => {
                let e = anyhow::anyhow!(
                    "model returned {} tokens for {} sampling sequences",
                    t.len(),
                    self.uniforms.len()
                );
                self.fail_planned(&e);
                return Err(e);
            }
            Err(e) => {
                self.fail_planned(&e);
                return Err(e);
            }
        };
        self.apply(&sampled);
        self.update_gauges();
        self.busy_since = (!self.running.is_empty()).then(Instant::now);
        Ok(())
    }

    fn fail_planned(&mut self, e: &anyhow::Error) {
        let msg = format!("model step failed: {e:#}");
        for &(i, _) in &self.plan {
            let s = &mut self.running[i];
            s.output.fail(msg.clone());
            s.done = true;
        }
        self.remove_done();
        self.update_gauges();
    }

    fn drop_cancelled(&mut self) {
        let kv = &mut self.kv;
        let metrics = &self.metrics;
        let admission = &self.admission;
        let mut drop_closed = |s: &mut Seq| {
            if s.output.is_closed() {
                kv.release(&mut s.table);
                metrics.requests_aborted.fetch_add(1, Relaxed);
                if !s.started {
                    admission.leave();
                }
                false
            } else {
                true
            }
        };
        self.running.retain_mut(&mut drop_closed);
        self.waiting.retain_mut(&mut drop_closed);
    }

    /// Fills `plan`: running sequences first (oldest first), then admissions.
    fn schedule(&mut self) {
        self.plan.clear();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.tokens.len() - s.computed).min(budget);
            let want = s.computed + n;
            if self.kv.grow(&mut self.running[i].table, want) {
                self.plan.push((i, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt the newest (it may be this one).
            let victim = self.running.pop().expect("running is not empty");
            self.preempt(victim);
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            // A waiting sequence holds no blocks: the cached prefix is taken here.
            let hit = self.kv.match_prefix(
                &mut s.table,
                &s.tokens,
                s.tokens.len().saturating_sub(1),
                s.params.cache_salt.as_deref(),
            );
            s.computed = hit;
            let n = (s.tokens.len() - s.computed).min(budget);
            if !self.kv.grow(&mut s.table, s.computed + n) {
                self.kv.release(&mut s.table);
                s.computed = 0;
                break;
            }
            // As vLLM's counters: a request's first admission with the cache on (a
            // preempted sequence taking its own blocks back is not a query).
            if self.kv.prefix_caching() && !s.started {
                self.metrics
                    .prefix_cache_queries
                    .fetch_add(s.tokens.len() as u64, Relaxed);
                self.metrics
                    .prefix_cache_hits
                    .fetch_add(hit as u64, Relaxed);
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            if !s.started {
                s.started = true;
                self.admission.leave();
                self.metrics
                    .prompt_tokens
                    .fetch_add(s.prompt_len as u64, Relaxed);
            }
            self.plan.push((self.running.len(), n));
            self.running.push(s);
            budget -= n;
        }
    }

    fn preempt(&mut self, mut s: Seq) {
        self.kv.release(&mut s.table);
        s.computed = 0;
        self.metrics.preemptions.fetch_add(1, Relaxed);
        self.waiting.push_front(s);
    }

    /// Records the step's results: advances computed positions, appends sampled tokens,
    /// hands each new token to its request (EOS, stop strings through the output stage,
    /// length, events), frees finished sequences.
    fn apply(&mut self, sampled: &[u32]) {
        let now = Instant::now();
        let mut k = 0;
        for &(i, n) in &self.plan {
            let s = &mut self.running[i];
            s.computed += n;
            self.kv.commit(&mut s.table, &s.tokens, s.computed);
            if s.computed != s.tokens.len() {
                continue; // a prefill chunk that is not the last
            }
            let t = sampled[k];
            k += 1;
            s.tokens.push(t);
            on_token(s, t, now, &self.eos, &self.metrics, self.cfg.max_model_len);
        }
        self.remove_done();
    }

    fn remove_done(&mut self) {
        let kv = &mut self.kv;
        self.running.retain_mut(|s| {
            if s.done {
                kv.release(&mut s.table);
            }
            !s.done
        });
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.requests_running.store(self.running.len() as u64, Relaxed);
        m.requests_waiting.store(self.waiting.len() as u64, Relaxed);
        m.kv_blocks_used.store(self.kv.num_used() as u64, Relaxed);
    }
}

/// Handles one new token of `s`: metrics, EOS, stop strings (through its output stage),
/// length, and the event.
fn on_token(
    s: &mut Seq,
    t: u32,
    now: Instant,
    eos: &[u32],
    metrics: &Metrics,
    max_model_len: usize,
) {
    metrics.generation_tokens.fetch_add(1, Relaxed);
    match s.last_token_at {
        None => metrics
            .ttft
            .observe(now.duration_since(s.arrival).as_secs_f64()),
        Some(prev) => metrics.tpot.observe(now.duration_since(prev).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    let out_len = s.output_len();
    let past_min = out_len >= s.params.min_tokens;
    let mut finish: Option<&'static str> = None;
    if eos.contains(&t) && !s.params.ignore_eos && past_min {
        finish = Some(openai::finish_reason::STOP);
    } else {
        match s.output.push(&s.tokens[s.prompt_len..], past_min) {
            Ok(true) => finish = Some(openai::finish_reason::STOP),
            Ok(false) => {}
            Err(e) => {
                s.output.fail(format!("cannot decode output: {e:#}"));
                s.done = true;
                return;
            }
        }
    }
    if finish.is_none() && (out_len >= s.params.max_tokens || s.tokens.len() >= max_model_len) {
        finish = Some(openai::finish_reason::LENGTH);
    }
    if let Some(reason) = finish {
        s.done = true;
        if reason == openai::finish_reason::STOP {
            metrics.requests_finished_stop.fetch_add(1, Relaxed);
        } else {
            metrics.requests_finished_length.fetch_add(1, Relaxed);
        }
        metrics
            .e2e
            .observe(now.duration_since(s.arrival).as_secs_f64());
    }
    let output = &s.tokens[s.prompt_len..];
    if !s
        .output
        .emit(finish, output, s.prompt_len as u32, out_len as u32)
    {
        // The client went away: free the blocks now.
        metrics.requests_aborted.fetch_add(1, Relaxed);
        s.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detok::tests::Bytes;
    use crate::model_api::{ModelInfo, Task};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const EOS: u32 = 256;

    /// A test generator that checks the scheduler's use of the seam: positions follow the
    /// cache, block tables cover the positions, no two live sequences share a block. It
    /// "generates" `b'a' + (position % 26)`, or EOS when `eos_at` says so (unless masked).
    struct Fake {
        info: ModelInfo,
        block_size: usize,
        steps: Vec<Vec<(usize, usize, bool)>>,
        eos_at: Option<usize>,
    }

    impl Fake {
        fn new(block_size: usize) -> Self {
            Fake {
                info: ModelInfo {
                    architecture: "fake".into(),
                    task: Task::Generate,
                    vocab_size: 257,
                    max_position_embeddings: 4096,
                    eos_token_ids: vec![EOS],
                    kv_bytes_per_token: 8,
                    weight_bytes: 0,
                },
                block_size,
                steps: vec![],
                eos_at: None,
            }
        }
    }

    impl Generator for Fake {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn init_kv_cache(&mut self, _: usize, _: usize) -> anyhow::Result<()> {
            Ok(())
        }
        fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
            // Blocks may be shared for reading (a cached prefix), never where a step writes.
            let mut held = std::collections::HashMap::new();
            for s in seqs {
                for b in s.block_table {
                    *held.entry(*b).or_insert(0) += 1;
                }
            }
            let mut out = vec![];
            let mut record = vec![];
            for s in seqs {
                let end = s.start_pos + s.tokens.len();
                assert!(s.block_table.len() * self.block_size >= end);
                for p in s.start_pos..end {
                    let b = s.block_table[p / self.block_size];
                    assert_eq!(held[&b], 1, "block {b} written while shared");
                }
                record.push((s.start_pos, s.tokens.len(), s.sample.is_some()));
                if let Some(spec) = s.sample {
                    let t = if self.eos_at == Some(end) && !spec.masked.contains(&EOS) {
                        EOS
                    } else {
                        b'a' as u32 + (end % 26) as u32
                    };
                    out.push(t);
                }
            }
            self.steps.push(record);
            Ok(out)
        }
        fn step_logits(&mut self, _: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
            unimplemented!("not used by the scheduler")
        }
    }

    fn sched(
        max_num_seqs: usize,
        budget: usize,
        blocks: usize,
        bs: usize,
    ) -> (Scheduler, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let s = Scheduler::new(
            SchedulerConfig {
                max_num_seqs,
                max_num_batched_tokens: budget,
                max_model_len: 1024,
            },
            BlockManager::new(blocks, bs),
            vec![EOS],
            Arc::new(Bytes),
            metrics.clone(),
            Arc::new(Admission::new(1000)),
        );
        (s, metrics)
    }

    fn request(prompt_len: usize, params: GenParams) -> (GenRequest, UnboundedReceiver<GenEvent>) {
        let (tx, rx) = unbounded_channel();
        (
            GenRequest {
                prompt: vec![b'x' as u32; prompt_len],
                params,
                streamed: true,
                events: tx,
                arrival: Instant::now(),
            },
            rx,
        )
    }

    fn max_tokens(n: usize) -> GenParams {
        GenParams {
            max_tokens: n,
            ..Default::default()
        }
    }

    fn collect(rx: &mut UnboundedReceiver<GenEvent>) -> (String, Option<(&'static str, u32)>) {
        let mut text = String::new();
        let mut done = None;
        while let Ok(e) = rx.try_recv() {
            match e {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Done {
                    text: t,
                    finish_reason,
                    completion_tokens,
                    ..
                } => {
                    text.push_str(&t);
                    done = Some((finish_reason, completion_tokens));
                }
                GenEvent::Error(e) => panic!("{e}"),
            }
        }
        (text, done)
    }

    fn run(s: &mut Scheduler, m: &mut Fake) {
        let mut n = 0;
        while s.has_work() {
            s.step(m).unwrap();
            n += 1;
            assert!(n < 10_000, "no progress");
        }
    }

    #[test]
    fn chunked_prefill_then_decode_to_max_tokens() {
        let (mut s, metrics) = sched(8, 16, 100, 4);
        let mut m = Fake::new(4);
        let (r, mut rx) = request(40, max_tokens(5));
        s.add(r);
        run(&mut s, &mut m);
        // 40 prompt tokens in chunks of 16, 16, 8 (last one samples), then 4 decodes.
        let shapes: Vec<_> = m.steps.iter().map(|st| st[0]).collect();
        assert_eq!(
            shapes,
            vec![
                (0, 16, false),
                (16, 16, false),
                (32, 8, true),
                (40, 1, true),
                (41, 1, true),
                (42, 1, true),
                (43, 1, true)
            ]
        );
        let (text, done) = collect(&mut rx);
        assert_eq!(done, Some(("length", 5)));
        assert_eq!(text, "opqrs");
        assert_eq!(s.kv().num_free(), 100);
        assert_eq!(metrics.generation_tokens.load(Relaxed), 5);
        assert_eq!(metrics.prompt_tokens.load(Relaxed), 40);
        // Three steps with prompt tokens, four decodes, and a gap before each step that
        // followed a step with the sequence still running (the last step finished it).
        assert_eq!(metrics.step_mixed.count(), 3);
        assert_eq!(metrics.step_decode.count(), 4);
        assert_eq!(metrics.step_gap.count(), 6);
    }

    #[test]
    fn a_repeated_prompt_computes_only_past_its_cached_blocks() {
        for caching in [true, false] {
            let (mut s, metrics) = sched(8, 64, 100, 4);
            s.kv = BlockManager::new(100, 4).with_prefix_caching(caching);
            let mut m = Fake::new(4);
            let (a, mut rx_a) = request(40, max_tokens(3));
            s.add(a);
            run(&mut s, &mut m);
            let first = m.steps.len();
            let (b, mut rx_b) = request(40, max_tokens(3));
            s.add(b);
            run(&mut s, &mut m);
            // With the cache, 9 whole blocks (36 tokens, the last token kept to sample
            // from) are taken: the first step computes 4 tokens from position 36.
            let want = if caching {
                (36, 4, true)
            } else {
                (0, 40, true)
            };
            assert_eq!(m.steps[first][0], want, "caching {caching}");
            assert_eq!(collect(&mut rx_a), collect(&mut rx_b));
            assert_eq!(
                metrics.prefix_cache_hits.load(Relaxed),
                if caching { 36 } else { 0 }
            );
            assert_eq!(
                metrics.prefix_cache_queries.load(Relaxed),
                if caching { 80 } else { 0 }
            );
            assert_eq!(s.kv().num_used(), 0);
        }
    }

    #[test]
    fn new_request_joins_running_batch_at_next_step() {
        let (mut s, _) = sched(8, 64, 100, 4);
        let mut m = Fake::new(4);
        let (long, mut rx_long) = request(4, max_tokens(50));
        s.add(long);
        for _ in 0..3 {
            s.step(&mut m).unwrap();
        }
        let (short, mut rx_short) = request(4, max_tokens(3));
        s.add(short);
        s.step(&mut m).unwrap();
        assert_eq!(
            m.steps.last().unwrap().len(),
            2,
            "decode + new prefill together"
        );
        s.step(&mut m).unwrap();
        s.step(&mut m).unwrap();
        assert_eq!(collect(&mut rx_short).1, Some(("length", 3)));
        assert_eq!(collect(&mut rx_long).1, None, "long one still running");
        run(&mut s, &mut m);
        assert_eq!(collect(&mut rx_long).1, Some(("length", 50)));
    }

    #[test]
    fn eos_masked_until_min_tokens_and_ignore_eos() {
        let (mut s, _) = sched(8, 64, 100, 4);
        let mut m = Fake::new(4);
        m.eos_at = Some(6); // the model wants EOS after 2 output tokens (prompt 4)
        let (r, mut rx) = request(
            4,
            GenParams {
                max_tokens: 10,
                ..Default::default()
            },
        );
        s.add(r);
        run(&mut s, &mut m);
        assert_eq!(
            collect(&mut rx).1,
            Some(("stop", 3)),
            "EOS counted in usage"
        );

        m.eos_at = Some(6);
        let (r, mut rx) = request(
            4,
            GenParams {
                max_tokens: 10,
                min_tokens: 5,
                ..Default::default()
            },
        );
        s.add(r);
        run(&mut s, &mut m);
        assert_eq!(collect(&mut rx).1, Some(("length", 10)), "EOS masked");

        m.eos_at = Some(6);
        let (r, mut rx) = request(
            4,
            GenParams {
                max_tokens: 7,
                ignore_eos: true,
                ..Default::default()
            },
        );
        s.add(r);
        run(&mut s, &mut m);
        assert_eq!(collect(&mut rx).1, Some(("length", 7)));
    }

    #[test]
    fn stop_string_ends_generation() {
        let (mut s, _) = sched(8, 64, 100, 4);
        let mut m = Fake::new(4);
        let (r, mut rx) = request(
            4,
            GenParams {
                max_tokens: 20,
                stop: vec!["gh".into()],
                ..Default::default()
            },
        );
        s.add(r);
        run(&mut s, &mut m);
        // outputs e f g h ... (the token after position p is 'a' + p)
        let (text, done) = collect(&mut rx);
        assert_eq!(text, "ef");
        assert_eq!(done, Some(("stop", 4)));
    }

    #[test]
    fn waits_for_blocks_and_preempts_newest_when_decode_runs_out() {
        // 6 blocks of 4 tokens; three requests of 8 prompt tokens each need 2 blocks each,
        // then a third block to decode past 8.
        let (mut s, metrics) = sched(8, 64, 6, 4);
        let mut m = Fake::new(4);
        let mut rxs = vec![];
        for _ in 0..4 {
            let (r, rx) = request(8, max_tokens(6));
            s.add(r);
            rxs.push(rx);
        }
        s.step(&mut m).unwrap();
        assert_eq!(s.num_running(), 3);
        assert_eq!(s.num_waiting(), 1, "fourth waits for blocks");
        run(&mut s, &mut m);
        assert!(metrics.preemptions.load(Relaxed) > 0);
        for rx in &mut rxs {
            let (text, done) = collect(rx);
            assert_eq!(done, Some(("length", 6)));
            assert_eq!(text, "ijklmn", "recomputation gives the same tokens");
        }
        assert_eq!(s.kv().num_free(), 6);
    }

    #[test]
    fn huge_max_tokens_is_bounded_by_the_context() {
        // The server refuses such a request; the scheduler must not abort on one anyway.
        let (mut s, _) = sched(8, 64, 300, 4);
        let mut m = Fake::new(4);
        let (r, mut rx) = request(4, max_tokens(usize::MAX));
        s.add(r);
        run(&mut s, &mut m);
        assert_eq!(
            collect(&mut rx).1,
            Some(("length", 1020)),
            "stops at max_model_len"
        );
    }

    #[test]
    fn cancelled_requests_free_blocks_at_next_step() {
        let (mut s, metrics) = sched(8, 64, 100, 4);
        let mut m = Fake::new(4);
        let (r, rx) = request(20, max_tokens(100));
        s.add(r);
        s.step(&mut m).unwrap();
        assert!(s.kv().num_used() > 0);
        drop(rx);
        s.step(&mut m).unwrap();
        assert_eq!(s.kv().num_used(), 0);
        assert!(!s.has_work());
        assert_eq!(metrics.requests_aborted.load(Relaxed), 1);
    }

    /// Random arrivals, lengths and cancellations under a tight KV budget: every request
    /// ends exactly once, and all blocks are free at the end.
    #[test]
    fn random_load_ends_with_all_blocks_free() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut s, metrics) = sched(6, 32, 20, 4);
        let mut m = Fake::new(4);
        let mut live: Vec<(UnboundedReceiver<GenEvent>, usize)> = vec![];
        let mut finished = 0;
        for step in 0..3000 {
            if step < 2000 && rng.gen_bool(0.3) {
                let mt = rng.gen_range(1..30);
                let (r, rx) = request(rng.gen_range(1..40), max_tokens(mt));
                s.add(r);
                live.push((rx, mt));
            }
            if !live.is_empty() && rng.gen_bool(0.05) {
                let i = rng.gen_range(0..live.len());
                live.swap_remove(i);
            }
            s.step(&mut m).unwrap();
            live.retain_mut(|(rx, mt)| match collect(rx).1 {
                Some((reason, n)) => {
                    assert_eq!((reason, n as usize), ("length", *mt));
                    finished += 1;
                    false
                }
                None => true,
            });
            let held = s.kv().num_used();
            assert_eq!(held + s.kv().num_free(), 20);
        }
        run(&mut s, &mut m);
        assert!(finished > 100);
        assert!(metrics.preemptions.load(Relaxed) > 0);
        assert_eq!(s.kv().num_free(), 20);
        assert_eq!(metrics.kv_blocks_used.load(Relaxed), 0);
    }
}
