//! [`UnixAddr`]: plain data, the same on every platform (the stub for targets without
//! upgrades has it too).

use std::fmt;
use std::path::PathBuf;

/// The address of a Unix domain socket: a filesystem path or (Linux) an abstract name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UnixAddr {
    /// A path in the filesystem. Relative paths are relative to the working directory
    /// at the time the socket is bound.
    Path(PathBuf),
    /// A Linux abstract socket name (without the leading NUL byte).
    Abstract(Vec<u8>),
}

impl UnixAddr {
    /// An abstract socket name (Linux only; binding fails elsewhere).
    pub fn abstract_name(name: impl AsRef<[u8]>) -> Self {
        UnixAddr::Abstract(name.as_ref().to_vec())
    }
}

impl From<&std::path::Path> for UnixAddr {
    fn from(path: &std::path::Path) -> Self {
        UnixAddr::Path(path.to_path_buf())
    }
}

impl From<PathBuf> for UnixAddr {
    fn from(path: PathBuf) -> Self {
        UnixAddr::Path(path)
    }
}

impl From<&PathBuf> for UnixAddr {
    fn from(path: &PathBuf) -> Self {
        UnixAddr::Path(path.clone())
    }
}

impl From<&str> for UnixAddr {
    fn from(path: &str) -> Self {
        UnixAddr::Path(PathBuf::from(path))
    }
}

impl From<String> for UnixAddr {
    fn from(path: String) -> Self {
        UnixAddr::Path(PathBuf::from(path))
    }
}

impl fmt::Display for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixAddr::Path(p) => write!(f, "{}", p.display()),
            UnixAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}
