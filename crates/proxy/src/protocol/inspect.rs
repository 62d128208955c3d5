//! Bounded reading of a request body, strict JSON checking, borrowed field access, and the
//! body that replays what was read in front of the rest of the stream.
//!
//! Memory per request is bounded by the limit and charged to the shared inspection budget
//! (`limits.inspect_memory_bytes`) as it grows: frames are copied once into one buffer until
//! the body ends or the total passes the limit (then 413, and nothing was forwarded). The
//! parsed view borrows from that buffer, and the replayed body is the same buffer (a
//! reference-counted `Bytes`, not a copy), followed by the trailers if any, so the
//! application receives the bytes the caller sent, byte for byte. The reservation is given
//! back when the replayed body is dropped.
//!
//! Parsing never builds a `serde_json::Value` of the whole body: [`check_strict`] walks it
//! without keeping values, and the protocol modules read the few fields they need through
//! [`RawValue`] slices of the buffer. A `[0,0,0,...]` body costs no memory beyond itself.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::admission::Reservation;
use crate::body::{BoxError, RequestBody};
use crate::error::Refusal;

/// Reads the whole body if it fits in `limit` bytes; returns its bytes and a body replaying
/// it. Larger: [`Refusal::BodyTooLarge`]. Over the shared budget:
/// [`Refusal::InspectionBudget`]. A failing or stalled body: `BodyUnreadable`. The caller
/// bounds the whole read in time.
pub(crate) async fn read_bounded(
    mut body: RequestBody,
    limit: usize,
    declared: Option<usize>,
    mut reservation: Reservation,
) -> Result<(Bytes, RequestBody), Refusal> {
    // A declared length is reserved up front (it was checked against `limit`), so the buffer
    // is allocated once; otherwise it grows by doubling, each step charged before it is made.
    let mut data = BytesMut::new();
    if let Some(len) = declared {
        reservation.grow_to(len)?;
        data.reserve(len);
    }
    let mut trailers = None;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| Refusal::BodyUnreadable)?;
        let frame = match frame.into_data() {
            Ok(chunk) => chunk,
            Err(frame) => {
                trailers = Some(frame);
                continue;
            }
        };
        let needed = data.len() + frame.len();
        if needed > limit {
            return Err(Refusal::BodyTooLarge);
        }
        if needed > data.capacity() {
            let grown = needed.max(data.capacity() * 2).min(limit);
            reservation.grow_to(grown)?;
            data.reserve(grown - data.len());
        }
        data.extend_from_slice(&frame);
    }
    let data = data.freeze();
    let replay = Replay {
        data: (!data.is_empty()).then(|| data.clone()),
        trailers,
        rest: body,
        _reservation: reservation,
    };
    Ok((data, replay.boxed_unsync()))
}

/// The bytes already read, then the rest of the original body (normally nothing: it ended).
pub(crate) struct Replay {
    data: Option<Bytes>,
    trailers: Option<Frame<Bytes>>,
    rest: RequestBody,
    /// The inspection bytes this request holds; returned when the body is dropped.
    _reservation: Reservation,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("data", &self.data.as_ref().map(Bytes::len))
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
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.data.as_ref().map_or(0, |d| d.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(buffered));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

/// Checks that a caller's `bytes` is one JSON value in which no object, at any depth, names
/// a member twice, names compared as a case-insensitive parser would
/// ([`portcullis_core::json`] says why).
pub(crate) fn check_strict(bytes: &[u8]) -> Result<(), Refusal> {
    if portcullis_core::json::has_unique_folded_names(bytes) {
        Ok(())
    } else {
        Err(Refusal::MalformedBody)
    }
}

/// [`check_strict`] with names compared exactly, for what the upstream answers (a
/// `tools/list` result): a tool's input schema may well list properties that differ in case
/// only, and the server is not the caller the filter guards against.
pub(crate) fn check_strict_exact(bytes: &[u8]) -> Result<(), Refusal> {
    if portcullis_core::json::has_unique_names(bytes) {
        Ok(())
    } else {
        Err(Refusal::MalformedBody)
    }
}

/// Deserializes a present field as `Some`, `null` included (plain `Option` reads `null` as
/// absent, and JSON-RPC tells `"id": null` apart from no id).
pub(crate) fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as de::Deserialize>::deserialize(d).map(Some)
}

/// The JSON kind of a raw value, from its first byte (it came out of a checked document,
/// so it is one well-formed value without leading whitespace).
pub(crate) fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

pub(crate) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// The value of a JSON string, or `None` for any other kind.
pub(crate) fn as_string(raw: &RawValue) -> Option<String> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// A top-level JSON array's elements, one at a time, without collecting them: `each` sees
/// every element in order, and `max` elements at most (`Err(TooMany)` after).
pub(crate) fn for_each_element<'de>(
    raw: &'de str,
    max: usize,
    mut each: impl FnMut(&'de RawValue) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let mut failure = None;
    let visitor = Elements {
        max,
        each: &mut each,
        failure: &mut failure,
    };
    let mut de = serde_json::Deserializer::from_str(raw);
    match de.deserialize_seq(visitor) {
        Ok(()) => Ok(()),
        Err(_) => Err(failure.unwrap_or(Refusal::MalformedBody)),
    }
}

struct Elements<'a, F> {
    max: usize,
    each: &'a mut F,
    failure: &'a mut Option<Refusal>,
}

impl<'de, F> Visitor<'de> for Elements<'_, F>
where
    F: FnMut(&'de RawValue) -> Result<(), Refusal>,
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut count = 0;
        while let Some(element) = seq.next_element::<&'de RawValue>()? {
            count += 1;
            let outcome = if count > self.max {
                Err(Refusal::BatchTooLarge)
            } else {
                (self.each)(element)
            };
            if let Err(refusal) = outcome {
                *self.failure = Some(refusal);
                return Err(de::Error::custom("refused"));
            }
        }
        Ok(())
    }
}

/// Counts the JSON values in `raw` (every scalar, array and object), failing past `max`;
/// bounds what building a `serde_json::Value` of it would allocate.
pub(crate) fn count_values(raw: &RawValue, max: usize) -> Result<usize, Refusal> {
    let mut count = 0usize;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_any(Counter {
        count: &mut count,
        max,
    })
    .map_err(|_| Refusal::BodyTooLarge)?;
    Ok(count)
}

struct Counter<'a> {
    count: &'a mut usize,
    max: usize,
}

impl Counter<'_> {
    fn one<E: de::Error>(self) -> Result<(), E> {
        *self.count += 1;
        if *self.count > self.max {
            return Err(E::custom("too many values"));
        }
        Ok(())
    }
}

impl<'de> de::DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (count, max) = (self.count, self.max);
        Counter {
            count: &mut *count,
            max,
        }
        .one::<A::Error>()?;
        while seq
            .next_element_seed(Counter {
                count: &mut *count,
                max,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (count, max) = (self.count, self.max);
        Counter {
            count: &mut *count,
            max,
        }
        .one::<A::Error>()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Counter {
                count: &mut *count,
                max,
            })?;
        }
        Ok(())
    }
}
