"""One rank of the transformers tensor-parallel test, launched by ``launch.py`` as torchrun would.

Usage: ``python tests/parallel/_hf_tp_worker.py CHECKPOINT_DIR EXPECTED_PT``. Loads the checkpoint with
``AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto")`` (transformers initialises gloo from the
environment and shards along the class's ``_tp_plan``), checks that the planned weights really are
sharded, and that the logits and greedy tokens equal the single-process ones in ``EXPECTED_PT``.
Prints ``OK tp`` on success; a failed check raises (non-zero exit, message on stderr).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)


def main(directory: str, expected_path: str) -> None:
    expected = torch.load(expected_path, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers prefers DistributedConfig to tp_plan=
        model = AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
    world = dist.get_world_size()
    assert world == 2, world
    layer0 = model.model.layers[0]
    for name, rows in (("q_proj", model.config.num_attention_heads), ("k_proj", model.config.num_key_value_heads)):
        w = getattr(layer0.self_attn, name).weight
        assert isinstance(w, DTensor), f"{name} is not sharded"
        assert w.to_local().shape[0] == rows * model.config.hidden_size // model.config.num_attention_heads // world
    dense = model.model.layers[1].mlp  # mlp_only_layers=[1]: a dense SwiGLU, split column then row
    assert dense.down_proj.weight.to_local().shape[1] == model.config.intermediate_size // world
    assert isinstance(model.lm_head.weight, DTensor)
    assert not isinstance(layer0.mlp.experts.gate_up_proj, DTensor)  # routed experts stay replicated

    ids, mask = expected["ids"], expected["mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(tokens, expected["tokens"]), (tokens, expected["tokens"])
    print("OK tp", flush=True)
    # Every rank done with its collectives, the sharded tensors dropped, then the group: gloo's worker
    # threads still holding tensors at interpreter shutdown can abort the process.
    dist.barrier()
    del model, logits, tokens, layer0, dense
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
