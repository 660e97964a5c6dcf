//! SQS for `weir topics`, `produce`, `consume` and `dlq`. A queue cannot be read without taking
//! its messages: `consume` without `--group` (and `dlq list`) receives every message, holding
//! them invisible while it runs, and makes them visible again when it ends (each counts a
//! receive). `consume --group` takes messages and deletes them once printed.

use super::client::{self, Outgoing, Received};
use super::{NAMING, SqsConfig, error};
use crate::source::broker::{Broker, DeadLetter, TopicSpec};
use crate::source::rt::Rt;
use crate::source::{
    Capabilities, Delivery, GroupOffset, Output, PartitionStats, Record, SourceError, TopicStats,
};
use aws_sdk_sqs::Client;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receives in a row with nothing new after which a read ends.
const STALE_RECEIVES: u32 = 3;

pub struct SqsBroker {
    pub(super) cfg: SqsConfig,
    pub(super) rt: Rt,
    pub(super) client: Client,
    /// A snapshot of a queue `read` took: (topic, its URL, the messages), held invisible.
    snapshot: Option<(String, String, Vec<Received>)>,
    /// What `take` took, to delete in `settle_taken`: (URL, handles).
    taken: Option<(String, Vec<String>)>,
    /// The dead letters `dead_letters` read: (URL, handle per position).
    letters: Option<(String, Vec<String>)>,
}

impl SqsBroker {
    pub fn connect(cfg: SqsConfig) -> Result<SqsBroker, SourceError> {
        let rt = Rt::new("weir-sqs").map_err(|e| error("starting the SQS runtime", e))?;
        let c = cfg.clone();
        let client = rt.run(async move { client::connect(&c).await })?;
        Ok(SqsBroker {
            cfg,
            rt,
            client,
            snapshot: None,
            taken: None,
            letters: None,
        })
    }

    pub(super) fn url(&self, topic: &str) -> Result<String, SourceError> {
        let (cl, name) = (self.client.clone(), self.cfg.queue(topic));
        self.rt
            .run(async move { client::queue_url(&cl, &name).await })?
            .ok_or_else(|| SourceError::UnknownTopic(topic.to_string()))
    }

    fn depth(&self, topic: &str) -> Result<u64, SourceError> {
        let url = self.url(topic)?;
        let cl = self.client.clone();
        let attrs = self
            .rt
            .run(async move { client::attributes(&cl, &url).await })?;
        Ok(client::depth(&attrs))
    }

