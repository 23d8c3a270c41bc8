//! Recorded op lists as CUDA graphs: captured from the stream at the first launch
//! (when the region's device base is known), then replayed unchanged every launch.
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result, sys, CudaGraph};
use samepage_backend::{Graph, Mem, Op, OpError};

use crate::exec::{self, cuda_err, KCtx, Scratch, StatusWord};
use crate::{stage, Inner};

struct Captured {
    base: u64,
    graph: CudaGraph,
}

/// One launch of a recorded list: an op, or `len` ops fused at record time.
#[derive(Clone, Copy, Debug)]
enum Step {
    One(usize),
    /// An rmsnorm, 1-3 single-token matvecs over one x, a gate/up swiglu (`exec::mv_step`):
    /// one pipelined launch where it applies, else the parts.
    Mv(exec::MvStep),
    /// rope(q), rope(k), kv_store of one token (`exec::rope_kv_fusable`) as one launch.
    RopeKv(usize),
    /// rope(q), rope(k), kv_store, attention of one token (`exec::rope_kv_attn_fusable`).
    RopeKvAttn(usize),
}

/// Fuse what can be fused without changing results; `SAMEPAGE_CUDA_FUSE=0` turns it off.
/// rope(q), rope(k), kv_store (and attention) of one token first, then matvec steps.
fn plan(ops: &[Op]) -> Vec<Step> {
    let fuse = std::env::var("SAMEPAGE_CUDA_FUSE").as_deref() != Ok("0");
    // `SAMEPAGE_CUDA_FUSE_ROPE_KV=0`: only this fusion off (A/B in one binary).
    let rope_kv = fuse && std::env::var("SAMEPAGE_CUDA_FUSE_ROPE_KV").as_deref() != Ok("0");
    // `SAMEPAGE_CUDA_FUSE_ATTN=0`: rope/kv_store not fused with the attention after them.
    let rope_kv_attn = rope_kv && std::env::var("SAMEPAGE_CUDA_FUSE_ATTN").as_deref() != Ok("0");
    let writes: Vec<(u64, u64)> = ops.iter().flat_map(stage::writes).collect();
    let mut steps = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        if rope_kv_attn && i + 4 <= ops.len() && exec::rope_kv_attn_fusable(&ops[i..i + 4]) {
            steps.push(Step::RopeKvAttn(i));
            i += 4;
            continue;
        }
        if rope_kv && i + 3 <= ops.len() && exec::rope_kv_fusable(&ops[i..i + 3]) {
            steps.push(Step::RopeKv(i));
            i += 3;
            continue;
        }
        if let Some(s) = exec::mv_step(ops, i, &writes).filter(|_| fuse) {
            steps.push(Step::Mv(s));
            i += s.ops();
            continue;
        }
        steps.push(Step::One(i));
        i += 1;
    }
    steps
}

/// `SAMEPAGE_CUDA_TRACE=1`: per-launch host timestamps and the graph's GPU time (events),
/// summed and printed to stderr every 64 launches. `=2` also times each op once (the 16th
/// launch runs the steps one by one, between events, instead of the graph). `=3`: the
/// timeline of the 16th launch (the graph itself): when each step's kernels started,
/// were released by their PDL wait, and ended (`TlGuard` in common.cuh).
struct Trace {
    level: u32,
    ev: [sys::CUevent; 2],
    last_wait_end: Option<Instant>,
    launch_start: Option<Instant>,
    count: u32,
    /// gap (wait end -> next launch), launch (host), wait (host), gpu, wall (launch to launch)
    sums: [f64; 5],
    profiled: bool,
}

impl Trace {
    fn new() -> Option<Trace> {
        let level: u32 = std::env::var("SAMEPAGE_CUDA_TRACE").ok()?.parse().ok()?;
        if level == 0 {
            return None;
        }
        let f = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let ev = [result::event::create(f).ok()?, result::event::create(f).ok()?];
        Some(Trace {
            level,
            ev,
            last_wait_end: None,
            launch_start: None,
            count: 0,
            sums: [0.0; 5],
            profiled: false,
        })
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        for e in self.ev {
            // SAFETY: created in `new`; the owner synchronised the stream before dropping.
            let _ = unsafe { result::event::destroy(e) };
        }
    }
}

