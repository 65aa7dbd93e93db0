//! `tunnel-svc demo`, the README's first command, run as a user would.

use porthole_testkit as common;

use std::process::Command;
use std::time::Duration;

#[test]
fn demo_forwards_a_server_and_cleans_up() {
    if !common::require_root() {
        return;
    }
    // The demo runs the monitor-svc that sits next to tunnel-svc.
    common::binary("monitor-svc");
    // Its admin token goes here, not into this machine's home.
    let state = std::env::temp_dir().join(format!("porthole-demo-e2e-{}", std::process::id()));
    // A port no other test uses, so the demo gets the same host port.
    let out = Command::new(common::binary("tunnel-svc"))
        .args([
            "demo",
            "--once",
            "--port",
            "28999",
            "--admin",
            "127.0.0.1:0",
        ])
        .env_remove("PORTHOLE_ADMIN")
        .env("XDG_STATE_HOME", &state)
        .output()
        .expect("run tunnel-svc demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("tunnel      localhost:28999 -> container:28999"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-> hello from inside the container"),
        "the request went through: {stdout}"
    );
    assert!(stdout.contains("cleaned up"), "{stdout}");
    // Its admin API took root's own token (tunnel-svc ls finds it there).
    assert!(
        state.join("porthole/admin.token").exists(),
        "the admin token is in the state directory"
    );
    let _ = std::fs::remove_dir_all(&state);
    // Nothing left behind: no namespace, no host port.
    let pid_tag = stdout
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("porthole-demo-"))
        })
        .expect("the demo names its namespace")
        .to_string();
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&pid_tag),
        "{pid_tag} is gone"
    );
    common::wait_for("host port 28999 free", Duration::from_secs(5), || {
        std::net::TcpListener::bind("127.0.0.1:28999").is_ok()
    });
}
