use super::{Globals, bad_input};
use crate::config::parse_pair;
use crate::source::Record;
use anyhow::Context;
use clap::Args;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

/// The largest synthetic message `--size` may ask for.
const MAX_SYNTHETIC_SIZE: usize = 16 << 20;

/// Messages appended per write (one fsync each).
const CHUNK: usize = 10_000;

/// Append messages to a topic: one VALUE, one per line of --file or standard input, or
/// --count synthetic ones. Returns once they are durable.
#[derive(Debug, Args)]
pub struct ProduceCommand {
    /// Topic to append to
    topic: String,
    /// The message payload [default: read lines from --file or standard input]
    value: Option<String>,
    /// Key of every message [default: none; keyless messages go round robin]
    #[arg(long)]
    key: Option<String>,
    /// Header NAME=VALUE on every message; repeat for more [default: none]
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Message priority 0..=255 on every message (RabbitMQ priority queues, created with
    /// `topics create --max-priority`; the `weir.priority` header elsewhere) [default: none]
    #[arg(long)]
    priority: Option<u8>,
    /// Read one message per line from this file [default: standard input]
    #[arg(long, conflicts_with = "value")]
    file: Option<PathBuf>,
    /// With lines from --file or standard input: each line is KEY<SEP>VALUE, split at the first
    /// SEP (as kafka-console-producer's key.separator) [default: off, lines are values]
    #[arg(long, value_name = "SEP", conflicts_with_all = ["value", "key"])]
    key_separator: Option<String>,
    /// Produce N synthetic orders instead (`{"id":"m-<n>","customer":...,"amount_cents":...}`),
    /// keyed by id and with an `idempotency-key: m-<n>` header [default: off]
    #[arg(long, conflicts_with_all = ["value", "file"])]
    count: Option<u64>,
    /// With --count: pad each payload to this many bytes [default: 100]
    #[arg(long, default_value_t = 100, requires = "count")]
    size: usize,
    /// With --count: no message key (they spread round robin) [default: keyed by id]
    #[arg(long, requires = "count")]
    no_key: bool,
    /// With --count: the first id number [default: 0]
    #[arg(long, default_value_t = 0, requires = "count")]
    start: u64,
    /// With --count: this per cent of the orders ask for one retry (`"transient":true`)
    #[arg(long, default_value_t = 0.0, requires = "count")]
    retry_percent: f64,
    /// With --count: this per cent of the orders are rejected (`"amount_cents":0`)
    #[arg(long, default_value_t = 0.0, requires = "count")]
    reject_percent: f64,
}

/// Which synthetic orders fail: `retry_percent` of them ask for one retry (`"transient":true`),
/// `reject_percent` are rejected (`"amount_cents":0`). Which ones is a fixed function of the
/// order's number, spread evenly over the input, so two runs of one mix see the same failures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultMix {
    pub retry_percent: f64,
    pub reject_percent: f64,
}

impl FaultMix {
    /// (asks for a retry, is rejected) for order `n`.
    pub fn pick(&self, n: u64) -> (bool, bool) {
        // A multiplicative hash of n to [0, 100): neighbours land far apart.
        let r = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
        let retry = r < self.retry_percent;
        (
            retry,
            !retry && r < self.retry_percent + self.reject_percent,
        )
    }

    pub fn check(&self) -> Result<(), String> {
        let ok = |p: f64| (0.0..=100.0).contains(&p);
        if !ok(self.retry_percent)
            || !ok(self.reject_percent)
            || self.retry_percent + self.reject_percent > 100.0
        {
            return Err(format!(
                "--retry-percent ({}) and --reject-percent ({}) must be between 0 and 100 and add up to at most 100",
                self.retry_percent, self.reject_percent
            ));
        }
        Ok(())
    }
}

/// A synthetic order the `orders` example accepts, padded to `size` bytes.
pub fn synthetic_order(n: u64, size: usize) -> Vec<u8> {
    synthetic_order_mixed(n, size, FaultMix::default())
}

/// As [`synthetic_order`], failing as `mix` says for order `n`.
pub fn synthetic_order_mixed(n: u64, size: usize, mix: FaultMix) -> Vec<u8> {
    let (transient, rejected) = mix.pick(n);
    let amount = if rejected { 0 } else { n % 10_000 + 1 };
    let flag = if transient {
        r#""transient":true,"#
    } else {
        ""
    };
    let mut s = format!(
        r#"{{"id":"m-{n}","customer":"c-{}",{flag}"amount_cents":{amount},"pad":""#,
        n % 97,
    );
    let closing = "\"}";
    while s.len() + closing.len() < size {
        s.push('x');
    }
    s.push_str(closing);
    s.into_bytes()
}

