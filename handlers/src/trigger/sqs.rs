//! The AWS Lambda SQS event, and its partial-batch answer.
//!
//! Each record becomes a message: `messageId` its id, `body` its payload (base64-decoded
//! when the message attribute `courier-encoding` is `base64`, as Courier's SQS adapter
//! marks bodies that are not valid SQS text), message attributes its headers (`String` and
//! `Number` as they are, `Binary` decoded, kept as base64 when not UTF-8), attribute
//! `ApproximateReceiveCount` its attempt, `MessageGroupId` its ordering key,
//! `MessageDeduplicationId` its dedup id and `SentTimestamp` its timestamp. The queue
//! name comes from `eventSourceARN`.
//!
//! Failed records are answered as `batchItemFailures` (`itemIdentifier` = `messageId`);
//! this needs `ReportBatchItemFailures` on the event source mapping. On a FIFO queue
//! (`.fifo`, or records with a `MessageGroupId`) records run in order and the first
//! failure stops the batch: it and every later record are reported, so none overtakes
//! an earlier one of its group.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use courier_core::{Message, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{decode_base64, malformed, origin, text_or_base64, Trigger};
use crate::handler::Incoming;

/// An SQS event as Lambda delivers it.
#[derive(Debug, Clone, Deserialize)]
pub struct SqsEvent {
    /// The records, in the order SQS returned them.
    #[serde(rename = "Records")]
    pub records: Vec<SqsRecord>,
}

/// One SQS message in an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsRecord {
    /// SQS's id of the message; the `itemIdentifier` of a failure.
    pub message_id: String,
    /// The body, as text.
    #[serde(default)]
    pub body: Option<String>,
    /// System attributes: `ApproximateReceiveCount`, `SentTimestamp`, `MessageGroupId`, …
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    /// The message attributes the sender set.
    #[serde(default)]
    pub message_attributes: HashMap<String, SqsMessageAttribute>,
    /// `arn:aws:sqs:<region>:<account>:<queue>`.
    #[serde(rename = "eventSourceARN", default)]
    pub event_source_arn: Option<String>,
}

/// A message attribute: a string (for `String` and `Number`) or base64 bytes (`Binary`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsMessageAttribute {
    /// The value of a `String` or `Number` attribute.
    #[serde(default)]
    pub string_value: Option<String>,
    /// The base64 value of a `Binary` attribute.
    #[serde(default)]
    pub binary_value: Option<String>,
    /// `String`, `Number` or `Binary`, possibly with a custom suffix.
    #[serde(default)]
    pub data_type: Option<String>,
}

/// The answer to an SQS event: the records to deliver again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsBatchResponse {
    /// Failed records; empty when every record succeeded.
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// One failed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    /// The record's `messageId`.
    pub item_identifier: String,
}

/// The message attribute Courier's SQS adapter sets on base64-encoded bodies.
pub const ENCODING_ATTRIBUTE: &str = "courier-encoding";

impl SqsRecord {
    /// The queue this record came from, by the last part of its ARN.
    pub fn queue(&self) -> Option<&str> {
        self.event_source_arn.as_deref().and_then(|arn| arn.rsplit(':').next()).filter(|q| !q.is_empty())
    }

    fn is_fifo(&self) -> bool {
        self.queue().is_some_and(|q| q.ends_with(".fifo")) || self.attributes.contains_key("MessageGroupId")
    }

