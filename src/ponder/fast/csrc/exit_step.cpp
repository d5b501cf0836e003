// The sparse early-exit executor's bookkeeping after one exit, as one call: the samples that leave
// write their logits and exit index into the batch-wide outputs, the rest are gathered out of every
// state tensor. ponder/fast/early_exit.py (exit_step) checks the conditions and holds the reference
// semantics; MultiExitModel._forward_sparse's PyTorch path does the same with index ops, and
// tests/test_early_exit_msdnet.py compares the two.
#include <torch/extension.h>

#include <cstring>
#include <vector>

namespace {

// leave [n] bool, here [n] int64 (batch positions of the n samples), logits [n, K] float32 contiguous,
// out_logits [B, K] and exit_index [B] int64 (written in place), state: tensors whose dim 0 is the n
// samples, each sample's slice contiguous (NCHW- or channels-last-contiguous). Returns
// [here of the staying samples, then each state tensor gathered to them, in the same memory format].
std::vector<torch::Tensor> exit_step(const torch::Tensor& leave, const torch::Tensor& here, const torch::Tensor& logits,
                                     torch::Tensor out_logits, torch::Tensor exit_index, int64_t k,
                                     const std::vector<torch::Tensor>& state) {
  const int64_t n = leave.size(0), K = logits.size(1);
  const bool* pl = leave.data_ptr<bool>();
  const int64_t* ph = here.data_ptr<int64_t>();
  std::vector<int64_t> stay;
  stay.reserve(n);
  const float* src = logits.data_ptr<float>();
  float* dst = out_logits.data_ptr<float>();
  int64_t* pe = exit_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (pl[i]) {
      std::memcpy(dst + ph[i] * K, src + i * K, K * sizeof(float));
      pe[ph[i]] = k;
    } else {
      stay.push_back(i);
    }
  }
  const int64_t m = static_cast<int64_t>(stay.size());
  std::vector<torch::Tensor> out;
  out.reserve(state.size() + 1);
  auto new_here = torch::empty({m}, here.options());
  int64_t* pn = new_here.data_ptr<int64_t>();
  for (int64_t j = 0; j < m; ++j) pn[j] = ph[stay[j]];
  out.push_back(new_here);
  for (const auto& t : state) {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[0] = m;
    const auto format = t.dim() == 4 && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    auto g = torch::empty(sizes, t.options().memory_format(format));
    const int64_t bytes = (n ? t.numel() / n : 0) * t.element_size();
    const char* ps = static_cast<const char*>(t.data_ptr());
    char* pg = static_cast<char*>(g.data_ptr());
    for (int64_t j = 0; j < m; ++j) std::memcpy(pg + j * bytes, ps + stay[j] * bytes, bytes);
    out.push_back(g);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("exit_step", &exit_step, "after one exit: write the leaving samples' outputs, gather the rest's state");
}
