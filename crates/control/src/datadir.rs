//! The control plane's data dir (default `./.plexus`): the store file, the admin token and the
//! workload tokens' file ([`crate::tokens`]), created on first start with owner-only
//! permissions. (There is no unscoped join token: each workload gets a token bound to its
//! identity.)

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// File names inside the data dir.
pub const ADMIN_TOKEN: &str = "admin-token";
pub const STORE_FILE: &str = "store.redb";

/// An initialised data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub path: PathBuf,
    pub admin_token: String,
}

impl DataDir {
    /// Creates the directory (0700) and any missing token (0600), and reads the tokens.
    pub fn init(path: &Path) -> std::io::Result<DataDir> {
        std::fs::create_dir_all(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        let admin_token = ensure_token(&path.join(ADMIN_TOKEN))?;
        // A join token left by an earlier version authorised any identity: remove it.
        let _ = std::fs::remove_file(path.join("join-token"));
        Ok(DataDir { path: path.to_path_buf(), admin_token })
    }

    pub fn store_path(&self) -> PathBuf {
        self.path.join(STORE_FILE)
    }
}

/// Reads a token file written by `plexus control` (for the CLI).
pub fn read_token(data_dir: &Path, name: &str) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(data_dir.join(name))?.trim().to_string())
}

fn ensure_token(path: &Path) -> std::io::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let t = existing.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let token = format!("{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_tokens_once() {
        let dir = std::env::temp_dir().join(format!("plexus-datadir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = DataDir::init(&dir).expect("init");
        let b = DataDir::init(&dir).expect("init again");
        assert_eq!(a.admin_token, b.admin_token, "tokens survive restarts");
        assert_eq!(a.admin_token.len(), 64);
        let mode = std::fs::metadata(dir.join(ADMIN_TOKEN)).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_token(&dir, ADMIN_TOKEN).expect("read"), a.admin_token);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
