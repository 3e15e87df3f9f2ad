"""Admin calls over the binary protocol: topics, groups, seek, deletion,
delayed-message cancellation, partition leaders, ping (PROTOCOL.md 6.3,
6.4, 6.11 to 6.15, 6.38).

Owns: :class:`AdminCalls`, a mixin of :class:`~dmq.client.Client`; each
call is one request and its answer, and raises the broker's ERROR as a
:class:`~dmq.errors.BrokerError` subclass (e.g. ``TopicExists``).
"""

from __future__ import annotations

from typing import Any, Optional

from .codec import (
    Body,
    CancelDelay,
    CancelDelayOk,
    CreateTopic,
    DeleteGroup,
    DeleteMessages,
    DeleteTopic,
    DescribeGroup,
    DescribeTopic,
    Empty,
    GroupDescription,
    Groups,
    GroupSummary,
    Leaders,
    ListGroups,
    Opcode,
    PartitionLeader,
    PartitionLeaders,
    Position,
    Seek,
    SeekReport,
    Tombstone,
    TopicDescription,
    Topics,
    TopicSummary,
)
from .errors import ProtocolError, TopicExists


def _expect(body: Any, kind: type) -> Any:
    if not isinstance(body, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(body).__name__}")
    return body


class AdminCalls:
    """Topics, groups, seek and deletion; mixed into the client."""

    async def request(self, body: Body, opcode: Optional[Opcode] = None, timeout: Optional[float] = None) -> Any:
        raise NotImplementedError

    async def request_where_consumers_are_served(self, body: Body) -> Any:
        raise NotImplementedError

    async def ping(self) -> None:
        """PING → PONG."""
        await self.request(Empty(), Opcode.PING)

    async def create_topic(self, name: str, partitions: int = 1, *, ordered: bool = False, exist_ok: bool = False) -> None:
        """CREATE_TOPIC; ``exist_ok`` treats TopicExists as success."""
        try:
            await self.request(CreateTopic(name, partitions, ordered))
        except TopicExists:
            if not exist_ok:
                raise

    async def delete_topic(self, name: str) -> None:
        await self.request(DeleteTopic(name))

    async def list_topics(self) -> list[TopicSummary]:
        return list(_expect(await self.request(Empty(), Opcode.LIST_TOPICS), Topics).topics)

    async def describe_topic(self, name: str) -> TopicDescription:
        result: TopicDescription = _expect(await self.request(DescribeTopic(name)), TopicDescription)
        return result

    async def partition_leaders(self, topic: str) -> list[PartitionLeader]:
        """PARTITION_LEADERS → LEADERS: which node leads each partition of
        ``topic``, partition 0 first. A hint (it goes stale when leadership
        moves); ``node_id`` 0 / an empty ``address`` means "send to the node
        asked". The producer routes its batches by it (:mod:`dmq.routing`)."""
        return list(_expect(await self.request(PartitionLeaders(topic)), Leaders).partitions)

    async def list_groups(self, topic: str) -> list[GroupSummary]:
        return list(_expect(await self.request(ListGroups(topic)), Groups).groups)

    async def describe_group(self, topic: str, group: str) -> GroupDescription:
        result: GroupDescription = _expect(await self.request(DescribeGroup(topic, group)), GroupDescription)
        return result

    async def delete_group(self, topic: str, group: str) -> None:
        await self.request(DeleteGroup(topic, group))

    async def seek(self, topic: str, group: str, target: Position, *, partition: Optional[int] = None, dry_run: bool = True) -> SeekReport:
        """SEEK; a dry run by default (only reports), like ``dmq group seek``."""
        # Applied where the group is served: on a cluster, at the node
        # serving consumers (another node answers WrongNode with it).
        result: SeekReport = _expect(
            await self.request_where_consumers_are_served(Seek(topic, group, partition, target, dry_run)), SeekReport
        )
        return result

    async def cancel_delay(self, message_id: bytes) -> bool:
        """CANCEL_DELAY of a delayed message; False if unknown or already delivered."""
        return bool(_expect(await self.request(CancelDelay(message_id)), CancelDelayOk).cancelled)

    async def delete_messages(self, topic: str, tombstone: Tombstone) -> None:
        await self.request(DeleteMessages(topic, tombstone))
