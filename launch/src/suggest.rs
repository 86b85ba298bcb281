//! "Did you mean" for misspelt keys and values: the closest candidate by optimal string
//! alignment distance (Levenshtein plus adjacent transpositions), if it is within 2 edits.

/// Largest distance at which a candidate is still suggested.
pub const MAX_SUGGEST_DISTANCE: usize = 2;

/// The candidate closest to `word`, if one is within `MAX_SUGGEST_DISTANCE` edits; the first
/// in `candidates` order wins ties.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::osa_distance(word, c), *c))
        .filter(|(d, _)| *d <= MAX_SUGGEST_DISTANCE)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transposition_is_one_edit() {
        // OSA, not plain Levenshtein (which counts a swap as 2): a swapped pair is the commonest typo.
        assert_eq!(closest("tpo_kk", &["top_k"]), Some("top_k")); // swap + deletion
        assert_eq!(closest("lr", &["eps"]), None); // 3 edits
    }

    #[test]
    fn suggests_only_within_two_edits() {
        let moe = ["num_experts", "top_k", "expert_hidden", "capacity_factor"];
        assert_eq!(closest("top_kk", &moe), Some("top_k"));
        assert_eq!(closest("num_expert", &moe), Some("num_experts"));
        assert_eq!(closest("capacityfactr", &moe), Some("capacity_factor"));
        assert_eq!(closest("capacity", &moe), None);
        assert_eq!(closest("zzz", &moe), None);
        assert_eq!(closest("softmx", &["softmax", "sigmoid"]), Some("softmax"));
    }

    #[test]
    fn ties_go_to_the_first_candidate() {
        assert_eq!(closest("ab", &["ax", "xb"]), Some("ax"));
        assert_eq!(closest("ab", &["xb", "ax"]), Some("xb"));
    }
}
