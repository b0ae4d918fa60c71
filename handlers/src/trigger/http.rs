//! HTTP push (feature `http`): CloudEvents over HTTP (binary and structured mode) and the
//! Google Pub/Sub push envelope, served by an [`axum`] router.
//!
//! | request | message |
//! |---|---|
//! | CloudEvents binary: `ce-specversion` header | body as payload, `Content-Type` as content type, `ce-id` as id, every `ce-*` header as a header |
//! | CloudEvents structured: `Content-Type: application/cloudevents+json` | `data` (JSON as its text, a string as its bytes) or `data_base64` as payload, `datacontenttype` as content type, `id` as id, the other attributes as `ce-<name>` headers |
//!
//! The CloudEvents distributed-tracing extension (`ce-traceparent`, the `traceparent`
//! attribute, or in binary mode a plain `traceparent` header) becomes the message's
//! `traceparent`, so the handler's span joins the sender's trace. A Pub/Sub attribute
//! named `traceparent` does the same, as every attribute becomes a header.
//! | Pub/Sub push: `{"message": {...}, "subscription": "..."}` | `message.data` (base64) as payload, `message.attributes` as headers, `messageId` as id, `orderingKey` as ordering key, `deliveryAttempt` as attempt, `subscription` as the header `pubsub-subscription` (data: the origin of a dead letter is always the route's source) |
//!
//! Answers: [`Outcome::Ack`] is `204 No Content`; a retry is
//! `503 Service Unavailable` (with `Retry-After` when the handler asked for a delay), which
//! push senders redeliver; a rejection dead-letters through the trigger's dead-letter
//! destination and answers `204`, or without one answers `422 Unprocessable Entity`, which
//! senders do not retry as such (Pub/Sub redelivers every non-2xx until the subscription's
//! dead-letter policy takes it); a request that is none of the above gets
//! `400 Bad Request` naming what is wrong.

//!
//! # Who may push, and how much
//!
//! [`PushOptions`] say who may call ([`PushAuth`]: a shared secret, or the OIDC token
//! Pub/Sub push sends, checked against a JWKS, audience and issuer; a failed check is
//! `401`), how many pushes run at once (64 by default; a push that finds no room within
//! the handler timeout gets `503` and comes again), how long a handler may take (30 s;
//! past it, `503` and the sender redelivers), and the largest body (10 MiB; larger is
//! `413`). Answers never carry a handler's or a broker's error text, which may hold
//! internals: they go to the log, and the caller gets the message id and a generic word.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use courier_core::{Error, Message, Result, Source};
use serde::Deserialize;
use serde_json::Value;

use super::{decode_base64, malformed, Trigger};
use crate::handler::{Incoming, Outcome};

/// The header carrying the subscription a Pub/Sub push envelope names.
pub const PUBSUB_SUBSCRIPTION_HEADER: &str = "pubsub-subscription";

/// A router that runs `trigger` for every push POSTed to `/`, as messages from `source`,
/// with [`PushOptions::default`]: no authentication (put it behind a proxy that
/// authenticates, or use [`router_with`]), 64 pushes at once, 30 s per handler, 10 MiB
/// bodies.
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
    router_with(trigger, source, PushOptions::default())
}

/// A router as [`router`] makes, with `options`: who may push, how many at once, for how
/// long, how large.
///
/// ```
/// use std::time::Duration;
/// use courier::trigger::http::{router_with, OidcVerifier, PushOptions};
///
/// # async fn handle_order(_: courier::Json<serde_json::Value>) {}
/// # fn app(jwks: &str) -> Result<axum::Router, courier::Error> {
/// // Pub/Sub push with an OIDC token: the JWKS is Google's (https://www.googleapis.com/oauth2/v3/certs),
/// // fetched and refreshed by the application; the audience is the one set on the subscription.
/// let verifier = OidcVerifier::from_jwks(jwks, "https://orders.example.com/push")?;
/// let options = PushOptions::default().oidc(verifier).max_concurrent(16).handler_timeout(Duration::from_secs(10));
/// let trigger = courier::trigger::Trigger::new(handle_order);
/// Ok(router_with(trigger, courier::Source::queue("orders")?, options))
/// # }
/// ```
pub fn router_with(trigger: Trigger, source: Source, options: PushOptions) -> Router {
    let permits = tokio::sync::Semaphore::new(options.max_concurrent);
    let max_body = options.max_body;
    let endpoint = Arc::new(Endpoint { trigger, source, options, permits });
    Router::new().route("/", post(push)).layer(DefaultBodyLimit::max(max_body)).with_state(endpoint)
}

