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

fn ns() -> NamespaceInfo {
    NamespaceInfo::default()
}

fn allowing() -> NamespaceInfo {
    NamespaceInfo {
        labels: [(ANNOTATION_ALLOW_OPT_OUT.to_owned(), "true".to_owned())].into(),
        ..NamespaceInfo::default()
    }
}

fn patched(pod: &Value, scope: Scope, settings: &InjectionSettings) -> Value {
    patched_in(pod, scope, &ns(), settings)
}

fn patched_in(
    pod: &Value,
    scope: Scope,
    ns: &NamespaceInfo,
    settings: &InjectionSettings,
) -> Value {
    let Mutation::Patch(Injection { patch: ops, .. }) = mutate(pod, scope, ns, settings).unwrap()
    else {
        panic!("expected a patch");
    };
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

/// The `--override` the sidecar runs with, parsed.
fn overrides(sidecar: &Value) -> serde_yaml::Value {
    let args = sidecar["args"].as_array().unwrap();
    let at = args.iter().position(|a| a == "--override").unwrap();
    serde_yaml::from_str(args[at + 1].as_str().unwrap()).unwrap()
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
        mutate(&plain, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));
    assert_eq!(
        mutate(&plain, Scope::Pod, &ns(), &s),
        Ok(Mutation::Skip(SkipReason::NotRequested))
    );

    let mut asks = port.clone();
    asks[ANNOTATION_INJECT] = json!("true");
    assert!(matches!(
        mutate(&pod(asks, c.clone()), Scope::Pod, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));

    let mut refuses = port.clone();
    refuses[ANNOTATION_INJECT] = json!("false");
    // In an enabled namespace the pod cannot opt out unless the namespace allows it.
    let opted_out = pod(refuses, c.clone());
    assert_eq!(
        mutate(&opted_out, Scope::Namespace, &ns(), &s),
        Err(Refusal::OptOutNotAllowed)
    );
    assert_eq!(
        mutate(&opted_out, Scope::Namespace, &allowing(), &s),
        Ok(Mutation::Skip(SkipReason::OptedOut))
    );
    let annotated = NamespaceInfo {
        annotations: [(ANNOTATION_ALLOW_OPT_OUT.to_owned(), "true".to_owned())].into(),
        ..NamespaceInfo::default()
    };
    assert_eq!(
        mutate(&opted_out, Scope::Namespace, &annotated, &s),
        Ok(Mutation::Skip(SkipReason::OptedOut))
    );
    // Opting out by label (which the objectSelector would see) is the same decision.
    let mut label_out = pod(port.clone(), c.clone());
    label_out["metadata"]["labels"] = json!({ ANNOTATION_INJECT: "false" });
    assert_eq!(
        mutate(&label_out, Scope::Namespace, &ns(), &s),
        Err(Refusal::OptOutNotAllowed)
    );

    let mut labelled = pod(port.clone(), c.clone());
    labelled["metadata"]["labels"] = json!({ ANNOTATION_INJECT: "true" });
    assert!(matches!(
        mutate(&labelled, Scope::Pod, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));

    let mut typo = port;
    typo[ANNOTATION_INJECT] = json!("yes");
    assert_eq!(
        mutate(&pod(typo, c), Scope::Namespace, &ns(), &s),
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
            mutate(&p, Scope::Namespace, &ns(), &s),
            Err(expected.clone()),
            "{p}"
        );
        assert!(!expected.to_string().is_empty());
    }

    let published = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "http" }),
        app(json!([{ "name": "http", "containerPort": 3000, "hostPort": 3000 }])),
    );
    assert_eq!(
        mutate(&published, Scope::Namespace, &ns(), &s),
        Err(Refusal::UpstreamOnHostPort(3000))
    );

    let mut host = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        mutate(&host, Scope::Namespace, &ns(), &s),
        Err(Refusal::HostNetwork)
    );
    for field in ["shareProcessNamespace", "hostPID"] {
        let mut shared = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
        shared["spec"][field] = json!(true);
        assert_eq!(
            mutate(&shared, Scope::Namespace, &ns(), &s),
            Err(Refusal::ProcessNamespaceShared(field))
        );
        shared["spec"][field] = json!(false);
        assert!(matches!(
            mutate(&shared, Scope::Namespace, &ns(), &s),
            Ok(Mutation::Patch(_))
        ));
    }

    let mut clash = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    clash["spec"]["volumes"] = json!([{ "name": "portcullis-svid", "emptyDir": {} }]);
    assert_eq!(
        mutate(&clash, Scope::Namespace, &ns(), &s),
        Err(Refusal::VolumeConflict("portcullis-svid".into()))
    );

    // A mount of the sidecar's volume by a container of the pod's own, declared or not, in
    // any container list, and on a pod already injected as well.
    for (key, field, volume) in [
        ("containers", "volumeMounts", "portcullis-svid"),
        ("initContainers", "volumeMounts", "portcullis-policies"),
        ("containers", "volumeDevices", "portcullis-config"),
        ("ephemeralContainers", "volumeMounts", "portcullis-svid"),
    ] {
        let mut mounting = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
        let entry = json!({ "name": volume, "mountPath": "/x", "devicePath": "/dev/x" });
        let container = json!({ "name": "other", "image": "busybox", field: [entry] });
        match mounting["spec"][key].as_array_mut() {
            Some(list) => list.push(container),
            None => mounting["spec"][key] = json!([container]),
        }
        assert_eq!(
            mutate(&mounting, Scope::Namespace, &ns(), &s),
            Err(Refusal::VolumeMounted(volume.into())),
            "{key} {field} {volume}"
        );
    }
    let injected = patched(
        &pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([]))),
        Scope::Namespace,
        &s,
    );
    let mut tampered = injected.clone();
    tampered["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "portcullis-svid", "mountPath": "/x" }]);
    assert_eq!(
        mutate(&tampered, Scope::Namespace, &ns(), &s),
        Err(Refusal::VolumeMounted("portcullis-svid".into()))
    );
    assert!(matches!(
        mutate(&injected, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Skip(_))
    ));
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

    // The whole config is in the container's args (immutable), none in an annotation.
    assert_eq!(c["args"].as_array().unwrap().len(), 3);
    assert!(
        out["metadata"]
            .get("annotations")
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains("rendered"))
    );
    let rendered = overrides(&c);
    assert_eq!(rendered["upstream"], "http://127.0.0.1:3000");
    assert_eq!(rendered["admin_listen"], "0.0.0.0:9901");
    assert_eq!(
        rendered["tls"]["trust_bundles"]["prod.example.org"],
        "/run/spiffe/ca.crt"
    );
    assert_eq!(rendered["policy"]["mode"], "enforce");

    // Feeding the result back changes nothing.
    assert_eq!(
        mutate(&out, Scope::Namespace, &ns(), &s),
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
    let rendered = overrides(&init[1]);
    assert_eq!(rendered["tls"]["key"], "/run/spiffe/svid_key.pem");

    // The injected pod comes back as is (a reinvocation): admitted. Written with a helper
    // config of its own (federated roots into the bundle, rotation off): refused.
    assert!(matches!(
        mutate(&out, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Skip(_))
    ));
    let mut own = out.clone();
    own["metadata"]["annotations"][ANNOTATION_RENDERED_HELPER_CONFIG] = json!(format!(
        "{helper_conf}\ninclude_federated_domains = true\ndaemon_mode = false\n"
    ));
    assert_eq!(
        mutate(&own, Scope::Namespace, &ns(), &s),
        Err(Refusal::ForeignSidecar)
    );
    own["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(ANNOTATION_RENDERED_HELPER_CONFIG);
    assert_eq!(
        mutate(&own, Scope::Namespace, &ns(), &s),
        Err(Refusal::ForeignSidecar)
    );
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
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(out["spec"]["initContainers"].as_array().unwrap().len(), 1);
}

#[test]
fn shadow_mode_only_where_the_namespace_allows_opt_out() {
    let s = InjectionSettings::default();
    let p = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_POLICY_MODE: "shadow" }),
        app(json!([])),
    );
    assert_eq!(
        mutate(&p, Scope::Namespace, &ns(), &s),
        Err(Refusal::ShadowNotAllowed)
    );
    let out = patched_in(&p, Scope::Namespace, &allowing(), &s);
    assert_eq!(
        overrides(&sidecar(&out, "initContainers"))["policy"]["mode"],
        "shadow"
    );
    // Asking for enforcement is always fine.
    let enforce = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_POLICY_MODE: "enforce" }),
        app(json!([])),
    );
    assert!(matches!(
        mutate(&enforce, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));
}

