// Direct 3x3 convolution (padding 1, stride 1 or 2) for channels-last float32 inference, with the
// bias and an optional ReLU fused: the kernel behind ponder.fast.small_conv. Built for the machine it
// runs on (-march=native), it vectorises over output positions rather than channels, so it stays
// efficient where oneDNN and PyTorch are not: few channels (MSDNet's 6-channel convolutions on
// 32x32 maps) and small batches, where their fixed cost per call (~20 us) exceeds the arithmetic.
//
// Per sample, the input is copied once into zero-padded planes, one per channel ([C][H+2][W+2]);
// for stride 2 as four phase planes (even/odd padded rows x even/odd padded columns), so that every
// tap of every output row is a contiguous run. Output positions are then flattened over the padded
// row pitch (a few junk columns per row, never stored), and each block of 2x16 positions x 8 output
// channels accumulates in registers over all C x 9 taps. The weights come pre-blocked as
// [ceil(Cout/8)][C*9][8] (zero-padded), so each block reads its weights once, contiguously.
//
// A second kernel, conv3x3_gemm, serves the opposite shape: few output positions and many output
// channels (an exit head at batch 1: 16 positions, 128 channels, a 1 MB weight). It gathers the
// patches (im2col, [P, 9C]) and runs them against the weight pre-blocked as [ceil(Cout/32)][9C][32],
// 8 positions x 32 output channels per block, vectorised over channels, each weight read once per
// 8 positions. linear_rows runs the same block GEMM on rows as they are (1x1 convolutions),
// exit_head a whole exit classifier (two such convolutions, a mean, a linear layer) in one call, and
// pooled_mlp a gated ResNet's router (a mean over positions, two small linear layers) in one call,
// relational_router RDI-Net's (that router, a mean of three, a linear layer), and pooled_lstm_gate a SkipNet
// recurrent gate step (a mean, a projection, an LSTM cell, a linear layer).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;  // floats per vector
constexpr int kRuns = 2;    // vectors of output positions per block (independent accumulator chains)
constexpr int kOut = 8;     // output channels per block (the weight blocking)
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

struct Geometry {
  int64_t C, H, W, s, Ho, Wo;
  int64_t pitch;  // floats per padded (phase) row
  int64_t plane;  // floats per (phase, channel) plane, with a zero tail for the last block's over-read
};

Geometry geometry(int64_t C, int64_t H, int64_t W, int64_t s) {
  const int64_t Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const int64_t pitch = s == 1 ? W + 2 : (W + 3) / 2, rows = s == 1 ? H + 2 : (H + 3) / 2;
  return {C, H, W, s, Ho, Wo, pitch, rows * pitch + kRuns * kLanes + pitch + 2};
}

// Sample x (strides sH, sW, channel stride 1) into the padded planes P (borders stay zero).
void to_planes(const float* x, int64_t sH, int64_t sW, const Geometry& g, float* P) {
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      const float* src = x + h * sH + w * sW;
      const int64_t hp = h + 1, wp = w + 1;
      float* dst = g.s == 1 ? P + hp * g.pitch + wp
                            : P + ((hp & 1) * 2 + (wp & 1)) * g.C * g.plane + (hp >> 1) * g.pitch + (wp >> 1);
      for (int64_t c = 0; c < g.C; ++c) dst[c * g.plane] = src[c];
    }
  }
}

