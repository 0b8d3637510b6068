"""Benchmark serving: `moge serve` under load against the engine's own batch generate (and any other server).

Model: the ``small`` preset (H=768, 12 layers, 64 experts in 8 groups, K=8, V=32000), random weights,
float32, with a word-level tokenizer of its 32000 ids (so every token is one word and streams as
one event). Each request: a prompt of ``--prompt-len`` random token ids, ``--output-len`` new tokens,
greedy, streamed over loopback.

Contenders, measured in the same run, ``--rounds`` interleaved rounds, best kept (the machine is shared):

* ``moge serve``: the server in its own process (``--max-batch`` rows), driven by an asyncio load
  generator of raw HTTP/1.1 connections (no client library, so the client costs the shared CPU
  little). Fixed concurrency 1, 4, 16 (each client sends its next request when one finishes; 2
  requests per client), then Poisson arrivals at ``--rates`` requests/s.
* ``engine generate``: ``moge.generate`` in this process on the same prompts as one batch of 1, 4 or
  16 rows, prefill included: what the server's scheduler and HTTP layer cost is the gap.
* ``--transformers-serve``: ``transformers serve --continuous-batching`` on transformers' Qwen2-MoE at the
  same shapes (bench_generate's peer), random weights, the same tokenizer, the same thread count.
* ``--compile``: ``moge serve --compile`` beside it (decode steps compiled per batch bucket at startup,
  the fast CPU path of ``docs/inference.md``), the same requests.
* ``--url NAME=URL`` (repeatable): any running OpenAI-compatible server given by its base URL
  (``http://127.0.0.1:8001``), at the same concurrency levels, same token-id prompts.

Reported per run: output tokens/s (all output tokens / wall time), TTFT, TPOT (per request: (last -
first token) / (n - 1)) and ITL (gaps between streamed tokens), p50 and p99; and for the Poisson
runs the highest throughput whose TPOT p99 stays under ``--tpot-limit-ms`` (the paper's metric).
Writes the ``## Serving (bench_serve.py)`` section of ``benchmarks/RESULTS.md``,
``benchmarks/results_serve.json`` and ``benchmarks/results_serve.png``.

Usage: ``python benchmarks/bench_serve.py [--rounds 2] [--url vllm=http://127.0.0.1:8001]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.checkpoint import load_pretrained, save_model  # noqa: E402
from moge.config import get_config  # noqa: E402
from moge.engine.decode import DecodeEngine  # noqa: E402
from moge.generate import generate  # noqa: E402
from moge.model import MoGEForCausalLM  # noqa: E402
from bench_generate import build_qwen  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
from results_md import machine, replace_section  # noqa: E402

SECTION = "## Serving (bench_serve.py)"
CONCURRENCY = (1, 4, 16)


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """The ``small`` preset with random weights and a word-level tokenizer over its vocabulary."""
    cfg = get_config("small")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tok.json"))
    torch.manual_seed(seed)
    save_model(MoGEForCausalLM(cfg), directory / "small", tokenizer_file=directory / "tok.json")
    return directory / "small"


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


# ---- the load generator -------------------------------------------------------------------------

async def stream_one(host: str, port: int, body: dict, api_key: str | None = None) -> tuple[float, list[float]]:
    """POST a streaming completion over a raw connection; ``(start, [arrival time of each token event])``."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {(await reader.read(2000))!r}")
    times, buf = [], b""
    while line := await reader.readline():
        buf += line
        while b"\n\n" in buf:  # one SSE event (chunked framing lines are skipped: not "data:")
            event, buf = buf.split(b"\n\n", 1)
            for part in event.split(b"\n"):
                if part.startswith(b"data: ") and part != b"data: [DONE]":
                    choice = (json.loads(part[6:]).get("choices") or [{}])[0]
                    if choice.get("text"):
                        times.append(time.perf_counter())
    writer.close()
    return t0, times


def summarize(runs: list[tuple[float, list[float]]], wall: float) -> dict:
    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")

    ttft = [t[0] - s for s, t in runs if t]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for s, t in runs if len(t) > 1]
    itl = [b - a for s, t in runs for a, b in zip(t, t[1:])]
    tokens = sum(len(t) for s, t in runs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            **{f"{k}_p{q}_ms": pct(v, q / 100) for k, v in (("ttft", ttft), ("tpot", tpot), ("itl", itl))
               for q in (50, 99)}}


async def fixed_concurrency(host, port, bodies: list[dict], concurrency: int, api_key=None) -> dict:
    queue = list(bodies)
    runs = []

    async def client():
        while queue:
            runs.append(await stream_one(host, port, queue.pop(0), api_key))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(runs, time.perf_counter() - t0)


async def poisson(host, port, bodies: list[dict], rate: float, seed: int = 0, api_key=None) -> dict:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    for body in bodies:
        tasks.append(asyncio.create_task(stream_one(host, port, body, api_key)))
        await asyncio.sleep(rng.expovariate(rate))
    runs = await asyncio.gather(*tasks)
    return summarize(runs, time.perf_counter() - t0)