#[test]
fn config_configmap_is_mounted_and_overridden() {
    let s = InjectionSettings::default();
    let p = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_CONFIG: "agent-config" }),
        app(json!([])),
    );
    let Ok(Mutation::Patch(injection)) = mutate(&p, Scope::Namespace, &ns(), &s) else {
        panic!("expected a patch");
    };
    let source = injection.config.clone().unwrap();
    assert_eq!(source.configmap, "agent-config");
    let out = patched(&p, Scope::Namespace, &s);
    let c = sidecar(&out, "initContainers");
    assert_eq!(c["args"][0], "run");
    assert_eq!(c["args"][1], "--config");
    assert_eq!(c["args"][2], "/etc/portcullis/config/config.yaml");
    assert_eq!(c["args"][3], "--override");
    assert_eq!(c["args"][4], source.overrides.as_str());
    assert!(c["volumeMounts"].as_array().unwrap().contains(
        &json!({ "name": "portcullis-config", "mountPath": CONFIG_DIR, "readOnly": true })
    ));
    let volumes = out["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.contains(&json!({
        "name": "portcullis-config",
        "configMap": { "name": "agent-config", "defaultMode": 0o444 },
    })));
    // The override fixes what the pod's shape depends on, and leaves the audit sink to the
    // ConfigMap.
    let o = overrides(&c);
    assert_eq!(o["listen"], "0.0.0.0:8443");
    assert_eq!(o["admin_listen"], "0.0.0.0:9901");
    assert_eq!(o["upstream"], "http://127.0.0.1:8080");
    assert_eq!(o["tls"]["cert"], "/run/spiffe/tls.crt");
    assert_eq!(o["policy"]["dir"], "/etc/portcullis/policies");
    assert!(o.get("audit").is_none());

    // The namespace can name it for every pod, and then a pod cannot name another (a pod
    // author who may create ConfigMaps would otherwise pick a config without its limits).
    let in_ns = NamespaceInfo {
        annotations: [(ANNOTATION_CONFIG.to_owned(), "team-config".to_owned())].into(),
        ..NamespaceInfo::default()
    };
    let plain = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    let Ok(Mutation::Patch(i)) = mutate(&plain, Scope::Namespace, &in_ns, &s) else {
        panic!("expected a patch");
    };
    assert_eq!(i.config.unwrap().configmap, "team-config");
    assert_eq!(
        mutate(&p, Scope::Namespace, &in_ns, &s),
        Err(Refusal::NamespaceChoosesConfigMap {
            annotation: ANNOTATION_CONFIG,
            pod: "agent-config".into(),
            namespace: "team-config".into(),
        })
    );
    // Naming the namespace's own is no choice.
    let same = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_CONFIG: "team-config" }),
        app(json!([])),
    );
    assert!(matches!(
        mutate(&same, Scope::Namespace, &in_ns, &s),
        Ok(Mutation::Patch(_))
    ));
    // The policy ConfigMap likewise.
    let locked = NamespaceInfo {
        annotations: [(
            ANNOTATION_POLICY_CONFIGMAP.to_owned(),
            "security-policies".to_owned(),
        )]
        .into(),
        ..NamespaceInfo::default()
    };
    let permissive = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_POLICY_CONFIGMAP: "permissive" }),
        app(json!([])),
    );
    assert_eq!(
        mutate(&permissive, Scope::Namespace, &locked, &s),
        Err(Refusal::NamespaceChoosesConfigMap {
            annotation: ANNOTATION_POLICY_CONFIGMAP,
            pod: "permissive".into(),
            namespace: "security-policies".into(),
        })
    );
    let out = patched_in(&plain, Scope::Namespace, &locked, &s);
    assert!(
        out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["configMap"]["name"] == "security-policies"),
        "{out}"
    );
    // Where the namespace names none, the pod's choice stands.
    assert!(matches!(
        mutate(&permissive, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));

    let bad = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_CONFIG: "Not_A_Name" }),
        app(json!([])),
    );
    assert_eq!(
        mutate(&bad, Scope::Namespace, &ns(), &s),
        Err(Refusal::BadConfigMapName("Not_A_Name".into()))
    );
}

