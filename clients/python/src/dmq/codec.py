"""The wire codec (PROTOCOL.md sections 2, 3, 5, 6): sans-IO, no sockets.

Owns: :class:`Opcode`, the value types of section 3 and one dataclass per
body of section 6, :func:`encode_frame` (a :class:`Frame` to bytes) and
:func:`decode_frame` (bytes to ``(Frame, consumed)``, or None to read
more). Decoding is strict like the Rust reference codec: a field running
past the frame, trailing bytes, a bool or option tag other than 0/1,
invalid UTF-8, a list count larger than what is left, an unknown opcode,
a push with a correlation id other than 0, a length below 7 or over the
maximum frame size all raise :class:`~dmq.errors.ProtocolError`.

The producer's hot path does not build :class:`Record` objects: it uses
:func:`encode_record` and :func:`produce_frame` on pre-encoded records.
:func:`key_partition` is the broker's partition of a keyed record (6.38),
part of the wire contract so that a producer routing a key to its
partition's leader puts it where the broker would.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from .errors import ProtocolError

#: Bytes of the length prefix.
LENGTH_PREFIX_BYTES = 4
#: Bytes after the length prefix before the body (opcode, correlation id, flags).
HEADER_AFTER_LENGTH_BYTES = 7
#: The smallest frame (empty body).
MIN_FRAME_BYTES = 11
#: Default maximum frame size, length prefix included (16 MiB).
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
#: Frame limit before HELLO_OK (section 4).
MAX_FRAME_BYTES_BEFORE_HELLO = 64 * 1024
#: Headroom between the frame limit and the record limit (section 8).
RECORD_HEADROOM_BYTES = 1024
#: The protocol version this client speaks.
PROTOCOL_VERSION = 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_HEADER = struct.Struct("<IHIB")  # length, opcode, correlation id, flags
_PRODUCED = struct.Struct("<IB")


class Opcode(enum.IntEnum):
    """Section 5. Numbers are permanent."""

    HELLO = 0x0001
    PING = 0x0002
    PRODUCE = 0x0010
    CANCEL_DELAY = 0x0011
    DELETE_MESSAGES = 0x0012
    TXN_PRODUCE = 0x0013
    TXN_END = 0x0014
    TXN_LISTEN = 0x0015
    TXN_INIT = 0x0016
    TXN_ACK = 0x0017
    TXN_PRODUCE_SEQ = 0x0018
    SUBSCRIBE = 0x0020
    UNSUBSCRIBE = 0x0021
    CREDIT = 0x0022
    FETCH = 0x0023
    ACK = 0x0024
    NACK = 0x0025
    SEEK = 0x0026
    CREATE_TOPIC = 0x0030
    DELETE_TOPIC = 0x0031
    LIST_TOPICS = 0x0032
    DESCRIBE_TOPIC = 0x0033
    PARTITION_LEADERS = 0x0034
    LIST_GROUPS = 0x0040
    DESCRIBE_GROUP = 0x0041
    DELETE_GROUP = 0x0042
    OK = 0x8000
    HELLO_OK = 0x8001
    PONG = 0x8002
    PRODUCE_OK = 0x8010
    CANCEL_DELAY_OK = 0x8011
    TXN_PRODUCE_OK = 0x8013
    TXN_ENDED = 0x8014
    TXN_INIT_OK = 0x8016
    TXN_ACKED = 0x8017
    SUBSCRIBED = 0x8020
    DELIVERIES = 0x8023
    SEEK_REPORT = 0x8026
    TOPICS = 0x8032
    TOPIC_DESCRIPTION = 0x8033
    LEADERS = 0x8034
    GROUPS = 0x8040
    GROUP_DESCRIPTION = 0x8041
    ERROR = 0xBFFF
    DELIVER = 0xC001
    TXN_CHECK = 0xC002

    @property
    def is_request(self) -> bool:
        return self < 0x8000

    @property
    def is_response(self) -> bool:
        return 0x8000 <= self < 0xC000

    @property
    def is_push(self) -> bool:
        return self >= 0xC000


# ----- reading ------------------------------------------------------------------


class Reader:
    """Reads fields from one frame's body; every read is bounds-checked."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: Union[bytes, bytearray, memoryview], pos: int = 0, end: Optional[int] = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def _need(self, n: int, what: str) -> int:
        pos = self.pos
        if pos + n > self.end:
            raise ProtocolError(f"{what}: needs {n} bytes at body offset {pos}, {self.end - pos} left")
        self.pos = pos + n
        return pos

    def remaining(self) -> int:
        return self.end - self.pos

    def u8(self) -> int:
        return self.data[self._need(1, "u8")]

    def u16(self) -> int:
        return int(_U16.unpack_from(self.data, self._need(2, "u16"))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.data, self._need(4, "u32"))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.data, self._need(8, "u64"))[0])

    def i64(self) -> int:
        return int(_I64.unpack_from(self.data, self._need(8, "i64"))[0])

    def boolean(self) -> bool:
        value = self.u8()
        if value > 1:
            raise ProtocolError(f"bool: {value} is neither 0 nor 1")
        return value == 1

    def tag(self) -> bool:
        """An option's tag: True if a value follows."""
        value = self.u8()
        if value > 1:
            raise ProtocolError(f"option tag {value} is neither 0 nor 1")
        return value == 1

    def raw(self, n: int) -> bytes:
        pos = self._need(n, "bytes")
        return bytes(self.data[pos : pos + n])

    def string(self) -> str:
        n = self.u16()
        try:
            return self.raw(n).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(f"string: invalid UTF-8 ({error})") from None

    def bytes_(self) -> bytes:
        return self.raw(self.u32())

    def count(self, smallest: int) -> int:
        """A list count, checked against what is left (section 3)."""
        n = self.u32()
        if n * smallest > self.end - self.pos:
            raise ProtocolError(f"list of {n} items of at least {smallest} bytes exceeds the {self.end - self.pos} bytes left")
        return n

    def opt_u32(self) -> Optional[int]:
        return self.u32() if self.tag() else None

    def opt_u64(self) -> Optional[int]:
        return self.u64() if self.tag() else None

    def opt_i64(self) -> Optional[int]:
        return self.i64() if self.tag() else None

    def opt_bytes(self) -> Optional[bytes]:
        return self.bytes_() if self.tag() else None

    def opt_string(self) -> Optional[str]:
        return self.string() if self.tag() else None

    def message_id(self) -> bytes:
        return self.raw(16)


