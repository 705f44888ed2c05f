//! Request parsing and validation as pure functions: body bytes and what the model allows
//! in, a job the engine can run or an OpenAI error body out. No HTTP and no engine thread,
//! so the property tests can feed them arbitrary bytes and JSON.
//!
//! Every number a client sends is checked before it can size an allocation or a loop:
//! `max_tokens` against the context length (as vLLM does), `n`, `top_k`, `min_tokens`, the
//! number and length of stop strings, the number of embedding inputs, `dimensions`, and
//! every token id (given or produced by the tokenizer) against the vocabulary.

use openai::{
    ChatCompletionRequest, CompletionRequest, Embedding, EmbeddingRequest, ErrorBody, Input,
    InputItem, MessageContent,
};
use serde::de::DeserializeOwned;

use crate::model_api::{ModelInfo, Task};
use crate::scheduler::GenParams;
use crate::tokenizer::Tokenizer;

/// Most inputs in one embeddings request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// Most stop strings in one request: each is searched after every token.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string in bytes: streaming holds back this much text.
pub const MAX_STOP_BYTES: usize = 4096;

/// What validation needs to know about the served model.
#[derive(Clone, Copy)]
pub struct ModelView<'a> {
    pub served_model_name: &'a str,
    pub info: &'a ModelInfo,
    /// Prompt plus output never exceed this (`--max-model-len`).
    pub max_model_len: usize,
    pub tokenizer: &'a Tokenizer,
}

/// A validated generation request (completions or chat).
#[derive(Debug)]
pub struct GenJob {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub stream: bool,
    pub include_usage: bool,
}

/// How embeddings are sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    /// Base64 of little-endian f32 bytes.
    Base64,
}

/// A validated embeddings request.
#[derive(Debug)]
pub struct EmbedJob {
    pub inputs: Vec<Vec<u32>>,
    pub format: EncodingFormat,
    /// Keep only the first `dimensions` values (then re-normalise).
    pub dimensions: Option<usize>,
}

impl EmbedJob {
    /// Tokens over all inputs (the usage's `prompt_tokens`).
    pub fn prompt_tokens(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }
}

type Checked<T> = Result<T, ErrorBody>;

fn bad(message: impl Into<String>, param: &str) -> ErrorBody {
    ErrorBody::invalid_request(message, Some(param))
}

/// Parses a JSON body into `T`: malformed JSON (including invalid UTF-8 and nesting past
/// serde_json's recursion limit) and wrong field types are 400s with serde's message.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Checked<T> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "malformed JSON body",
            Category::Data => "invalid request body",
        };
        ErrorBody::invalid_request(format!("{what}: {e}"), None)
    })
}

impl ModelView<'_> {
    /// 404 unless `model` is empty or the served name.
    fn check_model(&self, model: &str) -> Checked<()> {
        if model.is_empty() || model == self.served_model_name {
            return Ok(());
        }
        Err(ErrorBody::not_found(format!(
            "the model `{model}` does not exist; this server serves `{}`",
            self.served_model_name
        )))
    }

    /// 400 when the model does not do `task` (a generator asked for embeddings, or back).
    fn require_task(&self, task: Task, route: &str) -> Checked<()> {
        if self.info.task == task {
            return Ok(());
        }
        let (is, use_instead) = match self.info.task {
            Task::Generate => (
                "a generation model (--task generate)",
                "/v1/completions and /v1/chat/completions",
            ),
            Task::Embed => ("an embedding model (--task embed)", "/v1/embeddings"),
        };
        Err(bad(
            format!(
                "`{}` is {is}: it does not serve {route}; use {use_instead}",
                self.served_model_name
            ),
            "model",
        ))
    }

    /// 400 when any id is outside the model's vocabulary (it would index past the
    /// embedding table).
    fn check_token_ids(&self, ids: &[u32], param: &str) -> Checked<()> {
        let vocab = self.info.vocab_size;
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(bad(
                format!("token id {t} is out of the vocabulary (size {vocab})"),
                param,
            )),
            None => Ok(()),
        }
    }

    /// Token ids of one prompt or input: text tokenized, ids taken as they are; either way
    /// checked against the vocabulary.
    fn tokens(&self, item: InputItem<'_>, add_special: bool, param: &str) -> Checked<Vec<u32>> {
        let ids = match item {
            InputItem::Text(t) => self
                .tokenizer
                .encode(t, add_special)
                .map_err(|e| bad(format!("{e:#}"), param))?,
            InputItem::Tokens(t) => t.to_vec(),
        };
        self.check_token_ids(&ids, param)?;
        Ok(ids)
    }

    /// Whether `dimensions` may shorten this model's embeddings: Qwen3-Embedding was trained
    /// with Matryoshka representation learning; BERT-style encoders were not.
    fn supports_matryoshka(&self) -> bool {
        self.info.architecture == "qwen3"
    }
}

