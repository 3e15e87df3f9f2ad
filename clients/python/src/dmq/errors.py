"""Exceptions, and the protocol's error codes (PROTOCOL.md section 7).

Owns: :class:`ErrorCode` (the stable numbers), :class:`BrokerError` (an
ERROR frame from the broker, or a refusal the client makes locally with the
same code, e.g. RecordTooLarge before sending), one subclass per known code,
and the client-side failures: :class:`ProtocolError` (a frame from the
broker that breaks PROTOCOL.md), :class:`ConnectionClosedError`,
:class:`RequestTimeoutError`, :class:`StaleDeliveryError`.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Error codes of PROTOCOL.md section 7. Never renumbered; a client
    MUST accept codes it does not know (see :func:`code_name`)."""

    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    NOT_AUTHENTICATED = 4
    AUTHENTICATION_FAILED = 5
    NOT_AUTHORIZED = 6
    UNKNOWN_TOPIC = 7
    UNKNOWN_GROUP = 8
    UNKNOWN_SUBSCRIPTION = 9
    UNKNOWN_PARTITION = 10
    TOPIC_EXISTS = 11
    INVALID_REQUEST = 12
    DISK_FULL = 13
    STORAGE_ERROR = 14
    OVERLOADED = 15
    SHUTTING_DOWN = 16
    NOT_DELIVERED = 17
    INTERNAL_ERROR = 18
    UNKNOWN_OPCODE = 19
    GROUP_CONFIG_CONFLICT = 20
    OUT_OF_ORDER_SEQUENCE = 21
    TIMEOUT = 22
    RECORD_TOO_LARGE = 23


_NAMES = {
    1: "MalformedFrame",
    2: "FrameTooLarge",
    3: "UnsupportedVersion",
    4: "NotAuthenticated",
    5: "AuthenticationFailed",
    6: "NotAuthorized",
    7: "UnknownTopic",
    8: "UnknownGroup",
    9: "UnknownSubscription",
    10: "UnknownPartition",
    11: "TopicExists",
    12: "InvalidRequest",
    13: "DiskFull",
    14: "StorageError",
    15: "Overloaded",
    16: "ShuttingDown",
    17: "NotDelivered",
    18: "InternalError",
    19: "UnknownOpcode",
    20: "GroupConfigConflict",
    21: "OutOfOrderSequence",
    22: "Timeout",
    23: "RecordTooLarge",
    24: "UnknownTransaction",
    25: "TransactionConflict",
    26: "TransactionLimit",
    27: "ProducerFenced",
    28: "Unavailable",
    29: "WrongNode",
}

#: Codes after which the broker closes the connection (section 7, last column).
CLOSING_CODES = frozenset({1, 2, 3, 4, 5, 15, 16, 19, 22})


def code_name(code: int) -> str:
    """PROTOCOL.md's name of a code, e.g. ``UnknownTopic``; ``Unknown(N)``
    for a code this client does not know."""
    return _NAMES.get(code, f"Unknown({code})")


class DmqError(Exception):
    """Base of every exception this package raises."""

    #: True when retrying the same operation later may succeed (a lost
    #: connection, a timeout, an overloaded or stopping broker).
    transient: bool = False


class BrokerError(DmqError):
    """An ERROR frame: ``code`` (int, section 7), ``name`` and the broker's
    ``message`` (for people). Subclasses exist per known code; an unknown
    code gives a plain BrokerError."""

    def __init__(self, code: int, message: str) -> None:
        self.code = int(code)
        self.name = code_name(self.code)
        self.message = message
        super().__init__(f"{self.name} ({self.code}): {message}")

    @property
    def closes_connection(self) -> bool:
        """Whether the broker closes the connection after this code."""
        return self.code in CLOSING_CODES


class MalformedFrame(BrokerError):
    """Code 1: the broker could not decode a frame we sent."""


class FrameTooLarge(BrokerError):
    """Code 2: a frame over the broker's maximum size."""


class UnsupportedVersion(BrokerError):
    """Code 3: no common protocol version."""


class NotAuthenticated(BrokerError):
    """Code 4: a request before HELLO_OK."""


class AuthenticationFailed(BrokerError):
    """Code 5: client id or secret rejected."""


class NotAuthorized(BrokerError):
    """Code 6: not allowed by the topic registry's ACL."""


class UnknownTopic(BrokerError):
    """Code 7."""


