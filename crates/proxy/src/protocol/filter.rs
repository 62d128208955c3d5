//! `tools/list` result filtering: the caller sees only the tools its agent (and user) may
//! call. Each listed tool is asked `call_tool` of Cedar with the request's principal(s) (see
//! `mcp::listing_call`); tools without a string `name` are dropped.
//!
//! The server may answer a POST with one JSON body or with an SSE stream (MCP 2025-06-18,
//! Streamable HTTP: "either Content-Type: text/event-stream ... or Content-Type:
//! application/json"). A JSON body is read whole (bounded) and rewritten; an SSE stream is
//! rewritten event by event (WHATWG HTML, "Server-sent events": an event ends at a blank
//! line, whichever of CRLF, LF or CR ends the lines), so other events (progress
//! notifications, server requests) still stream as they come. On a POST only responses
//! whose `id` is one of the listed request ids are touched; on the server's `GET` stream
//! (where a resumed stream can replay a `tools/list` result) every result that carries
//! `tools` is.
//!
//! Fail closed: what the filter cannot read is never passed on. A compressed body (any
//! `content-encoding` but identity), a body that is not JSON whatever its media type or
//! status, a duplicate object key, an SSE event that is not UTF-8 or whose data is not
//! JSON, a listed response whose `result.tools` is not an array, or anything over the size
//! limit is an error: before the response head that is a 502; in an SSE stream that already
//! began, the stream is cut. A leading UTF-8 BOM is read past, as JSON and SSE clients do,
//! and not sent on. This module does not decide: the pipeline gives it the question to ask.
//!
//! Every listed tool's annotations, allowed or not, are remembered for the route (see
//! `annotations`) before the caller's question is asked with them.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use super::annotations::{Hints, ToolAnnotations};
use super::inspect::check_strict_exact;
use crate::admission::Reservation;
use crate::body::{BoxError, ResponseBody};

/// A JSON response (or one SSE event) larger than this cannot be filtered and is refused.
pub(crate) const RESPONSE_LIMIT: usize = 8 * 1024 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// May the caller call this listed tool (given the hints the listing gave it)?
type Allows = Box<dyn Fn(&str, Option<Hints>) -> bool + Send + Sync>;

/// Which responses are listings.
#[derive(Debug, Clone)]
pub(crate) enum Listed {
    /// The responses to these request ids (`tools/list`, `server/discover`) of a POST.
    Ids(Vec<Value>),
    /// Any result carrying `tools` (the server's GET stream, whose ids the proxy never saw).
    Any,
}

pub(crate) struct ToolFilter {
    listed: Listed,
    allows: Allows,
    /// Where the listed tools' annotations are remembered: the store and the route index.
    remember: Option<(std::sync::Arc<ToolAnnotations>, usize)>,
}

impl fmt::Debug for ToolFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolFilter")
            .field("listed", &self.listed)
            .finish_non_exhaustive()
    }
}

/// Why a response could not be filtered (for the audit record and log, not the caller).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Unreadable {
    #[error("tools/list response exceeds the inspection limit")]
    TooLarge,
    #[error("tools/list response has content-encoding {0:?}; only identity can be filtered")]
    Encoded(String),
    #[error("tools/list response is not JSON")]
    NotJson,
    #[error("tools/list response event is not UTF-8")]
    NotUtf8,
    #[error("tools/list result has no readable tools array")]
    BadTools,
    #[error("tools/list response body failed: {0}")]
    Body(String),
    #[error("tools/list response would pass limits.inspect_memory_bytes")]
    Budget,
    #[error("tools/list response did not arrive whole within limits.inspect_timeout")]
    Deadline,
}

impl ToolFilter {
    pub(crate) fn new(
        listed: Listed,
        allows: Allows,
        remember: Option<(std::sync::Arc<ToolAnnotations>, usize)>,
    ) -> Self {
        Self {
            listed,
            allows,
            remember,
        }
    }