    /// The record as a handler sees it.
    pub fn to_incoming(&self) -> Result<Incoming> {
        const WHAT: &str = "SQS event record";
        let body = self.body.as_deref().unwrap_or_default();
        let encoded =
            self.message_attributes.get(ENCODING_ATTRIBUTE).and_then(|a| a.string_value.as_deref()) == Some("base64");
        let payload = if encoded { decode_base64(WHAT, "body", body)? } else { body.as_bytes().to_vec() };
        // Courier's SQS adapter encodes only bytes SQS cannot carry as text: a body whose
        // decoding is such text only claims the encoding, and is data, kept as it came.
        let (payload, encoded) = match String::from_utf8(payload) {
            Ok(text) if encoded && is_sqs_text(&text) => (body.as_bytes().to_vec(), false),
            Ok(text) => (text.into_bytes(), encoded),
            Err(e) => (e.into_bytes(), encoded),
        };
        let mut message = Message::new(payload).with_id(self.message_id.as_str());
        for (name, attribute) in &self.message_attributes {
            if name == ENCODING_ATTRIBUTE && encoded {
                continue;
            }
            let value = match (&attribute.string_value, &attribute.binary_value) {
                (Some(text), _) => text.clone(),
                (None, Some(b64)) => text_or_base64(&decode_base64(WHAT, &format!("messageAttributes.{name}"), b64)?),
                (None, None) => String::new(),
            };
            message.headers.insert(name.clone(), value);
        }
        if let Some(ct) = message.headers.remove("content-type") {
            message.content_type = Some(ct);
        }
        message.ordering_key = self.attributes.get("MessageGroupId").cloned();
        message.dedup_id = self.attributes.get("MessageDeduplicationId").cloned();
        if let Some(ms) = self.attributes.get("SentTimestamp").and_then(|t| t.parse::<u64>().ok()) {
            message.timestamp = UNIX_EPOCH + Duration::from_millis(ms);
        }
        let attempt = match self.attributes.get("ApproximateReceiveCount") {
            None => 1,
            Some(n) => n.parse().map_err(|e| malformed(WHAT, format!("ApproximateReceiveCount {n:?}: {e}")))?,
        };
        let source = origin(self.queue().unwrap_or("lambda-sqs"));
        Ok(Incoming::new(message, attempt, source))
    }
}

/// Whether SQS takes the text as a body (its allowed characters; as the SQS adapter checks).
fn is_sqs_text(text: &str) -> bool {
    text.chars().all(
        |c| matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..),
    )
}

impl Trigger {
    /// Runs the handler over an SQS event and answers which records failed.
    pub async fn sqs(&self, event: SqsEvent) -> SqsBatchResponse {
        let fifo = event.records.iter().any(SqsRecord::is_fifo);
        let mut failed = Vec::new();
        if fifo {
            let mut records = event.records.into_iter();
            for record in records.by_ref() {
                if let Err(reason) = self.process_record(&record).await {
                    tracing::debug!(id = %record.message_id, %reason, "FIFO record failed; it and the rest go back");
                    failed.push(record.message_id);
                    break;
                }
            }
            failed.extend(records.map(|r| r.message_id));
        } else {
            let results: Vec<_> = futures::stream::iter(event.records)
                .map(|record| async move {
                    let result = self.process_record(&record).await;
                    (record.message_id, result)
                })
                .buffered(self.concurrency)
                .collect()
                .await;
            failed.extend(results.into_iter().filter(|(_, r)| r.is_err()).map(|(id, _)| id));
        }
        SqsBatchResponse {
            batch_item_failures: failed
                .into_iter()
                .map(|item_identifier| BatchItemFailure { item_identifier })
                .collect(),
        }
    }

    /// [`sqs`](Self::sqs) from the event's JSON; a malformed event is an error naming the field.
    pub async fn sqs_json(&self, event: &[u8]) -> Result<SqsBatchResponse> {
        let event: SqsEvent = serde_json::from_slice(event).map_err(|e| malformed("SQS event", e))?;
        Ok(self.sqs(event).await)
    }

    async fn process_record(&self, record: &SqsRecord) -> std::result::Result<(), String> {
        match record.to_incoming() {
            Ok(incoming) => self.process(incoming).await,
            Err(e) => {
                let origin = origin(record.queue().unwrap_or("lambda-sqs"));
                self.settle_undecodable(record.message_id.clone(), record.body.as_deref(), origin, e).await
            }
        }
    }
}
