// The decode megakernel ("mega", graph.rs `mega_plan`; sm_90, f16/bf16 W): a run of a
// decode step's matvec steps (`mvp` shapes with J = 8) and fused attention steps
// (`rope_kv_attn`) as one launch of one block per SM, so that the weight stream need not
// stop at a step boundary. Opt-in (`SAMEPAGE_CUDA_MEGA=1`): on an H100 it decodes the
// Llama-1B-shaped bf16 model ~18% slower than the step-by-step launches (its streaming
// phases run below the HBM rate the `mvp` launches reach, and the attention, now
// overlapped with the weight stream, takes longer; scripts/cuda/NOTES.md, session 10).
// Each block has a producer warp and MG_T / 32 consumer warps:
//
// - The producer (warp MG_T / 32, one lane) walks every matvec phase's stages of this
//   block, in order, and copies each into the next of MG_NS ring slots of MG_SLOT bytes
//   (bulk copies, as `mvp` does), as soon as the consumers have released the slot. No op
//   of the graph writes W (checked on the host), so it never waits for a phase's input:
//   while the consumers wait at a barrier, normalise x or run the attention, the ring
//   keeps filling from HBM.
// - The consumers run the phases one after another. A phase starts with a grid barrier
//   (every block has finished the phase before: its outputs are this phase's inputs);
//   a matvec phase then reads x (rmsnorm'd with the norm) as `mvp` does and consumes its
//   stages from the ring, two groups of four warps taking alternate stages; an attention
//   phase is `rope_kv_attn_body`, block b the unit b (a (KV head, split) pair; blocks past
//   the units only pass the barriers).
//
// The grid barrier is a counter in `bar[0]`: after its phase, thread 0 of each block
// adds 1 (a release) and waits (acquire loads) until it reaches G * phase. A block always
// waits before it adds again, so the counts of two barriers never mix. The last block to
// leave (bar[1]) zeroes the words for the next launch. Values written within the launch
// are read with ld.cg (L1 is not coherent across SMs). All blocks must be resident at
// once: the host launches one per SM, each needing most of an SM's shared memory; a wait
// that lasts MG_STALL_NS (an SM held by other work) gives up, reports ERR_MEGA_STALL and
// sets bar[2] so every block gives up: the consumers then drain the ring (the producer's
// copies must land before the block leaves) and skip the rest.
#define MG_T 256
#define MG_NS 5
#define MG_SLOT 32768u
#define MG_XMAX 8192  // x of a matvec phase, floats (k)
#define MG_PREV 1024  // a phase's rows' bias / old values of one block
#define MG_STALL_NS 2000000000ull
#define ERR_MEGA_STALL 6
#define MG_SMEM (MG_NS * MG_SLOT + 4 * (MG_XMAX + MG_PREV))

// A phase: kind 0 a matvec step (mv), 1 a fused attention step (at, with the launch's
// aux: splits and flags). op, tmap: the step's op index and per-token slot map (`Ctx`).
struct MegaPhase {
    u32 kind, op, tmap, aux, f16, pad_[3];
    MvPipe mv;
    RopeKvAttn at;
    u32 tail_[1]; // to a multiple of 16 bytes (copied by 16-byte cp.async)
};
static_assert(sizeof(MegaPhase) == 912, "MegaPhase must match exec.rs");
// ph: the phases (device memory), n of them; bar: three zeroed words (above).
struct Mega { const MegaPhase* ph; u32* bar; u32 n, pad_; };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The consumer warps' barrier (named barrier 1), the one the shared attention body uses.
static_assert(MG_T == RKA_T, "the attention body runs on the consumer warps");
__device__ __forceinline__ void mg_sync() { rka_sync<true>(); }

__device__ __forceinline__ u32 mg_load_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Thread 0 after the consumers' barrier: its block's count, releasing their writes.
__device__ __forceinline__ void mg_arrive(u32* p) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p) : "memory");
}

// Stages of this block in a matvec phase of N virtual rows, R a stage, G blocks.
__device__ __forceinline__ u32 mg_stages(u32 N, u32 R, u32 G) {
    const u32 T = (N + R - 1) / R;
    return blockIdx.x < T ? (T - blockIdx.x + G - 1) / G : 0u;
}

// Thread 0 of the consumers: wait until the barrier counter reaches `target`; false (and
// the abort word set) when it gave up.
__device__ bool mg_wait_count(const Ctx& c, const Mega& m, u32 target, u32 phase) {
    u64 t0 = 0;
    for (u32 spins = 1;; spins++) {
        if (mg_load_acquire(m.bar) >= target) return true;
        if (spins % 256 != 0) continue;
        if (mg_load_acquire(m.bar + 2)) return false;
        if (spins == 256) t0 = gtime();
        else if (gtime() - t0 > MG_STALL_NS) {
            atomicExch(m.bar + 2, 1u);
            report(c, ERR_MEGA_STALL, phase, mg_load_acquire(m.bar));
            return false;
        }
    }
}

