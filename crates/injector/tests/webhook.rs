#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real-shaped AdmissionReview requests through the webhook over HTTPS (real TCP on
//! 127.0.0.1:0, rustls with certificates minted here), the returned JSON patch applied, and
//! the resulting pod checked: its structure, idempotence, and the Kubernetes OpenAPI schema
//! (through `kubernetes-validate`, found via `PORTCULLIS_KUBE_VALIDATE`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;

use portcullis_injector::kube::{ApiError, BoxFuture};
use portcullis_injector::{
    ANNOTATION_ALLOW_OPT_OUT, ANNOTATION_SECRET, ApiSettings, Cluster, InjectionSettings,
    NamespaceInfo, PATH_NAMESPACE, PATH_POD, SECRET_DIR, Server, StaticCluster, SvidSource,
    TlsFiles, WebhookConfig,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const SERVICE_DNS: &str = "portcullis-injector.portcullis.svc";

/// A CA and a serving certificate for the webhook Service name, written as PEM files.
struct Pki {
    ca_der: CertificateDer<'static>,
}

fn mint(dir: &Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis-injector-ca");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![SERVICE_DNS.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem()).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
    }
}

/// A CA for the webhook's callers (`tls.client_ca`) and one client certificate it signed, as
/// the API server would present from its AdmissionConfiguration kubeconfig.
struct ClientPki {
    ca_pem: String,
    cert: ClientCert,
}

/// A client certificate chain and its key, for [`call_as`].
struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
}

fn mint_client(name: &str) -> ClientPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name}-ca"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    ClientPki {
        ca_pem: ca_cert.pem(),
        cert: ClientCert {
            chain: vec![leaf.der().clone()],
            key_pem: leaf_key.serialize_pem(),
        },
    }
}

/// Counts the reads the webhook makes, to show a refused caller got none.
#[derive(Debug, Default)]
struct CountingCluster {
    inner: StaticCluster,
    reads: AtomicUsize,
}

impl Cluster for CountingCluster {
    fn namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.namespace(name)
    }

    fn configmap<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, ApiError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.configmap(namespace, name)
    }
}

struct Webhook {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), portcullis_injector::ServeError>>>,
}

impl Webhook {
    async fn start(injection: InjectionSettings) -> Webhook {
        Self::start_with_reload(injection, Duration::from_secs(60)).await
    }

    async fn start_with_reload(injection: InjectionSettings, reload: Duration) -> Webhook {
        Self::start_in(injection, reload, cluster()).await
    }

    async fn start_in(
        injection: InjectionSettings,
        reload: Duration,
        cluster: StaticCluster,
    ) -> Webhook {
        Self::start_with(injection, reload, Arc::new(cluster), None).await
    }

