//! A TCP proxy on loopback that can black-hole the connections open through it: from then on they
//! forward nothing in either direction and stay open (no FIN, no RST), as with a hung apiserver or
//! a peer lost behind a stateful firewall. Connections made afterwards work, unless everything is
//! black-holed (a peer that hangs for every client). It can also stall the answers for a while
//! (requests still reach the server and take effect; their answers arrive late): a slow apiserver.
//! TLS passes through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct TcpProxy {
    port: u16,
    /// Connections with an id up to this are black-holed.
    dead_up_to: Arc<AtomicU64>,
    /// Every connection, also those made later, is black-holed.
    all_dead: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
    /// Answers are held until this instant (milliseconds after `started`).
    stall_until_ms: Arc<AtomicU64>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let dead_up_to = Arc::new(AtomicU64::new(0));
        let all_dead = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicU64::new(1));
        let stall_until_ms = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let (dead, all, next, stall) = (dead_up_to.clone(), all_dead.clone(), next_id.clone(), stall_until_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = next.fetch_add(1, Ordering::SeqCst);
                let (dead, all, stall) = (dead.clone(), all.clone(), stall.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let is_dead = move || dead.load(Ordering::SeqCst) >= id || all.load(Ordering::SeqCst);
                    let stalled = move || {
                        let until = started + Duration::from_millis(stall.load(Ordering::SeqCst));
                        until.checked_duration_since(Instant::now())
                    };
                    tokio::join!(pipe(cr, sw, is_dead.clone(), || None), pipe(sr, cw, is_dead, stalled));
                });
            }
        });
        Ok(Self { port, dead_up_to, all_dead, next_id, stall_until_ms, started, task })
    }

    /// For `duration` from now, answers (server to client) on every connection are held back and
    /// then delivered in order; requests pass at once.
    pub fn stall_answers(&self, duration: Duration) {
        let until = (self.started.elapsed() + duration).as_millis() as u64;
        self.stall_until_ms.fetch_max(until, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every connection open now forwards nothing more, for good, and is never closed.
    pub fn blackhole_open_connections(&self) {
        let newest = self.next_id.load(Ordering::SeqCst) - 1;
        self.dead_up_to.fetch_max(newest, Ordering::SeqCst);
    }

    /// Every connection, open now or made later, forwards nothing more, for good.
    pub fn blackhole_everything(&self) {
        self.all_dead.store(true, Ordering::SeqCst);
    }

    /// Connections made from now on work again (those black-holed stay so: as after a partition
    /// heals, the peer must notice its dead connections and make new ones).
    pub fn heal(&self) {
        self.all_dead.store(false, Ordering::SeqCst);
        let newest = self.next_id.load(Ordering::SeqCst) - 1;
        self.dead_up_to.fetch_max(newest, Ordering::SeqCst);
    }

    /// How many connections were made through the proxy.
    pub fn connections(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst) - 1
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    is_dead: impl Fn() -> bool,
    stalled: impl Fn() -> Option<Duration>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if is_dead() {
            // Hold both halves open and forward nothing, forever.
            std::future::pending::<()>().await;
        }
        while let Some(wait) = stalled() {
            tokio::time::sleep(wait).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
