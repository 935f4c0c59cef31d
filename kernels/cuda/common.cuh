// Shared by every kernel source and prepended to each before NVRTC compiles it.
//
// No system or toolkit headers: a worker compiles these at run time with only the NVRTC
// library present, and CI compiles them with NVRTC alone. Half and bfloat16 conversions are
// one PTX instruction or a bit shift; byte loads are little-endian and unaligned, because GGUF
// blocks (18, 22, 34, 210 bytes...) put their fields at odd offsets.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define WARP 32
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// f16 bits -> f32 (exact).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> f16 bits, round to nearest even (as the CPU path's `half::f16::from_f32`).
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// f32 -> bf16 bits as ggml rounds: NaNs stay quiet, everything else to nearest even.
__device__ __forceinline__ u16 f2bf(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 64);
    }
    return (u16)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

__device__ __forceinline__ u16 ld16(const u8* p) {
    return (u16)((u32)p[0] | ((u32)p[1] << 8));
}

__device__ __forceinline__ u32 ld32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ __forceinline__ float ldh(const u8* p) {
    return h2f(ld16(p));
}

__device__ __forceinline__ float ldf(const u8* p) {
    return __uint_as_float(ld32(p));
}

__device__ __forceinline__ void st16(u8* p, u16 v) {
    p[0] = (u8)(v & 0xff);
    p[1] = (u8)(v >> 8);
}

__device__ __forceinline__ void st32(u8* p, u32 v) {
    p[0] = (u8)(v & 0xff);
    p[1] = (u8)((v >> 8) & 0xff);
    p[2] = (u8)((v >> 16) & 0xff);
    p[3] = (u8)(v >> 24);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    }
    return v;
}
