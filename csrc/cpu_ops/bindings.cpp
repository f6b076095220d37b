// pybind11 bindings of the fused CPU ops: module polygrad_fast._cpu_ops. Tensors cross as raw pointers (integers
// from tensor.data_ptr()) plus sizes and strides, so no torch headers are needed; polygrad_fast/cpu_layer_norm.py
// validates shapes, dtypes and contiguity before calling. The GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "actor_mean.hpp"
#include "bf16_kernels.hpp"
#include "layer_norm_act.hpp"
#include "normal_noise.hpp"
#include "residual_mlp.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

pgf_ops::Act parse_act(const std::string& a) {
  if (a == "none") return pgf_ops::Act::None;
  if (a == "relu") return pgf_ops::Act::Relu;
  if (a == "elu") return pgf_ops::Act::Elu;
  throw py::value_error("layer_norm_act: unknown activation '" + a + "' (expected 'none', 'relu' or 'elu')");
}

// The bf16 GEMM named by isa ('amx' or 'avx512bf16'), checked to run here (bf16_kernels_isa); `others` lists the
// op's other accepted names for the message.
pgf_ops::Bf16Isa bf16_isa(const char* op, const std::string& isa, const std::string& others) {
  const std::string ok = "'amx', 'avx512bf16'" + (others.empty() ? std::string() : ", " + others);
  if (isa != "amx" && isa != "avx512bf16")
    throw py::value_error(std::string(op) + ": isa must be one of " + ok + ", got '" + isa + "'");
  const pgf_ops::Bf16Isa v = isa == "amx" ? pgf_ops::Bf16Isa::Amx : pgf_ops::Bf16Isa::Avx512Bf16;
  if (!pgf_ops::bf16_isa_runs(v))
    throw py::value_error(std::string(op) + ": the " + isa + " kernel cannot run here (bf16_kernels_isa: '" +
                          pgf_ops::bf16_kernels_isa() + "')");
  return v;
}

pgf_ops::DType parse_dtype(const std::string& d) {
  if (d == "float32") return pgf_ops::DType::F32;
  if (d == "bfloat16") return pgf_ops::DType::BF16;
  throw py::value_error("layer_norm_act: unsupported dtype '" + d + "' (expected 'float32' or 'bfloat16')");
}

}  // namespace

