"""Consuming: :class:`Consumer` joins a group (SUBSCRIBE) and is an async
iterator of :class:`Message`; each message is settled with
:meth:`Message.ack` or :meth:`Message.nack`.

Owns flow control and settlement. With ``credit`` > 0 the broker pushes
up to that many messages ahead; a credit is given back when a pushed
message is acked or nacked, so at most ``credit`` messages are buffered or
being processed. ``credit=0`` is pull-only: use :meth:`Consumer.fetch`
(FETCH). Acks, nacks and credits are batched over ``ack_linger`` seconds
(or ``max_ack_batch`` settlements) into one ACK frame, one NACK frame per
delay and one CREDIT frame; ``ack()`` returns an awaitable that resolves
with the broker's OK of the ACK that carried it (awaiting is optional).

After a lost connection the consumer subscribes again with the same
group and member (the client reconnects with backoff); messages received
on the old connection are dropped from the queue (the broker redelivers
them), and settling one fails with :class:`StaleDeliveryError`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Generator, Optional, Union

from .client import Client
from .codec import (
    Ack,
    Credit,
    Deliveries,
    Delivery,
    DeliveryMode,
    Fetch,
    GroupSettings,
    Header,
    MessagePosition,
    Nack,
    Position,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from .errors import ClientClosedError, DmqError, ProtocolError, StaleDeliveryError, WrongNode

_END = object()


class SettleFuture:
    """Awaitable outcome of an ack or nack: the broker's OK of the frame
    that carried it, or the error."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        yield from self._future.__await__()

    def done(self) -> bool:
        return self._future.done()


def _failed(loop: asyncio.AbstractEventLoop, error: BaseException) -> SettleFuture:
    future: asyncio.Future[None] = loop.create_future()
    future.set_exception(error)
    future.add_done_callback(_retrieve)
    return SettleFuture(future)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Message:
    """One delivered message. ``attempt`` counts deliveries from 1."""

    __slots__ = (
        "topic", "partition", "offset", "attempt", "message_id", "timestamp_ms", "key", "headers",
        "value", "deliver_at_ms", "expire_at_ms", "_consumer", "_generation", "_pushed", "_settled",
    )

    def __init__(self, delivery: Delivery, consumer: Consumer, generation: int, pushed: bool) -> None:
        self.topic = delivery.topic
        self.partition = delivery.partition
        self.offset = delivery.offset
        self.attempt = delivery.attempt
        self.message_id = delivery.message_id
        self.timestamp_ms = delivery.timestamp_ms
        self.key: Optional[bytes] = delivery.key
        self.headers: list[Header] = delivery.headers
        self.value = delivery.value
        self.deliver_at_ms = delivery.deliver_at_ms
        self.expire_at_ms = delivery.expire_at_ms
        self._consumer = consumer
        self._generation = generation
        self._pushed = pushed
        self._settled = False

    @property
    def id(self) -> str:
        """The message id as 32 lowercase hex digits."""
        return self.message_id.hex()

    def header(self, name: Union[bytes, str]) -> Optional[bytes]:
        """The first header of this name, if any."""
        wanted = name.encode() if isinstance(name, str) else name
        for header in self.headers:
            if header.name == wanted:
                return header.value
        return None

    def ack(self) -> SettleFuture:
        """Acknowledges: the group is done with this message."""
        return self._consumer._settle(self, None, False)

    def nack(self, delay: Optional[float] = None) -> SettleFuture:
        """Ends this attempt; redelivered after ``delay`` seconds (None: the
        group's backoff; 0: at once)."""
        delay_ms = None if delay is None else max(0, int(round(delay * 1000)))
        return self._consumer._settle(self, delay_ms, True)

    def __repr__(self) -> str:
        return f"Message(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, attempt={self.attempt}, value={self.value[:32]!r})"


