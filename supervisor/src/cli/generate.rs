//! `baton generate`: man pages (clap_mangen) and shell completions (clap_complete)
//! from the same clap definitions the binary parses, so they never drift.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::args::Cli;

/// Writes `baton.1`, one page per subcommand (`baton-run.1`, `baton-release.1`,
/// ...) and `baton-config.5` into `dir`.
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
    let path = dir.join("baton-config.5");
    std::fs::write(&path, config_page()).with_context(|| format!("writing {}", path.display()))
}

/// `baton-config(5)`: the `--config` file's keys, from the same setting definitions
/// as the flags.
fn config_page() -> String {
    use crate::config::settings::{ALL, COMMAND_KEY, Kind};
    use clap_mangen::roff::{Roff, bold, italic, roman};
    let mut r = Roff::new();
    r.control("TH", ["BATON-CONFIG", "5"]);
    r.control("SH", ["NAME"]);
    r.text([roman("baton-config - the TOML file of baton run --config")]);
    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "Every setting of baton run is a flag and a key of this file: the key is the \
         flag's name with _ for -. A flag given on the command line wins over the key.",
    )]);
    r.control("SH", ["KEYS"]);
    for s in ALL {
        let value = match s.kind {
            Kind::Switch => "true|false".to_owned(),
            Kind::List => format!("[\"{}\", ...]", s.value),
            Kind::Number | Kind::Mode => s.value.to_owned(),
            Kind::Text | Kind::Path => format!("\"{}\"", s.value),
        };
        r.control("TP", []);
        r.text([bold(s.key()), roman(" = "), italic(value)]);
        let mut help = s.help.replace('`', "");
        if let Some(d) = s.default_text() {
            help.push_str(&format!(" (default: {d})"));
        }
        r.text([roman(format!("{help}. Flag: --{}.", s.name))]);
    }
    r.control("TP", []);
    r.text([
        bold(COMMAND_KEY),
        roman(" = "),
        italic("[\"PROGRAM\", \"ARG\", ...]"),
    ]);
    r.text([roman(
        "the program to run and its arguments, when none follows -- on the command line.",
    )]);
    r.control("SH", ["SEE ALSO"]);
    r.text([roman("baton-run(1), baton(1)")]);
    r.render()
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
