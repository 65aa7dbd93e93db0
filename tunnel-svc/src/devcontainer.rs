//! Dev Containers' port settings (`forwardPorts`, `portsAttributes`,
//! `otherPortsAttributes` of the devcontainer.json reference), read from a
//! `devcontainer.json` (JSON with comments and trailing commas) or from the
//! `devcontainer.metadata` label (a JSON array of such snippets), merged
//! as the spec merges them, and turned into the rules the plan applies.

use crate::model::{PortSet, RuleFrom};
use crate::rules::{Action, OnForward, Rule, Scheme};
use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeSet;

/// The label the Dev Containers CLI and VS Code put on images and
/// containers they build.
pub const METADATA_LABEL: &str = "devcontainer.metadata";
/// The label naming the devcontainer.json a container was made from.
pub const CONFIG_FILE_LABEL: &str = "devcontainer.config_file";
/// The label naming the folder a container was made for.
pub const LOCAL_FOLDER_LABEL: &str = "devcontainer.local_folder";

/// A container's dev-container settings, from its labels: the
/// `devcontainer.metadata` label, then (when `read_files`: the engine is on
/// this machine) the devcontainer.json its `devcontainer.config_file`
/// label names, else the one in its `devcontainer.local_folder`, applied
/// last. What could not be read comes back as messages.
pub fn from_labels(
    labels: &std::collections::HashMap<String, String>,
    read_files: bool,
) -> (Option<Settings>, Vec<String>) {
    let mut wrong = Vec::new();
    let mut all: Option<Settings> = None;
    if let Some(text) = labels.get(METADATA_LABEL) {
        match Settings::from_label(text) {
            Ok(s) => all.get_or_insert_with(Settings::default).merge(s),
            Err(e) => wrong.push(format!("{METADATA_LABEL}: {e}")),
        }
    }
    let file = match (
        labels.get(CONFIG_FILE_LABEL),
        labels.get(LOCAL_FOLDER_LABEL),
    ) {
        (Some(path), _) => Some(std::path::PathBuf::from(path)),
        (None, Some(folder)) => {
            let folder = std::path::Path::new(folder);
            [".devcontainer/devcontainer.json", ".devcontainer.json"]
                .iter()
                .map(|f| folder.join(f))
                .find(|p| p.is_file())
        }
        (None, None) => None,
    };
    if let Some(path) = file.filter(|_| read_files) {
        match std::fs::read_to_string(&path) {
            Ok(text) => match Settings::from_file(&text) {
                Ok(s) => all.get_or_insert_with(Settings::default).merge(s),
                Err(e) => wrong.push(format!("{}: {e}", path.display())),
            },
            // A folder on another machine, or not this user's to read.
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "devcontainer.json not read")
            }
        }
    }
    (all, wrong)
}

/// A container's compose project and service, from its labels.
pub fn compose_of(labels: &std::collections::HashMap<String, String>) -> Option<Compose> {
    Some(Compose {
        project: labels.get("com.docker.compose.project")?.clone(),
        service: labels.get("com.docker.compose.service")?.clone(),
    })
}

/// What `onAutoForward` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnAutoForward {
    Notify,
    OpenBrowser,
    OpenBrowserOnce,
    OpenPreview,
    Silent,
    Ignore,
}

/// One entry of `portsAttributes`, or `otherPortsAttributes`. Properties
/// of other tools are allowed and left alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attributes {
    pub label: Option<String>,
    pub on_auto_forward: Option<OnAutoForward>,
    pub protocol: Option<Scheme>,
    pub require_local_port: Option<bool>,
    pub elevate_if_needed: Option<bool>,
}

/// A `forwardPorts` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Forward {
    /// `3000`: a port of this container.
    Port(u16),
    /// `"db:5432"`: a port of the compose service `db` beside it.
    Service(String, u16),
}

/// One config snippet, as written (unknown properties are other settings
/// of the spec and left alone).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snippet {
    #[serde(default)]
    forward_ports: Vec<serde_json::Value>,
    #[serde(default)]
    ports_attributes: serde_json::Map<String, serde_json::Value>,
    other_ports_attributes: Option<Attributes>,
}

