"""Transactions against a real dmqd: half messages delivered only after
the commit, never after a rollback, and atomic consume-and-produce with
transactional acks (PROTOCOL.md 6.27 to 6.36)."""

from __future__ import annotations

import pytest
from conftest import Broker, run, unique

import dmq
from dmq import GroupSettings
from dmq.errors import TransactionConflict


async def values(consumer: dmq.Consumer, wait: float = 1.0) -> list[bytes]:
    """Every message within ``wait`` seconds of the last, acked, sorted."""
    got: list[bytes] = []
    while True:
        message = await consumer.receive(wait)
        if message is None:
            return sorted(got)
        await message.ack()
        got.append(message.value)


def test_a_commit_delivers_everything_and_a_rollback_nothing(broker: Broker) -> None:
    async def main() -> None:
        orders, audit = unique("orders"), unique("audit")
        async with dmq.Client(broker.address, client_id="py-txn") as client:
            await client.create_topic(orders, 2)
            await client.create_topic(audit, 1)
            async with client.consumer(orders, "billing") as billing, client.consumer(audit, "log") as log:
                txn = client.transaction("order-service", unique("o"))
                receipt = await txn.send(orders, "created", key="17")
                assert receipt.offset is None and txn.handle > 0
                await txn.send(audit, "order 17")
                rolled_back = client.transaction("order-service", unique("o"))
                await rolled_back.send(orders, "never")
                assert await values(billing, 0.5) == []
                await txn.commit()
                await rolled_back.rollback()
                await txn.commit()  # a retried commit gets the same answer
                assert await values(billing) == [b"created"]
                assert await values(log) == [b"order 17"]
                with pytest.raises(TransactionConflict):
                    await txn.rollback()

    run(main())


def test_consume_and_produce_in_one_transaction(broker: Broker) -> None:
    async def main() -> None:
        payments, shipments = unique("payments"), unique("shipments")
        async with dmq.Client(broker.address, client_id="py-txn") as client:
            await client.create_topic(payments, 1)
            await client.create_topic(shipments, 1)
            producer = client.producer()
            for n in range(5):
                await producer.send(payments, f"paid {n}")
            settings = GroupSettings(ack_timeout_ms=500, backoff=dmq.Backoff.fixed([10]))
            shipped = 0
            rolled_back = False
            async with client.consumer(payments, "shipper", settings=settings) as consumer:
                while shipped < 5:
                    paid = await consumer.receive(10)
                    assert paid is not None
                    txn = client.transaction("shipper", unique("ship"))
                    await txn.send(shipments, paid.value.replace(b"paid", b"ship"))
                    await txn.ack(paid)
                    with pytest.raises(dmq.DmqError):
                        await paid.ack()  # settled by the transaction
                    if paid.value == b"paid 2" and not rolled_back:
                        # A second transaction cannot ack it meanwhile.
                        rival = client.transaction("shipper", unique("rival"))
                        paid._settled = False
                        with pytest.raises(TransactionConflict):
                            await rival.ack(paid)
                        paid._settled = True
                        await txn.rollback()  # the payment comes again
                        rolled_back = True
                        continue
                    await txn.commit()
                    shipped += 1
                # Every payment was acked by its commit: nothing comes again.
                assert await consumer.receive(1.0) is None
            async with client.consumer(shipments, "audit") as audit:
                assert await values(audit) == sorted(f"ship {n}".encode() for n in range(5))

    run(main())
