//! The coordinator's durable storage for openraft, in two redb files (a pure-Rust embedded
//! store): `raft.redb` holds the Raft log, the vote and the committed index (every commit that
//! Raft relies on is fsync'd before it is acknowledged); `state.redb` holds the applied state,
//! a row per object, written behind the applies.
//!
//! The state machine ([`State`]) is served from memory and read from `state.redb` on start;
//! openraft re-applies the committed entries after the state's last durable commit. A snapshot,
//! every `snapshot_after` entries, is a mark: a synced commit of the state file naming the
//! entry it reached, after which the log before it is purged, so neither file nor the restart
//! time grows without bound. The state's bytes are made only for a member that must install
//! them.

use crate::approvals::{Applied, Changed, Command, DomainError, State};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

openraft::declare_raft_types!(
    /// The coordinator's Raft types: commands of the approvals domain, replies of its apply.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// What applying one log entry answered: `None` for entries that carry no command (blank,
/// membership).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(pub Option<Result<Applied, DomainError>>);

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

fn io_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl ToString,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

/// The shape of what this version stores, kept in the store: 2 = approvals and grants keyed by
/// protocol and target, the state only in snapshots; 3 = the same, the applied state in a file
/// of its own (`state.redb`). A store of format 2 is read, and moved to format 3 when it is
/// opened (an earlier release, which reads format 2 only, then refuses it instead of missing
/// its state). A store without the mark but with state was written by format 1.
pub const STORE_FORMAT: u32 = 3;
/// The earliest format this version reads.
const OLDEST_FORMAT_READ: u32 = 2;
const FORMAT: &str = "format";

/// The store holds state of another format than this version reads.
#[derive(Debug, thiserror::Error)]
#[error(
    "the coordinator store {path} holds format {found} state, and this coordinator reads formats \
     {OLDEST_FORMAT_READ} to {STORE_FORMAT} only (approvals and grants are keyed by protocol and \
     target since format 2); \
     it will not read it as something else. Stop every member, move their data directories \
     away and form the cluster again (docs/operations.md, \"Upgrading the coordinator store\")"
)]
pub struct OtherFormat {
    pub path: std::path::PathBuf,
    pub found: u32,
}

/// Checks the store in `dir` (if any) was written in a format this version reads
/// ([`OLDEST_FORMAT_READ`] to [`STORE_FORMAT`]); [`open`] marks it with [`STORE_FORMAT`].
/// `discard`: a store of another format is deleted instead (the embedded single member, whose
/// pending approvals do not outlive an upgrade).
pub fn check_format(dir: &Path, discard: bool) -> anyhow::Result<()> {
    let path = dir.join("raft.redb");
    if !path.exists() {
        return Ok(());
    }
    let found = {
        let db = Database::create(&path)?;
        let tx = db.begin_read()?;
        let meta = match tx.open_table(META) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mark = match &meta {
            Some(t) => t
                .get(FORMAT)?
                .map(|v| serde_json::from_slice::<u32>(v.value())),
            None => None,
        };
        match mark {
            Some(v) => v?,
            None if meta.is_some_and(|t| t.first().ok().flatten().is_some()) => 1,
            None => STORE_FORMAT,
        }
    };
    if (OLDEST_FORMAT_READ..=STORE_FORMAT).contains(&found) {
        return Ok(());
    }
    let err = OtherFormat { path, found };
    if !discard {
        return Err(err.into());
    }
    tracing::warn!(error = %err, "discarding the embedded coordinator's store");
    std::fs::remove_file(&err.path)?;
    match std::fs::remove_file(dir.join(STATE_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Opens (or creates) the store in `dir`: the log in `raft.redb`, the state in `state.redb`.
/// Call [`check_format`] first.
pub async fn open(dir: &Path) -> StorageResult<(LogStore, StateMachine)> {
    let path = dir.to_path_buf();
    let (db, sm) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let dir = path;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let db = Database::create(dir.join("raft.redb")).map_err(|e| e.to_string())?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(LOG).map_err(|e| e.to_string())?;
        tx.open_table(META).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        write_meta(&db, FORMAT, &STORE_FORMAT)?;
        let sm = StateMachine::open(&dir, &db)?;
        // The state must reach at least as far as the log was purged: the entries before
        // that are gone, and could not be applied again.
        let purged: Option<LogId<NodeId>> = read_meta(&db, PURGED)?;
        let applied = sm
            .data
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last_applied;
        if purged.map(|l| l.index) > applied.map(|l| l.index) {
            return Err(format!(
                "the state in {} ends at entry {} but the log was purged up to entry {}: the \
                 state file is missing or older than the log; move this member's data directory \
                 away and let it rejoin (docs/operations.md)",
                dir.join(STATE_FILE).display(),
                applied.map_or(0, |l| l.index),
                purged.map_or(0, |l| l.index),
            ));
        }
        Ok((db, sm))
    })
    .await
    .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, e))?
    .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
    let db = Arc::new(db);
    let (writer, ops) = std::sync::mpsc::channel();
    {
        let db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_log(db, ops))
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
    }
    let log = LogStore {
        recent: Default::default(),
        committed: Default::default(),
        writer,
    };
    Ok((log, sm))
}

fn read_meta<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let table = tx.open_table(META).map_err(|e| e.to_string())?;
    match table.get(key).map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// Writes one metadata value durably (the commit returns after fsync).
fn write_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = tx.open_table(META).map_err(|e| e.to_string())?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    /// The newest entries, as appended: the leader replicates from here instead of reading
    /// back and decoding what it has just written.
    recent: Arc<std::sync::Mutex<Recent>>,
    /// The committed index as last told; written to disk with the next append.
    committed: Arc<std::sync::Mutex<Option<LogId<NodeId>>>>,
    /// The log writer thread (see [`write_log`]).
    writer: std::sync::mpsc::Sender<Op>,
}

