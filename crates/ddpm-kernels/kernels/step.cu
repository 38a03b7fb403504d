// The reverse-diffusion step (guidance combine + x̂0 + optional clip + the DDPM, DDIM or
// DPM-Solver++ update): the CUDA half of src/step.rs (same operations, same order). f32 only;
// a grid-stride loop. Its guidance line is the CUDA twin of ddpm_kernels::guided_eps.

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
