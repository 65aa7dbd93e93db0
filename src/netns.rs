//! A network namespace standing in for a container, joined to the host by
//! a veth pair (made with `ip` from iproute2): what `tunnel-svc demo` and
//! porthole's tests and benchmarks run their "container" in. Linux, root.
//!
//! Each namespace gets one /30 of 198.18.0.0/16: host end `.1`, inside
//! `.2` on `eth0`, `lo` up. The host interface's name `ph<X>h` is the lock
//! on subnet X: creating it fails while any process holds X, so namespaces
//! made at once by many processes never share an address. (198.19.0.0/16
//! is left to the Docker networks porthole's tests make.)
//!
//! Traffic to these ranges never leaves the machine: before a namespace
//! (or a test's Docker network) is made, [`keep_test_ranges_local`] puts an
//! `unreachable` route for 198.18.0.0/15 at the lowest priority, so when a
//! namespace's /30 route or a network's /24 route goes away, packets to its
//! addresses fail here (EHOSTUNREACH) instead of following the default
//! route off the machine. A link is cut on the namespace's side
//! ([`Namespace::set_link`]), which keeps the host's route in place.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// /30 subnets in 198.18.0.0/16.
const SUBNETS: u32 = 1 << 14;

/// The benchmarking range (RFC 2544) every namespace and test network is
/// made in.
pub const TEST_RANGES: &str = "198.18.0.0/15";

/// Adds `unreachable 198.18.0.0/15` with the largest metric (the lowest
/// priority) unless it is there. Any more specific route (a namespace's
/// /30, a network's /24) wins over it; when that route goes, packets fail
/// on this machine rather than take the default route. It is never
/// removed: it is harmless (nothing may leave for that range anyway), and
/// removing it while another process's namespace exists would reopen the
/// leak.
pub fn keep_test_ranges_local() -> io::Result<()> {
    let route = [
        "route",
        "add",
        "unreachable",
        TEST_RANGES,
        "metric",
        "4294967295",
    ];
    match ip(&route) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

pub struct Namespace {
    name: String,
    veth: String,
    host: Ipv4Addr,
    inside: Ipv4Addr,
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(e.kind(), format!("cannot run `ip` (install iproute2): {e}"))
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kind = if stderr.contains("File exists") {
        io::ErrorKind::AlreadyExists
    } else {
        io::ErrorKind::Other
    };
    Err(io::Error::new(
        kind,
        format!("`ip {}` failed: {}", args.join(" "), stderr.trim()),
    ))
}

impl Namespace {
    /// Creates namespace `name` and its link; subnets are tried from
    /// `hint` on. A namespace of that name left by a dead process is
    /// replaced.
    pub fn create(name: &str, hint: u32) -> io::Result<Namespace> {
        keep_test_ranges_local()?;
        if Path::new("/run/netns").join(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        // From here on, Drop removes whatever was made.
        let mut ns = Namespace {
            name: name.to_string(),
            veth: String::new(),
            host: Ipv4Addr::UNSPECIFIED,
            inside: Ipv4Addr::UNSPECIFIED,
        };
        let mut last = None;
        for i in 0..2048 {
            let x = (hint.wrapping_add(i)) % SUBNETS;
            let veth = format!("ph{x}h");
            let link = ["link", "add", &veth, "type", "veth", "peer", "name", "eth0"];
            match ip(&[&link[..], &["netns", name]].concat()) {
                Ok(()) => {
                    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 4 * x;
                    ns.veth = veth;
                    ns.host = Ipv4Addr::from(base + 1);
                    ns.inside = Ipv4Addr::from(base + 2);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        if ns.veth.is_empty() {
            return Err(last.unwrap_or_else(|| io::Error::other("no free subnet")));
        }
        let host_cidr = format!("{}/30", ns.host);
        let inside_cidr = format!("{}/30", ns.inside);
        let steps: [&[&str]; 5] = [
            &["addr", "add", &host_cidr, "dev", &ns.veth],
            &["link", "set", &ns.veth, "up"],
            &["-n", name, "link", "set", "lo", "up"],
            &["-n", name, "addr", "add", &inside_cidr, "dev", "eth0"],
            &["-n", name, "link", "set", "eth0", "up"],
        ];
        for step in steps {
            ip(step)?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end of the link.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host
    }

    /// The namespace's own address (`eth0`).
    pub fn addr(&self) -> Ipv4Addr {
        self.inside
    }

    /// Cuts the link (nothing crosses, nothing is refused) or joins it
    /// again, on the namespace's side: its `eth0` goes down, the host end
    /// loses its carrier but keeps its route, so packets for the namespace
    /// are dropped at the veth instead of being routed elsewhere.
    pub fn set_link(&self, up: bool) -> io::Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.name, "link", "set", "eth0", state])
    }

    /// The host end's interface name (`ph<X>h`).
    pub fn host_link(&self) -> &str {
        &self.veth
    }

    /// `ip netns exec NAME program`, to be completed by the caller. `ip`
    /// execs, so the child's pid is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Pids of every process inside.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Namespace {
    /// Kills whatever still runs inside (by pid) and waits until it is
    /// gone, then deletes the link and the namespace.
    fn drop(&mut self) {
        use rustix::process::{kill_process, Pid, Signal};
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids.into_iter().filter_map(|p| Pid::from_raw(p as i32)) {
                let _ = kill_process(pid, Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.veth.is_empty() {
            let _ = ip(&["link", "del", &self.veth]);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}
