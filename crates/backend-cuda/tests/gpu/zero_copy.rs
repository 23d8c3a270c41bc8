//! The guest's pages are the GPU's: the host writes, a kernel reads and writes the same
//! addresses, the host reads the result. No copy call is ever made.
use cudarc::driver::sys;
use samepage_abi::{self as abi, hint, op as code, DType};
use samepage_backend::Backend;
use samepage_backend_cuda::{copy_calls, CudaBackend, MemoryMode};

use crate::*;

fn in_place_round_trip(gpu: &CudaBackend) {
    let (m, k) = (64usize, 256usize);
    let region = gpu.new_region(1 << 20, 4 << 20).unwrap();
    let base = region.base();
    // The host writes weights and input straight into the region.
    let mut rng = Rng::new(7);
    let w = rng.f32s(m * k);
    let x = rng.f32s(k);
    let (wo, xo, oo) = (4096u32, 4096 + 4 * (m * k) as u32, 8192 + 4 * (m * k) as u32);
    // SAFETY: all inside the 1 MiB accessible part.
    unsafe {
        std::ptr::copy_nonoverlapping(w.as_ptr(), base.add(wo as usize) as *mut f32, m * k);
        std::ptr::copy_nonoverlapping(x.as_ptr(), base.add(xo as usize) as *mut f32, k);
    }
    region.hint(0, 1 << 20, hint::WEIGHTS);
    region.hint(0, 4096, hint::HOST);
    let d = abi::Matmul {
        w: wo,
        dtype: DType::F32 as u32,
        m: m as u32,
        k: k as u32,
        x: xo,
        n: 1,
        out: oo,
        bias: 0,
        flags: 0,
    };
    let mem = region.mem();
    assert_eq!(mem.base(), base, "kernels get the region's own base address");
    gpu.run(mem, &[op(code::MATMUL, &d, region.size())]).unwrap();
    // The host reads the kernel's output at the same address.
    // SAFETY: inside the region; the run finished.
    let out = unsafe { std::slice::from_raw_parts(base.add(oo as usize) as *const f32, m) };
    let want = samepage_backend_cpu::reference::matmul(DType::F32, &f32_bytes(&w), m, k, &x, 1, None, None);
    assert!(samepage_backend_cpu::reference::rel_err(out, &want) < 1e-5);
    // Growing keeps the base and zero-fills.
    region.grow_to(2 << 20).unwrap();
    assert_eq!(region.base(), base);
    // SAFETY: now accessible.
    assert!(unsafe { std::slice::from_raw_parts(base.add(1 << 20), 1 << 20) }
        .iter()
        .all(|&b| b == 0));
    assert!(region.grow_to(8 << 20).is_err());
}

#[test]
fn managed_region_is_the_kernels_memory() {
    let Some(gpu) = cuda() else { return };
    let region = gpu.new_region(4096, 4096).unwrap();
    let mut managed: u32 = 0;
    // SAFETY: querying an attribute of our own allocation.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut managed as *mut u32 as *mut _,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
            region.base() as usize as sys::CUdeviceptr,
        )
    };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    assert_eq!(managed, 1, "the region is one managed allocation");
    in_place_round_trip(&gpu);
    assert_eq!(copy_calls(), 0);
}

#[test]
fn registered_mode_round_trip() {
    let Some(_) = cuda() else { return };
    let gpu = CudaBackend::with_mode(0, MemoryMode::Registered).expect("registered mode");
    in_place_round_trip(&gpu);
    assert_eq!(copy_calls(), 0);
}
