//! `weir status`: what a running weir is doing, from its admin API; or, when none answers, the
//! topics and consumer lag in the data directory.

use super::{Globals, bad_input};
use clap::Args;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Show a running weir's figures (module, instances, throughput totals, latency, lag per
/// partition) from its admin server; if none answers there, the topics and lag in the data
/// directory.
#[derive(Debug, Args)]
pub struct StatusCommand {
    /// The admin server of the run to ask
    #[arg(long, default_value = crate::config::defaults::ADMIN, env = "WEIR_ADMIN")]
    admin: String,
    /// Print the run's status as JSON (as its /api/status serves it)
    #[arg(long)]
    json: bool,
}

impl StatusCommand {
    pub fn execute(self, g: Globals) -> anyhow::Result<ExitCode> {
        let addr: SocketAddr = self
            .admin
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                bad_input(format!(
                    "--admin `{}` is not HOST:PORT (for example 127.0.0.1:9464)",
                    self.admin
                ))
            })?;
        match fetch_status(addr) {
            Ok(v) => {
                if self.json {
                    println!("{v}");
                } else {
                    print_status(&v);
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(why) => {
                if self.json {
                    return Err(anyhow::anyhow!(
                        "no weir run answers at http://{addr} ({why}); start one, or pass its --admin address"
                    ));
                }
                eprintln!(
                    "no weir run answers at http://{addr} ({why}); showing the topics on {} instead",
                    g.source.name()
                );
                super::topics::TopicsCommand::List {
                    topic: None,
                    group: None,
                    json: false,
                }
                .execute(g)
            }
        }
    }
}

fn fetch_status(addr: SocketAddr) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /api/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("no status line").to_string());
    }
    serde_json::from_str(body).map_err(|e| format!("not weir's status JSON: {e}"))
}

fn print_status(v: &Value) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let secs = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |s| format!("{:.2} ms", s * 1e3))
    };
    println!(
        "module     {} ({})",
        v["module"]["name"].as_str().unwrap_or("?"),
        v["module"]["digest"].as_str().unwrap_or("?")
    );
    println!(
        "group      {}   state {}   up {:.0} s",
        v["group"].as_str().unwrap_or("?"),
        if v["ready"].as_bool() == Some(true) {
            "consuming"
        } else {
            "starting or stopping"
        },
        v["uptime_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "instances  {} running, {} desired; {} in flight; {} busy lanes; {} paused partitions",
        n(&v["instances"]),
        n(&v["desired_instances"]),
        n(&v["in_flight"]),
        n(&v["busy_lanes"]),
        n(&v["paused_partitions"])
    );
    let t = &v["totals"];
    println!(
        "totals     processed {}, emitted {}, dead-lettered {}, retried {}, faults {}, duplicates {}",
        n(&t["processed"]),
        n(&t["emitted"]),
        n(&t["dead_lettered"]),
        n(&t["retries"]),
        n(&t["faults"]),
        n(&t["deduped"])
    );
    let l = &v["latency"];
    println!(
        "latency    end to end p50 {} p99 {}; handler p50 {} p99 {} (bucket bounds)",
        secs(&l["end_to_end_p50_seconds"]),
        secs(&l["end_to_end_p99_seconds"]),
        secs(&l["handler_p50_seconds"]),
        secs(&l["handler_p99_seconds"])
    );
    println!(
        "{:<24} {:>9} {:>12} {:>12} {:>10}",
        "TOPIC", "PARTITION", "END", "COMMITTED", "LAG"
    );
    for p in v["partitions"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:>9} {:>12} {:>12} {:>10}",
            p["topic"].as_str().unwrap_or("?"),
            n(&p["partition"]),
            n(&p["end_offset"]),
            n(&p["committed"]),
            n(&p["lag"])
        );
    }
    if let Some(note) = v["lag_note"].as_str() {
        println!("note: {note}");
    }
    let storage = v["storage"]
        .as_array()
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    if !storage.is_empty() {
        println!(
            "{:<24} {:<30} {:>12} {:>12}",
            "TOPIC", "KEEPS", "BYTES", "OLDEST"
        );
    }
    for u in storage {
        println!(
            "{:<24} {:<30} {:>12} {:>12}",
            u["topic"].as_str().unwrap_or("?"),
            u["retention"].as_str().unwrap_or("?"),
            n(&u["bytes"]),
            u["oldest_age_s"]
                .as_f64()
                .map_or("-".to_string(), |a| format!("{a:.0}s ago"))
        );
    }
}
