//! Per-port rules (`[[rule]]` in `--config FILE`): which automatic tunnels
//! to make, under which label, on which host port. A rule matches by port
//! or range, protocol, the listening process's command line (a regex) and
//! target; the first rule that matches a port decides.

use crate::model::PortSet;
use crate::model::{Listener, PortKey, Proto};
pub use crate::model::{OnForward, RuleFrom, Scheme};
use regex::Regex;
use serde::Deserialize;

/// What a matching rule does with a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Forward,
    Ignore,
}

/// One `[[rule]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// `18800`, `18801-18809` or a list `22,80,6000-6100`.
    pub ports: Option<String>,
    /// `tcp` or `udp`; both when left out.
    pub protocol: Option<String>,
    /// A regex searched in the listening process's command line.
    pub process: Option<String>,
    /// Only this target's ports.
    pub target: Option<String>,
    #[serde(default)]
    pub action: Action,
    /// Shown with the tunnel (`Tunnel.label`, `ls`).
    pub label: Option<String>,
    /// Exactly this host port: a busy one is a FAILED tunnel, never remapped.
    pub host_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    ports: Option<PortSet>,
    protocol: Option<Proto>,
    process: Option<Regex>,
    target: Option<String>,
    pub action: Action,
    pub label: Option<String>,
    pub host_port: Option<u16>,
    /// The container port's own number on the host, or FAILED.
    pub same_port: bool,
    /// May take a host port below 1024 (the container port's own).
    pub privileged: bool,
    pub on_forward: OnForward,
    pub scheme: Option<Scheme>,
    pub from: RuleFrom,
}

impl Rule {
    /// Checks a written rule; `n` is its place (from 1) for messages.
    pub fn new(n: usize, f: RuleFile) -> Result<Rule, String> {
        let at = |why: String| format!("rule {n}: {why}");
        let ports = f
            .ports
            .as_deref()
            .map(|p| p.parse::<PortSet>().map_err(|e| at(e.to_string())))
            .transpose()?;
        let protocol = f
            .protocol
            .as_deref()
            .map(|p| p.parse::<Proto>().map_err(at))
            .transpose()?;
        let process = f
            .process
            .as_deref()
            .map(|p| Regex::new(p).map_err(|e| at(format!("process {p:?}: {e}"))))
            .transpose()?;
        if f.action == Action::Ignore && (f.label.is_some() || f.host_port.is_some()) {
            return Err(at("an ignore rule takes no label or host_port".into()));
        }
        if f.host_port == Some(0) {
            return Err(at("host_port 0 is not a port".into()));
        }
        if let Some(label) = &f.label {
            if label.len() > 64 || label.chars().any(|c| c.is_control()) {
                return Err(at("a label is at most 64 printable characters".into()));
            }
        }
        Ok(Rule {
            ports,
            protocol,
            process,
            target: f.target,
            action: f.action,
            label: f.label,
            host_port: f.host_port,
            same_port: false,
            privileged: false,
            on_forward: OnForward::Notify,
            scheme: None,
            from: RuleFrom::Config(n),
        })
    }

    /// A TCP rule from `from` about `ports` (all when `None`) of processes
    /// whose command line `process` matches (any when `None`), forwarding
    /// them with nothing more said: the caller sets the rest.
    pub fn tcp(ports: Option<PortSet>, process: Option<Regex>, from: RuleFrom) -> Rule {
        Rule {
            ports,
            protocol: Some(Proto::Tcp),
            process,
            target: None,
            action: Action::Forward,
            label: None,
            host_port: None,
            same_port: false,
            privileged: false,
            on_forward: OnForward::Notify,
            scheme: None,
            from,
        }
    }

    /// What it says beyond forwarding the port.
    pub fn settings(&self) -> crate::model::Settings {
        crate::model::Settings {
            from: Some(self.from),
            scheme: self.scheme,
            on_forward: self.on_forward,
        }
    }