    /// `client_ca`: PEM written next to the serving pair and named as `tls.client_ca`.
    async fn start_with(
        injection: InjectionSettings,
        reload: Duration,
        cluster: Arc<dyn Cluster>,
        client_ca: Option<&str>,
    ) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let pki = mint(dir.path());
        let client_ca = client_ca.map(|pem| {
            let path = dir.path().join("client-ca.crt");
            std::fs::write(&path, pem).unwrap();
            path
        });
        let config = WebhookConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                reload_interval: reload,
                client_ca,
            },
            injection,
            kubernetes: ApiSettings::default(),
        };
        // No config ConfigMap is named in these tests; crates/portcullis' webhook test runs
        // the real validator against a mock API server.
        let server = Server::bind(config, cluster, Arc::new(|_, _| Ok(())))
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Webhook {
            addr,
            ca: pki.ca_der,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn call(&self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        call_with_ca(self.addr, &self.ca, http::Method::POST, path, body)
            .await
            .unwrap()
    }

    async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self.call(path, serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn call_with_ca(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    call_as(addr, ca, None, method, path, body).await
}

/// Like [`call_with_ca`], presenting `client` as the TLS client certificate when given.
async fn call_as(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    client: Option<&ClientCert>,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let tls = match client {
        Some(c) => builder.with_client_auth_cert(
            c.chain.clone(),
            PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector
        .connect(ServerName::try_from(SERVICE_DNS)?, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(format!("https://{SERVICE_DNS}{path}"))
        .header(http::header::HOST, SERVICE_DNS)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|c| *c != b'=').collect();
        let mut n = 0u32;
        for (i, c) in data.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Check the response envelope, apply its patch (if any) to the request's pod.
fn apply(review: &Value, response: &Value) -> Option<Value> {
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true, "{response}");
    let patch = response["response"].get("patch")?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let ops: json_patch::Patch =
        serde_json::from_slice(&decode_base64(patch.as_str().unwrap())).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &ops).unwrap();
    Some(pod)
}

fn review_of(template: &Value, pod: &Value, uid: &str) -> Value {
    let mut r = template.clone();
    r["request"]["uid"] = json!(uid);
    r["request"]["object"] = pod.clone();
    r
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

/// The fixtures' namespaces: `agents` lets its pods opt out (and ask for shadow mode),
/// `orders` does not; `payments` names the policy ConfigMap and `billing` the Secret for its
/// pods.
fn cluster() -> StaticCluster {
    let mut cluster = StaticCluster::default();
    cluster.namespaces.insert(
        "agents".into(),
        NamespaceInfo {
            annotations: [(ANNOTATION_ALLOW_OPT_OUT.to_owned(), "true".to_owned())].into(),
            ..NamespaceInfo::default()
        },
    );
    cluster.namespaces.insert(
        "payments".into(),
        NamespaceInfo {
            annotations: [(
                "portcullis.dev/policy-configmap".to_owned(),
                "security-policies".to_owned(),
            )]
            .into(),
            ..NamespaceInfo::default()
        },
    );
    cluster.namespaces.insert(
        "billing".into(),
        NamespaceInfo {
            annotations: [(ANNOTATION_SECRET.to_owned(), "billing-keys".to_owned())].into(),
            ..NamespaceInfo::default()
        },
    );
    cluster
}

#[tokio::test]
async fn a_namespace_that_names_the_policy_configmap_holds_its_pods_to_it() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let mut review = fixture("deployment-pod.json");
    review["request"]["namespace"] = json!("payments");
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    annotations["portcullis.dev/policy-configmap"] = json!("permissive");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    assert_eq!(response["response"]["allowed"], false, "{response}");
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("security-policies"), "{message}");
    // Without a choice of its own, the pod mounts the namespace's.
    review["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("portcullis.dev/policy-configmap");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    let pod = apply(&review, &response).expect("a patch");
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["configMap"]["name"] == "security-policies"),
        "{pod}"
    );
    hook.stop().await;
}

/// The config the sidecar runs with: `--override` in its args (no ConfigMap named here).
fn rendered_config(pod: &Value) -> serde_yaml::Value {
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .or(pod["spec"]["containers"].as_array())
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis")
        .unwrap();
    let args = sidecar["args"].as_array().unwrap();
    assert_eq!(args[0], "run");
    assert_eq!(args[1], "--override");
    assert_eq!(args.len(), 3, "{args:?}");
    serde_yaml::from_str(args[2].as_str().unwrap()).unwrap()
}

/// Validate `object` against the Kubernetes OpenAPI schema (strict: unknown fields fail) of
/// each version. In CI the validator must be there; locally it may be missing.
fn kube_validate(object: &Value, versions: &[&str]) -> bool {
    let Some(exe) = std::env::var_os("PORTCULLIS_KUBE_VALIDATE") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PORTCULLIS_KUBE_VALIDATE is not set: CI must export it (bash .ci/k8s-checks --print-env)"
        );
        eprintln!(
            "notice: PORTCULLIS_KUBE_VALIDATE is not set; skipping Kubernetes schema validation"
        );
        return true;
    };
    let mut object = object.clone();
    // The API server turns generateName into a name after admission; the validator's report
    // line needs one, so do the same here.
    if object["metadata"].get("name").is_none() {
        let prefix = object["metadata"]["generateName"]
            .as_str()
            .unwrap_or("pod-");
        object["metadata"]["name"] = json!(format!("{prefix}x7k2p"));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("object.json");
    // Like kubectl, the validator reads YAML; JSON is YAML.
    std::fs::write(&file, serde_json::to_vec_pretty(&object).unwrap()).unwrap();
    let mut all_ok = true;
    for version in versions {
        let out = std::process::Command::new(&exe)
            .args(["--strict", "--kubernetes-version", version])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {exe:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A missing schema is only a warning to the tool; to us it means nothing was checked.
        let ok = out.status.success() && !stdout.contains("WARN") && !stdout.contains("ERROR");
        if !ok {
            eprintln!(
                "kubernetes-validate {version}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        all_ok &= ok;
    }
    all_ok
}

fn assert_hardened(c: &Value) {
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
}

#[tokio::test]
async fn deployment_pod_in_an_enabled_namespace_gets_a_native_sidecar() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let review = fixture("deployment-pod.json");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    let pod = apply(&review, &response).expect("a patch");

    assert_eq!(names(&pod["spec"]["initContainers"]), ["portcullis"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["orders-api"]);
    assert_eq!(
        pod["spec"]["containers"][0], review["request"]["object"]["spec"]["containers"][0],
        "the application container is untouched"
    );
    let sidecar = named(&pod["spec"]["initContainers"], "portcullis");
    assert_eq!(sidecar["restartPolicy"], "Always");
    // No config ConfigMap named: the whole config is the override in the args (checked
    // below by rendered_config).
    assert_eq!(sidecar["args"][0], "run");
    assert_eq!(sidecar["args"][1], "--override");
    let mtls = named(&sidecar["ports"], "portcullis-mtls");
    assert_eq!(mtls["containerPort"], 8443);
    let admin = named(&sidecar["ports"], "pc-admin");
    assert_eq!(admin["containerPort"], 9901);
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], "pc-admin");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_hardened(sidecar);

    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "kube-api-access-x7k2p",
            "portcullis-policies",
            "portcullis-svid"
        ]
    );
    let svid = named(&pod["spec"]["volumes"], "portcullis-svid");
    assert_eq!(svid["csi"]["driver"], "spiffe.csi.cert-manager.io");
    assert_eq!(
        svid["csi"]["volumeAttributes"]["spiffe.csi.cert-manager.io/fs-group"],
        "65532"
    );
    let policies = named(&pod["spec"]["volumes"], "portcullis-policies");
    assert_eq!(policies["configMap"]["name"], "portcullis-policies");
    // The config is fixed in the container's args, not read from a (mutable) annotation.
    assert!(
        !serde_json::to_string(&pod["metadata"]["annotations"])
            .unwrap()
            .contains("rendered")
    );

    // Only the contract's keys, with the values the annotations asked for.
    let rendered = rendered_config(&pod);
    let keys: Vec<&str> = rendered
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "listen",
            "admin_listen",
            "upstream",
            "tls",
            "policy",
            "audit"
        ]
    );
    assert_eq!(rendered["listen"], "0.0.0.0:8443");
    // On the pod IP for the kubelet's probes and scraping; /inventory answers loopback
    // peers only (crates/proxy/src/admin.rs).
    assert_eq!(rendered["admin_listen"], "0.0.0.0:9901");
    assert_eq!(rendered["upstream"], "http://127.0.0.1:8080");
    assert_eq!(rendered["tls"]["cert"], "/run/spiffe/tls.crt");
    assert_eq!(rendered["tls"]["key"], "/run/spiffe/tls.key");
    assert_eq!(
        rendered["tls"]["trust_bundles"]["cluster.local"],
        "/run/spiffe/ca.crt"
    );
    assert_eq!(rendered["policy"]["dir"], "/etc/portcullis/policies");
    assert_eq!(rendered["policy"]["mode"], "enforce");
    assert_eq!(rendered["audit"]["sink"], "stdout");
    assert_eq!(pod["metadata"]["labels"]["portcullis.dev/injected"], "true");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/name"],
        "orders-api"
    );

    assert!(
        kube_validate(&pod, &["1.29", "1.37"]),
        "patched pod is not a valid Pod"
    );

    // Idempotent: the patched pod, reviewed again (as with reinvocationPolicy: IfNeeded),
    // yields no patch.
    let again = review_of(&review, &pod, "7e0c2a52-0000-4000-8000-000000000001");
    let response = hook.review(PATH_NAMESPACE, &again).await;
    assert!(apply(&again, &response).is_none(), "{response}");
    let response = hook.review(PATH_POD, &again).await;
    assert!(apply(&again, &response).is_none(), "{response}");
    hook.stop().await;
}

