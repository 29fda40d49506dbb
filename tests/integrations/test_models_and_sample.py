"""Model selection (registry names, local directories, labelled random stand-ins) and the
sample corpus (package data identical to the generator's output)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ragkv.integrations import models
from ragkv.integrations.sample_corpus import SAMPLE_SIZE, load_sample_corpus
from ragkv.kvstore import ConfigError


def test_package_data_matches_the_generator() -> None:
    generated = load_sample_corpus(prefer_generator=True)
    packaged = load_sample_corpus(prefer_generator=False)
    if generated.source != "generator":
        pytest.skip("bench/quality_corpus.py is not in this checkout")
    assert packaged.source == "package data" and len(packaged.questions) == SAMPLE_SIZE
    assert packaged.questions == generated.questions and packaged.vocabulary == generated.vocabulary


def test_sample_corpus_is_covered_by_its_vocabulary(sample: Any) -> None:
    words = set(sample.vocabulary)
    for q in sample.questions:
        assert set(" ".join(q.chunks).split()) <= words and set(q.question.split()) <= words
        assert q.answer in words and q.kind in ("inside", "cross")
    assert len(sample.documents()) == len({c for q in sample.questions for c in q.chunks})


def test_random_stand_in_is_labelled_and_deterministic(tiny_loaded: Any) -> None:
    assert tiny_loaded.info.kind == models.KIND_RANDOM and "random" in tiny_loaded.info.label
    again = models.build_random_model(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, max_positions=1024,
                                      seed=1)
    a = models.make_adapter(tiny_loaded)
    b = models.make_adapter(again)
    assert a.fingerprint == b.fingerprint  # a restart reuses what it cached on disk
    ids = tiny_loaded.tokenizer("Q k12 ?", add_special_tokens=False)["input_ids"]
    assert tiny_loaded.tokenizer.unk_token_id not in ids


def test_registry_names_resolve_and_unknown_names_are_refused(tmp_path: Path) -> None:
    toy = models.load_model(models.TOY_MODEL)
    assert toy.info.kind == models.KIND_BUNDLED and toy.info.name == "toy"
    assert toy.info.path == str(models.toy_model_dir())
    with pytest.raises(ConfigError, match="neither a registered name"):
        models.load_model("no-such-model")
    with pytest.raises(ConfigError, match="config.json"):
        models.load_model(tmp_path)


def test_local_model_directory(tmp_path: Path, tiny_loaded: Any) -> None:
    tiny_loaded.model.save_pretrained(tmp_path / "m")
    tiny_loaded.tokenizer.save_pretrained(tmp_path / "m")
    loaded = models.load_model(tmp_path / "m")
    assert loaded.info.kind == models.KIND_LOCAL and loaded.info.name == "m"
    with pytest.raises(ConfigError, match="neither a registered name"):
        models.load_model(tmp_path / "nothing")


def test_models_without_bos_chunk_behind_eos(tiny_loaded: Any) -> None:
    from ragkv.integrations.models import LoadedModel, make_adapter, word_tokenizer

    tokenizer = word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", "a"])
    tokenizer.bos_token = None
    model = tiny_loaded.model
    old = model.config.bos_token_id
    model.config.bos_token_id = None
    try:
        adapter = make_adapter(LoadedModel(model, tokenizer, tiny_loaded.info))
        assert adapter.start_token_id == tokenizer.eos_token_id
    finally:
        model.config.bos_token_id = old


def test_device_choice_is_checked_and_cpu_always_works() -> None:
    import torch

    from ragkv.kvstore import ConfigError
    from ragkv.middleware.model_registry import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:99"):
        with pytest.raises(ConfigError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            resolve_device("cuda")


def test_a_runtime_in_bfloat16_on_cpu_answers_through_the_batch() -> None:
    import torch

    from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
    from ragkv.integrations.runtime import RagRuntime

    with RagRuntime.open("host:64MB", "toy", dtype="bfloat16", device="cpu", use_calibration=False) as runtime:
        assert runtime.adapter.dtype == torch.bfloat16 and runtime.adapter.device.type == "cpu"
        answer = runtime.answer(AnswerRequest(query="Q k1 ?", documents=[Document(text="k1 v2 ; the k3 v4 ;")],
                                              generation=GenerationOptions(max_new_tokens=3)))
        assert answer.completion_tokens >= 1


def test_serving_options_parse() -> None:
    from ragkv.integrations.cli import build_parser

    args = build_parser().parse_args(["serve", "--device", "cpu", "--dtype", "bfloat16", "--near-duplicates",
                                      "--abstracts", "--abstract-threshold", "2.5"])
    assert (args.device, args.dtype, args.near_duplicates) == ("cpu", "bfloat16", True)
    assert (args.abstracts, args.abstract_threshold) == (True, 2.5)
    roles = build_parser().parse_args(["serve", "--role", "decode", "--record-trace", "t.jsonl"])
    assert (roles.role, roles.record_trace) == ("decode", "t.jsonl")
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.device, defaults.near_duplicates, defaults.abstracts) == ("auto", False, False)
    assert (defaults.role, defaults.record_trace) == ("both", None)
