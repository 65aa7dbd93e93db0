//! Which container engine `--docker` follows: the one the user's own CLI
//! would use. `--engine URL` first, then `DOCKER_HOST`, `CONTAINER_HOST`
//! (Podman's), the current `docker context` (`DOCKER_CONTEXT`, else
//! `currentContext` in `~/.docker/config.json`), then the first socket
//! this user can connect to: Docker's, Podman's rootless
//! (`$XDG_RUNTIME_DIR/podman/`), then Podman's rootful.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where an engine's API is, and why tunnel-svc looks there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `unix:///path` or `tcp://host:port`.
    pub url: String,
    pub from: From,
}

/// Why an endpoint was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    Flag,
    DockerHost,
    ContainerHost,
    /// The named `docker context`.
    Context(String),
    DockerSocket,
    PodmanRootless,
    PodmanRootful,
}

impl fmt::Display for From {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            From::Flag => f.write_str("--engine"),
            From::DockerHost => f.write_str("DOCKER_HOST"),
            From::ContainerHost => f.write_str("CONTAINER_HOST"),
            From::Context(name) => write!(f, "docker context {name:?}"),
            From::DockerSocket => f.write_str("Docker's socket"),
            From::PodmanRootless => f.write_str("Podman's rootless socket"),
            From::PodmanRootful => f.write_str("Podman's socket"),
        }
    }
}

/// Why no engine was found.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoEngine {
    #[error(
        "no container engine found: no --engine, DOCKER_HOST, CONTAINER_HOST or docker \
         context, and none of {} answers",
        .0.join(", ")
    )]
    NoSocket(Vec<String>),
    #[error("docker context {name:?} ({why}); `docker context ls` lists them")]
    Context { name: String, why: String },
    #[error(
        "engine {url:?} ({from}): use unix:///PATH, tcp://HOST:PORT or \
         ssh://[USER@]HOST[:PORT][/SOCKET]"
    )]
    Unsupported { url: String, from: String },
}

/// What discovery looks at: the environment, the home directory, which
/// sockets answer (so it can be tested without them).
pub struct Look<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub home: Option<PathBuf>,
    pub answers: &'a dyn Fn(&Path) -> bool,
}

impl Look<'_> {
    fn var(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }
}

/// The engine for `--engine flag` as this process's user would find it.
pub fn find_here(flag: Option<&str>) -> Result<Endpoint, NoEngine> {
    let env = |name: &str| std::env::var(name).ok();
    // A socket that is there but not this user's (Docker's, for a user
    // outside the docker group) is passed over.
    let answers = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
    let look = Look {
        env: &env,
        home: std::env::var_os("HOME").map(PathBuf::from),
        answers: &answers,
    };
    find(flag, &look)
}

/// The engine the user's CLI would use (see the module's doc).
pub fn find(flag: Option<&str>, look: &Look) -> Result<Endpoint, NoEngine> {
    let chosen = |url: String, from: From| checked(Endpoint { url, from });
    if let Some(url) = flag {
        return chosen(url.to_string(), From::Flag);
    }
    if let Some(url) = look.var("DOCKER_HOST") {
        return chosen(url, From::DockerHost);
    }
    if let Some(url) = look.var("CONTAINER_HOST") {
        return chosen(url, From::ContainerHost);
    }
    if let Some(endpoint) = context(look)? {
        return checked(endpoint);
    }
    let mut tried = Vec::new();
    let mut sockets = vec![(PathBuf::from("/var/run/docker.sock"), From::DockerSocket)];
    if let Some(dir) = look.var("XDG_RUNTIME_DIR") {
        sockets.push((
            Path::new(&dir).join("podman/podman.sock"),
            From::PodmanRootless,
        ));
    }
    sockets.push((
        PathBuf::from("/run/podman/podman.sock"),
        From::PodmanRootful,
    ));
    for (path, from) in sockets {
        if (look.answers)(&path) {
            return chosen(format!("unix://{}", path.display()), from);
        }
        tried.push(path.display().to_string());
    }
    Err(NoEngine::NoSocket(tried))
}

/// The current `docker context`'s endpoint, unless it is the default one.
fn context(look: &Look) -> Result<Option<Endpoint>, NoEngine> {
    let config = match look.var("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => match &look.home {
            Some(home) => home.join(".docker"),
            None => return Ok(None),
        },
    };
    let name = match look.var("DOCKER_CONTEXT") {
        Some(name) => name,
        None => {
            let Ok(text) = std::fs::read_to_string(config.join("config.json")) else {
                return Ok(None);
            };
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            match json.get("currentContext").and_then(|c| c.as_str()) {
                Some(name) if !name.is_empty() => name.to_string(),
                _ => return Ok(None),
            }
        }
    };
    if name == "default" {
        return Ok(None);
    }
    let fail = |why: String| NoEngine::Context {
        name: name.clone(),
        why,
    };
    // The Docker CLI keeps a context under the SHA-256 of its name.
    use sha2::Digest;
    let digest = porthole::auth::hex(&sha2::Sha256::digest(name.as_bytes()));
    let meta = config.join("contexts/meta").join(digest).join("meta.json");
    let text = std::fs::read_to_string(&meta)
        .map_err(|e| fail(format!("cannot read {}: {e}", meta.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| fail(format!("{} is not JSON: {e}", meta.display())))?;
    let host = json
        .pointer("/Endpoints/docker/Host")
        .and_then(|h| h.as_str())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| fail(format!("{} names no docker endpoint", meta.display())))?;
    Ok(Some(Endpoint {
        url: host.to_string(),
        from: From::Context(name),
    }))
}

