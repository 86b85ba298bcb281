//! Background, atomic checkpoint writes.
//!
//! Every expert writer (world rank < ep_size) writes its file into `step-N.tmp/`, makes it
//! durable, then drops a part marker with the file's size and sha256. World rank 0 writes
//! the dense file, polls for every marker (plain files, so no collective ever runs on the
//! writer thread), writes the manifest last and renames the directory to `step-N/`.

use super::format::{write_safetensors, Entry};
use super::fsutil::{
    dir_names, fsync_dir, parse_step_dir, parse_tmp_dir, remove_dir_safely, step_dir_name,
    tmp_dir_name, write_atomic, DELETING_SUFFIX,
};
use super::manifest::{
    expert_tensor_name, experts_file, part_marker, ExpertEntry, FileEntry, Manifest, PartMarker,
    DENSE_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TOKENIZER_FILE,
};
use super::snapshot::{HostSnapshot, Snapshot};
use crate::error::{Result, TrainError};
use crate::tokenizer::sha256_hex;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Called on the writer thread with the step before any byte is written. Lets tests hold a
/// write in flight deterministically.
pub type WriteHook = Arc<dyn Fn(u64) + Send + Sync>;

/// How long rank 0 waits for the other ranks' expert files by default.
const DEFAULT_PART_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Polling period for part markers: small next to any real write.
const POLL: Duration = Duration::from_millis(20);

/// Writes this rank's share of each checkpoint on a background thread.
///
/// Construct it on every rank before the first training step: world rank 0 removes leftovers
/// of interrupted writes (`step-*.tmp`, `*.deleting`) here, which must not race with another
/// rank's first save. At most one write is in flight; dropping waits for it.
pub struct Checkpointer {
    dir: PathBuf,
    keep: usize,
    world_rank: i64,
    ep_rank: i64,
    ep_size: i64,
    world_size: i64,
    part_timeout: Duration,
    hook: Option<WriteHook>,
    tokenizer: Option<Arc<Vec<u8>>>,
    inflight: Option<JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .field("world_rank", &self.world_rank)
            .field("ep_rank", &self.ep_rank)
            .field("ep_size", &self.ep_size)
            .field("world_size", &self.world_size)
            .field("writing", &self.is_writing())
            .finish()
    }
}

impl Checkpointer {
    /// A checkpointer for one rank. `ep_rank` must be `world_rank % ep_size` (EP groups are
    /// consecutive ranks); `keep` >= 1 complete checkpoints are kept.
    pub fn new(
        dir: impl Into<PathBuf>,
        keep: usize,
        world_rank: i64,
        ep_rank: i64,
        ep_size: i64,
        world_size: i64,
    ) -> Result<Self> {
        let dir = dir.into();
        let bad = |msg: String| {
            Err(TrainError::Checkpoint {
                path: dir.clone(),
                msg,
            })
        };
        if keep == 0 {
            return bad("keep (0) must be >= 1".into());
        }
        if ep_size <= 0 || world_size <= 0 || world_size % ep_size != 0 {
            return bad(format!(
                "world size ({world_size}) must be a positive multiple of ep_size ({ep_size})"
            ));
        }
        if !(0..world_size).contains(&world_rank) || ep_rank != world_rank % ep_size {
            return bad(format!(
                "world rank {world_rank} / ep rank {ep_rank} do not fit world size {world_size}, \
                 ep_size {ep_size}"
            ));
        }
        if world_rank == 0 && dir.is_dir() {
            for name in dir_names(&dir)? {
                if parse_tmp_dir(&name).is_some() || name.ends_with(DELETING_SUFFIX) {
                    let path = dir.join(&name);
                    let removed = if path.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    removed.map_err(|e| TrainError::io(&path, e))?;
                }
            }
        }
        Ok(Self {
            dir,
            keep,
            world_rank,
            ep_rank,
            ep_size,
            world_size,
            part_timeout: DEFAULT_PART_TIMEOUT,
            hook: None,
            tokenizer: None,
            inflight: None,
        })
    }

