//! Statement classification from the real PostgreSQL parser (libpg_query).
//!
//! The parse tree is walked whole: every node at every depth (CTEs, subqueries, EXPLAIN and
//! PREPARE bodies, COPY queries, function arguments, schema elements, rule actions, SQL
//! function bodies), so a `DELETE` inside a CTE is a write and a dangerous function in a
//! subquery is found. The tree is walked through its serde form, which covers every node type
//! libpg_query knows without a hand-written visitor per type. Every statement node met inside
//! another one is classified like a top-level statement: its flags join the outer statement's
//! and the outer statement takes the most severe of the kinds (see [`StatementKind::severity`]).
//! SQL that a statement hands to the server as text — a string constant given to a function
//! that runs SQL text (`query_to_xml`, `dblink` …), the body of a `LANGUAGE sql` function — is
//! parsed and classified the same way and merged in.
//!
//! Deep trees: PostgreSQL accepts a chain of a few thousand operators, and libpg_query hands
//! over a tree up to 10,000 protobuf messages deep. Decoding, serialising, walking and
//! dropping such a tree recurses once per level in code that is not ours, so the work runs on
//! a thread of its own whose stack is sized for that depth ([`CLASSIFY_STACK`]), never on the
//! caller's (a runtime worker has 2 MiB).
//!
//! What it does not guarantee:
//! - The effects of code the server runs on its own account are not visible in a statement's
//!   text: the body of a function that is called (other than a `LANGUAGE sql` body given in
//!   the same statement), triggers, rules and views already in the database, an operator, cast
//!   or type whose function was bound earlier. A call of a user-defined function is classified
//!   by the call; the DDL that binds functions into things that run without a call is flagged
//!   `procedural` with the function it binds, so a policy can keep both away from agents.
//! - SQL passed as text is classified only when it is a constant in the statement; SQL built
//!   at run time (`query_to_xml('select ' || x, …)`, `EXECUTE` inside PL/pgSQL, a `DO` block)
//!   is visible only as the flag `executes_sql_text` or `procedural`.
//! - The parser is libpg_query's grammar (PostgreSQL 18) while the target may be older: a text
//!   only the newer grammar accepts is classified and then rejected by the target; one only the
//!   older accepts is refused, whether it is the statement or SQL text it gives a function.
//! - A table given by an expression, an OID or reached by `CASCADE` cannot be known: it is
//!   recorded as [`ANY_TABLE`], which every `tables` pattern matches.
//! - A tree deeper than libpg_query serialises (10,000 messages: about 1,660 nested
//!   `(SELECT …)`, about 5,000 chained operators) is refused as a parse error, although a
//!   server with a raised `max_stack_depth` could run it; PostgreSQL 15 with its default 2 MB
//!   stops at about 2,100 nested subqueries and 4,000 chained operators.
//! - Function names are compared by their last component, whatever their schema: a
//!   user-defined `myschema.pg_read_file` is treated as dangerous, and the dangerous list is
//!   that of PostgreSQL 15 and its contrib extensions (see `dangerous_functions.rs`).

use super::dangerous_functions::DANGEROUS_FUNCTIONS;
use super::tree::Tree;
use pg_query::protobuf::{
    CmdType, DiscardMode, DropBehavior, ObjectType, OnConflictAction, VariableSetKind,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex, PoisonError};

/// What a statement does, coarsely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    Read,
    Write,
    Ddl,
    Privilege,
    Session,
    Transaction,
    Procedural,
    Utility,
}

impl StatementKind {
    /// Which kind a statement carrying statements of several kinds takes: the highest.
    /// `CREATE SCHEMA … GRANT …` is a privilege statement, a read holding a write is a write.
    pub fn severity(self) -> u8 {
        match self {
            Self::Read => 0,
            Self::Transaction => 1,
            Self::Session => 2,
            Self::Utility => 3,
            Self::Write => 4,
            Self::Ddl => 5,
            Self::Procedural => 6,
            Self::Privilege => 7,
        }
    }
}

/// Properties a policy can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Drop,
    Truncate,
    Alter,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    /// A write nested inside another statement (data-modifying CTE, rule action, SQL text).
    NestedWrite,
    /// `EXPLAIN ANALYZE` of a write: it executes.
    ExplainAnalyzeWrite,
    /// `COPY … PROGRAM`, a foreign table or server with a `program` option.
    CopyProgram,
    /// Server-side file access: `COPY` to/from a file, `LOAD`, file functions, a foreign table
    /// or server with a `filename` option.
    ServerFile,
    DangerousFunction,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ROLE` …
    RoleChange,
    /// Code the server runs later or on its own account: `DO` blocks, `CALL`, function and
    /// procedure definitions, languages, extensions, and DDL that binds a function into
    /// something that runs without a call (trigger, event trigger, operator, cast, aggregate,
    /// type I/O, conversion, access method, wrapper handler …).
    Procedural,
    /// A function that runs SQL it receives as text, or reads tables it is given by name.
    ExecutesSqlText,
    /// Foreign-data wrappers, servers, tables and user mappings: how the server reaches data
    /// outside the database.
    ForeignData,
    /// `ALTER SYSTEM`: writes the server's configuration file.
    AlterSystem,
    /// `SET client_encoding`, `SET NAMES`, `set_config('client_encoding', …)`; see
    /// [`StatementInfo::client_encoding`].
    ClientEncodingChange,
}

/// Why a function is on the dangerous list (generated into `dangerous_functions.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionArea {
    /// Signals or inspects other backends.
    OtherSessions,
    /// Changes or reloads the configuration.
    Configuration,
    /// Reads, lists or writes files on the database server.
    ServerFiles,
    /// Creates, changes or reads large objects (outside any table's privileges).
    LargeObjects,
    /// Replication slots, origins, WAL and backups.
    Replication,
    /// Advisory locks: held across statements, they block other sessions.
    AdvisoryLocks,
    /// Connects to other servers.
    OtherServers,
    /// Any other function PostgreSQL does not let PUBLIC execute by default.
    Privileged,
}

/// Why a dangerous function is dangerous, or `None` (name: last component, lower case).
pub fn dangerous_function(name: &str) -> Option<FunctionArea> {
    DANGEROUS_FUNCTIONS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| DANGEROUS_FUNCTIONS[i].1)
}

/// What a function that runs SQL text takes as its text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SqlText {
    /// Constant string arguments may be SQL (those that parse are classified); the one at its
    /// SQL position ([`is_sql_argument`]) is, and must parse.
    Query,
    /// Its argument `tbl` names a table it reads.
    Table,
    /// Pastes its arguments into a query of its own ([`built_query`]).
    Built,
    /// Names a schema or nothing: what it reads is not in the statement.
    Opaque,
}

/// Functions that run SQL they receive as text or read tables they are given by name, sorted.
/// Not derivable from the catalog (no property says so): PostgreSQL 15's XML export and text
/// search functions, and those of the contrib extensions dblink, tablefunc and xml2.
const SQL_TEXT_FUNCTIONS: &[(&str, SqlText)] = &[
    ("connectby", SqlText::Built),
    ("crosstab", SqlText::Query),
    ("crosstab2", SqlText::Query),
    ("crosstab3", SqlText::Query),
    ("crosstab4", SqlText::Query),
    ("cursor_to_xml", SqlText::Opaque),
    ("cursor_to_xmlschema", SqlText::Opaque),
    ("database_to_xml", SqlText::Opaque),
    ("database_to_xml_and_xmlschema", SqlText::Opaque),
    ("database_to_xmlschema", SqlText::Opaque),
    ("dblink", SqlText::Query),
    ("dblink_exec", SqlText::Query),
    ("dblink_open", SqlText::Query),
    ("dblink_send_query", SqlText::Query),
    ("query_to_xml", SqlText::Query),
    ("query_to_xml_and_xmlschema", SqlText::Query),
    ("query_to_xmlschema", SqlText::Query),
    ("schema_to_xml", SqlText::Opaque),
    ("schema_to_xml_and_xmlschema", SqlText::Opaque),
    ("schema_to_xmlschema", SqlText::Opaque),
    ("table_to_xml", SqlText::Table),
    ("table_to_xml_and_xmlschema", SqlText::Table),
    ("table_to_xmlschema", SqlText::Table),
    ("ts_rewrite", SqlText::Query),
    ("ts_stat", SqlText::Query),
    ("xpath_table", SqlText::Built),
];

fn sql_text_function(name: &str) -> Option<SqlText> {
    SQL_TEXT_FUNCTIONS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| SQL_TEXT_FUNCTIONS[i].1)
}

/// Whether argument `i` of a call of `function` (a [`SqlText::Query`] one) is SQL that
/// PostgreSQL runs, by the signatures of PostgreSQL 15 and its contrib modules; the other
/// arguments are a connection, a cursor name, a namespace, weights, a `tsquery` or crosstab's
/// number of categories. A boolean constant where dblink takes `fail_on_error` tells its
/// overloads apart (`dblink(sql, true)` against `dblink(conn, sql)`), an integer constant
/// crosstab's (`crosstab(sql, 3)` against `crosstab(sql, category_sql)`).
fn is_sql_argument(function: &str, args: &[&Tree], i: usize) -> bool {
    let constant = |i: usize, kind: &str| {
        args.get(i)
            .is_some_and(|a| a.pointer(&format!("/AConst/val/{kind}")).is_some())
    };
    let at = match (function, args.len()) {
        ("query_to_xml" | "query_to_xmlschema" | "query_to_xml_and_xmlschema" | "ts_stat", _) => {
            parameter(args, 0, "query")
        }
        ("crosstab", 2) if i == 1 => (!constant(1, "Ival")).then_some(1),
        ("dblink" | "dblink_exec", 1) => Some(0),
        ("dblink" | "dblink_exec", 2) if constant(1, "Boolval") => Some(0),
        ("dblink" | "dblink_exec" | "dblink_send_query" | "ts_rewrite", 2) => Some(1),
        ("dblink" | "dblink_exec", _) => Some(1),
        ("dblink_open", 2) => Some(1),
        ("dblink_open", 3) if constant(2, "Boolval") => Some(1),
        ("dblink_open", _) => Some(2),
        ("crosstab" | "crosstab2" | "crosstab3" | "crosstab4", _) => Some(0),
        _ => None,
    };
    at == Some(i)
}

/// Which of `args` is the function's parameter `name`, its `position`th: the argument written
/// with that name (`tbl => 'payroll'`), or the one at that position (positional arguments come
/// first).
fn parameter(args: &[&Tree], position: usize, name: &str) -> Option<usize> {
    let named = |a: &Tree| {
        a.pointer("/NamedArgExpr/name")
            .and_then(Tree::as_str)
            .map(str::to_string)
    };
    args.iter()
        .position(|a| named(a).as_deref() == Some(name))
        .or_else(|| {
            args.get(position)
                .filter(|a| named(a).is_none())
                .map(|_| position)
        })
}

/// The query `connectby` (tablefunc) or `xpath_table` (xml2) pastes its arguments into, as
/// they build it (`SELECT key, parent FROM relname WHERE …`, `SELECT key, document FROM
/// relation WHERE condition`), or `None` when an argument it pastes is not a constant.
/// connectby quotes its `start_with`: an empty literal stands for it.
fn built_query(function: &str, args: &[&Tree]) -> Option<String> {
    let text = |i: usize| args.get(i).copied().and_then(constant_text);
    match function {
        "xpath_table" => Some(format!(
            "SELECT {}, {} FROM {} WHERE {}",
            text(0)?,
            text(1)?,
            text(2)?,
            text(4)?
        )),
        "connectby" => {
            let (relname, key, parent) = (text(0)?, text(1)?, text(2)?);
            let query = format!(
                "SELECT {key}, {parent} FROM {relname} WHERE {parent} = '' AND {key} IS NOT NULL AND {key} <> {parent}"
            );
            // connectby(relname, keyid_fld, parent_keyid_fld, [orderby_fld,] start_with,
            // max_depth [, branch_delim]): with six arguments, an integer fifth is max_depth.
            let ordered = args.len() == 7
                || (args.len() == 6 && args[4].pointer("/AConst/val/Ival").is_none());
            if ordered {
                Some(format!("{query} ORDER BY {}", text(3)?))
            } else {
                Some(query)
            }
        }
        _ => None,
    }
}

