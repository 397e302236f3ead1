//! Recorded chunks read back from their stores and proved by their records.
//!
//! A `recording` record proves one chunk of a channel's stream (its length and SHA-256); the
//! bytes are kept apart, in a file next to the stream or inline. Nothing here hands out a chunk
//! its record does not prove, and a session whose chunks do not follow on from each other is
//! refused as a whole: a recording with a chunk missing, altered or replaced shows something
//! else than what crossed the wire, whatever the other chunks hold.

use base64::Engine as _;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use vigil_proto::record::{ChunkStore, Kind, Record, Recording};
use vigil_proto::verify::{ChunkCheck, Verifier};

/// Reads chunks from their stores; each recording file is opened once.
pub struct ChunkReader {
    /// The directory the stream files are in (file stores are relative to it); `None` for a
    /// topic, which carries no files.
    dir: Option<PathBuf>,
    files: HashMap<PathBuf, File>,
}

impl ChunkReader {
    /// A reader of the chunks of the log in `dir`, or of a topic (`None`).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            files: HashMap::new(),
        }
    }

    /// The bytes of the chunk `rec` describes, once `rec` proves them; else why not.
    pub fn read(&mut self, rec: &Recording) -> Result<Vec<u8>, String> {
        let (salt, bytes) = match &rec.store {
            ChunkStore::Inline { data } => (
                Vec::new(),
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|e| format!("its inline data is not base64: {e}"))?,
            ),
            ChunkStore::File { path, offset } => {
                let salt = match rec.salted {
                    true => self.read_file(path, 0, vigil_proto::record::SALT_LEN as u64)?,
                    false => Vec::new(),
                };
                (salt, self.read_file(path, *offset, rec.length)?)
            }
        };
        if rec.proves(&salt, &bytes) {
            return Ok(bytes);
        }
        Err(match &rec.store {
            ChunkStore::Inline { .. } => {
                "its inline data does not hash to the recorded sha256".into()
            }
            ChunkStore::File { path, offset } => format!(
                "the {} bytes at offset {offset} of {path} do not hash to the recorded sha256 (the file was altered)",
                rec.length
            ),
        })
    }

    /// `length` bytes at `offset` of the recording file `path` (relative to the log's
    /// directory, and never outside it).
    fn read_file(&mut self, path: &str, offset: u64, length: u64) -> Result<Vec<u8>, String> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| format!("its bytes are in {path} on the node"))?;
        let rel = Path::new(path);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!(
                "its file {path:?} is not a path inside the log's directory"
            ));
        }
        let full = dir.join(rel);
        let shown = full.display().to_string();
        let file = match self.files.entry(full) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let file = File::open(e.key()).map_err(|err| {
                    if err.kind() == std::io::ErrorKind::NotFound {
                        format!("{shown} is missing")
                    } else {
                        format!("{shown}: {err}")
                    }
                })?;
                e.insert(file)
            }
        };
        let end = offset.saturating_add(length);
        let len = file.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
        if len < end {
            return Err(format!(
                "{shown} is short: {len} bytes, the chunk ends at byte {end}"
            ));
        }
        let mut bytes = vec![0; length as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(bytes)
    }

    /// For `vigil audit verify`: when `line` is a `recording` record, checks its chunk and
    /// reports it to `verifier`. From a topic, a chunk kept in a file is reported unchecked:
    /// its bytes stay on the node.
    pub fn check_line(&mut self, verifier: &mut Verifier, location: &str, line: &[u8]) {
        // Most records are not chunks: only those are parsed in full.
        let is_chunk = std::str::from_utf8(line).is_ok_and(|s| s.contains(r#""kind":"recording""#));
        let Some(r) = is_chunk.then(|| Record::parse(line).ok()).flatten() else {
            return;
        };
        let Some(rec) = r
            .body
            .recording
            .as_ref()
            .filter(|_| r.body.kind == Kind::Recording)
        else {
            return;
        };
        let check = match (&self.dir, &rec.store) {
            (None, ChunkStore::File { .. }) => ChunkCheck::Unchecked,
            _ => match self.read(rec) {
                Ok(_) => ChunkCheck::Verified,
                Err(e) => ChunkCheck::Failed(format!("{}: {e}", chunk_name(rec))),
            },
        };
        verifier.push_chunk(location, &r.stream, r.seq, check);
    }
}

/// `channel 1 output at offset 4096`.
pub fn chunk_name(rec: &Recording) -> String {
    format!(
        "channel {} {} at offset {}",
        rec.channel, rec.direction, rec.offset
    )
}

/// Checks that every chunk of a channel and direction starts where the ones before it ended.
#[derive(Default)]
pub struct Continuity {
    next: HashMap<(String, String), u64>,
}

impl Continuity {
    /// Takes `rec` as the next chunk of its channel and direction, or says why it is not.
    pub fn follow(&mut self, rec: &Recording) -> Result<(), String> {
        let next = self
            .next
            .entry((rec.channel.clone(), rec.direction.clone()))
            .or_default();
        if rec.offset != *next {
            return Err(format!(
                "it starts at offset {}, but the chunks before it end at {next} (a chunk record is missing or out of order)",
                rec.offset
            ));
        }
        *next = rec.offset.saturating_add(rec.length);
        Ok(())
    }
}

/// Decodes a byte stream that arrives in chunks as UTF-8: a character split between two chunks
/// is completed by the next one instead of being taken for invalid bytes.
#[derive(Default)]
pub struct Utf8Stream {
    /// The start of a character at the end of the last chunk.
    carry: Vec<u8>,
}

impl Utf8Stream {
    /// `bytes`, after what was carried over, as pieces: `f(text, invalid)` for each run of
    /// text and the bytes after it that are not UTF-8 (often none). An incomplete character at
    /// the end is kept for the next call.
    pub fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(&str, &[u8])) {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let mut pieces = buf.utf8_chunks().peekable();
        while let Some(piece) = pieces.next() {
            let invalid = piece.invalid();
            if pieces.peek().is_none() && incomplete(invalid) {
                f(piece.valid(), &[]);
                self.carry = invalid.to_vec();
            } else {
                f(piece.valid(), invalid);
            }
        }
    }

    /// The stream ended: bytes still carried over can never complete a character.
    pub fn finish(&mut self, mut f: impl FnMut(&str, &[u8])) {
        let rest = std::mem::take(&mut self.carry);
        if !rest.is_empty() {
            f("", &rest);
        }
    }

    /// [`Utf8Stream::feed`] as text, each run of bytes that are not UTF-8 replaced by U+FFFD.
    pub fn feed_lossy(&mut self, bytes: &[u8]) -> String {
        let mut text = String::new();
        self.feed(bytes, |valid, invalid| lossy(&mut text, valid, invalid));
        text
    }

    /// [`Utf8Stream::finish`] as text.
    pub fn finish_lossy(&mut self) -> String {
        let mut text = String::new();
        self.finish(|valid, invalid| lossy(&mut text, valid, invalid));
        text
    }
}

