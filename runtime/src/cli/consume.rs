use super::{Globals, shown};
use crate::source::Delivery;
use crate::source::Settle;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;

/// Print messages of a topic, partition by partition, and exit at the end of each partition.
#[derive(Debug, Args)]
pub struct ConsumeCommand {
    /// Topic to read
    topic: String,
    /// Start at this group's committed offset and commit what was printed [default: no group]
    #[arg(long)]
    group: Option<String>,
    /// Start at the first message [default: the group's offset; without a group, the end]
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many messages in all [default: no limit]
    #[arg(long)]
    max: Option<u64>,
    /// One JSON object per line (topic, partition, offset, key, headers, payload, timestamp_ms)
    #[arg(long)]
    json: bool,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn print(out: &mut impl Write, d: &Delivery, json: bool) -> std::io::Result<()> {
    if json {
        let headers: serde_json::Map<String, serde_json::Value> = d
            .record
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(text(v))))
            .collect();
        let v = serde_json::json!({
            "topic": &*d.topic, "partition": d.partition, "offset": d.offset,
            "key": d.record.key.as_deref().map(text), "headers": headers,
            "payload": text(&d.record.payload), "timestamp_ms": d.record.timestamp_ms,
        });
        writeln!(out, "{v}")
    } else {
        let key = d
            .record
            .key
            .as_deref()
            .map(shown)
            .unwrap_or_else(|| "-".into());
        let headers: Vec<String> = d
            .record
            .headers
            .iter()
            .map(|(k, v)| format!("{}={}", shown(k.as_bytes()), shown(v)))
            .collect();
        let headers = if headers.is_empty() {
            String::new()
        } else {
            format!(" [{}]", headers.join(", "))
        };
        writeln!(
            out,
            "{}/{}@{} key={key}{headers} {}",
            d.topic,
            d.partition,
            d.offset,
            shown(&d.record.payload)
        )
    }
}

impl ConsumeCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let mut log = g.source.broker()?;
        let mut left = self.max.unwrap_or(u64::MAX);
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        if let (Some(group), Settle::PerMessage) = (&self.group, log.capabilities().settle) {
            // A queue: consuming takes messages off it, each acked once printed.
            while left > 0 {
                let batch = log.take(&self.topic, group, left.min(1000) as usize)?;
                if batch.is_empty() {
                    break;
                }
                for d in &batch {
                    print(&mut out, d, self.json)?;
                }
                left -= batch.len() as u64;
                out.flush()?;
                log.settle_taken()?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        let partitions = log.ends(&self.topic)?;
        for (partition, end) in partitions {
            let mut from = match (&self.group, self.from_beginning) {
                (_, true) => 0,
                (Some(group), false) => log.committed(group, &self.topic, partition)?,
                (None, false) => end,
            };
            while left > 0 && from < end {
                let max = left.min(1000) as usize;
                let batch = log.read(&self.topic, partition, from, end, max)?;
                let Some(last) = batch.last() else { break };
                from = last.offset + 1;
                for d in &batch {
                    print(&mut out, d, self.json)?;
                }
                left -= batch.len() as u64;
                if let Some(group) = &self.group {
                    // Printed (as far as this process can tell) before committed: a failed
                    // write stops here, and the messages are read again next time.
                    out.flush()?;
                    log.commit_offset(group, &self.topic, partition, from)?;
                }
            }
        }
        out.flush()?;
        Ok(ExitCode::SUCCESS)
    }
}
