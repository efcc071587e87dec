"""Run Faust feature workers: in this process (`run_worker`) or as subprocesses (`spawn_worker`).

    python -m streaming.worker --settings '<StreamSettings JSON>'
    KAFKA_BOOTSTRAP=host:9092 CLIMBER_STREAM_FEAST_DIR=runs/x/feast python -m streaming.worker

Topics and the Feast registry are prepared once by the caller (`prepare_stream`), not by
each worker: two workers applying a file registry at once could overwrite each other.
A worker stops cleanly on SIGINT or SIGTERM (Faust's worker handles both): it finishes the
batch in hand, commits, and leaves the group so the others take its partitions at once.
That shutdown waits for the broker (Faust's `wait_empty`); when the broker is gone or
restarted empty it would wait forever, so a watchdog ends the process after
`shutdown_timeout_s` with `SHUTDOWN_TIMEOUT_EXIT`. Exiting there loses nothing: a batch is
acknowledged only once written, and what was not committed is consumed again.
Every worker dies with the process that spawned it (`streaming.lifetime`).
"""

from __future__ import annotations

import os
import signal
import logging
import subprocess
import sys
import threading
from pathlib import Path

import faust

from features.store import FeatureStoreClient
from streaming.faust_app import Role, create_app
from streaming.lifetime import die_with_parent
from streaming.settings import StreamSettings
from streaming.topics import create_topics

REPO_ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_TIMEOUT_EXIT = 4  # the clean shutdown did not finish within shutdown_timeout_s
log = logging.getLogger("streaming.worker")


class BoundedShutdownWorker(faust.Worker):
    """Faust's worker, whose shutdown on a signal ends within `shutdown_timeout_s`."""

    def __init__(self, app: faust.App, shutdown_timeout_s: float, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._watchdog: threading.Timer | None = None

    def _schedule_shutdown(self, signal) -> None:
        if self._watchdog is None:  # a thread: it fires even if the event loop is stuck
            self._watchdog = threading.Timer(self.shutdown_timeout_s, self._give_up, args=(signal,))
            self._watchdog.daemon = True
            self._watchdog.start()
        super()._schedule_shutdown(signal)

    def _give_up(self, signal) -> None:
        log.error("clean shutdown after %s did not finish within %.0f s (is the broker gone?); exiting with %d. "
                  "Nothing unwritten was acknowledged: uncommitted events are consumed again.",
                  getattr(signal, "name", signal), self.shutdown_timeout_s, SHUTDOWN_TIMEOUT_EXIT)
        logging.shutdown()
        os._exit(SHUTDOWN_TIMEOUT_EXIT)


def prepare_stream(settings: StreamSettings) -> list[str]:
    """Create the topics and register the Feast definitions; return the topics created."""
    created = create_topics(settings.bootstrap_servers, settings.partitions)
    FeatureStoreClient(settings.feast_dir, settings.online_store, settings.redis_url).apply()
    return created


def run_worker(settings: StreamSettings, role: Role = "all", loglevel: str = "info") -> None:
    """Run one worker in this process until SIGINT/SIGTERM."""
    settings.faust_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, role)
    worker = BoundedShutdownWorker(app, settings.shutdown_timeout_s, loglevel=loglevel, quiet=True,
                                   redirect_stdouts=False)
    worker.execute_from_commandline()


def spawn_worker(settings: StreamSettings, log_path: str | Path, role: Role = "all",
                 loglevel: str = "info") -> subprocess.Popen:
    """Start a worker subprocess writing its log to `log_path`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streaming.worker", "--settings", settings.model_dump_json(),
             "--role", role, "--loglevel", loglevel],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
            preexec_fn=die_with_parent,
        )


def stop_worker(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, wait for the clean shutdown, SIGKILL if it does not come; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def main(argv: list[str] | None = None) -> None:
    """`python -m streaming.worker` (how `spawn_worker` starts one): the `climber worker` command."""
    from sandbox.cli_options import run_command
    from streaming.cli import worker_app

    run_command(worker_app, argv, "python -m streaming.worker")


if __name__ == "__main__":
    main()
