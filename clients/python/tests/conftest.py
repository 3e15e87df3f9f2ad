"""Test harness: starts a real ``dmqd`` on free 127.0.0.1 ports with a
temporary data directory, and stops it at the end.

Fake servers (``read_request``, ``start_fake``) read what a client sends
and answer as a test scripts it.

The binary is ``$DMQ_DMQD``, else ``$CARGO_TARGET_DIR/debug/dmqd``, else
``<repo>/target/debug/dmqd``. Without one the broker tests fail (they
never skip): build it with ``cargo build -p dmq-broker --bin dmqd``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Iterator, Optional, TypeVar

import pytest

from dmq.codec import Frame, decode_frame

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def dmqd_path() -> Path:
    candidates = []
    if os.environ.get("DMQ_DMQD"):
        candidates.append(Path(os.environ["DMQ_DMQD"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "dmqd")
    candidates.append(REPO / "target" / "debug" / "dmqd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "no dmqd binary: set DMQ_DMQD or build it with `cargo build -p dmq-broker --bin dmqd` "
        f"(looked at {', '.join(map(str, candidates))})"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One dmqd process on its own data directory."""

    def __init__(self, config: Optional[str] = None, fsync: Optional[str] = None) -> None:
        self.binary = dmqd_path()
        self.data_dir = Path(tempfile.mkdtemp(prefix="dmq-py-test-"))
        self.config = config
        self.fsync = fsync
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.log = self.data_dir.parent / (self.data_dir.name + ".log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        for _ in range(5):
            self.port = free_port()
            args = [
                str(self.binary),
                "--data-dir", str(self.data_dir / "data"),
                "--listen", self.address,
                "--admin-listen", f"127.0.0.1:{free_port()}",
            ]
            if self.fsync:
                args += ["--fsync", self.fsync]
            if self.config is not None:
                config = self.data_dir / "dmqd.toml"
                config.write_text(self.config)
                args += ["--config", str(config)]
            log = open(self.log, "ab")
            self.process = subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
            log.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"dmqd did not start; log: {self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A development-mode broker shared by the tests (each uses its own topics)."""
    b = Broker().start()
    yield b
    b.cleanup()


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Runs a test coroutine; a test never hangs past ``timeout``."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


_counter = 0


def unique(prefix: str) -> str:
    global _counter
    _counter += 1
    return f"{prefix}-{os.getpid()}-{_counter}"


async def read_request(reader: asyncio.StreamReader) -> Frame:
    """The next frame a client sent to a fake server (raises
    IncompleteReadError once it hung up)."""
    header = await reader.readexactly(4)
    data = header + await reader.readexactly(struct.unpack("<I", header)[0])
    decoded = decode_frame(data)
    assert decoded is not None
    return decoded[0]


async def start_fake(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    """A fake server on a free 127.0.0.1 port calling ``handle`` per
    connection, and its address."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