# ----- writing ------------------------------------------------------------------


def _w_string(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} bytes exceeds 65,535")
    out += _U16.pack(len(data))
    out += data


def _w_bytes(out: bytearray, value: bytes) -> None:
    out += _U32.pack(len(value))
    out += value


def _w_bool(out: bytearray, value: bool) -> None:
    out.append(1 if value else 0)


def _w_opt(out: bytearray, value: Optional[int], packer: struct.Struct) -> None:
    if value is None:
        out.append(0)
    else:
        out.append(1)
        out += packer.pack(value)


def _w_message_id(out: bytearray, value: bytes) -> None:
    if len(value) != 16:
        raise ValueError("a message id is 16 bytes")
    out += value


# ----- value types (section 3.1) ------------------------------------------------


@dataclass(frozen=True)
class Header:
    """An application header."""

    name: bytes
    value: bytes


class DeliveryMode(enum.IntEnum):
    """Clustering: each message to one member; broadcast: to every member."""

    CLUSTERING = 0
    BROADCAST = 1


@dataclass(frozen=True)
class Position:
    """A start position or seek target: tag 0 earliest, 1 latest, 2 time
    (``value`` = ms since epoch), 3 offset (``value``)."""

    tag: int
    value: int = 0

    EARLIEST = 0
    LATEST = 1
    TIMESTAMP = 2
    OFFSET = 3

    @classmethod
    def earliest(cls) -> Position:
        return cls(0)

    @classmethod
    def latest(cls) -> Position:
        return cls(1)

    @classmethod
    def at_time(cls, timestamp_ms: int) -> Position:
        return cls(2, timestamp_ms)

    @classmethod
    def at_offset(cls, offset: int) -> Position:
        return cls(3, offset)

    def encode(self, out: bytearray) -> None:
        out.append(self.tag)
        if self.tag == 2:
            out += _I64.pack(self.value)
        elif self.tag == 3:
            out += _U64.pack(self.value)
        elif self.tag not in (0, 1):
            raise ValueError(f"position tag {self.tag}")

    @classmethod
    def decode(cls, r: Reader) -> Position:
        tag = r.u8()
        if tag in (0, 1):
            return cls(tag)
        if tag == 2:
            return cls(2, r.i64())
        if tag == 3:
            return cls(3, r.u64())
        raise ProtocolError(f"position tag {tag}")


@dataclass(frozen=True)
class DeliveryTime:
    """When a produced record becomes deliverable: tag 0 immediately, 1
    after ``value`` ms, 2 at ``value`` ms since epoch."""

    tag: int = 0
    value: int = 0

    def encode(self, out: bytearray) -> None:
        out.append(self.tag)
        if self.tag == 1:
            out += _U64.pack(self.value)
        elif self.tag == 2:
            out += _I64.pack(self.value)
        elif self.tag != 0:
            raise ValueError(f"delivery_time tag {self.tag}")

    @classmethod
    def decode(cls, r: Reader) -> DeliveryTime:
        tag = r.u8()
        if tag == 0:
            return cls()
        if tag == 1:
            return cls(1, r.u64())
        if tag == 2:
            return cls(2, r.i64())
        raise ProtocolError(f"delivery_time tag {tag}")


@dataclass(frozen=True)
class Backoff:
    """Redelivery backoff: tag 0 a fixed list ``delays_ms``, tag 1
    exponential from ``initial_ms`` to at most ``max_ms``."""

    tag: int
    delays_ms: tuple[int, ...] = ()
    initial_ms: int = 0
    max_ms: int = 0

    @classmethod
    def fixed(cls, delays_ms: list[int]) -> Backoff:
        return cls(0, tuple(delays_ms))

    @classmethod
    def exponential(cls, initial_ms: int, max_ms: int) -> Backoff:
        return cls(1, (), initial_ms, max_ms)

    def encode(self, out: bytearray) -> None:
        out.append(self.tag)
        if self.tag == 0:
            out += _U32.pack(len(self.delays_ms))
            for delay in self.delays_ms:
                out += _U64.pack(delay)
        elif self.tag == 1:
            out += _U64.pack(self.initial_ms)
            out += _U64.pack(self.max_ms)
        else:
            raise ValueError(f"backoff tag {self.tag}")

    @classmethod
    def decode(cls, r: Reader) -> Backoff:
        tag = r.u8()
        if tag == 0:
            return cls(0, tuple(r.u64() for _ in range(r.count(8))))
        if tag == 1:
            return cls(1, (), r.u64(), r.u64())
        raise ProtocolError(f"backoff tag {tag}")


@dataclass(frozen=True)
class GroupSettings:
    """A group's settings; None = broker default (new group) or unchanged."""

    ack_timeout_ms: Optional[int] = None
    max_attempts: Optional[int] = None
    backoff: Optional[Backoff] = None
    max_unacked_per_partition: Optional[int] = None
    rate_limit_per_second: Optional[int] = None
    dead_letter_topic: Optional[str] = None

    def encode(self, out: bytearray) -> None:
        _w_opt(out, self.ack_timeout_ms, _U64)
        _w_opt(out, self.max_attempts, _U32)
        if self.backoff is None:
            out.append(0)
        else:
            out.append(1)
            self.backoff.encode(out)
        _w_opt(out, self.max_unacked_per_partition, _U32)
        _w_opt(out, self.rate_limit_per_second, _U32)
        if self.dead_letter_topic is None:
            out.append(0)
        else:
            out.append(1)
            _w_string(out, self.dead_letter_topic)

    @classmethod
    def decode(cls, r: Reader) -> GroupSettings:
        return cls(
            r.opt_u64(),
            r.opt_u32(),
            Backoff.decode(r) if r.tag() else None,
            r.opt_u32(),
            r.opt_u32(),
            r.opt_string(),
        )


