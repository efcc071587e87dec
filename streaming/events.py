"""The event contract: one definition used by the simulator, the bus, Kafka, Faust and replay.

Events travel two ways. On the wire (Kafka, JSON lines, dead letters) each event is one JSON
object with scenario and behaviour spelled as names, encoded by msgspec. Inside a process
they travel as an `EventBatch`: one numpy array per field, scenario and behaviour as small
integer codes. Columns are what make the embedded loop fast (no Python object per event)
and what DuckDB and Feast want anyway.

Validation never raises past the caller: `decode_events` and `validate_batch` split input
into good events and `DeadLetter`s carrying the reason, so one bad event loses nothing else.
What an event must be relative to the stream (ids and times near its watermarks, inside
the catalogue, not a repeat) is `streaming.plausibility`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Annotated, Iterable, Sequence

import msgspec
import numpy as np

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MAX_PAYLOAD_BYTES = 4096  # an event is ~250 bytes of JSON; anything this large is not one


class Scenario(str, Enum):
    HOME_FEED = "home_feed"
    DAILY_MIX = "daily_mix"
    RADIO = "radio"
    SEARCH = "search"
    LIBRARY = "library"


class Behaviour(str, Enum):
    IMPRESSION = "impression"
    PLAY = "play"
    FULL_PLAY = "full_play"
    SKIP = "skip"
    LIKE = "like"
    SHARE = "share"
    ADD_TO_PLAYLIST = "add_to_playlist"
    DISLIKE = "dislike"


# Integer codes are positions in these tuples; they are part of the contract (stored in
# Feast sequences and model vocabularies), so only ever append.
SCENARIOS: tuple[str, ...] = tuple(s.value for s in Scenario)
BEHAVIOURS: tuple[str, ...] = tuple(b.value for b in Behaviour)
SCENARIO_CODE: dict[str, int] = {name: i for i, name in enumerate(SCENARIOS)}
BEHAVIOUR_CODE: dict[str, int] = {name: i for i, name in enumerate(BEHAVIOURS)}

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One user interaction. `request_id`/`position` are -1 for organic plays (library)."""

    event_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    ts: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # simulated epoch milliseconds
    user_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    track_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    scenario: Scenario
    behaviour: Behaviour
    request_id: Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)] = -1
    position: Annotated[int, msgspec.Meta(ge=-1, le=32767)] = -1
    arm: Annotated[str, msgspec.Meta(max_length=64)] = ""
    play_ms: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    schema_version: int = SCHEMA_VERSION


class InvalidEvent(ValueError):
    """Raised by `decode_event`; the message names the offending field."""


@dataclass(frozen=True)
class DeadLetter:
    """A rejected input, kept verbatim with the reason so nothing is silently lost."""

    payload: str
    reason: str
    source: str = ""
    received_ts: int = 0


_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


