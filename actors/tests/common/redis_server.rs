//! A real `redis-server` for tests: its own process on a free loopback port, without persistence
//! unless asked (an append-only file synced at every write), killed when dropped. Shared by the integration tests of several crates (included by path).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Keeps its data across restarts.
    persistent: bool,
}

impl RedisServer {
    /// Starts a server on a free port. Panics with an install hint when `redis-server` is missing.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// A server whose data survives `kill` and `restart` (append-only file, fsync always).
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir for redis-server");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            persistent,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(err) = child.kill() {
                eprintln!("could not kill redis-server: {err}");
            }
            if let Err(err) = child.wait() {
                eprintln!("could not reap redis-server: {err}");
            }
        }
    }

    /// Starts the server (again) on the same port, empty unless persistent, and waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.kill();
        let appendonly = if self.persistent { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", appendonly])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) if err.kind() == ErrorKind::NotFound => panic!(
                "redis-server is not installed (needed by the Redis store tests): install redis-server: apt-get install redis-server"
            ),
            Err(err) => panic!("could not start redis-server: {err}"),
        };
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if ping(self.port) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server exited before it was ready ({status}); is port {} taken?",
                        self.port
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within {STARTUP:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
        || stream.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
