//! Acting with the user's authority: agent ∩ user decisions, and every way a user token is
//! refused (401, upstream untouched).

use std::time::Duration;

use portcullis_test_support::jwt::{self, SigningKey};
use serde_json::json;

use crate::harness::{AUDIENCE, Harness, ISSUER, TRIAGE, eventually, repo_root, sample};

const ASSISTANT: &str = "spiffe://prod.example.org/ns/orders/sa/orders-assistant";

async fn delegated() -> Harness {
    Harness::builder()
        .user_tokens()
        .policy_dir(repo_root().join("examples/delegated-agent/policies"))
        .start()
        .await
}

#[tokio::test]
async fn the_decision_matrix() {
    let h = delegated().await;
    let alice = h.token("alice", &["customers"], ASSISTANT);
    let lee = h.token("lee", &["support-leads"], ASSISTANT);
    let cases = [
        // (token, method, path, status, why)
        (
            Some(&alice),
            "GET",
            "/api/orders/17",
            200,
            "agent ∧ user allow",
        ),
        (
            Some(&lee),
            "POST",
            "/api/refunds",
            200,
            "agent ∧ user allow",
        ),
        (
            Some(&alice),
            "POST",
            "/api/refunds",
            403,
            "agent allows, user denies",
        ),
        (
            Some(&lee),
            "DELETE",
            "/api/orders/17",
            403,
            "user allows, agent denies",
        ),
        (
            None,
            "POST",
            "/api/refunds",
            403,
            "delegation required, no token",
        ),
        (
            None,
            "GET",
            "/api/orders/17",
            200,
            "autonomous read in the agent's scope",
        ),
    ];
    for (token, method, path, status, why) in cases {
        let (got, body) = h
            .call_as(ASSISTANT, token.map(String::as_str), method, path)
            .await;
        assert_eq!(got, status, "{why}: {method} {path}: {body:?}");
    }
    let records = h.audit(cases.len()).await;
    // Both questions' determining policies are recorded, with the user and the actor chain.
    let refund = &records[2];
    assert_eq!(refund["user"]["sub"], "lee");
    assert_eq!(refund["user"]["iss"], ISSUER);
    assert_eq!(refund["actor_chain"], json!([ASSISTANT]));
    assert_eq!(
        refund["policies"]["agent"],
        json!(["assistant-creates-refunds"])
    );
    assert_eq!(refund["policies"]["user"], json!(["leads-create-refunds"]));
    let autonomous = &records[5];
    assert_eq!(
        autonomous["policies"]["agent"],
        json!(["refunds-need-a-user"])
    );
    assert_eq!(autonomous["policies"]["user"], serde_json::Value::Null);

    // The upstream sees who the user is, never the token itself.
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers["x-portcullis-user"], "alice");
    assert!(
        seen.iter()
            .all(|r| !r.headers.contains_key("x-portcullis-user-token"))
    );
    assert!(!seen[2].headers.contains_key("x-portcullis-user"));
}

