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
}

impl Bounded {
    pub fn new(listener: TcpListener) -> Bounded {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
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
                    io.set_read_timeout(Some(IO_TIMEOUT));
                    io.set_write_timeout(Some(IO_TIMEOUT));
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
