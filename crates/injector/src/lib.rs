//! The Portcullis injection webhook: a Kubernetes mutating admission webhook that adds the
//! `portcullis` sidecar to pods that opt in (namespace label `portcullis.dev/inject=enabled`
//! or pod annotation `portcullis.dev/inject: "true"`).
//!
//! The decision is a pure function, [`mutate`], from a pod (JSON) and [`InjectionSettings`]
//! to a JSON patch, a skip, or a [`Refusal`]; [`review`] wraps it in AdmissionReview
//! (admission.k8s.io/v1) handling; [`serve`] is the thin HTTPS front (rustls, hyper) that the
//! `portcullis inject-webhook` subcommand runs with a [`WebhookConfig`].
//!
//! It does not talk to the Kubernetes API (no client, no RBAC needed), does not check that
//! the policy ConfigMap or the SPIFFE CSI driver exist, and does not install itself: the Helm
//! chart (`helm/portcullis`) creates the MutatingWebhookConfiguration and its certificate.

mod config;
mod mutate;
mod review;
mod server;

pub use config::{
    ConfigError, ConfigErrors, InjectionSettings, PolicyMode, SvidSource, TlsFiles, WebhookConfig,
};
pub use mutate::{
    ADMIN_PORT_NAME, ANNOTATION_INJECT, ANNOTATION_POLICY_CONFIGMAP, ANNOTATION_POLICY_MODE,
    ANNOTATION_RENDERED_CONFIG, ANNOTATION_RENDERED_HELPER_CONFIG, ANNOTATION_TRUST_DOMAIN,
    ANNOTATION_UPSTREAM_PORT, HELPER_NAME, LABEL_INJECTED, MTLS_PORT_NAME, Mutation, Refusal,
    SIDECAR_NAME, Scope, SkipReason, mutate, render_config,
};
pub use review::{Answer, Verdict, review};
pub use server::{PATH_NAMESPACE, PATH_POD, ServeError, Server, serve};
