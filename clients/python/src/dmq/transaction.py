"""Transactions (PROTOCOL.md 6.27 to 6.36, docs/transactions.md):
:class:`Transaction` stores messages as half messages, acks consumed
messages as part of it, and commits or rolls back all of it at once;
:class:`TransactionChecks` answers the broker's check-backs of a producer
group; :meth:`Client.init_transactions` fences older instances of a
transactional producer.

Owns one transaction's handle: the first request (a send or an ack) begins
the transaction and the broker's answer gives the handle every later
request names, so a late commit never reaches a later transaction that
reuses the id. Requests of one transaction go one at a time, in order.

Each send is numbered within its transaction (TXN_PRODUCE_SEQ, PROTOCOL.md
6.37), so a send whose answer was lost (the connection dropped, the
request timed out) is sent again, up to :data:`TRANSACTION_RETRIES`
times: the broker answers a number it has with the first answer and
stores nothing twice. A send that still fails with a transient error may
be called again with the same arguments (it keeps its number). Commit
and rollback are retried the same way (a repeated end gets the first
answer), and so is a transactional ack (:meth:`Transaction.ack`).

Atomic consume-and-produce::

    async for paid in payments:
        txn = client.transaction("shipper", f"ship-{paid.id}")
        await txn.send("shipments", paid.value)
        await txn.ack(paid)        # counts only if the commit happens
        await txn.commit()

Check-back: a transaction neither committed nor rolled back within the
broker's transaction timeout (the producer crashed between its database
commit and ours) is asked about, on a connection listening for its
producer group::

    checks = await client.transaction_checks("order-service")
    async for check in checks:
        if orders_db.committed(check.transaction_id):
            await check.commit()
        elif orders_db.rolled_back(check.transaction_id):
            await check.rollback()
        # else: not known yet, the broker asks again later

Fencing: ``epoch = await client.init_transactions("payments", "payer-1")``
makes this client the current instance of producer ``payer-1``; an older
instance's transactions of the group are refused with ProducerFenced from
then on (a zombie that was replaced while its process still runs). After
a reconnect the client resumes its epoch (TXN_INIT) and its listeners
(TXN_LISTEN) before any other request goes on the new connection, so a
fenced instance stays fenced and no check is missed for long.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

from .client import Client
from .codec import (
    TXN_COMMIT,
    TXN_ROLLBACK,
    Body,
    DeliveryTime,
    Empty,
    MessagePosition,
    Record,
    TxnAck,
    TxnAcked,
    TxnCheck,
    TxnEnd,
    TxnEnded,
    TxnInit,
    TxnInitOk,
    TxnListen,
    TxnProduce,
    TxnProduceOk,
    TxnProduceSeq,
)
from .consumer import Consumer, Message
from .errors import DmqError, ProtocolError, StaleDeliveryError
from .producer import HeadersArg, Receipt, Seconds, When, _delivery_time, _headers, _ms, _to_bytes

#: How many times a transaction's send, commit or rollback is sent again
#: after a transient failure (a lost connection, a timeout, a broker that
#: is overloaded or stopping), waiting ``reconnect_backoff_initial`` times
#: the attempt's number before each.
TRANSACTION_RETRIES = 5


async def _request_retrying(client: Client, body: Body) -> Any:
    """:meth:`Client.request`, again on a transient failure: only for
    requests the broker answers the same when they arrive twice."""
    return await _retrying(client, lambda: client.request(body))


async def _retrying(
    client: Client,
    try_once: Callable[[], Awaitable[Any]],
    before_retry: Optional[Callable[[], Awaitable[None]]] = None,
) -> Any:
    """``try_once()``, again after each transient failure, up to
    :data:`TRANSACTION_RETRIES` times, waiting ``reconnect_backoff_initial``
    times the attempt's number (then ``before_retry()``) before each."""
    attempt = 0
    while True:
        try:
            return await try_once()
        except DmqError as error:
            if not error.transient or attempt >= TRANSACTION_RETRIES:
                raise
        attempt += 1
        await asyncio.sleep(client.reconnect_backoff_initial * attempt)
        if before_retry is not None:
            await before_retry()


