//! Running as a container's user: `docker run --user` takes `NAME`, `UID`,
//! `NAME:GROUP` or `UID:GID`; names are looked up in the container's own
//! `/etc/passwd` and `/etc/group`, as the engine does.

use rustix::process::{Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user {0:?} in /etc/passwd")]
    NoUser(String),
    #[error("no group {0:?} in /etc/group")]
    NoGroup(String),
    #[error("{what}: {source}")]
    Switch {
        what: &'static str,
        source: rustix::io::Errno,
    },
}

/// The `(uid, gid)` that `spec` names, given the two files' text. A
/// numeric user without a group takes its passwd entry's group, or 0 when
/// it has none (what Docker does).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32), UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entries = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    };
    let users = entries(passwd);
    let found = users.iter().find(|e| {
        e.first().is_some_and(|n| n == user)
            || (user.parse::<u32>().is_ok() && e.get(2).is_some_and(|u| u == user))
    });
    let uid = match user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => found
            .and_then(|e| e.get(2)?.parse().ok())
            .ok_or_else(|| UserError::NoUser(user.into()))?,
    };
    let gid = match grp {
        None => found.and_then(|e| e.get(3)?.parse().ok()).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entries(group)
                .iter()
                .find(|e| e.first().is_some_and(|n| n == g))
                .and_then(|e| e.get(2)?.parse().ok())
                .ok_or_else(|| UserError::NoGroup(g.into()))?,
        },
    };
    Ok((uid, gid))
}

/// Becomes `spec`'s user and group (and no other groups). Call while the
/// process has one thread: the calls change the calling thread, and every
/// thread made afterwards inherits them.
pub fn switch_to(spec: &str) -> Result<(u32, u32), UserError> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let (uid, gid) = resolve(spec, &read("/etc/passwd"), &read("/etc/group"))?;
    let fail = |what| move |source| UserError::Switch { what, source };
    let g = Gid::from_raw(gid);
    rustix::thread::set_thread_groups(&[g]).map_err(fail("setgroups"))?;
    rustix::thread::set_thread_res_gid(g, g, g).map_err(fail("setresgid"))?;
    let u = Uid::from_raw(uid);
    rustix::thread::set_thread_res_uid(u, u, u).map_err(fail("setresuid"))?;
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nstaff:x:50:app\n";

    #[test]
    fn names_and_numbers_as_docker_takes_them() {
        assert_eq!(resolve("app", PASSWD, GROUP).unwrap(), (1000, 1001));
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap(), (1000, 1001));
        assert_eq!(
            resolve("4242", PASSWD, GROUP).unwrap(),
            (4242, 0),
            "not in passwd: group 0"
        );
        assert_eq!(resolve("app:staff", PASSWD, GROUP).unwrap(), (1000, 50));
        assert_eq!(resolve("1000:7", "", "").unwrap(), (1000, 7));
        assert!(matches!(
            resolve("nobody", PASSWD, GROUP),
            Err(UserError::NoUser(_))
        ));
        assert!(matches!(
            resolve("app:wheel", PASSWD, GROUP),
            Err(UserError::NoGroup(_))
        ));
    }
}