@dataclass(frozen=True)
class MessagePosition:
    """A message's place: partition and offset."""

    partition: int
    offset: int


@dataclass(frozen=True)
class Tombstone:
    """What DELETE_MESSAGES deletes: tag 0 offsets ``start..end`` of
    ``partition``; tag 1 ``message_id``; tag 2 broker times ``start..end``."""

    tag: int
    partition: int = 0
    start: int = 0
    end: int = 0
    message_id: bytes = b""

    def encode(self, out: bytearray) -> None:
        out.append(self.tag)
        if self.tag == 0:
            out += struct.pack("<IQQ", self.partition, self.start, self.end)
        elif self.tag == 1:
            _w_message_id(out, self.message_id)
        elif self.tag == 2:
            out += struct.pack("<qq", self.start, self.end)
        else:
            raise ValueError(f"tombstone tag {self.tag}")

    @classmethod
    def decode(cls, r: Reader) -> Tombstone:
        tag = r.u8()
        if tag == 0:
            return cls(0, r.u32(), r.u64(), r.u64())
        if tag == 1:
            return cls(1, message_id=r.message_id())
        if tag == 2:
            return cls(2, start=r.i64(), end=r.i64())
        raise ProtocolError(f"tombstone tag {tag}")


def _encode_headers(out: bytearray, headers: Union[list[Header], tuple[Header, ...]]) -> None:
    out += _U32.pack(len(headers))
    for header in headers:
        _w_bytes(out, header.name)
        _w_bytes(out, header.value)


def _decode_headers(r: Reader) -> list[Header]:
    return [Header(r.bytes_(), r.bytes_()) for _ in range(r.count(8))]


@dataclass
class Record:
    """A PRODUCE record."""

    value: bytes
    key: Optional[bytes] = None
    headers: list[Header] = field(default_factory=list)
    delivery_time: DeliveryTime = DeliveryTime()
    ttl_ms: Optional[int] = None

    def encode(self, out: bytearray) -> None:
        if self.key is None:
            out.append(0)
        else:
            out.append(1)
            _w_bytes(out, self.key)
        _encode_headers(out, self.headers)
        _w_bytes(out, self.value)
        self.delivery_time.encode(out)
        _w_opt(out, self.ttl_ms, _U64)

    @classmethod
    def decode(cls, r: Reader) -> Record:
        key = r.opt_bytes()
        headers = _decode_headers(r)
        value = r.bytes_()
        return cls(value, key, headers, DeliveryTime.decode(r), r.opt_u64())


def record_size(key: Optional[bytes], headers: Union[list[Header], tuple[Header, ...]], value: bytes) -> int:
    """A record's size as section 8 measures it (key + headers + value)."""
    size = 1 if key is None else 5 + len(key)
    size += 4 + sum(8 + len(h.name) + len(h.value) for h in headers)
    return size + 4 + len(value)


def max_record_bytes(max_frame_bytes: int) -> int:
    """The largest record a broker with this frame limit accepts."""
    return max(max_frame_bytes - RECORD_HEADROOM_BYTES, 0)


def encode_record(
    value: bytes,
    key: Optional[bytes] = None,
    headers: Union[list[Header], tuple[Header, ...]] = (),
    delivery_tag: int = 0,
    delivery_value: int = 0,
    ttl_ms: Optional[int] = None,
) -> bytes:
    """One PRODUCE record's bytes (the producer's fast path)."""
    if key is None and not headers and delivery_tag == 0 and ttl_ms is None:
        return b"\x00\x00\x00\x00\x00" + _U32.pack(len(value)) + value + b"\x00\x00"
    out = bytearray()
    Record(value, key, list(headers), DeliveryTime(delivery_tag, delivery_value), ttl_ms).encode(out)
    return bytes(out)


@dataclass
class Delivery:
    """One message for a subscription (DELIVER push, DELIVERIES item)."""

    subscription_id: int
    topic: str
    partition: int
    offset: int
    attempt: int
    message_id: bytes
    timestamp_ms: int
    key: Optional[bytes]
    headers: list[Header]
    value: bytes
    deliver_at_ms: Optional[int]
    expire_at_ms: Optional[int]

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.subscription_id)
        _w_string(out, self.topic)
        out += struct.pack("<IQI", self.partition, self.offset, self.attempt)
        _w_message_id(out, self.message_id)
        out += _I64.pack(self.timestamp_ms)
        if self.key is None:
            out.append(0)
        else:
            out.append(1)
            _w_bytes(out, self.key)
        _encode_headers(out, self.headers)
        _w_bytes(out, self.value)
        _w_opt(out, self.deliver_at_ms, _I64)
        _w_opt(out, self.expire_at_ms, _I64)

    @classmethod
    def decode(cls, r: Reader) -> Delivery:
        return cls(
            r.u64(),
            r.string(),
            r.u32(),
            r.u64(),
            r.u32(),
            r.message_id(),
            r.i64(),
            r.opt_bytes(),
            _decode_headers(r),
            r.bytes_(),
            r.opt_i64(),
            r.opt_i64(),
        )


# ----- bodies (section 6) ---------------------------------------------------------


class Body:
    """A frame body; each subclass knows its opcode."""

    OPCODE: Opcode

    def encode(self, out: bytearray) -> None:
        raise NotImplementedError

    @classmethod
    def decode(cls, r: Reader) -> Body:
        raise NotImplementedError


@dataclass
class Empty(Body):
    """An empty body (PING, LIST_TOPICS, OK, PONG): the frame's opcode says which."""

    def encode(self, out: bytearray) -> None:
        pass

    @classmethod
    def decode(cls, r: Reader) -> Empty:
        return cls()


@dataclass
class Hello(Body):
    OPCODE = Opcode.HELLO
    min_version: int
    max_version: int
    client_id: str
    secret: bytes

    def encode(self, out: bytearray) -> None:
        out += struct.pack("<HH", self.min_version, self.max_version)
        _w_string(out, self.client_id)
        _w_bytes(out, self.secret)

    @classmethod
    def decode(cls, r: Reader) -> Hello:
        return cls(r.u16(), r.u16(), r.string(), r.bytes_())


