//! Statement classification from the real PostgreSQL parser (libpg_query).
//!
//! The parse tree is walked whole: every node at every depth (CTEs, subqueries, EXPLAIN and
//! PREPARE bodies, COPY queries, function arguments), so a `DELETE` inside a CTE is a write and
//! a dangerous function in a subquery is found. The tree is walked through its serde form,
//! which covers every node type libpg_query knows without a hand-written visitor per type.
//!
//! What it does not guarantee: the effects of code the server runs on its own account —
//! function bodies, triggers, rules, views — are not visible in a statement's text. A call to a
//! user-defined function is classified by the call, not by what the function does; `DO` blocks
//! and function definitions are flagged `procedural` so a policy can keep them away from agents.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

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

/// Properties a policy can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Drop,
    Truncate,
    Alter,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    /// A write nested inside another statement (data-modifying CTE, subquery).
    NestedWrite,
    /// `EXPLAIN ANALYZE` of a write: it executes.
    ExplainAnalyzeWrite,
    CopyProgram,
    /// Server-side file access: `COPY` to/from a file, `LOAD`, file functions.
    ServerFile,
    DangerousFunction,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ROLE` …
    RoleChange,
    /// `DO` blocks, function and procedure definitions, `CALL`.
    Procedural,
}

/// Functions that reach outside the database's data: files, processes, other servers,
/// configuration, other sessions.
pub const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "lo_import",
    "lo_export",
    "lo_from_bytea",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "set_config",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_logdir_ls",
];

/// One statement of a message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatementInfo {
    pub kind: Option<StatementKind>,
    /// Tables named, `schema.table` or `table` as written (case as the parser resolved it).
    pub tables: BTreeSet<String>,
    /// Functions called, last name component, lower case.
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
}

impl StatementInfo {
    pub fn kind(&self) -> StatementKind {
        self.kind.unwrap_or(StatementKind::Utility)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the statement does not parse: {0}")]
pub struct ParseError(pub String);

/// Classifies every statement of `sql` (one Query message may hold several).
pub fn classify(sql: &str) -> Result<Vec<StatementInfo>, ParseError> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| ParseError(e.to_string()))?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| ParseError(e.to_string()))?;
    let stmts = tree
        .get("stmts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(stmts
        .iter()
        .filter_map(|raw| raw.get("stmt")?.get("node"))
        .map(classify_statement)
        .collect())
}

fn classify_statement(node: &Value) -> StatementInfo {
    let mut info = StatementInfo::default();
    let top = single(node);
    if let Some((name, body)) = top {
        info.kind = Some(top_kind(name, body, &mut info));
        // Every DROP … and ALTER … carries its flag, whatever its object.
        if name.starts_with("Drop") {
            info.flags.insert(Flag::Drop);
        }
        if name.starts_with("Alter") {
            info.flags.insert(Flag::Alter);
        }
        if name == "CreateTrigStmt" || name == "CreateEventTrigStmt" {
            info.flags.insert(Flag::Procedural);
        }
        if name == "DropStmt" {
            dropped_relations(body, &mut info);
        }
    }
    walk(node, 0, &mut info);
    // A read that contains a write anywhere (CTE, COPY (DELETE … RETURNING)) is a write; a
    // plain EXPLAIN does not execute what it explains.
    let explain = top.is_some_and(|(n, _)| n == "ExplainStmt");
    if info.writes && !explain && info.kind == Some(StatementKind::Read) {
        info.kind = Some(StatementKind::Write);
    }
    info
}

/// The node type and body of a `{ "TypeName": {...} }` object.
fn single(v: &Value) -> Option<(&str, &Value)> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    let (k, v) = obj.iter().next()?;
    k.starts_with(|c: char| c.is_ascii_uppercase())
        .then_some((k.as_str(), v))
}

fn is_write_node(name: &str) -> bool {
    matches!(
        name,
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
    )
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn top_kind(name: &str, body: &Value, info: &mut StatementInfo) -> StatementKind {
    use StatementKind as K;
    match name {
        "SelectStmt" => {
            if body.get("into_clause").is_some_and(|v| !v.is_null()) {
                K::Ddl
            } else {
                K::Read
            }
        }
        n if is_write_node(n) => K::Write,
        "ExplainStmt" => {
            let analyze = body
                .get("options")
                .and_then(Value::as_array)
                .is_some_and(|opts| {
                    opts.iter().any(|o| {
                        let d = o.pointer("/node/DefElem");
                        d.is_some_and(|d| {
                            str_field(d, "defname") == "analyze"
                                && !d
                                    .pointer("/arg/node/String/sval")
                                    .and_then(Value::as_str)
                                    .is_some_and(|s| matches!(s, "false" | "off" | "0"))
                        })
                    })
                });
            // EXPLAIN ANALYZE runs what it explains: it is whatever that is.
            let inner = body.pointer("/query/node").and_then(single);
            match inner {
                Some((n, b)) if analyze => {
                    let mut kind = top_kind(n, b, info);
                    if kind == K::Read && subtree_writes(b) {
                        kind = K::Write;
                    }
                    if kind != K::Read {
                        info.flags.insert(Flag::ExplainAnalyzeWrite);
                    }
                    kind
                }
                _ => K::Read,
            }
        }
        "CopyStmt" => {
            if body.get("is_program").and_then(Value::as_bool) == Some(true) {
                info.flags.insert(Flag::CopyProgram);
            } else if !str_field(body, "filename").is_empty() {
                info.flags.insert(Flag::ServerFile);
            }
            if body.get("is_from").and_then(Value::as_bool) == Some(true) {
                K::Write
            } else {
                K::Read
            }
        }
        "DropStmt" | "DropdbStmt" | "DropTableSpaceStmt" | "DropOwnedStmt" => {
            info.flags.insert(Flag::Drop);
            K::Ddl
        }
        "TruncateStmt" => {
            info.flags.insert(Flag::Truncate);
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
        | "AlterExtensionStmt"
        | "AlterDatabaseStmt"
        | "AlterDatabaseSetStmt"
        | "AlterSystemStmt"
        | "AlterTableSpaceOptionsStmt"
        | "AlterTypeStmt" => {
            info.flags.insert(Flag::Alter);
            K::Ddl
        }
        "CreateFunctionStmt" | "DoStmt" | "CallStmt" | "CreatePLangStmt" => {
            info.flags.insert(Flag::Procedural);
            if name == "CreateFunctionStmt" || name == "CreatePLangStmt" {
                K::Ddl
            } else {
                K::Procedural
            }
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
            K::Session
        }
        "VariableShowStmt" => K::Read,
        "DiscardStmt" => {
            let all = pg_query::protobuf::DiscardMode::DiscardAll as i64;
            if body.get("target").and_then(Value::as_i64) == Some(all) {
                info.deallocates = Some(None);
                info.ends_portals = Some(None);
            }
            K::Session
        }
        "ClosePortalStmt" => {
            let n = str_field(body, "portalname");
            info.ends_portals = Some((!n.is_empty()).then(|| n.to_string()));
            K::Session
        }
        "ListenStmt" | "UnlistenStmt" => K::Session,
        "DeallocateStmt" => {
            let n = str_field(body, "name");
            info.deallocates = Some((!n.is_empty()).then(|| n.to_string()));
            K::Session
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
            let kind = body.get("kind").and_then(Value::as_i64);
            if !keeps.iter().any(|k| Some(*k as i64) == kind) {
                info.ends_portals = Some(None);
            }
            K::Transaction
        }
        "PrepareStmt" => {
            info.prepares = Some(str_field(body, "name").to_string());
            let inner = body.pointer("/query/node");
            match inner.and_then(single) {
                Some((n, b)) => top_kind(n, b, info),
                None => K::Utility,
            }
        }
        "ExecuteStmt" => {
            info.executes = Some(str_field(body, "name").to_string());
            K::Utility
        }
        "DeclareCursorStmt" => {
            info.ends_portals = Some(Some(str_field(body, "portalname").to_string()));
            match body.pointer("/query/node").and_then(single) {
                Some((n, b)) => top_kind(n, b, info),
                None => K::Read,
            }
        }
        "CreateTableAsStmt" => {
            // `CREATE TABLE … AS EXECUTE name` runs the prepared statement.
            if let Some(("ExecuteStmt", b)) = body.pointer("/query/node").and_then(single) {
                info.executes = Some(str_field(b, "name").to_string());
            }
            K::Ddl
        }
        "FetchStmt" => K::Read,
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

/// Names of the relations a `DROP TABLE/VIEW/…` removes (they are name lists, not RangeVars).
fn dropped_relations(body: &Value, info: &mut StatementInfo) {
    use pg_query::protobuf::ObjectType as O;
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
        .and_then(Value::as_i64)
        .is_some_and(|t| RELATIONS.contains(&t));
    if !relation {
        return;
    }
    for object in body
        .get("objects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let parts: Vec<&str> = object
            .pointer("/node/List/items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.pointer("/node/String/sval").and_then(Value::as_str))
            .collect();
        if !parts.is_empty() {
            info.tables.insert(parts.join("."));
        }
    }
}

/// Whether an INSERT, UPDATE, DELETE or MERGE appears anywhere under `v`.
fn subtree_writes(v: &Value) -> bool {
    match v {
        Value::Object(obj) => obj
            .iter()
            .any(|(k, v)| is_write_node(k) || subtree_writes(v)),
        Value::Array(items) => items.iter().any(subtree_writes),
        _ => false,
    }
}

/// Visits every node; `depth` counts statement nodes above this one.
fn walk(v: &Value, depth: usize, info: &mut StatementInfo) {
    match v {
        Value::Object(obj) => {
            if let Some((name, body)) = single(v) {
                let mut depth = depth;
                match name {
                    "FuncCall" => {
                        let last = body
                            .get("funcname")
                            .and_then(Value::as_array)
                            .and_then(|parts| parts.last())
                            .and_then(|p| p.pointer("/node/String/sval"))
                            .and_then(Value::as_str)
                            .map(str::to_ascii_lowercase);
                        if let Some(f) = last {
                            if DANGEROUS_FUNCTIONS.contains(&f.as_str()) {
                                info.flags.insert(Flag::DangerousFunction);
                                if f.contains("file")
                                    || f.starts_with("pg_ls_")
                                    || f.starts_with("lo_")
                                {
                                    info.flags.insert(Flag::ServerFile);
                                }
                            }
                            info.functions.insert(f);
                        }
                    }
                    n if is_write_node(n) => {
                        info.writes = true;
                        if depth > 0 {
                            info.flags.insert(Flag::NestedWrite);
                        }
                        if body.get("where_clause").is_some_and(Value::is_null) {
                            match n {
                                "DeleteStmt" => {
                                    info.flags.insert(Flag::DeleteWithoutWhere);
                                }
                                "UpdateStmt" => {
                                    info.flags.insert(Flag::UpdateWithoutWhere);
                                }
                                _ => {}
                            }
                        }
                        depth += 1;
                    }
                    "SelectStmt" => depth += 1,
                    // The bodies of these are the statement itself, not nested in it.
                    "ExplainStmt" | "PrepareStmt" | "CopyStmt" | "DeclareCursorStmt"
                    | "CreateTableAsStmt" => {}
                    _ => {}
                }
                walk(body, depth, info);
            } else {
                // A RangeVar held directly in a field (`relation`) is not wrapped in a node.
                if obj.contains_key("relpersistence") {
                    let rel = str_field(v, "relname");
                    let schema = str_field(v, "schemaname");
                    if !rel.is_empty() {
                        info.tables.insert(if schema.is_empty() {
                            rel.to_string()
                        } else {
                            format!("{schema}.{rel}")
                        });
                    }
                }
                for value in obj.values() {
                    walk(value, depth, info);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, depth, info);
            }
        }
        _ => {}
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
        assert_eq!(
            one("EXPLAIN ANALYZE EXECUTE p").executes.as_deref(),
            Some("p")
        );
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

    #[test]
    fn several_statements_and_garbage() {
        assert_eq!(classify("SELECT 1; DELETE FROM t").unwrap().len(), 2);
        assert!(classify("SELEC 1").is_err());
        assert!(classify("SELECT 'unterminated").is_err());
        assert_eq!(classify("").unwrap().len(), 0);
    }
}
