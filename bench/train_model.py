"""Train ragkv's bundled model: a small LlamaForCausalLM that has learned the synthetic QA corpus.

Why ragkv trains its own model: no pretrained weights can be downloaded where ragkv is developed and
tested, yet the quality benchmark needs a model whose answers depend on attention across chunk boundaries.
The recipe follows a feasibility study on this hardware (see bench/RESULTS_quality_model.md); each
ingredient below was needed there, the reasons are next to the code:

- 30% of each batch are helper sequences. Half are ``x y x ; ...`` whose scored token is the repeat of
  ``x`` (two tokens back): they reward a previous-token head, the first half of the induction circuit
  that associative recall needs; without them every run of the study stayed at chance. The other half
  repeat a random word sequence after ``;`` and score the repeat: the plain induction task, a dense
  gradient for the second half of the circuit. (The study's 3-layer model did without it; our 6-layer
  model with only the ``x y x`` helpers was still at chance after 1,500 steps, with them it jumped
  at ~1,400 steps.)
- Task sequences are a context, then queries ``Q kX ? vY`` drawn WITH replacement (without replacement
  the model learned to answer by elimination), then in half of them a replay segment ``R kA vB ; ...``
  listing the pairs again, which adds dense recall targets.
- A curriculum from 1 chunk up to 8, stepped when the batch's query accuracy passes 0.85.
- Loss on answers plus 0.2 x the other tokens; AdamW lr 5e-3, init std 0.06, batch 32.
- Chunk boundaries are never visible: a context is its chunks' words concatenated.

Determinism: the weights are initialised from ``--seed`` and every batch is drawn from
``random.Random(seed * 1_000_003 + step)``, so a run restarted from its checkpoint continues exactly as
an uninterrupted one. Results are bit-identical for the same torch version, CPU and ``--threads``.

    python bench/train_model.py --threads 1 --work-dir /tmp/ragkv_train --out middleware/bundled_model
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from quality_reuse_check import (  # type: ignore[import-not-found]  # bench/ is the script's own directory
    BUNDLED_MODEL_DIR,
    KindAccuracy,
    full_prefill_accuracy,
    independent_reuse_accuracy,
    quality_corpus,
)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

ROLE_OTHER = 0
ROLE_ANSWER = 1  # a query's value (after ``?``); also what the curriculum's accuracy is measured on
ROLE_REPLAY = 2  # a value in the replay segment
ROLE_HELPER = 3  # the repeated token of a helper triple
ROLE_PAD = 4


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; stored in the checkpoint and the bundled README so a run can be reproduced."""

    seed: int = 0
    threads: int = 1
    # model
    layers: int = 6
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 256
    max_positions: int = 2048
    rope_theta: float = 10000.0
    init_std: float = 0.06
    # optimisation
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    batch: int = 32
    helper_fraction: float = 0.3
    replay_fraction: float = 0.5
    queries_per_sequence: int = 8
    other_token_weight: float = 0.2
    # curriculum and stopping
    max_level: int = 8
    level_threshold: float = 0.85
    level_window: int = 5
    max_steps: int = 6000
    eval_every: int = 200
    eval_questions: int = 200
    min_steps_at_max_level: int = 400
    cooldown_steps: int = 300
    stop_inside: float = 0.97
    stop_cross: float = 0.95
    checkpoint_every: int = 100
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not 0.0 <= self.helper_fraction < 1.0:
            raise ValueError(f"helper_fraction must be in [0, 1), got {self.helper_fraction}")
        if self.threads < 1 or self.batch < 2 or self.max_level < 1:
            raise ValueError("threads >= 1, batch >= 2 and max_level >= 1 are required")


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimiser moments to resume the same run."""

    step: int = 0
    level: int = 1
    level_history: list[float] = field(default_factory=list)
    reached_max_at: int | None = None
    cooldown_from: int | None = None
    tokens: int = 0
    elapsed_s: float = 0.0
    level_steps: dict[str, int] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


# ---------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(max_positions: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the corpus vocabulary, as a real HF tokenizer that loads offline.

    Like Llama's tokenizers, encoding with special tokens prepends ``<bos>``; chunk-by-chunk callers pass
    ``add_special_tokens=False``. Words outside the vocabulary map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(quality_corpus.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=quality_corpus.UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = quality_corpus.BOS_TOKEN
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=quality_corpus.EOS_TOKEN,
        pad_token=quality_corpus.PAD_TOKEN, unk_token=quality_corpus.UNK_TOKEN, model_max_length=max_positions)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save, then make the files loadable by transformers 4.x too (class name, special_tokens_map.json)."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"bos_token": quality_corpus.BOS_TOKEN, "eos_token": quality_corpus.EOS_TOKEN,
               "pad_token": quality_corpus.PAD_TOKEN, "unk_token": quality_corpus.UNK_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(quality_corpus.vocabulary()), hidden_size=config.hidden,
        intermediate_size=config.intermediate, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_positions, rms_norm_eps=1e-5, initializer_range=config.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config).float()


# ---------------------------------------------------------------------------------------------- batches


def task_sequence(rng: random.Random, level: int, config: TrainConfig) -> tuple[list[str], list[int]]:
    """Context + queries with replacement (+ replay half the time); words and the role of each word."""
    num_chunks = rng.randint(math.ceil(level / 2), level)
    context = quality_corpus.sample_context(rng, num_chunks)
    words = [quality_corpus.BOS_TOKEN] + context.words()
    roles = [ROLE_OTHER] * len(words)
    for _ in range(config.queries_per_sequence):
        pair = rng.choice(context.pairs)
        words += [quality_corpus.QUERY_MARK, pair.key, quality_corpus.ASK_MARK, pair.value]
        roles += [ROLE_OTHER, ROLE_OTHER, ROLE_OTHER, ROLE_ANSWER]
    if rng.random() < config.replay_fraction:
        words.append(quality_corpus.REPLAY_MARK)
        roles.append(ROLE_OTHER)
        for pair in rng.sample(context.pairs, len(context.pairs)):
            words += [pair.key, pair.value, quality_corpus.PAIR_END]
            roles += [ROLE_OTHER, ROLE_REPLAY, ROLE_OTHER]
    return words, roles


HELPER_WORDS: tuple[str, ...] = quality_corpus.KEYS + quality_corpus.VALUES + quality_corpus.FILLERS


def helper_sequence(rng: random.Random, length: int) -> tuple[list[str], list[int]]:
    """``x y x ;`` triples: the scored third token is two back, which a previous-token head can copy."""
    words = [quality_corpus.BOS_TOKEN]
    roles = [ROLE_OTHER]
    while len(words) < length:
        x, y = rng.choice(HELPER_WORDS), rng.choice(HELPER_WORDS)
        words += [x, y, x, quality_corpus.PAIR_END]
        roles += [ROLE_OTHER, ROLE_OTHER, ROLE_HELPER, ROLE_OTHER]
    return words, roles


def repeat_sequence(rng: random.Random, length: int) -> tuple[list[str], list[int]]:
    """Random words, ``;``, the same words again: every repeated word after the first is scored.

    Predicting the repeat is the plain induction task (find the previous occurrence of the current word,
    copy what followed it), the circuit recall needs on top of the previous-token head; it gives that
    circuit a dense gradient, where the task itself scores only a few answers per sequence.
    """
    half = max(2, (length - 2) // 2)
    segment = [rng.choice(HELPER_WORDS) for _ in range(half)]
    words = [quality_corpus.BOS_TOKEN] + segment + [quality_corpus.PAIR_END] + segment
    roles = [ROLE_OTHER] * (half + 3) + [ROLE_HELPER] * (half - 1)
    return words, roles


def make_batch(step: int, level: int, config: TrainConfig, vocab: dict[str, int], groups: int = 2
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One step's sequences as ``groups`` length-sorted micro-batches of (input_ids [b, T], roles [b, T]).

    A pure function of (seed, step, level). Sorting by length before splitting roughly halves the
    padding a single right-padded batch would carry, and the loss is normalised over the whole step, so
    the gradient is the same as for one batch.
    """
    rng = random.Random(config.seed * 1_000_003 + step)
    num_helpers = round(config.batch * config.helper_fraction)
    sequences = [task_sequence(rng, level, config) for _ in range(config.batch - num_helpers)]
    task_lengths = [len(words) for words, _ in sequences]
    for index in range(num_helpers):
        helper = helper_sequence if index % 2 == 0 else repeat_sequence
        sequences.append(helper(rng, rng.choice(task_lengths)))
    sequences.sort(key=lambda sequence: len(sequence[0]))
    size = math.ceil(len(sequences) / groups)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(sequences), size):
        group = sequences[start:start + size]
        longest = max(len(words) for words, _ in group)
        input_ids = torch.full((len(group), longest), vocab[quality_corpus.PAD_TOKEN], dtype=torch.long)
        roles = torch.full((len(group), longest), ROLE_PAD, dtype=torch.long)
        for row, (words, word_roles) in enumerate(group):
            input_ids[row, :len(words)] = torch.tensor([vocab[w] for w in words])
            roles[row, :len(words)] = torch.tensor(word_roles)
        batches.append((input_ids, roles))
    return batches


