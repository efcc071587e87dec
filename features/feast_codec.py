"""ValueProto bytes for whole columns at once, with numpy: what `features.store` writes into
Feast's SQLite online table instead of building and serialising one protobuf per value
(which cost as much as the SQLite writes themselves). Every encoder is byte-identical to
`ValueProto.SerializeToString` (tests/test_features.py checks it against protobuf).
"""

from __future__ import annotations

import numpy as np

# Wire format (protobuf): a field is a tag byte (field number << 3 | wire type) and its value.
# Value.int64_val is field 4 (varint), double_val field 5 (8 bytes), int64_list_val field 14
# and double_list_val field 15 (length-delimited Int64List / DoubleList, whose `val` is
# field 1, packed: varints / 8-byte doubles).

_INT64_TAG, _DOUBLE_TAG, _INT64_LIST_TAG, _DOUBLE_LIST_TAG, _PACKED_VAL_TAG = 0x20, 0x29, 0x72, 0x7A, 0x0A
_VARINT_LIMITS = [np.uint64(1) << np.uint64(7 * k) for k in range(1, 10)]  # one more byte from each


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The base-128 varints of int64 `values` back to back, and each one's length in bytes.
    Negative numbers take 10 bytes (their two's complement), as protobuf encodes int64."""
    unsigned = np.ascontiguousarray(values, np.int64).view(np.uint64)
    length = np.ones(len(unsigned), np.int64)
    largest = unsigned.max(initial=np.uint64(0))
    for limit in _VARINT_LIMITS:
        if limit > largest:
            break
        length += unsigned >= limit
    width = int(length.max(initial=0))
    out = np.empty((len(unsigned), width), np.uint8)  # byte j of value i, if it has one
    for j in range(width):
        out[:, j] = (unsigned >> np.uint64(7 * j)).astype(np.uint8) & np.uint8(0x7F)
        out[:, j] |= (length > j + 1).view(np.uint8) << np.uint8(7)  # continuation bit
    if int(length.min(initial=width)) == width:  # e.g. all timestamps, all behaviour codes
        return out.ravel(), length
    return out[np.arange(width)[None, :] < length[:, None]], length


def _constant(byte: int, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A one-byte segment in the messages where `present`, nothing elsewhere."""
    return np.full(int(present.sum()), byte, np.uint8), present.astype(np.int64)


def _messages(segments: list[tuple[np.ndarray, np.ndarray]]) -> list[bytes]:
    """Message i is segment i of each (bytes back to back, length per message) in turn."""
    lengths = np.stack([length for _, length in segments])  # [n_segments, n_messages]
    ends = np.cumsum(lengths.sum(axis=0))
    out = np.empty(int(ends[-1]) if len(ends) else 0, np.uint8)
    offset = ends - lengths.sum(axis=0)  # where the next segment of each message goes
    for (data, length), row in zip(segments, lengths):
        source_start = np.cumsum(length) - length
        out[np.repeat(offset - source_start, length) + np.arange(len(data))] = data
        offset = offset + row
    blob = out.tobytes()
    starts = (ends - lengths.sum(axis=0)).tolist()
    return [blob[a:b] for a, b in zip(starts, ends.tolist())]


def encode_int64s(values: np.ndarray) -> list[bytes]:
    """`ValueProto(int64_val=v).SerializeToString()` for each value."""
    data, length = _varints(values)
    return _messages([_constant(_INT64_TAG, np.ones(len(length), bool)), (data, length)])


def encode_float64s(values: np.ndarray) -> list[bytes]:
    """`ValueProto(double_val=v).SerializeToString()` for each value."""
    doubles = np.ascontiguousarray(values, "<f8")
    return _messages([_constant(_DOUBLE_TAG, np.ones(len(doubles), bool)),
                      (doubles.view(np.uint8), np.full(len(doubles), 8, np.int64))])


def _list_messages(list_tag: int, data: np.ndarray, value_bytes: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """List ValueProtos: `lengths[i]` values per list, each encoded in `value_bytes` bytes of
    `data` (packed). An empty list is still a set (empty) list, as `SetInParent` leaves it."""
    lengths = np.asarray(lengths, np.int64)
    payload = np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=value_bytes,
                          minlength=len(lengths)).astype(np.int64)
    nonempty = payload > 0
    payload_header, payload_header_length = _varints(payload[nonempty])
    header_length = np.zeros(len(lengths), np.int64)
    header_length[nonempty] = payload_header_length
    inner = np.where(nonempty, 1 + header_length + payload, 0)  # the Int64List / DoubleList message
    return _messages([_constant(list_tag, np.ones(len(lengths), bool)), _varints(inner),
                      _constant(_PACKED_VAL_TAG, nonempty), (payload_header, header_length),
                      (data, payload)])


def encode_int64_lists(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The int64_list_val ValueProto of each list (`lengths[i]` values of `flat`, in order),
    as `ValueProto.SerializeToString()` writes it."""
    return _list_messages(_INT64_LIST_TAG, *_varints(flat), lengths)


def encode_float64_lists(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The double_list_val ValueProto of each list, as `ValueProto.SerializeToString()` writes it."""
    doubles = np.ascontiguousarray(flat, "<f8")
    return _list_messages(_DOUBLE_LIST_TAG, doubles.view(np.uint8), np.full(len(doubles), 8, np.int64), lengths)
