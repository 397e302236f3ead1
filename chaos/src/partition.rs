//! Network partitions between the processes of one machine, without containers: each process
//! runs in a cgroup (v2) of its own from its first instruction (`deploy/cluster.sh` with
//! `VIGIL_CLUSTER_CGROUP`), and iptables drops the TCP packets the processes of one cgroup send
//! to given loopback ports (`-m cgroup --path`). Dropped, not refused: the far side sees
//! silence, as across a real partition, and the near side's calls time out.
//!
//! A socket belongs to the cgroup of the process that opened it, so a process moved into a
//! cgroup later keeps its old connections: hence the cgroup from the start.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup v2 hierarchy is mounted (partitions need iptables' cgroup match)")
}

/// A cgroup of this test's own under the v2 hierarchy, for the parts of one cluster; removed
/// (with the part cgroups in it, once empty) on drop.
pub struct CgroupRoot {
    mount: PathBuf,
    dir: PathBuf,
}

impl CgroupRoot {
    pub fn new() -> Self {
        let mount = cgroup2_mount();
        let dir = mount.join(format!("vigil-chaos-{}", crate::random_suffix()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot make the cgroup {}: {e}", dir.display()));
        Self { mount, dir }
    }

    /// The directory to give `deploy/cluster.sh` as `VIGIL_CLUSTER_CGROUP`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A part's cgroup as iptables names it: its path below the mount.
    fn path_of(&self, part: &str) -> String {
        self.dir
            .join(part)
            .strip_prefix(&self.mount)
            .expect("below the mount")
            .display()
            .to_string()
    }
}

impl Default for CgroupRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        if let Ok(parts) = std::fs::read_dir(&self.dir) {
            for part in parts.flatten() {
                if part.path().is_dir() {
                    let _ = std::fs::remove_dir(part.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The iptables rules of one partition; healed (rules deleted) by [`Cut::heal`] or on drop.
#[derive(Default)]
pub struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    /// Drops every TCP packet that `part` (a cgroup of `root`) sends to one of `ports` on
    /// 127.0.0.1.
    pub fn drop_from(&mut self, root: &CgroupRoot, part: &str, ports: &[u16]) {
        for port in ports {
            let rule: Vec<String> = [
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                &port.to_string(),
                "-m",
                "cgroup",
                "--path",
                &root.path_of(part),
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            iptables("-I", &rule);
            self.rules.push(rule);
        }
    }

    /// Both ways between `a` and `b`: each side's packets to the other's ports.
    pub fn between(
        &mut self,
        root: &CgroupRoot,
        (a, a_ports): (&[&str], &[u16]),
        (b, b_ports): (&[&str], &[u16]),
    ) {
        for part in a {
            self.drop_from(root, part, b_ports);
        }
        for part in b {
            self.drop_from(root, part, a_ports);
        }
    }

    pub fn heal(mut self) {
        self.delete();
    }

    fn delete(&mut self) {
        for rule in self.rules.drain(..) {
            iptables("-D", &rule);
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.delete();
    }
}

fn iptables(op: &str, rule: &[String]) {
    let out = Command::new("iptables")
        .arg(op)
        .args(rule)
        .output()
        .expect("iptables runs (Debian's iptables package, as root)");
    assert!(
        out.status.success(),
        "iptables {op} {}: {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
