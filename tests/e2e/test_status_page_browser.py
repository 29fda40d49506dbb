"""The status page in a real browser: headless Chromium (Debian's package) loads it and takes a screenshot,
which must show rendered figures (a sizeable image, many colours, the bar colours present)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

WIDTH, HEIGHT = 1200, 900


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of raw pixels; no imaging library needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = colour_type = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour_type in (2, 6)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        filter_type = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = prev[i]
            up_left = prev[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filter_type == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        rows.append(bytes(line) if channels == 3 else bytes(b for j, b in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def test_status_page_renders_figures_in_headless_chromium(service: Any, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("RAGKV_ALLOW_SKIP_BROWSER") == "1":
            pytest.skip("chromium is not installed (RAGKV_ALLOW_SKIP_BROWSER=1)")
        pytest.fail("chromium is not installed: scripts/setup.sh installs Debian's chromium package")
    with service.client("alice") as alice:  # answers cold then warm, so every figure has data
        for i in range(8):
            alice.post("/v1/generate", json={"query": f"Q k{i} ?", "documents": [f"k{i % 4} v{i % 4} ; see k9 v1 ;"],
                                             "max_new_tokens": 1})
    html = httpx.get(service.url + "/").text
    for figure in ("fig-hit-rates", "fig-tier-usage", "fig-ttft"):
        assert f'<svg id="{figure}"' in html
    shot = tmp_path / "status.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               f"--window-size={WIDTH},{HEIGHT}", service.url + "/"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert len(data) > 20_000  # a blank or single-colour page compresses to a few kilobytes
    width, height, rows = _png_pixels(data)
    assert (width, height) == (WIDTH, HEIGHT)
    colours: dict[bytes, int] = {}
    for row in rows[::3]:
        for x in range(0, len(row), 3 * 3):
            colours[row[x:x + 3]] = colours.get(row[x:x + 3], 0) + 1
    assert len(colours) > 50, "the screenshot is nearly uniform: the page did not render"
    bar_blue, warm_green = bytes.fromhex("3b6fd2"), bytes.fromhex("2e9d57")
    assert colours.get(bar_blue, 0) > 50, "no hit-rate / tier bars drawn"
    assert colours.get(warm_green, 0) > 20, "no TTFT bars drawn"
