//! Courier's AWS SQS backend, on [aws-sdk-sqs](https://docs.rs/aws-sdk-sqs).
//!
//! Open it with an `sqs://` URL: `sqs://` (region and credentials from the standard AWS
//! chain), `sqs://eu-west-1`, or with a local server
//! `sqs://us-east-1?endpoint=http://127.0.0.1:4566`. Queues are named by the source or
//! destination (`queue:orders`, `queue:orders.fifo`); their URLs are looked up once and
//! cached. Options: `create=true|false` (create missing queues, default true),
//! `endpoint=URL`, `redrive_max_receives=N` (queues the adapter creates get a redrive
//! policy to their dead-letter queue `<queue>_dlq` after N receives, so a message whose
//! consumer keeps dying unsettled is dead-lettered by SQS itself), `pollers=N` (1-16,
//! default 1: a receive of more than 10 messages makes up to N ReceiveMessage calls in
//! parallel, for throughput when each call's round trip is the limit),
//! `call_timeout_secs=N` (2-300, default 30: an attempt of an SQS call that has no answer
//! within N seconds fails, and the SDK tries again on another connection; a receive's long
//! poll waits at most N-5 seconds, and at most 20). Any other option is an error that names
//! it (see [`UrlOptions`](courier_core::backend::UrlOptions)).
//!
//! Each clause of the contract (`docs/contract.md` in the repository) on SQS. Core's
//! receipt decides retry versus dead letter and builds the dead letter's headers; this
//! adapter carries out what it decided.
//!
//! | Courier | SQS |
//! |---|---|
//! | queue | queue (a `.fifo` name is a FIFO queue; other `.` become `_`, as SQS names allow no dots) |
//! | topic / subscription | `Unsupported` (no SNS yet) |
//! | send, batch send | SendMessage, SendMessageBatch in chunks of 10; a failed entry fails the call naming it |
//! | delay | `DelaySeconds`, up to 15 minutes |
//! | ordering key, dedup id | `MessageGroupId`, `MessageDeduplicationId`, on FIFO queues only |
//! | headers | message attributes (String; names SQS refuses travel base64url-encoded as `courier-h.<name>`, empty values as type `String.courier-empty`); SQS allows 10 per message, Courier uses up to 3 (`courier-id`, `courier-encoding`, `content-type`) |
//! | payload | the body as is when it is valid SQS text, else base64 with `courier-encoding: base64` |
//! | receive | ReceiveMessage, long polling up to 20 s, up to 10 per call, `pollers` calls in parallel |
//! | a call without an answer | fails retryably after `call_timeout_secs` (30 s), after the SDK's own retries on new connections |
//! | attempt | `ApproximateReceiveCount` |
//! | ack | DeleteMessage |
//! | redeliver (a retry core allows, with delay) | ChangeMessageVisibility to 0 (or the delay, rounded up to whole seconds) |
//! | lease, extension | the visibility timeout (whole seconds), ChangeMessageVisibility |
//! | dead letter (a reject, or a failure of the last attempt) | a send to the dead-letter queue (`<queue>.dlq`, SQS name `<queue>_dlq`) with core's reason, attempts and origin headers, then DeleteMessage |
//! | stats | ApproximateNumberOfMessages(NotVisible, Delayed) |
//! | purge | PurgeQueue (SQS allows one per queue per minute) |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod mapping;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use config::SqsConfig;
use courier_core::backend::{BackendUrl, OpenGuard};
use courier_core::{
    redact_url, Acknowledger, Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Destination,
    Error, Feature, Message, MessageId, Result, SettlePolicy, Source, Stats,
};

/// The backend's name in capabilities and errors.
pub const BACKEND: &str = "sqs";

/// SQS's largest message: 256 KiB, body and attributes together.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// An SQS broker: a cheap, cloneable handle on one SDK client.
#[derive(Clone)]
pub struct SqsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The URL, redacted.
    url: String,
    create: bool,
    redrive_max_receives: Option<u32>,
    /// Parallel ReceiveMessage calls one receive may make.
    pollers: usize,
    /// The longest a receive's long poll waits, to end well within a call's timeout.
    max_poll_secs: u64,
    capabilities: Capabilities,
    queue_urls: Mutex<HashMap<String, String>>,
    open: OpenGuard,
    requests: RequestCounter,
}

