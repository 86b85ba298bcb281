//! Tensor-name rules between our checkpoints and a Hugging Face layout, as data: each rule
//! pairs one of our name templates with the HF one (`{L}` a layer index, `{E}` a global expert
//! id) and says whether the matrix is stored transposed. Both directions come from the same
//! rule: [`map_name`] reads it forwards or backwards.
//!
//! Our matrices are `[in, out]` (a projection is `x.matmul(w)`); `torch.nn.Linear` stores
//! `[out, in]`, so every projection is transposed and vectors (norm scales, biases) are not.

/// One name rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRule {
    /// Our name, e.g. `layers.{L}.moe.experts.{E}.w_gate`.
    pub ours: &'static str,
    /// The HF name, e.g. `model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight`.
    pub hf: &'static str,
    /// Stored transposed on the other side (2-D weights of `nn.Linear`).
    pub transpose: bool,
}

/// Which side a name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Hf,
}

/// Placeholder values of one matched name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slots {
    layer: Option<u64>,
    expert: Option<u64>,
}

fn matches(template: &str, name: &str) -> Option<Slots> {
    let (t, n): (Vec<&str>, Vec<&str>) = (template.split('.').collect(), name.split('.').collect());
    if t.len() != n.len() {
        return None;
    }
    let mut slots = Slots::default();
    for (ts, ns) in t.iter().zip(&n) {
        let num = || -> Option<u64> {
            // Canonical decimal only, so `07` or `+7` never map to `7` and back differently.
            let v: u64 = ns.parse().ok()?;
            (v.to_string() == *ns).then_some(v)
        };
        match *ts {
            "{L}" => slots.layer = Some(num()?),
            "{E}" => slots.expert = Some(num()?),
            lit if lit == *ns => {}
            _ => return None,
        }
    }
    Some(slots)
}

fn fill(template: &str, s: Slots) -> String {
    template
        .split('.')
        .map(|seg| match seg {
            "{L}" => s.layer.map_or_else(|| seg.to_string(), |v| v.to_string()),
            "{E}" => s.expert.map_or_else(|| seg.to_string(), |v| v.to_string()),
            _ => seg.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Maps `name` from side `from` to the other side with the first rule that matches it.
/// Returns the mapped name and whether to transpose, or `None` when no rule matches.
pub fn map_name(rules: &[NameRule], from: Side, name: &str) -> Option<(String, bool)> {
    rules.iter().find_map(|r| {
        let (src, dst) = match from {
            Side::Ours => (r.ours, r.hf),
            Side::Hf => (r.hf, r.ours),
        };
        matches(src, name).map(|s| (fill(dst, s), r.transpose))
    })
}

/// The shape on the other side of a tensor of shape `shape`.
pub fn mapped_shape(shape: &[usize], transpose: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if transpose {
        s.reverse();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &[NameRule] = &[
        NameRule {
            ours: "layers.{L}.moe.experts.{E}.w_gate",
            hf: "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
            transpose: true,
        },
        NameRule {
            ours: "norm.weight",
            hf: "model.norm.weight",
            transpose: false,
        },
    ];

    #[test]
    fn both_directions_from_one_rule() {
        let (hf, t) = map_name(RULES, Side::Ours, "layers.12.moe.experts.3.w_gate").unwrap();
        assert_eq!(hf, "model.layers.12.block_sparse_moe.experts.3.w1.weight");
        assert!(t);
        let (ours, t) = map_name(RULES, Side::Hf, &hf).unwrap();
        assert_eq!(ours, "layers.12.moe.experts.3.w_gate");
        assert!(t);
        assert_eq!(
            map_name(RULES, Side::Hf, "model.norm.weight"),
            Some(("norm.weight".into(), false))
        );
    }

    #[test]
    fn no_rule_no_name() {
        assert_eq!(
            map_name(RULES, Side::Ours, "layers.1.moe.expert_bias"),
            None
        );
        assert_eq!(
            map_name(
                RULES,
                Side::Hf,
                "model.layers.01.block_sparse_moe.experts.3.w1.weight"
            ),
            None
        );
        assert_eq!(
            map_name(
                RULES,
                Side::Hf,
                "model.layers.x.block_sparse_moe.experts.3.w1.weight"
            ),
            None
        );
        assert_eq!(mapped_shape(&[3, 5], true), vec![5, 3]);
        assert_eq!(mapped_shape(&[3], false), vec![3]);
    }
}
