// CPU kernels for shaq/nn/forget_mult.py (see there for the math and the conventions).
//
// Every (batch b, hidden h) pair is an independent chain over time, so the work is split
// over the flattened b * H + h range with at::parallel_for. Inside a task the time loop is
// outermost and each time step is a `*_step` function over a contiguous run of hidden units.
// Those take __restrict__ pointers and have no branches (the build adds -fno-trapping-math so
// that clamps compile to min/max), which is what lets gcc vectorise them.
// All tensors are contiguous, batch-first: x[b, t, h] lives at (b * T + t) * H + h.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Calls fn(b, h0, n) for disjoint runs [h0, h0 + n) of batch row b that together cover the
// whole [B, H] plane, in parallel.
template <typename Fn>
void for_each_run(int64_t B, int64_t T, int64_t H, const Fn& fn) {
  // A chain costs about T steps; keep at least ~64k steps per task so that waking threads
  // stays negligible for short segments.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / H, h0 = i % H;
      const int64_t n = std::min(H - h0, end - i);
      fn(b, h0, n);
      i += n;
    }
  });
}

// exp for float that gcc can vectorise (std::exp is an opaque scalar libm call, which would
// make the fused QRNN kernels several times slower than torch's own vectorised sigmoid).
// Write x = n * ln2 + r with integer n and |r| <= ln2 / 2, so exp(x) = 2^n * exp(r): exp(r)
// is its degree-7 Taylor polynomial (truncation error below 6e-9, under float rounding) and
// 2^n is assembled directly in the exponent bits.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // keeps 2^n a normal float (saturates far tails)
  // Round to nearest by adding and subtracting 1.5 * 2^23 (branch-free, vectorisable).
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  // ln2 split in two (Cody-Waite) so that n * ln2_hi is exact and r keeps full precision.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// float64 only serves gradcheck, where accuracy matters and speed does not.
inline double exp_approx(double x) { return std::exp(x); }

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + exp_approx(-x));
}

// tanh(x) = 2 * sigmoid(2x) - 1; its absolute error stays at float rounding (~2e-7).
template <typename scalar_t>
inline scalar_t tanh_approx(scalar_t x) {
  return scalar_t(2) * sigmoid(scalar_t(2) * x) - scalar_t(1);
}

// ---------------------------------------------------------------------------------------
// forget_mult: c_t = f_t * c_{t-1} + (1 - f_t) * z_t

template <typename scalar_t>
inline void forget_mult_step(const scalar_t* __restrict__ f, const scalar_t* __restrict__ z,
                             const scalar_t* __restrict__ c_prev, scalar_t* __restrict__ c,
                             int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    c[i] = z[i] + f[i] * (c_prev[i] - z[i]);
  }
}

// One step of the reverse loop. carry holds f_{t+1} * r_{t+1} (0 after the last step), so
// r_t = g_t + carry is the total gradient at c_t; after step 0 the carry is exactly dc0.
template <typename scalar_t>
inline void forget_mult_backward_step(const scalar_t* __restrict__ f,
                                      const scalar_t* __restrict__ z,
                                      const scalar_t* __restrict__ c_prev,
                                      const scalar_t* __restrict__ grad_c,
                                      scalar_t* __restrict__ carry, scalar_t* __restrict__ df,
                                      scalar_t* __restrict__ dz, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t r = grad_c[i] + carry[i];
    dz[i] = (scalar_t(1) - f[i]) * r;
    df[i] = (c_prev[i] - z[i]) * r;
    carry[i] = f[i] * r;
  }
}

template <typename scalar_t>
void forget_mult_forward_kernel(const scalar_t* f, const scalar_t* z, const scalar_t* c0,
                                scalar_t* c, int64_t B, int64_t T, int64_t H) {
  for_each_run(B, T, H, [&](int64_t b, int64_t h0, int64_t n) {
    const scalar_t* c_prev = c0 + b * H + h0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t at = (b * T + t) * H + h0;
      forget_mult_step(f + at, z + at, c_prev, c + at, n);
      c_prev = c + at;
    }
  });
}

template <typename scalar_t>
void forget_mult_backward_kernel(const scalar_t* f, const scalar_t* z, const scalar_t* c0,
                                 const scalar_t* c, const scalar_t* grad_c, scalar_t* df,
                                 scalar_t* dz, scalar_t* dc0, int64_t B, int64_t T, int64_t H) {
  for_each_run(B, T, H, [&](int64_t b, int64_t h0, int64_t n) {
    scalar_t* carry = dc0 + b * H + h0;  // the carry lives in dc0, its final value
    std::fill(carry, carry + n, scalar_t(0));
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t at = (b * T + t) * H + h0;
      const scalar_t* c_prev = t > 0 ? c + at - H : c0 + b * H + h0;
      forget_mult_backward_step(f + at, z + at, c_prev, grad_c + at, carry, df + at, dz + at, n);
    }
  });
}

