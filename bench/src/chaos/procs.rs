//! The run's service processes (real binaries, started, SIGKILLed, SIGSTOPped and started
//! again) and the two small TCP pieces in front of them: the front door every client goes
//! through (it connects to whichever gateway answers) and the recording proxies in front of
//! each HAProxy Runtime API, which note every `set server … state …` that passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::verify::SetCommand;
use super::Ledger;

/// A service binary run as a process of its own.
pub struct Service {
    /// `gateway-1`, `agent-probe`, …
    pub name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// Its `/readyz`.
    pub ready_url: String,
    child: Option<Child>,
    pub paused: bool,
}

impl Service {
    pub fn new(
        name: &str,
        bin: &Path,
        env: Vec<(String, String)>,
        logs: &Path,
        ready_url: String,
    ) -> Self {
        Self {
            name: name.to_owned(),
            bin: bin.to_owned(),
            env,
            log: logs.join(format!("{name}.log")),
            ready_url,
            child: None,
            paused: false,
        }
    }

    /// Start it (its stderr appended to its log, across restarts).
    pub fn start(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.bin);
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// SIGKILL it and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGTERM it and wait (bounded) for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(child.id(), "CONT");
            }
            signal(child.id(), "TERM");
            for _ in 0..300 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn pause(&mut self, stop: bool) {
        if let Some(child) = &self.child {
            signal(child.id(), if stop { "STOP" } else { "CONT" });
            self.paused = stop;
        }
    }

    /// Whether its process is still running (an exit is reaped and reported).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                _ => {
                    self.child = None;
                    false
                }
            },
            None => false,
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The front door: every client connects here and is joined to the first gateway that
/// accepts, starting from the next one each time, so a killed gateway's clients land on the
/// other on their next connection.
pub async fn front_door(listener: TcpListener, gateways: Vec<u16>, stop: CancellationToken) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let (gateways, next, stop) = (gateways.clone(), next.clone(), stop.clone());
        tokio::spawn(async move {
            let first = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for i in 0..gateways.len() {
                let port = gateways[(first + i) % gateways.len()];
                let connect = TcpStream::connect(("127.0.0.1", port));
                let Ok(Ok(mut upstream)) =
                    tokio::time::timeout(Duration::from_millis(500), connect).await
                else {
                    continue;
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                }
                return;
            }
        });
    }
}

/// A recording proxy in front of one HAProxy Runtime API (TCP): every command line a client
/// sends is passed on; each `set server <backend>/<server> state <state>` is noted in the
/// ledger under `instance`, with the time it passed.
pub async fn recording_proxy(
    listener: TcpListener,
    instance: String,
    upstream: std::net::SocketAddr,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let (instance, ledger, stop) = (instance.clone(), ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await
            else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = async {
                let mut buf = vec![0u8; 16 * 1024];
                let mut line = Vec::new();
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    for &b in &buf[..n] {
                        if b == b'\n' || b == b';' {
                            note_command(&line, &instance, &ledger);
                            line.clear();
                        } else if line.len() < 4096 {
                            line.push(b);
                        }
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                if !line.is_empty() {
                    note_command(&line, &instance, &ledger);
                }
                let _ = server_write.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                let _ = client_write.shutdown().await;
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
        });
    }
}

/// `set server be/s0 state drain` → `(be/s0, drain)`.
pub fn parse_set_server(line: &str) -> Option<(String, String)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["set", "server", target, "state", state] => {
            Some(((*target).to_owned(), (*state).to_owned()))
        }
        _ => None,
    }
}

fn note_command(line: &[u8], instance: &str, ledger: &Ledger) {
    let text = String::from_utf8_lossy(line);
    if let Some((target, state)) = parse_set_server(&text) {
        ledger.sets.lock().unwrap().push(SetCommand {
            server: format!("{instance}/{target}"),
            state,
            at_ms: checkplane_runtime::clock::now_ms(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_server_commands_are_recognised_and_nothing_else() {
        assert_eq!(
            parse_set_server("set server be/s0 state drain"),
            Some(("be/s0".into(), "drain".into()))
        );
        assert_eq!(
            parse_set_server("  set server be/s1   state ready "),
            Some(("be/s1".into(), "ready".into()))
        );
        assert_eq!(parse_set_server("show servers state be"), None);
        assert_eq!(parse_set_server("set server be/s0 weight 10"), None);
    }
}
