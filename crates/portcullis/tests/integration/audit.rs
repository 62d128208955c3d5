//! The audit trail: one record per request whatever the outcome, hash-chained.

use std::time::Duration;

use bytes::Bytes;
use portcullis_test_support::client::{HttpVersion, request};
use sha2::{Digest, Sha256};

use crate::harness::{HOST, Harness, REPORT, TRIAGE, admin_get, eventually_for, portcullis};

#[tokio::test]
async fn every_request_is_recorded_once_in_an_unbroken_chain() {
    let h = Harness::start().await;
    assert_eq!(h.get(TRIAGE, "/api/orders/17").await.0, 200);
    assert_eq!(h.get(REPORT, "/api/orders/17").await.0, 403);
    assert_eq!(h.get(TRIAGE, "/admin/users").await.0, 403);
    assert_eq!(h.get(TRIAGE, "/a/../admin").await.0, 400);

    let records = h.audit(4).await;
    assert_eq!(records.len(), 5, "{records:#?}");
    assert_eq!(records[0]["type"], "start");

    let allowed = &records[1];
    assert_eq!(allowed["agent"], TRIAGE);
    assert_eq!(allowed["action"], "GET");
    assert_eq!(allowed["resource"]["type"], "Route");
    assert_eq!(allowed["resource"]["id"], "/api/orders/17");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["policies"]["agent"][0], "support-agents-read");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["completed"], true);
    assert_eq!(allowed["mode"], "enforce");
    assert_eq!(allowed["policy_hash"].as_str().unwrap().len(), 64);
    assert!(allowed["decision_us"].is_u64());

    assert_eq!(records[2]["decision"], "deny");
    assert!(
        records[2]["policies"]["agent"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(records[3]["policies"]["agent"][0], "no-agent-admin");
    assert_eq!(records[4]["reason"], "ambiguous_path");
    assert_eq!(records[4]["decision"], serde_json::Value::Null);

    // Each line names the SHA-256 of the line before it.
    let text = std::fs::read_to_string(h.audit_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let prev: String = hex(&Sha256::digest(pair[0].as_bytes()));
        let record: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
        assert_eq!(record["prev_hash"], prev);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Audit capacity is not concurrency capacity: 1,100 requests waiting on a slow upstream
/// (more than the audit queue holds) do not make another caller's request wait for, or fail
/// with, `audit_unavailable`.
#[tokio::test]
async fn slow_requests_hold_no_audit_capacity() {
    const SLOW: usize = 1_100;
    // The in-flight caps (their own test is in `abuse`) are raised so that only audit
    // capacity is in question here.
    let h = Harness::builder()
        .yaml("limits:\n  max_inflight_per_agent: 2000\n  max_inflight: 4000\n")
        .start()
        .await;
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http2);
    let mut connections = Vec::new();
    let mut in_flight = Vec::new();
    // 100 streams per connection: the default `limits.max_h2_streams`.
    for _ in 0..SLOW / 100 {
        let connection = caller.connect(h.addr).await.unwrap();
        let streams = connection.streams().unwrap();
        for _ in 0..100 {
            let mut streams = streams.clone();
            in_flight.push(tokio::spawn(async move {
                streams
                    .send(request("GET", HOST, "/slow", Bytes::new()))
                    .await
            }));
        }
        connections.push(connection);
    }
    // Every slow request was admitted, decided and forwarded: the upstream holds them all.
    for _ in 0..6_000 {
        if h.upstream.requests().len() >= SLOW {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.upstream.requests().len(), SLOW);

    let (status, body) = h.get(TRIAGE, "/api/orders/1").await;
    assert_eq!(status, 200, "{body:?}");
    let records = h.audit(1).await;
    assert_eq!(records[1]["path"], "/api/orders/1");
    assert_eq!(records[1]["status"], 200);
    for request in in_flight {
        request.abort();
    }
}

/// Starts the proxy again from the harness's config file, as `portcullis run` would after
/// the last process stopped (the config's listeners must be on port 0).
async fn restart(h: &Harness) -> portcullis_proxy::Running {
    let config = portcullis::config::Config::load(&h.dir.path().join("config.yaml")).unwrap();
    portcullis_proxy::start(config.into_options().await.unwrap())
        .await
        .unwrap()
}

/// `count` allowed requests to `running`, each to its own path under `prefix`.
async fn serve(h: &Harness, running: &portcullis_proxy::Running, prefix: &str, count: usize) {
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    for i in 0..count {
        let path = format!("/api/orders/{prefix}-{i}");
        let response = caller
            .call(
                running.local_addr(),
                request("GET", HOST, &path, Bytes::new()),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// `portcullis audit keygen` into `dir`: the private and public key files.
fn keygen(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (private, public) = (dir.join("sign.pem"), dir.join("verify.pem"));
    let (code, _, err) = portcullis(&[
        "audit",
        "keygen",
        "--private",
        private.to_str().unwrap(),
        "--public",
        public.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    (private, public)
}

/// A process that died mid-write left a torn last line, here one that splits a UTF-8
/// character; the next process links its start to it. `verify` names the tear and goes on
/// through the next run, and without that next start the torn line is a break at its line.
#[tokio::test]
async fn a_torn_line_is_reported_and_the_runs_after_it_are_verified() {
    let mut h = Harness::start().await;
    let first = h._running.take().unwrap();
    serve(&h, &first, "first", 3).await;
    first.shutdown(Duration::from_secs(2)).await;
    let path = h.audit_path();
    let before = std::fs::read(&path).unwrap();
    // The last record again, cut short in the middle of a two-byte character.
    let last = before[..before.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    let mut torn = last[..last.len() / 2].to_vec();
    torn.extend_from_slice("\"user\":{\"sub\":\"jos".as_bytes());
    torn.push("é".as_bytes()[0]);
    let mut with_tear = before.clone();
    with_tear.extend_from_slice(&torn);
    std::fs::write(&path, &with_tear).unwrap();
    let torn_line = before.iter().filter(|&&b| b == b'\n').count() + 1;

    let second = restart(&h).await;
    serve(&h, &second, "second", 2).await;
    second.shutdown(Duration::from_secs(2)).await;

    let file = path.to_str().unwrap();
    let (code, out, err) = portcullis(&["audit", "verify", file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok: 5 records in an unbroken chain (2 process starts)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{file}:{torn_line}: torn line")) && out.contains("continues"),
        "{out}"
    );

    // The trail as it was right after the crash: nothing links to the torn line yet.
    std::fs::write(&path, &with_tear).unwrap();
    let (code, out, err) = portcullis(&["audit", "verify", file]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("{file}:{torn_line}: chain broken: not UTF-8")),
        "{err}"
    );
}

/// A process killed (SIGKILL) after its records were written leaves them after its last
/// checkpoint. The next run's checkpoints do not vouch for them: that run links its start to
/// whatever the file held, so `verify --key` reports them as the first run's unsigned lines.
#[tokio::test]
async fn a_crashed_run_keeps_its_unsigned_tail_after_a_later_checkpoint() {
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keygen(keys.path());
    let mut spawned = Harness::builder()
        .audit_yaml(&format!(
            "  sink: audit.jsonl\n  signing_key: {}\n  checkpoint_interval: 1h\n",
            private.display()
        ))
        .spawn()
        .await;
    for i in 0..3 {
        let path = format!("/api/orders/crashed-{i}");
        assert_eq!(spawned.harness.get(TRIAGE, &path).await.0, 200);
    }
    assert_eq!(spawned.harness.audit(3).await.len(), 4);
    spawned.child.kill().unwrap();
    spawned.child.wait().unwrap();
    let h = &spawned.harness;
    let run_1_started = crate::harness::read_audit(&h.audit_path())[0]["time"]
        .as_str()
        .unwrap()
        .to_owned();

    // The next run, in this process, on ports of its own; it stops cleanly (sealed).
    let config_path = h.dir.path().join("config.yaml");
    let config: String = std::fs::read_to_string(&config_path)
        .unwrap()
        .lines()
        .map(|line| match line.split_once(": ") {
            Some(("listen" | "admin_listen", _)) => {
                format!("{}: 127.0.0.1:0\n", line.split_once(':').unwrap().0)
            }
            _ => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&config_path, config).unwrap();
    let second = restart(h).await;
    serve(h, &second, "second", 2).await;
    second.shutdown(Duration::from_secs(2)).await;

    let file = h.audit_path();
    let (code, out, err) = portcullis(&[
        "audit",
        "verify",
        "--key",
        public.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 5 records"), "{out}");
    // Its start line and three records.
    assert!(
        out.contains(&format!(
            "run 1 (started {run_1_started}): 4 lines after its last checkpoint"
        )),
        "{out}"
    );
    assert!(out.contains("unsigned tail: 0 lines"), "{out}");
}

/// Each run on stdout (here a named pipe, read by a log pipeline that appends what it reads
/// to one file) begins at genesis: `verify` accepts the runs and lists each with its start.
#[tokio::test]
async fn a_stdout_trail_lists_its_runs() {
    let pipes = tempfile::tempdir().unwrap();
    let fifo = pipes.path().join("audit.pipe");
    let captured = pipes.path().join("captured.jsonl");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // The log pipeline: appends everything a run writes, until it closes the pipe.
    let pipeline = |fifo: std::path::PathBuf, captured: std::path::PathBuf| {
        std::thread::spawn(move || {
            let mut pipe = std::fs::File::open(fifo).unwrap();
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(captured)
                .unwrap();
            std::io::copy(&mut pipe, &mut out).unwrap();
        })
    };
    let reader = pipeline(fifo.clone(), captured.clone());
    let mut h = Harness::builder()
        .audit_yaml(&format!("  sink: {}\n", fifo.display()))
        .start()
        .await;
    let first = h._running.take().unwrap();
    serve(&h, &first, "first", 2).await;
    first.shutdown(Duration::from_secs(2)).await;
    reader.join().unwrap();
    let reader = pipeline(fifo.clone(), captured.clone());
    let second = restart(&h).await;
    serve(&h, &second, "second", 3).await;
    second.shutdown(Duration::from_secs(2)).await;
    reader.join().unwrap();

    let starts: Vec<String> = crate::harness::read_audit(&captured)
        .iter()
        .filter(|line| line["type"] == "start")
        .map(|start| {
            assert_eq!(start["sink"], "stdout");
            assert_eq!(start["prev_hash"], "genesis");
            start["time"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(starts.len(), 2);
    let (code, out, err) = portcullis(&["audit", "verify", captured.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 5 records"), "{out}");
    assert!(out.contains("2 runs written to stdout"), "{out}");
    assert!(
        out.contains(&format!("run 1 started {}: 2 records", starts[0])),
        "{out}"
    );
    assert!(
        out.contains(&format!("run 2 started {}: 3 records", starts[1])),
        "{out}"
    );
}

/// A sink that stops taking bytes without failing (a reader that stopped reading, a hung
/// mount) leaves the writer blocked in `write`: with records waiting past the admission
/// timeout `/readyz` answers 503 naming the audit sink, and 200 again once the writes go
/// through.
#[tokio::test]
async fn a_stuck_audit_sink_makes_the_pod_not_ready_until_it_moves_again() {
    use std::io::Read as _;
    let pipes = tempfile::tempdir().unwrap();
    let fifo = pipes.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // The reader: takes the first bytes, then stops reading (keeping the pipe open) until
    // told to read on.
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let reader_path = fifo.clone();
    std::thread::spawn(move || {
        let mut pipe = std::fs::File::open(reader_path).unwrap();
        let mut first = [0u8; 4096];
        let _ = pipe.read(&mut first);
        let _ = resumed.recv();
        let mut rest = [0u8; 64 * 1024];
        while pipe.read(&mut rest).is_ok_and(|n| n > 0) {}
    });
    let h = Harness::builder()
        .audit_yaml(&format!("  sink: {}\n", fifo.display()))
        .start()
        .await;
    assert_eq!(admin_get(h.admin, "/readyz").await.0, 200);
    // More records than the pipe holds (64 KiB): the writer blocks, and requests, still
    // admitted while the queue has room, are served meanwhile.
    let caller = h.caller(&h.svid(TRIAGE), HttpVersion::Http1);
    let long = format!("/api/orders/{}", "7".repeat(1000));
    for _ in 0..150 {
        let response = caller
            .call(h.addr, request("GET", HOST, &long, Bytes::new()))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut body = String::new();
    let not_ready = eventually_for(Duration::from_secs(60), async || {
        let (status, text) = admin_get(h.admin, "/readyz").await;
        body = String::from_utf8_lossy(&text).into_owned();
        status == 503
    })
    .await;
    assert!(not_ready, "{body}");
    assert!(body.contains("audit sink stuck"), "{body}");

    resume.send(()).unwrap();
    let ready = eventually_for(Duration::from_secs(30), async || {
        admin_get(h.admin, "/readyz").await.0 == 200
    })
    .await;
    assert!(ready);
    assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
}

/// A trail with records and no checkpoint the key signed is vouched for by nothing: anyone
/// with the files could have written every line of it.
#[tokio::test]
async fn with_a_key_a_trail_without_any_signed_checkpoint_is_not_vouched_for() {
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = keygen(keys.path());
    // The sidecar signs nothing here (no signing_key): its trail is one anybody could make.
    let h = Harness::start().await;
    assert_eq!(h.get(TRIAGE, "/api/orders/1").await.0, 200);
    h.audit(1).await;
    let file = h.audit_path();
    let (code, out, err) = portcullis(&["audit", "verify", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = portcullis(&[
        "audit",
        "verify",
        "--key",
        public.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("not vouched for"), "{err}");
}
