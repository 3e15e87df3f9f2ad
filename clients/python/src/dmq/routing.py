"""Routing a producer's batches to their partitions' leaders on a cluster.

Any node of a cluster takes every produce and forwards a partition's
records to that partition's leader (docs/replication.md): correct, but one
hop more for every batch whose leader is another node. A producer whose
broker is a cluster node (HELLO_OK's ``broker_id`` is a node id, see
:attr:`~dmq.client.Client.node_id`) asks PARTITION_LEADERS (PROTOCOL.md
6.38) per topic and sends each batch of one partition over a connection of
its own to that partition's leader. The same rules as the Rust client's
``client/src/routing.rs``. Owns:

- **Leaders per topic**, asked through the producer's own client, again
  after :data:`ROUTES_MAX_AGE` seconds or after a batch failed. The answer
  is a hint: a batch sent to a node that no longer leads is forwarded by
  that node, so a stale route costs a hop, never a message. An entry with
  an empty address (no leader known, a topic kept on one node) sends
  through the producer's own node.
- **A partition for each batch**: a batch of unkeyed records takes the
  next partition round robin (as the broker would, per batch); keyed
  records were put into their partition's batch by the producer
  (:func:`~dmq.codec.key_partition`, the broker's rule) once the topic's
  partition count was known. A batch holding keys the producer could not
  place yet goes to the producer's own node, which routes it.
- **Links**: one :class:`~dmq.client.Client` per other node (keyed by its
  address), opened on first use and closed with the producer (or with the
  producer's client); a partition the producer's own node leads goes on
  its own connection. A link found disconnected is closed and passed over
  (the batch goes through the producer's own node) and the routes are
  asked again; a link that is lost or could not be opened is not tried
  again for :data:`LINK_RETRY_AFTER` seconds.
- **Order across a change of route.** Batches of one partition on one
  connection are stored in the order sent (the broker queues a
  connection's batches in request order). When a partition's route moves
  to another connection, its next batch waits until the batches in flight
  on the old one are answered (retries included), so it cannot overtake
  them. Batches the producer's own node routes (unplaced keys) and routed
  ones on other connections wait for each other the same way. The
  producer routes its batches one at a time, in the order they were
  closed, so a batch that waits holds the ones behind it.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple, Optional, Union

from .client import Client
from .codec import PartitionLeader
from .connection import Connection
from .errors import DmqError

#: Leaders are asked again this many seconds after the last answer.
ROUTES_MAX_AGE = 3.0
#: How long asking for leaders, or opening a link, may hold the batches.
ASK_TIMEOUT = 1.0
#: A node whose link was lost or could not be opened is not tried again before this.
LINK_RETRY_AFTER = 5.0


class InFlight:
    """Batches in flight on one route; a waiter can wait until there are none."""

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> InFlight:
        self.count += 1
        self._idle.clear()
        return self

    def done(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class Route(NamedTuple):
    """Where one batch's first try goes, chosen by :meth:`Routing.route`."""

    #: The leader's link; None: the producer's own client.
    conn: Optional[Connection]
    #: The batch's partition, if the producer placed it.
    partition: Optional[int]
    #: Counts the batch in flight on its route: call ``done()`` once it is
    #: answered (or failed for good).
    order: InFlight


class _PartitionRoute:
    """Where a partition's batches last went ("" for the producer's own
    client) and how many are in flight there."""

    __slots__ = ("via", "in_flight")

    def __init__(self, via: str) -> None:
        self.via = via
        self.in_flight = InFlight()


class _TopicRoutes:
    """The leaders of one topic, as last answered."""

    __slots__ = ("asked", "leaders", "next_unkeyed", "unrouted", "partitions")

    def __init__(self) -> None:
        #: When the leaders were last asked (time.monotonic()); None: ask
        #: before the next batch.
        self.asked: Optional[float] = None
        #: One per partition; empty: the broker gave none (the ask failed):
        #: every batch through the producer's own node.
        self.leaders: list[PartitionLeader] = []
        self.next_unkeyed = 0
        #: Batches in flight that the producer's own node routes.
        self.unrouted = InFlight()
        self.partitions: dict[int, _PartitionRoute] = {}


