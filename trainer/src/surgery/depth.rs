//! `moe slim --drop-layers L` / `--layers i,j`: remove whole blocks. ShortGPT (Men et al.
//! 2024) scores block i by its Block Influence `BI_i = 1 - E[cos(x_i, x_{i+1})]` on
//! calibration tokens (a block that barely turns the residual stream matters least) and
//! removes the L lowest. The kept blocks are renumbered `0..L'`; the multi-token prediction
//! block, stored as block `num_layers`, moves to `L'`. The new config must produce the same
//! kind of FFN (and attention) at each new position as the old block had, with its
//! `moe.first_dense_layers` / `moe.moe_every` (and `full_attention_interval`) refitted.

use crate::hf::HfError;
use moe_model::config::{AttentionKind, ModelConfig, MoeConfig};
use std::collections::BTreeMap;

/// The `l` blocks with the lowest influence (ties to the lower index), sorted.
pub fn lowest_influence(bi: &BTreeMap<i64, f64>, l: usize) -> Vec<i64> {
    let mut order: Vec<(i64, f64)> = bi.iter().map(|(&i, &b)| (i, b)).collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut drop: Vec<i64> = order.into_iter().take(l).map(|(i, _)| i).collect();
    drop.sort_unstable();
    drop
}

/// The old index of each new block, `0..num_layers` without `dropped`.
pub fn kept_layers(num_layers: i64, dropped: &[i64]) -> Vec<i64> {
    (0..num_layers).filter(|i| !dropped.contains(i)).collect()
}

/// The source name of a tensor of the new model: `layers.{j}.rest` reads
/// `layers.{kept[j]}.rest`, the MTP block `layers.{kept.len()}` reads `layers.{old_layers}`.
pub fn source_name(name: &str, kept: &[i64], old_layers: i64) -> String {
    let Some(rest) = name.strip_prefix("layers.") else {
        return name.to_string();
    };
    let Some((j, tail)) = rest.split_once('.') else {
        return name.to_string();
    };
    let Ok(j) = j.parse::<usize>() else {
        return name.to_string();
    };
    let old = kept.get(j).copied().unwrap_or(old_layers);
    format!("layers.{old}.{tail}")
}

