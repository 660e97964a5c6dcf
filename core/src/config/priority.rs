//! `--priority urgent,routine` and `--priority-weights 8,1`: which consumed topics' messages an
//! idle handler instance takes first.

use super::ConfigError;

/// The order topics are served in, checked: level 0 first. Topics of the run that are not
/// named share the level after the last named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub order: Vec<String>,
    /// `None`: strict (a lower level runs only while no higher one has work waiting).
    /// `Some(w)`: weighted fair sharing, level `i` getting `w[i]` shares (the unnamed level
    /// one share).
    pub weights: Option<Vec<u32>>,
}

impl Priority {
    /// Checks `--priority` (`order`) and `--priority-weights` against the run's `topics`.
    pub fn check(
        order: Option<Vec<String>>,
        weights: Option<Vec<u32>>,
        topics: &[String],
    ) -> Result<Option<Priority>, ConfigError> {
        let Some(order) = order.filter(|o| !o.is_empty()) else {
            if weights.is_some() {
                return Err(ConfigError(
                    "--priority-weights needs --priority: name the topics in order, e.g. \
                     --priority urgent,routine --priority-weights 8,1"
                        .into(),
                ));
            }
            return Ok(None);
        };
        for (i, t) in order.iter().enumerate() {
            if !topics.contains(t) {
                return Err(ConfigError(format!(
                    "--priority names {t}, which this run does not consume: add --topic {t}, or \
                     leave it out of --priority"
                )));
            }
            if order[..i].contains(t) {
                return Err(ConfigError(format!("--priority names {t} twice")));
            }
        }
        if let Some(w) = &weights {
            if w.len() != order.len() {
                return Err(ConfigError(format!(
                    "--priority-weights gives {} weights for {} topics in --priority: give one \
                     each, in the same order",
                    w.len(),
                    order.len()
                )));
            }
            if w.contains(&0) {
                return Err(ConfigError(
                    "--priority-weights: each weight must be 1 or more".into(),
                ));
            }
        }
        Ok(Some(Priority { order, weights }))
    }

    /// The level of `topic`: its place in the order, or the level after the last.
    pub fn level_of(&self, topic: &str) -> usize {
        self.order
            .iter()
            .position(|t| t == topic)
            .unwrap_or(self.order.len())
    }

    /// How many levels there are (the unnamed topics' included).
    pub fn levels(&self) -> usize {
        self.order.len() + 1
    }

    /// The weight of `level` in weighted mode (the unnamed level's is 1).
    pub fn weight(&self, level: usize) -> Option<u32> {
        self.weights
            .as_ref()
            .map(|w| w.get(level).copied().unwrap_or(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn priority_flags_checked() {
        let topics = s(&["urgent", "routine", "audit"]);
        type Case = (
            Option<Vec<String>>,
            Option<Vec<u32>>,
            Result<(), &'static str>,
        );
        let cases: [Case; 8] = [
            (None, None, Ok(())),
            (Some(s(&["urgent", "routine"])), None, Ok(())),
            (Some(s(&["urgent", "routine"])), Some(vec![8, 1]), Ok(())),
            (
                Some(s(&["urgent", "nope"])),
                None,
                Err("--priority names nope"),
            ),
            (
                Some(s(&["urgent", "urgent"])),
                None,
                Err("names urgent twice"),
            ),
            (
                Some(s(&["urgent"])),
                Some(vec![8, 1]),
                Err("gives 2 weights for 1"),
            ),
            (
                Some(s(&["urgent", "routine"])),
                Some(vec![8, 0]),
                Err("1 or more"),
            ),
            (None, Some(vec![1]), Err("needs --priority")),
        ];
        for (order, weights, want) in cases {
            let got = Priority::check(order.clone(), weights.clone(), &topics);
            match (got, want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.0.contains(w), "{order:?} {weights:?}: {}", e.0),
                (got, want) => panic!("{order:?} {weights:?}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn levels_follow_the_order() {
        let p = Priority::check(
            Some(s(&["urgent", "routine"])),
            Some(vec![8, 2]),
            &s(&["urgent", "routine", "audit"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            ["urgent", "routine", "audit"].map(|t| p.level_of(t)),
            [0, 1, 2]
        );
        assert_eq!(p.levels(), 3);
        assert_eq!([0, 1, 2].map(|l| p.weight(l)), [Some(8), Some(2), Some(1)]);
    }
}