# ---- contenders ---------------------------------------------------------------------------------

def engine_generate(model, engine: DecodeEngine, prompts: list[list[int]], output_len: int) -> dict:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=output_len, engine=engine)
    wall = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def write_qwen_checkpoint(directory: Path, tokenizer_json: Path) -> Path:
    """transformers' Qwen2-MoE at the small preset's shapes (bench_generate's peer), random weights,
    with the same word-level tokenizer: what ``transformers serve`` loads."""
    d = directory / "qwen"
    build_qwen(torch.float32, torch.device("cpu")).save_pretrained(d)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
        "model_max_length": 4096}))
    return d


def start_server(ckpt: Path, port: int, max_batch: int, threads: int, peer: str = "moge") -> subprocess.Popen:
    """``moge serve`` (``peer="moge"``, or ``"moge-compile"`` for ``--compile``, which compiles a step per
    batch bucket before it answers) or transformers serve, in its own process, once it answers."""
    if peer.startswith("moge"):
        cmd = [sys.executable, "-m", "moge", "serve", str(ckpt), "--port", str(port), "--max-batch", str(max_batch),
               "--max-model-len", "512", "--threads", str(threads), "--served-model-name", "small"]
        cmd += ["--compile"] if peer == "moge-compile" else []
    else:  # transformers serve, its continuous batching on, same thread count
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(ckpt), "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--log-level", "warning",
               # its paged KV cache, sized: by default it takes a share of the machine's memory (OOM here)
               "--cb-block-size", "32", "--cb-num-blocks", "256"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} {cmd[1]} exited before it was ready")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} {cmd[1]} did not start in 900 s")


