// Quantized matrix x vector (decode) and matrix x matrix (prefill) on GGUF blocks as stored
// in the file, and the activation quantizers they pair with.
//
// Same integers as the CPU path: activations are quantized to the weight type's vec_dot_type
// (Q8_0, Q8_1 or Q8_K, bit for bit what `quant::act` writes), and each 32-element sub-block's
// dot product is an exact integer sum scaled in f32. Only the order in which the sub-block
// results are added differs from the CPU (a warp adds them in a tree), so outputs agree to
// float rounding. Nothing is dequantized to F16 ahead of time.
//
// Type ids are GGUF's: F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12,
// Q5_K 13, Q6_K 14, BF16 30.

// ---------------------------------------------------------------------------------------------
// Activation quantizers. x: (n, cols) f32 row-major; y: n rows of the type's row bytes.

// Q8_0 (34-byte blocks: d f16, qs i8[32]) and Q8_1 (36: d f16, s f16 = d * sum(qs), qs):
// one warp per 32-element block.
template <bool Q8_1>
__device__ __forceinline__ void quantize_q8_block(const float* x, u8* y, int cols, int n) {
    const int nb = cols / 32;
    const i64 blk = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (blk >= (i64)nb * n) {
        return;
    }
    const int lane = threadIdx.x % WARP;
    const i64 t = blk / nb;
    const int b = (int)(blk % nb);
    const float v = x[t * cols + (i64)b * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int q = (int)rintf(v * id);
    q = min(127, max(-128, q));
    const int bytes = Q8_1 ? 36 : 34;
    u8* yb = y + t * (i64)nb * bytes + (i64)b * bytes;
    yb[(Q8_1 ? 4 : 2) + lane] = (u8)(i8)q;
    const int sum = Q8_1 ? warp_sum_i(q) : 0;
    if (lane == 0) {
        st16(yb, f2h(d));
        if (Q8_1) {
            st16(yb + 2, f2h(d * (float)sum));
        }
    }
}

extern "C" __global__ void quantize_q8_0(const float* x, u8* y, int cols, int n) {
    quantize_q8_block<false>(x, y, cols, n);
}

extern "C" __global__ void quantize_q8_1(const float* x, u8* y, int cols, int n) {
    quantize_q8_block<true>(x, y, cols, n);
}

// Q8_K (292 bytes: d f32, qs i8[256], bsums i16[16]): one warp per 256-element block, eight
// consecutive elements per lane. The element of largest magnitude (the first on ties) sets
// the scale, as `quantize_row_q8_k` does.
extern "C" __global__ void quantize_q8_k(const float* x, u8* y, int cols, int n) {
    const int nb = cols / 256;
    const i64 blk = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (blk >= (i64)nb * n) {
        return;
    }
    const int lane = threadIdx.x % WARP;
    const i64 t = blk / nb;
    const int b = (int)(blk % nb);
    const float* xb = x + t * cols + (i64)b * 256 + lane * 8;
    u8* yb = y + t * (i64)nb * 292 + (i64)b * 292;
    float v[8];
    float amax = 0.0f, mx = 0.0f;
    int imax = 1 << 30;
    for (int k = 0; k < 8; k++) {
        v[k] = xb[k];
        if (fabsf(v[k]) > amax) {
            amax = fabsf(v[k]);
            mx = v[k];
            imax = lane * 8 + k;
        }
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float a2 = __shfl_xor_sync(FULL_MASK, amax, o);
        const float m2 = __shfl_xor_sync(FULL_MASK, mx, o);
        const int i2 = __shfl_xor_sync(FULL_MASK, imax, o);
        if (a2 > amax || (a2 == amax && i2 < imax)) {
            amax = a2;
            mx = m2;
            imax = i2;
        }
    }
    if (amax == 0.0f) {
        for (int i = lane; i < 292; i += WARP) {
            yb[i] = 0;
        }
        return;
    }
    const float iscale = -127.0f / mx;
    int s = 0;
    for (int k = 0; k < 8; k++) {
        const int q = min(127, (int)rintf(iscale * v[k]));
        yb[4 + lane * 8 + k] = (u8)(i8)q;
        s += q;
    }
    // Lanes 2g and 2g+1 hold group g's 16 elements.
    s += __shfl_xor_sync(FULL_MASK, s, 1);
    if (lane % 2 == 0) {
        st16(yb + 260 + lane, (u16)(short)s);
    }
    if (lane == 0) {
        st32(yb, __float_as_uint(1.0f / iscale));
    }
}

// F16 and BF16 activations (for F16 / BF16 weights): element-wise.
extern "C" __global__ void quantize_f16(const float* x, u16* y, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        y[i] = f2h(x[i]);
    }
}

