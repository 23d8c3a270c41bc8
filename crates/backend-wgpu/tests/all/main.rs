//! The wgpu backend's tests, in one binary: per-op conformance against the CPU backend,
//! the zero-copy proof, and the WGSL -> MSL translation of every kernel.
//! Without a Vulkan device they print "skipped" and pass, unless SAMEPAGE_REQUIRE_GPU=1.
mod common;
mod conformance;
mod msl;
mod zero_copy;
