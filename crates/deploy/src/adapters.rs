//! Engine adapters: the exact command line of each engine kind.
//!
//! Each engine has its own flag for "how much memory", with its own meaning; the plan
//! computes the numbers ([`MemoryFlag`]) and this module spells them the way each program
//! wants them. Golden tests at the bottom pin every kind's command line.

use crate::spec::{EngineKind, EngineSpec, Task};
use crate::vllm::{self, VllmVersion};

/// The memory setting of one engine in its own units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryFlag {
    /// No budget: the engine's default.
    None,
    /// vLLM / built-in on CUDA: `--gpu-memory-utilization`, a fraction of the GPU's total.
    GpuMemoryUtilization(f64),
    /// SGLang: `--mem-fraction-static`, a fraction of the memory free when it starts.
    MemFractionStatic(f64),
    /// TEI: `--max-batch-tokens` and `--max-client-batch-size`.
    TeiBatch {
        max_batch_tokens: u64,
        max_client_batch_size: u64,
    },
    /// Built-in on CPU: `--kv-cache-memory` bytes.
    KvCacheMemory(u64),
}

/// What an adapter needs besides the spec.
#[derive(Debug, Clone)]
pub struct CommandInput<'a> {
    pub engine: &'a EngineSpec,
    /// Port of this replica.
    pub port: u16,
    /// `cpu` or `cuda` (built-in engine only).
    pub device: &'a str,
    pub memory: MemoryFlag,
    /// argv[0] of the built-in engine (the `colocate` binary).
    pub colocate_bin: &'a str,
    /// vLLM: the version the command line is written for.
    pub vllm_version: VllmVersion,
    /// Workers across the engine's GPUs (vLLM `--tensor-parallel-size`, SGLang
    /// `--tp-size`; written only above 1, which is each engine's default).
    pub tensor_parallel_size: u32,
}

/// Formats a fraction the way engines print them: at most 4 decimals, no trailing zeros.
pub fn fraction(f: f64) -> String {
    let s = format!("{:.4}", f);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// The command line of one replica.
pub fn command_line(input: &CommandInput<'_>) -> Vec<String> {
    let e = input.engine;
    let port = input.port.to_string();
    let s = |x: &str| x.to_string();
    let mut cmd: Vec<String> = match e.kind {
        EngineKind::Builtin => {
            let mut c = vec![
                s(input.colocate_bin),
                s("serve"),
                s("--model"),
                e.model.clone(),
                s("--task"),
                e.task.to_string(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port.clone(),
                s("--device"),
                s(input.device),
                s("--served-model-name"),
                s(e.served_name()),
            ];
            if let Some(f) = &e.load_format {
                c.extend([s("--load-format"), f.clone()]);
            }
            if let Some(t) = &e.tokenizer {
                c.extend([s("--tokenizer"), t.clone()]);
            }
            c.extend(scheduler_flags(e));
            c
        }
        EngineKind::Vllm => vllm_command(e, &port, input.vllm_version, input.tensor_parallel_size),
        EngineKind::Sglang => {
            let mut c = vec![
                s("python3"),
                s("-m"),
                s("sglang.launch_server"),
                s("--model-path"),
                e.model.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port.clone(),
                s("--served-model-name"),
                s(e.served_name()),
            ];
            if e.task == Task::Embed {
                c.push(s("--is-embedding"));
            }
            if input.tensor_parallel_size > 1 {
                c.extend([s("--tp-size"), input.tensor_parallel_size.to_string()]);
            }
            if let Some(f) = &e.load_format {
                c.extend([s("--load-format"), f.clone()]);
            }
            if let Some(t) = &e.tokenizer {
                c.extend([s("--tokenizer-path"), t.clone()]);
            }
            c
        }
        EngineKind::Tei => vec![
            s("text-embeddings-router"),
            s("--model-id"),
            e.model.clone(),
            s("--hostname"),
            s("127.0.0.1"),
            s("--port"),
            port.clone(),
            s("--served-model-name"),
            s(e.served_name()),
        ],
        EngineKind::Command => e
            .command
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                a.replace("{port}", &port)
                    .replace("{model}", &e.model)
                    .replace("{name}", e.served_name())
            })
            .collect(),
    };
    match input.memory {
        MemoryFlag::None => {}
        MemoryFlag::GpuMemoryUtilization(f) => {
            cmd.extend([s("--gpu-memory-utilization"), fraction(f)])
        }
        MemoryFlag::MemFractionStatic(f) => cmd.extend([s("--mem-fraction-static"), fraction(f)]),
        MemoryFlag::TeiBatch {
            max_batch_tokens,
            max_client_batch_size,
        } => cmd.extend([
            s("--max-batch-tokens"),
            max_batch_tokens.to_string(),
            s("--max-client-batch-size"),
            max_client_batch_size.to_string(),
        ]),
        MemoryFlag::KvCacheMemory(b) => cmd.extend([s("--kv-cache-memory"), b.to_string()]),
    }
    cmd.extend(e.args.iter().map(|a| a.replace("{port}", &port)));
    cmd
}

