//! The OOM killer's count for droved's own cgroup: how droved tells a
//! worker the kernel killed for memory from one killed by anyone else.
//! Workers live in droved's cgroup (the service's, under systemd), and the
//! kernel counts OOM kills there: `oom_kill` in `memory.events` (cgroup
//! v2, the subtree included) or in `memory.oom_control` (cgroup v1's
//! memory controller, Linux 4.13+). Where neither can be read (no memory
//! controller, a container without it), OOM kills are not told apart.

use std::path::{Path, PathBuf};

/// Where the count of OOM kills of droved's cgroup is, if anywhere.
pub fn oom_counter() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    oom_counter_in(&cgroups, Path::new("/sys/fs/cgroup"))
}

/// [`oom_counter`] for a /proc/PID/cgroup text and a cgroup mount root:
/// the v2 `memory.events` when the memory controller is on the unified
/// hierarchy, else v1's `memory.oom_control`.
fn oom_counter_in(cgroups: &str, root: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(path).join("memory.events"));
            candidates.push(root.join("unified").join(path).join("memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(path).join("memory.oom_control"));
        }
    }
    candidates.into_iter().find(|p| read_oom_kills(p).is_some())
}

/// The `oom_kill` count in a `memory.events` or `memory.oom_control` file.
pub fn read_oom_kills(path: &Path) -> Option<u64> {
    parse_oom_kills(&std::fs::read_to_string(path).ok()?)
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_count_in_either_file() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(parse_oom_kills(v1), Some(7));
        // A kernel before 4.13 has no count in v1: not readable.
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn finds_the_file_of_the_memory_controller() {
        let dir = std::env::temp_dir().join(format!("drove-cgroup-{}", std::process::id()));
        let v1 = dir.join("memory/system.slice/drove@x.service");
        let v2 = dir.join("system.slice/drove@y.service");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v1.join("memory.oom_control"), "oom_kill 0\n").unwrap();
        std::fs::write(v2.join("memory.events"), "oom_kill 1\n").unwrap();
        let legacy = "9:name=systemd:/system.slice/drove@x.service\n\
                      4:memory:/system.slice/drove@x.service\n0::/system.slice/drove@x.service\n";
        assert_eq!(
            oom_counter_in(legacy, &dir),
            Some(v1.join("memory.oom_control"))
        );
        let unified = "0::/system.slice/drove@y.service\n";
        assert_eq!(
            oom_counter_in(unified, &dir),
            Some(v2.join("memory.events"))
        );
        assert_eq!(oom_counter_in("0::/elsewhere\n", &dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
