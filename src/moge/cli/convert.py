"""Convert checkpoints to the released Pangu Pro MoE layout (re-shard, change dtype, import a state dict).

``moge convert SRC DST``: SRC is a checkpoint directory in the released layout (``config.json`` plus
safetensors shards) or a single state-dict file of :class:`MoGEForCausalLM` (``.safetensors``, or ``.pt``
read with ``torch.load(weights_only=True)``; stacked or per-expert names) together with ``--config`` /
``--preset``, or a DCP checkpoint directory (a multi-process ``moge train`` run's output, or ``--to dcp``'s).
DST is written in the released layout (docs/design.md section 5), or with ``--to dcp`` as ``config.json`` +
``tokenizer.json`` + ``dcp/`` (the model's tensors as one DCP checkpoint, which any mesh can read).
"""

from __future__ import annotations

import argparse

from ..checkpoint.convert import convert
from ..checkpoint.dcp import DCP_DIR
from ..checkpoint.io import CheckpointError
from ..checkpoint.pretrained import read_config
from ..config import get_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint directory, or a state-dict file (.safetensors / .pt) with --config/--preset")
    p.add_argument("dst", help="output directory (released layout)")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--config", help="config.json for a state-dict SRC")
    p.add_argument("--preset", help="preset name for a state-dict SRC (instead of --config)")
    p.add_argument("--tokenizer", help="tokenizer.json to copy into DST (default: SRC's, if any)")
    p.add_argument("--to", choices=["released", "dcp"], default="released",
                   help="layout of DST: the released single-directory layout (default) or a DCP directory")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking SRC against its manifest (SHA-256) and refusing NaN/inf weights")


def run(args: argparse.Namespace) -> int:
    config = None
    if args.config and args.preset:
        raise CheckpointError("give --config or --preset, not both")
    if args.config:
        config = read_config(args.config)
    elif args.preset:
        config = get_config(args.preset)
    out = convert(args.src, args.dst, args.max_shard_size, None if args.dtype == "auto" else args.dtype, config,
                  args.tokenizer, progress=True, verify=args.verify, to=args.to)
    files = sorted(p.name for p in out.iterdir() if p.is_file()) + ([f"{DCP_DIR}/"] if (out / DCP_DIR).is_dir() else [])
    size = sum(p.stat().st_size for p in [*out.glob("*.safetensors"), *out.glob(f"{DCP_DIR}/*.distcp")])
    print(f"wrote {out}: {', '.join(files)} ({size / 1e6:.1f} MB of weights)")
    return 0
