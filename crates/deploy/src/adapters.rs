//! Engine adapters: the exact command line of each engine kind.
//!
//! Each engine has its own flag for "how much memory", with its own meaning; the plan
//! computes the numbers ([`MemoryFlag`]) and this module spells them the way each program
//! wants them. Golden tests at the bottom pin every kind's command line.

use crate::spec::{EngineKind, EngineSpec, Task};

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
            c
        }
        EngineKind::Vllm => {
            let mut c = vec![
                s("vllm"),
                s("serve"),
                e.model.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port.clone(),
            ];
            c.extend([s("--served-model-name"), s(e.served_name())]);
            if e.task == Task::Embed {
                c.extend([s("--task"), s("embed")]);
            }
            if let Some(f) = &e.load_format {
                c.extend([s("--load-format"), f.clone()]);
            }
            c
        }
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
            if let Some(f) = &e.load_format {
                c.extend([s("--load-format"), f.clone()]);
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

    fn line(e: &EngineSpec, device: &str, memory: MemoryFlag) -> String {
        command_line(&CommandInput {
            engine: e,
            port: e.port,
            device,
            memory,
            colocate_bin: "colocate",
        })
        .join(" ")
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
             --served-model-name Qwen/Qwen3-Embedding-8B --task embed --gpu-memory-utilization 0.3"
        );
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
