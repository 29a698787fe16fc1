//! The replicas' `public_url`: a TCP load balancer on its own thread and runtime.
//!
//! Each new client connection goes to the next backend, round-robin; a backend that refuses or
//! does not accept within [`CONNECT_TIMEOUT`] is skipped for the next one, so a killed replica
//! drops out at once. It remembers which backend every open connection went to, keyed by the
//! client's address, which is how the scenario knows which shims a replica holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How long a backend may take to accept a connection before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

pub struct LoadBalancer {
    addr: SocketAddr,
    routing: Arc<Mutex<Routing>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Routing {
    backends: Vec<SocketAddr>,
    next: usize,
    /// Open connections: the client's address → the backend's index.
    open: HashMap<SocketAddr, usize>,
    /// Per backend: connection attempts it refused or did not accept in time.
    failed: Vec<u64>,
}

impl LoadBalancer {
    /// Listens on a free loopback port, without backends until [`LoadBalancer::set_backends`]
    /// (connections are closed at once until then).
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("load balancer bind")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let routing = Arc::new(Mutex::new(Routing::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = routing.clone();
        let runtime = crate::runtime()?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener).context("load balancer listener")?
        };
        let thread = std::thread::Builder::new()
            .name("load-balancer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = accept_loop(listener, serving) => {}
                    }
                });
                // Dropping the runtime drops every relay task and closes its sockets.
            })?;
        Ok(LoadBalancer {
            addr,
            routing,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the backends; backend `i` is replica `i`.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        let mut routing = lock(&self.routing);
        routing.failed = vec![0; backends.len()];
        routing.backends = backends;
        routing.next = 0;
    }

    /// The backend an open connection from `client` went to.
    pub fn backend_of(&self, client: SocketAddr) -> Option<usize> {
        lock(&self.routing).open.get(&client).copied()
    }

    /// Open connections per backend.
    pub fn open_per_backend(&self) -> Vec<usize> {
        let routing = lock(&self.routing);
        let mut counts = vec![0; routing.backends.len()];
        for index in routing.open.values() {
            if let Some(count) = counts.get_mut(*index) {
                *count += 1;
            }
        }
        counts
    }

    /// Connection attempts each backend refused or did not accept in time.
    pub fn failed_per_backend(&self) -> Vec<u64> {
        lock(&self.routing).failed.clone()
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Err: the thread already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("load balancer thread panicked");
            }
        }
    }
}

fn lock(routing: &Mutex<Routing>) -> MutexGuard<'_, Routing> {
    routing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, routing: Arc<Mutex<Routing>>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(relay(client, peer, routing.clone()));
            }
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("load balancer: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Forgets an open connection when its relay ends.
struct Open {
    routing: Arc<Mutex<Routing>>,
    client: SocketAddr,
}

impl Drop for Open {
    fn drop(&mut self) {
        lock(&self.routing).open.remove(&self.client);
    }
}

/// Connects `client` to the first backend that accepts, then copies bytes both ways until either
/// side ends.
async fn relay(mut client: TcpStream, peer: SocketAddr, routing: Arc<Mutex<Routing>>) {
    let candidates: Vec<(usize, SocketAddr)> = {
        let mut routing = lock(&routing);
        let n = routing.backends.len();
        if n == 0 {
            return;
        }
        let start = routing.next % n;
        routing.next = (start + 1) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .map(|i| (i, routing.backends[i]))
            .collect()
    };
    let mut connected = None;
    for (index, addr) in candidates {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(server)) => {
                connected = Some((index, server));
                break;
            }
            Ok(Err(_)) | Err(_) => {
                if let Some(failed) = lock(&routing).failed.get_mut(index) {
                    *failed += 1;
                }
            }
        }
    }
    let Some((index, mut server)) = connected else {
        return;
    };
    lock(&routing).open.insert(peer, index);
    let _open = Open {
        routing: routing.clone(),
        client: peer,
    };
    // Small frames (acks, heartbeats) go out at once, as the replicas send them.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Ends with an error when the backend dies (reset); either way both sockets close here.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_backend_is_skipped_and_connections_are_tracked() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let live = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let live_addr = live.local_addr().expect("addr");
        let lb = LoadBalancer::start().expect("load balancer");
        lb.set_backends(vec![dead_addr, live_addr]);

        let lb_addr: SocketAddr = lb.base_url()["http://".len()..]
            .parse()
            .expect("lb address");
        let client = TcpStream::connect(lb_addr).await.expect("connect");
        let (_server_side, _) = live.accept().await.expect("the live backend gets it");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lb.backend_of(client.local_addr().expect("local")).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "connection never tracked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(lb.backend_of(client.local_addr().expect("local")), Some(1));
        assert_eq!(lb.open_per_backend(), vec![0, 1]);
        assert_eq!(lb.failed_per_backend(), vec![1, 0]);
    }
}
