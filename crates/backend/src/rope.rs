//! Rotary position embedding frequencies, shared by the backends: the CPU reference and
//! the GPU backends that compute the angles of a position from them.
use samepage_abi as abi;

/// The rotation frequency of each pair `j < n_rot / 2`, with Llama-3 scaling applied
/// exactly as Hugging Face's `_compute_llama3_parameters` does (in f64).
pub fn rope_freqs(r: &abi::Rope) -> Vec<f64> {
    let half = r.n_rot as usize / 2;
    (0..half)
        .map(|j| {
            let freq = (r.freq_base as f64).powf(-2.0 * j as f64 / r.n_rot as f64);
            if r.scaling_factor > 0.0 {
                llama3_scale(
                    freq,
                    r.scaling_factor as f64,
                    r.low_freq_factor as f64,
                    r.high_freq_factor as f64,
                    r.original_context as f64,
                )
            } else {
                freq
            }
        })
        .collect()
}

fn llama3_scale(freq: f64, factor: f64, low: f64, high: f64, original_context: f64) -> f64 {
    let low_freq_wavelen = original_context / low;
    let high_freq_wavelen = original_context / high;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / factor
    } else {
        let smooth = (original_context / wavelen - low) / (high - low);
        (1.0 - smooth) * freq / factor + smooth * freq
    }
}
