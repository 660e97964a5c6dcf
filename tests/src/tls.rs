//! TLS for the tests: a private CA with a server and a client certificate (rcgen), and servers
//! of the test's own that speak only TLS and ask for the client's certificate: a Redis and a
//! NATS with JetStream, each on a free port, stopped when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// PEM files under a directory: `ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key`,
/// and `other-ca.pem`, a CA that signed none of them.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        std::fs::create_dir_all(dir).expect("make the PKI directory");
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, name.to_string());
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("a key")).expect("a CA")
        };
        let (issuer, other) = (ca("weir test CA"), ca("another CA"));
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).expect("write a PEM file");
        };
        write("ca.pem", issuer.pem());
        write("other-ca.pem", other.pem());
        for who in ["server", "client"] {
            let key = KeyPair::generate().expect("a key");
            let p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
            let cert = p.signed_by(&key, &issuer).expect("sign");
            write(&format!("{who}.pem"), cert.pem());
            write(&format!("{who}.key"), key.serialize_pem());
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("UTF-8 path")
            .to_string()
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A server process of the test's own; killed on drop.
pub struct Private {
    child: Child,
    pub port: u16,
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The program `name`, from PATH or /usr/sbin (Debian puts nats-server there).
fn program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        return sbin;
    }
    PathBuf::from(name)
}

fn start(mut cmd: Command, port: u16, log: &Path) -> Private {
    let log = std::fs::File::create(log).expect("a server log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?} ({e}); scripts/services.sh installs it"));
    let server = Private { child, port };
    crate::wait_until(
        "the private server listens",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    server
}

impl Pki {
    /// redis-server on TLS only (no plain port), asking for a client certificate signed by
    /// the CA. Its URL: `rediss://127.0.0.1:<port>`.
    pub fn redis(&self, dir: &Path) -> Private {
        let port = free_port();
        let mut c = Command::new(program("redis-server"));
        c.args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &self.file("server.pem")])
            .args(["--tls-key-file", &self.file("server.key")])
            .args(["--tls-ca-cert-file", &self.file("ca.pem")])
            .args(["--tls-auth-clients", "yes"])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        start(c, port, &dir.join("redis.log"))
    }

    /// nats-server with JetStream on TLS only, verifying client certificates. Its URL:
    /// `nats://127.0.0.1:<port>`.
    pub fn nats(&self, dir: &Path) -> Private {
        let port = free_port();
        let mut c = Command::new(program("nats-server"));
        c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
            .arg("-sd")
            .arg(dir.join("js"))
            .args(["--tlsverify", "--tlscert", &self.file("server.pem")])
            .args(["--tlskey", &self.file("server.key")])
            .args(["--tlscacert", &self.file("ca.pem")]);
        start(c, port, &dir.join("nats.log"))
    }
}
