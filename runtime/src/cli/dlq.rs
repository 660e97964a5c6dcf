use super::{Globals, bad_input};
use crate::config::parse_size;
use crate::engine::dlq as h;
use crate::host::{HostConfig, Module, Outcome};
use crate::source::broker::{Broker, DeadLetter};
use crate::source::{Delivery, Output, Record};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Inspect and replay dead letters.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// A table of the dead letters of a topic: id (partition:offset), key, error kind, attempts,
    /// last error, time, and whether it was replayed
    List {
        /// The consumed topic (its dead-letter topic is read) or the dead-letter topic itself
        topic: String,
        /// Dead-letter topic; `{topic}` stands for TOPIC [default: the broker's, {topic}.dlq on
        /// every broker weir speaks today]
        #[arg(long)]
        dlq_topic: Option<String>,
        /// One JSON object per dead letter instead of a table
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: every header, the key and the payload
    Show {
        /// The consumed topic or the dead-letter topic
        topic: String,
        /// Which dead letter: PARTITION:OFFSET as `list` shows it (or OFFSET with one partition)
        id: String,
        /// Dead-letter topic [default: the broker's, {topic}.dlq on every broker weir speaks today]
        #[arg(long)]
        dlq_topic: Option<String>,
    },
    /// Send dead letters back: to their original topic (or --to), optionally through a new module
    Replay {
        /// The consumed topic or the dead-letter topic
        topic: String,
        /// Dead-letter topic [default: the broker's, {topic}.dlq on every broker weir speaks today]
        #[arg(long)]
        dlq_topic: Option<String>,
        /// Publish to this topic instead of each dead letter's original topic [default: original]
        #[arg(long)]
        to: Option<String>,
        /// Run each dead letter through this module and publish what it emits, instead of
        /// republishing the message; a dead letter it fails on stays un-replayed [default: none]
        #[arg(long)]
        module: Option<PathBuf>,
        /// Only dead letters of this error kind (rejected, retries-exhausted, trap, timeout, memory)
        /// [default: all]
        #[arg(long)]
        kind: Option<String>,
        /// Say what would be replayed, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Replay dead letters that were replayed before, too [default: off]
        #[arg(long)]
        force: bool,
    },
}

/// What `list`, `show` and `replay` read off a dead letter.
trait Letter {
    fn header(&self, name: &str) -> Option<String>;
    /// The message as it was before it failed: `weir.dlq.*` headers removed.
    fn original(&self) -> Record;
}

