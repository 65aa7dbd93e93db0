//! Which process holds a socket: the `/proc/[pid]/fd/*` symlinks that read
//! `socket:[INODE]`.
//!
//! What cannot be seen (another user's processes without root, `hidepid`, a
//! process that exited mid-walk) is simply not reported.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// `/proc/PID/comm`: the kernel's 15-byte name.
    pub name: String,
    /// `/proc/PID/cmdline` split on NUL, at most [`CMDLINE_MAX`] bytes in
    /// all; empty for kernel threads and zombies.
    pub cmdline: Vec<String>,
    /// The command line was longer than [`CMDLINE_MAX`] and was cut.
    pub truncated: bool,
}

/// Bytes of command line carried per process: enough to tell programs
/// apart, bounded whatever a process puts in its arguments.
pub const CMDLINE_MAX: usize = 4096;

/// For each socket inode, the process holding it open, found through `/proc`.
/// See [`owners_in`].
pub fn owners(inodes: &HashSet<u64>) -> HashMap<u64, ProcessInfo> {
    owners_in(Path::new("/proc"), inodes)
}

/// For each socket inode, the process under `proc_root` holding it open.
/// Inodes whose owner is not visible are absent. Processes are walked in
/// ascending pid order, so a socket shared after `fork` is credited to the
/// lowest pid, and the walk stops once every wanted inode is found.
pub fn owners_in(proc_root: &Path, inodes: &HashSet<u64>) -> HashMap<u64, ProcessInfo> {
    let mut found = HashMap::new();
    // Inode 0 means "unknown" and is never a real socket.
    let wanted = inodes.iter().filter(|&&i| i != 0).count();
    if wanted == 0 {
        return found;
    }
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    let mut pids: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().to_str()?.parse().ok()?;
            Some((pid, entry.path()))
        })
        .collect();
    pids.sort_unstable_by_key(|&(pid, _)| pid);

    let mut held = HashSet::new();
    for (pid, dir) in pids {
        held.clear();
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = target.to_str().and_then(socket_inode) {
                if inodes.contains(&inode) && !found.contains_key(&inode) {
                    held.insert(inode);
                }
            }
        }
        if held.is_empty() {
            continue;
        }
        let Some(info) = read_info(&dir, pid) else {
            continue;
        };
        for &inode in &held {
            found.insert(inode, info.clone());
        }
        if found.len() == wanted {
            break;
        }
    }
    found
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Name and command line; `None` if the process is gone (no `comm`).
fn read_info(dir: &Path, pid: u32) -> Option<ProcessInfo> {
    let comm = fs::read_to_string(dir.join("comm")).ok()?;
    let name = comm.strip_suffix('\n').unwrap_or(&comm).to_string();
    let raw = fs::read(dir.join("cmdline")).unwrap_or_default();
    let truncated = raw.strip_suffix(b"\0").unwrap_or(&raw).len() > CMDLINE_MAX;
    let cmdline = split_cmdline(&raw[..raw.len().min(CMDLINE_MAX)]);
    Some(ProcessInfo {
        pid,
        name,
        cmdline,
        truncated,
    })
}

