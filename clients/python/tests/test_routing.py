"""A producer's batches go to their partitions' leaders (dmq.routing),
against fake cluster nodes on 127.0.0.1: the leaders are asked, a batch of
partition p goes to the connection of p's leader, an empty address goes
through the client's own node, a batch waits for the old route's batches
when its partition's route moves, and a routed batch that failed is
retried through the own node. On a single broker nothing is asked."""

from __future__ import annotations

import asyncio
from typing import Optional

import pytest
from conftest import read_request, run, start_fake

import dmq
import dmq.routing
from dmq.codec import (
    Empty,
    Frame,
    HelloOk,
    Leaders,
    Opcode,
    PartitionLeader,
    Produce,
    Produced,
    ProduceOk,
    encode_frame,
    key_partition,
)

TOPIC = "orders"
PARTITIONS = 3

#: What the fake nodes saw, in order: ("produce", node, partition, sequence)
#: when a PRODUCE arrived, ("answer", node, partition, sequence) when its
#: PRODUCE_OK was written.
Log = list[tuple[str, str, Optional[int], int]]


class FakeNode:
    """A node that says it is ``broker_id`` in HELLO_OK, answers
    PARTITION_LEADERS with ``leaders`` and PRODUCE with PRODUCE_OK (later,
    for a partition in ``held``, once ``release`` is set; never, closing
    the connection, while ``drop_produce``)."""

    def __init__(self, broker_id: str, log: Log) -> None:
        self.broker_id = broker_id
        self.log = log
        self.leaders: list[PartitionLeader] = []
        self.asked = 0
        self.connections = 0
        self.produced: list[Produce] = []
        self.held: set[int] = set()
        self.release = asyncio.Event()
        self.drop_produce = False
        self.address = ""
        self._offset = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> asyncio.Server:
        server, self.address = await start_fake(self._handle)
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                frame = await read_request(reader)
                cid = frame.correlation_id
                if frame.opcode == Opcode.HELLO:
                    writer.write(encode_frame(Frame(Opcode.HELLO_OK, cid, HelloOk(1, 1 << 24, self.broker_id))))
                elif frame.opcode == Opcode.PING:
                    writer.write(encode_frame(Frame(Opcode.PONG, cid, Empty())))
                elif frame.opcode == Opcode.PARTITION_LEADERS:
                    self.asked += 1
                    writer.write(encode_frame(Frame(Opcode.LEADERS, cid, Leaders(list(self.leaders)))))
                elif frame.opcode == Opcode.PRODUCE:
                    produce = frame.body
                    assert isinstance(produce, Produce) and produce.idempotence is not None
                    self.produced.append(produce)
                    self.log.append(("produce", self.broker_id, produce.partition, produce.idempotence[1]))
                    if self.drop_produce:
                        return
                    task = asyncio.ensure_future(self._answer(writer, cid, produce))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, cid: int, produce: Produce) -> None:
        if produce.partition in self.held:
            await self.release.wait()
        results = []
        for record in produce.records:
            partition = produce.partition
            if partition is None:
                partition = key_partition(record.key, PARTITIONS) if record.key is not None else 0
            self._offset += 1
            results.append(Produced(partition, self._offset, self._offset.to_bytes(16, "little"), None))
        assert produce.idempotence is not None
        self.log.append(("answer", self.broker_id, produce.partition, produce.idempotence[1]))
        writer.write(encode_frame(Frame(Opcode.PRODUCE_OK, cid, ProduceOk(results))))

    def partitions_produced(self) -> list[Optional[int]]:
        return [p.partition for p in self.produced]


def key_of(partition: int) -> str:
    """A key that the broker's rule puts in ``partition``."""
    return next(f"k{i}" for i in range(1000) if key_partition(f"k{i}".encode(), PARTITIONS) == partition)


async def two_nodes() -> tuple[FakeNode, FakeNode, Log, list[asyncio.Server]]:
    log: Log = []
    own, other = FakeNode("1", log), FakeNode("2", log)
    servers = [await own.start(), await other.start()]
    # Partition 0 led by the client's own node, 1 by node 2, 2 by none
    # known (empty address: through the own node).
    own.leaders = [
        PartitionLeader(0, 1, own.address),
        PartitionLeader(1, 2, other.address),
        PartitionLeader(2, 0, ""),
    ]
    return own, other, log, servers


