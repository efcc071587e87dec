"""The ranking service as an A/B arm: `HttpRanker` over the real FastAPI app (TestClient)."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ranker.serving.http import build_service, create_app
from ranker.serving.client import HttpRanker, encode_request
from ranker.interface import RankRequest
from sandbox.settings import ExperimentSettings
from tests.support import TINY_TRACKS as N_TRACKS, tiny_service_settings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    settings = tiny_service_settings(tmp_path_factory.mktemp("serve"), users=[7, 8], length=12, seed=1,
                                     max_candidates=8)
    service = build_service(settings)
    with TestClient(create_app(service)) as client:
        yield service, client


def requests() -> list[RankRequest]:
    return [RankRequest(request_id=i, user_id=user, scenario="home_feed",
                        candidates=np.array(cands, np.int64), context={"seed_track": np.int64(3)}, ts=1_700_000_000_000)
            for i, (user, cands) in enumerate([(7, [3, 9, 1, 30]), (8, [5, 6, 7]), (99, [2, 11])])]


def test_http_arm_ranks_as_the_model_in_process(served):
    service, client = served
    ranker = HttpRanker("http://testserver", client=client, concurrency=1)
    assert ranker.name == "astro-xs" and ranker.version.startswith("astro-xs-")
    over_http = ranker.rank(requests())
    in_process = service.ranker.rank(requests())
    for got, want in zip(over_http, in_process, strict=True):
        assert (got.request_id, got.user_id, got.model_version) == (want.request_id, want.user_id, want.model_version)
        np.testing.assert_array_equal(got.candidates, want.candidates)
        np.testing.assert_array_equal(got.order, want.order)
        np.testing.assert_allclose(got.scores["score"], want.scores["score"], rtol=1e-5, atol=1e-6)
    metrics = client.get("/metrics").text
    assert 'climber_rank_requests_total{outcome="ok"}' in metrics


def test_refused_request_names_the_service_and_the_problem(served):
    _, client = served
    ranker = HttpRanker("http://testserver", client=client, concurrency=1)
    bad = RankRequest(request_id=5, user_id=7, scenario="home_feed", candidates=np.array([1, N_TRACKS]), ts=1)
    with pytest.raises(ValueError, match=rf"refused request 5 \(422\).*track id {N_TRACKS}"):
        ranker.rank([bad])


def test_unreachable_service_fails_loudly():
    with pytest.raises(RuntimeError, match="127.0.0.1:9.*unreachable"):
        HttpRanker("http://127.0.0.1:9", timeout_s=2)


def test_request_encoding_turns_numpy_into_json_scalars():
    body = encode_request(requests()[0])
    assert b'"candidates":[3,9,1,30]' in body and b'"context":{"seed_track":3}' in body


def test_settings_accept_a_service_url_as_an_arm():
    settings = ExperimentSettings(rankers={"control": "popularity", "treatment": "http://ranker:8000"})
    assert settings.rankers["treatment"] == "http://ranker:8000"
