//! The audit record: what a SIEM reads, one JSON object per record.
//!
//! A record is serialised once, by the node that seals it into its stream (see [`crate::chain`]),
//! and never again: every consumer hashes the exact bytes it received. The types here are used
//! both to build records and to read them back (replay, SIEM-side tooling).

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The version of the record schema written by this code (`v` in every record).
pub const SCHEMA_VERSION: u32 = 2;

/// What a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// First record of a stream (one gateway process lifetime).
    StreamStart,
    /// Last record of a stream, written on orderly shutdown.
    StreamEnd,
    /// A client authenticated (outcome `success`) or was refused (outcome `denied`).
    SessionStart,
    /// A session ended.
    SessionEnd,
    /// A statement, written before the target sees it.
    Request,
    /// What the target answered to a request (same `stmt`).
    Response,
    /// A chunk of a recorded terminal or exec stream (`recording`).
    Recording,
    /// A request the gateway refused on its own (never reached the target).
    Blocked,
    /// A CancelRequest forwarded to the target.
    Cancel,
    /// The client broke the wire protocol (bad frame, unknown message); the session was closed.
    ProtocolError,
    /// A statement was held and an approval request created for it (`approval.id`).
    ApprovalRequested,
    /// A held statement's request was decided while the gateway waited (approved, denied) or
    /// the wait ended without a decision (`pending`).
    ApprovalDecided,
    /// The target sent something with no request in flight (PostgreSQL: a notification of a
    /// channel the session listens on, a notice), on record when it came (`response`), not
    /// with whatever request came next.
    Unsolicited,
}

/// How an action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Error,
    Blocked,
    Pending,
    Denied,
}

/// Who acted, as established from a verified token. `intent` is declared by the client and
/// recorded, never trusted for authorisation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// `iss` of the token.
    pub issuer: String,
    /// `id_token` or `access_token`.
    pub token_type: String,
    /// The token's `exp` claim, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_exp: Option<u64>,
    /// The token's `jti` claim, when it has one: ties a record to the token (and an SSH
    /// certificate to the token it was issued for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The SAML sign-in behind a Vigil-issued token: ties the record to the IdP's own log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saml: Option<SamlOrigin>,
    /// Who the person is across identity providers: the value of the configured person key
    /// (`identity.claims.person`, `identity.saml.person_attribute`), when the token carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
}

/// Where a SAML identity came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamlOrigin {
    /// The IdP's entity id.
    pub idp: String,
    /// The `ID` of the assertion the person or workload signed in with.
    pub assertion_id: String,
}

/// The client connection and the target it reaches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// `postgres`, `ssh` or `kubernetes`: the protocol of every request of the session.
    pub protocol: String,
    /// The client's `IP:port`: the connection's peer, or, behind a load balancer that sends
    /// the PROXY protocol, the client address the balancer reported.
    pub client_addr: String,
    /// The load balancer's `IP:port` (the connection's peer), when the client came through a
    /// configured one that reported `client_addr` in a PROXY protocol header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer_addr: Option<String>,
    pub client_tls: bool,
    /// The configured connection name the client asked for (`database` for PostgreSQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `host:port/database` of the target, when one was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The client software's own name (`application_name`), as declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
}

/// A request as the client sent it, in its protocol's own terms (`protocol` names which).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum Request {
    Postgres(PgRequest),
    Ssh(SshRequest),
    Kubernetes(KubeRequest),
    Console(ConsoleRequest),
}

/// What a person did in the web console that the audit must show: looking at a recorded
/// session's content (its page, a download). Written before the content is sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// `view_session` (the session's page), `download_records` (its records as JSON lines),
    /// `play_recording` (a terminal recording of it, for the player).
    pub action: String,
    /// The session looked at.
    pub session: String,
}

/// What came back for one request, in its protocol's own terms (`protocol` names which).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum Response {
    Postgres(PgResponse),
    Ssh(SshResponse),
    Kubernetes(KubeResponse),
}

