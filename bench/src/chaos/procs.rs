//! The run's service processes (real binaries, started, SIGKILLed, SIGSTOPped and started
//! again) and the small TCP pieces in front of them: the front door every client goes
//! through (it connects to whichever gateway answers), the recording proxies in front of
//! each HAProxy Runtime API, which note every `set server … state …` that passes, and each
//! scheduler's way to Redis, which can lose an `XACK` with its connection.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    proxy(listener, upstream, stop, move |client, server| {
        let (instance, ledger) = (instance.clone(), ledger.clone());
        async move {
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
            tokio::join!(up, down);
        }
    })
    .await;
}

/// Accept clients on `listener` until `stop`; join each to a new connection to `upstream`
/// (given up after 2 s) and let `relay` carry the two until it ends or `stop` fires.
async fn proxy<F, Fut>(
    listener: TcpListener,
    upstream: std::net::SocketAddr,
    stop: CancellationToken,
    relay: F,
) where
    F: Fn(TcpStream, TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let (stop, relay) = (stop.clone(), relay.clone());
        tokio::spawn(async move {
            let connect = TcpStream::connect(upstream);
            let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
                return;
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = relay(client, server) => {}
            }
        });
    }
}

/// The switch of one [`ack_cutting_proxy`].
#[derive(Debug, Default)]
pub struct AckCut {
    armed: AtomicBool,
}

