// The `cpp` backend of mmts_kernels: the statistics of S = x yᵀ (DESIGN §3) and their backward on the CPU,
// tiled, multi-threaded and fused, without ever holding S (or anything O(N·M)) in memory.
//
// Registered as two operators (TORCH_LIBRARY, so torch.compile sees real ops; mmts_kernels/cpp_backend adds the
// fake kernels and the autograd formula):
//   mmts_kernels::cpu_stats           forward statistics, 18 tensors: pos, lse, hinge, cnt, hard, arg, ws, lse_c,
//                                     hinge_c, cnt_c, hard_c, arg_c, ws_c, sig, the sigmoid's Σ_j z σ and
//                                     Σ_j z σ S (for ∂sig/∂b, ∂sig/∂τ; tile_kernels.h), and its fused gradient
//                                     products Q·y, Qᵀ·x (sig_q; forward_sig_fused)
//   mmts_kernels::cpu_stats_backward  (dx, dy) from the upstream gradients of the statistics; y None (y is x, NT-Xent's
//                                     Z against itself): (dZ, an empty tensor), one N×D gradient instead of two.
//                                     Given qx / qy (the forward's Q·y, Qᵀ·x), it writes dx / dy into them instead
//   mmts_kernels::cpu_isa             "avx2" or "portable": which build of the float kernels runs
//
// Layout of the work (per head h; heads run one after the other):
//   - x and y are upcast once to the compute type T (float for fp32/bf16/fp16 inputs, double for fp64).
//   - rows are cut in blocks of BR, columns in blocks of BC; a tile S[rb, cb] = X[rb] · Y[cb]ᵀ is one BLAS call
//     (at::mm_out) into a per-thread BR×BC buffer, then tile_kernels.h reduces it (forward) or turns it into dS
//     (backward) in place of S, and two more BLAS calls accumulate dx[rb] += dS · Y[cb], dy[cb] += dSᵀ · X[rb].
//   - forward: the row blocks are split into G = min(#row blocks, 32) fixed chunks run by at::parallel_for.
//     A chunk owns its rows' statistics outright and keeps its own O(M) column accumulators; the G column
//     accumulators are merged in chunk order at the end. G does not depend on the thread count, so the
//     forward is bitwise identical for any number of threads.
//   - backward, default (not the Gram mode): four GEMMs per tile pair, deterministic for a given thread count. With
//     at least T (threads) row and column blocks, T rounds of T tasks on disjoint row parts × column parts write
//     dx and dy directly (no buffer); otherwise, up to 8 threads, one task per thread, each with its own dy buffer
//     (O(threads·M·D)) summed in task order, and past 8 threads the two-pass schedule below (no buffer).
//   - backward, deterministic=True: dx in a pass parallel over row blocks, dy in a second pass parallel over
//     column blocks (S is recomputed once more), each block's sum in a fixed order: bitwise identical for any
//     thread count, no O(threads·M·D) buffer.
//   - backward, NT-Xent's Gram mode (y None, only the lse): one triangle of tiles, written straight into dZ by a
//     round-robin schedule of disjoint row parts (backward_gram): no N×D buffer beyond dZ itself.
//   - NT-Xent (row direction, cols=False): ``self_cols`` gives each row a column to leave out of every statistic
//     (the anchor itself), ``decoupled`` leaves its positive out of the lse (DCL), ``dys_grad`` lets DySTreSS's
//     gradient flow through τ(S). Labels (same_label "mask": same-label columns other than the target leave every
//     statistic, rows and columns; "positive": they are positives of the sigmoid). The excluded entries and the
//     sigmoid's positives of a tile are one byte mask built per tile (mask_tile), read by the tile kernels.
//   - sigmoid (rows only): sig_i = Σ_j softplus(−z_ij (S_ij/τ_i + b_i)), a tile kernel of its own beside the others.
//     Alone and with x or y requiring grad, the forward also multiplies each tile's ∂sig/∂S by y and x
//     (forward_sig_fused), and a backward with an upstream gradient uniform over the rows only scales those.
//   - hard/arg touch one element per row: O(N·D) loops outside the tiles. The pos and −cnt·g^hinge terms too
//     when no tile pass runs; otherwise they are added to dS_{i,t_i} in the tile (one element per row), where
//     they cancel against p_{i,t_i}/τ_i exactly as in the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <tuple>
#include <vector>

#define MMTS_KNS base
#define MMTS_FMA(a, b, c) ((a) * (b) + (c))
#include "tile_kernels.h"
#undef MMTS_FMA
#undef MMTS_KNS

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMTS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMTS_KNS avx2
#define MMTS_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#include "tile_kernels.h"
#undef MMTS_FMA
#undef MMTS_KNS
#pragma GCC pop_options
#endif

