// GroupNorm with a per-sample shift and SiLU, forward and backward: the CUDA half of
// src/nn/norm.rs (which launches it and whose CPU loop it mirrors). f32 only. Compiled to PTX
// by this crate's build.rs when the `cuda` feature is on.

#include "common.cuh"

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
