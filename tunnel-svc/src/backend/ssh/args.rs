//! The ssh command lines: the master's, a forward's, a control command's,
//! and the cipher the master prefers.

use super::{SshConfig, CONTROL_TIMEOUT};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

pub(super) fn os(s: &str) -> OsString {
    OsString::from(s)
}

/// ssh expands `%` tokens in the control path and forward paths.
pub(super) fn escape_percent(p: &Path) -> OsString {
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b'%' {
            out.push(b'%');
        }
    }
    OsString::from_vec(out)
}

pub(super) fn forward_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("fwd-{port}.sock"))
}

/// `DIR/fwd-PORT.sock:localhost:PORT`, the `-L` argument of a forward.
pub(super) fn forward_spec(dir: &Path, port: u16) -> OsString {
    let mut spec = escape_percent(&forward_path(dir, port));
    spec.push(format!(":localhost:{port}"));
    spec
}

/// Options every ssh command gets: `-S CTL`, `BatchMode` so no prompt can
/// hang us, then the user's, then defaults they may override (ssh keeps
/// the first value it sees of an option).
pub(super) fn common_args(
    config: &SshConfig,
    ctl: &Path,
    own: &[&str],
    defaults: &[&str],
) -> Vec<OsString> {
    let mut args = vec![os("-S"), escape_percent(ctl)];
    for opt in own.iter().chain(&["BatchMode=yes"]) {
        args.extend([os("-o"), os(opt)]);
    }
    for opt in &config.options {
        args.extend([os("-o"), os(opt)]);
    }
    for opt in defaults {
        args.extend([os("-o"), os(opt)]);
    }
    args
}

/// `ssh -M -N -S CTL -o ... -- HOST`: the master, forwarding nothing until
/// asked to. `ControlPersist=no` keeps it our child (no fork to the
/// background); `StreamLocalBindUnlink` lets a forward replace a stale
/// socket file; `ClearAllForwardings` leaves out the forwards the user's
/// config may list for that host, which belong to their own sessions.
/// `ciphers` is a `Ciphers=` value from [`cipher_preference`].
pub(super) fn master_args(config: &SshConfig, ctl: &Path, ciphers: Option<&str>) -> Vec<OsString> {
    let mut args = vec![os("-M"), os("-N")];
    let ciphers = ciphers.map(|c| format!("Ciphers={c}"));
    let mut defaults = vec!["ServerAliveInterval=10", "ServerAliveCountMax=3"];
    defaults.extend(ciphers.as_deref());
    args.extend(common_args(
        config,
        ctl,
        &[
            "ControlPersist=no",
            "ExitOnForwardFailure=yes",
            "StreamLocalBindUnlink=yes",
            "ClearAllForwardings=yes",
        ],
        &defaults,
    ));
    args.extend([os("--"), os(&config.host)]);
    args
}

/// The cipher order the master asks for, when it should ask for one.
///
/// OpenSSH's default order starts with chacha20-poly1305, computed in
/// software; on a CPU with AES instructions AES-GCM moves the same bytes
/// for much less CPU, and the ssh master's one thread is what limits an
/// ssh tunnel's throughput. So when the CPU has them and neither the
/// user's ssh configuration nor `--ssh-option`s chose ciphers (the cipher
/// list `ssh -G` reports for the host is the one it reports with no
/// configuration at all), the master gets the same list with the AES-GCM
/// ciphers first. Anything else — another CPU, a list someone chose, an
/// ssh without `-G` — leaves the choice to ssh.
pub(super) async fn cipher_preference(config: &SshConfig) -> Option<String> {
    if !cpu_has_aes() {
        return None;
    }
    let ciphers = |own_config: bool| {
        let mut cmd = Command::new("ssh");
        cmd.arg("-G");
        if own_config {
            for opt in &config.options {
                cmd.args(["-o", opt]);
            }
        } else {
            cmd.args(["-F", "/dev/null"]);
        }
        cmd.args(["--", &config.host])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(CONTROL_TIMEOUT, cmd.output())
                .await
                .ok()?
                .ok()?;
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            out.lines()
                .find_map(|l| l.strip_prefix("ciphers "))
                .map(str::to_string)
        }
    };
    let (theirs, stock) = tokio::join!(ciphers(true), ciphers(false));
    let theirs = theirs?;
    if Some(&theirs) != stock.as_ref() {
        return None; // Someone chose these.
    }
    gcm_first(&theirs)
}

/// `list` with its AES-GCM ciphers moved to the front, if that changes it.
pub(super) fn gcm_first(list: &str) -> Option<String> {
    let (gcm, rest): (Vec<&str>, Vec<&str>) = list.split(',').partition(|c| c.contains("-gcm@"));
    let reordered = gcm.into_iter().chain(rest).collect::<Vec<_>>().join(",");
    (reordered != list).then_some(reordered)
}

