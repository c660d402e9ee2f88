"""Protobuf's wire format, written directly: tags, varints, length-delimited fields, scalar AnyValues.

The span encoder (gateway.telemetry.encoding) writes the OTLP fields it
knows with these; tags come from the generated descriptors, so a field's
number and wire type are never written out by hand.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

#: the wire type of each field type the encoder writes: varint 0, 64-bit 1, length-delimited 2, 32-bit 5
_WIRE_TYPES = {FieldDescriptor.TYPE_ENUM: 0, FieldDescriptor.TYPE_UINT32: 0, FieldDescriptor.TYPE_INT64: 0,
               FieldDescriptor.TYPE_BOOL: 0, FieldDescriptor.TYPE_FIXED64: 1, FieldDescriptor.TYPE_DOUBLE: 1,
               FieldDescriptor.TYPE_BYTES: 2, FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_MESSAGE: 2,
               FieldDescriptor.TYPE_FIXED32: 5}


def tag(message: Any, name: str) -> bytes:
    """The wire tag of a message's field, (number << 3) | wire type, both from the generated descriptor."""
    descriptor = message.DESCRIPTOR.fields_by_name[name]
    return varint(descriptor.number << 3 | _WIRE_TYPES[descriptor.type])


def varint(value: int) -> bytes:
    """Protobuf's varint: seven bits a byte, least significant first, the high bit set on all but the last."""
    if value < 0x80:                         # most counts, lengths and enums
        return _ONE_BYTE[value]
    if value < 0x4000:                       # most spans' lengths
        return _TWO_BYTES(value & 0x7F | 0x80, value >> 7)
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: each one-byte varint, made once: bytes((value,)) costs several times a lookup
_ONE_BYTE = [bytes((value,)) for value in range(0x80)]
_TWO_BYTES = struct.Struct("BB").pack        # half the time of bytes((low, high))


def field(head: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag (`head`), the payload's length, the payload."""
    return head + varint(len(payload)) + payload


_ANY_STRING = tag(AnyValue, "string_value")
_ANY_INT = tag(AnyValue, "int_value")
_ANY_DOUBLE = tag(AnyValue, "double_value")
#: a oneof member is written even at its default (false, 0, "", 0.0), unlike a plain proto3 field
_ANY_BOOLS = {False: tag(AnyValue, "bool_value") + b"\x00", True: tag(AnyValue, "bool_value") + b"\x01"}
_INT64_MIN, _INT64_MAX, _UINT64_MASK = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_pack_double = struct.Struct("<d").pack      # fixed64, little-endian IEEE 754: nan's bits and -0.0's sign kept


def _any_string(value: str) -> bytes:
    return field(_ANY_STRING, value.encode())     # UnicodeEncodeError for a lone surrogate, as protobuf raises


def _any_int(value: int) -> bytes | None:
    """int_value, a varint of the two's complement (ten bytes for a negative); None past int64, which protobuf
    rejects."""
    if _INT64_MIN <= value <= _INT64_MAX:
        return _ANY_INT + varint(value & _UINT64_MASK)
    return None


def _any_double(value: float) -> bytes:
    return _ANY_DOUBLE + _pack_double(value)


#: the AnyValue of each exact type _encode_value gives a scalar member; its subclasses are left to protobuf
ANY_VALUES = {str: _any_string, bool: _ANY_BOOLS.__getitem__, int: _any_int, float: _any_double}
