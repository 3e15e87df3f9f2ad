"""dmq: a Python client for the DMQ broker (PROTOCOL.md, protocol version 1).

Standard library only. Modules, each owning one job:

- :mod:`dmq.codec`: frames and bodies, encoder and strict decoder (sans-IO).
- :mod:`dmq.errors`: error codes and exceptions (``BrokerError.code``).
- :mod:`dmq.connection`: one TCP connection: HELLO, correlation ids,
  frame limits, pushes, keepalive.
- :mod:`dmq.client`: :class:`Client`, reconnect with backoff.
- :mod:`dmq.admin`: topics, groups, seek, deletion.
- :mod:`dmq.producer`: :class:`Producer`, batching, pipelining, idempotence.
- :mod:`dmq.routing`: a producer's batches to their partitions' leaders
  on a cluster (PARTITION_LEADERS), one connection per other node.
- :mod:`dmq.consumer`: :class:`Consumer`, credit, FETCH, batched acks.
- :mod:`dmq.transaction`: :class:`Transaction`, check-backs, fencing.
- :mod:`dmq.sync`: :class:`SyncClient`, a blocking wrapper.

Example::

    import asyncio, dmq

    async def main() -> None:
        async with dmq.Client("127.0.0.1:7070", client_id="billing") as client:
            await client.create_topic("orders", 2, exist_ok=True)
            receipt = await client.producer().send("orders", b"order 1 created", key="order-1")
            async with client.consumer("orders", "billing") as consumer:
                async for message in consumer:
                    print(message.value, message.attempt)
                    await message.ack()
                    break

    asyncio.run(main())
"""

from .client import Client
from .codec import Backoff, DeliveryMode, GroupSettings, Header, Position, Tombstone
from .consumer import Consumer, Message
from .errors import (
    BrokerError,
    ClientClosedError,
    ConnectionClosedError,
    DmqError,
    ErrorCode,
    ProtocolError,
    RequestTimeoutError,
    StaleDeliveryError,
)
from .producer import Producer, Receipt, SendFuture
from .sync import SyncClient
from .transaction import Transaction, TransactionCheck, TransactionChecks

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BrokerError",
    "Client",
    "ClientClosedError",
    "ConnectionClosedError",
    "Consumer",
    "DeliveryMode",
    "DmqError",
    "ErrorCode",
    "GroupSettings",
    "Header",
    "Message",
    "Position",
    "Producer",
    "ProtocolError",
    "Receipt",
    "RequestTimeoutError",
    "SendFuture",
    "StaleDeliveryError",
    "SyncClient",
    "Tombstone",
    "Transaction",
    "TransactionCheck",
    "TransactionChecks",
]
