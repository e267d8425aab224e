// The per-step elementwise work of rnorm's fused LSTM recurrence on CPU (rnorm.nn._fused_step).
//
// rnorm/nn/fused.py runs the time loop. At every step it does the GEMMs with torch (W_x x_t and
// W_h h_{t-1}, into buffers) and calls this module once; everything between the GEMMs happens here
// in a few passes over (B, 4H): batch or layer statistics of the input and recurrent terms, their
// normalization (BN eq. 5-6), the gates, the cell (eq. 7), the cell's normalization and the output
// (eq. 8; Norm-Prop's eq. 15-17), padding. The backward step does the same for the hand-derived
// derivatives, up to the recurrent GEMM. The torch-ops loop in fused.py computes the same function
// and is what runs where this module is not built; tests/nn/test_fused.py compares both with the
// reference loop.
//
// No torch headers: the module takes raw data pointers (contiguous CPU tensors that fused.py
// allocates and keeps alive), so it builds with any C++17 compiler in a second, without torch at
// build time. A "plan" is made once per layer call from a dict of pointers, sizes and kinds and
// holds its scratch space; each step is then one call with the step index.
//
// Conventions (mirroring fused.py): rows are samples b < B, columns features j < F, row-major.
// "z-space": the g block's pre-activation is doubled by the caller (in the weights or scales), so
// that sigmoid(z) gives every gate and tanh(g) = 2 sigmoid(2g) - 1; the cell site's scale and
// shift are doubled for the output tanh in the same way.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <vector>

// Every helper is inlined into the two entry points (forward_step / backward_step), which are
// compiled twice on x86-64 Linux: for x86-64-v3 (AVX2, FMA) and for the baseline, chosen at load
// time by the CPU. The AVX2 build is about twice as fast (pMNIST bn inference: 129 -> 62 ms).
#ifndef RNORM_CLONES  // -DRNORM_CLONES= builds the baseline only (to measure what AVX2 brings)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define RNORM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RNORM_CLONES
#endif
#endif
#if defined(__GNUC__)
#define RNORM_INLINE inline __attribute__((always_inline))
#else
#define RNORM_INLINE inline
#endif

namespace {

enum Kind { kNone = 0, kAffine = 1, kBatch = 2, kLayer = 3, kRms = 4 };  // kNone: identity, or nothing to do
// kRms: layer statistics without centering, x / sqrt(mean(x^2) + eps) (RMS normalization).
inline bool per_row(int kind) { return kind == kLayer || kind == kRms; }
enum Base { kBaseBuffer = 0, kBaseGiven = 1, kBaseZero = 2 };   // what z starts from

// ---------------------------------------------------------------------------------------------
// exp, vectorizable. std::exp is a scalar call, about ten times the cost of the arithmetic around
// it here; this is Cephes' reduction (x = n ln2 + r, |r| <= ln2/2, ln2 in two parts) with the
// Taylor series of e^r and 2^n built in the exponent bits, branch-free so that the compiler
// vectorizes the loops that call it. Truncation error: r^8/8! < 5e-9 (float, below its 6e-8
// epsilon) and r^14/14! < 5e-18 (double); arguments are clamped so that 2^n stays a normal number,
// which only matters where sigmoid is already 0 or 1 to working precision.
RNORM_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds to an integer in the low bits
  const float k = x * 1.44269504088896341f + magic;
  const float n = k - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &k, sizeof bits);
  const int32_t exponent = (bits - 0x4B400000 + 127) << 23;  // bits(k) - bits(magic) == n
  float scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return p * scale;
}

RNORM_INLINE double exp_approx(double x) {
  x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double k = x * 1.4426950408889634074 + magic;
  const double n = k - magic;
  double r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits;
  std::memcpy(&bits, &k, sizeof bits);
  const int64_t exponent = (bits - 0x4338000000000000LL + 1023) << 52;
  double scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return p * scale;
}

template <typename T>
RNORM_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

template <typename T>
RNORM_INLINE T rsqrt(T x) {
  return T(1) / std::sqrt(x);
}

// ---------------------------------------------------------------------------------------------
// Statistics. "Batch": per column j, weighted by w (B,) = the step's mask over its count, so that
// padded rows enter no statistic; biased variance, as the population statistics want it. "Layer":
// per row b, over its F features.

// mean (F,), var (F,), rstd (F,) of u (B, F); u is centered in place.
template <typename T>
RNORM_INLINE void batch_statistics(T* u, const T* w, long B, long F, T eps, T* mean, T* var, T* rstd) {
  for (long j = 0; j < F; ++j) mean[j] = T(0);
  for (long b = 0; b < B; ++b) {
    const T wb = w[b];
    const T* row = u + b * F;
#pragma omp simd
    for (long j = 0; j < F; ++j) mean[j] += wb * row[j];
  }
  for (long j = 0; j < F; ++j) var[j] = T(0);
  for (long b = 0; b < B; ++b) {
    const T wb = w[b];
    T* row = u + b * F;
#pragma omp simd
    for (long j = 0; j < F; ++j) {
      const T d = row[j] - mean[j];
      row[j] = d;
      var[j] += wb * d * d;
    }
  }
#pragma omp simd
  for (long j = 0; j < F; ++j) rstd[j] = rsqrt(var[j] + eps);
}

