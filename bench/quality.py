"""Quality: held-out accuracy of every strategy and codec on the bundled trained model, against full prefill.

Why this model and corpus: ragkv computes each chunk's KV alone; whatever a token should have taken from
earlier chunks is lost, and CacheBlend exists to repair that. The bundled 6-layer Llama
(``middleware/bundled_model``) was trained on the associative-recall corpus of ``bench/quality_corpus.py``,
where ``cross`` questions ask for a key/value pair that straddles a chunk boundary (lost by independent
chunk KV) and ``inside`` questions for one inside a chunk (kept). Full prefill answers both.

Every row runs the middleware's real strategies through ``ContextEngine.prepare`` (chunks warmed into a
``TieredStore``) and reads the answer at the last prompt token (``?``) from ``PreparedContext.logits``:

- accuracy (per kind): argmax of the last-token logits is the answer token;
- agreement: the same argmax as full prefill's;
- KL: mean KL(full || row) of the answer distributions (softmax of the last-token logits);
- cross recovered: (cross accuracy - reuse's) / (full's - reuse's), the share of the gap closed;
- compute: token-layers computed / those of full prefill (the recompute cost, whatever the machine).

Codec rows: the full-prefill KV of the context (start token + chunks) is computed, the chunk rows are
round-tripped through the codec (the start token's KV is never stored by ragkv: the prefix cache holds it
exactly), and the question is computed over that KV with the adapter. The "disk tier" rows blend at
r = 0.15 with the chunks read from a lone disk tier holding them raw (a control) or with CacheGen's middle
level: the store's slow-tier, layer-pipelined decode path, and codec error inside blending.

The deviation study blends the cross questions with one check layer at a time and records where the
broken token (the straddling value, which opens its chunk) ranks by deviation: it is recomputed, and the
answer recovered, only when it ranks in the top r. It is repeated over chunks decoded from CacheGen's
middle level, whose error enters the deviation as well.

The plot (accuracy vs TTFT ratio) takes the ratios from ``bench/results/ttft.json``: they were measured on
another model (random-init, Qwen2.5-0.5B shape, 8 x 512-token chunks); the accuracy is this model's.

    python bench/quality.py [--quick] [--n 400] [--threads 1] [--out DIR]
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ragkv.codecs import get_codec
from ragkv.kvstore import DiskConfig, StoreConfig, TieredStore
from ragkv.middleware import (
    AutoConfig,
    BlendConfig,
    CompressConfig,
    ContextEngine,
    ModelAdapter,
    PreparedContext,
    PrepareRequest,
    select_high_deviation,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MODEL_DIR = REPO_ROOT / "middleware" / "bundled_model"
TTFT_RESULTS = BENCH_DIR / "results" / "ttft.json"
PLOT_NAME = "quality_accuracy_vs_ttft.png"
RATIOS = (0.05, 0.15, 0.30, 1.0)
COMPRESS_BUDGETS = (16, 32, 64)
QUICK_QUESTIONS = 32


def load_bench_module(name: str) -> ModuleType:
    """Import a sibling bench script by path: bench/ is not a package, and no sys.path edits are wanted."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


harness = load_bench_module("harness")
quality_corpus = load_bench_module("quality_corpus")


# -- what is run -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row: a strategy with its config (``codec`` rows instead pass the full-prefill KV through a codec)."""

    name: str
    strategy: str = "full"
    config: Any = None
    ratio: float | None = None
    check_layers: tuple[int, ...] = ()
    deviation: str = ""
    selector: str = ""
    repeat_prompt: bool = False  # prepare twice and score the second call (an exact-prefix hit)
    store: str = "host"  # "host", or "disk_cachegen" (chunks encoded on a disk tier)
    ttft_figure: str | None = None  # the TTFT benchmark's strategy name for this configuration, if measured


def blend_variant(name: str, ratio: float, check_layers: tuple[int, ...], deviation: str = "key",
                  selector: str = "deviation", ttft_figure: str | None = None, store: str = "host") -> Variant:
    config = BlendConfig(ratio=ratio, check_layers=check_layers, deviation=deviation, selector=selector)
    return Variant(name, "blend", config, ratio, check_layers, deviation, selector, store=store,
                   ttft_figure=ttft_figure)


