// CUDA halves of ddpm_kernels' fused element-wise ops: the reverse-diffusion step (guidance
// combine + x̂0 + optional clip + the update, DDPM, DDIM or DPM-Solver++ coefficients), add_noise
// with per-sample coefficients, and the AdamW and EMA updates. f32 only; each kernel is a
// grid-stride loop and mirrors the CPU loop of the same op in src/ (same operations, same order).

// out[0..n] = x_prev, out[n..2n] = x̂0 (see src/step.rs for the formula).
// eps holds [cond ‖ uncond] (2n floats) when `guided`, else n floats.
extern "C" __global__ void ddpm_reverse_step(const float* x, const float* eps, const float* extra,
                                             float* out, long long n, int guided, float w,
                                             float sqrt_ac, float sqrt_one_minus_ac, int clip,
                                             float c_x0, float c_eps, float c_x, float c_extra) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float e = guided ? (1.0f + w) * eps[i] - w * eps[n + i] : eps[i];
        const float xi = x[i];
        float x0 = (xi - sqrt_one_minus_ac * e) / sqrt_ac;
        if (clip) {
            x0 = fminf(fmaxf(x0, -1.0f), 1.0f);
            e = (xi - sqrt_ac * x0) / sqrt_one_minus_ac;
        }
        out[i] = c_x0 * x0 + c_eps * e + c_x * xi + c_extra * extra[i];
        out[n + i] = x0;
    }
}

// x_t = coef[2b]·x0 + coef[2b+1]·noise for the `per_sample` elements of sample b.
extern "C" __global__ void ddpm_add_noise(const float* x0, const float* noise, const float* coef,
                                          float* out, long long n, long long per_sample) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / per_sample;
        out[i] = coef[2 * b] * x0[i] + coef[2 * b + 1] * noise[i];
    }
}

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
