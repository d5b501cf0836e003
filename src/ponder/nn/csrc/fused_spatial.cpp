// Fused CPU kernels for the spatial (SACT) sparse executor: the residual epilogue of the dense
// fall-back, the spatial halting branch and the inference ACT step, each one pass over the map
// instead of several PyTorch calls. Inference only, float32, activations channels-last
// ([B, C, H, W] tensors laid out as [B, H, W, C]), per-position maps [B, H, W] contiguous.
// ponder/nn/fused_spatial.py checks those conditions and holds the reference semantics.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrain = 64;  // positions per parallel task

// y <- relu(s + y) where mask, else s (or relu(s) with relu_inactive). y: conv output, in place.
torch::Tensor residual_epilogue(torch::Tensor y, torch::Tensor s, torch::Tensor mask, bool relu_inactive) {
  const int64_t C = y.size(1), P = y.size(0) * y.size(2) * y.size(3);
  float* py = y.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  const bool* pm = mask.data_ptr<bool>();
  at::parallel_for(0, P, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      float* yr = py + q * C;
      const float* sr = ps + q * C;
      if (pm[q]) {
        for (int64_t c = 0; c < C; ++c) {
          const float v = sr[c] + yr[c];
          yr[c] = v > 0.f ? v : 0.f;
        }
      } else if (relu_inactive) {
        for (int64_t c = 0; c < C; ++c) yr[c] = sr[c] > 0.f ? sr[c] : 0.f;
      } else {
        for (int64_t c = 0; c < C; ++c) yr[c] = sr[c];
      }
    }
  });
  return y;
}

// h = sigmoid(bias + sum_k tap_k(neighbour k) + g[b]): tap_k(q) = w10[k] . x(q) + t10[k] for q in the
// map (zero outside: the zero padding of the BN'd map), k = 3 kh + kw < 9; g[b] = mean_q(w10[9] . x(q))
// + gconst. The ten dot products per position are one GEMM ([10, B*H*W] tap planes, x read once),
// the 3x3 sum nine shifted row additions, the sigmoid ATen's vectorised one.
torch::Tensor spatial_halting(torch::Tensor x, torch::Tensor w10, torch::Tensor t10, double gconst, double bias) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W, P = B * HW;
  const torch::Tensor planes = at::addmm(t10.unsqueeze(1), w10, x.permute({0, 2, 3, 1}).reshape({P, C}).t());
  const float* pt = planes.data_ptr<float>();  // [10, P], contiguous
  auto z = torch::empty({B, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* pz = z.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* gb = pt + 9 * P + b * HW;
      double gsum = 0.0;
      for (int64_t q = 0; q < HW; ++q) gsum += gb[q];
      const float start = static_cast<float>(bias) + static_cast<float>(gsum / static_cast<double>(HW) + gconst);
      float* zb = pz + b * HW;
      for (int64_t q = 0; q < HW; ++q) zb[q] = start;
      for (int k = 0; k < 9; ++k) {
        const int64_t dh = k / 3 - 1, dw = k % 3 - 1;
        const float* tk = pt + k * P + b * HW;
        const int64_t i0 = dh < 0 ? 1 : 0, i1 = dh > 0 ? H - 1 : H;
        const int64_t j0 = dw < 0 ? 1 : 0, j1 = dw > 0 ? W - 1 : W;
        for (int64_t i = i0; i < i1; ++i) {
          float* zr = zb + i * W;
          const float* tr = tk + (i + dh) * W + dw;
          for (int64_t j = j0; j < j1; ++j) zr[j] += tr[j];
        }
      }
    }
  });
  return z.sigmoid_();
}

