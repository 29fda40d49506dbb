"""Smoke-run every benchmark scenario on tiny sizes so none rots (each writes JSON with the agreed fields)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCENARIOS = sorted(p for p in BENCH.glob("*.py") if p.name != "harness.py" and "Report(" in p.read_text())


def test_there_are_scenarios() -> None:
    assert any(p.name == "store_throughput.py" for p in SCENARIOS)


@pytest.mark.parametrize("script", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_runs_quick(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAGKV_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(tmp_path.glob("*.json"))  # one per scenario the script runs (service_load: two)
    assert results and all(r.stem.startswith(script.stem) for r in results), proc.stdout[-2000:]
    for result in results:
        data = json.loads(result.read_text())
        assert {"scenario", "date", "commit", "machine", "setup", "figures", "tables"} <= set(data)
        assert data["quick"] is True and data["figures"], "a scenario records its headline figures"
        assert data["machine"]["cores"] >= 1
