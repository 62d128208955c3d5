use super::*;

fn pod(annotations: Value, containers: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "app-", "annotations": annotations },
        "spec": { "containers": containers },
    })
}

fn app(ports: Value) -> Value {
    json!([{ "name": "app", "image": "app:1", "ports": ports }])
}

fn patched(pod: &Value, scope: Scope, settings: &InjectionSettings) -> Value {
    let Mutation::Patch(ops) = mutate(pod, scope, settings).unwrap() else {
        panic!("expected a patch");
    };
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn sidecar(pod: &Value, key: &str) -> Value {
    pod["spec"][key]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == SIDECAR_NAME)
        .cloned()
        .unwrap()
}

#[test]
fn opt_in_routes_and_opt_out() {
    let s = InjectionSettings::default();
    let port = json!({ ANNOTATION_UPSTREAM_PORT: "8080" });
    let c = app(json!([]));

    let plain = pod(port.clone(), c.clone());
    assert!(matches!(
        mutate(&plain, Scope::Namespace, &s),
        Ok(Mutation::Patch(_))
    ));
    assert_eq!(
        mutate(&plain, Scope::Pod, &s),
        Ok(Mutation::Skip(SkipReason::NotRequested))
    );

    let mut asks = port.clone();
    asks[ANNOTATION_INJECT] = json!("true");
    assert!(matches!(
        mutate(&pod(asks, c.clone()), Scope::Pod, &s),
        Ok(Mutation::Patch(_))
    ));

    let mut refuses = port.clone();
    refuses[ANNOTATION_INJECT] = json!("false");
    assert_eq!(
        mutate(&pod(refuses, c.clone()), Scope::Namespace, &s),
        Ok(Mutation::Skip(SkipReason::OptedOut))
    );

    let mut labelled = pod(port.clone(), c.clone());
    labelled["metadata"]["labels"] = json!({ ANNOTATION_INJECT: "true" });
    assert!(matches!(
        mutate(&labelled, Scope::Pod, &s),
        Ok(Mutation::Patch(_))
    ));

    let mut typo = port;
    typo[ANNOTATION_INJECT] = json!("yes");
    assert_eq!(
        mutate(&pod(typo, c), Scope::Namespace, &s),
        Err(Refusal::BadInjectValue("yes".into()))
    );
}

#[test]
fn refusals_name_the_problem() {
    let s = InjectionSettings::default();
    let cases = [
        (json!({}), app(json!([])), Refusal::MissingUpstreamPort),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "grpc" }),
            app(json!([{ "name": "http", "containerPort": 8080 }])),
            Refusal::BadUpstreamPort("grpc".into()),
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "70000" }),
            app(json!([])),
            Refusal::BadUpstreamPort("70000".into()),
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "8443" }),
            app(json!([])),
            Refusal::UpstreamIsSidecarPort(8443, "mtls"),
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "8080" }),
            app(json!([{ "containerPort": 9901 }])),
            Refusal::PortConflict {
                container: "app".into(),
                port: 9901,
                purpose: "admin",
            },
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_TRUST_DOMAIN: "Bad Domain" }),
            app(json!([])),
            Refusal::BadTrustDomain("Bad Domain".into()),
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_POLICY_CONFIGMAP: "No_Such" }),
            app(json!([])),
            Refusal::BadPolicyConfigMap("No_Such".into()),
        ),
        (
            json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_POLICY_MODE: "audit" }),
            app(json!([])),
            Refusal::BadPolicyMode("audit".into()),
        ),
    ];
    for (annotations, containers, expected) in cases {
        let p = pod(annotations, containers);
        assert_eq!(
            mutate(&p, Scope::Namespace, &s),
            Err(expected.clone()),
            "{p}"
        );
        assert!(!expected.to_string().is_empty());
    }

    let mut host = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        mutate(&host, Scope::Namespace, &s),
        Err(Refusal::HostNetwork)
    );

    let mut clash = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    clash["spec"]["volumes"] = json!([{ "name": "portcullis-svid", "emptyDir": {} }]);
    assert_eq!(
        mutate(&clash, Scope::Namespace, &s),
        Err(Refusal::VolumeConflict("portcullis-svid".into()))
    );
}

#[test]
fn native_sidecar_shape() {
    let s = InjectionSettings::default();
    let p = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "http", ANNOTATION_TRUST_DOMAIN: "prod.example.org" }),
        app(json!([{ "name": "http", "containerPort": 3000 }])),
    );
    let out = patched(&p, Scope::Namespace, &s);
    let c = sidecar(&out, "initContainers");
    assert_eq!(c["restartPolicy"], "Always");
    assert_eq!(c["args"][0], "run");
    assert_eq!(c["ports"][0]["name"], MTLS_PORT_NAME);
    assert_eq!(c["ports"][0]["containerPort"], 8443);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(out["metadata"]["labels"][LABEL_INJECTED], "true");

    let rendered: serde_yaml::Value = serde_yaml::from_str(
        out["metadata"]["annotations"][ANNOTATION_RENDERED_CONFIG]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rendered["upstream"], "http://127.0.0.1:3000");
    assert_eq!(rendered["admin_listen"], "0.0.0.0:9901");
    assert_eq!(
        rendered["tls"]["trust_bundles"]["prod.example.org"],
        "/run/spiffe/ca.crt"
    );
    assert_eq!(rendered["policy"]["mode"], "enforce");

    // Feeding the result back changes nothing.
    assert_eq!(
        mutate(&out, Scope::Namespace, &s),
        Ok(Mutation::Skip(SkipReason::AlreadyInjected))
    );
}

#[test]
fn legacy_sidecar_is_a_regular_container() {
    let s = InjectionSettings {
        native_sidecar: false,
        ..InjectionSettings::default()
    };
    let p = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    let out = patched(&p, Scope::Namespace, &s);
    assert!(out["spec"].get("initContainers").is_none());
    let c = sidecar(&out, "containers");
    assert!(c.get("restartPolicy").is_none());
    assert_eq!(out["spec"]["containers"][0]["name"], "app");
}

#[test]
fn spire_adds_the_helper_before_the_proxy() {
    let s = InjectionSettings {
        svid: SvidSource::Spire {
            helper_image: "helper:1".into(),
            socket_file: "spire-agent.sock".into(),
        },
        ..InjectionSettings::default()
    };
    let p = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    let out = patched(&p, Scope::Namespace, &s);
    let init = out["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], HELPER_NAME);
    assert_eq!(init[1]["name"], SIDECAR_NAME);
    let helper_conf = out["metadata"]["annotations"][ANNOTATION_RENDERED_HELPER_CONFIG]
        .as_str()
        .unwrap();
    assert!(helper_conf.contains("agent_address = \"/run/spire/agent-sockets/spire-agent.sock\""));
    let volumes = out["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["csi"]["driver"] == "csi.spiffe.io")
    );
    let rendered = out["metadata"]["annotations"][ANNOTATION_RENDERED_CONFIG]
        .as_str()
        .unwrap();
    assert!(rendered.contains("/run/spiffe/svid_key.pem"));
}

#[test]
fn pods_without_metadata_maps_get_them_created() {
    let s = InjectionSettings::default();
    let p = json!({
        "metadata": { "annotations": { ANNOTATION_UPSTREAM_PORT: "8080" } },
        "spec": { "containers": [{ "name": "app", "image": "app:1" }] },
    });
    let out = patched(&p, Scope::Namespace, &s);
    assert_eq!(out["metadata"]["labels"][LABEL_INJECTED], "true");
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 3);
    assert_eq!(out["spec"]["initContainers"].as_array().unwrap().len(), 1);
}
