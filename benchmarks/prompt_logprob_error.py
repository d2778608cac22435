"""How far the data plane's prompt logprobs stand from the float32 CPU path, by path: the CPU path in
bf16 (the rounding any bf16 engine has) and, on a GPU, the flashinfer path in chunks of 16 tokens with
the layers' norms as kernels (`epilogue_norm_rows=0`) and in the projections' epilogues (256). The
reference that `tests/dataplane/test_gpu.py::test_prompt_logprobs_on_the_gpu_match_the_cpu_path` bounds
the GPU's error by; it measures, it does not assert.

Uses the tests' tiny Qwen3 checkpoint writer, with norm weights of ones and drawn around 1. Prints the
max and mean absolute error of each path and writes benchmarks/results/prompt-logprob-error-<gpu>.json
(`-cpu` without CUDA, CPU rows only).

    python benchmarks/prompt_logprob_error.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import gpu_slug  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402
from tests.dataplane.gpu_support import BS, gpu_worker, random_prompts, save_qwen3  # noqa: E402
from tests.dataplane.test_gpu import _prompt_logprobs_run  # noqa: E402


def _error(got: list[float], want: list[float]) -> dict[str, float]:
    if len(got) != len(want):
        raise RuntimeError(f"{len(got)} logprobs against {len(want)}")
    diffs = [abs(a - b) for a, b in zip(got, want, strict=True)]
    return {"max": max(diffs), "mean": sum(diffs) / len(diffs), "tokens": len(diffs)}


def measure(norms: bool, cuda: bool) -> dict[str, dict[str, float]]:
    """Each path's error against the float32 CPU path on one checkpoint (`norms`: weights around 1)."""
    checkpoint = save_qwen3(Path(tempfile.mkdtemp(prefix="logprob-ckpt-")), norms=norms)
    prompt = random_prompts(1, 512, seed=8)[0] * 3  # the test's prompt: 3x one of 5-60 tokens

    def cpu(dtype: str) -> list[float]:
        runner = load_worker(DataplaneConfig(model=str(checkpoint), device="cpu", num_kv_blocks=64,
                                             block_size=BS, dtype=dtype)).runner
        return _prompt_logprobs_run(runner, prompt, chunk=len(prompt), sync_debug=False)

    want = cpu("float32")
    runs = {"cpu-bf16": cpu("bfloat16")}
    if cuda:
        for rows in (0, 256):
            runner = gpu_worker(str(checkpoint), epilogue_norm_rows=rows).runner
            runs[f"gpu-epi{rows}"] = _prompt_logprobs_run(runner, prompt, chunk=16, sync_debug=True)
    out = {name: _error(got, want) for name, got in runs.items()}
    if cuda:
        out["gpu-epi0-vs-epi256"] = _error(runs["gpu-epi256"], runs["gpu-epi0"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if not torch.cuda.is_available():  # the CPU rows only; the test helpers' sync-debug switch needs CUDA
        torch.cuda.set_sync_debug_mode = lambda mode: None  # type: ignore[assignment]
    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "checkpoints": {"norms-ones": measure(False, cuda), "norms-around-1": measure(True, cuda)}}
    for ckpt, rows in result["checkpoints"].items():
        for name, err in rows.items():
            print(f"{ckpt:15s} {name:20s} max {err['max']:.4f}  mean {err['mean']:.4f}")
    slug = gpu_slug(torch.device("cuda")) if cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prompt-logprob-error-{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
