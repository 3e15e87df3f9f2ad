"""The client against a real dmqd (started by conftest.py on free
127.0.0.1 ports with a temporary data directory): business acks,
redelivery, nack with delay, delayed messages, TTL, broadcast to several
groups, the idempotent producer, and production-mode credentials."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import Broker, run, unique

import dmq
from dmq import BrokerError, ErrorCode, GroupSettings, Position
from dmq.codec import key_partition


async def drain(consumer: dmq.Consumer, count: int, timeout: float = 20.0) -> list[dmq.Message]:
    """``count`` messages, each acked; fails if they do not come in time."""
    got: list[dmq.Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        message = await consumer.receive(max(0.0, deadline - time.monotonic()))
        assert message is not None, f"only {len(got)} of {count} messages arrived"
        await message.ack()
        got.append(message)
    return got


def test_a_client_given_several_brokers_connects_to_one_that_answers(broker: Broker) -> None:
    """A cluster's nodes listed: a node that does not answer (a port nobody
    listens on) passes the turn to the next."""
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"

    async def main() -> None:
        topic = unique("listed")
        async with dmq.Client(f"{closed}, {broker.address}", client_id="py-test") as client:
            assert f"{client.host}:{client.port}" == broker.address
            await client.create_topic(topic, 1)
            receipt = await client.producer().send(topic, "hello")
            assert receipt.offset == 0

    run(main())
    with pytest.raises(ValueError):
        dmq.Client(" , ")


def test_a_consumer_sent_to_another_node_subscribes_there(broker: Broker) -> None:
    """A cluster node that does not serve consumers answers SUBSCRIBE with
    WrongNode and the serving node's address (here a fake node sending the
    client to the real broker): the consumer moves its client's connection
    there and subscribes."""
    import struct

    async def fake_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack("<I", await reader.readexactly(4))[0]
                body = await reader.readexactly(size)
                opcode, correlation_id = struct.unpack_from("<HI", body, 0)
                if opcode == 0x0001:  # HELLO
                    answer = struct.pack("<HIH", 1, 1 << 24, 2) + b"f1"
                    writer.write(struct.pack("<IHIB", 7 + len(answer), 0x8001, correlation_id, 0) + answer)
                else:  # SUBSCRIBE, or anything: served elsewhere
                    address = broker.address.encode()
                    answer = struct.pack("<IH", 29, len(address)) + address
                    writer.write(struct.pack("<IHIB", 7 + len(answer), 0xBFFF, correlation_id, 0) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        topic = unique("moved")
        server = await asyncio.start_server(fake_node, "127.0.0.1", 0)
        fake = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            async with dmq.Client(broker.address, client_id="py-test") as setup:
                await setup.create_topic(topic, 1)
                await setup.producer().send(topic, "to the serving node")
            async with dmq.Client(fake, client_id="py-test") as client:
                async with client.consumer(topic, "moved") as consumer:
                    (message,) = await drain(consumer, 1)
                    assert message.value == b"to the serving node"
                    assert f"{client.host}:{client.port}" == fake  # the list is unchanged
                    assert client.connected

    run(main())


def test_produce_consume_ack(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("orders")
        async with dmq.Client(broker.address, client_id="py-test") as client:
            await client.create_topic(topic, 2)
            producer = client.producer()
            futures = [
                producer.send(topic, f"order {i}", key=f"k{i % 5}", headers={"source": "test"})
                for i in range(200)
            ]
            receipts = [await f for f in futures]
            assert all(r.offset is not None for r in receipts)
            assert len({r.message_id for r in receipts}) == 200
            async with client.consumer(topic, "billing") as consumer:
                got = await drain(consumer, 200)
            assert sorted(m.value for m in got) == sorted(f"order {i}".encode() for i in range(200))
            assert all(m.attempt == 1 and m.header("source") == b"test" for m in got)
            # Per key, partition order holds.
            by_key: dict[bytes, list[int]] = {}
            for m in got:
                assert m.key is not None
                by_key.setdefault(m.key, []).append(m.offset)
            assert all(offsets == sorted(offsets) for offsets in by_key.values())
            # Every ack reached the broker: nothing is left for the group.
            deadline = time.monotonic() + 10
            while True:
                group = await client.describe_group(topic, "billing")
                if sum(p.lag for p in group.partitions) == 0:
                    break
                assert time.monotonic() < deadline, group
                await asyncio.sleep(0.05)

    run(main())


def test_a_message_not_acked_by_a_consumer_that_dies_is_redelivered(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("payments")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            await client.producer().produce(topic, b"pay 1")
        # The first member takes the message and dies without acking.
        dying = dmq.Client(broker.address)
        await dying.connect()
        consumer = await dying.consumer(topic, "ledger", member="first").start()
        first = await consumer.receive(10)
        assert first is not None and first.attempt == 1
        dying.drop_connection()
        await dying.close()
        async with dmq.Client(broker.address) as client:
            async with client.consumer(topic, "ledger", member="second") as survivor:
                again = await survivor.receive(10)
                assert again is not None
                assert (again.value, again.message_id, again.attempt) == (b"pay 1", first.message_id, 2)
                await again.ack()

    run(main())


def test_nack_with_a_delay_redelivers_after_it(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("retry")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            await client.producer().produce(topic, b"flaky")
            async with client.consumer(topic, "g") as consumer:
                first = await consumer.receive(10)
                assert first is not None
                nacked_at = time.monotonic()
                await first.nack(0.5)
                again = await consumer.receive(10)
                waited = time.monotonic() - nacked_at
                assert again is not None and again.attempt == 2 and again.value == b"flaky"
                assert waited >= 0.45, f"redelivered after {waited:.3f} s"
                await again.ack()

    run(main())


def test_a_delayed_message_arrives_at_its_time(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("remind")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            async with client.consumer(topic, "g") as consumer:
                sent_at = time.time()
                receipt = await client.producer().send(topic, b"remind to pay", delay=1.0)
                assert receipt.offset is None and receipt.deliver_at_ms is not None
                assert await consumer.receive(0.5) is None, "delivered before its time"
                message = await consumer.receive(10)
                assert message is not None and message.value == b"remind to pay"
                assert message.message_id == receipt.message_id
                assert time.time() - sent_at >= 0.95
                assert message.deliver_at_ms == receipt.deliver_at_ms
                await message.ack()

    run(main())


def test_an_expired_message_is_never_delivered(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("ttl")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            producer = client.producer()
            await producer.send(topic, b"stale", ttl=0.2)
            await producer.send(topic, b"fresh", ttl=600)
            await asyncio.sleep(0.5)
            async with client.consumer(topic, "late") as consumer:
                message = await consumer.receive(10)
                assert message is not None and message.value == b"fresh"
                await message.ack()
                assert await consumer.receive(0.5) is None

    run(main())


def test_every_group_gets_every_message(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("events")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 3)
            producer = client.producer()
            for i in range(30):
                producer.send(topic, f"e{i}")
            await producer.flush()
            for group in ("billing", "shipping", "audit"):
                async with client.consumer(topic, group, start=Position.earliest()) as consumer:
                    got = await drain(consumer, 30)
                    assert sorted(m.value for m in got) == sorted(f"e{i}".encode() for i in range(30))

    run(main())


def test_an_idempotent_retry_after_a_reconnect_is_not_stored_twice(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("idem")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            first = await client.producer(producer_id=4242).send(topic, b"once", partition=0)
        # The same producer id and sequence on a new connection: a retry.
        async with dmq.Client(broker.address) as client:
            retry = await client.producer(producer_id=4242).send(topic, b"once", partition=0)
            assert retry == first
            description = await client.describe_topic(topic)
            assert [p.end_offset for p in description.partitions] == [1]

    run(main())


def test_a_group_setting_conflict_is_a_clear_error(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("conflict")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            async with client.consumer(topic, "g", settings=GroupSettings(max_attempts=3)):
                with pytest.raises(BrokerError) as refused:
                    await client.consumer(topic, "g", settings=GroupSettings(max_attempts=5)).start()
            assert refused.value.code == ErrorCode.GROUP_CONFIG_CONFLICT
            with pytest.raises(BrokerError) as unknown:
                await client.producer().send(unique("missing"), b"x")
            assert unknown.value.code == ErrorCode.UNKNOWN_TOPIC

    run(main())


# `dmq hash-secret` of "py-secret" and of "admin-token".
CLIENT_HASH = "$argon2id$v=19$m=19456,t=2,p=1$s8R6cVgCWOL8shXeIIijFA$bD6T7OnUR/jCO8ZYpe5zCLJt/IGfEeoj86LH2RNrpe0"
ADMIN_HASH = "$argon2id$v=19$m=19456,t=2,p=1$joVEQ728cd9x760z10nZxg$RnoMNncGRPPojNvhvME7qH35UMXg2SzKnXY+U763Ekk"


def test_production_mode_refuses_a_wrong_secret_and_admits_the_right_one() -> None:
    config = f'admin_tokens = ["{ADMIN_HASH}"]\n[clients]\norders-service = "{CLIENT_HASH}"\n'
    production = Broker(config=config).start()
    try:

        async def main() -> None:
            wrong = dmq.Client(production.address, client_id="orders-service", secret="nope")
            with pytest.raises(BrokerError) as refused:
                await wrong.connect()
            assert refused.value.code == ErrorCode.AUTHENTICATION_FAILED
            await wrong.close()
            async with dmq.Client(production.address, client_id="orders-service", secret="py-secret") as right:
                await right.ping()

        run(main())
    finally:
        production.cleanup()


def test_the_broker_puts_a_key_where_key_partition_says(broker: Broker) -> None:
    """The rule a routing producer places keys by (dmq.codec.key_partition)
    is the broker's: 200 keyed records sent without a partition land on
    the partition it computes."""

    async def main() -> None:
        topic = unique("keys")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 7)
            producer = client.producer()
            keys = [f"customer-{i}" for i in range(200)]
            futures = [producer.send(topic, b"x", key=key) for key in keys]
            for key, future in zip(keys, futures):
                assert (await future).partition == key_partition(key.encode(), 7), key

    run(main())


def test_pipelined_idempotent_batches_are_all_stored_in_order(broker: Broker) -> None:
    """Many batches in flight at once: each is sent in the order of its
    sequence, so none is refused as OutOfOrderSequence (they were, when
    the connection's write buffer filled and woke senders out of order)."""

    async def main() -> None:
        topic = unique("pipeline")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 4)
            producer = client.producer()
            payload = b"x" * 1024
            futures = []
            for i in range(200_000):
                futures.append(producer.send(topic, payload))
                if i % 1000 == 999 and producer.pending > 50_000:
                    await producer.drain(25_000)
            await producer.flush()
            failures = [f.exception() for f in futures if f.exception() is not None]
            assert failures == [], f"{len(failures)} failed, first: {failures[0]!r}"
            description = await client.describe_topic(topic)
            assert sum(p.end_offset for p in description.partitions) == 200_000

    run(main())