@dataclass
class Produce(Body):
    OPCODE = Opcode.PRODUCE
    topic: str
    partition: Optional[int]
    #: ``(producer_id, sequence)`` or None.
    idempotence: Optional[tuple[int, int]]
    records: list[Record]

    def encode(self, out: bytearray) -> None:
        _produce_prefix(out, self.topic, self.partition, self.idempotence, len(self.records))
        for record in self.records:
            record.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> Produce:
        topic = r.string()
        partition = r.opt_u32()
        idempotence = (r.u64(), r.u64()) if r.tag() else None
        return cls(topic, partition, idempotence, [Record.decode(r) for _ in range(r.count(11))])


def _produce_prefix(out: bytearray, topic: str, partition: Optional[int], idempotence: Optional[tuple[int, int]], count: int) -> None:
    _w_string(out, topic)
    _w_opt(out, partition, _U32)
    if idempotence is None:
        out.append(0)
    else:
        out.append(1)
        out += struct.pack("<QQ", idempotence[0], idempotence[1])
    out += _U32.pack(count)


@dataclass
class TxnProduce(Body):
    """6.27: half messages of a transaction (``handle`` 0 begins one)."""

    OPCODE = Opcode.TXN_PRODUCE
    producer_group: str
    transaction_id: str
    handle: int
    topic: str
    partition: Optional[int]
    records: list[Record]

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)
        _w_string(out, self.transaction_id)
        out += _U64.pack(self.handle)
        _w_string(out, self.topic)
        _w_opt(out, self.partition, _U32)
        out += _U32.pack(len(self.records))
        for record in self.records:
            record.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> TxnProduce:
        group = r.string()
        txn = r.string()
        handle = r.u64()
        topic = r.string()
        partition = r.opt_u32()
        return cls(group, txn, handle, topic, partition, [Record.decode(r) for _ in range(r.count(11))])


@dataclass
class TxnProduceSeq(Body):
    """6.37: a TXN_PRODUCE numbered within its transaction (``sequence`` 0
    for the one that begins it, one more for each later produce of it), so
    that one retried after a lost answer gets the first answer instead of
    storing its records again. Answered by TXN_PRODUCE_OK."""

    OPCODE = Opcode.TXN_PRODUCE_SEQ
    #: The request, as TXN_PRODUCE (its fields come first on the wire).
    produce: TxnProduce
    sequence: int

    def encode(self, out: bytearray) -> None:
        self.produce.encode(out)
        out += _U32.pack(self.sequence)

    @classmethod
    def decode(cls, r: Reader) -> TxnProduceSeq:
        produce = TxnProduce.decode(r)
        return cls(produce, r.u32())


#: TXN_END / TXN_ENDED outcomes.
TXN_COMMIT = 1
TXN_ROLLBACK = 2


def _txn_outcome(r: Reader) -> int:
    outcome = r.u8()
    if outcome not in (TXN_COMMIT, TXN_ROLLBACK):
        raise ProtocolError(f"outcome: invalid value {outcome}")
    return outcome


@dataclass
class TxnEnd(Body):
    """6.28: commit (1) or roll back (2) a transaction."""

    OPCODE = Opcode.TXN_END
    producer_group: str
    transaction_id: str
    handle: int
    outcome: int

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)
        _w_string(out, self.transaction_id)
        out += _U64.pack(self.handle)
        out.append(self.outcome)

    @classmethod
    def decode(cls, r: Reader) -> TxnEnd:
        return cls(r.string(), r.string(), r.u64(), _txn_outcome(r))


@dataclass
class TxnListen(Body):
    """6.31: receive the check-backs of a producer group."""

    OPCODE = Opcode.TXN_LISTEN
    producer_group: str

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)

    @classmethod
    def decode(cls, r: Reader) -> TxnListen:
        return cls(r.string())


@dataclass
class TxnInit(Body):
    """6.33: register (epoch 0) or resume a transactional producer instance."""

    OPCODE = Opcode.TXN_INIT
    producer_group: str
    producer_id: str
    epoch: int

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)
        _w_string(out, self.producer_id)
        out += _U32.pack(self.epoch)

    @classmethod
    def decode(cls, r: Reader) -> TxnInit:
        return cls(r.string(), r.string(), r.u32())


@dataclass
class TxnInitOk(Body):
    """6.34: the instance's epoch."""

    OPCODE = Opcode.TXN_INIT_OK
    epoch: int

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(self.epoch)

    @classmethod
    def decode(cls, r: Reader) -> TxnInitOk:
        return cls(r.u32())


@dataclass
class TxnAck(Body):
    """6.35: ack a subscription's messages as part of a transaction."""

    OPCODE = Opcode.TXN_ACK
    producer_group: str
    transaction_id: str
    handle: int
    subscription_id: int
    messages: list[MessagePosition]

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)
        _w_string(out, self.transaction_id)
        out += _U64.pack(self.handle)
        out += _U64.pack(self.subscription_id)
        _encode_positions(out, self.messages)

    @classmethod
    def decode(cls, r: Reader) -> TxnAck:
        return cls(r.string(), r.string(), r.u64(), r.u64(), _decode_positions(r))


@dataclass
class TxnAcked(Body):
    """6.36: the transactional acks are durable."""

    OPCODE = Opcode.TXN_ACKED
    handle: int

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.handle)

    @classmethod
    def decode(cls, r: Reader) -> TxnAcked:
        return cls(r.u64())


@dataclass
class TxnCheck(Body):
    """6.32 (push): how did this transaction end? Answer with TxnEnd."""

    OPCODE = Opcode.TXN_CHECK
    producer_group: str
    transaction_id: str
    handle: int
    opened_ms: int
    checks: int

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.producer_group)
        _w_string(out, self.transaction_id)
        out += _U64.pack(self.handle)
        out += _I64.pack(self.opened_ms)
        out += _U32.pack(self.checks)

    @classmethod
    def decode(cls, r: Reader) -> TxnCheck:
        return cls(r.string(), r.string(), r.u64(), r.i64(), r.u32())


