use super::*;

/// The shared SPIFFE ID vectors (`testdata/spiffe_ids.tsv`, copied from the project's shared
/// test data): every row must come out as its `valid_id` and `as_caller` columns say. All
/// failing rows are reported at once, by line number.
#[test]
fn every_spiffe_id_vector_parses_as_specified() {
    let table = include_str!("../tests/data/spiffe_ids.tsv");
    let mut rows = 0;
    let mut failures = Vec::new();
    for (index, line) in table.lines().enumerate() {
        if line.starts_with('#') || line.starts_with("input\t") {
            continue;
        }
        let columns: Vec<&str> = line.split('\t').collect();
        let [input, valid_id, as_caller, reason] = columns[..] else {
            panic!("line {}: expected 4 tab-separated columns", index + 1);
        };
        rows += 1;
        let parsed = SpiffeId::parse(input);
        let want_valid = valid_id == "yes";
        let want_caller = as_caller == "accept";
        let got_caller = parsed.as_ref().is_ok_and(SpiffeId::is_workload);
        if parsed.is_ok() != want_valid || got_caller != want_caller {
            failures.push(format!(
                "line {}: {input:.80?} parsed as {parsed:?}, want valid={want_valid} caller={want_caller} ({reason})",
                index + 1
            ));
        }
    }
    assert_eq!(rows, 106, "the vector table changed size");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn accessors_split_trust_domain_and_path() {
    let id = SpiffeId::parse("spiffe://prod.example.org/ns/orders/sa/triage-agent").unwrap();
    assert_eq!(id.trust_domain_name(), "prod.example.org");
    assert_eq!(id.path(), "/ns/orders/sa/triage-agent");
    assert_eq!(
        id.kubernetes_service_account(),
        Some(("orders", "triage-agent"))
    );
    assert!(id.is_workload());

    let id = SpiffeId::parse("spiffe://prod.example.org/ns/orders/sa/x/extra").unwrap();
    assert_eq!(id.kubernetes_service_account(), None);
    let root = SpiffeId::parse("spiffe://prod.example.org").unwrap();
    assert!(!root.is_workload());
    assert_eq!(root.path(), "");
}

#[test]
fn errors_name_the_rule() {
    assert_eq!(
        SpiffeId::parse("spiffe://a/b/"),
        Err(SpiffeIdError::TrailingSlash)
    );
    assert_eq!(
        SpiffeId::parse("spiffe://a//b"),
        Err(SpiffeIdError::EmptySegment)
    );
    assert_eq!(
        SpiffeId::parse("spiffe://a/../b"),
        Err(SpiffeIdError::DotSegment)
    );
    assert_eq!(
        SpiffeId::parse("spiffe://A/b"),
        Err(SpiffeIdError::BadTrustDomainChar)
    );
    assert_eq!(
        SpiffeId::parse("SPIFFE://a/b"),
        Err(SpiffeIdError::WrongScheme)
    );
    assert_eq!(
        TrustDomain::parse("prod.example.org").unwrap().as_str(),
        "prod.example.org"
    );
    assert_eq!(
        TrustDomain::parse("a:80"),
        Err(SpiffeIdError::BadTrustDomainChar)
    );
}
