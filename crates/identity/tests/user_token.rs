//! User-token verification end to end: real keys minted in process, real signatures, JWKS
//! from real files and from a real HTTP server on 127.0.0.1.

// Tests: a panic is a failed test with a clear location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use portcullis_core::SpiffeId;
use portcullis_identity::user_token::{
    JwksSource, SigningAlgorithm, TokenMemo, TokenRejection, UserTokenSettings, UserTokenVerifier,
    parse_algorithm,
};
use portcullis_test_support::jwt::{
    self, JwksServer, SigningKey, claims, hs256_token, jwks, jwks_of, token_with_signature,
    unsigned_token,
};
use serde_json::{Value, json};

const ISS: &str = "https://idp.example.org";
const AUD: &str = "orders-api";
const CALLER: &str = "spiffe://prod.example.org/ns/agents/sa/planner";
const OTHER: &str = "spiffe://prod.example.org/ns/agents/sa/intruder";
/// A fixed "now" for deterministic time checks (2027-01-15).
const NOW: u64 = 1_800_000_000;

fn caller() -> SpiffeId {
    SpiffeId::parse(CALLER).unwrap()
}

fn good_claims() -> Value {
    claims(ISS, AUD, "alice", CALLER, NOW)
}

/// One ES256 key shared by the tests that need no rotation.
fn es_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::es256("es-1"))
}

fn rsa_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::rs256("rsa-1"))
}

fn settings(source: JwksSource) -> UserTokenSettings {
    UserTokenSettings::new(
        source,
        vec![ISS.to_owned()],
        vec![AUD.to_owned()],
        Duration::from_secs(3600),
    )
}

struct FileFixture {
    _dir: tempfile::TempDir,
    verifier: UserTokenVerifier,
}

async fn file_verifier(
    document: String,
    tweak: impl FnOnce(&mut UserTokenSettings),
) -> FileFixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, document).unwrap();
    let mut settings = settings(JwksSource::File(path));
    tweak(&mut settings);
    let verifier = UserTokenVerifier::new(settings).await.unwrap();
    FileFixture {
        _dir: dir,
        verifier,
    }
}

async fn default_verifier() -> FileFixture {
    file_verifier(jwks(&[es_key(), rsa_key()]), |_| {}).await
}

async fn reason(verifier: &UserTokenVerifier, token: &str) -> &'static str {
    match verifier.verify_at(token, &caller(), NOW).await {
        Ok(claims) => panic!("token accepted: {claims:?}"),
        Err(rejection) => rejection.reason(),
    }
}

