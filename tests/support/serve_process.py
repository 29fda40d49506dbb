"""``ragkv`` as a child process for end-to-end tests: the command that runs it, and a clean stop."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any


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