    /// Rewrites `response` so that listing results list only allowed tools, whatever its
    /// status; an error when it cannot be read (see the module header).
    ///
    /// A JSON response is read whole before it is filtered: it is charged to the inspection
    /// budget through `reservation` (held until the filtered body has been sent) and must
    /// arrive within `deadline`, as request bodies read for inspection are. An event stream's
    /// buffered event (until it ends and is sent) is charged to `reservation` too.
    pub(crate) async fn apply(
        self,
        response: Response<ResponseBody>,
        mut reservation: Reservation,
        deadline: Duration,
    ) -> Result<Response<ResponseBody>, Unreadable> {
        let (mut parts, body) = response.into_parts();
        for encoding in parts.headers.get_all(header::CONTENT_ENCODING) {
            let encoding = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
            if !encoding.trim().eq_ignore_ascii_case("identity") {
                return Err(Unreadable::Encoded(encoding));
            }
        }
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"));
        parts.headers.remove(header::CONTENT_LENGTH);
        if sse {
            let body = SseFilter {
                inner: body,
                buf: BytesMut::new(),
                scanned: 0,
                started: false,
                done: false,
                trailers: None,
                filter: self,
                reservation,
            };
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let bytes = tokio::time::timeout(deadline, collect_bounded(body, &mut reservation))
            .await
            .map_err(|_| Unreadable::Deadline)??;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            // Nothing to list (a 202, an empty error).
            bytes
        } else {
            let json = bytes.strip_prefix(BOM).unwrap_or(&bytes);
            check_strict_exact(json).map_err(|_| Unreadable::NotJson)?;
            let mut value: Value = serde_json::from_slice(json).map_err(|_| Unreadable::NotJson)?;
            if self.filter_value(&mut value)? || json.len() != bytes.len() {
                Bytes::from(value.to_string())
            } else {
                bytes
            }
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let body = Reserved {
            inner: http_body_util::Full::new(bytes),
            _reservation: reservation,
        }
        .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }

    /// Filters a JSON-RPC response or batch of responses in place; true if anything changed.
    fn filter_value(&self, value: &mut Value) -> Result<bool, Unreadable> {
        match value {
            Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= self.filter_message(item)?;
                }
                Ok(changed)
            }
            message => self.filter_message(message),
        }
    }

    fn filter_message(&self, message: &mut Value) -> Result<bool, Unreadable> {
        let listed = match &self.listed {
            Listed::Ids(ids) => message.get("id").is_some_and(|id| ids.contains(id)),
            Listed::Any => message.pointer("/result/tools").is_some(),
        };
        if !listed {
            return Ok(false);
        }
        let tools = match message.get_mut("result") {
            // An error response, or a result without tools: nothing is listed.
            None => return Ok(false),
            Some(Value::Object(result)) => match result.get_mut("tools") {
                None => return Ok(false),
                Some(Value::Array(tools)) => tools,
                Some(_) => return Err(Unreadable::BadTools),
            },
            Some(_) => return Err(Unreadable::BadTools),
        };
        let before = tools.len();
        // Read once per tool: remembered for the route, and given to the decision.
        let hints: Vec<Option<Hints>> = tools.iter().map(Hints::of_tool).collect();
        fn name(tool: &Value) -> Option<&str> {
            tool.get("name").and_then(Value::as_str)
        }
        if let Some((store, route)) = &self.remember {
            store.remember(
                *route,
                tools
                    .iter()
                    .zip(&hints)
                    .filter_map(|(tool, hints)| Some((name(tool)?, *hints))),
            );
        }
        // `retain` visits every tool once, in order: the hints line up.
        let mut hints = hints.into_iter();
        tools.retain(|tool| {
            let hints = hints.next().flatten();
            name(tool).is_some_and(|name| (self.allows)(name, hints))
        });
        tracing::debug!(
            listed = before,
            visible = tools.len(),
            "tools/list result filtered"
        );
        Ok(true)
    }

    /// One SSE event (its bytes including the blank line ending it), rewritten if its data
    /// is a listing result (the data lines are joined with LF; the field name is followed
    /// by an optional single space).
    fn rewrite_event(&self, event: Bytes) -> Result<Bytes, Unreadable> {
        let text = std::str::from_utf8(&event).map_err(|_| Unreadable::NotUtf8)?;
        let lines: Vec<&str> = text
            .split('\n')
            .flat_map(|line| line.split('\r'))
            .filter(|line| !line.is_empty())
            .collect();
        let data_value = |line: &str| -> Option<String> {
            let rest = line.strip_prefix("data")?;
            if rest.is_empty() {
                return Some(String::new());
            }
            let rest = rest.strip_prefix(':')?;
            Some(rest.strip_prefix(' ').unwrap_or(rest).to_owned())
        };
        let data: Vec<String> = lines.iter().filter_map(|line| data_value(line)).collect();
        if data.is_empty() || (data.len() == 1 && data[0].is_empty()) {
            // No data (a comment, a priming event with an id only): nothing to read.
            return Ok(event);
        }
        let data = data.join("\n");
        check_strict_exact(data.as_bytes()).map_err(|_| Unreadable::NotJson)?;
        let mut value: Value = serde_json::from_str(&data).map_err(|_| Unreadable::NotJson)?;
        if !self.filter_value(&mut value)? {
            return Ok(event);
        }
        let mut out = String::with_capacity(event.len());
        let mut data_written = false;
        for line in lines {
            if data_value(line).is_none() {
                out.push_str(line);
                out.push('\n');
            } else if !data_written {
                out.push_str("data: ");
                out.push_str(&value.to_string());
                out.push('\n');
                data_written = true;
            }
        }
        out.push('\n');
        Ok(Bytes::from(out))
    }
}

