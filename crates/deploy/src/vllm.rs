//! vLLM, the engine of the seed studies: which version a launcher runs, which flags that
//! version knows, and the parts of its command line that changed between versions.
//!
//! vLLM renames and removes flags from release to release (`--task embed` became
//! `--runner pooling --convert embed` in 0.10.1 and was removed later; `--attention-backend`
//! and `--kv-cache-memory-bytes` are recent). A deployment therefore either pins the
//! version (`vllm_version = "0.26"`) or `up` asks the installed one (`<launcher>
//! --version`), and before anything starts every flag of every vLLM command line is looked
//! up in what that installation prints for `<launcher> serve --help=all`: a flag it does not
//! know is an error naming the engine, the field it came from and the flag, instead of an
//! engine that dies two minutes into its start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::spec::{DeploymentSpec, EngineKind, EngineSpec, ValidDeployment};

/// A vLLM release, `major.minor.patch` (a fourth part, `rcN`, `.postN` or `+local` are
/// ignored: flags do not change within a patch release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VllmVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl VllmVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> VllmVersion {
        VllmVersion {
            major,
            minor,
            patch,
        }
    }

    /// Parses `0.26`, `0.26.0`, `0.10.1.1`, `0.11.0rc2`, `0.8.5.post1`, `0.26.0+cu130`.
    pub fn parse(text: &str) -> Result<VllmVersion, String> {
        let t = text.trim().trim_start_matches('v');
        let t = t.split('+').next().unwrap_or_default();
        let mut parts = [0u32; 3];
        let mut n = 0;
        for piece in t.split('.').take(3) {
            let digits: String = piece.chars().take_while(|c| c.is_ascii_digit()).collect();
            if digits.is_empty() {
                break;
            }
            parts[n] = digits
                .parse()
                .map_err(|_| format!("`{text}` is not a vLLM version"))?;
            n += 1;
            if digits.len() != piece.len() {
                break; // `0rc2`: the rest is a pre-release tag
            }
        }
        if n < 2 {
            return Err(format!(
                "`{text}` is not a vLLM version: write major.minor, e.g. \"0.26\""
            ));
        }
        Ok(VllmVersion::new(parts[0], parts[1], parts[2]))
    }

    /// Same major and minor (a pin `0.26` accepts `0.26.1`).
    pub fn same_release(&self, other: &VllmVersion) -> bool {
        self.major == other.major && self.minor == other.minor
    }
}

impl fmt::Display for VllmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version command lines are written for when a deployment neither pins one nor lets
/// `up` detect it: the one installed on the H200 (`../shared/vllm/README.md`).
pub const DEFAULT_VERSION: VllmVersion = VllmVersion::new(0, 26, 0);

/// `--runner pooling --convert embed` replaced `--task embed` (vLLM 0.10.1).
pub const RUNNER_CONVERT_SINCE: VllmVersion = VllmVersion::new(0, 10, 1);
/// `--kv-cache-memory-bytes` (a KV cache of fixed size, not a fraction of the GPU).
pub const KV_CACHE_MEMORY_BYTES_SINCE: VllmVersion = VllmVersion::new(0, 11, 0);
/// `--attention-backend`; earlier releases read the `VLLM_ATTENTION_BACKEND` variable.
pub const ATTENTION_BACKEND_FLAG_SINCE: VllmVersion = VllmVersion::new(0, 14, 0);
/// `--api-server-count` (several front-end processes in front of one engine core).
pub const API_SERVER_COUNT_SINCE: VllmVersion = VllmVersion::new(0, 9, 0);

/// Tensor parallelism across the GPUs of `CUDA_VISIBLE_DEVICES`: in every release
/// colocate writes command lines for (0.8 on; `-tp` is its short form), checked against
/// the installation's `serve --help=all` like every other flag.
pub const TENSOR_PARALLEL_SIZE_FLAG: &str = "--tensor-parallel-size";

/// The flags that make an embedding server of a model with a generative architecture
/// (Qwen3-Embedding's config names `Qwen3ForCausalLM`).
pub fn embed_flags(v: VllmVersion) -> &'static [&'static str] {
    if v >= RUNNER_CONVERT_SINCE {
        &["--runner", "pooling", "--convert", "embed"]
    } else {
        &["--task", "embed"]
    }
}

