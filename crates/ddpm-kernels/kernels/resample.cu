// Nearest-neighbour ×2 upsampling and its adjoint: the CUDA half of src/nn/resample.rs (which
// launches it and whose CPU loop it mirrors). f32 only.

#include <stddef.h>

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
