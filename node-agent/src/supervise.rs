//! Supervision of the data-plane thread. It is the only writer of the maps: once it stops, whether it
//! panicked or returned (its source ended), the agent no longer applies snapshots nor follows
//! namespaces. So its end is never silent: the status says the data plane stopped (and `/readyz`
//! stops answering 200), and the agent is told, so that it exits non-zero and its supervisor
//! (the DaemonSet) restarts it. The programs stay attached meanwhile.
use std::{
    any::Any,
    fmt,
    panic::{AssertUnwindSafe, catch_unwind},
};

use tokio::sync::oneshot;

use crate::agent::{DataPlaneState, SharedStatus, update};

/// How a supervised thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThreadExit {
    /// Its body returned: for the data plane, its snapshot source ended.
    Returned,
    Panicked(String),
    /// It ended without reporting (cannot happen unless the thread is torn down without unwinding).
    Lost,
}

impl fmt::Display for ThreadExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadExit::Returned => f.write_str("returned"),
            ThreadExit::Panicked(message) => write!(f, "panicked: {message}"),
            ThreadExit::Lost => f.write_str("ended without reporting how"),
        }
    }
}

/// A supervised thread; [`Supervised::exited`] resolves when it ends.
pub struct Supervised {
    exit: oneshot::Receiver<ThreadExit>,
}

impl Supervised {
    pub async fn exited(self) -> ThreadExit {
        self.exit.await.unwrap_or(ThreadExit::Lost)
    }
}

/// Runs `body` on a thread named `name`. When it ends, however it ends, the status records the data
/// plane as stopped (before anyone is told) and [`Supervised::exited`] resolves.
pub fn spawn(
    name: &str,
    status: SharedStatus,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<Supervised> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let exit = match catch_unwind(AssertUnwindSafe(body)) {
                Ok(()) => ThreadExit::Returned,
                Err(payload) => ThreadExit::Panicked(panic_message(payload.as_ref())),
            };
            update(&status, |s| {
                s.data_plane = DataPlaneState::Stopped {
                    reason: exit.to_string(),
                }
            });
            let _ = tx.send(exit);
        })?;
    Ok(Supervised { exit: rx })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::agent::Status;

    fn ready_status() -> SharedStatus {
        Arc::new(Mutex::new(Status {
            ready: true,
            ..Status::default()
        }))
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_readiness_is_withdrawn() {
        let status = ready_status();
        assert!(status.lock().unwrap().is_ready());
        let thread = spawn("test-panics", status.clone(), || panic!("map handle lost")).unwrap();
        let exit = thread.exited().await;
        assert_eq!(exit, ThreadExit::Panicked("map handle lost".into()));
        let status = status.lock().unwrap();
        assert!(!status.is_ready(), "still ready after the data plane died");
        assert_eq!(
            status.data_plane,
            DataPlaneState::Stopped {
                reason: "panicked: map handle lost".into()
            }
        );
    }

    #[tokio::test]
    async fn a_return_is_reported_too() {
        let status = ready_status();
        let exit = spawn("test-returns", status.clone(), || {})
            .unwrap()
            .exited()
            .await;
        assert_eq!(exit, ThreadExit::Returned);
        assert!(!status.lock().unwrap().is_ready());
    }

    #[tokio::test]
    async fn a_formatted_panic_message_is_kept() {
        let status = ready_status();
        let n = 2;
        let exit = spawn("test-format", status, move || panic!("snapshot {n}"))
            .unwrap()
            .exited()
            .await;
        assert_eq!(exit, ThreadExit::Panicked("snapshot 2".into()));
    }
}
