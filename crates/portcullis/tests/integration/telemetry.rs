//! What SREs and security teams read: counters that match the traffic, a verifiable audit
//! trail that fails closed, the inventory of agents, and standing credentials flagged.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use portcullis_test_support::pki::Ca;

use crate::harness::{HOST, Harness, REPORT, TRIAGE, admin_get, eventually, portcullis};

/// `name{label="v",...}` → value, for every sample, via a Prometheus text-format parser.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", sample.metric, labels.join(",")), value))
        })
        .collect()
}

#[tokio::test]
async fn counters_match_a_scripted_mix_and_the_inventory_lists_exactly_the_callers() {
    let partner = Ca::new("partner.example.net").unwrap();
    let h = Harness::builder()
        .yaml("limits:\n  request_timeout: 300ms\n")
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(h.get(REPORT, "/api/orders/1").await.0, 403);
    }
    assert_eq!(h.get(TRIAGE, "/slow").await.0, 504);
    assert!(h.try_call(None).await.unwrap_err().is_tls());
    assert!(
        h.try_call(Some(
            &partner.svid("spiffe://partner.example.net/x").unwrap()
        ))
        .await
        .unwrap_err()
        .is_tls()
    );

    let want = [
        (
            r#"portcullis_decisions_total{action="GET",decision="allow"}"#,
            4.0,
        ),
        (
            r#"portcullis_decisions_total{action="GET",decision="deny"}"#,
            2.0,
        ),
        (
            r#"portcullis_request_rejections_total{reason="policy_denied"}"#,
            2.0,
        ),
        (
            r#"portcullis_upstream_errors_total{reason="upstream_timeout"}"#,
            1.0,
        ),
        (
            r#"portcullis_tls_handshake_failures_total{reason="no_certificate"}"#,
            1.0,
        ),
        (
            r#"portcullis_tls_handshake_failures_total{reason="unknown_trust_domain"}"#,
            1.0,
        ),
        (
            &format!("portcullis_agent_decisions_total{{agent={TRIAGE:?},decision=\"allow\"}}"),
            4.0,
        ),
        (
            &format!("portcullis_agent_decisions_total{{agent={REPORT:?},decision=\"deny\"}}"),
            2.0,
        ),
        ("portcullis_decision_duration_seconds_count{}", 6.0),
        ("portcullis_agents_seen{}", 2.0),
    ];
    let mut metrics = BTreeMap::new();
    let settled = eventually(async || {
        metrics = parse_metrics(&h.metrics().await);
        want.iter()
            .all(|(name, value)| metrics.get(*name) == Some(value))
    })
    .await;
    for (name, value) in &want {
        assert_eq!(metrics.get(*name), Some(value), "{name}");
    }
    assert!(settled);
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("process_resident_memory_bytes"))
    );
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("portcullis_request_duration_seconds_count"))
    );

    let (status, body) = admin_get(h.admin, "/inventory").await;
    assert_eq!(status, 200);
    let live: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let agents = live["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 2, "{live:#}");
    let report = agents.iter().find(|a| a["spiffe_id"] == REPORT).unwrap();
    assert_eq!(report["requests"], 2);
    assert_eq!(report["denied"], 2);
    assert_eq!(report["allowed"], 0);
    assert_eq!(report["called_without_user"], true);
    assert_eq!(report["distinct_users"], 0);
    let triage = agents.iter().find(|a| a["spiffe_id"] == TRIAGE).unwrap();
    assert_eq!(triage["allowed"], 4);
    assert_eq!(triage["actions"], serde_json::json!(["GET"]));
    assert_eq!(
        triage["resources"],
        serde_json::json!(["Route::\"/api/orders/1\"", "Route::\"/slow\""])
    );

    // The same view, offline, from the audit file.
    let audit = h.audit(6).await;
    assert_eq!(audit.len(), 7);
    let (code, stdout, stderr) =
        portcullis(&["inventory", "--audit", h.audit_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let offline: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(offline, live);
}

#[tokio::test]
async fn audit_verify_passes_then_names_the_line_of_an_edit_deletion_or_swap() {
    let h = Harness::start().await;
    for path in [
        "/api/orders/1",
        "/api/orders/2",
        "/api/orders/3",
        "/admin/x",
    ] {
        h.get(TRIAGE, path).await;
    }
    h.audit(4).await;
    let file = h.audit_path();
    let (code, stdout, _) = portcullis(&["audit", "verify", file.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("4 records"), "{stdout}");

    let original = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let tampered = |lines: Vec<String>| {
        let copy = h.dir.path().join("tampered.jsonl");
        std::fs::write(&copy, lines.join("\n") + "\n").unwrap();
        portcullis(&["audit", "verify", copy.to_str().unwrap()])
    };
    let owned = || lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let mut edited = owned();
    edited[2] = edited[2]
        .replace("\"deny\"", "\"allow\"")
        .replace("\"status\":200", "\"status\":201");
    let mut deleted = owned();
    deleted.remove(2);
    let mut swapped = owned();
    swapped.swap(2, 3);
    for (name, lines, line) in [
        ("edited", edited, 4),
        ("deleted", deleted, 3),
        ("swapped", swapped, 3),
    ] {
        let (code, _, stderr) = tampered(lines);
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("tampered.jsonl:{line}: chain broken")),
            "{name}: {stderr}"
        );
        assert!(
            stderr.contains("should be") && stderr.contains("found"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn rotation_continues_the_chain_across_files() {
    let h = Harness::builder()
        .audit_yaml("  sink: audit.jsonl\n  max_file_bytes: 2000\n  max_files: 20\n")
        .start()
        .await;
    for _ in 0..12 {
        assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
    }
    let dir = h.dir.path();
    assert!(
        eventually(async || {
            let text: String = (1..20)
                .map(|n| dir.join(format!("audit.jsonl.{n}")))
                .chain([dir.join("audit.jsonl")])
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .collect();
            text.lines().count() == 13
        })
        .await
    );
    let mut files: Vec<_> = (1..20)
        .rev()
        .map(|n| dir.join(format!("audit.jsonl.{n}")))
        .filter(|p| p.exists())
        .collect();
    assert!(
        files.len() >= 3,
        "expected several rotated files, got {files:?}"
    );
    files.push(dir.join("audit.jsonl"));
    let args: Vec<&str> = ["audit", "verify"]
        .into_iter()
        .chain(files.iter().map(|p| p.to_str().unwrap()))
        .collect();
    let (code, stdout, stderr) = portcullis(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("12 records"), "{stdout}");
}

#[tokio::test]
async fn a_failing_audit_sink_fails_requests_closed() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // The reader end: reads whatever arrives until told to hang up.
    let (hang_up, hung_up) = std::sync::mpsc::channel::<()>();
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut pipe = std::fs::File::open(reader_path).unwrap();
        let mut buffer = [0u8; 4096];
        let _ = pipe.read(&mut buffer);
        let _ = hung_up.recv();
    });
    let h = Harness::builder()
        .audit_yaml(&format!("  sink: {}\n", fifo.display()))
        .start()
        .await;
    assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
    hang_up.send(()).unwrap();
    reader.join().unwrap();
    // The next record hits a closed pipe; from then on nothing is served unaudited.
    let mut statuses = Vec::new();
    assert!(
        eventually(async || {
            let status = h.get(TRIAGE, "/api/orders/1").await.0;
            statuses.push(status);
            status == 503
        })
        .await,
        "{statuses:?}"
    );
    assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 503);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 503);
    let metrics = parse_metrics(&h.metrics().await);
    assert!(metrics["portcullis_audit_write_failures_total{}"] >= 1.0);
    let forwarded = h.upstream.requests().len();
    assert!(
        forwarded <= statuses.len(),
        "no 503 request reached the upstream"
    );
}

#[tokio::test]
async fn credentials_spelled_with_underscores_are_flagged_and_stripped_too() {
    // CGI-style servers (Django, WSGI bridges) read `x_api_key` as HTTP_X_API_KEY, the same
    // variable as `x-api-key`; likewise a user token under `x_user_jwt`.
    let send = async |h: &Harness, name: &'static str, value: &str| {
        let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
        req.headers_mut().insert(name, value.parse().unwrap());
        h.send(TRIAGE, HttpVersion::Http1, req).await.0
    };
    let h = Harness::builder()
        .user_tokens()
        .user_token_yaml("  header: x-user-jwt\n")
        .start()
        .await;
    assert_eq!(send(&h, "x_api_key", "sk-live-0123456789").await, 200);
    // Not verified, so the call is decided as autonomous, and the application must not get it.
    let token = h.token(
        "alice",
        &["support"],
        "spiffe://prod.example.org/ns/other/sa/thief",
    );
    assert_eq!(send(&h, "x_user_jwt", &token).await, 200);
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        let names: Vec<&str> = request.headers.keys().map(|n| n.as_str()).collect();
        assert!(
            !names
                .iter()
                .any(|n| n.replace('_', "-") == "x-api-key" || n.replace('_', "-") == "x-user-jwt"),
            "{names:?}"
        );
        assert!(!request.headers.contains_key("x-portcullis-user"));
    }
    let audit = h.audit(2).await;
    assert_eq!(
        audit[1]["standing_credentials"],
        serde_json::json!(["x-api-key"])
    );
    assert_eq!(audit[2]["user"], serde_json::Value::Null);
    let strict = Harness::builder()
        .yaml("reject_standing_credentials: true\n")
        .start()
        .await;
    assert_eq!(send(&strict, "x_api_key", "sk-live-0123456789").await, 401);
    assert!(strict.upstream.requests().is_empty());
}