fn with(mut claims: Value, patch: Value) -> Value {
    for (name, value) in patch.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

#[tokio::test]
async fn valid_token_is_accepted_with_claims_mapped() {
    let f = default_verifier().await;
    let token = es_key().token(&with(
        good_claims(),
        json!({ "groups": ["staff", "eu", "staff"], "act": { "sub": CALLER, "act": { "sub": "spiffe://prod.example.org/ns/agents/sa/router" } } }),
    ));
    let claims = f.verifier.verify_at(&token, &caller(), NOW).await.unwrap();
    assert_eq!(claims.subject, "alice");
    assert_eq!(claims.issuer, ISS);
    assert_eq!(claims.scopes, vec!["orders:read", "orders:write"]);
    assert_eq!(claims.email.as_deref(), Some("alice@example.org"));
    assert_eq!(claims.groups, vec!["staff", "eu"]);
    assert_eq!(
        claims.actor_chain,
        vec![CALLER, "spiffe://prod.example.org/ns/agents/sa/router"]
    );
    assert_eq!(claims.expires_at, NOW + 300);
}

#[tokio::test]
async fn rsa_eddsa_and_es384_tokens_are_accepted() {
    let ed = SigningKey::eddsa("ed-1");
    let es384 = SigningKey::es384("es384-1");
    let ps = SigningKey::ps256("ps-1");
    let f = file_verifier(jwks(&[rsa_key(), &ed, &es384, &ps]), |_| {}).await;
    for key in [rsa_key(), &ed, &es384, &ps] {
        let claims = f
            .verifier
            .verify_at(&key.token(&good_claims()), &caller(), NOW)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", key.alg()));
        assert_eq!(claims.subject, "alice");
    }
}

#[tokio::test]
async fn scp_array_and_aud_array_are_accepted() {
    let f = default_verifier().await;
    let token = es_key().token(&with(
        good_claims(),
        json!({ "scope": null, "scp": ["a", "b"], "aud": ["other-api", AUD] }),
    ));
    let claims = f.verifier.verify_at(&token, &caller(), NOW).await.unwrap();
    assert_eq!(claims.scopes, vec!["a", "b"]);
}

#[tokio::test]
async fn token_without_kid_uses_the_single_matching_key() {
    let key = SigningKey::es256("only");
    let f = file_verifier(jwks_of(vec![key.bare_jwk(), rsa_key().jwk()]), |_| {}).await;
    let token = key.sign(&json!({ "alg": "ES256", "typ": "JWT" }), &good_claims());
    assert!(f.verifier.verify_at(&token, &caller(), NOW).await.is_ok());
}

#[tokio::test]
async fn token_without_kid_is_refused_when_several_keys_fit() {
    let (a, b) = (SigningKey::es256("a"), SigningKey::es256("b"));
    let f = file_verifier(jwks(&[&a, &b]), |_| {}).await;
    let token = a.sign(&json!({ "alg": "ES256" }), &good_claims());
    assert_eq!(reason(&f.verifier, &token).await, "unknown_key");
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let f = default_verifier().await;
    assert_eq!(
        reason(&f.verifier, &unsigned_token(&good_claims())).await,
        "algorithm_not_allowed"
    );
    // Same with a kid naming a real key, and with other spellings.
    for alg in ["none", "None", "NONE"] {
        let token = format!(
            "{}.",
            jwt::signing_input(&json!({ "alg": alg, "kid": "es-1" }), &good_claims())
        );
        assert_eq!(reason(&f.verifier, &token).await, "algorithm_not_allowed");
    }
    assert_eq!(f.verifier.signature_verifications(), 0);
}

#[tokio::test]
async fn hs256_keyed_with_the_public_key_is_rejected() {
    let f = default_verifier().await;
    for key in [es_key(), rsa_key()] {
        let header = json!({ "alg": "HS256", "typ": "JWT", "kid": key.kid() });
        let token = hs256_token(key.public_key_bytes(), &header, &good_claims());
        assert_eq!(reason(&f.verifier, &token).await, "algorithm_not_allowed");
        // The JWK JSON itself as the secret, the other classic variant.
        let token = hs256_token(key.jwk().to_string().as_bytes(), &header, &good_claims());
        assert_eq!(reason(&f.verifier, &token).await, "algorithm_not_allowed");
    }
    assert_eq!(f.verifier.signature_verifications(), 0);
}

#[tokio::test]
async fn algorithm_must_match_the_key_type() {
    let f = default_verifier().await;
    // An ES256 header naming the RSA key.
    let header = json!({ "alg": "ES256", "kid": rsa_key().kid() });
    assert_eq!(
        reason(&f.verifier, &es_key().sign(&header, &good_claims())).await,
        "algorithm_not_allowed"
    );
    // RS256 is allowed, but the JWK declares alg RS256, so PS256 with it is refused.
    let header = json!({ "alg": "PS256", "kid": rsa_key().kid() });
    assert_eq!(
        reason(&f.verifier, &rsa_key().sign(&header, &good_claims())).await,
        "algorithm_not_allowed"
    );
    // An algorithm outside a narrowed allow-list.
    let f = file_verifier(jwks(&[es_key(), rsa_key()]), |s| {
        s.algorithms = vec![SigningAlgorithm::Rs256]
    })
    .await;
    assert_eq!(
        reason(&f.verifier, &es_key().token(&good_claims())).await,
        "algorithm_not_allowed"
    );
}

#[tokio::test]
async fn signature_from_a_key_not_in_the_jwks_is_rejected() {
    let f = default_verifier().await;
    // An attacker key claiming the trusted kid.
    let attacker = SigningKey::es256("es-1");
    assert_eq!(
        reason(&f.verifier, &attacker.token(&good_claims())).await,
        "bad_signature"
    );
    // An attacker key under its own kid.
    let attacker = SigningKey::es256("attacker");
    assert_eq!(
        reason(&f.verifier, &attacker.token(&good_claims())).await,
        "unknown_key"
    );
}

#[tokio::test]
async fn all_zero_ecdsa_signature_is_rejected() {
    let f = default_verifier().await;
    let token = token_with_signature(&es_key().header(), &good_claims(), &[0u8; 64]);
    assert_eq!(reason(&f.verifier, &token).await, "bad_signature");
    // r = s = 0 at the wrong length too, and an empty signature.
    let token = token_with_signature(&es_key().header(), &good_claims(), &[0u8; 72]);
    assert_eq!(reason(&f.verifier, &token).await, "bad_signature");
    let token = token_with_signature(&es_key().header(), &good_claims(), &[]);
    assert_eq!(reason(&f.verifier, &token).await, "bad_signature");
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let f = default_verifier().await;
    let token = es_key().token(&good_claims());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = jwt::b64url(
        with(good_claims(), json!({ "sub": "root" }))
            .to_string()
            .as_bytes(),
    );
    let token = format!("{}.{}.{}", parts[0], forged, parts[2]);
    assert_eq!(reason(&f.verifier, &token).await, "bad_signature");
}

#[tokio::test]
async fn embedded_or_referenced_keys_are_never_trusted_nor_fetched() {
    let f = default_verifier().await;
    let attacker = SigningKey::es256("es-1");
    // A listener standing in for the attacker's key server.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/keys", listener.local_addr().unwrap());

    let headers = [
        json!({ "alg": "ES256", "kid": "es-1", "jwk": attacker.jwk() }),
        json!({ "alg": "ES256", "kid": "es-1", "jku": url }),
        json!({ "alg": "ES256", "kid": "es-1", "x5u": url }),
        json!({ "alg": "ES256", "kid": "es-1", "x5c": ["MIIB"] }),
        json!({ "alg": "ES256", "jku": url }),
    ];
    for header in headers {
        let token = attacker.sign(&header, &good_claims());
        assert_eq!(
            reason(&f.verifier, &token).await,
            "untrusted_key_header",
            "{header}"
        );
    }
    // verify() has returned, so any connection it made would already be queued.
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the verifier connected to the token's key url: {other:?}"),
    }
    assert_eq!(f.verifier.signature_verifications(), 0);
}

