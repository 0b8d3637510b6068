"""KV-cached generation: equals uncached greedy decoding, batching with left padding, EOS, sampling, CLI."""

import pytest
import torch

from helpers import TINY_CONFIG, greedy_uncached, single_thread, train_tokenizer, write_published_checkpoint  # noqa: F401
from moge.checkpoint import load_pretrained
from moge.cli import main as cli_main
from moge.generate import GenerationError, generate, sample_next

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(d / "tokenizer.json")
    from tokenizers import Tokenizer
    write_published_checkpoint(d, {**TINY_CONFIG, "vocab_size": Tokenizer.from_file(str(tok)).get_vocab_size()})
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return load_pretrained(ckpt)


def test_cached_greedy_equals_uncached(model):
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    ours = generate(model, ids, max_new_tokens=12)
    assert ours.shape == (1, 17)
    assert torch.equal(ours, greedy_uncached(model, ids, 12))


def test_left_padded_batch_equals_per_row(model):
    rows = [[1, 5, 9, 33, 70, 12], [1, 44, 3], [1, 90]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = generate(model, ids, mask, max_new_tokens=10)
    for i, r in enumerate(rows):
        single = generate(model, torch.tensor([r]), max_new_tokens=10)
        assert torch.equal(batched[i, width:], single[0, len(r):]), i


def test_eos_finishes_rows_with_pad_and_stops_early(model):
    ids = torch.tensor([[1, 5, 9, 33, 70], [1, 44, 3, 3, 18]])
    free = generate(model, ids, max_new_tokens=6)
    eos = int(free[0, 6])  # row 0's second generated token
    out = generate(model, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 6] == eos and bool((out[0, 7:] == 0).all())
    row1 = free[1, 5:].tolist()
    if eos in row1:  # row 1 may finish too; until then it is unchanged
        k = row1.index(eos)
        assert out[1, 5:5 + k + 1].tolist() == row1[:k + 1]
    else:
        assert out[1, 5:].tolist() == row1
    both = generate(model, ids[:1], max_new_tokens=6, eos_token_id=[eos, 3])
    assert both.shape[1] <= 7  # stopped as soon as the only row finished


def test_sampling_is_seeded_and_filters(model):
    ids = torch.tensor([[1, 5, 9]])
    a = generate(model, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = generate(model, ids, max_new_tokens=8)
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=2.0, top_k=1), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=2.0, top_p=1e-6), greedy)


def test_sample_next_respects_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        tok = sample_next(logits, temperature=5.0, top_k=3, generator=g)
        assert bool((top3 == tok[:, None]).any(-1).all())
    # top_p: the kept set is the smallest prefix of sorted probabilities reaching p.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(sample_next(probs.log(), 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen == {0, 1}


def test_bad_arguments_raise_clear_errors(model):
    ids = torch.tensor([[1, 5, 0]])
    with pytest.raises(GenerationError, match="LEFT"):
        generate(model, ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, ids, temperature=-1.0)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, ids, top_p=0.0)
    with pytest.raises(GenerationError, match="input_ids"):
        generate(model, torch.tensor([1, 2, 3]))


def test_cli_generate_with_tokenizer(ckpt, capsys):
    rc = cli_main(["generate", str(ckpt), "--prompt", "hello world", "--prompt", "the quick brown",
                   "--max-new-tokens", "6"])
    assert rc == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("[0] hello world") and lines[1].startswith("[1] the quick brown")
    assert "tokens/s" in out.err
    # Same completion as the library call on the same ids (<bos> prepended).
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = [1, *tok.encode("hello world").ids]
    gen = generate(load_pretrained(ckpt), torch.tensor([ids]), max_new_tokens=6, eos_token_id=2)
    new = gen[0, len(ids):].tolist()
    new = new[:new.index(2) + 1] if 2 in new else new
    assert lines[0] == "[0] hello world" + tok.decode(new, skip_special_tokens=True)


def test_cli_generate_with_prompt_ids_and_sampling(ckpt, capsys):
    args = ["generate", str(ckpt), "--prompt-ids", "1 5 9", "--prompt-ids", "1 44", "--max-new-tokens", "4",
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first  # seeded
    assert first.startswith("[0] 1 5 9 -> ")


def test_cli_generate_errors(ckpt, tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_published_checkpoint(tmp_path / "notok")
    assert cli_main(["generate", str(tmp_path / "notok"), "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert cli_main(["generate", str(ckpt), "--prompt-ids", "1 5000"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_load_and_generate_match_cpu(ckpt):
    gpu = load_pretrained(ckpt, dtype="bfloat16", device="cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"} and gpu.lm_head.weight.dtype == torch.bfloat16
    assert gpu.model.rotary.inv_freq.device.type == "cuda"
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    out = generate(gpu, ids.cuda(), max_new_tokens=6)
    assert out.device.type == "cuda" and out.shape == (1, 11)
    f32 = load_pretrained(ckpt, device="cuda")
    assert torch.equal(generate(f32, ids.cuda(), max_new_tokens=6).cpu(), greedy_uncached(f32, ids.cuda(), 6).cpu())
