#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use porthole::telemetry::LogFormat;
use std::collections::BTreeMap;
use std::{net::IpAddr, net::SocketAddr, path::PathBuf};
use tunnel_svc::config;

/// Keeps one host tunnel per open port of one or more containers.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the targets and tunnels of a running tunnel-svc.
    Ls {
        /// table, or json (ListTargets' and ListTunnels' messages in
        /// protobuf's JSON mapping: {"targets": [...], "tunnels": [...]}).
        #[arg(short, long, value_enum, default_value_t)]
        output: tunnel_svc::cli::Output,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every tunnel, then each change, one JSON object per line
    /// (WatchTunnels' messages) until interrupted.
    Watch(ClientArgs),
    /// Print a one-time URL that opens the ports panel in your browser
    /// (good for one use within a minute; it sets a cookie for the panel).
    Ui(ClientArgs),
    /// Serve the Model Context Protocol on stdin/stdout for coding agents:
    /// tools that list, wait for, open, close and explain ports, through
    /// the admin API of the running tunnel-svc.
    Mcp(ClientArgs),
    /// Wait until container port PORT (of TARGET, if several) is forwarded
    /// and a connection through it reaches the server; print the host
    /// address (e.g. localhost:8000). Exit status 3 on timeout, 1 with the
    /// reason when it will not be (failed, closed, not forwarded).
    Wait {
        /// [TARGET:]PORT
        #[arg(value_name = "[TARGET:]PORT")]
        port: tunnel_svc::cli::WaitFor,
        /// The port's protocol: tcp or udp. A UDP tunnel counts as reaching
        /// its server once the monitor sees the server's socket bound (grpc)
        /// or the container's address takes datagrams (direct).
        #[arg(long, default_value = "tcp")]
        protocol: tunnel_svc::model::Proto,
        /// Give up after this long (e.g. 500ms, 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = porthole::time::parse_duration)]
        timeout: std::time::Duration,
        /// table (the host address), or json ({"ready", "host", "url",
        /// "tunnel"}, or {"ready": false, "error"}).
        #[arg(short, long, value_enum, default_value_t)]
        output: tunnel_svc::cli::Output,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Close a tunnel by id (e.g. default:tcp:8080).
    Close {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show porthole working, with nothing set up but root: a throwaway
    /// network-namespace container, monitor-svc and an HTTP server inside,
    /// a tunnel to it and a request through it. Ctrl-C cleans up.
    Demo {
        /// Port of the HTTP server inside the container.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Admin API address while the demo runs.
        #[arg(long, default_value = "127.0.0.1:7071")]
        admin: SocketAddr,
        /// Exit after the first request succeeds.
        #[arg(long)]
        once: bool,
    },
    /// The demo's sample HTTP server (runs inside the demo namespace).
    #[command(hide = true)]
    DemoServer {
        #[arg(long)]
        port: u16,
    },
    /// SSH egress gate: relay each upstream declared in --config, listening
    /// on that upstream's own port (a port in a git URL overrides
    /// ~/.ssh/config, so it must match). Forwards show in ListTunnels.
    Gate(GateArgs),
}

#[derive(clap::Args, Debug)]
struct GateArgs {
    /// Upstreams, .toml or .json: `[[upstream]]` tables of host (the
    /// sandbox's ssh alias), hostname and port (default 22).
    #[arg(long, env = "PORTHOLE_GATE_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// Print the ssh config Host blocks that send each alias through the
    /// gate at GATE_HOST (as the sandbox reaches it), then exit.
    #[arg(long, value_name = "GATE_HOST")]
    print_ssh_config: Option<String>,
    /// Address the forwards listen on, each on its upstream's port. Repeatable.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0")]
    listen: Vec<IpAddr>,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// Admin API of the running tunnel-svc.
    #[arg(long, env = "PORTHOLE_ADMIN", default_value = "127.0.0.1:7071")]
    admin: SocketAddr,
    /// File holding the admin token. Default: admin.token in --state-dir,
    /// where tunnel-svc makes it.
    #[arg(long, env = "PORTHOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The state directory of the tunnel-svc to talk to (as its own
    /// --state-dir). Default $XDG_STATE_HOME/porthole, else
    /// ~/.local/state/porthole.
    #[arg(long, env = "PORTHOLE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnConflict {
    /// Use the next free host port, and say so.
    Next,
    /// Mark the tunnel FAILED with the reason.
    Fail,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Monitor to watch, as target "default" (e.g. http://198.18.0.2:7070).
    #[arg(long, env = "PORTHOLE_MONITOR")]
    monitor: Option<String>,
    /// A named monitor to watch: NAME=URL. Repeatable.
    #[arg(long = "target", value_name = "NAME=URL")]
    targets: Vec<String>,
    /// Backend for every target (grpc, ssh, direct), or TARGET=BACKEND for one. Repeatable.
    #[arg(long = "backend", value_name = "[TARGET=]BACKEND")]
    backends: Vec<String>,
    /// ssh destination (an alias from your ssh config) for every ssh target, or TARGET=ALIAS.
    /// Default: the monitor URL's host.
    #[arg(long = "ssh-host", value_name = "[TARGET=]ALIAS")]
    ssh_hosts: Vec<String>,
    /// Extra `-o` option for every ssh command (e.g. StrictHostKeyChecking=accept-new). Repeatable.
    #[arg(long = "ssh-option", value_name = "OPTION")]
    ssh_options: Vec<String>,
    /// Container ports never forwarded automatically, added to the defaults
    /// (22,25,53,80,110,143,443,993,995): ports and ranges. Repeatable.
    #[arg(long, env = "PORTHOLE_SKIP", value_name = "PORTS")]
    skip: Vec<config::PortSet>,
    /// Forward the default skip list's ports too (only --skip applies).
    #[arg(long)]
    no_default_skip: bool,
    /// Most automatic tunnels per target: existing ones keep their slot, new
    /// ports take free ones lowest first, the rest are listed as pending.
    /// Default 10 (or the config file's).
    #[arg(long, env = "PORTHOLE_MAX_TUNNELS")]
    max_tunnels: Option<usize>,
    /// TOML file with targets, skip, max_tunnels, bind and [[rule]]s
    /// (flags win over it; skip lists add up). SIGHUP reads it again.
    #[arg(long, env = "PORTHOLE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// grpc backend: carry tunnel bytes only in Relay.Dial streams (HTTP/2
    /// frames on the one connection to the monitor), never on raw relay
    /// connections of their own.
    #[arg(long)]
    no_raw_relay: bool,
    /// Let automatic tunnels take a host port that a host process (a
    /// service restarting) held less than 5 minutes ago. By default such a
    /// port is kept for that process: the tunnel moves to another port, or
    /// an exact one waits.
    #[arg(long)]
    no_keep_host_ports: bool,
    /// What to do when a host port is taken.
    #[arg(long, value_enum, default_value_t = OnConflict::Next)]
    on_conflict: OnConflict,
    /// A UDP flow (one host client address) ends after this long without a
    /// datagram either way.
    #[arg(long, default_value = "60s", value_parser = porthole::time::parse_duration)]
    udp_idle_timeout: std::time::Duration,
    /// Most UDP flows one UDP tunnel carries at once; datagrams from further
    /// clients are dropped (and counted) until one ends, or the flow whose
    /// client has been quiet longest (at least 5 s) gives way.
    #[arg(long, default_value_t = tunnel_svc::udp::DEFAULT_MAX_FLOWS as u64,
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    udp_max_flows: u64,
    /// How long a new TCP connection waits while its path comes back (a
    /// monitor restarting, a container paused or reconnected) before it is
    /// reset; 0 fails it at the first failed dial. At most 256 wait per
    /// tunnel.
    #[arg(long, default_value = "15s", value_parser = porthole::time::parse_duration_or_zero)]
    park: std::time::Duration,
    /// Host address tunnels listen on. Repeatable. Default 127.0.0.1 and ::1.
    #[arg(long = "bind", value_name = "ADDR")]
    bind: Vec<IpAddr>,
    /// The monitor's token file for every target, or TARGET=PATH for one
    /// (overrides --token-file for monitors). Repeatable.
    #[arg(long = "monitor-token-file", value_name = "[TARGET=]PATH")]
    monitor_token_files: Vec<String>,
    /// A devcontainer.json whose forwardPorts, portsAttributes and
    /// otherPortsAttributes apply to every --monitor/--target target, or
    /// TARGET=PATH to one (containers of --docker carry their own).
    /// Repeatable.
    #[arg(long = "devcontainer", value_name = "[TARGET=]PATH")]
    devcontainers: Vec<String>,
    /// Follow a container engine (Docker or Podman, local or over ssh; see
    /// --engine): every running container gets a monitor and its ports on
    /// localhost.
    #[arg(long)]
    docker: bool,
    /// Only containers matching KEY=VALUE (label, name or id, as `docker ps
    /// --filter`). Repeatable.
    #[arg(long = "docker-filter", value_name = "KEY=VALUE", requires = "docker",
          value_parser = tunnel_svc::docker::filter)]
    docker_filters: Vec<(String, String)>,
    /// How tunnel bytes reach a container: auto (its own address when the
    /// host reaches it, else the exec stream), exec, or ip.
    #[arg(
        long,
        value_enum,
        default_value_t = tunnel_svc::docker::Transport::Auto,
        requires = "docker"
    )]
    docker_transport: tunnel_svc::docker::Transport,
    /// The container engine to follow: unix:///PATH, tcp://HOST:PORT or
    /// ssh://[USER@]HOST[:PORT][/SOCKET] (through your OpenSSH).
    /// Default: the one your own CLI uses (DOCKER_HOST, CONTAINER_HOST,
    /// the current docker context, Docker's socket, then Podman's rootless
    /// and rootful sockets).
    #[arg(long, value_name = "URL", requires = "docker")]
    engine: Option<String>,
    /// The static monitor-svc put in each container. Default: monitor-svc
    /// beside tunnel-svc.
    #[arg(long, value_name = "PATH", requires = "docker")]
    monitor_binary: Option<PathBuf>,
    /// Let container ports below 1024 take the same host port (root only).
    /// Without it they are forwarded on 10000 + PORT, and said so.
    #[arg(long)]
    allow_privileged_ports: bool,
    #[command(flatten)]
    service: ServiceArgs,
}

