//! The Vigil coordinator: a Raft group (openraft) holding approval requests and decisions,
//! time-windowed grants and the latest signed checkpoint of every audit stream.
//!
//! - [`approvals`]: the domain, a deterministic state machine free of Raft types;
//! - [`store`]: openraft's log and state-machine storage on redb (fsync'd);
//! - [`network`]: Raft RPCs between members over gRPC;
//! - [`service`]: the gRPC services (nodes, operators, members) and who may call what;
//! - [`gate`]: authentication on a call's headers, before its body is read;
//! - [`server`]: one member, started from its configuration;
//! - [`retention`]: forgetting settled requests, by a purge the leader proposes;
//! - [`metrics`]: the member's `/metrics`, `/healthz` and `/readyz`;
//! - [`tls`]: TLS on the gRPC port, mutual between members;
//! - [`client`]: what gateway nodes and the `vigil` CLI use to reach the cluster, following the
//!   leader.

pub mod approvals;
pub mod client;
pub mod gate;
pub mod metrics;
pub mod network;
pub mod retention;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
