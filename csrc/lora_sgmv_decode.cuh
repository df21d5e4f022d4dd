// CUDA SGMV decode kernel in plain CUDA (no torch headers, so nvcc can check it standalone).
//
// One cooperative launch does both halves of the LoRA delta:
//   phase 1 (shrink): one warp per (work tile, rank row k, slice of I) reads the row A[a, k]
//     once for all tokens of the tile and writes s[slice, t, k] = x[t, slice] . A[a, k, slice];
//   grid.sync();
//   phase 2 (expand): one block per (work tile, 256 output columns) sums the slices of s into
//     shared memory and writes out[t, o] = base[t, o] + scaling * sum_k s[t, k] B[a, k, o].
// Work tiles are those of LoraSgmvMetadata: tokens grouped by adapter, so tokens sharing an
// adapter share one read of its factors. The grid is persistent (at most what fits on the
// GPU at once), as a grid-wide barrier requires.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace v2l {

struct LoraDecodeParams {
  const void* x;     // [T, I]
  const void* A;     // [n, R, I] (strided layer view)
  const void* B;     // [n, R, O]
  const void* base;  // [T, O] or nullptr
  void* out;         // [T, O] contiguous
  float* shrunk;     // [num_slices, T, R] workspace
  const int32_t* ranks;  // [n] or nullptr (all R)
  const int32_t* sorted_tokens;
  const int32_t* work_group;  // group n = tokens without an adapter, -1 = unused slot
  const int32_t* work_start;
  const int32_t* work_end;
  int64_t T, I, O, R, n, num_work, num_slices, slice;
  int64_t x_st, x_si, a_sa, a_sr, a_si, b_sa, b_sr, b_so, base_st, base_so;
  float scaling;
};

constexpr int kDecodeThreads = 256;
constexpr int kTokensPerPass = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int group_rank(const LoraDecodeParams& p, int group) {
  if (group >= p.n) return 0;
  return p.ranks ? min(static_cast<int64_t>(p.ranks[group]), p.R) : static_cast<int>(p.R);
}

template <typename XT, typename WT>
__device__ void shrink_phase(const LoraDecodeParams& p) {
  const XT* x = static_cast<const XT*>(p.x);
  const WT* A = static_cast<const WT*>(p.A);
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kDecodeThreads / 32);
  const int64_t units = p.num_work * p.R * p.num_slices;
  for (int64_t u = (static_cast<int64_t>(blockIdx.x) * kDecodeThreads + threadIdx.x) / 32; u < units; u += warps) {
    const int64_t slice = u % p.num_slices, k = (u / p.num_slices) % p.R, w = u / (p.num_slices * p.R);
    const int group = p.work_group[w];
    if (group < 0 || k >= group_rank(p, group)) continue;
    const WT* row = A + group * p.a_sa + k * p.a_sr;
    const int64_t i0 = slice * p.slice, i1 = min(i0 + p.slice, p.I);
    for (int m0 = p.work_start[w]; m0 < p.work_end[w]; m0 += kTokensPerPass) {
      const int count = min(kTokensPerPass, p.work_end[w] - m0);
      int64_t token[kTokensPerPass];
      float acc[kTokensPerPass];
#pragma unroll
      for (int j = 0; j < kTokensPerPass; ++j) {
        token[j] = j < count ? p.sorted_tokens[m0 + j] : 0;
        acc[j] = 0.f;
      }
      for (int64_t i = i0 + lane; i < i1; i += 32) {
        const float a = to_float(row[i * p.a_si]);
#pragma unroll
        for (int j = 0; j < kTokensPerPass; ++j)
          if (j < count) acc[j] += a * to_float(x[token[j] * p.x_st + i * p.x_si]);
      }
#pragma unroll
      for (int j = 0; j < kTokensPerPass; ++j) {
        const float v = warp_sum(acc[j]);
        if (lane == 0 && j < count) p.shrunk[(slice * p.T + token[j]) * p.R + k] = v;
      }
    }
  }
}

