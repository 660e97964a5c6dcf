//! The scaler: how many handler instances a run should have, from what the engine observes.
//! A pure policy (time is an input), so each rule is tested with a table.
//!
//! The count that drains the backlog in time, given the arrival rate λ (msg/s), the lag L
//! (messages), the target drain time T and one instance's service rate μ (msg/s, a moving
//! average measured while instances were busy):
//!
//! ```text
//! desired = ceil((λ + L / T) / μ)
//! ```
//!
//! then: at least `min`, at most `max`, at most the lanes that have work (an instance beyond
//! those would have nothing to do), never more than now while the error ratio is rising (more
//! instances hammering a failing downstream make it worse), and down only to the highest count
//! recommended over the stabilisation window (so a short lull does not let instances go).

use std::time::Duration;

pub use weir_core::config::ScalerConfig;

/// What the engine saw since the previous tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Time since the run started (injected, so tests control it).
    pub now: Duration,
    /// Messages not yet handled, over all partitions.
    pub lag: u64,
    /// Messages handled (succeeded, dead-lettered or skipped) since the previous tick.
    pub handled: u64,
    /// Failed attempts (retries, faults) since the previous tick.
    pub failed: u64,
    /// Instances running during the interval.
    pub current: usize,
    /// Key-ordered lanes that have messages waiting or running.
    pub busy_lanes: usize,
}

/// Why the count is what it is (for the log and the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Within bounds and on target.
    Steady,
    /// The backlog would not drain within the target time.
    Backlog,
    /// Lag, but no service rate measured yet: double to learn it quickly.
    Probing,
    /// Held: the error ratio is rising.
    ErrorsRising,
    /// Capped by the lanes that have work.
    Lanes,
    /// Capped by `max`.
    Max,
    /// Kept up by the stabilisation window.
    Stabilizing,
    /// Let go: the backlog is gone and the window agrees.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub desired: usize,
    pub reason: Reason,
    /// The per-instance service rate the decision used, msg/s.
    pub rate_per_instance: Option<f64>,
}

#[derive(Debug)]
pub struct Scaler {
    cfg: ScalerConfig,
    prev: Option<Observation>,
    rate: Option<f64>,
    prev_error_ratio: Option<f64>,
    /// (time, recommendation) over the stabilisation window.
    recent: Vec<(Duration, usize)>,
}

impl Scaler {
    pub fn new(cfg: ScalerConfig) -> Scaler {
        let min = cfg.min.max(1);
        let max = cfg.max.max(min);
        Scaler {
            cfg: ScalerConfig { min, max, ..cfg },
            prev: None,
            rate: None,
            prev_error_ratio: None,
            recent: Vec::new(),
        }
    }

    pub fn config(&self) -> &ScalerConfig {
        &self.cfg
    }