// ---------------------------------------------------------------------------------------
// qrnn_pool: z = tanh(gates_z), f = sigmoid(gates_f), o = sigmoid(gates_o),
//            c_t = f_t * c_{t-1} + (1 - f_t) * z_t,  h_t = o_t * c_t  (h = c without o).
// gates: [B, T, G * H] with G = 3 (z, f, o) or 2 (z, f), laid out block-wise along the last
// dim like torch.chunk(G, dim=-1). The backward recomputes the activations from the
// pre-activations instead of storing them: a few exps cost less than the memory traffic.

template <typename scalar_t, bool kOutputGate>
inline void qrnn_pool_step(const scalar_t* __restrict__ z_pre, const scalar_t* __restrict__ f_pre,
                           const scalar_t* __restrict__ o_pre, const scalar_t* __restrict__ c_prev,
                           scalar_t* __restrict__ c, scalar_t* __restrict__ h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t z = tanh_approx(z_pre[i]);
    const scalar_t f = sigmoid(f_pre[i]);
    c[i] = z + f * (c_prev[i] - z);
    if constexpr (kOutputGate) {
      h[i] = sigmoid(o_pre[i]) * c[i];
    }
  }
}

// As in forget_mult_backward_step, carry = f_{t+1} * r_{t+1}.
template <typename scalar_t, bool kOutputGate>
inline void qrnn_pool_backward_step(
    const scalar_t* __restrict__ z_pre, const scalar_t* __restrict__ f_pre,
    const scalar_t* __restrict__ o_pre, const scalar_t* __restrict__ c_prev,
    const scalar_t* __restrict__ c, const scalar_t* __restrict__ grad_h,
    scalar_t* __restrict__ carry, scalar_t* __restrict__ dz_pre, scalar_t* __restrict__ df_pre,
    scalar_t* __restrict__ do_pre, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t z = tanh_approx(z_pre[i]);
    const scalar_t f = sigmoid(f_pre[i]);
    scalar_t r = carry[i];  // becomes the total dL/dc_t
    if constexpr (kOutputGate) {
      const scalar_t o = sigmoid(o_pre[i]);
      r += grad_h[i] * o;
      do_pre[i] = grad_h[i] * c[i] * o * (scalar_t(1) - o);
    } else {
      r += grad_h[i];
    }
    dz_pre[i] = (scalar_t(1) - f) * r * (scalar_t(1) - z * z);
    df_pre[i] = (c_prev[i] - z) * r * f * (scalar_t(1) - f);
    carry[i] = f * r;
  }
}

template <typename scalar_t, bool kOutputGate>
void qrnn_pool_forward_kernel(const scalar_t* gates, const scalar_t* c0, scalar_t* c,
                              scalar_t* h, int64_t B, int64_t T, int64_t H) {
  constexpr int64_t G = kOutputGate ? 3 : 2;
  for_each_run(B, T, H, [&](int64_t b, int64_t h0, int64_t n) {
    const scalar_t* c_prev = c0 + b * H + h0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t, at = row * H + h0;
      const scalar_t* z_pre = gates + row * G * H + h0;
      qrnn_pool_step<scalar_t, kOutputGate>(z_pre, z_pre + H, z_pre + 2 * H, c_prev, c + at,
                                            h + at, n);
      c_prev = c + at;
    }
  });
}

