//! The Vigil coordinator.
//!
//! What exists today: the approvals domain ([`approvals`]), the deterministic state machine
//! that the Raft group (openraft) will replicate: approval requests bound to principal,
//! connection and statement hash; decisions with self-approval and group checks; one-time
//! consumption; time-windowed grants; the latest checkpoint of every audit stream. The Raft
//! storage and network glue, the gRPC services and the `vigil-coordinator` binary are the next
//! step (issue "Coordinator").

pub mod approvals;
