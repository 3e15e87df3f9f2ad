//! The topic registry: who owns each topic, what it is for, whether it is
//! approved, and which client ids may produce to and consume from it.
//!
//! The registry is a JSON snapshot, `<data_dir>/registry.json`, plus a
//! journal of the changes made since, `<data_dir>/registry.journal`
//! (CRC-framed JSON entries, the dispatcher's [`FileJournal`] format). A
//! change is one journal entry, fdatasynced before it is answered: its
//! cost does not grow with the number of topics (a registry of 10,000
//! topics rewritten whole on every creation made creating them quadratic).
//! When the journal outgrows the snapshot, the snapshot is rewritten
//! (temporary file, fsync, rename, directory fsync) and the journal
//! emptied the same way. Replaying the whole journal over either snapshot
//! gives the same registry, so a crash between the two steps loses nothing.
//! A damaged journal entry followed by valid ones is refused at open, as a
//! damaged snapshot is; a torn last entry (a crash mid-write, never
//! answered) is cut.
//!
//! The registry holds the broker's view of a topic (metadata, status,
//! rights, defaults); the dispatcher holds its delivery state. At start the
//! broker reconciles the two (see `crate::topics`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use dmq_dispatcher::storage::{FileJournal, Journal};
use serde::{Deserialize, Serialize};

/// The registry's snapshot file inside the data directory.
pub const REGISTRY_FILE: &str = "registry.json";
/// The journal of changes since the snapshot.
pub const REGISTRY_JOURNAL_FILE: &str = "registry.journal";
/// The snapshot is rewritten when the journal is larger than it and than
/// this.
const JOURNAL_COMPACT_BYTES_MIN: u64 = 1 << 20;
/// Version of the file format.
const FORMAT_VERSION: u32 = 1;

/// A topic's approval status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicStatus {
    /// Registered, waiting for approval: no produce, no consume.
    Pending,
    /// In use.
    Approved,
    /// Stopped by an administrator: no produce, no consume; data kept.
    Disabled,
}

/// What an administrator asks of a topic's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// `POST /api/topics/{topic}/approve`: put the topic in use.
    Approve,
    /// `POST /api/topics/{topic}/disable`: stop its produce and consume.
    Disable,
}

impl StatusAction {
    /// The action's name in the admin API's paths.
    pub fn name(self) -> &'static str {
        match self {
            StatusAction::Approve => "approve",
            StatusAction::Disable => "disable",
        }
    }
}

impl TopicStatus {
    /// The status `action` leads to from this one, or `None` if this status
    /// forbids it. The one transition table (docs/admin-api.md, "Status
    /// transitions"): approve from pending or disabled, disable from
    /// approved; anything else, repeating an action included, is refused.
    pub fn after(self, action: StatusAction) -> Option<TopicStatus> {
        match (self, action) {
            (TopicStatus::Pending | TopicStatus::Disabled, StatusAction::Approve) => {
                Some(TopicStatus::Approved)
            }
            (TopicStatus::Approved, StatusAction::Disable) => Some(TopicStatus::Disabled),
            (TopicStatus::Approved, StatusAction::Approve)
            | (TopicStatus::Pending | TopicStatus::Disabled, StatusAction::Disable) => None,
        }
    }

    /// The status's name in the admin API (`pending`, `approved`,
    /// `disabled`).
    pub fn name(self) -> &'static str {
        match self {
            TopicStatus::Pending => "pending",
            TopicStatus::Approved => "approved",
            TopicStatus::Disabled => "disabled",
        }
    }
}

