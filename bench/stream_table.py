"""The other state design, measured: user sequences in a changelog-backed Faust Table.

    python -m bench.stream_table --events 60000

Issue 5 asks for the faster of two designs for `sequence_builder`'s state: a Faust Table
(changelog-backed) or the Feast online store itself with an idempotent batch apply (what
`streaming.faust_app` does). A table can only be changed inside per-event stream
iteration (`stream.take()` batches raise "Cannot modify table key from outside of stream
iteration"), and a value must be reassigned to reach the changelog, so every update
writes the user's whole sequence to the changelog topic. This probe gives the table its
best case: one update per message (a message holds one user's events), the sequence packed
as bytes (4 numpy arrays, no JSON), and no Feast push at all, which the real agent would
still have to add. It consumes events already in the topic and reports events/s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import faust
import numpy as np

from features.sequence import UserSequence, apply_events
from bench.stream import simulated_log
from streaming.broker import start_broker
from streaming.bus import EVENTS_TOPIC
from streaming.framing import decode_event_messages
from streaming.producer import KafkaEventSink
from streaming.settings import StreamSettings
from streaming.topics import create_topics

SEQUENCE_DTYPES = (np.int64, np.int8, np.int8, np.int64)


def pack_sequence(seq: UserSequence) -> bytes:
    header = np.array([seq.last_event_id, len(seq)], np.int64).tobytes()
    return header + b"".join(a.tobytes() for a in (seq.track_ids, seq.behaviours, seq.scenarios, seq.timestamps))


def unpack_sequence(data: bytes) -> UserSequence:
    last_event_id, length = np.frombuffer(data[:16], np.int64).tolist()
    arrays, offset = [], 16
    for dtype in SEQUENCE_DTYPES:
        size = length * np.dtype(dtype).itemsize
        arrays.append(np.frombuffer(data[offset:offset + size], dtype))
        offset += size
    return UserSequence(*arrays, last_event_id=last_event_id)


def table_worker(bootstrap: str, expected_events: int, data_dir: str) -> None:
    """Consume `events` into a Faust table until `expected_events` were applied; print the rate."""
    app = faust.App(f"table-probe-{os.getpid()}", broker=f"kafka://{bootstrap}", store="memory://",
                    datadir=data_dir, web_enabled=False, topic_partitions=4,
                    consumer_auto_offset_reset="earliest", value_serializer="raw", key_serializer="raw")
    table = app.Table("sequences", default=bytes, partitions=4, value_type=bytes, key_type=bytes)
    progress = {"events": 0, "start": 0.0}

    @app.agent(app.topic(EVENTS_TOPIC, partitions=4))
    async def sequence_table(stream):
        async for event in stream.events():
            batch, _ = decode_event_messages([event.value], ["probe"])
            if not progress["start"]:
                progress["start"] = time.perf_counter()
            user = int(event.key)
            current = {user: unpack_sequence(table[event.key])} if table[event.key] else {}
            updated = apply_events(current, batch)
            if user in updated:
                table[event.key] = pack_sequence(updated[user])  # reassigned: reaches the changelog
            progress["events"] += len(batch)
            if progress["events"] >= expected_events:
                rate = progress["events"] / (time.perf_counter() - progress["start"])
                print(f"TABLE_EVENTS_PER_S {rate:.0f}", flush=True)
                os._exit(0)

    faust.Worker(app, loglevel="warn", quiet=True, redirect_stdouts=False).execute_from_commandline()


def bench_table(n_events: int = 60_000) -> float:
    batches = simulated_log(n_events)
    total = sum(len(b) for b in batches)
    with start_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=Path(tmp) / "feast")
        create_topics(settings.bootstrap_servers, settings.partitions)
        with KafkaEventSink(settings) as sink:
            for batch in batches:
                sink(batch)
        output = subprocess.run(
            [sys.executable, "-m", "bench.stream_table", "--worker", broker.bootstrap, str(total), tmp],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent,
        ).stdout
    for line in output.splitlines():
        if "TABLE_EVENTS_PER_S" in line:  # Faust may prefix terminal escapes
            return float(line.split("TABLE_EVENTS_PER_S")[1].split()[0])
    raise RuntimeError(f"table probe printed no result:\n{output[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.stream_table [--events N]`; `--worker BOOTSTRAP EVENTS DATA_DIR`
    (hidden) is how the benchmark starts its table worker."""
    import typer

    from sandbox.cli_options import run_command

    app = typer.Typer(add_completion=False)

    @app.command(help=__doc__.splitlines()[0])
    def stream_table(events: int = typer.Option(60_000, help="events in the topic"),
                     worker: Optional[tuple[str, int, str]] = typer.Option(None, hidden=True,
                                                                           metavar="BOOTSTRAP EVENTS DATA_DIR")) -> None:
        if worker:
            table_worker(worker[0], worker[1], worker[2])
        else:
            print(f"Faust table design, best case, no Feast push: {bench_table(events):,.0f} events/s")

    run_command(app, argv, "python -m bench.stream_table")


if __name__ == "__main__":
    main()
