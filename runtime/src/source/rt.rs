//! The tokio runtime an async broker client runs on (lapin for RabbitMQ, async-nats for
//! JetStream), owned by each client.
//!
//! weir's [`Source`](crate::source::Source) and [`Broker`](crate::source::broker::Broker) are
//! blocking, and are called from threads that may belong to another runtime (the engine's
//! blocking pool, a handler's `emit`). `Runtime::block_on` would panic on some of them, so a
//! call is spawned here and its answer waited for on a plain channel.

use std::future::Future;

pub(crate) struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    /// A runtime of one worker thread named `thread` (`weir-amqp`, `weir-nats`).
    pub(crate) fn new(thread: &str) -> std::io::Result<Rt> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread)
            .enable_all()
            .build()?;
        Ok(Rt(Some(rt)))
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime is kept until drop")
            .handle()
    }

    /// Runs `fut` on this runtime and waits for it from any thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("the runtime runs until its client is dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        // Dropping a runtime inside another's async context panics; this never blocks.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