/// What `tables` holds for a table that cannot be known: named by an expression, an OID or a
/// string that is no table name, or reached by `CASCADE`. It matches every `tables` pattern.
pub const ANY_TABLE: &str = "*";

/// A table name given as a string, read as `regclass` input reads it: blanks around names
/// trimmed, a `"quoted"` name kept as written (`""` is a quote), an unquoted one lower-cased,
/// `schema.table` (a leading database name dropped). `None` for an OID, and for what
/// PostgreSQL rejects.
fn regclass_name(text: &str) -> Option<String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // scanner_isspace: what SplitIdentifierString skips around names.
    let blank = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c');
    let mut parts = Vec::new();
    let mut rest = text.trim_start_matches(blank);
    loop {
        let (name, after) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut name = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') if quoted[i + 1..].starts_with('"') => {
                        chars.next();
                        name.push('"');
                    }
                    (i, '"') => break i + 1,
                    (_, c) => name.push(c),
                }
            };
            (name, &quoted[end..])
        } else {
            let end = rest
                .find(|c: char| c == '.' || blank(c))
                .unwrap_or(rest.len());
            (rest[..end].to_ascii_lowercase(), &rest[end..])
        };
        if name.is_empty() {
            return None;
        }
        parts.push(name);
        rest = after.trim_start_matches(blank);
        match rest.strip_prefix('.') {
            Some(next) => rest = next.trim_start_matches(blank),
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    (parts.len() <= 3).then(|| parts[parts.len().saturating_sub(2)..].join("."))
}

/// A setting that decides how the target reads statement text (see `pg::encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadingSetting {
    ClientEncoding,
    StandardConformingStrings,
}

impl ReadingSetting {
    fn named(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("client_encoding") {
            Some(Self::ClientEncoding)
        } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
            Some(Self::StandardConformingStrings)
        } else {
            None
        }
    }

    /// Whether the target still reads statements as the gateway does with this value.
    fn keeps(self, value: &str) -> bool {
        match self {
            Self::ClientEncoding => crate::pg::encoding::is_utf8_name(value),
            Self::StandardConformingStrings => crate::pg::encoding::is_on(value),
        }
    }
}

/// A change of one of the session's [`ReadingSetting`]s by a statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingChange {
    /// To this constant value, as written.
    To(String),
    /// `RESET name`, `RESET ALL`, `SET name TO DEFAULT`: back to the value the session started
    /// with.
    Reset,
    /// `set_config` with a name or value that is not a constant: anything is possible.
    NotConstant,
}

impl SettingChange {
    /// Whether the target may read statements otherwise afterwards (a reset returns to the
    /// startup value, which the gateway chose).
    pub fn leaves(&self, setting: ReadingSetting) -> bool {
        match self {
            Self::To(value) => !setting.keeps(value),
            Self::Reset => false,
            Self::NotConstant => true,
        }
    }
}

/// One statement of a message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatementInfo {
    pub kind: Option<StatementKind>,
    /// Tables named, `schema.table` or `table` as written (case as the parser resolved it);
    /// [`ANY_TABLE`] for one that cannot be known.
    pub tables: BTreeSet<String>,
    /// Functions called or bound (by DDL), last name component, lower case.
    pub functions: BTreeSet<String>,
    pub flags: BTreeSet<Flag>,
    /// For `PREPARE name AS …`: the name.
    pub prepares: Option<String>,
    /// For `EXECUTE name`: the name (the prepared body is what counts).
    pub executes: Option<String>,
    /// For `DEALLOCATE name` (`None` inside means ALL; `DISCARD ALL` too).
    pub deallocates: Option<Option<String>>,
    /// Portals (cursors share their namespace) the statement may close or replace:
    /// `DECLARE name`, `CLOSE name` (`None` inside means all: `CLOSE ALL`, `DISCARD ALL`, and
    /// the end of a transaction, which closes every portal that is not held).
    pub ends_portals: Option<Option<String>>,
    /// An INSERT, UPDATE, DELETE or MERGE appears anywhere in the tree.
    pub writes: bool,
    /// `FETCH` (not `MOVE`): its rows' columns are those of the cursor it names as it runs,
    /// which may not be the cursor a Describe of it saw.
    pub fetches: bool,
    /// For `FETCH` and `MOVE`: the cursor (portal) named.
    pub cursor: Option<String>,
    /// A `DECLARE` whose query may run more than once: a cursor not declared `NO SCROLL` may
    /// be moved back, which runs its plan again (volatile functions included), and one
    /// declared `WITH HOLD` runs its query again to completion at `COMMIT`.
    pub reruns: bool,
    /// How the statement changes this session's `client_encoding`, if it does (when several
    /// changes are possible, one that leaves UTF-8 wins).
    pub client_encoding: Option<SettingChange>,
    /// The same for `standard_conforming_strings` (one that turns it off wins).
    pub standard_conforming_strings: Option<SettingChange>,
    /// Custom settings (a name with a dot, `app.tenant`) a `SET`, `RESET` or `set_config`
    /// with a constant name gives a value, lower case as written: PostgreSQL does not list
    /// them, so the gateway asks for them by name when it binds an approval.
    pub custom_settings: BTreeSet<String>,
    /// Columns referenced in what a query returns (a target list, `RETURNING`, `VALUES`, at
    /// any depth), by the last name of each reference as the parser gives it (`*` for `t.*`
    /// and `*`): what a result column PostgreSQL reports no table for (a set operation's, a
    /// scalar subquery's, a cast's) may be made of.
    pub columns: BTreeSet<String>,
}

impl StatementInfo {
    pub fn kind(&self) -> StatementKind {
        self.kind.unwrap_or(StatementKind::Utility)
    }

    /// Whether, after this statement, the session may use a client encoding other than UTF-8.
    pub fn leaves_utf8(&self) -> bool {
        self.client_encoding
            .as_ref()
            .is_some_and(|c| c.leaves(ReadingSetting::ClientEncoding))
    }

    /// Whether the statement may run SQL that is not in its text (a `DO` block, `CALL`, a
    /// function that runs SQL given as text): such SQL can `PREPARE`, `DEALLOCATE`, `CLOSE`
    /// and `OPEN` cursors under any name, so what the session's names hold afterwards is not
    /// what the gateway saw them given.
    pub fn runs_unseen_sql(&self) -> bool {
        self.flags.contains(&Flag::Procedural) || self.flags.contains(&Flag::ExecutesSqlText)
    }

    /// Whether, after this statement, string literals may no longer be standard.
    pub fn leaves_standard_strings(&self) -> bool {
        self.standard_conforming_strings
            .as_ref()
            .is_some_and(|c| c.leaves(ReadingSetting::StandardConformingStrings))
    }

    fn raise(&mut self, kind: StatementKind) {
        if self.kind.is_none_or(|k| kind.severity() > k.severity()) {
            self.kind = Some(kind);
        }
    }

    fn note_setting(&mut self, setting: ReadingSetting, change: SettingChange) {
        let slot = match setting {
            ReadingSetting::ClientEncoding => {
                if change != SettingChange::Reset {
                    self.flags.insert(Flag::ClientEncodingChange);
                }
                &mut self.client_encoding
            }
            ReadingSetting::StandardConformingStrings => &mut self.standard_conforming_strings,
        };
        if !slot.as_ref().is_some_and(|c| c.leaves(setting)) {
            *slot = Some(change);
        }
    }

    fn note_function(&mut self, name: String) {
        if let Some(area) = dangerous_function(&name) {
            self.flags.insert(Flag::DangerousFunction);
            if area == FunctionArea::ServerFiles {
                self.flags.insert(Flag::ServerFile);
            }
        }
        self.functions.insert(name);
    }

    /// Takes in a statement this one carries as SQL text; `runs`: it runs when this one does.
    fn absorb(&mut self, inner: StatementInfo, runs: bool) {
        if runs {
            self.raise(inner.kind());
        }
        if inner.writes {
            self.writes = true;
            self.flags.insert(Flag::NestedWrite);
        }
        self.tables.extend(inner.tables);
        self.functions.extend(inner.functions);
        self.flags.extend(inner.flags);
        self.custom_settings.extend(inner.custom_settings);
        if let Some(change) = inner.client_encoding {
            self.note_setting(ReadingSetting::ClientEncoding, change);
        }
        if let Some(change) = inner.standard_conforming_strings {
            self.note_setting(ReadingSetting::StandardConformingStrings, change);
        }
    }
}

/// Why a text gets no classification; every one blocks the statement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("the statement does not parse: {0}")]
    Syntax(String),
    /// A limit of the classifier that a statement reached (deterministic): too many SQL
    /// texts, or SQL text its grammar does not read.
    #[error("the statement cannot be classified: {0}")]
    TooComplex(String),
    /// The classifier could not run this time (no thread); trying again may succeed.
    #[error("the statement cannot be classified now: {0}")]
    Unavailable(String),
}

/// The stack of the classifying thread. libpg_query hands over trees up to 10,000 protobuf
/// messages deep; decoding, serialising, walking and dropping one takes about 1.7 KB of stack
/// per level in an optimised build (17 MB measured for the deepest) and about 25 KB unoptimised
/// (250 MB). Only the pages a statement touches are ever committed.
pub const CLASSIFY_STACK: usize = if cfg!(debug_assertions) {
    512 << 20
} else {
    64 << 20
};

/// At most this many SQL texts inside one message are classified (`query_to_xml('…')`
/// inside `query_to_xml('…')` …); a message with more is refused.
const MAX_SQL_TEXTS: usize = 64;

/// The most stack one byte of SQL takes to classify, with room to spare. The deepest trees per
/// byte are chains of one-character prefix operators (`+-+-+-…1`: one level per byte); they
/// took 2.3 KB per byte in an optimised build (1.1–1.8 KB for operator chains, nested calls and
/// arrays), parser, decoding, walking and dropping together.
const STACK_PER_BYTE: usize = if cfg!(debug_assertions) {
    64 << 10
} else {
    8 << 10
};

/// Stack left untouched below a classification on the caller's thread: libpg_query's own
/// margin (512 KB) and more.
const STACK_RESERVE: usize = 1 << 20;

/// Classifies every statement of `sql` (one Query message may hold several): on the caller's
/// thread when its stack has room for the deepest tree a text this long can give, otherwise
/// on a classifier thread, whose stack has room for the deepest tree the parser hands over.
pub fn classify(sql: &str) -> Result<Vec<StatementInfo>, ClassifyError> {
    let need = sql
        .len()
        .saturating_mul(STACK_PER_BYTE)
        .saturating_add(STACK_RESERVE);
    if stacker::remaining_stack().is_some_and(|left| left >= need) {
        return classify_here(sql);
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let job = Job {
        sql: sql.to_owned(),
        reply,
    };
    classifiers()?
        .send(job)
        .map_err(|_| ClassifyError::Unavailable("the classifier threads stopped".into()))?;
    match answer.recv() {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(ClassifyError::Unavailable(
            "the classifier thread stopped".into(),
        )),
    }
}

/// A text to classify and where its answer goes (a panic of the classifier is handed to the
/// caller, as if it had classified the text itself).
struct Job {
    sql: String,
    reply: mpsc::SyncSender<std::thread::Result<Result<Vec<StatementInfo>, ClassifyError>>>,
}

/// The classifier threads, one per core, started on first use (a thread costs more to start
/// than a statement costs to classify), for texts too long to classify on the caller's stack.
fn classifiers() -> Result<mpsc::Sender<Job>, ClassifyError> {
    static CLASSIFIERS: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let mut classifiers = CLASSIFIERS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(jobs) = classifiers.as_ref() {
        return Ok(jobs.clone());
    }
    let (jobs, queue) = mpsc::channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..threads {
        let queue = queue.clone();
        std::thread::Builder::new()
            .name("vigil-classify".into())
            .stack_size(CLASSIFY_STACK)
            .spawn(move || loop {
                let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok(job) = job else { return };
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| classify_here(&job.sql)));
                // The caller may have given up waiting; nothing to do then.
                let _ = job.reply.send(result);
            })
            .map_err(|e| ClassifyError::Unavailable(format!("no classifier thread: {e}")))?;
    }
    *classifiers = Some(jobs.clone());
    Ok(jobs)
}