/// `SAMEPAGE_CUDA_TRACE=3`: device memory for the timeline words (8 per op), reset
/// before the 16th launch and printed after it. (Managed memory written by the host
/// before the launch made the first kernel that touched it wait ~100 us for the page.)
struct Timeline {
    ptr: u64,
    pending: bool,
}

impl Drop for Timeline {
    fn drop(&mut self) {
        // SAFETY: allocated in `CudaOpGraph::new`; the graph synchronised its stream first.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A decode step's staged per-token words (`stage`): the device buffer, what goes in it,
/// and each step's slot map.
struct Staged {
    buf: u64,
    list: stage::TokStage,
    tmaps: Vec<u32>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // SAFETY: allocated in `CudaOpGraph::new`; the graph synchronised its stream first.
        let _ = unsafe { result::free_sync(self.buf) };
    }
}

/// The decode megakernel's run of steps (`mega_plan`): steps `first..last` are one launch
/// of `mega_<dt>_<cache dt>` (`kernel`: its index in `Kernels::mega`) over the phases in
/// `buf` (managed memory, written here once: the barrier words, then the phases).
struct MegaRun {
    first: usize,
    last: usize,
    kernel: usize,
    buf: u64,
    n: u32,
}

/// The phases' offset in [`MegaRun::buf`] (the barrier words come first).
const MEGA_PH_OFF: u64 = 256;

impl Drop for MegaRun {
    fn drop(&mut self) {
        // SAFETY: allocated in `mega_plan`; the graph synchronised its stream first.
        let _ = unsafe { result::free_sync(self.buf) };
    }
}

pub(crate) struct CudaOpGraph {
    inner: Arc<Inner>,
    ops: Vec<Op>,
    steps: Vec<Step>,
    staged: Option<Staged>,
    mega: Option<MegaRun>,
    trace: Option<Trace>,
    timeline: Option<Timeline>,
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
        let steps = plan(&ops);
        let staged = if stage::enabled() {
            let reads: Vec<Vec<u32>> = steps
                .iter()
                .map(|&s| match s {
                    Step::One(i) => stage::reads(&ops[i]),
                    Step::Mv(_) => Vec::new(),
                    // rope_kv's slots: q.positions, k.positions, kv_store.pos.
                    Step::RopeKv(i) => [&ops[i], &ops[i + 1], &ops[i + 2]]
                        .into_iter()
                        .flat_map(stage::reads)
                        .collect(),
                    // Slots: q.positions, k.positions, kv_store.pos, attention.pos.
                    Step::RopeKvAttn(i) => ops[i..i + 4].iter().flat_map(stage::reads).collect(),
                })
                .collect();
            let (list, tmaps) = stage::plan(&ops, &reads);
            if list.n > 0 {
                // SAFETY: a plain device allocation, freed by `Staged::drop`.
                let buf = unsafe { result::malloc_sync(4 * stage::MAX_WORDS) }
                    .map_err(|e| cuda_err("allocating the staged words", e))?;
                Some(Staged { buf, list, tmaps })
            } else {
                None
            }
        } else {
            None
        };
        let trace = Trace::new();
        let timeline = match trace.as_ref() {
            Some(t) if t.level >= 3 => {
                // SAFETY: a plain device allocation, freed by `Timeline::drop`.
                let ptr = unsafe { result::malloc_sync(64 * ops.len().max(1)) }
                    .map_err(|e| cuda_err("allocating the timeline", e))?;
                Some(Timeline { ptr, pending: false })
            }
            _ => None,
        };
        Ok(CudaOpGraph {
            inner,
            steps,
            staged,
            mega: None,
            trace,
            timeline,
            ops,
            status,
            scratch,
            captured: None,
            in_flight: false,
        })
    }