class UnknownGroup(BrokerError):
    """Code 8."""


class UnknownSubscription(BrokerError):
    """Code 9."""


class UnknownPartition(BrokerError):
    """Code 10."""


class TopicExists(BrokerError):
    """Code 11."""


class InvalidRequest(BrokerError):
    """Code 12: decoded whole but unacceptable."""


class DiskFull(BrokerError):
    """Code 13: nothing was written."""


class StorageError(BrokerError):
    """Code 14: nothing acknowledged."""


class Overloaded(BrokerError):
    """Code 15: too many connections; retry later."""

    transient = True


class ShuttingDown(BrokerError):
    """Code 16: the broker is stopping."""

    transient = True


class NotDelivered(BrokerError):
    """Code 17: ACK/NACK of a message not delivered to this subscription."""


class InternalError(BrokerError):
    """Code 18: broker bug; the request may or may not have taken effect."""


class UnknownOpcode(BrokerError):
    """Code 19."""


class GroupConfigConflict(BrokerError):
    """Code 20: SUBSCRIBE settings differ from the existing group's."""


class OutOfOrderSequence(BrokerError):
    """Code 21: an idempotent PRODUCE older than the latest 32 batches the
    broker remembers of its producer (it may or may not be stored); or a
    TXN_PRODUCE_SEQ whose number is past its transaction's next one (an
    earlier send was not stored; nothing was)."""


class Timeout(BrokerError):
    """Code 22: handshake or idle timeout (connection closed)."""

    transient = True


class RecordTooLarge(BrokerError):
    """Code 23: a record over ``max_frame_bytes - 1024``; raised locally
    before sending too."""


class UnknownTransaction(BrokerError):
    """Code 24: no open transaction with that group, id and handle."""


class TransactionConflict(BrokerError):
    """Code 25: the request contradicts the transaction's state."""


class TransactionLimit(BrokerError):
    """Code 26: the transaction is over its size or past its timeout."""


class ProducerFenced(BrokerError):
    """Code 27: a newer instance of this transactional producer registered."""


class Unavailable(BrokerError):
    """Code 28: a cluster topic's partition had no reachable leader, or its
    answer was lost; retry (an idempotent producer does)."""

    transient = True


class WrongNode(BrokerError):
    """Code 29: this cluster node does not serve consumers now; the message
    is the client address (``host:port``) of the node that does, or empty
    while none is known. A :class:`~dmq.client.Client` moves its connection
    there by itself."""

    transient = True

    @property
    def address(self) -> str:
        return self.message


_CLASSES: dict[int, type[BrokerError]] = {
    1: MalformedFrame,
    2: FrameTooLarge,
    3: UnsupportedVersion,
    4: NotAuthenticated,
    5: AuthenticationFailed,
    6: NotAuthorized,
    7: UnknownTopic,
    8: UnknownGroup,
    9: UnknownSubscription,
    10: UnknownPartition,
    11: TopicExists,
    12: InvalidRequest,
    13: DiskFull,
    14: StorageError,
    15: Overloaded,
    16: ShuttingDown,
    17: NotDelivered,
    18: InternalError,
    19: UnknownOpcode,
    20: GroupConfigConflict,
    21: OutOfOrderSequence,
    22: Timeout,
    23: RecordTooLarge,
    24: UnknownTransaction,
    25: TransactionConflict,
    26: TransactionLimit,
    27: ProducerFenced,
    28: Unavailable,
    29: WrongNode,
}


def broker_error(code: int, message: str) -> BrokerError:
    """The exception for an ERROR frame's code and message."""
    return _CLASSES.get(code, BrokerError)(code, message)


class ProtocolError(DmqError):
    """The broker sent a frame that breaks PROTOCOL.md (bad length, bad
    field, trailing bytes, unknown opcode, oversize frame); the connection
    is closed, as section 4 advises."""


class ConnectionClosedError(DmqError):
    """The connection closed before the answer came; whether a request
    took effect is unknown (the idempotent producer retries safely)."""

    transient = True


class RequestTimeoutError(DmqError, TimeoutError):
    """No answer (or no connection) within the request timeout."""

    transient = True


class StaleDeliveryError(DmqError):
    """ACK/NACK of a message received on a connection that has since been
    lost: the broker redelivers it, it can no longer be settled."""


class ClientClosedError(DmqError):
    """The client, producer or consumer was closed."""