// Output channels o0 .. o0+OB of one sample: out[oh, ow, o] (row stride oH, position stride oW).
template <int OB>
void out_block(const float* P, const Geometry& g, const float* wb, const float* bias, int64_t o0, bool relu,
               float* out, int64_t oH, int64_t oW) {
  const int64_t Q = g.Ho * g.pitch;
  for (int64_t q0 = 0; q0 < Q; q0 += kRuns * kLanes) {
    Vec acc[kRuns][OB];
    for (int o = 0; o < OB; ++o) {
      for (int u = 0; u < kRuns; ++u) acc[u][o] = Vec{} + bias[o0 + o];
    }
    const float* wk = wb;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int kh = 0; kh < 3; ++kh) {
        for (int kw = 0; kw < 3; ++kw, wk += kOut) {
          const float* src = g.s == 1
              ? P + c * g.plane + kh * g.pitch + kw + q0
              : P + (((kh & 1) * 2 + (kw & 1)) * g.C + c) * g.plane + (kh >> 1) * g.pitch + (kw >> 1) + q0;
          Vec v[kRuns];
          for (int u = 0; u < kRuns; ++u) std::memcpy(&v[u], src + u * kLanes, sizeof(Vec));
          for (int o = 0; o < OB; ++o) {
            const float w = wk[o];
            for (int u = 0; u < kRuns; ++u) acc[u][o] += w * v[u];
          }
        }
      }
    }
    for (int u = 0; u < kRuns; ++u) {
      float lanes[OB][kLanes];
      for (int o = 0; o < OB; ++o) {
        Vec a = acc[u][o];
        if (relu) a = a > 0.f ? a : Vec{};
        std::memcpy(lanes[o], &a, sizeof(Vec));
      }
      const int64_t qu = q0 + u * kLanes;
      for (int j = 0; j < kLanes && qu + j < Q; ++j) {
        const int64_t oh = (qu + j) / g.pitch, ow = (qu + j) - oh * g.pitch;
        if (ow >= g.Wo) continue;  // a padding column of the flattened rows
        float* dst = out + oh * oH + ow * oW + o0;
        for (int o = 0; o < OB; ++o) dst[o] = lanes[o][j];
      }
    }
  }
}

using BlockFn = void (*)(const float*, const Geometry&, const float*, const float*, int64_t, bool, float*, int64_t,
                         int64_t);
constexpr BlockFn kBlocks[kOut + 1] = {nullptr,       out_block<1>, out_block<2>, out_block<3>, out_block<4>,
                                       out_block<5>, out_block<6>, out_block<7>, out_block<8>};

// Below this many multiply-adds per sample a layer is not split over threads within one sample (a
// parallel region costs ~10 us; MSDNet's small layers take 3-12 us whole).
constexpr int64_t kSplitMacs = 2000000;

// x [B, C, H, W] (channels-last: channel stride 1), wb [ceil(Cout/8), C*9, 8] (block-major, taps in
// (c, kh, kw) order, zero-padded), bias [Cout] -> [B, Cout, Ho, Wo] channels-last.
torch::Tensor conv3x3(const torch::Tensor& x, const torch::Tensor& wb, const torch::Tensor& bias, int64_t stride,
                      bool relu) {
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat32, "x: channels-last float32");
  TORCH_CHECK(stride == 1 || stride == 2, "stride 1 or 2");
  const int64_t B = x.size(0), Cout = bias.size(0);
  TORCH_CHECK(wb.is_contiguous() && wb.dim() == 3 && wb.size(1) == x.size(1) * 9 && wb.size(2) == kOut &&
                  wb.size(0) == (Cout + kOut - 1) / kOut,
              "weight: blocked [ceil(Cout/8), C*9, 8]");
  const Geometry g = geometry(x.size(1), x.size(2), x.size(3), stride);
  auto out = torch::empty({B, Cout, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* px = x.data_ptr<float>();
  const float* pw = wb.data_ptr<float>();
  const torch::Tensor b_ = bias.contiguous();
  const float* pb = b_.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t planes = (stride == 1 ? 1 : 4) * g.C * g.plane, sB = x.stride(0), sH = x.stride(2),
                sW = x.stride(3), oB = g.Ho * g.Wo * Cout, blocks = (Cout + kOut - 1) / kOut;
  auto block = [&](const float* P, int64_t b, int64_t k) {
    const int64_t o0 = k * kOut;
    const int ob = static_cast<int>(std::min<int64_t>(kOut, Cout - o0));
    kBlocks[ob](P, g, pw + k * g.C * 9 * kOut, pb, o0, relu, po + b * oB, g.Wo * Cout, Cout);
  };
  const int64_t block_macs = g.Ho * g.Wo * g.C * 9 * kOut;
  if (B < at::get_num_threads() && blocks > 1 && block_macs * blocks >= kSplitMacs) {
    // fewer samples than threads and a large layer (ImageNet-sized maps at batch 1): one copy of each
    // sample's planes, its output-channel blocks split over the threads (the same sums, in the same order)
    std::vector<float> P(planes, 0.f);
    for (int64_t b = 0; b < B; ++b) {
      to_planes(px + b * sB, sH, sW, g, P.data());
      at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) block(P.data(), b, k);
      });
    }
    return out;
  }
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> P(planes, 0.f);
    for (int64_t b = lo; b < hi; ++b) {
      to_planes(px + b * sB, sH, sW, g, P.data());
      for (int64_t k = 0; k < blocks; ++k) block(P.data(), b, k);
    }
  });
  return out;
}

