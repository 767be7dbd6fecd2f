//! The environment a run happened in, recorded with its results so runs on different machines
//! are not compared as if they were alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Machine and software facts (Linux `/proc`; fields are empty or 0 where unavailable).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Environment {
    /// CPUs this process may use.
    pub cores: u32,
    /// Total memory, MiB.
    pub memory_mb: u64,
    /// CPU model name.
    pub cpu_model: String,
    /// `linux 6.1.0-...`.
    pub os: String,
    pub hostname: String,
    /// Version of the generator (and of the `plexus` binary).
    pub plexus_version: String,
    /// Extra facts given by the caller (mesh configuration: mTLS, proxies, ...).
    pub extra: BTreeMap<String, String>,
}

impl Environment {
    /// Reads this machine's facts.
    pub fn detect() -> Environment {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(0);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mb = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("")
            .to_string();
        let release = read_trimmed("/proc/sys/kernel/osrelease");
        let os = if release.is_empty() {
            std::env::consts::OS.to_string()
        } else {
            format!("{} {release}", std::env::consts::OS)
        };
        Environment {
            cores,
            memory_mb,
            cpu_model,
            os,
            hostname: read_trimmed("/proc/sys/kernel/hostname"),
            plexus_version: env!("CARGO_PKG_VERSION").to_string(),
            extra: BTreeMap::new(),
        }
    }

    /// The facts as SMP labels (`plexus.io/env.cores`, ...).
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert("plexus.io/env.cores".into(), self.cores.to_string());
        l.insert("plexus.io/env.memory-mb".into(), self.memory_mb.to_string());
        l.insert("plexus.io/env.os".into(), self.os.clone());
        if !self.cpu_model.is_empty() {
            l.insert("plexus.io/env.cpu".into(), self.cpu_model.clone());
        }
        l.insert("plexus.io/version".into(), self.plexus_version.clone());
        for (k, v) in &self.extra {
            l.insert(format!("plexus.io/env.{k}"), v.clone());
        }
        l
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_machine() {
        let e = Environment::detect();
        assert!(e.cores >= 1);
        assert!(e.memory_mb > 0);
        assert!(!e.os.is_empty());
        assert_eq!(e.labels()["plexus.io/env.cores"], e.cores.to_string());
    }
}
