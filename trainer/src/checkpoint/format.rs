//! The safetensors encoding (<https://github.com/huggingface/safetensors>): an 8-byte
//! little-endian header length, a JSON header padded with spaces to 8 bytes, then the raw
//! little-endian tensor bytes. The header comes from the `safetensors` crate's own `Metadata`
//! so the files match what it and the Python package write; the bytes are streamed from
//! host buffers (the crate's writer would need an infallible `View::data`) and hashed on
//! the way out, so no file is ever held twice in memory.

use super::manifest::{FileEntry, TensorEntry};
use crate::error::{Result, TrainError};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

#[cfg(target_endian = "big")]
compile_error!("checkpoints copy host memory as-is; safetensors needs little-endian bytes");

/// Bytes per stored element: everything is float32.
pub(crate) const ELT_BYTES: usize = 4;

/// One tensor to write: float32 bytes of `shape`, row-major.
pub(crate) struct Entry<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Encodes `entries` into `w` and describes the result (size, sha256, tensors) as `name`.
pub(crate) fn write_safetensors(
    w: impl Write,
    name: &str,
    entries: &[Entry<'_>],
) -> std::io::Result<FileEntry> {
    for e in entries {
        let want = e.shape.iter().product::<usize>() * ELT_BYTES;
        if want != e.data.len() {
            return Err(invalid(format!(
                "{}: shape {:?} needs {want} bytes, got {}",
                e.name,
                e.shape,
                e.data.len()
            )));
        }
    }
    let tensors: Vec<TensorEntry> = entries
        .iter()
        .map(|e| TensorEntry {
            name: e.name.clone(),
            shape: e.shape.clone(),
        })
        .collect();
    write_safetensors_with(w, name, &tensors, &mut |i, out| {
        out.write_all(entries[i].data)
    })
}

/// Encodes the float32 `tensors` into `w`, asking `fill(i, out)` to write tensor `i`'s bytes
/// when its turn comes (so a caller can stream them), and describes the result as `name`.
/// Each tensor must get exactly the bytes its shape needs.
pub(crate) fn write_safetensors_with(
    w: impl Write,
    name: &str,
    tensors: &[TensorEntry],
    fill: &mut dyn FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<FileEntry> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        let want = t.shape.iter().product::<usize>() * ELT_BYTES;
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            data_offsets: (offset, offset + want),
        };
        infos.push((t.name.clone(), info));
        offset += want;
    }
    let metadata = Metadata::new(None, infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| invalid(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut out = Hashing {
        inner: w,
        sha: Sha256::new(),
        len: 0,
    };
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (i, t) in tensors.iter().enumerate() {
        let before = out.len;
        fill(i, &mut out)?;
        let want = (t.shape.iter().product::<usize>() * ELT_BYTES) as u64;
        if out.len - before != want {
            return Err(invalid(format!(
                "{}: shape {:?} needs {want} bytes, got {}",
                t.name,
                t.shape,
                out.len - before
            )));
        }
    }
    out.flush()?;
    Ok(FileEntry {
        name: name.to_string(),
        size: out.len,
        sha256: hex(&out.sha.finalize()),
        tensors: tensors.to_vec(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn corrupt(path: &Path, msg: String) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

fn check_digest(path: &Path, want: &FileEntry, size: u64, sha: &str) -> Result<()> {
    if size != want.size {
        return Err(corrupt(
            path,
            format!(
                "size {size} bytes, manifest says {} (truncated or torn write)",
                want.size
            ),
        ));
    }
    if sha != want.sha256 {
        return Err(corrupt(
            path,
            format!(
                "sha256 {sha} differs from the manifest's {} (corrupted)",
                want.sha256
            ),
        ));
    }
    Ok(())
}

/// Checks `path`'s size and sha256 against `want` without keeping its bytes.
pub(crate) fn verify_file(path: &Path, want: &FileEntry) -> Result<()> {
    let mut file = File::open(path).map_err(|e| TrainError::io(path, e))?;
    let size = file.metadata().map_err(|e| TrainError::io(path, e))?.len();
    if size != want.size {
        return check_digest(path, want, size, "");
    }
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| TrainError::io(path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    check_digest(path, want, size, &hex(&sha.finalize()))
}

/// Reads `path` whole and checks it against `want`; the bytes checked are the bytes returned.
pub(crate) fn read_verified(path: &Path, want: &FileEntry) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    check_digest(
        path,
        want,
        bytes.len() as u64,
        &hex(&Sha256::digest(&bytes)),
    )?;
    Ok(bytes)
}

/// Parses a safetensors buffer read from `path`.
pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| corrupt(path, format!("not a safetensors file: {e}")))
}

/// The float32 bytes and shape of `name` in `st` (read from `path`).
pub(crate) fn f32_view<'a>(
    path: &Path,
    st: &SafeTensors<'a>,
    name: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let view = st.tensor(name).map_err(|_| {
        corrupt(
            path,
            format!("missing tensor {name} (listed in the manifest)"),
        )
    })?;
    if view.dtype() != Dtype::F32 {
        return Err(corrupt(
            path,
            format!("{name}: dtype {:?}, expected F32", view.dtype()),
        ));
    }
    Ok((view.shape().to_vec(), view.data()))
}
