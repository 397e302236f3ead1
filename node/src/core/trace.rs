//! Traces: a span per session and per statement, carrying the ids of the audit records
//! (`session`, `stmt`) so that a trace joins to its records, exported over OTLP/gRPC when
//! `[tracing]` is configured (docs/operations.md, "Traces"). Without the section no exporter
//! code runs and statements get no span (a disabled one): the session spans exist for the
//! node's log only.
//!
//! Exporting never waits on the data path: a finished span is put on a bounded queue with
//! `try_send` (a full queue drops it), and one task sends the queue in batches. A span that is
//! dropped, or whose batch the collector did not take, is counted in
//! `vigil_trace_spans_dropped_total` by reason; the session never notices.
//!
//! Spans carry ids, the principal, outcomes and rule ids, never a statement's text or a
//! result: those may hold secrets, and their place is the audit record, which is masked.

use crate::core::metrics::ReasonLabel;
use crate::core::secret::SecretRef;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SpanData, SpanExporter as _, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use vigil_proto::record::Body;

/// The target of the spans that are exported (and only those: the node's other spans and its
/// log events never leave through OTLP). It starts with the crate's name so that a log filter
/// such as `vigil_node=debug` still shows them in the log.
pub const TARGET: &str = "vigil_node::trace";

/// Spans sent in one export call at most.
const MAX_BATCH: usize = 512;

/// The `[tracing]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC endpoint: `http://host:4317`, or `https://…` for TLS.
    pub endpoint: String,
    /// PEM CA the collector's certificate chains to (with an `https` endpoint); default: the
    /// bundled Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of sessions traced (0.0 to 1.0); a session's statements follow its session.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// gRPC metadata sent with every export (an API key …), each value by secret reference.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretRef>,
    /// Finished spans waiting to be sent at most; past this they are dropped (and counted).
    #[serde(default = "default_queue_spans")]
    pub queue_spans: usize,
    /// How long one export call may take.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_service_name() -> String {
    "vigil-node".into()
}
fn default_sampling_ratio() -> f64 {
    1.0
}
fn default_queue_spans() -> usize {
    8192
}
fn default_timeout_secs() -> u64 {
    10
}

impl TracingConfig {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::core::config_error::invalid;
        let scheme = self.endpoint.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("http" | "https")) || self.endpoint.parse::<http::Uri>().is_err()
        {
            return Err(invalid(
                "tracing.endpoint",
                "must be an http:// or https:// URL (the collector's OTLP/gRPC port)",
            ));
        }
        if self.ca_file.is_some() && scheme != Some("https") {
            return Err(invalid(
                "tracing.ca_file",
                "applies to an https:// endpoint only",
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(invalid("tracing.sampling_ratio", "must be from 0.0 to 1.0"));
        }
        if self.service_name.is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        if self.queue_spans == 0 {
            return Err(invalid("tracing.queue_spans", "must be at least 1"));
        }
        if self.timeout_secs == 0 {
            return Err(invalid("tracing.timeout_secs", "must be at least 1"));
        }
        for name in self.headers.keys() {
            if MetadataKey::<Ascii>::from_bytes(name.as_bytes()).is_err() || name.ends_with("-bin")
            {
                return Err(invalid(
                    format!("tracing.headers.{name}"),
                    "is not a valid gRPC metadata name (lowercase ASCII letters, digits, '-', '_', '.')",
                ));
            }
        }
        Ok(())
    }
}

/// Spans dropped by reason (`queue_full`, `export_failed`). One per process, as the tracing
/// subscriber is; every node's metrics show it.
static DROPPED: LazyLock<Family<ReasonLabel, Counter>> = LazyLock::new(Family::default);

/// The dropped-spans counter, for the metrics registry.
pub fn spans_dropped() -> Family<ReasonLabel, Counter> {
    DROPPED.clone()
}

fn drop_spans(reason: &'static str, n: usize) {
    DROPPED
        .get_or_create(&ReasonLabel { reason })
        .inc_by(n as u64);
}

/// The OTLP layer, first on the subscriber's registry.
pub type BoxedLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static>;

