// project, project_materialized and feedback_matrix as csrc/cuda/project.cu runs them, on the emulator.
#include <cstring>
#include <stdexcept>
#include <string>

#include "dfa_kernels/cuda/gemm.cuh"
#include "dfa_kernels/cuda/project.cuh"
#include "harness.h"

namespace harness {
namespace {

using dfa_kernels::FpKind;

// e [N, K] from its file; `misalign` elements of offset into its allocation (a contiguous tensor
// that does not start on a 16-byte boundary).
struct Input {
  Mem mem;
  const void* ptr;
};
Input read_e(const Case& c, int64_t N, int64_t K, size_t eb) {
  const int64_t misalign = c.has("misalign") ? c.i64("misalign") : 0;
  Mem file = Mem::read(c.str("e"), static_cast<size_t>(N * K) * eb);
  if (misalign == 0) {
    const void* p = file.bytes.get();
    return {std::move(file), p};
  }
  Mem m = Mem::alloc(static_cast<size_t>(N * K + misalign) * eb);
  std::memcpy(m.bytes.get() + misalign * eb, file.bytes.get(), file.size);
  const void* p = m.bytes.get() + misalign * eb;
  return {std::move(m), p};
}

std::string narrow_json(const dfa_kernels::NarrowPlan& p) {
  return "\"path\": \"narrow\", \"kmax\": " + std::to_string(p.kmax) + ", \"rows_per_block\": " +
         std::to_string(p.rows_per_block) + ", \"blocks\": " + std::to_string(p.blocks);
}

dfa_kernels::NarrowParams narrow_params(const void* e, void* out, const float* cs, int64_t N, int64_t K, int64_t W,
                                        float scale, FpKind ek, FpKind ok) {
  dfa_kernels::NarrowParams p{};
  p.e = e;
  p.out = out;
  p.col_scale = cs;
  p.N = N;
  p.K = K;
  p.W = W;
  p.scale = scale;
  p.e_kind = ek;
  p.out_kind = ok;
  return p;
}

Mem read_col_scale(const Case& c, int64_t W) {
  return c.has("col_scale") ? Mem::read(c.str("col_scale"), static_cast<size_t>(W) * 4) : Mem{};
}

}  // namespace

dfa_kernels::FpKind kind_of(const std::string& k) {
  if (k == "f32") return dfa_kernels::FpKind::F32;
  if (k == "f16") return dfa_kernels::FpKind::F16;
  if (k == "bf16") return dfa_kernels::FpKind::BF16;
  throw std::runtime_error("unsupported kind " + k);
}

std::string run_project(const Case& c) {
  const int64_t N = c.i64("N"), K = c.i64("K"), W = c.i64("W");
  const std::string ek = c.str("e_kind"), ok = c.str("out_kind");
  if (N == 0 || W == 0 || K == 0) throw std::runtime_error("empty shapes are answered without a kernel");
  Input e = read_e(c, N, K, elem_bytes(ek));
  Mem cs = read_col_scale(c, W);
  Mem out = Mem::alloc(static_cast<size_t>(N * W) * elem_bytes(ok));
  const uint32_t seed = static_cast<uint32_t>(c.i64("seed"));
  const auto dist = dist_of(c.str("dist"));
  const uint32_t threshold = threshold_of(c);
  const float scale = static_cast<float>(c.f64("scale"));
  const float* csp = cs.size ? cs.as<float>() : nullptr;
  const auto plan = dfa_kernels::plan_project(N, K, W, ek != "f32", caps_of(c));
  if (plan.path == dfa_kernels::ProjectPath::Narrow) {
    dfa_kernels::launch_narrow(plan.narrow, narrow_params(e.ptr, out.bytes.get(), csp, N, K, W, scale, kind_of(ek), kind_of(ok)),
                               dfa_kernels::GeneratedB<1>{dist, dfa_kernels::seed_key(seed), threshold, 0, {}}, nullptr);
    out.write(c.str("out"));
    return narrow_json(plan.narrow);
  }
  dfa_kernels::ProjectParams p{};
  p.e = e.ptr;
  p.out = out.bytes.get();
  p.col_scale = csp;
  p.N = N;
  p.K = K;
  p.W = W;
  p.scale = scale;
  p.skey = dfa_kernels::seed_key(seed);
  p.threshold = threshold;
  p.dist = dist;
  p.in_kind = kind_of(ek);
  p.out_kind = kind_of(ok);
  Mem padded, partial;
  if (plan.lde != K) {  // as project.cu: a zero-padded copy with rows of plan.lde entries
    const size_t eb = elem_bytes(ek);
    padded = Mem::alloc(static_cast<size_t>(N * plan.lde) * eb);
    std::memset(padded.bytes.get(), 0, padded.size);
    for (int64_t r = 0; r < N; ++r) {
      std::memcpy(padded.bytes.get() + r * plan.lde * eb, static_cast<const unsigned char*>(e.ptr) + r * K * eb, K * eb);
    }
    p.e = padded.bytes.get();
  }
  if (plan.split.splits > 1) {
    partial = Mem::alloc(static_cast<size_t>(plan.split.splits * N * W) * sizeof(float));
    p.partial = partial.as<float>();
  }
  dfa_kernels::launch_project_gemm(plan, p, nullptr);
  out.write(c.str("out"));
  const char* path = plan.path == dfa_kernels::ProjectPath::TensorCore ? "tensor_core" : "simt";
  return std::string("\"path\": \"") + path + "\", \"tm\": " + std::to_string(plan.tm) +
         ", \"tiles\": " + std::to_string(plan.tiles) + ", \"splits\": " + std::to_string(plan.split.splits) +
         ", \"k_per_split\": " + std::to_string(plan.split.k_per_split) + ", \"lde\": " + std::to_string(plan.lde);
}

// B arrives in the dtype project.cu hands the kernels or cuBLAS: any of f32/f16/bf16 for the narrow
// kernel, e's dtype for the 16-bit cuBLAS path, f32 for the fp32 one.
std::string run_project_materialized(const Case& c) {
  const int64_t N = c.i64("N"), K = c.i64("K"), W = c.i64("W");
  const std::string ek = c.str("e_kind"), ok = c.str("out_kind"), bk = c.str("b_kind");
  if (N == 0 || W == 0 || K == 0) throw std::runtime_error("empty shapes are answered without a kernel");
  Input e = read_e(c, N, K, elem_bytes(ek));
  Mem B = Mem::read(c.str("B"), static_cast<size_t>(K * W) * elem_bytes(bk));
  Mem cs = read_col_scale(c, W);
  const float* csp = cs.size ? cs.as<float>() : nullptr;
  const float scale = static_cast<float>(c.f64("scale"));
  Mem out = Mem::alloc(static_cast<size_t>(N * W) * elem_bytes(ok));
  if (K <= dfa_kernels::kNarrowMaxK) {
    const auto plan = dfa_kernels::plan_narrow(N, K, W, caps_of(c));
    dfa_kernels::launch_narrow(plan, narrow_params(e.ptr, out.bytes.get(), csp, N, K, W, scale, kind_of(ek), kind_of(ok)),
                               dfa_kernels::StoredB<1>{B.bytes.get(), W, 0, kind_of(bk)}, nullptr);
    out.write(c.str("out"));
    return narrow_json(plan);
  }
  if (bk != (ek == "f32" ? "f32" : ek)) throw std::runtime_error("the GEMM path takes B in e's dtype (f32 for f32 e)");
  // cuBLAS writes the output itself when no col_scale is left and it can write the dtype (fp32 or
  // e's); otherwise an fp32 product and the epilogue kernel (scale, col_scale, cast).
  const bool direct = csp == nullptr && (ok == "f32" || ok == ek);
  Mem acc = direct ? Mem{} : Mem::alloc(static_cast<size_t>(N * W) * sizeof(float));
  void* gemm_out = direct ? out.bytes.get() : acc.bytes.get();
  const auto g = dfa_kernels::rowmajor_gemm(e.ptr, K, B.bytes.get(), W, gemm_out, N, W, K);
  if (dfa_kernels::call_gemm(host_gemm_ex, nullptr, g, cuda_type_of(ek), cuda_type_of(direct ? ok : "f32"),
                             direct ? scale : 1.0f) != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error("the GEMM call was rejected");
  }
  if (!direct) {
    dfa_kernels::launch_epilogue(acc.as<float>(), 1, N * W, W, scale, csp, out.bytes.get(), kind_of(ok), nullptr);
  }
  out.write(c.str("out"));
  return std::string("\"path\": \"gemm\", \"direct\": ") + (direct ? "true" : "false");
}

std::string run_feedback_matrix(const Case& c) {
  const int64_t rows = c.i64("rows"), cols = c.i64("cols");
  const std::string kind = c.str("out_kind");
  Mem out = Mem::alloc(static_cast<size_t>(rows * cols) * elem_bytes(kind));
  const uint32_t skey = dfa_kernels::seed_key(static_cast<uint32_t>(c.i64("seed")));
  const auto dist = dist_of(c.str("dist"));
  const uint32_t threshold = threshold_of(c);
  if (kind == "f32") dfa_kernels::launch_feedback_matrix(out.as<float>(), rows, cols, skey, dist, threshold, nullptr);
  else if (kind == "f64") dfa_kernels::launch_feedback_matrix(out.as<double>(), rows, cols, skey, dist, threshold, nullptr);
  else if (kind == "f16") dfa_kernels::launch_feedback_matrix(out.as<c10::Half>(), rows, cols, skey, dist, threshold, nullptr);
  else dfa_kernels::launch_feedback_matrix(out.as<c10::BFloat16>(), rows, cols, skey, dist, threshold, nullptr);
  out.write(c.str("out"));
  return "\"path\": \"feedback_matrix\"";
}

}  // namespace harness
