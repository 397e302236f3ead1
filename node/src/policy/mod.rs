//! Guardrails: a policy is plain data (rules from the config), decisions are pure functions of
//! a classified statement, the principal and the connection. No I/O here.
//!
//! Evaluation, per statement: a statement that does not parse is blocked (rule `parse-error`);
//! on a `read_only` connection anything but reads, transaction control and harmless session
//! settings is blocked (rule `read-only`); otherwise the first rule whose conditions all hold
//! decides, and with no match the policy's `default` action applies (rule `default`). A rule
//! with `dry_run = true` never decides: it is noted in the record (`would_block` …) and
//! evaluation continues. A message with several statements is blocked whole when any of them
//! is.
//!
//! `require_approval` holds the statement for a decision in the coordinator (see
//! [`ApprovalSpec`] and docs/policy.md): who may approve, how many approvals, how long a
//! request lives, how long the client waits, and which grant class lets it run without one.

pub mod classify;
mod dangerous_functions;
pub mod kube;
pub mod masking;
pub mod ssh;
mod tree;

pub use crate::core::principals::PrincipalMatch;
use classify::{Flag, StatementInfo, StatementKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::sync::Arc;
use vigil_proto::record::{PolicyRef, Principal};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Block,
    RequireApproval,
}

/// One rule: a shared part (which action, for whom, on which targets, how approvals go) and
/// the matcher of its protocol (PostgreSQL: [`SqlMatch`]). Every condition given must hold;
/// inside a list any entry may match. In the config a rule is one flat table ([`RuleTable`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RuleTable", into = "RuleTable")]
pub struct Rule {
    pub id: String,
    pub action: Action,
    /// Target names (PostgreSQL connection names, SSH target names); empty: every target of
    /// the rule's protocol.
    pub targets: Vec<String>,
    pub principals: PrincipalMatch,
    /// Only record what the rule would have done.
    pub dry_run: bool,
    /// Told to the client and recorded.
    pub reason: Option<String>,
    /// For `require_approval`: overrides `[policy.approval]`.
    pub approval: Option<ApprovalSpec>,
    /// The protocol the rule is for, and what it matches there.
    pub matcher: Matcher,
}

/// The per-protocol part of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// A PostgreSQL statement (the default protocol of a rule).
    Sql(SqlMatch),
    /// An SSH channel request.
    Ssh(ssh::SshMatch),
    /// A Kubernetes API request.
    Kube(kube::KubeMatch),
}

/// The protocol a rule is written for (`protocol = "ssh"`; PostgreSQL by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleProtocol {
    #[default]
    Postgres,
    Ssh,
    Kubernetes,
}

impl RuleProtocol {
    fn is_postgres(&self) -> bool {
        *self == RuleProtocol::Postgres
    }
}

/// The PostgreSQL matcher of a rule: what a statement is (its classification).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SqlMatch {
    pub kinds: Vec<StatementKind>,
    /// `table` or `schema.table`; `table` also matches it in any schema.
    pub tables: Vec<String>,
    /// Function names (last component, lower case).
    pub functions: Vec<String>,
    pub flags: Vec<Flag>,
}

impl SqlMatch {
    /// Whether the statement is one this matcher names. A table the classifier cannot know
    /// (`*`: a name computed at run time, what a `CASCADE` reaches) is any table to a rule that
    /// blocks or holds, and none to one that allows (`action`), as a Kubernetes request across
    /// all namespaces is: an unknown table must not let a statement through.
    pub fn matches(&self, s: &StatementInfo, action: Action) -> bool {
        let table = |t: &str, x: &str| {
            if x == classify::ANY_TABLE {
                action != Action::Allow
            } else {
                table_matches(t, x)
            }
        };
        (self.kinds.is_empty() || self.kinds.contains(&s.kind()))
            && (self.tables.is_empty()
                || self
                    .tables
                    .iter()
                    .any(|t| s.tables.iter().any(|x| table(t, x))))
            && (self.functions.is_empty()
                || self
                    .functions
                    .iter()
                    .any(|f| s.functions.contains(&f.to_ascii_lowercase())))
            && (self.flags.is_empty() || self.flags.iter().any(|f| s.flags.contains(f)))
    }
}

impl SqlMatch {
    /// Refuses, at load, a pattern that could never match what the classifier reports: a rule
    /// that never matches is a guardrail that silently is not there.
    fn check(&self) -> Result<(), String> {
        for t in &self.tables {
            if t.is_empty() || t.split('.').count() > 2 || t.split('.').any(str::is_empty) {
                return Err(format!(
                    "tables: {t:?} is not `table` or `schema.table` (a database name is not part of it)"
                ));
            }
            if t.contains(['*', '?', '[']) {
                return Err(format!(
                    "tables: {t:?} is a glob, but table names are matched exactly: list each table (each partition)"
                ));
            }
        }
        for f in &self.functions {
            if f.is_empty() || f.contains(['.', '(', ')', ' ', '*', '?']) {
                return Err(format!(
                    "functions: {f:?} is not a function's name: write it without schema, arguments or globs (`pg_sleep`); calls are matched by name in every schema"
                ));
            }
        }
        Ok(())
    }
}

/// A rule as written in the config (`[[policy.rules]]`), and as hashed into the policy
/// version: one flat table, unknown keys refused. Fields of another protocol than the rule's
/// are refused too. The SSH fields are left out of the hashed form when empty, so the version
/// of a PostgreSQL-only policy does not change with them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTable {
    id: String,
    action: Action,
    #[serde(default, skip_serializing_if = "RuleProtocol::is_postgres")]
    protocol: RuleProtocol,
    #[serde(default, alias = "targets")]
    connections: Vec<String>,
    #[serde(default)]
    principals: PrincipalMatch,
    #[serde(default)]
    kinds: Vec<StatementKind>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    #[serde(default)]
    flags: Vec<Flag>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    requests: Vec<ssh::SshRequestKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    programs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    command_flags: Vec<crate::ssh::command::CommandFlag>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    logins: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    operations: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    verbs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    subresources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    names: Vec<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    approval: Option<ApprovalSpec>,
}

impl TryFrom<RuleTable> for Rule {
    type Error = String;