impl Request {
    /// The PostgreSQL request, if this is one.
    pub fn postgres(&self) -> Option<&PgRequest> {
        match self {
            Request::Postgres(r) => Some(r),
            _ => None,
        }
    }
}

impl Response {
    /// The PostgreSQL response, if this is one.
    pub fn postgres(&self) -> Option<&PgResponse> {
        match self {
            Response::Postgres(r) => Some(r),
            _ => None,
        }
    }
}

/// A PostgreSQL statement as the client sent it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgRequest {
    /// `simple` (Query message), `extended` (Execute of a bound portal), `function_call`.
    pub mode: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    /// Bind parameters: printable UTF-8 values as they are, anything else as `\x` hex, NULL as
    /// null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Option<String>>>,
    /// The prepared statements the request runs by name (SQL `EXECUTE`, `EXPLAIN ANALYZE
    /// EXECUTE`, `CREATE TABLE … AS EXECUTE`), with the text the target holds under each name
    /// at that moment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prepared: Vec<PreparedText>,
    /// On a statement held for approval (and one that ran under an approval): what else the
    /// approval is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
}

/// What an approval binds beyond the statement's text, its prepared statements and its
/// parameter values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The session's database, role (`current_user`) and `search_path`, as the target
    /// reported them just before the statement.
    pub database: String,
    pub role: String,
    pub search_path: String,
    /// The session's other settings that differ from the server's, `name=value; …` sorted by
    /// name (client, session, role or database settings; see the policy docs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub settings: String,
    /// Each bind parameter's format and declared type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamType>,
    /// Hex SHA-256 over everything bound: the approval's `statement_hash`.
    pub hash: String,
}

/// How a bind parameter was sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamType {
    /// `text` or `binary`.
    pub format: String,
    /// The type OID the client declared at Parse; 0 leaves it to the server.
    pub type_oid: u32,
}

/// A prepared statement named by a request, resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedText {
    pub name: String,
    pub text: String,
}

/// An error reported by a PostgreSQL target (or by the gateway in its place).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgError {
    pub sqlstate: String,
    pub message: String,
}

/// What came back for one PostgreSQL request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgResponse {
    /// Command tags in order (`SELECT 1`, `INSERT 0 3` …), one per completed statement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Rows returned (DataRow messages) over all result sets.
    pub rows: u64,
    /// Bytes of row and COPY data that came back or went in.
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// The first rows (printable UTF-8 as is, anything else as `\x` hex), up to the configured
    /// size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub result: Vec<Vec<Option<String>>>,
    /// True when `result` holds fewer rows than came back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Hex SHA-256 over the bodies of the DataRows not recorded in `result` (in order), present
    /// when `truncated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<PgError>,
    /// The message of each notice (NoticeResponse: `RAISE NOTICE`, warnings) the client got
    /// with this answer, masked like results (one with no statement in flight has an
    /// `unsolicited` record of its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
    /// Each notification (`LISTEN`/`NOTIFY`) the client got with this answer, its payload
    /// masked like results (one with no statement in flight: see `notices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<PgNotification>,
}

/// A notification a PostgreSQL session received.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgNotification {
    pub channel: String,
    pub payload: String,
}

/// An SSH channel request (exec, shell, subsystem, forward …) as the client sent it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRequest {
    /// The channel number the client chose.
    pub channel: u32,
    /// The channel or request type: `exec`, `shell`, `subsystem`, `pty-req`, `env`,
    /// `direct-tcpip`, `tcpip-forward`, `forwarded-tcpip`, `x11-req` …
    pub request_type: String,
    /// The command line of an `exec`, the subsystem name of a `subsystem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The login on the target host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// `host:port` of a forward: where a local forward connects, where a remote forward
    /// listens on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// `address:port` of whoever connected to a remote forward on the host
    /// (`forwarded-tcpip`), as the host reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originator: Option<String>,
    /// An SFTP operation (`open`, `remove`, `rename` …: `SftpOp::name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// The path an SFTP operation touches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path an SFTP rename, link or copy creates or writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_path: Option<String>,
}

