//! Every frame the broker sends fits `max_frame_bytes` (PROTOCOL.md §8).
//!
//! Three rules, one per place a frame grows with the records it carries:
//! - **Produce**: a record over `dmq_protocol::max_record_bytes` is refused
//!   before anything is written (the produce pipeline, `crate::produce`,
//!   calls [`check_record_inputs`] for every path: PRODUCE, the admin test
//!   message, resend). The protocol's headroom then guarantees the
//!   record's DELIVER push, a DELIVERIES answer holding it alone, and its
//!   dead-letter copy's DELIVER all fit.
//! - **FETCH**: [`fetch_within`] fills the DELIVERIES answer while the
//!   records fit; a message taken that does not fit goes back with
//!   `Dispatcher::return_unsent` (same attempt, no dead letter).
//! - **Everything else** the session writer sends goes through
//!   [`encode_within`]: an answer over the limit becomes ERROR
//!   InternalError, a DELIVER over it is withheld and its credit given
//!   back ([`give_back_credit`]).
//!
//! A record stored before this limit existed, or under a larger
//! `max_frame_bytes`, can still make a delivery over the limit: such a
//! message is never sent, stays in flight, and after its ack timeouts goes
//! to the dead-letter topic like any message nobody acks.

use bytes::BytesMut;
use dmq_dispatcher::{DispatchError, Dispatcher, MemberId};
use dmq_log_store::RecordInput;
use dmq_protocol::{
    self as wire, encode_frame, limits::DELIVERIES_FRAME_BYTES_MIN, Body, ErrorCode, Frame,
    RecordTooLarge,
};

use crate::convert;
use crate::engine::Engine;

/// Most `Dispatcher::fetch` calls one FETCH answer is filled with.
const FETCH_ROUNDS_MAX: usize = 8;

/// Checks the records of an admin test message (or any other entry that
/// is not a PRODUCE frame) against the maximum record size.
pub(crate) fn check_record_inputs(
    records: &[RecordInput],
    max_frame_bytes: u32,
) -> Result<(), RecordTooLarge> {
    let max = wire::max_record_bytes(max_frame_bytes);
    for (index, record) in records.iter().enumerate() {
        let bytes = wire::record_wire_size(
            record.key.as_deref(),
            record
                .headers
                .iter()
                .map(|(name, value)| (name.as_ref(), value.as_ref())),
            &record.value,
        );
        if bytes > u64::from(max) {
            return Err(RecordTooLarge {
                index,
                bytes,
                max,
                max_frame_bytes,
            });
        }
    }
    Ok(())
}

/// Whether an encoded frame of `frame_bytes` may be sent.
fn fits(frame_bytes: usize, max_frame_bytes: u32) -> bool {
    frame_bytes as u64 <= u64::from(max_frame_bytes)
}

/// Up to `max_messages` deliveries for `member` whose DELIVERIES frame fits
/// `max_frame_bytes`.
///
/// The dispatcher hands messages out before their size is known, so the
/// answer is filled in rounds: one message first, then as many as fit if
/// the rest are like the largest seen so far. A message that does not fit
/// what is left goes back with `return_unsent` and ends the answer: it is
/// the first of the next FETCH (or another member's), as the same attempt.
/// A message that fits no answer at all is withheld: logged, left in
/// flight, dead-lettered after its attempts like any message nobody acks.
pub(crate) fn fetch_within(
    dispatcher: &mut Dispatcher,
    member: MemberId,
    max_messages: u32,
    max_frame_bytes: u32,
) -> Result<Vec<wire::Delivery>, DispatchError> {
    let budget = u64::from(max_frame_bytes).saturating_sub(u64::from(DELIVERIES_FRAME_BYTES_MIN));
    let max_messages = max_messages as usize;
    let mut answer = Vec::new();
    let mut used = 0u64;
    let mut largest = 0u64;
    for _ in 0..FETCH_ROUNDS_MAX {
        let wanted = max_messages.saturating_sub(answer.len());
        let count = match largest {
            0 => wanted.min(1),
            largest => wanted.min(((budget - used) / largest) as usize),
        };
        if count == 0 {
            break;
        }
        let round = dispatcher.fetch(member, u32::try_from(count).unwrap_or(u32::MAX))?;
        if round.is_empty() {
            break;
        }
        let mut full = false;
        for delivery in round {
            let delivery = convert::delivery(delivery);
            let bytes = wire::delivery_wire_size(&delivery);
            if bytes > budget {
                withheld(&delivery, bytes, max_frame_bytes);
            } else if full || used + bytes > budget {
                full = true;
                dispatcher.return_unsent(member, delivery.partition, delivery.offset)?;
            } else {
                used += bytes;
                largest = largest.max(bytes);
                answer.push(delivery);
            }
        }
        if full {
            break;
        }
    }
    Ok(answer)
}

