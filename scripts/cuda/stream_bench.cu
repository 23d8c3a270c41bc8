// What a kernel-per-op decode can reach (standalone, so its TMA helpers repeat the three
// of crates/backend-cuda/src/cu/common.cuh): pure weight streams of the Llama-3.2-1B step
// sizes, cold in L2, alone and chained the way a decode token chains them.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/stream_bench scripts/cuda/stream_bench.cu && /tmp/stream_bench
//
// Two ways to stream W: `ldg` (each thread 16-byte ld.global.nc loads, U in flight, grid
// stride) and `tma` (the mvp pattern: per block a ring of NS shared buffers of SB bytes,
// each filled by one cp.async.bulk onto an mbarrier; block b takes chunks b, b + G, ..).
// Each launch reads its own bytes (a rotating window of a 3 GB pool), so no read hits L2.
// The chain is 16 x (q/k/v 12.6 MB, a latency kernel, wo 8.4 MB, gate/up 67 MB, down
// 33.5 MB) + the head 525 MB = 2.47 GB, captured as one CUDA graph, with or without PDL
// (the tma kernels then issue `early` chunks before griddepcontrol.wait).
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <cuda_runtime.h>

typedef unsigned long long u64;
typedef unsigned u32;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__device__ __forceinline__ uint4 ldg_nc(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

template <int U>
__global__ void __launch_bounds__(256) ldg_stream(const uint4* src, u64 n16, u32* out, int pdl) {
    if (pdl) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u32 acc = 0;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (U - 1) * stride < n16; i += U * stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = ldg_nc(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        uint4 v = ldg_nc(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) out[0] = acc;
}

__device__ __forceinline__ void bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void wait_bar(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}

__global__ void __launch_bounds__(256, 2) tma_stream(const uint8_t* src, u64 bytes, u32 SB, u32 NS, u32 early, u32* out, int pdl) {
    extern __shared__ __align__(128) uint8_t sm[];
    __shared__ __align__(8) u64 bars[8];
    const u32 G = gridDim.x, tid = threadIdx.x;
    const u64 nch = bytes / SB;
    const u32 nst = blockIdx.x < nch ? (u32)((nch - blockIdx.x + G - 1) / G) : 0u;
    const u32 sbase = (u32)__cvta_generic_to_shared(sm), bbase = (u32)__cvta_generic_to_shared(bars);
    if (pdl) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    auto issue = [&](u32 s) {
        if (s >= nst) return;
        const u32 b = s % NS, bar = bbase + 8 * b;
        expect(bar, SB);
        bulk(sbase + b * SB, src + ((u64)s * G + blockIdx.x) * SB, SB, bar);
    };
    if (tid == 0) {
        for (u32 i = 0; i < NS; i++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bbase + 8 * i) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (u32 s = 0; s < (pdl ? early : 0u) && s < NS; s++) issue(s);
    }
    __syncthreads();
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (tid == 0)
        for (u32 s = pdl ? early : 0u; s < NS; s++) issue(s);
    u32 acc = 0;
    for (u32 s = 0; s < nst; s++) {
        const u32 b = s % NS;
        wait_bar(bbase + 8 * b, (s / NS) & 1);
        const uint4* w = (const uint4*)(sm + b * SB);
        for (u32 i = tid; i < SB / 16; i += 256) {
            const uint4 v = w[i];
            acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
        __syncthreads();
        if (tid == 0) issue(s + NS);
    }
    if (acc == 0x12345678u) out[0] = acc;
}

// A dependent latency kernel (stands for the attention at depth 0): one block per KV
// group reads a few KB written by the step before and writes a few KB.
__global__ void lat_kernel(const float* in, float* o, int pdl) {
    if (pdl) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
    float a = 0;
    for (int i = threadIdx.x; i < 384; i += blockDim.x) a += in[blockIdx.x * 384 + i];
    o[blockIdx.x * blockDim.x + threadIdx.x] = a;
}

struct Cfg { const char* name; int kind; int bps; u32 SB, NS, early; int U; };

static int sms;
static uint8_t* pool;
static u64 pool_bytes, pool_at;
static u32* dout;
static float* dlat;

static const uint8_t* next_window(u64 bytes) {
    if (pool_at + bytes > pool_bytes) pool_at = 0;
    const uint8_t* p = pool + pool_at;
    pool_at += (bytes + 4095) / 4096 * 4096;
    return p;
}

// A launch on `st` of `grid` blocks of 256 threads, with programmatic stream
// serialization when `pdl` (`at`: the caller's storage for the attribute).
static cudaLaunchConfig_t launch_cfg(cudaStream_t st, int pdl, unsigned grid, cudaLaunchAttribute* at) {
    cudaLaunchConfig_t lc = {};
    at->id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at->val.programmaticStreamSerializationAllowed = 1;
    lc.attrs = at;
    lc.numAttrs = pdl ? 1 : 0;
    lc.stream = st;
    lc.gridDim = dim3(grid);
    lc.blockDim = dim3(256);
    return lc;
}

static void launch(const Cfg& c, const uint8_t* src, u64 bytes, cudaStream_t st, int pdl) {
    cudaLaunchAttribute at;
    cudaLaunchConfig_t lc = launch_cfg(st, pdl, sms * c.bps, &at);
    if (c.kind == 0) {
        if (c.U == 4) CK(cudaLaunchKernelEx(&lc, ldg_stream<4>, (const uint4*)src, bytes / 16, dout, pdl));
        else CK(cudaLaunchKernelEx(&lc, ldg_stream<8>, (const uint4*)src, bytes / 16, dout, pdl));
    } else {
        lc.dynamicSmemBytes = c.SB * c.NS;
        CK(cudaLaunchKernelEx(&lc, tma_stream, src, bytes, c.SB, c.NS, c.early, dout, pdl));
    }
}

static void launch_lat(cudaStream_t st, int pdl) {
    cudaLaunchAttribute at;
    cudaLaunchConfig_t lc = launch_cfg(st, pdl, 8, &at);
    CK(cudaLaunchKernelEx(&lc, lat_kernel, (const float*)dlat, dlat + 8192, pdl));
}

// Capture `body` as a graph, replay it `reps` times, return us per replay (best of 3).
template <class F>
static double time_graph(cudaStream_t st, int reps, F body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaStreamSynchronize(st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    double best = 1e30;
    for (int t = 0; t < 3; t++) {
        CK(cudaEventRecord(a, st));
        for (int r = 0; r < reps; r++) CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        if (ms * 1000.0 / reps < best) best = ms * 1000.0 / reps;
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return best;
}

int main() {
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaFuncSetAttribute(tma_stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    pool_bytes = 3ull << 30;
    CK(cudaMalloc(&pool, pool_bytes));
    CK(cudaMemset(pool, 1, pool_bytes));
    CK(cudaMalloc(&dout, 4096));
    CK(cudaMalloc(&dlat, 1 << 20));
    CK(cudaMemset(dlat, 0, 1 << 20));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    printf("SMs %d\n", sms);

    const Cfg cfgs[] = {
        {"ldg U4 1/SM", 0, 1, 0, 0, 0, 4},   {"ldg U8 1/SM", 0, 1, 0, 0, 0, 8},
        {"ldg U4 2/SM", 0, 2, 0, 0, 0, 4},   {"ldg U8 2/SM", 0, 2, 0, 0, 0, 8},
        {"ldg U8 4/SM", 0, 4, 0, 0, 0, 8},   {"ldg U4 8/SM", 0, 8, 0, 0, 0, 4},
        {"tma 32K x2 1/SM", 1, 1, 32768, 2, 1, 0}, {"tma 32K x3 1/SM", 1, 1, 32768, 3, 1, 0},
        {"tma 32K x2 2/SM", 1, 2, 32768, 2, 1, 0}, {"tma 16K x4 2/SM", 1, 2, 16384, 4, 2, 0},
        {"tma 32K x4 1/SM", 1, 1, 32768, 4, 2, 0}, {"tma 16K x2 2/SM", 1, 2, 16384, 2, 1, 0},
        {"tma 64K x2 1/SM", 1, 1, 65536, 2, 1, 0}, {"tma 8K x8 2/SM", 1, 2, 8192, 8, 4, 0},
    };
    const u64 sizes[] = {2048ull * 2048 * 2, 2048ull * 3072 * 2, 8192ull * 2048 * 2, 16384ull * 2048 * 2, 128256ull * 2048 * 2};
    const char* names[] = {"wo 8.4MB", "qkv 12.6MB", "down 33.5MB", "gate/up 67MB", "head 525MB"};

    printf("\n## One step alone (us per launch, 20 launches a graph, each on cold bytes; TB/s)\n");
    printf("| config |");
    for (auto n : names) printf(" %s |", n);
    printf("\n|---|");
    for (size_t i = 0; i < 5; i++) printf("---:|");
    printf("\n");
    for (const Cfg& c : cfgs) {
        printf("| %s |", c.name);
        for (int si = 0; si < 5; si++) {
            const u64 B = sizes[si];
            const int n = si == 4 ? 4 : 20;
            double us = time_graph(st, 5, [&] {
                for (int i = 0; i < n; i++) launch(c, next_window(B), B, st, 0);
            }) / n;
            printf(" %.2f (%.2f) |", us, B / us / 1e6);
        }
        printf("\n");
        fflush(stdout);
    }

    printf("\n## The decode chain: 16 x (qkv, lat, wo, gate/up, down) + head; floor 0.824 ms at 3.0 TB/s\n");
    printf("| config | no PDL ms | PDL ms | PDL, no latency kernel ms |\n|---|---:|---:|---:|\n");
    const Cfg chain[] = {cfgs[3], cfgs[5], cfgs[8], cfgs[9], cfgs[6], cfgs[13]};
    u64 per_layer[4] = {sizes[1], sizes[0], sizes[3], sizes[2]};
    for (const Cfg& c : chain) {
        double r[3];
        for (int v = 0; v < 3; v++) {
            const int pdl = v > 0, lat = v < 2;
            pool_at = 0;
            r[v] = time_graph(st, 10, [&] {
                for (int l = 0; l < 16; l++)
                    for (int s = 0; s < 4; s++) {
                        launch(c, next_window(per_layer[s]), per_layer[s], st, pdl);
                        if (s == 0 && lat) launch_lat(st, pdl);
                    }
                launch(c, next_window(sizes[4]), sizes[4], st, pdl);
            });
        }
        printf("| %s | %.3f | %.3f | %.3f |\n", c.name, r[0] / 1000, r[1] / 1000, r[2] / 1000);
        fflush(stdout);
    }
    // One big read of the same 2.47 GB in one launch: the stream's own ceiling.
    {
        const u64 B = 16 * (sizes[0] + sizes[1] + sizes[2] + sizes[3]) + sizes[4];
        for (const Cfg& c : {cfgs[3], cfgs[8]}) {
            pool_at = 0;
            double us = time_graph(st, 5, [&] { launch(c, next_window(B), B, st, 0); });
            printf("one launch of all %.2f GB, %s: %.3f ms (%.2f TB/s)\n", B / 1e9, c.name, us / 1000, B / us / 1e6);
        }
    }
    return 0;
}
