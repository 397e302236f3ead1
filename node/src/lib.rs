//! The Vigil gateway node.
//!
//! - [`core`]: what every protocol shares (token verification, the approvals client, metrics,
//!   secrets, TLS, the refusal model) and the [`core::ProtocolServer`] trait;
//! - [`audit`]: the audit I/O (the writer and its chain, the spool, the witness, the sinks);
//! - [`policy`]: guardrail decisions and masking;
//! - one module per protocol: [`pg`] (PostgreSQL).
//!
//! [`start`] builds a node from a validated [`config::Config`], starts the protocol servers the
//! config names and the admin endpoints (port 0 works, for tests) and returns a handle that
//! reports the bound addresses and shuts it down.

pub mod admin;
pub mod api;
pub mod audit;
pub mod config;
pub mod console;
pub mod core;
pub mod kube;
pub mod pg;
pub mod policy;
pub mod ssh;

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Renders an error with its chain of sources: `outer: inner: root`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Logging for the binaries: `RUST_LOG` wins over the configured level.
pub fn init_tracing(level: &str, format: config::LogFormat) {
    init_subscriber(level, format, None);
}

/// The node's logging, and its traces exported over OTLP when `[tracing]` is configured (the
/// log filter does not apply to them). Runs inside the Tokio runtime.
pub fn init_node_tracing(config: &config::Config) -> anyhow::Result<()> {
    let otlp = match &config.tracing {
        Some(t) => Some(core::trace::otlp_layer(t, &config.node.id)?),
        None => None,
    };
    init_subscriber(&config.log.level, config.log.format, otlp);
    Ok(())
}

fn init_subscriber(level: &str, format: config::LogFormat, otlp: Option<core::trace::BoxedLayer>) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = match format {
        config::LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        config::LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(otlp).with(fmt).init();
}

