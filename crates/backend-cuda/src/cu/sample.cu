// Token sampling on the GPU, so that only the token id crosses to the guest. Greedy
// decoding and top-k sampling at a temperature (no penalty) run over all the blocks of
// the launch (one per 8192 logits), each block over its slice, the last to finish merging;
// every other case runs in one block of 1024 threads (block 0, or the merging block when
// the top-k lists overflow): thread t owns the contiguous vocabulary range [t*C, (t+1)*C),
// so prefix sums run in token-id order, as the reference's final draw does.
// Passes whose result does not depend on the order (maxima, histograms, elementwise
// updates, f64 sums) stride the vocabulary instead (`t += ST`: coalesced); only the
// rank-by-id tie passes and the draw walk the contiguous ranges.
// Pipeline (samepage_abi::Sample): repetition penalty, temperature, top-k, softmax,
// top-p, min-p, draw (splitmix64). Top-k and top-p find their cut with a radix select
// over the value bits instead of a sort. Scratch: l (vocab,) f32, p (vocab,) f32
// where p < 0 marks a dropped token.
#define ST 1024
// The counter word (c.counters) of the greedy path's merge; attention uses the low ones.
#define SAMPLE_COUNTER 4095

__device__ __forceinline__ u32 order_key(float v) {
    u32 u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of one u32 per thread (ST threads); returns the total too.
__device__ u32 scan_u32(u32 v, u32& total) {
    __shared__ u32 s[ST];
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 acc = 0;
        for (int i = 0; i < ST; i++) { u32 t = s[i]; s[i] = acc; acc += t; }
        total = acc;
    }
    __syncthreads();
    return s[threadIdx.x];
}

// One splitmix64 step of the guest's RNG state (the reference's `draw_uniform`): sets the
// new state and returns the 24-bit uniform in [0, 1).
__device__ __forceinline__ float draw_uniform(u64 state, u64& next) {
    next = state + 0x9E3779B97F4A7C15ull;
    u64 z = next;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (float)(z >> 40) / 16777216.0f;
}

// This thread's logits of [v0, v1), eight loads in flight, the last round too (its tail,
// one load at a time, was a chain of up to 7 round trips): f(t, u, x) for element t, the
// u-th of its round, x the logit (NaN read as -inf).
template <typename F> __device__ __forceinline__ void each_logit(const float* logits, u32 v0, u32 v1, F f) {
    for (u32 t = v0 + threadIdx.x; t < v1; t += 8 * ST) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = t + u * ST < v1 ? __ldcs(logits + t + u * ST) : 0.0f;
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (t + u * ST < v1) f(t + u * ST, u, v[u] != v[u] ? -INFINITY : v[u]);
    }
}

// Radix select: the key of the `k`-th largest (1-based) among the keys that `each`
// visits (each(f) calls f(key) for every key of this thread); returns it and sets
// `ties` = how many elements equal to it are needed.
template <typename Each>
__device__ u32 radix_select(u32 k, Each each, u32& ties) {
    __shared__ u32 hist[256];
    __shared__ u32 sh_prefix, sh_rem;
    u32 prefix = 0, mask = 0, rem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += ST) hist[b] = 0;
        __syncthreads();
        // (Warp-aggregating the increments with __match_any_sync measured slower on an
        // H100: 242 vs 187 us for the whole sampler.)
        each([&](u32 kk) {
            if ((kk & mask) == prefix) atomicAdd(&hist[(kk >> shift) & 255], 1u);
        });
        __syncthreads();
        // The bin where the count from the top reaches rem: warp 0, lane l over bins
        // 255 - 8 l .. 248 - 8 l, a prefix sum over the lanes, then the one lane whose
        // range holds it walks its bins (bin 0 ends the walk, as a serial scan from 255
        // down to 0 would: was thread 0 alone, up to 256 dependent shared loads a round).
        if (threadIdx.x < 32) {
            const u32 lane = threadIdx.x;
            u32 h[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) sum += h[j] = hist[255 - 8 * lane - j];
            u32 incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u32 v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= (u32)o) incl += v;
            }
            const u32 excl = incl - sum;
            if (excl < rem && (incl >= rem || lane == 31)) {
                u32 r = rem - excl, b = 0;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    b = 255 - 8 * lane - j;
                    if (b == 0 || h[j] >= r) break;
                    r -= h[j];
                }
                sh_prefix = prefix | (b << shift);
                sh_rem = r;
            }
        }
        __syncthreads();
        prefix = sh_prefix;
        rem = sh_rem;
        mask |= 255u << shift;
        __syncthreads();
    }
    ties = rem;
    return prefix;
}