def decode_event(raw: bytes | str) -> Event:
    """Parse and validate one JSON event; raise `InvalidEvent` naming the bad field."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidEvent(f"payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:  # msgspec says e.g. "... - at `$.user_id`"
        raise InvalidEvent(f"invalid field: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    if event.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidEvent(
            f"unsupported schema_version {event.schema_version} - at `$.schema_version`"
        )
    return event


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


@dataclass(frozen=True)
class EventBatch:
    """Events as columns. All arrays have the same length; codes index SCENARIOS/BEHAVIOURS."""

    event_id: np.ndarray  # int64
    ts: np.ndarray  # int64, simulated epoch ms
    user_id: np.ndarray  # int64
    track_id: np.ndarray  # int64
    scenario: np.ndarray  # int8 code
    behaviour: np.ndarray  # int8 code
    request_id: np.ndarray  # int64, -1 when organic
    position: np.ndarray  # int16, -1 when organic
    arm: np.ndarray  # object (str)
    play_ms: np.ndarray  # int32
    schema_version: np.ndarray  # int16

    DTYPES = {
        "event_id": np.int64,
        "ts": np.int64,
        "user_id": np.int64,
        "track_id": np.int64,
        "scenario": np.int8,
        "behaviour": np.int8,
        "request_id": np.int64,
        "position": np.int16,
        "arm": object,
        "play_ms": np.int32,
        "schema_version": np.int16,
    }

    def __len__(self) -> int:
        return len(self.event_id)

    @classmethod
    def from_columns(cls, **columns) -> "EventBatch":
        """Build a batch, casting each column to its contract dtype; schema_version defaults."""
        n = len(columns["event_id"])
        # Defaults are built only for the columns left out (the simulator passes all but one, every tick).
        for name, fill in (("schema_version", SCHEMA_VERSION), ("request_id", -1), ("position", -1),
                           ("play_ms", 0), ("arm", "")):
            if name not in columns:
                columns[name] = np.full(n, fill, cls.DTYPES[name])
        arrays = {}
        for name, dtype in cls.DTYPES.items():
            col = np.asarray(columns[name], dtype=dtype)
            if col.shape != (n,):
                raise ValueError(f"column {name} has shape {col.shape}, expected ({n},)")
            arrays[name] = col
        return cls(**arrays)

    @classmethod
    def empty(cls) -> "EventBatch":
        return cls.from_columns(**{name: [] for name in cls.DTYPES})

    @classmethod
    def from_events(cls, events: Sequence[Event]) -> "EventBatch":
        return cls.from_columns(
            event_id=[e.event_id for e in events],
            ts=[e.ts for e in events],
            user_id=[e.user_id for e in events],
            track_id=[e.track_id for e in events],
            scenario=[SCENARIO_CODE[e.scenario.value] for e in events],
            behaviour=[BEHAVIOUR_CODE[e.behaviour.value] for e in events],
            request_id=[e.request_id for e in events],
            position=[e.position for e in events],
            arm=[e.arm for e in events],
            play_ms=[e.play_ms for e in events],
            schema_version=[e.schema_version for e in events],
        )

    @classmethod
    def concat(cls, batches: Iterable["EventBatch"]) -> "EventBatch":
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    def select(self, index: np.ndarray) -> "EventBatch":
        """Rows by boolean mask or integer index."""
        return EventBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_pandas(self):
        """Wire-form columns (scenario and behaviour as names), e.g. for DuckDB."""
        import pandas as pd

        cols = self.columns()
        cols["scenario"] = np.asarray(SCENARIOS, dtype=object)[self.scenario]
        cols["behaviour"] = np.asarray(BEHAVIOURS, dtype=object)[self.behaviour]
        return pd.DataFrame(cols)

    def to_events(self) -> list[Event]:
        return [
            Event(
                event_id=int(self.event_id[i]),
                ts=int(self.ts[i]),
                user_id=int(self.user_id[i]),
                track_id=int(self.track_id[i]),
                scenario=Scenario(SCENARIOS[self.scenario[i]]),
                behaviour=Behaviour(BEHAVIOURS[self.behaviour[i]]),
                request_id=int(self.request_id[i]),
                position=int(self.position[i]),
                arm=str(self.arm[i]),
                play_ms=int(self.play_ms[i]),
                schema_version=int(self.schema_version[i]),
            )
            for i in range(len(self))
        ]

    def encode_json(self) -> list[bytes]:
        """One JSON document per event, as produced to Kafka."""
        return [_encoder.encode(e) for e in self.to_events()]


def decode_events(raws: Iterable[bytes | str], source: str = "", received_ts: int = 0
                  ) -> tuple[EventBatch, list[DeadLetter]]:
    """Decode many JSON events; invalid ones become dead letters, the rest a batch."""
    good: list[Event] = []
    dead: list[DeadLetter] = []
    for raw in raws:
        try:
            good.append(decode_event(raw))
        except InvalidEvent as exc:
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            dead.append(DeadLetter(text[:MAX_PAYLOAD_BYTES], str(exc), source, received_ts))
    return EventBatch.from_events(good), dead


def validate_batch(batch: EventBatch, source: str = "", received_ts: int = 0
                   ) -> tuple[EventBatch, list[DeadLetter]]:
    """Vectorised contract checks for in-process batches (the embedded path never parses
    JSON, so it needs the same rules as `decode_event`, applied to columns)."""
    problems: list[tuple[np.ndarray, str]] = [
        (batch.event_id < 0, "event_id must be >= 0"),
        (batch.ts < 0, "ts must be >= 0"),
        (batch.user_id < 0, "user_id must be >= 0"),
        (batch.track_id < 0, "track_id must be >= 0"),
        ((batch.scenario < 0) | (batch.scenario >= len(SCENARIOS)), "scenario code out of range"),
        ((batch.behaviour < 0) | (batch.behaviour >= len(BEHAVIOURS)), "behaviour code out of range"),
        (batch.request_id < -1, "request_id must be >= -1"),
        (batch.position < -1, "position must be >= -1"),
        (batch.play_ms < 0, "play_ms must be >= 0"),
        (~np.isin(batch.schema_version, list(SUPPORTED_SCHEMA_VERSIONS)), "unsupported schema_version"),
    ]
    bad = np.zeros(len(batch), dtype=bool)
    for mask, _ in problems:
        bad |= mask
    if not bad.any():
        return batch, []
    return batch.select(~bad), dead_letters_for(batch, bad, problems, "invalid field", source, received_ts)


def dead_letters_for(batch: EventBatch, bad: np.ndarray, problems: Sequence[tuple[np.ndarray, str]],
                     kind: str, source: str = "", received_ts: int = 0) -> list[DeadLetter]:
    """A dead letter per `bad` row: the row as wire JSON, and "<kind>: " + every problem
    whose mask holds the row."""
    dead = []
    for i in np.flatnonzero(bad):
        reasons = "; ".join(reason for mask, reason in problems if mask[i])
        row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.columns().items()}
        row["scenario"], row["behaviour"] = _name(SCENARIOS, row["scenario"]), _name(BEHAVIOURS, row["behaviour"])
        dead.append(DeadLetter(_encoder.encode(row).decode(), f"{kind}: {reasons}", source, received_ts))
    return dead


def _name(names: tuple[str, ...], code: int) -> str | int:
    """A code's wire name, or the code itself when it names nothing (a bad code)."""
    return names[code] if 0 <= code < len(names) else code