/// What every long-running command takes: its admin API, token and logs.
#[derive(clap::Args, Debug)]
struct ServiceArgs {
    /// Address of the admin gRPC API (and /healthz, /metrics).
    #[arg(long, env = "PORTHOLE_ADMIN", default_value = "127.0.0.1:7071")]
    admin: SocketAddr,
    /// File holding a bearer token, required on the admin API and sent to
    /// monitors (unless --admin-token-file / --monitor-token-file say otherwise).
    #[arg(long, env = "PORTHOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// File holding the admin API's own token (instead of --token-file), so
    /// a monitor's token does not open the admin API. Without either, the
    /// token is admin.token in --state-dir, made on first start.
    #[arg(long, env = "PORTHOLE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// This user's private directory for the admin token (admin.token) and
    /// the remembered host ports (host-ports.json). Default
    /// $XDG_STATE_HOME/porthole, else ~/.local/state/porthole.
    #[arg(long, env = "PORTHOLE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log level or tracing filter.
    #[arg(long, env = "PORTHOLE_LOG", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "PORTHOLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl ServiceArgs {
    /// Starts logging and raises the fd limit.
    fn start(&self) -> Result<(), Failure> {
        porthole::telemetry::init(&self.log_level, self.log_format)
            .map_err(|e| Failure::Config(anyhow::Error::msg(e)))?;
        let fds = porthole::net::raise_fd_limit();
        tracing::debug!(limit = ?fds, "file-descriptor limit");
        Ok(())
    }

