//! Directories other users can write to. Whoever can write to a directory can create a
//! name in it before its rightful owner does (a sticky directory such as `/tmp` included:
//! the sticky bit protects names that exist, not free ones), or replace one (without the
//! sticky bit). The pid file's directory and a control socket's are checked here.

use std::path::Path;

use rustix::fs::Stat;

/// The directory a name at `path` is in: its parent, or `.` for a bare name.
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Why a user other than root, the users in `uids` and the group `gid` could create or
/// replace a name in the directory whose `stat` is `dir`; `None` if nobody else can.
///
/// Nobody else can when the directory belongs to root or to one of `uids`, and neither
/// every user (`o+w`) nor a group other than `gid` or root's (`g+w`) may write to it. A
/// group-writable directory of the user's own primary group is accepted: `mkdir` makes
/// one wherever the umask is 002, as it is for users with a group of their own.
pub(crate) fn others_can_write(dir: &Stat, uids: &[u32], gid: u32) -> Option<String> {
    #[allow(clippy::unnecessary_cast)]
    let (mode, owner, group) = (
        dir.st_mode as u32 & 0o7777,
        dir.st_uid as u32,
        dir.st_gid as u32,
    );
    if mode & 0o002 != 0 {
        Some(format!("every user can write to it (mode {mode:04o})"))
    } else if mode & 0o020 != 0 && group != gid && group != 0 {
        Some(format!(
            "the members of group {group} can write to it (mode {mode:04o})"
        ))
    } else if owner != 0 && !uids.contains(&owner) {
        Some(format!("it belongs to uid {owner}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(mode: u32, uid: u32, gid: u32) -> Stat {
        // SAFETY: `Stat` is a plain C struct (libc's `stat`, or its kernel equivalent):
        // all zeroes is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_mode = (0o040000 | mode) as _;
        st.st_uid = uid as _;
        st.st_gid = gid as _;
        st
    }

    #[test]
    fn only_root_the_users_and_their_own_group_may_write() {
        // Root's /run, a service's own directory, a umask-002 directory of its own group.
        assert_eq!(others_can_write(&dir(0o755, 0, 0), &[1000], 1000), None);
        assert_eq!(
            others_can_write(&dir(0o700, 1000, 1000), &[1000], 1000),
            None
        );
        assert_eq!(
            others_can_write(&dir(0o2775, 1000, 1000), &[1000], 1000),
            None
        );
        assert_eq!(others_can_write(&dir(0o775, 0, 0), &[1000], 1000), None);
        // /tmp, sticky or not; a shared group; someone else's directory.
        let why = others_can_write(&dir(0o1777, 0, 0), &[1000], 1000).unwrap();
        assert_eq!(why, "every user can write to it (mode 1777)");
        assert!(others_can_write(&dir(0o777, 1000, 1000), &[1000], 1000).is_some());
        let why = others_can_write(&dir(0o775, 1000, 100), &[1000], 1000).unwrap();
        assert_eq!(why, "the members of group 100 can write to it (mode 0775)");
        let why = others_can_write(&dir(0o755, 1001, 1001), &[1000], 1000).unwrap();
        assert_eq!(why, "it belongs to uid 1001");
        assert_eq!(
            others_can_write(&dir(0o755, 1001, 1001), &[1000, 1001], 1000),
            None
        );
    }
}