PYBIND11_MODULE(_cpu_ops, m) {
  m.doc() = "polygrad_fast fused CPU ops (raw-pointer kernels, no torch headers)";
  m.def(
      "layer_norm_act",
      [](uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t b, int64_t rows, int64_t width, int64_t x_row_stride,
         int64_t y_row_stride, const std::string& dtype, double eps, const std::string& activation, int threads) {
        if (rows < 0 || width < 0) throw py::value_error("layer_norm_act: negative size");
        if (rows > 0 && width > 0 && (!x || !y)) throw py::value_error("layer_norm_act: null data pointer");
        const auto dt = parse_dtype(dtype);
        const auto act = parse_act(activation);
        py::gil_scoped_release release;
        pgf_ops::layer_norm_act(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y),
                                reinterpret_cast<const void*>(w), reinterpret_cast<const void*>(b), rows, width,
                                x_row_stride, y_row_stride, dt, static_cast<float>(eps), act, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("width"),
      py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("dtype"), py::arg("eps"), py::arg("activation"),
      py::arg("threads"),
      "y[r, :] = act(layer_norm(x[r, :]) * weight + bias) for rows r; pointers as integers (weight/bias 0 = none); "
      "row strides in elements, last dimension contiguous; dtype 'float32' or 'bfloat16'; activation 'none', "
      "'relu' or 'elu'; threads: OpenMP threads (results do not depend on it).");
  m.def(
      "actor_mean",
      [](uintptr_t states, int64_t rows, int64_t obs_dim, int64_t hidden, int64_t layers, int64_t act_dim,
         uintptr_t w_in, uintptr_t b_in, uintptr_t ln_w, uintptr_t ln_b, double eps, uintptr_t w_hidden,
         uintptr_t b_hidden, uintptr_t w_out, uintptr_t b_out, uintptr_t mean, int threads, const std::string& isa) {
        const bool fp32 = isa == "avx512" || isa == "avx2";
        const pgf_ops::Bf16Isa bf16 = fp32 ? pgf_ops::Bf16Isa::Amx : bf16_isa("actor_mean", isa, "'avx512', 'avx2'");
        const std::string best = pgf_ops::actor_mean_f32_isa();
        if (fp32 && !(isa == best || (isa == "avx2" && best == "avx512")))
          throw py::value_error("actor_mean: the " + isa + " kernel cannot run on this CPU (best: '" + best + "')");
        const int64_t multiple = fp32 ? 16 : 32;
        if (rows < 0 || obs_dim < 1 || layers < 1 || act_dim < 1 || hidden < multiple || hidden % multiple)
          throw py::value_error("actor_mean: need rows >= 0, obs_dim, layers, act_dim >= 1 and hidden a multiple "
                                "of " + std::to_string(multiple) + ", got rows " + std::to_string(rows) +
                                ", obs_dim " + std::to_string(obs_dim) + ", hidden " + std::to_string(hidden) +
                                ", layers " + std::to_string(layers) + ", act_dim " + std::to_string(act_dim));
        if (rows > 0 && (!states || !mean || !w_in || !b_in || !ln_w || !ln_b || !w_out || !b_out ||
                         (layers > 1 && (!w_hidden || !b_hidden))))
          throw py::value_error("actor_mean: null data pointer");
        py::gil_scoped_release release;
        const auto f = [](uintptr_t p) { return reinterpret_cast<const float*>(p); };
        const auto u = [](uintptr_t p) { return reinterpret_cast<const uint16_t*>(p); };
        if (!fp32)
          pgf_ops::actor_mean(f(states), rows, obs_dim, hidden, layers, act_dim, u(w_in), f(b_in), f(ln_w), f(ln_b),
                              static_cast<float>(eps), u(w_hidden), f(b_hidden), u(w_out), f(b_out),
                              reinterpret_cast<float*>(mean), threads, bf16);
        else
          pgf_ops::actor_mean_f32(f(states), rows, obs_dim, hidden, layers, act_dim, f(w_in), f(b_in), f(ln_w),
                                  f(ln_b), static_cast<float>(eps), f(w_hidden), f(b_hidden), f(w_out), f(b_out),
                                  reinterpret_cast<float*>(mean), threads, isa == "avx512");
      },
      py::arg("states"), py::arg("rows"), py::arg("obs_dim"), py::arg("hidden"), py::arg("layers"),
      py::arg("act_dim"), py::arg("w_in"), py::arg("b_in"), py::arg("ln_w"), py::arg("ln_b"), py::arg("eps"),
      py::arg("w_hidden"), py::arg("b_hidden"), py::arg("w_out"), py::arg("b_out"), py::arg("mean"),
      py::arg("threads"), py::arg("isa"),
      "mean [rows, act_dim] = tanh(MLP(states)) for the actor MLP described in csrc/cpu_ops/actor_mean.hpp; "
      "pointers as integers, all contiguous; isa 'amx' / 'avx512bf16' (bf16 VNNI weights; raises where "
      "bf16_kernels_isa() does not allow it) or 'avx512' / 'avx2' (fp32 panel weights; raises where the CPU "
      "lacks it).");
  m.def("actor_mean_f32_isa", &pgf_ops::actor_mean_f32_isa,
        "The best fp32 actor_mean kernel this CPU runs: 'avx512' (unless PGF_CPU_OPS_NO_AVX512), 'avx2' or ''.");
  m.def("bf16_kernels_isa", &pgf_ops::bf16_kernels_isa,
        "The best bf16 GEMM the bf16 actor_mean, residual_mlp and bf16_linear run here: 'amx' (AMX-BF16 usable by "
        "this process, PGF_CPU_OPS_NO_AMX unset), 'avx512bf16' (AVX-512 BF16, PGF_CPU_OPS_NO_AVX512BF16 unset) or "
        "''; 'amx' CPUs run 'avx512bf16' too.");
  m.def(
      "residual_mlp",
      [](uintptr_t x, int64_t rows, int64_t in_dim, int64_t width, int64_t depth, int64_t out_dim, uintptr_t w_in,
         uintptr_t b_in, uintptr_t ln_w, uintptr_t ln_b, double eps, uintptr_t w_blocks, uintptr_t b_blocks,
         uintptr_t w_out, uintptr_t b_out, uintptr_t out, int threads, const std::string& isa) {
        const pgf_ops::Bf16Isa bf16 = bf16_isa("residual_mlp", isa, "");
        if (rows < 0 || in_dim < 1 || depth < 0 || out_dim < 1 || width < 32 || width % 32)
          throw py::value_error("residual_mlp: need rows >= 0, in_dim, out_dim >= 1, depth >= 0 and width a "
                                "multiple of 32, got rows " + std::to_string(rows) + ", in_dim " +
                                std::to_string(in_dim) + ", width " + std::to_string(width) + ", depth " +
                                std::to_string(depth) + ", out_dim " + std::to_string(out_dim));
        if (rows > 0 && (!x || !out || !w_in || !b_in || !ln_w || !ln_b || !w_out || !b_out ||
                         (depth > 0 && (!w_blocks || !b_blocks))))
          throw py::value_error("residual_mlp: null data pointer");
        py::gil_scoped_release release;
        pgf_ops::residual_mlp(reinterpret_cast<const uint16_t*>(x), rows, in_dim, width, depth, out_dim,
                              reinterpret_cast<const uint16_t*>(w_in), reinterpret_cast<const float*>(b_in),
                              reinterpret_cast<const float*>(ln_w), reinterpret_cast<const float*>(ln_b),
                              static_cast<float>(eps), reinterpret_cast<const uint16_t*>(w_blocks),
                              reinterpret_cast<const float*>(b_blocks), reinterpret_cast<const uint16_t*>(w_out),
                              reinterpret_cast<const float*>(b_out), reinterpret_cast<uint16_t*>(out), threads, bf16);
      },
      py::arg("x"), py::arg("rows"), py::arg("in_dim"), py::arg("width"), py::arg("depth"), py::arg("out_dim"),
      py::arg("w_in"), py::arg("b_in"), py::arg("ln_w"), py::arg("ln_b"), py::arg("eps"), py::arg("w_blocks"),
      py::arg("b_blocks"), py::arg("w_out"), py::arg("b_out"), py::arg("out"), py::arg("threads"), py::arg("isa"),
      "out [rows, out_dim] bf16 = the residual MLP trunk on x [rows, in_dim] bf16, as in "
      "csrc/cpu_ops/residual_mlp.hpp; pointers as integers, all contiguous; isa 'amx' or 'avx512bf16' (raises "
      "where bf16_kernels_isa() does not allow it).");
  m.def(
      "bf16_linear",
      [](uintptr_t a, int64_t rows, int64_t k, uintptr_t w, int64_t n, uintptr_t bias, uintptr_t out, int threads,
         const std::string& isa) {
        const pgf_ops::Bf16Isa bf16 = bf16_isa("bf16_linear", isa, "");
        if (rows < 0 || rows % 32 || k < 32 || k % 32 || n < 16 || n % 16)
          throw py::value_error("bf16_linear: need rows % 32 == 0, k % 32 == 0 and n % 16 == 0, got rows " +
                                std::to_string(rows) + ", k " + std::to_string(k) + ", n " + std::to_string(n));
        if (rows > 0 && (!a || !w || !bias || !out)) throw py::value_error("bf16_linear: null data pointer");
        py::gil_scoped_release release;
        pgf_ops::bf16_linear(reinterpret_cast<const uint16_t*>(a), rows, k, reinterpret_cast<const uint16_t*>(w), n,
                             reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), threads, bf16);
      },
      py::arg("a"), py::arg("rows"), py::arg("k"), py::arg("w"), py::arg("n"), py::arg("bias"), py::arg("out"),
      py::arg("threads"), py::arg("isa"),
      "out [rows, n] fp32 = a [rows, k] bf16 x W^T + bias with W in AMX's VNNI order (csrc/cpu_ops/bf16_gemm.hpp), "
      "as residual_mlp runs each layer, isa 'amx' or 'avx512bf16'; for timing this package's GEMM floor.");
  m.def(
      "normal_fill",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, int threads) {
        if (n < 0) throw py::value_error("normal_fill: negative size");
        if (n > 0 && !out) throw py::value_error("normal_fill: null data pointer");
        py::gil_scoped_release release;
        pgf_ops::normal_fill(reinterpret_cast<float*>(out), n, seed, offset, threads);
      },
      py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("offset"), py::arg("threads"),
      "out[j] ~ N(0, 1), j < n, float32: word j % 4 of Philox4x32-10 counter offset + j / 4 under key seed, "
      "Box-Muller on word pairs; threads: OpenMP threads (results do not depend on it).");
  m.def(
      "philox4x32_10",
      [](uint64_t seed, uint64_t counter) {
        uint32_t w[4];
        pgf_ops::philox4x32_10(seed, counter, w);
        return py::make_tuple(w[0], w[1], w[2], w[3]);
      },
      py::arg("seed"), py::arg("counter"), "The four Philox4x32-10 words of a 64-bit counter under a 64-bit key.");
  m.def("isa", &pgf_ops::layer_norm_act_isa, "The implementation layer_norm_act uses on this CPU.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the module was built with OpenMP.");
}
