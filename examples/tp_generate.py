"""Tensor-parallel generation through transformers: every rank holds a share of the attention heads, the
shared and dense MLPs and the output head (the model's ``_tp_plan``), and all ranks print the same text.

    torchrun --nproc-per-node 2 examples/tp_generate.py runs/demo/moge

transformers starts the process group (gloo on CPU, NCCL on GPUs) from torchrun's environment.
"""

import sys
import warnings

import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)

ckpt = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/moge"
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # transformers prefers DistributedConfig to tp_plan=
    model = AutoModelForCausalLM.from_pretrained(ckpt, tp_plan="auto")
tok = AutoTokenizer.from_pretrained(ckpt)
batch = tok(["def ", "The "], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=16, do_sample=False)
if dist.get_rank() == 0:
    print(f"{dist.get_world_size()} ranks:", tok.batch_decode(out, skip_special_tokens=True))
# Finish every rank's collectives and drop the sharded tensors before the group goes: gloo's worker
# threads still holding tensors at interpreter shutdown can abort the process.
dist.barrier()
del model, out
dist.destroy_process_group()
