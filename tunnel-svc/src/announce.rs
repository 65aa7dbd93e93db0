//! What tunnel-svc does when an automatic tunnel becomes active, as its
//! settings say (dev containers' `onAutoForward`): a log line and, where
//! tunnel-svc's own desktop session is, a notification or the browser.
//!
//! tunnel-svc only ever uses a session that is its own user's: one its
//! environment names (`DISPLAY`, `WAYLAND_DISPLAY` or `BROWSER`) with an
//! `XDG_RUNTIME_DIR` (`DBUS_SESSION_BUS_ADDRESS` for notifications) that
//! tunnel-svc's user owns. It never switches user or looks for another
//! user's session: as root under `sudo` (whose environment names none of
//! its own) it logs the URL instead.

use crate::model::{OnForward, Scheme, TunnelId, TunnelView};
use std::collections::BTreeSet;
use std::time::Duration;

/// How long a helper (`xdg-open`, `notify-send`) may take.
const HELPER_WAIT: Duration = Duration::from_secs(10);

/// Tunnels whose URL was opened once this run (`openBrowserOnce`).
#[derive(Default)]
pub struct Opened(BTreeSet<TunnelId>);

/// Says that tunnel `t` is active, the way its settings ask.
pub fn active(t: &TunnelView, opened: &mut Opened) {
    let (id, settings) = (&t.id, &t.settings);
    let url = t
        .url(settings.scheme.unwrap_or(Scheme::Http))
        .unwrap_or_default();
    // Shown with its scheme when the settings give one.
    let shown = match settings.scheme {
        Some(_) => url.clone(),
        None => url
            .split_once("://")
            .map_or(&*url, |(_, rest)| rest)
            .to_string(),
    };
    let label = t.label.as_deref().unwrap_or_default();
    match settings.on_forward {
        OnForward::Silent => {
            tracing::debug!(tunnel = %id, url = %shown, label, "port forwarded");
        }
        OnForward::Notify => {
            tracing::info!(tunnel = %id, url = %shown, label, "port forwarded");
            if own_session(&["DBUS_SESSION_BUS_ADDRESS"]) {
                let title = if label.is_empty() { "porthole" } else { label };
                let body = format!("{id} is on {shown}");
                run_helper("notify-send", &["--app-name=porthole", title, &body]);
            }
        }
        OnForward::OpenBrowser | OnForward::OpenBrowserOnce => {
            let once = settings.on_forward == OnForward::OpenBrowserOnce;
            if once && !opened.0.insert(id.clone()) {
                tracing::info!(tunnel = %id, url = %shown, label, "port forwarded (opened in the browser before)");
                return;
            }
            if own_session(&["DISPLAY", "WAYLAND_DISPLAY", "BROWSER"]) {
                tracing::info!(tunnel = %id, url = %url, label, "port forwarded; opening it in the browser");
                run_helper("xdg-open", &[&url]);
            } else {
                tracing::info!(tunnel = %id, url = %url, label,
                    "port forwarded; not opening the browser: no desktop session of tunnel-svc's own user in its environment");
            }
        }
    }
}

/// Whether tunnel-svc's environment has one of `vars` and an
/// `XDG_RUNTIME_DIR` that tunnel-svc's user owns.
fn own_session(vars: &[&str]) -> bool {
    let named = vars
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    named && runtime_dir_is_mine(std::env::var_os("XDG_RUNTIME_DIR").as_deref())
}

fn runtime_dir_is_mine(dir: Option<&std::ffi::OsStr>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = dir.filter(|d| !d.is_empty()) else {
        return false;
    };
    std::fs::metadata(dir).is_ok_and(|m| m.uid() == rustix::process::geteuid().as_raw())
}

/// Runs `program args` in the background, bounded in time; a failure is
/// a log line.
fn run_helper(program: &'static str, args: &[&str]) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::spawn(async move {
        let result = match cmd.spawn() {
            Ok(mut child) => match tokio::time::timeout(HELPER_WAIT, child.wait()).await {
                Ok(Ok(status)) if status.success() => return,
                Ok(Ok(status)) => format!("it exited with {status}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("it did not finish within {}s", HELPER_WAIT.as_secs()),
            },
            Err(e) => e.to_string(),
        };
        tracing::warn!(program, error = %result, "cannot run the desktop helper");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_runtime_dir_of_my_own_is_my_session() {
        let mine = std::env::temp_dir().join(format!("announce-{}", std::process::id()));
        std::fs::create_dir_all(&mine).unwrap();
        assert!(runtime_dir_is_mine(Some(mine.as_os_str())));
        assert!(!runtime_dir_is_mine(None));
        assert!(!runtime_dir_is_mine(Some("".as_ref())));
        assert!(!runtime_dir_is_mine(Some("/nonexistent/run".as_ref())));
        if rustix::process::geteuid().is_root() {
            // Another user's: chown it away (as root, the tests' CI user).
            std::os::unix::fs::chown(&mine, Some(65534), None).unwrap();
            assert!(!runtime_dir_is_mine(Some(mine.as_os_str())));
        }
        std::fs::remove_dir(&mine).unwrap();
    }
}
