"""Routing records of a checkpoint for the paper's expert analyses (Figures 7-10): per-layer, per-domain
expert token share, co-activation of expert pairs, within-group share, busiest expert and device, and a
specialisation index (the ``moge analyze`` command is :mod:`moge.cli.analyze`).

Shape legend: B rows, S tokens per row, T = B*S tokens, K experts per token, N experts, M groups,
D devices, C domains.

Works on any model whose ``.model.layers`` hold :class:`~moge.model.moe.MoGELayer` MLPs: the native
:class:`~moge.model.MoGEForCausalLM` and the transformers wrapper alike. Only the main model's first
``num_hidden_layers`` layers are analysed; extra entries in the layer list (multi-token-prediction
modules) are left alone. Routing is read with forward hooks that are removed afterwards.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from ..config import MoGEConfig
from ..data.corpus import load_documents, pack_documents, split_documents
from ..data.tokenizer import BOS_ID, EOS_ID, encode_batch
from ..errors import MoGEError
from ..model.moe import MoGELayer
from ..progress import progress as progress_bar
from ..routing import expert_counts
from .stats import (busiest_device_share, busiest_expert_share, coactivation_counts, distance_from_uniform,
                    specialisation_index, within_group_share)


class AnalysisError(MoGEError, ValueError):
    """A model, checkpoint or data set that cannot be analysed; the message says why."""


# ---- collecting routing decisions -------------------------------------------------------------------
@dataclass
class LayerRouting:
    """Routing of one MoE layer accumulated over the data: counts per domain, pair counts, per-batch
    busiest shares."""
    counts_CN: Tensor
    coact_NN: Tensor
    batch_busiest_expert: list[float] = field(default_factory=list)
    batch_busiest_device: list[float] = field(default_factory=list)


@dataclass
class RoutingRecord:
    """Everything :func:`collect_routing` saw: the config, domains, tokens per domain, layers."""
    config: object
    domains: list[str]
    tokens_C: Tensor
    layers: dict[int, LayerRouting]
    devices: int


def moe_layers(model: torch.nn.Module):
    """``(MoGEConfig, [(layer index, MoGELayer)])`` of the main model's first ``num_hidden_layers``."""

    cfg = getattr(model, "moge_config", None) or getattr(model, "config", None)
    if not isinstance(cfg, MoGEConfig):
        raise AnalysisError(f"{type(model).__name__} carries no MoGEConfig (.config / .moge_config); "
                            f"load it with moge.checkpoint.load_pretrained or AutoModelForCausalLM after import moge.hf")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) < cfg.num_hidden_layers:
        raise AnalysisError(f"{type(model).__name__}.model.layers is missing or shorter than num_hidden_layers="
                            f"{cfg.num_hidden_layers}")
    found = [(i, layer.mlp) for i, layer in enumerate(list(layers)[:cfg.num_hidden_layers])
             if isinstance(getattr(layer, "mlp", None), MoGELayer)]
    if not found:
        raise AnalysisError("the model has no MoE layers to analyse (every layer is dense)")
    return cfg, found


