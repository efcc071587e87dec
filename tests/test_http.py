"""The HTTP API (FastAPI TestClient) over a real Feast store and a checkpoint loaded from disk."""

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ranker.serving.http import RankReply, build_service, create_app
from ranker.interface import RankRequest
from ranker.serving.service import ServingSettings
from tests.support import TINY_TRACKS as N_TRACKS, tiny_service_settings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = tiny_service_settings(tmp_path_factory.mktemp("serve"), users=[7], length=12, seed=0, max_candidates=5)
    with TestClient(create_app(build_service(settings))) as test_client:
        yield test_client


def test_rank_returns_scores_order_model_and_timing(client):
    reply = client.post("/rank", json={"user_id": 7, "scenario": "daily_mix", "candidates": [3, 9, 1, 30],
                                       "context": {"seed_track": 3, "weight": 0.5, "mood": "calm"}, "request_id": 41})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["request_id"] == 41 and body["user_id"] == 7 and body["candidates"] == [3, 9, 1, 30]
    assert body["model_name"] == "astro-xs" and body["model_version"].startswith("astro-xs-")
    score = body["scores"]["score"]
    assert sorted(body["order"]) == [0, 1, 2, 3]
    assert [score[i] for i in body["order"]] == sorted(score, reverse=True)
    assert set(body["scores"]) == {"score", "full_play", "like", "skip", "share"}
    assert body["timing_ms"]["total_ms"] > 0 and body["timing_ms"]["batch_size"] >= 1


def test_cold_start_user_gets_a_ranking(client):
    reply = client.post("/rank", json={"user_id": 123456, "scenario": "search", "candidates": [5, 6]})
    assert reply.status_code == 200 and len(reply.json()["order"]) == 2


