//! User-token verification cost: a repeated token remembered by its connection (matched by
//! its bytes), served by the verified-token cache (hashed for it), and a token whose
//! signature must be checked (cache disabled), per signing algorithm; and, with a key set per
//! issuer, choosing the one a token goes to.

// Bench setup: a failed mint or load is a broken bench, reported at its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_core::SpiffeId;
use portcullis_identity::user_token::{
    JwksSource, TokenMemo, UserTokenSettings, UserTokenVerifier,
};
use portcullis_test_support::jwt::{SigningKey, claims, jwks};
use tokio::runtime::Runtime;

const ISS: &str = "https://idp.example.org";
const AUD: &str = "orders-api";
const CALLER: &str = "spiffe://prod.example.org/ns/agents/sa/planner";
const NOW: u64 = 1_800_000_000;

fn verifier(
    rt: &Runtime,
    dir: &std::path::Path,
    document: &str,
    cache: usize,
) -> UserTokenVerifier {
    let path = dir.join(format!("jwks-{cache}.json"));
    std::fs::write(&path, document).unwrap();
    let mut settings = UserTokenSettings::new(
        JwksSource::File(path),
        vec![ISS.to_owned()],
        vec![AUD.to_owned()],
        Duration::from_secs(3600),
    );
    settings.cache_capacity = cache;
    rt.block_on(UserTokenVerifier::new(settings)).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        SigningKey::es256("es"),
        SigningKey::rs256("rs"),
        SigningKey::eddsa("ed"),
    ];
    let document = jwks(&keys.iter().collect::<Vec<_>>());
    let cached = verifier(&rt, dir.path(), &document, 10_000);
    let uncached = verifier(&rt, dir.path(), &document, 0);
    let caller = SpiffeId::parse(CALLER).unwrap();

    let mut group = c.benchmark_group("user_token_verify");
    for key in &keys {
        let token = key.token(&claims(ISS, AUD, "alice", CALLER, NOW));
        rt.block_on(cached.verify_at(&token, &caller, NOW)).unwrap();
        let memo = TokenMemo::default();
        group.bench_function(format!("{}/remembered", key.alg()), |b| {
            b.iter(|| {
                rt.block_on(cached.verify_at_remembering(black_box(&token), &caller, NOW, &memo))
                    .unwrap()
            })
        });
        group.bench_function(format!("{}/cached", key.alg()), |b| {
            b.iter(|| {
                rt.block_on(cached.verify_at(black_box(&token), &caller, NOW))
                    .unwrap()
            })
        });
        group.bench_function(format!("{}/uncached", key.alg()), |b| {
            b.iter(|| {
                rt.block_on(uncached.verify_at(black_box(&token), &caller, NOW))
                    .unwrap()
            })
        });
    }
    group.finish();

    // With a key set per issuer (`user_token.issuer_keys`), which one verifies a token is
    // chosen by its claimed `iss`: from the connection's memory when it is the token the
    // connection last had verified, else read from its payload.
    let mut group = c.benchmark_group("user_token_issuer");
    let token = keys[0].token(&claims(ISS, AUD, "alice", CALLER, NOW));
    let memo = TokenMemo::default();
    rt.block_on(cached.verify_at_remembering(&token, &caller, NOW, &memo))
        .unwrap();
    group.bench_function("remembered", |b| {
        b.iter(|| memo.verified_by(black_box(&token)).unwrap())
    });
    group.bench_function("claimed", |b| {
        b.iter(|| portcullis_identity::user_token::unverified_issuer(black_box(&token)).unwrap())
    });
    group.finish();
    // The uncached verifier really checked a signature every time.
    assert!(uncached.signature_verifications() > 0);
    assert_eq!(cached.signature_verifications(), keys.len() as u64);
}

criterion_group!(benches, bench);
criterion_main!(benches);