namespace mmts_cpu {
namespace {

using at::Tensor;

// Whether the float kernels use the AVX2+FMA build: when the CPU has both, unless MMTS_KERNELS_CPP_ISA=portable
// asks for the baseline build (the path of CPUs without AVX2, testable on one that has it). Read once per process.
bool read_use_avx2() {
  const char* env = std::getenv("MMTS_KERNELS_CPP_ISA");
  const std::string isa = env == nullptr ? "" : env;
  TORCH_CHECK(isa.empty() || isa == "auto" || isa == "portable",
              "MMTS_KERNELS_CPP_ISA must be 'auto' (the default) or 'portable', got '", isa, "'");
#ifdef MMTS_HAVE_AVX2
  return isa != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool use_avx2_kernels() {
  static const bool ok = read_use_avx2();
  return ok;
}

// The instruction set the float kernels run with: "avx2" or "portable".
std::string cpu_isa() { return use_avx2_kernels() ? "avx2" : "portable"; }

#define MMTS_STRIP(...) __VA_ARGS__
// Call the float kernels compiled for AVX2+FMA when use_avx2_kernels(); double always uses the baseline build.
#ifdef MMTS_HAVE_AVX2
#define KCALL(T, FN, TARGS, ...)                             \
  do {                                                       \
    if (std::is_same<T, float>::value && use_avx2_kernels()) \
      avx2::FN<MMTS_STRIP TARGS>(__VA_ARGS__);               \
    else                                                     \
      base::FN<MMTS_STRIP TARGS>(__VA_ARGS__);               \
  } while (0)
#else
#define KCALL(T, FN, TARGS, ...) base::FN<MMTS_STRIP TARGS>(__VA_ARGS__)
#endif

constexpr int64_t kMaxChunks = 32;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Opts {
  bool lse, hinge, hard, ws, cols, dys, deterministic;
  double tau_min, tau_max;
  int64_t BR, BC;
  bool decoupled = false;  // the positive leaves row i's lse (DCL)
  bool dgrad = false;      // DySTreSS with the gradient through τ(S) (detach=False)
  bool has_self = false;   // self_cols given: row i leaves out column self_i (NT-Xent)
  bool gram = false;       // NT-Xent's S = Z Zᵀ: one triangle of tiles serves rows and columns (see gram_layout)
  bool sig = false;        // the sigmoid statistic (rows only)
  bool sig_grad = false;   // and its Σ z σ, Σ z σ S for the gradients of τ and the bias
  bool sig_q = false;      // the sigmoid alone, fused with its x / y gradients (forward_sig_fused)
  int64_t same_label = 0;  // kSameNone, kSameMask or kSamePositive (labels given)
  bool mask() const { return has_self || decoupled || same_label != 0; }
};

// request.same_label: None, "mask", "positive" (the python side passes these numbers).
constexpr int64_t kSameNone = 0, kSameMask = 1, kSamePositive = 2;

// One tile's mask (tile_kernels.h: kOut, kOutLse, kPos) from the targets, the self columns and the labels (nullptr
// when absent), built once per tile when o.mask() and read by every statistic of the tile.
void mask_tile(uint8_t* X, int64_t br, int64_t bc, int64_t r0, int64_t c0, const int64_t* tgt, const int64_t* self,
               const int64_t* lx, const int64_t* ly, const Opts& o) {
  using base::kOut;  // the bits are the same in every build
  using base::kOutLse;
  using base::kPos;
  const uint8_t on_target = kPos | (o.decoupled ? kOutLse : 0);
  const uint8_t on_same = o.same_label == kSameMask ? kOut : o.same_label == kSamePositive ? kPos : 0;
  for (int64_t i = 0; i < br; ++i) {
    const int64_t r = r0 + i, tl = tgt[r] - c0, sl = self ? self[r] - c0 : -1;  // t = −1: no target column
    uint8_t* x = X + i * bc;
    if (on_same) {
      const int64_t label = lx[r];
      const int64_t* l = ly + c0;
      for (int64_t j = 0; j < bc; ++j) x[j] = l[j] == label ? on_same : 0;
    } else {
      std::memset(x, 0, bc);
    }
    if (tl >= 0 && tl < bc) x[tl] = on_target;
    if (sl >= 0 && sl < bc) x[sl] |= kOut;
  }
}

// CALL(FLAG, has a tile mask) with both as template constants: how a tile kernel call turns its runtime switches into
// template ones (Xm: the tile's mask, or nullptr).
#define MMTS_SWITCH2(FLAG, CALL) \
  do {                           \
    if (FLAG) {                  \
      if (Xm) CALL(true, true);  \
      else CALL(true, false);    \
    } else {                     \
      if (Xm) CALL(false, true); \
      else CALL(false, false);   \
    }                            \
  } while (0)

// A contiguous [br, bc] view of a flat per-thread buffer (at::mm_out writes into it without copies).
Tensor tile_view(const Tensor& buf, int64_t br, int64_t bc) { return buf.narrow(0, 0, br * bc).view({br, bc}); }

// The sigmoid alone, fused with its gradient (o.sig_q): besides sig (and Σ z σ, Σ z σ S), QX = Q·Y and QY = Qᵀ·X
// (undefined: not wanted) with Q_ij = ∂sig_i/∂S_ij = −z_ij σ(v_ij)/τ_i, from the tiles the statistic already has.
// When the upstream gradient g of sig is uniform over the rows of a head (g_i = g_0: the mean and the sum), dx = g_0 QX
// and dy = g_0 QY, and the backward recomputes no tile (cpu_stats_backward): three GEMMs per tile pair in all
// instead of four. Rows and columns are cut into G = min(#row blocks, #column blocks) parts; in round ρ task k does
// row part k × column part (k + ρ) mod G, so a round's tasks write disjoint rows of sig, QX and QY (a round ends with
// its parallel_for). G depends on the shapes and tiles only, and so does the order of every sum: bitwise identical
// for any thread count (deterministic=True included), though not to forward_head's order of the column blocks.
template <typename T>
void forward_sig_fused(const Tensor& X, const Tensor& Y, const T* tau, const T* bias, const int64_t* tgt,
                       const int64_t* self, const int64_t* lx, const int64_t* ly, const Opts& o, T* sig, T* sig_b,
                       T* sig_t, Tensor& QX, Tensor& QY) {
  const int64_t N = X.size(0), M = Y.size(0);
  const int64_t nrb = cdiv(N, o.BR), ncb = cdiv(M, o.BC), G = std::min(nrb, ncb);
  const auto opt = X.options();
  for (int64_t round = 0; round < G; ++round) {
    at::parallel_for(0, G, 1, [&](int64_t b, int64_t e) {
      Tensor buf = at::empty({o.BR * o.BC}, opt);
      std::vector<uint8_t> mbuf(o.mask() ? o.BR * o.BC : 0);
      for (int64_t k = b; k < e; ++k) {
        const int64_t q = (k + round) % G;
        for (int64_t rb = k * nrb / G; rb < (k + 1) * nrb / G; ++rb) {
          const int64_t r0 = rb * o.BR, br = std::min(o.BR, N - r0);
          const Tensor xb = X.narrow(0, r0, br);
          for (int64_t cb = q * ncb / G; cb < (q + 1) * ncb / G; ++cb) {
            const int64_t c0 = cb * o.BC, bc = std::min(o.BC, M - c0);
            const Tensor yb = Y.narrow(0, c0, bc);
            Tensor St = tile_view(buf, br, bc);
            at::mm_out(St, xb, yb.t());
            const uint8_t* Xm = nullptr;
            if (o.mask()) {
              mask_tile(mbuf.data(), br, bc, r0, c0, tgt, self, lx, ly, o);
              Xm = mbuf.data();
            }
            T* S = St.data_ptr<T>();
#define MMTS_FWD_SIG_Q(GR, MK) \
  KCALL(T, fwd_sig, (T, MK, GR, true), S, bc, br, bc, r0, c0, tgt, tau, bias, sig, sig_b, sig_t, Xm)
            MMTS_SWITCH2(o.sig_grad, MMTS_FWD_SIG_Q);
#undef MMTS_FWD_SIG_Q
            if (QX.defined()) QX.narrow(0, r0, br).addmm_(St, yb);  // St now holds Q
            if (QY.defined()) QY.narrow(0, c0, bc).addmm_(St.t(), xb);
          }
        }
      }
    });
  }
}

template <typename T>
void forward_head(const Tensor& X, const Tensor& Y, const T* tau, const T* marg, const T* bias, const int64_t* tgt,
                  const int64_t* self, const int64_t* lx, const int64_t* ly, const Opts& o,
                  T* pos, T* lse, T* ws, T* hinge, int64_t* cnt, T* hard, int64_t* arg,
                  T* lse_c, T* ws_c, T* hinge_c, int64_t* cnt_c, T* hard_c, int64_t* arg_c,
                  T* sig, T* sig_b, T* sig_t, Tensor QX, Tensor QY) {
  const int64_t N = X.size(0), M = Y.size(0), D = X.size(1);
  const T* xp = X.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T tmin = T(o.tau_min), half = T(0.5 * (o.tau_max - o.tau_min));

  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {  // pos_i = x_i · y_{t_i}
    for (int64_t i = b; i < e; ++i) {
      if (tgt[i] < 0) {  // no positive in this y
        pos[i] = 0;
        continue;
      }
      const T* a = xp + i * D;
      const T* c = yp + tgt[i] * D;
      T acc = 0;
      for (int64_t k = 0; k < D; ++k) acc += a[k] * c[k];
      pos[i] = acc;
    }
  });

  const auto opt = X.options();
  Tensor rmax, rsum;
  if (o.lse) {
    rmax = at::full({N}, ninf, opt);
    rsum = at::zeros({N}, opt);
    if (o.ws) std::fill(ws, ws + N, T(0));
  }
  if (o.hinge) {
    std::fill(hinge, hinge + N, T(0));
    std::fill(cnt, cnt + N, int64_t(0));
  }
  if (o.hard) {
    std::fill(hard, hard + N, ninf);
    std::fill(arg, arg + N, int64_t(0));
  }
  if (o.sig) {
    std::fill(sig, sig + N, T(0));
    if (o.sig_grad) {
      std::fill(sig_b, sig_b + N, T(0));
      std::fill(sig_t, sig_t + N, T(0));
    }
  }
  if (o.sig_q) {
    forward_sig_fused<T>(X, Y, tau, bias, tgt, self, lx, ly, o, sig, sig_b, sig_t, QX, QY);
    return;
  }

  const int64_t nrb = cdiv(N, o.BR), ncb = cdiv(M, o.BC);
  const int64_t G = std::min(nrb, kMaxChunks);
  // Gram mode: row block rb visits column blocks cb ≤ rb; an off-diagonal tile's column pass is the row statistics
  // of rows cb over columns rb (S_ji = S_ij, τ_j), kept in the column accumulators and merged into the rows at the
  // end. Chunks then hold about equal triangle areas: row block boundaries at nrb·sqrt(g/G).
  auto chunk_begin = [&](int64_t g) -> int64_t {
    if (!o.gram || g >= G) return g * nrb / G;
    return std::min<int64_t>(nrb, std::llround(double(nrb) * std::sqrt(double(g) / double(G))));
  };
  // Column accumulators, one set per chunk: [G, M] each (only those requested).
  Tensor cmax, csum, cws, chg, ccnt, chd, carg;
  if (o.cols || o.gram) {
    if (o.lse) {
      cmax = at::full({G, M}, ninf, opt);
      csum = at::zeros({G, M}, opt);
      if (o.ws) cws = at::zeros({G, M}, opt);
    }
    if (o.hinge) {
      chg = at::zeros({G, M}, opt);
      ccnt = at::zeros({G, M}, opt.dtype(at::kInt));
    }
    if (o.hard) {
      chd = at::full({G, M}, ninf, opt);
      carg = at::zeros({G, M}, opt.dtype(at::kLong));
    }
  }
  T* rmaxp = o.lse ? rmax.data_ptr<T>() : nullptr;
  T* rsump = o.lse ? rsum.data_ptr<T>() : nullptr;

  at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
    Tensor buf = at::empty({o.BR * o.BC}, opt);
    Tensor zbuf = o.dys ? at::empty({o.BR * o.BC}, opt) : Tensor();
    std::vector<T> tile_cmax(o.BC);
    std::vector<uint8_t> mbuf(o.mask() ? o.BR * o.BC : 0);
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t rb_begin = chunk_begin(g), rb_end = chunk_begin(g + 1);
      auto col = [&](const Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() + g * M : nullptr; };
      T *cm = col(cmax), *cs = col(csum), *cw = col(cws), *ch = col(chg), *chdp = col(chd);
      int32_t* cc = ccnt.defined() ? ccnt.data_ptr<int32_t>() + g * M : nullptr;
      int64_t* ca = carg.defined() ? carg.data_ptr<int64_t>() + g * M : nullptr;
      for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
        const int64_t r0 = rb * o.BR, br = std::min(o.BR, N - r0);
        const Tensor xb = X.narrow(0, r0, br);
        for (int64_t cb = 0; cb < (o.gram ? rb + 1 : ncb); ++cb) {
          const int64_t c0 = cb * o.BC, bc = std::min(o.BC, M - c0);
          const bool tile_cols = o.cols || (o.gram && cb < rb);  // the diagonal tile holds both triangles
          Tensor St = tile_view(buf, br, bc);
          at::mm_out(St, xb, Y.narrow(0, c0, bc).t());
          const T* S = St.const_data_ptr<T>();
          const uint8_t* Xm = nullptr;
          if (o.mask()) {
            mask_tile(mbuf.data(), br, bc, r0, c0, tgt, self, lx, ly, o);
            Xm = mbuf.data();
          }
          // pos_i from the tile: the very S_{i,t_i} the lse saw, so that lse_i − pos_i/τ_i cancels its rounding
          // (the pre-pass dot rounds differently, an error the 1/τ would amplify). Each row is this thread's.
          // Not with a hinge, which reads the pre-pass pos while the sweep runs.
          if (o.lse && !o.hinge)
            for (int64_t i = 0; i < br; ++i) {
              const int64_t t = tgt[r0 + i] - c0;
              if (t >= 0 && t < bc) pos[r0 + i] = S[i * bc + t];
            }
          if (o.gram && tile_cols)  // row j's positive seen from the transposed side (its only tile)
            for (int64_t j = 0; j < bc; ++j) {
              const int64_t t = tgt[c0 + j] - r0;
              if (t >= 0 && t < br) pos[c0 + j] = S[t * bc + j];
            }
          if (o.lse) {
            T* Z = o.dys ? zbuf.data_ptr<T>() : nullptr;
#define MMTS_FWD_LSE(C, DY, W, MK)                                                                              \
  KCALL(T, fwd_lse, (T, C, DY, W, MK), S, bc, br, bc, r0, c0, rmaxp, rsump, ws, tau, cm, cs, cw, tile_cmax.data(), \
        Z, tmin, half, Xm)
            if (tile_cols && o.mask()) {  // the mask serves the columns too (tile_kernels.h: kOut)
              if (o.dys) MMTS_FWD_LSE(true, true, false, true);
              else if (o.ws) MMTS_FWD_LSE(true, false, true, true);
              else MMTS_FWD_LSE(true, false, false, true);
            } else if (tile_cols) {
              if (o.dys) MMTS_FWD_LSE(true, true, false, false);
              else if (o.ws) MMTS_FWD_LSE(true, false, true, false);
              else MMTS_FWD_LSE(true, false, false, false);
            } else if (o.mask()) {
              if (o.dys) MMTS_FWD_LSE(false, true, false, true);
              else if (o.ws) MMTS_FWD_LSE(false, false, true, true);
              else MMTS_FWD_LSE(false, false, false, true);
            } else {
              if (o.dys) MMTS_FWD_LSE(false, true, false, false);
              else if (o.ws) MMTS_FWD_LSE(false, false, true, false);
              else MMTS_FWD_LSE(false, false, false, false);
            }
#undef MMTS_FWD_LSE
          }
#define MMTS_FWD_HINGE(C, MK) \
  KCALL(T, fwd_hinge, (T, C, MK), S, bc, br, bc, r0, c0, tgt, marg, pos, hinge, cnt, ch, cc, Xm)
#define MMTS_FWD_HARD(C, MK) KCALL(T, fwd_hard, (T, C, MK), S, bc, br, bc, r0, c0, tgt, hard, arg, chdp, ca, Xm)
#define MMTS_FWD_SIG(GR, MK) \
  KCALL(T, fwd_sig, (T, MK, GR, false), const_cast<T*>(S), bc, br, bc, r0, c0, tgt, tau, bias, sig, sig_b, \
        sig_t, Xm)  /* WRITE_Q false: S is only read */
          if (o.hinge) MMTS_SWITCH2(o.cols, MMTS_FWD_HINGE);
          if (o.hard) MMTS_SWITCH2(o.cols, MMTS_FWD_HARD);
          if (o.sig) MMTS_SWITCH2(o.sig_grad, MMTS_FWD_SIG);
#undef MMTS_FWD_HINGE
#undef MMTS_FWD_HARD
#undef MMTS_FWD_SIG
        }
      }
    }
  });

  if (o.gram)  // fold each chunk's transposed contributions into the row state, in chunk order
    at::parallel_for(0, N, 1024, [&](int64_t jb, int64_t je) {
      const T* cm = cmax.const_data_ptr<T>();
      const T* cs = csum.const_data_ptr<T>();
      const T* cw = o.ws ? cws.const_data_ptr<T>() : nullptr;
      for (int64_t j = jb; j < je; ++j) {
        T m = rmaxp[j];
        for (int64_t g = 0; g < G; ++g) m = base::vmax(m, cm[g * M + j]);
        const T fr = rmaxp[j] == m ? T(1) : std::exp(rmaxp[j] - m);
        T l = rsump[j] * fr, w = o.ws ? ws[j] * fr : T(0);
        for (int64_t g = 0; g < G; ++g) {
          const T mg = cm[g * M + j];
          const T f = mg == m ? T(1) : std::exp(mg - m);
          l += cs[g * M + j] * f;
          if (o.ws) w += cw[g * M + j] * f;
        }
        rmaxp[j] = m;
        rsump[j] = l;
        if (o.ws) ws[j] = w;
      }
    });
  if (o.lse) {
    for (int64_t i = 0; i < N; ++i) {
      if (o.ws) ws[i] /= rsump[i];
      lse[i] = rmaxp[i] + std::log(rsump[i]);
    }
  }
  if (!o.cols) return;
  // Merge the chunks' column accumulators in chunk order (parallel over columns: each column independently).
  at::parallel_for(0, M, 1024, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      if (o.lse) {
        const T* cm = cmax.const_data_ptr<T>();
        const T* cs = csum.const_data_ptr<T>();
        const T* cw = o.ws ? cws.const_data_ptr<T>() : nullptr;
        T m = ninf;
        for (int64_t g = 0; g < G; ++g) m = base::vmax(m, cm[g * M + j]);
        T l = 0, w = 0;
        for (int64_t g = 0; g < G; ++g) {
          const T mg = cm[g * M + j];
          const T f = mg == m ? T(1) : std::exp(mg - m);
          l += cs[g * M + j] * f;
          if (o.ws) w += cw[g * M + j] * f;
        }
        lse_c[j] = m + std::log(l);
        if (o.ws) ws_c[j] = w / l;
      }
      if (o.hinge) {
        const T* ch = chg.const_data_ptr<T>();
        const int32_t* cc = ccnt.const_data_ptr<int32_t>();
        T h = 0;
        int64_t n = 0;
        for (int64_t g = 0; g < G; ++g) {
          h += ch[g * M + j];
          n += cc[g * M + j];
        }
        hinge_c[j] = h;
        cnt_c[j] = n;
      }
      if (o.hard) {
        const T* hd = chd.const_data_ptr<T>();
        const int64_t* ca = carg.const_data_ptr<int64_t>();
        T best = ninf;
        int64_t a = 0;
        for (int64_t g = 0; g < G; ++g) {
          const T v = hd[g * M + j];
          // chunks hold ascending rows: strict keeps the lowest row on ties; the first NaN sticks
          if (v > best || (v != v && best == best)) {
            best = v;
            a = ca[g * M + j];
          }
        }
        hard_c[j] = best;
        arg_c[j] = a;
      }
    }
  });
}