extern "C" __global__ void quantize_bf16(const float* x, u16* y, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        y[i] = f2bf(x[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Dot product of 32-element sub-block `s` of a weight row `w` with the activation row `a`
// (already in the weight type's vec_dot_type).

// Sum of u * y over a 32-block stored as 16 nibble bytes (element j: low nibble of qs[j],
// j + 16: high nibble), `off` subtracted from each nibble, bit 4 of element j from qh bit j.
__device__ __forceinline__ int nibble_dot(const u8* qs, const u8* y, int off, u32 qh) {
    int s = 0;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0f) | (((qh >> j) & 1u) << 4)) - off;
        const int x1 = (int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - off;
        s += x0 * (int)(i8)y[j] + x1 * (int)(i8)y[j + 16];
    }
    return s;
}

// Scale and min of sub-block j (0..8) of a Q4_K / Q5_K block, from its 12 scale bytes `sc`.
__device__ __forceinline__ void k4_scale_min(const u8* sc, int j, int* d, int* m) {
    if (j < 4) {
        *d = sc[j] & 63;
        *m = sc[j + 4] & 63;
    } else {
        *d = (sc[j + 4] & 0x0f) | ((sc[j - 4] >> 6) << 4);
        *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

template <int T>
__device__ __forceinline__ float dot_sub(const u8* w, const u8* a, int s) {
    if (T == 2) {  // Q4_0 . Q8_0
        const u8* x = w + (i64)s * 18;
        const u8* y = a + (i64)s * 34;
        return ldh(x) * ldh(y) * (float)nibble_dot(x + 2, y + 2, 8, 0u);
    } else if (T == 3) {  // Q4_1 . Q8_1
        const u8* x = w + (i64)s * 20;
        const u8* y = a + (i64)s * 36;
        return ldh(x) * ldh(y) * (float)nibble_dot(x + 4, y + 4, 0, 0u) + ldh(x + 2) * ldh(y + 2);
    } else if (T == 6) {  // Q5_0 . Q8_0
        const u8* x = w + (i64)s * 22;
        const u8* y = a + (i64)s * 34;
        return ldh(x) * ldh(y) * (float)nibble_dot(x + 6, y + 2, 16, ld32(x + 2));
    } else if (T == 7) {  // Q5_1 . Q8_1
        const u8* x = w + (i64)s * 24;
        const u8* y = a + (i64)s * 36;
        return ldh(x) * ldh(y) * (float)nibble_dot(x + 8, y + 4, 0, ld32(x + 4)) + ldh(x + 2) * ldh(y + 2);
    } else if (T == 8) {  // Q8_0 . Q8_0
        const u8* x = w + (i64)s * 34;
        const u8* y = a + (i64)s * 34;
        int acc = 0;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            acc += (int)(i8)x[2 + l] * (int)(i8)y[2 + l];
        }
        return ldh(x) * ldh(y) * (float)acc;
    } else if (T == 12 || T == 13) {  // Q4_K / Q5_K . Q8_K
        const int b = s / 8, j = s % 8;
        const u8* x = w + (i64)b * (T == 12 ? 144 : 176);
        const u8* y = a + (i64)b * 292;
        int sc, mn;
        k4_scale_min(x + 4, j, &sc, &mn);
        const u8* qs = x + (T == 12 ? 16 : 48) + 32 * (j / 2);
        const u8* q8 = y + 4 + 32 * j;
        const int shift = (j % 2) * 4;
        int acc = 0;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> shift) & 0x0f;
            if (T == 13) {
                q |= ((x[16 + l] >> j) & 1) << 4;
            }
            acc += q * (int)(i8)q8[l];
        }
        const int bsum = (int)(short)ld16(y + 260 + 4 * j) + (int)(short)ld16(y + 262 + 4 * j);
        const float yd = ldf(y);
        return ldh(x) * yd * (float)(acc * sc) - ldh(x + 2) * yd * (float)(bsum * mn);
    } else if (T == 14) {  // Q6_K . Q8_K
        const int b = s / 8, j = s % 8;
        const u8* x = w + (i64)b * 210;
        const u8* y = a + (i64)b * 292;
        const int h = j / 4, k = j % 4;
        const u8* ql = x + 64 * h + 32 * (k & 1);
        const u8* qh = x + 128 + 32 * h;
        const u8* q8 = y + 4 + 32 * j;
        int acc0 = 0, acc1 = 0;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            const int lo = k < 2 ? (ql[l] & 0x0f) : (ql[l] >> 4);
            const int hi = (qh[l] >> (2 * k)) & 3;
            const int p = ((lo | (hi << 4)) - 32) * (int)(i8)q8[l];
            if (l < 16) {
                acc0 += p;
            } else {
                acc1 += p;
            }
        }
        const int isum = acc0 * (int)(i8)x[192 + 2 * j] + acc1 * (int)(i8)x[193 + 2 * j];
        return ldh(x + 208) * ldf(y) * (float)isum;
    } else if (T == 0) {  // F32 . F32
        const float* x = (const float*)w + (i64)s * 32;
        const float* y = (const float*)a + (i64)s * 32;
        float acc = 0.0f;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            acc += x[l] * y[l];
        }
        return acc;
    } else if (T == 1) {  // F16 . F16
        const u16* x = (const u16*)w + (i64)s * 32;
        const u16* y = (const u16*)a + (i64)s * 32;
        float acc = 0.0f;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            acc += h2f(x[l]) * h2f(y[l]);
        }
        return acc;
    } else {  // 30: BF16 . BF16
        const u16* x = (const u16*)w + (i64)s * 32;
        const u16* y = (const u16*)a + (i64)s * 32;
        float acc = 0.0f;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            acc += bf2f(x[l]) * bf2f(y[l]);
        }
        return acc;
    }
}

