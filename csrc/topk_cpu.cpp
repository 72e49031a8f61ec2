// The top-k statistic on the CPU (mmts_kernels/topk.py): for each row i of S = x yᵀ (per head), the columns of the k
// largest S_ij over j ∉ {t_i, self_i}, by value descending, ties → lowest column first.
//
// Registered as mmts_kernels::cpu_topk with TORCH_LIBRARY_FRAGMENT (mmts_cpu.cpp owns the TORCH_LIBRARY block of
// the namespace). mmts_kernels/cpp_backend adds its fake kernel; it returns indices only, so it has no backward.
//
//   - S is streamed in BR×BC tiles: one BLAS call (at::mm_out) per tile into a per-thread buffer, never stored whole.
//   - Each row keeps a candidate buffer of capacity k + BC. A tile's entries are appended unless the row already
//     holds k candidates that all beat them (the k-th best is the threshold: columns only grow from tile to tile,
//     so an entry equal in value to the k-th best loses the tie and is skipped); when a row holds more than k,
//     nth_element keeps the k best. The final k are sorted once.
//   - Work is split over (head, row block) pairs with at::parallel_for; a row is only ever touched by one thread, in
//     a fixed column order, so the result does not depend on the number of threads.
// Extra memory: per thread one BR×BC tile and BR·(k + BC) candidates, plus the [H, N, k] output — O(N·k), never
// O(N·M). bf16/fp16 inputs are scored in fp32 (an O((N + M)·D) copy), as the statistics kernels do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mmts_topk {

using at::Tensor;

template <typename T>
struct Candidate {
  T value;
  int64_t col;
};

// The order of the result: larger value first, ties → lower column. NaN ranks above every number (as torch.sort
// puts it), so the order is a strict weak ordering even then and nth_element / sort stay well defined.
template <typename T>
inline bool ranks_before(const Candidate<T>& a, const Candidate<T>& b) {
  const bool na = std::isnan(a.value), nb = std::isnan(b.value);
  if (na || nb) return na && (!nb || a.col < b.col);
  return a.value > b.value || (a.value == b.value && a.col < b.col);
}

struct Shape {
  int64_t N, M, k, BR, BC;
};

// Rows [r0, r0 + br) of one head: their k best columns into out (row-major [N, k] of this head).
template <typename T>
void topk_row_block(const Tensor& X, const Tensor& Y, const int64_t* tgt, const int64_t* self, const Shape& s,
                    int64_t r0, Tensor& tile_buf, std::vector<Candidate<T>>& cand, std::vector<int64_t>& fill,
                    int64_t* out) {
  const int64_t br = std::min(s.BR, s.N - r0), cap = s.k + s.BC;
  std::fill(fill.begin(), fill.begin() + br, 0);
  const Tensor xb = X.narrow(0, r0, br);
  for (int64_t c0 = 0; c0 < s.M; c0 += s.BC) {
    const int64_t bc = std::min(s.BC, s.M - c0);
    Tensor St = tile_buf.narrow(0, 0, br * bc).view({br, bc});
    at::mm_out(St, xb, Y.narrow(0, c0, bc).t());
    const T* S = St.const_data_ptr<T>();
    for (int64_t i = 0; i < br; ++i) {
      Candidate<T>* c = cand.data() + i * cap;
      int64_t n = fill[i];
      const int64_t t = tgt[r0 + i], own = self != nullptr ? self[r0 + i] : -1;
      const bool full = n >= s.k;
      const Candidate<T> kth = full ? c[s.k - 1] : Candidate<T>{T(0), 0};
      for (int64_t j = 0; j < bc; ++j) {
        const int64_t col = c0 + j;
        if (col == t || col == own) continue;
        const Candidate<T> e{S[i * bc + j], col};
        if (full && !ranks_before(e, kth)) continue;
        c[n++] = e;
      }
      if (n >= s.k) {  // keep the k best, with the k-th best at c[k − 1]: the next tile's threshold
        std::nth_element(c, c + s.k - 1, c + n, ranks_before<T>);
        n = s.k;
      }
      fill[i] = n;
    }
  }
  for (int64_t i = 0; i < br; ++i) {
    Candidate<T>* c = cand.data() + i * cap;
    std::sort(c, c + fill[i], ranks_before<T>);
    int64_t* o = out + (r0 + i) * s.k;
    for (int64_t q = 0; q < s.k; ++q) o[q] = q < fill[i] ? c[q].col : -1;  // fill[i] == k: the op checks k
  }
}

template <typename T>
void topk_all(const Tensor& x, const Tensor& y, const int64_t* tgt, const int64_t* self, const Shape& s,
              Tensor& out) {
  const int64_t H = x.size(0), nrb = (s.N + s.BR - 1) / s.BR;
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, H * nrb, 1, [&](int64_t b, int64_t e) {
    Tensor tile_buf = at::empty({s.BR * s.BC}, x.options());
    std::vector<Candidate<T>> cand(s.BR * (s.k + s.BC));
    std::vector<int64_t> fill(s.BR);
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / nrb, rb = task % nrb;
      topk_row_block<T>(x.select(0, h), y.select(0, h), tgt, self, s, rb * s.BR, tile_buf, cand, fill,
                        op + h * s.N * s.k);
    }
  });
}

Tensor cpu_topk(const Tensor& x, const Tensor& y, const Tensor& targets, const c10::optional<Tensor>& self_cols,
                int64_t k, bool deterministic, int64_t block_rows, int64_t block_cols) {
  (void)deterministic;  // always: every row is reduced by one thread in a fixed order
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "cpu_topk: x and y must be [H, N, D] and [H, M, D]");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), "cpu_topk: heads and D of x and y must agree");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "cpu_topk: x and y must have the same dtype");
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "cpu_topk: block sizes must be positive");
  const int64_t N = x.size(1), M = y.size(1);
  const bool has_self = self_cols.has_value() && self_cols->defined();
  TORCH_CHECK(k >= 1 && k <= M - 1 - (has_self ? 1 : 0), "cpu_topk: need 1 <= k <= the negatives per row, got k=", k);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == N, "cpu_topk: targets must be int64 [N]");
  const at::ScalarType cdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor X = x.to(cdt).contiguous(), Y = y.to(cdt).contiguous();
  const Tensor tgt = targets.contiguous();
  Tensor own;
  if (has_self) {
    TORCH_CHECK(self_cols->scalar_type() == at::kLong && self_cols->numel() == N,
                "cpu_topk: self_cols must be int64 [N]");
    own = self_cols->contiguous();
  }
  Tensor out = at::empty({x.size(0), N, k}, x.options().dtype(at::kLong));
  if (N == 0) return out;
  const Shape s{N, M, k, block_rows, block_cols};
  const int64_t* own_p = has_self ? own.const_data_ptr<int64_t>() : nullptr;
  if (cdt == at::kDouble)
    topk_all<double>(X, Y, tgt.const_data_ptr<int64_t>(), own_p, s, out);
  else
    topk_all<float>(X, Y, tgt.const_data_ptr<int64_t>(), own_p, s, out);
  return out;
}

}  // namespace mmts_topk

TORCH_LIBRARY_FRAGMENT(mmts_kernels, m) {
  m.def("cpu_topk(Tensor x, Tensor y, Tensor targets, Tensor? self_cols, int k, bool deterministic, "
        "int block_rows, int block_cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmts_kernels, CPU, m) { m.impl("cpu_topk", &mmts_topk::cpu_topk); }
