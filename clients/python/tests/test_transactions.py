"""Transactions against a real dmqd: half messages delivered only after
the commit, never after a rollback, numbered sends stored once when
retried, and atomic consume-and-produce with transactional acks,
check-back listeners and fencing (PROTOCOL.md 6.27 to 6.37)."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest
from conftest import Broker, run, unique

import dmq
from dmq import GroupSettings
from dmq.codec import Body, Opcode, Record, TxnProduce, TxnProduceOk, TxnProduceSeq
from dmq.errors import ConnectionClosedError, OutOfOrderSequence, ProducerFenced, TransactionConflict


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


def test_a_send_whose_answer_was_lost_is_sent_again_and_stored_once(broker: Broker) -> None:
    """Each send is a TXN_PRODUCE_SEQ. The answers of the first two (the
    begin, then one more) are lost after the broker stored them: the client
    sends each again with its number and gets the first answer (the same
    handle and message id). A number used for other records is
    TransactionConflict, one past the next OutOfOrderSequence; the commit
    delivers each message once."""

    async def main() -> None:
        orders, group, txn_id = unique("orders"), unique("shop"), unique("o")
        async with dmq.Client(broker.address, client_id="py-txn", reconnect_backoff_initial=0.01) as client:
            await client.create_topic(orders, 1)
            real = client.request
            # The first answer to each number, lost.
            answered: dict[int, TxnProduceOk] = {}

            async def losing(body: Body, opcode: Optional[Opcode] = None, timeout: Optional[float] = None) -> Any:
                answer = await real(body, opcode, timeout)
                if isinstance(body, TxnProduceSeq) and body.sequence not in answered:
                    answered[body.sequence] = answer
                    client.drop_connection()
                    raise ConnectionClosedError("the answer was lost (test)")
                return answer

            client.request = losing  # type: ignore[method-assign]
            txn = client.transaction(group, txn_id)
            created = await txn.send(orders, "created")
            paid = await txn.send(orders, "paid")
            client.request = real  # type: ignore[method-assign]
            assert sorted(answered) == [0, 1] and txn.sequence == 2
            assert [a.handle for a in answered.values()] == [txn.handle, txn.handle]
            assert [created.message_id, paid.message_id] == [answered[n].records[0].message_id for n in (0, 1)]

            def numbered(sequence: int, value: bytes, handle: Optional[int] = None) -> TxnProduceSeq:
                handle = txn.handle if handle is None else handle
                return TxnProduceSeq(TxnProduce(group, txn_id, handle, orders, None, [Record(value)]), sequence)

            again = await client.request(numbered(0, b"created", handle=0))  # a retried begin
            assert isinstance(again, TxnProduceOk) and again.handle == txn.handle
            assert again.records[0].message_id == created.message_id
            with pytest.raises(TransactionConflict):
                await client.request(numbered(1, b"other"))
            with pytest.raises(OutOfOrderSequence):
                await client.request(numbered(3, b"later"))
            with pytest.raises(OutOfOrderSequence):
                await client.request(numbered(1, b"begin", handle=0))
            async with client.consumer(orders, "billing") as billing:
                await txn.commit()
                assert await values(billing) == [b"created", b"paid"]

    run(main())


@pytest.fixture(scope="module")
def checking_broker() -> Iterator[Broker]:
    """A broker that checks a transaction back 300 ms after it began, at
    most twice."""
    config = "transaction_timeout_ms = 300\ntransaction_max_checks = 2\ntransaction_check_backoff_max_ms = 300\n"
    b = Broker(config=config).start()
    yield b
    b.cleanup()


def test_a_listener_answers_check_backs_also_after_a_reconnect(checking_broker: Broker) -> None:
    """A producer began two transactions and went away. A member of its
    producer group is asked how each ended: the first check is answered
    commit (delivered); the connection then drops, the listener is resumed
    on the new one, and the second transaction's check is answered
    rollback (never delivered). A third transaction of another group
    nobody listens for is never handed to this listener."""

    async def main() -> None:
        orders = unique("orders")
        group = unique("shop")
        async with dmq.Client(checking_broker.address, client_id="py-producer") as producer:
            await producer.create_topic(orders, 1)
            first = producer.transaction(group, "order-42")
            await first.send(orders, "order 42 created")
            other = producer.transaction(unique("other-shop"), "order-44")
            await other.send(orders, "order 44 created")
        async with dmq.Client(checking_broker.address, client_id="py-member") as member:
            async with member.consumer(orders, "billing") as billing:
                checks = await member.transaction_checks(group)
                check = await checks.receive(10)
                assert check is not None
                assert (check.producer_group, check.transaction_id) == (group, "order-42")
                assert check.handle == first.handle and check.checks == 1
                await check.commit()
                assert await values(billing) == [b"order 42 created"]

                async with dmq.Client(checking_broker.address, client_id="py-producer") as producer:
                    second = producer.transaction(group, "order-43")
                    await second.send(orders, "order 43 created")
                member.drop_connection()
                await member.ping()  # reconnects, and listens again first
                check = await checks.receive(10)
                assert check is not None
                assert check.transaction_id == "order-43" and check.handle == second.handle
                await check.rollback()
                assert await values(billing, 1.5) == []
                # Only this group's checks came here.
                checks.close()
                assert await checks.receive(0.1) is None

    run(main())


def test_a_newer_instance_fences_a_zombie_also_after_reconnects(broker: Broker) -> None:
    """init_transactions: the second instance of producer p1 fences the
    first, whose commit and new transactions get ProducerFenced; the zombie
    stays fenced after a reconnect, and the current instance resumes its
    epoch after one and ends the zombie's transaction."""

    async def main() -> None:
        payments, group = unique("payments"), unique("pay")
        async with dmq.Client(broker.address, client_id="py-zombie") as zombie, dmq.Client(
            broker.address, client_id="py-current"
        ) as current:
            await zombie.create_topic(payments, 1)
            assert await zombie.init_transactions(group, "p1") == 1
            txn = zombie.transaction(group, "pay-7")
            await txn.send(payments, "paid 7")
            assert await current.init_transactions(group, "p1") == 2
            with pytest.raises(ProducerFenced):
                await txn.commit()
            zombie.drop_connection()
            late = zombie.transaction(group, "pay-8")
            with pytest.raises(ProducerFenced):
                await late.send(payments, "never")
            current.drop_connection()
            await current.ping()
            async with current.consumer(payments, "billing") as billing:
                # The current instance, on its new connection, decides.
                resumed = current.transaction(group, "pay-7")
                resumed.handle = txn.handle
                await resumed.commit()
                assert await values(billing) == [b"paid 7"]
            assert await current.init_transactions(group, "p2") == 1

    run(main())
