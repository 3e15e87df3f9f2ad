"""A small synchronous wrapper: the asyncio client on an event loop in a
background thread, for code that is not async.

Owns: :class:`SyncClient` (admin calls, :meth:`SyncClient.producer`,
:meth:`SyncClient.consumer`), :class:`SyncProducer` (``send`` returns a
``concurrent.futures.Future`` of the :class:`~dmq.producer.Receipt`) and
:class:`SyncConsumer` (an iterator of messages; ``ack``/``nack`` block
until the broker answered).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Iterator, Optional, TypeVar

from .client import Client
from .codec import GroupDescription, PartitionLeader, Position, SeekReport, TopicDescription, TopicSummary
from .consumer import Consumer, Message
from .producer import Producer, Receipt

T = TypeVar("T")


class SyncClient:
    """``SyncClient("127.0.0.1:7070", client_id=..., secret=...)``; takes
    the keyword arguments of :class:`~dmq.client.Client`."""

    def __init__(self, address: str = "127.0.0.1:7070", **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dmq-sync", daemon=True)
        self._thread.start()
        self._client: Client = self._run(self._make(address, options))
        self._run(self._client.connect())

    @staticmethod
    async def _make(address: str, options: dict[str, Any]) -> Client:
        return Client(address, **options)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_topic(self, name: str, partitions: int = 1, *, ordered: bool = False, exist_ok: bool = False) -> None:
        self._run(self._client.create_topic(name, partitions, ordered=ordered, exist_ok=exist_ok))

    def delete_topic(self, name: str) -> None:
        self._run(self._client.delete_topic(name))

    def list_topics(self) -> list[TopicSummary]:
        return self._run(self._client.list_topics())

    def describe_topic(self, name: str) -> TopicDescription:
        return self._run(self._client.describe_topic(name))

    def partition_leaders(self, topic: str) -> list[PartitionLeader]:
        return self._run(self._client.partition_leaders(topic))

    def describe_group(self, topic: str, group: str) -> GroupDescription:
        return self._run(self._client.describe_group(topic, group))

    def seek(self, topic: str, group: str, target: Position, *, partition: Optional[int] = None, dry_run: bool = True) -> SeekReport:
        return self._run(self._client.seek(topic, group, target, partition=partition, dry_run=dry_run))

    def producer(self, **options: Any) -> SyncProducer:
        return SyncProducer(self, self._run(self._make_producer(options)))

    async def _make_producer(self, options: dict[str, Any]) -> Producer:
        return Producer(self._client, **options)

    def consumer(self, topic: str, group: str, **options: Any) -> SyncConsumer:
        async def make() -> Consumer:
            return await Consumer(self._client, topic, group, **options).start()

        return SyncConsumer(self, self._run(make()))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class SyncProducer:
    """Blocking facade of :class:`~dmq.producer.Producer`."""

    def __init__(self, owner: SyncClient, producer: Producer) -> None:
        self._owner = owner
        self._producer = producer

    def send(self, topic: str, value: bytes | str, **options: Any) -> concurrent.futures.Future[Receipt]:
        """Queues one record; the future resolves on the durable ack."""

        async def go() -> Receipt:
            return await self._producer.send(topic, value, **options)

        return asyncio.run_coroutine_threadsafe(go(), self._owner._loop)

    def produce(self, topic: str, value: bytes | str, **options: Any) -> Receipt:
        """send() and wait for the ack."""
        return self.send(topic, value, **options).result()

    def flush(self) -> None:
        self._owner._run(self._producer.flush())


class SyncConsumer:
    """Blocking facade of :class:`~dmq.consumer.Consumer`."""

    def __init__(self, owner: SyncClient, consumer: Consumer) -> None:
        self._owner = owner
        self._consumer = consumer

    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, or None after ``timeout`` seconds."""
        return self._owner._run(self._consumer.receive(timeout))

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.receive(None)
            if message is None:
                return
            yield message

    def ack(self, message: Message) -> None:
        async def go() -> None:
            await message.ack()

        self._owner._run(go())

    def nack(self, message: Message, delay: Optional[float] = None) -> None:
        async def go() -> None:
            await message.nack(delay)

        self._owner._run(go())

    def close(self) -> None:
        self._owner._run(self._consumer.close())
