//! The commands the reconciler takes, and the [`Handle`] the watchers, the
//! admin API and the gate send them with.

use super::{AdminError, Link, PolicyUpdate, TargetSpec, TunnelEvent};
use crate::backend::Backend;
use crate::model::{Listener, PortKey, State, TargetView, TunnelId, TunnelView};
use porthole::fanout::{self, Subscription};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub(super) enum Command {
    Ports {
        target: String,
        ports: BTreeMap<PortKey, Vec<Listener>>,
    },
    Link {
        target: String,
        link: Link,
    },
    Targets(oneshot::Sender<Vec<TargetView>>),
    List {
        target: Option<String>,
        reply: oneshot::Sender<Vec<TunnelView>>,
    },
    Close {
        id: TunnelId,
        reply: oneshot::Sender<Result<TunnelView, AdminError>>,
    },
    Open {
        target: String,
        port: PortKey,
        host_port: Option<u16>,
        reply: oneshot::Sender<Result<TunnelView, AdminError>>,
    },
    Watch(oneshot::Sender<Result<Subscription<TunnelEvent>, fanout::Full>>),
    /// A target that appeared while running (a Docker container).
    AddTarget(TargetSpec),
    /// A target that went away: its tunnels go, their host ports are freed.
    RemoveTarget(String),
    /// A target has a new name (a renamed container): its tunnels, host
    /// ports and connections stay, under ids with the new name; what is
    /// still sent under the old name reaches it.
    RenameTarget {
        from: String,
        to: String,
        url: String,
    },
    /// A target reaches its container another way now: its tunnels start
    /// again on the new backend; what its watcher reported stands.
    SetBackend {
        target: String,
        backend: Arc<Backend>,
        url: String,
        monitor_port: u16,
    },
    /// Reloaded configuration.
    SetPolicy(PolicyUpdate),
    /// Dial the container port of a tunnel through its backend.
    Probe {
        id: TunnelId,
        reply: oneshot::Sender<Result<Probing, AdminError>>,
    },
    /// A backend finished preparing a port.
    Prepared {
        id: TunnelId,
        generation: u64,
        result: Result<(), crate::model::Failure>,
    },
}

/// How the watchers, the admin API and the gate talk to the reconciler.
#[derive(Clone)]
pub struct Handle {
    pub(super) commands: mpsc::Sender<Command>,
}

impl Handle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, AdminError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| AdminError::Stopping)?;
        rx.await.map_err(|_| AdminError::Stopping)
    }

    /// Every port now open in `target`. False once the reconciler stopped.
    pub async fn ports(&self, target: &str, ports: BTreeMap<PortKey, Vec<Listener>>) -> bool {
        let target = target.to_string();
        self.commands
            .send(Command::Ports { target, ports })
            .await
            .is_ok()
    }

    /// `target`'s monitor stream came up or went down.
    pub async fn link(&self, target: &str, link: Link) {
        let target = target.to_string();
        let _ = self.commands.send(Command::Link { target, link }).await;
    }

    pub async fn targets(&self) -> Result<Vec<TargetView>, AdminError> {
        self.ask(Command::Targets).await
    }

    /// Every tunnel, or those of one target.
    pub async fn tunnels(&self, target: Option<String>) -> Result<Vec<TunnelView>, AdminError> {
        self.ask(|reply| Command::List { target, reply }).await
    }

    /// Closes a tunnel; an automatic one stays closed until its port closes.
    pub async fn close(&self, id: TunnelId) -> Result<TunnelView, AdminError> {
        self.ask(|reply| Command::Close { id, reply }).await?
    }

    /// Opens (or moves) a manual tunnel of `port` in `target` (empty: the
    /// only target), on `host_port` exactly if given.
    pub async fn open(
        &self,
        target: String,
        port: PortKey,
        host_port: Option<u16>,
    ) -> Result<TunnelView, AdminError> {
        self.ask(|reply| Command::Open {
            target,
            port,
            host_port,
            reply,
        })
        .await?
    }

    /// Whether a connection through tunnel `id` reaches its server now:
    /// the tunnel as it is, and the dial's outcome.
    pub async fn probe(
        &self,
        id: TunnelId,
    ) -> Result<(TunnelView, Result<(), String>), AdminError> {
        let Probing { tunnel, dial } = self.ask(|reply| Command::Probe { id, reply }).await??;
        let reached = match dial {
            None => Err(format!("the tunnel is {}", state_word(&tunnel.state))),
            Some(dial) => dial
                .await
                .unwrap_or_else(|_| Err("tunnel-svc is stopping".into())),
        };
        Ok((tunnel, reached))
    }

    /// Every tunnel, then every change.
    pub async fn watch(&self) -> Result<Subscription<TunnelEvent>, AdminError> {
        Ok(self.ask(Command::Watch).await??)
    }

    /// Adds a target (replacing one of the same name, tunnels and all).
    pub async fn add_target(&self, spec: TargetSpec) {
        let _ = self.commands.send(Command::AddTarget(spec)).await;
    }

    /// Gives a target a new backend (and the URL and monitor port that go
    /// with it); its tunnels are made again on it.
    pub async fn set_backend(
        &self,
        target: &str,
        backend: Arc<Backend>,
        url: String,
        monitor_port: u16,
    ) {
        let target = target.to_string();
        let set = Command::SetBackend {
            target,
            backend,
            url,
            monitor_port,
        };
        let _ = self.commands.send(set).await;
    }

    /// New rules, skip list and cap (a reloaded `--config`); tunnels follow.
    pub async fn set_policy(&self, policy: PolicyUpdate) {
        let _ = self.commands.send(Command::SetPolicy(policy)).await;
    }

    /// Renames a target; its tunnels stay (see [`Command::RenameTarget`]).
    pub async fn rename_target(&self, from: &str, to: &str, url: String) {
        let rename = Command::RenameTarget {
            from: from.into(),
            to: to.into(),
            url,
        };
        let _ = self.commands.send(rename).await;
    }

    /// Removes a target and every tunnel of it.
    pub async fn remove_target(&self, name: &str) {
        let name = name.to_string();
        let _ = self.commands.send(Command::RemoveTarget(name)).await;
    }
}

/// A probe under way: the tunnel, and the dial's outcome to come (none when
/// the tunnel carries no connections).
pub struct Probing {
    pub(super) tunnel: TunnelView,
    pub(super) dial: Option<oneshot::Receiver<Result<(), String>>>,
}

/// How long a probe's dial may take.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn state_word(state: &State) -> String {
    match state {
        State::Pending => "pending".into(),
        State::Active => "active".into(),
        State::Failed(why) => format!("failed: {why}"),
        State::Closed => "closed".into(),
        State::Capped => "left out by --max-tunnels".into(),
        State::Published(port) => format!("published by Docker on host port {port}"),
    }
}
