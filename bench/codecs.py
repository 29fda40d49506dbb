"""Codecs: size, speed and error of every codec and level on real-shaped KV, beside peers in the same run.

KV sources (each figure says which it is on; see ``codec_sources``): ``real`` (the headline), SmolLM2-135M-Instruct
over real English text, and ``random-init``, a random-initialised Qwen2.5-0.5B shape. The transform codec's
bases are fitted on held-out KV of the same source (other documents, other random ids): one per layer (the
default) and one shared by all layers, to measure which wins.

Per codec and level (transform levels 1-6 included): bytes vs fp16 and vs int8 (quant bits=8), bits per element,
encode and decode MB/s (MB = 10**6 bytes of fp16-equivalent KV) on 1 and 2 threads/processes, max and mean absolute
reconstruction error. Peers: zstd on fp16, int8+zstd, int4, and transformers' own quantized KV cache
(quanto, HQQ and FP8 backends; quanto and HQQ are measured when importable). Also: how cachegen's decode
scales with threads vs processes, and whether CacheGen's delta coding against anchor tokens helps.

    python bench/codecs.py            # full run (minutes)
    python bench/codecs.py --quick    # tiny sizes, for the smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from codec_experiments import delta_experiment, entropy_model_experiment, scaling_axis_experiment
from codec_sources import fit_bases, random_init_kv, real_calibration, real_kv
from harness import Report, parse_args, time_call

from ragkv.codecs import get_codec, set_decode_workers, start_decode_pool, stop_decode_pool
from ragkv.codecs.cachegen import level_summary
from ragkv.codecs.parallel import thread_map
from ragkv.codecs.transform import DEFAULT_LEVEL as TRANSFORM_DEFAULT_LEVEL
from ragkv.codecs.transform import LEVEL_BITS

MB = 1e6

# (label, codec name, params); the int8 row is the baseline of the "vs int8" column
SUITE: list[tuple[str, str, dict[str, Any]]] = [
    ("raw fp16", "raw", {}),
    ("zstd-3 fp16", "zstd", {"level": 3, "shuffle": False}),
    ("zstd-3 fp16 byte-shuffled", "zstd", {"level": 3, "shuffle": True}),
    ("int8 (KIVI)", "quant", {"bits": 8}),
    ("int8 (KIVI) + zstd-3", "quant", {"bits": 8, "zstd_level": 3}),
    ("int4 (KIVI)", "quant", {"bits": 4}),
    ("int4 (KIVI) + zstd-3", "quant", {"bits": 4, "zstd_level": 3}),
    ("cachegen level 1", "cachegen", {"level": 1}),
    ("cachegen level 2 (mid)", "cachegen", {"level": 2}),
    ("cachegen level 3", "cachegen", {"level": 3}),
]
INT8_LABEL = "int8 (KIVI)"
MID_LABEL = "cachegen level 2 (mid)"
TRANSFORM_DEFAULT_LABEL = f"transform level {TRANSFORM_DEFAULT_LEVEL}"


def transform_suite(bases: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Transform levels with the per-layer basis, and the default level with the basis shared by all layers."""
    rows = [(f"transform level {level}", "transform", {"level": level, "basis": bases["per layer"].digest})
            for level in sorted(LEVEL_BITS)]
    rows.append((f"transform level {TRANSFORM_DEFAULT_LEVEL}, one basis for all layers", "transform",
                 {"level": TRANSFORM_DEFAULT_LEVEL, "basis": bases["all layers"].digest}))
    return rows


