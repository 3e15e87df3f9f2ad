//! The Python client's suite (clients/python): `mypy --strict` over the
//! package, then pytest against this build's `dmqd` (the tests start it
//! themselves on free 127.0.0.1 ports with temporary data directories).
//!
//! Needs Python >= 3.10 with pytest, hypothesis and mypy
//! (`python3 -m pip install pytest hypothesis mypy`; `.ci/run` installs
//! them). Without them this test fails and says so: it never skips.

use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("DMQ_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn package_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

fn check_tools() {
    let probe = Command::new(python())
        .args([
            "-c",
            "import sys; assert sys.version_info >= (3, 10), sys.version; \
             import pytest, hypothesis, mypy",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        probe.status.success(),
        "the Python client's tests need Python >= 3.10 with pytest, hypothesis and mypy: \
         `python3 -m pip install pytest hypothesis mypy`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[test]
fn the_python_package_type_checks() {
    check_tools();
    let output = Command::new(python())
        .args(["-m", "mypy", "--strict", "--no-incremental", "src/dmq"])
        .current_dir(package_dir())
        .output()
        .expect("running mypy");
    assert!(
        output.status.success(),
        "mypy --strict found problems:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_python_client_suite_passes_against_dmqd() {
    check_tools();
    let output = Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(package_dir())
        .env("DMQ_DMQD", env!("CARGO_BIN_EXE_dmqd"))
        .output()
        .expect("running pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "pytest failed:\n{report}");
    eprintln!("{}", report.lines().last().unwrap_or_default());
}
