//! Opening a wgpu device that can adopt host memory, and importing page ranges of a
//! region as `wgpu::Buffer`s without a copy.
//!
//! Vulkan: the device is opened through wgpu-hal with `VK_EXT_external_memory_host`
//! enabled (wgpu never enables it itself); each range is bound to a `VkBuffer` through
//! `VkImportMemoryHostPointerInfoEXT` and handed to wgpu with `create_buffer_from_hal`.
//! Metal (macOS): `newBufferWithBytesNoCopy` on the same pages, see `metal.rs`.
use samepage_backend::BackendError;

/// A device with the import capability, and the limits the binding plan needs.
pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// "vulkan" or "metal".
    pub api: &'static str,
    pub adapter: String,
    /// Host pointers and sizes handed to `import` must be multiples of this.
    pub import_align: usize,
    /// `maxStorageBufferBindingSize`.
    pub max_binding: u64,
    /// `maxBufferSize` (a single imported view is at most this long).
    pub max_buffer: u64,
    /// `minStorageBufferOffsetAlignment`.
    pub storage_align: u64,
    /// `minUniformBufferOffsetAlignment`.
    pub uniform_align: u64,
    /// A CPU implementation (lavapipe): kernels are tuned for its SIMD width.
    pub cpu: bool,
    #[cfg(not(target_os = "macos"))]
    vk: vulkan::Importer,
}

#[cfg(not(target_os = "macos"))]
fn unavailable(api: &'static str, reason: impl Into<String>) -> BackendError {
    BackendError::Unavailable {
        backend: api,
        reason: reason.into(),
    }
}

impl Gpu {
    /// Import `[ptr, ptr + len)` (host memory that stays mapped while the buffer lives)
    /// as a storage buffer.
    ///
    /// # Safety
    /// `ptr` and `len` are multiples of `import_align`; the range is readable and
    /// writable and stays mapped, with the same pages, until the returned buffer is
    /// dropped and the device has finished with it.
    pub unsafe fn import(&self, ptr: *mut u8, len: usize) -> Result<wgpu::Buffer, BackendError> {
        #[cfg(not(target_os = "macos"))]
        {
            // SAFETY: forwarded contract.
            unsafe { self.vk.import(&self.device, ptr, len) }
        }
        #[cfg(target_os = "macos")]
        {
            // SAFETY: forwarded contract.
            unsafe { crate::metal::import(&self.device, ptr, len) }
        }
    }

    /// Open the first adapter that can import host memory (a hardware GPU first).
    pub fn open() -> Result<Gpu, BackendError> {
        #[cfg(not(target_os = "macos"))]
        {
            vulkan::open()
        }
        #[cfg(target_os = "macos")]
        {
            crate::metal::open()
        }
    }

    /// Fill the limits from a device's adapter limits.
    pub(crate) fn limits(l: &wgpu::Limits) -> (u64, u64, u64, u64) {
        (
            l.max_storage_buffer_binding_size,
            l.max_buffer_size,
            l.min_storage_buffer_offset_alignment as u64,
            l.min_uniform_buffer_offset_alignment as u64,
        )
    }
}

/// Rank adapters: hardware before software, so lavapipe is the fallback.
pub(crate) fn adapter_rank(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu => 0,
        wgpu::DeviceType::VirtualGpu | wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 2,
    }
}

/// Adapters of `backends`, best first. `SAMEPAGE_WGPU_ADAPTER` (a substring of the
/// adapter name) narrows the choice.
pub(crate) fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut list = pollster::block_on(instance.enumerate_adapters(backends));
    if let Ok(want) = std::env::var("SAMEPAGE_WGPU_ADAPTER") {
        let want = want.to_lowercase();
        list.retain(|a| a.get_info().name.to_lowercase().contains(&want));
    }
    list.sort_by_key(|a| adapter_rank(&a.get_info()));
    list
}

#[cfg(not(target_os = "macos"))]
mod vulkan {
    use ash::vk;
    use wgpu::hal::api::Vulkan;

    use super::{adapters, unavailable, Gpu};
    use samepage_backend::BackendError;

    const EXT: &std::ffi::CStr = ash::ext::external_memory_host::NAME;

