//! `kmeshctl`'s HTTP client for an agent's admin and metrics listeners: one blocking request per
//! call over a plain `TcpStream`. Those listeners are local (localhost, or a `kubectl
//! port-forward`), speak plain HTTP/1 and answer small bodies, so no HTTP library is needed.
//!
//! It sends HTTP/1.0 requests, so that the server neither keeps the connection open nor chunks the
//! body: the answer ends at its `Content-Length`, or when the server closes. Every failure names
//! the address and what could not be done (`cannot reach the agent at 127.0.0.1:15200: connection
//! refused`).
use std::{
    fmt,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    str::FromStr,
    time::Duration,
};

/// How long a connection attempt, and then each read or write, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read (a `/debug/snapshot` is a few kilobytes).
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// `HOST:PORT` of a listener (`127.0.0.1:15200`, `localhost:15200`, `[::1]:15200`); an `http://`
/// prefix and a trailing `/` are accepted, as copied from a browser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerAddr {
    host: String,
    port: u16,
}

impl FromStr for ListenerAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.starts_with("https://") {
            return Err("the agent's listeners speak plain HTTP: give HOST:PORT".into());
        }
        let hostport = text.strip_prefix("http://").unwrap_or(text);
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        if hostport.contains('/') {
            return Err(format!("expected HOST:PORT without a path, got {text:?}"));
        }
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return Err(format!(
                "expected HOST:PORT (e.g. 127.0.0.1:15200), got {text:?}"
            ));
        };
        let port = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number (in {text:?})"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['[', ']', ' ']) {
            return Err(format!(
                "expected HOST:PORT (e.g. 127.0.0.1:15200), got {text:?}"
            ));
        }
        Ok(ListenerAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for ListenerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which of the agent's listeners a request goes to (it words the errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `--admin-addr`: `/version`, `/debug/*`.
    Admin,
    /// `--metrics-addr`: Prometheus text.
    Metrics,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Listener::Admin => "the agent",
            Listener::Metrics => "the agent's metrics listener",
        })
    }
}

#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: ListenerAddr, reason: String },
    #[error("cannot reach {listener} at {addr}: {reason}")]
    Unreachable {
        listener: Listener,
        addr: ListenerAddr,
        reason: String,
    },
    #[error("{listener} at {addr} answered something that is not HTTP: {detail}")]
    NotHttp {
        listener: Listener,
        addr: ListenerAddr,
        detail: String,
    },
    #[error("{listener} at {addr} answered {code} to {method} {path}: {body}")]
    Status {
        listener: Listener,
        addr: ListenerAddr,
        method: Method,
        path: String,
        code: u16,
        body: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        })
    }
}

/// One listener of one agent.
pub struct AgentClient {
    pub listener: Listener,
    pub addr: ListenerAddr,
}

impl AgentClient {
    pub fn new(listener: Listener, addr: ListenerAddr) -> AgentClient {
        AgentClient { listener, addr }
    }

    /// `GET path`: the body of a 2xx answer.
    pub fn get(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.request(Method::Get, path, &[])
    }

    /// `PUT path` with `body`: the body of a 2xx answer.
    pub fn put(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.request(Method::Put, path, body)
    }

    fn request(&self, method: Method, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        let unreachable = |e: io::Error| ClientError::Unreachable {
            listener: self.listener,
            addr: self.addr.clone(),
            reason: io_reason(&e),
        };
        let mut stream = self.connect()?;
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: kmeshctl/{}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        let mut answer = Vec::new();
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| stream.write_all(head.as_bytes()))
            .and_then(|()| stream.write_all(body))
            .and_then(|()| stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut answer))
            .map_err(unreachable)?;
        let response = parse_response(&answer).map_err(|detail| ClientError::NotHttp {
            listener: self.listener,
            addr: self.addr.clone(),
            detail,
        })?;
        if !(200..300).contains(&response.code) {
            return Err(ClientError::Status {
                listener: self.listener,
                addr: self.addr.clone(),
                method,
                path: path.to_string(),
                code: response.code,
                body: String::from_utf8_lossy(&response.body).trim().to_string(),
            });
        }
        Ok(response.body)
    }

    /// Connects to the first address the host resolves to that accepts.
    fn connect(&self) -> Result<TcpStream, ClientError> {
        let resolved: Vec<SocketAddr> = (self.addr.host.as_str(), self.addr.port)
            .to_socket_addrs()
            .map_err(|e| ClientError::Resolve {
                addr: self.addr.clone(),
                reason: io_reason(&e),
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
        for addr in resolved {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(ClientError::Unreachable {
            listener: self.listener,
            addr: self.addr.clone(),
            reason: io_reason(&last),
        })
    }
}

/// An I/O error in a few words: the kind for the usual network failures (`connection refused`),
/// else the error's own message.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | WouldBlock
        | HostUnreachable | NetworkUnreachable | AddrNotAvailable | UnexpectedEof => {
            let kind = if e.kind() == WouldBlock {
                TimedOut
            } else {
                e.kind()
            };
            kind.to_string()
        }
        _ => e.to_string(),
    }
}

