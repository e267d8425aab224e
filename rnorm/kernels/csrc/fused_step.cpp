// The per-step elementwise work of rnorm's fused LSTM recurrence on CPU (rnorm.kernels._fused_step).
//
// rnorm/kernels/native.py runs the time loop. At every step it does the GEMMs with torch (W_x x_t
// and W_h h_{t-1}, into buffers) and calls this module once; everything between the GEMMs happens
// here in a few passes over (B, 4H): batch or layer statistics of the input and recurrent terms,
// their normalization, the gates, the cell, the cell's normalization and the output, padding
// (docs/fused_backward.md eq. 4-11). The backward step does the same for the hand-derived
// derivatives (eq. 11-16), up to the recurrent GEMM. rnorm/kernels/torch_loop.py computes the same
// function with torch operations; tests/kernels/ compare both with the reference loop.
//
// No torch headers, so it builds with any C++17 compiler in seconds, without torch at build time.
// Tensors cross as DLPack capsules (see "The checked boundary" below): a plan is made once per layer
// call from an object holding its named buffers, every buffer checked against the plan's sizes and
// kinds; each step is then one call with the step index.
//
// Conventions: rows are samples b < B, columns features j < F, row-major. "z-space": the g block's
// pre-activation is doubled by the caller (in the weights or scales), so that sigmoid(z) gives every
// gate and tanh(g) = 2 sigmoid(2g) - 1; the cell site's scale and shift are doubled for the output
// tanh in the same way (eq. 1-3).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <new>
#include <string>
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

  // -- gates (eq. 4-5; BN eq. 6, NP eq. 15), in z-space; one sigmoid gives all four ------------
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

  // -- cell (eq. 6) ----------------------------------------------------------------------------
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

  // -- the cell site and the output (eq. 7-8; NP eq. 17); chat holds 2 c-hat -------------------
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
    // -- padding (eq. 11): an ended sequence keeps its state and outputs 0 --------------------
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

// du of y = gamma x-hat for batch (per column) statistics (eq. 13); dy, xhat, du (B, F); writes the
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

// The same for layer (per row) statistics (eq. 14); adds sum_b dy x-hat (gamma's gradient) to gamma_grad (F,).
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
  T chat_factor = 1;            // on d loss / d(2 c-hat): 1/2 where a cell site works on 2 c-hat (eq. 12)
  bool scale_chat = false;      // chat_factor != 1 or a Norm-Prop scale on h (hidden_row)
  const T* hidden_scale = nullptr;
  long hidden_scale_step = 0;
  T* grad_chat = nullptr;   // (T, B, H) or null
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

  // -- padding (eq. 11') and through h = o tanh(c-hat) (eq. 12) -------------------------------
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

  // -- through the cell site (eq. 13-14 for normalizing kinds) -------------------------------
  const T* dcell = dchat;
  if (p.cell.kind != kNone) {
    p.cell.backward(t, dchat, w, m, B, H, p.d_cell.data(), p.coef.data());
    dcell = p.d_cell.data();
  }

  // -- through the gates (eq. 15; z-space: the g block's d tanh(z/2) / dz = (1 - g^2) / 2) -----
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

  // -- through the input and recurrent sites (the caller adds dr @ W_h to dh: eq. 16) -----------
  if (p.input.kind != kNone) p.input.backward(t, dz, w, m, B, G, p.input.grad + t * B * G, p.coef.data());
  if (p.recurrent.kind != kNone) p.recurrent.backward(t, dz, w, m, B, G, p.recurrent.grad + t * B * G, p.coef.data());
}

// The entry points, one per dtype, each compiled for every target of RNORM_CLONES.
RNORM_CLONES void forward_f32(ForwardPlan<float>& p, long t) { forward_step(p, t); }
RNORM_CLONES void forward_f64(ForwardPlan<double>& p, long t) { forward_step(p, t); }
RNORM_CLONES void backward_f32(BackwardPlan<float>& p, long t) { backward_step(p, t); }
RNORM_CLONES void backward_f64(BackwardPlan<double>& p, long t) { backward_step(p, t); }

