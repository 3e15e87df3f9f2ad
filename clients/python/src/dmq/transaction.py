"""Transactions (PROTOCOL.md 6.27 to 6.36, docs/transactions.md):
:class:`Transaction` stores messages as half messages, acks consumed
messages as part of it, and commits or rolls back all of it at once.

Owns one transaction's handle: the first request (a send or an ack) begins
the transaction and the broker's answer gives the handle every later
request names, so a late commit never reaches a later transaction that
reuses the id. Requests of one transaction go one at a time, in order.

Atomic consume-and-produce::

    async for paid in payments:
        txn = client.transaction("shipper", f"ship-{paid.id}")
        await txn.send("shipments", paid.value)
        await txn.ack(paid)        # counts only if the commit happens
        await txn.commit()

Check-back listeners (TXN_LISTEN) are not part of this client yet: a
transaction left open is checked back only through a Rust listener, the
console or ``dmq tx resolve``.
"""

from __future__ import annotations

from typing import Optional, Union

from .client import Client
from .codec import (
    TXN_COMMIT,
    TXN_ROLLBACK,
    DeliveryTime,
    MessagePosition,
    Record,
    TxnAck,
    TxnAcked,
    TxnEnd,
    TxnEnded,
    TxnProduce,
    TxnProduceOk,
)
from .consumer import Consumer, Message
from .errors import DmqError, ProtocolError, StaleDeliveryError
from .producer import HeadersArg, Receipt, Seconds, When, _delivery_time, _headers, _ms, _to_bytes


class Transaction:
    """One transaction ``transaction_id`` of ``producer_group``; nothing is
    sent until the first :meth:`send` or :meth:`ack`."""

    def __init__(self, client: Client, producer_group: str, transaction_id: str) -> None:
        self._client = client
        self.producer_group = producer_group
        self.transaction_id = transaction_id
        #: 0 until the broker answered the first request.
        self.handle = 0

    async def send(
        self,
        topic: str,
        value: Union[bytes, bytearray, memoryview, str],
        *,
        key: Union[bytes, str, None] = None,
        headers: HeadersArg = None,
        partition: Optional[int] = None,
        delay: Optional[Seconds] = None,
        deliver_at: Optional[When] = None,
        ttl: Optional[Seconds] = None,
    ) -> Receipt:
        """Stores one half message (TXN_PRODUCE), durable when this
        returns; delivered to every group of ``topic`` only after the
        commit. A ``delay`` and a ``ttl`` start at the commit. The receipt
        has the message id and no offset."""
        when = DeliveryTime(*_delivery_time(delay, deliver_at))
        record = Record(
            _to_bytes(value),
            None if key is None else _to_bytes(key),
            _headers(headers),
            when,
            None if ttl is None else _ms(ttl),
        )
        body = await self._client.request(
            TxnProduce(self.producer_group, self.transaction_id, self.handle, topic, partition, [record])
        )
        if not isinstance(body, TxnProduceOk) or len(body.records) != 1:
            raise ProtocolError(f"expected TXN_PRODUCE_OK with one record, got {body!r}")
        self.handle = body.handle
        produced = body.records[0]
        return Receipt(produced.partition, produced.offset, produced.message_id, produced.deliver_at_ms)

    async def ack(self, *messages: Message) -> None:
        """Acks ``messages`` in this transaction (TXN_ACK, one request per
        consumer): they count as acked for their group when the transaction
        commits, and not at all if it rolls back (they come again after
        their ack timeout). They must come from consumers of this client,
        received on its current connection, and not be settled yet. A
        message another open transaction acks, or one acked already, raises
        TransactionConflict (25): roll back. Once this returns the messages
        are settled (do not ack them again)."""
        by_consumer: dict[int, tuple[Consumer, list[Message]]] = {}
        for message in messages:
            consumer = message._consumer
            if message._settled:
                raise DmqError("message already acked or nacked")
            if consumer._client is not self._client:
                raise DmqError("the message came from another client's consumer")
            if message._generation != consumer._generation or consumer._lost:
                raise StaleDeliveryError("the message was received on a connection since lost; the broker redelivers it")
            by_consumer.setdefault(id(consumer), (consumer, []))[1].append(message)
        for consumer, batch in by_consumer.values():
            subscription_id = consumer._subscription_id
            if subscription_id is None:
                raise DmqError("the consumer is closed")
            positions = [MessagePosition(m.partition, m.offset) for m in batch]
            body = await self._client.request(
                TxnAck(self.producer_group, self.transaction_id, self.handle, subscription_id, positions)
            )
            if not isinstance(body, TxnAcked):
                raise ProtocolError(f"expected TXN_ACKED, got {type(body).__name__}")
            self.handle = body.handle
            for message in batch:
                consumer._settled_in_transaction(message)

    async def commit(self) -> None:
        """Commits: once this returns every message sent is delivered to
        every group of its topic, and every ack made counts. Retrying after
        a lost answer is safe."""
        await self._end(TXN_COMMIT)

    async def rollback(self) -> None:
        """Rolls back: no message sent is ever delivered; no ack counts."""
        await self._end(TXN_ROLLBACK)

    async def _end(self, outcome: int) -> None:
        if self.handle == 0:
            return  # nothing was stored
        body = await self._client.request(TxnEnd(self.producer_group, self.transaction_id, self.handle, outcome))
        if not isinstance(body, TxnEnded):
            raise ProtocolError(f"expected TXN_ENDED, got {type(body).__name__}")

    def __repr__(self) -> str:
        return f"Transaction({self.producer_group!r}, {self.transaction_id!r}, handle={self.handle})"
