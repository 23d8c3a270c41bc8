//! Sampler glue: the Sample op reads its parameters, the token history and the RNG state
//! from small guest buffers; these helpers fill them.
use samepage_guest::abi::{self, SampleParams};

use crate::model::{State, HISTORY};

/// Parameters and seed for one generate call (defaults as llama.cpp's).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub params: SampleParams,
    pub seed: u64,
}

impl Sampling {
    pub fn new(temperature: f32, top_k: u32, top_p: f32, min_p: f32, repeat_penalty: f32, seed: u64) -> Sampling {
        // The Sample op rejects non-finite or out-of-range values at run time; keep them sane.
        let finite_or = |x: f32, d: f32| if x.is_finite() { x } else { d };
        Sampling {
            params: SampleParams {
                temperature: finite_or(temperature, 0.0),
                top_k,
                top_p: finite_or(top_p, 1.0).clamp(0.0, 1.0),
                min_p: finite_or(min_p, 0.0).clamp(0.0, 1.0),
                repeat_penalty: if repeat_penalty > 0.0 && repeat_penalty.is_finite() {
                    repeat_penalty
                } else {
                    1.0
                },
                history_len: 0,
            },
            seed,
        }
    }

    /// Write the parameters and seed the RNG (once per generate call).
    pub fn start(&self, s: &mut State) {
        s.params.bytes_mut()[..std::mem::size_of::<SampleParams>()].copy_from_slice(abi::pod_bytes(&self.params));
        s.rng.as_mut_slice::<u64>()[0] = self.seed;
    }
}

/// Put the last `HISTORY` of `recent` right-aligned into the history buffer and set
/// `history_len` (the Sample op penalises the last `history_len` entries).
pub fn set_history(s: &mut State, recent: &[u32]) {
    let tail = &recent[recent.len().saturating_sub(HISTORY as usize)..];
    let h = s.history.as_mut_slice::<u32>();
    let cap = h.len();
    h[cap - tail.len()..].copy_from_slice(tail);
    let mut p: SampleParams = abi::read_pod(&s.params.bytes()[..std::mem::size_of::<SampleParams>()]).unwrap();
    p.history_len = tail.len() as u32;
    s.params.bytes_mut()[..std::mem::size_of::<SampleParams>()].copy_from_slice(abi::pod_bytes(&p));
}

/// Where the text may be cut because of a stop string: `Some(i)` if a stop string starts
/// at byte `i` of `text`; otherwise `Err(n)`, the number of trailing bytes to hold back
/// because they could begin a stop string.
pub fn find_stop(text: &str, stops: &[String]) -> Result<usize, usize> {
    let mut hold = 0;
    let mut first: Option<usize> = None;
    for s in stops.iter().filter(|s| !s.is_empty()) {
        if let Some(i) = text.find(s.as_str()) {
            first = Some(first.map_or(i, |f: usize| f.min(i)));
        }
        // The longest suffix of text that is a proper prefix of s.
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if text.is_char_boundary(text.len() - k) && s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    first.ok_or(hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(find_stop("hello", &stops), Err(0));
        assert_eq!(find_stop("hello\nUs", &stops), Err(3));
        assert_eq!(find_stop("hello EN", &stops), Err(2));
        assert_eq!(find_stop("hello\nUser: x", &stops), Ok(5));
        assert_eq!(find_stop("aENDb\nUser:", &stops), Ok(1));
        assert_eq!(find_stop("é", &["éa".to_string()]), Err(2));
    }
}