/// The endpoint, if tunnel-svc can speak to it.
fn checked(endpoint: Endpoint) -> Result<Endpoint, NoEngine> {
    let url = &endpoint.url;
    let known = ["unix://", "tcp://", "http://", "ssh://"];
    if known.iter().any(|scheme| url.starts_with(scheme)) {
        return Ok(endpoint);
    }
    Err(NoEngine::Unsupported {
        url: url.clone(),
        from: endpoint.from.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn find_with(
        flag: Option<&str>,
        vars: &[(&str, &str)],
        home: Option<&Path>,
        existing: &[&str],
    ) -> Result<Endpoint, NoEngine> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |name: &str| vars.get(name).cloned();
        let existing: Vec<PathBuf> = existing.iter().map(PathBuf::from).collect();
        let answers = move |p: &Path| existing.iter().any(|e| e == p);
        let look = Look {
            env: &env,
            home: home.map(Path::to_path_buf),
            answers: &answers,
        };
        find(flag, &look)
    }

    #[test]
    fn the_flag_then_the_environment_then_the_sockets_that_exist() {
        let all = ["/var/run/docker.sock", "/run/user/1000/podman/podman.sock"];
        let xdg = ("XDG_RUNTIME_DIR", "/run/user/1000");
        let e = find_with(
            Some("unix:///x.sock"),
            &[("DOCKER_HOST", "tcp://h:2375")],
            None,
            &all,
        );
        assert_eq!(e.unwrap().from, From::Flag);
        let e = find_with(None, &[("DOCKER_HOST", "tcp://h:2375")], None, &all).unwrap();
        assert_eq!((e.url.as_str(), e.from), ("tcp://h:2375", From::DockerHost));
        let e = find_with(None, &[("CONTAINER_HOST", "unix:///p.sock")], None, &all).unwrap();
        assert_eq!(e.from, From::ContainerHost);
        let e = find_with(None, &[xdg], None, &all).unwrap();
        assert_eq!(
            (e.url.as_str(), e.from),
            ("unix:///var/run/docker.sock", From::DockerSocket)
        );
        let e = find_with(None, &[xdg], None, &all[1..]).unwrap();
        assert_eq!(
            (e.url.as_str(), e.from),
            (
                "unix:///run/user/1000/podman/podman.sock",
                From::PodmanRootless
            )
        );
        let e = find_with(None, &[], None, &["/run/podman/podman.sock"]).unwrap();
        assert_eq!(e.from, From::PodmanRootful);
        let none = find_with(None, &[xdg], None, &[]).unwrap_err().to_string();
        assert!(
            none.contains("/var/run/docker.sock")
                && none.contains("/run/user/1000/podman/podman.sock")
                && none.contains("/run/podman/podman.sock"),
            "{none}"
        );
    }

    #[test]
    fn the_current_docker_context_names_its_endpoint() {
        let home = std::env::temp_dir().join(format!("ph-ctx-{}", std::process::id()));
        let name = "build-box";
        let digest = porthole::auth::hex(&{
            use sha2::Digest;
            sha2::Sha256::digest(name.as_bytes())
        });
        let meta = home.join(".docker/contexts/meta").join(digest);
        std::fs::create_dir_all(&meta).unwrap();
        std::fs::write(
            meta.join("meta.json"),
            r#"{"Name":"build-box","Metadata":{},"Endpoints":{"docker":{"Host":"unix:///srv/engine.sock","SkipTLSVerify":false}}}"#,
        )
        .unwrap();
        std::fs::write(
            home.join(".docker/config.json"),
            r#"{"auths":{},"currentContext":"build-box"}"#,
        )
        .unwrap();
        let sockets = ["/var/run/docker.sock"];
        let e = find_with(None, &[], Some(&home), &sockets).unwrap();
        assert_eq!(e.url, "unix:///srv/engine.sock");
        assert_eq!(e.from, From::Context(name.into()));
        // DOCKER_HOST wins over the context, as in the Docker CLI;
        // DOCKER_CONTEXT over the config file's.
        let e = find_with(None, &[("DOCKER_HOST", "tcp://h:1")], Some(&home), &sockets);
        assert_eq!(e.unwrap().from, From::DockerHost);
        let e = find_with(
            None,
            &[("DOCKER_CONTEXT", "default")],
            Some(&home),
            &sockets,
        );
        assert_eq!(e.unwrap().from, From::DockerSocket);
        let missing = find_with(None, &[("DOCKER_CONTEXT", "gone")], Some(&home), &sockets);
        assert!(
            matches!(missing, Err(NoEngine::Context { ref name, .. }) if name == "gone"),
            "{missing:?}"
        );
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn an_engine_url_of_another_kind_is_refused_with_the_kinds_there_are() {
        let e = find_with(
            None,
            &[("DOCKER_HOST", "npipe:////./pipe/docker")],
            None,
            &[],
        );
        let why = e.unwrap_err().to_string();
        assert!(
            why.contains("DOCKER_HOST") && why.contains("ssh://"),
            "{why}"
        );
        let e = find_with(None, &[("DOCKER_HOST", "ssh://me@box")], None, &[]);
        assert_eq!(e.unwrap().from, From::DockerHost);
    }
}