// Everything the backward tile function needs for one head.
template <typename T>
struct BwdHead {
  const T *grow = nullptr, *lse = nullptr, *tau = nullptr, *gcol = nullptr, *lse_c = nullptr;
  const T *marg = nullptr, *pos = nullptr, *gh = nullptr, *ghc = nullptr, *gpos = nullptr;
  const T *gsig = nullptr, *bias = nullptr;  // the sigmoid's g^sig_i/τ_i and b_i
  const int64_t* tgt = nullptr;
  const int64_t* self = nullptr;  // excluded column of each row (nullptr: none)
  const int64_t *lx = nullptr, *ly = nullptr;  // labels (same_label set)
  bool lse_on = false, hinge_on = false, sig_on = false;
};

// ``gram_cols``: an off-diagonal tile of the Gram mode, whose column terms are row j's (h.gcol = h.grow, h.lse_c =
// h.lse), so dS here is E = dS_ij + dS_ji, with row j's positive gradient at (t_j, j).
template <typename T>
void dS_tile(const T* S, int64_t br, int64_t bc, int64_t r0, int64_t c0, T* dS, const BwdHead<T>& h, const Opts& o,
             bool gram_cols = false) {
  const T tmin = T(o.tau_min), half = T(0.5 * (o.tau_max - o.tau_min));
  thread_local std::vector<uint8_t> mbuf;  // the tile's mask, one per thread
  const uint8_t* Xm = nullptr;
  if (o.mask()) {
    if (mbuf.size() < size_t(br * bc)) mbuf.resize(br * bc);
    mask_tile(mbuf.data(), br, bc, r0, c0, h.tgt, h.self, h.lx, h.ly, o);
    Xm = mbuf.data();
  }
  bool acc = false;
  if (h.lse_on) {
#define MMTS_BWD_LSE(C, DY, MK, DG)                                                                    \
  KCALL(T, bwd_lse, (T, C, DY, false, MK, DG), S, bc, br, bc, r0, c0, dS, h.grow, h.lse, h.tau, h.gcol, \
        h.lse_c, tmin, half, Xm)
    if ((gram_cols || o.cols) && o.mask()) {  // the mask serves the columns too (tile_kernels.h: kOut)
      if (o.dys && o.dgrad) MMTS_BWD_LSE(true, true, true, true);
      else if (o.dys) MMTS_BWD_LSE(true, true, true, false);
      else MMTS_BWD_LSE(true, false, true, false);
    } else if (o.cols || gram_cols) {
      if (o.dys && o.dgrad) MMTS_BWD_LSE(true, true, false, true);
      else if (o.dys) MMTS_BWD_LSE(true, true, false, false);
      else MMTS_BWD_LSE(true, false, false, false);
    } else if (o.mask()) {
      if (o.dys && o.dgrad) MMTS_BWD_LSE(false, true, true, true);
      else if (o.dys) MMTS_BWD_LSE(false, true, true, false);
      else MMTS_BWD_LSE(false, false, true, false);
    } else {
      if (o.dys && o.dgrad) MMTS_BWD_LSE(false, true, false, true);
      else if (o.dys) MMTS_BWD_LSE(false, true, false, false);
      else MMTS_BWD_LSE(false, false, false, false);
    }
#undef MMTS_BWD_LSE
    acc = true;
  }
#define MMTS_BWD_HINGE(C, A, MK) \
  KCALL(T, bwd_hinge, (T, C, A, MK), S, bc, br, bc, r0, c0, dS, h.tgt, h.marg, h.pos, h.gh, h.ghc, Xm)
#define MMTS_BWD_HINGE_COLS(A, MK) MMTS_BWD_HINGE(true, A, MK)
#define MMTS_BWD_HINGE_ROWS(A, MK) MMTS_BWD_HINGE(false, A, MK)
#define MMTS_BWD_SIG(A, MK) KCALL(T, bwd_sig, (T, MK, A), S, bc, br, bc, r0, c0, dS, h.tgt, h.tau, h.bias, h.gsig, Xm)
  if (h.hinge_on) {
    if (o.cols) MMTS_SWITCH2(acc, MMTS_BWD_HINGE_COLS);
    else MMTS_SWITCH2(acc, MMTS_BWD_HINGE_ROWS);
    acc = true;
  }
  if (h.sig_on) MMTS_SWITCH2(acc, MMTS_BWD_SIG);
#undef MMTS_BWD_HINGE
#undef MMTS_BWD_HINGE_COLS
#undef MMTS_BWD_HINGE_ROWS
#undef MMTS_BWD_SIG
  // The positive's own gradient (pos_i = S_{i,t_i}, with the −cnt·g^hinge terms) joins dS before the GEMMs, as
  // in the reference: added to x·y/τ afterwards it would cancel against p/τ ≈ 1/τ and lose ~1e-5 relative.
  for (int64_t i = 0; i < br; ++i) {
    const int64_t tl = h.tgt[r0 + i] - c0;
    if (tl >= 0 && tl < bc) dS[i * bc + tl] += h.gpos[r0 + i];
  }
  if (gram_cols)
    for (int64_t j = 0; j < bc; ++j) {
      const int64_t tl = h.tgt[c0 + j] - r0;
      if (tl >= 0 && tl < br) dS[tl * bc + j] += h.gpos[c0 + j];
    }
}