@dataclass
class CancelDelay(Body):
    OPCODE = Opcode.CANCEL_DELAY
    message_id: bytes

    def encode(self, out: bytearray) -> None:
        _w_message_id(out, self.message_id)

    @classmethod
    def decode(cls, r: Reader) -> CancelDelay:
        return cls(r.message_id())


@dataclass
class DeleteMessages(Body):
    OPCODE = Opcode.DELETE_MESSAGES
    topic: str
    tombstone: Tombstone

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)
        self.tombstone.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> DeleteMessages:
        return cls(r.string(), Tombstone.decode(r))


@dataclass
class Subscribe(Body):
    OPCODE = Opcode.SUBSCRIBE
    topic: str
    group: str
    member_name: str
    mode: DeliveryMode
    start: Position
    credit: int
    settings: GroupSettings

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)
        _w_string(out, self.group)
        _w_string(out, self.member_name)
        out.append(int(self.mode))
        self.start.encode(out)
        out += _U32.pack(self.credit)
        self.settings.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> Subscribe:
        topic, group, member = r.string(), r.string(), r.string()
        return cls(topic, group, member, _mode(r), Position.decode(r), r.u32(), GroupSettings.decode(r))


def _mode(r: Reader) -> DeliveryMode:
    value = r.u8()
    if value > 1:
        raise ProtocolError(f"delivery_mode {value}")
    return DeliveryMode(value)


@dataclass
class Unsubscribe(Body):
    OPCODE = Opcode.UNSUBSCRIBE
    subscription_id: int

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.subscription_id)

    @classmethod
    def decode(cls, r: Reader) -> Unsubscribe:
        return cls(r.u64())


@dataclass
class Credit(Body):
    OPCODE = Opcode.CREDIT
    subscription_id: int
    credit: int

    def encode(self, out: bytearray) -> None:
        out += struct.pack("<QI", self.subscription_id, self.credit)

    @classmethod
    def decode(cls, r: Reader) -> Credit:
        return cls(r.u64(), r.u32())


@dataclass
class Fetch(Body):
    OPCODE = Opcode.FETCH
    subscription_id: int
    max_messages: int
    max_wait_ms: int

    def encode(self, out: bytearray) -> None:
        out += struct.pack("<QII", self.subscription_id, self.max_messages, self.max_wait_ms)

    @classmethod
    def decode(cls, r: Reader) -> Fetch:
        return cls(r.u64(), r.u32(), r.u32())


def _encode_positions(out: bytearray, messages: list[MessagePosition]) -> None:
    out += _U32.pack(len(messages))
    for m in messages:
        out += struct.pack("<IQ", m.partition, m.offset)


def _decode_positions(r: Reader) -> list[MessagePosition]:
    return [MessagePosition(r.u32(), r.u64()) for _ in range(r.count(12))]


@dataclass
class Ack(Body):
    OPCODE = Opcode.ACK
    subscription_id: int
    messages: list[MessagePosition]

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.subscription_id)
        _encode_positions(out, self.messages)

    @classmethod
    def decode(cls, r: Reader) -> Ack:
        return cls(r.u64(), _decode_positions(r))


@dataclass
class Nack(Body):
    OPCODE = Opcode.NACK
    subscription_id: int
    messages: list[MessagePosition]
    delay_ms: Optional[int]

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.subscription_id)
        _encode_positions(out, self.messages)
        _w_opt(out, self.delay_ms, _U64)

    @classmethod
    def decode(cls, r: Reader) -> Nack:
        return cls(r.u64(), _decode_positions(r), r.opt_u64())


@dataclass
class Seek(Body):
    OPCODE = Opcode.SEEK
    topic: str
    group: str
    partition: Optional[int]
    target: Position
    dry_run: bool

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)
        _w_string(out, self.group)
        _w_opt(out, self.partition, _U32)
        self.target.encode(out)
        _w_bool(out, self.dry_run)

    @classmethod
    def decode(cls, r: Reader) -> Seek:
        return cls(r.string(), r.string(), r.opt_u32(), Position.decode(r), r.boolean())


@dataclass
class CreateTopic(Body):
    OPCODE = Opcode.CREATE_TOPIC
    name: str
    partitions: int
    ordered: bool

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.name)
        out += _U32.pack(self.partitions)
        _w_bool(out, self.ordered)

    @classmethod
    def decode(cls, r: Reader) -> CreateTopic:
        return cls(r.string(), r.u32(), r.boolean())


@dataclass
class _Name(Body):
    name: str

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.name)

    @classmethod
    def decode(cls, r: Reader) -> _Name:
        return cls(r.string())


@dataclass
class DeleteTopic(_Name):
    OPCODE = Opcode.DELETE_TOPIC


@dataclass
class DescribeTopic(_Name):
    OPCODE = Opcode.DESCRIBE_TOPIC


@dataclass
class PartitionLeaders(Body):
    """6.38: which node leads each partition of ``topic``. Answered by LEADERS."""

    OPCODE = Opcode.PARTITION_LEADERS
    topic: str

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)

    @classmethod
    def decode(cls, r: Reader) -> PartitionLeaders:
        return cls(r.string())


@dataclass
class ListGroups(Body):
    OPCODE = Opcode.LIST_GROUPS
    topic: str

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)

    @classmethod
    def decode(cls, r: Reader) -> ListGroups:
        return cls(r.string())


@dataclass
class _TopicGroup(Body):
    topic: str
    group: str

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)
        _w_string(out, self.group)

    @classmethod
    def decode(cls, r: Reader) -> _TopicGroup:
        return cls(r.string(), r.string())


@dataclass
class DescribeGroup(_TopicGroup):
    OPCODE = Opcode.DESCRIBE_GROUP


@dataclass
class DeleteGroup(_TopicGroup):
    OPCODE = Opcode.DELETE_GROUP


@dataclass
class HelloOk(Body):
    OPCODE = Opcode.HELLO_OK
    version: int
    max_frame_bytes: int
    broker_id: str

    def encode(self, out: bytearray) -> None:
        out += struct.pack("<HI", self.version, self.max_frame_bytes)
        _w_string(out, self.broker_id)

    @classmethod
    def decode(cls, r: Reader) -> HelloOk:
        return cls(r.u16(), r.u32(), r.string())


