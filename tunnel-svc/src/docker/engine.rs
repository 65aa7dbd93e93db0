//! Following the engine: its containers' events, which of them get a
//! monitor, and each followed container's target.

use super::monitor::{engine_error, Via};
use super::{DockerError, Options, Transport, FOLLOWED, RESTART_WINDOW};
use crate::model::{PortKey, Proto};
use crate::reconcile::{Handle, Link};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How a followed container is shown (`docker://NAME (ID, IMAGE) via
/// HOW`), shared by its monitor loop and a rename.
#[derive(Clone, Debug)]
pub(super) struct Shown(Arc<Mutex<ShownParts>>);

#[derive(Debug)]
pub(super) struct ShownParts {
    /// Which engine: the scheme (`docker`, `podman`) and, unless it is
    /// Docker's own socket, where (` on unix:///…`).
    pub(super) engine: Arc<EngineShown>,
    pub(super) name: String,
    pub(super) short_id: String,
    pub(super) image: String,
    pub(super) via: Via,
}

impl Shown {
    pub(super) fn new(engine: &Arc<EngineShown>, name: &str, id: &str, image: &str) -> Shown {
        Shown(Arc::new(Mutex::new(ShownParts {
            engine: engine.clone(),
            name: name.into(),
            short_id: id.chars().take(12).collect(),
            image: image.into(),
            via: Via::Exec,
        })))
    }

    pub(super) fn parts(&self) -> std::sync::MutexGuard<'_, ShownParts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn url(&self) -> String {
        let p = self.parts();
        format!(
            "{}://{} ({}, {}) via {}{}",
            p.engine.scheme, p.name, p.short_id, p.image, p.via, p.engine.at
        )
    }

    pub(super) fn name(&self) -> String {
        self.parts().name.clone()
    }

    pub(super) fn via(&self) -> Via {
        self.parts().via.clone()
    }

    /// The url with tunnel bytes going `via`.
    pub(super) fn set_via(&self, via: &Via) -> String {
        self.parts().via = via.clone();
        self.url()
    }

    /// The url under the new name.
    pub(super) fn rename(&self, name: &str) -> String {
        self.parts().name = name.into();
        self.url()
    }
}

/// A container as the engine lists it.
#[derive(Clone, Debug)]
pub(super) struct Container {
    pub(super) id: String,
    pub(super) name: String,
    /// Container ports published on the host with `-p`, with the host
    /// port.
    pub(super) published: BTreeMap<PortKey, u16>,
    /// The labels porthole reads: `porthole.*` (its rules),
    /// `devcontainer.*` and `com.docker.compose.*` (dev-container settings).
    pub(super) labels: HashMap<String, String>,
    /// `--network`: a network's name, `host`, `none` or `container:ID`.
    pub(super) network_mode: String,
    pub(super) shown: Shown,
}

impl Container {
    pub(super) fn from_summary(
        engine: &Arc<EngineShown>,
        c: bollard::models::ContainerSummary,
    ) -> Option<Container> {
        let id = c.id?;
        let name = c
            .names
            .and_then(|n| n.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let published = c
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                use bollard::models::PortSummaryTypeEnum as Type;
                let proto = match p.typ {
                    None | Some(Type::TCP) => Proto::Tcp,
                    Some(Type::UDP) => Proto::Udp,
                    Some(_) => return None,
                };
                Some(((proto, p.private_port), p.public_port?))
            })
            .collect();
        let network_mode = c
            .host_config
            .and_then(|h| h.network_mode)
            .unwrap_or_default();
        let image = c.image.unwrap_or_default();
        Some(Container {
            network_mode,
            shown: Shown::new(engine, &name, &id, &image),
            id,
            name,
            published,
            labels: c
                .labels
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| {
                    ["porthole.", "devcontainer.", "com.docker.compose."]
                        .iter()
                        .any(|p| k.starts_with(p))
                })
                .collect(),
        })
    }

    /// Why the container gets no monitor of its own, if it does not: its
    /// ports are the host's already (`--network host`), or another
    /// container's (`--network container:OTHER`), forwarded as that one's.
    pub(super) fn not_followed(&self) -> Option<String> {
        if self.network_mode == "host" {
            return Some(
                "it uses the host's network (--network host): its ports are on the host \
                 already; nothing to forward"
                    .into(),
            );
        }
        let other = self.network_mode.strip_prefix("container:")?;
        Some(format!(
            "it shares the network of container {} (--network container:): its ports are \
             that container's, forwarded once, as that container's",
            &other[..other.len().min(12)]
        ))
    }
}

