//! A minimal HTTP/1.1 GET from inside a network namespace: how the kubelet probes a pod
//! (`httpGet` readiness probes reach the pod's IP from the node) and how tests read an agent's
//! `/debug/snapshot`. The socket is made on a thread that joined the namespace.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use crate::run_in_netns;

/// `GET path` on `addr` from the network namespace `netns`: (status code, body).
pub fn get_in_netns(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let path = path.to_string();
    run_in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/kmesh-tests\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        parse_response(&response)
    })
}

fn parse_response(response: &str) -> io::Result<(u16, String)> {
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok((code, if chunked { dechunk(body) } else { body.into() }))
}

/// The body of a chunked response (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn responses() {
        let (c, b) = super::parse_response("HTTP/1.1 200 OK\r\nA: b\r\n\r\nhello").unwrap();
        assert_eq!((c, b.as_str()), (200, "hello"));
        let (c, b) = super::parse_response(
            "HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((c, b.as_str()), (503, "abcde"));
        assert!(super::parse_response("garbage").is_err());
    }
}
