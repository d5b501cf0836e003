// Fused CPU kernels for the spatial (SACT) sparse executor: the residual epilogues of the dense
// fall-back and of the sparse kernel, the spatial halting branch, the inference ACT step and a
// unit's mask dilation with its MACs, each one call and one pass instead of several PyTorch calls.
// Inference only, float32, activations channels-last ([B, C, H, W] tensors laid out as
// [B, H, W, C]), per-position maps [B, H, W] contiguous. ponder/nn/fused_spatial.py checks those
// conditions; the PyTorch paths these replace (ponder.nn.sparse_units, halting, sparse_cost) are
// the reference semantics, and tests/test_fused_spatial.py compares the two.
#include <torch/extension.h>

#include <ATen/Parallel.h>

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

// h = sigmoid(bias + sum_k tap_k(neighbour k) + g[b]) on [B, H, W] from planes [10, B*H*W] (any strides):
// plane k < 9 (k = 3 kh + kw) holds tap (kh, kw) of every position (w . x + shift), zero outside the map
// (the zero padding of the BN'd input); g[b] = mean of plane 9 over sample b + gconst. The 3x3 sum is
// nine shifted row additions, the sigmoid ATen's vectorised one.
torch::Tensor halting_from_planes(const torch::Tensor& planes, int64_t B, int64_t H, int64_t W, double gconst,
                                  double bias) {
  const int64_t HW = H * W, sk = planes.stride(0), sq = planes.stride(1);
  const float* pt = planes.data_ptr<float>();
  auto z = torch::empty({B, H, W}, planes.options().memory_format(at::MemoryFormat::Contiguous));
  float* pz = z.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* gb = pt + 9 * sk + b * HW * sq;
      double gsum = 0.0;
      for (int64_t q = 0; q < HW; ++q) gsum += gb[q * sq];
      const float start = static_cast<float>(bias) + static_cast<float>(gsum / static_cast<double>(HW) + gconst);
      float* zb = pz + b * HW;
      for (int64_t q = 0; q < HW; ++q) zb[q] = start;
      for (int k = 0; k < 9; ++k) {
        const int64_t dh = k / 3 - 1, dw = k % 3 - 1;
        const float* tk = pt + k * sk + b * HW * sq;
        const int64_t i0 = dh < 0 ? 1 : 0, i1 = dh > 0 ? H - 1 : H;
        const int64_t j0 = dw < 0 ? 1 : 0, j1 = dw > 0 ? W - 1 : W;
        for (int64_t i = i0; i < i1; ++i) {
          float* zr = zb + i * W;
          const float* tr = tk + ((i + dh) * W + dw) * sq;
          if (sq == 1) {
            for (int64_t j = j0; j < j1; ++j) zr[j] += tr[j];
          } else {
            for (int64_t j = j0; j < j1; ++j) zr[j] += tr[j * sq];
          }
        }
      }
    }
  });
  return z.sigmoid_();
}

// The halting map of a channels-last x [B, C, H, W]: the tap planes as given ([10, B*H*W], any strides),
// or computed here as one BLAS GEMM, w10 @ rows(x)^T + t10.
torch::Tensor spatial_halting(torch::Tensor x, torch::Tensor w10, torch::Tensor t10, c10::optional<torch::Tensor> planes,
                              double gconst, double bias) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (planes.has_value()) return halting_from_planes(*planes, B, H, W, gconst, bias);
  const torch::Tensor rows = x.permute({0, 2, 3, 1}).reshape({B * H * W, C});
  return halting_from_planes(at::addmm(t10.unsqueeze(1), w10, rows.t()), B, H, W, gconst, bias);
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

// For a stride-1 unit mask [B, H, W]: the 3x3 dilation the unit's first conv runs on (zero padded;
// separable: an OR along rows, then along columns) and each sample's MACs, base + first_macs *
// |dilated| + rest_macs * |mask| (+ halt_macs if any position is active), in float64
// (integer-valued, so exact in any order).
std::vector<torch::Tensor> unit_masks(torch::Tensor mask, double base, double first_macs, double rest_macs,
                                      double halt_macs) {
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2), HW = H * W;
  auto first = torch::empty_like(mask);
  auto macs = torch::empty({B}, mask.options().dtype(torch::kFloat64));
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* pf = reinterpret_cast<uint8_t*>(first.data_ptr<bool>());
  double* pc = macs.data_ptr<double>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> rows(static_cast<size_t>(HW));
    for (int64_t b = lo; b < hi; ++b) {
      const uint8_t* mb = pm + b * HW;
      uint8_t* fb = pf + b * HW;
      int64_t n_mask = 0, n_first = 0;
      for (int64_t i = 0; i < H; ++i) {
        const uint8_t* mr = mb + i * W;
        uint8_t* rr = rows.data() + i * W;
        for (int64_t j = 0; j < W; ++j) {
          n_mask += mr[j];
          rr[j] = mr[j] | (j > 0 ? mr[j - 1] : 0) | (j + 1 < W ? mr[j + 1] : 0);
        }
      }
      for (int64_t i = 0; i < H; ++i) {
        const uint8_t* up = rows.data() + (i > 0 ? i - 1 : i) * W;
        const uint8_t* mid = rows.data() + i * W;
        const uint8_t* down = rows.data() + (i + 1 < H ? i + 1 : i) * W;
        uint8_t* fr = fb + i * W;
        for (int64_t j = 0; j < W; ++j) {
          fr[j] = up[j] | mid[j] | down[j];
          n_first += fr[j];
        }
      }
      pc[b] = base + first_macs * static_cast<double>(n_first) + rest_macs * static_cast<double>(n_mask) +
              (n_mask > 0 ? halt_macs : 0.0);
    }
  });
  return {first, macs};
}

// The sparse kernel's residual epilogue on a [R, C] row table: out[rows[i]] = relu(out[rows[i]] + y[i])
// for the n active rows, and with relu_all every other row relu'd too (DynConv's inactive="relu").
torch::Tensor scatter_residual(torch::Tensor out, torch::Tensor rows, torch::Tensor y, bool relu_all) {
  const int64_t n = rows.size(0), C = out.size(1), R = out.size(0);
  float* po = out.data_ptr<float>();
  const float* py = y.data_ptr<float>();
  const int64_t* pr = rows.data_ptr<int64_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float* orow = po + pr[i] * C;
      const float* yr = py + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = orow[c] + yr[c];
        orow[c] = v > 0.f ? v : 0.f;
      }
    }
  });
  if (relu_all) {
    at::parallel_for(0, R * C, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) po[q] = po[q] > 0.f ? po[q] : 0.f;
    });
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("residual_epilogue", &residual_epilogue, "masked residual epilogue, in place (channels-last)");
  m.def("spatial_halting", &spatial_halting, "SACT halting map from a channels-last state");
  m.def("act_step", &act_step, "inference ACT step on per-position maps");
  m.def("unit_masks", &unit_masks, "first-conv mask and per-sample MACs of a stride-1 unit");
  m.def("scatter_residual", &scatter_residual, "sparse kernel residual epilogue on a row table, in place");
}