// The consumers' part of a matvec phase (mvp_body's dense path, with the stages from the
// ring): `it` counts the block's stages over the launch (slot it % MG_NS, its parity).
// dry: only take the stages from the ring and release them (after an abort).
// issued: the producer's count of stages issued (shared memory).
template <u32 DT, class Wait>
__device__ void mg_mv(const Ctx& c, const MvPipe& g, u32 G, u32& it, u8* smem, u32 bfull, u32 bempty, bool dry,
                      const volatile u32* issued, Wait wait) {
    constexpr u32 J = 8, L = 256 * J;
    __shared__ float red[8], part[2][2][8];
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u32 P = g.P, R = g.R, RP = R * P, p = warp % P;
    const u32 k = g.m[0].k, rb = k * 2;
    const u32 N = g.rend[g.count - 1], nst = mg_stages(N, R, G);
    float* xs = (float*)(smem + MG_NS * MG_SLOT);
    float* prev = xs + MG_XMAX;
    TlGuard tl_guard_(c);
    float xr[J][8];
    if (!dry) {
        wait();
        tl_guard_.waited();
        // x into shared memory; with the norm, x * weight (the weight read with x: no op
        // writes it, `mega_plan`), scaled by the norm's 1 / rms below, and the sum of
        // squares of x.
        const float4* x4 = (const float4*)at<float>(c, g.norm ? g.nx : g.m[0].x);
        const float4* w4 = (const float4*)at<float>(c, g.nw);
        float ssq = 0.0f;
        for (u32 i = tid; i < k / 4; i += MG_T) {
            const float4 v = __ldcg(x4 + i);
            ssq = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ssq))));
            if (g.norm) {
                const float4 w = __ldg(w4 + i);
                ((float4*)xs)[i] = make_float4(v.x * w.x, v.y * w.y, v.z * w.z, v.w * w.w);
            } else {
                ((float4*)xs)[i] = v;
            }
        }
        if (g.norm) {
            ssq = warp_sum(ssq);
            if (lane == 0) red[warp] = ssq;
        }
        mvp_pre(c, g, N, G, nst, prev);
        mg_sync();
        if (warp == 0) tl_guard_.mark(7);