#[test]
fn a_portcullis_container_the_webhook_did_not_write_is_refused() {
    let s = InjectionSettings::default();
    let port = json!({ ANNOTATION_UPSTREAM_PORT: "8080" });

    // A hand-written "sidecar": admitted unprotected before, refused now.
    let fake = pod(
        port.clone(),
        json!([
            { "name": "app", "image": "app:1" },
            { "name": SIDECAR_NAME, "image": "busybox", "command": ["sleep", "inf"] },
        ]),
    );
    assert_eq!(
        mutate(&fake, Scope::Namespace, &ns(), &s),
        Err(Refusal::ForeignSidecar)
    );
    assert_eq!(
        mutate(&fake, Scope::Pod, &ns(), &s),
        Ok(Mutation::Skip(SkipReason::NotRequested))
    );

    // The webhook's own sidecar, as the API server hands it back on reinvocation (with its
    // defaults filled in), is recognised.
    let injected = patched(&pod(port.clone(), app(json!([]))), Scope::Namespace, &s);
    let mut defaulted = injected.clone();
    let c = &mut defaulted["spec"]["initContainers"][0];
    c["terminationMessagePath"] = json!("/dev/termination-log");
    c["readinessProbe"]["successThreshold"] = json!(1);
    assert_eq!(
        mutate(&defaulted, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Skip(SkipReason::AlreadyInjected))
    );

    // Any change to what the webhook wrote makes it someone else's container.
    let tampered: [fn(&mut Value); 5] = [
        |p| p["spec"]["initContainers"][0]["image"] = json!("evil:1"),
        |p| p["spec"]["initContainers"][0]["command"] = json!(["sh"]),
        |p| p["spec"]["initContainers"][0]["args"][2] = json!("{}"),
        |p| p["spec"]["volumes"][0]["configMap"]["name"] = json!("permissive-policies"),
        |p| {
            let c = p["spec"]["initContainers"][0].clone();
            p["spec"]["initContainers"] = json!([]);
            p["spec"]["containers"].as_array_mut().unwrap().push(c);
        },
    ];
    for (i, tamper) in tampered.iter().enumerate() {
        let mut p = injected.clone();
        tamper(&mut p);
        assert_eq!(
            mutate(&p, Scope::Namespace, &ns(), &s),
            Err(Refusal::ForeignSidecar),
            "tampering #{i}"
        );
    }
}