/// SQL a statement hands to the server as text, to be classified after its tree is walked
/// (iteratively, so nested texts do not stack their trees' depths).
struct Pending {
    text: String,
    /// It runs when the statement runs (not under a plain `EXPLAIN`).
    runs: bool,
    /// Where the text goes when it is SQL for certain (a function's SQL argument, the body of a
    /// `LANGUAGE sql` function): there a text the parser rejects refuses the statement, since
    /// an older server may run it. `None`: it may be something else (a dblink connection
    /// string), and adds nothing when it does not parse.
    sql_of: Option<String>,
}

fn classify_here(sql: &str) -> Result<Vec<StatementInfo>, ClassifyError> {
    let mut budget = MAX_SQL_TEXTS;
    let mut out = Vec::new();
    for (mut info, mut pending) in parse_statements(sql)? {
        while let Some(p) = pending.pop() {
            budget = budget.checked_sub(1).ok_or_else(|| {
                ClassifyError::TooComplex(format!(
                    "more than {MAX_SQL_TEXTS} SQL texts inside one message"
                ))
            })?;
            // A constant that may not be SQL (a connection string) adds nothing when it does
            // not parse: the flag that queued it is set. SQL text the parser rejects is not
            // necessarily rejected by the target (PostgreSQL 15 takes `system_user` as an
            // alias, 18 does not), so what it would run is unknown: refused.
            let inner = match (parse_statements(&p.text), p.sql_of) {
                (Ok(inner), _) => inner,
                (Err(_), None) => continue,
                (Err(ClassifyError::Syntax(e)), Some(of)) => {
                    return Err(ClassifyError::TooComplex(format!(
                        "the SQL text of {of} does not parse: {e}"
                    )))
                }
                (Err(e), Some(_)) => return Err(e),
            };
            for (i, more) in inner {
                info.absorb(i, p.runs);
                pending.extend(more.into_iter().map(|m| Pending {
                    runs: m.runs && p.runs,
                    ..m
                }));
            }
        }
        out.push(info);
    }
    Ok(out)
}

fn parse_statements(sql: &str) -> Result<Vec<(StatementInfo, Vec<Pending>)>, ClassifyError> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| ClassifyError::Syntax(e.to_string()))?;
    let tree = Tree::of(&parsed.protobuf).map_err(|e| ClassifyError::Syntax(e.to_string()))?;
    let stmts = tree.get("stmts").and_then(Tree::as_array);
    Ok(stmts
        .into_iter()
        .flatten()
        .filter_map(|raw| raw.get("stmt")?.get("node"))
        .map(classify_statement)
        .collect())
}

/// Where the walk is.
#[derive(Clone, Copy)]
struct Ctx {
    /// Statement scopes above this node (a write below one is nested).
    depth: usize,
    /// What is here runs when the statement runs (false under a plain `EXPLAIN`).
    runs: bool,
    /// Under a list of what a query returns (its target list, `RETURNING`, `VALUES`): a
    /// column referenced here may be in a result.
    output: bool,
}

/// The fields that hold what a query returns.
/// The fields whose values a query returns: its target list, `RETURNING` and `VALUES`, and
/// what a function in `FROM` (`unnest(ARRAY[c.ssn])`, `jsonb_each_text(to_jsonb(c))`), an
/// `XMLTABLE` or a `JSON_TABLE` is given (its rows are the query's, an outside review).
const OUTPUT_LISTS: &[&str] = &[
    "target_list",
    "returning_clause",
    "values_lists",
    "functions",
    "docexpr",
    "rowexpr",
    "context_item",
];

struct Walk {
    info: StatementInfo,
    pending: Vec<Pending>,
    /// The names a row is known by in the statement (a table's name, any alias in `FROM`:
    /// a table's, a join's, a subquery's, a function's): a reference to one of them returns
    /// the whole row.
    ranges: BTreeSet<String>,
}

fn classify_statement(node: &Tree) -> (StatementInfo, Vec<Pending>) {
    let mut w = Walk {
        info: StatementInfo::default(),
        pending: Vec::new(),
        ranges: BTreeSet::new(),
    };
    let Some((name, body)) = single(node) else {
        return (w.info, w.pending);
    };
    let ctx = Ctx {
        depth: 0,
        runs: true,
        output: false,
    };
    w.walk(node, ctx);
    // A whole row returned (`SELECT c FROM customers c`, `row_to_json(c)`, `c::text`): every
    // column of it, as `c.*`.
    if w.info.columns.iter().any(|c| w.ranges.contains(c)) {
        w.info.columns.insert("*".to_string());
    }
    top_level(name, body, &mut w.info);
    if name == "ExplainStmt" && explain_analyze(body) && w.info.kind() != StatementKind::Read {
        w.info.flags.insert(Flag::ExplainAnalyzeWrite);
    }
    (w.info, w.pending)
}

/// What only a top-level statement does to the session: prepared names, portals,
/// `client_encoding` and `standard_conforming_strings`.
fn top_level(name: &str, body: &Tree, info: &mut StatementInfo) {
    match name {
        "PrepareStmt" => info.prepares = Some(str_field(body, "name").to_string()),
        "DeallocateStmt" => {
            let n = str_field(body, "name");
            info.deallocates = Some((!n.is_empty()).then(|| n.to_string()));
        }
        "ExecuteStmt" => info.executes = Some(str_field(body, "name").to_string()),
        // EXPLAIN ANALYZE EXECUTE, CREATE TABLE … AS EXECUTE and EXPLAIN ANALYZE CREATE
        // TABLE … AS EXECUTE run the prepared statement they wrap, however deep.
        "ExplainStmt" | "CreateTableAsStmt" => {
            let mut wrapped = body;
            while let Some((inner, b)) = wrapped.pointer("/query/node").and_then(single) {
                match inner {
                    "ExecuteStmt" => {
                        info.executes = Some(str_field(b, "name").to_string());
                        break;
                    }
                    "ExplainStmt" | "CreateTableAsStmt" => wrapped = b,
                    _ => break,
                }
            }
        }
        "DiscardStmt" if discards_all(body) => {
            info.deallocates = Some(None);
            info.ends_portals = Some(None);
        }
        "FetchStmt" => {
            info.fetches = body.get("ismove").and_then(Tree::as_bool) != Some(true);
            info.cursor = Some(str_field(body, "portalname").to_string());
        }
        // Cursors share the portals' namespace.
        "ClosePortalStmt" => {
            let n = str_field(body, "portalname");
            info.ends_portals = Some((!n.is_empty()).then(|| n.to_string()));
        }
        "DeclareCursorStmt" => {
            info.ends_portals = Some(Some(str_field(body, "portalname").to_string()));
            // CURSOR_OPT_NO_SCROLL and CURSOR_OPT_HOLD (parsenodes.h).
            let options = body.get("options").and_then(Tree::as_i64).unwrap_or(0);
            info.reruns = options & 0x0004 == 0 || options & 0x0020 != 0;
        }
        "TransactionStmt" => {
            use pg_query::protobuf::TransactionStmtKind as T;
            // Ending a transaction (or rolling back to a savepoint) closes its portals.
            let keeps = [
                T::TransStmtBegin,
                T::TransStmtStart,
                T::TransStmtSavepoint,
                T::TransStmtRelease,
            ];
            let kind = body.get("kind").and_then(Tree::as_i64);
            if !keeps.iter().any(|k| Some(*k as i64) == kind) {
                info.ends_portals = Some(None);
            }
        }
        "VariableSetStmt" => {
            for (setting, change) in reading_set(body) {
                info.note_setting(setting, change);
            }
        }
        _ => {}
    }
}

/// What a top-level `SET`/`RESET` does to the [`ReadingSetting`]s (`SET NAMES` is a
/// `client_encoding` one).
fn reading_set(body: &Tree) -> Vec<(ReadingSetting, SettingChange)> {
    let Some(kind) = body.get("kind").and_then(Tree::as_i64) else {
        return Vec::new();
    };
    if kind == VariableSetKind::VarResetAll as i64 {
        return [
            ReadingSetting::ClientEncoding,
            ReadingSetting::StandardConformingStrings,
        ]
        .map(|s| (s, SettingChange::Reset))
        .to_vec();
    }
    let Some(setting) = ReadingSetting::named(str_field(body, "name")) else {
        return Vec::new();
    };
    let change = match kind {
        k if k == VariableSetKind::VarSetValue as i64 => body
            .pointer("/args/0/node")
            .and_then(constant_text)
            .map_or(SettingChange::NotConstant, SettingChange::To),
        k if k == VariableSetKind::VarSetDefault as i64
            || k == VariableSetKind::VarReset as i64 =>
        {
            SettingChange::Reset
        }
        // FROM CURRENT keeps the current value.
        _ => return Vec::new(),
    };
    vec![(setting, change)]
}

/// `DISCARD ALL`: what `RESET ALL`, `SET SESSION AUTHORIZATION DEFAULT`, `DEALLOCATE ALL`
/// and `CLOSE ALL` do, and more.
fn discards_all(body: &Tree) -> bool {
    body.get("target").and_then(Tree::as_i64) == Some(DiscardMode::DiscardAll as i64)
}

/// Settings whose value is a shell command the server runs (archiving, recovery, the SSL key's
/// passphrase): `ALTER SYSTEM` of one is a way to run a program, like `COPY … PROGRAM`.
const SHELL_COMMAND_SETTINGS: &[&str] = &[
    "archive_cleanup_command",
    "archive_command",
    "recovery_end_command",
    "restore_command",
    "ssl_passphrase_command",
];

fn explain_analyze(body: &Tree) -> bool {
    body.get("options")
        .and_then(Tree::as_array)
        .is_some_and(|opts| {
            opts.iter().any(|o| {
                o.pointer("/node/DefElem").is_some_and(|d| {
                    str_field(d, "defname") == "analyze"
                        && !d
                            .pointer("/arg/node/String/sval")
                            .and_then(Tree::as_str)
                            .is_some_and(|s| matches!(s, "false" | "off" | "0"))
                })
            })
        })
}

/// The node type and body of a `{ "TypeName": {...} }` object.
fn single(v: &Tree) -> Option<(&str, &Tree)> {
    match v {
        Tree::Object(fields) => match fields.as_slice() {
            [(k, v)] => k
                .starts_with(|c: char| c.is_ascii_uppercase())
                .then_some((*k, v)),
            _ => None,
        },
        _ => None,
    }
}

fn is_statement_node(name: &str) -> bool {
    name.ends_with("Stmt")
}

fn is_write_node(name: &str) -> bool {
    matches!(
        name,
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
    )
}

/// Statements whose inner statement is the statement itself (what it explains, prepares,
/// copies, declares or creates a table from), not one nested in it.
fn is_transparent(name: &str) -> bool {
    matches!(
        name,
        "ExplainStmt" | "PrepareStmt" | "CopyStmt" | "DeclareCursorStmt" | "CreateTableAsStmt"
    )
}

fn str_field<'a>(v: &'a Tree, key: &str) -> &'a str {
    v.get(key).and_then(Tree::as_str).unwrap_or("")
}

/// The text of a string constant (`'x'`, `'x'::text`, `name => 'x'`), or of a plain string.
fn constant_text(v: &Tree) -> Option<String> {
    match single(v)? {
        ("AConst", c) => c
            .pointer("/val/Sval/sval")
            .and_then(Tree::as_str)
            .map(str::to_string),
        ("String", s) => s.get("sval").and_then(Tree::as_str).map(str::to_string),
        ("TypeCast", c) | ("NamedArgExpr", c) => c.pointer("/arg/node").and_then(constant_text),
        _ => None,
    }
}

