"""Tensor parallelism through transformers: ``from_pretrained(dir, tp_plan="auto")`` on 2 gloo processes
gives the single-process logits and greedy tokens (see ``_hf_tp_worker.py`` for the checks)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
from moge.hf import PanguProMoEConfig, PanguProMoEForCausalLM

from .launch import launch

WORKER = "tests/parallel/_hf_tp_worker.py"


@pytest.mark.timeout(180)
def test_tp_plan_auto_on_two_processes_matches_one_process(tmp_path):
    # One dense layer (mlp_only_layers) so both MLP forms are split; a wide init so the greedy choices
    # are clear (not near-ties that summation order could flip).
    torch.manual_seed(0)
    config = PanguProMoEConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
                               moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[1],
                               intermediate_size=40, initializer_range=0.3)
    PanguProMoEForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[0, 0, 1, 5, 9, 33, 70, 12], [1, 44, 3, 3, 18, 61, 90, 7]])
    mask = (torch.arange(8) >= torch.tensor([[2], [0]])).long()  # the first row left-padded
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    torch.save({"ids": ids, "mask": mask, "logits": logits, "tokens": tokens}, tmp_path / "expected.pt")

    results = launch([WORKER, str(tmp_path / "ckpt"), str(tmp_path / "expected.pt")], 2, timeout_s=150)
    for r in results:
        assert r.returncode == 0 and "OK tp" in r.stdout, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"
