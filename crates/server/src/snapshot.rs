//! KV-cache snapshots as safetensors files.
//!
//! The guest describes its cache (`{"cmd":"kv_layout"}`: per layer, the offsets of K and
//! V in its memory, laid out `(n_kv_heads, ctx, head_dim)`; the cached token ids; the
//! model's identity) and adopts bytes the host wrote (`{"cmd":"kv_restore"}`). The host
//! moves the bytes itself, straight between the region (the guest's memory, which is the
//! backend's buffer) and the file:
//!
//! - **save**: one tensor per (layer, K/V, kv head), `k.{layer}.{head}` /
//!   `v.{layer}.{head}` of shape `(n_tokens, head_dim)`, each a borrowed slice of the
//!   region (one head's positions are contiguous), written by `safetensors` with no
//!   staging buffer. The metadata holds the format and version, the model hash and
//!   shape, the cache dtype, the token ids, the positions (`0..n_tokens`), the pending
//!   token and a CRC-32 of all tensor bytes.
//! - **open**: the file is mapped, its header parsed and checked by `safetensors`
//!   (a truncated file fails here), every tensor's name, dtype and shape is checked
//!   against the metadata, and the CRC is verified (a corrupt file fails here).
//! - **restore**: the snapshot is checked against the live guest's layout (model hash,
//!   shape, cache dtype, context) *before* anything is written; then the cache is reset,
//!   the bytes are copied from the file mapping into the region, and the guest adopts
//!   the tokens. A refused snapshot never touches the cache.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::Worker;

/// The `format` metadata value of a samepage KV snapshot.
pub const FORMAT: &str = "samepage-kv";
/// The snapshot file version.
pub const VERSION: u32 = 1;

/// One layer's K and V cache offsets in guest memory.
#[derive(Clone, Debug, Deserialize)]
pub struct LayerOffsets {
    pub k: u64,
    pub v: u64,
}

/// The guest's answer to `kv_layout`.
#[derive(Clone, Debug, Deserialize)]
pub struct Layout {
    pub format: u32,
    pub model_hash: String,
    pub arch: String,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab: u32,
    pub ctx: u32,
    pub cache_dtype: String,
    pub layers: Vec<LayerOffsets>,
    pub head_stride: u64,
    pub row_bytes: u64,
    pub tokens: Vec<u32>,
    pub pending: Option<u32>,
}

impl Layout {
    /// Ask the guest.
    pub fn of(w: &mut dyn Worker) -> Result<Layout> {
        let v = w.call(json!({"cmd": "kv_layout"}))?;
        serde_json::from_value(v).context("the guest's kv_layout answer is malformed")
    }

    fn dtype(&self) -> Result<Dtype> {
        match self.cache_dtype.as_str() {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            o => bail!("cache dtype {o} cannot be snapshotted"),
        }
    }

    /// `(name, offset in guest memory)` of every tensor of the first `n` positions, in the
    /// canonical order (layer, K then V, head) that the CRC covers.
    fn tensors(&self) -> Vec<(String, u64)> {
        let mut v = Vec::with_capacity(self.layers.len() * 2 * self.n_kv_heads as usize);
        for (l, off) in self.layers.iter().enumerate() {
            for (kind, base) in [("k", off.k), ("v", off.v)] {
                for h in 0..self.n_kv_heads as u64 {
                    v.push((format!("{kind}.{l}.{h}"), base + h * self.head_stride));
                }
            }
        }
        v
    }
}

struct RegionView<'a> {
    dtype: Dtype,
    shape: [usize; 2],
    data: &'a [u8],
}

impl View for &RegionView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// What [`save`] wrote.
#[derive(Clone, Debug)]
pub struct Saved {
    pub path: PathBuf,
    pub tokens: usize,
    pub bytes: u64,
}

