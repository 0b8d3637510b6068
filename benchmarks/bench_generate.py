"""Benchmark generation: ms per decode step and tokens/s of moge against transformers' Qwen2-MoE.

Model: the ``small`` preset (H=768, 12 layers, 64 experts in 8 groups, K=8, F=256, shared 1024,
V=32000), random weights, greedy decoding, equal-length prompts. On a CPU moge's weights and caches lie
on transparent huge pages, as ``load_pretrained`` and ``StaticKVCache`` put them (``moge.memory``);
transformers' stay where torch's allocator puts them, as transformers runs. Contenders:

* ``moge static (MoGE)`` / ``moge static (top-K)``: ``moge.generate`` on its default fast path
  (static cache, fixed-shape step; on CUDA replayed as a CUDA graph), the same model with either router;
* ``moge compiled (MoGE)``: the same engine with its decode step compiled (``DecodeEngine(compile=True)``:
  one-row products and the routed experts in reduce form, see ``moge.experts.reduce``); compiled once
  per batch size in the warm-up round;
* ``moge dynamic (MoGE)``: ``moge.generate(cache="dynamic")``, the plain loop over the model's forward;
* ``moge static W8A8 (MoGE)``: the same fast path on the model quantized in-process by ``moge.quant.quantize``
  (static activation scales, calibrated on two random rows; float32 only, ``--w8a8-batches``), with its
  own bound (its int8 weights' bytes);
* ``moge [compiled] int8 / int4 (MoGE)``: the float32 model with weight-only int8 (per channel) or int4
  (group-wise) weights, head included (``moge.quant.quantize_weights``), eager (torch's weight-only
  kernels, bf16 activations) and compiled (reduce form, float activations), at ``--w8a8-batches``;
* ``moge via AutoModel.generate``: the transformers wrapper (same weights) through its ``generate``
  (transformers' loop under ``inference_mode``, its default dynamic cache); on request only
  (``--contenders``), ``moge via AutoModel.generate, no_grad``: the same loop as transformers runs it,
  under ``no_grad``, where moge's few-rows CPU kernels do not apply;
* ``transformers dynamic`` / ``transformers static``: ``Qwen2MoeForCausalLM`` at matched shapes
  (``norm_topk_prob=False``; its o_proj has no bias and its shared expert a sigmoid gate, so it has
  0.1% fewer parameters; printed) with its default cache or ``cache_implementation="static"``, each
  under every experts implementation that runs here (``eager``, ``grouped_mm``), the best one kept;
* ``llama.cpp f32`` / ``bf16`` / ``q8_0`` / ``q4_0``: that Qwen2-MoE converted to GGUF by llama.cpp's
  converter and timed by ``llama-bench`` (batch 1, ``-d`` = moge's prompt length, ``-n`` = its new
  tokens, the same threads), when ``--llama-bench`` / ``--llama-convert`` (or ``LLAMA_BENCH`` /
  ``LLAMA_CONVERT``) name them: ``benchmarks/llamacpp.py`` says how to build both from PyPI. q8_0 and
  q4_0 run in the float32 round, beside moge's 8-bit rows.

On CPU, ms/step is the median gap between consecutive tokens of one run of ``n`` new tokens (a
decode step plus its sampling; the prefill is excluded), timestamped by a transformers streamer or,
for moge, by a wrapper around the sampler; on CUDA (asynchronous) it is (time of n tokens - time of
1) / (n - 1); llama.cpp's is ``llama-bench``'s own tokens/s. Contenders run in ``--repeats`` interleaved
rounds and keep their best, which filters other jobs on a shared machine; tokens/s = batch / (ms/step).
In the same run the script measures the machine's read bandwidth (``x.sum()`` over 512 MiB written
first, on huge pages where there are any, best of 5) and prints the weights-read bound per step: the bytes of the experts the batch actually
touches (counted by a hook on one extra run of that model) plus every other weight read per step (attention,
norms, router, shared expert, output head), the batch's embedding rows and the KV cache at the mean
context, over that bandwidth. With llama.cpp rows it adds a table of moge's best row per weight format
against llama.cpp's at batch 1. It writes the ``## Generation (bench_generate.py)`` section of
``benchmarks/RESULTS.md`` and ``benchmarks/results_generate.png``.

Usage: ``PYTHONPATH=src python benchmarks/bench_generate.py [--device cpu] [--dtypes float32 bfloat16]``
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.config import get_config  # noqa: E402
from moge.engine.decode import DecodeEngine  # noqa: E402
from moge.generate import generate  # noqa: E402
from moge.memory import huge_page_bytes, move_to_huge_pages  # noqa: E402
from moge.model import MoGEForCausalLM, count_parameters  # noqa: E402
from llamacpp import LlamaCpp, save_qwen  # noqa: E402
from results_md import machine, read_bandwidth, replace_section  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

SECTION = "## Generation (bench_generate.py)"
OURS = ("moge static (MoGE)", "moge static (top-K)", "moge dynamic (MoGE)", "moge via AutoModel.generate",
        "moge static W8A8 (MoGE)")
W8A8 = OURS[4]
COMPILED = "moge compiled (MoGE)"
# Weight-only int8 / int4 (moge.quant.quantize_weights, head included) of the float32 model: eager and compiled.
WEIGHT_ONLY = {"moge int8 (MoGE)": ("int8", False), "moge compiled int8 (MoGE)": ("int8", True),
               "moge int4 (MoGE)": ("int4", False), "moge compiled int4 (MoGE)": ("int4", True)}
THEIRS = ("transformers dynamic", "transformers static")
# llama.cpp's rows per moge dtype loop: its GGUF type of the same weights (8- and 4-bit in the float32 loop).
LLAMA = {"float32": ("llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"), "bfloat16": ("llama.cpp bf16",)}
LLAMA_FMT = {"llama.cpp f32": "float32", "llama.cpp bf16": "bfloat16", "llama.cpp q8_0": "int8", "llama.cpp q4_0": "int4"}
NO_GRAD = "moge via AutoModel.generate, no_grad"  # not run by default: the A/B of the wrapper's generate
MOGE_ROWS = OURS + (COMPILED, *WEIGHT_ONLY, NO_GRAD)
PEERS = THEIRS + tuple(LLAMA_FMT)


class Skip(Exception):
    """A contender that is not measured at this size (W8A8 outside --w8a8-batches)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def init_(model: torch.nn.Module, std: float = 0.02) -> None:
    """Deterministic init of every parameter (transformers leaves stacked experts uninitialised)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)


def build_moge(router: str, dtype, device) -> MoGEForCausalLM:
    """The ``small`` preset with seeded random weights; on a CPU they go on huge pages, as
    ``load_pretrained`` puts a loaded checkpoint's (moge.memory)."""
    torch.manual_seed(0)
    model = MoGEForCausalLM(get_config("small", router=router)).to(device=device, dtype=dtype).eval()
    move_to_huge_pages(model)
    return model


