// C++ CPU fast path of eidetic (loaded by eidetic_kernels/cpp.py): the batch norm with per-channel
// task state, a memory-bound op. Statistics of FREE channels and the normalisation take two passes
// over x (one read for the statistics, one read + write for y); the backward two passes (one read of
// x and dy for Σdy and Σdy·(x-mean), one for dx); the Taylor score falls out of the same sums.
// (A fused backward epilogue for linear/conv - dW for FREE rows only, bias gradient and Taylor score
// in one pass - was measured too and removed: the ATen matrix products dominate and it did not win.)
//
// Tensors are viewed as [N, C, L] (L = product of the spatial dims, 1 for [N, C]). Work is split
// over channel blocks only, and every channel is reduced in a fixed order by one thread, so results
// do not depend on the thread count (frozen outputs stay bit-stable).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int16_t kFree = 32767;
constexpr int16_t kPruned = -1;

using OptTensor = std::optional<at::Tensor>;

bool is_frozen(int16_t task) { return task >= 0 && task < kFree; }

// Reductions accumulate in double (as accurate as torch's, vectorised by `omp simd` in a fixed
// lane order, so they are deterministic).

// s1 += Σ (a - shift), s2 += Σ (a - shift)²
template <typename T>
inline void shifted_sums(const T* a, int64_t n, T shift, double& s1, double& s2) {
  double t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(shift);
    t1 += d;
    t2 += d * d;
  }
  s1 += t1;
  s2 += t2;
}

// s1 += Σ g, s2 += Σ g·(a - shift)
template <typename T>
inline void grad_sums(const T* g, const T* a, int64_t n, T shift, double& s1, double& s2) {
  double t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
  for (int64_t i = 0; i < n; ++i) {
    t1 += double(g[i]);
    t2 += double(g[i]) * (double(a[i]) - double(shift));
  }
  s1 += t1;
  s2 += t2;
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// Per-channel affine value from the split storage (trainable rows, frozen rows, slot). A channel that
// acts PRUNED (e.g. under view_task) may hold a slot of the other storage: it never reads one.
// (``present``, not a null pointer, says whether the layer is affine: an empty storage - every
// channel frozen - may have a null data pointer.)
template <typename T>
inline T affine(bool present, const T* trainable, const T* frozen, int16_t task, int32_t slot, T fallback) {
  if (!present || task == kPruned) return fallback;
  return is_frozen(task) ? frozen[slot] : trainable[slot];
}

void check_layout(const at::Tensor& x, const at::Tensor& task, const at::Tensor& slot) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2, "eidetic_cpu: x must be a contiguous CPU [N, C, *]");
  TORCH_CHECK(task.scalar_type() == at::kShort && task.is_contiguous() && task.numel() == x.size(1),
              "eidetic_cpu: channel_task must be contiguous int16[C]");
  TORCH_CHECK(slot.scalar_type() == at::kInt && slot.is_contiguous() && slot.numel() == x.size(1),
              "eidetic_cpu: slot must be contiguous int32[C]");
}

// Per-channel vectors must be contiguous, of x's dtype, and every slot must fall inside its storage
// (checked once per call, O(C): the kernels then index without bounds checks).
void check_vectors(const at::Tensor& x, const OptTensor& running_mean, const OptTensor& running_var,
                   const OptTensor& trainable, const OptTensor& frozen, const at::Tensor& task,
                   const at::Tensor& slot, const char* what) {
  const int64_t C = x.size(1);
  for (const OptTensor* t : {&running_mean, &running_var, &trainable, &frozen})
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->is_contiguous() && (*t)->scalar_type() == x.scalar_type() && (*t)->dim() == 1,
                  "eidetic_cpu: per-channel vectors must be contiguous 1-D tensors of x's dtype");
  if (running_mean.has_value() && running_mean->defined())
    TORCH_CHECK(running_mean->numel() == C && running_var.has_value() && running_var->numel() == C,
                "eidetic_cpu: running_mean and running_var must have C entries");
  if (!(trainable.has_value() && trainable->defined())) return;
  const int64_t n_trainable = trainable->numel();
  const int64_t n_frozen = frozen.has_value() && frozen->defined() ? frozen->numel() : 0;
  const int16_t* tk = task.data_ptr<int16_t>();
  const int32_t* sl = slot.data_ptr<int32_t>();
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(tk[c] == kPruned || sl[c] >= 0 && sl[c] < (is_frozen(tk[c]) ? n_frozen : n_trainable), "eidetic_cpu: slot of channel ",
                c, " is outside its ", what, " storage");
}