// ---------------------------------------------------------------------------------------------
// Floating-point environment: denormals. Gradients that fade over hundreds of steps become
// denormal floats, which x86 handles many times slower than normal ones (microcode assists). The
// Python side flushes them to zero for the duration of a time loop (rnorm.kernels.native) and
// restores the caller's mode after: numbers above the denormal range do not change.

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
constexpr unsigned kFlushBits = 0x8040;  // MXCSR: FTZ (bit 15) and DAZ (bit 6)
unsigned read_fp_mode() { return _mm_getcsr(); }
void write_fp_mode(unsigned mode) { _mm_setcsr(mode); }
constexpr bool kCanFlush = true;
#elif defined(__aarch64__)
constexpr unsigned kFlushBits = 1u << 24;  // FPCR: FZ
unsigned read_fp_mode() {
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  return static_cast<unsigned>(fpcr);
}
void write_fp_mode(unsigned mode) {
  uint64_t fpcr = mode;
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
constexpr bool kCanFlush = true;
#else
constexpr unsigned kFlushBits = 0;
unsigned read_fp_mode() { return 0; }
void write_fp_mode(unsigned) {}
constexpr bool kCanFlush = false;
#endif

// flush_denormals(on) -> the previous flush bits (restore with restore_denormals).
PyObject* flush_denormals(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const unsigned mode = read_fp_mode();
  write_fp_mode(on ? (mode | kFlushBits) : (mode & ~kFlushBits));
  return PyLong_FromUnsignedLong(mode & kFlushBits);
}

PyObject* restore_denormals(PyObject*, PyObject* arg) {
  const unsigned long bits = PyLong_AsUnsignedLong(arg);
  if (PyErr_Occurred()) return nullptr;
  write_fp_mode((read_fp_mode() & ~kFlushBits) | (static_cast<unsigned>(bits) & kFlushBits));
  Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------------
// The checked boundary. Python hands over a plan's buffers as the fields of one object (a
// dataclass of rnorm.kernels.native); each tensor crosses as a DLPack capsule (Tensor.__dlpack__),
// so its data pointer comes with torch's own record of its dtype, device, shape and strides. Every
// buffer is checked against the shape the plan's sizes and kinds give it, before any step runs and
// while the GIL is held; the plan keeps the capsules, and with them the memory, alive.

struct DLDevice {  // the DLPack standard's structs (dlpack.h), unversioned ABI: capsule "dltensor"
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCPU = 1;
constexpr uint8_t kDLFloat = 2;

// The fields a plan reads, by name: rnorm.kernels.native's ForwardBuffers and BackwardBuffers have
// exactly these (tests/kernels/test_native.py checks it).
const char* const kForwardBuffers[] = {
    "z", "given", "shift", "cell_shift", "act", "tanh_cell", "cell_new", "states_h", "states_c", "output",
    "hidden_scale", "mask", "weights", "input_u", "input_scale", "input_rstd", "input_mean", "input_var",
    "recurrent_u", "recurrent_scale", "recurrent_rstd", "recurrent_mean", "recurrent_var", "cell_u", "cell_scale",
    "cell_rstd", "cell_mean", "cell_var"};
const char* const kBackwardBuffers[] = {
    "grad_output", "dh", "dc", "mask", "weights", "act", "tanh_cell", "states_c", "hidden_scale", "grad_chat",
    "grad_z", "input_norm", "input_rstd", "input_scale", "input_sum_dy", "input_sum_dy_xhat", "input_gamma_grad",
    "input_raw", "input_scale_rows", "input_grad", "recurrent_norm", "recurrent_rstd", "recurrent_scale",
    "recurrent_sum_dy", "recurrent_sum_dy_xhat", "recurrent_gamma_grad", "recurrent_raw", "recurrent_scale_rows",
    "recurrent_grad", "cell_norm", "cell_rstd", "cell_scale", "cell_sum_dy", "cell_sum_dy_xhat", "cell_gamma_grad"};

// One dimension of an expected shape: a size, or either of two (a per-step table of 1 or T rows).
struct Dim {
  long size;
  long other = -1;
  Dim(long s) : size(s) {}  // NOLINT: implicit, so that shapes read {B, H}
  Dim(long s, long o) : size(s), other(o) {}
  bool matches(long v) const { return v == size || (other >= 0 && v == other); }
};

struct Capsules {  // owned references, released with the plan (the GIL is held then)
  std::vector<PyObject*> items;
  ~Capsules() {
    for (PyObject* item : items) Py_DECREF(item);
  }
};

class Binder {
 public:
  Binder(PyObject* buffers, const char* plan, const char* const* names, size_t count, Capsules* keep)
      : buffers_(buffers), plan_(plan), names_(names), count_(count), keep_(keep) {}

  bool failed = false;
  int itemsize = 0;  // of the plan's dtype: 4 or 8

  // The buffer `name` as a T*, or null where it is None and not required; fails the plan on any
  // mismatch. `rows`, if given, receives the first dimension's size.
  template <typename T>
  T* get(const char* name, std::initializer_list<Dim> shape, bool required, long* rows = nullptr) {
    if (failed) return nullptr;
    if (!known(name)) return fail<T>(PyExc_SystemError, "%s plan: '%s' is not one of its buffers", name);
    PyObject* value = PyObject_GetAttrString(buffers_, name);
    if (!value) {
      failed = true;
      return nullptr;
    }
    if (value == Py_None) {
      Py_DECREF(value);
      if (required) return fail<T>(PyExc_ValueError, "%s plan: buffer '%s' is required by the plan's kinds but is None", name);
      return nullptr;
    }
    PyObject* capsule = PyObject_CallMethod(value, "__dlpack__", nullptr);
    Py_DECREF(value);
    if (!capsule) {
      failed = true;
      return nullptr;
    }
    keep_->items.push_back(capsule);
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (!managed) {
      failed = true;
      return nullptr;
    }
    const DLTensor& t = managed->dl_tensor;
    if (t.device.device_type != kDLCPU) return fail<T>(PyExc_ValueError, "%s plan: buffer '%s' is not on the CPU", name);
    if (t.dtype.code != kDLFloat || t.dtype.lanes != 1 || t.dtype.bits != 8 * sizeof(T))
      return fail<T>(PyExc_ValueError, "%s plan: buffer '%s' is not of the plan's dtype (float%d)", name,
                     static_cast<int>(8 * sizeof(T)));
    bool ok = t.ndim == static_cast<int32_t>(shape.size());
    long expected_stride = 1;
    for (int d = static_cast<int>(shape.size()) - 1; ok && d >= 0; --d) {
      const long size = static_cast<long>(t.shape[d]);
      ok = shape.begin()[d].matches(size);
      // row-major and compact; the stride of a dimension of size 1 does not matter
      if (ok && t.strides && size > 1) ok = t.strides[d] == expected_stride;
      expected_stride *= size;
    }
    if (!ok) return mismatch<T>(name, t, shape);
    if (rows) *rows = shape.size() ? static_cast<long>(t.shape[0]) : 1;
    return reinterpret_cast<T*>(static_cast<char*>(t.data) + t.byte_offset);
  }

  // Reads a buffer's element size (float32 or float64) to choose the plan's type.
  bool probe_itemsize(const char* name) {
    PyObject* value = PyObject_GetAttrString(buffers_, name);
    if (!value) return false;
    PyObject* capsule = value == Py_None ? nullptr : PyObject_CallMethod(value, "__dlpack__", nullptr);
    Py_DECREF(value);
    if (!capsule) {
      if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s plan: buffer '%s' is required but is None", plan_, name);
      return false;
    }
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    const bool ok = managed && managed->dl_tensor.dtype.code == kDLFloat &&
                    (managed->dl_tensor.dtype.bits == 32 || managed->dl_tensor.dtype.bits == 64);
    if (ok) itemsize = managed->dl_tensor.dtype.bits / 8;
    Py_DECREF(capsule);
    if (!ok && !PyErr_Occurred())
      PyErr_Format(PyExc_ValueError, "%s plan: buffer '%s' must be float32 or float64", plan_, name);
    return ok;
  }

 private:
  bool known(const char* name) const {
    for (size_t i = 0; i < count_; ++i)
      if (std::strcmp(names_[i], name) == 0) return true;
    return false;
  }

  template <typename T>
  T* fail(PyObject* type, const char* format, const char* name, int extra = 0) {
    PyErr_Format(type, format, plan_, name, extra);
    failed = true;
    return nullptr;
  }

  template <typename T>
  T* mismatch(const char* name, const DLTensor& t, std::initializer_list<Dim> shape) {
    bool shape_ok = t.ndim == static_cast<int32_t>(shape.size());
    for (int d = 0; shape_ok && d < t.ndim; ++d) shape_ok = shape.begin()[d].matches(static_cast<long>(t.shape[d]));
    if (shape_ok) {
      PyErr_Format(PyExc_ValueError, "%s plan: buffer '%s' is not contiguous (row-major)", plan_, name);
    } else {
      std::string got = "(", want = "(";
      for (int d = 0; d < t.ndim; ++d) got += (d ? ", " : "") + std::to_string(t.shape[d]);
      size_t d = 0;
      for (const Dim& dim : shape) {
        want += (d++ ? ", " : "") + std::to_string(dim.size);
        if (dim.other >= 0 && dim.other != dim.size) want += " or " + std::to_string(dim.other);
      }
      got += t.ndim == 1 ? ",)" : ")";
      want += shape.size() == 1 ? ",)" : ")";
      PyErr_Format(PyExc_ValueError, "%s plan: buffer '%s' has shape %s, but the plan's sizes and kinds need %s", plan_,
                   name, got.c_str(), want.c_str());
    }
    failed = true;
    return nullptr;
  }

  PyObject* buffers_;
  const char* plan_;
  const char* const* names_;
  size_t count_;
  Capsules* keep_;
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
void bind_site(Binder& r, const char* prefix, Site<T>& site, int kind, double eps, long saved, long steps, long B, long F,
               bool is_cell) {
  site.kind = kind;
  site.eps = static_cast<T>(eps);
  if (kind == kNone) return;
  const std::string p(prefix);
  const bool normalizing = kind == kBatch || per_row(kind);
  long rows = 1;
  // An affine cell site reads c_t itself; every other non-identity site writes its term into u.
  site.u = r.get<T>((p + "_u").c_str(), {saved, B, F}, normalizing || !is_cell);
  site.u_step = B * F;
  site.scale = r.get<const T>((p + "_scale").c_str(), {Dim(1, steps), F}, true, &rows);
  site.scale_step = rows > 1 ? F : 0;
  if (normalizing) {
    if (kind == kBatch) {
      site.rstd = r.get<T>((p + "_rstd").c_str(), {saved, 1, F}, true);
      site.rstd_step = F;
      site.mean = r.get<T>((p + "_mean").c_str(), {steps, 1, F}, true);
      site.var = r.get<T>((p + "_var").c_str(), {steps, 1, F}, true);
    } else {
      site.rstd = r.get<T>((p + "_rstd").c_str(), {saved, B, 1}, true);
      site.rstd_step = B;
    }
  }
}

template <typename T>
void bind_back_site(Binder& r, const char* prefix, BackSite<T>& site, int kind, long steps, long B, long F, bool is_cell) {
  site.kind = kind;
  if (kind == kNone) return;
  const std::string p(prefix);
  long rows = 1;
  site.scale = r.get<const T>((p + "_scale").c_str(), {Dim(1, steps), F}, true, &rows);
  site.scale_step = rows > 1 ? F : 0;
  if (kind == kBatch || per_row(kind)) {
    site.norm = r.get<const T>((p + "_norm").c_str(), {steps, B, F}, true);
    if (kind == kBatch) {
      site.rstd = r.get<const T>((p + "_rstd").c_str(), {steps, 1, F}, true);
      site.rstd_step = F;
      site.sum_dy = r.get<T>((p + "_sum_dy").c_str(), {steps, 1, F}, true);
      site.sum_dy_xhat = r.get<T>((p + "_sum_dy_xhat").c_str(), {steps, 1, F}, true);
    } else {
      site.rstd = r.get<const T>((p + "_rstd").c_str(), {steps, B, 1}, true);
      site.rstd_step = B;
      site.gamma_grad = r.get<T>((p + "_gamma_grad").c_str(), {F}, true);
    }
  }
  if (kind == kAffine && !is_cell) {
    site.scale_rows = r.get<T>((p + "_scale_rows").c_str(), {steps, F}, false);
    site.raw = r.get<const T>((p + "_raw").c_str(), {steps, B, F}, site.scale_rows != nullptr);
  }
  if (!is_cell) site.grad = r.get<T>((p + "_grad").c_str(), {steps, B, F}, true);
}

const char* kForwardCapsule = "rnorm.fused_step.forward";
const char* kBackwardCapsule = "rnorm.fused_step.backward";

struct Plan {  // what a capsule holds: the element size, the number of steps, the typed plan and its buffers
  int itemsize;
  long num_steps;
  void* typed;
  Capsules buffers;
};

template <typename P>
void destroy_typed(Plan* plan) {
  delete static_cast<P*>(plan->typed);
  delete plan;
}

void destroy_forward(PyObject* capsule) {
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, kForwardCapsule));
  if (plan && plan->itemsize == 4) destroy_typed<ForwardPlan<float>>(plan);
  else if (plan) destroy_typed<ForwardPlan<double>>(plan);
}

void destroy_backward(PyObject* capsule) {
  Plan* plan = static_cast<Plan*>(PyCapsule_GetPointer(capsule, kBackwardCapsule));
  if (plan && plan->itemsize == 4) destroy_typed<BackwardPlan<float>>(plan);
  else if (plan) destroy_typed<BackwardPlan<double>>(plan);
}

struct Config {  // the sizes and kinds every buffer is checked against
  long steps = 0, batch = 0, hidden = 0;
  int save = 0, given = 0;
  int kinds[3] = {0, 0, 0};
  double eps[3] = {0, 0, 0};
};

template <typename T>
void* bind_forward(Binder& r, const Config& c) {
  std::unique_ptr<ForwardPlan<T>> owner(new ForwardPlan<T>());
  ForwardPlan<T>* p = owner.get();
  const long steps = c.steps, B = c.batch, H = c.hidden, G = 4 * H;
  const long saved = c.save ? steps : 1, states = c.save ? steps + 1 : 2;
  p->batch = B;
  p->hidden = H;
  p->save = c.save != 0;
  // What z starts from: the identity sites' GEMMs land in z, else the given input terms, else 0.
  const bool identity_term = (!c.given && c.kinds[0] == kNone) || c.kinds[1] == kNone;
  p->base = identity_term ? kBaseBuffer : (c.given ? kBaseGiven : kBaseZero);
  long rows = 1;
  p->z = r.get<T>("z", {B, G}, p->base == kBaseBuffer);
  p->given = r.get<const T>("given", {steps, B, G}, c.given != 0);
  p->shift = r.get<const T>("shift", {Dim(1, steps), G}, false, &rows);
  p->shift_step = rows > 1 ? G : 0;
  bind_site(r, "input", p->input, c.given ? static_cast<int>(kNone) : c.kinds[0], c.eps[0], saved, steps, B, G, false);
  bind_site(r, "recurrent", p->recurrent, c.kinds[1], c.eps[1], saved, steps, B, G, false);
  bind_site(r, "cell", p->cell, c.kinds[2], c.eps[2], saved, steps, B, H, true);
  p->cell_shift = r.get<const T>("cell_shift", {Dim(1, steps), H}, false, &rows);
  p->cell_shift_step = rows > 1 ? H : 0;
  p->act = r.get<T>("act", {saved, B, G}, true);
  p->tanh_cell = r.get<T>("tanh_cell", {saved, B, H}, true);
  p->cell_new = r.get<T>("cell_new", {saved, B, H}, false);
  p->states_h = r.get<T>("states_h", {states, B, H}, true);
  p->states_c = r.get<T>("states_c", {states, B, H}, true);
  p->output = r.get<T>("output", {steps, B, H}, !c.save);  // without saving, the states are two rows
  p->hidden_scale = r.get<const T>("hidden_scale", {Dim(1, H)}, false, &rows);
  p->hidden_scale_step = rows > 1 ? 1 : 0;
  p->mask = r.get<const T>("mask", {steps, B}, false);
  p->weights = r.get<const T>("weights", {Dim(1, steps), B}, true, &rows);
  p->weights_step = rows > 1 ? B : 0;
  if (r.failed) return nullptr;
  p->hidden_row = spread(p->hidden_scale, p->hidden_scale_step, H);
  p->zrow.resize(G);
  p->chat.resize(B * H);
  return owner.release();
}

template <typename T>
void* bind_backward(Binder& r, const Config& c) {
  std::unique_ptr<BackwardPlan<T>> owner(new BackwardPlan<T>());
  BackwardPlan<T>* p = owner.get();
  const long steps = c.steps, B = c.batch, H = c.hidden, G = 4 * H;
  p->batch = B;
  p->hidden = H;
  long rows = 1;
  p->grad_output = r.get<const T>("grad_output", {steps, B, H}, true);
  p->dh = r.get<T>("dh", {B, H}, true);
  p->dc = r.get<T>("dc", {B, H}, true);
  p->mask = r.get<const T>("mask", {steps, B}, false);
  p->weights = r.get<const T>("weights", {Dim(1, steps), B}, true, &rows);
  p->weights_step = rows > 1 ? B : 0;
  p->act = r.get<const T>("act", {steps, B, G}, true);
  p->tanh_cell = r.get<const T>("tanh_cell", {steps, B, H}, true);
  p->states_c = r.get<const T>("states_c", {steps + 1, B, H}, true);
  p->hidden_scale = r.get<const T>("hidden_scale", {Dim(1, H)}, false, &rows);
  p->hidden_scale_step = rows > 1 ? 1 : 0;
  p->grad_chat = r.get<T>("grad_chat", {steps, B, H}, false);
  p->grad_z = r.get<T>("grad_z", {steps, B, G}, true);
  bind_back_site(r, "input", p->input, c.kinds[0], steps, B, G, false);
  bind_back_site(r, "recurrent", p->recurrent, c.kinds[1], steps, B, G, false);
  bind_back_site(r, "cell", p->cell, c.kinds[2], steps, B, H, true);
  if (r.failed) return nullptr;
  // On d loss / d(2 c-hat): 1/2 for a cell site, which works on 2 c-hat; Norm-Prop's scale on h.
  p->chat_factor = c.kinds[2] == kNone ? T(1) : T(0.5);
  p->scale_chat = p->hidden_scale != nullptr || c.kinds[2] != kNone;
  p->hidden_row = spread(p->hidden_scale, p->hidden_scale_step, H);
  const size_t n = static_cast<size_t>(B * H);
  p->dh_new.resize(n);
  p->d_chat.resize(n);
  p->d_cell.resize(n);
  p->coef.resize(G);
  return owner.release();
}

bool check_config(const Config& c, const char* plan) {
  if (c.steps < 1 || c.batch < 1 || c.hidden < 1) {
    PyErr_Format(PyExc_ValueError, "%s plan: steps, batch and hidden must be positive, got %ld, %ld, %ld", plan, c.steps,
                 c.batch, c.hidden);
    return false;
  }
  for (int kind : c.kinds) {
    if (kind < kNone || kind > kRms) {
      PyErr_Format(PyExc_ValueError, "%s plan: unknown kind %d (known: 0 to %d)", plan, kind, static_cast<int>(kRms));
      return false;
    }
  }
  return true;
}

PyObject* make_plan(PyObject* buffers, const Config& config, const char* plan_name, const char* capsule_name,
                    const char* const* names, size_t count, PyCapsule_Destructor destructor,
                    void* (*bind4)(Binder&, const Config&), void* (*bind8)(Binder&, const Config&)) {
  if (!check_config(config, plan_name)) return nullptr;
  Plan* plan = new (std::nothrow) Plan{0, config.steps, nullptr, {}};
  if (!plan) return PyErr_NoMemory();
  Binder binder(buffers, plan_name, names, count, &plan->buffers);
  if (!binder.probe_itemsize("act")) {
    delete plan;
    return nullptr;
  }
  plan->itemsize = binder.itemsize;
  PyObject* capsule = PyCapsule_New(plan, capsule_name, destructor);  // owns the plan from here on
  if (!capsule) {
    delete plan;
    return nullptr;
  }
  try {
    plan->typed = binder.itemsize == 4 ? bind4(binder, config) : bind8(binder, config);
  } catch (const std::bad_alloc&) {
    Py_DECREF(capsule);
    return PyErr_NoMemory();
  }
  if (binder.failed || !plan->typed) {  // the error is set; the capsule releases what was bound
    Py_DECREF(capsule);
    return nullptr;
  }
  return capsule;
}

// forward_plan(buffers, steps, batch, hidden, save, given, (kinds), (eps)) -> capsule
PyObject* forward_plan(PyObject*, PyObject* args) {
  PyObject* buffers;
  Config c;
  if (!PyArg_ParseTuple(args, "Olllpp(iii)(ddd):forward_plan", &buffers, &c.steps, &c.batch, &c.hidden, &c.save, &c.given,
                        &c.kinds[0], &c.kinds[1], &c.kinds[2], &c.eps[0], &c.eps[1], &c.eps[2]))
    return nullptr;
  return make_plan(buffers, c, "forward", kForwardCapsule, kForwardBuffers, std::size(kForwardBuffers), destroy_forward,
                   bind_forward<float>, bind_forward<double>);
}

// backward_plan(buffers, steps, batch, hidden, (kinds)) -> capsule
PyObject* backward_plan(PyObject*, PyObject* args) {
  PyObject* buffers;
  Config c;
  if (!PyArg_ParseTuple(args, "Olll(iii):backward_plan", &buffers, &c.steps, &c.batch, &c.hidden, &c.kinds[0], &c.kinds[1],
                        &c.kinds[2]))
    return nullptr;
  c.save = 1;
  return make_plan(buffers, c, "backward", kBackwardCapsule, kBackwardBuffers, std::size(kBackwardBuffers),
                   destroy_backward, bind_backward<float>, bind_backward<double>);
}

// step(plan, t), 0 <= t < T: the plan holds its buffers, checked when it was made.
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
  Py_BEGIN_ALLOW_THREADS;  // plain arithmetic on the plan's own (checked, kept alive) buffers
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
    {"forward_plan", forward_plan, METH_VARARGS,
     "forward_plan(buffers, steps, batch, hidden, save, given, kinds, eps): a forward plan; every buffer checked."},
    {"backward_plan", backward_plan, METH_VARARGS,
     "backward_plan(buffers, steps, batch, hidden, kinds): a backward plan; every buffer checked."},
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(forward)), METH_FASTCALL,
     "forward(plan, t): step t of the forward loop, after its GEMMs."},
    {"backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(backward)), METH_FASTCALL,
     "backward(plan, t): step t of the backward loop, before the recurrent GEMM."},
    {"flush_denormals", flush_denormals, METH_O,
     "flush_denormals(on) -> previous mode: flush denormals to zero in this thread (or stop)."},
    {"restore_denormals", restore_denormals, METH_O, "restore_denormals(mode): the mode flush_denormals returned."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_step", "Per-step CPU kernels of rnorm's fused LSTM recurrence.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

PyObject* names_tuple(const char* const* names, size_t count) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(count));
  if (!tuple) return nullptr;
  for (size_t i = 0; i < count; ++i) {
    PyObject* name = PyUnicode_FromString(names[i]);
    if (!name) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), name);
  }
  return tuple;
}

}  // namespace

