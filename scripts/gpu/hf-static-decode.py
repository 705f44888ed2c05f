# The transformers baseline of scripts/gpu/parity-bench.sh (issue 16): generate with a static
# KV cache (compiled forward + CUDA graphs), random weights in a Qwen3 shape, 128 prompt +
# 128 output tokens per sequence, as ../shared/baselines/hf_static.py does for Qwen3-1.7B.
#   python3 scripts/gpu/hf-static-decode.py gen8|gen17 [BATCH ...]
# Prints "HF <model> B=<batch> ... <n> tok/s" per batch (output tokens over three generates).
import sys, time, torch
from transformers import Qwen3Config, Qwen3ForCausalLM

SHAPES = {
    "gen17": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "gen8": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
name = sys.argv[1]
torch.manual_seed(0); torch.set_default_dtype(torch.bfloat16)
cfg = Qwen3Config(vocab_size=151936, head_dim=128, max_position_embeddings=4096, **SHAPES[name])
with torch.device("cuda"):
    m = Qwen3ForCausalLM(cfg).eval()
for B in [int(x) for x in sys.argv[2:]] or [64]:
    ids = torch.randint(0, 150000, (B, 128), device="cuda")
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
              do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
    t = time.time()
    with torch.no_grad(): m.generate(**kw)
    torch.cuda.synchronize(); first = time.time() - t
    t = time.time(); n = 0
    with torch.no_grad():
        for _ in range(3): out = m.generate(**kw); n += B * (out.shape[1] - 128)
    torch.cuda.synchronize(); dt = time.time() - t
    print(f"HF {name} B={B} first_call={first:.1f}s {n/dt:.0f} tok/s (prefill 128 + decode 128 per seq)", flush=True)
