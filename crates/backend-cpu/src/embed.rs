//! Embedding gather: `out[i, :] = dequant(table[ids[i], :])`.
use samepage_abi::{self as abi, DType};
use samepage_backend::{Mem, OpError};

use crate::quant::dequant_row;

pub(crate) fn embed(mem: &Mem, e: &abi::Embed) -> Result<(), OpError> {
    let dt = DType::from_u32(e.dtype).ok_or_else(|| OpError::unsupported("embed: unknown dtype"))?;
    let (n, dim) = (e.n as usize, e.dim as usize);
    let row_bytes = dt.row_bytes(dim).expect("validated");
    // SAFETY: ids (n,) u32 was validated; read before anything is written.
    let ids: &[u32] = unsafe { mem.slice(e.ids, n) };
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= e.vocab) {
        return Err(OpError::runtime(format!(
            "embed: token id {id} at index {i} is past the vocabulary of {}",
            e.vocab
        )));
    }
    // SAFETY: table (vocab, dim) and out (n, dim) were validated and do not overlap.
    let table: &[u8] = unsafe { mem.slice(e.table, e.vocab as usize * row_bytes) };
    let out: &mut [f32] = unsafe { mem.slice_mut(e.out, n * dim) };
    for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
        let r = id as usize * row_bytes;
        dequant_row(dt, &table[r..r + row_bytes], o);
    }
    Ok(())
}