/// The volume mounts of the container named `name`, as (volume, path, readOnly).
fn mounts_of(pod: &Value, name: &str) -> Vec<(String, String, bool)> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| pod["spec"][key].as_array())
        .flatten()
        .filter(|c| c["name"] == name)
        .flat_map(|c| c["volumeMounts"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn a_named_secret_is_mounted_read_only_into_the_sidecar_only() {
    let spire = InjectionSettings {
        svid: SvidSource::Spire {
            helper_image: "helper:1".into(),
            socket_file: "spire-agent.sock".into(),
        },
        ..InjectionSettings::default()
    };
    for s in [InjectionSettings::default(), spire] {
        let p = pod(
            json!({
                ANNOTATION_UPSTREAM_PORT: "8080",
                ANNOTATION_CONFIG: "agent-config",
                ANNOTATION_SECRET: "agent-keys",
            }),
            app(json!([])),
        );
        let Ok(Mutation::Patch(injection)) = mutate(&p, Scope::Namespace, &ns(), &s) else {
            panic!("expected a patch");
        };
        // The validator is told a Secret is mounted.
        assert_eq!(
            injection.config.unwrap().secret.as_deref(),
            Some("agent-keys")
        );
        let out = patched(&p, Scope::Namespace, &s);
        let volumes = out["spec"]["volumes"].as_array().unwrap();
        let secret: Vec<&Value> = volumes
            .iter()
            .filter(|v| v["name"] == "portcullis-secret")
            .collect();
        assert_eq!(
            secret,
            [&json!({
                "name": "portcullis-secret",
                "secret": { "secretName": "agent-keys", "defaultMode": 0o444, "optional": false },
            })]
        );
        let mount = ("portcullis-secret".to_owned(), SECRET_DIR.to_owned(), true);
        assert!(mounts_of(&out, SIDECAR_NAME).contains(&mount), "{out}");
        // Nowhere else: not the helper, not the application.
        for other in [HELPER_NAME, "app"] {
            assert!(
                mounts_of(&out, other)
                    .iter()
                    .all(|(v, path, _)| v != "portcullis-secret" && path != SECRET_DIR),
                "{other}: {out}"
            );
        }
        // A reinvocation is recognised; the volume pointed at another Secret is not ours.
        assert_eq!(
            mutate(&out, Scope::Namespace, &ns(), &s),
            Ok(Mutation::Skip(SkipReason::AlreadyInjected))
        );
        let mut swapped = out.clone();
        for v in swapped["spec"]["volumes"].as_array_mut().unwrap() {
            if v["name"] == "portcullis-secret" {
                v["secret"]["secretName"] = json!("someone-elses");
            }
        }
        assert_eq!(
            mutate(&swapped, Scope::Namespace, &ns(), &s),
            Err(Refusal::ForeignSidecar)
        );
    }

    // Without a config ConfigMap the Secret is mounted all the same (the namespace may name it
    // for pods that do not use it yet).
    let s = InjectionSettings::default();
    let bare = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_SECRET: "agent-keys" }),
        app(json!([])),
    );
    let out = patched(&bare, Scope::Namespace, &s);
    assert!(mounts_of(&out, SIDECAR_NAME).contains(&(
        "portcullis-secret".to_owned(),
        SECRET_DIR.to_owned(),
        true
    )));

    // Without the annotation: no Secret anywhere, and `secret` is None for the validator.
    let plain = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_CONFIG: "agent-config" }),
        app(json!([])),
    );
    let Ok(Mutation::Patch(injection)) = mutate(&plain, Scope::Namespace, &ns(), &s) else {
        panic!("expected a patch");
    };
    assert_eq!(injection.config.unwrap().secret, None);
    let text = serde_json::to_string(&injection.patch).unwrap();
    assert!(
        !text.contains("portcullis-secret") && !text.contains(SECRET_DIR),
        "{text}"
    );
}