template <typename T>
void backward_tiles(const Tensor& X, const Tensor& Y, const BwdHead<T>& h, const Opts& o, Tensor& dX, Tensor& dY) {
  const int64_t N = X.size(0), M = Y.size(0);
  const int64_t nrb = cdiv(N, o.BR), ncb = cdiv(M, o.BC);
  const auto opt = X.options();
  // One tile: S = X[rb] Y[cb]ᵀ into sbuf, dS into dbuf; returns the dS view.
  auto tile = [&](int64_t rb, int64_t cb, const Tensor& sbuf, const Tensor& dbuf) {
    const int64_t r0 = rb * o.BR, br = std::min(o.BR, N - r0), c0 = cb * o.BC, bc = std::min(o.BC, M - c0);
    Tensor St = tile_view(sbuf, br, bc), dSt = tile_view(dbuf, br, bc);
    at::mm_out(St, X.narrow(0, r0, br), Y.narrow(0, c0, bc).t());
    dS_tile<T>(St.const_data_ptr<T>(), br, bc, r0, c0, dSt.data_ptr<T>(), h, o);
    return dSt;
  };
  auto rows = [&](int64_t rb) { return std::make_pair(rb * o.BR, std::min(o.BR, N - rb * o.BR)); };
  auto cols = [&](int64_t cb) { return std::make_pair(cb * o.BC, std::min(o.BC, M - cb * o.BC)); };

  // deterministic=True: the two-pass schedule, bitwise for any thread count. Per-thread dy buffers (the last schedule
  // below) cost O(threads·M·D): past kMaxDyBuffers threads the two-pass schedule, one more recompute of S and no
  // buffer, keeps the extra memory O((N+M)·D) however many cores there are.
  constexpr int64_t kMaxDyBuffers = 8;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (o.deterministic || (threads > kMaxDyBuffers && threads > std::min(nrb, ncb))) {
    at::parallel_for(0, nrb, 1, [&](int64_t b, int64_t e) {  // dx: row blocks in parallel
      Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
      for (int64_t rb = b; rb < e; ++rb) {
        auto [r0, br] = rows(rb);
        Tensor dxb = dX.narrow(0, r0, br);
        for (int64_t cb = 0; cb < ncb; ++cb) {
          auto [c0, bc] = cols(cb);
          dxb.addmm_(tile(rb, cb, sbuf, dbuf), Y.narrow(0, c0, bc));
        }
      }
    });
    at::parallel_for(0, ncb, 1, [&](int64_t b, int64_t e) {  // dy: column blocks in parallel
      Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
      for (int64_t cb = b; cb < e; ++cb) {
        auto [c0, bc] = cols(cb);
        Tensor dyb = dY.narrow(0, c0, bc);
        for (int64_t rb = 0; rb < nrb; ++rb) {
          auto [r0, br] = rows(rb);
          dyb.addmm_(tile(rb, cb, sbuf, dbuf).t(), X.narrow(0, r0, br));
        }
      }
    });
    return;
  }
  if (threads <= std::min(nrb, ncb)) {
    // One pass without buffers: rows and columns each cut into P = T contiguous parts; in round ρ task k does the
    // tiles of row part k × column part (k + ρ) mod P, so the T tasks of a round write disjoint rows of dx and of
    // dy. P rounds (each ends with its parallel_for) cover every pair of parts once; every row's sum runs in an
    // order fixed by T: reproducible for a given thread count.
    const int64_t P = threads;
    for (int64_t round = 0; round < P; ++round) {
      at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
        Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
        for (int64_t k = b; k < e; ++k) {
          const int64_t q = (k + round) % P;
          for (int64_t rb = k * nrb / P; rb < (k + 1) * nrb / P; ++rb) {
            auto [r0, br] = rows(rb);
            Tensor dxb = dX.narrow(0, r0, br), xb = X.narrow(0, r0, br);
            for (int64_t cb = q * ncb / P; cb < (q + 1) * ncb / P; ++cb) {
              auto [c0, bc] = cols(cb);
              Tensor dSt = tile(rb, cb, sbuf, dbuf);
              dxb.addmm_(dSt, Y.narrow(0, c0, bc));
              dY.narrow(0, c0, bc).addmm_(dSt.t(), xb);
            }
          }
        }
      });
    }
    return;
  }
  // Fewer row or column blocks than threads: task k owns a contiguous range of row blocks and accumulates dy into
  // its own buffer (small here unless M is much larger than N), summed in task order.
  const int64_t tasks = std::min(threads, nrb);
  std::vector<Tensor> dy_parts(tasks);
  dy_parts[0] = dY;
  for (int64_t k = 1; k < tasks; ++k) dy_parts[k] = at::zeros_like(dY);
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
    for (int64_t k = b; k < e; ++k) {
      for (int64_t rb = k * nrb / tasks; rb < (k + 1) * nrb / tasks; ++rb) {
        auto [r0, br] = rows(rb);
        Tensor dxb = dX.narrow(0, r0, br), xb = X.narrow(0, r0, br);
        for (int64_t cb = 0; cb < ncb; ++cb) {
          auto [c0, bc] = cols(cb);
          Tensor dSt = tile(rb, cb, sbuf, dbuf);
          dxb.addmm_(dSt, Y.narrow(0, c0, bc));
          dy_parts[k].narrow(0, c0, bc).addmm_(dSt.t(), xb);
        }
      }
    }
  });
  for (int64_t k = 1; k < tasks; ++k) dY.add_(dy_parts[k]);  // fixed order
}

