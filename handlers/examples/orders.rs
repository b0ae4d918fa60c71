//! One `handle_order` function, run five ways with no change to it:
//!
//! ```sh
//! # 1-3. a long-running worker; the backend is configuration
//! cargo run -p courier --example orders --features lambda,http -- worker amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run -p courier --example orders --features lambda,http,kafka -- worker kafka://127.0.0.1:9092
//! cargo run -p courier --example orders --features lambda,http,sqs -- worker 'sqs://us-east-1?endpoint=http://127.0.0.1:4566'
//! # 4. the AWS Lambda entry point (SQS, or Kafka or RabbitMQ event source mappings)
//! cargo lambda build --example orders --features lambda,http   # deploy; Lambda runs `orders lambda`
//! # 5. an HTTP push endpoint (CloudEvents, Pub/Sub push)
//! cargo run -p courier --example orders --features lambda,http -- http 127.0.0.1:8080
//! ```

use courier::trigger::Trigger;
use courier::{App, Error, Json, RouteOptions, Source};

#[derive(Debug, serde::Deserialize)]
struct Order {
    id: u64,
    total_cents: i64,
}

/// The business logic, written once. `Ok` acks; a fatal error dead-letters; a retryable
/// error retries with backoff (worker) or fails the record (Lambda, HTTP push).
async fn handle_order(Json(order): Json<Order>) -> Result<(), Error> {
    if order.total_cents <= 0 {
        return Err(Error::fatal(format!("order {} has a non-positive total", order.id)));
    }
    println!("charged order {} ({} cents)", order.id, order.total_cents);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let orders = Source::queue("orders")?;
    match args.first().map(String::as_str) {
        Some("worker") => {
            let url = args.get(1).map(String::as_str).unwrap_or("memory://");
            let broker = courier::connect(url).await?;
            broker.declare(&orders).await?;
            println!("worker on {} (Ctrl-C stops it)", courier::redact_url(url));
            let report = App::new(broker).route_with(orders, handle_order, RouteOptions::default()).run().await?;
            println!("{report:?}");
        }
        Some("lambda") => courier::trigger::lambda::run(Trigger::new(handle_order)).await.map_err(|e| e.to_string())?,
        Some("http") => {
            let address = args.get(1).map(String::as_str).unwrap_or("127.0.0.1:8080");
            let listener = tokio::net::TcpListener::bind(address).await?;
            println!("HTTP push on http://{address}/");
            axum::serve(listener, courier::trigger::http::router(Trigger::new(handle_order), orders)).await?;
        }
        _ => eprintln!("usage: orders worker [URL] | lambda | http [ADDRESS]"),
    }
    Ok(())
}
