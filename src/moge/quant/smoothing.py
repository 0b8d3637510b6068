"""Smoothing (SmoothQuant, and the paper's expert-aware eq. 10): move activation outliers into weights.

Shape legend
    H  hidden   N  routed experts   F  expert width   I  input features   O  output features

For an input channel ``j`` read by a linear ``W``, SmoothQuant divides the activation by
``s_j = max|x_j|^a / max_o|W_oj|^(1-a)`` and multiplies column ``j`` of ``W`` by ``s_j``: the product is
unchanged, and with ``a`` (``alpha``, the migration strength) near 0.5 the activation's outlier channels
shrink while the weight's grow, so both quantize well. When the input comes from an RMSNorm the division
folds into the norm's weight, so smoothing costs nothing at run time and is exact before rounding.

An input read by several linears needs one ``s`` for all of them:

* q/k/v (after ``input_layernorm``): the usual SmoothQuant scale with ``max_o |W_oj|`` over the three
  matrices together;
* the MoGE layer's input (after ``post_attention_layernorm``), read by the router, every routed expert and
  the shared expert: eq. 10, ``s_j = max(req_router_j, max_i req_expert_i_j, req_shared_j)`` with
  ``req_c_j = max|x_j|^a / max_o |W_c,oj|^(1-a)`` for each reader ``c`` (an expert's ``W`` is its gate/up
  matrix), so the scale is never below what any reader requires. The router stays in float: its weight
  absorbs ``s`` exactly;
* ``per-expert`` (the naive baseline): every routed expert its own scale from the tokens it saw, no router
  term, no max. The experts share one norm, so these scales cannot be folded: each becomes the expert's
  input divisor (``Int8Linear.input_smooth``), and the shared expert gets its own the same way.

The other two inputs of a layer get the usual scale, folded into the matrix that produces them (exact as
well, the producing maps being linear in that matrix's rows): a down projection's input ``silu(gate) * up``
into the rows of ``up`` (per routed expert, the shared expert and dense MLPs), and ``o_proj``'s input (the
attention-weighted values) into the rows of ``v_proj``, one scale per value head and dimension, shared by
the query heads that read that value head. Without them the static per-tensor scale of the down
projections is set by a few outlier channels (measured in docs/quantization.md).

:func:`apply_smoothing` changes the model's float weights and the calibration maxima in place (the maxima
of a smoothed input are divided by ``s``, exactly what a second calibration pass would measure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..model.moe import MoGELayer
from .calibrate import Calibration, decoder_layers
from .modules import QuantError


SMOOTHINGS = ("expert-aware", "per-expert", "none")
_FLOOR = 1e-5  # SmoothQuant's clamp: no zero maxima or scales


def weight_absmax(*weights: Tensor) -> Tensor:
    """``max_o |W_oj|`` per input channel over all given ``[..., O, I]`` matrices together -> ``[I]``."""
    return torch.stack([w.detach().abs().reshape(-1, w.shape[-1]).amax(0) for w in weights]).amax(0).float()


def smooth_scale(act_absmax_I: Tensor, weight_absmax_I: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (both maxima floored, ``s`` too)."""
    a = act_absmax_I.float().clamp(min=_FLOOR)
    w = weight_absmax_I.float().clamp(min=_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=_FLOOR)


def expert_aware_scale(act_absmax_H: Tensor, router_NH: Tensor, gate_up_N2FH: Tensor, shared: list[Tensor],
                       alpha: float) -> tuple[Tensor, Tensor]:
    """Eq. 10: ``(s [H], requirements [C, H])``; rows of ``requirements`` are the router's, each routed
    expert's (its gate/up matrix) and the shared expert's (its gate and up together, if any); ``s`` is
    their maximum per channel."""
    reqs = [smooth_scale(act_absmax_H, weight_absmax(router_NH), alpha)]
    w_NH = gate_up_N2FH.detach().abs().amax(1).float()  # max over each expert's output rows
    reqs += list(smooth_scale(act_absmax_H.unsqueeze(0), w_NH, alpha))
    if shared:
        reqs.append(smooth_scale(act_absmax_H, weight_absmax(*shared), alpha))
    req_CH = torch.stack(reqs)
    return req_CH.amax(0), req_CH


