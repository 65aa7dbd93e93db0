//! `tunnel-svc --docker` honouring dev containers' port settings, given as
//! the Dev Containers CLI and VS Code give them: the `devcontainer.metadata`
//! label (`docker run --label devcontainer.metadata=...`), compose labels,
//! and a devcontainer.json on the host. Checked as a user would: `curl
//! localhost:PORT`, `tunnel-svc ls` (ListTunnels), what the browser was
//! asked to open.

use porthole_testkit as common;

use common::docker::{get, have_docker, tunnels_of, Container, World};
use common::{poll_until, unused_local_port, wait_for, DEADLINE};
use porthole::pb::v1::{Tunnel, TunnelState};

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// A busybox httpd on `127.0.0.1:PORT` whose page says `name` and whose
/// command line holds `/tmp/www-NAME`, as a shell command.
fn httpd(port: u16, name: &str) -> String {
    format!(
        "mkdir -p /tmp/www-{name} && echo {name} > /tmp/www-{name}/index.html && \
         /bin/busybox httpd -p 127.0.0.1:{port} -h /tmp/www-{name}"
    )
}

/// A container of `w` with `metadata` as its `devcontainer.metadata` label
/// (and `extra` flags), running [`httpd`] for each `(port, name)`.
fn servers(w: &World, metadata: &str, extra: &[&str], servers: &[(u16, &str)]) -> Container {
    let mut script = String::new();
    for (port, name) in servers {
        script.push_str(&httpd(*port, name));
        script.push_str(" && ");
    }
    script.push_str("exec /bin/busybox sleep 600");
    let label = format!("devcontainer.metadata={metadata}");
    let mut all = vec!["--label", label.as_str()];
    all.extend_from_slice(extra);
    w.run(&all, &["/bin/sh", "-c", &script])
}