#[tokio::test]
async fn jku_is_not_fetched_even_from_a_url_jwks_verifier() {
    let server = JwksServer::start(jwks(&[es_key()])).await;
    let verifier = UserTokenVerifier::new(settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    }))
    .await
    .unwrap();
    assert_eq!(server.hits(), 1);
    let attacker_server = JwksServer::start(jwks(&[&SigningKey::es256("x")])).await;
    let attacker = SigningKey::es256("x");
    let token = attacker.sign(
        &json!({ "alg": "ES256", "kid": "x", "jku": attacker_server.url() }),
        &good_claims(),
    );
    assert_eq!(reason(&verifier, &token).await, "untrusted_key_header");
    assert_eq!(attacker_server.hits(), 0);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn unknown_crit_is_rejected() {
    let f = default_verifier().await;
    for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
        let header = json!({ "alg": "ES256", "kid": "es-1", "crit": crit, "exp": 1 });
        let token = es_key().sign(&header, &good_claims());
        assert_eq!(reason(&f.verifier, &token).await, "unknown_crit");
    }
}

#[tokio::test]
async fn time_claims_are_enforced() {
    let f = default_verifier().await;
    let cases = [
        (
            json!({ "exp": NOW - 31, "iat": NOW - 300, "nbf": null }),
            "expired",
        ),
        (
            json!({ "exp": NOW - 30, "iat": NOW - 300, "nbf": null }),
            "expired",
        ),
        (json!({ "nbf": NOW + 31 }), "not_yet_valid"),
        (
            json!({ "iat": NOW + 31, "nbf": null, "exp": NOW + 600 }),
            "issued_in_future",
        ),
        (
            json!({ "iat": NOW, "exp": NOW + 3601 }),
            "lifetime_too_long",
        ),
        (json!({ "exp": null }), "missing_claim"),
        (json!({ "iat": null }), "missing_claim"),
        (json!({ "exp": "soon" }), "malformed"),
        (json!({ "nbf": -1 }), "malformed"),
        (json!({ "exp": NOW - 10, "iat": NOW }), "malformed"),
    ];
    for (patch, expected) in cases {
        let token = es_key().token(&with(good_claims(), patch.clone()));
        assert_eq!(reason(&f.verifier, &token).await, expected, "{patch}");
    }
    // Within the skew: accepted.
    let accepted = [
        json!({ "exp": NOW - 29, "iat": NOW - 300 }),
        json!({ "nbf": NOW + 30 }),
        json!({ "iat": NOW + 30, "nbf": null, "exp": NOW + 600 }),
        json!({ "iat": NOW, "exp": NOW + 3600 }),
        json!({ "exp": NOW as f64 + 100.5 }),
    ];
    for patch in accepted {
        let token = es_key().token(&with(good_claims(), patch.clone()));
        assert!(
            f.verifier.verify_at(&token, &caller(), NOW).await.is_ok(),
            "{patch}"
        );
    }
}

