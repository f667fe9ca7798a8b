//! A load balancer in front of server replicas, for the tests of several replicas.

/// A load balancer as plain as they come: each connection goes to the first backend, in order,
/// that accepts it; a round-robin one starts each connection at the next backend in turn.
pub struct Balancer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    pub async fn start(backends: Vec<std::net::SocketAddr>) -> Self {
        Self::spawn(backends, false).await
    }

    pub async fn round_robin(backends: Vec<std::net::SocketAddr>) -> Self {
        Self::spawn(backends, true).await
    }

    async fn spawn(backends: Vec<std::net::SocketAddr>, rotate: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut order = backends.clone();
                if rotate {
                    order.rotate_left(next % backends.len());
                    next += 1;
                }
                tokio::spawn(async move {
                    for backend in order {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
