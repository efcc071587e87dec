"""TURBO where it matters: long histories and deep models (`climber bench serve-long`).

1. Cost against history length n: one request's latency cold (history encoded in the call)
   and warm (history K/V cached, M candidates scored), and the history encode alone, for
   ASTRO, HSTU-style and SASRec-style at the same depth and width (sizes m and l of the shared
   ladder), n in {256, ..., 4096}. One log-log plot per family.
2. At size l, n = 1024: batched SUMI vs per-pair scoring (cold and warm) and a one-event
   incremental update vs a full re-encode, each measured ratio printed beside the model's
   FLOP ratio, so a reader can tell the implementation's overhead from the arithmetic.

Every ratio is two paths timed side by side in one run (best-of-N, in turns, see
bench.serve_common.best_seconds); `device` runs the same code on CUDA (bf16, SDPA: the serving
configuration there) for `climber bench gpu`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from bench.serve_common import N_TRACKS, best_seconds, console, mixed_batch, prefix, random_sequence, repeat_rows
from ranker.batch import random_batch
from ranker.models import build_model
from ranker.models.config import DEFAULT_SIZES
from ranker.serving.cache import HistoryBuffer, history_batch
from ranker.serving.incremental import extend_history
from ranker.serving.ranker import prepare_for_serving

LENGTHS = (256, 512, 1024, 2048, 4096)
FAMILIES = ("astro", "hstu", "sasrec")
GOALS = {"astro_vs_hstu_cold_at_4096": 2.0, "ratio_of_flop_ratio": 0.7, "incremental": 30.0}


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn, waiting for the device to finish (CUDA kernels run asynchronously)."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def timed(fns: dict[str, Callable[[], object]], device: torch.device, **kwargs) -> dict[str, float]:
    return best_seconds({name: synced(fn, device) for name, fn in fns.items()}, **kwargs)


def long_model(family: str, size: str, max_len: int, device: torch.device, **overrides) -> torch.nn.Module:
    """An untrained model (weights do not change cost) in the serving configuration of
    `device`, at the shared ladder's depth and width for `size`: ASTRO's ladder is one layer
    shallower than HSTU's from m on, and the comparison is at the same depth and width.
    `family` may carry a variant label, "astro@3g": the model is the family's."""
    torch.manual_seed(0)
    shape = DEFAULT_SIZES[size]
    model = build_model(base_family(family), size, N_TRACKS,
                        **{**shape, "dropout": 0.0, "max_len": max_len, **overrides})
    return prepare_for_serving(model, device)


def base_family(label: str) -> str:
    """"astro@3g" -> "astro": a label names a variant (its own --set overrides) of a family."""
    return label.partition("@")[0]


def block_lengths(model, batch) -> list[int] | None:
    """ASTRO's tokens per block for the first request of `batch` (None for one-block families)."""
    if not hasattr(model, "block_membership"):
        return None
    return [int(x) for x in model.block_membership(batch)[0].sum(0)]


def request_flops(model, batch, n: int, M: int) -> int:
    """Analytic FLOPs of this request: ASTRO's with the batch's real block lengths (the
    history's behaviour mix decides them), not an even split."""
    lengths = block_lengths(model, batch)
    if lengths is None:
        return model.flops_per_request(n, M)
    return sum(model.flops_breakdown(n, M, lengths).values())


# ----------------------------------------------------------------------------- 1. cost against n