/// Appends `frame` to `buffer`. A frame over `max_frame_bytes`
/// (PROTOCOL.md §8) is not sent: an answer is replaced by ERROR
/// InternalError; a DELIVER push is withheld and false returned (the
/// caller gives its credit back; the message stays in flight until its
/// ack timeout). False too for a frame that cannot be encoded.
pub(crate) fn encode_within(frame: &Frame, buffer: &mut BytesMut, max_frame_bytes: u32) -> bool {
    let start = buffer.len();
    let bytes = match encode_frame(frame, buffer) {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::error!(%error, "cannot encode a frame");
            return false;
        }
    };
    if fits(bytes, max_frame_bytes) {
        return true;
    }
    buffer.truncate(start);
    match &frame.body {
        Body::Push(wire::Push::Deliver(delivery)) => {
            let bytes = wire::delivery_wire_size(delivery);
            withheld(delivery, bytes, max_frame_bytes);
            false
        }
        _ => {
            tracing::error!(
                opcode = frame.opcode().name(),
                bytes,
                max_frame_bytes,
                "an answer over max_frame_bytes is replaced by an error"
            );
            // A short message: it fits the smallest max_frame_bytes.
            let error = Frame::error(
                frame.correlation_id,
                ErrorCode::InternalError,
                format!(
                    "the {} answer is {bytes} bytes, more than max_frame_bytes ({max_frame_bytes})",
                    frame.opcode().name()
                ),
            );
            if let Err(error) = encode_frame(&error, buffer) {
                tracing::error!(%error, "cannot encode a frame");
            }
            true
        }
    }
}

/// The credit of DELIVER pushes withheld by [`encode_within`] goes back to
/// their subscriptions: the client never saw them, so it never gives it
/// back itself.
pub(crate) fn give_back_credit(engine: &Engine, members: Vec<MemberId>) {
    if members.is_empty() {
        return;
    }
    let engine = engine.clone();
    tokio::spawn(async move {
        let _ = engine
            .call(move |dispatcher, _| {
                for member in members {
                    let _ = dispatcher.add_credit(member, 1);
                }
            })
            .await;
    });
}