    fn try_from(t: RuleTable) -> Result<Self, String> {
        let sql = SqlMatch {
            kinds: t.kinds,
            tables: t.tables,
            functions: t.functions,
            flags: t.flags,
        };
        let kube_only = kube::KubeMatch {
            verbs: t.verbs,
            resources: t.resources,
            subresources: t.subresources,
            namespaces: t.namespaces,
            names: t.names,
            ..kube::KubeMatch::default()
        };
        let command = ssh::CommandMatch {
            programs: t.programs,
            args: t.args,
            flags: t.command_flags,
        };
        let ssh_only = ssh::SshMatch {
            requests: t.requests,
            logins: t.logins,
            paths: t.paths,
            operations: t.operations,
            ..ssh::SshMatch::default()
        };
        let id = &t.id;
        sql.check()
            .and_then(|()| kube_only.check())
            .and_then(|()| ssh_only.check())
            .map_err(|e| format!("rule {id:?}: {e}"))?;
        // A program written with a path matches only commands written with that path: a rule
        // that blocks or holds `/usr/bin/rm` would let `rm` and `/bin/rm` run.
        if t.action != Action::Allow {
            if let Some(p) = command.programs.iter().find(|p| p.contains('/')) {
                return Err(format!(
                    "rule {id:?}: programs: {p:?} matches only commands written with that path; a rule that blocks or holds names the program ({:?}), which matches it under every path",
                    p.rsplit('/').next().unwrap_or(p)
                ));
            }
        }
        let sql_empty = sql == SqlMatch::default();
        // The command conditions (programs, args, command_flags) are shared by SSH exec and
        // Kubernetes exec; the rest belongs to one protocol.
        let matcher = match t.protocol {
            RuleProtocol::Postgres
                if ssh_only.is_empty() && command.is_empty() && kube_only.is_empty() =>
            {
                Matcher::Sql(sql)
            }
            RuleProtocol::Ssh if sql_empty && kube_only.is_empty() => {
                Matcher::Ssh(ssh::SshMatch { command, ..ssh_only })
            }
            RuleProtocol::Kubernetes if sql_empty && ssh_only.is_empty() => {
                Matcher::Kube(kube::KubeMatch { command, ..kube_only })
            }
            protocol => return Err(format!(
                "rule {id:?}: kinds, tables, functions and flags are PostgreSQL conditions; requests, logins, paths and operations SSH ones (add protocol = \"ssh\"); verbs, resources, subresources, namespaces and names Kubernetes ones (add protocol = \"kubernetes\"); programs, args and command_flags are for SSH and Kubernetes; this rule is for {}",
                protocol_name(protocol)
            )),
        };
        Ok(Rule {
            id: t.id,
            action: t.action,
            targets: t.connections,
            principals: t.principals,
            dry_run: t.dry_run,
            reason: t.reason,
            approval: t.approval,
            matcher,
        })
    }
}

impl From<Rule> for RuleTable {
    fn from(r: Rule) -> Self {
        let (protocol, sql, ssh, kube) = match r.matcher {
            Matcher::Sql(m) => (
                RuleProtocol::Postgres,
                m,
                ssh::SshMatch::default(),
                kube::KubeMatch::default(),
            ),
            Matcher::Ssh(m) => (
                RuleProtocol::Ssh,
                SqlMatch::default(),
                m,
                kube::KubeMatch::default(),
            ),
            Matcher::Kube(m) => (
                RuleProtocol::Kubernetes,
                SqlMatch::default(),
                ssh::SshMatch {
                    command: m.command.clone(),
                    ..ssh::SshMatch::default()
                },
                m,
            ),
        };
        RuleTable {
            id: r.id,
            action: r.action,
            protocol,
            connections: r.targets,
            principals: r.principals,
            kinds: sql.kinds,
            tables: sql.tables,
            functions: sql.functions,
            flags: sql.flags,
            requests: ssh.requests,
            programs: ssh.command.programs,
            args: ssh.command.args,
            command_flags: ssh.command.flags,
            logins: ssh.logins,
            paths: ssh.paths,
            operations: ssh.operations,
            verbs: kube.verbs,
            resources: kube.resources,
            subresources: kube.subresources,
            namespaces: kube.namespaces,
            names: kube.names,
            dry_run: r.dry_run,
            reason: r.reason,
            approval: r.approval,
        }
    }
}

/// How a statement that needs approval is handled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Members of this group (token `groups` claim) may approve or deny.
    pub approvers: String,
    /// Distinct approvals needed; one denial decides.
    #[serde(default = "one")]
    pub required: u32,
    /// How long a request can be decided and, once approved, used.
    #[serde(default = "default_approval_ttl")]
    pub ttl_secs: u64,
    /// How long the client's statement is held while the gateway waits for a decision; after
    /// that the client gets an error naming the request, and runs the statement again once it
    /// is approved.
    #[serde(default = "default_approval_wait")]
    pub wait_secs: u64,
    /// An active grant of this access class for the principal on the connection lets the
    /// statement run without a request (`vigil grants create … --class CLASS`).
    #[serde(default)]
    pub grant_class: Option<String>,
}

fn one() -> u32 {
    1
}
fn default_approval_ttl() -> u64 {
    3600
}
fn default_approval_wait() -> u64 {
    30
}

/// The `[policy]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// What happens to a statement no rule matches.
    #[serde(default)]
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Settings a client may pass in the startup `options` (`-c name=value`).
    #[serde(default)]
    pub allowed_startup_settings: Vec<String>,
    #[serde(default)]
    pub masking: masking::MaskingConfig,
    /// The key of deterministic masking tokens; default: generated once into
    /// `<data_dir>/masking.key`. Not part of the policy version.
    #[serde(default, skip_serializing)]
    pub masking_key: Option<crate::core::secret::SecretRef>,
    /// The approval settings of `require_approval` rules that do not name their own.
    #[serde(default)]
    pub approval: Option<ApprovalSpec>,
}

/// The outcome for one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided (`default`, `parse-error`, `read-only`, or a rule id).
    pub rule: String,
    /// Why, for the client and the record.
    pub reason: Option<String>,
    /// Dry-run rules that matched, as `rule-id:action`.
    pub dry_run: Vec<String>,
    /// For `require_approval`: how.
    pub approval: Option<Arc<ApprovalSpec>>,
}

impl Decision {
    pub fn blocks(&self) -> bool {
        self.action != Action::Allow
    }

    /// The decision on something only a rule may allow (a forward, a port-forward), whatever
    /// the policy's `default`: decided by the default, it is blocked for `reason`.
    pub fn only_by_rule(mut self, reason: impl FnOnce() -> String) -> Self {
        if self.rule == "default" {
            self.action = Action::Block;
            self.reason = Some(reason());
        }
        self
    }

    /// What the dry-run rules that matched would have done (`dry-run: rule:action, …`), for
    /// the record's detail.
    pub fn dry_run_note(&self) -> Option<String> {
        (!self.dry_run.is_empty()).then(|| format!("dry-run: {}", self.dry_run.join(", ")))
    }
}

/// A refused action's record detail: why, with what dry-run rules would have done (`note`, see
/// [`Decision::dry_run_note`]) kept next to it.
pub fn with_note(why: &str, note: Option<String>) -> String {
    match note {
        Some(note) => format!("{why}; {note}"),
        None => why.to_string(),
    }
}