async fn tunnel_of(t: &common::TunnelProc, c: &Container, port: u16) -> Option<Tunnel> {
    tunnels_of(t, &c.name)
        .await
        .into_iter()
        .find(|x| x.container_port == u32::from(port))
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_ranges_command_lines_forward_ports_and_other_ports() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let [web, ranged, api, other, later] = [(); 5].map(|_| unused_local_port());
    // A range of three holding `ranged` and none of the others.
    let range = ranged..=ranged.saturating_add(2);
    assert!(
        ![web, api, other, later].iter().any(|p| range.contains(p)),
        "ports {web} {api} {other} {later} clash with {range:?}; run again"
    );
    let metadata = format!(
        r#"[{{"forwardPorts": [{later}]}},
            {{"portsAttributes": {{
                "{web}": {{"label": "Web", "protocol": "https"}},
                "{}-{}": {{"onAutoForward": "ignore"}},
                "www-api": {{"label": "API"}}
              }},
              "otherPortsAttributes": {{"onAutoForward": "ignore"}}}}]"#,
        range.start(),
        range.end()
    );
    // The devcontainer.json the container was made from, on this host,
    // applied after the label: its value for a key replaces the label's.
    let file = w.ns.log_dir().join("devcontainer.json");
    std::fs::write(
        &file,
        "{\n  // the API's own name\n  \"portsAttributes\": { \"www-api\": { \"label\": \"API (file)\", }, },\n}\n",
    )
    .unwrap();
    let config_file = format!("devcontainer.config_file={}", file.display());
    let c = servers(
        &w,
        &metadata,
        &["--label", &config_file],
        &[
            (web, "web"),
            (ranged, "ranged"),
            (api, "api"),
            (other, "other"),
        ],
    );
    let tunnel = w.tunnel_svc(&[]).await;
    assert_eq!(poll_until("web", DEADLINE, || get(web)).await, "web");
    assert_eq!(poll_until("api", DEADLINE, || get(api)).await, "api");
    let t = tunnel_of(&tunnel, &c, web).await.expect("web's tunnel");
    assert_eq!(t.label, "Web");
    assert_eq!(t.settings_from, "devcontainer");
    assert_eq!(t.url, format!("https://localhost:{web}"), "protocol");
    let t = tunnel_of(&tunnel, &c, api).await.expect("api's tunnel");
    assert_eq!(
        t.label, "API (file)",
        "a regular expression on the command line, as the file has it"
    );

    // forwardPorts: forwarded before anything listens, then it answers.
    let idle = tunnel
        .wait_tunnel(
            &format!("{}:tcp:{later}", c.name),
            "the idle forward",
            |t| t.state == TunnelState::Active as i32,
        )
        .await;
    assert!(idle.note.contains("nothing listens"), "{idle:?}");
    c.exec(&["sh", "-c", &httpd(later, "later")]);
    assert_eq!(poll_until("later", DEADLINE, || get(later)).await, "later");

    // Ignored by its range and by otherPortsAttributes: no tunnel, the
    // host port stays free.
    for port in [ranged, other] {
        assert!(tunnel_of(&tunnel, &c, port).await.is_none(), "{port}");
        assert!(common::host_port_is_free(port), "{port}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn require_local_port_fails_when_busy_and_elevate_takes_port_80() {
    if !have_docker(&test_name()) {
        return;
    }
    // Port 80 of this host must be free for elevateIfNeeded to take it.
    assert!(
        common::host_port_is_free(80),
        "this test needs the host's port 80"
    );
    let w = World::new();
    let exact = unused_local_port();
    let busy = std::net::TcpListener::bind(("127.0.0.1", exact)).expect("hold the port");
    // Port 80 is in the default skip list: forwardPorts brings it.
    let metadata = format!(
        r#"[{{"forwardPorts": [80], "portsAttributes": {{
              "{exact}": {{"requireLocalPort": true}},
              "80": {{"elevateIfNeeded": true, "label": "site"}}
           }}}}]"#
    );
    let c = servers(&w, &metadata, &[], &[(exact, "exact"), (80, "eighty")]);
    let tunnel = w.tunnel_svc(&[]).await;
    assert_eq!(
        poll_until("port 80 on the host's 80", DEADLINE, || get(80)).await,
        "eighty"
    );
    let failed = tunnel
        .wait_tunnel(
            &format!("{}:tcp:{exact}", c.name),
            "the required port to fail",
            |t| t.state == TunnelState::Failed as i32,
        )
        .await;
    assert!(
        failed.error.contains("busy") && failed.error.contains("dev container"),
        "FAILED with the reason: {failed:?}"
    );
    assert_eq!(failed.host_port, 0, "never remapped");
    drop(busy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compose_sibling_port_named_by_service() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = unused_local_port();
    let project = format!(
        "--label=com.docker.compose.project={}",
        w.label.replace(['.', '='], "-")
    );
    // The app names web's port; web carries no settings of its own, and
    // tunnel-svc skips the port: only the app's forwardPorts brings it.
    let metadata = format!(
        r#"[{{"forwardPorts": ["web:{port}"],
              "portsAttributes": {{"web:{port}": {{"label": "site"}}}}}}]"#
    );
    let app = servers(
        &w,
        &metadata,
        &[&project, "--label=com.docker.compose.service=app"],
        &[],
    );
    let web = servers(
        &w,
        "[]",
        &[&project, "--label=com.docker.compose.service=web"],
        &[(port, "web")],
    );
    let skip = port.to_string();
    let tunnel = w.tunnel_svc(&["--skip", &skip]).await;
    assert_eq!(
        poll_until("web's port", DEADLINE, || get(port)).await,
        "web"
    );
    let t = tunnel_of(&tunnel, &web, port).await.expect("web's tunnel");
    assert_eq!(
        (t.label.as_str(), t.settings_from.as_str()),
        ("site", "devcontainer")
    );

    // The app gone, web's port is skipped again.
    drop(app);
    wait_for("web's port to be skipped again", DEADLINE, || {
        common::host_port_is_free(port)
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn open_browser_runs_xdg_open_in_tunnel_svcs_own_session() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (every, once) = (unused_local_port(), unused_local_port());
    // A fake xdg-open that writes down what it was asked to open, in a
    // session of tunnel-svc's own user (a runtime dir it owns).
    let dir = w.ns.log_dir().join("desktop");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let opened = dir.join("opened");
    let fake = dir.join("bin/xdg-open");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", opened.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let metadata = format!(
        r#"[{{"portsAttributes": {{
              "{every}": {{"onAutoForward": "openBrowser"}},
              "{once}": {{"onAutoForward": "openBrowserOnce", "protocol": "https"}}
           }}}}]"#
    );
    let c = servers(&w, &metadata, &[], &[(every, "every"), (once, "once")]);
    let env = [
        ("PATH", path.as_str()),
        ("DISPLAY", ":99"),
        ("XDG_RUNTIME_DIR", runtime.to_str().unwrap()),
    ];
    let tunnel = w.tunnel_svc_with_env(&[], &env).await;
    let lines = || {
        let mut l: Vec<String> = std::fs::read_to_string(&opened)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    let first = [
        format!("http://localhost:{every}"),
        format!("https://localhost:{once}"),
    ];
    wait_for("both URLs opened", DEADLINE, || lines().len() >= 2);
    assert_eq!(lines(), first);

    // The container stopped (its tunnels close) and started (they open
    // again): openBrowser opens again, openBrowserOnce does not.
    c.docker("stop");
    wait_for("the tunnels to close", DEADLINE, || {
        common::host_port_is_free(every) && common::host_port_is_free(once)
    });
    c.docker("start");
    wait_for("the URL opened again", DEADLINE, || lines().len() >= 3);
    let mut again = first.to_vec();
    again.push(format!("http://localhost:{every}"));
    again.sort();
    // The once port's tunnel is active again too, and said so, before its
    // URL would have been written.
    tunnel
        .wait_tunnel(&format!("{}:tcp:{once}", c.name), "the once tunnel", |t| {
            t.state == TunnelState::Active as i32
        })
        .await;
    wait_for(
        "the log to say the once port was opened before",
        DEADLINE,
        || tunnel.log().matches("opened in the browser before").count() >= 1,
    );
    assert_eq!(lines(), again);
}