constexpr int kGemmOut = 2 * kLanes;  // output channels per GEMM block (two vectors)
constexpr int kGemmRows = 8;          // output positions per GEMM block

// Rows r < R of the table A (row pitch lda, K columns) times one weight block wb [K][32]: out[r][0 .. valid).
template <int R>
void gemm_rows(const float* A, int64_t lda, int64_t K, const float* wb, const float* bias, bool relu, float* out,
               int64_t oP, int valid) {
  Vec acc[R][2];
  Vec b0, b1;
  std::memcpy(&b0, bias, sizeof(Vec));
  std::memcpy(&b1, bias + kLanes, sizeof(Vec));
  for (int r = 0; r < R; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec w0, w1;
    std::memcpy(&w0, wb + k * kGemmOut, sizeof(Vec));
    std::memcpy(&w1, wb + k * kGemmOut + kLanes, sizeof(Vec));
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + k];
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float lanes[kGemmOut];
    for (int v = 0; v < 2; ++v) {
      Vec a = acc[r][v];
      if (relu) a = a > 0.f ? a : Vec{};
      std::memcpy(lanes + v * kLanes, &a, sizeof(Vec));
    }
    std::memcpy(out + r * oP, lanes, valid * sizeof(float));
  }
}

using GemmFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, bool, float*, int64_t, int);
constexpr GemmFn kGemms[kGemmRows + 1] = {nullptr,        gemm_rows<1>, gemm_rows<2>, gemm_rows<3>, gemm_rows<4>,
                                          gemm_rows<5>, gemm_rows<6>, gemm_rows<7>, gemm_rows<8>};

// out [P, N] (row pitch N) = act(A [P, K] (row pitch lda) x W + bias) with wg [ceil(N/32), K, 32]
// (W blocked by 32 output columns, zero-padded): blocks of 8 rows x 32 columns, the column block
// outermost so that its weights stay in cache.
void block_gemm(const float* A, int64_t lda, int64_t P, int64_t K, const torch::Tensor& wg, const torch::Tensor& bias,
                bool relu, float* out) {
  const int64_t N = bias.size(0), blocks = (N + kGemmOut - 1) / kGemmOut;
  TORCH_CHECK(wg.is_contiguous() && wg.dim() == 3 && wg.size(0) == blocks && wg.size(1) == K &&
                  wg.size(2) == kGemmOut,
              "weight: blocked [ceil(N/32), K, 32]");
  std::vector<float> pbias(blocks * kGemmOut, 0.f);
  const torch::Tensor b_ = bias.contiguous();
  std::memcpy(pbias.data(), b_.data_ptr<float>(), N * sizeof(float));
  const float* pw = wg.data_ptr<float>();
  const int64_t row_blocks = (P + kGemmRows - 1) / kGemmRows;
  at::parallel_for(0, row_blocks * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t ob = t / row_blocks, r0 = (t % row_blocks) * kGemmRows;
      const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, P - r0));
      const int valid = static_cast<int>(std::min<int64_t>(kGemmOut, N - ob * kGemmOut));
      kGemms[rows](A + r0 * lda, lda, K, pw + ob * K * kGemmOut, pbias.data() + ob * kGemmOut, relu,
                   out + r0 * N + ob * kGemmOut, N, valid);
    }
  });
}