// Channel modes of the batch norm.
enum Mode : int8_t { kZero = 0, kBatchStats = 1, kRunningStats = 2 };

std::vector<int8_t> channel_modes(const int16_t* task, int64_t C, bool use_batch_stats, bool has_running) {
  std::vector<int8_t> mode(C);
  for (int64_t c = 0; c < C; ++c) {
    if (task[c] == kPruned)
      mode[c] = kZero;
    else if (use_batch_stats && (task[c] == kFree || !has_running))
      mode[c] = kBatchStats;  // frozen channels keep their running statistics while training
    else
      mode[c] = kRunningStats;
  }
  return mode;
}

// body(c, offset) on each (sample, channel) plane of an [N, C, L] tensor, planes in storage order split among the
// threads in contiguous ranges (as an elementwise op that reads the result splits it: the planes stay in the
// cache of the core that wrote them); PRUNED planes of `out` are written 0 instead.
template <typename T, typename Body>
void over_planes(int64_t N, int64_t C, int64_t L, const std::vector<int8_t>& mode, T* out, const Body& body) {
  if (N * C * L == 0) return;
  at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / L), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      if (mode[c] == kZero)
        std::fill(out + p * L, out + (p + 1) * L, T(0));
      else
        body(c, p * L);
    }
  });
}

