"""The client against three real ``dmqd`` nodes of one cluster on
127.0.0.1, with dmqd's default ``consumer_lease = true``: one node (the
metadata leader) serves every consumer of the cluster's topics, and a
consumer whose client connected to another node is sent there
(WrongNode) and follows by itself."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import dmqd_path, free_port, run

import dmq
from dmq import BrokerError


class Cluster:
    """Three dmqd processes, each with a ``[cluster]`` section naming all three."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dmq-py-cluster-"))
        self.nodes = [
            {"id": i, "client": free_port(), "raft": free_port(), "admin": free_port()} for i in (1, 2, 3)
        ]
        self.processes: list[subprocess.Popen[bytes]] = []

    def address(self, index: int) -> str:
        return f"127.0.0.1:{self.nodes[index]['client']}"

    def config(self, node: dict[str, int]) -> str:
        data_dir = self.root / f"node{node['id']}"
        text = (
            f"data_dir = \"{data_dir}\"\n"
            f"listen = \"127.0.0.1:{node['client']}\"\n"
            f"admin_listen = \"127.0.0.1:{node['admin']}\"\n\n"
            f"[cluster]\nnode_id = {node['id']}\nraft_listen = \"127.0.0.1:{node['raft']}\"\n"
        )
        for peer in self.nodes:
            text += (
                f"\n[[cluster.peers]]\nid = {peer['id']}\n"
                f"raft = \"127.0.0.1:{peer['raft']}\"\nclient = \"127.0.0.1:{peer['client']}\"\n"
            )
        return text

    def start(self) -> Cluster:
        for node in self.nodes:
            path = self.root / f"node{node['id']}.toml"
            path.write_text(self.config(node))
            log = open(self.root / f"node{node['id']}.log", "ab")
            self.processes.append(
                subprocess.Popen([str(dmqd_path()), "--config", str(path)], stdout=log, stderr=log)
            )
            log.close()
        for index in range(3):
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.nodes[index]["client"]), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"node {index + 1} did not start"
                    time.sleep(0.05)
        return self

    def cleanup(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


async def ack_each(consumer: dmq.Consumer, count: int, what: str) -> list[bytes]:
    """Receives and acks ``count`` messages within 30 s, then checks that
    nothing more comes for half a second; their sorted ids."""
    got: list[dmq.Message] = []
    deadline = time.monotonic() + 30
    while len(got) < count:
        message = await consumer.receive(max(0.0, deadline - time.monotonic()))
        assert message is not None, f"{what}: only {len(got)} of {count} arrived"
        await message.ack()
        got.append(message)
    assert await consumer.receive(0.5) is None, f"{what}: more than {count}"
    return sorted(m.message_id for m in got)


def test_consumers_at_every_node_of_a_cluster_are_served_by_the_one_that_serves() -> None:
    """A topic created through node 1, 30 messages produced through node 2;
    a group consumed through each of the three nodes gets all 30 once,
    whichever node serves consumers: at two of them the client is sent
    there and follows."""
    cluster = Cluster().start()
    try:

        async def main() -> None:
            async with dmq.Client(cluster.address(0), client_id="py-test") as setup:
                # The cluster forms (elections) within moments of the start.
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await setup.create_topic("orders", 2)
                        break
                    except BrokerError:
                        assert time.monotonic() < deadline, "no topic within 30 s"
                        await asyncio.sleep(0.2)
            # Every node learns the topic from the metadata group.
            for index in range(3):
                async with dmq.Client(cluster.address(index), client_id="py-test") as client:
                    deadline = time.monotonic() + 30
                    while "orders" not in [t.name for t in await client.list_topics()]:
                        assert time.monotonic() < deadline, f"node {index + 1} never knew the topic"
                        await asyncio.sleep(0.1)
            async with dmq.Client(cluster.address(1), client_id="py-test") as client:
                producer = client.producer()
                sent = [await producer.send("orders", f"order {i}") for i in range(30)]
            expected = sorted(r.message_id for r in sent)
            served_by: set[str] = set()
            for index in range(3):
                async with dmq.Client(cluster.address(index), client_id="py-test") as client:
                    async with client.consumer("orders", f"through-{index + 1}") as consumer:
                        # Each once: nothing more comes.
                        assert await ack_each(consumer, 30, f"node {index + 1}") == expected
                        # The node the consumer ended up on names itself
                        # in HELLO_OK (a cluster node: its node id).
                        hello = (await client.connection()).hello
                        assert hello is not None
                        served_by.add(hello.broker_id)
            # One node served all three, whichever each client was given
            # (each node would serve its own with the lease off).
            assert len(served_by) == 1 and served_by <= {"1", "2", "3"}, served_by
            # A seek goes where the group is served, through whichever
            # node: group through-1 goes back to the start through each
            # node in turn and gets all 30 again each time (a node that
            # does not serve consumers answers WrongNode; the client
            # follows).
            for index in range(3):
                async with dmq.Client(cluster.address(index), client_id="py-test") as client:
                    report = await client.seek("orders", "through-1", dmq.Position.earliest(), dry_run=False)
                    assert sum(p.redelivered for p in report.partitions) == 30, (index, report)
                    async with client.consumer("orders", "through-1") as consumer:
                        again = await ack_each(consumer, 30, f"seek through node {index + 1}")
                        assert again == expected

        run(main(), timeout=120)
    finally:
        cluster.cleanup()
