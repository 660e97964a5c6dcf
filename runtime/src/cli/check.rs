use super::Globals;
use crate::host::{HostConfig, Module};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Check that a file is a component implementing weir's handler world; list its imports and
/// exports. Exit code 0 if weir can run it, 2 if not.
#[derive(Debug, Args)]
pub struct CheckCommand {
    /// The handler component (.wasm)
    module: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

impl CheckCommand {
    pub fn execute(self, _g: Globals) -> anyhow::Result<ExitCode> {
        let cfg = HostConfig {
            memory_limit: 64 << 20,
            call_timeout: Duration::from_secs(5),
            max_instances: 1,
            cache_dir: None,
            handler_config: Default::default(),
            capture_logs: false,
            allow_http: Default::default(),
        };
        let module = Module::load(&self.module, &cfg, crate::source::limits_only())?;
        let size = std::fs::metadata(&self.module)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let d = module.describe(size);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            println!(
                "ok: {} is a weir handler (entry point {})",
                self.module.display(),
                d.entry
            );
            println!("  digest   sha256:{}", d.digest);
            println!("  size     {} bytes", d.size);
            println!("  imports  {}", d.imports.join("\n           "));
            println!("  exports  {}", d.exports.join("\n           "));
        }
        Ok(ExitCode::SUCCESS)
    }
}
