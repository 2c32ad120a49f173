//! The Python virtualenv `scripts/install-test-deps` makes for tests that drive real
//! Python tools (the Prometheus parser, ansible-core).

use std::path::PathBuf;

use crate::systemd::repo_root;

/// `$BATON_TEST_VENV`, else `target/test-venv`.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("BATON_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-venv"))
}

/// `bin/<name>` of the venv, or why there is none.
pub fn venv_tool(name: &str) -> Result<PathBuf, String> {
    let tool = venv_dir().join("bin").join(name);
    if tool.is_file() {
        Ok(tool)
    } else {
        Err(format!(
            "{} is missing (run scripts/install-test-deps)",
            tool.display()
        ))
    }
}
