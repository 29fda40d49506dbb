"""Fidelity on a real model: does ragkv keep SmolLM2-135M-Instruct's answers? Every strategy and codec, one run.

Model: SmolLM2-135M-Instruct (the registry's default, float32, CPU), prompts rendered with its ChatML template,
documents in the system turn (ragkv's default layout). Questions: the planted-fact set of
``bench/fidelity_set.py`` (``bench/data/fidelity_set.jsonl``: invented facts; ``single`` and ``two-doc``
questions over 4-8 documents; ``--questions N`` takes the first N). Every
document is warmed into a host-tier store first (not timed).

For each configuration, per question: the greedy answer (up to ``--max-new-tokens``) and the last prompt
token's logits. Scored against the gold answer (accuracy: the answer contains it, case-insensitive) and
against full prefill (agreement: the first 16 greedy tokens identical; first-token KL(full || strategy) and
top-1 match). Configurations: every strategy (full, prefix, reuse, blend over selection rules and ratios,
compress, auto) and every codec level as "full prefill with the prompt's KV round-tripped through the codec"
(every prompt token but the last; the last is then computed against the degraded KV).

TTFT is measured separately on the same model at 8 chunks x 256 tokens (documents of the set joined into
256-token chunks, a fresh question): every strategy, the full-prefill baseline included, gets the same
warm-up (one untimed run) and repetitions, and the median is reported. TTFT = prepare + first token.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fidelity_set  # a sibling script: bench/ is on sys.path when a script here runs
import torch
from fidelity_codecs import (
    AGREEMENT_TOKENS,
    CODECS,
    QUICK_CODECS,
    codec_context,
    codec_figures,
    finite,
    fit_transform_basis,
    plot_size_vs_drop,
)
from fidelity_codecs import PLOT as CODEC_PLOT
from harness import Report, median, parse_args

from ragkv.codecs import get_codec
from ragkv.integrations.models import load_model, make_adapter
from ragkv.kvstore import TieredStore
from ragkv.middleware import (
    BlendConfig,
    CompressConfig,
    ContextEngine,
    GenerationConfig,
    PrepareRequest,
)

DEFAULT = "blend 0.15 (default)"
PLOT = Path(__file__).resolve().parent / "fidelity_accuracy_vs_ttft.png"


@dataclass(frozen=True)
class Config:
    name: str
    strategy: str | None = None  # an engine strategy, or None for a codec row
    config: Any = None
    codec: tuple[str, dict[str, Any]] | None = None
    repeat_prompt: bool = False  # prefix: prepare once untimed, score the second (exact-prefix hit)


@dataclass
class Scores:
    correct: list[bool] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    bits: list[float] = field(default_factory=list)  # codec rows: bits per KV element of each prompt's payload


def configurations(quick: bool, codecs_only: bool = False) -> list[Config]:
    codecs = [c for c in CODECS if not quick or c[0] in QUICK_CODECS]
    codec_rows = [Config(f"full via {name}", codec=(codec, params)) for name, codec, params in codecs]
    if codecs_only:
        return [Config("full", "full"), *codec_rows]
    rows = [Config("full", "full"), Config("reuse", "reuse"), Config(DEFAULT, "blend", BlendConfig())]
    if not quick:
        rows.insert(1, Config("prefix (repeated prompt)", "prefix", repeat_prompt=True))
        for r in (0.05, 0.3, 0.5):
            rows.append(Config(f"blend {r}", "blend", BlendConfig(ratio=r)))
        rows += [Config("blend 0.15 value deviation", "blend", BlendConfig(deviation="value")),
                 Config("blend 0.15 layer-1 check", "blend", BlendConfig(check_layers=(1,))),
                 Config("random 0.15 (control)", "blend", BlendConfig(selector="random")),
                 Config("compress keep 0.5", "compress", CompressConfig()),
                 Config("auto", "auto")]
    return rows + codec_rows


def run(engine: ContextEngine, questions: Sequence[Any], config: Config, max_new_tokens: int) -> Scores:
    scores = Scores()
    codec = get_codec(config.codec[0], config.codec[1]) if config.codec else None
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    for q in questions:
        request = PrepareRequest(query=q.question, chunks=list(q.documents))
        if codec is not None:
            prepared, bits = codec_context(engine, request, codec)
            scores.bits.append(bits)
        else:
            strategy = engine.strategy(config.strategy, config.config)
            if config.repeat_prompt:
                engine.prepare(request, strategy)
            prepared = engine.prepare(request, strategy)
        logits = prepared.logits.float().clone()
        result = engine.generate(prepared, generation)
        scores.correct.append(q.answer.lower() in result.text.lower())
        scores.kinds.append(q.kind)
        scores.tokens.append(list(result.token_ids))
        scores.logits.append(logits)
    return scores


def compare(scores: Scores, full: Scores) -> dict[str, float]:
    n = len(scores.correct)
    agree = sum(a[:AGREEMENT_TOKENS] == b[:AGREEMENT_TOKENS] for a, b in zip(scores.tokens, full.tokens)) / n
    kl = top1 = 0.0
    for mine, ref in zip(scores.logits, full.logits):
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(mine, -1)
        kl += float((p.exp() * (p - q)).sum())
        top1 += float(int(ref.argmax()) == int(mine.argmax()))
    by_kind = {}
    for kind in ("single", "two-doc"):
        picked = [c for c, k in zip(scores.correct, scores.kinds) if k == kind]
        by_kind[kind] = sum(picked) / len(picked) if picked else float("nan")
    return {"accuracy": sum(scores.correct) / n, "single": by_kind["single"], "two_doc": by_kind["two-doc"],
            "agreement": agree, "kl": kl / n, "top1": top1 / n}


def ttft_chunks(tokenizer: Any, chunks: int, tokens: int) -> list[str]:
    """``chunks`` texts of ``tokens`` tokens each, cut from the set's documents (real text)."""
    ids: list[int] = []
    for q in fidelity_set.generate(60, seed=fidelity_set.SEED + 1):
        for doc in q.documents:
            ids += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= chunks * tokens + tokens:
            break
    texts = [tokenizer.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(chunks)]
    return texts


