//! The coordinator's durable storage for openraft: the Raft log, the vote and the snapshot's
//! metadata in one redb file (a pure-Rust embedded store; every commit that Raft relies on is
//! fsync'd before it is acknowledged), the snapshot's bytes in a file beside it.
//!
//! The state machine itself ([`State`]) lives in memory and is rebuilt on start from the last
//! snapshot plus the committed entries after it (openraft re-applies them, since the committed
//! index is saved too). Snapshots are taken every `snapshot_after` entries and let the log be
//! purged, so neither the file nor the restart time grows without bound. Taking one stops
//! applies only for a copy of the state's maps (what they hold is shared), and writes to disk
//! beside the log, not in its way.

use crate::approvals::{Applied, Command, DomainError, State};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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

/// The shape of what this version stores (commands in the log, the state in snapshots), kept
/// in the store: 2 = approvals and grants keyed by protocol and target. A store without the
/// mark but with state was written by format 1.
pub const STORE_FORMAT: u32 = 2;
const FORMAT: &str = "format";

/// The store holds state of another format than this version reads.
#[derive(Debug, thiserror::Error)]
#[error(
    "the coordinator store {path} holds format {found} state, and this coordinator reads format \
     {STORE_FORMAT} only (approvals and grants are keyed by protocol and target since format 2); \
     it will not read it as something else. Stop every member, move their data directories \
     away and form the cluster again (docs/operations.md, \"Upgrading the coordinator store\")"
)]
pub struct OtherFormat {
    pub path: std::path::PathBuf,
    pub found: u32,
}

/// Checks the store in `dir` (if any) was written in [`STORE_FORMAT`], and marks a new one.
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
    if found == STORE_FORMAT {
        return Ok(());
    }
    let err = OtherFormat { path, found };
    if !discard {
        return Err(err.into());
    }
    tracing::warn!(error = %err, "discarding the embedded coordinator's store");
    std::fs::remove_file(&err.path)?;
    Ok(())
}

/// Opens (or creates) the store in `dir`: the log store and the state machine share one file.
/// Call [`check_format`] first.
pub async fn open(dir: &Path) -> StorageResult<(LogStore, StateMachine)> {
    let path = dir.to_path_buf();
    let db = tokio::task::spawn_blocking(move || -> Result<Database, String> {
        let dir = path;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let db = Database::create(dir.join("raft.redb")).map_err(|e| e.to_string())?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(LOG).map_err(|e| e.to_string())?;
        tx.open_table(META).map_err(|e| e.to_string())?;
        tx.open_table(SNAPSHOT_DATA).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        write_meta(&db, FORMAT, &STORE_FORMAT)?;
        Ok(db)
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
    let sm = StateMachine::load(db, dir).await?;
    Ok((log, sm))
}

/// Runs a redb operation off the async runtime (commits fsync).
async fn blocking<T, F>(
    db: &Arc<Database>,
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    f: F,
) -> StorageResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, String> + Send + 'static,
{
    let db = db.clone();
    let subject2 = subject.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(|e| io_error(subject2, verb, e))?
        .map_err(|e| io_error(subject, verb, e))
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
    recent: Arc<std::sync::Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
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
    /// Record the purge up to this entry (a commit of its own, answered), then delete the
    /// purged entries a few at a time with the commits that follow (see [`write_log`]).
    Purge(
        LogId<NodeId>,
        tokio::sync::oneshot::Sender<Result<(), String>>,
    ),
    /// Anything else (vote, truncate, reads that must see every append before them).
    Run(Box<dyn FnOnce(&Database) + Send>),
}

/// Purged entries deleted per commit of the log writer.
const PURGE_CHUNK: u64 = 128;

/// The log writer: a thread that takes every append queued while the previous commit was in
/// progress into the next one (group commit: one fsync for many appends), and runs the other
/// operations in order between them.
///
/// A purge (after every snapshot: thousands of entries, tens of MB) is recorded at once, and
/// its entries are deleted [`PURGE_CHUNK`] at a time inside the next commits, or on their own
/// when no append comes: deleting them all in one transaction held every append behind it for
/// 10–60 ms, and the leader's Raft core waits for its purge. Entries at or below the recorded
/// purge are never read, and are deleted after a restart too.
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
    loop {
        let first = if deleting {
            match ops.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(op) => op,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    deleting = commit(&db, &mut appends, purged);
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
                Op::Purge(log_id, reply) => {
                    deleting = commit(&db, &mut appends, purged);
                    let recorded = write_meta(&db, PURGED, &Some(log_id));
                    if recorded.is_ok() {
                        purged = Some(log_id.index);
                        deleting = true;
                    }
                    let _ = reply.send(recorded);
                }
                Op::Run(f) => {
                    deleting = commit(&db, &mut appends, purged);
                    f(&db);
                }
            }
        }
        if !appends.is_empty() || deleting {
            deleting = commit(&db, &mut appends, purged);
        }
    }
}