// Gram mode (x = y = Z): E = dS + dSᵀ over the lower triangle of tiles, dZ[rb] += E·Z[cb] and dZ[cb] += Eᵀ·Z[rb]:
// half the tiles and GEMMs of the full sweep, written straight into dZ (no other N×D buffer). The row blocks are cut
// into P contiguous parts (P = 2T for T threads, even, at most one part per block). A round-robin tournament over
// the parts (circle method: part P−1 stays, the others rotate) gives P − 1 rounds of P/2 disjoint matches; match
// (p, q), p > q, does the rectangle rb ∈ p, cb ∈ q, which writes only the rows of p and q, so a round's matches run
// in parallel without any per-task buffer. A last round does each part's own triangle (cb ≤ rb inside the part).
// A round ends with its parallel_for. Every row's sum runs in an order fixed by T: reproducible for a given
// thread count, as backward_tiles' default schedule.
template <typename T>
void backward_gram(const Tensor& X, const BwdHead<T>& h, const Opts& o, Tensor& dX) {
  const int64_t N = X.size(0), nb = cdiv(N, o.BR);
  const auto opt = X.options();
  int64_t P = std::min<int64_t>(2 * std::max<int64_t>(1, at::get_num_threads()), nb);
  if (P > 1 && P % 2 == 1) --P;
  auto part = [&](int64_t p) { return p * nb / P; };  // first row block of part p
  // Tiles rb ∈ [rb0, rb1) × cb ∈ [cb0, cb1), only cb ≤ rb (the rectangle of a match lies below the diagonal).
  auto sweep = [&](int64_t rb0, int64_t rb1, int64_t cb0, int64_t cb1, const Tensor& sbuf, const Tensor& dbuf) {
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t r0 = rb * o.BR, br = std::min(o.BR, N - r0);
      const Tensor zr = X.narrow(0, r0, br);
      Tensor dzr = dX.narrow(0, r0, br);
      for (int64_t cb = cb0; cb < std::min(cb1, rb + 1); ++cb) {
        const int64_t c0 = cb * o.BC, bc = std::min(o.BC, N - c0);
        const Tensor zc = X.narrow(0, c0, bc);
        Tensor St = tile_view(sbuf, br, bc), E = tile_view(dbuf, br, bc);
        at::mm_out(St, zr, zc.t());
        dS_tile<T>(St.const_data_ptr<T>(), br, bc, r0, c0, E.data_ptr<T>(), h, o, cb < rb);
        dzr.addmm_(E, zc);
        if (cb < rb) dX.narrow(0, c0, bc).addmm_(E.t(), zr);
        else dzr.addmm_(E.t(), zr);  // the diagonal tile holds both triangles: dSᵀ lands on its own rows
      }
    }
  };
  for (int64_t round = 0; round < P - 1; ++round) {
    at::parallel_for(0, P / 2, 1, [&](int64_t b, int64_t e) {
      Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
      for (int64_t k = b; k < e; ++k) {
        int64_t p = P - 1, q = round;
        if (k > 0) {
          p = (round + k) % (P - 1);
          q = (round - k + P - 1) % (P - 1);
        }
        if (p < q) std::swap(p, q);
        sweep(part(p), part(p + 1), part(q), part(q + 1), sbuf, dbuf);
      }
    });
  }
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
    for (int64_t p = b; p < e; ++p) sweep(part(p), part(p + 1), part(p), part(p + 1), sbuf, dbuf);
  });
}