// Returns (y, mean used [C], invstd used [C]); updates the running statistics of FREE channels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward(
    const at::Tensor& x, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& trainable_weight, const OptTensor& frozen_weight, const OptTensor& trainable_bias,
    const OptTensor& frozen_bias, const at::Tensor& channel_task, const at::Tensor& slot, bool use_batch_stats,
    double momentum, double eps) {
  check_layout(x, channel_task, slot);
  check_vectors(x, running_mean, running_var, trainable_weight, frozen_weight, channel_task, slot, "weight");
  check_vectors(x, {}, {}, trainable_bias, frozen_bias, channel_task, slot, "bias");
  TORCH_CHECK(use_batch_stats || (running_mean.has_value() && running_mean->defined()),
              "eidetic_cpu: running statistics are needed when batch statistics are not used");
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  const int64_t count = N * L;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::zeros({C}, x.options());
  at::Tensor invstd = at::zeros({C}, x.options());
  const bool has_running = running_mean.has_value() && running_mean->defined();
  const auto mode = channel_modes(channel_task.data_ptr<int16_t>(), C, use_batch_stats, has_running);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eidetic_bn_forward", [&] {
    using T = scalar_t;
    const T* px = x.data_ptr<T>();
    T* py = y.data_ptr<T>();
    T* pm = mean.data_ptr<T>();
    T* pi = invstd.data_ptr<T>();
    T* rm = has_running ? running_mean->data_ptr<T>() : nullptr;
    T* rv = has_running ? running_var->data_ptr<T>() : nullptr;
    const T *tw = ptr_or_null<T>(trainable_weight), *fw = ptr_or_null<T>(frozen_weight);
    const T *tb = ptr_or_null<T>(trainable_bias), *fb = ptr_or_null<T>(frozen_bias);
    const bool has_w = trainable_weight.has_value() && trainable_weight->defined();
    const bool has_b = trainable_bias.has_value() && trainable_bias->defined();
    const int16_t* task = channel_task.data_ptr<int16_t>();
    const int32_t* sl = slot.data_ptr<int32_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(count, 1));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      // pass 1: shifted sums of the batch-statistics channels (the shift keeps the variance accurate)
      const int64_t B = c1 - c0;
      std::vector<double> s1(B, 0.0), s2(B, 0.0);
      std::vector<T> shift(B, T(0));
      for (int64_t c = c0; c < c1; ++c)
        if (mode[c] == kBatchStats && count > 0) shift[c - c0] = px[c * L];
      if (L == 1) {  // [N, C]: run along the rows, vectorised over channels
        for (int64_t n = 0; n < N; ++n) {
          const T* row = px + n * C + c0;
          for (int64_t b = 0; b < B; ++b) {
            const double d = double(row[b]) - double(shift[b]);
            s1[b] += d;
            s2[b] += d * d;
          }
        }
      } else {
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = c0; c < c1; ++c)
            if (mode[c] == kBatchStats)
              shifted_sums(px + (n * C + c) * L, L, shift[c - c0], s1[c - c0], s2[c - c0]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c - c0;
        if (mode[c] == kBatchStats) {
          const double m = s1[b] / double(count);
          const double var = std::max(s2[b] / double(count) - m * m, 0.0);
          pm[c] = T(double(shift[b]) + m);
          pi[c] = T(1.0 / std::sqrt(var + eps));
          if (has_running && task[c] == kFree) {
            const double unbiased = var * double(count) / double(std::max<int64_t>(count - 1, 1));
            rm[c] = T((1.0 - momentum) * double(rm[c]) + momentum * double(pm[c]));
            rv[c] = T((1.0 - momentum) * double(rv[c]) + momentum * unbiased);
          }
        } else if (mode[c] == kRunningStats) {
          pm[c] = rm[c];
          pi[c] = T(1.0 / std::sqrt(double(rv[c]) + eps));
        }
      }
      if (L != 1) return;
      // pass 2 of [N, C]: y = (x - mean)·invstd·w + b; PRUNED channels are exactly 0 whatever x holds
      std::vector<T> k(B), bias(B);
      std::vector<char> live(B);
      for (int64_t c = c0; c < c1; ++c) {
        k[c - c0] = pi[c] * affine(has_w, tw, fw, task[c], sl[c], T(1));
        bias[c - c0] = affine(has_b, tb, fb, task[c], sl[c], T(0));
        live[c - c0] = mode[c] != kZero;
      }
      for (int64_t n = 0; n < N; ++n) {
        const T* in = px + n * C + c0;
        T* out = py + n * C + c0;
        for (int64_t b = 0; b < B; ++b) out[b] = live[b] ? (in[b] - pm[c0 + b]) * k[b] + bias[b] : T(0);
      }
    });
    if (L == 1) return;  // [N, C]: done above
    // pass 2 of [N, C, *]: y = (x - mean)·invstd·w + b, PRUNED channels exactly 0 (per element the same
    // arithmetic, whatever the split)
    std::vector<T> k(C), bias(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = pi[c] * affine(has_w, tw, fw, task[c], sl[c], T(1));
      bias[c] = affine(has_b, tb, fb, task[c], sl[c], T(0));
    }
    over_planes(N, C, L, mode, py, [&](int64_t c, int64_t o) {
      const T *in = px + o, m = pm[c], kc = k[c], bc = bias[c];
      T* out = py + o;
      for (int64_t l = 0; l < L; ++l) out[l] = (in[l] - m) * kc + bc;
    });
  });
  return {y, mean, invstd};
}

