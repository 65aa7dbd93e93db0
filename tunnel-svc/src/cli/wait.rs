//! `tunnel-svc wait`: until a container port is forwarded and a connection
//! through it reaches its server.

use super::{client, host_of, Credentials};
use crate::model::Proto;
use porthole::pb::v1::{
    tunnel_admin_client::TunnelAdminClient, ListTargetsRequest, Tunnel, TunnelState,
};
use std::net::SocketAddr;

/// What `tunnel-svc wait` waits for: `[TARGET:]PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitFor {
    pub target: Option<String>,
    pub protocol: crate::model::Proto,
    pub port: u16,
}

impl std::str::FromStr for WaitFor {
    type Err = String;
    fn from_str(s: &str) -> Result<WaitFor, String> {
        let (target, port) = match s.rsplit_once(':') {
            Some((t, p)) if !t.is_empty() => (Some(t.to_string()), p),
            Some(_) => return Err(format!("{s:?}: the target before ':' is empty")),
            None => (None, s),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: use [TARGET:]PORT with PORT in 1..65535"))?;
        Ok(WaitFor {
            target,
            protocol: crate::model::Proto::Tcp,
            port,
        })
    }
}

/// How often an active tunnel whose server does not answer yet, or a port
/// with no tunnel, is looked at again (changes to tunnels are seen at once).
const WAIT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// `wait` gave up: the time was up (exit status 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

/// A tunnel `wait` found usable.
#[derive(Debug)]
pub struct Ready {
    /// Where to connect: `localhost:8000`.
    pub host: String,
    pub tunnel: Tunnel,
}

/// Waits until the tunnel of `what` is active and a connection through it
/// reaches the container's server; the host address to use. Fails with the
/// reason on `timeout`, a failed or closed tunnel, or an ambiguous port.
pub async fn wait(
    admin: SocketAddr,
    auth: Credentials,
    what: &WaitFor,
    timeout: std::time::Duration,
) -> anyhow::Result<Ready> {
    use porthole::pb::v1::WatchTunnelsRequest;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut client = client(admin, auth).await?;
    let mut updates = client
        .watch_tunnels(WatchTunnelsRequest::default())
        .await?
        .into_inner();
    let mut tunnels: std::collections::BTreeMap<String, Tunnel> = Default::default();
    let mut last = match what.protocol {
        Proto::Tcp => format!("no tunnel for container port {} yet", what.port),
        Proto::Udp => format!("no tunnel for container UDP port {} yet", what.port),
    };
    loop {
        // No tunnel yet: look again now and then, since a port that is
        // open but deliberately not forwarded makes no tunnel events.
        let retry = match the_tunnel(&tunnels, what)? {
            None => {
                refuse_if_not_forwarded(&mut client, what).await?;
                true
            }
            Some(t) => match judge(&mut client, t).await? {
                Judged::Ready(ready) => return Ok(*ready),
                Judged::Waiting { why, retry } => {
                    last = why;
                    retry
                }
            },
        };
        let update = tokio::select! {
            update = updates.message() => update,
            _ = tokio::time::sleep(WAIT_RETRY), if retry => continue,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(TimedOut(format!("timed out after {timeout:?}: {last}")).into())
            }
        };
        let Some(u) = update? else {
            anyhow::bail!("tunnel-svc ended the stream (stopping?)");
        };
        if let Some(t) = u.tunnel {
            if u.removed {
                tunnels.remove(&t.id);
            } else {
                tunnels.insert(t.id.clone(), t);
            }
        }
    }
}

/// The tunnel of `what` among `tunnels`, if there is one; an error if the
/// port is open in several targets and `what` names none.
fn the_tunnel<'a>(
    tunnels: &'a std::collections::BTreeMap<String, Tunnel>,
    what: &WaitFor,
) -> anyhow::Result<Option<&'a Tunnel>> {
    let protocol = what.protocol.to_pb() as i32;
    let matching: Vec<&Tunnel> = tunnels
        .values()
        .filter(|t| t.container_port == u32::from(what.port) && t.protocol == protocol)
        .filter(|t| what.target.as_ref().is_none_or(|n| *n == t.target))
        .collect();
    if matching.len() > 1 {
        let names: Vec<&str> = matching.iter().map(|t| t.target.as_str()).collect();
        anyhow::bail!(
            "port {} is open in several targets ({}): say which, e.g. {}:{}",
            what.port,
            names.join(", "),
            names[0],
            what.port
        );
    }
    Ok(matching.first().copied())
}

