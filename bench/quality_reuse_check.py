"""Accuracy of a model on the synthetic QA corpus: full prefill, and independent-chunk reuse as a sanity check.

Why this lives in bench/ and uses plain transformers: it must be able to judge the bundled model before
(and independently of) ragkv's middleware. ``full`` prefills ``<bos> chunk1 ... chunkN Q kX ?`` and takes
the greedy argmax at ``?``; that is the reference every strategy is measured against. ``reuse`` builds
each chunk's KV on its own (behind ``<bos>``, at positions 1..n, the ``<bos>`` row dropped), re-rotates
the keys to the positions the chunk takes in the assembled prompt, concatenates, and computes only the
question on top. If the corpus tests what it should, reuse keeps ``inside`` questions and loses
``cross`` ones. The re-rotation here is deliberately a small standalone copy for this check; the product
version belongs to ``ragkv.middleware``.

Command line (prints a table, writes JSON)::

    python bench/quality_reuse_check.py --model middleware/bundled_model --n 400 --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BUNDLED_MODEL_DIR = REPO_ROOT / "middleware" / "bundled_model"


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


quality_corpus = load_bench_module("quality_corpus")


@dataclass(frozen=True)
class KindAccuracy:
    """Correct answers over questions, per kind; the bar is set per kind, so they are never pooled alone."""

    inside_correct: int
    inside_total: int
    cross_correct: int
    cross_total: int

    @property
    def inside(self) -> float:
        return self.inside_correct / self.inside_total if self.inside_total else float("nan")

    @property
    def cross(self) -> float:
        return self.cross_correct / self.cross_total if self.cross_total else float("nan")

    @property
    def overall(self) -> float:
        total = self.inside_total + self.cross_total
        return (self.inside_correct + self.cross_correct) / total if total else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {"inside": self.inside, "cross": self.cross, "overall": self.overall,
                "inside_total": self.inside_total, "cross_total": self.cross_total}


def _tally(examples: Sequence[Any], correct: Sequence[bool]) -> KindAccuracy:
    inside = [ok for example, ok in zip(examples, correct) if example.kind == "inside"]
    cross = [ok for example, ok in zip(examples, correct) if example.kind == "cross"]
    return KindAccuracy(sum(inside), len(inside), sum(cross), len(cross))


def word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """Token ids of pre-split words; the vocabulary is word-level, so this is a plain lookup."""
    ids = tokenizer.convert_tokens_to_ids(list(words))
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        unknown = [w for w, i in zip(words, ids) if i == tokenizer.unk_token_id]
        raise ValueError(f"words outside the vocabulary: {unknown[:5]}")
    return list(ids)


@torch.no_grad()
def full_prefill_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Any],
                         batch_size: int = 64) -> list[str]:
    """Greedy answer at ``?`` after prefilling ``<bos>`` + chunks + question in one pass.

    Batches are right-padded without an attention mask: attention is causal, so padding after a
    sequence's last token cannot change its logits, and positions stay 0..n-1 as in single prefill.
    """
    model.eval()
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        sequences = [[bos] + word_ids(tokenizer, quality_corpus.prompt_words(example)) for example in batch]
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=input_ids).logits  # [B, T, V]
        last = torch.tensor([len(ids) - 1 for ids in sequences])
        predicted = logits[torch.arange(len(batch)), last].argmax(dim=-1)
        answers += tokenizer.convert_ids_to_tokens(predicted.tolist())
    return answers


def full_prefill_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Any],
                          batch_size: int = 64) -> KindAccuracy:
    answers = full_prefill_answers(model, tokenizer, examples, batch_size)
    return _tally(examples, [a == example.answer for a, example in zip(answers, examples)])


def rope_inverse_frequencies(model: LlamaForCausalLM) -> torch.Tensor:
    """Llama's default RoPE frequencies from the config; refuses scaled variants this check cannot move."""
    config = model.config
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"re-rotation here supports plain RoPE only, got rope_type={rope_type!r}")
    theta = float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]