def loss_weights(roles: torch.Tensor, other_weight: float) -> torch.Tensor:
    """Per-target weights [b, T-1]: answers 1, other tokens ``other_weight``, padding 0."""
    target_roles = roles[:, 1:]
    weights = torch.full(target_roles.shape, other_weight)
    weights[target_roles != ROLE_OTHER] = 1.0
    weights[target_roles == ROLE_PAD] = 0.0
    return weights


def weighted_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, roles: torch.Tensor, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, int, int]:
    """Weighted cross-entropy summed over next tokens, plus (correct, total) query answers.

    logits: [b, T, V]; the prediction at position t is scored against the token at t + 1.
    """
    targets = input_ids[:, 1:]  # [b, T-1]
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # [b, T-1]
    answer = roles[:, 1:] == ROLE_ANSWER
    with torch.no_grad():
        correct = int(((logits[:, :-1].argmax(dim=-1) == targets) & answer).sum())
    return (per_token * weights).sum(), correct, int(answer.sum())


# ---------------------------------------------------------------------------------------------- loop


def learning_rate(step: int, state: TrainState, config: TrainConfig) -> float:
    """Warm up, hold, and once the stopping bar is met cool down linearly to 10% over ``cooldown_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if state.cooldown_from is not None:
        done = min(1.0, (step - state.cooldown_from) / max(1, config.cooldown_steps))
        return config.lr * (1.0 - 0.9 * done)
    return config.lr


def save_checkpoint(path: Path, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, state: TrainState,
                    config: TrainConfig) -> None:
    """Atomic (temp file + rename): a kill mid-write must not destroy the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": json.dumps(asdict(state)), "config": json.dumps(asdict(config))}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer,
                    config: TrainConfig) -> TrainState:
    # weights_only: our own file, but there is no reason to allow arbitrary pickles anyway.
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if json.loads(saved["config"]) != json.loads(json.dumps(asdict(config))):
        raise SystemExit(f"{path} was written with a different configuration; use another --work-dir")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**json.loads(saved["state"]))


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S ") + message, flush=True)


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: Sequence[Any]) -> KindAccuracy:
    accuracy = full_prefill_accuracy(model, tokenizer, examples)
    model.train()
    return accuracy


