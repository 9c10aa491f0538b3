//! Protocol detection for a `Detect` port: is the connection HTTP (HTTP/1.x or h2c with prior
//! knowledge) or something else? It owns the classifier of first bytes ([`classify`], pure) and
//! the wait for them ([`sniff`], which peeks and never consumes: the bytes stay in the socket for
//! whichever proxy takes the connection).
//!
//! It promises never to call HTTP what is not: HTTP/1.x means a request line that begins with a
//! known method token (uppercase, as RFC 9110 registers them), a space, a request target of
//! visible ASCII, a space and `HTTP/1.`; HTTP/2 means the whole client preface. Everything else is
//! TCP, including lowercase methods and a preface that goes wrong part way.
//!
//! The timeout: a client that sends nothing within it is TCP. That is what makes server-first
//! protocols (MySQL, SMTP: the server speaks first) work on a `Detect` port, at the cost of the
//! timeout on their first exchange. Istio's inbound detection waits for the client instead
//! (`protocolDetectionTimeout` 0s in recent versions) and asks server-first ports to be declared;
//! the waypoint cannot ask the client, so it decides for TCP. A client that has sent part of a
//! request line when the timeout passes is TCP too (nothing proved it HTTP).
use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The method tokens a request line may begin with (RFC 9110 §9 and PATCH, RFC 5789).
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// The most bytes looked at. A request line longer than this that is HTTP so far (a known
/// method, a target of visible ASCII) is taken as HTTP: the HTTP server then applies its own
/// limits to it.
pub const MAX_SNIFF_BYTES: usize = 8 * 1024;

/// What the first bytes of a connection are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface (h2c with prior knowledge).
    Http2,
    /// Not HTTP: proxied as TCP.
    Tcp,
    /// Too few bytes to tell (only from [`classify`]).
    NeedMore,
}

/// Classifies the first bytes a client sent.
pub fn classify(bytes: &[u8]) -> Sniffed {
    if bytes.is_empty() {
        return Sniffed::NeedMore;
    }
    if bytes.starts_with(H2_PREFACE) {
        return Sniffed::Http2;
    }
    if H2_PREFACE.starts_with(bytes) {
        return Sniffed::NeedMore;
    }
    classify_request_line(bytes)
}

fn classify_request_line(bytes: &[u8]) -> Sniffed {
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        // No space yet: HTTP only if this can still become a known method.
        return if METHODS.iter().any(|m| m.starts_with(bytes)) {
            Sniffed::NeedMore
        } else {
            Sniffed::Tcp
        };
    };
    if !METHODS.contains(&&bytes[..space]) {
        return Sniffed::Tcp;
    }
    let rest = &bytes[space + 1..];
    let target_len = match rest.iter().position(|&b| b == b' ') {
        Some(len) => len,
        None if rest.iter().all(|&b| is_target_byte(b)) => return need_more(bytes),
        None => return Sniffed::Tcp,
    };
    let target = &rest[..target_len];
    if target.is_empty() || !target.iter().all(|&b| is_target_byte(b)) {
        return Sniffed::Tcp;
    }
    let version = &rest[target_len + 1..];
    const HTTP1: &[u8] = b"HTTP/1.";
    if version.len() >= HTTP1.len() {
        if version.starts_with(HTTP1) {
            Sniffed::Http1
        } else {
            Sniffed::Tcp
        }
    } else if HTTP1.starts_with(version) {
        need_more(bytes)
    } else {
        Sniffed::Tcp
    }
}

/// `NeedMore`, unless the bytes fill the sniff buffer: a request line that long, HTTP so far.
fn need_more(bytes: &[u8]) -> Sniffed {
    if bytes.len() >= MAX_SNIFF_BYTES {
        Sniffed::Http1
    } else {
        Sniffed::NeedMore
    }
}

/// A byte of a request target: visible ASCII (RFC 9112 §3.2 allows no space or control).
fn is_target_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// How often the socket is peeked again while the bytes so far cannot tell.
const REPEEK_INTERVAL: Duration = Duration::from_millis(2);

