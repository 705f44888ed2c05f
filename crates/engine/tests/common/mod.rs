//! What the engine's numerics tests share: loading a model as a generator or embedder,
//! reading reference files, greedy sampling, scattered block tables, and the paged-KV
//! checks every decoder must pass (chunking, and two sequences in one step).
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use engine::load::{Device, LoadFormat, LoadOptions, Loaded, LoadedModel};
use engine::model_api::Task;
use engine::model_api::{Embedder, Generator, SampleSpec, SeqStep};

/// The repository's root (testdata/ is there).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fixture folder under testdata/.
pub fn fixture(name: &str) -> PathBuf {
    root().join("testdata").join(name)
}

/// Load options for the CPU with a fixed seed: `model` is a folder or `preset:NAME`.
pub fn opts(model: impl AsRef<Path>, task: Option<Task>, load_format: LoadFormat) -> LoadOptions {
    LoadOptions {
        model: model.as_ref().display().to_string(),
        task,
        load_format,
        device: Device::Cpu,
        seed: 7,
        tokenizer: None,
        gpu: Default::default(),
    }
}

/// Max abs difference over max abs of the reference.
pub fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / want.iter().map(|x| x.abs()).fold(0f32, f32::max)
}

/// A fixture folder's reference.json (transformers' logits and tokens).
pub fn reference(dir: &Path) -> serde_json::Value {
    let path = dir.join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn generator(l: Loaded) -> Box<dyn Generator> {
    match l.model {
        LoadedModel::Generator(g) => g,
        LoadedModel::Embedder(_) => panic!("expected a generator"),
    }
}

pub fn embedder(l: Loaded) -> Box<dyn Embedder> {
    match l.model {
        LoadedModel::Embedder(e) => e,
        LoadedModel::Generator(_) => panic!("expected an embedder"),
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.5,
    masked: &[],
};

/// A block table that is deliberately not in order: blocks of a sequence are scattered.
pub fn scattered_table(n: usize, offset: u32, num_blocks: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7 + offset) % num_blocks)
        .collect()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Logits of the last position of `ids` after feeding it in `chunks` (sizes), each chunk
/// one step, with the given block table.
pub fn chunked_logits(
    g: &mut dyn Generator,
    ids: &[u32],
    chunks: &[usize],
    table: &[u32],
) -> Vec<f32> {
    let mut pos = 0;
    let mut out = Vec::new();
    for &n in chunks {
        let last = pos + n == ids.len();
        let seq = SeqStep {
            tokens: &ids[pos..pos + n],
            start_pos: pos,
            block_table: table,
            sample: last.then_some(GREEDY),
        };
        let l = g.step_logits(&[seq]).unwrap();
        assert_eq!(l.len(), usize::from(last));
        out = l.into_iter().next().unwrap_or_default();
        pos += n;
    }
    assert_eq!(pos, ids.len());
    out
}

/// Two sequences in one step (a prefill chunk of `ids` with 20 tokens of prior context, and
/// one decode token of another prompt) against each alone: returns (the batched `ids`
/// logits, the batched other's logits, the other's logits alone), for the caller to
/// compare with its own measure. Uses block tables at offsets 2, 50 and 60 of 97 blocks.
pub fn two_in_one_step(g: &mut dyn Generator, ids: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t1 = scattered_table(10, 2, 97);
    let t2 = scattered_table(10, 50, 97);
    chunked_logits(g, &ids[..20], &[20], &t1);
    let other: Vec<u32> = (0..9u32).map(|i| (i * 13 + 1) % 256).collect();
    chunked_logits(g, &other[..8], &[8], &t2);
    let batch = g
        .step_logits(&[
            SeqStep {
                tokens: &ids[20..],
                start_pos: 20,
                block_table: &t1,
                sample: Some(GREEDY),
            },
            SeqStep {
                tokens: &other[8..],
                start_pos: 8,
                block_table: &t2,
                sample: Some(GREEDY),
            },
        ])
        .unwrap();
    let alone = chunked_logits(g, &other, &[9], &scattered_table(10, 60, 97));
    let mut batch = batch.into_iter();
    (batch.next().unwrap(), batch.next().unwrap(), alone)
}

/// Token by token through the decode path with block table `table`: the argmax at every
/// position of `ids` is `want`'s.
pub fn assert_argmax_per_position(
    g: &mut dyn Generator,
    ids: &[u32],
    table: &[u32],
    want: &[u32],
    what: &str,
) {
    for (p, t) in ids.iter().enumerate() {
        let seq = SeqStep {
            tokens: std::slice::from_ref(t),
            start_pos: p,
            block_table: table,
            sample: Some(GREEDY),
        };
        let l = g.step_logits(&[seq]).unwrap().remove(0);
        assert_eq!(argmax(&l), want[p], "{what}: argmax at position {p}");
    }
}

/// Greedy generation of `n` tokens after `ids`: the prefill samples the first, decode
/// steps the rest, in a scattered block table of its own.
pub fn greedy_tokens(g: &mut dyn Generator, ids: &[u32], n: usize) -> Vec<u32> {
    let table = scattered_table((ids.len() + 8).div_ceil(4), 11, 61);
    let seq = SeqStep {
        tokens: ids,
        start_pos: 0,
        block_table: &table,
        sample: Some(GREEDY),
    };
    let mut got = vec![g.step(&[seq]).unwrap()[0]];
    while got.len() < n {
        let pos = ids.len() + got.len() - 1;
        let last = [*got.last().unwrap()];
        let seq = SeqStep {
            tokens: &last,
            start_pos: pos,
            block_table: &table,
            sample: Some(GREEDY),
        };
        got.push(g.step(&[seq]).unwrap()[0]);
    }
    got
}
