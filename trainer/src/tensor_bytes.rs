//! A tensor's values written out as raw little-endian bytes, a few MiB at a time, so that a
//! tool streaming a model holds one tensor plus one small chunk, never a second full copy
//! (a transposed view or a dtype conversion is materialised chunk by chunk).

use std::io::Write;
use tch::{Device, Kind, Tensor};

/// Bytes converted and written per chunk (at least one row of dim 0).
pub const CHUNK_BYTES: usize = 4 << 20;

#[cfg(target_endian = "big")]
compile_error!("tensor bytes are written as host memory; the files need little-endian");

fn tch_io(e: tch::TchError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Writes `t` (any device, layout or float kind) to `w` as the row-major bytes of a
/// contiguous `kind` tensor of its shape, converting at most about [`CHUNK_BYTES`] at a time.
pub fn write_le(t: &Tensor, kind: Kind, w: &mut dyn Write) -> std::io::Result<()> {
    let numel = t.numel();
    if numel == 0 {
        return Ok(());
    }
    let size = t.size();
    let elt = kind.elt_size_in_bytes();
    let (rows, row_bytes) = match size.first() {
        Some(&r) => (r, numel / r as usize * elt),
        None => (1, elt),
    };
    let per_chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1) as i64;
    let mut r = 0;
    while r < rows {
        let n = per_chunk.min(rows - r);
        let part = if size.is_empty() {
            t.shallow_clone()
        } else {
            t.f_narrow(0, r, n).map_err(tch_io)?
        };
        let part = part
            .f_to_device(Device::Cpu)
            .and_then(|p| p.f_to_kind(kind))
            .and_then(|p| p.f_contiguous())
            .map_err(tch_io)?;
        let nbytes = part.numel() * elt;
        // SAFETY: `part` is a contiguous CPU tensor of `kind` with `numel` elements, i.e.
        // exactly `nbytes` bytes from its data pointer; it outlives the slice.
        let buf = unsafe { std::slice::from_raw_parts(part.data_ptr().cast::<u8>(), nbytes) };
        w.write_all(buf)?;
        r += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transposed view spanning several chunks is written as its contiguous copy would be.
    #[test]
    fn writes_views_like_contiguous_copies() {
        let rows = (CHUNK_BYTES / 4 / 64 + 5) as i64;
        let base = Tensor::arange(rows * 64, (Kind::Float, Device::Cpu)).reshape([64, rows]);
        let view = base.tr();
        for kind in [Kind::Float, Kind::BFloat16] {
            let mut ours = Vec::new();
            write_le(&view, kind, &mut ours).unwrap();
            let want = view.to_kind(kind).contiguous();
            let n = want.numel() * kind.elt_size_in_bytes();
            let mut theirs = vec![0u8; n];
            want.copy_data_u8(&mut theirs, want.numel());
            assert_eq!(ours.len(), n);
            assert!(ours == theirs, "{kind:?} bytes differ");
        }
        let mut one = Vec::new();
        write_le(&Tensor::from(2.5f32), Kind::Float, &mut one).unwrap();
        assert_eq!(one, 2.5f32.to_le_bytes());
    }
}
