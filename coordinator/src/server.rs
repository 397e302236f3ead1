//! One coordinator member: its Raft node, its store and its gRPC listener.

use crate::gate::{Admit, Gate};
use crate::metrics::Metrics;
use crate::network::Network;
use crate::service::{
    first_member, ClusterService, CoordinatorService, OperatorAuth, Proposer, RaftService, Shared,
    MAX_REQUEST,
};
use crate::store::{self, NodeId, Raft};
use crate::tls::MemberTls;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use vigil_proto::coordinator::cluster_server::ClusterServer;
use vigil_proto::coordinator::coordinator_server::CoordinatorServer;
use vigil_proto::coordinator::raft_server::RaftServer;

/// Largest gRPC message a member sends (Raft batches and snapshot chunks, JSON-encoded; an
/// approval request with its statement and votes), and that its clients read. Of what it
/// reads, only `Raft` messages, from holders of the cluster token, may be this large.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// Largest message the `Cluster` service reads: its requests name a member at most.
const CLUSTER_MESSAGE: usize = 64 * 1024;
/// HTTP/2 streams one connection may have open at once. A gateway node sends all its calls
/// over one connection, and each request it holds for an approver keeps a `WatchApproval`
/// stream open there until decided (minutes): a limit near the number of requests a node may
/// hold at once would make its next create or consume wait behind the watches. A refused
/// stream holds its place only until the gate answers it, at once.
const MAX_STREAMS: u32 = 1024;
/// Calls one connection may have in the handlers at once (a `WatchApproval` counts until its
/// stream is answered, a write until it commits); more wait their turn, their bodies unread. Four
/// times the 64 callers of `loadtest/bench.sh coordinator`.
const MAX_IN_FLIGHT: usize = 256;
/// HTTP/2 flow-control window of each connection and of each stream: hyper's default, set here
/// because it is what bounds the data a connection can make the member buffer unread (the
/// calls the gate has not let through yet, their bearer tokens being verified, hold at most
/// this much together).
const WINDOW: u32 = 1024 * 1024;
/// Largest header block of one call: hyper's default, set here because it is what a stream
/// costs before the gate has authenticated it.
const MAX_HEADERS: u32 = 16 * 1024;
/// A connection is pinged this often, and closed when a ping is not answered within as long:
/// a peer that vanished stops holding its streams and their buffers.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
/// TCP keep-alive on accepted sockets: a host that vanished before speaking HTTP/2 (where
/// the pings above start) does not hold its socket forever.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a member has to take a snapshot chunk (the last: to install the whole state).
const INSTALL_SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How one member runs (the file format lives with the binary).
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// Unique, non-zero, stable for the life of the member.
    pub id: NodeId,
    pub listen: SocketAddr,
    /// The address other members and clients use (`host:port`); `listen` when empty.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub cluster_token: Arc<str>,
    /// Operators in this group may change membership and manage grants.
    pub admin_group: String,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    /// Take a snapshot (and purge the log behind it) every this many entries (at an index
    /// of the period that depends on the member's id, see `snapshot_offset`).
    pub snapshot_after: u64,
    /// On first start, make this member a cluster of one (the embedded default).
    pub bootstrap: bool,
    /// Delete a store of an older format instead of refusing to start (the embedded default,
    /// whose held approvals do not outlive an upgrade). A cluster member refuses.
    pub discard_other_format: bool,
    /// Settled requests and ended grants are forgotten this long after they settled.
    pub retention: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; none: not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the gRPC port (mutual between members); none: plaintext.
    pub tls: Option<MemberTls>,
    /// A gateway node's in-process coordinator: a cluster of one whose membership never
    /// changes (`AddMember` and `RemoveMember` are refused, whoever asks).
    pub embedded: bool,
}

/// Three days: long enough to look at last weekend's decisions with `vigil approvals`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3 * 24 * 3600);

