//! tunnel-svc as a whole: its options, and running it (targets, watchers,
//! the reconciler, Docker, the admin API) until it is told to stop.

use crate::{admin, backend, config, docker, hostports, plan, reconcile, tunnel, watch};
use backend::Backend;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The admin token's file name in the state directory.
pub const ADMIN_TOKEN: &str = "admin.token";

/// Where this user's tunnel-svc keeps its admin token by default.
pub fn default_admin_token() -> Option<std::path::PathBuf> {
    hostports::default_dir().map(|d| d.join(ADMIN_TOKEN))
}

#[derive(Clone, Debug)]
pub struct Options {
    pub targets: Vec<config::Target>,
    pub reconcile: reconcile::Options,
    /// Required on the admin API.
    pub admin_token: Option<porthole::auth::Token>,
    /// Sent to each target's monitor, by target name.
    pub monitor_tokens: std::collections::BTreeMap<String, porthole::auth::Token>,
    /// `--devcontainer` settings, by target name.
    pub devcontainers: std::collections::BTreeMap<String, Arc<crate::devcontainer::Settings>>,
    /// Extra `-o` options for every ssh command.
    pub ssh_options: Vec<String>,
    /// grpc targets reached over TCP carry each connection on its own raw
    /// relay connection (false: only in Relay streams).
    pub raw_relay: bool,
    /// Follow the Docker engine's containers too (`--docker`).
    pub docker: Option<docker::Options>,
    /// `--config FILE`, read again on SIGHUP.
    pub reload: Option<Reload>,
}

/// How to rebuild the policy from `--config FILE` on SIGHUP: the file's
/// skip list, cap and rules, with the flags as they were given.
#[derive(Clone, Debug)]
pub struct Reload {
    pub path: PathBuf,
    pub flag_skip: Vec<config::PortSet>,
    pub no_default_skip: bool,
    pub flag_max_tunnels: Option<usize>,
    /// Rules may not ask for a host port below 1024 without it.
    pub allow_privileged: bool,
}

impl Reload {
    /// The policy the file and the flags make now.
    pub fn policy(&self) -> Result<reconcile::PolicyUpdate, config::ConfigError> {
        let file = config::ConfigFile::load(&self.path)?;
        self.check(&file)?;
        Ok(self.merge(&file))
    }

    /// What the file may not ask for given the flags.
    pub fn check(&self, file: &config::ConfigFile) -> Result<(), config::ConfigError> {
        let privileged = file.rules.iter().enumerate().find_map(|(i, r)| {
            r.host_port
                .filter(|p| *p < plan::PRIVILEGED && !self.allow_privileged)
                .map(|p| (i + 1, p))
        });
        match privileged {
            Some((n, port)) => Err(config::ConfigError::File {
                path: self.path.display().to_string(),
                why: format!(
                    "rule {n}: host_port {port} is privileged; tunnel-svc binds such ports only \
                     with --allow-privileged-ports"
                ),
            }),
            None => Ok(()),
        }
    }

    /// Flags win over the file for the cap; skip lists add up.
    pub fn merge(&self, file: &config::ConfigFile) -> reconcile::PolicyUpdate {
        let mut skips = self.flag_skip.clone();
        skips.extend(file.skip.clone());
        reconcile::PolicyUpdate {
            skip: config::skip_list(&skips, self.no_default_skip),
            max_tunnels: self
                .flag_max_tunnels
                .or(file.max_tunnels)
                .unwrap_or(DEFAULT_MAX_TUNNELS),
            rules: file.rules.clone(),
        }
    }
}

/// Hands freed memory back to the kernel every time fewer connections are
/// carried, or fewer containers followed, than at the last look (every
/// 2 s), so a burst of connections or containers does not leave tunnel-svc
/// at its peak RSS.
async fn trim_after_connections_end(shutdown: CancellationToken) {
    use std::sync::atomic::Ordering::Relaxed;
    let load = || tunnel::LIVE.load(Relaxed) + docker::FOLLOWED.load(Relaxed) as u64;
    let mut last = load();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = load();
        if now < last {
            porthole::memory::release_free_memory();
        }
        last = now;
    }
}

/// Automatic tunnels per target when neither `--max-tunnels` nor the
/// config file says.
pub const DEFAULT_MAX_TUNNELS: usize = 10;

/// Reads `--config` again on every SIGHUP: a good file replaces the skip
/// list, cap and rules; a bad one is refused with the reason and the old
/// ones stay.
async fn reload_on_hangup(
    reload: Reload,
    reconciler: reconcile::Handle,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; --config is read once");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => {}
        }
        match reload.policy() {
            Ok(policy) => reconciler.set_policy(policy).await,
            Err(e) => tracing::error!(error = %e, "configuration refused; the previous one stays"),
        }
    }
}

