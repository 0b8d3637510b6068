"""Calibration: per-channel activation maxima at the input of every linear that W8A8 quantizes.

Shape legend
    T  tokens   H  hidden   N  routed experts   F  expert width   I  input features   R rows   S positions

Forward pre-hooks record, over the calibration tokens, ``max |x_j|`` per input channel ``j`` of

* every quantized ``nn.Linear`` of a decoder layer (q/k/v/o, the shared expert, dense MLPs);
* each MoGE layer's shared input (the one the router, the routed experts and the shared expert read),
  and, per routed expert, its input and its down projection's input ``silu(gate) * up`` over the tokens
  that expert saw.

Rarely chosen experts would otherwise be calibrated on a handful of tokens. Each expert's statistics are
therefore topped up, in every batch, with the tokens its router score ranks highest among those not routed
to it, until it has ``min_expert_tokens / batches`` tokens: oversampling the rare experts on the tokens
nearest to choosing them. :meth:`Calibration.starved` names the experts whose *routed* tokens stayed below
the minimum, so a report can say which statistics rest mostly on such top-ups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.corpus import Document, pack_documents
from ..model.moe import MoGELayer
from ..progress import progress as progress_bar
from .modules import QuantError, is_quantized


@dataclass
class MoEStats:
    """Calibration statistics of one MoGE layer (float32 on the CPU)."""
    input_absmax_H: Tensor            # all tokens: the shared input of router / experts / shared expert
    expert_input_absmax_NH: Tensor    # per expert, over its calibration tokens (routed + top-up)
    expert_hidden_absmax_NF: Tensor   # per expert, the down projection's input over the same tokens
    routed_tokens_N: Tensor           # tokens full precision routed to each expert (int64)
    stat_tokens_N: Tensor             # tokens in each expert's statistics (routed + top-up, int64)


@dataclass
class Calibration:
    """Everything :func:`calibrate` measured: per-linear input maxima ``[I]`` by module name, per-MoE-layer
    :class:`MoEStats` by the layer's module name, and the token count."""
    linears: dict[str, Tensor] = field(default_factory=dict)
    moe: dict[str, MoEStats] = field(default_factory=dict)
    tokens: int = 0
    min_expert_tokens: int = 0

    def starved(self) -> dict[str, list[tuple[int, int]]]:
        """``{layer: [(expert, routed tokens), ...]}`` for experts routed fewer than ``min_expert_tokens``."""
        out = {}
        for name, st in self.moe.items():
            low = [(e, int(c)) for e, c in enumerate(st.routed_tokens_N.tolist()) if c < self.min_expert_tokens]
            if low:
                out[name] = low
        return out


def decoder_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> decoder layer (any module with ``self_attn`` and ``mlp``), for native and wrapped models."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")
            and hasattr(m, "input_layernorm") and hasattr(m, "post_attention_layernorm")}


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules W8A8 quantizes, by name: attention q/k/v/o, the shared expert and dense
    MLPs. The router (``mlp.gate``) and the output head stay in high precision."""
    out = {}
    for lname, layer in decoder_layers(model).items():
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{lname}.self_attn.{p}"] = getattr(layer.self_attn, p)
        mlp = layer.mlp
        dense = None if isinstance(mlp, MoGELayer) else mlp
        owner, prefix = (mlp.shared_expert, f"{lname}.mlp.shared_expert") if dense is None else (dense, f"{lname}.mlp")
        if owner is not None:
            for p in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(owner, p)
                if isinstance(lin, nn.Linear):
                    out[f"{prefix}.{p}"] = lin
    return {k: v for k, v in out.items() if isinstance(v, nn.Linear)}


def moe_layers(model: nn.Module) -> dict[str, MoGELayer]:
    """Name -> :class:`MoGELayer` of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoGELayer)}