/// One registered topic (docs/admin-api.md, Topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    /// Full name, `<environment>.<department>.<short_name>` for topics
    /// registered through the admin API.
    pub name: String,
    /// Environment (e.g. `prod`).
    pub environment: String,
    /// Owning department.
    pub department: String,
    /// The last part of the name.
    pub short_name: String,
    /// Owner (a person or team).
    pub owner: String,
    /// What the topic carries.
    pub description: String,
    /// What the business uses it for.
    pub business_use: String,
    /// Approval status.
    pub status: TopicStatus,
    /// Partitions.
    pub partitions: u32,
    /// Per-key ordering.
    pub ordered: bool,
    /// Sealed segments older than this are deleted; `None`: kept.
    pub retention_hours: Option<u64>,
    /// Records produced without an expiry expire after this.
    pub default_ttl_ms: Option<u64>,
    /// Default attempts of groups that do not set theirs.
    pub max_attempts: u32,
    /// Default ack timeout of groups that do not set theirs.
    pub ack_timeout_ms: u64,
    /// Client ids allowed to produce.
    pub producers: Vec<String>,
    /// Client ids allowed to consume.
    pub consumers: Vec<String>,
    /// Registered at (ms since the epoch).
    pub created_ms: i64,
    /// Last changed at (ms since the epoch).
    pub updated_ms: i64,
}

impl TopicRecord {
    /// Ok if the topic may be used at all (approved), whoever asks.
    pub fn check_in_use(&self) -> Result<(), String> {
        match self.status {
            TopicStatus::Approved => Ok(()),
            TopicStatus::Pending => Err(format!("topic {:?} is not approved yet", self.name)),
            TopicStatus::Disabled => Err(format!("topic {:?} is disabled", self.name)),
        }
    }
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Produce to it.
    Produce,
    /// Consume from it (subscribe, fetch, seek, describe its groups).
    Consume,
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read or written.
    #[error("registry file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a registry.
    #[error("registry file {path} is damaged: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A topic of that name is registered.
    #[error("topic {0:?} is already registered")]
    Exists(String),
    /// No topic of that name is registered.
    #[error("topic {0:?} is not registered")]
    Unknown(String),
    /// The topic's status forbids the action (see [`TopicStatus::after`]).
    #[error(
        "topic {} is {}: {} is allowed only from {}",
        dmq_dispatcher::names::shown(topic),
        status.name(),
        action.name(),
        allowed_from(*action)
    )]
    StatusForbids {
        /// The topic.
        topic: String,
        /// Its status.
        status: TopicStatus,
        /// What was asked.
        action: StatusAction,
    },
}

/// The statuses `action` is allowed from, for messages.
fn allowed_from(action: StatusAction) -> String {
    let from: Vec<&str> = [
        TopicStatus::Pending,
        TopicStatus::Approved,
        TopicStatus::Disabled,
    ]
    .into_iter()
    .filter(|status| status.after(action).is_some())
    .map(TopicStatus::name)
    .collect();
    from.join(" or ")
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    /// CRC-32 of `topics` serialized compactly: a damaged value is refused
    /// even where the JSON still parses (a flipped digit). Absent in files
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<u32>,
    topics: Vec<TopicRecord>,
}

/// One journal entry: a change to one topic.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "lowercase")]
enum RegistryChange {
    /// The topic's record, new or changed.
    Put { topic: Box<TopicRecord> },
    /// The topic is forgotten.
    Remove { name: String },
}

/// The checksum of `topics` that [`RegistryFile::crc32`] holds.
fn topics_crc(topics: &[TopicRecord]) -> Result<u32, serde_json::Error> {
    Ok(crc32fast::hash(&serde_json::to_vec(topics)?))
}

/// The registry: in memory, persisted on every change.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    topics: BTreeMap<String, TopicRecord>,
    journal: FileJournal,
    /// Bytes of the snapshot file last written or read.
    snapshot_bytes: u64,
}

