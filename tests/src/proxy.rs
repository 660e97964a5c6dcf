//! A TCP relay between weir and a broker that can cut its links on command: for brokers the
//! tests cannot ask to drop a client (nats-server 2.9 has no "kick"). Weir is given the relay's
//! address; the test's own clients go to the broker directly.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Links {
    /// Refusing connections (the broker is "gone").
    down: bool,
    next: u64,
    /// The relayed connections open now: both ends of each.
    open: HashMap<u64, [TcpStream; 2]>,
}

/// Listens on 127.0.0.1 (a free port) and relays each connection to `upstream`; stops
/// listening when dropped.
pub struct Relay {
    addr: SocketAddr,
    links: Arc<Mutex<Links>>,
    gone: Arc<AtomicBool>,
}

impl Relay {
    pub fn new(upstream: &str) -> Relay {
        let upstream = upstream
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("resolve {upstream}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{upstream} has no address"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a relay port");
        let addr = listener.local_addr().expect("the relay's address");
        let links: Arc<Mutex<Links>> = Arc::default();
        let gone = Arc::new(AtomicBool::new(false));
        let (l, g) = (links.clone(), gone.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if g.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                // Decided and registered under one lock, so a cut closes every link it lets in.
                let mut links = l.lock().expect("links");
                if links.down {
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
                let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let id = links.next;
                links.next += 1;
                links.open.insert(id, [c, s]);
                drop(links);
                pipe(&client, &server, None);
                pipe(&server, &client, Some((l.clone(), id)));
            }
        });
        Relay { addr, links, gone }
    }

    /// host:port of the relay.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every relayed connection, refuses new ones for `outage`, then lets them through
    /// again; returns how many connections it closed.
    pub fn cut(&self, outage: Duration) -> usize {
        let closed = {
            let mut links = self.links.lock().expect("links");
            links.down = true;
            let open = std::mem::take(&mut links.open);
            for [c, s] in open.values() {
                let _ = c.shutdown(Shutdown::Both);
                let _ = s.shutdown(Shutdown::Both);
            }
            open.len()
        };
        // The outage itself, not a wait for something: weir meets a broker that is gone.
        std::thread::sleep(outage);
        self.links.lock().expect("links").down = false;
        closed
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `gone` and ends (closing the listener).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for [c, s] in self.links.lock().expect("links").open.values() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes; `done`, if given,
/// forgets the link when it ends.
fn pipe(from: &TcpStream, to: &TcpStream, done: Option<(Arc<Mutex<Links>>, u64)>) {
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
        if let Some((links, id)) = done {
            links.lock().expect("links").open.remove(&id);
        }
    });
}
