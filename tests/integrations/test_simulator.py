"""The cache-sizing simulator: traces, the store's own placement and eviction over modelled tiers, the TTFT
model, sweeps, the CLI, measured costs and the service's trace recording."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragkv.integrations.cli import main as cli_main
from ragkv.integrations.sim_trace import TraceRecorder, TraceRequest, read_trace, write_trace, zipf_trace
from ragkv.integrations.simulator import SimCosts, Simulator, modelled_tiers, sweep
from ragkv.kvstore import ConfigError

KV_PER_TOKEN = 1008  # bytes of decoded KV per token in these tests (a stand-in's exact multiple of 16)
COSTS = SimCosts(model="test", kv_bytes_per_token=KV_PER_TOKEN, fixed_s=0.01, prompt_s_per_token=0.001,
                 compute_s_per_token=0.002, load_s_per_byte={"host": 0.0, "disk": 1e-6},
                 load_latency_s={"disk": 0.005}, size_ratio={"raw": 1.0, "cachegen": 0.5})


def _cycle(ids: list[str], rounds: int, tokens: int = 100) -> list[TraceRequest]:
    return [TraceRequest(float(i), ((f"c{c}", tokens),), query_tokens=0)
            for i, c in enumerate(ids * rounds)]


def test_lru_thrashes_a_cycle_one_chunk_larger_than_the_tier(tmp_path: Path) -> None:
    small = Simulator(modelled_tiers("host:250KB"), COSTS).run(_cycle(["a", "b", "c"], 4))  # room for 2 of 3
    assert small.misses == 12 and small.hits == [0]
    fits = Simulator(modelled_tiers("host:350KB"), COSTS).run(_cycle(["a", "b", "c"], 4))
    assert fits.misses == 3 and fits.hits == [9]


def test_a_slower_tier_serves_what_the_faster_evicted_and_promotes_it(tmp_path: Path) -> None:
    result = Simulator(modelled_tiers(f"host:250KB,disk:{tmp_path}:1MB"), COSTS).run(_cycle(["a", "b", "c"], 3))
    assert result.misses == 3 and result.hits == [0, 6]  # LRU in host: every repeat comes from disk
    assert result.bytes_read == [0, 6 * 100 * KV_PER_TOKEN]
    assert result.bytes_written[0] == 9 * 100 * KV_PER_TOKEN  # 3 misses + 6 promotions
    assert result.summary()["hit_rate"] == {"host": 0.0, "disk": 6 / 9}


def test_a_codec_size_ratio_stretches_a_tiers_capacity(tmp_path: Path) -> None:
    raw = Simulator(modelled_tiers(f"disk:{tmp_path}:200KB?codec=raw"), COSTS).run(_cycle(["a", "b", "c"], 3))
    coded = Simulator(modelled_tiers(f"disk:{tmp_path}:200KB?codec=cachegen"), COSTS).run(_cycle(["a", "b", "c"], 3))
    assert raw.misses == 9 and coded.misses == 3  # half the size per chunk: 3 chunks fit in 200 KB


def test_the_ttft_model(tmp_path: Path) -> None:
    tiers = modelled_tiers(f"host:1KB,disk:{tmp_path}:1GB")
    trace = [TraceRequest(0.0, (("a", 100),), query_tokens=20), TraceRequest(1.0, (("a", 100),), query_tokens=20)]
    first, second = Simulator(tiers, COSTS).run(trace).ttft_s
    assert first == pytest.approx(0.01 + 120 * 0.001 + 100 * 0.002)  # a miss: computed before the pass
    load = 0.005 + 100 * KV_PER_TOKEN * 1e-6  # from disk, overlapping the 0.12 s pass
    assert second == pytest.approx(0.01 + max(120 * 0.001, load))


def test_stand_ins_allocate_nothing() -> None:
    chunk = Simulator(modelled_tiers("host:1GB"), COSTS)._stand_in(5000)
    assert 5000 * KV_PER_TOKEN <= chunk.nbytes < 1.01 * 5000 * KV_PER_TOKEN
    assert chunk.kv.untyped_storage().nbytes() == 8


def test_zipf_traces_are_skewed_deterministic_and_round_trip(tmp_path: Path) -> None:
    trace = zipf_trace(400, 50, per_request=3, alpha=1.2, seed=3)
    assert trace == zipf_trace(400, 50, per_request=3, alpha=1.2, seed=3)
    counts: dict[str, int] = {}
    for r in trace:
        assert len({c for c, _ in r.chunks}) == 3
        for c, _ in r.chunks:
            counts[c] = counts.get(c, 0) + 1
    assert max(counts.values()) > 4 * (1200 / 50)  # the most popular chunk far above a uniform share
    path = tmp_path / "t.jsonl"
    with open(path, "w") as f:
        write_trace(trace, f)
    assert read_trace(path) == trace
    assert [n for _, n in zipf_trace(2, 3, 1, sizes=[7, 8, 9])[0].chunks][0] in (7, 8, 9)


@pytest.mark.parametrize("line", ['not json', '{"t": -1, "chunks": [["a", 3]]}', '{"t": 1, "chunks": []}',
                                  '{"t": 1, "chunks": [["a b", 3]]}', '{"t": 1, "chunks": [["a", 0]]}',
                                  '{"t": 1, "chunks": [["a:b:c", 3]]}', '[1, 2]'])
def test_a_malformed_trace_line_is_refused_by_number(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "chunks": [["ok", 3]]}\n' + line + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_trace(path)


def test_sweep_and_the_command_line(tmp_path: Path, capsys: Any) -> None:
    trace = zipf_trace(200, 40, seed=1)
    rows = sweep(trace, f"host:1MB,disk:{tmp_path}:10MB", COSTS, {"host": [1 << 20, 4 << 20], "disk": [5 << 20]})
    assert [r["sizes"] for r in rows] == [{"host": 1 << 20, "disk": 5 << 20}, {"host": 4 << 20, "disk": 5 << 20}]
    assert rows[1]["hit_rate"]["host"] > rows[0]["hit_rate"]["host"]
    trace_file, costs_file, plot = tmp_path / "t.jsonl", tmp_path / "costs.json", tmp_path / "sweep.png"
    costs_file.write_text(json.dumps(COSTS.to_dict()))
    assert cli_main(["trace", "zipf", "--requests", "50", "--chunks", "20", "--out", str(trace_file)]) == 0
    capsys.readouterr()
    assert cli_main(["simulate", "--trace", str(trace_file), "--tiers", f"host:1MB,disk:{tmp_path}:5MB",
                     "--costs", str(costs_file), "--sweep", "host=1MB,2MB", "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 2 and plot.stat().st_size > 1000
    assert cli_main(["simulate", "--trace", str(trace_file), "--tiers", "host:1MB", "--costs", str(costs_file),
                     "--plot", str(plot)]) == 2  # a plot needs a sweep


def test_costs_measured_with_the_real_engine(tmp_path: Path, tiny_loaded: Any) -> None:
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.integrations.sim_costs import measure_costs
    from ragkv.kvstore import TieredStore

    texts = [" ".join(f"k{(i * 3 + j) % 64} v{j}" for j in range(10 + 4 * i)) for i in range(4)]
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, use_calibration=False) as runtime:
        costs = measure_costs(runtime, f"host:1GB,disk:{tmp_path}:1GB?codec=zstd", texts, repeats=1)
        a = runtime.adapter
    assert costs.kv_bytes_per_token == a.num_layers * 2 * a.num_kv_heads * a.head_dim * 4
    assert costs.compute_s_per_token > 0 and costs.prompt_s_per_token + costs.fixed_s > 0
    assert costs.load_s_per_byte["disk"] + costs.load_latency_s["disk"] > 0
    assert 0 < costs.size_ratio["zstd"] < 1.2 and SimCosts.from_dict(costs.to_dict()) == costs
    with pytest.raises(ConfigError):
        SimCosts.from_dict({**costs.to_dict(), "fixed_s": -1})


def test_the_recorder_writes_a_readable_trace(tmp_path: Path) -> None:
    times = iter([10.0, 10.5, 12.0])
    recorder = TraceRecorder(tmp_path / "rec.jsonl", clock=lambda: next(times))
    recorder.record("alice", [("alice:ab12", 40), ("shared:cd34", 60)], 12)
    recorder.record("alice", [], 5)  # no documents: nothing to replay
    recorder.record("bob", [("bob:ef56", 7)], 3)
    recorder.close()
    trace = read_trace(tmp_path / "rec.jsonl")
    assert [(r.t, r.namespace, r.chunks) for r in trace] == [
        (0.5, "alice", (("alice:ab12", 40), ("shared:cd34", 60))), (2.0, "bob", (("bob:ef56", 7),))]


def test_the_replay_matches_a_real_run_request_by_request(tmp_path: Path, tiny_loaded: Any) -> None:
    from ragkv.integrations.answers import AnswerRequest, Document, GenerationOptions
    from ragkv.integrations.runtime import RagRuntime
    from ragkv.kvstore import TieredStore

    texts = [" ".join(f"k{(7 * i + j) % 64} v{(3 * i + 5 * j) % 64} ;" for j in range(6 + i % 3)) for i in range(12)]
    with RagRuntime(tiny_loaded, TieredStore("host:64MB"), own_store=True, use_calibration=False) as probe:
        sizes = [len(probe.chunk_tokens(t)) for t in texts]
        per_token = probe.chunk_bytes(1)
    spec = f"host:{3 * max(sizes) * per_token},disk:{tmp_path}/disk:{7 * max(sizes) * per_token + 50_000}"
    trace = zipf_trace(20, 12, per_request=4, seed=5, sizes=sizes)
    costs = SimCosts(model="tiny", kv_bytes_per_token=per_token, fixed_s=0.0, prompt_s_per_token=0.0,
                     compute_s_per_token=0.0, load_s_per_byte={}, size_ratio={"raw": 1.0})
    real: list[tuple[int, int, int]] = []
    with RagRuntime(tiny_loaded, TieredStore(spec), own_store=True, use_calibration=False) as runtime:
        for request in trace:
            answer = runtime.answer(AnswerRequest(query="Q k1 ?", generation=GenerationOptions(max_new_tokens=1),
                                                  documents=[Document(text=texts[int(c[1:])]) for c, _ in request.chunks]))
            tiers = [d.tier if d.hit else None for d in answer.documents]
            real.append((tiers.count("host"), tiers.count("disk"), tiers.count(None)))
    simulated = []
    for k in range(1, len(trace) + 1):
        result = Simulator(modelled_tiers(spec), costs).run(trace[:k])
        simulated.append((result.hits[0], result.hits[1], result.misses))
    deltas = [tuple(b - a for a, b in zip((0, 0, 0) if k == 0 else simulated[k - 1], s))
              for k, s in enumerate(simulated)]
    assert deltas == real and sum(r[1] for r in real) > 0 and sum(r[0] for r in real) > 0
