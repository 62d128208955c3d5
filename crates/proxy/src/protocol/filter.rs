//! `tools/list` result filtering: the caller sees only the tools its agent (and user) may
//! call. Each listed tool is asked `call_tool` of Cedar with the request's principal(s) (see
//! `mcp::listing_call`); tools without a string `name` are dropped.
//!
//! The server may answer a POST with one JSON body or with an SSE stream (MCP 2025-06-18,
//! Streamable HTTP: "either Content-Type: text/event-stream ... or Content-Type:
//! application/json"). A JSON body is read whole (bounded) and rewritten; an SSE stream is
//! rewritten event by event, so other events (progress notifications, server requests) still
//! stream as they come. Only responses whose `id` is one of the listed `tools/list` request
//! ids are touched. Bodies over the limit fail closed (the response is cut, never passed
//! unfiltered). This module does not decide: the pipeline gives it the question to ask.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::body::{BoxError, ResponseBody};

/// A JSON response (or one SSE event) larger than this cannot be filtered and is refused.
pub(crate) const RESPONSE_LIMIT: usize = 8 * 1024 * 1024;

type Allows = Box<dyn Fn(&str) -> bool + Send + Sync>;

pub(crate) struct ToolFilter {
    ids: Vec<Value>,
    allows: Allows,
}

impl fmt::Debug for ToolFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolFilter")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tools/list response exceeds the inspection limit")]
pub(crate) struct TooLarge;

impl ToolFilter {
    pub(crate) fn new(ids: Vec<Value>, allows: Allows) -> Self {
        Self { ids, allows }
    }

    /// Rewrites `response` so that `tools/list` results list only allowed tools.
    pub(crate) async fn apply(
        self,
        response: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, String> {
        let (mut parts, body) = response.into_parts();
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
                done: false,
                filter: self,
            };
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let bytes = collect_bounded(body).await?;
        let bytes = match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut value) => {
                if self.filter_value(&mut value) {
                    Bytes::from(value.to_string())
                } else {
                    bytes
                }
            }
            // Not JSON: no JSON-RPC client reads tools from it.
            Err(_) => bytes,
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let body = http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }

    /// Filters a JSON-RPC response or batch of responses in place; true if anything changed.
    fn filter_value(&self, value: &mut Value) -> bool {
        match value {
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |changed, item| self.filter_message(item) | changed),
            message => self.filter_message(message),
        }
    }

    fn filter_message(&self, message: &mut Value) -> bool {
        let Some(id) = message.get("id") else {
            return false;
        };
        if !self.ids.contains(id) {
            return false;
        }
        let Some(Value::Array(tools)) = message.pointer_mut("/result/tools") else {
            return false;
        };
        let before = tools.len();
        tools.retain(|tool| {
            tool["name"]
                .as_str()
                .is_some_and(|name| (self.allows)(name))
        });
        tracing::debug!(
            listed = before,
            visible = tools.len(),
            "tools/list result filtered"
        );
        true
    }

    /// One SSE event (its bytes including the blank line ending it), rewritten if its data
    /// is a `tools/list` result (WHATWG HTML, "Server-sent events": data lines are joined
    /// with LF; the field name is followed by an optional single space).
    fn rewrite_event(&self, event: Bytes) -> Bytes {
        let Ok(text) = std::str::from_utf8(&event) else {
            return event;
        };
        let lines: Vec<&str> = text
            .split('\n')
            .flat_map(|line| line.split('\r'))
            .filter(|line| !line.is_empty())
            .collect();
        let data: Vec<&str> = lines
            .iter()
            .filter_map(|line| line.strip_prefix("data"))
            .filter(|rest| rest.is_empty() || rest.starts_with(':'))
            .map(|rest| rest.strip_prefix(':').unwrap_or(rest))
            .map(|rest| rest.strip_prefix(' ').unwrap_or(rest))
            .collect();
        if data.is_empty() {
            return event;
        }
        let Ok(mut value) = serde_json::from_str::<Value>(&data.join("\n")) else {
            return event;
        };
        if !self.filter_value(&mut value) {
            return event;
        }
        let mut out = String::with_capacity(event.len());
        let mut data_written = false;
        for line in lines {
            let is_data = line
                .strip_prefix("data")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'));
            if !is_data {
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
        Bytes::from(out)
    }
}

/// The whole body, or an error past [`RESPONSE_LIMIT`]. (Not `http_body_util::Limited`: its
/// `Into<BoxError>` bound on an already boxed error is not provable inside this `Send`
/// future.)
async fn collect_bounded(mut body: ResponseBody) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > RESPONSE_LIMIT {
                return Err(TooLarge.to_string());
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// A response body that passes SSE events through one at a time, rewriting `tools/list`
/// results.
struct SseFilter {
    inner: ResponseBody,
    buf: BytesMut,
    /// How much of `buf` is known to hold no event end.
    scanned: usize,
    done: bool,
    filter: ToolFilter,
}

/// The end (exclusive) of the first complete event: a blank line, with LF, CRLF or CR line
/// endings.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some(i + 2)
        } else {
            None
        }
    })
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
            // Back off 3 bytes so a terminator split across frames is still found.
            if let Some(end) = event_end(&this.buf, this.scanned.saturating_sub(3)) {
                this.scanned = 0;
                let event = this.buf.split_to(end).freeze();
                return Poll::Ready(Some(Ok(Frame::data(this.filter.rewrite_event(event)))));
            }
            this.scanned = this.buf.len();
            if this.done {
                if this.buf.is_empty() {
                    return Poll::Ready(None);
                }
                let rest = this.buf.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(this.filter.rewrite_event(rest)))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if this.buf.len() + data.len() > RESPONSE_LIMIT {
                            return Poll::Ready(Some(Err(Box::new(TooLarge))));
                        }
                        this.buf.extend_from_slice(&data);
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.buf.is_empty()
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
        vec![Value::from(1), Value::from("a")],
        Box::new(|name| name.len() % 2 == 0),
    );
    if let Ok(mut value) = serde_json::from_slice::<Value>(body) {
        filter.filter_value(&mut value);
    }
    let _ = event_end(body, 0);
    let _ = filter.rewrite_event(Bytes::copy_from_slice(body));
}
