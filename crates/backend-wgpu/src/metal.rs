//! Metal (macOS): the region's pages become an `MTLBuffer` through
//! `newBufferWithBytesNoCopy` (shared storage, no copy), wrapped into wgpu with
//! `create_buffer_from_hal`. The view scheme in `region.rs` covers `maxBufferLength`
//! smaller than the region with overlapping views, as ggml-metal does.
use std::ffi::c_void;
use std::ptr::NonNull;

use objc2_metal::{MTLDevice, MTLResourceOptions};
use samepage_backend::BackendError;
use wgpu::hal::api::Metal;

use crate::device::{adapters, Gpu};

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        16384
    }
}

pub(crate) fn open() -> Result<Gpu, BackendError> {
    let unavailable = |reason: String| BackendError::Unavailable {
        backend: "metal",
        reason,
    };
    let adapter = adapters(wgpu::Backends::METAL)
        .into_iter()
        .next()
        .ok_or_else(|| unavailable("no Metal device found".into()))?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    let desc = wgpu::DeviceDescriptor {
        label: Some("samepage"),
        required_features: wgpu::Features::empty(),
        required_limits: limits,
        ..Default::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| unavailable(e.to_string()))?;
    let (max_binding, mut max_buffer, storage_align, uniform_align) = Gpu::limits(&device.limits());
    // SAFETY: a Metal device; we only read a limit.
    if let Some(hal) = unsafe { device.as_hal::<Metal>() } {
        max_buffer = max_buffer.min(hal.raw_device().maxBufferLength() as u64);
    }
    Ok(Gpu {
        device,
        queue,
        api: "metal",
        cpu: info.device_type == wgpu::DeviceType::Cpu,
        adapter: info.name,
        // Apple Silicon pages are 16 KiB; newBufferWithBytesNoCopy wants whole pages.
        import_align: page_size().max(16384),
        max_binding,
        max_buffer,
        storage_align,
        uniform_align,
    })
}

/// # Safety
/// As [`Gpu::import`]: page-aligned, whole pages, mapped until the buffer is dropped.
pub(crate) unsafe fn import(device: &wgpu::Device, ptr: *mut u8, len: usize) -> Result<wgpu::Buffer, BackendError> {
    let err = |what: &str| BackendError::Other(format!("importing {len} bytes at {ptr:p} as a Metal buffer: {what}"));
    // SAFETY: a Metal device (open() made it).
    let hal = unsafe { device.as_hal::<Metal>() }.ok_or_else(|| err("not a Metal device"))?;
    let nn = NonNull::new(ptr as *mut c_void).ok_or_else(|| err("null pointer"))?;
    // SAFETY: ptr/len are page-aligned host memory that outlives the buffer (contract);
    // no deallocator: the region owns the pages.
    let raw = unsafe {
        hal.raw_device().newBufferWithBytesNoCopy_length_options_deallocator(
            nn,
            len,
            MTLResourceOptions::StorageModeShared,
            None,
        )
    }
    .ok_or_else(|| err("newBufferWithBytesNoCopy returned nil"))?;
    drop(hal);
    // SAFETY: the buffer belongs to this device and is `len` bytes long.
    let hal_buf = unsafe { wgpu::hal::metal::Device::buffer_from_raw(raw, len as u64) };
    let desc = wgpu::BufferDescriptor {
        label: Some("samepage region"),
        size: len as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    };
    // SAFETY: the hal buffer was created on this device.
    Ok(unsafe { device.create_buffer_from_hal::<Metal>(hal_buf, &desc) })
}