#[tokio::test]
async fn issuer_and_audience_are_enforced() {
    let f = default_verifier().await;
    let cases = [
        (json!({ "iss": "https://evil.example.org" }), "wrong_issuer"),
        (json!({ "iss": "https://IDP.example.org" }), "wrong_issuer"),
        (json!({ "iss": null }), "missing_claim"),
        (json!({ "aud": "billing-api" }), "wrong_audience"),
        (json!({ "aud": ["billing-api"] }), "wrong_audience"),
        (json!({ "aud": [] }), "wrong_audience"),
        (json!({ "aud": null }), "missing_claim"),
        (json!({ "aud": [AUD, 7] }), "malformed"),
        (json!({ "sub": null }), "missing_claim"),
        (json!({ "sub": 42 }), "malformed"),
        (json!({ "groups": "staff" }), "malformed"),
        (json!({ "groups": [1] }), "malformed"),
        (json!({ "email": false }), "malformed"),
        (json!({ "scope": ["a"] }), "malformed"),
    ];
    for (patch, expected) in cases {
        let token = es_key().token(&with(good_claims(), patch.clone()));
        assert_eq!(reason(&f.verifier, &token).await, expected, "{patch}");
    }
}

#[tokio::test]
async fn actor_binding_is_enforced() {
    let f = default_verifier().await;
    let deep = |depth: usize| {
        let mut act = json!({ "sub": "spiffe://prod.example.org/ns/agents/sa/origin" });
        for _ in 1..depth {
            act = json!({ "sub": "spiffe://prod.example.org/ns/agents/sa/hop", "act": act });
        }
        act["sub"] = json!(CALLER);
        act
    };
    let cases = [
        (json!({ "act": { "sub": OTHER } }), "actor_mismatch"),
        (json!({ "act": CALLER }), "actor_malformed"),
        (json!({ "act": {} }), "actor_malformed"),
        (json!({ "act": { "sub": 7 } }), "actor_malformed"),
        (
            json!({ "act": { "sub": CALLER, "act": "x" } }),
            "actor_malformed",
        ),
        (json!({ "act": null }), "actor_missing"),
        (json!({ "act": deep(5) }), "actor_chain_too_deep"),
        (json!({ "may_act": { "sub": OTHER } }), "may_act_denied"),
        (json!({ "may_act": CALLER }), "actor_malformed"),
        (
            json!({ "may_act": { "client_id": CALLER } }),
            "actor_malformed",
        ),
    ];
    for (patch, expected) in cases {
        let token = es_key().token(&with(good_claims(), patch.clone()));
        assert_eq!(reason(&f.verifier, &token).await, expected, "{patch}");
    }
    // At the cap: accepted, chain returned outermost first.
    let token = es_key().token(&with(good_claims(), json!({ "act": deep(4) })));
    let claims = f.verifier.verify_at(&token, &caller(), NOW).await.unwrap();
    assert_eq!(claims.actor_chain.len(), 4);
    assert_eq!(claims.actor_chain[0], CALLER);
    assert_eq!(
        claims.actor_chain[3],
        "spiffe://prod.example.org/ns/agents/sa/origin"
    );
    // may_act naming the caller: accepted.
    let token = es_key().token(&with(
        good_claims(),
        json!({ "may_act": { "sub": CALLER } }),
    ));
    assert!(f.verifier.verify_at(&token, &caller(), NOW).await.is_ok());
}

