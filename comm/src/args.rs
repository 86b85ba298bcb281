//! Argument checks shared by every backend, so all of them reject the same bad calls with the
//! same messages before touching a wire.

use crate::{CommError, Result};

/// An `InvalidArgument` error of collective `op`.
pub(crate) fn invalid(op: &'static str, msg: String) -> CommError {
    CommError::InvalidArgument { op, msg }
}

/// Checks split sizes: one per rank, non-negative; returns their sum.
pub(crate) fn check_splits(
    op: &'static str,
    splits: &[i64],
    size: usize,
    what: &str,
) -> Result<i64> {
    if splits.len() != size {
        return Err(invalid(
            op,
            format!(
                "{what} has {} entries for a group of {size} ranks",
                splits.len()
            ),
        ));
    }
    if let Some(bad) = splits.iter().find(|&&s| s < 0) {
        return Err(invalid(
            op,
            format!("{what} has a negative entry ({bad}): {splits:?}"),
        ));
    }
    Ok(splits.iter().sum())
}

/// Checks an all-to-all call: valid splits, and `send` summing to the input's rows.
/// Returns `(send_total, recv_total)`.
pub(crate) fn check_all_to_all(
    op: &'static str,
    shape: &[i64],
    send: &[i64],
    recv: &[i64],
    size: usize,
) -> Result<(i64, i64)> {
    let send_total = check_splits(op, send, size, "send_splits")?;
    let recv_total = check_splits(op, recv, size, "recv_splits")?;
    if shape.first() != Some(&send_total) {
        return Err(invalid(
            op,
            format!("input of shape {shape:?} but send_splits {send:?} sum to {send_total}"),
        ));
    }
    Ok((send_total, recv_total))
}
