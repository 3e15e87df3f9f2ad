//! One home for the names of topics, groups and members: what a valid name
//! is, the names derived from them (dead-letter topics, ack journals), the
//! internal prefix, the header names the dispatcher reserves, and the
//! reasons a dead-letter copy names.
//!
//! Every entry point (the protocol, the admin API, the dispatcher) checks
//! names here, **before** anything is journaled: a name accepted once is
//! never refused when the metadata journal is replayed.
//!
//! Rules:
//! - a name is 1 to [`NAME_LEN_MAX`] bytes of `A-Z a-z 0-9 . _ -`, and is
//!   neither `.` nor `..` (both would be directories on disk);
//! - names starting with [`INTERNAL_PREFIX`] belong to the broker (the
//!   delay store's timer log `__dmq_delay`): no client creates, produces
//!   to or subscribes to them;
//! - a group's derived names must be valid too: its default dead-letter
//!   topic `<topic>.<group>.dlq` (unless the group names its own) and its
//!   ack journal `group.<topic>.<group>[.<member>]`, at most
//!   [`JOURNAL_NAME_LEN_MAX`] bytes;
//! - a failed attempt's reason (also the `dmq.dlq.reason` header) is one of
//!   the `REASON_*` constants, at most [`REASON_LEN_MAX`] bytes.

/// Longest topic, group or member name, in bytes.
pub const NAME_LEN_MAX: usize = 100;
/// Longest journal name (the file name adds `.journal.tmp`: 252 of the
/// 255 bytes a file name may have).
pub const JOURNAL_NAME_LEN_MAX: usize = 240;
/// Topics whose name starts with this are the broker's own.
pub const INTERNAL_PREFIX: &str = "__";
/// Headers of a dead-lettered copy start with this.
pub const DEAD_LETTER_HEADER_PREFIX: &str = "dmq.dlq.";
/// Headers of the delay store's timer log start with this; clients may not
/// set them.
pub const DELAY_HEADER_PREFIX: &str = "dmq.delay.";
/// Headers of the transaction store's half log start with this; clients
/// may not set them.
pub const TXN_HEADER_PREFIX: &str = "dmq.txn.";
/// Prefix of a group's ack journal name.
pub const GROUP_JOURNAL_PREFIX: &str = "group.";

/// Why an attempt failed (the reason of a `Redelivered` event, and the
/// `dmq.dlq.reason` header of a dead-letter copy): the ack deadline passed.
pub const REASON_ACK_TIMEOUT: &str = "ack timeout";
/// Why an attempt failed: the consumer sent NACK.
pub const REASON_NACK: &str = "nack";
/// Why an attempt failed: the member holding it left its group.
pub const REASON_MEMBER_LEFT: &str = "member left";
/// Longest reason, in bytes. The protocol's maximum record size reserves
/// room for a dead-letter copy's headers with a reason this long
/// (`dmq_protocol::limits::DEAD_LETTER_REASON_BYTES_MAX`, the same
/// number): a new reason must stay within it.
pub const REASON_LEN_MAX: usize = 32;

const _: () = assert!(
    REASON_ACK_TIMEOUT.len() <= REASON_LEN_MAX
        && REASON_NACK.len() <= REASON_LEN_MAX
        && REASON_MEMBER_LEFT.len() <= REASON_LEN_MAX
);

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, too long, `.`/`..`, or a byte outside `A-Z a-z 0-9 . _ -`.
    #[error("invalid {what} name {shown}: use 1 to {NAME_LEN_MAX} of A-Z a-z 0-9 . _ - (not \".\" or \"..\")")]
    Invalid {
        /// "topic", "group", "member".
        what: &'static str,
        /// The name, shortened for messages.
        shown: String,
    },
    /// A topic name with the internal prefix.
    #[error("topic name {shown} is reserved: names starting with \"__\" belong to the broker")]
    Internal {
        /// The name, shortened for messages.
        shown: String,
    },
    /// A derived name (dead-letter topic, journal) would be invalid.
    #[error("{what} {shown} would be {len} bytes (max {max}): {advice}")]
    DerivedTooLong {
        /// What is derived.
        what: &'static str,
        /// The derived name, shortened.
        shown: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
        /// What to do.
        advice: &'static str,
    },
}