/// How targets show the engine they run on.
pub(super) struct EngineShown {
    /// `docker` or `podman`.
    pub(super) scheme: &'static str,
    /// ` on URL`, unless the engine is at Docker's own socket.
    pub(super) at: String,
    /// On another machine, over ssh.
    pub(super) remote: bool,
    /// The ssh master that forwards a remote engine's socket.
    _forward: Option<super::remote::Remote>,
}

impl std::fmt::Debug for EngineShown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.scheme, self.at)
    }
}

/// Connects to the engine at `endpoint`, checks that it answers, and says
/// which engine it is.
pub async fn connect(
    endpoint: &super::discover::Endpoint,
    ssh_options: &[String],
    runtime: &std::path::Path,
) -> Result<(Docker, Arc<EngineShown>), DockerError> {
    use bollard::API_DEFAULT_VERSION;
    let url = &endpoint.url;
    let fail = |e: bollard::errors::Error| DockerError::Engine {
        url: url.clone(),
        from: endpoint.from.to_string(),
        why: e.to_string(),
    };
    let forward = match url.starts_with("ssh://") {
        true => Some(super::remote::open(url, ssh_options, runtime).await?),
        false => None,
    };
    let docker = match (&forward, url.strip_prefix("unix://")) {
        (Some(remote), _) => Docker::connect_with_unix(
            &remote.local.display().to_string(),
            120,
            API_DEFAULT_VERSION,
        ),
        (None, Some(path)) => Docker::connect_with_unix(path, 120, API_DEFAULT_VERSION),
        (None, None) => Docker::connect_with_http(url, 120, API_DEFAULT_VERSION),
    }
    .map_err(fail)?;
    docker.ping().await.map_err(fail)?;
    let version = docker.version().await.map_err(fail)?;
    let podman = version
        .components
        .iter()
        .flatten()
        .any(|c| c.name.to_lowercase().contains("podman"));
    let product = if podman { "Podman" } else { "Docker" };
    tracing::info!(
        engine = %url,
        from = %endpoint.from,
        version = version.version.as_deref().unwrap_or("?"),
        "following {product}'s containers"
    );
    let at = match url.as_str() {
        "unix:///var/run/docker.sock" | "unix:///run/docker.sock" => String::new(),
        other => format!(" on {other}"),
    };
    let scheme = if podman { "podman" } else { "docker" };
    let remote = forward.is_some();
    Ok((
        docker,
        Arc::new(EngineShown {
            scheme,
            at,
            remote,
            _forward: forward,
        }),
    ))
}

