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
    pub fn acquire(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        if !file.try_lock_exclusive().map_err(io(&path))? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "a process that has not written its pid yet".to_string(),
                t => t.to_string(),
            };
            return Err(TrainError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        // Ours now. Temp files that a killed writer left behind cannot be in use any more:
        // remove them.
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

    /// The folder this lock holds.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Removes the temp files of [`ddpm_core::write_atomic`] (`.NAME.PID.N.tmp`) from `dir`.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && e.path().is_file() {
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