fn lossy(text: &mut String, valid: &str, invalid: &[u8]) {
    text.push_str(valid);
    if !invalid.is_empty() {
        text.push(char::REPLACEMENT_CHARACTER);
    }
}

/// Whether `bytes` are the beginning of a UTF-8 character that more bytes could complete.
fn incomplete(bytes: &[u8]) -> bool {
    !bytes.is_empty() && std::str::from_utf8(bytes).is_err_and(|e| e.error_len().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn chunk(direction: &str, offset: u64, bytes: &[u8], store: ChunkStore) -> Recording {
        Recording {
            channel: "1".into(),
            direction: direction.into(),
            offset,
            length: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            salted: false,
            store,
        }
    }

    #[test]
    fn a_character_split_between_chunks_is_completed_by_the_next() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.feed_lossy(b"caf\xc3"), "caf");
        assert_eq!(s.feed_lossy(b"\xa9 \xe2\x82"), "\u{e9} ");
        assert_eq!(s.feed_lossy(b"\xac!"), "\u{20ac}!");
        // Bytes that are not UTF-8 are replaced at once; an incomplete end only at the end.
        assert_eq!(s.feed_lossy(b"a\xffb\xf0\x9f"), "a\u{fffd}b");
        assert_eq!(s.finish_lossy(), "\u{fffd}");
        assert_eq!(s.finish_lossy(), "");
        let mut pieces = Vec::new();
        s.feed(b"x\xc3(", |v, i| pieces.push((v.to_string(), i.to_vec())));
        assert_eq!(pieces, [("x".into(), vec![0xc3]), ("(".into(), vec![])]);
    }

    #[test]
    fn chunks_are_read_only_when_their_record_proves_them() {
        let dir = std::env::temp_dir().join(format!("vigil-chunks-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("recordings")).unwrap();
        std::fs::write(dir.join("recordings/s.bin"), b"hello world").unwrap();
        let file = |offset| ChunkStore::File {
            path: "recordings/s.bin".into(),
            offset,
        };
        let mut r = ChunkReader::new(Some(dir.clone()));
        assert_eq!(
            r.read(&chunk("output", 0, b"world", file(6))).unwrap(),
            b"world"
        );
        let altered = r.read(&chunk("output", 0, b"World", file(6))).unwrap_err();
        assert!(altered.contains("do not hash"), "{altered}");
        let short = r.read(&chunk("output", 0, b"world!", file(6))).unwrap_err();
        assert!(short.contains("is short"), "{short}");
        let escape = ChunkStore::File {
            path: "../s.bin".into(),
            offset: 0,
        };
        let outside = r.read(&chunk("output", 0, b"x", escape)).unwrap_err();
        assert!(outside.contains("not a path inside"), "{outside}");
        let missing = ChunkStore::File {
            path: "recordings/gone.bin".into(),
            offset: 0,
        };
        assert!(r
            .read(&chunk("output", 0, b"x", missing))
            .unwrap_err()
            .ends_with("is missing"));
        let inline = ChunkStore::Inline {
            data: "aGk=".into(),
        };
        assert_eq!(r.read(&chunk("input", 0, b"hi", inline)).unwrap(), b"hi");
        std::fs::remove_dir_all(&dir).unwrap();

        let mut c = Continuity::default();
        let at = |offset, n: usize| chunk("output", offset, &vec![b'x'; n], file(0));
        assert!(c.follow(&at(0, 3)).is_ok() && c.follow(&at(3, 2)).is_ok());
        assert!(c.follow(&chunk("error", 0, b"e", file(0))).is_ok());
        assert!(c.follow(&at(9, 1)).unwrap_err().contains("end at 5"));
    }
}
