//! Raft RPCs between coordinator members over gRPC (the `Raft` service in coordinator.proto).
//!
//! Each openraft request and its `Result` travel as JSON in one `RaftMessage`; the cluster token
//! goes in metadata. A call that cannot reach its peer is `Unreachable` (openraft backs off and
//! retries); an error the peer's Raft returned comes back as a remote error.

// openraft's RaftNetwork trait fixes the (large) error type of every RPC.
#![allow(clippy::result_large_err)]

use crate::metrics::{KindLabel, Metrics};
use crate::service::CLUSTER_TOKEN_HEADER;
use crate::store::{NodeId, TypeConfig};
use crate::tls::ClientTls;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use vigil_proto::coordinator::raft_client::RaftClient;
use vigil_proto::coordinator::RaftMessage;

/// Makes one gRPC client per peer.
#[derive(Clone)]
pub struct Network {
    token: Arc<str>,
    metrics: Arc<Metrics>,
    /// With TLS: the cluster's CA and this member's certificate, presented to its peers.
    tls: Option<ClientTls>,
}

impl Network {
    pub fn new(token: Arc<str>, metrics: Arc<Metrics>, tls: Option<ClientTls>) -> Self {
        Self {
            token,
            metrics,
            tls,
        }
    }
}

/// A lazily connected channel to `addr` (`host:port`), over TLS when `tls` is given, with
/// connect and keep-alive limits so that a dead peer is noticed quickly.
pub fn channel(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{addr}"))?,
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.config())?,
    };
    Ok(endpoint
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: channel(&node.addr, self.tls.as_ref())
                .map(RaftClient::new)
                .map_err(|e| e.to_string()),
            token: self.token.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// One peer.
pub struct Peer {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
    token: Arc<str>,
    metrics: Arc<Metrics>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    fn request<T: Serialize, E: std::error::Error>(
        &self,
        msg: &T,
        option: &RPCOption,
    ) -> RpcResult<(RaftClient<Channel>, tonic::Request<RaftMessage>), E> {
        let client = self
            .client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
        let json = serde_json::to_vec(msg).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut req = tonic::Request::new(RaftMessage {
            json,
            snapshot_data: Vec::new(),
        });
        req.set_timeout(option.hard_ttl());
        let token = MetadataValue::try_from(&*self.token)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        req.metadata_mut().insert(CLUSTER_TOKEN_HEADER, token);
        Ok((client, req))
    }

    fn response<T, E>(
        &self,
        kind: &'static str,
        reply: Result<tonic::Response<RaftMessage>, tonic::Status>,
    ) -> RpcResult<T, E>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let failed = || {
            self.metrics
                .peer_rpc_errors
                .get_or_create(&KindLabel { kind })
                .inc();
        };
        let msg = reply.map_err(|status| {
            failed();
            RPCError::Unreachable(Unreachable::new(&status))
        })?;
        let result: Result<T, RaftError<NodeId, E>> =
            serde_json::from_slice(&msg.into_inner().json).map_err(|e| {
                failed();
                RPCError::Network(NetworkError::new(&e))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let (mut client, req) = self.request(&rpc, &option)?;
        let reply = client.append_entries(req).await;
        self.response("append_entries", reply)
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let data = std::mem::take(&mut rpc.data);
        let (mut client, mut req) = self.request(&rpc, &option)?;
        req.get_mut().snapshot_data = data;
        let reply = client.install_snapshot(req).await;
        self.response("install_snapshot", reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let (mut client, req) = self.request(&rpc, &option)?;
        let reply = client.vote(req).await;
        self.response("vote", reply)
    }
}
