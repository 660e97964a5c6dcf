//! `weir check-data`: verifies the embedded log's data directory (see
//! `source::embedded::check`). Exit codes: 0 sound; 3 problems found, or the directory cannot be
//! used (held by a running weir: stop it first); 2 bad input.

use super::{Globals, bad_input};
use crate::source::embedded::EmbeddedLog;
use clap::Args;
use std::process::ExitCode;

/// Verify the data directory: records decode and their offsets are dense, committed offsets
/// are within the log, dedupe marks are indexed. Needs the directory to itself (stop `weir run`
/// first)
#[derive(Debug, Args)]
pub struct CheckDataCommand {
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// Exit code when the check found problems (as for a corrupt data directory).
const PROBLEMS: u8 = 3;

impl CheckDataCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        if !g.source.is_embedded() {
            return Err(bad_input(format!(
                "weir check-data checks the embedded log's data directory; {} keeps its own data",
                g.source.name()
            )));
        }
        if !g.data_dir.exists() {
            return Err(bad_input(format!(
                "no data directory at {} (give it with --data-dir)",
                g.data_dir.display()
            )));
        }
        let log = EmbeddedLog::open(&g.data_dir)?;
        let r = log.check()?;
        if self.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{}: {} topic(s), {} record(s), {} group offset(s), {} replay mark(s), {} dedupe mark(s)",
                g.data_dir.display(),
                r.topics,
                r.records,
                r.group_offsets,
                r.replay_marks,
                r.dedupe_marks
            );
            for p in &r.problems {
                println!("problem: {p}");
            }
            if r.problems.is_empty() {
                println!("ok");
            }
        }
        Ok(if r.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(PROBLEMS)
        })
    }
}
