//! `--allow-http`: the hosts (and ports) a handler's outgoing HTTP requests may reach.

use std::fmt;

/// One `--allow-http` entry: a host name or IP address, and optionally a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Lower case; an IPv6 address without its brackets.
    pub host: String,
    /// `None` allows every port of the host.
    pub port: Option<u16>,
}

impl std::str::FromStr for Allowed {
    type Err = String;

    /// `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "--allow-http `{s}`: {why}; give a host and optionally a port, \
                 as in `api.example.com`, `127.0.0.1:8080` or `[::1]:8080`"
            )
        };
        let s = s.trim();
        if s.contains("://") || s.contains('/') {
            return Err(bad("a host, not a URL"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing `]`"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(bad("expected `:PORT` after `]`")),
                },
            }
        } else {
            match s.rsplit_once(':') {
                Some((_, _)) if s.matches(':').count() > 1 => {
                    return Err(bad("write an IPv6 address in brackets"));
                }
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(bad("the host has characters a host name cannot have"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(bad(&format!("`{p}` is not a port (1-65535)"))),
            },
        };
        Ok(Allowed {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => write!(f, "{host}"),
        }
    }
}

/// The hosts handlers may reach; empty refuses everything (the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<Allowed>);

impl AllowList {
    /// Whether a request to `host` (as in a URL: an IPv6 address in brackets) on `port` may
    /// go out.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.0
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
