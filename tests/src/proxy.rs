//! A TCP relay between weir and a broker that can cut its links on command: for brokers the
//! tests cannot ask to drop a client (nats-server 2.9 has no "kick"). Weir is given the relay's
//! address; the test's own clients go to the broker directly.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Listens on 127.0.0.1 (a free port) and relays each connection to `upstream`; lives as long as
/// the test (its threads end with the process).
pub struct Relay {
    addr: String,
    down: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn new(upstream: &str) -> Relay {
        let upstream = upstream
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("resolve {upstream}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{upstream} has no address"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a relay port");
        let addr = listener
            .local_addr()
            .expect("the relay's address")
            .to_string();
        let down = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, l) = (down.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    // The broker is "gone": the connection is refused by closing it.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut l = l.lock().expect("live");
                    for s in [&client, &server] {
                        if let Ok(c) = s.try_clone() {
                            l.push(c);
                        }
                    }
                }
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        Relay { addr, down, live }
    }

    /// host:port of the relay.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Closes every relayed connection, refuses new ones for `outage`, then lets them through
    /// again.
    pub fn cut(&self, outage: Duration) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.live.lock().expect("live").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        // The outage itself, not a wait for something: weir meets a broker that is gone.
        std::thread::sleep(outage);
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