// rstd (B,) of u (B, F) over each row; u is centered in place (unless !center: RMS).
template <typename T>
RNORM_INLINE void layer_statistics(T* u, long B, long F, T eps, T* rstd, bool center) {
  const T inv = T(1) / T(F);
  for (long b = 0; b < B; ++b) {
    T* row = u + b * F;
    T sum = 0;
    if (center) {
#pragma omp simd reduction(+ : sum)
      for (long j = 0; j < F; ++j) sum += row[j];
    }
    const T mean = sum * inv;
    T squares = 0;
#pragma omp simd reduction(+ : squares)
    for (long j = 0; j < F; ++j) {
      const T d = row[j] - mean;
      row[j] = d;
      squares += d * d;
    }
    rstd[b] = rsqrt(squares * inv + eps);
  }
}

// A normalization site's per-step data: its kind, the raw term u (normalized in place for
// batch/layer), its scale row, and where its statistics go.
template <typename T>
struct Site {
  int kind = kNone;
  T* u = nullptr;
  long u_step = 0;
  const T* scale = nullptr;
  long scale_step = 0;  // 0: the same scale at every step
  T* rstd = nullptr;
  long rstd_step = 0;
  T* mean = nullptr;  // batch only: (T, F), the step's mean and variance for population statistics
  T* var = nullptr;
  T eps = 0;

  // Computes the step's statistics and leaves u centered; rstd for the final pass.
  RNORM_INLINE const T* prepare(long t, long s, const T* w, long B, long F) const {
    if (kind == kBatch) {
      T* r = rstd + s * rstd_step;
      batch_statistics(u + s * u_step, w, B, F, eps, mean + t * F, var + t * F, r);
      return r;
    }
    if (per_row(kind)) {
      T* r = rstd + s * rstd_step;
      layer_statistics(u + s * u_step, B, F, eps, r, kind == kLayer);
      return r;
    }
    return nullptr;
  }
};

// Adds site's contribution for row b to zrow (F,), normalizing u's row in place (batch/layer).
template <typename T>
RNORM_INLINE void add_site_row(const Site<T>& site, long t, long s, long b, long F, const T* rstd, T* zrow) {
  if (site.kind == kNone) return;
  T* u = site.u + s * site.u_step + b * F;
  const T* scale = site.scale + t * site.scale_step;
  if (site.kind == kAffine) {
#pragma omp simd
    for (long j = 0; j < F; ++j) zrow[j] += u[j] * scale[j];
  } else if (site.kind == kBatch) {
#pragma omp simd
    for (long j = 0; j < F; ++j) {
      const T v = u[j] * rstd[j];
      u[j] = v;
      zrow[j] += v * scale[j];
    }
  } else {
    const T r = rstd[b];
#pragma omp simd
    for (long j = 0; j < F; ++j) {
      const T v = u[j] * r;
      u[j] = v;
      zrow[j] += v * scale[j];
    }
  }
}

