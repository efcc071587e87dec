"""`--transport kafka --workers 0`: the sandbox produces, workers started elsewhere consume
(the docker-compose topology). Its flush must wait for their writes, as for its own."""

from __future__ import annotations

import pytest

from features.sequence import sequences_from_log
from sandbox.kafka_transport import KafkaFeaturePath
from bench.stream import simulated_log
from streaming.events import EventBatch
from streaming.worker import spawn_worker, stop_worker


@pytest.fixture
def feature_path(tmp_path):
    """A feature path that starts its own Tansu and Valkey but no workers."""
    path = KafkaFeaturePath(tmp_path, kafka_bootstrap="", partitions=2, redis_url="", workers=0, max_seq_len=64,
                            drain_timeout_s=90)
    yield path
    path.close()


@pytest.mark.slow
def test_flush_waits_for_workers_started_elsewhere(feature_path, tmp_path):
    batches = simulated_log(3_000, seed=5, n_users=80)
    external = spawn_worker(feature_path.stream, tmp_path / "external-worker.log", role="sequences")
    try:
        for batch in batches:
            feature_path.on_events(batch)
        feature_path.flush()  # returns only once every user's newest token is in Feast
        from features.store import FeatureStoreClient

        store = FeatureStoreClient(feature_path.stream.feast_dir, "redis", feature_path.redis_url)
        reference = sequences_from_log(EventBatch.concat(batches), 64)
        stored = store.get_sequences(sorted(reference))  # read once, right after flush: no polling
        wrong = [u for u in reference if not stored[u].equals(reference[u])]
        assert not wrong, f"{len(wrong)} of {len(reference)} users stale right after flush, e.g. {wrong[:5]}"
    finally:
        assert stop_worker(external, timeout_s=20) in (0, -15)


@pytest.mark.slow
def test_flush_without_any_worker_fails_naming_the_missing_workers(feature_path):
    feature_path.drain_timeout_s = 2.0
    for batch in simulated_log(500, seed=5, n_users=20):
        feature_path.on_events(batch)
    with pytest.raises(TimeoutError, match="workers=0"):
        feature_path.flush()


def test_the_summary_does_not_say_zero_rows_reached_feast_when_workers_wrote_them():
    """On the Kafka path the Faust workers write Feast, so this process counts nothing: the
    summary must say who wrote the rows, not '0' (which reads as nothing reached Feast)."""
    from sandbox.report import feature_rows

    assert feature_rows(None) == "by the Faust workers (see their logs)"
    assert feature_rows(1234) == "1,234"