// The 3x3 patches (padding 1) of a channels-last map x [B, C, H, W] (strides sB, sH, sW; channel
// stride 1) as rows A [B*Ho*Wo, 9C], taps in (kh, kw, c) order.
void patches(const float* px, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sB, int64_t sH, int64_t sW,
             int64_t stride, float* A) {
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, K = 9 * C;
  at::parallel_for(0, B * Ho * Wo, kGemmRows, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t b = p / (Ho * Wo), oh = (p / Wo) % Ho, ow = p % Wo;
      float* row = A + p * K;
      for (int kh = 0; kh < 3; ++kh) {
        for (int kw = 0; kw < 3; ++kw, row += C) {
          const int64_t ih = oh * stride + kh - 1, iw = ow * stride + kw - 1;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) std::memset(row, 0, C * sizeof(float));
          else std::memcpy(row, px + b * sB + ih * sH + iw * sW, C * sizeof(float));
        }
      }
    }
  });
}

// x [B, C, H, W] (channels-last), wg [ceil(Cout/32), 9C, 32] (taps in (kh, kw, c) order, zero-padded),
// bias [Cout] -> [B, Cout, Ho, Wo] channels-last: the patches [B*Ho*Wo, 9C], then block_gemm.
torch::Tensor conv3x3_gemm(const torch::Tensor& x, const torch::Tensor& wg, const torch::Tensor& bias,
                           int64_t stride, bool relu) {
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat32, "x: channels-last float32");
  TORCH_CHECK(stride == 1 || stride == 2, "stride 1 or 2");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = 9 * C;
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, P = B * Ho * Wo;
  auto out = torch::empty({B, bias.size(0), Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<float> A(P * K);
  patches(x.data_ptr<float>(), B, C, H, W, x.stride(0), x.stride(2), x.stride(3), stride, A.data());
  block_gemm(A.data(), K, P, K, wg, bias, relu, out.data_ptr<float>());
  return out;
}

// An exit head in one call: two 3x3 convolutions (padding 1, stride 2, bias, ReLU) on the block GEMM,
// the mean over the second one's positions, and a linear layer. x [B, C, H, W] channels-last, wg1
// [ceil(C1/32), 9C, 32], bias1 [C1], wg2 [ceil(C2/32), 9*C1, 32], bias2 [C2], lin_w [N, C2], lin_b [N]
// -> {feature [B, C2], logits [B, N]}.
std::vector<torch::Tensor> exit_head(const torch::Tensor& x, const torch::Tensor& wg1, const torch::Tensor& bias1,
                                     const torch::Tensor& wg2, const torch::Tensor& bias2,
                                     const torch::Tensor& lin_w, const torch::Tensor& lin_b) {
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat32, "x: channels-last float32");
  const int64_t B = x.size(0), C = x.size(1), C1 = bias1.size(0), C2 = bias2.size(0), N = lin_b.size(0);
  TORCH_CHECK(lin_w.is_contiguous() && lin_w.size(0) == N && lin_w.size(1) == C2, "lin_w: [N, C2] contiguous");
  const int64_t H1 = (x.size(2) - 1) / 2 + 1, W1 = (x.size(3) - 1) / 2 + 1;
  const int64_t H2 = (H1 - 1) / 2 + 1, W2 = (W1 - 1) / 2 + 1, P1 = B * H1 * W1, P2 = B * H2 * W2;
  std::vector<float> A1(P1 * 9 * C), y1(P1 * C1), A2(P2 * 9 * C1), y2(P2 * C2);
  patches(x.data_ptr<float>(), B, C, x.size(2), x.size(3), x.stride(0), x.stride(2), x.stride(3), 2, A1.data());
  block_gemm(A1.data(), 9 * C, P1, 9 * C, wg1, bias1, true, y1.data());
  patches(y1.data(), B, C1, H1, W1, H1 * W1 * C1, W1 * C1, C1, 2, A2.data());
  block_gemm(A2.data(), 9 * C1, P2, 9 * C1, wg2, bias2, true, y2.data());
  auto feat = torch::zeros({B, C2}, x.options());
  auto logits = torch::empty({B, N}, x.options());
  const torch::Tensor lb = lin_b.contiguous();
  const float* pw = lin_w.data_ptr<float>();
  const float* pb = lb.data_ptr<float>();
  const float scale = 1.f / static_cast<float>(H2 * W2);
  for (int64_t b = 0; b < B; ++b) {
    float* f = feat.data_ptr<float>() + b * C2;
    for (int64_t q = 0; q < H2 * W2; ++q) {
      const float* row = y2.data() + (b * H2 * W2 + q) * C2;
      for (int64_t c = 0; c < C2; ++c) f[c] += row[c];
    }
    for (int64_t c = 0; c < C2; ++c) f[c] *= scale;
    float* out = logits.data_ptr<float>() + b * N;
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t c = 0; c < C2; ++c) acc += f[c] * pw[n * C2 + c];
      out[n] = acc + pb[n];
    }
  }
  return {feat, logits};
}