/// Logs a delivery that fits no frame (it is not sent).
pub(crate) fn withheld(delivery: &wire::Delivery, bytes: u64, max_frame_bytes: u32) {
    tracing::error!(
        topic = delivery.topic,
        partition = delivery.partition,
        offset = delivery.offset,
        id = %delivery.message_id,
        delivery_bytes = bytes,
        max_frame_bytes,
        "a message too large for any frame is not delivered; it goes to the dead-letter \
         topic after its attempts (stored before the record size limit, or under a larger \
         max_frame_bytes)"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use dmq_dispatcher::{
        DispatcherConfig, GroupConfig, MemoryStorage, NullEventSink, TopicConfig,
    };
    use dmq_log_store::ManualClock;

    use super::*;

    const MAX_FRAME: u32 = 64 * 1024;

    fn dispatcher() -> Dispatcher {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let storage = MemoryStorage::new(clock.clone());
        let mut dispatcher = Dispatcher::open(
            Arc::new(storage),
            clock,
            Arc::new(NullEventSink),
            DispatcherConfig::default(),
        )
        .unwrap();
        let topic = TopicConfig {
            partitions: 1,
            ordered: false,
        };
        dispatcher.create_topic("t", topic).unwrap();
        let group = GroupConfig {
            max_attempts: 1,
            ..GroupConfig::default()
        };
        dispatcher.subscribe("t", "g", group).unwrap();
        dispatcher
    }

    fn produce(dispatcher: &mut Dispatcher, sizes: &[usize]) {
        let records = sizes
            .iter()
            .map(|size| RecordInput::new(Bytes::from(vec![b'x'; *size])))
            .collect();
        dispatcher.produce("t", Some(0), records).unwrap();
    }

    fn frame_bytes(deliveries: &[wire::Delivery]) -> usize {
        let frame = wire::Frame::response(
            1,
            wire::Response::Deliveries(wire::Deliveries {
                deliveries: deliveries.to_vec(),
            }),
        );
        wire::encode_frame_to_vec(&frame).unwrap().len()
    }

    #[test]
    fn answers_fit_and_hand_the_rest_back_as_the_same_attempt() {
        let mut dispatcher = dispatcher();
        let member = dispatcher.join("t", "g", "m").unwrap();
        // Small, then large, records: the large ones overflow a round.
        produce(
            &mut dispatcher,
            &[100, 100, 20_000, 20_000, 20_000, 20_000, 100],
        );
        let mut offsets = Vec::new();
        for _ in 0..10 {
            let answer = fetch_within(&mut dispatcher, member, 100, MAX_FRAME).unwrap();
            assert!(frame_bytes(&answer) <= MAX_FRAME as usize);
            assert!(answer.iter().all(|d| d.attempt == 1), "{answer:?}");
            for delivery in &answer {
                offsets.push(delivery.offset);
                dispatcher.ack(member, 0, delivery.offset).unwrap();
            }
        }
        assert_eq!(offsets, (0..7).collect::<Vec<_>>());
        // A record at the limit comes alone, and max_messages still counts.
        let at_limit = wire::max_record_bytes(MAX_FRAME) as usize - 9;
        produce(&mut dispatcher, &[at_limit, 1, 1]);
        let answer = fetch_within(&mut dispatcher, member, 100, MAX_FRAME).unwrap();
        assert_eq!(answer.len(), 1);
        assert!(frame_bytes(&answer) <= MAX_FRAME as usize);
        dispatcher.ack(member, 0, answer[0].offset).unwrap();
        let answer = fetch_within(&mut dispatcher, member, 1, MAX_FRAME).unwrap();
        assert_eq!(answer.len(), 1);
        assert_eq!(answer[0].attempt, 1);
    }

    #[test]
    fn a_message_that_fits_no_frame_is_withheld_not_returned() {
        let mut dispatcher = dispatcher();
        let member = dispatcher.join("t", "g", "m").unwrap();
        // Stored directly in the log, as before the limit existed.
        let log = dispatcher.partitions("t").unwrap()[0].clone();
        log.append(vec![RecordInput::new(Bytes::from(vec![b'x'; 70_000]))])
            .unwrap();
        produce(&mut dispatcher, &[10]);
        let answer = fetch_within(&mut dispatcher, member, 10, MAX_FRAME).unwrap();
        assert_eq!(answer.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_writer_never_sends_a_frame_over_the_limit() {
        let mut buffer = BytesMut::from(&b"earlier frames"[..]);
        // Within the limit: appended as it is.
        let small = Frame::response(7, wire::Response::Pong);
        assert!(encode_within(&small, &mut buffer, MAX_FRAME));
        let mut expected = b"earlier frames".to_vec();
        expected.extend(wire::encode_frame_to_vec(&small).unwrap());
        assert_eq!(&buffer[..], &expected[..]);
        // An answer over it: an ERROR for the same request instead.
        let topics = (0..1000)
            .map(|i| wire::TopicSummary {
                name: format!("{i:0>100}"),
                partitions: 1,
                ordered: false,
            })
            .collect();
        let big = Frame::response(8, wire::Response::Topics(wire::Topics { topics }));
        assert!(encode_within(&big, &mut buffer, MAX_FRAME));
        let (error, used) = wire::decode_frame(&buffer[expected.len()..], MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(expected.len() + used, buffer.len());
        assert_eq!(error.correlation_id, 8);
        match error.body {
            Body::Response(wire::Response::Error(error)) => {
                assert_eq!(error.code, ErrorCode::InternalError);
                assert!(error.message.contains("TOPICS"), "{}", error.message);
            }
            other => panic!("{other:?}"),
        }
        // A DELIVER over it: withheld, nothing appended.
        let before = buffer.len();
        let push = Frame::push(wire::Push::Deliver(wire::Delivery {
            topic: "t".into(),
            value: Bytes::from(vec![0; MAX_FRAME as usize]),
            ..wire::Delivery::default()
        }));
        assert!(!encode_within(&push, &mut buffer, MAX_FRAME));
        assert_eq!(buffer.len(), before);
    }

    #[test]
    fn the_headroom_counts_the_dispatchers_names_and_reasons() {
        use dmq_dispatcher::names;
        use dmq_protocol::limits;
        assert_eq!(names::NAME_LEN_MAX, limits::NAME_BYTES_MAX);
        assert_eq!(names::REASON_LEN_MAX, limits::DEAD_LETTER_REASON_BYTES_MAX);
        for reason in [
            names::REASON_ACK_TIMEOUT,
            names::REASON_NACK,
            names::REASON_MEMBER_LEFT,
        ] {
            assert!(reason.len() <= limits::DEAD_LETTER_REASON_BYTES_MAX);
        }
        for (name, _) in limits::DEAD_LETTER_HEADERS {
            assert!(name.starts_with(names::DEAD_LETTER_HEADER_PREFIX), "{name}");
        }
    }

    #[test]
    fn admin_records_are_measured_like_produce_records() {
        let max = wire::max_record_bytes(MAX_FRAME) as usize;
        let mut record = RecordInput::new(Bytes::from(vec![b'x'; max - 9 - 8 - 2]));
        record.headers = vec![(Bytes::from_static(b"h"), Bytes::from_static(b"v"))];
        assert_eq!(check_record_inputs(&[record.clone()], MAX_FRAME), Ok(()));
        record.key = Some(Bytes::new());
        let error = check_record_inputs(&[record], MAX_FRAME).unwrap_err();
        assert_eq!((error.bytes, error.max), (max as u64 + 4, max as u32));
    }
}