/// Most characters of caller input an error message repeats.
pub const SHOWN_CHARS_MAX: usize = 120;

/// `text` quoted for an error message, cut after [`SHOWN_CHARS_MAX`]
/// characters with an ellipsis: how every error repeats caller input (the
/// protocol's, the admin API's), so a 64 KB name never comes back whole.
pub fn shown(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS_MAX).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// 1 to `len_max` bytes of `A-Z a-z 0-9 . _ -`, neither `.` nor `..`:
/// a name that is also a safe file name (storage uses it for files).
pub(crate) fn is_plain(name: &str, len_max: usize) -> bool {
    !name.is_empty()
        && name.len() <= len_max
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_part(what: &'static str, name: &str) -> Result<(), NameError> {
    if is_plain(name, NAME_LEN_MAX) {
        Ok(())
    } else {
        Err(NameError::Invalid {
            what,
            shown: shown(name),
        })
    }
}

/// True if a header of this name is reserved for the broker: clients and
/// operators may not set it (the delay store's `dmq.delay.*`, the
/// transaction store's `dmq.txn.*`).
pub fn is_reserved_header(name: &[u8]) -> bool {
    name.starts_with(DELAY_HEADER_PREFIX.as_bytes())
        || name.starts_with(TXN_HEADER_PREFIX.as_bytes())
}

/// Refuses records that set a reserved header: the one check (and the one
/// wording) of every produce path, the broker's pipeline and
/// `Dispatcher::produce_routed` alike.
pub fn check_headers<'a>(
    records: impl IntoIterator<Item = &'a [(bytes::Bytes, bytes::Bytes)]>,
) -> Result<(), String> {
    let reserved = records
        .into_iter()
        .any(|headers| headers.iter().any(|(name, _)| is_reserved_header(name)));
    if reserved {
        return Err(format!(
            "headers starting with {DELAY_HEADER_PREFIX:?} or {TXN_HEADER_PREFIX:?} are reserved for the broker"
        ));
    }
    Ok(())
}

/// True for the broker's own topics.
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with(INTERNAL_PREFIX)
}

/// A topic name a client or an operator may create or use.
pub fn check_topic(name: &str) -> Result<(), NameError> {
    check_part("topic", name)?;
    if is_internal(name) {
        return Err(NameError::Internal { shown: shown(name) });
    }
    Ok(())
}

/// `<topic>.<group>.dlq`: a group's dead-letter topic unless it names one.
pub fn default_dead_letter_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

/// The journal of a cluster topic's deletions (its tombstones), shared by
/// every node: named like a group's journal, under a group name no client
/// can take (`__` is reserved), so that it is replicated with the topic's
/// groups and removed with the topic.
pub fn tombstone_journal(topic: &str) -> String {
    group_journal(topic, TOMBSTONE_JOURNAL_GROUP, None)
}

/// The reserved group name of [`tombstone_journal`].
pub const TOMBSTONE_JOURNAL_GROUP: &str = "__tombstones";

/// The topic whose [`tombstone_journal`] `journal` is, if it is one.
pub fn tombstone_journal_topic(journal: &str) -> Option<&str> {
    journal
        .strip_prefix(GROUP_JOURNAL_PREFIX)?
        .strip_suffix(TOMBSTONE_JOURNAL_GROUP)?
        .strip_suffix('.')
}

/// The ack journal of a group (`member`: a broadcast member's own).
pub fn group_journal(topic: &str, group: &str, member: Option<&str>) -> String {
    match member {
        Some(member) => format!("{GROUP_JOURNAL_PREFIX}{topic}.{group}.{member}"),
        None => format!("{GROUP_JOURNAL_PREFIX}{topic}.{group}"),
    }
}

/// A group of `topic` with an optional dead-letter topic of its own: the
/// group name, the dead-letter topic (configured or derived) and the ack
/// journal name are all valid.
pub fn check_group(topic: &str, group: &str, dead_letter: Option<&str>) -> Result<(), NameError> {
    check_part("group", group)?;
    match dead_letter {
        Some(dead_letter) => check_topic(dead_letter)?,
        None => {
            let derived = default_dead_letter_topic(topic, group);
            if derived.len() > NAME_LEN_MAX {
                return Err(NameError::DerivedTooLong {
                    what: "the dead-letter topic",
                    shown: shown(&derived),
                    len: derived.len(),
                    max: NAME_LEN_MAX,
                    advice: "use a shorter group name or set the group's dead-letter topic",
                });
            }
        }
    }
    check_journal(&group_journal(topic, group, None))
}

