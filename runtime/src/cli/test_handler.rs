//! `weir test`: runs messages from a file through a handler, with no log and no broker, and
//! prints what the handler did with each; `--expect` turns that into a check for an author's CI.

use super::{Globals, bad_input};
use crate::config::{defaults, parse_duration, parse_pair, parse_size};
use crate::host::{HostConfig, Instance, Module, Outcome};
use crate::source::{Delivery, Record};
use clap::Args;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Run each message of --input through a handler, as `weir run` would (retries and traps
/// included, without the backoff waits), and print its outcome, what it emitted and what it
/// logged. With --expect, compare against expected results instead: exit 0 if every message
/// matches, 1 if any differs.
#[derive(Debug, Args)]
pub struct TestCommand {
    /// The handler component (.wasm)
    module: PathBuf,
    /// Messages, one JSON object per line: {"payload": "text" or any JSON value, "key": "k",
    /// "headers": {"name": "value"}, "topic": "t", "partition": 0, "offset": 7}; only
    /// `payload` is required
    #[arg(long)]
    input: PathBuf,
    /// Expected results, one JSON object per input line; each field given must match what
    /// `--json` prints for that message (objects: the fields given; lists: element by element)
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Print one JSON object per message instead of text (usable as an --expect file)
    #[arg(long)]
    json: bool,
    /// KEY=VALUE the handler reads through its config import; repeat for more [default: none]
    #[arg(long = "handler-config", value_name = "KEY=VALUE")]
    handler_config: Vec<String>,
    /// Attempts per message, as `weir run --max-attempts` [default: 5]
    #[arg(long, default_value_t = defaults::MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Linear memory the handler may use [default: 64MiB]
    #[arg(long, default_value = defaults::MEMORY_LIMIT)]
    memory_limit: String,
    /// How long one call may run [default: 5s]
    #[arg(long, default_value = defaults::CALL_TIMEOUT)]
    call_timeout: String,
    /// Let the handler send HTTP requests to HOST or HOST:PORT, as `weir run --allow-http`;
    /// repeat for more [default: none]
    #[arg(long = "allow-http", value_name = "HOST[:PORT]")]
    allow_http: Vec<String>,
    /// Keep the compiled module here, as `weir run --cache-dir` does, so that the next
    /// `weir test` of the same module loads it in milliseconds [default: compile every time]
    #[arg(long, env = "WEIR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

/// One input line, parsed.
struct Input {
    line: usize,
    delivery: Delivery,
}

impl TestCommand {
    /// Never opens the data directory or a broker.
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        if self.max_attempts == 0 {
            return Err(bad_input("--max-attempts must be at least 1"));
        }
        let mut handler_config = g.file.handler_config.clone();
        for pair in &self.handler_config {
            let (k, v) = parse_pair("--handler-config", pair)?;
            handler_config.insert(k, v);
        }
        let inputs = read_inputs(&self.input)?;
        let expected = match &self.expect {
            Some(path) => Some(read_expected(path, inputs.len())?),
            None => None,
        };
        let cfg = HostConfig {
            memory_limit: parse_size("--memory-limit", &self.memory_limit)?,
            call_timeout: parse_duration("--call-timeout", &self.call_timeout)?,
            max_instances: 2,
            cache_dir: self.cache_dir.clone(),
            handler_config,
            capture_logs: true,
            allow_http: crate::config::parse_allow_http(&self.allow_http)?,
        };
        let module = Module::load(&self.module, &cfg, crate::source::limits_only())?;
        let runtime = super::local_runtime()?;
        let mut instance = None;
        let mut failures = 0usize;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for (i, input) in inputs.iter().enumerate() {
            let result =
                runtime.block_on(run_one(&module, &mut instance, input, self.max_attempts));
            match &expected {
                Some(expected) => {
                    let mut diffs = Vec::new();
                    subset(&expected[i], &result, "", &mut diffs);
                    if diffs.is_empty() {
                        writeln!(out, "ok    line {}", input.line)?;
                    } else {
                        failures += 1;
                        writeln!(out, "FAIL  line {}", input.line)?;
                        for d in diffs {
                            writeln!(out, "      {d}")?;
                        }
                        writeln!(out, "      actual: {result}")?;
                    }
                }
                None if self.json => writeln!(out, "{result}")?,
                None => print_text(&mut out, input.line, &result)?,
            }
        }
        if expected.is_some() {
            writeln!(
                out,
                "{} of {} message(s) as expected",
                inputs.len() - failures,
                inputs.len()
            )?;
            if failures > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs one message until it succeeds, is rejected, or runs out of attempts; a fault replaces
/// the instance, as the engine does.
async fn run_one(
    module: &Module,
    instance: &mut Option<Instance>,
    input: &Input,
    max_attempts: u32,
) -> Value {
    let mut attempts = Vec::new();
    let mut logs = Vec::new();
    let mut emitted = Vec::new();
    let mut outcome = "retries-exhausted";
    let mut reason = None;
    for attempt in 1..=max_attempts {
        let inst = match instance {
            Some(i) => i,
            None => match module.instantiate().await {
                Ok(i) => instance.insert(i),
                Err(o) => {
                    attempts.push(attempt_json(attempt, &o));
                    outcome = "trap";
                    reason = Some(describe(&o));
                    continue;
                }
            },
        };
        let mut msg = [input.delivery.clone()];
        let r = inst.run(&mut msg, &[attempt]).await;
        logs.extend(
            inst.take_logs()
                .into_iter()
                .map(|l| json!({"attempt": attempt, "level": l.level, "message": l.message})),
        );
        let stop = r.stop.unwrap_or(Outcome::Ok);
        attempts.push(attempt_json(attempt, &stop));
        match &stop {
            Outcome::Ok => {
                emitted = r
                    .outputs
                    .iter()
                    .map(|o| record_json(Some(&o.topic), &o.record))
                    .collect();
                outcome = "ok";
                reason = None;
                break;
            }
            Outcome::Reject { reason: r } => {
                outcome = "rejected";
                reason = Some(r.clone());
                break;
            }
            // Out of attempts, the message is dead-lettered with the kind of its last failure,
            // as `weir run` names it in the envelope's `weir.dlq.error-kind`.
            Outcome::Fault { kind, .. } => {
                *instance = None;
                outcome = kind.as_str();
                reason = Some(describe(&stop));
            }
            Outcome::Retry { .. } => {
                outcome = "retries-exhausted";
                reason = Some(describe(&stop));
            }
            Outcome::InvalidOutput { .. } => {
                outcome = "invalid-output";
                reason = Some(describe(&stop));
            }
        }
    }
    let mut v = json!({
        "line": input.line,
        "outcome": outcome,
        "attempts": attempts,
        "emitted": emitted,
        "logs": logs,
    });
    if let Some(reason) = reason {
        v["reason"] = Value::String(reason);
    }
    v
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Retry { reason, .. } => reason.clone(),
        Outcome::Reject { reason } => reason.clone(),
        Outcome::InvalidOutput { detail } => detail.clone(),
        Outcome::Fault { detail, .. } => detail.clone(),
    }
}

fn attempt_json(attempt: u32, o: &Outcome) -> Value {
    let kind = match o {
        Outcome::Ok => "ok",
        Outcome::Retry { .. } => "retry",
        Outcome::Reject { .. } => "reject",
        Outcome::InvalidOutput { .. } => "invalid-output",
        Outcome::Fault { kind, .. } => kind.as_str(),
    };
    let mut v = json!({"attempt": attempt, "outcome": kind});
    if !matches!(o, Outcome::Ok) {
        v["reason"] = Value::String(describe(o));
    }
    if let Outcome::Retry {
        delay: Some(delay), ..
    } = o
    {
        v["delay_ms"] = json!(delay.as_millis() as u64);
    }
    v
}

/// A record as JSON: the payload as a JSON value when it is one, else as text (or bytes as a
/// list of numbers when it is not UTF-8).
fn record_json(topic: Option<&str>, r: &Record) -> Value {
    let mut m = Map::new();
    if let Some(t) = topic {
        m.insert("topic".into(), Value::String(t.into()));
    }
    if let Some(k) = &r.key {
        m.insert("key".into(), bytes_json(k));
    }
    m.insert(
        "payload".into(),
        serde_json::from_slice::<Value>(&r.payload).unwrap_or_else(|_| bytes_json(&r.payload)),
    );
    if !r.headers.is_empty() {
        let mut h = Map::new();
        for (n, v) in &r.headers {
            h.insert(n.clone(), bytes_json(v));
        }
        m.insert("headers".into(), Value::Object(h));
    }
    Value::Object(m)
}

fn bytes_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.into()),
        Err(_) => Value::Array(b.iter().map(|&x| Value::from(x)).collect()),
    }
}