// out = x * scale (+ shift), one row of F.
template <typename T>
RNORM_INLINE void affine_row(const T* x, const T* scale, const T* shift, long F, T* out) {
  if (shift) {
#pragma omp simd
    for (long j = 0; j < F; ++j) out[j] = x[j] * scale[j] + shift[j];
  } else {
#pragma omp simd
    for (long j = 0; j < F; ++j) out[j] = x[j] * scale[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward step.

template <typename T>
struct ForwardPlan {
  long batch = 0, hidden = 0;
  bool save = false;  // buffers per step (training); else one reused row and ping-pong states
  int base = kBaseBuffer;
  T* z = nullptr;             // (B, 4H): the identity sites' GEMMs when base is kBaseBuffer
  const T* given = nullptr;   // (T, B, 4H): input terms computed before the loop (kBaseGiven)
  const T* shift = nullptr;   // (S, 4H) or null
  long shift_step = 0;
  Site<T> input, recurrent, cell;
  const T* cell_shift = nullptr;  // (S, H) or null, doubled
  long cell_shift_step = 0;
  T* act = nullptr;        // (steps, B, 4H): sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
  T* tanh_cell = nullptr;  // (steps, B, H)
  T* cell_new = nullptr;   // (steps, B, H) or null: c_t before padding (null: the next state)
  T* states_h = nullptr;   // (T + 1, B, H) when saving, else (2, B, H) used in turn
  T* states_c = nullptr;
  T* output = nullptr;     // (T, B, H) or null: the output is the next state
  const T* probe = nullptr;         // (T, B, H) or null
  const T* hidden_scale = nullptr;  // (1,) or (H,), or null
  long hidden_scale_step = 0;
  const T* mask = nullptr;     // (T, B) of 0/1, or null
  const T* weights = nullptr;  // (T, B) or (1, B): mask / count
  long weights_step = 0;
  std::vector<T> hidden_row;   // (H,): Norm-Prop's scale on h, spread over the units
  std::vector<T> zrow, chat;   // scratch: one row of z; 2 c-hat (B, H)
};

template <typename T>
RNORM_INLINE void forward_step(ForwardPlan<T>& p, long t) {
  const long B = p.batch, H = p.hidden, G = 4 * H;
  const long s = p.save ? t : 0;
  const long prev = p.save ? t : (t & 1), next = p.save ? t + 1 : ((t + 1) & 1);
  const T* w = p.weights + t * p.weights_step;
  const T* in_rstd = p.input.prepare(t, s, w, B, G);
  const T* rec_rstd = p.recurrent.prepare(t, s, w, B, G);
  const T* shift = p.shift ? p.shift + t * p.shift_step : nullptr;
  const T* given = p.given ? p.given + t * B * G : nullptr;
  T* act = p.act + s * B * G;
  T* zrow = p.zrow.data();

  // -- gates (BN eq. 6, NP eq. 15), in z-space; one sigmoid gives all four ---------------------
  for (long b = 0; b < B; ++b) {
    if (p.base == kBaseBuffer) {
      std::memcpy(zrow, p.z + b * G, G * sizeof(T));
    } else if (p.base == kBaseGiven) {
      std::memcpy(zrow, given + b * G, G * sizeof(T));
    } else {
      std::memset(zrow, 0, G * sizeof(T));
    }
    if (shift) {
#pragma omp simd
      for (long j = 0; j < G; ++j) zrow[j] += shift[j];
    }
    add_site_row(p.input, t, s, b, G, in_rstd, zrow);
    add_site_row(p.recurrent, t, s, b, G, rec_rstd, zrow);
    T* a = act + b * G;
#pragma omp simd
    for (long j = 0; j < G; ++j) a[j] = sigmoid(zrow[j]);
#pragma omp simd
    for (long j = 2 * H; j < 3 * H; ++j) a[j] = T(2) * a[j] - T(1);  // tanh of the undoubled g
  }

  // -- cell (eq. 7) ----------------------------------------------------------------------------
  const T* c_prev = p.states_c + prev * B * H;
  T* c_next = p.states_c + next * B * H;
  T* c_new = p.cell_new ? p.cell_new + s * B * H : c_next;
  for (long b = 0; b < B; ++b) {
    const T* a = act + b * G;
    const T* cp = c_prev + b * H;
    T* cn = c_new + b * H;
#pragma omp simd
    for (long k = 0; k < H; ++k) cn[k] = a[H + k] * cp[k] + a[k] * a[2 * H + k];
  }

  // -- the cell site and the output (eq. 8, NP eq. 17); chat holds 2 c-hat -----------------------
  T* chat = p.chat.data();
  const Site<T>& cs = p.cell;
  if (cs.kind == kBatch || per_row(cs.kind)) {
    T* norm = cs.u + s * cs.u_step;
    std::memcpy(norm, c_new, B * H * sizeof(T));
    const T* rstd = cs.prepare(t, s, w, B, H);
    const T* scale = cs.scale + t * cs.scale_step;
    const T* cshift = p.cell_shift ? p.cell_shift + t * p.cell_shift_step : nullptr;
    for (long b = 0; b < B; ++b) {
      T* row = norm + b * H;
      T* out = chat + b * H;
      if (cs.kind == kBatch) {
#pragma omp simd
        for (long k = 0; k < H; ++k) row[k] *= rstd[k];
      } else {
        const T r = rstd[b];
#pragma omp simd
        for (long k = 0; k < H; ++k) row[k] *= r;
      }
      affine_row(row, scale, cshift, H, out);
    }
  } else if (cs.kind == kAffine) {
    const T* scale = cs.scale + t * cs.scale_step;
    const T* cshift = p.cell_shift ? p.cell_shift + t * p.cell_shift_step : nullptr;
    for (long b = 0; b < B; ++b) affine_row(c_new + b * H, scale, cshift, H, chat + b * H);
  } else {
#pragma omp simd
    for (long k = 0; k < B * H; ++k) chat[k] = T(2) * c_new[k];
  }

  T* tc = p.tanh_cell + s * B * H;
  const T* h_prev = p.states_h + prev * B * H;
  T* h_next = p.states_h + next * B * H;
  T* out = p.output ? p.output + t * B * H : h_next;
  const T* probe = p.probe ? p.probe + t * B * H : nullptr;
  const T* m = p.mask ? p.mask + t * B : nullptr;
  for (long b = 0; b < B; ++b) {
    const T* a = act + b * G + 3 * H;  // sigmoid(o)
    const T* ch = chat + b * H;
    T* tcb = tc + b * H;
    T* ob = out + b * H;
#pragma omp simd
    for (long k = 0; k < H; ++k) {
      const T th = T(2) * sigmoid(ch[k]) - T(1);  // tanh(c-hat)
      tcb[k] = th;
      ob[k] = a[k] * th;
    }
    if (p.hidden_scale) {
      const T* hs = p.hidden_row.data();
#pragma omp simd
      for (long k = 0; k < H; ++k) ob[k] *= hs[k];
    }
    if (probe) {
      const T* pr = probe + b * H;
#pragma omp simd
      for (long k = 0; k < H; ++k) ob[k] += pr[k];
    }
    // -- padding: an ended sequence keeps its state and outputs 0 ------------------------------
    T* hn = h_next + b * H;
    T* cnext = c_next + b * H;
    const T* cn = c_new + b * H;
    if (m && m[b] == T(0)) {
      if (hn != h_prev + b * H) std::memcpy(hn, h_prev + b * H, H * sizeof(T));
      if (cnext != c_prev + b * H) std::memcpy(cnext, c_prev + b * H, H * sizeof(T));
      for (long k = 0; k < H; ++k) ob[k] = T(0);
    } else {
      if (hn != ob) std::memcpy(hn, ob, H * sizeof(T));
      if (cnext != cn) std::memcpy(cnext, cn, H * sizeof(T));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward step: d loss / d(everything of step t) given dh = d loss / d h_t (the recurrent GEMM's
// result from step t + 1) and dc = d loss / d c_t. Leaves in dh what does not go through the
// gates (an ended sequence passes its state's gradient on), for the caller's GEMM to add
// dr @ W_h to, and the gradient of c_{t-1} in dc.

// du of y = gamma x-hat for batch (per column) statistics; dy, xhat, du (B, F); writes the
// weighted column means of dy and dy x-hat into sum_dy, sum_dy_xhat (gamma's and beta's gradients).
template <typename T>
RNORM_INLINE void batch_backward(const T* dy, const T* xhat, const T* rstd, const T* gamma, const T* w, const T* m, long B, long F,
                    T* sum_dy, T* sum_dy_xhat, T* du, T* coef) {
  for (long j = 0; j < F; ++j) sum_dy[j] = sum_dy_xhat[j] = T(0);
  for (long b = 0; b < B; ++b) {
    const T wb = w[b];
    const T* d = dy + b * F;
    const T* x = xhat + b * F;
#pragma omp simd
    for (long j = 0; j < F; ++j) {
      sum_dy[j] += wb * d[j];
      sum_dy_xhat[j] += wb * d[j] * x[j];
    }
  }
#pragma omp simd
  for (long j = 0; j < F; ++j) coef[j] = gamma[j] * rstd[j];
  for (long b = 0; b < B; ++b) {
    const T* d = dy + b * F;
    const T* x = xhat + b * F;
    T* o = du + b * F;
    if (m && m[b] == T(0)) {  // a padded row entered no statistic
      for (long j = 0; j < F; ++j) o[j] = T(0);
      continue;
    }
#pragma omp simd
    for (long j = 0; j < F; ++j) o[j] = (d[j] - sum_dy[j] - x[j] * sum_dy_xhat[j]) * coef[j];
  }
}

// The same for layer (per row) statistics; adds sum_b dy x-hat (gamma's gradient) to gamma_grad (F,).
template <typename T>
RNORM_INLINE void layer_backward(const T* dy, const T* xhat, const T* rstd, const T* gamma, long B, long F, T* du,
                                 T* gamma_grad, bool center) {
  const T inv = T(1) / T(F);
  for (long b = 0; b < B; ++b) {
    const T* d = dy + b * F;
    const T* x = xhat + b * F;
    T* o = du + b * F;
    T mean_g = 0, mean_gx = 0;
#pragma omp simd reduction(+ : mean_g, mean_gx)
    for (long j = 0; j < F; ++j) {
      const T g = d[j] * gamma[j];
      gamma_grad[j] += d[j] * x[j];
      mean_g += g;
      mean_gx += g * x[j];
    }
    mean_g = center ? mean_g * inv : T(0);  // RMS: no mean was subtracted, so no mean term
    mean_gx *= inv;
    const T r = rstd[b];
#pragma omp simd
    for (long j = 0; j < F; ++j) o[j] = (d[j] * gamma[j] - mean_g - x[j] * mean_gx) * r;
  }
}

template <typename T>
struct BackSite {
  int kind = kNone;
  const T* norm = nullptr;  // (T, B, F) x-hat
  const T* rstd = nullptr;  // (T, F) batch or (T, B) layer
  long rstd_step = 0;
  const T* scale = nullptr;  // gamma (F,), or for affine (S, F)
  long scale_step = 0;
  T* sum_dy = nullptr;  // batch: (T, F) each
  T* sum_dy_xhat = nullptr;
  T* gamma_grad = nullptr;  // layer: (F,), accumulated over the steps
  const T* raw = nullptr;   // affine: (T, B, F) the raw term u
  T* scale_rows = nullptr;  // affine: (T, F), sum_b dy u per step (the scale's gradient)
  T* grad = nullptr;  // (T, B, F): d loss / d u; may be the norm buffer itself (x-hat is dead after)

  // du into out from dy (B, F); returns false if the site has nothing to do.
  RNORM_INLINE bool backward(long t, const T* dy, const T* w, const T* m, long B, long F, T* out, T* coef) const {
    if (kind == kBatch) {
      batch_backward(dy, norm + t * B * F, rstd + t * rstd_step, scale, w, m, B, F, sum_dy + t * F, sum_dy_xhat + t * F, out,
                     coef);
      return true;
    }
    if (per_row(kind)) {
      layer_backward(dy, norm + t * B * F, rstd + t * rstd_step, scale, B, F, out, gamma_grad, kind == kLayer);
      return true;
    }
    if (kind == kAffine && !scale_rows) {  // the cell site: its scale's gradient comes after the loop
      const T* sc = scale + t * scale_step;
      for (long b = 0; b < B; ++b) {
#pragma omp simd
        for (long j = 0; j < F; ++j) out[b * F + j] = dy[b * F + j] * sc[j];
      }
      return true;
    }
    if (kind == kAffine) {  // y = u * scale_t: scale_rows[t] = sum_b dy u, du = dy scale_t (may overwrite u)
      const T* sc = scale + t * scale_step;
      const T* u = raw + t * B * F;
      T* rows = scale_rows + t * F;
      for (long j = 0; j < F; ++j) rows[j] = T(0);
      for (long b = 0; b < B; ++b) {
#pragma omp simd
        for (long j = 0; j < F; ++j) {
          const T d = dy[b * F + j];
          rows[j] += d * u[b * F + j];
          out[b * F + j] = d * sc[j];
        }
      }
      return true;
    }
    return false;
  }
};

template <typename T>
struct BackwardPlan {
  long batch = 0, hidden = 0;
  const T* grad_output = nullptr;  // (T, B, H)
  T* dh = nullptr;                 // (B, H), in and out
  T* dc = nullptr;                 // (B, H), in and out
  const T* mask = nullptr;
  const T* weights = nullptr;
  long weights_step = 0;
  const T* act = nullptr;
  const T* tanh_cell = nullptr;
  const T* states_c = nullptr;  // (T + 1, B, H): c_{t-1} is row t
  T chat_factor = 1;            // on d loss / d(2 c-hat): 1/2 for a cell site, times Norm-Prop's scale
  bool scale_chat = false;
  const T* hidden_scale = nullptr;
  long hidden_scale_step = 0;
  T* grad_chat = nullptr;   // (T, B, H) or null
  T* grad_probe = nullptr;  // (T, B, H) or null
  T* grad_z = nullptr;      // (T, B, 4H); may be act itself (each step reads its row before writing it)
  BackSite<T> input, recurrent, cell;
  std::vector<T> hidden_row;  // (H,): Norm-Prop's scale on h spread over the units, or ones
  std::vector<T> dh_new, d_chat, d_cell, coef;
};

template <typename T>
RNORM_INLINE void backward_step(BackwardPlan<T>& p, long t) {
  const long B = p.batch, H = p.hidden, G = 4 * H;
  const T* go = p.grad_output + t * B * H;
  const T* m = p.mask ? p.mask + t * B : nullptr;
  const T* w = p.weights + t * p.weights_step;
  const T* act = p.act + t * B * G;
  const T* tc = p.tanh_cell + t * B * H;
  T* dhn = p.dh_new.data();
  T* dchat = p.grad_chat ? p.grad_chat + t * B * H : p.d_chat.data();

  // -- through h = o tanh(c-hat) ------------------------------------------------------------------
  for (long b = 0; b < B; ++b) {
    const T mb = m ? m[b] : T(1);
    const T* o = act + b * G + 3 * H;
    const T* g = go + b * H;
    T* dh = p.dh + b * H;
    T* d = dhn + b * H;
    T* dch = dchat + b * H;
    const T* th = tc + b * H;
#pragma omp simd
    for (long k = 0; k < H; ++k) {
      const T v = (g[k] + dh[k]) * mb;  // padded outputs are constant zeros
      dh[k] = dh[k] - dh[k] * mb;       // an ended sequence passes its state's gradient on
      d[k] = v;
      dch[k] = v * (o[k] - o[k] * th[k] * th[k]);
    }
    if (p.scale_chat) {
      const T f = p.chat_factor;
      const T* hs = p.hidden_row.data();
#pragma omp simd
      for (long k = 0; k < H; ++k) dch[k] *= f * hs[k];
    }
  }
  if (p.grad_probe) std::memcpy(p.grad_probe + t * B * H, dhn, B * H * sizeof(T));

  // -- through the cell site ------------------------------------------------------------------------
  const T* dcell = dchat;
  if (p.cell.kind != kNone) {
    p.cell.backward(t, dchat, w, m, B, H, p.d_cell.data(), p.coef.data());
    dcell = p.d_cell.data();
  }

  // -- through the gates (z-space: the g block's d tanh(z/2) / dz = (1 - g^2) / 2) and the cell --
  const T* c_prev = p.states_c + t * B * H;
  T* dz = p.grad_z + t * B * G;
  for (long b = 0; b < B; ++b) {
    const T mb = m ? m[b] : T(1);
    const T* a = act + b * G;
    const T* cp = c_prev + b * H;
    const T* th = tc + b * H;
    const T* dcl = dcell + b * H;
    const T* d = dhn + b * H;
    T* dc = p.dc + b * H;
    T* dzb = dz + b * G;
    const T* hs = p.hidden_row.data();
#pragma omp simd
    for (long k = 0; k < H; ++k) {
      const T i = a[k], f = a[H + k], g = a[2 * H + k], o = a[3 * H + k];
      const T kept = dc[k] * mb;
      const T total = kept + dcl[k];
      const T dh_out = d[k] * hs[k];
      dzb[k] = total * (i - i * i) * g;
      dzb[H + k] = total * (f - f * f) * cp[k];
      dzb[2 * H + k] = total * ((g * g - T(1)) * T(-0.5)) * i;
      dzb[3 * H + k] = dh_out * (o - o * o) * th[k];
      dc[k] = (dc[k] - kept) + total * f;
    }
  }

  // -- through the input and recurrent sites (the caller adds dr @ W_h to dh) --------------------
  if (p.input.kind != kNone) p.input.backward(t, dz, w, m, B, G, p.input.grad + t * B * G, p.coef.data());
  if (p.recurrent.kind != kNone) p.recurrent.backward(t, dz, w, m, B, G, p.recurrent.grad + t * B * G, p.coef.data());
}

// The entry points, one per dtype, each compiled for every target of RNORM_CLONES.
RNORM_CLONES void forward_f32(ForwardPlan<float>& p, long t) { forward_step(p, t); }
RNORM_CLONES void forward_f64(ForwardPlan<double>& p, long t) { forward_step(p, t); }
RNORM_CLONES void backward_f32(BackwardPlan<float>& p, long t) { backward_step(p, t); }
RNORM_CLONES void backward_f64(BackwardPlan<double>& p, long t) { backward_step(p, t); }

// ---------------------------------------------------------------------------------------------
// Python glue: plans from dicts, steps by index.

struct Reader {
  PyObject* dict;
  bool failed = false;

  PyObject* item(const char* key) {
    PyObject* value = PyDict_GetItemString(dict, key);  // borrowed
    if (!value) {
      PyErr_Format(PyExc_KeyError, "fused step plan: missing entry %s", key);
      failed = true;
    }
    return value;
  }
  long integer(const char* key) {
    if (failed) return 0;
    PyObject* value = item(key);
    if (!value) return 0;
    long result = PyLong_AsLong(value);
    if (result == -1 && PyErr_Occurred()) failed = true;
    return result;
  }
  double real(const char* key) {
    if (failed) return 0;
    PyObject* value = item(key);
    if (!value) return 0;
    double result = PyFloat_AsDouble(value);
    if (result == -1.0 && PyErr_Occurred()) failed = true;
    return result;
  }
  // Fails the plan if a buffer its kinds need is missing (a bug in the caller, never a crash here).
  void require(const void* ptr, const char* what) {
    if (failed || ptr) return;
    PyErr_Format(PyExc_ValueError, "fused step plan: %s is required but missing", what);
    failed = true;
  }
  template <typename T>
  T* pointer(const char* key) {  // 0 or None: null
    if (failed) return nullptr;
    PyObject* value = item(key);
    if (!value || value == Py_None) return nullptr;
    void* result = PyLong_AsVoidPtr(value);
    if (PyErr_Occurred()) failed = true;
    return static_cast<T*>(result);
  }
};

// (H,) of value[k * step], or ones without a value.
template <typename T>
std::vector<T> spread(const T* value, long step, long hidden) {
  std::vector<T> row(hidden, T(1));
  if (value)
    for (long k = 0; k < hidden; ++k) row[k] = value[k * step];
  return row;
}

template <typename T>
void read_site(Reader& r, const char* prefix, Site<T>& site) {
  char key[64];
  auto name = [&](const char* field) {
    PyOS_snprintf(key, sizeof key, "%s_%s", prefix, field);
    return key;
  };
  site.kind = static_cast<int>(r.integer(name("kind")));
  site.u = r.pointer<T>(name("u"));
  site.u_step = r.integer(name("u_step"));
  site.scale = r.pointer<const T>(name("scale"));
  site.scale_step = r.integer(name("scale_step"));
  site.rstd = r.pointer<T>(name("rstd"));
  site.rstd_step = r.integer(name("rstd_step"));
  site.mean = r.pointer<T>(name("mean"));
  site.var = r.pointer<T>(name("var"));
  site.eps = static_cast<T>(r.real(name("eps")));
  if (site.kind < kNone || site.kind > kRms) {
    PyErr_Format(PyExc_ValueError, "fused step plan: unknown kind %d for %s", site.kind, prefix);
    r.failed = true;
  }
  if (site.kind != kNone) {
    r.require(site.u, prefix);
    r.require(site.scale, prefix);
  }
  if (site.kind == kBatch || per_row(site.kind)) r.require(site.rstd, prefix);
  if (site.kind == kBatch) {
    r.require(site.mean, prefix);
    r.require(site.var, prefix);
  }
}

template <typename T>
void read_back_site(Reader& r, const char* prefix, BackSite<T>& site) {
  char key[64];
  auto name = [&](const char* field) {
    PyOS_snprintf(key, sizeof key, "%s_%s", prefix, field);
    return key;
  };
  site.kind = static_cast<int>(r.integer(name("kind")));
  site.norm = r.pointer<const T>(name("norm"));
  site.rstd = r.pointer<const T>(name("rstd"));
  site.rstd_step = r.integer(name("rstd_step"));
  site.scale = r.pointer<const T>(name("scale"));
  site.scale_step = r.integer(name("scale_step"));
  site.sum_dy = r.pointer<T>(name("sum_dy"));
  site.sum_dy_xhat = r.pointer<T>(name("sum_dy_xhat"));
  site.gamma_grad = r.pointer<T>(name("gamma_grad"));
  site.raw = r.pointer<const T>(name("raw"));
  site.scale_rows = r.pointer<T>(name("scale_rows"));
  site.grad = r.pointer<T>(name("grad"));
  if (site.kind < kNone || site.kind > kRms) {
    PyErr_Format(PyExc_ValueError, "fused step plan: unknown kind %d for %s", site.kind, prefix);
    r.failed = true;
  }
  if (site.kind != kNone) r.require(site.scale, prefix);
  if (site.kind == kBatch || per_row(site.kind)) {
    r.require(site.norm, prefix);
    r.require(site.rstd, prefix);
  }
  if (site.kind == kBatch) {
    r.require(site.sum_dy, prefix);
    r.require(site.sum_dy_xhat, prefix);
  }
  if (per_row(site.kind)) r.require(site.gamma_grad, prefix);
  if (site.kind == kAffine && site.scale_rows) r.require(site.raw, prefix);
  if (site.kind != kNone && std::strcmp(prefix, "cell") != 0) r.require(site.grad, prefix);
}

const char* kForwardCapsule = "rnorm.fused_step.forward";
const char* kBackwardCapsule = "rnorm.fused_step.backward";

struct Plan {  // what a capsule holds: the element size, the number of steps and the typed plan
  int itemsize;
  long num_steps;
  void* typed;
};

template <typename P>
void destroy(PyObject* capsule, const char* name) {
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, name));
  if (!plan) return;
  delete static_cast<P*>(plan->typed);
  delete plan;
}

void destroy_forward(PyObject* capsule) {
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, kForwardCapsule));
  if (plan && plan->itemsize == 4) destroy<ForwardPlan<float>>(capsule, kForwardCapsule);
  else if (plan) destroy<ForwardPlan<double>>(capsule, kForwardCapsule);
}

void destroy_backward(PyObject* capsule) {
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, kBackwardCapsule));
  if (plan && plan->itemsize == 4) destroy<BackwardPlan<float>>(capsule, kBackwardCapsule);
  else if (plan) destroy<BackwardPlan<double>>(capsule, kBackwardCapsule);
}

template <typename T>
void* read_forward(Reader& r) {
  std::unique_ptr<ForwardPlan<T>> owner(new ForwardPlan<T>());
  ForwardPlan<T>* p = owner.get();
  p->batch = r.integer("batch");
  p->hidden = r.integer("hidden");
  p->save = r.integer("save") != 0;
  p->base = static_cast<int>(r.integer("base"));
  p->z = r.pointer<T>("z");
  p->given = r.pointer<const T>("given");
  p->shift = r.pointer<const T>("shift");
  p->shift_step = r.integer("shift_step");
  read_site(r, "input", p->input);
  read_site(r, "recurrent", p->recurrent);
  read_site(r, "cell", p->cell);
  p->cell_shift = r.pointer<const T>("cell_shift");
  p->cell_shift_step = r.integer("cell_shift_step");
  p->act = r.pointer<T>("act");
  p->tanh_cell = r.pointer<T>("tanh_cell");
  p->cell_new = r.pointer<T>("cell_new");
  p->states_h = r.pointer<T>("states_h");
  p->states_c = r.pointer<T>("states_c");
  p->output = r.pointer<T>("output");
  p->probe = r.pointer<const T>("probe");
  p->hidden_scale = r.pointer<const T>("hidden_scale");
  p->hidden_scale_step = r.integer("hidden_scale_step");
  p->mask = r.pointer<const T>("mask");
  p->weights = r.pointer<const T>("weights");
  p->weights_step = r.integer("weights_step");
  for (const void* needed : {static_cast<const void*>(p->act), static_cast<const void*>(p->tanh_cell),
                             static_cast<const void*>(p->states_h), static_cast<const void*>(p->states_c),
                             static_cast<const void*>(p->weights)})
    r.require(needed, "a state, activation or weights buffer");
  if (p->base == kBaseBuffer) r.require(p->z, "z");
  if (p->base == kBaseGiven) r.require(p->given, "given");
  if (p->batch <= 0 || p->hidden <= 0) r.require(nullptr, "a positive batch and hidden size");
  if (!r.failed) {
    p->hidden_row = spread(p->hidden_scale, p->hidden_scale_step, p->hidden);
    p->zrow.resize(4 * p->hidden);
    p->chat.resize(p->batch * p->hidden);
  }
  return owner.release();
}

template <typename T>
void* read_backward(Reader& r) {
  std::unique_ptr<BackwardPlan<T>> owner(new BackwardPlan<T>());
  BackwardPlan<T>* p = owner.get();
  p->batch = r.integer("batch");
  p->hidden = r.integer("hidden");
  p->grad_output = r.pointer<const T>("grad_output");
  p->dh = r.pointer<T>("dh");
  p->dc = r.pointer<T>("dc");
  p->mask = r.pointer<const T>("mask");
  p->weights = r.pointer<const T>("weights");
  p->weights_step = r.integer("weights_step");
  p->act = r.pointer<const T>("act");
  p->tanh_cell = r.pointer<const T>("tanh_cell");
  p->states_c = r.pointer<const T>("states_c");
  p->chat_factor = static_cast<T>(r.real("chat_factor"));
  p->scale_chat = r.integer("scale_chat") != 0;
  p->hidden_scale = r.pointer<const T>("hidden_scale");
  p->hidden_scale_step = r.integer("hidden_scale_step");
  p->grad_chat = r.pointer<T>("grad_chat");
  p->grad_probe = r.pointer<T>("grad_probe");
  p->grad_z = r.pointer<T>("grad_z");
  read_back_site(r, "input", p->input);
  read_back_site(r, "recurrent", p->recurrent);
  read_back_site(r, "cell", p->cell);
  for (const void* needed : {static_cast<const void*>(p->grad_output), static_cast<const void*>(p->dh),
                             static_cast<const void*>(p->dc), static_cast<const void*>(p->act),
                             static_cast<const void*>(p->tanh_cell), static_cast<const void*>(p->states_c),
                             static_cast<const void*>(p->grad_z), static_cast<const void*>(p->weights)})
    r.require(needed, "a gradient, state, activation or weights buffer");
  if (p->batch <= 0 || p->hidden <= 0) r.require(nullptr, "a positive batch and hidden size");
  if (!r.failed) {
    p->hidden_row = spread(p->hidden_scale, p->hidden_scale_step, p->hidden);
    const size_t n = static_cast<size_t>(p->batch * p->hidden);
    p->dh_new.resize(n);
    p->d_chat.resize(n);
    p->d_cell.resize(n);
    p->coef.resize(4 * p->hidden);
  }
  return owner.release();
}

PyObject* make_plan(PyObject* dict, const char* name, PyCapsule_Destructor destructor, void* (*read4)(Reader&),
                    void* (*read8)(Reader&)) {
  if (!PyDict_Check(dict)) {
    PyErr_SetString(PyExc_TypeError, "fused step plan: expected a dict");
    return nullptr;
  }
  Reader r{dict};
  const long itemsize = r.integer("itemsize");
  if (r.failed) return nullptr;
  if (itemsize != 4 && itemsize != 8) {
    PyErr_Format(PyExc_ValueError, "fused step plan: itemsize must be 4 (float32) or 8 (float64), got %ld", itemsize);
    return nullptr;
  }
  const long num_steps = r.integer("num_steps");
  if (r.failed) return nullptr;
  Plan* plan = new (std::nothrow) Plan{static_cast<int>(itemsize), num_steps, nullptr};
  if (!plan) return PyErr_NoMemory();
  PyObject* capsule = PyCapsule_New(plan, name, destructor);  // owns the plan from here on
  if (!capsule) {
    delete plan;
    return nullptr;
  }
  try {
    plan->typed = itemsize == 4 ? read4(r) : read8(r);
  } catch (const std::bad_alloc&) {
    Py_DECREF(capsule);
    return PyErr_NoMemory();
  }
  if (r.failed) {
    Py_DECREF(capsule);
    return nullptr;
  }
  return capsule;
}

PyObject* forward_plan(PyObject*, PyObject* dict) {
  return make_plan(dict, kForwardCapsule, destroy_forward, read_forward<float>, read_forward<double>);
}

PyObject* backward_plan(PyObject*, PyObject* dict) {
  return make_plan(dict, kBackwardCapsule, destroy_backward, read_backward<float>, read_backward<double>);
}

// step(plan, t), 0 <= t < T; the caller keeps the plan's tensors alive.
bool check_step(const Plan* plan, long t) {
  if (t >= 0 && t < plan->num_steps) return true;
  if (!PyErr_Occurred()) PyErr_Format(PyExc_IndexError, "step %ld out of range for a plan of %ld steps", t, plan->num_steps);
  return false;
}

PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "forward(plan, t) takes 2 arguments");
    return nullptr;
  }
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(args[0], kForwardCapsule));
  if (!plan) return nullptr;
  const long t = PyLong_AsLong(args[1]);
  if (!check_step(plan, t)) return nullptr;
  Py_BEGIN_ALLOW_THREADS;  // plain arithmetic on the plan's buffers: other Python threads may run
  if (plan->itemsize == 4) forward_f32(*static_cast<ForwardPlan<float>*>(plan->typed), t);
  else forward_f64(*static_cast<ForwardPlan<double>*>(plan->typed), t);
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

