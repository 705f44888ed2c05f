#!/usr/bin/env python3
"""Makes the tiny BERT, RoBERTa and DistilBERT test fixtures (issue 20) with transformers, on
CPU in float32, as scripts/gpu/make-decoder-fixtures.py made the decoders' (no GPU is
used: any machine with torch, transformers 5 and safetensors does).

  python3 scripts/gpu/make-encoder-fixtures.py OUTDIR

Writes OUTDIR/<name>/ (config.json, model.safetensors in float32, reference.json) for:

- bert-tiny: BertModel, 2 layers, hidden 64, 4 heads, intermediate 128, vocab 512, 64
  positions, 2 token types, exact GELU.
- roberta-tiny: RobertaModel of the same shape, pad_token_id 1 (positions start at 2:
  66 rows in its table), one token type, eps 1e-5.
- distilbert-tiny: DistilBertModel of the same shape (dim, hidden_dim, n_layers,
  n_heads), learned positions, no token types.

Each is saved from its task model's bare encoder, so the names have no prefix (the
loader takes both). Random weights: norms near 1, biases N(0, 0.1), the rest N(0, 0.15),
so that every part moves the output. reference.json holds, per input (token ids, no pad
id, different lengths), the sentence embedding sentence-transformers computes: the mean of
the last hidden states over the tokens, L2-normalised; each input is run alone.
"""
import json, os, sys
import torch
import transformers
from transformers import (BertConfig, BertModel, RobertaConfig, RobertaModel,
                          DistilBertConfig, DistilBertModel)

out = sys.argv[1] if len(sys.argv) > 1 else "encoder-fixtures"
INPUTS = [[5, 17, 300, 42, 7],
          [3] + [(i * 37 + 11) % 500 + 2 for i in range(16)],
          [(i * 101 + 3) % 500 + 2 for i in range(33)],
          [9]]


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make(name, model, seed):
    randomise(model, seed)
    model.eval()
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(d, extra)
        if os.path.exists(p):
            os.remove(p)
    items = []
    with torch.no_grad():
        for ids in INPUTS:
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            e = torch.nn.functional.normalize(h.mean(dim=0), dim=0)
            items.append({"input_ids": ids, "embedding": [round(float(x), 7) for x in e]})
    ref = {"model": name,
           "computed_with": f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32",
           "pooling": "mean over tokens, then L2 normalisation (each input alone)",
           "items": items}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, "->", d)


shape = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, hidden_act="gelu")
make("bert-tiny", BertModel(BertConfig(max_position_embeddings=64, type_vocab_size=2, **shape),
                            add_pooling_layer=False), 1)
make("roberta-tiny", RobertaModel(RobertaConfig(max_position_embeddings=66, type_vocab_size=1,
                                                pad_token_id=1, layer_norm_eps=1e-5, **shape),
                                  add_pooling_layer=False), 2)
make("distilbert-tiny", DistilBertModel(DistilBertConfig(vocab_size=512, dim=64, n_layers=2,
                                                         n_heads=4, hidden_dim=128,
                                                         max_position_embeddings=64,
                                                         activation="gelu")), 3)