def strategy_variants(quick: bool) -> list[Variant]:
    """Full mode: every strategy, blend over ratios x deviation x where it is read, the random control,
    compress token budgets, auto. Quick mode: the few rows the smoke test and the headline need."""
    default_layers = BlendConfig().check_layers  # the middleware's default: gradual filtering over (2, 3)
    rows = [Variant("full", ttft_figure="full"),
            Variant("prefix (repeated prompt)", "prefix", repeat_prompt=True, ttft_figure="prefix_repeat_prompt"),
            Variant("reuse", "reuse", ttft_figure="reuse")]
    ratios = (0.15, 1.0) if quick else RATIOS
    for r in ratios:
        tag = f"{r:.2f}" if r < 1.0 else "1.0"
        ttft = f"blend_{r:.2f}" if r < 1.0 else None
        rows.append(blend_variant(f"blend {tag} default", r, default_layers, ttft_figure=ttft))
        if r == 1.0:  # every row recomputed: deviation and selection no longer matter
            continue
        if not quick:
            rows.append(blend_variant(f"blend {tag} gradual V", r, default_layers, "value"))
        rows.append(blend_variant(f"blend {tag} layer1 K", r, (1,)))
        if not quick:
            rows += [blend_variant(f"blend {tag} layer1 V", r, (1,), "value"),
                     blend_variant(f"blend {tag} layer2 K", r, (2,)),
                     blend_variant(f"blend {tag} layer2 V", r, (2,), "value"),
                     blend_variant(f"blend {tag} gradual K (1,2)", r, (1, 2))]
        rows.append(blend_variant(f"random {tag}", r, default_layers, selector="random"))
        if not quick:
            rows.append(blend_variant(f"random {tag} layer1", r, (1,), selector="random"))
    rows.append(Variant("compress keep 0.5", "compress", CompressConfig(keep_ratio=0.5),
                        ttft_figure="compress_tokens_0.5"))
    if not quick:
        for budget in COMPRESS_BUDGETS:
            rows.append(Variant(f"compress {budget} tokens, query recomputed", "compress",
                                CompressConfig(budget_tokens=budget, recompute_query=True)))
        for store, label in (("disk_raw", "raw"), ("disk_cachegen", "cachegen-2")):
            rows.append(blend_variant(f"blend 0.15 default, disk tier {label}", 0.15, default_layers, store=store))
        rows.append(blend_variant("blend 0.15 gradual K (1,2), disk tier cachegen-2", 0.15, (1, 2),
                                  store="disk_cachegen"))
    rows.append(Variant("auto", "auto", AutoConfig(), ttft_figure="auto"))
    return rows


CODECS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("raw", "raw", {}), ("fp16", "raw", {}), ("zstd", "zstd", {}), ("int8", "quant", {"bits": 8}),
    ("int4", "quant", {"bits": 4}), ("cachegen-1", "cachegen", {"level": 1}),
    ("cachegen-2 (mid)", "cachegen", {"level": 2}), ("cachegen-3", "cachegen", {"level": 3}),
)
QUICK_CODECS = ("raw", "fp16", "cachegen-2 (mid)")


