//! The TLS files a source takes as `--source-property` (`ca=`, `cert=`, `key=`), the same on
//! every broker that has them: a CA to trust instead of the system's roots (a private CA, a
//! self-signed server), and a client certificate with its key for servers that ask for one
//! (mutual TLS).

use super::SourceError;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsFiles {
    /// PEM: the certificates to trust for the server (instead of the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM: this client's certificate chain, and its private key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Reads a PEM file a property names; the error names the property and the file.
pub fn read(property: &str, path: &std::path::Path) -> Result<Vec<u8>, SourceError> {
    std::fs::read(path).map_err(|e| {
        SourceError::Invalid(format!(
            "--source-property {property}={}: cannot read it ({e}); pass a PEM file weir can read",
            path.display()
        ))
    })
}

impl TlsFiles {
    /// Takes `k=v` if it is one of the TLS properties: `Ok(true)`; `Ok(false)` for another.
    pub fn take(&mut self, k: &str, v: &str) -> Result<bool, SourceError> {
        let slot = match k {
            "ca" => &mut self.ca,
            "cert" => &mut self.cert,
            "key" => &mut self.key,
            _ => return Ok(false),
        };
        let path = PathBuf::from(v);
        read(k, &path)?;
        *slot = Some(path);
        Ok(true)
    }

    /// Whether any was given.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// A certificate needs its key, and the other way round.
    pub fn check(&self) -> Result<(), SourceError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(SourceError::Invalid(
                "--source-property cert=... needs key=... (the certificate's private key)".into(),
            )),
            (None, Some(_)) => Err(SourceError::Invalid(
                "--source-property key=... needs cert=... (the client certificate)".into(),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_taken_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let pem_s = pem.to_str().unwrap();
        let missing = dir.path().join("nope.pem");
        // (properties, Ok(any) or the start of the error)
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<bool, &'a str>);
        let cases: &[Case] = &[
            (&[], Ok(false)),
            (&[("ca", pem_s)], Ok(true)),
            (&[("cert", pem_s), ("key", pem_s)], Ok(true)),
            (
                &[("cert", pem_s)],
                Err("--source-property cert=... needs key="),
            ),
            (
                &[("key", pem_s)],
                Err("--source-property key=... needs cert="),
            ),
            (
                &[("ca", missing.to_str().unwrap())],
                Err("--source-property ca="),
            ),
        ];
        for (props, want) in cases {
            let mut t = TlsFiles::default();
            let got = props
                .iter()
                .try_for_each(|(k, v)| t.take(k, v).map(|took| assert!(took)))
                .and_then(|()| t.check())
                .map(|()| t.any());
            match (got, want) {
                (Ok(a), Ok(b)) => assert_eq!(a, *b, "{props:?}"),
                (Err(e), Err(start)) => {
                    assert!(e.to_string().contains(start), "{props:?}: {e}")
                }
                (got, want) => panic!("{props:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(!TlsFiles::default().take("prefix", "x").unwrap());
    }
}
