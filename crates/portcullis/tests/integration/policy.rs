//! Policy behaviour through the running proxy: erroring policies deny, shadow mode forwards,
//! reloads swap in valid sets and keep the last good one otherwise.

use std::time::Duration;

use crate::harness::{Harness, REPORT, TRIAGE, admin_get, eventually_for, sample};

#[tokio::test]
async fn an_erroring_forbid_denies() {
    let h = Harness::builder()
        .policies(
            r#"
            @id("allow-all") permit (principal, action, resource);
            @id("overflowing-forbid") forbid (principal, action, resource)
            when { context.now * 100000000000000 > 0 };
            "#,
        )
        .start()
        .await;
    assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 403);
    assert!(h.upstream.requests().is_empty());
    let records = h.audit(1).await;
    assert_eq!(records[1]["decision"], "deny");
    assert!(
        records[1]["errors"][0]
            .as_str()
            .unwrap()
            .contains("overflow"),
        "{:?}",
        records[1]
    );
}

#[tokio::test]
async fn shadow_mode_forwards_and_records_the_denial() {
    let h = Harness::builder().shadow().start().await;
    assert_eq!(h.get(REPORT, "/api/orders/1").await.0, 200);
    assert_eq!(h.upstream.requests().len(), 1);
    let records = h.audit(1).await;
    assert_eq!(records[1]["decision"], "shadow_deny");
    assert_eq!(records[1]["mode"], "shadow");
    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"portcullis_decisions_total{action="GET",decision="shadow_deny"}"#
        ),
        1.0
    );
}

/// Waits until the proxy has counted `count` policy reloads with `result` (`success`,
/// `failure`); a large set in a debug build on a busy CI machine may take seconds to load.
async fn reloads_counted(h: &Harness, result: &str, count: f64) -> bool {
    let series = format!(r#"portcullis_policy_reloads_total{{result="{result}"}}"#);
    eventually_for(Duration::from_secs(30), async || {
        sample(&h.metrics().await, &series) == count
    })
    .await
}

#[tokio::test]
async fn reloads_apply_valid_sets_and_keep_the_last_good_one() {
    let h = Harness::builder()
        .policies(r#"@id("allow-all") permit (principal, action, resource);"#)
        .start()
        .await;
    let policy_file = h.dir.path().join("policies/test.cedar");
    assert_eq!(h.get(REPORT, "/x").await.0, 200);

    // A syntax error; then a file whose shape would overflow Cedar's parser (it recurses per
    // level) and abort the process, with every connection on it, were it parsed.
    let levels = 100_000;
    let too_deep = format!(
        r#"@id("deep") forbid (principal, action, resource) when {{ {}true{} }};"#,
        "(".repeat(levels),
        ")".repeat(levels)
    );
    for (failures, bad) in [(1.0, "permit (principal,".to_owned()), (2.0, too_deep)] {
        std::fs::write(&policy_file, bad).unwrap();
        assert!(reloads_counted(&h, "failure", failures).await);
        assert_eq!(
            h.get(REPORT, "/x").await.0,
            200,
            "the last good set stays in force"
        );
        assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    }

    std::fs::write(&policy_file, r#"@id("deny-report") forbid (principal == Agent::"spiffe://prod.example.org/ns/billing/sa/report-agent", action, resource); @id("allow-all") permit (principal, action, resource);"#).unwrap();
    assert!(reloads_counted(&h, "success", 1.0).await);
    // Each request is a new connection of an agent seen before: what its connections share
    // (its entity, its questions' entities) was built against the old set and is rebuilt.
    assert_eq!(h.get(REPORT, "/x").await.0, 403);
    assert_eq!(h.get(TRIAGE, "/x").await.0, 200);
}

/// `count` per-agent permits (a security team's policy per workload), ids prefixed `tag`.
fn per_agent_set(tag: &str, count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "@id(\"{tag}-{i}\")\npermit (principal == Agent::\"spiffe://prod.example.org/ns/team{i}/sa/agent\", action in Action::\"read\", resource is Route)\n  when {{ resource.path like \"/{tag}/*\" }};\n"
            )
        })
        .collect()
}

#[tokio::test]
async fn loading_a_large_set_gives_back_what_parsing_it_freed() {
    // Parsing and validating a set allocates far more than the compiled policies keep; glibc
    // keeps freed memory resident unless asked to give it back. The sidecar asks after the
    // start and after every reload: its resident set then sits well under its peak (without
    // asking, it stays at the peak: 58.3 MB of 58.3 here, where asking leaves 42.4).
    let mut spawned = Harness::builder()
        .policies(&per_agent_set("a", 3000))
        .spawn()
        .await;
    let (rss, peak) = (spawned.vm_rss_kb(), spawned.vm_hwm_kb());
    println!("3,000 policies: RSS {rss} kB after the start, peak {peak} kB");
    assert!(rss + peak / 8 < peak, "RSS {rss} kB, peak {peak} kB");

    let h = &spawned.harness;
    std::fs::write(
        h.dir.path().join("policies/test.cedar"),
        per_agent_set("b", 3000),
    )
    .unwrap();
    assert!(reloads_counted(h, "success", 1.0).await);
    let (rss, peak) = (spawned.vm_rss_kb(), spawned.vm_hwm_kb());
    println!("after reloading 3,000 others: RSS {rss} kB, peak {peak} kB");
    assert!(rss + peak / 8 < peak, "RSS {rss} kB, peak {peak} kB");
    spawned.terminate();
    assert_eq!(spawned.wait(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn admin_endpoints() {
    let h = Harness::start().await;
    assert_eq!(admin_get(h.admin, "/healthz").await.0, 200);
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    assert_eq!(admin_get(h.admin, "/nope").await.0, 404);
    let metrics = h.metrics().await;
    for name in [
        "portcullis_certificate_expiry_timestamp_seconds{kind=\"serving\"",
        "portcullis_certificate_expiry_timestamp_seconds{kind=\"bundle:prod.example.org\"",
        "portcullis_policies_loaded",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}
