// The `cpp` backend of mmts_kernels: the statistics of S = x yᵀ (DESIGN §3) and their backward on the CPU,
// tiled, multi-threaded and fused, without ever holding S (or anything O(N·M)) in memory.
//
// Registered as two operators (TORCH_LIBRARY, so torch.compile sees real ops; mmts_kernels/cpp_backend adds the
// fake kernels and the autograd formula):
//   mmts_kernels::cpu_stats           forward statistics, 13 tensors in the order of mmts_kernels.stats.Stats
//   mmts_kernels::cpu_stats_backward  (dx, dy) from the upstream gradients of the statistics
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
//   - backward, default with up to 8 threads: one task per thread, each with its own dy buffer (O(threads·M·D)),
//     summed in task order: four GEMMs per tile pair in total, deterministic for a given thread count. With more
//     threads the two-pass schedule below (no per-thread buffer) is used.
//   - backward, deterministic=True: dx in a pass parallel over row blocks, dy in a second pass parallel over
//     column blocks (S is recomputed once more), each block's sum in a fixed order: bitwise identical for any
//     thread count, no O(threads·M·D) buffer.
//   - NT-Xent (row direction, cols=False): ``self_cols`` gives each row a column to leave out of every statistic
//     (the anchor itself), ``decoupled`` leaves its positive out of the lse (DCL), ``dys_grad`` lets DySTreSS's
//     gradient flow through τ(S); all three are template switches of the tile kernels, masked inside the tiles.
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
  bool mask() const { return has_self || decoupled; }
};

// A contiguous [br, bc] view of a flat per-thread buffer (at::mm_out writes into it without copies).
Tensor tile_view(const Tensor& buf, int64_t br, int64_t bc) { return buf.narrow(0, 0, br * bc).view({br, bc}); }