/// Follows the engine until `shutdown`: every running container that
/// matches the filters gets a monitor and is a target while it runs.
pub async fn follow(
    docker: Docker,
    engine: Arc<EngineShown>,
    opts: Options,
    reconciler: Handle,
    shutdown: CancellationToken,
) {
    let mut filters: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &opts.filters {
        filters.entry(k.clone()).or_default().push(v.clone());
    }
    let follower = Follower {
        docker,
        engine,
        filters,
        archive: opts.archive.clone(),
        reconciler,
        transport: opts.transport,
        raw_relay: opts.raw_relay,
        attached: Mutex::new(BTreeMap::new()),
        stopping: Mutex::new(BTreeMap::new()),
    };
    let follower = Arc::new(follower);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    // The event stream ends when the engine restarts: subscribe again and
    // catch up with what changed meanwhile.
    loop {
        // Subscribe first, so no start between the listing and the stream
        // is missed (a container seen twice is attached once).
        let mut event_filters = HashMap::new();
        event_filters.insert(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        );
        let events = follower.docker.events(Some(EventsOptions {
            filters: Some(event_filters),
            ..Default::default()
        }));
        follower.clone().resync(&shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = follower.clone().follow_events(events, &shutdown, &mut backoff) => {}
        }
        tracing::warn!("the Docker event stream ended; following it again");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    let ids: Vec<String> = follower
        .attached
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for id in ids {
        follower.detach(&id).await;
    }
}

pub(super) struct Follower {
    pub(super) docker: Docker,
    pub(super) engine: Arc<EngineShown>,
    pub(super) filters: HashMap<String, Vec<String>>,
    pub(super) archive: super::Archive,
    pub(super) reconciler: Handle,
    pub(super) transport: Transport,
    pub(super) raw_relay: bool,
    /// Attached containers by id.
    pub(super) attached: Mutex<BTreeMap<String, Attached>>,
    /// Containers that died, by id: what keeps their tunnels for the
    /// [`RESTART_WINDOW`].
    pub(super) stopping: Mutex<BTreeMap<String, CancellationToken>>,
}

/// A container with a monitor loop.
pub(super) struct Attached {
    /// How it is shown (its name).
    pub(super) shown: Shown,
    /// Stops its monitor.
    pub(super) cancel: CancellationToken,
    /// Wakes its monitor loop: its networks changed (the path to its
    /// monitor is found again), or it was unpaused or started again (a
    /// monitor that could not start is tried at once).
    pub(super) wake: Arc<tokio::sync::Notify>,
}

impl Follower {
    /// Acts on the engine's container events until the stream ends.
    pub(super) async fn follow_events(
        self: Arc<Self>,
        mut events: impl Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
            + Unpin,
        shutdown: &CancellationToken,
        backoff: &mut crate::backoff::Backoff,
    ) {
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "Docker event stream error");
                    return;
                }
            };
            backoff.reset();
            if event.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK) {
                // connect or disconnect: the container's addresses changed.
                let container = event
                    .actor
                    .and_then(|a| a.attributes?.get("container").cloned());
                if let Some(id) = container {
                    self.wake(&id);
                }
                continue;
            }
            let (Some(action), Some(id)) = (event.action, event.actor.and_then(|a| a.id)) else {
                continue;
            };
            match action.as_str() {
                "start" => {
                    // Back (`docker restart`, its restart policy): its
                    // tunnels stay, its monitor loop starts the next
                    // monitor now.
                    self.stopping(&id, None);
                    self.wake(&id);
                    self.clone().attach_matching(&id, shutdown).await
                }
                "die" if self.restarting(&id).await => {
                    tracing::info!(id = %id, "the container died and its restart policy restarts it; its tunnels wait for it");
                }
                "die" => {
                    // Stopped, or restarting (`docker restart` looks the
                    // same until it starts): its tunnels wait RESTART_WINDOW
                    // for it, then close.
                    let gone = CancellationToken::new();
                    self.stopping(&id, Some(gone.clone()));
                    let (me, id) = (self.clone(), id.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = gone.cancelled() => {}
                            _ = tokio::time::sleep(RESTART_WINDOW) => me.detach(&id).await,
                        }
                    });
                }
                "destroy" => self.detach(&id).await,
                "rename" => self.clone().renamed(&id, shutdown).await,
                // Its monitor is frozen with it: the target says so, and
                // new connections wait (see --park).
                "pause" => self.paused(&id, true).await,
                // A monitor that could not be started while the container
                // was paused is tried again now, not after its backoff.
                "unpause" => {
                    self.paused(&id, false).await;
                    self.wake(&id);
                }
                _ => {}
            }
        }
    }

    /// Attaches every running container that matches and is not attached
    /// yet; detaches those that no longer run.
    pub(super) async fn resync(self: Arc<Self>, shutdown: &CancellationToken) {
        let running = match self.list(None).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %engine_error(&e), "cannot list containers");
                return;
            }
        };
        let gone: Vec<String> = {
            let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            attached
                .keys()
                .filter(|id| !running.iter().any(|c| &c.id == *id))
                .cloned()
                .collect()
        };
        for id in gone {
            self.detach(&id).await;
        }
        for c in running {
            self.clone().attach(c, shutdown);
        }
    }

    /// Running containers matching the filters (and `id`, if given).
    pub(super) async fn list(
        &self,
        id: Option<&str>,
    ) -> Result<Vec<Container>, bollard::errors::Error> {
        let mut filters = self.filters.clone();
        filters.insert("status".into(), vec!["running".into()]);
        if let Some(id) = id {
            filters.insert("id".into(), vec![id.into()]);
        }
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| Container::from_summary(&self.engine, c))
            .collect())
    }

    /// Attaches container `id` if it runs and matches the filters.
    pub(super) async fn attach_matching(self: Arc<Self>, id: &str, shutdown: &CancellationToken) {
        match self.list(Some(id)).await {
            Ok(list) => {
                for c in list {
                    self.clone().attach(c, shutdown);
                }
            }
            Err(e) => {
                tracing::warn!(error = %engine_error(&e), id = %id, "cannot look the container up")
            }
        }
    }

    /// Puts a monitor in `c` and makes it a target, in the background.
    pub(super) fn attach(self: Arc<Self>, c: Container, shutdown: &CancellationToken) {
        if let Some(why) = c.not_followed() {
            tracing::info!(container = %c.name, "not followed: {why}");
            return;
        }
        let cancel = shutdown.child_token();
        let wake = Arc::new(tokio::sync::Notify::new());
        {
            let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            if attached.contains_key(&c.id) {
                return;
            }
            let a = Attached {
                shown: c.shown.clone(),
                cancel: cancel.clone(),
                wake: wake.clone(),
            };
            attached.insert(c.id.clone(), a);
            FOLLOWED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let span = tracing::info_span!("docker", container = %c.name);
        tokio::spawn(self.run_monitor(c, cancel, wake).instrument(span));
    }

    /// Whether the engine is restarting container `id` by its restart
    /// policy (`--restart`): its tunnels then stay, their new connections
    /// waiting (see `--park`), for as long as that takes. A container
    /// stopped by hand, or restarted with `docker restart`, looks stopped
    /// here: its tunnels wait only the [`RESTART_WINDOW`].
    pub(super) async fn restarting(&self, id: &str) -> bool {
        let Ok(info) = self.docker.inspect_container(id, None).await else {
            return false;
        };
        info.state.and_then(|s| s.restarting).unwrap_or(false)
    }

    /// Container `id` is stopping, its tunnels closing after the window
    /// unless `wait` is cancelled; None: it started again, they stay.
    pub(super) fn stopping(&self, id: &str, wait: Option<CancellationToken>) {
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        let old = match wait {
            Some(w) => stopping.insert(id.to_string(), w),
            None => stopping.remove(id),
        };
        if let Some(old) = old {
            old.cancel();
        }
    }

    /// Shows container `id` paused (its link down, saying why) or not.
    pub(super) async fn paused(&self, id: &str, paused: bool) {
        let name = {
            let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            attached.get(id).map(|a| a.shown.name())
        };
        let Some(name) = name else {
            return;
        };
        let link = if paused {
            Link::Down {
                error: "the container is paused (docker pause); new connections wait for it".into(),
            }
        } else {
            Link::Up {
                instance_id: String::new(),
            }
        };
        self.reconciler.link(&name, link).await;
    }

    /// Wakes container `id`'s monitor loop, if it is followed (see
    /// [`Attached::wake`]).
    pub(super) fn wake(&self, id: &str) {
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = attached.get(id) {
            a.wake.notify_one();
        }
    }

    /// Container `id` has a new name: its target takes it, and keeps its
    /// tunnels and connections; unless the filters no longer select it.
    pub(super) async fn renamed(self: Arc<Self>, id: &str, shutdown: &CancellationToken) {
        let now = match self.list(Some(id)).await {
            Ok(list) => list.into_iter().next(),
            Err(e) => {
                tracing::warn!(error = %engine_error(&e), id = %id, "cannot look the container up");
                return;
            }
        };
        let shown = self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|a| a.shown.clone());
        match (now, shown) {
            (Some(c), Some(shown)) => {
                let from = shown.name();
                let url = shown.rename(&c.name);
                self.reconciler.rename_target(&from, &c.name, url).await;
                tracing::info!(container = %c.name, was = %from, "container renamed; its tunnels stay");
            }
            (Some(c), None) => self.attach(c, shutdown),
            (None, _) => self.detach(id).await,
        }
    }

    /// The container stopped or went: its target and tunnels go.
    pub(super) async fn detach(&self, id: &str) {
        let gone = self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // Whatever kept it for the restart window has done so.
        self.stopping(id, None);
        if let Some(Attached { shown, cancel, .. }) = gone {
            let name = shown.name();
            cancel.cancel();
            self.reconciler.remove_target(&name).await;
            FOLLOWED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(container = %name, "container stopped; its tunnels are closed");
        }
    }
}