// One inference ACT step on [B, H, W] maps (hsum, n, rem updated in place; run is not modified).
// Returns {p, running after the step, output}: output = p * x (new, when out is undefined) or
// out + p * x (in place). h is undefined for the last unit, x undefined when no state is kept.
std::vector<torch::Tensor> act_step(torch::Tensor hsum, torch::Tensor n, torch::Tensor rem, torch::Tensor run,
                                    c10::optional<torch::Tensor> h, c10::optional<torch::Tensor> x,
                                    c10::optional<torch::Tensor> out, double eps, bool last) {
  const int64_t S = hsum.numel();
  auto p = torch::empty_like(hsum);
  auto running = torch::empty_like(run);
  float* phs = hsum.data_ptr<float>();
  float* pn = n.data_ptr<float>();
  float* pr = rem.data_ptr<float>();
  float* pp = p.data_ptr<float>();
  const bool* pru = run.data_ptr<bool>();
  bool* pnext = running.data_ptr<bool>();
  const float* phv = (!last && h.has_value()) ? h->data_ptr<float>() : nullptr;
  const float thr = static_cast<float>(1.0 - eps);
  at::parallel_for(0, S, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const bool r = pru[q];
      const float rest = 1.f - phs[q];
      bool halts;
      float pv;
      if (last) {
        halts = r;
        pv = r ? rest : rest * 0.f;
      } else {
        const float hv = phv[q];
        const float cum = phs[q] + hv;
        halts = r && (cum >= thr);
        const bool keeps = r != halts;
        pv = halts ? rest : hv * (keeps ? 1.f : 0.f);
        if (keeps) phs[q] = cum;
      }
      if (halts) pr[q] = rest;
      pn[q] += r ? 1.f : 0.f;
      pnext[q] = r != halts;
      pp[q] = pv;
    }
  });
  torch::Tensor result;
  if (x.has_value()) {
    const torch::Tensor& xs = *x;
    const int64_t C = xs.size(1);
    const bool fresh = !out.has_value();
    result = fresh ? torch::empty_like(xs) : *out;
    const float* px = xs.data_ptr<float>();
    float* po = result.data_ptr<float>();
    at::parallel_for(0, S, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const float w = pp[q];
        const float* xr = px + q * C;
        float* orow = po + q * C;
        if (fresh) {
          for (int64_t c = 0; c < C; ++c) orow[c] = w * xr[c];
        } else {
          for (int64_t c = 0; c < C; ++c) orow[c] = orow[c] + w * xr[c];
        }
      }
    });
  }
  return {p, running, result};
}

// For a stride-1 unit mask [B, H, W]: the 3x3 dilation the unit's first conv runs on (zero padded)
// and each sample's MACs, base + first_macs * |dilated| + rest_macs * |mask| (+ halt_macs if any
// position is active), in float64 (integer-valued, so exact in any order).
std::vector<torch::Tensor> unit_masks(torch::Tensor mask, double base, double first_macs, double rest_macs,
                                      double halt_macs) {
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2), HW = H * W;
  auto first = torch::empty_like(mask);
  auto macs = torch::empty({B}, mask.options().dtype(torch::kFloat64));
  const bool* pm = mask.data_ptr<bool>();
  bool* pf = first.data_ptr<bool>();
  double* pc = macs.data_ptr<double>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const bool* mb = pm + b * HW;
      bool* fb = pf + b * HW;
      int64_t n_mask = 0, n_first = 0;
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          n_mask += mb[i * W + j];
          bool any = false;
          for (int64_t r = (i > 0 ? i - 1 : 0); r <= (i + 1 < H ? i + 1 : H - 1) && !any; ++r)
            for (int64_t c = (j > 0 ? j - 1 : 0); c <= (j + 1 < W ? j + 1 : W - 1); ++c)
              if (mb[r * W + c]) { any = true; break; }
          fb[i * W + j] = any;
          n_first += any;
        }
      }
      pc[b] = base + first_macs * static_cast<double>(n_first) + rest_macs * static_cast<double>(n_mask) +
              (n_mask > 0 ? halt_macs : 0.0);
    }
  });
  return {first, macs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("residual_epilogue", &residual_epilogue, "masked residual epilogue, in place (channels-last)");
  m.def("spatial_halting", &spatial_halting, "SACT halting map from a channels-last state");
  m.def("act_step", &act_step, "inference ACT step on per-position maps");
  m.def("unit_masks", &unit_masks, "first-conv mask and per-sample MACs of a stride-1 unit");
}
