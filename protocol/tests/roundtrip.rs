//! Properties of the codec: encode → decode is the identity for every
//! opcode, decoding never panics, every strict prefix of a frame is
//! "incomplete", oversize lengths are rejected from the 4-byte prefix alone,
//! trailing bytes are rejected, and the record and delivery sizes of
//! `limits` are the encoder's.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use dmq_protocol::*;
use proptest::prelude::*;

const MAX: u32 = DEFAULT_MAX_FRAME_BYTES;

fn encode(frame: &Frame) -> Vec<u8> {
    encode_frame_to_vec(frame).expect("encodes")
}

/// Encode, decode (copying and zero-copy), compare; and check the length
/// field and prefixes.
fn check_round_trip(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = encode(frame);
    prop_assert_eq!(peek_frame_len(&bytes), Some((bytes.len() - 4) as u32));
    let decoded = decode_frame(&bytes, MAX);
    prop_assert_eq!(decoded, Ok(Some((frame.clone(), bytes.len()))));
    let shared = Bytes::from(bytes.clone());
    prop_assert_eq!(
        decode_frame_bytes(&shared, MAX),
        Ok(Some((frame.clone(), bytes.len())))
    );
    // A following frame is left alone.
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    prop_assert_eq!(
        decode_frame(&two, MAX),
        Ok(Some((frame.clone(), bytes.len())))
    );
    Ok(())
}

fn check_prefixes(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = encode(frame);
    for end in 0..bytes.len() {
        prop_assert_eq!(decode_frame(&bytes[..end], MAX), Ok(None), "prefix {}", end);
    }
    Ok(())
}

macro_rules! per_opcode {
    ($name:ident, $strategies:expr, $wrap:expr) => {
        #[test]
        fn $name() {
            let strategies = $strategies;
            for (opcode, strategy) in strategies {
                let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
                    cases: 96,
                    ..ProptestConfig::default()
                });
                runner
                    .run(
                        &(any::<u32>(), any::<u8>(), strategy),
                        |(corr, flags, body)| {
                            let frame: Frame = $wrap(corr, flags, body);
                            prop_assert_eq!(frame.opcode(), opcode);
                            check_round_trip(&frame)
                        },
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", opcode.name()));
            }
        }
    };
}

per_opcode!(every_request_round_trips, requests(), |corr, flags, r| {
    Frame {
        correlation_id: corr,
        flags,
        body: Body::Request(r),
    }
});
per_opcode!(every_response_round_trips, responses(), |corr, flags, r| {
    Frame {
        correlation_id: corr,
        flags,
        body: Body::Response(r),
    }
});
per_opcode!(every_push_round_trips, pushes(), |_corr, flags, p| Frame {
    correlation_id: 0,
    flags,
    body: Body::Push(p),
});

#[test]
fn strategies_cover_every_opcode() {
    let mut covered: Vec<Opcode> = requests()
        .into_iter()
        .map(|(o, _)| o)
        .chain(responses().into_iter().map(|(o, _)| o))
        .chain(pushes().into_iter().map(|(o, _)| o))
        .collect();
    covered.sort();
    assert_eq!(covered, Opcode::ALL.to_vec());
    for opcode in Opcode::ALL {
        assert_eq!(Opcode::from_u16(opcode.as_u16()), Some(*opcode));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_frame_round_trips(frame in any_frame()) {
        check_round_trip(&frame)?;
    }

    #[test]
    fn every_strict_prefix_is_incomplete(frame in any_frame()) {
        check_prefixes(&frame)?;
    }

    #[test]
    fn trailing_bytes_are_rejected(frame in any_frame(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
        let mut bytes = encode(&frame);
        bytes.extend_from_slice(&extra);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        prop_assert_eq!(
            decode_frame(&bytes, MAX),
            Err(WireError::TrailingBytes { opcode: frame.opcode().as_u16(), extra: extra.len() })
        );
    }

    #[test]
    fn record_and_delivery_sizes_are_their_encoded_sizes(delivery in delivery()) {
        // A DELIVER push is the frame header plus the delivery.
        let push = encode(&Frame::push(delivery.clone()));
        prop_assert_eq!(push.len() as u64, MIN_FRAME_BYTES as u64 + delivery_wire_size(&delivery));
        // The record's part: what a PRODUCE record with the same key,
        // headers and value measures, and what a clean DELIVER needs
        // beyond the smallest delivery.
        let record = ProduceRecord {
            key: delivery.key.clone(),
            headers: delivery.headers.clone(),
            value: delivery.value.clone(),
            ..ProduceRecord::default()
        };
        let bare = Delivery {
            key: None,
            headers: Vec::new(),
            value: Bytes::new(),
            ..delivery.clone()
        };
        prop_assert_eq!(
            delivery_wire_size(&delivery) - delivery_wire_size(&bare),
            produce_record_size(&record) - 9
        );
    }

    #[test]
    fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_frame(&data, MAX);
        let _ = decode_frame(&data, 64);
        dmq_protocol::fuzzing::decode(&data);
    }

    /// Arbitrary bodies behind a valid header and a known opcode reach the
    /// body parsers far more often than random bytes.
    #[test]
    fn decode_never_panics_on_random_bodies(
        opcode_index in 0..Opcode::ALL.len(),
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let opcode = Opcode::ALL[opcode_index];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((7 + body.len()) as u32).to_le_bytes());
        bytes.extend_from_slice(&opcode.as_u16().to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&body);
        match decode_frame(&bytes, MAX) {
            Ok(Some((_, consumed))) => prop_assert_eq!(consumed, bytes.len()),
            Ok(None) => prop_assert!(false, "a whole frame is never incomplete"),
            Err(error) => prop_assert_ne!(error.code(), ErrorCode::FrameTooLarge),
        }
        dmq_protocol::fuzzing::decode(&bytes);
    }

    /// Flipping one byte of a valid frame gives an error, another valid frame
    /// or "incomplete" (a grown length), never a panic.
    #[test]
    fn corrupted_frames_never_panic(frame in any_frame(), at in any::<usize>(), xor in 1u8..) {
        let mut bytes = encode(&frame);
        let at = at % bytes.len();
        bytes[at] ^= xor;
        dmq_protocol::fuzzing::decode(&bytes);
    }
}