// Radix select over the keys key(t, k) of t < V (false: skip t). The histogram does not
// depend on the order, so the threads stride the vocabulary (coalesced), eight
// independent loads per thread before their atomics (one SM walks the whole vocabulary:
// the loop is bound by load latency, not by the atomics), the last round too (a tail of
// one load at a time was a chain of round trips).
template <typename KeyF>
__device__ u32 radix_select_count(u32 V, u32 k, KeyF key, u32& ties) {
    return radix_select(k, [&](auto f) {
        for (u32 t = threadIdx.x; t < V; t += 8 * ST) {
            u32 kk[8];
            bool ok[8];
#pragma unroll
            for (int u = 0; u < 8; u++) ok[u] = t + u * ST < V && key(t + u * ST, kk[u]);
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (ok[u]) f(kk[u]);
        }
    }, ties);
}

// Ascending sort of a[0..n) in shared memory (n <= ST), all threads of the block.
template <typename T> __device__ void bitonic_sort(T* a, u32 n, T pad) {
    u32 N = 1;
    while (N < n) N <<= 1;
    for (u32 i = n + threadIdx.x; i < N; i += ST) a[i] = pad;
    __syncthreads();
    for (u32 k = 2; k <= N; k <<= 1)
        for (u32 j = k >> 1; j > 0; j >>= 1) {
            for (u32 i = threadIdx.x; i < N; i += ST) {
                const u32 ixj = i ^ j;
                if (ixj > i) {
                    const bool up = (i & k) == 0;
                    const T x = a[i], y = a[ixj];
                    if ((x > y) == up) { a[i] = y; a[ixj] = x; }
                }
            }
            __syncthreads();
        }
}

// Ascending sort of distinct values a[0..n) in shared memory (all threads of the block):
// for n <= 128 each of the first n threads counts the values below its own and stores it
// at that rank (two barriers; bitonic's log^2 rounds of block-wide barriers cost
// microseconds at these sizes), else bitonic.
template <typename T> __device__ void sort_distinct(T* a, u32 n, T pad) {
    if (n > 128) {
        bitonic_sort<T>(a, n, pad);
        return;
    }
    T v = pad;
    u32 r = 0;
    if (threadIdx.x < n) {
        v = a[threadIdx.x];
        for (u32 j = 0; j < n; j++) r += a[j] < v;
    }
    __syncthreads();
    if (threadIdx.x < n) a[r] = v;
    __syncthreads();
}

// One thread: f(i, v[i]) for i < n in order (only where kept[i], with `kept`) until f
// returns true, loading eight values at a time (independent loads, not one dependent
// shared load per step: the sums stay in the same order).
template <typename F> __device__ __forceinline__ void walk_in_order(const float* v, const unsigned char* kept, u32 n, F f) {
    for (u32 i0 = 0; i0 < n; i0 += 8) {
        float x[8];
        bool k[8];
#pragma unroll
        for (u32 j = 0; j < 8; j++) {
            k[j] = i0 + j < n && (!kept || kept[i0 + j]);
            x[j] = i0 + j < n ? v[i0 + j] : 0.0f;
        }
#pragma unroll
        for (u32 j = 0; j < 8; j++)
            if (k[j] && f(i0 + j, x[j])) return;
    }
}