#ifndef RNORM_SOURCE_SHA
#define RNORM_SOURCE_SHA "unknown"
#endif

PyMODINIT_FUNC PyInit__fused_step(void) {
  PyObject* m = PyModule_Create(&module);
  if (!m) return nullptr;
  PyObject* forward_names = names_tuple(kForwardBuffers, std::size(kForwardBuffers));
  PyObject* backward_names = names_tuple(kBackwardBuffers, std::size(kBackwardBuffers));
  PyObject* kinds = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i}", "identity", static_cast<int>(kNone), "affine",
                                  static_cast<int>(kAffine), "batch", static_cast<int>(kBatch), "layer",
                                  static_cast<int>(kLayer), "rms", static_cast<int>(kRms));
  if (!forward_names || !backward_names || !kinds || PyModule_AddObject(m, "FORWARD_BUFFERS", forward_names) < 0 ||
      PyModule_AddObject(m, "BACKWARD_BUFFERS", backward_names) < 0 || PyModule_AddObject(m, "KINDS", kinds) < 0 ||
      PyModule_AddStringConstant(m, "SOURCE_SHA", RNORM_SOURCE_SHA) < 0 ||
      PyModule_AddIntConstant(m, "CAN_FLUSH_DENORMALS", kCanFlush ? 1 : 0) < 0) {
    Py_XDECREF(forward_names);
    Py_XDECREF(backward_names);
    Py_XDECREF(kinds);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
