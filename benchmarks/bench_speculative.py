"""Benchmark speculative decoding with the MTP predictor(s) against plain decoding on the static engine.

Model: a trained checkpoint with MTP predictors (default ``runs/mtp/mtp1`` under the repository root,
the demo-sized ``tiny`` preset trained with ``moge train --mtp 1``, see docs/mtp.md). Prompts: the
first ``--prompt-len`` tokens (``<bos>`` first) of documents of the built-in corpus's validation split,
domains interleaved.
Greedy decoding of ``--new-tokens`` tokens, no EOS stop, so both paths generate the same count.

Batch b decodes ``max(batches) // b`` disjoint prompt batches (batch 1: 8 prompts one at a time,
batch 8: one batch of the same 8). Per batch size and contender, one round times ``generate`` for N
new tokens and for 1 (prefill and the first token) over those batches; decode time = t(N) - t(1),
best of ``--repeats`` interleaved rounds per term; decode tokens/s = rows * (N - 1) / decode time;
ms/step = decode time / steps (N - 1 per batch for plain, the verify steps counted by the decoder
for speculative). Acceptance: of the row-steps of rows still
generating, the share that kept draft i (per draft position) and the mean kept drafts per step.
"Identical" compares the speculative output with plain greedy token for token. The engines (caches,
steps) are built once and reused, as a server would.

Usage: ``PYTHONPATH=src python benchmarks/bench_speculative.py [--checkpoint DIR] [--threads 2]``;
``speculative_rows`` returns the rows for ``bench_generate.py``. Writes the ``## Speculative decoding
(MTP)`` section of ``benchmarks/RESULTS.md``, ``results_speculative.json`` and ``results_speculative.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.engine.decode import DecodeEngine  # noqa: E402
from moge.engine.speculative import SpeculativeDecoder  # noqa: E402
from moge.generate import generate  # noqa: E402
from results_md import machine, replace_section  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

SECTION = "## Speculative decoding (MTP)"
DEFAULT_CKPT = "runs/mtp/mtp1"  # relative to the repository root (runs/ is where docs/mtp.md trains it)
REPO = HERE.parent


def shown_path(path: Path) -> str:
    """``path`` as the recorded command shows it: relative to the repository root when it lies inside
    it, else only its last component (a results file names no directory of the machine it ran on)."""
    try:
        return str(path.resolve().relative_to(REPO.resolve()))
    except ValueError:
        return f"<outside the repository>/{path.resolve().name}"


def corpus_prompts(tokenizer, batch: int, prompt_len: int) -> torch.Tensor:
    """``[batch, prompt_len]``: ``<bos>`` + the first tokens of validation documents long enough,
    taking the domains in turn (code, prose, math, code, ...)."""
    from moge.data.corpus import builtin_corpus, split_documents
    from moge.data.tokenizer import BOS_ID, encode_batch

    _, val = split_documents(builtin_corpus())
    by_domain: dict[str, list[list[int]]] = {}
    for d in val:
        ids = encode_batch(tokenizer, [d.text[:4000]])[0]
        if len(ids) >= prompt_len - 1:
            by_domain.setdefault(d.domain, []).append(ids[:prompt_len - 1])
    domains = sorted(by_domain)
    rows = [by_domain[domains[i % len(domains)]][i // len(domains)] for i in range(batch)]
    return torch.tensor([[BOS_ID, *r] for r in rows])


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speculative_rows(model: torch.nn.Module, prompts_BP: torch.Tensor, batches=(1, 8), new_tokens: int = 128,
                     repeats: int = 3, draft_tokens: int | None = None) -> list[dict]:
    """One row per batch size: plain and speculative greedy decode tokens/s, ms/step, speedup,
    acceptance per draft position, and whether the outputs are identical (method: module docstring).
    Batch b runs ``len(prompts_BP) // b`` disjoint prompt batches (so batch 1 sees as many prompts as
    the largest batch), their times summed; ``prompts_BP`` holds equal-length prompts."""
    device = next(model.parameters()).device
    rows = []
    for b in batches:
        sets = [prompts_BP[i * b:(i + 1) * b].to(device) for i in range(max(1, len(prompts_BP) // b))]
        cap = sets[0].shape[1] + new_tokens
        plain_eng, spec_dec = DecodeEngine(model, cap), SpeculativeDecoder(model, cap, draft_tokens)

        def run(name, n, ids):
            return generate(model, ids, None, n, engine=plain_eng if name == "plain" else spec_dec)

        for name in ("plain", "spec"):  # warm-up (allocations, first-call costs)
            run(name, new_tokens, sets[0])
        best = {(name, n): float("inf") for name in ("plain", "spec") for n in (1, new_tokens)}
        for _ in range(repeats):
            for name in ("plain", "spec"):
                for n in (new_tokens, 1):
                    best[name, n] = min(best[name, n], sum(_timed(lambda: run(name, n, ids)) for ids in sets))
        steps, row_steps, accepted, identical = 0, 0, None, True
        for ids in sets:
            stats: dict = {}
            spec_out = spec_dec.decode(ids, None, new_tokens, stats=stats)
            identical &= bool(torch.equal(spec_out, run("plain", new_tokens, ids)))
            steps += stats["steps"]
            row_steps += stats["row_steps"]
            accepted = stats["accepted"] if accepted is None else [a + x for a, x in zip(accepted, stats["accepted"])]
        dec = {name: best[name, new_tokens] - best[name, 1] for name in ("plain", "spec")}
        per_pos = [a / max(row_steps, 1) for a in accepted]
        tokens = len(sets) * b * (new_tokens - 1)
        rows.append({
            "batch": b, "prompt_sets": len(sets), "draft_tokens": spec_dec.num_drafts, "new_tokens": new_tokens,
            "prompt_len": sets[0].shape[1],
            "plain_ms_per_step": 1e3 * dec["plain"] / (len(sets) * (new_tokens - 1)),
            "spec_ms_per_step": 1e3 * dec["spec"] / steps,
            "spec_steps": steps,
            "plain_tokens_per_s": tokens / dec["plain"],
            "spec_tokens_per_s": tokens / dec["spec"],
            "speedup": dec["plain"] / dec["spec"],
            "accepted_per_position": per_pos,
            "mean_accepted_per_step": sum(per_pos),
            "tokens_per_row_step": 1 + sum(per_pos),
            "identical": identical,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cost_analysis(model: torch.nn.Module, prompts_BP: torch.Tensor, new_tokens: int, rounds: int = 3,
                  draft_tokens: int | None = None) -> dict:
    """Where a batch-1 speculative step's cost goes, over the prompts one at a time: the distinct routed
    experts per main MoGE layer in the verify forwards (counted by wrapping each layer's router), the
    float weight bytes a plain step, a verify and a draft read (parameter counts; the draft's last
    predictor runs its MoGE MLP on one row, so K experts), and the verify's and the draft's time per
    step (timers around each call, the best of ``rounds`` passes)."""
    dec = SpeculativeDecoder(model, prompts_BP.shape[1] + new_tokens, draft_tokens)
    base, head, cfg = model.model, model.lm_head, model.config
    S = 1 + dec.num_drafts
    distinct: list[int] = []
    for layer in base.layers:
        route = layer.mlp.route

        def counted(x_TH, route=route):
            r = route(x_TH)
            if x_TH.shape[0] == S:  # a batch-1 verify window
                distinct.append(int(r.expert_ids.unique().numel()))
            return r
        layer.mlp.route = counted
    cache, step = dec._slot(1)
    times = {"verify": 0.0, "draft": 0.0}

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[name] += time.perf_counter() - t0
            return out
        return call
    dec._slots[1] = (cache, timed("verify", step))
    dec._draft = timed("draft", dec._draft)
    best = {"verify": float("inf"), "draft": float("inf")}
    try:
        for _ in range(rounds):
            steps = 0
            times.update(verify=0.0, draft=0.0)
            distinct.clear()
            for i in range(prompts_BP.shape[0]):
                stats: dict = {}
                dec.decode(prompts_BP[i:i + 1], None, new_tokens, stats=stats)
                steps += stats["steps"]
            for k in best:
                best[k] = min(best[k], 1e3 * times[k] / steps)
    finally:
        for layer in base.layers:
            del layer.mlp.route  # back to the class's method
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    lay = base.layers[0]
    per_layer = n(lay) - n(lay.mlp.experts)  # attention, norms, router, shared expert
    per_expert = n(lay.mlp.experts) / cfg.num_experts
    pred = dec.predictors[-1]
    pred_extra = n(pred) - n(pred.mlp.experts) - per_layer  # eh_proj, enorm, hnorm, shared_head.norm
    K, L, mb = cfg.num_experts_per_tok, len(base.layers), 4 / 1e6
    union = sum(distinct) / max(len(distinct), 1)
    plain = L * (per_layer + K * per_expert) + n(head)
    verify = L * (per_layer + union * per_expert) + n(head)
    draft = dec.num_drafts * (per_layer + pred_extra + n(head)) + K * per_expert + \
        (dec.num_drafts - 1) * union * per_expert  # earlier predictors run the whole window
    return {"distinct_experts_per_verify_layer": union, "plain_step_MB": plain * mb, "verify_MB": verify * mb,
            "draft_MB": draft * mb, "spec_step_MB": (verify + draft) * mb,
            "verify_ms_per_step": best["verify"], "draft_ms_per_step": best["draft"]}


def analysis_lines(a: dict | None) -> list[str]:
    """The ``--analyze`` result as a RESULTS.md paragraph (nothing without it)."""
    if a is None:
        return []
    return [f"Cost analysis (`--analyze`, batch 1): a verify forward touches {a['distinct_experts_per_verify_layer']:.2f} "
            f"distinct experts per MoGE layer; float32 weights read: plain step {a['plain_step_MB']:.2f} MB, "
            f"verify {a['verify_MB']:.2f} MB, draft {a['draft_MB']:.2f} MB, speculative step {a['spec_step_MB']:.2f} MB; "
            f"so a weight-read-bound step allows at most {a.get('bytes_bound_speedup', float('nan')):.2f}x at the "
            f"measured acceptance ({a.get('bytes_bound_all_kept', float('nan')):.2f}x with every draft kept). "
            f"Timed per step: verify {a['verify_ms_per_step']:.2f} ms, draft {a['draft_ms_per_step']:.2f} ms.", ""]


def table(rows: list[dict]) -> list[str]:
    D = max(r["draft_tokens"] for r in rows)
    lines = ["| batch | D | plain ms/step | spec ms/step | plain tok/s | spec tok/s | speedup | kept drafts/step | "
             + " | ".join(f"accept@{i + 1}" for i in range(D)) + " | identical |",
             "|---|---|---|---|---|---|---|---|" + "---|" * D + "---|"]
    for r in rows:
        acc = " | ".join(f"{a:.2f}" for a in r["accepted_per_position"])
        lines.append(f"| {r['batch']} | {r['draft_tokens']} | {r['plain_ms_per_step']:.2f} | {r['spec_ms_per_step']:.2f} | "
                     f"{r['plain_tokens_per_s']:.0f} | {r['spec_tokens_per_s']:.0f} | **{r['speedup']:.2f}x** | "
                     f"{r['mean_accepted_per_step']:.2f} | {acc} | {'yes' if r['identical'] else 'NO'} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"B={r['batch']}, D={r['draft_tokens']}" for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["plain_tokens_per_s"] for r in rows], 0.4, label="plain (static engine)")
    ax1.bar([i + 0.2 for i in x], [r["spec_tokens_per_s"] for r in rows], 0.4, label="speculative (MTP)")
    for i, r in enumerate(rows):
        ax1.text(i + 0.2, r["spec_tokens_per_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title("greedy decode throughput (CPU)")
    ax1.legend(fontsize=8)
    for i, r in enumerate(rows):
        ax2.bar([i * (r["draft_tokens"] + 1) + j for j in range(r["draft_tokens"])], r["accepted_per_position"],
                label=labels[i])
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of steps keeping draft i")
    ax2.set_xticks([])
    ax2.set_title("acceptance per draft position")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, rows: list[dict], args, png_name: str, model_note: str,
                  analysis: dict | None = None, checkpoint: str = DEFAULT_CKPT) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    body = [SECTION, "",
            f"Machine: {machine()}, {args.dtype}. Model: {model_note}. Prompts: {rows[0]['prompt_len']} tokens from "
            f"the built-in corpus's validation split; greedy, {rows[0]['new_tokens']} new tokens, no EOS stop.",
            "Method: batch 1 decodes the 8 prompts one at a time, batch 8 as one batch; decode time = "
            "t(N new tokens) - t(1) summed over them, each the best of "
            f"{args.repeats} interleaved rounds; tokens/s = rows x (N-1) / decode time; ms/step = decode time / "
            "steps (speculative: verify steps; a batch steps until its slowest row is done). accept@i = share of row-steps that kept draft i; identical = "
            "speculative output equals plain greedy token for token.",
            f"Command: `env PYTHONPATH=src python benchmarks/bench_speculative.py "
            f"--checkpoint {checkpoint} --threads {args.threads} --new-tokens {args.new_tokens} "
            f"--repeats {args.repeats}{' --analyze' if getattr(args, 'analyze', False) else ''}`",
            "", *table(rows), "", *analysis_lines(analysis),
            "Other checkpoints (`--mtp 2`, D = 1 and 2), earlier machines and what the numbers mean: docs/mtp.md.",
            "", f"![speculative decoding]({png_name})", ""]
    replace_section(path, SECTION, body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None,
                    help=f"checkpoint directory (default: {DEFAULT_CKPT} under the repository root)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--analyze", action="store_true",
                    help="also print where a batch-1 step's cost goes (cost_analysis) and add it to the section")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / the JSON / the PNG")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moge.checkpoint import load_pretrained
    from moge.data.tokenizer import load_tokenizer

    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint else REPO / DEFAULT_CKPT
    model = load_pretrained(ckpt, dtype=args.dtype).eval()
    tok = load_tokenizer(ckpt / "tokenizer.json")
    prompts = corpus_prompts(tok, max(args.batches), args.prompt_len)
    rows = speculative_rows(model, prompts, args.batches, args.new_tokens, args.repeats, args.draft_tokens)
    analysis = None
    if args.analyze:
        analysis = cost_analysis(model, prompts, args.new_tokens, args.repeats, args.draft_tokens)
        b1 = next((r for r in rows if r["batch"] == 1), None)
        if b1 is not None:  # the weight-read bound of the speedup at the measured acceptance
            analysis["bytes_bound_speedup"] = (analysis["plain_step_MB"] * b1["tokens_per_row_step"]
                                               / analysis["spec_step_MB"])
            analysis["bytes_bound_all_kept"] = analysis["plain_step_MB"] * (1 + b1["draft_tokens"]) / analysis["spec_step_MB"]
        print(json.dumps({"analysis": analysis}), flush=True)
    state = json.loads((ckpt / "moge_training_state.json").read_text()) if (ckpt / "moge_training_state.json").exists() else {}
    step = state.get("step", "?")
    note = (f"`{ckpt.name}` ({model.config.num_hidden_layers} layers, H={model.config.hidden_size}, "
            f"{model.config.num_mtp_layers} MTP predictor(s), trained {step} steps)")
    if not args.no_write:
        (HERE / "results_speculative.json").write_text(json.dumps({"model": note, "rows": rows,
                                                                   "analysis": analysis}, indent=1))
        plot(rows, HERE / "results_speculative.png")
        write_section(Path(args.results), rows, args, "results_speculative.png", note, analysis, shown_path(ckpt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
