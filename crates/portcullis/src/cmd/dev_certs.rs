//! `portcullis dev-certs`: a local CA, a serving SVID and agent SVIDs, so the examples run
//! without openssl incantations. For trying things out only: the CA key is thrown away, the
//! keys are written unencrypted, and production SVIDs come from SPIRE or csi-driver-spiffe.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use portcullis_core::{SpiffeId, TrustDomain};
use portcullis_test_support::pki::{Ca, LeafSpec};
use time::{Duration, OffsetDateTime};

#[derive(Debug, clap::Args)]
pub struct DevCertsArgs {
    /// The SPIFFE trust domain of the CA and every SVID (e.g. prod.example.org).
    #[arg(long)]
    pub trust_domain: String,
    /// Directory to write into (created if missing): bundle.pem, svid.pem, svid_key.pem and
    /// `<agent>.pem` / `<agent>_key.pem` per agent.
    #[arg(long)]
    pub out: PathBuf,
    /// SPIFFE ID path of the sidecar's own serving SVID.
    #[arg(long, default_value = "/ns/default/sa/portcullis")]
    pub server_path: String,
    /// An agent SVID to mint: a path such as `ns/support/sa/triage-agent` (the file is named
    /// after its last segment) or a full `spiffe://` ID in the trust domain. Repeatable.
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// Days the SVIDs stay valid (the CA lasts a day longer).
    #[arg(long, default_value_t = 30)]
    pub days: i64,
}

pub fn run(args: DevCertsArgs) -> ExitCode {
    match mint(&args) {
        Ok(written) => {
            println!(
                "dev-certs: wrote {} files to {} (for local use only, never for production)",
                written.len(),
                args.out.display()
            );
            for file in written {
                println!("  {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(crate::EXIT_CONFIG)
        }
    }
}

fn mint(args: &DevCertsArgs) -> Result<Vec<PathBuf>> {
    let domain = TrustDomain::parse(&args.trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain {:?}: {e}", args.trust_domain))?;
    if !(1..=3650).contains(&args.days) {
        bail!("--days must be between 1 and 3650");
    }
    let server_id = spiffe_id(&domain, &args.server_path)?;
    let agents = args
        .agents
        .iter()
        .map(|agent| Ok((file_stem(agent)?, spiffe_id(&domain, agent)?)))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let now = OffsetDateTime::now_utc();
    let not_after = now + Duration::days(args.days);
    let ca = Ca::with_validity(
        domain.as_str(),
        now - Duration::minutes(5),
        not_after + Duration::days(1),
    )?;
    let mut written = vec![write(&args.out, "bundle.pem", &ca.cert_pem(), false)?];
    let leaf = |spec: LeafSpec| LeafSpec {
        not_before: now - Duration::minutes(5),
        not_after,
        ..spec
    };
    // DNS and IP SANs beside the SPIFFE ID, so curl and other hostname-verifying clients can
    // reach the sidecar on this machine too.
    let server = ca.leaf(&leaf(LeafSpec::server(server_id.as_str())))?;
    written.push(write(&args.out, "svid.pem", &server.cert_pem, false)?);
    written.push(write(&args.out, "svid_key.pem", &server.key_pem, true)?);
    for (stem, id) in agents {
        let agent = ca.leaf(&leaf(LeafSpec::workload(id.as_str())))?;
        written.push(write(
            &args.out,
            &format!("{stem}.pem"),
            &agent.cert_pem,
            false,
        )?);
        written.push(write(
            &args.out,
            &format!("{stem}_key.pem"),
            &agent.key_pem,
            true,
        )?);
    }
    Ok(written)
}

/// `ns/x/sa/y`, `/ns/x/sa/y` or `spiffe://<domain>/ns/x/sa/y` as a workload ID of `domain`.
fn spiffe_id(domain: &TrustDomain, agent: &str) -> Result<SpiffeId> {
    let text = if agent.starts_with("spiffe://") {
        agent.to_owned()
    } else {
        format!("spiffe://{domain}/{}", agent.trim_start_matches('/'))
    };
    let id = SpiffeId::parse(&text).map_err(|e| anyhow::anyhow!("{agent:?}: {e}"))?;
    if id.trust_domain_name() != domain.as_str() {
        bail!("{agent:?} is not in trust domain {domain}");
    }
    if !id.is_workload() {
        bail!("{agent:?} names a trust domain, not a workload");
    }
    Ok(id)
}

fn file_stem(agent: &str) -> Result<String> {
    match agent.trim_end_matches('/').rsplit('/').next() {
        Some(stem) if !stem.is_empty() && !stem.starts_with('.') => Ok(stem.to_owned()),
        _ => bail!("{agent:?}: cannot name a file after it"),
    }
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(path)
}