class _Settlements:
    """Acks, nacks and credits waiting for the next flush."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.acks: list[MessagePosition] = []
        self.nacks: dict[Optional[int], list[MessagePosition]] = {}
        self.credit = 0
        self.count = 0
        self.future: asyncio.Future[None] = loop.create_future()
        self.future.add_done_callback(_retrieve)


class Consumer:
    """A member of a consumer group on one topic."""

    def __init__(
        self,
        client: Client,
        topic: str,
        group: str,
        *,
        member: Optional[str] = None,
        mode: DeliveryMode = DeliveryMode.CLUSTERING,
        start: Position = Position(0),
        credit: int = 1000,
        settings: GroupSettings = GroupSettings(),
        ack_linger: float = 0.005,
        max_ack_batch: int = 4096,
    ) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.topic = topic
        self.group = group
        self.member = member or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"[:100]
        self.mode = mode
        self.start_position = start
        self.credit = credit
        self.settings = settings
        self.ack_linger = ack_linger
        self.max_ack_batch = max(1, max_ack_batch)
        self.partitions: list[int] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subscription_id: Optional[int] = None
        self._generation = 0
        self._lost = False
        self._closed = False
        self._settlements: Optional[_Settlements] = None
        self._flush_handle: Optional[asyncio.TimerHandle] = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._resubscribe_lock = asyncio.Lock()
        client.add_lost_listener(self._on_lost)

    async def __aenter__(self) -> Consumer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> Consumer:
        """Subscribes (SUBSCRIBE); raises the broker's refusal."""
        await self._subscribe()
        return self

    async def _subscribe(self) -> None:
        # A cluster node that does not serve consumers answers WrongNode
        # with the one that does: the connection moves there and the
        # SUBSCRIBE is sent again, within the request timeout.
        deadline = self._loop.time() + self._client.request_timeout
        while True:
            conn = await self._client.connection()
            generation = self._client.generation
            try:
                body = await conn.call(
                    Subscribe(self.topic, self.group, self.member, self.mode, self.start_position, self.credit, self.settings),
                    self._client.request_timeout,
                )
            except WrongNode as error:
                if self._loop.time() >= deadline:
                    raise
                if error.address:
                    conn.abort(error)  # the client reconnects where it says
                # Else no node serves yet (an election): ask again.
                await asyncio.sleep(0.05)
                continue
            break
        if not isinstance(body, Subscribed):
            raise ProtocolError(f"expected SUBSCRIBED, got {type(body).__name__}")
        self._subscription_id = body.subscription_id
        self._generation = generation
        self.partitions = list(body.partitions)
        self._lost = conn.closed
        self._client.register_subscription(generation, body.subscription_id, self._on_delivery)

    def _on_delivery(self, delivery: Delivery) -> None:
        self._queue.put_nowait(Message(delivery, self, self._generation, True))

    def _on_lost(self, generation: int) -> None:
        if generation == self._generation and not self._lost:
            self._lost = True
            self._queue.put_nowait(_END)  # wakes a waiting iterator

    async def _ensure_subscribed(self) -> None:
        async with self._resubscribe_lock:
            if self._lost and not self._closed:
                # Messages of the old connection cannot be settled any more.
                while not self._queue.empty():
                    self._queue.get_nowait()
                self._settlements = None
                await self._subscribe()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._lost and self._queue.empty():
                await self._ensure_subscribed()
            item = await self._queue.get()
            if item is _END:
                continue
            message: Message = item
            if message._generation != self._generation:
                continue
            return message

    async def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, or None after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except asyncio.TimeoutError:
            return None
        except StopAsyncIteration:
            return None

    async def fetch(self, max_messages: int = 100, wait: float = 0.0) -> list[Message]:
        """FETCH: up to ``max_messages``, waiting up to ``wait`` seconds for
        the first; possibly none."""
        if self._lost:
            await self._ensure_subscribed()
        if self._subscription_id is None:
            raise ClientClosedError("not subscribed")
        wait_ms = int(wait * 1000)
        body = await self._client.request(
            Fetch(self._subscription_id, max_messages, wait_ms), timeout=self._client.request_timeout + wait
        )
        if not isinstance(body, Deliveries):
            raise ProtocolError(f"expected DELIVERIES, got {type(body).__name__}")
        return [Message(d, self, self._generation, False) for d in body.deliveries]

    # ----- settlement ---------------------------------------------------------------

    def _settle(self, message: Message, delay_ms: Optional[int], nack: bool) -> SettleFuture:
        if message._generation != self._generation or self._lost:
            return _failed(self._loop, StaleDeliveryError("the message was received on a connection since lost; the broker redelivers it"))
        if self._closed and self._subscription_id is None:
            return _failed(self._loop, ClientClosedError("consumer closed"))
        if message._settled:
            return _failed(self._loop, DmqError("message already acked or nacked"))
        message._settled = True
        s = self._settlements
        if s is None:
            s = self._settlements = _Settlements(self._loop)
            self._flush_handle = self._loop.call_later(self.ack_linger, self._flush)
        position = MessagePosition(message.partition, message.offset)
        if nack:
            s.nacks.setdefault(delay_ms, []).append(position)
        else:
            s.acks.append(position)
        if message._pushed and self.credit > 0:
            s.credit += 1
        s.count += 1
        future = s.future
        if s.count >= self.max_ack_batch:
            self._flush()
        return SettleFuture(future)

    def _settled_in_transaction(self, message: Message) -> None:
        """``message`` was acked in a transaction (TXN_ACK): settled here,
        its push credit given back with the next flush."""
        message._settled = True
        if message._pushed and self.credit > 0:
            s = self._settlements
            if s is None:
                s = self._settlements = _Settlements(self._loop)
                self._flush_handle = self._loop.call_later(self.ack_linger, self._flush)
            s.credit += 1
            s.count += 1

    def _flush(self) -> None:
        s, self._settlements = self._settlements, None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if s is None:
            return
        task = self._loop.create_task(self._send_settlements(s, self._generation))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send_settlements(self, s: _Settlements, generation: int) -> None:
        try:
            conn = await self._client.connection()
            if generation != self._client.generation or self._subscription_id is None:
                raise StaleDeliveryError("the connection these messages came on was lost; the broker redelivers them")
            sid = self._subscription_id
            futures = []
            if s.acks:
                futures.append(conn.request(Ack(sid, s.acks)))
            for delay_ms, positions in s.nacks.items():
                futures.append(conn.request(Nack(sid, positions, delay_ms)))
            if s.credit:
                futures.append(conn.request(Credit(sid, s.credit)))
            await asyncio.wait_for(asyncio.gather(*futures), self._client.request_timeout)
        except asyncio.TimeoutError:
            s.future.set_exception(DmqError("no answer to ACK/NACK within the request timeout"))
        except BaseException as error:  # noqa: BLE001 - reported through the settle future
            s.future.set_exception(error)
        else:
            s.future.set_result(None)

    async def flush(self) -> None:
        """Sends pending acks and nacks now and waits for their answers."""
        s = self._settlements
        self._flush()
        if s is not None:
            try:
                await s.future
            except DmqError:
                pass
        if self._flushes:
            await asyncio.gather(*list(self._flushes), return_exceptions=True)

    async def close(self) -> None:
        """Flushes acks, then UNSUBSCRIBE (unsettled deliveries are
        redelivered to other members)."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        self._queue.put_nowait(_END)
        self._client.remove_lost_listener(self._on_lost)
        sid, self._subscription_id = self._subscription_id, None
        if sid is not None and not self._lost and self._client.connected:
            self._client.unregister_subscription(self._generation, sid)
            try:
                await self._client.request(Unsubscribe(sid))
            except DmqError:
                pass