    /// The admin API's token: the file given, else this user's, made on
    /// first start. Read once the rest of the configuration is known good,
    /// so a mistake leaves nothing behind.
    fn admin_token(&self) -> Result<Option<porthole::auth::Token>, Failure> {
        if let Some(path) = self
            .admin_token_file
            .as_deref()
            .or(self.token_file.as_deref())
        {
            return Ok(read_token(Some(path))?);
        }
        // The admin API is this user's alone: a token only they can read.
        let Some(path) = self
            .state_dir()
            .map(|d| d.join(tunnel_svc::service::ADMIN_TOKEN))
        else {
            return Err(Failure::Config(anyhow::anyhow!(
                "no state directory for the admin token: set HOME, XDG_STATE_HOME or --state-dir"
            )));
        };
        let (token, created) = porthole::auth::Token::load_or_create(&path)
            .map_err(|e| config::ConfigError::Token(e.to_string()))?;
        tracing::info!(token_file = %path.display(), created, "admin API token (tunnel-svc ls and the other commands of this user read it there)");
        Ok(Some(token))
    }

    fn state_dir(&self) -> Option<PathBuf> {
        self.state_dir
            .clone()
            .or_else(tunnel_svc::hostports::default_dir)
    }

    async fn bind_admin(&self) -> anyhow::Result<tokio::net::TcpListener> {
        porthole::net::bind(self.admin)
            .await
            .with_context(|| format!("cannot listen on --admin {}", self.admin))
    }
}

