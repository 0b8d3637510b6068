"""llama.cpp as a benchmark peer: convert a transformers Qwen2-MoE to GGUF and time ``llama-bench``.

Nothing here is a dependency of moge: the benchmark finds a ``llama-bench`` binary and llama.cpp's
``convert_hf_to_gguf.py`` through flags or the ``LLAMA_BENCH`` / ``LLAMA_CONVERT`` environment variables
(``llama-quantize``, for 4-bit, is looked up next to ``llama-bench`` or through ``LLAMA_QUANTIZE``), and
its llama.cpp rows are skipped without them. How to build them from PyPI, with no other network:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36   # bundles llama.cpp
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -G Ninja -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama-bench llama-quantize -j 2          # ~15 minutes on 2 cores
    export LLAMA_BENCH=$PWD/build/bin/llama-bench LLAMA_CONVERT=$PWD/convert_hf_to_gguf.py

The converter runs in a subprocess of this Python (it needs torch, transformers and numpy, all in
moge's environment, plus llama.cpp's own ``gguf-py``, which it finds next to itself). A random-weight
Qwen2-MoE has no tokenizer, so the conversion takes llama.cpp's bundled 32,000-token SentencePiece
vocabulary (``models/ggml-vocab-llama-spm.gguf``) instead: the benchmark's vocabulary is 32,000, and
``llama-bench`` times random token ids, so the vocabulary's content changes nothing it measures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# GGUF types per moge weight format: float32, bfloat16, 8-bit and 4-bit weights.
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}

# Run in a subprocess: the converter with its Qwen2-MoE vocabulary swapped for the bundled SentencePiece one.
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf as conv
from conversion.qwen import Qwen2MoeModel
Qwen2MoeModel.set_vocab = lambda self: self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
conv.main()
"""


class LlamaCpp:
    """The llama.cpp tools found for this run (``None`` from :meth:`find` when any is missing)."""

    def __init__(self, bench: Path, convert: Path, quantize: Path | None):
        self.bench, self.convert, self.quantize = bench, convert, quantize

    @classmethod
    def find(cls, bench: str | None = None, convert: str | None = None) -> "LlamaCpp | None":
        bench = bench or os.environ.get("LLAMA_BENCH")
        convert = convert or os.environ.get("LLAMA_CONVERT")
        if not (bench and convert and Path(bench).is_file() and Path(convert).is_file()):
            return None
        quantize = os.environ.get("LLAMA_QUANTIZE") or str(Path(bench).with_name("llama-quantize"))
        return cls(Path(bench), Path(convert), Path(quantize) if Path(quantize).is_file() else None)

    def to_gguf(self, hf_dir: Path, out_dir: Path, fmt: str) -> Path:
        """``hf_dir`` (a saved transformers Qwen2-MoE) as a GGUF file of moge format ``fmt``."""
        out = out_dir / f"model-{GGUF_TYPES[fmt]}.gguf"
        if out.exists():
            return out
        outtype = "f32" if fmt == "int4" else GGUF_TYPES[fmt]
        src = out_dir / "model-f32.gguf" if fmt == "int4" else out
        if not src.exists():
            _run([sys.executable, "-c", _CONVERT, str(self.convert.parent), str(hf_dir), "--outtype", outtype,
                  "--outfile"], src)
        if fmt == "int4":
            if self.quantize is None:
                raise FileNotFoundError("llama-quantize (next to llama-bench, or LLAMA_QUANTIZE) for q4_0")
            _run([str(self.quantize), str(src)], out, "Q4_0")
        return out

    def ms_per_token(self, gguf: Path, threads: int, n_new: int, depth: int) -> float:
        """Decode ms per token of one ``llama-bench`` run: ``n_new`` tokens after ``depth`` tokens of
        context, batch 1, ``threads`` threads, one repetition (the caller interleaves and keeps the best)."""
        cmd = [str(self.bench), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(n_new), "-r", "1",
               "-o", "json"]
        if depth:
            cmd += ["-d", str(depth)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        tests = [t for t in json.loads(res.stdout) if t.get("n_gen", 0) > 0]
        return 1e3 / tests[0]["avg_ts"]


def _run(cmd: list[str], out: Path, *tail: str) -> None:
    """Run a tool writing ``out`` (its path goes after ``cmd``, then ``tail``): written under a temporary
    name and renamed when the tool succeeds, so an interrupted run leaves no half-written model."""
    part = out.with_name(out.name + ".part")
    res = subprocess.run([*cmd, str(part), *tail], capture_output=True, text=True)
    if res.returncode:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    part.rename(out)


def save_qwen(model, out_dir: Path) -> Path:
    """Save a transformers model with its config for the converter (float32 safetensors)."""
    hf_dir = out_dir / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.float().save_pretrained(hf_dir)
    return hf_dir
