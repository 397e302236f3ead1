//! The session's prepared statements and portals, as the target holds them.
//!
//! The gateway must name, for every Execute, the statement the target will run. Its tables
//! follow what the target *confirmed*, never what the client asked for: a Parse enters the
//! table on ParseComplete, a Bind on BindComplete, `PREPARE` on its CommandComplete. Anything
//! whose outcome is uncertain is forgotten (a removal is always safe: the gateway then refuses
//! to run the name, it never guesses it).
//!
//! Between confirmations, the client half *projects*: within one batch (the messages since the
//! last Sync), a message runs only if every message before it succeeded — PostgreSQL skips
//! everything up to Sync after an error — so the tables as confirmed at the last sync point plus
//! this batch's own changes are exactly what the target holds when the message runs. A batch
//! that depends on a name whose state is still unconfirmed from an earlier batch waits until the
//! target has answered that batch ([`Projection::behind`]). A simple Query ends a projection
//! batch too: its statements can fail without making the target skip what follows.
//!
//! Portals end with their transaction: a ReadyForQuery outside a transaction block, and any
//! statement that ends a transaction or closes a cursor, forget portals.

use super::binding::Settings;
use super::messages::Field;
use crate::policy::{Classification, Decision};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;
use vigil_proto::record::PolicyRef;

/// A prepared statement (protocol Parse or SQL `PREPARE`: they share one namespace).
pub struct Stmt {
    /// The text the target runs (for SQL `PREPARE`, the `PREPARE` statement itself).
    pub text: Arc<str>,
    pub class: Arc<Classification>,
    /// The decision that let it be prepared.
    pub policy: PolicyRef,
    pub note: Option<String>,
    /// Set when running it needs approval: the decision that says how (held at Execute).
    pub hold: Option<Arc<Decision>>,
    /// Columns from a Describe of this statement (formats not yet chosen).
    pub described: OnceLock<Vec<Field>>,
    /// Parameter types the client declared at Parse (0: left to the server).
    pub param_types: Vec<u32>,
}

impl Stmt {
    /// Whether an Execute of it may be held for approval: its own decision says so, or it is
    /// decided again at each Execute.
    pub fn may_hold(&self) -> bool {
        self.hold.is_some() || runs_by_name(&self.class) || self.by_sql_prepare()
    }

    /// Whether it is a SQL `PREPARE`'s: a protocol Bind and Execute of its name run the body,
    /// which the `PREPARE`'s own decision let be prepared, not run; so each Execute is
    /// decided again, as `EXECUTE name` is.
    pub fn by_sql_prepare(&self) -> bool {
        let stmts = self.class.as_ref().as_ref();
        stmts.is_ok_and(|s| s.iter().any(|s| s.prepares.is_some()))
    }

    /// The declared type of parameter `i`.
    pub fn param_type(&self, i: usize) -> u32 {
        self.param_types.get(i).copied().unwrap_or(0)
    }
}

/// A bound portal: the statement it runs, its parameters (for the record) and result formats.
pub struct Portal {
    /// The statement's name, as the Bind gave it.
    pub statement: String,
    pub stmt: Arc<Stmt>,
    pub params: Vec<Option<String>>,
    /// Each parameter's format (0 text, 1 binary).
    pub param_formats: Vec<i16>,
    /// Digest of the exact parameters, when an Execute of it may be held (an approval binds
    /// them; see `binding::params_digest`).
    pub params_digest: Option<[u8; 32]>,
    pub result_formats: Vec<i16>,
    /// Columns from a Describe of this portal.
    pub described: OnceLock<Vec<Field>>,
    /// The client's Bind, kept from the target until an Execute of the portal is decided
    /// (`Some`: the target does not hold this portal; see `relay::ClientHalf::on_bind`).
    pub held_back: Option<Bytes>,
}

