//! The one place tunnel-svc needs `unsafe`: making a child process die with
//! tunnel-svc (Linux's `PR_SET_PDEATHSIG` must be set in the child between
//! `fork` and `exec`, which only `CommandExt::pre_exec` reaches, and
//! `pre_exec` is `unsafe` because the closure runs in a forked copy of a
//! multi-threaded process). No crate wraps it safely.
#![allow(unsafe_code)]

use rustix::process::{getpid, getppid, set_parent_process_death_signal, Signal};

/// Makes the child started by `cmd` receive SIGKILL when tunnel-svc dies,
/// however it dies (SIGKILL included), so no ssh process outlives it.
///
/// The signal fires when the *thread* that spawned the child exits; ssh
/// processes are spawned from tokio worker threads, which live as long as
/// the runtime.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = getpid();
    // SAFETY: the closure only makes two async-signal-safe system calls
    // (prctl and getppid) through rustix, touches no lock and allocates
    // nothing, which is what code between fork and exec may do.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent died before the prctl: nobody would send the signal.
            if getppid() != Some(parent) {
                return Err(std::io::Error::other("tunnel-svc exited"));
            }
            Ok(())
        });
    }
}