/// The port settings of one container, merged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// The union of every snippet's, in the order first given.
    pub forward_ports: Vec<Forward>,
    /// By key as written, in the order first given; a later snippet's
    /// value for a key replaces the earlier one.
    pub ports_attributes: Vec<(String, Attributes)>,
    /// The last snippet's that has one.
    pub other: Option<Attributes>,
}

impl Settings {
    /// A devcontainer.json's text (comments and trailing commas allowed).
    pub fn from_file(text: &str) -> Result<Settings, String> {
        let value: serde_json::Value =
            serde_json::from_str(&strip_jsonc(text)).map_err(|e| e.to_string())?;
        Settings::from_snippet(value)
    }

    /// The `devcontainer.metadata` label: an array of snippets (or one).
    pub fn from_label(text: &str) -> Result<Settings, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut all = Settings::default();
        match value {
            serde_json::Value::Array(snippets) => {
                for (i, s) in snippets.into_iter().enumerate() {
                    all.merge(Settings::from_snippet(s).map_err(|e| format!("entry {i}: {e}"))?);
                }
            }
            one => all.merge(Settings::from_snippet(one)?),
        }
        Ok(all)
    }

    fn from_snippet(value: serde_json::Value) -> Result<Settings, String> {
        let s: Snippet = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let mut forward_ports = Vec::new();
        for v in s.forward_ports {
            let f = forward(&v)
                .ok_or_else(|| format!("forwardPorts: {v} is not a port or \"host:port\""))?;
            if !forward_ports.contains(&f) {
                forward_ports.push(f);
            }
        }
        let mut ports_attributes = Vec::new();
        for (key, v) in s.ports_attributes {
            let a: Attributes =
                serde_json::from_value(v).map_err(|e| format!("portsAttributes {key:?}: {e}"))?;
            ports_attributes.push((key, a));
        }
        Ok(Settings {
            forward_ports,
            ports_attributes,
            other: s.other_ports_attributes,
        })
    }

    /// Merges `later` into these as the spec merges image metadata and
    /// devcontainer.json: `forwardPorts` the union, `portsAttributes` per
    /// key with the last value winning, `otherPortsAttributes` the last.
    pub fn merge(&mut self, later: Settings) {
        for f in later.forward_ports {
            if !self.forward_ports.contains(&f) {
                self.forward_ports.push(f);
            }
        }
        for (key, a) in later.ports_attributes {
            match self.ports_attributes.iter_mut().find(|(k, _)| *k == key) {
                Some((_, old)) => *old = a,
                None => self.ports_attributes.push((key, a)),
            }
        }
        if later.other.is_some() {
            self.other = later.other;
        }
    }

    /// The rules for the container these settings are of, and for
    /// `service:PORT` entries of siblings naming `own_service`. Keys that
    /// do not parse come back as messages.
    pub fn rules(&self, own_service: Option<&str>) -> (DevRules, Vec<String>) {
        let mut out = DevRules::default();
        let mut wrong = Vec::new();
        let mine =
            |host: &str| matches!(host, "localhost" | "127.0.0.1") || Some(host) == own_service;
        for f in &self.forward_ports {
            match f {
                Forward::Port(p) => {
                    out.forward.insert(*p);
                }
                Forward::Service(host, p) if mine(host) => {
                    out.forward.insert(*p);
                }
                Forward::Service(..) => {}
            }
        }
        // A port's own key first, then ranges, host:port and regular
        // expressions in the order written, then otherPortsAttributes.
        let mut exact = Vec::new();
        let mut rest = Vec::new();
        for (key, a) in &self.ports_attributes {
            match Key::parse(key) {
                Ok(Key::Ports(ports, single)) => {
                    let r = rule(Some(ports), None, a);
                    if single {
                        exact.push(r)
                    } else {
                        rest.push(r)
                    }
                }
                Ok(Key::HostPort(host, port)) if mine(&host) => {
                    exact.push(rule(Some(single(port)), None, a));
                }
                Ok(Key::HostPort(..)) => {}
                Ok(Key::Process(re)) => rest.push(rule(None, Some(re), a)),
                Err(e) => wrong.push(format!("portsAttributes {key:?}: {e}")),
            }
        }
        out.rules = exact.into_iter().chain(rest).collect();
        if let Some(other) = &self.other {
            out.rules.push(rule(None, None, other));
        }
        (out, wrong)
    }

    /// What these settings say about the ports of the compose service
    /// `service` beside them (`"service:PORT"` in `forwardPorts` and as
    /// `portsAttributes` keys), as settings of that service's own.
    pub fn for_service(&self, service: &str) -> Settings {
        let named = |host: &str| host == service;
        let forward_ports = self
            .forward_ports
            .iter()
            .filter_map(|f| match f {
                Forward::Service(h, p) if named(h) => Some(Forward::Port(*p)),
                _ => None,
            })
            .collect();
        let ports_attributes = self
            .ports_attributes
            .iter()
            .filter_map(|(k, a)| match Key::parse(k) {
                Ok(Key::HostPort(h, p)) if named(&h) => Some((p.to_string(), a.clone())),
                _ => None,
            })
            .collect();
        Settings {
            forward_ports,
            ports_attributes,
            other: None,
        }
    }
}

