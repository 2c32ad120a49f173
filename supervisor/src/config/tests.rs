use super::values::MAX_DURATION;
use super::*;
use clap::Parser;

#[test]
fn nice_defaults_to_minus_ten_and_takes_off_or_a_value() {
    // Ahead of an app at the default 0.
    assert_eq!(parse(&["--", "true"]).unwrap().nice, Some(-10));
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

    fn keys() -> Vec<String> {
        let mut k: Vec<String> = settings::ALL.iter().map(|s| s.key()).collect();
        k.push(settings::COMMAND_KEY.into());
        k
    }

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
            lines in prop::collection::vec((prop::sample::select(keys()), value()), 0..8),
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
            let got = parse(&["--config", &path, "--", "true"]);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(e) = got {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }
    }
}

/// A value of each setting unlike its default, as a flag's text.
fn sample(s: &settings::Setting) -> &'static str {
    match s.name {
        "listen" => "http=127.0.0.1:0",
        "unix-mode" => "600",
        "backlog" => "64",
        "ready" => "delay=2s",
        "stop-signal" => "QUIT",
        "precopy" => "off",
        "precopy-rounds" | "health-failures" | "keep" => "5",
        "nice" => "3",
        "control" => "/tmp/baton-sample.sock",
        "control-group" => "0",
        "releases" => "/srv/r",
        "probation" => "45s",
        "health" => "exec:true",
        "preflight" => "true",
        "metrics" => "127.0.0.1:0",
        "state-dir" => "/tmp/baton-sample-state",
        "state" => "",
        _ => "7s", // the durations
    }
}

/// The same value as a TOML line.
fn toml_line(s: &settings::Setting) -> String {
    use settings::Kind;
    let v = sample(s);
    let value = match s.kind {
        Kind::Switch => "true".to_owned(),
        Kind::List => format!("[\"{v}\"]"),
        Kind::Mode => format!("0o{v}"),
        Kind::Number if v.parse::<i64>().is_ok() => v.to_owned(),
        _ => format!("{v:?}"),
    };
    format!("{} = {value}\n", s.key())
}

/// Each setting is defined once (`settings.rs`) and reaches the flag, the config key
/// and the merge from there: the same value given as the flag or as the key gives the
/// same config, unlike the default one (so neither is ignored).
#[test]
fn every_setting_is_a_flag_and_a_config_key_with_the_same_effect() {
    let dir = std::env::temp_dir().join(format!("baton-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = |c: RunConfig| serde_json::to_value(c).unwrap();
    let default = json(parse(&["--", "true"]).unwrap());
    for s in settings::ALL {
        let flag = s.flag();
        let by_flag = if s.kind == settings::Kind::Switch {
            parse(&[&flag, "--", "true"])
        } else {
            parse(&[&flag, sample(s), "--", "true"])
        }
        .unwrap_or_else(|e| panic!("{flag}: {e}"));
        let p = dir.join(format!("{}.toml", s.key()));
        std::fs::write(&p, format!("{}command = [\"true\"]\n", toml_line(s))).unwrap();
        let by_key = parse(&["--config", p.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("key {}: {e}", s.key()));
        let (by_flag, by_key) = (json(by_flag), json(by_key));
        assert_eq!(by_flag, by_key, "{flag} and its key differ");
        assert_ne!(by_flag, default, "{flag} changed nothing");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A default given as a value is the real one: the merge parses that very text.
#[test]
fn documented_defaults_are_the_defaults() {
    let c = parse(&["--", "true"]).unwrap();
    assert_eq!(c.ready_timeout, Duration::from_secs(30));
    assert_eq!(c.unix_mode, 0o660);
    assert_eq!(c.nice, Some(-10));
    assert_eq!(c.release.health_failures, 3);
    assert_eq!(c.precopy.rounds, 8);
    for s in settings::ALL {
        if let settings::DefaultValue::Value(v) = s.default {
            let flag = s.flag();
            assert_eq!(
                serde_json::to_value(parse(&[&flag, v, "--", "true"]).unwrap()).unwrap(),
                serde_json::to_value(&c).unwrap(),
                "{flag} {v} is not its default"
            );
        }
    }
}

/// The README's table is the one `baton generate settings` prints.
#[test]
fn the_readme_table_is_generated_from_the_definitions() {
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains(&settings::markdown()),
        "the README's settings table differs from the definitions: paste in the output of `baton generate settings`"
    );
}

/// An unknown key names itself, its line and the keys there are.
#[test]
fn an_unknown_key_lists_the_keys() {
    let dir = std::env::temp_dir().join(format!("baton-unknown-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("b.toml");
    std::fs::write(&p, "command = [\"true\"]\nready_timout = \"5s\"\n").unwrap();
    let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
    assert!(
        e.contains("line 2") && e.contains("ready_timout") && e.contains("ready_timeout"),
        "{e}"
    );
    std::fs::write(&p, "command = [\"true\"]\nstate = \"yes\"\n").unwrap();
    let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
    assert!(e.contains("'state'") && e.contains("true or false"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
