// Fused CPU kernels for the spatial (SACT) sparse executor: the residual epilogues of the dense
// fall-back and of the sparse kernel, the spatial halting branch, the inference ACT step and a
// unit's mask dilation with its MACs, each one call and one pass instead of several PyTorch calls.
// Inference only, float32, activations channels-last ([B, C, H, W] tensors laid out as
// [B, H, W, C]), per-position maps [B, H, W] contiguous. ponder/nn/fused_spatial.py checks those
// conditions; the PyTorch paths these replace (ponder.nn.sparse_units, halting, sparse_cost) are
// the reference semantics, and tests/test_fused_spatial.py compares the two.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
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

// z = bias + sum_k tap_k(neighbour k) + g[b] on the stride-s output grid [B, Ho, Wo] (Ho = (H - 1) / s + 1) from
// planes [10, B*H*W] (any strides): plane k < 9 (k = 3 kh + kw) holds tap (kh, kw) of every input position
// (w . x + shift), zero outside the map (the zero padding of the conv's input); g[b] = mean of plane 9 over
// sample b + gconst. Output (i, j) reads input (s i + kh - 1, s j + kw - 1): a 3x3 conv with padding 1 and
// stride s. The 3x3 sum is nine shifted row additions; with `sigmoid` the map goes through ATen's
// vectorised sigmoid (SACT's halting scores), else it stays logits (DynConv's mask units).
torch::Tensor map_from_planes(const torch::Tensor& planes, int64_t B, int64_t H, int64_t W, double gconst,
                              double bias, int64_t s, bool sigmoid) {
  const int64_t HW = H * W, Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, sk = planes.stride(0),
                sq = planes.stride(1);
  const float* pt = planes.data_ptr<float>();
  auto z = torch::empty({B, Ho, Wo}, planes.options().memory_format(at::MemoryFormat::Contiguous));
  float* pz = z.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* gb = pt + 9 * sk + b * HW * sq;
      double gsum = 0.0;
      for (int64_t q = 0; q < HW; ++q) gsum += gb[q * sq];
      const float start = static_cast<float>(bias) + static_cast<float>(gsum / static_cast<double>(HW) + gconst);
      float* zb = pz + b * Ho * Wo;
      for (int64_t q = 0; q < Ho * Wo; ++q) zb[q] = start;
      for (int k = 0; k < 9; ++k) {
        const int64_t dh = k / 3 - 1, dw = k % 3 - 1;
        const float* tk = pt + k * sk + b * HW * sq;
        // output rows / columns whose input s * i + d lies inside the map
        const int64_t i0 = dh < 0 ? 1 : 0, i1 = H - 1 - dh < 0 ? 0 : std::min(Ho, (H - 1 - dh) / s + 1);
        const int64_t j0 = dw < 0 ? 1 : 0, j1 = W - 1 - dw < 0 ? 0 : std::min(Wo, (W - 1 - dw) / s + 1);
        for (int64_t i = i0; i < i1; ++i) {
          float* zr = zb + i * Wo;
          const float* tr = tk + ((s * i + dh) * W + dw) * sq;
          if (s == 1 && sq == 1) {
            for (int64_t j = j0; j < j1; ++j) zr[j] += tr[j];
          } else {
            const int64_t step = s * sq;
            for (int64_t j = j0; j < j1; ++j) zr[j] += tr[j * step];
          }
        }
      }
    }
  });
  return sigmoid ? z.sigmoid_() : z;
}

// The halting map of a channels-last x [B, C, H, W]: the tap planes as given ([10, B*H*W], any strides),
// or computed here as one BLAS GEMM, w10 @ rows(x)^T + t10.
torch::Tensor spatial_halting(torch::Tensor x, torch::Tensor w10, torch::Tensor t10, c10::optional<torch::Tensor> planes,
                              double gconst, double bias) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (planes.has_value()) return map_from_planes(*planes, B, H, W, gconst, bias, 1, true);
  const torch::Tensor rows = x.permute({0, 2, 3, 1}).reshape({B * H * W, C});
  return map_from_planes(at::addmm(t10.unsqueeze(1), w10, rows.t()), B, H, W, gconst, bias, 1, true);
}

