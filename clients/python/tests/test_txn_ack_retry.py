"""A transactional ack whose answer is lost is sent again (PROTOCOL.md
6.35), against a fake broker on 127.0.0.1: the first TXN_ACK (a begin)
arrives and the connection drops without an answer; the client
subscribes again and sends the same ack under the new subscription id,
then commits with the handle it was answered."""

from __future__ import annotations

import asyncio

from conftest import read_request, run, start_fake

import dmq
from dmq.codec import (
    TXN_COMMIT,
    Delivery,
    Empty,
    Frame,
    HelloOk,
    Opcode,
    Subscribed,
    TxnAck,
    TxnAcked,
    TxnEnd,
    TxnEnded,
    encode_frame,
)


class FakeBroker:
    """Subscription ids 1, 2, … per SUBSCRIBE; one message (partition 0,
    offset 7) pushed on the first; the first TXN_ACK dropped with its
    connection, later ones answered with handle 42; TXN_END answered."""

    def __init__(self) -> None:
        self.subscriptions = 0
        self.acks: list[TxnAck] = []
        self.ends: list[TxnEnd] = []
        self.connections = 0
        self.address = ""

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
                    writer.write(encode_frame(Frame(Opcode.HELLO_OK, cid, HelloOk(1, 1 << 24, "dmqd"))))
                elif frame.opcode == Opcode.SUBSCRIBE:
                    self.subscriptions += 1
                    subscription_id = self.subscriptions
                    writer.write(encode_frame(Frame(Opcode.SUBSCRIBED, cid, Subscribed(subscription_id, [0]))))
                    if subscription_id == 1:
                        delivery = Delivery(subscription_id, "payments", 0, 7, 1, bytes(16), 0, None, [], b"paid", None, None)
                        writer.write(encode_frame(Frame(Opcode.DELIVER, 0, delivery)))
                elif frame.opcode == Opcode.TXN_ACK:
                    assert isinstance(frame.body, TxnAck)
                    self.acks.append(frame.body)
                    if len(self.acks) == 1:
                        return  # the answer is lost with the connection
                    writer.write(encode_frame(Frame(Opcode.TXN_ACKED, cid, TxnAcked(42))))
                elif frame.opcode == Opcode.TXN_END:
                    assert isinstance(frame.body, TxnEnd)
                    self.ends.append(frame.body)
                    writer.write(encode_frame(Frame(Opcode.TXN_ENDED, cid, TxnEnded(frame.body.outcome))))
                else:  # CREDIT, PING, ...
                    writer.write(encode_frame(Frame(Opcode.OK, cid, Empty())))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_transactional_ack_whose_answer_is_lost_is_sent_again_under_the_new_subscription() -> None:
    async def main() -> None:
        broker = FakeBroker()
        server = await broker.start()
        async with dmq.Client(broker.address, request_timeout=5, reconnect_backoff_initial=0.01) as client:
            async with client.consumer("payments", "shipping") as consumer:
                message = await consumer.receive(5)
                assert message is not None and message.offset == 7
                txn = client.transaction("shipping", "ship-7")
                await txn.ack(message)
                await txn.commit()
                assert txn.handle == 42
        first, again = broker.acks
        assert (first.handle, first.subscription_id) == (0, 1)
        assert (again.handle, again.subscription_id) == (0, 2), "the same begin, under the new subscription"
        assert [(p.partition, p.offset) for p in again.messages] == [(0, 7)]
        assert broker.subscriptions == 2 and broker.connections == 2
        assert [(end.handle, end.outcome) for end in broker.ends] == [(42, TXN_COMMIT)]
        server.close()

    run(main(), timeout=30)
