"""Generate text from a checkpoint: KV-cached greedy or sampled decoding of one or more prompts.

``moge generate CHECKPOINT --prompt TEXT [--prompt TEXT ...]`` uses ``CHECKPOINT/tokenizer.json``;
without a tokenizer pass token ids, ``--prompt-ids "1 2 3"`` (repeatable), and ids are printed.
Prompts are batched with left padding. ``--temperature 0`` (the default) is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from .. import validate as V
from ..checkpoint import CheckpointError, load_pretrained
from ..checkpoint.reading import read_tokenizer
from ..generate import GenerationError, generate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (published layout; tokenizer.json optional)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help='prompt as token ids, e.g. "1 2 3" (repeatable)')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to text prompts")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static",
                   help="static: the fixed-shape engine (CUDA graphs on CUDA); dynamic: the plain loop")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (compiles first: tens of seconds; the fastest CPU path at batch 1)")
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding with the checkpoint's MTP predictors (same greedy output)")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="drafts per step with --speculative (default: every MTP predictor)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint against its manifest (SHA-256) and refusing NaN/inf weights")


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def run(args: argparse.Namespace) -> int:

    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist" if not ckpt.exists()
                              else f"{ckpt} is not a checkpoint directory")
    if not args.prompt and not args.prompt_ids:
        raise GenerationError("give at least one --prompt TEXT or --prompt-ids \"1 2 3\"")
    if args.prompt and args.prompt_ids:
        raise GenerationError("use either --prompt or --prompt-ids, not both")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise GenerationError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"--device {args.device}: CUDA is not available")
    V.integer("--max-new-tokens", args.max_new_tokens, 0, error=GenerationError)
    V.number("--temperature", args.temperature, 0.0, error=GenerationError)
    V.integer("--top-k", args.top_k, 0, error=GenerationError)
    V.number("--top-p", args.top_p, 0.0, 1.0, lo_open=True, error=GenerationError)
    V.integer("--seed", args.seed, 0, 2 ** 63 - 1, error=GenerationError)
    V.integer("--draft-tokens", args.draft_tokens, 1, optional=True, error=GenerationError)
    if args.draft_tokens is not None and not args.speculative:
        raise GenerationError("--draft-tokens needs --speculative")
    if args.speculative and args.cache != "static":
        raise GenerationError("--speculative runs on the static cache: drop --cache dynamic")
    tokenizer = None
    if args.prompt:
        tokenizer = read_tokenizer(ckpt, args.verify)
        if tokenizer is None:
            raise GenerationError(f"no tokenizer.json in {ckpt}: pass token ids with --prompt-ids \"1 2 3\"")

    model = load_pretrained(ckpt, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                            verify=args.verify)
    cfg = model.config
    if tokenizer is not None:
        rows = [tokenizer.encode(t, add_special_tokens=False).ids for t in args.prompt]
        if not args.no_bos and cfg.bos_token_id is not None:
            rows = [r if r[:1] == [cfg.bos_token_id] else [cfg.bos_token_id, *r] for r in rows]
    else:
        try:
            rows = [[int(x) for x in s.replace(",", " ").split()] for s in args.prompt_ids]
        except ValueError:
            raise GenerationError(f"--prompt-ids must be integers separated by spaces, got {args.prompt_ids}") from None
    for r in rows:
        if not r:
            raise GenerationError("an empty prompt: give at least one token")
        bad = [i for i in r if not 0 <= i < cfg.vocab_size]
        if bad:
            raise GenerationError(f"token ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = _left_pad(rows, pad)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = generate(model, ids, mask, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   eos_token_id=cfg.eos_token_id, generator=gen, pad_token_id=pad, cache=args.cache,
                   speculative=args.speculative, draft_tokens=args.draft_tokens, compile=args.compile)
    dt = time.perf_counter() - t0
    new = out[:, ids.shape[1]:].tolist()
    eos = set([] if cfg.eos_token_id is None else
              [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id)
    n_new = 0
    for i, r in enumerate(rows):
        toks = new[i]
        stop = next((j for j, t in enumerate(toks) if t in eos), None)
        if stop is not None:
            toks = toks[:stop + 1]
        n_new += len(toks)
        if tokenizer is not None:
            print(f"[{i}] {args.prompt[i]}{tokenizer.decode(toks, skip_special_tokens=True)}")
        else:
            print(f"[{i}] {' '.join(map(str, r))} -> {' '.join(map(str, toks))}")
    print(f"generated {n_new} tokens for {len(rows)} prompt(s) in {dt:.2f} s ({n_new / max(dt, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0