#[tokio::test]
async fn pod_with_an_init_container_opting_in_by_annotation() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let review = fixture("init-container-pod.json");
    let response = hook.review(PATH_POD, &review).await;
    let pod = apply(&review, &response).expect("a patch");

    // The pod's own init container keeps running first; the sidecar starts after it and
    // before the application.
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["fetch-tool-catalog", "portcullis"]
    );
    assert!(
        pod["spec"]["initContainers"][0]
            .get("restartPolicy")
            .is_none()
    );
    let rendered = rendered_config(&pod);
    assert_eq!(
        rendered["upstream"], "http://127.0.0.1:3000",
        "named port resolved"
    );
    assert_eq!(
        rendered["tls"]["trust_bundles"]["prod.example.org"],
        "/run/spiffe/ca.crt"
    );
    assert_eq!(rendered["policy"]["mode"], "shadow");
    assert_eq!(
        named(&pod["spec"]["volumes"], "portcullis-policies")["configMap"]["name"],
        "mcp-tools-policies"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        "{}\n"
    );
    assert!(
        kube_validate(&pod, &["1.29", "1.37"]),
        "patched pod is not a valid Pod"
    );

    let again = review_of(&review, &pod, "7e0c2a52-0000-4000-8000-000000000002");
    let response = hook.review(PATH_POD, &again).await;
    assert!(apply(&again, &response).is_none(), "{response}");
    hook.stop().await;
}