@pytest.mark.parametrize("body, problem", [
    ({"user_id": 7, "scenario": "home_feed", "candidates": []}, "candidates: List should have at least 1 item"),
    ({"user_id": 7, "scenario": "home_feed", "candidates": [1, 2, 3, 4, 5, 6]}, "candidates: List should have at most 5"),
    ({"user_id": 7, "scenario": "podcast", "candidates": [1]}, "scenario: Input should be 'home_feed'"),
    ({"user_id": "7", "scenario": "home_feed", "candidates": [1]}, "user_id: Input should be a valid integer"),
    ({"user_id": 7.5, "scenario": "home_feed", "candidates": [1]}, "user_id: Input should be a valid integer"),
    ({"user_id": 7, "scenario": "home_feed", "candidates": [1, "x"]}, "candidates.1: Input should be a valid integer"),
    ({"user_id": 7, "scenario": "home_feed", "candidates": [1, -2]}, "candidates.1: Input should be greater than"),
    ({"user_id": 7, "scenario": "home_feed", "candidates": [1, N_TRACKS]}, f"track id {N_TRACKS} is outside"),
    ({"user_id": 7, "scenario": "home_feed", "candidates": [1], "extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_bad_requests_get_a_422_naming_the_problem(client, body, problem):
    reply = client.post("/rank", json=body)
    assert reply.status_code == 422
    assert problem in reply.json()["message"]


def test_nan_in_context_is_a_422(client):
    raw = json.dumps({"user_id": 7, "scenario": "radio", "candidates": [1], "context": {"tempo": math.nan}})
    assert "NaN" in raw  # Python's json writes the non-standard literal, as careless clients do
    reply = client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["message"] == "body.context: Value error, context['tempo'] must be a finite number, got nan"


def test_health_and_prometheus_metrics(client):
    client.post("/rank", json={"user_id": 7, "scenario": "home_feed", "candidates": [2, 4]})
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["cache_entries"] >= 1
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("climber_rank_latency_seconds_bucket", "climber_rank_batch_size_bucket",
                 "climber_kv_cache_hit_rate", "climber_kv_cache_bytes", 'climber_kv_cache_lookups_total{outcome="hits"}'):
        assert name in metrics.text


def test_settings_default_to_loopback():
    assert ServingSettings().host == "127.0.0.1"
    with pytest.raises(ValueError, match="checkpoint"):
        build_service(ServingSettings())


def test_reply_is_a_rank_reply_with_the_rankers_float32_scores(client):
    body = {"user_id": 7, "scenario": "radio", "candidates": [4, 8, 15], "ts": 1_800_000_000_000, "request_id": 5}
    reply = client.post("/rank", json=body)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    parsed = RankReply.model_validate_json(reply.content)  # the documented reply shape
    assert parsed.candidates == [4, 8, 15] and parsed.timing_ms["batch_size"] >= 1
    # The same request ranked in-process (a cache hit now): the reply carries exactly its float32 scores.
    request = RankRequest(request_id=5, user_id=7, scenario="radio", candidates=np.array([4, 8, 15]), ts=body["ts"])
    expected = client.app.state.service.ranker.rank([request])[0]
    assert set(parsed.scores) == set(expected.scores) and parsed.order == expected.order.tolist()
    for task, values in parsed.scores.items():
        np.testing.assert_array_equal(np.asarray(values, np.float32), expected.scores[task])


@pytest.mark.parametrize("raw, problem", [
    (b'{"user_id": 7, "scenario": "home_feed", "candidates": [1, 2', "body: Invalid JSON"),
    (b"", "body: Invalid JSON"),
    (b"[7]", "body: Input should be an object"),
])
def test_malformed_bodies_get_a_422(client, raw, problem):
    reply = client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["message"].startswith(problem) and reply.json()["detail"][0]["loc"][0] == "body"


def test_openapi_documents_the_rank_body_and_reply(client):
    operation = client.get("/openapi.json").json()["paths"]["/rank"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["candidates"]["maxItems"] == 5 and body["additionalProperties"] is False
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RankReply")


def test_the_lean_rank_route_answers_as_fastapis_route(tmp_path):
    """POST /rank by the bare ASGI handler with stage two's fast path (the defaults) and by
    FastAPI's route with the model's own scoring (the references): the same status, body
    (timing aside; the scores to the last bit) and headers, good and bad requests."""
    settings = tiny_service_settings(tmp_path, users=[7], length=12, seed=0, max_candidates=5)
    cases = [
        ({"user_id": 7, "scenario": "radio", "candidates": [4, 8, 15], "request_id": 3, "ts": 1_800_000_000_000}, {}),
        ({"user_id": 99, "scenario": "search", "candidates": [5, 6], "request_id": 4, "ts": 1_800_000_000_000}, {}),
        ({"user_id": 7, "scenario": "home_feed", "candidates": [1, 2, 3, 4, 5, 6]}, {}),
        ({"user_id": 7, "scenario": "home_feed", "candidates": [1, N_TRACKS]}, {}),
        ({"user_id": "7", "scenario": "podcast", "candidates": [1]}, {}),
        (b'{"user_id": 7, "scenario": "home_feed", "candidates": [1, 2', {}),
        (b'{"user_id": 7, "scenario": "radio", "candidates": [1]}', {"content-type": "text/plain"}),
        (b"x" * (settings.max_body_bytes + 1), {}),
    ]
    replies = {}
    for route, stage_two in (("lean", "fast"), ("fastapi", "reference")):  # both defaults against both references
        service = build_service(settings.model_copy(update={"rank_route": route, "stage_two": stage_two}))
        assert service.ranker.stage_two == stage_two
        with TestClient(create_app(service)) as client:
            replies[route] = [client.post("/rank", json=body) if isinstance(body, dict) else
                              client.post("/rank", content=body, headers={"content-type": "application/json", **h})
                              for body, h in cases]
    codes = [r.status_code for r in replies["lean"]]
    assert codes == [200, 200, 422, 422, 422, 422, 415, 413]
    for lean, reference in zip(replies["lean"], replies["fastapi"]):
        assert lean.status_code == reference.status_code
        assert {k: v for k, v in lean.json().items() if k != "timing_ms"} == \
            {k: v for k, v in reference.json().items() if k != "timing_ms"}
        for header in ("content-type", "connection") + (("content-length",) if lean.status_code != 200 else ()):
            assert lean.headers.get(header) == reference.headers.get(header), header  # a 200's timing varies
