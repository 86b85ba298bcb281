//! The set-up's NVIDIA driver check (scripts/check-driver.sh, run by scripts/setup-venv.sh)
//! with a stub `nvidia-smi` first on PATH: a warning naming the driver and the version torch
//! 2.11.0's CUDA 13 build needs for driver 550, none for 580, and none without nvidia-smi.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs check-driver.sh with a stub nvidia-smi that prints `stub_output` (no stub when
/// `None`); returns (exit code, stderr).
fn check_driver(tag: &str, stub_output: Option<&str>) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("moe-driver-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(out) = stub_output {
        let stub = dir.join("nvidia-smi");
        // Answers only the query the script makes, like the real tool.
        let script = format!(
            "#!/bin/sh\ncase \"$*\" in\n  *--query-gpu=driver_version*) printf '%s' '{out}' ;;\n  *) exit 9 ;;\nesac\n"
        );
        std::fs::write(&stub, script).unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The stub's directory only, plus the basic tools: a real nvidia-smi elsewhere on this
    // machine's PATH must not be found.
    let path = format!("{}:/usr/bin:/bin", dir.display());
    let real = ["/usr/bin/nvidia-smi", "/bin/nvidia-smi"];
    if stub_output.is_none() && real.iter().any(|p| Path::new(p).exists()) {
        let _ = std::fs::remove_dir_all(&dir);
        return (0, String::from("skipped: a real nvidia-smi is in /usr/bin"));
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/check-driver.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn driver_550_warns_naming_both_versions() {
    let (code, stderr) = check_driver("550", Some("550.54.15\n550.54.15\n"));
    assert_eq!(code, 0, "a warning, not a failure");
    assert!(
        stderr.starts_with("setup: warning: NVIDIA driver 550.54.15 is older than 580"),
        "{stderr}"
    );
    assert!(stderr.contains("CUDA 13"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn driver_580_is_silent() {
    assert_eq!(
        check_driver("580", Some("580.159.04\n")),
        (0, String::new())
    );
    assert_eq!(check_driver("590", Some("590.12\n")), (0, String::new()));
}

#[test]
fn unreadable_versions_warn() {
    let (code, stderr) = check_driver("empty", Some(""));
    assert_eq!(code, 0);
    assert!(stderr.contains("reports no driver version"), "{stderr}");
    let (_, stderr) = check_driver("junk", Some("N/A\n"));
    assert!(
        stderr.contains("cannot read the NVIDIA driver version") && stderr.contains("N/A"),
        "{stderr}"
    );
}

#[test]
fn no_nvidia_smi_is_silent() {
    let (code, stderr) = check_driver("none", None);
    assert_eq!(code, 0);
    assert!(
        stderr.is_empty() || stderr.starts_with("skipped"),
        "{stderr}"
    );
}

#[test]
fn setup_venv_runs_the_check() {
    let setup = std::fs::read_to_string(repo().join("scripts/setup-venv.sh")).unwrap();
    assert!(
        setup.lines().any(|l| l.trim() == "scripts/check-driver.sh"),
        "scripts/setup-venv.sh must call scripts/check-driver.sh"
    );
}