#[tokio::test]
async fn opted_out_pod_is_admitted_unchanged_only_where_the_namespace_allows_it() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    // `orders` does not allow opting out: refused, with the reason.
    let review = fixture("opted-out-pod.json");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    assert_eq!(response["response"]["allowed"], false, "{response}");
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("portcullis.dev/allow-opt-out"),
        "{message}"
    );
    // The same pod in `agents`, which allows it, is admitted unchanged.
    let mut allowed = review.clone();
    allowed["request"]["namespace"] = json!("agents");
    for path in [PATH_NAMESPACE, PATH_POD] {
        let response = hook.review(path, &allowed).await;
        assert_eq!(response["response"]["allowed"], true, "{response}");
        assert!(apply(&allowed, &response).is_none(), "{response}");
    }
    // Outside enabled namespaces nothing was asked, so there is nothing to opt out of.
    let response = hook.review(PATH_POD, &review).await;
    assert!(apply(&review, &response).is_none(), "{response}");
    // Without any opt-in, the pod route leaves a pod alone too.
    let mut plain = fixture("deployment-pod.json");
    let response = hook.review(PATH_POD, &plain).await;
    assert!(apply(&plain, &response).is_none(), "{response}");
    // And a non-pod request is not looked at.
    plain["request"]["kind"]["kind"] = json!("ConfigMap");
    let response = hook.review(PATH_NAMESPACE, &plain).await;
    assert!(apply(&plain, &response).is_none(), "{response}");
    hook.stop().await;
}

