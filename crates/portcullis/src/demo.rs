//! `portcullis demo`: the whole product on loopback, with nothing installed.
//!
//! It mints a CA and SVIDs, starts an OpenAI-style upstream that streams SSE, writes a
//! config that points at the embedded example policies, loads it through the same
//! [`Config::load`] as `portcullis run`, and drives scripted calls: allowed and denied agents,
//! callers the handshake refuses, a spoofed identity header, an ambiguous path and a streamed
//! completion. What it prints in the "why" column is read back from the audit trail and the
//! metrics, not written into the script.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use portcullis_test_support::client::{CallError, Caller, HttpVersion, request};
use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use portcullis_test_support::upstream::{SsePacing, Upstream};

use crate::config::Config;

/// The example policy set, embedded so the demo runs from anywhere.
const POLICY_FILES: [(&str, &str); 4] = [
    (
        "schema.cedarschema",
        include_str!("../../../policies/schema.cedarschema"),
    ),
    (
        "agents.cedar",
        include_str!("../../../policies/agents.cedar"),
    ),
    (
        "guardrails.cedar",
        include_str!("../../../policies/guardrails.cedar"),
    ),
    (
        "entities.json",
        include_str!("../../../policies/entities.json"),
    ),
];

const TRUST_DOMAIN: &str = "prod.example.org";
const SERVER_ID: &str = "spiffe://prod.example.org/ns/orders/sa/orders-api";
const TRIAGE_ID: &str = "spiffe://prod.example.org/ns/support/sa/triage-agent";
const REPORT_ID: &str = "spiffe://prod.example.org/ns/billing/sa/report-agent";
const PARTNER_ID: &str = "spiffe://partner.example.net/ns/crawlers/sa/scraper";
const HOST: &str = "orders.prod.example.org";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Exit after the scripted calls instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Where to write certificates, config and audit log (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// mTLS listener; if the port is taken, a free one is used.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Admin listener (/metrics, /healthz, /readyz); if the port is taken, a free one is used.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,
}

pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::from(crate::EXIT_RUNTIME)
        }
    }
}

/// The demo's PKI: one trusted trust domain, and the certificates of every cast member.
struct Pki {
    ca: Ca,
    triage: Svid,
    report: Svid,
    partner: Svid,
    impostor: Svid,
}

impl Pki {
    fn mint() -> Result<(Self, Svid)> {
        let ca = Ca::new(TRUST_DOMAIN)?;
        let server = ca.leaf(&LeafSpec::server(SERVER_ID))?;
        let triage = ca.svid(TRIAGE_ID)?;
        let report = ca.svid(REPORT_ID)?;
        let partner = Ca::new("partner.example.net")?.svid(PARTNER_ID)?;
        // A CA we do not trust, issuing a certificate that claims our trust domain.
        let impostor = Ca::new(TRUST_DOMAIN)?.svid(TRIAGE_ID)?;
        Ok((
            Self {
                ca,
                triage,
                report,
                partner,
                impostor,
            },
            server,
        ))
    }
}

