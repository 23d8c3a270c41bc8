//! The CUDA C kernels (`src/cu/*`), compiled once per process by NVRTC for the
//! device's architecture, and the loaded functions.
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};
use samepage_abi::DType;

/// The kernel source: one translation unit, no headers (NVRTC has no toolkit here).
pub const SOURCE: &str = concat!(
    include_str!("cu/common.cuh"),
    include_str!("cu/quant.cuh"),
    include_str!("cu/ops.cu"),
    include_str!("cu/matmul.cu"),
    include_str!("cu/mvp.cu"),
    include_str!("cu/attention.cu"),
    include_str!("cu/mega.cu"),
    include_str!("cu/sample.cu"),
    include_str!("cu/gemm.cu"),
    include_str!("cu/attention_prefill.cu"),
);

/// Weight dtypes in `samepage_abi::DType` order (F32 = 0 .. Q6_K = 9), as kernel suffixes.
pub const DTYPE_SUFFIX: [&str; 10] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k",
];

const NVRTC_OPTIONS: [&str; 2] = ["--std=c++17", "-default-device"];

/// NVRTC's options: the fixed ones, and `-D` for each word of `SAMEPAGE_CUDA_DEFINE`
/// (a developer switch for A/B runs of compile-time variants, e.g. `SP_NO_EVICT_FIRST`).
fn nvrtc_options() -> Vec<String> {
    options_with(&std::env::var("SAMEPAGE_CUDA_DEFINE").unwrap_or_default())
}

fn options_with(defines: &str) -> Vec<String> {
    let defines = defines.split_whitespace().map(|d| format!("-D{d}"));
    NVRTC_OPTIONS.iter().map(|s| s.to_string()).chain(defines).collect()
}

fn compile(arch: &'static str) -> Result<String, String> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: nvrtc_options(),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map(|p| p.to_src())
        .map_err(|e| format!("NVRTC could not compile the kernels for {arch}: {e:?}"))
}

/// The compiled PTX's file in `dir` (the compiled guests' cache,
/// [`samepage_backend::cache::dir`]): its name hashes the source, the options, the
/// architecture and the NVRTC version, so any change compiles afresh.
fn ptx_cache_file(dir: &std::path::Path, arch: &str) -> std::path::PathBuf {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; NVRTC is loaded (the caller compiles with it otherwise).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let key = format!("{SOURCE}\0{}\0{arch}\0{major}.{minor}", nvrtc_options().join(" "));
    let h = samepage_backend::cache::fnv1a(key.as_bytes());
    dir.join(format!("cuda-{arch}-{h:016x}.ptx"))
}

