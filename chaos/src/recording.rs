//! Recording files (the bytes of recorded chunks, next to the audit log) tampered with, for
//! tests that prove a replay, an export or `vigil audit verify` refuses what was altered.

use std::path::Path;
use vigil_proto::record::{ChunkStore, Record, Recording, SALT_LEN};

/// A chunk whose first byte was flipped in its recording file.
pub struct Flipped {
    /// The seq of the chunk's record.
    pub seq: u64,
    pub chunk: Recording,
    /// How `vigil replay` and `vigil recording export` name it when they refuse:
    /// `record seq N of stream S (channel C DIRECTION at offset 0)`.
    pub named: String,
}

/// Flips one bit of the first byte of the chunk that starts `session`'s recording file (right
/// after the file's salt), in the log directory `audit_dir` whose records are `records`.
pub fn flip_first_chunk(audit_dir: &Path, records: &[Record], session: &str) -> Flipped {
    let (chunk, record) = records
        .iter()
        .filter(|r| r.body.session.as_deref() == Some(session))
        .find_map(|r| {
            let chunk = r.body.recording.as_ref()?;
            matches!(chunk.store, ChunkStore::File { offset, .. } if offset == SALT_LEN as u64)
                .then_some((chunk, r))
        })
        .expect("a chunk right after the file's salt");
    let ChunkStore::File { path, .. } = &chunk.store else {
        unreachable!("matched above")
    };
    let file = audit_dir.join(path);
    let mut bytes = std::fs::read(&file).expect("the recording file");
    bytes[SALT_LEN] ^= 0x20;
    std::fs::write(&file, bytes).expect("the recording file is written");
    Flipped {
        seq: record.seq,
        chunk: chunk.clone(),
        named: format!(
            "record seq {} of stream {} (channel {} {} at offset 0)",
            record.seq, record.stream, chunk.channel, chunk.direction
        ),
    }
}
