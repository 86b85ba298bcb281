//! A background thread that prepares the next steps' micro-batches while the rank trains.

use super::batch::Batch;
use super::dataset::Dataset;
use super::sampler::{SamplerSpec, Split};
use crate::{Result, TrainError};
use crossbeam_channel::{bounded, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What the prefetch thread sends: one step's micro-batches, or the error that stopped it.
type Item = Result<(u64, Vec<Batch>)>;

/// Produces the training micro-batches of steps `start_step..end_step`, in order, at most
/// `capacity` steps ahead of the consumer. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Item>>,
    handle: Option<JoinHandle<()>>,
    next_step: u64,
    end_step: u64,
}

impl Prefetcher {
    /// Starts the thread. Batches are `dataset.batches(Split::Train, step, &spec)`, so they
    /// are the same as drawing them synchronously; a data error is delivered by `next` at
    /// the step it belongs to, and the thread stops there.
    pub fn new(
        dataset: Arc<Dataset>,
        spec: SamplerSpec,
        start_step: u64,
        end_step: u64,
        capacity: usize,
    ) -> Result<Self> {
        Self::pinned_for(
            dataset,
            spec,
            start_step,
            end_step,
            capacity,
            // host: batches for a CPU rank need no pinning.
            tch::Device::Cpu,
        )
    }

    /// [`Prefetcher::new`] for a rank on `device`: on CUDA the batches come in page-locked
    /// host memory, pinned on this thread, so the training thread's copy to the GPU does not
    /// block the host (see [`moe_comm::Placement::to_device`]).
    pub fn pinned_for(
        dataset: Arc<Dataset>,
        spec: SamplerSpec,
        start_step: u64,
        end_step: u64,
        capacity: usize,
        device: tch::Device,
    ) -> Result<Self> {
        spec.check()?;
        let (tx, rx) = bounded::<Item>(capacity);
        let handle = std::thread::Builder::new()
            .name("moe-prefetch".into())
            .spawn(move || {
                for step in start_step..end_step {
                    let item = dataset
                        .batches(Split::Train, step, &spec)
                        .and_then(|b| pin_all(b, device))
                        .map(|b| (step, b));
                    let failed = item.is_err();
                    // A send error means the consumer is gone: nothing left to do.
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| {
                TrainError::Other(format!("cannot start the data prefetch thread: {e}"))
            })?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            next_step: start_step,
            end_step,
        })
    }

    /// The next step and this rank's `grad_accum` micro-batches for it. Asking past
    /// `end_step` is an error, as is a thread that ended without sending.
    // Not an `Iterator`: running out is an error for the training loop, not an end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<(u64, Vec<Batch>)> {
        if self.next_step >= self.end_step {
            return Err(TrainError::Data(format!(
                "step {} requested from a prefetcher of steps ..{}",
                self.next_step, self.end_step
            )));
        }
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| TrainError::Data("prefetcher is closed".into()))?;
        let item = rx.recv().map_err(|_| {
            TrainError::Data(format!(
                "the data prefetch thread stopped before step {}",
                self.next_step
            ))
        })?;
        let (step, batches) = item?;
        self.next_step = step + 1;
        Ok((step, batches))
    }

    /// The step the next call of `next` returns.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }
}

/// The batches in page-locked memory for `device` (unchanged unless it is a GPU).
fn pin_all(batches: Vec<Batch>, device: tch::Device) -> Result<Vec<Batch>> {
    if !device.is_cuda() {
        return Ok(batches);
    }
    batches
        .into_iter()
        .map(|b| {
            Ok(Batch {
                inputs_bt: moe_comm::pin_memory(&b.inputs_bt)?,
                targets_bt: moe_comm::pin_memory(&b.targets_bt)?,
            })
        })
        .collect()
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver disconnects the channel, which wakes a thread blocked in
        // `send` on a full channel; then it can be joined without waiting for the epoch.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
