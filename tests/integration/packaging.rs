//! Packaging checks: the systemd unit verifies and is hardened, and the
//! Yocto recipe's crate list matches Cargo.lock.

use std::process::Command;

use crate::util::repo_root;

#[test]
fn yocto_crates_inc_matches_cargo_lock() {
    let out = Command::new(repo_root().join("scripts/gen-crates-inc.sh"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = std::fs::read_to_string(repo_root().join("systemd/slmd.service"))
        .unwrap()
        .replace("/usr/bin/slmd", env!("CARGO_BIN_EXE_slmd"));
    let path = dir.path().join("slmd.service");
    std::fs::write(&path, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for slmd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");
}

/// The layer parses and lints clean under oelint-adv (bitbake's syntax and
/// the OpenEmbedded style rules) for the oldest and newest releases
/// layer.conf names. Not linted: HOMEPAGE reachability (no network in CI)
/// and BBCLASSEXTEND (a daemon has no native or SDK variant).
#[test]
fn yocto_recipe_lints_clean() {
    let layer = repo_root().join("yocto/meta-slmd");
    let oelint = repo_root().join(".cache/tools/oelint/bin/oelint-adv");
    for release in ["scarthgap", "wrynose"] {
        let out = Command::new(&oelint)
            .current_dir(&layer)
            .args(["--quiet", "--release", release])
            .args(["--suppress", "oelint.vars.homepageping"])
            .args(["--suppress", "oelint.var.bbclassextend"])
            .args(["--suppress", "oelint.file.inlinesuppress_na"])
            .args(["recipes-support/slmd/slmd_0.1.0.bb", "conf/layer.conf"])
            .output()
            .expect("oelint-adv (scripts/test.sh installs it in .cache/tools)");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{release}: {said}"
        );
    }
}
