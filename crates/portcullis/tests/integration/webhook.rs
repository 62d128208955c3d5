//! The injection webhook as `portcullis inject-webhook` runs it: the real HTTPS server, the real
//! API client (HTTPS, bearer token, cluster CA) against a mock Kubernetes API server on
//! loopback (users would not run a real one here), and the sidecar's real config loader as the
//! ConfigMap validator. AdmissionReviews go in over TLS; the returned patch is applied and the
//! resulting sidecar loaded the way `portcullis run` would load it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis::config::Config;
use portcullis_injector::{
    ApiServer, ApiSettings, InjectionSettings, PATH_NAMESPACE, Server, TlsFiles, WebhookConfig,
};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::repo_root;

const TOKEN: &str = "service-account-token-for-the-injector";

/// A self-signed CA and a leaf for `names`, as PEM files in `dir`.
fn serving_pki(dir: &Path, prefix: &str, names: &[&str]) -> CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
    std::fs::write(dir.join(format!("{prefix}.crt")), leaf.pem()).unwrap();
    std::fs::write(dir.join(format!("{prefix}.key")), key.serialize_pem()).unwrap();
    std::fs::write(dir.join(format!("{prefix}-ca.crt")), ca.pem()).unwrap();
    ca.der().clone()
}

fn tls_server(dir: &Path, prefix: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{prefix}.crt")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{prefix}.key"))).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The mock API server: namespaces and ConfigMaps by path, 401 without the right bearer
/// token, 404 for anything else; it records the paths it was asked for.
#[derive(Clone, Default)]
struct MockApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl MockApi {
    fn namespace(&self, name: &str, labels: Value, annotations: Value) {
        self.objects.lock().unwrap().insert(
            format!("/api/v1/namespaces/{name}"),
            json!({ "apiVersion": "v1", "kind": "Namespace",
                    "metadata": { "name": name, "labels": labels, "annotations": annotations } }),
        );
    }

    fn configmap(&self, namespace: &str, object: Value) {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.objects.lock().unwrap().insert(
            format!("/api/v1/namespaces/{namespace}/configmaps/{name}"),
            object,
        );
    }

    async fn serve(self, dir: &Path) -> SocketAddr {
        let acceptor = tls_server(dir, "api");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let api = self.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: http::Request<Incoming>| {
                        let api = api.clone();
                        async move { Ok::<_, std::convert::Infallible>(api.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    fn answer(&self, req: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        self.requests.lock().unwrap().push(path.clone());
        let authorized = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        let (status, body) = if !authorized {
            (
                401,
                json!({ "kind": "Status", "code": 401, "reason": "Unauthorized" }),
            )
        } else if req.method() != http::Method::GET {
            (405, json!({ "kind": "Status", "code": 405 }))
        } else {
            match self.objects.lock().unwrap().get(&path) {
                Some(object) => (200, object.clone()),
                None => (
                    404,
                    json!({ "kind": "Status", "code": 404, "reason": "NotFound" }),
                ),
            }
        };
        let mut response = http::Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response
    }
}

struct Webhook {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    api: MockApi,
    /// The webhook's own files (its API token and CA), kept while it runs.
    dir: tempfile::TempDir,
}

const SERVICE_DNS: &str = "portcullis-injector.portcullis.svc";

impl Webhook {
    async fn start(token: &str) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let ca = serving_pki(dir.path(), "webhook", &[SERVICE_DNS]);
        serving_pki(dir.path(), "api", &["127.0.0.1"]);
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        let api = MockApi::default();
        let api_addr = api.clone().serve(dir.path()).await;
        let kubernetes = ApiSettings {
            host: "127.0.0.1".into(),
            port: api_addr.port(),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("api-ca.crt"),
        };
        let config = WebhookConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                cert: dir.path().join("webhook.crt"),
                key: dir.path().join("webhook.key"),
                reload_interval: std::time::Duration::from_secs(60),
                client_ca: None,
            },
            injection: InjectionSettings::default(),
            kubernetes: kubernetes.clone(),
        };
        let server = Server::bind(
            config,
            Arc::new(ApiServer::new(kubernetes)),
            portcullis::webhook::validator(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending()));
        Webhook { addr, ca, api, dir }
    }

    async fn review(&self, pod: &Value) -> Value {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0d5e2c1a-0000-4000-8000-000000000001",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "orders",
                "operation": "CREATE",
                "object": pod,
            },
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from(SERVICE_DNS).unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::post(PATH_NAMESPACE)
            .header(http::header::HOST, SERVICE_DNS)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let review: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(review["response"]["uid"], body["request"]["uid"]);
        review["response"].clone()
    }
}

