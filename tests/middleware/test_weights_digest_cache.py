"""The fingerprint hashes every weight once per set of weight files: a later load of the same files reads the
digest back (cached by the files' identity), a rewritten file is hashed again."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ragkv.integrations.models import make_adapter
from ragkv.middleware import model_registry
from ragkv.middleware.model_registry import KIND_LOCAL, load_folder, toy_model_dir


def test_the_digest_is_read_back_until_the_weights_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGKV_MODELS_DIR", str(tmp_path / "models"))
    folder = tmp_path / "toy-copy"
    shutil.copytree(toy_model_dir(), folder)

    def load() -> str:
        loaded = load_folder(folder, name="toy-copy", kind=KIND_LOCAL, label="copy")
        return str(make_adapter(loaded).fingerprint)

    first = load()
    assert (tmp_path / "models" / "weights-digests.json").is_file()
    real_digest = model_registry.weights_digest

    def refuse(model: object) -> str:
        raise AssertionError("the weights were hashed again")

    monkeypatch.setattr(model_registry, "weights_digest", refuse)
    import ragkv.middleware.adapter as adapter_module

    monkeypatch.setattr(adapter_module, "weights_digest", refuse)
    assert load() == first  # read back, not recomputed
    monkeypatch.setattr(model_registry, "weights_digest", real_digest)
    monkeypatch.setattr(adapter_module, "weights_digest", real_digest)

    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[len(weights) // 2]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0  # one element of one middle tensor
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load() != first  # new file identity: hashed again, and the fingerprint follows the weights


def test_a_damaged_cache_file_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGKV_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights-digests.json").write_text('{"' + "a" * 32 + '": [1, {"x": NaN}]' + "[" * 5000)
    loaded = load_folder(toy_model_dir(), name="toy", kind=KIND_LOCAL, label="toy")
    assert loaded.weights_digest == model_registry.weights_digest(loaded.model)