fn print_text(out: &mut impl Write, line: usize, v: &Value) -> std::io::Result<()> {
    let attempts = v["attempts"].as_array().map_or(0, Vec::len);
    let outcome = v["outcome"].as_str().unwrap_or("?");
    match v.get("reason").and_then(Value::as_str) {
        Some(reason) => writeln!(
            out,
            "line {line}: {outcome} after {attempts} attempt(s): {reason}"
        )?,
        None => writeln!(out, "line {line}: {outcome} after {attempts} attempt(s)")?,
    }
    for a in v["attempts"].as_array().into_iter().flatten() {
        if a["outcome"] != "ok" {
            writeln!(
                out,
                "  attempt {}: {} ({})",
                a["attempt"],
                a["outcome"].as_str().unwrap_or("?"),
                a["reason"].as_str().unwrap_or("")
            )?;
        }
    }
    for e in v["emitted"].as_array().into_iter().flatten() {
        let key = e
            .get("key")
            .map(|k| format!(" key={k}"))
            .unwrap_or_default();
        let headers = e
            .get("headers")
            .map(|h| format!(" headers={h}"))
            .unwrap_or_default();
        writeln!(
            out,
            "  emit {}{key}{headers} {}",
            e["topic"].as_str().unwrap_or("?"),
            e["payload"]
        )?;
    }
    for l in v["logs"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  log  {:5} {}",
            l["level"].as_str().unwrap_or("?"),
            l["message"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}

fn read_lines(path: &Path, what: &str) -> anyhow::Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("cannot read {what} {}: {e}", path.display())))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            bad_input(format!(
                "{what} {} line {}: not JSON ({e}); each line is one JSON object",
                path.display(),
                i + 1
            ))
        })?;
        if !v.is_object() {
            return Err(bad_input(format!(
                "{what} {} line {}: a JSON object is expected, not {v}",
                path.display(),
                i + 1
            )));
        }
        lines.push((i + 1, v));
    }
    Ok(lines)
}

