//! Reading the local log back: every line of every stream file, the records of one session,
//! and the verification of every stream (with the chunks its recordings prove), shared by the
//! `vigil` CLI and the console.

use super::recording::ChunkReader;
use super::{log_files, stream_of};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use vigil_proto::record::Record;
use vigil_proto::verify::Verifier;

/// Calls `f(file, line number, bytes, terminated)` for every line of every stream file under
/// `path`; `terminated` is false only for a last line without its newline.
pub fn each_line(
    path: &Path,
    mut f: impl FnMut(&Path, usize, &[u8], bool),
) -> std::io::Result<Vec<PathBuf>> {
    let files = log_files(path)?;
    for file in &files {
        let mut reader = BufReader::new(std::fs::File::open(file)?);
        let mut line = Vec::with_capacity(1024);
        let mut n = 0;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            n += 1;
            match line.strip_suffix(b"\n") {
                Some(bytes) => f(file, n, bytes, true),
                None => f(file, n, &line, false),
            }
        }
    }
    Ok(files)
}

/// The directory of the log at `path` (a stream file or a directory of them): recording files
/// are named relative to it.
pub fn log_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    }
}

/// Verifies every stream file under `path`: each file must hold exactly one stream, whole. A
/// last line without its newline is judged by [`Verifier::push_unterminated`] (a torn tail is
/// reported, not failed). The chunk of every `recording` record is checked against its file.
pub fn verify_path(path: &Path) -> std::io::Result<(Verifier, usize)> {
    let mut verifier = Verifier::new();
    let mut chunks = ChunkReader::new(Some(log_dir(path)));
    let mut expected: Option<(PathBuf, String)> = None;
    let files = each_line(path, |file, n, bytes, terminated| {
        // The first record of a file names the stream the whole file must hold (the file's
        // name when that record cannot be read).
        if expected.as_ref().is_none_or(|(f, _)| f != file) {
            let stream = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("stream").and_then(|s| s.as_str()).map(str::to_string))
                .or_else(|| stream_of(file))
                .unwrap_or_default();
            expected = Some((file.to_path_buf(), stream));
        }
        let stream = expected.as_ref().map_or("", |(_, s)| s.as_str());
        let location = format!("{}:{n}", file.display());
        if terminated {
            verifier.push(&location, bytes, Some(stream));
        } else {
            verifier.push_unterminated(&location, bytes, stream);
        }
        chunks.check_line(&mut verifier, &location, bytes);
    })?;
    Ok((verifier, files.len()))
}

/// All records of sessions whose id starts with `prefix`, in log order.
pub fn session_records(path: &Path, prefix: &str) -> std::io::Result<Vec<Record>> {
    let mut out = Vec::new();
    each_line(path, |_, _, bytes, _| {
        if let Ok(r) = Record::parse(bytes) {
            if r.body
                .session
                .as_deref()
                .is_some_and(|s| s.starts_with(prefix))
            {
                out.push(r);
            }
        }
    })?;
    Ok(out)
}
