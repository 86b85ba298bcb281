//! moe-trainer: data, optimizer and schedule, training loop, eval, metrics, checkpoints.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod decode;
pub mod distill;
pub mod error;
pub mod fault;
pub mod fused;
pub mod grad_sync;
pub mod hf;
pub mod inference;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod surgery;
pub mod tensor_bytes;
pub mod tensorboard;
pub mod tensorboard_truncate;
pub mod tokenizer;
pub mod train_loop;

pub use error::{Result, TrainError};
