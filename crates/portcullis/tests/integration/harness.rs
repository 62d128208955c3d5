//! A proxy started the way `portcullis run` starts one (config file → `Config::load` →
//! `portcullis_proxy::start`), against a recording upstream, with a CA and callers minted for
//! the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use portcullis::config::Config;
use portcullis_test_support::client::{CallError, Caller, HttpVersion, request};
use portcullis_test_support::jwt::{self, SigningKey};
use portcullis_test_support::pki::{Ca, LeafSpec, Svid};
use portcullis_test_support::upstream::{SsePacing, Upstream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TRUST_DOMAIN: &str = "prod.example.org";
pub const SERVER_ID: &str = "spiffe://prod.example.org/ns/orders/sa/orders-api";
/// Member of `AgentGroup::"support-agents"` in the shipped entities.json.
pub const TRIAGE: &str = "spiffe://prod.example.org/ns/support/sa/triage-agent";
/// No permit except /health in the shipped policies.
pub const REPORT: &str = "spiffe://prod.example.org/ns/billing/sa/report-agent";
pub const HOST: &str = "orders.prod.example.org";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Default)]
pub struct Builder {
    /// Replaces the shipped *.cedar files (the shipped schema and entities stay).
    policies: Option<String>,
    mode: Option<&'static str>,
    pacing: Option<SsePacing>,
    /// Extra YAML appended to the config (e.g. a `limits:` block).
    extra_yaml: String,
    /// Upstream address override (e.g. a closed port).
    upstream: Option<SocketAddr>,
    /// Additional trusted trust domains: name → CA.
    extra_bundles: Vec<(String, Arc<Ca>)>,
    /// Verify user tokens against a JWKS file holding this key.
    idp: Option<SigningKey>,
    /// Extra keys inside the `user_token:` block (indented two spaces).
    user_token_yaml: String,
    /// Copy *.cedar and entities.json from this directory instead of the shipped ones.
    policy_dir: Option<PathBuf>,
    /// The `audit:` block (default: `sink: audit.jsonl`).
    audit_yaml: Option<String>,
    /// `tls.reload_interval` (default: the proxy's 5s).
    tls_reload_interval: Option<&'static str>,
    /// The serving SVID to start with (default: `LeafSpec::server(SERVER_ID)`).
    server_leaf: Option<LeafSpec>,
    /// `tls.workload_api` instead of files, with the CA the test agent serves SVIDs from.
    workload_api: Option<(String, Ca)>,
    /// `policy.shadow_dir`: these *.cedar beside the shipped schema and entities.
    shadow: Option<String>,
    /// Verify approval grants signed by this key (`approval:` block).
    approver: Option<Arc<SigningKey>>,
    /// Files written beside config.yaml before it is loaded: name → contents.
    files: Vec<(String, String)>,
    /// The CA to mint the serving SVID and agents from (default: a new one).
    ca: Option<Ca>,
}

pub const ISSUER: &str = "https://idp.example.org";
pub const APPROVER_ISSUER: &str = "https://approvals.example.org";
pub const AUDIENCE: &str = "orders-api";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub upstream: Upstream,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub _running: Option<portcullis_proxy::Running>,
    pub idp: Option<SigningKey>,
    /// The proxy's own token verifier (a shared handle), for its counters.
    pub verifier: Option<portcullis_identity::user_token::UserTokenVerifier>,
    /// The verifiers of `user_token.issuer_keys`, by issuer (shared handles).
    pub issuer_verifiers: Vec<(String, portcullis_identity::user_token::UserTokenVerifier)>,
    /// The key approval grants are signed with, when built with `approvals()`.
    pub approver: Option<Arc<SigningKey>>,
}

impl Builder {
    pub fn policies(mut self, cedar: &str) -> Self {
        self.policies = Some(cedar.to_owned());
        self
    }

    pub fn shadow(mut self) -> Self {
        self.mode = Some("shadow");
        self
    }

