"""ValueProto bytes for whole columns at once, with numpy, both ways: what `features.store`
writes into Feast's SQLite online table instead of building and serialising one protobuf per
value (which cost as much as the SQLite writes themselves), and reads back without parsing
one protobuf per value. Every encoder is byte-identical to `ValueProto.SerializeToString`,
and every decoder returns what `ValueProto.ParseFromString` finds (tests/test_features.py
and tests/test_feature_codec.py check both against protobuf itself, the reference).

Lists are encoded as a per-list header (a handful of bytes that depend only on the list's
payload size, cached) followed by a slice of one packed-varint buffer built for the whole
column: a sequence write encodes each column once with numpy and then does two byte copies
per list. A column whose values all have one varint width (timestamps: 6 bytes; behaviour
and scenario codes: 1 byte) skips the per-value length computation entirely.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

# Wire format (protobuf): a field is a tag byte (field number << 3 | wire type) and its value.
# Value.int64_val is field 4 (varint), double_val field 5 (8 bytes), int64_list_val field 14
# and double_list_val field 15 (length-delimited Int64List / DoubleList, whose `val` is
# field 1, packed: varints / 8-byte doubles).

_INT64_TAG, _DOUBLE_TAG, _INT64_LIST_TAG, _DOUBLE_LIST_TAG, _PACKED_VAL_TAG = 0x20, 0x29, 0x72, 0x7A, 0x0A
_MAX_VARINT_BYTES = 10


# -- varints ---------------------------------------------------------------------------------


def _varint_width(unsigned: int) -> int:
    """Bytes in the varint of a non-negative Python int."""
    return max(1, (unsigned.bit_length() + 6) // 7)


def _varint_bytes(unsigned: int) -> bytes:
    """The varint of a non-negative Python int (for headers: a few per message)."""
    out = bytearray()
    while unsigned >= 0x80:
        out.append(unsigned & 0x7F | 0x80)
        unsigned >>= 7
    out.append(unsigned)
    return bytes(out)


def _fixed_width_varints(unsigned: np.ndarray, width: int) -> np.ndarray:
    """Varints of uint64 values that all take `width` bytes, back to back."""
    if width == 1:
        return unsigned.astype(np.uint8)
    out = np.empty((len(unsigned), width), np.uint8)
    for j in range(width):
        out[:, j] = (unsigned >> np.uint64(7 * j)).astype(np.uint8)
    out[:, :-1] |= np.uint8(0x80)  # continuation bit on all but the last byte
    out[:, -1] &= np.uint8(0x7F)
    return out.ravel()


def _varints(values: np.ndarray) -> tuple[np.ndarray, int | np.ndarray]:
    """The base-128 varints of int64 `values` back to back, and their width: one int when
    every value takes the same number of bytes (then no per-value lengths are computed),
    else each value's length. Negative numbers take 10 bytes (their two's complement), as
    protobuf encodes int64."""
    unsigned = np.ascontiguousarray(values, np.int64).view(np.uint64)
    if len(unsigned) == 0:
        return np.zeros(0, np.uint8), 1
    narrowest, widest = _varint_width(int(unsigned.min())), _varint_width(int(unsigned.max()))
    if narrowest == widest:  # widths grow with the value, so every value has this width
        return _fixed_width_varints(unsigned, widest), widest
    length = np.full(len(unsigned), narrowest, np.int64)
    for k in range(narrowest, widest):
        length += unsigned >= np.uint64(1 << (7 * k))
    out = np.empty((len(unsigned), widest), np.uint8)  # byte j of value i, if it has one
    for j in range(widest):
        out[:, j] = (unsigned >> np.uint64(7 * j)).astype(np.uint8) & np.uint8(0x7F)
        out[:, j] |= (length > j + 1).view(np.uint8) << np.uint8(7)  # continuation bit
    return out[np.arange(widest)[None, :] < length[:, None]], length


def _byte_sizes(width: int | np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Bytes of each list's packed values, from the values' widths (see `_varints`)."""
    if isinstance(width, int):
        return lengths * width
    bounds = np.zeros(len(width) + 1, np.int64)
    np.cumsum(width, out=bounds[1:])
    ends = np.cumsum(lengths)
    return bounds[ends] - bounds[ends - lengths]


# -- encoding ----------------------------------------------------------------------------------