def train(config: TrainConfig, work_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, TrainState]:
    torch.set_num_threads(config.threads)
    tokenizer = build_tokenizer(config.max_positions)
    vocab = {word: index for index, word in enumerate(quality_corpus.vocabulary())}
    model = build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    checkpoint = work_dir / "checkpoint.pt"
    state = TrainState()
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, model, optimizer, config)
        log(f"resumed from {checkpoint} at step {state.step}, level {state.level}")
    parameters = sum(p.numel() for p in model.parameters())
    log(f"model: {parameters} parameters, config {json.dumps(asdict(config))}")
    validation = quality_corpus.generate_examples(config.eval_questions, quality_corpus.VALIDATION_SEED)
    model.train()
    session_start = time.perf_counter() - state.elapsed_s
    window_loss: list[float] = []
    while not state.finished and state.step < config.max_steps:
        step = state.step
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, state, config)
        batches = make_batch(step, state.level, config, vocab)
        weights = [loss_weights(roles, config.other_token_weight) for _, roles in batches]
        total_weight = float(sum(w.sum() for w in weights))
        optimizer.zero_grad(set_to_none=True)
        step_loss, correct, answers = 0.0, 0, 0
        for (input_ids, roles), weight in zip(batches, weights):
            logits = model(input_ids=input_ids).logits  # [b, T, V]
            loss_sum, batch_correct, batch_answers = weighted_loss_sum(logits, input_ids, roles, weight)
            loss = loss_sum / total_weight
            loss.backward()
            step_loss += float(loss.detach())
            correct, answers = correct + batch_correct, answers + batch_answers
            state.tokens += int((roles != ROLE_PAD).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        accuracy = correct / max(1, answers)
        state.step += 1
        state.level_steps[str(state.level)] = state.level_steps.get(str(state.level), 0) + 1
        window_loss.append(step_loss)
        state.level_history.append(accuracy)
        if state.level < config.max_level and len(state.level_history) >= config.level_window and \
                sum(state.level_history[-config.level_window:]) / config.level_window > config.level_threshold:
            state.level += 1
            state.level_history = []
            log(f"step {state.step}: curriculum -> level {state.level} (chunks {math.ceil(state.level / 2)}"
                f"..{state.level})")
            if state.level == config.max_level:
                state.reached_max_at = state.step
        state.level_history = state.level_history[-config.level_window:]
        state.elapsed_s = time.perf_counter() - session_start
        if state.step % config.log_every == 0:
            log(f"step {state.step} level {state.level} loss {sum(window_loss) / len(window_loss):.4f} "
                f"query_acc {accuracy:.3f} lr {optimizer.param_groups[0]['lr']:.2e} tokens {state.tokens} "
                f"elapsed {state.elapsed_s:.0f}s tok/s {state.tokens / max(state.elapsed_s, 1e-9):.0f}")
            window_loss = []
        if state.cooldown_from is not None and state.step >= state.cooldown_from + config.cooldown_steps:
            state.finished = True
        elif state.reached_max_at is not None and state.step % config.eval_every == 0:
            result = evaluate(model, tokenizer, validation)
            state.evaluations.append({"step": state.step, **result.as_dict()})
            log(f"step {state.step} validation inside {result.inside:.3f} cross {result.cross:.3f}")
            if state.cooldown_from is None and result.inside >= config.stop_inside and \
                    result.cross >= config.stop_cross and \
                    state.step - state.reached_max_at >= config.min_steps_at_max_level:
                state.cooldown_from = state.step
                log(f"step {state.step}: validation bar met, cooling down for {config.cooldown_steps} steps")
        if state.finished or state.step % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, model, optimizer, state, config)
    save_checkpoint(checkpoint, model, optimizer, state, config)
    model.eval()
    return model, tokenizer, state


