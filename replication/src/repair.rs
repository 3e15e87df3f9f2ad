//! A replica whose partition log lost records gets them back from a peer.
//!
//! A partition's records are stored once, in its segment log; the Raft
//! rows only say where each entry's batch is. When the log opens short of
//! what its rows name, the replica is missing acknowledged records:
//!
//! - a batch whose CRC fails at open (a flipped bit, a bad sector): the
//!   log is cut back to the batch before it (`PartitionRaftLog::open`),
//!   so a damaged record is never served or replicated;
//! - a tail lost after it was fsynced (a disk that lied about a flush).
//!
//! Such a replica does not start its Raft group (it would vote and could
//! lead with a hole): [`fill_from_peers`] first asks its peers for the
//! missing range on their Raft ports (the service `records/<group>`,
//! [`RecordSource`]), and appends what they send exactly as they store it
//! (same offsets, ids and timestamps; each batch's CRC checked, and each
//! batch must be the one this replica's rows name: same base offset and
//! record count). A peer sends only what it has committed, so no
//! uncommitted tail of another history is ever taken.
//!
//! Damaged entries that, by every peer's answer, fewer than a quorum of
//! members can hold (this replica's uncommitted tail) were never
//! committed: the replica cuts their rows, as Raft cuts an uncommitted
//! tail, instead of waiting for records no peer will send.
//!
//! What it does not cover: damage that the open does not see (a sealed
//! segment whose index files pass their checks is not re-read at open;
//! a read meets the damage later and reports it), and records that every
//! peer has already deleted by retention (the replica then stays stopped,
//! with the error in its log).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::network::{ask, decode, encode, GroupHandler, RaftRouter};
use crate::partition::{PartitionRaftLog, PartitionStateMachine, Payload};

/// The Raft port's service name that serves group `group`'s records.
pub fn records_service(group: &str) -> String {
    format!("records/{group}")
}

/// Asks a peer for committed records from `from` on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RecordsRequest {
    /// The first offset wanted (a batch boundary).
    pub from: u64,
    /// About this many bytes of batches (at least one batch if any).
    pub max_bytes: u32,
}

/// A peer's answer to a [`RecordsRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RecordsReply {
    /// Whole committed batches from `from` (none: the peer has nothing
    /// committed there yet), with what the peer holds.
    Batches {
        /// The first offset its log still stores.
        start: u64,
        /// Every record below it is committed on the peer.
        committed_end: u64,
        /// Its log's end, committed or not.
        #[serde(default)]
        log_end: u64,
        /// The batches, as its log stores them.
        batches: Vec<Payload>,
    },
    /// It could not read them (the message says why).
    Failed(String),
}

/// One replica's side of the `records/<group>` service.
pub struct RecordSource {
    machine: PartitionStateMachine,
}

impl RecordSource {
    /// Serves the committed records of `machine`'s replica on `router` as
    /// group `group`'s record service, until the group is unregistered
    /// ([`RaftRouter::unregister`] removes it too).
    pub fn serve(router: &RaftRouter, group: &str, machine: PartitionStateMachine) {
        router.register_handler(
            &records_service(group),
            Arc::new(RecordSource { machine }) as Arc<dyn GroupHandler>,
        );
    }

    fn answer(&self, request: RecordsRequest) -> RecordsReply {
        let log = self.machine.log();
        let committed_end = self.machine.committed_end();
        let log_end = log.end_offset();
        let start = match log.start_offset() {
            Ok(start) => start,
            Err(error) => return RecordsReply::Failed(error.to_string()),
        };
        if request.from < start || request.from >= committed_end {
            return RecordsReply::Batches {
                start,
                committed_end,
                log_end,
                batches: Vec::new(),
            };
        }
        let max_bytes = (request.max_bytes as usize).min(FETCH_BYTES_MAX);
        match log.committed_batches(request.from, committed_end, max_bytes) {
            Ok(batches) => RecordsReply::Batches {
                start,
                committed_end,
                log_end,
                batches: batches.into_iter().map(Payload).collect(),
            },
            Err(error) => RecordsReply::Failed(error.to_string()),
        }
    }
}

impl GroupHandler for RecordSource {
    fn handle<'a>(
        &'a self,
        body: bytes::Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>>
    {
        Box::pin(async move {
            let request: RecordsRequest = decode(&body)?;
            let reply = crate::log_store::blocking(|| self.answer(request));
            encode(&reply)
        })
    }
}

