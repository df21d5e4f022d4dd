// CPU SGMV: tokens grouped by adapter; large groups as two GEMMs (on views of x and y when the
// group is one run of consecutive tokens, else on its gathered rows), small ones (decode) as
// per-token dot/axpy loops spread over threads, where per-call GEMM overhead would dominate.
#include <ATen/Parallel.h>

#include <vector>

#include "checks.h"
#include "lora.h"

namespace {

// Groups with at least this many tokens go through at::mm.
constexpr int64_t kGemmMinTokens = 8;

float dot(const float* a, const float* b, int64_t len) {
  // Independent partial sums so the compiler can vectorise without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float total = 0;
  for (; i < len; ++i) total += a[i] * b[i];
  for (float v : acc) total += v;
  return total;
}

bool is_one_run(const std::vector<int64_t>& rows) {
  // Consecutive token indices, each one more than the last.
  for (size_t i = 1; i < rows.size(); ++i)
    if (rows[i] != rows[i - 1] + 1) return false;
  return true;
}

at::Tensor as_float_rows(const at::Tensor& t) {
  // fp32 with unit inner stride; a no-op for a fp32 layer view of a contiguous pool.
  at::Tensor f = t.to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

}  // namespace

at::Tensor lora_sgmv_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& seg_indptr, const at::Tensor& seg_adapter,
                         const std::optional<at::Tensor>& ranks, double scaling,
                         const std::optional<at::Tensor>& base) {
  v2l::check_lora_sgmv_common(x, A, B, ranks, base, at::kCPU);
  v2l::check_tensor("seg_indptr", seg_indptr, 1, v2l::Kind::Index, x.device(), "[S+1]");
  TORCH_CHECK_VALUE(seg_indptr.numel() >= 1, "seg_indptr: expected at least one element ([S+1] with seg_indptr[0] == 0)",
                    ", got ", v2l::describe(seg_indptr));
  v2l::check_tensor("seg_adapter", seg_adapter, 1, v2l::Kind::Index, x.device(), "[S]");
  v2l::check_dim("seg_adapter", seg_adapter, 0, seg_indptr.numel() - 1, "S, one adapter id per segment");
  const int64_t T = x.size(0), I = x.size(1), n = A.size(0), R = A.size(1), O = B.size(2);
  const at::ScalarType out_dtype = base ? base->scalar_type() : x.scalar_type();
  at::Tensor y = base ? base->to(at::kFloat, false, /*copy=*/true).contiguous() : at::zeros({T, O}, x.options().dtype(at::kFloat));
  if (T == 0 || n == 0 || R == 0) return y.to(out_dtype);
  const at::Tensor xf = as_float_rows(x), Af = as_float_rows(A), Bf = as_float_rows(B);

  // Counting sort of the tokens by adapter (ids outside [0, n) and rank-0 adapters: none).
  const at::Tensor ptr = seg_indptr.to(at::kLong).contiguous(), ids = seg_adapter.to(at::kLong).contiguous();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* a_of = ids.data_ptr<int64_t>();
  std::vector<int64_t> rank(n, R);
  if (ranks) {
    const at::Tensor rk = ranks->to(at::kLong).contiguous();
    for (int64_t a = 0; a < n; ++a) rank[a] = std::min<int64_t>(rk.data_ptr<int64_t>()[a], R);
  }
  std::vector<std::vector<int64_t>> tokens(n);
  for (int64_t s = 0; s < ids.numel(); ++s) {
    const int64_t a = a_of[s];
    if (a < 0 || a >= n || rank[a] <= 0) continue;
    for (int64_t t = std::max<int64_t>(p[s], 0); t < std::min(p[s + 1], T); ++t) tokens[a].push_back(t);
  }

  std::vector<std::pair<int64_t, int64_t>> small;  // (token, adapter)
  for (int64_t a = 0; a < n; ++a) {
    if (static_cast<int64_t>(tokens[a].size()) < kGemmMinTokens) {
      for (int64_t t : tokens[a]) small.emplace_back(t, a);
      continue;
    }
    const at::Tensor A_a = Af[a].narrow(0, 0, rank[a]), B_a = Bf[a].narrow(0, 0, rank[a]);
    const std::vector<int64_t>& rows = tokens[a];
    if (is_one_run(rows)) {
      // One run of consecutive tokens (a prefill's prompt, a video's decode rows side by side):
      // views of x and y, no gather of the rows and no scatter of their update.
      const int64_t first = rows.front(), count = static_cast<int64_t>(rows.size());
      y.narrow(0, first, count).addmm_(xf.narrow(0, first, count).mm(A_a.t()), B_a, 1.0, scaling);
      continue;
    }
    const at::Tensor idx = at::tensor(rows, x.options().dtype(at::kLong));
    y.index_add_(0, idx, xf.index_select(0, idx).mm(A_a.t()).mm(B_a), scaling);
  }

  const float* xp = xf.data_ptr<float>();
  const float* ap = Af.data_ptr<float>();
  const float* bp = Bf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = xf.stride(0), as0 = Af.stride(0), as1 = Af.stride(1), bs0 = Bf.stride(0), bs1 = Bf.stride(1);
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shrunk(R);
    for (int64_t j = begin; j < end; ++j) {
      const auto [t, a] = small[j];
      for (int64_t k = 0; k < rank[a]; ++k) shrunk[k] = static_cast<float>(scaling) * dot(xp + t * xs, ap + a * as0 + k * as1, I);
      float* row = yp + t * O;
      for (int64_t k = 0; k < rank[a]; ++k) {
        const float* b = bp + a * bs0 + k * bs1;
        const float c = shrunk[k];
        for (int64_t o = 0; o < O; ++o) row[o] += c * b[o];
      }
    }
  });
  return y.to(out_dtype);
}