    /// How long rank 0 waits for the other expert writers' files (default 30 minutes).
    pub fn with_part_timeout(mut self, timeout: Duration) -> Self {
        self.part_timeout = timeout;
        self
    }

    /// Runs `hook(step)` on the writer thread before each write starts.
    pub fn with_write_hook(mut self, hook: WriteHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Stores a copy of the `tokenizer.json` at `path` (read now, so every checkpoint of the
    /// run holds the same bytes) in each checkpoint rank 0 writes; `None` stores none.
    pub fn with_tokenizer(mut self, path: Option<&Path>) -> Result<Self> {
        self.tokenizer = match path {
            Some(p) => Some(Arc::new(fs::read(p).map_err(|e| TrainError::io(p, e))?)),
            None => None,
        };
        Ok(self)
    }

    /// The checkpoint root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a write is still running.
    pub fn is_writing(&self) -> bool {
        self.inflight.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits for the previous write (returning its error, if any, without starting this
    /// one), copies this rank's share of `snapshot` to host memory, and returns while a
    /// background thread writes it. Ranks that write nothing (world rank >= ep_size, except
    /// rank 0) return at once. On world rank 0 the write completes the checkpoint: it waits
    /// for the other ranks' files, commits `step-N/` and deletes old checkpoints.
    /// Returns the directory the checkpoint will have once committed.
    pub fn save(&mut self, snapshot: Snapshot) -> Result<PathBuf> {
        self.wait()?;
        let done = self.dir.join(step_dir_name(snapshot.step));
        let writes_dense = self.world_rank == 0;
        let writes_experts = self.world_rank < self.ep_size;
        if !writes_dense && !writes_experts {
            return Ok(done);
        }
        let host = HostSnapshot::copy(&snapshot, writes_dense, writes_experts)?;
        drop(snapshot);
        let job = Job {
            dir: self.dir.clone(),
            keep: self.keep,
            world_rank: self.world_rank,
            ep_rank: self.ep_rank,
            ep_size: self.ep_size,
            world_size: self.world_size,
            part_timeout: self.part_timeout,
            hook: self.hook.clone(),
            tokenizer: self.tokenizer.clone(),
            host,
        };
        let step = job.host.step;
        let handle = std::thread::Builder::new()
            .name(format!("ckpt-write-{step}"))
            .spawn(move || job.run())
            .map_err(|e| TrainError::io(&self.dir, e))?;
        self.inflight = Some(handle);
        Ok(done)
    }

    /// Blocks until the in-flight write (if any) has finished and returns its result. On
    /// rank 0 success means the checkpoint is committed; on other ranks, that their file is.
    pub fn wait(&mut self) -> Result<()> {
        match self.inflight.take() {
            None => Ok(()),
            Some(handle) => handle.join().map_err(|_| TrainError::Checkpoint {
                path: self.dir.clone(),
                msg: "the checkpoint writer thread panicked".into(),
            })?,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            // Nobody is left to return the error to; losing it silently would hide a
            // missing checkpoint.
            eprintln!("error: checkpoint write failed: {e}");
        }
    }
}

/// One write, moved to the writer thread.
struct Job {
    dir: PathBuf,
    keep: usize,
    world_rank: i64,
    ep_rank: i64,
    ep_size: i64,
    world_size: i64,
    part_timeout: Duration,
    hook: Option<WriteHook>,
    tokenizer: Option<Arc<Vec<u8>>>,
    host: HostSnapshot,
}

fn ckpt_err(path: &Path, msg: String) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

impl Job {
    fn run(self) -> Result<()> {
        if let Some(hook) = &self.hook {
            hook(self.host.step);
        }
        let tmp = self.dir.join(tmp_dir_name(self.host.step));
        fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        if self.world_rank < self.ep_size {
            self.write_experts(&tmp)?;
        }
        if self.world_rank == 0 {
            let dense = self.write_dense(&tmp)?;
            let tokenizer = self.write_tokenizer(&tmp)?;
            let parts = self.collect_parts(&tmp)?;
            self.commit(&tmp, dense, tokenizer, parts)?;
            self.prune()?;
        }
        Ok(())
    }

    fn write_dense(&self, tmp: &Path) -> Result<FileEntry> {
        let entries: Vec<Entry<'_>> = self
            .host
            .dense
            .iter()
            .map(|t| Entry {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: &t.bytes,
            })
            .collect();
        write_atomic(tmp, DENSE_FILE, |w| {
            write_safetensors(w, DENSE_FILE, &entries)
        })
    }

    fn write_tokenizer(&self, tmp: &Path) -> Result<Option<FileEntry>> {
        let Some(bytes) = &self.tokenizer else {
            return Ok(None);
        };
        write_atomic(tmp, TOKENIZER_FILE, |w| w.write_all(bytes))?;
        Ok(Some(FileEntry {
            name: TOKENIZER_FILE.into(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            tensors: Vec::new(),
        }))
    }

    fn write_experts(&self, tmp: &Path) -> Result<()> {
        let mut entries = Vec::new();
        for e in &self.host.experts {
            let p = &e.part;
            for i in 0..p.num_local {
                entries.push(Entry {
                    name: expert_tensor_name(&p.param, p.first_global + i, p.stat.as_deref()),
                    shape: p.expert_shape.clone(),
                    data: e.slice(i as usize),
                });
            }
        }
        let name = experts_file(self.ep_rank);
        let file = write_atomic(tmp, &name, |w| write_safetensors(w, &name, &entries))?;
        // The marker promises a durable file, so the file's rename must be durable first.
        fsync_dir(tmp)?;
        let marker = PartMarker {
            step: self.host.step,
            ep_rank: self.ep_rank,
            file,
            experts: self.host.experts.iter().map(|e| e.part.clone()).collect(),
        };
        write_atomic(tmp, &part_marker(self.ep_rank), |w| {
            serde_json::to_writer(w, &marker).map_err(std::io::Error::from)
        })?;
        fsync_dir(tmp)
    }

    /// Polls for every expert writer's marker; checks each names this step and a file of
    /// the promised size.
    fn collect_parts(&self, tmp: &Path) -> Result<Vec<PartMarker>> {
        let deadline = Instant::now() + self.part_timeout;
        let mut parts = Vec::with_capacity(self.ep_size as usize);
        for k in 0..self.ep_size {
            let path = tmp.join(part_marker(k));
            while !path.exists() {
                if Instant::now() >= deadline {
                    return Err(ckpt_err(
                        tmp,
                        format!(
                            "timed out after {:?} waiting for {} from ep rank {k}",
                            self.part_timeout,
                            experts_file(k)
                        ),
                    ));
                }
                std::thread::sleep(POLL);
            }
            let bytes = fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
            let marker: PartMarker = serde_json::from_slice(&bytes)
                .map_err(|e| ckpt_err(&path, format!("unreadable part marker: {e}")))?;
            if marker.step != self.host.step || marker.ep_rank != k {
                return Err(ckpt_err(
                    &path,
                    format!(
                        "part marker is for step {} ep rank {}, expected step {} ep rank {k}",
                        marker.step, marker.ep_rank, self.host.step
                    ),
                ));
            }
            let file = tmp.join(&marker.file.name);
            let size = fs::metadata(&file)
                .map_err(|e| TrainError::io(&file, e))?
                .len();
            if size != marker.file.size {
                return Err(ckpt_err(
                    &file,
                    format!(
                        "size {size} bytes, its writer reported {}",
                        marker.file.size
                    ),
                ));
            }
            parts.push(marker);
        }
        Ok(parts)
    }

    fn commit(
        &self,
        tmp: &Path,
        dense: FileEntry,
        tokenizer: Option<FileEntry>,
        parts: Vec<PartMarker>,
    ) -> Result<()> {
        let experts = expert_table(tmp, &parts)?;
        let mut files = vec![dense];
        files.extend(parts.into_iter().map(|p| p.file));
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            step: self.host.step,
            optim_step: self.host.optim_step,
            world_size: self.world_size,
            ep_size: self.ep_size,
            experts,
            config_yaml: self.host.config_yaml.clone(),
            extra: self.host.extra.clone(),
            files,
            tokenizer,
        };
        write_atomic(tmp, MANIFEST, |w| {
            serde_json::to_writer_pretty(w, &manifest).map_err(std::io::Error::from)
        })?;
        for k in 0..self.ep_size {
            let path = tmp.join(part_marker(k));
            fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
        }
        fsync_dir(tmp)?;

        let done = self.dir.join(step_dir_name(self.host.step));
        // Re-saving a step (after a resume) replaces it: the old copy is renamed aside, not
        // deleted, until the new one is in place.
        let aside = self.dir.join(format!(
            "{}{DELETING_SUFFIX}",
            step_dir_name(self.host.step)
        ));
        let replacing = done.exists();
        if replacing {
            if aside.exists() {
                fs::remove_dir_all(&aside).map_err(|e| TrainError::io(&aside, e))?;
            }
            fs::rename(&done, &aside).map_err(|e| TrainError::io(&done, e))?;
        }
        fs::rename(tmp, &done).map_err(|e| TrainError::io(&done, e))?;
        fsync_dir(&self.dir)?;
        if replacing {
            fs::remove_dir_all(&aside).map_err(|e| TrainError::io(&aside, e))?;
        }
        Ok(())
    }

    /// Deletes complete checkpoints beyond the newest `keep` at or before this step. Newer
    /// ones (left by a run resumed from an earlier step) are not this run's to delete.
    fn prune(&self) -> Result<()> {
        let mut steps: Vec<u64> = dir_names(&self.dir)?
            .iter()
            .filter_map(|n| parse_step_dir(n))
            .filter(|&s| s <= self.host.step)
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for &step in steps.iter().skip(self.keep) {
            remove_dir_safely(&self.dir.join(step_dir_name(step)))?;
        }
        Ok(())
    }
}

/// One stacked expert tensor and the `(first_global, num_local)` ranges the ranks hold.
struct Coverage {
    entry: ExpertEntry,
    ranges: Vec<(i64, i64)>,
}

/// Merges the ranks' expert slices into one entry per stacked tensor, checking that they
/// agree on shapes and tile `0..E` exactly.
fn expert_table(tmp: &Path, parts: &[PartMarker]) -> Result<Vec<ExpertEntry>> {
    let mut by_key: BTreeMap<&str, Coverage> = BTreeMap::new();
    for part in parts {
        for e in &part.experts {
            let Coverage { entry, ranges } =
                by_key.entry(e.key.as_str()).or_insert_with(|| Coverage {
                    entry: ExpertEntry {
                        key: e.key.clone(),
                        param: e.param.clone(),
                        stat: e.stat.clone(),
                        num_experts: 0,
                        expert_shape: e.expert_shape.clone(),
                    },
                    ranges: Vec::new(),
                });
            if entry.expert_shape != e.expert_shape || entry.param != e.param {
                return Err(ckpt_err(
                    tmp,
                    format!(
                        "{}: ep rank {} has expert shape {:?}, another rank {:?}",
                        e.key, part.ep_rank, e.expert_shape, entry.expert_shape
                    ),
                ));
            }
            ranges.push((e.first_global, e.num_local));
        }
    }
    let mut table = Vec::with_capacity(by_key.len());
    for (
        key,
        Coverage {
            mut entry,
            mut ranges,
        },
    ) in by_key
    {
        ranges.sort_unstable();
        let mut next = 0;
        for &(first, num) in &ranges {
            if first != next {
                return Err(ckpt_err(
                    tmp,
                    format!("{key}: the ranks' experts {ranges:?} (first, count) do not tile 0..E"),
                ));
            }
            next = first + num;
        }
        entry.num_experts = next;
        table.push(entry);
    }
    Ok(table)
}