def _slices(prefix: Callable[[int], bytes], data: np.ndarray, sizes: np.ndarray) -> list[bytes]:
    """Message i is `prefix(sizes[i])` then the next `sizes[i]` bytes of `data`: one byte
    copy per message (bytes + memoryview), no per-value work in Python."""
    view = memoryview(data.tobytes())
    out, start = [], 0
    for size in sizes.tolist():
        out.append(prefix(size) + view[start:start + size])
        start += size
    return out


def encode_int64s(values: np.ndarray) -> list[bytes]:
    """`ValueProto(int64_val=v).SerializeToString()` for each value."""
    data, width = _varints(values)
    sizes = np.full(len(np.asarray(values)), width, np.int64) if isinstance(width, int) else width
    tag = bytes([_INT64_TAG])
    return _slices(lambda _: tag, data, sizes)


def encode_float64s(values: np.ndarray) -> list[bytes]:
    """`ValueProto(double_val=v).SerializeToString()` for each value."""
    doubles = np.ascontiguousarray(values, "<f8")
    tag = bytes([_DOUBLE_TAG])
    return _slices(lambda _: tag, doubles.view(np.uint8), np.full(len(doubles), 8, np.int64))


_LIST_HEADERS: dict[tuple[int, int], bytes] = {}  # (list tag, payload bytes) -> header


def _list_header(list_tag: int, payload: int) -> bytes:
    """Everything of a list ValueProto before its packed values; depends only on their size.
    An empty list is still a set (empty) list, as `SetInParent` leaves it."""
    header = _LIST_HEADERS.get((list_tag, payload))
    if header is None:
        if payload == 0:
            header = bytes([list_tag, 0])
        else:
            packed = bytes([_PACKED_VAL_TAG]) + _varint_bytes(payload)
            header = bytes([list_tag]) + _varint_bytes(len(packed) + payload) + packed
        if len(_LIST_HEADERS) < 1 << 16:
            _LIST_HEADERS[(list_tag, payload)] = header
    return header


