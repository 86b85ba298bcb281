//! The size-1 communicator: every collective is the identity.

use crate::{check_device, CommError, Communicator, Result};
use tch::{Device, Tensor};

/// A group of one rank, moving tensors of one device.
#[derive(Debug, Clone, Copy)]
pub struct LocalComm {
    device: Device,
}

impl LocalComm {
    /// A size-1 group on `device`.
    pub fn on(device: Device) -> Self {
        Self { device }
    }
}

impl Default for LocalComm {
    /// A size-1 group on the CPU.
    fn default() -> Self {
        // host: the default is the CPU rank's group.
        Self::on(Device::Cpu)
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn device(&self) -> Device {
        self.device
    }
    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        check_device("all_to_all", "input", input, self.device)?;
        let rows = input.size().first().copied().unwrap_or(0);
        if send != [rows] || recv != [rows] {
            return Err(CommError::InvalidArgument {
                op: "all_to_all",
                msg: format!("size-1 group with {rows} rows got send {send:?}, recv {recv:?}"),
            });
        }
        Ok(input.f_contiguous()?.f_detach_copy()?)
    }
    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        check_device("all_reduce_sum", "input", input, self.device)?;
        Ok(input.f_detach_copy()?)
    }
    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        check_device("all_gather", "input", input, self.device)?;
        Ok(input.f_unsqueeze(0)?.f_detach_copy()?)
    }
    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor> {
        check_device("broadcast", "input", input, self.device)?;
        if root != 0 {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                msg: format!("root {root} in a group of size 1"),
            });
        }
        Ok(input.f_detach_copy()?)
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn split(&mut self, _color: usize, _key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(*self))
    }
}
