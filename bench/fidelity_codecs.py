"""The codec rows of ``bench/fidelity.py``: full prefill with the prompt's KV round-tripped through a codec, the
transform basis fitted for it on held-out documents, the size-vs-accuracy-drop plot and the codec figures."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from codec_sources import held_out_documents

from ragkv.codecs.transform import LEVEL_BITS
from ragkv.middleware import ContextEngine, PrepareRequest
from ragkv.middleware.codec_calibration import calibrate_transform

CODECS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("int8", "quant", {"bits": 8}), ("int4", "quant", {"bits": 4}), ("cachegen-1", "cachegen", {"level": 1}),
    ("cachegen-2 (mid)", "cachegen", {"level": 2}), ("cachegen-3", "cachegen", {"level": 3}),
    *((f"transform-{level}", "transform", {"level": level}) for level in sorted(LEVEL_BITS)))
QUICK_CODECS = ("cachegen-2 (mid)", "transform-3")
CALIBRATION_DOCUMENTS = 64
MAX_DROP_POINTS = 1.0
MIN_AGREEMENT = 0.95
AGREEMENT_TOKENS = 16  # as bench/fidelity.py compares
PLOT = Path(__file__).resolve().parent / "fidelity_codecs_size_vs_drop.png"


def fit_transform_basis(engine: ContextEngine, quick: bool) -> str:
    """Fit the transform basis as ``ragkv calibrate --corpus`` would, on documents of a fidelity world no
    evaluated question comes from; registered as the default for the model. Returns a description."""
    record, basis = calibrate_transform(engine, held_out_documents(4 if quick else CALIBRATION_DOCUMENTS))
    return (f"transform basis {basis.digest[:12]}: {record.chunks} held-out documents, {record.tokens} tokens, "
            f"one basis per layer; level budgets (bits/element) {LEVEL_BITS}")


@torch.no_grad()
def codec_context(engine: ContextEngine, request: PrepareRequest, codec: Any) -> tuple[Any, float]:
    """A prepared context of full prefill whose KV (all prompt tokens but the last, at positions 0 ..) went
    through ``codec``, and the payload's bits per KV element."""
    from ragkv.middleware.context import PreparedContext

    adapter = engine.adapter
    ids = engine.assemble(request).input_ids
    kv = adapter.prefill(torch.tensor([ids[:-1]])).kv  # [L, 2, 1, H, P, D]
    source = kv[:, :, 0].contiguous()  # [L, 2, H, P, D]
    payload = codec.encode(source, position=0)
    decoded = codec.decode(payload, tuple(source.shape), source.dtype)[:, :, None]
    last = adapter.prefill(torch.tensor([ids[-1:]]), start_position=len(ids) - 1, past=decoded)
    full_kv = torch.cat((decoded, last.kv), dim=4)
    prepared = PreparedContext(cache=adapter.make_cache(full_kv), logits=adapter.logits(last.hidden[:, -1:])[0, 0],
                               input_ids=ids, next_position=len(ids), chunks=[], strategy="full+codec")
    return prepared, 8 * len(payload) / source.numel()


def codec_figures(report: Any, results: dict[str, dict[str, float]], bits: dict[str, float]) -> dict[str, Any]:
    """Per codec row: accuracy drop (points) and bits per element; ``transform_best_vs_int8`` (int8's bits over
    the smallest transform level within ``MAX_DROP_POINTS`` and ``MIN_AGREEMENT``; 0 when none is)."""
    full_acc = results["full"]["accuracy"]
    rows = {name: {"drop": 100 * (full_acc - results[f"full via {name}"]["accuracy"]),
                   "agreement": results[f"full via {name}"]["agreement"], "bits": bits[f"full via {name}"]}
            for name, _, _ in CODECS if f"full via {name}" in results}
    for name, row in rows.items():
        slug = name.split(" ")[0].replace("-", "_")
        report.figure(f"{slug}_accuracy_drop_points", row["drop"])
        report.figure(f"{slug}_agreement", row["agreement"])
        report.figure(f"{slug}_bits_per_element", row["bits"])
    int8 = rows.get("int8")
    meeting = [r for n, r in rows.items() if n.startswith("transform")
               and r["drop"] <= MAX_DROP_POINTS and r["agreement"] >= MIN_AGREEMENT]
    if int8 is not None:
        best = min(meeting, key=lambda r: r["bits"]) if meeting else None
        report.figure("transform_best_vs_int8", int8["bits"] / best["bits"] if best else 0.0)
        if best is None:
            report.note(f"transform_best_vs_int8 = 0: no transform level kept accuracy within {MAX_DROP_POINTS} point "
                        f"and agreement >= {MIN_AGREEMENT} on this model")
    return rows


def plot_size_vs_drop(rows: dict[str, dict[str, float]], path: Path = PLOT) -> bool:
    """Accuracy drop and agreement vs bits per element, one line per codec family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    for ax, key, label in ((axes[0], "drop", "accuracy drop vs full prefill (points)"),
                           (axes[1], "agreement", f"agreement with full prefill (first {AGREEMENT_TOKENS} tokens)")):
        for family, marker in (("int", "s"), ("cachegen", "o"), ("transform", "^")):
            points = sorted((r["bits"], r[key], n) for n, r in rows.items() if n.startswith(family))
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=family)
            for x, y, name in points:
                ax.annotate(name.split(" ")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "drop":
            ax.axhline(MAX_DROP_POINTS, color="grey", linestyle=":", label=f"{MAX_DROP_POINTS:g}-point drop")
        else:
            ax.axhline(MIN_AGREEMENT, color="grey", linestyle=":", label=f"agreement {MIN_AGREEMENT:g}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 4, 8, 16]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per KV element (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Codec size vs answers, SmolLM2-135M-Instruct (real model, planted-fact RAG set)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def finite(values: Sequence[float]) -> float:
    """Mean of the finite values (nan when there are none)."""
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else float("nan")


__all__ = ["CODECS", "PLOT", "QUICK_CODECS", "codec_context", "codec_figures", "finite", "fit_transform_basis",
           "plot_size_vs_drop"]
