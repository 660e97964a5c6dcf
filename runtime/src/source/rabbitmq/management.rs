//! Queue depth from RabbitMQ's management API (`--source-property management-url=...`), as
//! KEDA's RabbitMQ scaler reads it: ready and unacked messages of the whole queue, every
//! consumer's. AMQP's passive declare gives only the ready count, so without it weir adds the
//! messages it holds itself, and another consumer's unacked messages are not seen.
//!
//! The broker refreshes these figures every `collect_statistics_interval` (5 s by default):
//! they lag that much behind.

use super::broker_error;
use crate::source::SourceError;
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use std::time::Duration;

/// How long a question to the management API may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the management API answers, for one virtual host.
#[derive(Clone)]
pub struct Management {
    /// `host:port`.
    authority: String,
    /// `Basic ...`.
    auth: String,
    /// The virtual host, percent-encoded for a path.
    vhost: String,
}

impl std::fmt::Debug for Management {
    // Not the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("authority", &self.authority)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes `s` for one segment of a URL path.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Management {
    /// From `management-url` (`http://[user:pass@]host:port`); the credentials default to the
    /// AMQP URL's, and the virtual host is the AMQP URL's.
    pub fn parse(url: &str, amqp: &lapin::uri::AMQPUri) -> Result<Management, SourceError> {
        let shown = super::redact(url);
        let bad = |why: &str| {
            SourceError::Invalid(format!(
                "--source-property management-url={shown}: {why}; pass http://host:15672"
            ))
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => return Err(bad("https is not supported yet")),
            _ => return Err(bad("not an http:// URL")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("give the server only, without a path"));
        }
        let (user, pass, authority) = match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let (u, p) = cred.split_once(':').unwrap_or((cred, ""));
                (u.to_string(), p.to_string(), host.to_string())
            }
            None => (
                amqp.authority.userinfo.username.clone(),
                amqp.authority.userinfo.password.clone(),
                rest.to_string(),
            ),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        Ok(Management {
            authority,
            auth,
            vhost: segment(&amqp.vhost),
        })
    }

    /// (ready, unacked) of `queue`; `None` when the queue does not exist.
    pub async fn depth(&self, queue: &str) -> Result<Option<(u64, u64)>, SourceError> {
        let what = format!(
            "asking the management API at {} about {queue}",
            self.authority
        );
        tokio::time::timeout(TIMEOUT, self.get(queue))
            .await
            .map_err(|_| broker_error(&what, "no answer"))?
            .map_err(|e| broker_error(&what, e))
    }

    /// The queues bound to exchange `exchange` (a fanout topic's groups); `None` when the
    /// exchange does not exist.
    pub async fn bound_queues(&self, exchange: &str) -> Result<Option<Vec<String>>, SourceError> {
        let what = format!(
            "asking the management API at {} about exchange {exchange}",
            self.authority
        );
        let path = format!(
            "/api/exchanges/{}/{}/bindings/source",
            self.vhost,
            segment(exchange)
        );
        let v = tokio::time::timeout(TIMEOUT, self.get_json(&path))
            .await
            .map_err(|_| broker_error(&what, "no answer"))?
            .map_err(|e| broker_error(&what, e))?;
        Ok(v.map(|v| {
            let mut qs: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["destination_type"] == "queue")
                .filter_map(|b| b["destination"].as_str().map(str::to_string))
                .collect();
            qs.sort();
            qs.dedup();
            qs
        }))
    }

    async fn get(&self, queue: &str) -> Result<Option<(u64, u64)>, String> {
        // Only the two figures: a queue's whole record is large.
        let path = format!(
            "/api/queues/{}/{}?columns=messages_ready,messages_unacknowledged",
            self.vhost,
            segment(queue)
        );
        let Some(v) = self.get_json(&path).await? else {
            return Ok(None);
        };
        // A queue that has not been sampled yet has no figures: nothing counted.
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(Some((n("messages_ready"), n("messages_unacknowledged"))))
    }

    /// GETs `path` as JSON; `None` on 404.
    async fn get_json(&self, path: &str) -> Result<Option<serde_json::Value>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::AUTHORIZATION, &self.auth)
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        match status.as_u16() {
            200 => {}
            404 => return Ok(None),
            401 => return Err("refused the credentials (401)".into()),
            n => return Err(format!("answered {n}")),
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("not JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_urls_take_the_amqp_credentials_and_vhost_unless_given() {
        let amqp: lapin::uri::AMQPUri = "amqp://alice:s3cret@h:5672/orders%2Fprod".parse().unwrap();
        let m = Management::parse("http://mq:15672/", &amqp).unwrap();
        assert_eq!(m.authority, "mq:15672");
        assert_eq!(m.vhost, "orders%2Fprod");
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(m.auth, format!("Basic {}", b64.encode("alice:s3cret")));
        let m = Management::parse("http://bob:pw@mq:15672", &amqp).unwrap();
        assert_eq!(m.auth, format!("Basic {}", b64.encode("bob:pw")));
        for bad in [
            "https://mq:15672",
            "mq:15672",
            "http://mq:15672/api",
            "http://",
        ] {
            let e = Management::parse(bad, &amqp).unwrap_err().to_string();
            assert!(e.contains("management-url"), "{bad}: {e}");
        }
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}
