//! Next-token logits for sampling, one call per generated token, with or without a KV cache.
//!
//! The context of a call is `tokens[start..]`: on the first call the last `max_seq_len`
//! tokens; when it outgrows `max_seq_len`, it restarts from its last half (llama.cpp's
//! "context shift": RoPE positions and cached keys cannot slide one token at a time without
//! recomputing every position). Both modes use this one rule, so they see the same context
//! and, at temperature 0, produce the same tokens:
//! - **cached** (standard attention): the context is prefilled once into a
//!   [`moe_model::kv_cache::KvCache`], then each new token runs alone through the model
//!   (attention reads the cached keys and values; MoE layers route only that token);
//! - **recompute**: every call runs the whole context ([`crate::inference::last_logits`]);
//!   the only mode for attention kinds without a cache (MLA, gated DeltaNet).

use crate::inference::{last_logits, EvalModel};
use crate::{Result, TrainError};
use moe_model::kv_cache::KvCache;
use moe_model::transformer::LmForward;
use tch::{Kind, Tensor};

/// Next-token logits over a growing token sequence.
pub struct Decoder<'a> {
    m: &'a EvalModel<'a>,
    window: usize,
    /// Where the context starts; `None` before the first call.
    start: Option<usize>,
    /// The cache and how many tokens (absolute index) it holds, `tokens[start..upto]`.
    cache: Option<(KvCache, usize)>,
    use_cache: bool,
}

impl<'a> Decoder<'a> {
    /// A decoder; it caches when `use_cache` and the model's attention supports it
    /// ([`moe_model::transformer::TransformerLm::supports_kv_cache`]), else recomputes.
    pub fn new(m: &'a EvalModel<'a>, use_cache: bool) -> Self {
        Self {
            m,
            window: m.model.config().max_seq_len.max(1) as usize,
            start: None,
            cache: None,
            use_cache: use_cache && m.model.supports_kv_cache(),
        }
    }

    /// Whether this decoder uses a KV cache.
    pub fn uses_cache(&self) -> bool {
        self.use_cache
    }

    /// The first token of the context the last call used.
    pub fn context_start(&self) -> usize {
        self.start.unwrap_or(0)
    }

    /// Logits f32 `[v]` for the token after `tokens`. Successive calls pass the same
    /// sequence with tokens appended (a sequence that is not an extension of the cached one
    /// is prefilled again from scratch).
    pub fn next_logits(&mut self, tokens: &[i64]) -> Result<Tensor> {
        let len = tokens.len();
        if len == 0 {
            return Err(TrainError::Other("no tokens to continue".into()));
        }
        let start = match self.start {
            None => len.saturating_sub(self.window),
            Some(s) if s < len && len - s <= self.window => s,
            Some(_) => len - (self.window / 2).max(1),
        };
        self.start = Some(start);
        if !self.use_cache {
            return last_logits(self.m, &tokens[start..]);
        }
        let from = match &self.cache {
            Some((c, upto)) if *upto < len && upto.checked_sub(start) == Some(c.len() as usize) => {
                *upto
            }
            _ => {
                self.cache = Some((self.m.model.new_kv_cache(), start));
                start
            }
        };
        let Some((cache, upto)) = self.cache.as_mut() else {
            return Err(TrainError::Other("KV cache missing".into()));
        };
        let _guard = tch::no_grad_guard();
        let new = &tokens[from..];
        let t = new.len() as i64;
        let tokens_bt = moe_comm::Placement::new(self.m.device, self.m.compute_kind)
            .upload(new)?
            .f_reshape([1, t])?;
        let ctx = LmForward {
            train: false,
            compute_kind: self.m.compute_kind,
            step: 0,
        };
        let out = self.m.model.forward_cached(&tokens_bt, &ctx, cache);
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // A failed call may have appended to some layers only: start over next time.
                self.cache = None;
                return Err(e.into());
            }
        };
        *upto = len;
        Ok(out
            .logits_btv
            .f_select(1, t - 1)?
            .f_squeeze_dim(0)?
            .f_to_kind(Kind::Float)?)
    }
}