/// The last component of a qualified name: a list of `String` nodes, a `TypeName`, an
/// `ObjectWithArgs`, or a single `String`; lower case.
fn last_name(v: &Tree) -> Option<String> {
    let items = if let Some(items) = v.as_array() {
        items
    } else {
        match single(v) {
            Some(("TypeName", t)) => t.get("names")?.as_array()?,
            Some(("List", l)) => l.get("items")?.as_array()?,
            Some(("String", s)) => return s.get("sval")?.as_str().map(str::to_ascii_lowercase),
            _ => v.get("objname")?.as_array()?,
        }
    };
    items
        .last()?
        .pointer("/node/String/sval")
        .and_then(Tree::as_str)
        .map(str::to_ascii_lowercase)
}

/// How a statement names the functions it binds.
#[derive(Clone, Copy)]
enum Binding {
    /// A list of `DefElem` options; those in [`FUNCTION_OPTIONS`] name functions.
    Options,
    /// A qualified name (list of strings).
    Name,
    /// An `ObjectWithArgs`.
    Signature,
    /// Operator class items; the `FUNCTION` ones name functions.
    OpClassItems,
}

/// Options of `CREATE TYPE`, `OPERATOR`, `AGGREGATE`, `RANGE`, `TEXT SEARCH PARSER` and
/// `TEMPLATE`, `FOREIGN DATA WRAPPER`, `FUNCTION … SUPPORT` and their `ALTER`s that name a
/// function the server calls on its own account.
const FUNCTION_OPTIONS: &[&str] = &[
    "analyze",
    "canonical",
    "combinefunc",
    "deserialfunc",
    "end",
    "finalfunc",
    "function",
    "gettoken",
    "handler",
    "headline",
    "init",
    "input",
    "join",
    "lextypes",
    "lexize",
    "mfinalfunc",
    "minvfunc",
    "msfunc",
    "output",
    "procedure",
    "receive",
    "restrict",
    "send",
    "serialfunc",
    "sfunc",
    "sfunc1",
    "start",
    "subscript",
    "subtype_diff",
    "support",
    "typmod_in",
    "typmod_out",
    "validator",
];

/// The statements that bind functions into something that runs without a call in the tree,
/// and the fields that name them.
const BINDINGS: &[(&str, &[(&str, Binding)])] = &[
    ("AlterFdwStmt", &[("func_options", Binding::Options)]),
    ("AlterFunctionStmt", &[("actions", Binding::Options)]),
    ("AlterOpFamilyStmt", &[("items", Binding::OpClassItems)]),
    ("AlterOperatorStmt", &[("options", Binding::Options)]),
    ("AlterTypeStmt", &[("options", Binding::Options)]),
    ("CreateAmStmt", &[("handler_name", Binding::Name)]),
    ("CreateCastStmt", &[("func", Binding::Signature)]),
    ("CreateConversionStmt", &[("func_name", Binding::Name)]),
    ("CreateEventTrigStmt", &[("funcname", Binding::Name)]),
    ("CreateFdwStmt", &[("func_options", Binding::Options)]),
    ("CreateFunctionStmt", &[("options", Binding::Options)]),
    ("CreateOpClassStmt", &[("items", Binding::OpClassItems)]),
    (
        "CreatePlangStmt",
        &[
            ("plhandler", Binding::Name),
            ("plinline", Binding::Name),
            ("plvalidator", Binding::Name),
        ],
    ),
    ("CreateRangeStmt", &[("params", Binding::Options)]),
    (
        "CreateTransformStmt",
        &[
            ("fromsql", Binding::Signature),
            ("tosql", Binding::Signature),
        ],
    ),
    ("CreateTrigStmt", &[("funcname", Binding::Name)]),
    ("DefineStmt", &[("definition", Binding::Options)]),
];

/// The functions a statement binds (empty for one that binds none).
fn bound_functions(name: &str, body: &Tree) -> Vec<String> {
    let Some((_, fields)) = BINDINGS.iter().find(|(n, _)| *n == name) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (field, binding) in *fields {
        let Some(v) = body.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let items = v.as_array().unwrap_or_default();
        match binding {
            Binding::Name | Binding::Signature => out.extend(last_name(v)),
            Binding::Options => out.extend(items.iter().filter_map(|o| {
                let d = o.pointer("/node/DefElem")?;
                FUNCTION_OPTIONS
                    .contains(&str_field(d, "defname"))
                    .then(|| last_name(d.pointer("/arg/node")?))?
            })),
            Binding::OpClassItems => out.extend(items.iter().filter_map(|o| {
                let item = o.pointer("/node/CreateOpClassItem")?;
                // itemtype 2: OPCLASS_ITEM_FUNCTION (1 is an operator, 3 a storage type).
                (item.get("itemtype").and_then(Tree::as_i64) == Some(2))
                    .then(|| last_name(item.get("name")?))?
            })),
        }
    }
    out
}

fn is_foreign_data(name: &str, body: &Tree) -> bool {
    matches!(
        name,
        "CreateFdwStmt"
            | "AlterFdwStmt"
            | "CreateForeignServerStmt"
            | "AlterForeignServerStmt"
            | "CreateForeignTableStmt"
            | "CreateUserMappingStmt"
            | "AlterUserMappingStmt"
            | "ImportForeignSchemaStmt"
            | "CreateSubscriptionStmt"
            | "AlterSubscriptionStmt"
    ) || (name == "AlterTableStmt"
        && body.get("objtype").and_then(Tree::as_i64)
            == Some(ObjectType::ObjectForeignTable as i64))
}

impl Walk {
    /// The kind of one statement node (top-level or nested) and the flags it carries itself.
    fn statement(&mut self, name: &str, body: &Tree) -> StatementKind {
        use StatementKind as K;
        let info = &mut self.info;
        // Every DROP … and ALTER … carries its flag, whatever its object.
        if name.starts_with("Drop") {
            info.flags.insert(Flag::Drop);
        }
        // What a CASCADE reaches (a schema's tables, those referencing a truncated one) and
        // what DROP OWNED drops are tables the statement does not name.
        let cascades =
            body.get("behavior").and_then(Tree::as_i64) == Some(DropBehavior::DropCascade as i64);
        if (cascades && matches!(name, "DropStmt" | "TruncateStmt")) || name == "DropOwnedStmt" {
            info.tables.insert(ANY_TABLE.into());
        }
        if name.starts_with("Alter") || name == "RenameStmt" {
            info.flags.insert(Flag::Alter);
        }
        let bound = bound_functions(name, body);
        if !bound.is_empty() {
            info.flags.insert(Flag::Procedural);
        }
        for f in bound {
            info.note_function(f);
        }
        if is_foreign_data(name, body) {
            info.flags.insert(Flag::ForeignData);
        }
        match name {
            "SelectStmt" => {
                if body.get("into_clause").is_some_and(|v| !v.is_null()) {
                    K::Ddl
                } else {
                    K::Read
                }
            }
            n if is_write_node(n) => K::Write,
            // What these run is their inner statement, met by the walk.
            "ExplainStmt" | "PrepareStmt" | "DeclareCursorStmt" | "FetchStmt"
            | "VariableShowStmt" => K::Read,
            "CopyStmt" => {
                if body.get("is_program").and_then(Tree::as_bool) == Some(true) {
                    info.flags.insert(Flag::CopyProgram);
                } else if !str_field(body, "filename").is_empty() {
                    info.flags.insert(Flag::ServerFile);
                }
                if body.get("is_from").and_then(Tree::as_bool) == Some(true) {
                    K::Write
                } else {
                    K::Read
                }
            }
            "DropStmt" => {
                dropped_relations(body, info);
                K::Ddl
            }
            "DropdbStmt" | "DropTableSpaceStmt" | "DropOwnedStmt" => K::Ddl,
            "TruncateStmt" => {
                info.flags.insert(Flag::Truncate);
                K::Ddl
            }
            // It writes postgresql.auto.conf, which the server reads at its next start or reload.
            "AlterSystemStmt" => {
                info.flags.insert(Flag::AlterSystem);
                info.flags.insert(Flag::ServerFile);
                let setting = body.pointer("/setstmt/name").and_then(Tree::as_str);
                if setting.is_some_and(|s| {
                    SHELL_COMMAND_SETTINGS
                        .iter()
                        .any(|c| c.eq_ignore_ascii_case(s))
                }) {
                    info.flags.insert(Flag::CopyProgram);
                }
                K::Ddl
            }
            // Its LOCATION is a directory of the server's file system, which it writes.
            "CreateTableSpaceStmt" => {
                info.flags.insert(Flag::ServerFile);
                K::Ddl
            }
            "AlterTableStmt"
            | "AlterDomainStmt"
            | "AlterEnumStmt"
            | "AlterSeqStmt"
            | "AlterFunctionStmt"
            | "AlterObjectSchemaStmt"
            | "AlterOwnerStmt"
            | "RenameStmt"
            | "AlterDatabaseStmt"
            | "AlterDatabaseSetStmt"
            | "AlterTableSpaceOptionsStmt"
            | "AlterTypeStmt" => K::Ddl,
            // ALTER EXTENSION … UPDATE runs the extension's scripts.
            "CreateExtensionStmt" | "AlterExtensionStmt" => {
                info.flags.insert(Flag::Procedural);
                K::Ddl
            }
            "CreateFunctionStmt" | "CreatePlangStmt" => {
                info.flags.insert(Flag::Procedural);
                if name == "CreateFunctionStmt" {
                    self.sql_function_body(body);
                }
                K::Ddl
            }
            "DoStmt" | "CallStmt" => {
                info.flags.insert(Flag::Procedural);
                K::Procedural
            }
            "GrantStmt"
            | "GrantRoleStmt"
            | "CreateRoleStmt"
            | "AlterRoleStmt"
            | "AlterRoleSetStmt"
            | "DropRoleStmt"
            | "AlterDefaultPrivilegesStmt"
            | "ReassignOwnedStmt"
            | "CreatePolicyStmt"
            | "AlterPolicyStmt" => K::Privilege,
            "VariableSetStmt" => {
                let var = str_field(body, "name").to_ascii_lowercase();
                // RESET ALL and SET ROLE / SESSION AUTHORIZATION all change who acts.
                if var == "role" || var == "session_authorization" || var.is_empty() {
                    info.flags.insert(Flag::RoleChange);
                }
                if var.contains('.') {
                    info.custom_settings.insert(var);
                }
                K::Session
            }
            // DISCARD ALL sets the session authorization back, as RESET ALL does.
            "DiscardStmt" => {
                if discards_all(body) {
                    info.flags.insert(Flag::RoleChange);
                }
                K::Session
            }
            "ClosePortalStmt" | "ListenStmt" | "UnlistenStmt" | "DeallocateStmt" => K::Session,
            "TransactionStmt" => {
                use pg_query::protobuf::TransactionStmtKind as T;
                // Two-phase commit: COMMIT PREPARED commits writes of another session (any
                // session of the role), ROLLBACK PREPARED discards them, PREPARE TRANSACTION
                // keeps this one's locks past the session: writes, not transaction control.
                let two_phase = [
                    T::TransStmtPrepare,
                    T::TransStmtCommitPrepared,
                    T::TransStmtRollbackPrepared,
                ];
                let kind = body.get("kind").and_then(Tree::as_i64);
                if two_phase.iter().any(|k| Some(*k as i64) == kind) {
                    K::Write
                } else {
                    K::Transaction
                }
            }
            "LoadStmt" => {
                info.flags.insert(Flag::ServerFile);
                K::Utility
            }
            n if n.starts_with("Create")
                || n.starts_with("Define")
                || n == "IndexStmt"
                || n == "ViewStmt"
                || n == "RuleStmt"
                || n == "CommentStmt"
                || n == "CompositeTypeStmt"
                || n == "SecLabelStmt" =>
            {
                K::Ddl
            }
            _ => K::Utility,
        }
    }

