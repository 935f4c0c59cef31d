// Causal attention of one sequence's chunk over its KV cache in GPU memory.
//
// q: (n_tok, n_head * hd) f32, RoPE applied; K, V: the layer's cache (positions, n_kv * hd) as
// f16, already holding the chunk's own keys and values; token j of the chunk (position
// n_past + j) attends positions 0..=n_past + j. GQA: head h reads KV head h / (n_head / n_kv).
// out: (n_tok, n_head * hd).
//
// grid: (n_head, n_tok); block: ATT_WARPS warps. Each warp runs an online softmax over every
// ATT_WARPS-th key with its lanes splitting the head dimension (hd <= 32 * ATT_MAX_PER_LANE),
// then the warps' partial results are merged. Scores and sums are f32.

#define ATT_WARPS 4
#define ATT_MAX_PER_LANE 8

extern "C" __global__ void attention(const float* q, const u16* K, const u16* V, float* out, int n_past,
                                     int n_head, int n_kv, int hd, float scale) {
    __shared__ float sm_m[ATT_WARPS];
    __shared__ float sm_l[ATT_WARPS];
    __shared__ float sm_acc[ATT_WARPS][WARP * ATT_MAX_PER_LANE];
    const int h = blockIdx.x;
    const int j = blockIdx.y;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int kvh = h / (n_head / n_kv);
    const i64 kv_row = (i64)n_kv * hd;
    const float* qh = q + (i64)j * n_head * hd + (i64)h * hd;
    float qv[ATT_MAX_PER_LANE];
    float acc[ATT_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; i++) {
        const int d = lane + i * WARP;
        qv[i] = d < hd ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    const int last = n_past + j;
    for (int p = warp; p <= last; p += ATT_WARPS) {
        const u16* kp = K + (i64)p * kv_row + (i64)kvh * hd;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_PER_LANE; i++) {
            const int d = lane + i * WARP;
            if (d < hd) {
                s += qv[i] * h2f(kp[d]);
            }
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float e = expf(s - m_new);
        l = l * corr + e;
        const u16* vp = V + (i64)p * kv_row + (i64)kvh * hd;
#pragma unroll
        for (int i = 0; i < ATT_MAX_PER_LANE; i++) {
            const int d = lane + i * WARP;
            if (d < hd) {
                acc[i] = acc[i] * corr + e * h2f(vp[d]);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; i++) {
        sm_acc[warp][lane + i * WARP] = acc[i];
    }
    __syncthreads();
    if (warp != 0) {
        return;
    }
    float mx = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) {
        mx = fmaxf(mx, sm_m[w]);
    }
    float total = 0.0f;
    float f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        // A warp that saw no key has m = -inf and l = 0: its factor is 0.
        f[w] = sm_l[w] > 0.0f ? expf(sm_m[w] - mx) : 0.0f;
        total += sm_l[w] * f[w];
    }
    float* o = out + (i64)j * n_head * hd + (i64)h * hd;
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; i++) {
        const int d = lane + i * WARP;
        if (d < hd) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) {
                v += sm_acc[w][d] * f[w];
            }
            o[d] = v / total;
        }
    }
}