    /// The count to run from now on.
    pub fn decide(&mut self, obs: Observation) -> Decision {
        let cfg = &self.cfg;
        let dt = self
            .prev
            .map(|p| obs.now.saturating_sub(p.now).as_secs_f64())
            .unwrap_or(0.0);
        let current = obs.current.max(1);

        // Service rate per instance: only from intervals when the instances had work waiting
        // (with no backlog, the measured rate is the arrival rate, not what they can do).
        if dt > 0.0 && obs.handled > 0 {
            let was_busy = self.prev.is_some_and(|p| p.lag > 0) || obs.lag > 0;
            if was_busy {
                let sample = obs.handled as f64 / dt / current as f64;
                let a = cfg.rate_smoothing.clamp(0.01, 1.0);
                self.rate = Some(match self.rate {
                    Some(r) => a * sample + (1.0 - a) * r,
                    None => sample,
                });
            }
        }
        // Arrival rate: what was handled plus what the lag grew by.
        let arrival = match self.prev {
            Some(p) if dt > 0.0 => {
                ((obs.handled as f64 + obs.lag as f64 - p.lag as f64) / dt).max(0.0)
            }
            _ => 0.0,
        };
        let attempts = obs.handled + obs.failed;
        let error_ratio = (attempts > 0).then(|| obs.failed as f64 / attempts as f64);
        let errors_rising = match (error_ratio, self.prev_error_ratio) {
            (Some(now), Some(before)) => now > before + 0.01 && now > 0.05,
            (Some(now), None) => now > 0.5,
            _ => false,
        };
        if error_ratio.is_some() {
            self.prev_error_ratio = error_ratio;
        }
        self.prev = Some(obs);

        let (mut want, mut reason) = match self.rate {
            _ if obs.lag == 0 && arrival == 0.0 => (cfg.min, Reason::Idle),
            Some(mu) if mu > 0.0 => {
                let t = cfg.target_drain.as_secs_f64().max(0.001);
                let need = ((arrival + obs.lag as f64 / t) / mu).ceil() as usize;
                if need > current {
                    (need, Reason::Backlog)
                } else {
                    (need, Reason::Steady)
                }
            }
            _ if obs.lag > 0 => (current * 2, Reason::Probing),
            _ => (current, Reason::Steady),
        };
        if want > cfg.max {
            want = cfg.max;
            reason = Reason::Max;
        }
        let lanes = obs.busy_lanes.max(cfg.min);
        if want > lanes {
            want = lanes;
            reason = Reason::Lanes;
        }
        want = want.max(cfg.min);
        if errors_rising && want > obs.current {
            want = obs.current.max(cfg.min);
            reason = Reason::ErrorsRising;
        }

        // Down only as far as the window's highest recommendation.
        self.recent.push((obs.now, want));
        let window = cfg.stabilization;
        self.recent
            .retain(|(t, _)| obs.now.saturating_sub(*t) <= window);
        let mut desired = want;
        if want < obs.current {
            let high = self.recent.iter().map(|(_, w)| *w).max().unwrap_or(want);
            let floor = high.min(obs.current);
            if floor > want {
                desired = floor;
                reason = Reason::Stabilizing;
            }
        }
        Decision {
            desired: desired.clamp(cfg.min, cfg.max),
            reason,
            rate_per_instance: self.rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ScalerConfig {
        ScalerConfig {
            min: 1,
            max: 64,
            target_drain: Duration::from_secs(2),
            stabilization: Duration::from_secs(10),
            rate_smoothing: 1.0,
        }
    }

    fn obs(secs: f64, lag: u64, handled: u64, current: usize) -> Observation {
        Observation {
            now: Duration::from_secs_f64(secs),
            lag,
            handled,
            failed: 0,
            current,
            busy_lanes: 1_000,
        }
    }

    /// Runs the observations in order and returns the decisions.
    fn run(c: ScalerConfig, seq: &[Observation]) -> Vec<Decision> {
        let mut s = Scaler::new(c);
        seq.iter().map(|o| s.decide(*o)).collect()
    }

    #[test]
    fn each_rule_in_a_table() {
        struct Case {
            name: &'static str,
            cfg: ScalerConfig,
            seq: Vec<Observation>,
            want: (usize, Reason),
        }
        let cases = vec![
            Case {
                name: "a backlog scales up within one tick to drain it in time",
                cfg: cfg(),
                // One instance handled 200 msg/s with 4,000 waiting: (0 + 4000/2) / 200 = 10.
                seq: vec![obs(0.0, 4_200, 0, 1), obs(1.0, 4_000, 200, 1)],
                want: (10, Reason::Backlog),
            },
            Case {
                name: "arrivals count: a steady inflow needs instances even at small lag",
                cfg: cfg(),
                // 1,000 msg/s arrive, each instance serves 100/s: 10 instances to keep up.
                seq: vec![
                    obs(0.0, 100, 0, 4),
                    obs(1.0, 500, 400, 4),
                    obs(2.0, 100, 1_400, 14),
                ],
                want: (11, Reason::Steady),
            },
            Case {
                name: "lag but no rate yet: double",
                cfg: cfg(),
                seq: vec![obs(0.0, 500, 0, 3)],
                want: (6, Reason::Probing),
            },
            Case {
                name: "never beyond max",
                cfg: ScalerConfig { max: 8, ..cfg() },
                seq: vec![obs(0.0, 100_000, 0, 1), obs(1.0, 99_900, 100, 1)],
                want: (8, Reason::Max),
            },
            Case {
                name: "never beyond the lanes that have work",
                cfg: cfg(),
                seq: vec![
                    Observation {
                        busy_lanes: 5,
                        ..obs(0.0, 100_000, 0, 1)
                    },
                    Observation {
                        busy_lanes: 5,
                        ..obs(1.0, 99_900, 100, 1)
                    },
                ],
                want: (5, Reason::Lanes),
            },
            Case {
                name: "never below min",
                cfg: ScalerConfig { min: 3, ..cfg() },
                seq: vec![obs(0.0, 0, 0, 3), obs(1.0, 0, 0, 3)],
                want: (3, Reason::Idle),
            },
            Case {
                name: "a rising error ratio holds the count",
                cfg: cfg(),
                seq: vec![
                    obs(0.0, 10_000, 0, 4),
                    Observation {
                        failed: 10,
                        ..obs(1.0, 9_700, 300, 4)
                    },
                    Observation {
                        failed: 200,
                        ..obs(2.0, 9_500, 200, 4)
                    },
                ],
                want: (4, Reason::ErrorsRising),
            },
            Case {
                name: "errors that are not rising do not hold it",
                cfg: cfg(),
                seq: vec![
                    obs(0.0, 10_000, 0, 4),
                    Observation {
                        failed: 100,
                        ..obs(1.0, 9_600, 400, 4)
                    },
                    Observation {
                        failed: 50,
                        ..obs(2.0, 9_200, 400, 4)
                    },
                ],
                want: (46, Reason::Backlog),
            },
            Case {
                name: "the backlog gone, the window keeps instances a while",
                cfg: cfg(),
                seq: vec![
                    obs(0.0, 4_200, 0, 1),
                    obs(1.0, 4_000, 200, 1),
                    obs(2.0, 0, 4_000, 10),
                ],
                want: (10, Reason::Stabilizing),
            },
            Case {
                name: "after the window, back to the minimum",
                cfg: cfg(),
                seq: vec![
                    obs(0.0, 4_200, 0, 1),
                    obs(1.0, 4_000, 200, 1),
                    obs(2.0, 0, 4_000, 10),
                    obs(7.0, 0, 0, 10),
                    obs(12.0, 0, 0, 10),
                ],
                want: (1, Reason::Idle),
            },
        ];
        for c in cases {
            let d = *run(c.cfg, &c.seq).last().unwrap();
            assert_eq!((d.desired, d.reason), c.want, "{}: {d:?}", c.name);
        }
    }

    #[test]
    fn the_rate_is_learned_only_while_busy() {
        let mut s = Scaler::new(cfg());
        // No backlog: 50 msg/s handled by 5 instances says nothing about their capacity.
        s.decide(obs(0.0, 0, 0, 5));
        let d = s.decide(obs(1.0, 0, 50, 5));
        assert_eq!(d.rate_per_instance, None);
        // With a backlog it does: 1,000 msg/s over 5 instances.
        let d = s.decide(obs(2.0, 10, 1_000, 5));
        assert_eq!(d.rate_per_instance, Some(200.0));
    }

    #[test]
    fn the_moving_average_smooths_the_rate() {
        let mut s = Scaler::new(ScalerConfig {
            rate_smoothing: 0.5,
            ..cfg()
        });
        s.decide(obs(0.0, 1_000, 0, 1));
        s.decide(obs(1.0, 1_000, 100, 1));
        let d = s.decide(obs(2.0, 1_000, 300, 1));
        assert_eq!(d.rate_per_instance, Some(200.0));
    }
}
