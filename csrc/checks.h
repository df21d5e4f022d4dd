// Argument checks of v2l_fast._C. A bad argument raises ValueError (TORCH_CHECK_VALUE) with the
// message format of v2l_fast.errors.fail, "name: expected X, got Y", where Y describes a tensor
// as v2l_fast.errors.describe does ("tensor of shape [2, 3], dtype torch.float32, device cpu").
#pragma once

#include <torch/extension.h>

#include <optional>
#include <sstream>
#include <string>

namespace v2l {

// Python's name of a dtype ("torch.float32").
inline std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(type);
  }
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "tensor of shape " << t.sizes() << ", dtype " << dtype_name(t.scalar_type()) << ", device " << t.device();
  return s.str();
}

enum class Kind { Float, Index };  // floating point; int32 or int64

// A tensor of rank `ndim` and dtype kind `kind` on `device`.
inline void check_tensor(const char* name, const at::Tensor& t, int64_t ndim, Kind kind, const at::Device& device,
                         const std::string& shape_hint) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, ": expected a ", ndim, "-D tensor ", shape_hint, ", got ", describe(t));
  if (kind == Kind::Float) {
    TORCH_CHECK_VALUE(t.is_floating_point(), name, ": expected a floating-point tensor ", shape_hint, ", got ",
                      describe(t));
  } else {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                      ": expected an int32 or int64 tensor ", shape_hint, ", got ", describe(t));
  }
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected a tensor on ", device,
                    " (the device of x) ", shape_hint, ", got ", describe(t));
}

// t.size(dim) == size; `what` names the size ("I, the width of x").
inline void check_dim(const char* name, const at::Tensor& t, int64_t dim, int64_t size, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == size, name, ": expected size ", size, " (", what, ") in dim ", dim, ", got ",
                    describe(t));
}

// The arguments both SGMV kernels share: x [T, I], A [n, R, I], B [n, R, O], ranks [n],
// base [T, O], all on x's device, which must be of type `device_type`.
inline void check_lora_sgmv_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                   const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base,
                                   at::DeviceType device_type) {
  const at::Device dev = x.device();
  TORCH_CHECK_VALUE(dev.type() == device_type, "x: expected a tensor on ", at::Device(device_type), ", got ",
                    describe(x));
  check_tensor("x", x, 2, Kind::Float, dev, "[T, I]");
  check_tensor("A", A, 3, Kind::Float, dev, "[n, R, I]");
  check_tensor("B", B, 3, Kind::Float, dev, "[n, R, O]");
  check_dim("A", A, 2, x.size(1), "I, the width of x");
  check_dim("B", B, 0, A.size(0), "n, the adapters of A");
  check_dim("B", B, 1, A.size(1), "R, the rank of A");
  if (ranks) {
    check_tensor("ranks", *ranks, 1, Kind::Index, dev, "[n]");
    check_dim("ranks", *ranks, 0, A.size(0), "n, one rank per adapter");
  }
  if (base) {
    check_tensor("base", *base, 2, Kind::Float, dev, "[T, O]");
    check_dim("base", *base, 0, x.size(0), "T, the tokens of x");
    check_dim("base", *base, 1, B.size(2), "O, the width of B");
  }
}

}  // namespace v2l
