//! Recorded op lists as CUDA graphs: captured from the stream at the first launch
//! (when the region's device base is known), then replayed unchanged every launch.
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph};
use samepage_backend::{Graph, Mem, Op, OpError};

use crate::exec::{self, cuda_err, KCtx, Scratch, StatusWord};
use crate::Inner;

struct Captured {
    base: u64,
    graph: CudaGraph,
}

pub(crate) struct CudaOpGraph {
    inner: Arc<Inner>,
    ops: Vec<Op>,
    status: StatusWord,
    scratch: Scratch,
    captured: Option<Captured>,
    in_flight: bool,
}

// SAFETY: the graph handles are used by one owner at a time (Graph takes &mut self),
// and CUDA graph objects may move between threads.
unsafe impl Send for CudaOpGraph {}

impl CudaOpGraph {
    pub(crate) fn new(inner: Arc<Inner>, ops: Vec<Op>) -> Result<CudaOpGraph, OpError> {
        if let Some(op) = ops.iter().find(|op| !exec::supports(op)) {
            return Err(OpError::unsupported(format!(
                "cuda: {} with these shapes is not supported",
                op.name()
            )));
        }
        inner
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let status = StatusWord::new().map_err(|e| cuda_err("allocating a status word", e))?;
        let mut scratch = Scratch::empty();
        let need = ops.iter().map(exec::scratch_bytes).max().unwrap_or(0);
        if need > 0 {
            scratch.ensure(need).map_err(|e| cuda_err("allocating scratch", e))?;
        }
        Ok(CudaOpGraph {
            inner,
            ops,
            status,
            scratch,
            captured: None,
            in_flight: false,
        })
    }

    fn capture(&mut self, base: u64) -> Result<CudaGraph, OpError> {
        let inner = &self.inner;
        let stream = &inner.stream;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("beginning stream capture", e))?;
        let _pdl = exec::PdlScope::new(self.ops.iter().all(exec::single_token));
        let mut res = Ok(());
        for (i, op) in self.ops.iter().enumerate() {
            let c = KCtx {
                base,
                status: self.status.dev(),
                scratch: self.scratch.ptr(),
                op: i as u32,
                aux: 0,
            };
            res = exec::launch_op(&inner.kernels, stream, c, op);
            if res.is_err() {
                break;
            }
        }
        // Always end the capture, so the stream leaves capture mode.
        let g = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        res?;
        let g = g.map_err(|e| cuda_err("instantiating the graph", e))?;
        g.ok_or_else(|| OpError::runtime("cuda: stream capture produced no graph"))
    }
}

impl Graph for CudaOpGraph {
    fn launch(&mut self, mem: Mem) -> Result<(), OpError> {
        if self.in_flight {
            self.wait()?;
        }
        let inner = self.inner.clone();
        let _q = inner.enqueue.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let base = inner.device_base(&mem);
        if self.captured.as_ref().map(|c| c.base) != Some(base) {
            self.captured = None;
            let graph = self.capture(base)?;
            self.captured = Some(Captured { base, graph });
        }
        self.status.reset();
        inner.flush_prefetch();
        let c = self.captured.as_ref().expect("captured above");
        c.graph.launch().map_err(|e| cuda_err("launching the graph", e))?;
        self.in_flight = true;
        Ok(())
    }

    fn wait(&mut self) -> Result<(), OpError> {
        if !self.in_flight {
            return Ok(());
        }
        self.in_flight = false;
        self.inner
            .stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        self.status.check(&self.ops)
    }

    fn ops(&self) -> &[Op] {
        &self.ops
    }
}

impl Drop for CudaOpGraph {
    fn drop(&mut self) {
        // The scratch and status word must outlive any launch still running.
        let _ = self.inner.stream.synchronize();
    }
}
