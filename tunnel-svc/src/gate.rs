//! The egress gate: a static forwarder for the other direction. A sandbox
//! whose only way out is the gate reaches a declared list of SSH upstreams
//! through it. Each upstream is relayed on its OWN port, because a port
//! written in a git URL (`ssh://git@forge:30009/repo.git`) overrides the
//! `Port` line of `~/.ssh/config`: a gate on any other port would be
//! unreachable for such URLs. So two upstreams sharing a port are refused
//! when the config is loaded, before anything listens.
//!
//! The gate is the reconciler with one target per upstream (name = alias,
//! backend = direct to its hostname) and one static tunnel each, so every
//! forward shows up in `TunnelAdmin.ListTunnels` with origin EGRESS, its
//! counters, and why its upstream is unreachable when it is.
//!
//! Config file (`.toml` or `.json`):
//!
//! ```toml
//! [[upstream]]
//! host = "forge"              # the alias the sandbox's ssh config uses
//! hostname = "git.example.org" # where the gate connects
//! port = 30009                # default 22; the gate listens on it too
//! ```
//!
//! JSON: `{"upstream": [{"host": "forge", "hostname": "git.example.org", "port": 30009}]}`.

use crate::admin;
use crate::backend::{direct::Direct, Backend};
use crate::config::PortSet;
use crate::reconcile;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One SSH upstream, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The `Host` alias the sandbox's ssh config uses; also the target name.
    pub alias: String,
    /// Where the gate connects: a DNS name or an IP address.
    pub hostname: String,
    /// The upstream's port, and the gate's for it.
    pub port: u16,
}

/// The file as written; checked into [`Upstream`]s by [`parse`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    upstream: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    host: String,
    #[serde(default)]
    hostname: String,
    /// Wider than u16 so 0, 70000 and -1 get our message, not serde's.
    #[serde(default = "default_port")]
    port: i64,
}

fn default_port() -> i64 {
    22
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GateError {
    #[error("the file name must end in .toml or .json")]
    Extension,
    #[error("{0}")]
    Syntax(String),
    #[error("no upstreams: declare at least one [[upstream]] with host, hostname and port")]
    Empty,
    #[error("{entry}: host (the alias the sandbox's ssh config uses) is missing or empty")]
    NoAlias { entry: String },
    #[error(
        "{entry}: bad host alias {alias:?}: use letters, digits, '.', '-' and '_' \
         (it is an ssh Host name and part of tunnel ids)"
    )]
    BadAlias { entry: String, alias: String },
    #[error("{entry}: hostname (where the gate connects) is missing or empty")]
    NoHostname { entry: String },
    #[error(
        "{entry}: bad hostname {hostname:?}: want a DNS name or an IP address \
         (a user belongs in the git URL, not here)"
    )]
    BadHostname { entry: String, hostname: String },
    #[error("{entry}: port {port} is not in 1..65535")]
    Port { entry: String, port: i64 },
    #[error("upstream alias {0:?} is declared twice")]
    DuplicateAlias(String),
    #[error(
        "upstreams {first:?} and {second:?} both use port {port}: the gate listens on each \
         upstream's own port (a port in a git URL overrides ~/.ssh/config's), so one gate \
         cannot serve both; run a second gate on another address for one of them"
    )]
    SharedPort {
        first: String,
        second: String,
        port: u16,
    },
    #[error(
        "upstream {alias:?} uses port {port}, which the admin API (--admin {admin}) also takes; \
         move --admin to another port"
    )]
    AdminPort {
        alias: String,
        port: u16,
        admin: SocketAddr,
    },
    #[error("bad gate host {0:?}: want the gate's address or name as the sandbox reaches it")]
    GateHost(String),
}

/// A config file that cannot be used, and which one.
#[derive(Debug, thiserror::Error)]
#[error("gate config {}: {error}", path.display())]
pub struct LoadError {
    pub path: PathBuf,
    pub error: GateError,
}

