// The per-channel bias add and its gradient: the CUDA half of src/nn/bias.rs (which launches it
// and whose CPU loop it mirrors). f32 only.

#include "common.cuh"

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