    /// Receives until a receive comes back empty or `max` messages are held, each held for
    /// `hold` and held again before that runs out while the read goes on (a long read of a big
    /// queue outlasts one hold: what it read first would come back, be read twice, and crowd
    /// out what it never reached). A message read twice counts once, under its newest handle.
    fn receive_all(
        &self,
        url: &str,
        max: usize,
        hold: Duration,
    ) -> Result<Vec<Received>, SourceError> {
        let (cl, url) = (self.client.clone(), url.to_string());
        self.rt.run(async move {
            let mut out: Vec<Received> = Vec::new();
            let mut at: HashMap<String, usize> = HashMap::new();
            let mut held_since = Instant::now();
            // Receives in a row that brought nothing new (only messages whose hold ran out
            // and came back): the read has seen everything there is.
            let mut stale = 0;
            while out.len() < max && stale < STALE_RECEIVES {
                if held_since.elapsed() >= hold / 2 && !out.is_empty() {
                    let again: Vec<(String, Duration)> =
                        out.iter().map(|m| (m.handle.clone(), hold)).collect();
                    held_since = Instant::now();
                    // Refused (its hold ran out already) or failed: a message that comes
                    // back is read again and counted once.
                    match client::change_visibility(&cl, &url, &again).await {
                        Ok(refused) if refused.is_empty() => {}
                        Ok(refused) => {
                            tracing::debug!(refused = refused.len(), "SQS: some read messages were visible again before their hold was renewed")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "SQS: renewing the hold of read messages failed; some may be read twice (counted once)")
                        }
                    }
                }
                let got = client::retrying("receiving", || {
                    client::receive(
                        &cl,
                        &url,
                        (max - out.len()).min(10),
                        // A short poll samples only some of SQS's servers: a second's wait
                        // makes an empty answer mean an empty queue.
                        Duration::from_secs(1),
                        Some(hold),
                    )
                })
                .await?;
                if got.is_empty() {
                    break;
                }
                let before = out.len();
                for m in got {
                    match at.get(&m.id) {
                        Some(&i) => out[i].handle = m.handle,
                        None => {
                            at.insert(m.id.clone(), out.len());
                            out.push(m);
                        }
                    }
                }
                stale = if out.len() == before { stale + 1 } else { 0 };
            }
            Ok(out)
        })
    }

    /// Makes messages visible again.
    fn put_back(&self, url: String, mut handles: Vec<String>) {
        // (A replayed dead letter's handle is cleared: it was deleted.)
        handles.retain(|h| !h.is_empty());
        if handles.is_empty() {
            return;
        }
        let cl = self.client.clone();
        let back: Vec<(String, Duration)> =
            handles.into_iter().map(|h| (h, Duration::ZERO)).collect();
        if let Err(e) = self
            .rt
            .run(async move { client::change_visibility(&cl, &url, &back).await })
        {
            let hold = self.cfg.read_hold;
            tracing::warn!(error = %e, "SQS: could not make read messages visible again; they return after {hold:?}");
        }
    }

    fn send(&self, topic: &str, records: &[Record]) -> Result<(), SourceError> {
        let url = self.url(topic)?;
        let fifo = self.cfg.fifo;
        let msgs: Vec<Outgoing> = records
            .iter()
            .map(|r| {
                let dedupe = hex::encode(rand::random::<[u8; 16]>());
                Outgoing {
                    message: super::encode(r),
                    group: fifo.then(|| {
                        super::receive::group_id(r.key.as_deref()).unwrap_or(dedupe.clone())
                    }),
                    dedupe_id: fifo.then_some(dedupe),
                }
            })
            .collect();
        let cl = self.client.clone();
        self.rt
            .run(async move { client::send(&cl, &url, &msgs).await })
    }
}

fn delivery(topic: &Arc<str>, offset: u64, m: &Received) -> Delivery {
    Delivery {
        topic: topic.clone(),
        partition: 0,
        offset,
        record: m.record.clone(),
        redeliveries: m.receive_count - 1,
    }
}

impl Drop for SqsBroker {
    /// What was read and not taken is made visible again.
    fn drop(&mut self) {
        if let Some((_, url, msgs)) = self.snapshot.take() {
            self.put_back(url, msgs.into_iter().map(|m| m.handle).collect());
        }
        if let Some((url, handles)) = self.letters.take() {
            self.put_back(url, handles);
        }
        if let Some((url, handles)) = self.taken.take() {
            self.put_back(url, handles);
        }
    }
}

