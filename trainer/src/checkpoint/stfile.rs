//! One safetensors file read tensor by tensor: the header is parsed once, then each tensor's
//! bytes are read from their offset, so a reader never holds more than one tensor. Used for
//! our own checkpoint files and for Hugging Face model folders alike.
//!
//! The header is checked as the `safetensors` crate checks it (offsets contiguous from 0,
//! each range the size its dtype and shape need), plus the file length, so a truncated file
//! is reported before any tensor is read.

use crate::error::{Result, TrainError};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Largest header accepted (the `safetensors` crate's limit).
const MAX_HEADER: u64 = 100_000_000;

/// Element types a reader accepts; every tensor is returned as float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    BF16,
    F16,
}

impl StDtype {
    /// The name in a safetensors header.
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::BF16 => "BF16",
            StDtype::F16 => "F16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::BF16 | StDtype::F16 => 2,
        }
    }

    fn kind(self) -> Kind {
        match self {
            StDtype::F32 => Kind::Float,
            StDtype::BF16 => Kind::BFloat16,
            StDtype::F16 => Kind::Half,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(StDtype::F32),
            "BF16" => Some(StDtype::BF16),
            "F16" => Some(StDtype::F16),
            _ => None,
        }
    }
}

/// Where one tensor lies in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub begin: u64,
    pub end: u64,
}

/// A parsed safetensors header and the file it came from.
#[derive(Debug, Clone)]
pub struct StFile {
    path: PathBuf,
    data_start: u64,
    tensors: BTreeMap<String, StTensor>,
}

fn bad(path: &Path, msg: String) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        msg,
    }
}

impl StFile {
    /// Reads and checks the header of `path`. Errors name the file and say what is wrong:
    /// unreadable, not safetensors, an unsupported dtype, a truncated data section.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| TrainError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| TrainError::io(path, e))?.len();
        let mut len8 = [0u8; 8];
        f.read_exact(&mut len8).map_err(|_| {
            bad(
                path,
                format!("not a safetensors file: {file_len} bytes, shorter than its 8-byte header length"),
            )
        })?;
        let n = u64::from_le_bytes(len8);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(bad(
                path,
                format!(
                    "not a safetensors file (or truncated): header length {n}, file has {file_len} bytes"
                ),
            ));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .map_err(|e| TrainError::io(path, e))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| {
                bad(
                    path,
                    format!("not a safetensors file: header is not JSON ({e})"),
                )
            })?;
        let mut tensors = BTreeMap::new();
        for (name, v) in json {
            if name == "__metadata__" {
                continue;
            }
            let t = parse_entry(&name, &v).map_err(|m| bad(path, m))?;
            tensors.insert(name, t);
        }
        let mut ranges: Vec<(u64, u64, &str)> = tensors
            .iter()
            .map(|(n, t)| (t.begin, t.end, n.as_str()))
            .collect();
        ranges.sort();
        let mut at = 0u64;
        for (b, e, name) in &ranges {
            if *b != at {
                return Err(bad(
                    path,
                    format!("tensor {name}: data starts at {b}, expected {at} (overlapping or gapped offsets)"),
                ));
            }
            at = *e;
        }
        let data_start = 8 + n;
        if data_start + at != file_len {
            return Err(bad(
                path,
                format!(
                    "truncated or corrupt: the header describes {} data bytes, the file holds {}",
                    at,
                    file_len - data_start
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            data_start,
            tensors,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor by name.
    pub fn tensors(&self) -> &BTreeMap<String, StTensor> {
        &self.tensors
    }

    /// Reads tensor `name` as a float32 CPU tensor.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("has no tensor {name}")))?;
        let mut f = File::open(&self.path).map_err(|e| TrainError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.data_start + t.begin))
            .map_err(|e| TrainError::io(&self.path, e))?;
        // Read straight into the tensor's memory: a large tensor is never held twice.
        let size: Vec<i64> = t.shape.iter().map(|&s| s as i64).collect();
        let tensor = Tensor::f_empty(&size, (t.dtype.kind(), Device::Cpu))?;
        let nbytes = (t.end - t.begin) as usize;
        if nbytes > 0 {
            // SAFETY: `tensor` was just allocated, contiguous on the CPU, with `numel` elements
            // of `dtype`, i.e. exactly `nbytes` bytes (`parse_entry` checked the range against
            // the shape and dtype); nothing else references it while the slice lives.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), nbytes) };
            f.read_exact(buf)
                .map_err(|e| bad(&self.path, format!("reading tensor {name}: {e}")))?;
        }
        Ok(tensor.f_to_kind(Kind::Float)?)
    }
}

fn parse_entry(name: &str, v: &serde_json::Value) -> std::result::Result<StTensor, String> {
    let dtype_s = v["dtype"].as_str().unwrap_or("?");
    let dtype = StDtype::parse(dtype_s).ok_or_else(|| {
        format!("tensor {name}: dtype {dtype_s} is not supported (F32, BF16 or F16)")
    })?;
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
        .ok_or_else(|| format!("tensor {name}: header has no valid shape"))?;
    let offs: Vec<u64> = v["data_offsets"]
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
        .ok_or_else(|| format!("tensor {name}: header has no valid data_offsets"))?;
    let [begin, end] = offs[..] else {
        return Err(format!("tensor {name}: data_offsets must be [begin, end]"));
    };
    let want = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    if end < begin || end - begin != want {
        return Err(format!(
            "tensor {name}: {} bytes in the file, shape {shape:?} of {} needs {want}",
            end.saturating_sub(begin),
            dtype.name()
        ));
    }
    Ok(StTensor {
        dtype,
        shape,
        begin,
        end,
    })
}