def model_name(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def bodies_for(prompts, output_len: int, model: str) -> list[dict]:
    """Streamed greedy completions; the prompt as its words (``w123 ...``, one token each with the
    word-level tokenizer, ``<bos>`` added by the server as it does), which every server accepts."""
    # No ignore_eos (transformers serve refuses unknown fields): the random models' EOS comes up about
    # once in 32000 tokens, and tokens are counted as they stream.
    return [{"model": model, "prompt": " ".join(f"w{i}" for i in p[1:]), "max_tokens": output_len, "temperature": 0,
             "stream": True} for p in prompts]


def run_round(args, results: dict, prompts, servers: dict[str, tuple[str, int, str]], model, engines) -> None:
    """One interleaved round: for each concurrency the engine's batch, then each server; then Poisson."""
    for c in CONCURRENCY:
        n = 2 * c if c > 1 else 3
        r = engine_generate(model, engines[c], prompts[:c], args.output_len)
        keep(results, "engine generate", f"c{c}", r)
        if c == 1:  # the engine's prefill alone (one token out), for the TTFT check
            keep(results, "engine generate", "prefill1", engine_generate(model, engines[1], prompts[:1], 1))
        for name, (host, port, served) in servers.items():
            bodies = bodies_for(prompts[:n], args.output_len, served)
            keep(results, name, f"c{c}", asyncio.run(fixed_concurrency(host, port, bodies, c)))
        print(json.dumps({k: v.get(f"c{c}") for k, v in results.items()}), flush=True)
    host, port, _ = servers["moge serve"]
    for rate in args.rates:
        bodies = bodies_for(prompts[:args.poisson_requests], args.output_len, "small")
        keep(results, "moge serve", f"rate{rate}", asyncio.run(poisson(host, port, bodies, rate)))


def keep(results: dict, name: str, key: str, r: dict) -> None:
    old = results.setdefault(name, {}).get(key)
    if old is None or r["tok_s"] > old["tok_s"]:
        results[name][key] = r


def report(args, results: dict, mach: str) -> list[str]:
    eng = results["engine generate"]
    lines = [SECTION, "",
             f"Machine: {mach}. Best of {args.rounds} interleaved rounds. Model: `small` preset, random weights, "
             f"float32; prompts of {args.prompt_len} tokens, {args.output_len} output tokens, greedy, streamed "
             f"over loopback; `moge serve --max-batch {args.max_batch} --threads {args.threads}` in its own "
             f"process, the engine and the load generator in another "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             "Output tokens/s at fixed concurrency (TPOT p50 / p99 in ms); `engine generate` is moge.generate "
             "on the same prompts as one batch of that size, prefill included:", "",
             "| contender | " + " | ".join(f"concurrency {c}" for c in CONCURRENCY) + " |",
             "|---|" + "---|" * len(CONCURRENCY)]
    for name, rs in results.items():
        cells = []  # (engine generate's prefill1 entry is not a column)
        for c in CONCURRENCY:
            r = rs.get(f"c{c}")
            if r is None:
                cells.append("-")
            elif "tpot_p50_ms" in r:
                cells.append(f"{r['tok_s']:.1f} ({r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f})")
            else:
                cells.append(f"{r['tok_s']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    srv = results["moge serve"]
    lines += ["", "moge serve against the engine's own batch (the scheduler's and the HTTP layer's cost), "
              "and its latencies:", "",
              "| concurrency | serve / engine tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |", "|---|---|---|---|"]
    for c in CONCURRENCY:
        s = srv[f"c{c}"]
        lines.append(f"| {c} | {s['tok_s'] / eng[f'c{c}']['tok_s']:.0%} | {s['ttft_p50_ms']:.0f} / "
                     f"{s['ttft_p99_ms']:.0f} | {s['itl_p50_ms']:.1f} / {s['itl_p99_ms']:.1f} |")
    pre = eng["prefill1"]["wall_s"]
    step = (eng["c1"]["wall_s"] - pre) / max(args.output_len - 1, 1)
    lines += ["", f"TTFT at concurrency 1: p50 {srv['c1']['ttft_p50_ms']:.0f} ms against the engine's prefill of "
              f"one {args.prompt_len}-token prompt ({pre * 1e3:.0f} ms) + two decode steps ({2 * step * 1e3:.0f} ms) = "
              f"{(pre + 2 * step) * 1e3:.0f} ms, in the same run."]
    lines += ["", f"Poisson arrivals ({args.poisson_requests} requests per rate):", "",
              "| rate (req/s) | output tok/s | TTFT p50 ms | TPOT p50 / p99 ms |", "|---|---|---|---|"]
    best = None
    for rate in args.rates:
        r = srv[f"rate{rate}"]
        lines.append(f"| {rate} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['tpot_p50_ms']:.1f} / "
                     f"{r['tpot_p99_ms']:.1f} |")
        if r["tpot_p99_ms"] <= args.tpot_limit_ms and (best is None or r["tok_s"] > best[1]):
            best = (rate, r["tok_s"])
    lines += ["", f"Highest Poisson throughput with TPOT p99 under {args.tpot_limit_ms:.0f} ms: "
              + (f"{best[1]:.1f} tok/s (at {best[0]} req/s)." if best else "none of the rates stayed under it."), ""]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in results.items():
        xs = [c for c in CONCURRENCY if f"c{c}" in rs]
        ax.plot(xs, [rs[f"c{c}"]["tok_s"] for c in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
    ax.set_xlabel("concurrent requests (engine: batch size)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("small preset, float32, CPU (shared machine)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint (default: a random small)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    p.add_argument("--poisson-requests", type=int, default=16)
    p.add_argument("--tpot-limit-ms", type=float, default=100.0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--url", action="append", default=[], help="NAME=http://HOST:PORT of another OpenAI-compatible server")
    p.add_argument("--transformers-serve", action="store_true",
                   help="also start `transformers serve --continuous-batching` on a Qwen2-MoE at the same shapes")
    p.add_argument("--compile", action="store_true",
                   help="also start `moge serve --compile` (compiled decode steps, the fast CPU path)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or write_checkpoint(Path(tmp.name))
    model = load_pretrained(ckpt)
    prompts = make_prompts(max(32, args.poisson_requests), args.prompt_len, model.config.vocab_size)
    engines = {c: DecodeEngine(model, args.prompt_len + args.output_len) for c in CONCURRENCY}
    for c in CONCURRENCY:  # warm the engine's kernels and measured choices at every batch size
        engine_generate(model, engines[c], prompts[:c], 4)
    procs = [start_server(ckpt, args.port, args.max_batch, args.threads)]
    try:
        servers = {"moge serve": ("127.0.0.1", args.port, "small")}
        if args.transformers_serve:
            qwen = write_qwen_checkpoint(Path(tmp.name), ckpt / "tokenizer.json")
            procs.append(start_server(qwen, args.port + 1, args.max_batch, args.threads, peer="transformers"))
            servers["transformers serve --continuous-batching"] = ("127.0.0.1", args.port + 1, str(qwen))
        if args.compile:
            procs.append(start_server(ckpt, args.port + 2, args.max_batch, args.threads, peer="moge-compile"))
            servers["moge serve --compile"] = ("127.0.0.1", args.port + 2, "small")
        for spec in args.url:
            name, url = spec.split("=", 1)
            host, port = url.split("//", 1)[-1].rstrip("/").split(":")
            servers[name] = (host, int(port), model_name(host, int(port)))
        for host, port, name in servers.values():  # warm each server's kernels at every batch size
            asyncio.run(fixed_concurrency(host, port, bodies_for(prompts[:16], 4, name), 16))
        results: dict = {"engine generate": {}}
        for _ in range(args.rounds):
            run_round(args, results, prompts, servers, model, engines)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    lines = report(args, results, machine())
    print("\n".join(lines))
    if not args.no_write:
        (HERE / "results_serve.json").write_text(json.dumps(results, indent=1))
        plot(results, HERE / "results_serve.png")
        replace_section(HERE / "RESULTS.md", SECTION, lines + ["![serving](results_serve.png)", ""])


if __name__ == "__main__":
    main()