#[tokio::test]
async fn standing_credentials_are_flagged_stripped_and_optionally_refused() {
    let send = async |h: &Harness| {
        let mut req = request("GET", HOST, "/api/orders/1", Bytes::new());
        req.headers_mut()
            .insert("x-api-key", "sk-live-0123456789".parse().unwrap());
        req.headers_mut().insert(
            "authorization",
            "Basic YWRtaW46aHVudGVyMg==".parse().unwrap(),
        );
        h.send(TRIAGE, HttpVersion::Http1, req).await.0
    };
    let h = Harness::start().await;
    assert_eq!(send(&h).await, 200);
    let seen = &h.upstream.requests()[0];
    assert!(!seen.headers.contains_key("x-api-key"));
    assert!(!seen.headers.contains_key("authorization"));
    let audit = h.audit(1).await;
    assert_eq!(
        audit[1]["standing_credentials"],
        serde_json::json!(["authorization", "x-api-key"])
    );
    let metrics = parse_metrics(&h.metrics().await);
    assert_eq!(
        metrics[r#"portcullis_standing_credentials_total{header="x-api-key"}"#],
        1.0
    );

    let strict = Harness::builder()
        .yaml("reject_standing_credentials: true\n")
        .start()
        .await;
    assert_eq!(send(&strict).await, 401);
    assert!(strict.upstream.requests().is_empty());
    assert_eq!(strict.get(TRIAGE, "/api/orders/1").await.0, 200);
}

#[tokio::test]
async fn the_inventory_lists_no_resource_longer_than_its_bound() {
    use crate::protocols::{post, tool_call};
    let h = crate::protocols::builder().start().await;
    // A tool name is the caller's text, and denied calls are observed too.
    let long = "x".repeat(portcullis_proxy::inventory::MAX_RESOURCE_BYTES + 1);
    for n in 0..3 {
        let name = format!("{long}{n}");
        assert_eq!(
            post(
                &h,
                TRIAGE,
                "/mcp",
                &tool_call(n, &name, serde_json::json!({}))
            )
            .await
            .0,
            403
        );
    }
    assert_eq!(
        post(
            &h,
            TRIAGE,
            "/mcp",
            &tool_call(9, "search_tickets", serde_json::json!({}))
        )
        .await
        .0,
        200
    );
    h.audit(4).await;
    let (status, body) = admin_get(h.admin, "/inventory").await;
    assert_eq!(status, 200);
    let inventory: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let agent = &inventory["agents"][0];
    assert_eq!(
        agent["resources"],
        serde_json::json!([r#"Tool::"search_tickets""#]),
        "{agent}"
    );
    assert_eq!(agent["resources_not_listed"], 3);
    assert_eq!(agent["requests"], 4);
}