template <typename T>
void forward_head(const Tensor& X, const Tensor& Y, const T* tau, const T* marg, const int64_t* tgt,
                  const int64_t* self, const Opts& o,
                  T* pos, T* lse, T* ws, T* hinge, int64_t* cnt, T* hard, int64_t* arg,
                  T* lse_c, T* ws_c, T* hinge_c, int64_t* cnt_c, T* hard_c, int64_t* arg_c) {
  const int64_t N = X.size(0), M = Y.size(0), D = X.size(1);
  const T* xp = X.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T tmin = T(o.tau_min), half = T(0.5 * (o.tau_max - o.tau_min));

  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {  // pos_i = x_i · y_{t_i}
    for (int64_t i = b; i < e; ++i) {
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
            const int64_t* ex2 = o.decoupled ? tgt : nullptr;
#define MMTS_FWD_LSE(C, DY, W, MK)                                                                              \
  KCALL(T, fwd_lse, (T, C, DY, W, MK), S, bc, br, bc, r0, c0, rmaxp, rsump, ws, tau, cm, cs, cw, tile_cmax.data(), \
        Z, tmin, half, self, ex2)
            if (tile_cols && o.mask()) {  // Gram mode only: a symmetric mask
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
          if (o.hinge) {
            if (o.cols) KCALL(T, fwd_hinge, (T, true), S, bc, br, bc, r0, c0, tgt, marg, pos, hinge, cnt, ch, cc, self);
            else KCALL(T, fwd_hinge, (T, false), S, bc, br, bc, r0, c0, tgt, marg, pos, hinge, cnt, ch, cc, self);
          }
          if (o.hard) {
            if (o.cols) KCALL(T, fwd_hard, (T, true), S, bc, br, bc, r0, c0, tgt, hard, arg, chdp, ca, self);
            else KCALL(T, fwd_hard, (T, false), S, bc, br, bc, r0, c0, tgt, hard, arg, chdp, ca, self);
          }
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
  const int64_t* tgt = nullptr;
  const int64_t* self = nullptr;  // excluded column of each row (nullptr: none)
  bool lse_on = false, hinge_on = false;
};

// ``gram_cols``: an off-diagonal tile of the Gram mode, whose column terms are row j's (h.gcol = h.grow, h.lse_c =
// h.lse), so dS here is E = dS_ij + dS_ji, with row j's positive gradient at (t_j, j).
template <typename T>
void dS_tile(const T* S, int64_t br, int64_t bc, int64_t r0, int64_t c0, T* dS, const BwdHead<T>& h, const Opts& o,
             bool gram_cols = false) {
  const T tmin = T(o.tau_min), half = T(0.5 * (o.tau_max - o.tau_min));
  bool acc = false;
  if (h.lse_on) {
    const int64_t* ex2 = o.decoupled ? h.tgt : nullptr;
#define MMTS_BWD_LSE(C, DY, MK, DG)                                                                    \
  KCALL(T, bwd_lse, (T, C, DY, false, MK, DG), S, bc, br, bc, r0, c0, dS, h.grow, h.lse, h.tau, h.gcol, \
        h.lse_c, tmin, half, h.self, ex2)
    if (gram_cols && o.mask()) {  // a symmetric mask
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
  if (h.hinge_on) {
#define MMTS_BWD_HINGE(C, A) \
  KCALL(T, bwd_hinge, (T, C, A), S, bc, br, bc, r0, c0, dS, h.tgt, h.marg, h.pos, h.gh, h.ghc, h.self)
    if (o.cols) {
      if (acc) MMTS_BWD_HINGE(true, true);
      else MMTS_BWD_HINGE(true, false);
    } else {
      if (acc) MMTS_BWD_HINGE(false, true);
      else MMTS_BWD_HINGE(false, false);
    }
#undef MMTS_BWD_HINGE
  }
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

  // Per-thread dy buffers cost O(threads·M·D): past kMaxDyBuffers threads (big hosts) the two-pass schedule, one
  // more recompute of S and no buffer, keeps the extra memory O((N+M)·D) however many cores there are.
  constexpr int64_t kMaxDyBuffers = 8;
  if (o.deterministic || at::get_num_threads() > kMaxDyBuffers) {
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
  // One pass: task k owns a contiguous range of row blocks and accumulates dy into its own buffer.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nrb));
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
// half the tiles and GEMMs of the full sweep. Task k owns a contiguous range of row blocks of about equal triangle
// area and writes their dZ rows into dX; its transposed products go to a buffer of its own: dX for task 0 (they all
// land on its own rows), dY for task 1 (the caller's x and y are one tensor, so autograd adds dx + dy), a fresh
// one from task 2 on, summed into dY in task order: deterministic for a given thread count, as backward_tiles.
template <typename T>
void backward_gram(const Tensor& X, const BwdHead<T>& h, const Opts& o, Tensor& dX, Tensor& dY) {
  const int64_t N = X.size(0), nb = cdiv(N, o.BR);
  const auto opt = X.options();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb));
  auto begin = [&](int64_t k) -> int64_t {
    if (k >= tasks) return nb;
    return std::min<int64_t>(nb, std::llround(double(nb) * std::sqrt(double(k) / double(tasks))));
  };
  std::vector<Tensor> parts(tasks);
  for (int64_t k = 0; k < tasks; ++k) parts[k] = k == 0 ? dX : k == 1 ? dY : at::zeros_like(dX);
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    Tensor sbuf = at::empty({o.BR * o.BC}, opt), dbuf = at::empty({o.BR * o.BC}, opt);
    for (int64_t k = b; k < e; ++k) {
      for (int64_t rb = begin(k); rb < begin(k + 1); ++rb) {
        const int64_t r0 = rb * o.BR, br = std::min(o.BR, N - r0);
        const Tensor zr = X.narrow(0, r0, br);
        Tensor dzr = dX.narrow(0, r0, br);
        for (int64_t cb = 0; cb <= rb; ++cb) {
          const int64_t c0 = cb * o.BC, bc = std::min(o.BC, N - c0);
          const Tensor zc = X.narrow(0, c0, bc);
          Tensor St = tile_view(sbuf, br, bc), E = tile_view(dbuf, br, bc);
          at::mm_out(St, zr, zc.t());
          dS_tile<T>(St.const_data_ptr<T>(), br, bc, r0, c0, E.data_ptr<T>(), h, o, cb < rb);
          dzr.addmm_(E, zc);
          if (cb < rb) parts[k].narrow(0, c0, bc).addmm_(E.t(), zr);
          else dzr.addmm_(E.t(), zr);  // the diagonal tile holds both triangles: dSᵀ lands on its own rows
        }
      }
    }
  });
  for (int64_t k = 2; k < tasks; ++k) dY.add_(parts[k]);  // fixed order
}

// dx_i += g_i · y_{c_i}, dy_{c_i} += g_i · x_i for one gathered element per row (serial: duplicates in c).
template <typename T>
void add_gathered(const T* xp, const T* yp, T* dx, T* dy, int64_t N, int64_t D, const T* g, const int64_t* c) {
  for (int64_t i = 0; i < N; ++i) {
    const T gi = g[i];
    if (gi == T(0)) continue;
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

// NT-Xent's layout — x and y the same tensor, self_cols[i] = i, targets an involution without fixed points — with
// only the lse, and square tiles: S and the excluded set are symmetric, so one triangle of tiles serves the rows
// and (transposed) the columns. Checked in O(N) on the values.
bool gram_layout(const Tensor& x, const Tensor& y, const Tensor& self, const Tensor& tgt, const Opts& o) {
  if (!self.defined() || o.cols || o.hinge || o.hard || !o.lse || o.BR != o.BC) return false;
  if (x.data_ptr() != y.data_ptr() || x.sizes() != y.sizes() || x.strides() != y.strides() ||
      x.scalar_type() != y.scalar_type())
    return false;
  const int64_t N = x.size(1);
  const int64_t* s = self.const_data_ptr<int64_t>();
  const int64_t* t = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    if (s[i] != i || t[i] < 0 || t[i] >= N || t[i] == i || t[t[i]] != i) return false;
  return true;
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

using StatsTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor, Tensor>;

StatsTuple cpu_stats(const Tensor& x, const Tensor& y, const std::optional<Tensor>& tau,
                     const std::optional<Tensor>& margin, const Tensor& targets, bool lse, bool hinge, bool hard,
                     bool ws, bool cols, bool dystress, double tau_min, double tau_max, bool deterministic,
                     int64_t block_rows, int64_t block_cols, const std::optional<Tensor>& self_cols,
                     bool decoupled, bool dys_grad) {
  check_inputs(x, y, targets);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inner ATen calls are implementation, not graph
  Opts o = make_opts(lse, hinge, hard, ws && lse && !dystress, cols, dystress && lse, tau_min, tau_max,
                     deterministic, block_rows, block_cols);
  const Tensor self = row_exclusions(self_cols, decoupled, cols, x);
  o.has_self = self.defined();
  o.decoupled = decoupled && lse;
  o.dgrad = dys_grad && o.dys;  // the forward is the same; kept for symmetry with the backward
  o.gram = gram_layout(x, y, self, targets.to(at::kLong).contiguous(), o);
  TORCH_CHECK(!o.lse || o.dys || (tau.has_value() && tau->defined()), "mmts_kernels cpp: tau is required");
  TORCH_CHECK(!o.hinge || (margin.has_value() && margin->defined()), "mmts_kernels cpp: margin is required");
  TORCH_CHECK(!o.cols || x.size(1) == y.size(1), "mmts_kernels cpp: column statistics need N == M");
  const auto ct = compute_type(x);
  const Tensor X = x.to(ct).contiguous(), Y = x.is_same(y) ? X : y.to(ct).contiguous();  // one copy when x is y
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
  Tensor taus = (o.lse && !o.dys) ? tau->to(ct).expand({H, N}).contiguous() : Tensor();
  Tensor marg = o.hinge ? margin->to(ct).expand({H, N}).contiguous() : Tensor();

  AT_DISPATCH_FLOATING_TYPES(ct, "mmts_cpu_stats", [&] {
    using T = scalar_t;
    auto row = [&](const Tensor& t, int64_t h) -> T* { return t.numel() ? t.data_ptr<T>() + h * N : nullptr; };
    auto irow = [&](const Tensor& t, int64_t h) -> int64_t* {
      return t.numel() ? t.data_ptr<int64_t>() + h * N : nullptr;
    };
    for (int64_t h = 0; h < H; ++h) {
      forward_head<T>(X[h], Y[h], taus.defined() ? taus.const_data_ptr<T>() + h * N : nullptr,
                      marg.defined() ? marg.const_data_ptr<T>() + h * N : nullptr, tgt.const_data_ptr<int64_t>(),
                      self.defined() ? self.const_data_ptr<int64_t>() : nullptr, o, row(pos, h), row(lse_t, h),
                      row(ws_t, h), row(hinge_t, h), irow(cnt_t, h), row(hard_t, h), irow(arg_t, h), row(lse_c, h),
                      row(ws_c, h), row(hinge_c, h), irow(cnt_c, h), row(hard_c, h), irow(arg_c, h));
    }
  });
  return {pos, lse_t, hinge_t, cnt_t, hard_t, arg_t, ws_t, lse_c, hinge_c, cnt_c, hard_c, arg_c, ws_c};
}

// Upstream gradients arrive as undefined or empty tensors for statistics that were not used.
bool present(const std::optional<Tensor>& g) { return g.has_value() && g->defined() && g->numel() > 0; }

std::tuple<Tensor, Tensor> cpu_stats_backward(
    const Tensor& x, const Tensor& y, const std::optional<Tensor>& tau, const std::optional<Tensor>& margin,
    const Tensor& targets, const Tensor& pos, const Tensor& lse, const Tensor& lse_c, const Tensor& cnt,
    const Tensor& cnt_c, const Tensor& arg, const Tensor& arg_c, const std::optional<Tensor>& g_pos,
    const std::optional<Tensor>& g_lse, const std::optional<Tensor>& g_hinge, const std::optional<Tensor>& g_hard,
    const std::optional<Tensor>& g_lse_c, const std::optional<Tensor>& g_hinge_c,
    const std::optional<Tensor>& g_hard_c, bool cols, bool dystress, double tau_min, double tau_max,
    bool deterministic, int64_t block_rows, int64_t block_cols, const std::optional<Tensor>& self_cols,
    bool decoupled, bool dys_grad) {
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
  // The Gram backward uses the default schedule's per-task buffers: not under deterministic=True (bitwise for any
  // thread count) nor past 8 threads, where backward_tiles' two-pass schedule runs instead.
  o.gram = !deterministic && at::get_num_threads() <= 8 &&
           gram_layout(x, y, self, targets.to(at::kLong).contiguous(), o);
  const auto ct = compute_type(x);
  const Tensor X = x.to(ct).contiguous(), Y = x.is_same(y) ? X : y.to(ct).contiguous();  // one copy when x is y
  const Tensor tgt = targets.to(at::kLong).contiguous();
  const int64_t H = X.size(0), N = X.size(1), D = X.size(2);
  Tensor dX = at::zeros_like(X), dY = at::zeros_like(Y);
  auto hn = [&](const std::optional<Tensor>& g) {  // an [H, N] compute-type contiguous gradient, zeros if absent
    return present(g) ? g->to(ct).expand({H, N}).contiguous() : at::zeros({H, N}, X.options());
  };
  Tensor gpos = hn(g_pos).clone();
  Tensor grow, gcol, taus, gh, ghc, marg;
  if (o.lse) {
    grow = hn(g_lse);
    gcol = hn(g_lse_c);
    if (!o.dys) {
      TORCH_CHECK(tau.has_value() && tau->defined(), "mmts_kernels cpp: tau is required");
      taus = tau->to(ct).expand({H, N}).contiguous();
      grow = grow / taus;  // fold 1/τ_i (rows) and 1/τ_j (columns) into the upstream gradients
      gcol = gcol / taus;
    } else {
      taus = at::ones({H, N}, X.options());  // unused by the DySTreSS kernels
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
      Tensor Xh = X[h], Yh = Y[h], dXh = dX[h], dYh = dY[h];
      if (o.lse || o.hinge) {
        BwdHead<T> bh;
        bh.lse_on = o.lse;
        bh.hinge_on = o.hinge;
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
          backward_gram<T>(Xh, bh, o, dXh, dYh);
        } else {
          backward_tiles<T>(Xh, Yh, bh, o, dXh, dYh);
        }
      }
      const T* xp = Xh.const_data_ptr<T>();
      const T* yp = Yh.const_data_ptr<T>();
      T* dxp = dXh.data_ptr<T>();
      T* dyp = dYh.data_ptr<T>();
      if (!(o.lse || o.hinge))  // otherwise folded into the tiles (dS_tile)
        add_gathered<T>(xp, yp, dxp, dyp, N, D, at_h(gpos, h), tgt.const_data_ptr<int64_t>());
      if (ghard.defined())
        add_gathered<T>(xp, yp, dxp, dyp, N, D, at_h(ghard, h), argl.const_data_ptr<int64_t>() + h * N);
      if (ghard_c.defined())  // hard^c_j = S_{arg_j, j}: the roles of x and y swap
        add_gathered<T>(yp, xp, dyp, dxp, N, D, at_h(ghard_c, h), argcl.const_data_ptr<int64_t>() + h * N);
    }
  });
  return {dX.to(x.scalar_type()), dY.to(y.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(mmts_kernels, m) {
  m.def(
      "cpu_stats(Tensor x, Tensor y, Tensor? tau, Tensor? margin, Tensor targets, bool lse, bool hinge, "
      "bool hard, bool ws, bool cols, bool dystress, float tau_min, float tau_max, bool deterministic, "
      "int block_rows, int block_cols, Tensor? self_cols=None, bool decoupled=False, bool dys_grad=False) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_stats_backward(Tensor x, Tensor y, Tensor? tau, Tensor? margin, Tensor targets, Tensor pos, "
      "Tensor lse, Tensor lse_c, Tensor cnt, Tensor cnt_c, Tensor arg, Tensor arg_c, Tensor? g_pos, "
      "Tensor? g_lse, Tensor? g_hinge, Tensor? g_hard, Tensor? g_lse_c, Tensor? g_hinge_c, Tensor? g_hard_c, "
      "bool cols, bool dystress, float tau_min, float tau_max, bool deterministic, int block_rows, "
      "int block_cols, Tensor? self_cols=None, bool decoupled=False, bool dys_grad=False) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);  // no tensor argument: one kernel for every dispatch key
}

TORCH_LIBRARY_IMPL(mmts_kernels, CPU, m) {
  m.impl("cpu_stats", &cpu_stats);
  m.impl("cpu_stats_backward", &cpu_stats_backward);
}

}  // namespace mmts_cpu
