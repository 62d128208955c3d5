//! The audit trail: one record per request whatever the outcome, hash-chained.

use std::time::Duration;

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use sha2::{Digest, Sha256};

use crate::harness::{HOST, Harness, REPORT, TRIAGE};

#[tokio::test]
async fn every_request_is_recorded_once_in_an_unbroken_chain() {
    let h = Harness::start().await;
    assert_eq!(h.get(TRIAGE, "/api/orders/17").await.0, 200);
    assert_eq!(h.get(REPORT, "/api/orders/17").await.0, 403);
    assert_eq!(h.get(TRIAGE, "/admin/users").await.0, 403);
    assert_eq!(h.get(TRIAGE, "/a/../admin").await.0, 400);

    let records = h.audit(4).await;
    assert_eq!(records.len(), 5, "{records:#?}");
    assert_eq!(records[0]["type"], "start");

    let allowed = &records[1];
    assert_eq!(allowed["agent"], TRIAGE);
    assert_eq!(allowed["action"], "GET");
    assert_eq!(allowed["resource"]["type"], "Route");
    assert_eq!(allowed["resource"]["id"], "/api/orders/17");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["policies"]["agent"][0], "support-agents-read");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["completed"], true);
    assert_eq!(allowed["mode"], "enforce");
    assert_eq!(allowed["policy_hash"].as_str().unwrap().len(), 64);
    assert!(allowed["decision_us"].is_u64());

    assert_eq!(records[2]["decision"], "deny");
    assert!(
        records[2]["policies"]["agent"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(records[3]["policies"]["agent"][0], "no-agent-admin");
    assert_eq!(records[4]["reason"], "ambiguous_path");
    assert_eq!(records[4]["decision"], serde_json::Value::Null);

    // Each line names the SHA-256 of the line before it.
    let text = std::fs::read_to_string(h.audit_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let prev: String = hex(&Sha256::digest(pair[0].as_bytes()));
        let record: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
        assert_eq!(record["prev_hash"], prev);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Audit capacity is not concurrency capacity: 1,100 requests waiting on a slow upstream
/// (more than the audit queue holds) do not make another caller's request wait for, or fail
/// with, `audit_unavailable`.
#[tokio::test]
async fn slow_requests_hold_no_audit_capacity() {
    const SLOW: usize = 1_100;
    // The in-flight caps (their own test is in `abuse`) are raised so that only audit
    // capacity is in question here.
    let h = Harness::builder()
        .yaml("limits:\n  max_inflight_per_agent: 2000\n  max_inflight: 4000\n")
        .start()
        .await;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
    let mut connections = Vec::new();
    let mut in_flight = Vec::new();
    // 100 streams per connection: the default `limits.max_h2_streams`.
    for _ in 0..SLOW / 100 {
        let connection = caller.connect(h.addr).await.unwrap();
        let streams = connection.streams().unwrap();
        for _ in 0..100 {
            let mut streams = streams.clone();
            in_flight.push(tokio::spawn(async move {
                streams
                    .send(request("GET", HOST, "/slow", Bytes::new()))
                    .await
            }));
        }
        connections.push(connection);
    }
    // Every slow request was admitted, decided and forwarded: the upstream holds them all.
    for _ in 0..6_000 {
        if h.upstream.requests().len() >= SLOW {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.upstream.requests().len(), SLOW);

    let (status, body) = h.get(TRIAGE, "/api/orders/1").await;
    assert_eq!(status, 200, "{body:?}");
    let records = h.audit(1).await;
    assert_eq!(records[1]["path"], "/api/orders/1");
    assert_eq!(records[1]["status"], 200);
    for request in in_flight {
        request.abort();
    }
}