template <typename WT, typename OT>
__device__ void expand_phase(const LoraDecodeParams& p, float* s_tile) {
  const WT* B = static_cast<const WT*>(p.B);
  const OT* base = static_cast<const OT*>(p.base);
  OT* out = static_cast<OT*>(p.out);
  const int64_t col_blocks = (p.O + kDecodeThreads - 1) / kDecodeThreads;
  for (int64_t u = blockIdx.x; u < p.num_work * col_blocks; u += gridDim.x) {
    const int64_t w = u / col_blocks, o = (u % col_blocks) * kDecodeThreads + threadIdx.x;
    const int group = p.work_group[w];  // uniform over the block, so the barriers below are safe
    if (group < 0) continue;
    const int rank = group_rank(p, group);
    for (int m0 = p.work_start[w]; m0 < p.work_end[w]; m0 += kTokensPerPass) {
      const int count = min(kTokensPerPass, p.work_end[w] - m0);
      __syncthreads();  // the previous pass is done reading s_tile
      for (int e = threadIdx.x; e < count * rank; e += kDecodeThreads) {
        const int j = e / rank, k = e % rank;
        float v = 0.f;
        for (int64_t slice = 0; slice < p.num_slices; ++slice)
          v += p.shrunk[(slice * p.T + p.sorted_tokens[m0 + j]) * p.R + k];
        s_tile[j * p.R + k] = v;
      }
      __syncthreads();
      if (o >= p.O) continue;
      float acc[kTokensPerPass];
#pragma unroll
      for (int j = 0; j < kTokensPerPass; ++j) acc[j] = 0.f;
      for (int k = 0; k < rank; ++k) {
        const float b = to_float(B[group * p.b_sa + k * p.b_sr + o * p.b_so]);
#pragma unroll
        for (int j = 0; j < kTokensPerPass; ++j) acc[j] += s_tile[j * p.R + k] * b;
      }
      for (int j = 0; j < count; ++j) {
        const int64_t t = p.sorted_tokens[m0 + j];
        float y = p.scaling * acc[j];
        if (base) y += to_float(base[t * p.base_st + o * p.base_so]);
        out[t * p.O + o] = from_float<OT>(y);
      }
    }
  }
}

template <typename XT, typename WT, typename OT>
__global__ void __launch_bounds__(kDecodeThreads) lora_sgmv_decode_kernel(LoraDecodeParams p) {
  extern __shared__ float s_tile[];  // [kTokensPerPass, R]
  shrink_phase<XT, WT>(p);
  cooperative_groups::this_grid().sync();
  expand_phase<WT, OT>(p, s_tile);
}

// Launch on `stream` with as many blocks as fit co-resident (a cooperative launch requires it).
template <typename XT, typename WT, typename OT>
cudaError_t launch_lora_sgmv_decode(const LoraDecodeParams& p, int num_sms, cudaStream_t stream) {
  if (p.num_work == 0 || p.O == 0) return cudaSuccess;
  auto* kernel = lora_sgmv_decode_kernel<XT, WT, OT>;
  const size_t smem = sizeof(float) * kTokensPerPass * (p.R > 0 ? p.R : 1);
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kDecodeThreads, smem);
  if (err != cudaSuccess) return err;
  const int64_t warps_needed = p.num_work * p.R * p.num_slices;
  const int64_t blocks_needed = (warps_needed + kDecodeThreads / 32 - 1) / (kDecodeThreads / 32);
  const int64_t expand_blocks = p.num_work * ((p.O + kDecodeThreads - 1) / kDecodeThreads);
  int64_t grid = blocks_needed > expand_blocks ? blocks_needed : expand_blocks;
  if (grid > static_cast<int64_t>(per_sm) * num_sms) grid = static_cast<int64_t>(per_sm) * num_sms;
  if (grid < 1) grid = 1;
  LoraDecodeParams args = p;
  void* kernel_args[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(static_cast<unsigned>(grid)),
                                     dim3(kDecodeThreads), kernel_args, smem, stream);
}

}  // namespace v2l
