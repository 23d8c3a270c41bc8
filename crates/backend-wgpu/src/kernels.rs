//! The WGSL kernels: one file per op family under `kernels/`, assembled per dtype, and
//! compiled once per device into compute pipelines.
//!
//! Files may have sections, started by marker lines `// @dtype NAME`, `// @cache NAME`
//! and `// @main`: the text before the first marker is always used, then the sections a
//! kernel picks. Weight kernels get `quant.wgsl`'s shared helpers plus their dtype's
//! `dequant32`.
use std::collections::HashMap;
use std::sync::Mutex;

use samepage_abi::DType;

const QUANT: &str = include_str!("kernels/quant.wgsl");
const MATMUL: &str = include_str!("kernels/matmul.wgsl");
const EMBED: &str = include_str!("kernels/embed.wgsl");
const RMSNORM: &str = include_str!("kernels/rmsnorm.wgsl");
const ROPE: &str = include_str!("kernels/rope.wgsl");
const KV_STORE: &str = include_str!("kernels/kv_store.wgsl");
const ATTENTION: &str = include_str!("kernels/attention.wgsl");
const ELEMENTWISE: &str = include_str!("kernels/elementwise.wgsl");
const SOFTMAX: &str = include_str!("kernels/softmax.wgsl");
const ARGMAX: &str = include_str!("kernels/argmax.wgsl");

/// A compiled kernel: the op, specialised by the weight or cache dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Matmul(DType),
    Embed(DType),
    RmsNorm,
    Rope,
    KvStore(DType),
    Attention(DType),
    SwiGlu,
    Add,
    Scale,
    Softmax,
    Argmax,
}

/// The section of `src` named `marker` (`"@dtype q8_0"`), or the header for `""`.
fn section<'a>(src: &'a str, marker: &str) -> &'a str {
    let mut out_start = None;
    let mut pos = 0;
    for line in src.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let is_marker = line.trim_start().starts_with("// @");
        match out_start {
            None if marker.is_empty() && is_marker => return &src[..start],
            None if !marker.is_empty() && is_marker && line.trim() == format!("// {marker}") => out_start = Some(pos),
            Some(s) if is_marker => return &src[s..start],
            _ => {}
        }
    }
    match out_start {
        Some(s) => &src[s..],
        None if marker.is_empty() => src,
        None => panic!("kernel section {marker} is missing"),
    }
}

impl Kernel {
    /// Every kernel there is (for the MSL translation test and warm-up).
    pub fn all() -> Vec<Kernel> {
        let mut v: Vec<Kernel> = DType::WEIGHTS
            .iter()
            .flat_map(|&d| [Kernel::Matmul(d), Kernel::Embed(d)])
            .collect();
        for c in [DType::F32, DType::F16] {
            v.push(Kernel::KvStore(c));
            v.push(Kernel::Attention(c));
        }
        v.extend([
            Kernel::RmsNorm,
            Kernel::Rope,
            Kernel::SwiGlu,
            Kernel::Add,
            Kernel::Scale,
            Kernel::Softmax,
            Kernel::Argmax,
        ]);
        v
    }

    /// A name that says what it computes: `matmul_q8_0`, `attention_f16`.
    pub fn name(&self) -> String {
        match self {
            Kernel::Matmul(d) => format!("matmul_{}", d.name()),
            Kernel::Embed(d) => format!("embed_{}", d.name()),
            Kernel::KvStore(d) => format!("kv_store_{}", d.name()),
            Kernel::Attention(d) => format!("attention_{}", d.name()),
            Kernel::RmsNorm => "rmsnorm".into(),
            Kernel::Rope => "rope".into(),
            Kernel::SwiGlu => "swiglu".into(),
            Kernel::Add => "add".into(),
            Kernel::Scale => "scale".into(),
            Kernel::Softmax => "softmax".into(),
            Kernel::Argmax => "argmax".into(),
        }
    }

    pub fn entry(&self) -> &'static str {
        match self {
            Kernel::SwiGlu => "swiglu",
            Kernel::Add => "add",
            Kernel::Scale => "scale",
            _ => "main",
        }
    }

    /// The WGSL source for a device (`cpu`: a CPU implementation such as lavapipe, whose
    /// invocations are SIMD lanes: the matmul uses workgroups of one 8-lane vector, so
    /// small matrices still spread over every core).
    pub fn source_for(&self, cpu: bool) -> String {
        let src = self.source();
        match self {
            Kernel::Matmul(_) if cpu => src
                .replace("const WG: u32 = 32u;", "const WG: u32 = 8u;")
                .replace("@workgroup_size(32)", "@workgroup_size(8)"),
            _ => src,
        }
    }

    /// The WGSL source (as for a GPU).
    pub fn source(&self) -> String {
        let weights = |body: &str, d: DType| {
            let dt = format!("@dtype {}", d.name());
            format!("{body}\n{}\n{}", section(QUANT, ""), section(QUANT, &dt))
        };
        let cached = |body: &str, d: DType| {
            let c = format!("@cache {}", d.name());
            format!(
                "{}\n{}\n{}",
                section(body, ""),
                section(body, &c),
                section(body, "@main")
            )
        };
        match *self {
            Kernel::Matmul(d) => weights(MATMUL, d),
            Kernel::Embed(d) => weights(EMBED, d),
            Kernel::KvStore(d) => cached(KV_STORE, d),
            Kernel::Attention(d) => cached(ATTENTION, d),
            Kernel::RmsNorm => RMSNORM.into(),
            Kernel::Rope => ROPE.into(),
            Kernel::SwiGlu | Kernel::Add | Kernel::Scale => ELEMENTWISE.into(),
            Kernel::Softmax => SOFTMAX.into(),
            Kernel::Argmax => ARGMAX.into(),
        }
    }
}

/// Compiled pipelines, built on first use.
pub(crate) struct Pipelines {
    map: Mutex<HashMap<Kernel, wgpu::ComputePipeline>>,
    cpu: bool,
}

/// Weight rows per matmul workgroup (`WG * R` in `matmul.wgsl`) for a device.
pub fn matmul_rows_per_group(cpu: bool) -> usize {
    if cpu {
        8 * 8
    } else {
        32 * 8
    }
}

impl Pipelines {
    pub fn new(cpu: bool) -> Pipelines {
        Pipelines {
            map: Mutex::new(HashMap::new()),
            cpu,
        }
    }

    pub fn get(&self, device: &wgpu::Device, k: Kernel) -> Result<wgpu::ComputePipeline, String> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&k) {
            return Ok(p.clone());
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&k.name()),
            source: wgpu::ShaderSource::Wgsl(k.source_for(self.cpu).into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&k.name()),
            layout: None,
            module: &module,
            entry_point: Some(k.entry()),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("kernel {} does not compile: {e}", k.name()));
        }
        map.insert(k, pipeline.clone());
        Ok(pipeline)
    }
}