PyObject* backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "backward(plan, t) takes 2 arguments");
    return nullptr;
  }
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(args[0], kBackwardCapsule));
  if (!plan) return nullptr;
  const long t = PyLong_AsLong(args[1]);
  if (!check_step(plan, t)) return nullptr;
  Py_BEGIN_ALLOW_THREADS;
  if (plan->itemsize == 4) backward_f32(*static_cast<BackwardPlan<float>*>(plan->typed), t);
  else backward_f64(*static_cast<BackwardPlan<double>*>(plan->typed), t);
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"forward_plan", forward_plan, METH_O, "A forward plan from a dict of pointers, sizes and kinds (see rnorm/nn/fused.py)."},
    {"backward_plan", backward_plan, METH_O, "A backward plan from a dict of pointers, sizes and kinds."},
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(forward)), METH_FASTCALL,
     "forward(plan, t): step t of the forward loop."},
    {"backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(backward)), METH_FASTCALL,
     "backward(plan, t): step t of the backward loop, before the recurrent GEMM."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_step", "Per-step CPU kernels of rnorm's fused LSTM recurrence.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

#ifndef RNORM_SOURCE_SHA
#define RNORM_SOURCE_SHA "unknown"
#endif

PyMODINIT_FUNC PyInit__fused_step(void) {
  PyObject* m = PyModule_Create(&module);
  if (m && PyModule_AddStringConstant(m, "SOURCE_SHA", RNORM_SOURCE_SHA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
