//! `tunnel-svc ls`, `close` and `wait`: the admin API for people and
//! scripts.

use anyhow::Context;
use porthole::pb::v1::{
    tunnel_admin_client::TunnelAdminClient, CloseTunnelRequest, ListTargetsRequest,
    ListTunnelsRequest, Origin, Target, Tunnel, TunnelState,
};
use std::net::SocketAddr;

mod wait;
pub use wait::{print_wait, target_names, wait, Ready, TimedOut, WaitFor};

/// How a command prints what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// For people: aligned columns.
    #[default]
    Table,
    /// For scripts: protobuf's JSON mapping (see `json`).
    Json,
}

/// The admin token a client holds, and where it looked for it (to say so
/// when it has none).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub token: Option<porthole::auth::Token>,
    pub looked_at: Option<std::path::PathBuf>,
}

pub(crate) async fn client(
    admin: SocketAddr,
    auth: Credentials,
) -> anyhow::Result<TunnelAdminClient<porthole::auth::AuthChannel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach tunnel-svc at {admin} (is it running? see --admin)")
        })?;
    authenticate(&channel, admin, &auth).await?;
    Ok(TunnelAdminClient::new(porthole::auth::with_token(
        channel, auth.token,
    )))
}

/// How long a server has to answer `Prove`: tunnel-svc answers at once.
const PROVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks that the server at `admin` holds `token` (`Prove`) before
/// the token is ever sent: a port freed for a moment may have been taken
/// by another process, even a container's tunnel. Without a token, says
/// where to find one if the server wants it.
async fn authenticate(
    channel: &tonic::transport::Channel,
    admin: SocketAddr,
    auth: &Credentials,
) -> anyhow::Result<()> {
    let token = auth.token.as_ref();
    use tonic::Code;
    let nonce = porthole::auth::random_bytes()?;
    let mut prover = TunnelAdminClient::new(channel.clone());
    let prove = prover.prove(porthole::pb::v1::ProveRequest {
        nonce: nonce.to_vec(),
    });
    let Ok(answer) = tokio::time::timeout(PROVE_TIMEOUT, prove).await else {
        anyhow::bail!(
            "{admin} did not answer as tunnel-svc within {PROVE_TIMEOUT:?} (is something else \
             listening there?); no token was sent"
        );
    };
    let where_ = auth
        .looked_at
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "$XDG_STATE_HOME/porthole/admin.token".into());
    match (token, answer) {
        (Some(token), Ok(proof)) if token.proves(&nonce, &proof.get_ref().proof) => Ok(()),
        (Some(_), Ok(_)) => anyhow::bail!(
            "the server at {admin} could not prove it holds your admin token, so it was not \
             sent: another process may have taken the address, or --token-file is not this \
             tunnel-svc's"
        ),
        (Some(_), Err(s)) if s.code() == Code::FailedPrecondition => anyhow::bail!(
            "the server at {admin} has no admin token, but you hold one: it is not the \
             tunnel-svc that made it, so the token was not sent"
        ),
        (Some(_), Err(s)) if s.code() == Code::Unimplemented => anyhow::bail!(
            "the server at {admin} cannot prove it holds the admin token (not tunnel-svc, or an \
             older one), so the token was not sent"
        ),
        (None, Ok(_)) => anyhow::bail!(
            "tunnel-svc at {admin} wants its admin token, and there is none at {where_}: run \
             this as the user who runs tunnel-svc (e.g. sudo), or pass --token-file"
        ),
        // No token, and the server needs none (or is too old to say).
        (None, Err(s)) if matches!(s.code(), Code::FailedPrecondition | Code::Unimplemented) => {
            Ok(())
        }
        (_, Err(s)) => Err(anyhow::anyhow!("{}", s.message()))
            .with_context(|| format!("tunnel-svc at {admin} did not answer Prove")),
    }
}