def rotate_keys(keys: torch.Tensor, delta: int, inverse_frequencies: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys by ``delta`` positions: RoPE is a rotation linear in position, so rotate again.

    keys: [..., T, D] in Llama's half-split layout (rotate_half pairs channel i with i + D/2).
    """
    angles = delta * inverse_frequencies  # [D/2]
    cos = torch.cat([angles.cos(), angles.cos()])  # [D]
    sin = torch.cat([angles.sin(), angles.sin()])  # [D]
    work = keys.float()
    half = work.shape[-1] // 2
    rotated_half = torch.cat([-work[..., half:], work[..., :half]], dim=-1)
    return (work * cos + rotated_half * sin).to(keys.dtype)


@torch.no_grad()
def chunk_caches(model: LlamaForCausalLM, bos: int, chunk_ids: Sequence[Sequence[int]], pad: int
                 ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per chunk, per layer (keys, values) of the chunk prefilled alone behind ``<bos>``, ``<bos>`` row dropped.

    Returns [chunk][layer] -> (k, v), each [1, H, n_chunk, D], keys rotated for positions 1..n_chunk.
    """
    longest = max(len(ids) for ids in chunk_ids)
    input_ids = torch.full((len(chunk_ids), 1 + longest), pad, dtype=torch.long)
    input_ids[:, 0] = bos
    for row, ids in enumerate(chunk_ids):
        input_ids[row, 1:1 + len(ids)] = torch.tensor(ids)
    cache = model(input_ids=input_ids, use_cache=True).past_key_values
    per_chunk: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for row, ids in enumerate(chunk_ids):
        layers = []
        for layer in cache.layers:
            # layer.keys: [C, H, 1 + longest, D]
            layers.append((layer.keys[row:row + 1, :, 1:1 + len(ids)], layer.values[row:row + 1, :, 1:1 + len(ids)]))
        per_chunk.append(layers)
    return per_chunk


@torch.no_grad()
def independent_reuse_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
                              examples: Sequence[Any]) -> list[str]:
    """Greedy answer at ``?`` when every chunk's KV was computed alone and only the question is computed."""
    from transformers import DynamicCache

    model.eval()
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    frequencies = rope_inverse_frequencies(model)
    bos_cache = model(input_ids=torch.tensor([[bos]]), use_cache=True).past_key_values
    answers: list[str] = []
    for example in examples:
        chunk_ids = [word_ids(tokenizer, chunk.split()) for chunk in example.chunks]
        per_chunk = chunk_caches(model, bos, chunk_ids, pad)
        layer_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            [(layer.keys, layer.values)] for layer in bos_cache.layers]
        position = 1  # the assembled prompt's <bos> sits at 0
        for ids, layers in zip(chunk_ids, per_chunk):
            for parts, (keys, values) in zip(layer_parts, layers):
                parts.append((rotate_keys(keys, position - 1, frequencies), values))
            position += len(ids)
        assembled = DynamicCache(ddp_cache_data=[
            (torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2))
            for parts in layer_parts])
        question = word_ids(tokenizer, example.question.split())
        position_ids = torch.arange(position, position + len(question)).unsqueeze(0)
        logits = model(input_ids=torch.tensor([question]), position_ids=position_ids,
                       cache=assembled, use_cache=True).logits
        answers.append(tokenizer.convert_ids_to_tokens(int(logits[0, -1].argmax())))
    return answers


def independent_reuse_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
                               examples: Sequence[Any]) -> KindAccuracy:
    answers = independent_reuse_answers(model, tokenizer, examples)
    return _tally(examples, [a == example.answer for a, example in zip(answers, examples)])


def load_model(directory: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a model directory (the bundled one by default) in float32 for evaluation."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out accuracy of a model: full prefill vs independent reuse.")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--n", type=int, default=400, help="held-out questions (half inside, half cross)")
    parser.add_argument("--seed", type=int, default=quality_corpus.HELDOUT_SEED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    examples = quality_corpus.generate_examples(args.n, args.seed)
    started = time.perf_counter()
    full = full_prefill_accuracy(model, tokenizer, examples)
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reuse = independent_reuse_accuracy(model, tokenizer, examples)
    reuse_seconds = time.perf_counter() - started
    print(f"{'strategy':<10} {'inside':>8} {'cross':>8} {'overall':>8} {'seconds':>8}   (n={args.n}, seed={args.seed})")
    for name, accuracy, seconds in (("full", full, full_seconds), ("reuse", reuse, reuse_seconds)):
        print(f"{name:<10} {accuracy.inside:>8.3f} {accuracy.cross:>8.3f} {accuracy.overall:>8.3f} {seconds:>8.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "full": full.as_dict(),
                                         "reuse": reuse.as_dict()}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