// After top-k (k-th largest key `kstar`, `ties` of its equals needed): the rest of the
// pipeline on the k survivors alone, in shared memory, instead of passes over the whole
// vocabulary: compact them (one coalesced pass), sort by id, softmax, top-p (sorted by
// probability), min-p, draw. The same arithmetic as the vocabulary-wide path; returns
// false (nothing written) where it does not apply: more than ST survivors or equal keys,
// or every survivor at -inf (the caller's path handles those).
// With `ids`, the candidates are ids[0..V) (vocabulary ids, any order) instead of 0..V.
__device__ bool sample_compact(const Ctx& c, const Sample& s, const SampleParams& p, u64 rng, const float* l, u32 V,
                               u32 kstar, u32 ties, const u32* ids = nullptr) {
    __shared__ u32 cid[ST], eqid[ST];
    __shared__ float cpr[ST];
    __shared__ unsigned long long pkey[ST];
    __shared__ unsigned char kept[ST];
    __shared__ u32 n_gt, n_eq, cut;
    const u32 tid = threadIdx.x;
    if (tid == 0) { n_gt = 0; n_eq = 0; }
    __syncthreads();
    auto take = [&](u32 t, u32 k) {
        if (k > kstar) {
            const u32 i = atomicAdd(&n_gt, 1u);
            if (i < ST) cid[i] = t;
        } else if (k == kstar) {
            const u32 i = atomicAdd(&n_eq, 1u);
            if (i < ST) eqid[i] = t;
        }
    };
    for (u32 t = tid; t < V; t += 8 * ST) {
        u32 kk[8], id[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            id[u] = t + u * ST < V ? (ids ? ids[t + u * ST] : t + u * ST) : 0u;
            kk[u] = t + u * ST < V ? order_key(l[id[u]]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (t + u * ST < V) take(id[u], kk[u]);
    }
    __syncthreads();
    const u32 ngt = n_gt, neq = n_eq;
    if (ngt + ties > ST || neq > ST || ties > neq) return false;
    // The needed equals are the smallest ids among them (as the reference's order).
    sort_distinct<u32>(eqid, neq, 0xffffffffu);
    for (u32 i = tid; i < ties; i += ST) cid[ngt + i] = eqid[i];
    const u32 n = ngt + ties;
    __syncthreads();
    sort_distinct<u32>(cid, n, 0xffffffffu);
    // Softmax over the survivors (scaled logits in l).
    float mx = -INFINITY;
    for (u32 i = tid; i < n; i += ST) mx = fmaxf(mx, l[cid[i]]);
    mx = block_max(mx);
    if (mx == -INFINITY) return false;
    double se = 0.0;
    for (u32 i = tid; i < n; i += ST) se += (double)expf(l[cid[i]] - mx);
    se = block_sum_d(se);
    for (u32 i = tid; i < n; i += ST) {
        cpr[i] = (float)((double)expf(l[cid[i]] - mx) / se);
        kept[i] = 1;
    }
    __syncthreads();
    // Top-p: order by (probability descending, id ascending) and keep the shortest prefix
    // whose mass reaches top_p (at least one).
    if (p.top_p < 1.0f) {
        for (u32 i = tid; i < n; i += ST)
            pkey[i] = (unsigned long long)(0xffffffffu - __float_as_uint(cpr[i])) << 32 | i;
        sort_distinct<unsigned long long>(pkey, n, ~0ull);
        // The probabilities in that order (eqid is free), so that thread 0's sum, in the
        // same order as ever, reads eight at a time instead of two dependent loads each.
        float* pp = (float*)eqid;
        for (u32 j = tid; j < n; j += ST) pp[j] = cpr[(u32)pkey[j]];
        __syncthreads();
        if (tid == 0) {
            double cum = 0.0;
            u32 k = n - 1;
            walk_in_order(pp, (const unsigned char*)nullptr, n, [&](u32 j, float v) {
                cum += (double)v;
                if (cum >= (double)p.top_p) k = j;
                return cum >= (double)p.top_p;
            });
            cut = k;
        }
        __syncthreads();
        for (u32 j = tid; j < n; j += ST) kept[(u32)pkey[j]] = j <= cut;
        __syncthreads();
    }
    // Min-p, against the largest kept probability.
    if (p.min_p > 0.0f) {
        float pm = 0.0f;
        for (u32 i = tid; i < n; i += ST) if (kept[i]) pm = fmaxf(pm, cpr[i]);
        pm = block_max(pm);
        const float thr = p.min_p * pm;
        for (u32 i = tid; i < n; i += ST) if (kept[i] && cpr[i] < thr) kept[i] = 0;
        __syncthreads();
    }
    // Draw, walking the kept in ascending id (cid is sorted), on thread 0.
    if (tid == 0) {
        double total = 0.0;
        u32 last = 0xffffffffu;
        walk_in_order(cpr, kept, n, [&](u32 i, float v) {
            total += (double)v;
            last = i;
            return false;
        });
        u64 st;
        const double u = (double)draw_uniform(rng, st) * total;
        double cum = 0.0;
        u32 found = last != 0xffffffffu ? cid[last] : 0u;
        walk_in_order(cpr, kept, n, [&](u32 i, float v) {
            cum += (double)v;
            if (u < cum) found = cid[i];
            return u < cum;
        });
        *at<u64>(c, s.rng) = st;
        *at<u32>(c, s.out) = found;
    }
    return true;
}

// aux bit 20 (graph.rs): no op of the graph writes the params or the history, and no
// other op the RNG state, so they are read (and checked) before the PDL wait, while the
// output head still runs.
#define SAMPLE_PRE (1u << 20)
extern "C" __global__ void __launch_bounds__(ST) sample(const Ctx c, const Sample s) {
    TlGuard tl_guard_(c);
    const bool pre = c.aux & SAMPLE_PRE;
    if (!pre) {
        PDL_WAIT_ONLY();
        tl_guard_.waited();
        PDL_TRIGGER();
    }
    __shared__ SampleParams p;
    __shared__ u32 bad;
    // The RNG state, read with the params (a host page: one bus round trip, before the PDL
    // wait too where no other op writes it) instead of at the draw.
    __shared__ u64 rng0;
    const u32 V = s.vocab, tid = threadIdx.x;
    const u32 C = (V + ST - 1) / ST, lo = min(V, tid * C), hi = min(V, lo + C);
    if (tid == 0) {
        p = *at<SampleParams>(c, s.params);
        rng0 = *at<u64>(c, s.rng);
        u32 b = 0;
        if (!isfinite(p.temperature)) b = 1;
        else if (!(p.top_p >= 0.0f && p.top_p <= 1.0f)) b = 2;
        else if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) b = 3;
        else if (!(isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f)) b = 4;
        else if (p.history_len > s.history_cap) b = 5;
        bad = b;
        if (b) report(c, ERR_SAMPLE_PARAMS, b, p.history_len);
    }
    __syncthreads();
    tl_guard_.mark(4);
    if (bad) return;
    const u32 hl = p.history_len;
    const u32* hist = at<u32>(c, s.history) + (s.history_cap - hl);
    int hb = 0;
    for (u32 j = tid; j < hl; j += ST)
        if (hist[j] >= V) { hb = 1; report(c, ERR_SAMPLE_HISTORY_ID, hist[j], j); }
    if (__syncthreads_or(hb)) return;
    if (pre) {
        PDL_WAIT_ONLY();
        tl_guard_.waited();
        PDL_TRIGGER();
    }

    // Greedy without a penalty: the argmax straight from the logits, 8 loads in flight,
    // block b of the grid over its slice of the vocabulary; with several blocks each
    // writes (value, index) to scratch and the last to finish (counter SAMPLE_COUNTER)
    // merges them. Every other path runs in block 0 alone.
    if (p.temperature <= 0.0f && p.repeat_penalty == 1.0f) {
        const float* logits = at<float>(c, s.logits);
        const u32 nb = gridDim.x, per = (V + nb - 1) / nb, v0 = min(V, blockIdx.x * per), v1 = min(V, v0 + per);
        float bv = -INFINITY;
        u32 bi = 0xffffffffu;
        // (Its loop's tail one load at a time cost 6.6 us for the blocks' argmax on an H100.)
        each_logit(logits, v0, v1, [&](u32 t, int, float x) { argmax_merge(bv, bi, x, t); });
        u32 r = block_argmax(bv, bi);
        tl_guard_.mark(5);
        if (nb == 1) {
            if (tid == 0) *at<u32>(c, s.out) = r == 0xffffffffu ? 0u : r;
            return;
        }
        if (tid == 0) {
            float rv = -INFINITY;
            if (r != 0xffffffffu) {
                rv = logits[r];
                if (rv != rv) rv = -INFINITY;
            }
            c.scratch[2 * blockIdx.x] = rv;
            ((u32*)c.scratch)[2 * blockIdx.x + 1] = r;
        }
        if (!last_block(c.counters + SAMPLE_COUNTER, nb)) return;
        tl_guard_.mark(6);
        float mv = -INFINITY;
        u32 mi = 0xffffffffu;
        for (u32 b = tid; b < nb; b += ST) {
            const u32 i = __ldcg((const u32*)c.scratch + 2 * b + 1);
            if (i != 0xffffffffu) argmax_merge(mv, mi, __ldcg(c.scratch + 2 * b), i);
        }
        const u32 m = block_argmax(mv, mi);
        if (tid == 0) *at<u32>(c, s.out) = m == 0xffffffffu ? 0u : m;
        tl_guard_.mark(7);
        return;
    }
    float* l = c.scratch;
    float* pb = c.scratch + V;
    // Top-k sampling over the blocks (temperature, no penalty, top_k * blocks <= ST): block
    // b scales its slice of the logits into l, finds the top_k of it (radix select, ties by
    // ascending id) and lists their ids in pb; the last block to finish selects the top_k
    // of the lists and runs the survivors' pipeline (`sample_compact`) on them: the same
    // survivors and the same arithmetic as the one-block path, which walked the whole
    // vocabulary in one SM (~110 us a token for Llama 3's). What that does not take falls
    // back to the vocabulary-wide path below, in the last block, with l already filled.
    const u32 nb = gridDim.x;
    bool loaded = false;
    if (nb > 1 && p.temperature > 0.0f && p.repeat_penalty == 1.0f && p.top_k > 0 && p.top_k < V &&
        p.top_k * nb <= ST) {
        // gid: the block's survivors, then (last block) the lists' ids; eid: equals at the
        // cut (more than SEQ of them: the vocabulary-wide path).
        constexpr u32 SEQ = 512;
        __shared__ u32 gid[ST], eid[SEQ], boff[65];
        u32* cand = gid;
        __shared__ u32 ngt_s, neq_s;
        const float* logits = at<float>(c, s.logits);
        const float T = p.temperature;
        const u32 per = (V + nb - 1) / nb, v0 = min(V, blockIdx.x * per), v1 = min(V, v0 + per), n = v1 - v0;
        // A slice of at most 8 ST logits (Llama 3's: 8016) stays in registers as keys,
        // element v0 + tid + u ST in kr[u]: the select's four rounds and the compaction
        // read them instead of l from L2 (l is still written: the last block reads it).
        const bool inreg = n <= 8 * ST;
        u32 kr[8];
        each_logit(logits, v0, v1, [&](u32 t, int u, float x) {
            const float y = x / T;
            l[t] = y;
            kr[u] = order_key(y);
        });
        __syncthreads();
        u32* list = (u32*)pb + blockIdx.x * (ST + 1); // count, then ids (0xffffffff: overflow)
        const u32 kb = min(p.top_k, n);
        u32 cnt = 0;
        if (kb > 0) {
            // This thread's keys (registers, or l) and their element.
            auto each_key = [&](auto f) {
                if (inreg) {
#pragma unroll
                    for (int u = 0; u < 8; u++)
                        if (v0 + tid + u * ST < v1) f(kr[u], v0 + tid + u * ST);
                    return;
                }
                for (u32 t = v0 + tid; t < v1; t += 8 * ST) {
                    u32 kk[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) kk[u] = t + u * ST < v1 ? order_key(l[t + u * ST]) : 0u;
#pragma unroll
                    for (int u = 0; u < 8; u++)
                        if (t + u * ST < v1) f(kk[u], t + u * ST);
                }
            };
            u32 ties;
            const u32 kstar = radix_select(kb, [&](auto f) { each_key([&](u32 k, u32) { f(k); }); }, ties);
            if (tid == 0) { ngt_s = 0; neq_s = 0; }
            __syncthreads();
            each_key([&](u32 k, u32 t) {
                if (k > kstar) {
                    const u32 i = atomicAdd(&ngt_s, 1u);
                    if (i < ST) gid[i] = t;
                } else if (k == kstar) {
                    const u32 i = atomicAdd(&neq_s, 1u);
                    if (i < SEQ) eid[i] = t;
                }
            });
            __syncthreads();
            const u32 ngt = ngt_s, neq = neq_s;
            if (neq > SEQ || ties > neq || ngt + ties > ST) {
                cnt = 0xffffffffu;
            } else {
                sort_distinct<u32>(eid, neq, 0xffffffffu); // the needed equals: the smallest ids
                for (u32 i = tid; i < ties; i += ST) gid[ngt + i] = eid[i];
                cnt = ngt + ties;
                __syncthreads();
            }
        }
        if (tid == 0) list[0] = cnt;
        if (cnt != 0xffffffffu)
            for (u32 i = tid; i < cnt; i += ST) list[1 + i] = gid[i];
        tl_guard_.mark(5);
        if (!last_block(c.counters + SAMPLE_COUNTER, nb)) return;
        tl_guard_.mark(6);
        // The last block: the lists' ids into cand (block order), then top_k of them. The
        // counts are read at once (was one dependent L2 round trip per block on thread 0).
        __shared__ u32 bcnt[64];
        for (u32 b = tid; b < nb; b += ST) bcnt[b] = __ldcg((const u32*)pb + b * (ST + 1));
        __syncthreads();
        if (tid == 0) {
            u32 tot = 0, bad = 0;
            for (u32 b = 0; b < nb; b++) {
                const u32 cb = bcnt[b];
                boff[b] = tot;
                if (cb == 0xffffffffu || tot + cb > ST) bad = 1;
                else tot += cb;
            }
            boff[nb] = bad ? 0xffffffffu : tot;
        }
        __syncthreads();
        const u32 total = boff[nb];
        if (total != 0xffffffffu) {
            for (u32 i = tid; i < total; i += ST) {
                u32 b = 0;
                while (b + 1 < nb && boff[b + 1] <= i) b++;
                cand[i] = __ldcg((const u32*)pb + b * (ST + 1) + 1 + (i - boff[b]));
            }
            __syncthreads();
            // One candidate a thread (total <= ST), its key in a register for the select.
            const u32 mk = tid < total ? order_key(l[cand[tid]]) : 0u;
            u32 ties;
            const u32 kstar = radix_select(p.top_k, [&](auto f) { if (tid < total) f(mk); }, ties);
            tl_guard_.mark(7);
            if (sample_compact(c, s, p, rng0, l, total, kstar, ties, cand)) return;
        }
        loaded = true;
    } else if (blockIdx.x != 0) {
        return;
    }
    // Coalesced, and the loads independent of the stores (the logits may live in host
    // memory, HOST-hinted: a dependent per-thread walk paid a bus round trip per element).
    // Without a penalty the temperature is applied here, in the same pass (the same
    // division as the separate pass below).
    const bool fold_t = p.repeat_penalty == 1.0f && p.temperature > 0.0f;
    if (!loaded) {
        const float* __restrict__ logits = at<float>(c, s.logits);
        float* __restrict__ ld = l;
        const float T = p.temperature;
        each_logit(logits, 0, V, [&](u32 t, int, float x) { ld[t] = fold_t ? x / T : x; });
    }
    __syncthreads();
    // 1. Repetition penalty, once per distinct token of the window.
    if (p.repeat_penalty != 1.0f) {
        for (u32 j = tid; j < hl; j += ST) {
            u32 tok = hist[j];
            bool first = true;
            for (u32 jj = 0; jj < j; jj++) if (hist[jj] == tok) { first = false; break; }
            if (first) { float v = l[tok]; l[tok] = v > 0.0f ? v / p.repeat_penalty : v * p.repeat_penalty; }
        }
        __syncthreads();
    }
    // 2. Greedy.
    if (p.temperature <= 0.0f) {
        float bv = -INFINITY;
        u32 bi = 0xffffffffu;
        for (u32 t = tid; t < V; t += ST) argmax_merge(bv, bi, l[t], t);
        u32 r = block_argmax(bv, bi);
        if (tid == 0) *at<u32>(c, s.out) = r == 0xffffffffu ? 0u : r;
        return;
    }
    if (!fold_t) {
        for (u32 t = tid; t < V; t += ST) l[t] = l[t] / p.temperature;
        __syncthreads();
    }
    // pb (kept: > 0) is written by the top-k tie pass below, or here when nothing cuts.
    // 3. Top-k: keep keys above the k-th largest, and its ties by ascending id.
    if (p.top_k > 0 && p.top_k < V) {
        u32 ties;
        u32 kstar = radix_select_count(V, p.top_k, [&](u32 t, u32& k) { k = order_key(l[t]); return true; }, ties);
        if (p.top_k <= ST && sample_compact(c, s, p, rng0, l, V, kstar, ties)) return;
        u32 mine = 0;
        for (u32 t = lo; t < hi; t++) mine += order_key(l[t]) == kstar;
        u32 tot;
        u32 rank = scan_u32(mine, tot);
        for (u32 t = lo; t < hi; t++) {
            u32 k = order_key(l[t]);
            bool keep = k > kstar || (k == kstar && rank++ < ties);
            pb[t] = keep ? 1.0f : -1.0f;
        }
        __syncthreads();
    } else {
        for (u32 t = tid; t < V; t += ST) pb[t] = 1.0f;
        __syncthreads();
    }
    // 4. Softmax over the kept tokens.
    float mx = -INFINITY;
    for (u32 t = tid; t < V; t += ST) if (pb[t] > 0.0f) mx = fmaxf(mx, l[t]);
    mx = block_max(mx);
    if (mx == -INFINITY) {
        float bv = -INFINITY;
        u32 bi = 0xffffffffu;
        for (u32 t = tid; t < V; t += ST) argmax_merge(bv, bi, l[t], t);
        u32 r = block_argmax(bv, bi);
        if (tid == 0) *at<u32>(c, s.out) = r == 0xffffffffu ? 0u : r;
        return;
    }
    double se = 0.0;
    for (u32 t = tid; t < V; t += ST) if (pb[t] > 0.0f) se += (double)expf(l[t] - mx);
    se = block_sum_d(se);
    for (u32 t = tid; t < V; t += ST) if (pb[t] > 0.0f) pb[t] = (float)((double)expf(l[t] - mx) / se);
    __syncthreads();
    // 5. Top-p: the smallest prefix by descending probability (ties by id) whose mass
    //    reaches top_p. Weighted radix select on the probability bits.
    if (p.top_p < 1.0f) {
        __shared__ double mass[256];
        __shared__ u32 cnt[256];
        __shared__ u32 sh_prefix, sh_all;
        __shared__ double sh_above;
        u32 prefix = 0, mask = 0;
        double above = 0.0;
        if (tid == 0) sh_all = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += ST) { mass[b] = 0.0; cnt[b] = 0; }
            __syncthreads();
            for (u32 t = tid; t < V; t += ST) {
                float v = pb[t];
                if (v >= 0.0f) {
                    u32 k = __float_as_uint(v);
                    if ((k & mask) == prefix) { atomicAdd(&mass[(k >> shift) & 255], (double)v); atomicAdd(&cnt[(k >> shift) & 255], 1u); }
                }
            }
            __syncthreads();
            if (tid == 0) {
                int b = 255;
                for (; b >= 0; b--) {
                    if (cnt[b] > 0 && above + mass[b] >= (double)p.top_p) break;
                    above += mass[b];
                }
                if (b < 0) { sh_all = 1; b = 0; }
                sh_prefix = prefix | ((u32)b << shift);
                sh_above = above;
            }
            __syncthreads();
            prefix = sh_prefix;
            above = sh_above;
            mask |= 255u << shift;
            if (sh_all) break;
        }
        __syncthreads();
        if (!sh_all) {
            float vs = __uint_as_float(prefix);
            // How many tokens of probability vs (ascending id) complete the prefix.
            u32 need = 1;
            if (vs > 0.0f) {
                double j = ceil(((double)p.top_p - above) / (double)vs);
                need = j < 1.0 ? 1u : (j > 4e9 ? 0xffffffffu : (u32)j);
                while (need > 1 && above + (double)(need - 1) * vs >= (double)p.top_p) need--;
                while (need < 0xffffffffu && above + (double)need * vs < (double)p.top_p) need++;
            } else {
                need = 0xffffffffu;
            }
            u32 mine = 0;
            for (u32 t = lo; t < hi; t++) mine += pb[t] >= 0.0f && __float_as_uint(pb[t]) == prefix;
            u32 tot;
            u32 rank = scan_u32(mine, tot);
            for (u32 t = lo; t < hi; t++) {
                float v = pb[t];
                if (v < 0.0f) continue;
                u32 k = __float_as_uint(v);
                bool keep = k > prefix || (k == prefix && rank++ < need);
                if (!keep) pb[t] = -1.0f;
            }
        }
        __syncthreads();
    }
    // 6. Min-p.
    if (p.min_p > 0.0f) {
        float pm = 0.0f;
        for (u32 t = tid; t < V; t += ST) pm = fmaxf(pm, pb[t]);
        pm = block_max(pm);
        float thr = p.min_p * pm;
        for (u32 t = tid; t < V; t += ST) if (pb[t] >= 0.0f && pb[t] < thr) pb[t] = -1.0f;
        __syncthreads();
    }
    // 7. Draw, walking the survivors in ascending token id.
    __shared__ double part[ST];
    __shared__ u32 found, last;
    double mine = 0.0;
    int mylast = -1;
    for (u32 t = lo; t < hi; t++) if (pb[t] >= 0.0f) { mine += (double)pb[t]; mylast = (int)t; }
    part[tid] = mine;
    if (tid == 0) { found = 0xffffffffu; last = 0; }
    __syncthreads();
    if (mylast >= 0) atomicMax(&last, (u32)mylast);
    __shared__ u64 rng_new;
    __shared__ double u_s;
    if (tid == 0) {
        double acc = 0.0;
        for (int i = 0; i < ST; i++) { double t = part[i]; part[i] = acc; acc += t; }
        u64 st;
        const float u = draw_uniform(rng0, st);
        rng_new = st;
        u_s = (double)u * acc;
    }
    __syncthreads();
    {
        double cum = part[tid];
        double u = u_s;
        if (u < cum + mine) {
            for (u32 t = lo; t < hi; t++) {
                if (pb[t] < 0.0f) continue;
                cum += (double)pb[t];
                if (u < cum) { atomicMin(&found, t); break; }
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        *at<u64>(c, s.rng) = rng_new;
        *at<u32>(c, s.out) = found != 0xffffffffu ? found : last;
    }
}