    fn capture(&mut self, base: u64) -> Result<CudaGraph, OpError> {
        // With the megakernel: a previous run may still read the old phases, and the new
        // ones are written from the host: both after the stream's work (once per capture;
        // without it, capture waits for nothing).
        if self.mega.is_some() || self.inner.mega.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = self.inner.stream.synchronize();
            self.mega = None;
        }
        self.mega = self.mega_plan(base)?;
        let inner = &self.inner;
        let stream = &inner.stream;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("beginning stream capture", e))?;
        // Always end the capture, so the stream leaves capture mode: also when a launch
        // panics (the runtime catches it and the backend must stay usable).
        struct EndCapture<'a>(&'a Arc<cudarc::driver::CudaStream>, bool);
        impl Drop for EndCapture<'_> {
            fn drop(&mut self) {
                if self.1 {
                    let _ = self.0.end_capture(sys::CUgraphInstantiate_flags(0));
                }
            }
        }
        let mut guard = EndCapture(stream, true);
        let _pdl = exec::PdlScope::new(self.ops.iter().all(exec::single_token));
        let mut res = self.launch_stage(base);
        for (j, &step) in self.steps.iter().enumerate() {
            if res.is_err() {
                break;
            }
            res = match self.mega.as_ref() {
                Some(m) if j == m.first => self.launch_mega(base, m),
                Some(m) if j > m.first && j < m.last => Ok(()),
                _ => self.launch_step(base, j, step),
            };
        }
        guard.1 = false;
        let g = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        res?;
        let g = g.map_err(|e| cuda_err("instantiating the graph", e))?;
        g.ok_or_else(|| OpError::runtime("cuda: stream capture produced no graph"))
    }
}

impl CudaOpGraph {
    fn ctx(&self, base: u64, op: usize) -> KCtx {
        KCtx {
            tl: self.timeline.as_ref().map_or(0, |t| t.ptr),
            ..KCtx::new(
                base,
                self.status.dev(),
                self.scratch.ptr(),
                self.scratch.counters(),
                op as u32,
            )
        }
    }

    /// The run of steps the decode megakernel takes (cu/mega.cu), with its phases written
    /// to a managed buffer and moved to the GPU; `None` where it does not apply: not
    /// switched on (`SAMEPAGE_CUDA_MEGA=1`, `CudaBackend::set_megakernel`), below sm_90,
    /// not a single-token graph, or no run of matvec steps (`exec::mega_mv_phase`, of one
    /// dtype) and fused attention steps (`exec::mega_attn_phase`) with an attention and at
    /// least three steps.
    fn mega_plan(&self, base: u64) -> Result<Option<MegaRun>, OpError> {
        let inner = &self.inner;
        let k = &inner.kernels;
        let on = inner.mega.load(std::sync::atomic::Ordering::Relaxed);
        if !on || k.mega.iter().all(Option::is_none) || !self.ops.iter().all(exec::single_token) {
            return Ok(None);
        }
        let blocks = k.sms;
        let dt = self.steps.iter().find_map(|s| match *s {
            Step::Mv(m) => match self.ops[m.at + m.norm as usize] {
                Op::Matmul(mm) => samepage_abi::DType::from_u32(mm.dtype),
                _ => None,
            },
            _ => None,
        });
        let Some(dt) = dt.filter(|d| matches!(d, samepage_abi::DType::F16 | samepage_abi::DType::BF16)) else {
            return Ok(None);
        };
        let bf16 = dt == samepage_abi::DType::BF16;
        let phase = |j: usize| -> Option<exec::MegaPhase> {
            let step = self.steps[j];
            let (first, span) = Self::step_span(step);
            let mut ph = match step {
                Step::Mv(s) => exec::mega_mv_phase(base, &self.ops[span], s, dt, blocks)?,
                Step::RopeKvAttn(_) => exec::mega_attn_phase(&self.ctx(base, first), &self.ops[span], blocks)?,
                _ => return None,
            };
            ph.op = first as u32;
            ph.tmap = self.staged.as_ref().map_or(u32::MAX, |st| st.tmaps[j]);
            Some(ph)
        };
        // The longest run of steps that are phases, with an attention in it.
        let (mut best, mut cur): (Option<(usize, usize)>, Option<usize>) = (None, None);
        let mut phases: Vec<Option<exec::MegaPhase>> = (0..self.steps.len()).map(phase).collect();
        phases.push(None);
        for (j, p) in phases.iter().enumerate() {
            match (p, cur) {
                (Some(_), None) => cur = Some(j),
                (None, Some(f)) => {
                    let attn = phases[f..j].iter().flatten().any(|p| p.kind == 1);
                    if attn && j - f >= 3 && best.is_none_or(|(a, b)| j - f > b - a) {
                        best = Some((f, j));
                    }
                    cur = None;
                }
                _ => {}
            }
        }
        let Some((first, last)) = best else {
            return Ok(None);
        };
        let list: Vec<exec::MegaPhase> = phases[first..last].iter().flatten().copied().collect();
        // One cache dtype for all attention phases (a kernel each).
        let f16 = list.iter().filter(|p| p.kind == 1).map(|p| p.f16).max().unwrap_or(0);
        if list.iter().any(|p| p.kind == 1 && p.f16 != f16) {
            return Ok(None);
        }
        let kernel = 2 * bf16 as usize + f16 as usize;
        if k.mega[kernel].is_none() {
            return Ok(None);
        }
        let size = std::mem::size_of::<exec::MegaPhase>();
        // Whole 64 KiB pages, for the placement advice.
        let bytes = (MEGA_PH_OFF as usize + list.len() * size).next_multiple_of(1 << 16);
        // SAFETY: a managed allocation of `bytes`, freed by `MegaRun::drop`; the host
        // writes it (zeroed barrier words, then the phases) before any launch reads it.
        let buf = unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(|e| cuda_err("allocating the megakernel's phases", e))?;
        let run = MegaRun {
            first,
            last,
            kernel,
            buf,
            n: list.len() as u32,
        };
        // SAFETY: `buf` is `bytes` of managed memory that no launch uses yet (the stream was
        // synchronised), writable from the host; MegaPhase is plain old data, `list` holds `list.len() * size` bytes.
        unsafe {
            let p = buf as *mut u8;
            std::ptr::write_bytes(p, 0, MEGA_PH_OFF as usize);
            std::ptr::copy_nonoverlapping(
                list.as_ptr() as *const u8,
                p.add(MEGA_PH_OFF as usize),
                list.len() * size,
            );
        }
        inner.advise(buf, bytes, crate::hint::DEVICE);
        inner.queue_prefetch(buf, bytes);
        inner.flush_prefetch();
        crate::count_mega();
        Ok(Some(run))
    }

