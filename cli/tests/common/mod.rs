//! A worker to observe, for the tests of the commands that read a worker's metrics.

use std::sync::Arc;
use std::time::Duration;

use courier::{App, DynBroker, Message, RouteOptions, Source};

/// A running worker: one slot on `source`, `handling` per message, fed one message
/// every `every`, serving its metrics on `addr`. Dropped, it stops.
pub struct ObservedWorker {
    pub addr: std::net::SocketAddr,
    stop: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
}

impl ObservedWorker {
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        broker: DynBroker,
        source: Source,
        every: Duration,
        handling: Duration,
    ) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let stop = stop.clone();
            runtime.spawn(async move {
                broker.declare(&source).await.unwrap();
                let feeder = {
                    let (broker, to) = (broker.clone(), source.destination());
                    tokio::spawn(async move {
                        loop {
                            broker.send(&to, Message::new("work")).await.unwrap();
                            tokio::time::sleep(every).await;
                        }
                    })
                };
                let handler = move |_: Message| async move { tokio::time::sleep(handling).await };
                App::new(broker)
                    .observe(addr)
                    .route_with(source, handler, RouteOptions::default().concurrency(1).batch(1))
                    .run_until(async move { stop.notified().await })
                    .await
                    .unwrap();
                feeder.abort();
            })
        };
        ObservedWorker { addr, stop, task: Some(task), runtime: runtime.handle().clone() }
    }
}

impl Drop for ObservedWorker {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = self.runtime.block_on(task);
        }
    }
}