impl Registry {
    /// Opens `<data_dir>/registry.json` (an absent file is an empty
    /// registry).
    pub fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        let path = data_dir.join(REGISTRY_FILE);
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut snapshot_bytes = 0;
        let mut topics: BTreeMap<String, TopicRecord> = match std::fs::read(&path) {
            Ok(bytes) => {
                snapshot_bytes = bytes.len() as u64;
                let file: RegistryFile =
                    serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(RegistryError::Corrupt {
                        path,
                        reason: format!("unknown format version {}", file.version),
                    });
                }
                if let Some(expected) = file.crc32 {
                    let actual = topics_crc(&file.topics).map_err(|e| RegistryError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    if actual != expected {
                        return Err(RegistryError::Corrupt {
                            path,
                            reason: format!(
                                "checksum mismatch (stored {expected:08x}, computed \
                                 {actual:08x}): restore the file from a backup, or fix the \
                                 damaged value and remove the \"crc32\" line"
                            ),
                        });
                    }
                }
                file.topics
                    .into_iter()
                    .map(|topic| (topic.name.clone(), topic))
                    .collect()
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => return Err(io(error)),
        };
        let journal_path = data_dir.join(REGISTRY_JOURNAL_FILE);
        let (journal, changes) =
            FileJournal::open(REGISTRY_JOURNAL_FILE, &journal_path).map_err(|e| {
                RegistryError::Corrupt {
                    path: journal_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        for (i, change) in changes.iter().enumerate() {
            let change: RegistryChange =
                serde_json::from_slice(change).map_err(|e| RegistryError::Corrupt {
                    path: journal_path.clone(),
                    reason: format!("entry {i}: {e}"),
                })?;
            match change {
                RegistryChange::Put { topic } => {
                    topics.insert(topic.name.clone(), *topic);
                }
                RegistryChange::Remove { name } => {
                    topics.remove(&name);
                }
            }
        }
        Ok(Registry {
            path,
            topics,
            journal,
            snapshot_bytes,
        })
    }

    /// One topic.
    pub fn get(&self, name: &str) -> Option<&TopicRecord> {
        self.topics.get(name)
    }

    /// Every topic, by name.
    pub fn list(&self) -> Vec<TopicRecord> {
        self.topics.values().cloned().collect()
    }

    /// Registers a new topic, durably.
    pub fn insert(&mut self, record: TopicRecord) -> Result<(), RegistryError> {
        if self.topics.contains_key(&record.name) {
            return Err(RegistryError::Exists(record.name));
        }
        let name = record.name.clone();
        self.journal(&RegistryChange::Put {
            topic: Box::new(record.clone()),
        })?;
        self.topics.insert(name, record);
        self.compact_if_due();
        Ok(())
    }

    /// Changes a topic with `change`, durably; returns the new record.
    pub fn update(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut TopicRecord),
    ) -> Result<TopicRecord, RegistryError> {
        let after = self.preview_update(name, change)?;
        self.put(after.clone())?;
        Ok(after)
    }

    /// What [`Registry::update`] would make of a topic, changing nothing
    /// (its name stays).
    pub fn preview_update(
        &self,
        name: &str,
        change: impl FnOnce(&mut TopicRecord),
    ) -> Result<TopicRecord, RegistryError> {
        let record = self
            .topics
            .get(name)
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))?;
        let mut after = record.clone();
        change(&mut after);
        after.name = record.name.clone();
        Ok(after)
    }

    /// Registers `record` or replaces the topic's record, durably (a
    /// cluster topic's record as the cluster replicated it).
    pub fn put(&mut self, record: TopicRecord) -> Result<(), RegistryError> {
        self.journal(&RegistryChange::Put {
            topic: Box::new(record.clone()),
        })?;
        self.topics.insert(record.name.clone(), record);
        self.compact_if_due();
        Ok(())
    }

    /// Applies `action` to a topic's status, durably, if its status allows
    /// it ([`TopicStatus::after`]); `updated_ms` becomes `now_ms`. Returns
    /// the new record. A forbidden action is [`RegistryError::StatusForbids`]
    /// and changes nothing.
    pub fn change_status(
        &mut self,
        name: &str,
        action: StatusAction,
        now_ms: i64,
    ) -> Result<TopicRecord, RegistryError> {
        let after = self.preview_status(name, action, now_ms)?;
        self.put(after.clone())?;
        Ok(after)
    }

