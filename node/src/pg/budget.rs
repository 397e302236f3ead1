//! Memory for large messages from targets.
//!
//! A target message is held whole while the gateway looks at it (a row is masked and hashed
//! as one), so one session reading a 900 MB value would hold 900 MB. Two limits bound that:
//! `postgres.max_target_message_bytes`, over which the session ends, and
//! `postgres.target_message_memory_bytes`, the memory the whole node lends to messages over
//! [`LARGE_MESSAGE`]. A session whose next message does not fit reads nothing more from its
//! target until other sessions have passed theirs on: the target waits on its socket, and
//! nothing is lost. A client must take a large message within its deadline
//! (`PostgresConfig::large_write_deadline`), else its session ends: a client that stops
//! reading cannot hold the memory.

use crate::core::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Messages up to this size are not counted: each session holds at most one of them at a time.
pub const LARGE_MESSAGE: usize = 1 << 20;

/// The budget is lent in KiB: a semaphore lends at most `u32::MAX` permits at once.
const UNIT: usize = 1024;

/// The node's memory for large target messages.
pub struct MessageBudget {
    permits: Arc<Semaphore>,
    /// All the permits there are.
    units: u32,
    metrics: Arc<Metrics>,
}

/// Memory lent to one message; given back when dropped.
pub struct Lent {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    metrics: Arc<Metrics>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.metrics.target_message_memory.dec_by(self.bytes as i64);
    }
}

impl MessageBudget {
    pub fn new(bytes: usize, metrics: Arc<Metrics>) -> Self {
        let units = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            metrics,
        }
    }

    /// Waits until `bytes` are free and lends them: at most the whole budget, so that a message
    /// as large as the budget (the config check keeps `max_target_message_bytes` within it)
    /// is lent all of it rather than waiting forever.
    pub async fn lend(&self, bytes: usize) -> Lent {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        self.metrics.target_message_memory.inc_by(bytes as i64);
        Lent {
            _permit: permit,
            bytes,
            metrics: self.metrics.clone(),
        }
    }
}

/// The declared length of the message at the front of `buf` (tag and length read, body still
/// arriving) when it is large.
pub fn large_pending(buf: &[u8]) -> Option<usize> {
    let len = buf.get(1..5)?;
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let total = usize::try_from(len).ok()? + 1;
    (total > LARGE_MESSAGE && buf.len() < total).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn header(len: usize) -> Vec<u8> {
        let mut b = vec![b'D'];
        b.extend_from_slice(&((len - 1) as i32).to_be_bytes());
        b
    }

    #[test]
    fn only_an_incomplete_large_message_is_pending() {
        assert_eq!(large_pending(b"D\0\0"), None);
        assert_eq!(large_pending(&header(1000)), None);
        assert_eq!(large_pending(&header(LARGE_MESSAGE)), None);
        assert_eq!(
            large_pending(&header(LARGE_MESSAGE + 1)),
            Some(LARGE_MESSAGE + 1)
        );
        let mut whole = header(LARGE_MESSAGE + 1);
        whole.resize(LARGE_MESSAGE + 1, 0);
        assert_eq!(large_pending(&whole), None);
        assert_eq!(large_pending(b"D\xff\xff\xff\xff"), None);
    }

    #[tokio::test]
    async fn a_message_that_does_not_fit_waits_for_the_memory() {
        let metrics = Arc::new(Metrics::default());
        let budget = MessageBudget::new(3 << 20, metrics.clone());
        let first = budget.lend(2 << 20).await;
        assert_eq!(metrics.target_message_memory.get(), 2 << 20);
        let second = budget.lend(2 << 20);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "2 MiB more do not fit in 3 MiB while 2 MiB are lent"
        );
        drop(first);
        let second = second.await;
        assert_eq!(metrics.target_message_memory.get(), 2 << 20);
        drop(second);
        assert_eq!(metrics.target_message_memory.get(), 0);
        // A message a byte over the whole budget (a length rounded up) still gets it all.
        let all = budget.lend((3 << 20) + 1).await;
        drop(all);
    }
}