impl ClientArgs {
    /// The admin token: --token-file, else admin.token in the state
    /// directory if there is one.
    fn token(&self) -> Result<tunnel_svc::cli::Credentials, config::ConfigError> {
        if let Some(path) = &self.token_file {
            return Ok(tunnel_svc::cli::Credentials {
                token: read_token(Some(path))?,
                looked_at: Some(path.clone()),
            });
        }
        let path = self
            .state_dir
            .clone()
            .or_else(tunnel_svc::hostports::default_dir)
            .map(|d| d.join(tunnel_svc::service::ADMIN_TOKEN));
        let token = match &path {
            Some(path) if path.exists() => read_token(Some(path))?,
            _ => None,
        };
        Ok(tunnel_svc::cli::Credentials {
            token,
            looked_at: path,
        })
    }
}

fn read_token(
    path: Option<&std::path::Path>,
) -> Result<Option<porthole::auth::Token>, config::ConfigError> {
    path.map(porthole::auth::Token::from_file)
        .transpose()
        .map_err(|e| config::ConfigError::Token(e.to_string()))
}

/// Why tunnel-svc stopped, which decides its exit status.
#[derive(Debug)]
enum Failure {
    /// A configuration mistake: status 2, as clap uses for bad flags.
    Config(anyhow::Error),
    /// Anything else: status 1.
    Runtime(anyhow::Error),
    /// `wait` ran out of time: status 3.
    TimedOut(anyhow::Error),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) => 2,
            Failure::Runtime(_) => 1,
            Failure::TimedOut(_) => 3,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Config(e) | Failure::Runtime(e) | Failure::TimedOut(e) => {
                write!(f, "{e:#}")
            }
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Runtime(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Runtime(e.into())
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Failure {
        Failure::Config(e.into())
    }
}

impl From<tunnel_svc::gate::LoadError> for Failure {
    fn from(e: tunnel_svc::gate::LoadError) -> Failure {
        Failure::Config(e.into())
    }
}

impl From<tunnel_svc::gate::GateError> for Failure {
    fn from(e: tunnel_svc::gate::GateError) -> Failure {
        Failure::Config(e.into())
    }
}

fn main() -> std::process::ExitCode {
    // One worker thread unless TOKIO_WORKER_THREADS asks for more: with
    // several, each datagram or read that wakes one worker also wakes
    // another to take the task it scheduled, which costs more than the
    // relaying (udp-bench and tunnel-bench, docs/performance.md). The
    // kernel moves TCP bytes (splice); one thread keeps up with it.
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(real_main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("Error: {failure}");
            std::process::ExitCode::from(failure.exit_code())
        }
    }
}

