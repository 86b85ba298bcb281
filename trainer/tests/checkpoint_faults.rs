//! Checkpoint failure handling: torn, truncated and corrupted files are detected and
//! skipped with a warning, unfinished `.tmp` writes are ignored and cleaned up, only the
//! last `keep` checkpoints stay, writes run in the background, and write errors surface
//! from `wait()` without harming earlier checkpoints.

mod checkpoint_util;

use checkpoint_util::*;
use moe_trainer::checkpoint::{find_latest_intact, list_checkpoints, load_for_rank, Checkpointer};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Two complete checkpoints (steps 1 and 2) at EP=2 in a fresh directory.
fn two_checkpoints(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    tch::set_num_threads(1);
    let dir = tmpdir(tag);
    save_all_ranks(&dir, FX, 2, 2, 1, 5);
    save_all_ranks(&dir, FX, 2, 2, 2, 5);
    (
        dir.clone(),
        dir.join("step-00000001"),
        dir.join("step-00000002"),
    )
}

/// `find_latest_intact` must fall back to step 1 and say why step 2 was skipped.
fn assert_falls_back(dir: &Path, older: &Path, newer: &Path, why: &str) {
    let (path, warnings) = find_latest_intact(dir).unwrap().unwrap();
    assert_eq!(path, older);
    let newer = newer.display().to_string();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&newer) && w.contains(why)),
        "no warning about {newer} ({why}): {warnings:?}"
    );
    // Loading the damaged one directly fails too; the intact one loads.
    assert!(load_for_rank(Path::new(&newer), &slots(FX, 0, 1)).is_err());
    assert_loaded_matches(&load_for_rank(older, &slots(FX, 0, 1)).unwrap(), FX, 0, 1);
}