/// Commits `appends` (if any) and deletes up to [`PURGE_CHUNK`] entries at or below
/// `purged` in the same transaction. Returns whether purged entries are left to delete.
fn commit(db: &Database, appends: &mut Vec<Append>, purged: Option<u64>) -> bool {
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
                } else if appends.is_empty() {
                    // Nothing was left to delete: no commit needed.
                    return Ok(());
                }
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
    }
    for a in appends.drain(..) {
        a.flushed
            .log_io_completed(result.clone().map_err(std::io::Error::other));
    }
    left
}

/// Entries kept in [`LogStore::recent`].
const RECENT: usize = 20_000;

impl LogStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<TypeConfig>>> {
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
        self.ask(subject, verb, |tx| {
            Op::Run(Box::new(move |db| {
                let _ = tx.send(f(db));
            }))
        })
        .await
    }

    /// Queues the operation `op` makes of a reply channel on the log writer thread, and waits
    /// for its reply.
    async fn ask<T>(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        op: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Op,
    ) -> StorageResult<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped =
            |s: &ErrorSubject<NodeId>| io_error(s.clone(), verb, "the log writer stopped");
        self.writer.send(op(tx)).map_err(|_| stopped(&subject))?;
        rx.await
            .map_err(|_| stopped(&subject))?
            .map_err(|e| io_error(subject, verb, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        {
            // Served from memory when the whole range is there (the common case: replication
            // of what was just appended).
            let recent = self.recent();
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
        {
            // Readable at once (replication reads what was just appended); durable when the
            // writer tells `callback`.
            let mut recent = self.recent();
            for e in appended {
                recent.insert(e.log_id.index, e);
            }
            while recent.len() > RECENT {
                recent.pop_first();
            }
        }
        self.writer
            .send(Op::Append(Append {
                rows,
                committed,
                flushed: callback,
            }))
            .map_err(|_| {
                io_error(
                    ErrorSubject::Logs,
                    ErrorVerb::Write,
                    "the log writer stopped",
                )
            })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Memory first: a reader must never see an entry the disk no longer holds.
        self.recent().retain(|&i, _| i < log_id.index);
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
        self.recent().retain(|&i, _| i > log_id.index);
        self.ask(ErrorSubject::Logs, ErrorVerb::Delete, |reply| {
            Op::Purge(log_id, reply)
        })
        .await
    }
}

/// The applied state: the approvals domain plus what Raft needs to know about it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: State,
}

/// A snapshot as stored: its metadata (JSON, in the metadata table) and its bytes (as they are,
/// in a file of their own beside the store, see [`Snapshots`]).
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// How much of a snapshot is written before it is synced (see [`Snapshots::write`]).
const SNAPSHOT_WRITE_CHUNK: usize = 1 << 20;

/// Where snapshots were kept before they had files of their own: read still, written no more.
const SNAPSHOT_DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

/// The snapshots of a store: the bytes in `snapshot-<term>-<leader>-<index>` files in its
/// directory, the metadata of the current one in the store. Not in the store itself: redb has
/// one write transaction at a time, and one that writes 40 MB holds it for ~0.4 s, while every
/// log commit of the member waits.
#[derive(Clone)]
struct Snapshots {
    dir: Arc<Path>,
    /// Writes one at a time (a snapshot built and one installed may finish together).
    writing: Arc<std::sync::Mutex<()>>,
}

impl Snapshots {
    fn file(&self, meta: &SnapshotMeta<NodeId, BasicNode>) -> std::path::PathBuf {
        let (term, leader, index) = match meta.last_log_id {
            Some(l) => (l.leader_id.term, l.leader_id.node_id, l.index),
            None => (0, 0, 0),
        };
        self.dir.join(format!("snapshot-{term}-{leader}-{index}"))
    }