/// How an SSH channel request ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshResponse {
    pub channel: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
    /// Bytes that went to the target and came back on the channel.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The port the host listens on for a remote forward (`tcpip-forward`): the one it
    /// allocated when the client asked for port 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SshError>,
}

/// Why an SSH request failed (channel open failure, refused request, broken connection).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshError {
    /// The channel-open failure reason code (RFC 4254 §5.1), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u32>,
    pub message: String,
}

/// A Kubernetes API request, as the gateway resolved it from the HTTP request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeRequest {
    /// The Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection …
    pub verb: String,
    pub method: String,
    pub path: String,
    /// Empty for the core group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The command of an exec, as its argument vector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Hex SHA-256 of the request body, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
    /// The query string as sent (without `?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The request body as recorded: Secret values and tokens redacted, masking detectors
    /// applied, cut at the configured size (`body_bytes` is the whole length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub body_bytes: u64,
    /// The request's `Content-Type` as sent, for a request with a body (what a patch is:
    /// strategic merge, merge, JSON patch or server-side apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the API server answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeResponse {
    /// The HTTP status code.
    pub status: u16,
    pub bytes: u64,
    /// A watch: the events it carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// A log (`logs`, `logs -f`): the lines it carried (complete ones, ending in a newline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<KubeError>,
    /// The response body as recorded (as for the request's `body`; a stream's first bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// A failed Kubernetes request: the `Status` object's reason and message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeError {
    pub reason: String,
    pub message: String,
}

/// A chunk of a recorded stream (a terminal, an exec stream): the bytes themselves are kept
/// apart, and the record proves them: a replay whose bytes hash to `sha256` at `offset` is what
/// crossed the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recording {
    /// The SSH channel number or the Kubernetes exec stream the bytes crossed on.
    pub channel: String,
    /// `input` (client to target), `output` or `error` (target to client).
    pub direction: String,
    /// Bytes of this channel and direction before this chunk.
    pub offset: u64,
    pub length: u64,
    /// Hex SHA-256 of the chunk's bytes; with `salted`, of the recording file's salt (its
    /// first [`SALT_LEN`] bytes) followed by the chunk's bytes.
    pub sha256: String,
    /// Whether the digest is salted. A digest of a short chunk alone gives the chunk away (one
    /// keystroke has 256 possible values): whoever reads the records (a SIEM on the topic)
    /// must not read what was typed. The salt stays with the bytes, in the recording file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub salted: bool,
    /// Where the bytes are kept.
    pub store: ChunkStore,
}

/// Length of the random salt at the start of a recording file.
pub const SALT_LEN: usize = 32;

/// Where a recorded chunk's bytes are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChunkStore {
    /// In the record itself, base64 (standard alphabet, padded).
    Inline { data: String },
    /// In a file next to the stream, at this byte offset.
    File { path: String, offset: u64 },
}

impl Default for ChunkStore {
    fn default() -> Self {
        ChunkStore::Inline {
            data: String::new(),
        }
    }
}

impl Recording {
    /// Whether `bytes` are the chunk this record describes; `salt` is the recording file's
    /// (read only when the digest is salted).
    pub fn proves(&self, salt: &[u8], bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.length
            && chunk_digest(self.salted.then_some(salt), bytes) == self.sha256
    }
}

/// Hex SHA-256 of a chunk, salted or not (see [`Recording::salted`]).
pub fn chunk_digest(salt: Option<&[u8]>, bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if let Some(salt) = salt {
        h.update(salt);
    }
    h.update(bytes);
    hex::encode(h.finalize())
}

/// The policy that decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// The rule that matched (or `default`).
    pub rule: String,
    /// Hex SHA-256 of the policy in force.
    pub version: String,
}

