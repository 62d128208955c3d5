//! The Portcullis injection webhook: a Kubernetes mutating admission webhook that adds the
//! `portcullis` sidecar to pods that opt in (namespace label `portcullis.dev/inject=enabled`
//! or pod annotation `portcullis.dev/inject: "true"`).
//!
//! The decision is a pure function, [`mutate`], from a pod (JSON) and [`InjectionSettings`]
//! to a JSON patch, a skip, or a [`Refusal`]; [`review`] wraps it in AdmissionReview
//! (admission.k8s.io/v1) handling; [`serve`] is the thin HTTPS front (rustls, hyper) that the
//! `portcullis inject-webhook` subcommand runs with a [`WebhookConfig`].
//!
//! It reads two things from the Kubernetes API ([`kube`]): the pod's namespace (opt-out
//! allowed? a config ConfigMap named?) and the config ConfigMap a pod uses, which it validates
//! with the sidecar's own config loader (a [`ConfigValidator`] handed in by the `portcullis`
//! binary) before admitting the pod. It does not check that the policy ConfigMap or the SPIFFE
//! CSI driver exist, and does not install itself: the Helm chart (`helm/portcullis`) creates
//! the MutatingWebhookConfiguration, its certificate and the read-only RBAC.

mod config;
pub mod kube;
mod mutate;
mod review;
mod server;

pub use config::{
    ApiSettings, ConfigError, ConfigErrors, InjectionSettings, PolicyMode, SvidSource, TlsFiles,
    WebhookConfig,
};
pub use kube::{ApiServer, Cluster, NamespaceInfo, StaticCluster};
pub use mutate::{
    ADMIN_PORT_NAME, ANNOTATION_ALLOW_OPT_OUT, ANNOTATION_CONFIG, ANNOTATION_INJECT,
    ANNOTATION_POLICY_CONFIGMAP, ANNOTATION_POLICY_MODE, ANNOTATION_RENDERED_HELPER_CONFIG,
    ANNOTATION_SECRET, ANNOTATION_TRUST_DOMAIN, ANNOTATION_UPSTREAM_PORT, CONFIG_DIR,
    CSI_DRIVER_SPIFFE, CSI_DRIVER_SPIRE, ConfigSource, HELPER_NAME, Injection, LABEL_INJECTED,
    MTLS_PORT_NAME, Mutation, Refusal, SECRET_DIR, SIDECAR_NAME, Scope, SkipReason, mutate,
    render_overrides,
};
pub use review::{Admission, Answer, ConfigValidator, Verdict, review};
pub use server::{PATH_NAMESPACE, PATH_POD, ServeError, Server, serve};