#[test]
fn the_namespace_chooses_the_secret_and_the_name_must_be_valid() {
    let s = InjectionSettings::default();
    let in_ns = NamespaceInfo {
        annotations: [(ANNOTATION_SECRET.to_owned(), "team-keys".to_owned())].into(),
        ..NamespaceInfo::default()
    };
    // The namespace's Secret for a pod that names none.
    let plain = pod(json!({ ANNOTATION_UPSTREAM_PORT: "8080" }), app(json!([])));
    let out = patched_in(&plain, Scope::Namespace, &in_ns, &s);
    assert!(
        out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "team-keys"),
        "{out}"
    );
    // A pod naming another: refused, naming the annotation and both Secrets.
    let own = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_SECRET: "my-keys" }),
        app(json!([])),
    );
    let refusal = mutate(&own, Scope::Namespace, &in_ns, &s).unwrap_err();
    assert_eq!(
        refusal,
        Refusal::NamespaceChoosesConfigMap {
            annotation: ANNOTATION_SECRET,
            pod: "my-keys".into(),
            namespace: "team-keys".into(),
        }
    );
    let text = refusal.to_string();
    assert!(
        text.contains("portcullis.dev/secret") && text.contains("my-keys"),
        "{text}"
    );
    // Naming the namespace's own is no choice; where the namespace names none, the pod's
    // stands.
    let same = pod(
        json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_SECRET: "team-keys" }),
        app(json!([])),
    );
    assert!(matches!(
        mutate(&same, Scope::Namespace, &in_ns, &s),
        Ok(Mutation::Patch(_))
    ));
    assert!(matches!(
        mutate(&own, Scope::Namespace, &ns(), &s),
        Ok(Mutation::Patch(_))
    ));

    // Not a DNS-1123 subdomain: refused, on the pod or on the namespace.
    for bad in ["Agent_Keys", "", "-keys", "keys/../other", &"k".repeat(254)] {
        let p = pod(
            json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_SECRET: bad }),
            app(json!([])),
        );
        assert_eq!(
            mutate(&p, Scope::Namespace, &ns(), &s),
            Err(Refusal::BadSecretName(bad.to_owned())),
            "{bad:?}"
        );
        let bad_ns = NamespaceInfo {
            annotations: [(ANNOTATION_SECRET.to_owned(), bad.to_owned())].into(),
            ..NamespaceInfo::default()
        };
        assert_eq!(
            mutate(&plain, Scope::Namespace, &bad_ns, &s),
            Err(Refusal::BadSecretName(bad.to_owned())),
            "{bad:?}"
        );
    }
    assert!(
        Refusal::BadSecretName("Agent_Keys".into())
            .to_string()
            .contains("portcullis.dev/secret \"Agent_Keys\" is not a valid Secret name")
    );
}