impl Portal {
    /// The portal as the target holds it once its held-back Bind was sent.
    pub fn bound(&self) -> Self {
        Portal {
            statement: self.statement.clone(),
            stmt: self.stmt.clone(),
            params: self.params.clone(),
            param_formats: self.param_formats.clone(),
            params_digest: self.params_digest,
            result_formats: self.result_formats.clone(),
            described: OnceLock::new(),
            held_back: None,
        }
    }

    /// The columns of this portal's rows, if a Describe told them (the portal's own, else its
    /// statement's with the formats the Bind chose). Never when they are decided as it runs
    /// (see [`Self::described_at_bind`]).
    pub fn fields(&self) -> Option<Vec<Field>> {
        if !self.described_at_bind() {
            return None;
        }
        if let Some(f) = self.described.get() {
            return Some(f.clone());
        }
        let fields = self.stmt.described.get()?;
        let f = &self.result_formats;
        Some(
            fields
                .iter()
                .enumerate()
                .map(|(i, field)| Field {
                    format: match f.len() {
                        0 => 0,
                        1 => f[0],
                        _ => f.get(i).copied().unwrap_or(0),
                    },
                    ..field.clone()
                })
                .collect(),
        )
    }

    /// How many columns this portal's rows have, if a Describe told them (as `fields`, without
    /// copying them).
    pub fn width(&self) -> Option<usize> {
        if !self.described_at_bind() {
            return None;
        }
        self.described
            .get()
            .or_else(|| self.stmt.described.get())
            .map(Vec::len)
    }

    /// Whether a Describe of it tells the columns of its rows. Not for a `FETCH` or an
    /// `EXECUTE name`: their rows are those of the cursor or prepared statement the name stands
    /// for when it runs, which `CLOSE`, `DECLARE`, `DEALLOCATE` and `PREPARE` may have changed
    /// since the Bind.
    pub fn described_at_bind(&self) -> bool {
        let stmts = self.stmt.class.as_ref().as_ref();
        !stmts.is_ok_and(|s| s.iter().any(|s| s.fetches || s.executes.is_some()))
    }
}

/// Whether a statement text runs prepared statements by name (SQL `EXECUTE name`, also inside
/// `EXPLAIN ANALYZE` or `CREATE TABLE … AS`).
pub fn runs_by_name(class: &Classification) -> bool {
    class.as_ref().is_ok_and(|stmts| {
        stmts
            .iter()
            .any(|s| s.executes.is_some() || s.cursor.is_some())
    })
}

/// One change to the tables. Additions count only when the target confirmed the message that
/// makes them; removals count whatever the outcome (forgetting is always safe).
#[derive(Clone)]
pub enum Op {
    AddStatement(String, Arc<Stmt>),
    /// `None`: all of them.
    DropStatement(Option<String>),
    AddPortal(String, Arc<Portal>),
    /// `None`: all of them.
    DropPortal(Option<String>),
}

impl Op {
    fn is_addition(&self) -> bool {
        matches!(self, Op::AddStatement(..) | Op::AddPortal(..))
    }
}

/// The statement and portal tables.
#[derive(Default)]
pub struct Tables {
    statements: HashMap<String, Arc<Stmt>>,
    portals: HashMap<String, Arc<Portal>>,
}

impl Tables {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::AddStatement(name, s) => {
                self.statements.insert(name.clone(), s.clone());
            }
            Op::DropStatement(Some(name)) => {
                self.statements.remove(name);
            }
            Op::DropStatement(None) => self.statements.clear(),
            Op::AddPortal(name, p) => {
                self.portals.insert(name.clone(), p.clone());
            }
            Op::DropPortal(Some(name)) => {
                self.portals.remove(name);
            }
            Op::DropPortal(None) => self.portals.clear(),
        }
    }
}

/// How far the target has answered: sync points (Sync or Query messages) resolved, and
/// copy-in operations the target started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub syncs: u64,
    pub copy_ins: u64,
}

