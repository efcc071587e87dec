"""What an ASTRO block setting costs on real histories (`climber bench block-cost`).

ASTRO's attention is sum_b L_b^2 d, not n^2 d / Nb: the blocks are as long as the history's
behaviour (or scenario) mix makes them, and the mix of a music log is far from even (plays
and full plays are three quarters of it). This prints, per variant, the tokens per block on
a log's own request histories and on the serving benchmark's synthetic ones (each
bench.serve_common.HISTORY_MIXES mix), the attention share sum_b L_b^2 / n^2, and the FLOP
ratio HSTU / variant at the same depth and width, each request's block shares scaled to the
benchmark's n: the ceiling of the speed-up `climber bench serve-long` can measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.serve_common import HISTORY_MIXES, N_TRACKS, console, mixed_batch
from bench.serve_long import base_family, block_lengths
from ranker.models import build_model
from ranker.models.config import DEFAULT_SIZES
from streaming.events import BEHAVIOURS, SCENARIOS


def variant_model(label: str, size: str, max_len: int, overrides: dict[str, Any]) -> torch.nn.Module:
    if base_family(label) != "astro":
        raise ValueError(f"block-cost compares ASTRO variants; {label!r} is not one")
    return build_model("astro", size, N_TRACKS, **{**DEFAULT_SIZES[size], "max_len": max_len, **overrides})


def log_histories(db: Path, max_len: int, window_h: float):
    """The log's requests of the last `window_h` hours (all when 0) as one RankBatch of their
    last `max_len` tokens, and the log's token mix (shares of each behaviour and scenario)."""
    from ranker.training.data import load_request_log, split_by_time

    log = load_request_log(db)
    requests = split_by_time(log, int(window_h * 3_600_000)).eval if window_h else log
    mix = {"behaviours": dict(zip(BEHAVIOURS, np.bincount(log.token_behaviours, minlength=len(BEHAVIOURS))
                                  / max(len(log.token_behaviours), 1))),
           "scenarios": dict(zip(SCENARIOS, np.bincount(log.token_scenarios, minlength=len(SCENARIOS))
                                 / max(len(log.token_scenarios), 1)))}
    return requests.batch(np.arange(len(requests)), max_len), mix


def block_stats(model, batch) -> dict[str, Any]:
    """Mean tokens per block and the attention share sum_b L_b^2 / n^2 (summed over requests
    before dividing: the share of the whole log's attention work)."""
    with torch.no_grad():
        member = model.block_membership(batch)  # [B, n, Nb]
    lengths = member.sum(1).double()  # [B, Nb]
    n = batch.history_lengths.double()
    keep = n > 0
    return {"requests": int(len(n)), "mean_n": float(n.mean()), "mean_block_lengths": lengths.mean(0).tolist(),
            "attention_share": float((lengths ** 2).sum() / (n ** 2).sum()),
            "request_shares": (lengths[keep] / n[keep, None]).tolist()}


def flop_ratios(label: str, overrides: dict[str, Any], request_shares: list[list[float]], n: int, M: int,
                sizes: tuple[str, ...]) -> dict[str, float]:
    """HSTU / variant FLOPs at n, per size: each request's block shares scaled to n (its
    blocks keep its own mix: a user's history is not the log's average), FLOPs averaged."""
    out = {}
    for size in sizes:
        astro = variant_model(label, size, n, overrides)
        if astro.config.n_blocks != len(request_shares[0]):
            raise ValueError(f"{label} has {astro.config.n_blocks} block(s) at size {size} and "
                             f"{len(request_shares[0])} at size s (set its partition explicitly)")
        hstu = build_model("hstu", size, N_TRACKS, **{**DEFAULT_SIZES[size], "max_len": n})
        variant = np.mean([sum(astro.flops_breakdown(n, M, [int(round(s * n)) for s in shares]).values())
                           for shares in request_shares])
        out[size] = hstu.flops_per_request(n, M) / float(variant)
    return out