#pragma unroll
        for (u32 j = 0; j < J; j++) {
            const u32 col = p * L + (j * 32 + lane) * 8;
            const float4 a = *(const float4*)(xs + col), b = *((const float4*)(xs + col) + 1);
            xr[j][0] = a.x; xr[j][1] = a.y; xr[j][2] = a.z; xr[j][3] = a.w;
            xr[j][4] = b.x; xr[j][5] = b.y; xr[j][6] = b.z; xr[j][7] = b.w;
        }
        if (g.norm) {
            float t = 0.0f;
#pragma unroll
            for (u32 q = 0; q < 8; q++) t += red[q];
            const float inv = 1.0f / sqrtf(t / (float)k + g.eps);
            float* no = at<float>(c, g.nout);
#pragma unroll
            for (u32 j = 0; j < J; j++) {
                const u32 col = p * L + (j * 32 + lane) * 8;
#pragma unroll
                for (u32 e = 0; e < 8; e++) xr[j][e] *= inv;
                // Segment (p, j) of the normalised row by block p * J + j (G >= J * P).
                if (warp == p && p * J + j == blockIdx.x) {
                    *(float4*)(no + col) = make_float4(xr[j][0], xr[j][1], xr[j][2], xr[j][3]);
                    *((float4*)(no + col) + 1) = make_float4(xr[j][4], xr[j][5], xr[j][6], xr[j][7]);
                }
            }
        }
        if (warp == 0) tl_guard_.mark(4);
    }
    // Two groups of four warps take alternate stages (two stages in flight in the
    // consumers, as two `mvp` blocks share an SM). In a stage every warp of the group
    // computes the parts lw and lw + 4 (row-part q = row * P + part, P in {1, 2, 4}: its
    // part is warp % P, the xr it holds).
    const u32 grp = warp >> 2, lw = warp & 3, gt = tid & 127;
    for (u32 s = 0; s < nst; s++, it++) {
        if ((s & 1) != grp) continue;
        const u32 slot = it % MG_NS;
        float* pt = part[grp][(s >> 1) & 1];
        // A group may reach a slot's next fill while the other still holds the fill before
        // it (MG_NS is odd): the parity wait would then see the phase before that one as
        // done. Once the producer has issued this stage, the fill before it was consumed.
        while (*issued <= it) {}
        mvp_wait_bar(bfull + 8 * slot, (it / MG_NS) & 1);
        if (!dry) {
            float acc[2] = {0.0f, 0.0f};
#pragma unroll
            for (u32 h = 0; h < 2; h++) {
                const u32 q = lw + 4 * h;
                const uint4* w = (const uint4*)(smem + slot * MG_SLOT + (q / P) * rb + p * L * 2) + lane;
#pragma unroll
                for (u32 j0 = 0; j0 < J; j0 += 4) {
                    uint4 wr[4];
#pragma unroll
                    for (u32 j = 0; j < 4; j++) wr[j] = w[(j0 + j) * 32];
                    float accj[4];
#pragma unroll
                    for (u32 j = 0; j < 4; j++) accj[j] = mvp_dot8<DT>(wr[j], xr[j0 + j], 0.0f);
                    acc[h] += (accj[0] + accj[1]) + (accj[2] + accj[3]);
                }
            }
            acc[0] = warp_sum(acc[0]);
            acc[1] = warp_sum(acc[1]);
            if (lane == 0) {
                pt[lw] = acc[0];
                pt[lw + 4] = acc[1];
            }
        }
        // The group is done with the slot; its parts are in.
        asm volatile("bar.sync %0, 128;" ::"r"(2 + grp) : "memory");
        if (gt == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bempty + 8 * slot) : "memory");
        if (dry) continue;
        // The outputs as mvp_body's epilogue writes them (mvp.cu; a shared function changed
        // ptxas's register allocation there: mvp_bf16_8 spilled).
        const u32 v0 = (s * G + blockIdx.x) * R;
        const float* pv = prev + s * R;
        u32 mi, row;
        if (!g.pair) {
            if (gt < R && mvp_pos(g, N, v0, gt, mi, row)) {
                float a = g.pre ? pv[gt] : 0.0f;
                for (u32 q = 0; q < P; q++) a += pt[gt * P + q];
                at<float>(c, g.m[mi].out)[row] = a;
            }
        } else if (gt < R / 2 && mvp_pos(g, N, v0, gt, mi, row)) {
            const u32 h = R / 2;
            float a = g.pre ? pv[gt] : 0.0f, b = g.pre ? pv[gt + h] : 0.0f;
            for (u32 q = 0; q < P; q++) {
                a += pt[gt * P + q];
                b += pt[(gt + h) * P + q];
            }
            at<float>(c, g.m[0].out)[row] = a;
            at<float>(c, g.m[1].out)[row] = b;
            at<float>(c, g.sw_out)[row] = a / (1.0f + expf(-a)) * b;
        }
        if (s + 1 == nst && tid == 0) tl_guard_.mark(6);
    }
}

// The producer: every matvec phase's stages of this block into the ring, in order.
// After an abort it goes on: the consumers drain the ring (dry) to the end. `issued`
// counts the stages issued.
__device__ void mg_produce(const Ctx& c, const Mega& m, u32 G, u32 sbase, u32 bfull, u32 bempty, volatile u32* issued) {
    u32 it = 0;
    for (u32 ph = 0; ph < m.n; ph++) {
        if (m.ph[ph].kind != 0) continue;
        const MvPipe g = m.ph[ph].mv;
        const u32 R = g.R, N = g.rend[g.count - 1], rb = g.m[0].k * 2, nst = mg_stages(N, R, G);
        for (u32 s = 0; s < nst; s++, it++) {
            const u32 slot = it % MG_NS, bar = bfull + 8 * slot, dst = sbase + slot * MG_SLOT;
            if (it >= MG_NS) {
                // The consumers' release of the slot's previous fill.
                const u32 par = ((it / MG_NS) - 1) & 1, eb = bempty + 8 * slot;
                mvp_wait_bar(eb, par);
            }
            __threadfence_block();
            *issued = it + 1;
            // The copies as mvp_body's `issue` makes them (rows of one dtype).
            const u32 v0 = (s * G + blockIdx.x) * R;
            if (g.pair) {
                const u32 j0 = v0 / 2, h = min(R / 2, (N - v0) / 2);
                mvp_expect(bar, 2 * h * rb);
                mvp_bulk(dst, c.base + g.m[0].w + (u64)j0 * rb, h * rb, bar);
                mvp_bulk(dst + (R / 2) * rb, c.base + g.m[1].w + (u64)j0 * rb, h * rb, bar);
                continue;
            }
            const u32 v1 = min(v0 + R, N);
            mvp_expect(bar, (v1 - v0) * rb);
            u32 v = v0, at_ = dst;
            for (u32 mi = 0; mi < g.count && v < v1; mi++) {
                const u32 lo = mi ? g.rend[mi - 1] : 0u, hi = g.rend[mi];
                if (v >= hi) continue;
                const u32 e = min(v1, hi);
                mvp_bulk(at_, c.base + g.m[mi].w + (u64)(v - lo) * rb, (e - v) * rb, bar);
                at_ += (e - v) * rb;
                v = e;
            }
        }
    }
}
#endif