/// The recipe's manifests: its namespace and config ConfigMap go into the mock API server.
fn recipe_objects() -> (Value, Value, Value) {
    let text =
        std::fs::read_to_string(repo_root().join("examples/csi-driver-spiffe/app.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
                .unwrap()
        })
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap().clone();
    (kind("Namespace"), kind("ConfigMap"), kind("Deployment"))
}

fn pod(annotations: Value, containers: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "orders-api-", "namespace": "orders", "annotations": annotations },
        "spec": { "containers": containers },
    })
}

fn app() -> Value {
    json!([{ "name": "app", "image": "orders-api:1", "ports": [{ "name": "http", "containerPort": 8080 }] }])
}

fn message(response: &Value) -> String {
    assert_eq!(response["allowed"], false, "{response}");
    assert!(response.get("patch").is_none());
    response["status"]["message"].as_str().unwrap().to_owned()
}

fn decode_base64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn apply(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    let ops: json_patch::Patch =
        serde_json::from_slice(&decode_base64(response["patch"].as_str().unwrap())).unwrap();
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &ops).unwrap();
    pod
}

#[tokio::test]
async fn a_pod_naming_a_config_configmap_runs_the_sidecar_with_that_config() {
    let hook = Webhook::start(TOKEN).await;
    let (namespace, configmap, deployment) = recipe_objects();
    hook.api.namespace(
        "orders",
        namespace["metadata"]["labels"].clone(),
        namespace["metadata"]["annotations"].clone(),
    );
    hook.api.configmap("orders", configmap.clone());

    // The recipe's own pod; its namespace names the ConfigMap (routes and user_token).
    let mut the_pod = deployment["spec"]["template"].clone();
    the_pod["metadata"]["namespace"] = json!("orders");
    let response = hook.review(&the_pod).await;
    let patched = apply(&the_pod, &response);
    assert!(
        hook.api
            .requests
            .lock()
            .unwrap()
            .contains(&"/api/v1/namespaces/orders/configmaps/orders-portcullis".to_owned())
    );

    let sidecar = patched["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis")
        .unwrap()
        .clone();
    let args: Vec<&str> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[..4],
        [
            "run",
            "--config",
            "/etc/portcullis/config/config.yaml",
            "--override"
        ]
    );
    assert!(sidecar["volumeMounts"].as_array().unwrap().contains(&json!({
        "name": "portcullis-config", "mountPath": "/etc/portcullis/config", "readOnly": true,
    })));
    let volume = patched["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "portcullis-config")
        .unwrap();
    assert_eq!(volume["configMap"]["name"], "orders-portcullis");

    // Load it as `portcullis run` will in the pod: the ConfigMap's keys in the mounted
    // directory, the args' override on top, with the pod's mounts (SVID, policies) standing in
    // here as minted certificates and the shipped policies.
    let (_pod_fs, config_dir, overrides) = pod_filesystem(args[4]);
    for (key, value) in configmap["data"].as_object().unwrap() {
        std::fs::write(config_dir.join(key), value.as_str().unwrap()).unwrap();
    }
    let config = Config::load_with_override(
        Some(&config_dir.join(args[2].rsplit('/').next().unwrap())),
        &overrides,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes.len(), 2, "the ConfigMap's routes");
    let user_token = config.user_token.expect("the ConfigMap's user_token");
    assert_eq!(user_token.header, "x-portcullis-user-token");
    assert!(config.reject_standing_credentials);
    assert_eq!(config.listen.to_string(), "0.0.0.0:8443");
    assert_eq!(config.admin_listen.to_string(), "0.0.0.0:9901");
    assert_eq!(config.upstream.as_str(), "127.0.0.1:8080");
}

