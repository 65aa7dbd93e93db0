//! ssh backend: one OpenSSH ControlMaster per target.

use super::CarryError;
use crate::tunnel::Stats;
use std::path::PathBuf;
use tokio::net::TcpStream;

/// Settings of one target's ssh connection.
#[derive(Clone, Debug)]
pub struct SshConfig {
    pub target: String,
    /// Destination as the user's ssh config knows it (an alias or host).
    pub host: String,
    /// Extra `-o` options.
    pub options: Vec<String>,
    /// Private directory for the control socket and forward sockets.
    pub runtime_dir: PathBuf,
}

pub struct Ssh {
    config: SshConfig,
}

impl Ssh {
    pub fn start(config: SshConfig) -> Ssh {
        Ssh { config }
    }

    pub async fn open(&self, port: u16) -> Result<(), String> {
        Err(format!(
            "ssh backend for {} is not available yet (port {port})",
            self.config.host
        ))
    }

    pub async fn close(&self, _port: u16) {}

    pub async fn carry(
        &self,
        _conn: TcpStream,
        _port: u16,
        _stats: &Stats,
    ) -> Result<(), CarryError> {
        Err(CarryError::Other("ssh backend is not available yet".into()))
    }

    pub async fn shutdown(&self) {}
}
