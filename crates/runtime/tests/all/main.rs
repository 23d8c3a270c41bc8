//! The runtime's integration tests, one binary (as Wasmtime does).
//!
//! Most tests drive `guests/testops`, which must be built first:
//! `scripts/build-guests.sh -p testops`.
mod abi;
mod app;
mod bad_input;
mod files;
mod ops;
mod state;
mod support;
mod traps;
mod zero_copy;