// dx_i += g_i · y_{c_i}, dy_{c_i} += g_i · x_i for one gathered element per row (serial: duplicates in c; c_i < 0:
// none).
template <typename T>
void add_gathered(const T* xp, const T* yp, T* dx, T* dy, int64_t N, int64_t D, const T* g, const int64_t* c) {
  for (int64_t i = 0; i < N; ++i) {
    const T gi = g[i];
    if (gi == T(0) || c[i] < 0) continue;  // c = −1: a row without a positive in this y
    const T* xi = xp + i * D;
    const T* yc = yp + c[i] * D;
    T* dxi = dx + i * D;
    T* dyc = dy + c[i] * D;
    for (int64_t k = 0; k < D; ++k) {
      dxi[k] += gi * yc[k];
      dyc[k] += gi * xi[k];
    }
  }
}

Opts make_opts(bool lse, bool hinge, bool hard, bool ws, bool cols, bool dys, double tau_min, double tau_max,
               bool deterministic, int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "mmts_kernels cpp: block sizes must be positive");
  return Opts{lse, hinge, hard, ws, cols, dys, deterministic, tau_min, tau_max, block_rows, block_cols};
}

at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& x, const Tensor& y, const Tensor& targets) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "mmts_kernels cpp backend: CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "mmts_kernels cpp: x, y must be [H, N, D], [H, M, D]");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), "mmts_kernels cpp: x, y shapes disagree");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(1), "mmts_kernels cpp: targets must be [N]");
}

// y absent (None): y is x, NT-Xent's Z against itself.
bool absent(const std::optional<Tensor>& t) { return !t.has_value() || !t->defined(); }

// NT-Xent's layout — y absent (y is x: one gradient, dZ), self_cols[i] = i, targets an involution without fixed
// points, the same labels for rows and columns if any — with only the lse, and square tiles: S and the excluded set
// are symmetric, so one triangle of tiles serves the rows and (transposed) the columns. Checked in O(N) on the
// values.
bool gram_layout(bool y_is_x, const Tensor& x, const Tensor& self, const Tensor& tgt, const Tensor& lx,
                 const Tensor& ly, const Opts& o) {
  if (!y_is_x || !self.defined() || o.cols || o.hinge || o.hard || o.sig || !o.lse || o.BR != o.BC) return false;
  const int64_t N = x.size(1);
  const int64_t* s = self.const_data_ptr<int64_t>();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    if (s[i] != i || t[i] < 0 || t[i] >= N || t[i] == i || t[t[i]] != i) return false;
  return !lx.defined() || at::equal(lx, ly);
}

// The excluded columns as a contiguous int64 [N] tensor (undefined when absent); with ``decoupled`` and the self
// columns, row statistics only: the column pass has no excluded entries.
Tensor row_exclusions(const std::optional<Tensor>& self_cols, bool decoupled, bool cols, const Tensor& x) {
  const bool has_self = self_cols.has_value() && self_cols->defined();
  TORCH_CHECK(!cols || !(has_self || decoupled), "mmts_kernels cpp: self_cols / decoupled need cols=False");
  if (!has_self) return Tensor();
  TORCH_CHECK(self_cols->dim() == 1 && self_cols->size(0) == x.size(1), "mmts_kernels cpp: self_cols must be [N]");
  return self_cols->to(at::kLong).contiguous();
}

// The labels of the rows and of the columns as contiguous int64 tensors (undefined unless same_label is set).
std::pair<Tensor, Tensor> label_pair(const std::optional<Tensor>& lx, const std::optional<Tensor>& ly,
                                     int64_t same_label, int64_t N, int64_t M) {
  TORCH_CHECK(same_label == kSameNone || same_label == kSameMask || same_label == kSamePositive,
              "mmts_kernels cpp: same_label must be 0 (none), 1 (mask) or 2 (positive)");
  if (same_label == kSameNone) return {Tensor(), Tensor()};
  TORCH_CHECK(!absent(lx) && !absent(ly), "mmts_kernels cpp: same_label needs labels_x and labels_y");
  TORCH_CHECK(lx->dim() == 1 && lx->size(0) == N && ly->dim() == 1 && ly->size(0) == M,
              "mmts_kernels cpp: labels_x must be [N] and labels_y [M]");
  return {lx->to(at::kLong).contiguous(), ly->to(at::kLong).contiguous()};
}

