//! Fault injection for the resilience tests: `MOE_FAULT=<kind>@<rank>:<step>[,...]` makes world
//! rank `rank` misbehave at the start of optimizer step `step` (1-based, as logged).
//!
//! Kinds: `error` (the rank returns an error, as on bad data), `nan` (the step's loss becomes
//! NaN, exercising the skip-bad-step path), `exit` (the process exits with code 3 without
//! cleanup), `kill` (SIGKILL to itself), `panic` (a Rust panic on the rank's thread).
//! The library never reads the environment: the `moe` binary parses `MOE_FAULT` once and
//! passes the faults in `RunOptions::faults` (empty in normal runs).

use crate::{Result, TrainError};

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Error,
    Nan,
    Exit,
    Kill,
    Panic,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    pub step: u64,
}

/// Parses `kind@rank:step[,kind@rank:step...]`.
pub fn parse(spec: &str) -> Result<Vec<Fault>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let bad = || {
                TrainError::Other(format!(
                    "MOE_FAULT item {item:?} must be <error|nan|exit|kill|panic>@<rank>:<step>"
                ))
            };
            let (kind, at) = item.trim().split_once('@').ok_or_else(bad)?;
            let (rank, step) = at.split_once(':').ok_or_else(bad)?;
            let kind = match kind {
                "error" => FaultKind::Error,
                "nan" => FaultKind::Nan,
                "exit" => FaultKind::Exit,
                "kill" => FaultKind::Kill,
                "panic" => FaultKind::Panic,
                _ => return Err(bad()),
            };
            Ok(Fault {
                kind,
                rank: rank.parse().map_err(|_| bad())?,
                step: step.parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// Whether a `kill` fault is due for (`rank`, `step`): the loop then lets the checkpoints of
/// earlier steps land first, so what survives the SIGKILL does not depend on how busy the
/// machine is (a kill in the middle of a write is covered by the checkpoint fault tests).
pub fn kills_at(faults: &[Fault], rank: usize, step: u64) -> bool {
    faults
        .iter()
        .any(|f| f.rank == rank && f.step == step && f.kind == FaultKind::Kill)
}

/// Triggers the faults for (`rank`, `step`). Returns whether the step's loss must be NaN.
pub fn trigger(faults: &[Fault], rank: usize, step: u64) -> Result<bool> {
    let mut nan = false;
    for f in faults.iter().filter(|f| f.rank == rank && f.step == step) {
        match f.kind {
            FaultKind::Error => {
                return Err(TrainError::Other(format!(
                    "injected fault (MOE_FAULT) on rank {rank} at step {step}"
                )))
            }
            FaultKind::Nan => nan = true,
            FaultKind::Exit => {
                eprintln!("rank {rank}: injected exit (MOE_FAULT) at step {step}");
                std::process::exit(3)
            }
            FaultKind::Kill => {
                // SAFETY: raising a signal on our own process has no memory-safety preconditions.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            FaultKind::Panic => panic!("injected panic (MOE_FAULT) on rank {rank} at step {step}"),
        }
    }
    Ok(nan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_and_rejects_garbage() {
        let f = parse("error@1:3,nan@0:2").unwrap();
        assert_eq!(
            f[0],
            Fault {
                kind: FaultKind::Error,
                rank: 1,
                step: 3
            }
        );
        assert_eq!(
            f[1],
            Fault {
                kind: FaultKind::Nan,
                rank: 0,
                step: 2
            }
        );
        assert!(parse("boom@1:3").is_err());
        assert!(parse("error@x:3").is_err());
        assert!(parse("error1:3").is_err());
        assert!(trigger(&f, 1, 3).is_err());
        assert!(trigger(&f, 0, 2).unwrap());
        assert!(!trigger(&f, 0, 3).unwrap());
    }
}
