//! Prometheus metrics. Names and labels are a contract with dashboards and alerts
//! (`helm/portcullis/dashboards/`); label values are always from a bounded set.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};

use portcullis_core::{Action, Decision};

use portcullis_identity::{CertificateExpiry, ReloadKind, ReloadObserver};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

mod histogram;

pub use histogram::ShardedHistogram;

/// Every metric Portcullis exports, registered in one private registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    /// Observed on the request path: sharded per thread (see [`ShardedHistogram`]).
    pub decision_duration: ShardedHistogram,
    pub request_duration: ShardedHistogram,
    pub request_rejections: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub user_token_rejections: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub certificate_expiry: GaugeVec,
    pub certificate_reloads: IntCounterVec,
    /// The label sets of `certificate_expiry` now exported, so a rotated-away certificate's
    /// series is removed rather than left behind.
    certificate_labels: Arc<std::sync::Mutex<Vec<[String; 3]>>>,
    pub audit_write_failures: IntCounter,
    pub connections_active: IntGauge,
    pub policy_count: Gauge,
    pub agents_seen: IntGauge,
    pub standing_credentials: IntCounterVec,
    /// `portcullis_rate_limited_total{per}`: requests refused by a `limits.rate` bucket.
    pub rate_limited: IntCounterVec,
    /// `portcullis_approval_grants_total{result}`: grants presented (`approved`, `replayed`,
    /// `invalid`, `other_call`).
    pub approval_grants: IntCounterVec,
    /// `portcullis_token_exchanges_total{result}`: RFC 8693 exchanges (`ok`, `cached`,
    /// `failed`).
    pub token_exchanges: IntCounterVec,
    /// `portcullis_shadow_disagreements_total{action,kind}`: the shadow set (`policy.shadow_dir`)
    /// would have decided otherwise (kind `would_allow` or `would_deny`).
    pub shadow_disagreements: IntCounterVec,
    /// Decisions per agent, behind a cardinality cap (`telemetry.max_agent_labels`).
    pub agent_decisions: IntCounterVec,
    agent_labels: Arc<RwLock<HashSet<String>>>,
    max_agent_labels: usize,
    /// `decisions` children, resolved on first use: a label lookup hashes every label value
    /// under a lock, once per request; a resolved handle is one atomic add.
    decision_handles: Arc<DecisionHandles>,
    /// `token_exchanges` children, resolved on first use like `decision_handles`.
    exchange_handles: Arc<[OnceLock<IntCounter>; 3]>,
}

/// The `result` of a token exchange (`portcullis_token_exchanges_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeResult {
    /// Exchanged for this call.
    Ok,
    /// A credential exchanged earlier (or by a concurrent call) was used.
    Cached,
    Failed,
}

impl ExchangeResult {
    pub fn name(self) -> &'static str {
        match self {
            ExchangeResult::Ok => "ok",
            ExchangeResult::Cached => "cached",
            ExchangeResult::Failed => "failed",
        }
    }
}

const DECISIONS: [Decision; 5] = [
    Decision::Allow,
    Decision::Deny,
    Decision::ShadowDeny,
    Decision::ApprovalRequired,
    Decision::Approved,
];

/// One lazily resolved counter per (decision, action). Series still appear only once used.
#[derive(Debug, Default)]
struct DecisionHandles([[OnceLock<IntCounter>; Action::ALL.len()]; DECISIONS.len()]);

/// Decisions of one agent (`portcullis_agent_decisions_total`), resolved once per connection
/// on its first decision instead of taking the label-cap lock on every request.
#[derive(Debug)]
pub struct AgentDecisions {
    metrics: Metrics,
    agent: String,
    counters: [OnceLock<IntCounter>; DECISIONS.len()],
}

impl AgentDecisions {
    pub fn observe(&self, decision: Decision) {
        let Some(index) = DECISIONS.iter().position(|d| *d == decision) else {
            return;
        };
        self.counters[index]
            .get_or_init(|| {
                self.metrics
                    .agent_decision_counter(&self.agent, decision.name())
            })
            .inc();
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_agent_label_cap(100)
    }

