#!/usr/bin/env python3
"""Makes the tiny Qwen3-MoE test fixtures with transformers, on CPU in float32 as the
qwen3-tiny fixture was made (the GPU is not used, so any machine with torch and
transformers 5 does; testdata/qwen3-moe-tiny* were made on the development machine on
2026-12-01 with transformers 5.24.0 and torch 2.11.0 from PyPI).

  python3 scripts/gpu/make-moe-fixture.py OUTDIR

transformers 5 writes `num_local_experts` in config.json where the published configs have
`num_experts`: a loader must read both.

Writes OUTDIR/qwen3-moe-tiny/ (config.json, model.safetensors in float32, reference.json)
and OUTDIR/qwen3-moe-tiny-fp8/ (the same weights in the published FP8 checkpoint format:
e4m3 weights with a float32 `weight_scale_inv` per block of `weight_block_size`, router,
norms, embeddings and lm_head left unquantised as `modules_to_not_convert` says, and a
reference.json computed by transformers from the dequantised weights, i.e. what an FP8
path must match up to its activation rounding).

The model: 3 layers, hidden 64, 4 query / 2 KV heads of 16, vocab 512, 8 experts of
which 2 are active (norm_topk_prob), moe_intermediate_size 32; layer 1 is a dense MLP
(`mlp_only_layers = [1]`, intermediate_size 128), so both kinds of layer are covered.
Random weights: norms near 1, the rest N(0, 0.15), the router N(0, 0.5) so that routing
is decisive (top-k far from ties).
"""
import json, os, sys
import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from safetensors.torch import save_file, load_file

out = sys.argv[1] if len(sys.argv) > 1 else "moe-fixture"
torch.manual_seed(20261201)
cfg = Qwen3MoeConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[1], max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    attention_bias=False, output_router_logits=False,
)
model = Qwen3MoeForCausalLM(cfg).float().eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(0.5 * torch.randn_like(p))
        else:
            p.copy_(0.15 * torch.randn_like(p))

PROMPTS = [[5, 17, 300, 42, 7],
           [1] + [(i * 37 + 11) % 512 for i in range(16)],
           [(i * 101 + 3) % 512 for i in range(33)]]

def reference(m, what):
    items = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        with torch.no_grad():
            o = m(x, output_hidden_states=True)
            logits = o.logits[0]
            gen = m.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
        last_hidden = o.hidden_states[-1][0, -1]
        emb = torch.nn.functional.normalize(last_hidden, dim=0)
        items.append({
            "input_ids": ids,
            "last_logits": [round(v, 6) for v in logits[-1].tolist()],
            "argmax": logits.argmax(-1).tolist(),
            "greedy": gen[0, len(ids):].tolist(),
            "embedding": [round(v, 6) for v in emb.tolist()],
        })
    return {"model": what,
            "computed_with": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32",
            "embedding": "hidden state after the final RMSNorm at the last token, L2-normalised",
            "items": items}

base = os.path.join(out, "qwen3-moe-tiny")
model.save_pretrained(base, safe_serialization=True)
sd = load_file(os.path.join(base, "model.safetensors"))
# transformers 5 may keep the experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
# the published checkpoints have one gate/up/down_proj per expert: write that layout.
for k in [k for k in sd if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]:
    w = sd.pop(k)
    prefix = k.rsplit(".", 1)[0]
    for e in range(w.shape[0]):
        if k.endswith("gate_up_proj"):
            inter = w.shape[1] // 2
            sd[f"{prefix}.{e}.gate_proj.weight"] = w[e, :inter].contiguous()
            sd[f"{prefix}.{e}.up_proj.weight"] = w[e, inter:].contiguous()
        else:
            sd[f"{prefix}.{e}.down_proj.weight"] = w[e].contiguous()
save_file(sd, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
check = Qwen3MoeForCausalLM.from_pretrained(base).float().eval()
with torch.no_grad():
    t = torch.tensor([PROMPTS[0]])
    print("reload matches:", torch.allclose(check(t).logits, model(t).logits, atol=1e-5))
print("saved keys (first layer):", sorted(k for k in sd if ".layers.0." in k)[:20])
json.dump(reference(model, "tiny Qwen3-MoE in this folder (config.json, model.safetensors)"),
          open(os.path.join(base, "reference.json"), "w"))

# FP8: the published checkpoint's format, block-wise e4m3 with weight_scale_inv.
BLOCK = [32, 32]
def quantise(w):
    rows, cols = w.shape
    br, bc = BLOCK
    nr, nc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(nr, nc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    deq = torch.empty_like(w)
    for i in range(nr):
        for j in range(nc):
            blk = w[i*br:(i+1)*br, j*bc:(j+1)*bc]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
            q[i*br:(i+1)*br, j*bc:(j+1)*bc] = qb
            deq[i*br:(i+1)*br, j*bc:(j+1)*bc] = qb.float() * s
    return q, scale, deq

not_convert = ["lm_head"]
for l in range(cfg.num_hidden_layers):
    not_convert += [f"model.layers.{l}.input_layernorm", f"model.layers.{l}.mlp.gate",
                    f"model.layers.{l}.post_attention_layernorm"]
fp8_sd, deq_sd = {}, {}
for k, w in sd.items():
    quantisable = (k.endswith(".weight") and w.dim() == 2 and "embed_tokens" not in k
                   and not any(k.startswith(m + ".") for m in not_convert) and "norm" not in k)
    if quantisable:
        q, s, deq = quantise(w.float())
        fp8_sd[k] = q.contiguous()
        fp8_sd[k[:-len("weight")] + "weight_scale_inv"] = s.contiguous()
        deq_sd[k] = deq
    else:
        fp8_sd[k] = w.contiguous()
        deq_sd[k] = w
fp8 = os.path.join(out, "qwen3-moe-tiny-fp8")
os.makedirs(fp8, exist_ok=True)
save_file(fp8_sd, os.path.join(fp8, "model.safetensors"), metadata={"format": "pt"})
conf = json.load(open(os.path.join(base, "config.json")))
conf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                               "modules_to_not_convert": not_convert, "quant_method": "fp8",
                               "weight_block_size": BLOCK}
json.dump(conf, open(os.path.join(fp8, "config.json"), "w"), indent=2)
deq_dir = os.path.join(out, "dequantised")
os.makedirs(deq_dir, exist_ok=True)
save_file(deq_sd, os.path.join(deq_dir, "model.safetensors"), metadata={"format": "pt"})
json.dump(json.load(open(os.path.join(base, "config.json"))), open(os.path.join(deq_dir, "config.json"), "w"))
deq_model = Qwen3MoeForCausalLM.from_pretrained(deq_dir).float().eval()
ref = reference(deq_model, "tiny Qwen3-MoE FP8 in this folder, run by transformers from its dequantised weights")
ref["quantisation"] = f"e4m3 per {BLOCK[0]}x{BLOCK[1]} block, scale = block amax / 448; weight = fp8 * weight_scale_inv"
json.dump(ref, open(os.path.join(fp8, "reference.json"), "w"))
for d in (base, fp8):
    print(d, sorted(os.listdir(d)), sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), "bytes")