/// How vLLM is started when the engine does not say: the `vllm` console script.
pub const DEFAULT_LAUNCHER: &[&str] = &["vllm"];

/// The argv prefix that runs vLLM's CLI for this engine (`serve` follows it).
pub fn launcher(e: &EngineSpec) -> Vec<String> {
    match &e.launcher {
        Some(l) if !l.is_empty() => l.clone(),
        _ => DEFAULT_LAUNCHER.iter().map(|s| s.to_string()).collect(),
    }
}

/// The option names an argv passes, in vLLM's normal form: `--max_num_seqs=8` and
/// `--max-num-seqs 8` are both `--max-num-seqs`; `--compilation-config.level 3` is
/// `--compilation-config`; values (including negative numbers) are skipped.
pub fn flags_in(argv: &[String]) -> Vec<String> {
    argv.iter()
        .filter_map(|a| normal_flag(a))
        .collect::<Vec<_>>()
}

/// The normal form of one argument if it is an option, as vLLM's `FlexibleArgumentParser`
/// sees it (underscores become dashes before the first `.` and `=`).
fn normal_flag(arg: &str) -> Option<String> {
    if let Some(rest) = arg.strip_prefix("--") {
        if rest.is_empty() {
            return None; // `--` ends the options
        }
        let key = rest.split(['=', '.']).next().unwrap_or_default();
        let key = key.trim_end_matches('+'); // `--json-arg.key+ value`
        return Some(format!("--{}", key.replace('_', "-")));
    }
    let rest = arg.strip_prefix('-')?;
    let first = rest.chars().next()?;
    if first.is_ascii_digit() || first == '.' {
        return None; // a negative number is a value
    }
    if let Some(level) = rest.strip_prefix('O') {
        // `-O3` / `-O=3`: vLLM rewrites it to `--optimization-level`
        if !level.is_empty() {
            return Some("--optimization-level".into());
        }
    }
    let key = rest.split(['=', '.']).next().unwrap_or_default();
    Some(format!("-{key}"))
}

/// The options one vLLM installation accepts, read from `serve --help=all`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownFlags {
    flags: BTreeSet<String>,
}

impl KnownFlags {
    /// Reads the option strings of argparse's help: every line indented by exactly two
    /// spaces that starts with `-` lists one action's option strings, separated by `, `,
    /// each followed by its metavar (`--max-model-len MAX_MODEL_LEN, -ml MAX_MODEL_LEN`;
    /// Python 3.13 writes `--max-model-len, -ml MAX_MODEL_LEN`). Help texts are indented
    /// further and the epilog's JSON examples by three spaces, so neither is read.
    pub fn parse_help(text: &str) -> KnownFlags {
        let mut flags = BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("  ") else {
                continue;
            };
            if !rest.starts_with('-') || rest.starts_with("- ") {
                continue;
            }
            // The invocation ends where two spaces separate it from the help text.
            let invocation = rest.split("  ").next().unwrap_or_default();
            for part in invocation.split(", ") {
                let word = part.split_whitespace().next().unwrap_or_default();
                let valid = word.len() > 1
                    && word.starts_with('-')
                    && word
                        .trim_start_matches('-')
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if valid && word.trim_start_matches('-').chars().next().is_some() {
                    flags.insert(word.to_string());
                }
            }
        }
        KnownFlags { flags }
    }

    /// How many options were read (a help text with none is not a help text).
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// True when argparse accepts this option: its exact name or, as argparse's
    /// `allow_abbrev` does, an unambiguous prefix of one long option.
    pub fn knows(&self, flag: &str) -> bool {
        if self.flags.contains(flag) {
            return true;
        }
        if !flag.starts_with("--") {
            return false;
        }
        self.flags
            .iter()
            .filter(|f| f.starts_with("--") && f.starts_with(flag))
            .count()
            == 1
    }

    /// The options of `argv` this installation does not know, in order, each once.
    pub fn unknown_in(&self, argv: &[String]) -> Vec<String> {
        let mut seen = BTreeSet::new();
        flags_in(argv)
            .into_iter()
            .filter(|f| !self.knows(f) && seen.insert(f.clone()))
            .collect()
    }

    /// The known option closest to `flag` (same words, fewest edits), for "did you mean".
    pub fn closest(&self, flag: &str) -> Option<&str> {
        self.flags
            .iter()
            .map(|f| (edit_distance(f, flag), f))
            .filter(|(d, _)| *d <= flag.len() / 3 + 1)
            .min()
            .map(|(_, f)| f.as_str())
    }
}

