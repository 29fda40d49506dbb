"""Fixtures for the integration tests: a tiny random Llama served by a real RagRuntime over a real store.

Nothing is downloaded: the model is built from a config (the sample corpus vocabulary), and the store is host
memory in front of a disk directory under pytest's tmp dir.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> None:
    """Run every coroutine test here on pytest-asyncio (strict mode), including the async tests that the
    langchain-tests standard suites define without a marker (they may not be overridden)."""
    if inspect.iscoroutinefunction(obj) and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", [])):
        pytest.mark.asyncio(obj)


@pytest.fixture(scope="session")
def tiny_loaded() -> Any:
    from ragkv.integrations.models import build_random_model

    return build_random_model(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, max_positions=1024, seed=1)


@pytest.fixture(scope="session")
def tiny_runtime(tiny_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    disk = tmp_path_factory.mktemp("runtime-disk")
    runtime = RagRuntime(tiny_loaded, TieredStore(f"host:256MB,disk:{disk}:1GB"), own_store=True)
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def sample() -> Any:
    from ragkv.integrations.sample_corpus import load_sample_corpus

    return load_sample_corpus()


@pytest.fixture()
def corpus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("k1 v2 ; the k3 v4 ;\n\nk5 v6 ; of k7 v8 ;\n\n\n", encoding="utf-8")
    (d / "sub" / "b.md").write_text("k9 v10 ; and k11 v12 ;\n", encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d
