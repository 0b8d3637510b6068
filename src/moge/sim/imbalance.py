"""Monte Carlo (and exact) study of device load imbalance under top-K and MoGE routing (docs/design.md section 3).

Shape legend: C trials (random batches), T tokens per batch, N experts, K experts per token, D devices
(= MoGE groups; device d owns the contiguous expert block ``d*G ... d*G + G - 1``, G = N / D),
K' = K / D experts per group under MoGE.

Every token picks K *distinct* experts. Under top-K they are drawn from all N experts; under MoGE K' are
drawn inside each of the D groups. With per-expert frequencies ``p`` (measured on a trained model) the
draw is successive sampling without replacement with probability proportional to ``p`` (the Gumbel
top-K trick), restricted to each group for MoGE. Pure numpy: this module never imports torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import MoGEError

ROUTERS = ("topk", "moge")
# rows (trials x tokens) drawn per chunk: bounds memory at ~ROWS x N x 4 bytes (~64 MB for N=64)
_CHUNK_ROWS = 250_000


class ImbalanceInputError(MoGEError, ValueError):
    """Inconsistent study parameters or an unusable frequency file."""


def check_shape(num_experts: int, k: int, devices: int) -> None:
    """Raise :class:`ImbalanceInputError` unless N, K, D describe both a top-K and a MoGE router."""
    if min(num_experts, k, devices) < 1:
        raise ImbalanceInputError(f"experts, k and devices must be >= 1, got N={num_experts} K={k} D={devices}")
    if num_experts % devices:
        raise ImbalanceInputError(f"--experts {num_experts} is not divisible by --devices {devices}")
    if k % devices:
        raise ImbalanceInputError(f"--k {k} is not divisible by --devices {devices} (MoGE picks K/D per group)")
    if k > num_experts:
        raise ImbalanceInputError(f"--k {k} exceeds --experts {num_experts}")


# ---- measured frequencies ---------------------------------------------------------------------------
_COUNT_KEYS = ("expert_counts", "expert_frequencies", "frequencies")


def _leaf_vectors(val, layer: int | None) -> list[tuple[int | None, list[float]]]:
    """Every numeric vector inside ``val`` with the layer it belongs to (None when unknown).

    A flat number list is one vector; a list of lists (or ``None`` for dense layers) is one vector per
    layer; a dict keyed by layer numbers likewise; other dicts (e.g. per data domain) are walked through.
    """
    if isinstance(val, list) and val and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val):
        return [(layer, [float(v) for v in val])]
    out: list[tuple[int | None, list[float]]] = []
    if isinstance(val, list):
        for i, v in enumerate(val):
            if v is not None:
                out.extend(_leaf_vectors(v, i if layer is None else layer))
    elif isinstance(val, dict):
        for k, v in val.items():
            idx = int(k) if str(k).isdigit() and layer is None else layer
            out.extend(_leaf_vectors(v, idx))
    return out


def _collect_counts(obj, found: list[tuple[int | None, list[float]]]) -> None:
    """Append every per-expert count vector under an ``expert_counts`` key (any nesting) to ``found``;
    a sibling ``layer`` field (as in per-layer metric records) names the layer."""
    if isinstance(obj, dict):
        here = obj.get("layer") if isinstance(obj.get("layer"), int) else None
        for key, val in obj.items():
            if key in _COUNT_KEYS:
                found.extend(_leaf_vectors(val, here))
            else:
                _collect_counts(val, found)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)):
                _collect_counts(v, found)


def load_frequencies(path: str | Path, layer: int | None = None) -> np.ndarray:
    """Per-expert selection frequencies ``[N]`` (summing to 1) from a metrics file.

    Accepts a training run's ``metrics.jsonl`` (JSON lines; every ``expert_counts`` entry found at any
    nesting level is summed, either a flat per-expert list or one list per layer, optionally only
    ``layer``), or a JSON file holding a list of per-expert frequencies or an object with an
    ``expert_counts`` / ``frequencies`` key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ImbalanceInputError(f"{path} is not a readable metrics file (JSON or JSON lines): {e}") from None
    records = []
    try:
        records = [json.loads(text)]
    except json.JSONDecodeError:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ImbalanceInputError(f"{path}:{i + 1} is not valid JSON: {e}") from None
    found: list[tuple[int | None, list[float]]] = []
    for rec in records:
        if isinstance(rec, list) and rec and all(isinstance(v, (int, float)) for v in rec):
            found.append((None, [float(v) for v in rec]))
        else:
            _collect_counts(rec, found)
    if layer is not None:
        found = [(i, v) for i, v in found if i == layer]
    found_vecs = [v for _, v in found]
    if not found_vecs:
        where = f" for layer {layer}" if layer is not None else ""
        raise ImbalanceInputError(f"{path} holds no per-expert frequencies{where} (no 'expert_counts' list found)")
    sizes = {len(v) for v in found_vecs}
    if len(sizes) > 1:
        raise ImbalanceInputError(f"{path}: expert count vectors of different lengths {sorted(sizes)}; pick one with --layer")
    counts_N = np.asarray(found_vecs, dtype=np.float64).sum(0)
    if (counts_N < 0).any() or not np.isfinite(counts_N).all() or counts_N.sum() <= 0:
        raise ImbalanceInputError(f"{path}: expert frequencies must be finite, non-negative and not all zero")
    return counts_N / counts_N.sum()


