use portcullis_test_support::jwt::{SigningKey, jwks_of};
use serde_json::{Value, json};

use super::*;

fn parse(keys: Vec<Value>) -> Result<KeySet, JwksError> {
    KeySet::parse(jwks_of(keys).as_bytes(), &SigningAlgorithm::ALL)
}

fn with(mut jwk: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        jwk[k] = v.clone();
    }
    jwk
}

#[test]
fn unusable_keys_are_skipped() {
    let key = SigningKey::es256("k");
    let good = key.jwk();
    let skipped = [
        with(good.clone(), json!({ "use": "enc" })),
        with(good.clone(), json!({ "key_ops": ["sign"] })),
        with(good.clone(), json!({ "d": "c2VjcmV0" })),
        with(good.clone(), json!({ "alg": "HS256" })),
        with(good.clone(), json!({ "alg": "ES384" })),
        with(good.clone(), json!({ "crv": "P-521" })),
        with(good.clone(), json!({ "x": "AAAA" })),
        // A point that is not on the curve.
        with(good.clone(), json!({ "y": jwt_b64(&[1u8; 32]) })),
        json!({ "kty": "oct", "k": "c2VjcmV0" }),
        json!({ "kty": "OKP", "crv": "X25519", "x": jwt_b64(&[9u8; 32]) }),
        json!({ "kty": "RSA", "n": jwt_b64(&[0xc5; 128]), "e": "AQAB" }),
        json!("not an object"),
    ];
    for jwk in skipped {
        assert!(
            matches!(parse(vec![jwk.clone()]), Err(JwksError::NoUsableKeys)),
            "{jwk}"
        );
    }
    let set = parse(vec![
        with(good.clone(), json!({ "use": "enc" })),
        with(good, json!({ "key_ops": ["verify"] })),
    ])
    .unwrap();
    assert_eq!(set.len(), 1);
}

#[test]
fn documents_without_keys_are_errors() {
    let allowed = SigningAlgorithm::ALL;
    assert!(matches!(
        KeySet::parse(b"{}", &allowed),
        Err(JwksError::NoKeysArray)
    ));
    assert!(matches!(
        KeySet::parse(b"[]", &allowed),
        Err(JwksError::Json(_))
    ));
    assert!(matches!(
        KeySet::parse(br#"{"keys":[]}"#, &allowed),
        Err(JwksError::NoUsableKeys)
    ));
}

#[test]
fn selection_by_kid_and_algorithm() {
    let es = SigningKey::es256("es");
    let rsa = SigningKey::rs256("rsa");
    let bare_rsa = SigningKey::rs256("bare");
    let set = parse(vec![
        es.jwk(),
        rsa.jwk(),
        with(bare_rsa.bare_jwk(), json!({ "kid": "bare" })),
    ])
    .unwrap();
    assert!(matches!(
        set.select(Some("es"), SigningAlgorithm::Es256),
        KeyLookup::Found(_)
    ));
    assert!(matches!(
        set.select(Some("es"), SigningAlgorithm::Rs256),
        KeyLookup::WrongAlgorithm
    ));
    assert!(matches!(
        set.select(Some("rsa"), SigningAlgorithm::Ps256),
        KeyLookup::WrongAlgorithm
    ));
    // A JWK without `alg` serves every allowed RSA algorithm.
    assert!(matches!(
        set.select(Some("bare"), SigningAlgorithm::Ps512),
        KeyLookup::Found(_)
    ));
    assert!(matches!(
        set.select(Some("nope"), SigningAlgorithm::Es256),
        KeyLookup::Unknown
    ));
    assert!(matches!(
        set.select(None, SigningAlgorithm::Es256),
        KeyLookup::Found(_)
    ));
    assert!(matches!(
        set.select(None, SigningAlgorithm::Rs256),
        KeyLookup::Ambiguous
    ));
    assert!(matches!(
        set.select(None, SigningAlgorithm::EdDsa),
        KeyLookup::Unknown
    ));
}

#[test]
fn allow_list_narrows_what_a_key_serves() {
    let rsa = SigningKey::rs256("rsa");
    let set = KeySet::parse(
        jwks_of(vec![rsa.bare_jwk()]).as_bytes(),
        &[SigningAlgorithm::Ps256],
    )
    .unwrap();
    assert!(matches!(
        set.select(None, SigningAlgorithm::Ps256),
        KeyLookup::Found(_)
    ));
    assert!(matches!(
        set.select(None, SigningAlgorithm::Rs256),
        KeyLookup::Unknown
    ));
}

fn jwt_b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
