use serde_json::json;

use super::*;

const CALLER: &str = "spiffe://prod.example.org/ns/agents/sa/planner";

fn rules() -> ClaimRules {
    ClaimRules {
        issuers: vec!["https://idp.example.org".to_owned()],
        audiences: vec!["orders-api".to_owned()],
        max_lifetime_secs: 3600,
        skew_secs: 30,
        groups_claim: "roles".to_owned(),
        require_actor_binding: true,
        max_actor_depth: 2,
    }
}

fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn base() -> Value {
    json!({
        "iss": "https://idp.example.org", "aud": "orders-api", "sub": "alice",
        "iat": 1000, "exp": 1300, "act": { "sub": CALLER },
    })
}

fn parse(patch: Value) -> Result<CheckedToken, TokenRejection> {
    let mut claims = base();
    for (k, v) in patch.as_object().unwrap() {
        claims[k] = v.clone();
    }
    parse_claims(&encode(&claims), &rules())
}

fn caller() -> SpiffeId {
    SpiffeId::parse(CALLER).unwrap()
}

#[test]
fn only_access_token_types_are_accepted() {
    let allowed = ["JWT".to_owned(), "at+jwt".to_owned()];
    for typ in [
        None,
        Some("JWT"),
        Some("jwt"),
        Some("at+jwt"),
        Some("application/at+JWT"),
    ] {
        assert!(type_allowed(typ, &allowed), "{typ:?}");
    }
    for typ in [
        Some("dpop+jwt"),
        Some("logout+jwt"),
        Some("secevent+jwt"),
        Some(""),
    ] {
        assert!(!type_allowed(typ, &allowed), "{typ:?}");
    }
    let all = SigningAlgorithm::ALL;
    let header =
        parse_header(&encode(&json!({ "alg": "ES256", "typ": "dpop+jwt" })), &all).unwrap();
    assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
    assert_eq!(
        parse_header(&encode(&json!({ "alg": "ES256", "typ": 1 })), &all)
            .unwrap_err()
            .reason(),
        "malformed"
    );
}

#[test]
fn header_checks_run_in_order() {
    let all = SigningAlgorithm::ALL;
    let ok = parse_header(&encode(&json!({ "alg": "ES256", "kid": "k" })), &all).unwrap();
    assert_eq!(ok.alg, SigningAlgorithm::Es256);
    assert_eq!(ok.kid.as_deref(), Some("k"));
    let reason = |header: Value| parse_header(&encode(&header), &all).unwrap_err().reason();
    assert_eq!(reason(json!({ "alg": "HS256" })), "algorithm_not_allowed");
    assert_eq!(
        reason(json!({ "alg": "none", "jku": "x" })),
        "algorithm_not_allowed"
    );
    assert_eq!(
        reason(json!({ "alg": "ES256", "x5c": [] })),
        "untrusted_key_header"
    );
    assert_eq!(
        reason(json!({ "alg": "ES256", "crit": ["x"] })),
        "unknown_crit"
    );
    assert_eq!(reason(json!({ "kid": "k" })), "malformed");
    assert_eq!(reason(json!("ES256")), "malformed");
    assert_eq!(
        parse_header("e30", &[SigningAlgorithm::Rs256])
            .unwrap_err()
            .reason(),
        "malformed"
    );
    assert_eq!(
        parse_header(
            &encode(&json!({ "alg": "ES256" })),
            &[SigningAlgorithm::Rs256]
        )
        .unwrap_err()
        .reason(),
        "algorithm_not_allowed"
    );
}

#[test]
fn numeric_dates_round_towards_shorter_validity() {
    let token = parse(json!({ "iat": 1000.2, "exp": 1299.9, "nbf": 999.5 })).unwrap();
    assert_eq!(token.issued_at, 1001);
    assert_eq!(token.user.expires_at, 1299);
    assert_eq!(token.not_before, Some(1000));
    assert_eq!(
        parse(json!({ "exp": 1e30 })).unwrap_err().reason(),
        "malformed"
    );
    assert_eq!(
        parse(json!({ "exp": -5 })).unwrap_err().reason(),
        "malformed"
    );
    assert_eq!(
        parse(json!({ "iat": "1000" })).unwrap_err().reason(),
        "malformed"
    );
}

#[test]
fn per_call_checks_use_the_given_time_and_skew() {
    let token = parse(json!({ "nbf": 1100 })).unwrap();
    let rules = rules();
    let at = |now| check_per_call(&token, &rules, &caller(), now).map(|c| c.subject.clone());
    assert_eq!(at(1069), Err(TokenRejection::NotYetValid));
    assert_eq!(at(1070), Ok("alice".to_owned()));
    assert_eq!(at(1329), Ok("alice".to_owned()));
    assert_eq!(at(1330), Err(TokenRejection::Expired));
    assert_eq!(at(u64::MAX), Err(TokenRejection::Expired));
}