/// A private directory for ssh control and forward sockets:
/// `porthole-PID` under `$XDG_RUNTIME_DIR` (or the temp dir). Directories of
/// earlier tunnel-svc processes of this user that are gone (killed) are
/// cleaned up first, their ssh masters told to exit.
async fn runtime_dir() -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let base = std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    backend::ssh::sweep_stale(&base, current_uid()).await;
    let dir = base.join(format!("porthole-{}", std::process::id()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        // Left by an earlier process with our pid: reuse it only if it is
        // ours and private, never a directory someone else planted.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(&dir)?;
            let mine = meta.is_dir()
                && meta.uid() == current_uid()
                && meta.permissions().mode() & 0o077 == 0;
            if !mine {
                anyhow::bail!(
                    "{} exists and is not a private directory of this user; remove it",
                    dir.display()
                );
            }
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    Ok(dir)
}

/// The real uid of this process.
fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// A target's backend: how its tunnels reach the container. ssh masters
/// keep their sockets in `runtime`, made on first use.
async fn backend_of(
    t: &config::Target,
    opts: &Options,
    channel: &porthole::auth::AuthChannel,
    runtime: &mut Option<PathBuf>,
) -> anyhow::Result<Backend> {
    Ok(match t.backend {
        config::BackendKind::Grpc => Backend::Grpc(backend::grpc::Grpc {
            channel: channel.clone(),
            raw: opts.raw_relay.then(|| {
                backend::grpc::Raw::new(
                    t.url.host.clone(),
                    t.url.port,
                    opts.monitor_tokens.get(&t.name).cloned(),
                )
            }),
            token: backend::grpc::TokenFrom::User,
        }),
        config::BackendKind::Direct => Backend::Direct(backend::direct::Direct {
            host: t.url.host.clone(),
        }),
        config::BackendKind::Ssh => {
            let dir = match runtime {
                Some(d) => d.clone(),
                None => runtime.insert(runtime_dir().await?).clone(),
            };
            Backend::Ssh(backend::ssh::Ssh::start(backend::ssh::SshConfig {
                target: t.name.clone(),
                host: t.ssh_host.clone(),
                options: opts.ssh_options.clone(),
                runtime_dir: dir.join(&t.name),
                socket_forwards: Vec::new(),
            }))
        }
    })
}

/// Runs tunnel-svc with its admin API on `admin` until `shutdown` is
/// cancelled; then every tunnel and ssh process is gone before it returns.
pub async fn run(
    admin: TcpListener,
    opts: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    let mut watchers = Vec::new();
    let mut runtime: Option<PathBuf> = None;
    for t in &opts.targets {
        let token = opts.monitor_tokens.get(&t.name).cloned();
        let has_token = token.is_some();
        let channel = backend::grpc::monitor_channel(&t.url, token)?;
        let backend = backend_of(t, &opts, &channel, &mut runtime).await?;
        specs.push(reconcile::TargetSpec {
            name: t.name.clone(),
            backend: Arc::new(backend),
            monitor_port: t.url.port,
            url: t.url.endpoint(),
            fixed: false,
            published: Default::default(),
            rules: Vec::new(),
            dev: opts.devcontainers.get(&t.name).cloned(),
            compose: None,
        });
        watchers.push((t.name.clone(), channel, has_token));
    }
    let (handle, task) =
        reconcile::spawn(specs, opts.reconcile.clone(), Vec::new(), shutdown.clone());
    for (target, channel, token) in watchers {
        tracing::info!(target = %target, token, "watching monitor");
        let w = watch::Watcher {
            target,
            channel,
            reconciler: handle.clone(),
            ignore: Vec::new(),
        };
        tokio::spawn(w.run(shutdown.clone()));
    }
    if let Some(reload) = opts.reload.clone() {
        tokio::spawn(reload_on_hangup(reload, handle.clone(), shutdown.clone()));
    }
    if let Some(docker_opts) = &opts.docker {
        // Where an engine reached over ssh keeps its master's sockets.
        let dir = match &runtime {
            Some(d) => d.clone(),
            None => runtime.insert(runtime_dir().await?).clone(),
        };
        // Checked before anything runs: no engine is said at once.
        docker::start(docker_opts.clone(), &dir, handle.clone(), shutdown.clone()).await?;
    }
    tracing::info!(addr = %admin.local_addr()?, "tunnel-svc admin API listening");
    tokio::spawn(trim_after_connections_end(shutdown.clone()));
    let served = admin::serve(admin, handle, opts.admin_token.clone(), shutdown.clone()).await;
    shutdown.cancel();
    task.await?;
    if let Some(dir) = runtime {
        let _ = std::fs::remove_dir_all(dir);
    }
    served?;
    Ok(())
}
