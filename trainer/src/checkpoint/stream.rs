//! A checkpoint of any expert-parallel size as a stream of (global name, tensor): the spine of
//! the checkpoint tools (export, import, surgery; `shared/DESIGN.md`, "Checkpoint tools").
//!
//! Every file is verified against the manifest's sha256 (streamed, nothing kept) when the
//! reader opens; tensors are then read one at a time from their offsets, so a tool holds one
//! tensor at a time. Names are the files' names: dense tensors as the model names them
//! (`layers.0.attn.wq`), routed experts one tensor per global expert id
//! (`layers.3.moe.experts.17.w_gate`), whichever rank's file holds them, so a checkpoint
//! written at EP=8 streams exactly like its EP=1 twin.

use super::format::verify_file;
use super::manifest::{Manifest, OPTIM_PREFIX};
use super::stfile::StFile;
use super::verify::read_manifest;
use crate::error::{Result, TrainError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A verified checkpoint, read tensor by tensor.
#[derive(Debug)]
pub struct CheckpointReader {
    path: PathBuf,
    manifest: Manifest,
    files: Vec<StFile>,
    /// Global tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl CheckpointReader {
    /// Opens the checkpoint directory `path` (a `step-N/`): reads the manifest, checks every
    /// listed file's size and sha256, parses the headers, and checks that the files hold
    /// exactly the tensors the manifest lists, each once.
    pub fn open(path: &Path) -> Result<Self> {
        let manifest = read_manifest(path)?;
        let mut files = Vec::with_capacity(manifest.files.len());
        let mut index = BTreeMap::new();
        for (i, f) in manifest.files.iter().enumerate() {
            let file_path = path.join(&f.name);
            verify_file(&file_path, f)?;
            let st = StFile::open(&file_path)?;
            for t in &f.tensors {
                let Some(info) = st.tensors().get(&t.name) else {
                    return Err(TrainError::Checkpoint {
                        path: file_path,
                        msg: format!("missing tensor {} (listed in the manifest)", t.name),
                    });
                };
                if info.shape != t.shape {
                    return Err(TrainError::Checkpoint {
                        path: file_path,
                        msg: format!(
                            "{}: shape {:?}, the manifest says {:?}",
                            t.name, info.shape, t.shape
                        ),
                    });
                }
                if index.insert(t.name.clone(), i).is_some() {
                    return Err(TrainError::Checkpoint {
                        path: path.to_path_buf(),
                        msg: format!("tensor {} is listed in two files", t.name),
                    });
                }
            }
            files.push(st);
        }
        if let Some(t) = &manifest.tokenizer {
            verify_file(&path.join(&t.name), t)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            manifest,
            files,
            index,
        })
    }

    /// The checkpoint directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its manifest (step, sizes, the resolved config).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Model tensors (parameters and buffers, no optimizer state) by global name, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.index
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with(OPTIM_PREFIX))
    }

    /// Optimizer-state tensors (`optim.<param>.<stat>`), sorted.
    pub fn optim_names(&self) -> impl Iterator<Item = &str> {
        self.index
            .keys()
            .map(String::as_str)
            .filter(|n| n.starts_with(OPTIM_PREFIX))
    }

    /// Shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let file = self.files.get(*self.index.get(name)?)?;
        file.tensors().get(name).map(|t| t.shape.as_slice())
    }

    /// Reads tensor `name` (float32, CPU).
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let i = *self.index.get(name).ok_or_else(|| TrainError::Checkpoint {
            path: self.path.clone(),
            msg: format!("has no tensor {name}"),
        })?;
        self.files[i].read(name)
    }

    /// The model tensors as a stream of (global name, tensor), in name order, one read at a
    /// time.
    pub fn model_tensors(&self) -> impl Iterator<Item = Result<(String, Tensor)>> + '_ {
        self.model_names()
            .map(|n| self.read(n).map(|t| (n.to_string(), t)))
    }
}

/// Splits a per-expert tensor name into its stacked parameter name and global expert id:
/// `layers.3.moe.experts.17.w_gate` -> (`layers.3.moe.experts.w_gate`, 17). The inverse of
/// the name checkpoints store experts under; `None` for any other name.
pub fn split_expert_name(name: &str) -> Option<(String, i64)> {
    let (head, last) = name.rsplit_once('.')?;
    let (stem, id) = head.rsplit_once('.')?;
    if !stem.ends_with(".experts") {
        return None;
    }
    let id: i64 = id.parse().ok()?;
    Some((format!("{stem}.{last}"), id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::expert_tensor_name;

    #[test]
    fn expert_names_round_trip() {
        let n = expert_tensor_name("layers.3.moe.experts.w_gate", 17, None);
        assert_eq!(n, "layers.3.moe.experts.17.w_gate");
        assert_eq!(
            split_expert_name(&n),
            Some(("layers.3.moe.experts.w_gate".into(), 17))
        );
        assert_eq!(split_expert_name("layers.3.moe.w_router"), None);
        assert_eq!(split_expert_name("layers.3.attn.wq"), None);
    }
}