#[test]
fn lifetime_is_exp_minus_iat() {
    assert!(parse(json!({ "iat": 1000, "exp": 4600 })).is_ok());
    assert_eq!(
        parse(json!({ "iat": 1000, "exp": 4601 })).unwrap_err(),
        TokenRejection::LifetimeTooLong
    );
    // Measured on the dates as given, not on the rounded ones (which read 3600 here).
    for (iat, exp) in [(1000.01, 4601.99), (1000.0, 4600.5), (1000.5, 4601.0)] {
        assert_eq!(
            parse(json!({ "iat": iat, "exp": exp })).unwrap_err(),
            TokenRejection::LifetimeTooLong,
            "iat {iat}, exp {exp}"
        );
    }
    for (iat, exp) in [(1000.5, 4600.5), (1000.9, 4600.1)] {
        assert!(
            parse(json!({ "iat": iat, "exp": exp })).is_ok(),
            "iat {iat}, exp {exp}"
        );
    }
    assert!(parse(json!({ "iat": 1000.25, "exp": 4600 })).is_ok());
    assert_eq!(
        parse(json!({ "iat": 1000.5, "exp": 1000.25 }))
            .unwrap_err()
            .reason(),
        "malformed"
    );
}

#[test]
fn scopes_come_from_scope_then_scp() {
    let scopes = |patch| parse(patch).unwrap().user.scopes.clone();
    assert_eq!(scopes(json!({ "scope": " a  b a " })), vec!["a", "b"]);
    assert_eq!(scopes(json!({ "scp": ["x", "y", "x"] })), vec!["x", "y"]);
    assert_eq!(scopes(json!({ "scp": "x y" })), vec!["x", "y"]);
    assert_eq!(scopes(json!({ "scope": "a", "scp": ["x"] })), vec!["a"]);
    assert!(scopes(json!({})).is_empty());
    assert_eq!(
        parse(json!({ "scp": [1] })).unwrap_err().reason(),
        "malformed"
    );
}

#[test]
fn groups_come_from_the_configured_claim() {
    let token = parse(json!({ "roles": ["admin"], "groups": "ignored" })).unwrap();
    assert_eq!(token.user.groups, vec!["admin"]);
    assert_eq!(
        parse(json!({ "roles": null })).unwrap_err().reason(),
        "malformed"
    );
}

#[test]
fn actor_chain_is_bounded_and_shaped() {
    let chain = parse(json!({ "act": { "sub": CALLER, "act": { "sub": "origin" } } }))
        .unwrap()
        .user
        .actor_chain
        .clone();
    assert_eq!(chain, vec![CALLER, "origin"]);
    let too_deep =
        json!({ "act": { "sub": CALLER, "act": { "sub": "b", "act": { "sub": "c" } } } });
    assert_eq!(
        parse(too_deep).unwrap_err(),
        TokenRejection::ActorChainTooDeep
    );
    assert_eq!(
        parse(json!({ "act": { "sub": "" } })).unwrap_err(),
        TokenRejection::ActorMalformed
    );
    assert_eq!(
        parse(json!({ "act": [{ "sub": CALLER }] })).unwrap_err(),
        TokenRejection::ActorMalformed
    );
}

#[test]
fn claims_payload_must_be_a_json_object() {
    assert_eq!(
        parse_claims(&URL_SAFE_NO_PAD.encode("not json"), &rules()).unwrap_err(),
        TokenRejection::Malformed("claims")
    );
    assert_eq!(
        parse_claims(&URL_SAFE_NO_PAD.encode("[1]"), &rules()).unwrap_err(),
        TokenRejection::Malformed("claims")
    );
}

