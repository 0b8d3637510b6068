"""``generate(model, input_ids)``: KV-cached greedy or sampled decoding of a left-padded batch, the one
entry point of the library's batch generation (the ``moge generate`` command is :mod:`moge.cli.generate`).

The static-cache engine (:mod:`moge.engine`) runs it by default; ``cache="dynamic"`` takes the plain
growing-cache loop, ``speculative=True`` drafts with the checkpoint's MTP predictors.

Shape legend
    B  batch     S  prompt length (padded)     V  vocabulary     N  tokens generated so far
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import validate as V
from .engine.decode import DecodeEngine
from .engine.sampling import sample_next
from .engine.speculative import SpeculativeDecoder, mtp_predictors
from .errors import MoGEError
from .model.cache import DynamicKVCache


__all__ = ["GenerationError", "generate", "sample_next"]


class GenerationError(MoGEError, ValueError):
    """Bad generation arguments or inputs; the message names the argument."""


def _check_args(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, model: torch.nn.Module | None = None,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                generator: torch.Generator | None = None) -> None:
    """Every argument of :func:`generate`, before any work. The prompt's token ids are checked
    against the vocabulary here, once (a sync on an accelerator); the decode steps then feed back ids
    the model sampled itself, so the per-step forward does not check them again."""

    E = GenerationError
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise GenerationError("input_ids must be an integer tensor [batch, seq]"
                              + (f", got shape {tuple(input_ids.shape)} {input_ids.dtype}"
                                 if isinstance(input_ids, Tensor) else f", got {type(input_ids).__name__}"))
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids is empty: every prompt needs at least one token (e.g. <bos>)")
    if input_ids.shape[0] == 0:
        raise GenerationError("input_ids has no rows: give at least one prompt")
    if attention_mask is not None:
        V.tensor("attention_mask", attention_mask, error=E)
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                  f"shape {tuple(input_ids.shape)}")
        am = attention_mask.bool()
        if not bool(am[:, -1].all()):
            raise GenerationError("attention_mask has padding at the end of a row: pad prompts on the LEFT")
        if bool((am[:, 1:].long() - am[:, :-1].long() < 0).any()):
            raise GenerationError("attention_mask is not left padding (a 0 follows a 1 in some row)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    V.number("temperature", temperature, 0.0, error=E)
    V.integer("top_k", top_k, 0, error=E)
    V.number("top_p", top_p, 0.0, 1.0, lo_open=True, error=E)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise V.ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise V.ArgumentTypeError(f"model must be a MoGEForCausalLM (or the transformers wrapper), got "
                                  f"{type(model).__name__}")
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        V.ids_in_range("input_ids", input_ids, vocab, error=E)
        for name, ids in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            for i in ([] if ids is None else [ids] if not isinstance(ids, (list, tuple)) else ids):
                V.integer(name, i, 0, vocab - 1, error=E)
    limit = getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + max_new_tokens > limit:
        raise GenerationError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                              f"model's max_position_embeddings={limit}")


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
             pad_token_id: int | None = None, cache: str = "static", cuda_graphs: bool | None = None,
             engine: DecodeEngine | SpeculativeDecoder | None = None, speculative: bool = False,
             draft_tokens: int | None = None, compile: bool = False) -> Tensor:
    """Decode up to ``max_new_tokens`` tokens after each prompt with a KV cache; returns ``[B, S+n]``.

    One prefill over the (left-padded, ``attention_mask`` 1 = real token) prompts, then one token per
    step against the cache. Temperature 0 is greedy; otherwise temperature / top-k / top-p sampling
    with ``generator``. A row that emits ``eos_token_id`` (an id or a list) is finished: it keeps the
    EOS and gets ``pad_token_id`` (default: the config's pad, else the EOS) afterwards; decoding stops
    early when every row is finished, so n <= max_new_tokens. Works with :class:`MoGEForCausalLM` and
    the transformers wrapper.

    ``cache="static"`` (default) runs :mod:`moge.engine`: a preallocated cache, a fixed-shape step
    with no host syncs and, on CUDA (``cuda_graphs`` None or True), that step replayed as a CUDA graph;
    pass an ``engine`` (:class:`moge.engine.decode.DecodeEngine`) to reuse its caches and graphs across
    calls. ``compile=True`` compiles that step with ``torch.compile`` (the first call compiles: tens
    of seconds; then the fastest batch-1 path on CPU, see :class:`moge.engine.step.DecodeStep`; pass
    an ``engine`` built with ``compile=True`` to compile once). ``cache="dynamic"`` is the plain loop
    over the model's forward with a growing cache. Both give the same tokens (greedy: token for token,
    up to floating-point ties).

    ``speculative=True`` (or ``draft_tokens=D``, at most the model's ``num_mtp_layers``, default all)
    drafts D tokens per step with the model's MTP predictors and verifies them in one forward
    (:mod:`moge.engine.speculative`, static cache, eager also on CUDA): the same greedy tokens, and
    with sampling the same output distribution; ``engine`` may then be a reused
    :class:`~moge.engine.speculative.SpeculativeDecoder`.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, model, eos_token_id,
                pad_token_id, generator)
    if cache not in ("static", "dynamic"):
        raise GenerationError(f"cache must be 'static' or 'dynamic', got {cache!r}")
    if compile and cache != "static":
        raise GenerationError("compile=True compiles the static cache's step: use cache='static'")
    for name, flag in (("speculative", speculative), ("compile", compile)):
        if not isinstance(flag, bool):
            raise GenerationError(f"{name} must be True or False, got {flag!r}")
    speculative = speculative or draft_tokens is not None or isinstance(engine, SpeculativeDecoder)
    if speculative:
        mtp_predictors(model)
        V.integer("draft_tokens", draft_tokens, 1, len(model.mtp), optional=True, error=GenerationError)
        if cache != "static":
            raise GenerationError("speculative decoding runs on the static cache: use cache='static'")
        if compile:
            raise GenerationError("compile=True compiles the one-token step; speculative decoding verifies "
                                  "several tokens per step and runs eager: pass one of the two")
        if engine is not None and not isinstance(engine, SpeculativeDecoder):
            raise GenerationError("speculative decoding takes a SpeculativeDecoder as engine=, got a "
                                  f"{type(engine).__name__}")
    device = next(model.parameters()).device
    ids_BS = input_ids.to(device=device, dtype=torch.long)
    if max_new_tokens == 0:
        return ids_BS
    mask_BL = attention_mask.to(device=device, dtype=torch.long) if attention_mask is not None else None
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    was_training = model.training
    model.eval()
    try:
        if cache == "dynamic":
            return _decode_dynamic(model, ids_BS, mask_BL, max_new_tokens, temperature, top_k, top_p, eos,
                                     pad_token_id, generator)
        if engine is None:
            engine = (SpeculativeDecoder(model, ids_BS.shape[1] + max_new_tokens, draft_tokens) if speculative
                      else DecodeEngine(model, ids_BS.shape[1] + max_new_tokens, cuda_graphs=cuda_graphs,
                                        compile=compile))
        elif engine.model is not model:
            raise GenerationError("engine= was built for another model")
        elif compile and not getattr(engine, "compile", False):
            raise GenerationError("compile=True with an engine= built without it: pass "
                                  "DecodeEngine(model, capacity, compile=True)")
        elif speculative and draft_tokens is not None and engine.num_drafts != draft_tokens:
            raise GenerationError(f"engine= drafts {engine.num_drafts} tokens, draft_tokens={draft_tokens} asked")
        return engine.decode(ids_BS, mask_BL, max_new_tokens, temperature, top_k, top_p, eos, pad_token_id,
                               generator)
    finally:
        model.train(was_training)


def _decode_dynamic(model, ids_BS, mask_BL, max_new_tokens, temperature, top_k, top_p, eos, pad_token_id,
                      generator) -> Tensor:
    """The plain loop: the model's own forward with a growing cache, one host check per token."""
    eos_E = torch.tensor(eos, device=ids_BS.device, dtype=torch.long)
    cache = DynamicKVCache()
    b = ids_BS.shape[0]
    finished_B = torch.zeros(b, dtype=torch.bool, device=ids_BS.device)
    out = [ids_BS]
    step_ids = ids_BS
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask_BL, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        next_B = sample_next(res.logits[:, -1], temperature, top_k, top_p, generator)
        next_B = torch.where(finished_B, torch.full_like(next_B, pad_token_id), next_B)
        out.append(next_B.unsqueeze(1))
        if eos:
            finished_B |= torch.isin(next_B, eos_E)
            if bool(finished_B.all()):
                break
        step_ids = next_B.unsqueeze(1)
        if mask_BL is not None:
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones(b, 1)], dim=1)
    return torch.cat(out, dim=1)


# ---- CLI ------------------------------------------------------------------------------------------


