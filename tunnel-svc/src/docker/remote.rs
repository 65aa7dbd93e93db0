//! A container engine on another machine, `ssh://[USER@]HOST[:PORT][/SOCKET]`
//! (as `DOCKER_HOST` or a `docker context` says it), reached through the
//! user's own OpenSSH — their config, keys and known_hosts: one
//! ControlMaster that forwards the engine's socket (`/var/run/docker.sock`
//! unless the URL names another, e.g. Podman's) to a private local socket.
//! The master is started again with backoff when it dies, its forward
//! with it; tunnel bytes go over the containers' exec streams, which ride
//! the same forward.

use super::DockerError;
use crate::backend::ssh::{Ssh, SshConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the first connection to the remote machine may take.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// The remote engine's socket, forwarded here while this lives.
pub(super) struct Remote {
    /// Keeps the master (and its forward) running; ends it when dropped.
    _ssh: Ssh,
    /// The local end of the forward.
    pub(super) local: PathBuf,
}

/// Where an `ssh://` URL points: the ssh destination, its port, the
/// engine's socket there.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SshUrl {
    pub(super) destination: String,
    pub(super) port: Option<u16>,
    pub(super) socket: String,
}

impl SshUrl {
    pub(super) fn parse(url: &str) -> Option<SshUrl> {
        let rest = url.strip_prefix("ssh://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (destination, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                (host, Some(port.parse().ok()?))
            }
            _ => (authority, None),
        };
        let destination = destination.trim_start_matches('[').trim_end_matches(']');
        if destination.is_empty() || destination.ends_with('@') {
            return None;
        }
        let socket = match path {
            "" | "/" => "/var/run/docker.sock".to_string(),
            path => path.to_string(),
        };
        Some(SshUrl {
            destination: destination.to_string(),
            port,
            socket,
        })
    }
}

/// Starts the master for `url` with the user's `ssh_options`, its sockets
/// in `runtime/.engine`, and waits until the engine's socket is forwarded.
pub(super) async fn open(
    url: &str,
    ssh_options: &[String],
    runtime: &Path,
) -> Result<Remote, DockerError> {
    let fail = |why: String| DockerError::Engine {
        url: url.to_string(),
        from: "ssh".into(),
        why,
    };
    let parsed =
        SshUrl::parse(url).ok_or_else(|| fail("want ssh://[USER@]HOST[:PORT][/SOCKET]".into()))?;
    // Beside the ssh targets' directories, under a name no target can
    // have (target names take no dots).
    let dir = runtime.join(".engine");
    let local = dir.join("engine.sock");
    let mut options = ssh_options.to_vec();
    if let Some(port) = parsed.port {
        options.push(format!("Port={port}"));
    }
    let ssh = Ssh::start(SshConfig {
        target: "engine".into(),
        host: parsed.destination.clone(),
        options,
        runtime_dir: dir,
        socket_forwards: vec![(local.clone(), parsed.socket.clone())],
    });
    ssh.ready(CONNECT_WAIT)
        .await
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(destination = %parsed.destination, socket = %parsed.socket, local = %local.display(), "remote engine's socket forwarded over ssh");
    Ok(Remote { _ssh: ssh, local })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_urls_name_a_destination_a_port_and_a_socket() {
        let u = SshUrl::parse("ssh://me@box").unwrap();
        assert_eq!(
            u,
            SshUrl {
                destination: "me@box".into(),
                port: None,
                socket: "/var/run/docker.sock".into()
            }
        );
        let u =
            SshUrl::parse("ssh://core@198.18.0.2:2222/run/user/1000/podman/podman.sock").unwrap();
        assert_eq!(u.destination, "core@198.18.0.2");
        assert_eq!(u.port, Some(2222));
        assert_eq!(u.socket, "/run/user/1000/podman/podman.sock");
        assert_eq!(SshUrl::parse("ssh://[::1]:22").unwrap().destination, "::1");
        for bad in ["ssh://", "ssh://me@", "ssh://box:port", "tcp://box:2375"] {
            assert!(SshUrl::parse(bad).is_none(), "{bad}");
        }
    }
}
