// Segmented multi-adapter LoRA (SGMV) kernels of v2l_fast._C; semantics of
// v2l_fast.reference.lora_sgmv, with A and B already sliced to one layer ([n, R, I] / [n, R, O]).
#pragma once

#include <torch/extension.h>

#include <optional>

// CPU forward: y = base + scaling * (x A[a]^T) B[a] per segment, fp32 accumulation.
at::Tensor lora_sgmv_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& seg_indptr, const at::Tensor& seg_adapter,
                         const std::optional<at::Tensor>& ranks, double scaling,
                         const std::optional<at::Tensor>& base);

#ifdef V2L_WITH_CUDA
// CUDA decode forward, shrink and expand in one cooperative launch, over the work tiles of
// v2l_fast.kernels.lora_sgmv_meta.LoraSgmvMetadata (int32 tensors on the same device).
at::Tensor lora_sgmv_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                          const std::optional<at::Tensor>& ranks, double scaling,
                          const std::optional<at::Tensor>& base, const at::Tensor& sorted_tokens,
                          const at::Tensor& work_group, const at::Tensor& work_start,
                          const at::Tensor& work_end);
#endif