#[test]
fn a_name_given_twice_at_any_depth_refuses_the_object() {
    let b64 = |raw: &str| URL_SAFE_NO_PAD.encode(raw);
    for raw in [
        r#"{"sub":"alice","sub":"admin"}"#,
        r#"{"sub":"alice","s\u0075b":"admin"}"#,
        r#"{"iss":"i","aud":"a","iss":"i"}"#,
        r#"{"act":{"sub":"spiffe://a/x","sub":"spiffe://a/y"}}"#,
        r#"{"act":{"act":{"sub":"a","sub":"b"}}}"#,
        r#"{"aud":[{"x":1,"x":2}]}"#,
        r#"{"a":{},"b":[],"a":null}"#,
    ] {
        assert_eq!(decode_object(&b64(raw)), None, "{raw}");
    }
    for raw in [
        r#"{"sub":"alice","Sub":"admin","sub ":"x"}"#,
        r#"{"act":{"sub":"a","act":{"sub":"b"}},"sub":"c"}"#,
        r#"{"a":{"x":1},"b":{"x":1},"c":[{"x":1},{"x":2}]}"#,
        r#"{}"#,
    ] {
        assert!(decode_object(&b64(raw)).is_some(), "{raw}");
    }
    // Through the checks: claims and header alike.
    let mut claims = base().to_string();
    claims.insert_str(1, r#""sub":"admin","#);
    assert_eq!(
        parse_claims(&b64(&claims), &rules()).unwrap_err(),
        TokenRejection::Malformed("claims")
    );
    assert_eq!(
        parse_header(
            &b64(r#"{"alg":"ES256","typ":"JWT","alg":"ES256"}"#),
            &[SigningAlgorithm::Es256]
        )
        .unwrap_err(),
        TokenRejection::Malformed("header")
    );
}

/// What `claimed_issuer` must agree with wherever the claims object parses: the map's
/// `iss`, when a string.
fn issuer_of_object(segment: &str) -> Option<Option<String>> {
    decode_object(segment).map(|mut object| match object.remove("iss") {
        Some(Value::String(issuer)) => Some(issuer),
        _ => None,
    })
}

#[test]
fn claimed_issuer_reads_iss_as_the_claims_object_does() {
    let b64 = |raw: &str| URL_SAFE_NO_PAD.encode(raw);
    for (raw, expected) in [
        (
            r#"{"iss":"https://idp.example.org","sub":"kim"}"#,
            Some("https://idp.example.org"),
        ),
        (
            r#"{"sub":"kim","aud":["a",{"iss":"x"}],"iss":"i"}"#,
            Some("i"),
        ),
        // Escapes in the name and in the value are resolved.
        (r#"{"i\u0073s":"a\"b\\c\u00e9"}"#, Some("a\"b\\cé")),
        // Repeated: the last one (the claims object refuses a name given twice, so the
        // claims check refuses such a token whichever key set it is verified with).
        (r#"{"iss":"first","iss":"last"}"#, Some("last")),
        (r#"{"iss":"first","iss":7}"#, None),
        (r#"{"iss":7,"iss":"last"}"#, Some("last")),
        (r#"{"iss":null}"#, None),
        (r#"{"iss":["i"]}"#, None),
        (r#"{"iss":{"iss":"i"}}"#, None),
        (r#"{"nested":{"iss":"i"}}"#, None),
        (r#"{"ISS":"i"}"#, None),
        (r#"{}"#, None),
        (r#"["iss","i"]"#, None),
        (r#""i""#, None),
        (r#"{"iss":"i""#, None),
        (r#"{"iss":"i"} x"#, None),
        (r#"{"iss":"i",}"#, None),
    ] {
        assert_eq!(claimed_issuer(&b64(raw)).as_deref(), expected, "{raw}");
        if let Some(of_object) = issuer_of_object(&b64(raw)) {
            assert_eq!(claimed_issuer(&b64(raw)), of_object, "{raw}");
        }
    }
    assert_eq!(claimed_issuer("not base64!"), None);
    assert_eq!(claimed_issuer(&format!("{}=", b64(r#"{"iss":"i"}"#))), None);
}

/// Random objects built from pieces that parse in interesting ways (repeated and escaped
/// names, nested objects, numbers at the edges, strings with escapes), some of them
/// damaged a byte at a time: wherever the claims object parses, `claimed_issuer` agrees
/// with its `iss`; where it does not (a repeated name among them), the claims check
/// refuses the token anyway.
#[test]
fn claimed_issuer_agrees_with_the_claims_object_on_random_objects() {
    const NAMES: &[&str] = &[
        r#""iss""#,
        r#""i\u0073s""#,
        r#""sub""#,
        r#""aud""#,
        r#""is""#,
        r#""iss ""#,
        r#""""#,
    ];
    const VALUES: &[&str] = &[
        r#""https://idp.example.org""#,
        r#""a\"b""#,
        r#""\u00e9\ud83d\ude00""#,
        r#""""#,
        "7",
        "-0.5e3",
        "1e400",
        "18446744073709551616",
        "null",
        "true",
        "[]",
        r#"["iss","x"]"#,
        r#"{"iss":"inner"}"#,
        "{}",
        r#""\ud800""#,
    ];
    let mut rng = fastrand::Rng::with_seed(17);
    let (mut parsed, mut agreed_on_some) = (0, 0);
    for _ in 0..20_000 {
        let members: Vec<String> = (0..rng.usize(0..6))
            .map(|_| {
                format!(
                    "{}:{}",
                    NAMES[rng.usize(..NAMES.len())],
                    VALUES[rng.usize(..VALUES.len())]
                )
            })
            .collect();
        let mut raw = format!("{{{}}}", members.join(",")).into_bytes();
        if rng.u8(..4) == 0 {
            let at = rng.usize(..raw.len());
            const DAMAGE: &[u8] = b"{}[]\",:\\ x0\x80";
            raw[at] = DAMAGE[rng.usize(..DAMAGE.len())];
        }
        let segment = URL_SAFE_NO_PAD.encode(&raw);
        if let Some(of_object) = issuer_of_object(&segment) {
            parsed += 1;
            agreed_on_some += usize::from(of_object.is_some());
            assert_eq!(
                claimed_issuer(&segment),
                of_object,
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
    }
    // The generator reaches both outcomes often.
    assert!(
        parsed > 5_000 && agreed_on_some > 500,
        "{parsed} {agreed_on_some}"
    );
}