    /// A shadow set (`policy.shadow_dir`) of `cedar` with the same schema and entities.
    pub fn shadow_policies(mut self, cedar: &str) -> Self {
        self.shadow = Some(cedar.to_owned());
        self
    }

    pub fn pacing(mut self, pacing: SsePacing) -> Self {
        self.pacing = Some(pacing);
        self
    }

    pub fn yaml(mut self, extra: &str) -> Self {
        self.extra_yaml.push_str(extra);
        self
    }

    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = Some(addr);
        self
    }

    /// `approval:` trusting grants from [`APPROVER_ISSUER`] signed by a new key.
    pub fn approvals(mut self) -> Self {
        self.approver = Some(Arc::new(SigningKey::es256("approver-1")));
        self
    }

    /// Writes `name` beside config.yaml before the config is loaded.
    pub fn file(mut self, name: &str, contents: &str) -> Self {
        self.files.push((name.to_owned(), contents.to_owned()));
        self
    }

    /// Mints the serving SVID and agents from `ca` (so a test service can trust it too).
    pub fn ca(mut self, ca: Ca) -> Self {
        self.ca = Some(ca);
        self
    }

    pub fn user_tokens(mut self) -> Self {
        self.idp = Some(SigningKey::es256("idp-1"));
        self
    }

    pub fn user_token_yaml(mut self, extra: &str) -> Self {
        self.user_token_yaml.push_str(extra);
        self
    }

    pub fn audit_yaml(mut self, yaml: &str) -> Self {
        self.audit_yaml = Some(yaml.to_owned());
        self
    }

    pub fn policy_dir(mut self, dir: PathBuf) -> Self {
        self.policy_dir = Some(dir);
        self
    }

    pub fn tls_reload_interval(mut self, interval: &'static str) -> Self {
        self.tls_reload_interval = Some(interval);
        self
    }

    pub fn server_leaf(mut self, spec: LeafSpec) -> Self {
        self.server_leaf = Some(spec);
        self
    }

    pub fn trust(mut self, domain: &str, ca: Arc<Ca>) -> Self {
        self.extra_bundles.push((domain.to_owned(), ca));
        self
    }

    /// Identity from the Workload API at `endpoint` (which must already serve a state), whose
    /// SVIDs `ca` issues: `Harness::svid` then mints agents under it.
    pub fn workload_api(mut self, endpoint: String, ca: Ca) -> Self {
        self.workload_api = Some((endpoint, ca));
        self
    }

    pub async fn start(self) -> Harness {
        let approver = self.approver.clone();
        let (dir, ca, upstream, idp) = self.write_config("127.0.0.1:0", "127.0.0.1:0").await;
        let config =
            Config::load(&dir.path().join("config.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let options = config.into_options().await.unwrap();
        let verifier = options.user_token.as_ref().map(|t| t.verifier.clone());
        let issuer_verifiers = options
            .user_token
            .as_ref()
            .map(|t| t.by_issuer.clone())
            .unwrap_or_default();
        let running = portcullis_proxy::start(options).await.unwrap();
        Harness {
            addr: running.local_addr(),
            admin: running.admin_addr(),
            _running: Some(running),
            idp,
            verifier,
            issuer_verifiers,
            approver,
            dir,
            ca,
            upstream,
        }
    }

    /// Runs the real `portcullis run` binary as a child process on free loopback ports
    /// (for what only a separate process shows: its own memory, its signal handling), and
    /// waits until `/readyz` answers 200.
    pub async fn spawn(self) -> Spawned {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (addr, admin) = (free(), free());
        let (dir, ca, upstream, _) = self
            .write_config(&addr.to_string(), &admin.to_string())
            .await;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(dir.path().join("config.yaml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let spawned = Spawned {
            harness: Harness {
                dir,
                ca,
                upstream,
                addr,
                admin,
                _running: None,
                idp: None,
                verifier: None,
                issuer_verifiers: Vec::new(),
                approver: None,
            },
            child,
        };
        let ready = eventually_for(Duration::from_secs(30), async || {
            admin_try_get(admin, "/readyz").await == Some(200)
        })
        .await;
        assert!(ready, "portcullis run did not become ready");
        spawned
    }

    /// Writes certificates, policies and `config.yaml` into a new directory; starts the
    /// recording upstream.
    async fn write_config(
        self,
        listen: &str,
        admin_listen: &str,
    ) -> (tempfile::TempDir, Ca, Upstream, Option<SigningKey>) {
        let dir = tempfile::tempdir().unwrap();
        let (workload_api, ca) = match self.workload_api {
            Some((endpoint, ca)) => (Some(endpoint), ca),
            None => (
                None,
                self.ca.unwrap_or_else(|| Ca::new(TRUST_DOMAIN).unwrap()),
            ),
        };
        for (name, contents) in &self.files {
            write(dir.path(), name, contents);
        }
        let server = ca
            .leaf(
                self.server_leaf
                    .as_ref()
                    .unwrap_or(&LeafSpec::server(SERVER_ID)),
            )
            .unwrap();
        write(dir.path(), "ca.pem", &ca.cert_pem());
        write(dir.path(), "server.pem", &server.cert_pem);
        write(dir.path(), "server-key.pem", &server.key_pem);
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir(&policy_dir).unwrap();
        let shipped = self
            .policy_dir
            .clone()
            .unwrap_or_else(|| repo_root().join("policies"));
        for entry in std::fs::read_dir(&shipped).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if self.policies.is_some() && name.ends_with(".cedar") {
                continue;
            }
            std::fs::copy(entry.path(), policy_dir.join(&name)).unwrap();
        }
        if let Some(policies) = &self.policies {
            write(&policy_dir, "test.cedar", policies);
        }
        let mut shadow_yaml = String::new();
        if let Some(shadow) = &self.shadow {
            let shadow_dir = dir.path().join("shadow");
            std::fs::create_dir(&shadow_dir).unwrap();
            for name in ["schema.cedarschema", "entities.json"] {
                let _ = std::fs::copy(policy_dir.join(name), shadow_dir.join(name));
            }
            write(&shadow_dir, "candidate.cedar", shadow);
            shadow_yaml.push_str("  shadow_dir: shadow\n");
        }
        let upstream = Upstream::start(
            self.pacing
                .unwrap_or(SsePacing::Delay(Duration::from_millis(1))),
        )
        .await
        .unwrap();
        let upstream_addr = self.upstream.unwrap_or(upstream.addr);
        let mut bundles = format!("    {TRUST_DOMAIN}: ca.pem\n");
        for (index, (domain, extra)) in self.extra_bundles.iter().enumerate() {
            let name = format!("extra-{index}.pem");
            write(dir.path(), &name, &extra.cert_pem());
            bundles.push_str(&format!("    {domain}: {name}\n"));
        }
        let tls = match &workload_api {
            Some(endpoint) => {
                format!("tls:\n  workload_api: {endpoint}\n  workload_api_timeout: 10s\n")
            }
            None => format!(
                "tls:\n  cert: server.pem\n  key: server-key.pem\n{}  trust_bundles:\n{bundles}",
                self.tls_reload_interval
                    .map(|i| format!("  reload_interval: {i}\n"))
                    .unwrap_or_default(),
            ),
        };
        let yaml = format!(
            "listen: {listen}\n\
             admin_listen: {admin_listen}\n\
             upstream: http://{upstream_addr}\n\
             {tls}\
             policy:\n  dir: policies\n  mode: {}\n  reload_interval: 100ms\n{shadow_yaml}\
             audit:\n{}{}",
            self.mode.unwrap_or("enforce"),
            self.audit_yaml
                .as_deref()
                .unwrap_or("  sink: audit.jsonl\n"),
            self.extra_yaml,
        );
        let mut yaml = yaml;
        if let Some(idp) = &self.idp {
            write(dir.path(), "jwks.json", &jwt::jwks(&[idp]));
            yaml.push_str(&format!(
                "user_token:\n  jwks_file: jwks.json\n  jwks_refresh_interval: 100ms\n  issuers: [{ISSUER}]\n  audiences: [{AUDIENCE}]\n  max_lifetime: 1h\n{}",
                self.user_token_yaml
            ));
        }
        if let Some(approver) = &self.approver {
            write(
                dir.path(),
                "approval-jwks.json",
                &jwt::jwks(&[approver.as_ref()]),
            );
            yaml.push_str(&format!(
                "approval:\n  jwks_file: approval-jwks.json\n  issuers: [{APPROVER_ISSUER}]\n  max_lifetime: 5m\n"
            ));
        }
        write(dir.path(), "config.yaml", &yaml);
        (dir, ca, upstream, self.idp)
    }
}

/// A `portcullis run` child process and the harness around it; killed when dropped.
pub struct Spawned {
    pub harness: Harness,
    pub child: std::process::Child,
}

impl Spawned {
    /// Sends SIGTERM (through kill(1): the tests take no libc dependency).
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Peak resident set size of the child (kB), from `/proc/<pid>/status`.
    pub fn vm_hwm_kb(&self) -> u64 {
        self.status_kb("VmHWM:")
    }

    /// Resident set size of the child now (kB).
    pub fn vm_rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    fn status_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits up to `deadline` for the child to exit; its exit code.
    pub async fn wait(&mut self, deadline: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        while started.elapsed() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write(dir: &Path, name: &str, contents: &str) {
    std::fs::write(dir.join(name), contents).unwrap();
}

/// Replaces `name` in one step (write beside it, then rename), as certificate managers do.
pub fn replace(dir: &Path, name: &str, contents: &str) {
    let staged = dir.join(format!(".{name}.new"));
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(staged, dir.join(name)).unwrap();
}

impl Harness {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub async fn start() -> Harness {
        Builder::default().start().await
    }

    pub fn svid(&self, id: &str) -> Svid {
        self.ca.svid(id).unwrap()
    }

    pub fn caller(&self, svid: &Svid, version: HttpVersion) -> Caller {
        Caller::new(&[self.ca.cert_der()], Some(svid), version).unwrap()
    }

    /// One request as `agent` over HTTP/1.1; returns status and body.
    pub async fn get(&self, agent: &str, path: &str) -> (u16, Bytes) {
        self.send(
            agent,
            HttpVersion::Http1,
            request("GET", HOST, path, Bytes::new()),
        )
        .await
    }

    pub async fn send(
        &self,
        agent: &str,
        version: HttpVersion,
        req: http::Request<http_body_util::Full<Bytes>>,
    ) -> (u16, Bytes) {
        let caller = self.caller(&self.svid(agent), version);
        let response = caller
            .call(self.addr, req)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    /// Connects with `svid` and sends one request; the error if the proxy refused.
    pub async fn try_call(&self, svid: Option<&Svid>) -> Result<u16, CallError> {
        let caller = Caller::new(&[self.ca.cert_der()], svid, HttpVersion::Http1).unwrap();
        caller
            .call(
                self.addr,
                request("GET", HOST, "/api/orders/1", Bytes::new()),
            )
            .await
            .map(|r| r.status().as_u16())
    }

    /// Writes `raw` bytes over an mTLS connection as `agent` and returns what came back
    /// before the server closed or `wait` elapsed.
    pub async fn raw(&self, agent: &str, raw: &[u8], wait: Duration) -> String {
        let svid = self.svid(agent);
        let config = portcullis_test_support::pki::client_config(
            &[self.ca.cert_der()],
            Some(&svid),
            &[b"http/1.1"],
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .unwrap();
        tls.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `GET {path}{i}` with each of `tokens` as its user token, pipelined on one HTTP/1.1
    /// connection as `agent` (the last request closes it): the responses' statuses in
    /// order, and the whole reply.
    pub async fn pipelined_tokens(
        &self,
        agent: &str,
        path: &str,
        tokens: &[&str],
    ) -> (Vec<String>, String) {
        let mut raw = String::new();
        for (i, token) in tokens.iter().enumerate() {
            let close = if i + 1 == tokens.len() {
                "Connection: close\r\n"
            } else {
                ""
            };
            raw.push_str(&format!(
                "GET {path}{i} HTTP/1.1\r\nHost: {HOST}\r\nx-portcullis-user-token: {token}\r\n{close}\r\n"
            ));
        }
        let reply = self
            .raw(agent, raw.as_bytes(), Duration::from_secs(10))
            .await;
        // Responses follow one another without a separator (a body has no newline at its end).
        let statuses = reply
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|response| response[..3].to_owned())
            .collect();
        (statuses, reply)
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = admin_get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Audit lines written so far (waits for `at_least` records beyond the start line).
    pub async fn audit(&self, at_least: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("audit.jsonl");
        for _ in 0..200 {
            let records = read_audit(&path);
            if records.len() > at_least {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        read_audit(&path)
    }

    /// A well-formed user token for `subject` in `groups`, acting through `actor`.
    pub fn token(&self, subject: &str, groups: &[&str], actor: &str) -> String {
        let mut claims = jwt::claims(ISSUER, AUDIENCE, subject, actor, jwt::now());
        claims["groups"] = serde_json::json!(groups);
        claims["scope"] = "orders".into();
        self.idp
            .as_ref()
            .expect("built with user_tokens()")
            .token(&claims)
    }

    /// `method path` as `agent`, with `token` in the user-token header when given.
    pub async fn call_as(
        &self,
        agent: &str,
        token: Option<&str>,
        method: &str,
        path: &str,
    ) -> (u16, Bytes) {
        let mut req = request(method, HOST, path, Bytes::new());
        if let Some(token) = token {
            req.headers_mut()
                .insert("x-portcullis-user-token", token.parse().unwrap());
        }
        self.send(
            agent,
            portcullis_test_support::client::HttpVersion::Http1,
            req,
        )
        .await
    }

    /// The leaf certificate the proxy presents to a new handshake (as an agent of the
    /// harness CA); `None` if the handshake fails.
    pub async fn served_leaf(&self) -> Option<Vec<u8>> {
        let svid = self.svid(TRIAGE);
        let config = portcullis_test_support::pki::client_config(
            &[self.ca.cert_der()],
            Some(&svid),
            &[b"http/1.1"],
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .ok()?;
        let leaf = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
        Some(leaf)
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }
}

/// The audit lines written so far: complete lines only (the writer may be mid-line as it is
/// read; what follows the last newline is not a line yet).
pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The status of a plain HTTP GET on the admin listener, `None` if it cannot be reached.
pub async fn admin_try_get(admin: SocketAddr, path: &str) -> Option<u16> {
    let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request("GET", "localhost", path, Bytes::new()))
        .await
        .ok()?;
    Some(response.status().as_u16())
}

/// Plain HTTP GET on the admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, Bytes) {
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(request("GET", "localhost", path, Bytes::new()))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// The value of one sample in a Prometheus text exposition, 0 when absent.
pub fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Polls `check` until it holds (bounded), for effects the proxy records just after replying.
pub async fn eventually<F: AsyncFnMut() -> bool>(check: F) -> bool {
    eventually_for(Duration::from_secs(3), check).await
}

/// Polls `check` until it holds or `deadline` passes.
pub async fn eventually_for<F: AsyncFnMut() -> bool>(deadline: Duration, mut check: F) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Runs the `portcullis` binary; returns its exit code, stdout and stderr.
pub fn portcullis(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