/// The layer that turns the spans of [`TARGET`] into OTLP spans, or an error that names the
/// setting at fault. Must run inside the Tokio runtime (it starts the export task).
pub fn otlp_layer(config: &TracingConfig, node: &str) -> anyhow::Result<BoxedLayer> {
    use anyhow::Context as _;
    use tracing_subscriber::Layer as _;
    let mut metadata = MetadataMap::new();
    for (name, secret) in &config.headers {
        let value = secret
            .resolve()
            .with_context(|| format!("tracing.headers.{name}"))?;
        let value = MetadataValue::try_from(value.expose().as_str())
            .map_err(|_| anyhow::anyhow!("tracing.headers.{name}: not a valid header value"))?;
        let key = MetadataKey::<Ascii>::from_bytes(name.as_bytes())
            .with_context(|| format!("tracing.headers.{name}"))?;
        metadata.insert(key, value);
    }
    let timeout = Duration::from_secs(config.timeout_secs);
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .with_timeout(timeout)
        .with_metadata(metadata)
        // One attempt per batch, bounded below: a batch the collector does not take in time is
        // dropped and counted, so that nothing piles up behind a collector that is down.
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled());
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca)
            .with_context(|| format!("tracing.ca_file: cannot read {}", ca.display()))?;
        builder = builder
            .with_tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)));
    } else if config.endpoint.starts_with("https://") {
        builder = builder.with_tls_config(ClientTlsConfig::new().with_webpki_roots());
    }
    let mut exporter = builder.build().context("tracing.endpoint")?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node.to_string(),
        ))
        .build();
    exporter.set_resource(&resource);
    let (tx, mut rx) = mpsc::channel::<SpanData>(config.queue_spans);
    let finishing = Arc::new(tokio::sync::Notify::new());
    let finish = finishing.clone();
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return;
                    }
                    export(&exporter, std::mem::take(&mut batch), timeout).await;
                }
                () = finish.notified() => break,
            }
        }
        // What was queued before the node stopped still goes.
        rx.close();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            export(&exporter, std::mem::take(&mut batch), timeout).await;
        }
    });
    let _ = EXPORT.set((finishing, std::sync::Mutex::new(Some(task))));
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(Queue { tx })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("vigil-node");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.target() == TARGET
        }))
        .boxed();
    Ok(layer)
}

/// The export task, and how to tell it the node stopped ([`finish`]).
type ExportTask = (
    Arc<tokio::sync::Notify>,
    std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
);
static EXPORT: OnceLock<ExportTask> = OnceLock::new();

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    timeout: Duration,
) {
    let n = batch.len();
    let failed = match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {}s", timeout.as_secs()),
    };
    drop_spans("export_failed", n);
    tracing::debug!(error = %failed, spans = n, "the trace collector did not take spans");
}

/// Sends the spans still queued when the node has stopped (its last sessions' among them), for
/// at most `limit`; what is left then is lost. Nothing to do without `[tracing]`.
pub async fn finish(limit: Duration) {
    let Some((finishing, task)) = EXPORT.get() else {
        return;
    };
    let task = task.lock().unwrap_or_else(|e| e.into_inner()).take();
    finishing.notify_one();
    if let Some(task) = task {
        let _ = tokio::time::timeout(limit, task).await;
    }
}

/// Hands finished spans to the export task without waiting.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            drop_spans("queue_full", 1);
        }
    }

    /// Nothing is held here: what was handed over is the export task's.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The span of one session (a root: one trace per session), the parent of its statements'
/// spans; [`authenticated`] adds who and what to once known. It ends when the session's last
/// handle on it (and its last statement's span) is dropped.
pub fn session(
    protocol: &'static str,
    session: &str,
    node: &str,
    client: &dyn std::fmt::Display,
) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "session",
        protocol,
        session,
        node,
        client = %client,
        principal = tracing::field::Empty,
        target = tracing::field::Empty,
    )
}

/// The session's principal (its subject) and the target connection it reached.
pub fn authenticated(span: &tracing::Span, principal: &str, target: Option<&str>) {
    span.record("principal", principal);
    if let Some(t) = target {
        span.record("target", t);
    }
}