/// Entries to write (index, encoded entry), the committed index to record with them, and who
/// to tell once they are on disk.
struct Append {
    rows: Vec<(u64, Vec<u8>)>,
    committed: Vec<u8>,
    flushed: LogFlushed<TypeConfig>,
}

/// Work for the log writer thread, done in the order it was queued.
enum Op {
    Append(Append),
    /// Purge up to this entry: recorded with the next commit, which deletes the first purged
    /// entries, and the rest a few at a time with the commits that follow (see [`write_log`]).
    Purge(LogId<NodeId>),
    /// Anything else (vote, truncate, reads that must see every append before them).
    Run(Box<dyn FnOnce(&Database) + Send>),
}

/// Purged entries deleted per commit of the log writer.
const PURGE_CHUNK: u64 = 128;

/// The log writer: a thread that takes every append queued while the previous commit was in
/// progress into the next one (group commit: one fsync for many appends), and runs the other
/// operations in order between them.
///
/// A purge (after every snapshot: thousands of entries, tens of MB) is answered at once: the
/// leader's Raft core waits for its purge, and does nothing else meanwhile. It is recorded in
/// the next commit, with the first of its entries deleted; the rest go [`PURGE_CHUNK`] at a
/// time inside the commits that follow, or on their own when no append comes (deleting them
/// all in one transaction held every append behind it for 10–60 ms). A purge lost in a crash
/// before its commit leaves entries that are still whole (purged again after the next
/// snapshot); entries at or below a recorded purge are never read, and are deleted after a
/// restart too.
fn write_log(db: Arc<Database>, ops: std::sync::mpsc::Receiver<Op>) {
    let mut appends: Vec<Append> = Vec::new();
    let mut purged = match read_meta::<Option<LogId<NodeId>>>(&db, PURGED) {
        Ok(p) => p.flatten().map(|l| l.index),
        Err(e) => {
            tracing::warn!(error = %e, "the log writer could not read the purged index");
            None
        }
    };
    let mut deleting = purged.is_some();
    // A purge not recorded yet (it goes with the next commit).
    let mut mark: Option<LogId<NodeId>> = None;
    loop {
        let first = if deleting {
            match ops.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(op) => op,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    deleting = commit(&db, &mut appends, purged, &mut mark);
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match ops.recv() {
                Ok(op) => op,
                Err(_) => return,
            }
        };
        let mut next = Some(first);
        while let Some(op) = next.take().or_else(|| ops.try_recv().ok()) {
            match op {
                Op::Append(a) => appends.push(a),
                Op::Purge(log_id) => {
                    purged = Some(log_id.index);
                    mark = Some(log_id);
                    deleting = true;
                }
                Op::Run(f) => {
                    deleting = commit(&db, &mut appends, purged, &mut mark);
                    f(&db);
                }
            }
        }
        if !appends.is_empty() || deleting {
            deleting = commit(&db, &mut appends, purged, &mut mark);
        }
    }
}

