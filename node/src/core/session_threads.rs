//! The threads the protocols' sessions run on.
//!
//! Each session thread is a single-threaded tokio runtime of its own. An accepted connection is
//! handed to one of them in turn and stays there to its end, with every task it spawns (a
//! relay, an exec stream, the connections it opens to its target). A session's sockets are then
//! polled by the thread that runs its code: the kernel's `epoll_wait` wakes that thread, and no
//! other thread is woken to run what it found. The node's other work (accept loops, the admin
//! and API listeners, the coordinator, the Kafka shipper) stays on the main multi-threaded
//! runtime.
//!
//! Why: in a work-stealing runtime a socket that becomes readable wakes the worker that holds
//! the I/O driver, which then wakes another (a futex) to run the task, and a task woken by
//! another task's write goes the same way. Measured on a 2-core host shared with the target
//! (`loadtest/README.md`, "Session threads"): one session thread cost 12-14 % less CPU per
//! PostgreSQL statement than the two workers did; two session threads cost the same as the
//! two workers (each sleeps in `epoll_wait` between its few sessions' requests instead).
//!
//! What it costs: a session does not move to an idle thread when its own is busy, so a long
//! classification or a burst of one session delays the others on its thread (a statement the
//! classifier has to parse at length already goes to a classifier thread). Threads are given
//! sessions in turn, not by load.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The stack of every thread that runs sessions (the main runtime's workers too): 8 MiB
/// (tokio's default is 2 MiB) lets the classifier decide a new statement of up to ~800 bytes
/// on the session's own thread, without handing it to a classifier thread. Only the pages a
/// thread touches are committed.
pub const STACK: usize = 8 << 20;

thread_local! {
    /// Which session thread this is (`None` on any other thread).
    static INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// N session threads. Dropping it ends them: their runtimes stop, and the tasks still on them
/// are dropped.
pub struct SessionThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Each thread runs until its sender is dropped.
    _stop: Vec<oneshot::Sender<()>>,
}

impl SessionThreads {
    /// Starts `count` threads (`0`: one per CPU the process may use), named
    /// `vigil-session-N`.
    pub fn start(count: usize) -> io::Result<Self> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        let mut stop = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("vigil-session-{index}"))
                .stack_size(STACK)
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    // Returns when the sender is dropped; the runtime, and what is left on
                    // it, is dropped here, outside any task.
                    let _ = runtime.block_on(rx);
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// How many threads there are.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `session` on the next thread in turn.
    fn spawn<F>(&self, session: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[turn].spawn(session)
    }

    /// Runs the session of an accepted connection on the next thread in turn, with its socket
    /// registered there: a socket stays with the runtime that registered it, and one accepted
    /// on the main runtime would have every readiness of it found there and passed on (an
    /// `eventfd` write and a wake-up per read). Moving the socket fails only when the process
    /// is out of resources (epoll's limits): the connection is then closed unanswered and
    /// logged, like a failed accept.
    pub fn spawn_connection<S, F>(&self, tcp: TcpStream, session: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => return tracing::warn!(error = %e, "cannot hand an accepted connection over"),
        };
        self.spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => session(tcp).await,
                Err(e) => tracing::warn!(error = %e, "cannot register an accepted connection"),
            }
        });
    }

    /// The session thread the caller runs on, if it runs on one: what a per-thread resource
    /// (a pooled upstream client) is picked by.
    pub fn current() -> Option<usize> {
        INDEX.with(|i| i.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_go_to_the_threads_in_turn_and_their_tasks_stay_there() {
        let threads = SessionThreads::start(3).unwrap();
        assert_eq!(threads.count(), 3);
        assert_eq!(SessionThreads::current(), None);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (own, child) = threads
                .spawn(async {
                    let own = SessionThreads::current();
                    // A task the session spawns runs on the session's thread.
                    let child = tokio::spawn(async { SessionThreads::current() })
                        .await
                        .unwrap();
                    (own, child)
                })
                .await
                .unwrap();
            assert_eq!(own, child);
            seen.push(own.expect("runs on a session thread"));
        }
        assert_eq!(seen, [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn dropping_them_ends_the_threads_and_their_sessions() {
        let threads = SessionThreads::start(1).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let session = threads.spawn(async move {
            let _tx = tx; // dropped when the session is
            std::future::pending::<()>().await
        });
        drop(threads);
        assert!(rx.await.is_err(), "the session was dropped with its thread");
        assert!(session.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn an_accepted_connection_is_served_on_a_session_thread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let threads = SessionThreads::start(2).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        threads.spawn_connection(accepted, |mut tcp| async move {
            let mut word = [0u8; 4];
            tcp.read_exact(&mut word).await.unwrap();
            let on = SessionThreads::current().expect("on a session thread");
            tcp.write_all(format!("{} {on}", String::from_utf8_lossy(&word)).as_bytes())
                .await
                .unwrap();
        });
        client.write_all(b"ping").await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "ping 0");
    }

    #[test]
    fn zero_means_one_per_cpu() {
        let threads = SessionThreads::start(0).unwrap();
        assert_eq!(
            threads.count(),
            std::thread::available_parallelism().unwrap().get()
        );
    }
}
