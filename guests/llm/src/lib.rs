//! samepage's LLM guest: a Llama-family model, its tokenizer, chat template and sampler,
//! all running in wasm32 with the weights and KV cache in the guest's own memory (the
//! compute backend's buffer). The host drives it through `sp_call` (JSON in, JSON out;
//! see api.rs for the protocol).
pub mod api;
pub mod gguf;
pub mod loader;
pub mod model;
pub mod safetensors;
pub mod sampler;
pub mod snapshot;
pub mod template;
pub mod tokenizer;

use std::alloc::{alloc, dealloc, Layout};

samepage_guest::export_abi_version!();

/// Allocate `len` bytes (8-aligned) for the host to write a request into; 0 on failure.
#[no_mangle]
pub extern "C" fn sp_alloc(len: u32) -> u32 {
    match Layout::from_size_align((len as usize).max(1), 8) {
        // SAFETY: the layout has non-zero size.
        Ok(l) => unsafe { alloc(l) as usize as u32 },
        Err(_) => 0,
    }
}

/// Free a block from [`sp_alloc`] (`len` as passed to it).
///
/// # Safety
/// `ptr` must come from `sp_alloc(len)` and not have been freed.
#[no_mangle]
pub unsafe extern "C" fn sp_free(ptr: u32, len: u32) {
    if ptr != 0 {
        if let Ok(l) = Layout::from_size_align((len as usize).max(1), 8) {
            dealloc(ptr as usize as *mut u8, l);
        }
    }
}

/// Handle the JSON request at `ptr..ptr+len`; returns `(resp_ptr << 32) | resp_len`, a
/// response allocated with [`sp_alloc`] that the host frees.
///
/// # Safety
/// `ptr..ptr+len` must be readable guest memory (the host wrote the request there).
#[no_mangle]
pub unsafe extern "C" fn sp_call(ptr: u32, len: u32) -> u64 {
    let req = std::slice::from_raw_parts(ptr as usize as *const u8, len as usize);
    let resp = api::handle(req);
    let p = sp_alloc(resp.len() as u32);
    if p == 0 {
        return 0;
    }
    std::ptr::copy_nonoverlapping(resp.as_ptr(), p as usize as *mut u8, resp.len());
    ((p as u64) << 32) | resp.len() as u64
}

/// getrandom 0.3's custom source (the `tokenizers` crate links it; nothing here needs
/// cryptographic randomness): a generator seeded from the host clock.
#[cfg(target_arch = "wasm32")]
#[no_mangle]
unsafe extern "Rust" fn __getrandom_v03_custom(dest: *mut u8, len: usize) -> Result<(), getrandom::Error> {
    let mut s = samepage_guest::clock_ns() ^ 0x9E37_79B9_7F4A_7C15;
    for i in 0..len {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *dest.add(i) = (s >> 33) as u8;
    }
    Ok(())
}