/// Commits `appends` (if any) and the purge `mark` not recorded yet (if any), and deletes up to
/// [`PURGE_CHUNK`] entries at or below `purged` in the same transaction. Returns whether purged
/// entries are left to delete.
fn commit(
    db: &Database,
    appends: &mut Vec<Append>,
    purged: Option<u64>,
    mark: &mut Option<LogId<NodeId>>,
) -> bool {
    if appends.is_empty() && purged.is_none() {
        return false;
    }
    let mut left = false;
    let result = (|| -> Result<(), String> {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            for a in appends.iter() {
                for (index, bytes) in &a.rows {
                    table
                        .insert(index, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            if let Some(upto) = purged {
                let first = table
                    .first()
                    .map_err(|e| e.to_string())?
                    .map(|(k, _)| k.value());
                if let Some(first) = first.filter(|&f| f <= upto) {
                    let last = upto.min(first + PURGE_CHUNK - 1);
                    table
                        .retain_in(first..=last, |_, _| false)
                        .map_err(|e| e.to_string())?;
                    left = last < upto;
                } else if appends.is_empty() && mark.is_none() {
                    // Nothing was left to delete: no commit needed.
                    return Ok(());
                }
            }
            if let Some(m) = mark {
                let bytes = serde_json::to_vec(&Some(*m)).map_err(|e| e.to_string())?;
                let mut meta = tx.open_table(META).map_err(|e| e.to_string())?;
                meta.insert(PURGED, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            if let Some(last) = appends.last() {
                let mut meta = tx.open_table(META).map_err(|e| e.to_string())?;
                meta.insert(COMMITTED, last.committed.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    })();
    if result.is_err() {
        // Tried again with the next commit.
        left = purged.is_some();
    } else {
        *mark = None;
    }
    for a in appends.drain(..) {
        a.flushed
            .log_io_completed(result.clone().map_err(std::io::Error::other));
    }
    left
}

/// The newest entries, as appended (see [`LogStore::recent`]), and purged ones waiting to be
/// freed.
#[derive(Default)]
struct Recent {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    /// Freed a few at a time by the appends that follow a purge: freeing the
    /// thousands a purge cuts off (each a batch of commands: ~20 MB of small allocations after
    /// a snapshot) at once took 50–90 ms, with the lock held, on the Raft core's task, and
    /// stalled the leader; freeing them on another thread still cost 20–30 ms (the allocator's
    /// memory is shared with the threads that made them).
    purged: Vec<Entry<TypeConfig>>,
}

/// Purged entries freed by each append at least (see [`Recent::purged`]).
const FREED_PER_APPEND: usize = 8;

/// Entries kept in [`LogStore::recent`].
const RECENT: usize = 20_000;

impl LogStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the log writer thread, after every append queued before it.
    async fn run<T, F>(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        f: F,
    ) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, String> + Send + 'static,
    {
        ask(&self.writer, subject, verb, |tx| {
            Op::Run(Box::new(move |db| {
                let _ = tx.send(f(db));
            }))
        })
        .await
    }
}

/// The log writer thread is gone (it stops only when the store is dropped, or on a panic).
fn writer_stopped(verb: ErrorVerb) -> StorageError<NodeId> {
    io_error(ErrorSubject::Logs, verb, "the log writer stopped")
}

/// Queues the operation `op` makes of a reply channel on a writer thread (of the log or of the
/// state), and waits for its reply.
async fn ask<O, T>(
    writer: &std::sync::mpsc::Sender<O>,
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    op: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> O,
) -> StorageResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stopped = |s: &ErrorSubject<NodeId>| io_error(s.clone(), verb, "a store writer stopped");
    writer.send(op(tx)).map_err(|_| stopped(&subject))?;
    rx.await
        .map_err(|_| stopped(&subject))?
        .map_err(|e| io_error(subject, verb, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        {
            // Served from memory when the whole range is there (the common case: replication
            // of what was just appended).
            let recent = &self.recent().entries;
            let first = match range.start_bound() {
                Bound::Included(&i) => Some(i),
                Bound::Excluded(&i) => Some(i + 1),
                Bound::Unbounded => None,
            };
            if let (Some(first), Some((&oldest, _))) = (first, recent.first_key_value()) {
                if first >= oldest {
                    return Ok(recent
                        .range(range.clone())
                        .map(|(_, e)| e.clone())
                        .collect());
                }
            }
        }
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.run(ErrorSubject::Logs, ErrorVerb::Read, move |db| {
            // Purged entries not deleted yet (see `write_log`) are not in the log.
            let purged = read_meta::<Option<LogId<NodeId>>>(db, PURGED)?
                .flatten()
                .map(|l| l.index);
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in table
                .range::<u64>((start, end))
                .map_err(|e| e.to_string())?
            {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if purged.is_some_and(|p| k.value() <= p) {
                    continue;
                }
                out.push(serde_json::from_slice(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.run(ErrorSubject::Logs, ErrorVerb::Read, |db| {
            let purged: Option<LogId<NodeId>> = read_meta(db, PURGED)?;
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            // Entries at or below the purge that are not deleted yet do not count.
            let last = match table.last().map_err(|e| e.to_string())? {
                Some((k, v)) if purged.is_none_or(|p| k.value() > p.index) => {
                    let e: Entry<TypeConfig> =
                        serde_json::from_slice(v.value()).map_err(|e| e.to_string())?;
                    Some(e.log_id)
                }
                _ => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let vote = *vote;
        self.run(ErrorSubject::Vote, ErrorVerb::Write, move |db| {
            write_meta(db, VOTE, &vote)
        })
        .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.run(ErrorSubject::Vote, ErrorVerb::Read, |db| {
            read_meta(db, VOTE)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Kept in memory and written with the next append: it only speeds up recovery (a
        // lost committed index is learnt again from the leader), and a write transaction of
        // its own would queue behind the fsync of the append in progress on every commit.
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        if let Some(c) = *self.committed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(Some(c));
        }
        self.run(ErrorSubject::Store, ErrorVerb::Read, |db| {
            Ok(read_meta::<Option<LogId<NodeId>>>(db, COMMITTED)?.flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        let mut appended = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e)
                .map_err(|err| io_error(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))?;
            rows.push((e.log_id.index, bytes));
            appended.push(e);
        }
        let committed =
            serde_json::to_vec(&*self.committed.lock().unwrap_or_else(|p| p.into_inner()))
                .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let freed = {
            // Readable at once (replication reads what was just appended); durable when the
            // writer tells `callback`.
            let mut recent = self.recent();
            // Twice as many as come in: every entry is purged once, so none pile up.
            let free = (2 * appended.len()).max(FREED_PER_APPEND);
            for e in appended {
                recent.entries.insert(e.log_id.index, e);
            }
            let keep = recent.purged.len().saturating_sub(free);
            let mut freed = recent.purged.split_off(keep);
            while recent.entries.len() > RECENT {
                freed.extend(recent.entries.pop_first().map(|(_, e)| e));
            }
            freed
        };
        drop(freed);
        self.writer
            .send(Op::Append(Append {
                rows,
                committed,
                flushed: callback,
            }))
            .map_err(|_| writer_stopped(ErrorVerb::Write))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Memory first: a reader must never see an entry the disk no longer holds.
        self.recent().entries.retain(|&i, _| i < log_id.index);
        self.run(ErrorSubject::Logs, ErrorVerb::Delete, move |db| {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Cut off (a split, not a walk), and freed a few at a time by the next appends.
        {
            let mut recent = self.recent();
            let kept = recent.entries.split_off(&(log_id.index + 1));
            let cut = std::mem::replace(&mut recent.entries, kept);
            recent.purged.extend(cut.into_values());
        }
        self.writer
            .send(Op::Purge(log_id))
            .map_err(|_| writer_stopped(ErrorVerb::Delete))
    }
}

/// The applied state: the approvals domain plus what Raft needs to know about it. A snapshot
/// sent to another member is this, as JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: State,
}

/// Where the applied state is kept: `state.redb` beside the log's file, a table per map of
/// [`State`] (a row per object: its key, its JSON) and a metadata table. A file of its own:
/// redb has one write transaction at a time, and the log's commits must not wait for these.
const STATE_FILE: &str = "state.redb";
type StateTable = TableDefinition<'static, &'static str, &'static [u8]>;
const REQUESTS: StateTable = TableDefinition::new("requests");
const GRANTS: StateTable = TableDefinition::new("grants");
const CHECKPOINTS: StateTable = TableDefinition::new("checkpoints");
const NODE_KEYS: StateTable = TableDefinition::new("node_keys");
const MARKS: StateTable = TableDefinition::new("marks");
const STATE_TABLES: [StateTable; 5] = [REQUESTS, GRANTS, CHECKPOINTS, NODE_KEYS, MARKS];
const STATE_META: StateTable = TableDefinition::new("state_meta");
/// In [`STATE_META`]: the last applied log id and the membership as of it ([`AppliedPoint`]).
const APPLIED: &str = "applied";
// In [`STATE_META`] too, [`SNAPSHOT`]: the last snapshot's metadata (written with the state it
// names, durably).

/// A snapshot's metadata.
type Meta = SnapshotMeta<NodeId, BasicNode>;

/// How far the stored state goes: the last applied log id and the membership then.
type AppliedPoint = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// A row of the state tables to write: the object's JSON, or `None` to delete it.
struct Row {
    table: StateTable,
    key: Arc<str>,
    value: Option<Vec<u8>>,
}

impl Row {
    /// The row of `changed` as `state` holds it now.
    fn of(state: &State, changed: Changed) -> Result<Self, serde_json::Error> {
        fn json<T: Serialize>(v: Option<&T>) -> Result<Option<Vec<u8>>, serde_json::Error> {
            v.map(serde_json::to_vec).transpose()
        }
        let (table, value, key) = match changed {
            Changed::Request(k) => (REQUESTS, json(state.requests.get(&k))?, k),
            Changed::Grant(k) => (GRANTS, json(state.grants.get(&k))?, k),
            Changed::Checkpoint(k) => (CHECKPOINTS, json(state.checkpoints.get(&k))?, k),
            Changed::NodeKey(k) => (NODE_KEYS, json(state.node_keys.get(&k))?, k),
            Changed::Mark(k) => (MARKS, json(state.marks.get(&k))?, k),
        };
        Ok(Self { table, key, value })
    }

    /// Every row of `state`.
    fn all(state: &State) -> Result<Vec<Self>, serde_json::Error> {
        let keys = state.requests.keys().cloned().map(Changed::Request);
        let keys = keys.chain(state.grants.keys().cloned().map(Changed::Grant));
        let keys = keys.chain(state.checkpoints.keys().cloned().map(Changed::Checkpoint));
        let keys = keys.chain(state.node_keys.keys().cloned().map(Changed::NodeKey));
        let keys = keys.chain(state.marks.keys().cloned().map(Changed::Mark));
        keys.map(|k| Self::of(state, k)).collect()
    }
}

/// How often the state writer syncs its commits at least (when applies come): the flush of a
/// snapshot then holds at most this much, not all the writes since the last snapshot (tens of
/// MB, whose fsync held the log's fsyncs on the same disk for 60–270 ms).
const STATE_SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Work for the state writer thread, done in the order it was queued.
enum StateOp {
    /// What an apply changed, and the applied point after it.
    Apply(Vec<Row>, AppliedPoint),
    /// Make everything queued before durable, and mark it as the last snapshot; answers with
    /// the snapshot's metadata.
    Snapshot(tokio::sync::oneshot::Sender<Result<Meta, String>>),
    /// Replace the whole state with an installed snapshot's, durably.
    Install(
        Vec<Row>,
        Meta,
        tokio::sync::oneshot::Sender<Result<(), String>>,
    ),
}

/// The metadata of a snapshot of the state at `point`: its id names the log id, so that the
/// same state always has the same id.
fn snapshot_meta(point: &AppliedPoint) -> Meta {
    let (term, leader, index) = match point.0 {
        Some(l) => (l.leader_id.term, l.leader_id.node_id, l.index),
        None => (0, 0, 0),
    };
    SnapshotMeta {
        last_log_id: point.0,
        last_membership: point.1.clone(),
        snapshot_id: format!("{term}-{leader}-{index}"),
    }
}

/// The state writer: a thread that writes what each apply changed, every apply queued while
/// the previous commit was in progress in one transaction. Only one commit per
/// [`STATE_SYNC_EVERY`] is synced; the others use redb's `Durability::None`: the log holds
/// every applied entry until a snapshot, and a restarted member re-applies those after the
/// state's last synced commit. A snapshot is a synced commit that marks the point it reached,
/// after which the log before it may go.
///
/// A failed write stops the writer's use of the file: later applies are dropped, and every
/// snapshot or install is answered with the error (openraft then stops the member), so a
/// point is never marked that the file does not hold.
fn write_state(db: Database, mut point: AppliedPoint, ops: std::sync::mpsc::Receiver<StateOp>) {
    let mut failed: Option<String> = None;
    let mut synced = std::time::Instant::now();
    while let Ok(first) = ops.recv() {
        let batch: Vec<StateOp> = std::iter::once(first).chain(ops.try_iter()).collect();
        let sync = synced.elapsed() >= STATE_SYNC_EVERY;
        let result = match &failed {
            Some(e) => Err(e.clone()),
            None => commit_state(&db, &batch, &mut point, sync),
        };
        let result = result.map(|(meta, did_sync)| {
            if did_sync {
                synced = std::time::Instant::now();
            }
            meta
        });
        if let Err(e) = &result {
            if failed.is_none() {
                tracing::error!(error = %e, "the state could not be written; no snapshot will be taken");
            }
            failed = Some(e.clone());
        }
        for op in batch {
            match op {
                StateOp::Apply(..) => {}
                StateOp::Snapshot(reply) => {
                    let _ = reply.send(result.clone());
                }
                StateOp::Install(_, _, reply) => {
                    let _ = reply.send(result.clone().map(drop));
                }
            }
        }
    }
}

/// Writes `batch` in one transaction, synced if `sync` or if it holds a snapshot or an install;
/// `point` follows it. Returns the metadata of the last snapshot marked (or of `point`), and
/// whether the commit was synced.
fn commit_state(
    db: &Database,
    batch: &[StateOp],
    point: &mut AppliedPoint,
    sync: bool,
) -> Result<(Meta, bool), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut tx = db.begin_write().map_err(|x| e(&x))?;
    let mut synced = sync;
    let mut marked = None;
    {
        let mut meta = tx.open_table(STATE_META).map_err(|x| e(&x))?;
        for op in batch {
            match op {
                StateOp::Apply(rows, after) => {
                    put_rows(&tx, rows)?;
                    *point = after.clone();
                }
                StateOp::Snapshot(_) => {
                    let m = snapshot_meta(point);
                    let bytes = serde_json::to_vec(&m).map_err(|x| e(&x))?;
                    meta.insert(SNAPSHOT, bytes.as_slice()).map_err(|x| e(&x))?;
                    marked = Some(m);
                    synced = true;
                }
                StateOp::Install(rows, m, _) => {
                    for table in STATE_TABLES {
                        tx.delete_table(table).map_err(|x| e(&x))?;
                    }
                    put_rows(&tx, rows)?;
                    *point = (m.last_log_id, m.last_membership.clone());
                    let bytes = serde_json::to_vec(m).map_err(|x| e(&x))?;
                    meta.insert(SNAPSHOT, bytes.as_slice()).map_err(|x| e(&x))?;
                    marked = Some(m.clone());
                    synced = true;
                }
            }
        }
        let bytes = serde_json::to_vec(&*point).map_err(|x| e(&x))?;
        meta.insert(APPLIED, bytes.as_slice()).map_err(|x| e(&x))?;
    }
    if !synced {
        tx.set_durability(redb::Durability::None)
            .map_err(|x| e(&x))?;
    }
    tx.commit().map_err(|x| e(&x))?;
    Ok((marked.unwrap_or_else(|| snapshot_meta(point)), synced))
}

fn put_rows(tx: &redb::WriteTransaction, rows: &[Row]) -> Result<(), String> {
    for same in rows.chunk_by(|a, b| a.table.name() == b.table.name()) {
        let mut table = tx.open_table(same[0].table).map_err(|e| e.to_string())?;
        for row in same {
            match &row.value {
                Some(v) => table.insert(&*row.key, v.as_slice()).map(drop),
                None => table.remove(&*row.key).map(drop),
            }
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Reads the stored state: the applied data, and the last snapshot marked.
fn read_state(db: &Database) -> Result<(MachineData, Option<Meta>), String> {
    fn rows<T: for<'de> Deserialize<'de>>(
        tx: &redb::ReadTransaction,
        table: StateTable,
    ) -> Result<BTreeMap<Arc<str>, T>, String> {
        let name = table.name();
        let table = match tx.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.to_string()),
        };
        let mut map = BTreeMap::new();
        for row in table.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let value = serde_json::from_slice(v.value())
                .map_err(|e| format!("{} {}: {e}", name, k.value()))?;
            map.insert(k.value().into(), value);
        }
        Ok(map)
    }
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let state = State {
        requests: rows(&tx, REQUESTS)?,
        grants: rows(&tx, GRANTS)?,
        checkpoints: rows(&tx, CHECKPOINTS)?,
        node_keys: rows(&tx, NODE_KEYS)?,
        marks: rows(&tx, MARKS)?,
    };
    let meta: BTreeMap<Arc<str>, serde_json::Value> = rows(&tx, STATE_META)?;
    let (last_applied, membership) = match meta.get(APPLIED) {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string())?,
        None => Default::default(),
    };
    let data = MachineData {
        last_applied,
        membership,
        state,
    };
    let marked = meta
        .get(SNAPSHOT)
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok((data, marked))
}

/// A state kept the way earlier versions kept it, only in snapshots (the bytes in a
/// `snapshot-<term>-<leader>-<index>` file beside the log's file or, before that, in its
/// `raft_snapshot` table; the metadata in its metadata table), is moved into the state file
/// once: written and marked there durably, then removed from the old places.
fn migrate_snapshot(dir: &Path, log_db: &Database, state_db: &Database) -> Result<(), String> {
    let Some(meta) = read_meta::<Meta>(log_db, SNAPSHOT)? else {
        return Ok(());
    };
    let marked = {
        let tx = state_db.begin_read().map_err(|e| e.to_string())?;
        match tx.open_table(STATE_META) {
            Ok(t) => t.get(SNAPSHOT).map_err(|e| e.to_string())?.is_some(),
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(e.to_string()),
        }
    };
    let file = match meta.last_log_id {
        Some(l) => format!(
            "snapshot-{}-{}-{}",
            l.leader_id.term, l.leader_id.node_id, l.index
        ),
        None => "snapshot-0-0-0".into(),
    };
    if !marked {
        let path = dir.join(&file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tx = log_db.begin_read().map_err(|e| e.to_string())?;
                let table = tx
                    .open_table(LEGACY_SNAPSHOT_DATA)
                    .map_err(|e| e.to_string())?;
                let legacy = table.get(SNAPSHOT).map_err(|e| e.to_string())?;
                legacy
                    .ok_or_else(|| format!("the snapshot's data is missing: {}", path.display()))?
                    .value()
                    .to_vec()
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let data: MachineData = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let rows = Row::all(&data.state).map_err(|e| e.to_string())?;
        let (reply, _) = tokio::sync::oneshot::channel();
        let mut point = AppliedPoint::default();
        commit_state(
            state_db,
            &[StateOp::Install(rows, meta, reply)],
            &mut point,
            true,
        )?;
        tracing::info!(
            index = point.0.map_or(0, |l| l.index),
            "the state of the last snapshot moved into {STATE_FILE}"
        );
    }
    let tx = log_db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = tx.open_table(META).map_err(|e| e.to_string())?;
        table.remove(SNAPSHOT).map_err(|e| e.to_string())?;
    }
    tx.delete_table(LEGACY_SNAPSHOT_DATA)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("snapshot-") {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(error = %e, file = %entry.path().display(), "an old snapshot stays");
            }
        }
    }
    Ok(())
}

/// Where the first snapshots were kept (see [`migrate_snapshot`]).
const LEGACY_SNAPSHOT_DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

/// The replicated state machine. Readers (the gRPC services) share `data`; every apply bumps
/// `applied` so that watchers wake up, and queues what it changed for the state writer (see
/// [`write_state`]).
#[derive(Clone)]
pub struct StateMachine {
    pub data: Arc<RwLock<MachineData>>,
    applied: Arc<watch::Sender<u64>>,
    writer: std::sync::mpsc::Sender<StateOp>,
    snapshots: Arc<std::sync::Mutex<Snapshots>>,
}

/// A member's snapshots, as [`StateMachine`] keeps track of them.
#[derive(Default)]
struct Snapshots {
    /// The last one marked (taken or installed); none in a new store.
    marked: Option<Meta>,
    /// The state as last made for a member that installs it: sent again to the next one that
    /// asks (openraft asks again for every try) while no later snapshot is marked.
    made: Option<(Meta, Arc<Vec<u8>>)>,
}

impl Snapshots {
    fn mark(&mut self, meta: Meta) {
        if self
            .made
            .as_ref()
            .is_some_and(|(made, _)| made.last_log_id < meta.last_log_id)
        {
            self.made = None;
        }
        self.marked = Some(meta);
    }
}

impl StateMachine {
    /// Opens the state file in `dir`, moves a state kept the earlier way into it, reads it,
    /// and starts its writer.
    fn open(dir: &Path, log_db: &Database) -> Result<Self, String> {
        let path = dir.join(STATE_FILE);
        let db = Database::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        migrate_snapshot(dir, log_db, &db)?;
        let (data, marked) = read_state(&db)?;
        let point = (data.last_applied, data.membership.clone());
        let (writer, ops) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("raft-state-writer".into())
            .spawn(move || write_state(db, point, ops))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            data: Arc::new(RwLock::new(data)),
            applied: Arc::new(watch::channel(0).0),
            writer,
            snapshots: Arc::new(std::sync::Mutex::new(Snapshots { marked, made: None })),
        })
    }

    /// Wakes up on every apply (the value is the last applied index).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Reads the domain state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.data.read().unwrap_or_else(|p| p.into_inner()).state)
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, Snapshots> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// A snapshot is a mark: the state is in its file already, and taking one makes it durable
    /// up to the last apply and marks that point (see [`write_state`]); openraft may then purge
    /// the log before it. Its bytes are made only when a member needs them
    /// ([`RaftStateMachine::get_current_snapshot`]); openraft keeps only the metadata of what
    /// this returns.
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        let meta = ask(
            &self.writer,
            ErrorSubject::Snapshot(None),
            ErrorVerb::Write,
            StateOp::Snapshot,
        )
        .await?;
        self.snapshots().mark(meta.clone());
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot taken"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut changed = Vec::new();
        let mut last = 0;
        let (rows, point) = {
            let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                data.last_applied = Some(entry.log_id);
                last = entry.log_id.index;
                replies.push(match entry.payload {
                    EntryPayload::Blank => Reply(None),
                    EntryPayload::Normal(cmd) => {
                        Reply(Some(data.state.apply_noting(cmd, &mut changed)))
                    }
                    EntryPayload::Membership(m) => {
                        data.membership = StoredMembership::new(Some(entry.log_id), m);
                        Reply(None)
                    }
                });
            }
            let rows = changed
                .into_iter()
                .map(|c| Row::of(&data.state, c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| io_error(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            (rows, (data.last_applied, data.membership.clone()))
        };
        if !replies.is_empty() {
            self.writer.send(StateOp::Apply(rows, point)).map_err(|_| {
                io_error(
                    ErrorSubject::StateMachine,
                    ErrorVerb::Write,
                    "the state writer stopped",
                )
            })?;
            self.applied.send_replace(last);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let read = {
            let meta = meta.clone();
            tokio::task::spawn_blocking(move || -> Result<_, serde_json::Error> {
                let mut incoming: MachineData = serde_json::from_slice(snapshot.get_ref())?;
                incoming.last_applied = meta.last_log_id;
                incoming.membership = meta.last_membership;
                let rows = Row::all(&incoming.state)?;
                Ok((incoming, rows))
            })
        };
        let (incoming, rows) = read
            .await
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))?
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))?;
        let m = meta.clone();
        ask(&self.writer, subject, ErrorVerb::Write, |reply| {
            StateOp::Install(rows, m, reply)
        })
        .await?;
        self.snapshots().mark(meta.clone());
        let last = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = incoming;
        self.applied.send_replace(last);
        Ok(())
    }

    /// The state for a member to install, as the JSON of [`MachineData`]: made from the state
    /// as it is now (the state machine worker calls this between applies, so they wait while
    /// it is made), or the one made last if it is not older than the last snapshot marked.
    /// Either way at or after that snapshot, so the log after it is still there for the member
    /// that installs it.
    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let made = {
            let snapshots = self.snapshots();
            if snapshots.marked.is_none() {
                return Ok(None);
            }
            // Never older than the mark: marking a later snapshot drops it.
            snapshots.made.clone()
        };
        let (meta, bytes) = match made {
            Some(made) => made,
            None => {
                let copy = self.data.read().unwrap_or_else(|p| p.into_inner()).clone();
                let meta = snapshot_meta(&(copy.last_applied, copy.membership.clone()));
                let bytes = tokio::task::spawn_blocking(move || serde_json::to_vec(&copy))
                    .await
                    .map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?
                    .map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
                let made = (meta, Arc::new(bytes));
                self.snapshots().made = Some(made.clone());
                made
            }
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().expect("temp dir");
            let (log, sm) = open(dir.path()).await?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance suite, run against this store.
    #[test]
    fn openraft_storage_conformance_suite() {
        Suite::test_all(Builder).expect("the store passes openraft's suite");
    }

    /// A purge answers at once and is what the log's state says from then on; the purged
    /// entries are never read again, are deleted a chunk at a time by the log writer, and a
    /// purge past the last entry leaves the purge as the last log id.
    #[tokio::test]
    async fn a_purge_is_recorded_at_once_and_its_entries_deleted_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _sm) = open(dir.path()).await.unwrap();
        let id = |i: u64| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        async fn rows(log: &LogStore) -> (u64, Option<u64>) {
            use redb::ReadableTableMetadata;
            log.run(ErrorSubject::Logs, ErrorVerb::Read, |db| {
                let tx = db.begin_read().map_err(|e| e.to_string())?;
                let table = tx.open_table(LOG).map_err(|e| e.to_string())?;
                let first = table.first().map_err(|e| e.to_string())?;
                Ok((
                    table.len().map_err(|e| e.to_string())?,
                    first.map(|(k, _)| k.value()),
                ))
            })
            .await
            .unwrap()
        }
        // 1,000 entries written as appends write them.
        log.run(ErrorSubject::Logs, ErrorVerb::Write, move |db| {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
                for i in 1..=1_000 {
                    let e = Entry::<TypeConfig> {
                        log_id: id(i),
                        payload: EntryPayload::Blank,
                    };
                    let bytes = serde_json::to_vec(&e).map_err(|e| e.to_string())?;
                    table
                        .insert(i, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .unwrap();

        log.purge(id(900)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(id(900)));
        assert_eq!(state.last_log_id, Some(id(1_000)));
        let read: Vec<u64> = log
            .try_get_log_entries(0..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(
            read,
            (901..=1_000).collect::<Vec<_>>(),
            "purged entries are not read"
        );

        let mut tries = 0;
        loop {
            let (len, first) = rows(&log).await;
            if (len, first) == (100, Some(901)) {
                break;
            }
            tries += 1;
            assert!(tries < 200, "still {len} rows from {first:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }

        // A purge past the last entry (after a snapshot was installed): the log is empty,
        // and its last log id is the purge.
        log.purge(id(1_500)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(id(1_500)));
        assert_eq!(state.last_log_id, Some(id(1_500)));
        assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
    }

    /// What was written survives closing and reopening the file.
    #[tokio::test]
    async fn log_vote_and_snapshot_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 1);
        {
            let (mut log, mut sm) = open(dir.path()).await.unwrap();
            log.save_vote(&vote).await.unwrap();
            let entry = Entry::<TypeConfig> {
                log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 1),
                payload: EntryPayload::Blank,
            };
            sm.apply([entry.clone()]).await.unwrap();
            sm.build_snapshot().await.unwrap();
        }
        let (mut log, mut sm) = reopen(dir.path()).await;
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(1));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }

    /// Opens the store in `dir` again once the writer threads of the last one let go of its
    /// files (they stop when it is dropped).
    async fn reopen(dir: &Path) -> (LogStore, StateMachine) {
        let mut tries = 0;
        loop {
            match open(dir).await {
                Ok(opened) => return opened,
                Err(e) if tries < 40 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("reopen {}: {e}", dir.display()),
            }
        }
    }

    /// A state that earlier versions kept only in a snapshot (the bytes in the log's store,
    /// then in a file beside it) is moved into the state file on open, and the old copies go.
    #[tokio::test]
    async fn a_state_kept_in_a_snapshot_moves_into_the_state_file() {
        for in_file in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let log_id = LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
            let mut data = MachineData {
                last_applied: Some(log_id),
                ..Default::default()
            };
            data.state
                .apply(crate::approvals::tests::create("r1", 1, 0))
                .unwrap();
            let meta = Meta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::default(),
                snapshot_id: "old".into(),
            };
            let bytes = serde_json::to_vec(&data).unwrap();
            {
                let db = Database::create(dir.path().join("raft.redb")).unwrap();
                write_meta(&db, FORMAT, &2u32).unwrap();
                write_meta(&db, SNAPSHOT, &meta).unwrap();
                if in_file {
                    std::fs::write(dir.path().join("snapshot-2-1-7"), &bytes).unwrap();
                } else {
                    let tx = db.begin_write().unwrap();
                    tx.open_table(LEGACY_SNAPSHOT_DATA)
                        .unwrap()
                        .insert(SNAPSHOT, bytes.as_slice())
                        .unwrap();
                    tx.commit().unwrap();
                }
            }
            check_format(dir.path(), false).expect("format 2 is read");
            for _ in 0..2 {
                let (_log, mut sm) = reopen(dir.path()).await;
                assert_eq!(sm.read(State::clone), data.state);
                assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id));
                let current = sm.get_current_snapshot().await.unwrap().expect("one");
                assert_eq!(current.meta.last_log_id, Some(log_id));
                let held: MachineData = serde_json::from_slice(current.snapshot.get_ref()).unwrap();
                assert_eq!(held.state, data.state);
            }
            let left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(!left.iter().any(|n| n.starts_with("snapshot-")), "{left:?}");
            let (log, _sm) = reopen(dir.path()).await;
            let (meta, legacy, format) = log
                .run(ErrorSubject::Store, ErrorVerb::Read, |db| {
                    let meta = read_meta::<Meta>(db, SNAPSHOT)?;
                    let format = read_meta::<u32>(db, FORMAT)?;
                    let tx = db.begin_read().map_err(|e| e.to_string())?;
                    Ok((meta, tx.open_table(LEGACY_SNAPSHOT_DATA).is_ok(), format))
                })
                .await
                .unwrap();
            assert_eq!(format, Some(3), "marked with this format");
            assert_eq!(meta, None, "the old metadata went");
            assert!(!legacy, "the old table went");
        }
    }

    /// The state file follows the applies (inserted, changed and removed objects), a snapshot
    /// taken while applies go on marks a point at or after the applies before it and makes
    /// that durable, and a reopened store holds exactly the state at its last applied entry,
    /// at or after the last snapshot. A member that installs the state as sent holds it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_state_file_follows_the_applies_and_a_snapshot_marks_it_durable() {
        use crate::approvals::tests::{create, decide};
        // Entry i creates request i, decides request i - 1 (denied when i is odd) and marks
        // something until i + 20; every 50th also purges what settled or ended 25 before.
        let entry = |i: u64| {
            let mut cmds = vec![
                create(&format!("r{i}"), 1, i),
                decide(&format!("r{}", i - 1), "alice", i % 2 == 0, i),
                Command::Mark {
                    key: format!("logout:{i}"),
                    until: i + 20,
                    now: i,
                },
            ];
            if i % 50 == 0 {
                cmds.push(Command::Purge { cutoff: i - 25 });
            }
            Entry::<TypeConfig> {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                payload: EntryPayload::Normal(Command::Batch(cmds)),
            }
        };
        let replay = |upto: u64| {
            let mut state = State::default();
            for i in 1..=upto {
                if let EntryPayload::Normal(cmd) = entry(i).payload {
                    state.apply(cmd).unwrap();
                }
            }
            state
        };
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).await.unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        let mut applied = 0;
        while applied < 300 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        let mut builder = sm.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await.unwrap() });
        let before = applied;
        while !build.is_finished() && applied < 2_000 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        let marked = build
            .await
            .unwrap()
            .meta
            .last_log_id
            .expect("a log id")
            .index;
        assert!(
            (before..=applied).contains(&marked),
            "{marked} in {before}..={applied}"
        );
        for _ in 0..120 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        assert!(replay(applied).requests.len() < applied as usize, "purged");
        assert_eq!(sm.read(State::clone), replay(applied));

        // What a member that must install it gets: the state now.
        let sent = sm.get_current_snapshot().await.unwrap().expect("one");
        assert_eq!(sent.meta.last_log_id.map(|l| l.index), Some(applied));
        let held: MachineData = serde_json::from_slice(sent.snapshot.get_ref()).unwrap();
        assert_eq!(held.state, replay(applied));
        let other = tempfile::tempdir().unwrap();
        {
            let (_log, mut follower) = open(other.path()).await.unwrap();
            // Something the installed state replaces.
            follower.apply([entry(1)]).await.unwrap();
            follower
                .install_snapshot(&sent.meta, sent.snapshot)
                .await
                .unwrap();
        }
        let (_follower_log, mut follower) = reopen(other.path()).await;
        assert_eq!(follower.read(State::clone), replay(applied));
        assert_eq!(
            follower.applied_state().await.unwrap().0,
            sent.meta.last_log_id
        );

        // A snapshot, then applies it does not cover; reopened, the state is exactly the one
        // at its last applied entry, which is at or after the snapshot.
        sm.build_snapshot().await.unwrap();
        let marked = applied;
        for _ in 0..30 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        drop((_log, sm));
        let (_log, mut sm) = reopen(dir.path()).await;
        let last = sm.applied_state().await.unwrap().0.expect("a log id").index;
        assert!((marked..=applied).contains(&last), "{last}");
        assert_eq!(sm.read(State::clone), replay(last));
        let current = sm.get_current_snapshot().await.unwrap().expect("one");
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(last));
    }

    /// A state file that ends before the log's purge (lost, or from another store) cannot be
    /// brought up to date: the store does not open, and says why.
    #[tokio::test]
    async fn a_state_behind_the_purged_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("raft.redb")).unwrap();
            let purged = LogId::new(openraft::CommittedLeaderId::new(1, 1), 100);
            write_meta(&db, PURGED, &Some(purged)).unwrap();
        }
        let err = open(dir.path()).await.err().expect("refused").to_string();
        assert!(
            err.contains("ends at entry 0 but the log was purged up to entry 100"),
            "{err}"
        );
    }

    /// A store written before approvals were keyed by protocol (no format mark, but state) is
    /// refused by a cluster member with a message saying so, and discarded by the embedded
    /// one; a store of this format opens.
    #[tokio::test]
    async fn a_store_of_an_older_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("raft.redb")).unwrap();
            write_meta(&db, VOTE, &Vote::<NodeId>::new(1, 1)).unwrap();
        }
        let err = check_format(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("holds format 1 state"), "{err}");
        assert!(err.contains("reads formats 2 to 3 only"), "{err}");
        // One of a later release is refused too.
        let later = tempfile::tempdir().unwrap();
        {
            let db = Database::create(later.path().join("raft.redb")).unwrap();
            write_meta(&db, FORMAT, &(STORE_FORMAT + 1)).unwrap();
        }
        let err = check_format(later.path(), false).unwrap_err().to_string();
        assert!(err.contains("holds format 4 state"), "{err}");
        assert!(err.contains("Upgrading the coordinator store"), "{err}");
        assert!(
            dir.path().join("raft.redb").exists(),
            "a refused store is kept"
        );
        check_format(dir.path(), true).unwrap();
        assert!(!dir.path().join("raft.redb").exists(), "discarded");
        {
            let (mut log, _sm) = open(dir.path()).await.unwrap();
            assert_eq!(log.read_vote().await.unwrap(), None);
        }
        // The log writer thread lets go of the file once the store is dropped.
        let mut tries = 0;
        while let Err(e) = check_format(dir.path(), false) {
            tries += 1;
            assert!(tries < 40, "{e}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