/// The approval (or grant) behind a held statement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRef {
    /// The approval request id (`apr-…`) or grant id (`g-…`).
    pub id: String,
    /// `pending`, `approved`, `denied`, `expired`, `consumed` (used by this statement) or
    /// `granted` (a time-windowed grant let it run).
    pub state: String,
    /// Who approved or denied (or granted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by: Vec<String>,
}

/// The part of a record that the node fills in; [`crate::chain::Chain::seal`] adds the chain
/// fields (`v`, `stream`, `seq`, `prev`) in front of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// UTC, RFC 3339 with nanoseconds.
    pub time: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "parties::left_out")]
    pub principal: Option<Arc<Principal>>,
    #[serde(default, skip_serializing_if = "parties::left_out")]
    pub connection: Option<Arc<Connection>>,
    /// `principal` and `connection` serialised once for all the records of a session
    /// ([`Body::to_json`]); not part of the record.
    #[serde(skip)]
    pub parties: PartiesJson,
    /// Statement number inside the session; a request and its response share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stmt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// Human-readable reason (why a token was refused, why a frame was rejected …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Entity kinds masked in this record's copy of the data, and how many values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub masked: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<Recording>,
}

impl Body {
    /// A body with only the fields every record has; the rest is filled in by the caller.
    pub fn new(time: String, node: String, session: Option<String>, kind: Kind) -> Self {
        Self {
            time,
            node,
            session,
            kind,
            principal: None,
            connection: None,
            parties: PartiesJson::default(),
            stmt: None,
            request: None,
            response: None,
            outcome: None,
            duration_us: None,
            policy: None,
            detail: None,
            masked: Default::default(),
            approval: None,
            recording: None,
        }
    }

    /// The record body as JSON. The `principal` and `connection` a session gives every one of
    /// its records come from [`Body::parties`] when it holds those very two (serialised once),
    /// and are serialised here otherwise.
    pub fn to_json(&self) -> Vec<u8> {
        let cached = self.parties.0.as_ref().filter(|p| {
            self.principal
                .as_ref()
                .is_some_and(|x| Arc::ptr_eq(x, &p.principal))
                && self
                    .connection
                    .as_ref()
                    .is_some_and(|x| Arc::ptr_eq(x, &p.connection))
        });
        let Some(parties) = cached else {
            return serde_json::to_vec(self).expect("a record body always serialises");
        };
        // Room for the long strings as escaped (a JSON body's escaped quotes add about an
        // eighth; a quarter is kept), so a record that keeps a 64 KiB body is not copied from
        // buffer to buffer as it grows.
        let long = self.long_strings();
        let mut out = Vec::with_capacity(parties.json.len() + 512 + long + long / 4);
        parties::LEAVE_OUT.with(|leave_out| {
            leave_out.set(true);
            let written = serde_json::to_writer(&mut out, self);
            leave_out.set(false);
            written.expect("a record body always serialises");
        });
        // In their place, after `kind` (docs/audit-schema.md lists the fields in order). A
        // string value cannot hold an unescaped `"`, so the first `,"kind":"` is the key, and a
        // kind's name has no escapes: the next `"` closes it.
        const KEY: &[u8] = br#","kind":""#;
        let after_kind = out
            .windows(KEY.len())
            .position(|w| w == KEY)
            .and_then(|at| {
                let value = at + KEY.len();
                out[value..]
                    .iter()
                    .position(|&b| b == b'"')
                    .map(|end| value + end + 1)
            })
            .expect("a record body always has a kind");
        // `,` + the parties, moved in with two copies (no byte-by-byte iterator).
        let (len, add) = (out.len(), parties.json.len() + 1);
        out.resize(len + add, 0);
        out.copy_within(after_kind..len, after_kind + add);
        out[after_kind] = b',';
        out[after_kind + 1..after_kind + add].copy_from_slice(&parties.json);
        out
    }