/// `--max-num-seqs`, `--max-model-len`, `--max-num-batched-tokens` when the spec sets
/// them (the same names and meaning in vLLM and the built-in engine).
fn scheduler_flags(e: &EngineSpec) -> Vec<String> {
    let mut c = Vec::new();
    for (flag, v) in [
        ("--max-model-len", e.max_model_len),
        ("--max-num-seqs", e.max_num_seqs),
        ("--max-num-batched-tokens", e.max_num_batched_tokens),
    ] {
        if let Some(v) = v {
            c.extend([flag.to_string(), v.to_string()]);
        }
    }
    c
}

/// `<launcher> serve MODEL ...` for the vLLM version in use (before the memory flag and
/// the spec's `args`). Flags a version lacks are left out here and reported by the plan.
fn vllm_command(e: &EngineSpec, port: &str, v: VllmVersion, tp: u32) -> Vec<String> {
    let s = |x: &str| x.to_string();
    let mut c = vllm::launcher(e);
    c.extend([
        s("serve"),
        e.model.clone(),
        s("--host"),
        s("127.0.0.1"),
        s("--port"),
        s(port),
        s("--served-model-name"),
        s(e.served_name()),
    ]);
    if e.task == Task::Embed {
        c.extend(vllm::embed_flags(v).iter().map(|f| s(f)));
    }
    if tp > 1 {
        c.extend([s(vllm::TENSOR_PARALLEL_SIZE_FLAG), tp.to_string()]);
    }
    if let Some(f) = &e.load_format {
        c.extend([s("--load-format"), f.clone()]);
    }
    if let Some(t) = &e.tokenizer {
        c.extend([s("--tokenizer"), t.clone()]);
    }
    c.extend(scheduler_flags(e));
    if let (Some(b), true) = (
        &e.attention_backend,
        v >= vllm::ATTENTION_BACKEND_FLAG_SINCE,
    ) {
        c.extend([s("--attention-backend"), b.clone()]);
    }
    if let (Some(n), true) = (e.api_server_count, v >= vllm::API_SERVER_COUNT_SINCE) {
        c.extend([s("--api-server-count"), n.to_string()]);
    }
    if let (Some(b), true) = (e.kv_cache_memory, v >= vllm::KV_CACHE_MEMORY_BYTES_SINCE) {
        c.extend([s("--kv-cache-memory-bytes"), b.to_string()]);
    }
    c
}

/// Environment an engine needs for what its version takes from the environment rather
/// than a flag (vLLM before 0.14 reads the attention backend from `VLLM_ATTENTION_BACKEND`).
pub fn engine_env(e: &EngineSpec, v: VllmVersion) -> Vec<(String, String)> {
    match (&e.attention_backend, e.kind) {
        (Some(b), EngineKind::Vllm) if v < vllm::ATTENTION_BACKEND_FLAG_SINCE => {
            vec![("VLLM_ATTENTION_BACKEND".to_string(), b.clone())]
        }
        _ => Vec::new(),
    }
}

/// Whether an engine of this kind counts as started only once its `/v1/models` lists the
/// served model, after `/health` answers 200. vLLM: its API server and engine core are
/// separate processes; the model listing proves the served name is the one clients use.
pub fn ready_needs_model_listing(kind: EngineKind) -> bool {
    kind == EngineKind::Vllm
}

/// True when an OpenAI `/v1/models` body (`{"data": [{"id": ...}, ...]}`) lists `model`.
pub fn models_list_has(body: &[u8], model: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Listing {
        data: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
    }
    serde_json::from_slice::<Listing>(body)
        .map(|l| l.data.iter().any(|e| e.id == model))
        .unwrap_or(false)
}

