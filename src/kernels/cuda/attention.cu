// Attention kernels of the tensor decode path on CUDA (compiled to PTX by build.rs with the
// `cuda` feature; loaded by src/kernels/masked_softmax.rs). Each has a plain reference twin on
// the CPU, and tests/device.rs compares them on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half(x);
}

// Reduces `v` over the block (blockDim.x a multiple of 32, at most 1024) with `op`, whose
// identity is `id`; every thread gets the result. `shared` holds 32 floats.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float *shared, Op op, float id) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // `shared` may still be read from an earlier reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : id;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Masked, scaled softmax over the last axis, one block per row, in float32:
// scores [span, heads, n_q, t] -> probabilities of the same shape and type;
// row r = ((s * heads) + h) * n_q + q attends to keys 0..=limit[s * n_q + q] (the rest get 0).
template <typename T>
__device__ void masked_softmax(const T *x, const uint32_t *limit, T *y, uint32_t t,
                               uint32_t heads, uint32_t n_q, float scale) {
  __shared__ float shared[32];
  const size_t row = blockIdx.x;
  const uint32_t q = row % n_q;
  const uint32_t s = row / (n_q * heads);
  const uint32_t lim = min(limit[(size_t)s * n_q + q], t - 1);
  const T *xr = x + row * t;
  T *yr = y + row * t;
  float m = -INFINITY;
  for (uint32_t j = threadIdx.x; j <= lim; j += blockDim.x) m = fmaxf(m, scale * to_f32(xr[j]));
  m = block_reduce(m, shared, MaxOp(), -INFINITY);
  float sum = 0.f;
  for (uint32_t j = threadIdx.x; j <= lim; j += blockDim.x) sum += expf(scale * to_f32(xr[j]) - m);
  sum = block_reduce(sum, shared, SumOp(), 0.f);
  const float inv = 1.f / sum;
  for (uint32_t j = threadIdx.x; j < t; j += blockDim.x)
    yr[j] = from_f32<T>(j <= lim ? expf(scale * to_f32(xr[j]) - m) * inv : 0.f);
}

#define MASKED_SOFTMAX(NAME, T)                                                          \
  extern "C" __global__ void NAME(const T *x, const uint32_t *limit, T *y, uint32_t t,  \
                                  uint32_t heads, uint32_t n_q, float scale) {          \
    masked_softmax<T>(x, limit, y, t, heads, n_q, scale);                               \
  }
MASKED_SOFTMAX(masked_softmax_f32, float)
MASKED_SOFTMAX(masked_softmax_bf16, __nv_bfloat16)
MASKED_SOFTMAX(masked_softmax_f16, __half)

// Decode attention over a KV pool: one query per (slot, head), keys and values read once.
// q [span, heads, hd]; kpool/vpool [slots, heads, cap, hd] from slot `lo`; slot s's query sees
// positions 0..=limit[s]; out [span, heads, hd]. One block of DECODE_WARPS warps per (slot,
// head); each warp walks its share of the keys DECODE_UNROLL at a time with an online softmax
// in float32 (each lane holds E = hd / 32 elements of q, of its accumulator and of every key
// and value row), then the warps' partial results are merged.
#define DECODE_WARPS 4
#define DECODE_UNROLL 4
template <typename T, int E>
__device__ void decode_attention(const T *q, const T *kpool, const T *vpool,
                                 const uint32_t *limit, T *out, uint32_t heads, uint32_t cap,
                                 float scale) {
  constexpr int HD = 32 * E;
  __shared__ float part_m[DECODE_WARPS], part_l[DECODE_WARPS];
  __shared__ float part_acc[DECODE_WARPS][HD];
  const size_t b = blockIdx.x;  // s * heads + h
  const uint32_t s = b / heads;
  const uint32_t lim = min(limit[s], cap - 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T *kb = kpool + b * cap * HD + lane * E;
  const T *vb = vpool + b * cap * HD + lane * E;
  float qv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; e++) {
    qv[e] = to_f32(q[b * HD + lane * E + e]) * scale;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (uint32_t j0 = warp * DECODE_UNROLL; j0 <= lim; j0 += DECODE_WARPS * DECODE_UNROLL) {
    float kf[DECODE_UNROLL][E], vf[DECODE_UNROLL][E];
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; u++) {
      const uint32_t j = j0 + u;
#pragma unroll
      for (int e = 0; e < E; e++) {
        kf[u][e] = j <= lim ? to_f32(kb[(size_t)j * HD + e]) : 0.f;
        vf[u][e] = j <= lim ? to_f32(vb[(size_t)j * HD + e]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; u++) {
      if (j0 + u > lim) break;
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < E; e++) d += qv[e] * kf[u][e];
      for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffff, d, o);
      const float m_new = fmaxf(m, d);
      const float corr = expf(m - m_new);  // 0 for the first key (m = -inf)
      const float p = expf(d - m_new);
      l = l * corr + p;
#pragma unroll
      for (int e = 0; e < E; e++) acc[e] = acc[e] * corr + p * vf[u][e];
      m = m_new;
    }
  }
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; e++) part_acc[warp][lane * E + e] = acc[e];
  __syncthreads();
  float mm = -INFINITY;