# ---- Monte Carlo ------------------------------------------------------------------------------------
def _gumbel_keys(rng: np.random.Generator, shape: tuple[int, ...], log_p: np.ndarray | None) -> np.ndarray:
    """Random sort keys whose top-k is a draw of k distinct items (proportional to p when given)."""
    u = rng.random(shape, dtype=np.float32)
    if log_p is None:
        return u  # uniform: any i.i.d. continuous keys work
    # Gumbel top-k == successive sampling without replacement with probability proportional to p
    return log_p.astype(np.float32) - np.log(-np.log(np.maximum(u, np.float32(1e-30))))


def draw_device_loads(router: str, num_experts: int, k: int, devices: int, tokens: int, trials: int,
                      rng: np.random.Generator, freqs_N: np.ndarray | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Device loads ``T_i(X)`` of ``trials`` random batches of ``tokens`` tokens, ``[C, D]`` int64.

    ``router`` is ``topk`` (K distinct experts out of N) or ``moge`` (K/D distinct experts inside each
    group). ``freqs_N`` replaces the uniform draw by one proportional to measured frequencies.
    ``progress`` is called with the number of trials finished after every chunk.
    """
    check_shape(num_experts, k, devices)
    if router not in ROUTERS:
        raise ImbalanceInputError(f"router must be one of {ROUTERS}, got {router!r}")
    n, d = num_experts, devices
    g, kg = n // d, k // d
    log_p = None
    if freqs_N is not None:
        freqs_N = np.asarray(freqs_N, dtype=np.float64)
        if freqs_N.shape != (n,):
            raise ImbalanceInputError(f"frequencies have {freqs_N.size} entries but --experts is {n}")
        nonzero = freqs_N > 0
        if router == "topk" and nonzero.sum() < k:
            raise ImbalanceInputError(f"only {int(nonzero.sum())} experts have non-zero frequency; top-K needs {k}")
        if router == "moge" and (nonzero.reshape(d, g).sum(1) < kg).any():
            raise ImbalanceInputError(f"a group has fewer than K'={kg} experts with non-zero frequency")
        with np.errstate(divide="ignore"):
            log_p = np.log(freqs_N)
    per_chunk = max(1, _CHUNK_ROWS // max(1, tokens))
    loads_CD = np.empty((trials, d), dtype=np.int64)
    done = 0
    while done < trials:
        c = min(per_chunk, trials - done)
        if router == "topk" and log_p is None:
            # uniform K distinct out of N: per-token device counts are multivariate hypergeometric
            counts_CTD = rng.multivariate_hypergeometric([g] * d, k, size=(c, tokens))
            loads_CD[done:done + c] = counts_CTD.sum(1)
        elif router == "topk":
            keys_CTN = _gumbel_keys(rng, (c, tokens, n), log_p)
            ids_CTK = np.argpartition(-keys_CTN, k - 1, axis=-1)[..., :k]
            dev = (np.arange(c)[:, None, None] * d + ids_CTK // g).ravel()
            loads_CD[done:done + c] = np.bincount(dev, minlength=c * d).reshape(c, d)
        else:
            lp = None if log_p is None else log_p.reshape(d, g)
            keys_CTDG = _gumbel_keys(rng, (c, tokens, d, g), lp)
            if kg == 1:
                ids_CTDK = keys_CTDG.argmax(-1)[..., None]
            else:
                ids_CTDK = np.argpartition(-keys_CTDG, kg - 1, axis=-1)[..., :kg]
            # expert id = group * G + index in group; the device is the expert's block, computed from the
            # id (not assumed from the group) so the count is a genuine measurement
            expert_ids = np.arange(d)[None, None, :, None] * g + ids_CTDK
            dev = (np.arange(c)[:, None, None, None] * d + expert_ids // g).ravel()
            loads_CD[done:done + c] = np.bincount(dev, minlength=c * d).reshape(c, d)
        done += c
        if progress is not None:
            progress(c)
    return loads_CD


def summarize(loads_CD: np.ndarray, tokens: int, k: int) -> dict[str, float]:
    """Statistics of IS = (max - min) / |X| and of max/mean device load over the trials."""
    loads_CD = np.asarray(loads_CD)
    d = loads_CD.shape[1]
    is_C = (loads_CD.max(1) - loads_CD.min(1)) / tokens
    mm_C = loads_CD.max(1) / (tokens * k / d)
    return {
        "trials": int(loads_CD.shape[0]),
        "p_imbalanced": float((is_C > 0).mean()),
        "mean_is": float(is_C.mean()),
        "std_is": float(is_C.std()),
        "p50_is": float(np.percentile(is_C, 50)),
        "p99_is": float(np.percentile(is_C, 99)),
        "max_is": float(is_C.max()),
        "mean_max_over_mean_load": float(mm_C.mean()),
        "p99_max_over_mean_load": float(np.percentile(mm_C, 99)),
    }


def imbalance_study(num_experts: int, k: int, devices: int, tokens: Sequence[int], trials: int, seed: int = 0,
                    freqs_N: np.ndarray | None = None, keep_samples: bool = False,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Run the study for both routers at every token count.

    Returns ``{router: {str(tokens): summary}}``; with ``keep_samples`` each summary also holds the raw
    ``is`` sample array (for plotting). One seeded generator drives all draws, so a seed reproduces
    the whole study.
    """
    check_shape(num_experts, k, devices)
    if trials < 1 or any(t < 1 for t in tokens):
        raise ImbalanceInputError(f"trials and tokens must be >= 1, got trials={trials} tokens={list(tokens)}")
    rng = np.random.default_rng(seed)
    out: dict = {}
    for router in ROUTERS:
        out[router] = {}
        for t in tokens:
            loads = draw_device_loads(router, num_experts, k, devices, t, trials, rng, freqs_N, progress)
            s = summarize(loads, t, k)
            if keep_samples:
                s["is"] = (loads.max(1) - loads.min(1)) / t
            out[router][str(t)] = s
    return out


# ---- exact enumeration (small cases) ----------------------------------------------------------------
def _token_distribution(router: str, n: int, k: int, d: int, freqs_N: np.ndarray | None) -> dict[tuple, float]:
    """Exact distribution of one token's device-count vector, enumerating every draw."""
    g = n // d
    p = np.full(n, 1.0 / n) if freqs_N is None else np.asarray(freqs_N, float) / np.sum(freqs_N)

    def ordered_draws(items: list[int], m: int):
        # successive sampling without replacement: P(e1..em) = prod p_ej / (1 - sum of earlier p)
        for seq in itertools.permutations(items, m):
            prob, left = 1.0, float(sum(p[i] for i in items))
            for e in seq:
                if left <= 0:
                    prob = 0.0
                    break
                prob *= p[e] / left
                left -= p[e]
            if prob > 0:
                yield seq, prob

    dist: dict[tuple, float] = {}
    if router == "topk":
        for seq, prob in ordered_draws(list(range(n)), k):
            vec = [0] * d
            for e in seq:
                vec[e // g] += 1
            dist[tuple(vec)] = dist.get(tuple(vec), 0.0) + prob
    else:
        # MoGE: groups draw independently; convolve the per-group device-count distributions
        dist = {tuple([0] * d): 1.0}
        for grp in range(d):
            group_dist: dict[tuple, float] = {}
            for seq, prob in ordered_draws(list(range(grp * g, grp * g + g)), k // d):
                vec = [0] * d
                for e in seq:
                    vec[e // g] += 1
                group_dist[tuple(vec)] = group_dist.get(tuple(vec), 0.0) + prob
            dist = {tuple(x + y for x, y in zip(a, b)): pa * pb
                    for a, pa in dist.items() for b, pb in group_dist.items()}
    return dist


def exact_imbalance(num_experts: int, k: int, devices: int, tokens: int, router: str = "topk",
                    freqs_N: np.ndarray | None = None, max_states: int = 2_000_000) -> dict[str, float]:
    """Exact P(IS>0), E[IS] and E[max/mean load] by enumerating every draw (small cases only).

    One token's device-count distribution is enumerated draw by draw, then convolved ``tokens`` times
    (tokens are independent). Raises :class:`ImbalanceInputError` when the enumeration would be too big.
    """
    check_shape(num_experts, k, devices)
    if math.perm(num_experts, k) > max_states:
        raise ImbalanceInputError(f"exact enumeration of {math.perm(num_experts, k)} ordered draws is too large")
    tok = _token_distribution(router, num_experts, k, devices, freqs_N)
    dist: dict[tuple, float] = {tuple([0] * devices): 1.0}
    for _ in range(tokens):
        nxt: dict[tuple, float] = {}
        for a, pa in dist.items():
            for b, pb in tok.items():
                key = tuple(x + y for x, y in zip(a, b))
                nxt[key] = nxt.get(key, 0.0) + pa * pb
        dist = nxt
        if len(dist) > max_states:
            raise ImbalanceInputError("exact enumeration has too many load states; use Monte Carlo")
    mean_load = tokens * k / devices
    p_imb = sum(p for v, p in dist.items() if max(v) > min(v))
    mean_is = sum(p * (max(v) - min(v)) / tokens for v, p in dist.items())
    mean_mm = sum(p * max(v) / mean_load for v, p in dist.items())
    return {"p_imbalanced": float(p_imb), "mean_is": float(mean_is), "mean_max_over_mean_load": float(mean_mm)}


# ---- busiest-device factor for the performance model -------------------------------------------------
def _expected_max_std_normal(d: int) -> float:
    """E[max of d i.i.d. standard normals], by numerical integration (no scipy)."""
    x = np.linspace(-10, 10, 20001)
    phi = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    dens = d * phi * cdf ** (d - 1)
    return float(np.sum(x * dens) * (x[1] - x[0]))


@lru_cache(maxsize=4096)
def expected_max_over_mean(num_experts: int, k: int, devices: int, tokens: int, trials: int = 20000,
                           seed: int = 0, mc_max_tokens: int = 64) -> float:
    """E[max_i T_i / mean_i T_i] for uniform top-K routing over ``devices`` expert blocks.

    Up to ``mc_max_tokens`` tokens it is a seeded Monte Carlo; beyond, a normal approximation: each
    token's count on a device is hypergeometric (variance ``K q (1-q) (N-K)/(N-1)``, q = 1/D), the D
    loads sum to T*K (correlation -1/(D-1)), so E[max] = mean + sigma * sqrt(D/(D-1)) * E[max of D
    standard normals]. Experts that do not divide evenly over devices are not supported.
    """
    if devices <= 1 or k >= num_experts:
        return 1.0
    if num_experts % devices:
        raise ImbalanceInputError(f"{num_experts} experts do not split evenly over {devices} devices")
    if tokens <= mc_max_tokens:
        rng = np.random.default_rng(seed)
        g = num_experts // devices
        counts = rng.multivariate_hypergeometric([g] * devices, k, size=(trials, tokens)).sum(1)
        return float((counts.max(1) / (tokens * k / devices)).mean())
    q = 1.0 / devices
    var_tok = k * q * (1 - q) * (num_experts - k) / (num_experts - 1)
    mean = tokens * k / devices
    emax = mean + math.sqrt(tokens * var_tok) * math.sqrt(devices / (devices - 1)) * _expected_max_std_normal(devices)
    return float(min(emax / mean, devices))


# ---- plot -------------------------------------------------------------------------------------------
def plot_study(study: dict, path: str | Path, hist_tokens: int, title: str = "") -> None:
    """Figure 2(b)-style plot: IS histogram (top-K vs MoGE) and P(IS>0), E[max/mean] vs batch size.

    ``study`` must come from :func:`imbalance_study` with ``keep_samples=True``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.3))
    key = str(hist_tokens)
    is_topk, is_moge = study["topk"][key]["is"], study["moge"][key]["is"]
    step = 1.0 / hist_tokens
    top = max(float(is_topk.max()), step) + step
    bins = np.arange(-step / 2, top + step / 2, step)
    ax1.hist(is_topk, bins=bins, weights=np.full(len(is_topk), 1 / len(is_topk)), alpha=0.75,
             label=f"top-K  (P(IS>0) = {study['topk'][key]['p_imbalanced']:.4f})", color="tab:red")
    ax1.hist(is_moge, bins=bins, weights=np.full(len(is_moge), 1 / len(is_moge)), alpha=0.75,
             label=f"MoGE  (P(IS>0) = {study['moge'][key]['p_imbalanced']:.4f})", color="tab:blue")
    ax1.set_xlabel("Imbalance Score  IS = (max_i T_i - min_i T_i) / |X|")
    ax1.set_ylabel("fraction of batches")
    ax1.set_title(f"IS distribution, |X| = {hist_tokens} tokens")
    ax1.legend()
    ts = sorted(int(t) for t in study["topk"])
    for router, color, label in (("topk", "tab:red", "top-K"), ("moge", "tab:blue", "MoGE")):
        ax2.plot(ts, [study[router][str(t)]["p_imbalanced"] for t in ts], "o-", color=color, label=label)
        ax3.plot(ts, [study[router][str(t)]["mean_max_over_mean_load"] for t in ts], "s-", color=color,
                 label=f"{label}: mean")
        ax3.plot(ts, [study[router][str(t)]["p99_max_over_mean_load"] for t in ts], "^:", color=color,
                 label=f"{label}: 99th percentile")
    for ax in (ax2, ax3):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per batch |X|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_title("P(IS > 0): probability a batch is imbalanced")
    ax3.set_title("busiest device load / mean load")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
