//! A recording upstream: the application behind the proxy, on 127.0.0.1 port 0.
//!
//! - `POST /v1/chat/completions`: an OpenAI-style echo; with `"stream": true` it answers with
//!   Server-Sent Events, one `chat.completion.chunk` per word of the last user message.
//!   SSE pacing is either a fixed delay (the demo) or a gate a test opens event by event, so a
//!   test can prove each event crossed the proxy before the next one existed.
//! - `POST /mcp` and `POST /mcp-sse`: a minimal MCP server (JSON-RPC 2.0): `tools/list`
//!   lists `search_tickets` (annotated read-only), `refund` and `delete_everything` (both
//!   annotated destructive); `tools/call` answers with the
//!   tool's name; other requests get an empty result, notifications 202. `/mcp` answers in
//!   JSON, `/mcp-sse` as one SSE event preceded by a progress notification.
//! - `GET /slow`: answers after a minute (upstream timeout tests).
//! - any method on `/scripted`: the reply a test set with [`Upstream::script`] (status,
//!   headers, body bytes as given), for servers that answer in ways a filter must survive.
//! - anything else: 200 with a JSON echo of what arrived (method, path, identity headers).
//!
//! Every request is recorded with its headers and body, and whether the body ended cleanly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// False when the body stream failed before its end (the proxy aborted it).
    pub body_complete: bool,
}

/// How SSE events are paced.
#[derive(Debug, Clone)]
pub enum SsePacing {
    Delay(Duration),
    /// Each event after the first waits for one permit.
    Gate(Arc<Semaphore>),
}

/// A reply for `/scripted`, sent exactly as given.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

#[derive(Debug)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    pacing: SsePacing,
    scripted: Mutex<Option<Reply>>,
    connections: AtomicUsize,
}

/// A running upstream; stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(pacing: SsePacing) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", pacing).await
    }

    pub async fn start_on(addr: &str, pacing: SsePacing) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            pacing,
            scripted: Mutex::new(None),
            connections: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What `/scripted` answers from now on.
    pub fn script(&self, reply: Reply) {
        if let Ok(mut scripted) = self.state.scripted.lock() {
            *scripted = Some(reply);
        }
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let (body, body_complete) = match body.collect().await {
        Ok(collected) => (collected.to_bytes(), true),
        Err(_) => (Bytes::new(), false),
    };
    let recorded = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
        body_complete,
    };
    if let Ok(mut requests) = state.requests.lock() {
        requests.push(recorded);
    }
    if !body_complete {
        return Ok(text(StatusCode::BAD_REQUEST, "body aborted"));
    }
    let path = parts.uri.path();
    if path == "/scripted" {
        let reply = state.scripted.lock().ok().and_then(|r| r.clone());
        let Some(reply) = reply else {
            return Ok(text(StatusCode::INTERNAL_SERVER_ERROR, "nothing scripted"));
        };
        let mut response = Response::new(full(reply.body));
        *response.status_mut() =
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        for (name, value) in reply.headers {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                response.headers_mut().append(name, value);
            }
        }
        return Ok(response);
    }
    if parts.method == Method::POST && path == "/v1/chat/completions" {
        return Ok(chat_completion(&body, &state.pacing));
    }
    if parts.method == Method::POST && (path == "/mcp" || path == "/mcp-sse") {
        return Ok(mcp(&body, path == "/mcp-sse"));
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "path": path,
        "agent": header("x-portcullis-agent"),
        "user": header("x-portcullis-user"),
        "request_id": header("x-request-id"),
        "body_bytes": body.len(),
    });
    Ok(json(StatusCode::OK, &echo))
}

fn chat_completion(body: &[u8], pacing: &SsePacing) -> Response<Body> {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return text(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt = request["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let words: Vec<String> = if prompt.is_empty() {
        vec!["(empty)".to_owned()]
    } else {
        prompt.split_whitespace().map(str::to_owned).collect()
    };
    if request["stream"].as_bool() != Some(true) {
        let completion = serde_json::json!({
            "id": "chatcmpl-echo",
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": words.join(" ")},
                "finish_reason": "stop",
            }],
        });
        return json(StatusCode::OK, &completion);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let pacing = pacing.clone();
    tokio::spawn(async move {
        for (index, word) in words.iter().enumerate() {
            if index > 0 {
                match &pacing {
                    SsePacing::Delay(delay) => tokio::time::sleep(*delay).await,
                    SsePacing::Gate(gate) => match gate.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return,
                    },
                }
            }
            let chunk = serde_json::json!({
                "id": "chatcmpl-echo",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}],
            });
            if tx
                .send(Bytes::from(format!("data: {chunk}\n\n")))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BoxBody::new(ChannelBody(rx)))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

fn mcp(body: &[u8], sse: bool) -> Response<Body> {
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(body) else {
        return text(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let answer = |message: &serde_json::Value| {
        let id = message.get("id")?;
        let result = match message["method"].as_str() {
            Some("tools/list") => serde_json::json!({"tools": [
                {"name": "search_tickets", "inputSchema": {"type": "object"},
                 "annotations": {"title": "Search tickets", "readOnlyHint": true, "openWorldHint": false}},
                {"name": "refund", "inputSchema": {"type": "object"},
                 "annotations": {"destructiveHint": true, "idempotentHint": false}},
                {"name": "delete_everything", "inputSchema": {"type": "object"},
                 "annotations": {"destructiveHint": true}},
            ]}),
            Some("tools/call") => serde_json::json!({
                "content": [{"type": "text", "text": format!("called {}", message["params"]["name"])}],
            }),
            _ => serde_json::json!({}),
        };
        Some(serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}))
    };
    let reply = match &message {
        serde_json::Value::Array(list) => {
            let replies: Vec<_> = list.iter().filter_map(answer).collect();
            (!replies.is_empty()).then_some(serde_json::Value::Array(replies))
        }
        single => answer(single),
    };
    let Some(reply) = reply else {
        let mut response = text(StatusCode::ACCEPTED, "");
        *response.body_mut() = full(Bytes::new());
        return response;
    };
    if !sse {
        return json(StatusCode::OK, &reply);
    }
    let progress = serde_json::json!({
        "jsonrpc": "2.0", "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": 1},
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(full(Bytes::from(format!(
            "event: message\ndata: {progress}\n\nid: 7\nevent: message\ndata: {reply}\n\n"
        ))))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// A response body fed by a channel: each message is one frame, sent as soon as it exists.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(Bytes::from(value.to_string())))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

fn text(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response
}

fn full(bytes: Bytes) -> Body {
    BoxBody::new(http_body_util::Full::new(bytes))
}