/// The whole body, or an error past [`RESPONSE_LIMIT`]. (Not `http_body_util::Limited`: its
/// `Into<BoxError>` bound on an already boxed error is not provable inside this `Send`
/// future.)
async fn collect_bounded(
    mut body: ResponseBody,
    reservation: &mut Reservation,
) -> Result<Bytes, Unreadable> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Unreadable::Body(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            let needed = out.len() + data.len();
            if needed > RESPONSE_LIMIT {
                return Err(Unreadable::TooLarge);
            }
            reservation
                .grow_to(needed)
                .map_err(|_| Unreadable::Budget)?;
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// A filtered response's body, holding the inspection budget its buffer was charged to until
/// it has been sent (or dropped).
struct Reserved {
    inner: http_body_util::Full<Bytes>,
    _reservation: Reservation,
}

impl Body for Reserved {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|never| match never {})
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that passes SSE events through one at a time, rewriting listing
/// results; an event it cannot read ends the stream with an error (the caller sees a cut
/// stream, never the event).
struct SseFilter {
    inner: ResponseBody,
    buf: BytesMut,
    /// The start of a line in `buf` before which no event end can be (a resumption point).
    scanned: usize,
    /// Whether the first bytes of the stream were seen (a leading BOM is dropped).
    started: bool,
    done: bool,
    /// The upstream's trailers, sent after what is left in `buf` (the end of the body).
    trailers: Option<Frame<Bytes>>,
    filter: ToolFilter,
    /// The inspection budget `buf` is charged to, as a JSON listing's is: an event is held
    /// whole until it ends, so concurrent streams cannot buffer past
    /// `limits.inspect_memory_bytes` between them.
    reservation: Reservation,
}

/// Where the first complete event ends in `buf` (exclusive), reading lines as the WHATWG
/// parser does: a line ends at CRLF, LF or CR, and an empty line ends the event. `from` must
/// be the start of a line that follows a non-empty line (or 0). `Err(resume)`: no complete
/// event yet; `resume` is where to start next time. A CR at the end of `buf` waits for the
/// next byte, which decides whether it is a CRLF.
fn event_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let mut i = from;
    let mut line_start = from;
    while i < buf.len() {
        let terminator = match buf[i] {
            b'\n' => 1,
            b'\r' => match buf.get(i + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                None => return Err(line_start),
            },
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            return Ok(i + terminator);
        }
        i += terminator;
        line_start = i;
    }
    Err(line_start)
}

