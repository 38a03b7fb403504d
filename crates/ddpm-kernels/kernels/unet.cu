// CUDA versions of ddpm_unet::ops' CPU kernels (GroupNorm with shift and SiLU, forward and
// backward; per-channel bias add and its gradient; nearest-neighbour ×2 upsampling and its
// gradient). f32 only. Compiled to PTX by ddpm-kernels' build.rs when the `cuda` feature is on,
// launched by ddpm-unet's src/ops/cuda.rs. Each kernel mirrors the CPU loop of the same op there.

#include <stddef.h>

__device__ __forceinline__ float ddpm_sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread. `scratch` holds 32 floats of shared memory; the leading barrier lets it be reused.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// Mean and 1/σ of one (sample, group) of x + shift, two passes (no E[x²] − E[x]² cancellation).
__device__ void group_stats(const float* x, const float* shift, int c0, int s, int len, float eps,
                            float* scratch, float* mean_out, float* rstd_out) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) acc += x[i] + shift[c0 + i / s];
    const float mean = block_sum(acc, scratch) / (float)len;
    acc = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = x[i] + shift[c0 + i / s] - mean;
        acc += d * d;
    }
    const float var = block_sum(acc, scratch) / (float)len;
    *mean_out = mean;
    *rstd_out = rsqrtf(var + eps);
}

// The (sample, group) a GroupNorm block handles: its channels, its packed parameters
// (gb = [γ (c) ‖ β (c) ‖ shift (n·c)]), the offset of its values in x [n, c, s], and their
// mean and 1/σ.
struct GnBlock {
    int sample, c0, cg, len;
    const float* gamma;
    const float* beta;
    const float* shift;  // this sample's, indexed by channel
    size_t base;
    float mean, rstd;
};

__device__ GnBlock gn_block(const float* x, const float* gb, int c, int groups, int s, float eps,
                            float* scratch) {
    GnBlock b;
    b.sample = blockIdx.x / groups;
    b.cg = c / groups;
    b.c0 = (blockIdx.x % groups) * b.cg;
    b.len = b.cg * s;
    b.gamma = gb;
    b.beta = gb + c;
    b.shift = gb + 2 * (size_t)c + (size_t)b.sample * c;
    b.base = ((size_t)b.sample * c + b.c0) * (size_t)s;
    group_stats(x + b.base, b.shift, b.c0, s, b.len, eps, scratch, &b.mean, &b.rstd);
    return b;
}

// y = act(γ·(x + shift − μ)/σ + β) over x [n, c, s]. One block per (sample, group).
extern "C" __global__ void ddpm_gn_fwd(const float* x, const float* gb, float* y, int n, int c,
                                       int groups, int s, float eps, int silu) {
    __shared__ float scratch[32];
    if ((int)blockIdx.x >= n * groups) return;
    const GnBlock b = gn_block(x, gb, c, groups, s, eps, scratch);
    for (int i = threadIdx.x; i < b.len; i += blockDim.x) {
        const int ch = b.c0 + i / s;
        const float z = (x[b.base + i] + b.shift[ch] - b.mean) * b.rstd * b.gamma[ch] + b.beta[ch];
        y[b.base + i] = silu ? z * ddpm_sigmoid(z) : z;
    }
}