/// The PTX for `arch` from the disk cache, or compiled (and then cached: written to a
/// temporary file and renamed, so a reader never sees half a file). `fresh`: ignore (and
/// replace) a cached copy, e.g. one the driver refused.
fn cached_ptx(dir: Option<&std::path::Path>, arch: &'static str, fresh: bool) -> Result<String, String> {
    let file = dir.map(|d| ptx_cache_file(d, arch));
    if let Some(f) = file.as_ref().filter(|_| !fresh) {
        if let Ok(ptx) = std::fs::read_to_string(f) {
            if ptx.contains(".entry") {
                return Ok(ptx);
            }
        }
    }
    let ptx = compile(arch)?;
    if let Some(f) = file {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let written = f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &ptx).is_ok()
            && std::fs::rename(&tmp, &f).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

/// PTX per architecture, compiled (or read from the disk cache) at most once per process.
fn ptx_for(arch: &'static str, fresh: bool) -> Result<String, String> {
    type Cache = Mutex<Vec<(&'static str, Result<String, String>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if fresh {
        cache.retain(|(a, _)| *a != arch);
    }
    if let Some((_, r)) = cache.iter().find(|(a, _)| *a == arch) {
        return r.clone();
    }
    let r = cached_ptx(samepage_backend::cache::dir().as_deref(), arch, fresh);
    cache.push((arch, r.clone()));
    r
}

/// The dtype pairs of the quantized pipelined matvec's two-dtype kernels
/// (`MVQ_MIX_KERNEL` in cu/mvp.cu): llama.cpp's K-quant mixes give attn_v Q6_K in some
/// layers, after attn_q and attn_k in the mix's own type.
pub const MVQ_MIX: [(DType, DType); 2] = [(DType::Q4_K, DType::Q6_K), (DType::Q5_K, DType::Q6_K)];

/// Most stages in flight per block of the pipelined matvec (`MVP_SMAX` in cu/mvp.cu).
pub const MVP_SMAX: u32 = 8;

static PDL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether kernels are launched with programmatic dependent launch: on sm_90 and newer,
/// unless `SAMEPAGE_CUDA_PDL=0`.
pub fn pdl() -> bool {
    PDL.load(std::sync::atomic::Ordering::Relaxed)
}

/// The loaded kernels of one context.
pub struct Kernels {
    pub embed: CudaFunction,
    pub rmsnorm: CudaFunction,
    pub rope: CudaFunction,
    pub kv_store: CudaFunction,
    /// rope(q) + rope(k) + kv_store of one token (record-time fusion).
    pub rope_kv: CudaFunction,
    /// rope(q) + rope(k) + kv_store + attention of one token, by cache dtype `[f32, f16]`.
    pub rope_kv_attn: [CudaFunction; 2],
    /// The same for head_dim <= 64 (fewer registers: the block fits an SM beside two
    /// quantized matvec blocks).
    pub rope_kv_attn_64: [CudaFunction; 2],
    /// Copies a decode step's per-token words to the device (`stage`).
    pub stage_tok: CudaFunction,
    pub attention: CudaFunction,
    pub attention_combine: CudaFunction,
    /// Single-token attention by cache dtype: `[f32, f16]` (`attention_dec_body`).
    pub attention_dec: [CudaFunction; 2],
    pub swiglu: CudaFunction,
    pub add: CudaFunction,
    pub scale: CudaFunction,
    pub softmax: CudaFunction,
    pub argmax: CudaFunction,
    pub sample: CudaFunction,
    /// `matvec_<dtype>` (n == 1), by dtype code.
    pub matvec: Vec<CudaFunction>,
    /// `matmul_<dtype>` (n > 1), by dtype code.
    pub matmul: Vec<CudaFunction>,
    /// `matvecs_<dtype>`: up to 3 matvecs sharing x in one launch, by dtype code.
    pub matvecs: Vec<CudaFunction>,
    /// `mvp_<f16|bf16>_<J>` (cu/mvp.cu), at `8 * (dtype is bf16) + J - 1`, with
    /// `mvp_smem` of dynamic shared memory granted; empty below sm_90 (bulk copies),
    /// `None` where the device refused the shared memory.
    pub mvp: Vec<Option<CudaFunction>>,
    /// `mvp_<quantized dtype>` (cu/mvp.cu, quantized W), by dtype code; as `mvp`.
    pub mvq: Vec<Option<CudaFunction>>,
    /// `mvp_q8_0_rest`: `mvp_q8_0` issuing its later stages behind x's loads.
    pub mvq_q8_0_rest: Option<CudaFunction>,
    /// `mvp_<dt>_<dt2>`: one launch over matrices of two dtypes ([`MVQ_MIX`]).
    pub mvq_mix: Vec<(DType, DType, Option<CudaFunction>)>,
    /// The dynamic shared memory granted to each `mvp` kernel (the device's opt-in
    /// maximum per block).
    pub mvp_smem: u32,
    /// Shared memory of one multiprocessor (0 if the device did not say): what
    /// [`Kernels::mvp_share`] divides.
    pub sm_smem: u32,
    /// By dtype code: whether `matvec_<dtype>` and `matvecs_<dtype>` (quantized) were
    /// granted the shared memory of the TMA chunk ring (`exec::qmv_ring_bytes`; sm_90).
    pub qmv_tma: Vec<bool>,
    /// `mega_<f16|bf16>_<f32|f16>` (cu/mega.cu: W, KV cache) at `2 * (W is bf16) + (cache
    /// is f16)`, with [`MEGA_SMEM`] of dynamic shared memory granted; `None` below sm_90 or
    /// where the device refused it.
    pub mega: [Option<CudaFunction>; 4],
    /// Multiprocessors of the device.
    pub sms: u32,
    /// Prefill GEMM helpers (cu/gemm.cu): x to f16 / bf16 scratch.
    pub gemm_x_f16: CudaFunction,
    pub gemm_x_bf16: CudaFunction,
    /// `gemm_w_<dtype>`: W rows to 16-bit scratch, by dtype code - 1 (F16 .. Q6_K).
    pub gemm_w: Vec<CudaFunction>,
    pub gemm_bias: CudaFunction,
    /// `attention_prefill_simt_<hdt>` (exact fp32) for `prefill::ATTENTION_PREFILL_HDT`;
    /// `None` where the device could not grant its dynamic shared memory.
    pub attention_prefill: Vec<Option<CudaFunction>>,
    /// `attention_prefill_<hdt>` (tensor cores) and the dynamic shared memory granted it
    /// (enough for F16 caches, or for F32 ones too); empty below sm_80 and with
    /// `SAMEPAGE_CUDA_ATTN=simt`, `None` where not even the F16 amount was granted.
    pub attention_prefill_tc: Vec<Option<(CudaFunction, u32)>>,
    /// The cuBLAS handle for prefill GEMMs (set by the backend after loading; `None`:
    /// n > 1 matmuls use the tiled kernel).
    pub(crate) blas: Option<crate::prefill::Blas>,
}

impl Kernels {
    /// The dynamic shared memory an `mvp` block may use for `blocks` of them to fit on one
    /// SM: its share, less the 1 KiB the driver keeps per block and the kernel's static
    /// shared memory (256 bytes, and `extra_static` more).
    pub fn mvp_share(&self, blocks: u32, extra_static: u32) -> u32 {
        (self.sm_smem / blocks.max(1)).saturating_sub(1024 + 256 + extra_static)
    }

    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, String> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("compute capability: {e:?}"))?;
        PDL.store(
            major >= 9 && std::env::var("SAMEPAGE_CUDA_PDL").as_deref() != Ok("0"),
            std::sync::atomic::Ordering::Relaxed,
        );
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let load = |fresh| -> Result<_, String> {
            ctx.load_module(Ptx::from_src(ptx_for(arch, fresh)?))
                .map_err(|e| format!("loading the kernel module: {e:?}"))
        };
        // A cached PTX the driver refuses is compiled again and replaced.
        let module = load(false).or_else(|_| load(true))?;
        let carveout = carveout();
        // Less the 1 KiB the driver keeps per block and the kernel's static 256 bytes.
        let mvp_smem = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_or(0, |v| v.max(0) as u32)
            .saturating_sub(1024);
        let sm_smem = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_or(0, |v| v.max(0) as u32);
        let f = |name: &str| -> Result<CudaFunction, String> {
            let func = module
                .load_function(name)
                .map_err(|e: DriverError| format!("kernel {name}: {e:?}"))?;
            if let Some(pct) = carveout {
                // A preference only: a device that cannot honour it runs the kernel anyway.
                let _ = func.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    pct,
                );
            }
            Ok(func)
        };
        // An `mvp` kernel (cu/mvp.cu), `None` where the device refused it `mvp_smem` of
        // dynamic shared memory.
        let granted = |name: &str| -> Result<Option<CudaFunction>, String> {
            let func = f(name)?;
            Ok(grant_smem(&func, mvp_smem).then_some(func))
        };
        let matvec: Vec<CudaFunction> = DTYPE_SUFFIX
            .iter()
            .map(|s| f(&format!("matvec_{s}")))
            .collect::<Result<_, _>>()?;
        let matvecs: Vec<CudaFunction> = DTYPE_SUFFIX
            .iter()
            .map(|s| f(&format!("matvecs_{s}")))
            .collect::<Result<_, _>>()?;
        let qmv_tma = (0..DTYPE_SUFFIX.len())
            .map(|i| {
                let ring = samepage_abi::DType::from_u32(i as u32).and_then(crate::exec::qmv_ring_bytes);
                major >= 9 && ring.is_some_and(|b| grant_smem(&matvec[i], b) && grant_smem(&matvecs[i], b))
            })
            .collect();
        Ok(Kernels {
            embed: f("embed")?,
            rmsnorm: f("rmsnorm")?,
            rope: f("rope")?,
            kv_store: f("kv_store")?,
            rope_kv: f("rope_kv")?,
            stage_tok: f("stage_tok")?,
            rope_kv_attn: [f("rope_kv_attn_f32")?, f("rope_kv_attn_f16")?],
            rope_kv_attn_64: [f("rope_kv_attn_64_f32")?, f("rope_kv_attn_64_f16")?],
            attention: f("attention")?,
            attention_combine: f("attention_combine")?,
            attention_dec: [f("attention_dec_f32")?, f("attention_dec_f16")?],
            swiglu: f("swiglu")?,
            add: f("add")?,
            scale: f("scale")?,
            softmax: f("softmax")?,
            argmax: f("argmax")?,
            sample: f("sample")?,
            matvec,
            matmul: DTYPE_SUFFIX
                .iter()
                .map(|s| f(&format!("matmul_{s}")))
                .collect::<Result<_, _>>()?,
            matvecs,
            qmv_tma,
            mvp_smem,
            sm_smem,
            mvp: if major >= 9 {
                ["f16", "bf16"]
                    .iter()
                    .flat_map(|d| (1..=8u32).map(move |j| (d, j)))
                    .map(|(d, j)| granted(&format!("mvp_{d}_{j}")))
                    .collect::<Result<_, String>>()?
            } else {
                Vec::new()
            },
            mvq: if major >= 9 {
                DTYPE_SUFFIX
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if crate::exec::mvq_dtype(i as u32).is_none() {
                            return Ok(None);
                        }
                        granted(&format!("mvp_{d}"))
                    })
                    .collect::<Result<_, String>>()?
            } else {
                Vec::new()
            },
            mvq_q8_0_rest: if major >= 9 { granted("mvp_q8_0_rest")? } else { None },
            mvq_mix: if major >= 9 {
                MVQ_MIX
                    .iter()
                    .map(|&(a, b)| {
                        let name = format!("mvp_{}_{}", DTYPE_SUFFIX[a as usize], DTYPE_SUFFIX[b as usize]);
                        Ok((a, b, granted(&name)?))
                    })
                    .collect::<Result<_, String>>()?
            } else {
                Vec::new()
            },
            mega: if major >= 9 {
                let g = |n: &str| -> Result<Option<CudaFunction>, String> {
                    let func = f(n)?;
                    Ok(grant_smem(&func, MEGA_SMEM).then_some(func))
                };
                [
                    g("mega_f16_f32")?,
                    g("mega_f16_f16")?,
                    g("mega_bf16_f32")?,
                    g("mega_bf16_f16")?,
                ]
            } else {
                [None, None, None, None]
            },
            sms: ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| format!("multiprocessor count: {e:?}"))? as u32,
            gemm_x_f16: f("gemm_x_f16")?,
            gemm_x_bf16: f("gemm_x_bf16")?,
            gemm_w: DTYPE_SUFFIX[1..]
                .iter()
                .map(|s| f(&format!("gemm_w_{s}")))
                .collect::<Result<_, _>>()?,
            gemm_bias: f("gemm_bias")?,
            attention_prefill: crate::prefill::ATTENTION_PREFILL_HDT
                .iter()
                .map(|&h| {
                    let func = f(&format!("attention_prefill_simt_{h}"))?;
                    let smem = crate::prefill::attention_prefill_smem(h);
                    Ok(grant_smem(&func, smem).then_some(func))
                })
                .collect::<Result<_, String>>()?,
            attention_prefill_tc: if major >= 8 && crate::prefill::attn_mode()? == crate::prefill::AttnMode::Mma {
                crate::prefill::ATTENTION_PREFILL_HDT
                    .iter()
                    .map(|&h| {
                        let func = f(&format!("attention_prefill_{h}"))?;
                        let granted = [true, false]
                            .into_iter()
                            .map(|f32_cache| crate::prefill::attention_prefill_tc_smem(h, f32_cache))
                            .find(|&smem| grant_smem(&func, smem));
                        Ok(granted.map(|smem| (func, smem)))
                    })
                    .collect::<Result<_, String>>()?
            } else {
                Vec::new()
            },
            blas: None,
        })
    }
}

