//! A fleet of baton hosts on this machine for the Ansible rollout tests
//! (`deploy/ansible`). Each host is a baton of its own, with its own port, control
//! socket, release store, staging directory and host configuration directory; Ansible
//! reaches every one with `ansible_connection=local`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::{Release, ReleaseStatus};

use crate::harness::{
    Baton, CliOutput, HarnessError, Result, TestDir, descendants, hello_http_bin, io_err,
    run_to_exit, write_script,
};
use crate::releases::{StoreDir, list};
use crate::systemd::repo_root;

/// Bound on one `ansible-playbook` run over the whole fleet.
pub const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// A release's `bin/healthcheck` that always passes.
pub const HEALTHY: &str = "exit 0";

/// One host: a baton serving hello-http releases from its own store.
pub struct Host {
    /// Its inventory name, `host1`...
    pub name: String,
    /// The baton, killed with its apps on drop.
    pub baton: Baton,
    /// Its listener.
    pub addr: SocketAddr,
    store: StoreDir,
}

impl Host {
    /// The host's configuration directory, which every release's `bin/healthcheck` gets
    /// as its argument (a file there can make one release fail on this host only).
    pub fn conf(&self) -> PathBuf {
        self.store.join("conf")
    }

    /// Where the role unpacks artifacts on this host.
    pub fn stage(&self) -> PathBuf {
        self.store.join("stage")
    }

    /// The store's releases, from the running baton.
    pub async fn releases(&self) -> Result<Vec<Release>> {
        list(&self.baton).await
    }

    /// Whether the store has `version`, and whether its artifact was unpacked here.
    pub async fn has(&self, version: &str) -> Result<(bool, bool)> {
        let stored = self.releases().await?.iter().any(|r| r.version == version);
        Ok((stored, self.stage().join(version).exists()))
    }

    /// The permanent release.
    pub async fn permanent(&self) -> Result<Option<String>> {
        Ok(self
            .releases()
            .await?
            .into_iter()
            .find(|r| r.status == ReleaseStatus::Permanent)
            .map(|r| r.version))
    }
}

/// The hosts, their inventory, and the artifacts built for them.
pub struct Fleet {
    /// host1..hostN, in inventory order.
    pub hosts: Vec<Host>,
    ansible: PathBuf,
    inventory: PathBuf,
    // Last: removed after the hosts are gone.
    dir: TestDir,
}

impl Fleet {
    /// Starts `n` hosts, each on v1 (permanent), and writes their inventory.
    /// `ansible` is the `ansible-playbook` to run.
    pub async fn start(n: usize, ansible: PathBuf) -> Result<Self> {
        let dir = TestDir::new("fleet")?;
        let v1 = release_tree(&dir, "v1", "v1", HEALTHY)?;
        let mut hosts = Vec::with_capacity(n);
        for i in 1..=n {
            let name = format!("host{i}");
            let store = StoreDir::new(&format!("fleet-{name}"))?;
            std::fs::create_dir_all(store.join("conf"))
                .map_err(io_err(format!("mkdir conf of {name}")))?;
            store.add("v1", &v1).await?;
            store.permanent("v1").await;
            let health = format!(
                "exec:{{dir}}/bin/healthcheck {}",
                store.join("conf").display()
            );
            let store_arg = store.arg();
            let args = [
                "--listen",
                "http=127.0.0.1:0",
                "--releases",
                store_arg.as_str(),
                "--probation",
                "2s",
                "--health",
                health.as_str(),
                "--health-interval",
                "200ms",
                "--health-failures",
                "2",
                "--drain-timeout",
                "10s",
            ];
            let baton = Baton::start_in(TestDir::new("fleet-run")?, args, ["bin/app"]).await?;
            let addr = baton.tcp_addr("http").await?;
            hosts.push(Host {
                name,
                baton,
                addr,
                store,
            });
        }
        let inventory = dir.join("inventory.ini");
        std::fs::write(&inventory, inventory_text(&hosts)?)
            .map_err(io_err("write the inventory"))?;
        Ok(Self {
            hosts,
            ansible,
            inventory,
            dir,
        })
    }

