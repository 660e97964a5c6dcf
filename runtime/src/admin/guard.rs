//! Who may use the admin server: the checks every request passes before its route runs.
//!
//! The server listens on localhost by default, where any web page in a browser on the machine
//! can reach it: a cross-origin form or `fetch` can post to it (CSRF), and a page served from a
//! name that resolves to 127.0.0.1 can read it (DNS rebinding). So:
//! - every request's `Host` must be an IP address, `localhost`, or a name the operator allows
//!   (`--admin-allow-host`): a rebound name is refused before anything is read;
//! - a write (any method but GET and HEAD) from a browser must come from the server's own origin
//!   (`Origin` equal to `Host`, `Sec-Fetch-Site` not cross-site); clients that send no `Origin`
//!   (curl, Prometheus, weir) are not browsers and go on;
//! - with a token (`--admin-token`, `WEIR_ADMIN_TOKEN`), a write needs `Authorization: Bearer`
//!   with it. Reads stay open to scrapers and probes.
//!
//! Pure functions of the request's headers, so the table tests below cover them.

/// What the guard needs to know, fixed when the server starts.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Writes need `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Host names (without port) taken besides IP addresses and `localhost`.
    pub allow_hosts: Vec<String>,
}

/// Why a request is refused: the status and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// The headers the guard reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen<'a> {
    pub method_is_write: bool,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub fetch_site: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

/// The host part of a `Host` header or an origin's authority, lowercased, without port or
/// brackets; `None` if it does not parse.
fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim();
    if a.is_empty() {
        return None;
    }
    if let Some(rest) = a.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return Some(v6.to_ascii_lowercase());
    }
    let name = match a.rsplit_once(':') {
        Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) => n,
        Some(_) => return None,
        None => a,
    };
    Some(name.trim_end_matches('.').to_ascii_lowercase())
}

fn host_allowed(name: &str, policy: &Policy) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || policy
            .allow_hosts
            .iter()
            .any(|h| h.trim_end_matches('.').eq_ignore_ascii_case(name))
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refuse(status: u16, message: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        status,
        message: message.into(),
    })
}

/// Whether the request may go on to its route.
pub fn check(seen: &Seen<'_>, policy: &Policy) -> Result<(), Refusal> {
    if let Some(host) = seen.host {
        match host_name(host) {
            Some(name) if host_allowed(&name, policy) => {}
            _ => {
                return refuse(
                    403,
                    format!(
                        "Host `{}` is not served: the admin server answers to IP addresses, localhost and the names given with --admin-allow-host",
                        crate::source::clip(host, 100)
                    ),
                );
            }
        }
    }
    if !seen.method_is_write {
        return Ok(());
    }
    if seen
        .fetch_site
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("cross-site"))
    {
        return refuse(403, "cross-site writes are refused");
    }
    if let Some(origin) = seen.origin {
        // `scheme://authority`; `null` (a sandboxed frame, a file) never matches.
        let authority = origin.trim().split_once("://").map(|(_, a)| a);
        let same = match (authority, seen.host) {
            (Some(a), Some(h)) => a.eq_ignore_ascii_case(h.trim()),
            _ => false,
        };
        if !same {
            return refuse(
                403,
                format!(
                    "writes from origin `{}` are refused; only the server's own pages may write",
                    crate::source::clip(origin, 100)
                ),
            );
        }
    }
    if let Some(token) = &policy.token {
        let given = seen
            .authorization
            .and_then(|a| a.trim().strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return refuse(
                401,
                "this write needs `Authorization: Bearer <token>` with the run's --admin-token",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(write: bool, host: Option<&'a str>, origin: Option<&'a str>) -> Seen<'a> {
        Seen {
            method_is_write: write,
            host,
            origin,
            ..Seen::default()
        }
    }

    #[test]
    fn hosts_and_origins() {
        let p = Policy {
            token: None,
            allow_hosts: vec!["weir.internal".into()],
        };
        // (write, Host, Origin, expected status or 0 for allowed)
        let cases: &[(bool, Option<&str>, Option<&str>, u16)] = &[
            (false, Some("127.0.0.1:9464"), None, 0),
            (false, Some("[::1]:9464"), None, 0),
            (false, Some("localhost:9464"), None, 0),
            (false, Some("LOCALHOST."), None, 0),
            (false, Some("10.1.2.3:9464"), None, 0),
            (false, Some("weir.internal:9464"), None, 0),
            (false, None, None, 0),
            (false, Some("evil.example"), None, 403),
            (false, Some("evil.example:9464"), None, 403),
            (false, Some("127.0.0.1.evil.example"), None, 403),
            (false, Some("[::1]x"), None, 403),
            (false, Some("a:b:c"), None, 403),
            (false, Some(""), None, 403),
            // Reads ignore Origin (a page cannot read the answer without CORS anyway).
            (
                false,
                Some("127.0.0.1:9464"),
                Some("http://evil.example"),
                0,
            ),
            (true, Some("127.0.0.1:9464"), None, 0),
            (
                true,
                Some("127.0.0.1:9464"),
                Some("http://127.0.0.1:9464"),
                0,
            ),
            (
                true,
                Some("127.0.0.1:9464"),
                Some("http://evil.example"),
                403,
            ),
            (
                true,
                Some("127.0.0.1:9464"),
                Some("http://127.0.0.1:9465"),
                403,
            ),
            (true, Some("127.0.0.1:9464"), Some("null"), 403),
            (true, None, Some("http://127.0.0.1:9464"), 403),
        ];
        for (write, host, origin, want) in cases {
            let got = check(&seen(*write, *host, *origin), &p)
                .err()
                .map_or(0, |r| r.status);
            assert_eq!(got, *want, "write={write} host={host:?} origin={origin:?}");
        }
    }

    #[test]
    fn cross_site_fetches_and_tokens() {
        let p = Policy {
            token: Some("s3cret".into()),
            allow_hosts: Vec::new(),
        };
        let with = |write: bool, fetch_site: Option<&'static str>, auth: Option<&'static str>| {
            let s = Seen {
                method_is_write: write,
                host: Some("127.0.0.1:1"),
                origin: None,
                fetch_site,
                authorization: auth,
            };
            check(&s, &p).err().map_or(0, |r| r.status)
        };
        assert_eq!(with(false, None, None), 0, "reads need no token");
        assert_eq!(with(true, None, None), 401);
        assert_eq!(with(true, None, Some("Bearer s3cre")), 401);
        assert_eq!(with(true, None, Some("Bearer s3cret!")), 401);
        assert_eq!(with(true, None, Some("Basic s3cret")), 401);
        assert_eq!(with(true, None, Some("Bearer s3cret")), 0);
        assert_eq!(with(true, Some("same-origin"), Some("Bearer s3cret")), 0);
        assert_eq!(with(true, Some("cross-site"), Some("Bearer s3cret")), 403);
    }
}
