// AdamW's moments and weight update and the EMA, in place: the CUDA half of src/optim.rs
// (same operations, same order). f32 only; grid-stride loops.

// AdamW moments in place: mv = [m ‖ v] (2n floats); g scaled by `grad_scale` first.
extern "C" __global__ void ddpm_adam_moments(float* mv, const float* g, long long n, float beta1,
                                             float beta2, float grad_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        mv[i] = beta1 * mv[i] + (1.0f - beta1) * gi;
        mv[n + i] = beta2 * mv[n + i] + (1.0f - beta2) * (gi * gi);
    }
}

// AdamW weight update in place from mv = [m ‖ v]:
// w ← w·decay − lr · (m / bc1) / (√(v / bc2) + eps).
extern "C" __global__ void ddpm_adamw_apply(float* w, const float* mv, long long n, float lr,
                                            float inv_bc1, float inv_bc2, float eps, float decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float update = (mv[i] * inv_bc1) / (sqrtf(mv[n + i] * inv_bc2) + eps);
        w[i] = w[i] * decay - update * lr;
    }
}

// EMA in place: avg ← d·avg + (1 − d)·w.
extern "C" __global__ void ddpm_ema(float* avg, const float* w, long long n, float d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        avg[i] = d * avg[i] + (1.0f - d) * w[i];
    }
}
