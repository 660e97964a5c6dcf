//! The backoff policy: how long to wait before attempt `n + 1` of a message.
//!
//! `delay(n) = min(max, base * factor^(n-1))`, then jitter. Pure: the random draw is passed
//! in, so tests choose it.

use std::time::Duration;

/// How the computed delay is randomised, so that many messages failing together do not all
/// retry together.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Jitter {
    /// Uniform in `[0, d]` (spreads retries most; AWS's "full jitter").
    Full,
    /// Uniform in `[d/2, d]`.
    Equal,
    /// Exactly `d`.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub factor: f64,
    pub max: Duration,
    pub jitter: Jitter,
    /// Attempts in all, the first delivery included; after the last, the message is dead-lettered.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(30),
            jitter: Jitter::Full,
            max_attempts: 5,
        }
    }
}

impl Backoff {
    /// The wait after failed attempt `attempt` (1-based). `requested` is the handler's own
    /// delay, honoured but capped at `max` (and not jittered: the handler asked for it).
    /// `unit` is a uniform random draw in `[0, 1)`.
    pub fn delay(&self, attempt: u32, requested: Option<Duration>, unit: f64) -> Duration {
        if let Some(r) = requested {
            return r.min(self.max);
        }
        let exp = attempt.saturating_sub(1).min(1000) as i32;
        let raw = self.base.as_secs_f64() * self.factor.powi(exp);
        // `powi` overflows to infinity rather than wrapping; `min` then caps it.
        let capped = if raw.is_finite() {
            raw.min(self.max.as_secs_f64())
        } else {
            self.max.as_secs_f64()
        };
        let unit = unit.clamp(0.0, 1.0);
        let secs = match self.jitter {
            Jitter::None => capped,
            Jitter::Full => capped * unit,
            Jitter::Equal => capped / 2.0 + capped / 2.0 * unit,
        };
        Duration::from_secs_f64(secs)
    }

    /// Whether a message that failed its `attempt`-th delivery may be tried again.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Backoff {
        Backoff {
            jitter: Jitter::None,
            ..Backoff::default()
        }
    }

    #[test]
    fn first_retry_waits_base_then_grows_by_factor() {
        let b = plain();
        assert_eq!(b.delay(1, None, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(2, None, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(4, None, 0.5), Duration::from_millis(800));
    }

    #[test]
    fn delay_is_capped_at_max_and_huge_attempts_do_not_overflow() {
        let b = plain();
        assert_eq!(b.delay(20, None, 0.5), Duration::from_secs(30));
        assert_eq!(b.delay(u32::MAX, None, 0.5), Duration::from_secs(30));
        let zero_base = Backoff {
            base: Duration::ZERO,
            ..plain()
        };
        assert_eq!(zero_base.delay(u32::MAX, None, 0.5), Duration::ZERO);
    }

    #[test]
    fn jitter_modes_bound_the_delay() {
        let full = Backoff {
            jitter: Jitter::Full,
            ..plain()
        };
        assert_eq!(full.delay(2, None, 0.0), Duration::ZERO);
        assert_eq!(full.delay(2, None, 0.5), Duration::from_millis(100));
        let equal = Backoff {
            jitter: Jitter::Equal,
            ..plain()
        };
        assert_eq!(equal.delay(2, None, 0.0), Duration::from_millis(100));
        assert_eq!(equal.delay(2, None, 1.0), Duration::from_millis(200));
        // Out-of-range draws are clamped, never negative or past the cap.
        assert_eq!(full.delay(2, None, 7.0), Duration::from_millis(200));
    }

    #[test]
    fn a_requested_delay_is_honoured_within_max() {
        let b = plain();
        assert_eq!(
            b.delay(1, Some(Duration::from_millis(7)), 0.9),
            Duration::from_millis(7)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3600)), 0.9),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn attempts_are_counted_from_the_first_delivery() {
        let b = Backoff {
            max_attempts: 3,
            ..plain()
        };
        assert!(b.may_retry(1));
        assert!(b.may_retry(2));
        assert!(!b.may_retry(3));
        let once = Backoff {
            max_attempts: 1,
            ..plain()
        };
        assert!(!once.may_retry(1));
    }
}
