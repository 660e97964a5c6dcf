//! `answer`: request/reply's responder. Answers each request with its payload in upper case
//! (`weir request ask hello` prints `HELLO`), and rejects one whose payload is `fail` (the caller
//! gets the host's error answer rather than wait for its timeout).

use weir_guest::{Failure, Message, Outcome};

fn handle(msg: Message) -> Outcome {
    if msg.payload == b"fail" {
        return Err(Failure::reject("asked to fail"));
    }
    let answer = msg.payload.to_ascii_uppercase();
    weir_guest::reply(&answer, &[]).map_err(Failure::reject)
}

weir_guest::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_guest::testing;

    fn request(payload: &str, headers: &[(&str, &str)]) -> Message {
        Message {
            topic: "ask".into(),
            payload: payload.as_bytes().to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            ..Message::default()
        }
    }

    #[test]
    fn answers_in_upper_case_to_the_reply_topic() {
        let r = testing::run(
            handle,
            request("hi", &[("reply-to", "answers"), ("correlation-id", "c1")]),
        );
        assert_eq!(r.outcome, Ok(()));
        assert_eq!(r.emitted.len(), 1);
        assert_eq!(r.emitted[0].topic, "answers");
        assert_eq!(r.emitted[0].payload, b"HI");
        assert_eq!(r.emitted[0].key.as_deref(), Some(&b"c1"[..]));
    }

    #[test]
    fn a_request_without_reply_to_is_rejected() {
        let r = testing::run(handle, request("hi", &[]));
        assert!(r.outcome.is_err());
    }
}
