//! OpenTelemetry traces across the queue: a handler's span is the child of the span
//! that sent its message, on every backend, through the W3C `traceparent` header.
//!
//! Courier's spans are `tracing` spans: `courier.send` around each send of a
//! [`traced`] broker, `courier.handle` around each handler call of the worker. With the
//! `tracing-opentelemetry` layer installed, they become OpenTelemetry spans, exported by
//! whatever exporter the application set up: OTLP (`opentelemetry-otlp`, configured by
//! the standard `OTEL_EXPORTER_OTLP_*` and `OTEL_SERVICE_NAME` variables), stdout, or an
//! in-memory one in tests. A send puts its span's context into the message's
//! `traceparent` header; the worker makes that context the parent of the handler's span.
//!
//! [`init`] sets it all up from the environment: OTLP over HTTP to
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; default
//! `http://localhost:4318`), with `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` honoured, and log lines on stderr filtered by `RUST_LOG`.
//! [`install`] does the same with a tracer provider built in code (another exporter,
//! a sampler).
//!
//! ```no_run
//! # async fn run() -> Result<(), courier::Error> {
//! use courier::{App, Message, Source};
//!
//! let _flush_at_exit = courier::otel::init()?;
//! let broker = courier::otel::traced(courier::connect("memory://").await?);
//! let orders = Source::queue("orders")?;
//! broker.send(&orders.destination(), Message::new("order 1")).await?; // a `courier.send` span
//! App::new(broker).route(orders, |_: Message| async {}).run().await?; // `courier.handle`, its child
//! # Ok(()) }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use courier_core::{
    headers, Broker, Capabilities, Consumer, ConsumerOptions, Destination, DynBroker, Message, MessageId, Result,
    Source, Stats,
};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::TraceParent;

/// Flushes and shuts the exporter down when dropped: keep it until the process ends.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct OtelGuard {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl std::fmt::Debug for OtelGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelGuard").finish_non_exhaustive()
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("courier: flushing OpenTelemetry spans at exit failed: {e}");
        }
    }
}

/// Exports spans over OTLP/HTTP as the standard `OTEL_*` variables say (see the module
/// docs) and installs the `tracing` subscriber that feeds it. Fails when a subscriber is
/// already installed, or the variables are malformed.
pub fn init() -> Result<OtelGuard, courier_core::Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| {
        courier_core::Error::config("OTEL_EXPORTER_OTLP_*", format!("cannot build the OTLP exporter: {e}"))
    })?;
    let resource = opentelemetry_sdk::Resource::builder().build(); // OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    install(provider)
}

/// Installs `provider` (built in code) as where Courier's and the application's
/// `tracing` spans go, with log lines on stderr filtered by `RUST_LOG` (default `info`).
pub fn install(provider: opentelemetry_sdk::trace::SdkTracerProvider) -> Result<OtelGuard, courier_core::Error> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("courier"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter));
    tracing::subscriber::set_global_default(subscriber).map_err(|e| {
        courier_core::Error::config(
            "tracing",
            format!("{e}: install Courier's layer into your own subscriber instead (`tracing_opentelemetry::layer()`)"),
        )
    })?;
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(OtelGuard { provider })
}

/// The OpenTelemetry context of a `traceparent`, as a remote parent.
pub fn remote_parent(parent: &TraceParent) -> opentelemetry::Context {
    let span = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(span)
}

/// The `traceparent` naming `span`, when it has an OpenTelemetry context (the layer is
/// installed and the span is enabled).
pub fn traceparent_of(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(span.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(span.span_id().to_bytes()),
        flags: span.trace_flags().to_u8(),
    })
}

/// Makes the message's `traceparent`, if it has a valid one, the parent of `span`.
pub(crate) fn adopt_parent(span: &tracing::Span, message: &Message) {
    if let Some(parent) = message.header(headers::TRACEPARENT).and_then(|t| t.parse::<TraceParent>().ok()) {
        let _ = span.set_parent(remote_parent(&parent));
    }
}

/// `broker`, with each send in a `courier.send` span whose context its messages carry
/// in `traceparent`. The span is a child of the current span (a handler's, say); with
/// none, of the message's own `traceparent` if it came with one.
pub fn traced(broker: DynBroker) -> DynBroker {
    Arc::new(Traced { inner: broker })
}

#[derive(Debug)]
struct Traced {
    inner: DynBroker,
}

impl Traced {
    /// A send span, and the messages stamped with it.
    fn stamp(&self, destination: &Destination, messages: &mut [Message]) -> tracing::Span {
        let span = tracing::info_span!("courier.send", destination = %destination, messages = messages.len(), otel.kind = "producer");
        if traceparent_of(&tracing::Span::current()).is_none() {
            if let Some(first) = messages.first() {
                adopt_parent(&span, first);
            }
        }
        if let Some(parent) = traceparent_of(&span) {
            let value = parent.to_string();
            for message in messages.iter_mut() {
                message.headers.insert(headers::TRACEPARENT.to_owned(), value.clone());
            }
        }
        span
    }
}

#[async_trait]
impl Broker for Traced {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    async fn send(&self, destination: &Destination, mut message: Message) -> Result<MessageId> {
        let span = self.stamp(destination, std::slice::from_mut(&mut message));
        self.inner.send(destination, message).instrument(span).await
    }

    async fn send_batch(&self, destination: &Destination, mut messages: Vec<Message>) -> Result<Vec<MessageId>> {
        let span = self.stamp(destination, &mut messages);
        self.inner.send_batch(destination, messages).instrument(span).await
    }

    async fn send_to_source(&self, source: &Source, mut message: Message) -> Result<MessageId> {
        let span = self.stamp(&source.destination(), std::slice::from_mut(&mut message));
        self.inner.send_to_source(source, message).instrument(span).await
    }

    async fn consumer(&self, source: &Source, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.inner.consumer(source, options).await
    }

    async fn declare(&self, source: &Source) -> Result<()> {
        self.inner.declare(source).await
    }

    async fn declare_destination(&self, destination: &Destination) -> Result<()> {
        self.inner.declare_destination(destination).await
    }

    async fn stats(&self, source: &Source) -> Result<Stats> {
        self.inner.stats(source).await
    }

    async fn purge(&self, source: &Source) -> Result<u64> {
        self.inner.purge(source).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
