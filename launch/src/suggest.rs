//! "Did you mean" for misspelt keys and values: the closest candidate by optimal string
//! alignment distance (Levenshtein plus adjacent transpositions), if it is within 2 edits.

/// Largest distance at which a candidate is still suggested.
pub const MAX_SUGGEST_DISTANCE: usize = 2;

/// The candidate closest to `word`, if one is within `MAX_SUGGEST_DISTANCE` edits; the first
/// in `candidates` order wins ties.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= MAX_SUGGEST_DISTANCE)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance between `a` and `b`, counted in characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_by_hand() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("top_k", "top_k"), 0);
        assert_eq!(edit_distance("top_kk", "top_k"), 1); // one deletion
        assert_eq!(edit_distance("tpo_k", "top_k"), 1); // one transposition
        assert_eq!(edit_distance("kitten", "sitting"), 3); // classic Levenshtein example
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("lr", "eps"), 3);
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
