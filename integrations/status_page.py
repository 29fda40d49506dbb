"""The status page at ``/``: hit rates, tier usage and recent TTFTs, as server-rendered SVG figures.

Why server-side SVG and no JavaScript: the page must work in any browser (and in a headless screenshot)
with nothing fetched from elsewhere; it refreshes itself every few seconds. Every value shown is an
aggregate: no keys, tenants or texts appear here, so the page needs no API key.
"""
from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ragkv.integrations.metrics import TtftSample

STATE_COLOURS = {"warm": "#2e9d57", "mixed": "#e0a526", "cold": "#d2553b", "none": "#8a8f98"}
_BAR = "#3b6fd2"
_TRACK = "#e6e9ef"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bytes(n: float | None) -> str:
    if n is None:
        return "unbounded"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def bar_chart(fig_id: str, title: str, rows: Sequence[tuple[str, float | None, str]], width: int = 500) -> str:
    """Horizontal bars: (label, fraction in [0, 1] or None, value text)."""
    row_h, label_w, top = 30, 120, 34
    height = top + row_h * max(len(rows), 1) + 10
    bar_w = width - label_w - 150
    parts = [(f'<svg id="{_e(fig_id)}" class="figure" role="img" aria-label="{_e(title)}" width="{width}" '
              f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'),
             f'<text x="0" y="18" font-size="15" font-weight="600" fill="#1d2330">{_e(title)}</text>']
    if not rows:
        parts.append(f'<text x="0" y="{top + 18}" font-size="13" fill="#666">no data yet</text>')
    for i, (label, fraction, text) in enumerate(rows):
        y = top + i * row_h
        f = 0.0 if fraction is None else min(max(float(fraction), 0.0), 1.0)
        parts.append(f'<text x="0" y="{y + 17}" font-size="13" fill="#1d2330">{_e(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{bar_w}" height="18" rx="3" fill="{_TRACK}"/>')
        parts.append(f'<rect x="{label_w}" y="{y + 4}" width="{bar_w * f:.1f}" height="18" rx="3" fill="{_BAR}"/>')
        parts.append(f'<text x="{label_w + bar_w + 8}" y="{y + 17}" font-size="13" fill="#1d2330">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def ttft_chart(fig_id: str, samples: Sequence[TtftSample], width: int = 1080, height: int = 240) -> str:
    """One bar per recent answer, height = TTFT (ms), colour = cache state of its documents."""
    left, top, bottom = 56, 30, 28
    plot_w, plot_h = width - left - 10, height - top - bottom
    parts = [(f'<svg id="{_e(fig_id)}" class="figure" role="img" aria-label="recent time to first token" '
              f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'),
             '<text x="0" y="18" font-size="15" font-weight="600" fill="#1d2330">Recent time to first token (ms)</text>']
    legend_x = 320
    for state, colour in STATE_COLOURS.items():
        parts.append(f'<rect x="{legend_x}" y="7" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{legend_x + 16}" y="18" font-size="12" fill="#1d2330">{state}</text>')
        legend_x += 80
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>')
    if not samples:
        parts.append(f'<text x="{left + 12}" y="{top + plot_h / 2}" font-size="13" fill="#666">no answers yet: '
                     f'POST /v1/generate or /v1/chat/completions</text>')
    else:
        peak = max(s.ttft_ms for s in samples) or 1.0
        for frac in (0.5, 1.0):
            y = top + plot_h * (1 - frac)
            parts.append(f'<text x="{left - 6}" y="{y + 4}" font-size="11" text-anchor="end" fill="#555">'
                         f'{peak * frac:.0f}</text>')
            parts.append(f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#eee"/>')
        step = plot_w / max(len(samples), 40)  # at most 1/40 of the plot per bar, so a few bars stay bars
        for i, s in enumerate(samples):
            h = max(plot_h * s.ttft_ms / peak, 1.0)
            colour = STATE_COLOURS.get(s.state, "#8a8f98")
            parts.append(f'<rect x="{left + i * step + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{s.ttft_ms:.1f} ms, {_e(s.state)}, '
                         f'{_e(s.strategy)}</title></rect>')
        parts.append(f'<text x="{left}" y="{height - 8}" font-size="11" fill="#555">oldest</text>'
                     f'<text x="{left + plot_w}" y="{height - 8}" font-size="11" text-anchor="end" fill="#555">'
                     f'latest</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_status_page(*, model: Mapping[str, Any], store_repr: str, store_stats: Mapping[str, Any],
                       service: Mapping[str, Any], samples: Sequence[TtftSample], auth: bool,
                       example: str | None = None, refresh_s: int = 5) -> str:
    tiers: Mapping[str, Any] = store_stats.get("tiers", {})
    hit_rows: list[tuple[str, float | None, str]] = [
        ("store lookups", store_stats.get("hit_rate"), _pct(store_stats.get("hit_rate"))),
        ("documents", service.get("document_hit_rate"), _pct(service.get("document_hit_rate"))),
    ]
    for name, t in tiers.items():
        hit_rows.append((f"tier {name}", t.get("hit_rate"), _pct(t.get("hit_rate"))))
    usage_rows: list[tuple[str, float | None, str]] = []
    for name, t in tiers.items():
        used, cap = t.get("used_bytes") or 0, t.get("capacity_bytes")
        usage_rows.append((f"{name} ({t.get('codec', '?')})", (used / cap) if cap else 0.0,
                           f"{_bytes(used)} / {_bytes(cap)}"))
    ttft = service.get("ttft", {})
    summary = " · ".join(f"{state}: {v['count']} × {v['mean_ms']:.1f} ms mean" for state, v in sorted(ttft.items())
                         if v.get("mean_ms") is not None) or "no answers yet"
    warning = ""
    if model.get("kind") == "random-init":
        warning = f'<p class="warn">Model: {_e(model.get("label"))}</p>'
    example_html = f"<h2>Try it</h2><pre>{_e(example)}</pre>" if example else ""
    uptime = service.get("uptime_s", 0.0)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{int(refresh_s)}">
<title>ragkv status</title>
<style>
body {{ font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px 32px; color: #1d2330;
       background: #fafbfc; }}
h1 {{ margin: 0 0 4px 0; font-size: 24px; }} h2 {{ font-size: 17px; margin: 22px 0 8px; }}
.meta {{ color: #4a5160; font-size: 14px; }} .row {{ display: flex; gap: 40px; flex-wrap: wrap; }}
.card {{ background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; padding: 14px 16px; margin-top: 16px; }}
.warn {{ background: #fff4d6; border: 1px solid #e0a526; padding: 8px 12px; border-radius: 6px; }}
pre {{ background: #f0f2f5; padding: 10px; border-radius: 6px; white-space: pre-wrap; word-break: break-all;
      font-size: 12px; }}
</style></head>
<body>
<h1>ragkv</h1>
<div class="meta">model <b>{_e(model.get("name"))}</b> ({_e(model.get("kind"))}) · store {_e(store_repr)} ·
auth {"API keys" if auth else "open (no keys)"} · up {uptime:.0f} s · {int(service.get("requests", 0))} requests ·
{int(service.get("answers", 0))} answers · {_e(summary)} · refreshed {_e(time.strftime("%H:%M:%S"))}</div>
{warning}
<div class="row">
<div class="card">{bar_chart("fig-hit-rates", "Hit rates", hit_rows)}</div>
<div class="card">{bar_chart("fig-tier-usage", "Tier usage", usage_rows)}</div>
</div>
<div class="card">{ttft_chart("fig-ttft", samples)}</div>
{example_html}
<p class="meta">JSON: <a href="/v1/stats">/v1/stats</a> (API key) · Prometheus: <a href="/metrics">/metrics</a> ·
API: <a href="/docs">/docs</a> · health: <a href="/healthz">/healthz</a></p>
</body></html>
"""


__all__ = ["STATE_COLOURS", "bar_chart", "render_status_page", "ttft_chart"]