def measure_ttft(engine: ContextEngine, configs: Sequence[Config], chunks: int, tokens: int, repeat: int
                 ) -> dict[str, float]:
    """Median TTFT per strategy config at ``chunks`` x ``tokens`` of the set's text (see ``time_configs``)."""
    texts = ttft_chunks(engine.adapter.tokenizer, chunks, tokens)
    engine.warm(texts)
    request = PrepareRequest(query="Who is the mayor of the town where the glassblower lives?", chunks=texts)
    return time_configs(engine, request, configs, repeat)


def time_configs(engine: ContextEngine, request: PrepareRequest, configs: Sequence[Config], repeat: int
                 ) -> dict[str, float]:
    """Median TTFT (prepare + first token) per strategy config over ``repeat`` runs after one untimed run, the
    same for every row, full prefill included. Codec rows (no strategy) are skipped."""
    generation = GenerationConfig(max_new_tokens=1, stop_token_ids=())
    out: dict[str, float] = {}
    for config in configs:
        if config.strategy is None:
            continue
        strategy = engine.strategy(config.strategy, config.config)
        engine.generate(request, generation, strategy=strategy)  # warm-up (also: the prefix entry for 'prefix')
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            engine.generate(request, generation, strategy=strategy)
            times.append(time.perf_counter() - start)
        out[config.name] = median(times)
    return out