/// The shared-memory carveout every kernel asks for, in percent of the unified L1/shared
/// memory (`SAMEPAGE_CUDA_CARVEOUT`, default 100; `-1`: no preference). One setting for
/// all kernels, so kernels of a decode step never ask an SM for different splits (the
/// pipelined matvec needs ~100 KiB of shared memory, the small kernels between matvecs
/// almost none). Measured neutral so far (H100, bf16 tg128: 571 tok/s vs 581 with `-1`,
/// within run-to-run noise, before the matvec's x staging); kept as the one setting the
/// final numbers were measured with.
fn carveout() -> Option<i32> {
    match std::env::var("SAMEPAGE_CUDA_CARVEOUT")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        Some(p) if (0..=100).contains(&p) => Some(p),
        Some(_) => None,
        None => Some(100),
    }
}

/// The megakernel's dynamic shared memory (`MG_SMEM` of cu/mega.cu: 5 ring slots of 32
/// KiB, x (8192 floats), the rows' old values (1024)).
pub const MEGA_SMEM: u32 = 5 * 32768 + 4 * (8192 + 1024);

/// Opt `f` in to `smem` bytes of dynamic shared memory; whether the device granted it.
fn grant_smem(f: &CudaFunction, smem: u32) -> bool {
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .is_ok()
}

