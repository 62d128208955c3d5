//! The decision path of one request (classify → build the Cedar request → evaluate both the
//! allow and the deny case) over policy sets of 10, 100, 1,000 and 10,000 policies, one per
//! agent (the shape a security team writing a policy per workload reaches).
//!
//! `allow` and `deny` use an agent prepared once, as a connection does
//! ([`PolicyEngine::prepare_agent`]), and ask the same question within one second, so the
//! Cedar context and the answer are the ones remembered from the last call; `allow_new_context`
//! asks it at a new second each time, so the context is built and Cedar evaluates (what a
//! repeated call pays once a second, and any call from a new address or for a new user, or
//! with protocol fields from a body); `allow_unprepared` builds the agent
//! per request, as [`PolicyEngine::evaluate`] does; `delegated` adds the user question.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portcullis_core::{Decision, SpiffeId, UserClaims};
use portcullis_policy::{AuthzInput, Mode, PolicyEngine, PreparedAgent, RequestInfo};
use portcullis_proxy::classify::classify;

/// The second every question but `allow_new_context`'s is asked at.
const NOW: i64 = 1_700_000_000;

fn decide(
    engine: &PolicyEngine,
    agent: &SpiffeId,
    prepared: Option<&PreparedAgent>,
    user: Option<&UserClaims>,
    path: &str,
    now: i64,
) -> Decision {
    let classified = classify(&[], "GET".into(), &path.into(), &"orders.internal".into()).unwrap();
    let input = AuthzInput {
        agent,
        user,
        action: classified.action,
        resource: &classified.resource,
        request: RequestInfo {
            method: "GET",
            path,
            host: "orders.internal",
            client_address: "10.0.0.7",
        },
        protocol_context: Vec::new(),
        now,
    };
    match prepared {
        Some(prepared) => engine.evaluate_prepared(prepared, &input).decision,
        None => engine.evaluate(&input).decision,
    }
}

fn decision_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    for n in [10usize, 100, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        portcullis_benches::write_policy_set(dir.path(), n);
        let engine = PolicyEngine::load(dir.path(), Mode::Enforce).unwrap();
        let team = n / 2;
        let agent =
            SpiffeId::parse(&format!("spiffe://prod.example.org/ns/team{team}/sa/agent")).unwrap();
        let prepared = engine.prepare_agent(&agent);
        let user = UserClaims {
            subject: "alice".to_owned(),
            issuer: "https://idp.example.org".to_owned(),
            scopes: vec!["orders.read".to_owned()],
            email: None,
            groups: vec!["support".to_owned()],
            actor_chain: vec![agent.as_str().to_owned()],
            expires_at: 0,
        };
        let allowed = format!("/api/team{team}/orders/17");
        let p = Some(&prepared);
        assert_eq!(
            decide(&engine, &agent, p, None, &allowed, NOW),
            Decision::Allow
        );
        assert_eq!(
            decide(&engine, &agent, None, None, &allowed, NOW),
            Decision::Allow
        );
        assert_eq!(
            decide(&engine, &agent, p, None, "/other", NOW),
            Decision::Deny
        );
        // The generated set has no user policies: the user question denies, after both
        // questions were asked.
        assert_eq!(
            decide(&engine, &agent, p, Some(&user), &allowed, NOW),
            Decision::Deny
        );
        group.bench_with_input(BenchmarkId::new("allow", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, p, None, &allowed, NOW));
        });
        group.bench_with_input(BenchmarkId::new("deny", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, p, None, "/other", NOW));
        });
        group.bench_with_input(BenchmarkId::new("allow_new_context", n), &n, |b, _| {
            let mut now = NOW;
            b.iter(|| {
                now += 1;
                decide(&engine, &agent, p, None, &allowed, now)
            });
        });
        group.bench_with_input(BenchmarkId::new("allow_unprepared", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, None, None, &allowed, NOW));
        });
        group.bench_with_input(BenchmarkId::new("delegated", n), &n, |b, _| {
            b.iter(|| decide(&engine, &agent, p, Some(&user), &allowed, NOW));
        });
    }
    group.finish();
}

criterion_group!(benches, decision_path);
criterion_main!(benches);