/// Bytes of batches asked for per request (a reply stays well within the
/// Raft port's frame limit).
pub const FETCH_BYTES: u32 = 4 << 20;
/// The most a source sends per reply, whatever it is asked.
const FETCH_BYTES_MAX: usize = 16 << 20;
/// How long one peer gets to answer one request.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before asking every peer again.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Why a replica could not get its missing records back.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// No peer sent them within the time allowed (each peer's last
    /// answer, or why it gave none).
    #[error(
        "records [{from}, {to}) of {group} are damaged or missing here and no peer sent them \
         within {waited:?} ({why}); the replica stays stopped until a restart finds a peer \
         that has them"
    )]
    NoPeerHasThem {
        /// The group.
        group: String,
        /// The first missing offset.
        from: u64,
        /// The end the rows name.
        to: u64,
        /// How long it tried without progress.
        waited: Duration,
        /// What the peers answered.
        why: String,
    },
}

/// How many records and batches a repair took from peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Records appended.
    pub records: u64,
    /// Batches appended.
    pub batches: u64,
}

/// Fills `log`'s missing records ([`PartitionRaftLog::missing`]) from
/// `peers` (their Raft addresses), connecting from `source` if set.
/// Returns once the log is whole; gives up after `patience` without
/// progress. Every batch appended is durable before the next request.
pub async fn fill_from_peers(
    log: &PartitionRaftLog,
    group: &str,
    peers: &[String],
    source: Option<std::net::IpAddr>,
    patience: Duration,
) -> Result<Filled, RepairError> {
    let service = records_service(group);
    let mut filled = Filled::default();
    let mut last_progress = Instant::now();
    let mut why = String::from("no peer");
    while let Some(missing) = log.missing() {
        let mut progressed = false;
        // Peers that answered this round, and those whose log reaches
        // past the missing start (they may hold the entry there).
        let (mut answered, mut may_hold) = (0, 0);
        for peer in peers {
            let Some(missing) = log.missing() else { break };
            let request = RecordsRequest {
                from: missing.start,
                max_bytes: FETCH_BYTES,
            };
            let reply = match encode(&request) {
                Ok(body) => ask(peer, source, &service, &body, ASK_TIMEOUT)
                    .await
                    .and_then(|reply| decode::<RecordsReply>(&reply)),
                Err(error) => Err(error),
            };
            if let Ok(RecordsReply::Batches { log_end, .. }) = &reply {
                answered += 1;
                if *log_end > missing.start {
                    may_hold += 1;
                }
            }
            match reply {
                Ok(RecordsReply::Batches { batches, .. }) if !batches.is_empty() => {
                    let count = batches.len() as u64;
                    let stored: Vec<Bytes> = batches.into_iter().map(|batch| batch.0).collect();
                    let appended = crate::log_store::blocking(|| log.fill_missing(stored));
                    match appended {
                        Ok(end) => {
                            filled.records += end - missing.start;
                            filled.batches += count;
                            progressed = true;
                        }
                        Err(error) => why = format!("{peer}: {error}"),
                    }
                }
                Ok(RecordsReply::Batches { start, .. })
                    if start > missing.start && log.start_offset().ok() == Some(missing.start) =>
                {
                    // The peer's first records went by retention: an empty
                    // log starts where the peer's does.
                    match crate::log_store::blocking(|| log.restart_empty_at(start)) {
                        Ok(()) => progressed = true,
                        Err(error) => why = format!("{peer}: {error}"),
                    }
                }
                Ok(RecordsReply::Batches {
                    start,
                    committed_end,
                    ..
                }) => {
                    why = format!(
                        "{peer} stores [{start}, {committed_end}) committed, not {}",
                        missing.start
                    );
                }
                Ok(RecordsReply::Failed(error)) => why = format!("{peer}: {error}"),
                Err(error) => why = format!("{peer}: {error}"),
            }
        }
        if progressed {
            last_progress = Instant::now();
            continue;
        }
        // Every peer answered and too few may hold what is missing: with
        // this replica, fewer than a quorum of members ever had it, so it
        // was never committed (nor acknowledged). This replica gives it up
        // as Raft would cut an uncommitted tail, instead of waiting for
        // records no peer will ever send.
        let members = peers.len() + 1;
        if !peers.is_empty() && answered == peers.len() && 1 + may_hold < members / 2 + 1 {
            match crate::log_store::blocking(|| log.drop_missing_from(missing.start)) {
                Ok(()) => {
                    tracing::warn!(
                        group,
                        from = missing.start,
                        to = missing.end,
                        "damaged entries no quorum ever held were given up (never committed)"
                    );
                    last_progress = Instant::now();
                    continue;
                }
                Err(error) => why = format!("giving up an uncommitted tail: {error}"),
            }
        }
        if last_progress.elapsed() >= patience {
            return Err(RepairError::NoPeerHasThem {
                group: group.to_string(),
                from: missing.start,
                to: missing.end,
                waited: last_progress.elapsed(),
                why,
            });
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
    Ok(filled)
}
