"""The probes of ``probe_inputs.py``: library calls, command lines, checkpoints and training runs fed
bad input. Each probe is a function of its own working directory; fixtures (a tiny trained run with a
manifest, its tokenizer, a corpus, a binary file) are made once by :func:`prepare_fixtures`.

Families: ``routing``, ``metrics``, ``layer``, ``config``, ``model``, ``generate``, ``loaders``
(library calls); ``security`` (paths leaving a checkpoint), ``integrity`` (corrupt checkpoints),
``cli-train``, ``cli-convert``, ``cli-generate``, ``cli-other``, ``resume`` (behaviour of a run on a
faulty directory), ``simulate``, ``new-commands`` (``moge quantize``, ``moge analyze``, the decode
engine: added after the first measurement, so absent from the "before" column). The probes only use interfaces that existed before the validation
layer, so the same file measures before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FX: Path = Path("/nonexistent")  # set by prepare_fixtures (inherited by the forked children)
SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--no-progress",
         "--threads", "1", "--save-every", "1"]


@dataclass
class Probe:
    family: str
    name: str
    run: Callable[[Path], dict]
    control: bool = False


def classify_exception(e: BaseException) -> dict:
    from moge.errors import MoGEError
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(e, MoGEError):
        return {"outcome": "named", "detail": msg}
    if isinstance(e, (ValueError, TypeError)) and not isinstance(e, (IndexError, KeyError)):
        return {"outcome": "plain", "detail": msg}
    return {"outcome": "traceback", "detail": msg}


# ---- fixtures --------------------------------------------------------------------------------------

def _moge(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moge", *argv], env=env, capture_output=True, text=True, **kw)


def prepare_fixtures(fx: Path) -> None:
    global FX, SRC
    import moge
    FX = fx
    SRC = Path(moge.__file__).resolve().parents[1]  # the moge under test (before / after)
    fx.mkdir(parents=True)
    import random
    rng = random.Random(0)
    lines = []
    for i in range(300):
        lines.append(f"The {rng.choice(['red', 'blue', 'tall'])} number {i} walks over the bridge and sees {i * 3} birds.")
        lines.append(f"def f{i}(x, y):\n    return x * {i} + y\n")
    (fx / "small.txt").write_text("\n".join(lines))
    r = _moge("train", "--out", str(fx / "run"), "--data", str(fx / "small.txt"), *TRAIN)
    if r.returncode:
        raise SystemExit(f"fixture training failed:\n{r.stderr}")
    shutil.copy(fx / "run" / "tokenizer.json", fx / "tok.json")
    (fx / "released").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(fx / "run" / name, fx / "released" / name)
    noise = random.Random(1)  # one generator: 4096 random bytes (not one byte repeated), invalid UTF-8
    (fx / "binary.bin").write_bytes(bytes(noise.randrange(256) for _ in range(4096)))
    (fx / "notok.json").write_text(json.dumps({"hello": "world"}))
    (fx / "victim.txt").write_text("keep me")
    (fx / "empty.txt").write_text("")


def copy_run(wd: Path, name: str = "ck", src: str = "run") -> Path:
    dst = wd / name
    shutil.copytree(FX / src, dst)
    return dst


def flip_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    pos = 8 + header + (len(data) - 8 - header) // 2
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


def state_file(ck: Path) -> Path:
    for n in ("moge_training_state.json", "trainer_state.json"):
        if (ck / n).is_file():
            return ck / n
    raise FileNotFoundError("no state file")


def edit_state(ck: Path, fn) -> None:
    p = state_file(ck)
    s = json.loads(p.read_text())
    fn(s)
    p.write_text(json.dumps(s))


# ---- generic probe kinds -----------------------------------------------------------------------------

def api(family: str, name: str, fn: Callable, control: bool = False) -> Probe:
    def run(wd: Path) -> dict:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            res = classify_exception(e)
            if control:
                res["outcome"] = "failed"
            return res
        return {"outcome": "ok" if control else "silent", "detail": "accepted"}
    return Probe(family, name, run, control)


def cli_result(argv: list[str], wd: Path) -> dict:
    from moge.cli import main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001
        sys.stderr.flush()
        return {"outcome": "traceback", "detail": f"escaped {type(e).__name__}: {str(e)[:200]}", "code": None}
    sys.stdout.flush()
    sys.stderr.flush()
    err = (wd / "stderr.txt").read_text(errors="replace")
    last = [l for l in err.strip().splitlines() if l.strip()][-1:] or [""]
    if code == 0:
        return {"outcome": "silent", "detail": "exit 0", "code": 0, "stderr": err[-2000:]}
    if code == 2 and "error:" in err and "Traceback" not in err:
        return {"outcome": "named", "detail": last[0][:300], "code": 2, "stderr": err[-2000:]}
    return {"outcome": "traceback", "detail": f"exit {code}: {last[0][:300]}", "code": code, "stderr": err[-2000:]}


def cli(family: str, name: str, argv: Callable[[Path], list] | list, control: bool = False,
        check: Callable[[Path, dict], dict] | None = None) -> Probe:
    def run(wd: Path) -> dict:
        res = cli_result(argv(wd) if callable(argv) else argv, wd)
        if check is not None:
            res = check(wd, res)
        if control:
            res["outcome"] = "ok" if res["outcome"] == "silent" else "failed"
        return res
    return Probe(family, name, run, control)


# ---- library probes --------------------------------------------------------------------------------

def _library_probes() -> list[Probe]:
    import torch

    from moge import MoGEConfig, MoGELayer, aux_loss, group_limited_route, moge_route, topk_route, z_loss
    from moge import device_loads, expert_load_cv, imbalance_score
    from moge.metrics import balance_from_counts, max_over_mean_load
    from moge.routing import expert_counts

    L = lambda *s: torch.randn(*(s or (6, 8)))  # noqa: E731
    ids = lambda hi=8: torch.randint(0, hi, (6, 4))  # noqa: E731
    P = []
    R = "routing"
    P += [api(R, "moge_route valid", lambda: moge_route(L(), 4, 1), control=True),
          api(R, "moge_route T=0 returns empty", lambda: moge_route(L(0, 8), 4, 1), control=True),
          api(R, "moge_route num_groups=2.0", lambda: moge_route(L(), 2.0, 1)),
          api(R, "moge_route k_per_group=1.5", lambda: moge_route(L(), 4, 1.5)),
          api(R, "moge_route num_groups=3 (N=8)", lambda: moge_route(L(), 3, 1)),
          api(R, "moge_route k_per_group=0", lambda: moge_route(L(), 4, 0)),
          api(R, "moge_route k_per_group=3 > G", lambda: moge_route(L(), 4, 3)),
          api(R, "moge_route num_groups=0", lambda: moge_route(L(), 0, 1)),
          api(R, "moge_route list logits", lambda: moge_route([[0.1] * 8], 4, 1)),
          api(R, "moge_route 1-D logits", lambda: moge_route(L(8), 4, 1)),
          api(R, "moge_route 3-D logits", lambda: moge_route(L(2, 3, 8), 4, 1)),
          api(R, "moge_route int logits", lambda: moge_route(torch.ones(6, 8, dtype=torch.long), 4, 1)),
          api(R, "moge_route complex logits", lambda: moge_route(L().to(torch.complex64), 4, 1)),
          api(R, "moge_route NaN logits", lambda: moge_route(torch.full((6, 8), float("nan")), 4, 1)),
          api(R, "moge_route NaN router_scale", lambda: moge_route(L(), 4, 1, torch.full((1, 8), float("nan")))),
          api(R, "moge_route router_scale wrong size", lambda: moge_route(L(), 4, 1, torch.ones(1, 7))),
          api(R, "moge_route router_scale list", lambda: moge_route(L(), 4, 1, [1.0] * 8)),
          api(R, "moge_route router_scale int", lambda: moge_route(L(), 4, 1, torch.ones(1, 8, dtype=torch.long))),
          api(R, "topk_route k=0", lambda: topk_route(L(), 0)),
          api(R, "topk_route k=9 > N", lambda: topk_route(L(), 9)),
          api(R, "topk_route k=2.5", lambda: topk_route(L(), 2.5)),
          api(R, "topk_route k='2'", lambda: topk_route(L(), "2")),
          api(R, "group_limited topk_groups=0", lambda: group_limited_route(L(), 2, 4, 0)),
          api(R, "group_limited topk_groups=5 > M", lambda: group_limited_route(L(), 2, 4, 5)),
          api(R, "group_limited M=3 (N=8)", lambda: group_limited_route(L(), 2, 3, 1)),
          api(R, "group_limited k > kept experts", lambda: group_limited_route(L(), 5, 4, 2)),
          api(R, "aux_loss T=0", lambda: aux_loss(torch.zeros(0, 8), torch.zeros(0, 4, dtype=torch.long))),
          api(R, "aux_loss id >= N", lambda: aux_loss(torch.rand(6, 8), ids(9) + 8)),
          api(R, "aux_loss T mismatch", lambda: aux_loss(torch.rand(6, 8), ids()[:3])),
          api(R, "aux_loss float ids", lambda: aux_loss(torch.rand(6, 8), ids().float())),
          api(R, "z_loss 1-D", lambda: z_loss(L(8))),
          api(R, "z_loss int", lambda: z_loss(torch.ones(6, 8, dtype=torch.long))),
          api(R, "expert_counts id >= N", lambda: expert_counts(ids() + 8, 8)),
          api(R, "expert_counts negative id", lambda: expert_counts(ids() - 9, 8)),
          api(R, "expert_counts float ids", lambda: expert_counts(ids().float(), 8)),
          api(R, "expert_counts num_experts=0", lambda: expert_counts(ids(), 0))]
    M = "metrics"
    P += [api(M, "imbalance_score valid", lambda: imbalance_score(ids(), 8, 4), control=True),
          api(M, "imbalance_score id >= N", lambda: imbalance_score(ids() + 8, 8, 4)),
          api(M, "imbalance_score negative id", lambda: imbalance_score(ids() - 9, 8, 4)),
          api(M, "imbalance_score num_devices=0", lambda: imbalance_score(ids(), 8, 0)),
          api(M, "imbalance_score num_devices=3", lambda: imbalance_score(ids(), 8, 3)),
          api(M, "imbalance_score T=0", lambda: imbalance_score(torch.zeros(0, 4, dtype=torch.long), 8, 4)),
          api(M, "imbalance_score float ids", lambda: imbalance_score(ids().float(), 8, 4)),
          api(M, "imbalance_score list ids", lambda: imbalance_score([[0, 1]], 8, 4)),
          api(M, "device_loads id >= N", lambda: device_loads(ids() + 8, 8, 4)),
          api(M, "expert_load_cv id >= N", lambda: expert_load_cv(ids() + 8, 8)),
          api(M, "expert_load_cv num_experts=0", lambda: expert_load_cv(ids(), 0)),
          api(M, "balance_from_counts num_tokens=0", lambda: balance_from_counts(torch.ones(8, dtype=torch.long), 4, 0)),
          api(M, "max_over_mean_load empty", lambda: max_over_mean_load(torch.zeros(0))),
          api(M, "max_over_mean_load list", lambda: max_over_mean_load([1, 2]))]

    def layer(**kw):
        args = dict(hidden_size=16, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=8,
                    shared_expert_intermediate_size=8, num_groups=4)
        args.update(kw)
        return MoGELayer(**args)
    Y = "layer"
    P += [api(Y, "MoGELayer valid forward", lambda: layer()(torch.randn(2, 3, 16)), control=True),
          api(Y, "MoGELayer hidden_size=0", lambda: layer(hidden_size=0)),
          api(Y, "MoGELayer num_experts=0", lambda: layer(num_experts=0)),
          api(Y, "MoGELayer num_experts_per_tok=0", lambda: layer(num_experts_per_tok=0)),
          api(Y, "MoGELayer num_groups=3", lambda: layer(num_groups=3)),
          api(Y, "MoGELayer router='bogus'", lambda: layer(router="bogus")),
          api(Y, "MoGELayer moe_intermediate_size=0", lambda: layer(moe_intermediate_size=0)),
          api(Y, "MoGELayer shared=-1", lambda: layer(shared_expert_intermediate_size=-1)),
          api(Y, "MoGELayer experts_backend='nope'", lambda: layer(experts_backend="nope")(torch.randn(3, 16))),
          api(Y, "MoGELayer hidden_size=16.0", lambda: layer(hidden_size=16.0)),
          api(Y, "MoGELayer aux_loss_coef=nan", lambda: layer(aux_loss_coef=float("nan"))),
          api(Y, "layer(int input)", lambda: layer()(torch.ones(3, 16, dtype=torch.long))),
          api(Y, "layer(float64 input)", lambda: layer()(torch.randn(3, 16, dtype=torch.float64))),
          api(Y, "layer(complex input)", lambda: layer()(torch.randn(3, 16, dtype=torch.complex64))),
          api(Y, "layer(wrong hidden size)", lambda: layer()(torch.randn(3, 15))),
          api(Y, "layer(0 tokens)", lambda: layer(aux_loss_coef=0.01)(torch.randn(0, 16))),
          api(Y, "layer(list input)", lambda: layer()([[0.0] * 16])),
          api(Y, "layer(0-D input)", lambda: layer()(torch.tensor(1.0))),
          api(Y, "layer(backend='nope')", lambda: layer()(torch.randn(3, 16), backend="nope"))]
    C = "config"
    cfg = lambda **kw: MoGEConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,  # noqa: E731
                                            num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                            num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=16), **kw})
    P += [api(C, "MoGEConfig valid", lambda: cfg(), control=True),
          api(C, "vocab_size=0", lambda: cfg(vocab_size=0)),
          api(C, "hidden_size='32'", lambda: cfg(hidden_size="32")),
          api(C, "hidden_size=32.5", lambda: cfg(hidden_size=32.5)),
          api(C, "hidden_size=True", lambda: cfg(hidden_size=True)),
          api(C, "num_groups=3", lambda: cfg(num_groups=3)),
          api(C, "num_groups=0", lambda: cfg(num_groups=0)),
          api(C, "rms_norm_eps=-1", lambda: cfg(rms_norm_eps=-1.0)),
          api(C, "rms_norm_eps=nan", lambda: cfg(rms_norm_eps=float("nan"))),
          api(C, "rope_theta=0", lambda: cfg(rope_theta=0.0)),
          api(C, "initializer_range=nan", lambda: cfg(initializer_range=float("nan"))),
          api(C, "initializer_range=-1", lambda: cfg(initializer_range=-1.0)),
          api(C, "router_aux_loss_coef=-1", lambda: cfg(router_aux_loss_coef=-1.0)),
          api(C, "router_z_loss_coef=nan", lambda: cfg(router_z_loss_coef=float("nan"))),
          api(C, "pad_token_id=1000 >= vocab", lambda: cfg(pad_token_id=1000)),
          api(C, "eos_token_id=-3", lambda: cfg(eos_token_id=-3)),
          api(C, "mlp_only_layers=[5]", lambda: cfg(mlp_only_layers=[5])),
          api(C, "mlp_only_layers='0'", lambda: cfg(mlp_only_layers=5)),
          api(C, "attention_dropout=1.5", lambda: cfg(attention_dropout=1.5)),
          api(C, "experts_backend='nope'", lambda: cfg(experts_backend="nope")),
          api(C, "head_dim=7 (odd)", lambda: cfg(head_dim=7)),
          api(C, "head_dim=0", lambda: cfg(head_dim=0)),
          api(C, "intermediate_size=-4", lambda: cfg(intermediate_size=-4, mlp_only_layers=[0])),
          api(C, "tie_word_embeddings='yes'", lambda: cfg(tie_word_embeddings="yes")),
          api(C, "shared_expert_intermediate_size='8'", lambda: cfg(shared_expert_intermediate_size="8")),
          api(C, "from_dict hidden_size=None", lambda: MoGEConfig.from_dict({"hidden_size": None})),
          api(C, "from_dict list", lambda: MoGEConfig.from_dict([1, 2])),
          api(C, "get_config unknown override", lambda: __import__("moge").get_config("debug", bogus=1)),
          api(C, "get_config preset 5", lambda: __import__("moge").get_config(5))]

    def model():
        from moge.model import MoGEForCausalLM
        torch.manual_seed(0)
        return MoGEForCausalLM(cfg())
    tok = lambda *s: torch.randint(0, 64, s or (2, 5))  # noqa: E731
    D = "model"
    P += [api(D, "forward valid", lambda: model()(tok()), control=True),
          api(D, "forward id >= vocab", lambda: model()(tok() + 64)),
          api(D, "forward negative id", lambda: model()(tok() - 65)),
          api(D, "forward 1-D ids", lambda: model()(tok(5))),
          api(D, "forward 3-D ids", lambda: model()(tok(2, 2, 3))),
          api(D, "forward float ids", lambda: model()(tok().float())),
          api(D, "forward S=0", lambda: model()(tok(2, 0))),
          api(D, "forward B=0", lambda: model()(tok(0, 4))),
          api(D, "forward list ids", lambda: model()([[1, 2, 3]])),
          api(D, "forward labels wrong shape", lambda: model()(tok(), labels=tok(2, 4))),
          api(D, "forward labels float", lambda: model()(tok(), labels=tok().float())),
          api(D, "forward labels id >= vocab", lambda: model()(tok(), labels=tok() + 64)),
          api(D, "forward attention_mask wrong shape", lambda: model()(tok(), attention_mask=torch.ones(2, 3))),
          api(D, "forward attention_mask 3-D", lambda: model()(tok(), attention_mask=torch.ones(2, 1, 5))),
          api(D, "forward inputs_embeds wrong hidden", lambda: model()(inputs_embeds=torch.randn(2, 5, 31))),
          api(D, "forward inputs_embeds int", lambda: model()(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.long))),
          api(D, "forward ids and embeds", lambda: model()(tok(), inputs_embeds=torch.randn(2, 5, 32))),
          api(D, "forward neither ids nor embeds", lambda: model()()),
          api(D, "forward logits_to_keep=-1", lambda: model()(tok(), logits_to_keep=-1)),
          api(D, "forward logits_to_keep=2.5", lambda: model()(tok(), logits_to_keep=2.5)),
          api(D, "forward position_ids wrong shape", lambda: model()(tok(), position_ids=torch.arange(3)[None])),
          api(D, "forward past_key_values=5", lambda: model()(tok(), past_key_values=5))]

    from moge.generate import generate, sample_next
    G = "generate"
    g = lambda ids=None, **kw: generate(model(), tok(2, 3) if ids is None else ids, max_new_tokens=kw.pop("n", 3), **kw)  # noqa: E731
    def mtp_model():
        from moge.model import MoGEForCausalLM
        torch.manual_seed(0)
        return MoGEForCausalLM(cfg().replace(num_mtp_layers=1)).eval()
    P += [api(G, "speculative valid", lambda: generate(mtp_model(), tok(2, 3), max_new_tokens=4, speculative=True),
              control=True),
          api(G, "speculative without predictors", lambda: g(speculative=True)),
          api(G, "speculative='yes'", lambda: g(speculative="yes")),
          api(G, "draft_tokens=2 with 1 predictor",
              lambda: generate(mtp_model(), tok(2, 3), max_new_tokens=4, draft_tokens=2)),
          api(G, "draft_tokens=0", lambda: generate(mtp_model(), tok(2, 3), max_new_tokens=4, draft_tokens=0)),
          api(G, "speculative with cache=dynamic",
              lambda: generate(mtp_model(), tok(2, 3), max_new_tokens=4, speculative=True, cache="dynamic"))]
    P += [api(G, "generate valid", lambda: g(), control=True),
          api(G, "generate sampled valid", lambda: g(temperature=0.7, top_k=5, top_p=0.9), control=True),
          api(G, "temperature=nan", lambda: g(temperature=float("nan"))),
          api(G, "temperature=inf", lambda: g(temperature=float("inf"))),
          api(G, "temperature=-1", lambda: g(temperature=-1.0)),
          api(G, "temperature='0.5'", lambda: g(temperature="0.5")),
          api(G, "top_k=-1", lambda: g(temperature=1.0, top_k=-1)),
          api(G, "top_k=2.5", lambda: g(temperature=1.0, top_k=2.5)),
          api(G, "top_p=0", lambda: g(temperature=1.0, top_p=0.0)),
          api(G, "top_p=nan", lambda: g(temperature=1.0, top_p=float("nan"))),
          api(G, "top_p=1.5", lambda: g(temperature=1.0, top_p=1.5)),
          api(G, "max_new_tokens=-1", lambda: g(n=-1)),
          api(G, "max_new_tokens=2.0", lambda: g(n=2.0)),
          api(G, "max_new_tokens=10**12", lambda: g(n=10 ** 12)),
          api(G, "ids >= vocab", lambda: g(tok(2, 3) + 64)),
          api(G, "negative ids", lambda: g(tok(2, 3) - 65)),
          api(G, "1-D ids", lambda: g(tok(3))),
          api(G, "empty ids", lambda: g(tok(2, 0))),
          api(G, "float ids", lambda: g(tok(2, 3).float())),
          api(G, "zero rows", lambda: g(tok(0, 3))),
          api(G, "attention_mask wrong shape", lambda: g(attention_mask=torch.ones(2, 2))),
          api(G, "attention_mask right padded", lambda: g(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))),
          api(G, "eos_token_id=10**9", lambda: g(eos_token_id=10 ** 9)),
          api(G, "eos_token_id='x'", lambda: g(eos_token_id="x")),
          api(G, "pad_token_id=-5", lambda: g(eos_token_id=2, pad_token_id=-5)),
          api(G, "generator='seed'", lambda: g(temperature=1.0, generator="seed")),
          api(G, "model=None", lambda: generate(None, tok(2, 3))),
          api(G, "sample_next temperature=nan", lambda: sample_next(torch.randn(2, 8), float("nan"))),
          api(G, "sample_next 1-D logits", lambda: sample_next(torch.randn(8), 1.0))]

    from moge.checkpoint import load_pretrained
    O = "loaders"
    rel = lambda: FX / "released"  # noqa: E731
    P += [api(O, "load_pretrained valid", lambda: load_pretrained(rel()), control=True),
          api(O, "load_pretrained training dir valid", lambda: load_pretrained(FX / "run"), control=True),
          api(O, "dtype=torch.int8", lambda: load_pretrained(rel(), dtype=torch.int8)),
          api(O, "dtype='int8'", lambda: load_pretrained(rel(), dtype="int8")),
          api(O, "dtype=5", lambda: load_pretrained(rel(), dtype=5)),
          api(O, "dtype=torch.complex64", lambda: load_pretrained(rel(), dtype=torch.complex64)),
          api(O, "device='nodevice'", lambda: load_pretrained(rel(), device="nodevice")),
          api(O, "device='cuda:7'", lambda: load_pretrained(rel(), device="cuda:7")),
          api(O, "directory is a file", lambda: load_pretrained(FX / "binary.bin")),
          api(O, "directory missing", lambda: load_pretrained(FX / "missing")),
          api(O, "directory=None", lambda: load_pretrained(None)),
          api(O, "directory=5", lambda: load_pretrained(5))]
    return P


# ---- checkpoints: security and integrity -------------------------------------------------------------

def _security_probes() -> list[Probe]:
    S = "security"
    P = []

    def manifest_delete(wd):
        from moge.checkpoint.io import sha256_file
        victim = wd / "victim.txt"
        victim.write_text("keep me")
        ck = copy_run(wd)

        def add(s):
            s["files"][str(victim)] = {"bytes": victim.stat().st_size, "sha256": sha256_file(victim)}
        edit_state(ck, add)
        res = cli_result(["train", "--resume", "--out", ck, "--steps", "3"], wd)
        if not victim.exists():
            return {"outcome": "silent", "detail": "victim deleted", "touched_outside": True}
        return res if res["outcome"] != "silent" else {"outcome": "named", "detail": "victim kept"}
    P.append(Probe(S, "manifest absolute path deleted on resume", manifest_delete))

    def index_outside(target_kind):
        def run(wd):
            import moge.checkpoint as mc
            ck = copy_run(wd, src="released")
            outside = wd / "outside.safetensors"
            shutil.move(ck / "model.safetensors", outside)
            from safetensors import safe_open
            with safe_open(str(outside), "pt") as f:
                names = list(f.keys())
            target = str(outside) if target_kind == "abs" else "../outside.safetensors"
            (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
            try:
                mc.load_pretrained(ck)
            except BaseException as e:  # noqa: BLE001
                return classify_exception(e)
            return {"outcome": "silent", "detail": "loaded a shard outside", "touched_outside": True}
        return run
    P.append(Probe(S, "index shard absolute path", index_outside("abs")))
    P.append(Probe(S, "index shard ../ path", index_outside("rel")))

    def link_out(fname, action):
        def run(wd):
            ck = copy_run(wd, src="run" if action == "resume" else "released")
            outside = wd / f"outside-{fname}"
            shutil.move(ck / fname, outside)
            os.symlink(outside, ck / fname)
            before = outside.read_bytes()
            if action == "load":
                import moge.checkpoint as mc
                try:
                    mc.load_pretrained(ck)
                except BaseException as e:  # noqa: BLE001
                    return classify_exception(e)
                return {"outcome": "silent", "detail": f"followed {fname} link out", "touched_outside": True}
            res = cli_result(["train", "--resume", "--out", ck, "--steps", "3"], wd)
            if outside.read_bytes() != before:
                return {"outcome": "silent", "detail": f"wrote through {fname} link", "touched_outside": True}
            if res["outcome"] == "silent":
                return {"outcome": "silent", "detail": f"read {fname} through a link out", "touched_outside": True}
            return res
        return run
    P.append(Probe(S, "model.safetensors is a link out (load)", link_out("model.safetensors", "load")))
    P.append(Probe(S, "config.json is a link out (load)", link_out("config.json", "load")))
    P.append(Probe(S, "metrics.jsonl is a link out (resume appends)", link_out("metrics.jsonl", "resume")))
    P.append(Probe(S, "tokenizer.json is a link out (resume)", link_out("tokenizer.json", "resume")))

    def commit_link(wd):
        ck = copy_run(wd)
        outside = wd / "outside-dir"
        outside.mkdir()
        (outside / "precious.txt").write_text("keep me")
        os.symlink(outside, ck / ".ckpt-commit")
        res = cli_result(["train", "--resume", "--out", ck, "--steps", "3"], wd)
        if not (outside / "precious.txt").exists():
            return {"outcome": "silent", "detail": "moved a file out of a linked commit dir", "touched_outside": True}
        return res if res["outcome"] != "silent" else {"outcome": "named", "detail": "link ignored, files kept"}
    P.append(Probe(S, ".ckpt-commit is a link to another directory", commit_link))

    def staging_link(wd):
        ck = copy_run(wd)
        outside = wd / "outside-dir"
        outside.mkdir()
        (outside / "precious.txt").write_text("keep me")
        os.symlink(outside, ck / ".ckpt-staging")
        res = cli_result(["train", "--resume", "--out", ck, "--steps", "3"], wd)
        if not (outside / "precious.txt").exists():
            return {"outcome": "silent", "detail": "removed files through a linked staging dir", "touched_outside": True}
        return res if res["outcome"] != "silent" else {"outcome": "named", "detail": "link removed, files kept"}
    P.append(Probe(S, ".ckpt-staging is a link to another directory", staging_link))

    def convert_tokenizer(src_file):
        def run(wd):
            res = cli_result(["convert", FX / "released", wd / "dst", "--tokenizer", src_file()], wd)
            if res["outcome"] == "silent" and (wd / "dst" / "tokenizer.json").exists():
                return {"outcome": "silent", "detail": "copied a non-tokenizer file into the checkpoint"}
            return res
        return run
    P.append(Probe(S, "convert --tokenizer copies a binary file", convert_tokenizer(lambda: FX / "binary.bin")))
    P.append(Probe(S, "convert --tokenizer copies a JSON non-tokenizer", convert_tokenizer(lambda: FX / "notok.json")))
    P.append(Probe(S, "convert --tokenizer /etc/hostname", convert_tokenizer(lambda: Path("/etc/hostname"))))

    def verify_reads_outside(wd):
        from moge.checkpoint.training_state import verify_checkpoint
        ck = copy_run(wd)
        edit_state(ck, lambda s: s["files"].update({"/etc/hostname": {"bytes": 1, "sha256": "0" * 64}}))
        try:
            verify_checkpoint(ck)
        except BaseException as e:  # noqa: BLE001
            res = classify_exception(e)
            if "outside" not in res["detail"]:
                res.update(outcome="silent", touched_outside=True, detail="read a file outside: " + res["detail"])
            return res
        return {"outcome": "silent", "detail": "verified", "touched_outside": True}
    P.append(Probe(S, "verify_checkpoint hashes /etc/hostname", verify_reads_outside))
    return P


def _integrity_probes() -> list[Probe]:
    I = "integrity"
    P = []

    def flipped_load(how):
        def run(wd):
            ck = copy_run(wd)
            flip_weight_byte(ck / "model.safetensors")
            if how == "generate":
                res = cli_result(["generate", ck, "--prompt-ids", "1 5 7", "--max-new-tokens", "2"], wd)
                if res["outcome"] == "silent":
                    res.update(corruption_loaded=True, detail="generated from a corrupt checkpoint")
                return res
            try:
                if how == "auto":
                    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
                    from transformers import AutoModelForCausalLM
                    AutoModelForCausalLM.from_pretrained(ck)
                else:
                    import moge.checkpoint as mc
                    mc.load_pretrained(ck)
            except BaseException as e:  # noqa: BLE001
                return classify_exception(e)
            return {"outcome": "silent", "detail": "loaded flipped bytes", "corruption_loaded": True}
        return run
    P += [Probe(I, "flipped byte: load_pretrained", flipped_load("load")),
          Probe(I, "flipped byte: moge generate", flipped_load("generate")),
          Probe(I, "flipped byte: AutoModelForCausalLM", flipped_load("auto"))]

    def rewrite(wd, fn, src="released"):
        from safetensors.torch import load_file, save_file
        ck = copy_run(wd, src=src)
        t = load_file(str(ck / "model.safetensors"))
        fn(t)
        save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})
        return ck

    def nan_weight(how):
        def run(wd):
            import torch
            ck = rewrite(wd, lambda t: t["model.layers.0.self_attn.q_proj.weight"].view(-1).__setitem__(3, float("nan")))
            if how == "generate":
                for extra in ([], ["--temperature", "0.8"]):
                    res = cli_result(["generate", ck, "--prompt-ids", "1 5 7", "--max-new-tokens", "3", *extra], wd)
                    if res["outcome"] != "named":
                        return res
                return res
            import moge.checkpoint as mc
            try:
                mc.load_pretrained(ck)
            except BaseException as e:  # noqa: BLE001
                return classify_exception(e)
            return {"outcome": "silent", "detail": "NaN weights loaded", "corruption_loaded": True}
        return run
    P += [Probe(I, "NaN weight: load_pretrained", nan_weight("load")),
          Probe(I, "NaN weight: moge generate greedy+sampled", nan_weight("generate"))]

    def int32_tensor(wd):
        import torch
        ck = rewrite(wd, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.int32)))
        import moge.checkpoint as mc
        try:
            mc.load_pretrained(ck)
        except BaseException as e:  # noqa: BLE001
            return classify_exception(e)
        return {"outcome": "silent", "detail": "int32 tensor loaded"}
    P.append(Probe(I, "tensor stored as int32", int32_tensor))

    def truncated(wd):
        ck = copy_run(wd, src="released")
        p = ck / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-1000])
        import moge.checkpoint as mc
        try:
            mc.load_pretrained(ck)
        except BaseException as e:  # noqa: BLE001
            return classify_exception(e)
        return {"outcome": "silent", "detail": "truncated file loaded", "corruption_loaded": True}
    P.append(Probe(I, "truncated model.safetensors", truncated))

    def garbage_header(wd):
        ck = copy_run(wd, src="released")
        (ck / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
        import moge.checkpoint as mc
        try:
            mc.load_pretrained(ck)
        except BaseException as e:  # noqa: BLE001
            return classify_exception(e)
        return {"outcome": "silent", "detail": "garbage loaded"}
    P.append(Probe(I, "garbage safetensors header", garbage_header))

    def config_binary(wd):
        ck = copy_run(wd, src="released")
        shutil.copy(FX / "binary.bin", ck / "config.json")
        import moge.checkpoint as mc
        try:
            mc.load_pretrained(ck)
        except BaseException as e:  # noqa: BLE001
            return classify_exception(e)
        return {"outcome": "silent", "detail": "loaded"}
    P.append(Probe(I, "config.json is binary", config_binary))

    def config_field(wd):
        ck = copy_run(wd, src="released")
        c = json.loads((ck / "config.json").read_text())
        c["hidden_size"] = "sixty-four"
        (ck / "config.json").write_text(json.dumps(c))
        import moge.checkpoint as mc
        try:
            mc.load_pretrained(ck)
        except BaseException as e:  # noqa: BLE001
            return classify_exception(e)
        return {"outcome": "silent", "detail": "loaded"}
    P.append(Probe(I, "config.json hidden_size is a string", config_field))

    def tokenizer_binary(wd):
        ck = copy_run(wd, src="released")
        shutil.copy(FX / "binary.bin", ck / "tokenizer.json")
        return cli_result(["generate", ck, "--prompt", "hello", "--max-new-tokens", "2"], wd)
    P.append(Probe(I, "tokenizer.json is binary (generate --prompt)", tokenizer_binary))
    return P


# ---- command lines -----------------------------------------------------------------------------------

def _cli_probes() -> list[Probe]:
    P = []
    T = "cli-train"

    def train(*extra, out="out"):
        return lambda wd: ["train", "--out", wd / out, "--data", FX / "small.txt", *TRAIN, *map(str, extra)]
    P.append(cli(T, "train valid", train(), control=True))
    bad_train = [("--vocab-size", "0"), ("--vocab-size", "1"), ("--vocab-size", "1000000000"), ("--vocab-size", "-5"),
                 ("--seed", "-1"), ("--seed", str(2 ** 40)), ("--weight-decay", "-5"), ("--weight-decay", "nan"),
                 ("--lr", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--steps", "0"),
                 ("--batch-size", "0"), ("--seq-len", "1"), ("--seq-len", "100000000"), ("--grad-accum", "0"),
                 ("--warmup", "-1"), ("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--aux-coef", "-1"),
                 ("--aux-coef", "nan"), ("--preset", "nope"), ("--router", "nope"), ("--device", "nope"),
                 ("--device", "cuda"), ("--threads", "0"), ("--eval-every", "-1"), ("--log-every", "0"),
                 ("--ep", "0"), ("--ep", "2"), ("--steps", "abc"), ("--batch-size", "1000000000"),
                 ("--eval-batches", "0"), ("--save-every", "-1"), ("--tokenizer", str(FX / "missing.json")),
                 ("--tokenizer", str(FX / "binary.bin")), ("--tokenizer", str(FX / "notok.json")),
                 ("--mtp", "-1"), ("--mtp", "abc"), ("--mtp", "1000"), ("--mtp-coef", "nan"), ("--mtp-coef", "-1"),
                 ("--mtp-coef", "inf")]
    for flag, val in bad_train:
        P.append(cli(T, f"train {flag} {val}", train(flag, val)))

    def train_data(path):
        return lambda wd: ["train", "--out", wd / "out", "--data", path(wd), *TRAIN]
    P += [cli(T, "train --data missing", train_data(lambda wd: FX / "missing.txt")),
          cli(T, "train --data binary", train_data(lambda wd: FX / "binary.bin")),
          cli(T, "train --data empty", train_data(lambda wd: FX / "empty.txt")),
          cli(T, "train --data dir without text", train_data(lambda wd: (wd / "d").mkdir() or wd / "d")),
          cli(T, "train --data bad jsonl", train_data(lambda wd: (wd / "x.jsonl").write_text("{bad\n") and wd / "x.jsonl")),
          cli(T, "train --data jsonl without text", train_data(
              lambda wd: (wd / "y.jsonl").write_text('{"t": 1}\n') and wd / "y.jsonl"))]

    def out_is_file(cmd):
        def argv(wd):
            (wd / "afile").write_text("x")
            if cmd == "train":
                return ["train", "--out", wd / "afile", "--data", FX / "small.txt", *TRAIN]
            if cmd == "convert":
                return ["convert", FX / "released", wd / "afile"]
            return ["demo", "--out", wd / "afile", "--steps", "1", "--preset", "debug", "--no-progress"]
        return argv
    P.append(cli(T, "train --out is an existing file", out_is_file("train")))
    P.append(cli(T, "train --out unwritable (/proc)", lambda wd: ["train", "--out", "/proc/moge-probe", "--data",
                                                                   FX / "small.txt", *TRAIN]))
    P.append(cli(T, "train --resume on an empty directory", lambda wd: (wd / "e").mkdir() or
                 ["train", "--resume", "--out", wd / "e"]))
    P.append(cli(T, "train --resume on a missing directory", lambda wd: ["train", "--resume", "--out", wd / "nope"]))

    V = "cli-convert"
    P += [cli(V, "convert valid", lambda wd: ["convert", FX / "released", wd / "dst"], control=True),
          cli(V, "convert src missing", lambda wd: ["convert", wd / "missing", wd / "dst"]),
          cli(V, "convert dst is a file", out_is_file("convert")),
          cli(V, "convert src binary .pt", lambda wd: ["convert", shutil.copy(FX / "binary.bin", wd / "x.pt"), wd / "d",
                                                       "--preset", "debug"]),
          cli(V, "convert src garbage .safetensors", lambda wd: ["convert", shutil.copy(FX / "binary.bin", wd / "x.safetensors"),
                                                                 wd / "d", "--preset", "debug"]),
          cli(V, "convert --max-shard-size 0", lambda wd: ["convert", FX / "released", wd / "d", "--max-shard-size", "0"]),
          cli(V, "convert --max-shard-size abc", lambda wd: ["convert", FX / "released", wd / "d", "--max-shard-size", "abc"]),
          cli(V, "convert --max-shard-size -1", lambda wd: ["convert", FX / "released", wd / "d", "--max-shard-size", "-1"]),
          cli(V, "convert --tokenizer missing", lambda wd: ["convert", FX / "released", wd / "d", "--tokenizer", FX / "no.json"]),
          cli(V, "convert --config missing", lambda wd: ["convert", FX / "released" / "model.safetensors", wd / "d",
                                                         "--config", FX / "no.json"]),
          cli(V, "convert --config binary", lambda wd: ["convert", FX / "released" / "model.safetensors", wd / "d",
                                                        "--config", FX / "binary.bin"]),
          cli(V, "convert --preset nope", lambda wd: ["convert", FX / "released" / "model.safetensors", wd / "d",
                                                      "--preset", "nope"]),
          cli(V, "convert --config and --preset", lambda wd: ["convert", FX / "released" / "model.safetensors", wd / "d",
                                                              "--config", FX / "released", "--preset", "debug"]),
          cli(V, "convert state dict with wrong preset", lambda wd: ["convert", FX / "released" / "model.safetensors",
                                                                     wd / "d", "--preset", "tiny"]),
          cli(V, "convert dst == src", lambda wd: ["convert", copy_run(wd, src="released"), wd / "ck"]),
          cli(V, "convert --dtype int8", lambda wd: ["convert", FX / "released", wd / "d", "--dtype", "int8"]),
          cli(V, "convert unwritable dst (/proc)", lambda wd: ["convert", FX / "released", "/proc/moge-probe"])]

    def flipped_src(wd):
        ck = copy_run(wd)
        flip_weight_byte(ck / "model.safetensors")
        return ["convert", ck, wd / "d"]
    P.append(cli(V, "convert a corrupt training checkpoint", flipped_src))

    N = "cli-generate"
    ck = lambda wd: FX / "run"  # noqa: E731

    def gen(*extra, prompt=("--prompt-ids", "1 5 7")):
        return lambda wd: ["generate", ck(wd), *prompt, "--max-new-tokens", "2", *map(str, extra)]
    P += [cli(N, "generate valid ids", gen(), control=True),
          cli(N, "generate valid text", gen(prompt=("--prompt", "def f")), control=True),
          cli(N, "generate checkpoint missing", lambda wd: ["generate", wd / "nope", "--prompt-ids", "1"]),
          cli(N, "generate checkpoint is a file", lambda wd: ["generate", FX / "binary.bin", "--prompt-ids", "1"]),
          cli(N, "generate no prompt", lambda wd: ["generate", ck(wd)]),
          cli(N, "generate both prompt kinds", gen("--prompt", "x")),
          cli(N, "generate --prompt-ids 'a b'", gen(prompt=("--prompt-ids", "a b"))),
          cli(N, "generate --prompt-ids 99999", gen(prompt=("--prompt-ids", "99999"))),
          cli(N, "generate --prompt-ids -1", gen(prompt=("--prompt-ids", "-1"))),
          cli(N, "generate --prompt-ids ''", gen(prompt=("--prompt-ids", ""))),
          cli(N, "generate --max-new-tokens -1", gen("--max-new-tokens", "-1")),
          cli(N, "generate --max-new-tokens 10**12", gen("--max-new-tokens", str(10 ** 12))),
          cli(N, "generate --temperature nan", gen("--temperature", "nan")),
          cli(N, "generate --temperature -1", gen("--temperature", "-1")),
          cli(N, "generate --temperature inf", gen("--temperature", "inf")),
          cli(N, "generate --top-k -1", gen("--temperature", "1", "--top-k", "-1")),
          cli(N, "generate --top-p 0", gen("--temperature", "1", "--top-p", "0")),
          cli(N, "generate --top-p nan", gen("--temperature", "1", "--top-p", "nan")),
          cli(N, "generate --device nope", gen("--device", "nope")),
          cli(N, "generate --device cuda", gen("--device", "cuda")),
          cli(N, "generate --dtype int8", gen("--dtype", "int8")),
          cli(N, "generate --seed -1", gen("--seed", "-1")),
          cli(N, "generate --seed 2**70", gen("--seed", str(2 ** 70))),
          cli(N, "generate --speculative without MTP predictors", gen("--speculative")),
          cli(N, "generate --draft-tokens 0", gen("--draft-tokens", "0")),
          cli(N, "generate --speculative --cache dynamic", gen("--speculative", "--cache", "dynamic")),
          cli(N, "generate --prompt without tokenizer", lambda wd: ["generate", (lambda c: ((c / "tokenizer.json").unlink(), c)[1])(
              copy_run(wd, src="released")), "--prompt", "x"])]

    O = "cli-other"
    P += [cli(O, "info valid", ["info", "debug"], control=True),
          cli(O, "route valid", ["route", "--batches", "5"], control=True),
          cli(O, "info unknown preset", ["info", "nope"]),
          cli(O, "info binary file", lambda wd: ["info", FX / "binary.bin"]),
          cli(O, "info JSON list", lambda wd: ["info", (wd / "c.json").write_text("[1]") and wd / "c.json"]),
          cli(O, "info bad field", lambda wd: ["info", (wd / "c.json").write_text('{"hidden_size": -3}') and wd / "c.json"]),
          cli(O, "info directory without config", lambda wd: ["info", wd]),
          cli(O, "route --experts 0", ["route", "--experts", "0"]),
          cli(O, "route --k 3 --groups 2", ["route", "--k", "3", "--groups", "2"]),
          cli(O, "route --tokens 10**9", ["route", "--tokens", str(10 ** 9)]),
          cli(O, "route --batches 10**9", ["route", "--batches", str(10 ** 9)]),
          cli(O, "route --experts 10**8", ["route", "--experts", str(10 ** 8), "--groups", "8", "--k", "8"]),
          cli(O, "route --seed -1", ["route", "--seed", "-1", "--batches", "2"]),
          cli(O, "demo --out is a file", out_is_file("demo")),
          cli(O, "demo --routers ''", lambda wd: ["demo", "--out", wd / "d", "--routers", ",", "--steps", "1"]),
          cli(O, "demo --routers bogus", lambda wd: ["demo", "--out", wd / "d", "--routers", "bogus", "--steps", "1",
                                                     "--preset", "debug", "--no-progress"]),
          cli(O, "demo --preset nope", lambda wd: ["demo", "--out", wd / "d", "--preset", "nope", "--steps", "1"]),
          cli(O, "demo --steps 0", lambda wd: ["demo", "--out", wd / "d", "--steps", "0", "--preset", "debug"]),
          cli(O, "demo --vocab-size 0", lambda wd: ["demo", "--out", wd / "d", "--vocab-size", "0", "--steps", "1",
                                                    "--preset", "debug", "--no-progress"]),
          cli(O, "demo --jobs 0", lambda wd: ["demo", "--out", wd / "d", "--jobs", "-1", "--steps", "1",
                                              "--preset", "debug", "--no-progress"]),
          cli(O, "demo --device nope", lambda wd: ["demo", "--out", wd / "d", "--device", "nope", "--steps", "1"]),
          cli(O, "unknown command", ["bogus"])]

    Z = "simulate"
    P += [cli(Z, "simulate perf valid", ["simulate", "perf"], control=True),
          cli(Z, "perf --expert-ep 0", ["simulate", "perf", "--expert-ep", "0"]),
          cli(Z, "perf --set mem_bw_gbs=0", ["simulate", "perf", "--set", "mem_bw_gbs=0"]),
          cli(Z, "perf --set mem_bw_gbs=fast", ["simulate", "perf", "--set", "mem_bw_gbs=fast"]),
          cli(Z, "perf --set mem_bw_gbs=-1", ["simulate", "perf", "--set", "mem_bw_gbs=-1"]),
          cli(Z, "perf --hardware binary", lambda wd: ["simulate", "perf", "--hardware",
                                                       shutil.copy(FX / "binary.bin", wd / "hw.json")]),
          cli(Z, "perf --model binary", lambda wd: ["simulate", "perf", "--model",
                                                    shutil.copy(FX / "binary.bin", wd / "m.json")]),
          cli(Z, "perf --cards 0", ["simulate", "perf", "--cards", "0"]),
          cli(Z, "perf --batch 0", ["simulate", "perf", "--batch", "0"]),
          cli(Z, "imbalance --from-metrics binary", lambda wd: ["simulate", "imbalance", "--trials", "10",
                                                                "--from-metrics", FX / "binary.bin"]),
          cli(Z, "imbalance --devices 0", ["simulate", "imbalance", "--devices", "0", "--trials", "10"]),
          cli(Z, "search --cards 0", ["simulate", "search", "--cards", "0"]),
          cli(Z, "search --calibration missing", ["simulate", "search", "--calibration", "/nonexistent.json",
                                                  "--hidden", "4096", "--layers", "40"]),
          cli(Z, "paper --set bogus=1", ["simulate", "paper", "--set", "bogus=1"])]
    return P


# ---- resume and operational faults ---------------------------------------------------------------------

def _resume_probes() -> list[Probe]:
    Q = "resume"
    P = []

    def resume_after(edit, name):
        def run(wd):
            ck = copy_run(wd)
            edit(ck)
            return cli_result(["train", "--resume", "--out", ck, "--steps", "3"], wd)
        return Probe(Q, name, run)
    P += [resume_after(lambda ck: edit_state(ck, lambda s: s.__setitem__("step", "x")), "state step='x'"),
          resume_after(lambda ck: edit_state(ck, lambda s: s.pop("sampler")), "state without sampler"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["sampler"].__setitem__("position", -5)), "sampler position -5"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["sampler"].__setitem__("position", 10 ** 9)),
                       "sampler position 10**9"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["train_config"].__setitem__("lr", "abc")), "train_config lr='abc'"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["train_config"].__setitem__("batch_size", 0)),
                       "train_config batch_size=0"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["rng"]["numpy"].__setitem__("pos", "x")), "rng numpy pos='x'"),
          resume_after(lambda ck: edit_state(ck, lambda s: s["optimizer"].__setitem__("step", [])), "optimizer step=[]"),
          resume_after(lambda ck: edit_state(ck, lambda s: s.__setitem__("version", 99)), "state version 99"),
          resume_after(lambda ck: edit_state(ck, lambda s: s.__setitem__("files", [])), "files is a list"),
          resume_after(lambda ck: state_file(ck).write_text("{trunc"), "state file truncated"),
          resume_after(lambda ck: (edit_state(ck, lambda s: s["files"].pop("model.safetensors")),
                                   flip_weight_byte(ck / "model.safetensors")), "weights left out of the manifest, then flipped"),
          resume_after(lambda ck: flip_weight_byte(ck / "optimizer.safetensors"), "optimizer file flipped"),
          resume_after(lambda ck: (ck / "tokenizer.json").unlink(), "tokenizer.json deleted")]

    def changed_flags(wd):
        ck = copy_run(wd)
        res = cli_result(["train", "--resume", "--out", ck, "--steps", "3", "--lr", "0.05", "--batch-size", "4"], wd)
        err = res.get("stderr", "")
        if res["outcome"] == "silent":
            ok = "--lr" in err and "--batch-size" in err
            return {"outcome": "named" if ok else "silent", "detail": "warned" if ok else "flags ignored without a word"}
        return res
    P.append(Probe(Q, "resume with changed --lr/--batch-size", changed_flags))

    def data_edited(wd):
        data = wd / "data.txt"
        text = (FX / "small.txt").read_text()
        data.write_text(text)
        r = _moge("train", "--out", str(wd / "r"), "--data", str(data), *TRAIN)
        if r.returncode:
            return {"outcome": "traceback", "detail": "setup failed: " + r.stderr[-200:]}
        data.write_text(text.replace("walks over", "walks under"))
        res = cli_result(["train", "--resume", "--out", wd / "r", "--steps", "3"], wd)
        return res if res["outcome"] != "silent" else {"outcome": "silent", "detail": "resumed on edited data"}
    P.append(Probe(Q, "data edited, same row count", data_edited))

    def stale_metrics(wd):
        out = wd / "out"
        out.mkdir()
        (out / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 7, "loss": 1.0, "marker": "OLD"}) + "\n")
        res = cli_result(["train", "--out", out, "--data", FX / "small.txt", *TRAIN], wd)
        if res["outcome"] != "silent":
            return res
        if "OLD" in (out / "metrics.jsonl").read_text():
            return {"outcome": "silent", "detail": "old metrics lines kept"}
        return {"outcome": "named", "detail": "old metrics discarded"}
    P.append(Probe(Q, "fresh run over a run killed before its first checkpoint", stale_metrics))

    def concurrent(wd):
        env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
        first = subprocess.Popen([sys.executable, "-m", "moge", "train", "--out", str(wd / "o"), "--data",
                                  str(FX / "small.txt"), "--steps", "400", "--batch-size", "2", "--seq-len", "16",
                                  "--vocab-size", "300", "--no-progress", "--threads", "1", "--save-every", "0"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (wd / "o" / "metrics.jsonl").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            res = cli_result(["train", "--out", wd / "o", "--data", FX / "small.txt", *TRAIN], wd)
            alive = first.poll() is None
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        if not alive:
            return {"outcome": "traceback", "detail": "the first run ended before the probe"}
        if res["outcome"] == "named" and str(first.pid) not in res["detail"] + res.get("stderr", ""):
            res["outcome"] = "plain"
            res["detail"] += " (holder pid not named)"
        return res
    P.append(Probe(Q, "second run on a directory in use", concurrent))

    def full_disk(wd):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        return cli_result(["train", "--out", wd / "o", "--data", FX / "small.txt", *TRAIN], wd)
    import resource
    P.append(Probe(Q, "write fails at the checkpoint (file size limit)", full_disk))
    return P


def _new_command_probes() -> list[Probe]:
    """Entry points added after the first probe run (quantize, analyze, the decode engine): same rules."""
    import torch
    Q = "new-commands"
    P = [cli(Q, "quantize valid (--eval, no output)", lambda wd: ["quantize", FX / "run", "--eval", "--calib-tokens",
                                                                 "256", "--calib-data", FX / "small.txt",
                                                                 "--eval-rows", "2", "--no-progress"], control=True)]
    quant = lambda *extra: lambda wd: ["quantize", FX / "run", "--out", wd / "q", "--calib-data", FX / "small.txt",
                                       "--calib-tokens", "256", "--no-progress", *map(str, extra)]
    for extra in [("--alpha", "1.5"), ("--alpha", "nan"), ("--calib-tokens", "0"), ("--calib-tokens", "-3"),
                  ("--calib-seq-len", "1"), ("--batch-size", "0"), ("--smoothing", "magic"), ("--act", "int4"),
                  ("--min-expert-tokens", "-1"), ("--max-shard-size", "huge"), ("--device", "nope"),
                  ("--seed", "-1")]:
        P.append(cli(Q, f"quantize {' '.join(extra)}", quant(*extra)))
    for name in ("missing.txt", "empty.txt", "binary.bin"):
        P.append(cli(Q, f"quantize --calib-data {name}", lambda wd, name=name: quant("--calib-data", FX / name)(wd)))
    P += [cli(Q, "quantize a missing checkpoint", lambda wd: ["quantize", wd / "nope", "--out", wd / "q"]),
          cli(Q, "quantize a binary file as checkpoint", lambda wd: ["quantize", FX / "binary.bin", "--out", wd / "q"]),
          cli(Q, "quantize --out is a file", lambda wd: (wd / "f").write_text("x") and
              ["quantize", FX / "run", "--out", wd / "f", "--calib-data", FX / "small.txt", "--calib-tokens", "256"])]
    ana = lambda *extra: lambda wd: ["analyze", FX / "run", "--out", wd / "a", "--data", FX / "small.txt",
                                     "--tokens", "256", "--no-progress", *map(str, extra)]
    P.append(cli(Q, "analyze valid", ana(), control=True))
    for extra in [("--tokens", "0"), ("--seq-len", "1"), ("--batch-size", "0"), ("--devices", "0"),
                  ("--devices", "3"), ("--threads", "0"), ("--device", "nope")]:
        P.append(cli(Q, f"analyze {' '.join(extra)}", ana(*extra)))
    for flag, name in (("--compare", "binary.bin"), ("--tokenizer", "notok.json"), ("--data", "missing.txt"),
                       ("--compare", "released")):
        P.append(cli(Q, f"analyze {flag} {name}", lambda wd, f=flag, n=name: ana(f, FX / n)(wd),
                     control=name == "released"))
    P += [cli(Q, "generate --cache bogus", lambda wd: ["generate", FX / "run", "--prompt-ids", "1 2", "--cache", "bogus"]),
          cli(Q, "analyze --out is a file", lambda wd: (wd / "g").write_text("x") and
              ["analyze", FX / "run", "--out", wd / "g", "--data", FX / "small.txt", "--tokens", "256"])]

    def model():
        from moge.checkpoint import load_pretrained
        return load_pretrained(FX / "run")

    def gen(**kw):
        from moge.generate import generate
        return lambda: generate(model(), torch.tensor([[1, 5, 9]]), **{"max_new_tokens": 4, **kw})
    P += [api(Q, "generate cache='paged'", gen(cache="paged")),
          api(Q, "generate temperature=inf", gen(temperature=float("inf"))),
          api(Q, "generate top_p=0", gen(top_p=0.0)),
          api(Q, "generate engine of another model", lambda: __import__("moge.generate", fromlist=["generate"])
              .generate(model(), torch.tensor([[1, 5]]), max_new_tokens=2,
                        engine=__import__("moge.engine.decode", fromlist=["DecodeEngine"]).DecodeEngine(model(), 16))),
          api(Q, "StaticKVCache capacity 0", lambda: __import__("moge.engine", fromlist=["StaticKVCache"])
              .StaticKVCache(1, 1, 1, 8, 0)),
          api(Q, "sample_next 1-D logits", lambda: __import__("moge.engine", fromlist=["sample_next"])
              .sample_next(torch.randn(5))),
          api(Q, "sample_next temperature=nan", lambda: __import__("moge.engine", fromlist=["sample_next"])
              .sample_next(torch.randn(2, 5), temperature=float("nan"))),
          api(Q, "generate max_new_tokens past the cache", gen(max_new_tokens=10 ** 7)),
          api(Q, "generate valid", gen(), control=True)]
    return P


def all_probes() -> list[Probe]:
    return (_library_probes() + _security_probes() + _integrity_probes() + _cli_probes() + _resume_probes()
            + _new_command_probes())