@dataclass
class Produced:
    """One record's result in PRODUCE_OK."""

    partition: int
    offset: Optional[int]
    message_id: bytes
    deliver_at_ms: Optional[int]


@dataclass
class ProduceOk(Body):
    OPCODE = Opcode.PRODUCE_OK
    records: list[Produced]

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(len(self.records))
        for p in self.records:
            out += _U32.pack(p.partition)
            _w_opt(out, p.offset, _U64)
            _w_message_id(out, p.message_id)
            _w_opt(out, p.deliver_at_ms, _I64)

    @classmethod
    def decode(cls, r: Reader) -> ProduceOk:
        return cls([Produced(r.u32(), r.opt_u64(), r.message_id(), r.opt_i64()) for _ in range(r.count(22))])


@dataclass
class TxnProduceOk(Body):
    """6.29: the transaction's handle and one result per record."""

    OPCODE = Opcode.TXN_PRODUCE_OK
    handle: int
    records: list[Produced]

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.handle)
        ProduceOk(self.records).encode(out)

    @classmethod
    def decode(cls, r: Reader) -> TxnProduceOk:
        handle = r.u64()
        return cls(handle, ProduceOk.decode(r).records)


@dataclass
class TxnEnded(Body):
    """6.30: the outcome is durable."""

    OPCODE = Opcode.TXN_ENDED
    outcome: int

    def encode(self, out: bytearray) -> None:
        out.append(self.outcome)

    @classmethod
    def decode(cls, r: Reader) -> TxnEnded:
        return cls(_txn_outcome(r))


@dataclass
class CancelDelayOk(Body):
    OPCODE = Opcode.CANCEL_DELAY_OK
    cancelled: bool

    def encode(self, out: bytearray) -> None:
        _w_bool(out, self.cancelled)

    @classmethod
    def decode(cls, r: Reader) -> CancelDelayOk:
        return cls(r.boolean())


@dataclass
class Subscribed(Body):
    OPCODE = Opcode.SUBSCRIBED
    subscription_id: int
    partitions: list[int]

    def encode(self, out: bytearray) -> None:
        out += _U64.pack(self.subscription_id)
        out += _U32.pack(len(self.partitions))
        for p in self.partitions:
            out += _U32.pack(p)

    @classmethod
    def decode(cls, r: Reader) -> Subscribed:
        sid = r.u64()
        return cls(sid, [r.u32() for _ in range(r.count(4))])


@dataclass
class Deliveries(Body):
    OPCODE = Opcode.DELIVERIES
    deliveries: list[Delivery]

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(len(self.deliveries))
        for d in self.deliveries:
            d.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> Deliveries:
        return cls([Delivery.decode(r) for _ in range(r.count(61))])


@dataclass
class SeekPartition:
    partition: int
    old_floor: int
    new_floor: int
    redelivered: int
    skipped: int


@dataclass
class SeekReport(Body):
    OPCODE = Opcode.SEEK_REPORT
    dry_run: bool
    partitions: list[SeekPartition]

    def encode(self, out: bytearray) -> None:
        _w_bool(out, self.dry_run)
        out += _U32.pack(len(self.partitions))
        for p in self.partitions:
            out += struct.pack("<IQQQQ", p.partition, p.old_floor, p.new_floor, p.redelivered, p.skipped)

    @classmethod
    def decode(cls, r: Reader) -> SeekReport:
        dry_run = r.boolean()
        return cls(dry_run, [SeekPartition(r.u32(), r.u64(), r.u64(), r.u64(), r.u64()) for _ in range(r.count(36))])


@dataclass
class TopicSummary:
    name: str
    partitions: int
    ordered: bool


@dataclass
class Topics(Body):
    OPCODE = Opcode.TOPICS
    topics: list[TopicSummary]

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(len(self.topics))
        for t in self.topics:
            _w_string(out, t.name)
            out += _U32.pack(t.partitions)
            _w_bool(out, t.ordered)

    @classmethod
    def decode(cls, r: Reader) -> Topics:
        return cls([TopicSummary(r.string(), r.u32(), r.boolean()) for _ in range(r.count(7))])


@dataclass
class PartitionInfo:
    partition: int
    start_offset: int
    end_offset: int
    size_bytes: int
    """Bytes of records stored."""
    disk_bytes: int
    """Bytes the partition's files take on disk (allocated blocks)."""


@dataclass
class TopicDescription(Body):
    OPCODE = Opcode.TOPIC_DESCRIPTION
    name: str
    ordered: bool
    partitions: list[PartitionInfo]
    groups: list[str]

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.name)
        _w_bool(out, self.ordered)
        out += _U32.pack(len(self.partitions))
        for p in self.partitions:
            out += struct.pack(
                "<IQQQQ", p.partition, p.start_offset, p.end_offset, p.size_bytes, p.disk_bytes
            )
        out += _U32.pack(len(self.groups))
        for g in self.groups:
            _w_string(out, g)

    @classmethod
    def decode(cls, r: Reader) -> TopicDescription:
        name, ordered = r.string(), r.boolean()
        partitions = [
            PartitionInfo(r.u32(), r.u64(), r.u64(), r.u64(), r.u64()) for _ in range(r.count(36))
        ]
        return cls(name, ordered, partitions, [r.string() for _ in range(r.count(2))])


@dataclass
class PartitionLeader:
    """One partition in LEADERS."""

    partition: int
    node_id: int
    """The cluster node leading the partition's writes; 0 if none is known
    (an election), on a single broker, and for a topic kept on one node."""
    address: str
    """That node's client address (``host:port``); empty: send to the node asked."""


@dataclass
class Leaders(Body):
    """6.39: one entry per partition of the topic, partition 0 first."""

    OPCODE = Opcode.LEADERS
    partitions: list[PartitionLeader]

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(len(self.partitions))
        for p in self.partitions:
            out += struct.pack("<IQ", p.partition, p.node_id)
            _w_string(out, p.address)

    @classmethod
    def decode(cls, r: Reader) -> Leaders:
        return cls([PartitionLeader(r.u32(), r.u64(), r.string()) for _ in range(r.count(14))])


