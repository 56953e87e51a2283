//! The host link's carrier: watched for the whole process, and followed by each connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};

use super::listen::CARRIER_POLL;
use super::signals::Stopper;
use crate::host::netlink::{watch_links, LinkEvent, LinkWatcher};
use crate::vhost_user::backend::HostSide;
use crate::vhost_user::shim::ConfigNotifier;

/// Keeps `link_up` equal to "the host link and its parent are up with carrier", and logs
/// changes once each. The config space's STATUS field reads it; with
/// `--disconnect-on-link-down` the serve loop also ends the connection while it is false (no
/// frontend acts on a config-change message for net; see the README's "Link state").
pub(super) fn watch_link_state(
    iface: &str,
    ifindexes: Vec<u32>,
    link_up: Arc<AtomicBool>,
) -> Option<LinkWatcher> {
    let iface = iface.to_string();
    let state: Mutex<HashMap<u32, bool>> = Mutex::default();
    let watched = ifindexes.clone();
    let on_change = move |ev: LinkEvent| {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            LinkEvent::Carrier { ifindex, up } => {
                st.insert(ifindex, up);
            }
            LinkEvent::Deleted { ifindex } => {
                tracing::error!(
                    ifindex,
                    "host link {iface} (or its parent) was deleted: the guest's frames are \
                     dropped; macvhost keeps serving its socket"
                );
                st.insert(ifindex, false);
            }
        }
        let up = watched.iter().all(|i| st.get(i).copied().unwrap_or(true));
        if link_up.swap(up, Ordering::SeqCst) != up {
            tracing::info!(link_up = up, "host link state changed");
        }
    };
    match watch_links(ifindexes, on_change) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch link state (status stays as at start): {e}");
            None
        }
    }
}

/// Runs beside each connection and follows the host link: every change of carrier is
/// announced with CONFIG_CHANGE_MSG where the frontend negotiated it (the STATUS field already
/// reads the new value), and with `--disconnect-on-link-down` a loss of carrier ends the
/// connection. The frontend seeing its backend go away is the one link change QEMU and DPDK
/// show their guests for vhost-user net (neither acts on a config change for net).
///
/// Returns as soon as `ended` says the connection is over. Calls `tick` every poll.
pub(super) fn follow_link_for_connection<Q>(
    host: &HostSide<Q>,
    notifier: &ConfigNotifier,
    ended: Receiver<()>,
    stopper: &Stopper,
    tick: &dyn Fn(),
) {
    let mut was_up = host.link_up.load(Ordering::SeqCst);
    while !stopper.stopping() {
        let up = host.link_up.load(Ordering::SeqCst);
        if up != was_up {
            was_up = up;
            if notifier.config_changed() {
                tracing::debug!(link_up = up, "config change sent to the frontend");
            }
        }
        if !up && host.link_down_disconnects {
            tracing::info!(
                "host link lost carrier: ending the frontend connection (--disconnect-on-link-down)"
            );
            stopper.end_connection();
            return;
        }
        // The connection's periodic work (multicast expiry and queries) rides on this loop.
        tick();
        match ended.recv_timeout(CARRIER_POLL) {
            Err(RecvTimeoutError::Timeout) => {}
            // The connection ended (its sender is gone).
            _ => return,
        }
    }
}
