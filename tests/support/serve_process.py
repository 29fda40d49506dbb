"""``ragkv`` as a child process for end-to-end tests: the command that runs it, and a clean stop."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def ragkv_command() -> list[str]:
    """The installed ``ragkv`` script beside this interpreter, else ``python -m ragkv.integrations.cli``."""
    script = Path(sys.executable).with_name("ragkv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ragkv.integrations.cli"]


def stop(proc: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it does not exit within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def line_queue(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines of ``stream`` as a thread reads them (None once it ends)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def lines_until(lines: queue.Queue[str | None], timeout_s: float) -> Iterator[str]:
    """Lines as they come, until the stream ends or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            return
        yield line
