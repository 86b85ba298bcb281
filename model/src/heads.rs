//! What the attention variants ([`crate::attention`], [`crate::gated_attention`],
//! [`crate::mla`], [`crate::deltanet`]) share: the `[b, t, d]` input check and the
//! grouped-query expansion of key/value heads (HF's `repeat_kv`).

use crate::{ModelError, Result};
use tch::Tensor;

/// Batch and sequence sizes of an attention input, which must be `[b, t, d]`.
pub(crate) fn batch_time(x_btd: &Tensor) -> Result<(i64, i64)> {
    match x_btd.size().as_slice() {
        [b, t, _] => Ok((*b, *t)),
        size => Err(ModelError::Invalid(format!(
            "attention input must be [b, t, d], got {size:?}"
        ))),
    }
}

/// `[b, kv, t, hd]` -> `[b, heads, t, hd]`, each kv head repeated `heads / kv` times in place
/// (head `j` of the result is kv head `j / group`): the layout of SDPA's `enable_gqa` and HF's
/// `repeat_kv`. Expanding instead of `enable_gqa` keeps every SDPA backend eligible
/// (memory-efficient attention rejects `enable_gqa`, e.g. float32 on CUDA).
pub(crate) fn repeat_kv(x_bktd: &Tensor, heads: i64) -> Result<Tensor> {
    let size = x_bktd.size();
    let [b, kv, t, hd] = size[..] else {
        return Err(ModelError::Invalid(format!(
            "key/value heads must be [b, kv, t, hd], got {size:?}"
        )));
    };
    if kv <= 0 || heads % kv != 0 {
        return Err(ModelError::Invalid(format!(
            "{kv} key/value heads do not divide {heads} query heads"
        )));
    }
    let group = heads / kv;
    if group == 1 {
        return Ok(x_bktd.shallow_clone());
    }
    Ok(x_bktd
        .f_unsqueeze(2)?
        .f_expand([b, kv, group, t, hd], false)?
        .f_reshape([b, heads, t, hd])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn repeat_kv_repeats_each_head_in_place() {
        // kv head j holds the value j everywhere: [1, 2, 3, 2] -> heads 0..6 read 0,0,0,1,1,1.
        let x = Tensor::arange(2, (Kind::Float, Device::Cpu))
            .reshape([1, 2, 1, 1])
            .expand([1, 2, 3, 2], false);
        let y = repeat_kv(&x, 6).unwrap();
        assert_eq!(y.size(), vec![1, 6, 3, 2]);
        let per_head = Vec::<f32>::try_from(y.select(2, 0).select(2, 0).reshape([-1])).unwrap();
        assert_eq!(per_head, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert!(repeat_kv(&x, 3).is_err());
        assert!(batch_time(&x).is_err());
        assert_eq!(batch_time(&x.select(3, 0)).unwrap(), (1, 2));
    }
}
