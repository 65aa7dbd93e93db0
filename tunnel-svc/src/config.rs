//! What tunnel-svc is asked to do, checked before anything starts: targets,
//! backends, the skip list, bind addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

pub use crate::model::{BackendKind, PortSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("bad target {0:?}: want NAME=URL, e.g. dev=http://198.18.0.2:7070")]
    TargetSyntax(String),
    #[error(
        "bad target name {0:?}: use letters, digits, '-' and '_' (it becomes part of tunnel ids)"
    )]
    TargetName(String),
    #[error("bad monitor URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("target {0:?} is given twice")]
    DuplicateTarget(String),
    #[error("no monitor to watch: give --monitor URL or --target NAME=URL")]
    NoTarget,
    #[error("{flag} names target {target:?}, which no --monitor/--target defines")]
    UnknownTarget { flag: &'static str, target: String },
    #[error("{0} only applies to targets with --backend ssh, and no target uses it")]
    SshOnly(&'static str),
    #[error("{0}")]
    Token(String),
    #[error(transparent)]
    Value(#[from] crate::model::BadValue),
    #[error("{path}: {why}")]
    File { path: String, why: String },
}

/// A monitor URL, checked: `http://HOST[:PORT]` (port 7070 when omitted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorUrl {
    pub host: String,
    pub port: u16,
}

impl MonitorUrl {
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for MonitorUrl {
    type Err = ConfigError;
    fn from_str(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Url {
            url: url.into(),
            why: why.into(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "TLS is not supported; use http:// (the monitor speaks plaintext)",
                ))
            }
            Some(other) => return Err(bad(&format!("scheme {other:?} is not http"))),
            None => return Err(bad("missing http:// in front")),
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("a monitor URL has no path"));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(7070);
        if port == 0 {
            return Err(bad("port 0"));
        }
        Ok(MonitorUrl { host, port })
    }
}

/// Parses `NAME=URL`.
pub fn parse_target(s: &str) -> Result<(String, MonitorUrl), ConfigError> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| ConfigError::TargetSyntax(s.into()))?;
    check_name(name)?;
    Ok((name.to_string(), url.parse()?))
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::TargetName(name.into()))
    }
}

/// The ports never forwarded automatically: the defaults (unless
/// `--no-default-skip`) plus every `--skip`.
pub fn skip_list(extra: &[PortSet], no_defaults: bool) -> PortSet {
    let base = if no_defaults {
        PortSet::default()
    } else {
        DEFAULT_SKIP.parse().expect("the default skip list parses")
    };
    extra.iter().fold(base, |all, s| all.union(s))
}

/// The classic system ports a developer never wants forwarded.
pub const DEFAULT_SKIP: &str = "22,25,53,80,110,143,443,993,995";

/// Per-target settings after merging the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub url: MonitorUrl,
    pub backend: BackendKind,
    /// ssh destination (an alias from the user's ssh config); defaults to the URL's host.
    pub ssh_host: String,
    /// The monitor's bearer token (`--monitor-token-file`, else `--token-file`).
    pub token_file: Option<std::path::PathBuf>,
    /// Its devcontainer.json (`--devcontainer`).
    pub devcontainer: Option<std::path::PathBuf>,
}

/// `[TARGET=]VALUE` flags: a value for every target, or for one.
pub fn split_scoped(s: &str) -> (Option<&str>, &str) {
    match s.split_once('=') {
        Some((t, v)) if check_name(t).is_ok() && !v.is_empty() => (Some(t), v),
        _ => (None, s),
    }
}

