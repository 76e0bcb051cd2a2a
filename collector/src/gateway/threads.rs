//! Connection threads: every device connection runs on one of a few
//! single-threaded tokio runtimes (one per core), its socket registered
//! with that thread's own epoll — the event-loop-per-core shape of nginx or
//! Mosquitto.
//!
//! On tokio's shared multi-threaded runtime a pulse arriving at a quiet
//! fleet woke one worker for the socket and, because work appeared, a
//! second to come and steal it: two wake-ups per event, most of a quiet
//! fleet's CPU (BENCHMARKS.md, "Where the CPU goes"). Here an event wakes
//! the one thread that owns the socket. Connections are dealt round-robin;
//! the rest of the collector (admin API, write-back, store, cluster) stays
//! on the main runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The connection threads; dropping this stops them (their connections'
/// tasks are dropped with their runtimes).
pub struct ConnectionThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    _stop: Vec<oneshot::Sender<()>>,
}

impl ConnectionThreads {
    /// One thread per available core.
    pub fn start() -> std::io::Result<ConnectionThreads> {
        let n = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        let mut handles = Vec::with_capacity(n);
        let mut stop = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new().name(format!("connections-{i}")).spawn(move || {
                // Runs the spawned connections until told to stop; then
                // drops them without waiting for blocking work.
                let _ = runtime.block_on(rx);
                runtime.shutdown_background();
            })?;
        }
        Ok(ConnectionThreads { handles, next: AtomicUsize::new(0), _stop: stop })
    }

    /// Runs `task` on the next thread in turn. A socket the task uses must
    /// be registered from inside it (`TcpStream::from_std`), so that its
    /// events go to that thread.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }
}