// Y (n, rows) = A (n, cols) . W (rows, cols)^T. One warp per weight row; each warp computes NT
// tokens (grid.y = ceil(n / NT)), so the row is read once per NT tokens: NT = 1 for decode,
// 8 for prefill. `wrb` / `arb`: bytes of one weight / activation row.
template <int T, int NT>
__device__ __forceinline__ void matmul_q(const u8* W, const u8* A, float* Y, int rows, int cols, int n, i64 wrb, i64 arb) {
    const int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (r >= rows) {
        return;
    }
    const int lane = threadIdx.x % WARP;
    const int t0 = blockIdx.y * NT;
    const int nsub = cols / 32;
    const u8* w = W + (i64)r * wrb;
    float acc[NT];
#pragma unroll
    for (int i = 0; i < NT; i++) {
        acc[i] = 0.0f;
    }
    for (int s = lane; s < nsub; s += WARP) {
#pragma unroll
        for (int i = 0; i < NT; i++) {
            if (t0 + i < n) {
                acc[i] += dot_sub<T>(w, A + (i64)(t0 + i) * arb, s);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NT; i++) {
        const float v = warp_sum(acc[i]);
        if (lane == 0 && t0 + i < n) {
            Y[(i64)(t0 + i) * rows + r] = v;
        }
    }
}

#define SHOAL_MATMUL(T, NAME)                                                                       \
    extern "C" __global__ void mv_##NAME(const u8* W, const u8* A, float* Y, int rows, int cols,   \
                                         int n, i64 wrb, i64 arb) {                                \
        matmul_q<T, 1>(W, A, Y, rows, cols, n, wrb, arb);                                          \
    }                                                                                              \
    extern "C" __global__ void mm_##NAME(const u8* W, const u8* A, float* Y, int rows, int cols,   \
                                         int n, i64 wrb, i64 arb) {                                \
        matmul_q<T, 8>(W, A, Y, rows, cols, n, wrb, arb);                                          \
    }

SHOAL_MATMUL(0, f32)
SHOAL_MATMUL(1, f16)
SHOAL_MATMUL(2, q4_0)
SHOAL_MATMUL(3, q4_1)
SHOAL_MATMUL(6, q5_0)
SHOAL_MATMUL(7, q5_1)
SHOAL_MATMUL(8, q8_0)
SHOAL_MATMUL(12, q4_k)
SHOAL_MATMUL(13, q5_k)
SHOAL_MATMUL(14, q6_k)
SHOAL_MATMUL(30, bf16)

// ---------------------------------------------------------------------------------------------
// Dequantization of whole rows (embedding lookups, tests): one thread per 32-element
// sub-block; `ids` picks the rows (null: row t for output row t).