    /// The bytes of the strings a record may keep long: a statement's text, a Kubernetes
    /// request's and response's body.
    fn long_strings(&self) -> usize {
        let request = match &self.request {
            Some(Request::Postgres(r)) => r.text.len(),
            Some(Request::Kubernetes(r)) => r.body.as_ref().map_or(0, String::len),
            _ => 0,
        };
        let response = match &self.response {
            Some(Response::Kubernetes(r)) => r.body.as_ref().map_or(0, String::len),
            _ => 0,
        };
        request + response
    }

    /// The PostgreSQL request of this record, if it has one.
    pub fn pg_request(&self) -> Option<&PgRequest> {
        self.request.as_ref().and_then(Request::postgres)
    }

    /// The PostgreSQL response of this record, if it has one.
    pub fn pg_response(&self) -> Option<&PgResponse> {
        self.response.as_ref().and_then(Response::postgres)
    }
}

/// A session's principal and connection with their JSON (`"principal":{…},"connection":{…}`),
/// made once: most of a record's bytes, the same in every record of the session.
#[derive(Debug)]
pub struct Parties {
    principal: Arc<Principal>,
    connection: Arc<Connection>,
    json: Vec<u8>,
}

impl Parties {
    pub fn new(principal: Arc<Principal>, connection: Arc<Connection>) -> Arc<Self> {
        #[derive(Serialize)]
        struct Both<'a> {
            principal: &'a Principal,
            connection: &'a Connection,
        }
        let both = serde_json::to_vec(&Both {
            principal: &principal,
            connection: &connection,
        })
        .expect("a principal and a connection always serialise");
        Arc::new(Self {
            principal,
            connection,
            json: both[1..both.len() - 1].to_vec(),
        })
    }

    pub fn principal(&self) -> &Arc<Principal> {
        &self.principal
    }

    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// A body's `principal`, `connection` and [`Body::parties`], from these.
    pub fn fill(self: &Arc<Self>, body: &mut Body) {
        body.principal = Some(self.principal.clone());
        body.connection = Some(self.connection.clone());
        body.parties = PartiesJson(Some(self.clone()));
    }
}

/// [`Body::parties`]: a cache, equal to any other (two bodies are equal by what they record).
#[derive(Clone, Debug, Default)]
pub struct PartiesJson(Option<Arc<Parties>>);

impl PartialEq for PartiesJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PartiesJson {}

mod parties {
    use std::cell::Cell;

    thread_local! {
        /// Set while [`super::Body::to_json`] serialises a body whose principal and connection
        /// it splices in from their cached JSON.
        pub(super) static LEAVE_OUT: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn left_out<T>(v: &Option<T>) -> bool {
        v.is_none() || LEAVE_OUT.with(Cell::get)
    }
}

/// A whole record as read back from a log or topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub stream: String,
    pub seq: u64,
    pub prev: String,
    #[serde(flatten)]
    pub body: Body,
}

impl Record {
    /// Parses one record from its exact bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const SCHEMA: &str = include_str!("../../docs/audit-record.schema.json");