#[tokio::test]
async fn pod_missing_its_upstream_port_is_refused_not_admitted_unprotected() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let review = fixture("missing-upstream-port-pod.json");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], false);
    assert!(response["response"].get("patch").is_none());
    assert_eq!(response["response"]["status"]["code"], 400);
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("portcullis.dev/upstream-port"),
        "{message}"
    );

    // A conflicting port is refused the same way.
    let mut conflict = fixture("deployment-pod.json");
    conflict["request"]["object"]["spec"]["containers"][0]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "metrics", "containerPort": 9901 }));
    let response = hook.review(PATH_NAMESPACE, &conflict).await;
    assert_eq!(response["response"]["allowed"], false);
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("9901"), "{message}");

    // So is an app container mounting the sidecar's SVID volume (which the API server would
    // only check after the webhook added it).
    let mut mounting = fixture("deployment-pod.json");
    mounting["request"]["object"]["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "portcullis-svid", "mountPath": "/var/run/x" }]);
    let response = hook.review(PATH_NAMESPACE, &mounting).await;
    assert_eq!(response["response"]["allowed"], false, "{response}");
    assert!(response["response"].get("patch").is_none());
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("portcullis-svid"), "{message}");
    hook.stop().await;
}

#[tokio::test]
async fn legacy_clusters_get_a_regular_container() {
    let hook = Webhook::start(InjectionSettings {
        native_sidecar: false,
        ..InjectionSettings::default()
    })
    .await;
    let review = fixture("deployment-pod.json");
    let response = hook.review(PATH_NAMESPACE, &review).await;
    let pod = apply(&review, &response).expect("a patch");
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["orders-api", "portcullis"]
    );
    assert!(
        named(&pod["spec"]["containers"], "portcullis")
            .get("restartPolicy")
            .is_none()
    );
    assert!(
        kube_validate(&pod, &["1.27", "1.37"]),
        "patched pod is not a valid Pod"
    );
    let again = review_of(&review, &pod, "7e0c2a52-0000-4000-8000-000000000003");
    let response = hook.review(PATH_NAMESPACE, &again).await;
    assert!(apply(&again, &response).is_none(), "{response}");
    hook.stop().await;
}

#[tokio::test]
async fn spire_pods_get_spiffe_helper_and_the_socket() {
    let hook = Webhook::start(InjectionSettings {
        svid: SvidSource::Spire {
            helper_image: "ghcr.io/spiffe/spiffe-helper:0.10.0".into(),
            socket_file: "spire-agent.sock".into(),
        },
        ..InjectionSettings::default()
    })
    .await;
    let review = fixture("init-container-pod.json");
    let response = hook.review(PATH_POD, &review).await;
    let pod = apply(&review, &response).expect("a patch");
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        [
            "fetch-tool-catalog",
            "portcullis-spiffe-helper",
            "portcullis"
        ]
    );
    assert_hardened(named(
        &pod["spec"]["initContainers"],
        "portcullis-spiffe-helper",
    ));
    assert_eq!(
        named(&pod["spec"]["volumes"], "portcullis-spire-agent")["csi"]["driver"],
        "csi.spiffe.io"
    );
    assert!(
        kube_validate(&pod, &["1.29", "1.37"]),
        "patched pod is not a valid Pod"
    );
    hook.stop().await;
}

#[tokio::test]
async fn the_validator_catches_a_broken_pod() {
    // Guards the guard: if the schema check accepted anything, the tests above would prove
    // nothing.
    if std::env::var_os("PORTCULLIS_KUBE_VALIDATE").is_none() {
        assert!(kube_validate(&json!({}), &["1.37"]));
        return;
    }
    let mut pod = fixture("deployment-pod.json")["request"]["object"].clone();
    assert!(
        kube_validate(&pod, &["1.37"]),
        "the fixture itself is valid"
    );
    pod["spec"]["containers"][0]["securityContext"] = json!({ "readOnlyRootFilesystm": true });
    assert!(
        !kube_validate(&pod, &["1.37"]),
        "a misspelt field must fail"
    );
}

#[tokio::test]
async fn malformed_reviews_health_and_metrics() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let (status, body) = hook.call(PATH_NAMESPACE, b"{not json".to_vec()).await;
    assert_eq!(status, 200);
    let response: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["allowed"], false);

    let review = fixture("deployment-pod.json");
    hook.review(PATH_NAMESPACE, &review).await;

    for path in ["/healthz", "/readyz"] {
        let (status, _) = call_with_ca(hook.addr, &hook.ca, http::Method::GET, path, vec![])
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }
    let (status, body) = call_with_ca(hook.addr, &hook.ca, http::Method::GET, "/metrics", vec![])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("portcullis_injector_admissions_total{result=\"injected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("portcullis_injector_admissions_total{result=\"malformed\"} 1"),
        "{text}"
    );
    let (status, _) = hook.call("/elsewhere", vec![]).await;
    assert_eq!(status, 404);
    hook.stop().await;
}

