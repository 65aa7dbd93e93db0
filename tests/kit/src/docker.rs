//! Real containers for the Docker-mode tests: an image made from Debian's
//! `busybox-static` (nothing else in it: no libc, no shell but busybox's),
//! a network of the test's own in 198.19.0.0/16, and containers on it.
//! Everything is made through the engine's CLI (`docker`, or `podman` for
//! the Podman tests) and removed on drop.

use crate::{skip_or_fail, which, TunnelProc};
use porthole::pb::v1::Tunnel;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where Debian's `busybox-static` puts its one binary.
const BUSYBOX: &str = "/bin/busybox";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `ph-PID-N-what`.
pub fn unique(what: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("ph-{}-{n}-{what}", std::process::id())
}

/// Which engine's CLI makes the images, networks and containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cli {
    Docker,
    /// Rootful Podman, with `runc`: Debian's `crun` refuses every
    /// container on a host whose cgroups are mounted in hybrid mode (as on
    /// these test machines).
    Podman,
    /// Podman as [`ROOTLESS_USER`], with `runc` too.
    RootlessPodman,
}

/// The user the rootless Podman tests run Podman and tunnel-svc as.
pub const ROOTLESS_USER: &str = "ph-rootless";

/// A user of this machine without root, for the rootless tests: made if
/// missing (`useradd` gives it subordinate ids), with its runtime
/// directory (`/run/user/UID`, as a login would make it) and a directory
/// of the programs it runs (copies any user may run: the build's own
/// directory may not be open to others).
pub struct Rootless {
    pub uid: u32,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    /// Copies of tunnel-svc and the static monitor (see
    /// [`Rootless::with_programs`]).
    pub bin: PathBuf,
    /// Ends the user's processes when dropped (the world's user does).
    owns_processes: bool,
}

