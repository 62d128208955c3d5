//! The audit trail: one record per request whatever the outcome, hash-chained.

use sha2::{Digest, Sha256};

use crate::harness::{Harness, REPORT, TRIAGE};

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
