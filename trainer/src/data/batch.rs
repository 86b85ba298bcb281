//! A micro-batch of token windows, and how it is cut out of the token store.

use crate::{Result, TrainError};
use tch::{Kind, Tensor};

/// One micro-batch on the CPU (the trainer moves it to its device).
#[derive(Debug)]
pub struct Batch {
    /// int64 `[b, t]`: tokens `w[0..t]` of each window.
    pub inputs_bt: Tensor,
    /// int64 `[b, t]`: tokens `w[1..t+1]`, the next-token targets.
    pub targets_bt: Tensor,
}

impl Batch {
    /// Sequences in the batch (b).
    pub fn batch_size(&self) -> i64 {
        self.inputs_bt.size().first().copied().unwrap_or(0)
    }

    /// Concatenates batches along the batch dimension, e.g. every rank's slice of a
    /// micro-step into the single-process batch of the same step.
    pub fn cat(parts: &[Batch]) -> Result<Batch> {
        let inputs: Vec<&Tensor> = parts.iter().map(|b| &b.inputs_bt).collect();
        let targets: Vec<&Tensor> = parts.iter().map(|b| &b.targets_bt).collect();
        Ok(Batch {
            inputs_bt: Tensor::f_cat(&inputs, 0)?,
            targets_bt: Tensor::f_cat(&targets, 0)?,
        })
    }
}

/// Token ids stored compactly: bytes (`width` 1), little-endian uint16 (2) or uint32 (4).
#[derive(Debug, Clone)]
pub(crate) struct TokenStore {
    bytes: Vec<u8>,
    width: usize,
}

impl TokenStore {
    /// One token per byte (byte-level text).
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes, width: 1 }
    }

    /// Little-endian tokens of `width` bytes (2 or 4); `bytes.len()` must be a multiple of
    /// it (checked by the loader).
    pub(crate) fn from_le(bytes: Vec<u8>, width: usize) -> Self {
        Self { bytes, width }
    }

    /// Ids as little-endian uint16 when they all fit, else uint32.
    pub(crate) fn from_ids(ids: &[u32]) -> Self {
        if ids.iter().all(|&v| v <= u32::from(u16::MAX)) {
            let bytes = ids.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect();
            Self::from_le(bytes, 2)
        } else {
            Self::from_le(ids.iter().flat_map(|v| v.to_le_bytes()).collect(), 4)
        }
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len() / self.width
    }

    /// The windows `[start, start + t + 1)` as `(inputs, targets)`.
    ///
    /// Copies whole windows (one memcpy each) into a uint8 tensor and widens it with tensor
    /// ops, so the cost is independent of the host's endianness and needs no per-token loop.
    ///
    /// # Shapes
    /// `starts` of length b -> inputs `[b, t]`, targets `[b, t]`, int64
    pub(crate) fn gather(&self, starts: &[u64], t: i64) -> Result<Batch> {
        let win = (t + 1) as usize;
        let mut buf = Vec::with_capacity(starts.len() * win * self.width);
        for &s in starts {
            let lo = s as usize * self.width;
            let hi = lo + win * self.width;
            let window = self.bytes.get(lo..hi).ok_or_else(|| {
                TrainError::Data(format!(
                    "window [{s}, {}) is outside a split of {} tokens",
                    s as usize + win,
                    self.len()
                ))
            })?;
            buf.extend_from_slice(window);
        }
        let b = starts.len() as i64;
        let raw_bwc = Tensor::f_from_slice(&buf)?.f_view([b, t + 1, self.width as i64])?;
        // Little-endian: id = sum_c byte_c * 256^c.
        let mut ids_bw = raw_bwc.f_select(2, 0)?.f_to_kind(Kind::Int64)?;
        for c in 1..self.width as i64 {
            let byte_bw = raw_bwc.f_select(2, c)?.f_to_kind(Kind::Int64)?;
            ids_bw = ids_bw.f_add(&byte_bw.f_mul_scalar(1i64 << (8 * c))?)?;
        }
        Ok(Batch {
            inputs_bt: ids_bw.f_narrow(1, 0, t)?.f_contiguous()?,
            targets_bt: ids_bw.f_narrow(1, 1, t)?.f_contiguous()?,
        })
    }
}