#[tokio::test]
async fn a_missing_or_invalid_config_configmap_is_refused_with_its_errors() {
    let hook = Webhook::start(TOKEN).await;
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({}),
    );

    let missing = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/config": "nope" }),
        app(),
    );
    let text = message(&hook.review(&missing).await);
    assert!(text.contains("ConfigMap \"nope\" not found"), "{text}");

    // Every mistake, each with its YAML path, as `portcullis validate` reports them.
    hook.api.configmap("orders", json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "broken", "namespace": "orders" },
        "data": { "config.yaml": "routes:\n  - path: /mcp\n    protocol: grpc\nuser_token:\n  jwks_file: missing.json\n  issuers: [https://idp]\n  audiences: [a]\nlimits:\n  request_timeout: soon\nlistn: 1\n" },
    }));
    let broken = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/config": "broken" }),
        app(),
    );
    let text = message(&hook.review(&broken).await);
    for expected in [
        "ConfigMap \"broken\" is not a valid sidecar config",
        "listn: unknown field",
        "routes[0].protocol: \"grpc\" is not one of",
        "user_token.jwks_file: file not found",
        "user_token.max_lifetime: required",
        "limits.request_timeout",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    // The files only the pod has (SVID, policies) are not the ConfigMap's errors, and the
    // webhook's scratch directory does not leak.
    assert!(
        !text.contains("tls.") && !text.contains("policy.dir") && !text.contains("/tmp"),
        "{text}"
    );

    // A ConfigMap without config.yaml.
    hook.api.configmap(
        "orders",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "empty", "namespace": "orders" }, "data": { "other": "x" },
        }),
    );
    let empty = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/config": "empty" }),
        app(),
    );
    assert!(message(&hook.review(&empty).await).contains("config.yaml: key missing"));
}

#[tokio::test]
async fn no_way_around_the_sidecar() {
    let hook = Webhook::start(TOKEN).await;
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({}),
    );

    // A container named portcullis that the webhook did not write.
    let mut containers = app();
    containers
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "portcullis", "image": "busybox", "args": ["sleep", "inf"] }));
    let fake = pod(
        json!({ "portcullis.dev/upstream-port": "http" }),
        containers,
    );
    assert!(message(&hook.review(&fake).await).contains("did not create"));

    // Opt-out and shadow mode by pod annotation, in a namespace that does not allow them.
    let out = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/inject": "false" }),
        app(),
    );
    assert!(message(&hook.review(&out).await).contains("portcullis.dev/allow-opt-out"));
    let shadow = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/policy-mode": "shadow" }),
        app(),
    );
    assert!(message(&hook.review(&shadow).await).contains("portcullis.dev/allow-opt-out"));

    // The namespace allows it: both are honoured.
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({ "portcullis.dev/allow-opt-out": "true" }),
    );
    let response = hook.review(&out).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none());
    assert_eq!(hook.review(&shadow).await["allowed"], true);
}

#[tokio::test]
async fn an_api_server_that_refuses_the_token_refuses_the_pod_without_leaking_why() {
    let hook = Webhook::start("a-stale-token").await;
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({}),
    );
    let plain = pod(json!({ "portcullis.dev/upstream-port": "http" }), app());
    let text = message(&hook.review(&plain).await);
    assert!(
        text.contains("could not read the pod's namespace"),
        "{text}"
    );
    assert!(
        !text.contains("401") && !text.contains("token") && !text.contains("127.0.0.1"),
        "{text}"
    );
}

/// A config whose upstream API keys and audit signing key are in the pod's Secret: two of
/// them absolute, one relative to the config directory (`../secret/...`, the same file).
const SECRET_CONFIG: &str = "\
routes:
  - path_prefix: /v1/chat/completions
    protocol: openai
    credential:
      file: /etc/portcullis/secret/openai-api-key
  - path: /mcp
    protocol: mcp
    credential:
      file: ../secret/mcp-api-key
      header: x-api-key
audit:
  sink: stdout
  signing_key: /etc/portcullis/secret/audit-signing.pem
