"""The small shared benchmark harness: timing, machine description, result tables and JSON output.

Every scenario script builds a ``Report``, adds tables and headline figures, and calls ``report.write()``,
which prints the tables and writes ``bench/results/<scenario>.json`` (figures + machine + commit).
Scripts take ``--quick`` for the tiny sizes the test suite smoke-runs; quick runs write to
``bench/results/quick/`` so they never overwrite real figures.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite's smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
        info["gpu"] = None
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def time_call(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, min_time_s: float = 0.0) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then at least ``repeat`` times (and ``min_time_s``); seconds each."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


class Report:
    def __init__(self, scenario: str, quick: bool = False, out: Path | None = None) -> None:
        self.scenario = scenario
        self.quick = quick
        self.out = out if out is not None else (RESULTS_DIR / "quick" if quick else RESULTS_DIR)
        self.setup: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows]})

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(),
            "quick": self.quick,
            "machine": machine(),
            "setup": self.setup,
            "figures": self.figures,
            "tables": self.tables,
            "notes": self.notes,
        }

    def render(self) -> str:
        lines = [f"== {self.scenario}{' (quick)' if self.quick else ''} =="]
        for t in self.tables:
            lines.append(f"\n{t['title']}")
            cells = [[_fmt(c) for c in t["columns"]]] + [[_fmt(c) for c in r] for r in t["rows"]]
            widths = [max(len(row[i]) for row in cells) for i in range(len(t["columns"]))]
            for j, row in enumerate(cells):
                lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for c, w in zip(row, widths)))
                if j == 0:
                    lines.append("  ".join("-" * w for w in widths))
        if self.figures:
            lines.append("\nfigures:")
            lines.extend(f"  {k} = {_fmt(v)}" for k, v in self.figures.items())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def write(self) -> Path:
        print(self.render(), flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{self.scenario}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        print(f"\nwrote {path}")
        return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def drop_dir_from_page_cache(path: str) -> int:
    """Evict every file under ``path`` from the page cache (posix_fadvise DONTNEED); returns how many."""
    dropped = 0
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            finally:
                os.close(fd)
    return dropped


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port for a benchmark run; stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--proto-max-bulk-len", "1gb", "--client-output-buffer-limit", "normal 0 0 0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