fn state_name(t: &Tunnel) -> &'static str {
    match TunnelState::try_from(t.state).unwrap_or_default() {
        TunnelState::Pending => "pending",
        TunnelState::Active if t.consecutive_failures > 0 => "failing",
        TunnelState::Active => "active",
        TunnelState::Failed => "failed",
        TunnelState::Closed => "closed",
        TunnelState::Published => "published",
        TunnelState::Unspecified => "?",
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Lays out rows of cells in aligned columns, two spaces apart.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// How long ago, roughly: `45s`, `12m`, `3h`, `2d`.
fn age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The targets part of `tunnel-svc ls`: is each monitor reachable, since when.
pub fn targets_table(targets: &[Target], now: chrono::DateTime<chrono::Utc>) -> String {
    let safe = |s: &str| porthole::text::printable(s).into_owned();
    let mut rows = vec![[
        "TARGET".to_string(),
        "MONITOR".into(),
        "LINK".into(),
        "SINCE".into(),
        "NOTE".into(),
    ]];
    for t in targets {
        let since = t
            .since
            .as_ref()
            .and_then(porthole::time::from_proto)
            .map_or("-".to_string(), |s| age((now - s).num_seconds()));
        rows.push([
            safe(&t.name),
            safe(&t.url),
            if t.connected {
                "connected"
            } else {
                "unreachable"
            }
            .into(),
            since,
            safe(&t.error),
        ]);
    }
    columns(&rows)
}

/// Writes a command's output. A reader that went away (`ls | head`) ends
/// the command quietly, as it ends `ls` or `cat`, instead of a panic.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        _ => {}
    }
}

/// Where a user reaches a tunnel: `localhost:PORT` when it listens on
/// 127.0.0.1 and/or ::1 (what `localhost` resolves to), else its own
/// addresses (`--bind 127.0.0.2` is not `localhost`).
pub fn host_of(t: &Tunnel) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let localhost = |a: &String| {
        a.parse::<SocketAddr>().is_ok_and(|a| {
            matches!(
                a.ip(),
                IpAddr::V4(Ipv4Addr::LOCALHOST) | IpAddr::V6(Ipv6Addr::LOCALHOST)
            )
        })
    };
    match t.host_port {
        0 => "-".to_string(),
        p if t.host_addresses.iter().all(localhost) => format!("localhost:{p}"),
        _ => t.host_addresses.join(","),
    }
}

/// Why a tunnel is as it is, in a word or two: opened by hand, the egress
/// gate's, or automatic with the settings that matched its port.
fn from_of(t: &Tunnel) -> String {
    match Origin::try_from(t.origin) {
        Ok(Origin::Manual) => "manual".into(),
        Ok(Origin::Egress) => "egress".into(),
        _ if !t.settings_from.is_empty() => {
            porthole::text::printable(&t.settings_from).into_owned()
        }
        _ => "auto".into(),
    }
}

/// The table `tunnel-svc ls` prints.
pub fn table(tunnels: &[Tunnel]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "LABEL".into(),
        "STATE".into(),
        "FROM".into(),
        "HOST".into(),
        "PROCESS".into(),
        "CONNS".into(),
        "IN".into(),
        "OUT".into(),
        "NOTE".into(),
    ]];
    for t in tunnels {
        let host = host_of(t);
        let process = t
            .process
            .as_ref()
            .map_or("-".to_string(), |p| format!("{}[{}]", p.name, p.pid));
        // Everything here may come from the container: never let it
        // drive the terminal.
        let safe = |s: &str| porthole::text::printable(s).into_owned();
        rows.push([
            safe(&t.id),
            if t.label.is_empty() {
                "-".into()
            } else {
                safe(&t.label)
            },
            state_name(t).into(),
            from_of(t),
            safe(if t.url.is_empty() { &host } else { &t.url }),
            safe(&process),
            format!("{}/{}", t.active_connections, t.total_connections),
            human_bytes(t.bytes_in),
            human_bytes(t.bytes_out),
            safe(
                &[
                    match t.consecutive_failures {
                        0 | 1 => t.error.clone(),
                        n => format!("{n} connections failed in a row, the latest: {}", t.error),
                    },
                    t.note.clone(),
                    match t.datagrams_dropped {
                        0 => String::new(),
                        n => format!("{n} datagrams dropped (flow limit or queue full)"),
                    },
                ]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
            ),
        ]);
    }
    columns(&rows)
}

pub async fn ls(admin: SocketAddr, auth: Credentials, output: Output) -> anyhow::Result<()> {
    let mut client = client(admin, auth).await?;
    if output == Output::Json {
        let targets = client
            .list_targets(ListTargetsRequest::default())
            .await?
            .into_inner()
            .targets;
        let tunnels = all_tunnels(&mut client, "").await?;
        let all = serde_json::json!({
            "targets": targets.iter().map(crate::json::target).collect::<Vec<_>>(),
            "tunnels": tunnels.iter().map(crate::json::tunnel).collect::<Vec<_>>(),
        });
        out(&format!("{all:#}\n"));
        return Ok(());
    }
    match client.list_targets(ListTargetsRequest::default()).await {
        Ok(resp) => out(&format!(
            "{}\n",
            targets_table(&resp.into_inner().targets, chrono::Utc::now())
        )),
        // An older tunnel-svc: tunnels only.
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        Err(s) => return Err(s.into()),
    }
    let tunnels = all_tunnels(&mut client, "").await?;
    if tunnels.is_empty() {
        out("no tunnels\n");
    } else {
        out(&table(&tunnels));
    }
    Ok(())
}

