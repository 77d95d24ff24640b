//! Tracing set-up and the Prometheus recorder (installed once per process).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Initialise the global tracing subscriber (`text` or `json`), filtered by `RUST_LOG`.
pub fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to standard error: standard output is for what a command prints
    // (`whittle keys create` prints the new key, `whittle openapi` the document).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus handle; the first call installs the recorder.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 1800.0,
                ])
                .expect("static bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding program); then
            // our handle still renders whatever it records, which is nothing — acceptable.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            handle
        })
        .clone()
}

/// The `# HELP` line of every metric the service records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "whittle_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "whittle_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request (to the response head), by method and route template."
    );
    describe_counter!(
        "whittle_jobs_submitted_total",
        "Jobs accepted by POST /v1/jobs."
    );
    describe_gauge!(
        "whittle_jobs",
        "Jobs in each state, over every process sharing the database (read at scrape time)."
    );
    describe_gauge!(
        "whittle_queue_oldest_queued_seconds",
        Unit::Seconds,
        "Age of the oldest queued job (0 when none is queued; read at scrape time)."
    );
    describe_counter!(
        "whittle_job_attempts_total",
        "Job attempts this process finished, by outcome (succeeded, failed, cancelled, queued for a retry)."
    );
    describe_histogram!(
        "whittle_job_duration_seconds",
        Unit::Seconds,
        "Wall time of a job attempt in this process, by outcome."
    );
    describe_histogram!(
        "whittle_step_duration_seconds",
        Unit::Seconds,
        "Wall time of one pipeline step, by op."
    );
    describe_counter!(
        "whittle_job_rescues_total",
        "Jobs whose lease expired and that this process put back in the queue (or failed), by resulting state."
    );
}
