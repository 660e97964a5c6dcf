//! Redis Streams for `weir topics`, `produce`, `consume` and `dlq`: a stream read by position
//! like a log (offset = the entry's position among the stream's entries now), appended with
//! `XADD`, and taken from by a group (`weir consume --group`) with `XREADGROUP` + `XACK`.

use super::conns::Conns;
use super::{RedisConfig, entries, error, fields};
use crate::source::broker::Broker;
use crate::source::{
    Capabilities, Delivery, GroupOffset, PartitionStats, Record, SourceError, TopicStats,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Creates the stream `key` with no entries (a group made and dropped in one `MULTI`: Redis
/// makes a stream only on `XADD` or `XGROUP CREATE ... MKSTREAM`). `Ok(false)` if it existed.
pub(super) fn create_stream(
    conns: &Conns,
    key: &str,
    ok_if_exists: bool,
) -> Result<bool, SourceError> {
    let kind: String = conns.with("looking up a stream", |c| {
        redis::cmd("TYPE").arg(key).query(c)
    })?;
    match kind.as_str() {
        "none" => {}
        "stream" if ok_if_exists => return Ok(false),
        "stream" => return Err(SourceError::TopicExists(key.to_string())),
        other => {
            return Err(SourceError::Invalid(format!(
                "the Redis key `{key}` holds a {other}, not a stream; pick another topic name"
            )));
        }
    }
    conns.with("creating a stream", |c| {
        redis::pipe()
            .atomic()
            .cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("weir.create")
            .arg("$")
            .arg("MKSTREAM")
            .ignore()
            .cmd("XGROUP")
            .arg("DESTROY")
            .arg(key)
            .arg("weir.create")
            .ignore()
            .query::<()>(c)
    })?;
    Ok(true)
}

pub struct RedisBroker {
    pub(super) cfg: RedisConfig,
    pub(super) conns: Conns,
    /// Where the last `read` of a stream ended: (topic, next offset) -> the last id read, so
    /// reading a stream page by page does not count from its start each time.
    cursor: HashMap<(String, u64), String>,
    /// What `take` took and `settle_taken` acks: (key, group, ids).
    taken: Option<(String, String, Vec<String>)>,
}

impl RedisBroker {
    pub fn connect(cfg: RedisConfig) -> Result<RedisBroker, SourceError> {
        let conns = Conns::new(&cfg, format!("weir-cli:{}", cfg.prefix).replace(' ', "_"))?;
        // Connect now, so a wrong address is the command's first error.
        conns.with("connecting", |c| redis::cmd("PING").query::<()>(c))?;
        Ok(RedisBroker {
            cfg,
            conns,
            cursor: HashMap::new(),
            taken: None,
        })
    }

    /// The number of entries of `topic`'s stream; an error if there is no such stream.
    fn len(&self, topic: &str) -> Result<u64, SourceError> {
        let key = self.cfg.key(topic);
        let (kind, len): (String, u64) = self.conns.with("reading a stream's length", |c| {
            redis::pipe()
                .cmd("TYPE")
                .arg(&key)
                .cmd("XLEN")
                .arg(&key)
                .query(c)
        })?;
        if kind != "stream" {
            return Err(SourceError::UnknownTopic(topic.to_string()));
        }
        Ok(len)
    }

    /// Per group of `topic`: (name, lag + pending, pending).
    fn groups(&self, topic: &str) -> Result<Vec<(String, u64)>, SourceError> {
        let key = self.cfg.key(topic);
        let groups: Vec<HashMap<String, redis::Value>> =
            self.conns.with("reading the groups", |c| {
                redis::cmd("XINFO").arg("GROUPS").arg(&key).query(c)
            })?;
        let len = self.len(topic)?;
        Ok(groups
            .into_iter()
            .filter_map(|g| {
                let name = super::text(g.get("name")?.clone()).ok()?;
                let int = |f: &str| match g.get(f) {
                    Some(redis::Value::Int(n)) => Some((*n).max(0) as u64),
                    _ => None,
                };
                // Without a lag (entries deleted, or Redis before 7.0): the stream's length.
                let waiting = int("lag").unwrap_or(len) + int("pending").unwrap_or(0);
                Some((name, waiting))
            })
            .collect())
    }
}

impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "Redis"
    }

    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities()
    }

    fn request_reply(
        &mut self,
        topic: &str,
        request: Record,
        timeout: std::time::Duration,
    ) -> Option<Result<Option<Record>, SourceError>> {
        Some(self.request_over_streams(topic, request, timeout))
    }

    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        _replication: Option<i32>,
    ) -> Result<(), SourceError> {
        crate::source::broker::check_single_partition_topic(&super::NAMING, topic, partitions)?;
        create_stream(&self.conns, &self.cfg.key(topic), false)
            .map_err(|e| match e {
                SourceError::TopicExists(_) => SourceError::TopicExists(topic.to_string()),
                e => e,
            })
            .map(|_| ())
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        self.len(topic)?;
        let key = self.cfg.key(topic);
        self.conns.with("deleting a stream", |c| {
            redis::cmd("DEL").arg(&key).query::<()>(c)
        })
    }

    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let topics: Vec<String> = match topic {
            Some(t) => vec![t.to_string()],
            None => {
                let pattern = format!("{}*", self.cfg.prefix);
                let keys: Vec<String> = self.conns.with("listing streams", |c| {
                    let iter: redis::Iter<String> = redis::cmd("SCAN")
                        .cursor_arg(0)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("TYPE")
                        .arg("stream")
                        .arg("COUNT")
                        .arg(1000)
                        .clone()
                        .iter(c)?;
                    iter.collect()
                })?;
                let mut t: Vec<String> = keys
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&self.cfg.prefix).map(str::to_string))
                    .collect();
                t.sort();
                t
            }
        };
        let mut out = Vec::new();
        for t in topics {
            let end = self.len(&t)?;
            let mut groups: Vec<GroupOffset> = self
                .groups(&t)?
                .into_iter()
                .map(|(name, waiting)| GroupOffset {
                    group: name,
                    committed: end.saturating_sub(waiting),
                    lag: waiting.min(end),
                })
                .collect();
            if let Some(g) = group
                && !groups.iter().any(|x| x.group == g)
            {
                // A group that never read the stream has all of it to go.
                groups.push(GroupOffset {
                    group: g.to_string(),
                    committed: 0,
                    lag: end,
                });
            }
            out.push(TopicStats {
                topic: t,
                partitions: vec![PartitionStats {
                    partition: 0,
                    end_offset: end,
                    groups,
                }],
            });
        }
        crate::source::broker::filter_group(&mut out, group);
        Ok(out)
    }

    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        self.len(topic)?;
        let key = self.cfg.key(topic);
        for chunk in batch.chunks(1000) {
            let mut pipe = redis::pipe();
            for r in chunk {
                super::fits(r).map_err(SourceError::Invalid)?;
                let cmd = pipe.cmd("XADD").arg(&key);
                if let Some(n) = self.cfg.maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(n);
                }
                cmd.arg("*");
                for (n, v) in fields(r) {
                    cmd.arg(n).arg(v);
                }
                cmd.ignore();
            }
            // Not tried again on a lost answer: that could append twice.
            self.conns
                .once(&mut |c| pipe.query::<()>(c))
                .map_err(|e| error("appending", e))?;
        }
        Ok(())
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        Ok(vec![(0, self.len(topic)?)])
    }

    fn committed(&mut self, group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let end = self.len(topic)?;
        Ok(self
            .groups(topic)?
            .into_iter()
            .find(|(g, _)| g == group)
            .map_or(0, |(_, waiting)| end.saturating_sub(waiting)))
    }

    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let key = self.cfg.key(topic);
        let want = max.min(end.saturating_sub(from) as usize);
        if want == 0 {
            return Ok(Vec::new());
        }
        // From where the last page ended, or counted from the start.
        let (start, skip) = match self.cursor.remove(&(topic.to_string(), from)) {
            Some(last) => (format!("({last}"), 0),
            None => ("-".to_string(), from as usize),
        };
        let v: redis::Value = self.conns.with("reading a stream", |c| {
            redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(skip + want)
                .query(c)
        })?;
        let name: Arc<str> = Arc::from(topic);
        let got: Vec<Delivery> = entries(v)?
            .into_iter()
            .skip(skip)
            .enumerate()
            .filter_map(|(i, (id, r))| Some((i, id, r?)))
            .map(|(i, id, record)| {
                let offset = from + i as u64;
                self.cursor.insert((topic.to_string(), offset + 1), id);
                Delivery {
                    topic: name.clone(),
                    partition,
                    offset,
                    record,
                    redeliveries: 0,
                }
            })
            .collect();
        // Keep only the cursor at the page's end.
        let next = from + got.len() as u64;
        self.cursor.retain(|(t, o), _| t != topic || *o == next);
        Ok(got)
    }

    fn commit_offset(
        &mut self,
        _group: &str,
        _topic: &str,
        _partition: u32,
        _offset: u64,
    ) -> Result<(), SourceError> {
        Err(SourceError::Invalid(
            "a Redis consumer group moves by acking entries, not by offsets".into(),
        ))
    }

    fn take(&mut self, topic: &str, group: &str, max: usize) -> Result<Vec<Delivery>, SourceError> {
        self.settle_taken()?;
        self.len(topic)?;
        let key = self.cfg.key(topic);
        // One name for every `weir consume --group`: what a killed one took and did not ack
        // is read again first (its history), then new entries.
        let consumer = "weir-consume";
        let read = |c: &mut redis::Connection, id: &str| {
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(group)
                .arg(consumer)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&key)
                .arg(id)
                .query::<redis::Value>(c)
        };
        let v: redis::Value = self.conns.with("taking entries", |c| {
            match redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(group)
                .arg("0")
                .query::<()>(c)
            {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
                _ => {}
            }
            match read(c, "0")? {
                redis::Value::Array(s)
                    if matches!(s.first(), Some(redis::Value::Array(kv))
                        if matches!(kv.get(1), Some(redis::Value::Array(e)) if !e.is_empty())) =>
                {
                    Ok(redis::Value::Array(s))
                }
                _ => read(c, ">"),
            }
        })?;
        let name: Arc<str> = Arc::from(topic);
        let mut ids = Vec::new();
        let mut out = Vec::new();
        let got = match v {
            redis::Value::Array(mut s) => match s.pop() {
                Some(redis::Value::Array(mut kv)) if kv.len() == 2 => {
                    entries(kv.pop().expect("2"))?
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for (id, r) in got {
            ids.push(id);
            if let Some(record) = r {
                out.push(Delivery {
                    topic: name.clone(),
                    partition: 0,
                    offset: out.len() as u64,
                    record,
                    redeliveries: 0,
                });
            }
        }
        if !ids.is_empty() {
            self.taken = Some((key, group.to_string(), ids));
        }
        Ok(out)
    }

    fn settle_taken(&mut self) -> Result<(), SourceError> {
        let Some((key, group, ids)) = self.taken.take() else {
            return Ok(());
        };
        self.conns.with("acking what was printed", |c| {
            redis::cmd("XACK")
                .arg(&key)
                .arg(&group)
                .arg(&ids)
                .query::<()>(c)
        })
    }
}
