//! Real Docker containers for the Docker-mode tests: an image made from
//! Debian's `busybox-static` (nothing else in it: no libc, no shell but
//! busybox's), a network of the test's own in 198.19.0.0/16, and containers
//! on it. Everything is made through the `docker` CLI and removed on drop.

use crate::{skip_or_fail, which};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Where Debian's `busybox-static` puts its one binary.
const BUSYBOX: &str = "/bin/busybox";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `ph-PID-N-what`.
pub fn unique(what: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("ph-{}-{n}-{what}", std::process::id())
}

/// Runs `docker ARGS`; its output, or the reason it failed.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out: Output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
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

/// An image holding only `/bin/busybox` (and `/bin/sh` linked to it).
pub struct Image {
    pub name: String,
}

impl Image {
    pub fn busybox() -> Image {
        let name = format!("{}:latest", unique("busybox"));
        let root = crate::target_dir().join("tmp").join(name.replace(':', "-"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).expect("make the rootfs");
        std::fs::create_dir_all(root.join("tmp")).expect("make the rootfs");
        // As in every image: anyone may write to /tmp (--user tests).
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .expect("chmod /tmp");
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("link sh");
        let tar = root.with_extension("tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("run tar");
        assert!(status.success(), "tar of the busybox rootfs");
        must(&["import", &tar.display().to_string(), &name]);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_file(&tar);
        Image { name }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.name]);
    }
}

/// A user-defined network with a /24 of 198.19.0.0/16 that no other
/// Docker network has (the engine refuses overlapping pools, which makes
/// it the lock).
pub struct Network {
    pub name: String,
    pub subnet: String,
}

impl Network {
    pub fn new() -> Network {
        porthole::netns::keep_test_ranges_local()
            .unwrap_or_else(|e| panic!("keeping 198.18.0.0/15 on this machine: {e}"));
        let name = unique("net");
        let start = std::process::id()
            .wrapping_mul(7)
            .wrapping_add(NEXT.load(Ordering::Relaxed));
        let mut last = String::new();
        for i in 0..256 {
            let subnet = format!("198.19.{}.0/24", (start + i) % 256);
            match docker(&["network", "create", "--subnet", &subnet, &name]) {
                Ok(_) => return Network { name, subnet },
                Err(e) => last = e,
            }
        }
        panic!("no free /24 in 198.19.0.0/16 for a Docker network: {last}");
    }
}

impl Default for Network {
    fn default() -> Network {
        Network::new()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// A container (removed with `docker rm -f` on drop).
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME --network NET EXTRA... IMAGE ARGS...`.
    pub fn run(image: &Image, network: &Network, extra: &[&str], args: &[&str]) -> Container {
        let name = unique("c");
        let mut all = vec!["run", "-d", "--name", &name, "--network", &network.name];
        all.extend_from_slice(extra);
        all.push(&image.name);
        all.extend_from_slice(args);
        must(&all);
        Container { name }
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
        let script = format!(
            "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && \
             exec /bin/busybox httpd -f -p {addr}:{port} -h /tmp/www"
        );
        Container::run(image, network, extra, &["/bin/sh", "-c", &script])
    }

    /// `docker ACTION NAME` (stop, start, restart, ...).
    pub fn docker(&self, action: &str) {
        let mut args = vec![action];
        if matches!(action, "stop" | "restart") {
            args.extend(["-t", "1"]);
        }
        args.push(&self.name);
        must(&args);
    }

    /// Runs `busybox ARGS` inside; its output.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", self.name.as_str(), "/bin/busybox"];
        all.extend_from_slice(args);
        must(&all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
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