def bench_lengths(sizes: tuple[str, ...], ns: tuple[int, ...], M: int, device: torch.device,
                  families: tuple[str, ...] = FAMILIES, min_seconds: float = 1.0, min_reps: int = 2,
                  overrides: dict[str, dict[str, Any]] | None = None, mix: str = "sandbox") -> list[dict]:
    """Cold, warm and encode latency (wall, and CPU per call) per (family, size, n); at each
    (size, n) the families are timed in turns, so a ratio between families is side by side
    too. `families` may hold variant labels ("astro@3g"); `overrides`: config fields per
    label (e.g. {"astro@3g": {"behaviour_groups": ...}}). `mix`: the histories' behaviour
    and scenario mix (bench.serve_common.HISTORY_MIXES), which sets ASTRO's block lengths."""
    rows = []
    for size in sizes:
        models = {family: long_model(family, size, max(ns), device, **(overrides or {}).get(family, {}))
                  for family in families}
        for n in ns:
            batch = mixed_batch(n, M, seed=n, mix=mix).to(device)
            fns: dict[str, Callable[[], object]] = {}
            cpu: dict[str, float] = {}
            with torch.inference_mode():
                caches = {family: model.encode_history(batch) for family, model in models.items()}
                for family, model in models.items():
                    fns[f"{family}/cold"] = lambda m=model: m(batch)
                    fns[f"{family}/warm"] = lambda m=model, c=caches[family]: m.score_candidates(c, batch)
                    fns[f"{family}/encode"] = lambda m=model: m.encode_history(batch)
                t = timed(fns, device, min_seconds=min_seconds, min_reps=min_reps, max_reps=50, cpu=cpu)
                blocks = {family: block_lengths(model, batch) for family, model in models.items()}
            for family, model in models.items():
                rows.append({"family": family, "size": size, "n": n, "M": M, "n_layers": model.config.n_layers,
                             "d_model": model.config.d_model, "mix": mix, "block_lengths": blocks[family],
                             "cold_ms": 1e3 * t[f"{family}/cold"], "warm_ms": 1e3 * t[f"{family}/warm"],
                             "encode_ms": 1e3 * t[f"{family}/encode"], "cold_cpu_ms": 1e3 * cpu[f"{family}/cold"],
                             "warm_cpu_ms": 1e3 * cpu[f"{family}/warm"], "encode_cpu_ms": 1e3 * cpu[f"{family}/encode"],
                             "cold_mflops": request_flops(model, batch, n, M) / 1e6,
                             "encode_mflops": request_flops(model, batch, n, 0) / 1e6})
            line = ", ".join(f"{r['family']} {r['cold_ms']:.1f}" for r in rows[-len(models):])
            console.print(f"  length {size} n={n}: cold ms {line}")
    return rows


def growth_exponent(rows: list[dict], family: str, size: str, key: str = "cold_ms", points: int = 3) -> float:
    """Least-squares slope of log(latency) against log(n) over the `points` longest lengths:
    how cost grows at long n (one pair of points is at the mercy of one noisy timing)."""
    xy = sorted((r["n"], r[key]) for r in rows if r["family"] == family and r["size"] == size)[-points:]
    x, y = np.log([n for n, _ in xy]), np.log([t for _, t in xy])
    return float(np.polyfit(x, y, 1)[0])


def length_summary(rows: list[dict]) -> dict:
    """Per size: each ASTRO label's speed-up over HSTU at the longest n (cold wall, cold CPU,
    and the FLOP ratio of the same requests), and each label's growth exponent."""
    out = {}
    for size in sorted({r["size"] for r in rows}):
        at = {r["family"]: r for r in rows if r["size"] == size and r["n"] == max(x["n"] for x in rows)}
        families = list(dict.fromkeys(r["family"] for r in rows if r["size"] == size))
        vs = {} if "hstu" not in at else {
            label: {"cold": at["hstu"]["cold_ms"] / r["cold_ms"], "cold_cpu": at["hstu"]["cold_cpu_ms"] / r["cold_cpu_ms"],
                    "flops": at["hstu"]["cold_mflops"] / r["cold_mflops"], "block_lengths": r["block_lengths"]}
            for label, r in at.items() if base_family(label) == "astro"}
        out[size] = {"n": at[families[0]]["n"],
                     "exponents": {f: growth_exponent(rows, f, size) for f in families} if len({r["n"] for r in rows}) > 1
                     else {},
                     "hstu_over": vs,
                     **({"hstu_over_astro_cold": vs["astro"]["cold"], "hstu_over_astro_cold_flops": vs["astro"]["flops"]}
                        if "astro" in vs else {})}
    return out


