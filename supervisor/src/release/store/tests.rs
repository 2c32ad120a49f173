use std::os::unix::fs::PermissionsExt;

use super::*;

fn exe(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn add_file_and_tree_then_lifecycle() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("rel"), true).unwrap();
    let src = exe(t.path(), "app", "#!/bin/sh\necho v1\n");
    let r = store.add("v1", &src, false, Some("bin/app")).unwrap();
    assert_eq!(r.status, ReleaseStatus::Unpacked);
    assert_eq!(r.sha256, sha256(File::open(&src).unwrap()).unwrap());
    assert!(store.release_dir("v1").join("bin/app").is_file());
    // A tree.
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    exe(&tree.join("bin"), "app", "#!/bin/sh\necho v2\n");
    fs::write(tree.join("config.toml"), "x = 1").unwrap();
    store.add("v2", &tree, false, None).unwrap();
    assert!(store.release_dir("v2").join("config.toml").is_file());
    let e = store.add("v2", &tree, false, None).unwrap_err().0;
    assert!(e.contains("already"), "{e}");
    let mut m = store.read().unwrap();
    m.set_permanent("v1").unwrap();
    m.set_current("v2").unwrap();
    assert_eq!(m.boot_choice().unwrap().0, "v1");
    m.set_permanent("v2").unwrap();
    assert_eq!(m.get("v1").unwrap().status, ReleaseStatus::Old);
    assert_eq!(m.previous_permanent.as_deref(), Some("v1"));
}

#[test]
fn refuses_bad_input_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path(), false).unwrap();
    let src = exe(t.path(), "app", "x");
    let e = store.add("v1", &src, false, None).unwrap_err().0;
    assert!(e.contains("--program"), "{e}");
    let e = store.add("../x", &src, false, Some("app")).unwrap_err().0;
    assert!(e.contains("invalid version"), "{e}");
    let e = store
        .add("v1", &t.path().join("nope"), false, Some("app"))
        .unwrap_err()
        .0;
    assert!(e.contains("nope"), "{e}");
    let e = store.add("v1", &src, false, Some("/abs")).unwrap_err().0;
    assert!(e.contains("inside"), "{e}");
    let dir = t.path().join("empty");
    fs::create_dir(&dir).unwrap();
    let e = store.add("v1", &dir, false, Some("app")).unwrap_err().0;
    assert!(e.contains("no executable PROGRAM"), "{e}");
    assert!(!store.release_dir("v1").exists());
    std::fs::set_permissions(t.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let e = Store::open(t.path(), false).unwrap_err().0;
    assert!(e.contains("lets other users replace"), "{e}");
    std::fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(store.meta_path(), "{not json").unwrap();
    let e = store.read().unwrap_err().0;
    assert!(e.contains("releases.json") && !e.contains('\n'), "{e}");
}

#[test]
fn remove_refuses_permanent_and_in_use_and_prune_keeps_n() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path(), false).unwrap();
    let src = exe(t.path(), "app", "x");
    for v in ["v1", "v2", "v3", "v4"] {
        store.add(v, &src, false, Some("app")).unwrap();
    }
    store
        .update(|m| {
            m.set_permanent("v1")?;
            m.set_permanent("v2")?;
            m.set_permanent("v3")?;
            m.set_permanent("v4")
        })
        .unwrap();
    let e = store.remove("v4", &[]).unwrap_err().0;
    assert!(e.contains("permanent"), "{e}");
    let e = store.remove("v3", &["v3".into()]).unwrap_err().0;
    assert!(e.contains("in use"), "{e}");
    assert_eq!(store.prune(1, &[]).unwrap(), vec!["v1", "v2"]);
    assert!(!store.release_dir("v1").exists());
    store.remove("v3", &[]).unwrap();
    assert_eq!(store.read().unwrap().releases.len(), 1);
}