    /// The host port this rule asks for `port`, exactly, if it asks.
    pub fn exact_host_port(&self, port: u16) -> Option<u16> {
        self.host_port.or(self.same_port.then_some(port))
    }

    /// Whether this rule is about `port` of `target`, with these listeners
    /// on it.
    fn matches(&self, target: &str, (proto, port): PortKey, listeners: &[Listener]) -> bool {
        self.protocol.is_none_or(|p| p == proto)
            && self.ports.as_ref().is_none_or(|p| p.contains(port))
            && self.target.as_deref().is_none_or(|t| t == target)
            && self.process.as_ref().is_none_or(|re| {
                listeners.iter().any(|l| {
                    l.process.as_ref().is_some_and(|p| {
                        let line = if p.cmdline.is_empty() {
                            p.name.clone()
                        } else {
                            p.cmdline.join(" ")
                        };
                        re.is_match(&line)
                    })
                })
            })
    }
}

/// Rules a Docker container carries in its labels, for its own ports:
/// `porthole.ignore=PORTS` (e.g. `5432,8001-8009`), `porthole.label.PORT=TEXT`
/// and `porthole.host_port.PORT=HOSTPORT`. Labels that do not parse are
/// returned as messages and left out.
pub fn from_labels<'a>(
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (Vec<Rule>, Vec<String>) {
    let mut rules = Vec::new();
    let mut wrong = Vec::new();
    let mut per_port: std::collections::BTreeMap<u16, RuleFile> = Default::default();
    for (key, value) in labels {
        let Some(what) = key.strip_prefix("porthole.") else {
            continue;
        };
        let port_of = |rest: &str| rest.parse::<u16>().ok().filter(|p| *p != 0);
        let made = match what.split_once('.') {
            None if what == "ignore" => Rule::new(
                0,
                RuleFile {
                    ports: Some(value.into()),
                    action: Action::Ignore,
                    ..Default::default()
                },
            )
            .map(|r| {
                rules.push(Rule {
                    from: RuleFrom::Label,
                    ..r
                })
            }),
            Some(("label", port)) => match port_of(port) {
                Some(p) => {
                    per_port.entry(p).or_default().label = Some(value.into());
                    Ok(())
                }
                None => Err(format!("{key}: {port:?} is not a port")),
            },
            Some(("host_port", port)) => match (port_of(port), value.parse::<u16>()) {
                // A container never makes the host bind a privileged port.
                (Some(_), Ok(h)) if h < crate::model::PRIVILEGED => Err(format!(
                    "host port {h} is privileged; labels may pin ports from {} up",
                    crate::model::PRIVILEGED
                )),
                (Some(p), Ok(h)) => {
                    per_port.entry(p).or_default().host_port = Some(h);
                    Ok(())
                }
                _ => Err(format!(
                    "{key}={value}: want porthole.host_port.PORT=HOSTPORT"
                )),
            },
            _ => Err(format!("{key}: unknown porthole label")),
        };
        if let Err(e) = made {
            wrong.push(format!("{key}: {e}"));
        }
    }
    // Ignores first: a port both ignored and labelled is ignored.
    for (port, mut f) in per_port {
        f.ports = Some(port.to_string());
        match Rule::new(0, f) {
            Ok(r) => rules.push(Rule {
                from: RuleFrom::Label,
                ..r
            }),
            Err(e) => wrong.push(format!("porthole labels of port {port}: {e}")),
        }
    }
    (rules, wrong)
}

