//! The views over the admin API that scripts and agents use, against a real
//! tunnel-svc following a monitor in a namespace: `ls -o json`, `watch`
//! (NDJSON), `wait -o json` and its exit statuses, and `tunnel-svc mcp`
//! driven by the reference MCP client (the `mcp` package from PyPI).

use porthole_testkit as common;

use common::{
    require_root, skip_or_fail, unused_local_port, within, MonitorProc, Netns, Server, TunnelProc,
};
use serde_json::Value;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `tunnel-svc ARGS` against `tunnel`: its exit code and stdout.
async fn run(tunnel: &TunnelProc, args: &[&str]) -> (Option<i32>, String) {
    let out = within(&format!("tunnel-svc {args:?}"), tunnel.cli(args).output())
        .await
        .expect("run tunnel-svc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The next line of `watch` that is about tunnel `id`, as JSON.
async fn next_about(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    id: &str,
) -> Value {
    loop {
        let line = within("a line from tunnel-svc watch", lines.next_line())
            .await
            .expect("watch's stdout")
            .expect("watch still running");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["tunnel"]["id"] == id {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_for_scripts_ls_watch_and_wait() {
    if !require_root() {
        return;
    }
    let port = unused_local_port();
    let id = format!("default:tcp:{port}");
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    let mut watch = tunnel
        .cli(&["watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tunnel-svc watch");
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();

    // Open: watch sees it become active.
    let server = Server::start(&ns, "127.0.0.1", port, "json").await;
    let mut seen = vec![];
    loop {
        let v = next_about(&mut lines, &id).await;
        let state = v["tunnel"]["state"].as_str().unwrap().to_string();
        seen.push(state.clone());
        if state == "TUNNEL_STATE_ACTIVE" {
            assert_eq!(v["removed"], false);
            break;
        }
    }

    // ls -o json: ListTargets and ListTunnels, as jq would read them.
    let (code, out) = run(&tunnel, &["ls", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let all: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all["targets"][0]["name"], "default");
    assert_eq!(all["targets"][0]["connected"], true);
    let t = all["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(t["hostPort"], u64::from(port));
    assert_eq!(t["state"], "TUNNEL_STATE_ACTIVE");
    assert_eq!(t["protocol"], "PROTOCOL_TCP");
    assert!(t["bytesIn"].is_string(), "uint64 as a string: {t}");

    // wait -o json: ready, with the host address.
    let (code, out) = run(&tunnel, &["wait", &port.to_string(), "-o", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let ready: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["host"], format!("localhost:{port}"));
    assert_eq!(ready["tunnel"]["id"], id.as_str());
    // Nothing listens on port 1 in the container: timed out, status 3.
    let (code, out) = run(&tunnel, &["wait", "1", "--timeout", "300ms", "-o", "json"]).await;
    assert_eq!(code, Some(3), "{out}");
    let not: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(not["ready"], false);
    assert!(
        not["error"].as_str().unwrap().contains("timed out"),
        "{out}"
    );

    // Closed: watch sees it.
    let (code, _) = run(&tunnel, &["close", &id]).await;
    assert_eq!(code, Some(0));
    loop {
        let v = next_about(&mut lines, &id).await;
        if v["tunnel"]["state"] == "TUNNEL_STATE_CLOSED" {
            break;
        }
    }
    // Interrupted, it exits cleanly.
    let pid = rustix::process::Pid::from_raw(watch.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = within("watch to exit", watch.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    drop(server);
}

/// The MCP client of the `mcp` package (PyPI), run by python3 from a
/// virtualenv `.ci/run` makes; `None` when it is not there.
fn mcp_python() -> Option<std::path::PathBuf> {
    let venv = common::target_dir().join("mcp-venv/bin/python3");
    if venv.is_file() {
        return Some(venv);
    }
    skip_or_fail(
        "an_mcp_client_waits_for_a_port_and_gets_its_url",
        "needs the mcp client (python3 -m venv target/mcp-venv && target/mcp-venv/bin/pip install mcp)",
    );
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_client_waits_for_a_port_and_gets_its_url() {
    if !require_root() {
        return;
    }
    let Some(python) = mcp_python() else {
        return;
    };
    let port = unused_local_port();
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py");
    let cmd = tunnel.cli(&["mcp"]);
    let argv: Vec<String> = std::iter::once(cmd.as_std().get_program())
        .chain(cmd.as_std().get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let state_dir = tunnel.state_dir().display().to_string();
    let mut py = tokio::process::Command::new(python);
    py.arg(client)
        .arg(port.to_string())
        .arg(monitor.addr().port().to_string())
        .arg(&state_dir)
        .args(&argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut running = py.spawn().expect("python3 mcp_client.py");
    let mut lines = BufReader::new(running.stdout.take().unwrap()).lines();
    // The port opens once the client is waiting for it.
    let mut stdout = String::new();
    while let Some(line) = within("the MCP client's lines", lines.next_line())
        .await
        .expect("its stdout")
    {
        let waiting = line == "calling wait_for_port";
        stdout.push_str(&line);
        stdout.push('\n');
        if waiting {
            break;
        }
    }
    let server = Server::start(&ns, "127.0.0.1", port, "mcp").await;
    while let Some(line) = within("the MCP client's lines", lines.next_line())
        .await
        .expect("its stdout")
    {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let out = within("the MCP client", running.wait_with_output())
        .await
        .expect("the MCP client ran");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(said["url"], format!("http://localhost:{port}"), "{said}");
    assert!(
        said["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "wait_for_port"),
        "{said}"
    );
    assert!(
        said["why"].as_str().unwrap().contains("monitor's own port"),
        "{said}"
    );
    drop(server);
}
