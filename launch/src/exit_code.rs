//! Exit status: 2 for input the user must fix (config, arguments), 1 for a run that failed.

use crate::config_load::ConfigError;
use std::fmt;

/// Bad input that is not a config error (a missing checkpoint, an unsupported option); the
/// binary exits with 2 on it, as on a `ConfigError`.
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// A trainer error as the binary reports it: a config the rules reject, data that cannot be
/// used, or a checkpoint that is damaged or does not fit the model is input to fix (2);
/// anything else failed the run (1).
pub fn from_train(e: moe_trainer::TrainError) -> anyhow::Error {
    use moe_trainer::TrainError;
    match e {
        TrainError::Config(_) | TrainError::Data(_) | TrainError::Checkpoint { .. } => {
            BadInput(e.to_string()).into()
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// 2 if any error in the chain is bad input, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let bad = err
        .chain()
        .any(|e| e.is::<ConfigError>() || e.is::<BadInput>());
    if bad {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_anywhere_in_the_chain_is_2() {
        let e = anyhow::Error::new(BadInput("x".into())).context("while starting");
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), 1);
    }
}