# -- running -----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """Last-token logits of every question, and what producing them cost."""

    logits: torch.Tensor  # [Q, V] float32
    compute_fraction: float  # mean over questions of token-layers computed / full prefill's
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(directory: Path = MODEL_DIR) -> tuple[Any, Any]:
    """The bundled model and tokenizer, offline, float32, eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(directory, local_files_only=True)


def request_for(example: Any) -> PrepareRequest:
    return PrepareRequest(query=example.question, chunks=list(example.chunks))


def answer_ids(tokenizer: Any, examples: Sequence[Any]) -> torch.Tensor:
    return torch.tensor(tokenizer.convert_tokens_to_ids([example.answer for example in examples]))


def compute_fraction(prepared: PreparedContext, num_layers: int, query_tokens: int) -> float:
    """Token-layers this prepare computed over those of a full prefill of the same prompt.

    ``query_tokens``: rows a strategy without ``rows_per_layer`` details computes in every layer (reuse,
    compress: the query; twice when compress recomputes it over the pruned cache)."""
    total = num_layers * len(prepared.input_ids)
    rows = prepared.details.get("rows_per_layer")
    if rows is not None:
        return sum(rows) / total
    if prepared.strategy == "full":
        return 1.0
    if prepared.strategy == "prefix":
        return (len(prepared.input_ids) - prepared.details.get("matched_tokens", 0)) / len(prepared.input_ids)
    return query_tokens * num_layers / total  # reuse and compress compute the query rows only


def run_strategy(engine: ContextEngine, examples: Sequence[Any], variant: Variant) -> Outcome:
    """Prepare every question with ``variant`` through the engine; chunks must be warmed (misses are computed)."""
    strategy = engine.strategy(variant.strategy, variant.config)
    logits: list[torch.Tensor] = []
    fractions: list[float] = []
    start = time.perf_counter()
    for example in examples:
        request = request_for(example)
        if variant.repeat_prompt:
            engine.prepare(request, strategy)
        prepared = engine.prepare(request, strategy)
        logits.append(prepared.logits.detach().float().cpu())
        query_tokens = len(example.question.split())
        if variant.strategy == "compress" and variant.config.recompute_query:
            query_tokens *= 2
        fractions.append(compute_fraction(prepared, engine.adapter.num_layers, query_tokens))
    return Outcome(torch.stack(logits), sum(fractions) / len(fractions), time.perf_counter() - start)


@torch.no_grad()
def run_codecs(adapter: ModelAdapter, examples: Sequence[Any], names: Sequence[str]) -> dict[str, Outcome]:
    """Full prefill with the context's chunk-row KV round-tripped through each codec, then the question."""
    chosen = [c for c in CODECS if c[0] in names]
    codecs = {name: get_codec(codec, params) for name, codec, params in chosen}
    logits: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in chosen}
    seconds = dict.fromkeys(logits, 0.0)
    bits: dict[str, list[float]] = {name: [] for name in logits}
    for example in examples:
        context = [adapter.start_token_id] + adapter.encode(" ".join(example.chunks))
        question = adapter.encode(example.question)
        kv = adapter.prefill(torch.tensor([context])).kv  # [L, 2, 1, H, P, D]
        chunk_kv = kv[:, :, 0, :, 1:].contiguous()  # [L, 2, H, P-1, D]: the start token stays exact
        for name, codec in codecs.items():
            start = time.perf_counter()
            source = chunk_kv.half() if name == "fp16" else chunk_kv
            payload = codec.encode(source)
            decoded = codec.decode(payload, tuple(source.shape), source.dtype).to(chunk_kv.dtype)
            bits[name].append(8 * len(payload) / source.numel())
            past = torch.cat((kv[:, :, :, :, :1], decoded[:, :, None]), dim=4)  # [L, 2, 1, H, P, D]
            out = adapter.prefill(torch.tensor([question]), start_position=len(context), past=past)
            logits[name].append(adapter.logits(out.hidden[:, -1:])[0, 0].float().cpu())
            seconds[name] += time.perf_counter() - start
    return {name: Outcome(torch.stack(logits[name]), 1.0, seconds[name],
                          {"bits_per_element": sum(bits[name]) / len(bits[name])}) for name in logits}


class RecordingSelector:
    """CacheBlend's own choice (highest deviation), recording the deviation it was given: a study probe."""

    name = "deviation"

    def __init__(self) -> None:
        self.deviation: torch.Tensor | None = None  # [candidates] at the (single) check layer

    def select(self, deviation: torch.Tensor, count: int, layer: int) -> torch.Tensor:
        self.deviation = deviation.clone()
        return select_high_deviation(deviation, count)


@dataclass(frozen=True)
class DeviationStudy:
    """Where the broken token (the straddling value, first token of its chunk) ranks at one check layer."""

    layer: int
    deviation: str
    in_selection: float  # share of cross questions whose broken token is among the top r
    median_rank_percentile: float  # its rank among the chunk tokens, 0 = highest deviation
    chunk_start_share: float  # share of the selection spent on other chunks' first tokens
    cross: float
    compute_fraction: float