#[tokio::test]
async fn a_rotated_serving_certificate_is_picked_up() {
    let hook =
        Webhook::start_with_reload(InjectionSettings::default(), Duration::from_millis(50)).await;
    let new_ca = mint(hook.dir.path()).ca_der;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let result = call_with_ca(hook.addr, &new_ca, http::Method::GET, "/healthz", vec![]).await;
        if matches!(result, Ok((200, _))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old CA no longer vouches for what is served.
    assert!(
        call_with_ca(hook.addr, &hook.ca, http::Method::GET, "/healthz", vec![])
            .await
            .is_err()
    );
    hook.stop().await;
}

/// The `volumeMounts` of every container of `pod` that mount `volume`, by container name.
fn mounting(pod: &Value, volume: &str) -> Vec<(String, Value)> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| pod["spec"][key].as_array())
        .flatten()
        .flat_map(|c| {
            c["volumeMounts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m["name"] == volume)
                .map(|m| (c["name"].as_str().unwrap().to_owned(), m))
        })
        .collect()
}

#[tokio::test]
async fn a_pod_naming_a_secret_gets_it_read_only_in_the_sidecar_only() {
    let spire = InjectionSettings {
        svid: SvidSource::Spire {
            helper_image: "ghcr.io/spiffe/spiffe-helper:0.10.0".into(),
            socket_file: "spire-agent.sock".into(),
        },
        ..InjectionSettings::default()
    };
    for settings in [InjectionSettings::default(), spire] {
        let hook = Webhook::start(settings).await;
        let mut review = fixture("deployment-pod.json");
        review["request"]["object"]["metadata"]["annotations"][ANNOTATION_SECRET] =
            json!("orders-upstream-keys");
        let response = hook.review(PATH_NAMESPACE, &review).await;
        let pod = apply(&review, &response).expect("a patch");

        assert_eq!(
            named(&pod["spec"]["volumes"], "portcullis-secret"),
            &json!({
                "name": "portcullis-secret",
                "secret": {
                    "secretName": "orders-upstream-keys",
                    "defaultMode": 292,
                    "optional": false,
                },
            })
        );
        assert_eq!(
            mounting(&pod, "portcullis-secret"),
            [(
                "portcullis".to_owned(),
                json!({ "name": "portcullis-secret", "mountPath": SECRET_DIR, "readOnly": true }),
            )],
            "the sidecar only, read-only"
        );
        assert_eq!(SECRET_DIR, "/etc/portcullis/secret");
        assert_eq!(
            pod["spec"]["containers"][0], review["request"]["object"]["spec"]["containers"][0],
            "the application container is untouched"
        );
        assert!(
            kube_validate(&pod, &["1.29", "1.37"]),
            "patched pod is not a valid Pod"
        );
        // A reinvocation changes nothing.
        let again = review_of(&review, &pod, "7e0c2a52-0000-4000-8000-000000000011");
        let response = hook.review(PATH_NAMESPACE, &again).await;
        assert!(apply(&again, &response).is_none(), "{response}");
        hook.stop().await;
    }
}