    /// The raw handles the import needs. They borrow the wgpu device's `VkDevice`,
    /// which `Gpu` keeps alive (it owns the `wgpu::Device`).
    pub(super) struct Importer {
        dev: ash::Device,
        ext: ash::ext::external_memory_host::Device,
        mem_props: vk::PhysicalDeviceMemoryProperties,
    }

    pub(super) fn open() -> Result<Gpu, BackendError> {
        let mut last = String::from("no Vulkan adapter found (is a Vulkan driver installed?)");
        for adapter in adapters(wgpu::Backends::VULKAN) {
            match open_adapter(&adapter) {
                Ok(gpu) => return Ok(gpu),
                Err(e) => last = format!("{}: {e}", adapter.get_info().name),
            }
        }
        Err(unavailable("vulkan", last))
    }

    fn open_adapter(adapter: &wgpu::Adapter) -> Result<Gpu, String> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        // SAFETY: the adapter is a Vulkan adapter of a live instance; we only query it
        // and open a device from it, as wgpu-hal's `open` would.
        let (open, import_align) = unsafe {
            let hal = adapter.as_hal::<Vulkan>().ok_or("not a Vulkan adapter")?;
            let inst = hal.shared_instance().raw_instance();
            let phd = hal.raw_physical_device();
            let exts = inst
                .enumerate_device_extension_properties(phd)
                .map_err(|e| e.to_string())?;
            if !exts.iter().any(|e| e.extension_name_as_c_str() == Ok(EXT)) {
                return Err("the driver lacks VK_EXT_external_memory_host".into());
            }
            let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
            let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut host);
            inst.get_physical_device_properties2(phd, &mut props);
            let align = host.min_imported_host_pointer_alignment as usize;
            let open = hal
                .open_with_callback(
                    wgpu::Features::empty(),
                    &limits,
                    &wgpu::MemoryHints::Performance,
                    Some(Box::new(|args| args.extensions.push(EXT))),
                )
                .map_err(|e| e.to_string())?;
            (open, align)
        };
        let desc = wgpu::DeviceDescriptor {
            label: Some("samepage"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        };
        // SAFETY: `open` was created from this adapter with no extra features.
        let (device, queue) =
            unsafe { adapter.create_device_from_hal::<Vulkan>(open, &desc) }.map_err(|e| e.to_string())?;
        // SAFETY: device is a Vulkan device; the handles are cloned function tables over
        // the VkDevice that `device` owns and outlives every use (Gpu keeps both).
        let vk = unsafe {
            let hal = device.as_hal::<Vulkan>().ok_or("not a Vulkan device")?;
            let inst = hal.shared_instance().raw_instance();
            let dev = hal.raw_device().clone();
            Importer {
                ext: ash::ext::external_memory_host::Device::new(inst, &dev),
                mem_props: inst.get_physical_device_memory_properties(hal.raw_physical_device()),
                dev,
            }
        };
        let (max_binding, max_buffer, storage_align, uniform_align) = Gpu::limits(&device.limits());
        Ok(Gpu {
            device,
            queue,
            api: "vulkan",
            cpu: info.device_type == wgpu::DeviceType::Cpu,
            adapter: info.name,
            import_align: import_align.max(4096),
            max_binding,
            max_buffer,
            storage_align,
            uniform_align,
            vk,
        })
    }

    impl Importer {
        /// # Safety
        /// As [`Gpu::import`].
        pub(super) unsafe fn import(
            &self,
            device: &wgpu::Device,
            ptr: *mut u8,
            len: usize,
        ) -> Result<wgpu::Buffer, BackendError> {
            let err = |what: &str, e: vk::Result| {
                BackendError::Other(format!(
                    "importing {len} bytes at {ptr:p} as a Vulkan buffer: {what}: {e}"
                ))
            };
            let handle_type = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
            let mut host_props = vk::MemoryHostPointerPropertiesEXT::default();
            // SAFETY: valid device and out-struct; ptr is a host allocation (contract).
            unsafe {
                (self.ext.fp().get_memory_host_pointer_properties_ext)(
                    self.dev.handle(),
                    handle_type,
                    ptr as *const std::ffi::c_void,
                    &mut host_props,
                )
            }
            .result()
            .map_err(|e| err("vkGetMemoryHostPointerPropertiesEXT", e))?;
            let usage = vk::BufferUsageFlags::STORAGE_BUFFER
                | vk::BufferUsageFlags::TRANSFER_SRC
                | vk::BufferUsageFlags::TRANSFER_DST;
            let mut ext_info = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle_type);
            let info = vk::BufferCreateInfo::default()
                .size(len as u64)
                .usage(usage)
                .sharing_mode(vk::SharingMode::EXCLUSIVE)
                .push_next(&mut ext_info);
            // SAFETY: a plain buffer creation on our device.
            let buf = unsafe { self.dev.create_buffer(&info, None) }.map_err(|e| err("vkCreateBuffer", e))?;
            // SAFETY: buf is ours.
            let req = unsafe { self.dev.get_buffer_memory_requirements(buf) };
            let bits = req.memory_type_bits & host_props.memory_type_bits;
            // Prefer host-coherent memory: no flushes needed on either side.
            let pick = |want: vk::MemoryPropertyFlags| {
                (0..self.mem_props.memory_type_count).find(|&i| {
                    bits & (1 << i) != 0 && self.mem_props.memory_types[i as usize].property_flags.contains(want)
                })
            };
            let Some(type_index) =
                pick(vk::MemoryPropertyFlags::HOST_COHERENT).or_else(|| pick(vk::MemoryPropertyFlags::empty()))
            else {
                // SAFETY: buf is unused.
                unsafe { self.dev.destroy_buffer(buf, None) };
                return Err(err(
                    "no memory type accepts this host pointer",
                    vk::Result::ERROR_UNKNOWN,
                ));
            };
            let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
                .handle_type(handle_type)
                .host_pointer(ptr as *mut std::ffi::c_void);
            let alloc = vk::MemoryAllocateInfo::default()
                .allocation_size(len as u64)
                .memory_type_index(type_index)
                .push_next(&mut import);
            // SAFETY: ptr/len are aligned host memory that outlives the allocation (contract).
            let mem = match unsafe { self.dev.allocate_memory(&alloc, None) } {
                Ok(m) => m,
                Err(e) => {
                    // SAFETY: buf is unused.
                    unsafe { self.dev.destroy_buffer(buf, None) };
                    return Err(err("vkAllocateMemory(import host pointer)", e));
                }
            };
            // SAFETY: fresh buffer and memory of the right size.
            if let Err(e) = unsafe { self.dev.bind_buffer_memory(buf, mem, 0) } {
                // SAFETY: both unused.
                unsafe {
                    self.dev.destroy_buffer(buf, None);
                    self.dev.free_memory(mem, None);
                }
                return Err(err("vkBindBufferMemory", e));
            }
            // SAFETY: buf/mem belong to this device; wgpu-hal takes ownership and
            // destroys both when the wgpu buffer is dropped.
            let hal = unsafe { wgpu::hal::vulkan::Buffer::from_raw_managed(buf, mem, 0, len as u64) };
            let desc = wgpu::BufferDescriptor {
                label: Some("samepage region"),
                size: len as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            };
            // SAFETY: the hal buffer was created on this device with matching usage.
            Ok(unsafe { device.create_buffer_from_hal::<Vulkan>(hal, &desc) })
        }

        /// Record a barrier that makes shader writes visible to host reads (the Vulkan
        /// memory model needs it on non-coherent hardware; wgpu does not emit one).
        pub(super) fn host_read_barrier(&self, encoder: &mut wgpu::CommandEncoder) {
            let barrier = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::HOST_READ);
            // SAFETY: we record one barrier into the open command buffer and do not end it.
            unsafe {
                encoder.as_hal_mut::<Vulkan, _, _>(|enc| {
                    if let Some(enc) = enc {
                        self.dev.cmd_pipeline_barrier(
                            enc.raw_handle(),
                            vk::PipelineStageFlags::COMPUTE_SHADER,
                            vk::PipelineStageFlags::HOST,
                            vk::DependencyFlags::empty(),
                            &[barrier],
                            &[],
                            &[],
                        );
                    }
                })
            }
        }
    }
}

impl Gpu {
    /// Record, into an otherwise empty encoder submitted after the work, a barrier that
    /// makes earlier shader writes visible to the host once the submission completes
    /// (a no-op where the API does it, as on Metal with shared storage).
    pub fn host_read_barrier(&self, encoder: &mut wgpu::CommandEncoder) {
        #[cfg(not(target_os = "macos"))]
        self.vk.host_read_barrier(encoder);
        #[cfg(target_os = "macos")]
        let _ = encoder;
    }
}