    /// Launch the megakernel for `m` (one block per SM; `c.op`: its first step's).
    fn launch_mega(&self, base: u64, m: &MegaRun) -> Result<(), OpError> {
        let inner = &self.inner;
        crate::prefill::forget_x();
        let (first, _) = Self::step_span(self.steps[m.first]);
        let mut c = self.ctx(base, first);
        if let Some(st) = self.staged.as_ref() {
            c.tok = st.buf;
        }
        let Some(f) = inner.kernels.mega[m.kernel].as_ref() else {
            return Err(OpError::runtime("cuda: the megakernel is not loaded"));
        };
        let mut lc = exec::cfg(inner.kernels.sms as u64, 288)?;
        lc.shared_mem_bytes = crate::kernels::MEGA_SMEM;
        let p = exec::Mega {
            ph: m.buf + MEGA_PH_OFF,
            bar: m.buf,
            n: m.n,
            pad: 0,
        };
        exec::go(&inner.stream, f, c, p, lc, "mega")
    }

    /// The step's first launch: its per-token words to the device (`stage`), if any.
    fn launch_stage(&self, base: u64) -> Result<(), OpError> {
        // Every recording (and profiled run) starts here: no converted x carries over.
        crate::prefill::forget_x();
        let Some(st) = self.staged.as_ref() else {
            return Ok(());
        };
        let c = KCtx {
            tok: st.buf,
            ..self.ctx(base, 0)
        };
        exec::go(
            &self.inner.stream,
            &self.inner.kernels.stage_tok,
            c,
            st.list,
            exec::cfg(1, 32)?,
            "stage_tok",
        )
    }

    fn launch_step(&self, base: u64, j: usize, step: Step) -> Result<(), OpError> {
        let inner = &self.inner;
        let (first, span) = Self::step_span(step);
        let ops = &self.ops[span];
        if !matches!(step, Step::One(_)) {
            crate::prefill::forget_x(); // (launch_op forgets it itself)
        }
        let mut c = self.ctx(base, first);
        if let Some(st) = self.staged.as_ref() {
            c.tok = st.buf;
            c.tmap = st.tmaps[j];
        }
        match step {
            Step::One(_) => {
                if self.sample_reads_early(first) {
                    c.aux |= exec::SAMPLE_PRE;
                }
                exec::launch_op(&inner.kernels, &inner.stream, c, &ops[0])
            }
            Step::Mv(s) => exec::launch_mv(&inner.kernels, &inner.stream, c, ops, s),
            Step::RopeKv(_) => exec::launch_rope_kv(&inner.kernels, &inner.stream, c, ops),
            Step::RopeKvAttn(_) => {
                // Slots 0 and 2: rope(q).positions and kv_store.pos.
                let staged = |slot: u32| (c.tmap >> (8 * slot)) & 0xff != 0xff;
                let early = staged(0) && staged(2) && self.tok_ready_early(j);
                exec::launch_rope_kv_attn(&inner.kernels, &inner.stream, c, ops, early, self.after_quant_mv(j))
            }
        }
    }

