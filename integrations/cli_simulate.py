"""``ragkv simulate`` and ``ragkv trace``: size the tiers for a traffic trace before buying hardware."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragkv.integrations.sim_trace import read_trace, write_trace, zipf_trace
from ragkv.integrations.simulator import SimCosts, Simulator, modelled_tiers, sweep
from ragkv.kvstore import ConfigError
from ragkv.kvstore.tiers.base import parse_size


def _sizes(items: Sequence[str] | None, many: bool) -> dict[str, list[int]]:
    """``KIND=SIZE`` (or ``KIND=SIZE,SIZE,...`` when ``many``) -> {kind: [bytes, ...]}."""
    out: dict[str, list[int]] = {}
    for item in items or ():
        kind, _, sizes = item.partition("=")
        values = [parse_size(s.strip()) for s in sizes.split(",")] if sizes else []
        if not kind or not values or any(v is None for v in values) or (len(values) > 1 and not many):
            raise ConfigError(f"expected KIND={'SIZE[,SIZE...]' if many else 'SIZE'} (e.g. host=2GB), got {item!r}")
        out[kind] = [int(v) for v in values if v is not None]
    return out


def _costs(args: argparse.Namespace) -> SimCosts:
    if args.costs:
        return SimCosts.load(args.costs)
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.sample_corpus import load_sample_corpus
    from ragkv.integrations.sim_costs import measure_costs

    print("measuring costs on this machine (use --costs FILE to skip) ...", file=sys.stderr)
    with RagRuntime.open("host:1GB", args.model, use_calibration=False) as runtime:
        costs = measure_costs(runtime, args.tiers, load_sample_corpus().documents()[:8])
    if args.save_costs:
        Path(args.save_costs).write_text(json.dumps(costs.to_dict(), indent=2), encoding="utf-8")
    return costs


def plot_sweep(rows: list[dict[str, Any]], grid: dict[str, list[int]], path: str) -> None:
    """TTFT p50/p99 and hit rates against the first swept tier's size, one line per other sizes."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_kind = next(iter(grid))
    fig, (ax_ttft, ax_hit) = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k} {v / 1e9:g} GB" for k, v in row["sizes"].items() if k != x_kind) or "all"
        lines.setdefault(label, []).append(row)
    for label, points in lines.items():
        xs = [p["sizes"][x_kind] / 1e9 for p in points]
        ax_ttft.plot(xs, [p["ttft_p50_s"] for p in points], marker="o", label=f"p50, {label}")
        ax_ttft.plot(xs, [p["ttft_p99_s"] for p in points], marker="x", linestyle="--", label=f"p99, {label}")
        ax_hit.plot(xs, [p["hit_rate_total"] for p in points], marker="o", label=f"all tiers, {label}")
        ax_hit.plot(xs, [p["hit_rate"][p["tiers"][0]] for p in points], marker="x", linestyle="--",
                    label=f"{points[0]['tiers'][0]}, {label}")
    ax_ttft.set(xlabel=f"{x_kind} size (GB)", ylabel="estimated TTFT (s)", title="TTFT vs tier size")
    ax_hit.set(xlabel=f"{x_kind} size (GB)", ylabel="hit rate", title="hit rate vs tier size")
    ax_ttft.legend(fontsize=7)
    ax_hit.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_simulate(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    costs = _costs(args)
    fixed = {k: v[0] for k, v in _sizes(args.size, many=False).items()}
    grid = _sizes(args.sweep, many=True)
    if grid:
        rows = sweep(trace, args.tiers, costs, {**{k: [v] for k, v in fixed.items()}, **grid})
    else:
        rows = [{"sizes": fixed, **Simulator(modelled_tiers(args.tiers, fixed), costs).run(trace).summary()}]
    if args.plot:
        if not grid:
            raise ConfigError("--plot needs --sweep")
        plot_sweep(rows, grid, args.plot)
    if args.json:
        print(json.dumps({"costs": costs.to_dict(), "results": rows}, indent=2))
        return 0
    print(f"{len(trace)} requests, model {costs.model}")
    for row in rows:
        sizes = ", ".join(f"{k}={v / 1e9:g}GB" for k, v in row["sizes"].items()) or args.tiers
        hits = " ".join(f"{name} {rate:.1%}" for name, rate in row["hit_rate"].items())
        print(f"{sizes}: hits {hits} (miss {row['miss_rate']:.1%}); TTFT mean {row['ttft_mean_s'] * 1e3:.0f} ms, "
              f"p50 {row['ttft_p50_s'] * 1e3:.0f} ms, p99 {row['ttft_p99_s'] * 1e3:.0f} ms")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    trace = zipf_trace(args.requests, args.chunks, args.per_request, args.alpha, args.rate,
                       (args.min_tokens, args.max_tokens), seed=args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        write_trace(trace, f)
    print(f"wrote {len(trace)} requests to {args.out}")
    return 0


def add_simulate_commands(sub: Any, lazy: Any) -> None:
    sim = sub.add_parser("simulate", help="replay a request trace over modelled tiers: hit rates, bytes moved and "
                                          "estimated TTFT per tier configuration")
    sim.add_argument("--trace", required=True, help="JSONL trace (ragkv trace zipf, or ragkv serve --record-trace)")
    sim.add_argument("--tiers", required=True, help="store spec, e.g. 'host:4GB,disk:/data/kv:50GB?codec=cachegen'")
    sim.add_argument("--model", default=None, help="measure costs for this model (default: the bundled model)")
    sim.add_argument("--costs", default=None, metavar="FILE", help="costs measured earlier (--save-costs)")
    sim.add_argument("--save-costs", default=None, metavar="FILE", help="keep the measured costs")
    sim.add_argument("--size", action="append", metavar="KIND=SIZE", help="a tier's size, e.g. redis=8GB")
    sim.add_argument("--sweep", action="append", metavar="KIND=S1,S2,...",
                     help="sizes to try for a tier kind (the first --sweep is the plot's x axis)")
    sim.add_argument("--plot", default=None, metavar="PNG", help="TTFT p50/p99 and hit rate vs size (with --sweep)")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=lazy("cmd_simulate"))

    trace = sub.add_parser("trace", help="generate a synthetic request trace for ragkv simulate")
    kinds = trace.add_subparsers(dest="kind", required=True)
    zipf = kinds.add_parser("zipf", help="Zipf-distributed chunk popularity, Poisson arrivals")
    zipf.add_argument("--requests", type=int, default=1000)
    zipf.add_argument("--chunks", type=int, default=500, help="distinct chunks in the corpus")
    zipf.add_argument("--per-request", type=int, default=4)
    zipf.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent (0: uniform)")
    zipf.add_argument("--rate", type=float, default=1.0, help="requests per second")
    zipf.add_argument("--min-tokens", type=int, default=60)
    zipf.add_argument("--max-tokens", type=int, default=250)
    zipf.add_argument("--seed", type=int, default=0)
    zipf.add_argument("--out", required=True)
    zipf.set_defaults(func=lazy("cmd_trace"))


__all__ = ["add_simulate_commands", "cmd_simulate", "cmd_trace", "plot_sweep"]