#[test]
fn truncated_file_is_skipped() {
    let (dir, old, new) = two_checkpoints("trunc");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(new.join("experts-r1.safetensors"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    assert_falls_back(&dir, &old, &new, "truncated");
}

#[test]
fn flipped_byte_is_skipped() {
    let (dir, old, new) = two_checkpoints("flip");
    let path = new.join("dense.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&bytes).unwrap();
    drop(f);
    assert_falls_back(&dir, &old, &new, "corrupted");
}

#[test]
fn missing_manifest_is_skipped() {
    let (dir, old, new) = two_checkpoints("nomanifest");
    fs::remove_file(new.join("manifest.json")).unwrap();
    assert_falls_back(&dir, &old, &new, "manifest.json");
}

#[test]
fn leftover_tmp_dir_is_ignored_then_removed() {
    let (dir, _, new) = two_checkpoints("tmpdir");
    // A write of step 3 killed before its manifest: every data file, no manifest.
    let tmp = dir.join("step-00000003.tmp");
    fs::create_dir(&tmp).unwrap();
    for f in [
        "dense.safetensors",
        "experts-r0.safetensors",
        "experts-r1.safetensors",
    ] {
        fs::copy(new.join(f), tmp.join(f)).unwrap();
    }
    let (path, warnings) = find_latest_intact(&dir).unwrap().unwrap();
    assert_eq!(path, new);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("step-00000003.tmp"), "{warnings:?}");
    // Rank 0's checkpointer clears it at start, before any rank can save.
    let _c = Checkpointer::new(&dir, 5, 0, 0, 2, 2).unwrap();
    assert!(!tmp.exists());
    assert_eq!(list_checkpoints(&dir).unwrap().len(), 2);
}

#[test]
fn all_damaged_is_an_error_and_empty_is_none() {
    let (dir, old, new) = two_checkpoints("alldamaged");
    fs::remove_file(old.join("manifest.json")).unwrap();
    fs::remove_file(new.join("dense.safetensors")).unwrap();
    let err = find_latest_intact(&dir).unwrap_err().to_string();
    assert!(err.contains("no intact checkpoint"), "{err}");
    assert!(
        err.contains("step-00000001") && err.contains("step-00000002"),
        "{err}"
    );
    assert!(find_latest_intact(&tmpdir("empty")).unwrap().is_none());
    assert!(find_latest_intact(&dir.join("does-not-exist"))
        .unwrap()
        .is_none());
}

#[test]
fn keeps_the_last_n() {
    tch::set_num_threads(1);
    let dir = tmpdir("keep");
    let mut ckpt = Checkpointer::new(&dir, 2, 0, 0, 1, 1).unwrap();
    for step in 1..=5 {
        ckpt.save(snapshot(FX, 0, 1, step)).unwrap();
        ckpt.wait().unwrap();
        let steps: Vec<u64> = list_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let want: Vec<u64> = (step.saturating_sub(1).max(1)..=step).collect();
        assert_eq!(steps, want, "after step {step}");
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "only the two checkpoints remain: {names:?}");
}

#[test]
fn save_returns_before_the_write_and_wait_finishes_it() {
    tch::set_num_threads(1);
    let dir = tmpdir("background");
    // The hook blocks the writer thread until the test releases it.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<u64>();
    let release_rx = Mutex::new(release_rx);
    let hook = Arc::new(move |step: u64| {
        started_tx.send(step).unwrap();
        release_rx.lock().unwrap().recv().unwrap();
    });
    let mut ckpt = Checkpointer::new(&dir, 2, 0, 0, 1, 1)
        .unwrap()
        .with_write_hook(hook);
    let at = ckpt.save(snapshot(FX, 0, 1, 3)).unwrap();
    assert_eq!(started_rx.recv().unwrap(), 3);
    // save() returned while the writer is parked before its first byte.
    assert!(ckpt.is_writing());
    assert!(!at.exists());
    assert!(find_latest_intact(&dir).unwrap().is_none());
    release_tx.send(()).unwrap();
    ckpt.wait().unwrap();
    assert!(!ckpt.is_writing());
    assert_eq!(find_latest_intact(&dir).unwrap().unwrap().0, at);
}

#[test]
fn write_error_surfaces_from_wait_and_keeps_earlier_checkpoints() {
    tch::set_num_threads(1);
    let dir = tmpdir("werr");
    let mut ckpt = Checkpointer::new(&dir, 1, 0, 0, 1, 1).unwrap();
    let first = ckpt.save(snapshot(FX, 0, 1, 1)).unwrap();
    ckpt.wait().unwrap();
    // A plain file where step 2's temp directory must go makes that write fail (a permission
    // trick would not: tests may run as root).
    let blocker = dir.join("step-00000002.tmp");
    fs::write(&blocker, b"in the way").unwrap();
    ckpt.save(snapshot(FX, 0, 1, 2)).unwrap();
    let err = ckpt.wait().unwrap_err().to_string();
    assert!(err.contains("step-00000002.tmp"), "{err}");
    let (path, _) = find_latest_intact(&dir).unwrap().unwrap();
    assert_eq!(path, first);
    assert_loaded_matches(&load_for_rank(&first, &slots(FX, 0, 1)).unwrap(), FX, 0, 1);

    // An error nobody waited for is returned by the next save, which then does not start.
    ckpt.save(snapshot(FX, 0, 1, 2)).unwrap();
    while ckpt.is_writing() {
        std::thread::yield_now();
    }
    assert!(ckpt.save(snapshot(FX, 0, 1, 3)).is_err());
    assert!(!dir.join("step-00000003.tmp").exists());
    fs::remove_file(&blocker).unwrap();
    ckpt.save(snapshot(FX, 0, 1, 3)).unwrap();
    ckpt.wait().unwrap();
    assert_eq!(
        list_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>(),
        [3]
    );
    // A restarted rank 0 also clears a stray file with a temp-dir name.
    fs::write(&blocker, b"in the way").unwrap();
    drop(ckpt);
    let _ckpt = Checkpointer::new(&dir, 1, 0, 0, 1, 1).unwrap();
    assert!(!blocker.exists());
}

#[test]
fn a_missing_rank_times_out_without_committing() {
    tch::set_num_threads(1);
    let dir = tmpdir("timeout");
    // Only ep rank 0 of two saves: rank 1's file never arrives.
    let mut ckpt = Checkpointer::new(&dir, 2, 0, 0, 2, 2)
        .unwrap()
        .with_part_timeout(Duration::from_millis(200));
    ckpt.save(snapshot(FX, 0, 2, 1)).unwrap();
    let err = ckpt.wait().unwrap_err().to_string();
    assert!(
        err.contains("experts-r1.safetensors") && err.contains("ep rank 1"),
        "{err}"
    );
    assert!(list_checkpoints(&dir).unwrap().is_empty());
    assert!(find_latest_intact(&dir).unwrap().is_none());
}