    /// Stores `s` as the current snapshot, unless a later one is stored already: its bytes
    /// durably in their file first, then its metadata; then the files of older ones go.
    fn write(&self, db: &Database, s: &StoredSnapshot) -> Result<(), String> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let current = read_meta::<SnapshotMeta<NodeId, BasicNode>>(db, SNAPSHOT)?;
        if current.is_some_and(|c| c.last_log_id > s.meta.last_log_id) {
            return Ok(());
        }
        let path = self.file(&s.meta);
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let partial = path.with_extension("partial");
        {
            let mut f = std::fs::File::create(&partial).map_err(err)?;
            // A chunk at a time, each on disk before the next: the log's fsyncs share the disk
            // (and the file system's journal) with this write, and would otherwise queue
            // behind tens of MB at once.
            for chunk in s.data.chunks(SNAPSHOT_WRITE_CHUNK) {
                std::io::Write::write_all(&mut f, chunk).map_err(err)?;
                f.sync_data().map_err(err)?;
            }
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&partial, &path).map_err(err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        let meta = serde_json::to_vec(&s.meta).map_err(|e| e.to_string())?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(META).map_err(|e| e.to_string())?;
            table
                .insert(SNAPSHOT, meta.as_slice())
                .map_err(|e| e.to_string())?;
            let mut data = tx.open_table(SNAPSHOT_DATA).map_err(|e| e.to_string())?;
            data.remove(SNAPSHOT).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| e.to_string())?;
        for entry in entries.flatten() {
            let older = entry.file_name().to_string_lossy().starts_with("snapshot-")
                && entry.path() != path;
            if older {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(error = %e, file = %entry.path().display(), "an old snapshot stays");
                }
            }
        }
        Ok(())
    }

    fn read(&self, db: &Database) -> Result<Option<StoredSnapshot>, String> {
        let Some(meta) = read_meta::<SnapshotMeta<NodeId, BasicNode>>(db, SNAPSHOT)? else {
            return Ok(None);
        };
        let path = self.file(&meta);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            // Stored before snapshots had files of their own.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tx = db.begin_read().map_err(|e| e.to_string())?;
                let table = tx.open_table(SNAPSHOT_DATA).map_err(|e| e.to_string())?;
                let legacy = table.get(SNAPSHOT).map_err(|e| e.to_string())?;
                legacy
                    .ok_or_else(|| format!("the snapshot's data is missing: {}", path.display()))?
                    .value()
                    .to_vec()
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Some(StoredSnapshot { meta, data }))
    }
}

/// The replicated state machine. Readers (the gRPC services) share `data`; every apply bumps
/// `applied` so that watchers wake up.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    snapshots: Snapshots,
    pub data: Arc<RwLock<MachineData>>,
    applied: Arc<watch::Sender<u64>>,
}