async fn real_main() -> Result<(), Failure> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Ls { output, client }) => {
            Ok(tunnel_svc::cli::ls(client.admin, client.token()?, output).await?)
        }
        Some(Cmd::Ui(c)) => {
            let auth = c.token()?;
            let url = tunnel_svc::admin::panel::login_url(c.admin, auth.token.as_ref());
            tunnel_svc::cli::out(&format!("{url}\n"));
            Ok(())
        }
        Some(Cmd::Mcp(c)) => Ok(tunnel_svc::mcp::serve(c.admin, c.token()?).await?),
        Some(Cmd::Watch(c)) => {
            let stop = porthole::shutdown::on_signal()?;
            Ok(tunnel_svc::cli::watch(c.admin, c.token()?, stop).await?)
        }
        Some(Cmd::Wait {
            port,
            protocol,
            timeout,
            output,
            client,
        }) => {
            let token = client.token()?;
            let what = tunnel_svc::cli::WaitFor { protocol, ..port };
            let result = tunnel_svc::cli::wait(client.admin, token, &what, timeout).await;
            tunnel_svc::cli::print_wait(&result, output);
            result
                .map(drop)
                .map_err(|e| match e.downcast_ref::<tunnel_svc::cli::TimedOut>() {
                    Some(_) => Failure::TimedOut(e),
                    None => Failure::Runtime(e),
                })
        }
        Some(Cmd::Close { id, client }) => {
            Ok(tunnel_svc::cli::close(client.admin, client.token()?, id).await?)
        }
        Some(Cmd::Demo { port, admin, once }) => {
            porthole::telemetry::init("warn", LogFormat::Text).map_err(anyhow::Error::msg)?;
            let shutdown = porthole::shutdown::on_signal()?;
            let args = tunnel_svc::demo::DemoArgs { port, admin, once };
            Ok(tunnel_svc::demo::run(args, shutdown).await?)
        }
        Some(Cmd::DemoServer { port }) => Ok(tunnel_svc::demo::serve_sample(port).await?),
        Some(Cmd::Gate(args)) => gate(args).await,
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> Result<(), Failure> {
    args.service.start()?;
    let file = match &args.config {
        Some(path) => config::ConfigFile::load(path)?,
        None => config::ConfigFile::default(),
    };
    let targets = targets(&args, &file)?;
    let mut monitor_tokens = std::collections::BTreeMap::new();
    for t in &targets {
        if let Some(token) = read_token(t.token_file.as_deref())? {
            monitor_tokens.insert(t.name.clone(), token);
        }
    }
    let reload = tunnel_svc::service::Reload {
        path: args.config.clone().unwrap_or_default(),
        flag_skip: args.skip.clone(),
        no_default_skip: args.no_default_skip,
        flag_max_tunnels: args.max_tunnels,
        allow_privileged: args.allow_privileged_ports,
    };
    reload.check(&file)?;
    let docker = docker_options(&args)?;
    if !args.devcontainers.is_empty() && targets.is_empty() {
        return Err(config::ConfigError::NoTarget.into());
    }
    let devcontainers = devcontainers(&targets)?;
    let opts = tunnel_svc::service::Options {
        devcontainers,
        targets,
        reconcile: reconcile_options(&args, &file, &reload),
        admin_token: args.service.admin_token()?,
        monitor_tokens,
        ssh_options: args.ssh_options.clone(),
        raw_relay: !args.no_raw_relay,
        docker,
        reload: args.config.is_some().then_some(reload),
    };
    let shutdown = porthole::shutdown::on_signal()?;
    let admin = args.service.bind_admin().await?;
    Ok(tunnel_svc::service::run(admin, opts, shutdown).await?)
}

/// The monitors to follow, from the flags and the config file, each with
/// its token file; none but Docker's with `--docker` alone.
fn targets(args: &RunArgs, file: &config::ConfigFile) -> Result<Vec<config::Target>, Failure> {
    let docker_only =
        args.docker && args.monitor.is_none() && args.targets.is_empty() && file.targets.is_empty();
    let mut targets = if docker_only {
        Vec::new()
    } else {
        config::targets(
            args.monitor.as_deref(),
            &args.targets,
            &args.backends,
            &args.ssh_hosts,
            &file.targets,
        )?
    };
    for t in &mut targets {
        t.token_file = args.service.token_file.clone();
    }
    config::apply_scoped(
        &mut targets,
        "--monitor-token-file",
        &args.monitor_token_files,
        &|t, path| {
            t.token_file = Some(path.into());
            Ok(())
        },
    )?;
    config::apply_scoped(
        &mut targets,
        "--devcontainer",
        &args.devcontainers,
        &|t, path| {
            t.devcontainer = Some(path.into());
            Ok(())
        },
    )?;
    if !args.ssh_options.is_empty()
        && !args.docker
        && !targets
            .iter()
            .any(|t| t.backend == config::BackendKind::Ssh)
    {
        return Err(config::ConfigError::SshOnly("--ssh-option").into());
    }
    Ok(targets)
}