/// The first rule about `port` of `target`, if any.
pub fn first<'a>(
    rules: &'a [Rule],
    target: &str,
    port: PortKey,
    listeners: &[Listener],
) -> Option<&'a Rule> {
    rules.iter().find(|r| r.matches(target, port, listeners))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<Vec<Rule>, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct F {
            rule: Vec<RuleFile>,
        }
        let f: F = toml::from_str(text).map_err(|e| e.to_string())?;
        f.rule
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::new(i + 1, r))
            .collect()
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let r = rules(
            r#"
            [[rule]]
            ports = "18800"
            label = "web"
            [[rule]]
            ports = "18801-18809"
            action = "ignore"
            [[rule]]
            process = "postgres"
            action = "ignore"
            [[rule]]
            target = "db"
            protocol = "tcp"
            host_port = 15432
            [[rule]]
            protocol = "udp"
            ports = "53"
            label = "dns"
            "#,
        )
        .unwrap();
        let web = Listener::of_command(&["python3", "-m", "http.server"]);
        let pg = Listener::of_command(&["/usr/lib/postgresql/bin/postgres", "-D", "/data"]);
        let hit =
            |t: &str, p: u16, l: &Listener| first(&r, t, (Proto::Tcp, p), std::slice::from_ref(l));
        assert_eq!(
            hit("dev", 18800, &web).unwrap().label.as_deref(),
            Some("web")
        );
        assert_eq!(hit("dev", 18805, &web).unwrap().action, Action::Ignore);
        assert_eq!(hit("dev", 5432, &pg).unwrap().action, Action::Ignore);
        assert!(
            hit("dev", 18800, &pg).unwrap().label.is_some(),
            "first match wins"
        );
        assert!(hit("dev", 9000, &web).is_none());
        assert_eq!(hit("db", 9000, &web).unwrap().host_port, Some(15432));
        let udp = |t: &str, p: u16| first(&r, t, (Proto::Udp, p), std::slice::from_ref(&web));
        assert_eq!(
            udp("dev", 18805).unwrap().action,
            Action::Ignore,
            "no protocol: both"
        );
        assert!(udp("db", 9000).is_none(), "a tcp rule leaves UDP alone");
        assert_eq!(udp("dev", 53).unwrap().label.as_deref(), Some("dns"));
        assert!(
            hit("dev", 53, &web).is_none(),
            "a udp rule leaves TCP alone"
        );
    }

    #[test]
    fn docker_labels_carry_rules() {
        let (r, wrong) = from_labels([
            ("porthole.ignore", "5432,8001-8009"),
            ("porthole.label.8000", "web"),
            ("porthole.host_port.8000", "18000"),
            ("porthole.label.x", "bad"),
            ("porthole.host_port.22", "22"),
            ("porthole.colour", "blue"),
            ("com.example.other", "kept out"),
        ]);
        assert_eq!(wrong.len(), 3, "{wrong:?}");
        assert!(wrong.iter().any(|w| w.contains("privileged")), "{wrong:?}");
        let l = Listener::of_command(&["srv"]);
        let hit = |p: u16| first(&r, "c", (Proto::Tcp, p), std::slice::from_ref(&l));
        assert_eq!(hit(5432).unwrap().action, Action::Ignore);
        assert_eq!(hit(8003).unwrap().action, Action::Ignore);
        let web = hit(8000).unwrap();
        assert_eq!(
            (web.label.as_deref(), web.host_port),
            (Some("web"), Some(18000))
        );
        assert_eq!(web.from.to_string(), "a container label");
        assert!(r.iter().all(|r| r.from == RuleFrom::Label));
        assert!(hit(9000).is_none());
    }

    #[test]
    fn mistakes_are_refused_with_the_rule_number() {
        for (text, says) in [
            ("[[rule]]\nports = \"x\"", "rule 1"),
            ("[[rule]]\nprotocol = \"sctp\"", "sctp"),
            ("[[rule]]\nprocess = \"(\"", "process"),
            (
                "[[rule]]\naction = \"ignore\"\nlabel = \"x\"",
                "ignore rule",
            ),
            ("[[rule]]\nhost_port = 0", "host_port 0"),
            ("[[rule]]\nportz = \"1\"", "unknown field"),
            ("[[rule]]\naction = \"drop\"", "unknown variant"),
        ] {
            let err = rules(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