impl MemberConfig {
    /// The defaults for everything but identity, address, storage and token.
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf, cluster_token: Arc<str>) -> Self {
        Self {
            id,
            listen,
            advertise: String::new(),
            data_dir,
            cluster_token,
            admin_group: "vigil-admins".into(),
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(500)),
            snapshot_after: 5_000,
            bootstrap: false,
            discard_other_format: false,
            retention: DEFAULT_RETENTION,
            metrics_listen: None,
            tls: None,
            embedded: false,
        }
    }
}

/// Where in every `every` entries member `id` takes its snapshot: the fractional part of `id`
/// times the golden ratio, so that members (whatever their ids) snapshot at indexes spread
/// over the period instead of all at once (a snapshot costs a member a core for a moment).
fn snapshot_offset(id: NodeId, every: u64) -> u64 {
    let fraction = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(fraction) * u128::from(every)) >> 64) as u64
}

/// The index at which a member whose last snapshot is at `last` takes its next one: the first
/// index after `last` at `offset` in a period of `every` entries.
fn next_snapshot(last: u64, every: u64, offset: u64) -> u64 {
    let at = last - last % every + offset;
    if at > last {
        at
    } else {
        at + every
    }
}

/// Takes a snapshot (and so purges the log behind it) every `every` applied entries, at this
/// member's offset in the period (see [`snapshot_offset`]).
fn schedule_snapshots(shared: &Arc<Shared>, every: u64) -> JoinHandle<()> {
    let every = every.max(1);
    let offset = snapshot_offset(shared.id, every);
    let mut applied = shared.sm.subscribe();
    let raft = shared.raft.clone();
    tokio::spawn(async move {
        // (last snapshot, index asked for): asked once, again only once a snapshot is in.
        let mut asked = None;
        while applied.changed().await.is_ok() {
            let index = *applied.borrow_and_update();
            let last = raft.metrics().borrow().snapshot.map_or(0, |l| l.index);
            let due = next_snapshot(last, every, offset);
            if index >= due && asked != Some((last, due)) {
                asked = Some((last, due));
                if raft.trigger().snapshot().await.is_err() {
                    return; // Raft stopped.
                }
            }
        }
    })
}

/// A running member.
pub struct Member {
    pub shared: Arc<Shared>,
    /// Where it listens (the bound address when the configured port was 0).
    pub addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (the bound address).
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The retention loop, the leader watcher and the metrics server.
    tasks: Vec<JoinHandle<()>>,
}