/// Who may push to an endpoint.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum PushAuth {
    /// Anyone: for an endpoint behind a proxy that authenticates, or on a private network.
    #[default]
    None,
    /// Callers sending `Authorization: Bearer <secret>` (compared in constant time).
    SharedSecret(Arc<str>),
    /// Callers sending `Authorization: Bearer <JWT>` that the verifier accepts: Pub/Sub
    /// push with an OIDC token.
    Oidc(Arc<OidcVerifier>),
}

impl std::fmt::Debug for PushAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushAuth::None => "None",
            PushAuth::SharedSecret(_) => "SharedSecret(***)",
            PushAuth::Oidc(_) => "Oidc",
        })
    }
}

/// Settings of a push endpoint: see [`router_with`].
#[derive(Debug, Clone)]
pub struct PushOptions {
    auth: PushAuth,
    max_concurrent: usize,
    handler_timeout: Duration,
    max_body: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            auth: PushAuth::None,
            max_concurrent: 64,
            handler_timeout: Duration::from_secs(30),
            max_body: 10 * 1024 * 1024,
        }
    }
}

impl PushOptions {
    /// Accept only `Authorization: Bearer <secret>`.
    pub fn shared_secret(mut self, secret: impl Into<String>) -> Self {
        self.auth = PushAuth::SharedSecret(Arc::from(secret.into()));
        self
    }

    /// Accept only OIDC tokens `verifier` accepts.
    pub fn oidc(mut self, verifier: OidcVerifier) -> Self {
        self.auth = PushAuth::Oidc(Arc::new(verifier));
        self
    }

    /// Pushes handled at once (default 64); others wait, up to the handler timeout.
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// How long a handler may run (default 30 s) before the push is answered `503` and
    /// the sender redelivers it.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// The largest body accepted, in bytes (default 10 MiB); larger gets `413`.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

/// Checks OIDC tokens (JWTs) as Pub/Sub push sends them: signed (RS256 or ES256) by a
/// key of a JWKS, for the expected audience, from an expected issuer, not expired (one
/// minute of clock skew allowed).
pub struct OidcVerifier {
    keys: Vec<(Option<String>, jsonwebtoken::DecodingKey)>,
    audience: String,
    issuers: Vec<String>,
}

impl OidcVerifier {
    /// Google's issuers, the default.
    const GOOGLE_ISSUERS: [&'static str; 2] = ["https://accounts.google.com", "accounts.google.com"];

    /// A verifier for tokens signed by a key of the JWKS document `jwks` (JSON, as
    /// served at an issuer's `jwks_uri`), whose `aud` is `audience`, issued by Google.
    pub fn from_jwks(jwks: &str, audience: impl Into<String>) -> Result<Self> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(jwks).map_err(|e| Error::config("JWKS", format!("not a JWKS document: {e}")))?;
        let keys = set
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone(), jsonwebtoken::DecodingKey::from_jwk(jwk).ok()?)))
            .collect::<Vec<_>>();
        if keys.is_empty() {
            return Err(Error::config("JWKS", "it has no RSA or EC key to verify tokens with"));
        }
        let issuers = Self::GOOGLE_ISSUERS.iter().map(|s| s.to_string()).collect();
        Ok(OidcVerifier { keys, audience: audience.into(), issuers })
    }

    /// Accept tokens from these issuers instead of Google's.
    pub fn issuers<I: Into<String>>(mut self, issuers: impl IntoIterator<Item = I>) -> Self {
        self.issuers = issuers.into_iter().map(Into::into).collect();
        self
    }

    /// Whether `token` is signed by one of the keys, for the audience, from an issuer,
    /// and unexpired; the error says which check failed (for the log, not the caller).
    pub fn verify(&self, token: &str) -> std::result::Result<(), String> {
        use jsonwebtoken::Algorithm;
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(format!("algorithm {:?} is not accepted (RS256 or ES256)", header.alg));
        }
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&self.issuers);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        let candidates = self.keys.iter().filter(|(kid, _)| header.kid.is_none() || kid == &header.kid);
        let mut last = String::from("no key of the JWKS has the token's key id");
        for (_, key) in candidates {
            match jsonwebtoken::decode::<Value>(token, key, &validation) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

struct Endpoint {
    trigger: Trigger,
    source: Source,
    options: PushOptions,
    permits: tokio::sync::Semaphore,
}

/// Equal bytes, compared without an early exit (the length may show).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

impl Endpoint {
    fn authorize(&self, headers: &HeaderMap) -> std::result::Result<(), String> {
        let bearer = || {
            let value = headers.get("authorization").and_then(|v| v.to_str().ok());
            value.and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| "no Authorization: Bearer header".to_owned())
        };
        match &self.options.auth {
            PushAuth::None => Ok(()),
            PushAuth::SharedSecret(secret) => {
                if same_secret(bearer()?.as_bytes(), secret.as_bytes()) {
                    Ok(())
                } else {
                    Err("wrong shared secret".into())
                }
            }
            PushAuth::Oidc(verifier) => verifier.verify(bearer()?),
        }
    }
}

