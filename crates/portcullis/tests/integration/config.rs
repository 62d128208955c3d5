//! The CLI's configuration contract: invalid configurations exit 64 listing every error;
//! every shipped example validates.

use std::path::Path;

use portcullis_test_support::pki::{Ca, LeafSpec};

use crate::harness::{portcullis, repo_root, write};

#[test]
fn an_invalid_config_exits_64_listing_every_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.yaml",
        "listen: 0.0.0.0\nadmin_listen: 127.0.0.1:9901\nupstream: ftp://x\ntls:\n  cert: nope.pem\n  trust_bundles: {}\npolicy:\n  dir: nowhere\n  mode: strict\nroutes:\n  - path: nope\nlimits:\n  idle_timeout: 5 minutes\nsurprise: true\n",
    );
    let config = dir.path().join("bad.yaml");
    for command in ["validate", "run"] {
        let (code, _, stderr) = portcullis(&[command, "--config", config.to_str().unwrap()]);
        assert_eq!(code, 64, "{command}: {stderr}");
        for path in [
            "listen:",
            "upstream:",
            "tls.cert:",
            "tls.key:",
            "tls.trust_bundles:",
            "policy.dir:",
            "policy.mode:",
            "routes[0]:",
            "limits.idle_timeout:",
            "surprise: unknown field",
        ] {
            assert!(
                stderr.contains(path),
                "{command}: {path} not reported:\n{stderr}"
            );
        }
    }
}

#[test]
fn invalid_policies_exit_64_with_file_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let example = copy_example(&repo_root().join("examples/quickstart"), dir.path());
    write(
        &dir.path().join("policies"),
        "broken.cedar",
        r#"@id("typo") permit (principal, action, resource) when { principal.namespce == "x" };"#,
    );
    let (code, _, stderr) = portcullis(&[
        "validate",
        "--config",
        example.join("config.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{stderr}");
    // `file:line:column`, then the policy.
    assert!(
        stderr.contains("policy.dir: broken.cedar:1:") && stderr.contains(": policy \"typo\""),
        "{stderr}"
    );
}

/// Copies an example (as `examples/<name>`, beside a copy of the shipped `policies/` that
/// examples may point at) and mints the certificates it names (examples ship no keys).
fn copy_example(example: &Path, into: &Path) -> std::path::PathBuf {
    let target = into.join("examples").join(example.file_name().unwrap());
    copy_dir(example, &target);
    if !into.join("policies").exists() {
        copy_dir(&repo_root().join("policies"), &into.join("policies"));
    }
    let certs = target.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = Ca::new("prod.example.org").unwrap();
    let server = ca
        .leaf(&LeafSpec::server(
            "spiffe://prod.example.org/ns/orders/sa/orders-api",
        ))
        .unwrap();
    write(&certs, "bundle.pem", &ca.cert_pem());
    write(&certs, "svid.pem", &server.cert_pem);
    write(&certs, "svid_key.pem", &server.key_pem);
    target
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn every_example_validates() {
    let dir = tempfile::tempdir().unwrap();
    let mut count = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let example = entry.unwrap().path();
        if !example.join("config.yaml").is_file() {
            continue;
        }
        assert!(
            example.join("README.md").is_file(),
            "{} has no README.md",
            example.display()
        );
        let copy = copy_example(&example, dir.path());
        let (code, stdout, stderr) = portcullis(&[
            "validate",
            "--config",
            copy.join("config.yaml").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{}: {stderr}", example.display());
        assert!(stdout.contains(": ok"), "{stdout}");
        count += 1;
    }
    assert!(count >= 1, "no examples found");
}

#[test]
fn every_example_and_the_chart_ship_the_shipped_schema() {
    let shipped = std::fs::read_to_string(repo_root().join("policies/schema.cedarschema")).unwrap();
    let mut copies = vec![repo_root().join("helm/portcullis/files/policies/schema.cedarschema")];
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let schema = entry.unwrap().path().join("policies/schema.cedarschema");
        if schema.is_file() {
            copies.push(schema);
        }
    }
    assert!(copies.len() >= 4, "{copies:?}");
    for copy in copies {
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap(),
            shipped,
            "{} differs from policies/schema.cedarschema",
            copy.display()
        );
    }
}
