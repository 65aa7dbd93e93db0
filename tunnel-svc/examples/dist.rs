//! `cargo dist [--out DIR]`: release builds of tunnel-svc and of a static
//! monitor-svc (one that runs in any image: busybox, alpine, distroless),
//! side by side in `dist/`, where `tunnel-svc --docker` finds the monitor
//! with no flag. The alias is in `.cargo/config.toml`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            println!(
                "{0}/tunnel-svc and {0}/monitor-svc (static) are ready; keep them together, \
                 e.g. sudo install -m 0755 {0}/tunnel-svc {0}/monitor-svc /usr/local/bin/",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cargo dist: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tunnel-svc is in the workspace")
        .to_path_buf();
    let mut out = root.join("dist");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().ok_or("--out wants a directory")?.into(),
            "-h" | "--help" => {
                println!("usage: cargo dist [--out DIR]   (default: dist/ in the workspace)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; see cargo dist --help")),
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    // The host's own target, named: RUSTFLAGS then reach only what runs
    // in containers, never build scripts, and its own directory keeps the
    // host build's artifacts apart.
    let host = host_triple(&cargo)?;
    cargo_build(&cargo, &root, &["-p", "tunnel-svc"], None)?;
    cargo_build(
        &cargo,
        &root,
        &["-p", "monitor-svc", "--target", &host],
        Some("-C target-feature=+crt-static"),
    )?;
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let built = [
        target_dir.join("release/tunnel-svc"),
        target_dir.join(&host).join("release/monitor-svc"),
    ];
    for from in built {
        let to = out.join(from.file_name().expect("a binary's name"));
        // Replaced, not written over: a running copy keeps its file.
        let _ = std::fs::remove_file(&to);
        std::fs::copy(&from, &to)
            .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    }
    Ok(out)
}

fn host_triple(cargo: &std::ffi::OsStr) -> Result<String, String> {
    // rustc beside this cargo, as cargo itself would run it.
    let rustc = std::env::var_os("RUSTC")
        .unwrap_or_else(|| Path::new(cargo).with_file_name("rustc").into_os_string());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&rustc).display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .ok_or_else(|| "rustc -vV names no host target".into())
}

fn cargo_build(
    cargo: &std::ffi::OsStr,
    root: &Path,
    args: &[&str],
    rustflags: Option<&str>,
) -> Result<(), String> {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--locked"])
        .args(args);
    if let Some(flags) = rustflags {
        let mut all = std::env::var("RUSTFLAGS").unwrap_or_default();
        all = format!("{all} {flags}").trim().to_string();
        cmd.env("RUSTFLAGS", all);
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build {} failed ({status})", args.join(" ")));
    }
    Ok(())
}
