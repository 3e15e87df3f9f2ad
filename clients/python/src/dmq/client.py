"""The client: one connection to a broker, re-established with backoff.

Owns: :class:`Client` (address, client id and secret, timeouts, reconnect
backoff, keepalive), getting a live :class:`~dmq.connection.Connection`
(reconnecting when the last one was lost: the delay starts at
``reconnect_backoff_initial`` and doubles up to ``reconnect_backoff_max``;
refusals that cannot heal, such as AuthenticationFailed, are raised at
once), routing DELIVER pushes to the consumer that owns the subscription and
TXN_CHECK pushes to the check-back listeners of their producer group,
resuming transactional producers (TXN_INIT with their epoch) and
listeners (TXN_LISTEN) on a new connection before it serves any other
request, and the request/answer call that the admin calls, producer and
consumer use. Admin calls come from :class:`~dmq.admin.AdminCalls`.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .admin import AdminCalls
from .codec import DEFAULT_MAX_FRAME_BYTES, Body, Delivery, Opcode, TxnCheck, TxnInit, TxnListen
from .connection import Connection
from .errors import (
    BrokerError,
    ClientClosedError,
    ConnectionClosedError,
    DmqError,
    ProducerFenced,
    RequestTimeoutError,
    WrongNode,
)

if TYPE_CHECKING:
    from .consumer import Consumer
    from .producer import Producer
    from .transaction import Transaction, TransactionChecks


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _split_addresses(addresses: str) -> list[tuple[str, int]]:
    """``HOST:PORT``, or several separated by commas (a cluster's nodes)."""
    parts = [part.strip() for part in addresses.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"no broker address in {addresses!r}")
    return [_split_address(part) for part in parts]


class Client(AdminCalls):
    """A connection to one broker, shared by producers, consumers and the
    admin calls. Use ``async with Client(...) as client`` or
    :meth:`connect` / :meth:`close`.

    ``address`` may list several brokers separated by commas (a cluster's
    nodes, any of which takes every request): the client connects to the
    first that answers and, when its connection drops, tries that one
    again and then the next in turn."""

    def __init__(
        self,
        address: str = "127.0.0.1:7070",
        *,
        client_id: str = "dmq-python",
        secret: Union[bytes, str] = b"",
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        reconnect_backoff_initial: float = 0.05,
        reconnect_backoff_max: float = 5.0,
        keepalive: Optional[float] = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.addresses = _split_addresses(address)
        #: The index in ``addresses`` of the broker tried next.
        self._current = 0
        #: A node a broker sent this client to (WrongNode), tried once
        #: before ``addresses``.
        self._redirect: Optional[tuple[str, int]] = None
        self.client_id = client_id
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_backoff_initial = reconnect_backoff_initial
        self.reconnect_backoff_max = reconnect_backoff_max
        self.keepalive = keepalive
        self.max_frame_bytes = max_frame_bytes
        self._conn: Optional[Connection] = None
        self._connecting: Optional[asyncio.Task[Connection]] = None
        self._backoff = 0.0
        self._connected_at = 0.0
        self._closed = False
        #: Increases with every new connection; deliveries remember theirs.
        self.generation = 0
        self._subscriptions: dict[tuple[int, int], Callable[[Delivery], None]] = {}
        self._lost_listeners: list[Callable[[int], None]] = []
        # Pushes that arrive in the same read as their SUBSCRIBED, before
        # the consumer has registered (bounded by the subscription's credit).
        self._early: dict[tuple[int, int], list[Delivery]] = {}
        #: Transactional producer instances: (group, producer id) -> epoch.
        self._txn_producers: dict[tuple[str, str], int] = {}
        #: Check-back listeners by producer group; each check goes to the
        #: first, which then moves to the back (round robin).
        self._check_listeners: dict[str, list[TransactionChecks]] = {}
        #: Clients that producers opened to other nodes of this client's
        #: cluster (:mod:`dmq.routing`), closed with this one.
        self._links: set[Client] = set()

    @property
    def host(self) -> str:
        """The host of the broker connected to (or tried next)."""
        return self.addresses[self._current][0]

    @property
    def port(self) -> int:
        """The port of the broker connected to (or tried next)."""
        return self.addresses[self._current][1]

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        await self.close()

    async def connect(self) -> Client:
        """Connects now (the first request would otherwise)."""
        await self.connection()
        return self

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def max_record_bytes(self) -> int:
        """The largest record the broker accepts (HELLO_OK's limit − 1024)."""
        limit = self._conn.hello.max_frame_bytes if self._conn and self._conn.hello else DEFAULT_MAX_FRAME_BYTES
        return max(limit - 1024, 0)

    @property
    def node_id(self) -> Optional[int]:
        """The node id HELLO_OK named as ``broker_id`` if the broker
        connected to is a cluster node; None for a single broker (it says
        ``dmqd``) or while not connected."""
        hello = self._conn.hello if self._conn is not None and not self._conn.closed else None
        if hello is None or not (hello.broker_id.isascii() and hello.broker_id.isdigit()):
            return None
        return int(hello.broker_id)

    @property
    def frame_limit(self) -> int:
        """Largest frame the broker accepts from us (HELLO_OK)."""
        if self._conn and self._conn.hello:
            return self._conn.hello.max_frame_bytes
        return DEFAULT_MAX_FRAME_BYTES

    async def connection(self) -> Connection:
        """A live connection, reconnecting with backoff if needed; waits at
        most ``request_timeout`` for one."""
        if self._closed:
            raise ClientClosedError("client closed")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._reconnect())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), self.request_timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no connection to {self.host}:{self.port} within {self.request_timeout} s") from None

    def redirect(self, address: str) -> None:
        """Makes ``address`` (``host:port``) the broker the next connection
        goes to: a cluster node answered WrongNode with it. Empty: nothing
        (no node serves consumers yet)."""
        if not address:
            return
        target = _split_address(address)
        if target in self.addresses:
            self._current = self.addresses.index(target)
        else:
            self._redirect = target

    async def _open(self, host: str, port: int) -> Connection:
        return await Connection.open(
            host,
            port,
            client_id=self.client_id,
            secret=self.secret,
            connect_timeout=self.connect_timeout,
            max_frame_bytes=self.max_frame_bytes,
            keepalive=self.keepalive,
            on_push=self._on_push,
            on_lost=self._on_lost,
        )

    async def _open_and_resume(self, host: str, port: int) -> Connection:
        """Opens a connection and, before anyone else may use it, resumes
        every transactional producer instance (TXN_INIT with its epoch; a
        fenced one stays fenced, as on the broker) and check-back listener
        (TXN_LISTEN)."""
        conn = await self._open(host, port)
        try:
            for (group, producer_id), epoch in list(self._txn_producers.items()):
                try:
                    await conn.call(TxnInit(group, producer_id, epoch), self.request_timeout)
                except ProducerFenced:
                    pass  # this instance's transactions are refused, as they were
            for group in [g for g, listeners in self._check_listeners.items() if listeners]:
                await conn.call(TxnListen(group), self.request_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _reconnect(self) -> Connection:
        while True:
            if self._closed:
                raise ClientClosedError("client closed")
            if self._backoff:
                await asyncio.sleep(self._backoff)
            redirect, self._redirect = self._redirect, None
            if redirect is not None:
                try:
                    conn = await self._open_and_resume(*redirect)
                except DmqError:
                    pass  # back to the list
                else:
                    self.generation += 1
                    self._conn = conn
                    self._connected_at = time.monotonic()
                    return conn
            try:
                conn = await self._open_and_resume(self.host, self.port)
            except DmqError as error:
                if isinstance(error, BrokerError) and not error.transient:
                    raise  # AuthenticationFailed and friends do not heal
                # The next broker's turn.
                self._current = (self._current + 1) % len(self.addresses)
                self._backoff = min(max(self._backoff * 2, self.reconnect_backoff_initial), self.reconnect_backoff_max)
                continue
            self.generation += 1
            self._conn = conn
            self._connected_at = time.monotonic()
            return conn

    def _on_lost(self, conn: Connection, error: BaseException) -> None:
        if conn is not self._conn:
            return
        # A connection that lived long enough resets the backoff; one
        # sent to another node goes there at once.
        lived = time.monotonic() - self._connected_at
        if isinstance(error, WrongNode):
            self.redirect(error.address)
            self._backoff = 0.0
        elif lived >= self.reconnect_backoff_max:
            self._backoff = 0.0
        else:
            self._backoff = min(max(self._backoff * 2, self.reconnect_backoff_initial), self.reconnect_backoff_max)
        generation = self.generation
        for key in [k for k in self._subscriptions if k[0] == generation]:
            del self._subscriptions[key]
        self._early.clear()
        for listener in list(self._lost_listeners):
            listener(generation)

    def _on_push(self, push: Union[Delivery, TxnCheck]) -> None:
        if isinstance(push, TxnCheck):
            listeners = self._check_listeners.get(push.producer_group)
            if listeners:
                # Unanswered otherwise: the broker asks again later.
                listener = listeners.pop(0)
                listeners.append(listener)
                listener._push(push)
            return
        delivery = push
        key = (self.generation, delivery.subscription_id)
        handler = self._subscriptions.get(key)
        if handler is not None:
            handler(delivery)
        else:
            self._early.setdefault(key, []).append(delivery)

    def register_subscription(self, generation: int, subscription_id: int, handler: Callable[[Delivery], None]) -> None:
        self._subscriptions[(generation, subscription_id)] = handler
        for delivery in self._early.pop((generation, subscription_id), []):
            handler(delivery)

    def unregister_subscription(self, generation: int, subscription_id: int) -> None:
        self._subscriptions.pop((generation, subscription_id), None)

    def _add_check_listener(self, checks: TransactionChecks) -> None:
        self._check_listeners.setdefault(checks.producer_group, []).append(checks)

    def _remove_check_listener(self, checks: TransactionChecks) -> None:
        listeners = self._check_listeners.get(checks.producer_group, [])
        if checks in listeners:
            listeners.remove(checks)

    def add_lost_listener(self, listener: Callable[[int], None]) -> None:
        self._lost_listeners.append(listener)

    def remove_lost_listener(self, listener: Callable[[int], None]) -> None:
        if listener in self._lost_listeners:
            self._lost_listeners.remove(listener)

    async def request(self, body: Body, opcode: Optional[Opcode] = None, timeout: Optional[float] = None) -> Any:
        """Sends one request on a live connection and returns the answer's
        body; raises the broker's ERROR as a :class:`BrokerError`."""
        conn = await self.connection()
        return await conn.call(body, self.request_timeout if timeout is None else timeout, opcode)

    async def request_where_consumers_are_served(self, body: Body) -> Any:
        """:meth:`request` for a request the node serving consumers of
        cluster topics must take (SEEK): a node that does not serve them
        answers WrongNode with the one that does, and the connection moves
        there and sends it again, within ``request_timeout`` (no address,
        while no node serves, is asked again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        while True:
            conn = await self.connection()
            try:
                return await conn.call(body, self.request_timeout)
            except WrongNode as error:
                if loop.time() >= deadline:
                    raise
                if error.address:
                    conn.abort(error)  # the client reconnects where it says
                await asyncio.sleep(0.05)

    def producer(self, **options: Any) -> Producer:
        """A :class:`~dmq.producer.Producer` on this client."""
        from .producer import Producer

        return Producer(self, **options)

    def consumer(self, topic: str, group: str, **options: Any) -> Consumer:
        """A :class:`~dmq.consumer.Consumer`; ``await consumer.start()``
        (or ``async with``) subscribes."""
        from .consumer import Consumer

        return Consumer(self, topic, group, **options)

    def transaction(self, producer_group: str, transaction_id: str) -> Transaction:
        """A :class:`~dmq.transaction.Transaction` (nothing is sent until
        its first send or ack)."""
        from .transaction import Transaction

        return Transaction(self, producer_group, transaction_id)

    async def transaction_checks(self, producer_group: str) -> TransactionChecks:
        """Answers the check-backs of ``producer_group`` (TXN_LISTEN; sent
        again after a reconnect): a :class:`~dmq.transaction.TransactionChecks`
        to iterate. With several listeners of one group, each check goes to
        one of them."""
        from .transaction import listen

        return await listen(self, producer_group)

    async def init_transactions(self, producer_group: str, producer_id: str) -> int:
        """Registers this client as the current instance of the
        transactional producer ``producer_id`` of ``producer_group``
        (TXN_INIT) and returns its epoch: from now on an older instance's
        transactions of the group are refused (ProducerFenced), and so are
        this one's once a newer instance registers. The epoch is resumed
        after a reconnect."""
        from .transaction import init_transactions

        return await init_transactions(self, producer_group, producer_id)

    def drop_connection(self) -> None:
        """Closes the current connection (tests; the next call reconnects)."""
        if self._conn is not None:
            self._conn.abort(ConnectionClosedError("connection dropped by the client"))

    async def close(self) -> None:
        """Closes the connection, and the connections its producers opened
        to other nodes; pending requests fail."""
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.close()
        for listeners in list(self._check_listeners.values()):
            for checks in list(listeners):
                checks.close()
        links, self._links = self._links, set()
        for link in links:
            await link.close()