    /// The body of a `LANGUAGE sql` function given as a string runs whenever it is called.
    fn sql_function_body(&mut self, body: &Tree) {
        let options = body.get("options").and_then(Tree::as_array);
        let option = |name: &str| {
            options
                .into_iter()
                .flatten()
                .filter_map(|o| o.pointer("/node/DefElem"))
                .find(|d| str_field(d, "defname") == name)
                .and_then(|d| d.pointer("/arg/node"))
        };
        let sql = option("language")
            .and_then(constant_text)
            .is_some_and(|l| l.eq_ignore_ascii_case("sql"));
        if !sql {
            return;
        }
        let texts = option("as")
            .and_then(|a| a.pointer("/List/items"))
            .and_then(Tree::as_array);
        for t in texts.into_iter().flatten() {
            if let Some(text) = t.pointer("/node").and_then(constant_text) {
                self.pending.push(Pending {
                    text,
                    runs: true,
                    sql_of: Some("a LANGUAGE sql function".into()),
                });
            }
        }
    }

    /// Walks the fields of node `name`; its statement scope opens here unless it is
    /// transparent, and a plain `EXPLAIN` does not run what it explains.
    fn children(&mut self, name: &str, body: &Tree, ctx: Ctx) {
        let ctx = Ctx {
            depth: if is_statement_node(name) && !is_transparent(name) {
                ctx.depth + 1
            } else {
                ctx.depth
            },
            runs: ctx.runs && (name != "ExplainStmt" || explain_analyze(body)),
            output: ctx.output,
        };
        self.walk(body, ctx);
    }

    fn walk(&mut self, v: &Tree, ctx: Ctx) {
        match v {
            Tree::Object(fields) => {
                if let Some((name, body)) = single(v) {
                    self.node(name, body, ctx);
                    self.children(name, body, ctx);
                } else {
                    // A RangeVar held directly in a field (`relation`) is not wrapped.
                    if v.get("relpersistence").is_some() {
                        add_table(v, &mut self.info);
                        let name = str_field(v, "relname");
                        if !name.is_empty() {
                            self.ranges.insert(name.to_string());
                        }
                    }
                    if let Some(alias) = v.pointer("/alias/aliasname").and_then(Tree::as_str) {
                        self.ranges.insert(alias.to_string());
                    }
                    for (key, value) in fields {
                        let output = ctx.output || OUTPUT_LISTS.contains(key);
                        self.walk(value, Ctx { output, ..ctx });
                    }
                }
            }
            Tree::Array(items) => {
                for item in items {
                    self.walk(item, ctx);
                }
            }
            _ => {}
        }
    }

