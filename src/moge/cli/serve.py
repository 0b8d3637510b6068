"""Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching.

``moge serve CKPT --host 127.0.0.1 --port 8000``: POST /v1/completions and /v1/chat/completions
(streaming too), GET /v1/models, /health, /metrics, POST /tokenize, /detokenize, GET /tokenizer_info.
The checkpoint needs its tokenizer.json. Float and W8A8 checkpoints, MoGE and top-K routers.
``--speculative`` drafts with the checkpoint's MTP predictors (``moge train --mtp N``): each engine
step verifies 1 + D tokens per request; greedy output is unchanged. ``--compile`` decodes through
compiled steps (the fast CPU path, compiled per batch bucket before the server answers).
SIGTERM (or Ctrl-C) stops accepting requests and lets the running ones finish. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import validate as V
from ..checkpoint import load_pretrained
from ..checkpoint.reading import read_tokenizer
from ..engine.request import AdmissionError
from ..engine.scheduler import Scheduler
from ..engine.speculative import SpeculativeError
from ..errors import MoGEError

__all__ = ["ServeArgumentError", "add_arguments", "build", "run"]


class ServeArgumentError(MoGEError, ValueError):
    """A bad ``moge serve`` argument or checkpoint; the message names it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows of the KV cache: requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 answers")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step (longer prompts take several steps)")
    p.add_argument("--speculative", action="store_true",
                   help="decode with the checkpoint's MTP predictors drafting (same greedy output, fewer steps)")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="drafts per step with --speculative (default: every MTP predictor)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd steps, one per batch bucket, compiled before serving "
                        "(the fast CPU path; tens of seconds per bucket at startup)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the directory name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint against its manifest (SHA-256)")


def _checked(args: argparse.Namespace) -> Path:
    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.is_dir():
        raise ServeArgumentError(f"checkpoint directory {ckpt} does not exist" if not ckpt.exists()
                                 else f"{ckpt} is not a checkpoint directory")
    V.integer("--port", args.port, 0, 65535, error=ServeArgumentError)
    for name in ("max_batch", "max_queue", "prefill_chunk", "max_body_bytes"):
        V.integer("--" + name.replace("_", "-"), getattr(args, name), 1, error=ServeArgumentError)
    V.integer("--max-model-len", args.max_model_len, 2, optional=True, error=ServeArgumentError)
    V.integer("--threads", args.threads, 1, optional=True, error=ServeArgumentError)
    V.integer("--draft-tokens", args.draft_tokens, 1, optional=True, error=ServeArgumentError)
    if args.draft_tokens is not None and not args.speculative:
        raise ServeArgumentError("--draft-tokens needs --speculative")
    if args.compile and args.speculative:
        raise ServeArgumentError("--compile compiles the one-token decode step; --speculative verifies drafts "
                                 "eagerly: use one or the other")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ServeArgumentError(f"--device {args.device}: CUDA is not available")
    return ckpt


def build(args: argparse.Namespace):
    """Load the model and tokenizer; return ``(app, engine)`` (the app's lifespan starts the engine)."""
    ckpt = _checked(args)
    # The serve extra (FastAPI, uvicorn, prometheus-client) is optional: imported here, so that
    # without it this command says how to get it instead of raising an ImportError.
    try:
        from ..serve.app import create_app
        from ..serve.engine import AsyncEngine, EngineThread
        from ..serve.text import ServeTokenizer
    except ImportError as e:
        raise ServeArgumentError(f"moge serve needs the serve extra ({e.name} is missing): "
                                 "pip install 'moge[serve]'") from None
    raw_tok = read_tokenizer(ckpt, args.verify)
    if raw_tok is None:
        raise ServeArgumentError(f"no tokenizer.json in {ckpt}: moge serve needs the checkpoint's tokenizer")
    # The model is loaded, the scheduler built (its steps compiled) and then stepped on one thread: torch's
    # kernels run about 2x slower on a thread other than the one that first used them (EngineThread).
    worker = EngineThread()
    if args.threads:
        worker.call(lambda: torch.set_num_threads(args.threads))
    model = worker.call(lambda: load_pretrained(ckpt, dtype=None if args.dtype == "auto" else args.dtype,
                                                device=args.device, verify=args.verify))
    cfg = model.config
    eos = [] if cfg.eos_token_id is None else ([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int)
                                                else list(cfg.eos_token_id))
    tok = ServeTokenizer(raw_tok, ckpt, cfg.bos_token_id, args.max_model_len or cfg.max_position_embeddings)
    try:
        sched = worker.call(lambda: Scheduler(
            model, max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk, eos_token_ids=eos, pad_token_id=cfg.pad_token_id or 0,
            decode=tok.decode, speculative=args.speculative, draft_tokens=args.draft_tokens, compile=args.compile))
    except AdmissionError as e:
        raise ServeArgumentError(str(e)) from None
    except SpeculativeError as e:
        mtp = getattr(cfg, "num_mtp_layers", 0)
        why = (f"the checkpoint {ckpt} has no MTP predictors (num_mtp_layers = 0): serve it without "
               "--speculative, or train predictors first (moge train --mtp 1)") if not mtp else str(e)
        raise ServeArgumentError(f"--speculative: {why}") from None
    engine = AsyncEngine(sched, thread=worker)
    name = args.served_model_name or ckpt.resolve().name
    return create_app(engine, tok, name, args.api_key, args.max_body_bytes), engine


def run(args: argparse.Namespace) -> int:
    app, engine = build(args)  # --threads applies on the engine thread, which does all torch work
    import uvicorn

    print(f"moge serve: {args.checkpoint} on http://{args.host}:{args.port}/v1 "
          f"(max batch {args.max_batch}, context {engine.scheduler.max_model_len})", file=sys.stderr, flush=True)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, waits for open requests, then runs the
    # app's lifespan shutdown, which drains the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=120)
    return 0
