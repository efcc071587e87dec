"""The event contract: JSON round trip, validation naming the field, dead letters."""

import numpy as np
import pytest

from streaming.events import (
    BEHAVIOURS,
    MAX_PAYLOAD_BYTES,
    SCENARIOS,
    Behaviour,
    Event,
    EventBatch,
    InvalidEvent,
    Scenario,
    decode_event,
    decode_events,
    encode_event,
    validate_batch,
)


def make_event(**overrides) -> Event:
    fields = dict(event_id=7, ts=1_000, user_id=3, track_id=11, scenario=Scenario.RADIO,
                  behaviour=Behaviour.FULL_PLAY, request_id=5, position=2, arm="control", play_ms=180_000)
    fields.update(overrides)
    return Event(**fields)


def test_json_round_trip_spells_names():
    event = make_event()
    raw = encode_event(event)
    assert b'"scenario":"radio"' in raw and b'"behaviour":"full_play"' in raw
    assert decode_event(raw) == event


@pytest.mark.parametrize("raw, field", [
    (b'{"event_id": 1}', "ts"),
    (encode_event(make_event()).replace(b'"radio"', b'"television"'), "$.scenario"),
    (encode_event(make_event()).replace(b'"full_play"', b'"dance"'), "$.behaviour"),
    (encode_event(make_event()).replace(b'"user_id":3', b'"user_id":-3'), "$.user_id"),
    (encode_event(make_event()).replace(b'"track_id":11', b'"track_id":"x"'), "$.track_id"),
    (encode_event(make_event()).replace(b'"schema_version":1', b'"schema_version":9'), "schema_version"),
    (encode_event(make_event())[:-1] + b',"colour":"red"}', "colour"),
])
def test_invalid_event_error_names_the_field(raw, field):
    with pytest.raises(InvalidEvent, match=field.replace("$", r"\$")):
        decode_event(raw)


def test_malformed_and_oversized_payloads_are_named():
    with pytest.raises(InvalidEvent, match="malformed JSON"):
        decode_event(b"{not json")
    with pytest.raises(InvalidEvent, match="over the"):
        decode_event(b" " * (MAX_PAYLOAD_BYTES + 1))


def test_decode_events_keeps_good_and_dead_letters_bad():
    good = [encode_event(make_event(event_id=i)) for i in range(5)]
    bad = [b"garbage", encode_event(make_event()).replace(b'"user_id":3', b'"user_id":-1')]
    batch, dead = decode_events(good[:2] + bad + good[2:], source="test")
    assert batch.event_id.tolist() == [0, 1, 2, 3, 4]
    assert [d.payload for d in dead] == [b.decode() for b in bad]
    assert all(d.reason and d.source == "test" for d in dead)


def test_batch_columns_round_trip_through_events():
    events = [make_event(event_id=i, behaviour=b, scenario=s)
              for i, (b, s) in enumerate(zip(Behaviour, list(Scenario) * 2))]
    batch = EventBatch.from_events(events)
    assert batch.to_events() == events
    frame = batch.to_pandas()
    assert list(frame["behaviour"]) == [e.behaviour.value for e in events]
    assert EventBatch.concat([batch, batch.select(np.arange(2))]).event_id.tolist() == list(range(8)) + [0, 1]


def test_validate_batch_splits_bad_rows_with_reasons():
    batch = EventBatch.from_events([make_event(event_id=i) for i in range(4)])
    cols = batch.columns()
    cols["user_id"] = cols["user_id"].copy(); cols["user_id"][1] = -5
    cols["behaviour"] = cols["behaviour"].copy(); cols["behaviour"][3] = len(BEHAVIOURS)
    good, dead = validate_batch(EventBatch(**cols))
    assert good.event_id.tolist() == [0, 2]
    assert "user_id" in dead[0].reason and "behaviour" in dead[1].reason
    assert len(SCENARIOS) == 5 and len(BEHAVIOURS) == 8