/// Whether the CPU has AES instructions (x86 `aes`, Arm `aes` feature).
pub(super) fn cpu_has_aes() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
            .any(|l| l.split_whitespace().any(|w| w == "aes"))
    })
}

/// `ssh -S CTL -o ... OP... -- HOST`: one request to the running master.
pub(super) fn control_args(config: &SshConfig, ctl: &Path, op: &[OsString]) -> Vec<OsString> {
    let mut args = common_args(config, ctl, &[], &[]);
    args.extend(op.iter().cloned());
    args.extend([os("--"), os(&config.host)]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ssh::tests::{config, which_ssh};

    #[test]
    fn master_command_line() {
        let c = config(Path::new("/run/ph"));
        let args = strings(&master_args(
            &c,
            Path::new("/run/ph/ctl"),
            Some("aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"),
        ));
        assert_eq!(&args[..4], ["-M", "-N", "-S", "/run/ph/ctl"]);
        assert_eq!(&args[args.len() - 2..], ["--", "box"]);
        let opts: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-o")
            .map(|w| w[1].as_str())
            .collect();
        for must in [
            "ControlPersist=no",
            "ExitOnForwardFailure=yes",
            "BatchMode=yes",
            "StreamLocalBindUnlink=yes",
            "ServerAliveInterval=10",
            "ServerAliveCountMax=3",
        ] {
            assert!(opts.contains(&must), "{must} missing from {args:?}");
        }
        let pos = |o: &str| opts.iter().position(|x| *x == o).unwrap();
        // ssh keeps the first value: ours that must hold come before the
        // user's, the tunable defaults after.
        assert!(pos("BatchMode=yes") < pos("User=me"));
        assert!(pos("User=me") < pos("ServerAliveInterval=10"));
        assert!(
            pos("User=me") < pos("Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com")
        );
        let plain = strings(&master_args(&c, Path::new("/run/ph/ctl"), None));
        assert!(
            !plain.iter().any(|a| a.starts_with("Ciphers=")),
            "{plain:?}"
        );
    }

    #[test]
    fn aes_gcm_goes_first_and_nothing_else_moves() {
        let stock = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,\
                     aes128-gcm@openssh.com,aes256-gcm@openssh.com";
        assert_eq!(
            gcm_first(stock).as_deref(),
            Some(
                "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,\
                 aes128-ctr,aes192-ctr,aes256-ctr"
            )
        );
        assert_eq!(
            gcm_first("aes128-gcm@openssh.com,aes128-ctr"),
            None,
            "already first"
        );
        assert_eq!(
            gcm_first("chacha20-poly1305@openssh.com"),
            None,
            "none to move"
        );
    }

    #[tokio::test]
    async fn the_cipher_order_changes_only_when_nobody_chose_one() {
        if which_ssh().is_none() {
            eprintln!("SKIPPED: no ssh on PATH");
            return;
        }
        let c = config(Path::new("/tmp/unused"));
        let mut chosen = c.clone();
        chosen
            .options
            .push("Ciphers=chacha20-poly1305@openssh.com".into());
        assert_eq!(cipher_preference(&chosen).await, None);
        let preferred = cipher_preference(&c).await;
        // Unless this machine's own ssh configuration chose ciphers.
        let user_config =
            std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".ssh/config").exists());
        let system_ciphers = std::fs::read_to_string("/etc/ssh/ssh_config")
            .is_ok_and(|c| c.lines().any(|l| l.trim_start().starts_with("Ciphers")));
        if cpu_has_aes() && !user_config && !system_ciphers {
            let list = preferred.expect("AES-GCM preferred");
            assert!(list.starts_with("aes128-gcm@openssh.com"), "{list}");
        }
    }

    #[test]
    fn forward_and_cancel_command_lines() {
        let c = config(Path::new("/tmp/a%b"));
        let spec = forward_spec(&c.runtime_dir, 8080);
        assert_eq!(spec, "/tmp/a%%b/fwd-8080.sock:localhost:8080");
        let args = strings(&control_args(
            &c,
            &c.runtime_dir.join("ctl"),
            &[os("-O"), os("forward"), os("-L"), spec],
        ));
        assert_eq!(
            args,
            [
                "-S",
                "/tmp/a%%b/ctl",
                "-o",
                "BatchMode=yes",
                "-o",
                "User=me",
                "-O",
                "forward",
                "-L",
                "/tmp/a%%b/fwd-8080.sock:localhost:8080",
                "--",
                "box"
            ]
        );
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}
