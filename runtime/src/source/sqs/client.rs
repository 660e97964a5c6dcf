//! The SQS calls weir makes, over the AWS SDK: connecting the way AWS tools do, and batched
//! sends, deletes and visibility changes that check each entry's answer.

use super::encode::{Attr, Encoded};
use super::{SqsConfig, error};
use crate::source::{Record, SourceError};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a call that fails on the link (no answer, a refused connection, a 5xx) is tried
/// again before the run gives up: a lost link costs a reconnect, not the run.
pub(super) const RETRY_FOR: Duration = Duration::from_secs(60);

/// A client as `cfg` and the AWS environment say. Its HTTPS is rustls on ring; each attempt of
/// a call is bounded (aws-sdk-rust issue 1094: a receive can hang past its wait).
pub(super) async fn connect(cfg: &SqsConfig) -> Result<Client, SourceError> {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(r) = &cfg.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(SourceError::Invalid(format!(
            "--source {}: no AWS region; pass sqs://REGION, or set AWS_REGION (or a region in \
             your AWS profile)",
            cfg.url
        )));
    }
    // Credentials now, so that none found is one clear error rather than a minute of retries.
    use aws_sdk_sqs::config::ProvideCredentials;
    let found = match shared.credentials_provider() {
        Some(p) => p
            .provide_credentials()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => Err("no credentials provider".to_string()),
    };
    if let Err(why) = found {
        return Err(SourceError::Invalid(format!(
            "--source {}: no AWS credentials ({why}); set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a local server such as moto takes any keys)",
            cfg.url
        )));
    }
    let timeouts = aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(cfg.wait + Duration::from_secs(10))
        .build();
    let conf = aws_sdk_sqs::config::Builder::from(&shared)
        .timeout_config(timeouts)
        .build();
    Ok(Client::from_conf(conf))
}

/// An SDK error, with its whole chain (the service's code and message, or why the link broke),
/// and whether trying again can help (the link, a timeout, the service's 5xx or throttling).
pub(super) fn fault<E>(
    what: &str,
    e: SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
) -> (SourceError, bool)
where
    E: std::error::Error + aws_sdk_sqs::error::ProvideErrorMetadata + Send + Sync + 'static,
{
    let transient = match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            // The service's own failures (5xx, `InternalFailure`), throttling (429 and its
            // codes) and too many messages in flight (`OverLimit`) pass; the rest (no such
            // queue, no permission, a bad request) do not.
            let status = s.raw().status().as_u16();
            let code = s.err().code().unwrap_or("");
            status >= 500
                || status == 429
                || code.contains("Throttl")
                || code.contains("InternalFailure")
                || code.contains("InternalError")
                || code.contains("ServiceUnavailable")
                || code.contains("OverLimit")
        }
        _ => false,
    };
    (error(what, DisplayErrorContext(&e)), transient)
}