/// Write the guest's whole cache (every cached token, and the pending one) to `path`
/// (atomically: a temporary file, then a rename). `extra` goes into the metadata (e.g.
/// a chat history); keys must not collide with the snapshot's own.
pub fn save(w: &mut dyn Worker, path: &Path, extra: &[(&str, String)]) -> Result<Saved> {
    let layout = Layout::of(w)?;
    let n = layout.tokens.len();
    let dtype = layout.dtype()?;
    let len = n as u64 * layout.row_bytes;
    let mem = w.mem();
    let mut views = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    for (name, off) in layout.tensors() {
        if !mem.contains(off as usize, len as usize) {
            bail!("the guest reported a KV cache outside its memory");
        }
        // SAFETY: the range lies inside the region (checked above) and the guest is not
        // running (the worker is ours, between calls), so nothing writes it meanwhile.
        let data: &[u8] = unsafe { mem.slice(off as u32, len as usize) };
        crc.update(data);
        views.push((
            name,
            RegionView {
                dtype,
                shape: [n, layout.head_dim as usize],
                data,
            },
        ));
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    for (k, v) in extra {
        meta.insert((*k).to_string(), v.clone());
    }
    let own = [
        ("format", FORMAT.to_string()),
        ("version", VERSION.to_string()),
        ("model_hash", layout.model_hash.clone()),
        ("arch", layout.arch.clone()),
        ("n_layers", layout.n_layers.to_string()),
        ("n_kv_heads", layout.n_kv_heads.to_string()),
        ("head_dim", layout.head_dim.to_string()),
        ("vocab", layout.vocab.to_string()),
        ("cache_dtype", layout.cache_dtype.clone()),
        ("n_tokens", n.to_string()),
        ("tokens", serde_json::to_string(&layout.tokens)?),
        ("positions", format!("[0,{n})")),
        ("pending", layout.pending.map(|p| p.to_string()).unwrap_or_default()),
        ("crc32", format!("{:08x}", crc.finalize())),
    ];
    for (k, v) in own {
        if meta.insert(k.to_string(), v).is_some() {
            bail!("snapshot metadata key {k} is reserved");
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let refs: Vec<(String, &RegionView)> = views.iter().map(|(n, v)| (n.clone(), v)).collect();
    safetensors::serialize_to_file(refs, Some(meta), &tmp)
        .map_err(|e| anyhow!("cannot write the snapshot {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write the snapshot {}", path.display()))?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Saved {
        path: path.to_path_buf(),
        tokens: n,
        bytes,
    })
}

/// A snapshot file, mapped and fully checked (structure, metadata, CRC), ready to be
/// restored into any guest running the same model.
pub struct Snapshot {
    pub path: PathBuf,
    map: memmap2::Mmap,
    pub model_hash: String,
    pub arch: String,
    pub n_layers: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub cache_dtype: String,
    pub tokens: Vec<u32>,
    pub pending: Option<u32>,
    /// The metadata as written (including any extra keys of [`save`]).
    pub metadata: HashMap<String, String>,
    /// `(name, byte range in the file)` in canonical order.
    ranges: Vec<(String, std::ops::Range<usize>)>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("model_hash", &self.model_hash)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Snapshot {
    /// Map and check a snapshot file. Every refusal names the file and the reason.
    pub fn open(path: &Path) -> Result<Snapshot> {
        let f = File::open(path).with_context(|| format!("cannot open the snapshot {}", path.display()))?;
        // SAFETY: a read-only private mapping; the snapshot files are ours and written
        // atomically (rename), so the bytes do not change under the mapping.
        let map =
            unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map the snapshot {}", path.display()))?;
        Snapshot::check(path, map).map_err(|e| anyhow!("{} is not a usable KV snapshot: {e}", path.display()))
    }

    fn check(path: &Path, map: memmap2::Mmap) -> Result<Snapshot> {
        let st = SafeTensors::deserialize(&map).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer
            | safetensors::SafeTensorError::InvalidHeaderLength
            | safetensors::SafeTensorError::HeaderTooSmall => {
                anyhow!("the file is truncated or has trailing bytes ({e:?})")
            }
            e => anyhow!("the safetensors header is invalid ({e:?})"),
        })?;
        let (header_len, md) = SafeTensors::read_metadata(&map).map_err(|e| anyhow!("{e:?}"))?;
        let meta = md.metadata().clone().ok_or_else(|| anyhow!("it has no metadata"))?;
        let get = |k: &str| meta.get(k).ok_or_else(|| anyhow!("its metadata has no {k:?}"));
        let num = |k: &str| -> Result<u32> {
            get(k)?
                .parse()
                .map_err(|_| anyhow!("its metadata {k:?} is not a number"))
        };
        if get("format")? != FORMAT {
            bail!("its format is {:?}, not {FORMAT:?}", get("format")?);
        }
        let version = num("version")?;
        if version != VERSION {
            bail!("it is version {version}; this samepage reads version {VERSION}");
        }
        let tokens: Vec<u32> =
            serde_json::from_str(get("tokens")?).map_err(|_| anyhow!("its token list is malformed"))?;
        let n = num("n_tokens")? as usize;
        if n != tokens.len() {
            bail!("it says {n} tokens but lists {}", tokens.len());
        }
        if get("positions")? != &format!("[0,{n})") {
            bail!("its positions {:?} are not [0,{n})", get("positions")?);
        }
        let pending = match get("pending")?.as_str() {
            "" => None,
            p => Some(p.parse().map_err(|_| anyhow!("its pending token is malformed"))?),
        };
        let (n_layers, n_kv_heads, head_dim) = (num("n_layers")?, num("n_kv_heads")?, num("head_dim")?);
        let cache_dtype = get("cache_dtype")?.clone();
        let (dtype, elt) = match cache_dtype.as_str() {
            "f32" => (Dtype::F32, 4),
            "f16" => (Dtype::F16, 2),
            o => bail!("its cache dtype {o:?} is unknown"),
        };
        let want_bytes = n * head_dim as usize * elt;
        let data_start = 8 + header_len;
        let mut ranges = Vec::new();
        let mut crc = crc32fast::Hasher::new();
        let expected = n_layers as usize * 2 * n_kv_heads as usize;
        if st.len() != expected {
            bail!("it holds {} tensors, not {expected}", st.len());
        }
        for l in 0..n_layers {
            for kind in ["k", "v"] {
                for h in 0..n_kv_heads {
                    let name = format!("{kind}.{l}.{h}");
                    let info = md.info(&name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
                    if info.dtype != dtype || info.shape != [n, head_dim as usize] {
                        bail!(
                            "tensor {name} is {:?} {:?}, not {dtype:?} [{n}, {head_dim}]",
                            info.dtype,
                            info.shape
                        );
                    }
                    let (a, b) = info.data_offsets;
                    if b - a != want_bytes {
                        bail!("tensor {name} has {} bytes, not {want_bytes}", b - a);
                    }
                    let r = data_start + a..data_start + b;
                    crc.update(&map[r.clone()]);
                    ranges.push((name, r));
                }
            }
        }
        let crc = format!("{:08x}", crc.finalize());
        if &crc != get("crc32")? {
            bail!("its data is corrupt (CRC-32 {crc}, expected {})", get("crc32")?);
        }
        Ok(Snapshot {
            path: path.to_path_buf(),
            model_hash: get("model_hash")?.clone(),
            arch: get("arch")?.clone(),
            n_layers,
            n_kv_heads,
            head_dim,
            cache_dtype,
            tokens,
            pending,
            metadata: meta.clone(),
            ranges,
            map,
        })
    }

    /// Why this snapshot cannot go into a guest with `layout`, if it cannot.
    pub fn compatible(&self, layout: &Layout) -> Result<()> {
        if self.model_hash != layout.model_hash {
            bail!(
                "the snapshot {} was made with another model (hash {}, {}); this model is {} ({})",
                self.path.display(),
                self.model_hash,
                self.arch,
                layout.model_hash,
                layout.arch
            );
        }
        if (self.n_layers, self.n_kv_heads, self.head_dim) != (layout.n_layers, layout.n_kv_heads, layout.head_dim) {
            bail!("the snapshot {} has another cache shape", self.path.display());
        }
        if self.cache_dtype != layout.cache_dtype {
            bail!(
                "the snapshot {} holds a {} cache; this session's is {}",
                self.path.display(),
                self.cache_dtype,
                layout.cache_dtype
            );
        }
        if self.tokens.len() > layout.ctx as usize {
            bail!(
                "the snapshot {} holds {} tokens, more than this session's context of {}",
                self.path.display(),
                self.tokens.len(),
                layout.ctx
            );
        }
        if let Some(t) = self.tokens.iter().chain(&self.pending).find(|&&t| t >= layout.vocab) {
            bail!(
                "the snapshot {} has token {t} outside the vocabulary",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Put the first `n` positions (all of them, and the pending token, when `n` is
    /// `None`) into the guest's cache. Checks compatibility first; a refusal changes
    /// nothing.
    pub fn restore(&self, w: &mut dyn Worker, n: Option<usize>) -> Result<usize> {
        let layout = Layout::of(w)?;
        self.compatible(&layout)?;
        let all = self.tokens.len();
        let n = n.unwrap_or(all).min(all);
        let len = n as u64 * layout.row_bytes;
        let mem = w.mem();
        let targets = layout.tensors();
        for ((name, off), (name2, _)) in targets.iter().zip(&self.ranges) {
            if name != name2 || !mem.contains(*off as usize, len as usize) {
                bail!("the guest reported a KV cache outside its memory");
            }
        }
        // From here on the cache changes: forget its old contents first, so that a
        // failure below leaves an empty (consistent) cache, never a mixed one.
        w.call(json!({"cmd": "reset"}))?;
        for ((_, off), (_, r)) in targets.iter().zip(&self.ranges) {
            let src = &self.map[r.start..r.start + len as usize];
            // SAFETY: checked above to lie inside the region; the guest is not running.
            let dst: &mut [u8] = unsafe { mem.slice_mut(*off as u32, len as usize) };
            dst.copy_from_slice(src);
        }
        let pending = if n == all { self.pending } else { None };
        w.call(json!({"cmd": "kv_restore", "tokens": &self.tokens[..n], "pending": pending}))?;
        Ok(n)
    }

    /// How many leading tokens this snapshot shares with `tokens`.
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count()
    }

    /// Extra metadata written by [`save`].
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// A short description for APIs.
    pub fn describe(&self) -> Value {
        json!({ "path": self.path, "tokens": self.tokens.len(), "model_hash": self.model_hash,
                "bytes": self.map.len() })
    }
}
