//! Event files written by `TbWriter` are read back by TensorBoard's own reader
//! (`tests/python/read_tensorboard.py`, which also checks every record's CRCs strictly).

use moe_trainer::tensorboard::TbWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-tb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs the reader script; returns (success, combined output).
fn read_back(dir: &Path, args: &[String]) -> (bool, String) {
    let python = workspace().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: this test reads event files with TensorBoard's own Python reader; \
         create the venv first (`make test` does)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(workspace().join("tests/python/read_tensorboard.py"))
        .arg(dir)
        .args(args)
        .output()
        .expect("running read_tensorboard.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn expect(tag: &str, step: i64, v: f32) -> [String; 2] {
    ["--expect".into(), format!("{tag}={step}:{v}")]
}

/// Scalars, a multi-value event of per-expert loads, a large step and awkward values read
/// back exactly (the writer stores float32; the script compares at float32).
#[test]
fn tensorboard_reads_our_scalars() {
    let dir = scratch("ok");
    let mut w = TbWriter::new(&dir).unwrap();
    let mut args = Vec::new();
    for step in 1..=5i64 {
        let loss = 5.5 / step as f32;
        w.scalar("train/loss", step, loss).unwrap();
        args.extend(expect("train/loss", step, loss));
    }
    let loads: Vec<(String, f32)> = (0..8)
        .map(|e| {
            (
                format!("moe/layer03/expert_load/e{e:02}"),
                0.125 + e as f32 * 0.01,
            )
        })
        .collect();
    let refs: Vec<(&str, f32)> = loads.iter().map(|(t, v)| (t.as_str(), *v)).collect();
    w.scalars(5, &refs).unwrap();
    for (t, v) in &loads {
        args.extend(expect(t, 5, *v));
        args.extend(["--expect-count".into(), format!("{t}=1")]);
    }
    let big = 1i64 << 40;
    w.scalar("train/lr", big, 3e-4).unwrap();
    w.scalar("val/loss", 7, -1.5e-7).unwrap();
    args.extend(expect("train/lr", big, 3e-4));
    args.extend(expect("val/loss", 7, -1.5e-7));
    args.extend(["--expect-count".into(), "train/loss=5".into()]);
    w.flush().unwrap();

    let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let (ok, out) = read_back(&dir, &args);
    assert!(ok, "TensorBoard did not read back what was written:\n{out}");
    assert!(out.contains("OK: 11 tags"), "{out}");
}

/// The script itself can fail: a wrong value, a missing tag, and a corrupted byte (caught by
/// the CRC check) are all reported.
#[test]
fn reader_detects_mismatch_and_corruption() {
    let dir = scratch("bad");
    let mut w = TbWriter::new(&dir).unwrap();
    w.scalar("a", 1, 2.0).unwrap();
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);

    let (ok, out) = read_back(&dir, &expect("a", 1, 2.5));
    assert!(!ok && out.contains("expected 2.5"), "{out}");
    let (ok, out) = read_back(&dir, &expect("b", 1, 2.0));
    assert!(!ok && out.contains("no such scalar tag"), "{out}");
    let (ok, out) = read_back(&dir, &expect("a", 1, 2.0));
    assert!(ok, "{out}");

    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 6; // inside the value of the last record's data
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (ok, out) = read_back(&dir, &expect("a", 1, 2.0));
    assert!(!ok && out.contains("crc32 check"), "{out}");
}

/// Two writers in the same directory within one second get distinct files.
#[test]
fn second_writer_never_overwrites() {
    let dir = scratch("two");
    let a = TbWriter::new(&dir).unwrap();
    let b = TbWriter::new(&dir).unwrap();
    assert_ne!(a.path(), b.path());
    assert!(a.path().exists() && b.path().exists());
}
