"""Assertions on a finished compose run, run inside the `ranker` container (it has the
project, the runs volume and the network), fed on stdin:
    docker compose exec -T ranker python - RUN_DIR REDIS_URL RANKER_URL < tests/compose/check.py

1. The sequences in Valkey equal the recompute from the run's DuckDB event log, user by user.
2. The ranker answered POST /rank over HTTP: its /metrics count of successful requests is
   positive and equals the treatment arm's requests in DuckDB (one HTTP call per request).
3. The HTML report exists and is not empty.
Prints one line per check; exits 1 naming every failed check.
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path


def main(run_dir: Path, redis_url: str, ranker_url: str, max_seq_len: int) -> int:
    import duckdb

    from experiments.recorder import RunRecorder
    from features.sequence import sequences_from_log
    from features.store import FeatureStoreClient

    failures = []
    recorder = RunRecorder(run_dir / "sandbox.duckdb")
    try:
        events = recorder.read_events()
    finally:
        recorder.close()
    reference = sequences_from_log(events, max_seq_len)
    store = FeatureStoreClient(run_dir / "feast", online_store="redis", redis_url=redis_url)
    served = store.get_sequences(sorted(reference))
    wrong = [u for u in sorted(reference) if not served[u].equals(reference[u])]
    print(f"sequences: {len(reference)} users recomputed from {len(events)} logged events, {len(wrong)} differ in Valkey")
    if not reference:
        failures.append("no user sequences in the event log: the run produced nothing")
    if wrong:
        failures.append(f"{len(wrong)} users' sequences in Valkey differ from the log, e.g. {wrong[:5]}")

    metrics = urllib.request.urlopen(f"{ranker_url}/metrics", timeout=10).read().decode()
    match = re.search(r'^climber_rank_requests_total\{outcome="ok"\} ([0-9.e+]+)$', metrics, re.M)
    answered = int(float(match.group(1))) if match else 0
    con = duckdb.connect(str(run_dir / "sandbox.duckdb"), read_only=True)
    treatment = con.execute("SELECT count(*) FROM requests WHERE arm = 'treatment'").fetchone()[0]
    con.close()
    print(f"ranker: /metrics counts {answered} answered /rank requests; DuckDB logs {treatment} treatment requests")
    if answered == 0:
        failures.append("the ranker's /metrics shows no answered /rank request")
    elif answered != treatment:
        failures.append(f"the ranker answered {answered} /rank requests but the treatment arm made {treatment}")

    report = run_dir / "report.html"
    size = report.stat().st_size if report.exists() else 0
    print(f"report: {report} ({size:,} bytes)")
    if size == 0:
        failures.append(f"no report at {report}")

    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 256))