/// The span of one statement (`stmt` in `session`: a PostgreSQL statement, an SSH channel
/// request or forward, a Kubernetes API request), a child of the session's span. It ends when
/// dropped; what its records say is set on it with [`from_record`].
pub fn statement(
    session_span: &tracing::Span,
    protocol: &'static str,
    session: &str,
    stmt: u64,
) -> tracing::Span {
    // Without an exporter nobody reads a statement's span, and making one (the log layer
    // formats its fields) cost more than a tenth of the gateway's instructions per statement.
    if EXPORT.get().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: session_span,
        "statement",
        protocol,
        session,
        stmt,
        outcome = tracing::field::Empty,
        rule = tracing::field::Empty,
        approval = tracing::field::Empty,
    )
}

/// A statement's number in its session (its records' `stmt`) and its span, for the code that
/// writes its later records.
#[derive(Clone, Debug)]
pub struct Stmt {
    pub n: u64,
    pub span: tracing::Span,
}

/// Sets what a statement's record says on the statement's span: the outcome (of its response
/// or refusal), the rule that decided it, the approval request or grant that let it run.
pub fn from_record(span: &tracing::Span, record: &Body) {
    if let Some(outcome) = record.outcome {
        span.record(
            "outcome",
            crate::core::metrics::OutcomeLabel::of(outcome).outcome,
        );
    }
    if let Some(policy) = &record.policy {
        span.record("rule", policy.rule.as_str());
    }
    if let Some(approval) = &record.approval {
        span.record("approval", approval.id.as_str());
    }
}

/// A statement that ends with the record that opens it (refused before it reached the target):
/// its span, opened and closed at once.
pub fn refused(session_span: &tracing::Span, protocol: &'static str, record: &Body) {
    if let (Some(session), Some(stmt)) = (&record.session, record.stmt) {
        from_record(&statement(session_span, protocol, session, stmt), record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<TracingConfig, String> {
        let c: TracingConfig = toml::from_str(toml).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn an_endpoint_alone_gets_the_defaults() {
        let c = check(r#"endpoint = "http://127.0.0.1:4317""#).unwrap();
        assert_eq!(c.service_name, "vigil-node");
        assert_eq!(c.sampling_ratio, 1.0);
        assert_eq!((c.queue_spans, c.timeout_secs), (8192, 10));
        assert!(c.headers.is_empty() && c.ca_file.is_none());
    }

    #[test]
    fn settings_that_make_no_sense_are_refused_by_name() {
        for (toml, key) in [
            (r#"endpoint = "127.0.0.1:4317""#, "tracing.endpoint"),
            (r#"endpoint = "grpc://collector:4317""#, "tracing.endpoint"),
            (r#"endpoint = "http://bad host:4317""#, "tracing.endpoint"),
            (
                "endpoint = \"http://c:4317\"\nca_file = \"/ca.pem\"",
                "tracing.ca_file",
            ),
            (
                "endpoint = \"http://c:4317\"\nsampling_ratio = 1.5",
                "tracing.sampling_ratio",
            ),
            (
                "endpoint = \"http://c:4317\"\nsampling_ratio = -0.1",
                "tracing.sampling_ratio",
            ),
            (
                "endpoint = \"http://c:4317\"\nqueue_spans = 0",
                "tracing.queue_spans",
            ),
            (
                "endpoint = \"http://c:4317\"\ntimeout_secs = 0",
                "tracing.timeout_secs",
            ),
            (
                "endpoint = \"http://c:4317\"\nheaders = { \"X Key\" = { env = \"K\" } }",
                "tracing.headers.X Key",
            ),
            (
                "endpoint = \"http://c:4317\"\nheaders = { key-bin = { env = \"K\" } }",
                "tracing.headers.key-bin",
            ),
        ] {
            let e = check(toml).unwrap_err();
            assert!(e.contains(key), "{toml}: {e}");
        }
        assert!(check("endpoint = \"http://c:4317\"\nsample = 1").is_err());
    }

    #[test]
    fn tls_and_headers_are_accepted() {
        let c = check(
            "endpoint = \"https://collector.example:4317\"\nca_file = \"/ca.pem\"\n\
             headers = { x-api-key = { env = \"K\" } }",
        )
        .unwrap();
        assert_eq!(c.headers["x-api-key"], SecretRef::Env("K".into()));
    }
}
