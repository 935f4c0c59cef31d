// The activation wire codec (`codec.rs`) on the GPU: a stage encodes its hidden states before
// they leave the device and decodes what arrives after upload, so only the encoded bytes
// cross PCIe. Byte-identical to the CPU encoder.

// BF16 encodes with `quantize_bf16` (quant.cu): the same rounding.
extern "C" __global__ void decode_bf16(const u16* y, float* x, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        x[i] = bf2f(y[i]);
    }
}

// Q8: all n scales (f32 max|x| / 127) first, then the n * dim int8 values rounded half away
// from zero. One block of 256 threads per token.
extern "C" __global__ void encode_q8(const float* x, u8* out, int dim, int n) {
    __shared__ float part[256 / WARP];
    const i64 t = blockIdx.x;
    const float* row = x + t * dim;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        amax = fmaxf(amax, fabsf(row[i]));
    }
    amax = warp_max(amax);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) {
        part[warp] = amax;
    }
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / WARP); w++) {
        amax = fmaxf(amax, part[w]);
    }
    const float big = 3.40282347e+38f;
    const float scale = amax <= big ? amax / 127.0f : big / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    if (threadIdx.x == 0) {
        st32(out + t * 4, __float_as_uint(scale));
    }
    u8* qs = out + (i64)n * 4 + t * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        // NaN encodes as 0, as the CPU's saturating cast does.
        float y = row[i] * inv;
        y = y != y ? 0.0f : fminf(fmaxf(y, -127.0f), 127.0f);
        qs[i] = (u8)(i8)(int)(y + copysignf(0.5f, y));
    }
}

// The caller has checked the scales (finite, >= 0) on the host, as `codec::decode` does.
extern "C" __global__ void decode_q8(const u8* in, float* x, int dim, int n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)n * dim) {
        const i64 t = i / dim;
        x[i] = (float)(i8)in[(i64)n * 4 + i] * ldf(in + t * 4);
    }
}
