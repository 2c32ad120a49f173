//! `baton generate`: man pages (clap_mangen) and shell completions (clap_complete)
//! from the same clap definitions the binary parses, so they never drift.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::args::Cli;

/// Writes `baton.1` and one page per subcommand (`baton-run.1`, `baton-release.1`,
/// ...) into `dir`.
pub fn man(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    write_page(dir, &cmd, "baton")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("baton-{}", sub.get_name());
        let sub = sub.clone().name(name.clone());
        write_page(dir, &sub, &name)?;
        for subsub in sub.get_subcommands() {
            let n = format!("{name}-{}", subsub.get_name());
            write_page(dir, &subsub.clone().name(n.clone()), &n)?;
        }
    }
    Ok(())
}

fn write_page(dir: &Path, cmd: &clap::Command, name: &str) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .with_context(|| format!("rendering {name}.1"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
}

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "baton", &mut std::io::stdout());
}