def build_wrapper(native: MoGEForCausalLM):
    """The transformers wrapper around the same weights (tensors shared, not copied)."""
    from moge.hf import PanguProMoEConfig, PanguProMoEForCausalLM
    with torch.device("meta"):
        w = PanguProMoEForCausalLM(PanguProMoEConfig.from_moge_config(native.config))
    w.load_state_dict(native.state_dict(), assign=True)
    for name, buf in native.named_buffers():  # non-persistent buffers (RoPE tables) are not in state_dict
        mod_name, _, attr = name.rpartition(".")
        setattr(w.get_submodule(mod_name), attr, buf)
    w.generation_config.eos_token_id = None
    return w.eval()


def build_qwen(dtype, device):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    c = get_config("small")
    cfg = Qwen2MoeConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                         max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                         num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                         moe_intermediate_size=c.moe_intermediate_size,
                         shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                         intermediate_size=c.shared_expert_intermediate_size, norm_topk_prob=False,
                         decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                         rms_norm_eps=c.rms_norm_eps, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    with torch.device("meta"):
        m = Qwen2MoeForCausalLM(cfg)
    m = m.to_empty(device="cpu")
    init_(m)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.to(device=device, dtype=dtype).eval()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_w8a8(native: MoGEForCausalLM) -> MoGEForCausalLM:
    """A W8A8 copy of ``native`` (static activation scales; calibration on two random rows: speed does
    not depend on calibration quality)."""
    import copy

    from moge.quant import quantize
    q = copy.deepcopy(native)
    calib = torch.randint(3, native.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    quantize(q, calib.to(next(native.parameters()).device), act="static", progress=False)
    return q.eval()


def build_weight_only(native: MoGEForCausalLM, fmt: str) -> MoGEForCausalLM:
    """A copy of ``native`` with weight-only int8 (per channel) or int4 (default groups) weights, head included."""
    from moge.quant import quantize_weights
    model = copy.deepcopy(native)
    quantize_weights(model, 8 if fmt == "int8" else 4, None, head=True)
    return model


def touched_expert_bytes(model: MoGEForCausalLM, ids, n_new: int) -> float:
    """Mean bytes of routed-expert weights one decode step reads: distinct experts per MoE layer per
    step, counted by a hook on an extra (untimed) static run, times one expert's bytes (float or int8
    weights with their scales)."""
    counts = []

    def hook(mod, args):
        if args[0].shape[0] == ids.shape[0]:  # decode calls only (T = B)
            counts.append(int(args[1].unique().numel()))

    hs = [m.mlp.experts.register_forward_pre_hook(hook) for m in model.model.layers if m.is_moe]
    try:
        generate(model, ids, max_new_tokens=n_new)
    finally:
        for h in hs:
            h.remove()
    ex = model.model.layers[0].mlp.experts
    per_expert = nbytes([*ex.parameters(), *ex.buffers()]) / ex.num_experts
    steps = len(counts) / len(hs)
    return sum(counts) * per_expert / steps


def other_bytes(model: MoGEForCausalLM, batch: int, context: float) -> float:
    """Bytes every step reads besides the routed experts: all other weights (float or int8, with their
    scales) except the embedding table (only the batch's rows), and the KV cache at ``context`` positions."""
    emb = model.model.embed_tokens.weight
    cfg = model.config
    n = nbytes(t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if ".experts." not in name and "embed_tokens" not in name and "rotary" not in name)
    kv = cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * cfg.resolved_head_dim * context
    return n + (batch * cfg.hidden_size + kv) * emb.element_size()


class TokenClock:
    """Timestamps of generated tokens: a transformers ``streamer`` (``put`` per token), and for moge a
    wrapper around the samplers of both loops (one call per token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # transformers streamer protocol (the first put is the prompt)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def wrap(self, fn):
        def timed_fn(*a, **k):
            out = fn(*a, **k)
            self.times.append(time.perf_counter())
            return out
        return timed_fn

    def step(self) -> float:
        """Median seconds between consecutive tokens (a decode step plus its sampling)."""
        gaps = sorted(b - a for a, b in zip(self.times[1:], self.times[2:]))
        return gaps[len(gaps) // 2]


def moge_clocked(run):
    """Run a moge.generate call with the per-token sampler wrapped; returns its median step."""
    import moge.engine.decode as dec
    import moge.generate as gen
    clock = TokenClock()
    saved = dec.sample_next, gen.sample_next
    dec.sample_next, gen.sample_next = clock.wrap(saved[0]), clock.wrap(saved[1])
    try:
        run()
    finally:
        dec.sample_next, gen.sample_next = saved
    return clock.step()


def step_time(run, device, n_new: int, clocked: bool) -> float:
    """Seconds per decode step of one run: on CPU the median gap between tokens (``run(n, clock)``
    reports it), on CUDA (asynchronous, no per-token host time) (time of n tokens - time of 1) / (n - 1)."""
    if clocked:
        return run(n_new, True)
    t1 = timed(lambda: run(1, False), device)
    return max(timed(lambda: run(n_new, False), device) - t1, 1e-9) / (n_new - 1)


def llama_run(llama: LlamaCpp, qwen, gguf_dir: Path, fmt: str, args):
    """A contender timing ``llama-bench`` on the matched Qwen2-MoE converted to ``fmt``'s GGUF type,
    converted once (kept in ``gguf_dir``), at the same context length as moge's prompt."""
    def run(ids, n, clock):
        if ids.shape[0] not in args.llama_batches:
            raise Skip
        gguf_dir.mkdir(exist_ok=True)
        hf_dir = gguf_dir / "hf"
        if not (hf_dir / "config.json").exists():
            save_qwen(copy.deepcopy(qwen), gguf_dir)
        path = llama.to_gguf(hf_dir, gguf_dir, fmt)
        return llama.ms_per_token(path, args.threads, max(n, 2), ids.shape[1]) / 1e3
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="*", default=None, help="default: float32 bfloat16 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=128, help="prompt length")
    ap.add_argument("--big-batch", type=int, default=32, help="CPU: batches from this size use --big-prompt")
    ap.add_argument("--big-prompt", type=int, default=32, help="CPU: prompt length for large batches")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 16 on CPU, 128 on CUDA")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contenders", nargs="*", default=None, help=f"subset of {MOGE_ROWS + THEIRS}")
    ap.add_argument("--w8a8-batches", nargs="*", type=int, default=[1, 8],
                    help="batches of the W8A8 and weight-only int8/int4 rows (float32)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of results_generate.json this run does not measure (e.g. another dtype)")
    ap.add_argument("--speculative", default=None, metavar="CKPT",
                    help="also time MTP speculative decoding (bench_speculative.py's rows) on this checkpoint "
                         "trained with moge train --mtp, at --speculative-batches, --new-tokens, --repeats")
    ap.add_argument("--speculative-batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary (else $LLAMA_BENCH; "
                    "without it the llama.cpp rows are skipped; benchmarks/llamacpp.py says how to build it)")
    ap.add_argument("--llama-convert", default=None, help="llama.cpp's convert_hf_to_gguf.py (else $LLAMA_CONVERT)")
    ap.add_argument("--gguf-dir", default=str(Path(tempfile.gettempdir()) / "moge-bench-gguf"),
                    help="where the converted Qwen2-MoE and its GGUF files are kept between runs (~4.5 GB)")
    ap.add_argument("--llama-batches", nargs="*", type=int, default=[1], help="batches of the llama.cpp rows "
                    "(llama-bench decodes one sequence)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    n_new = args.new_tokens or (128 if device.type == "cuda" else 16)
    llama = LlamaCpp.find(args.llama_bench, args.llama_convert) if device.type == "cpu" else None
    names = args.contenders or list(OURS + (COMPILED, *WEIGHT_ONLY) + THEIRS + (tuple(LLAMA_FMT) if llama else ()))
    if any(n in LLAMA_FMT for n in names) and llama is None:
        print("llama.cpp rows skipped: no llama-bench / convert_hf_to_gguf.py (--llama-bench, --llama-convert)")
    bw = read_bandwidth(device)
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s (x.sum() over 512 MiB)", flush=True)
    gguf_dir = Path(args.gguf_dir)

    def prompt_len(b):
        return args.big_prompt if device.type == "cpu" and b >= args.big_batch else args.prompt

    inputs = {b: torch.randint(3, 32000, (b, prompt_len(b)), generator=torch.Generator().manual_seed(b)).to(device)
              for b in args.batches}
    rows: list[dict] = []
    bounds: dict[tuple[str, int], float] = {}
    clocked = device.type == "cpu"
    for dt_name in dtypes:
        dtype = getattr(torch, dt_name)
        contenders = {}  # name -> (run(ids, n, clocked) -> seconds or None, note)
        models = {}
        if set(names) & {OURS[0], OURS[2], OURS[3], NO_GRAD, W8A8, COMPILED, *WEIGHT_ONLY}:
            models["moge"] = build_moge("moge", dtype, device)
        if W8A8 in names and dtype == torch.float32:
            models["w8a8"] = build_w8a8(models["moge"])
        for name, (fmt, _) in WEIGHT_ONLY.items():
            if name in names and dtype == torch.float32 and fmt not in models:
                models[fmt] = build_weight_only(models["moge"], fmt)
        if OURS[1] in names:
            models["topk"] = build_moge("topk", dtype, device)
        for key in ("w8a8", "int8", "int4"):  # built from the moved model: their new tensors move too
            if key in models:
                move_to_huge_pages(models[key])
        if device.type == "cpu":
            print(f"{dt_name}: {huge_page_bytes() / 2**20:.0f} MiB of this process on huge pages", flush=True)
        engines: dict = {}

        def ours_static(key, compile=False):
            def run(ids, n, clock):
                if key in ("w8a8", "int8", "int4") and ids.shape[0] not in args.w8a8_batches:
                    raise Skip
                eng = engines.get((key, compile, ids.shape))
                if eng is None:
                    eng = engines[(key, compile, ids.shape)] = DecodeEngine(models[key], ids.shape[1] + n_new,
                                                                            compile=compile)
                call = lambda: generate(models[key], ids, max_new_tokens=n, engine=eng)  # noqa: E731
                return moge_clocked(call) if clock else call()
            return run

        def ours_dynamic(ids, n, clock):
            call = lambda: generate(models["moge"], ids, max_new_tokens=n, cache="dynamic")  # noqa: E731
            return moge_clocked(call) if clock else call()

        def hf_run(model, cache=None, loop=None):
            def run(ids, n, clock):
                c = TokenClock() if clock else None
                (loop or model.generate)(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, cache_implementation=cache, streamer=c)
                return c.step() if clock else None
            return run

        if OURS[0] in names:
            contenders[OURS[0]] = ours_static("moge")
        if COMPILED in names:
            contenders[COMPILED] = ours_static("moge", compile=True)
        for name, (fmt, comp) in WEIGHT_ONLY.items():
            if name in names and fmt in models:
                contenders[name] = ours_static(fmt, compile=comp)
        if OURS[1] in names:
            contenders[OURS[1]] = ours_static("topk")
        if OURS[2] in names:
            contenders[OURS[2]] = ours_dynamic
        if "w8a8" in models:
            contenders[W8A8] = ours_static("w8a8")
        if {OURS[3], NO_GRAD} & set(names):
            wrapper = build_wrapper(models["moge"])
            if OURS[3] in names:
                contenders[OURS[3]] = hf_run(wrapper)
            if NO_GRAD in names:  # transformers' GenerationMixin.generate itself, bypassing the wrapper's
                contenders[NO_GRAD] = hf_run(wrapper, loop=lambda *a, **k: GenerationMixin.generate(wrapper, *a, **k))
        if set(names) & set(THEIRS) or (llama and set(names) & set(LLAMA.get(dt_name, ()))):
            qwen = build_qwen(dtype, device)
            print(f"parameters: moge small {count_parameters(get_config('small'))['total']:,}, "
                  f"Qwen2-MoE matched {sum(p.numel() for p in qwen.parameters()):,}", flush=True)
            for name, cache in (("transformers dynamic", None), ("transformers static", "static")):
                if name in names:
                    for impl in ("eager", "grouped_mm"):
                        def run(ids, n, clock, impl=impl, r=hf_run(qwen, cache)):
                            qwen.config._experts_implementation = impl
                            return r(ids, n, clock)
                        contenders[f"{name} [{impl}]"] = run
            for name in LLAMA.get(dt_name, ()) if llama else ():
                if name in names:
                    contenders[name] = llama_run(llama, qwen, gguf_dir, LLAMA_FMT[name], args)
        if "moge" in models:
            for b in args.batches:
                ctx = inputs[b].shape[1] + n_new / 2
                for fmt in ("int8", "int4"):
                    if fmt in models and b in args.w8a8_batches:
                        bounds[(f"{dt_name} {fmt}", b)] = (touched_expert_bytes(models[fmt], inputs[b], n_new)
                                                           + other_bytes(models[fmt], b, ctx))
                bounds[(dt_name, b)] = (touched_expert_bytes(models["moge"], inputs[b], n_new)
                                        + other_bytes(models["moge"], b, ctx))
                if "w8a8" in models and b in args.w8a8_batches:
                    bounds[(dt_name + " W8A8", b)] = (touched_expert_bytes(models["w8a8"], inputs[b], n_new)
                                                      + other_bytes(models["w8a8"], b, ctx))
        best: dict[tuple[int, str], float] = {}
        t_start, done = time.perf_counter(), 0  # progress per dtype (each has its own contenders)
        total = args.repeats * len(args.batches) * len(contenders)
        for rnd in range(args.repeats):  # interleaved rounds, best kept: filters other jobs' noise
            for b in args.batches:
                for name, run in contenders.items():
                    ids = inputs[b]
                    try:
                        if rnd == 0:
                            run(ids, 2, False)  # warmup (engines, caches, the few-rows kernel choice)
                        sec = step_time(lambda n, c, run=run, ids=ids: run(ids, n, c), device, n_new, clocked)
                    except Skip:
                        continue
                    except Exception as e:  # noqa: BLE001 - an implementation that cannot run here
                        print(f"  {name}: cannot run here ({type(e).__name__}: {str(e)[:100]})")
                        continue
                    best[(b, name)] = min(best.get((b, name), float("inf")), sec)
                    done += 1
                    el = time.perf_counter() - t_start
                    print(f"[{done}/{total} round {rnd + 1}] {dt_name:8s} B={b:<3d} {name:36s} {sec * 1e3:9.1f} ms/step"
                          f"  (elapsed {el:.0f}s, ETA {el / done * (total - done):.0f}s)", flush=True)
        for b in args.batches:
            for name in MOGE_ROWS + THEIRS + tuple(LLAMA_FMT):
                if name in MOGE_ROWS + tuple(LLAMA_FMT) and (b, name) in best:
                    bound = (bounds.get((dt_name + " W8A8", b)) if name == W8A8 else
                             bounds.get((f"{dt_name} {WEIGHT_ONLY[name][0]}", b)) if name in WEIGHT_ONLY else None)
                    rows.append(dict(dtype=dt_name, batch=b, name=name, ms=best[(b, name)] * 1e3, note="",
                                     **({"bound": bound} if bound else {})))
                elif name in THEIRS:
                    impls = {k.split("[")[1][:-1]: v for (bb, k), v in best.items() if bb == b and k.startswith(name)}
                    if impls:
                        impl = min(impls, key=impls.get)
                        others = ", ".join(f"{i} {v * 1e3:.1f}" for i, v in impls.items())
                        rows.append(dict(dtype=dt_name, batch=b, name=name, ms=impls[impl] * 1e3,
                                         note=f"(best of {others})"))
        del contenders, models, engines
        gc.collect()

    # Bounds were counted in bytes: over the best read bandwidth seen (start and end of the run; another
    # job lowers it for a while, and the timings are best-of-rounds too).
    bw = max(bw, read_bandwidth(device))
    print(f"read bandwidth, best of the run's start and end: {bw / 1e9:.1f} GB/s", flush=True)
    bounds = {k: v / bw * 1e3 for k, v in bounds.items()}
    for r in rows:
        if "bound" in r:
            r["bound"] = r["bound"] / bw * 1e3
    raw = Path(args.results).with_name("results_generate.json")
    if args.merge and raw.exists():
        old = json.loads(raw.read_text())
        mine = {(r["dtype"], r["batch"], r["name"]) for r in rows}
        rows = [r for r in old["rows"] if (r["dtype"], r["batch"], r["name"]) not in mine] + rows
        for k, v in old["bounds"].items():
            dt, b = k.split("/")
            bounds.setdefault((dt, int(b)), v)
        rows.sort(key=lambda r: (r["dtype"] != "float32", r["batch"]))
    lines = table(rows, bounds) + versus_llama(rows)
    spec_rows = speculative(args, n_new, device) if args.speculative else []
    if spec_rows:
        import bench_speculative as bs
        lines += ["", f"Speculative decoding with MTP (`bench_speculative.speculative_rows`, checkpoint "
                      f"`{Path(args.speculative).name}`, greedy, {n_new} new tokens, corpus prompts; plain = this engine "
                      f"without drafts):", "", *bs.table(spec_rows)]
    print("\n".join(lines))
    if not args.no_write:
        raw.write_text(json.dumps({"machine": machine(device), "read_bandwidth": bw, "rows": rows,
                                   "bounds": {f"{dt}/{b}": v for (dt, b), v in bounds.items()},
                                   **({"speculative": spec_rows} if spec_rows else {})}, indent=1))
        png = Path(args.results).with_name("results_generate.png")
        plot(rows, bounds, png, device)
        write_section(Path(args.results), lines, args, device, bw, n_new, prompt_len, png.name,
                      llama_ran=any(r["name"] in LLAMA_FMT for r in rows))
        print(f"wrote {args.results} and {png}")
    return 0


def speculative(args, n_new: int, device) -> list[dict]:
    """Plain vs MTP-speculative decode rows on a checkpoint with predictors (see bench_speculative.py)."""
    import bench_speculative as bs
    from moge.checkpoint import load_pretrained
    from moge.data.tokenizer import load_tokenizer

    ckpt = Path(args.speculative)
    model = load_pretrained(ckpt, dtype="float32", device=device).eval()
    prompts = bs.corpus_prompts(load_tokenizer(ckpt / "tokenizer.json"), max(args.speculative_batches), 32)
    return bs.speculative_rows(model, prompts, args.speculative_batches, n_new, args.repeats)


# moge's rows per weight format, compared with llama.cpp's GGUF type of the same format.
FORMATS = {"float32": ("float32", (OURS[0], COMPILED), "llama.cpp f32"),
           "bfloat16": ("bfloat16", (OURS[0], COMPILED), "llama.cpp bf16"),
           "8-bit": ("float32", (W8A8, "moge int8 (MoGE)", "moge compiled int8 (MoGE)"), "llama.cpp q8_0"),
           "4-bit": ("float32", ("moge int4 (MoGE)", "moge compiled int4 (MoGE)"), "llama.cpp q4_0")}


def versus_llama(rows: list[dict]) -> list[str]:
    """moge's fastest row per weight format against llama.cpp's, per batch where llama.cpp ran."""
    out = []
    for fmt, (dt, ours, theirs) in FORMATS.items():
        for b in dict.fromkeys(r["batch"] for r in rows):
            peer = [r for r in rows if r["dtype"] == dt and r["batch"] == b and r["name"] == theirs]
            mine = [r for r in rows if r["dtype"] == dt and r["batch"] == b and r["name"] in ours]
            if peer and mine:
                best = min(mine, key=lambda r: r["ms"])
                out.append(f"| {fmt} | {b} | {best['name']} | {best['ms']:.1f} | {theirs} | {peer[0]['ms']:.1f} | "
                           f"{best['ms'] / peer[0]['ms']:.2f}x |")
    if not out:
        return []
    return ["", "moge's fastest row per weight format against llama.cpp (same run, interleaved; ratio = moge ms / "
            "llama.cpp ms, lower is better):", "", "| weights | batch | moge | ms/step | llama.cpp | ms/token | ratio |",
            "|---|---:|---|---:|---|---:|---:|", *out]


def table(rows: list[dict], bounds: dict) -> list[str]:
    out = ["| dtype | batch | contender | ms/step | tokens/s | vs transformers best | weights-read bound (ms) | "
           "fraction of bound |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows):
            sel = [r for r in rows if r["dtype"] == dt and r["batch"] == b]
            hf = [r["ms"] for r in sel if r["name"] in THEIRS]
            for r in sel:
                bound = r.get("bound") or bounds.get((dt, b), float("nan"))  # W8A8: its own (int8 bytes)
                ratio = f"{min(hf) / r['ms']:.2f}x" if hf else "-"  # transformers not run
                out.append(f"| {dt} | {b} | {r['name']} {r['note']} | {r['ms']:.1f} | {1e3 * b / r['ms']:,.0f} | "
                           f"{ratio} | {bound:.1f} | {bound / r['ms']:.0%} |")
    return out


def plot(rows: list[dict], bounds: dict, path: Path, device) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dts = list(dict.fromkeys(r["dtype"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    fig, axes = plt.subplots(len(dts), len(batches), figsize=(4.2 * len(batches), 3.6 * len(dts)), squeeze=False)
    for i, dt in enumerate(dts):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            sel = [r for r in rows if r["dtype"] == dt and r["batch"] == b]
            ax.barh([r["name"] for r in sel], [r["ms"] for r in sel],
                    color=["tab:blue" if r["name"] in MOGE_ROWS else "tab:green" if r["name"] in LLAMA_FMT
                           else "tab:orange" for r in sel])
            if (dt, b) in bounds:
                ax.axvline(bounds[(dt, b)], color="k", ls="--", lw=1, label="weights-read bound")
            if (dt + " W8A8", b) in bounds:
                ax.axvline(bounds[(dt + " W8A8", b)], color="k", ls=":", lw=1, label="bound, W8A8")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{dt}, batch {b}")
            ax.set_xlabel("ms per decode step (lower is better)")
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"small preset decode on {device.type}: moge (blue) vs transformers Qwen2-MoE (orange), "
                 f"llama.cpp (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, lines: list[str], args, device, bw, n_new, prompt_len, png_name,
                  llama_ran: bool = False) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    sizes = ", ".join(f"batch {b}: prompt {prompt_len(b)}" for b in args.batches)
    body = [SECTION, "",
            f"Machine: {machine(device)}. Read bandwidth measured in the same run: {bw / 1e9:.1f} GB/s "
            f"(`x.sum()` over 512 MiB written first, best of the run's start and end). `small` preset, "
            f"random weights, greedy, {sizes}; {n_new} new tokens.",
            "Method: ms/step = " + ("median gap between consecutive tokens of a run" if device.type == "cpu" else
                                     f"(time of {n_new} new tokens - time of 1) / {n_new - 1}")
            + f" (prefill excluded), best of {args.repeats} interleaved rounds; tokens/s = batch / step. Bound = bytes one "
            f"step must read (the experts the batch touches, counted, plus all other weights, the embedding "
            f"rows and the KV cache) / read bandwidth. transformers = `Qwen2MoeForCausalLM`, best experts "
            f"implementation marked.",
            f"Command: `PYTHONPATH=src python benchmarks/bench_generate.py --device {args.device} --dtypes "
            f"{' '.join(args.dtypes or [])} --batches {' '.join(map(str, args.batches))} --threads {args.threads}"
            f"{' --w8a8-batches ' + ' '.join(map(str, args.w8a8_batches)) if args.w8a8_batches != [1, 8] else ''}"
            f"{' --contenders ' + ' '.join(repr(c) for c in args.contenders) if args.contenders else ''}`"
            .replace("--dtypes  ", "")
            + (" with `LLAMA_BENCH` and `LLAMA_CONVERT` set (benchmarks/llamacpp.py)." if llama_ran else ""),
            "", *lines, "", f"![generation benchmark]({png_name})", ""]
    replace_section(path, SECTION, body)


if __name__ == "__main__":
    raise SystemExit(main())