class Transaction:
    """One transaction ``transaction_id`` of ``producer_group``; nothing is
    sent until the first :meth:`send` or :meth:`ack`."""

    def __init__(self, client: Client, producer_group: str, transaction_id: str) -> None:
        self._client = client
        self.producer_group = producer_group
        self.transaction_id = transaction_id
        #: 0 until the broker answered the first request.
        self.handle = 0
        #: The number of the next send (TXN_PRODUCE_SEQ): one more for
        #: each send answered.
        self.sequence = 0

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
        """Stores one half message (TXN_PRODUCE_SEQ), durable when this
        returns; delivered to every group of ``topic`` only after the
        commit. A ``delay`` and a ``ttl`` start at the commit. The receipt
        has the message id and no offset. Sent again after a transient
        failure (stored once); if that still fails, calling it again with
        the same arguments is safe."""
        when = DeliveryTime(*_delivery_time(delay, deliver_at))
        record = Record(
            _to_bytes(value),
            None if key is None else _to_bytes(key),
            _headers(headers),
            when,
            None if ttl is None else _ms(ttl),
        )
        produce = TxnProduce(self.producer_group, self.transaction_id, self.handle, topic, partition, [record])
        body = await _request_retrying(self._client, TxnProduceSeq(produce, self.sequence))
        if not isinstance(body, TxnProduceOk) or len(body.records) != 1:
            raise ProtocolError(f"expected TXN_PRODUCE_OK with one record, got {body!r}")
        self.handle = body.handle
        self.sequence += 1
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
        are settled (do not ack them again).

        A TXN_ACK whose answer was lost (the connection dropped, the request
        timed out) is sent again, up to :data:`TRANSACTION_RETRIES` times,
        under the consumer's subscription on the new connection (it
        subscribes again first): the broker skips messages the transaction
        acks already and answers a repeated begin with the transaction it
        began (PROTOCOL.md 6.35)."""
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
            positions = [MessagePosition(m.partition, m.offset) for m in batch]
            body = await self._ack_retrying(consumer, positions)
            if not isinstance(body, TxnAcked):
                raise ProtocolError(f"expected TXN_ACKED, got {type(body).__name__}")
            self.handle = body.handle
            for message in batch:
                consumer._settled_in_transaction(message)

    async def _ack_retrying(self, consumer: Consumer, positions: list[MessagePosition]) -> Any:
        """One TXN_ACK of ``positions`` received by ``consumer``, sent again
        after a transient failure, each time under the consumer's
        subscription id on the live connection. A lost connection took the
        subscription with it: the consumer subscribes again before each
        retry (its messages of the old connection are dropped; the broker
        delivers them again)."""

        async def ack_once() -> Any:
            subscription_id = consumer._subscription_id
            if subscription_id is None:
                raise DmqError("the consumer is closed")
            return await self._client.request(
                TxnAck(self.producer_group, self.transaction_id, self.handle, subscription_id, positions)
            )

        return await _retrying(self._client, ack_once, consumer._ensure_subscribed)

    async def commit(self) -> None:
        """Commits: once this returns every message sent is delivered to
        every group of its topic, and every ack made counts. Sent again
        after a transient failure; retrying after a lost answer is safe."""
        await self._end(TXN_COMMIT)

    async def rollback(self) -> None:
        """Rolls back: no message sent is ever delivered; no ack counts."""
        await self._end(TXN_ROLLBACK)

    async def _end(self, outcome: int) -> None:
        if self.handle == 0:
            return  # nothing was stored
        await _end(self._client, self.producer_group, self.transaction_id, self.handle, outcome)

    def __repr__(self) -> str:
        return f"Transaction({self.producer_group!r}, {self.transaction_id!r}, handle={self.handle}, sequence={self.sequence})"


async def _end(client: Client, producer_group: str, transaction_id: str, handle: int, outcome: int) -> None:
    body = await _request_retrying(client, TxnEnd(producer_group, transaction_id, handle, outcome))
    if not isinstance(body, TxnEnded):
        raise ProtocolError(f"expected TXN_ENDED, got {type(body).__name__}")


@dataclass
class TransactionCheck:
    """The broker asks how a transaction left open ended (TXN_CHECK):
    answer with :meth:`commit` or :meth:`rollback`, or not at all when the
    answer is not known yet (the broker asks again later, with backoff,
    until its checks run out and the transaction is left unresolved for an
    operator)."""

    producer_group: str
    transaction_id: str
    #: Names the transaction in the answer (a late answer never ends a
    #: later transaction that reuses the id).
    handle: int
    #: When the transaction began, ms since the Unix epoch.
    opened_ms: int
    #: This is the transaction's check number ``checks`` (from 1).
    checks: int
    _client: Client = field(repr=False, compare=False)

    async def commit(self) -> None:
        """The transaction committed on the producer's side: commit it."""
        await _end(self._client, self.producer_group, self.transaction_id, self.handle, TXN_COMMIT)

    async def rollback(self) -> None:
        """The transaction did not happen: roll it back."""
        await _end(self._client, self.producer_group, self.transaction_id, self.handle, TXN_ROLLBACK)


class TransactionChecks:
    """The check-backs of one producer group on a client's connection
    (create with :meth:`Client.transaction_checks`). Iterate with ``async
    for`` or :meth:`receive`; :meth:`close` stops listening here (checks
    then go to the group's other listeners, or count as unanswered)."""

    def __init__(self, client: Client, producer_group: str) -> None:
        self._client = client
        self.producer_group = producer_group
        self._queue: asyncio.Queue[Optional[TxnCheck]] = asyncio.Queue()
        self._closed = False

    def _push(self, check: TxnCheck) -> None:
        if not self._closed:
            self._queue.put_nowait(check)

    async def receive(self, timeout: Optional[float] = None) -> Optional[TransactionCheck]:
        """The next check-back; ``None`` after ``timeout`` seconds without
        one, or once closed."""
        if self._closed and self._queue.empty():
            return None
        try:
            check = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if check is None:
            return None
        return TransactionCheck(check.producer_group, check.transaction_id, check.handle, check.opened_ms, check.checks, self._client)

    def __aiter__(self) -> TransactionChecks:
        return self

    async def __anext__(self) -> TransactionCheck:
        check = await self.receive()
        if check is None:
            raise StopAsyncIteration
        return check

    def close(self) -> None:
        """Stops listening on this client; a waiting :meth:`receive` gets
        ``None``."""
        if not self._closed:
            self._closed = True
            self._client._remove_check_listener(self)
            self._queue.put_nowait(None)


async def listen(client: Client, producer_group: str) -> TransactionChecks:
    """:meth:`Client.transaction_checks`."""
    checks = TransactionChecks(client, producer_group)
    client._add_check_listener(checks)
    try:
        body = await client.request(TxnListen(producer_group))
    except BaseException:
        checks.close()
        raise
    if not isinstance(body, Empty):
        checks.close()
        raise ProtocolError(f"expected OK, got {type(body).__name__}")
    return checks


async def init_transactions(client: Client, producer_group: str, producer_id: str) -> int:
    """:meth:`Client.init_transactions`."""
    body = await client.request(TxnInit(producer_group, producer_id, 0))
    if not isinstance(body, TxnInitOk):
        raise ProtocolError(f"expected TXN_INIT_OK, got {type(body).__name__}")
    client._txn_producers[(producer_group, producer_id)] = body.epoch
    return body.epoch
