//! Waiting for a server a benchmark started in a pod (haproxy, nginx) to accept connections.
use std::{
    io,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use kmesh_tests::Pod;

/// Waits until `addr` accepts a connection in `pod`'s namespace (at most 10 s); `what` names the
/// server in the error.
pub fn wait_listening(pod: &Pod, addr: SocketAddr, what: &str) -> io::Result<()> {
    let started = Instant::now();
    loop {
        let connected =
            pod.run_in(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
        match connected {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                return Err(io::Error::other(format!(
                    "{what} in pod {} does not listen on {addr}: {e}",
                    pod.name()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
