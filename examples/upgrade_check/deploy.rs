//! Deploys: the binary the server runs from is replaced the way deploys do it (a new
//! file written next to it, then renamed over it), with the good binary or a broken one.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::Res;

/// The directory the server runs from, with the binary a deploy replaces.
pub struct Deploy {
    /// The path the server runs from (its `argv[0]`).
    pub bin: PathBuf,
    /// A pristine copy of the server binary.
    good: PathBuf,
}

impl Deploy {
    pub fn new(dir: &Path, server: &Path) -> Res<Deploy> {
        let name = server.file_name().unwrap_or("server".as_ref());
        let deploy = Deploy {
            bin: dir.join(name),
            good: dir.join("good-binary"),
        };
        fs::copy(server, &deploy.good)
            .map_err(|e| format!("copy {} to {}: {e}", server.display(), dir.display()))?;
        deploy.install_good()?;
        Ok(deploy)
    }

    pub fn dir(&self) -> &Path {
        self.good.parent().unwrap_or(Path::new("."))
    }

    pub fn install_good(&self) -> Res<()> {
        self.install(0o755, |tmp| fs::copy(&self.good, tmp).map(drop))
    }

    pub fn install_script(&self, script: &str) -> Res<()> {
        self.install(0o755, |tmp| fs::write(tmp, script))
    }

    pub fn install_not_executable(&self) -> Res<()> {
        self.install(0o644, |tmp| fs::copy(&self.good, tmp).map(drop))
    }

    pub fn remove(&self) -> Res<()> {
        fs::remove_file(&self.bin).map_err(|e| format!("remove {}: {e}", self.bin.display()))
    }

    /// As a deploy does it: write a new file next to the binary, then rename it over.
    pub fn install(&self, mode: u32, write: impl FnOnce(&Path) -> io::Result<()>) -> Res<()> {
        let tmp = self.dir().join("deploy.tmp");
        let _ = fs::remove_file(&tmp);
        write(&tmp)
            .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
            .and_then(|()| fs::rename(&tmp, &self.bin))
            .map_err(|e| format!("deploy to {}: {e}", self.bin.display()))
    }
}