    /// Whether the sample op `ops[i]` may read its params, history and RNG state before its
    /// PDL wait (`SAMPLE_PRE` in cu/sample.cu): no other op of the graph writes them (the
    /// sampler itself writes the RNG state, after reading it). With
    /// `SAMEPAGE_CUDA_SAMPLE_PRE=0` never.
    fn sample_reads_early(&self, i: usize) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("SAMEPAGE_CUDA_SAMPLE_PRE").as_deref() != Ok("0"));
        let Op::Sample(s) = self.ops[i] else {
            return false;
        };
        let read = [
            (
                s.params as u64,
                s.params as u64 + std::mem::size_of::<samepage_abi::SampleParams>() as u64,
            ),
            (s.history as u64, s.history as u64 + s.history_cap as u64 * 4),
            (s.rng as u64, s.rng as u64 + 8),
        ];
        on && !self
            .ops
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .flat_map(|(_, op)| stage::writes(op))
            .any(|w| read.iter().any(|&r| exec::overlap(w, r)))
    }

    /// Whether step `j` follows a matvec step of quantized W.
    fn after_quant_mv(&self, j: usize) -> bool {
        match j.checked_sub(1).map(|i| self.steps[i]) {
            Some(Step::Mv(s)) => matches!(
                self.ops.get(s.at + s.norm as usize),
                Some(Op::Matmul(m)) if samepage_abi::DType::from_u32(m.dtype).is_some_and(exec::quantized)
            ),
            _ => false,
        }
    }

    /// Whether the staged per-token words are written before step `j`'s kernel can start
    /// (so it may read them ahead of its PDL wait). A kernel starts once the one before it
    /// has triggered; most trigger after their own wait, which returns once everything
    /// before them has finished. The matvec kernels may trigger first (mvp, MV_EARLY), so
    /// some step before `j` must be one that waits first: then every kernel before that
    /// step, the staging kernel included, has finished when `j` starts. With
    /// `SAMEPAGE_CUDA_ATTN_EARLY=0` never.
    fn tok_ready_early(&self, j: usize) -> bool {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("SAMEPAGE_CUDA_ATTN_EARLY").as_deref() == Ok("0")) {
            return false;
        }
        self.steps[..j].iter().any(|s| match *s {
            Step::Mv(_) => false,
            Step::One(i) => !matches!(self.ops[i], Op::Matmul(_)),
            Step::RopeKv(_) | Step::RopeKvAttn(_) => true,
        })
    }

    /// A step's name in traces: the op, or what was fused.
    fn step_name(&self, step: Step) -> String {
        match step {
            Step::One(i) => match self.ops[i] {
                Op::Matmul(m) => format!("matvec m={} k={}", m.m, m.k),
                ref op => op.name().to_string(),
            },
            Step::Mv(s) => match self.ops[s.at + s.norm as usize] {
                Op::Matmul(m) => format!(
                    "{}matvec x{}{} k={} m0={}",
                    if s.norm { "rmsnorm+" } else { "" },
                    s.len,
                    if s.swiglu { "+swiglu" } else { "" },
                    m.k,
                    m.m
                ),
                _ => "matvecs".into(),
            },
            Step::RopeKv(_) => "rope+rope+kv_store".into(),
            Step::RopeKvAttn(_) => "rope+rope+kv_store+attention".into(),
        }
    }

    /// The op index a step's kernels carry (`KCtx::op`: the kv_store's for the rope
    /// fusions), and the ops the step runs.
    fn step_span(step: Step) -> (usize, std::ops::Range<usize>) {
        match step {
            Step::One(i) => (i, i..i + 1),
            Step::Mv(s) => (s.at, s.at..s.at + s.ops()),
            Step::RopeKv(i) => (i + 2, i..i + 3),
            Step::RopeKvAttn(i) => (i + 2, i..i + 4),
        }
    }

    /// Trace level 3: the timeline of the launch that just finished (`TlGuard` in
    /// common.cuh), one line per step, times in us from the first kernel's start.
    fn print_timeline(&self, tl: &Timeline) {
        let mut w = vec![0u64; 8 * self.ops.len()];
        // SAFETY: device memory of 8 words per op, the stream synchronised.
        if let Err(e) = unsafe { result::memcpy_dtoh_sync(&mut w, tl.ptr) } {
            eprintln!("cuda timeline: reading it back failed: {e:?}");
            return;
        }
        let t0 = w.chunks(8).map(|c| c[0]).min().unwrap_or(0);
        let us = |t: u64| {
            if t == u64::MAX || t == 0 {
                f64::NAN
            } else {
                (t - t0) as f64 / 1e3
            }
        };
        eprintln!("cuda timeline (us): step, start, wait released first..last, end, end - prev end; name");
        let mut prev_end = 0.0;
        let mut by: Vec<(String, f64, u32)> = Vec::new();
        for (j, &step) in self.steps.iter().enumerate() {
            // A step's kernels may carry any of its ops' indices (a quantized matvec step
            // with the rmsnorm fused: its first matvec's; a step run as its parts: each
            // part's): the slots of all its ops, merged (slots no kernel wrote are neutral).
            let mut c = [u64::MAX, u64::MAX, 0, 0, 0, 0, 0, 0];
            for o in Self::step_span(step).1 {
                let s = &w[8 * o..8 * o + 8];
                c[0] = c[0].min(s[0]);
                c[1] = c[1].min(s[1]);
                c[2] = c[2].max(s[2]);
                c[3] = c[3].max(s[3]);
                if c[4..].iter().all(|&m| m == 0) {
                    c[4..].copy_from_slice(&s[4..]);
                }
            }
            let (st, w0, w1, en) = (us(c[0]), us(c[1]), us(c[2]), us(c[3]));
            let name = self.step_name(step);
            let marks: String = c[4..]
                .iter()
                .filter(|&&m| m != 0)
                .map(|&m| format!(" m{:.2}", us(m)))
                .collect();
            eprintln!(
                "  {j:>3} {st:>9.2} {w0:>9.2}..{w1:<9.2} {en:>9.2} {:>7.2}  {name}{marks}",
                en - prev_end
            );
            match by.iter_mut().find(|b| b.0 == name) {
                Some(b) => {
                    b.1 += en - prev_end;
                    b.2 += 1
                }
                None => by.push((name, en - prev_end, 1)),
            }
            prev_end = en;
        }
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        eprintln!("cuda timeline by step kind (end - previous end, summed): total {prev_end:.1} us");
        for (name, t, n) in by {
            eprintln!("  {t:>8.1} us  {n:>4} x  {name}");
        }
    }

    /// Trace level 2: run the steps one by one between events (in place of one graph
    /// launch: the same work once) and print each op kind's GPU time.
    fn profile_steps(&self, base: u64) -> Result<(), OpError> {
        let st = self.inner.stream.cu_stream();
        let f = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let evs: Vec<sys::CUevent> = (0..=self.steps.len())
            .map(|_| result::event::create(f))
            .collect::<Result<_, _>>()
            .map_err(|e| cuda_err("creating events", e))?;
        let mut res = Ok(());
        // SAFETY: fresh events recorded on our stream.
        unsafe { result::event::record(evs[0], st) }.map_err(|e| cuda_err("event", e))?;
        self.launch_stage(base)?;
        for (j, &step) in self.steps.iter().enumerate() {
            res = self.launch_step(base, j, step);
            if res.is_err() {
                break;
            }
            // SAFETY: as above.
            unsafe { result::event::record(evs[j + 1], st) }.map_err(|e| cuda_err("event", e))?;
        }
        self.inner
            .stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        let mut by: Vec<(String, f64, u32)> = Vec::new();
        let mut total = 0.0;
        if res.is_ok() {
            for (j, &step) in self.steps.iter().enumerate() {
                // SAFETY: both events completed (the stream was synchronised).
                let ms = unsafe { result::event::elapsed(evs[j], evs[j + 1]) }.unwrap_or(0.0) as f64;
                let name = self.step_name(step);
                total += ms;
                match by.iter_mut().find(|b| b.0 == name) {
                    Some(b) => {
                        b.1 += ms;
                        b.2 += 1
                    }
                    None => by.push((name, ms, 1)),
                }
            }
        }
        for e in evs {
            // SAFETY: created above, idle.
            let _ = unsafe { result::event::destroy(e) };
        }
        res?;
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        eprintln!(
            "cuda profile: {} ops as {} launches, eager total {:.1} us",
            self.ops.len(),
            self.steps.len(),
            total * 1e3
        );
        for (name, ms, n) in by {
            eprintln!("  {:>8.1} us  {:>4} x  {}", ms * 1e3, n, name);
        }
        Ok(())
    }
}