/// Reads and checks a gate config file; its extension picks the format.
pub fn load(path: &Path) -> Result<Vec<Upstream>, LoadError> {
    let fail = |error| LoadError {
        path: path.to_path_buf(),
        error,
    };
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => Format::Toml,
        Some("json") => Format::Json,
        _ => return Err(fail(GateError::Extension)),
    };
    let text = porthole::text::read_small_file(path, crate::config::MAX_CONFIG)
        .map_err(|e| fail(GateError::Syntax(format!("cannot read it: {e}"))))?;
    parse(&text, format).map_err(fail)
}

/// Parses and checks a gate config.
pub fn parse(text: &str, format: Format) -> Result<Vec<Upstream>, GateError> {
    let file: File = match format {
        Format::Toml => toml::from_str(text).map_err(|e| GateError::Syntax(e.to_string())),
        Format::Json => serde_json::from_str(text).map_err(|e| GateError::Syntax(e.to_string())),
    }?;
    if file.upstream.is_empty() {
        return Err(GateError::Empty);
    }
    let mut out: Vec<Upstream> = Vec::with_capacity(file.upstream.len());
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (i, e) in file.upstream.into_iter().enumerate() {
        let entry = if e.host.is_empty() {
            format!("upstream #{}", i + 1)
        } else {
            format!("upstream #{} ({:?})", i + 1, e.host)
        };
        let alias = e.host.trim().to_string();
        if alias.is_empty() {
            return Err(GateError::NoAlias { entry });
        }
        let alias_ok = alias.len() <= 64
            && alias
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !alias_ok {
            return Err(GateError::BadAlias { entry, alias });
        }
        let hostname = e.hostname.trim();
        if hostname.is_empty() {
            return Err(GateError::NoHostname { entry });
        }
        let hostname = hostname
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(hostname);
        if !host_ok(hostname) {
            return Err(GateError::BadHostname {
                entry,
                hostname: e.hostname,
            });
        }
        let port = u16::try_from(e.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(GateError::Port {
                entry,
                port: e.port,
            })?;
        if out.iter().any(|u| u.alias.eq_ignore_ascii_case(&alias)) {
            return Err(GateError::DuplicateAlias(alias));
        }
        if let Some(first) = ports.get(&port) {
            return Err(GateError::SharedPort {
                first: first.clone(),
                second: alias,
                port,
            });
        }
        ports.insert(port, alias.clone());
        out.push(Upstream {
            alias,
            hostname: hostname.to_string(),
            port,
        });
    }
    Ok(out)
}

/// A DNS name or an IP address (IPv6 without brackets).
fn host_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && (h.parse::<IpAddr>().is_ok()
            || h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
}

/// Refuses an upstream whose port the admin API already takes on an
/// address the forwards listen on.
pub fn check_admin(
    upstreams: &[Upstream],
    listen: &[IpAddr],
    admin: SocketAddr,
) -> Result<(), GateError> {
    let overlaps = listen
        .iter()
        .any(|ip| ip.is_unspecified() || admin.ip().is_unspecified() || *ip == admin.ip());
    match upstreams.iter().find(|u| u.port == admin.port()) {
        Some(u) if overlaps => Err(GateError::AdminPort {
            alias: u.alias.clone(),
            port: u.port,
            admin,
        }),
        _ => Ok(()),
    }
}

/// The `Host` blocks a sandbox's `~/.ssh/config` needs to reach every
/// upstream through the gate at `gate_host`. `HostKeyAlias` names the
/// upstream the way `known_hosts` does, so the upstream's own host key
/// (not one per gate address) is what ssh checks.
pub fn ssh_config(upstreams: &[Upstream], gate_host: &str) -> Result<String, GateError> {
    let host = gate_host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || !host_ok(host) {
        return Err(GateError::GateHost(gate_host.into()));
    }
    let mut out = format!("# porthole egress gate at {host}: one Host block per upstream.\n");
    for u in upstreams {
        let key_alias = if u.port == 22 {
            u.hostname.clone()
        } else {
            format!("[{}]:{}", u.hostname, u.port)
        };
        let _ = write!(
            out,
            "\nHost {}\n    HostName {host}\n    Port {}\n    HostKeyAlias {key_alias}\n",
            u.alias, u.port
        );
    }
    Ok(out)
}

/// How the gate runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub upstreams: Vec<Upstream>,
    /// Addresses each forward listens on (on its upstream's port).
    pub listen: Vec<IpAddr>,
    pub token: Option<porthole::auth::Token>,
}

