// Elementwise work on one tile of S = x yᵀ: the fused part of the CPU backend (mmts_cpu.cpp does the GEMMs,
// the threading and the merges). Included twice by mmts_cpu.cpp: once with the compiler's baseline target and
// once under `#pragma GCC target("avx2,fma")`, each time inside its own namespace MMTS_KNS, and picked at run
// time from what the CPU supports. The loops are plain C++ with `#pragma omp simd` (-fopenmp-simd semantics:
// vectorized reductions without -ffast-math), so any C++17 compiler builds them.
//
// A tile is S[i * ld + j] for local rows i < br (global row r0 + i) and local columns j < bc (global c0 + j).
// Row arrays are indexed by the global row, column arrays by the global column.
//
// Forward, per tile (online log-sum-exp with a running max, rows and, when COLS, columns in the same sweep):
//   z_ij = S_ij / τ_ij           τ_ij = τ_i (rows) / τ_j (columns), or dystress(S_ij) for both
//   pass A: m_i ← max(m_i, max_j z_ij), sums rescaled by exp(m_old − m_new)      (columns alike)
//   pass B: l_i += Σ_j exp(z_ij − m_i),  w_i += Σ_j exp(z_ij − m_i) S_ij          (columns alike)
//   hinge:  h_i += Σ_{j≠t_i} relu(m_i + S_ij − pos_i), cnt_i += #active            (columns: m_j, pos_j, i≠j)
//   hard:   running max over j≠t_i with the lowest column on ties                   (columns: lowest row)
// Backward, per tile, into a separate buffer dS (ACC: add to what is there):
//   dS_ij = g_i/τ_ij · exp(z_ij − lse_i) + g^c_j/τ_ij · exp(z^c_ij − lse^c_j)
//         + g^h_i · 1[m_i + S_ij − pos_i > 0, j≠t_i] + g^hc_j · 1[m_j + S_ij − pos_j > 0, i≠j]
// (without DySTreSS the caller folds 1/τ_i into g_i and 1/τ_j into g^c_j). z is S_ij / τ, a true division like the
// reference's (a reciprocal multiply adds an ulp of z, 1e-5 relative in p_ij once |z| ~ 100).
// DySTreSS with the gradient through τ(S) (DGRAD, detach=False): ∂(S/τ(S))/∂S = (τ − S·τ'(S))/τ² replaces 1/τ_ij.
//
// Sigmoid (SigLIP), rows only: u_ij = S_ij/τ_i + b_i, v_ij = −z_ij u_ij (z = +1 on the positives, −1 elsewhere)
//   forward:  sig_i += Σ_j softplus(v_ij);  with GRADS also sb_i += Σ_j z_ij σ(v_ij), st_i += Σ_j z_ij σ(v_ij) S_ij
//             (∂sig_i/∂b_i = −sb_i, ∂sig_i/∂τ_i = st_i/τ_i², applied outside)
//   backward: dS_ij += g_i · (−z_ij σ(v_ij)), the caller folding 1/τ_i into g_i
//   fused (fwd_sig with WRITE_Q): the forward's sums and, in place of S, Q_ij = ∂sig_i/∂S_ij = −z_ij σ(v_ij)/τ_i,
//             which the caller turns into Q·y and Qᵀ·x: the gradient of Σ_i g sig_i for any upstream g uniform over
//             the rows
//   softplus(v) = max(v, 0) + log1p(e^{−|v|}), σ(v) = (v ≥ 0 ? 1 : e^{−|v|}) / (1 + e^{−|v|}): one exp for both.
//
// Excluded entries (MASK): a byte per tile entry, X[i * bc + j], built by the caller (mmts_cpu.cpp, mask_tile):
//   kOut     out of every statistic of row i and of column j (self_cols[i]; under same_label="mask" every
//            same-label column other than t_i — that set is the same matrix seen from row i and from column j)
//   kOutLse  out of row i's lse only (decoupled: the positive t_i)
//   kPos     z_ij = +1 in the sigmoid (t_i; under same_label="positive" every same-label column too)
// Excluded entries get no probability mass, no hinge, no hardest negative, no softplus, and dS_ij = 0. kOutLse lies
// only in row-only sweeps or in the Gram mode (x = y, self_i = i, t an involution), where the excluded set is
// symmetric: there the same mask serves the column direction, which is row j's view of the transposed tile.