/// A container's place in a compose project (its
/// `com.docker.compose.project` and `com.docker.compose.service` labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compose {
    pub project: String,
    pub service: String,
}

/// The rules of a target with settings `own`, in compose slot `compose`
/// beside `siblings` (their settings): its own, then what each sibling
/// says about its service's ports. What does not parse comes back as
/// messages.
pub fn resolve<'a>(
    own: Option<&Settings>,
    compose: Option<&Compose>,
    siblings: impl Iterator<Item = &'a Settings>,
) -> (DevRules, Vec<String>) {
    let mut all = own.cloned().unwrap_or_default();
    if let Some(c) = compose {
        for s in siblings {
            all.merge(s.for_service(&c.service));
        }
    }
    all.rules(compose.map(|c| c.service.as_str()))
}

/// The rules a container's dev-container settings make, matched after
/// `porthole.*` labels and `--config`'s, and its `forwardPorts`.
#[derive(Clone, Debug, Default)]
pub struct DevRules {
    pub rules: Vec<Rule>,
    /// Always forwarded (TCP), whatever the skip list and `onAutoForward`
    /// say, listening or not.
    pub forward: BTreeSet<u16>,
}

/// A `portsAttributes` key.
enum Key {
    /// A port or a range (and whether it is one port).
    Ports(PortSet, bool),
    /// `"host:port"`.
    HostPort(String, u16),
    /// Anything else: a regular expression matched against the listening
    /// process's command line.
    Process(Regex),
}

impl Key {
    fn parse(key: &str) -> Result<Key, String> {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if digits(key)
            || key
                .split_once('-')
                .is_some_and(|(a, b)| digits(a) && digits(b))
        {
            let ports: PortSet = key
                .parse()
                .map_err(|e: crate::model::BadValue| e.to_string())?;
            return Ok(Key::Ports(ports, digits(key)));
        }
        if let Some((host, port)) = key.rsplit_once(':') {
            let host_like = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if host_like && digits(port) {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{port} is not a port"))?;
                return Ok(Key::HostPort(host.to_string(), port));
            }
        }
        Regex::new(key).map(Key::Process).map_err(|e| e.to_string())
    }
}

fn single(port: u16) -> PortSet {
    port.to_string().parse().expect("a port is a port set")
}

/// The rule for one key's attributes (TCP: forwarded ports are TCP).
fn rule(ports: Option<PortSet>, process: Option<Regex>, a: &Attributes) -> Rule {
    let on = a.on_auto_forward.unwrap_or(OnAutoForward::Notify);
    let mut r = Rule::tcp(ports, process, RuleFrom::DevContainer);
    r.action = if on == OnAutoForward::Ignore {
        Action::Ignore
    } else {
        Action::Forward
    };
    r.on_forward = match on {
        OnAutoForward::Notify | OnAutoForward::Ignore => OnForward::Notify,
        OnAutoForward::OpenBrowser | OnAutoForward::OpenPreview => OnForward::OpenBrowser,
        OnAutoForward::OpenBrowserOnce => OnForward::OpenBrowserOnce,
        OnAutoForward::Silent => OnForward::Silent,
    };
    r.label = a
        .label
        .as_ref()
        .map(|l| l.chars().filter(|c| !c.is_control()).take(64).collect());
    r.scheme = a.protocol;
    r.same_port = a.require_local_port == Some(true);
    r.privileged = a.elevate_if_needed == Some(true);
    r
}