";

fn keyed_configmap(name: &str, config: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": "orders" },
        "data": { "config.yaml": config },
    })
}

#[tokio::test]
async fn files_in_the_secret_are_admitted_only_when_the_pod_names_a_secret() {
    let hook = Webhook::start(TOKEN).await;
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({}),
    );
    hook.api
        .configmap("orders", keyed_configmap("keyed", SECRET_CONFIG));

    // No Secret named: the pod would have none of these files, and the refusal says why, at
    // each YAML path.
    let without = pod(
        json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/config": "keyed" }),
        app(),
    );
    let text = message(&hook.review(&without).await);
    for path in [
        "routes[0].credential.file: \"/etc/portcullis/secret/openai-api-key\"",
        "routes[1].credential.file: \"../secret/mcp-api-key\"",
        "audit.signing_key: \"/etc/portcullis/secret/audit-signing.pem\"",
    ] {
        assert!(
            text.contains(&format!(
                "{path} is under the Secret mount /etc/portcullis/secret, but the pod names no portcullis.dev/secret"
            )),
            "{path:?} missing from:\n{text}"
        );
    }
    assert!(
        !text.contains("file not found") && !text.contains("/tmp"),
        "{text}"
    );

    // Named (here by the pod): admitted, the Secret mounted into the sidecar, and the webhook
    // never asked the API server for it.
    let mut with = without.clone();
    with["metadata"]["annotations"]["portcullis.dev/secret"] = json!("orders-keys");
    let response = hook.review(&with).await;
    let patched = apply(&with, &response);
    let volume = patched["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "portcullis-secret")
        .unwrap()
        .clone();
    assert_eq!(volume["secret"]["secretName"], "orders-keys");
    let sidecar = patched["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis")
        .unwrap()
        .clone();
    assert!(sidecar["volumeMounts"].as_array().unwrap().contains(&json!({
        "name": "portcullis-secret", "mountPath": "/etc/portcullis/secret", "readOnly": true,
    })));
    let requests = hook.api.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|p| !p.contains("/secrets")),
        "{requests:?}"
    );

    // Only the Secret's files are left to the sidecar: any other error still refuses the pod,
    // and a file outside the Secret that is missing is still reported.
    hook.api.configmap(
        "orders",
        keyed_configmap(
            "keyed-broken",
            &SECRET_CONFIG.replace("protocol: mcp", "protocol: grpc").replace(
                "audit:\n",
                "user_token:\n  jwks_file: ../secret-ish/jwks.json\n  issuers: [https://idp]\n  audiences: [a]\n  max_lifetime: 5m\naudit:\n",
            ),
        ),
    );
    let mut broken = with.clone();
    broken["metadata"]["annotations"]["portcullis.dev/config"] = json!("keyed-broken");
    let text = message(&hook.review(&broken).await);
    assert!(
        text.contains("routes[1].protocol: \"grpc\" is not one of"),
        "{text}"
    );
    assert!(
        text.contains(
            "user_token.jwks_file: \"../secret-ish/jwks.json\" is outside the sidecar's mounts (/etc/portcullis/config, /etc/portcullis/secret): the pod cannot have this file"
        ),
        "{text}"
    );
    assert!(
        !text.contains("credential.file") && !text.contains("signing_key"),
        "{text}"
    );

    // A value under the mount at a key that is not a file (a route's path) is no Secret file.
    hook.api.configmap(
        "orders",
        keyed_configmap(
            "odd-route",
            "routes:\n  - path_prefix: /etc/portcullis/secret/\n    protocol: http\n",
        ),
    );
    let mut odd = without.clone();
    odd["metadata"]["annotations"]["portcullis.dev/config"] = json!("odd-route");
    assert_eq!(hook.review(&odd).await["allowed"], true);

    // In the pod: the sidecar loads the config with the Secret's files, as `portcullis run`
    // and `portcullis validate` do (Config::load_with_override), and a key missing from the
    // Secret is reported at start with its YAML path.
    let args: Vec<String> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let (_pod_fs, config_dir, overrides) = pod_filesystem(&args[4]);
    let secret_dir = config_dir.parent().unwrap().join("secret");
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::write(
        config_dir.join("config.yaml"),
        SECRET_CONFIG.replace("/etc/portcullis/secret", &secret_dir.display().to_string()),
    )
    .unwrap();
    let (signing_key, _) = portcullis_proxy::audit::SigningKey::generate().unwrap();
    std::fs::write(secret_dir.join("audit-signing.pem"), signing_key).unwrap();
    std::fs::write(secret_dir.join("openai-api-key"), "sk-test\n").unwrap();
    let errors = Config::load_with_override(Some(&config_dir.join("config.yaml")), &overrides)
        .unwrap_err()
        .to_string();
    assert_eq!(
        errors.trim(),
        format!(
            "routes[1].credential.file: file not found: {}",
            config_dir.join("../secret/mcp-api-key").display()
        ),
        "{errors}"
    );
    std::fs::write(secret_dir.join("mcp-api-key"), "mcp-test\n").unwrap();
    let config = Config::load_with_override(Some(&config_dir.join("config.yaml")), &overrides)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.routes.iter().all(|r| r.credential.is_some()));
    assert!(config.audit_checkpoints.is_some());
}

