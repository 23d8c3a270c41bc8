//! The sampler runs on the host, between GPU segments, on the same pages the GPU wrote
//! (the logits are read in place, not copied back). It is the CPU backend's op, the ABI's
//! reference sampler, so every backend draws the same token from the same RNG state.
use samepage_abi as abi;
use samepage_backend::{Mem, OpError};

pub(crate) fn sample(mem: Mem, s: &abi::Sample) -> Result<(), OpError> {
    samepage_backend_cpu::sample_op(&mem, s)
}
