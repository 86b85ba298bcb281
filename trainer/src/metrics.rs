//! `metrics.jsonl`: one JSON object per line, written by rank 0 and flushed line by line so a
//! crash loses at most the line being written.
//!
//! Every line has a `"kind"` of `"train"` or `"eval"`. Floats are written with the shortest
//! representation that parses back to the same `f64` (serde_json's ryu), so two runs (e.g.
//! uninterrupted vs resumed) can be compared bit for bit. JSON has no NaN or infinity: those
//! are written as the strings `"NaN"`, `"Infinity"` and `"-Infinity"` and read back as such.

use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the metrics file inside `run.out_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Global (all-rank) statistics of one optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimizer steps completed (1 after the first step).
    pub step: u64,
    /// `lm_loss + aux_loss + z_loss (+ distill_loss)`, mean over ranks and micro-batches.
    #[serde(with = "json_f64")]
    pub loss: f64,
    /// Next-token cross-entropy (nats).
    #[serde(with = "json_f64")]
    pub lm_loss: f64,
    /// Load-balancing loss, summed over MoE layers (already times its coefficient).
    #[serde(with = "json_f64")]
    pub aux_loss: f64,
    /// Router z-loss, summed over MoE layers (already times its coefficient).
    #[serde(with = "json_f64")]
    pub z_loss: f64,
    /// Fraction of token-to-expert assignments dropped by capacity, over all ranks.
    #[serde(with = "json_f64")]
    pub dropped_frac: f64,
    /// max / mean tokens per expert of the worst MoE layer (1 is perfectly balanced).
    #[serde(with = "json_f64")]
    pub load_imbalance: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "json_f64")]
    pub grad_norm: f64,
    /// Learning rate used for this step.
    #[serde(with = "json_f64")]
    pub lr: f64,
    /// Global training throughput since the previous logged step.
    #[serde(with = "json_f64")]
    pub tokens_per_s: f64,
    /// Seconds since this invocation of the run started.
    #[serde(with = "json_f64")]
    pub elapsed_s: f64,
    /// `trainer.distill`: `alpha * T^2 * KL(teacher || student)`, mean over ranks and
    /// micro-batches (included in `loss`); absent without a teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_loss: Option<f64>,
}

/// One evaluation on the validation split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps completed when the eval ran.
    pub step: u64,
    /// Mean next-token cross-entropy on the validation batches (nats).
    #[serde(with = "json_f64")]
    pub val_loss: f64,
    /// `exp(val_loss)`.
    #[serde(with = "json_f64")]
    pub val_ppl: f64,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    /// `{"kind":"train",...}`
    Train(TrainRecord),
    /// `{"kind":"eval",...}`
    Eval(EvalRecord),
}

/// The borrowed twin of [`MetricsRecord`], so writing needs no clone.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum RecordRef<'a> {
    Train(&'a TrainRecord),
    Eval(&'a EvalRecord),
}

/// Appends records to `<out_dir>/metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `<out_dir>/metrics.jsonl`, creating `out_dir`. `append` keeps earlier lines (a
    /// resumed run); otherwise the file starts empty.
    pub fn open(out_dir: &Path, append: bool) -> Result<Self> {
        std::fs::create_dir_all(out_dir).map_err(|e| TrainError::io(out_dir, e))?;
        let path = out_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { file, path })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a train record.
    pub fn write_train(&mut self, rec: &TrainRecord) -> Result<()> {
        self.write_line(&RecordRef::Train(rec))
    }

    /// Appends an eval record.
    pub fn write_eval(&mut self, rec: &EvalRecord) -> Result<()> {
        self.write_line(&RecordRef::Eval(rec))
    }

    /// Appends any record.
    pub fn write(&mut self, rec: &MetricsRecord) -> Result<()> {
        match rec {
            MetricsRecord::Train(r) => self.write_train(r),
            MetricsRecord::Eval(r) => self.write_eval(r),
        }
    }

    fn write_line(&mut self, rec: &RecordRef<'_>) -> Result<()> {
        let mut line = serde_json::to_vec(rec)
            .map_err(|e| TrainError::Other(format!("serialising a metrics record: {e}")))?;
        line.push(b'\n');
        // One write per line, unbuffered: the line reaches the file before this returns.
        self.file
            .write_all(&line)
            .map_err(|e| TrainError::io(&self.path, e))?;
        self.file.flush().map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Reads every record of a metrics file; errors name the file and the 1-based line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainError::File {
                path: path.to_path_buf(),
                msg: format!("line {}: not a metrics record: {e}", i + 1),
            })
        })
        .collect()
}

/// Serde for an `f64` field that round-trips exactly, including NaN and the infinities.
mod json_f64 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64Visitor)
    }

    struct F64Visitor;

    impl Visitor<'_> for F64Visitor {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }
}
