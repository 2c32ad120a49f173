use super::values::MAX_DURATION;
use super::*;
use clap::Parser;

#[test]
fn nice_defaults_to_minus_ten_and_takes_off_or_a_value() {
    assert_eq!(parse(&["--", "true"]).unwrap().nice, Some(DEFAULT_NICE));
    assert_eq!(parse(&["--nice", "off", "--", "true"]).unwrap().nice, None);
    assert_eq!(
        parse(&["--nice", "-20", "--", "true"]).unwrap().nice,
        Some(-20)
    );
    assert_eq!(
        parse(&["--nice", "19", "--", "true"]).unwrap().nice,
        Some(19)
    );
    for bad in ["-21", "20", "x", "2147483648"] {
        let e = parse(&["--nice", bad, "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--nice") && e.contains("-20 to 19"), "{e}");
    }
    let dir = std::env::temp_dir().join(format!("baton-nice-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (value, want) in [("\"off\"", None), ("3", Some(3))] {
        let p = dir.join("b.toml");
        std::fs::write(&p, format!("nice = {value}\ncommand = [\"true\"]\n")).unwrap();
        let c = parse(&["--config", p.to_str().unwrap()]).unwrap();
        assert_eq!(c.nice, want, "{value}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn huge_durations_are_refused_for_every_flag() {
    for flag in [
        "--ready-timeout",
        "--drain-timeout",
        "--snapshot-timeout",
        "--restore-timeout",
    ] {
        let e = parse(&[flag, "300000000000y", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag) && e.contains("365 days"), "{e}");
    }
    let e = parse(&["--ready", "delay=300000000000y", "--", "true"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--ready"), "{e}");
    assert!(parse(&["--drain-timeout", "365days", "--", "true"]).is_ok());
}

fn parse(args: &[&str]) -> Result<RunConfig, ConfigError> {
    let mut v = vec!["baton", "run"];
    v.extend_from_slice(args);
    match crate::cli::args::Cli::try_parse_from(v).unwrap().command {
        crate::cli::args::Command::Run(a) => RunConfig::from_args(*a),
        _ => unreachable!(),
    }
}

#[test]
fn defaults_and_flags() {
    let c = parse(&["--listen", "http=127.0.0.1:0", "--", "true"]).unwrap();
    assert_eq!(c.ready_timeout, Duration::from_secs(30));
    assert_eq!(c.stop_signal, Signal::SIGTERM);
    assert_eq!(c.ready, ReadyMode::Notify);
    let c = parse(&["--ready", "delay=2s", "--stop-signal", "quit", "--", "true"]).unwrap();
    assert_eq!(c.ready, ReadyMode::Delay(Duration::from_secs(2)));
    assert_eq!(c.stop_signal, Signal::SIGQUIT);
}

#[test]
fn errors_name_the_flag_or_key() {
    let e = parse(&["--ready-timeout", "soon", "--", "true"])
        .unwrap_err()
        .0;
    assert!(e.contains("--ready-timeout") && e.contains("soon"), "{e}");
    let e = parse(&["--stop-signal", "KILL", "--", "true"])
        .unwrap_err()
        .0;
    assert!(e.contains("--stop-signal"), "{e}");
    let e = parse(&["--", "/nonexistent/app"]).unwrap_err().0;
    assert!(e.contains("/nonexistent/app"), "{e}");
    let e = parse(&[]).unwrap_err().0;
    assert!(e.contains("PROGRAM"), "{e}");
}

#[test]
fn release_settings() {
    let c = parse(&["--", "true"]).unwrap();
    assert_eq!(
        c.release.probation,
        Probation::For(Duration::from_secs(10)),
        "no store: a short probation"
    );
    let c = parse(&["--probation", "0", "--", "true"]).unwrap();
    assert_eq!(c.release.probation, Probation::Off);
    let c = parse(&["--releases", "/srv/r", "--", "bin/app"]).unwrap();
    assert_eq!(c.release.probation, Probation::For(Duration::from_secs(30)));
    assert_eq!(c.release.health_failures, 3);
    for (v, want) in [
        ("manual", Probation::Manual),
        ("0", Probation::Off),
        ("0s", Probation::Off),
        ("45s", Probation::For(Duration::from_secs(45))),
    ] {
        let c = parse(&["--probation", v, "--", "true"]).unwrap();
        assert_eq!(c.release.probation, want, "{v}");
    }
    for (args, want) in [
        (&["--probation", "soon"][..], "--probation"),
        (&["--health", "tcp://x:1"][..], "--health"),
        (&["--health-failures", "0"][..], "--health-failures"),
        (&["--keep=-1"][..], "--keep"),
        (
            &["--releases", "/srv/r", "--", "/abs/app"][..],
            "inside each release",
        ),
    ] {
        let mut all = args.to_vec();
        if !all.contains(&"--") {
            all.extend(["--", "true"]);
        }
        let e = parse(&all).unwrap_err().0;
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

#[test]
fn config_file_under_flags() {
    let dir = std::env::temp_dir().join(format!("baton-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("b.toml");
    std::fs::write(
        &p,
        "listen = [\"http=127.0.0.1:0\"]\nready_timeout = \"5s\"\ndrain_timeout = \"7s\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let c = parse(&["--config", p.to_str().unwrap(), "--drain-timeout", "1s"]).unwrap();
    assert_eq!(c.ready_timeout, Duration::from_secs(5));
    assert_eq!(c.drain_timeout, Duration::from_secs(1));
    assert_eq!(c.listen.len(), 1);
    std::fs::write(&p, "ready_timeout = \"x\"\ncommand = [\"true\"]\n").unwrap();
    let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
    assert!(e.contains("config key 'ready_timeout'"), "{e}");
    std::fs::write(&p, "\nbogus = 1\n").unwrap();
    let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
    assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const KEYS: [&str; 22] = [
        "listen",
        "unix_mode",
        "backlog",
        "ready",
        "ready_timeout",
        "drain_timeout",
        "stop_signal",
        "state",
        "snapshot_timeout",
        "restore_timeout",
        "control",
        "control_group",
        "nice",
        "releases",
        "probation",
        "health",
        "health_interval",
        "health_failures",
        "preflight",
        "preflight_timeout",
        "keep",
        "command",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "\"[ -~&&[^\"\\\\]]{0,20}\"",
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            "\\[(\"[a-z0-9=:.]{0,12}\", ?){0,3}\\]",
            "(?s).{0,20}",
        ]
    }

    proptest! {
        /// Any duration text is accepted within the cap or refused with a message
        /// naming it; never a panic.
        #[test]
        fn durations_are_capped_or_refused(text in "(?s).{0,30}") {
            match duration("--drain-timeout", &text) {
                Ok(d) => prop_assert!(d <= MAX_DURATION),
                Err(e) => prop_assert!(e.to_string().contains("--drain-timeout"), "{}", e),
            }
        }

        /// Whole seconds up to the cap round-trip through humantime's format.
        #[test]
        fn formatted_durations_parse_back(secs in 0u64..=MAX_DURATION.as_secs()) {
            let d = Duration::from_secs(secs);
            let text = humantime::format_duration(d).to_string();
            prop_assert_eq!(duration("x", &text).unwrap(), d);
        }

        /// Any config file, well-formed or not, gives a config or one error line.
        #[test]
        fn any_config_file_gives_a_config_or_one_error_line(
            lines in prop::collection::vec((prop::sample::select(&KEYS[..]), value()), 0..8),
            junk in "(?s).{0,40}",
            with_junk in any::<bool>(),
        ) {
            let mut text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            if with_junk {
                text.push_str(&junk);
            }
            let dir = std::env::temp_dir().join(format!("baton-config-prop-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("baton.toml");
            std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
            let path = path.to_str().unwrap().to_owned();
            if let Err(e) = parse(&["--config", &path, "--", "true"]) {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }
    }
}

/// A setting is written in three places: its flag (clap, whose help gives the default),
/// its TOML key (`file::File`) and its row in the README's table. They must agree: the
/// same names everywhere, and the README's default the flag's.
#[test]
fn every_setting_is_a_flag_a_config_key_and_a_readme_row_with_the_same_default() {
    use clap::CommandFactory;
    use std::collections::{BTreeMap, BTreeSet};

    let cli = crate::cli::args::Cli::command();
    let run = cli.find_subcommand("run").expect("a run subcommand");
    let mut flags: BTreeMap<String, Option<String>> = BTreeMap::new();
    for a in run.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if ["config", "help", "version"].contains(&long) {
            continue;
        }
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        let default = help
            .split("[default: ")
            .nth(1)
            .and_then(|r| r.rsplit_once(']'))
            .map(|(d, _)| d.to_owned());
        flags.insert(long.to_owned(), default);
    }

    // The file's `deny_unknown_fields` error lists every key it takes.
    let err = toml::from_str::<super::file::File>("no_such_key = 1")
        .expect_err("an unknown key")
        .to_string();
    let keys: BTreeSet<String> = err
        .split("expected one of")
        .nth(1)
        .expect("the keys it takes")
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| k.replace('_', "-"))
        .collect();
    let mut want_keys: BTreeSet<String> = flags.keys().cloned().collect();
    want_keys.insert("command".into()); // PROGRAM and its arguments, after `--` on the command line
    assert_eq!(keys, want_keys, "TOML keys and flags differ");

    let readme = include_str!("../../../README.md");
    let table = readme
        .split("`baton run` options (all also accepted")
        .nth(1)
        .expect("the README's options table");
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
    {
        let Some(rest) = line.strip_prefix("| `--") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '-')
            .collect();
        // Cells split at `|`, but not at `\|` (an escaped bar inside a cell).
        let cells: Vec<String> = line
            .replace("\\|", "\u{1}")
            .split('|')
            .map(|c| c.replace('\u{1}', "|"))
            .collect();
        rows.insert(name, cells[2].trim().replace('`', ""));
    }
    let flag_names: BTreeSet<String> = flags.keys().cloned().collect();
    let row_names: BTreeSet<String> = rows.keys().cloned().collect();
    assert_eq!(row_names, flag_names, "README table rows and flags differ");

    for (name, default) in &flags {
        let (Some(d), cell) = (default, &rows[name]) else {
            continue;
        };
        // The README may shorten a long default to its start; the control socket's
        // lookup order is spelled out above the table.
        assert!(
            d == cell || (d.starts_with(cell.as_str()) && !cell.is_empty()) || name == "control",
            "--{name}: the flag says the default is {d:?}, the README {cell:?}"
        );
    }
}