#pragma unroll
  for (int w = 0; w < DECODE_WARPS; w++) mm = fmaxf(mm, part_m[w]);
  float ll = 0.f, wgt[DECODE_WARPS];
#pragma unroll
  for (int w = 0; w < DECODE_WARPS; w++) {
    wgt[w] = part_l[w] > 0.f ? expf(part_m[w] - mm) : 0.f;  // warps without keys weigh 0
    ll += part_l[w] * wgt[w];
  }
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < DECODE_WARPS; w++) o += part_acc[w][d] * wgt[w];
    out[b * HD + d] = from_f32<T>(o / ll);
  }
}

#define DECODE_ATTENTION(NAME, T, E)                                                        \
  extern "C" __global__ void NAME(const T *q, const T *kpool, const T *vpool,               \
                                  const uint32_t *limit, T *out, uint32_t heads,            \
                                  uint32_t cap, float scale) {                              \
    decode_attention<T, E>(q, kpool, vpool, limit, out, heads, cap, scale);                 \
  }
DECODE_ATTENTION(decode_attention_32_f32, float, 1)
DECODE_ATTENTION(decode_attention_64_f32, float, 2)
DECODE_ATTENTION(decode_attention_128_f32, float, 4)
DECODE_ATTENTION(decode_attention_32_bf16, __nv_bfloat16, 1)
DECODE_ATTENTION(decode_attention_64_bf16, __nv_bfloat16, 2)
DECODE_ATTENTION(decode_attention_128_bf16, __nv_bfloat16, 4)
DECODE_ATTENTION(decode_attention_32_f16, __half, 1)
DECODE_ATTENTION(decode_attention_64_f16, __half, 2)
DECODE_ATTENTION(decode_attention_128_f16, __half, 4)

// The attention inputs of one layer from its QKV projection in one pass: qkv [n, heads, 3 hd]
// (per head: query, key, value) -> out [3, heads, n, hd] (queries, keys, values), the first
// `rd` dims of queries and keys rotated (GPT-NeoX: pairs (i, i + rd/2), angles cos/sin
// [n, rd/2]), in float32. grid.y = 3 * heads; x covers (position, element).
template <typename T>
__device__ void qkv_rotary(const T *qkv, const T *cos, const T *sin, T *out, uint32_t n,
                           uint32_t heads, uint32_t hd, uint32_t rd) {
  const uint32_t ph = blockIdx.y;  // part * heads + h
  const uint32_t part = ph / heads, h = ph % heads, half = rd / 2;
  const uint32_t count = n * hd;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const uint32_t pos = i / hd, d = i % hd;
    const T *src = qkv + ((size_t)pos * heads + h) * 3 * hd + (size_t)part * hd;
    float x = to_f32(src[d]);
    if (part < 2 && d < rd) {
      const uint32_t j = d < half ? d : d - half;
      const float c = to_f32(cos[(size_t)pos * half + j]);
      const float s = to_f32(sin[(size_t)pos * half + j]);
      x = d < half ? x * c - to_f32(src[d + half]) * s : x * c + to_f32(src[d - half]) * s;
    }
    out[((size_t)ph * n + pos) * hd + d] = from_f32<T>(x);
  }
}

#define QKV_ROTARY(NAME, T)                                                                  \
  extern "C" __global__ void NAME(const T *qkv, const T *cos, const T *sin, T *out,         \
                                  uint32_t n, uint32_t heads, uint32_t hd, uint32_t rd) {   \
    qkv_rotary<T>(qkv, cos, sin, out, n, heads, hd, rd);                                     \
  }
QKV_ROTARY(qkv_rotary_f32, float)
QKV_ROTARY(qkv_rotary_bf16, __nv_bfloat16)
QKV_ROTARY(qkv_rotary_f16, __half)