/// Runs the gate with its admin API on `admin` until `shutdown` is
/// cancelled; every forward is closed before it returns.
pub async fn run(
    admin: TcpListener,
    opts: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    let mut statics = Vec::new();
    for u in &opts.upstreams {
        tracing::info!(target = %u.alias, hostname = %u.hostname, port = u.port, "egress upstream");
        specs.push(reconcile::TargetSpec {
            name: u.alias.clone(),
            backend: Arc::new(Backend::Direct(Direct {
                host: u.hostname.clone(),
            })),
            monitor_port: 0,
            url: format!("{}:{}", u.hostname, u.port),
            fixed: true,
            published: Default::default(),
            rules: Vec::new(),
            dev: None,
            compose: None,
        });
        statics.push((u.alias.clone(), u.port));
    }
    let reconcile_opts = reconcile::Options {
        bind: opts.listen.clone(),
        skip: PortSet::default(),
        max_tunnels: 0,
        // A gate on another port is useless: a busy port is a FAILED forward saying so.
        remap: false,
        // The operator declared these ports (ssh's 22 among them).
        allow_privileged: true,
        rules: Vec::new(),
        udp: Default::default(),
        // An upstream that does not answer fails the connection at once:
        // git and ssh say so and retry on their own.
        park: crate::tunnel::Park {
            wait: std::time::Duration::ZERO,
            ..Default::default()
        },
        // The gate's ports are its upstreams' own.
        host_ports: None,
        keep_host_ports: false,
    };
    let (handle, task) = reconcile::spawn(specs, reconcile_opts, statics, shutdown.clone());
    tracing::info!(addr = %admin.local_addr()?, "egress gate admin API listening");
    let served = admin::serve(admin, handle, opts.token.clone(), shutdown.clone()).await;
    shutdown.cancel();
    task.await?;
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Vec<Upstream>, GateError> {
        parse(text, Format::Toml)
    }

    #[test]
    fn parses_toml_and_json() {
        let t = toml(
            r#"
            [[upstream]]
            host = "forge"
            hostname = "git.example.org"
            port = 30009

            [[upstream]]
            host = "github"
            hostname = "github.com"
            "#,
        )
        .unwrap();
        let want = vec![
            Upstream {
                alias: "forge".into(),
                hostname: "git.example.org".into(),
                port: 30009,
            },
            Upstream {
                alias: "github".into(),
                hostname: "github.com".into(),
                port: 22,
            },
        ];
        assert_eq!(t, want);
        let j = parse(
            r#"{"upstream": [
                {"host": "forge", "hostname": "git.example.org", "port": 30009},
                {"host": "github", "hostname": "github.com"}
            ]}"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(j, want);
        let v6 = toml("[[upstream]]\nhost = \"v6\"\nhostname = \"[2001:db8::1]\"\n").unwrap();
        assert_eq!(v6[0].hostname, "2001:db8::1");
    }

    #[test]
    fn shared_port_names_both_aliases_and_the_port() {
        let err = toml(
            r#"
            [[upstream]]
            host = "forge"
            hostname = "a.example"
            port = 30009
            [[upstream]]
            host = "mirror"
            hostname = "b.example"
            port = 30009
            "#,
        )
        .unwrap_err();
        assert_eq!(
            err,
            GateError::SharedPort {
                first: "forge".into(),
                second: "mirror".into(),
                port: 30009
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("\"forge\"") && msg.contains("\"mirror\"") && msg.contains("30009"),
            "{msg}"
        );
        // The default port counts too.
        let err = toml(
            "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\n\
             [[upstream]]\nhost = \"b\"\nhostname = \"y\"\nport = 22\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, GateError::SharedPort { port: 22, .. }),
            "{err}"
        );
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("", "no upstreams"),
            ("upstream = []", "no upstreams"),
            (
                "[[upstream]]\nhost = \"a\"\nport = 2222\n",
                "upstream #1 (\"a\"): hostname (where the gate connects) is missing or empty",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"  \"\n",
                "hostname (where the gate connects) is missing or empty",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"git@forge\"\n",
                "bad hostname \"git@forge\"",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nport = 0\n",
                "upstream #1 (\"a\"): port 0 is not in 1..65535",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nport = 65536\n",
                "port 65536 is not in 1..65535",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nport = -22\n",
                "port -22 is not in 1..65535",
            ),
            (
                "[[upstream]]\nhostname = \"x\"\n",
                "upstream #1: host (the alias the sandbox's ssh config uses) is missing",
            ),
            (
                "[[upstream]]\nhost = \"two words\"\nhostname = \"x\"\n",
                "bad host alias \"two words\"",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\n\
                 [[upstream]]\nhost = \"A\"\nhostname = \"y\"\nport = 2\n",
                "upstream alias \"A\" is declared twice",
            ),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nhostnme = \"y\"\n",
                "unknown field `hostnme`",
            ),
            ("[gate]\nlisten = \"0.0.0.0\"\n", "unknown field `gate`"),
            (
                "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nport = \"22\"\n",
                "invalid type",
            ),
        ];
        for (text, want) in cases {
            let err = toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
        let err = parse(
            r#"{"upstream": [{"host": "a", "hostname": "x", "user": "git"}]}"#,
            Format::Json,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `user`"), "{err}");
        let err = parse(r#"{"upstreams": []}"#, Format::Json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `upstreams`"), "{err}");
    }

    #[test]
    fn load_picks_the_format_by_extension() {
        let dir = std::env::temp_dir().join(format!("porthole-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("gate.toml");
        std::fs::write(&t, "[[upstream]]\nhost = \"a\"\nhostname = \"x\"\n").unwrap();
        assert_eq!(load(&t).unwrap()[0].port, 22);
        let j = dir.join("gate.json");
        std::fs::write(&j, r#"{"upstream":[{"host":"a","hostname":"x","port":2}]}"#).unwrap();
        assert_eq!(load(&j).unwrap()[0].port, 2);
        let y = dir.join("gate.yaml");
        std::fs::write(&y, "upstream: []").unwrap();
        let err = load(&y).unwrap_err().to_string();
        assert!(
            err.contains("gate.yaml") && err.contains(".toml or .json"),
            "{err}"
        );
        let err = load(&dir.join("missing.toml")).unwrap_err().to_string();
        assert!(
            err.contains("missing.toml") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_port_may_not_be_an_upstream_port() {
        let ups = toml("[[upstream]]\nhost = \"a\"\nhostname = \"x\"\nport = 7071\n").unwrap();
        let any: Vec<IpAddr> = vec!["0.0.0.0".parse().unwrap()];
        let admin: SocketAddr = "127.0.0.1:7071".parse().unwrap();
        let err = check_admin(&ups, &any, admin).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("7071"), "{err}");
        let other: Vec<IpAddr> = vec!["198.18.0.2".parse().unwrap()];
        assert!(check_admin(&ups, &other, admin).is_ok());
        assert!(check_admin(&ups, &any, "127.0.0.1:7072".parse().unwrap()).is_ok());
    }

    #[test]
    fn ssh_config_blocks() {
        let ups = toml(
            "[[upstream]]\nhost = \"forge\"\nhostname = \"git.example.org\"\nport = 30009\n\
             [[upstream]]\nhost = \"github\"\nhostname = \"github.com\"\n",
        )
        .unwrap();
        assert_eq!(
            ssh_config(&ups, "198.18.0.2").unwrap(),
            "# porthole egress gate at 198.18.0.2: one Host block per upstream.\n\
             \n\
             Host forge\n    HostName 198.18.0.2\n    Port 30009\n    HostKeyAlias [git.example.org]:30009\n\
             \n\
             Host github\n    HostName 198.18.0.2\n    Port 22\n    HostKeyAlias github.com\n"
        );
        assert!(ssh_config(&ups, "[fd00::1]")
            .unwrap()
            .contains("HostName fd00::1\n"));
        for bad in ["", "  ", "a b", "x/y"] {
            assert_eq!(
                ssh_config(&ups, bad),
                Err(GateError::GateHost(bad.into())),
                "{bad:?}"
            );
        }
    }
}
