"""One client's bad or hostile request costs no other client anything (issue 20).

A real uvicorn server in a thread over a tiny checkpoint and a real Feast store: bad ids
fail alone with a 422 naming the field while their batch-mates get 200s; oversized, slow
and non-JSON bodies are refused before parsing."""

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from ranker.serving.http import build_service, create_app
from ranker.interface import RankRequest
from tests.support import TINY_TRACKS as N_TRACKS, serving_in_thread, tiny_service_settings

torch.set_num_threads(1)
BODY_LIMIT = 4096
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    settings = tiny_service_settings(tmp_path_factory.mktemp("edge"), users=[0, 1, 2], length=10, seed=1,
                                     max_candidates=50)
    # a batching window wide enough that concurrent requests share batches
    settings = settings.model_copy(update={"max_body_bytes": BODY_LIMIT, "body_timeout_s": BODY_TIMEOUT_S,
                                           "max_batch": 32, "max_wait_ms": 20.0})
    with serving_in_thread(settings) as port:
        yield f"http://127.0.0.1:{port}"

BAD = [  # (what breaks, the field the 422 must name)
    ({"user_id": 2**64}, "user_id"),
    ({"user_id": 2**63}, "user_id"),
    ({"ts": 2**63}, "ts"),
    ({"ts": -1}, "ts"),
    ({"request_id": 2**63}, "request_id"),
    ({"request_id": 2**64 + 5}, "request_id"),
    ({"candidates": [1, 2**63]}, "candidates.1"),
    ({"candidates": [1, N_TRACKS]}, f"track id {N_TRACKS}"),
]


def test_bad_requests_fail_alone_and_their_batch_mates_get_200(url):
    """100 good and 100 bad requests at once: every good one 200, every bad one a 422
    naming its field (before the fix, 2-28 of the good ones got a 200)."""
    rng = np.random.default_rng(3)
    good = [{"user_id": int(rng.integers(0, 4)), "scenario": "home_feed", "request_id": i,
             "candidates": rng.integers(0, N_TRACKS, 8).tolist(), "ts": 1_700_000_900_000} for i in range(100)]
    bad = [({"user_id": 1, "scenario": "radio", "candidates": [3, 4], **BAD[i % len(BAD)][0]}, BAD[i % len(BAD)][1])
           for i in range(100)]
    order = rng.permutation(200)

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as client:
            bodies = [good[i] if i < 100 else bad[i - 100][0] for i in order]
            return dict(zip(order.tolist(), await asyncio.gather(*(client.post("/rank", json=b) for b in bodies))))

    replies = asyncio.run(send_all())
    good_codes = [replies[i].status_code for i in range(100)]
    assert good_codes.count(200) == 100, f"good requests answered {sorted(set(good_codes))}"
    for i in range(100):
        assert replies[i].json()["request_id"] == i
    assert max(replies[i].json()["timing_ms"]["batch_size"] for i in range(100)) > 1  # they did share batches
    for i in range(100, 200):
        reply, field = replies[i], bad[i - 100][1]
        assert reply.status_code == 422, (bad[i - 100][0], reply.text)
        assert field in reply.json()["message"], (field, reply.text)


def test_a_request_that_fails_in_a_batch_fails_alone(tmp_path):
    """The service's own guard: whatever validation could not foresee, a failing request
    in a batch is ranked again alone, and only it gets the error."""
    settings = tiny_service_settings(tmp_path, users=[1], length=5, seed=2, max_candidates=10)
    service = build_service(settings.model_copy(update={"max_batch": 16, "max_wait_ms": 50.0}))
    rank_timed = service.ranker.rank_timed

    def fails_for_user_13(requests):
        if any(r.user_id == 13 for r in requests):
            raise RuntimeError("user 13 is cursed")
        return rank_timed(requests)

    service.ranker.rank_timed = fails_for_user_13

    async def run():
        async with service:
            requests = [RankRequest(i, 13 if i == 4 else 1, "radio", np.array([1, 2, 3]), ts=1) for i in range(8)]
            return await asyncio.gather(*(service.rank_one(r) for r in requests), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[4], RuntimeError)
    assert all(not isinstance(r, Exception) and r.response.request_id == i for i, r in enumerate(results) if i != 4)