// DynConv's mask logits [B, Ho, Wo] of a channels-last x [B, C, H, W]: conv3x3 (stride s, padding 1, bias)
// plus the global term w10[9] . mean(x) + gconst, through one GEMM w10 @ rows(x)^T.
torch::Tensor mask_logits(torch::Tensor x, torch::Tensor w10, double gconst, double bias, int64_t stride) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const torch::Tensor rows = x.permute({0, 2, 3, 1}).reshape({B * H * W, C});
  return map_from_planes(at::mm(w10, rows.t()), B, H, W, gconst, bias, stride, false);
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

// For a unit mask [B, H, W] whose first conv runs on its 3x3 dilation at the same grid (a stride-1 unit, or any
// BasicBlock): that dilation (zero padded; separable: an OR along rows, then along columns; skipped when `first`
// is undefined) and each sample's MACs, base + first_macs * |dilated| + rest_macs * |mask| (+ halt_macs if any
// position is active), in float64 (integer-valued, so exact in any order); counts [B, 2] = (|mask|, |dilated|).
void dilate_and_count(const torch::Tensor& mask, torch::Tensor& first, double base, double first_macs,
                      double rest_macs, double halt_macs, torch::Tensor& macs, torch::Tensor& counts) {
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2), HW = H * W;
  const bool dilate = first.defined();
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* pf = dilate ? reinterpret_cast<uint8_t*>(first.data_ptr<bool>()) : nullptr;
  double* pc = macs.data_ptr<double>();
  int64_t* pn = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> rows(dilate ? static_cast<size_t>(HW) : 0);
    for (int64_t b = lo; b < hi; ++b) {
      const uint8_t* mb = pm + b * HW;
      int64_t n_mask = 0, n_first = 0;
      for (int64_t q = 0; q < HW; ++q) n_mask += mb[q];
      if (dilate) {
        // along rows: border columns apart, so that the inner loop has no branches (vectorised)
        for (int64_t i = 0; i < H; ++i) {
          const uint8_t* mr = mb + i * W;
          uint8_t* rr = rows.data() + i * W;
          if (W == 1) {
            rr[0] = mr[0];
            continue;
          }
          rr[0] = mr[0] | mr[1];
          for (int64_t j = 1; j < W - 1; ++j) rr[j] = mr[j - 1] | mr[j] | mr[j + 1];
          rr[W - 1] = mr[W - 2] | mr[W - 1];
        }
        uint8_t* fb = pf + b * HW;
        for (int64_t i = 0; i < H; ++i) {  // along columns
          const uint8_t* up = rows.data() + (i > 0 ? i - 1 : i) * W;
          const uint8_t* mid = rows.data() + i * W;
          const uint8_t* down = rows.data() + (i + 1 < H ? i + 1 : i) * W;
          uint8_t* fr = fb + i * W;
          for (int64_t j = 0; j < W; ++j) fr[j] = up[j] | mid[j] | down[j];
        }
        for (int64_t q = 0; q < HW; ++q) n_first += fb[q];
      }
      pc[b] = base + first_macs * static_cast<double>(n_first) + rest_macs * static_cast<double>(n_mask) +
              (n_mask > 0 ? halt_macs : 0.0);
      pn[2 * b] = n_mask;
      pn[2 * b + 1] = n_first;
    }
  });
}

std::vector<torch::Tensor> unit_masks(torch::Tensor mask, double base, double first_macs, double rest_macs,
                                      double halt_macs) {
  auto first = torch::empty_like(mask);
  auto macs = torch::empty({mask.size(0)}, mask.options().dtype(torch::kFloat64));
  auto counts = torch::empty({mask.size(0), 2}, mask.options().dtype(torch::kInt64));
  dilate_and_count(mask, first, base, first_macs, rest_macs, halt_macs, macs, counts);
  return {first, macs};
}

