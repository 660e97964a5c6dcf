//! The tests' SQS: moto's server (`WEIR_TEST_SQS`, default http://127.0.0.1:4566; started by
//! scripts/services.sh), queue names under a prefix of the test's own, reached by weir through
//! a relay so a test can cut its links. The harness talks to it with the AWS SDK for Rust, a
//! client that is not weir.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;

pub const REGION: &str = "us-east-1";

/// A queue-name prefix made for one test (`--source-property prefix=...`); its queues are
/// deleted after.
pub struct SqsNs {
    pub prefix: String,
    /// Every queue is FIFO (`--source-property fifo=true`).
    pub fifo: bool,
    pub relay: crate::Relay,
}

impl SqsNs {
    pub fn new(fifo: bool) -> SqsNs {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let server = SqsNs::endpoint();
        let server = server.rsplit('/').next().unwrap_or(&server).to_string();
        SqsNs {
            prefix: format!("wt{}-{n}-{}-", std::process::id(), crate::now_ms()),
            fifo,
            relay: crate::Relay::new(&server),
        }
    }

    /// moto's address.
    pub fn endpoint() -> String {
        std::env::var("WEIR_TEST_SQS").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
    }

    /// The endpoint weir is given: the relay's.
    pub fn weir_endpoint(&self) -> String {
        format!("http://{}", self.relay.addr())
    }

    /// The environment a weir command gets: the endpoint, a region and moto's fake keys.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_SQS", self.weir_endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Runs `f` with a client of the harness's own, straight to moto.
    pub fn with<T>(f: impl AsyncFnOnce(Client) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let creds = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test");
            use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(Provider::Rustls(CryptoMode::Ring))
                .build_https();
            let conf = aws_sdk_sqs::Config::builder()
                .http_client(http)
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new(REGION))
                .endpoint_url(SqsNs::endpoint())
                .credentials_provider(creds)
                .build();
            f(Client::from_conf(conf)).await
        })
    }

    /// The queue of `topic`.
    pub fn queue(&self, topic: &str) -> String {
        if self.fifo {
            format!("{}{topic}.fifo", self.prefix)
        } else {
            format!("{}{topic}", self.prefix)
        }
    }

    /// The URL of `topic`'s queue.
    pub fn url(&self, topic: &str) -> String {
        let name = self.queue(topic);
        SqsNs::with(async move |c| {
            c.get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .unwrap_or_else(|e| panic!("no queue {name}: {e}"))
                .queue_url()
                .expect("a URL")
                .to_string()
        })
    }

    /// (visible, in flight) messages of `topic`'s queue. Once nothing is in flight, what a
    /// killed consumer held is visible again.
    pub fn counts(&self, topic: &str) -> (u64, u64) {
        let url = self.url(topic);
        SqsNs::with(async move |c| {
            let o = c
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .expect("the queue's attributes");
            let a = o.attributes().expect("attributes");
            let n = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
            (
                n(QueueAttributeName::ApproximateNumberOfMessages),
                n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    + n(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            )
        })
    }
}

impl Drop for SqsNs {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let _ = std::panic::catch_unwind(|| {
            SqsNs::with(async move |c| {
                let Ok(o) = c.list_queues().queue_name_prefix(&prefix).send().await else {
                    return;
                };
                for u in o.queue_urls() {
                    let _ = c.delete_queue().queue_url(u).send().await;
                }
            })
        });
    }
}
