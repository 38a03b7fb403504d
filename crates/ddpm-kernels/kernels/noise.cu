// add_noise with per-sample coefficients: the CUDA half of src/noise.rs. f32 only.

// x_t = coef[2b]·x0 + coef[2b+1]·noise for the `per_sample` elements of sample b.
extern "C" __global__ void ddpm_add_noise(const float* x0, const float* noise, const float* coef,
                                          float* out, long long n, long long per_sample) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / per_sample;
        out[i] = coef[2 * b] * x0[i] + coef[2 * b + 1] * noise[i];
    }
}
