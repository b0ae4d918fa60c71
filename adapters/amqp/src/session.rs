//! One connection to RabbitMQ, its publishing channel, and getting both back after a loss.
//!
//! lapin reports a dead connection or channel but does not reopen it (its own auto-recovery
//! is experimental), so the session does: every caller asks [`Session::live`] for the
//! current connection and publisher, and the first caller to see them dead reconnects with
//! exponential backoff while the others wait for it. Consumers open their own channels on
//! the same connection and re-subscribe the same way.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use courier_core::backend::OpenGuard;
use courier_core::{Error, Result};
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};

use crate::config::AmqpConfig;
use crate::BACKEND;

/// The current connection and its confirm-mode publishing channel.
#[derive(Clone)]
pub(crate) struct Live {
    pub connection: Arc<Connection>,
    pub publisher: Channel,
}

impl Live {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

pub(crate) struct Session {
    pub config: AmqpConfig,
    live: RwLock<Option<Live>>,
    reconnecting: tokio::sync::Mutex<()>,
    /// Open until the broker is closed.
    pub open: OpenGuard,
}

impl Session {
    pub async fn connect(config: AmqpConfig) -> Result<Arc<Self>> {
        let session = Arc::new(Session {
            config,
            live: RwLock::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            open: OpenGuard::new("broker"),
        });
        // Fail fast on a wrong URL or credentials instead of at the first send.
        let live = session.open(None).await?;
        if live.connection.configuration().heartbeat() == 0 {
            tracing::warn!(
                broker = %session.config.redacted(),
                "RabbitMQ heartbeats are off (the negotiated heartbeat is 0): a connection that dies without a reset \
                 goes unnoticed, and messages prefetched to it stay unacked on the broker for minutes; set the \
                 heartbeat above 0 on the server or in the URL (heartbeat=N)"
            );
        }
        *session.live.write().unwrap() = Some(live);
        Ok(session)
    }

    /// The connection and publisher, reconnecting if they were lost.
    pub async fn live(&self) -> Result<Live> {
        self.open.check()?;
        if let Some(live) = self.live.read().unwrap().as_ref().filter(|l| l.healthy()) {
            return Ok(live.clone());
        }
        let _one_reconnector = self.reconnecting.lock().await;
        let current = self.live.read().unwrap().clone();
        if let Some(live) = current.as_ref().filter(|l| l.healthy()) {
            return Ok(live.clone());
        }
        let deadline = Instant::now() + self.config.reconnect_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            self.open.check()?;
            match self.open(current.as_ref()).await {
                Ok(live) => {
                    tracing::info!(broker = %self.config.redacted(), "connected to RabbitMQ");
                    *self.live.write().unwrap() = Some(live.clone());
                    return Ok(live);
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    if Instant::now() + backoff > deadline {
                        return Err(Error::Broker {
                            backend: BACKEND,
                            message: format!(
                                "RabbitMQ at {} stayed unreachable for {:?} ({e}); is the broker running? Courier keeps reconnecting on the next call",
                                self.config.redacted(),
                                self.config.reconnect_timeout
                            ),
                            retryable: true,
                            source: Some(Box::new(e)),
                        });
                    }
                    tracing::warn!(broker = %self.config.redacted(), error = %e, ?backoff, "RabbitMQ connection lost; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// A fresh channel on the current connection, for a consumer or for declarations.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(self.channel_and_connection().await?.0)
    }

    /// A fresh channel and the connection it is on, whose health a consumer watches.
    pub async fn channel_and_connection(&self) -> Result<(Channel, Arc<Connection>)> {
        let live = self.live().await?;
        match within("open a channel", live.connection.create_channel()).await? {
            Ok(channel) => Ok((channel, live.connection)),
            Err(e) if retryable(&e) => {
                // The connection died between the check and the call: reconnect once more.
                *self.live.write().unwrap() = None;
                let live = self.live().await?;
                let channel = within("open a channel", live.connection.create_channel())
                    .await?
                    .map_err(|e| lapin_error("open a channel", e))?;
                Ok((channel, live.connection))
            }
            Err(e) => Err(lapin_error("open a channel", e)),
        }
    }

    async fn open(&self, previous: Option<&Live>) -> Result<Live> {
        let connection = match previous.filter(|l| l.connection.status().connected()) {
            Some(l) => l.connection.clone(),
            None => {
                let doing = format!("connect to {}", self.config.redacted());
                let tls = OwnedTLSConfig { identity: None, cert_chain: self.config.tls_ca_pem.clone() };
                let runtime = lapin::runtime::default_runtime().map_err(|e| lapin_error(&doing, e))?;
                let connect =
                    Connection::connect_with_config(self.config.uri(), ConnectionProperties::default(), tls, runtime);
                Arc::new(within(&doing, connect).await?.map_err(|e| lapin_error(&doing, e))?)
            }
        };
        let publisher = within("open a channel", connection.create_channel())
            .await?
            .map_err(|e| lapin_error("open a channel", e))?;
        within("enable publisher confirms", publisher.confirm_select(ConfirmSelectOptions::default()))
            .await?
            .map_err(|e| lapin_error("enable publisher confirms", e))?;
        Ok(Live { connection, publisher })
    }

    pub async fn close(&self) -> Result<()> {
        if !self.open.close() {
            return Ok(());
        }
        let live = self.live.write().unwrap().take();
        if let Some(live) = live {
            if live.connection.status().connected() {
                // Unconfirmed publishes were awaited by their senders; closing now is safe.
                within("close the connection", live.connection.close(200, "courier broker closed".into())).await.ok();
            }
        }
        Ok(())
    }
}

/// How long one call to the broker may take before the connection is presumed dead. A
/// dead peer that sent no reset (a dropped network, a paused VM) would otherwise leave
/// lapin's futures waiting until the heartbeat notices, or forever without heartbeats.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs one broker call under [`CALL_TIMEOUT`]; running out is a retryable error.
pub(crate) async fn within<T>(doing: &str, call: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| Error::Broker {
        backend: BACKEND,
        message: format!(
            "could not {doing}: RabbitMQ did not answer within {CALL_TIMEOUT:?}; is it overloaded or unreachable?"
        ),
        retryable: true,
        source: None,
    })
}

/// Whether a lapin error is a lost connection or channel, which a reconnect can cure.
pub(crate) fn retryable(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError => true,
        // 320 connection-forced (broker shutting down), 541 internal error, 505/506 frame trouble.
        ErrorKind::ProtocolError(amqp) => matches!(amqp.get_id(), 320 | 505 | 506 | 541),
        _ => false,
    }
}

/// A lapin error as a Courier error that says what was being done and what to do.
pub(crate) fn lapin_error(doing: &str, e: lapin::Error) -> Error {
    let hint = match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            403 => "; check the user name, password and vhost permissions",
            404 => "; the queue or exchange does not exist: declare it, or use declare=adopt (the default) to create it",
            406 => "; it exists with other settings (durability or x-queue-type): use it as it is with declare=adopt (the default), or match them, e.g. queue_type=quorum or durable=false in the URL",
            _ => "",
        },
        ErrorKind::IOError(_) => "; is RabbitMQ running and reachable?",
        _ => "",
    };
    let message = format!("could not {doing}: {e}{hint}");
    if retryable(&e) {
        Error::transient(BACKEND, message, e)
    } else {
        Error::permanent(BACKEND, message, e)
    }
}
