//! Every metric the node exports, in one place. Drop paths have counters of their own and tests
//! assert they stay at zero.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl OutcomeLabel {
    /// The label of a record's outcome.
    pub fn of(o: vigil_proto::record::Outcome) -> Self {
        use vigil_proto::record::Outcome;
        Self {
            outcome: match o {
                Outcome::Success => "success",
                Outcome::Error => "error",
                Outcome::Blocked => "blocked",
                Outcome::Pending => "pending",
                Outcome::Denied => "denied",
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeKeyLabel {
    pub public_key: String,
    pub fingerprint: String,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Client sessions by outcome (`success`, `denied`, `error`).
    pub sessions: Family<OutcomeLabel, Counter>,
    pub active_sessions: Gauge,
    /// Statements by outcome (`success`, `error`, `blocked`).
    pub statements: Family<OutcomeLabel, Counter>,
    pub audit_records: Counter,
    pub audit_bytes: Counter,
    pub audit_batches: Counter,
    /// Failed appends to the local log; every one refused the statements it carried.
    pub audit_write_errors: Counter,
    /// Records dropped from an overfull retry queue (a loss: must stay zero).
    pub audit_dropped_records: Counter,
    /// Earlier stream files that ended in a torn record when this process started.
    pub audit_torn_tails: Gauge,
    /// The node's checkpoint key (labels `public_key`, `fingerprint`; value 1).
    pub node_key: Family<NodeKeyLabel, Gauge>,
    /// Statements refused because their record could not be written.
    pub audit_refused_statements: Counter,
    /// Records cut to fit `audit.kafka.max_record_bytes`.
    pub audit_records_cut: Counter,
    /// Bytes of audit records written locally and not yet acknowledged by the broker.
    pub spool_bytes: Gauge,
    /// Records written locally and not yet acknowledged by the broker.
    pub spool_records: Gauge,
    /// Seconds the oldest unacknowledged record has waited.
    pub spool_age_seconds: Gauge,
    /// Records the broker acknowledged.
    pub kafka_acked_records: Counter,
    /// Deliveries that failed (the records are sent again from the spool).
    pub kafka_delivery_errors: Counter,
    /// Checkpoints signed and accepted by the coordinator.
    pub checkpoints: Counter,
    /// Checkpoints the coordinator or the broker did not take (retried at the next tick).
    pub checkpoint_errors: Counter,
    /// Token rejections by reason.
    pub token_rejections: Family<ReasonLabel, Counter>,
    pub jwks_fetches: Counter,
    pub jwks_fetch_errors: Counter,
    pub protocol_errors: Counter,
    /// Sessions ended because the target's answers could not be read or matched.
    pub target_protocol_errors: Counter,
    /// Connections turned away because a listener held all it may (PostgreSQL's and SSH's
    /// `max_unauthenticated_connections`, `kubernetes.max_connections`, the API's, the
    /// console's and the admin listener's limits).
    pub preauth_refused: Counter,
    pub cancel_requests: Counter,
    /// 1 while the last probe of the coordinator was answered (with a leader), else 0.
    pub coordinator_reachable: Gauge,
    /// Cancel requests for another node's session, passed on to that node.
    pub cancels_passed: Counter,
    /// Denied cancel requests beyond the ones recorded one by one each second.
    pub cancels_unrecorded: Counter,
    /// Calls from other nodes that did not verify (signature, age, form).
    pub peer_calls_refused: Counter,
    pub bytes_to_target: Counter,
    pub bytes_from_target: Counter,
    /// Bytes of memory lent to large target messages now (`postgres.target_message_memory_bytes`).
    pub target_message_memory: Gauge,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("vigil");
        registry.register(
            "sessions",
            "Client sessions by outcome",
            self.sessions.clone(),
        );
        registry.register(
            "active_sessions",
            "Client sessions open now",
            self.active_sessions.clone(),
        );
        registry.register(
            "statements",
            "Statements by outcome",
            self.statements.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records appended to the local log",
            self.audit_records.clone(),
        );
        registry.register(
            "audit_bytes",
            "Bytes of audit records appended",
            self.audit_bytes.clone(),
        );
        registry.register(
            "audit_batches",
            "Group-commit batches written to the local log",
            self.audit_batches.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed appends to the local audit log",
            self.audit_write_errors.clone(),
        );
        registry.register(
            "audit_dropped_records",
            "Audit records dropped from an overfull retry queue (must stay zero)",
            self.audit_dropped_records.clone(),
        );
        registry.register(
            "audit_torn_tails",
            "Earlier audit stream files that ended in a torn record when the node started",
            self.audit_torn_tails.clone(),
        );
        registry.register(
            "node_key_info",
            "The node's checkpoint signing key (public key and fingerprint)",
            self.node_key.clone(),
        );
        registry.register(
            "audit_refused_statements",
            "Statements refused because their audit record could not be written",
            self.audit_refused_statements.clone(),
        );
        registry.register(
            "audit_records_cut",
            "Audit records whose longest strings were cut to fit audit.kafka.max_record_bytes",
            self.audit_records_cut.clone(),
        );
        registry.register(
            "audit_spool_bytes",
            "Bytes of audit records not yet acknowledged by the broker",
            self.spool_bytes.clone(),
        );
        registry.register(
            "audit_spool_records",
            "Audit records not yet acknowledged by the broker",
            self.spool_records.clone(),
        );
        registry.register(
            "audit_spool_age_seconds",
            "Age of the oldest audit record not yet acknowledged by the broker",
            self.spool_age_seconds.clone(),
        );
        registry.register(
            "kafka_acked_records",
            "Audit records acknowledged by the broker",
            self.kafka_acked_records.clone(),
        );
        registry.register(
            "kafka_delivery_errors",
            "Failed deliveries to the broker (sent again from the spool)",
            self.kafka_delivery_errors.clone(),
        );
        registry.register(
            "checkpoints",
            "Signed checkpoints accepted by the coordinator",
            self.checkpoints.clone(),
        );
        registry.register(
            "checkpoint_errors",
            "Checkpoints not accepted (retried at the next tick)",
            self.checkpoint_errors.clone(),
        );
        registry.register(
            "token_rejections",
            "Tokens refused, by reason",
            self.token_rejections.clone(),
        );
        registry.register(
            "jwks_fetches",
            "JWKS documents fetched from the identity provider",
            self.jwks_fetches.clone(),
        );
        registry.register(
            "jwks_fetch_errors",
            "Failed JWKS or discovery fetches",
            self.jwks_fetch_errors.clone(),
        );
        registry.register(
            "protocol_errors",
            "Sessions closed for a wire protocol violation",
            self.protocol_errors.clone(),
        );
        registry.register(
            "target_protocol_errors",
            "Sessions ended because the target sent a message the gateway could not read or match to what it sent",
            self.target_protocol_errors.clone(),
        );
        registry.register(
            "preauth_refused",
            "Connections refused at once because a listener held all the connections it may (authenticating ones for PostgreSQL and SSH)",
            self.preauth_refused.clone(),
        );
        registry.register(
            "cancel_requests",
            "Cancel requests forwarded to a target",
            self.cancel_requests.clone(),
        );
        registry.register(
            "coordinator_reachable",
            "1 while the coordinator answers this node's probes with a leader, else 0",
            self.coordinator_reachable.clone(),
        );
        registry.register(
            "cancels_passed",
            "Cancel requests for another node's session, passed on to that node",
            self.cancels_passed.clone(),
        );
        registry.register(
            "cancels_unrecorded",
            "Denied cancel requests not recorded one by one (more than 20 a second)",
            self.cancels_unrecorded.clone(),
        );
        registry.register(
            "peer_calls_refused",
            "Calls from other gateway nodes refused (unsigned, bad signature, stale, malformed)",
            self.peer_calls_refused.clone(),
        );
        registry.register(
            "target_message_memory_bytes",
            "Memory lent to target messages over 1 MiB now (postgres.target_message_memory_bytes)",
            self.target_message_memory.clone(),
        );
        registry.register(
            "bytes_to_target",
            "Bytes relayed from clients to targets",
            self.bytes_to_target.clone(),
        );
        registry.register(
            "bytes_from_target",
            "Bytes relayed from targets to clients",
            self.bytes_from_target.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans not exported, by reason (queue_full, export_failed)",
            crate::core::trace::spans_dropped(),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