/// Fails with the reason when the port of `what` is open in its container
/// but deliberately not forwarded: no point waiting.
async fn refuse_if_not_forwarded(
    client: &mut TunnelAdminClient<porthole::auth::AuthChannel>,
    what: &WaitFor,
) -> anyhow::Result<()> {
    use porthole::pb::v1::ProbeTunnelRequest;
    for target in target_names(client, what.target.clone()).await? {
        let id = format!("{target}:{}:{}", what.protocol, what.port);
        if let Err(s) = client.probe_tunnel(ProbeTunnelRequest { id }).await {
            if s.code() == tonic::Code::FailedPrecondition {
                anyhow::bail!("{}", s.message());
            }
        }
    }
    Ok(())
}

/// Prints what [`wait`] found as `output` asks: the host address, or in
/// JSON `{"ready": true, "host", "url", "tunnel"}` or `{"ready": false,
/// "error"}` (the error also goes to stderr, as every failure does).
pub fn print_wait(result: &anyhow::Result<Ready>, output: super::Output) {
    let json = match (result, output) {
        (Ok(ready), super::Output::Table) => return super::out(&format!("{}\n", ready.host)),
        (Err(_), super::Output::Table) => return,
        (Ok(ready), super::Output::Json) => serde_json::json!({
            "ready": true,
            "host": ready.host,
            "url": ready.tunnel.url,
            "tunnel": crate::json::tunnel(&ready.tunnel),
        }),
        (Err(e), super::Output::Json) => {
            serde_json::json!({"ready": false, "error": format!("{e:#}")})
        }
    };
    super::out(&format!("{json}\n"));
}

/// `target`, or every target's name when it is `None`.
pub async fn target_names(
    client: &mut TunnelAdminClient<porthole::auth::AuthChannel>,
    target: Option<String>,
) -> Result<Vec<String>, tonic::Status> {
    Ok(match target {
        Some(t) => vec![t],
        None => client
            .list_targets(ListTargetsRequest::default())
            .await?
            .into_inner()
            .targets
            .into_iter()
            .map(|t| t.name)
            .collect(),
    })
}

/// Where a tunnel `wait` watches stands.
enum Judged {
    /// Usable.
    Ready(Box<Ready>),
    /// Not yet, for this reason; `retry`: look again soon, not only on
    /// the next change.
    Waiting { why: String, retry: bool },
}

/// Whether tunnel `t` is usable now (an active one only once a connection
/// through it reaches the server); an error when it will not be.
async fn judge(
    client: &mut TunnelAdminClient<porthole::auth::AuthChannel>,
    t: &Tunnel,
) -> anyhow::Result<Judged> {
    use porthole::pb::v1::ProbeTunnelRequest;
    match TunnelState::try_from(t.state).unwrap_or_default() {
        TunnelState::Active => {
            let probe = client
                .probe_tunnel(ProbeTunnelRequest { id: t.id.clone() })
                .await?
                .into_inner();
            if probe.reachable {
                return Ok(Judged::Ready(Box::new(Ready {
                    host: host_of(t),
                    tunnel: t.clone(),
                })));
            }
            Ok(Judged::Waiting {
                why: format!("{} is active, but: {}", t.id, probe.error),
                retry: true,
            })
        }
        TunnelState::Published => Ok(Judged::Ready(Box::new(Ready {
            host: host_of(t),
            tunnel: t.clone(),
        }))),
        TunnelState::Failed => anyhow::bail!("{} failed: {}", t.id, t.error),
        TunnelState::Closed => {
            anyhow::bail!("{} is closed by an admin (OpenTunnel opens it again)", t.id)
        }
        TunnelState::Pending | TunnelState::Unspecified => Ok(Judged::Waiting {
            why: if t.note.is_empty() {
                format!("{} is pending", t.id)
            } else {
                format!("{} is pending: {}", t.id, t.note)
            },
            retry: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_takes_target_and_port() {
        assert_eq!(
            "8000".parse::<WaitFor>(),
            Ok(WaitFor {
                target: None,
                protocol: crate::model::Proto::Tcp,
                port: 8000
            })
        );
        assert_eq!(
            "web:8000".parse::<WaitFor>(),
            Ok(WaitFor {
                target: Some("web".into()),
                protocol: crate::model::Proto::Tcp,
                port: 8000
            })
        );
        for bad in ["", "0", "web:", ":80", "web:70000", "x"] {
            assert!(bad.parse::<WaitFor>().is_err(), "{bad:?}");
        }
    }
}
