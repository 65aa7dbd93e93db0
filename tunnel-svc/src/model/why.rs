//! Every reason tunnel-svc gives for what it did with a port: why it is
//! not forwarded, why its host port differs from the container port, why
//! its tunnel failed. The plan and the reconciler pass these values
//! around; the words users read are here and only here.

use super::{Origin, Proto, TunnelId};
use std::fmt;
use std::time::Duration;

/// Where a rule was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleFrom {
    /// The Nth `[[rule]]` of `--config`.
    Config(usize),
    /// A container's `porthole.*` labels.
    Label,
    /// A dev container's settings (`devcontainer.metadata`,
    /// devcontainer.json).
    DevContainer,
}

impl RuleFrom {
    /// As `Tunnel.settings_from` and `ls` show it.
    pub fn short(&self) -> String {
        match self {
            RuleFrom::Config(n) => format!("rule {n}"),
            RuleFrom::Label => "label".into(),
            RuleFrom::DevContainer => "devcontainer".into(),
        }
    }
}

impl fmt::Display for RuleFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleFrom::Config(n) => write!(f, "rule {n} of --config"),
            RuleFrom::Label => f.write_str("a container label"),
            RuleFrom::DevContainer => f.write_str("the dev container settings"),
        }
    }
}

/// Why a port open in its container gets no automatic tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Excluded {
    #[error("it is the monitor's own port")]
    MonitorPort,
    #[error("it is in the skip list (--skip, the defaults, or the config file)")]
    Skipped,
    #[error("a rule ignores it")]
    Ignored,
}

/// Who keeps a host port from a tunnel that wanted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Another tunnel listens on it.
    Tunnel(TunnelId),
    /// It is kept for this tunnel, which had it before and may come back.
    KeptFor(TunnelId),
}

/// Something a tunnel's user should know about it: why its host port is
/// not the container port, or why it is listed and not forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// Docker publishes the port, but its server listens on the
    /// container's loopback, which Docker's forward cannot reach.
    Unreached { published: u16 },
    /// A privileged container port on an unprivileged host port.
    Privileged { port: u16, host_port: u16 },
    /// The host port it wanted is another tunnel's (or kept for one).
    Moved { wanted: u16, by: Holder, to: u16 },
    /// The host port it wanted was busy when it bound (`host_process_ago`:
    /// kept for a host process that held it that long ago).
    Busy {
        wanted: u16,
        to: u16,
        host_process_ago: Option<Duration>,
    },
    /// Docker publishes it on the host itself; listed only.
    Published { host_port: u16 },
    /// Left out by `--max-tunnels`; listed only.
    Capped { max: usize, target: String },
    /// Opened by hand; nothing serves the port in the container.
    NotListening { proto: Proto, port: u16 },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::Unreached { published } => write!(
                f,
                "Docker publishes it on host port {published}, but its server listens on \
                 loopback only, which Docker's forward cannot reach; forwarded here"
            ),
            Note::Privileged { port, host_port } => write!(
                f,
                "container port {port} is privileged; forwarded on host port {host_port} \
                 (--allow-privileged-ports to use {port})"
            ),
            Note::Moved { wanted, by, to } => match by {
                Holder::Tunnel(holder) => write!(
                    f,
                    "host port {wanted} is held by {holder}; forwarded on {to} instead"
                ),
                Holder::KeptFor(keeper) => write!(
                    f,
                    "host port {wanted} is kept for {keeper}, which had it before; forwarded \
                     on {to} instead"
                ),
            },
            Note::Busy {
                wanted,
                to,
                host_process_ago: Some(ago),
            } => write!(
                f,
                "host port {wanted} was held by a host process {}s ago and is kept for it; \
                 forwarded on {to} instead",
                ago.as_secs()
            ),
            Note::Busy { wanted, to, .. } => {
                write!(f, "host port {wanted} is busy; forwarded on {to} instead")
            }
            Note::Published { host_port } => write!(
                f,
                "published by Docker on host port {host_port} (docker run -p); not forwarded \
                 again"
            ),
            Note::Capped { max, target } => write!(
                f,
                "not forwarded: more than --max-tunnels {max} ports are open in {target}; it \
                 gets a tunnel when one of those closes"
            ),
            Note::NotListening {
                proto: Proto::Tcp,
                port,
            } => write!(
                f,
                "nothing listens on port {port} in the container (yet); connections fail until \
                 something does"
            ),
            Note::NotListening {
                proto: Proto::Udp,
                port,
            } => write!(
                f,
                "no UDP server on port {port} in the container (yet); datagrams are dropped \
                 until one is bound"
            ),
        }
    }
}