// act(x @ W^T + bias) for rows x [P, K] (column stride 1, any row stride), wg [ceil(N/32), K, 32]
// (W^T blocked by 32 output columns), bias [N] -> [P, N]: a 1x1 convolution on channels-last rows,
// with no fixed cost beyond the call.
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& wg, const torch::Tensor& bias, bool relu) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat32, "x: float32 rows");
  auto out = torch::empty({x.size(0), bias.size(0)}, x.options());
  block_gemm(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), wg, bias, relu, out.data_ptr<float>());
  return out;
}

// The input of the pooled kernels: x [B, C, H, W] contiguous channels-last float32 (each sample [HW, C] rows).
void check_pooled_input(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1 && x.stride(3) == x.size(1) && x.stride(2) == x.size(1) * x.size(3)
              && x.scalar_type() == torch::kFloat32, "x: contiguous channels-last float32");
}

// out[j] = bias[j] + sum_c mean(x)[c] * wt[c, j] for one channels-last sample x [HW, C] and wt [C, J]
// (mean: scratch of C floats).
void pooled_affine(const float* px, int64_t HW, int64_t C, const float* wt, const float* bias, int64_t J,
                   float* mean, float* out) {
  std::fill(mean, mean + C, 0.f);
  for (int64_t q = 0; q < HW; ++q)
    for (int64_t c = 0; c < C; ++c) mean[c] += px[q * C + c];
  const float scale = 1.f / static_cast<float>(HW);
  std::copy(bias, bias + J, out);
  for (int64_t c = 0; c < C; ++c) {
    const float m = mean[c] * scale;
    for (int64_t j = 0; j < J; ++j) out[j] += m * wt[c * J + j];
  }
}

// A router at inference in one call: logits = W2 act(W1 mean(x) + b1) + b2 for x [B, C, H, W]
// channels-last, w1t [C, Hd] (W1 transposed, contiguous), b1 [Hd], w2t [Hd, K], b2 [K] -> [B, K];
// act is ReLU when relu. At batch 1 this replaces five PyTorch calls (~25 us) with one (~2 us).
torch::Tensor pooled_mlp(const torch::Tensor& x, const torch::Tensor& w1t, const torch::Tensor& b1,
                         const torch::Tensor& w2t, const torch::Tensor& b2, bool relu) {
  check_pooled_input(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Hd = b1.size(0), K = b2.size(0);
  TORCH_CHECK(w1t.is_contiguous() && w1t.size(0) == C && w1t.size(1) == Hd && w2t.is_contiguous()
              && w2t.size(0) == Hd && w2t.size(1) == K && b1.is_contiguous() && b2.is_contiguous(),
              "w1t [C, Hd], b1 [Hd], w2t [Hd, K], b2 [K], contiguous");
  auto logits = torch::empty({B, K}, x.options());
  std::vector<float> mean(C), hidden(Hd);
  const float *pw1 = w1t.data_ptr<float>(), *pb1 = b1.data_ptr<float>();
  const float *pw2 = w2t.data_ptr<float>(), *pb2 = b2.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    pooled_affine(x.data_ptr<float>() + b * x.stride(0), HW, C, pw1, pb1, Hd, mean.data(), hidden.data());
    float* out = logits.data_ptr<float>() + b * K;
    std::copy(pb2, pb2 + K, out);
    for (int64_t j = 0; j < Hd; ++j) {
      const float h = relu ? std::max(hidden[j], 0.f) : hidden[j];
      for (int64_t k = 0; k < K; ++k) out[k] += h * pw2[j * K + k];
    }
  }
  return logits;
}