impl Rootless {
    pub fn get() -> Rootless {
        let known = Command::new("id").arg(ROOTLESS_USER).output();
        if !known.is_ok_and(|o| o.status.success()) {
            let made = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", ROOTLESS_USER])
                .output()
                .expect("run useradd");
            assert!(made.status.success(), "useradd: {made:?}");
        }
        let id = Command::new("id")
            .args(["-u", ROOTLESS_USER])
            .output()
            .expect("id -u");
        let uid: u32 = String::from_utf8_lossy(&id.stdout)
            .trim()
            .parse()
            .expect("a uid");
        let subuids = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        if !subuids
            .lines()
            .any(|l| l.starts_with(&format!("{ROOTLESS_USER}:")))
        {
            let added = Command::new("usermod")
                .args([
                    "--add-subuids",
                    "300000-365535",
                    "--add-subgids",
                    "300000-365535",
                ])
                .arg(ROOTLESS_USER)
                .output()
                .expect("run usermod");
            assert!(added.status.success(), "usermod: {added:?}");
        }
        let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
        std::fs::create_dir_all(&runtime_dir).expect("the user's runtime directory");
        let chown = Command::new("chown")
            .arg(format!("{uid}:{uid}"))
            .arg(&runtime_dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod the runtime directory");
        Rootless {
            uid,
            home: PathBuf::from(format!("/home/{ROOTLESS_USER}")),
            runtime_dir,
            bin: PathBuf::new(),
            owns_processes: false,
        }
    }

    /// The user, with the programs it runs copied where it may run them,
    /// and every process of it ended when dropped: Podman leaves some
    /// behind (its rootless pause process, exec sessions' conmon for 5
    /// minutes), and the user exists only for these tests.
    pub fn with_programs(mut self) -> Rootless {
        use std::os::unix::fs::PermissionsExt;
        let bin = std::env::temp_dir().join(unique("rootless-bin"));
        std::fs::create_dir_all(&bin).expect("the programs' directory");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for from in [crate::binary("tunnel-svc"), static_monitor()] {
            let to = bin.join(from.file_name().expect("a name"));
            std::fs::copy(&from, &to).expect("copy a program for the user");
        }
        self.bin = bin;
        self.owns_processes = true;
        self
    }

    /// The pids of the user's processes.
    fn processes(&self) -> Vec<i32> {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                (e.metadata().ok()?.uid() == self.uid).then_some(pid)
            })
            .collect()
    }

    /// `program ARGS` as the user, with its login's environment (its
    /// primary group has the user's id, as `useradd` makes it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        // setpriv execs the program itself: its pid is the program's, so
        // killing it by pid kills the program.
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.uid))
            .args(["--init-groups", "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display()))
            .arg(format!("USER={ROOTLESS_USER}"))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(program)
            // The user's own directory, not the test's (which it may not
            // enter).
            .current_dir(&self.home);
        cmd
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        if !self.owns_processes {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.bin);
        for pid in self.processes() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Cli {
    /// Runs the CLI with `args`; its output, or the reason it failed.
    pub fn run(self, args: &[&str]) -> Result<String, String> {
        let (program, global): (&str, &[&str]) = match self {
            Cli::Docker => ("docker", &[]),
            Cli::Podman | Cli::RootlessPodman => ("podman", &["--runtime", "runc"]),
        };
        let mut cmd = match self {
            Cli::RootlessPodman => rootless_command(program),
            _ => Command::new(program),
        };
        let out: Output = cmd
            .args(global)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "`{program} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn must(self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Runs `docker ARGS`; its output, or the reason it failed.
pub fn docker(args: &[&str]) -> Result<String, String> {
    Cli::Docker.run(args)
}

/// Whether the Docker tests can run: root, a `docker` client, an engine
/// that answers, and `busybox-static`. Otherwise says the test was skipped
/// (or fails it under CI).
pub fn have_docker(test: &str) -> bool {
    if !crate::require_root() {
        return false;
    }
    let why = if which("docker").is_none() {
        Some("needs the docker client".to_string())
    } else if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Some(format!("needs a running Docker engine ({e})"))
    } else if !Path::new(BUSYBOX).is_file() {
        Some("needs busybox-static (apt-get install busybox-static)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            skip_or_fail(test, &why);
            false
        }
    }
}

/// `program` as [`ROOTLESS_USER`] (see [`Rootless::command`]).
fn rootless_command(program: &str) -> Command {
    static USER: std::sync::OnceLock<Rootless> = std::sync::OnceLock::new();
    USER.get_or_init(Rootless::get).command(program)
}

/// Whether the Podman tests can run: root, `podman`, `runc` and
/// `busybox-static`. Otherwise says the test was skipped (or fails it
/// under CI).
pub fn have_podman(test: &str) -> bool {
    if !crate::require_root() {
        return false;
    }
    let why = if which("podman").is_none() {
        Some("needs podman (apt-get install podman)")
    } else if which("runc").is_none() {
        Some("needs runc (apt-get install runc)")
    } else if !Path::new(BUSYBOX).is_file() {
        Some("needs busybox-static (apt-get install busybox-static)")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            skip_or_fail(test, why);
            false
        }
    }
}

/// Podman's Docker-compatible API service on a socket of its own (rootful:
/// the containers of this machine's Podman), stopped on drop.
pub struct PodmanService {
    child: std::process::Child,
    dir: PathBuf,
    /// `unix:///…/podman.sock`.
    pub url: String,
}

impl PodmanService {
    pub fn start() -> PodmanService {
        PodmanService::start_on(Cli::Podman)
    }

    /// Rootful: on a socket of its own. Rootless: as [`ROOTLESS_USER`], on
    /// its default socket (`$XDG_RUNTIME_DIR/podman/podman.sock`), where
    /// tunnel-svc finds it with no flag.
    pub fn start_on(cli: Cli) -> PodmanService {
        PodmanService::start_in(cli, None)
    }

    /// [`PodmanService::start_on`], run inside `ns` (a "remote machine":
    /// only that namespace's sshd is meant to reach its socket).
    pub fn start_in(cli: Cli, ns: Option<&crate::Netns>) -> PodmanService {
        let dir = crate::target_dir().join("tmp").join(unique("podman"));
        std::fs::create_dir_all(&dir).expect("make the socket's directory");
        let (mut cmd, socket) = match cli {
            Cli::RootlessPodman => {
                let runtime = PathBuf::from(format!(
                    "/run/user/{}",
                    String::from_utf8_lossy(
                        &Command::new("id")
                            .args(["-u", ROOTLESS_USER])
                            .output()
                            .expect("id -u")
                            .stdout
                    )
                    .trim()
                ));
                // Podman makes the socket, not its directory (a login's
                // podman.socket unit would).
                let made = rootless_command("mkdir")
                    .arg("-p")
                    .arg(runtime.join("podman"))
                    .status()
                    .expect("mkdir as the user");
                assert!(made.success(), "mkdir {}/podman: {made}", runtime.display());
                let _ = std::fs::remove_file(runtime.join("podman/podman.sock"));
                (
                    rootless_command("podman"),
                    runtime.join("podman/podman.sock"),
                )
            }
            _ => match ns {
                // Only the network namespace: `ip netns exec` would also
                // mount a sysfs of its own, hiding the cgroups runc needs.
                Some(ns) => {
                    let mut cmd = Command::new("nsenter");
                    cmd.arg(format!("--net=/run/netns/{}", ns.name()))
                        .args(["--", "podman"]);
                    (cmd, dir.join("podman.sock"))
                }
                None => (Command::new("podman"), dir.join("podman.sock")),
            },
        };
        let url = format!("unix://{}", socket.display());
        let log = std::fs::File::create(dir.join("service.log")).expect("the service's log");
        let child = cmd
            .args(["--runtime", "runc", "system", "service", "--time=0", &url])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run podman system service");
        let service = PodmanService { child, dir, url };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "podman system service made no socket in 20 s: {}",
                std::fs::read_to_string(service.dir.join("service.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An image holding only `/bin/busybox` (and `/bin/sh` linked to it).
pub struct Image {
    pub name: String,
    cli: Cli,
}

impl Image {
    /// `/bin/busybox`, `/bin/sh` linked to it, `/tmp`.
    pub fn busybox() -> Image {
        Image::busybox_on(Cli::Docker)
    }

    /// [`Image::busybox`] in `cli`'s engine.
    pub fn busybox_on(cli: Cli) -> Image {
        Image::build(cli, "busybox", |root| {
            std::fs::create_dir_all(root.join("bin"))?;
            std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
            std::os::unix::fs::symlink("busybox", root.join("bin/sh"))
        })
    }

    /// No shell, no busybox: only `/httpd` (busybox under that name runs
    /// its httpd applet) and `/www/index.html` saying `text`, as a
    /// distroless image holds only its program.
    pub fn httpd_only(text: &str) -> Image {
        Image::build(Cli::Docker, "httpd-only", |root| {
            std::fs::create_dir_all(root.join("www"))?;
            std::fs::write(root.join("www/index.html"), format!("{text}\n"))?;
            std::fs::copy(BUSYBOX, root.join("httpd")).map(drop)
        })
    }

    /// An image of a rootfs that `fill` makes (plus a `/tmp` anyone may
    /// write to, as in every image), imported with `docker import`.
    fn build(cli: Cli, what: &str, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> Image {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("{}:latest", unique(what));
        // Where the user a rootless engine runs as may read it.
        let scratch = match cli {
            Cli::RootlessPodman => std::env::temp_dir(),
            _ => crate::target_dir().join("tmp"),
        };
        let root = scratch.join(name.replace(':', "-"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("tmp")).expect("make the rootfs");
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod /tmp");
        fill(&root).unwrap_or_else(|e| panic!("filling the {what} rootfs: {e}"));
        let tar = root.with_extension("tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("run tar");
        assert!(status.success(), "tar of the {what} rootfs");
        let name = match cli {
            Cli::Docker => name,
            // Podman names an image without a registry localhost/NAME.
            Cli::Podman | Cli::RootlessPodman => format!("localhost/{name}"),
        };

        cli.must(&["import", &tar.display().to_string(), &name]);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_file(&tar);
        Image { name, cli }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.cli.run(&["rmi", "-f", &self.name]);
    }
}

/// A user-defined network with a /24 that no other network of its engine
/// has (the engine refuses overlapping pools, which makes it the lock):
/// Docker's in 198.19.0.0/17, Podman's in 198.19.128.0/17, so the two
/// engines never make the same one.
pub struct Network {
    pub name: String,
    pub subnet: String,
    cli: Cli,
}

impl Network {
    pub fn new() -> Network {
        Network::new_on(Cli::Docker)
    }

    /// [`Network::new`] in `cli`'s engine.
    pub fn new_on(cli: Cli) -> Network {
        porthole::netns::keep_test_ranges_local()
            .unwrap_or_else(|e| panic!("keeping 198.18.0.0/15 on this machine: {e}"));
        let name = unique("net");
        let start = std::process::id()
            .wrapping_mul(7)
            .wrapping_add(NEXT.load(Ordering::Relaxed));
        let mut last = String::new();
        let base = match cli {
            Cli::Docker => 0,
            Cli::Podman | Cli::RootlessPodman => 128,
        };
        for i in 0..128 {
            let subnet = format!("198.19.{}.0/24", base + (start + i) % 128);
            match cli.run(&["network", "create", "--subnet", &subnet, &name]) {
                Ok(_) => return Network { name, subnet, cli },
                Err(e) => last = e,
            }
        }
        panic!("no free /24 in 198.19.{base}.0/17 for a {cli:?} network: {last}");
    }
}

impl Default for Network {
    fn default() -> Network {
        Network::new()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.cli.run(&["network", "rm", &self.name]);
    }
}

/// The command of a busybox HTTP server on `addr:port` whose page says
/// `text` (in the busybox image).
pub fn http_server(addr: &str, port: u16, text: &str) -> [String; 3] {
    let script = format!(
        "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && \
         exec /bin/busybox httpd -f -p {addr}:{port} -h /tmp/www"
    );
    ["/bin/sh".into(), "-c".into(), script]
}

/// A container (removed with `docker rm -f` on drop).
pub struct Container {
    pub name: String,
    /// Removed by id, which a `docker rename` does not change.
    id: String,
    cli: Cli,
}

impl Container {
    /// `docker run -d --name NAME --network NET EXTRA... IMAGE ARGS...`.
    pub fn run(image: &Image, network: &Network, extra: &[&str], args: &[&str]) -> Container {
        Container::run_on(image, &[&network.name], extra, args)
    }

    /// [`Container::run`] with a `--network` for each of `networks` (a
    /// network's name, `none`, `host`, `container:NAME`).
    pub fn run_on(image: &Image, networks: &[&str], extra: &[&str], args: &[&str]) -> Container {
        let name = unique("c");
        let cli = image.cli;
        let mut all = vec!["run", "-d", "--name", &name];
        if cli != Cli::Docker {
            // Podman asks for more open files and processes than this
            // process may have, and a host without CAP_SYS_RESOURCE cannot
            // raise them: ask for less.
            all.extend([
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
            ]);
        }
        for n in networks {
            all.extend(["--network", n]);
        }
        all.extend_from_slice(extra);
        all.push(&image.name);
        all.extend_from_slice(args);
        match cli.run(&all) {
            Ok(id) => Container { name, id, cli },
            Err(e) => {
                // A container that was created but could not start.
                let _ = cli.run(&["rm", "-f", &name]);
                panic!("{e}");
            }
        }
    }

    /// A busybox HTTP server on `addr:port` inside, whose page says `text`.
    pub fn http(
        image: &Image,
        network: &Network,
        extra: &[&str],
        addr: &str,
        port: u16,
        text: &str,
    ) -> Container {
        let cmd = http_server(addr, port, text);
        Container::run(image, network, extra, &cmd.each_ref().map(String::as_str))
    }

    /// `docker ACTION NAME` (stop, start, restart, ...).
    pub fn docker(&self, action: &str) {
        let mut args = vec![action];
        if matches!(action, "stop" | "restart") {
            args.extend(["-t", "1"]);
        }
        args.push(&self.name);
        self.cli.must(&args);
    }

    /// The line `busybox ps` shows for porthole's monitor inside (`PID
    /// USER TIME COMMAND`), if one runs.
    pub fn monitor_ps(&self) -> Option<String> {
        let ps = self.exec(&["ps"]);
        ps.lines()
            .find(|l| l.contains("--stdio"))
            .map(str::to_string)
    }

    /// Runs `busybox ARGS` inside; its output.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", self.name.as_str(), "/bin/busybox"];
        all.extend_from_slice(args);
        self.cli.must(&all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.cli.run(&["rm", "-f", &self.id]);
    }
}

/// A static `monitor-svc` (what tunnel-svc --docker puts in containers),
/// built once per process in this profile for x86_64-unknown-linux-gnu
/// with `+crt-static`.
pub fn static_monitor() -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(build_static_monitor)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A static `porthole-helper` (servers to run in a container), built with
/// [`static_monitor`].
pub fn static_helper() -> PathBuf {
    static_monitor().with_file_name(crate::HELPER)
}

fn build_static_monitor() -> Result<PathBuf, String> {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let profile = crate::profile_name();
    let path = crate::target_dir()
        .join(TRIPLE)
        .join(&profile)
        .join("monitor-svc");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "-p",
            "monitor-svc",
            "--bin",
            "monitor-svc",
            "-p",
            "porthole-testkit",
            "--bin",
            crate::HELPER,
            "--target",
            TRIPLE,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let started = Instant::now();
    match cmd.output() {
        Ok(out) if out.status.success() => {
            eprintln!(
                "built a static monitor-svc in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(path)
        }
        Ok(out) => Err(format!(
            "building a static monitor-svc failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(_) if path.is_file() => Ok(path),
        Err(e) => Err(format!("cannot run {cargo:?}: {e}")),
    }
}

/// The body of `GET /` on the host's `127.0.0.1:port`, if it answers
/// within 2 s.
pub async fn get(port: u16) -> Option<String> {
    request(port, Duration::from_secs(2)).await.ok()
}

/// One `GET /` on the host's `127.0.0.1:port`, allowed `limit` (a request
/// waiting for its path takes as long as the path takes to come back): the
/// reply's body, or what went wrong.
pub async fn request(port: u16, limit: Duration) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = match tokio::time::timeout(limit, io).await {
        Err(_) => return Err(format!("no answer within {limit:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(a)) => a,
    };
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.trim().to_string()),
        _ => Err(format!("not an HTTP answer ({} bytes)", answer.len())),
    }
}

/// One test's image, network and label; the containers it starts carry
/// the label and its tunnel-svc follows only those, so tests running at
/// once never see each other's containers.
pub struct World {
    pub image: Image,
    pub net: Network,
    pub label: String,
    /// Holds the logs of tunnel-svc (which runs on the host).
    pub ns: crate::Netns,
    /// Podman's API service, for a Podman world (tunnel-svc is given
    /// `--engine` with its socket, except rootless, where it finds it).
    pub podman: Option<PodmanService>,
    /// The user a rootless world's Podman and tunnel-svc run as.
    pub rootless: Option<Rootless>,
    /// A remote world's "machine": a namespace with its own sshd, in which
    /// Podman's API service runs; tunnel-svc reaches it only over ssh.
    pub remote: Option<(crate::Netns, crate::Sshd)>,
}

impl World {
    #[allow(clippy::new_without_default)] // Each call makes an image, a network, a namespace.
    pub fn new() -> World {
        World::on(Cli::Docker)
    }

    /// A "remote machine" (a namespace with its own sshd and Podman's API
    /// service inside) that tunnel-svc reaches as `--engine
    /// ssh://root@ADDRESS/SOCKET`, with the ssh options a user's config
    /// would hold.
    pub async fn remote() -> World {
        let machine = crate::Netns::new();
        let sshd = crate::Sshd::start_with(&machine, machine.addr().into(), 22, true).await;
        let service = PodmanService::start_in(Cli::Podman, Some(&machine));
        World {
            podman: Some(service),
            remote: Some((machine, sshd)),
            rootless: None,
            image: Image::busybox_on(Cli::Podman),
            net: Network::new_on(Cli::Podman),
            label: format!("porthole.test={}", crate::docker::unique("t")),
            ns: crate::Netns::new(),
        }
    }

    /// The `--engine` URL of a remote world.
    pub fn remote_engine(&self) -> Option<String> {
        let (machine, _) = self.remote.as_ref()?;
        let socket = self
            .podman
            .as_ref()?
            .url
            .trim_start_matches("unix://")
            .to_string();
        Some(format!("ssh://root@{}{socket}", machine.addr()))
    }

    /// A labelled container running `args`, on the world's network — or
    /// none where a container can have none this host reaches (rootless
    /// here, and remote): the exec stream carries those.
    pub fn run(&self, extra: &[&str], args: &[&str]) -> Container {
        let mut all = vec!["--label", self.label.as_str()];
        all.extend_from_slice(extra);
        let network = if self.rootless.is_some() || self.remote.is_some() {
            "none"
        } else {
            self.net.name.as_str()
        };
        Container::run_on(&self.image, &[network], &all, args)
    }

    /// A world in `cli`'s engine.
    pub fn on(cli: Cli) -> World {
        World {
            remote: None,
            rootless: (cli == Cli::RootlessPodman).then(|| Rootless::get().with_programs()),
            podman: (cli != Cli::Docker).then(|| PodmanService::start_on(cli)),
            image: Image::busybox_on(cli),
            net: Network::new_on(cli),
            label: format!("porthole.test={}", crate::docker::unique("t")),
            ns: crate::Netns::new(),
        }
    }

    /// A labelled busybox HTTP server on `addr:port` saying `text`.
    pub fn http(&self, addr: &str, port: u16, text: &str) -> Container {
        let cmd = http_server(addr, port, text);
        self.run(&[], &cmd.each_ref().map(String::as_str))
    }

    /// A container whose HTTP server is the kit's static helper (`serve`):
    /// answers `GET` with `text`, and listens with a backlog of 1,024
    /// where busybox `httpd` ([`World::http`]) has 9.
    pub fn helper_http(&self, addr: &str, port: u16, text: &str) -> Container {
        let helper = format!("{}:/porthole-helper:ro", static_helper().display());
        let extra = ["--label", self.label.as_str(), "-v", helper.as_str()];
        let args = ["/porthole-helper", "serve", addr, &port.to_string(), text];
        Container::run(&self.image, &self.net, &extra, &args)
    }

    /// tunnel-svc --docker following this world's containers.
    pub async fn tunnel_svc(&self, extra: &[&str]) -> TunnelProc {
        self.tunnel_svc_with_env(extra, &[]).await
    }

    /// [`World::tunnel_svc`] with these environment variables set too.
    pub async fn tunnel_svc_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> TunnelProc {
        let monitor = match &self.rootless {
            Some(user) => user.bin.join("monitor-svc"),
            None => static_monitor(),
        };
        let monitor = monitor.display().to_string();
        let filter = format!("label={}", self.label);
        let mut args = vec![
            "--docker",
            "--monitor-binary",
            &monitor,
            "--docker-filter",
            &filter,
        ];
        let engine = self.remote_engine();
        let ssh_options = self.remote.as_ref().map(|(_, sshd)| sshd.options());
        match (&engine, &self.podman, &self.rootless) {
            (Some(remote), _, _) => args.extend(["--engine", remote.as_str()]),
            (None, Some(podman), None) => args.extend(["--engine", podman.url.as_str()]),
            _ => {}
        }
        for option in ssh_options.iter().flatten() {
            args.extend(["--ssh-option", option.as_str()]);
        }
        args.extend_from_slice(extra);
        TunnelProc::start_with_env(&self.ns, self.rootless.as_ref(), &args, env).await
    }
}

pub async fn tunnels_of(t: &TunnelProc, target: &str) -> Vec<Tunnel> {
    t.tunnels()
        .await
        .into_iter()
        .filter(|x| x.target == target)
        .collect()
}
