//! W3C trace context carried in message headers, so a handler's span joins the
//! producer's trace.

use std::fmt;

use courier_core::{headers, Message};

/// A W3C `traceparent`: version 00, 16-byte trace id, 8-byte parent span id, flags.
///
/// ```
/// use courier::TraceParent;
///
/// let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
/// let child = parent.child();
/// assert_eq!(child.trace_id, parent.trace_id);
/// assert_ne!(child.span_id, parent.span_id);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace all related messages share.
    pub trace_id: u128,
    /// The span that sent this message.
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace.
    pub fn new_root() -> Self {
        TraceParent { trace_id: nonzero(rand::random()), span_id: nonzero(rand::random()), flags: 1 }
    }

    /// The message's trace from its `traceparent` header; a new trace when it has none
    /// or it is malformed.
    pub fn of(message: &Message) -> Self {
        message.header(headers::TRACEPARENT).and_then(|v| v.parse().ok()).unwrap_or_else(Self::new_root)
    }

    /// The same trace with a new span id, for a message this one causes.
    pub fn child(&self) -> Self {
        TraceParent { span_id: nonzero(rand::random()), ..*self }
    }
}

fn nonzero<T: Default + PartialEq + From<u8>>(v: T) -> T {
    if v == T::default() {
        T::from(1)
    } else {
        v
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl std::str::FromStr for TraceParent {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [version, trace, span, flags] = parts[..] else { return Err("expected four dash-separated fields") };
        if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 || version == "ff" {
            return Err("malformed traceparent");
        }
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| "trace id is not hex")?;
        let span_id = u64::from_str_radix(span, 16).map_err(|_| "span id is not hex")?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| "flags are not hex")?;
        if trace_id == 0 || span_id == 0 {
            return Err("all-zero ids are invalid");
        }
        Ok(TraceParent { trace_id, span_id, flags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_malformed_values() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(text.parse::<TraceParent>().unwrap().to_string(), text);
        for bad in ["", "00-xyz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
        let msg = Message::new("x").with_header("traceparent", text);
        assert_eq!(TraceParent::of(&msg).trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    }
}