async fn demo(args: DemoArgs) -> Result<()> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(dir.join("policies"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let (pki, server) = Pki::mint()?;
    write_files(&dir, &pki, &server)?;

    let upstream = Upstream::start(SsePacing::Delay(Duration::from_millis(120))).await?;
    let listen = free_or_fallback(args.listen);
    let admin_listen = free_or_fallback(args.admin_listen);
    let config_path = dir.join("config.yaml");
    std::fs::write(
        &config_path,
        config_yaml(listen, admin_listen, upstream.addr),
    )?;
    let config = Config::load(&config_path).map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let running = portcullis_proxy::start(
        config
            .into_options()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .await?;
    let addr = running.local_addr();
    let admin = running.admin_addr();

    println!("Portcullis demo");
    println!("  agents connect with mTLS to {addr}; admin (metrics) on http://{admin}");
    println!(
        "  upstream application (OpenAI-style echo, streams SSE) on {}",
        upstream.addr
    );
    println!(
        "  certificates, config.yaml, policies/ and audit.jsonl in {}",
        dir.display()
    );
    println!();

    let roots = [pki.ca.cert_der()];
    let h1 = |svid: &Svid| Caller::new(&roots, Some(svid), HttpVersion::Http1);
    let h2 = |svid: &Svid| Caller::new(&roots, Some(svid), HttpVersion::Http2);
    let script: Vec<Step> = vec![
        Step::http(
            "support/triage-agent",
            h2(&pki.triage)?,
            "GET",
            "/api/orders/17",
            "",
        ),
        Step::http(
            "support/triage-agent",
            h1(&pki.triage)?,
            "POST",
            "/api/tickets/9/comments",
            r#"{"text":"refund issued"}"#,
        ),
        Step::http(
            "support/triage-agent",
            h1(&pki.triage)?,
            "DELETE",
            "/api/orders/17",
            "",
        ),
        Step::http(
            "support/triage-agent",
            h1(&pki.triage)?,
            "GET",
            "/admin/users",
            "",
        ),
        Step::http(
            "support/triage-agent",
            h1(&pki.triage)?,
            "GET",
            "/api/../admin/users",
            "",
        ),
        Step::http(
            "billing/report-agent",
            h2(&pki.report)?,
            "GET",
            "/api/orders/17",
            "",
        ),
        Step::http(
            "billing/report-agent",
            h1(&pki.report)?,
            "GET",
            "/health",
            "",
        ),
        Step::spoof("support/triage-agent", h1(&pki.triage)?),
        Step::http(
            "partner.example.net scraper",
            h1(&pki.partner)?,
            "GET",
            "/api/orders/17",
            "",
        ),
        Step::http(
            "impostor (rogue CA, claims triage)",
            h1(&pki.impostor)?,
            "GET",
            "/api/orders/17",
            "",
        ),
        Step::http(
            "no client certificate",
            Caller::new(&roots, None, HttpVersion::Http1)?,
            "GET",
            "/api/orders/17",
            "",
        ),
    ];

    let audit_path = dir.join("audit.jsonl");
    let mut rows = Vec::new();
    for (index, step) in script.iter().enumerate() {
        rows.push(step.run(index + 1, addr, admin, &audit_path).await);
    }
    print_table(&rows);

    println!();
    println!(
        "Streaming: POST /v1/chat/completions {{\"stream\": true}} as support/triage-agent (HTTP/2)"
    );
    stream_completion(&h2(&pki.triage)?, addr).await?;

    println!();
    println!("Metrics (excerpt of http://{admin}/metrics):");
    let metrics = scrape(admin).await.unwrap_or_default();
    for line in metrics.lines().filter(|l| {
        l.starts_with("portcullis_decisions_total")
            || l.starts_with("portcullis_tls_handshake_failures_total")
            || l.starts_with("portcullis_request_rejections_total")
            || l.starts_with("portcullis_decision_duration_seconds_count")
    }) {
        println!("  {line}");
    }

    if args.once {
        running.shutdown(Duration::from_secs(2)).await;
        return Ok(());
    }
    print_try_it(&dir, addr, admin);
    crate::shutdown_signal().await;
    running.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

fn write_files(dir: &Path, pki: &Pki, server: &Svid) -> Result<()> {
    let files = [
        ("ca.pem", pki.ca.cert_pem()),
        ("server.pem", server.cert_pem.clone()),
        ("server-key.pem", server.key_pem.clone()),
        ("triage-agent.pem", pki.triage.cert_pem.clone()),
        ("triage-agent-key.pem", pki.triage.key_pem.clone()),
        ("report-agent.pem", pki.report.cert_pem.clone()),
        ("report-agent-key.pem", pki.report.key_pem.clone()),
        ("partner.pem", pki.partner.cert_pem.clone()),
        ("partner-key.pem", pki.partner.key_pem.clone()),
    ];
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents).with_context(|| format!("writing {name}"))?;
    }
    for (name, contents) in POLICY_FILES {
        std::fs::write(dir.join("policies").join(name), contents)?;
    }
    Ok(())
}

fn config_yaml(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "# Written by `portcullis demo`.\n\
         listen: {listen}\n\
         admin_listen: {admin}\n\
         upstream: http://{upstream}\n\
         tls:\n  cert: server.pem\n  key: server-key.pem\n  trust_bundles:\n    {TRUST_DOMAIN}: ca.pem\n\
         policy:\n  dir: policies\n  mode: enforce\n\
         audit:\n  sink: audit.jsonl\n"
    )
}