_FNV_OFFSET_BASIS = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64_MASK = 0xFFFFFFFFFFFFFFFF


def key_hash(key: bytes) -> int:
    """64-bit FNV-1a over ``key`` (6.38, "The partition of a key"; the
    broker's key hash bit for bit)."""
    h = _FNV_OFFSET_BASIS
    for byte in key:
        h = ((h ^ byte) * _FNV_PRIME) & _U64_MASK
    return h


def key_partition(key: bytes, partitions: int) -> int:
    """The partition, of a topic of ``partitions`` (0 is taken as 1), that
    the broker gives a record with ``key`` and no explicit partition
    (``dmq_protocol::key_partition``)."""
    return key_hash(key) % max(partitions, 1)


@dataclass
class GroupSummary:
    name: str
    mode: DeliveryMode
    settings: GroupSettings


@dataclass
class Groups(Body):
    OPCODE = Opcode.GROUPS
    groups: list[GroupSummary]

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(len(self.groups))
        for g in self.groups:
            _w_string(out, g.name)
            out.append(int(g.mode))
            g.settings.encode(out)

    @classmethod
    def decode(cls, r: Reader) -> Groups:
        return cls([GroupSummary(r.string(), _mode(r), GroupSettings.decode(r)) for _ in range(r.count(9))])


@dataclass
class GroupPartition:
    partition: int
    ack_floor: int
    end_offset: int
    lag: int
    unacked: int
    in_flight: int
    oldest_unacked_age_ms: Optional[int]
    delayed: int


@dataclass
class GroupDescription(Body):
    OPCODE = Opcode.GROUP_DESCRIPTION
    topic: str
    group: str
    mode: DeliveryMode
    partitions: list[GroupPartition]

    def encode(self, out: bytearray) -> None:
        _w_string(out, self.topic)
        _w_string(out, self.group)
        out.append(int(self.mode))
        out += _U32.pack(len(self.partitions))
        for p in self.partitions:
            out += struct.pack("<IQQQQQ", p.partition, p.ack_floor, p.end_offset, p.lag, p.unacked, p.in_flight)
            _w_opt(out, p.oldest_unacked_age_ms, _U64)
            out += _U64.pack(p.delayed)

    @classmethod
    def decode(cls, r: Reader) -> GroupDescription:
        topic, group, mode = r.string(), r.string(), _mode(r)
        partitions = [
            GroupPartition(r.u32(), r.u64(), r.u64(), r.u64(), r.u64(), r.u64(), r.opt_u64(), r.u64())
            for _ in range(r.count(53))
        ]
        return cls(topic, group, mode, partitions)


@dataclass
class Error(Body):
    OPCODE = Opcode.ERROR
    code: int
    message: str

    def encode(self, out: bytearray) -> None:
        out += _U32.pack(self.code)
        _w_string(out, self.message)

    @classmethod
    def decode(cls, r: Reader) -> Error:
        return cls(r.u32(), r.string())


_EMPTY_OPCODES = frozenset({Opcode.PING, Opcode.LIST_TOPICS, Opcode.OK, Opcode.PONG})

#: How each opcode's body is decoded.
BODY_DECODERS: dict[Opcode, Callable[[Reader], Body]] = {
    Opcode.HELLO: Hello.decode,
    Opcode.PING: Empty.decode,
    Opcode.PRODUCE: Produce.decode,
    Opcode.CANCEL_DELAY: CancelDelay.decode,
    Opcode.TXN_PRODUCE: TxnProduce.decode,
    Opcode.TXN_END: TxnEnd.decode,
    Opcode.TXN_LISTEN: TxnListen.decode,
    Opcode.TXN_INIT: TxnInit.decode,
    Opcode.TXN_ACK: TxnAck.decode,
    Opcode.TXN_PRODUCE_SEQ: TxnProduceSeq.decode,
    Opcode.DELETE_MESSAGES: DeleteMessages.decode,
    Opcode.SUBSCRIBE: Subscribe.decode,
    Opcode.UNSUBSCRIBE: Unsubscribe.decode,
    Opcode.CREDIT: Credit.decode,
    Opcode.FETCH: Fetch.decode,
    Opcode.ACK: Ack.decode,
    Opcode.NACK: Nack.decode,
    Opcode.SEEK: Seek.decode,
    Opcode.CREATE_TOPIC: CreateTopic.decode,
    Opcode.DELETE_TOPIC: DeleteTopic.decode,
    Opcode.LIST_TOPICS: Empty.decode,
    Opcode.DESCRIBE_TOPIC: DescribeTopic.decode,
    Opcode.PARTITION_LEADERS: PartitionLeaders.decode,
    Opcode.LIST_GROUPS: ListGroups.decode,
    Opcode.DESCRIBE_GROUP: DescribeGroup.decode,
    Opcode.DELETE_GROUP: DeleteGroup.decode,
    Opcode.OK: Empty.decode,
    Opcode.HELLO_OK: HelloOk.decode,
    Opcode.PONG: Empty.decode,
    Opcode.PRODUCE_OK: ProduceOk.decode,
    Opcode.CANCEL_DELAY_OK: CancelDelayOk.decode,
    Opcode.TXN_PRODUCE_OK: TxnProduceOk.decode,
    Opcode.TXN_ENDED: TxnEnded.decode,
    Opcode.TXN_INIT_OK: TxnInitOk.decode,
    Opcode.TXN_ACKED: TxnAcked.decode,
    Opcode.SUBSCRIBED: Subscribed.decode,
    Opcode.DELIVERIES: Deliveries.decode,
    Opcode.SEEK_REPORT: SeekReport.decode,
    Opcode.TOPICS: Topics.decode,
    Opcode.TOPIC_DESCRIPTION: TopicDescription.decode,
    Opcode.LEADERS: Leaders.decode,
    Opcode.GROUPS: Groups.decode,
    Opcode.GROUP_DESCRIPTION: GroupDescription.decode,
    Opcode.ERROR: Error.decode,
    Opcode.DELIVER: Delivery.decode,  # type: ignore[dict-item]
    Opcode.TXN_CHECK: TxnCheck.decode,
}


