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