    #[allow(
        clippy::expect_used,
        reason = "metric definitions are static and valid"
    )]
    pub fn with_agent_label_cap(max_agent_labels: usize) -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = ShardedHistogram::new(name, help, buckets).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let shadow_disagreements = counter_vec(
            "portcullis_shadow_disagreements_total",
            "Requests the shadow policy set would have decided otherwise, by Cedar action and kind (would_allow, would_deny).",
            &["action", "kind"],
        );
        let decisions = counter_vec(
            "portcullis_decisions_total",
            "Authorization decisions, by outcome and Cedar action.",
            &["decision", "action"],
        );
        // Decisions take microseconds; requests take milliseconds to seconds.
        let decision_duration = histogram(
            "portcullis_decision_duration_seconds",
            "Time to classify and evaluate one request against the policy set.",
            vec![
                5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
            ],
        );
        let request_duration = histogram(
            "portcullis_request_duration_seconds",
            "Time from request head to the end of the response, as seen by the proxy.",
            vec![
                1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ],
        );
        let request_rejections = counter_vec(
            "portcullis_request_rejections_total",
            "Requests refused before or instead of forwarding, by reason.",
            &["reason"],
        );
        let upstream_errors = counter_vec(
            "portcullis_upstream_errors_total",
            "Failures reaching the upstream application, by reason.",
            &["reason"],
        );
        let tls_handshake_failures = counter_vec(
            "portcullis_tls_handshake_failures_total",
            "mTLS handshakes that failed, by reason.",
            &["reason"],
        );
        let user_token_rejections = counter_vec(
            "portcullis_user_token_rejections_total",
            "User tokens rejected, by reason.",
            &["reason"],
        );
        let policy_reloads = counter_vec(
            "portcullis_policy_reloads_total",
            "Policy reload attempts that found changed files, by result.",
            &["result"],
        );
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "portcullis_certificate_expiry_timestamp_seconds",
                "notAfter of each loaded certificate (serving SVID and trust bundle roots).",
            ),
            &["kind", "subject", "spiffe_id"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(certificate_expiry.clone()))
            .expect("unique metric");
        let certificate_reloads = counter_vec(
            "portcullis_certificate_reloads_total",
            "Changed serving certificates and trust bundles seen, by kind (serving, bundle) and result.",
            &["kind", "result"],
        );
        let audit_write_failures = IntCounter::new(
            "portcullis_audit_write_failures_total",
            "Audit records that could not be written; requests fail closed after one.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(audit_write_failures.clone()))
            .expect("unique metric");
        let connections_active =
            IntGauge::new("portcullis_connections_active", "Open agent connections.")
                .expect("valid metric");
        registry
            .register(Box::new(connections_active.clone()))
            .expect("unique metric");
        let policy_count = Gauge::new(
            "portcullis_policies_loaded",
            "Number of policies in the set in force.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(policy_count.clone()))
            .expect("unique metric");
        let agents_seen = IntGauge::new(
            "portcullis_agents_seen",
            "Distinct agent identities seen since start (see /inventory).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(agents_seen.clone()))
            .expect("unique metric");
        let standing_credentials = counter_vec(
            "portcullis_standing_credentials_total",
            "Requests carrying a long-lived credential header (removed, flagged in audit).",
            &["header"],
        );
        let rate_limited = counter_vec(
            "portcullis_rate_limited_total",
            "Requests refused with 429 by a limits.rate token bucket, by what the bucket is kept per (agent, user, tool).",
            &["per"],
        );
        let approval_grants = counter_vec(
            "portcullis_approval_grants_total",
            "Approval grants presented, by result (approved, replayed, invalid, other_call).",
            &["result"],
        );
        let token_exchanges = counter_vec(
            "portcullis_token_exchanges_total",
            "Upstream credentials by RFC 8693 token exchange, by result (ok, cached, failed).",
            &["result"],
        );
        let agent_decisions = counter_vec(
            "portcullis_agent_decisions_total",
            "Decisions per agent SPIFFE ID; agents beyond the label cap are counted as \"other\".",
            &["agent", "decision"],
        );
        // CPU, RSS, open file descriptors, start time (Linux /proc).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            shadow_disagreements,
            agents_seen,
            standing_credentials,
            rate_limited,
            approval_grants,
            token_exchanges,
            agent_decisions,
            agent_labels: Arc::new(RwLock::new(HashSet::new())),
            max_agent_labels,
            decision_handles: Arc::default(),
            exchange_handles: Arc::default(),
            decisions,
            decision_duration,
            request_duration,
            request_rejections,
            upstream_errors,
            tls_handshake_failures,
            user_token_rejections,
            policy_reloads,
            certificate_expiry,
            certificate_reloads,
            certificate_labels: Arc::default(),
            audit_write_failures,
            connections_active,
            policy_count,
        }
    }

    /// Counts one token exchange by its result.
    pub fn count_token_exchange(&self, result: ExchangeResult) {
        self.exchange_handles[result as usize]
            .get_or_init(|| self.token_exchanges.with_label_values(&[result.name()]))
            .inc();
    }

    /// Counts one decision in `portcullis_decisions_total`.
    pub fn observe_decision(&self, decision: Decision, action: Action) {
        let row = DECISIONS.iter().position(|d| *d == decision);
        let column = Action::ALL.iter().position(|a| *a == action);
        let (Some(row), Some(column)) = (row, column) else {
            return;
        };
        self.decision_handles.0[row][column]
            .get_or_init(|| {
                self.decisions
                    .with_label_values(&[decision.name(), action.name()])
            })
            .inc();
    }

    /// Per-agent decision counters for one connection's agent.
    pub fn agent_decisions(&self, agent: &str) -> AgentDecisions {
        AgentDecisions {
            metrics: self.clone(),
            agent: agent.to_owned(),
            counters: Default::default(),
        }
    }

    /// Counts a decision for `agent`, under its own label while fewer than the cap have been
    /// given one, as `other` after: label cardinality stays bounded whatever connects.
    pub fn observe_agent_decision(&self, agent: &str, decision: &str) {
        self.agent_decision_counter(agent, decision).inc();
    }

    fn agent_decision_counter(&self, agent: &str, decision: &str) -> IntCounter {
        // Every request reads; only an agent's first request (while under the cap) writes.
        let known = self
            .agent_labels
            .read()
            .map(|labels| (labels.contains(agent), labels.len()));
        let label = match known {
            Ok((true, _)) => agent,
            Ok((false, len)) if len < self.max_agent_labels => match self.agent_labels.write() {
                Ok(labels) if labels.contains(agent) => agent,
                Ok(mut labels) if labels.len() < self.max_agent_labels => {
                    labels.insert(agent.to_owned());
                    agent
                }
                _ => "other",
            },
            _ => "other",
        };
        self.agent_decisions.with_label_values(&[label, decision])
    }

    /// Makes `portcullis_certificate_expiry_timestamp_seconds` describe exactly `certificates`
    /// (the identity in force): new series are set, series of replaced certificates removed.
    pub fn set_certificates(&self, certificates: &[CertificateExpiry]) {
        let Ok(mut exported) = self.certificate_labels.lock() else {
            return;
        };
        let labels: Vec<[String; 3]> = certificates
            .iter()
            .map(|c| [c.kind.clone(), c.subject.clone(), c.spiffe_id.clone()])
            .collect();
        for old in exported.iter().filter(|old| !labels.contains(old)) {
            let [kind, subject, id] = old;
            let _ = self.certificate_expiry.remove_label_values(&[
                kind.as_str(),
                subject.as_str(),
                id.as_str(),
            ]);
        }
        for (label, certificate) in labels.iter().zip(certificates) {
            let [kind, subject, id] = label;
            self.certificate_expiry
                .with_label_values(&[kind.as_str(), subject.as_str(), id.as_str()])
                .set(certificate.not_after as f64);
        }
        *exported = labels;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics; an empty page would show it.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl ReloadObserver for Metrics {
    fn reloaded(&self, kind: ReloadKind, success: bool) {
        self.certificate_reloads
            .with_label_values(&[kind.label(), if success { "success" } else { "failure" }])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn agents_beyond_the_label_cap_are_counted_as_other() {
        let metrics = Metrics::with_agent_label_cap(2);
        for agent in [
            "spiffe://t/a",
            "spiffe://t/b",
            "spiffe://t/c",
            "spiffe://t/a",
        ] {
            metrics.observe_agent_decision(agent, "allow");
        }
        let count = |agent: &str| {
            metrics
                .agent_decisions
                .with_label_values(&[agent, "allow"])
                .get()
        };
        assert_eq!(count("spiffe://t/a"), 2);
        assert_eq!(count("spiffe://t/b"), 1);
        assert_eq!(count("other"), 1);
        assert_eq!(count("spiffe://t/c"), 0);
    }
}