def encode_int64_lists(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The int64_list_val ValueProto of each list (`lengths[i]` values of `flat`, in order),
    as `ValueProto.SerializeToString()` writes it."""
    data, width = _varints(flat)
    sizes = _byte_sizes(width, np.asarray(lengths, np.int64))
    return _slices(lambda size: _list_header(_INT64_LIST_TAG, size), data, sizes)


def encode_float64_lists(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The double_list_val ValueProto of each list, as `ValueProto.SerializeToString()` writes it."""
    doubles = np.ascontiguousarray(flat, "<f8")
    sizes = np.asarray(lengths, np.int64) * 8
    return _slices(lambda size: _list_header(_DOUBLE_LIST_TAG, size), doubles.view(np.uint8), sizes)


# -- decoding ----------------------------------------------------------------------------------


class _NotOurLayout(ValueError):
    """A blob this decoder does not take apart (another writer's layout, unset, corrupt);
    the caller falls back to protobuf."""


def _read_varint(blob: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(blob) or shift >= 7 * _MAX_VARINT_BYTES:
            raise _NotOurLayout("truncated varint")
        byte = blob[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _parse_list_header(blob: bytes, list_tag: int) -> bytes:
    """The header of a list ValueProto laid out as `encode_*_lists` writes it: the list
    field, its length, and (unless empty) one packed run that fills the rest."""
    if not blob or blob[0] != list_tag:
        raise _NotOurLayout("not a list of this type")
    inner, at = _read_varint(blob, 1)
    if at + inner != len(blob):
        raise _NotOurLayout("trailing bytes")
    if inner == 0:
        return bytes(blob[:at])
    if blob[at] != _PACKED_VAL_TAG:
        raise _NotOurLayout("not packed")
    size, at = _read_varint(blob, at + 1)
    if at + size != len(blob):
        raise _NotOurLayout("more than one packed run")
    return bytes(blob[:at])


_HEADERS_BY_SIZE: dict[tuple[int, int], bytes] = {}  # (list tag, blob size) -> its header


def _list_payloads(blobs: Sequence[bytes], list_tag: int) -> list[memoryview]:
    """The packed values of each list ValueProto. Our header is a function of the blob's
    size, so it is parsed once per size and afterwards only compared (`startswith`)."""
    out = []
    for blob in blobs:
        header = _HEADERS_BY_SIZE.get((list_tag, len(blob)))
        if header is None or not blob.startswith(header):
            header = _parse_list_header(blob, list_tag)
            if len(_HEADERS_BY_SIZE) < 1 << 16:
                _HEADERS_BY_SIZE[(list_tag, len(blob))] = header
        out.append(memoryview(blob)[len(header):])
    return out


def _scalar_payloads(blobs: Sequence[bytes], tag: int) -> list[memoryview]:
    out = []
    for blob in blobs:
        if not blob or blob[0] != tag:
            raise _NotOurLayout("not a scalar of this type")
        out.append(memoryview(blob)[1:])
    return out


def _decode_fixed_varints(buf: np.ndarray, width: int) -> np.ndarray:
    """int64 values of back-to-back varints that all take `width` bytes."""
    digits = (buf.reshape(-1, width) & np.uint8(0x7F)).astype(np.uint64)
    out = digits[:, 0].copy()
    for j in range(1, width):
        out |= digits[:, j] << np.uint64(7 * j)
    return out.view(np.int64)


def _decode_mixed_varints(buf: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int64 values of back-to-back varints of any widths (`ends`: buf < 0x80)."""
    end_at = np.flatnonzero(ends)
    widths = end_at.copy()
    widths[1:] -= end_at[:-1]
    widths[0] += 1
    if int(widths.max()) > _MAX_VARINT_BYTES:
        raise _NotOurLayout("varint over 10 bytes")
    starts = end_at - widths + 1
    position = np.arange(len(buf)) - np.repeat(starts, widths)
    digits = (buf & np.uint8(0x7F)).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.bitwise_or.reduceat(digits, starts).view(np.int64)


def _decode_varint_payloads(payloads: list[memoryview]) -> tuple[np.ndarray, np.ndarray]:
    """Values of each payload (packed varints), flat, and how many each payload holds.
    A column of one width (codes: 1 byte, timestamps: 6) needs no per-value lengths."""
    sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
    buf = np.frombuffer(b"".join(payloads), np.uint8)
    if len(buf) == 0:
        return np.zeros(0, np.int64), np.zeros(len(payloads), np.int64)
    ends = buf < 0x80
    n_values = int(np.count_nonzero(ends))
    if n_values == len(buf):
        return buf.astype(np.int64), sizes
    width = len(buf) // n_values if n_values else 0
    if (0 < width <= _MAX_VARINT_BYTES and width * n_values == len(buf) and ends[width - 1::width].all()
            and not np.any(sizes % width)):  # every value `width` bytes, none across payloads
        return _decode_fixed_varints(buf, width), sizes // width
    payload_ends = np.cumsum(sizes)
    if not ends[-1] or np.any(buf[payload_ends[sizes > 0] - 1] >= 0x80):  # a varint runs on
        raise _NotOurLayout("truncated varint")
    counted = np.zeros(len(buf) + 1, np.int64)
    np.cumsum(ends, out=counted[1:])
    counts = counted[payload_ends]
    counts[1:] -= counted[payload_ends[:-1]]
    return _decode_mixed_varints(buf, ends), counts


def decode_int64_lists(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The values of int64_list_val ValueProtos, back to back, and each list's length:
    what `ValueProto.FromString(blob).int64_list_val.val` holds, for every blob at once.
    Bytes in another layout than ours (still valid protobuf) go through protobuf."""
    try:
        return _decode_varint_payloads(_list_payloads(blobs, _INT64_LIST_TAG))
    except _NotOurLayout:
        return _flatten([ValueProto.FromString(b).int64_list_val.val for b in blobs], np.int64)


def decode_float64_lists(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`decode_int64_lists` for double_list_val."""
    try:
        payloads = _list_payloads(blobs, _DOUBLE_LIST_TAG)
    except _NotOurLayout:
        return _flatten([ValueProto.FromString(b).double_list_val.val for b in blobs], np.float64)
    sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
    if np.any(sizes % 8):  # a parsed header promises whole doubles; never seen
        raise ValueError("double list payload is not whole doubles")
    return np.frombuffer(b"".join(payloads), "<f8").astype(np.float64), sizes // 8


def decode_int64s(blobs: Sequence[bytes]) -> np.ndarray:
    """`ValueProto.FromString(blob).int64_val` of each blob."""
    try:
        values, counts = _decode_varint_payloads(_scalar_payloads(blobs, _INT64_TAG))
        if np.any(counts != 1):
            raise _NotOurLayout("not one value per blob")
        return values
    except _NotOurLayout:
        return np.array([ValueProto.FromString(b).int64_val for b in blobs], np.int64)


def _flatten(lists: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(values) for values in lists], np.int64)
    flat = np.fromiter((v for values in lists for v in values), dtype, int(lengths.sum()))
    return flat, lengths
