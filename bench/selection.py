"""Selection rules for blend, side by side: agreement with full prefill against the recompute they cost.

Rules (``BlendConfig``): ``deviation`` (CacheBlend's: K deviation at check layers 2-3, gradual filtering) at
several ratios, and with a per-layer schedule (check layers 2, 3, 8, 16 keeping 0.5, 0.3, 0.2, 0.15);
``boundary`` (EPIC-style: the first k tokens of every chunk recomputed in every layer, no check layer);
``query`` (a first pass computes only the query rows and ranks cached tokens by the query's attention; single
stage: the top ratio in every layer; dual stage: 2r through layer 8, re-ranked there by the query's attention
over the fresh keys, r after); ``stored`` (each chunk's most attended tokens by the scores stored at warm
time); combinations (boundary k = 4 plus another rule). Controls: ``random`` selection at the check layers
(the same budget as deviation 0.15), and the ``random`` rule (tokens at random in every layer, the same
budget as query and stored).

Calibration: ``ragkv.middleware.calibration.calibrate`` runs its candidates on held-out questions (the ones
after the evaluation questions) and picks the cheapest meeting 0.95 agreement: that is the calibrated
default, evaluated here on the evaluation questions like every other row (and likewise the choice at a
lower target, to show what the mechanism picks when the bar is reachable).

Quality: SmolLM2-135M-Instruct (real model) on the first ``--questions`` questions of the planted-fact set
(``bench/fidelity.py``'s scoring: accuracy against the gold answer; agreement = the first 16 greedy tokens
identical to full prefill's; first-token KL(full || rule)). TTFT: median of ``--repeat`` runs after one untimed
run, the same for every row, full prefill included, at 8 chunks x 256 tokens on SmolLM2 and on the
Qwen2.5-0.5B shape (random init, bf16: its timing does not depend on the weights). A Pareto plot (TTFT ratio on
x, agreement on y), one line per rule family.
"""
from __future__ import annotations

import time
from itertools import pairwise
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
from ragkv.middleware.calibration import CANDIDATES, calibrate

PLOT = Path(__file__).resolve().parent / "selection_pareto.png"
LOW_TARGET = 0.5
NEW_FAMILIES = ("boundary", "query", "query dual", "stored", "boundary+stored", "boundary+query",
                "boundary+deviation")


def _family(config: BlendConfig) -> str:
    if config.rule == "deviation":
        base = "random" if config.selector == "random" else "deviation"
        if config.ratio == 0 and not config.check_layers:
            base = ""
    elif config.rule == "query" and config.check_layers:
        base = "query dual"
    elif config.rule == "random":
        base = "random rule"
    else:
        base = config.rule
    if config.boundary_tokens:
        return f"boundary+{base}" if base else "boundary"
    return base


def rules(quick: bool) -> list[tuple[str, fidelity.Config]]:
    """(family, config) rows; full prefill comes first (the baseline)."""
    def blend(name: str, **kw: Any) -> tuple[str, fidelity.Config]:
        config = BlendConfig(**kw)
        return _family(config), fidelity.Config(name, "blend", config)

    rows = [("full", fidelity.Config("full", "full")), ("reuse", fidelity.Config("reuse", "reuse")),
            blend("deviation 0.15", ratio=0.15),
            blend("boundary k=8", ratio=0.0, check_layers=(), boundary_tokens=8),
            blend("query 0.15", ratio=0.15, rule="query", check_layers=()),
            blend("stored 0.15", ratio=0.15, rule="stored", check_layers=())]
    if quick:
        return rows
    rows += [blend(f"deviation {r}", ratio=r) for r in (0.05, 0.3, 0.5)]
    rows += [blend("deviation schedule 0.5>0.15 @2,3,8,16", ratio=0.15, check_layers=(2, 3, 8, 16),
                   schedule=(0.5, 0.3, 0.2, 0.15))]
    rows += [blend("random 0.15 (control)", ratio=0.15, selector="random")]
    rows += [blend(f"boundary k={k}", ratio=0.0, check_layers=(), boundary_tokens=k) for k in (4, 16, 32)]
    rows += [blend(f"query {r}", ratio=r, rule="query", check_layers=()) for r in (0.3,)]
    rows += [blend(f"query dual {r} @8", ratio=r, rule="query", check_layers=(8,)) for r in (0.15, 0.3)]
    rows += [blend(f"stored {r}", ratio=r, rule="stored", check_layers=()) for r in (0.3, 0.5, 0.7)]
    rows += [blend(f"random rule {r} (control)", ratio=r, rule="random", check_layers=()) for r in (0.15, 0.3, 0.5)]
    rows += [blend("boundary k=4 + stored 0.15", ratio=0.15, rule="stored", check_layers=(), boundary_tokens=4),
             blend("boundary k=4 + query 0.15", ratio=0.15, rule="query", check_layers=(), boundary_tokens=4),
             blend("boundary k=4 + deviation 0.15", ratio=0.15, boundary_tokens=4)]
    return rows


