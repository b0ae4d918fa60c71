//! HTTP push (feature `http`): CloudEvents over HTTP (binary and structured mode) and the
//! Google Pub/Sub push envelope, served by an [`axum`] router.
//!
//! | request | message |
//! |---|---|
//! | CloudEvents binary: `ce-specversion` header | body as payload, `Content-Type` as content type, `ce-id` as id, every `ce-*` header as a header |
//! | CloudEvents structured: `Content-Type: application/cloudevents+json` | `data` (JSON as its text, a string as its bytes) or `data_base64` as payload, `datacontenttype` as content type, `id` as id, the other attributes as `ce-<name>` headers |
//! | Pub/Sub push: `{"message": {...}, "subscription": "..."}` | `message.data` (base64) as payload, `message.attributes` as headers, `messageId` as id, `orderingKey` as ordering key, `deliveryAttempt` as attempt, `subscription` as the header `pubsub-subscription` (data: the origin of a dead letter is always the route's source) |
//!
//! Answers: [`Outcome::Ack`] is `204 No Content`; a retry is
//! `503 Service Unavailable` (with `Retry-After` when the handler asked for a delay), which
//! push senders redeliver; a rejection dead-letters through the trigger's dead-letter
//! destination and answers `204`, or without one answers `422 Unprocessable Entity`, which
//! senders do not retry as such (Pub/Sub redelivers every non-2xx until the subscription's
//! dead-letter policy takes it); a request that is none of the above gets
//! `400 Bad Request` naming what is wrong.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use courier_core::{Message, Result, Source};
use serde::Deserialize;
use serde_json::Value;

use super::{decode_base64, malformed, Trigger};

/// The header carrying the subscription a Pub/Sub push envelope names.
pub const PUBSUB_SUBSCRIPTION_HEADER: &str = "pubsub-subscription";
use crate::handler::{Incoming, Outcome};

/// A router that runs `trigger` for every push POSTed to `/`, as messages from `source`.
///
/// ```
/// # async fn handle_order(_: courier::Json<serde_json::Value>) {}
/// # async fn serve() -> std::io::Result<()> {
/// let trigger = courier::trigger::Trigger::new(handle_order);
/// let app = courier::trigger::http::router(trigger, courier::Source::queue("orders").unwrap());
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// axum::serve(listener, app).await
/// # }
/// ```
pub fn router(trigger: Trigger, source: Source) -> Router {
    Router::new().route("/", post(push)).with_state((trigger, source))
}

async fn push(State((trigger, source)): State<(Trigger, Source)>, headers: HeaderMap, body: Bytes) -> Response {
    let incoming = match parse(&headers, body, source) {
        Ok(incoming) => incoming,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let id = incoming.message.id.clone();
    let outcome = trigger.run(incoming.clone()).await;
    match outcome {
        Outcome::Ack => StatusCode::NO_CONTENT.into_response(),
        Outcome::Retry { after, reason } => {
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, format!("retry {id}: {reason}\n")).into_response();
            if let Some(after) = after {
                let secs = after.as_secs_f64().ceil() as u64;
                response.headers_mut().insert("retry-after", HeaderValue::from(secs.max(1)));
            }
            response
        }
        Outcome::Reject { reason } => match trigger.settle_rejection(incoming, reason.clone()).await {
            Some(Ok(())) => StatusCode::NO_CONTENT.into_response(),
            Some(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("rejected {id}, dead-lettering failed: {e}\n"))
                .into_response(),
            None => (StatusCode::UNPROCESSABLE_ENTITY, format!("rejected {id}: {reason}\n")).into_response(),
        },
    }
}

/// Pub/Sub's push envelope.
#[derive(Deserialize)]
struct PubSubPush {
    message: PubSubMessage,
    #[serde(default)]
    subscription: Option<String>,
    #[serde(default, rename = "deliveryAttempt")]
    delivery_attempt: Option<u32>,
}

#[derive(Deserialize)]
struct PubSubMessage {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default, alias = "message_id")]
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(default, rename = "orderingKey")]
    ordering_key: Option<String>,
}

