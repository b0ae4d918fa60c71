//! HTTP push: CloudEvents (binary and structured) and Pub/Sub envelopes in, status codes out.
#![cfg(feature = "http")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use courier::trigger::{http::router, Trigger};
use courier::{Destination, Incoming, LocalBroker, Outcome, Source};
use tower::ServiceExt;

type Seen = Arc<Mutex<Vec<Incoming>>>;

/// A trigger whose handler records each message and answers by its payload.
fn trigger(seen: Seen) -> Trigger {
    Trigger::new(move |incoming: Incoming| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8_lossy(&incoming.message.payload).into_owned();
            seen.lock().unwrap().push(incoming);
            match body.as_str() {
                "retry" => Outcome::retry_after(Duration::from_secs(30), "try later"),
                "reject" => Outcome::reject("never valid"),
                "panic" => panic!("handler bug"),
                _ => Outcome::Ack,
            }
        }
    })
}

async fn post(app: axum::Router, request: Request<Body>) -> (StatusCode, Option<String>, String) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, retry_after, String::from_utf8_lossy(&body).into_owned())
}

fn source() -> Source {
    Source::queue("orders").unwrap()
}

fn binary(body: &'static str) -> Request<Body> {
    Request::post("/")
        .header("ce-specversion", "1.0")
        .header("ce-id", "evt-1")
        .header("ce-source", "/shop/orders")
        .header("ce-type", "com.example.order.created")
        .header("content-type", "text/plain")
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn cloudevents_binary_mode_maps_headers_and_answers_by_outcome() {
    let seen = Seen::default();
    let app = router(trigger(seen.clone()), source());
    assert_eq!(post(app.clone(), binary("fine")).await.0, StatusCode::NO_CONTENT);
    let (status, retry_after, _) = post(app.clone(), binary("retry")).await;
    assert_eq!((status, retry_after.as_deref()), (StatusCode::SERVICE_UNAVAILABLE, Some("30")));
    let (status, _, body) = post(app.clone(), binary("reject")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(post(app.clone(), binary("panic")).await.0, StatusCode::SERVICE_UNAVAILABLE, "a panic asks for a retry");
    let seen = seen.lock().unwrap();
    let m = &seen[0].message;
    assert_eq!((m.id.as_str(), m.content_type.as_deref()), ("evt-1", Some("text/plain")));
    assert_eq!(m.header("ce-type"), Some("com.example.order.created"));
    assert_eq!(seen[0].source, source());
}

#[tokio::test]
async fn cloudevents_structured_mode_with_json_and_base64_data() {
    let seen = Seen::default();
    let app = router(trigger(seen.clone()), source());
    let event = r#"{"specversion":"1.0","id":"e-2","source":"/shop","type":"order","datacontenttype":"application/json","data":{"total":5},"tenant":"acme"}"#;
    let request =
        Request::post("/").header("content-type", "application/cloudevents+json").body(Body::from(event)).unwrap();
    assert_eq!(post(app.clone(), request).await.0, StatusCode::NO_CONTENT);
    let binary = r#"{"specversion":"1.0","id":"e-3","source":"/shop","type":"blob","data_base64":"AP8="}"#;
    let request =
        Request::post("/").header("content-type", "application/cloudevents+json").body(Body::from(binary)).unwrap();
    assert_eq!(post(app, request).await.0, StatusCode::NO_CONTENT);
    let seen = seen.lock().unwrap();
    assert_eq!(&seen[0].message.payload[..], br#"{"total":5}"#);
    assert_eq!(seen[0].message.content_type.as_deref(), Some("application/json"));
    assert_eq!(seen[0].message.header("ce-tenant"), Some("acme"), "extensions become headers");
    assert_eq!(&seen[1].message.payload[..], &[0u8, 255]);
}

#[tokio::test]
async fn pubsub_push_envelope() {
    let seen = Seen::default();
    let app = router(trigger(seen.clone()), source());
    let envelope = r#"{"message":{"data":"ZmluZQ==","attributes":{"tenant":"acme"},"messageId":"136969346945","publishTime":"2026-11-24T10:00:00Z","orderingKey":"customer-7"},"subscription":"projects/p/subscriptions/orders-push","deliveryAttempt":3}"#;
    let request = Request::post("/").header("content-type", "application/json").body(Body::from(envelope)).unwrap();
    assert_eq!(post(app, request).await.0, StatusCode::NO_CONTENT);
    let seen = seen.lock().unwrap();
    let incoming = &seen[0];
    assert_eq!((incoming.message.id.as_str(), &incoming.message.payload[..]), ("136969346945", &b"fine"[..]));
    assert_eq!((incoming.attempt, incoming.message.header("tenant")), (3, Some("acme")));
    assert_eq!(incoming.message.ordering_key.as_deref(), Some("customer-7"));
    // The caller's subscription is data: the origin stays the route's source, so a dead
    // letter cannot be made to redrive into a queue the caller chose.
    assert_eq!(incoming.source, source());
    assert_eq!(incoming.message.header("pubsub-subscription"), Some("projects/p/subscriptions/orders-push"));
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_reason() {
    let app = router(trigger(Seen::default()), source());
    for (request, expected) in [
        (Request::post("/").body(Body::from("plain text")).unwrap(), "not CloudEvents"),
        (Request::post("/").body(Body::from(r#"{"hello":1}"#)).unwrap(), "not a Pub/Sub push envelope"),
        (Request::post("/").body(Body::from(r#"{"message":{"data":"!!"}}"#)).unwrap(), "message.data is not base64"),
        (Request::post("/").header("ce-specversion", "1.0").body(Body::empty()).unwrap(), "needs the ce-id header"),
        (
            Request::post("/")
                .header("content-type", "application/cloudevents+json")
                .body(Body::from(r#"{"id":"x"}"#))
                .unwrap(),
            "needs a \"source\" string",
        ),
    ] {
        let (status, _, body) = post(app.clone(), request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains(expected), "{body:?} should say {expected:?}");
    }
}

#[tokio::test]
async fn a_rejection_with_a_dead_letter_destination_is_settled() {
    let broker: courier::DynBroker = Arc::new(LocalBroker::new());
    let dlq = Source::queue("orders.dlq").unwrap();
    broker.declare(&dlq).await.unwrap();
    let trigger = trigger(Seen::default()).dead_letter(broker.clone(), Destination::queue("orders.dlq").unwrap());
    assert_eq!(post(router(trigger, source()), binary("reject")).await.0, StatusCode::NO_CONTENT);
    let dead =
        broker.consumer(&dlq, Default::default()).await.unwrap().receive_one(Duration::from_secs(1)).await.unwrap();
    assert_eq!(dead.unwrap().header(courier::headers::DEAD_LETTER_REASON), Some("never valid"));
}

// Who may push, how much, for how long; what the caller learns.

fn with_bearer(token: &str, body: &'static str) -> Request<Body> {
    let mut request = binary(body);
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn a_shared_secret_keeps_out_callers_without_it() {
    use courier::trigger::http::{router_with, PushOptions};
    let seen = Seen::default();
    let app = router_with(trigger(seen.clone()), source(), PushOptions::default().shared_secret("s3cret"));
    assert_eq!(post(app.clone(), binary("fine")).await.0, StatusCode::UNAUTHORIZED, "no header");
    assert_eq!(post(app.clone(), with_bearer("s3creT", "fine")).await.0, StatusCode::UNAUTHORIZED, "wrong");
    assert_eq!(post(app.clone(), with_bearer("s3cret", "fine")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(seen.lock().unwrap().len(), 1, "refused pushes never reach the handler");
}

/// Tokens as Pub/Sub push signs them, with a test-only RSA key (`fixtures/oidc-*`).
mod oidc {
    use super::*;
    use courier::trigger::http::{router_with, OidcVerifier, PushOptions};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    const AUDIENCE: &str = "https://orders.example.com/push";

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn token(key: &str, audience: &str, issuer: &str, expires_in: i64) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = serde_json::json!({
            "aud": audience, "iss": issuer, "exp": now + expires_in, "iat": now,
            "email": "pubsub@example.iam.gserviceaccount.com",
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("test-key".into());
        encode(&header, &claims, &EncodingKey::from_rsa_pem(&fixture(key)).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn only_valid_tokens_for_the_audience_get_in() {
        let jwks = String::from_utf8(fixture("oidc-test-jwks.json")).unwrap();
        let verifier = OidcVerifier::from_jwks(&jwks, AUDIENCE).unwrap();
        let seen = Seen::default();
        let app = router_with(trigger(seen.clone()), source(), PushOptions::default().oidc(verifier));
        let google = "https://accounts.google.com";
        let good = token("oidc-test-key.pem", AUDIENCE, google, 600);
        assert_eq!(post(app.clone(), with_bearer(&good, "fine")).await.0, StatusCode::NO_CONTENT);
        for (why, bad) in [
            ("missing", None),
            ("expired", Some(token("oidc-test-key.pem", AUDIENCE, google, -3600))),
            ("wrong audience", Some(token("oidc-test-key.pem", "https://elsewhere.example.com", google, 600))),
            ("wrong issuer", Some(token("oidc-test-key.pem", AUDIENCE, "https://evil.example.com", 600))),
            ("signed by another key", Some(token("oidc-other-key.pem", AUDIENCE, google, 600))),
            ("not a JWT", Some("garbage".to_owned())),
        ] {
            let request = match &bad {
                Some(t) => with_bearer(t, "fine"),
                None => binary("fine"),
            };
            let (status, _, body) = post(app.clone(), request).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");
            assert_eq!(body, "unauthorized\n", "{why}: the caller learns nothing more");
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_jwks_that_is_not_one_is_refused_naming_it() {
        for garbage in ["", "not json", "{}", r#"{"keys": []}"#, r#"{"keys": [{"kty": "RSA"}]}"#, "\u{0}"] {
            match OidcVerifier::from_jwks(garbage, AUDIENCE) {
                Err(e) => assert!(e.to_string().contains("JWKS"), "{garbage:?}: {e}"),
                Ok(_) => panic!("{garbage:?} was taken for a JWKS"),
            }
        }
    }
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    use courier::trigger::http::{router_with, PushOptions};
    let app = router_with(trigger(Seen::default()), source(), PushOptions::default().max_body_bytes(1024));
    let big: &'static str = Box::leak("x".repeat(2048).into_boxed_str());
    assert_eq!(post(app.clone(), binary(big)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(post(app, binary("fine")).await.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn answers_carry_no_handler_or_broker_error_text() {
    let secret_failure = Trigger::new(|| async { Outcome::retry("password=hunter2 rejected by db.internal:5432") });
    let (status, _, body) = post(router(secret_failure, source()), binary("x")).await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "retry evt-1\n"));
    let rejecting = Trigger::new(|| async { Outcome::reject("customer 42's card is stolen") });
    let (status, _, body) = post(router(rejecting, source()), binary("x")).await;
    assert_eq!((status, body.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "rejected evt-1\n"));
}

#[tokio::test]
async fn a_handler_past_its_timeout_is_answered_503_and_pushes_wait_for_room() {
    use courier::trigger::http::{router_with, PushOptions};
    let slow = Trigger::new(|| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Outcome::Ack
    });
    let options = PushOptions::default().handler_timeout(Duration::from_millis(200)).max_concurrent(1);
    let app = router_with(slow, source(), options);
    // One push holds the only slot until its timeout; the second cannot get in meanwhile.
    let (first, second) = tokio::join!(post(app.clone(), binary("a")), post(app.clone(), binary("b")));
    assert_eq!(first.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.2.contains("busy") || second.2.contains("retry"), "{}", second.2);
}

/// The tracing extension is data a caller sends: garbage in it (not a traceparent, too
/// long, not text-like) costs that push its trace and nothing else. The push is still
/// handled and acked, and the next push's valid trace context is kept.
#[tokio::test]
async fn a_garbage_trace_context_costs_the_push_only_its_trace() {
    let seen = Seen::default();
    let app = router(trigger(seen.clone()), source());
    let long = "f".repeat(8 * 1024);
    let garbage = [
        "",
        "not-a-traceparent",
        "00-zz-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        &long,
    ];
    for value in garbage {
        let mut request = binary("fine");
        request.headers_mut().insert("ce-traceparent", value.parse().unwrap());
        assert_eq!(post(app.clone(), request).await.0, StatusCode::NO_CONTENT, "{value:.40}");
        let event = serde_json::json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t",
                                        "data": "fine", "traceparent": value});
        let request = Request::post("/")
            .header("content-type", "application/cloudevents+json")
            .body(Body::from(event.to_string()))
            .unwrap();
        assert_eq!(post(app.clone(), request).await.0, StatusCode::NO_CONTENT, "{value:.40}");
    }
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = binary("fine");
    request.headers_mut().insert("traceparent", valid.parse().unwrap());
    assert_eq!(post(app, request).await.0, StatusCode::NO_CONTENT);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2 * garbage.len() + 1, "every push handled");
    assert_eq!(seen.last().unwrap().message.header("traceparent"), Some(valid), "a valid one is carried");
}