def plot(rows: Sequence[tuple[str, float, float, float]], path: Path) -> bool:
    """Accuracy and agreement vs TTFT ratio; rows: (name, ttft ratio, accuracy, agreement)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = plt.figure(figsize=(11, 5.6), dpi=120)
    ax = fig.add_axes((0.07, 0.12, 0.56, 0.8))
    rows = sorted(rows, key=lambda r: r[1])
    ax.scatter([r[1] for r in rows], [r[2] for r in rows], color="#1f77b4", label="accuracy (gold answer)")
    ax.scatter([r[1] for r in rows], [r[3] for r in rows], marker="^", color="#d62728", label="agreement with full")
    key = []
    for i, (name, x, acc, agree) in enumerate(rows, start=1):
        ax.annotate(str(i), (x, acc), textcoords="offset points", xytext=(-3, 7), fontsize=8, weight="bold")
        key.append(f"{i:>2}  {name}\n      TTFT {x:.2f}   acc {acc:.3f}   agree {agree:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT / full-prefill TTFT (8 chunks x 256 tokens, host tier; log scale)")
    ax.set_ylabel("fraction of questions")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title("ragkv fidelity on SmolLM2-135M-Instruct (real model, planted-fact RAG set)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.text(0.65, 0.92, "\n".join(key), fontsize=8, family="monospace", va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--questions", type=int, default=None, help="questions (default 180; quick 3)"),
        p.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (quick: 8)"),
        p.add_argument("--repeat", type=int, default=None, help="timed TTFT runs per strategy (default 5)"),
        p.add_argument("--threads", type=int, default=None),
        p.add_argument("--codecs-only", action="store_true", help="full prefill and the codec rows only"),
        p.add_argument("--codecs", default=None, help="comma-separated codec row prefixes to run (default: all)")))
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.questions or (3 if args.quick else fidelity_set.DEFAULT_QUESTIONS)
    max_new_tokens = args.max_new_tokens or (8 if args.quick else 24)
    chunks, tokens = (2, 64) if args.quick else (8, 256)
    repeat = args.repeat or (1 if args.quick else 5)
    # the codec rows alone are a scenario of their own (they do not overwrite the strategies' figures)
    report = Report("fidelity_codecs" if args.codecs_only else "fidelity", quick=args.quick, out=args.out)
    loaded = load_model()
    engine = ContextEngine(make_adapter(loaded), TieredStore("host:4GB"))
    questions = fidelity_set.load()[:n]
    report.setup = {"model": f"{loaded.info.name} (real model, float32, CPU)", "questions": n,
                    "two_doc_questions": sum(q.kind == "two-doc" for q in questions),
                    "documents_per_question": [min(len(q.documents) for q in questions),
                                               max(len(q.documents) for q in questions)],
                    "max_new_tokens": max_new_tokens, "agreement_tokens": AGREEMENT_TOKENS,
                    "ttft_prompt": f"{chunks} chunks x {tokens} tokens", "ttft_repeat": repeat,
                    "ttft_statistic": "median after one untimed run, the same for every row",
                    "threads": torch.get_num_threads()}
    report.setup["transform_basis"] = fit_transform_basis(engine, args.quick)
    engine.warm([d for q in questions for d in q.documents])
    configs = configurations(args.quick, args.codecs_only)
    if args.codecs:
        wanted = tuple(f"full via {p.strip()}" for p in args.codecs.split(","))
        configs = [c for c in configs if not c.codec or c.name.startswith(wanted)]
    scores: dict[str, Scores] = {}
    for config in configs:
        start = time.perf_counter()
        scores[config.name] = run(engine, questions, config, max_new_tokens)
        print(f"  {config.name}: {time.perf_counter() - start:.0f} s", flush=True)
    ttft = {} if args.codecs_only else measure_ttft(engine, configs, chunks, tokens, repeat)
    full_ttft = ttft.get("full", float("nan"))
    full = scores["full"]
    rows, points = [], []
    results: dict[str, dict[str, float]] = {}
    for config in configs:
        m = compare(scores[config.name], full)
        ratio = ttft[config.name] / full_ttft if config.name in ttft else None
        results[config.name] = m
        bits = finite(scores[config.name].bits) if config.codec else None
        rows.append([config.name, m["accuracy"], m["single"], m["two_doc"], m["agreement"], m["kl"], m["top1"],
                     ratio, bits])
        if ratio is not None:
            points.append((config.name, ratio, m["accuracy"], m["agreement"]))
    report.table("fidelity vs full prefill (SmolLM2-135M-Instruct)",
                 ["configuration", "accuracy", "single", "two-doc", "agreement", "first-token KL", "top-1",
                  "TTFT / full", "bits/elem"], rows)
    codec_rows = codec_figures(report, results, {c.name: finite(scores[c.name].bits) for c in configs if c.codec})
    if not args.quick and plot_size_vs_drop(codec_rows):
        report.note(f"plot: {CODEC_PLOT.name}")
    if args.codecs_only:
        report.figure("real_full_accuracy", results["full"]["accuracy"])
        report.write()
        return
    full_acc = results["full"]["accuracy"]
    mid = results[next(c.name for c in configs if c.codec and c.codec[1].get("level") == 2)]
    report.figure("real_full_accuracy", full_acc)
    report.figure("real_default_agreement", results[DEFAULT]["agreement"])
    report.figure("real_default_accuracy_drop_points", 100 * (full_acc - results[DEFAULT]["accuracy"]))
    report.figure("real_reuse_accuracy_drop_points", 100 * (full_acc - results["reuse"]["accuracy"]))
    report.figure("real_default_ttft_vs_full", ttft[DEFAULT] / full_ttft)
    report.figure("real_cachegen_mid_accuracy_drop_points", 100 * (full_acc - mid["accuracy"]))
    report.figure("full_prefill_seconds", full_ttft)
    goals = {"real_full_accuracy": (">=", 0.80), "real_default_agreement": (">=", 0.95),
             "real_default_accuracy_drop_points": ("<=", 1.0), "real_default_ttft_vs_full": ("<=", 0.20),
             "real_cachegen_mid_accuracy_drop_points": ("<=", 1.0)}
    met = {k: (report.figures[k] >= g if op == ">=" else report.figures[k] <= g) for k, (op, g) in goals.items()}
    report.setup["goals_met"] = met
    if not args.quick and plot(points, PLOT):
        report.note(f"plot: {PLOT.name}")
    report.write()


if __name__ == "__main__":
    main()
