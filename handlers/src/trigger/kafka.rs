//! The AWS Lambda Kafka event: Amazon MSK (`aws:kafka`) and self-managed Kafka
//! (`SelfManagedKafka`, which has no ARN).
//!
//! Each record becomes a message: id `<topic>-<partition>@<offset>` (stable across
//! redeliveries), payload the base64-decoded `value`, ordering key the decoded `key`,
//! headers from the record headers (arrays of signed bytes, as Lambda sends them;
//! values that are not UTF-8 kept as base64), attempt from a `courier-attempt` header
//! (set by Courier's retry topics) or 1, timestamp from `timestamp` (ms).
//!
//! # Failure semantics
//!
//! Lambda's Kafka event source has no per-record answer: it commits the batch's offsets
//! when the invocation succeeds and retries the whole batch when it fails. So the
//! trigger runs each partition's records in order (partitions concurrently), stops a
//! partition at its first failure (its later records are not run, so none overtakes it),
//! and fails the invocation when any record failed. Records that succeeded before the
//! failure run again on the retry: handlers must be idempotent. A record that can never
//! succeed should be rejected with a dead-letter destination set on the [`Trigger`],
//! which settles it, or it blocks its partition until the event source's retry limit.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use courier_core::{Error, Message, Result};
use serde::Deserialize;

use super::{decode_base64, malformed, origin, text_or_base64, Trigger};
use crate::handler::Incoming;

/// A Kafka event as Lambda delivers it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaEvent {
    /// `aws:kafka` (MSK) or `SelfManagedKafka`.
    #[serde(default)]
    pub event_source: Option<String>,
    /// The MSK cluster's ARN; absent for self-managed Kafka.
    #[serde(default)]
    pub event_source_arn: Option<String>,
    /// Records by `<topic>-<partition>`, each partition's in offset order.
    pub records: BTreeMap<String, Vec<KafkaRecord>>,
}

/// One Kafka record in an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaRecord {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i64,
    /// The offset in the partition.
    pub offset: i64,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// The base64 key, if any.
    #[serde(default)]
    pub key: Option<String>,
    /// The base64 value; absent for a tombstone.
    #[serde(default)]
    pub value: Option<String>,
    /// Headers: a list of single-entry maps from name to bytes (signed, -128..=127).
    #[serde(default)]
    pub headers: Vec<BTreeMap<String, Vec<i16>>>,
}

/// Why a Kafka invocation failed: the records that failed, and those not run after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaBatchFailure {
    /// `(record id, reason)` of each failed record, at most one per partition.
    pub failed: Vec<(String, String)>,
    /// Records not run because an earlier record of their partition failed.
    pub skipped: usize,
}

impl std::fmt::Display for KafkaBatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} record(s) failed", self.failed.len())?;
        if let Some((id, reason)) = self.failed.first() {
            write!(f, ", first {id}: {reason}")?;
        }
        write!(f, "; {} later record(s) of their partitions were not run; Lambda retries the batch", self.skipped)
    }
}

impl std::error::Error for KafkaBatchFailure {}

impl KafkaRecord {
    /// The record's stable id: `<topic>-<partition>@<offset>`.
    pub fn id(&self) -> String {
        format!("{}-{}@{}", self.topic, self.partition, self.offset)
    }

    /// The record as a handler sees it.
    pub fn to_incoming(&self) -> Result<Incoming> {
        const WHAT: &str = "Kafka event record";
        let payload = match &self.value {
            Some(v) => decode_base64(WHAT, "value", v)?,
            None => Vec::new(),
        };
        let mut message = Message::new(payload).with_id(self.id());
        if let Some(key) = &self.key {
            message.ordering_key = Some(text_or_base64(&decode_base64(WHAT, "key", key)?));
        }
        let mut attempt = 1;
        for header in &self.headers {
            for (name, signed) in header {
                let bytes = signed
                    .iter()
                    .map(|&b| {
                        u8::try_from(b).or_else(|_| i8::try_from(b).map(|s| s as u8)).map_err(|_| {
                            malformed(WHAT, format!("header {name:?} has {b}, which is not a byte (-128..=255)"))
                        })
                    })
                    .collect::<Result<Vec<u8>>>()?;
                let value = text_or_base64(&bytes);
                match name.as_str() {
                    "courier-attempt" => attempt = value.parse().unwrap_or(1),
                    "content-type" => message.content_type = Some(value),
                    _ => {
                        message.headers.insert(name.clone(), value);
                    }
                }
            }
        }
        if let Some(ms) = self.timestamp.and_then(|t| u64::try_from(t).ok()) {
            message.timestamp = UNIX_EPOCH + Duration::from_millis(ms);
        }
        Ok(Incoming::new(message, attempt, origin(&self.topic)))
    }
}

impl Trigger {
    /// Runs the handler over a Kafka event: `Ok` when every record succeeded (Lambda
    /// commits the batch), else the failures (Lambda retries the batch).
    pub async fn kafka(&self, event: KafkaEvent) -> std::result::Result<(), KafkaBatchFailure> {
        let partitions = event.records.into_values().map(|records| async move {
            let mut records = records.into_iter();
            for record in records.by_ref() {
                let result = match record.to_incoming() {
                    Ok(incoming) => self.process(incoming).await,
                    Err(e) => {
                        self.settle_undecodable(record.id(), record.value.as_deref(), origin(&record.topic), e).await
                    }
                };
                if let Err(reason) = result {
                    return Some((record.id(), reason, records.len()));
                }
            }
            None
        });
        let outcomes = futures::future::join_all(partitions).await;
        let mut failure = KafkaBatchFailure { failed: Vec::new(), skipped: 0 };
        for (id, reason, skipped) in outcomes.into_iter().flatten() {
            failure.failed.push((id, reason));
            failure.skipped += skipped;
        }
        if failure.failed.is_empty() {
            Ok(())
        } else {
            Err(failure)
        }
    }

    /// [`kafka`](Self::kafka) from the event's JSON; a malformed event is an error naming
    /// the field, and a failed batch an error that says Lambda retries it.
    pub async fn kafka_json(&self, event: &[u8]) -> Result<()> {
        let event: KafkaEvent = serde_json::from_slice(event).map_err(|e| malformed("Kafka event", e))?;
        self.kafka(event).await.map_err(|f| Error::Other { message: f.to_string(), retryable: true })
    }
}