#[tokio::test]
async fn secret_refusals_a_namespace_choice_a_mount_by_the_app_and_a_bad_name() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    let refused = |response: &Value| -> String {
        assert_eq!(response["response"]["allowed"], false, "{response}");
        assert!(response["response"].get("patch").is_none());
        assert_eq!(response["response"]["status"]["code"], 400);
        response["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // `billing` names the Secret for its pods: a pod naming another is refused...
    let mut review = fixture("deployment-pod.json");
    review["request"]["namespace"] = json!("billing");
    review["request"]["object"]["metadata"]["annotations"][ANNOTATION_SECRET] =
        json!("my-own-keys");
    let message = refused(&hook.review(PATH_NAMESPACE, &review).await);
    for part in ["portcullis.dev/secret", "my-own-keys", "billing-keys"] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    // ...and one naming none mounts the namespace's.
    review["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(ANNOTATION_SECRET);
    let response = hook.review(PATH_NAMESPACE, &review).await;
    let pod = apply(&review, &response).expect("a patch");
    assert_eq!(
        named(&pod["spec"]["volumes"], "portcullis-secret")["secret"]["secretName"],
        "billing-keys"
    );

    // An application container mounting the sidecar's Secret volume (which the API server
    // would only check after the webhook added it), with or without the annotation.
    for annotated in [true, false] {
        let mut review = fixture("deployment-pod.json");
        if annotated {
            review["request"]["object"]["metadata"]["annotations"][ANNOTATION_SECRET] =
                json!("orders-upstream-keys");
        }
        review["request"]["object"]["spec"]["containers"][0]["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "name": "portcullis-secret", "mountPath": "/keys", "readOnly": true }));
        let message = refused(&hook.review(PATH_NAMESPACE, &review).await);
        assert!(message.contains("\"portcullis-secret\""), "{message}");
    }

    // A name that is no DNS-1123 subdomain.
    let mut review = fixture("deployment-pod.json");
    review["request"]["object"]["metadata"]["annotations"][ANNOTATION_SECRET] =
        json!("Upstream_Keys");
    let message = refused(&hook.review(PATH_NAMESPACE, &review).await);
    assert!(
        message.contains("portcullis.dev/secret \"Upstream_Keys\" is not a valid Secret name"),
        "{message}"
    );
    hook.stop().await;
}

/// A pod whose containers share a process namespace (with each other, or with the node) is
/// refused: a process there with the sidecar's UID reads its keys through /proc/<pid>/root.
#[tokio::test]
async fn pods_sharing_a_process_namespace_are_refused() {
    let hook = Webhook::start(InjectionSettings::default()).await;
    for field in ["shareProcessNamespace", "hostPID"] {
        let mut review = fixture("deployment-pod.json");
        review["request"]["object"]["spec"][field] = json!(true);
        let response = hook.review(PATH_NAMESPACE, &review).await;
        assert_eq!(response["response"]["allowed"], false, "{response}");
        assert!(response["response"].get("patch").is_none());
        let message = response["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{field}: true")), "{message}");
        review["request"]["object"]["spec"][field] = json!(false);
        let response = hook.review(PATH_NAMESPACE, &review).await;
        assert!(apply(&review, &response).is_some(), "{response}");
    }
    hook.stop().await;
}

/// With `tls.client_ca`, only a caller with a certificate from that CA (the API server) gets a
/// review: anyone else in the cluster network could otherwise have the webhook read any
/// namespace and ConfigMap and echo what the validator says about it.
#[tokio::test]
async fn with_a_client_ca_only_its_certificates_get_reviews() {
    let api_server = mint_client("kube-apiserver");
    let stranger = mint_client("stranger");
    let cluster = Arc::new(CountingCluster {
        inner: cluster(),
        reads: AtomicUsize::new(0),
    });
    let hook = Webhook::start_with(
        InjectionSettings::default(),
        Duration::from_secs(60),
        cluster.clone(),
        Some(&api_server.ca_pem),
    )
    .await;
    let review = fixture("deployment-pod.json");
    let body = serde_json::to_vec(&review).unwrap();

    // No certificate: 403 for both admission paths, nothing read from the cluster.
    for path in [PATH_NAMESPACE, PATH_POD] {
        let (status, text) = call_as(
            hook.addr,
            &hook.ca,
            None,
            http::Method::POST,
            path,
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(status, 403, "{path}: {}", String::from_utf8_lossy(&text));
        assert!(
            String::from_utf8_lossy(&text).contains("client certificate"),
            "{}",
            String::from_utf8_lossy(&text)
        );
    }
    assert_eq!(
        cluster.reads.load(Ordering::SeqCst),
        0,
        "the cluster was read"
    );

    // A certificate from another CA fails the handshake.
    let result = call_as(
        hook.addr,
        &hook.ca,
        Some(&stranger.cert),
        http::Method::POST,
        PATH_NAMESPACE,
        body.clone(),
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(
        cluster.reads.load(Ordering::SeqCst),
        0,
        "the cluster was read"
    );

    // The probes and the metrics need no certificate.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = call_as(hook.addr, &hook.ca, None, http::Method::GET, path, vec![])
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }

    // The API server's certificate gets the normal answer.
    let (status, text) = call_as(
        hook.addr,
        &hook.ca,
        Some(&api_server.cert),
        http::Method::POST,
        PATH_NAMESPACE,
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
    let response: Value = serde_json::from_slice(&text).unwrap();
    assert!(apply(&review, &response).is_some(), "{response}");
    assert!(cluster.reads.load(Ordering::SeqCst) > 0);

    let (_, metrics) = call_as(
        hook.addr,
        &hook.ca,
        None,
        http::Method::GET,
        "/metrics",
        vec![],
    )
    .await
    .unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("portcullis_injector_unauthenticated_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_injector_admissions_total{result=\"injected\"} 1"),
        "{metrics}"
    );
    hook.stop().await;
}

/// Without `tls.client_ca` nothing is asked of the caller (the behaviour before the option);
/// a client that offers a certificate anyway is not asked for it and still served.
#[tokio::test]
async fn without_a_client_ca_callers_are_not_authenticated() {
    let someone = mint_client("someone");
    let hook = Webhook::start(InjectionSettings::default()).await;
    let review = fixture("deployment-pod.json");
    for client in [None, Some(&someone.cert)] {
        let (status, text) = call_as(
            hook.addr,
            &hook.ca,
            client,
            http::Method::POST,
            PATH_NAMESPACE,
            serde_json::to_vec(&review).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
    }
    hook.stop().await;
}

/// `tls.client_ca` is checked at load like `tls.cert`: every error at its YAML path.
#[test]
fn a_missing_or_broken_client_ca_is_a_config_error_at_its_path() {
    let dir = tempfile::tempdir().unwrap();
    mint(dir.path());
    let load = |client_ca: &str| {
        let file = dir.path().join("webhook.yaml");
        std::fs::write(
            &file,
            format!("tls:\n  cert: tls.crt\n  key: tls.key\n  client_ca: {client_ca}\n"),
        )
        .unwrap();
        WebhookConfig::load(&file)
    };
    let only_error = |client_ca: &str| -> String {
        let errors = load(client_ca).unwrap_err().errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "tls.client_ca", "{errors:?}");
        errors[0].message.clone()
    };

    let message = only_error("absent.crt");
    assert!(message.contains("file not found"), "{message}");
    assert!(message.contains("absent.crt"), "{message}");

    std::fs::write(dir.path().join("not-pem.crt"), "just text\n").unwrap();
    let message = only_error("not-pem.crt");
    assert!(message.contains("no certificate found"), "{message}");

    // A key is PEM, but no certificate.
    std::fs::copy(dir.path().join("tls.key"), dir.path().join("key.pem")).unwrap();
    let message = only_error("key.pem");
    assert!(message.contains("no certificate found"), "{message}");

    // A CERTIFICATE block that is no certificate.
    std::fs::write(
        dir.path().join("garbage.crt"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let message = only_error("garbage.crt");
    assert!(message.contains("garbage.crt"), "{message}");

    // One or more CA certificates load, resolved relative to the file.
    let bundle = format!("{}{}", mint_client("a").ca_pem, mint_client("b").ca_pem);
    std::fs::write(dir.path().join("clients.crt"), bundle).unwrap();
    let config = load("clients.crt").unwrap();
    assert_eq!(config.tls.client_ca, Some(dir.path().join("clients.crt")));
    // And it is optional.
    let file = dir.path().join("plain.yaml");
    std::fs::write(&file, "tls:\n  cert: tls.crt\n  key: tls.key\n").unwrap();
    assert_eq!(WebhookConfig::load(&file).unwrap().tls.client_ca, None);
}