/// A parsed HTTP/1 answer.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    code: u16,
    body: Vec<u8>,
}

/// Parses a whole HTTP/1 answer: status line, headers, and the body up to `Content-Length` (or to
/// the end when there is none).
fn parse_response(answer: &[u8]) -> Result<Response, String> {
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(format!("no complete header in {} bytes", answer.len()));
    };
    let head = std::str::from_utf8(&answer[..head_end]).map_err(|_| "a header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
        [version, code, ..] if version.starts_with("HTTP/1.") => code.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("status line {status_line:?}"))?;
    let body = &answer[head_end + 4..];
    let content_length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim().parse::<usize>())
        .transpose()
        .map_err(|_| "an unreadable Content-Length".to_string())?;
    let body = match content_length {
        Some(n) if n > body.len() => {
            return Err(format!("the body ended after {} of {n} bytes", body.len()));
        }
        Some(n) => &body[..n],
        None => body,
    };
    Ok(Response {
        code,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn addr(text: &str) -> Result<ListenerAddr, String> {
        text.parse()
    }

    #[test]
    fn addresses_are_host_and_port() {
        assert_eq!(
            addr("127.0.0.1:15200").unwrap().to_string(),
            "127.0.0.1:15200"
        );
        assert_eq!(
            addr("localhost:15200").unwrap().to_string(),
            "localhost:15200"
        );
        assert_eq!(addr("[::1]:15200").unwrap().to_string(), "[::1]:15200");
        assert_eq!(
            addr("http://127.0.0.1:15200/").unwrap().to_string(),
            "127.0.0.1:15200"
        );
        for (bad, message) in [
            ("127.0.0.1", "expected HOST:PORT"),
            (":15200", "expected HOST:PORT"),
            ("127.0.0.1:http", "\"http\" is not a port number"),
            ("127.0.0.1:70000", "\"70000\" is not a port number"),
            ("https://127.0.0.1:15200", "plain HTTP"),
            ("http://127.0.0.1:15200/debug", "expected HOST:PORT"),
        ] {
            let e = addr(bad).unwrap_err();
            assert!(e.contains(message), "{bad:?}: {e}");
        }
    }

    #[test]
    fn answers_are_cut_at_their_content_length() {
        let ok = parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(
            ok,
            Response {
                code: 200,
                body: b"abc".to_vec()
            }
        );
        let to_close = parse_response(b"HTTP/1.1 400 Bad Request\r\n\r\nno\n").unwrap();
        assert_eq!(
            to_close,
            Response {
                code: 400,
                body: b"no\n".to_vec()
            }
        );
    }

    #[test]
    fn broken_answers_are_named() {
        for (answer, message) in [
            (&b""[..], "no complete header"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
            (b"HTTP/1.1 abc\r\n\r\n", "status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
                "ended after 3 of 9",
            ),
        ] {
            let e = parse_response(answer).unwrap_err();
            assert!(e.contains(message), "{answer:?}: {e}");
        }
    }

    /// A port nobody listens on: the error names the listener, the address and the reason.
    #[test]
    fn a_closed_port_is_connection_refused() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = AgentClient::new(Listener::Admin, addr(&format!("127.0.0.1:{port}")).unwrap());
        let e = client.get("/version").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach the agent at 127.0.0.1:{port}: connection refused")
        );
    }
}
