"""Writing one benchmark's section of ``benchmarks/RESULTS.md`` without touching the others."""

from __future__ import annotations

from pathlib import Path


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
