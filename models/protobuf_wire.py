"""The protobuf wire format, read strictly: one message's fields from bytes, within budgets.

Any input is either fields or a ``ModelFormatError`` with a reason: lengths are checked
against the bytes that hold them before anything is sliced, varints are at most 10 bytes
and 64 bits, groups and unknown wire types are refused, and a ``Budget`` shared by all the
messages of one file caps the Python objects a hostile file can make the reader hold.
Which fields a message has, and what they mean, is the caller's (``onnx_reader``).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError, UnsupportedModelError

__all__ = ["MAX_FIELDS", "MAX_VARINT_VALUES", "Budget", "WireMessage", "signed", "utf8"]

_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH: Final = 2
_FIXED32: Final = 5
_MAX_VARINT_BYTES: Final = 10
_UINT64: Final = 1 << 64
_INT64_MIN: Final = -(1 << 63)
# Budgets that keep a hostile file's Python objects within a few MB whatever its size: a
# model written by onnx has a few hundred fields and keeps tensor data in raw_data.
MAX_FIELDS: Final = 100_000  # fields of all messages together
MAX_VARINT_VALUES: Final = 1_000_000  # values of packed varint fields together (int64_data)


class Budget:
    """What one file may still make the reader hold, counted across all its messages."""

    __slots__ = ("fields", "varints")

    def __init__(self) -> None:
        self.fields = MAX_FIELDS
        self.varints = MAX_VARINT_VALUES


class WireMessage:
    """One message's fields, parsed once: field number -> [(wire type, value)], where the
    value is the integer of a varint or fixed field and a (start, end) span otherwise."""

    __slots__ = ("budget", "data", "fields", "what")

    def __init__(self, data: bytes, start: int, end: int, what: str, budget: Budget) -> None:
        self.data = data
        self.what = what
        self.budget = budget
        fields: dict[int, list[tuple[int, int | tuple[int, int]]]] = {}
        position = start
        while position < end:
            key, position = _varint(data, position, end, what)
            number, wire = key >> 3, key & 7
            if number == 0 or number >= 1 << 29:
                raise ModelFormatError(f"{what}: field number {number} is invalid")
            value: int | tuple[int, int]
            if wire == _VARINT:
                value, position = _varint(data, position, end, what)
            elif wire in (_FIXED64, _FIXED32):
                size = 8 if wire == _FIXED64 else 4
                if end - position < size:
                    raise ModelFormatError(f"{what}: field {number} is truncated")
                value = int.from_bytes(data[position : position + size], "little")
                position += size
            elif wire == _LENGTH:
                length, position = _varint(data, position, end, what)
                if length > end - position:
                    raise ModelFormatError(
                        f"{what}: field {number} claims {length} bytes, {end - position} remain"
                    )
                value = (position, position + length)
                position += length
            else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
                raise ModelFormatError(f"{what}: field {number} has wire type {wire}")
            budget.fields -= 1
            if budget.fields < 0:
                raise ModelFormatError(f"{what}: more than {MAX_FIELDS} fields in the file")
            fields.setdefault(number, []).append((wire, value))
        self.fields = fields

    def has(self, number: int) -> bool:
        return number in self.fields

    def _single(self, number: int, wire: int, name: str) -> int | tuple[int, int] | None:
        entries = self.fields.get(number)
        if not entries:
            return None
        if len(entries) > 1:
            raise UnsupportedModelError(f"{self.what}: {name} is given {len(entries)} times")
        found, value = entries[0]
        if found != wire:
            raise ModelFormatError(f"{self.what}: {name} has wire type {found}, not {wire}")
        return value

    def uint(self, number: int, name: str, default: int = 0) -> int:
        value = self._single(number, _VARINT, name)
        return default if value is None else int(value)  # type: ignore[arg-type]

    def int64(self, number: int, name: str, default: int = 0) -> int:
        return signed(self.uint(number, name, default))

    def int32(self, number: int, name: str, default: int = 0) -> int:
        value = self.int64(number, name, default)
        if not -(1 << 31) <= value < 1 << 31:
            raise ModelFormatError(f"{self.what}: {name} {value} is not an int32")
        return value

    def float32(self, number: int, name: str) -> float:
        value = self._single(number, _FIXED32, name)
        raw = 0 if value is None else int(value)  # type: ignore[arg-type]
        return float(np.frombuffer(raw.to_bytes(4, "little"), "<f4")[0])

    def span(self, number: int, name: str) -> tuple[int, int] | None:
        return self._single(number, _LENGTH, name)  # type: ignore[return-value]

    def text(self, number: int, name: str) -> str:
        span = self.span(number, name)
        return "" if span is None else utf8(self.data, span, f"{self.what}: {name}")

    def spans(self, number: int, name: str) -> list[tuple[int, int]]:
        out = []
        for wire, value in self.fields.get(number, ()):
            if wire != _LENGTH:
                raise ModelFormatError(f"{self.what}: {name} has wire type {wire}, not 2")
            out.append(value)
        return out  # type: ignore[return-value]

    def texts(self, number: int, name: str) -> tuple[str, ...]:
        what = f"{self.what}: {name}"
        return tuple(utf8(self.data, span, what) for span in self.spans(number, name))

    def messages(self, number: int, name: str) -> list[WireMessage]:
        what = f"{self.what}.{name}"
        return [
            WireMessage(self.data, start, end, what, self.budget)
            for start, end in self.spans(number, name)
        ]

    def message(self, number: int, name: str) -> WireMessage | None:
        span = self.span(number, name)
        if span is None:
            return None
        return WireMessage(self.data, *span, f"{self.what}.{name}", self.budget)

    def packed_varints(self, number: int, name: str, limit: int) -> list[int]:
        """A repeated varint field, packed or not (protobuf accepts both), of at most
        ``limit`` values (and within the file's budget)."""
        values: list[int] = []
        what = f"{self.what}: {name}"
        for wire, value in self.fields.get(number, ()):
            if wire == _VARINT:
                values.append(int(value))  # type: ignore[arg-type]
            elif wire == _LENGTH:
                start, end = value  # type: ignore[misc]
                while start < end and len(values) <= limit:
                    item, start = _varint(self.data, start, end, what)
                    values.append(item)
            else:
                raise ModelFormatError(f"{what} has wire type {wire}")
            if len(values) > limit:
                raise ModelFormatError(f"{what} holds more than {limit} values")
        self.budget.varints -= len(values)
        if self.budget.varints < 0:
            raise ModelFormatError(f"{what}: more than {MAX_VARINT_VALUES} varints in the file")
        return values

    def packed_fixed(self, number: int, name: str, dtype: str) -> npt.NDArray[np.generic]:
        """A repeated fixed32/fixed64 field (float_data, double_data), packed or not."""
        size = np.dtype(dtype).itemsize
        wire_single = _FIXED32 if size == 4 else _FIXED64
        chunks: list[bytes] = []
        for wire, value in self.fields.get(number, ()):
            if wire == wire_single:
                chunks.append(int(value).to_bytes(size, "little"))  # type: ignore[arg-type]
            elif wire == _LENGTH:
                start, end = value  # type: ignore[misc]
                if (end - start) % size:
                    raise ModelFormatError(f"{self.what}: {name} is not a multiple of {size}")
                chunks.append(self.data[start:end])
            else:
                raise ModelFormatError(f"{self.what}: {name} has wire type {wire}")
        return np.frombuffer(b"".join(chunks), dtype)


def _varint(data: bytes, position: int, end: int, what: str) -> tuple[int, int]:
    result = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if position >= end:
            raise ModelFormatError(f"{what}: truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >= _UINT64:
                raise ModelFormatError(f"{what}: varint beyond 64 bits")
            return result, position
        shift += 7
    raise ModelFormatError(f"{what}: varint longer than {_MAX_VARINT_BYTES} bytes")


def signed(value: int) -> int:
    return value - _UINT64 if value >= 1 << 63 else value


def utf8(data: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return data[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{what} is not UTF-8: {exc.reason}") from exc
