//! What `weir run` consumes through on JetStream: the group's durable pull consumer on each
//! topic's stream, per-message settling by ack subject.

use super::link::{self, REQUEST, RETRY_FOR};
use super::{NatsConfig, durable, error};
use crate::source::connect::ConsumerOptions;
use crate::source::receipts::Receipts;
use crate::source::rt::Rt;
use crate::source::{Capabilities, Commit, Delivery, Record, Source, SourceError};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// JetStream acks are by subject and outlive a connection: one generation.
const GEN: u64 = 0;

#[derive(Default)]
struct Queue {
    receipts: Receipts<jetstream::Message>,
    /// Pulled, not handed to the engine yet.
    buffer: VecDeque<jetstream::Message>,
    /// At-most-once: handed over, to ack before they run.
    acking: Vec<jetstream::Message>,
}

pub struct NatsSource {
    cfg: NatsConfig,
    opts: ConsumerOptions,
    rt: Rt,
    js: jetstream::Context,
    client: async_nats::Client,
    consumers: Mutex<HashMap<String, PullConsumer>>,
    queues: Mutex<HashMap<String, Queue>>,
    known: Mutex<HashSet<String>>,
    /// Per topic: when its stream was created (ns since the epoch), for output ids that do
    /// not outlive the stream, and the most messages its consumer lets one pull take.
    streams: Mutex<HashMap<String, (i128, usize)>>,
    /// The lease: the shortest `ack_wait` of the group's consumers (one made by another tool
    /// keeps its own).
    lease_ms: std::sync::atomic::AtomicU64,
    /// Per topic, since when its pulls have failed, if they do.
    pull_failing: Mutex<HashMap<String, Instant>>,
}

/// Connects on `rt` as `cfg` says (TLS, if asked for or if the server requires it).
pub(super) fn connect(rt: &Rt, cfg: &NatsConfig) -> Result<async_nats::Client, SourceError> {
    let cfg = cfg.clone();
    rt.run(async move {
        tokio::time::timeout(REQUEST, cfg.options().connect(cfg.url.as_str()))
            .await
            .map_err(|_| error("connecting", "no answer in 10 s"))?
            .map_err(|e| error("connecting", e))
    })
}

/// The JetStream context of `client` (made on `rt`: it starts a task).
pub(super) fn context(rt: &Rt, client: &async_nats::Client) -> jetstream::Context {
    let client = client.clone();
    rt.run(async move { jetstream::new(client) })
}

impl NatsSource {
    /// Connects, and makes the group's durable consumer on every consumed topic's stream where
    /// it is missing. (Requeue mode needs no retry stream: a retry is a delayed `NAK`.)
    pub fn start(cfg: NatsConfig, opts: &ConsumerOptions) -> Result<NatsSource, SourceError> {
        let rt = Rt::new("weir-nats").map_err(|e| error("starting the NATS runtime", e))?;
        let client = connect(&rt, &cfg)?;
        let js = context(&rt, &client);
        let cfg_ack_wait_ms = cfg.ack_wait.as_millis() as u64;
        let s = NatsSource {
            cfg,
            opts: opts.clone(),
            rt,
            js,
            client,
            consumers: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            streams: Mutex::new(HashMap::new()),
            lease_ms: std::sync::atomic::AtomicU64::new(cfg_ack_wait_ms),
            pull_failing: Mutex::new(HashMap::new()),
        };
        for t in &opts.topics {
            s.consumer(t)?;
        }
        Ok(s)
    }

