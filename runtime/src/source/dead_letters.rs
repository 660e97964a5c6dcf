//! `weir dlq` on a log that has no place of its own for replay marks (Kafka): the dead letters
//! are read by offset, and each replay appends a record keyed `PARTITION:OFFSET` to the topic
//! `<dlq>.replayed`, created (one partition) at the first replay.
//!
//! A replay publishes its outputs first and its mark second: a crash between the two leaves the
//! dead letter unmarked, and the next replay publishes it again (at least once, as the rest of
//! delivery on Kafka without transactions). The embedded log writes both in one atomic batch.

use super::broker::{Broker, DeadLetter};
use super::{Output, Record, SourceError};
use std::collections::{BTreeMap, HashSet};

/// The topic that records which dead letters of `dlq` were replayed.
pub fn marks_topic(dlq: &str) -> String {
    format!("{dlq}.replayed")
}

fn mark_key(partition: u32, offset: u64) -> String {
    format!("{partition}:{offset}")
}

/// Every record of every partition of `topic`, partition by partition.
fn read_everything<B: Broker + ?Sized>(
    b: &mut B,
    topic: &str,
) -> Result<Vec<super::Delivery>, SourceError> {
    let mut out = Vec::new();
    for (partition, end) in b.ends(topic)? {
        let mut from = 0;
        while from < end {
            let batch = b.read(topic, partition, from, end, 1000)?;
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            out.extend(batch);
        }
    }
    Ok(out)
}

/// The dead letters of `dlq`, each marked replayed when `<dlq>.replayed` says so.
pub fn read_log<B: Broker + ?Sized>(b: &mut B, dlq: &str) -> Result<Vec<DeadLetter>, SourceError> {
    let letters = read_everything(b, dlq)?;
    let marks: HashSet<String> = match read_everything(b, &marks_topic(dlq)) {
        Ok(marks) => marks
            .into_iter()
            .filter_map(|d| d.record.key)
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect(),
        // Nothing was replayed yet.
        Err(SourceError::UnknownTopic(_)) => HashSet::new(),
        Err(e) => return Err(e),
    };
    Ok(letters
        .into_iter()
        .map(|d| {
            let id = mark_key(d.partition, d.offset);
            DeadLetter {
                replayed: marks.contains(&id),
                id,
                delivery: d,
            }
        })
        .collect())
}

/// Publishes `outputs` (grouped by topic, in order), then the replay mark.
pub fn replay_on_log<B: Broker + ?Sized>(
    b: &mut B,
    dlq: &str,
    letter: &DeadLetter,
    outputs: Vec<Output>,
) -> Result<(), SourceError> {
    let mut by_topic: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for o in outputs {
        by_topic.entry(o.topic).or_default().push(o.record);
    }
    for (topic, records) in by_topic {
        b.append(&topic, records)?;
    }
    let marks = marks_topic(dlq);
    if let Err(SourceError::UnknownTopic(_)) = b.ends(&marks) {
        match b.create_topic(&marks, 1, None) {
            Ok(()) | Err(SourceError::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let key = mark_key(letter.delivery.partition, letter.delivery.offset);
    b.append(
        &marks,
        vec![Record {
            key: Some(key.into_bytes()),
            ..Record::default()
        }],
    )
}