def deviation_study(engine: ContextEngine, examples: Sequence[Any], answers: torch.Tensor, layer: int,
                    deviation: str, ratio: float = 0.15) -> DeviationStudy:
    """Blend cross questions at ``ratio`` with one check layer, recording the deviation ranking there."""
    recorder = RecordingSelector()
    config = BlendConfig(ratio=ratio, check_layers=(layer,), deviation=deviation, selector=recorder)
    strategy = engine.strategy("blend", config)
    hits: list[bool] = []
    correct: list[bool] = []
    percentiles: list[float] = []
    starts: list[float] = []
    fractions: list[float] = []
    for example, answer in zip(examples, answers):
        lengths = [len(chunk.split()) for chunk in example.chunks]
        prepared = engine.prepare(request_for(example), strategy)
        assert recorder.deviation is not None
        dev = recorder.deviation  # [C]: every chunk token, in prompt order
        broken = sum(lengths[:example.meta["key_chunk"] + 1])  # the value opening the chunk after the key's
        rank = int((dev > dev[broken]).sum())
        keep = round(ratio * dev.numel())
        hits.append(rank < keep)
        percentiles.append(rank / dev.numel())
        chunk_starts = {sum(lengths[:i]) for i in range(len(lengths))} - {broken}
        chosen = torch.topk(dev, keep).indices.tolist()
        starts.append(sum(1 for c in chosen if c in chunk_starts) / max(keep, 1))
        correct.append(int(prepared.logits.argmax()) == int(answer))
        fractions.append(compute_fraction(prepared, engine.adapter.num_layers, len(example.question.split())))
    n = len(examples)
    return DeviationStudy(layer, deviation, sum(hits) / n, float(torch.tensor(percentiles).median()),
                          sum(starts) / n, sum(correct) / n, sum(fractions) / n)


# -- scoring -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    inside: float
    cross: float
    overall: float
    agreement: float
    mean_kl: float
    max_logit_diff: float


def score(outcome: Outcome, full: Outcome, answers: torch.Tensor, kinds: Sequence[str]) -> Scores:
    """Accuracy per kind, argmax agreement with full, mean KL(full || outcome) of the answer distributions."""
    predicted = outcome.logits.argmax(dim=-1)
    correct = predicted == answers
    inside = torch.tensor([k == "inside" for k in kinds])
    full_logp = torch.log_softmax(full.logits.double(), dim=-1)
    logp = torch.log_softmax(outcome.logits.double(), dim=-1)
    kl = (full_logp.exp() * (full_logp - logp)).sum(dim=-1).clamp_min(0.0)  # [Q]
    return Scores(inside=float(correct[inside].float().mean()), cross=float(correct[~inside].float().mean()),
                  overall=float(correct.float().mean()),
                  agreement=float((predicted == full.logits.argmax(dim=-1)).float().mean()),
                  mean_kl=float(kl.mean()), max_logit_diff=float((outcome.logits - full.logits).abs().max()))


def recovered(cross: float, full_cross: float, reuse_cross: float) -> float | None:
    """Share of the full-vs-reuse gap on cross-boundary questions closed by a row (None without a gap)."""
    gap = full_cross - reuse_cross
    return None if gap <= 0 else (cross - reuse_cross) / gap


DISK_STORES: dict[str, tuple[str, dict[str, Any]]] = {"disk_raw": ("raw", {}),
                                                      "disk_cachegen": ("cachegen", {"level": 2})}


def build_engine(adapter: ModelAdapter, store_kind: str, workdir: Path) -> ContextEngine:
    """An engine over a host tier, or over a lone disk tier holding encoded chunks (every read decodes)."""
    if store_kind == "host":
        return ContextEngine(adapter, TieredStore("host"))
    if store_kind in DISK_STORES:
        codec, params = DISK_STORES[store_kind]
        tier = DiskConfig(path=str(workdir / store_kind), fsync=False, codec=codec, codec_params=params)
        return ContextEngine(adapter, TieredStore(StoreConfig(tiers=(tier,))))
    raise ValueError(f"unknown store {store_kind!r}; allowed: 'host', {', '.join(map(repr, DISK_STORES))}")


