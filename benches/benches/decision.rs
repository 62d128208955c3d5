//! The decision path of one request (classify → build the Cedar request → evaluate both the
//! allow and the deny case) over policy sets of 10, 100 and 1000 policies.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portcullis_core::{Decision, SpiffeId};
use portcullis_policy::{AuthzInput, Mode, PolicyEngine, RequestInfo};
use portcullis_proxy::classify::classify;

fn decide(engine: &PolicyEngine, agent: &SpiffeId, path: &str) -> Decision {
    let classified = classify(&[], "GET", path, "orders.internal").unwrap();
    engine
        .evaluate(&AuthzInput {
            agent,
            user: None,
            action: classified.action,
            resource: &classified.resource,
            request: RequestInfo {
                method: "GET",
                path,
                host: "orders.internal",
                client_address: "10.0.0.7",
            },
            protocol_context: Vec::new(),
            now: 1_700_000_000,
        })
        .decision
}

fn decision_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    for n in [10usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap();
        portcullis_benches::write_policy_set(dir.path(), n);
        let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
        let team = n / 2;
        let agent =
            SpiffeId::parse(&format!("spiffe://prod.example.org/ns/team{team}/sa/agent")).unwrap();
        let allowed = format!("/api/team{team}/orders/17");
        assert_eq!(decide(&engine, &agent, &allowed), Decision::Allow);
        assert_eq!(decide(&engine, &agent, "/other"), Decision::Deny);
        group.bench_with_input(BenchmarkId::new("allow", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, &allowed));
        });
        group.bench_with_input(BenchmarkId::new("deny", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, "/other"));
        });
    }
    group.finish();
}

criterion_group!(benches, decision_path);
criterion_main!(benches);
