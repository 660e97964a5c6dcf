//! The `weir` command line. One struct per subcommand, each with `execute`; exit codes are
//! chosen in one place, [`exit_code`].

mod bench;
mod bench_kafka;
mod bench_queue;
mod bench_report;
mod check;
mod check_data;
mod consume;
mod dlq;
mod groups;
mod new;
mod produce;
mod request;
mod run;
mod status;
mod test_handler;
mod topics;

use crate::config::{ConfigError, FileConfig};
use crate::host::LoadError;
use crate::source::SourceError;
use crate::source::connect::SourceSpec;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// weir: run message handlers, compiled to WebAssembly components, over a durable log.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about, propagate_version = true)]
pub struct Cli {
    /// Data directory of the embedded log [default: ./weir-data]
    #[arg(long, global = true, env = "WEIR_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Config file (TOML; the same names as the flags) [default: none]
    #[arg(long, global = true, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,

    /// Where the topics live: `embedded` (the log in --data-dir), `kafka://host:port,...` or
    /// `amqp://user:pass@host:port/vhost` (RabbitMQ; `amqps://` for TLS)
    /// [default: `[source] url` in the config file, else embedded]
    #[arg(long, global = true, env = "WEIR_SOURCE", value_name = "URL")]
    source: Option<String>,

    /// Kafka brokers (host:port,...): short for --source kafka://host:port,...
    #[arg(long, global = true, env = "WEIR_BROKERS")]
    brokers: Option<String>,

    /// A client setting of the broker, passed through: a librdkafka property on Kafka
    /// (security.protocol=SASL_SSL, ...), a weir setting on RabbitMQ (see docs/sources.md);
    /// repeat for more (over `[source.properties]` in the config file) [default: none]
    #[arg(
        long = "source-property",
        alias = "kafka-property",
        global = true,
        value_name = "KEY=VALUE"
    )]
    source_property: Vec<String>,

    /// Log format on standard error [default: pretty]
    #[arg(long, global = true, env = "WEIR_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, alter and delete topics
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// List, describe, move (seek) and delete consumer groups
    #[command(subcommand)]
    Groups(groups::GroupsCommand),
    /// Append messages to a topic
    Produce(produce::ProduceCommand),
    /// Print messages of a topic
    Consume(consume::ConsumeCommand),
    /// Send a request to a topic and print the handler's answer (request/reply)
    Request(request::RequestCommand),
    /// Run a handler module over topics
    Run(run::RunCommand),
    /// Check that a file is a handler component weir can run
    Check(check::CheckCommand),
    /// Verify the embedded log's data directory (records, offsets, dedupe marks)
    CheckData(check_data::CheckDataCommand),
    /// List, show and replay dead letters
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Run messages from a file through a handler, with no log or broker, and show or check
    /// what it did
    Test(test_handler::TestCommand),
    /// Write a new handler project (Rust, Python, JavaScript or C) that builds and passes
    /// `weir test` as it is
    New(new::NewCommand),
    /// Measure a handler on the full pipeline: throughput, CPU, memory, load and instance costs
    Bench(bench::BenchCommand),
    /// What a running weir is doing (from its admin server), or the lag in the data directory
    Status(status::StatusCommand),
}

/// What every subcommand gets: the resolved global settings.
#[derive(Debug)]
struct Globals {
    data_dir: PathBuf,
    file: FileConfig,
    /// Where the topics live.
    source: SourceSpec,
}

/// Marks an error as the user's input to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// Bytes from a message (a payload, a key, a header, an error a guest wrote) as text safe to
/// print on a terminal: invalid UTF-8 replaced, and control characters (escape sequences could
/// rewrite the screen or the title, or hide lines) written as `\x1b` or `\u{9b}`.
pub(crate) fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// Exit codes: 0 success; 1 weir failed (storage, engine); 2 bad input (usage, config, module,
/// topic, file); 3 the data directory cannot be used (locked by another process, corrupt).
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<SourceError>() {
            return match s {
                SourceError::Locked { .. } | SourceError::Corrupt { .. } => 3,
                s if s.is_bad_input() => 2,
                _ => 1,
            };
        }
        if cause.is::<LoadError>() || cause.is::<ConfigError>() || cause.is::<BadInput>() {
            return 2;
        }
    }
    1
}