/// Write the PTX for `arch` to `path` (for inspection: `SAMEPAGE_DUMP_PTX`).
pub fn dump_ptx(arch: &'static str, path: &std::path::Path) -> Result<(), String> {
    let ptx = ptx_for(arch, false)?;
    std::fs::write(path, ptx).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    /// The kernels compile for Hopper wherever NVRTC loads (no GPU needed).
    #[test]
    fn kernels_compile_for_sm90() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            // CI installs NVRTC from PyPI and sets this, so the kernels compile there.
            if std::env::var("SAMEPAGE_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("SAMEPAGE_REQUIRE_NVRTC=1 but no NVRTC library was found");
            }
            println!("skipped: no NVRTC library");
            return;
        }
        if let Err(e) = super::compile("sm_90") {
            panic!("{e}");
        }
        if let Ok(p) = std::env::var("SAMEPAGE_DUMP_PTX") {
            super::dump_ptx("sm_90", std::path::Path::new(&p)).unwrap();
        }
    }

    /// `SAMEPAGE_CUDA_DEFINE`'s words become `-D` options after the fixed ones.
    #[test]
    fn defines_become_options() {
        assert_eq!(super::options_with(""), ["--std=c++17", "-default-device"]);
        assert_eq!(super::options_with(" A  B=2 ")[2..], ["-DA", "-DB=2"]);
    }

    /// The PTX disk cache: written on the first compile, read back after, and a damaged
    /// file is compiled again and replaced.
    #[test]
    fn ptx_is_cached_on_disk() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!("skipped: no NVRTC library");
            return;
        }
        let dir = std::env::temp_dir().join(format!("samepage-ptx-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = super::cached_ptx(Some(&dir), "sm_90", false).unwrap();
        let file = super::ptx_cache_file(&dir, "sm_90");
        assert!(
            std::fs::read_to_string(&file).unwrap() == first,
            "the PTX was not cached"
        );
        std::fs::write(&file, "not ptx").unwrap();
        let again = super::cached_ptx(Some(&dir), "sm_90", false).unwrap();
        assert!(again.contains(".visible .entry"), "a damaged cache file was used");
        assert!(
            std::fs::read_to_string(&file).unwrap() == again,
            "the damaged file was not replaced"
        );
        // A cached file is what the next process reads (a marker shows it was read).
        std::fs::write(&file, format!("{first}// cached\n")).unwrap();
        assert!(super::cached_ptx(Some(&dir), "sm_90", false)
            .unwrap()
            .ends_with("// cached\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
