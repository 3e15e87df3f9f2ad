"""A server that answers badly: the client raises a clear error within its
timeouts and never hangs or loops (a fake server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import struct
from typing import Awaitable, Callable

import pytest
from conftest import run

import dmq
from dmq.errors import DmqError

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def with_server(reply: Reply, test: Callable[[str], Awaitable[None]]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reply(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await test(f"127.0.0.1:{port}")


async def read_hello(reader: asyncio.StreamReader) -> int:
    """Reads the client's HELLO; returns its correlation id."""
    header = await reader.readexactly(4)
    body = await reader.readexactly(struct.unpack("<I", header)[0])
    return int(struct.unpack_from("<I", body, 2)[0])


def hello_ok(correlation_id: int, max_frame: int = 1 << 24) -> bytes:
    body = struct.pack("<HIH", 1, max_frame, 2) + b"b1"
    return struct.pack("<IHIB", 7 + len(body), 0x8001, correlation_id, 0) + body


def connect_fails_cleanly(reply: Reply) -> None:
    async def test(address: str) -> None:
        client = dmq.Client(address, connect_timeout=3, request_timeout=3)
        with pytest.raises(DmqError):
            await client.connect()
        await client.close()

    run(with_server(reply, test), timeout=20)


def test_garbage_instead_of_hello_ok() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_hello(reader)
        writer.write(struct.pack("<I", 7) + b"\xff\xff\x01\x00\x00\x00\x00")  # unknown opcode
        await writer.drain()
        await asyncio.sleep(5)

    connect_fails_cleanly(reply)


def test_a_frame_over_the_limit() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_hello(reader)
        writer.write(struct.pack("<I", 0xFFFF_FFF0) + b"\x01\x80")
        await writer.drain()
        await asyncio.sleep(5)

    connect_fails_cleanly(reply)


def test_the_server_hangs_up_at_once() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return

    connect_fails_cleanly(reply)


def test_the_server_never_answers() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_hello(reader)
        await asyncio.sleep(10)

    connect_fails_cleanly(reply)


def test_a_truncated_answer_after_a_good_hello() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(hello_ok(await read_hello(reader)))
        await writer.drain()
        header = await reader.readexactly(4)
        body = await reader.readexactly(struct.unpack("<I", header)[0])
        correlation_id = struct.unpack_from("<I", body, 2)[0]
        # TOPICS with a list count far beyond the bytes that follow.
        answer = struct.pack("<HIB", 0x8032, correlation_id, 0) + struct.pack("<I", 1_000_000)
        writer.write(struct.pack("<I", len(answer)) + answer)
        await writer.drain()
        await asyncio.sleep(5)

    async def test(address: str) -> None:
        async with dmq.Client(address, request_timeout=3) as client:
            with pytest.raises(DmqError):
                await client.list_topics()

    run(with_server(reply, test), timeout=20)
