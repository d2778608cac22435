"""benchmarks/serving.py end to end on a CPU: `--simulate` runs the real sweep (a `duetserve serve`
process per policy, attached to a simulated H200 data plane, the bench client over gRPC) and writes
the results file with a row per rate, every request accounted for, and the summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulated_sweep_writes_results_and_summary(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    shutil.copy(ROOT / "tests/data/traces/azure_llm_2023_code_300.csv", traces / "azure_llm_2023_code.csv")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/serving.py", "--simulate", "h200", "--traces", "code", "--policies",
         "duet,aggregated", "--rates", "2,4", "--seconds", "2", "--min-requests", "6", "--max-requests", "6",
         "--decode-partition-sms", "16,32", "--trace-dir", str(traces), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "serving-sim-h200-flashinfer.json").read_text())
    code = report["results"]["code"]
    assert set(code) == {"duet", "aggregated"}
    for rows in code.values():
        assert [r["rate"] for r in rows] == [2.0, 4.0]
        assert all(r["completed"] == 6 and r["failed"] == 0 and len(r["ttfts"]) == 6 for r in rows)
        for r in rows:  # the point's steps, from the server's step counters
            modes = r["steps"]["modes"]
            assert modes and all(m["steps"] >= 1 and m["mean_total_ms"] > 0 and m["tokens_per_step"] > 0
                                 for m in modes.values())
            assert 0 < r["steps"]["gpu_busy_fraction"] <= 1.5
    summary = report["summary"]["azure_code"]
    assert summary["best_baseline"] == "aggregated" and summary["rate"] in (2.0, 4.0)
    assert summary["duet_goodput"] == next(r["request_goodput"] for r in code["duet"] if r["rate"] == summary["rate"])
