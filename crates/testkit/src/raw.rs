//! HTTP as a hostile client speaks it: bytes on a socket, without a client library's help
//! (half-sent heads, lying `Content-Length`s, connections held open), and the descriptor limit
//! a test needs to hold thousands of them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off a socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// The head's lines after the status line, as sent.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The envelope's error code (`""` when there is none).
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Send `request` on a new connection and read until the server closes it (or one answer with
/// a `Content-Length` is complete), within `within`. Panics when nothing complete arrives.
pub async fn exchange(addr: SocketAddr, request: &[u8], within: Duration) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A server may answer and close before it has read all of an oversized request.
    let _ = stream.write_all(request).await;
    read_answer(&mut stream, within).await
}

/// Read one answer from `stream` within `within`.
pub async fn read_answer(stream: &mut TcpStream, within: Duration) -> RawAnswer {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
            if let Some(answer) = parse(&bytes) {
                if answer
                    .header("content-length")
                    .and_then(|l| l.parse::<usize>().ok())
                    == Some(answer.body.len())
                {
                    return;
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&bytes);
    match parse(&bytes) {
        Some(answer) => answer,
        None => panic!(
            "no complete answer within {within:?} (timed out: {}): {text:?}",
            read.is_err()
        ),
    }
}

fn parse(bytes: &[u8]) -> Option<RawAnswer> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let (status_line, rest) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    Some(RawAnswer {
        status,
        head: rest.replace("\r\n", "\n"),
        body: body.to_owned(),
    })
}

/// Whether the server has closed `stream` (EOF or reset) within `within`; data it sends first
/// is read and dropped.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (children inherit it); panics
/// naming the limit when the hard one is below `at_least`, so a test that needs the
/// descriptors fails instead of passing on less.
pub fn raise_open_files(at_least: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= at_least,
        "this test needs {at_least} open files; the hard RLIMIT_NOFILE is {hard} (raise it, e.g. in limits.conf)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// The listener limits every service has, seen from outside on `addr` (started with
/// `HTTP_HEADER_TIMEOUT` well under 5 s): a path over 8 KiB is 414 in the envelope, and a
/// half-sent head is closed by the server.
pub async fn assert_listener_limits(addr: SocketAddr) {
    let long = format!(
        "GET /livez?pad={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let answer = exchange(addr, long.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (414, "ERR_URI_TOO_LONG"),
        "{answer:?}"
    );
    let mut half_sent = TcpStream::connect(addr).await.expect("connect");
    half_sent
        .write_all(b"GET /livez HTTP/1.1\r\nHos")
        .await
        .expect("write");
    assert!(
        closed_within(&mut half_sent, Duration::from_secs(5)).await,
        "a half-sent head is still open after 5 s"
    );
}