impl Graph for CudaOpGraph {
    fn launch(&mut self, mem: Mem) -> Result<(), OpError> {
        if self.in_flight {
            self.wait()?;
        }
        let t_enter = Instant::now();
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
        if let Some(t) = self.trace.as_mut() {
            if let Some(prev) = t.last_wait_end {
                t.sums[0] += t_enter.duration_since(prev).as_secs_f64();
            }
            if let Some(prev) = t.launch_start {
                t.sums[4] += t_enter.duration_since(prev).as_secs_f64();
            }
            t.launch_start = Some(t_enter);
            if t.level == 2 && !t.profiled && t.count == 16 {
                t.profiled = true;
                self.profile_steps(base)?;
                self.in_flight = true;
                return Ok(());
            }
            // SAFETY: our events, our stream.
            let _ = unsafe { result::event::record(t.ev[0], inner.stream.cu_stream()) };
            if let Some(tl) = self.timeline.as_mut().filter(|_| t.count == 16) {
                let w: Vec<u64> = (0..self.ops.len())
                    .flat_map(|_| [u64::MAX, u64::MAX, 0, 0, 0, 0, 0, 0])
                    .collect();
                // SAFETY: device memory of 8 words per op; the GPU is idle (waited).
                unsafe { result::memcpy_htod_sync(tl.ptr, &w) }.map_err(|e| cuda_err("resetting the timeline", e))?;
                tl.pending = true;
            }
        }
        let c = self.captured.as_ref().expect("captured above");
        c.graph.launch().map_err(|e| cuda_err("launching the graph", e))?;
        if let Some(t) = self.trace.as_mut() {
            // SAFETY: as above.
            let _ = unsafe { result::event::record(t.ev[1], inner.stream.cu_stream()) };
            t.sums[1] += t_enter.elapsed().as_secs_f64();
        }
        self.in_flight = true;
        Ok(())
    }