def per_expert_scales(expert_absmax_NH: Tensor, gate_up_N2FH: Tensor, alpha: float) -> Tensor:
    """Each routed expert's own SmoothQuant scale ``[N, H]`` from the tokens it saw (the naive baseline)."""
    return smooth_scale(expert_absmax_NH, gate_up_N2FH.detach().abs().amax(1).float(), alpha)


@dataclass
class Smoothing:
    """What :func:`apply_smoothing` did: folded scales by norm name, and the input divisors that could not
    be folded (module name -> ``[I]`` or ``[N, H]``), which the int8 modules must apply."""
    folded: dict[str, Tensor] = field(default_factory=dict)
    divisors: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def _fold(norm: nn.Module, s_I: Tensor, weights: list[Tensor]) -> None:
    norm.weight.div_(s_I.to(norm.weight))
    for w in weights:
        w.mul_(s_I.to(w))


@torch.no_grad()
def _smooth_down(up_FH: Tensor, down_HF: Tensor, h_absmax_F: Tensor, alpha: float) -> Tensor:
    """Fold the usual scale of a down projection's input into the up projection's rows (``[..., F, H]`` /
    ``[..., H, F]``, stacked experts too); returns ``s [..., F]``."""
    s = smooth_scale(h_absmax_F, down_HF.detach().abs().amax(-2), alpha)
    up_FH.div_(s.unsqueeze(-1).to(up_FH))
    down_HF.mul_(s.unsqueeze(-2).to(down_HF))
    return s


@torch.no_grad()
def _smooth_o(att: nn.Module, a_C: Tensor, alpha: float) -> Tensor:
    """Fold the usual scale of ``o_proj``'s input into ``v_proj``'s rows (and bias): one scale per value
    head and dimension, from the maxima over the query heads sharing it. Returns ``s`` per o_proj input."""
    g, d = att.n_kv, att.head_dim
    rep = att.n_heads // g
    w_C = att.o_proj.weight.detach().abs().amax(0).float()
    s_gd = smooth_scale(a_C.view(g, rep, d).amax(1), w_C.view(g, rep, d).amax(1), alpha)  # [Hkv, D]
    att.v_proj.weight.div_(s_gd.reshape(-1, 1).to(att.v_proj.weight))
    if att.v_proj.bias is not None:
        att.v_proj.bias.div_(s_gd.reshape(-1).to(att.v_proj.bias))
    s_C = s_gd.unsqueeze(1).expand(g, rep, d).reshape(-1)
    att.o_proj.weight.mul_(s_C.to(att.o_proj.weight))
    return s_C


