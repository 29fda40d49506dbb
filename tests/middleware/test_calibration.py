"""Calibration: measure rules against full prefill, store the cheapest meeting the target per model, and have
``blend`` (without arguments) and ``auto`` (quality-aware) use it."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ragkv.kvstore.errors import ConfigError
from ragkv.kvstore.tiers import HostConfig, HostTier
from ragkv.middleware import BlendConfig, ContextEngine, ModelAdapter, PrepareRequest
from ragkv.middleware.calibration import (
    EVERYTHING,
    Calibration,
    CalibrationPoint,
    calibrate,
    calibration_path,
    load_calibration,
)
from ragkv.middleware.controller import AutoConfig

ATOL = 1e-4
CHEAP = ("boundary k=1", BlendConfig(ratio=0.0, check_layers=(), boundary_tokens=1))
EXACT = ("stored 1.0", BlendConfig(ratio=1.0, rule="stored", check_layers=()))


@pytest.fixture()
def requests_(make_words):
    return [PrepareRequest(query=make_words(i, 4), chunks=[make_words(10 + i, 12), make_words(30 + i, 9)],
                           system=make_words(90, 3)) for i in range(3)]


def test_calibration_measures_agreement_and_cost(host_engine, requests_):
    calibration = calibrate(host_engine, requests_, candidates=[CHEAP, EXACT], tokens=4)
    assert calibration.fingerprint == str(host_engine.adapter.fingerprint) and calibration.prompts == 3
    cheap, exact = calibration.points
    assert exact.agreement == 1.0  # budget 100% equals full, so every greedy answer is the same
    assert exact.compute_share > cheap.compute_share > 0
    assert exact.cached_share == pytest.approx(1.0) and cheap.cached_share == pytest.approx(2 / 21)
    expected = CHEAP[0] if cheap.agreement >= 0.95 else EXACT[0]
    assert calibration.choice is not None and calibration.choice.name == expected


def test_round_trip_stores_and_reuses_the_choice(host_engine, requests_, tmp_path, word_tokenizer, model_factory):
    calibration = calibrate(host_engine, requests_, candidates=[CHEAP, EXACT], tokens=4, target=0.3)
    path = calibration.save(tmp_path)
    assert path == calibration_path(tmp_path, str(host_engine.adapter.fingerprint))
    loaded = load_calibration(tmp_path, str(host_engine.adapter.fingerprint))
    assert loaded == calibration
    # a new engine on the same model: blend without arguments uses the stored choice
    engine = ContextEngine(ModelAdapter(model_factory("llama", seed=1, layers=4), word_tokenizer),
                           HostTier(HostConfig()))
    engine.use_calibration(load_calibration(tmp_path, str(engine.adapter.fingerprint)))
    assert engine.strategy("blend").config == loaded.default_blend() == loaded.choice.config
    prepared = engine.prepare(requests_[0], "blend")
    assert prepared.details["rule"] == loaded.choice.config.rule
    engine.use_calibration(None)
    assert engine.strategy("blend").config == BlendConfig()


def test_no_configuration_meeting_the_target_recomputes_everything(host_engine, requests_):
    point = CalibrationPoint("boundary k=1", CHEAP[1], agreement=0.5, compute_share=0.2, cached_share=0.1)
    calibration = Calibration(str(host_engine.adapter.fingerprint), 0.95, 4, 3, (point,))
    assert calibration.choice is None and calibration.default_blend() == EVERYTHING
    host_engine.use_calibration(calibration)
    host_engine.warm(requests_[0].chunks)
    full = host_engine.prepare(requests_[0], "full")
    for name in ("blend", "auto"):
        prepared = host_engine.prepare(requests_[0], name)
        assert (prepared.logits - full.logits).abs().max() <= ATOL, name
    auto = host_engine.prepare(requests_[0], "auto")
    assert auto.details["choice"]["name"] == "recompute everything"
    assert all(c.source == "text" for c in auto.chunks)


def test_auto_meets_the_target_at_the_least_predicted_time(host_engine, requests_):
    fp = str(host_engine.adapter.fingerprint)
    cheap = CalibrationPoint("boundary k=1", CHEAP[1], agreement=0.9, compute_share=0.2, cached_share=0.1)
    dear = CalibrationPoint("stored 1.0", EXACT[1], agreement=1.0, compute_share=1.0, cached_share=1.0)
    host_engine.warm(requests_[0].chunks)
    host_engine.costs.load_bytes_per_s["host"] = 1e12  # loading is free: compute decides
    host_engine.use_calibration(Calibration(fp, 0.85, 4, 3, (cheap, dear)))
    chosen = host_engine.prepare(requests_[0], "auto").details["choice"]
    assert chosen["calibrated"] and chosen["name"] == "boundary k=1" and chosen["target"] == 0.85
    stricter = host_engine.prepare(requests_[0], host_engine.strategy("auto", AutoConfig(target_agreement=0.95)))
    assert stricter.details["choice"]["name"] == "stored 1.0" and stricter.details["rule"] == "stored"
    host_engine.use_calibration(None)
    assert host_engine.prepare(requests_[0], "auto").details["choice"]["calibrated"] is False


def test_a_calibration_for_another_model_is_refused(host_engine, tmp_path):
    other = Calibration("0123abcd", 0.95, 4, 3, ())
    with pytest.raises(ConfigError, match="another model"):
        host_engine.use_calibration(other)
    other.save(tmp_path)
    assert load_calibration(tmp_path, str(host_engine.adapter.fingerprint)) is None


@pytest.mark.parametrize("edit", [
    lambda d: d.update(version=2),
    lambda d: d["points"][0].update(agreement=1.5),
    lambda d: d["points"][0]["config"].update(rule="nope"),
    lambda d: d["points"][0]["config"].update(extra=1),
    lambda d: d.update(prompts=True),
    lambda d: d.update(fingerprint="another"),
], ids=["version", "agreement", "rule", "unknown field", "boolean prompts", "fingerprint"])
def test_an_invalid_file_is_ignored(host_engine, tmp_path, edit):
    fp = str(host_engine.adapter.fingerprint)
    point = CalibrationPoint(*CHEAP, agreement=1.0, compute_share=0.2, cached_share=0.1)
    path = Calibration(fp, 0.95, 4, 3, (point,)).save(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    assert load_calibration(tmp_path, fp) is None
    path.write_text('{"version": 1, "target": NaN}')
    assert load_calibration(tmp_path, fp) is None


def test_saving_refuses_what_it_could_not_read_back(host_engine):
    from ragkv.middleware.selective import RandomSelector

    point = CalibrationPoint("custom", replace(BlendConfig(), selector=RandomSelector()), 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="named selector"):
        Calibration(str(host_engine.adapter.fingerprint), 0.95, 4, 3, (point,)).to_dict()