/// A runtime on the calling thread, for commands that call a handler now and then (`weir test`,
/// `weir dlq replay`, `weir bench`'s instance probe): handler calls are async.
fn local_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The tokio runtime a run's I/O (partition tasks, the admin server, the socket) runs on; the
/// handler instances have a runtime of their own (`engine::pool`).
fn io_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weir-io")
        .build()
        .context("starting the async runtime")
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // lsm-tree warns for each table of a deleted segment whose file went with its folder
    // first ("Failed to cleanup deleted table ... NotFound"): the files are gone either way.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,weir=info,lapin=off,lsm_tree::table::inner=error")
    });
    use std::io::IsTerminal;
    // Colour only on a terminal: logs piped to a file or a collector stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Pretty => builder.with_target(false).compact().init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    init_tracing(cli.log_format.unwrap_or(LogFormat::Pretty));
    match execute(cli) {
        Ok(code) => code,
        // The reader of standard output went away (`| head`): no message, and the status of
        // a process that SIGPIPE ends (128 + 13), so a pipeline with `pipefail` still sees it.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(BROKEN_PIPE)
        }
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Every `--source-property` on the command line, before and after the subcommand, in order.
/// clap keeps only the ones after the subcommand when both places have some (a global option
/// given again below the subcommand replaces its values), so
/// `weir --source-property prefix=a: run --source-property claim-idle=2s` lost the prefix. The
/// command line is read again for them; `parsed` (clap's) stands when the scan finds fewer.
fn all_source_properties(args: impl Iterator<Item = String>, parsed: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        if a == "--" {
            break;
        }
        for flag in ["--source-property", "--kafka-property"] {
            if a == flag {
                if let Some(v) = args.next() {
                    found.push(v);
                }
            } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                found.push(v.to_string());
            }
        }
    }
    if found.len() >= parsed.len() {
        found
    } else {
        parsed.to_vec()
    }
}

/// The exit status of a process that SIGPIPE ends.
const BROKEN_PIPE: u8 = 128 + 13;

/// A reader that goes away (`weir dlq list | head`) ends weir as it ends other tools: without a
/// message, with status 141 (SIGPIPE's). `println!` panics on the closed pipe; this hook stops
/// the process quietly instead. (Rust ignores SIGPIPE, so writes fail rather than kill the
/// process; restoring the signal would take `unsafe`, and would also kill `weir run` on a
/// closed socket.)
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(BROKEN_PIPE.into());
        }
        default(info);
    }));
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let data_dir = cli
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(crate::config::default_data_dir);
    let kafka_file = file
        .source
        .kafka
        .as_ref()
        .and_then(|k| k.brokers.as_ref())
        .map(|b| format!("kafka://{b}"));
    let url = match (&cli.source, &cli.brokers) {
        (Some(_), Some(_)) => {
            return Err(bad_input(
                "--source and --brokers both given: --brokers h:p is short for --source kafka://h:p; pass one",
            ));
        }
        (Some(url), None) => Some(url.clone()),
        (None, Some(b)) => Some(format!("kafka://{b}")),
        (None, None) => file.source.url.clone().or(kafka_file),
    };
    let mut properties = file.source.properties_for(url.as_deref());
    for pair in &all_source_properties(std::env::args().skip(1), &cli.source_property) {
        let (k, v) = crate::config::parse_pair("--source-property", pair)?;
        properties.insert(k, v);
    }
    let source = SourceSpec::parse(url.as_deref(), properties, data_dir.clone())?;
    let globals = Globals {
        data_dir,
        file,
        source,
    };
    match cli.command {
        Command::Topics(c) => c.execute(globals),
        Command::Groups(c) => c.execute(globals),
        Command::Produce(c) => c.execute(globals),
        Command::Consume(c) => c.execute(globals),
        Command::Request(c) => c.execute(globals),
        Command::Run(c) => c.execute(globals),
        Command::Check(c) => c.execute(globals),
        Command::CheckData(c) => c.execute(globals),
        Command::Dlq(c) => c.execute(globals),
        Command::Test(c) => c.execute(globals),
        Command::New(c) => c.execute(globals),
        Command::Bench(c) => c.execute(globals),
        Command::Status(c) => c.execute(globals),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn source_properties_count_on_both_sides_of_the_subcommand() {
        let args = |s: &str| {
            s.split(' ')
                .map(String::from)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let cases: &[(&str, &[&str], &[&str])] = &[
            // clap kept the subcommand's only: the scan finds both, in order.
            (
                "--source-property prefix=a: run --source-property claim-idle=2s",
                &["claim-idle=2s"],
                &["prefix=a:", "claim-idle=2s"],
            ),
            ("--kafka-property=a=1 topics list", &["a=1"], &["a=1"]),
            // After `--` nothing is an option.
            ("run -- --source-property x=1", &[], &[]),
        ];
        for (line, parsed, want) in cases {
            let parsed: Vec<String> = parsed.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                super::all_source_properties(args(line), &parsed),
                *want,
                "{line}"
            );
        }
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let cases: &[(&[u8], &str)] = &[
            (b"plain text", "plain text"),
            (b"tab\there", "tab\there"),
            (b"\x1b]0;owned\x07\x1b[2J", "\\x1b]0;owned\\x07\\x1b[2J"),
            (b"line\nbreak\r", "line\\x0abreak\\x0d"),
            ("csi \u{9b}31m".as_bytes(), "csi \\u{9b}31m"),
            (b"del\x7f", "del\\x7f"),
            (b"bad \xff utf8", "bad \u{fffd} utf8"),
        ];
        for (input, want) in cases {
            assert_eq!(super::shown(input), *want, "{input:?}");
        }
    }
}
