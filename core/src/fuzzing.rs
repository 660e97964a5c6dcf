//! The ways in for the fuzz targets in `fuzz/` (`cargo fuzz run <target>`): each takes bytes
//! from outside, as weir does, and checks what must hold whatever they are. A panic here is a
//! bug; an error is the input being refused, as it should be.
#![doc(hidden)]

use crate::record::{Delivery, Output, Record};
use crate::{codec, dlq};
use std::sync::Arc;

/// A stored record (the embedded log's codec): decoding never panics, and what decodes and
/// passes the append check encodes back to the same bytes' meaning.
pub fn record_codec(data: &[u8]) {
    if let Ok(r) = codec::decode(data)
        && codec::check(&r).is_ok()
    {
        let mut buf = Vec::new();
        codec::encode(&r, &mut buf);
        assert_eq!(
            codec::decode(&buf).as_ref(),
            Ok(&r),
            "a record changed in a round trip"
        );
    }
}

/// `weir.toml`: parsing never panics, and a file that parses checks out (with defaults) to
/// settings or to an error that names the setting, never a panic.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    if let Ok(file) = crate::config::FileConfig::parse(text, path) {
        let mut run = file.run.clone();
        run.module.get_or_insert_with(|| "m.wasm".into());
        run.topic.get_or_insert_with(|| vec!["t".into()]);
        let _ = run.check();
    }
}

/// A line of the local socket's protocol.
pub fn socket_request(data: &[u8]) {
    let _ = crate::socket::parse_request(data);
}

/// An ingest body of the admin server: parsing never panics; what it accepts is within the
/// request bound.
pub fn ingest_body(data: &[u8]) {
    if let Ok(records) = crate::ingest::parse(data) {
        assert!(!records.is_empty() && records.len() <= 100_000);
    }
}

/// A message on a retry topic with any headers, and the dead letter of any message cut to any
/// size: the retry copy keeps to its origin and bounds, the dead letter fits or keeps only
/// weir's own headers and says what was cut.
pub fn envelope(data: &[u8]) {
    // The bytes as headers: `name=value` lines, the last line the payload.
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let payload = lines.pop().unwrap_or_default().as_bytes().to_vec();
    let headers = lines
        .iter()
        .map(|l| match l.split_once('=') {
            Some((n, v)) => (n.to_string(), v.as_bytes().to_vec()),
            None => (l.to_string(), Vec::new()),
        })
        .collect();
    let d = Delivery {
        topic: Arc::from("orders.retry"),
        partition: 3,
        offset: 9,
        record: Record {
            key: Some(payload.iter().take(8).copied().collect()),
            payload,
            headers,
            timestamp_ms: None,
        },
        redeliveries: 0,
    };
    let origin: Arc<str> = Arc::from("orders");
    let (now, max_wait) = (1_000_000u64, 30_000u64);
    let c = dlq::from_retry_topic(&d, &origin, now, max_wait);
    assert_eq!(&*c.msg.topic, "orders");
    assert!(c.attempt >= 1 && c.not_before_ms <= now + max_wait && c.first_failure_ms <= now);
    assert!(
        !c.msg
            .record
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("weir.retry."))
    );

    let limit = 600 + data.len() % 4096;
    let f = dlq::Failure {
        origin: &dlq::Origin {
            topic: origin.clone(),
            partition: 3,
            offset: 9,
        },
        attempts: c.attempt,
        kind: "rejected",
        error: &text,
        module: "m",
        digest: "d",
        group: "g",
        first_failure_ms: 1,
        last_failure_ms: 2,
    };
    let fits = |r: &Record| {
        if crate::record::wire_size(r) <= limit {
            Ok(())
        } else {
            Err("too big".to_string())
        }
    };
    let letter: Output = dlq::fit(dlq::envelope(&d, &f, "orders.dlq".into()), fits);
    let r = &letter.record;
    if fits(r).is_err() {
        assert!(r.headers.iter().all(|(n, _)| n.starts_with("weir.dlq.")));
        assert!(r.payload.is_empty() && r.key.is_none());
    }
    if crate::record::wire_size(&d.record) > limit {
        assert!(r.headers.iter().any(|(n, _)| n == dlq::TRUNCATED));
    }
}

#[cfg(test)]
mod tests {
    /// Every seed (and every input a fuzz run once failed on, kept with its fix) of every
    /// target, replayed by the ordinary test run.
    #[test]
    fn the_fuzz_seeds_replay_cleanly() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 5] = [
            ("record_codec", super::record_codec),
            ("config_file", super::config_file),
            ("socket_request", super::socket_request),
            ("ingest_body", super::ingest_body),
            ("envelope", super::envelope),
        ];
        for (name, target) in targets {
            let dir = seeds.join(name);
            let mut n = 0;
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                target(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n > 0, "no seeds for {name}");
        }
    }
}