impl std::fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsBroker").field("url", &redact_url(&self.inner.url)).finish_non_exhaustive()
    }
}

/// Counts every HTTP request the SDK sends (retries included): SQS bills per request.
#[derive(Debug, Clone, Default)]
struct RequestCounter(Arc<AtomicU64>);

impl aws_sdk_sqs::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "courier-request-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_sqs::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_sqs::error::BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn sdk_error(doing: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    // Throttling, timeouts and 5xx are worth another try; the SDK already retried them.
    let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
    let retryable = ["Throttl", "timeout", "Timeout", "dispatch failure", "ServiceUnavailable", "InternalError"]
        .iter()
        .any(|s| text.contains(s));
    Error::Broker {
        backend: BACKEND,
        message: format!("could not {doing}: {text}"),
        retryable,
        source: Some(Box::new(e)),
    }
}

impl SqsBroker {
    /// Connects with an `sqs://` URL (see the crate docs).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_url(BackendUrl::parse(url)?).await
    }

    /// Connects with a parsed URL, as [`connect`](Self::connect) does with its text.
    pub async fn connect_url(url: BackendUrl) -> Result<Self> {
        let SqsConfig { region, endpoint, create, redrive_max_receives, pollers, call_timeout, redacted } =
            SqsConfig::from_backend_url(url)?;
        // The SDK sets only a connect timeout: a connection that stops answering (a
        // half-open one, a server that accepts and says nothing) would hold a call forever.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(3100).min(call_timeout))
            .operation_attempt_timeout(call_timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(Error::config(
                "sqs URL",
                "no AWS region: put one in the URL (sqs://eu-west-1) or set AWS_REGION",
            ));
        }
        let capabilities = Capabilities {
            backend: BACKEND,
            fan_out: false,
            // Both hold on FIFO queues; `send` accepts them there and refuses them elsewhere.
            ordered_keys: false,
            dedup: false,
            max_delay: Some(Duration::from_secs(15 * 60)),
            delayed_retry: true,
            lease_expiry: true,
            lease_extension: true,
            native_dead_letter: false,
            stats: true,
            purge: true,
            subscription_send: false, // no topics
            max_payload: MAX_PAYLOAD,
            // Sends are split into SendMessageBatch calls of 10; receives return up to 10.
            max_batch: 1000,
        };
        let requests = RequestCounter::default();
        let client_config = aws_sdk_sqs::config::Builder::from(&config).interceptor(requests.clone()).build();
        Ok(SqsBroker {
            inner: Arc::new(Inner {
                requests,
                client: Client::from_conf(client_config),
                url: redacted,
                create,
                redrive_max_receives,
                pollers,
                max_poll_secs: call_timeout.as_secs().saturating_sub(5).clamp(1, 20),
                capabilities,
                queue_urls: Mutex::default(),
                open: OpenGuard::new("broker"),
            }),
        })
    }
}