def read_ttft(path: Path = TTFT_RESULTS) -> dict[str, Any] | None:
    """TTFT ratios by the TTFT benchmark's strategy names, from its table (its figures are rounded to 4
    places, which makes a repeated prompt's 4e-5 a 0), falling back to ``<name>_vs_full`` figures."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("quick"):
        return None
    ratios: dict[str, float] = {"full": 1.0}
    for name, value in data.get("figures", {}).items():
        if name.endswith("_vs_full") and isinstance(value, (int, float)):
            ratios[name[:-len("_vs_full")]] = float(value)
    for table in data.get("tables", []):
        columns = table.get("columns", [])
        if "strategy" in columns and "vs_full" in columns:
            i, j = columns.index("strategy"), columns.index("vs_full")
            for row in table["rows"]:
                if isinstance(row[j], (int, float)):
                    ratios[str(row[i])] = float(row[j])
    ratios.setdefault("prefix_repeat_prompt", ratios.get("repeat_prompt", float("nan")))
    ratios["full"] = 1.0  # by definition (the table's own full row is 1.0 too)
    return {"ratios": ratios, "date": data.get("date"), "commit": data.get("commit"),
            "model": data.get("setup", {}).get("model")}


def plot(points: Sequence[tuple[str, float, float, float]], ttft: dict[str, Any], path: Path) -> bool:
    """Accuracy (overall and cross-boundary) vs TTFT ratio, log x; points are numbered, the key sits on the
    right (labels beside points collide: several strategies lie within a factor 2 of each other).
    points: (label, ttft ratio, overall accuracy, cross accuracy)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = sorted(points, key=lambda p: (p[1], p[0]))
    xs = [max(p[1], 1e-5) for p in points]
    fig = plt.figure(figsize=(11, 5.6), dpi=120)
    ax = fig.add_axes((0.07, 0.12, 0.56, 0.8))
    ax.scatter(xs, [p[2] for p in points], marker="o", s=46, color="#1f77b4", label="all questions", zorder=3)
    ax.scatter(xs, [p[3] for p in points], marker="^", s=46, color="#d62728", label="cross-boundary", zorder=3)
    key = []
    shift = 0
    for i, (x, (label, _, overall, cross)) in enumerate(zip(xs, points), start=1):
        shift = shift + 8 if i > 1 and x < 1.2 * xs[i - 2] else 0  # near neighbours: move the number right
        ax.plot([x, x], [overall, cross], color="#999999", linewidth=0.8, zorder=2)
        ax.annotate(str(i), (x, overall), textcoords="offset points", xytext=(-3 + shift, 7), fontsize=8,
                    weight="bold")
        key.append(f"{i:>2}  {label}\n      TTFT {x:.2g}   all {overall:.3f}   cross {cross:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 2.0)
    ax.set_ylim(-0.03, 1.1)
    ax.set_xlabel("TTFT / full-prefill TTFT (host tier; log scale)")
    ax.set_ylabel("held-out accuracy (bundled model, answer at '?')")
    ax.set_title("ragkv: accuracy vs TTFT ratio", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.text(0.65, 0.92, "\n".join(key), fontsize=8, family="monospace", va="top")
    note = (f"Accuracy: bundled 6-layer Llama, held-out synthetic QA. TTFT ratios: bench/results/ttft.json "
            f"({ttft.get('model')}, {ttft.get('date')}), a different model: ratios only.")
    fig.text(0.01, 0.01, note, fontsize=7, color="#444444")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def replot(results: Path, path: Path) -> None:
    """Redraw the plot from a finished run's JSON and the current TTFT results (they may be newer)."""
    ttft = read_ttft()
    if ttft is None:
        raise SystemExit(f"no (non-quick) TTFT results at {TTFT_RESULTS}")
    data = json.loads(results.read_text())
    table = next(t for t in data["tables"] if t["title"].startswith("Strategies"))
    config, overall, cross = (table["columns"].index(c) for c in ("config", "overall", "cross"))
    accuracy = {row[config]: (row[overall], row[cross]) for row in table["rows"]}
    points = [(v.name, ttft["ratios"][v.ttft_figure], *accuracy[v.name]) for v in strategy_variants(bool(data["quick"]))
              if v.ttft_figure and v.name in accuracy and ttft["ratios"].get(v.ttft_figure, float("nan")) > 0]
    if not plot(points, ttft, path):
        raise SystemExit("matplotlib is not installed")
    print(f"wrote {path}")


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--n", type=int, default=None, help=f"held-out questions (default 400; quick {QUICK_QUESTIONS})"),
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)"),
        p.add_argument("--plot", type=Path, default=None, help=f"plot path (default: bench/{PLOT_NAME}; quick: --out)"),
        p.add_argument("--replot", action="store_true", help="only redraw the plot from the results JSON")))
    if args.replot:
        return replot((args.out or harness.RESULTS_DIR) / "quality.json", args.plot or BENCH_DIR / PLOT_NAME)
    torch.set_num_threads(args.threads)
    quick = args.quick
    n = args.n or (QUICK_QUESTIONS if quick else 400)
    report = harness.Report("quality", quick=quick, out=args.out)
    examples = quality_corpus.generate_examples(n, quality_corpus.HELDOUT_SEED)
    kinds = [example.kind for example in examples]
    model, tokenizer = load_model()
    adapter = ModelAdapter(model, tokenizer, model_id="ragkv-bundled")
    answers = answer_ids(tokenizer, examples)
    variants = strategy_variants(quick)
    codec_names = QUICK_CODECS if quick else tuple(c[0] for c in CODECS)
    report.setup = {"model": "middleware/bundled_model: LlamaForCausalLM, 6 layers, hidden 128, 4/2 heads, float32",
                    "questions": n, "inside": kinds.count("inside"), "cross": kinds.count("cross"),
                    "seed": quality_corpus.HELDOUT_SEED, "threads": torch.get_num_threads(),
                    "store": "TieredStore('host'); the 'disk tier' rows: a lone disk tier (raw / cachegen level 2)",
                    "answer": "argmax of the last prompt token's logits (PreparedContext.logits)",
                    "blend_default": {"check_layers": list(BlendConfig().check_layers), "deviation": "key",
                                      "schedule": "2r at the first check layer -> r at the last"},
                    "codec_rows": "full-prefill KV, chunk rows through the codec (start token exact), then the question"}
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="ragkv-quality-") as tmp:
        engines: dict[str, ContextEngine] = {}
        for variant in variants:
            if variant.store not in engines:
                engine = build_engine(adapter, variant.store, Path(tmp))
                warm = engine.warm([chunk for example in examples for chunk in example.chunks])
                report.setup[f"warm_{variant.store}_seconds"] = round(warm.seconds, 2)
                engines[variant.store] = engine
            outcomes[variant.name] = run_strategy(engines[variant.store], examples, variant)
            print(f"  {variant.name}: {outcomes[variant.name].seconds:.1f} s", flush=True)
        cross_examples = [e for e in examples if e.kind == "cross"]
        cross_answers = answer_ids(tokenizer, cross_examples)
        study_layers = (1, 2) if quick else tuple(range(1, adapter.num_layers))
        plan = [("host", dev) for dev in (("key",) if quick else ("key", "value"))]
        plan += [] if quick else [("disk_cachegen", "key")]  # codec error enters the deviation too
        studies = [(store, deviation_study(engines[store], cross_examples, cross_answers, layer, dev))
                   for store, dev in plan for layer in study_layers]
        for engine in engines.values():
            engine.store.close()
    codec_outcomes = run_codecs(adapter, examples, codec_names)

    full = outcomes["full"]
    scores = {name: score(o, full, answers, kinds) for name, o in outcomes.items()}
    full_s, reuse_s = scores["full"], scores["reuse"]
    ttft = read_ttft()
    ttft_ratios = ttft["ratios"] if ttft else {}
    rows = []
    for variant in variants:
        s, o = scores[variant.name], outcomes[variant.name]
        ttft_ratio = ttft_ratios.get(variant.ttft_figure) if variant.ttft_figure else None
        rows.append([variant.name, variant.strategy, variant.ratio if variant.ratio is not None else "-",
                     ",".join(map(str, variant.check_layers)) or "-", variant.deviation or "-",
                     variant.selector or "-", _r(s.inside), _r(s.cross), _r(s.overall), _r(s.agreement),
                     _r(s.mean_kl, 5), _r(recovered(s.cross, full_s.cross, reuse_s.cross)),
                     _r(o.compute_fraction), None if ttft_ratio is None else float(f"{ttft_ratio:.3g}"),
                     round(o.seconds, 1)])
    report.table(f"Strategies on {n} held-out questions (answer at '?'; agreement and KL vs full prefill)",
                 ["config", "strategy", "r", "check layers", "deviation", "selector", "inside", "cross", "overall",
                  "agreement", "mean KL", "cross recovered", "compute vs full", "TTFT ratio", "seconds"], rows)
    report.table("Where the deviation is read: blend r=0.15, one check layer, cross-boundary questions",
                 ["chunks from", "check layer", "deviation", "broken token selected", "median rank percentile",
                  "selection on other chunk starts", "cross", "cross recovered", "compute vs full"],
                 [[store, d.layer, d.deviation, _r(d.in_selection), _r(d.median_rank_percentile),
                   _r(d.chunk_start_share), _r(d.cross), _r(recovered(d.cross, full_s.cross, reuse_s.cross)),
                   _r(d.compute_fraction)] for store, d in studies])
    codec_scores = {name: score(o, full, answers, kinds) for name, o in codec_outcomes.items()}
    fp16 = codec_scores.get("fp16", full_s)
    report.table("Full prefill with the context KV through a codec (chunk rows; start token exact)",
                 ["codec", "bits/elem", "inside", "cross", "overall", "agreement", "mean KL",
                  "drop vs full (points)", "drop vs fp16 (points)", "seconds"],
                 [[name, _r(o.extra["bits_per_element"], 3), _r(s.inside), _r(s.cross), _r(s.overall),
                   _r(s.agreement), _r(s.mean_kl, 5), _r(100 * (full_s.overall - s.overall), 2),
                   _r(100 * (fp16.overall - s.overall), 2), round(o.seconds, 1)]
                  for (name, o), s in zip(codec_outcomes.items(), codec_scores.values())])

    f = report.figure
    f("full_accuracy", _r(full_s.overall))
    f("full_inside_chunk_accuracy", _r(full_s.inside))
    f("full_cross_chunk_accuracy", _r(full_s.cross))
    f("reuse_inside_chunk_accuracy", _r(reuse_s.inside))
    f("reuse_cross_chunk_accuracy", _r(reuse_s.cross))
    headline = {"blend_0.15": "blend 0.15 default", "blend_0.15_layer1": "blend 0.15 layer1 K",
                "blend_0.15_layer2": "blend 0.15 layer2 K", "blend_0.15_layers12": "blend 0.15 gradual K (1,2)",
                "blend_0.15_cachegen_disk": "blend 0.15 default, disk tier cachegen-2", "random_0.15": "random 0.15"}
    for prefix, name in headline.items():
        if name not in scores:
            continue
        s = scores[name]
        f(f"{prefix}_accuracy_drop_points", _r(100 * (full_s.overall - s.overall), 2))
        f(f"{prefix}_agreement", _r(s.agreement))
        f(f"{prefix}_cross_recovered", _r(recovered(s.cross, full_s.cross, reuse_s.cross)))
        f(f"{prefix}_mean_kl", _r(s.mean_kl, 5))
        f(f"{prefix}_compute_vs_full", _r(outcomes[name].compute_fraction))
    for store, d in studies:
        if store == "host" and d.deviation == "key" and d.layer in (1, 2):
            f(f"layer{d.layer}_key_broken_token_selected_0.15", _r(d.in_selection))
    if "blend 1.0 default" in scores:
        f("blend_1.0_agreement", _r(scores["blend 1.0 default"].agreement))
        f("blend_1.0_max_logit_diff", float(f"{scores['blend 1.0 default'].max_logit_diff:.3g}"))
    for name, prefix in (("cachegen-2 (mid)", "cachegen_mid"), ("int8", "int8"), ("int4", "int4")):
        if name in codec_scores:
            f(f"{prefix}_accuracy_drop_points", _r(100 * (full_s.overall - codec_scores[name].overall), 2))
            f(f"{prefix}_agreement", _r(codec_scores[name].agreement))
    if "cachegen-2 (mid)" in codec_scores and "fp16" in codec_scores:
        f("cachegen_mid_vs_fp16_accuracy_drop_points",
          _r(100 * (fp16.overall - codec_scores["cachegen-2 (mid)"].overall), 2))

    if ttft is None:
        report.note("bench/results/ttft.json missing (or a quick run): no TTFT ratios, no plot")
    else:
        report.setup["ttft_source"] = {k: ttft[k] for k in ("date", "commit", "model")}
        points = [(v.name, ttft_ratios[v.ttft_figure], scores[v.name].overall, scores[v.name].cross)
                  for v in variants if v.ttft_figure and ttft_ratios.get(v.ttft_figure, float("nan")) > 0]
        path = args.plot or ((args.out or harness.RESULTS_DIR / "quick") / PLOT_NAME if quick else BENCH_DIR / PLOT_NAME)
        if plot(points, ttft, path):
            report.setup["plot"] = str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
        else:
            report.note("matplotlib is not installed: plot not drawn")
    report.note("compress keeps SnapKV's default: the query's logits come from the pass over the unpruned reused "
                "chunks, so its first token equals reuse's; the budget rows recompute the query over the pruned cache")
    report.write()


if __name__ == "__main__":
    main()
