//! JetStream for `weir topics`, `produce`, `consume` and `dlq`: a topic's stream read by
//! position (offset = sequence − the stream's first sequence) with a short-lived ordered
//! consumer, appended with acked publishes, taken from by a group's durable consumer.

use super::consumer::{connect, context};
use super::{NatsConfig, durable, error};
use crate::source::broker::Broker;
use crate::source::rt::Rt;
use crate::source::{
    Capabilities, Delivery, GroupOffset, PartitionStats, Record, SourceError, TopicStats,
};
use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Makes `topic`'s stream: file storage, its one subject. `Ok(false)`: it existed.
pub(super) async fn create_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    topic: &str,
    ok_if_exists: bool,
) -> Result<bool, SourceError> {
    let name = cfg.stream(topic);
    if js.get_stream(&name).await.is_ok() {
        return if ok_if_exists {
            Ok(false)
        } else {
            Err(SourceError::TopicExists(topic.to_string()))
        };
    }
    js.create_stream(jetstream::stream::Config {
        name,
        subjects: vec![cfg.subject(topic)],
        storage: jetstream::stream::StorageType::File,
        // Outputs published again (their message ran again after ack-wait) must fall in it.
        duplicate_window: (cfg.ack_wait * 4).max(Duration::from_secs(120)),
        ..Default::default()
    })
    .await
    .map_err(|e| error(&format!("creating the stream of `{topic}`"), e))?;
    Ok(true)
}

pub struct NatsBroker {
    cfg: NatsConfig,
    rt: Rt,
    js: jetstream::Context,
    client: async_nats::Client,
    /// What `take` took, to ack in `settle_taken`.
    taken: Vec<jetstream::Message>,
}

impl NatsBroker {
    pub fn connect(cfg: NatsConfig) -> Result<NatsBroker, SourceError> {
        let rt = Rt::new("weir-nats").map_err(|e| error("starting the NATS runtime", e))?;
        let client = connect(&rt, &cfg)?;
        Ok(NatsBroker {
            js: context(&rt, &client),
            client,
            rt,
            cfg,
            taken: Vec::new(),
        })
    }

    /// (first sequence, messages) of `topic`'s stream.
    fn state(&self, topic: &str) -> Result<(u64, u64), SourceError> {
        let (js, name, t) = (self.js.clone(), self.cfg.stream(topic), topic.to_string());
        self.rt.run(async move {
            let mut s = js
                .get_stream(&name)
                .await
                .map_err(|_| SourceError::UnknownTopic(t))?;
            let i = s.info().await.map_err(|e| error("reading a stream", e))?;
            Ok((i.state.first_sequence, i.state.messages))
        })
    }

    /// Per durable consumer of `topic`: (group name, messages not acked yet).
    fn groups(&self, topic: &str) -> Result<Vec<(String, u64)>, SourceError> {
        let (js, name) = (self.js.clone(), self.cfg.stream(topic));
        self.rt.run(async move {
            let s = js
                .get_stream(&name)
                .await
                .map_err(|e| error("reading a stream", e))?;
            let mut infos = s.consumers();
            let mut out = Vec::new();
            while let Some(i) = infos.next().await {
                let i = i.map_err(|e| error("listing consumers", e))?;
                if let Some(d) = i.config.durable_name.clone() {
                    out.push((d, i.num_pending + i.num_ack_pending as u64));
                }
            }
            Ok(out)
        })
    }
}

impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        "NATS"
    }

    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities()
    }

    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        _replication: Option<i32>,
    ) -> Result<(), SourceError> {
        crate::source::broker::check_single_partition_topic(&super::NAMING, topic, partitions)?;
        let (js, cfg, t) = (self.js.clone(), self.cfg.clone(), topic.to_string());
        self.rt
            .run(async move { create_stream(&js, &cfg, &t, false).await })
            .map(|_| ())
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        self.state(topic)?;
        let (js, name) = (self.js.clone(), self.cfg.stream(topic));
        self.rt.run(async move {
            js.delete_stream(&name)
                .await
                .map(|_| ())
                .map_err(|e| error("deleting a stream", e))
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
                let (js, prefix) = (self.js.clone(), self.cfg.prefix.clone());
                let stream_prefix = prefix.replace('.', "_");
                self.rt.run(async move {
                    let mut names = js.streams();
                    let mut out = Vec::new();
                    while let Some(i) = names.next().await {
                        let i = i.map_err(|e| error("listing streams", e))?;
                        if !i.config.name.starts_with(&stream_prefix) {
                            continue;
                        }
                        if let Some(s) = i.config.subjects.first()
                            && let Some(t) = s.strip_prefix(&prefix)
                        {
                            out.push(t.to_string());
                        }
                    }
                    out.sort();
                    Ok::<_, SourceError>(out)
                })?
            }
        };
        let mut out = Vec::new();
        for t in topics {
            let (_, end) = self.state(&t)?;
            let mut groups: Vec<GroupOffset> = self
                .groups(&t)?
                .into_iter()
                .map(|(g, waiting)| GroupOffset {
                    group: g,
                    committed: end.saturating_sub(waiting),
                    lag: waiting.min(end),
                })
                .collect();
            if let Some(g) = group
                && !groups.iter().any(|x| x.group == durable(g))
            {
                groups.push(GroupOffset {
                    group: g.to_string(),
                    committed: 0,
                    lag: end,
                });
            }
            if let Some(g) = group {
                // Reported under the name the user gave.
                for x in &mut groups {
                    if x.group == durable(g) {
                        x.group = g.to_string();
                    }
                }
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
        self.state(topic)?;
        for r in &batch {
            super::fits(r).map_err(SourceError::Invalid)?;
        }
        let (js, subject) = (self.js.clone(), self.cfg.subject(topic));
        self.rt.run(async move {
            for chunk in batch.chunks(1000) {
                let mut acks = Vec::with_capacity(chunk.len());
                for r in chunk {
                    acks.push(
                        js.publish_with_headers(
                            subject.clone(),
                            super::headers(r, &[]),
                            r.payload.clone().into(),
                        )
                        .await
                        .map_err(|e| error("appending", e))?,
                    );
                }
                for a in acks {
                    a.await.map_err(|e| error("appending", e))?;
                }
            }
            Ok(())
        })
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        Ok(vec![(0, self.state(topic)?.1)])
    }

    fn committed(&mut self, group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let (_, end) = self.state(topic)?;
        Ok(self
            .groups(topic)?
            .into_iter()
            .find(|(g, _)| *g == durable(group))
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
        let want = max.min(end.saturating_sub(from) as usize);
        if want == 0 {
            return Ok(Vec::new());
        }
        let (first, _) = self.state(topic)?;
        let (js, name) = (self.js.clone(), self.cfg.stream(topic));
        let t: Arc<str> = Arc::from(topic);
        self.rt.run(async move {
            let s = js
                .get_stream(&name)
                .await
                .map_err(|e| error("reading a stream", e))?;
            // An ephemeral consumer from the sequence at `from`, no acks, gone after use.
            let c: consumer::PullConsumer = s
                .create_consumer(consumer::pull::Config {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: first.max(1) + from,
                    },
                    ack_policy: consumer::AckPolicy::None,
                    inactive_threshold: Duration::from_secs(10),
                    ..Default::default()
                })
                .await
                .map_err(|e| error("reading a stream", e))?;
            let mut out = Vec::with_capacity(want);
            while out.len() < want {
                let mut batch = c
                    .batch()
                    .max_messages(want - out.len())
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|e| error("reading a stream", e))?;
                let before = out.len();
                while let Some(Ok(m)) = batch.next().await {
                    let info = m.info().ok();
                    let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
                    let ms = info
                        .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64);
                    out.push(Delivery {
                        topic: t.clone(),
                        partition,
                        offset: seq.saturating_sub(first.max(1)),
                        record: super::record(&m.payload, m.headers.as_ref(), ms),
                        redeliveries: 0,
                    });
                }
                if out.len() == before {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn commit_offset(
        &mut self,
        _group: &str,
        _topic: &str,
        _partition: u32,
        _offset: u64,
    ) -> Result<(), SourceError> {
        Err(SourceError::Invalid(
            "a JetStream consumer moves by acking messages, not by offsets".into(),
        ))
    }

    fn take(&mut self, topic: &str, group: &str, max: usize) -> Result<Vec<Delivery>, SourceError> {
        self.settle_taken()?;
        self.state(topic)?;
        let (js, name, d) = (self.js.clone(), self.cfg.stream(topic), durable(group));
        let cfg = self.cfg.clone();
        let got = self.rt.run(async move {
            let s = js
                .get_stream(&name)
                .await
                .map_err(|e| error("reading a stream", e))?;
            let c: consumer::PullConsumer = s
                .get_or_create_consumer(
                    &d,
                    consumer::pull::Config {
                        durable_name: Some(d.clone()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: cfg.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: 100_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| error("making the group's consumer", e))?;
            let mut batch = c
                .batch()
                .max_messages(max)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|e| error("taking messages", e))?;
            let mut out = Vec::new();
            while let Some(Ok(m)) = batch.next().await {
                out.push(m);
            }
            Ok::<_, SourceError>(out)
        })?;
        let t: Arc<str> = Arc::from(topic);
        let out = got
            .iter()
            .enumerate()
            .map(|(i, m)| Delivery {
                topic: t.clone(),
                partition: 0,
                offset: i as u64,
                record: super::record(&m.payload, m.headers.as_ref(), None),
                redeliveries: 0,
            })
            .collect();
        self.taken = got;
        Ok(out)
    }

    fn settle_taken(&mut self) -> Result<(), SourceError> {
        let taken = std::mem::take(&mut self.taken);
        if taken.is_empty() {
            return Ok(());
        }
        let client = self.client.clone();
        self.rt.run(async move {
            for m in &taken {
                m.ack_with(AckKind::Ack)
                    .await
                    .map_err(|e| error("acking what was printed", e))?;
            }
            tokio::time::timeout(Duration::from_secs(10), client.flush())
                .await
                .map_err(|_| error("acking", "no answer for 10 s"))?
                .map_err(|e| error("acking", e))
        })
    }
}