impl Broker for SqsBroker {
    fn name(&self) -> &'static str {
        "SQS"
    }

    fn capabilities(&self) -> Capabilities {
        self.cfg.capabilities(self.cfg.visibility)
    }

    fn request_reply(
        &mut self,
        topic: &str,
        request: Record,
        timeout: Duration,
    ) -> Option<Result<Option<Record>, SourceError>> {
        Some(self.request_over_sqs(topic, request, timeout))
    }

    fn create_topic_with(
        &mut self,
        topic: &str,
        partitions: u32,
        replication: Option<i32>,
        spec: &TopicSpec,
    ) -> Result<(), SourceError> {
        crate::source::broker::refuse_retention(self.name(), spec)?;
        if spec.max_priority.is_some() {
            return Err(SourceError::Invalid(
                "--max-priority: SQS queues have no message priorities; use two queues and \
                 weir run --priority"
                    .into(),
            ));
        }
        if !spec.fanout {
            return self.create_topic(topic, partitions, replication);
        }
        Err(SourceError::Invalid(format!(
            "--fanout on SQS: an SQS queue hands each message to one consumer; fan-out needs an \
             SNS topic with a queue per group subscribed to it, which weir does not manage: \
             create {topic} without --fanout for a work queue"
        )))
    }

    fn create_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        _replication: Option<i32>,
    ) -> Result<(), SourceError> {
        crate::source::broker::check_single_partition_topic(&NAMING, topic, partitions)?;
        let (cl, name, vis) = (
            self.client.clone(),
            self.cfg.queue(topic),
            self.cfg.visibility,
        );
        if !self
            .rt
            .run(async move { client::create_queue(&cl, &name, vis).await })?
        {
            return Err(SourceError::TopicExists(topic.to_string()));
        }
        Ok(())
    }

    fn delete_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        let url = self.url(topic)?;
        let cl = self.client.clone();
        self.rt.run(async move {
            cl.delete_queue()
                .queue_url(url)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| client::fault("deleting a queue", e).0)
        })
    }

    fn stats(
        &mut self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<TopicStats>, SourceError> {
        let topics = match topic {
            Some(t) => vec![t.to_string()],
            None => {
                let (cl, prefix) = (self.client.clone(), self.cfg.prefix.clone());
                let names = self
                    .rt
                    .run(async move { client::list(&cl, &prefix).await })?;
                names.iter().filter_map(|n| self.cfg.topic_of(n)).collect()
            }
        };
        let mut out = Vec::new();
        for t in topics {
            let depth = self.depth(&t)?;
            // A queue has no committed offsets: what waits in it is every group's lag.
            let groups = group
                .map(|g| GroupOffset {
                    group: g.to_string(),
                    committed: 0,
                    lag: depth,
                })
                .into_iter()
                .collect();
            out.push(TopicStats {
                topic: t,
                partitions: vec![PartitionStats {
                    partition: 0,
                    end_offset: depth,
                    groups,
                }],
            });
        }
        Ok(out)
    }

    fn append(&mut self, topic: &str, batch: Vec<Record>) -> Result<(), SourceError> {
        for r in &batch {
            super::check(r).map_err(SourceError::Invalid)?;
        }
        self.send(topic, &batch)
    }

    fn ends(&mut self, topic: &str) -> Result<Vec<(u32, u64)>, SourceError> {
        Ok(vec![(0, self.depth(topic)?)])
    }

    fn committed(
        &mut self,
        _group: &str,
        topic: &str,
        _partition: u32,
    ) -> Result<u64, SourceError> {
        self.url(topic)?;
        Ok(0)
    }

    /// Shows messages without taking them: the first read receives the whole queue (up to
    /// `end`) and holds it invisible until the command ends; reads go through that snapshot by
    /// position. A FIFO queue hands out no more of a group while some of it is held, so only
    /// `consume --group` reads one through.
    fn read(
        &mut self,
        topic: &str,
        _partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        if self.cfg.fifo {
            return Err(SourceError::Invalid(format!(
                "a FIFO queue cannot be read without taking its messages (SQS holds back a \
                 group's messages while any of it is received); take them with \
                 weir consume {topic} --group NAME"
            )));
        }
        if self.snapshot.as_ref().is_none_or(|(t, _, _)| t != topic) {
            if let Some((_, url, msgs)) = self.snapshot.take() {
                self.put_back(url, msgs.into_iter().map(|m| m.handle).collect());
            }
            let url = self.url(topic)?;
            let msgs = self.receive_all(&url, end as usize, self.cfg.read_hold)?;
            self.snapshot = Some((topic.to_string(), url, msgs));
        }
        let name: Arc<str> = Arc::from(topic);
        let (_, _, msgs) = self.snapshot.as_ref().expect("just taken");
        Ok(msgs
            .iter()
            .enumerate()
            .skip(from as usize)
            .take(max)
            .map(|(i, m)| delivery(&name, i as u64, m))
            .collect())
    }

    fn commit_offset(
        &mut self,
        _group: &str,
        _topic: &str,
        _partition: u32,
        _offset: u64,
    ) -> Result<(), SourceError> {
        Err(SourceError::Invalid(
            "an SQS queue has no offsets to commit".into(),
        ))
    }

    fn take(
        &mut self,
        topic: &str,
        _group: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, SourceError> {
        self.settle_taken()?;
        let url = self.url(topic)?;
        let got = self.receive_all(&url, max, self.cfg.read_hold)?;
        let name: Arc<str> = Arc::from(topic);
        let out = got
            .iter()
            .enumerate()
            .map(|(i, m)| delivery(&name, i as u64, m))
            .collect();
        self.taken = Some((url, got.into_iter().map(|m| m.handle).collect()));
        Ok(out)
    }

    fn settle_taken(&mut self) -> Result<(), SourceError> {
        let Some((url, handles)) = self.taken.take() else {
            return Ok(());
        };
        let cl = self.client.clone();
        let refused = self
            .rt
            .run(async move { client::delete(&cl, &url, &handles).await })?;
        if !refused.is_empty() {
            let why: Vec<String> = refused.into_iter().map(|(_, w)| w).collect();
            return Err(error("deleting what was printed", why.join("; ")));
        }
        Ok(())
    }

    /// Receives every message of the dead-letter queue, held invisible: a replayed one is
    /// deleted, the rest are made visible again when the command ends. Ids are positions in
    /// the queue as read, from 1.
    fn dead_letters(&mut self, dlq: &str) -> Result<Vec<DeadLetter>, SourceError> {
        if let Some((url, handles)) = self.letters.take() {
            self.put_back(url, handles);
        }
        // Until a receive comes back empty (the depth SQS reports is approximate).
        let url = self.url(dlq)?;
        let got = self.receive_all(&url, 100_000, self.cfg.read_hold)?;
        let name: Arc<str> = Arc::from(dlq);
        let out = got
            .iter()
            .enumerate()
            .map(|(i, m)| DeadLetter {
                id: (i + 1).to_string(),
                delivery: delivery(&name, i as u64 + 1, m),
                replayed: false,
            })
            .collect();
        self.letters = Some((url, got.into_iter().map(|m| m.handle).collect()));
        Ok(out)
    }

    /// Sends `outputs`, then deletes the dead letter.
    fn replay(
        &mut self,
        _dlq: &str,
        letter: &DeadLetter,
        outputs: Vec<Output>,
    ) -> Result<(), SourceError> {
        let found = self.letters.as_ref().and_then(|(url, handles)| {
            let i = (letter.delivery.offset as usize).checked_sub(1)?;
            Some((url.clone(), handles.get(i)?.clone()))
        });
        let Some((url, handle)) = found else {
            return Err(SourceError::Invalid(format!(
                "dead letter {} was not read by this command",
                letter.id
            )));
        };
        let mut by_topic: Vec<(String, Vec<Record>)> = Vec::new();
        for o in outputs {
            match by_topic.iter_mut().find(|(t, _)| *t == o.topic) {
                Some((_, v)) => v.push(o.record),
                None => by_topic.push((o.topic, vec![o.record])),
            }
        }
        for (t, records) in &by_topic {
            self.send(t, records)?;
        }
        let cl = self.client.clone();
        let refused = self
            .rt
            .run(async move { client::delete(&cl, &url, &[handle]).await })?;
        if !refused.is_empty() {
            let why: Vec<String> = refused.into_iter().map(|(_, w)| w).collect();
            return Err(error("deleting a replayed dead letter", why.join("; ")));
        }
        // Deleted: no longer to put back.
        if let Some((_, handles)) = self.letters.as_mut()
            && let Some(h) = handles.get_mut(letter.delivery.offset as usize - 1)
        {
            h.clear();
        }
        Ok(())
    }
}