// One DynConv block's decision at inference, in one call: the mask unit's logits (mask_logits), the mask
// logits >= threshold (or the `forced` bool map, the logits still computed: a benchmark pays for the mask unit),
// and dilate_and_count on it (without the dilation when `dilate` is false: a strided Bottleneck, whose first conv
// runs on the input grid). Returns (mask, first (None without dilate), macs [B], |mask| and |first| over the batch).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t> mask_decide(
    torch::Tensor x, torch::Tensor w10, double gconst, double bias, int64_t stride, double threshold,
    c10::optional<torch::Tensor> forced, bool dilate, double base, double first_macs, double rest_macs) {
  const torch::Tensor z = mask_logits(x, w10, gconst, bias, stride);
  const torch::Tensor mask = forced.has_value() ? *forced : at::ge(z, threshold);
  torch::Tensor first = dilate ? torch::empty_like(mask) : torch::Tensor();
  const int64_t B = mask.size(0);
  auto macs = torch::empty({B}, z.options().dtype(torch::kFloat64));
  auto counts = torch::empty({B, 2}, z.options().dtype(torch::kInt64));
  dilate_and_count(mask, first, base, first_macs, rest_macs, 0.0, macs, counts);
  const int64_t* pn = counts.data_ptr<int64_t>();
  int64_t n_mask = 0, n_first = 0;
  for (int64_t b = 0; b < B; ++b) {
    n_mask += pn[2 * b];
    n_first += pn[2 * b + 1];
  }
  return {mask, first, macs, n_mask, n_first};
}

// One SACT unit's inference tail in one call, after the unit computed its output x: the halting scores of x
// (spatial_halting with w10 / t10, or from the given planes; none for the stage's last unit, w10 undefined),
// replaced by `forced_h` when given (forced decisions: the scores are computed all the same), the ACT step
// (act_step: sums, p, running, output += p * x), then for the next unit (when `next`): its mask (= running)
// dilated 3x3 at the same grid with its per-sample MACs (dilate_and_count) and active counts over the batch.
// Returns (p, running, output, next first mask or None, next MACs or None, |running|, |dilated|).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t> sact_step(
    torch::Tensor hsum, torch::Tensor n, torch::Tensor rem, torch::Tensor run, torch::Tensor x,
    c10::optional<torch::Tensor> out, c10::optional<torch::Tensor> w10, c10::optional<torch::Tensor> t10,
    c10::optional<torch::Tensor> planes, double gconst, double bias, c10::optional<torch::Tensor> forced_h,
    double eps, bool next, double base, double first_macs, double rest_macs, double halt_macs) {
  const bool last = !w10.has_value();
  c10::optional<torch::Tensor> h;
  if (!last) {
    torch::Tensor scores = spatial_halting(x, *w10, *t10, planes, gconst, bias);
    h = forced_h.has_value() ? *forced_h : scores;
  }
  std::vector<torch::Tensor> stepped = act_step(hsum, n, rem, run, h, x, out, eps, last);
  torch::Tensor first, macs;
  int64_t n_mask = 0, n_first = 0;
  const torch::Tensor& running = stepped[1];
  if (next) {
    first = torch::empty_like(running);
    macs = torch::empty({running.size(0)}, hsum.options().dtype(torch::kFloat64));
    auto counts = torch::empty({running.size(0), 2}, hsum.options().dtype(torch::kInt64));
    dilate_and_count(running, first, base, first_macs, rest_macs, halt_macs, macs, counts);
    const int64_t* pn = counts.data_ptr<int64_t>();
    for (int64_t b = 0; b < running.size(0); ++b) {
      n_mask += pn[2 * b];
      n_first += pn[2 * b + 1];
    }
  }
  return {stepped[0], running, stepped[2], first, macs, n_mask, n_first};
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
  m.def("sact_step", &sact_step, "a SACT unit's halting, ACT step and the next unit's mask, MACs and activity");
  m.def("mask_decide", &mask_decide, "a DynConv block's mask, dilated mask, MACs and counts at inference");
  m.def("mask_logits", &mask_logits, "DynConv mask logits from a channels-last block input (any stride)");
  m.def("scatter_residual", &scatter_residual, "sparse kernel residual epilogue on a row table, in place");
}