def _absmax_I(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()


def _moe_observer(layer: MoGELayer, per_batch_min: int) -> tuple[Callable, dict[str, Tensor]]:
    n, h, f = layer.num_experts, layer.hidden_size, layer.experts.intermediate_size
    acc = {"input": torch.zeros(h), "expert_input": torch.zeros(n, h), "expert_hidden": torch.zeros(n, f),
           "routed": torch.zeros(n, dtype=torch.long), "stat": torch.zeros(n, dtype=torch.long)}

    def hook(mod: MoGELayer, args) -> None:
        x_TH = args[0].detach().reshape(-1, h)
        r = mod.route(x_TH)
        acc["input"] = torch.maximum(acc["input"], _absmax_I(x_TH))
        gate_up = mod.experts.gate_up_proj
        for e in range(n):
            chosen_T = (r.expert_ids == e).any(-1)
            tok = chosen_T.nonzero().squeeze(-1)
            acc["routed"][e] += tok.numel()
            need = min(per_batch_min - tok.numel(), int((~chosen_T).sum()))
            if need > 0:  # top up with the tokens nearest to choosing e
                score_T = r.scores[:, e].masked_fill(chosen_T, float("-inf"))
                tok = torch.cat([tok, score_T.topk(need).indices])
            if tok.numel() == 0:
                continue
            x_PH = x_TH[tok]
            g_PF, u_PF = F.linear(x_PH, gate_up[e].to(x_PH.dtype)).chunk(2, dim=-1)
            acc["expert_input"][e] = torch.maximum(acc["expert_input"][e], _absmax_I(x_PH))
            acc["expert_hidden"][e] = torch.maximum(acc["expert_hidden"][e], _absmax_I(F.silu(g_PF) * u_PF))
            acc["stat"][e] += tok.numel()
    return hook, acc


@torch.inference_mode()
def calibrate(model: nn.Module, rows_RS: Tensor, batch_size: int = 8, min_expert_tokens: int = 64,
              progress: bool = True) -> Calibration:
    """Run the float ``model`` over ``rows [R, S]`` (token ids) and return the :class:`Calibration`.

    Rows go through in batches of ``batch_size`` with a progress bar; hooks are removed afterwards even on
    error. Raises :class:`QuantError` for no tokens or an already quantized model.
    """

    if is_quantized(model):
        raise QuantError("the model is already quantized; calibrate the float model it was made from")
    if not isinstance(rows_RS, Tensor) or rows_RS.dim() != 2 or rows_RS.numel() == 0:
        raise QuantError("no calibration tokens: give at least one row of token ids [rows, seq_len]")
    if batch_size < 1 or min_expert_tokens < 0:
        raise QuantError(f"batch_size must be >= 1 and min_expert_tokens >= 0, got {batch_size}, {min_expert_tokens}")
    device = next(model.parameters()).device
    n_batches = math.ceil(rows_RS.shape[0] / batch_size)
    per_batch_min = math.ceil(min_expert_tokens / n_batches)
    linears = {name: torch.zeros(m.in_features) for name, m in quantizable_linears(model).items()}
    handles, moe_acc = [], {}
    try:
        for name, lin in quantizable_linears(model).items():
            def lin_hook(mod, args, name=name):
                linears[name] = torch.maximum(linears[name], _absmax_I(args[0]))
            handles.append(lin.register_forward_pre_hook(lin_hook))
        for name, layer in moe_layers(model).items():
            hook, moe_acc[name] = _moe_observer(layer, per_batch_min)
            handles.append(layer.register_forward_pre_hook(hook))
        was_training = model.training
        model.eval()
        with progress_bar(n_batches, "calibrating", "batch", disable=not progress) as bar:
            for b in range(n_batches):
                model(input_ids=rows_RS[b * batch_size:(b + 1) * batch_size].to(device))
                bar.update(1)
        model.train(was_training)
    finally:
        for hd in handles:
            hd.remove()
    moe = {name: MoEStats(a["input"], a["expert_input"], a["expert_hidden"], a["routed"], a["stat"])
           for name, a in moe_acc.items()}
    return Calibration(linears, moe, int(rows_RS.numel()), min_expert_tokens)


def calibration_rows(texts: Sequence[str], encode: Callable[[list[str]], list[list[int]]], seq_len: int,
                     tokens: int, bos_id: int, eos_id: int) -> Tensor:
    """``[R, seq_len]`` calibration rows: the texts packed as ``<bos> text <eos>`` and cut into rows, the
    first ``ceil(tokens / seq_len)`` kept. :class:`QuantError` if that leaves no row."""

    if tokens < 1:
        raise QuantError(f"--calib-tokens must be >= 1, got {tokens}")
    if seq_len < 2:
        raise QuantError(f"--calib-seq-len must be >= 2, got {seq_len}")
    docs = [Document("calib", str(i), t) for i, t in enumerate(texts) if t]
    rows = pack_documents(docs, encode, seq_len, bos_id, eos_id) if docs else torch.zeros(0, seq_len, dtype=torch.long)
    if rows.shape[0] == 0:
        raise QuantError(f"no calibration tokens: the calibration text gives no full row of {seq_len} tokens "
                         f"(use more text or a smaller --calib-seq-len)")
    return rows[:math.ceil(tokens / seq_len)]
