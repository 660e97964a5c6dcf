//! `fetch`: calls a downstream HTTP service for each message and emits its answer. It is what
//! most real handlers do (enrich a message from a service), and it waits on the network
//! without using a CPU, which is what running more instances helps with.
//!
//! Settings (`--handler-config`):
//! - `url`: the service, `http://HOST[:PORT]/PATH` (required). The request is
//!   `POST PATH?key=KEY` with the message's key, and its payload as the body.
//! - `out`: the topic the answer goes to [default: `out`].
//!
//! A 2xx answer's body is emitted under the message's key. A 5xx or 429 answer, or a request
//! that fails (connection refused, a host weir does not allow: `HTTP-request-denied`), is a
//! retry; another 4xx is a rejection.
//!
//! weir refuses every request unless the operator allows the host: `--allow-http HOST:PORT`.

use weir_guest::{Failure, Message, Outcome};

fn handle(msg: Message) -> Outcome {
    let url = weir_guest::config("url")
        .ok_or_else(|| Failure::reject("no `url` setting: pass --handler-config url=http://..."))?;
    let out = weir_guest::config("out").unwrap_or_else(|| "out".to_string());
    let key = msg.key.as_deref().unwrap_or_default();
    let (status, body) = post(&url, key, &msg.payload).map_err(Failure::retry)?;
    match status {
        200..=299 => weir_guest::emit(&out, msg.key.as_deref(), &body, &[]).map_err(Failure::retry),
        429 | 500..=599 => Err(Failure::retry(format!("{url} answered {status}"))),
        _ => Err(Failure::reject(format!("{url} answered {status}"))),
    }
}

/// Splits `http://authority/path` into its scheme, authority and path.
fn split(url: &str) -> Result<(bool, &str, &str), String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    };
    Ok(match rest.find('/') {
        Some(i) => (https, &rest[..i], &rest[i..]),
        None => (https, rest, "/"),
    })
}

/// Percent-encodes a query value.
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(target_arch = "wasm32")]
fn post(url: &str, key: &[u8], payload: &[u8]) -> Result<(u16, Vec<u8>), String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
    use wasip2::io::streams::StreamError;

    let (https, authority, path) = split(url)?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let path = format!("{path}{sep}key={}", encode(key));
    let headers = Fields::from_list(&[
        (
            "content-type".to_string(),
            b"application/octet-stream".to_vec(),
        ),
        // A known length, so the body is not sent chunked.
        (
            "content-length".to_string(),
            payload.len().to_string().into_bytes(),
        ),
    ])
    .map_err(|e| format!("headers: {e:?}"))?;
    let req = OutgoingRequest::new(headers);
    let scheme = if https { Scheme::Https } else { Scheme::Http };
    req.set_method(&Method::Post)
        .and(req.set_scheme(Some(&scheme)))
        .and(req.set_authority(Some(authority)))
        .and(req.set_path_with_query(Some(&path)))
        .map_err(|()| format!("cannot make a request for `{url}`"))?;
    let body = req.body().map_err(|()| "cannot write the request body")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{url}: {e:?}"))?;
    // A request refused or failed before its body was sent closes the body stream: the
    // response then carries the reason, which says more than the failed write.
    let written = (|| {
        let stream = body
            .write()
            .map_err(|()| "cannot write the request body".to_string())?;
        // At most 4096 bytes per blocking write.
        for chunk in payload.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("{url}: writing the body: {e:?}"))?;
        }
        drop(stream);
        OutgoingBody::finish(body, None).map_err(|e| format!("{url}: {e:?}"))
    })();
    // Blocks the guest; the host suspends this call and serves other instances meanwhile.
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("the response was not ready after waiting for it")?
        .map_err(|()| "the response was taken twice")?
        .map_err(|e| format!("{url}: {e:?}"))?;
    written?;
    let status = resp.status();
    let body = resp
        .consume()
        .map_err(|()| "cannot read the response body")?;
    let mut bytes = Vec::new();
    {
        let stream = body
            .stream()
            .map_err(|()| "cannot read the response body")?;
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("{url}: reading the body: {}", e.to_debug_string()));
                }
            }
        }
    }
    wasip2::http::types::IncomingBody::finish(body);
    Ok((status, bytes))
}

/// Off wasm (unit tests) there is no wasi:http.
#[cfg(not(target_arch = "wasm32"))]
fn post(url: &str, _key: &[u8], _payload: &[u8]) -> Result<(u16, Vec<u8>), String> {
    split(url)?;
    Err("wasi:http is only available inside weir".into())
}

weir_guest::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        assert_eq!(
            split("http://127.0.0.1:8080/lookup").unwrap(),
            (false, "127.0.0.1:8080", "/lookup")
        );
        assert_eq!(split("https://a.test").unwrap(), (true, "a.test", "/"));
        assert!(split("ftp://a.test").is_err());
        assert_eq!(encode(b"k-1 /x"), "k-1%20%2Fx");
    }
}
