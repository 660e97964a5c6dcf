//! `weir groups`: list, describe, move (seek) and delete consumer groups.

use super::Globals;
use clap::Subcommand;
use std::process::ExitCode;
use weir_core::retention::SeekTo;

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Every consumer group with what it has not consumed
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// One group: per partition its committed offset, the end, lag, the oldest record kept,
    /// what retention deleted before the group read it, and the age of its oldest unconsumed
    /// record
    Describe {
        group: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Move a group's committed offsets on a topic: replay what it already handled, or skip a
    /// backlog. Refused while a `weir run` of the group consumes it (stop it first)
    Seek {
        group: String,
        topic: String,
        /// The oldest record kept
        #[arg(long, group = "to")]
        earliest: bool,
        /// The end: only what is appended from now on
        #[arg(long, group = "to")]
        latest: bool,
        /// This offset (kept within what the partition holds)
        #[arg(long, group = "to")]
        offset: Option<u64>,
        /// The first record appended at or after this time: RFC 3339
        /// (`2026-12-07T10:00:00Z`), or an age (`2h` ago)
        #[arg(long, group = "to")]
        time: Option<String>,
        /// Only this partition [default: all]
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Delete a group: its committed offsets, and on the embedded log its dedupe marks
    Delete { group: String },
}

impl GroupsCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let mut broker = g.source.broker()?;
        match self {
            GroupsCommand::List { json } => {
                let groups = broker.list_groups()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&groups)?);
                    return Ok(ExitCode::SUCCESS);
                }
                println!(
                    "{:<24} {:<12} {:>8} {:>12}",
                    "GROUP", "STATE", "MEMBERS", "LAG"
                );
                for gr in groups {
                    let lag: u64 = gr.partitions.iter().map(|p| p.lag).sum();
                    println!(
                        "{:<24} {:<12} {:>8} {:>12}",
                        gr.group,
                        gr.state.as_deref().unwrap_or("-"),
                        gr.members.len(),
                        lag
                    );
                }
            }
            GroupsCommand::Describe { group, json } => {
                let Some(gr) = broker.list_groups()?.into_iter().find(|x| x.group == group) else {
                    return Err(super::bad_input(format!(
                        "no group `{group}` on {}; `weir groups list` shows the groups there are",
                        broker.name()
                    )));
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&gr)?);
                    return Ok(ExitCode::SUCCESS);
                }
                if !gr.members.is_empty() {
                    println!("members: {}", gr.members.join(", "));
                }
                println!(
                    "{:<24} {:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>12}",
                    "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "START", "SKIPPED", "OLDEST"
                );
                let dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                for p in &gr.partitions {
                    println!(
                        "{:<24} {:>9} {:>12} {:>12} {:>10} {:>12} {:>10} {:>12}",
                        p.topic,
                        p.partition,
                        p.committed,
                        p.end,
                        p.lag,
                        dash(p.start),
                        dash(p.skipped_by_retention),
                        p.oldest_unconsumed_age_s
                            .map_or("-".to_string(), |s| format!("{s:.0}s ago"))
                    );
                }
            }
            GroupsCommand::Seek {
                group,
                topic,
                earliest,
                latest,
                offset,
                time,
                partition,
            } => {
                let to = match (earliest, latest, offset, time) {
                    (true, _, _, _) => SeekTo::Earliest,
                    (_, true, _, _) => SeekTo::Latest,
                    (_, _, Some(o), _) => SeekTo::Offset(o),
                    (_, _, _, Some(t)) => SeekTo::Time(parse_time(&t)?),
                    _ => {
                        return Err(super::bad_input(
                            "weir groups seek: say where to: --earliest, --latest, --offset N or --time T",
                        ));
                    }
                };
                for m in broker.seek_group(&group, &topic, partition, to)? {
                    println!("{}/{}: {} -> {}", m.topic, m.partition, m.from, m.to);
                }
                eprintln!("moved group {group} on {topic}; it reads from there when it next runs");
            }
            GroupsCommand::Delete { group } => {
                broker.delete_group(&group)?;
                eprintln!("deleted group {group}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `--time`: RFC 3339, or an age before now (`90m`, `2h`, `7d`).
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| super::bad_input(format!("--time {s} is before 1970")))?
            .as_millis();
        return Ok(ms as u64);
    }
    match weir_core::config::parse_duration("--time", s) {
        Ok(ago) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Ok(now.saturating_sub(ago).as_millis() as u64)
        }
        Err(_) => Err(super::bad_input(format!(
            "--time {s}: give a time in RFC 3339 (2026-12-07T10:00:00Z) or an age such as 2h"
        ))),
    }
}
