"""Selection rules for blend, side by side: agreement with full prefill against the recompute they cost.

Rules (``BlendConfig``): ``deviation`` (CacheBlend's: K deviation at check layers 2-3, gradual filtering) at
several ratios; ``random`` (the control, same budget as deviation 0.15); ``boundary`` (EPIC-style: the first k
tokens of every chunk recomputed in every layer, no check layer) at several k; ``query`` (a first pass computes
only the query rows; cached tokens ranked by the attention the query gives them, pooled over neighbours; the
top ratio recomputed in every layer) at several ratios; and combinations (boundary k = 4 plus deviation or
query at 0.15). Stored-importance rules (issue 12) are not built yet.

Quality: SmolLM2-135M-Instruct (real model) on the first ``--questions`` questions of the planted-fact set
(``bench/fidelity.py``'s scoring: accuracy against the gold answer; agreement = the first 16 greedy tokens
identical to full prefill's; first-token KL(full || rule)). TTFT: median of ``--repeat`` runs after one untimed
run, the same for every row, full prefill included, at 8 chunks x 256 tokens on SmolLM2 and on the
Qwen2.5-0.5B shape (random init, bf16: its timing does not depend on the weights). A Pareto plot (TTFT ratio on
x, agreement on y), one line per rule family.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fidelity  # a sibling script: bench/ is on sys.path when a script here runs
import fidelity_set
import torch
from harness import Report, parse_args
from ttft import build_model

from ragkv.integrations.models import load_model, make_adapter
from ragkv.kvstore import TieredStore
from ragkv.middleware import BlendConfig, ContextEngine, ModelAdapter, PrepareRequest

PLOT = Path(__file__).resolve().parent / "selection_pareto.png"


def rules(quick: bool) -> list[tuple[str, fidelity.Config]]:
    """(family, config) rows; full prefill comes first (the baseline)."""
    def blend(name: str, **kw: Any) -> fidelity.Config:
        return fidelity.Config(name, "blend", BlendConfig(**kw))

    rows = [("full", fidelity.Config("full", "full")), ("reuse", fidelity.Config("reuse", "reuse")),
            ("deviation", blend("deviation 0.15", ratio=0.15)),
            ("boundary", blend("boundary k=8", ratio=0.0, check_layers=(), boundary_tokens=8)),
            ("query", blend("query 0.15", ratio=0.15, rule="query"))]
    if quick:
        return rows
    rows += [("deviation", blend(f"deviation {r}", ratio=r)) for r in (0.05, 0.3)]
    rows += [("random", blend("random 0.15 (control)", ratio=0.15, selector="random"))]
    rows += [("boundary", blend(f"boundary k={k}", ratio=0.0, check_layers=(), boundary_tokens=k))
             for k in (4, 16, 32)]
    rows += [("query", blend(f"query {r}", ratio=r, rule="query")) for r in (0.05, 0.3)]
    rows += [("boundary+deviation", blend("boundary k=4 + deviation 0.15", ratio=0.15, boundary_tokens=4)),
             ("boundary+query", blend("boundary k=4 + query 0.15", ratio=0.15, rule="query", boundary_tokens=4))]
    return rows


def ttft_on_05b_shape(configs: list[fidelity.Config], quick: bool, chunks: int, tokens: int, repeat: int
                      ) -> dict[str, float]:
    """Median TTFT per rule on the Qwen2.5-0.5B shape (random init; token ids instead of text)."""
    model = build_model(quick)
    adapter = ModelAdapter(model, None, start_token_id=model.config.bos_token_id, model_id="bench-random-init")
    engine = ContextEngine(adapter, TieredStore("host:8GB"))
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size - 16
    texts = [torch.randint(16, vocab, (tokens,), generator=gen).tolist() for _ in range(chunks)]
    engine.warm(texts)
    request = PrepareRequest(query=torch.randint(16, vocab, (32,), generator=gen).tolist(), chunks=texts)
    return fidelity.time_configs(engine, request, configs, repeat)


def pareto_plot(points: dict[str, list[tuple[float, float, str]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
        for x, y, name in pts:
            ax.annotate(name.split(" ", 1)[-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("TTFT / full prefill (SmolLM2-135M, 8 x 256 tokens, CPU)")
    ax.set_ylabel("agreement with full prefill (first 16 tokens)")
    ax.set_title("Selection rules on SmolLM2-135M-Instruct (real model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--questions", type=int, default=None, help="questions (default 24; quick 2)"),
        p.add_argument("--repeat", type=int, default=None, help="timed TTFT runs per rule (default 5)"),
        p.add_argument("--threads", type=int, default=None)))
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    n = args.questions or (2 if quick else 24)
    max_new_tokens = 8 if quick else 24
    chunks, tokens = (2, 64) if quick else (8, 256)
    repeat = args.repeat or (1 if quick else 5)
    report = Report("selection", quick=quick, out=args.out)
    loaded = load_model()
    engine = ContextEngine(make_adapter(loaded), TieredStore("host:4GB"))
    questions = fidelity_set.load()[:n]
    engine.warm([d for q in questions for d in q.documents])
    table = rules(quick)
    configs = [c for _, c in table]
    report.setup = {"quality_model": f"{loaded.info.name} (real model, float32, CPU)", "questions": n,
                    "max_new_tokens": max_new_tokens, "agreement_tokens": fidelity.AGREEMENT_TOKENS,
                    "ttft_prompt": f"{chunks} chunks x {tokens} tokens", "ttft_repeat": repeat,
                    "ttft_statistic": "median after one untimed run, the same for every row",
                    "timing_model_05b": "random-init, Qwen2.5-0.5B shape, bf16" if not quick else "tiny Qwen2 shape",
                    "threads": torch.get_num_threads()}
    scores = {}
    for config in configs:
        start = time.perf_counter()
        scores[config.name] = fidelity.run(engine, questions, config, max_new_tokens)
        print(f"  {config.name}: {time.perf_counter() - start:.0f} s", flush=True)
    ttft = fidelity.measure_ttft(engine, configs, chunks, tokens, repeat)
    ttft_05b = ttft_on_05b_shape(configs, quick, chunks, tokens, repeat)
    full = scores["full"]
    rows, points, results = [], {}, {}
    for family, config in table:
        m = fidelity.compare(scores[config.name], full)
        ratio, ratio_05b = ttft[config.name] / ttft["full"], ttft_05b[config.name] / ttft_05b["full"]
        results[config.name] = {**m, "ttft_vs_full": ratio, "ttft_vs_full_05b": ratio_05b}
        rows.append([config.name, family, m["accuracy"], m["agreement"], m["kl"], ratio, ratio_05b])
        if family not in ("full",):
            points.setdefault(family, []).append((ratio, m["agreement"], config.name))
    report.table("selection rules vs full prefill (quality: SmolLM2-135M-Instruct)",
                 ["rule", "family", "accuracy", "agreement", "first-token KL", "TTFT / full (SmolLM2)",
                  "TTFT / full (0.5B shape)"], rows)
    deviation = results["deviation 0.15"]
    boundary = results["boundary k=8"]
    query = results["query 0.15"]
    report.figure("deviation_0.15_agreement", deviation["agreement"])
    report.figure("boundary_8_agreement", boundary["agreement"])
    report.figure("boundary_8_ttft_vs_full", boundary["ttft_vs_full"])
    report.figure("boundary_8_ttft_vs_full_05b", boundary["ttft_vs_full_05b"])
    report.figure("deviation_0.15_ttft_vs_full_05b", deviation["ttft_vs_full_05b"])
    report.figure("query_0.15_agreement", query["agreement"])
    report.figure("query_0.15_ttft_vs_full", query["ttft_vs_full"])
    report.figure("query_0.15_ttft_vs_full_05b", query["ttft_vs_full_05b"])
    report.note("stored-importance rules, the dual-stage query rule, calibration and the calibrated default are "
                "not built yet (issue 12): default_blend_ttft_vs_full_05b and best_rule_agreement_gain_at_equal_ttft "
                "are not reported")
    if not quick and pareto_plot(points, PLOT):
        report.note(f"plot: {PLOT.name}")
    report.write()


if __name__ == "__main__":
    main()
