//! Whether the data a config names is there, checked before a run starts (and by
//! `moe check`), so a typo in `data.path` is reported as bad input with the key and path
//! instead of failing once training has begun.

use moe_trainer::config::{DataSource, ExperimentConfig};
use moe_trainer::data::sidecar::{check_sidecar, load_configured};

/// One message per missing data file or directory, unreadable `data.tokenizer` or one that
/// does not fit `model.vocab_size`, and token data made with another tokenizer; empty when
/// the data can be read.
pub fn missing_data(cfg: &ExperimentConfig) -> Vec<String> {
    let mut errs = missing_files(cfg);
    let vocab = cfg.model.vocab_size;
    match load_configured(cfg.data.tokenizer_file(), vocab) {
        Err(e) => errs.push(e.to_string()),
        Ok(tok) => {
            if let (DataSource::Tokens, Some(dir)) = (cfg.data.source, &cfg.data.path) {
                if dir.is_dir() {
                    if let Err(e) = check_sidecar(dir, vocab, tok.as_ref()) {
                        errs.push(format!("data.path: {e}"));
                    }
                }
            }
        }
    }
    errs
}

fn missing_files(cfg: &ExperimentConfig) -> Vec<String> {
    let Some(path) = &cfg.data.path else {
        // Without a path: the synthetic corpus, or the "data.path is required" rule.
        return Vec::new();
    };
    match cfg.data.source {
        DataSource::Synthetic => Vec::new(),
        DataSource::Text if !path.is_file() => vec![format!(
            "data.path {} {} (data.source text reads one UTF-8 file)",
            path.display(),
            if path.is_dir() {
                "is a directory"
            } else {
                "does not exist"
            }
        )],
        DataSource::Text => Vec::new(),
        DataSource::Tokens if !path.is_dir() => vec![format!(
            "data.path {} {} (data.source tokens reads train.bin and val.bin from a directory; \
             `moe data prepare` writes one)",
            path.display(),
            if path.exists() {
                "is not a directory"
            } else {
                "does not exist"
            }
        )],
        DataSource::Tokens => ["train.bin", "val.bin"]
            .iter()
            .filter(|f| !path.join(f).is_file())
            .map(|f| format!("data.path {}: {f} does not exist", path.display()))
            .collect(),
    }
}