const int64_t* long_ptr(const Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

using StatsTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// sig_q: which of the sigmoid's fused gradient products the forward computes (forward_sig_fused), bits of the op's
// int argument: x (Q·y; when y is x, Q·Z + Qᵀ·Z, all of dZ) and y (Qᵀ·x).
constexpr int64_t kSigQx = 1, kSigQy = 2;

StatsTuple cpu_stats(const Tensor& x, const std::optional<Tensor>& y_opt, const std::optional<Tensor>& tau,
                     const std::optional<Tensor>& margin, const Tensor& targets, bool lse, bool hinge, bool hard,
                     bool ws, bool cols, bool dystress, double tau_min, double tau_max, bool deterministic,
                     int64_t block_rows, int64_t block_cols, const std::optional<Tensor>& self_cols,
                     bool decoupled, bool dys_grad, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& labels_x, const std::optional<Tensor>& labels_y, bool sigmoid,
                     int64_t same_label, bool sig_grad, int64_t sig_q) {
  const bool y_is_x = absent(y_opt);
  const Tensor& y = y_is_x ? x : *y_opt;
  check_inputs(x, y, targets);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen calls are implementation, not graph
  Opts o = make_opts(lse, hinge, hard, ws && lse && !dystress, cols, dystress && lse, tau_min, tau_max,
                     deterministic, block_rows, block_cols);
  const Tensor self = row_exclusions(self_cols, decoupled, cols, x);
  o.has_self = self.defined();
  o.decoupled = decoupled && lse;
  o.dgrad = dys_grad && o.dys;  // the forward is the same; kept for symmetry with the backward
  o.sig = sigmoid;
  o.sig_grad = sigmoid && sig_grad;
  o.same_label = same_label;
  TORCH_CHECK(sig_q >= 0 && sig_q <= (kSigQx | kSigQy) && (sig_q == 0 || (sigmoid && !o.lse && !o.hinge && !o.hard)),
              "mmts_kernels cpp: sig_q (0 to 3) needs the sigmoid statistic alone");
  const bool want_qx = sig_q & kSigQx, want_qy = (sig_q & kSigQy) && !y_is_x;
  o.sig_q = want_qx || want_qy;
  Tensor lx, ly;  // not a structured binding: the dispatch lambda below captures them (C++17)
  std::tie(lx, ly) = label_pair(labels_x, labels_y, same_label, x.size(1), y.size(1));
  o.gram = gram_layout(y_is_x, x, self, targets.to(at::kLong).contiguous(), lx, ly, o);
  TORCH_CHECK(!o.lse || o.dys || !absent(tau), "mmts_kernels cpp: tau is required");
  TORCH_CHECK(!o.hinge || !absent(margin), "mmts_kernels cpp: margin is required");
  TORCH_CHECK(!o.sig || (!absent(tau) && !absent(bias) && !o.dys && !o.cols),
              "mmts_kernels cpp: the sigmoid statistic needs tau and bias, and no dystress or cols");
  TORCH_CHECK(!o.cols || x.size(1) == y.size(1), "mmts_kernels cpp: column statistics need N == M");
  const auto ct = compute_type(x);
  const Tensor X = x.to(ct).contiguous(), Y = y_is_x || x.is_same(y) ? X : y.to(ct).contiguous();  // one copy
  const Tensor tgt = targets.to(at::kLong).contiguous();
  const int64_t H = X.size(0), N = X.size(1);
  const auto fopt = X.options(), iopt = X.options().dtype(at::kLong);
  auto maybe = [&](bool on, const at::TensorOptions& op) { return on ? at::empty({H, N}, op) : at::empty({0}, op); };
  Tensor pos = at::empty({H, N}, fopt);
  Tensor lse_t = maybe(o.lse, fopt), ws_t = maybe(o.ws, fopt), hinge_t = maybe(o.hinge, fopt),
         cnt_t = maybe(o.hinge, iopt), hard_t = maybe(o.hard, fopt), arg_t = maybe(o.hard, iopt);
  Tensor lse_c = maybe(o.lse && o.cols, fopt), ws_c = maybe(o.ws && o.cols, fopt),
         hinge_c = maybe(o.hinge && o.cols, fopt), cnt_c = maybe(o.hinge && o.cols, iopt),
         hard_c = maybe(o.hard && o.cols, fopt), arg_c = maybe(o.hard && o.cols, iopt);
  Tensor sig = maybe(o.sig, fopt), sig_b = maybe(o.sig_grad, fopt), sig_t = maybe(o.sig_grad, fopt);
  Tensor taus = ((o.lse && !o.dys) || o.sig) ? tau->to(ct).expand({H, N}).contiguous() : Tensor();
  Tensor marg = o.hinge ? margin->to(ct).expand({H, N}).contiguous() : Tensor();
  Tensor biases = o.sig ? bias->to(ct).expand({H, N}).contiguous() : Tensor();
  // y is x: Q·Z and Qᵀ·Z go to separate buffers (a round's tasks write disjoint rows of each, not of their union)
  Tensor qx = want_qx ? at::zeros_like(X) : at::empty({0}, fopt);
  Tensor qy = want_qy || (want_qx && y_is_x) ? at::zeros_like(Y) : at::empty({0}, fopt);

  AT_DISPATCH_FLOATING_TYPES(ct, "mmts_cpu_stats", [&] {
    using T = scalar_t;
    auto row = [&](const Tensor& t, int64_t h) -> T* { return t.numel() ? t.data_ptr<T>() + h * N : nullptr; };
    auto irow = [&](const Tensor& t, int64_t h) -> int64_t* {
      return t.numel() ? t.data_ptr<int64_t>() + h * N : nullptr;
    };
    for (int64_t h = 0; h < H; ++h) {
      auto crow = [&](const Tensor& t) -> const T* { return t.defined() ? t.const_data_ptr<T>() + h * N : nullptr; };
      forward_head<T>(X[h], Y[h], crow(taus), crow(marg), crow(biases), tgt.const_data_ptr<int64_t>(),
                      long_ptr(self), long_ptr(lx), long_ptr(ly), o, row(pos, h), row(lse_t, h),
                      row(ws_t, h), row(hinge_t, h), irow(cnt_t, h), row(hard_t, h), irow(arg_t, h), row(lse_c, h),
                      row(ws_c, h), row(hinge_c, h), irow(cnt_c, h), row(hard_c, h), irow(arg_c, h), row(sig, h),
                      row(sig_b, h), row(sig_t, h), qx.numel() ? qx[h] : Tensor(), qy.numel() ? qy[h] : Tensor());
    }
  });
  if (y_is_x && qy.numel()) {
    qx.add_(qy);
    qy = at::empty({0}, fopt);
  }
  return {pos, lse_t, hinge_t, cnt_t, hard_t, arg_t, ws_t, lse_c, hinge_c, cnt_c, hard_c, arg_c, ws_c, sig, sig_b,
          sig_t, qx, qy};
}

// Upstream gradients arrive as undefined or empty tensors for statistics that were not used.
bool present(const std::optional<Tensor>& g) { return g.has_value() && g->defined() && g->numel() > 0; }

// (dx, dy); y absent (y is x): (dZ, an empty tensor), dZ = dx + dy.
std::tuple<Tensor, Tensor> cpu_stats_backward(
    const Tensor& x, const std::optional<Tensor>& y_opt, const std::optional<Tensor>& tau,
    const std::optional<Tensor>& margin, const Tensor& targets, const Tensor& pos, const Tensor& lse,
    const Tensor& lse_c, const Tensor& cnt, const Tensor& cnt_c, const Tensor& arg, const Tensor& arg_c,
    const std::optional<Tensor>& g_pos, const std::optional<Tensor>& g_lse, const std::optional<Tensor>& g_hinge,
    const std::optional<Tensor>& g_hard, const std::optional<Tensor>& g_lse_c, const std::optional<Tensor>& g_hinge_c,
    const std::optional<Tensor>& g_hard_c, bool cols, bool dystress, double tau_min, double tau_max,
    bool deterministic, int64_t block_rows, int64_t block_cols, const std::optional<Tensor>& self_cols,
    bool decoupled, bool dys_grad, const std::optional<Tensor>& g_sig, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& labels_x, const std::optional<Tensor>& labels_y, int64_t same_label,
    const std::optional<Tensor>& qx, const std::optional<Tensor>& qy) {
  const bool y_is_x = absent(y_opt);
  const Tensor& y = y_is_x ? x : *y_opt;
  check_inputs(x, y, targets);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen calls are implementation, not graph
  const bool lse_on = present(g_lse) || (cols && present(g_lse_c));
  const bool hinge_on = present(g_hinge) || (cols && present(g_hinge_c));
  Opts o = make_opts(lse_on, hinge_on, false, false, cols, dystress, tau_min, tau_max, deterministic,
                     block_rows, block_cols);
  const Tensor self = row_exclusions(self_cols, decoupled, cols, x);
  o.has_self = self.defined();
  o.decoupled = decoupled && lse_on;
  o.dgrad = dys_grad && dystress;
  o.sig = present(g_sig);
  o.same_label = same_label;
  Tensor lx, ly;  // not a structured binding: the dispatch lambda below captures them (C++17)
  std::tie(lx, ly) = label_pair(labels_x, labels_y, same_label, x.size(1), y.size(1));
  TORCH_CHECK(!o.sig || (!absent(tau) && !absent(bias)), "mmts_kernels cpp: the sigmoid needs tau and bias");
  // The Gram backward's schedule depends on the thread count: not under deterministic=True (bitwise for any).
  o.gram = !deterministic && gram_layout(y_is_x, x, self, targets.to(at::kLong).contiguous(), lx, ly, o);
  const auto ct = compute_type(x);
  const Tensor X = x.to(ct).contiguous(), Y = y_is_x || x.is_same(y) ? X : y.to(ct).contiguous();  // one copy
  const Tensor tgt = targets.to(at::kLong).contiguous();
  const int64_t H = X.size(0), N = X.size(1), D = X.size(2);
  auto hn = [&](const std::optional<Tensor>& g) {  // an [H, N] compute-type contiguous gradient, zeros if absent
    return present(g) ? g->to(ct).expand({H, N}).contiguous() : at::zeros({H, N}, X.options());
  };
  // The fused sigmoid (forward_sig_fused): qx / qy hold the forward's Q·y and Qᵀ·x and become dx and dy. A head whose
  // upstream g^sig is one value g_0 on every row (exactly) takes dx = g_0 Q·y, dy = g_0 Qᵀ·x, scaled in place: no
  // tile, no new N×D buffer. Any other head is zeroed and goes through the tiles like the unfused case.
  const bool fused = present(qx) || present(qy);
  for (const auto* q : {&qx, &qy})
    if (present(*q))
      TORCH_CHECK((*q)->sizes() == (q == &qx ? X : Y).sizes() && (*q)->scalar_type() == ct && (*q)->is_contiguous(),
                  "mmts_kernels cpp: qx / qy must be the forward's contiguous [H, N, D] / [H, M, D] products");
  const Tensor graw = o.sig ? hn(g_sig) : Tensor();
  std::vector<char> fast(H, 0);
  if (fused && !o.lse && !o.hinge)
    for (int64_t h = 0; h < H; ++h) fast[h] = !o.sig || graw[h].eq(graw[h][0]).all().item<bool>();
  const bool all_fast = std::all_of(fast.begin(), fast.end(), [](char f) { return f != 0; });
  Tensor dX = present(qx) ? *qx : at::zeros_like(X);
  Tensor dY;  // Gram mode: all of dZ in dX; y is x and every head fast: no dy to add
  if (present(qy)) dY = *qy;
  else if (!o.gram && !(y_is_x && all_fast)) dY = at::zeros_like(Y);
  Tensor gpos = hn(g_pos).clone();
  Tensor grow, gcol, taus, gh, ghc, marg, gsig, biases;
  if (o.lse || o.sig) {
    TORCH_CHECK(o.dys || !absent(tau), "mmts_kernels cpp: tau is required");
    taus = o.dys ? at::ones({H, N}, X.options()) : tau->to(ct).expand({H, N}).contiguous();  // DySTreSS: unused
  }
  if (o.sig) {
    gsig = hn(g_sig) / taus;  // ∂sig_i/∂S_ij = −z σ(v)/τ_i: 1/τ_i folded in
    biases = bias->to(ct).expand({H, N}).contiguous();
  }
  if (o.lse) {
    grow = hn(g_lse);
    gcol = hn(g_lse_c);
    if (!o.dys) {
      grow = grow / taus;  // fold 1/τ_i (rows) and 1/τ_j (columns) into the upstream gradients
      gcol = gcol / taus;
    }
  }
  if (o.hinge) {
    TORCH_CHECK(margin.has_value() && margin->defined(), "mmts_kernels cpp: margin is required");
    gh = hn(g_hinge);
    ghc = hn(g_hinge_c);
    marg = margin->to(ct).expand({H, N}).contiguous();
    // ∂hinge_i/∂pos_i = −cnt_i; column j: ∂hinge^c_j/∂pos_j = −cnt^c_j (pos_j = S_jj)
    gpos.sub_(gh * cnt.to(ct));
    if (cols && present(g_hinge_c)) gpos.sub_(ghc * cnt_c.to(ct));
  }
  const Tensor ghard = present(g_hard) ? hn(g_hard) : Tensor();
  const Tensor ghard_c = (cols && present(g_hard_c)) ? hn(g_hard_c) : Tensor();
  const Tensor posc = pos.to(ct).contiguous(), lsec = o.lse ? lse.to(ct).contiguous() : Tensor();
  const Tensor lsecc = (o.lse && cols) ? lse_c.to(ct).contiguous() : Tensor();
  const Tensor argl = ghard.defined() ? arg.contiguous() : Tensor();
  const Tensor argcl = ghard_c.defined() ? arg_c.contiguous() : Tensor();

  AT_DISPATCH_FLOATING_TYPES(ct, "mmts_cpu_stats_backward", [&] {
    using T = scalar_t;
    auto at_h = [&](const Tensor& t, int64_t h) -> const T* {
      return t.defined() ? t.const_data_ptr<T>() + h * N : nullptr;
    };
    for (int64_t h = 0; h < H; ++h) {
      Tensor Xh = X[h], Yh = Y[h], dXh = dX[h], dYh = dY.defined() ? dY[h] : dXh;
      if (fast[h]) {
        for (const auto* q : {&qx, &qy}) {
          if (!present(*q)) continue;
          Tensor d = q == &qx ? dXh : dYh;
          if (o.sig) d.mul_(graw[h][0].item<T>());
          else d.zero_();  // no gradient through sig (NaN-free, unlike 0·Q)
        }
      } else if (fused) {
        if (present(qx)) dXh.zero_();
        if (present(qy)) dYh.zero_();
      }
      if (!fast[h] && (o.lse || o.hinge || o.sig)) {
        BwdHead<T> bh;
        bh.lse_on = o.lse;
        bh.hinge_on = o.hinge;
        bh.sig_on = o.sig;
        bh.gsig = at_h(gsig, h);
        bh.bias = at_h(biases, h);
        bh.lx = long_ptr(lx);
        bh.ly = long_ptr(ly);
        bh.grow = at_h(grow, h);
        bh.gcol = at_h(gcol, h);
        bh.tau = at_h(taus, h);
        bh.lse = at_h(lsec, h);
        bh.lse_c = lsecc.defined() ? at_h(lsecc, h) : bh.lse;
        bh.marg = at_h(marg, h);
        bh.pos = at_h(posc, h);
        bh.gh = at_h(gh, h);
        bh.ghc = at_h(ghc, h);
        bh.tgt = tgt.const_data_ptr<int64_t>();
        bh.self = self.defined() ? self.const_data_ptr<int64_t>() : nullptr;
        bh.gpos = at_h(gpos, h);
        if (o.gram) {  // row j's terms of the transposed tiles: its own row gradient and lse
          bh.gcol = bh.grow;
          bh.lse_c = bh.lse;
          backward_gram<T>(Xh, bh, o, dXh);
        } else {
          backward_tiles<T>(Xh, Yh, bh, o, dXh, dYh);
        }
      }
      const T* xp = Xh.const_data_ptr<T>();
      const T* yp = Yh.const_data_ptr<T>();
      T* dxp = dXh.data_ptr<T>();
      T* dyp = dYh.data_ptr<T>();
      if (fast[h] || !(o.lse || o.hinge || o.sig))  // otherwise folded into the tiles (dS_tile)
        add_gathered<T>(xp, yp, dxp, dyp, N, D, at_h(gpos, h), tgt.const_data_ptr<int64_t>());
      if (ghard.defined())
        add_gathered<T>(xp, yp, dxp, dyp, N, D, at_h(ghard, h), argl.const_data_ptr<int64_t>() + h * N);
      if (ghard_c.defined())  // hard^c_j = S_{arg_j, j}: the roles of x and y swap
        add_gathered<T>(yp, xp, dyp, dxp, N, D, at_h(ghard_c, h), argcl.const_data_ptr<int64_t>() + h * N);
    }
  });
  const Tensor none = at::empty({0}, x.options());  // the gradient went into qx / qy
  if (!y_is_x) return {present(qx) ? none : dX.to(x.scalar_type()), present(qy) ? none : dY.to(y.scalar_type())};
  if (dY.defined()) dX.add_(dY);
  return {present(qx) ? none : dX.to(x.scalar_type()), none};
}

}  // namespace

