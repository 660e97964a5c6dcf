//! Outgoing HTTP for handlers (`wasi:http/outgoing-handler`), refused unless allowed.
//!
//! The operator allows hosts with `--allow-http HOST[:PORT]` (repeatable). A request goes out
//! only when its host is on the list and, if the entry names a port, the request's port (80 for
//! `http`, 443 for `https` when the URL has none) is that port. Anything else is answered with
//! wasi:http's `HTTP-request-denied` error code, which the guest sees as an error from
//! `outgoing-handler.handle`, and a warning in weir's log (once per module and host) says which
//! flag would allow it.
//!
//! Requests are sent by wasmtime-wasi-http's client on the instance's runtime, so a handler
//! waiting for an answer holds no thread. The call's deadline (`--call-timeout`) bounds the
//! whole exchange.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

pub use weir_core::allow::{AllowList, Allowed};

/// What every instance of a module shares: the list, and which refusals were already logged.
#[derive(Debug)]
pub struct Policy {
    module: String,
    allow: AllowList,
    warned: Mutex<HashSet<String>>,
}

impl Policy {
    pub fn new(module: &str, allow: AllowList) -> Policy {
        Policy {
            module: module.to_string(),
            allow,
            warned: Mutex::default(),
        }
    }

    /// Decides on a request to `uri`; logs a refusal the first time a host is refused.
    fn check(&self, uri: &::http::Uri) -> Result<(), wasmtime_wasi_http::Error> {
        let Some(host) = uri.host() else {
            return Err(wasmtime_wasi_http::Error::HttpRequestUriInvalid);
        };
        let https = uri.scheme() == Some(&::http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if self.allow.allows(host, port) {
            return Ok(());
        }
        let target = format!("{host}:{port}");
        let first = self
            .warned
            .lock()
            .map(|mut w| w.insert(target.clone()))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                module = %self.module,
                target = %target,
                "the handler sent an HTTP request to {target}, which is not allowed; it got \
                 the error HTTP-request-denied. Pass --allow-http {target} to allow it"
            );
        }
        Err(wasmtime_wasi_http::Error::HttpRequestDenied)
    }
}

/// The per-instance hooks wasmtime-wasi-http asks before it sends a request.
#[derive(Debug, Clone)]
pub struct Hooks(pub Arc<Policy>);

type Sent = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                ::http::Response<WasiBody>,
                Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for Hooks {
    /// Requests that name no scheme are sent as plain `http`.
    fn default_scheme(&mut self) -> Option<::http::uri::Scheme> {
        Some(::http::uri::Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        request: ::http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Sent {
        match self.0.check(request.uri()) {
            Err(denied) => Box::new(async move { Err(denied) }),
            Ok(()) => {
                // wasmtime-wasi-http's own client: connects, does TLS for https, and honours
                // the guest's request options (timeouts).
                wasmtime_wasi_http::default_hooks().send_request(request, options, fut)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList(entries.iter().map(|e| e.parse().unwrap()).collect())
    }

    #[test]
    fn entries_parse_hosts_ports_and_ipv6() {
        let a: Allowed = "API.example.com".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("api.example.com", None));
        let a: Allowed = "127.0.0.1:8080".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", Some(8080)));
        let a: Allowed = "[::1]:9000".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", Some(9000)));
        assert_eq!(a.to_string(), "[::1]:9000");
        for bad in [
            "http://x.com",
            "x.com/path",
            "x.com:0",
            "x.com:99999",
            "x.com:port",
            ":80",
            "::1",
            "[::1",
            "a b",
        ] {
            let e = bad.parse::<Allowed>().unwrap_err();
            assert!(e.contains(bad.trim()) && e.contains("--allow-http"), "{e}");
        }
    }

    #[test]
    fn a_request_goes_out_only_to_an_allowed_host_and_port() {
        let l = list(&["127.0.0.1:8080", "api.example.com", "[::1]:81"]);
        assert!(l.allows("127.0.0.1", 8080));
        assert!(!l.allows("127.0.0.1", 8081));
        assert!(l.allows("API.EXAMPLE.COM", 443));
        assert!(l.allows("api.example.com", 80));
        assert!(!l.allows("example.com", 80));
        assert!(!l.allows("api.example.com.evil.net", 80));
        assert!(l.allows("[::1]", 81));
        assert!(!AllowList::default().allows("127.0.0.1", 80));
    }

    #[test]
    fn the_policy_applies_default_ports_by_scheme() {
        let p = Policy::new("m", list(&["a.test:443", "b.test:80"]));
        let ok = |u: &str| p.check(&u.parse().unwrap()).is_ok();
        assert!(ok("https://a.test/x"));
        assert!(!ok("http://a.test/x"));
        assert!(ok("http://b.test/"));
        assert!(!ok("http://b.test:8080/"));
        assert!(!ok("/relative"));
    }
}
