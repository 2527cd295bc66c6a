//! Logs to stderr (text or JSON) and the Prometheus recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::settings::{BaseSettings, LogFormat};

/// Install the log subscriber for the process. A second call (tests start several services in
/// one process) keeps the first subscriber.
pub fn init_logging(settings: &BaseSettings) {
    let filter = log_filter(&settings.log_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Libraries whose debug lines carry what must not be logged: tokio-postgres prints every
/// statement's parameters (token hashes, a check's request headers). Kept at warn unless
/// `LOG_LEVEL` names them itself.
const QUIET: &[&str] = &["tokio_postgres"];

/// `LOG_LEVEL` as a filter (`info` when it does not parse), with [`QUIET`]'s libraries held
/// at warn.
pub fn log_filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    for quiet in QUIET.iter().filter(|q| !level.contains(**q)) {
        if let Ok(directive) = format!("{quiet}=warn").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// The process's Prometheus recorder, installed on first use. The recorder is process-wide by
/// the nature of the `metrics` facade; everything else is passed explicitly.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only when another recorder is installed already; ours then renders empty,
            // which /metrics makes visible rather than hiding.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
