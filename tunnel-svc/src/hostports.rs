//! Host ports remembered across restarts (of tunnel-svc and of
//! containers), so `localhost:PORT` in a bookmark or an `.env` keeps
//! reaching the same container port: a small JSON file in the user's state
//! directory, as Lima keeps its own.
//!
//! A remembered port is a preference for its tunnel, and, while its
//! target is followed (or for [`GRACE`] after tunnel-svc starts, while
//! containers come back in any order), a reservation: another new tunnel
//! moves past it. A target gone for good stops holding it, so containers
//! with new names are not pushed further and further away.

use crate::model::TunnelId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long after start every remembered port is kept for its own tunnel,
/// followed target or not.
pub const GRACE: Duration = Duration::from_secs(30);

/// Entries kept: the most recently used.
const MAX_ENTRIES: usize = 4096;

/// The file is at most this big; a bigger one is not read.
const MAX_FILE: u64 = 1 << 20;

/// Entries not used for this long (seconds: 30 days) are forgotten.
const FORGET_AFTER: i64 = 30 * 24 * 3600;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    host_port: u16,
    /// When it was last given to its tunnel, in Unix seconds.
    used: i64,
}

/// The remembered host ports, and where they are kept.
#[derive(Debug, Default)]
pub struct HostPorts {
    path: Option<PathBuf>,
    ports: BTreeMap<TunnelId, Entry>,
    /// Changed since last written.
    dirty: bool,
}

/// Where the file lives by default: `$XDG_STATE_HOME/porthole`, else
/// `~/.local/state/porthole`.
pub fn default_dir() -> Option<PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    std::env::var_os("XDG_STATE_HOME")
        .and_then(non_empty)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(non_empty)
                .map(|h| h.join(".local/state"))
        })
        .map(|d| d.join("porthole"))
}

impl HostPorts {
    /// Reads `path` (a missing file is an empty memory; an unreadable one
    /// is logged and ignored: ports are then assigned afresh).
    pub fn load(path: Option<PathBuf>) -> HostPorts {
        let mut me = HostPorts {
            path,
            ports: BTreeMap::new(),
            dirty: false,
        };
        let Some(path) = &me.path else {
            return me;
        };
        match read(path) {
            Ok(ports) => me.ports = ports,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "remembered host ports not read; assigning afresh")
            }
        }
        me
    }

    /// The host port `id` had, if it is remembered.
    pub fn get(&self, id: &TunnelId) -> Option<u16> {
        self.ports.get(id).map(|e| e.host_port)
    }

    /// The remembered ports in force now: those of targets in `followed`,
    /// and all of them within `in_grace`.
    pub fn in_force(
        &self,
        followed: impl Fn(&str) -> bool,
        in_grace: bool,
    ) -> BTreeMap<TunnelId, u16> {
        self.ports
            .iter()
            .filter(|(id, _)| in_grace || followed(&id.target))
            .map(|(id, e)| (id.clone(), e.host_port))
            .collect()
    }

    /// `id` listens on `host_port`: remembered, and written down at the
    /// next [`HostPorts::flush`] when that is news.
    pub fn record(&mut self, id: &TunnelId, host_port: u16) {
        let now = chrono::Utc::now().timestamp();
        let news = self.get(id) != Some(host_port);
        self.ports.insert(
            id.clone(),
            Entry {
                host_port,
                used: now,
            },
        );
        // Another tunnel that had this port has lost it.
        self.ports
            .retain(|other, e| other == id || e.host_port != host_port || other.proto != id.proto);
        self.ports.retain(|_, e| now - e.used < FORGET_AFTER);
        while self.ports.len() > MAX_ENTRIES {
            let oldest = self
                .ports
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(id, _)| id.clone());
            self.ports.remove(&oldest.expect("not empty"));
        }
        self.dirty |= news;
    }

    /// Target `from` is called `to` now: its ports are remembered under the
    /// new name.
    pub fn rename_target(&mut self, from: &str, to: &str) {
        let moved: Vec<TunnelId> = self
            .ports
            .keys()
            .filter(|id| id.target == from)
            .cloned()
            .collect();
        if moved.is_empty() {
            return;
        }
        for id in moved {
            let e = self.ports.remove(&id).expect("listed");
            let new = TunnelId {
                target: to.to_string(),
                ..id
            };
            self.ports.insert(new, e);
        }
        self.dirty = true;
    }

    /// Writes the file if anything changed since it was last written: a
    /// few times a minute at most, not once per port (a container opening
    /// thousands of ports would otherwise rewrite it thousands of times).
    pub fn flush(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        if let Err(e) = write(path, &self.ports) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the remembered host ports");
        }
    }
}

fn read(path: &Path) -> std::io::Result<BTreeMap<TunnelId, Entry>> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE} bytes"
        )));
    }
    let raw: BTreeMap<String, Entry> =
        serde_json::from_str(&text).map_err(std::io::Error::other)?;
    Ok(raw
        .into_iter()
        .filter_map(|(id, e)| Some((id.parse().ok()?, e)))
        .collect())
}

/// Writes the file whole, through a temporary one renamed over it, in a
/// directory only the user can enter.
fn write(path: &Path, ports: &BTreeMap<TunnelId, Entry>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let raw: BTreeMap<String, &Entry> = ports.iter().map(|(id, e)| (id.to_string(), e)).collect();
    let text = serde_json::to_string_pretty(&raw).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_remembered_across_loads_and_a_port_has_one_owner() {
        let dir = std::env::temp_dir().join(format!("porthole-hostports-{}", std::process::id()));
        let path = dir.join("host-ports.json");
        let _ = std::fs::remove_dir_all(&dir);
        let (web, api) = (TunnelId::new("web", 8000), TunnelId::new("api", 8000));
        let mut m = HostPorts::load(Some(path.clone()));
        m.record(&web, 8000);
        m.record(&api, 8001);
        assert!(
            HostPorts::load(Some(path.clone())).get(&web).is_none(),
            "not written yet"
        );
        m.flush();
        let mut again = HostPorts::load(Some(path.clone()));
        assert_eq!((again.get(&web), again.get(&api)), (Some(8000), Some(8001)));
        // api took 8000 (web was gone): web no longer owns it.
        again.record(&api, 8000);
        again.flush();
        let third = HostPorts::load(Some(path.clone()));
        assert_eq!((third.get(&web), third.get(&api)), (None, Some(8000)));
        // In force: followed targets, or everything within the grace.
        assert_eq!(third.in_force(|t| t == "web", false).len(), 0);
        assert_eq!(third.in_force(|_| false, true).len(), 1);
        // A renamed target keeps its ports, under the new name.
        let mut renamed = HostPorts::load(Some(path.clone()));
        renamed.rename_target("api", "api2");
        renamed.flush();
        let after = HostPorts::load(Some(path.clone()));
        assert_eq!(after.get(&TunnelId::new("api2", 8000)), Some(8000));
        assert_eq!(after.get(&api), None);
        // A file that is not ours is ignored, not trusted.
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(HostPorts::load(Some(path)).get(&api), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