/// A broadcast member's name, and its ack journal's.
pub fn check_member(topic: &str, group: &str, member: &str) -> Result<(), NameError> {
    check_part("member", member)?;
    check_journal(&group_journal(topic, group, Some(member)))
}

fn check_journal(journal: &str) -> Result<(), NameError> {
    if journal.len() > JOURNAL_NAME_LEN_MAX {
        return Err(NameError::DerivedTooLong {
            what: "the ack journal",
            shown: shown(journal),
            len: journal.len(),
            max: JOURNAL_NAME_LEN_MAX,
            advice: "use shorter topic, group or member names",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_journal_names_its_topic_and_no_group_journal_does() {
        for topic in ["orders", "a.b", "x.__tombstones"] {
            assert_eq!(
                tombstone_journal_topic(&tombstone_journal(topic)),
                Some(topic)
            );
        }
        assert_eq!(
            tombstone_journal_topic(&group_journal("orders", "billing", None)),
            None
        );
        assert_eq!(tombstone_journal_topic("group.__tombstones"), None);
        assert_eq!(tombstone_journal_topic("meta"), None);
    }

    #[test]
    fn reserved_headers_are_refused_in_any_record() {
        use bytes::Bytes;
        let plain = vec![(Bytes::from_static(b"trace-id"), Bytes::from_static(b"1"))];
        let reserved = vec![(Bytes::from_static(b"dmq.delay.topic"), Bytes::new())];
        assert!(check_headers([plain.as_slice(), plain.as_slice()]).is_ok());
        let refusal = check_headers([plain.as_slice(), reserved.as_slice()]).unwrap_err();
        assert!(refusal.contains("dmq.delay."), "{refusal}");
        assert!(check_headers(std::iter::empty()).is_ok());
    }

    #[test]
    fn topic_names_at_and_past_every_limit() {
        assert!(check_topic("orders").is_ok());
        assert!(check_topic(&"a".repeat(NAME_LEN_MAX)).is_ok());
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "a/b".into(),
            "a b".into(),
            "é".into(),
            "a".repeat(NAME_LEN_MAX + 1),
            "__dmq_delay".into(),
            "__x".into(),
        ] {
            assert!(check_topic(&bad).is_err(), "{bad:?}");
        }
        // `...` and names with dots inside are fine (not a directory alias).
        assert!(check_topic("...").is_ok());
        assert!(check_topic("_single").is_ok());
    }

    #[test]
    fn group_names_are_checked_with_what_they_derive() {
        let topic = "t".repeat(94);
        // `<94>.g.dlq` is 100 bytes: fine.
        assert!(check_group(&topic, "g", None).is_ok());
        // One byte more is not, unless the group names its dead-letter topic.
        let error = check_group(&topic, "gg", None).unwrap_err();
        assert!(matches!(error, NameError::DerivedTooLong { .. }), "{error}");
        assert!(check_group(&topic, "gg", Some("orders-dlq")).is_ok());
        assert!(check_group(&topic, "gg", Some("..")).is_err());
        assert!(check_group(&topic, "gg", Some("__dmq_delay")).is_err());
        assert!(check_group("t", "..", None).is_err());
        // The longest names still make a journal name a file can have.
        let long = "x".repeat(NAME_LEN_MAX);
        assert!(check_group(&long, &long, Some("d")).is_ok());
        assert!(check_member(&long, &long, "m").is_ok());
        assert!(check_member(&long, &long, &long).is_err());
        assert!(check_member("t", "g", ".").is_err());
    }

    #[test]
    fn shown_names_are_short() {
        let huge = "a".repeat(65_536);
        let message = check_topic(&huge).unwrap_err().to_string();
        assert!(message.len() < 300, "{message}");
        assert!(message.contains('…'), "{message}");
        let accents = shown("é".repeat(200).as_str());
        assert_eq!(
            accents.chars().filter(|c| *c == 'é').count(),
            SHOWN_CHARS_MAX
        );
        assert_eq!(shown("abc"), "\"abc\"");
    }
}