fn answer(status: StatusCode, text: String) -> Response {
    (status, text).into_response()
}

async fn push(State(endpoint): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = endpoint.authorize(&headers) {
        tracing::warn!(%why, "push refused: not authorized");
        return answer(StatusCode::UNAUTHORIZED, "unauthorized\n".into());
    }
    let timeout = endpoint.options.handler_timeout;
    let Ok(Ok(_permit)) = tokio::time::timeout(timeout, endpoint.permits.acquire()).await else {
        let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, "busy; push again later\n".into());
        response.headers_mut().insert("retry-after", HeaderValue::from(1));
        return response;
    };
    let incoming = match parse(&headers, body, endpoint.source.clone()) {
        Ok(incoming) => incoming,
        // About the caller's own request: safe, and what it needs to fix it.
        Err(e) => return answer(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let id = incoming.message.id.clone();
    let outcome = match tokio::time::timeout(timeout, endpoint.trigger.run(incoming.clone())).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::retry(format!("the handler ran past {timeout:?}")),
    };
    match outcome {
        Outcome::Ack => StatusCode::NO_CONTENT.into_response(),
        Outcome::Retry { after, reason } => {
            tracing::warn!(%id, %reason, "push answered 503: the sender redelivers it");
            let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, format!("retry {id}\n"));
            if let Some(after) = after {
                let secs = after.as_secs_f64().ceil() as u64;
                response.headers_mut().insert("retry-after", HeaderValue::from(secs.max(1)));
            }
            response
        }
        Outcome::Reject { reason } => match endpoint.trigger.settle_rejection(incoming, reason.clone()).await {
            Some(Ok(())) => StatusCode::NO_CONTENT.into_response(),
            Some(Err(e)) => {
                tracing::warn!(%id, %reason, error = %e, "push rejected, and dead-lettering it failed; answered 503");
                answer(StatusCode::SERVICE_UNAVAILABLE, format!("retry {id}\n"))
            }
            None => {
                tracing::warn!(%id, %reason, "push rejected; no dead-letter destination, answered 422");
                answer(StatusCode::UNPROCESSABLE_ENTITY, format!("rejected {id}\n"))
            }
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
    // The distributed-tracing extension (`ce-traceparent`), else the W3C header itself:
    // the handler's span joins the sender's trace.
    let trace =
        message.headers.get("ce-traceparent").cloned().or_else(|| {
            headers.get(courier_core::headers::TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_owned)
        });
    if let Some(trace) = trace {
        message.headers.insert(courier_core::headers::TRACEPARENT.to_owned(), trace);
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
    // The distributed-tracing extension: the handler's span joins the sender's trace.
    if let Some(trace) = text("traceparent") {
        message.headers.insert(courier_core::headers::TRACEPARENT.to_owned(), trace.to_owned());
    }
    Ok(Incoming::new(message, 1, source))
}
