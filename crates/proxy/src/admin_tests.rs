#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::audit::{AuditLog, AuditSink};
use portcullis_core::TrustDomain;
use portcullis_identity::bundle::parse_bundle;
use portcullis_identity::{IdentitySnapshot, ServerIdentity, TrustBundles};
use portcullis_test_support::pki::{Ca, LeafSpec};

/// A serving identity that can serve, as the proxy would have it in force.
fn identity() -> watch::Receiver<Arc<LiveIdentity>> {
    let ca = Ca::new("prod.example.org").unwrap();
    let server = ca
        .leaf(&LeafSpec::server("spiffe://prod.example.org/ns/a/sa/b"))
        .unwrap();
    let mut bundles = TrustBundles::new();
    bundles.insert(
        TrustDomain::parse("prod.example.org").unwrap(),
        parse_bundle(
            ca.cert_pem().as_bytes(),
            std::path::Path::new("ca.pem"),
            std::time::SystemTime::now(),
        )
        .unwrap(),
    );
    let live = LiveIdentity::build(IdentitySnapshot {
        identity: ServerIdentity {
            cert_chain: server.cert_chain(),
            key: server.key_der(),
        },
        bundles,
    })
    .unwrap();
    // The sender goes: the receiver keeps this value.
    watch::channel(Arc::new(live)).1
}

fn state(dir: &std::path::Path) -> AdminState {
    let metrics = Metrics::new();
    let sink = AuditSink::File {
        path: dir.join("audit.jsonl"),
        rotate_bytes: None,
        keep: 1,
    };
    let (audit, _writer) = AuditLog::start(&sink, metrics.clone()).unwrap();
    AdminState {
        metrics,
        ready: AtomicBool::new(true),
        draining: AtomicBool::new(false),
        audit,
        inventory: Arc::new(crate::inventory::Inventory::new()),
        identity: identity(),
        user_tokens: Vec::new(),
    }
}

fn status(state: &AdminState, peer: &str, path: &str) -> StatusCode {
    route(state, peer.parse().unwrap(), &Method::GET, path).status()
}

#[test]
fn inventory_answers_loopback_peers_only() {
    let dir = std::env::temp_dir().join(format!("portcullis-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = state(&dir);
    for peer in [
        "127.0.0.1:40000",
        "127.3.2.1:40000",
        "[::1]:40000",
        "[::ffff:127.0.0.1]:40000",
    ] {
        assert_eq!(status(&state, peer, "/inventory"), StatusCode::OK, "{peer}");
    }
    // Another pod, the node (kubelet), or an IPv4 pod address on a dual-stack socket.
    for peer in [
        "10.244.1.7:40000",
        "192.168.0.3:40000",
        "[fd00::7]:40000",
        "[::ffff:10.0.0.5]:40000",
    ] {
        assert_eq!(
            status(&state, peer, "/inventory"),
            StatusCode::NOT_FOUND,
            "{peer}"
        );
        // Probes and scraping keep working from the pod network.
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(status(&state, peer, path), StatusCode::OK, "{peer} {path}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