/// Each target's `--devcontainer` file, read and checked once however
/// many targets it is for.
fn devcontainers(
    targets: &[config::Target],
) -> Result<BTreeMap<String, std::sync::Arc<tunnel_svc::devcontainer::Settings>>, Failure> {
    let mut read: BTreeMap<&std::path::Path, std::sync::Arc<_>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for t in targets {
        let Some(path) = t.devcontainer.as_deref() else {
            continue;
        };
        if !read.contains_key(path) {
            let file = |why: String| config::ConfigError::File {
                path: path.display().to_string(),
                why,
            };
            let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
            let settings = tunnel_svc::devcontainer::Settings::from_file(&text).map_err(file)?;
            if let Some(first) = settings.rules(None).1.into_iter().next() {
                return Err(file(first).into());
            }
            read.insert(path, std::sync::Arc::new(settings));
        }
        out.insert(t.name.clone(), read[path].clone());
    }
    Ok(out)
}

/// `--docker`'s options. A monitor that cannot run in containers is a
/// configuration mistake: said before anything starts. The file is read
/// once, here.
fn docker_options(args: &RunArgs) -> Result<Option<tunnel_svc::docker::Options>, Failure> {
    if !args.docker {
        return Ok(None);
    }
    let monitor_binary = args
        .monitor_binary
        .clone()
        .unwrap_or_else(tunnel_svc::docker::default_monitor_binary);
    let archive = tunnel_svc::docker::monitor_archive(&monitor_binary)
        .map_err(|e| Failure::Config(e.into()))?;
    Ok(Some(tunnel_svc::docker::Options {
        filters: args.docker_filters.clone(),
        monitor_binary,
        archive,
        transport: args.docker_transport,
        raw_relay: !args.no_raw_relay,
        engine: args.engine.clone(),
        ssh_options: args.ssh_options.clone(),
    }))
}

/// What shapes tunnels: the flags, with the config file's policy.
fn reconcile_options(
    args: &RunArgs,
    file: &config::ConfigFile,
    reload: &tunnel_svc::service::Reload,
) -> tunnel_svc::reconcile::Options {
    let policy = reload.merge(file);
    let bind = if !args.bind.is_empty() {
        args.bind.clone()
    } else {
        file.bind.clone().unwrap_or_else(config::default_bind)
    };
    tunnel_svc::reconcile::Options {
        bind,
        skip: policy.skip,
        max_tunnels: policy.max_tunnels,
        remap: matches!(args.on_conflict, OnConflict::Next),
        allow_privileged: args.allow_privileged_ports,
        rules: policy.rules,
        udp: tunnel_svc::udp::Limits {
            idle: args.udp_idle_timeout,
            max_flows: args.udp_max_flows as usize,
        },
        park: tunnel_svc::tunnel::Park {
            wait: args.park,
            ..Default::default()
        },
        host_ports: args.service.state_dir().map(|d| d.join("host-ports.json")),
        keep_host_ports: !args.no_keep_host_ports,
    }
}

/// `tunnel-svc gate`: the whole config is checked before anything listens.
async fn gate(args: GateArgs) -> Result<(), Failure> {
    use tunnel_svc::gate;
    let upstreams = gate::load(&args.config)?;
    if let Some(host) = args.print_ssh_config {
        tunnel_svc::cli::out(&gate::ssh_config(&upstreams, &host)?);
        return Ok(());
    }
    gate::check_admin(&upstreams, &args.listen, args.service.admin)?;
    args.service.start()?;
    let token = args.service.admin_token()?;
    let shutdown = porthole::shutdown::on_signal()?;
    let admin = args.service.bind_admin().await?;
    let opts = gate::Options {
        upstreams,
        listen: args.listen,
        token,
    };
    Ok(gate::run(admin, opts, shutdown).await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
