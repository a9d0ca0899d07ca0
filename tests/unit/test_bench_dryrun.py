"""The prepared GPU benchmark (benchmarks/gpu.sh) runs its whole logic on CPU with --dry-run:
every strategy it lists trains, reports a line with its figures, and the largest-batch search
and the JSON records work. A GPU run then only has to be pointed at the machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "records.json"
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--strategies", "single", "fsdp", "zero3",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout
    records = json.loads(out.read_text())
    runs = [r for r in records if "strategy" in r]
    assert [r["strategy"] for r in runs[:3]] == ["single", "fsdp", "zero3"]
    for record in runs:
        assert record["tokens_per_s"] > 0 and record["model_flops_per_s"] > 0
        assert record["live_bytes"] > 0 and record["of_matmul"] > 0
    assert records[-1] == {"preset": "igpt-s", "largest_batch": 4}
    assert "largest batch that fits" in proc.stdout
