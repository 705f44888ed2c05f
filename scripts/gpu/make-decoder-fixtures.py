#!/usr/bin/env python3
"""Makes the tiny Llama, Qwen2 and GPT-2 test fixtures (issue 20) with transformers, on CPU
in float32, as scripts/gpu/make-moe-fixture.py made the Qwen3-MoE ones (the GPU is not
used: any machine with torch, transformers 5 and tokenizers does; testdata/{llama,qwen2,
gpt2}-tiny were made on the development machine on 2026-12-01 with transformers 5.24.0 and
torch 2.15.0 from PyPI).

  python3 scripts/gpu/make-decoder-fixtures.py OUTDIR

Writes OUTDIR/<name>/ (config.json, generation_config.json, model.safetensors in float32,
reference.json) for:

- llama-tiny: LlamaForCausalLM, 2 layers, hidden 64, 4 query / 2 KV heads of 16, vocab
  512, tied embeddings, and Llama 3 RoPE scaling (factor 8, low 1, high 4, original 64
  positions: at theta 10000 and head_dim 16 the inverse frequencies fall in all three
  bands, and positions up to 41 turn the scaled ones visibly).
- qwen2-tiny: Qwen2ForCausalLM of the same shape, untied, q/k/v biases.
- gpt2-tiny: GPT2LMHeadModel, 2 layers, n_embd 64, 4 heads, 128 positions, gelu_new, and a
  byte-level BPE tokenizer.json of 512 ids trained here on a fixed text (GPT-2's kind of
  tokenizer; `<|endoftext|>` is id 2, the EOS); its reference has one more item, a text
  prompt tokenized by it, with the greedy completion decoded by it. llama-tiny and
  qwen2-tiny ship no tokenizer: the engine speaks its byte-level one, as for qwen3-tiny.

Random weights: norms near 1, biases N(0, 0.1), the rest N(0, 0.15) (larger than
transformers' init, so that every part of the model moves the logits). Greedy
continuations are checked to contain no EOS, so an engine that stops at EOS makes the
same 8 tokens.
"""
import json, os, sys
import torch
import transformers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from safetensors.torch import load_file

out = sys.argv[1] if len(sys.argv) > 1 else "decoder-fixtures"
EOS = 2
PROMPTS = [[5, 17, 300, 42, 7],
           [1] + [(i * 37 + 11) % 512 for i in range(16)],
           [(i * 101 + 3) % 512 for i in range(33)]]


def randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def item(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
        logits = o.logits[0]
        gen = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = gen[0, len(ids):].tolist()
    assert len(greedy) == 8 and EOS not in greedy, f"greedy continuation hits EOS: {greedy}"
    last_hidden = o.hidden_states[-1][0, -1]
    emb = torch.nn.functional.normalize(last_hidden, dim=0)
    return {
        "input_ids": ids,
        "last_logits": [round(v, 6) for v in logits[-1].tolist()],
        "argmax": logits.argmax(-1).tolist(),
        "greedy": greedy,
        "embedding": [round(v, 6) for v in emb.tolist()],
    }


def save(name, model, what, extra_items=(), tokenizer=None):
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(os.path.join(d, "tokenizer.json"))
    sd = load_file(os.path.join(d, "model.safetensors"))
    cls = type(model)
    check = cls.from_pretrained(d).float().eval()
    with torch.no_grad():
        t = torch.tensor([PROMPTS[2]])
        same = torch.allclose(check(t).logits, model(t).logits, atol=1e-6)
    assert same, f"{name}: the saved checkpoint does not reload to the same model"
    items = [item(model, ids) for ids in PROMPTS] + list(extra_items)
    ref = {"model": what,
           "computed_with": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32",
           "embedding": "hidden state after the final norm at the last token, L2-normalised",
           "items": items}
    json.dump(ref, open(os.path.join(d, "reference.json"), "w"))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(name, sorted(os.listdir(d)), size, "bytes; keys:", sorted(sd)[:8], "...")
    assert size < 1 << 20, f"{name} is {size} bytes"
    return d


common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=EOS)

llama = LlamaForCausalLM(LlamaConfig(
    **common, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    attention_bias=False, mlp_bias=False)).float().eval()
randomise(llama, 20261201)
save("llama-tiny", llama, "tiny Llama (Llama 3 RoPE scaling, tied embeddings) in this folder")

qwen2 = Qwen2ForCausalLM(Qwen2Config(
    **common, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})).float().eval()
randomise(qwen2, 20261202)
save("qwen2-tiny", qwen2, "tiny Qwen2 (q/k/v biases) in this folder")

# GPT-2 with a byte-level BPE tokenizer of 512 ids trained on a fixed text.
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
words = ("the engine serves a model on one gpu beside another while the gateway balances "
         "replicas and the lab records counters latency throughput fairness tenants small "
         "models large models prefill decode context cache blocks memory share").split()
text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text, trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<pad>", "<bos>", "<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
assert tok.token_to_id("<|endoftext|>") == EOS and tok.get_vocab_size() <= 512

gpt2 = GPT2LMHeadModel(GPT2Config(
    vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=1,
    eos_token_id=EOS)).float().eval()
randomise(gpt2, 20261203)
prompt = "the gateway balances small models on one gpu"
ids = tok.encode(prompt).ids
text_item = item(gpt2, ids)
text_item["prompt"] = prompt
text_item["greedy_text"] = tok.decode(text_item["greedy"])
save("gpt2-tiny", gpt2, "tiny GPT-2 (gelu_new, tied, its own byte-level BPE tokenizer) in this folder",
     [text_item], tok)
print("gpt2-tiny text prompt", ids, "->", repr(text_item["greedy_text"]))
