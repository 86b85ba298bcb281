//! How `moe` reports the error that ends it: `error: <message>` on stderr, written with one
//! `write(2)`. `eprintln!` writes its pieces one by one (stderr is unbuffered), so under
//! mpirun, where every rank fails alike and writes to the same terminal or pipe, the pieces of
//! several ranks interleaved into `error: error: <message>` `<message>`. Under an MPI launcher
//! with several processes the line also names the rank (`rank 1 of 3: error: ...`), as the
//! training loop's own rank errors do.

use std::io::Write;

/// The text of the error line(s) for `msg`; `rank` is `(rank, size)` under a launcher with
/// more than one process.
pub fn format(msg: &str, rank: Option<(i64, i64)>) -> String {
    match rank {
        Some((r, n)) if n > 1 => format!("rank {r} of {n}: error: {msg}\n"),
        _ => format!("error: {msg}\n"),
    }
}

/// Prints `e` (its whole chain, `{:#}`) as one write to stderr; errors writing it are
/// ignored (nobody is left to tell).
pub fn print(e: &anyhow::Error) {
    let rank = crate::world::launcher_processes().map(|n| (crate::world::launcher_rank(), n));
    print_text(&format(&format!("{e:#}"), rank));
}

/// Prints `e` for MPI rank `rank` of `size` (known from MPI itself), as one write.
pub fn print_rank(e: &anyhow::Error, rank: i64, size: i64) {
    print_text(&format(&format!("{e:#}"), Some((rank, size))));
}

fn print_text(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_prefix_and_the_rank_under_a_launcher() {
        assert_eq!(format("bad", None), "error: bad\n");
        assert_eq!(format("bad", Some((0, 1))), "error: bad\n");
        assert_eq!(
            format("a\n  b", Some((2, 3))),
            "rank 2 of 3: error: a\n  b\n"
        );
    }
}
