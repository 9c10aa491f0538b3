//! The access-log switch follows the live generation: whenever the data plane makes a new
//! generation live, the node config the kernel now holds is read back and its `access_log`
//! setting switches the access log, with no restart. A connection reported after that read uses
//! the new setting.
use kmesh_common::{NodeConfig, access_log};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Telemetry, access_log::AccessLog};

impl AccessLog {
    /// The setting a generation's node config carries (`KmeshConfig.spec.accessLog`). The
    /// snapshot's validation admits only `access_log::OFF` and `ON`; anything else reads as off.
    pub fn of(config: &NodeConfig) -> AccessLog {
        if config.access_log == access_log::ON {
            AccessLog::On
        } else {
            AccessLog::Off
        }
    }
}

/// Sets the switch from the live node config now and after every change of the live generation
/// (`live`: the data plane's watch channel), until the channel closes. `read` returns the live
/// generation's node config (`None` before any generation is live).
pub async fn follow_live_config<E: std::fmt::Display>(
    mut live: watch::Receiver<u64>,
    read: impl Fn() -> Result<Option<NodeConfig>, E>,
    telemetry: Telemetry,
) {
    loop {
        let generation = *live.borrow_and_update();
        match read() {
            Ok(Some(config)) => {
                let setting = AccessLog::of(&config);
                if telemetry.set_access_log(setting) != setting {
                    info!(generation, access_log = ?setting, "access log switched by the live snapshot");
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(generation, error = %e, "reading the live node config; the access log keeps its setting")
            }
        }
        if live.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kmesh_common::{NodeConfig, access_log, mode};
    use tokio::sync::watch;

    use super::{AccessLog, follow_live_config};
    use crate::telemetry::Telemetry;

    fn config(setting: u8) -> NodeConfig {
        NodeConfig {
            access_log: setting,
            ..NodeConfig::with_mode(mode::KERNEL_NATIVE)
        }
    }

    /// Waits (bounded) until the follower has set `expected`.
    async fn settles(telemetry: &Telemetry, expected: AccessLog) {
        for _ in 0..200 {
            if telemetry.access_log() == expected {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the access log did not become {expected:?}");
    }

    /// The switch follows each new live generation's node config: read at start, then again on
    /// every generation change; a failed read keeps the setting; the follower ends with the channel.
    #[tokio::test]
    async fn the_switch_follows_the_live_generation() {
        let kernel: Arc<Mutex<Result<Option<NodeConfig>, &str>>> = Arc::new(Mutex::new(Ok(None)));
        let (live_tx, live_rx) = watch::channel(0u64);
        let telemetry = Telemetry::default();
        let read = {
            let kernel = kernel.clone();
            move || *kernel.lock().unwrap()
        };
        let follower = tokio::spawn(follow_live_config(live_rx, read, telemetry.clone()));

        *kernel.lock().unwrap() = Ok(Some(config(access_log::ON)));
        live_tx.send(1).unwrap();
        settles(&telemetry, AccessLog::On).await;

        *kernel.lock().unwrap() = Err("map unreadable");
        live_tx.send(2).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            telemetry.access_log(),
            AccessLog::On,
            "kept on a failed read"
        );

        *kernel.lock().unwrap() = Ok(Some(config(access_log::OFF)));
        live_tx.send(3).unwrap();
        settles(&telemetry, AccessLog::Off).await;

        drop(live_tx);
        tokio::time::timeout(std::time::Duration::from_secs(2), follower)
            .await
            .expect("the follower ends with its channel")
            .unwrap();
    }

    #[test]
    fn only_on_is_on() {
        assert_eq!(AccessLog::of(&config(access_log::ON)), AccessLog::On);
        assert_eq!(AccessLog::of(&config(access_log::OFF)), AccessLog::Off);
        assert_eq!(AccessLog::of(&config(7)), AccessLog::Off);
    }
}
