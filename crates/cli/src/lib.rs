//! What the two binaries of this package share: `plexus` (every command) and `plexus-proxy`
//! (the data plane alone, for sidecar images and hosts that run only proxies). Both start a
//! proxy through the same command line ([`proxy_cmd`]), logging and runtime set-up.

pub mod logging;
pub mod proxy_cmd;
pub mod resident;

use std::process::ExitCode;

/// A failure the user should see as `error: ...` with the given exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Usage or validation error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure { code: 2, message: message.into() }
    }
    /// Runtime failure (exit 1).
    pub fn runtime(message: impl Into<String>) -> Self {
        Failure { code: 1, message: message.into() }
    }
}

/// The process's exit status for a command's result; prints the failure's message (an empty
/// message passes on an exit status, e.g. the workload's under `plexus run`).
pub fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// The async runtime for `workers` threads. One worker runs on tokio's single-threaded
/// scheduler: no work stealing and no cross-thread wake-ups (a sidecar's default); 0 means one
/// per CPU this process may run on.
pub fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build().map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))
}