/// Waits for the client's first bytes, without consuming them, until they tell what the
/// connection is or `timeout` passes (then: TCP). A client that closes first is TCP too.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> std::io::Result<Sniffed> {
    let mut buf = vec![0u8; MAX_SNIFF_BYTES];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Sniffed::Tcp),
        };
        if peeked == 0 {
            return Ok(Sniffed::Tcp);
        }
        match classify(&buf[..peeked]) {
            Sniffed::NeedMore => {}
            decided => return Ok(decided),
        }
        // `peek` answers at once while bytes wait in the socket: sleep before looking again,
        // unless new bytes came since the last look.
        if peeked == seen {
            if tokio::time::Instant::now() >= deadline {
                return Ok(Sniffed::Tcp);
            }
            tokio::time::sleep(REPEEK_INTERVAL).await;
        }
        seen = peeked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_of_every_known_method_are_http1() {
        for method in METHODS {
            let line = [method, b" /reviews/1?u=2 HTTP/1.1\r\nHost: r\r\n\r\n"].concat();
            assert_eq!(classify(&line), Sniffed::Http1, "{method:?}");
        }
        assert_eq!(classify(b"GET / HTTP/1.0\r\n"), Sniffed::Http1);
        assert_eq!(
            classify(b"OPTIONS * HTTP/1.1\r\n"),
            Sniffed::Http1,
            "asterisk form"
        );
        assert_eq!(
            classify(b"GET http://reviews:9080/ HTTP/1.1\r\n"),
            Sniffed::Http1,
            "absolute form"
        );
    }

    #[test]
    fn a_request_line_cut_anywhere_needs_more_bytes() {
        let line = b"DELETE /a/b?c=d HTTP/1.1\r\n";
        let full = line.len() - 2 - 1; // up to and including "HTTP/1."'s dot
        for cut in 1..full {
            assert_eq!(
                classify(&line[..cut]),
                Sniffed::NeedMore,
                "{:?}",
                String::from_utf8_lossy(&line[..cut])
            );
        }
        assert_eq!(classify(&line[..full]), Sniffed::Http1);
        assert_eq!(classify(b""), Sniffed::NeedMore);
    }

    #[test]
    fn lowercase_or_unknown_methods_are_not_http() {
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"g"), Sniffed::Tcp);
        assert_eq!(classify(b"Get / HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"FETCH / HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"GETX / HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"GET"), Sniffed::NeedMore);
        assert_eq!(classify(b"GETS"), Sniffed::Tcp);
    }

    #[test]
    fn malformed_request_lines_are_not_http() {
        assert_eq!(
            classify(b"GET  / HTTP/1.1\r\n"),
            Sniffed::Tcp,
            "empty target"
        );
        assert_eq!(classify(b"GET /\x01 HTTP/1.1\r\n"), Sniffed::Tcp, "control");
        assert_eq!(
            classify(b"GET /\xc3\xa9 HTTP/1.1\r\n"),
            Sniffed::Tcp,
            "non-ASCII"
        );
        assert_eq!(classify(b"GET /\r\n"), Sniffed::Tcp, "HTTP/0.9");
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"GET / http/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"GET / HTTX"), Sniffed::Tcp);
        assert_eq!(classify(b"GET / HTTP"), Sniffed::NeedMore);
    }

    #[test]
    fn binary_and_server_first_bytes_are_tcp() {
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Sniffed::Tcp,
            "TLS"
        );
        assert_eq!(classify(&[0, 0, 0, 0]), Sniffed::Tcp);
        assert_eq!(classify(b"\xff\xfe\xfd"), Sniffed::Tcp);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"EHLO example.org\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"\r\n"), Sniffed::Tcp);
    }

    #[test]
    fn the_h2_preface_in_pieces() {
        for cut in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..cut]), Sniffed::NeedMore, "cut {cut}");
        }
        assert_eq!(classify(H2_PREFACE), Sniffed::Http2);
        let with_settings = [H2_PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
        assert_eq!(classify(&with_settings), Sniffed::Http2);
        // A preface that goes wrong part way is not HTTP.
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), Sniffed::Tcp);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Sniffed::Tcp);
        assert_eq!(classify(b"PRX"), Sniffed::Tcp);
    }

    #[test]
    fn a_long_target_that_is_http_so_far_is_http() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_SNIFF_BYTES, b'a');
        assert_eq!(classify(&line), Sniffed::Http1);
        line.truncate(MAX_SNIFF_BYTES - 1);
        assert_eq!(classify(&line), Sniffed::NeedMore);
    }

    #[tokio::test]
    async fn sniffing_peeks_and_times_out_to_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The request line in three pieces, with pauses.
            for piece in [&b"GE"[..], b"T /x HT", b"TP/1.1\r\n\r\n"] {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            s
        });
        let (server, _) = listener.accept().await.unwrap();
        let sniffed = sniff(&server, Duration::from_secs(2)).await.unwrap();
        assert_eq!(sniffed, Sniffed::Http1);
        // Peeked, not consumed.
        let mut buf = [0u8; 4];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET ");
        let _client = client.await.unwrap();

        // A silent client is TCP after the timeout.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let start = std::time::Instant::now();
        let sniffed = sniff(&server, Duration::from_millis(50)).await.unwrap();
        assert_eq!(sniffed, Sniffed::Tcp);
        assert!(start.elapsed() >= Duration::from_millis(45));
    }
}