/// Reads a push request into an incoming message.
pub fn parse(headers: &HeaderMap, body: Bytes, source: Source) -> Result<Incoming> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if headers.contains_key("ce-specversion") {
        return binary_cloudevent(headers, body, content_type, source);
    }
    if content_type.starts_with("application/cloudevents+json") {
        return structured_cloudevent(&body, source);
    }
    let json: Value = serde_json::from_slice(&body).map_err(|_| {
        malformed(
            "push request",
            "not CloudEvents (no ce-specversion header, Content-Type is not application/cloudevents+json) and not a Pub/Sub push envelope (body is not JSON)",
        )
    })?;
    if json.get("message").is_none() {
        return Err(malformed(
            "push request",
            "a JSON body without \"message\": not a Pub/Sub push envelope, and not CloudEvents (no ce-specversion header)",
        ));
    }
    let push: PubSubPush = serde_json::from_value(json).map_err(|e| malformed("Pub/Sub push envelope", e))?;
    let payload = match &push.message.data {
        Some(data) => decode_base64("Pub/Sub push envelope", "message.data", data)?,
        None => Vec::new(),
    };
    let mut message = Message::new(payload);
    if let Some(id) = push.message.message_id {
        message = message.with_id(id);
    }
    message.headers.extend(push.message.attributes);
    message.ordering_key = push.message.ordering_key.filter(|k| !k.is_empty());
    // What the caller says is data: the subscription it names is a header, never the
    // origin a dead letter records (a redrive sends there), which is the route's own.
    if let Some(subscription) = push.subscription {
        message.headers.insert(PUBSUB_SUBSCRIPTION_HEADER.to_owned(), subscription);
    }
    Ok(Incoming::new(message, push.delivery_attempt.unwrap_or(1), source))
}

fn binary_cloudevent(headers: &HeaderMap, body: Bytes, content_type: String, source: Source) -> Result<Incoming> {
    let mut message = Message::new(body);
    for (name, value) in headers {
        if let Some(attribute) = name.as_str().strip_prefix("ce-") {
            let value = value.to_str().map_err(|_| malformed("CloudEvent", format!("header {name} is not text")))?;
            if attribute == "id" {
                message = message.with_id(value);
            }
            message.headers.insert(name.as_str().to_owned(), value.to_owned());
        }
    }
    for required in ["ce-id", "ce-source", "ce-type"] {
        if !message.headers.contains_key(required) {
            return Err(malformed("CloudEvent", format!("binary mode needs the {required} header")));
        }
    }
    if !content_type.is_empty() {
        message.content_type = Some(content_type);
    }
    Ok(Incoming::new(message, 1, source))
}

fn structured_cloudevent(body: &[u8], source: Source) -> Result<Incoming> {
    let event: BTreeMap<String, Value> = serde_json::from_slice(body).map_err(|e| malformed("CloudEvent", e))?;
    let text = |key: &str| event.get(key).and_then(Value::as_str);
    let id = text("id").ok_or_else(|| malformed("CloudEvent", "structured mode needs an \"id\" string"))?;
    for required in ["source", "type", "specversion"] {
        if text(required).is_none() {
            return Err(malformed("CloudEvent", format!("structured mode needs a \"{required}\" string")));
        }
    }
    let payload = match (event.get("data_base64"), event.get("data")) {
        (Some(Value::String(b64)), _) => decode_base64("CloudEvent", "data_base64", b64)?,
        (_, Some(Value::String(s))) => s.clone().into_bytes(),
        (_, Some(value)) => serde_json::to_vec(value).expect("a JSON value serialises"),
        (_, None) => Vec::new(),
    };
    let mut message = Message::new(payload).with_id(id);
    message.content_type = text("datacontenttype").map(str::to_owned);
    for (key, value) in &event {
        if matches!(key.as_str(), "data" | "data_base64" | "datacontenttype") {
            continue;
        }
        let value = value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
        message.headers.insert(format!("ce-{key}"), value);
    }
    Ok(Incoming::new(message, 1, source))
}
