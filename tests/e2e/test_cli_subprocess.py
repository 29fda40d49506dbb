"""The ``ragkv`` command line as a user runs it: subprocesses with their own store under a temporary cache dir.

``ragkv serve`` is the README's main job: it must come up on the embedded default store with the default
model and the sample corpus warmed, print its URL and a ready-to-paste request, and that request must be
answered from the cache, correctly, by the real default model (SmolLM2-135M-Instruct).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import line_queue, lines_until, ragkv_command, stop

from ragkv.integrations.cli import main as cli_main

START_TIMEOUT_S = 240


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAGKV_STORE"}
    env.update(RAGKV_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cache = tmp_path_factory.mktemp("serve-cache")
    proc = subprocess.Popen([*ragkv_command(), "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(cache))
    seen: list[str] = []
    info: dict[str, Any] = {"proc": proc, "output": seen, "cache": cache}
    try:
        for line in lines_until(line_queue(proc.stdout), START_TIMEOUT_S):  # type: ignore[arg-type]
            seen.append(line)
            if "is serving on" in line:
                info["url"] = line.split("is serving on ", 1)[1].split()[0]
            if line.strip().startswith("curl "):
                info["curl"] = line.strip()
            if "expected answer:" in line:
                info["expected"] = line.split("expected answer:", 1)[1].split("  (")[0].strip()
                break
        assert "url" in info and "curl" in info, "\n".join(seen)
        yield info
    finally:
        stop(proc)


def test_serve_prints_url_and_a_request_answered_from_the_cache(served: dict[str, Any]) -> None:
    url, output = served["url"], "\n".join(served["output"])
    assert url.startswith("http://127.0.0.1:")
    assert "sample corpus:" in output and "store: TieredStore(host, disk" in output
    argv = shlex.split(served["curl"])
    assert argv[argv.index("-s") + 1] == f"{url}/v1/generate"
    body = json.loads(argv[argv.index("-d") + 1])
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["documents"] and all(d["hit"] for d in result["documents"])  # warmed at start-up
    health = httpx.get(f"{url}/healthz").json()
    assert health["sample_corpus"]["chunks"] > 0 and health["auth"] is False
    assert health["model"]["name"] == "smollm2-135m-instruct" and result["model"] == "smollm2-135m-instruct"
    assert served["expected"].lower() in result["answer"].lower(), "SmolLM2 must answer the printed request"
    assert httpx.get(f"{url}/").status_code == 200


def test_ask_against_the_running_service(served: dict[str, Any]) -> None:
    proc = subprocess.run([*ragkv_command(), "ask", "--url", served["url"], "--sample", "0", "--json"], capture_output=True,
                          text=True, env=_env(served["cache"]), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)["result"]
    assert all(d["hit"] for d in result["documents"]) and result["ttft_ms"] > 0


def test_warm_then_ask_with_the_builtin_index(tmp_path: Path) -> None:
    from ragkv.integrations.sample_corpus import load_sample_corpus

    corpus = load_sample_corpus()
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"chunks": list(q.chunks)}) + "\n" for q in corpus.questions[:6]))
    env, index = _env(tmp_path / "cache"), tmp_path / "index"
    warm = subprocess.run([*ragkv_command(), "warm", str(jsonl), "--index", str(index), "--embedder", "hashing"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert warm.returncode == 0, warm.stderr[-2000:]
    chunks = sum(len(q.chunks) for q in corpus.questions[:6])
    assert f"warmed {chunks} chunks" in warm.stdout and f"{chunks} computed" in warm.stdout
    assert "warm [" in warm.stderr and "100.0%" in warm.stderr  # the progress bar
    q = corpus.questions[0]
    ask = subprocess.run([*ragkv_command(), "ask", q.question, "--index", str(index), "-k", "4", "--max-new-tokens", "1"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert ask.returncode == 0, ask.stderr[-2000:]
    assert "answer:" in ask.stdout and "TTFT" in ask.stdout and "prepare" in ask.stdout
    assert "documents: 4 of 4 from the cache (disk: 4)" in ask.stdout  # a new process: read back from disk
    stats = subprocess.run([*ragkv_command(), "stats"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert stats.returncode == 0 and json.loads(stats.stdout)["tiers"]["disk"]["entries"] == chunks


def test_warm_resumes_where_an_interrupted_run_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    texts = [f"k{i} v{i} ; the k{i + 1} v{i + 2} ;" for i in range(20)]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("\n\n".join(texts[:8]))
    monkeypatch.setenv("RAGKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAGKV_STORE", raising=False)
    assert cli_main(["warm", str(tmp_path / "docs"), "--batch-size", "4"]) == 0
    assert "8 computed, 0 already stored" in capsys.readouterr().out
    (tmp_path / "docs" / "b.txt").write_text("\n\n".join(texts[8:]))  # the corpus grew (or a run was cut short)
    assert cli_main(["warm", str(tmp_path / "docs"), "--batch-size", "4"]) == 0
    assert "12 computed, 8 already stored" in capsys.readouterr().out
    assert cli_main(["ask", "--sample", "1", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "expected:" in out
    assert cli_main(["demo", "--chunks", "2", "--tokens", "8"]) == 0
    capsys.readouterr()
    assert cli_main(["bench", "--questions", "2", "--seconds", "0.2", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["ttft_ms"]["warm"] > 0 and bench["store_get_blob_mbps"] > 0
    assert cli_main(["ask"]) == 2  # no question: a clear error, not a traceback
    assert "needs a question" in capsys.readouterr().err


def test_calibrate_saves_a_choice_that_the_runtime_then_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from ragkv.integrations.runtime import RagRuntime

    monkeypatch.setenv("RAGKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAGKV_STORE", raising=False)
    out = tmp_path / "calibration"
    assert cli_main(["calibrate", "--model", "toy", "--prompts", "2", "--tokens", "4", "--target", "0.5",
                     "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["path"]).parent == out and len(report["points"]) > 5
    digest = report["codec"]["transform_basis"]  # the transform basis, fitted on the sample's documents
    assert Path(report["codec"]["path"]).parent == out and report["codec"]["chunks"] > 1
    assert report["choice"] is not None  # the dearest candidates keep every answer at 0.5
    chosen = next(p for p in report["points"] if p["name"] == report["choice"])
    assert chosen["agreement"] >= 0.5
    assert all(p["compute_share"] >= chosen["compute_share"] for p in report["points"] if p["agreement"] >= 0.5)
    with RagRuntime.open("host:256MB", "toy", calibration_dir=out) as runtime:
        assert runtime.engine.calibration is not None
        assert runtime.engine.calibration.choice.name == report["choice"]
        assert runtime.engine.strategy("blend").config == runtime.engine.calibration.choice.config
        summary = runtime.calibration_summary()
        assert summary is not None and summary["choice"] == report["choice"] and summary["target"] == 0.5
        assert runtime.codec_calibration_summary()["transform_basis"] == digest
    with RagRuntime.open("host:256MB", "toy", use_calibration=False) as runtime:
        assert runtime.engine.calibration is None and runtime.calibration_summary() is None
        assert runtime.codec_calibration_summary() is None
    (tmp_path / "docs").mkdir()  # the user's own chunks, asked generic questions
    (tmp_path / "docs" / "a.txt").write_text("\n\n".join(f"k{i} v{i} ; the k{i + 1} v{i + 2} ;" for i in range(8)))
    assert cli_main(["calibrate", "--model", "toy", "--corpus", str(tmp_path / "docs"), "--prompts", "2",
                     "--tokens", "2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == 0.95
    # the codec alone, into a disk store that then codes chunks with it (and a later process finds it there)
    store = f"disk:{tmp_path / 'kv'}?codec=transform&codec.level=4"
    assert cli_main(["calibrate", "--model", "toy", "--what", "codec", "--store", store, "--codec-chunks", "6",
                     "--layer-group", "2", "--out", str(out)]) == 0
    codec = json.loads(capsys.readouterr().out)
    assert set(codec) == {"codec"} and codec["codec"]["layer_group"] == 2 and codec["codec"]["chunks"] == 6
    assert (tmp_path / "kv" / "+artefacts" / codec["codec"]["transform_basis"]).is_file()