@contextmanager
def _capture(layers) -> Iterator[dict[int, list[Tensor]]]:
    """Forward hooks collecting each MoE layer's expert ids ``[T, K]``; removed on exit."""
    seen: dict[int, list[Tensor]] = {i: [] for i, _ in layers}
    handles = []
    for i, mlp in layers:
        def hook(_mod, _inp, out, i=i):
            seen[i].append(out[1].expert_ids.detach())
        handles.append(mlp.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_routing(model: torch.nn.Module, rows_by_domain: dict[str, Tensor], batch_size: int = 8,
                    devices: int | None = None, progress: bool = True) -> RoutingRecord:
    """Route every row ``[R, S]`` of every domain through ``model`` and accumulate per-layer statistics.

    ``devices`` (default: the model's group count) own contiguous expert blocks for the busiest-device
    share. Works on the native model and on the transformers wrapper (both take ``input_ids``,
    ``use_cache`` and ``logits_to_keep``).
    """
    cfg, layers = moe_layers(model)
    n, d = cfg.num_experts, devices or cfg.groups
    if d < 1 or n % d:
        raise AnalysisError(f"--devices {d} must divide the {n} experts")
    domains = sorted(rows_by_domain)
    if not domains:
        raise AnalysisError("no data to analyse")
    dev = next(model.parameters()).device
    rec = RoutingRecord(cfg, domains, torch.zeros(len(domains), dtype=torch.long),
                        {i: LayerRouting(torch.zeros(len(domains), n, dtype=torch.long),
                                         torch.zeros(n, n, dtype=torch.float64)) for i, _ in layers}, d)
    total = sum((rows_by_domain[c].shape[0] + batch_size - 1) // batch_size for c in domains)
    was_training = model.training
    model.eval()
    # The transformers wrapper computes the routers' statistics (the expert ids hooked here) only when asked.
    asks = "output_router_logits" in inspect.signature(model.forward).parameters
    extra = {"output_router_logits": True} if asks else {}
    bar = progress_bar(total, "analyze", "batch", disable=not progress, leave=False)
    try:
        with _capture(layers) as seen:
            for c, name in enumerate(domains):
                rows = rows_by_domain[name]
                for start in range(0, rows.shape[0], batch_size):
                    ids_BS = rows[start:start + batch_size].to(dev)
                    for v in seen.values():
                        v.clear()
                    model(input_ids=ids_BS, use_cache=False, logits_to_keep=1, **extra)
                    rec.tokens_C[c] += ids_BS.numel()
                    for i, got in seen.items():
                        if len(got) != 1:
                            raise AnalysisError(f"layer {i} routed {len(got)} times in one forward pass")
                        ids_TK = got[0].cpu()
                        acc, counts_N = rec.layers[i], expert_counts(got[0], n).cpu()
                        acc.counts_CN[c] += counts_N
                        acc.coact_NN += coactivation_counts(ids_TK, n)
                        acc.batch_busiest_expert.append(busiest_expert_share(counts_N))
                        acc.batch_busiest_device.append(busiest_device_share(counts_N, d))
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return rec


# ---- summary ----------------------------------------------------------------------------------------
def summarize(rec: RoutingRecord) -> dict:
    """JSON-ready analyses per layer, and the invariant checks (shares sum to K per token; MoGE with
    K' = 1 never co-activates two experts of one group)."""
    cfg = rec.config
    n, k, m = cfg.num_experts, cfg.num_experts_per_tok, cfg.groups
    g = n // m
    out_layers, worst_sum, worst_in_group = [], 0.0, 0.0
    for i, acc in sorted(rec.layers.items()):
        share_CN = acc.counts_CN.double() / rec.tokens_C.double()[:, None]
        total_tokens = float(rec.tokens_C.sum())
        counts_N = acc.counts_CN.sum(0)
        coact = acc.coact_NN / total_tokens
        in_group = max(float((coact[b * g:(b + 1) * g, b * g:(b + 1) * g]
                              - torch.diag(coact[b * g:(b + 1) * g, b * g:(b + 1) * g].diagonal())).abs().max())
                       for b in range(m))
        worst_sum = max(worst_sum, float((share_CN.sum(-1) - k).abs().max()))
        worst_in_group = max(worst_in_group, in_group)
        out_layers.append({
            "layer": i,
            "share_by_domain": share_CN.tolist(),
            "share_all": (counts_N.double() / total_tokens).tolist(),
            "within_group_share": within_group_share(counts_N, m).tolist(),
            "coactivation": coact.tolist(),
            "max_coactivation_within_group": in_group,
            "busiest_expert_share": busiest_expert_share(counts_N),
            "busiest_device_share": busiest_device_share(counts_N, rec.devices),
            "batch_busiest_expert_share_mean": sum(acc.batch_busiest_expert) / len(acc.batch_busiest_expert),
            "batch_busiest_expert_share_max": max(acc.batch_busiest_expert),
            "batch_busiest_device_share_mean": sum(acc.batch_busiest_device) / len(acc.batch_busiest_device),
            "batch_busiest_device_share_max": max(acc.batch_busiest_device),
            "distance_from_uniform": dict(zip(rec.domains, distance_from_uniform(share_CN).tolist())),
            "specialisation_index": specialisation_index(share_CN, rec.tokens_C),
        })
    return {
        "router": cfg.router, "num_experts": n, "num_experts_per_tok": k, "num_groups": m,
        "num_hidden_layers": cfg.num_hidden_layers, "devices": rec.devices,
        "uniform_token_share": k / n, "uniform_within_group_share": 1 / g, "uniform_expert_share": 1 / n,
        "uniform_device_share": 1 / rec.devices,
        "domains": rec.domains, "tokens": dict(zip(rec.domains, rec.tokens_C.tolist())),
        "layers": out_layers,
        "checks": {"max_abs_share_sum_minus_k": worst_sum, "max_coactivation_within_group": worst_in_group,
                   "moge_groups_exclusive": cfg.router == "moge" and cfg.k_per_group == 1},
    }


# ---- data -------------------------------------------------------------------------------------------
def domain_rows(data: list[str] | None, tokenizer, seq_len: int, max_tokens: int, split: str = "val") -> dict[str, Tensor]:
    """Packed rows ``[R, S]`` per domain, at most ``max_tokens`` tokens each (whole rows)."""

    if seq_len < 2 or max_tokens < seq_len:
        raise AnalysisError(f"need --seq-len >= 2 and --tokens >= --seq-len (got {seq_len}, {max_tokens})")
    docs = load_documents(data)
    if split == "val":
        docs = split_documents(docs)[1]
    out, skipped = {}, []
    for name in sorted({d.domain for d in docs}):
        rows = pack_documents([d for d in docs if d.domain == name], lambda t: encode_batch(tokenizer, t),
                              seq_len, BOS_ID, EOS_ID)
        if rows.shape[0] == 0:
            skipped.append(name)
            continue
        out[name] = rows[: max(1, max_tokens // seq_len)]
    if skipped:
        print(f"note: domain(s) {skipped} have fewer than {seq_len} tokens in the {split} split and are skipped",
              file=sys.stderr)
    if not out:
        raise AnalysisError(f"no domain has a full row of {seq_len} tokens in the {split} split; use --split all "
                            f"or a smaller --seq-len")
    return out