/// A policy in force, with its version.
#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    version: String,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Arc<Self> {
        Self::for_node(config, Vec::new())
    }

    /// The policy of a node: the read-only connections decide too (rule `read-only`), so they
    /// are part of the version when there are any.
    pub fn for_node(config: PolicyConfig, mut read_only_connections: Vec<String>) -> Arc<Self> {
        read_only_connections.sort();
        let canonical = if read_only_connections.is_empty() {
            serde_json::to_vec(&config)
        } else {
            serde_json::to_vec(&serde_json::json!({
                "policy": &config,
                "read_only_connections": read_only_connections,
            }))
        }
        .expect("a policy serialises");
        let version = hex::encode(Sha256::digest(&canonical));
        Arc::new(Self { config, version })
    }

    /// Hex SHA-256 of the policy (its canonical JSON form).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn reference(&self, d: &Decision) -> PolicyRef {
        PolicyRef {
            rule: d.rule.clone(),
            version: self.version.clone(),
        }
    }

    /// Whether anything can be decided on `connection`: a rule that may apply, a default other
    /// than allow, or a read-only connection. When nothing can, statements are not parsed at
    /// all (there is nothing to decide; the target rejects what does not parse).
    pub fn governs(&self, connection: &str, read_only: bool) -> bool {
        read_only
            || self.config.default != Action::Allow
            || self
                .config
                .rules
                .iter()
                .filter(|r| matches!(r.matcher, Matcher::Sql(_)))
                .any(|r| r.targets.is_empty() || r.targets.iter().any(|c| c == connection))
    }

    /// Whether a rule that may decide requests of `kind` by `principal` on `target` has a
    /// condition on paths (a dry-run rule too): a relative path, which the host resolves
    /// against a directory the gateway does not know, cannot be decided against it.
    pub fn names_paths(
        &self,
        kind: ssh::SshRequestKind,
        principal: &Principal,
        target: &str,
    ) -> bool {
        self.config.rules.iter().any(|r| {
            r.applies(target, principal)
                && matches!(&r.matcher, Matcher::Ssh(m) if !m.paths.is_empty()
                    && (m.requests.is_empty() || m.requests.contains(&kind)))
        })
    }

    /// The decision on a connection nothing governs.
    pub fn ungoverned(&self) -> Decision {
        self.default_decision()
    }

    /// The settings a client may pass in the startup `options`.
    pub fn allowed_startup_settings(&self) -> &[String] {
        &self.config.allowed_startup_settings
    }

    pub fn allowed_startup_setting(&self, name: &str) -> bool {
        self.config
            .allowed_startup_settings
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name))
    }

    /// Decides a message from its classification (`Err`: it does not parse).
    pub fn decide(
        &self,
        statements: Result<&[StatementInfo], &classify::ClassifyError>,
        principal: &Principal,
        connection: &str,
        read_only: bool,
    ) -> Decision {
        let statements = match statements {
            Ok(s) => s,
            Err(e) => return parse_error(e.to_string()),
        };
        self.combine(statements, |s, dry_run| {
            self.decide_one(s, principal, connection, read_only, dry_run)
        })
    }

    /// The decision for an SSH or Kubernetes request: each of `actions` (the commands of an
    /// exec line, the paths of a transfer, a Kubernetes request …) is decided on its own, and
    /// they combine like the statements of a message. What cannot be read (a command line that
    /// does not parse, a request that cannot be classified) is blocked (rule `parse-error`).
    pub fn decide_actions<A: ProtocolAction>(
        &self,
        actions: Result<&[A], String>,
        principal: &Principal,
        target: &str,
    ) -> Decision {
        self.decide_actions_reaching(actions, &[], principal, target)
    }

    /// As [`Self::decide_actions`], with `reached`: what the request also does to what it
    /// reaches (a list gets each object it returns, a deletecollection deletes each one),
    /// which only a rule that blocks or holds decides: a rule that allows it, or the default,
    /// leaves the decision to `actions` (a rule allowing `list` is not undone by a default
    /// that blocks `get`). The strictest decision of all wins.
    pub fn decide_actions_reaching<A: ProtocolAction>(
        &self,
        actions: Result<&[A], String>,
        reached: &[A],
        principal: &Principal,
        target: &str,
    ) -> Decision {
        let actions = match actions {
            Ok(a) => a,
            Err(why) => return parse_error(why),
        };
        let parts: Vec<(&A, bool)> = actions
            .iter()
            .map(|a| (a, false))
            .chain(reached.iter().map(|a| (a, true)))
            .collect();
        self.combine(&parts, |&(a, reach), dry_run| {
            let matches = |rule: &Rule| {
                (!reach || rule.action != Action::Allow)
                    && rule.applies(target, principal)
                    && a.matched_by(rule)
            };
            match self.matching_rule(matches, dry_run) {
                Some(d) => d,
                // No rule restricts what it reaches: it adds nothing (the actions come first,
                // so this allow is never the one that decides).
                None if reach => Decision {
                    action: Action::Allow,
                    reason: None,
                    approval: None,
                    ..self.default_decision()
                },
                None => self.default_decision(),
            }
        })
    }

    /// One decision from those of the parts of an action: a block anywhere wins, even after a
    /// part that only needs approval (an approval must never carry a blocked part along); then
    /// the strictest approval; then the first allow; with no parts, the default.
    fn combine<'a, T>(
        &self,
        parts: &'a [T],
        mut decide: impl FnMut(&'a T, &mut Vec<String>) -> Decision,
    ) -> Decision {
        let mut dry_run = Vec::new();
        let mut first: Option<Decision> = None;
        let mut held: Vec<Decision> = Vec::new();
        for part in parts {
            let d = decide(part, &mut dry_run);
            match d.action {
                Action::Block => return Decision { dry_run, ..d },
                Action::RequireApproval => held.push(d),
                Action::Allow => {
                    first.get_or_insert(d);
                }
            }
        }
        let d = match held.len() {
            0 => first.unwrap_or_else(|| self.default_decision()),
            _ => strictest(held),
        };
        Decision { dry_run, ..d }
    }

    /// The first rule that matches and is not a dry run decides; dry runs that match are
    /// noted; with none, the default.
    fn first_rule(&self, matches: impl Fn(&Rule) -> bool, dry_run: &mut Vec<String>) -> Decision {
        self.matching_rule(matches, dry_run)
            .unwrap_or_else(|| self.default_decision())
    }

    /// The decision of the first rule that matches and is not a dry run (the dry runs before
    /// it noted); `None` when there is none.
    fn matching_rule(
        &self,
        matches: impl Fn(&Rule) -> bool,
        dry_run: &mut Vec<String>,
    ) -> Option<Decision> {
        for rule in self.config.rules.iter().filter(|r| matches(r)) {
            if rule.dry_run {
                dry_run.push(format!("{}:{}", rule.id, action_name(rule.action)));
                continue;
            }
            return Some(Decision {
                action: rule.action,
                rule: rule.id.clone(),
                reason: rule.reason.clone(),
                dry_run: Vec::new(),
                approval: self.approval_for(Some(rule), rule.action),
            });
        }
        None
    }

    fn default_decision(&self) -> Decision {
        Decision {
            action: self.config.default,
            rule: "default".into(),
            reason: (self.config.default != Action::Allow)
                .then(|| "no rule allows this statement".to_string()),
            dry_run: Vec::new(),
            approval: self.approval_for(None, self.config.default),
        }
    }

    fn decide_one(
        &self,
        s: &StatementInfo,
        principal: &Principal,
        connection: &str,
        read_only: bool,
        dry_run: &mut Vec<String>,
    ) -> Decision {
        if read_only && !read_only_safe(s) {
            return Decision {
                action: Action::Block,
                rule: "read-only".into(),
                reason: Some(format!(
                    "connection {connection:?} is read-only and this statement is {}",
                    kind_name(s.kind())
                )),
                dry_run: Vec::new(),
                approval: None,
            };
        }
        self.first_rule(|rule| rule_matches(rule, s, principal, connection), dry_run)
    }

    /// The approval settings for a `require_approval` decision: the rule's own, else the
    /// policy's (config validation makes sure one exists).
    fn approval_for(&self, rule: Option<&Rule>, action: Action) -> Option<Arc<ApprovalSpec>> {
        if action != Action::RequireApproval {
            return None;
        }
        rule.and_then(|r| r.approval.clone())
            .or_else(|| self.config.approval.clone())
            .map(Arc::new)
    }
}

