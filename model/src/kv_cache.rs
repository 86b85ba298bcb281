//! Keys and values of the positions already seen, per attention layer, for incremental
//! decoding (as in Hugging Face's `DynamicCache`): each new token computes its own query, key
//! and value only, and attends to the cached ones. Only standard (grouped-query) attention
//! caches here; see [`crate::transformer::TransformerLm::supports_kv_cache`].

use crate::{ModelError, Result};
use tch::Tensor;

/// One attention layer's cached keys and values, after RoPE.
#[derive(Debug, Default)]
pub struct LayerKv {
    /// `[b, num_kv_heads, p, head_dim]` keys and values, or nothing before the first call.
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    /// Cached positions `p`.
    pub fn len(&self) -> i64 {
        self.kv.as_ref().map_or(0, |(k, _)| k.size()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.kv.is_none()
    }

    /// Appends `t` positions and returns all `p + t` keys and values.
    ///
    /// # Shapes
    /// `k_bktd`, `v_bktd [b, kv, t, hd]` -> `([b, kv, p + t, hd], [b, kv, p + t, hd])`
    pub fn append(&mut self, k_bktd: Tensor, v_bktd: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            None => (k_bktd, v_bktd),
            Some((k0, v0)) => (
                Tensor::f_cat(&[k0, k_bktd], 2)?,
                Tensor::f_cat(&[v0, v_bktd], 2)?,
            ),
        };
        self.kv = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}

/// The cache of one model: one [`LayerKv`] per block and the number of positions held.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: i64,
}

impl KvCache {
    /// An empty cache for `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Block `i`'s cache.
    pub(crate) fn layer(&mut self, i: usize) -> Result<&mut LayerKv> {
        let n = self.layers.len();
        self.layers.get_mut(i).ok_or_else(|| {
            ModelError::Invalid(format!("KV cache has {n} layers, block {i} asked for one"))
        })
    }

    /// Records `t` more positions (after every block appended them).
    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }
}