    /// What one node contributes (the top-level statement included).
    fn node(&mut self, name: &str, body: &Tree, ctx: Ctx) {
        if is_statement_node(name) {
            let kind = self.statement(name, body);
            if ctx.runs {
                self.info.raise(kind);
            }
        }
        if name == "FuncCall" {
            return self.call(body, ctx);
        }
        if matches!(name, "ColumnRef" | "AIndirection") {
            return self.attribute_calls(name, body, ctx);
        }
        let info = &mut self.info;
        match name {
            n if is_write_node(n) => {
                info.writes = true;
                // pg_settings' rule makes an UPDATE of it set_config(name, setting) for each
                // row it matches: any setting, to any value.
                if n == "UpdateStmt"
                    && body.pointer("/relation/relname").and_then(Tree::as_str)
                        == Some("pg_settings")
                {
                    for setting in [
                        ReadingSetting::ClientEncoding,
                        ReadingSetting::StandardConformingStrings,
                    ] {
                        info.note_setting(setting, SettingChange::NotConstant);
                    }
                }
                if ctx.depth > 0 {
                    info.flags.insert(Flag::NestedWrite);
                }
                if body.get("where_clause").is_some_and(Tree::is_null) {
                    without_where(n, info);
                }
                // An upsert of a query's rows whose `DO UPDATE` has no WHERE of its own
                // rewrites every row its source conflicts with (`INSERT INTO t SELECT * FROM t
                // ON CONFLICT (id) DO UPDATE SET email = NULL`), as MERGE does; one of listed
                // values changes only those rows.
                if n == "InsertStmt" && upserts_a_query_without_where(body) {
                    without_where("UpdateStmt", info);
                }
            }
            // A MERGE action without its own condition acts on every matched row.
            "MergeWhenClause" if body.get("condition").is_some_and(Tree::is_null) => {
                let command = body.get("command_type").and_then(Tree::as_i64);
                if command == Some(CmdType::CmdDelete as i64) {
                    without_where("DeleteStmt", info);
                } else if command == Some(CmdType::CmdUpdate as i64) {
                    without_where("UpdateStmt", info);
                }
            }
            // file_fdw and its like: a foreign table or server that runs a program or reads a
            // server file on every scan.
            "DefElem" => match str_field(body, "defname") {
                "program" => {
                    info.flags.insert(Flag::CopyProgram);
                }
                "filename" => {
                    info.flags.insert(Flag::ServerFile);
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// PostgreSQL's attribute notation: `x.f` and `(expr).f` call `f(x)` when `x` has no
    /// column `f` (`SELECT ('/etc/passwd'::text).pg_read_file`), and the parse tree holds a
    /// column reference or an indirection there, not a call. Each field name of an indirection
    /// is taken as a possible call (with the indirection's argument), and so is the last field
    /// of a qualified column reference (`q.nextval FROM CAST('s' AS regclass) q`): a column of
    /// the name of a function a rule lists counts as a call of it, the safe side. Only a
    /// dangerous name makes the statement dangerous.
    fn attribute_calls(&mut self, name: &str, body: &Tree, ctx: Ctx) {
        let field = |f: &Tree| {
            f.pointer("/node/String/sval")
                .and_then(Tree::as_str)
                .map(str::to_ascii_lowercase)
        };
        if name == "ColumnRef" {
            let fields = body.get("fields").and_then(Tree::as_array);
            let last = fields.and_then(|f| f.last()).filter(|_| ctx.output);
            if let Some(column) = last.and_then(|f| {
                f.pointer("/node/String/sval")
                    .and_then(Tree::as_str)
                    .or(f.pointer("/node/AStar").map(|_| "*"))
            }) {
                self.info.columns.insert(column.to_string());
            }
            let called = fields
                .filter(|f| f.len() >= 2)
                .and_then(|f| f.last())
                .and_then(field);
            if let Some(called) = called {
                self.called(called, std::iter::empty(), ctx);
            }
            return;
        }
        let arg = body.pointer("/arg/node");
        let fields = body.get("indirection").and_then(Tree::as_array);
        for called in fields.into_iter().flatten().filter_map(field) {
            if ctx.output {
                // `(c).ssn` returns the column `ssn` of the row `c`.
                self.info.columns.insert(called.clone());
            }
            self.called(called, arg, ctx);
        }
    }

    fn call(&mut self, body: &Tree, ctx: Ctx) {
        let Some(name) = body.get("funcname").and_then(last_name) else {
            return;
        };
        let args = body.get("args").and_then(Tree::as_array);
        if name == "set_config" {
            let arg = |i: usize| {
                args.and_then(|a| a.get(i))
                    .and_then(|a| a.get("node"))
                    .and_then(constant_text)
            };
            match arg(0) {
                Some(name) => {
                    if name.contains('.') {
                        self.info.custom_settings.insert(name.to_ascii_lowercase());
                    }
                    if let Some(setting) = ReadingSetting::named(&name) {
                        let change = arg(1).map_or(SettingChange::NotConstant, SettingChange::To);
                        self.info.note_setting(setting, change);
                    }
                }
                None => {
                    self.info
                        .note_setting(ReadingSetting::ClientEncoding, SettingChange::NotConstant);
                    self.info.note_setting(
                        ReadingSetting::StandardConformingStrings,
                        SettingChange::NotConstant,
                    );
                }
            }
        }
        let args = args.into_iter().flatten().filter_map(|a| a.get("node"));
        self.called(name, args, ctx);
    }

    /// A call of function `name` with the argument expressions `args`: the SQL text it runs
    /// (a constant argument of a function that runs SQL text) is read too.
    fn called<'t>(&mut self, name: String, args: impl IntoIterator<Item = &'t Tree>, ctx: Ctx) {
        if let Some(runs) = sql_text_function(&name) {
            self.info.flags.insert(Flag::ExecutesSqlText);
            let args: Vec<&Tree> = args.into_iter().collect();
            match runs {
                SqlText::Query => {
                    for (i, arg) in args.iter().enumerate() {
                        if let Some(text) = constant_text(arg) {
                            self.pending.push(Pending {
                                text,
                                runs: ctx.runs,
                                sql_of: is_sql_argument(&name, &args, i).then(|| name.clone()),
                            });
                        }
                    }
                }
                SqlText::Table => {
                    let table = parameter(&args, 0, "tbl")
                        .and_then(|i| constant_text(args[i]))
                        .and_then(|t| regclass_name(&t));
                    self.info
                        .tables
                        .insert(table.unwrap_or_else(|| ANY_TABLE.into()));
                }
                SqlText::Built => match built_query(&name, &args) {
                    Some(text) => self.pending.push(Pending {
                        text,
                        runs: ctx.runs,
                        sql_of: Some(name.clone()),
                    }),
                    None => {
                        self.info.tables.insert(ANY_TABLE.into());
                    }
                },
                SqlText::Opaque => {}
            }
        }
        self.info.note_function(name);
    }
}

/// Whether an INSERT takes its rows from a query (not a VALUES list) and updates the rows they
/// conflict with, with no WHERE on the update.
fn upserts_a_query_without_where(insert: &Tree) -> bool {
    let Some(conflict) = insert.get("on_conflict_clause") else {
        return false;
    };
    let updates = conflict.get("action").and_then(Tree::as_i64)
        == Some(OnConflictAction::OnconflictUpdate as i64);
    let values = insert
        .pointer("/select_stmt/node/SelectStmt/values_lists")
        .and_then(Tree::as_array)
        .is_some_and(|v| !v.is_empty());
    updates && !values && conflict.get("where_clause").is_none_or(Tree::is_null)
}

fn without_where(write: &str, info: &mut StatementInfo) {
    match write {
        "DeleteStmt" => info.flags.insert(Flag::DeleteWithoutWhere),
        "UpdateStmt" => info.flags.insert(Flag::UpdateWithoutWhere),
        _ => false,
    };
}

fn add_table(range_var: &Tree, info: &mut StatementInfo) {
    let rel = str_field(range_var, "relname");
    let schema = str_field(range_var, "schemaname");
    // `customers t(id, name, x)` renames its columns: `x` may be any of them.
    let renamed = range_var
        .pointer("/alias/colnames")
        .and_then(Tree::as_array)
        .is_some_and(|names| !names.is_empty());
    if renamed {
        info.columns.insert("*".to_string());
    }
    if !rel.is_empty() {
        info.tables.insert(if schema.is_empty() {
            rel.to_string()
        } else {
            format!("{schema}.{rel}")
        });
    }
}

/// Names of the relations a `DROP TABLE/VIEW/…` removes (they are name lists, not RangeVars).
fn dropped_relations(body: &Tree, info: &mut StatementInfo) {
    use ObjectType as O;
    const RELATIONS: &[i64] = &[
        O::ObjectTable as i64,
        O::ObjectView as i64,
        O::ObjectMatview as i64,
        O::ObjectSequence as i64,
        O::ObjectForeignTable as i64,
        O::ObjectIndex as i64,
    ];
    let relation = body
        .get("remove_type")
        .and_then(Tree::as_i64)
        .is_some_and(|t| RELATIONS.contains(&t));
    if !relation {
        return;
    }
    for object in body
        .get("objects")
        .and_then(Tree::as_array)
        .into_iter()
        .flatten()
    {
        let parts: Vec<&str> = object
            .pointer("/node/List/items")
            .and_then(Tree::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.pointer("/node/String/sval").and_then(Tree::as_str))
            .collect();
        if !parts.is_empty() {
            info.tables.insert(parts.join("."));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Flag as F;
    use StatementKind as K;

    fn one(sql: &str) -> StatementInfo {
        let mut v = classify(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn the_columns_a_result_may_be_made_of() {
        let columns = |sql: &str| one(sql).columns.into_iter().collect::<Vec<_>>();
        assert_eq!(
            columns("SELECT name FROM c WHERE id = 1 UNION SELECT x FROM d"),
            ["name", "x"]
        );
        assert_eq!(columns("SELECT (SELECT c.ssn FROM c LIMIT 1)"), ["ssn"]);
        assert_eq!(columns("SELECT t.* FROM c t WHERE t.ssn = '1'"), ["*"]);
        assert_eq!(
            columns("DELETE FROM c WHERE ssn = '1' RETURNING name"),
            ["name"]
        );
        assert_eq!(columns("VALUES ((SELECT ssn FROM c))"), ["ssn"]);
        // Renamed columns and a row's field (an outside review).
        assert_eq!(columns("SELECT x::text FROM c t(id, name, x)"), ["*", "x"]);
        // The row `c` is named as a whole: counted as every column, the safe side.
        assert_eq!(columns("SELECT (c).ssn::text FROM c"), ["*", "c", "ssn"]);
        // A whole row, by its alias or its table's name (an outside review: `row_to_json(c)`
        // returned every ruled column in clear).
        assert_eq!(columns("SELECT c FROM customers c"), ["*", "c"]);
        assert_eq!(
            columns("SELECT row_to_json(c) FROM customers c WHERE c.id = 1"),
            ["*", "c"]
        );
        assert_eq!(
            columns("SELECT customers::text FROM public.customers"),
            ["*", "customers"]
        );
        assert_eq!(columns("SELECT name FROM customers c"), ["name"]);
        // A join's or a subquery's alias names a row too; what a function in FROM is given is
        // what the query returns (an outside review: both sent ruled values in clear).
        assert_eq!(
            columns("SELECT j FROM (customers c JOIN customers d USING (id)) j"),
            ["*", "j"]
        );
        assert_eq!(
            columns("SELECT x FROM customers c, unnest(ARRAY[c.ssn]) x WHERE c.id = 1"),
            ["*", "ssn", "x"]
        );
        assert_eq!(
            columns("SELECT value FROM customers c, jsonb_each_text(to_jsonb(c))"),
            ["*", "c", "value"]
        );
        // Only what a query returns: a filter's columns are not.
        assert!(columns("SELECT count(*) FROM c WHERE name = 'x' GROUP BY ssn").is_empty());
    }

    #[test]
    fn two_phase_commit_is_a_write() {
        for sql in [
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "PREPARE TRANSACTION 'x'",
        ] {
            assert_eq!(one(sql).kind(), K::Write, "{sql}");
        }
        assert_eq!(one("COMMIT").kind(), K::Transaction);
    }

    #[test]
    fn an_upsert_of_a_query_without_where_updates_without_where() {
        let flagged = |sql: &str| one(sql).flags.contains(&F::UpdateWithoutWhere);
        assert!(flagged(
            "INSERT INTO t2 SELECT * FROM t2 ON CONFLICT (id) DO UPDATE SET email = NULL"
        ));
        assert!(!flagged(
            "INSERT INTO t2 SELECT * FROM t2 ON CONFLICT (id) DO UPDATE SET email = NULL WHERE t2.id = 1"
        ));
        assert!(!flagged(
            "INSERT INTO t2 VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email"
        ));
        assert!(!flagged(
            "INSERT INTO t2 SELECT * FROM t3 ON CONFLICT DO NOTHING"
        ));
    }

    #[test]
    fn kinds_and_flags() {
        assert_eq!(one("SELECT * FROM t").kind(), K::Read);
        assert!(one("DELETE FROM t").flags.contains(&F::DeleteWithoutWhere));
        assert!(!one("DELETE FROM t WHERE id = 1")
            .flags
            .contains(&F::DeleteWithoutWhere));
        assert!(one("update t set a = 1")
            .flags
            .contains(&F::UpdateWithoutWhere));
        let cte = one("WITH d AS (DELETE FROM s.t WHERE x RETURNING *) SELECT * FROM d");
        assert_eq!(cte.kind(), K::Write);
        assert!(cte.flags.contains(&F::NestedWrite));
        assert!(cte.tables.contains("s.t"));
        let ex = one("EXPLAIN (ANALYZE) UPDATE t SET a = 1 WHERE id = 2");
        assert_eq!(ex.kind(), K::Write);
        assert_eq!(one("EXPLAIN UPDATE t SET a = 1").kind(), K::Read);
        for sql in [
            "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d",
            "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
            "EXPLAIN ANALYZE SELECT 1 INTO x",
        ] {
            let c = one(sql);
            assert_ne!(c.kind(), K::Read, "{sql}");
            assert!(c.flags.contains(&F::ExplainAnalyzeWrite), "{sql}");
        }
        assert!(one("FETCH ALL FROM c").fetches);
        assert!(one("FETCH 10 IN c").fetches);
        assert!(!one("MOVE ALL IN c").fetches);
        assert_eq!(one("MOVE ALL IN c").cursor.as_deref(), Some("c"));
        assert_eq!(
            one("FETCH 10 IN \"Pörtal\"").cursor.as_deref(),
            Some("Pörtal")
        );
        assert!(one("DECLARE c CURSOR FOR SELECT 1").reruns);
        assert!(one("DECLARE c SCROLL CURSOR FOR SELECT 1").reruns);
        assert!(one("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1").reruns);
        assert!(!one("DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1").reruns);
        assert!(!one("DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR FOR SELECT 1").reruns);
        // However deep the wrapping: each of these runs p.
        for sql in [
            "EXPLAIN ANALYZE EXECUTE p",
            "CREATE TABLE x AS EXECUTE p",
            "EXPLAIN ANALYZE CREATE TEMP TABLE x AS EXECUTE p",
            "EXPLAIN (ANALYZE, BUFFERS) CREATE TABLE x AS EXECUTE p(1)",
        ] {
            assert_eq!(one(sql).executes.as_deref(), Some("p"), "{sql}");
        }
        assert_eq!(
            one("COPY (DELETE FROM t RETURNING *) TO STDOUT").kind(),
            K::Write
        );
        assert!(one("COPY t TO PROGRAM 'cat'")
            .flags
            .contains(&F::CopyProgram));
        assert!(one("COPY t FROM '/etc/passwd'")
            .flags
            .contains(&F::ServerFile));
        assert!(
            one("SELECT x FROM (SELECT pg_read_file('/etc/passwd') x) s")
                .flags
                .contains(&F::DangerousFunction)
        );
        assert!(one("SET ROLE postgres").flags.contains(&F::RoleChange));
        assert!(one("SET SESSION AUTHORIZATION postgres")
            .flags
            .contains(&F::RoleChange));
        assert!(!one("SET search_path = public")
            .flags
            .contains(&F::RoleChange));
        assert_eq!(
            one("DO $$ BEGIN DELETE FROM t; END $$").kind(),
            K::Procedural
        );
        assert!(one("DROP TABLE t").flags.contains(&F::Drop));
        let drop = one("DROP TABLE s.t, u");
        assert!(drop.tables.contains("s.t") && drop.tables.contains("u"));
        assert!(one("DROP ROLE r").flags.contains(&F::Drop));
        assert!(one("ALTER SUBSCRIPTION s DISABLE")
            .flags
            .contains(&F::Alter));
        assert!(
            one("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()")
                .flags
                .contains(&F::Procedural)
        );
        assert!(one("TRUNCATE t").flags.contains(&F::Truncate));
        assert_eq!(one("GRANT ALL ON t TO public").kind(), K::Privilege);
        let p = one("PREPARE p AS DELETE FROM t");
        assert_eq!((p.kind(), p.prepares.as_deref()), (K::Write, Some("p")));
        assert!(p.flags.contains(&F::DeleteWithoutWhere));
        assert_eq!(one("EXECUTE p(1)").executes.as_deref(), Some("p"));
        assert_eq!(one("BEGIN").kind(), K::Transaction);
        assert_eq!(one("CREATE TABLE x (a int)").kind(), K::Ddl);
    }

    fn has(sql: &str, flag: Flag) -> bool {
        one(sql).flags.contains(&flag)
    }

    #[test]
    fn ddl_that_binds_functions_is_classified_by_the_function() {
        for sql in [
            "CREATE OPERATOR === (function = public.pg_read_file, leftarg = text, rightarg = text)",
            "CREATE CAST (text AS int) WITH FUNCTION pg_read_file(text)",
            "CREATE AGGREGATE a(text) (sfunc = pg_read_file, stype = text)",
            "CREATE TYPE t (input = pg_read_file, output = textout)",
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION pg_read_file()",
            "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION pg_read_file()",
            "CREATE OPERATOR CLASS c FOR TYPE int USING btree AS OPERATOR 1 <, FUNCTION 1 pg_read_file(text)",
            "CREATE DEFAULT CONVERSION c FOR 'LATIN1' TO 'UTF8' FROM pg_read_file",
            "CREATE LANGUAGE l HANDLER pg_read_file",
            "CREATE ACCESS METHOD m TYPE TABLE HANDLER pg_read_file",
            "CREATE FOREIGN DATA WRAPPER w HANDLER pg_read_file",
            "CREATE TYPE r AS RANGE (subtype = int, subtype_diff = pg_read_file)",
            "ALTER OPERATOR === (text, text) SET (restrict = pg_read_file)",
            "CREATE TEXT SEARCH PARSER p (start = pg_read_file, gettoken = a, end = b, lextypes = c)",
        ] {
            let c = one(sql);
            assert!(c.functions.contains("pg_read_file"), "{sql}: {c:?}");
            assert!(c.flags.contains(&F::Procedural), "{sql}");
            assert!(c.flags.contains(&F::DangerousFunction), "{sql}");
            assert!(c.flags.contains(&F::ServerFile), "{sql}");
        }
        // A harmless bound function is named, but not dangerous.
        let op = one("CREATE OPERATOR <<< (function = textlt, leftarg = text, rightarg = text)");
        assert!(op.functions.contains("textlt") && op.flags.contains(&F::Procedural));
        assert!(!op.flags.contains(&F::DangerousFunction));
        // DDL that binds no function is not procedural.
        assert!(!has("CREATE COLLATION c (locale = 'C')", F::Procedural));
        assert!(has("CREATE EXTENSION dblink", F::Procedural));
    }

    #[test]
    fn foreign_data_with_programs_and_files() {
        let program = one("CREATE FOREIGN TABLE f (a text) SERVER s OPTIONS (program 'id')");
        assert!(program.flags.contains(&F::CopyProgram) && program.flags.contains(&F::ForeignData));
        assert!(has(
            "ALTER FOREIGN TABLE f OPTIONS (SET filename '/etc/passwd')",
            F::ServerFile
        ));
        assert!(has(
            "ALTER FOREIGN TABLE f OPTIONS (ADD program 'id')",
            F::CopyProgram
        ));
        assert!(has(
            "CREATE SERVER s FOREIGN DATA WRAPPER file_fdw",
            F::ForeignData
        ));
        assert!(has(
            "CREATE USER MAPPING FOR public SERVER s OPTIONS (user 'postgres')",
            F::ForeignData
        ));
        assert!(has(
            "IMPORT FOREIGN SCHEMA x FROM SERVER s INTO public",
            F::ForeignData
        ));
    }

    /// `x.f` calls `f(x)` (attribute notation): an outside review read server files, ran
    /// SQL over dblink and slept through these on a read-only connection.
    #[test]
    fn functions_called_with_attribute_notation_are_calls() {
        for sql in [
            "SELECT ('/etc/hostname'::text).pg_read_file",
            "SELECT q.pg_ls_dir FROM CAST('.' AS text) q",
            "SELECT ('/etc/hostname'::text).lo_import",
            "SELECT (0).pg_terminate_backend",
        ] {
            let s = one(sql);
            assert!(s.flags.contains(&F::DangerousFunction), "{sql}: {s:?}");
        }
        let s = one("SELECT ('/etc/hostname'::text).pg_read_file");
        assert!(s.flags.contains(&F::ServerFile));
        assert!(s.functions.contains("pg_read_file"));
        // SQL text given as the argument is read like a call's.
        let d = one("SELECT ('DELETE FROM payroll'::text).dblink_exec");
        assert!(d.flags.contains(&F::ExecutesSqlText), "{d:?}");
        assert!(d.tables.contains("payroll") && d.flags.contains(&F::DeleteWithoutWhere));
        let t = one("SELECT q.dblink_exec FROM CAST('DELETE FROM payroll' AS text) q");
        assert!(t.flags.contains(&F::ExecutesSqlText), "{t:?}");
        assert!(one("SELECT (1e6::float8).pg_sleep")
            .functions
            .contains("pg_sleep"));
        // Any function: an outside review advanced a sequence and slept past `functions` rules.
        let n = one("SELECT q.nextval FROM CAST('payroll_id_seq' AS regclass) q");
        assert!(
            n.functions.contains("nextval") && n.flags.is_empty(),
            "{n:?}"
        );
        assert!(one("SELECT q.pg_sleep FROM CAST(5 AS float8) q")
            .functions
            .contains("pg_sleep"));
        // A qualified column of the same name counts too; it is no call of anything dangerous.
        let c = one("SELECT c.id, c.email FROM customers c");
        assert!(c.functions.contains("email") && c.flags.is_empty(), "{c:?}");
    }

    #[test]
    fn sql_given_as_text_is_classified() {
        let q = one("SELECT query_to_xml('DELETE FROM payroll RETURNING 1', true, false, '')");
        assert!(q.flags.contains(&F::ExecutesSqlText));
        assert!(q.flags.contains(&F::DeleteWithoutWhere) && q.flags.contains(&F::NestedWrite));
        assert!(q.tables.contains("payroll"));
        assert_eq!(q.kind(), K::Write);
        // Named arguments, casts, schema qualification, nesting.
        let n = one(
            "SELECT pg_catalog.query_to_xml(query => $$SELECT query_to_xml('select pg_read_file(''/etc/passwd'')', true, false, '')$$::text, nulls => true, tableforest => false, targetns => '')",
        );
        assert!(n.flags.contains(&F::DangerousFunction), "{n:?}");
        // A dblink connection string is not SQL; the statement is.
        let d = one("SELECT * FROM dblink('dbname=postgres', 'DROP TABLE customers') AS t(x text)");
        assert!(d.flags.contains(&F::Drop) && d.flags.contains(&F::DangerousFunction));
        assert_eq!(d.kind(), K::Ddl);
        // Table names given as strings are tables; a query built at run time is only flagged.
        assert!(one("SELECT table_to_xml('payroll', true, false, '')")
            .tables
            .contains("payroll"));
        assert!(has(
            "SELECT query_to_xml('select ' || 'x', true, false, '')",
            F::ExecutesSqlText
        ));
        assert!(has(
            "SELECT database_to_xml(true, false, '')",
            F::ExecutesSqlText
        ));
        assert!(has(
            "SELECT ts_rewrite('a'::tsquery, 'SELECT 1')",
            F::ExecutesSqlText
        ));
        // A plain EXPLAIN runs nothing: flags, but not the kind.
        assert_eq!(
            one("EXPLAIN SELECT query_to_xml('DELETE FROM t RETURNING 1', true, false, '')").kind(),
            K::Read
        );
        // The body of a LANGUAGE sql function runs whenever it is called.
        let f = one("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'");
        assert!(f.flags.contains(&F::DeleteWithoutWhere) && f.tables.contains("t"));
        let atomic = one(
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC UPDATE t SET a = 1; END",
        );
        assert!(atomic.flags.contains(&F::UpdateWithoutWhere));
        // Too many texts inside one message: refused, not guessed.
        let many = vec!["query_to_xml('select 1', true, false, '')"; MAX_SQL_TEXTS + 1].join(", ");
        assert!(matches!(
            classify(&format!("SELECT {many}")),
            Err(ClassifyError::TooComplex(_))
        ));
    }

    /// PostgreSQL 15 runs SQL text that the gateway's grammar (PostgreSQL 18) rejects
    /// (`system_user` is an alias there): an outside review read a server file through it as a
    /// plain read. Such text where a function takes SQL refuses the statement; a constant that
    /// may be something else (a connection string, a namespace, weights) is still skipped.
    #[test]
    fn sql_text_that_does_not_parse_is_refused() {
        for sql in [
            "SELECT query_to_xml('SELECT pg_read_file(''/etc/hostname'') AS x FROM (SELECT 1) AS system_user', true, false, '')",
            "SELECT query_to_xml(targetns => '', query => 'SELEC 1', nulls => true, tableforest => false)",
            "SELECT * FROM dblink('dbname=x', 'SELEC 1') AS t(x text)",
            "SELECT dblink_exec('SELEC 1', false)",
            "SELECT dblink_open('c', 'SELEC 1')",
            "SELECT dblink_open('conn', 'c', 'SELEC 1')",
            "SELECT ts_rewrite('a'::tsquery, 'SELEC 1')",
            "SELECT * FROM crosstab('SELEC 1') AS t(a text)",
            "SELECT * FROM crosstab('SELECT 1', 'SELEC 1') AS t(a text)",
            "SELECT ('SELEC 1'::text).ts_stat",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELEC 1'",
        ] {
            let err = classify(sql).unwrap_err();
            assert!(matches!(err, ClassifyError::TooComplex(_)), "{sql}: {err}");
        }
        let err = classify("SELECT query_to_xml('SELEC 1', true, false, '')").unwrap_err();
        assert!(
            err.to_string().contains("SQL text of query_to_xml"),
            "{err}"
        );
        for sql in [
            "SELECT * FROM dblink('dbname=x', 'SELECT 1') AS t(x text)",
            "SELECT dblink_exec('myconn', 'DELETE FROM t WHERE id = 1', false)",
            "SELECT dblink_open('conn', 'a cursor', 'SELECT 1', true)",
            "SELECT query_to_xml('SELECT 1', true, false, 'http://example.com/ns')",
            "SELECT ts_stat('SELECT v FROM d', 'ab')",
            "SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)",
            "SELECT * FROM crosstab('SELECT 1', 3) AS t(a text)",
        ] {
            assert!(classify(sql).is_ok(), "{sql}");
        }
    }

    /// A table given as a string is read as `regclass` input reads it, from the argument `tbl`
    /// by name or position (an outside review read payroll past a `tables` rule with
    /// `targetns => '', tbl => 'payroll'`: the first constant was taken); connectby and
    /// xpath_table paste their arguments into a query, which is classified; a table that
    /// cannot be known is [`ANY_TABLE`].
    #[test]
    fn tables_given_as_strings() {
        let tables = |sql: &str| one(sql).tables.into_iter().collect::<Vec<_>>();
        assert_eq!(
            tables("SELECT table_to_xml(targetns => '', tbl => 'payroll', nulls => true, tableforest => false)"),
            ["payroll"]
        );
        assert_eq!(
            tables("SELECT table_to_xml(' \"Pay Roll\" ', true, false, '')"),
            ["Pay Roll"]
        );
        assert_eq!(
            tables("SELECT table_to_xmlschema('DB.Public . PAYROLL', true, false, '')"),
            ["public.payroll"]
        );
        assert_eq!(
            tables("SELECT table_to_xml('\"a\"\"b\".c', true, false, '')"),
            ["a\"b.c"]
        );
        for sql in [
            "SELECT table_to_xml(16384, true, false, '')",
            "SELECT table_to_xml('16384', true, false, '')",
            "SELECT table_to_xml('', true, false, '')",
            "SELECT table_to_xml('a b', true, false, '')",
            "SELECT table_to_xml('\"unterminated', true, false, '')",
            "SELECT table_to_xml('a.b.c.d', true, false, '')",
            "SELECT table_to_xml($1, true, false, '')",
            "SELECT table_to_xml(nulls => true, tableforest => false, targetns => '', tbl => c.oid) FROM c",
        ] {
            assert!(one(sql).tables.contains(ANY_TABLE), "{sql}");
        }
        // connectby and xpath_table run the query they build from their arguments.
        let c = one(
            "SELECT * FROM connectby('payroll', 'id', 'parent', '1', 0) AS t(id int, parent int, level int)",
        );
        assert!(c.tables.contains("payroll") && c.flags.contains(&F::ExecutesSqlText));
        for sql in [
            "SELECT * FROM connectby('(SELECT pg_read_file(''/etc/hostname'') AS k, ''x''::text AS p) s', 'k', 'p', 'x', 0) AS t(k text, p text, level int)",
            "SELECT * FROM connectby('payroll', 'length(pg_read_file(''/etc/hostname''))', 'parent', 'id', '1', 0) AS t(k int, p int, level int, o int)",
            "SELECT * FROM connectby('payroll', 'id', 'parent', 'pg_read_file(''/etc/hostname'')', '1', 0, '~') AS t(k int, p int, level int, b text, o int)",
            "SELECT * FROM xpath_table('id', 'doc', '(SELECT 1 AS id, pg_read_file(''/etc/hostname'') AS doc) s', '/a', 'true') AS t(id int, a text)",
        ] {
            assert!(has(sql, F::DangerousFunction), "{sql}");
        }
        // An integer fifth of six arguments is max_depth: the fourth is start_with, a literal.
        assert!(classify(
            "SELECT * FROM connectby('payroll', 'id', 'parent', 'not an expression', 0, '~') AS t(id int, parent int, level int, b text)"
        )
        .is_ok());
        assert!(has(
            "SELECT * FROM xpath_table('id', 'doc', 'payroll', '/a', 'true') AS t(id int, a text)",
            F::ExecutesSqlText
        ));
        assert!(
            one("SELECT * FROM (VALUES ('payroll')) v(r), connectby(v.r, 'id', 'parent', '1', 0) AS t(id int, parent int, level int)")
                .tables
                .contains(ANY_TABLE)
        );
        assert!(matches!(
            classify("SELECT * FROM connectby('payroll', 'id)', 'parent', '1', 0) AS t(id int, parent int, level int)"),
            Err(ClassifyError::TooComplex(_))
        ));
    }

    /// Review findings: what these reach outside the statement's data or names.
    #[test]
    fn server_files_programs_subscriptions_and_cascades() {
        let system = one("ALTER SYSTEM SET work_mem = '77MB'");
        assert!(system.flags.contains(&F::ServerFile) && !system.flags.contains(&F::CopyProgram));
        for sql in [
            "ALTER SYSTEM SET archive_command = 'curl http://x'",
            "ALTER SYSTEM SET \"Restore_Command\" TO 'sh -c id'",
            "ALTER SYSTEM SET ssl_passphrase_command = 'id'",
            "ALTER SYSTEM RESET archive_cleanup_command",
            "ALTER SYSTEM SET recovery_end_command = 'id'",
        ] {
            let c = one(sql);
            assert!(
                c.flags.contains(&F::CopyProgram) && c.flags.contains(&F::ServerFile),
                "{sql}"
            );
        }
        assert!(has(
            "CREATE TABLESPACE ts LOCATION '/tmp/ts'",
            F::ServerFile
        ));
        for sql in [
            "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p",
            "ALTER SUBSCRIPTION s CONNECTION 'host=y'",
        ] {
            assert!(has(sql, F::ForeignData), "{sql}");
        }
        assert!(has("DISCARD ALL", F::RoleChange));
        assert!(!has("DISCARD PLANS", F::RoleChange));
        for sql in [
            "TRUNCATE a CASCADE",
            "DROP SCHEMA s CASCADE",
            "DROP TABLE a CASCADE",
            "DROP TYPE t CASCADE",
            "DROP OWNED BY r",
        ] {
            assert!(one(sql).tables.contains(ANY_TABLE), "{sql}");
        }
        for sql in ["TRUNCATE a", "DROP SCHEMA s", "DROP TABLE a RESTRICT"] {
            assert!(!one(sql).tables.contains(ANY_TABLE), "{sql}");
        }
    }

    #[test]
    fn statements_inside_statements() {
        let schema = one("CREATE SCHEMA s CREATE TABLE t (a int) GRANT ALL ON t TO public");
        assert_eq!(schema.kind(), K::Privilege);
        assert!(schema.tables.contains("t"));
        let rule = one("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM customers");
        assert_eq!(rule.kind(), K::Ddl);
        assert!(
            rule.flags.contains(&F::DeleteWithoutWhere) && rule.flags.contains(&F::NestedWrite)
        );
        assert!(rule.tables.contains("customers"));
        let merge = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE");
        assert!(merge.flags.contains(&F::DeleteWithoutWhere));
        assert!(has(
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 1",
            F::UpdateWithoutWhere
        ));
        let conditional = one(
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE WHEN MATCHED AND s.x THEN UPDATE SET a = 1 WHEN NOT MATCHED THEN INSERT VALUES (1)",
        );
        assert!(!conditional.flags.contains(&F::DeleteWithoutWhere));
        assert!(!conditional.flags.contains(&F::UpdateWithoutWhere));
        let system = one("ALTER SYSTEM SET shared_preload_libraries = 'x'");
        assert!(system.flags.contains(&F::AlterSystem) && system.flags.contains(&F::Alter));
        assert_eq!(system.kind(), K::Ddl);
        // Top-level-only effects do not leak from a statement's inner statements.
        assert_eq!(
            one("EXPLAIN ANALYZE EXECUTE p").executes.as_deref(),
            Some("p")
        );
        assert_eq!(
            one("CREATE SCHEMA s CREATE VIEW v AS SELECT 1").prepares,
            None
        );
    }

    #[test]
    fn client_encoding_changes() {
        let enc = |sql: &str| one(sql).client_encoding;
        let to = |v: &str| Some(SettingChange::To(v.into()));
        assert_eq!(enc("SET client_encoding = 'SJIS'"), to("SJIS"));
        assert_eq!(enc("SET NAMES 'big5'"), to("big5"));
        assert_eq!(enc("SET LOCAL client_encoding TO gbk"), to("gbk"));
        assert_eq!(
            enc("SELECT set_config('CLIENT_ENCODING', 'SJIS', false)"),
            to("SJIS")
        );
        assert_eq!(enc("RESET client_encoding"), Some(SettingChange::Reset));
        assert_eq!(
            enc("SET client_encoding TO DEFAULT"),
            Some(SettingChange::Reset)
        );
        assert_eq!(enc("RESET ALL"), Some(SettingChange::Reset));
        assert_eq!(enc("SET search_path = public"), None);
        assert_eq!(enc("SELECT set_config('search_path', 'x', false)"), None);
        for sql in [
            "SELECT set_config(name, 'SJIS', false) FROM (VALUES ('client_encoding')) v(name)",
            "SELECT set_config('client_encoding', current_setting('x'), false)",
        ] {
            assert_eq!(enc(sql), Some(SettingChange::NotConstant), "{sql}");
            assert!(one(sql).leaves_utf8(), "{sql}");
        }
        for sql in ["SET client_encoding = 'SJIS'", "SET NAMES 'BIG5'"] {
            let c = one(sql);
            assert!(
                c.leaves_utf8() && c.flags.contains(&F::ClientEncodingChange),
                "{sql}"
            );
        }
        for sql in [
            "SET client_encoding = 'UTF8'",
            "SET NAMES 'utf-8'",
            "SET client_encoding = 'Unicode'",
            "RESET client_encoding",
        ] {
            assert!(!one(sql).leaves_utf8(), "{sql}");
        }
        assert!(!has("RESET client_encoding", F::ClientEncodingChange));
        // Inside SQL text it changes this session too; a non-UTF-8 change wins over others.
        assert!(one(
            "SELECT query_to_xml('select set_config(''client_encoding'', ''SJIS'', false)', true, false, ''), set_config('client_encoding', 'UTF8', false)"
        )
        .leaves_utf8());
        // A role's or a database's setting is for later sessions, not this one.
        assert_eq!(enc("ALTER ROLE r SET client_encoding = 'SJIS'"), None);
    }

    #[test]
    fn custom_settings_set_by_name() {
        let custom = |sql: &str| -> Vec<String> {
            classify(sql)
                .unwrap()
                .into_iter()
                .flat_map(|s| s.custom_settings)
                .collect()
        };
        assert_eq!(custom("SET app.tenant = 5"), ["app.tenant"]);
        assert_eq!(custom("SET LOCAL \"App.Tenant\" TO 'x'"), ["app.tenant"]);
        assert_eq!(custom("RESET app.tenant"), ["app.tenant"]);
        assert_eq!(
            custom("SELECT pg_catalog.set_config('Request.JWT.claims', '{}', true)"),
            ["request.jwt.claims"]
        );
        assert_eq!(
            custom(
                "SELECT query_to_xml('select set_config(''a.b'', ''1'', false)', true, false, '')"
            ),
            ["a.b"]
        );
        assert!(custom("SET search_path = a").is_empty());
        assert!(custom("SELECT set_config('work_mem', '1MB', false)").is_empty());
        assert!(custom("RESET ALL").is_empty());
    }

    #[test]
    fn standard_conforming_strings_changes() {
        let scs = |sql: &str| one(sql).standard_conforming_strings;
        let to = |v: &str| Some(SettingChange::To(v.into()));
        assert_eq!(scs("SET standard_conforming_strings = off"), to("off"));
        assert_eq!(
            scs("SET LOCAL STANDARD_CONFORMING_STRINGS TO 'false'"),
            to("false")
        );
        assert_eq!(
            scs("SELECT set_config('standard_conforming_strings', 'off', true)"),
            to("off")
        );
        assert_eq!(
            scs("RESET standard_conforming_strings"),
            Some(SettingChange::Reset)
        );
        assert_eq!(scs("RESET ALL"), Some(SettingChange::Reset));
        assert_eq!(scs("SET client_encoding = 'UTF8'"), None);
        for sql in [
            "SET standard_conforming_strings = off",
            "SET standard_conforming_strings TO 0",
            "SET standard_conforming_strings = 'no'",
            "SELECT set_config('standard_conforming_strings', current_setting('x'), false)",
            "SELECT set_config(name, 'off', false) FROM (VALUES ('standard_conforming_strings')) v(name)",
            "SELECT query_to_xml('select set_config(''standard_conforming_strings'', ''off'', false)', true, false, '')",
            "SET standard_conforming_strings = off; SET standard_conforming_strings = on",
            // pg_settings' update rule calls set_config for each row: any setting.
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "update pg_catalog.pg_settings set setting = 'SJIS' where name = 'client_encoding'",
        ] {
            let info = classify(sql).unwrap();
            assert!(info.iter().any(StatementInfo::leaves_standard_strings), "{sql}");
            assert!(!info.iter().any(StatementInfo::leaves_utf8) || sql.contains("name"), "{sql}");
        }
        for sql in [
            "SET standard_conforming_strings = on",
            "SET standard_conforming_strings TO true",
            "SET standard_conforming_strings TO DEFAULT",
            "RESET standard_conforming_strings",
            "SELECT set_config('standard_conforming_strings', 'on', false)",
            "SET escape_string_warning = off",
            "ALTER ROLE r SET standard_conforming_strings = off",
            "SELECT setting FROM pg_settings WHERE name = 'standard_conforming_strings'",
        ] {
            assert!(!one(sql).leaves_standard_strings(), "{sql}");
        }
    }

    #[test]
    fn long_operator_chains_and_deep_nesting_are_classified() {
        // What PostgreSQL 15 runs with its default 2 MB stack (chains of ~4,000 operators,
        // ~2,100 nested subqueries) and beyond: classified, not refused as a parse error.
        for sql in [
            format!("SELECT {}", vec!["1"; 4000].join(" + ")),
            format!("SELECT {}", vec!["'a'"; 4000].join(" || ")),
            format!("SELECT {}1{}", "abs(".repeat(4000), ")".repeat(4000)),
            format!("SELECT {}1{}", "(SELECT ".repeat(1500), ")".repeat(1500)),
            format!("SELECT {}1{}", "(".repeat(9000), ")".repeat(9000)),
        ] {
            assert_eq!(one(&sql).kind(), K::Read, "{}", &sql[..40]);
        }
        // Found at the bottom of a long chain.
        let deep = format!(
            "SELECT {} + pg_read_file('/etc/passwd')",
            vec!["1"; 3000].join(" + ")
        );
        assert!(has(&deep, F::DangerousFunction));
        // Deeper than the parser serialises: refused (fail closed), never a crash.
        for sql in [
            format!("SELECT {}", vec!["1"; 20_000].join(" + ")),
            format!("SELECT {}1{}", "(SELECT ".repeat(3000), ")".repeat(3000)),
            format!("SELECT {}1{}", "(".repeat(20_000), ")".repeat(20_000)),
        ] {
            assert!(matches!(classify(&sql), Err(ClassifyError::Syntax(_))));
        }
    }

    #[test]
    fn the_dangerous_list_is_sorted_and_derived() {
        assert!(DANGEROUS_FUNCTIONS.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(SQL_TEXT_FUNCTIONS.windows(2).all(|w| w[0].0 < w[1].0));
        for (name, area) in [
            ("pg_read_file", FunctionArea::ServerFiles),
            ("pg_ls_dir", FunctionArea::ServerFiles),
            ("lo_import", FunctionArea::ServerFiles),
            ("pg_file_write", FunctionArea::ServerFiles),
            ("lo_from_bytea", FunctionArea::LargeObjects),
            ("pg_terminate_backend", FunctionArea::OtherSessions),
            ("set_config", FunctionArea::Configuration),
            ("pg_reload_conf", FunctionArea::Configuration),
            ("pg_switch_wal", FunctionArea::Replication),
            (
                "pg_create_logical_replication_slot",
                FunctionArea::Replication,
            ),
            ("pg_advisory_lock", FunctionArea::AdvisoryLocks),
            ("dblink_exec", FunctionArea::OtherServers),
            ("pg_stat_reset", FunctionArea::Privileged),
            // No ACL, superuser-only in C (pageinspect), or not at all (pg_prewarm's dump).
            ("get_raw_page", FunctionArea::Privileged),
            ("heap_page_items", FunctionArea::Privileged),
            ("autoprewarm_dump_now", FunctionArea::Privileged),
            ("autoprewarm_start_worker", FunctionArea::Privileged),
        ] {
            assert_eq!(dangerous_function(name), Some(area), "{name}");
        }
        for harmless in [
            "now",
            "lower",
            "pg_sleep",
            "current_setting",
            "pg_is_wal_replay_paused",
        ] {
            assert_eq!(dangerous_function(harmless), None, "{harmless}");
        }
    }

    #[test]
    fn several_statements_and_garbage() {
        assert_eq!(classify("SELECT 1; DELETE FROM t").unwrap().len(), 2);
        assert!(matches!(classify("SELEC 1"), Err(ClassifyError::Syntax(_))));
        assert!(classify("SELECT 'unterminated").is_err());
        assert_eq!(classify("").unwrap().len(), 0);
    }

    #[test]
    fn the_deepest_texts_that_fit_are_classified_in_place() {
        // On a thread of 16 MiB, the longest texts of the deepest kinds per byte that the
        // caller's stack is judged to have room for: classified in place, no overflow.
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(|| {
                let left = stacker::remaining_stack().unwrap();
                let len = (left - STACK_RESERVE) / STACK_PER_BYTE - 8;
                let n = len / 2 - 8;
                for sql in [
                    format!("SELECT {}1", "+-".repeat(n)),
                    format!("SELECT 1{}", "+1".repeat(n)),
                    format!("SELECT ARRAY{}1{}", "[".repeat(n), "]".repeat(n)),
                    format!(
                        "SELECT {}1{}",
                        "f(".repeat(n * 2 / 3),
                        ")".repeat(n * 2 / 3)
                    ),
                ] {
                    assert!(sql.len() <= len, "{}", sql.len());
                    let need = sql.len() * STACK_PER_BYTE + STACK_RESERVE;
                    assert!(stacker::remaining_stack().unwrap() >= need);
                    assert_eq!(one(&sql).kind(), K::Read, "{}", &sql[..20]);
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