/// Builds the target list from `--monitor`, `--target`, the config file's
/// `[[target]]`s, `--backend` (the file's `backend` wins for its target)
/// and `--ssh-host`.
pub fn targets(
    monitor: Option<&str>,
    target_flags: &[String],
    backend_flags: &[String],
    ssh_host_flags: &[String],
    file: &[FileTarget],
) -> Result<Vec<Target>, ConfigError> {
    let mut urls: BTreeMap<String, MonitorUrl> = BTreeMap::new();
    if let Some(url) = monitor {
        urls.insert("default".into(), url.parse()?);
    }
    for t in target_flags {
        let (name, url) = parse_target(t)?;
        if urls.insert(name.clone(), url).is_some() {
            return Err(ConfigError::DuplicateTarget(name));
        }
    }
    for t in file {
        if urls.insert(t.name.clone(), t.url.clone()).is_some() {
            return Err(ConfigError::DuplicateTarget(t.name.clone()));
        }
    }
    if urls.is_empty() {
        return Err(ConfigError::NoTarget);
    }
    let mut out: Vec<Target> = urls
        .into_iter()
        .map(|(name, url)| Target {
            ssh_host: url.host.clone(),
            name,
            url,
            backend: BackendKind::Grpc,
            token_file: None,
            devcontainer: None,
        })
        .collect();
    apply_scoped(&mut out, "--backend", backend_flags, &|t, v| {
        t.backend = v.parse()?;
        Ok(())
    })?;
    for (t, backend) in file.iter().filter_map(|f| Some((&f.name, f.backend?))) {
        if let Some(target) = out.iter_mut().find(|o| o.name == *t) {
            target.backend = backend;
        }
    }
    apply_scoped(&mut out, "--ssh-host", ssh_host_flags, &|t, v| {
        t.ssh_host = v.to_string();
        Ok(())
    })?;
    if !ssh_host_flags.is_empty() && !out.iter().any(|t| t.backend == BackendKind::Ssh) {
        return Err(ConfigError::SshOnly("--ssh-host"));
    }
    Ok(out)
}

/// Applies `[TARGET=]VALUE` flags to `targets`: unscoped values first, so
/// `--backend ssh --backend web=grpc` means what it says.
pub fn apply_scoped(
    targets: &mut [Target],
    flag: &'static str,
    values: &[String],
    set: &dyn Fn(&mut Target, &str) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    for scoped in [false, true] {
        for v in values {
            let (target, value) = split_scoped(v);
            if target.is_some() != scoped {
                continue;
            }
            let mut matched = false;
            for t in targets
                .iter_mut()
                .filter(|t| target.is_none_or(|n| n == t.name))
            {
                set(t, value)?;
                matched = true;
            }
            if let (Some(name), false) = (target, matched) {
                return Err(ConfigError::UnknownTarget {
                    flag,
                    target: name.into(),
                });
            }
        }
    }
    Ok(())
}

