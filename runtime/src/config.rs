//! `weir run`'s settings: the options of `weir.toml`, flags and `WEIR_*` variables are parsed
//! and checked in `weir_core::config` (re-exported here); [`resolve`] builds the engine's,
//! the host's and the admin server's settings from what passed.

pub use weir_core::config::*;

use crate::engine::dedupe::DedupeConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The admin server's settings, validated.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Who may call it.
    pub policy: crate::admin::Policy,
    /// Where `POST /module` may load modules from.
    pub reload_dir: PathBuf,
}

/// `weir run`'s settings after merging and validation.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub module: PathBuf,
    /// `--max-depth`: the most uncommitted messages a consumed topic may hold before appends
    /// through this run are told to slow down.
    pub max_depth: Option<u64>,
    /// The admin server; `None`: off.
    pub admin: Option<AdminSettings>,
    pub exactly_once: bool,
    pub engine: crate::engine::EngineConfig,
    pub host: crate::host::HostConfig,
}

/// Checks `options` (defaults applied) and builds a run's settings from them; `handler_config`
/// is what the handler's `config` import will see, `data_dir` holds the compiled-module cache
/// unless `--cache-dir` names another; topic names are checked by the source's `naming`.
pub fn resolve(
    options: RunOptions,
    handler_config: BTreeMap<String, String>,
    data_dir: &Path,
    naming: &weir_core::topic::Naming,
) -> Result<RunSettings, ConfigError> {
    let c = options.check_for(naming)?;
    let store: Option<std::sync::Arc<dyn crate::engine::dedupe::SharedStore>> =
        match c.dedupe_store.as_deref() {
            None => None,
            Some(url) => Some(std::sync::Arc::new(
                crate::dedupe_store::RedisStore::new(url)
                    .map_err(|e| ConfigError(format!("--dedupe-store: {e}")))?,
            )),
        };
    let dedupe = c.dedupe.map(|(source, window)| DedupeConfig {
        source,
        window,
        store,
        claim_ttl: c.claim_ttl,
    });
    let admin = c.admin.map(|a| AdminSettings {
        addr: a.addr,
        policy: crate::admin::Policy {
            token: a.token,
            allow_hosts: a.allow_hosts,
        },
        reload_dir: a.reload_dir,
    });
    Ok(RunSettings {
        module: c.module,
        max_depth: c.max_depth,
        admin,
        engine: crate::engine::EngineConfig {
            group: c.group,
            topics: c.topics,
            priority: c.priority,
            batch_size: c.batch_size,
            instances: c.instances,
            lanes: c.lanes,
            max_in_flight: c.max_in_flight,
            max_in_flight_bytes: c.max_in_flight_bytes,
            drain: c.drain,
            backoff: c.backoff,
            retry_mode: c.retry_mode,
            delivery: c.delivery,
            dlq_topic: c.dlq_topic,
            retry_topic: c.retry_topic,
            idle_poll: std::time::Duration::from_millis(20),
            retry_topics: Vec::new(),
            dedupe,
            revoke_timeout: c.revoke_timeout,
            autoscale: c.autoscale,
        },
        exactly_once: c.exactly_once,
        host: crate::host::HostConfig {
            memory_limit: c.memory_limit,
            call_timeout: c.call_timeout,
            max_instances: c.most as u32,
            cache_dir: Some(c.cache_dir.unwrap_or_else(|| data_dir.join("compiled"))),
            handler_config,
            capture_logs: false,
            allow_http: c.allow_http,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weir_core::topic::Naming;

    const KAFKA: Naming = Naming::KAFKA;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig =
            toml::from_str("[run]\nmodule = \"a.wasm\"\ntopic = [\"t\"]\ngroup = \"g\"\nbatch-size = 7\nmax-attempts = 2\n").unwrap();
        let flags = RunOptions {
            batch_size: Some(9),
            ..Default::default()
        };
        let s = resolve(
            flags.or(file.run),
            file.handler_config,
            Path::new("d"),
            &KAFKA,
        )
        .unwrap();
        assert_eq!(s.engine.batch_size, 9);
        assert_eq!(s.engine.backoff.max_attempts, 2);
        assert_eq!(s.engine.backoff.base, Duration::from_millis(100));
        assert_eq!(s.module, PathBuf::from("a.wasm"));
    }

    #[test]
    fn missing_and_invalid_settings_are_named() {
        let err = resolve(
            RunOptions::default(),
            BTreeMap::new(),
            Path::new("d"),
            &KAFKA,
        )
        .unwrap_err()
        .0;
        assert!(err.contains("--module"), "{err}");
        let o = RunOptions {
            module: Some("m.wasm".into()),
            topic: Some(vec!["t".into()]),
            group: Some("g".into()),
            batch_size: Some(0),
            ..Default::default()
        };
        assert!(
            resolve(o, BTreeMap::new(), Path::new("d"), &KAFKA)
                .unwrap_err()
                .0
                .contains("--batch-size")
        );
    }

    #[test]
    fn topic_names_follow_the_brokers_rules() {
        let rabbit = crate::source::rabbitmq::NAMING;
        let run = |topic: &str, dlq: Option<&str>| RunOptions {
            module: Some("m.wasm".into()),
            topic: Some(vec![topic.into()]),
            group: Some("g".into()),
            dlq_topic: dlq.map(Into::into),
            retry_mode: Some(RetryMode::Requeue),
            ..Default::default()
        };
        // (topic, --dlq-topic, naming, Ok(the dead-letter topic) or Err(part of the error))
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a Naming,
            Result<&'a str, &'a str>,
        );
        let long = "q".repeat(250);
        let cases: [Case; 6] = [
            ("orders", None, &KAFKA, Ok("orders.dlq")),
            ("orders:eu", None, &rabbit, Ok("orders:eu.dlq")),
            (
                "orders:eu",
                None,
                &KAFKA,
                Err("--topic: invalid topic name `orders:eu` on Kafka"),
            ),
            (
                "billing/v2",
                Some("dead/{topic}"),
                &rabbit,
                Ok("dead/billing/v2"),
            ),
            (
                "orders",
                Some("amq.{topic}"),
                &rabbit,
                Err("--dlq-topic: invalid topic name `amq.orders` on RabbitMQ"),
            ),
            // The name a template gives each topic is checked, not a stand-in's.
            (&long, None, &rabbit, Err("longer than 255 bytes")),
        ];
        for (topic, dlq, naming, want) in cases {
            let got = resolve(run(topic, dlq), BTreeMap::new(), Path::new("d"), naming);
            match (got, want) {
                (Ok(s), Ok(name)) => assert_eq!(s.engine.dlq_for(topic), name),
                (Err(e), Err(part)) => assert!(e.0.contains(part), "{topic}: {}", e.0),
                (got, want) => panic!("{topic}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
        // In blocking mode there is no retry topic, so its name does not limit the topic's:
        // a 250-byte queue name is fine there (its `.dlq` has 254 bytes; `.retry` would have 256).
        let blocking = RunOptions {
            retry_mode: Some(RetryMode::Blocking),
            ..run(&"q".repeat(250), None)
        };
        assert!(resolve(blocking, BTreeMap::new(), Path::new("d"), &rabbit).is_ok());
    }
}