    /// What [`Registry::change_status`] would make of a topic, changing
    /// nothing.
    pub fn preview_status(
        &self,
        name: &str,
        action: StatusAction,
        now_ms: i64,
    ) -> Result<TopicRecord, RegistryError> {
        let status = self
            .topics
            .get(name)
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))?
            .status;
        let Some(next) = status.after(action) else {
            return Err(RegistryError::StatusForbids {
                topic: name.to_string(),
                status,
                action,
            });
        };
        self.preview_update(name, |record| {
            record.status = next;
            record.updated_ms = now_ms;
        })
    }

    /// Forgets a topic, durably; false if it was not registered.
    pub fn remove(&mut self, name: &str) -> Result<bool, RegistryError> {
        if !self.topics.contains_key(name) {
            return Ok(false);
        }
        self.journal(&RegistryChange::Remove {
            name: name.to_string(),
        })?;
        self.topics.remove(name);
        self.compact_if_due();
        Ok(true)
    }

    /// Whether `client_id` may use `topic` for `right`: the topic must be
    /// registered and approved, and the client listed. Dead-letter topics
    /// are not registered: pass their source topic.
    ///
    /// A client that is not listed gets [`Registry::refusal`], the same
    /// words whether the topic exists or not and whatever its status: it
    /// learns nothing of topics it may not use. A listed client learns why
    /// (not approved yet, disabled).
    pub fn allows(&self, topic: &str, client_id: &str, right: Right) -> Result<(), String> {
        let record = self
            .topics
            .get(topic)
            .ok_or_else(|| Registry::refusal(topic, client_id, right))?;
        let list = match right {
            Right::Produce => &record.producers,
            Right::Consume => &record.consumers,
        };
        if !list.iter().any(|id| id == client_id) {
            return Err(Registry::refusal(topic, client_id, right));
        }
        record.check_in_use()
    }

    /// The refusal a client gets for a topic it may not use, existing or
    /// not.
    pub fn refusal(topic: &str, client_id: &str, right: Right) -> String {
        let verb = match right {
            Right::Produce => "produce to",
            Right::Consume => "consume from",
        };
        format!(
            "client {} may not {verb} topic {}",
            dmq_dispatcher::names::shown(client_id),
            dmq_dispatcher::names::shown(topic)
        )
    }

    /// Makes one change durable (one journal entry, fdatasynced). On an
    /// error nothing changed: the in-memory registry is updated only after.
    fn journal(&mut self, change: &RegistryChange) -> Result<(), RegistryError> {
        let entry = serde_json::to_vec(change).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.journal.append(&entry);
        self.journal.sync().map_err(|e| RegistryError::Io {
            path: self.path.with_file_name(REGISTRY_JOURNAL_FILE),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Rewrites the snapshot and empties the journal once the journal has
    /// outgrown the snapshot. The change that triggered it is already
    /// durable in the journal: a failure here is logged and retried after
    /// the next change.
    fn compact_if_due(&mut self) {
        let journal_bytes = self.journal.size_bytes();
        if journal_bytes < JOURNAL_COMPACT_BYTES_MIN.max(self.snapshot_bytes) {
            return;
        }
        let compacted = self.save().and_then(|snapshot_bytes| {
            self.snapshot_bytes = snapshot_bytes;
            self.journal.rewrite(&[]).map_err(|e| RegistryError::Io {
                path: self.path.with_file_name(REGISTRY_JOURNAL_FILE),
                source: std::io::Error::other(e.to_string()),
            })
        });
        if let Err(error) = compacted {
            tracing::warn!(%error, "compacting the topic registry failed; retried later");
        }
    }

    /// Writes the whole registry as the snapshot: temp file, fsync, rename,
    /// fsync dir. Returns the snapshot's size.
    fn save(&self) -> Result<u64, RegistryError> {
        let io = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        let topics: Vec<TopicRecord> = self.topics.values().cloned().collect();
        let crc32 = topics_crc(&topics).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let file = RegistryFile {
            version: FORMAT_VERSION,
            crc32: Some(crc32),
            topics,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let temp = self.path.with_extension("json.tmp");
        {
            let mut out = std::fs::File::create(&temp).map_err(io)?;
            out.write_all(&bytes).map_err(io)?;
            out.sync_all().map_err(io)?;
        }
        std::fs::rename(&temp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io)?;
        }
        Ok(bytes.len() as u64)
    }
}

/// Checks one part of a generated topic name: 1 to 40 of `a-z 0-9 _ -`.
pub fn check_name_part(what: &str, part: &str) -> Result<(), String> {
    let valid = !part.is_empty()
        && part.len() <= 40
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1 to 40 of a-z 0-9 _ -, not {part:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> TopicRecord {
        TopicRecord {
            name: name.to_string(),
            environment: "prod".into(),
            department: "payments".into(),
            short_name: "paid".into(),
            owner: "alice".into(),
            description: String::new(),
            business_use: String::new(),
            status: TopicStatus::Pending,
            partitions: 2,
            ordered: false,
            retention_hours: Some(24),
            default_ttl_ms: None,
            max_attempts: 16,
            ack_timeout_ms: 30_000,
            producers: vec!["orders".into()],
            consumers: vec!["shipping".into()],
            created_ms: 1,
            updated_ms: 1,
        }
    }

    #[test]
    fn changes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        registry.insert(record("prod.payments.paid")).unwrap();
        assert!(matches!(
            registry.insert(record("prod.payments.paid")),
            Err(RegistryError::Exists(_))
        ));
        registry.insert(record("prod.payments.refunded")).unwrap();
        registry
            .update("prod.payments.paid", |t| t.status = TopicStatus::Approved)
            .unwrap();
        assert!(registry.remove("prod.payments.refunded").unwrap());
        assert!(!registry.remove("prod.payments.refunded").unwrap());
        drop(registry);
        let registry = Registry::open(dir.path()).unwrap();
        let names: Vec<_> = registry.list().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["prod.payments.paid"]);
        assert_eq!(
            registry.get("prod.payments.paid").unwrap().status,
            TopicStatus::Approved
        );
        assert!(!dir.path().join("registry.json.tmp").exists());
    }

    #[test]
    fn rights_need_approval_and_a_listed_client() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        registry.insert(record("t")).unwrap();
        assert!(registry.allows("t", "orders", Right::Produce).is_err());
        registry
            .update("t", |t| t.status = TopicStatus::Approved)
            .unwrap();
        assert!(registry.allows("t", "orders", Right::Produce).is_ok());
        assert!(registry.allows("t", "orders", Right::Consume).is_err());
        assert!(registry.allows("t", "shipping", Right::Consume).is_ok());
        assert!(registry.allows("t", "shipping", Right::Produce).is_err());
        assert!(registry.allows("other", "orders", Right::Produce).is_err());
        registry
            .update("t", |t| t.status = TopicStatus::Disabled)
            .unwrap();
        assert!(registry.allows("t", "orders", Right::Produce).is_err());
    }

    /// docs/admin-api.md, "Status transitions": approve from pending or
    /// disabled, disable from approved; every other action is refused and
    /// changes nothing, not even `updated_ms`.
    #[test]
    fn status_changes_follow_the_transition_table() {
        use StatusAction::{Approve, Disable};
        use TopicStatus::{Approved, Disabled, Pending};
        let table = [
            (Pending, Approve, Some(Approved)),
            (Pending, Disable, None),
            (Approved, Approve, None),
            (Approved, Disable, Some(Disabled)),
            (Disabled, Approve, Some(Approved)),
            (Disabled, Disable, None),
        ];
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        for (from, action, to) in table {
            assert_eq!(from.after(action), to, "{from:?} {action:?}");
            let name = format!("t-{}-{}", from.name(), action.name());
            registry
                .insert(TopicRecord {
                    status: from,
                    ..record(&name)
                })
                .unwrap();
            match (registry.change_status(&name, action, 7), to) {
                (Ok(changed), Some(to)) => {
                    assert_eq!((changed.status, changed.updated_ms), (to, 7));
                }
                (Err(RegistryError::StatusForbids { status, .. }), None) => {
                    assert_eq!(status, from);
                    let kept = registry.get(&name).unwrap();
                    assert_eq!((kept.status, kept.updated_ms), (from, 1));
                }
                (other, _) => panic!("{from:?} {action:?}: {other:?}"),
            }
        }
        let error = registry
            .change_status("t-approved-approve", Approve, 8)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "topic \"t-approved-approve\" is approved: approve is allowed only from \
             pending or disabled"
        );
        assert!(matches!(
            registry.change_status("nope", Approve, 8),
            Err(RegistryError::Unknown(_))
        ));
        drop(registry);
        let reopened = Registry::open(dir.path()).unwrap();
        assert_eq!(reopened.get("t-pending-approve").unwrap().status, Approved);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(REGISTRY_FILE), b"{\"version\":1,\"top").unwrap();
        assert!(matches!(
            Registry::open(dir.path()),
            Err(RegistryError::Corrupt { .. })
        ));
    }

    /// A byte flipped anywhere in the file: refused, or (whitespace, a
    /// key's case that serde still reads the same) the same registry.
    #[test]
    fn a_flipped_byte_anywhere_is_refused_or_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        registry.insert(record("prod.payments.paid")).unwrap();
        registry.insert(record("prod.payments.refunded")).unwrap();
        let expected = registry.list();
        // Both records in the snapshot, none in the journal.
        registry.save().unwrap();
        registry.journal.rewrite(&[]).unwrap();
        drop(registry);
        let path = dir.path().join(REGISTRY_FILE);
        let good = std::fs::read(&path).unwrap();
        let (mut refused, mut same) = (0, 0);
        for position in 0..good.len() {
            for flip in [0x01u8, 0x20] {
                let mut bytes = good.clone();
                bytes[position] ^= flip;
                std::fs::write(&path, &bytes).unwrap();
                match Registry::open(dir.path()) {
                    Err(RegistryError::Corrupt { .. }) => refused += 1,
                    Err(other) => panic!("flip at {position}: {other}"),
                    Ok(registry) => {
                        assert_eq!(
                            registry.list(),
                            expected,
                            "a flip at {position} changed the registry silently"
                        );
                        same += 1;
                    }
                }
            }
        }
        assert!(refused > good.len(), "{refused} refused, {same} harmless");
    }

    /// A change is one journal entry, not a rewrite of every topic; the
    /// snapshot is rewritten once the journal outgrows it, and a crash
    /// between the new snapshot and the emptied journal loses nothing.
    #[test]
    fn changes_are_journaled_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        for i in 0..10 {
            registry.insert(record(&format!("t{i}"))).unwrap();
        }
        assert!(!dir.path().join(REGISTRY_FILE).exists(), "no rewrite yet");
        registry
            .update("t3", |t| t.status = TopicStatus::Approved)
            .unwrap();
        assert!(registry.remove("t4").unwrap());
        let expected = registry.list();
        // A crash after the snapshot was written, before the journal was
        // emptied: replaying the journal over it gives the same registry.
        registry.save().unwrap();
        drop(registry);
        let mut registry = Registry::open(dir.path()).unwrap();
        assert_eq!(registry.list(), expected);
        // Enough changes to pass the compaction threshold.
        let mut changes = 0;
        while dir
            .path()
            .join(REGISTRY_JOURNAL_FILE)
            .metadata()
            .unwrap()
            .len()
            > 0
            || changes == 0
        {
            registry
                .update("t5", |t| t.description = format!("{changes:01000}"))
                .unwrap();
            changes += 1;
            assert!(changes < 10_000, "the journal was never compacted");
        }
        let expected = registry.list();
        drop(registry);
        assert_eq!(Registry::open(dir.path()).unwrap().list(), expected);
    }

    /// A damaged journal entry that valid entries follow is refused, as a
    /// damaged snapshot is: never an older registry without a word.
    #[test]
    fn a_damaged_journal_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(dir.path()).unwrap();
        for name in ["a", "b", "c"] {
            registry.insert(record(name)).unwrap();
        }
        drop(registry);
        let path = dir.path().join(REGISTRY_JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Registry::open(dir.path()),
            Err(RegistryError::Corrupt { .. })
        ));
    }

    #[test]
    fn name_parts() {
        assert!(check_name_part("department", "payments").is_ok());
        assert!(check_name_part("department", "Pay").is_err());
        assert!(check_name_part("department", "").is_err());
        assert!(check_name_part("department", "a.b").is_err());
    }
}
