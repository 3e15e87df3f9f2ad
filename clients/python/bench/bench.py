"""Produce and end-to-end throughput of the Python client with 1 KiB
messages against a running dmqd (see BENCHMARKS.md, "Python client").

    PYTHONPATH=src python3 bench/bench.py --addr 127.0.0.1:7070 --count 200000 --size 1024

produce: one Producer sends ``count`` messages (batching, pipelining,
idempotence on) and waits for every durable ack; msgs/s = count / time
from the first send to the last ack (any failed send fails the run). end-to-end: a consumer (credit 1000,
acks batched) on a fresh group and topic receives and acks while the
producer sends; msgs/s = count / time until the last message is received
and every ack answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import dmq


async def produce(client: dmq.Client, topic: str, count: int, payload: bytes, window: int, route: bool = True) -> float:
    producer = client.producer(route_to_leaders=route)
    futures = []
    start = time.perf_counter()
    send = producer.send
    for i in range(count):
        futures.append(send(topic, payload))
        if i % 1000 == 999 and producer.pending > window:
            await producer.drain(window // 2)
    await producer.flush()
    elapsed = time.perf_counter() - start
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise SystemExit(f"{len(failed)} of {count} sends failed, first: {failed[0]!r}")
    return elapsed


async def end_to_end(
    client: dmq.Client, consumer_client: dmq.Client, topic: str, count: int, payload: bytes, window: int, route: bool = True
) -> float:
    consumer = await consumer_client.consumer(topic, "bench", start=dmq.Position.earliest(), credit=2000).start()
    received = 0
    done = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        nonlocal received
        async for message in consumer:
            message.ack()
            received += 1
            if received == count:
                await consumer.flush()
                done.set_result(None)
                return

    start = time.perf_counter()
    task = asyncio.ensure_future(consume())
    await produce(client, topic, count, payload, window, route)
    await done
    elapsed = time.perf_counter() - start
    await task
    await consumer.close()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", default="127.0.0.1:7070")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--window", type=int, default=50_000, help="unacked messages at most")
    parser.add_argument("--mode", choices=["produce", "e2e", "both"], default="both")
    parser.add_argument(
        "--no-route",
        action="store_true",
        help="on a cluster, send every batch through the client's node (it forwards) instead of to each partition's leader",
    )
    args = parser.parse_args()
    payload = b"x" * args.size
    stamp = int(time.time())
    result: dict[str, float] = {}
    async with dmq.Client(args.addr, client_id="bench-producer") as client:
        if args.mode in ("produce", "both"):
            topic = f"bench-py-produce-{stamp}"
            await client.create_topic(topic, args.partitions)
            elapsed = await produce(client, topic, args.count, payload, args.window, not args.no_route)
            result["produce_msgs_per_s"] = round(args.count / elapsed)
            result["produce_mib_per_s"] = round(args.count * args.size / elapsed / 2**20, 1)
        if args.mode in ("e2e", "both"):
            topic = f"bench-py-e2e-{stamp}"
            await client.create_topic(topic, args.partitions)
            async with dmq.Client(args.addr, client_id="bench-consumer") as consumer_client:
                elapsed = await end_to_end(client, consumer_client, topic, args.count, payload, args.window, not args.no_route)
            result["e2e_msgs_per_s"] = round(args.count / elapsed)
    routed = {"route_to_leaders": not args.no_route}
    print(json.dumps({"count": args.count, "size": args.size, "partitions": args.partitions, **routed, **result}))


if __name__ == "__main__":
    asyncio.run(main())
