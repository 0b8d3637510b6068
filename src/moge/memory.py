"""Weights and caches on transparent huge pages (Linux, CPU).

A CPU decode step streams every weight it touches once per token, so its speed is the memory's read
rate, and on 4 KiB pages that rate is lower: the hardware prefetchers stop at each page boundary and
every page costs a TLB entry. On 2 MiB pages a sum over 512 MiB read 15-23% faster on the benchmark
machine, and the compiled decode steps of the ``small`` preset ran -2% to +7% faster (+24% once), eager
ones unchanged within the noise (``benchmarks/bench_huge_pages.py``, ``benchmarks/RESULTS.md``, "Huge
pages"). torch's CPU allocator asks the kernel for huge pages only when ``THP_MEM_ALLOC_ENABLE=1`` is
set before torch starts, which a library cannot arrange, and where the system's policy is ``madvise``
(the usual default) nothing else asks. So loading moves a model's
tensors into one anonymous mapping marked ``MADV_HUGEPAGE``; each tensor keeps a storage of its own
(a slice of the mapping), so saving, ``safetensors``' shared-memory checks and ``torch.save`` see
ordinary separate tensors. The mapping is unmapped when the last of its tensors is freed.

Where huge pages are unavailable (not Linux, policy ``never``) nothing moves and nothing fails.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import torch
from torch import Tensor, nn


__all__ = ["HUGE_PAGE", "huge_page_bytes", "huge_page_policy", "huge_pages_zeros", "move_to_huge_pages"]

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line
_POLICY = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_policy() -> str | None:
    """The kernel's transparent-huge-page policy (``always``, ``madvise`` or ``never``), ``None`` where
    there is none to ask (not Linux, or the file is unreadable)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        text = _POLICY.read_text()
    except OSError:
        return None
    chosen = [w for w in text.split() if w.startswith("[")]
    return chosen[0].strip("[]") if chosen else None


def huge_page_bytes() -> int:
    """Anonymous memory of this process now on huge pages, in bytes (0 where the kernel does not say)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def _arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous private mapping of at least ``nbytes`` from a 2 MiB boundary, marked for huge
    pages: ``(mapping, offset of the boundary)``. The extra 2 MiB of address space is never touched,
    so it costs no memory."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe = torch.frombuffer(m, dtype=torch.uint8, count=1)
    start = -probe.data_ptr() % HUGE_PAGE
    del probe
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:  # a kernel that refuses the advice: the mapping still works, on ordinary pages
        pass
    return m, start


def _movable(t: Tensor) -> bool:
    """A dense CPU tensor that is its storage's only view, whole and in order (so a copy of its bytes
    is the tensor), of a dtype that has bytes (not quantized, not meta)."""
    return (t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized and t.numel() > 0
            and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def move_to_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move ``module``'s CPU parameters and buffers into memory backed by transparent huge pages, in
    place (same Parameter objects, same values; ``.data`` is swapped). Returns the bytes moved: 0 where
    huge pages are unavailable, or when the module's tensors total less than ``min_bytes``.

    Tensors that share a storage move together (tied weights stay tied); views into a larger storage
    and non-CPU tensors stay where they are. Call it once after loading, before compiling or capturing
    a step (a compiled graph keeps reading the tensors it was traced with only if they are inputs,
    which they are for ``torch.compile``'s default of lifting module tensors, but not for frozen graphs).
    """
    if huge_page_policy() in (None, "never"):
        return 0
    groups: dict[int, list[Tensor]] = {}  # storage -> the tensors viewing it whole
    for t in [*module.parameters(), *module.buffers()]:
        if _movable(t):
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    sizes = [g[0].numel() * g[0].element_size() for g in groups.values()]
    total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
    if total < min_bytes:
        return 0
    arena, off = _arena(total)
    for group, n in zip(groups.values(), sizes):
        raw = torch.frombuffer(arena, dtype=torch.uint8, count=n, offset=off)
        raw.view(group[0].dtype).view(group[0].shape).copy_(group[0].detach())
        for t in group:
            t.data = raw.view(t.dtype).view(t.shape)
        off += -(-n // _ALIGN) * _ALIGN
    return total


def huge_pages_zeros(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[Tensor] | None:
    """Zero tensors of ``shapes`` in one huge-page mapping (e.g. a CPU KV cache, read every step), each
    with its own storage; ``None`` where huge pages are unavailable or the tensors total less than one
    huge page (the caller allocates as usual)."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = [-(-torch.Size(s).numel() * size // _ALIGN) * _ALIGN for s in shapes]
    if not all(sizes) or sum(sizes) < HUGE_PAGE or huge_page_policy() in (None, "never"):
        return None
    arena, off = _arena(sum(sizes))
    out = []
    for s, n in zip(shapes, sizes):
        count = torch.Size(s).numel() * size
        out.append(torch.frombuffer(arena, dtype=torch.uint8, count=count, offset=off).view(dtype).view(s))
        off += n
    return out  # anonymous pages read as zeros: nothing to fill
