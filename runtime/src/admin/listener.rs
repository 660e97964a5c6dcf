//! The admin server's listener: a bound on connections, and timeouts on every read and write.
//!
//! axum serves whatever a [`axum::serve::Listener`] accepts. This one takes a connection only
//! while fewer than [`MAX_CONNECTIONS`] are open (past it, clients wait in the kernel's
//! backlog, and the process never runs out of file descriptors through this server), waits
//! after a failed accept instead of spinning on it, and wraps each stream so that a read or a
//! write that makes no progress for [`IO_TIMEOUT`] fails: an idle or a non-reading client
//! cannot hold a connection (and its slot) for ever.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a read or a write may make no progress before the connection is dropped.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept (out of file descriptors, most likely).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

pub struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl Bounded {
    pub fn new(listener: TcpListener) -> Bounded {
        Bounded::with_limits(listener, MAX_CONNECTIONS, IO_TIMEOUT)
    }

    /// At most `connections` at once, each dropped after `timeout` without progress.
    pub fn with_limits(listener: TcpListener, connections: usize, timeout: Duration) -> Bounded {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(connections)),
            timeout,
        }
    }
}

/// An accepted connection: its stream under timeouts, and its slot, given back when dropped.
pub struct Conn {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut io = TimeoutStream::new(stream);
                    io.set_read_timeout(Some(self.timeout));
                    io.set_write_timeout(Some(self.timeout));
                    return (
                        Conn {
                            io: Box::pin(io),
                            _slot: slot,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the admin server could not accept a connection; trying again in a moment");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::IntoFuture;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Finding 9 of issue 19 (responses had no write timeout): a client that asks for a large
    /// answer and never reads it, while it keeps sending, holds its connection, and its slot,
    /// only until the write timeout. With one slot, the next client is served once the timeout has passed; without a
    /// write timeout it waits for ever (the test's deadline, in paused time, fails it).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_loses_the_connection_at_the_write_timeout() {
        let big = axum::body::Bytes::from(vec![b'x'; 64 << 20]);
        let app = axum::Router::new()
            .route(
                "/big",
                axum::routing::get(move || async move { big.clone() }),
            )
            .route("/small", axum::routing::get(|| async { "ok" }));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let timeout = Duration::from_secs(30);
        tokio::spawn(axum::serve(Bounded::with_limits(tcp, 1, timeout), app).into_future());

        let started = tokio::time::Instant::now();
        let (stalled, mut trickle) = TcpStream::connect(addr).await.unwrap().into_split();
        trickle
            .write_all(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        // A byte of a next request every 10 s keeps the connection's reads alive, so only the
        // write timeout can end it (without the trickle the read timeout would, on its own).
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if trickle.write_all(b"G").await.is_err() {
                    return;
                }
            }
        });
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(3600), next.read_to_end(&mut answer))
            .await
            .expect("the second client was never served: the first holds the only slot")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        assert!(
            started.elapsed() >= timeout,
            "served after {:?}, before the first client's write timed out: was the slot bound kept?",
            started.elapsed()
        );
        drop(stalled);
    }
}