    /// A release artifact as a deploy ships one: a `.tar.gz` of the release tree, whose
    /// `bin/app` runs hello-http labelled `label` and whose `bin/healthcheck` is
    /// `healthcheck` (a shell script body; `$1` is the host's configuration directory).
    pub fn artifact(&self, version: &str, label: &str, healthcheck: &str) -> Result<PathBuf> {
        let tree = release_tree(&self.dir, version, label, healthcheck)?;
        let out = self.dir.join(format!("app-{version}.tar.gz"));
        let status = std::process::Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .arg("-czf")
            .arg(&out)
            .arg(".")
            .status()
            .map_err(io_err("run tar"))?;
        if !status.success() {
            return Err(HarnessError::Io {
                what: format!("tar {version}"),
                source: std::io::Error::other(format!("tar exited with {status}")),
            });
        }
        Ok(out)
    }

    /// `ansible-playbook -i INVENTORY deploy/ansible/<playbook> -e K=V... [--check --diff]`,
    /// killed if it runs past [`PLAYBOOK_TIMEOUT`].
    pub async fn playbook(
        &self,
        playbook: &str,
        vars: &[(&str, &str)],
        check: bool,
    ) -> Result<CliOutput> {
        let home = self.dir.join("ansible-home");
        let tmp = self.dir.join("ansible-tmp");
        let mut cmd = tokio::process::Command::new(&self.ansible);
        cmd.current_dir(repo_root().join("deploy/ansible"))
            .arg("-i")
            .arg(&self.inventory)
            .arg(playbook);
        for (k, v) in vars {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        if check {
            cmd.args(["--check", "--diff"]);
        }
        // Everything Ansible writes stays in the fleet's directory.
        cmd.env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", &tmp)
            .env("ANSIBLE_REMOTE_TEMP", &tmp)
            .env("ANSIBLE_RETRY_FILES_ENABLED", "false")
            .env("ANSIBLE_NOCOLOR", "1")
            .env_remove("ANSIBLE_CONFIG");
        run_to_exit(
            cmd,
            &format!("ansible-playbook {playbook}"),
            PLAYBOOK_TIMEOUT,
        )
        .await
    }

    /// Every process the fleet runs: the batons and everything under them.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for h in &self.hosts {
            pids.push(h.baton.pid());
            pids.extend(descendants(h.baton.pid()));
        }
        pids
    }

    /// The fleet's own directory (inventory, artifacts, Ansible's files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `host : ok=N changed=N ...` of a playbook's PLAY RECAP.
pub fn recap<'a>(stdout: &'a str, host: &str) -> Option<&'a str> {
    stdout.lines().find(|l| {
        l.split_once(':')
            .is_some_and(|(h, rest)| h.trim() == host && rest.contains("ok="))
    })
}

fn release_tree(dir: &TestDir, version: &str, label: &str, healthcheck: &str) -> Result<PathBuf> {
    let hello = hello_http_bin()?;
    let tree = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(tree.join("bin")).map_err(io_err(format!("mkdir {version}")))?;
    write_script(
        &tree.join("bin/app"),
        &format!(
            "#!/bin/sh\nexec {} --label {label} \"$@\"\n",
            hello.display()
        ),
    )?;
    write_script(
        &tree.join("bin/healthcheck"),
        &format!("#!/bin/sh\n{healthcheck}\n"),
    )?;
    Ok(tree)
}

fn inventory_text(hosts: &[Host]) -> Result<String> {
    let baton = crate::harness::baton_bin()?;
    let mut s = String::from("[baton]\n");
    for h in hosts {
        s += &format!(
            "{} baton_control={} baton_stage_dir={} baton_http_check_url=http://{}/\n",
            h.name,
            h.baton.control().display(),
            h.stage().display(),
            h.addr
        );
    }
    s += &format!(
        "\n[baton:vars]\nansible_connection=local\n\
         ansible_python_interpreter={{{{ ansible_playbook_python }}}}\n\
         baton_bin={}\nbaton_http_check_contains='label={{version}}'\n",
        baton.display()
    );
    Ok(s)
}
