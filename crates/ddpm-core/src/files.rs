//! Untrusted input, read with care: regular files only, with a bound on what is read; names
//! from files (model cards, dataset folders) checked before they become part of a path or reach
//! a terminal; and one test of whether two paths are the same file, so that no command writes
//! over the file it reads.
//!
//! ```
//! use ddpm_core::files;
//! assert!(files::check_name("seven").is_ok());
//! assert!(files::check_name("../../etc/evil").is_err());
//! assert!(files::check_name("red\u{1b}]0;title\u{7}").is_err());
//! ```

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The longest name (in bytes) [`check_name`] accepts: class names are labels, not essays.
pub const MAX_NAME_BYTES: usize = 128;

/// Checks a name that comes from a file (a class name on a model card, a dataset's folder
/// name) before it is used in a file name or printed: not empty, at most [`MAX_NAME_BYTES`],
/// no path separator (`/`, `\`), not `.` or `..` and no `..` inside, no control character
/// (escape sequences would drive the terminal). The reason says which rule it breaks.
pub fn check_name(name: &str) -> Result<(), String> {
    let shown = name.escape_debug();
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "`{shown}` is {} bytes long (at most {MAX_NAME_BYTES})",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "`{shown}` holds a control character (terminal escape sequences are refused)"
        ));
    }
    if name.contains(['/', '\\']) || name.contains("..") || name == "." {
        return Err(format!(
            "`{shown}` holds a path separator or `..`: names must not lead out of a folder"
        ));
    }
    Ok(())
}

fn not_regular(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {kind}, not a regular file: give the path of a file"),
    )
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Opens `path` for reading if it is a regular file (symbolic links to one are followed) and
/// returns it with its length. A folder, FIFO, device or socket is an error of kind
/// `InvalidInput` *before* it is opened, so a FIFO cannot block and `/dev/zero` cannot feed an
/// endless read. The error carries no path: the caller names the file.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(kind_of(&meta)));
    }
    let file = File::open(path)?;
    // The same check on what was opened: the path may have changed in between.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(kind_of(&meta)));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file ([`open_regular`]) of at most `max_bytes`; a larger one is an
/// error of kind `InvalidInput` saying both sizes, returned before anything is read.
pub fn read_regular(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "is {len} bytes, more than the {max_bytes} this reader accepts: it is not a file \
                 of this kind"
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow while it is read: never read past the bound.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("grew past {max_bytes} bytes while it was read"),
        ));
    }
    Ok(bytes)
}

/// Whether `a` and `b` name the same existing file (the same device and inode on Unix, the
/// same canonical path elsewhere), through links and `..` alike. False when either does not
/// exist: writing a new file cannot destroy an input.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("same-file-doc-{}", std::process::id()));
/// std::fs::create_dir_all(dir.join("sub"))?;
/// std::fs::write(dir.join("a"), b"x")?;
/// assert!(ddpm_core::files::same_file(&dir.join("a"), &dir.join("sub/../a")));
/// assert!(!ddpm_core::files::same_file(&dir.join("a"), &dir.join("b")));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

/// If `name` is a temp file of [`crate::write_atomic`] (`.NAME.PID.N.tmp`), the `NAME` it
/// was writing; `None` for every other name, so a cleanup that asks first never removes a
/// file this program did not make.
///
/// ```
/// use ddpm_core::files::temp_target;
/// assert_eq!(temp_target(".checkpoint.safetensors.4242.7.tmp"), Some("checkpoint.safetensors"));
/// assert_eq!(temp_target(".notes.tmp"), None);
/// assert_eq!(temp_target(".x.12.tmp"), None);
/// ```
pub fn temp_target(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, call) = rest.rsplit_once('.')?;
    let (target, pid) = rest.rsplit_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(call) && digits(pid) && !target.is_empty()).then_some(target)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_that_leave_a_folder_or_drive_a_terminal_are_refused() {
        for ok in ["0", "seven", "t-shirt", "a.b", "ünïcode"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/abs",
            "a\\b",
            "x..y",
            "tab\there",
            "\u{1b}[2J",
            "\u{9b}31m",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn special_files_are_refused_before_they_are_opened() {
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_regular(Path::new("/"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
        let dir = std::env::temp_dir().join(format!("files-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, vec![0u8; 100]).unwrap();
        assert_eq!(read_regular(&f, 100).unwrap().len(), 100);
        let e = read_regular(&f, 99).unwrap_err();
        assert!(e.to_string().contains("100 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_write_atomic_temp_names_are_temp_targets() {
        assert_eq!(temp_target(".loss.png.1.0.tmp"), Some("loss.png"));
        for other in [
            ".tmp",
            "..1.2.tmp",
            ".a.b.tmp",
            ".a.1.tmp",
            "a.1.2.tmp",
            ".a.1.2",
        ] {
            assert_eq!(temp_target(other), None, "{other}");
        }
    }
}