/// `POST /v1/completions`.
pub fn completion(body: &[u8], model: &ModelView<'_>) -> Checked<GenJob> {
    let req: CompletionRequest = parse_json(body)?;
    model.check_model(&req.model)?;
    model.require_task(Task::Generate, "/v1/completions")?;
    let items = req.prompt.items();
    let [item] = items.as_slice() else {
        return Err(bad(
            format!(
                "exactly one prompt per request is supported, got {}",
                items.len()
            ),
            "prompt",
        ));
    };
    let prompt = model.tokens(*item, true, "prompt")?;
    let params = gen_params(
        Sampling {
            max_tokens: req.max_tokens,
            max_tokens_param: "max_tokens",
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            stop: req.stop.as_ref(),
            seed: req.seed,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            cache_salt: req.cache_salt.as_deref(),
        },
        &prompt,
        "prompt",
        model,
    )?;
    Ok(GenJob {
        prompt,
        params,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// `POST /v1/chat/completions`: the messages through the chat template, then as a prompt.
pub fn chat(body: &[u8], model: &ModelView<'_>) -> Checked<GenJob> {
    let req: ChatCompletionRequest = parse_json(body)?;
    model.check_model(&req.model)?;
    model.require_task(Task::Generate, "/v1/chat/completions")?;
    if req.messages.is_empty() {
        return Err(bad("messages must not be empty", "messages"));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if let Some(MessageContent::Parts(parts)) = &m.content {
            if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                return Err(bad(
                    format!(
                        "message {i} has a content part of type `{}`; only `text` parts are supported",
                        p.kind
                    ),
                    "messages",
                ));
            }
        }
        msgs.push((m.role.clone(), m.text()));
    }
    let text = model
        .tokenizer
        .apply_chat_template(&msgs)
        .map_err(|e| bad(format!("{e:#}"), "messages"))?;
    let prompt = model.tokens(InputItem::Text(&text), false, "messages")?;
    let max_tokens_param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let params = gen_params(
        Sampling {
            max_tokens: req.effective_max_tokens(),
            max_tokens_param,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            n: req.n,
            stop: req.stop.as_ref(),
            seed: req.seed,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            cache_salt: req.cache_salt.as_deref(),
        },
        &prompt,
        "messages",
        model,
    )?;
    Ok(GenJob {
        prompt,
        params,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Sampling fields common to completions and chat, as sent.
struct Sampling<'a> {
    max_tokens: Option<i64>,
    /// `max_tokens` or `max_completion_tokens`: the name errors point at.
    max_tokens_param: &'static str,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<u32>,
    stop: Option<&'a openai::Stop>,
    seed: Option<u64>,
    ignore_eos: bool,
    min_tokens: Option<u32>,
    cache_salt: Option<&'a str>,
}

/// Validates the sampling fields against the prompt and the model's limits.
fn gen_params(
    s: Sampling<'_>,
    prompt: &[u32],
    prompt_param: &str,
    model: &ModelView<'_>,
) -> Checked<GenParams> {
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(bad(
            format!("n must be 1 (send one request per completion), got {n}"),
            "n",
        ));
    }
    let room = room_to_generate(prompt.len(), model.max_model_len, prompt_param)?;
    let max_tokens = max_tokens(s.max_tokens, s.max_tokens_param, prompt.len(), room, model)?;
    let min_tokens = s.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(bad(
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            "min_tokens",
        ));
    }
    if s.cache_salt.is_some_and(str::is_empty) {
        return Err(bad(
            "cache_salt must be a non-empty string if provided",
            "cache_salt",
        ));
    }
    Ok(GenParams {
        max_tokens,
        temperature: temperature(s.temperature)?,
        top_p: top_p(s.top_p)?,
        top_k: top_k(s.top_k, model.info.vocab_size)?,
        seed: s.seed,
        stop: stop_strings(s.stop)?,
        ignore_eos: s.ignore_eos,
        min_tokens,
        cache_salt: s.cache_salt.map(str::to_owned),
    })
}

/// Tokens left for output after the prompt; 400 when the prompt is empty or fills the
/// context.
fn room_to_generate(prompt_len: usize, max_len: usize, param: &str) -> Checked<usize> {
    if prompt_len == 0 {
        return Err(bad("the prompt is empty", param));
    }
    if prompt_len >= max_len {
        return Err(bad(
            format!(
                "the prompt is {prompt_len} tokens long but this model's maximum context length is {max_len} tokens (--max-model-len), leaving no room to generate"
            ),
            param,
        ));
    }
    Ok(max_len - prompt_len)
}

/// `max_tokens`: at least 1 and, with the prompt, within the context length (vLLM's
/// rule); the room left when not given.
fn max_tokens(
    asked: Option<i64>,
    param: &str,
    prompt_len: usize,
    room: usize,
    model: &ModelView<'_>,
) -> Checked<usize> {
    let Some(m) = asked else {
        return Ok(room);
    };
    if m < 1 {
        return Err(bad(format!("{param} must be at least 1, got {m}"), param));
    }
    match usize::try_from(m) {
        Ok(m) if m <= room => Ok(m),
        _ => {
            let max_len = model.max_model_len;
            Err(bad(
                format!(
                    "{param} is too large: {m}. This model's maximum context length is {max_len} tokens (--max-model-len) and your request has {prompt_len} prompt tokens ({m} > {max_len} - {prompt_len})"
                ),
                param,
            ))
        }
    }
}

/// `temperature`: finite and >= 0 (0 is greedy); 1 when not given.
fn temperature(t: Option<f32>) -> Checked<f32> {
    let t = t.unwrap_or(1.0);
    if t.is_finite() && t >= 0.0 {
        Ok(t)
    } else {
        Err(bad(
            format!("temperature must be a finite number >= 0, got {t}"),
            "temperature",
        ))
    }
}

/// `top_p`: in (0, 1]; 1 (off) when not given.
fn top_p(p: Option<f32>) -> Checked<f32> {
    let p = p.unwrap_or(1.0);
    if p > 0.0 && p <= 1.0 {
        Ok(p)
    } else {
        Err(bad(format!("top_p must be in (0, 1], got {p}"), "top_p"))
    }
}

/// `top_k`: -1 or 0 is off; a positive value is capped at the vocabulary size.
fn top_k(k: Option<i64>, vocab_size: usize) -> Checked<usize> {
    match k.unwrap_or(0) {
        -1 | 0 => Ok(0),
        k if k > 0 => Ok(usize::try_from(k).unwrap_or(usize::MAX).min(vocab_size)),
        k => Err(bad(
            format!("top_k must be -1, 0 (off) or positive, got {k}"),
            "top_k",
        )),
    }
}

/// Stop strings, empty ones dropped; at most [`MAX_STOP_STRINGS`] of at most
/// [`MAX_STOP_BYTES`] bytes each.
fn stop_strings(stop: Option<&openai::Stop>) -> Checked<Vec<String>> {
    let stop = stop.map(|s| s.to_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(bad(
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are supported, got {}",
                stop.len()
            ),
            "stop",
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            format!(
                "a stop string is {} bytes long; the limit is {MAX_STOP_BYTES} bytes",
                s.len()
            ),
            "stop",
        ));
    }
    Ok(stop)
}

/// `POST /v1/embeddings`.
pub fn embedding(body: &[u8], model: &ModelView<'_>) -> Checked<EmbedJob> {
    let req: EmbeddingRequest = parse_json(body)?;
    model.check_model(&req.model)?;
    model.require_task(Task::Embed, "/v1/embeddings")?;
    let format = encoding_format(req.encoding_format.as_deref())?;
    let dimensions = dimensions(req.dimensions, model)?;
    let inputs = embedding_inputs(&req.input, model)?;
    Ok(EmbedJob {
        inputs,
        format,
        dimensions,
    })
}

fn encoding_format(f: Option<&str>) -> Checked<EncodingFormat> {
    match f {
        None | Some("float") => Ok(EncodingFormat::Float),
        Some("base64") => Ok(EncodingFormat::Base64),
        Some(other) => Err(bad(
            format!("encoding_format `{other}` is not supported; use `float` or `base64`"),
            "encoding_format",
        )),
    }
}

/// `dimensions`: positive, and only for Matryoshka models (vLLM's rule). Whether it is
/// within the embedding size is known once the model has run ([`shape_embeddings`]).
fn dimensions(d: Option<i64>, model: &ModelView<'_>) -> Checked<Option<usize>> {
    let Some(d) = d else {
        return Ok(None);
    };
    if d < 1 {
        return Err(bad(
            format!("dimensions must be at least 1, got {d}"),
            "dimensions",
        ));
    }
    if !model.supports_matryoshka() {
        return Err(bad(
            format!(
                "model `{}` ({}) does not support matryoshka representation: changing its output dimensions would give poor embeddings; leave dimensions out",
                model.served_model_name, model.info.architecture
            ),
            "dimensions",
        ));
    }
    Ok(Some(usize::try_from(d).unwrap_or(usize::MAX)))
}

/// The token ids of every input: 1 to [`MAX_EMBEDDING_INPUTS`] inputs, none empty, none
/// longer than the context.
fn embedding_inputs(input: &Input, model: &ModelView<'_>) -> Checked<Vec<Vec<u32>>> {
    if input.is_empty() {
        return Err(bad("input must not be empty", "input"));
    }
    if input.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad(
            format!(
                "at most {MAX_EMBEDDING_INPUTS} inputs per request are supported, got {}",
                input.len()
            ),
            "input",
        ));
    }
    let max_len = model.max_model_len;
    let mut inputs = Vec::with_capacity(input.len());
    for (i, item) in input.items().into_iter().enumerate() {
        let ids = model.tokens(item, true, "input")?;
        if ids.is_empty() {
            return Err(bad(format!("input {i} is empty"), "input"));
        }
        if ids.len() > max_len {
            return Err(bad(
                format!(
                    "input {i} is {} tokens long but this model's maximum context length is {max_len} tokens (--max-model-len)",
                    ids.len()
                ),
                "input",
            ));
        }
        inputs.push(ids);
    }
    Ok(inputs)
}

/// The response's embeddings: each cut to `dimensions` and re-normalised when asked (400
/// when that is more than the model gives), then encoded as asked.
pub fn shape_embeddings(vectors: Vec<Vec<f32>>, job: &EmbedJob) -> Checked<Vec<Embedding>> {
    vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = match job.dimensions {
                Some(d) => truncate_normalised(v, d)?,
                None => v,
            };
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            Ok(match job.format {
                EncodingFormat::Float => Embedding::new(index, v),
                EncodingFormat::Base64 => Embedding::base64(index, &v),
            })
        })
        .collect()
}

/// The first `d` values of `v`, scaled back to unit length (a zero vector stays zero).
fn truncate_normalised(mut v: Vec<f32>, d: usize) -> Checked<Vec<f32>> {
    if d > v.len() {
        return Err(bad(
            format!(
                "dimensions {d} is larger than this model's embedding size {}",
                v.len()
            ),
            "dimensions",
        ));
    }
    v.truncate(d);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