impl Body for SseFilter {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if !this.started && this.buf.len() >= BOM.len() {
                this.started = true;
                if this.buf.starts_with(BOM) {
                    let _ = this.buf.split_to(BOM.len());
                }
            }
            if this.started {
                match event_end(&this.buf, this.scanned) {
                    Ok(end) => {
                        this.scanned = 0;
                        let event = this.buf.split_to(end).freeze();
                        this.reservation.shrink_to(this.buf.len());
                        return Poll::Ready(Some(
                            this.filter
                                .rewrite_event(event)
                                .map(Frame::data)
                                .map_err(|e| -> BoxError { Box::new(e) }),
                        ));
                    }
                    Err(resume) => this.scanned = resume,
                }
            }
            if this.done {
                this.started = true;
                if this.buf.is_empty() {
                    return Poll::Ready(this.trailers.take().map(Ok));
                }
                this.scanned = 0;
                let rest = this.buf.split().freeze();
                return Poll::Ready(Some(
                    this.filter
                        .rewrite_event(rest)
                        .map(Frame::data)
                        .map_err(|e| -> BoxError { Box::new(e) }),
                ));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let needed = this.buf.len() + data.len();
                        if needed > RESPONSE_LIMIT {
                            return Poll::Ready(Some(Err(Box::new(Unreadable::TooLarge))));
                        }
                        if this.reservation.grow_to(needed).is_err() {
                            return Poll::Ready(Some(Err(Box::new(Unreadable::Budget))));
                        }
                        this.buf.extend_from_slice(&data);
                    }
                    // The body's end: the events still held go out before them.
                    Err(trailers) => {
                        this.done = true;
                        this.trailers = Some(trailers);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.buf.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Entry point for `fuzz/` (outside the workspace, so it sees only public items): runs a
/// response body through the JSON and the SSE rewriting paths as the pipeline would, with a
/// fixed allow rule. Not part of the API.
#[doc(hidden)]
pub fn fuzz_tools_list(body: &[u8]) {
    let filter = ToolFilter::new(
        Listed::Ids(vec![Value::from(1), Value::from("a")]),
        Box::new(|name, _| name.len() % 2 == 0),
        Some((std::sync::Arc::new(ToolAnnotations::new(1)), 0)),
    );
    if let Ok(mut value) = serde_json::from_slice::<Value>(body) {
        let _ = filter.filter_value(&mut value);
    }
    let _ = event_end(body, 0);
    let _ = filter.rewrite_event(Bytes::copy_from_slice(body));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(listed: Listed) -> ToolFilter {
        ToolFilter::new(listed, Box::new(|name, _| name == "ok"), None)
    }

    #[test]
    fn events_end_at_blank_lines_with_any_line_ending() {
        assert_eq!(event_end(b"data: a\n\ndata: b\n\n", 0), Ok(9));
        assert_eq!(event_end(b"data: a\r\n\r\nx", 0), Ok(11));
        assert_eq!(event_end(b"data: a\r\rx", 0), Ok(9));
        // LF then CRLF: one line ended by LF, then a blank line.
        assert_eq!(event_end(b"data: a\n\r\ndata: b\n\n", 0), Ok(10));
        // LF then CR followed by data: the CR alone is the blank line.
        assert_eq!(event_end(b"data: a\n\rdata: b\n\n", 0), Ok(9));
        // A CR at the end may be the first half of a CRLF: wait.
        assert_eq!(event_end(b"data: a\r", 0), Err(0));
        assert_eq!(event_end(b"data: a\ndata", 0), Err(8));
        assert_eq!(event_end(b"data: a\ndata: b\n\n", 8), Ok(17));
    }

    #[test]
    fn unreadable_events_are_errors_not_passed_through() {
        let f = filter(Listed::Ids(vec![Value::from(1)]));
        assert!(matches!(
            f.rewrite_event(Bytes::from_static(b"data: \xff\xfe\n\n")),
            Err(Unreadable::NotUtf8)
        ));
        assert!(matches!(
            f.rewrite_event(Bytes::from_static(b"data: {\"id\":1,\n\n")),
            Err(Unreadable::NotJson)
        ));
        assert!(matches!(
            f.rewrite_event(Bytes::from_static(
                b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":{\"name\":\"no\"}}}\n\n"
            )),
            Err(Unreadable::BadTools)
        ));
        // Duplicate keys: one client would read the first `result`, another the last.
        assert!(matches!(
            f.rewrite_event(Bytes::from_static(
                b"data: {\"id\":1,\"result\":{\"tools\":[]},\"result\":{\"tools\":[{\"name\":\"no\"}]}}\n\n"
            )),
            Err(Unreadable::NotJson)
        ));
        // No data: passed as it is.
        assert!(f.rewrite_event(Bytes::from_static(b": ping\n\n")).is_ok());
        assert!(
            f.rewrite_event(Bytes::from_static(b"id: 3\ndata:\n\n"))
                .is_ok()
        );
    }

    #[test]
    fn a_result_split_over_data_lines_is_filtered_as_one_event() {
        let f = filter(Listed::Ids(vec![Value::from(1)]));
        let event = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"ok\"},{\"name\":\"no\"}]}}\n\n";
        let out = f.rewrite_event(Bytes::from_static(event)).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains("\"ok\"") && !text.contains("\"no\""),
            "{text}"
        );
        assert!(text.starts_with("event: message\n"), "{text}");
    }

    /// Frames given in order, then the end.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Trailers end the body: the event still held (here, one the upstream did not end with
    /// a blank line) goes out, filtered, before them, not after.
    #[tokio::test]
    async fn trailers_come_after_the_events_still_held() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("1"));
        let body = Frames(
            [
                Frame::data(Bytes::from_static(
                    b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"ok\"},{\"name\":\"no\"}]}}\n",
                )),
                Frame::trailers(trailers),
            ]
            .into(),
        );
        let mut response = Response::new(body.boxed_unsync());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        let budget = crate::admission::InspectBudget::new(1 << 20);
        let filtered = filter(Listed::Ids(vec![Value::from(1)]))
            .apply(response, budget.reservation(), Duration::from_secs(30))
            .await
            .unwrap();
        let mut body = filtered.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap());
        }
        assert_eq!(frames.len(), 2, "{frames:?}");
        let data = frames[0].data_ref().expect("the event first");
        let text = std::str::from_utf8(data).unwrap();
        assert!(
            text.contains("\"ok\"") && !text.contains("\"no\""),
            "{text}"
        );
        assert_eq!(frames[1].trailers_ref().unwrap()["x-checksum"], "1");
        // Everything the filter held went back to the budget with the body.
        drop(body);
        assert!(budget.reservation().grow_to(1 << 20).is_ok());
    }

    #[test]
    fn any_listing_on_a_get_stream_is_filtered_whatever_its_id() {
        let f = filter(Listed::Any);
        let mut value: Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":"replayed","result":{"tools":[{"name":"ok"},{"name":"no"},{"name":["ok"]}]}}"#,
        )
        .unwrap();
        assert!(f.filter_value(&mut value).unwrap());
        assert_eq!(
            value["result"]["tools"],
            serde_json::json!([{"name": "ok"}])
        );
        let mut other: Value =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":2,"result":{"content":[]}}"#).unwrap();
        assert!(!f.filter_value(&mut other).unwrap());
    }
}
