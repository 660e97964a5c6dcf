//! {{name}}: a weir handler. Upper-cases each message's text and emits it to the topic named by
//! the `output-topic` setting (default `shouted`); an empty message is rejected (dead-lettered).
//! Replace `handle` with your own logic.

use weir_guest::{Failure, Message, Outcome};

fn handle(msg: Message) -> Outcome {
    let text = msg
        .payload_str()
        .map_err(|e| Failure::reject(format!("not UTF-8 text: {e}")))?;
    if text.is_empty() {
        return Err(Failure::reject("empty message"));
    }
    let topic = weir_guest::config("output-topic").unwrap_or_else(|| "shouted".into());
    weir_guest::emit(&topic, msg.key.as_deref(), text.to_uppercase().as_bytes(), &[])
        .map_err(Failure::retry)?;
    weir_guest::debug!("shouted offset {}", msg.offset);
    Ok(())
}

weir_guest::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::handle;
    use weir_guest::{Failure, Message, testing};

    #[test]
    fn text_is_shouted() {
        let run = testing::run(handle, Message::new("hello").with_key("k"));
        assert_eq!(run.outcome, Ok(()));
        assert_eq!(run.emitted[0].topic, "shouted");
        assert_eq!(run.emitted[0].payload, b"HELLO");
    }

    #[test]
    fn empty_messages_are_rejected() {
        let run = testing::run(handle, Message::new(""));
        assert!(matches!(run.outcome, Err(Failure::Reject(_))));
        assert!(run.emitted.is_empty());
    }
}