/// Host addresses tunnels listen on by default: both loopbacks, so
/// `localhost` works whichever way it resolves.
pub fn default_bind() -> Vec<IpAddr> {
    vec![
        "127.0.0.1".parse().expect("literal"),
        "::1".parse().expect("literal"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BadValue;

    #[test]
    fn monitor_urls() {
        let u: MonitorUrl = "http://198.18.0.2:7070".parse().unwrap();
        assert_eq!(
            u,
            MonitorUrl {
                host: "198.18.0.2".into(),
                port: 7070
            }
        );
        assert_eq!(u.endpoint(), "http://198.18.0.2:7070");
        let u: MonitorUrl = "http://[::1]".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7070));
        assert_eq!(u.endpoint(), "http://[::1]:7070");
        for bad in [
            "198.18.0.2:7070",
            "https://x:1",
            "ftp://x",
            "http://",
            "http://x:7070/path",
            "http://x:0",
            "::",
        ] {
            let err = bad.parse::<MonitorUrl>().unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn port_sets() {
        let s: PortSet = "22, 80,6000-6002".parse().unwrap();
        assert!(s.contains(22) && s.contains(80) && s.contains(6001) && s.contains(6002));
        assert!(!s.contains(23) && !s.contains(6003));
        assert_eq!("".parse::<PortSet>().unwrap(), PortSet::default());
        for bad in ["x", "0", "10-5", "70000", "1-"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad}");
        }
        let d: PortSet = DEFAULT_SKIP.parse().unwrap();
        assert!(d.contains(443) && !d.contains(8080));
        let extra: PortSet = "8080,9000-9002".parse().unwrap();
        let both = skip_list(std::slice::from_ref(&extra), false);
        assert!(
            both.contains(22) && both.contains(8080) && both.contains(9001),
            "skips add to the defaults"
        );
        let only = skip_list(&[extra], true);
        assert!(
            !only.contains(22) && only.contains(8080),
            "--no-default-skip clears them"
        );
        assert!(!skip_list(&[], true).contains(22));
    }

    #[test]
    fn targets_merge_flags() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let ts = targets(
            Some("http://10.0.0.1:7070"),
            &s(&["web=http://198.18.0.6:7070"]),
            &s(&["web=ssh", "direct"]),
            &s(&["web=devbox"]),
            &[],
        )
        .unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!(
            (ts[0].name.as_str(), ts[0].backend),
            ("default", BackendKind::Direct)
        );
        assert_eq!(ts[0].ssh_host, "10.0.0.1");
        assert_eq!(
            (ts[1].name.as_str(), ts[1].backend),
            ("web", BackendKind::Ssh)
        );
        assert_eq!(ts[1].ssh_host, "devbox");
    }

    #[test]
    fn targets_reject_mistakes() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            targets(None, &[], &[], &[], &[]),
            Err(ConfigError::NoTarget)
        );
        assert_eq!(
            targets(Some("http://a"), &s(&["default=http://b"]), &[], &[], &[]),
            Err(ConfigError::DuplicateTarget("default".into()))
        );
        assert!(matches!(
            targets(Some("http://a"), &[], &s(&["nope=ssh"]), &[], &[]),
            Err(ConfigError::UnknownTarget { .. })
        ));
        assert_eq!(
            targets(Some("http://a"), &[], &s(&["telnet"]), &[], &[]),
            Err(ConfigError::Value(BadValue::Backend("telnet".into())))
        );
        assert!(matches!(
            targets(None, &s(&["no-equals"]), &[], &[], &[]),
            Err(ConfigError::TargetSyntax(_))
        ));
        assert!(matches!(
            targets(None, &s(&["a b=http://x"]), &[], &[], &[]),
            Err(ConfigError::TargetName(_))
        ));
    }
}

/// `--config FILE` (TOML; unknown fields are refused): what the flags say,
/// plus rules.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    /// Added to the default skip list and `--skip`.
    skip: Option<String>,
    max_tunnels: Option<usize>,
    bind: Option<Vec<IpAddr>>,
    #[serde(default)]
    target: Vec<FileTargetText>,
    #[serde(default)]
    rule: Vec<crate::rules::RuleFile>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTargetText {
    name: String,
    url: String,
    backend: Option<String>,
}

/// A `[[target]]` of a configuration file, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileTarget {
    pub name: String,
    pub url: MonitorUrl,
    pub backend: Option<BackendKind>,
}

/// A configuration file, checked.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    pub skip: Option<PortSet>,
    pub max_tunnels: Option<usize>,
    pub bind: Option<Vec<IpAddr>>,
    pub targets: Vec<FileTarget>,
    pub rules: Vec<crate::rules::Rule>,
}

/// A `--config` file is at most this big (a megabyte of rules is a
/// mistake; a symlink to `/dev/zero` is refused before it is read).
pub const MAX_CONFIG: u64 = 1 << 20;

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
        let fail = |why: String| ConfigError::File {
            path: path.display().to_string(),
            why,
        };
        let text =
            porthole::text::read_small_file(path, MAX_CONFIG).map_err(|e| fail(e.to_string()))?;
        ConfigFile::parse(&text).map_err(fail)
    }

    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        let f: FileText = toml::from_str(text).map_err(|e| e.to_string())?;
        let skip = f
            .skip
            .as_deref()
            .map(|s| s.parse::<PortSet>().map_err(|e| e.to_string()))
            .transpose()?;
        let targets = f
            .target
            .into_iter()
            .map(|t| {
                check_name(&t.name)?;
                Ok(FileTarget {
                    url: t.url.parse()?,
                    backend: t.backend.as_deref().map(str::parse).transpose()?,
                    name: t.name,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()
            .map_err(|e| e.to_string())?;
        let rules = f
            .rule
            .into_iter()
            .enumerate()
            .map(|(i, r)| crate::rules::Rule::new(i + 1, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ConfigFile {
            skip,
            max_tunnels: f.max_tunnels,
            bind: f.bind,
            targets,
            rules,
        })
    }
}
