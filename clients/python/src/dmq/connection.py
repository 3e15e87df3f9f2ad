"""One TCP connection to a broker (PROTOCOL.md sections 2 and 4).

Owns: the HELLO handshake, reading frames (length checked against the
frame limit before the body is read), correlation ids (a counter that
skips 0), matching responses to pending requests by correlation id (they
may arrive in any order), routing DELIVER pushes, connection-level ERRORs
(correlation id 0: every pending request fails with it), closing on any
frame that breaks the protocol, and the keepalive PING.

Never hangs on a bad broker: a malformed frame, an oversize length, an
unknown opcode or a lost connection fails every pending request at once
(:class:`ProtocolError`, :class:`ConnectionClosedError` or the broker's
ERROR), and the handshake is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional, Union

from .codec import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES_BEFORE_HELLO,
    PROTOCOL_VERSION,
    Body,
    Delivery,
    Empty,
    Error,
    Frame,
    Hello,
    HelloOk,
    Opcode,
    TxnCheck,
    decode_whole_frame,
    encode_frame,
    frame_header,
    peek_length,
)
from .errors import (
    BrokerError,
    ConnectionClosedError,
    DmqError,
    ProtocolError,
    RequestTimeoutError,
    broker_error,
)

_U32_MAX = 0xFFFFFFFF

#: Receives DELIVER and TXN_CHECK (6.32) pushes.
PushHandler = Callable[[Union[Delivery, TxnCheck]], None]


class Connection(asyncio.Protocol):
    """A connected, authenticated session. Create with :meth:`open`."""

    def __init__(self, max_frame_bytes: int, on_push: Optional[PushHandler], on_lost: Optional[Callable[[Connection, BaseException], None]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: Optional[asyncio.Transport] = None
        self._buffer = bytearray()
        # Until HELLO_OK: the client's own limit (the broker sends small frames then).
        self._client_max_frame = max_frame_bytes
        self.max_frame_bytes = max_frame_bytes
        self._next_id = 0
        self._pending: dict[int, tuple[asyncio.Future[Any], bool]] = {}
        self._on_push = on_push
        self._on_lost = on_lost
        self._closed: Optional[BaseException] = None
        self._closed_event = asyncio.Event()
        self.last_sent = time.monotonic()
        self.hello: Optional[HelloOk] = None
        self._keepalive: Optional[asyncio.TimerHandle] = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ----- opening -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        secret: bytes,
        connect_timeout: float,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        keepalive: Optional[float] = 60.0,
        on_push: Optional[PushHandler] = None,
        on_lost: Optional[Callable[[Connection, BaseException], None]] = None,
    ) -> Connection:
        """Connects and completes HELLO within ``connect_timeout`` seconds;
        raises the broker's refusal (e.g. AuthenticationFailed) as a
        :class:`BrokerError`."""
        loop = asyncio.get_running_loop()

        async def handshake() -> Connection:
            _, conn = await loop.create_connection(
                lambda: cls(max_frame_bytes, on_push, on_lost), host, port
            )
            try:
                body = await conn.request(Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, client_id, secret))
            except BaseException:
                conn.close()
                raise
            if not isinstance(body, HelloOk) or body.version != PROTOCOL_VERSION:
                conn.abort(ProtocolError(f"unexpected answer to HELLO: {body!r}"))
                raise ProtocolError(f"unexpected answer to HELLO: {body!r}")
            if body.max_frame_bytes < MAX_FRAME_BYTES_BEFORE_HELLO:
                conn.abort(ProtocolError("HELLO_OK announces max_frame_bytes below 65,536"))
                raise ProtocolError(f"HELLO_OK announces max_frame_bytes {body.max_frame_bytes}, below 65,536")
            conn.hello = body
            conn.max_frame_bytes = max(conn._client_max_frame, body.max_frame_bytes)
            if keepalive:
                conn._arm_keepalive(keepalive)
            return conn

        try:
            return await asyncio.wait_for(handshake(), connect_timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no HELLO_OK from {host}:{port} within {connect_timeout} s") from None
        except OSError as error:
            raise ConnectionClosedError(f"cannot connect to {host}:{port}: {error}") from error

    # ----- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._closed is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while True:
                available = len(buffer) - start
                if available < 4:
                    break
                size = peek_length(buffer[start : start + 4], self.max_frame_bytes)
                assert size is not None
                if available < size:
                    break
                frame = bytes(buffer[start : start + size])
                start += size
                self._frame_received(frame, size)
                if self._closed is not None:
                    return
        except ProtocolError as error:
            self.abort(error)
            return
        if start:
            del buffer[:start]

    def _frame_received(self, data: bytes, size: int) -> None:
        opcode_value = data[4] | (data[5] << 8)
        correlation_id = int.from_bytes(data[6:10], "little")
        if opcode_value == Opcode.PRODUCE_OK and correlation_id:
            entry = self._pending.pop(correlation_id, None)
            if entry is not None and entry[1]:
                if not entry[0].done():
                    entry[0].set_result(data)
                return
            if entry is not None:
                self._pending[correlation_id] = entry
        frame = decode_whole_frame(data, size)
        opcode = frame.opcode
        if opcode.is_push:
            if self._on_push is not None and isinstance(frame.body, (Delivery, TxnCheck)):
                self._on_push(frame.body)
            return
        if opcode.is_request:
            raise ProtocolError(f"the broker sent a request opcode {opcode.name}")
        body = frame.body
        if correlation_id == 0:
            if isinstance(body, Error):
                # About the connection itself: the broker closes it.
                self.abort(broker_error(body.code, body.message))
                return
            raise ProtocolError(f"{opcode.name} with correlation id 0")
        entry = self._pending.pop(correlation_id, None)
        if entry is None:
            return  # a late answer to a request that timed out
        future, raw = entry
        if future.done():
            return
        if isinstance(body, Error):
            future.set_exception(broker_error(body.code, body.message))
        elif raw:
            future.set_result(data)
        else:
            future.set_result(body)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        error: BaseException
        if exc is None:
            error = ConnectionClosedError("the broker closed the connection")
        else:
            error = ConnectionClosedError(f"connection lost: {exc}")
        self._fail(error)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ----- requests --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> Optional[BaseException]:
        return self._closed

    def next_correlation_id(self) -> int:
        """A counter that skips 0 on wrap-around."""
        n = self._next_id + 1
        if n > _U32_MAX:
            n = 1
        self._next_id = n
        return n

    def _check_open(self) -> None:
        if self._closed is not None:
            if isinstance(self._closed, DmqError):
                raise ConnectionClosedError(f"connection closed: {self._closed}")
            raise ConnectionClosedError("connection closed")

    def request(self, body: Body, opcode: Optional[Opcode] = None) -> asyncio.Future[Any]:
        """Sends one request; the future resolves with the response body, or
        fails with the broker's ERROR or the connection's failure."""
        self._check_open()
        correlation_id = self.next_correlation_id()
        frame = Frame(opcode if opcode is not None else body.OPCODE, correlation_id, body)
        data = encode_frame(frame)
        if len(data) > self.max_frame_bytes:
            raise ProtocolError(f"a {frame.opcode.name} of {len(data)} bytes exceeds the frame limit of {self.max_frame_bytes}")
        return self._send(correlation_id, data, False)

    def send_raw(self, data: Union[bytes, bytearray], correlation_id: int) -> asyncio.Future[Any]:
        """Sends an encoded request whose correlation id is already set; the
        future resolves with the whole response frame's bytes for
        PRODUCE_OK (the producer decodes it) or the decoded body otherwise."""
        self._check_open()
        if len(data) > self.max_frame_bytes:
            raise ProtocolError(f"a frame of {len(data)} bytes exceeds the frame limit of {self.max_frame_bytes}")
        return self._send(correlation_id, data, True)

    def _send(self, correlation_id: int, data: Union[bytes, bytearray], raw: bool) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[correlation_id] = (future, raw)
        assert self._transport is not None
        self._transport.write(data)
        self.last_sent = time.monotonic()
        return future

    def forget(self, correlation_id: int) -> None:
        """Stops waiting for an answer (after a timeout)."""
        self._pending.pop(correlation_id, None)

    async def call(self, body: Body, timeout: float, opcode: Optional[Opcode] = None) -> Any:
        """:meth:`request` and wait for the answer at most ``timeout`` s."""
        future = self.request(body, opcode)
        correlation_id = self._next_id
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.forget(correlation_id)
            raise RequestTimeoutError(f"no answer to {(opcode or body.OPCODE).name} within {timeout} s") from None

    async def drain(self) -> None:
        """Waits while the socket's write buffer is above its high mark."""
        if self._write_paused and self._closed is None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def ping(self) -> asyncio.Future[Any]:
        return self.request(Empty(), Opcode.PING)

    # ----- keepalive and closing ---------------------------------------------------

    def _arm_keepalive(self, every: float) -> None:
        def tick() -> None:
            if self._closed is not None:
                return
            idle = time.monotonic() - self.last_sent
            if idle >= every:
                future = self.ping()
                future.add_done_callback(_ignore)
                idle = 0.0
            self._keepalive = self._loop.call_later(every - idle, tick)

        self._keepalive = self._loop.call_later(every, tick)

    def abort(self, error: BaseException) -> None:
        """Closes at once, failing every pending request with ``error``."""
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Closes; pending requests fail with ConnectionClosedError."""
        self.abort(ConnectionClosedError("connection closed by the client"))

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def _fail(self, error: BaseException) -> None:
        if self._closed is not None:
            return
        self._closed = error
        self._closed_event.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)
        self.resume_writing()
        if self._on_lost is not None:
            self._on_lost(self, error)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def is_transient(error: BaseException) -> bool:
    """Whether retrying after a reconnect may succeed."""
    return isinstance(error, DmqError) and error.transient


__all__ = ["Connection", "is_transient", "BrokerError", "frame_header"]