def test_oversized_body_gets_413_before_parsing(url):
    body = b'{"user_id": 1, "scenario": "radio", "candidates": [' + b"1, " * BODY_LIMIT + b"1]}"
    reply = httpx.post(url + "/rank", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "byte limit" in reply.json()["message"], reply.text
    assert reply.headers["connection"] == "close"

    def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'{"user_id": 1, "scenario": "radio", "candidates": ['
        for _ in range(BODY_LIMIT // 100 + 2):
            yield b"1, " * 34
        yield b"1]}"

    reply = httpx.post(url + "/rank", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413, reply.text


def test_wrong_content_type_gets_415(url):
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        reply = httpx.post(url + "/rank", content=b'{"user_id": 1, "scenario": "radio", "candidates": [1]}',
                           headers=headers)
        assert reply.status_code == 415 and "content-type" in reply.json()["message"], (headers, reply.text)
    reply = httpx.post(url + "/rank", content=b'{"user_id": 1, "scenario": "radio", "candidates": [1]}',
                       headers={"content-type": "application/json; charset=utf-8"})
    assert reply.status_code == 200, reply.text


def test_slow_bodies_are_cut_off_and_do_not_hold_connections(url):
    """Slow-loris: 20 connections announce a body and send a byte at a time. Each gets a 408
    within the body timeout and its connection is closed; a normal client meanwhile is served."""
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        sockets.append(s)
    started = time.monotonic()
    assert httpx.post(url + "/rank", json={"user_id": 1, "scenario": "radio", "candidates": [1]}).status_code == 200
    for s in sockets:
        s.settimeout(BODY_TIMEOUT_S * 10)
        reply = b""
        while chunk := s.recv(4096):  # read to the server's close: it must close the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        s.close()
    assert time.monotonic() - started < BODY_TIMEOUT_S * 10


def test_time_the_loop_spends_scoring_is_not_counted_against_a_clients_body(tmp_path, monkeypatch):
    """Client B sends its headers, then its body while the loop is blocked for longer than
    the body timeout scoring client A's batch: B is answered, not refused with a 408."""
    from ranker.serving.ranker import NeuralRanker

    rank_timed = NeuralRanker.rank_timed

    blocking = threading.Event()

    def slow_for_user_99(self, requests):
        if any(r.user_id == 99 for r in requests):
            blocking.set()
            time.sleep(3.0)  # three body timeouts; blocks the event loop, as a large batch does
        return rank_timed(self, requests)

    monkeypatch.setattr(NeuralRanker, "rank_timed", slow_for_user_99)
    settings = tiny_service_settings(tmp_path, users=[1], length=5, seed=2, max_candidates=10)
    with serving_in_thread(settings.model_copy(update={"body_timeout_s": 1.0})) as port:
        body = b'{"user_id": 1, "scenario": "radio", "candidates": [1, 2]}'
        b = socket.create_connection(("127.0.0.1", port))
        b.sendall(b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(body))
        time.sleep(0.2)  # B's handler is waiting for its body
        a = threading.Thread(target=lambda: httpx.post(f"http://127.0.0.1:{port}/rank", timeout=30,
                                                       json={"user_id": 99, "scenario": "radio", "candidates": [1]}))
        a.start()
        # B's body goes once A's batch blocks the loop (an event, not a fixed sleep: a loaded
        # box may take a while to get A's request that far)
        assert blocking.wait(10)
        b.sendall(body)
        b.settimeout(30)
        reply = b.recv(4096)
        a.join()
        b.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


@pytest.mark.parametrize("rule", ["score", "reject"])
def test_duplicated_candidates_follow_the_documented_rule(tmp_path, rule):
    """"score" (default): every occurrence scored, equal scores, reply aligned with the
    request; "reject": a 422 naming the track and both positions."""
    from fastapi.testclient import TestClient

    settings = tiny_service_settings(tmp_path, users=[1], length=5, seed=2, max_candidates=10)
    with TestClient(create_app(build_service(settings.model_copy(update={"duplicate_candidates": rule})))) as client:
        reply = client.post("/rank", json={"user_id": 1, "scenario": "radio", "candidates": [5, 9, 5]})
    if rule == "reject":
        assert reply.status_code == 422
        assert reply.json()["message"] == ("body.candidates: Value error, track 5 is repeated (positions 0 and 2); "
                                           "this service refuses duplicated candidates")
    else:
        body = reply.json()
        assert reply.status_code == 200 and body["candidates"] == [5, 9, 5]
        assert body["scores"]["score"][0] == body["scores"]["score"][2]
        assert body["order"].index(0) < body["order"].index(2)  # equal scores keep request order


def test_service_settings_carry_the_limits(monkeypatch):
    from ranker.serving.service import ServingSettings

    monkeypatch.setenv("CLIMBER_SERVE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("CLIMBER_SERVE_BODY_TIMEOUT_S", "0.5")
    monkeypatch.setenv("CLIMBER_SERVE_DUPLICATE_CANDIDATES", "reject")
    settings = ServingSettings()
    assert (settings.max_body_bytes, settings.body_timeout_s, settings.duplicate_candidates) == (2048, 0.5, "reject")
    from sandbox.frozen import parse_step  # `climber serve`'s flags, parsed as the command parses them

    _, args = parse_step(["serve", "--checkpoint", "m", "--feast-dir", "f", "--max-body-bytes", "99",
                          "--body-timeout-s", "2", "--duplicate-candidates", "score"])
    assert (args.max_body_bytes, args.body_timeout_s, args.duplicate_candidates) == (99, 2.0, "score")
