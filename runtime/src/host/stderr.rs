//! A guest's standard error, kept as a short tail.
//!
//! Guests get no real stderr. What they print is kept here, the last [`KEEP`] bytes of the
//! current call, so that when a call faults, its description can say what the guest printed
//! before it died: for a Rust guest, the panic message ("panicked at src/lib.rs:22: ...").
//! It never refuses a write, so a chatty guest cannot fail because of it.

use bytes::Bytes;
use std::sync::{Arc, Mutex};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes of stderr kept per call.
const KEEP: usize = 2048;

/// Shared between the WASI stream the guest writes to and the host that reads it.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<Vec<u8>>>);

impl Tail {
    /// What the guest printed since the last call, as one line, and forget it.
    pub fn take(&self) -> Option<String> {
        let bytes = std::mem::take(&mut *self.0.lock().expect("stderr tail lock"));
        let text = String::from_utf8_lossy(&bytes);
        let line = text
            .split('\n')
            .map(str::trim)
            // Rust's hint about RUST_BACKTRACE means nothing to a guest: it has no environment.
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" / ");
        (!line.is_empty()).then_some(line)
    }
}

impl IsTerminal for Tail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Tail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI 0.3 guests use this, and weir links WASI 0.2 only.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Tail {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let mut kept = self.0.lock().expect("stderr tail lock");
        kept.extend_from_slice(&bytes);
        if kept.len() > KEEP {
            let cut = kept.len() - KEEP;
            kept.drain(..cut);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Tail {
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_as_one_line() {
        let tail = Tail::default();
        let mut w = tail.clone();
        w.write(Bytes::from(vec![b'x'; 5000])).unwrap();
        w.write(Bytes::from_static(b"\npanicked at lib.rs:3:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable\n"))
            .unwrap();
        let line = tail.take().unwrap();
        assert!(line.ends_with("panicked at lib.rs:3: / boom"), "{line}");
        assert!(line.len() <= KEEP + 8);
        assert_eq!(tail.take(), None, "taken means forgotten");
    }
}
