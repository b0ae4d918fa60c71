//! The AWS Lambda RabbitMQ event (Amazon MQ for RabbitMQ).
//!
//! Each message becomes a Courier message the way the RabbitMQ adapter reads one: `data`
//! base64-decoded as the payload, `messageId` the id (a fresh one when `null`),
//! `contentType` the content type, header values rendered as text (`{"bytes": [...]}` as
//! UTF-8, or base64 when it is not; numbers and booleans as written), `correlationId`,
//! `replyTo`, `type` and `appId` as the headers `amqp-correlation-id`, `amqp-reply-to`,
//! `amqp-type` and `amqp-app-id`, and the attempt from Courier's `x-courier-attempt`
//! header, plus one when `redelivered`. Every basic property may be `null` (real events
//! carry `"priority": null`). The queue name is the part of the `"<queue>::<vhost>"` key
//! before `::`.
//!
//! All or nothing: Lambda acks the whole batch when the invocation succeeds and requeues
//! it all when it fails. Messages run in order; the first failure stops the batch and
//! fails the invocation, so the messages before it run again on redelivery (handlers
//! must be idempotent).

use std::collections::BTreeMap;

use courier_core::{Error, Message, MessageId, Result};
use serde::Deserialize;
use serde_json::Value;

use super::{decode_base64, malformed, origin, text_or_base64, Trigger};
use crate::handler::Incoming;

/// A RabbitMQ event as Lambda delivers it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqEvent {
    /// `aws:rmq`.
    #[serde(default)]
    pub event_source: Option<String>,
    /// The broker's ARN.
    #[serde(default)]
    pub event_source_arn: Option<String>,
    /// Messages by `"<queue>::<vhost>"`, in queue order.
    pub rmq_messages_by_queue: BTreeMap<String, Vec<RabbitMqMessage>>,
}

/// One RabbitMQ message in an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqMessage {
    /// The AMQP basic properties; any of them may be `null`.
    #[serde(default)]
    pub basic_properties: Option<BasicProperties>,
    /// Whether RabbitMQ delivered it before.
    #[serde(default)]
    pub redelivered: Option<bool>,
    /// The base64 body.
    #[serde(default)]
    pub data: Option<String>,
}

/// AMQP basic properties as Lambda renders them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)] // the AMQP 0-9-1 property names
pub struct BasicProperties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Option<BTreeMap<String, Value>>,
    pub delivery_mode: Option<i64>,
    pub priority: Option<i64>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// A date as text (`"Jan 1, 1970, 12:33:41 AM"`) or a number; kept as given.
    pub timestamp: Option<Value>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub cluster_id: Option<String>,
    pub body_size: Option<u64>,
}

/// Renders a header value the way the RabbitMQ adapter does.
fn render(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Object(map) => match map.get("bytes").and_then(Value::as_array) {
            Some(bytes) if map.len() == 1 => {
                let bytes: Option<Vec<u8>> = bytes
                    .iter()
                    .map(|b| b.as_i64().and_then(|b| u8::try_from(b).ok().or(i8::try_from(b).ok().map(|s| s as u8))))
                    .collect();
                bytes.map(|b| text_or_base64(&b)).unwrap_or_else(|| value.to_string())
            }
            _ => value.to_string(),
        },
        Value::Array(_) => value.to_string(),
    }
}

impl RabbitMqMessage {
    /// The message as a handler sees it, from the queue named by its event key.
    pub fn to_incoming(&self, queue: &str) -> Result<Incoming> {
        const WHAT: &str = "RabbitMQ event message";
        let payload = match &self.data {
            Some(data) => decode_base64(WHAT, "data", data)?,
            None => Vec::new(),
        };
        let props = self.basic_properties.clone().unwrap_or_default();
        let id = props.message_id.as_deref().map(MessageId::from).unwrap_or_else(MessageId::generate);
        let mut message = Message::new(payload).with_id(id);
        message.content_type = props.content_type.clone();
        let mut attempt: u32 = 1;
        for (name, value) in props.headers.iter().flatten() {
            let text = render(value);
            if name == "x-courier-attempt" {
                attempt = text.parse().unwrap_or(1);
            } else {
                message.headers.insert(name.clone(), text);
            }
        }
        for (name, value) in [
            ("amqp-correlation-id", &props.correlation_id),
            ("amqp-reply-to", &props.reply_to),
            ("amqp-type", &props.kind),
            ("amqp-app-id", &props.app_id),
        ] {
            if let Some(v) = value {
                message.headers.insert(name.to_owned(), v.clone());
            }
        }
        if self.redelivered == Some(true) {
            attempt = attempt.saturating_add(1);
        }
        Ok(Incoming::new(message, attempt, origin(queue)))
    }
}

impl Trigger {
    /// Runs the handler over a RabbitMQ event: `Ok` when every message succeeded, else the
    /// first failure (Lambda requeues the whole batch).
    pub async fn rabbitmq(&self, event: RabbitMqEvent) -> Result<()> {
        for (key, messages) in &event.rmq_messages_by_queue {
            let queue = key.split_once("::").map_or(key.as_str(), |(q, _)| q);
            for (n, msg) in messages.iter().enumerate() {
                let (id, result) = match msg.to_incoming(queue) {
                    Ok(incoming) => (incoming.message.id.to_string(), self.process(incoming).await),
                    Err(e) => {
                        let id = msg.basic_properties.as_ref().and_then(|p| p.message_id.clone());
                        let id = id.unwrap_or_else(|| format!("{queue}#{}", n + 1));
                        (id.clone(), self.settle_undecodable(id, msg.data.as_deref(), origin(queue), e).await)
                    }
                };
                if let Err(reason) = result {
                    return Err(Error::Other {
                        message: format!(
                            "message {id} ({} of {} from {queue}) failed: {reason}; Lambda requeues the batch",
                            n + 1,
                            messages.len()
                        ),
                        retryable: true,
                    });
                }
            }
        }
        Ok(())
    }

    /// [`rabbitmq`](Self::rabbitmq) from the event's JSON; a malformed event is an error
    /// naming the field.
    pub async fn rabbitmq_json(&self, event: &[u8]) -> Result<()> {
        let event: RabbitMqEvent = serde_json::from_slice(event).map_err(|e| malformed("RabbitMQ event", e))?;
        self.rabbitmq(event).await
    }
}