#[tokio::test]
async fn invalid_tokens_are_401_and_never_reach_the_upstream() {
    // Request heads may be larger than the default 64 KiB here, so that the 64 KiB token
    // reaches the token verifier's own size cap (8 KiB) instead of hyper's 431.
    let h = Harness::builder()
        .user_tokens()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .yaml("limits:\n  max_header_bytes: 262144\n")
        .start()
        .await;
    let idp = h.idp.as_ref().unwrap();
    let now = jwt::now();
    let good = || {
        let mut claims = jwt::claims(ISSUER, AUDIENCE, "alice", TRIAGE, now);
        claims["scope"] = "orders".into();
        claims
    };
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = good();
        edit(&mut claims);
        idp.token(&claims)
    };
    let with_text = |edit: &dyn Fn(&str) -> String| {
        let claims = edit(&good().to_string());
        assert_ne!(claims, good().to_string(), "the edit applies");
        idp.sign_text(&idp.header().to_string(), &claims)
    };
    // A listener the attacker's jku points at: it must never be contacted.
    let jku = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jku_url = format!("http://{}/jwks.json", jku.local_addr().unwrap());
    let attacker = SigningKey::es256("idp-1");
    let header_with = |extra: serde_json::Value| {
        let mut header = attacker.header();
        for (k, v) in extra.as_object().unwrap() {
            header[k] = v.clone();
        }
        attacker.sign(&header, &good())
    };
    let cases = vec![
        (
            "alg none",
            jwt::unsigned_token(&good()),
            "algorithm_not_allowed",
        ),
        (
            "HS256 keyed with the public key",
            jwt::hs256_token(
                idp.public_key_bytes(),
                &json!({"alg": "HS256", "typ": "JWT", "kid": "idp-1"}),
                &good(),
            ),
            "algorithm_not_allowed",
        ),
        (
            "signed by a key not in the JWKS",
            attacker.token(&good()),
            "bad_signature",
        ),
        (
            "all-zero ECDSA signature",
            jwt::token_with_signature(&idp.header(), &good(), &[0u8; 64]),
            "bad_signature",
        ),
        (
            "jwk header with the attacker's key",
            header_with(json!({"jwk": attacker.jwk()})),
            "untrusted_key_header",
        ),
        (
            "jku header pointing at the attacker",
            header_with(json!({"jku": jku_url})),
            "untrusted_key_header",
        ),
        (
            "expired",
            with(&|c| {
                c["iat"] = (now - 600).into();
                c["nbf"] = (now - 600).into();
                c["exp"] = (now - 300).into();
            }),
            "expired",
        ),
        (
            "nbf in the future",
            with(&|c| c["nbf"] = (now + 600).into()),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = "https://evil.example".into()),
            "wrong_issuer",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = "other-api".into()),
            "wrong_audience",
        ),
        (
            "lifetime above max_lifetime",
            with(&|c| c["exp"] = (now + 7200).into()),
            "lifetime_too_long",
        ),
        (
            "unknown crit",
            idp.sign(
                &{
                    let mut h = idp.header();
                    h["crit"] = json!(["x-custom"]);
                    h["x-custom"] = json!(1);
                    h
                },
                &good(),
            ),
            "unknown_crit",
        ),
        (
            "act.sub names another workload",
            with(&|c| {
                c["act"] = json!({"sub": "spiffe://prod.example.org/ns/billing/sa/report-agent"})
            }),
            "actor_mismatch",
        ),
        (
            "malformed act",
            with(&|c| c["act"] = json!("spiffe://prod.example.org/ns/support/sa/triage-agent")),
            "actor_malformed",
        ),
        (
            "no act with actor binding required",
            with(&|c| {
                c.as_object_mut().unwrap().remove("act");
            }),
            "actor_missing",
        ),
        // Signed by the trusted key, each naming a member twice: a parser that keeps the
        // first would read another user, issuer or actor from the same bytes.
        (
            "sub given twice",
            with_text(&|claims: &str| format!(r#"{{"sub":"admin",{}"#, &claims[1..])),
            "malformed",
        ),
        (
            "act.sub given twice",
            with_text(&|claims: &str| {
                claims.replace(
                    &format!(r#""act":{{"sub":"{TRIAGE}""#),
                    &format!(r#""act":{{"sub":"{ASSISTANT}","sub":"{TRIAGE}""#),
                )
            }),
            "malformed",
        ),
        (
            "kid given twice in the header",
            idp.sign_text(
                &format!(r#"{{"kid":"other",{}"#, &idp.header().to_string()[1..]),
                &good().to_string(),
            ),
            "malformed",
        ),
        (
            "a 64 KiB token",
            format!("{}.{}", "a".repeat(32 * 1024), "b".repeat(32 * 1024)),
            "too_large",
        ),
    ];
    for (name, token, reason) in &cases {
        let (status, body) = h.call_as(TRIAGE, Some(token), "GET", "/api/orders/1").await;
        assert_eq!(status, 401, "{name}: {body:?}");
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "invalid_user_token", "{name}");
        assert_eq!(error["error"]["reason"], *reason, "{name}");
    }
    assert!(
        h.upstream.requests().is_empty(),
        "a rejected token reached the upstream"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(50), jku.accept()).await;
    assert!(
        accepted.is_err(),
        "the proxy connected to the attacker's jku"
    );
    let metrics = h.metrics().await;
    let rejections: f64 = cases
        .iter()
        .map(|(_, _, reason)| *reason)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|reason| {
            sample(
                &metrics,
                &format!("portcullis_user_token_rejections_total{{reason=\"{reason}\"}}"),
            )
        })
        .sum();
    assert_eq!(rejections as usize, cases.len());
    assert_eq!(
        h.audit(cases.len()).await.len(),
        cases.len() + 1,
        "every rejection is audited"
    );

    // And the well-formed token passes, so the cases above failed for their own reasons.
    assert_eq!(
        h.call_as(TRIAGE, Some(&idp.token(&good())), "GET", "/api/orders/1")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_key_added_to_the_jwks_is_accepted_without_restart() {
    let h = Harness::builder()
        .user_tokens()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .start()
        .await;
    let rotated = SigningKey::es256("idp-2");
    let mut claims = jwt::claims(ISSUER, AUDIENCE, "alice", TRIAGE, jwt::now());
    claims["scope"] = "orders".into();
    let token = rotated.token(&claims);
    assert_eq!(h.call_as(TRIAGE, Some(&token), "GET", "/x").await.0, 401);
    crate::harness::write(
        h.dir.path(),
        "jwks.json",
        &jwt::jwks(&[h.idp.as_ref().unwrap(), &rotated]),
    );
    assert!(eventually(async || h.call_as(TRIAGE, Some(&token), "GET", "/x").await.0 == 200).await);
}

#[tokio::test]
async fn a_repeated_token_is_verified_once() {
    let h = delegated().await;
    let token = h.token("alice", &["customers"], ASSISTANT);
    for _ in 0..5 {
        assert_eq!(
            h.call_as(ASSISTANT, Some(&token), "GET", "/api/orders/17")
                .await
                .0,
            200
        );
    }
    assert_eq!(h.verifier.as_ref().unwrap().signature_verifications(), 1);
    // A different caller presenting the same token is still checked against its own
    // identity on every call, cache or not.
    assert_eq!(
        h.call_as(TRIAGE, Some(&token), "GET", "/api/orders/17")
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn tokens_changing_on_one_connection_each_act_as_their_own_user() {
    let h = Harness::builder()
        .user_tokens()
        .policies(r#"@id("all") permit (principal, action, resource);"#)
        .start()
        .await;
    let alice = h.token("alice", &[], TRIAGE);
    let bob = h.token("bob", &[], TRIAGE);
    // Alice's token with one character of its signature changed.
    let at = alice.len() - 10;
    let swapped = if &alice[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &alice[..at], &alice[at + 1..]);
    // One connection, requests pipelined: the proxy remembers each connection's last
    // token, so the repeats below are served from that memory.
    let tokens = [&alice, &bob, &alice, &alice, &forged, &alice].map(String::as_str);
    let (statuses, reply) = h.pipelined_tokens(TRIAGE, "/x/", &tokens).await;
    assert_eq!(
        statuses,
        ["200", "200", "200", "200", "401", "200"],
        "{reply}"
    );
    let records = h.audit(tokens.len()).await;
    let by_path = |i: usize| {
        records
            .iter()
            .find(|r| r["path"] == format!("/x/{i}"))
            .unwrap_or_else(|| panic!("no record of /x/{i}"))
    };
    for (i, user) in ["alice", "bob", "alice", "alice"].iter().enumerate() {
        assert_eq!(by_path(i)["user"]["sub"], *user, "request {i}");
    }
    assert_eq!(by_path(4)["reason"], "invalid_user_token");
    assert_eq!(by_path(4)["user"], serde_json::Value::Null);
    assert_eq!(by_path(5)["user"]["sub"], "alice");
    // Alice's, Bob's and the forged signature, once each: the repeats were not verified again.
    assert_eq!(h.verifier.as_ref().unwrap().signature_verifications(), 3);
}