#[test]
fn the_pods_own_containers_may_not_have_the_secret_volume() {
    let s = InjectionSettings::default();
    let annotations = json!({ ANNOTATION_UPSTREAM_PORT: "8080", ANNOTATION_SECRET: "agent-keys" });
    for key in ["containers", "initContainers", "ephemeralContainers"] {
        for with_annotation in [true, false] {
            let a = if with_annotation {
                annotations.clone()
            } else {
                json!({ ANNOTATION_UPSTREAM_PORT: "8080" })
            };
            let mut mounting = pod(a, app(json!([])));
            let container = json!({
                "name": "reader", "image": "busybox",
                "volumeMounts": [{ "name": "portcullis-secret", "mountPath": "/keys" }],
            });
            match mounting["spec"][key].as_array_mut() {
                Some(list) => list.push(container),
                None => mounting["spec"][key] = json!([container]),
            }
            assert_eq!(
                mutate(&mounting, Scope::Namespace, &ns(), &s),
                Err(Refusal::VolumeMounted("portcullis-secret".into())),
                "{key} {with_annotation}"
            );
        }
    }
    // Nor declare a volume of that name.
    let mut declaring = pod(annotations.clone(), app(json!([])));
    declaring["spec"]["volumes"] =
        json!([{ "name": "portcullis-secret", "secret": { "secretName": "other" } }]);
    assert_eq!(
        mutate(&declaring, Scope::Namespace, &ns(), &s),
        Err(Refusal::VolumeConflict("portcullis-secret".into()))
    );
    // An injected pod whose app container mounts it afterwards (a copy written by hand).
    let mut injected = patched(&pod(annotations, app(json!([]))), Scope::Namespace, &s);
    injected["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "portcullis-secret", "mountPath": "/keys", "readOnly": true }]);
    assert_eq!(
        mutate(&injected, Scope::Namespace, &ns(), &s),
        Err(Refusal::VolumeMounted("portcullis-secret".into()))
    );
}