impl Letter for DeadLetter {
    fn header(&self, name: &str) -> Option<String> {
        self.delivery
            .record
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn original(&self) -> Record {
        let mut r = self.delivery.record.clone();
        r.headers.retain(|(n, _)| !n.starts_with("weir.dlq."));
        r.timestamp_ms = None;
        r
    }
}

fn exists(b: &mut dyn Broker, topic: &str) -> anyhow::Result<bool> {
    Ok(b.has_topic(topic)?)
}

/// The dead-letter topic for what the user typed (`template`, else the broker's default name):
/// the topic itself if it is named as a dead-letter topic and exists.
fn resolve(
    b: &mut dyn Broker,
    topic: &str,
    template: Option<&str>,
    naming: &weir_core::topic::Naming,
) -> anyhow::Result<String> {
    let template = template.unwrap_or(naming.dlq);
    let candidate = template.replace("{topic}", topic);
    // Named as the template names dead-letter topics (`{topic}.dlq`: `orders.dlq`).
    let named_as_dlq = template.split_once("{topic}").is_some_and(|(pre, post)| {
        topic.len() > pre.len() + post.len() && topic.starts_with(pre) && topic.ends_with(post)
    });
    if exists(b, &candidate)? {
        Ok(candidate)
    } else if named_as_dlq && exists(b, topic)? {
        Ok(topic.to_string())
    } else {
        Err(bad_input(format!(
            "no dead-letter topic `{candidate}` on {}: nothing was dead-lettered from `{topic}` \
             yet (or pass --dlq-topic)",
            b.name()
        )))
    }
}

fn when(ms: Option<String>) -> String {
    ms.and_then(|m| m.parse::<u64>().ok())
        .map_or("-".into(), |ms| {
            let secs = ms / 1000;
            let (d, s) = (secs / 86_400, secs % 86_400);
            // Civil date from days since the epoch (Howard Hinnant's algorithm).
            let z = d as i64 + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z.rem_euclid(146_097);
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            format!(
                "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
                s / 3600,
                s % 3600 / 60,
                s % 60
            )
        })
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

impl DlqCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let naming = g.source.naming();
        let mut broker = g.source.broker()?;
        let log: &mut dyn Broker = broker.as_mut();
        match self {
            DlqCommand::List {
                topic,
                dlq_topic,
                json,
            } => {
                let dlq = resolve(log, &topic, dlq_topic.as_deref(), &naming)?;
                let letters = log.dead_letters(&dlq)?;
                if json {
                    for l in &letters {
                        let v = serde_json::json!({
                            "id": l.id, "partition": l.delivery.partition, "offset": l.delivery.offset,
                            "key": l.delivery.record.key.as_deref().map(String::from_utf8_lossy),
                            "error_kind": l.header(h::ERROR_KIND), "attempts": l.header(h::ATTEMPTS),
                            "error": l.header(h::ERROR), "last_failure_ms": l.header(h::LAST_FAILURE_MS),
                            "origin": format!("{}/{}@{}", l.header(h::TOPIC).unwrap_or_default(), l.header(h::PARTITION).unwrap_or_default(), l.header(h::OFFSET).unwrap_or_default()),
                            "replayed": l.replayed,
                        });
                        println!("{v}");
                    }
                } else {
                    println!(
                        "{:<10} {:<16} {:<18} {:>8}  {:<20} {:<8} LAST ERROR",
                        "ID", "KEY", "KIND", "ATTEMPTS", "TIME", "REPLAYED"
                    );
                    for l in &letters {
                        let key = l
                            .delivery
                            .record
                            .key
                            .as_deref()
                            .map_or("-".into(), super::shown);
                        println!(
                            "{:<10} {:<16} {:<18} {:>8}  {:<20} {:<8} {}",
                            l.id,
                            shorten(&key, 16),
                            super::shown(
                                l.header(h::ERROR_KIND)
                                    .unwrap_or_else(|| "-".into())
                                    .as_bytes()
                            ),
                            l.header(h::ATTEMPTS).unwrap_or_else(|| "-".into()),
                            when(l.header(h::LAST_FAILURE_MS)),
                            if l.replayed { "yes" } else { "no" },
                            shorten(
                                &super::shown(l.header(h::ERROR).unwrap_or_default().as_bytes()),
                                60
                            )
                        );
                    }
                    eprintln!("{} dead letter(s) in {dlq}", letters.len());
                }
            }
            DlqCommand::Show {
                topic,
                id,
                dlq_topic,
            } => {
                let dlq = resolve(log, &topic, dlq_topic.as_deref(), &naming)?;
                let letters = log.dead_letters(&dlq)?;
                // PARTITION:OFFSET, or the offset alone where one partition has it.
                let found: Vec<&DeadLetter> = letters
                    .iter()
                    .filter(|l| l.id == id || l.delivery.offset.to_string() == id)
                    .collect();
                let l = match found.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(bad_input(format!(
                            "no dead letter `{id}` in {dlq}; `weir dlq list {topic}` shows their ids"
                        )));
                    }
                    _ => {
                        return Err(bad_input(format!(
                            "`{id}` is in several partitions of {dlq}; write it as PARTITION:OFFSET"
                        )));
                    }
                };
                println!("id        {}", l.id);
                println!(
                    "key       {}",
                    l.delivery
                        .record
                        .key
                        .as_deref()
                        .map_or("-".into(), super::shown)
                );
                println!("replayed  {}", if l.replayed { "yes" } else { "no" });
                println!("first     {}", when(l.header(h::FIRST_FAILURE_MS)));
                println!("last      {}", when(l.header(h::LAST_FAILURE_MS)));
                for (n, v) in &l.delivery.record.headers {
                    println!(
                        "header    {}: {}",
                        super::shown(n.as_bytes()),
                        super::shown(v)
                    );
                }
                println!("payload   {}", super::shown(&l.delivery.record.payload));
            }
            DlqCommand::Replay {
                topic,
                dlq_topic,
                to,
                module,
                kind,
                dry_run,
                force,
            } => {
                let dlq = resolve(log, &topic, dlq_topic.as_deref(), &naming)?;
                let letters: Vec<DeadLetter> = log
                    .dead_letters(&dlq)?
                    .into_iter()
                    .filter(|l| force || !l.replayed)
                    .filter(|l| {
                        kind.as_ref()
                            .is_none_or(|k| l.header(h::ERROR_KIND).as_deref() == Some(k.as_str()))
                    })
                    .collect();
                // Which topics exist, asked once each.
                let mut known: std::collections::HashMap<String, bool> = Default::default();
                let mut topic_exists = |log: &mut dyn Broker, t: &str| -> anyhow::Result<bool> {
                    if let Some(&e) = known.get(t) {
                        return Ok(e);
                    }
                    let e = exists(log, t)?;
                    known.insert(t.to_string(), e);
                    Ok(e)
                };
                let target = |l: &DeadLetter| {
                    to.clone()
                        .or_else(|| l.header(h::TOPIC))
                        .unwrap_or_default()
                };
                for l in &letters {
                    if module.is_none() && !topic_exists(log, &target(l))? {
                        return Err(bad_input(format!(
                            "dead letter {} would go to topic `{}`, which does not exist",
                            l.id,
                            target(l)
                        )));
                    }
                }
                if dry_run {
                    for l in &letters {
                        println!(
                            "would replay {} ({}) to {}",
                            l.id,
                            l.header(h::ERROR_KIND).unwrap_or_default(),
                            if module.is_some() {
                                "the module".into()
                            } else {
                                target(l)
                            }
                        );
                    }
                    eprintln!(
                        "{} dead letter(s) would be replayed (dry run: nothing changed)",
                        letters.len()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                let handler = match &module {
                    None => None,
                    Some(path) => {
                        let cfg = HostConfig {
                            memory_limit: parse_size(
                                "memory",
                                crate::config::defaults::MEMORY_LIMIT,
                            )?,
                            call_timeout: Duration::from_secs(5),
                            max_instances: 1,
                            cache_dir: Some(g.data_dir.join("compiled")),
                            handler_config: g.file.handler_config.clone(),
                            capture_logs: false,
                            allow_http: crate::config::parse_allow_http(
                                g.file.run.allow_http.as_deref().unwrap_or_default(),
                            )?,
                        };
                        // Output topics are checked below, against the broker, before publishing.
                        Some(Module::load(path, &cfg, crate::source::limits_only())?)
                    }
                };
                let runtime = super::local_runtime()?;
                let mut instance = None;
                let bar = indicatif::ProgressBar::new(letters.len() as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} replaying [{bar:30}] {pos}/{len} {msg}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                let (mut replayed, mut failed) = (0u64, 0u64);
                for l in &letters {
                    let outputs: Result<Vec<Output>, String> = match &handler {
                        None => Ok(vec![Output {
                            topic: target(l),
                            record: l.original(),
                        }]),
                        Some(m) => {
                            let inst = match &mut instance {
                                Some(i) => i,
                                None => instance.insert(
                                    runtime
                                        .block_on(m.instantiate())
                                        .map_err(|o| anyhow::anyhow!("{o:?}"))?,
                                ),
                            };
                            let origin_topic: Arc<str> = Arc::from(
                                l.header(h::TOPIC).unwrap_or_else(|| dlq.clone()).as_str(),
                            );
                            let mut msg = Delivery {
                                topic: origin_topic,
                                partition: l
                                    .header(h::PARTITION)
                                    .and_then(|p| p.parse().ok())
                                    .unwrap_or(0),
                                offset: l
                                    .header(h::OFFSET)
                                    .and_then(|o| o.parse().ok())
                                    .unwrap_or(0),
                                record: l.original(),
                                redeliveries: 0,
                            };
                            let r =
                                runtime.block_on(inst.run(std::slice::from_mut(&mut msg), &[1]));
                            match r.stop {
                                None => Ok(r.outputs),
                                Some(stop) => {
                                    if matches!(stop, Outcome::Fault { .. }) {
                                        instance = None;
                                    }
                                    Err(format!("failed again: {stop:?}"))
                                }
                            }
                        }
                    };
                    let mut outputs = outputs;
                    if let Ok(outs) = &outputs {
                        for o in outs {
                            if !topic_exists(log, &o.topic)? {
                                outputs = Err(format!(
                                    "emits to topic `{}`, which does not exist; it stays un-replayed",
                                    o.topic
                                ));
                                break;
                            }
                        }
                    }
                    match outputs {
                        Ok(outputs) => {
                            log.replay(&dlq, l, outputs)?;
                            replayed += 1;
                        }
                        Err(why) => {
                            failed += 1;
                            bar.println(format!("dead letter {} {why}", l.id));
                        }
                    }
                    bar.inc(1);
                }
                bar.finish_and_clear();
                eprintln!(
                    "replayed {replayed} dead letter(s) from {dlq}; {failed} failed again and stay un-replayed"
                );
                if failed > 0 {
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
