//! A TCP relay between agents and a server, for the link failures a test must place exactly:
//! [`Relay::freeze`] drops what agents send while what the server sends still arrives (a link
//! that died one way), and [`Relay::sever`] cuts every connection through it at once. New
//! connections pass as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    link: Arc<Link>,
    task: tokio::task::JoinHandle<()>,
}

struct Link {
    frozen: AtomicBool,
    /// Bumped by each sever: a connection ends when it changes.
    cuts: watch::Sender<u64>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let link = Arc::new(Link {
            frozen: AtomicBool::new(false),
            cuts: watch::channel(0).0,
        });
        let task = {
            let link = link.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((agent, _)) = listener.accept().await else {
                        continue;
                    };
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    tokio::spawn(relay(agent, server, link.clone()));
                }
            })
        };
        Self { addr, link, task }
    }

    /// From now on, what agents send is read and dropped.
    pub fn freeze(&self) {
        self.link.frozen.store(true, Ordering::SeqCst);
    }

    /// Cuts every open connection; the next ones pass, unfrozen.
    pub fn sever(&self) {
        self.link.frozen.store(false, Ordering::SeqCst);
        self.link.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.sever();
    }
}

async fn relay(agent: TcpStream, server: TcpStream, link: Arc<Link>) {
    let mut cut = link.cuts.subscribe();
    cut.mark_unchanged();
    let (mut from_agent, mut to_agent) = agent.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_agent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if link.frozen.load(Ordering::SeqCst) {
                continue;
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let downstream = tokio::io::copy(&mut from_server, &mut to_agent);
    // Either way ending ends both: the sockets drop with this task.
    tokio::select! {
        () = upstream => {}
        _ = downstream => {}
        _ = cut.changed() => {}
    }
}