impl SqsBroker {
    /// SQS API requests this broker has sent so far (SQS bills per request): divide by
    /// messages handled for the cost per message.
    pub fn api_requests(&self) -> u64 {
        self.inner.requests.0.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// The queue's URL: cached, else looked up, else (in create mode) created.
    async fn queue_url(&self, name: &str) -> Result<String> {
        let name = &mapping::queue_name(name);
        if let Some(url) = self.queue_urls.lock().unwrap().get(name) {
            return Ok(url.clone());
        }
        let url = match self.client.get_queue_url().queue_name(name).send().await {
            Ok(out) => {
                // Its attributes (visibility timeout, redrive policy) are its owner's: kept.
                tracing::info!(queue = name, "using the existing queue {name} as it is");
                out.queue_url().unwrap_or_default().to_owned()
            }
            Err(e) if !self.create => {
                let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                if text.contains("NonExistentQueue") || text.contains("does not exist") {
                    return Err(Error::NotFound { kind: "queue", name: name.to_owned() });
                }
                return Err(sdk_error(&format!("look up queue {name}"), e));
            }
            Err(_) => {
                let mut create = self.client.create_queue().queue_name(name);
                if name.ends_with(".fifo") {
                    create = create.attributes(QueueAttributeName::FifoQueue, "true");
                }
                let is_dead_letter_queue = name.trim_end_matches(".fifo").ends_with("_dlq");
                if let (Some(max), false) = (self.redrive_max_receives, is_dead_letter_queue) {
                    let dlq = match name.strip_suffix(".fifo") {
                        Some(stem) => format!("{stem}_dlq.fifo"),
                        None => format!("{name}_dlq"),
                    };
                    let arn = Box::pin(self.queue_arn(&dlq)).await?;
                    let policy = format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max}"}}"#);
                    create = create.attributes(QueueAttributeName::RedrivePolicy, policy);
                }
                let out = create.send().await.map_err(|e| sdk_error(&format!("create queue {name}"), e))?;
                out.queue_url().unwrap_or_default().to_owned()
            }
        };
        self.queue_urls.lock().unwrap().insert(name.to_owned(), url.clone());
        Ok(url)
    }

    async fn queue_arn(&self, name: &str) -> Result<String> {
        let url = self.queue_url(name).await?;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("read the ARN of queue {name}"), e))?;
        out.attributes().and_then(|a| a.get(&QueueAttributeName::QueueArn)).cloned().ok_or_else(|| Error::Broker {
            backend: BACKEND,
            message: format!("queue {name} has no ARN"),
            retryable: false,
            source: None,
        })
    }

    fn check(&self, queue: &str, message: &Message) -> Result<()> {
        let fifo = queue.ends_with(".fifo");
        if fifo {
            // Ordering keys and dedup ids are FIFO features: check the rest.
            let mut plain = message.clone();
            plain.ordering_key = None;
            plain.dedup_id = None;
            self.capabilities.check_message(&plain)?;
        } else {
            self.capabilities.check_message(message)?;
        }
        mapping::check_encoded(message)
    }

    async fn send_one(&self, queue: &str, message: &Message) -> Result<()> {
        let url = self.queue_url(queue).await?;
        let body = mapping::body(message);
        let mut send = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(body.text)
            .set_message_attributes(Some(mapping::attributes(message, body.encoded)?));
        if let Some(delay) = message.delay {
            send = send.delay_seconds(delay.as_secs_f64().ceil() as i32);
        }
        if queue.ends_with(".fifo") {
            send = send
                .message_group_id(message.ordering_key.clone().unwrap_or_else(|| "default".into()))
                .message_deduplication_id(message.dedup_id.clone().unwrap_or_else(|| message.id.to_string()));
        }
        send.send().await.map_err(|e| sdk_error(&format!("send to queue {queue}"), e))?;
        Ok(())
    }
}

fn queue_of(destination: &Destination, caps: &Capabilities) -> Result<String> {
    match destination {
        Destination::Queue(q) => Ok(q.to_string()),
        Destination::Topic(_) => Err(caps.unsupported(Feature::FanOut)),
    }
}

