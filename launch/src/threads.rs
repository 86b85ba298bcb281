//! Torch's intra-op thread count, the one setting every command that computes makes first.

/// Sets torch's intra-op threads: `configured` when positive (`trainer.threads`, a bench's
/// `--threads`), else this node's cores shared among its `ranks_on_node` ranks, so ranks on
/// one node do not fight over cores.
pub fn set_threads(configured: i64, ranks_on_node: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads_for(configured, ranks_on_node, cores));
}

/// The count [`set_threads`] sets: `configured` if positive, else `cores / ranks_on_node`,
/// at least 1.
fn threads_for(configured: i64, ranks_on_node: usize, cores: usize) -> i32 {
    let n = if configured > 0 {
        usize::try_from(configured).unwrap_or(usize::MAX)
    } else {
        cores / ranks_on_node.max(1)
    };
    i32::try_from(n.max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::threads_for;

    #[test]
    fn configured_wins_else_cores_per_rank() {
        assert_eq!(threads_for(3, 4, 16), 3);
        assert_eq!(threads_for(0, 4, 16), 4);
        assert_eq!(threads_for(-1, 1, 16), 16);
        // More ranks than cores, or no rank count: still one thread each.
        assert_eq!(threads_for(0, 8, 2), 1);
        assert_eq!(threads_for(0, 0, 2), 2);
        assert_eq!(threads_for(i64::MAX, 1, 2), i32::MAX);
    }
}
