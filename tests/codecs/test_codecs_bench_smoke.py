"""Smoke run of bench/codecs.py --quick, so the benchmark script cannot rot unnoticed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_codecs_bench_quick(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "codecs.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "codecs.json").read_text())
    figures = result["figures"]
    for name in ("cachegen_mid_vs_int8", "cachegen_mid_bits_per_element", "cachegen_decode_mbps_2threads"):
        assert figures[name] > 0
    assert result["quick"] is True