/// Levenshtein distance (short strings only: option names).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Which field of the deployment file put `flag` on an engine's command line.
pub fn field_of_flag(flag: &str, e: &EngineSpec) -> &'static str {
    if flags_in(&e.args).iter().any(|f| f == flag) {
        return "args";
    }
    match flag {
        "--task" | "--runner" | "--convert" => "task",
        "--load-format" => "load_format",
        "--tokenizer" => "tokenizer",
        "--served-model-name" => "served_model_name",
        "--host" | "--port" => "port",
        "--max-num-seqs" => "max_num_seqs",
        "--max-model-len" => "max_model_len",
        "--max-num-batched-tokens" => "max_num_batched_tokens",
        "--attention-backend" => "attention_backend",
        "--api-server-count" => "api_server_count",
        "--kv-cache-memory-bytes" => "kv_cache_memory",
        "--gpu-memory-utilization" => "memory",
        "--tensor-parallel-size" => "tensor_parallel_size",
        _ => "launcher",
    }
}

/// One vLLM installation as a launcher and environment reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// What `<launcher> --version` printed.
    pub version_text: String,
    pub version: VllmVersion,
    /// What `<launcher> serve --help=all` lists.
    pub flags: KnownFlags,
}

/// How long a probe may take: importing vLLM (and with it torch) takes 10-30 s cold.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `argv` with `env` added and returns its stdout; the error names the command and
/// ends with the last lines it printed.
async fn run_capture(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> anyhow::Result<String> {
    let (prog, args) = argv.split_first().context("empty launcher")?;
    let shown = crate::adapters::shell_line(&[], argv);
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "`{shown}` did not finish within {}",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| anyhow::anyhow!("cannot run `{shown}`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{shown}` failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(stdout)
}

/// The version a `--version` output names: its last non-empty line (vLLM may log before).
pub fn version_from_output(stdout: &str) -> Result<(String, VllmVersion), String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .ok_or_else(|| "printed nothing".to_string())?;
    let word = line.split_whitespace().last().unwrap_or(line);
    VllmVersion::parse(word).map(|v| (word.to_string(), v))
}

/// Asks one installation for its version and its `serve` flags.
/// Both commands run at once: each imports vLLM and torch, 10-30 s apiece.
pub async fn probe(launcher: &[String], env: &[(String, String)]) -> anyhow::Result<Install> {
    let mut version_argv = launcher.to_vec();
    version_argv.push("--version".into());
    let mut argv = launcher.to_vec();
    argv.extend(["serve".to_string(), "--help=all".to_string()]);
    let (out, help) = tokio::join!(
        run_capture(&version_argv, env, PROBE_TIMEOUT),
        run_capture(&argv, env, PROBE_TIMEOUT)
    );
    // a launcher that is not vLLM fails at `--version` first, whatever `serve` said
    let out = out?;
    let shown = crate::adapters::shell_line(&[], &version_argv);
    let (version_text, version) = version_from_output(&out)
        .map_err(|e| anyhow::anyhow!("`{shown}`: {e}; is this vLLM's CLI?"))?;
    let help = help?;
    let flags = KnownFlags::parse_help(&help);
    if flags.len() < 10 {
        bail!(
            "`{}` listed {} options: not vLLM's `serve --help=all`",
            crate::adapters::shell_line(&[], &argv),
            flags.len()
        );
    }
    Ok(Install {
        version_text,
        version,
        flags,
    })
}

/// The installation each vLLM engine runs, by engine name.
#[derive(Debug, Clone, Default)]
pub struct Installs {
    by_engine: BTreeMap<String, Install>,
}

impl Installs {
    /// Records what `probe` found for an engine (also used by tests with recorded text).
    pub fn insert(&mut self, engine: &str, install: Install) {
        self.by_engine.insert(engine.to_string(), install);
    }

    pub fn get(&self, engine: &str) -> Option<&Install> {
        self.by_engine.get(engine)
    }

    /// The versions the plan writes command lines for.
    pub fn versions(&self) -> BTreeMap<String, VllmVersion> {
        self.by_engine
            .iter()
            .map(|(k, v)| (k.clone(), v.version))
            .collect()
    }
}

/// Probes the installation of every vLLM engine (once per distinct launcher and
/// environment) and checks each pinned `vllm_version` against it. No vLLM engine: no probe.
pub async fn probe_all(spec: &DeploymentSpec) -> anyhow::Result<Installs> {
    // One probe per launcher and environment: engines sharing them share an installation.
    // Distinct ones are asked at once, and each only once per process (`PROBED`).
    let mut reaches: BTreeMap<Reach, usize> = BTreeMap::new();
    for (i, e) in spec.engines.iter().enumerate() {
        if e.kind == EngineKind::Vllm {
            reaches.entry(reach(e)).or_insert(i);
        }
    }
    let probes = reaches.iter().map(|(key, &i)| async move {
        if let Some(found) = PROBED.lock().get(key) {
            return Ok((key.clone(), found.clone()));
        }
        let found = probe(&key.0, &key.1).await.with_context(|| {
            format!(
                "engines[{i}].launcher ({}): asking vLLM",
                spec.engines[i].name
            )
        })?;
        PROBED.lock().insert(key.clone(), found.clone());
        anyhow::Ok((key.clone(), found))
    });
    let found: BTreeMap<Reach, Install> = futures::future::try_join_all(probes)
        .await?
        .into_iter()
        .collect();
    let mut installs = Installs::default();
    for (i, e) in spec.engines.iter().enumerate() {
        if e.kind != EngineKind::Vllm {
            continue;
        }
        let key = reach(e);
        let install = found[&key].clone();
        if let Some(pin) = &e.vllm_version {
            let want = VllmVersion::parse(pin)
                .map_err(|why| anyhow::anyhow!("engines[{i}].vllm_version: {why}"))?;
            if !want.same_release(&install.version) {
                bail!(
                    "engines[{i}].vllm_version: pinned {pin} but `{} --version` runs {}",
                    crate::adapters::shell_line(&[], &key.0),
                    install.version_text
                );
            }
        }
        installs.insert(&e.name, install);
    }
    Ok(installs)
}

/// How an engine reaches its vLLM: the launcher and the environment added to it.
type Reach = (Vec<String>, Vec<(String, String)>);

fn reach(e: &EngineSpec) -> Reach {
    let env = e.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    (launcher(e), env)
}

/// What this process's probes found. A lab run starts a deployment for each group of
/// conditions, and asking vLLM again each time cost ~100 s per start on the H200 machine;
/// an installation is assumed not to change while one `colocate` runs. Failures are not
/// kept: a fixed launcher is asked again.
static PROBED: parking_lot::Mutex<BTreeMap<Reach, Install>> =
    parking_lot::Mutex::new(BTreeMap::new());

/// Checks every vLLM command line of a plan against the flags its installation knows.
/// Errors list each unknown flag with the field it came from and a close known one.
pub fn check_flags(
    spec: &DeploymentSpec,
    plan: &crate::plan::Plan,
    installs: &Installs,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for p in plan.engines.iter().filter(|p| p.kind == EngineKind::Vllm) {
        let Some((i, e)) = spec
            .engines
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == p.engine)
        else {
            continue;
        };
        let Some(install) = installs.get(&e.name) else {
            continue;
        };
        // Only what follows `serve` is vLLM's serve parser's business.
        let after_serve = p
            .command
            .iter()
            .position(|a| a == "serve")
            .map(|k| &p.command[k + 1..])
            .unwrap_or(&p.command[..]);
        for flag in install.flags.unknown_in(after_serve) {
            let hint = install
                .flags
                .closest(&flag)
                .map(|c| format!(" (did you mean {c}?)"))
                .unwrap_or_default();
            problems.push(format!(
                "engines[{i}].{}: vLLM {} ({}) does not know {flag}{hint}",
                field_of_flag(&flag, e),
                install.version_text,
                p.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// The plan `up` runs: command lines for the vLLM each engine really has, every flag of
/// them known to it. Without vLLM engines this is just [`crate::plan::plan`].
pub async fn plan_checked(
    deployment: &ValidDeployment,
    gpu: Option<&crate::plan::GpuFacts>,
) -> anyhow::Result<crate::plan::Plan> {
    let spec = deployment.spec();
    let installs = probe_all(spec).await?;
    let plan = crate::plan::plan_with(deployment, gpu, &installs.versions())?;
    check_flags(spec, &plan, &installs)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded_help() -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/vllm/serve-help-all-0.26.0.txt");
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn versions_parse_and_order() {
        let v = |s: &str| VllmVersion::parse(s).unwrap();
        assert_eq!(v("0.26"), VllmVersion::new(0, 26, 0));
        assert_eq!(v("0.26.0+cu130"), VllmVersion::new(0, 26, 0));
        assert_eq!(v("0.10.1.1"), VllmVersion::new(0, 10, 1));
        assert_eq!(v("0.11.0rc2"), VllmVersion::new(0, 11, 0));
        assert_eq!(v("v0.8.5.post1"), VllmVersion::new(0, 8, 5));
        assert!(v("0.10.0") < RUNNER_CONVERT_SINCE && v("0.15.1") > RUNNER_CONVERT_SINCE);
        assert!(v("0.26").same_release(&v("0.26.3")));
        for bad in ["", "26", "latest", "x.1"] {
            assert!(VllmVersion::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn embed_flags_follow_the_version() {
        let v = |s: &str| VllmVersion::parse(s).unwrap();
        assert_eq!(embed_flags(v("0.8.5")), ["--task", "embed"]);
        assert_eq!(embed_flags(v("0.10.0")), ["--task", "embed"]);
        let new = ["--runner", "pooling", "--convert", "embed"];
        assert_eq!(embed_flags(v("0.10.1")), new);
        assert_eq!(embed_flags(v("0.15.1")), new);
        assert_eq!(embed_flags(v("0.26.0")), new);
    }

    #[test]
    fn flags_are_read_in_vllms_normal_form() {
        let argv: Vec<String> = [
            "Qwen/Qwen3-8B",
            "--max_num_seqs=8",
            "--max-model-len",
            "-1",
            "--compilation-config.level",
            "3",
            "-tp",
            "2",
            "-O3",
            "--json-arg.key4+",
            "x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            flags_in(&argv),
            [
                "--max-num-seqs",
                "--max-model-len",
                "--compilation-config",
                "-tp",
                "--optimization-level",
                "--json-arg"
            ]
        );
    }

    #[test]
    fn the_recorded_help_lists_the_flags_colocate_uses() {
        let known = KnownFlags::parse_help(&recorded_help());
        for f in [
            "--host",
            "--port",
            "--served-model-name",
            "--runner",
            "--convert",
            "--load-format",
            "--gpu-memory-utilization",
            "--kv-cache-memory-bytes",
            "--max-num-seqs",
            "--max-model-len",
            "--max-num-batched-tokens",
            "--attention-backend",
            "--api-server-count",
            "-asc",
            "-tp",
            TENSOR_PARALLEL_SIZE_FLAG,
            "--enable-prefix-caching",
            "--no-enable-prefix-caching",
            "-h",
            "--help",
        ] {
            assert!(known.knows(f), "{f} not read from the help text");
        }
        // 0.26 has no --task; the JSON tip of the epilog is not an option.
        assert!(!known.knows("--task"));
        assert!(!known.knows("--json-arg"));
        // argparse's abbreviation: a unique prefix of one long option is accepted.
        assert!(known.knows("--kv-cache-memory"));
        assert!(!known.knows("--max-num")); // ambiguous
    }

    #[test]
    fn unknown_flags_are_named_with_a_hint() {
        let known = KnownFlags::parse_help(&recorded_help());
        let argv: Vec<String> = [
            "m",
            "--task",
            "embed",
            "--max-num-seq",
            "1",
            "--gpu-memory-utilisation",
            "0.5",
            "--port",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // `--max-num-seq` is a unique prefix of --max-num-seqs: argparse accepts it.
        assert_eq!(
            known.unknown_in(&argv),
            ["--task", "--gpu-memory-utilisation"]
        );
        assert_eq!(
            known.closest("--gpu-memory-utilisation"),
            Some("--gpu-memory-utilization")
        );
        assert_eq!(known.closest("--zzzzzzzzzzzz"), None);
    }

    #[test]
    fn version_output_may_follow_log_lines() {
        let out =
            "INFO 11-30 10:00:00 [__init__.py:216] Automatically detected platform cuda.\n0.26.0\n";
        assert_eq!(
            version_from_output(out).unwrap(),
            ("0.26.0".to_string(), VllmVersion::new(0, 26, 0))
        );
        assert!(version_from_output("\n").is_err());
        assert!(version_from_output("usage: foo\n").is_err());
    }

    /// A fake launcher: a shell script that prints a version and a help text.
    fn fake_vllm(dir: &std::path::Path, version: &str) -> Vec<String> {
        let help = dir.join("help.txt");
        std::fs::write(&help, recorded_help()).unwrap();
        let script = dir.join("fake-vllm.sh");
        std::fs::write(
            &script,
            format!(
                "case \"$1\" in\n  --version) echo 'INFO starting'; echo {version} ;;\n  serve) cat {} ;;\n  *) exit 2 ;;\nesac\n",
                help.display()
            ),
        )
        .unwrap();
        vec!["sh".into(), script.display().to_string()]
    }

    fn vllm_spec(launcher: Vec<String>, pin: Option<&str>, args: &[&str]) -> ValidDeployment {
        let spec = crate::spec::DeploymentSpec {
            gpu: crate::spec::GpuSelector::Index(0),
            gpu_name: Some("H200".into()),
            engines: vec![EngineSpec {
                name: "embed".into(),
                kind: EngineKind::Vllm,
                model: "Qwen/Qwen3-Embedding-8B".into(),
                task: crate::spec::Task::Embed,
                port: 8200,
                memory: Some(crate::spec::MemoryBudget::Fraction(0.3)),
                launcher: Some(launcher),
                vllm_version: pin.map(String::from),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        crate::spec::validate(spec).unwrap()
    }

    #[tokio::test]
    async fn plan_checked_uses_the_detected_version_and_refuses_unknown_flags() {
        let dir = tempfile::tempdir().unwrap();
        let l = fake_vllm(dir.path(), "0.26.0");
        let plan = plan_checked(&vllm_spec(l.clone(), None, &[]), None)
            .await
            .unwrap();
        let line = plan.engines[0].command.join(" ");
        assert!(line.contains("--runner pooling --convert embed"), "{line}");
        assert!(!line.contains("--task"), "{line}");

        let e = plan_checked(
            &vllm_spec(l.clone(), None, &["--disable-log-requests"]),
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("engines[0].args: vLLM 0.26.0 (embed) does not know --disable-log-requests"),
            "{e}"
        );

        let e = plan_checked(&vllm_spec(l, Some("0.15"), &[]), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("engines[0].vllm_version: pinned 0.15 but") && e.contains("runs 0.26.0"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_installation_is_asked_once_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let l = fake_vllm(dir.path(), "0.26.0");
        // the fake launcher, counting its runs
        let calls = dir.path().join("calls");
        let script = std::fs::read_to_string(&l[1]).unwrap();
        std::fs::write(
            &l[1],
            format!("echo \"$1\" >> {}\n{script}", calls.display()),
        )
        .unwrap();
        let spec = vllm_spec(l, None, &[]);
        for _ in 0..3 {
            plan_checked(&spec, None).await.unwrap();
        }
        let mut asked: Vec<String> = std::fs::read_to_string(&calls)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        asked.sort();
        assert_eq!(asked, ["--version", "serve"]);
    }

    #[tokio::test]
    async fn a_launcher_that_is_not_vllm_is_a_clear_error() {
        let spec = vllm_spec(vec!["/no/such/python3".into()], None, &[]);
        let e = format!("{:#}", plan_checked(&spec, None).await.unwrap_err());
        assert!(
            e.contains("engines[0].launcher (embed)")
                && e.contains("cannot run `/no/such/python3 --version`"),
            "{e}"
        );
        let spec = vllm_spec(vec!["echo".into(), "hello".into()], None, &[]);
        let e = format!("{:#}", plan_checked(&spec, None).await.unwrap_err());
        assert!(e.contains("is this vLLM's CLI?"), "{e}");
    }
}
