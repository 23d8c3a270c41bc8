//! Recorded graphs. Pipelines, parameters and bind groups are built once; a launch only
//! encodes the prebuilt dispatches into a fresh command buffer (wgpu does not resubmit
//! command buffers) and submits it. Per-token values are read by the kernels from the
//! region, so nothing is rewritten between launches.
use std::sync::Arc;

use samepage_abi as abi;
use samepage_backend::{Graph, Mem, Op, OpError};

use crate::device::Gpu;
use crate::kernels::Pipelines;
use crate::plan::{plan, Dispatch, Limits};
use crate::region::WgpuRegion;
use crate::Registry;

enum Segment {
    /// Dispatches, in order.
    Gpu(Vec<(Dispatch, wgpu::ComputePipeline, u64)>),
    /// An op run on the host, on the same pages, between GPU segments.
    Host(abi::Sample),
}

/// Bind groups for one region.
struct Bound {
    region: Arc<WgpuRegion>,
    groups: Vec<Vec<wgpu::BindGroup>>,
}

pub struct WgpuGraph {
    gpu: Arc<Gpu>,
    registry: Arc<Registry>,
    ops: Vec<Op>,
    segments: Vec<Segment>,
    /// All dispatches' parameters, one `uniform_align` slot each.
    params: Option<wgpu::Buffer>,
    bound: Option<Bound>,
    in_flight: Option<(Arc<WgpuRegion>, wgpu::SubmissionIndex)>,
}

impl WgpuGraph {
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        pipelines: &Pipelines,
        registry: Arc<Registry>,
        lim: Limits,
        ops: Vec<Op>,
    ) -> Result<WgpuGraph, OpError> {
        let slot = gpu.uniform_align.max(16) as usize;
        let mut bytes: Vec<u8> = Vec::new();
        let mut segments = Vec::new();
        let mut current = Vec::new();
        for op in &ops {
            if let Op::Sample(s) = op {
                if !current.is_empty() {
                    segments.push(Segment::Gpu(std::mem::take(&mut current)));
                }
                segments.push(Segment::Host(*s));
                continue;
            }
            for d in plan(op, lim)? {
                let p = pipelines.get(&gpu.device, d.kernel).map_err(OpError::unsupported)?;
                let at = bytes.len() as u64;
                bytes.extend(d.params.iter().flat_map(|w| w.to_le_bytes()));
                bytes.resize(bytes.len().div_ceil(slot) * slot, 0);
                current.push((d, p, at));
            }
        }
        if !current.is_empty() {
            segments.push(Segment::Gpu(current));
        }
        let params = (!bytes.is_empty()).then(|| {
            use wgpu::util::DeviceExt;
            // The ops' constant shapes and offsets, written once; tensors are never copied.
            gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("samepage params"),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
        });
        Ok(WgpuGraph {
            gpu,
            registry,
            ops,
            segments,
            params,
            bound: None,
            in_flight: None,
        })
    }

    fn bind(&mut self, region: &Arc<WgpuRegion>) -> Result<(), OpError> {
        if self.bound.as_ref().is_some_and(|b| b.region.id == region.id) {
            return Ok(());
        }
        let dev = &self.gpu.device;
        let align = self.gpu.storage_align as usize;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut groups = Vec::new();
        for seg in &self.segments {
            let mut g = Vec::new();
            if let Segment::Gpu(ds) = seg {
                for (d, pipeline, at) in ds {
                    let mut bufs = Vec::new();
                    for b in &d.bindings {
                        let (buf, vstart) = region
                            .view_for(b.start, b.end)
                            .map_err(|e| OpError::runtime(format!("{}: {e}", d.kernel.name())))?;
                        let lo = (b.start - vstart) / align * align;
                        let hi = (b.end - vstart).div_ceil(4) * 4;
                        bufs.push((b.slot, buf, lo as u64, (hi - lo) as u64));
                    }
                    let params = self.params.as_ref().expect("dispatches have parameters");
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: params,
                            offset: *at,
                            size: wgpu::BufferSize::new((d.params.len() * 4).div_ceil(16) as u64 * 16),
                        }),
                    }];
                    for (slot, buf, off, size) in &bufs {
                        entries.push(wgpu::BindGroupEntry {
                            binding: *slot,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: buf,
                                offset: *off,
                                size: wgpu::BufferSize::new(*size),
                            }),
                        });
                    }
                    if d.status {
                        entries.push(wgpu::BindGroupEntry {
                            binding: 7,
                            resource: region.status.buffer.as_entire_binding(),
                        });
                    }
                    g.push(dev.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&d.kernel.name()),
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    }));
                }
            }
            groups.push(g);
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(OpError::runtime(format!("binding the region failed: {e}")));
        }
        self.bound = Some(Bound {
            region: region.clone(),
            groups,
        });
        Ok(())
    }

    fn submit(&self, seg: usize) -> wgpu::SubmissionIndex {
        let bound = self.bound.as_ref().expect("bound before submit");
        let Segment::Gpu(ds) = &self.segments[seg] else {
            unreachable!("a GPU segment")
        };
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for ((d, pipeline, _), group) in ds.iter().zip(&bound.groups[seg]) {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(d.groups, 1, 1);
            }
        }
        // wgpu forbids mixing raw and wgpu commands in one encoder: the barrier gets its own.
        let mut barrier = self.gpu.device.create_command_encoder(&Default::default());
        self.gpu.host_read_barrier(&mut barrier);
        self.gpu.queue.submit([enc.finish(), barrier.finish()])
    }

    fn finish(&self, region: &WgpuRegion, idx: wgpu::SubmissionIndex) -> Result<(), OpError> {
        self.gpu
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: None,
            })
            .map_err(|e| OpError::runtime(format!("waiting for the GPU: {e}")))?;
        let flags = region.status.take();
        if flags & 1 != 0 {
            return Err(OpError::runtime(
                "kv_store/attention: the position read from guest memory plus n exceeds the cache; nothing was written",
            ));
        }
        if flags & 2 != 0 {
            return Err(OpError::runtime(
                "embed: a token id read from guest memory is past the vocabulary; its row was not written",
            ));
        }
        Ok(())
    }
}

impl Graph for WgpuGraph {
    fn launch(&mut self, mem: Mem) -> Result<(), OpError> {
        if let Some((region, idx)) = self.in_flight.take() {
            self.finish(&region, idx)?;
        }
        let region = self.registry.find(mem.base()).ok_or_else(|| {
            OpError::new(
                abi::status::BAD_STATE,
                "this memory is not a region of this wgpu backend",
            )
        })?;
        self.bind(&region)?;
        for seg in 0..self.segments.len() {
            match &self.segments[seg] {
                Segment::Gpu(_) => {
                    let idx = self.submit(seg);
                    if seg + 1 == self.segments.len() {
                        self.in_flight = Some((region.clone(), idx));
                    } else {
                        self.finish(&region, idx)?;
                    }
                }
                Segment::Host(s) => crate::sample::sample(mem, s)?,
            }
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<(), OpError> {
        match self.in_flight.take() {
            Some((region, idx)) => self.finish(&region, idx),
            None => Ok(()),
        }
    }

    fn ops(&self) -> &[Op] {
        &self.ops
    }
}

impl Drop for WgpuGraph {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}
