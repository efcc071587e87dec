"""The benchmark's lean load generator (bench.service_load) against the real app over a socket:
uvicorn in a thread, a tiny checkpoint, a real Feast store."""

import asyncio
import gc
import os
import time

import numpy as np

import orjson
import pytest
import torch

from bench.load_breakdown import PARTS, breakdown, episodes, parts_ms
from bench.service_load import (HttpConnection, closed_loop, open_loop, process_cpu_seconds, request_bodies,
                                run_async, summary)
from ranker.serving.gc_pauses import GcPauses
from ranker.serving.http import RankReply
from tests.support import TINY_TRACKS as N_TRACKS, serving_in_thread, tiny_service_settings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    settings = tiny_service_settings(tmp_path_factory.mktemp("load"), users=[0, 1, 2], length=10, seed=1,
                                     max_candidates=50)
    with serving_in_thread(settings) as port:
        yield port


@pytest.fixture(scope="module")
def traced_port(tmp_path_factory):
    settings = tiny_service_settings(tmp_path_factory.mktemp("traced"), users=[0, 1, 2], length=10, seed=1,
                                     max_candidates=50)
    with serving_in_thread(settings.model_copy(update={"trace": True})) as port:
        yield port


def test_one_keep_alive_connection_answers_several_requests(port):
    bodies = request_bodies(users=4, n_candidates=7, seed=0, n_tracks=N_TRACKS, count=3)  # user 3 has no history

    async def send_all():
        connection = await HttpConnection.open("127.0.0.1", port)
        try:
            return [await connection.post(body) for body in bodies]
        finally:
            connection.close()

    for body, reply in zip(bodies, run_async(send_all())):
        parsed = RankReply.model_validate_json(reply)
        assert parsed.candidates == orjson.loads(body)["candidates"] and sorted(parsed.order) == list(range(7))
        assert "trace" not in orjson.loads(reply)  # tracing is off by default


def test_a_traced_open_loop_splits_every_latency_into_parts_that_add_up(traced_port):
    """`bench load --breakdown`: the server's stamps come in order, and the parts (generator,
    inbound, read, queue, compute, resume, outbound) sum to the latency counted from the
    scheduled arrival."""
    bodies = request_bodies(users=3, n_candidates=20, seed=1, n_tracks=N_TRACKS, count=16)
    run = run_async(open_loop("127.0.0.1", traced_port, rate=80.0, connections=4, seconds=0.5, bodies=bodies,
                              seed=2, trace=True))
    assert len(run.traces) == len(run.latencies) >= 20 and run.client_gc["total_s"] >= 0
    for trace, latency in zip(run.traces, run.latencies):
        server = trace["server"]
        stamps = [trace["sent"], server["received"], server["read"], server["queued"],
                  server["batch_start"], server["batch_end"], server["replied"], trace["done"]]
        assert stamps == sorted(stamps) and server["gc_s"] >= 0  # one clock for client and server
        assert trace["sent"] >= trace["scheduled"] - 1e-3  # asyncio's timers may fire a clock tick early
        parts = parts_ms(trace)
        assert list(parts) == list(PARTS) and sum(parts.values()) == pytest.approx(latency * 1e3, abs=1e-6)
    figures = breakdown(run.traces)
    assert figures["p50_group"]["requests"] >= 1 and figures["slowest_1pct"]["requests"] >= 1
    assert figures["slowest_1pct"]["latency_ms"] >= figures["p50_group"]["latency_ms"]
    assert figures["slowest_1pct"]["dominant"] in PARTS and figures["slow_episodes"] >= 1
    assert 0 < figures["server_busy_share"] < 1


def test_slow_requests_are_grouped_into_episodes_and_gc_pauses_are_timed():
    assert episodes(np.array([0.0, 0.03, 0.2, 0.21, 0.9]), gap=0.05) == [(0.0, 0.03, 2), (0.2, 0.21, 2),
                                                                          (0.9, 0.9, 1)]
    pauses = GcPauses().install()
    try:
        gc.collect()
    finally:
        pauses.uninstall()
    assert pauses.collections[2] >= 1 and pauses.total_s > 0 and pauses.max_s > 0
    assert pauses._callback not in gc.callbacks
    pauses.reset()
    assert pauses.collections == [0, 0, 0] and pauses.total_s == pauses.max_s == 0


def test_the_load_generator_holds_its_gc_off_during_a_run_and_gives_it_back(port):
    """A generator's GC pause would read as server latency: off during the run, restored after."""
    bodies = request_bodies(users=3, n_candidates=5, seed=1, n_tracks=N_TRACKS, count=4)
    seen = []

    async def watched(hold: bool):
        async def watch():
            while True:
                seen.append((hold, gc.isenabled()))
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        try:
            return await open_loop("127.0.0.1", port, rate=40.0, connections=2, seconds=0.2, bodies=bodies,
                                   hold_gc=hold)
        finally:
            watcher.cancel()

    frozen = gc.get_freeze_count()
    for hold in (True, False):
        run_async(watched(hold))
        assert gc.isenabled() and gc.get_freeze_count() == frozen
    assert False in {enabled for hold, enabled in seen if hold}  # off while it sent (before: opening connections)
    assert {enabled for hold, enabled in seen if not hold} == {True}


def test_a_refused_request_is_an_error_naming_the_status(port):
    async def send_bad():
        connection = await HttpConnection.open("127.0.0.1", port)
        try:
            await connection.post(b'{"user_id": 1, "scenario": "home_feed", "candidates": []}')
        finally:
            connection.close()

    with pytest.raises(RuntimeError, match="answered 422.*at least 1 item"):
        run_async(send_bad())


def test_closed_and_open_loop_runs_measure_every_request(port):
    bodies = request_bodies(users=3, n_candidates=20, seed=1, n_tracks=N_TRACKS, count=16)
    closed = run_async(closed_loop("127.0.0.1", port, clients=4, seconds=0.5, bodies=bodies))
    figures = summary(closed)
    # Every client sends at least once; how many more fit in 0.5 s depends on the machine.
    assert figures["requests"] == len(closed.server_ms) >= 4
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    # The client-side latency contains the server's own queued-to-answered time.
    assert all(client * 1e3 >= server for client, server in zip(closed.latencies, closed.server_ms))
    opened = run_async(open_loop("127.0.0.1", port, rate=40.0, connections=4, seconds=0.5, bodies=bodies, seed=2))
    figures = summary(opened)
    assert figures["offered_per_s"] == 40.0 and figures["requests"] == len(opened.latencies) > 0
    assert 0 <= figures["waited_for_connection"] <= figures["requests"]


def test_process_cpu_seconds_counts_the_cpu_a_process_spends():
    """The load bench's CPU figure (from /proc) follows the process's own CPU clock: burn
    CPU until that clock has advanced 0.2 s, and /proc must show at least most of it (it
    counts in clock ticks, 10 ms each)."""
    before, clock = process_cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - clock < 0.2:
        sum(range(10_000))
    spent = process_cpu_seconds(os.getpid()) - before
    assert 0.15 <= spent <= time.process_time() - clock + 0.05
    assert process_cpu_seconds(2**22 + 1) is None  # no such process: no figure, not a crash