// Backward of ddpm_gn_fwd: out = [dx (n·c·s) ‖ dγ (c) ‖ dβ (c) ‖ dshift (n·c)], zeroed by the
// caller (dγ and dβ are summed over samples with atomics). One block per (sample, group).
extern "C" __global__ void ddpm_gn_bwd(const float* x, const float* gb, const float* dy,
                                       float* out, int n, int c, int groups, int s, float eps,
                                       int silu) {
    __shared__ float scratch[32];
    if ((int)blockIdx.x >= n * groups) return;
    const GnBlock gn = gn_block(x, gb, c, groups, s, eps, scratch);
    const int sample = gn.sample, cg = gn.cg, c0 = gn.c0, len = gn.len;
    const float *gamma = gn.gamma, *beta = gn.beta, *shift = gn.shift;
    const size_t base = gn.base;
    const float mean = gn.mean, rstd = gn.rstd;
    float* dx = out;
    float* dgamma = out + (size_t)n * c * s;
    float* dbeta = dgamma + c;
    float* dshift = dbeta + c;
    // Pass 1, per channel: dz (the gradient before the affine, through SiLU), dx̂ = dz·γ,
    // Σdz·x̂ → dγ, Σdz → dβ; the group sums Σdx̂ and Σdx̂·x̂ for pass 2.
    float sum_dxh = 0.0f, sum_dxh_xh = 0.0f;
    for (int ci = 0; ci < cg; ++ci) {
        const int ch = c0 + ci;
        const float ga = gamma[ch], be = beta[ch], sh = shift[ch];
        const size_t p = base + (size_t)ci * s;
        float acc_g = 0.0f, acc_b = 0.0f;
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            const float xh = (x[p + j] + sh - mean) * rstd;
            float dz = dy[p + j];
            if (silu) {
                const float z = xh * ga + be;
                const float sg = ddpm_sigmoid(z);
                dz *= sg * (1.0f + z * (1.0f - sg));
            }
            acc_g += dz * xh;
            acc_b += dz;
            dx[p + j] = dz * ga;
        }
        acc_g = block_sum(acc_g, scratch);
        acc_b = block_sum(acc_b, scratch);
        if (threadIdx.x == 0) {
            atomicAdd(&dgamma[ch], acc_g);
            atomicAdd(&dbeta[ch], acc_b);
        }
        sum_dxh += acc_b * ga;
        sum_dxh_xh += acc_g * ga;
    }
    const float a = sum_dxh / (float)len, b = sum_dxh_xh / (float)len;
    // Pass 2: dx = (dx̂ − a − x̂·b)/σ; each thread rereads only what it wrote in pass 1.
    for (int ci = 0; ci < cg; ++ci) {
        const int ch = c0 + ci;
        const float sh = shift[ch];
        const size_t p = base + (size_t)ci * s;
        float acc = 0.0f;
        for (int j = threadIdx.x; j < s; j += blockDim.x) {
            const float xh = (x[p + j] + sh - mean) * rstd;
            const float d = rstd * (dx[p + j] - a - xh * b);
            dx[p + j] = d;
            acc += d;
        }
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) dshift[(size_t)sample * c + ch] = acc;
    }
}

// y = x + b over x [n, c, s], b [c] (per_sample = 0) or [n, c] (per_sample = 1).
extern "C" __global__ void ddpm_add_bias(const float* x, const float* b, float* y, size_t total,
                                         int c, int s, int per_sample) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t plane = i / (size_t)s;
        y[i] = x[i] + b[per_sample ? plane : plane % (size_t)c];
    }
}

// Σ over each plane of g [n, c, s]: into out [n, c] (per_sample = 1), or summed over n into
// out [c] with atomics (per_sample = 0; out zeroed by the caller). One block per plane.
extern "C" __global__ void ddpm_sum_planes(const float* g, float* out, int planes, int c, int s,
                                           int per_sample) {
    __shared__ float scratch[32];
    const int plane = blockIdx.x;
    if (plane >= planes) return;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) acc += g[(size_t)plane * s + j];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        if (per_sample) out[plane] = acc;
        else atomicAdd(&out[plane % c], acc);
    }
}

// y [planes, 2h, 2w] from x [planes, h, w], each pixel repeated over a 2×2 block.
extern "C" __global__ void ddpm_upsample2x(const float* x, float* y, size_t total, int h, int w) {
    const size_t ow = 2 * (size_t)w, plane_out = 4 * (size_t)h * w;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t plane = i / plane_out, r = i % plane_out;
        const size_t oy = r / ow, ox = r % ow;
        y[i] = x[plane * h * w + (oy / 2) * w + ox / 2];
    }
}

// dx [planes, h, w]: the sum of each 2×2 block of g [planes, 2h, 2w].
extern "C" __global__ void ddpm_sum_blocks2x(const float* g, float* dx, size_t total, int h,
                                             int w) {
    const size_t ow = 2 * (size_t)w, plane_in = (size_t)h * w;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t plane = i / plane_in, r = i % plane_in;
        const size_t y = r / w, xx = r % w;
        const float* b = g + plane * 4 * plane_in + (2 * y) * ow + 2 * xx;
        dx[i] = (b[0] + b[1]) + (b[ow] + b[ow + 1]);
    }
}