/// An action of a protocol whose rules have their own matcher (SSH, Kubernetes).
pub trait ProtocolAction {
    /// Whether `rule` is for this protocol and matches the action.
    fn matched_by(&self, rule: &Rule) -> bool;
}

impl ProtocolAction for ssh::SshAction<'_> {
    /// A forward ([`ssh::SshRequestKind::by_name`]) is not allowed by a rule whose `requests`
    /// do not name its kind (an allow of everything for a group was not written with tunnels
    /// into the host's network in mind); such a rule may still block it.
    fn matched_by(&self, rule: &Rule) -> bool {
        let allows = rule.action == Action::Allow;
        matches!(&rule.matcher, Matcher::Ssh(m) if m.matches(self)
            && (!allows || !self.kind.by_name() || m.requests.contains(&self.kind)))
    }
}

impl ProtocolAction for kube::KubeAction<'_> {
    /// An action only a rule naming it may allow ([`kube::KubeAction::by_name`]) is not
    /// allowed by a rule that covers it without naming it (`resources = ["pods"]`, `*`); such a
    /// rule may still block it or hold it.
    /// A request across all namespaces is in every namespace for a rule that blocks or holds,
    /// in none for one that allows ([`kube::KubeMatch::namespaces`]); a request of a whole
    /// collection has every name the same way ([`kube::KubeMatch::names`]).
    fn matched_by(&self, rule: &Rule) -> bool {
        let allows = rule.action == Action::Allow;
        matches!(&rule.matcher, Matcher::Kube(m) if
            (m.matches(self)
                || ((self.all_namespaces || self.all_names) && !allows && m.matches_everything_reached(self)))
            && (!self.by_name || !allows || m.names(self)))
    }
}

/// The decision on what cannot be classified or parsed: refused, saying why.
fn parse_error(why: String) -> Decision {
    gateway_block("parse-error", why)
}

/// A refusal decided by the gateway itself, whatever the policy says, under a built-in rule
/// name (`parse-error`, `unknown-handle` …).
pub fn gateway_block(rule: &str, reason: impl Into<String>) -> Decision {
    Decision {
        action: Action::Block,
        rule: rule.into(),
        reason: Some(reason.into()),
        dry_run: Vec::new(),
        approval: None,
    }
}

fn protocol_name(p: RuleProtocol) -> &'static str {
    match p {
        RuleProtocol::Postgres => "postgres (the default)",
        RuleProtocol::Ssh => "ssh",
        RuleProtocol::Kubernetes => "kubernetes",
    }
}

/// One approval for a message whose statements each need one: it must meet every
/// statement's requirement. With one approver group that is the most approvals any of them
/// needs, within the shortest lifetime and wait, and a grant only when all name the same
/// class. Requirements of different groups cannot be met by one approval: the message is
/// refused (its statements can be sent one by one).
fn strictest(held: Vec<Decision>) -> Decision {
    let specs: Vec<&ApprovalSpec> = held.iter().filter_map(|d| d.approval.as_deref()).collect();
    let rules: BTreeSet<&str> = held.iter().map(|d| d.rule.as_str()).collect();
    let rules = rules.into_iter().collect::<Vec<_>>().join(", ");
    if let Some(unset) = held.iter().find(|d| d.approval.is_none()) {
        // Refused when held (config validation keeps this from happening).
        return unset.clone();
    }
    let groups: BTreeSet<&str> = specs.iter().map(|s| s.approvers.as_str()).collect();
    if groups.len() > 1 {
        return Decision {
            action: Action::Block,
            rule: "approval-conflict".into(),
            reason: Some(format!(
                "the statements of this message need approvals that one request cannot carry (rules {rules}; approvers {}); send them one at a time",
                groups.into_iter().collect::<Vec<_>>().join(", ")
            )),
            dry_run: Vec::new(),
            approval: None,
        };
    }
    let strictest = held
        .iter()
        .max_by_key(|d| d.approval.as_ref().map_or(0, |a| a.required))
        .cloned()
        .unwrap_or_else(|| held[0].clone());
    let grant_class = specs[0]
        .grant_class
        .clone()
        .filter(|class| specs.iter().all(|s| s.grant_class.as_ref() == Some(class)));
    let spec = ApprovalSpec {
        approvers: specs[0].approvers.clone(),
        required: specs.iter().map(|s| s.required).max().unwrap_or(1),
        ttl_secs: specs.iter().map(|s| s.ttl_secs).min().unwrap_or_default(),
        wait_secs: specs.iter().map(|s| s.wait_secs).min().unwrap_or_default(),
        grant_class,
    };
    Decision {
        approval: Some(Arc::new(spec)),
        reason: if rules.contains(',') {
            let why = strictest.reason.as_deref().unwrap_or("approval required");
            Some(format!(
                "{why} (this message needs the approvals of rules {rules})"
            ))
        } else {
            strictest.reason.clone()
        },
        ..strictest
    }
}

fn read_only_safe(s: &StatementInfo) -> bool {
    match s.kind() {
        StatementKind::Read | StatementKind::Transaction => !s.flags.iter().any(|f| {
            matches!(
                f,
                Flag::DangerousFunction
                    | Flag::ServerFile
                    | Flag::CopyProgram
                    | Flag::ExecutesSqlText
            )
        }),
        StatementKind::Session => !s.flags.contains(&Flag::RoleChange),
        _ => false,
    }
}