    /// The group's durable consumer on `topic`'s stream, made if missing.
    fn consumer(&self, topic: &str) -> Result<PullConsumer, SourceError> {
        if let Some(c) = self.consumers.lock().expect("consumers").get(topic) {
            return Ok(c.clone());
        }
        let (js, stream, name, ack_wait) = (
            self.js.clone(),
            self.cfg.stream(topic),
            durable(&self.opts.group),
            self.cfg.ack_wait,
        );
        let t = topic.to_string();
        let (c, created) = self.rt.run(async move {
            let s = js
                .get_stream(&stream)
                .await
                .map_err(|_| SourceError::UnknownTopic(t.clone()))?;
            let created = s.cached_info().created.unix_timestamp_nanos();
            let c = s
                .get_or_create_consumer(
                    &name,
                    jetstream::consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait,
                        // weir dead-letters after --max-attempts; the broker never gives up first.
                        max_deliver: -1,
                        max_ack_pending: 100_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| error("making the group's consumer", e))?;
            Ok::<_, SourceError>((c, created))
        })?;
        // A consumer that existed keeps its own settings: renew within its ack_wait, pull no
        // more than it lets be unacked, and say where it would drop messages before weir's DLQ.
        let info = c.cached_info().config.clone();
        if !info.ack_wait.is_zero() {
            self.lease_ms.fetch_min(
                info.ack_wait.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if info.max_deliver > 0 {
            tracing::warn!(topic, consumer = %durable(&self.opts.group), max_deliver = info.max_deliver, "the group's consumer gives up on a message after max_deliver deliveries: set --max-attempts below it, or messages past it are dropped before weir dead-letters them");
        }
        let pull_max = if info.max_ack_pending > 0 {
            info.max_ack_pending as usize
        } else {
            usize::MAX
        };
        self.streams
            .lock()
            .expect("streams")
            .insert(topic.to_string(), (created, pull_max));
        self.known.lock().expect("known").insert(topic.to_string());
        self.consumers
            .lock()
            .expect("consumers")
            .insert(topic.to_string(), c.clone());
        Ok(c)
    }

    fn pull(&self, topic: &str, max: usize) -> Result<Vec<jetstream::Message>, SourceError> {
        let c = self.consumer(topic)?;
        let cap = self
            .streams
            .lock()
            .expect("streams")
            .get(topic)
            .map_or(usize::MAX, |s| s.1);
        let held = self
            .queues
            .lock()
            .expect("queues")
            .get(topic)
            .map_or(0, |q| q.receipts.held());
        let max = max.min(cap.saturating_sub(held)).max(1);
        let block = self.cfg.block;
        let got = self.rt.run(async move {
            // No wait for messages to come (`fetch` is a no-wait pull): the engine's loop waits
            // in this call, so a pull that waits out its expiry holds up finished jobs and
            // commits; an empty answer makes the engine poll again soon.
            let mut batch = c
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(|e| error("pulling messages", e))?;
            let mut out = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout(block + REQUEST, batch.next()).await {
                match m {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        if out.is_empty() {
                            return Err(error("pulling messages", e));
                        }
                        break;
                    }
                }
            }
            Ok(out)
        });
        // A pull that fails on a lost link comes up empty while async-nats reconnects: the
        // engine asks again soon, and what it holds is settled once the link is back. Past
        // RETRY_FOR the error is the run's; with the link up, past REQUEST (a consumer deleted,
        // a stream gone: not the link).
        let mut failing = self.pull_failing.lock().expect("pull_failing");
        match got {
            Ok(out) => {
                if failing.remove(topic).is_some() {
                    tracing::info!(topic, "NATS: pulling again");
                }
                Ok(out)
            }
            Err(e) => {
                let first = !failing.contains_key(topic);
                let since = *failing
                    .entry(topic.to_string())
                    .or_insert_with(Instant::now);
                let up = self.client.connection_state() == async_nats::connection::State::Connected;
                if since.elapsed() >= if up { REQUEST } else { RETRY_FOR } {
                    return Err(e);
                }
                if first {
                    tracing::warn!(topic, error = %e, "NATS: a pull failed; pulling again");
                }
                Ok(Vec::new())
            }
        }
    }

    /// Sends `kind` for each message, then flushes, so they are on their way when this returns;
    /// once more if the link broke meanwhile.
    fn reply(&self, msgs: Vec<jetstream::Message>, kind: AckKind) -> Result<(), SourceError> {
        if msgs.is_empty() {
            return Ok(());
        }
        let client = self.client.clone();
        let msgs: Vec<_> = msgs.into_iter().map(|m| (m, kind)).collect();
        self.rt
            .run(async move { link::reply(&client, &msgs, "acking", REQUEST).await })
    }
}

impl Source for NatsSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            lease: Some(Duration::from_millis(
                self.lease_ms.load(std::sync::atomic::Ordering::Relaxed),
            )),
            ..self.cfg.capabilities()
        }
    }

    fn partitions(&self, topic: &str) -> Result<u32, SourceError> {
        self.consumer(topic).map(|_| 1)
    }

    fn committed(&self, _group: &str, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let q = self.queues.lock().expect("queues");
        Ok(q.get(topic).map_or(0, |q| q.receipts.committed()))
    }

    /// This process's deliveries and buffer, plus what waits: not delivered yet, and held by
    /// other processes of the group.
    fn end_offset(&self, topic: &str, _partition: u32) -> Result<u64, SourceError> {
        let mut c = self.consumer(topic)?;
        let (pending, ack_pending) = self.rt.run(async move {
            let i = c
                .info()
                .await
                .map_err(|e| error("reading the consumer", e))?;
            Ok::<_, SourceError>((i.num_pending, i.num_ack_pending as u64))
        })?;
        let q = self.queues.lock().expect("queues");
        let (handed, mine) = q.get(topic).map_or((0, 0), |q| {
            let b = q.buffer.len() as u64;
            (q.receipts.next_seq() + b, q.receipts.held() as u64 + b)
        });
        Ok(handed + pending + ack_pending.saturating_sub(mine))
    }

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        _from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        let buffered = {
            let mut q = self.queues.lock().expect("queues");
            let q = q.entry(topic.to_string()).or_default();
            if q.receipts.check(GEN).is_err() {
                return Err(SourceError::Lost {
                    topic: topic.to_string(),
                });
            }
            (!q.buffer.is_empty()).then(|| self.hand_out(q, topic, partition, max, max_bytes))
        };
        if let Some(out) = buffered {
            self.forget(&out)?;
            return Ok(out);
        }
        let got = self.pull(topic, max.max(1))?;
        let out = {
            let mut q = self.queues.lock().expect("queues");
            let q = q.entry(topic.to_string()).or_default();
            q.buffer.extend(got);
            self.hand_out(q, topic, partition, max, max_bytes)
        };
        self.forget(&out)?;
        Ok(out)
    }

    fn commit(&self, _group: &str, commit: Commit) -> Result<(), SourceError> {
        if !commit.replayed.is_empty() || !commit.dedupe_done.is_empty() {
            return Err(SourceError::Invalid(
                "replay marks and dedupe marks are not kept on NATS".into(),
            ));
        }
        // The messages to ack and to NAK with a delay, per topic.
        let mut acks: BTreeMap<String, (Vec<u64>, Vec<jetstream::Message>)> = BTreeMap::new();
        let mut naks: Vec<(jetstream::Message, Duration)> = Vec::new();
        let mut delayed_seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        if !self.opts.at_most_once {
            let mut by: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (t, _, seq) in &commit.settled {
                by.entry(t).or_default().push(*seq);
            }
            let mut q = self.queues.lock().expect("queues");
            for (t, seqs) in by {
                let r = q
                    .entry(t.to_string())
                    .or_default()
                    .receipts
                    .get(GEN, &seqs)
                    .map_err(|_| SourceError::Lost {
                        topic: t.to_string(),
                    })?;
                acks.insert(
                    t.to_string(),
                    (seqs, r.into_iter().map(|(_, m)| m).collect()),
                );
            }
            for (t, _, seq, delay) in &commit.delayed {
                let r = q
                    .entry(t.to_string())
                    .or_default()
                    .receipts
                    .get(GEN, &[*seq])
                    .map_err(|_| SourceError::Lost {
                        topic: t.to_string(),
                    })?;
                naks.extend(r.into_iter().map(|(_, m)| (m, *delay)));
                delayed_seqs.entry(t.to_string()).or_default().push(*seq);
            }
        }
        let ids = self.output_ids(&commit.outputs, &commit.origins);
        // Outputs first, each stored (the publish ack) before any input is acked; both sent
        // again across a lost link (link.rs).
        let (js, client) = (self.js.clone(), self.client.clone());
        let prefix = self.cfg.prefix.clone();
        let outputs = commit.outputs;
        let resend = !self.opts.at_most_once;
        let all: Vec<jetstream::Message> = acks.values().flat_map(|(_, m)| m.clone()).collect();
        self.rt.run(async move {
            link::publish(&client, &js, &prefix, &outputs, &ids, resend).await?;
            // The acks, then the retries handed back (a NAK with the backoff as its delay).
            let mut settle: Vec<_> = all.into_iter().map(|m| (m, AckKind::Ack)).collect();
            settle.extend(naks.into_iter().map(|(m, d)| (m, AckKind::Nak(Some(d)))));
            link::reply(&client, &settle, "acking", RETRY_FOR).await
        })?;
        let mut q = self.queues.lock().expect("queues");
        for (t, (seqs, _)) in acks {
            q.entry(t).or_default().receipts.settle(seqs);
        }
        for (t, seqs) in delayed_seqs {
            q.entry(t).or_default().receipts.settle(seqs);
        }
        Ok(())
    }

    fn topic_exists(&self, topic: &str) -> bool {
        if self.known.lock().expect("known").contains(topic) {
            return true;
        }
        let (js, stream) = (self.js.clone(), self.cfg.stream(topic));
        let ok = self
            .rt
            .run(async move { js.get_stream(&stream).await.is_ok() });
        if ok {
            self.known.lock().expect("known").insert(topic.to_string());
        }
        ok
    }

    fn fits(&self, record: &Record) -> Result<(), String> {
        super::fits(record)
    }

    fn ensure_topic(&self, topic: &str, _partitions: u32) -> Result<(), SourceError> {
        if self.topic_exists(topic) {
            return Ok(());
        }
        let (js, cfg) = (self.js.clone(), self.cfg.clone());
        let t = topic.to_string();
        self.rt
            .run(async move { super::broker::create_stream(&js, &cfg, &t, true).await })?;
        self.known.lock().expect("known").insert(topic.to_string());
        Ok(())
    }

    fn dedupe_done(&self, _group: &str, _key: &[u8], _now_ms: u64) -> Result<bool, SourceError> {
        Err(SourceError::Invalid(
            "--dedupe on NATS needs a shared store: add --dedupe-store redis://host:port".into(),
        ))
    }

    fn evict_dedupe(&self, _now_ms: u64, _max: usize) -> Result<usize, SourceError> {
        Ok(0)
    }

    /// `NAK`s (no delay) what the ended partition held or pulled and did not run: the broker
    /// delivers them again at once, to this process or another.
    fn release(&self, topic: &str, _partition: u32) {
        let back: Vec<jetstream::Message> = {
            let mut q = self.queues.lock().expect("queues");
            let q = q.entry(topic.to_string()).or_default();
            let mut back = q.receipts.release(GEN);
            back.extend(q.buffer.drain(..));
            back
        };
        if self.opts.at_most_once {
            return;
        }
        if let Err(e) = self.reply(back, AckKind::Nak(None)) {
            tracing::warn!(topic, error = %e, "handing back held messages failed; they return after ack-wait");
        }
    }

    /// `+WPI` (in progress) for the held messages and those pulled but not handed over yet.
    fn extend(&self, topic: &str, _partition: u32, offsets: &[u64]) -> Result<(), SourceError> {
        let msgs: Vec<jetstream::Message> = {
            let q = self.queues.lock().expect("queues");
            q.get(topic).map_or(Vec::new(), |q| {
                q.receipts
                    .peek(GEN, offsets)
                    .into_iter()
                    .map(|(_, m)| m)
                    .chain(q.buffer.iter().cloned())
                    .collect()
            })
        };
        self.reply(msgs, AckKind::Progress)
    }
}