/// NUL-separated, NUL-terminated; a process that rewrote its argv may leave
/// the terminator off.
fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A throwaway directory laid out like `/proc`, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("monitor-svc-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeProc(dir)
        }

        fn process(&self, pid: &str, comm: Option<&str>, cmdline: &[u8], fds: &[&str]) {
            let dir = self.0.join(pid);
            fs::create_dir_all(dir.join("fd")).unwrap();
            if let Some(comm) = comm {
                fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            }
            fs::write(dir.join("cmdline"), cmdline).unwrap();
            for (n, target) in fds.iter().enumerate() {
                symlink(target, dir.join("fd").join(n.to_string())).unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn set(inodes: &[u64]) -> HashSet<u64> {
        inodes.iter().copied().collect()
    }

    #[test]
    fn maps_inodes_to_lowest_visible_pid() {
        let proc = FakeProc::new("proc-owners");
        proc.process(
            "1",
            Some("init"),
            b"/sbin/init\0",
            &["/dev/null", "socket:[10]"],
        );
        // Forked child and parent share 20; 100 < 1000 numerically but not
        // as strings, so the order must be numeric.
        proc.process(
            "1000",
            Some("worker"),
            b"python3\0-m\0http.server\0",
            &["socket:[20]", "pipe:[5]"],
        );
        proc.process(
            "100",
            Some("server"),
            b"server\0--port\0\08080\0",
            &["socket:[20]", "socket:[30]"],
        );
        // Exited between listing and reading: no comm.
        proc.process("50", None, b"", &["socket:[40]"]);
        proc.process("60", Some("kworker/0:1"), b"", &["socket:[41]"]);
        let mut long = b"leaky\0--password=".to_vec();
        long.extend(std::iter::repeat_n(b'x', 40_000));
        long.push(0);
        proc.process("70", Some("leaky"), &long, &["socket:[42]"]);
        fs::create_dir_all(proc.0.join("self")).unwrap();
        fs::create_dir_all(proc.0.join("net")).unwrap();

        let found = owners_in(&proc.0, &set(&[0, 10, 20, 30, 40, 41, 42, 99]));
        let leaky = &found[&42];
        assert!(leaky.truncated);
        let carried: usize = leaky.cmdline.iter().map(|a| a.len() + 1).sum();
        assert!(carried <= CMDLINE_MAX + 1, "{carried} bytes carried");
        assert_eq!(
            found.get(&20),
            Some(&ProcessInfo {
                pid: 100,
                name: "server".into(),
                cmdline: vec![
                    "server".into(),
                    "--port".into(),
                    String::new(),
                    "8080".into()
                ],
                truncated: false,
            }),
            "lowest pid wins; empty arguments inside the cmdline are kept"
        );
        assert_eq!(found[&30].pid, 100);
        assert_eq!(found[&10].name, "init");
        assert_eq!(found[&10].cmdline, vec!["/sbin/init"]);
        assert_eq!(found[&41].cmdline, Vec::<String>::new(), "kernel thread");
        assert!(!found.contains_key(&40), "owner gone");
        assert!(!found.contains_key(&99), "nobody holds it");
        assert!(!found.contains_key(&0));
        assert_eq!(found.len(), 5);
    }

    #[test]
    fn skips_what_it_cannot_read() {
        let proc = FakeProc::new("proc-skip");
        // An fd "directory" that cannot be listed, as for another user's
        // process without root.
        fs::create_dir_all(proc.0.join("3")).unwrap();
        proc.process("1", Some("a"), b"a\0", &["socket:[1]"]);
        proc.process("2", Some("b"), b"b\0", &["socket:[2]"]);
        fs::write(proc.0.join("3").join("fd"), "").unwrap();
        let found = owners_in(&proc.0, &set(&[1]));
        assert_eq!(found.len(), 1);
        assert_eq!(found[&1].pid, 1);
        assert!(owners_in(&proc.0, &HashSet::new()).is_empty());
        assert!(owners_in(&proc.0.join("missing"), &set(&[1])).is_empty());
    }

    #[test]
    fn parses_links_and_cmdlines() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("socket:[]"), None);
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/tmp/socket:[1]"), None);
        assert_eq!(split_cmdline(b"a\0b c\0"), vec!["a", "b c"]);
        assert_eq!(
            split_cmdline(b"nginx: master process"),
            vec!["nginx: master process"]
        );
        assert_eq!(split_cmdline(b""), Vec::<String>::new());
        assert_eq!(split_cmdline(b"\xff\0"), vec!["\u{fffd}"]);
    }

    #[test]
    fn finds_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut scanner = crate::scan::Scanner::auto();
        let socket = scanner
            .scan()
            .unwrap()
            .into_iter()
            .find(|s| s.addr.is_loopback() && s.port == port)
            .expect("listener is scanned");
        let found = owners(&set(&[socket.inode]));
        let me = &found[&socket.inode];
        assert_eq!(me.pid, std::process::id());
        // comm is the executable's name cut to 15 bytes.
        let exe = std::env::current_exe().unwrap();
        let exe = exe.file_name().unwrap().to_str().unwrap();
        assert_eq!(me.name, exe[..exe.len().min(15)]);
        assert_eq!(
            Path::new(&me.cmdline[0]).file_name(),
            Path::new(exe).file_name(),
            "{:?}",
            me.cmdline
        );
        drop(listener);
    }
}
