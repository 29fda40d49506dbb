"""Which model the integrations serve: the bundled one, any supported local HF model, or a labelled stand-in.

``load_default_model()`` returns ragkv's bundled model (a small Llama trained on the synthetic recall task,
``ragkv/middleware/bundled_model``) as soon as its files exist. Until then it builds a small
random-initialised Llama from a config with a word-level tokenizer over the sample corpus vocabulary, and
says so loudly in ``ModelInfo.label`` (shown by ``/healthz`` and the status page): the service then runs and
caches exactly as it will, but its answers are noise. ``load_model(path)`` loads any local HuggingFace model
directory the middleware supports (Llama, Qwen2/3, Mistral), offline and from safetensors only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkv.kvstore.errors import ConfigError

log = logging.getLogger(__name__)

KIND_BUNDLED = "bundled"
KIND_LOCAL = "local"
KIND_RANDOM = "random-init"
RANDOM_MODEL_LABEL = "random-initialised stand-in (untrained: answers are noise until the bundled model ships)"
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelInfo:
    """What is being served, for humans (``label``) and machines (``kind``)."""

    name: str
    kind: str  # "bundled" | "local" | "random-init"
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


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the extra is part of every dev install
        raise ImportError("ragkv's model support needs transformers: pip install 'ragkv[model]'") from exc
    return transformers


def bundled_model_dir() -> Path:
    """Where the bundled model lives (package data of ``ragkv.middleware``)."""
    import ragkv.middleware

    return Path(ragkv.middleware.__file__).resolve().parent / "bundled_model"


def bundled_model_available(directory: Path | None = None) -> bool:
    """True once the bundled model's config, weights and tokenizer are all present."""
    d = directory or bundled_model_dir()
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (
        (d / "tokenizer.json").is_file())


def word_tokenizer(vocabulary: Sequence[str], bos: str = "<bos>", eos: str = "<eos>", pad: str = "<pad>",
                   unk: str = "<unk>", max_length: int = 2048) -> Any:
    """A whitespace word-level HF tokenizer over ``vocabulary`` (the specials must be in it)."""
    _require_transformers()
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    missing = [s for s in (bos, eos, pad, unk) if s not in vocab]
    if missing:
        raise ConfigError(f"the vocabulary lacks the special tokens {missing}")
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, model_max_length=max_length)


def build_random_model(vocabulary: Sequence[str] | None = None, *, layers: int = 4, hidden: int = 128,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 256, max_positions: int = 2048,
                       seed: int = 0) -> LoadedModel:
    """A small random-initialised Llama (deterministic in ``seed``) with a word-level tokenizer.

    The default vocabulary is the sample corpus's, so the sample questions tokenize without unknown words.
    Deterministic weights give a stable fingerprint, so chunks cached on disk survive a restart.
    """
    transformers = _require_transformers()
    import torch

    if vocabulary is None:
        from ragkv.integrations.sample_corpus import load_sample_corpus

        vocabulary = load_sample_corpus(1).vocabulary
    tokenizer = word_tokenizer(vocabulary, max_length=max_positions)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(name=f"random-llama-{layers}x{hidden}", kind=KIND_RANDOM, label=RANDOM_MODEL_LABEL, path=None,
                     parameters=params)
    return LoadedModel(model, tokenizer, info)


def _torch_dtype(dtype: str | None) -> Any:
    import torch

    if dtype in (None, "auto"):
        return "auto"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(path: str | Path | None = None, *, dtype: str | None = None) -> LoadedModel:
    """Load a local HF model directory (offline, safetensors only), or the default when ``path`` is None."""
    if path is None:
        return load_default_model(dtype=dtype)
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} is not a HuggingFace model directory (no config.json)")
    transformers = _require_transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, use_safetensors=True, dtype=_torch_dtype(dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model in {directory}: {exc}") from exc
    model.eval()
    bundled = directory.resolve() == bundled_model_dir()
    kind = KIND_BUNDLED if bundled else KIND_LOCAL
    label = ("ragkv's bundled model (trained on the synthetic recall task)" if bundled
             else f"local model {directory.name}")
    info = ModelInfo(name="ragkv-bundled" if bundled else directory.name, kind=kind, label=label,
                     path=str(directory.resolve()), parameters=sum(p.numel() for p in model.parameters()))
    return LoadedModel(model, tokenizer, info)


def load_default_model(*, dtype: str | None = None) -> LoadedModel:
    """The bundled model once its files exist, else the labelled random-initialised stand-in."""
    directory = bundled_model_dir()
    if bundled_model_available(directory):
        return load_model(directory, dtype=dtype)
    log.warning("the bundled model is not in %s yet: serving a %s", directory, RANDOM_MODEL_LABEL)
    return build_random_model()


def make_adapter(loaded: LoadedModel, start_token_id: int | None = None) -> Any:
    """The middleware's adapter for ``loaded``. Models without a BOS token chunk behind their EOS token
    (e.g. Qwen's ``<|endoftext|>``) unless ``start_token_id`` names another."""
    from ragkv.middleware.adapter import ModelAdapter

    tokenizer = loaded.tokenizer
    if start_token_id is None and getattr(tokenizer, "bos_token_id", None) is None and getattr(
            loaded.model.config, "bos_token_id", None) is None:
        start_token_id = getattr(tokenizer, "eos_token_id", None)
    return ModelAdapter(loaded.model, tokenizer, start_token_id=start_token_id)


__all__ = [
    "KIND_BUNDLED",
    "KIND_LOCAL",
    "KIND_RANDOM",
    "RANDOM_MODEL_LABEL",
    "LoadedModel",
    "ModelInfo",
    "build_random_model",
    "bundled_model_available",
    "bundled_model_dir",
    "load_default_model",
    "load_model",
    "make_adapter",
    "word_tokenizer",
]
