"""PROTOCOL.md's hex examples (protocol/tests/vectors.json, which the Rust
tests keep equal to PROTOCOL.md) decode with this codec, consume every
byte, and encode back to the same bytes."""

from __future__ import annotations

import json

from conftest import REPO

from dmq.codec import (
    Hello,
    HelloOk,
    Leaders,
    Opcode,
    PartitionLeader,
    PartitionLeaders,
    Produce,
    TxnProduceSeq,
    decode_frame,
    encode_frame,
    key_hash,
    key_partition,
)

VECTORS = json.loads((REPO / "protocol" / "tests" / "vectors.json").read_text())["examples"]


def test_every_example_round_trips() -> None:
    assert {"hello", "produce", "deliver", "error"} <= set(VECTORS)
    for name, hex_bytes in VECTORS.items():
        data = bytes.fromhex(hex_bytes)
        decoded = decode_frame(data)
        assert decoded is not None, name
        frame, used = decoded
        assert used == len(data), name
        assert encode_frame(frame) == data, f"{name} re-encodes differently"


def test_examples_mean_what_the_spec_says() -> None:
    hello = decode_frame(bytes.fromhex(VECTORS["hello"]))
    assert hello is not None
    assert hello[0].correlation_id == 1
    assert isinstance(hello[0].body, Hello)
    assert hello[0].body.client_id == "app" and bytes(hello[0].body.secret) == b"pw"
    ok = decode_frame(bytes.fromhex(VECTORS["hello_ok"]))
    assert ok is not None and isinstance(ok[0].body, HelloOk)
    assert ok[0].body.max_frame_bytes == 16 * 1024 * 1024
    produce = decode_frame(bytes.fromhex(VECTORS["produce"]))
    assert produce is not None and isinstance(produce[0].body, Produce)
    assert produce[0].body.topic == "orders"
    numbered = decode_frame(bytes.fromhex(VECTORS["txn_produce_seq"]))
    assert numbered is not None and numbered[0].opcode == Opcode.TXN_PRODUCE_SEQ
    assert numbered[0].correlation_id == 10
    body = numbered[0].body
    assert isinstance(body, TxnProduceSeq) and body.sequence == 1
    assert (body.produce.producer_group, body.produce.transaction_id, body.produce.handle) == ("shop", "o17", 42)
    assert body.produce.topic == "audit" and body.produce.partition is None
    assert [bytes(r.value) for r in body.produce.records] == [b"o17 paid"]
    asked = decode_frame(bytes.fromhex(VECTORS["partition_leaders"]))
    assert asked is not None and asked[0].opcode == Opcode.PARTITION_LEADERS
    assert asked[0].correlation_id == 11 and asked[0].body == PartitionLeaders("orders")
    leaders = decode_frame(bytes.fromhex(VECTORS["leaders"]))
    assert leaders is not None and leaders[0].opcode == Opcode.LEADERS
    assert leaders[0].correlation_id == 11 and isinstance(leaders[0].body, Leaders)
    assert leaders[0].body.partitions == [
        PartitionLeader(0, 2, "10.0.0.2:6380"),
        PartitionLeader(1, 0, ""),
    ]


def test_the_partition_of_a_key_is_fnv1a_64_modulo_the_partitions() -> None:
    """PROTOCOL.md 6.38, with the published FNV-1a 64 test values that
    dmq_protocol::key_hash's tests check too; test_broker.py ties it to
    where the broker puts keys."""
    assert key_hash(b"") == 0xCBF29CE484222325
    assert key_hash(b"a") == 0xAF63DC4C8601EC8C
    assert key_hash(b"foobar") == 0x85944171F73967E8
    assert key_partition(b"a", 1) == 0
    assert key_partition(b"a", 0) == 0
    assert key_partition(b"a", 7) == 0xAF63DC4C8601EC8C % 7