impl StateMachine {
    async fn load(db: Arc<Database>, dir: &Path) -> StorageResult<Self> {
        let snapshots = Snapshots {
            dir: dir.into(),
            writing: Default::default(),
        };
        let stored = {
            let snapshots = snapshots.clone();
            blocking(
                &db,
                ErrorSubject::Snapshot(None),
                ErrorVerb::Read,
                move |db| snapshots.read(db),
            )
            .await?
        };
        let data = match stored {
            Some(s) => serde_json::from_slice(&s.data)
                .map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?,
            None => MachineData::default(),
        };
        Ok(Self {
            db,
            snapshots,
            data: Arc::new(RwLock::new(data)),
            applied: Arc::new(watch::channel(0).0),
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
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Applies wait only for a copy of the maps' structure (the requests and grants in them
        // are shared, see `State`): exactly the state at `last_applied`, serialised and stored
        // off the runtime while applies go on.
        let started = std::time::Instant::now();
        let copy = self.data.read().unwrap_or_else(|p| p.into_inner()).clone();
        let copied = started.elapsed();
        let snapshots = self.snapshots.clone();
        let (meta, bytes) = blocking(
            &self.db,
            ErrorSubject::Snapshot(None),
            ErrorVerb::Write,
            move |db| {
                let bytes = serde_json::to_vec(&copy).map_err(|e| e.to_string())?;
                let serialised = started.elapsed();
                let id = match copy.last_applied {
                    Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, bytes.len()),
                    None => format!("0-0-{}", bytes.len()),
                };
                let stored = StoredSnapshot {
                    meta: SnapshotMeta {
                        last_log_id: copy.last_applied,
                        last_membership: copy.membership,
                        snapshot_id: id,
                    },
                    data: bytes,
                };
                snapshots.write(db, &stored)?;
                tracing::info!(
                    index = stored.meta.last_log_id.map_or(0, |l| l.index),
                    bytes = stored.data.len(),
                    copy_ms = copied.as_secs_f64() * 1e3,
                    serialise_ms = (serialised - copied).as_secs_f64() * 1e3,
                    store_ms = (started.elapsed() - serialised).as_secs_f64() * 1e3,
                    "snapshot built"
                );
                Ok((stored.meta, stored.data))
            },
        )
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
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
        let mut last = 0;
        {
            let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                data.last_applied = Some(entry.log_id);
                last = entry.log_id.index;
                replies.push(match entry.payload {
                    EntryPayload::Blank => Reply(None),
                    EntryPayload::Normal(cmd) => Reply(Some(data.state.apply(cmd))),
                    EntryPayload::Membership(m) => {
                        data.membership = StoredMembership::new(Some(entry.log_id), m);
                        Reply(None)
                    }
                });
            }
        }
        if !replies.is_empty() {
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
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let mut incoming: MachineData = serde_json::from_slice(&bytes).map_err(|e| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let snapshots = self.snapshots.clone();
        blocking(
            &self.db,
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Write,
            move |db| snapshots.write(db, &stored),
        )
        .await?;
        let last = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = incoming;
        self.applied.send_replace(last);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let snapshots = self.snapshots.clone();
        let stored = blocking(
            &self.db,
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            move |db| snapshots.read(db),
        )
        .await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
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

    /// A purge answers once it is recorded; the purged entries are never read again, are
    /// deleted a chunk at a time by the log writer, and a purge past the last entry leaves
    /// the purge as the last log id.
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
        // The log writer thread lets go of the file once the store is dropped.
        let mut tries = 0;
        let (mut log, mut sm) = loop {
            match open(dir.path()).await {
                Ok(opened) => break opened,
                Err(e) if tries < 40 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(1));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }

    /// A snapshot stored in the store itself (before snapshots had files of their own) is
    /// read; the next one goes to a file and the old bytes leave the store.
    #[tokio::test]
    async fn a_snapshot_stored_the_old_way_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let log_id = LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
        let mut data = MachineData {
            last_applied: Some(log_id),
            ..Default::default()
        };
        data.state
            .apply(crate::approvals::tests::create("r1", 1, 0))
            .unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::default(),
            snapshot_id: "old".into(),
        };
        {
            let db = Database::create(dir.path().join("raft.redb")).unwrap();
            write_meta(&db, SNAPSHOT, &meta).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(SNAPSHOT_DATA)
                .unwrap()
                .insert(SNAPSHOT, serde_json::to_vec(&data).unwrap().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let (_log, mut sm) = open(dir.path()).await.unwrap();
        assert_eq!(sm.read(State::clone), data.state);
        let current = sm.get_current_snapshot().await.unwrap().expect("one");
        assert_eq!(current.meta, meta);
        let built = sm.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id));
        let files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot-"))
            .collect();
        assert_eq!(files, ["snapshot-2-1-7"]);
        let tx = sm.db.begin_read().unwrap();
        let legacy = tx.open_table(SNAPSHOT_DATA).unwrap();
        assert!(legacy.get(SNAPSHOT).unwrap().is_none());
        let current = sm.get_current_snapshot().await.unwrap().expect("one");
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());
    }

    /// A snapshot built while applies go on holds exactly the state at its last log id: the
    /// requests it shares with the live state are copied when an apply changes them, not
    /// changed under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_holds_the_state_at_its_index_while_applies_go_on() {
        use crate::approvals::tests::{create, decide};
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).await.unwrap();
        // Entry i creates request i and decides request i - 1 (a change to a request that a
        // snapshot taken between them shares).
        let entry = |i: u64| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Command::Batch(vec![
                create(&format!("r{i}"), 1, i),
                decide(&format!("r{}", i - 1), "alice", i % 2 == 0, i),
            ])),
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
        let mut applied = 0;
        while applied < 500 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        let mut builder = sm.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await.unwrap() });
        while !build.is_finished() && applied < 5_000 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        let snapshot = build.await.unwrap();
        let index = snapshot.meta.last_log_id.expect("a log id").index;
        assert!(
            applied > index,
            "applies went on after the snapshot's index"
        );
        let held: MachineData = serde_json::from_slice(snapshot.snapshot.get_ref()).unwrap();
        assert_eq!(held.last_applied, snapshot.meta.last_log_id);
        assert_eq!(held.state, replay(index), "the state at {index}");
        assert_eq!(sm.read(State::clone), replay(applied));
        // What was stored is what was built.
        let stored = sm.get_current_snapshot().await.unwrap().expect("stored");
        assert_eq!(stored.meta, snapshot.meta);
        assert_eq!(stored.snapshot.get_ref(), snapshot.snapshot.get_ref());

        // The next snapshot, after more applies, holds exactly the state at its index, in the
        // bytes serde_json gives it.
        for _ in 0..100 {
            applied += 1;
            sm.apply([entry(applied)]).await.unwrap();
        }
        let next = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let held: MachineData = serde_json::from_slice(next.snapshot.get_ref()).unwrap();
        assert_eq!(
            held.last_applied,
            Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), applied))
        );
        assert_eq!(held.state, replay(applied));
        assert_eq!(next.snapshot.get_ref(), &serde_json::to_vec(&held).unwrap());
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