# ---------------------------------------------------------------------------------------------- export


def write_readme(directory: Path, config: TrainConfig, state: TrainState, parameters: int,
                 heldout: KindAccuracy, reuse: KindAccuracy, heldout_n: int, machine_load: str) -> None:
    """The bundled model's card: what it is, how it was made, and how well it does, from this very run."""
    text = f"""# ragkv bundled model

A small Llama-architecture model (`LlamaForCausalLM`, float32, {parameters:,} parameters) trained by ragkv
itself on its synthetic multi-document associative-recall corpus (`bench/quality_corpus.py`). It is the
quality benchmark's model and the service's default model. It knows only the corpus vocabulary.

- Architecture: {config.layers} layers, hidden {config.hidden}, {config.heads} attention heads /
  {config.kv_heads} KV heads, head_dim {config.head_dim}, MLP {config.intermediate}, RoPE theta
  {config.rope_theta:g} (plain rotation), RMSNorm, untied embeddings, max positions {config.max_positions}.
- Tokenizer: word-level (`tokenizers` WordLevel + WhitespaceSplit), {len(quality_corpus.vocabulary())}
  words, specials `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3. Encoding with special tokens prepends
  `<bos>` (as Llama's tokenizers do); tokenize chunks with `add_special_tokens=False`.
- Task: a context of chunks holding pairs `kX vY ;` (about half the chunk boundaries fall between a key
  and its value), then `Q kX ?`; the answer is the greedy token at `?`.

## Training

`python bench/train_model.py --threads {config.threads} --seed {config.seed} --out middleware/bundled_model`
reproduces these files (bit-identical with the same torch version, CPU and thread count).

- Steps: {state.step}; tokens: {state.tokens:,} (padding excluded); wall time: {state.elapsed_s / 60:.1f}
  min on {config.threads} CPU thread(s) of a {os.cpu_count()}-core machine shared with other work
  ({machine_load}), torch {torch.__version__}.
- Batch {config.batch}: {config.helper_fraction:.0%} helper sequences (half `x y x ;` triples scoring the
  token two back, for a previous-token head; half a random word sequence repeated, scoring the repeat,
  for an induction head); the rest are task sequences with {config.queries_per_sequence} queries drawn
  with replacement, half followed by a replay of the pairs. Loss on answers + {config.other_token_weight}
  x other tokens. AdamW lr {config.lr:g}, init std {config.init_std}, warm-up {config.warmup_steps}
  steps, linear cooldown to 10% over {config.cooldown_steps} steps once validation met the bar
  (inside >= {config.stop_inside}, cross >= {config.stop_cross}, at least
  {config.min_steps_at_max_level} steps at the top level). Chunk boundaries are never visible.
- Curriculum: level n draws ceil(n/2)..n chunks; the level rose when query accuracy passed
  {config.level_threshold} over {config.level_window} steps. Steps per level:
  {json.dumps(state.level_steps)}.
- Validation (seed {quality_corpus.VALIDATION_SEED}, {config.eval_questions} questions, full prefill):
  {"; ".join(f"step {e['step']}: inside {e['inside']:.3f} cross {e['cross']:.3f}" for e in state.evaluations)}.

## Held-out accuracy (seed {quality_corpus.HELDOUT_SEED}, {heldout_n} questions, half inside / half cross)

| strategy | inside-chunk | cross-boundary |
|---|---|---|
| full prefill | {heldout.inside:.3f} | {heldout.cross:.3f} |
| independent-chunk reuse (no recompute) | {reuse.inside:.3f} | {reuse.cross:.3f} |

The bar is full-prefill >= 0.90 inside and >= 0.80 cross. Independent reuse computes each chunk alone
behind `<bos>` and re-rotates its keys; it keeps inside-chunk answers and loses cross-boundary ones, which
is the gap CacheBlend must close (`bench/quality_reuse_check.py`).

## Use

```python
from transformers import AutoTokenizer, LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(directory)  # offline: a local directory
tokenizer = AutoTokenizer.from_pretrained(directory)
ids = tokenizer("the k3 v9 ; data k5 v1 ; Q k5 ?", return_tensors="pt").input_ids  # <bos> prepended
answer = tokenizer.decode(model(ids).logits[0, -1].argmax())  # "v1"
```

Re-check: `python bench/quality_reuse_check.py --model middleware/bundled_model --n 400`.
"""
    (directory / "README.md").write_text(text, encoding="utf-8")


