//! The on-disk cache of compiled artifacts (compiled guests, GPU kernels), shared by the
//! runtime and the backends.

/// The cache directory: `$SAMEPAGE_CACHE_DIR`, else `$XDG_CACHE_HOME/samepage`, else
/// `~/.cache/samepage`; `None` when `SAMEPAGE_CACHE_DIR` is empty (caching off) or no
/// directory is known.
pub fn dir() -> Option<std::path::PathBuf> {
    Some(match std::env::var_os("SAMEPAGE_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => std::path::PathBuf::from(d),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => std::path::PathBuf::from(d).join("samepage"),
            _ => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/samepage"),
        },
    })
}

/// FNV-1a over `bytes`: stable across builds and platforms, unlike std's hasher, so it
/// can name cache files.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}