// RDI-Net's relational router at inference in one call: r = pooled_mlp(x, ...) [B, K], then the graph
// layer g = (r + prev1 + prev2) / 3 and logits = Wo g + bo (wot [K, Ko] = Wo transposed, bo [Ko]);
// prev1, prev2 [B, K] are the two previous routers' r -> {logits [B, Ko], r}.
std::vector<torch::Tensor> relational_router(const torch::Tensor& x, const torch::Tensor& w1t, const torch::Tensor& b1,
                                             const torch::Tensor& w2t, const torch::Tensor& b2, bool relu,
                                             const torch::Tensor& prev1, const torch::Tensor& prev2,
                                             const torch::Tensor& wot, const torch::Tensor& bo) {
  auto r = pooled_mlp(x, w1t, b1, w2t, b2, relu);
  const int64_t B = r.size(0), K = r.size(1), Ko = bo.size(0);
  TORCH_CHECK(prev1.is_contiguous() && prev2.is_contiguous() && prev1.sizes() == r.sizes()
              && prev2.sizes() == r.sizes() && prev1.scalar_type() == torch::kFloat32
              && prev2.scalar_type() == torch::kFloat32, "prev1, prev2 [B, K] float32, contiguous");
  TORCH_CHECK(wot.is_contiguous() && wot.size(0) == K && wot.size(1) == Ko && bo.is_contiguous(),
              "wot [K, Ko], bo [Ko], contiguous");
  auto logits = torch::empty({B, Ko}, r.options());
  const float *pr = r.data_ptr<float>(), *p1 = prev1.data_ptr<float>(), *p2 = prev2.data_ptr<float>();
  const float *pwo = wot.data_ptr<float>(), *pbo = bo.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* out = logits.data_ptr<float>() + b * Ko;
    std::copy(pbo, pbo + Ko, out);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = b * K + k;
      const float g = (pr[i] + p1[i] + p2[i]) / 3.f;
      for (int64_t o = 0; o < Ko; ++o) out[o] += g * pwo[k * Ko + o];
    }
  }
  return {logits, r};
}