def test_each_partition_goes_to_its_leader_and_waits_for_its_old_route(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        own, other, log, servers = await two_nodes()
        async with dmq.Client(own.address, request_timeout=5) as client:
            producer = client.producer()
            # The first batch: the partitions are not known yet, so the
            # keyed record goes to the own node without a partition
            # (which places it), after the leaders were asked.
            first = await producer.send(TOPIC, "first", key=key_of(1))
            assert first.partition == 1
            assert own.asked == 1 and own.partitions_produced() == [None]
            assert other.produced == []

            # Placed by key, each to its partition's leader: 0 (the own
            # node leads), 1 (node 2, on a connection of its own), 2 (no
            # leader known: the own node).
            for partition in range(PARTITIONS):
                receipt = await producer.send(TOPIC, f"keyed {partition}", key=key_of(partition))
                assert receipt.partition == partition
            assert own.partitions_produced() == [None, 0, 2]
            assert other.partitions_produced() == [1]
            # An unkeyed batch takes a partition round robin (0 first),
            # sent to its leader with that partition.
            unkeyed = await producer.send(TOPIC, "unkeyed")
            assert unkeyed.partition == 0 and own.partitions_produced()[-1] == 0
            # Asked once (not yet 3 s old); one link to node 2.
            assert own.asked == 1 and other.asked == 0 and other.connections == 1

            # Partition 1's leadership moves to the own node while a batch
            # of it waits for its answer at node 2: the next batch of
            # partition 1 must not reach the own node before that answer.
            other.held.add(1)
            on_old_route = producer.send(TOPIC, "on the old route", key=key_of(1))
            deadline = asyncio.get_running_loop().time() + 5
            while len(other.produced) < 2:
                assert asyncio.get_running_loop().time() < deadline, "the batch never reached node 2"
                await asyncio.sleep(0.01)
            own.leaders[1] = PartitionLeader(1, 1, own.address)
            monkeypatch.setattr(dmq.routing, "ROUTES_MAX_AGE", 0.0)  # ask before every batch
            on_new_route = producer.send(TOPIC, "on the new route", key=key_of(1))
            await asyncio.sleep(0.3)
            assert own.asked >= 2, "the leaders were not asked again"
            assert not on_old_route.done() and not on_new_route.done()
            assert 1 not in own.partitions_produced(), "the new route overtook the old one"
            other.release.set()
            old, new = await on_old_route, await on_new_route
            assert (old.partition, new.partition) == (1, 1)
            assert own.partitions_produced()[-1] == 1
            old_sequence, new_sequence = other.produced[-1].idempotence, own.produced[-1].idempotence
            assert old_sequence is not None and new_sequence is not None
            answered = log.index(("answer", "2", 1, old_sequence[1]))
            moved = log.index(("produce", "1", 1, new_sequence[1]))
            assert answered < moved, log
            await producer.close()
            assert other.connections == 1  # still the one link
        for server in servers:
            server.close()

    run(main(), timeout=30)


def test_a_routed_batch_that_failed_is_retried_through_the_own_node() -> None:
    async def main() -> None:
        own, other, _, servers = await two_nodes()
        async with dmq.Client(own.address, request_timeout=5) as client:
            producer = client.producer()
            await producer.send(TOPIC, "first", key=key_of(0))
            asked = own.asked
            other.drop_produce = True
            receipt = await producer.send(TOPIC, "dropped by node 2", key=key_of(1))
            assert receipt.partition == 1
            # Tried at node 2 (which hung up), then through the own node
            # with the same sequence and partition.
            tried, retried = other.produced[-1], own.produced[-1]
            assert tried.idempotence == retried.idempotence and retried.partition == 1
            # The failure makes the producer ask again; the lost link is
            # passed over: through the own node, which forwards.
            await producer.send(TOPIC, "after the failure", key=key_of(1))
            assert own.asked == asked + 1
            assert len(other.produced) == 1 and own.partitions_produced()[-1] == 1
            await producer.close()
        for server in servers:
            server.close()

    run(main(), timeout=30)


def test_nothing_is_asked_of_a_single_broker_or_with_routing_off() -> None:
    async def main() -> None:
        log: Log = []
        single = FakeNode("dmqd", log)
        node = FakeNode("1", log)
        servers = [await single.start(), await node.start()]
        node.leaders = [PartitionLeader(p, 2, "127.0.0.1:1") for p in range(PARTITIONS)]
        for fake, options in ((single, {}), (node, {"route_to_leaders": False})):
            async with dmq.Client(fake.address, request_timeout=5) as client:
                producer = client.producer(**options)
                for i in range(5):
                    await producer.send(TOPIC, f"v{i}", key=key_of(i % PARTITIONS))
                await producer.send(TOPIC, "unkeyed")
                await producer.close()
            # As before routing: no ask, every batch to the client's node,
            # the broker places every record.
            assert fake.asked == 0 and fake.connections == 1
            assert fake.partitions_produced() == [None] * 6
        for server in servers:
            server.close()

    run(main(), timeout=30)