// CF16: the KV caches are f16 (every attention phase's; f32 otherwise).
template <u32 DT, bool CF16> __device__ void mega_body(const Ctx& c0, const Mega& m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) u8 mg_smem[];
    __shared__ __align__(8) u64 bars[2 * MG_NS];
    __shared__ __align__(16) MegaPhase curs[2];
    __shared__ volatile u32 abort_, issued;
    const u32 tid = threadIdx.x, G = gridDim.x;
    const u32 sbase = (u32)__cvta_generic_to_shared(mg_smem);
    const u32 bfull = (u32)__cvta_generic_to_shared(bars), bempty = bfull + 8 * MG_NS;
    if (tid == 0) {
        for (u32 i = 0; i < 2 * MG_NS; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bfull + 8 * i) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        abort_ = 0;
        issued = 0;
    }
    __syncthreads();
    if (tid >= MG_T) {
        // The producer warp: W needs no wait (no op writes it).
        if (tid == MG_T) mg_produce(c0, m, G, sbase, bfull, bempty, &issued);
        return;
    }
    PDL_WAIT_ONLY(); // the kernels before (the staged words, the embedding)
    u32 it = 0;
    bool dry = false;
    // A phase's descriptor into curs[ph % 2]: 16-byte asynchronous copies, issued one
    // phase ahead (the copy is off the path from one barrier to the next).
    auto fetch = [&](u32 ph) {
        if (ph >= m.n) return;
        const u32 dst = (u32)__cvta_generic_to_shared(&curs[ph & 1]);
        const char* src = (const char*)(m.ph + ph);
        for (u32 i = tid; i < sizeof(MegaPhase) / 16; i += MG_T)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 16 * i), "l"(src + 16 * i) : "memory");
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    fetch(0);
    for (u32 ph = 0; ph < m.n; ph++) {
        asm volatile("cp.async.wait_all;" ::: "memory");
        mg_sync(); // curs[ph % 2] is in; every thread is done with the other
        fetch(ph + 1);
        const MegaPhase& cur = curs[ph & 1];
        Ctx c = c0;
        c.op = cur.op;
        c.tmap = cur.tmap;
        // The barrier before the phase: every block has added its count for each of the
        // ph phases before (called once by every consumer thread, or not at all when dry).
        bool waited = false;
        auto wait = [&]() {
            if (ph > 0 && tid == 0 && !mg_wait_count(c, m, G * ph, ph)) abort_ = 1;
            mg_sync();
            waited = true;
        };
        if (cur.kind == 0) {
            mg_mv<DT>(c, cur.mv, G, it, mg_smem, bfull, bempty, dry, &issued, wait);
        } else if (!dry) {
            const u32 units = (cur.aux & 0xffff) * cur.at.a.n_kv_heads;
            if (blockIdx.x < units) {
                rope_kv_attn_body<CF16, 8, true>(c, cur.at, blockIdx.x, cur.aux, wait);
            }
        }
        if (!dry && !waited) wait();
        // abort_ is only set by thread 0 before the barrier in wait(): the same for all.
        if (!dry && abort_) dry = true;
        if (ph + 1 == m.n) PDL_TRIGGER();
        mg_sync(); // the phase's writes (and `cur`'s reads) are done
        if (!dry && ph + 1 < m.n && tid == 0) mg_arrive(m.bar);
    }
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(m.bar + 1, 1u) == G - 1) {
            // Every block has left its last wait: re-arm for the next launch.
            m.bar[0] = 0;
            m.bar[2] = 0;
            __threadfence();
            m.bar[1] = 0;
        }
    }
#endif
}

// mega_<W dtype>_<cache dtype>
#define MEGA_KERNEL(NAME, DT, CF16) \
    extern "C" __global__ void __launch_bounds__(MG_T + 32, 1) mega_##NAME(const Ctx c, const Mega m) { mega_body<DT, CF16>(c, m); }
MEGA_KERNEL(f16_f32, DT_F16, false)
MEGA_KERNEL(f16_f16, DT_F16, true)
MEGA_KERNEL(bf16_f32, DT_BF16, false)
MEGA_KERNEL(bf16_f16, DT_BF16, true)