def test_the_sync_client_produces_consumes_and_acks(broker: Broker) -> None:
    topic = unique("sync")
    client = dmq.SyncClient(broker.address, client_id="sync-test")
    try:
        client.create_topic(topic, 1)
        producer = client.producer()
        receipt = producer.produce(topic, b"blocking hello", key="k")
        assert receipt.offset == 0
        consumer = client.consumer(topic, "g")
        message = consumer.receive(10)
        assert message is not None and message.value == b"blocking hello"
        consumer.ack(message)
        consumer.close()
        group = client.describe_group(topic, "g")
        assert [p.ack_floor for p in group.partitions] == [1]
    finally:
        client.close()


def test_fetch_pulls_and_seek_replays(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("pull")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            producer = client.producer()
            for i in range(5):
                producer.send(topic, f"m{i}")
            await producer.flush()
            async with client.consumer(topic, "puller", credit=0) as consumer:
                got = await consumer.fetch(3, wait=5)
                assert [m.value for m in got] == [b"m0", b"m1", b"m2"]
                for message in got:
                    await message.ack()
                rest = await consumer.fetch(10, wait=5)
                assert [m.value for m in rest] == [b"m3", b"m4"]
                for message in rest:
                    await message.ack()
                assert await consumer.fetch(10, wait=0.2) == []
            # Seek back to offset 1: a dry run reports, then it replays.
            report = await client.seek(topic, "puller", Position.at_offset(1), dry_run=True)
            assert report.dry_run and [(p.partition, p.new_floor) for p in report.partitions] == [(0, 1)]
            await client.seek(topic, "puller", Position.at_offset(1), dry_run=False)
            async with client.consumer(topic, "puller", credit=0) as consumer:
                replayed = await consumer.fetch(10, wait=5)
                assert [m.value for m in replayed] == [b"m1", b"m2", b"m3", b"m4"]

    run(main())


def test_a_dropped_connection_loses_and_duplicates_nothing(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("reconnect")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 2)
            producer = client.producer(max_batch_messages=50)
            futures = []
            for i in range(5_000):
                futures.append(producer.send(topic, f"r{i}"))
                if i in (1_000, 2_500, 4_000):
                    client.drop_connection()
                    await asyncio.sleep(0)
            await producer.flush()
            failed = [f.exception() for f in futures if f.exception() is not None]
            # A batch retried after newer ones were stored is answered (the
            # broker remembers 32 per producer); one older than those would
            # be OutOfOrderSequence (stored or not); nothing else fails.
            assert all(isinstance(e, dmq.errors.OutOfOrderSequence) for e in failed), failed[:3]
            description = await client.describe_topic(topic)
            stored = sum(p.end_offset for p in description.partitions)
            assert stored == 5_000, f"{stored} stored for 5,000 sends"

    run(main())


def test_a_record_over_the_limit_is_refused_before_sending_and_the_largest_one_arrives(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("large")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 1)
            producer = client.producer()
            limit = client.max_record_bytes
            # A record's size counts its value plus 9 bytes of framing
            # (PROTOCOL.md section 8) when it has no key and no headers.
            with pytest.raises(dmq.errors.RecordTooLarge):
                producer.send(topic, b"x" * (limit - 8))
            receipt = await producer.send(topic, b"y" * (limit - 9))
            assert receipt.offset == 0
            async with client.consumer(topic, "g") as consumer:
                message = await consumer.receive(10)
                assert message is not None and len(message.value) == limit - 9
                await message.ack()

    run(main())


def test_broadcast_mode_gives_every_member_every_message(broker: Broker) -> None:
    async def main() -> None:
        topic = unique("broadcast")
        async with dmq.Client(broker.address) as client:
            await client.create_topic(topic, 2)
            one = await client.consumer(topic, "all", member="one", mode=dmq.DeliveryMode.BROADCAST).start()
            two = await client.consumer(topic, "all", member="two", mode=dmq.DeliveryMode.BROADCAST).start()
            producer = client.producer()
            for i in range(10):
                producer.send(topic, f"b{i}")
            await producer.flush()
            for member in (one, two):
                got = await drain(member, 10)
                assert sorted(m.value for m in got) == sorted(f"b{i}".encode() for i in range(10))
                await member.close()

    run(main())
