//! The 64-byte header at the start of every index file.
//!
//! Owns the on-disk header layout (all little-endian):
//!
//! ```text
//! 0   u32  magic = 0x5844_4D44 (bytes "DMDX")
//! 4   u16  format version = 1
//! 6   u16  kind: 1 offset, 2 time, 3 id, 4 key
//! 8   u64  segment base offset
//! 16  u64  segment_bytes (set at seal; 0 while active)
//! 24  u32  entry_count (set at seal)
//! 28  u32  flags: bit0 = sealed; other bits must be zero
//! 32  u32  crc32 over bytes [0..32) followed by the entry region
//! 36  ..64 reserved, must be zero
//! ```
//!
//! Invariants: [`IndexHeader::decode`] accepts exactly the byte strings that
//! [`IndexHeader::encode`] can produce (known kind, known version, no unknown
//! flag bits, zero reserved bytes), so that every bit of a sealed file is
//! either covered by the CRC or checked structurally.

/// Length in bytes of the header at the start of every index file.
pub const INDEX_HEADER_LEN: usize = 64;

/// Magic number at byte 0; on disk the bytes read "DMDX".
pub(crate) const MAGIC: u32 = 0x5844_4D44;
/// The only format version this crate reads and writes.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Number of leading header bytes covered by the CRC.
pub(crate) const CRC_COVERED_HEADER_LEN: usize = 32;

const FLAG_SEALED: u32 = 1;

/// Which index a file holds; persisted as a `u16`, numbers never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IndexKind {
    /// Sparse relative offset -> byte position.
    Offset = 1,
    /// Max timestamp -> relative offset.
    Time = 2,
    /// Message id -> relative offset.
    Id = 3,
    /// Key hash -> relative offset.
    Key = 4,
}

impl IndexKind {
    fn from_u16(value: u16) -> Option<Self> {
        match value {
            1 => Some(IndexKind::Offset),
            2 => Some(IndexKind::Time),
            3 => Some(IndexKind::Id),
            4 => Some(IndexKind::Key),
            _ => None,
        }
    }
}

/// Decoded form of the 64-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexHeader {
    pub kind: IndexKind,
    pub base_offset: u64,
    pub segment_bytes: u64,
    pub entry_count: u32,
    pub sealed: bool,
    pub crc: u32,
}

impl IndexHeader {
    /// Header of a fresh active index: unsealed, zero count, zero CRC (the
    /// format of older versions' active files, which never open as sealed).
    #[cfg(test)]
    pub fn active(kind: IndexKind, base_offset: u64) -> Self {
        IndexHeader {
            kind,
            base_offset,
            segment_bytes: 0,
            entry_count: 0,
            sealed: false,
            crc: 0,
        }
    }

    /// Encodes to the exact on-disk bytes.
    pub fn encode(&self) -> [u8; INDEX_HEADER_LEN] {
        let mut out = [0u8; INDEX_HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.base_offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.segment_bytes.to_le_bytes());
        out[24..28].copy_from_slice(&self.entry_count.to_le_bytes());
        let flags = if self.sealed { FLAG_SEALED } else { 0 };
        out[28..32].copy_from_slice(&flags.to_le_bytes());
        out[32..36].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// Decodes and structurally checks a header. Does not check the CRC
    /// (that needs the entry region); see [`crc32`]. The error is a reason
    /// string for [`crate::IndexError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let Some(bytes) = bytes.get(..INDEX_HEADER_LEN) else {
            return Err(format!(
                "file is {} bytes, shorter than the {INDEX_HEADER_LEN}-byte header",
                bytes.len()
            ));
        };
        let magic = read_u32(bytes, 0);
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#010x}"));
        }
        let version = read_u16(bytes, 4);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        let kind_raw = read_u16(bytes, 6);
        let kind =
            IndexKind::from_u16(kind_raw).ok_or_else(|| format!("unknown kind {kind_raw}"))?;
        let flags = read_u32(bytes, 28);
        if flags & !FLAG_SEALED != 0 {
            return Err(format!("unknown flag bits {flags:#x}"));
        }
        if bytes[36..INDEX_HEADER_LEN].iter().any(|&b| b != 0) {
            return Err("reserved header bytes are not zero".to_string());
        }
        Ok(IndexHeader {
            kind,
            base_offset: read_u64(bytes, 8),
            segment_bytes: read_u64(bytes, 16),
            entry_count: read_u32(bytes, 24),
            sealed: flags & FLAG_SEALED != 0,
            crc: read_u32(bytes, 32),
        })
    }
}

/// CRC-32 (crc32fast) over the first 32 header bytes followed by `entries`.
pub(crate) fn crc32(header: &[u8; INDEX_HEADER_LEN], entries: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..CRC_COVERED_HEADER_LEN]);
    hasher.update(entries);
    hasher.finalize()
}

/// Little-endian `u16` at `at`. Panics only on an internal bounds bug.
pub(crate) fn read_u16(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

/// Little-endian `u32` at `at`. Panics only on an internal bounds bug.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

/// Little-endian `u64` at `at`. Panics only on an internal bounds bug.
pub(crate) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Little-endian `i64` at `at`. Panics only on an internal bounds bug.
pub(crate) fn read_i64(bytes: &[u8], at: usize) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    i64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IndexHeader {
        IndexHeader {
            kind: IndexKind::Key,
            base_offset: 0x0102_0304_0506_0708,
            segment_bytes: 1 << 40,
            entry_count: 77,
            sealed: true,
            crc: 0xDEAD_BEEF,
        }
    }

    #[test]
    fn round_trip() {
        for kind in [
            IndexKind::Offset,
            IndexKind::Time,
            IndexKind::Id,
            IndexKind::Key,
        ] {
            for sealed in [false, true] {
                let header = IndexHeader {
                    kind,
                    sealed,
                    ..sample()
                };
                assert_eq!(IndexHeader::decode(&header.encode()), Ok(header));
            }
        }
    }

    #[test]
    fn layout_is_little_endian_and_fixed() {
        let bytes = sample().encode();
        assert_eq!(&bytes[0..4], b"DMDX");
        assert_eq!(bytes[4..6], [1, 0]);
        assert_eq!(bytes[6..8], [4, 0]);
        assert_eq!(bytes[8..16], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[24..28], [77, 0, 0, 0]);
        assert_eq!(bytes[28..32], [1, 0, 0, 0]);
        assert_eq!(bytes[32..36], [0xEF, 0xBE, 0xAD, 0xDE]);
        assert!(bytes[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_fields() {
        let good = sample().encode();
        let cases: [(usize, u8); 6] = [(0, 0), (4, 2), (6, 9), (6, 0), (28, 2), (40, 1)];
        for (at, value) in cases {
            let mut bad = good;
            bad[at] = value;
            assert!(IndexHeader::decode(&bad).is_err(), "byte {at} = {value}");
        }
        for len in 0..INDEX_HEADER_LEN {
            assert!(IndexHeader::decode(&good[..len]).is_err());
        }
    }

    #[test]
    fn crc_covers_first_32_bytes_and_entries() {
        let header = sample().encode();
        let base = crc32(&header, b"entries");
        let mut other = header;
        other[31] ^= 1;
        assert_ne!(crc32(&other, b"entries"), base);
        let mut crc_field_changed = header;
        crc_field_changed[32] ^= 1;
        assert_eq!(crc32(&crc_field_changed, b"entries"), base);
        assert_ne!(crc32(&header, b"entrieS"), base);
    }
}
