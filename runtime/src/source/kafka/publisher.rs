//! The idempotent producer weir publishes outputs with (and `weir produce` appends with), and
//! the delivery reports it counts.

use super::admin::bad_config;
use super::{KafkaConfig, storage};
use crate::source::{Output, Record, SourceError};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Delivery reports of a producer: how many failed since they were last taken, and the first
/// failure's reason.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Delivered {
    /// The failures since the last call, if any.
    pub(crate) fn take_failures(&self) -> Option<(u64, String)> {
        let n = self.failed.swap(0, Ordering::SeqCst);
        let first = self.first.lock().expect("delivery lock").take();
        (n > 0).then(|| (n, first.unwrap_or_default()))
    }
}

impl ClientContext for Delivered {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log_librdkafka(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        super::error_librdkafka(&error, reason);
    }
}

impl ProducerContext for Delivered {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::SeqCst);
            self.first
                .lock()
                .expect("delivery lock")
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// An idempotent producer that knows when its messages were delivered.
pub struct Publisher {
    /// Its context counts the delivery reports.
    pub(crate) producer: BaseProducer<Delivered>,
}

/// How long delivery of one batch of outputs may take before it is an error (librdkafka
/// retries within it).
pub(crate) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

impl Publisher {
    pub(crate) fn new(cfg: &KafkaConfig, extra: &[(&str, &str)]) -> Result<Publisher, SourceError> {
        let mut defaults = vec![("linger.ms", "5"), ("message.timeout.ms", "110000")];
        defaults.extend_from_slice(extra);
        let mut c = cfg.client(&defaults);
        c.set("enable.idempotence", "true");
        let producer: BaseProducer<Delivered> = c
            .create_with_context(Delivered::default())
            .map_err(|e| bad_config(cfg, e))?;
        Ok(Publisher { producer })
    }

    fn failures(&self) -> Option<(u64, String)> {
        self.producer.context().take_failures()
    }

    /// Queues every record, waiting for room when librdkafka's queue is full.
    pub(crate) fn send_all<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> Result<(), SourceError> {
        for (topic, r) in records {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .payload(r.payload.as_slice())
                .headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(ts) = r.timestamp_ms {
                rec = rec.timestamp(ts as i64);
            }
            let deadline = Instant::now() + DELIVERY_TIMEOUT;
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        rec = back;
                        self.producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => return Err(storage(&format!("producing to {topic}"), e)),
                }
            }
        }
        Ok(())
    }

    /// Waits until everything queued was delivered; an error names how many failed and why.
    ///
    /// Not rdkafka's `flush`: it waits on the delivery reports in steps of 100 ms that a report
    /// does not cut short, so every flush took at least 100 ms even against a broker that
    /// answers in under one (measured: `POST /topics/T/request` on Kafka took 104 ms a call,
    /// all of it in `flush`). Here `rd_kafka_flush(0)` sends what lingers at once and says
    /// whether all is delivered; between asks, delivery reports are served for at most 1 ms.
    pub(crate) fn flush(&self) -> Result<(), SourceError> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            match self.producer.flush(Duration::ZERO) {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    if Instant::now() < deadline =>
                {
                    self.producer.poll(Duration::from_millis(1));
                }
                Err(e) => return Err(storage("waiting for delivery reports", e)),
            }
        }
        match self.failures() {
            None => Ok(()),
            Some((n, why)) => Err(storage(
                "delivery failed",
                format!("{n} message(s) were not delivered: {why}"),
            )),
        }
    }

    /// Publishes `outputs` and returns once all were delivered.
    pub(crate) fn publish(&self, outputs: &[&Output]) -> Result<(), SourceError> {
        self.send_all(outputs.iter().map(|o| (o.topic.as_str(), &o.record)))?;
        self.flush()
    }

    /// `weir produce`: appends records to `topic` and waits for their delivery.
    pub fn append(&self, topic: &str, records: &[Record]) -> Result<(), SourceError> {
        self.send_all(records.iter().map(|r| (topic, r)))?;
        self.flush()
    }
}