/// A started node.
pub struct RunningNode {
    /// Where each protocol server listens, by protocol name.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    pub admin_addr: SocketAddr,
    /// The HTTPS API's address, when `[api]` is configured.
    pub api_addr: Option<SocketAddr>,
    /// The web console's address, when `[console]` is configured.
    pub console_addr: Option<SocketAddr>,
    /// The file of this process's audit stream.
    pub audit_path: PathBuf,
    pub metrics: Arc<core::metrics::Metrics>,
    pub audit: audit::AuditLog,
    /// Where this node reaches the coordinator API (the embedded member's address, or the
    /// configured endpoints).
    pub coordinator: Vec<String>,
    lifecycle: Arc<core::lifecycle::Lifecycle>,
    shutdown: watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// Where the server of `protocol` listens, if the node runs one.
    pub fn addr(&self, protocol: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(p, _)| *p == protocol)
            .map(|(_, a)| *a)
    }

    /// Drains: reports not ready, stops accepting, lets open sessions finish up to
    /// `node.drain_timeout_secs`, ends the rest, writes `stream_end`, ships the spool, returns.
    pub async fn shutdown(self) {
        self.stop();
        let _ = self.served.await;
    }

    /// Resolves when the node has stopped.
    pub async fn wait(&mut self) {
        let _ = (&mut self.served).await;
    }

    /// Asks the node to drain and stop, without waiting. Asked again while draining, it ends
    /// the open sessions at once.
    pub fn stop(&self) {
        if self.lifecycle.is_draining() {
            self.lifecycle.end_sessions();
        }
        self.lifecycle.begin_drain();
        let _ = self.shutdown.send(true);
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The key of deterministic masking tokens: from the config, or generated once and kept in
/// `<data_dir>/masking.key` so tokens stay stable across restarts.
/// Either way the key is the file's (or variable's) text, so a copy of `masking.key` given as
/// `masking_key` yields the same tokens.
fn masking_key(config: &config::Config) -> anyhow::Result<Vec<u8>> {
    let masking = &config.policy.masking;
    if masking.columns.is_empty() && masking.detectors.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(r) = &config.policy.masking_key {
        let secret = r.resolve().context("policy.masking_key")?;
        anyhow::ensure!(
            secret.expose().len() >= 16,
            "policy.masking_key: the key must be at least 16 characters"
        );
        return Ok(secret.expose().as_bytes().to_vec());
    }
    let path = config.node.data_dir.join("masking.key");
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(key.trim_end_matches(['\r', '\n']).as_bytes().to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
            core::secret::write_private_file(&path, &key)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The protocol servers the config names, built and bound.
struct Servers {
    servers: Vec<Box<dyn core::ProtocolServer>>,
    /// The SSH listener's part of the API, when it has a CA.
    ssh_api: Option<Arc<api::SshApi>>,
    /// Where cancels other nodes pass on reach the PostgreSQL sessions.
    pg_cancels: Option<pg::cancel::PassedCancels>,
}

async fn protocol_servers(
    config: &config::Config,
    core: &Arc<core::Core>,
) -> anyhow::Result<Servers> {
    let mut servers: Vec<Box<dyn core::ProtocolServer>> = Vec::new();
    let mut ssh_api = None;
    let mut pg_cancels = None;
    // One policy, one version, for every protocol's records.
    let read_only = config
        .postgres
        .as_ref()
        .map(|pg| pg.read_only_connections())
        .unwrap_or_default();
    let policy = policy::Policy::for_node(config.policy.clone(), read_only);
    if let Some(section) = &config.postgres {
        let server = pg::PgServer::bind(
            section,
            policy.clone(),
            config.audit.max_result_bytes,
            core.clone(),
        )
        .await?;
        pg_cancels = Some(server.passed_cancels());
        servers.push(Box::new(server));
    }
    if let Some(section) = &config.ssh {
        let ca = ssh::ca::UserCa::load(section)?.map(Arc::new);
        let server =
            ssh::SshServer::bind(section, policy.clone(), ca.as_deref(), core.clone()).await?;
        ssh_api = ca.map(|ca| Arc::new(server.api(ca)));
        servers.push(Box::new(server));
    }
    if let Some(section) = &config.kubernetes {
        servers.push(Box::new(
            kube::KubeServer::bind(section, policy.clone(), core.clone()).await?,
        ));
    }
    Ok(Servers {
        servers,
        ssh_api,
        pg_cancels,
    })
}

/// The sink the config names for the audit stream beyond the local file (Kafka), if any.
fn audit_sink(
    config: &config::Config,
    metrics: &Arc<core::metrics::Metrics>,
    spool: Option<Arc<audit::Spool>>,
    node_key: &Arc<ed25519_dalek::SigningKey>,
    unacknowledged: Vec<(PathBuf, u64)>,
) -> anyhow::Result<Option<Box<dyn audit::sink::AuditSink>>> {
    let (Some(k), Some(spool)) = (&config.audit.kafka, spool) else {
        return Ok(None);
    };
    let shipper = audit::kafka::Shipper::new(
        k.clone(),
        metrics.clone(),
        spool,
        node_key.clone(),
        Duration::from_secs(config.audit.checkpoint_interval_secs),
        unacknowledged,
    )
    .context("audit.kafka: the producer")?;
    Ok(Some(Box::new(shipper)))
}

/// Builds and starts a node. Everything that can fail on bad configuration fails here, before
/// any listener accepts a client.
pub async fn start(config: config::Config) -> anyhow::Result<RunningNode> {
    let metrics = Arc::new(core::metrics::Metrics::default());
    let masking_key = masking_key(&config)?;
    let spool = config
        .audit
        .kafka
        .as_ref()
        .map(|k| Arc::new(audit::Spool::new(k.spool_max_bytes, k.max_record_bytes)));
    let node_key = Arc::new(audit::kafka::node_key(&config.node.data_dir)?);
    let public_key = hex::encode(node_key.verifying_key().as_bytes());
    let fingerprint = vigil_proto::checkpoint::fingerprint(&public_key).unwrap_or_default();
    metrics
        .node_key
        .get_or_create(&core::metrics::NodeKeyLabel {
            public_key: public_key.clone(),
            fingerprint: fingerprint.clone(),
        })
        .set(1);
    // Every stream file there now is an earlier process's: check how each ends, and what of
    // them the broker has not acknowledged, before this process's own file exists.
    audit::check_earlier_streams(&config.audit_dir(), &metrics);
    let unacknowledged = spool
        .as_ref()
        .map(|_| audit::kafka::unacknowledged_tails(&config.audit_dir()))
        .unwrap_or_default();
    let audit = audit::AuditLog::open(
        &config.audit_dir(),
        &config.node.id,
        config.audit.sync,
        metrics.clone(),
        spool.clone(),
    )
    .with_context(|| {
        format!(
            "cannot open the audit log in {}",
            config.audit_dir().display()
        )
    })?;
    let verifier = core::identity::TokenVerifier::new(config.identity.clone(), metrics.clone())
        .context("identity.tokens")?;
    let coordination = core::approvals::start(&config, metrics.clone()).await?;
    let lifecycle = Arc::new(core::lifecycle::Lifecycle::new(Duration::from_secs(
        config.node.drain_timeout_secs,
    )));
    let core = Arc::new(core::Core {
        verifier: verifier.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        approvals: coordination.approvals.clone(),
        masker: policy::masking::Masker::new(config.policy.masking.clone(), masking_key),
        balancers: config.node.proxy_protocol_from.clone(),
        data_dir: config.node.data_dir.clone(),
        lifecycle: lifecycle.clone(),
        peers: Arc::new(core::peers::Peers::new(&config.node.id, &config.cluster)?),
        threads: core::session_threads::SessionThreads::start(config.node.session_threads)
            .context("node.session_threads: cannot start the session threads")?,
    });
    let Servers {
        servers,
        ssh_api,
        pg_cancels,
    } = protocol_servers(&config, &core).await?;
    let api = match &config.api {
        Some(section) => Some(api::bind(section, &core).await?),
        None => None,
    };
    // The console's cookie key seals its cookies and the codes `vigil login --saml` redeems at
    // the API.
    let cookies = match &config.console {
        Some(section) => Some(Arc::new(console::cookies::Sealer::load(
            section.cookie_key.as_ref(),
            &config.node.data_dir.join("console").join("cookie.key"),
        )?)),
        None => None,
    };
    let console = match &config.console {
        Some(section) => {
            let app = console::Setup {
                config: section.clone(),
                issuer: config.identity.issuer.clone(),
                http_timeout: Duration::from_secs(config.identity.http_timeout_secs),
                coordinator: coordination.endpoints.clone(),
                coordinator_ca: config.coordinator.ca_file.clone(),
                audit_dir: config.audit_dir(),
                index_path: config.node.data_dir.join("console").join("index.redb"),
                cookies: cookies.clone().expect("sealed cookies with a console"),
                kafka: config.audit.kafka.clone(),
                saml: match (&config.identity.saml, &section.public_url) {
                    (Some(saml), Some(url)) => Some(Arc::new(
                        core::saml::Sp::load(saml, &config.identity, url).await?,
                    )),
                    _ => None,
                },
            }
            .prepare()?;
            let (listener, addr) = console::bind(section, &core).await?;
            Some((listener, addr, app(core.clone())))
        }
        None => None,
    };
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot bind admin.listen {}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let sink = audit_sink(&config, &metrics, spool, &node_key, unacknowledged)?;
    // Keys are loaded in the background: until they are, tokens are refused (fail closed) and
    // /readyz says why.
    tokio::spawn(verifier.clone().load_keys());

    let (shutdown, stop_rx) = watch::channel(false);
    // No listener that writes records serves before the witness holds a checkpoint of the
    // stream: a stream it never saw holds nothing but its frame, so one that holds more was
    // written by someone else (docs/audit-schema.md, verification rule 15).
    let witness = audit::witness::Witness::new(
        audit.clone(),
        coordination.approvals.clone(),
        node_key,
        metrics.clone(),
    );
    let (witnessed_tx, witnessed) = watch::channel(false);
    {
        let witness = witness.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            if witness.witnessed(&mut stop).await {
                let _ = witnessed_tx.send(true);
            }
        });
    }
    // A listener's serving future, once the stream is witnessed (nothing, if the node stops
    // first).
    let once_witnessed =
        |serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let mut witnessed = witnessed.clone();
            let stop = stop_rx.clone();
            async move {
                let ready = tokio::select! {
                    taken = witnessed.wait_for(|w| *w) => taken.is_ok(),
                    () = wait_for(stop) => false,
                };
                if ready {
                    serve.await;
                }
            }
        };
    let reachability = core::reachability::Reachability::new(metrics.clone());
    tokio::spawn(
        reachability
            .clone()
            .run(coordination.approvals.clone(), stop_rx.clone()),
    );
    let admin_state = admin::AdminState {
        metrics: metrics.clone(),
        verifier,
        audit: audit.clone(),
        lifecycle: lifecycle.clone(),
        pg_cancels,
        coordinator: reachability.clone(),
        witnessed: witnessed.clone(),
    };
    // The admin endpoints answer until the node has stopped: while it drains, /readyz says so
    // and /metrics shows the sessions left.
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        wait_for(admin_stop_rx),
    ));
    let saml_cli = match (&config.identity.saml, &config.console, &cookies) {
        (Some(_), Some(console), Some(cookies)) => {
            console.public_url.as_ref().map(|url| api::SamlCli {
                login_url: format!("{url}/auth/saml/login"),
                cookies: cookies.clone(),
            })
        }
        _ => None,
    };
    let api_addr = api.map(|(listener, addr)| {
        tokio::spawn(once_witnessed(Box::pin(api::serve(
            listener,
            core.clone(),
            ssh_api,
            api::Logins {
                oidc: config
                    .api
                    .as_ref()
                    .and_then(|a| a.login_answer(&config.identity)),
                saml: saml_cli,
            },
            wait_for(stop_rx.clone()),
        ))));
        addr
    });
    let console_addr = console.map(|(listener, addr, app)| {
        tokio::spawn(once_witnessed(Box::pin(console::serve(
            listener,
            app,
            wait_for(stop_rx.clone()),
        ))));
        addr
    });
    let audit_path = audit.path().to_path_buf();
    let checkpoint_every = Duration::from_secs(config.audit.checkpoint_interval_secs);
    tokio::spawn(witness.clone().run(checkpoint_every, stop_rx.clone()));
    let (ship_stop, ship_stop_rx) = watch::channel(false);
    let shipping = sink.map(|sink| {
        tokio::spawn(sink.run(audit_path.clone(), ship_stop_rx, Duration::from_secs(10)))
    });
    let listeners: Vec<_> = servers
        .iter()
        .map(|s| (s.protocol(), s.local_addr()))
        .collect();
    let serving: Vec<_> = servers
        .into_iter()
        .map(|s| tokio::spawn(once_witnessed(s.serve(Box::pin(wait_for(stop_rx.clone()))))))
        .collect();
    let embedded = coordination.member;
    let audit_handle = audit.clone();
    let served = tokio::spawn(async move {
        for s in serving {
            let _ = s.await;
        }
        audit.close().await;
        witness.checkpoint().await;
        let _ = ship_stop.send(true);
        if let Some(shipping) = shipping {
            let _ = shipping.await;
        }
        if let Some(member) = embedded {
            member.shutdown().await;
        }
        let _ = admin_stop.send(true);
    });
    tracing::info!(listeners = ?listeners, %admin_addr, audit = %audit_path.display(), coordinator = ?coordination.endpoints, %public_key, %fingerprint, "vigil-node started");
    Ok(RunningNode {
        listeners,
        admin_addr,
        api_addr,
        console_addr,
        audit_path,
        metrics,
        audit: audit_handle,
        coordinator: coordination.endpoints,
        lifecycle,
        shutdown,
        served,
    })
}