def plot_lengths(rows: list[dict], path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """One log-log panel per family: cold, warm and encode ms against n, one line per size;
    a family run with overrides (a variant) names them in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    title_lines = max((override_text((overrides or {}).get(f) or {}).count("\n") + 1 for f in families), default=1)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6 + 0.15 * title_lines),
                             sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        for size in sorted({r["size"] for r in rows}):
            points = sorted((r for r in rows if r["family"] == family and r["size"] == size), key=lambda r: r["n"])
            ns = [r["n"] for r in points]
            for key, style in (("cold_ms", "-o"), ("warm_ms", "--s"), ("encode_ms", ":^")):
                ax.plot(ns, [r[key] for r in points], style, label=f"{size} {key[:-3]}", markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        changed = (overrides or {}).get(family)
        ax.set_title(family + ("\n" + override_text(changed) if changed else ""), fontsize=8 if changed else None)
        ax.set_xlabel("history length n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"ms per request (M = {rows[0]['M']})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def override_text(changed: dict[str, Any], width: int = 44) -> str:
    """A variant's overrides for a panel title, wrapped to the panel: groups read
    "a+b / c" rather than nested tuples."""
    import textwrap

    def show(value: Any) -> str:
        if isinstance(value, (list, tuple)) and value and all(isinstance(g, (list, tuple)) for g in value):
            return " / ".join("+".join(map(str, g)) for g in value)
        return str(value)

    text = ", ".join(f"{k}={show(v)}" for k, v in changed.items())
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) if text else ""


# ----------------------------------------------------------------------------- 2. SUMI and incremental

def one_event_flops(model, n: int) -> int:
    """Analytic FLOPs of appending one event to a cached history of n - 1: the model's own
    history FLOP formula at n minus at n - 1 (same conventions as the encode it is compared to)."""
    return model.flops_per_request(n, 0) - model.flops_per_request(n - 1, 0)


def incremental_seconds(model, n: int, device: torch.device, reps: int = 30) -> dict[str, float]:
    """Best-of-`reps` wall seconds of a full encode of n events and of appending the n-th event
    to a cached n - 1 (a fresh buffer each time), in turns; and CPU seconds per call of each
    (process time over the reps), which a shared box disturbs less than wall time."""
    seq = random_sequence(n, seed=1)
    with torch.inference_mode():
        full_batch = history_batch([seq], N_TRACKS, device)
        encoded_before = model.encode_history(history_batch([prefix(seq, n - 1)], N_TRACKS, device))
        buffers = [HistoryBuffer(encoded_before, 0, max_len=n) for _ in range(2 * reps + 2)]
        fns = {"full": lambda: model.encode_history(full_batch),
               "extend": lambda: extend_history(model, buffers.pop(), full_batch)}
        best = timed(fns, device, min_seconds=0.0, min_reps=reps, max_reps=reps)
        cpu = {}
        for name, fn in fns.items():
            calls = reps if name == "extend" else max(3, reps // 10)
            start = time.process_time()
            for _ in range(calls):
                synced(fn, device)()
            cpu[f"{name}_cpu"] = (time.process_time() - start) / calls
    return {**best, **cpu}


def bench_incremental(size: str, n: int, device: torch.device, family: str = "astro", reps: int = 60) -> dict:
    """One-event incremental vs full re-encode alone (`climber bench incremental`): wall and CPU."""
    from bench.incremental_floor import calls_per_event, per_call_us, read_floor_seconds

    model = long_model(family, size, n, device)
    inc = incremental_seconds(model, n, device, reps)
    flops = model.flops_per_request(n, 0) / one_event_flops(model, n)
    figures = {"family": family, "size": size, "n": n, "n_layers": model.config.n_layers, "reps": reps,
               "full_encode_ms": 1e3 * inc["full"], "extend_one_ms": 1e3 * inc["extend"],
               "full_encode_cpu_ms": 1e3 * inc["full_cpu"], "extend_one_cpu_ms": 1e3 * inc["extend_cpu"],
               "ratio_wall": inc["full"] / inc["extend"], "ratio_cpu": inc["full_cpu"] / inc["extend_cpu"],
               "flop_ratio": flops, "share_of_flop_ratio_wall": inc["full"] / inc["extend"] / flops,
               "share_of_flop_ratio_cpu": inc["full_cpu"] / inc["extend_cpu"] / flops}
    if device.type != "cpu":
        return figures
    # The floors of bench.incremental_floor, against the FLOP-ideal event (full encode / FLOP ratio).
    seq = random_sequence(n, seed=1)
    with torch.inference_mode():
        full_batch = history_batch([seq], N_TRACKS, device)
        before = model.encode_history(history_batch([prefix(seq, n - 1)], N_TRACKS, device))
        calls, call_us = calls_per_event(model, before, full_batch, n), per_call_us()
        reads = read_floor_seconds(model, before, full_batch, n, reps=min(reps, 30))
    ideal_ms = figures["full_encode_cpu_ms"] / flops
    return {**figures, "flop_ideal_extend_cpu_ms": ideal_ms, "aten_calls_per_event": calls, "per_call_us": call_us,
            "dispatch_floor_ms": calls * call_us / 1e3, "read_floor_ms": 1e3 * reads["read_floor_s"],
            "bytes_read_per_event": reads["bytes_per_event"], "blocks_joined": reads["blocks_joined"],
            "ratio_ceiling_from_reads": figures["full_encode_cpu_ms"] / (1e3 * reads["read_floor_s"]),
            "share_of_flop_ratio_ceiling_from_reads": figures["full_encode_cpu_ms"] / (1e3 * reads["read_floor_s"]) / flops}


def bench_sumi_incremental(size: str, n: int, M: int, device: torch.device, family: str = "astro",
                           pair_chunk: int = 64, min_seconds: float = 2.0, reps: int = 30) -> dict:
    """Batched SUMI vs per-pair (cold and warm), incremental vs full, each beside its FLOP ratio."""
    model = long_model(family, size, n, device)
    batch = random_batch(1, n, M, N_TRACKS, seed=n + M, min_length=n).to(device)
    full_chunks, rest = divmod(M, pair_chunk)
    with torch.inference_mode():
        cache = model.encode_history(batch)
        pairs = {rows: repeat_rows(batch, rows) for rows in {pair_chunk * bool(full_chunks), rest} if rows}
        t = timed({"cold": lambda: model(batch), "warm": lambda: model.score_candidates(cache, batch),
                   **{f"pairs_{rows}": (lambda b=b: model(b)) for rows, b in pairs.items()}},
                  device, min_seconds=min_seconds, min_reps=3)
        per_pair = full_chunks * t.get(f"pairs_{pair_chunk}", 0.0) + (t[f"pairs_{rest}"] if rest else 0.0)
    inc = incremental_seconds(model, n, device, reps)
    f = model.flops_per_request
    flop = {"cold": M * f(n, 1) / f(n, M), "warm": M * f(n, 1) / (f(n, M) - f(n, 0)),
            "incremental": f(n, 0) / one_event_flops(model, n)}
    measured = {"cold": per_pair / t["cold"], "warm": per_pair / t["warm"], "incremental": inc["full"] / inc["extend"]}
    return {"family": family, "size": size, "n": n, "M": M, "n_layers": model.config.n_layers,
            "cold_ms": 1e3 * t["cold"], "warm_ms": 1e3 * t["warm"], "per_pair_ms": 1e3 * per_pair,
            "full_encode_ms": 1e3 * inc["full"], "extend_one_ms": 1e3 * inc["extend"],
            "ratios": {k: {"measured": measured[k], "flops": flop[k], "share_of_flop_ratio": measured[k] / flop[k]}
                       for k in measured}}


# ----------------------------------------------------------------------------- report

def markdown(lengths: list[dict], summary: dict, sumi: dict | None, device: str) -> list[str]:
    lines = [f"Cost against history length (device {device}, M = {lengths[0]['M']}, history mix "
             f"{lengths[0].get('mix', 'uniform')}; depth and width of the shared ladder for every family; ms per "
             "request, best of N, families timed in turns; CPU: process time per call):", "",
             "| family | size | n | cold ms | cold CPU ms | warm ms | encode ms | cold MFLOPs | block lengths |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['size']} | {r['n']} | {r['cold_ms']:.1f} | {r.get('cold_cpu_ms', float('nan')):.1f} | "
              f"{r['warm_ms']:.2f} | {r['encode_ms']:.1f} | {r['cold_mflops']:,.0f} | "
              f"{' / '.join(map(str, r['block_lengths'])) if r.get('block_lengths') else '-'} |" for r in lengths]
    for size, s in summary.items():
        exps = ", ".join(f"{f} {e:.2f}" for f, e in s["exponents"].items())
        ratios = "; ".join(f"HSTU / {label} cold at n={s['n']}: **{v['cold']:.2f}x** wall, {v['cold_cpu']:.2f}x CPU "
                           f"(FLOP ratio {v['flops']:.2f})" for label, v in s.get("hstu_over", {}).items())
        parts = ([f"growth exponent of cold latency (log-log slope over the three longest n): {exps}"] if exps
                 else []) + ([ratios] if ratios else [])  # one length: no slope to state
        lines.append(f"\nSize {size}: " + "; ".join(parts) + ".")
    if sumi is None:
        return lines
    r = sumi["ratios"]
    lines += ["", f"SUMI and incremental, {sumi['family']}-{sumi['size']} ({sumi['n_layers']} layers), n={sumi['n']}, "
              f"M={sumi['M']} (device {device}):", "",
              "| ratio | measured | FLOP ratio | measured / FLOP |", "|---|---|---|---|"]
    for key, label in (("cold", "batched vs per-pair, cold"), ("warm", "batched vs per-pair, warm"),
                       ("incremental", "one-event incremental vs full re-encode")):
        lines.append(f"| {label} | {r[key]['measured']:.1f}x | {r[key]['flops']:.1f}x | "
                     f"{r[key]['share_of_flop_ratio']:.0%} |")
    lines.append(f"\n(cold {sumi['cold_ms']:.1f} ms, warm {sumi['warm_ms']:.2f} ms, per-pair {sumi['per_pair_ms']:.0f} ms, "
                 f"full encode {sumi['full_encode_ms']:.1f} ms, one-event extend {sumi['extend_one_ms']:.3f} ms)")
    return lines


def run_bench_serve_long(sizes: tuple[str, ...] = ("m", "l"), ns: tuple[int, ...] = LENGTHS, M: int = 200,
                         sumi_size: str = "l", sumi_n: int = 1024, device: str = "cpu", min_seconds: float = 1.0,
                         plot: bool = True, save_as: str | None = "serve_long", families: tuple[str, ...] = FAMILIES,
                         overrides: dict[str, dict[str, Any]] | None = None, sumi: bool = True,
                         mix: str = "sandbox") -> dict:
    from bench.common import RESULTS_DIR, save
    from ranker.serving.ranker import serving_device

    dev = serving_device(device)
    started = time.time()
    console.print(f"bench serve-long: 1/2 cost against n on {dev}"
                  + (f" (overrides {overrides})" if overrides else ""))
    lengths = bench_lengths(sizes, ns, M, dev, families, min_seconds=min_seconds, overrides=overrides, mix=mix)
    console.print("bench serve-long: 2/2 SUMI and incremental" + ("" if sumi else ": skipped"))
    sumi = bench_sumi_incremental(sumi_size, sumi_n, M, dev, min_seconds=min_seconds) if sumi else None
    summary = length_summary(lengths)
    figures = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), "goals": GOALS, "overrides": overrides or {}, "mix": mix,
               "lengths": lengths,
               "length_summary": summary, "sumi_incremental": sumi, "wall_seconds": time.time() - started}
    figures["markdown"] = "\n".join(markdown(lengths, summary, sumi, str(dev)))
    console.print(figures["markdown"])
    if plot:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{save_as or 'serve_long'}.png"
        plot_lengths(lengths, path, overrides)
        figures["plot"] = str(path)
    if save_as:
        console.print(f"written {save(save_as, figures)}")
    return figures