pub fn kind_name(k: StatementKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn action_name(a: Action) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A rule's `principals`: empty lists match every principal.
fn principal_matches(m: &PrincipalMatch, p: &Principal) -> bool {
    m.is_empty() || m.admits(p)
}

fn table_matches(pattern: &str, table: &str) -> bool {
    let norm = |s: &str| s.to_ascii_lowercase();
    let (pattern, table) = (norm(pattern), norm(table));
    if pattern == table {
        return true;
    }
    let rel = |s: &str| s.rsplit('.').next().unwrap_or(s).to_string();
    // An unqualified pattern matches the table in any schema; an unqualified table may resolve
    // to any schema through search_path, so it matches a qualified pattern too.
    (!pattern.contains('.') || !table.contains('.')) && rel(&pattern) == rel(&table)
}

impl Rule {
    /// Whether the shared part applies: the target and the principal.
    fn applies(&self, target: &str, p: &Principal) -> bool {
        (self.targets.is_empty() || self.targets.iter().any(|t| t == target))
            && principal_matches(&self.principals, p)
    }
}

fn rule_matches(rule: &Rule, s: &StatementInfo, p: &Principal, connection: &str) -> bool {
    rule.applies(connection, p)
        && matches!(&rule.matcher, Matcher::Sql(m) if m.matches(s, rule.action))
}

/// The classification of one message: its statements, or why it does not parse.
pub type Classification = Result<Vec<StatementInfo>, classify::ClassifyError>;

/// Classifications by statement shape, so a statement repeated by a pool, a benchmark or a
/// loop over ids is parsed once.
///
/// The cache key is the token stream of PostgreSQL's own scanner (libpg_query), with the values
/// of numeric constants left out: two texts with the same key have the same parse tree but for
/// those numbers, and nothing the classifier reports depends on a number. String constants
/// stay in the key (`EXPLAIN (ANALYZE 'off')` differs from `EXPLAIN (ANALYZE 'on')`). Each
/// token is length-prefixed, so different token streams cannot collide.
pub struct Classifier {
    cache: moka::sync::Cache<Vec<u8>, Arc<Classification>>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(32 * 1024 * 1024)
                .weigher(|k: &Vec<u8>, _| k.len().try_into().unwrap_or(u32::MAX))
                .build(),
        }
    }
}

impl Classifier {
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        let Some(key) = shape_key(sql) else {
            // The scanner refused the text: it does not parse either.
            return Arc::new(classify::classify(sql));
        };
        if let Some(c) = self.cache.get(&key) {
            return c;
        }
        let c = Arc::new(classify::classify(sql));
        // A classifier that could not run this time is no property of the statement.
        if !matches!(c.as_ref(), Err(classify::ClassifyError::Unavailable(_))) {
            self.cache.insert(key, c.clone());
        }
        c
    }
}

/// The cache key of a statement: its scanner tokens, numeric constants blanked. Each token is
/// its number and the length of its text (4 bytes each, little-endian), then the text.
fn shape_key(sql: &str) -> Option<Vec<u8>> {
    use pg_query::protobuf::Token;
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = Vec::with_capacity(sql.len() + 8 * tokens.len());
    for t in &tokens {
        let text = sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?;
        let text = if t.token == Token::Iconst as i32 || t.token == Token::Fconst as i32 {
            "#"
        } else {
            text
        };
        key.extend_from_slice(&t.token.to_le_bytes());
        key.extend_from_slice(&u32::try_from(text.len()).ok()?.to_le_bytes());
        key.extend_from_slice(text.as_bytes());
    }
    Some(key)
}