#[tokio::test]
async fn act_is_optional_when_binding_is_not_required() {
    let f = file_verifier(jwks(&[es_key()]), |s| s.require_actor_binding = false).await;
    let token = es_key().token(&with(good_claims(), json!({ "act": null })));
    let claims = f.verifier.verify_at(&token, &caller(), NOW).await.unwrap();
    assert!(claims.actor_chain.is_empty());
    // But an act that is present is still bound to the caller.
    let token = es_key().token(&with(good_claims(), json!({ "act": { "sub": OTHER } })));
    assert_eq!(reason(&f.verifier, &token).await, "actor_mismatch");
}

#[tokio::test]
async fn oversized_token_is_rejected_before_parsing() {
    let f = default_verifier().await;
    let padding = "x".repeat(64 * 1024);
    let token = es_key().token(&with(good_claims(), json!({ "padding": padding })));
    assert!(token.len() > 64 * 1024);
    assert_eq!(reason(&f.verifier, &token).await, "too_large");
    // Not even valid base64: still too_large, since nothing is decoded.
    assert_eq!(
        reason(&f.verifier, &"!".repeat(64 * 1024)).await,
        "too_large"
    );
    assert_eq!(f.verifier.signature_verifications(), 0);
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let f = default_verifier().await;
    let good = es_key().token(&good_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "abc".to_owned(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.x.y"),
        format!("{}.{}.{}!", parts[0], parts[1], parts[2]),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", jwt::b64url(b"[1]"), parts[1], parts[2]),
        format!("{}.{}.{}", jwt::b64url(b"{\"alg\":7}"), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            jwt::b64url(b"{\"alg\":\"ES256\",\"kid\":1}"),
            parts[1],
            parts[2]
        ),
    ];
    for token in cases {
        assert_eq!(reason(&f.verifier, &token).await, "malformed", "{token}");
    }
}

#[tokio::test]
async fn repeated_token_is_verified_once_and_still_checked_per_call() {
    let f = default_verifier().await;
    let token = es_key().token(&good_claims());
    for _ in 0..10 {
        f.verifier.verify_at(&token, &caller(), NOW).await.unwrap();
    }
    assert_eq!(f.verifier.signature_verifications(), 1);
    // Served from the cache, yet the caller and the clock are checked again.
    let other = SpiffeId::parse(OTHER).unwrap();
    assert_eq!(
        f.verifier
            .verify_at(&token, &other, NOW)
            .await
            .unwrap_err()
            .reason(),
        "actor_mismatch"
    );
    assert_eq!(
        f.verifier
            .verify_at(&token, &caller(), NOW + 400)
            .await
            .unwrap_err(),
        TokenRejection::Expired
    );
    assert_eq!(
        f.verifier
            .verify_at(&token, &caller(), NOW - 100)
            .await
            .unwrap_err(),
        TokenRejection::NotYetValid
    );
    assert_eq!(f.verifier.signature_verifications(), 1);
    // A different token is verified.
    let token2 = es_key().token(&with(good_claims(), json!({ "sub": "bob" })));
    f.verifier.verify_at(&token2, &caller(), NOW).await.unwrap();
    assert_eq!(f.verifier.signature_verifications(), 2);
}

#[tokio::test]
async fn token_a_connection_re_sends_is_matched_by_its_bytes_and_still_checked_per_call() {
    let f = default_verifier().await;
    let memo = TokenMemo::default();
    let alice = es_key().token(&good_claims());
    let bob = es_key().token(&with(good_claims(), json!({ "sub": "bob" })));
    let verify = async |token: &str, caller: &SpiffeId, now: u64| {
        f.verifier
            .verify_at_remembering(token, caller, now, &memo)
            .await
    };
    for _ in 0..10 {
        assert_eq!(
            verify(&alice, &caller(), NOW).await.unwrap().subject,
            "alice"
        );
    }
    assert_eq!(f.verifier.signature_verifications(), 1);
    // Remembered, yet the caller and the clock are checked again on every call.
    let other = SpiffeId::parse(OTHER).unwrap();
    assert_eq!(
        verify(&alice, &other, NOW).await.unwrap_err().reason(),
        "actor_mismatch"
    );
    assert_eq!(
        verify(&alice, &caller(), NOW + 400).await.unwrap_err(),
        TokenRejection::Expired
    );
    // Another token on the same connection is its own: verified, with its own claims, and
    // it replaces the one remembered; the first one comes back from the shared cache.
    assert_eq!(verify(&bob, &caller(), NOW).await.unwrap().subject, "bob");
    assert_eq!(f.verifier.signature_verifications(), 2);
    assert_eq!(
        verify(&alice, &caller(), NOW).await.unwrap().subject,
        "alice"
    );
    assert_eq!(verify(&bob, &caller(), NOW).await.unwrap().subject, "bob");
    assert_eq!(f.verifier.signature_verifications(), 2);
    // A token differing from the remembered one in one character of its signature is not
    // taken for it.
    let at = bob.len() - 10;
    let swapped = if &bob[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &bob[..at], &bob[at + 1..]);
    assert_eq!(
        verify(&forged, &caller(), NOW).await.unwrap_err().reason(),
        "bad_signature"
    );
    // What one verifier remembered is not another's, even for the same token.
    let g = default_verifier().await;
    g.verifier
        .verify_at_remembering(&bob, &caller(), NOW, &memo)
        .await
        .unwrap();
    assert_eq!(g.verifier.signature_verifications(), 1);
}

#[tokio::test]
async fn without_a_cache_a_remembered_token_is_verified_on_every_call() {
    let f = file_verifier(jwks(&[es_key()]), |s| s.cache_capacity = 0).await;
    let memo = TokenMemo::default();
    let token = es_key().token(&good_claims());
    for _ in 0..3 {
        f.verifier
            .verify_at_remembering(&token, &caller(), NOW, &memo)
            .await
            .unwrap();
    }
    assert_eq!(f.verifier.signature_verifications(), 3);
}

#[tokio::test]
async fn verify_uses_the_system_clock() {
    let f = default_verifier().await;
    let now = jwt::now();
    let token = es_key().token(&claims(ISS, AUD, "alice", CALLER, now));
    assert!(f.verifier.verify(&token, &caller()).await.is_ok());
    let token = es_key().token(&claims(ISS, AUD, "alice", CALLER, now - 1_000_000));
    assert_eq!(
        f.verifier.verify(&token, &caller()).await.unwrap_err(),
        TokenRejection::Expired
    );
}

/// Writes `document` as a new Kubernetes ConfigMap revision: a fresh timestamped directory,
/// then an atomic rename of the `..data` symlink onto it, as the kubelet does.
fn configmap_publish(dir: &Path, revision: u32, document: &str) {
    let target = dir.join(format!("..rev{revision}"));
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("jwks.json"), document).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..rev{revision}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn configmap_dir(document: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    configmap_publish(dir.path(), 1, document);
    let path = dir.path().join("jwks.json");
    std::os::unix::fs::symlink("..data/jwks.json", &path).unwrap();
    (dir, path)
}

/// Polls `check` until it holds; panics after a generous deadline. Never asserts timing.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not observed");
}

