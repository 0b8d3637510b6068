"""Test helpers: a tiny random checkpoint in the published Pangu Pro MoE layout, written straight
through safetensors (not through moge's writer), so loading is tested against an independent file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moge.engine.sampling import sampling_probs


@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Run a test module with one intra-op thread: on a busy 2-core machine two threads spend most of
    a tiny op waiting on each other (measured: SDPA on a toy shape 4 ms with 2 threads, 9 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Exactly the released config keys (docs/design.md section 5), tiny values -- deliberately WITHOUT num_groups:
# groups must read as num_experts_per_tok (one expert per group), like the real Pangu Pro MoE config.
TINY_CONFIG = {
    "architectures": ["PanguProMoEForCausalLM"],
    "model_type": "PanguProMoE",
    "vocab_size": 97,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 16000000.0,
    "tie_word_embeddings": False,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "num_experts_per_tok": 4,
    "num_experts": 8,
    "router_aux_loss_coef": 0.001,
    "initializer_range": 0.02,
    "use_cache": True,
    "attention_dropout": 0.0,
    "output_router_logits": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def published_tensors(cfg: dict, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random float32 weights under the exact published tensor names (one entry per expert matrix)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).float()

    h, v = cfg["hidden_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nh
    n, f, fs = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    t = {"model.embed_tokens.weight": rnd(v, h, mean=0.0) * 5, "model.norm.weight": rnd(h, mean=1.0),
         "lm_head.weight": rnd(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rnd(h, mean=1.0)
        t[p + "post_attention_layernorm.weight"] = rnd(h, mean=1.0)
        for name, out in (("q", nh * d), ("k", nkv * d), ("v", nkv * d)):
            t[p + f"self_attn.{name}_proj.weight"] = rnd(out, h)
            t[p + f"self_attn.{name}_proj.bias"] = rnd(out)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nh * d)
        t[p + "self_attn.o_proj.bias"] = rnd(h)
        t[p + "mlp.gate.weight"] = rnd(n, h) * 5  # sharp router: clear per-group winners
        t[p + "mlp.router_scale"] = rnd(1, n, mean=1.0)
        for e in range(n):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(f, h)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(f, h)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(h, f)
        t[p + "mlp.shared_expert.gate_proj.weight"] = rnd(fs, h)
        t[p + "mlp.shared_expert.up_proj.weight"] = rnd(fs, h)
        t[p + "mlp.shared_expert.down_proj.weight"] = rnd(h, fs)
    return t


def write_published_checkpoint(directory, cfg: dict | None = None, seed: int = 0, shards: int = 1,
                               tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` and the weights (one file, or ``shards`` files plus an index) and return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_CONFIG if cfg is None else cfg)
    tensors = published_tensors(cfg, seed) if tensors is None else tensors
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def train_tokenizer(path, lines: list[str] | None = None) -> Path:
    """A tiny ByteLevel BPE tokenizer (``<pad>``=0, ``<bos>``=1, ``<eos>``=2, 259 + merges <= 300 ids)
    saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = lines or ["the quick brown fox jumps over the lazy dog", "hello world, hello moge",
                      "mixture of grouped experts balances devices", "pangu pro moe generates text"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    path = Path(path)
    tok.save(str(path))
    return path


def reference_logits(tensors: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Independent float64 forward of Pangu Pro MoE written from the spec (no moge code), ``[B,S,V]``.

    Embedding; per layer pre-RMSNorm GQA attention with q/k/v/o biases and rotate-half RoPE, then
    pre-RMSNorm MoGE: global softmax over N router logits, top-K' in each of M contiguous groups
    (M = num_groups or num_experts_per_tok), weight = score * router_scale (no renormalisation),
    SwiGLU experts plus the ungated shared expert; final RMSNorm; untied head. No padding.
    """
    t = {k: v.double() for k, v in tensors.items()}
    b, s = ids.shape
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nh
    n, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    m = cfg.get("num_groups") or k
    gsize, kg = n // m, k // m
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def swiglu(x, wg, wu, wd):
        a = x @ wg.T
        return (a * torch.sigmoid(a) * (x @ wu.T)) @ wd.T

    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):  # [B, heads, S, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["model.embed_tokens.weight"][ids]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, t[p + "input_layernorm.weight"])
        q = (a @ t[p + "self_attn.q_proj.weight"].T + t[p + "self_attn.q_proj.bias"]).view(b, s, nh, d).transpose(1, 2)
        kk = (a @ t[p + "self_attn.k_proj.weight"].T + t[p + "self_attn.k_proj.bias"]).view(b, s, nkv, d).transpose(1, 2)
        vv = (a @ t[p + "self_attn.v_proj.weight"].T + t[p + "self_attn.v_proj.bias"]).view(b, s, nkv, d).transpose(1, 2)
        q, kk = rope(q), rope(kk)
        kk, vv = kk.repeat_interleave(nh // nkv, dim=1), vv.repeat_interleave(nh // nkv, dim=1)
        att = (q @ kk.transpose(-1, -2)) / d ** 0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ vv).transpose(1, 2).reshape(b, s, nh * d)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T + t[p + "self_attn.o_proj.bias"]

        a = rms(x, t[p + "post_attention_layernorm.weight"]).reshape(b * s, h)
        scores = (a @ t[p + "mlp.gate.weight"].T).softmax(-1)
        scale = t[p + "mlp.router_scale"].reshape(n)
        y = swiglu(a, t[p + "mlp.shared_expert.gate_proj.weight"], t[p + "mlp.shared_expert.up_proj.weight"],
                   t[p + "mlp.shared_expert.down_proj.weight"])
        for tok in range(b * s):
            for g in range(m):
                block = scores[tok, g * gsize:(g + 1) * gsize]
                for local in torch.topk(block, kg).indices.tolist():
                    e = g * gsize + local
                    w = scores[tok, e] * scale[e]
                    y[tok] += w * swiglu(a[tok], t[p + f"mlp.experts.{e}.gate_proj.weight"],
                                         t[p + f"mlp.experts.{e}.up_proj.weight"],
                                         t[p + f"mlp.experts.{e}.down_proj.weight"])
        x = x + y.view(b, s, h)
    x = rms(x, t["model.norm.weight"])
    return x @ t["lm_head.weight"].T


def greedy_uncached(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the full forward on the whole sequence each step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def chi2_upper(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z (3.719: 1 - 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_three_tokens_follow(model, prompt_1P: torch.Tensor, got_R3: torch.Tensor, temperature: float,
                               top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The rows of ``got`` (three sampled tokens after ``prompt``) follow the model's own filtered
    distribution of those three tokens, computed exactly over every continuation (a tiny vocabulary):
    no excluded token ever, and a chi-square test at 1e-4 (expected counts under 5 pooled). Returns the
    filtered probabilities ``[V^2, 3, V]`` of every two-token continuation."""
    v, rows = model.config.vocab_size, got_R3.shape[0]
    t1, t2 = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
    seqs = torch.cat([prompt_1P.expand(v ** 2, -1), t1.reshape(-1, 1), t2.reshape(-1, 1)], dim=1)
    with torch.no_grad():
        probs = sampling_probs(model(seqs).logits[:, -3:], temperature, top_k, top_p).double()
    exact = (probs[0, 0][:, None, None] * probs[:, 1].reshape(v, v, v)[:, 0][:, :, None]
             * probs[:, 2].reshape(v, v, v)).reshape(-1)
    counts = torch.bincount((got_R3[:, 0] * v + got_R3[:, 1]) * v + got_R3[:, 2], minlength=v ** 3).double()
    expected = exact * rows
    big = expected >= 5
    assert counts[exact == 0].sum() == 0  # never a token the filtered main distribution excludes
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum().item()
    df = int(big.sum()) if exp[-1] > 0 else int(big.sum()) - 1
    assert stat < chi2_upper(df), (stat, df)
    return probs
