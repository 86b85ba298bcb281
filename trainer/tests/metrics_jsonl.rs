//! `metrics.jsonl` round-trips every f64 bit for bit, one flushed JSON object per line.

use moe_trainer::metrics::{read_metrics, EvalRecord, MetricsRecord, MetricsWriter, TrainRecord};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Values whose shortest decimal form is long or unusual, plus the non-finite ones.
fn awkward(step: u64) -> TrainRecord {
    TrainRecord {
        step,
        loss: 0.1 + 0.2,
        lm_loss: 1.0 / 3.0,
        aux_loss: 1e-300,
        z_loss: f64::MIN_POSITIVE / 4.0, // subnormal
        dropped_frac: 0.0,
        load_imbalance: -0.0,
        grad_norm: f64::NAN,
        lr: f64::INFINITY,
        tokens_per_s: f64::NEG_INFINITY,
        elapsed_s: 12_345.678_901_234_567,
        distill_loss: None,
    }
}

fn bits(r: &TrainRecord) -> Vec<u64> {
    [
        r.loss,
        r.lm_loss,
        r.aux_loss,
        r.z_loss,
        r.dropped_frac,
        r.load_imbalance,
        r.grad_norm,
        r.lr,
        r.tokens_per_s,
        r.elapsed_s,
    ]
    .iter()
    .map(|v| v.to_bits())
    .collect()
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = scratch("roundtrip");
    let mut w = MetricsWriter::open(&dir, false).unwrap();
    let t = awkward(10);
    let e = EvalRecord {
        step: 10,
        val_loss: 2.0_f64.ln(),
        val_ppl: 2.0,
    };
    w.write_train(&t).unwrap();
    w.write_eval(&e).unwrap();
    // Flushed per line: visible before the writer is dropped.
    let text = std::fs::read_to_string(w.path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    for (line, kind) in lines.iter().zip(["train", "eval"]) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["kind"], kind);
        assert_eq!(v["step"], 10);
    }
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["grad_norm"], "NaN");
    assert_eq!(v["lr"], "Infinity");
    assert_eq!(v["tokens_per_s"], "-Infinity");

    let back = read_metrics(w.path()).unwrap();
    match &back[..] {
        [MetricsRecord::Train(t2), MetricsRecord::Eval(e2)] => {
            assert_eq!(bits(t2), bits(&t));
            assert_eq!(t2.step, 10);
            assert_eq!(e2, &e);
            assert_eq!(e2.val_loss.to_bits(), e.val_loss.to_bits());
        }
        other => panic!("unexpected records {other:?}"),
    }
}

#[test]
fn append_keeps_and_create_truncates() {
    let dir = scratch("append");
    let rec = TrainRecord {
        step: 1,
        loss: 5.5,
        ..Default::default()
    };
    MetricsWriter::open(&dir, false)
        .unwrap()
        .write_train(&rec)
        .unwrap();
    let mut w = MetricsWriter::open(&dir, true).unwrap();
    w.write(&MetricsRecord::Train(TrainRecord {
        step: 2,
        ..rec.clone()
    }))
    .unwrap();
    let steps: Vec<u64> = read_metrics(w.path())
        .unwrap()
        .iter()
        .map(|r| match r {
            MetricsRecord::Train(t) => t.step,
            MetricsRecord::Eval(e) => e.step,
        })
        .collect();
    assert_eq!(steps, vec![1, 2]);
    let w = MetricsWriter::open(&dir, false).unwrap();
    assert!(read_metrics(w.path()).unwrap().is_empty());
}

#[test]
fn garbled_line_is_reported_with_file_and_line() {
    let dir = scratch("garbled");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("metrics.jsonl");
    std::fs::write(
        &path,
        "{\"kind\":\"eval\",\"step\":1,\"val_loss\":1.0,\"val_ppl\":2.7}\n{\"kind\":\"tr",
    )
    .unwrap();
    let msg = read_metrics(&path).unwrap_err().to_string();
    assert!(
        msg.contains("metrics.jsonl") && msg.contains("line 2"),
        "{msg}"
    );
}