#[tokio::test]
async fn key_added_to_the_jwks_file_is_accepted_without_restart() {
    let old = SigningKey::es256("old");
    let new = SigningKey::es256("new");
    let (_dir, path) = configmap_dir(&jwks(&[&old]));
    let mut settings = settings(JwksSource::File(path));
    settings.jwks_refresh_interval = Duration::from_millis(50);
    let verifier = UserTokenVerifier::new(settings).await.unwrap();
    let refresh = verifier.spawn_refresh();

    let new_token = new.token(&good_claims());
    assert_eq!(reason(&verifier, &new_token).await, "unknown_key");

    // A broken revision: the last good set stays, the failure is counted.
    configmap_publish(_dir.path(), 2, "{ not json");
    eventually("bad jwks counted", async || {
        verifier.jwks_refreshes().1 == 1
    })
    .await;
    assert!(
        verifier
            .verify_at(&old.token(&good_claims()), &caller(), NOW)
            .await
            .is_ok()
    );

    configmap_publish(_dir.path(), 3, &jwks(&[&old, &new]));
    eventually("new key accepted", async || {
        verifier.verify_at(&new_token, &caller(), NOW).await.is_ok()
    })
    .await;
    assert_eq!(verifier.jwks_refreshes(), (1, 1));

    // Removing a key revokes it, even for a token already verified and cached, or
    // remembered by a connection.
    let old_token = old.token(&good_claims());
    let memo = TokenMemo::default();
    verifier
        .verify_at_remembering(&old_token, &caller(), NOW, &memo)
        .await
        .unwrap();
    configmap_publish(_dir.path(), 4, &jwks(&[&new]));
    eventually("old key removed", async || {
        verifier
            .verify_at(&old_token, &caller(), NOW)
            .await
            .is_err()
    })
    .await;
    assert_eq!(reason(&verifier, &old_token).await, "unknown_key");
    assert_eq!(
        verifier
            .verify_at_remembering(&old_token, &caller(), NOW, &memo)
            .await
            .unwrap_err()
            .reason(),
        "unknown_key"
    );
    refresh.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refetches_the_url_once_for_many_concurrent_requests() {
    let a = SigningKey::es256("a");
    let b = SigningKey::es256("b");
    let server = JwksServer::start(jwks(&[&a])).await;
    let verifier = UserTokenVerifier::new(settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    }))
    .await
    .unwrap();
    assert_eq!(server.hits(), 1);

    // The issuer rotates in key b; tokens signed with it arrive all at once.
    server.set_jwks(jwks(&[&a, &b]));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let verifier = verifier.clone();
        let token = b.token(&with(good_claims(), json!({ "sub": format!("user-{i}") })));
        tasks.push(tokio::spawn(async move {
            verifier.verify_at(&token, &caller(), NOW).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(server.hits(), 2);

    // Unknown kids within the rate-limit window fetch nothing more.
    let c = SigningKey::es256("c");
    for i in 0..10 {
        let token = c.token(&with(good_claims(), json!({ "sub": format!("x-{i}") })));
        assert_eq!(reason(&verifier, &token).await, "unknown_key");
    }
    assert_eq!(server.hits(), 2);
    assert_eq!(verifier.jwks_stats().fetches, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kids_share_one_fetch_even_when_the_key_stays_unknown() {
    let a = SigningKey::es256("a");
    let server = JwksServer::start(jwks(&[&a])).await;
    let verifier = UserTokenVerifier::new(settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    }))
    .await
    .unwrap();
    let stranger = SigningKey::es256("stranger");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let verifier = verifier.clone();
        let token = stranger.token(&with(good_claims(), json!({ "sub": format!("u{i}") })));
        tasks.push(tokio::spawn(async move {
            verifier.verify_at(&token, &caller(), NOW).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap_err(), TokenRejection::UnknownKey);
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn url_refresh_picks_up_rotation_and_unreachable_jwks_denies() {
    let a = SigningKey::es256("a");
    let b = SigningKey::es256("b");
    let server = JwksServer::start(jwks(&[&a])).await;
    let mut settings = settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    });
    settings.jwks_min_refetch_interval = Duration::ZERO;
    let verifier = UserTokenVerifier::new(settings).await.unwrap();

    server.set_jwks(jwks(&[&b]));
    verifier.refresh_now().await;
    assert_eq!(verifier.jwks_refreshes(), (1, 0));
    assert!(
        verifier
            .verify_at(&b.token(&good_claims()), &caller(), NOW)
            .await
            .is_ok()
    );

    // The issuer goes away: known keys keep working, an unknown kid cannot be resolved.
    drop(server);
    tokio::task::yield_now().await;
    assert!(
        verifier
            .verify_at(&b.token(&good_claims()), &caller(), NOW)
            .await
            .is_ok()
    );
    let c = SigningKey::es256("c");
    eventually("jwks_unavailable", async || {
        verifier
            .verify_at(&c.token(&good_claims()), &caller(), NOW)
            .await
            .is_err_and(|e| e == TokenRejection::JwksUnavailable)
    })
    .await;
    assert!(verifier.jwks_refreshes().1 >= 1);
}

#[tokio::test]
async fn bad_jwks_sources_fail_at_start() {
    let server = JwksServer::start(jwks_of(vec![json!({ "kty": "oct", "k": "c2VjcmV0" })])).await;
    // Only a symmetric key: nothing usable.
    assert!(
        UserTokenVerifier::new(settings(JwksSource::Url {
            url: server.url(),
            ca_file: None
        }))
        .await
        .is_err()
    );
    // Plain http to a non-loopback host.
    assert!(
        UserTokenVerifier::new(settings(JwksSource::Url {
            url: "http://idp.example.org/jwks.json".to_owned(),
            ca_file: None
        }))
        .await
        .is_err()
    );
    // A missing file.
    assert!(
        UserTokenVerifier::new(settings(JwksSource::File("/nonexistent/jwks.json".into())))
            .await
            .is_err()
    );
    // An oversized file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, " ".repeat(300 * 1024)).unwrap();
    assert!(
        UserTokenVerifier::new(settings(JwksSource::File(path)))
            .await
            .is_err()
    );
}

#[test]
fn algorithm_names_parse_strictly() {
    assert_eq!(parse_algorithm("ES256"), Ok(SigningAlgorithm::Es256));
    assert_eq!(parse_algorithm("EdDSA"), Ok(SigningAlgorithm::EdDsa));
    assert!(parse_algorithm("none").is_err());
    assert!(parse_algorithm("HS256").is_err());
    assert!(parse_algorithm("es256").is_err());
    assert!(parse_algorithm("ES512").is_err());
    for alg in SigningAlgorithm::ALL {
        assert_eq!(parse_algorithm(alg.name()), Ok(alg));
    }
}

#[test]
fn rejection_reasons_are_a_closed_snake_case_set() {
    assert_eq!(TokenRejection::REASONS.len(), 20);
    for reason in TokenRejection::REASONS {
        assert!(reason.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    }
    assert_eq!(TokenRejection::Malformed("x").reason(), "malformed");
}

#[tokio::test]
async fn https_jwks_url_is_trusted_through_ca_file_only() {
    let (server, ca_pem) = JwksServer::start_tls(jwks(&[es_key()])).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();

    let verifier = UserTokenVerifier::new(settings(JwksSource::Url {
        url: server.url(),
        ca_file: Some(ca_file),
    }))
    .await
    .unwrap();
    assert!(server.url().starts_with("https://"));
    assert_eq!(server.hits(), 1);
    assert!(
        verifier
            .verify_at(&es_key().token(&good_claims()), &caller(), NOW)
            .await
            .is_ok()
    );

    // The public roots do not know this CA: no JWKS, no verifier.
    let error = UserTokenVerifier::new(settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    }))
    .await
    .unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn jwks_url_fetch_is_bounded_in_size_and_time() {
    // A body over the cap.
    let big = jwks_of(vec![json!({ "kty": "EC", "pad": "x".repeat(4096) })]);
    let server = JwksServer::start(big).await;
    let mut too_small = settings(JwksSource::Url {
        url: server.url(),
        ca_file: None,
    });
    too_small.max_jwks_bytes = 1024;
    let error = UserTokenVerifier::new(too_small).await.unwrap_err();
    assert!(error.to_string().contains("larger than 1024"), "{error}");

    // A server that accepts the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut settings = settings(JwksSource::Url {
        url: format!("http://{}/jwks.json", silent.local_addr().unwrap()),
        ca_file: None,
    });
    settings.jwks_fetch_timeout = Duration::from_millis(200);
    let error = UserTokenVerifier::new(settings).await.unwrap_err();
    assert!(error.to_string().contains("timed out"), "{error}");
    drop(silent);
}

#[tokio::test]
async fn approval_grants_stop_verifying_once_their_key_set_is_stale() {
    let fixture = file_verifier(jwks(&[es_key()]), |settings| {
        settings.jwks_refresh_interval = Duration::from_millis(50);
        settings.jwks_max_stale = Duration::from_millis(300);
    })
    .await;
    let _refresh = fixture.verifier.spawn_refresh();
    let grant = es_key().token(&with(
        good_claims(),
        json!({ "digest": "sha256:00", "jti": "grant-1" }),
    ));
    assert!(fixture.verifier.verify_grant_at(&grant, NOW).await.is_ok());
    // The key set can no longer be read: once past jwks_max_stale, its keys sign nothing.
    std::fs::remove_file(fixture._dir.path().join("jwks.json")).unwrap();
    let mut last = Ok(());
    for _ in 0..400 {
        last = fixture
            .verifier
            .verify_grant_at(&grant, NOW)
            .await
            .map(drop);
        if last.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last, Err(TokenRejection::JwksStale));
}