fn read_inputs(path: &Path) -> anyhow::Result<Vec<Input>> {
    let shown = path.display();
    let now_ms = crate::engine::now_ms();
    let mut inputs = Vec::new();
    for (line, v) in read_lines(path, "--input")? {
        let bad = |what: &str| {
            bad_input(format!(
                "--input {shown} line {line}: {what}; a line looks like {{\"payload\": {{\"id\": \"o-1\"}}, \"key\": \"o-1\", \"headers\": {{\"name\": \"value\"}}}}"
            ))
        };
        let payload = match v.get("payload") {
            Some(Value::String(s)) => s.clone().into_bytes(),
            Some(other) => other.to_string().into_bytes(),
            None => return Err(bad("no `payload`")),
        };
        let key = match v.get("key") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone().into_bytes()),
            Some(_) => return Err(bad("`key` must be a string")),
        };
        let mut headers = Vec::new();
        match v.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                for (n, hv) in h {
                    match hv {
                        Value::String(s) => headers.push((n.clone(), s.clone().into_bytes())),
                        _ => return Err(bad("header values must be strings")),
                    }
                }
            }
            Some(_) => return Err(bad("`headers` must be an object of strings")),
        }
        let number = |name: &str, default: u64| match v.get(name) {
            None => Ok(default),
            Some(n) => n
                .as_u64()
                .ok_or_else(|| bad(&format!("`{name}` must be a whole number"))),
        };
        let partition =
            u32::try_from(number("partition", 0)?).map_err(|_| bad("`partition` is too large"))?;
        let offset = number("offset", inputs.len() as u64)?;
        let topic = match v.get("topic") {
            None => "test".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("`topic` must be a string")),
        };
        inputs.push(Input {
            line,
            delivery: Delivery {
                topic: Arc::from(topic.as_str()),
                partition,
                offset,
                record: Record {
                    key,
                    payload,
                    headers,
                    timestamp_ms: Some(now_ms),
                },
                redeliveries: 0,
            },
        });
    }
    if inputs.is_empty() {
        return Err(bad_input(format!(
            "--input {shown} has no messages; write one JSON object per line"
        )));
    }
    Ok(inputs)
}

fn read_expected(path: &Path, inputs: usize) -> anyhow::Result<Vec<Value>> {
    let expected: Vec<Value> = read_lines(path, "--expect")?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    if expected.len() != inputs {
        return Err(bad_input(format!(
            "--expect {} has {} result(s) but --input has {inputs} message(s); give one per message",
            path.display(),
            expected.len()
        )));
    }
    Ok(expected)
}

/// Collects where `actual` does not have what `expected` says: objects compare the fields
/// `expected` names, lists element by element (and their lengths), anything else by equality.
fn subset(expected: &Value, actual: &Value, at: &str, diffs: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let here = format!("{at}.{k}");
                match a.get(k) {
                    Some(av) => subset(ev, av, &here, diffs),
                    None => diffs.push(format!("{here}: expected {ev}, missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                diffs.push(format!(
                    "{at}: expected {} element(s), got {}",
                    e.len(),
                    a.len()
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                subset(ev, av, &format!("{at}[{i}]"), diffs);
            }
        }
        (e, a) if e == a => {}
        (e, a) => diffs.push(format!("{}: expected {e}, got {a}", at_or_root(at))),
    }
}

fn at_or_root(at: &str) -> &str {
    if at.is_empty() { "(result)" } else { at }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_compares_only_what_is_expected() {
        let actual = json!({"outcome": "ok", "emitted": [{"topic": "a", "payload": {"x": 1, "y": 2}}], "logs": []});
        let mut d = Vec::new();
        subset(
            &json!({"outcome": "ok", "emitted": [{"payload": {"x": 1}}]}),
            &actual,
            "",
            &mut d,
        );
        assert!(d.is_empty(), "{d:?}");
        subset(
            &json!({"outcome": "rejected", "emitted": []}),
            &actual,
            "",
            &mut d,
        );
        assert_eq!(
            d,
            vec![
                ".emitted: expected 0 element(s), got 1".to_string(),
                ".outcome: expected \"rejected\", got \"ok\"".to_string(),
            ]
        );
    }
}
