//! Where a node's audit stream goes beyond its local file. The local file is the spool: a sink
//! tails it and ships every record, and reports how far its destination has acknowledged it
//! (the [`Spool`](super::Spool)), so that the writer refuses new requests when the sink falls
//! too far behind. The Kafka sink (`kafka::Shipper`) is the one there is today.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;

pub trait AuditSink: Send {
    /// The sink's name in logs (`kafka`).
    fn name(&self) -> &'static str;

    /// Ships the stream file at `current` (after what earlier streams left unacknowledged) as
    /// it grows, until `stop`; then keeps delivering for up to `drain`.
    fn run(
        self: Box<Self>,
        current: PathBuf,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}