/// A `forwardPorts` entry: a number, or `"host:port"`.
fn forward(v: &serde_json::Value) -> Option<Forward> {
    let port = |n: u64| u16::try_from(n).ok().filter(|p| *p != 0);
    match v {
        serde_json::Value::Number(n) => n.as_u64().and_then(port).map(Forward::Port),
        serde_json::Value::String(s) => {
            if let Ok(n) = s.parse::<u64>() {
                return port(n).map(Forward::Port);
            }
            let (host, p) = s.rsplit_once(':')?;
            let p = port(p.parse().ok()?)?;
            match host {
                "" => None,
                "localhost" | "127.0.0.1" => Some(Forward::Port(p)),
                host => Some(Forward::Service(host.to_string(), p)),
            }
        }
        _ => None,
    }
}

/// JSON with comments (`//`, `/* */`) and trailing commas, as
/// devcontainer.json allows, made plain JSON. Strings are left as they are.
pub fn strip_jsonc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    drop_trailing_commas(&out)
}

/// Removes each `,` that only whitespace separates from a `}` or `]`
/// (outside strings).
fn drop_trailing_commas(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c == ',' {
            let next = bytes[i + 1..].iter().find(|b| !b.is_ascii_whitespace());
            if matches!(next, Some(b'}' | b']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Listener, Proto};

    /// In the style of the public templates: comments, trailing commas.
    const NODE_POSTGRES: &str = r#"// For format details, see https://aka.ms/devcontainer.json.
{
	"name": "Node.js & PostgreSQL",
	"dockerComposeFile": "docker-compose.yml",
	"service": "app",
	"workspaceFolder": "/workspaces/${localWorkspaceFolderBasename}",

	// Features to add to the dev container. More info: https://containers.dev/features.
	// "features": {},

	// Use 'forwardPorts' to make a list of ports inside the container available locally.
	"forwardPorts": [3000, "db:5432"],
	"portsAttributes": {
		"3000": { "label": "Application", "onAutoForward": "openBrowser", },
		"db:5432": { "label": "Database", "onAutoForward": "silent" },
		/* the debugger */ "9229": { "label": "inspector", "onAutoForward": "ignore" },
		"40000-55000": { "onAutoForward": "ignore" },
		".+\\/server.js": { "label": "server.js", "protocol": "https" },
	},
	"otherPortsAttributes": { "onAutoForward": "silent", },
	"postCreateCommand": "yarn install", // a comment after a value
	"remoteUser": "node", "customizations": { "vscode": { "settings": { "url": "http://x//y" } } },
}
"#;

    fn first<'a>(d: &'a DevRules, port: u16, cmd: &[&str]) -> Option<&'a Rule> {
        let listeners = [Listener::of_command(cmd)];
        crate::rules::first(&d.rules, "app", (Proto::Tcp, port), &listeners)
    }

    #[test]
    fn a_template_style_file_parses_with_comments_and_trailing_commas() {
        let s = Settings::from_file(NODE_POSTGRES).unwrap();
        assert_eq!(
            s.forward_ports,
            vec![Forward::Port(3000), Forward::Service("db".into(), 5432)]
        );
        let keys: Vec<&str> = s.ports_attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["3000", "db:5432", "9229", "40000-55000", ".+\\/server.js"],
            "in the order written"
        );
        assert_eq!(
            s.other.as_ref().unwrap().on_auto_forward,
            Some(OnAutoForward::Silent)
        );
        // Strings keep their `//` and `/*`.
        assert!(strip_jsonc(NODE_POSTGRES).contains("http://x//y"));
    }

    #[test]
    fn keys_match_ports_ranges_command_lines_and_the_rest() {
        let (d, wrong) = Settings::from_file(NODE_POSTGRES)
            .unwrap()
            .rules(Some("app"));
        assert!(wrong.is_empty(), "{wrong:?}");
        assert_eq!(d.forward, [3000].into(), "db:5432 is the db service's");
        let app = first(&d, 3000, &["node", "/app/server.js"]).unwrap();
        assert_eq!(
            app.label.as_deref(),
            Some("Application"),
            "its own key first"
        );
        assert_eq!(app.on_forward, OnForward::OpenBrowser);
        assert_eq!(app.from, RuleFrom::DevContainer);
        assert_eq!(first(&d, 9229, &["node"]).unwrap().action, Action::Ignore);
        assert_eq!(first(&d, 41000, &["node"]).unwrap().action, Action::Ignore);
        let server = first(&d, 8080, &["node", "/app/server.js"]).unwrap();
        assert_eq!(
            (server.label.as_deref(), server.scheme),
            (Some("server.js"), Some(Scheme::Https)),
            "a regular expression on the command line"
        );
        let other = first(&d, 8081, &["python3", "-m", "http.server"]).unwrap();
        assert_eq!(
            (other.on_forward, other.label.as_deref()),
            (OnForward::Silent, None),
            "otherPortsAttributes for the rest"
        );
    }

    #[test]
    fn a_service_gets_what_its_siblings_say_about_it() {
        let app = Settings::from_file(NODE_POSTGRES).unwrap();
        let compose = Compose {
            project: "p".into(),
            service: "db".into(),
        };
        let (db, _) = resolve(None, Some(&compose), [&app].into_iter());
        assert_eq!(db.forward, [5432].into());
        let pg = first(&db, 5432, &["postgres"]).unwrap();
        assert_eq!(
            (pg.label.as_deref(), pg.on_forward),
            (Some("Database"), OnForward::Silent)
        );
        assert!(
            first(&db, 3000, &["x"]).is_none(),
            "the app's own keys stay the app's"
        );
        let web = Compose {
            service: "web".into(),
            ..compose
        };
        let (none, _) = resolve(None, Some(&web), [&app].into_iter());
        assert!(none.rules.is_empty() && none.forward.is_empty());
    }

    #[test]
    fn metadata_snippets_merge_as_the_spec_says() {
        let label = r#"[
            {"id": "ghcr.io/devcontainers/features/node:1"},
            {"forwardPorts": [3000, 8080], "portsAttributes": {"3000": {"label": "first"}, "8080": {"label": "web"}},
             "otherPortsAttributes": {"onAutoForward": "notify"}},
            {"forwardPorts": [3000, "5432"], "portsAttributes": {"3000": {"label": "last", "requireLocalPort": true}},
             "otherPortsAttributes": {"onAutoForward": "ignore"}}
        ]"#;
        let mut s = Settings::from_label(label).unwrap();
        assert_eq!(
            s.forward_ports,
            vec![
                Forward::Port(3000),
                Forward::Port(8080),
                Forward::Port(5432)
            ],
            "the union"
        );
        assert_eq!(
            s.ports_attributes[0].1.label.as_deref(),
            Some("last"),
            "last wins per key"
        );
        assert_eq!(s.ports_attributes[1].1.label.as_deref(), Some("web"));
        assert_eq!(
            s.other.as_ref().unwrap().on_auto_forward,
            Some(OnAutoForward::Ignore)
        );
        // devcontainer.json last.
        s.merge(
            Settings::from_file(r#"{"portsAttributes": {"8080": {"elevateIfNeeded": true}}}"#)
                .unwrap(),
        );
        let (d, _) = s.rules(None);
        let r = first(&d, 3000, &["x"]).unwrap();
        assert_eq!(r.exact_host_port(3000), Some(3000), "requireLocalPort");
        let web = first(&d, 8080, &["x"]).unwrap();
        assert!(
            web.privileged && web.label.is_none(),
            "the file's value replaced the label's"
        );
        assert_eq!(first(&d, 9000, &["x"]).unwrap().action, Action::Ignore);
    }

    #[test]
    fn mistakes_say_where() {
        for (text, says) in [
            (r#"{"forwardPorts": [70000]}"#, "forwardPorts"),
            (r#"{"forwardPorts": ["db:"]}"#, "forwardPorts"),
            (
                r#"{"portsAttributes": {"3000": {"onAutoForward": "explode"}}}"#,
                "3000",
            ),
            (
                r#"{"portsAttributes": {"3000": {"protocol": "gopher"}}}"#,
                "gopher",
            ),
            ("{\"forwardPorts\": [3000", "EOF"),
        ] {
            let e = Settings::from_file(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let s =
            Settings::from_file(r#"{"portsAttributes": {"(": {}, "0-10": {}, "db:99999": {}}}"#)
                .unwrap();
        let (_, wrong) = s.rules(None);
        assert_eq!(wrong.len(), 3, "{wrong:?}");
        assert!(Settings::from_label("not json").is_err());
    }
}