class Routing:
    """A producer's routes and links (see the module docstring). Its
    :meth:`route` calls must not overlap: the producer makes them one at a
    time, in the order its batches were closed."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._topics: dict[str, _TopicRoutes] = {}
        #: Per address: the open link, or the time.monotonic() before which
        #: it is not tried again.
        self._links: dict[str, Union[Client, float]] = {}
        #: Set by a batch that failed: ask every topic's leaders again.
        self.stale = False

    def partitions(self, topic: str) -> Optional[int]:
        """The partition count of ``topic`` if known (for placing keyed
        records into per-partition batches)."""
        routes = self._topics.get(topic)
        if routes is None or not routes.leaders:
            return None
        return len(routes.leaders)

    async def route(self, topic: str, partition: Optional[int], keyed: bool) -> Route:
        """The route of one batch of ``topic`` whose partition is
        ``partition`` (explicit, or placed by its keys; ``keyed``: it holds
        keyed records), after waiting as the order rule says."""
        if self.stale:
            self.stale = False
            for stale in self._topics.values():
                stale.asked = None
        routes = self._topics.get(topic)
        if routes is None:
            routes = self._topics[topic] = _TopicRoutes()
        if routes.asked is None or time.monotonic() - routes.asked >= ROUTES_MAX_AGE:
            routes.leaders = await self._ask(topic)
            routes.asked = time.monotonic()
        count = len(routes.leaders)
        if partition is None and count and not keyed:
            partition = routes.next_unkeyed % count
            routes.next_unkeyed += 1
        # The producer's own node, if it leads, needs no link.
        own = self._client.node_id
        address = ""
        if partition is not None and partition < count:
            leader = routes.leaders[partition]
            if leader.node_id != own:
                address = leader.address
        conn = await self._link(address) if address else None
        via = address if conn is not None else ""
        if partition is None:
            # Through the producer's own node: after every batch in flight
            # on another connection.
            for other in list(routes.partitions.values()):
                if other.via:
                    await other.in_flight.idle()
            return Route(None, None, routes.unrouted.start())
        if via:
            await routes.unrouted.idle()
        last = routes.partitions.get(partition)
        if last is None:
            last = routes.partitions[partition] = _PartitionRoute(via)
        elif last.via != via:
            await last.in_flight.idle()
            last.via = via
        return Route(conn, partition, last.in_flight.start())

    async def _ask(self, topic: str) -> list[PartitionLeader]:
        try:
            return await asyncio.wait_for(self._client.partition_leaders(topic), ASK_TIMEOUT)
        except (DmqError, asyncio.TimeoutError):
            return []

    async def _link(self, address: str) -> Optional[Connection]:
        """The live connection of the link to ``address``, if one is or can
        be opened now."""
        link = self._links.get(address)
        if isinstance(link, Client):
            if link.connected:
                return await link.connection()
            # Lost (the node may be down): through our own node meanwhile,
            # and ask who leads now.
            self.stale = True
            await self._forget(address, link)
            return None
        if link is not None and time.monotonic() < link:
            return None
        own = self._client
        try:
            link = Client(
                address,
                client_id=own.client_id,
                secret=own.secret,
                request_timeout=own.request_timeout,
                connect_timeout=min(own.connect_timeout, ASK_TIMEOUT),
                reconnect_backoff_initial=own.reconnect_backoff_initial,
                reconnect_backoff_max=own.reconnect_backoff_max,
                keepalive=own.keepalive,
                max_frame_bytes=own.max_frame_bytes,
            )
        except ValueError:
            self._links[address] = time.monotonic() + LINK_RETRY_AFTER
            return None
        try:
            conn = await asyncio.wait_for(link.connection(), ASK_TIMEOUT)
        except (DmqError, asyncio.TimeoutError):
            await self._forget(address, link)
            return None
        self._links[address] = link
        own._links.add(link)
        return conn

    async def _forget(self, address: str, link: Client) -> None:
        self._links[address] = time.monotonic() + LINK_RETRY_AFTER
        self._client._links.discard(link)
        await link.close()

    async def close(self) -> None:
        """Closes every link."""
        links = [link for link in self._links.values() if isinstance(link, Client)]
        self._links.clear()
        for link in links:
            self._client._links.discard(link)
            await link.close()


__all__ = ["ASK_TIMEOUT", "LINK_RETRY_AFTER", "ROUTES_MAX_AGE", "InFlight", "Route", "Routing"]
