//! Logs to stderr (text or JSON) and the Prometheus recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::settings::{BaseSettings, LogFormat};

/// Install the log subscriber for the process: stderr, or `LOG_FILE` (reopened on SIGHUP, see
/// [`reopen_on_hangup`]). A second call (tests start several services in one process) keeps
/// the first subscriber. Fails only when `LOG_FILE` cannot be opened.
pub fn init_logging(settings: &BaseSettings) -> std::io::Result<()> {
    let filter = log_filter(&settings.log_level);
    let writer = match &settings.log_file {
        Some(path) => {
            let file = LogFile::open(path)?;
            let _ = LOG_FILE.set(file.clone());
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(file)
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let ansi = settings.log_file.is_none() && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// The process's log file, when `LOG_FILE` is set.
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

/// A log file that can be opened again at its path: logrotate renames it and sends SIGHUP,
/// and the lines after go to a new file of that name. Each event is one `write` (the
/// formatter writes a whole line at once) under the lock, so lines never interleave.
#[derive(Clone)]
pub struct LogFile {
    path: std::path::PathBuf,
    file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
}

impl LogFile {
    /// Open (create, append) `path`; a new file is made mode 0640.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: std::sync::Arc::new(std::sync::Mutex::new(Self::open_file(path)?)),
        })
    }

    fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
    }

    /// Open the path again; on failure the old file is kept (and the error returned).
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = Self::open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogFile;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Reopen `LOG_FILE` on every SIGHUP, for as long as the process lives (nothing to do
/// without it; SIGHUP is then still caught, rather than ending the process).
pub async fn reopen_on_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: LOG_FILE is not reopened on rotation");
        return;
    };
    while hangups.recv().await.is_some() {
        match LOG_FILE.get().map(LogFile::reopen) {
            Some(Ok(())) => tracing::info!("log file reopened"),
            Some(Err(error)) => {
                tracing::error!(%error, "cannot reopen the log file; writing on to the old one")
            }
            None => tracing::debug!("SIGHUP without LOG_FILE: nothing to reopen"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::LogFile;
    use std::io::Write;

    #[test]
    fn a_renamed_log_file_is_replaced_by_a_new_one_on_reopen() {
        let dir = std::env::temp_dir().join(format!("cp-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("service.log");
        let mut log = LogFile::open(&path).unwrap();
        log.write_all(b"before\n").unwrap();
        std::fs::rename(&path, dir.join("service.log.1")).unwrap();
        log.write_all(b"still the old file\n").unwrap();
        log.reopen().unwrap();
        log.write_all(b"after\n").unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("service.log.1"), "before\nstill the old file\n");
        assert_eq!(read("service.log"), "after\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // A path that cannot be opened keeps the old file.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(log.reopen().is_err());
        log.write_all(b"into the unlinked file, no panic\n")
            .unwrap();
    }
}
