//! The compact form a message takes while it waits in a queue.

use std::time::SystemTime;

use bytes::Bytes;
use courier_core::{Headers, Message, MessageId};

/// A queued message. Rare fields live behind one optional box so that a million
/// plain messages cost little more than their payloads.
#[derive(Clone)]
pub(crate) struct Entry {
    pub id: MessageId,
    pub payload: Bytes,
    pub headers: Headers,
    pub timestamp: SystemTime,
    pub extra: Option<Box<Extra>>,
    /// Deliveries so far.
    pub deliveries: u32,
}

#[derive(Clone, Default)]
pub(crate) struct Extra {
    pub ordering_key: Option<String>,
    pub content_type: Option<String>,
    pub dedup_id: Option<String>,
}

impl Entry {
    pub fn from_message(m: Message) -> Self {
        let extra = if m.ordering_key.is_some() || m.content_type.is_some() || m.dedup_id.is_some() {
            Some(Box::new(Extra { ordering_key: m.ordering_key, content_type: m.content_type, dedup_id: m.dedup_id }))
        } else {
            None
        };
        Entry { id: m.id, payload: m.payload, headers: m.headers, timestamp: m.timestamp, extra, deliveries: 0 }
    }

    pub fn to_message(&self) -> Message {
        let extra = self.extra.as_deref();
        Message {
            id: self.id.clone(),
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            ordering_key: extra.and_then(|e| e.ordering_key.clone()),
            content_type: extra.and_then(|e| e.content_type.clone()),
            timestamp: self.timestamp,
            dedup_id: extra.and_then(|e| e.dedup_id.clone()),
            delay: None,
        }
    }

    pub fn ordering_key(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.ordering_key.as_deref())
    }
}
