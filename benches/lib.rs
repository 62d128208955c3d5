//! Shared set-up for the benches: generated policy sets of a given size, and the load
//! benchmark's fixture certificates read back from their PEM files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "bench set-up fails loudly"
)]

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The fixtures' CA (`ca.pem` in `dir`, as `portcullis-bench fixtures` writes it) as the one
/// root of trust.
pub fn fixture_roots(dir: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    roots
}

/// A fixture identity's certificate chain and key: `{name}.pem` and `{name}-key.pem` in `dir`.
pub fn fixture_identity(
    dir: &Path,
    name: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}-key.pem"))).unwrap();
    (chain, key)
}

/// Writes the shipped schema plus `n` generated policies (one permit per team, a forbid
/// every tenth) into `dir`, as a security team's growing policy set would look.
pub fn write_policy_set(dir: &Path, n: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::copy(
        root.join("schema.cedarschema"),
        dir.join("schema.cedarschema"),
    )
    .unwrap();
    let mut policies = String::new();
    for i in 0..n {
        if i % 10 == 9 {
            policies.push_str(&format!(
                "@id(\"forbid-{i}\") forbid (principal == Agent::\"spiffe://prod.example.org/ns/team{i}/sa/agent\", action in Action::\"write\", resource) when {{ resource.path like \"/api/team{i}/admin*\" }};\n"
            ));
        } else {
            policies.push_str(&format!(
                "@id(\"permit-{i}\") permit (principal == Agent::\"spiffe://prod.example.org/ns/team{i}/sa/agent\", action in Action::\"read\", resource) when {{ resource.path like \"/api/team{i}/*\" && context.request.host == \"orders.internal\" }};\n"
            ));
        }
    }
    std::fs::write(dir.join("generated.cedar"), policies).unwrap();
}

/// A proxy on loopback in front of a recording upstream, started through the same config
/// loader as `portcullis run`, with the shipped policies; and a CA to mint callers.
#[allow(missing_debug_implementations, reason = "bench fixture")]
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub ca: portcullis_test_support::pki::Ca,
    pub upstream: portcullis_test_support::upstream::Upstream,
    pub proxy: portcullis_proxy::Running,
}

pub async fn start_proxy() -> Setup {
    use portcullis_test_support::pki::{Ca, LeafSpec};
    use portcullis_test_support::upstream::{SsePacing, Upstream};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("prod.example.org").unwrap();
    let server = ca
        .leaf(&LeafSpec::server(
            "spiffe://prod.example.org/ns/orders/sa/orders-api",
        ))
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &server.key_pem).unwrap();
    let upstream = Upstream::start(SsePacing::Delay(std::time::Duration::ZERO))
        .await
        .unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let config = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nupstream: http://{}\n\
         tls:\n  cert: server.pem\n  key: server-key.pem\n  trust_bundles:\n    prod.example.org: ca.pem\n\
         policy:\n  dir: {}\naudit:\n  sink: audit.jsonl\n",
        upstream.addr,
        policies.display()
    );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let config = portcullis::config::Config::load(&dir.path().join("config.yaml")).unwrap();
    let proxy = portcullis_proxy::start(config.into_options().await.unwrap())
        .await
        .unwrap();
    Setup {
        _dir: dir,
        ca,
        upstream,
        proxy,
    }
}