impl AckCut {
    /// The next `XACK` of an entry the projector had to apply is lost, with its connection.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

/// A scheduler's way to Redis. Commands and replies pass unchanged; the proxy reads both (RESP)
/// and remembers, per connection, the stream entries delivered without the outbox's `applied`
/// field (those the projector applies itself). Armed, it does not pass on the next `XACK` of
/// such an entry and cuts that connection, both ways: the projector has committed a batch and
/// loses its acknowledgement, the moment between commit and `XACK` that a SIGKILL a few times
/// a minute practically never hits. The entries stay pending and are delivered again: the
/// projector must find them applied already. Noted as an `ack-cut` fault of `target` when it
/// happens.
pub async fn ack_cutting_proxy(
    listener: TcpListener,
    target: String,
    upstream: std::net::SocketAddr,
    cut: Arc<AckCut>,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    proxy(listener, upstream, stop, move |client, server| {
        let (target, cut, ledger) = (target.clone(), cut.clone(), ledger.clone());
        async move {
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Entries delivered on this connection that the projector applies itself.
            let unapplied = Mutex::new(HashSet::<Vec<u8>>::new());
            let up = pass_resp(client_read, server_write, |command| {
                let Resp::Array(Some(args)) = command else {
                    return false;
                };
                let is_xack = matches!(args.first(), Some(Resp::Bulk(Some(c))) if c.eq_ignore_ascii_case(b"XACK"));
                if !is_xack {
                    return false;
                }
                let ids: Vec<&[u8]> = args
                    .iter()
                    .skip(3)
                    .filter_map(|a| match a {
                        Resp::Bulk(Some(id)) => Some(id.as_slice()),
                        _ => None,
                    })
                    .collect();
                let mut unapplied = unapplied.lock().unwrap();
                let own = ids.iter().filter(|id| unapplied.contains(**id)).count();
                for id in &ids {
                    unapplied.remove(*id);
                }
                if own == 0 || !cut.armed.swap(false, Ordering::SeqCst) {
                    return false;
                }
                ledger.fault(
                    "ack-cut",
                    &target,
                    format!(
                        "XACK of {} entries ({own} applied by the projector) lost with its connection",
                        ids.len()
                    ),
                );
                true
            });
            let down = pass_resp(server_read, client_write, |reply| {
                let mut found = Vec::new();
                unapplied_entries(reply, &mut found);
                unapplied.lock().unwrap().extend(found);
                false
            });
            // Whichever way ends first (a cut, a peer gone), both halves are dropped: the
            // connection is closed.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        }
    })
    .await;
}

/// Pass RESP values from `from` to `to` whole, showing each to `cut` first; returns when either
/// side is gone or `cut` answers true (that value and what follows are not passed on). What
/// is not RESP is passed on as it comes, unseen.
async fn pass_resp(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: impl FnMut(&Resp) -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut unsent: Vec<u8> = Vec::new();
    let mut raw = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        unsent.extend_from_slice(&buf[..n]);
        let mut whole = 0;
        let mut cutting = false;
        while !raw && whole < unsent.len() {
            match resp(&unsent[whole..]) {
                Ok(Some((len, value))) => {
                    if cut(&value) {
                        cutting = true;
                        break;
                    }
                    whole += len;
                }
                Ok(None) => break,
                Err(()) => raw = true,
            }
        }
        if raw {
            whole = unsent.len();
        }
        if to.write_all(&unsent[..whole]).await.is_err() || cutting {
            return;
        }
        unsent.drain(..whole);
    }
}

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+`, `-` or `:`: the line.
    Line(Vec<u8>),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// The first RESP2 value in `buf` and its length in bytes; `Ok(None)` while it is incomplete;
/// `Err` when `buf` is not RESP2.
pub fn resp(buf: &[u8]) -> Result<Option<(usize, Resp)>, ()> {
    fn at(buf: &[u8], from: usize) -> Result<Option<(usize, Resp)>, ()> {
        let Some(&tag) = buf.get(from) else {
            return Ok(None);
        };
        let Some(end) = buf[from..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[from + 1..from + end];
        let next = from + end + 2;
        let number = || -> Result<i64, ()> {
            std::str::from_utf8(line)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or(())
        };
        match tag {
            b'+' | b'-' | b':' => Ok(Some((next, Resp::Line(line.to_vec())))),
            b'$' => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Some((next, Resp::Bulk(None))));
                };
                if buf.len() < next + len + 2 {
                    return Ok(None);
                }
                Ok(Some((
                    next + len + 2,
                    Resp::Bulk(Some(buf[next..next + len].to_vec())),
                )))
            }
            b'*' => {
                let Ok(count) = usize::try_from(number()?) else {
                    return Ok(Some((next, Resp::Array(None))));
                };
                let mut items = Vec::with_capacity(count.min(1024));
                let mut pos = next;
                for _ in 0..count {
                    let Some((end, item)) = at(buf, pos)? else {
                        return Ok(None);
                    };
                    items.push(item);
                    pos = end;
                }
                Ok(Some((pos, Resp::Array(Some(items)))))
            }
            _ => Err(()),
        }
    }
    at(buf, 0)
}

/// The ids of the stream entries in a reply (`[id, [field, value, …]]` anywhere in it, as
/// `XREADGROUP` and `XAUTOCLAIM` answer) that carry an `event` and no `applied` field.
pub fn unapplied_entries(reply: &Resp, found: &mut Vec<Vec<u8>>) {
    let Resp::Array(Some(items)) = reply else {
        return;
    };
    if let [Resp::Bulk(Some(id)), Resp::Array(Some(fields))] = items.as_slice() {
        let names: Vec<&[u8]> = fields
            .iter()
            .step_by(2)
            .filter_map(|f| match f {
                Resp::Bulk(Some(name)) => Some(name.as_slice()),
                _ => None,
            })
            .collect();
        if names.contains(&b"event".as_slice()) {
            if !names.contains(&b"applied".as_slice()) {
                found.push(id.clone());
            }
            return;
        }
    }
    for item in items {
        unapplied_entries(item, found);
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
    fn resp_values_are_split_whole_and_incomplete_ones_wait() {
        let xack = b"*5\r\n$4\r\nxack\r\n$2\r\ncp\r\n$9\r\nprojector\r\n$3\r\n1-0\r\n$3\r\n2-0\r\n";
        let ping = b"*1\r\n$4\r\nPING\r\n";
        let mut both = ping.to_vec();
        both.extend_from_slice(xack);
        let (len, value) = resp(&both).unwrap().unwrap();
        assert_eq!(len, ping.len());
        assert_eq!(
            value,
            Resp::Array(Some(vec![Resp::Bulk(Some(b"PING".to_vec()))]))
        );
        let (len, _) = resp(&both[ping.len()..]).unwrap().unwrap();
        assert_eq!(len, xack.len());
        for end in 0..xack.len() {
            assert_eq!(resp(&xack[..end]), Ok(None), "{end}");
        }
        assert_eq!(resp(b"$-1\r\n"), Ok(Some((5, Resp::Bulk(None)))));
        assert_eq!(resp(b":12\r\n"), Ok(Some((5, Resp::Line(b"12".to_vec())))));
        assert_eq!(resp(b"PING\r\n"), Err(()));
    }

    #[test]
    fn entries_the_projector_applies_are_told_from_the_outbox_s() {
        // XREADGROUP: [[stream, [[id, [field, value, …]], …]]]
        let bulk = |s: &str| Resp::Bulk(Some(s.as_bytes().to_vec()));
        let entry = |id: &str, fields: &[&str]| {
            Resp::Array(Some(vec![
                bulk(id),
                Resp::Array(Some(fields.iter().map(|f| bulk(f)).collect())),
            ]))
        };
        let reply = Resp::Array(Some(vec![Resp::Array(Some(vec![
            bulk("cp:events:leases"),
            Resp::Array(Some(vec![
                entry("1-0", &["event", "{}"]),
                entry("2-0", &["event", "{}", "applied", "1"]),
                entry("3-0", &["applied", "1", "event", "{}"]),
                entry("4-0", &["event", "{}"]),
            ])),
        ]))]));
        let mut found = Vec::new();
        unapplied_entries(&reply, &mut found);
        assert_eq!(found, vec![b"1-0".to_vec(), b"4-0".to_vec()]);
        let mut found = Vec::new();
        unapplied_entries(&bulk("OK"), &mut found);
        assert!(found.is_empty());
    }

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