/// A config naming a file outside the sidecar's mounts is refused without the webhook opening
/// it: the same answer for a path the webhook's machine has (its own API token) as for one it
/// does not.
#[tokio::test]
async fn a_file_outside_the_sidecars_mounts_is_refused_unopened() {
    let hook = Webhook::start(TOKEN).await;
    hook.api.namespace(
        "orders",
        json!({ "portcullis.dev/inject": "enabled" }),
        json!({}),
    );
    let own_token = hook.dir.path().join("token").display().to_string();
    for (name, path) in [
        (
            "sa-token",
            "/var/run/secrets/kubernetes.io/serviceaccount/token".to_owned(),
        ),
        ("own-token", own_token),
        ("traversal", "../../../../etc/passwd".to_owned()),
    ] {
        hook.api.configmap(
            "orders",
            keyed_configmap(
                name,
                &format!(
                    "user_token:\n  jwks_file: {path:?}\n  issuers: [https://idp]\n  audiences: [a]\n  max_lifetime: 5m\n"
                ),
            ),
        );
        let refused = pod(
            json!({ "portcullis.dev/upstream-port": "http", "portcullis.dev/config": name }),
            app(),
        );
        let text = message(&hook.review(&refused).await);
        assert!(
            text.contains(&format!(
                "user_token.jwks_file: {path:?} is outside the sidecar's mounts (/etc/portcullis/config): the pod cannot have this file"
            )),
            "{text}"
        );
    }
}

/// The sidecar's file system in an injected pod, in a temporary directory: the config
/// ConfigMap's mount (empty; returned), the SVID the CSI driver would write (minted for
/// `orders-api` in `cluster.local`), and the sidecar's `--override` argument with its paths
/// moved there (the policy mount: the shipped policies).
fn pod_filesystem(override_arg: &str) -> (tempfile::TempDir, PathBuf, String) {
    let pod_fs = tempfile::tempdir().unwrap();
    let config_dir = pod_fs.path().join("etc/portcullis/config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let svid_dir = pod_fs.path().join("run/spiffe");
    std::fs::create_dir_all(&svid_dir).unwrap();
    let ca = portcullis_test_support::pki::Ca::new("cluster.local").unwrap();
    let svid = ca
        .leaf(&portcullis_test_support::pki::LeafSpec::server(
            "spiffe://cluster.local/ns/orders/sa/orders-api",
        ))
        .unwrap();
    std::fs::write(svid_dir.join("tls.crt"), &svid.cert_pem).unwrap();
    std::fs::write(svid_dir.join("tls.key"), &svid.key_pem).unwrap();
    std::fs::write(svid_dir.join("ca.crt"), ca.cert_pem()).unwrap();
    let overrides = override_arg
        .replace("/run/spiffe", &svid_dir.display().to_string())
        .replace(
            "/etc/portcullis/policies",
            &repo_root().join("policies").display().to_string(),
        );
    (pod_fs, config_dir, overrides)
}
