//! The idempotent consumer, as a handler: the message's id is recorded in the same
//! database transaction as the handler's own writes, so a message delivered again has no
//! second effect.

use std::future::Future;
use std::sync::Arc;

use courier_core::Error;
use courier_sql::outbox::{self, OutboxConnection};
use courier_sql::sqlx::{Database, Pool, Transaction};

use crate::handler::{BoxFuture, Handler, Incoming, Outcome};

/// A handler whose database writes happen once per message id: see [`idempotent`].
pub struct Idempotent<DB: Database, F> {
    pool: Pool<DB>,
    consumer: Arc<str>,
    work: F,
}

impl<DB: Database, F: Clone> Clone for Idempotent<DB, F> {
    fn clone(&self) -> Self {
        Idempotent { pool: self.pool.clone(), consumer: self.consumer.clone(), work: self.work.clone() }
    }
}

/// Wraps `work` so that its writes take effect once per message, however often the
/// message is delivered.
///
/// For each message, a transaction is begun on `pool` that records the message id under
/// `consumer` (a name for this handler: two handlers of one message each get it once).
/// `work` gets the message and the transaction, writes through it and gives it back;
/// the writes and the record then commit together and the message is acked. A message
/// whose id is recorded already is acked without running `work`. When `work` fails, the
/// transaction rolls back, record included, and the error's outcome applies (a retry,
/// or a dead letter for a decode error or an [`Error::permanent`] one).
///
/// The tables (`courier_processed`) are the ones the SQL backends create: connect a
/// [`courier_sql::SqlBroker`] or an [`outbox::Relay`] to the database once, or create
/// them as the crate docs of `courier_sql` show.
///
/// ```no_run
/// use courier::sql::sqlx::{self, SqlitePool};
/// use courier::{idempotent, App, Incoming, Source};
///
/// # async fn run(pool: SqlitePool, broker: courier::DynBroker) -> Result<(), courier::Error> {
/// let charge = idempotent(pool, "billing", |incoming: Incoming, mut tx: sqlx::Transaction<'static, sqlx::Sqlite>| async move {
///     let order: serde_json::Value = incoming.message.decode_json()?;
///     sqlx::query("INSERT INTO charges (order_id) VALUES ($1)")
///         .bind(order["id"].as_i64())
///         .execute(&mut *tx)
///         .await
///         .map_err(|e| courier::Error::transient("sqlite", format!("charge: {e}"), e))?;
///     Ok(tx) // committed with the record of this message's id
/// });
/// App::new(broker).route(Source::queue("orders")?, charge).run().await?;
/// # Ok(()) }
/// ```
pub fn idempotent<DB, F, Fut>(pool: Pool<DB>, consumer: &str, work: F) -> Idempotent<DB, F>
where
    DB: Database,
    DB::Connection: OutboxConnection,
    F: Fn(Incoming, Transaction<'static, DB>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Transaction<'static, DB>, Error>> + Send + 'static,
{
    Idempotent { pool, consumer: Arc::from(consumer), work }
}

impl<DB, F, Fut> Handler<Incoming> for Idempotent<DB, F>
where
    DB: Database,
    DB::Connection: OutboxConnection,
    F: Fn(Incoming, Transaction<'static, DB>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Transaction<'static, DB>, Error>> + Send + 'static,
{
    type Future = BoxFuture<Outcome>;

    fn handle(&self, incoming: Incoming) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let id = incoming.message.id.clone();
            let run = async {
                let Some(tx) = outbox::begin_once(&this.pool, &this.consumer, &id).await? else {
                    tracing::debug!(%id, consumer = %this.consumer, "processed before: acked without running again");
                    return Ok(());
                };
                outbox::commit((this.work)(incoming, tx).await?).await
            };
            match run.await {
                Ok(()) => Outcome::Ack,
                Err(e) => Outcome::from_error(&e),
            }
        })
    }
}