fn source_queue(source: &Source, caps: &Capabilities) -> Result<String> {
    match source {
        Source::Queue(q) => Ok(q.to_string()),
        Source::Subscription { .. } => Err(caps.unsupported(Feature::FanOut)),
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    async fn send(&self, destination: &Destination, message: Message) -> Result<MessageId> {
        self.inner.open.check()?;
        let queue = queue_of(destination, &self.inner.capabilities)?;
        self.inner.check(&queue, &message)?;
        self.inner.send_one(&queue, &message).await?;
        Ok(message.id)
    }

    async fn send_batch(&self, destination: &Destination, messages: Vec<Message>) -> Result<Vec<MessageId>> {
        self.inner.open.check()?;
        let queue = queue_of(destination, &self.inner.capabilities)?;
        self.inner.capabilities.check_batch(&messages)?;
        for m in &messages {
            self.inner.check(&queue, m)?;
        }
        let url = self.inner.queue_url(&queue).await?;
        let fifo = queue.ends_with(".fifo");
        // SendMessageBatch takes 10 entries and 256 KiB per request.
        let mut start = 0;
        while start < messages.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < messages.len() && end - start < 10 {
                let size = mapping::encoded_size(&messages[end]);
                if end > start && bytes + size > MAX_PAYLOAD {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let entries = messages[start..end]
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let body = mapping::body(m);
                    let mut entry = SendMessageBatchRequestEntry::builder()
                        .id(format!("m{i}"))
                        .message_body(body.text)
                        .set_message_attributes(Some(mapping::attributes(m, body.encoded)?));
                    if let Some(delay) = m.delay {
                        entry = entry.delay_seconds(delay.as_secs_f64().ceil() as i32);
                    }
                    if fifo {
                        entry = entry
                            .message_group_id(m.ordering_key.clone().unwrap_or_else(|| "default".into()))
                            .message_deduplication_id(m.dedup_id.clone().unwrap_or_else(|| m.id.to_string()));
                    }
                    entry.build().map_err(|e| Error::permanent(BACKEND, "build a batch entry", e))
                })
                .collect::<Result<Vec<_>>>()?;
            // Entries SQS refused for its own reasons (throttling, internal errors) are sent
            // again; entries refused as the sender's fault are reported by id.
            let mut pending = entries;
            for round in 0.. {
                let out = self
                    .inner
                    .client
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(pending.clone()))
                    .send()
                    .await
                    .map_err(|e| sdk_error(&format!("send a batch to queue {queue}"), e))?;
                if out.failed().is_empty() {
                    break;
                }
                let retryable = out.failed().iter().all(|f| !f.sender_fault());
                if !retryable || round == 3 {
                    let failed = &out.failed()[0];
                    return Err(Error::Broker {
                        backend: BACKEND,
                        message: format!(
                            "{} of {} entries to queue {queue} were refused, e.g. entry {}: {} {}; the others were sent",
                            out.failed().len(),
                            pending.len(),
                            failed.id(),
                            failed.code(),
                            failed.message().unwrap_or_default()
                        ),
                        retryable,
                        source: None,
                    });
                }
                let failed: std::collections::HashSet<&str> = out.failed().iter().map(|f| f.id()).collect();
                pending.retain(|e| failed.contains(e.id()));
                tokio::time::sleep(Duration::from_millis(100 << round)).await;
            }
            start = end;
        }
        Ok(messages.into_iter().map(|m| m.id).collect())
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.open.check()?;
        let queue = source_queue(source, &self.inner.capabilities)?;
        let url = self.inner.queue_url(&queue).await?;
        let policy = options.settle_policy(source);
        // The dead-letter queue must exist before the first message fails.
        self.inner.queue_url(&queue_of(policy.dead_letter(), &self.inner.capabilities)?).await?;
        let (deletes, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(delete_in_batches(self.clone(), url.clone(), pending));
        let shared = Arc::new(Shared { deletes, broker: self.clone(), url: url.clone(), policy });
        Ok(Box::new(SqsConsumer {
            shared,
            source: source.clone(),
            queue,
            url,
            options,
            open: OpenGuard::new("consumer"),
        }))
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.open.check()?;
        let queue = source_queue(source, &self.inner.capabilities)?;
        self.inner.queue_url(&queue).await.map(|_| ())
    }

    async fn stats(&self, source: &Source) -> Result<Stats> {
        self.inner.open.check()?;
        let queue = source_queue(source, &self.inner.capabilities)?;
        let counts = |name: String| async move {
            let url = self.inner.queue_url(&name).await?;
            let out = self
                .inner
                .client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                .send()
                .await
                .map_err(|e| sdk_error(&format!("read the attributes of queue {name}"), e))?;
            let get = |a: QueueAttributeName| {
                out.attributes().and_then(|m| m.get(&a)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            };
            Ok::<_, Error>((
                get(QueueAttributeName::ApproximateNumberOfMessages),
                get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
                get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            ))
        };
        let (depth, in_flight, delayed) = counts(queue.clone()).await?;
        let (dead, dead_in_flight, _) = counts(format!("{queue}.dlq")).await?;
        Ok(Stats { depth, in_flight, delayed, dead_lettered: dead + dead_in_flight, oldest_age: None })
    }

    async fn purge(&self, source: &Source) -> Result<u64> {
        self.inner.open.check()?;
        let before = self.stats(source).await?;
        let queue = source_queue(source, &self.inner.capabilities)?;
        let url = self.inner.queue_url(&queue).await?;
        self.inner
            .client
            .purge_queue()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("purge {queue}"), e))?;
        Ok(before.depth + before.delayed)
    }

    async fn close(&self) -> Result<()> {
        self.inner.open.close();
        Ok(())
    }
}