@torch.no_grad()
def apply_smoothing(model: nn.Module, calib: Calibration, smoothing: str = "expert-aware",
                    alpha: float = 0.5, down_and_o: bool = True) -> Smoothing:
    """Smooth every decoder layer of the float ``model`` in place (see the module docstring) and divide the
    affected maxima in ``calib``. ``none`` changes nothing; ``down_and_o=False`` smooths only the inputs
    that norms produce (for measuring what the other two add)."""
    if smoothing not in SMOOTHINGS:
        raise QuantError(f"smoothing must be one of {', '.join(SMOOTHINGS)}; got {smoothing!r}")
    if not 0.0 <= alpha <= 1.0:
        raise QuantError(f"alpha (migration strength) must be in [0, 1], got {alpha}")
    done = Smoothing()
    if smoothing == "none":
        return done
    lin = calib.linears
    for ln, layer in decoder_layers(model).items():
        att = layer.self_attn
        names = [f"{ln}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        qkv = [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
        s = smooth_scale(torch.stack([lin[n] for n in names]).amax(0), weight_absmax(*qkv), alpha)
        _fold(layer.input_layernorm, s, qkv)
        for n in names:
            lin[n] = lin[n] / s
        done.folded[f"{ln}.input_layernorm"] = s
        if down_and_o:
            o = f"{ln}.self_attn.o_proj"
            s = _smooth_o(att, lin[o], alpha)
            lin[o] = lin[o] / s
            done.folded[f"{ln}.self_attn.v_proj"] = s
        mlp = layer.mlp
        if not isinstance(mlp, MoGELayer):  # dense SwiGLU: the usual scale over gate and up
            names = [f"{ln}.mlp.gate_proj", f"{ln}.mlp.up_proj"]
            gu = [mlp.gate_proj.weight, mlp.up_proj.weight]
            s = smooth_scale(lin[names[0]], weight_absmax(*gu), alpha)
            _fold(layer.post_attention_layernorm, s, gu)
            for n in names:
                lin[n] = lin[n] / s
            done.folded[f"{ln}.post_attention_layernorm"] = s
            if not down_and_o:
                continue
            dn = f"{ln}.mlp.down_proj"
            s = _smooth_down(mlp.up_proj.weight, mlp.down_proj.weight, lin[dn], alpha)
            lin[dn] = lin[dn] / s
            done.folded[f"{ln}.mlp.up_proj"] = s
            continue
        st = calib.moe[f"{ln}.mlp"]
        sh = mlp.shared_expert
        sh_names = [f"{ln}.mlp.shared_expert.gate_proj", f"{ln}.mlp.shared_expert.up_proj"] if sh is not None else []
        sh_w = [sh.gate_proj.weight, sh.up_proj.weight] if sh is not None else []
        if smoothing == "expert-aware":
            s, _ = expert_aware_scale(st.input_absmax_H, mlp.gate.weight, mlp.experts.gate_up_proj, sh_w, alpha)
            _fold(layer.post_attention_layernorm, s, [mlp.gate.weight, mlp.experts.gate_up_proj, *sh_w])
            st.input_absmax_H = st.input_absmax_H / s
            st.expert_input_absmax_NH = st.expert_input_absmax_NH / s
            for n in sh_names:
                lin[n] = lin[n] / s
            done.folded[f"{ln}.post_attention_layernorm"] = s
        else:  # per-expert: unfoldable divisors
            s_NH = per_expert_scales(st.expert_input_absmax_NH, mlp.experts.gate_up_proj, alpha)
            mlp.experts.gate_up_proj.mul_(s_NH.unsqueeze(1).to(mlp.experts.gate_up_proj))
            st.expert_input_absmax_NH = st.expert_input_absmax_NH / s_NH
            done.divisors[f"{ln}.mlp.experts"] = s_NH
            if sh is not None:
                s = smooth_scale(lin[sh_names[0]], weight_absmax(*sh_w), alpha)
                for w in sh_w:
                    w.mul_(s.to(w))
                for n in sh_names:
                    lin[n] = lin[n] / s
                    done.divisors[n] = s
        if not down_and_o:
            continue
        f = mlp.experts.intermediate_size
        s_NF = _smooth_down(mlp.experts.gate_up_proj[:, f:], mlp.experts.down_proj, st.expert_hidden_absmax_NF, alpha)
        st.expert_hidden_absmax_NF = st.expert_hidden_absmax_NF / s_NF
        done.folded[f"{ln}.mlp.experts.up"] = s_NF
        if sh is not None:
            dn = f"{ln}.mlp.shared_expert.down_proj"
            s = _smooth_down(sh.up_proj.weight, sh.down_proj.weight, lin[dn], alpha)
            lin[dn] = lin[dn] / s
            done.folded[f"{ln}.mlp.shared_expert.up_proj"] = s
    return done