impl NatsSource {
    /// At-most-once: the messages handed over are acked (and the ack confirmed by the server)
    /// before they run, so the broker never delivers them again.
    fn forget(&self, out: &[Delivery]) -> Result<(), SourceError> {
        if !self.opts.at_most_once || out.is_empty() {
            return Ok(());
        }
        let msgs: Vec<jetstream::Message> = {
            let mut q = self.queues.lock().expect("queues");
            let q = q.entry(out[0].topic.to_string()).or_default();
            std::mem::take(&mut q.acking)
        };
        self.rt.run(async move {
            for m in &msgs {
                tokio::time::timeout(REQUEST, m.double_ack())
                    .await
                    .map_err(|_| error("acking (at-most-once)", "no answer in 10 s"))?
                    .map_err(|e| error("acking (at-most-once)", e))?;
            }
            Ok(())
        })
    }

    /// Each output's `Nats-Msg-Id`: the stream and sequence of the message it came from and
    /// its place among that message's outputs, so an output published again (the message ran
    /// again after a crash or a lost ack) is dropped by JetStream's duplicate window. `None`
    /// where the origin is not known (or not held any more).
    fn output_ids(
        &self,
        outputs: &[crate::source::Output],
        origins: &[Option<(Arc<str>, u64)>],
    ) -> Vec<Option<String>> {
        if origins.len() != outputs.len() {
            return vec![None; outputs.len()];
        }
        let group = durable(&self.opts.group);
        let streams = self.streams.lock().expect("streams").clone();
        let q = self.queues.lock().expect("queues");
        let mut nth: HashMap<(&str, u64), usize> = HashMap::new();
        origins
            .iter()
            .map(|origin| {
                let (t, off) = origin.as_ref()?;
                let n = nth.entry((t, *off)).or_default();
                let place = *n;
                *n += 1;
                let m = q.get(&**t)?.receipts.peek(GEN, &[*off]).pop()?.1;
                let info = m.info().ok()?;
                let created = streams.get(&**t)?.0;
                // The group too: two groups' outputs of one message are not duplicates; and
                // the stream's creation, whose sequence numbers start again if it is made anew.
                Some(format!(
                    "{group}:{}@{created}:{}:{place}",
                    info.stream, info.stream_sequence
                ))
            })
            .collect()
    }

    fn hand_out(
        &self,
        q: &mut Queue,
        topic: &str,
        partition: u32,
        max: usize,
        max_bytes: usize,
    ) -> Vec<Delivery> {
        let name: Arc<str> = Arc::from(topic);
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && (out.is_empty() || bytes < max_bytes) {
            let Some(m) = q.buffer.pop_front() else { break };
            let (delivered, published) = m
                .info()
                .map(|i| {
                    let ms = (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                    (i.delivered.max(1) as u32, Some(ms))
                })
                .unwrap_or((1, None));
            let record = super::record(&m.payload, m.headers.as_ref(), published);
            bytes += crate::source::wire_size(&record);
            let seq = if self.opts.at_most_once {
                q.acking.push(m);
                q.receipts.issue_settled()
            } else {
                q.receipts.issue(GEN, m)
            };
            out.push(Delivery {
                topic: name.clone(),
                partition,
                offset: seq,
                record,
                redeliveries: delivered - 1,
            });
        }
        out
    }
}