@dataclass
class Frame:
    """One frame. ``body`` is a :class:`Body`, or a :class:`Delivery` for
    DELIVER, or :class:`Empty` for the four empty-bodied opcodes."""

    opcode: Opcode
    correlation_id: int
    body: Union[Body, Delivery]
    flags: int = 0

    @classmethod
    def of(cls, correlation_id: int, body: Union[Body, Delivery], flags: int = 0) -> Frame:
        """A frame whose opcode follows from its body (not for :class:`Empty`)."""
        opcode = Opcode.DELIVER if isinstance(body, Delivery) else body.OPCODE
        return cls(opcode, correlation_id, body, flags)


def encode_frame(frame: Frame) -> bytes:
    """A frame's bytes, length prefix included."""
    out = bytearray(11)
    frame.body.encode(out)
    _HEADER.pack_into(out, 0, len(out) - 4, int(frame.opcode), frame.correlation_id, frame.flags)
    return bytes(out)


def frame_header(opcode: int, correlation_id: int, body_length: int) -> bytes:
    """The 11 header bytes of a frame with a body of this length."""
    return _HEADER.pack(body_length + 7, opcode, correlation_id, 0)


def produce_frame(
    correlation_id: int,
    topic: str,
    partition: Optional[int],
    idempotence: Optional[tuple[int, int]],
    records: list[bytes],
    records_bytes: int,
) -> bytearray:
    """A PRODUCE frame from records pre-encoded by :func:`encode_record`
    (``records_bytes`` = their total length). Returns a bytearray so that a
    retry can patch the correlation id (bytes 6..10) in place."""
    prefix = bytearray(11)
    _produce_prefix(prefix, topic, partition, idempotence, len(records))
    body_length = len(prefix) - 11 + records_bytes
    _HEADER.pack_into(prefix, 0, body_length + 7, Opcode.PRODUCE, correlation_id, 0)
    prefix += b"".join(records)
    return prefix


def set_correlation_id(frame: bytearray, correlation_id: int) -> None:
    """Rewrites an encoded frame's correlation id."""
    _U32.pack_into(frame, 6, correlation_id)


def peek_length(data: Union[bytes, bytearray], max_frame_bytes: int) -> Optional[int]:
    """The whole frame's size once its 4 length bytes are in ``data``;
    raises ProtocolError for a length below 7 or a frame over the limit
    (checked before the body is read, section 2)."""
    if len(data) < 4:
        return None
    length = int(_U32.unpack_from(data, 0)[0])
    if length < HEADER_AFTER_LENGTH_BYTES:
        raise ProtocolError(f"frame length {length} is below 7")
    if 4 + length > max_frame_bytes:
        raise ProtocolError(f"frame of {4 + length} bytes exceeds the limit of {max_frame_bytes}")
    return 4 + length


def decode_frame(data: Union[bytes, bytearray], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Optional[tuple[Frame, int]]:
    """Decodes the frame at the start of ``data``: ``(frame, bytes
    consumed)``, or None when more bytes are needed. Raises ProtocolError
    for a malformed frame."""
    size = peek_length(data, max_frame_bytes)
    if size is None or len(data) < size:
        return None
    return decode_whole_frame(data, size), size


def decode_whole_frame(data: Union[bytes, bytearray], size: int) -> Frame:
    """Decodes the first ``size`` bytes of ``data``, known to be one whole
    frame whose length prefix was checked by :func:`peek_length`."""
    _, opcode_value, correlation_id, flags = _HEADER.unpack_from(data, 0)
    try:
        opcode = Opcode(opcode_value)
    except ValueError:
        raise ProtocolError(f"unknown opcode 0x{opcode_value:04x}") from None
    if opcode.is_push and correlation_id != 0:
        raise ProtocolError(f"push {opcode.name} with correlation id {correlation_id}")
    reader = Reader(data, 11, size)
    body = BODY_DECODERS[opcode](reader)
    if reader.pos != size:
        raise ProtocolError(f"{opcode.name}: {size - reader.pos} trailing bytes")
    return Frame(opcode, correlation_id, body, flags)


_I64_AT = _I64.unpack_from
_U64_AT = _U64.unpack_from
_U32_AT = _U32.unpack_from


def decode_produce_ok(data: bytes) -> list[tuple[int, Optional[int], bytes, Optional[int]]]:
    """The body of a whole PRODUCE_OK frame ``data`` as tuples
    ``(partition, offset, message_id, deliver_at_ms)``: the producer's fast
    path, with the same checks as :meth:`ProduceOk.decode`."""
    end = len(data)
    try:
        n = _U32_AT(data, 11)[0]
        pos = 15
        if n * 22 > end - pos:
            raise ProtocolError(f"PRODUCE_OK: {n} records cannot fit in {end - pos} bytes")
        out: list[tuple[int, Optional[int], bytes, Optional[int]]] = []
        append = out.append
        head = _PRODUCED.unpack_from
        for _ in range(n):
            partition, tag = head(data, pos)
            pos += 5
            offset: Optional[int] = None
            if tag == 1:
                offset = _U64_AT(data, pos)[0]
                pos += 8
            elif tag:
                raise ProtocolError(f"option tag {tag} is neither 0 nor 1")
            message_id = data[pos : pos + 16]
            pos += 16
            tag = data[pos]
            pos += 1
            deliver_at: Optional[int] = None
            if tag == 1:
                deliver_at = _I64_AT(data, pos)[0]
                pos += 8
            elif tag:
                raise ProtocolError(f"option tag {tag} is neither 0 nor 1")
            append((partition, offset, message_id, deliver_at))
    except (struct.error, IndexError):
        raise ProtocolError("PRODUCE_OK: a field runs past the frame") from None
    if pos != end:
        raise ProtocolError(f"PRODUCE_OK: {end - pos} trailing bytes" if pos < end else "PRODUCE_OK: a field runs past the frame")
    return out