#[test]
fn oversize_length_is_rejected_from_the_prefix_alone() {
    // Only the 4-byte length is there: 1 GiB declared, 1 MiB allowed.
    let prefix = (1u32 << 30).to_le_bytes();
    assert_eq!(
        decode_frame(&prefix, 1 << 20),
        Err(WireError::FrameTooLarge {
            len: 4 + (1u64 << 30),
            max: 1 << 20
        })
    );
    assert_eq!(
        frame_len(&prefix, 1 << 20).map_err(|e| e.code()),
        Err(ErrorCode::FrameTooLarge)
    );
    assert_eq!(peek_frame_len(&prefix), Some(1 << 30));
    assert_eq!(peek_frame_len(&prefix[..3]), None);
    // u32::MAX does not overflow.
    assert!(matches!(
        decode_frame(&u32::MAX.to_le_bytes(), u32::MAX),
        Err(WireError::FrameTooLarge { .. })
    ));
    // The limit counts the whole frame: a frame of exactly `max` bytes passes.
    let ping = encode(&Frame::request(1, Request::Ping));
    assert_eq!(ping.len(), MIN_FRAME_BYTES);
    assert!(decode_frame(&ping, ping.len() as u32)
        .expect("fits")
        .is_some());
    assert!(decode_frame(&ping, ping.len() as u32 - 1).is_err());
}

#[test]
fn short_length_unknown_opcode_and_push_correlation_are_rejected() {
    let mut short = Vec::new();
    short.extend_from_slice(&6u32.to_le_bytes());
    short.extend_from_slice(&[0; 6]);
    assert_eq!(
        decode_frame(&short, MAX),
        Err(WireError::FrameTooShort { len: 6 })
    );

    let mut unknown = encode(&Frame::request(1, Request::Ping));
    unknown[4..6].copy_from_slice(&0x7777u16.to_le_bytes());
    let error = decode_frame(&unknown, MAX).expect_err("unknown opcode");
    assert_eq!(error, WireError::UnknownOpcode(0x7777));
    assert_eq!(error.code(), ErrorCode::UnknownOpcode);

    let mut push = encode(&sample_frames()[8].1);
    assert_eq!(sample_frames()[8].0, "deliver");
    push[6..10].copy_from_slice(&5u32.to_le_bytes());
    assert_eq!(
        decode_frame(&push, MAX),
        Err(WireError::InvalidValue {
            field: "correlation_id",
            value: 5
        })
    );
}

#[test]
fn field_errors_are_structured() {
    // CREATE_TOPIC whose name claims 10 bytes but has 3.
    let mut bytes = Vec::new();
    let body = [&10u16.to_le_bytes()[..], b"abc"].concat();
    bytes.extend_from_slice(&((7 + body.len()) as u32).to_le_bytes());
    bytes.extend_from_slice(&Opcode::CreateTopic.as_u16().to_le_bytes());
    bytes.extend_from_slice(&9u32.to_le_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&body);
    assert_eq!(
        decode_frame(&bytes, MAX),
        Err(WireError::UnexpectedEof {
            field: "name",
            need: 10,
            have: 3
        })
    );

    // Invalid UTF-8 and an invalid bool.
    let topic = |name: &[u8], ordered: u8| {
        let mut body = Vec::new();
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.push(ordered);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((7 + body.len()) as u32).to_le_bytes());
        bytes.extend_from_slice(&Opcode::CreateTopic.as_u16().to_le_bytes());
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&body);
        bytes
    };
    assert!(decode_frame(&topic(b"ok", 1), MAX)
        .expect("valid")
        .is_some());
    assert_eq!(
        decode_frame(&topic(&[0xff, 0xfe], 0), MAX),
        Err(WireError::InvalidUtf8 { field: "name" })
    );
    assert_eq!(
        decode_frame(&topic(b"ok", 2), MAX),
        Err(WireError::InvalidValue {
            field: "ordered",
            value: 2
        })
    );
    assert_eq!(
        decode_frame(&topic(b"ok", 2), MAX).map_err(|e| e.code()),
        Err(ErrorCode::MalformedFrame)
    );
}

#[test]
fn encode_errors_leave_the_buffer_untouched() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let frame = Frame::request(
        1,
        CreateTopic {
            name: "x".repeat(70_000),
            partitions: 1,
            ordered: false,
        },
    );
    assert_eq!(
        encode_frame(&frame, &mut buf),
        Err(EncodeError::FieldTooLong {
            field: "name",
            len: 70_000,
            max: 65_535
        })
    );
    assert_eq!(&buf[..], b"keep");
    // ERROR messages are cut to fit instead.
    let error = Frame::error(1, ErrorCode::InternalError, "é".repeat(40_000));
    assert!(encode_frame(&error, &mut buf).is_ok());
}

#[test]
fn pushes_are_encoded_with_correlation_id_zero() {
    let mut frame = sample_frames()[8].1.clone();
    frame.correlation_id = 99;
    let bytes = encode(&frame);
    let (decoded, _) = decode_frame(&bytes, MAX).expect("valid").expect("complete");
    assert_eq!(decoded.correlation_id, 0);
}
