"""Property tests (hypothesis) of the codec: every frame it encodes decodes
to the same frame using every byte; truncated frames are incomplete, never
an exception; garbage is a ProtocolError, never anything else."""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from dmq.codec import (
    Ack,
    Delivery,
    DeliveryTime,
    Frame,
    Header,
    Leaders,
    MessagePosition,
    PartitionLeader,
    PartitionLeaders,
    Produce,
    Record,
    TxnProduce,
    TxnProduceSeq,
    decode_frame,
    encode_frame,
)
from dmq.errors import ProtocolError

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
NAME = st.text(min_size=1, max_size=40)
SMALL_BYTES = st.binary(max_size=64)

headers = st.lists(st.builds(Header, SMALL_BYTES, SMALL_BYTES), max_size=4)
delivery_times = st.one_of(
    st.just(DeliveryTime()),
    st.builds(DeliveryTime, st.just(1), U64),
    st.builds(DeliveryTime, st.just(2), I64),
)
records = st.builds(
    Record,
    st.binary(max_size=256),
    st.one_of(st.none(), SMALL_BYTES),
    headers,
    delivery_times,
    st.one_of(st.none(), U64),
)
produces = st.builds(
    Produce,
    NAME,
    st.one_of(st.none(), U32),
    st.one_of(st.none(), st.tuples(U64, U64)),
    st.lists(records, max_size=5),
)
deliveries = st.builds(
    Delivery,
    U64,
    NAME,
    U32,
    U64,
    U32,
    st.binary(min_size=16, max_size=16),
    I64,
    st.one_of(st.none(), SMALL_BYTES),
    headers,
    st.binary(max_size=256),
    st.one_of(st.none(), I64),
    st.one_of(st.none(), I64),
)
acks = st.builds(Ack, U64, st.lists(st.builds(MessagePosition, U32, U64), max_size=8))
txn_produce_seqs = st.builds(
    TxnProduceSeq,
    st.builds(TxnProduce, NAME, NAME, U64, NAME, st.one_of(st.none(), U32), st.lists(records, max_size=3)),
    U32,
)
partition_leaders = st.builds(PartitionLeaders, NAME)
leaders = st.builds(Leaders, st.lists(st.builds(PartitionLeader, U32, U64, st.text(max_size=40)), max_size=6))
bodies = st.one_of(produces, deliveries, acks, txn_produce_seqs, partition_leaders, leaders)


@settings(max_examples=300, deadline=None)
@given(U32, bodies)
def test_encode_then_decode_is_the_identity(correlation_id: int, body: object) -> None:
    # A push (DELIVER) carries correlation id 0 (PROTOCOL.md section 4).
    if isinstance(body, Delivery):
        correlation_id = 0
    frame = Frame.of(correlation_id, body)  # type: ignore[arg-type]
    data = encode_frame(frame)
    decoded = decode_frame(data)
    assert decoded == (frame, len(data))
    # Any prefix is "not yet complete", never an error.
    for cut in (0, 3, 4, len(data) // 2, len(data) - 1):
        assert decode_frame(data[:cut]) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_protocol_error_or_incomplete(data: bytes) -> None:
    try:
        result: Optional[tuple[Frame, int]] = decode_frame(data)
    except ProtocolError:
        return
    if result is not None:
        frame, used = result
        assert 0 < used <= len(data)
        assert encode_frame(frame) == data[:used]