    fn wait(&mut self) -> Result<(), OpError> {
        if !self.in_flight {
            return Ok(());
        }
        self.in_flight = false;
        let t0 = Instant::now();
        self.inner
            .stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        if let Some(tl) = self.timeline.as_ref().filter(|t| t.pending) {
            self.print_timeline(tl);
        }
        if let Some(tl) = self.timeline.as_mut() {
            tl.pending = false;
        }
        if let Some(t) = self.trace.as_mut() {
            let now = Instant::now();
            t.sums[2] += now.duration_since(t0).as_secs_f64();
            // SAFETY: both events completed (synchronised above); after a profiled step
            // they hold the previous launch's times, close enough for a mean.
            t.sums[3] += unsafe { result::event::elapsed(t.ev[0], t.ev[1]) }.unwrap_or(0.0) as f64 * 1e-3;
            t.last_wait_end = Some(now);
            t.count += 1;
            if t.count % 64 == 0 {
                let us = |x: f64| x / 64.0 * 1e6;
                eprintln!(
                    "cuda trace ({} ops, {} launches/step), mean of 64 steps: wall {:.1} us = guest/runtime gap {:.1} + launch {:.1} + wait {:.1}; GPU (graph, events) {:.1} us",
                    self.ops.len(),
                    self.steps.len(),
                    us(t.sums[4]),
                    us(t.sums[0]),
                    us(t.sums[1]),
                    us(t.sums[2]),
                    us(t.sums[3])
                );
                t.sums = [0.0; 5];
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_abi as abi;

    fn rope_kv_ops(v: u32) -> Vec<Op> {
        let rope = |x, h| {
            Op::Rope(abi::Rope {
                x,
                n: 1,
                n_heads: h,
                head_dim: 64,
                n_rot: 64,
                mode: abi::ROPE_HALF,
                positions: 0,
                freq_base: 10000.0,
                ..Default::default()
            })
        };
        let s = abi::KvStore {
            k: 8192,
            v,
            n: 1,
            n_kv_heads: 2,
            head_dim: 64,
            k_cache: 1 << 16,
            v_cache: 1 << 17,
            cache_dtype: samepage_abi::DType::F32 as u32,
            ctx: 16,
            pos: 0,
        };
        vec![rope(4096, 8), rope(8192, 2), Op::KvStore(s)]
    }

    fn gate_up_swiglu(out: u32) -> Vec<Op> {
        let mm = |w, o| {
            Op::Matmul(abi::Matmul {
                w,
                dtype: samepage_abi::DType::BF16 as u32,
                m: 64,
                k: 32,
                x: 1 << 20,
                n: 1,
                out: o,
                ..Default::default()
            })
        };
        let s = abi::SwiGlu {
            gate: 1 << 21,
            up: 1 << 22,
            out,
            len: 64,
        };
        vec![mm(0, 1 << 21), mm(1 << 16, 1 << 22), Op::SwiGlu(s)]
    }

    /// gate, up, swiglu fuse when swiglu writes in place or apart from what the matvecs
    /// read; not when its output lands on x.
    #[test]
    fn plan_pairs_gate_up_swiglu_only_when_safe() {
        for out in [1 << 21, 1 << 22, 1 << 23] {
            let want = exec::MvStep {
                at: 0,
                norm: false,
                len: 2,
                swiglu: true,
                w_fixed: true,
                nw_fixed: false,
            };
            assert!(matches!(plan(&gate_up_swiglu(out))[..], [Step::Mv(s)] if s == want));
        }
        assert!(matches!(
            plan(&gate_up_swiglu(1 << 20))[..],
            [
                Step::Mv(exec::MvStep {
                    len: 2,
                    swiglu: false,
                    ..
                }),
                Step::One(2)
            ]
        ));
    }

    /// An rmsnorm joins the matvecs that read its output, but not in place; a W that an
    /// op of the graph writes is not fixed (the pipelined kernel must not read it early).
    #[test]
    fn plan_fuses_rmsnorm_and_marks_written_weights() {
        let norm = |x, out| {
            Op::RmsNorm(abi::RmsNorm {
                x,
                weight: 3 << 20,
                out,
                n: 1,
                dim: 32,
                eps: 1e-5,
            })
        };
        let mut ops = vec![norm(5 << 20, 1 << 20)];
        ops.extend(gate_up_swiglu(1 << 21));
        let want = exec::MvStep {
            at: 0,
            norm: true,
            len: 2,
            swiglu: true,
            w_fixed: true,
            nw_fixed: true,
        };
        assert!(matches!(plan(&ops)[..], [Step::Mv(s)] if s == want));
        // An op that writes the norm weight: the step still fuses, the weight is not fixed.
        let mut wn = ops.clone();
        wn.push(Op::Scale(abi::Scale {
            x: 1 << 23,
            out: 3 << 20,
            len: 4,
            scale: 1.0,
        }));
        assert!(matches!(
            plan(&wn)[..],
            [
                Step::Mv(exec::MvStep {
                    norm: true,
                    w_fixed: true,
                    nw_fixed: false,
                    ..
                }),
                Step::One(4)
            ]
        ));
        // At the end of the list (the output head).
        assert!(matches!(
            plan(&ops[..2])[..],
            [Step::Mv(exec::MvStep {
                norm: true,
                len: 1,
                swiglu: false,
                ..
            })]
        ));
        ops[0] = norm(1 << 20, 1 << 20);
        assert!(matches!(
            plan(&ops)[..],
            [
                Step::One(0),
                Step::Mv(exec::MvStep {
                    at: 1,
                    norm: false,
                    swiglu: true,
                    ..
                })
            ]
        ));
        ops[0] = norm(5 << 20, 1 << 20);
        ops.push(Op::Scale(abi::Scale {
            x: 1 << 23,
            out: 0,
            len: 4,
            scale: 1.0,
        }));
        assert!(matches!(
            plan(&ops)[..],
            [
                Step::Mv(exec::MvStep {
                    norm: true,
                    w_fixed: false,
                    ..
                }),
                Step::One(4)
            ]
        ));
    }

    /// The guest's rope(q), rope(k), kv_store(k, v) fuse; with v inside q they don't.
    #[test]
    fn plan_fuses_rope_kv_store_only_when_disjoint() {
        assert!(matches!(plan(&rope_kv_ops(12288))[..], [Step::RopeKv(0)]));
        assert!(matches!(
            plan(&rope_kv_ops(4096 + 256))[..],
            [Step::One(0), Step::One(1), Step::One(2)]
        ));
    }
}
