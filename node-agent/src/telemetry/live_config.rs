//! The access-log switch follows the live generation: whenever the data plane makes a new
//! generation live, the node config the kernel now holds is read back and its `access_log`
//! setting switches the access log, with no restart. A connection reported after that read uses
//! the new setting.
use kmesh_common::NodeConfig;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Telemetry, access_log::AccessLog};

impl AccessLog {
    /// The setting a generation's node config carries.
    pub fn of(config: &NodeConfig) -> AccessLog {
        // `NodeConfig.flags` is reserved (zero) until the snapshot carries `access_log`: off.
        let _ = config;
        AccessLog::Off
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