/// The requested address if it can be bound now, otherwise the same host on a free port.
fn free_or_fallback(addr: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

enum StepKind {
    Plain {
        method: &'static str,
        path: &'static str,
        body: &'static str,
    },
    /// Sends forged identity headers; the row shows what the upstream actually received.
    Spoof,
}

struct Step {
    caller_name: &'static str,
    caller: Caller,
    kind: StepKind,
}

struct Row {
    index: usize,
    caller: String,
    request: String,
    result: String,
    why: String,
}

impl Step {
    fn http(
        caller_name: &'static str,
        caller: Caller,
        method: &'static str,
        path: &'static str,
        body: &'static str,
    ) -> Self {
        Self {
            caller_name,
            caller,
            kind: StepKind::Plain { method, path, body },
        }
    }

    fn spoof(caller_name: &'static str, caller: Caller) -> Self {
        Self {
            caller_name,
            caller,
            kind: StepKind::Spoof,
        }
    }

    async fn run(&self, index: usize, addr: SocketAddr, admin: SocketAddr, audit: &Path) -> Row {
        let (method, path, body) = match self.kind {
            StepKind::Plain { method, path, body } => (method, path, body),
            StepKind::Spoof => ("GET", "/api/orders/17", ""),
        };
        let mut req = request(method, HOST, path, Bytes::from_static(body.as_bytes()));
        if matches!(self.kind, StepKind::Spoof) {
            let headers = req.headers_mut();
            headers.insert(
                "x-portcullis-agent",
                http::HeaderValue::from_static("spiffe://prod.example.org/ns/admin/sa/root"),
            );
            headers.insert(
                "x-forwarded-client-cert",
                http::HeaderValue::from_static("By=spiffe://prod.example.org/ns/admin/sa/root"),
            );
        }
        let request_text = match self.kind {
            StepKind::Plain { .. } => format!("{method} {path}"),
            StepKind::Spoof => format!("{method} {path} + forged x-portcullis-agent"),
        };
        let before = handshake_failures(admin).await;
        let mut row = Row {
            index,
            caller: self.caller_name.to_owned(),
            request: request_text,
            result: String::new(),
            why: String::new(),
        };
        match self.caller.call(addr, req).await {
            Ok(response) => {
                let status = response.status();
                let request_id = response
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let record = audit_record(audit, &request_id).await;
                let decision = record
                    .as_ref()
                    .and_then(|r| r["decision"].as_str())
                    .unwrap_or("-");
                row.result = format!("{} {}", status.as_u16(), decision);
                row.why = explain(record.as_ref());
                if matches!(self.kind, StepKind::Spoof) {
                    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    row.why = format!(
                        "upstream saw agent = {}",
                        echo["agent"].as_str().unwrap_or("?")
                    );
                }
            }
            Err(error) => {
                row.result = match &error {
                    CallError::Tls(_) => "TLS refused".to_owned(),
                    other => format!("error: {other}"),
                };
                let reason = changed_reason(admin, &before).await;
                row.why = format!(
                    "handshake failure: {}",
                    reason.unwrap_or_else(|| "?".to_owned())
                );
            }
        }
        row
    }
}

fn explain(record: Option<&serde_json::Value>) -> String {
    let Some(record) = record else {
        return "(no audit record found)".to_owned();
    };
    let policies: Vec<&str> = record["policies"]["agent"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    match (record["decision"].as_str(), record["reason"].as_str()) {
        (Some("allow"), _) => format!("permit: {}", policies.join(", ")),
        (Some(_), _) if !policies.is_empty() => format!("forbid: {}", policies.join(", ")),
        (Some(_), _) => "no policy permits it".to_owned(),
        (None, Some(reason)) => format!("refused before policy: {reason}"),
        (None, None) => "-".to_owned(),
    }
}

/// The audit record of `request_id`; it is written when the response ends, so it may land a
/// moment after the client has the body.
async fn audit_record(audit: &Path, request_id: &str) -> Option<serde_json::Value> {
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(audit) {
            let found = text
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|record| record["request_id"].as_str() == Some(request_id));
            if found.is_some() {
                return found;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn scrape(admin: SocketAddr) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request("GET", "localhost", "/metrics", Bytes::new()))
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn handshake_failures(admin: SocketAddr) -> BTreeMap<String, f64> {
    let text = scrape(admin).await.unwrap_or_default();
    text.lines()
        .filter_map(|line| line.strip_prefix("portcullis_tls_handshake_failures_total{reason=\""))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Which handshake-failure reason the server counted since `before`; the server counts it
/// just after the client sees the alert, so this waits briefly.
async fn changed_reason(admin: SocketAddr, before: &BTreeMap<String, f64>) -> Option<String> {
    for _ in 0..50 {
        let now = handshake_failures(admin).await;
        if let Some((reason, _)) = now
            .iter()
            .find(|(reason, value)| before.get(*reason).is_none_or(|b| *value > b))
        {
            return Some(reason.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn print_table(rows: &[Row]) {
    let width = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (c, q, r) = (
        width(|r| &r.caller, "caller"),
        width(|r| &r.request, "request"),
        width(|r| &r.result, "result"),
    );
    println!(
        " #  {:c$}  {:q$}  {:r$}  why",
        "caller", "request", "result"
    );
    println!(
        "--  {}  {}  {}  {}",
        "-".repeat(c),
        "-".repeat(q),
        "-".repeat(r),
        "-".repeat(30)
    );
    for row in rows {
        println!(
            "{:>2}  {:c$}  {:q$}  {:r$}  {}",
            row.index, row.caller, row.request, row.result, row.why
        );
    }
}

async fn stream_completion(caller: &Caller, addr: SocketAddr) -> Result<()> {
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"every event crosses the proxy as it is produced"}]}"#;
    let mut req = request(
        "POST",
        HOST,
        "/v1/chat/completions",
        Bytes::from_static(body.as_bytes()),
    );
    req.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    let started = Instant::now();
    let response = caller
        .call(addr, req)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "  {} {}",
        response.status().as_u16(),
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    );
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            for event in String::from_utf8_lossy(data)
                .split("\n\n")
                .filter(|e| !e.is_empty())
            {
                let shown = match serde_json::from_str::<serde_json::Value>(
                    event.trim_start_matches("data: "),
                ) {
                    Ok(chunk) => format!(
                        "delta {:?}",
                        chunk["choices"][0]["delta"]["content"]
                            .as_str()
                            .unwrap_or("")
                    ),
                    Err(_) => event.to_owned(),
                };
                println!("  +{:>5} ms  {shown}", started.elapsed().as_millis());
            }
        }
    }
    Ok(())
}

fn print_try_it(dir: &Path, addr: SocketAddr, admin: SocketAddr) {
    let d = dir.display();
    let port = addr.port();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nServing until Ctrl-C. Try it by hand (certificates are in {d}):\n"
    );
    let _ = writeln!(out, "  # allowed: the triage agent reads an order");
    let _ = writeln!(
        out,
        "  curl --cacert {d}/ca.pem --cert {d}/triage-agent.pem --key {d}/triage-agent-key.pem https://localhost:{port}/api/orders/17\n"
    );
    let _ = writeln!(
        out,
        "  # denied (403): the report agent has no permit for orders"
    );
    let _ = writeln!(
        out,
        "  curl --cacert {d}/ca.pem --cert {d}/report-agent.pem --key {d}/report-agent-key.pem https://localhost:{port}/api/orders/17\n"
    );
    let _ = writeln!(
        out,
        "  # refused in the TLS handshake: untrusted trust domain, then no certificate"
    );
    let _ = writeln!(
        out,
        "  curl --cacert {d}/ca.pem --cert {d}/partner.pem --key {d}/partner-key.pem https://localhost:{port}/api/orders/17"
    );
    let _ = writeln!(
        out,
        "  curl --cacert {d}/ca.pem https://localhost:{port}/api/orders/17\n"
    );
    let _ = writeln!(out, "  # a streamed completion, event by event");
    let _ = writeln!(
        out,
        "  curl -N --cacert {d}/ca.pem --cert {d}/triage-agent.pem --key {d}/triage-agent-key.pem https://localhost:{port}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hello from an agent\"}}]}}'\n"
    );
    let _ = writeln!(out, "  # metrics, and the hash-chained audit trail");
    let _ = writeln!(out, "  curl http://{admin}/metrics");
    let _ = writeln!(out, "  tail -f {d}/audit.jsonl\n");
    let _ = writeln!(
        out,
        "  # edit {d}/policies/*.cedar: valid changes apply within 5 s, invalid ones are refused and logged"
    );
    print!("{out}");
}