/// Prints every tunnel, then each change, as one JSON line each
/// (WatchTunnels' messages), until `stop` or tunnel-svc ends the stream.
pub async fn watch(
    admin: SocketAddr,
    auth: Credentials,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut client = client(admin, auth).await?;
    let mut updates = client
        .watch_tunnels(porthole::pb::v1::WatchTunnelsRequest::default())
        .await?
        .into_inner();
    loop {
        let update = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            u = updates.message() => u?,
        };
        let Some(u) = update else {
            anyhow::bail!("tunnel-svc ended the stream (stopping?)");
        };
        out(&format!("{}\n", crate::json::update(&u)));
    }
}

/// Every tunnel (of `target`, when not empty), page by page.
pub(crate) async fn all_tunnels(
    client: &mut TunnelAdminClient<porthole::auth::AuthChannel>,
    target: &str,
) -> Result<Vec<Tunnel>, tonic::Status> {
    let mut tunnels = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = ListTunnelsRequest {
            target: target.to_string(),
            page_token,
            ..Default::default()
        };
        let page = client.list_tunnels(req).await?.into_inner();
        tunnels.extend(page.tunnels);
        if page.next_page_token.is_empty() {
            return Ok(tunnels);
        }
        page_token = page.next_page_token;
    }
}

pub async fn close(admin: SocketAddr, auth: Credentials, id: String) -> anyhow::Result<()> {
    let resp = client(admin, auth)
        .await?
        .close_tunnel(CloseTunnelRequest { id: id.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let t = resp.into_inner().tunnel.unwrap_or_default();
    out(&format!("closed {} (was {})\n", t.id, host_of(&t)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_only_where_localhost_reaches() {
        let at = |addresses: &[&str]| {
            host_of(&Tunnel {
                host_port: 8080,
                host_addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            })
        };
        assert_eq!(at(&["127.0.0.1:8080", "[::1]:8080"]), "localhost:8080");
        assert_eq!(at(&["127.0.0.2:8080"]), "127.0.0.2:8080");
        assert_eq!(at(&["0.0.0.0:8080"]), "0.0.0.0:8080");
        assert_eq!(
            at(&["127.0.0.1:8080", "198.18.0.1:8080"]),
            "127.0.0.1:8080,198.18.0.1:8080"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = Tunnel {
            id: "default:tcp:8080".into(),
            state: TunnelState::Active as i32,
            host_port: 8081,
            bytes_in: 2048,
            note: "host port 8080 is busy; forwarded on 8081 instead".into(),
            ..Default::default()
        };
        let out = table(&[t]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("ID "), "{out}");
        assert!(
            lines[1].contains("default:tcp:8080") && lines[1].contains("localhost:8081"),
            "{out}"
        );
        assert!(lines[1].contains("2.0 KiB"), "{out}");
        assert_eq!(lines[0].find("STATE"), lines[1].find("active"), "{out}");
    }

    #[test]
    fn targets_table_says_which_monitor_is_unreachable_and_since_when() {
        let now = chrono::Utc::now();
        let t = |name: &str, connected: bool, secs: i64, error: &str| Target {
            name: name.into(),
            url: format!("http://{name}:7070"),
            connected,
            error: error.into(),
            since: Some(porthole::time::to_proto(
                now - chrono::Duration::seconds(secs),
            )),
            ..Default::default()
        };
        let out = targets_table(
            &[
                t("web", true, 30, ""),
                t("db", false, 600, "Unavailable: tcp connect error"),
            ],
            now,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("TARGET"), "{out}");
        assert!(
            lines[1].contains("web") && lines[1].contains("connected") && lines[1].contains("30s"),
            "{out}"
        );
        assert!(
            lines[2].contains("unreachable")
                && lines[2].contains("10m")
                && lines[2].contains("tcp connect error"),
            "{out}"
        );
        assert_eq!(lines[0].find("LINK"), lines[1].find("connected"), "{out}");
    }

    #[test]
    fn table_escapes_what_the_container_sent() {
        let t = Tunnel {
            id: "default:tcp:8080".into(),
            process: Some(porthole::pb::v1::Process {
                pid: 7,
                name: "\x1b]0;PWNED\x07\x1b[2J".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = table(&[t]);
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
        assert!(out.contains("PWNED"), "{out}");
    }
}
