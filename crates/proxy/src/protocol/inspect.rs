//! Bounded reading of a request body, strict JSON parsing, and the body that replays what
//! was read in front of the rest of the stream.
//!
//! Memory per request is bounded by the limit: frames are read until the body ends or the
//! total passes the limit (then 413, and nothing was forwarded). The replayed body is the
//! same frames, in order, followed by whatever the original body still yields, so the
//! application receives the bytes the caller sent, byte for byte.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::body::{BoxError, RequestBody};
use crate::error::Refusal;

/// Reads the whole body if it fits in `limit` bytes; returns its bytes and a body replaying
/// it. Larger: [`Refusal::BodyTooLarge`]. A failing or stalled body: `BodyUnreadable`.
pub(crate) async fn read_bounded(
    mut body: RequestBody,
    limit: usize,
) -> Result<(Bytes, RequestBody), Refusal> {
    let mut frames = VecDeque::new();
    let mut data = BytesMut::new();
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| Refusal::BodyUnreadable)?;
        if let Some(chunk) = frame.data_ref() {
            if data.len() + chunk.len() > limit {
                return Err(Refusal::BodyTooLarge);
            }
            data.extend_from_slice(chunk);
        }
        frames.push_back(frame);
    }
    Ok((data.freeze(), Replay { frames, rest: body }.boxed_unsync()))
}

/// The frames already read, then the rest of the original body.
pub(crate) struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    rest: RequestBody,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("frames", &self.frames.len())
            .finish_non_exhaustive()
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(buffered));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

/// Parses JSON refusing duplicate object keys at any depth. RFC 8259 §4 leaves duplicate
/// names' meaning to the implementation: one parser keeps the first, another the last, so a
/// body `{"name":"search","name":"refund"}` could be authorized as one tool and run as the
/// other. serde_json's own recursion limit (128) bounds nesting.
pub(crate) fn parse_strict(bytes: &[u8]) -> Result<Value, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let Strict(value) =
        de::Deserialize::deserialize(&mut de).map_err(|_| Refusal::MalformedBody)?;
    de.end().map_err(|_| Refusal::MalformedBody)?;
    Ok(value)
}

struct Strict(Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom("duplicate object key"));
            }
            let Strict(value) = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}