impl ProduceCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let mut headers = self
            .headers
            .iter()
            .map(|h| parse_pair("--header", h).map(|(k, v)| (k, v.into_bytes())))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(p) = self.priority {
            headers.push((
                crate::source::PRIORITY_HEADER.to_string(),
                p.to_string().into_bytes(),
            ));
        }
        let make = |payload: Vec<u8>, key: Option<Vec<u8>>| Record {
            key,
            payload,
            headers: headers.clone(),
            timestamp_ms: None,
        };
        let fixed_key = self.key.as_ref().map(|k| k.as_bytes().to_vec());
        let mut log = g.source.broker()?;
        let mut total = 0u64;
        let mut send = |log: &mut Box<dyn crate::source::broker::Broker>,
                        batch: Vec<Record>|
         -> anyhow::Result<()> {
            let n = batch.len() as u64;
            // A produce is written in chunks, each all or nothing: a failure says how many
            // messages before it are stored, so a producer can go on from there.
            log.append(&self.topic, batch).with_context(|| {
                format!(
                    "producing to topic {}: the first {total} message(s) are stored; the {n} \
                     of the chunk that failed are not (after a failed fsync they may be: \
                     dedupe when you send them again), nor any after it",
                    self.topic
                )
            })?;
            total += n;
            Ok(())
        };
        if self.size > MAX_SYNTHETIC_SIZE {
            return Err(bad_input(format!(
                "--size {} is more than {MAX_SYNTHETIC_SIZE} bytes; synthetic messages are for load tests, give a smaller size",
                self.size
            )));
        }
        if let Some(count) = self.count {
            let mix = FaultMix {
                retry_percent: self.retry_percent,
                reject_percent: self.reject_percent,
            };
            mix.check().map_err(bad_input)?;
            // A progress bar on a terminal (none when standard error is piped or a file).
            let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let bar = indicatif::ProgressBar::new(count);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{elapsed_precise} [{bar:40}] {pos}/{len} produced ({per_sec})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut batch = Vec::with_capacity(CHUNK);
            for n in self.start..self.start + count {
                let id = format!("m-{n}").into_bytes();
                let key = if self.no_key {
                    None
                } else {
                    fixed_key.clone().or_else(|| Some(id.clone()))
                };
                let mut record = make(synthetic_order_mixed(n, self.size, mix), key);
                record.headers.push(("idempotency-key".into(), id));
                batch.push(record);
                if batch.len() == CHUNK {
                    send(&mut log, std::mem::take(&mut batch))?;
                    bar.inc(CHUNK as u64);
                }
            }
            if !batch.is_empty() {
                send(&mut log, batch)?;
            }
            bar.finish_and_clear();
        } else if let Some(value) = &self.value {
            send(
                &mut log,
                vec![make(value.clone().into_bytes(), fixed_key.clone())],
            )?;
        } else {
            let reader: Box<dyn BufRead> = match &self.file {
                Some(path) => {
                    Box::new(std::io::BufReader::new(std::fs::File::open(path).map_err(
                        |e| bad_input(format!("cannot read --file {}: {e}", path.display())),
                    )?))
                }
                None => Box::new(std::io::stdin().lock()),
            };
            let mut batch = Vec::with_capacity(CHUNK);
            let sep = match self.key_separator.as_deref() {
                Some("") => return Err(bad_input("--key-separator must not be empty")),
                other => other.map(str::as_bytes),
            };
            for (n, line) in reader.split(b'\n').enumerate() {
                let mut line = line.context("reading messages")?;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                let (key, value) = match sep {
                    None => (fixed_key.clone(), line),
                    Some(sep) => match line.windows(sep.len()).position(|w| w == sep) {
                        Some(i) => (Some(line[..i].to_vec()), line[i + sep.len()..].to_vec()),
                        None => {
                            if !batch.is_empty() {
                                send(&mut log, std::mem::take(&mut batch))?;
                            }
                            return Err(bad_input(format!(
                                "line {} has no key separator {:?}; write KEY{}VALUE on each line (the lines before it were produced, none from it on)",
                                n + 1,
                                String::from_utf8_lossy(sep),
                                String::from_utf8_lossy(sep)
                            )));
                        }
                    },
                };
                batch.push(make(value, key));
                if batch.len() == CHUNK {
                    send(&mut log, std::mem::take(&mut batch))?;
                }
            }
            if !batch.is_empty() {
                send(&mut log, batch)?;
            }
        }
        eprintln!("produced {total} message(s) to {}", self.topic);
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_mix_picks_its_share_and_the_orders_say_so() {
        for (retry, reject) in [(0.0, 0.0), (7.0, 1.0), (50.0, 50.0), (0.0, 3.0)] {
            let mix = FaultMix {
                retry_percent: retry,
                reject_percent: reject,
            };
            let n = 100_000u64;
            let (mut retries, mut rejects) = (0u64, 0u64);
            for i in 0..n {
                let (t, r) = mix.pick(i);
                assert!(!(t && r), "order {i} both retries and is rejected");
                let order: serde_json::Value =
                    serde_json::from_slice(&synthetic_order_mixed(i, 100, mix)).unwrap();
                assert_eq!(order["transient"].as_bool().unwrap_or(false), t);
                assert_eq!(order["amount_cents"].as_u64() == Some(0), r);
                retries += t as u64;
                rejects += r as u64;
            }
            let share = |k: u64| k as f64 * 100.0 / n as f64;
            assert!((share(retries) - retry).abs() < 0.5, "{retry}%: {retries}");
            assert!(
                (share(rejects) - reject).abs() < 0.5,
                "{reject}%: {rejects}"
            );
        }
        assert!(
            FaultMix {
                retry_percent: 60.0,
                reject_percent: 50.0
            }
            .check()
            .is_err()
        );
        assert!(
            FaultMix {
                retry_percent: -1.0,
                reject_percent: 0.0
            }
            .check()
            .is_err()
        );
        assert!(
            FaultMix {
                retry_percent: 7.0,
                reject_percent: 1.0
            }
            .check()
            .is_ok()
        );
    }
}
