//! After a failed write the log takes no more writes until it is opened again.
//!
//! A write batch that failed (disk full, an I/O error) or whose fsync failed leaves the log in a
//! state no caller can see: fjall poisons its journal then, and a batch reported as failed may
//! still sit in its write buffer. So weir refuses every later write of the process, with the
//! first error, rather than report outcomes it cannot vouch for; `weir run` stops with exit
//! code 1 and, opened again once there is room, the journal's recovery decides what the failed
//! batch left: all of it or none of it (fjall drops a torn batch at the journal's end).

use super::SourceError;
use std::sync::OnceLock;

#[derive(Default)]
pub(super) struct Health {
    /// The first failed write's error.
    failed: OnceLock<String>,
    /// Wakes every waiter when a write fails.
    notify: tokio::sync::Notify,
}

impl Health {
    /// Records a failed write (the first one counts) and returns its error.
    pub(super) fn fail(&self, dir: &str, e: impl std::fmt::Display) -> SourceError {
        let detail = e.to_string();
        if self.failed.set(detail.clone()).is_ok() {
            tracing::error!(dir, error = %detail, "a write to the data directory failed: the log takes no more writes until weir starts again");
            self.notify.notify_waiters();
        }
        SourceError::Storage {
            dir: dir.to_string(),
            detail,
        }
    }

    /// Refuses a write once one has failed.
    pub(super) fn check(&self, dir: &str) -> Result<(), SourceError> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(SourceError::Storage {
                dir: dir.to_string(),
                detail: format!(
                    "an earlier write failed ({first}); nothing more is written until weir \
                     starts again: free space (or fix the disk), then restart"
                ),
            }),
        }
    }

    /// The first failed write's error, if one failed.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Waits until a write fails.
    pub(super) async fn failed(&self) {
        loop {
            // Registered before the check, so a failure between the two still wakes it; any
            // number of waiters.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.failed.get().is_some() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_refuses_every_later_write() {
        let h = Health::default();
        assert!(h.check("d").is_ok());
        let e = h.fail("d", "No space left on device");
        assert!(e.to_string().contains("No space left"), "{e}");
        h.fail("d", "a second error");
        assert_eq!(h.failure(), Some("No space left on device"));
        let refused = h.check("d").unwrap_err().to_string();
        assert!(refused.contains("No space left on device"), "{refused}");
        assert!(refused.contains("restart"), "{refused}");
    }

    #[tokio::test]
    async fn every_waiter_learns_of_a_failure_before_or_after_it_waits() {
        let h = std::sync::Arc::new(Health::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.failed().await })
            })
            .collect();
        tokio::task::yield_now().await;
        h.fail("d", "EIO");
        for w in waiters {
            w.await.unwrap();
        }
        // Already failed: returns at once.
        h.failed().await;
    }
}