template <typename scalar_t, bool kOutputGate>
void qrnn_pool_backward_kernel(const scalar_t* gates, const scalar_t* c0, const scalar_t* c,
                               const scalar_t* grad_h, const scalar_t* grad_c_last,
                               scalar_t* dgates, scalar_t* dc0, int64_t B, int64_t T, int64_t H) {
  constexpr int64_t G = kOutputGate ? 3 : 2;
  for_each_run(B, T, H, [&](int64_t b, int64_t h0, int64_t n) {
    // The carry lives in dc0 and starts as the gradient reaching the final cell from outside.
    scalar_t* carry = dc0 + b * H + h0;
    std::copy(grad_c_last + b * H + h0, grad_c_last + b * H + h0 + n, carry);
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t row = b * T + t, at = row * H + h0;
      const scalar_t* z_pre = gates + row * G * H + h0;
      scalar_t* dz_pre = dgates + row * G * H + h0;
      const scalar_t* c_prev = t > 0 ? c + at - H : c0 + b * H + h0;
      qrnn_pool_backward_step<scalar_t, kOutputGate>(z_pre, z_pre + H, z_pre + 2 * H, c_prev,
                                                     c + at, grad_h + at, carry, dz_pre,
                                                     dz_pre + H, dz_pre + 2 * H, n);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Python bindings

void check_inputs(const std::vector<torch::Tensor>& tensors) {
  for (const auto& x : tensors) {
    TORCH_CHECK(x.device().is_cpu(), "shaq forget_mult: expected CPU tensors");
    TORCH_CHECK(x.is_contiguous(), "shaq forget_mult: expected contiguous tensors");
    TORCH_CHECK(x.scalar_type() == tensors[0].scalar_type(), "shaq forget_mult: mixed dtypes");
  }
}

// f, z: [B, T, H]; c0: [B, H]. Returns c: [B, T, H].
torch::Tensor forget_mult_forward(torch::Tensor f, torch::Tensor z, torch::Tensor c0) {
  check_inputs({f, z, c0});
  const int64_t B = z.size(0), T = z.size(1), H = z.size(2);
  auto c = torch::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "forget_mult_forward", [&] {
    forget_mult_forward_kernel<scalar_t>(f.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                         c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), B, T, H);
  });
  return c;
}

// Returns (df, dz, dc0) given the forward's inputs, its output c and grad_c = dL/dc.
std::vector<torch::Tensor> forget_mult_backward(torch::Tensor f, torch::Tensor z, torch::Tensor c0,
                                                torch::Tensor c, torch::Tensor grad_c) {
  check_inputs({f, z, c0, c, grad_c});
  const int64_t B = z.size(0), T = z.size(1), H = z.size(2);
  auto df = torch::empty_like(f);
  auto dz = torch::empty_like(z);
  auto dc0 = torch::empty_like(c0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "forget_mult_backward", [&] {
    forget_mult_backward_kernel<scalar_t>(
        f.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(), df.data_ptr<scalar_t>(),
        dz.data_ptr<scalar_t>(), dc0.data_ptr<scalar_t>(), B, T, H);
  });
  return {df, dz, dc0};
}

// gates: [B, T, G * H]; c0: [B, H]. Returns (h, c), both [B, T, H] (h is c when G = 2).
std::vector<torch::Tensor> qrnn_pool_forward(torch::Tensor gates, torch::Tensor c0,
                                             bool output_gate) {
  check_inputs({gates, c0});
  const int64_t B = gates.size(0), T = gates.size(1), H = c0.size(1);
  TORCH_CHECK(gates.size(2) == (output_gate ? 3 : 2) * H, "qrnn_pool: gates width != G * H");
  auto c = torch::empty({B, T, H}, c0.options());
  auto h = output_gate ? torch::empty_like(c) : c;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "qrnn_pool_forward", [&] {
    auto kernel = output_gate ? qrnn_pool_forward_kernel<scalar_t, true>
                              : qrnn_pool_forward_kernel<scalar_t, false>;
    kernel(gates.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
           h.data_ptr<scalar_t>(), B, T, H);
  });
  return {h, c};
}

// Returns (dgates, dc0) given the forward's inputs, its cells c, dL/dh and dL/dc_last.
std::vector<torch::Tensor> qrnn_pool_backward(torch::Tensor gates, torch::Tensor c0,
                                              torch::Tensor c, torch::Tensor grad_h,
                                              torch::Tensor grad_c_last, bool output_gate) {
  check_inputs({gates, c0, c, grad_h, grad_c_last});
  const int64_t B = gates.size(0), T = gates.size(1), H = c0.size(1);
  auto dgates = torch::empty_like(gates);
  auto dc0 = torch::empty_like(c0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "qrnn_pool_backward", [&] {
    auto kernel = output_gate ? qrnn_pool_backward_kernel<scalar_t, true>
                              : qrnn_pool_backward_kernel<scalar_t, false>;
    kernel(gates.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
           grad_h.data_ptr<scalar_t>(), grad_c_last.data_ptr<scalar_t>(),
           dgates.data_ptr<scalar_t>(), dc0.data_ptr<scalar_t>(), B, T, H);
  });
  return {dgates, dc0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forget_mult_forward", &forget_mult_forward, "forget_mult forward (CPU)");
  m.def("forget_mult_backward", &forget_mult_backward, "forget_mult backward (CPU)");
  m.def("qrnn_pool_forward", &qrnn_pool_forward, "fused QRNN pooling forward (CPU)");
  m.def("qrnn_pool_backward", &qrnn_pool_backward, "fused QRNN pooling backward (CPU)");
}
