"""What the benchmarks share: the machine a result came from (its name, its copy and read bandwidths) and writing
one benchmark's section of ``benchmarks/RESULTS.md`` without touching the others."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from moge.memory import huge_pages_zeros


def machine(device: torch.device | None = None) -> str:
    """The machine a result was measured on: the GPU's name on CUDA, else the CPU model (``lscpu``),
    its logical cores and torch's thread count, with the torch version."""
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def copy_bandwidth(device: torch.device | None = None, repeats: int = 5) -> float:
    """Bytes read + written per second by a 256 MiB float32 copy on ``device`` (STREAM's copy
    convention), best of ``repeats``: the memory speed the weights-read bounds divide by."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def read_bandwidth(device: torch.device | None = None, repeats: int = 5) -> float:
    """Bytes read per second by ``x.sum()`` over a 512 MiB float32 buffer written first, best of
    ``repeats``: the speed at which a decode step can stream its weights (a copy's rate is lower: it
    also writes). On a CPU the buffer lies on huge pages where the system has them, as moge's loaded
    weights do (``moge.memory``; ordinary pages read ~15% slower on the benchmark machine)."""
    planes = huge_pages_zeros([(128 * 2**20,)], torch.float32) if device is None or device.type == "cpu" else None
    x = planes[0].fill_(1) if planes else torch.ones(128 * 2**20, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        x.sum()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def replace_section(path: Path, section: str, body: list[str]) -> None:
    """Replace the section headed ``section`` (up to the next ``## `` heading) with ``body`` (whose
    first line is that heading), or append it when the file has no such section yet."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if section in text:
        head, rest = text.split(section, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        text = head + "\n".join(body) + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body)
    path.write_text(text)
