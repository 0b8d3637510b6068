"""lm-evaluation-harness's ``local-completions`` backend (its Python API) against ``moge serve``: a
log-likelihood (multiple-choice) task and a generate-until task defined from local files; the server's
log-likelihoods equal the model's own forward, its generations equal ``moge.generate``.

lm-evaluation-harness is in the test extra (``lm_eval[api]``, pinned in the lock): ``make test`` runs
this, and a missing install fails here rather than skipping.
"""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer

from helpers import single_thread  # noqa: F401
from moge.checkpoint import load_pretrained
from moge.generate import generate
from serve_helpers import MODEL, Server, ckpt  # noqa: F401 (ckpt: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

MC = [{"context": "the quick brown", "choices": [" fox", " dog", " moge"], "label": 0},
      {"context": "hello world,", "choices": [" hello", " pangu"], "label": 0},
      {"context": "mixture of grouped", "choices": [" experts", " devices", " text"], "label": 0}]
GEN = [{"question": "the quick brown fox", "answer": "jumps"}, {"question": "hello world, hello", "answer": "moge"}]


def write_tasks(d) -> None:
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC))
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN))
    # the datasets cache under the test's directory, not the user's ~/.cache
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n  cache_dir: " + str(d / "hf-cache")
              + "\ntest_split: test\n")
    (d / "mc.yaml").write_text("task: moge_tiny_mc\n" + common.format(d / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"))
    (d / "gen.yaml").write_text("task: moge_tiny_gen\n" + common.format(d / "gen.jsonl") + (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))


def test_local_completions_loglikelihood_and_generate_until(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path)
    server = Server(ckpt, "--max-batch", "4", "--max-model-len", "200")
    try:
        res = lm_eval.simple_evaluate(
            model="local-completions", tasks=["moge_tiny_mc", "moge_tiny_gen"], log_samples=True,
            model_args=f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={ckpt},num_concurrent=2,max_retries=1,max_length=200",
            task_manager=TaskManager(include_path=str(tmp_path)))
    finally:
        server.close()
    model = load_pretrained(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    n = 0
    for s in res["samples"]["moge_tiny_mc"]:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            c = tok.encode(ctx, add_special_tokens=False).ids
            w = tok.encode(ctx + cont, add_special_tokens=False).ids
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].double(), -1)
            assert float(resp[0][0]) == pytest.approx(sum(float(lp[i - 1, w[i]]) for i in range(len(c), len(w))),
                                                      abs=1e-4)
            n += 1
    assert n == sum(len(x["choices"]) for x in MC)
    for s in res["samples"]["moge_tiny_gen"]:
        ids = tok.encode(s["arguments"][0][0], add_special_tokens=False).ids
        new = generate(model, torch.tensor([ids]), max_new_tokens=6, eos_token_id=2)[0, len(ids):].tolist()
        new = new[:new.index(2) + 1] if 2 in new else new
        assert s["resps"][0][0] == tok.decode(new, skip_special_tokens=True).split("\n\n")[0]