namespace mmts_cpu {
namespace MMTS_KNS {

constexpr uint8_t kOut = 1, kOutLse = 2, kPos = 4;  // the bits of a tile mask (see above)

// Built with -ffp-contract=off: z = S/τ must round the same way in every pass (forward max, forward sum,
// backward), or exp(z − lse) drifts by an ulp of z (1e-4 relative at τ = 1e-3). MMTS_FMA (a·b + c, fused where
// the target has FMA) is used only inside the exp polynomial.
// exp for the hot loops: float uses a branch-free Cody–Waite reduction and a degree-6 polynomial (≈2 ulp),
// which the compiler vectorizes; double (the precision path) uses std::exp.
inline float fexp(float x) {
  x = x < -87.0f ? -87.0f : x;  // NaN passes both comparisons unchanged and propagates
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5·2²³: adding it rounds to the nearest integer
  float k = (x * 1.44269504088896341f + shifter) - shifter;
  float r = MMTS_FMA(k, -0.693359375f, x);
  r = MMTS_FMA(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = MMTS_FMA(p, r, 1.3981999507e-3f);
  p = MMTS_FMA(p, r, 8.3334519073e-3f);
  p = MMTS_FMA(p, r, 4.1665795894e-2f);
  p = MMTS_FMA(p, r, 1.6666665459e-1f);
  p = MMTS_FMA(p, r, 5.0000001201e-1f);
  p = MMTS_FMA(p * r, r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fexp(double x) { return std::exp(x); }

template <typename T>
inline T dystress_tau(T s, T tau_min, T half_range) {
  return tau_min + half_range * (T(1) + std::cos(T(3.14159265358979323846) * (T(1) + s)));
}

// (τ − s·τ'(s))/τ² with τ'(s) = −half_range·π·sin(π(1 + s)): the slope of s/τ(s) when τ is not detached.
template <typename T>
inline T dystress_slope(T s, T t, T half_range) {
  const T pi = T(3.14159265358979323846);
  return (t + s * half_range * pi * std::sin(pi * (T(1) + s))) / (t * t);
}

template <typename T>
inline T vmax(T a, T b) { return b > a ? b : a; }

// log1p(e) for e ∈ [0, 1]: float by log(1 + e) = 2 atanh(s) = 2(s + s³/3 + s⁵/5 + …), s = e/(2 + e) ≤ 1/3, eight
// terms (the ninth is below 2e-9 relative), which vectorizes; double (the precision path) uses std::log1p.
inline float flog1p01(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = MMTS_FMA(p, s2, 1.0f / 13.0f);
  p = MMTS_FMA(p, s2, 1.0f / 11.0f);
  p = MMTS_FMA(p, s2, 1.0f / 9.0f);
  p = MMTS_FMA(p, s2, 1.0f / 7.0f);
  p = MMTS_FMA(p, s2, 1.0f / 5.0f);
  p = MMTS_FMA(p, s2, 1.0f / 3.0f);
  p = MMTS_FMA(p, s2, 1.0f);
  return 2.0f * s * p;
}
inline double flog1p01(double e) { return std::log1p(e); }

// Rescale a running (max, sum, weighted sum) to a new max; exp(−inf − (−inf)) must not give NaN.
template <typename T>
inline void rescale(T& m, T& l, T* w, T m_new) {
  if (m_new != m) {
    T f = std::exp(m - m_new);
    l *= f;
    if (w) *w *= f;
    m = m_new;
  }
}

template <typename T, bool COLS, bool DYS, bool WS, bool MASK>
void fwd_lse(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0,
             T* rmax, T* rsum, T* rws, const T* tau,                 // rows (τ; unused with DYS)
             T* cmax, T* csum, T* cws,                               // columns (this chunk's accumulators)
             T* tile_cmax, T* Z, T tau_min, T half_range,
             const uint8_t* X) {                                     // MASK: the tile's mask
  const T ninf = -std::numeric_limits<T>::infinity();
  if (COLS)
    for (int64_t j = 0; j < bc; ++j) tile_cmax[j] = ninf;
  const T* tc = tau + c0;
  for (int64_t i = 0; i < br; ++i) {  // pass A: maxima
    const T* s = S + i * ld;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    T zm = ninf;
    if (DYS) {
      T* z = Z + i * bc;
      for (int64_t j = 0; j < bc; ++j) z[j] = s[j] / dystress_tau(s[j], tau_min, half_range);
#pragma omp simd reduction(max : zm)
      for (int64_t j = 0; j < bc; ++j) {
        const bool out = MASK && (x[j] & (kOut | kOutLse));
        zm = vmax(zm, out ? ninf : z[j]);
        if (COLS) tile_cmax[j] = vmax(tile_cmax[j], out ? ninf : z[j]);
      }
    } else {
      const T t = tau[r0 + i];
#pragma omp simd reduction(max : zm)
      for (int64_t j = 0; j < bc; ++j) {
        const bool out = MASK && (x[j] & (kOut | kOutLse));
        zm = vmax(zm, out ? ninf : s[j] / t);
        if (COLS) tile_cmax[j] = vmax(tile_cmax[j], out ? ninf : s[j] / tc[j]);
      }
    }
    rescale(rmax[r0 + i], rsum[r0 + i], WS ? &rws[r0 + i] : nullptr, vmax(rmax[r0 + i], zm));
  }
  if (COLS)
    for (int64_t j = 0; j < bc; ++j)
      rescale(cmax[c0 + j], csum[c0 + j], WS ? &cws[c0 + j] : nullptr, vmax(cmax[c0 + j], tile_cmax[j]));
  T* cm = cmax + c0;
  T* cs = csum + c0;
  T* cw = WS ? cws + c0 : nullptr;
  for (int64_t i = 0; i < br; ++i) {  // pass B: sums
    const T* s = S + i * ld;
    const T m = rmax[r0 + i];
    // an excluded entry's e is 0 exactly (the float fexp clamps, so e^{−inf} would not be)
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    T l = 0, w = 0;
    if (DYS) {
      const T* z = Z + i * bc;
#pragma omp simd reduction(+ : l, w)
      for (int64_t j = 0; j < bc; ++j) {
        T e = fexp(z[j] - m);
        if (MASK) e = (x[j] & (kOut | kOutLse)) ? T(0) : e;
        l += e;
        if (WS) w += e * s[j];
        if (COLS) {
          T ec = fexp(z[j] - cm[j]);
          if (MASK) ec = (x[j] & (kOut | kOutLse)) ? T(0) : ec;
          cs[j] += ec;
          if (WS) cw[j] += ec * s[j];
        }
      }
    } else {
      const T t = tau[r0 + i];
#pragma omp simd reduction(+ : l, w)
      for (int64_t j = 0; j < bc; ++j) {
        T e = fexp(s[j] / t - m);
        if (MASK) e = (x[j] & (kOut | kOutLse)) ? T(0) : e;
        l += e;
        if (WS) w += e * s[j];
        if (COLS) {
          T ec = fexp(s[j] / tc[j] - cm[j]);
          if (MASK) ec = (x[j] & (kOut | kOutLse)) ? T(0) : ec;
          cs[j] += ec;
          if (WS) cw[j] += ec * s[j];
        }
      }
    }
    rsum[r0 + i] += l;
    if (WS) rws[r0 + i] += w;
  }
}

template <typename T, bool COLS, bool MASK>
void fwd_hinge(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, const int64_t* tgt,
               const T* marg, const T* pos, T* rhinge, int64_t* rcnt, T* chinge, int32_t* ccnt,
               const uint8_t* X) {
  const T* cmarg = marg + c0;
  const T* cpos = pos + c0;
  T* ch = chinge + c0;
  int32_t* cc = ccnt + c0;
  for (int64_t i = 0; i < br; ++i) {
    const T* s = S + i * ld;
    const int64_t r = r0 + i, tl = tgt[r] - c0, diag = r - c0;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    const T base = marg[r] - pos[r];
    T h = 0;
    int32_t n = 0;
#pragma omp simd reduction(+ : h, n)
    for (int64_t j = 0; j < bc; ++j) {
      T v = base + s[j];
      const bool kept = !(MASK && (x[j] & kOut));
      const bool negative = (j != tl) & kept;
      bool a = (v > T(0)) & negative;
      h += (!(v <= T(0)) & negative) ? v : T(0);  // NaN propagates into the sum (relu(NaN) = NaN)
      n += a ? 1 : 0;
      if (COLS) {
        T vc = cmarg[j] + s[j] - cpos[j];
        const bool cneg = (j != diag) & kept;
        bool ac = (vc > T(0)) & cneg;
        ch[j] += (!(vc <= T(0)) & cneg) ? vc : T(0);
        cc[j] += ac ? 1 : 0;
      }
    }
    rhinge[r] += h;
    rcnt[r] += n;
  }
}

template <typename T, bool COLS, bool MASK>
void fwd_hard(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, const int64_t* tgt,
              T* rhard, int64_t* rarg, T* chard, int64_t* carg, const uint8_t* X) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T* chd = chard + c0;
  int64_t* cag = carg + c0;
  for (int64_t i = 0; i < br; ++i) {
    const T* s = S + i * ld;
    const int64_t r = r0 + i, tl = tgt[r] - c0, diag = r - c0;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    T best = ninf;
    int nan = 0;  // NaN propagates as in the reference's max: a NaN negative is the hardest and stays so
#pragma omp simd reduction(max : best) reduction(| : nan)
    for (int64_t j = 0; j < bc; ++j) {
      const T v = (j != tl && !(MASK && (x[j] & kOut))) ? s[j] : ninf;
      best = vmax(best, v);
      nan |= v != v;
    }
    if (nan && rhard[r] == rhard[r]) {  // the first NaN seen, in the lowest column of this tile
      for (int64_t j = 0; j < bc; ++j)
        if (j != tl && !(MASK && (x[j] & kOut)) && s[j] != s[j]) {
          rhard[r] = s[j];
          rarg[r] = c0 + j;
          break;
        }
    } else if (best > rhard[r]) {  // strict: an earlier tile (lower column) keeps a tie; false once NaN
      for (int64_t j = 0; j < bc; ++j)
        if (j != tl && !(MASK && (x[j] & kOut)) && s[j] == best) {
          rhard[r] = best;
          rarg[r] = c0 + j;
          break;
        }
    }
    if (COLS) {
      for (int64_t j = 0; j < bc; ++j) {
        T v = (j != diag && !(MASK && (x[j] & kOut))) ? s[j] : ninf;
        bool up = v > chd[j] || (v != v && chd[j] == chd[j]);  // strict: an earlier row keeps a tie; NaN sticks
        chd[j] = up ? v : chd[j];
        cag[j] = up ? r : cag[j];
      }
    }
  }
}

template <typename T, bool COLS, bool DYS, bool ACC, bool MASK, bool DGRAD>
void bwd_lse(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, T* dS,
             const T* grow, const T* lse, const T* tau, const T* gcol, const T* lse_c, T tau_min, T half_range,
             const uint8_t* X) {
  static_assert(DYS || !DGRAD, "DGRAD is DySTreSS's gradient through τ(S)");
  const T* gc = gcol + c0;
  const T* lc = lse_c + c0;
  const T* tc = tau + c0;
  for (int64_t i = 0; i < br; ++i) {
    const T* s = S + i * ld;
    T* d = dS + i * bc;
    const T g = grow[r0 + i], L = lse[r0 + i];
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    if (DYS) {
#pragma omp simd
      for (int64_t j = 0; j < bc; ++j) {
        T t = dystress_tau(s[j], tau_min, half_range);
        T z = s[j] / t;  // rounded exactly as in the forward
        T v, slope = DGRAD ? dystress_slope(s[j], t, half_range) : T(0);
        if (DGRAD) {
          v = g * slope * fexp(z - L);
          if (COLS) v += gc[j] * slope * fexp(z - lc[j]);
        } else {
          v = g / t * fexp(z - L);
          if (COLS) v += gc[j] / t * fexp(z - lc[j]);
        }
        if (MASK) v = (x[j] & (kOut | kOutLse)) ? T(0) : v;
        d[j] = ACC ? d[j] + v : v;
      }
    } else {
      const T t = tau[r0 + i];
#pragma omp simd
      for (int64_t j = 0; j < bc; ++j) {
        T v = g * fexp(s[j] / t - L);
        if (COLS) v += gc[j] * fexp(s[j] / tc[j] - lc[j]);
        if (MASK) v = (x[j] & (kOut | kOutLse)) ? T(0) : v;
        d[j] = ACC ? d[j] + v : v;
      }
    }
  }
}

template <typename T, bool COLS, bool ACC, bool MASK>
void bwd_hinge(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, T* dS, const int64_t* tgt,
               const T* marg, const T* pos, const T* ghinge, const T* ghinge_c, const uint8_t* X) {
  const T* cmarg = marg + c0;
  const T* cpos = pos + c0;
  const T* gc = ghinge_c + c0;
  for (int64_t i = 0; i < br; ++i) {
    const T* s = S + i * ld;
    T* d = dS + i * bc;
    const int64_t r = r0 + i, tl = tgt[r] - c0, diag = r - c0;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    const T base = marg[r] - pos[r], g = ghinge[r];
#pragma omp simd
    for (int64_t j = 0; j < bc; ++j) {
      const bool kept = !(MASK && (x[j] & kOut));
      T v = ((base + s[j] > T(0)) & (j != tl) & kept) ? g : T(0);
      if (COLS) v += ((cmarg[j] + s[j] - cpos[j] > T(0)) & (j != diag) & kept) ? gc[j] : T(0);
      d[j] = ACC ? d[j] + v : v;
    }
  }
}

// The sigmoid's v_ij = −z_ij (S_ij/τ_i + b_i) and whether the entry is kept, from the mask or (no mask) the target.
// S_ij · (1/τ_i): an ulp of u from the reference's S/τ, which softplus and σ (slope ≤ 1) do not amplify — unlike
// the lse's exp(z − lse), hence its true division — and a division fewer per entry.
template <typename T, bool MASK>
inline T sig_v(T s, T inv_t, T b, int64_t j, int64_t tl, const uint8_t* x, bool& kept, bool& positive) {
  positive = MASK ? (x[j] & kPos) != 0 : j == tl;
  kept = !(MASK && (x[j] & kOut));
  const T u = s * inv_t + b;
  return positive ? -u : u;
}

// softplus(v) = max(v, 0) + log1p(e^−|v|) and σ(v) from the one exp e^−|v| (NaN stays NaN: vmax(NaN, 0) is NaN).
template <typename T>
inline void softplus_sigma(T v, T& sp, T& sg) {
  const T e = fexp(-(v < T(0) ? -v : v));
  sp = vmax(v, T(0)) + flog1p01(e);
  sg = (v >= T(0) ? T(1) : e) / (T(1) + e);
}

// The forward's sums of row i: sig_i, and with GRADS Σ_j z σ(v) (→ ∂/∂b_i) and Σ_j z σ(v) S_ij (→ ∂/∂τ_i).
// With WRITE_Q (the fused path) the same sweep also writes the backward's tile for g = 1 over S, in place:
// Q_ij = −z_ij σ(v_ij)/τ_i (one exp per entry for softplus, σ and Q; the caller's GEMMs need Q, not S).
template <typename T, bool MASK, bool GRADS, bool WRITE_Q>
void fwd_sig(T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, const int64_t* tgt,
             const T* tau, const T* bias, T* sig, T* sb, T* st, const uint8_t* X) {
  for (int64_t i = 0; i < br; ++i) {
    T* s = S + i * ld;
    const int64_t r = r0 + i, tl = tgt[r] - c0;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    const T inv_t = T(1) / tau[r], b = bias[r];
    T acc = 0, ab = 0, as = 0;
#pragma omp simd reduction(+ : acc, ab, as)
    for (int64_t j = 0; j < bc; ++j) {
      bool kept, positive;
      const T sj = s[j];
      const T v = sig_v<T, MASK>(sj, inv_t, b, j, tl, x, kept, positive);
      T sp, sg;
      softplus_sigma(v, sp, sg);
      const T q = kept ? (positive ? sg : -sg) : T(0);  // z σ(v)
      acc += kept ? sp : T(0);
      if (GRADS) {
        ab += q;
        as += q * sj;
      }
      if (WRITE_Q) s[j] = -q * inv_t;
    }
    sig[r] += acc;
    if (GRADS) {
      sb[r] += ab;
      st[r] += as;
    }
  }
}

template <typename T, bool MASK, bool ACC>
void bwd_sig(const T* S, int64_t ld, int64_t br, int64_t bc, int64_t r0, int64_t c0, T* dS, const int64_t* tgt,
             const T* tau, const T* bias, const T* gsig, const uint8_t* X) {
  for (int64_t i = 0; i < br; ++i) {
    const T* s = S + i * ld;
    T* d = dS + i * bc;
    const int64_t r = r0 + i, tl = tgt[r] - c0;
    const uint8_t* x = MASK ? X + i * bc : nullptr;
    const T inv_t = T(1) / tau[r], b = bias[r], g = gsig[r];
#pragma omp simd
    for (int64_t j = 0; j < bc; ++j) {
      bool kept, positive;
      const T v = sig_v<T, MASK>(s[j], inv_t, b, j, tl, x, kept, positive);
      const T e = fexp(-(v < T(0) ? -v : v));
      const T sg = (v >= T(0) ? T(1) : e) / (T(1) + e);
      const T dv = kept ? g * (positive ? -sg : sg) : T(0);  // −z σ(v) g
      d[j] = ACC ? d[j] + dv : dv;
    }
  }
}

}  // namespace MMTS_KNS
}  // namespace mmts_cpu
