//! The conformance suite (tests/common/suite.rs) on the NCCL backend at world size 1, on
//! `cuda:0`. The suite builds and checks CPU tensors, so a thin wrapper moves every input to
//! the GPU and every result back: NCCL itself only ever sees CUDA tensors.
//!
//! On a machine without usable CUDA the test says so and passes, unless `MOE_REQUIRE_CUDA=1`
//! (scripts/gpu-check.sh), where it fails.

mod common;

use moe_comm::nccl::NcclComm;
use moe_comm::{Communicator, LocalComm, Result};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// A communicator that runs `inner` (on `dev`) for CPU callers.
struct OnDevice {
    inner: Box<dyn Communicator>,
    dev: Device,
}

impl OnDevice {
    fn there(&self, t: &Tensor) -> Tensor {
        t.to_device(self.dev)
    }
}

impl Communicator for OnDevice {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    /// The callers' side: CPU tensors in and out.
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        let x = self.there(input);
        let y = self.inner.all_to_all(&x, send, recv)?;
        assert_eq!(
            y.device(),
            self.dev,
            "all_to_all result on the communicator's device"
        );
        Ok(y.to_device(Device::Cpu))
    }
    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        let x = self.there(input);
        Ok(self.inner.all_reduce_sum(&x)?.to_device(Device::Cpu))
    }
    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        let x = self.there(input);
        Ok(self.inner.all_gather(&x)?.to_device(Device::Cpu))
    }
    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor> {
        let x = self.there(input);
        Ok(self.inner.broadcast(&x, root)?.to_device(Device::Cpu))
    }
    fn barrier(&mut self) -> Result<()> {
        self.inner.barrier()
    }
    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let inner = self.inner.split(color, key)?;
        Ok(Box::new(OnDevice {
            inner,
            dev: self.dev,
        }))
    }
}

#[test]
fn nccl_backend_conforms_p1() {
    let Some(dev) = moe_comm::cuda::test_cuda_device() else {
        return;
    };
    let nccl = NcclComm::new(&mut LocalComm::default(), 0, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("NCCL on {dev:?}: {e}"));
    // A CPU tensor is refused, naming both devices.
    let mut raw: Box<dyn Communicator> = Box::new(nccl);
    let e = raw
        .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
        .unwrap_err();
    assert!(e.to_string().contains("cuda:0"), "{e}");
    let mut comm = OnDevice { inner: raw, dev };
    common::suite::run(&mut comm).unwrap();
    // Dropping a communicator with nothing pending returns at once (it never waits on peers).
    let t0 = Instant::now();
    drop(comm);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t0.elapsed()
    );
}
