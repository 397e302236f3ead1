//! Vigil's contracts with the outside world, free of I/O so that a SIEM-side verifier needs
//! nothing else: the audit record ([`record`]), the hash chain that links a stream's records
//! ([`chain`]), signed checkpoints ([`checkpoint`]) and stream verification ([`verify`]). With the `grpc` feature, also the
//! coordinator's gRPC services ([`coordinator`]).

pub mod chain;
pub mod checkpoint;
pub mod record;
pub mod verify;

/// The coordinator's gRPC contract (`proto/vigil/coordinator/v1/coordinator.proto`).
#[cfg(feature = "grpc")]
pub mod coordinator {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("vigil.coordinator.v1");

    impl From<crate::checkpoint::Checkpoint> for Checkpoint {
        fn from(c: crate::checkpoint::Checkpoint) -> Self {
            Self {
                stream: c.stream,
                seq: c.seq,
                hash: c.hash,
                time_ms: c.time_ms,
                signature: c.signature,
                public_key: c.public_key,
            }
        }
    }

    impl From<Checkpoint> for crate::checkpoint::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            Self {
                stream: c.stream,
                seq: c.seq,
                hash: c.hash,
                time_ms: c.time_ms,
                public_key: c.public_key,
                signature: c.signature,
            }
        }
    }
}