/// Runs `call` until it succeeds, fails for good, or has failed on the link for `RETRY_FOR`.
pub(super) async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, (SourceError, bool)>>,
{
    let start = Instant::now();
    let mut warned = false;
    loop {
        match call().await {
            Ok(t) => {
                if warned {
                    tracing::info!("SQS: {what} works again");
                }
                return Ok(t);
            }
            Err((e, true)) if start.elapsed() < RETRY_FOR => {
                if !warned {
                    tracing::warn!(error = %e, "SQS: {what} failed; trying again for up to 60 s");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The URL of queue `name`; `None` when it does not exist.
pub(super) async fn queue_url(client: &Client, name: &str) -> Result<Option<String>, SourceError> {
    retrying("looking up a queue", || async {
        match client.get_queue_url().queue_name(name).send().await {
            Ok(o) => Ok(o.queue_url().map(str::to_string)),
            Err(SdkError::ServiceError(s)) if s.err().is_queue_does_not_exist() => Ok(None),
            Err(e) => Err(fault(&format!("looking up queue {name}"), e)),
        }
    })
    .await
}

/// Every attribute of the queue at `url`, by name.
pub(super) async fn attributes(
    client: &Client,
    url: &str,
) -> Result<HashMap<String, String>, SourceError> {
    retrying("reading a queue's attributes", || async {
        let o = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| fault("reading a queue's attributes", e))?;
        Ok(o.attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    })
    .await
}

/// Messages waiting in a queue, as KEDA's aws-sqs scaler counts them: visible, in flight and
/// delayed.
pub(super) fn depth(attrs: &HashMap<String, String>) -> u64 {
    [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    .iter()
    .filter_map(|k| attrs.get(*k)?.parse::<u64>().ok())
    .sum()
}

/// A message as received.
#[derive(Debug, Clone)]
pub(super) struct Received {
    pub handle: String,
    pub id: String,
    /// A FIFO queue's message group.
    pub group: Option<String>,
    pub receive_count: u32,
    pub record: Record,
}

/// One receive: up to `max` (10 at most) messages, waiting up to `wait` for the first;
/// `visibility` overrides the queue's for these.
pub(super) async fn receive(
    client: &Client,
    url: &str,
    max: usize,
    wait: Duration,
    visibility: Option<Duration>,
) -> Result<Vec<Received>, (SourceError, bool)> {
    let o = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10) as i32)
        .wait_time_seconds(wait.as_secs() as i32)
        .set_visibility_timeout(visibility.map(|v| v.as_secs().max(1) as i32))
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .map_err(|e| fault("receiving", e))?;
    Ok(o.messages()
        .iter()
        .filter_map(|m| {
            let sys = m.attributes();
            let get = |k: MessageSystemAttributeName| sys.and_then(|a| a.get(&k));
            let count = get(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1u32);
            let sent = get(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse().ok());
            let attrs = m.message_attributes().into_iter().flatten().map(|(n, v)| {
                let a = match (v.string_value(), v.binary_value()) {
                    (Some(s), _) => Attr::Text(s.to_string()),
                    (None, Some(b)) => Attr::Bytes(b.as_ref().to_vec()),
                    (None, None) => Attr::Text(String::new()),
                };
                (n.clone(), a)
            });
            let group = get(MessageSystemAttributeName::MessageGroupId).cloned();
            let mut record = super::decode(m.body().unwrap_or(""), attrs, sent);
            // A FIFO message from another producer carries its group, not `weir.key`: the group
            // is its key, so the engine keeps the group's order.
            if record.key.is_none() {
                record.key = group.as_ref().map(|g| g.as_bytes().to_vec());
            }
            Some(Received {
                handle: m.receipt_handle()?.to_string(),
                id: m.message_id().unwrap_or("").to_string(),
                group,
                receive_count: count.max(1),
                record,
            })
        })
        .collect())
}

/// One message to send: the record, and on a FIFO queue its group and deduplication id.
pub(super) struct Outgoing {
    pub message: Encoded,
    pub group: Option<String>,
    pub dedupe_id: Option<String>,
}

fn attribute(v: &Attr) -> MessageAttributeValue {
    let b = MessageAttributeValue::builder();
    match v {
        Attr::Text(s) => b.data_type("String").string_value(s),
        Attr::Bytes(x) => b.data_type("Binary").binary_value(Blob::new(x.clone())),
    }
    .build()
    .expect("the data type is set")
}

/// Sends `messages` to `url` in order, in batches of 10 (and 256 KiB); entries SQS fails on
/// its side are sent again, one it refuses fails the call.
pub(super) async fn send(
    client: &Client,
    url: &str,
    messages: &[Outgoing],
) -> Result<(), SourceError> {
    let mut start = 0;
    while start < messages.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < messages.len() && end - start < 10 {
            let size = messages[end].message.size();
            if end > start && bytes + size > super::MAX_MESSAGE_BYTES {
                break;
            }
            bytes += size;
            end += 1;
        }
        let mut left: Vec<usize> = (start..end).collect();
        let begun = Instant::now();
        while !left.is_empty() {
            let entries: Vec<SendMessageBatchRequestEntry> = left
                .iter()
                .map(|&i| {
                    let m = &messages[i];
                    let attrs: HashMap<String, MessageAttributeValue> = m
                        .message
                        .attributes
                        .iter()
                        .map(|(n, v)| (n.clone(), attribute(v)))
                        .collect();
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&m.message.body)
                        .set_message_attributes((!attrs.is_empty()).then_some(attrs))
                        .set_message_group_id(m.group.clone())
                        .set_message_deduplication_id(m.dedupe_id.clone())
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let sent = Instant::now();
            let o = retrying("sending messages", || {
                let entries = entries.clone();
                async move {
                    client
                        .send_message_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map_err(|e| fault("sending messages", e))
                }
            })
            .await?;
            tracing::debug!(entries = left.len(), failed = o.failed().len(), took = ?sent.elapsed(), "SQS send");
            let mut again = Vec::new();
            for f in o.failed() {
                if f.sender_fault() || begun.elapsed() > RETRY_FOR {
                    return Err(error(
                        "sending messages",
                        format!("{}: {}", f.code(), f.message().unwrap_or("")),
                    ));
                }
                if let Ok(i) = f.id().parse::<usize>() {
                    again.push(i);
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            left = again;
        }
        start = end;
    }
    Ok(())
}

/// What a batch call answers of each entry: those SQS failed, by entry id, with whether it
/// was the sender's fault and why.
type Failures = Vec<(usize, bool, String)>;

/// Runs a batch call over `n` entries in chunks of 10 (`call` gets the indices of a chunk,
/// each entry's id its index); entries SQS failed on its side are tried again for up to
/// `RETRY_FOR`. Returns the entries refused for good, by index, with the reason.
async fn batched<F, Fut>(n: usize, mut call: F) -> Result<Vec<(usize, String)>, SourceError>
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Result<Failures, SourceError>>,
{
    let mut refused = Vec::new();
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(10) {
        let mut left = chunk.to_vec();
        let begun = Instant::now();
        while !left.is_empty() {
            let failed = call(left.clone()).await?;
            let mut again = Vec::new();
            for (i, sender, why) in failed {
                if sender || begun.elapsed() > RETRY_FOR {
                    refused.push((i, why));
                } else {
                    again.push(i);
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            left = again;
        }
    }
    Ok(refused)
}

fn failures(failed: &[aws_sdk_sqs::types::BatchResultErrorEntry]) -> Failures {
    failed
        .iter()
        .filter_map(|f| {
            let i = f.id().parse::<usize>().ok()?;
            let why = format!("{}: {}", f.code(), f.message().unwrap_or(""));
            Some((i, f.sender_fault(), why))
        })
        .collect()
}

/// Deletes the messages of `handles` from `url`, in batches of 10. Returns the entries SQS
/// refused for good (a handle that is no longer valid: the message was received again
/// elsewhere after its visibility ran out), by index into `handles`, with the reason.
pub(super) async fn delete(
    client: &Client,
    url: &str,
    handles: &[String],
) -> Result<Vec<(usize, String)>, SourceError> {
    batched(handles.len(), |idx| async move {
        let entries: Vec<DeleteMessageBatchRequestEntry> = idx
            .iter()
            .map(|&i| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&handles[i])
                    .build()
                    .expect("id and handle are set")
            })
            .collect();
        let o = retrying("deleting messages", || {
            let entries = entries.clone();
            async move {
                client
                    .delete_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| fault("deleting messages", e))
            }
        })
        .await?;
        Ok(failures(o.failed()))
    })
    .await
}

/// Sets the visibility timeout of each message (by handle) to its duration (12 h at most),
/// in batches of 10. Returns the entries SQS refused, by index into `handles`, with the reason.
pub(super) async fn change_visibility(
    client: &Client,
    url: &str,
    handles: &[(String, Duration)],
) -> Result<Vec<(usize, String)>, SourceError> {
    batched(handles.len(), |idx| async move {
        let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = idx
            .iter()
            .map(|&i| {
                let (h, d) = &handles[i];
                let secs = d.as_secs_f64().ceil().min(43_200.0) as i32;
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(h)
                    .visibility_timeout(secs)
                    .build()
                    .expect("id and handle are set")
            })
            .collect();
        let o = retrying("changing visibility", || {
            let entries = entries.clone();
            async move {
                client
                    .change_message_visibility_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| fault("changing visibility", e))
            }
        })
        .await?;
        Ok(failures(o.failed()))
    })
    .await
}

/// Makes queue `name` (FIFO when it ends in `.fifo`) with `visibility`; `Ok(false)`: it
/// existed.
pub(super) async fn create_queue(
    client: &Client,
    name: &str,
    visibility: Duration,
) -> Result<bool, SourceError> {
    if queue_url(client, name).await?.is_some() {
        return Ok(false);
    }
    let mut req = client.create_queue().queue_name(name).attributes(
        QueueAttributeName::VisibilityTimeout,
        visibility.as_secs().to_string(),
    );
    if name.ends_with(".fifo") {
        req = req.attributes(QueueAttributeName::FifoQueue, "true");
    }
    retrying("creating a queue", || {
        let req = req.clone();
        async move {
            req.send()
                .await
                .map_err(|e| fault(&format!("creating queue {name}"), e))
        }
    })
    .await?;
    Ok(true)
}

/// The names of the queues whose names start with `prefix`.
pub(super) async fn list(client: &Client, prefix: &str) -> Result<Vec<String>, SourceError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut req = client.list_queues().max_results(1000);
        if !prefix.is_empty() {
            req = req.queue_name_prefix(prefix);
        }
        let o = req
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| fault("listing queues", e).0)?;
        out.extend(
            o.queue_urls()
                .iter()
                .filter_map(|u| u.rsplit('/').next().map(str::to_string)),
        );
        token = o.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    out.sort();
    Ok(out)
}
