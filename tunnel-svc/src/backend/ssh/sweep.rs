//! Cleaning up after tunnel-svc processes of this user that were killed:
//! their runtime directories, and the ssh masters they left.

use super::CONTROL_TIMEOUT;
use std::path::Path;
use std::process::Stdio;
use tokio::process::Command;

/// Cleans up after tunnel-svc processes of user `uid` that died without
/// shutting down (SIGKILL): for each `porthole-PID` directory under `base`
/// whose process is gone, asks any master still on one of its control
/// sockets to exit, then removes the directory. (Masters are started to die
/// with tunnel-svc; this catches what that cannot, such as a master whose
/// parent thread had not set it up yet.)
pub async fn sweep_stale(base: &Path, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("porthole-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let ours = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let targets = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for target in targets {
            let ctl = target.path().join("ctl");
            if !ctl.exists() {
                continue;
            }
            let exit = Command::new("ssh")
                .arg("-S")
                .arg(&ctl)
                .args(["-O", "exit", "-o", "BatchMode=yes", "porthole-stale"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            let _ = tokio::time::timeout(CONTROL_TIMEOUT, exit).await;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed the ssh directory of a tunnel-svc that is gone")
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot remove a stale ssh directory")
            }
        }
    }
}

/// Whether process `pid` is gone or on its way out. A process that is
/// killed sets `PF_EXITING` before the kernel closes its files, so an EOF
/// caused by its death always finds it set (field 9 of `/proc/PID/stat`,
/// after the parenthesised name).
pub(super) fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return true;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0
}