/// Refits the per-layer patterns to the kept blocks: `moe.first_dense_layers`,
/// `moe.moe_every` and, for the hybrid attention, `model.attention.full_attention_interval`,
/// so that new block j has the FFN and attention kinds of old block `kept[j]`. `flag` names
/// the argument in the error when no setting reproduces them.
pub fn refit_patterns(
    model: &mut ModelConfig,
    moe: &mut MoeConfig,
    kept: &[i64],
    flag: &str,
) -> Result<(), HfError> {
    let n = kept.len() as i64;
    let want_moe: Vec<bool> = kept.iter().map(|&i| moe.is_moe_layer(i)).collect();
    let fit = (0..=n)
        .flat_map(|first| (0..=n.max(1)).map(move |every| (first, every)))
        .find(|&(first, every)| {
            let mut c = moe.clone();
            c.first_dense_layers = first;
            c.moe_every = every;
            (0..n).all(|j| c.is_moe_layer(j) == want_moe[j as usize])
        });
    let Some((first, every)) = fit else {
        return Err(HfError::Input(format!(
            "{flag}: the kept blocks {kept:?} have MoE FFNs at {:?}, which no \
             moe.first_dense_layers / moe.moe_every describes; name other blocks with --layers",
            (0..n).filter(|&j| want_moe[j as usize]).collect::<Vec<_>>()
        )));
    };
    // Keep the original pattern keys when they already fit (e.g. moe_every 1, no dense).
    if (0..n).any(|j| moe.is_moe_layer(j) != want_moe[j as usize]) {
        moe.first_dense_layers = first;
        moe.moe_every = every;
    }
    if model.attention.kind == AttentionKind::GatedDeltanet {
        let want: Vec<bool> = kept
            .iter()
            .map(|&i| model.attention.is_full_attention(i))
            .collect();
        let mut a = model.attention.clone();
        let ok = |a: &moe_model::config::AttentionConfig| {
            (0..n).all(|j| a.is_full_attention(j) == want[j as usize])
        };
        if !ok(&a) {
            let found = (0..=n + 1).find(|&k| {
                a.full_attention_interval = k;
                ok(&a)
            });
            match found {
                Some(k) => model.attention.full_attention_interval = k,
                None => {
                    return Err(HfError::Input(format!(
                        "{flag}: the kept blocks {kept:?} have full attention at {:?}, which no \
                         model.attention.full_attention_interval describes; name other blocks \
                         with --layers",
                        (0..n).filter(|&j| want[j as usize]).collect::<Vec<_>>()
                    )))
                }
            }
        }
    }
    model.num_layers = n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BI {0: 0.5, 1: 0.1, 2: 0.3, 3: 0.1}: the two lowest are 1 and 3 (tie at 0.1 kept in
    /// index order), then 2.
    #[test]
    fn lowest_influence_by_hand() {
        let bi = BTreeMap::from([(0, 0.5), (1, 0.1), (2, 0.3), (3, 0.1)]);
        assert_eq!(lowest_influence(&bi, 2), [1, 3]);
        assert_eq!(lowest_influence(&bi, 3), [1, 2, 3]);
        assert_eq!(kept_layers(4, &[1, 3]), [0, 2]);
    }

    #[test]
    fn names_follow_their_block() {
        let kept = [0, 2, 3];
        assert_eq!(
            source_name("layers.1.attn.wq", &kept, 4),
            "layers.2.attn.wq"
        );
        assert_eq!(
            source_name("layers.2.moe.w_router", &kept, 4),
            "layers.3.moe.w_router"
        );
        assert_eq!(
            source_name("layers.3.eh_proj", &kept, 4),
            "layers.4.eh_proj"
        );
        assert_eq!(source_name("embed.weight", &kept, 4), "embed.weight");
    }

    /// Four blocks, first one dense, then MoE every block: dropping block 0 leaves all MoE
    /// (first_dense_layers 0); dropping block 2 keeps the pattern. With moe_every 2 (MoE at 0
    /// and 2): dropping block 3 keeps it; dropping block 0 leaves dense, MoE, dense
    /// (first_dense_layers 1, moe_every 2); dropping block 1 leaves MoE, MoE, dense, which
    /// no pattern describes: an error naming the flag.
    #[test]
    fn patterns_refit_by_hand() {
        let model = ModelConfig {
            num_layers: 4,
            ..ModelConfig::default()
        };
        let moe = MoeConfig {
            first_dense_layers: 1,
            moe_every: 1,
            ..MoeConfig::default()
        };
        let (mut m, mut e) = (model.clone(), moe.clone());
        refit_patterns(&mut m, &mut e, &[1, 2, 3], "--layers").unwrap();
        assert_eq!((m.num_layers, e.first_dense_layers, e.moe_every), (3, 0, 1));
        let (mut m, mut e) = (model.clone(), moe.clone());
        refit_patterns(&mut m, &mut e, &[0, 1, 3], "--layers").unwrap();
        assert_eq!((e.first_dense_layers, e.moe_every), (1, 1));
        let every2 = MoeConfig {
            first_dense_layers: 0,
            moe_every: 2,
            ..MoeConfig::default()
        };
        let (mut m, mut e) = (model.clone(), every2.clone());
        refit_patterns(&mut m, &mut e, &[0, 1, 2], "--layers").unwrap();
        assert_eq!((e.first_dense_layers, e.moe_every), (0, 2));
        let (mut m, mut e) = (model.clone(), every2.clone());
        refit_patterns(&mut m, &mut e, &[1, 2, 3], "--layers").unwrap();
        assert_eq!((e.first_dense_layers, e.moe_every), (1, 2));
        let (mut m, mut e) = (model, every2);
        match refit_patterns(&mut m, &mut e, &[0, 2, 3], "--drop-layers") {
            Err(HfError::Input(msg)) => assert!(msg.starts_with("--drop-layers"), "{msg}"),
            other => panic!("expected an input error, got {other:?}"),
        }
    }
}