/// Notes shown as one text, in the order they were made.
pub fn join(notes: &[Note]) -> Option<String> {
    if notes.is_empty() {
        return None;
    }
    let texts: Vec<String> = notes.iter().map(Note::to_string).collect();
    Some(texts.join("; "))
}

/// Why a tunnel is FAILED (it is tried again while it is wanted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The backend's own words: it cannot carry this port, or preparing
    /// it failed.
    #[error("{0}")]
    Backend(String),
    /// Another tunnel holds the host port and this one may not move.
    #[error("host port {host_port} is held by {holder}{}", if *exact { "" } else { " (--on-conflict=fail)" })]
    HeldBy {
        host_port: u16,
        holder: TunnelId,
        exact: bool,
    },
    /// An exact host port a host process held lately: kept for it.
    #[error(
        "host port {host_port}{} was held by a host process {}s ago; it is kept for that \
         process for {}s more (a restarting service gets its port back)",
        pinned(pinned_by), ago.as_secs(), left.as_secs()
    )]
    KeptForHost {
        host_port: u16,
        pinned_by: Option<RuleFrom>,
        ago: Duration,
        left: Duration,
    },
    /// The host port is busy and the tunnel may not move.
    #[error("{}", busy(*host_port, *origin, *exact, pinned_by))]
    Busy {
        host_port: u16,
        origin: Origin,
        exact: bool,
        pinned_by: Option<RuleFrom>,
    },
    /// Listening failed for another reason.
    #[error("cannot listen on host port {host_port}: {error}")]
    CannotListen { host_port: u16, error: String },
}

fn pinned(by: &Option<RuleFrom>) -> String {
    match by {
        Some(rule) => format!(" (pinned by {rule})"),
        None => String::new(),
    }
}

fn busy(host_port: u16, origin: Origin, exact: bool, pinned_by: &Option<RuleFrom>) -> String {
    match origin {
        Origin::Egress => format!(
            "port {host_port} is busy: the gate must listen on the upstream's own port (a port \
             in a git URL overrides the ssh config's), so it waits for it"
        ),
        Origin::Manual if exact => {
            format!("host port {host_port} is busy (asked for by OpenTunnel)")
        }
        _ if exact => match pinned_by {
            Some(rule) => format!("host port {host_port} is busy (pinned by {rule})"),
            None => format!("host port {host_port} is busy"),
        },
        _ => format!("host port {host_port} is busy (--on-conflict=fail)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_join_in_order() {
        let id = TunnelId::new("web", 8000);
        let notes = [
            Note::Privileged {
                port: 80,
                host_port: 10080,
            },
            Note::Moved {
                wanted: 10080,
                by: Holder::Tunnel(id),
                to: 10081,
            },
        ];
        assert_eq!(
            join(&notes).unwrap(),
            "container port 80 is privileged; forwarded on host port 10080 \
             (--allow-privileged-ports to use 80); host port 10080 is held by web:tcp:8000; \
             forwarded on 10081 instead"
        );
        assert_eq!(join(&[]), None);
    }

    #[test]
    fn failures_say_what_kept_the_port() {
        let held = Failure::HeldBy {
            host_port: 8000,
            holder: TunnelId::new("a", 8000),
            exact: false,
        };
        assert_eq!(
            held.to_string(),
            "host port 8000 is held by a:tcp:8000 (--on-conflict=fail)"
        );
        let kept = Failure::KeptForHost {
            host_port: 8000,
            pinned_by: Some(RuleFrom::Config(2)),
            ago: Duration::from_secs(10),
            left: Duration::from_secs(290),
        };
        assert!(kept
            .to_string()
            .starts_with("host port 8000 (pinned by rule 2 of --config) was held by a host process 10s ago; it is kept for that process for 290s more"));
        let busy = Failure::Busy {
            host_port: 443,
            origin: Origin::Egress,
            exact: true,
            pinned_by: None,
        };
        assert!(busy
            .to_string()
            .starts_with("port 443 is busy: the gate must listen"));
    }
}
