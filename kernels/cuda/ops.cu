// Element-wise and row-wise operations of a decoder block, each the GPU twin of a function in
// `ops.rs` with the same rounding where the CPU path fixes one.

// RMSNorm of `n` rows of `dim`: y = x * (1 / sqrt(mean(x^2) + eps)) * w. One block of 256
// threads per row; the squares are rounded to f32 and summed in f64 (as ggml and the CPU path
// do, though in a tree rather than in order). `w` is indexed modulo `wdim`, so per-head norms
// (QK-norm) are rows of head_dim with one weight vector.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int dim, int wdim, float eps) {
    __shared__ double part[256 / WARP];
    const i64 row = blockIdx.x;
    const float* xr = x + row * dim;
    double s = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = xr[i];
        s += (double)(v * v);
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        s += __shfl_xor_sync(FULL_MASK, s, o);
    }
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) {
        part[warp] = s;
    }
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < (int)(blockDim.x / WARP); i++) {
        total += part[i];
    }
    const float mean = (float)(total / (double)dim);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        y[row * dim + i] = xr[i] * scale * w[i % wdim];
    }
}

// RoPE in place on `x: (n, n_heads * head_dim)` with one row of (cos, sin) pairs per token
// from the CPU's `RopeCache::cos_sin` (`cs: (n, n_rot)`), so angles are bit-identical; the
// rotation is the CPU's fused form. grid: (n, n_heads), block: n_rot / 2 threads (<= 1024).
extern "C" __global__ void rope(float* x, const float* cs, int n_heads, int head_dim, int n_rot, int neox) {
    const i64 t = blockIdx.x;
    const int h = blockIdx.y;
    const int i = threadIdx.x;
    if (i >= n_rot / 2) {
        return;
    }
    float* head = x + t * (i64)n_heads * head_dim + (i64)h * head_dim;
    const float c = cs[t * n_rot + 2 * i];
    const float s = cs[t * n_rot + 2 * i + 1];
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + n_rot / 2 : 2 * i + 1;
    const float x0 = head[a], x1 = head[b];
    head[a] = fmaf(x0, c, -(x1 * s));
    head[b] = fmaf(x0, s, x1 * c);
}

// g = silu(g) * u, silu(x) = x / (1 + exp(-x)).
extern "C" __global__ void swiglu(float* g, const float* u, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        const float v = g[i];
        g[i] = v / (1.0f + expf(-v)) * u[i];
    }
}

// x += y.
extern "C" __global__ void add(float* x, const float* y, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        x[i] += y[i];
    }
}

// Adds `b` (width `dim`) to every row of x.
extern "C" __global__ void add_bias(float* x, const float* b, int dim, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        x[i] += b[i % dim];
    }
}

// KV cache append: `src: (n, dim)` f32 rounded to f16 into `dst` (the cache at the first free
// position).
extern "C" __global__ void f32_to_f16(const float* src, u16* dst, i64 count) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        dst[i] = f2h(src[i]);
    }
}

// Rows `ids[t]` of `x: (*, dim)` into row t of `y: (n, dim)` (tokens routed to one expert).
extern "C" __global__ void gather_rows(const float* x, const unsigned* ids, float* y, int dim, int n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)n * dim) {
        const i64 t = i / dim;
        y[i] = x[(i64)ids[t] * dim + i % dim];
    }
}

// Row t of `x: (n, dim)` into row `ids[t]` of `y` (an expert's outputs to their slots).
extern "C" __global__ void scatter_rows(const float* x, const unsigned* ids, float* y, int dim, int n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (i64)n * dim) {
        const i64 t = i / dim;
        y[(i64)ids[t] * dim + i % dim] = x[i];
    }
}

// Routed experts' outputs combined per token in slot order, as the CPU's `combine`:
// out[t] = w[t,0] * ys[t,0] + w[t,1] * ys[t,1] + ...; `ys: (n * k, dim)`, `w: (n * k)`.
extern "C" __global__ void moe_combine(const float* ys, const float* w, float* out, int k, int dim, int n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)n * dim) {
        return;
    }
    const i64 t = i / dim;
    const int c = (int)(i % dim);
    float acc = ys[(t * k) * dim + c] * w[t * k];
    for (int s = 1; s < k; s++) {
        acc += ys[(t * k + s) * dim + c] * w[t * k + s];
    }
    out[i] = acc;
}