def with_candidates(table: list[tuple[str, fidelity.Config]], extra: list[tuple[str, BlendConfig]]
                    ) -> list[tuple[str, fidelity.Config]]:
    """``table`` plus every calibration candidate (and the recompute-everything fallback) it lacks."""
    have = {c.config for _, c in table if c.config is not None}
    for name, config in extra:
        if config not in have:
            table.append((_family(config), fidelity.Config(name, "blend", config)))
            have.add(config)
    return table


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through ``points`` (sorted by x); None outside its x range."""
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


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
        p.add_argument("--questions", type=int, default=None, help="evaluation questions (default 48; quick 2)"),
        p.add_argument("--calibration-questions", type=int, default=None,
                       help="held-out calibration questions, after the evaluation ones (default 24; quick 1)"),
        p.add_argument("--repeat", type=int, default=None, help="timed TTFT runs per rule (default 5)"),
        p.add_argument("--threads", type=int, default=None)))
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    n = args.questions or (2 if quick else 48)
    n_cal = args.calibration_questions or (1 if quick else 24)
    max_new_tokens = 8 if quick else 24
    chunks, tokens = (2, 64) if quick else (8, 256)
    repeat = args.repeat or (1 if quick else 5)
    report = Report("selection", quick=quick, out=args.out)
    loaded = load_model()
    engine = ContextEngine(make_adapter(loaded), TieredStore("host:4GB"))
    everything = fidelity_set.load()
    questions, held_out = everything[:n], everything[n:n + n_cal]
    engine.warm([d for q in questions for d in q.documents])
    candidates = list(CANDIDATES[:2]) if quick else list(CANDIDATES)
    start = time.perf_counter()
    calibration = calibrate(engine, [PrepareRequest(query=q.question, chunks=list(q.documents)) for q in held_out],
                            candidates=candidates, tokens=fidelity.AGREEMENT_TOKENS)
    print(f"  calibration: {time.perf_counter() - start:.0f} s", flush=True)
    choice, low_choice = calibration.choice, calibration.cheapest(LOW_TARGET)
    default_name = choice.name if choice else "recompute everything (no candidate met 0.95)"
    table = with_candidates(rules(quick), [*candidates, (default_name, calibration.default_blend())])
    by_config = {c.config: c.name for _, c in table if c.config is not None}
    default_row = by_config[calibration.default_blend()]
    low_row = by_config[low_choice.config] if low_choice else None
    configs = [c for _, c in table]
    report.setup = {"quality_model": f"{loaded.info.name} (real model, float32, CPU)", "questions": n,
                    "calibration_questions": f"{n_cal} held-out (set questions {n}..{n + n_cal - 1})",
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
        results[config.name] = {**m, "family": family, "ttft_vs_full": ratio, "ttft_vs_full_05b": ratio_05b}
        rows.append([config.name, family, m["accuracy"], m["agreement"], m["kl"], ratio, ratio_05b])
        if family not in ("full",):
            points.setdefault(family, []).append((ratio, m["agreement"], config.name))
    report.table("selection rules vs full prefill (quality: SmolLM2-135M-Instruct)",
                 ["rule", "family", "accuracy", "agreement", "first-token KL", "TTFT / full (SmolLM2)",
                  "TTFT / full (0.5B shape)"], rows)
    report.table("calibration on held-out questions (agreement, compute share of full)",
                 ["candidate", "agreement (held-out)", "compute share", "cached-row share"],
                 [[p.name, p.agreement, p.compute_share, p.cached_share] for p in calibration.points])
    default = results[default_row]
    report.figure("default_blend_ttft_vs_full_05b", default["ttft_vs_full_05b"])
    report.figure("default_blend_ttft_vs_full", default["ttft_vs_full"])
    report.figure("default_blend_agreement", default["agreement"])
    report.figure("default_blend_accuracy_drop_points", 100 * (results["full"]["accuracy"] - default["accuracy"]))
    report.note(f"calibrated default (target 0.95 on held-out questions): {default_row}")
    if low_row is not None:
        low = results[low_row]
        report.note(f"calibrated at target {LOW_TARGET}: {low_row} (held-out agreement {low_choice.agreement:.2f}; "
                    f"here {low['agreement']:.2f} at {low['ttft_vs_full_05b']:.3f} x full on the 0.5B shape)")
    deviation_curve = sorted((r["ttft_vs_full"], r["agreement"]) for name, r in results.items()
                             if r["family"] == "deviation")
    gains = {}
    for name, r in results.items():
        if r["family"] in NEW_FAMILIES:
            at = interpolate(deviation_curve, r["ttft_vs_full"])
            if at is not None:
                gains[name] = 100 * (r["agreement"] - at)
    if gains:
        best = max(gains, key=gains.__getitem__)
        report.figure("best_rule_agreement_gain_at_equal_ttft", gains[best])
        report.note(f"best gain at equal TTFT (SmolLM2 timing, deviation curve interpolated): {best}")
    dev15 = results["deviation 0.15"]
    reaching = [r["ttft_vs_full"] for r in results.values()
                if r["family"] in NEW_FAMILIES and r["agreement"] >= dev15["agreement"]]
    if reaching:
        report.figure("deviation_0.15_agreement_reached_at_ttft_share", min(reaching) / dev15["ttft_vs_full"])
    # each rule against the random control of the same budget: the random rule for query and stored (single
    # stage), random selection at the check layers for deviation 0.15
    random_rule = {c.config.ratio: c.name for f, c in table if f == "random rule"}
    for family, c in table:
        control = random_rule.get(c.config.ratio) if family in ("query", "stored") else None
        if c.name == "deviation 0.15":
            control = "random 0.15 (control)"
        if control in results:
            report.figure(f"{c.name.replace(' ', '_')}_agreement_minus_random",
                          results[c.name]["agreement"] - results[control]["agreement"])
    report.figure("deviation_0.15_agreement", dev15["agreement"])
    report.figure("deviation_0.15_ttft_vs_full_05b", dev15["ttft_vs_full_05b"])
    for name in ("boundary k=8", "query 0.15", "stored 0.15"):
        key = name.replace(" ", "_").replace("k=", "")
        report.figure(f"{key}_agreement", results[name]["agreement"])
        report.figure(f"{key}_ttft_vs_full_05b", results[name]["ttft_vs_full_05b"])
    if not quick and pareto_plot(points, PLOT):
        report.note(f"plot: {PLOT.name}")
    report.write()


if __name__ == "__main__":
    main()