// Returns (dx or undefined, d trainable weight or undefined, d trainable bias or undefined).
// Gradients of the affine parameters go to the trainable rows of non-frozen channels only.
// taylor_score (float32[C], optional) += |Σ y·dy| / N, with Σ y·dy = w·invstd·Σ(x-mean)·dy + b·Σ dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const OptTensor& trainable_weight, const OptTensor& frozen_weight, const OptTensor& trainable_bias,
    const OptTensor& frozen_bias, const at::Tensor& channel_task, const at::Tensor& slot, bool use_batch_stats,
    bool has_running, bool need_dx, bool need_dweight, bool need_dbias, const OptTensor& taylor_score) {
  check_layout(x, channel_task, slot);
  check_vectors(x, {}, {}, trainable_weight, frozen_weight, channel_task, slot, "weight");
  check_vectors(x, {}, {}, trainable_bias, frozen_bias, channel_task, slot, "bias");
  const at::Tensor dy = dy_in.contiguous();
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "eidetic_cpu: dy must match x");
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  const int64_t count = N * L;
  const bool has_weight = trainable_weight.has_value() && trainable_weight->defined();
  const bool has_bias = trainable_bias.has_value() && trainable_bias->defined();
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  at::Tensor dw = (need_dweight && has_weight) ? at::zeros_like(*trainable_weight) : at::Tensor();
  at::Tensor db = (need_dbias && has_bias) ? at::zeros_like(*trainable_bias) : at::Tensor();
  const bool taylor = taylor_score.has_value() && taylor_score->defined();
  if (taylor)
    TORCH_CHECK(taylor_score->scalar_type() == at::kFloat && taylor_score->is_contiguous() &&
                    taylor_score->numel() == C, "eidetic_cpu: taylor_score must be contiguous float32[C]");
  const auto mode = channel_modes(channel_task.data_ptr<int16_t>(), C, use_batch_stats, has_running);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eidetic_bn_backward", [&] {
    using T = scalar_t;
    const T *px = x.data_ptr<T>(), *pg = dy.data_ptr<T>();
    const T *pm = mean.data_ptr<T>(), *pi = invstd.data_ptr<T>();
    T* pdx = need_dx ? dx.data_ptr<T>() : nullptr;
    T* pdw = dw.defined() ? dw.data_ptr<T>() : nullptr;
    T* pdb = db.defined() ? db.data_ptr<T>() : nullptr;
    float* score = taylor ? taylor_score->data_ptr<float>() : nullptr;
    const T *tw = ptr_or_null<T>(trainable_weight), *fw = ptr_or_null<T>(frozen_weight);
    const T *tb = ptr_or_null<T>(trainable_bias), *fb = ptr_or_null<T>(frozen_bias);
    const bool has_w = trainable_weight.has_value() && trainable_weight->defined();
    const bool has_b = trainable_bias.has_value() && trainable_bias->defined();
    const int16_t* task = channel_task.data_ptr<int16_t>();
    const int32_t* sl = slot.data_ptr<int32_t>();
    std::vector<double> sums_dy(C, 0.0), sums_dyx(C, 0.0);  // Σdy, Σdy·(x-mean) per channel
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(count, 1));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      const int64_t B = c1 - c0;
      // which channels need Σdy, Σdy·(x-mean): batch statistics (for dx), trainable affine, Taylor
      std::vector<char> want(B, 0);
      bool any = false;
      for (int64_t c = c0; c < c1; ++c) {
        const bool trainable_channel = !is_frozen(task[c]) && (pdw != nullptr || pdb != nullptr);
        want[c - c0] = mode[c] != kZero &&
                       ((mode[c] == kBatchStats && need_dx) || trainable_channel || score != nullptr);
        any = any || want[c - c0];
      }
      double* s_dy = sums_dy.data() + c0;
      double* s_dyx = sums_dyx.data() + c0;
      if (any && L == 1) {  // [N, C]: run along the rows, vectorised over channels
        for (int64_t n = 0; n < N; ++n) {
          const T *g = pg + n * C + c0, *in = px + n * C + c0;
          for (int64_t b = 0; b < B; ++b) {
            s_dy[b] += double(g[b]);
            s_dyx[b] += double(g[b]) * (double(in[b]) - double(pm[c0 + b]));
          }
        }
      } else if (any) {
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = c0; c < c1; ++c)
            if (want[c - c0]) {
              const int64_t o = (n * C + c) * L;
              grad_sums(pg + o, px + o, L, pm[c], s_dy[c - c0], s_dyx[c - c0]);
            }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c - c0;
        if (mode[c] == kZero) continue;  // PRUNED: output 0, no gradient, no score
        const double w = double(affine(has_w, tw, fw, task[c], sl[c], T(1)));
        if (!is_frozen(task[c])) {
          if (pdw) pdw[sl[c]] = T(s_dyx[b] * double(pi[c]));
          if (pdb) pdb[sl[c]] = T(s_dy[b]);
        }
        if (score) {
          const double bias = double(affine(has_b, tb, fb, task[c], sl[c], T(0)));
          const double y_dot_dy = w * double(pi[c]) * s_dyx[b] + bias * s_dy[b];
          score[c] += float(std::abs(y_dot_dy) / double(std::max<int64_t>(N, 1)));
        }
      }
      if (!need_dx) return;
      if (L == 1) {
        // dx = k1·dy - k2 - (x - mean)·k3 (k2 = k3 = 0 for running statistics); PRUNED: 0
        std::vector<T> k1(B), k2(B), k3(B);
        std::vector<char> live(B);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t b = c - c0;
          const double w = double(affine(has_w, tw, fw, task[c], sl[c], T(1)));
          const double batch = mode[c] == kBatchStats ? 1.0 / double(count) : 0.0;
          k1[b] = T(w * double(pi[c]));
          k2[b] = T(double(k1[b]) * s_dy[b] * batch);
          k3[b] = T(double(k1[b]) * double(pi[c]) * double(pi[c]) * s_dyx[b] * batch);
          live[b] = mode[c] != kZero;
        }
        for (int64_t n = 0; n < N; ++n) {
          const T *g = pg + n * C + c0, *in = px + n * C + c0;
          T* out = pdx + n * C + c0;
          for (int64_t b = 0; b < B; ++b)
            out[b] = live[b] ? g[b] * k1[b] - k2[b] - (in[b] - pm[c0 + b]) * k3[b] : T(0);
        }
        return;
      }
    });
    if (!need_dx || L == 1) return;  // [N, C]: done above
    // dx of [N, C, *] over the planes (see the forward's pass 2): running statistics dx = k1·dy; batch statistics
    // dx = w·invstd·(dy - mean(dy) - x̂·mean(dy·x̂)) = k1·dy - k2 - (x-mean)·k3
    std::vector<T> k1(C), k2(C), k3(C);
    const double inv_count = 1.0 / double(count);
    for (int64_t c = 0; c < C; ++c) {
      if (mode[c] == kZero) continue;
      const double w = double(affine(has_w, tw, fw, task[c], sl[c], T(1)));
      k1[c] = T(w * double(pi[c]));
      if (mode[c] == kBatchStats) {
        k2[c] = T(double(k1[c]) * sums_dy[c] * inv_count);
        k3[c] = T(double(k1[c]) * double(pi[c]) * double(pi[c]) * sums_dyx[c] * inv_count);
      }
    }
    over_planes(N, C, L, mode, pdx, [&](int64_t c, int64_t o) {
      const T *g = pg + o, a = k1[c];
      T* out = pdx + o;
      if (mode[c] == kRunningStats) {
        for (int64_t l = 0; l < L; ++l) out[l] = g[l] * a;
        return;
      }
      const T *in = px + o, b = k2[c], d = k3[c], m = pm[c];
      for (int64_t l = 0; l < L; ++l) out[l] = g[l] * a - b - (in[l] - m) * d;
    });
  });
  return {dx, dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "eidetic C++ CPU kernels: batch norm with per-channel task state";
  m.def("bn_forward", &bn_forward);
  m.def("bn_backward", &bn_backward);
}
