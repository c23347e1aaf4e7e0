//! The pid file against other users, with real processes: a directory they can write to
//! (`/tmp`) is refused before anything is created in it, and the temporary files that
//! writers killed mid-write left behind are removed by the next writer, but only files
//! of this user whose writer is gone, never a link, a directory or another user's file.

#[cfg(target_os = "linux")]
mod util;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, util};

    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use util::{listing, signal, Run};

    /// The entry point of the processes the tests start (`util::scenario_args`).
    fn scenario_entry() {
        if let Ok(name) = std::env::var("TF_SCENARIO") {
            util::scenario(&name);
        }
    }

    /// A scenario that writes `dir/app.pid` in `ready()`.
    fn writer(tag: &str, dir: &Path) -> Run {
        let pid_file = dir.join("app.pid").to_string_lossy().into_owned();
        Run::start(tag, &[("TF_PIDFILE", pid_file)])
    }

    /// Its pid file is written: it names it, and the run is stopped (which removes it).
    #[track_caller]
    fn written(mut run: Run, dir: &Path) {
        let pid = run.expect("ready").pid;
        let content = std::fs::read_to_string(dir.join("app.pid")).unwrap();
        assert_eq!(content, format!("{pid}\n"));
        signal(pid, libc::SIGTERM);
        run.expect_all_exited();
    }

    /// Its pid file is refused for the directory `dir`, by `Upgrader::new` (before
    /// anything is bound): the message names the directory and `why`, and nothing was
    /// created there.
    #[track_caller]
    fn refused(mut run: Run, dir: &Path, why: &str) {
        let err = run.expect("new-error");
        assert_eq!(err.field("kind"), Some("PidFile"), "{err:?}");
        let msg = err.rest.replace('_', " ");
        let named = format!("the directory {} is not safe for a pid file", dir.display());
        assert!(msg.contains(&named), "{msg}");
        assert!(msg.contains(why), "{msg}");
        run.expect_all_exited();
        assert!(listing(dir).is_empty(), "{:?}", listing(dir));
    }

    fn chmod(dir: &Path, mode: u32) {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(path: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    }

    /// `/tmp`, and a directory every user can write to without the sticky bit: another
    /// user could create the pid file's names there first, or replace them. A directory
    /// of the user's own group, writable by it (umask 002), is accepted.
    fn a_directory_every_user_can_write_to_is_refused() {
        for mode in [0o1777, 0o777] {
            let dir = util::scratch_dir("pid-shared");
            chmod(&dir, mode);
            refused(
                writer("pid-shared", &dir),
                &dir,
                &format!("every user can write to it (mode {mode:04o})"),
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        let dir = util::scratch_dir("pid-own-group");
        chmod(&dir, 0o2775);
        written(writer("pid-own-group", &dir), &dir);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A group-writable directory of another group than the writer's own; a directory
    /// that belongs to another user.
    fn a_directory_another_group_or_user_can_write_to_is_refused() {
        harness::require_root("to give a directory to another group and user");
        let dir = util::scratch_dir("pid-group");
        chmod(&dir, 0o775);
        chown(&dir, 0, 65534);
        refused(
            writer("pid-group", &dir),
            &dir,
            "the members of group 65534 can write to it (mode 0775)",
        );
        chmod(&dir, 0o755);
        chown(&dir, 65534, 65534);
        refused(writer("pid-other", &dir), &dir, "it belongs to uid 65534");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pid that names no process: a child that has been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The temporary name the crate writes `app.pid` under, for `writer`.
    fn temp(writer: u32, random: &str) -> String {
        format!(".app.pid.{writer}.{random}.tmp")
    }

    /// What a writer killed between creating its temporary file and renaming it leaves
    /// behind is removed; look-alikes are not: a file whose writer runs, a symlink and a
    /// directory under a dead writer's name, the name of another file's writer, and the
    /// name an older scheme would have used.
    fn temp_files_of_dead_writers_are_removed() {
        let dir = util::scratch_dir("pid-stale");
        let (dead, alive) = (dead_pid(), std::process::id());
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let stale = [
            temp(dead, "0123456789abcdef"),
            temp(dead, "fedcba9876543210"),
        ];
        for name in &stale {
            std::fs::write(dir.join(name), "4242").unwrap();
        }
        let kept = [
            temp(alive, "0123456789abcdef"),
            format!(".app.pid.{dead}.tmp"),
            format!(".other.pid.{dead}.0123456789abcdef.tmp"),
            temp(dead, "0123456789ABCDEF"),
        ];
        for name in &kept {
            std::fs::write(dir.join(name), "4242").unwrap();
        }
        let link = temp(dead, "1111111111111111");
        std::os::unix::fs::symlink(&victim, dir.join(&link)).unwrap();
        let subdir = temp(dead, "2222222222222222");
        std::fs::create_dir(dir.join(&subdir)).unwrap();

        written(writer("pid-stale", &dir), &dir);
        let mut want: Vec<String> = kept.to_vec();
        want.extend([link, subdir, "victim".into()]);
        want.sort();
        assert_eq!(listing(&dir), want);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Another user's file under a dead writer's name is not the writer's to remove.
    fn temp_files_of_another_user_are_left_alone() {
        harness::require_root("to make a file that belongs to another user");
        let dir = util::scratch_dir("pid-stale-other");
        let dead = dead_pid();
        let theirs = temp(dead, "0123456789abcdef");
        std::fs::write(dir.join(&theirs), "4242").unwrap();
        chown(&dir.join(&theirs), 65534, 65534);
        let ours = temp(dead, "fedcba9876543210");
        std::fs::write(dir.join(&ours), "4242").unwrap();
        written(writer("pid-stale-other", &dir), &dir);
        assert_eq!(listing(&dir), [theirs.as_str()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    pub fn main() {
        harness::main_with_entry(
            scenario_entry,
            &[
                crate::trial!(a_directory_every_user_can_write_to_is_refused),
                crate::trial!(a_directory_another_group_or_user_can_write_to_is_refused),
                crate::trial!(temp_files_of_dead_writers_are_removed),
                crate::trial!(temp_files_of_another_user_are_left_alone),
            ],
        )
    }
}
