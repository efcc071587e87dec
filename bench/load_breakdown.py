"""Where an open-loop request's time goes (`climber bench load --breakdown`).

Each traced request (`open_loop(..., trace=True)` against a server started with `trace`)
carries perf_counter stamps from both processes; on Linux perf_counter is CLOCK_MONOTONIC,
one clock for every process of the machine, so the stamps subtract across processes. The
latency, counted from the request's *scheduled* arrival (no coordinated omission), splits
into consecutive parts that add up to it exactly:

    generator  scheduled -> sent       the load generator late, or every connection busy
    inbound    sent -> handler start   on the wire and in the server's loop (a batch
                                       scoring on the loop delays it), HTTP parsing
    read       handler -> queued       body read and validated
    queue      queued -> batch start   waiting for the batching task (earlier batches, the wait)
    compute    batch start -> end      the batch's ranking (shared by its requests)
    resume     batch end -> encoded    the handler resumes (after its batch-mates' handlers)
    outbound   encoded -> answered     reply encoded, written, read by the generator

Groups: the p50 group (latencies between the 45th and 55th percentile) and the slowest 1%
(at or above the 99th). Beside them, the share of the run the server's loop spent computing
batches (near 1: the run is at the server's knee, and the tail is its queue). GC pauses in either process during a request are reported beside
(they fall inside whichever part they interrupted).
"""

from __future__ import annotations

import numpy as np

PARTS = ("generator", "inbound", "read", "queue", "compute", "resume", "outbound")
_EDGES = (("scheduled", "sent"), ("sent", "received"), ("received", "queued"), ("queued", "batch_start"),
          ("batch_start", "batch_end"), ("batch_end", "replied"), ("replied", "done"))


def parts_ms(trace: dict) -> dict[str, float]:
    """One request's latency split into PARTS (ms)."""
    stamps = {"scheduled": trace["scheduled"], "sent": trace["sent"], "done": trace["done"], **trace["server"]}
    return {part: 1e3 * (stamps[b] - stamps[a]) for part, (a, b) in zip(PARTS, _EDGES)}


def _group(rows: list[dict], traces: list[dict]) -> dict:
    mean = {part: float(np.mean([r[part] for r in rows])) for part in PARTS}
    return {"requests": len(rows), "latency_ms": float(np.mean([sum(r[p] for p in PARTS) for r in rows])),
            "parts_ms": mean, "dominant": max(mean, key=mean.get),
            "batch_size": float(np.mean([t["batch_size"] for t in traces])),
            "client_gc_ms": 1e3 * float(np.mean([t["client_gc_s"] for t in traces])),
            "server_gc_ms": 1e3 * float(np.mean([t["server"]["gc_s"] for t in traces]))}


def episodes(times: np.ndarray, gap: float) -> list[tuple[float, float, int]]:
    """Sorted times grouped into runs whose neighbours are within `gap`: (first, last, count)."""
    out: list[tuple[float, float, int]] = []
    for t in np.sort(times):
        if out and t - out[-1][1] <= gap:
            out[-1] = (out[-1][0], t, out[-1][2] + 1)
        else:
            out.append((t, t, 1))
    return out


def breakdown(traces: list[dict], start: float | None = None) -> dict:
    """The p50 group's and the slowest 1%'s mean parts, batch sizes and GC, and how the
    slowest 1% cluster in time (episodes: slow requests scheduled within 50 ms of another)."""
    traces = [t for t in traces if t.get("server")]
    if len(traces) < 20:
        raise ValueError(f"{len(traces)} traced requests: too few to split into a p50 group and a slowest 1%")
    rows = [parts_ms(t) for t in traces]
    latency = np.array([t["done"] - t["scheduled"] for t in traces]) * 1e3
    p45, p55, p99 = np.percentile(latency, [45, 55, 99])
    middle = [i for i, ms in enumerate(latency) if p45 <= ms <= p55]
    slow = [i for i, ms in enumerate(latency) if ms >= p99]
    start = min(t["scheduled"] for t in traces) if start is None else start
    # How busy the batching task kept the loop: distinct batches' compute over the traced span.
    batches = {(t["server"]["batch_start"], t["server"]["batch_end"]) for t in traces}
    span = max(t["done"] for t in traces) - start
    busy = sum(end - begin for begin, end in batches) / span
    runs = episodes(np.array([traces[i]["scheduled"] for i in slow]) - start, 0.05)
    longest = max(runs, key=lambda r: r[2])
    return {"requests": len(traces), "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(p99),
            "server_busy_share": busy,
            "p50_group": _group([rows[i] for i in middle], [traces[i] for i in middle]),
            "slowest_1pct": _group([rows[i] for i in slow], [traces[i] for i in slow]),
            "slow_episodes": len(runs), "largest_episode": {"at_s": longest[0], "span_ms": 1e3 * (longest[1] - longest[0]),
                                                            "requests": longest[2]}}


def breakdown_markdown(label: str, b: dict) -> list[str]:
    """The two groups side by side, one row per part (fits 80 columns)."""
    mid, slow = b["p50_group"], b["slowest_1pct"]
    lines = [f"Where the time goes, {label} ({b['requests']} requests; ms, mean per request):", "",
             "| part | p50 group | slowest 1% |", "|---|---|---|"]
    lines += [f"| {part} | {mid['parts_ms'][part]:.2f} | {slow['parts_ms'][part]:.2f} |" for part in PARTS]
    lines += [f"| **latency** | **{mid['latency_ms']:.2f}** | **{slow['latency_ms']:.2f}** |",
              f"| batch size | {mid['batch_size']:.1f} | {slow['batch_size']:.1f} |",
              f"| GC, generator | {mid['client_gc_ms']:.2f} | {slow['client_gc_ms']:.2f} |",
              f"| GC, server | {mid['server_gc_ms']:.2f} | {slow['server_gc_ms']:.2f} |", "",
              f"Dominant part: p50 group {mid['dominant']}, slowest 1% {slow['dominant']}. The slowest "
              f"{slow['requests']} fall in {b['slow_episodes']} episode(s) (scheduled within 50 ms of "
              f"another); the largest: {b['largest_episode']['requests']} requests over "
              f"{b['largest_episode']['span_ms']:.0f} ms from {b['largest_episode']['at_s']:.1f} s. The server's "
              f"loop spent {b['server_busy_share']:.0%} of the run computing batches."]
    return lines