/// A consumer of one SQS queue.
pub struct SqsConsumer {
    shared: Arc<Shared>,
    source: Source,
    queue: String,
    url: String,
    options: ConsumerOptions,
    open: OpenGuard,
}

fn whole_seconds(d: Duration) -> i32 {
    (d.as_secs_f64().ceil() as i64).clamp(0, 12 * 3600) as i32
}

impl SqsConsumer {
    /// One ReceiveMessage call: up to `max` (1-10) messages, waiting up to `wait_secs`.
    async fn poll(&self, max: i32, wait_secs: i32) -> Result<Vec<aws_sdk_sqs::types::Message>> {
        let out = self
            .shared
            .broker
            .inner
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait_secs)
            .visibility_timeout(whole_seconds(self.options.lease).max(1))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_error(&format!("receive from queue {}", self.queue), e))?;
        Ok(out.messages.unwrap_or_default())
    }
}

#[async_trait]
impl Consumer for SqsConsumer {
    fn source(&self) -> &Source {
        &self.source
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.open.check()?;
        self.shared.broker.inner.open.check()?;
        let deadline = tokio::time::Instant::now() + wait;
        // Several pollers: a large receive asks SQS in parallel calls of up to 10 each.
        let calls = max.div_ceil(10).clamp(1, self.shared.broker.inner.pollers);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // SQS waits in whole seconds (0-20). A wait a hair under a whole second (the time
            // spent getting here) counts as that second, rather than as a short poll and a sleep.
            let poll = (left + Duration::from_millis(50)).as_secs().min(self.shared.broker.inner.max_poll_secs) as i32;
            let per_call = max.div_ceil(calls).clamp(1, 10);
            let polls = futures::future::join_all((0..calls).map(|_| self.poll(per_call as i32, poll))).await;
            // What one call received is leased to us: should another call fail, those are
            // still delivered, not left invisible until their lease runs out.
            let (mut messages, mut failed) = (Vec::new(), None);
            for poll in polls {
                match poll {
                    Ok(some) => messages.extend(some),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                if messages.is_empty() {
                    return Err(e);
                }
                tracing::warn!(queue = %self.queue, error = %e, "one of several parallel receives failed; delivering what the others got");
            }
            let mut deliveries = Vec::with_capacity(messages.len());
            for m in &messages {
                let received = mapping::message(m);
                let acker = SqsAcker {
                    consumer: self.shared.clone(),
                    handle: received.handle,
                    id: received.message.id.clone(),
                    message: received.message.clone(),
                };
                let delivery = Delivery::new(received.message, received.attempt, Box::new(acker));
                match received.poison {
                    None => deliveries.push(delivery),
                    // Dead-lettered on its own, while the others go on; should that fail,
                    // SQS brings it back after its lease to try again.
                    Some(reason) => {
                        let queue = self.queue.clone();
                        tokio::spawn(async move {
                            let id = delivery.id.clone();
                            if let Err(e) = delivery.reject(&reason).await {
                                tracing::warn!(%id, queue, error = %e, "could not dead-letter an undecodable message; it comes back after its lease");
                            }
                        });
                    }
                }
            }
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            if left < Duration::from_secs(1) {
                tokio::time::sleep(left).await;
                return Ok(Vec::new());
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.open.close();
        Ok(())
    }
}

/// One delete waiting for its batch: the receipt handle, and who to tell.
type PendingDelete = (String, tokio::sync::oneshot::Sender<Result<()>>);

struct Shared {
    deletes: tokio::sync::mpsc::UnboundedSender<PendingDelete>,
    broker: SqsBroker,
    url: String,
    /// Core's policy: the source, the attempt limit and the dead-letter destination.
    policy: Arc<SettlePolicy>,
}

struct SqsAcker {
    consumer: Arc<Shared>,
    handle: String,
    id: MessageId,
    /// Dead-lettering sends a copy of the message (SQS has no move between queues).
    message: Message,
}

impl SqsAcker {
    /// Deletes the message; acks that arrive together go out as one DeleteMessageBatch.
    async fn delete(&self) -> Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.consumer.deletes.send((self.handle.clone(), done)).map_err(|_| Error::Closed { what: "consumer" })?;
        result.await.map_err(|_| Error::retryable("the SQS delete task stopped"))?
    }

    async fn visibility(&self, seconds: i32) -> Result<()> {
        let inner = &self.consumer.broker.inner;
        inner
            .client
            .change_message_visibility()
            .queue_url(&self.consumer.url)
            .receipt_handle(&self.handle)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| {
                let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                if text.contains("ReceiptHandleIsInvalid") || text.contains("not a valid") || text.contains("expired") {
                    Error::LeaseLost { id: self.id.clone() }
                } else {
                    sdk_error("change a message's visibility", e)
                }
            })?;
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for SqsAcker {
    fn policy(&self) -> &SettlePolicy {
        &self.consumer.policy
    }

    async fn ack(&self) -> Result<()> {
        self.delete().await
    }

    async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
        self.visibility(delay.map(whole_seconds).unwrap_or(0)).await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let queue = queue_of(letter.destination(), &self.consumer.broker.inner.capabilities)?;
        let dead = letter.apply(self.message.clone());
        self.consumer.broker.inner.send_one(&queue, &dead).await?;
        self.delete().await
    }

    async fn extend_lease(&self, by: Duration) -> Result<()> {
        self.visibility(whole_seconds(by).max(1)).await
    }
}

/// Sends the deletes of one consumer in batches of up to 10: each batch takes every
/// delete already waiting, so concurrent acks (a worker's fetch loops, or a batch acked
/// together) cost one request per 10 messages, while a lone ack goes out at once.
async fn delete_in_batches(
    broker: SqsBroker,
    url: String,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<PendingDelete>,
) {
    use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        // Let acks issued in the same moment join: acks of one batch may be issued from
        // another thread while this task already runs, so linger 2 ms (a request costs
        // far more) before sending a batch that is not full.
        for linger in [Duration::ZERO, Duration::from_millis(2)] {
            if batch.len() == 10 {
                break;
            }
            tokio::time::sleep(linger).await;
            while batch.len() < 10 {
                match pending.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let entries: Vec<_> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, (handle, _))| {
                DeleteMessageBatchRequestEntry::builder().id(format!("d{i}")).receipt_handle(handle).build().ok()
            })
            .collect();
        let result = broker.inner.client.delete_message_batch().queue_url(&url).set_entries(Some(entries)).send().await;
        match result {
            Ok(out) => {
                let failed: HashMap<String, String> = out
                    .failed()
                    .iter()
                    .map(|f| (f.id().to_owned(), format!("{} {}", f.code(), f.message().unwrap_or_default())))
                    .collect();
                for (i, (_, done)) in batch.into_iter().enumerate() {
                    let outcome = match failed.get(&format!("d{i}")) {
                        None => Ok(()),
                        Some(why) => Err(Error::Broker {
                            backend: BACKEND,
                            message: format!("could not delete a message: {why}"),
                            retryable: !why.contains("ReceiptHandleIsInvalid"),
                            source: None,
                        }),
                    };
                    done.send(outcome).ok();
                }
            }
            Err(e) => {
                let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                for (_, done) in batch {
                    done.send(Err(Error::Broker {
                        backend: BACKEND,
                        message: format!("could not delete messages: {text}"),
                        retryable: true,
                        source: None,
                    }))
                    .ok();
                }
            }
        }
    }
}
