//! AdmissionReview decoding and answering: always an AdmissionReview back, never a panic.
//! The cluster is an empty in-memory one (no namespace labels, no ConfigMaps) and the config
//! validator is the sidecar's own, as the webhook runs it.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use portcullis_injector::{Admission, InjectionSettings, Scope, StaticCluster, review};

static ADMISSION: LazyLock<Admission> = LazyLock::new(|| Admission {
    settings: InjectionSettings::default(),
    cluster: Arc::new(StaticCluster::default()),
    validate: portcullis::webhook::validator(),
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
});

fuzz_target!(|body: &[u8]| {
    RUNTIME.block_on(async {
        let _ = review(body, Scope::Namespace, &ADMISSION).await;
        let _ = review(body, Scope::Pod, &ADMISSION).await;
    });
});
