// at::Tensor wrapper of the CUDA SGMV decode kernel (lora_sgmv_decode.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "checks.h"
#include "lora.h"
#include "lora_sgmv_decode.cuh"

namespace {

// Calls f(T{}) with the CUDA element type of a floating at::ScalarType.
template <typename F>
void dispatch_float(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK_VALUE(false, name, ": expected dtype float32, float16 or bfloat16, got ", v2l::dtype_name(type));
  }
}

at::Tensor int32(const at::Tensor& t) { return t.to(at::kInt).contiguous(); }

}  // namespace

at::Tensor lora_sgmv_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                          const std::optional<at::Tensor>& ranks, double scaling,
                          const std::optional<at::Tensor>& base, const at::Tensor& sorted_tokens,
                          const at::Tensor& work_group, const at::Tensor& work_start,
                          const at::Tensor& work_end) {
  v2l::check_lora_sgmv_common(x, A, B, ranks, base, at::kCUDA);
  v2l::check_tensor("sorted_tokens", sorted_tokens, 1, v2l::Kind::Index, x.device(), "[T]");
  v2l::check_tensor("work_group", work_group, 1, v2l::Kind::Index, x.device(), "[W]");
  v2l::check_tensor("work_start", work_start, 1, v2l::Kind::Index, x.device(), "[W]");
  v2l::check_tensor("work_end", work_end, 1, v2l::Kind::Index, x.device(), "[W]");
  v2l::check_dim("work_start", work_start, 0, work_group.numel(), "W, the work tiles of work_group");
  v2l::check_dim("work_end", work_end, 0, work_group.numel(), "W, the work tiles of work_group");
  const c10::cuda::CUDAGuard guard(x.device());
  // One weight type for both factors; mixing (e.g. fp32 A, bf16 B) upcasts exactly to fp32.
  const bool same_w = A.scalar_type() == B.scalar_type();
  const at::Tensor Aw = same_w ? A : A.to(at::kFloat), Bw = same_w ? B : B.to(at::kFloat);
  const int64_t T = x.size(0), I = x.size(1), n = A.size(0), R = A.size(1), O = B.size(2);
  const at::ScalarType out_type = base ? base->scalar_type() : x.scalar_type();
  at::Tensor out = at::empty({T, O}, x.options().dtype(out_type));
  const at::Tensor rk = ranks ? int32(*ranks) : at::Tensor();
  const at::Tensor tokens = int32(sorted_tokens), group = int32(work_group), start = int32(work_start),
                   end = int32(work_end);

  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  // Slice I so that phase 1 has about 32 warps per SM, with ≥ 1024 elements per slice.
  const int64_t units = std::max<int64_t>(group.numel() * R, 1);
  const int64_t max_slices = std::max<int64_t>((I + 1023) / 1024, 1);
  const int64_t num_slices = std::clamp<int64_t>(32 * num_sms / units, 1, max_slices);
  at::Tensor shrunk = at::empty({num_slices, T, std::max<int64_t>(R, 1)}, x.options().dtype(at::kFloat));

  v2l::LoraDecodeParams p{};
  p.x = x.data_ptr();
  p.A = Aw.data_ptr();
  p.B = Bw.data_ptr();
  p.base = base ? base->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.shrunk = shrunk.data_ptr<float>();
  p.ranks = ranks ? rk.data_ptr<int32_t>() : nullptr;
  p.sorted_tokens = tokens.data_ptr<int32_t>();
  p.work_group = group.data_ptr<int32_t>();
  p.work_start = start.data_ptr<int32_t>();
  p.work_end = end.data_ptr<int32_t>();
  p.T = T, p.I = I, p.O = O, p.R = R, p.n = n, p.num_work = group.numel();
  p.num_slices = num_slices, p.slice = (I + num_slices - 1) / num_slices;
  p.x_st = x.stride(0), p.x_si = x.stride(1);
  p.a_sa = Aw.stride(0), p.a_sr = Aw.stride(1), p.a_si = Aw.stride(2);
  p.b_sa = Bw.stride(0), p.b_sr = Bw.stride(1), p.b_so = Bw.stride(2);
  p.base_st = base ? base->stride(0) : 0, p.base_so = base ? base->stride(1) : 0;
  p.scaling = static_cast<float>(scaling);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "x", [&](auto xt) {
    dispatch_float(Aw.scalar_type(), "A", [&](auto wt) {
      dispatch_float(out_type, "base", [&](auto ot) {
        const cudaError_t err =
            v2l::launch_lora_sgmv_decode<decltype(xt), decltype(wt), decltype(ot)>(p, num_sms, stream);
        TORCH_CHECK(err == cudaSuccess, "lora_sgmv_cuda: launch failed: ", cudaGetErrorString(err));
      });
    });
  });
  return out;
}
