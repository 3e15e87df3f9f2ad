"""Producing: :meth:`Producer.send` returns at once a :class:`SendFuture`
that resolves on the broker's durable ack with a :class:`Receipt`
(partition, offset, message id).

Owns batching and pipelining. Records are encoded as they are sent, into
one open batch per (topic, partition); a batch goes out when it holds
``max_batch_messages`` or ``max_batch_bytes`` (capped by the broker's frame
limit), ``linger`` seconds after its first record, or at the next turn of
the event loop when none of this producer's PRODUCEs is in flight (a lone
message does not wait; under load batches grow with the round trip). Up to
``max_in_flight`` PRODUCEs are in flight at once; closed batches wait in
order beyond that. Frames are written in the order their sequences were
given (a FIFO lock around the write), whatever order their senders wake
from the connection's backpressure in.

Idempotence (on by default): every batch carries the producer id (random,
63 bits) and a sequence number. A batch that failed because the connection
was lost or the answer timed out is sent again, same id and sequence, after
the client reconnects; retries go one at a time in sequence order, and the
broker answers a batch it already stored with its original offsets, so a
retry never duplicates. The broker remembers the latest 32 batches per
topic and producer, so a retried batch older than ones stored later
(pipelining) is answered too; one older than those gets
OutOfOrderSequence (21): the broker cannot tell whether it was stored, and
its futures fail with that error.

On a cluster (HELLO_OK's ``broker_id`` is a node id) and with
``route_to_leaders`` (the default), each batch's first try goes to its
partition's leader (:mod:`dmq.routing`): a keyed record joins its
partition's batch (:func:`~dmq.codec.key_partition`, the broker's rule)
once the topic's partition count is known, and an unkeyed batch takes a
partition round robin, as the broker would give it. Batches are routed one
at a time in the order they were closed, before the FIFO lock; a batch
whose partition's route moved waits until the batches in flight on the
old route are answered. A batch whose first try failed is retried through
the client's own node (which forwards it) and makes the producer ask the
leaders again. On a single broker nothing changes.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import struct
from typing import Any, Generator, NamedTuple, Optional, Union

from .client import Client
from .codec import Header, decode_produce_ok, encode_record, key_partition, produce_frame, record_size, set_correlation_id
from .connection import Connection
from .errors import (
    ClientClosedError,
    DmqError,
    OutOfOrderSequence,
    ProtocolError,
    RecordTooLarge,
    RequestTimeoutError,
)
from .routing import Route, Routing

_U32 = struct.Struct("<I").pack
_FRAME_HEADROOM_BYTES = 4096

Seconds = Union[float, int, datetime.timedelta]
When = Union[float, int, datetime.datetime]
HeadersArg = Union[dict[str, Union[bytes, str]], list[tuple[Union[bytes, str], Union[bytes, str]]], None]


class Receipt(NamedTuple):
    """Where a produced record was stored: ``offset`` is None while a
    delayed record waits in the broker's delay store (``deliver_at_ms``
    says when it fires)."""

    partition: int
    offset: Optional[int]
    message_id: bytes
    deliver_at_ms: Optional[int]

    @property
    def id(self) -> str:
        """The message id as 32 lowercase hex digits."""
        return self.message_id.hex()


class SendFuture:
    """The outcome of one :meth:`Producer.send`: ``await`` it for the
    :class:`Receipt` (after the broker's durable ack) or the error."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: asyncio.Future[list[Any]], index: int) -> None:
        self._batch = batch
        self._index = index

    def __await__(self) -> Generator[Any, None, Receipt]:
        results = yield from self._batch.__await__()
        return Receipt(*results[self._index])

    def done(self) -> bool:
        return self._batch.done()

    def result(self) -> Receipt:
        """The receipt (raises the error; asyncio.InvalidStateError if not done)."""
        return Receipt(*self._batch.result()[self._index])

    def exception(self) -> Optional[BaseException]:
        return self._batch.exception()


def _ms(value: Seconds) -> int:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return int(round(seconds * 1000))


def _epoch_ms(value: When) -> int:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("deliver_at needs a timezone-aware datetime")
        return int(value.timestamp() * 1000)
    return int(float(value) * 1000)


def _delivery_time(delay: Optional[Seconds], deliver_at: Optional[When]) -> tuple[int, int]:
    """A record's ``delivery_time`` as (tag, value): 0 now, 1 after
    ``delay`` (ms), 2 at ``deliver_at`` (ms since the epoch)."""
    if delay is not None and deliver_at is not None:
        raise ValueError("give delay or deliver_at, not both")
    if delay is not None:
        return 1, _ms(delay)
    if deliver_at is not None:
        return 2, _epoch_ms(deliver_at)
    return 0, 0


def _to_bytes(value: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _headers(headers: HeadersArg) -> list[Header]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [Header(_to_bytes(name), _to_bytes(value)) for name, value in items]


def _retrieve(future: asyncio.Future[Any]) -> None:
    # The batch's error is reported to whoever awaits a SendFuture; this
    # keeps asyncio from warning about batches nobody awaited.
    if not future.cancelled():
        future.exception()


class _Batch:
    __slots__ = ("topic", "partition", "records", "size", "future", "timer", "keyed")

    def __init__(self, topic: str, partition: Optional[int], future: asyncio.Future[list[Any]]) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[bytes] = []
        self.size = 0
        self.future = future
        self.timer: Optional[asyncio.Handle] = None
        #: Holds a keyed record (a batch without a partition then goes to
        #: the client's own node when routed).
        self.keyed = False


class Producer:
    """Batches and pipelines PRODUCE requests on a :class:`Client`."""

    def __init__(
        self,
        client: Client,
        *,
        linger: float = 0.005,
        max_batch_messages: int = 1000,
        max_batch_bytes: int = 1024 * 1024,
        max_in_flight: int = 16,
        idempotent: bool = True,
        max_retries: int = 5,
        producer_id: Optional[int] = None,
        route_to_leaders: bool = True,
    ) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.linger = linger
        self.max_batch_messages = max(1, max_batch_messages)
        self.max_batch_bytes = max(1, max_batch_bytes)
        self.max_in_flight = max(1, max_in_flight)
        self.idempotent = idempotent
        self.max_retries = max_retries
        self.producer_id = producer_id if producer_id is not None else secrets.randbits(63)
        self._next_sequence = 0
        self._open: dict[tuple[str, Optional[int]], _Batch] = {}
        self._ready: list[_Batch] = []
        self._in_flight = 0
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_gate = asyncio.Lock()
        self._send_order = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.route_to_leaders = route_to_leaders
        #: On a cluster: the routes and links (created at the first batch,
        #: once HELLO_OK said whether the broker is a cluster node).
        self._routing: Optional[Routing] = None
        #: False once the broker turned out to be a single broker.
        self._may_route = route_to_leaders
        #: Batches are routed one at a time, in the order they were closed.
        self._route_order = asyncio.Lock()
        #: On a cluster, the partition count of each topic whose leaders are
        #: known: a keyed record goes into its partition's batch. Empty on a
        #: single broker.
        self._partitions_of: dict[str, int] = {}

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Messages sent but not yet acknowledged (or failed)."""
        return self._pending

    def send(
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
    ) -> SendFuture:
        """Queues one record and returns at once. ``delay`` and ``ttl`` are
        seconds (or timedelta); ``deliver_at`` is a Unix time in seconds or
        an aware datetime. Raises RecordTooLarge (23) for a record over the
        broker's limit, before anything is sent."""
        if self._closed:
            raise ClientClosedError("producer closed")
        if type(value) is not bytes:
            value = _to_bytes(value)
        if key is None and headers is None and delay is None and deliver_at is None and ttl is None:
            n = len(value)
            if n + 9 > self._client.max_record_bytes:
                self._too_large(n + 9)
            record = b"\x00\x00\x00\x00\x00" + _U32(n) + value + b"\x00\x00"
        else:
            key_bytes = None if key is None else _to_bytes(key)
            header_list = _headers(headers)
            size = record_size(key_bytes, header_list, value)
            if size > self._client.max_record_bytes:
                self._too_large(size)
            tag, when = _delivery_time(delay, deliver_at)
            record = encode_record(value, key_bytes, header_list, tag, when, None if ttl is None else _ms(ttl))
            if key_bytes is not None and partition is None and self._partitions_of:
                count = self._partitions_of.get(topic)
                if count:
                    partition = key_partition(key_bytes, count)
        batch_key = (topic, partition)
        batch = self._open.get(batch_key)
        size = len(record)
        if batch is not None and batch.size + size > self._batch_bytes_limit():
            self._close(batch)
            batch = None
        if batch is None:
            future: asyncio.Future[list[Any]] = self._loop.create_future()
            future.add_done_callback(_retrieve)
            batch = _Batch(topic, partition, future)
            self._open[batch_key] = batch
            if self._in_flight == 0:
                batch.timer = self._loop.call_soon(self._close, batch)
            else:
                batch.timer = self._loop.call_later(self.linger, self._close, batch)
        index = len(batch.records)
        batch.records.append(record)
        batch.size += size
        if key is not None:
            batch.keyed = True
        self._pending += 1
        self._idle.clear()
        if index + 1 >= self.max_batch_messages or batch.size >= self.max_batch_bytes:
            self._close(batch)
        return SendFuture(batch.future, index)

    def _too_large(self, size: int) -> None:
        raise RecordTooLarge(23, f"a record of {size} bytes exceeds the broker's limit of {self._client.max_record_bytes} bytes")

    def _batch_bytes_limit(self) -> int:
        return min(self.max_batch_bytes, self._client.frame_limit - _FRAME_HEADROOM_BYTES)

    def _close(self, batch: _Batch) -> None:
        """The batch takes no more records: send it or queue it."""
        key = (batch.topic, batch.partition)
        if self._open.get(key) is not batch:
            return
        del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        if self._in_flight < self.max_in_flight and not self._ready:
            self._start(batch)
        else:
            self._ready.append(batch)

    def _start(self, batch: _Batch) -> None:
        self._in_flight += 1
        sequence = None
        if self.idempotent:
            sequence = (self.producer_id, self._next_sequence)
            self._next_sequence += 1
        task = self._loop.create_task(self._run(batch, sequence))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch, sequence: Optional[tuple[int, int]]) -> None:
        attempt = 0
        count = len(batch.records)
        route: Optional[Route] = None
        result: Union[list[Any], BaseException]
        try:
            partition = batch.partition
            if self.route_to_leaders:
                route = await self._route(batch)
                if route is not None:
                    partition = route.partition
            frame = produce_frame(0, batch.topic, partition, sequence, batch.records, batch.size)
            batch.records = []
            # The first try goes to the partition's leader if routed; retries
            # go through the client's own node (which fails over between
            # its addresses, and forwards).
            result = await self._attempt(frame, count, None if route is None else route.conn)
            if route is not None and isinstance(result, BaseException) and self._routing is not None:
                self._routing.stale = True
            while isinstance(result, DmqError) and result.transient and self.idempotent and attempt < self.max_retries and not self._closed_hard():
                attempt += 1
                async with self._retry_gate:
                    await asyncio.sleep(self._client.reconnect_backoff_initial * attempt)
                    result = await self._attempt(frame, count)
                    if attempt and isinstance(result, OutOfOrderSequence):
                        result = OutOfOrderSequence(
                            21,
                            f"{result.message}: the broker can no longer tell whether this retried batch was stored",
                        )
        except BaseException as error:  # noqa: BLE001 - reported through the batch's future
            result = error
        if route is not None:
            route.order.done()
        if isinstance(result, BaseException):
            batch.future.set_exception(result)
        else:
            batch.future.set_result(result)
        self._pending -= count
        self._in_flight -= 1
        while self._ready and self._in_flight < self.max_in_flight:
            self._start(self._ready.pop(0))
        if self._in_flight == 0:
            # Nothing in flight: send the open batches now rather than at their linger.
            for open_batch in list(self._open.values()):
                self._close(open_batch)
        if self._pending == 0:
            self._idle.set()

    def _closed_hard(self) -> bool:
        return self._client._closed

    async def _route(self, batch: _Batch) -> Optional[Route]:
        """Where the batch's first try goes on a cluster (:mod:`dmq.routing`),
        after the batches closed before it were routed; None: through the
        client's own node, as on a single broker."""
        # Every batch takes the lock when routing is asked for, also once
        # the broker turned out to be a single broker (then it is free at
        # once): a batch that skipped it could overtake one still queued.
        async with self._route_order:
            routing = self._routing
            if routing is None:
                if not self._may_route:
                    return None
                try:
                    await self._client.connection()
                except DmqError:
                    return None  # the try fails the usual way; decided later
                if self._client.node_id is None:
                    self._may_route = False  # a single broker ("dmqd")
                    return None
                routing = self._routing = Routing(self._client)
            route = await routing.route(batch.topic, batch.partition, batch.keyed)
            self._learn_partitions(batch.topic, routing.partitions(batch.topic))
            return route

    def _learn_partitions(self, topic: str, count: Optional[int]) -> None:
        if count is None or self._partitions_of.get(topic) == count:
            return
        self._partitions_of[topic] = count
        # Keyed records joined the topic's unplaced batch until now and
        # join their partition's from now on: the unplaced one goes out
        # first, so that a key's later record cannot leave before it.
        unplaced = self._open.get((topic, None))
        if unplaced is not None:
            self._close(unplaced)

    async def _attempt(self, frame: bytearray, count: int, link: Optional[Connection] = None) -> Union[list[Any], BaseException]:
        """One try, on ``link`` (a connection to the partition's leader) or
        the client's own connection: the decoded results, or the error (not
        raised)."""
        try:
            # Frames go out in the order their sequences were given (FIFO
            # lock): a sender woken late from drain() must not be overtaken
            # by a later batch, or the broker refuses the earlier one as
            # OutOfOrderSequence.
            async with self._send_order:
                conn = link if link is not None else await self._client.connection()
                correlation_id = conn.next_correlation_id()
                set_correlation_id(frame, correlation_id)
                await conn.drain()
                future = conn.send_raw(frame, correlation_id)
        except DmqError as error:
            return error
        try:
            data = await asyncio.wait_for(future, self._client.request_timeout)
        except asyncio.TimeoutError:
            conn.forget(correlation_id)
            return RequestTimeoutError(f"no PRODUCE_OK within {self._client.request_timeout} s")
        except DmqError as error:
            return error
        try:
            results = decode_produce_ok(data)
        except ProtocolError as error:
            conn.abort(error)
            return error
        if len(results) != count:
            mismatch = ProtocolError(f"PRODUCE_OK holds {len(results)} results for {count} records")
            conn.abort(mismatch)
            return mismatch
        return results

    async def flush(self) -> None:
        """Sends every open batch and waits until every message sent so far
        is acknowledged or failed."""
        for batch in list(self._open.values()):
            self._close(batch)
        if self._pending:
            await self._idle.wait()

    async def drain(self, max_pending: int) -> None:
        """Waits until at most ``max_pending`` messages are unacknowledged
        (backpressure for loops that send faster than the broker acks)."""
        while self._pending > max_pending:
            for batch in list(self._open.values()):
                self._close(batch)
            tasks = list(self._tasks)
            if not tasks:
                break
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)

    async def close(self) -> None:
        """Flushes, then refuses further sends and closes the connections
        opened to partition leaders."""
        await self.flush()
        self._closed = True
        if self._routing is not None:
            await self._routing.close()

    # Convenience -------------------------------------------------------------------

    async def produce(self, topic: str, value: Union[bytes, bytearray, memoryview, str], **options: Any) -> Receipt:
        """send() and wait for the ack."""
        return await self.send(topic, value, **options)


__all__ = ["Producer", "Receipt", "SendFuture"]