/// The tables as the target confirmed them, shared by the two halves of a session.
pub struct Confirmed {
    tables: Mutex<Tables>,
    progress: watch::Sender<Progress>,
    /// What the last settings probe found (`None`: it failed, or none ran).
    settings: Mutex<Option<Settings>>,
}

impl Confirmed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            tables: Mutex::new(Tables::default()),
            progress: watch::Sender::new(Progress::default()),
            settings: Mutex::new(None),
        })
    }

    /// The answer of a settings probe.
    pub fn set_settings(&self, s: Option<Settings>) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// What the last settings probe found.
    pub fn settings(&self) -> Option<Settings> {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // The tables hold no invariant a panic could break halfway.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies what a message did: everything if the target confirmed it, else its removals.
    pub fn settle(&self, ops: &[Op], confirmed: bool) {
        if ops.is_empty() {
            return;
        }
        let mut t = self.tables();
        for op in ops.iter().filter(|op| confirmed || !op.is_addition()) {
            t.apply(op);
        }
    }

    /// Forgets every portal (a transaction ended).
    pub fn end_portals(&self) {
        self.tables().portals.clear();
    }

    /// Forgets everything (the gateway lost track of the session's state: fail closed).
    pub fn forget_all(&self) {
        let mut t = self.tables();
        t.statements.clear();
        t.portals.clear();
    }

    /// A sync point was answered (or skipped by the target).
    pub fn sync_resolved(&self) {
        self.progress.send_modify(|p| p.syncs += 1);
    }

    /// The target started a copy-in.
    pub fn copy_in_started(&self) {
        self.progress.send_modify(|p| p.copy_ins += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// What a name resolves to.
pub enum Lookup<T> {
    Found(Arc<T>),
    /// The target does not hold it (or the gateway cannot be sure what it holds).
    Unknown,
    /// Only the target's answer to an earlier batch can tell: wait ([`Projection::behind`]).
    Unsettled,
}

/// The client half's view: the confirmed tables plus the changes of the batch in flight.
pub struct Projection {
    confirmed: Arc<Confirmed>,
    progress: watch::Receiver<Progress>,
    /// Changes made by the messages forwarded since the last sync point, in order.
    batch: Vec<Op>,
    /// Sync points (Sync and Query messages) forwarded.
    sent_syncs: u64,
    /// CopyDone and CopyFail messages forwarded.
    copy_ends: u64,
}

impl Projection {
    pub fn new(confirmed: Arc<Confirmed>) -> Self {
        Self {
            progress: confirmed.subscribe(),
            confirmed,
            batch: Vec::new(),
            sent_syncs: 0,
            copy_ends: 0,
        }
    }

    /// A forwarded message's changes, as they will be if it succeeds.
    pub fn record(&mut self, ops: &[Op]) {
        self.batch.extend_from_slice(ops);
    }

    /// A Sync or Query was forwarded: the next batch begins.
    pub fn sync_point(&mut self) {
        self.batch.clear();
        self.sent_syncs += 1;
    }

    /// A sync point of the gateway's own was put before the batch in flight (a settings
    /// probe): the target answers it before anything of this batch.
    pub fn sync_before_batch(&mut self) {
        self.sent_syncs += 1;
    }

    /// The tables as the target confirmed them (shared with the target half).
    pub fn confirmed(&self) -> &Confirmed {
        &self.confirmed
    }

    pub fn copy_end(&mut self) {
        self.copy_ends += 1;
    }

    /// Whether the target still owes answers to earlier sync points.
    pub fn behind(&self) -> bool {
        self.progress.borrow().syncs < self.sent_syncs
    }

    /// Whether the target is in a copy-in the client has not ended: a message that must wait
    /// for the target then would wait forever.
    pub fn in_copy_in(&self) -> bool {
        self.progress.borrow().copy_ins > self.copy_ends
    }

    /// Waits for the target's next answer; `false` when the session's target half is gone.
    pub async fn changed(&mut self) -> bool {
        self.progress.changed().await.is_ok()
    }

    pub fn statement(&self, name: &str) -> Lookup<Stmt> {
        for op in self.batch.iter().rev() {
            match op {
                Op::AddStatement(n, s) if n == name => return Lookup::Found(s.clone()),
                Op::DropStatement(None) => return Lookup::Unknown,
                Op::DropStatement(Some(n)) if n == name => return Lookup::Unknown,
                _ => {}
            }
        }
        if self.behind() {
            return Lookup::Unsettled;
        }
        match self.confirmed.tables().statements.get(name) {
            Some(s) => Lookup::Found(s.clone()),
            None => Lookup::Unknown,
        }
    }

    pub fn portal(&self, name: &str) -> Lookup<Portal> {
        for op in self.batch.iter().rev() {
            match op {
                Op::AddPortal(n, p) if n == name => return Lookup::Found(p.clone()),
                Op::DropPortal(None) => return Lookup::Unknown,
                Op::DropPortal(Some(n)) if n == name => return Lookup::Unknown,
                _ => {}
            }
        }
        if self.behind() {
            return Lookup::Unsettled;
        }
        match self.confirmed.tables().portals.get(name) {
            Some(p) => Lookup::Found(p.clone()),
            None => Lookup::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(text: &str) -> Arc<Stmt> {
        Arc::new(Stmt {
            text: text.into(),
            class: Arc::new(Ok(Vec::new())),
            policy: PolicyRef::default(),
            note: None,
            hold: None,
            described: OnceLock::new(),
            param_types: Vec::new(),
        })
    }

    fn text(l: Lookup<Stmt>) -> Option<String> {
        match l {
            Lookup::Found(s) => Some(s.text.to_string()),
            Lookup::Unknown => None,
            Lookup::Unsettled => Some("unsettled".into()),
        }
    }

    #[test]
    fn a_batch_sees_its_own_changes_and_waits_for_earlier_ones() {
        let confirmed = Confirmed::new();
        let mut p = Projection::new(confirmed.clone());
        let add = Op::AddStatement("s".into(), stmt("SELECT 1"));
        p.record(std::slice::from_ref(&add));
        assert_eq!(text(p.statement("s")).as_deref(), Some("SELECT 1"));
        p.sync_point();
        // The Parse is not confirmed yet: the next batch must wait.
        assert_eq!(text(p.statement("s")).as_deref(), Some("unsettled"));
        confirmed.sync_resolved();
        // The target answered the batch without confirming the Parse: the name is unknown.
        assert_eq!(text(p.statement("s")), None);
        confirmed.settle(&[add], true);
        assert_eq!(text(p.statement("s")).as_deref(), Some("SELECT 1"));
    }

    #[test]
    fn removals_count_whatever_the_outcome_additions_only_when_confirmed() {
        let confirmed = Confirmed::new();
        let p = Projection::new(confirmed.clone());
        confirmed.settle(&[Op::AddStatement("a".into(), stmt("A"))], true);
        confirmed.settle(&[Op::AddStatement("b".into(), stmt("B"))], false);
        assert_eq!(text(p.statement("a")).as_deref(), Some("A"));
        assert_eq!(text(p.statement("b")), None);
        confirmed.settle(&[Op::DropStatement(Some("a".into()))], false);
        assert_eq!(text(p.statement("a")), None);
    }

    #[test]
    fn drop_all_in_the_batch_hides_confirmed_names() {
        let confirmed = Confirmed::new();
        confirmed.settle(&[Op::AddStatement("a".into(), stmt("A"))], true);
        let mut p = Projection::new(confirmed);
        p.record(&[Op::DropStatement(None)]);
        assert_eq!(text(p.statement("a")), None);
        p.record(&[Op::AddStatement("a".into(), stmt("A2"))]);
        assert_eq!(text(p.statement("a")).as_deref(), Some("A2"));
    }
}