impl Member {
    pub async fn start(
        cfg: MemberConfig,
        operators: Option<Arc<dyn OperatorAuth>>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(cfg.id != 0, "member ids start at 1");
        let (server_tls, peer_tls) = match &cfg.tls {
            Some(t) => (Some(t.server()?), Some(t.peer_client()?)),
            None => (None, None),
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match cfg.metrics_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("metrics: listen on {a}"))?,
            ),
            None => None,
        };
        let advertise = if cfg.advertise.is_empty() {
            addr.to_string()
        } else {
            cfg.advertise.clone()
        };
        let raft_config = openraft::Config {
            cluster_name: "vigil".into(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
            election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
            // Taken by `schedule_snapshots`, not all members at the same index.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 1_000,
            snapshot_max_chunk_size: 1024 * 1024,
            // Each chunk's answer, and the last one's (the whole state installed: parsed and
            // written durably, seconds for a large state), has this long before the leader
            // gives up and sends the state again from the start. openraft's 200 ms default
            // let no large state through.
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT.as_millis() as u64,
            ..Default::default()
        }
        .validate()
        .context("Raft settings")?;
        store::check_format(&cfg.data_dir, cfg.discard_other_format)?;
        let (log, sm) = store::open(&cfg.data_dir)
            .await
            .with_context(|| format!("open the store in {}", cfg.data_dir.display()))?;
        let metrics = Arc::new(Metrics::default());
        let raft = Raft::new(
            cfg.id,
            Arc::new(raft_config),
            Network::new(cfg.cluster_token.clone(), metrics.clone(), peer_tls),
            log,
            sm.clone(),
        )
        .await
        .context("start Raft")?;
        if cfg.bootstrap && !raft.is_initialized().await? {
            raft.initialize(first_member(cfg.id, &advertise))
                .await
                .context("initialise a one-member cluster")?;
        }
        let shared = Arc::new(Shared {
            proposer: Proposer::start(raft.clone(), metrics.clone()),
            id: cfg.id,
            advertise,
            raft,
            sm,
            cluster_token: cfg.cluster_token,
            operators,
            admin_group: cfg.admin_group,
            metrics: metrics.clone(),
            tls: server_tls.is_some(),
            embedded: cfg.embedded,
        });
        let mut tasks = vec![
            metrics.watch_leader(&shared.raft),
            crate::retention::start(shared.clone(), cfg.retention),
            schedule_snapshots(&shared, cfg.snapshot_after),
        ];
        let mut metrics_addr = None;
        if let Some(l) = metrics_listener {
            metrics_addr = Some(l.local_addr()?);
            tasks.push(tokio::spawn(crate::metrics::serve(
                l,
                metrics,
                shared.raft.clone(),
                shared.sm.clone(),
                std::future::pending(),
            )));
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder()
            .initial_connection_window_size(WINDOW)
            .initial_stream_window_size(WINDOW)
            .http2_max_header_list_size(MAX_HEADERS)
            .max_concurrent_streams(MAX_STREAMS)
            .concurrency_limit_per_connection(MAX_IN_FLIGHT)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE));
        if let Some(tls) = server_tls {
            builder = builder.tls_config(tls).context("TLS")?;
        }
        // Every service behind the gate: credentials are checked on the headers, before the
        // message limit below lets a body in (see `gate`).
        let router = builder
            .add_service(Gate::new(
                CoordinatorServer::new(CoordinatorService(shared.clone()))
                    .max_decoding_message_size(MAX_REQUEST)
                    .max_encoding_message_size(MAX_MESSAGE),
                shared.clone(),
                Admit::Authenticated,
            ))
            .add_service(Gate::new(
                ClusterServer::new(ClusterService(shared.clone()))
                    .max_decoding_message_size(CLUSTER_MESSAGE),
                shared.clone(),
                Admit::Authenticated,
            ))
            .add_service(Gate::new(
                RaftServer::new(RaftService(shared.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
                shared.clone(),
                Admit::Members,
            ));
        // tonic applies its `tcp_nodelay` and `tcp_keepalive` only to listeners it binds
        // itself; an accepted socket with Nagle's algorithm on holds a small reply (a
        // follower's AppendEntries answer, a committed call's response) until the peer's
        // delayed ACK, 40 ms later.
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        tracing::info!(id = cfg.id, %addr, tls = cfg.tls.is_some(), "coordinator member listening");
        Ok(Self {
            shared,
            addr,
            metrics_addr,
            stop: Some(stop),
            server,
            tasks,
        })
    }

    /// Waits until this member knows a leader (itself, for a cluster of one).
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<NodeId> {
        let m = self
            .shared
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .context("no leader")?;
        Ok(m.current_leader.unwrap_or_default())
    }

    /// Stops serving and shuts Raft down.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.shared.raft.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Members 1, 2 and 3 snapshot at indexes at least a fifth of the period apart, each once
    /// a period, whatever index its last snapshot was taken at.
    #[test]
    fn members_snapshot_once_a_period_at_indexes_of_their_own() {
        let every = 5_000;
        let offsets: Vec<u64> = (1..=3).map(|id| snapshot_offset(id, every)).collect();
        for (i, a) in offsets.iter().enumerate() {
            assert!(*a < every);
            for b in &offsets[i + 1..] {
                let gap = a.abs_diff(*b).min(every - a.abs_diff(*b));
                assert!(gap >= every / 5, "{offsets:?}");
            }
        }
        let offset = offsets[0];
        assert_eq!(next_snapshot(0, every, offset), offset);
        assert_eq!(next_snapshot(offset - 1, every, offset), offset);
        // Taken a little late: the next one keeps the period.
        assert_eq!(next_snapshot(offset + 40, every, offset), offset + every);
        assert_eq!(
            next_snapshot(offset + every, every, offset),
            offset + 2 * every
        );
        assert_eq!(next_snapshot(7, 1, 0), 8);
    }
}
