// project_points as csrc/cuda/project_points.cu runs it, on the emulator.
#include <stdexcept>
#include <string>
#include <vector>

#include "dfa_kernels/cuda/project_points.cuh"
#include "harness.h"

namespace harness {
namespace {

// activation.h's parse_activation reports through c10's TORCH_CHECK (libc10); the harness links no torch.
dfa_kernels::Activation activation_of(const std::string& name) {
  using dfa_kernels::Activation;
  const std::pair<const char*, Activation> names[] = {{"none", Activation::None}, {"relu", Activation::Relu},
                                                      {"gelu", Activation::Gelu}, {"tanh", Activation::Tanh},
                                                      {"sigmoid", Activation::Sigmoid}, {"silu", Activation::Silu}};
  for (const auto& [n, a] : names) {
    if (name == n) return a;
  }
  throw std::runtime_error("unknown activation " + name);
}

}  // namespace

// Per point l (comma-separated lists): offsets, widths, scales, acts (activation name), act_kinds,
// act files ("-" for activation none) and out files. B (optional) is [K, ldb] of b_kind.
std::string run_project_points(const Case& c) {
  const int64_t N = c.i64("N"), K = c.i64("K");
  const std::string ek = c.str("e_kind"), ok = c.str("out_kind");
  if (N == 0 || K == 0) throw std::runtime_error("empty shapes are answered without a kernel");
  const auto offsets = c.list("offsets"), widths = c.list("widths"), scales = c.list("scales"), acts = c.list("acts"),
             act_kinds = c.list("act_kinds"), act_files = c.list("act_files"), outs = c.list("outs");
  const size_t n = offsets.size();
  if (widths.size() != n || scales.size() != n || acts.size() != n || act_kinds.size() != n ||
      act_files.size() != n || outs.size() != n) {
    throw std::runtime_error("per-point lists differ in length");
  }
  Mem e = Mem::read(c.str("e"), static_cast<size_t>(N * K) * elem_bytes(ek));
  dfa_kernels::PointsParams p{};
  p.e = e.bytes.get();
  p.N = N;
  p.K = K;
  p.skey = dfa_kernels::seed_key(static_cast<uint32_t>(c.i64("seed")));
  p.threshold = threshold_of(c);
  p.dist = dist_of(c.str("dist"));
  p.e_kind = kind_of(ek);
  p.out_kind = kind_of(ok);
  Mem B;
  if (c.has("B")) {
    const std::string bk = c.str("b_kind");
    p.ldb = c.i64("ldb");
    B = Mem::read(c.str("B"), static_cast<size_t>(K * p.ldb) * elem_bytes(bk));
    p.B = B.bytes.get();
    p.b_kind = kind_of(bk);
  }

  std::vector<Mem> act_mem, out_mem;
  std::vector<dfa_kernels::PointDesc> descs;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t l = 0; l < n; ++l) {
    dfa_kernels::PointDesc d{};
    d.offset = std::stoll(offsets[l]);
    d.width = std::stoll(widths[l]);
    d.scale = std::stof(scales[l]);
    d.act_fn = activation_of(acts[l]);
    out_mem.push_back(Mem::alloc(static_cast<size_t>(N * d.width) * elem_bytes(ok)));
    d.out = out_mem.back().bytes.get();
    if (act_files[l] != "-") {
      act_mem.push_back(Mem::read(act_files[l], static_cast<size_t>(N * d.width) * elem_bytes(act_kinds[l])));
      d.act = act_mem.back().bytes.get();
      d.act_kind = kind_of(act_kinds[l]);
    }
    descs.push_back(d);
    ranges.emplace_back(d.offset, d.width);
  }
  const auto plan = dfa_kernels::plan_points(N, K, ranges, caps_of(c));
  std::vector<Mem> partial_mem;
  std::vector<float*> partials;
  std::string spans = "[";
  for (const auto& span : plan.spans) {
    partial_mem.push_back(span.split.splits > 1
                              ? Mem::alloc(static_cast<size_t>(span.split.splits * N * (span.stop - span.start)) * 4)
                              : Mem{});
    partials.push_back(span.split.splits > 1 ? partial_mem.back().as<float>() : nullptr);
    spans += (spans.size() > 1 ? ", [" : "[") + std::to_string(span.start) + ", " + std::to_string(span.stop) + ", " +
             std::to_string(span.split.splits) + ", " + std::to_string(span.members.size()) + "]";
  }
  dfa_kernels::launch_points(plan, p, descs, partials, nullptr);
  for (size_t l = 0; l < n; ++l) out_mem[l].write(outs[l]);
  return "\"path\": \"points\", \"tm\": " + std::to_string(plan.tm) + ", \"spans\": " + spans + "]";
}

}  // namespace harness
