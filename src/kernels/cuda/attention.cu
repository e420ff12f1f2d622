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