    #[test]
    fn a_session_s_parties_are_serialised_once_and_only_for_themselves() {
        let principal = Arc::new(Principal {
            subject: "agent \"7\"".into(),
            groups: vec!["dba".into()],
            issuer: "https://idp".into(),
            token_type: "access_token".into(),
            ..Principal::default()
        });
        let connection = Arc::new(Connection {
            protocol: "postgres".into(),
            client_addr: "127.0.0.1:5".into(),
            ..Connection::default()
        });
        let parties = Parties::new(principal.clone(), connection.clone());
        let mut body = Body::new("t".into(), "n".into(), Some("s".into()), Kind::Request);
        body.stmt = Some(3);
        parties.fill(&mut body);
        let spliced = body.to_json();
        let plain = serde_json::to_vec(&body).unwrap();
        // The same bytes, fields in the documented order, whether cached or not.
        assert_eq!(spliced, plain);
        let plain_session = Body {
            session: Some(r#"s","kind":"x"#.into()),
            ..body.clone()
        };
        assert_eq!(
            plain_session.to_json(),
            serde_json::to_vec(&plain_session).unwrap()
        );
        let read: Body = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(read, body);
        assert_eq!(read.principal.as_deref(), Some(&*principal));
        assert_eq!(read, serde_json::from_slice::<Body>(&plain).unwrap());
        // Another principal in the body than the one serialised: the cache is not used.
        body.principal = Some(Arc::new(Principal {
            subject: "someone else".into(),
            ..(*principal).clone()
        }));
        let read: Body = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(read.principal.unwrap().subject, "someone else");
        // A body with nothing after its parties.
        let mut empty = Body::new("t".into(), "n".into(), None, Kind::StreamStart);
        parties.fill(&mut empty);
        let v: Value = serde_json::from_slice(&empty.to_json()).unwrap();
        assert_eq!(v["connection"]["client_addr"], "127.0.0.1:5");
    }

    /// Every key of `value` is declared in `schema` (recursively), and every enum value is
    /// allowed.
    fn conforms(path: &str, value: &Value, schema: &Value) {
        if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
            // Tagged by `protocol` (requests, responses) or `kind` (chunk stores): the branch
            // whose tag allows the value's tag.
            let branch = branches
                .iter()
                .find(|b| {
                    ["protocol", "kind"].iter().any(|tag| {
                        let allowed = &b["properties"][tag]["enum"];
                        value
                            .get(tag)
                            .is_some_and(|t| allowed.as_array().is_some_and(|a| a.contains(t)))
                    })
                })
                .unwrap_or_else(|| panic!("{path}: {value} matches no branch of oneOf"));
            return conforms(path, value, branch);
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            assert!(
                allowed.contains(value),
                "{path}: {value} not in the schema's enum"
            );
        }
        match value {
            Value::Object(map) => {
                let props = schema.get("properties").and_then(Value::as_object);
                for (k, v) in map {
                    let sub = match props.and_then(|p| p.get(k)) {
                        Some(sub) => sub,
                        None => schema
                            .get("additionalProperties")
                            .filter(|a| a.is_object())
                            .unwrap_or_else(|| {
                                panic!("{path}.{k} is not in docs/audit-record.schema.json")
                            }),
                    };
                    conforms(&format!("{path}.{k}"), v, sub);
                }
                for req in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        map.contains_key(req.as_str().unwrap()),
                        "{path}: {req} required"
                    );
                }
            }
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        conforms(&format!("{path}[{i}]"), v, item);
                    }
                }
            }
            _ => {}
        }
    }

    fn every_kind() -> Vec<Kind> {
        // A new kind fails to compile here until it is listed (and the schema test sees it).
        let listed = |k: Kind| match k {
            Kind::StreamStart
            | Kind::StreamEnd
            | Kind::SessionStart
            | Kind::SessionEnd
            | Kind::Request
            | Kind::Response
            | Kind::Recording
            | Kind::Blocked
            | Kind::Cancel
            | Kind::ProtocolError
            | Kind::ApprovalRequested
            | Kind::ApprovalDecided
            | Kind::Unsolicited => k,
        };
        [
            Kind::StreamStart,
            Kind::StreamEnd,
            Kind::SessionStart,
            Kind::SessionEnd,
            Kind::Request,
            Kind::Response,
            Kind::Recording,
            Kind::Blocked,
            Kind::Cancel,
            Kind::ProtocolError,
            Kind::ApprovalRequested,
            Kind::ApprovalDecided,
            Kind::Unsolicited,
        ]
        .into_iter()
        .map(listed)
        .collect()
    }

    #[test]
    fn a_chunk_record_proves_its_bytes() {
        let bytes = b"$ uptime\r\n";
        let salt = [7u8; SALT_LEN];
        let mut r = Recording {
            channel: "0".into(),
            direction: "output".into(),
            offset: 0,
            length: bytes.len() as u64,
            sha256: chunk_digest(None, bytes),
            salted: false,
            store: ChunkStore::default(),
        };
        assert!(r.proves(&salt, bytes));
        assert!(!r.proves(&salt, b"$ uptime\r\r"));
        assert!(!r.proves(&salt, &bytes[1..]));
        // Salted: the digest alone does not give a short chunk away.
        r.sha256 = chunk_digest(Some(&salt), bytes);
        r.salted = true;
        assert!(r.proves(&salt, bytes));
        assert!(!r.proves(&[8u8; SALT_LEN], bytes), "another salt");
        let keystroke = Recording {
            length: 1,
            sha256: chunk_digest(Some(&salt), b"x"),
            salted: true,
            ..r.clone()
        };
        let guessed = (0..=255u8).find(|b| chunk_digest(None, &[*b]) == keystroke.sha256);
        assert_eq!(guessed, None, "no unsalted guess finds the keystroke");
    }

    /// The published JSON Schema describes every field a node writes, with every value set.
    #[test]
    fn the_json_schema_in_docs_covers_every_field() {
        let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
        let mut body = Body::new(
            "2026-11-27T12:00:00.000000000Z".into(),
            "n1".into(),
            Some("s1".into()),
            Kind::Request,
        );
        body.principal = Some(Arc::new(Principal {
            subject: "agent".into(),
            client_id: Some("c".into()),
            model: Some("m".into()),
            model_version: Some("1".into()),
            groups: vec!["g".into()],
            intent: Some("i".into()),
            issuer: "https://idp".into(),
            token_type: "access_token".into(),
            token_exp: Some(1_795_766_700),
            token_id: Some("jti-1".into()),
            saml: Some(SamlOrigin {
                idp: "https://idp.example/saml".into(),
                assertion_id: "_a1".into(),
            }),
            person: Some("alice@example.com".into()),
        }));
        body.connection = Some(Arc::new(Connection {
            protocol: "postgres".into(),
            client_addr: "127.0.0.1:1".into(),
            balancer_addr: Some("10.0.0.2:40000".into()),
            client_tls: true,
            name: Some("app".into()),
            target: Some("db:5432/app".into()),
            application: Some("psql".into()),
        }));
        body.stmt = Some(1);
        body.request = Some(Request::Postgres(PgRequest {
            mode: "extended".into(),
            text: "SELECT $1".into(),
            statement: Some("s".into()),
            portal: Some("p".into()),
            params: Some(vec![Some("1".into()), None]),
            prepared: vec![PreparedText {
                name: "x".into(),
                text: "PREPARE x AS SELECT 1".into(),
            }],
            binding: Some(Binding {
                database: "app".into(),
                role: "gw".into(),
                search_path: "public".into(),
                settings: "DateStyle='ISO, MDY'".into(),
                params: vec![ParamType {
                    format: "binary".into(),
                    type_oid: 23,
                }],
                hash: "ab".repeat(32),
            }),
        }));
        body.response = Some(Response::Postgres(PgResponse {
            tags: vec!["SELECT 1".into()],
            rows: 1,
            bytes: 1,
            columns: vec!["c".into()],
            result: vec![vec![Some("1".into()), None]],
            truncated: true,
            digest: Some("ab".repeat(32)),
            error: Some(PgError {
                sqlstate: "42501".into(),
                message: "m".into(),
            }),
            notices: vec!["n".into()],
            notifications: vec![PgNotification {
                channel: "c".into(),
                payload: "p".into(),
            }],
        }));
        body.outcome = Some(Outcome::Denied);
        body.duration_us = Some(7);
        body.policy = Some(PolicyRef {
            rule: "r".into(),
            version: "cd".repeat(32),
        });
        body.detail = Some("d".into());
        body.masked.insert("email".into(), 2);
        body.approval = Some(ApprovalRef {
            id: "apr-1".into(),
            state: "consumed".into(),
            by: vec!["alice".into()],
        });
        body.recording = Some(Recording {
            channel: "0".into(),
            direction: "output".into(),
            offset: 0,
            length: 2,
            sha256: "ab".repeat(32),
            salted: true,
            store: ChunkStore::File {
                path: "n1-1.rec".into(),
                offset: 0,
            },
        });
        let mut chain = crate::chain::Chain::new("n1:1");
        let sealed = chain.seal(&body);
        let record: Value = serde_json::from_slice(&sealed).unwrap();
        conforms("record", &record, &schema);
        assert_eq!(Record::parse(&sealed).unwrap().body, body, "reads back");
        // The other protocols' requests and responses, and an inline chunk.
        body.request = Some(Request::Ssh(SshRequest {
            channel: 0,
            request_type: "exec".into(),
            command: Some("uptime".into()),
            operation: Some("rename".into()),
            path: Some("/a".into()),
            to_path: Some("/b".into()),
            login: Some("ubuntu".into()),
            forward: Some("db:5432".into()),
            originator: Some("127.0.0.1:40112".into()),
        }));
        body.response = Some(Response::Ssh(SshResponse {
            channel: 0,
            exit_status: Some(0),
            exit_signal: Some("KILL".into()),
            bytes_in: 1,
            bytes_out: 2,
            listen_port: Some(40000),
            error: Some(SshError {
                reason_code: Some(1),
                message: "m".into(),
            }),
        }));
        body.recording = Some(Recording {
            store: ChunkStore::Inline {
                data: "aGk=".into(),
            },
            ..body.recording.take().unwrap()
        });
        let sealed = chain.seal(&body);
        conforms("record", &serde_json::from_slice(&sealed).unwrap(), &schema);
        assert_eq!(Record::parse(&sealed).unwrap().body, body, "reads back");
        body.request = Some(Request::Kubernetes(KubeRequest {
            verb: "create".into(),
            method: "POST".into(),
            path: "/api/v1/namespaces/a/pods/p/exec".into(),
            api_group: "apps".into(),
            api_version: "v1".into(),
            resource: Some("pods".into()),
            subresource: Some("exec".into()),
            namespace: Some("a".into()),
            name: Some("p".into()),
            command: vec!["sh".into()],
            body_sha256: Some("ab".repeat(32)),
            query: Some("command=sh".into()),
            body: Some("{}".into()),
            body_bytes: 2,
            content_type: Some("application/json".into()),
        }));
        body.response = Some(Response::Kubernetes(KubeResponse {
            status: 403,
            bytes: 3,
            events: Some(2),
            lines: Some(1),
            error: Some(KubeError {
                reason: "Forbidden".into(),
                message: "m".into(),
            }),
            body: Some("{\"kind\":\"Status\"}".into()),
        }));
        let sealed = chain.seal(&body);
        conforms("record", &serde_json::from_slice(&sealed).unwrap(), &schema);
        assert_eq!(Record::parse(&sealed).unwrap().body, body, "reads back");
        body.request = Some(Request::Console(ConsoleRequest {
            action: "view_session".into(),
            session: "s-1".into(),
        }));
        body.response = None;
        let sealed = chain.seal(&body);
        conforms("record", &serde_json::from_slice(&sealed).unwrap(), &schema);
        assert_eq!(Record::parse(&sealed).unwrap().body, body, "reads back");
        for kind in every_kind() {
            let v = serde_json::to_value(kind).unwrap();
            conforms("kind", &v, &schema["properties"]["kind"]);
        }
        for outcome in [
            Outcome::Success,
            Outcome::Error,
            Outcome::Blocked,
            Outcome::Pending,
            Outcome::Denied,
        ] {
            let v = serde_json::to_value(outcome).unwrap();
            conforms("outcome", &v, &schema["properties"]["outcome"]);
        }
    }
}