TORCH_LIBRARY(mmts_kernels, m) {
  m.def(
      "cpu_stats(Tensor x, Tensor? y, Tensor? tau, Tensor? margin, Tensor targets, bool lse, bool hinge, "
      "bool hard, bool ws, bool cols, bool dystress, float tau_min, float tau_max, bool deterministic, "
      "int block_rows, int block_cols, Tensor? self_cols=None, bool decoupled=False, bool dys_grad=False, "
      "Tensor? bias=None, Tensor? labels_x=None, Tensor? labels_y=None, bool sigmoid=False, int same_label=0, "
      "bool sig_grad=False, int sig_q=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_stats_backward(Tensor x, Tensor? y, Tensor? tau, Tensor? margin, Tensor targets, Tensor pos, "
      "Tensor lse, Tensor lse_c, Tensor cnt, Tensor cnt_c, Tensor arg, Tensor arg_c, Tensor? g_pos, "
      "Tensor? g_lse, Tensor? g_hinge, Tensor? g_hard, Tensor? g_lse_c, Tensor? g_hinge_c, Tensor? g_hard_c, "
      "bool cols, bool dystress, float tau_min, float tau_max, bool deterministic, int block_rows, "
      "int block_cols, Tensor? self_cols=None, bool decoupled=False, bool dys_grad=False, Tensor? g_sig=None, "
      "Tensor? bias=None, Tensor? labels_x=None, Tensor? labels_y=None, int same_label=0, Tensor(a!)? qx=None, "
      "Tensor(b!)? qy=None) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);  // no tensor argument: one kernel for every dispatch key
}

TORCH_LIBRARY_IMPL(mmts_kernels, CPU, m) {
  m.impl("cpu_stats", &cpu_stats);
  m.impl("cpu_stats_backward", &cpu_stats_backward);
}

}  // namespace mmts_cpu
