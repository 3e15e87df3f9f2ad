//! Per-segment indexes for the DMQ commit log.
//!
//! This crate knows nothing about the log's record format. Inside a
//! segment, offsets are `u32` relative offsets (offset minus the segment's
//! base offset) and byte positions are `u32`.
//!
//! # Layout
//!
//! - `header` — the 64-byte header shared by every index file (magic
//!   "DMDX", version, kind, base offset, segment bytes, count, sealed flag,
//!   CRC-32 over header and entries). [`INDEX_HEADER_LEN`].
//! - `mmap` — the only module with `unsafe`: read-only and read-write
//!   file mappings and `fallocate` preallocation, with their contract.
//! - `table` — a file of fixed-width entries behind the header: create,
//!   append through the mapping, seal (msync, truncate, fsync, remap
//!   read-only) and verified open. Shared by all four kinds.
//! - `offset` — [`OffsetIndex`]: sparse relative offset -> byte position.
//! - `time` — [`TimeIndex`]: maximum timestamp so far -> relative offset.
//! - `id` — [`IdIndexBuilder`] (in memory, active segment) and
//!   [`SealedIdIndex`]: exact 16-byte message id -> relative offset.
//! - `key` — [`KeyIndexBuilder`] and [`SealedKeyIndex`]: [`key_hash`] ->
//!   candidate relative offsets, to be verified against the record's key.
//! - `error` — [`IndexError`].
//!
//! # Life cycle
//!
//! While a segment is active its offset and time indexes are preallocated
//! files written through a mapping, and its id and key indexes live in
//! memory. At roll-over the caller seals all four; sealed files are
//! read-only, exactly sized and CRC-protected. Any index file that fails
//! verification on open is reported as [`IndexError::Corrupt`] and the
//! caller rebuilds it from the log. An unsealed file (crash while active)
//! never opens: the caller rebuilds it too.

// Tests may unwrap; library code may not (checked by the non-test clippy pass).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
mod header;
mod id;
mod key;
mod mmap;
mod offset;
mod table;
#[cfg(test)]
mod test_support;
mod time;

pub use error::IndexError;
pub use header::INDEX_HEADER_LEN;
pub use id::{IdIndexBuilder, SealedIdIndex};
pub use key::{key_hash, KeyIndexBuilder, SealedKeyIndex};
pub use offset::{OffsetEntry, OffsetIndex};
pub use time::{TimeEntry, TimeIndex};

/// A message id: 16 bytes, unique, stable for the message's whole life.
pub type MessageIdBytes = [u8; 16];
