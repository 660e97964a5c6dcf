//! Topic names.

/// What is wrong with `name` as a topic name, by Kafka's rules (so that topic names move
/// between sources unchanged); `None` when it is a good one.
pub fn problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 249 {
        Some("it is longer than 249 characters")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are reserved")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("use only ASCII letters, digits, `.`, `_` and `-`")
    } else {
        None
    }
}

/// How a broker names topics: which names it takes, and the names weir gives a topic's dead
/// letters and retry copies when the user does not (`{topic}` stands for the topic). Each source
/// has its own: a RabbitMQ queue may be named `orders:eu`, a Kafka topic may not; an SQS queue
/// name may not hold `.`, so `<topic>.dlq` is not a name there.
#[derive(Debug, Clone, Copy)]
pub struct Naming {
    /// The broker, as an error names it.
    pub broker: &'static str,
    /// What is wrong with a name on this broker; `None` when it is a good one.
    pub problem: fn(&str) -> Option<&'static str>,
    /// The dead-letter topic's name, by default.
    pub dlq: &'static str,
    /// Requeue mode's retry topic's name, by default.
    pub retry: &'static str,
}

impl Naming {
    /// Kafka's rules, which the embedded log keeps too (so that names move between them).
    pub const KAFKA: Naming = Naming {
        broker: "Kafka and the embedded log",
        problem,
        dlq: "{topic}.dlq",
        retry: "{topic}.retry",
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names() {
        let long = "a".repeat(250);
        let cases = [
            ("orders", None),
            ("orders.dlq", None),
            ("a_b-c.9", None),
            ("", Some("it is empty")),
            (long.as_str(), Some("it is longer than 249 characters")),
            ("..", Some("`.` and `..` are reserved")),
            (
                "orders:eu",
                Some("use only ASCII letters, digits, `.`, `_` and `-`"),
            ),
            (
                "ordres é",
                Some("use only ASCII letters, digits, `.`, `_` and `-`"),
            ),
        ];
        for (name, want) in cases {
            assert_eq!((Naming::KAFKA.problem)(name), want, "{name:?}");
        }
    }
}