def terminal_table(rows: list[dict], sizes: tuple[str, ...], n: int):
    """The figures in 80 columns (the markdown, with the sources spelt out, goes to the JSON)."""
    from rich.table import Table

    table = Table(title=f"ASTRO blocks: tokens per block, attention share, FLOP ratio vs HSTU at n = {n}",
                  title_justify="left", pad_edge=False, box=None)
    for name in ("variant", "histories", "tokens per block", "ΣL²/n²", *(f"×{s}" for s in sizes)):
        table.add_column(name, justify="left" if name in ("variant", "histories", "tokens per block") else "right")
    for r in rows:
        short = r["source"].split(",")[0].replace("bench mix ", "").replace(" (longest history)", " longest")
        table.add_row(r["variant"], short, "/".join(f"{x:.0f}" for x in r["mean_block_lengths"]),
                      f"{r['attention_share']:.3f}", *(f"{r['flop_ratio_vs_hstu'][s]:.2f}" for s in sizes))
    return table


def run_block_cost(variants: tuple[str, ...], overrides: dict[str, dict[str, Any]], db: Path | None = None,
                   max_len: int = 1024, window_h: float = 48.0, n: int = 4096, M: int = 200,
                   sizes: tuple[str, ...] = ("m", "l")) -> dict:
    sources: dict[str, Any] = {}
    log_mix = None
    if db is not None:
        sources[f"log, last {window_h:g} h, max_len {max_len}"], log_mix = log_histories(db, max_len, window_h)
    for mix in HISTORY_MIXES:
        sources[f"bench mix {mix}, n {n}"] = mixed_batch(n, M, seed=n, mix=mix)
    if db is not None:
        try:  # serve-long --mix DB: the log's longest history, its last n tokens
            sources[f"bench mix log (longest history), n {n}"] = mixed_batch(n, M, seed=n, mix=str(db))
        except ValueError as error:
            console.print(f"[yellow]{error}: no bench row from the log's own history[/]")
    rows = []
    for label in variants:
        model = variant_model(label, "s", max(max_len, n), overrides.get(label, {}))
        for source, batch in sources.items():
            stats = block_stats(model, batch)
            shares = stats.pop("request_shares")  # per request: the FLOP ratio's input, not saved
            rows.append({"variant": label, "overrides": overrides.get(label, {}), "source": source, **stats,
                         "flop_ratio_vs_hstu": flop_ratios(label, overrides.get(label, {}), shares, n, M, sizes)})
    lines = [f"ASTRO blocks on real and synthetic histories; FLOP ratio HSTU / variant at n = {n}, M = {M}, "
             "each request's block shares scaled to n:", "",
             "| variant | histories | tokens per block (mean) | sum L_b^2 / n^2 | "
             + " | ".join(f"FLOP ratio {s}" for s in sizes) + " |", "|---|---|---|---|" + "---|" * len(sizes)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['source']} | {' / '.join(f'{x:.0f}' for x in r['mean_block_lengths'])} | "
                     f"{r['attention_share']:.3f} | "
                     + " | ".join(f"{r['flop_ratio_vs_hstu'][s]:.2f}x" for s in sizes) + " |")
    for label in variants:
        if overrides.get(label):
            lines.append(f"\n{label}: " + ", ".join(f"{k}={v}" for k, v in overrides[label].items()))
    if log_mix is not None:
        lines.append("\nThe log's token mix: " + ", ".join(f"{k} {v:.3f}" for k, v in log_mix["behaviours"].items()
                                                          if k != "impression")
                     + "; " + ", ".join(f"{k} {v:.3f}" for k, v in log_mix["scenarios"].items()))
    text = "\n".join(lines)
    console.print(terminal_table(rows, sizes, n))
    console.print("\n".join(line for line in lines[4 + len(rows):] if line))  # the variants' settings, the mix
    return {"rows": rows, "log_mix": log_mix, "n": n, "M": M, "sizes": list(sizes), "markdown": text}
