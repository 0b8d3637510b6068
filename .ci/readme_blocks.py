"""Run the README's commands and code blocks as a user would type them, in order, from the repository root.

Every fenced ``bash`` and ``python`` block runs (bash with ``-euo pipefail``, the project's ``.venv/bin``
first on PATH, so ``moge`` and ``python`` are the installed ones), except the first block (``make demo`` /
``make test``, which CI has just run) and blocks preceded by a line ``<!-- ci: skip: REASON -->``. A block
preceded by ``<!-- ci: background until URL -->`` (a server) is started in the background, the run waits
until ``URL`` answers, and the server is stopped (SIGTERM, so it drains) when the run ends. Each block's
output goes to ``runs/readme-ci/block-LINE.log``; one line per block is printed; the first failure stops
the run with the block's README line and the end of its log.

Usage: python .ci/readme_blocks.py [README.md] [--list]
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FENCE = re.compile(r"^```(bash|python)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*ci:\s*(skip:|background until)\s*(.+?)\s*-->\s*$")
TIMEOUT_S = 20 * 60


def blocks(readme: Path) -> list[tuple[int, str, str, tuple[str, str] | None]]:
    """``(line, language, code, directive)`` of every fenced bash/python block, in order; a directive is
    ``("skip:", reason)`` or ``("background until", url)``."""
    lines = readme.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
        d = DIRECTIVE.match(prev.strip())
        out.append((start, m.group(1), "\n".join(body) + "\n", (d.group(1), d.group(2)) if d else None))
        i += 1
    return out


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    readme = Path(next((a for a in argv if not a.startswith("-")), root / "README.md"))
    found = blocks(readme)
    if "--list" in argv:
        for line, lang, code, d in found:
            print(f"{readme.name}:{line} {lang} {' '.join(d) if d else 'run'}: {code.splitlines()[0][:70]}")
        return 0
    env = dict(os.environ, PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    logs = root / "runs" / "readme-ci"
    logs.mkdir(parents=True, exist_ok=True)
    servers: list[subprocess.Popen] = []
    try:
        return _run_all(readme, found, root, env, logs, servers)
    finally:
        for proc in servers:  # SIGTERM to the whole session: the server drains and exits
            if proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> bool:
    """True once ``url`` answers 200 (False if the process exits first or ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def _run_all(readme: Path, found, root: Path, env: dict, logs: Path, servers: list) -> int:
    ran = skipped = 0
    for n, (line, lang, code, d) in enumerate(found):
        if n == 0 or (d and d[0] == "skip:"):
            reason = "make demo / make test: run by CI before this" if n == 0 else d[1]
            print(f"{readme.name}:{line} {lang}: skipped ({reason})", flush=True)
            skipped += 1
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [str(root / ".venv/bin/python"), "-c", code]
        log = logs / f"block-{line}.log"
        t0 = time.perf_counter()
        if d and d[0] == "background until":
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            servers.append(proc)
            rc = 0 if _wait_for(d[1], proc) else f"{d[1]} never answered"
            what = "started, answering" if rc == 0 else "FAILED"
        else:
            with log.open("w") as f:
                try:
                    rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, timeout=TIMEOUT_S).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            what = "ok" if rc == 0 else f"FAILED ({rc})"
        dt = time.perf_counter() - t0
        print(f"{readme.name}:{line} {lang}: {what} in {dt:.1f} s (log {log.relative_to(root)})", flush=True)
        if rc != 0:
            print("---- code ----\n" + code + "---- end of its log ----\n" + log.read_text()[-4000:], flush=True)
            return 1
        ran += 1
    print(f"readme: {ran} passed, 0 failed, {skipped} skipped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