template <int T>
__device__ __forceinline__ void deq_sub(const u8* w, int s, float* out) {
    if (T == 2 || T == 3 || T == 6 || T == 7) {
        const int bytes = T == 2 ? 18 : T == 3 ? 20 : T == 6 ? 22 : 24;
        const u8* x = w + (i64)s * bytes;
        const float d = ldh(x);
        const float m = (T == 3 || T == 7) ? ldh(x + 2) : 0.0f;
        const u32 qh = T == 6 ? ld32(x + 2) : T == 7 ? ld32(x + 4) : 0u;
        const u8* qs = x + (T == 2 ? 2 : T == 3 ? 4 : T == 6 ? 6 : 8);
        const int off = T == 2 ? 8 : T == 6 ? 16 : 0;
        for (int j = 0; j < 16; j++) {
            const int x0 = (int)((qs[j] & 0x0f) | (((qh >> j) & 1u) << 4)) - off;
            const int x1 = (int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - off;
            out[j] = (float)x0 * d + m;
            out[j + 16] = (float)x1 * d + m;
        }
    } else if (T == 8) {
        const u8* x = w + (i64)s * 34;
        const float d = ldh(x);
        for (int l = 0; l < 32; l++) {
            out[l] = (float)(i8)x[2 + l] * d;
        }
    } else if (T == 12 || T == 13) {
        const int b = s / 8, j = s % 8;
        const u8* x = w + (i64)b * (T == 12 ? 144 : 176);
        int sc, mn;
        k4_scale_min(x + 4, j, &sc, &mn);
        const float d = ldh(x) * (float)sc, m = ldh(x + 2) * (float)mn;
        const u8* qs = x + (T == 12 ? 16 : 48) + 32 * (j / 2);
        const int shift = (j % 2) * 4;
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> shift) & 0x0f;
            if (T == 13) {
                q |= ((x[16 + l] >> j) & 1) << 4;
            }
            out[l] = d * (float)q - m;
        }
    } else if (T == 14) {
        const int b = s / 8, j = s % 8;
        const u8* x = w + (i64)b * 210;
        const int h = j / 4, k = j % 4;
        const u8* ql = x + 64 * h + 32 * (k & 1);
        const u8* qh = x + 128 + 32 * h;
        const float d = ldh(x + 208);
        for (int l = 0; l < 32; l++) {
            const int lo = k < 2 ? (ql[l] & 0x0f) : (ql[l] >> 4);
            const int hi = (qh[l] >> (2 * k)) & 3;
            const float sc = (float)(i8)x[192 + 2 * j + l / 16];
            out[l] = d * sc * (float)((lo | (hi << 4)) - 32);
        }
    } else if (T == 0) {
        for (int l = 0; l < 32; l++) {
            out[l] = ((const float*)w)[(i64)s * 32 + l];
        }
    } else if (T == 1) {
        for (int l = 0; l < 32; l++) {
            out[l] = h2f(((const u16*)w)[(i64)s * 32 + l]);
        }
    } else {
        for (int l = 0; l < 32; l++) {
            out[l] = bf2f(((const u16*)w)[(i64)s * 32 + l]);
        }
    }
}

template <int T>
__device__ __forceinline__ void dequantize_rows(const u8* W, const unsigned* ids, float* Y, int cols, int n, i64 wrb) {
    const int nsub = cols / 32;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)nsub * n) {
        return;
    }
    const i64 t = i / nsub;
    const int s = (int)(i % nsub);
    const i64 row = ids ? (i64)ids[t] : t;
    float v[32];
    deq_sub<T>(W + row * wrb, s, v);
    for (int l = 0; l < 32; l++) {
        Y[t * cols + (i64)s * 32 + l] = v[l];
    }
}

#define SHOAL_DEQ(T, NAME)                                                                          \
    extern "C" __global__ void dequantize_##NAME(const u8* W, const unsigned* ids, float* Y,        \
                                                 int cols, int n, i64 wrb) {                        \
        dequantize_rows<T>(W, ids, Y, cols, n, wrb);                                                \
    }

SHOAL_DEQ(0, f32)
SHOAL_DEQ(1, f16)
SHOAL_DEQ(2, q4_0)
SHOAL_DEQ(3, q4_1)
SHOAL_DEQ(6, q5_0)
SHOAL_DEQ(7, q5_1)
SHOAL_DEQ(8, q8_0)
SHOAL_DEQ(12, q4_k)
SHOAL_DEQ(13, q5_k)
SHOAL_DEQ(14, q6_k)
SHOAL_DEQ(30, bf16)