/// Quotes one word for a POSIX shell when it needs it.
pub fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// A command line with its environment, as one shell line.
pub fn shell_line(env: &[(String, String)], cmd: &[String]) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}={}", shell_word(v)))
        .chain(cmd.iter().map(|w| shell_word(w)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(kind: EngineKind, model: &str, task: Task) -> EngineSpec {
        EngineSpec {
            name: "e".into(),
            kind,
            model: model.into(),
            task,
            port: 8001,
            ..Default::default()
        }
    }

    fn line_for(e: &EngineSpec, device: &str, memory: MemoryFlag, v: &str) -> String {
        command_line(&CommandInput {
            engine: e,
            port: e.port,
            device,
            memory,
            colocate_bin: "colocate",
            vllm_version: VllmVersion::parse(v).unwrap(),
            tensor_parallel_size: 1,
        })
        .join(" ")
    }

    fn line(e: &EngineSpec, device: &str, memory: MemoryFlag) -> String {
        line_for(e, device, memory, "0.26.0")
    }

    #[test]
    fn vllm_golden() {
        let mut e = engine(EngineKind::Vllm, "Qwen/Qwen3-8B", Task::Generate);
        e.served_model_name = Some("gen".into());
        e.args = vec!["--max-num-seqs".into(), "256".into()];
        assert_eq!(
            line(&e, "cuda", MemoryFlag::GpuMemoryUtilization(0.55)),
            "vllm serve Qwen/Qwen3-8B --host 127.0.0.1 --port 8001 --served-model-name gen \
             --gpu-memory-utilization 0.55 --max-num-seqs 256"
        );
        let e = engine(EngineKind::Vllm, "Qwen/Qwen3-Embedding-8B", Task::Embed);
        assert_eq!(
            line(&e, "cuda", MemoryFlag::GpuMemoryUtilization(0.3)),
            "vllm serve Qwen/Qwen3-Embedding-8B --host 127.0.0.1 --port 8001 \
             --served-model-name Qwen/Qwen3-Embedding-8B --runner pooling --convert embed \
             --gpu-memory-utilization 0.3"
        );
    }

    /// `tokenizer` is each engine's own flag: `--tokenizer` for the built-in engine (a
    /// preset with the real model's tokenizer) and vLLM, `--tokenizer-path` for SGLang.
    #[test]
    fn the_tokenizer_field_is_each_engines_flag() {
        let with = |kind, model: &str| {
            let mut e = engine(kind, model, Task::Generate);
            e.tokenizer = Some("/tmp/vllm-models/qwen3-30b-a3b-fp8".into());
            line(&e, "cuda", MemoryFlag::None)
        };
        assert_eq!(
            with(EngineKind::Builtin, "preset:qwen3-30b-a3b-fp8"),
            "colocate serve --model preset:qwen3-30b-a3b-fp8 --task generate --host 127.0.0.1 \
             --port 8001 --device cuda --served-model-name preset:qwen3-30b-a3b-fp8 \
             --tokenizer /tmp/vllm-models/qwen3-30b-a3b-fp8"
        );
        assert!(with(EngineKind::Vllm, "m")
            .ends_with("--served-model-name m --tokenizer /tmp/vllm-models/qwen3-30b-a3b-fp8"));
        assert!(with(EngineKind::Sglang, "m")
            .ends_with(" --tokenizer-path /tmp/vllm-models/qwen3-30b-a3b-fp8"));
    }

    /// The seeds' pair with every vLLM option the spec has, per version: 0.26 (the H200),
    /// 0.15.1 (the seeds' own runs), 0.10.0 (before `--runner`/`--convert`).
    #[test]
    fn vllm_golden_per_version() {
        let mut e = engine(
            EngineKind::Vllm,
            "/tmp/vllm-models/qwen3-embedding-8b",
            Task::Embed,
        );
        e.served_model_name = Some("embed".into());
        e.launcher = Some(vec![
            "python3".into(),
            "-m".into(),
            "vllm.entrypoints.cli.main".into(),
        ]);
        e.load_format = Some("dummy".into());
        e.max_model_len = Some(512);
        e.max_num_seqs = Some(512);
        e.max_num_batched_tokens = Some(16384);
        e.attention_backend = Some("FLASH_ATTN".into());
        e.api_server_count = Some(2);
        e.kv_cache_memory = Some(8 << 30);
        let m = MemoryFlag::GpuMemoryUtilization(0.3);
        let head =
            "python3 -m vllm.entrypoints.cli.main serve /tmp/vllm-models/qwen3-embedding-8b \
                    --host 127.0.0.1 --port 8001 --served-model-name embed";
        let sched = "--load-format dummy --max-model-len 512 --max-num-seqs 512 \
                     --max-num-batched-tokens 16384";
        assert_eq!(
            line_for(&e, "cuda", m, "0.26.0"),
            format!(
                "{head} --runner pooling --convert embed {sched} --attention-backend FLASH_ATTN \
                 --api-server-count 2 --kv-cache-memory-bytes 8589934592 --gpu-memory-utilization 0.3"
            )
        );
        assert_eq!(
            line_for(&e, "cuda", m, "0.15.1"),
            format!(
                "{head} --runner pooling --convert embed {sched} --attention-backend FLASH_ATTN \
                 --api-server-count 2 --kv-cache-memory-bytes 8589934592 --gpu-memory-utilization 0.3"
            )
        );
        // 0.10.0: --task embed; the attention backend moves to the environment; no
        // --kv-cache-memory-bytes yet (the plan notes it).
        assert_eq!(
            line_for(&e, "cuda", m, "0.10.0"),
            format!(
                "{head} --task embed {sched} --api-server-count 2 --gpu-memory-utilization 0.3"
            )
        );
        assert_eq!(
            engine_env(&e, VllmVersion::parse("0.10.0").unwrap()),
            vec![(
                "VLLM_ATTENTION_BACKEND".to_string(),
                "FLASH_ATTN".to_string()
            )]
        );
        assert!(engine_env(&e, VllmVersion::parse("0.26").unwrap()).is_empty());
    }

    #[test]
    fn sglang_golden() {
        let e = engine(EngineKind::Sglang, "Qwen/Qwen3-Embedding-0.6B", Task::Embed);
        assert_eq!(
            line(&e, "cuda", MemoryFlag::MemFractionStatic(0.6667)),
            "python3 -m sglang.launch_server --model-path Qwen/Qwen3-Embedding-0.6B --host 127.0.0.1 \
             --port 8001 --served-model-name Qwen/Qwen3-Embedding-0.6B --is-embedding --mem-fraction-static 0.6667"
        );
    }

    #[test]
    fn tei_golden() {
        let e = engine(EngineKind::Tei, "BAAI/bge-small-en-v1.5", Task::Embed);
        assert_eq!(
            line(&e, "cuda", MemoryFlag::TeiBatch { max_batch_tokens: 16384, max_client_batch_size: 32 }),
            "text-embeddings-router --model-id BAAI/bge-small-en-v1.5 --hostname 127.0.0.1 --port 8001 \
             --served-model-name BAAI/bge-small-en-v1.5 --max-batch-tokens 16384 --max-client-batch-size 32"
        );
    }

    #[test]
    fn builtin_takes_the_scheduler_limits() {
        let mut e = engine(EngineKind::Builtin, "preset:qwen3-8b", Task::Generate);
        e.max_num_seqs = Some(256);
        e.max_model_len = Some(4096);
        assert_eq!(
            line(&e, "cuda", MemoryFlag::GpuMemoryUtilization(0.5)),
            "colocate serve --model preset:qwen3-8b --task generate --host 127.0.0.1 --port 8001 \
             --device cuda --served-model-name preset:qwen3-8b --max-model-len 4096 --max-num-seqs 256 \
             --gpu-memory-utilization 0.5"
        );
    }

    #[test]
    fn builtin_golden() {
        let mut e = engine(EngineKind::Builtin, "preset:qwen3-tiny", Task::Generate);
        e.load_format = Some("dummy".into());
        e.served_model_name = Some("tiny".into());
        assert_eq!(
            line(&e, "cpu", MemoryFlag::KvCacheMemory(1 << 20)),
            "colocate serve --model preset:qwen3-tiny --task generate --host 127.0.0.1 --port 8001 \
             --device cpu --served-model-name tiny --load-format dummy --kv-cache-memory 1048576"
        );
        assert_eq!(
            line(&e, "cuda", MemoryFlag::GpuMemoryUtilization(0.25)),
            "colocate serve --model preset:qwen3-tiny --task generate --host 127.0.0.1 --port 8001 \
             --device cuda --served-model-name tiny --load-format dummy --gpu-memory-utilization 0.25"
        );
    }

    #[test]
    fn command_substitutes_port_model_name() {
        let mut e = engine(EngineKind::Command, "m", Task::Generate);
        e.command = Some(vec![
            "my-server".into(),
            "--listen=127.0.0.1:{port}".into(),
            "{model}".into(),
            "{name}".into(),
        ]);
        e.served_model_name = Some("alias".into());
        assert_eq!(
            line(&e, "cpu", MemoryFlag::None),
            "my-server --listen=127.0.0.1:8001 m alias"
        );
    }

    #[test]
    fn vllm_readiness_reads_the_model_listing() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/vllm/v1-models-0.26.0.json");
        let body = std::fs::read(&p).unwrap();
        assert!(models_list_has(&body, "gen"));
        assert!(!models_list_has(&body, "embed"));
        assert!(!models_list_has(b"not json", "gen"));
        assert!(!models_list_has(br#"{"data":[]}"#, "gen"));
        assert!(ready_needs_model_listing(EngineKind::Vllm));
        assert!(!ready_needs_model_listing(EngineKind::Builtin));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_word("plain-arg_1.0"), "plain-arg_1.0");
        assert_eq!(shell_word("two words"), "'two words'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(
            shell_line(&[("A".into(), "1".into())], &["x".into(), "y z".into()]),
            "A=1 x 'y z'"
        );
    }
}