/// Parses a startup `options` string into `(name, value)` settings: `-c name=value`,
/// `-cname=value` and `--name=value`. Anything else is an error.
pub fn startup_settings(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words
                .next()
                .ok_or_else(|| "`-c` without a setting".to_string())?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest
        } else {
            return Err(format!("unsupported startup option {w:?}"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("startup setting {setting:?} has no value"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_differ_in_numbers_share_a_classification() {
        let c = Classifier::default();
        let a = c.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 17");
        let b = c.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 123456");
        assert!(Arc::ptr_eq(&a, &b));
        // Strings, names and keywords are part of the shape.
        let off = c.classify("EXPLAIN (ANALYZE 'off') DELETE FROM t WHERE id = 1");
        let on = c.classify("EXPLAIN (ANALYZE 'on') DELETE FROM t WHERE id = 1");
        assert!(!Arc::ptr_eq(&off, &on));
        assert_eq!(
            on.as_ref().as_ref().unwrap()[0].kind(),
            classify::StatementKind::Write
        );
        assert_eq!(
            off.as_ref().as_ref().unwrap()[0].kind(),
            classify::StatementKind::Read
        );
        let t = c.classify("SELECT * FROM t WHERE id = 1");
        let u = c.classify("SELECT * FROM u WHERE id = 1");
        assert!(!Arc::ptr_eq(&t, &u));
        assert!(c.classify("SELEC 1").is_err());
    }

    #[test]
    fn startup_options_parse() {
        assert_eq!(
            startup_settings("-c statement_timeout=5s --work-mem=64MB -cwork_mem=1").unwrap(),
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("work_mem".into(), "1".into())
            ]
        );
        assert!(startup_settings("-c").is_err());
        assert!(startup_settings("-c role").is_err());
        assert!(startup_settings("-R").is_err());
    }

    fn policy(toml_text: &str) -> Arc<Policy> {
        Policy::new(toml::from_str(toml_text).unwrap())
    }

    fn agent() -> Principal {
        Principal {
            subject: "agent-1".into(),
            client_id: Some("agent-1".into()),
            model: Some("gpt-5".into()),
            groups: vec!["analysts".into()],
            ..Principal::default()
        }
    }

    fn decide(p: &Policy, sql: &str, read_only: bool) -> Decision {
        let c = classify::classify(sql);
        p.decide(c.as_deref(), &agent(), "app", read_only)
    }

    const RULES: &str = r#"
[[rules]]
id = "no-destruction"
action = "block"
flags = ["drop", "truncate", "delete_without_where", "update_without_where"]
reason = "destructive statements are not allowed"

[[rules]]
id = "audit-only"
action = "block"
dry_run = true
tables = ["payroll"]

[[rules]]
id = "gpt-no-writes"
action = "require_approval"
principals = { models = ["gpt-5"] }
kinds = ["write"]
tables = ["public.customers"]
"#;

    #[test]
    fn first_matching_rule_decides() {
        let p = policy(RULES);
        let d = decide(&p, "DELETE FROM customers", false);
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::Block, "no-destruction")
        );
        let d = decide(&p, "DELETE FROM customers WHERE id = 1", false);
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::RequireApproval, "gpt-no-writes")
        );
        let d = decide(&p, "SELECT * FROM customers", false);
        assert_eq!((d.action, d.rule.as_str()), (Action::Allow, "default"));
        let d = decide(&p, "SELECT * FROM payroll", false);
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.dry_run, vec!["audit-only:block"]);
    }

    /// Kubernetes rules: agents read-only except scaling in staging; nobody deletes
    /// namespaces; exec decided on its command like an SSH exec.
    #[test]
    fn kubernetes_rules_decide_requests_and_exec_commands() {
        let p = policy(
            r#"
default = "allow"
[[rules]]
id = "no-namespace-deletes"
action = "block"
protocol = "kubernetes"
verbs = ["delete", "deletecollection"]
resources = ["namespaces"]

[[rules]]
id = "agents-scale-staging"
action = "allow"
protocol = "kubernetes"
principals = { models = ["gpt-5"] }
verbs = ["patch", "update"]
resources = ["apps/deployments/scale"]
namespaces = ["staging"]

[[rules]]
id = "agents-read-only"
action = "block"
protocol = "kubernetes"
principals = { models = ["gpt-5"] }
verbs = ["create", "update", "patch", "delete", "deletecollection"]

[[rules]]
id = "no-rm-in-pods"
action = "block"
protocol = "kubernetes"
programs = ["rm"]
"#,
        );
        let decide = |verb: &str, group: &str, resource: &str, sub: &str, ns: &str| {
            let a = kube::KubeAction {
                verb,
                api_group: group,
                resource,
                subresource: sub,
                namespace: ns,
                name: "x",
                command: None,
                line: None,
                by_name: false,
                all_namespaces: false,
                all_names: false,
            };
            let d = p.decide_actions(Ok(&[a]), &agent(), "dev");
            (d.action, d.rule)
        };
        let blocked = |rule: &str| (Action::Block, rule.to_string());
        assert_eq!(
            decide("delete", "", "namespaces", "", ""),
            blocked("no-namespace-deletes")
        );
        assert_eq!(
            decide("patch", "apps", "deployments", "scale", "staging"),
            (Action::Allow, "agents-scale-staging".into())
        );
        assert_eq!(
            decide("patch", "apps", "deployments", "scale", "prod"),
            blocked("agents-read-only")
        );
        assert_eq!(decide("list", "", "pods", "", "prod").0, Action::Allow);
        let line = crate::ssh::command::parse("sh -c 'cd /tmp && rm -rf x'").unwrap();
        let actions: Vec<_> = line
            .commands
            .iter()
            .map(|c| kube::KubeAction {
                verb: "get",
                api_group: "",
                resource: "pods",
                subresource: "exec",
                namespace: "prod",
                name: "web",
                command: Some(c),
                line: Some(&line),
                by_name: false,
                all_namespaces: false,
                all_names: false,
            })
            .collect();
        let d = p.decide_actions(Ok(&actions), &agent(), "dev");
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::Block, "no-rm-in-pods")
        );
        let d = p.decide_actions::<kube::KubeAction>(Err("unclassifiable".into()), &agent(), "dev");
        assert_eq!((d.action, d.rule.as_str()), (Action::Block, "parse-error"));
    }

    /// A list across all namespaces is in the namespaces of a rule that blocks, not of one
    /// that allows.
    #[test]
    fn a_request_across_all_namespaces_is_in_every_namespace_of_a_block() {
        let p = policy(
            r#"
default = "allow"
[[rules]]
id = "no-prod-secrets"
action = "block"
protocol = "kubernetes"
resources = ["secrets"]
namespaces = ["prod"]
[[rules]]
id = "dev-pods-only"
action = "allow"
protocol = "kubernetes"
resources = ["pods"]
namespaces = ["dev"]
[[rules]]
id = "no-other-pods"
action = "block"
protocol = "kubernetes"
resources = ["pods"]
"#,
        );
        let list = |resource: &str, ns: &str| {
            let a = kube::KubeAction {
                verb: "list",
                api_group: "",
                resource,
                subresource: "",
                namespace: ns,
                name: "",
                command: None,
                line: None,
                by_name: false,
                all_namespaces: kube::across_namespaces("list", "", resource, ns),
                all_names: false,
            };
            let d = p.decide_actions(Ok(&[a]), &agent(), "dev");
            (d.action, d.rule)
        };
        assert_eq!(
            list("secrets", ""),
            (Action::Block, "no-prod-secrets".into())
        );
        assert_eq!(list("secrets", "dev"), (Action::Allow, "default".into()));
        assert_eq!(list("pods", "dev"), (Action::Allow, "dev-pods-only".into()));
        assert_eq!(list("pods", ""), (Action::Block, "no-other-pods".into()));
        assert!(!kube::across_namespaces("list", "", "nodes", ""));
        assert!(kube::across_namespaces(
            "watch",
            "example.com",
            "widgets",
            ""
        ));
        assert!(!kube::across_namespaces(
            "create",
            "example.com",
            "clusterwidgets",
            ""
        ));
    }

    /// A port-forward or proxy (`by_name`) is allowed only by a rule that names it; a rule
    /// that covers it without naming it may still block it.
    #[test]
    fn only_a_rule_naming_a_port_forward_allows_it() {
        let rules = |extra: &str| {
            policy(&format!(
                r#"
default = "allow"
{extra}
[[rules]]
id = "read-pods"
action = "allow"
protocol = "kubernetes"
verbs = ["get", "list", "watch"]
resources = ["pods"]
"#
            ))
        };
        let forward = |p: &Policy, ns: &str| {
            let a = kube::KubeAction {
                verb: "get",
                api_group: "",
                resource: "pods",
                subresource: "portforward",
                namespace: ns,
                name: "db-0",
                command: None,
                line: None,
                by_name: true,
                all_namespaces: false,
                all_names: false,
            };
            let d = p.decide_actions(Ok(&[a]), &agent(), "dev");
            (d.action, d.rule)
        };
        // Covered by `pods`, not named: the rule does not allow it (the default decides).
        assert_eq!(
            forward(&rules(""), "staging"),
            (Action::Allow, "default".into())
        );
        let named = r#"
[[rules]]
id = "no-prod"
action = "block"
protocol = "kubernetes"
resources = ["pods"]
namespaces = ["prod"]
[[rules]]
id = "forward-db"
action = "allow"
protocol = "kubernetes"
resources = ["pods/portforward"]
"#;
        let p = rules(named);
        assert_eq!(forward(&p, "staging"), (Action::Allow, "forward-db".into()));
        // A block that covers it without naming it still blocks it.
        assert_eq!(forward(&p, "prod"), (Action::Block, "no-prod".into()));
        for (pattern, names) in [
            ("pods/portforward", true),
            ("*/portforward", true),
            ("pods/*", true),
            ("core/pods/portforward", true),
            ("pods", false),
            ("*", false),
            ("core/*", false),
        ] {
            let p = policy(&format!(
                "[[rules]]\nid = \"r\"\naction = \"allow\"\nprotocol = \"kubernetes\"\nresources = [\"{pattern}\"]"
            ));
            assert_eq!(forward(&p, "staging").1 == "r", names, "{pattern}");
        }
        let p = policy(
            "[[rules]]\nid = \"r\"\naction = \"allow\"\nprotocol = \"kubernetes\"\nsubresources = [\"portforward\"]",
        );
        assert_eq!(forward(&p, "staging").1, "r");
    }

    #[test]
    fn a_rule_with_another_protocols_conditions_is_refused() {
        let e = toml::from_str::<PolicyConfig>(
            "[[rules]]\nid = \"r\"\naction = \"block\"\nverbs = [\"delete\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("protocol = \"kubernetes\""), "{e}");
        let e = toml::from_str::<PolicyConfig>(
            "[[rules]]\nid = \"r\"\naction = \"block\"\nprotocol = \"kubernetes\"\nlogins = [\"root\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("this rule is for kubernetes"), "{e}");
        let ok = toml::from_str::<PolicyConfig>(
            "[[rules]]\nid = \"r\"\naction = \"block\"\nprotocol = \"kubernetes\"\nprograms = [\"rm\"]",
        )
        .unwrap();
        assert!(matches!(&ok.rules[0].matcher, Matcher::Kube(m) if m.command.programs == ["rm"]));
    }

    /// A value no request is ever classified with is refused at load, naming what to write:
    /// a rule that can never match is a guardrail that is silently not there (outside review,
    /// 2026-12-07: `verbs = ["DELETE"]`, `resources = ["secret"]`, `operations = ["delete"]`,
    /// `functions = ["pg_catalog.pg_sleep"]`, `tables = ["app.hr.payroll"]` and
    /// `tables = ["payroll*"]` loaded, and each rule let through what it named).
    #[test]
    fn a_rule_value_that_can_never_match_is_refused_at_load() {
        let refused = |protocol: &str, condition: &str, says: &str| {
            let e = toml::from_str::<PolicyConfig>(&format!(
                "[[rules]]\nid = \"r\"\naction = \"block\"\nprotocol = \"{protocol}\"\n{condition}"
            ))
            .map(|_| ())
            .unwrap_err()
            .to_string();
            assert!(e.contains(says), "{condition}: {e}");
        };
        for (protocol, condition, says) in [
            ("kubernetes", "verbs = [\"DELETE\"]", "is not a verb"),
            ("kubernetes", "verbs = [\"exec\"]", "is not a verb"),
            ("kubernetes", "resources = [\"secret\"]", "\"secrets\""),
            (
                "kubernetes",
                "resources = [\"apps/deployment/scale\"]",
                "\"deployments\"",
            ),
            ("kubernetes", "resources = [\"Pods\"]", "upper case"),
            ("kubernetes", "resources = [\"pods/logs\"]", "\"log\""),
            (
                "kubernetes",
                "subresources = [\"port-forward\"]",
                "\"portforward\"",
            ),
            ("ssh", "operations = [\"delete\"]", "not an SFTP operation"),
            (
                "postgres",
                "functions = [\"pg_catalog.pg_sleep\"]",
                "without schema",
            ),
            (
                "postgres",
                "functions = [\"pg_sleep(float8)\"]",
                "without schema",
            ),
            ("postgres", "tables = [\"app.hr.payroll\"]", "schema.table"),
            ("postgres", "tables = [\"payroll*\"]", "glob"),
            ("ssh", "programs = [\"/usr/bin/rm\"]", "(\"rm\")"),
            ("kubernetes", "programs = [\"/bin/*\"]", "under every path"),
        ] {
            refused(protocol, condition, says);
        }
        for (protocol, condition) in [
            (
                "kubernetes",
                "verbs = [\"*\", \"deletecollection\", \"post\"]",
            ),
            (
                "kubernetes",
                "resources = [\"apps/deployments/scale\", \"pods/*\", \"*\"]",
            ),
            ("kubernetes", "subresources = [\"log\", \"exec\"]"),
            ("ssh", "operations = [\"modify\", \"remove\", \"set_stat\"]"),
            (
                "postgres",
                "functions = [\"pg_sleep\"]\ntables = [\"hr.payroll\", \"payroll\"]",
            ),
        ] {
            let rule = format!(
                "[[rules]]\nid = \"r\"\naction = \"block\"\nprotocol = \"{protocol}\"\n{condition}"
            );
            toml::from_str::<PolicyConfig>(&rule).unwrap_or_else(|e| panic!("{condition}: {e}"));
        }
    }

    #[test]
    fn one_blocked_statement_blocks_the_message() {
        let p = policy(RULES);
        let d = decide(&p, "SELECT 1; TRUNCATE customers; SELECT 2", false);
        assert_eq!(d.rule, "no-destruction");
        assert!(decide(&p, "SELEC 1", false).blocks());
        assert_eq!(decide(&p, "SELEC 1", false).rule, "parse-error");
        // A statement that needs approval does not shield a blocked one after it.
        let d = decide(
            &p,
            "UPDATE customers SET name = 'x' WHERE id = 1; DROP TABLE customers",
            false,
        );
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::Block, "no-destruction")
        );
        let d = decide(&p, "SELECT 1; DELETE FROM customers WHERE id = 1", false);
        assert_eq!(d.action, Action::RequireApproval);
    }

    #[test]
    fn read_only_connections_allow_reads_only() {
        let p = policy("");
        assert!(!decide(&p, "SELECT * FROM t", true).blocks());
        assert!(!decide(&p, "BEGIN", true).blocks());
        assert!(!decide(&p, "SET search_path = x", true).blocks());
        for sql in [
            "INSERT INTO t VALUES (1)",
            "WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x",
            "SET ROLE postgres",
            "SELECT pg_read_file('/etc/passwd')",
            "CREATE TABLE x (a int)",
            "DO $$ BEGIN END $$",
            "SELECT query_to_xml('select 1', true, false, '')",
            "CREATE SCHEMA s CREATE TABLE t (a int)",
        ] {
            assert_eq!(decide(&p, sql, true).rule, "read-only", "{sql}");
        }
    }

    #[test]
    fn the_version_changes_with_the_policy() {
        assert_ne!(policy(RULES).version(), policy("").version());
        assert_eq!(policy(RULES).version(), policy(RULES).version());
        let ro = Policy::for_node(PolicyConfig::default(), vec!["app".into()]);
        assert_ne!(ro.version(), policy("").version());
    }

    /// A rule is hashed into the version as it is written (one flat table): splitting it into
    /// a shared part and a protocol matcher changes no version.
    #[test]
    fn a_rule_is_hashed_as_written() {
        let config: PolicyConfig = toml::from_str(
            r#"
            [[rules]]
            id = "r"
            action = "block"
            connections = ["app"]
            kinds = ["ddl"]
            tables = ["t"]
            "#,
        )
        .unwrap();
        let rule = &config.rules[0];
        assert_eq!(
            (
                rule.targets.as_slice(),
                match &rule.matcher {
                    Matcher::Sql(m) => m.tables.as_slice(),
                    Matcher::Ssh(_) | Matcher::Kube(_) => &[],
                }
            ),
            (&["app".to_string()][..], &["t".to_string()][..])
        );
        let json = serde_json::to_value(rule).unwrap();
        assert_eq!(json["connections"], serde_json::json!(["app"]));
        assert_eq!(json["kinds"], serde_json::json!(["ddl"]));
        assert!(
            json.get("sql").is_none() && json.get("targets").is_none(),
            "{json}"
        );
        let unknown = toml::from_str::<PolicyConfig>(
            "[[rules]]\nid = \"r\"\naction = \"block\"\ntabels = [\"t\"]\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("tabels"));
    }

    #[test]
    fn tables_match_with_and_without_schema() {
        assert!(table_matches("customers", "public.customers"));
        assert!(table_matches("public.customers", "customers"));
        assert!(table_matches("Public.Customers", "public.customers"));
        assert!(!table_matches("other.customers", "public.customers"));
        assert!(!table_matches("customers", "customers_archive"));
    }

    /// A table the classifier cannot know may be any to a rule that blocks or holds, and is
    /// none to one that allows (found by an outside review: `table_to_xml($1, …)` matched an
    /// allow on `public.reports` and dumped payroll).
    #[test]
    fn an_unknown_table_matches_blocks_not_allows() {
        let p = policy(
            r#"
            default = "block"
            [[rules]]
            id = "reports"
            action = "allow"
            tables = ["public.reports"]
            [[rules]]
            id = "no-payroll"
            action = "block"
            tables = ["payroll"]
            "#,
        );
        let decided = |sql: &str| decide(&p, sql, false).rule;
        assert_eq!(decided("SELECT * FROM public.reports"), "reports");
        assert_eq!(
            decided("SELECT table_to_xml($1, true, false, '')"),
            "no-payroll"
        );
        assert_eq!(decided("DROP SCHEMA s CASCADE"), "no-payroll");
        let allow_only = policy(
            r#"
            default = "block"
            [[rules]]
            id = "reports"
            action = "allow"
            tables = ["public.reports"]
            "#,
        );
        let d = decide(
            &allow_only,
            "SELECT table_to_xml($1, true, false, '')",
            false,
        );
        assert_eq!(d.rule, "default");
    }

    #[test]
    fn a_message_takes_the_strictest_approval_of_its_statements() {
        let p = policy(
            r#"
[[rules]]
id = "payroll-two"
action = "require_approval"
tables = ["payroll"]
kinds = ["write"]
approval = { approvers = "dba", required = 2, ttl_secs = 600, wait_secs = 5, grant_class = "payroll" }

[[rules]]
id = "writes-one"
action = "require_approval"
kinds = ["write"]
approval = { approvers = "dba", required = 1, ttl_secs = 60, wait_secs = 30, grant_class = "write" }

[[rules]]
id = "ddl-ops"
action = "require_approval"
kinds = ["ddl"]
approval = { approvers = "ops" }
"#,
        );
        // Whichever statement comes first, the message needs what the strictest needs.
        for sql in [
            "UPDATE t SET a = 1 WHERE id = 1; UPDATE payroll SET amount = 0 WHERE id = 1",
            "UPDATE payroll SET amount = 0 WHERE id = 1; UPDATE t SET a = 1 WHERE id = 1",
        ] {
            let d = decide(&p, sql, false);
            assert_eq!(d.action, Action::RequireApproval, "{sql}");
            assert_eq!(d.rule, "payroll-two", "{sql}");
            let a = d.approval.as_deref().unwrap();
            assert_eq!((a.approvers.as_str(), a.required), ("dba", 2), "{sql}");
            assert_eq!((a.ttl_secs, a.wait_secs), (60, 5), "{sql}");
            assert_eq!(
                a.grant_class, None,
                "a grant of one class cannot carry the other"
            );
            assert!(d.reason.unwrap().contains("payroll-two, writes-one"));
        }
        // One statement alone keeps its own settings.
        let d = decide(&p, "UPDATE payroll SET amount = 0 WHERE id = 1", false);
        assert_eq!(d.approval.unwrap().grant_class.as_deref(), Some("payroll"));
        // Different approver groups: no single request can carry both.
        let d = decide(
            &p,
            "UPDATE t SET a = 1 WHERE id = 1; CREATE TABLE x (a int)",
            false,
        );
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::Block, "approval-conflict")
        );
        assert!(d.reason.unwrap().contains("dba, ops"));
    }

    #[test]
    fn only_a_rule_naming_forwards_allows_them() {
        use ssh::{SshAction, SshRequestKind};
        let forward = |kind| SshAction {
            kind,
            login: "deploy",
            command: None,
            line: None,
            path: Some("db:5432"),
            operation: None,
        };
        let decide = |p: &Policy, kind| {
            p.decide_actions(Ok(&[forward(kind)]), &agent(), "web")
                .only_by_rule(|| "no rule".into())
        };
        let broad = r#"
            [[rules]]
            id = "analysts-anything"
            protocol = "ssh"
            action = "allow"
            principals = { groups = ["analysts"] }
            "#;
        let p = policy(broad);
        for kind in [SshRequestKind::Forward, SshRequestKind::RemoteForward] {
            let d = decide(&p, kind);
            assert_eq!((d.action, d.rule.as_str()), (Action::Block, "default"));
        }
        let exec = SshAction {
            kind: SshRequestKind::Exec,
            path: None,
            ..forward(SshRequestKind::Exec)
        };
        let d = p.decide_actions(Ok(&[exec]), &agent(), "web");
        assert_eq!(d.rule, "analysts-anything", "other requests as before");
        let p = policy(&format!(
            r#"
            [[rules]]
            id = "no-db"
            protocol = "ssh"
            action = "block"
            paths = ["db:*"]
            {broad}
            [[rules]]
            id = "tunnels"
            protocol = "ssh"
            action = "allow"
            requests = ["forward"]
            "#
        ));
        assert_eq!(
            decide(&p, SshRequestKind::Forward).rule,
            "no-db",
            "a broad block"
        );
        let p = policy(&format!(
            r#"{broad}
            [[rules]]
            id = "tunnels"
            protocol = "ssh"
            action = "allow"
            requests = ["forward"]
            "#
        ));
        let d = decide(&p, SshRequestKind::Forward);
        assert_eq!((d.action, d.rule.as_str()), (Action::Allow, "tunnels"));
        assert_eq!(decide(&p, SshRequestKind::RemoteForward).rule, "default");
    }

    #[test]
    fn rules_that_name_paths_for_a_kind() {
        use ssh::SshRequestKind::{Exec, Forward, Sftp};
        let p = policy(
            r#"
            [[rules]]
            id = "tunnel"
            protocol = "ssh"
            action = "allow"
            requests = ["forward"]
            paths = ["db:5432"]

            [[rules]]
            id = "elsewhere"
            protocol = "ssh"
            action = "block"
            connections = ["other"]
            paths = ["/srv/*"]
            "#,
        );
        assert!(p.names_paths(Forward, &agent(), "web"));
        assert!(!p.names_paths(Sftp, &agent(), "web"));
        assert!(p.names_paths(Sftp, &agent(), "other"));
        assert!(
            p.names_paths(Exec, &agent(), "other"),
            "no requests: any kind"
        );
    }
}
