//! What happens to the pins while the agent runs, driven by the data-plane thread (the only writer
//! of maps and pins, so these never race a swap):
//!
//! - **upgrade**: an agent that loaded a new layout beside another layout's programs switches the
//!   links to its own programs (`link_switch.rs`) only once a snapshot is live in its maps and the
//!   enrolled namespaces are written there; until then the old programs keep steering with their
//!   maps, and the agent is not ready. A failed switch is retried on the next round.
//! - **uninstall**: when the operator says the node's agents are being removed, the programs are
//!   detached and every pin removed; from then on the agent applies nothing and is not ready, but
//!   keeps running (a restart would install again) until it is stopped.
use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{error, info, warn};

use crate::{
    agent::{SharedStatus, update},
    link_switch::{self, LinkSwitch},
    loader,
};

/// An upgrade across layouts, as `/debug/snapshot` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Upgrade {
    /// The other layouts' pins, removed once the links run this layout's programs.
    pub retiring: Vec<String>,
    /// Shown as `"state": "waiting_for_snapshot"` or `"switched"`, beside its fields.
    #[serde(flatten)]
    pub state: UpgradeState,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UpgradeState {
    /// The links still run the other layout's programs, until this layout's maps hold a live
    /// snapshot and the enrolled namespaces.
    WaitingForSnapshot {
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
    },
    /// The links run this layout's programs (the program of each link was replaced at once).
    Switched { at_unix_ms: u64 },
}

/// The uninstall, as `/debug/snapshot` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Uninstalled {
    pub at_unix_ms: u64,
    /// Every pin removed, or what failed.
    pub outcome: String,
}

/// The pins' lifecycle on the data-plane thread.
pub struct Lifecycle {
    dir: PathBuf,
    switch: Option<LinkSwitch>,
    uninstalled: bool,
    status: SharedStatus,
}

impl Lifecycle {
    /// `switch`: the links to point at this layout's programs once its maps are live (an upgrade).
    pub fn new(dir: PathBuf, switch: Option<LinkSwitch>, status: SharedStatus) -> Self {
        if let Some(s) = &switch {
            let retiring = s.retiring().iter().map(|p| p.display().to_string());
            let upgrade = Upgrade {
                retiring: retiring.collect(),
                state: UpgradeState::WaitingForSnapshot { last_error: None },
            };
            update(&status, |st| st.upgrade = Some(upgrade));
        }
        Lifecycle {
            dir,
            switch,
            uninstalled: false,
            status,
        }
    }

    pub fn uninstalled(&self) -> bool {
        self.uninstalled
    }

    /// Called after a round in which a snapshot was live in this layout's maps and the enrolled
    /// namespaces were synced: finishes a pending upgrade.
    pub fn on_synced(&mut self) {
        let Some(switch) = &self.switch else {
            return;
        };
        match switch.run() {
            Ok(done) => {
                info!(?done, "upgrade done: the links run this layout's programs");
                let links = link_switch::read_links(&self.dir);
                update(&self.status, |st| {
                    match links {
                        Ok(links) => st.links = links,
                        Err(e) => warn!(error = %e, "reading the links after the switch"),
                    }
                    if let Some(upgrade) = &mut st.upgrade {
                        upgrade.state = UpgradeState::Switched {
                            at_unix_ms: now_ms(),
                        };
                    }
                });
                self.switch = None;
            }
            Err(e) => {
                error!(error = %e, "switching the links to this layout failed; retrying");
                update(&self.status, |st| {
                    if let Some(upgrade) = &mut st.upgrade {
                        upgrade.state = UpgradeState::WaitingForSnapshot {
                            last_error: Some(e.to_string()),
                        };
                    }
                });
            }
        }
    }

    /// Detaches the programs and removes every pin; the agent stays uninstalled.
    pub fn uninstall(&mut self) {
        if self.uninstalled {
            return;
        }
        self.switch = None;
        self.uninstalled = true;
        let outcome = match loader::uninstall(&self.dir) {
            Ok(()) => {
                info!(dir = %self.dir.display(), "uninstalled: programs detached, every pin removed");
                "every pin removed".to_string()
            }
            Err(e) => {
                error!(error = %e, "uninstalling");
                format!("failed: {e}")
            }
        };
        update(&self.status, |st| {
            st.links.clear();
            st.uninstalled = Some(Uninstalled {
                at_unix_ms: now_ms(),
                outcome,
            });
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
