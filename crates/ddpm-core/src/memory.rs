//! How much memory this process may still allocate: the least of what the machine has
//! (`MemAvailable`), what the process's address-space limit leaves (`RLIMIT_AS`, as
//! `ulimit -v` sets it) and what its cgroup leaves (`memory.max` − `memory.current`, as a
//! container or `systemd-run -p MemoryMax=` sets it). Every size check of the workspace asks
//! here before it allocates, so a request that cannot fit is refused with a message instead of
//! aborting on "memory allocation failed".
//!
//! ```
//! let need = 1u64 << 20;
//! // One MiB fits on any machine that runs the tests.
//! ddpm_core::memory::check(need, "a test buffer").unwrap();
//! assert!(ddpm_core::memory::check(u64::MAX, "everything").is_err());
//! ```

use std::path::{Path, PathBuf};

/// What limits the memory this process can still allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The machine's `MemAvailable`.
    Machine,
    /// The process's address-space limit (`ulimit -v`).
    AddressSpace,
    /// The cgroup's `memory.max` (a container's limit).
    Cgroup,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Machine => "available on this machine",
            Limit::AddressSpace => "left under this process's address-space limit (ulimit -v)",
            Limit::Cgroup => "left under this cgroup's memory limit (memory.max)",
        })
    }
}

/// The bytes this process can still allocate and what limits them, or `None` where nothing is
/// known (not Linux).
pub fn available() -> Option<(u64, Limit)> {
    let mut best: Option<(u64, Limit)> = None;
    let mut consider = |bytes: Option<u64>, limit: Limit| {
        if let Some(b) = bytes {
            if best.is_none_or(|(x, _)| b < x) {
                best = Some((b, limit));
            }
        }
    };
    consider(mem_available(), Limit::Machine);
    consider(address_space_left(), Limit::AddressSpace);
    consider(cgroup_left(), Limit::Cgroup);
    best
}

/// Fails, naming `what`, the bytes it needs and what is left, when `need` bytes cannot be
/// allocated ([`available`]); passes where nothing is known.
pub fn check(need: u64, what: &str) -> Result<(), String> {
    match available() {
        Some((avail, limit)) if need > avail => Err(format!(
            "{what} needs about {} but only {} is {limit}",
            human(need),
            human(avail)
        )),
        _ => Ok(()),
    }
}

/// `bytes` as a short human size (`1.5 GiB`, `12.0 MiB`, `900 B`).
pub fn human(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB * KIB * KIB {
        format!("{:.1e} bytes", b)
    } else if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `RLIMIT_AS` (from /proc/self/limits) minus the address space in use (`VmSize`).
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    // "Max address space  <soft> <hard> bytes"
    let soft = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse: no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let used_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(limit.saturating_sub(used_kib.saturating_mul(1024)))
}

/// The least `memory.max − memory.current` over this process's cgroup (v2) and its ancestors.
fn cgroup_left() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: one line "0::/path".
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = Path::new("/sys/fs/cgroup");
    let mut dir: PathBuf = root.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    loop {
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current")) {
            let left = max.saturating_sub(cur);
            best = Some(best.map_or(left, |b: u64| b.min(left)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(900), "900 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_knows_what_is_left_and_refuses_the_impossible() {
        let (avail, _) = available().expect("Linux has /proc/meminfo");
        assert!(avail > 0);
        let e = check(u64::MAX, "a huge thing").unwrap_err();
        assert!(e.contains("a huge thing"), "{e}");
    }
}
