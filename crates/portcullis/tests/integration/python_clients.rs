//! The proxy driven by official client libraries over real mTLS: the MCP Python SDK client
//! against an MCP Python SDK server (Streamable HTTP), and the OpenAI Python client streaming
//! a completion. The Python side is installed by `.ci/python-clients`, which prints
//! `PORTCULLIS_PYTHON`; under CI (`CI=true`) a missing interpreter fails the test, locally it
//! is skipped with a notice.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Harness, TRIAGE, repo_root, write};
use crate::protocols::POLICIES;

fn python() -> Option<PathBuf> {
    match std::env::var_os("PORTCULLIS_PYTHON") {
        Some(python) => Some(PathBuf::from(python)),
        None if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!(
                "CI=true but PORTCULLIS_PYTHON is unset: eval \"$(bash .ci/python-clients --print-env)\" first"
            )
        }
        None => {
            eprintln!(
                "NOTICE: skipping the Python client test: PORTCULLIS_PYTHON is unset \
                 (eval \"$(bash .ci/python-clients --print-env)\")"
            );
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    repo_root()
        .join("crates/portcullis/tests/python")
        .join(name)
}

/// The CA and the triage agent's SVID as PEM files for the Python TLS stack.
fn pem_files(h: &Harness, dir: &Path) -> [String; 3] {
    let svid = h.svid(TRIAGE);
    write(dir, "client-ca.pem", &h.ca.cert_pem());
    write(dir, "client.pem", &svid.cert_pem);
    write(dir, "client-key.pem", &svid.key_pem);
    ["client-ca.pem", "client.pem", "client-key.pem"].map(|f| dir.join(f).display().to_string())
}

/// Kills the child process when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_client(python: PathBuf, args: Vec<String>) -> Value {
    let output = tokio::task::spawn_blocking(move || Command::new(python).args(args).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_mcp_python_sdk_through_the_proxy() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let calls = dir.path().join("calls.jsonl");
    let server = Command::new(&python)
        .arg(script("mcp_server.py"))
        .arg(port.to_string())
        .arg(&calls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Killed(server);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut up = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the MCP server did not start");
    let h = Harness::builder()
        .policies(POLICIES)
        .yaml("routes:\n  - path: /mcp\n    protocol: mcp\n")
        .upstream(addr)
        .start()
        .await;
    let [ca, cert, key] = pem_files(&h, dir.path());
    let url = format!("https://127.0.0.1:{}/mcp", h.addr.port());
    let report = run_client(
        python,
        vec![
            script("mcp_client.py").display().to_string(),
            url,
            ca,
            cert,
            key,
        ],
    )
    .await;
    assert_eq!(
        report["tools"],
        serde_json::json!(["refund", "search_tickets"]),
        "{report}"
    );
    assert!(
        report["search"]["ok"][0]
            .as_str()
            .unwrap()
            .contains("printer"),
        "{report}"
    );
    assert_eq!(report["delete"]["code"], -32001, "{report}");
    assert!(report["small_refund"]["ok"].is_array(), "{report}");
    assert_eq!(report["large_refund"]["code"], -32001, "{report}");
    let seen: Vec<Value> = std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tools: Vec<&str> = seen.iter().map(|c| c["tool"].as_str().unwrap()).collect();
    assert_eq!(
        tools,
        ["search_tickets", "refund"],
        "the server saw only allowed calls"
    );
    // A 2026-07-28 request whose Mcp-Name names a harmless tool while the body calls
    // another: 400 from the proxy, and the SDK server never sees it.
    let mut req = portcullis_test_support::client::request(
        "POST",
        crate::harness::HOST,
        "/mcp",
        serde_json::json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "refund", "arguments": {"refund": {"amount": 5}}}})
        .to_string(),
    );
    for (name, value) in [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "search_tickets"),
    ] {
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    let (status, body) = h
        .send(
            TRIAGE,
            portcullis_test_support::client::HttpVersion::Http1,
            req,
        )
        .await;
    assert_eq!(status, 400, "{body:?}");
    let after = std::fs::read_to_string(&calls).unwrap_or_default();
    assert_eq!(
        after.lines().count(),
        seen.len(),
        "the server saw the mismatched call"
    );
}

#[tokio::test]
async fn the_openai_python_client_streams_through_the_proxy() {
    let Some(python) = python() else { return };
    let h = Harness::builder()
        .policies(POLICIES)
        .yaml("routes:\n  - path_prefix: /v1\n    protocol: openai\n")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = pem_files(&h, dir.path());
    let base_url = format!("https://127.0.0.1:{}/v1", h.addr.port());
    let report = run_client(
        python,
        vec![
            script("openai_client.py").display().to_string(),
            base_url,
            ca,
            cert,
            key,
        ],
    )
    .await;
    assert_eq!(
        report["chunks"],
        serde_json::json!(["one", "two", "three"]),
        "{report}"
    );
    assert_eq!(report["denied"]["status"], 403, "{report}");
    assert_eq!(report["denied"]["code"], "policy_denied", "{report}");
}