# -- measurements ----------------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    set_decode_workers(n)
    if n > 1:
        start_decode_pool(wait=True)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median, best) seconds."""
    times = time_call(fn, repeat=repeat, warmup=1)
    return statistics.median(times), min(times)


def errors(out: torch.Tensor, kv: torch.Tensor) -> tuple[float, float]:
    err = (out.float() - kv.float()).abs()
    return float(err.max()), float(err.mean())


def measure_codec(kv: torch.Tensor, name: str, params: dict[str, Any], repeat: int) -> dict[str, Any]:
    codec = get_codec(name, params)
    shape, dtype = tuple(kv.shape), kv.dtype
    fp16_bytes = kv.numel() * 2
    result: dict[str, Any] = {}
    payload = codec.encode(kv, position=0)  # keys at positions 0 ..: the transform codec undoes RoPE there
    for threads in (1, 2):
        set_threads(threads)
        enc_med = timed(lambda: codec.encode(kv, position=0), repeat)[0]
        dec_med, dec_best = timed(lambda: codec.decode(payload, shape, dtype), repeat)
        result[f"encode_mbps_{threads}"] = fp16_bytes / MB / enc_med
        result[f"decode_mbps_{threads}"] = fp16_bytes / MB / dec_med
        result[f"decode_mbps_{threads}_best"] = fp16_bytes / MB / dec_best
    set_threads(1)
    assert codec.encode(kv, position=0) == payload, f"{name} {params}: encoding is not deterministic"
    out = codec.decode(payload, shape, dtype)
    result["bytes"] = len(payload)
    result["max_err"], result["mean_err"] = errors(out, kv)
    return result


# -- peers: transformers' own quantized KV cache ---------------------------------------------------------


def tensor_bytes(obj: Any) -> int:
    """Bytes held by a (possibly wrapped) quantized tensor: packed data, scales, zero-points."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def transformers_peers(kv: torch.Tensor, repeat: int, quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """transformers' QuantizedCache layers (their own _quantize/_dequantize) on every K and V tensor."""

    notes: list[str] = []
    candidates = [("transformers FP8 cache (e4m3, per-tensor scale)", "Fp8QuantizedLayer", {}, None)]
    if quick:
        return _run_peers(kv, candidates, repeat, notes + ["quick run: quanto and HQQ peers skipped"])
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        candidates.append(("transformers quantized cache, quanto int4 g64", "QuantoQuantizedLayer",
                           {"nbits": 4, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, 0))
        candidates.append(("transformers quantized cache, quanto int2 g64", "QuantoQuantizedLayer",
                           {"nbits": 2, "q_group_size": 64, "axis_key": 0, "axis_value": 0}, 0))
    else:
        notes.append("optimum-quanto not importable: quanto backend not measured")
    if importlib.util.find_spec("hqq"):
        candidates.append(("transformers quantized cache, HQQ int4 g64", "HQQQuantizedLayer",
                           {"nbits": 4, "q_group_size": 64, "axis_key": 1, "axis_value": 1}, 1))
    else:
        notes.append("hqq not importable: HQQ backend not measured")
    return _run_peers(kv, candidates, repeat, notes)


def _run_peers(kv: torch.Tensor, candidates: list[tuple[str, str, dict[str, Any], int | None]], repeat: int,
               notes: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    from transformers import cache_utils

    rows = []
    L = kv.shape[0]
    tensors = [kv[i, j][None].contiguous() for i in range(L) for j in range(2)]  # [1, H, T, D] each
    for label, cls_name, kwargs, axis in candidates:
        cls = getattr(cache_utils, cls_name, None)
        if cls is None:
            notes.append(f"{cls_name} missing from this transformers: {label} not measured")
            continue
        try:
            rows.append(_measure_peer(kv, tensors, label, cls(**kwargs), axis, 1 if "HQQ" in label else repeat))
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            notes.append(f"{label}: failed on CPU ({type(exc).__name__}: {exc})")
    return rows, notes


def _measure_peer(kv: torch.Tensor, tensors: list[torch.Tensor], label: str, layer: Any, axis: int | None,
                  repeat: int) -> dict[str, Any]:
    """One transformers quantized-cache layer's own _quantize/_dequantize over every K and V tensor."""
    if axis is None:  # FP8: per-tensor scale, no axis
        layer.dtype = kv.dtype

        def quantize(t: torch.Tensor) -> Any:
            return layer._quantize(t)
    else:
        layer.keys = tensors[0]  # HQQ reads the device and dtype from here
        layer.dtype, layer.device = kv.dtype, kv.device

        def quantize(t: torch.Tensor) -> Any:
            return layer._quantize(t, axis)

    encoded: list[Any] = []

    def encode_all() -> None:
        encoded[:] = [quantize(t) for t in tensors]

    def decode_all() -> list[torch.Tensor]:
        return [layer._dequantize(q) for q in encoded]

    fp16_bytes = kv.numel() * 2
    result: dict[str, Any] = {"label": label}
    for threads in (1, 2):
        set_threads(threads)
        result[f"encode_mbps_{threads}"] = fp16_bytes / MB / timed(encode_all, repeat)[0]
        result[f"decode_mbps_{threads}"] = fp16_bytes / MB / timed(decode_all, repeat)[0]
    set_threads(1)
    encode_all()
    out = torch.stack([d[0] for d in decode_all()]).view(kv.shape).to(kv.dtype)
    result["bytes"] = sum(tensor_bytes(q) for q in encoded)
    result["max_err"], result["mean_err"] = errors(out, kv)
    return result


# -- cachegen decode: threads vs processes ---------------------------------------------------------------


def _helper_cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of processes (Linux /proc), 0 where unreadable."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def decode_scaling(kv: torch.Tensor, repeat: int) -> tuple[list[list[Any]], dict[str, float]]:
    """cachegen mid decode in-process, with 2 threads (constriction holds the GIL), and with the
    process pool (caller + 1 helper sharing units through shared memory). Wall time on a shared machine
    depends on what else runs, so the CPU time each way takes is measured too: it says what the
    decode costs, whatever the load."""
    import ragkv.codecs.cachegen as cg
    from ragkv.codecs.decode_pool import get_pool

    codec = get_codec("cachegen", {"level": 2})
    payload = codec.encode(kv)
    shape, dtype = tuple(kv.shape), kv.dtype
    fp16_bytes = kv.numel() * 2
    reps = max(repeat, 3)
    rows = []
    set_threads(1)
    cpu0 = time.process_time()
    single = timed(lambda: codec.decode(payload, shape, dtype), reps)
    single_cpu = (time.process_time() - cpu0) / (reps + 1)
    rows.append(["1 process (in-process)", fp16_bytes / MB / single[0], fp16_bytes / MB / single[1], 1.0,
                 single_cpu * 1e3])

    # two threads sharing the units of one decode
    view = memoryview(payload)
    L = shape[0]
    table = np.frombuffer(payload, "<u8", L + 1)
    base = 8 * (L + 1)
    heads, tokens, dim = shape[2], shape[3], shape[4]
    per_unit = tokens * heads * dim
    plans = [codec._plan_layer(view, base + int(table[i]), base + int(table[i + 1]), i, L, heads, tokens, dim,
                               2 * i * per_unit, dtype) for i in range(L)]
    units = [u for lp in plans for u in lp.units]
    scales = [s for lp in plans for s in lp.scales]
    sides = [s for lp in plans for s in lp.sides]
    symbols = np.empty(len(units) * per_unit, np.uint8)
    out = torch.empty(shape, dtype=dtype)

    def threaded() -> None:
        def work(j: int) -> None:
            cg.decode_unit_task(view, symbols, units, j, sides[j])
            cg._dequantize(symbols, units[j], scales[j], heads, dim, out[j // 2, j % 2],
                           plans[j // 2].key_channels if j % 2 == 0 else None)
        thread_map(work, len(units), workers=2)

    cpu0 = time.process_time()
    threads = timed(threaded, reps)
    threads_cpu = (time.process_time() - cpu0) / (reps + 1)
    rows.append(["2 threads (one process)", fp16_bytes / MB / threads[0], fp16_bytes / MB / threads[1],
                 single[0] / threads[0], threads_cpu * 1e3])
    set_threads(2)
    pool = get_pool(1)
    helpers = [p.pid for p in pool._procs] if pool is not None else []
    cpu0, helper0 = time.process_time(), _helper_cpu_seconds(helpers)
    pooled = timed(lambda: codec.decode(payload, shape, dtype), reps)
    pooled_cpu = (time.process_time() - cpu0 + _helper_cpu_seconds(helpers) - helper0) / (reps + 1)
    rows.append(["2 processes (caller + 1 helper, shared memory)", fp16_bytes / MB / pooled[0],
                 fp16_bytes / MB / pooled[1], single[0] / pooled[0], pooled_cpu * 1e3])
    set_threads(1)
    cpu = {"single_cpu_s": single_cpu, "pool_cpu_s": pooled_cpu,
           "mbps_per_cpu_second": fp16_bytes / MB / single_cpu,
           "pool_cpu_efficiency": single_cpu / pooled_cpu,
           "projected_2core_mbps": 2 * fp16_bytes / MB / pooled_cpu}
    return rows, cpu


# -- the run ---------------------------------------------------------------------------------------------


def run_source(report: Report, tag: str, kv: torch.Tensor, what: str, repeat: int, quick: bool,
               suite: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    print(f"\n[{tag}] {what}: kv {tuple(kv.shape)} {kv.dtype}", flush=True)
    n = kv.numel()
    fp16_bytes = n * 2
    results = {}
    for label, name, params in suite:
        results[label] = measure_codec(kv, name, params, repeat)
        r = results[label]
        print(f"  {label:28s} {fp16_bytes / r['bytes']:6.2f}x  dec1 {r['decode_mbps_1']:7.1f}  "
              f"dec2 {r['decode_mbps_2']:7.1f} MB/s", flush=True)
    peers, peer_notes = transformers_peers(kv, repeat, quick)
    int8_bytes = results[INT8_LABEL]["bytes"]
    columns = ["codec", "bytes", "x vs fp16", "x vs int8", "bits/elem", "enc MB/s 1t", "enc MB/s 2t",
               "dec MB/s 1t", "dec MB/s 2t", "max err", "mean err"]
    rows = []
    for label, r in list(results.items()) + [(p["label"], p) for p in peers]:
        rows.append([label, r["bytes"], fp16_bytes / r["bytes"], int8_bytes / r["bytes"], 8 * r["bytes"] / n,
                     r["encode_mbps_1"], r["encode_mbps_2"], r["decode_mbps_1"], r["decode_mbps_2"],
                     r["max_err"], r["mean_err"]])
    report.table(f"[{tag}] codecs on {what}, fp16 KV {tuple(kv.shape)}; MB = 1e6 bytes of fp16-equivalent KV, "
                 f"median of {repeat}", columns, rows)
    for note in peer_notes:
        report.note(f"[{tag}] {note}")
    return {"results": results, "peers": peers, "int8_bytes": int8_bytes, "fp16_bytes": fp16_bytes, "n": n}


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tokens", type=int, default=1024)
        parser.add_argument("--repeat", type=int, default=5)

    args = parse_args(__doc__.splitlines()[0], extra)
    repeat = 1 if args.quick else args.repeat
    report = Report("codecs", quick=args.quick, out=args.out)
    torch.set_num_threads(1)

    kv, what = real_kv(64 if args.quick else args.tokens)
    report.setup["kv_real"] = what
    samples, inv_freq = real_calibration(4 if args.quick else 64)
    bases = fit_bases(samples, inv_freq)
    report.setup["transform_basis_real"] = (f"fitted on {len(samples)} held-out documents "
                                            f"({sum(s.shape[3] for s, _ in samples)} tokens), one basis per layer; "
                                            f"level budgets (bits/element) {LEVEL_BITS}")
    report.setup["kv_dtype"] = "float16"
    report.setup["bins_per_level"] = {str(k): v for k, v in level_summary(kv.shape[0]).items()}
    report.setup["threads"] = "1 and 2: torch.set_num_threads(n) and ragkv.codecs.set_decode_workers(n)"
    report.setup["load_average_at_start"] = list(os.getloadavg())
    main_run = run_source(report, "real", kv, what, repeat, args.quick, SUITE + transform_suite(bases))
    res, int8, n = main_run["results"], main_run["int8_bytes"], main_run["n"]
    mid = res[MID_LABEL]
    report.figure("cachegen_mid_vs_int8", int8 / mid["bytes"])
    report.figure("cachegen_mid_bits_per_element", 8 * mid["bytes"] / n)
    report.figure("cachegen_decode_mbps_2threads", mid["decode_mbps_2"])
    report.figure("cachegen_decode_mbps_1thread", mid["decode_mbps_1"])
    report.figure("cachegen_mid_vs_fp16", main_run["fp16_bytes"] / mid["bytes"])
    report.figure("cachegen_mid_mean_abs_error", mid["mean_err"])
    report.figure("int8_mean_abs_error", res[INT8_LABEL]["mean_err"])
    report.note("headline figures (cachegen_*, transform_*) are on real KV: SmolLM2-135M-Instruct over English text")
    transform = res[TRANSFORM_DEFAULT_LABEL]
    report.figure("transform_decode_mbps_2cores", transform["decode_mbps_2"])
    report.figure("transform_decode_mbps_1core", transform["decode_mbps_1"])
    report.figure("transform_default_vs_int8", int8 / transform["bytes"])
    shared = res[f"{TRANSFORM_DEFAULT_LABEL}, one basis for all layers"]
    report.figure("transform_shared_basis_bytes_vs_per_layer", shared["bytes"] / transform["bytes"])
    report.figure("transform_shared_basis_error_vs_per_layer", shared["mean_err"] / transform["mean_err"])
    for level in sorted(LEVEL_BITS):
        r = res[f"transform level {level}"]
        report.figure(f"transform_level{level}_vs_int8", int8 / r["bytes"])
        report.figure(f"transform_level{level}_bits_per_element", 8 * r["bytes"] / n)

    scaling, cpu = decode_scaling(kv, repeat)
    report.table("[real] cachegen mid decode: threads vs processes (MB/s fp16-equivalent; CPU ms = "
                 "CPU time of all processes per decode)",
                 ["how", "median MB/s", "best MB/s", "speed-up (median)", "CPU ms"], scaling)
    report.figure("cachegen_decode_pool_speedup", scaling[2][3])
    report.figure("cachegen_decode_threads_speedup", scaling[1][3])
    report.figure("cachegen_decode_mbps_per_cpu_second", cpu["mbps_per_cpu_second"])
    report.figure("cachegen_decode_pool_cpu_efficiency", cpu["pool_cpu_efficiency"])
    report.figure("cachegen_decode_mbps_2cores_projected", cpu["projected_2core_mbps"])
    report.note("cachegen_decode_mbps_2cores_projected = 2 x fp16 MB / CPU seconds the pooled decode used "
                "(caller + helper): the 2-process throughput when both cores are free; wall-clock figures "
                "depend on the other work sharing this machine's 2 cores (load average in setup)")

    models = [[level, *entropy_model_experiment(kv, bases["per layer"], level).values()] for level in (1, 3, 6)]
    report.table("[real] transform entropy models: the basis' stored per-width models (shipped) vs the ideal "
                 "adaptive model (each chunk's own histograms, table cost not counted), bits per element",
                 ["level", "stored models", "ideal adaptive (lower bound)"], models)
    report.figure("transform_stored_vs_ideal_adaptive_bits_level3", models[1][1] / models[1][2])
    axis = scaling_axis_experiment(kv)
    report.table("[real] why cachegen erred: keys coded with per-token scales alone (format 1) vs normalised per "
                 "channel first (format 2), real ANS streams, the channel block counted",
                 ["keys", "bins", "bits/elem", "relative error"], axis)
    for row in axis:
        if row[1] == 32:
            report.figure(f"cachegen_keys_32bins_relative_error_{row[0].split()[0]}", row[3])
    delta = delta_experiment(kv)
    report.table("[real] delta coding against anchor tokens (every 10), cachegen mid bins",
                 ["scheme", "bits/elem", "mean abs err"],
                 [["direct (per-token scales, format 1)", delta["direct_bits"], delta["direct_mean_err"]],
                  ["symbol delta vs anchor (same reconstruction)", delta["symbol_delta_bits"], delta["direct_mean_err"]],
                  ["value delta vs reconstructed anchor (paper)", delta["value_delta_bits"],
                   delta["value_delta_mean_err"]]])
    report.figure("delta_symbol_vs_direct_bits", delta["symbol_delta_bits"] / delta["direct_bits"])
    report.figure("delta_value_vs_direct_bits", delta["value_delta_bits"] / delta["direct_bits"])

    if args.quick:
        report.note("quick run: random-init KV skipped")
    else:  # the comparison source: how differently random-initialised KV compresses
        rkv, rwhat, rsamples, rinv = random_init_kv(args.quick, args.tokens)
        report.setup["kv_random_init"] = rwhat
        rbases = fit_bases(rsamples, rinv)
        rrun = run_source(report, "random-init", rkv, rwhat, repeat, args.quick, SUITE + transform_suite(rbases))
        rmid = rrun["results"][MID_LABEL]
        report.figure("random_init_cachegen_mid_vs_int8", rrun["int8_bytes"] / rmid["bytes"])
        report.figure("random_init_cachegen_mid_bits_per_element", 8 * rmid["bytes"] / rrun["n"])
        report.figure("random_init_cachegen_decode_mbps_2threads", rmid["decode_mbps_2"])
    stop_decode_pool()
    report.setup["load_average_at_end"] = list(os.getloadavg())
    report.write()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"took {time.perf_counter() - start:.0f} s")
