//! Writing a model as Hugging Face safetensors shards, one tensor in memory at a time:
//! `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
//! `model.safetensors.index.json` (`metadata.total_size`, `weight_map`) when the tensors do
//! not fit one shard, as `transformers`' `save_pretrained` lays them out.

use super::HfError;
use crate::tensor_bytes::write_le;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use tch::{Kind, Tensor};

/// Element type of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

impl ExportDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 => 2,
        }
    }

    /// The `dtype` of `config.json`.
    pub fn config_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        }
    }

    fn st(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::Bf16 => Dtype::BF16,
        }
    }

    fn kind(self) -> Kind {
        match self {
            ExportDtype::F32 => Kind::Float,
            ExportDtype::Bf16 => Kind::BFloat16,
        }
    }
}

/// One tensor to write, by its name in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl OutTensor {
    fn bytes(&self, dtype: ExportDtype) -> u64 {
        self.shape.iter().product::<usize>() as u64 * dtype.size()
    }
}

/// Splits `tensors` (in order) into shards of at most `max_bytes` each (a tensor larger than
/// that gets a shard of its own), as `transformers` does.
pub fn plan(tensors: &[OutTensor], dtype: ExportDtype, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes(dtype);
        match shards.last_mut() {
            Some(last) if size + b <= max_bytes => {
                last.push(i);
                size += b;
            }
            _ => {
                shards.push(vec![i]);
                size = b;
            }
        }
    }
    shards
}

/// File name of shard `i` (0-based) of `n`.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

fn failed(path: &Path, e: impl std::fmt::Display) -> HfError {
    HfError::Failed(format!("{}: {e}", path.display()))
}

/// Writes `tensors` as one safetensors file at `path`, asking `read` for each tensor's
/// values (any float kind, any layout; converted to `dtype`) only when its turn comes.
pub fn write_file(
    path: &Path,
    tensors: &[&OutTensor],
    dtype: ExportDtype,
    read: &mut dyn FnMut(&OutTensor) -> Result<Tensor, HfError>,
) -> Result<u64, HfError> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        let n = t.bytes(dtype) as usize;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: dtype.st(),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(meta), infos).map_err(|e| failed(path, e))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| failed(path, e))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = File::create(path).map_err(|e| failed(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&header))
        .map_err(|e| failed(path, e))?;
    for t in tensors {
        let values = read(t)?;
        let want: Vec<i64> = t.shape.iter().map(|&s| s as i64).collect();
        if values.size() != want {
            return Err(HfError::Failed(format!(
                "{}: tensor {} has shape {:?}, planned {:?}",
                path.display(),
                t.name,
                values.size(),
                want
            )));
        }
        // Converted and written a chunk at a time: a transposed view is never copied whole.
        write_le(&values, dtype.kind(), &mut w).map_err(|e| failed(path, e))?;
    }
    w.flush().map_err(|e| failed(path, e))?;
    drop(w);
    file.sync_all().map_err(|e| failed(path, e))?;
    Ok(8 + header.len() as u64 + offset as u64)
}

/// Writes all `tensors` into `dir` as shards of at most `max_bytes`, plus the index when
/// there is more than one. Returns the file names written.
pub fn write_model(
    dir: &Path,
    tensors: &[OutTensor],
    dtype: ExportDtype,
    max_bytes: u64,
    read: &mut dyn FnMut(&OutTensor) -> Result<Tensor, HfError>,
) -> Result<Vec<String>, HfError> {
    let shards = plan(tensors, dtype, max_bytes);
    let n = shards.len();
    let mut files = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    for (i, idx) in shards.iter().enumerate() {
        let name = shard_name(i, n);
        let group: Vec<&OutTensor> = idx.iter().map(|&j| &tensors[j]).collect();
        write_file(&dir.join(&name), &group, dtype, read)?;
        for t in &group {
            weight_map.insert(t.name.clone(), name.clone());
        }
        files.push(name);
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(|t| t.bytes(dtype)).sum();
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let name = "model.safetensors.index.json";
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&index).map_err(|e| failed(&path, e))?;
        std::fs::write(&path, text + "\n").map_err(|e| failed(&path, e))?;
        files.push(name.into());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            shape: vec![n],
        }
    }

    #[test]
    fn shards_fill_up_to_the_limit() {
        let ts = [t("a", 10), t("b", 10), t("c", 30), t("d", 5)];
        // 40, 40, 120, 20 bytes in f32, limit 80.
        assert_eq!(
            plan(&ts, ExportDtype::F32, 80),
            vec![vec![0, 1], vec![2], vec![3]]
        );
        // 20, 20, 60, 10 in bf16.
        assert_eq!(
            plan(&ts, ExportDtype::Bf16, 80),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
