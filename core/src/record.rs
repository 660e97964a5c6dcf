//! Messages as weir hands them around: what a producer appends ([`Record`]), what a
//! partition holds ([`Delivery`]), what a handler emits ([`Output`]).

use std::sync::Arc;

/// Message headers: names are strings, values bytes, order kept, names may repeat.
pub type Headers = Vec<(String, Vec<u8>)>;

/// A message as a producer hands it over: what gets appended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Headers,
    /// Milliseconds since the Unix epoch; the log stamps records that come without one.
    pub timestamp_ms: Option<u64>,
}

/// A message as it sits in a partition.
///
/// On a log, `offset` is the message's offset in its partition. On a queue (one partition, 0)
/// it is a sequence number this process gives each delivery, in the order the broker handed
/// them over: the engine tracks it, and the source keeps the broker's receipt for it. It is what
/// a `weir:stream@0.1.0` handler sees as `offset`, and it restarts at 0 with each process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub record: Record,
    /// How often the broker delivered this message before, where it counts (RabbitMQ's
    /// `x-delivery-count`); 0 where it does not or this is the first delivery. The first
    /// attempt the engine makes is this + 1.
    pub redeliveries: u32,
}

/// A message a handler emitted, to be published when the message that produced it is acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub topic: String,
    pub record: Record,
}

/// The first `max` bytes of `s` at most, cut at a character boundary (for messages that quote
/// text a guest or a producer chose).
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The bytes a record takes on the wire, about as a broker counts it against its message size:
/// key, payload, and each header's name and value with a few bytes of framing.
pub fn wire_size(r: &Record) -> usize {
    r.key.as_ref().map_or(0, Vec::len)
        + r.payload.len()
        + r.headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 10)
            .sum::<usize>()
}
