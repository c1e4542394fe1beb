// The harness's driver: reads the case file (argv[1]), runs each case, prints one JSON line per case.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "cuda_emu.h"
#include "harness.h"

namespace harness {

Mem Mem::alloc(size_t n) {
  Mem m;
  m.size = n;
  m.bytes.reset(new unsigned char[n > 0 ? n : 1]);
  std::memset(m.bytes.get(), 0xFF, n);
  return m;
}

Mem Mem::read(const std::string& path, size_t expect_bytes) {
  Mem m = alloc(expect_bytes);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(reinterpret_cast<char*>(m.bytes.get()), static_cast<std::streamsize>(expect_bytes));
  if (static_cast<size_t>(f.gcount()) != expect_bytes || f.peek() != EOF) {
    throw std::runtime_error(path + " does not hold " + std::to_string(expect_bytes) + " bytes");
  }
  return m;
}

void Mem::write(const std::string& path) const {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.get()), static_cast<std::streamsize>(size));
  if (!f) throw std::runtime_error("cannot write " + path);
}

const std::string& Case::str(const std::string& key) const {
  auto it = kv.find(key);
  if (it == kv.end()) throw std::runtime_error("case has no " + key);
  return it->second;
}
int64_t Case::i64(const std::string& key) const { return std::stoll(str(key)); }
double Case::f64(const std::string& key) const { return std::stod(str(key)); }
std::vector<std::string> Case::list(const std::string& key) const {
  std::vector<std::string> out;
  std::stringstream ss(str(key));
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

size_t elem_bytes(const std::string& kind) {
  if (kind == "f32") return 4;
  if (kind == "f16" || kind == "bf16") return 2;
  if (kind == "f64") return 8;
  throw std::runtime_error("unknown kind " + kind);
}

cudaDataType_t cuda_type_of(const std::string& k) {
  if (k == "f32") return CUDA_R_32F;
  if (k == "f16") return CUDA_R_16F;
  if (k == "bf16") return CUDA_R_16BF;
  throw std::runtime_error("unsupported kind " + k);
}

dfa_kernels::Distribution dist_of(const std::string& d) {
  if (d == "uniform") return dfa_kernels::Distribution::Uniform;
  if (d == "gaussian") return dfa_kernels::Distribution::Gaussian;
  if (d == "rademacher") return dfa_kernels::Distribution::Rademacher;
  if (d == "sparse") return dfa_kernels::Distribution::Sparse;
  throw std::runtime_error("unknown distribution " + d);
}

uint32_t threshold_of(const Case& c) {
  return dist_of(c.str("dist")) == dfa_kernels::Distribution::Sparse ? dfa_kernels::sparse_threshold(c.f64("density")) : 0;
}

dfa_kernels::DeviceCaps caps_of(const Case& c) { return {c.i64("sms"), static_cast<int>(c.i64("cc_major"))}; }

std::string take_launches() {
  std::string s = "[";
  auto& log = dfa_emu::launch_log();
  for (size_t i = 0; i < log.size(); ++i) {
    const auto& l = log[i];
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s{\"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"smem\": %zu, \"kernel\": \"",
                  i ? ", " : "", l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z, l.smem);
    s += buf;
    for (char ch : l.kernel) s += (ch == '"' || ch == '\\') ? '_' : ch;
    s += "\"}";
  }
  log.clear();
  return s + "]";
}

}  // namespace harness

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASES\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1]);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  int failed = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    harness::Case c;
    std::stringstream ss(line);
    for (std::string tok; ss >> tok;) {
      const auto eq = tok.find('=');
      c.kv[tok.substr(0, eq)] = eq == std::string::npos ? "" : tok.substr(eq + 1);
    }
    const auto start = std::chrono::steady_clock::now();
    try {
      const std::string& op = c.str("op");
      std::string fields;
      if (op == "project") fields = harness::run_project(c);
      else if (op == "project_materialized") fields = harness::run_project_materialized(c);
      else if (op == "feedback_matrix") fields = harness::run_feedback_matrix(c);
      else if (op == "project_points") fields = harness::run_project_points(c);
      else if (op == "grouped_weight_grad") fields = harness::run_grouped_weight_grad(c);
      else throw std::runtime_error("unknown op " + op);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("{\"id\": \"%s\", \"op\": \"%s\", %s, \"seconds\": %.4f, \"launches\": %s}\n", c.str("id").c_str(),
                  op.c_str(), fields.c_str(), seconds, harness::take_launches().c_str());
    } catch (const std::exception& ex) {
      std::printf("{\"id\": \"%s\", \"error\": \"%s\"}\n", c.has("id") ? c.str("id").c_str() : "?", ex.what());
      harness::take_launches();
      ++failed;
    }
    std::fflush(stdout);
  }
  return failed ? 1 : 0;
}
