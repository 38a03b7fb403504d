//! An exclusive, advisory lock on a run folder, so that two runs never write into one folder.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

use crate::error::{Result, TrainError};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// Holds the run folder `dir` for as long as it lives: a second [`RunLock::acquire`] of the same
/// folder, from any process, fails at once with [`TrainError::Locked`] naming the holder's pid.
///
/// The lock is the operating system's advisory file lock (`flock` on Unix, `LockFileEx` on
/// Windows) on `dir/.lock`, so it is released when the holder exits, however it exits
/// (`kill -9` included): a stale lock file never blocks a later run. The file is left in place.
///
/// ```
/// use ddpm_train::{RunLock, TrainError};
/// let dir = std::env::temp_dir().join(format!("run-lock-doc-{}", std::process::id()));
/// let held = RunLock::acquire(&dir)?;
/// let err = RunLock::acquire(&dir).unwrap_err();
/// assert!(matches!(err, TrainError::Locked { .. }));
/// assert!(err.to_string().contains(&format!("pid {}", std::process::id())));
/// drop(held);
/// let again = RunLock::acquire(&dir)?; // free once the holder is gone
/// # drop(again);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), TrainError>(())
/// ```
#[derive(Debug)]
pub struct RunLock {
    file: File,
    dir: PathBuf,
}

impl RunLock {
    /// Locks `dir` (creating it), or fails at once if another holder has it.
    ///
    /// `dir/.lock` is opened without following a symbolic link (`O_NOFOLLOW`) and must be a
    /// regular file with one link that is empty or holds `pid N`: anything else is refused
    /// with [`TrainError::Config`] and left as it is, so a lock never truncates a file this
    /// program did not make (tested by `crates/ddpm-cli/tests/faults.rs`,
    /// `the_run_lock_and_its_cleanup_touch_only_their_own_files`).
    pub fn acquire(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let refuse = |what: &str| {
            TrainError::Config(format!(
                "{} is {what}, not a lock file of this program: it was left untouched. Remove it \
                 if it is yours, or choose another output folder",
                path.display()
            ))
        };
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        }
        let mut file = options.open(&path).map_err(|e| {
            let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            if link {
                refuse("a symbolic link")
            } else {
                io(&path)(e)
            }
        })?;
        let meta = file.metadata().map_err(io(&path))?;
        if !meta.is_file() {
            return Err(refuse("not a regular file"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if meta.nlink() != 1 {
                return Err(refuse("a file with other hard links"));
            }
        }
        if meta.len() > 64 {
            return Err(refuse("a file of some other content"));
        }
        if !file.try_lock_exclusive().map_err(io(&path))? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "a process that has not written its pid yet".to_string(),
                t => t.escape_debug().to_string(),
            };
            return Err(TrainError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        let mut text = String::new();
        let ours = file.read_to_string(&mut text).is_ok() && is_pid_line(&text);
        if !ours {
            return Err(refuse("a file of some other content"));
        }
        // Ours now. Temp files that a killed run left behind cannot be in use any more:
        // remove them (only the names this program gives them, never through a link).
        remove_stale_temps(dir);
        remove_stale_temps(&dir.join("samples"));
        // Say who holds it, for the message a second run prints.
        let who = format!("pid {}", std::process::id());
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        file.write_all(who.as_bytes()).map_err(io(&path))?;
        file.flush().map_err(io(&path))?;
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// Gives the folder up after a run that never started: removes the lock file, then the
    /// folder itself if nothing else is in it (a folder with any other file is kept as it is).
    /// For a folder that [`RunLock::acquire`] created, so that a refused run leaves nothing
    /// behind (tested by `crates/ddpm-cli/tests/faults.rs`,
    /// `special_files_and_odd_tensors_are_refused`).
    pub fn abandon(self) {
        let dir = self.dir.clone();
        drop(self);
        let _ = std::fs::remove_file(dir.join(LOCK_FILE));
        let _ = std::fs::remove_dir(&dir);
    }

    /// The folder this lock holds.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Empty, or `pid N`: what [`RunLock::acquire`] writes.
fn is_pid_line(text: &str) -> bool {
    let t = text.trim();
    t.is_empty()
        || t.strip_prefix("pid ")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is a file a run writes into its folder or its `samples` folder.
fn is_run_file(name: &str) -> bool {
    matches!(
        name,
        "checkpoint.safetensors" | "metrics.jsonl" | "loss.png" | ".budget-probe.safetensors"
    ) || ((name.starts_with("epoch_") || name.starts_with("step_")) && name.ends_with(".png"))
}

/// Removes from `dir` the temp files [`ddpm_core::write_atomic`] left while writing one of a
/// run's own files ([`ddpm_core::files::temp_target`], `is_run_file`) for a process that is
/// gone. A `dir` that is a symbolic link is left alone, and so is every other file.
fn remove_stale_temps(dir: &Path) {
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(target) = ddpm_core::files::temp_target(&name) else {
            continue;
        };
        let pid = name
            .trim_end_matches(".tmp")
            .rsplit('.')
            .nth(1)
            .unwrap_or_default();
        let alive = Path::new("/proc").join(pid).exists() && pid != "0";
        let file = e.file_type().is_ok_and(|t| t.is_file());
        if is_run_file(target) && file && !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it explicit.
        let _ = FileExt::unlock(&self.file);
    }
}
