//! Times the raw model forward on the CPU backend, without HTTP or the scheduler: prefill
//! and decode throughput of a Qwen3 generator, and MiniLM embedding throughput. The
//! serving benchmark (through `colocate serve` and `colocate bench`) is the one users
//! see; this isolates the model side.
//!
//! `cargo run --release -p engine --example forward_bench -- [MODEL] [MINILM_DIR]`
//! (MODEL defaults to `preset:qwen3-tiny`, with dummy weights for presets).

use std::time::Instant;

use engine::load::{load, Device, LoadFormat, LoadOptions, LoadedModel};
use engine::model_api::{SampleSpec, SeqStep, Task};

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| "preset:qwen3-tiny".into());
    let minilm = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "models/all-minilm-l6-v2".into());
    let load_format = if model.starts_with("preset:") {
        LoadFormat::Dummy
    } else {
        LoadFormat::Auto
    };
    let opts = LoadOptions {
        model: model.clone(),
        task: Some(Task::Generate),
        load_format,
        device: Device::Cpu,
        seed: 0,
        tokenizer: None,
        gpu: Default::default(),
    };
    let t = Instant::now();
    let LoadedModel::Generator(mut g) = load(&opts)?.model else {
        anyhow::bail!("not a generator")
    };
    println!(
        "{model}: loaded in {:.2}s, threads {}",
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );

    let (batch, prompt, gen, block) = (32usize, 128usize, 64usize, 16usize);
    let blocks_per_seq = (prompt + gen).div_ceil(block);
    g.init_kv_cache(batch * blocks_per_seq, block)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..blocks_per_seq)
                .map(|b| (b * batch + s) as u32)
                .collect()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt)
                .map(|i| ((s * 7 + i * 13) % 250) as u32)
                .collect()
        })
        .collect();

    // Prefill: 4 sequences per step (512 tokens), as a chunked-prefill scheduler would batch them.
    let t = Instant::now();
    let mut last = vec![0u32; batch];
    for chunk in (0..batch).collect::<Vec<_>>().chunks(4) {
        let seqs: Vec<SeqStep> = chunk
            .iter()
            .map(|&s| SeqStep {
                tokens: &prompts[s],
                start_pos: 0,
                block_table: &tables[s],
                sample: Some(GREEDY),
            })
            .collect();
        for (&s, tok) in chunk.iter().zip(g.step(&seqs)?) {
            last[s] = tok;
        }
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "prefill: {batch} x {prompt} tokens in {dt:.3}s = {:.0} tok/s",
        (batch * prompt) as f64 / dt
    );

    // Decode: the whole batch, one token per sequence per step.
    let t = Instant::now();
    for step in 0..gen - 1 {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let seqs: Vec<SeqStep> = (0..batch)
            .map(|s| SeqStep {
                tokens: &toks[s],
                start_pos: prompt + step,
                block_table: &tables[s],
                sample: Some(GREEDY),
            })
            .collect();
        last = g.step(&seqs)?;
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "decode: batch {batch}, {} steps in {dt:.3}s = {:.0} tok/s ({:.2} ms/step)",
        gen - 1,
        (batch * (gen - 1)) as f64 / dt,
        dt * 1e3 / (gen - 1) as f64
    );

    if std::path::Path::new(&minilm)
        .join("model.safetensors")
        .exists()
    {
        let opts = LoadOptions {
            model: minilm.clone(),
            task: None,
            load_format: LoadFormat::Auto,
            device: Device::Cpu,
            seed: 0,
            tokenizer: None,
            gpu: Default::default(),
        };
        let loaded = load(&opts)?;
        let LoadedModel::Embedder(mut e) = loaded.model else {
            anyhow::bail!("not an embedder")
        };
        let text =
            "Embedding models map sentences to vectors whose cosine similarity reflects meaning.";
        let ids = loaded.tokenizer.encode(text, true)?;
        let inputs: Vec<&[u32]> = (0..64).map(|_| ids.as_slice()).collect();
        e.embed(&inputs)?;
        let t = Instant::now();
        let rounds = 5;
        for _ in 0..rounds {
            e.embed(&inputs)?;
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "minilm: batch 64 x {} tokens, {:.0} seq/s ({:.0} tok/s)",
            ids.len(),
            (64 * rounds) as f64 / dt,
            (64 * rounds * ids.len()) as f64 / dt
        );
    }
    Ok(())
}