// A SkipNet recurrent gate step at inference in one call, for x [B, C, H, W] channels-last and the
// LSTM state h, c [B, Hd]: p = Wp mean(x) + bp (wpt [C, P], bp [P]); one LSTM cell step in PyTorch's
// gate order (i, f, g, o) with wih_t [P, 4Hd], whh_t [Hd, 4Hd], b4 [4Hd] = b_ih + b_hh; then the keep
// logit wo . h' + bo (wo [Hd], bo [1]) -> {logit [B], h' [B, Hd], c' [B, Hd]}. Replaces about ten
// PyTorch calls (~55 us at batch 1) with one.
std::vector<torch::Tensor> pooled_lstm_gate(const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& c,
                                            const torch::Tensor& wpt, const torch::Tensor& bp,
                                            const torch::Tensor& wih_t, const torch::Tensor& whh_t,
                                            const torch::Tensor& b4, const torch::Tensor& wo, const torch::Tensor& bo) {
  check_pooled_input(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), P = bp.size(0), Hd = wo.size(0);
  TORCH_CHECK(h.is_contiguous() && c.is_contiguous() && h.size(0) == B && h.size(1) == Hd && c.sizes() == h.sizes()
              && h.scalar_type() == torch::kFloat32 && c.scalar_type() == torch::kFloat32, "h, c [B, Hd] float32");
  TORCH_CHECK(wpt.is_contiguous() && wpt.size(0) == C && wpt.size(1) == P && wih_t.is_contiguous()
              && wih_t.size(0) == P && wih_t.size(1) == 4 * Hd && whh_t.is_contiguous() && whh_t.size(0) == Hd
              && whh_t.size(1) == 4 * Hd && b4.numel() == 4 * Hd && bo.numel() == 1,
              "wpt [C, P], bp [P], wih_t [P, 4Hd], whh_t [Hd, 4Hd], b4 [4Hd], wo [Hd], bo [1], contiguous");
  auto logit = torch::empty({B}, x.options());
  auto h2 = torch::empty({B, Hd}, x.options()), c2 = torch::empty({B, Hd}, x.options());
  std::vector<float> mean(C), proj(P), gates(4 * Hd);
  const float *pwp = wpt.data_ptr<float>(), *pbp = bp.data_ptr<float>(), *pwi = wih_t.data_ptr<float>();
  const float *pwh = whh_t.data_ptr<float>(), *pb4 = b4.data_ptr<float>(), *pwo = wo.data_ptr<float>();
  const float bias_out = bo.data_ptr<float>()[0];
  auto sigmoid = [](float v) { return 1.f / (1.f + std::exp(-v)); };
  for (int64_t b = 0; b < B; ++b) {
    pooled_affine(x.data_ptr<float>() + b * x.stride(0), HW, C, pwp, pbp, P, mean.data(), proj.data());
    std::copy(pb4, pb4 + 4 * Hd, gates.begin());
    for (int64_t j = 0; j < P; ++j)
      for (int64_t k = 0; k < 4 * Hd; ++k) gates[k] += proj[j] * pwi[j * 4 * Hd + k];
    const float *ph = h.data_ptr<float>() + b * Hd, *pc = c.data_ptr<float>() + b * Hd;
    for (int64_t j = 0; j < Hd; ++j)
      for (int64_t k = 0; k < 4 * Hd; ++k) gates[k] += ph[j] * pwh[j * 4 * Hd + k];
    float *oh = h2.data_ptr<float>() + b * Hd, *oc = c2.data_ptr<float>() + b * Hd, out = bias_out;
    for (int64_t j = 0; j < Hd; ++j) {
      const float in = sigmoid(gates[j]), forget = sigmoid(gates[Hd + j]);
      const float cell = std::tanh(gates[2 * Hd + j]), outg = sigmoid(gates[3 * Hd + j]);
      oc[j] = forget * pc[j] + in * cell;
      oh[j] = outg * std::tanh(oc[j]);
      out += pwo[j] * oh[j];
    }
    logit.data_ptr<float>()[b] = out;
  }
  return {logit, h2, c2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv3x3", &conv3x3, "3x3 convolution (padding 1, stride 1/2) + bias (+ ReLU), channels-last float32");
  m.def("conv3x3_gemm", &conv3x3_gemm, "the same as patches x blocked weight (few positions, many channels)");
  m.def("exit_head", &exit_head, "two 3x3/2 convolutions + ReLU, mean, linear: {feature, logits}");
  m.def("linear_rows", &linear_rows, "act(x @ W^T + b) on rows with a blocked weight (1x1 convolutions)");
  m.def("pooled_mlp", &pooled_mlp, "a router: W2 act(W1 mean(x) + b1) + b2 on channels-last x");
  m.def("relational_router", &relational_router, "RDI-Net's router: pooled_mlp, graph layer, output layer");
  m.def("pooled_lstm_gate", &pooled_lstm_gate, "a SkipNet RNN gate step: mean, projection, LSTM cell, keep logit");
}