def export(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, state: TrainState, config: TrainConfig,
           out: Path, work_dir: Path, heldout_n: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    examples = quality_corpus.generate_examples(heldout_n, quality_corpus.HELDOUT_SEED)
    heldout = full_prefill_accuracy(model, tokenizer, examples)
    reuse = independent_reuse_accuracy(model, tokenizer, examples)
    parameters = sum(p.numel() for p in model.parameters())
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    write_readme(out, config, state, parameters, heldout, reuse, heldout_n,
                 machine_load=f"1/5/15-min load average when training ended: {load}")
    summary = {"config": asdict(config), "state": asdict(state), "parameters": parameters,
               "heldout": heldout.as_dict(), "independent_reuse": reuse.as_dict(), "heldout_n": heldout_n}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"held-out full prefill: inside {heldout.inside:.3f} cross {heldout.cross:.3f}; "
        f"independent reuse: inside {reuse.inside:.3f} cross {reuse.cross:.3f}")
    if heldout.inside < 0.90 or heldout.cross < 0.80:
        log("WARNING: the model does not meet the bar (inside >= 0.90, cross >= 0.80)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train ragkv's bundled model on the synthetic QA corpus.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=TrainConfig.layers)
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ragkv_train"),
                        help="checkpoint and summary; a rerun with the same directory resumes")
    parser.add_argument("--out", type=Path, default=BUNDLED_MODEL_DIR, help="model + tokenizer directory")
    parser.add_argument("--heldout", type=int, default=400, help="held-out questions for the final report")
    args = parser.parse_args(argv)
    torch.set_num_interop_threads(1)
    config = TrainConfig(seed=args.seed, threads=args.threads, layers=args.layers, max_steps=args.max_steps)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, state = train(config, args.work_dir)
    export(model, tokenizer, state, config, args.out, args.work_dir, args.heldout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
