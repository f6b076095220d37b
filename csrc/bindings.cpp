// pybind11 bindings of the trajectory buffer core: module polygrad_fast._buffer_native.
//
// Arrays cross as numpy arrays (no torch headers: builds in seconds, and torch.from_numpy makes the windows torch
// tensors without a copy). User input is validated in Python before it gets here (polygrad_fast/buffer.py); the
// checks below only protect memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <vector>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "parallel.hpp"
#include "trajectory_buffer.hpp"


namespace py = pybind11;
using pgf::TrajectoryBufferCore;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
void expect_size(const CArray<T>& a, int64_t n, const char* what) {
  if (static_cast<int64_t>(a.size()) != n)
    throw py::value_error(std::string("BufferCore: ") + what + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(n));
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), sizeof(T) * v.size());
  return a;
}

template <typename T>
std::vector<T> from_numpy(const CArray<T>& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

#ifndef PGF_VERSION
#define PGF_VERSION "unknown"
#endif
#ifndef PGF_CXX_FLAGS
#define PGF_CXX_FLAGS "unknown"
#endif
#ifndef PGF_BUILD_TYPE
#define PGF_BUILD_TYPE "unknown"
#endif
#ifndef PGF_COMPILER
#define PGF_COMPILER "unknown"
#endif

py::dict build_info() {
  py::dict d;
  d["version"] = PGF_VERSION;
  d["compiler"] = PGF_COMPILER;
#ifdef __VERSION__
  d["compiler_version_string"] = __VERSION__;
#endif
  d["cxx_flags"] = PGF_CXX_FLAGS;
  d["build_type"] = PGF_BUILD_TYPE;
  // Not OpenMP: the gather uses a small helper pool whose caller never waits for a sleeping worker (parallel.hpp).
  d["openmp"] = false;
  d["parallelism"] = "std::thread helper pool";
  d["gather_threads"] = pgf::gather_threads();
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                          "." + std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_buffer_native, m) {
  m.doc() = "Native core of polygrad_fast.TrajectoryBuffer (use polygrad_fast.buffer, not this module)";
  m.def("gather_threads", &pgf::gather_threads, "Threads (caller included) used by large window gathers.");
  m.def("set_gather_threads", &pgf::set_gather_threads, py::arg("n"),
        "Set the threads used by large window gathers (1 = serial); like torch.set_num_threads.");
  m.def("build_info", &build_info,
        "How this extension was built: compiler, flags, threads, version.");
  m.def("record_bytes", &pgf::record_bytes, py::arg("obs_dim"), py::arg("act_dim"), py::arg("sim_state_dim"),
        "Bytes of ring storage per transition for these dimensions.");
  // A ring that cannot be allocated raises MemoryError with the capacity and bytes (not a bare std::bad_alloc).
  py::register_exception<pgf::AllocationError>(m, "AllocationError", PyExc_MemoryError);

  py::class_<TrajectoryBufferCore>(m, "BufferCore")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("obs_dim"), py::arg("act_dim"),
           py::arg("sim_state_dim"), py::arg("capacity"))
      .def("add_episode",
           [](TrajectoryBufferCore& c, const CArray<float>& obs, const CArray<float>& act, const CArray<float>& rew,
              const CArray<double>& sim, bool terminated, bool truncated) {
             const int64_t L = static_cast<int64_t>(rew.size());
             expect_size(obs, L * c.obs_dim(), "observations");
             expect_size(act, L * c.act_dim(), "actions");
             expect_size(sim, L * c.sim_dim(), "sim_states");
             c.add_episode(obs.data(), act.data(), rew.data(), sim.data(), L, terminated, truncated);
           })
      .def("add_step",
           [](TrajectoryBufferCore& c, const CArray<float>& obs, const CArray<float>& act, float rew,
              const CArray<double>& sim) {
             expect_size(obs, c.obs_dim(), "obs");
             expect_size(act, c.act_dim(), "action");
             expect_size(sim, c.sim_dim(), "sim_state");
             c.add_step(obs.data(), act.data(), rew, sim.data());
           })
      .def("end_episode", &TrajectoryBufferCore::end_episode)
      .def("num_transitions", &TrajectoryBufferCore::num_transitions)
      .def("num_episodes", &TrajectoryBufferCore::num_episodes)
      .def("has_open_episode", &TrajectoryBufferCore::has_open_episode)
      .def("open_length", &TrajectoryBufferCore::open_length)
      .def("max_episode_length", &TrajectoryBufferCore::max_episode_length)
      .def("nbytes", &TrajectoryBufferCore::nbytes)
      .def("episode_lengths",
           [](const TrajectoryBufferCore& c) {
             auto v = c.episode_lengths();
             return to_numpy(v, {static_cast<py::ssize_t>(v.size())});
           })
      .def("moments",
           [](const TrajectoryBufferCore& c) {
             const int64_t D = c.stat_dim();
             py::array_t<double> mean(D), m2(D);
             int64_t n = 0;
             c.moments(&n, mean.mutable_data(), m2.mutable_data());
             return py::make_tuple(n, mean, m2);
           })
      .def(
          "sample",
          [](TrajectoryBufferCore& c, int64_t B, int64_t H, uint64_t seed, bool normalize, bool with_sim) {
            if (B < 1 || H < 1) throw py::value_error("BufferCore.sample: batch and horizon must be >= 1");
            // The largest output holds B*H*(O+A+S+2) elements of <= 8 bytes: refuse sizes that overflow int64.
            const int64_t per_window = 8 * (c.obs_dim() + c.act_dim() + c.sim_dim() + 2);
            if (B > INT64_MAX / H / per_window)
              throw py::value_error("BufferCore.sample: batch " + std::to_string(B) + " x horizon " +
                                    std::to_string(H) + " windows overflow int64 bytes");
            const py::ssize_t b = B, h = H, O = c.obs_dim(), A = c.act_dim(), S = c.sim_dim();
            // One preallocated output array per field, filled in a single pass with the GIL released.
            py::array_t<float> obs({b, h, O}), act({b, h, A}), rew({b, h}), term({b, h}), start_obs({b, O});
            py::array_t<double> sim(with_sim ? std::vector<py::ssize_t>{b, h, S} : std::vector<py::ssize_t>{0});
            py::array_t<int64_t> ids(b), starts(b);
            pgf::WindowOut out{obs.mutable_data(), act.mutable_data(),     rew.mutable_data(),
                               term.mutable_data(), start_obs.mutable_data(),
                               with_sim ? sim.mutable_data() : nullptr, ids.mutable_data(), starts.mutable_data()};
            {
              py::gil_scoped_release release;
              c.sample(B, H, seed, normalize, out);
            }
            return py::make_tuple(obs, act, rew, term, start_obs, with_sim ? py::object(sim) : py::none(), ids,
                                  starts);
          },
          py::arg("batch"), py::arg("horizon"), py::arg("seed"), py::arg("normalize"), py::arg("with_sim") = true)
      .def("export_state",
           [](const TrajectoryBufferCore& c) {
             TrajectoryBufferCore::State s = c.export_state();
             const py::ssize_t n = static_cast<py::ssize_t>(s.rew.size());
             const py::ssize_t E = static_cast<py::ssize_t>(s.episode_lengths.size());
             const py::ssize_t D = c.stat_dim();
             py::dict d;
             d["observations"] = to_numpy(s.obs, {n, c.obs_dim()});
             d["actions"] = to_numpy(s.act, {n, c.act_dim()});
             d["rewards"] = to_numpy(s.rew, {n});
             d["sim_states"] = to_numpy(s.sim, {n, c.sim_dim()});
             d["episode_ids"] = to_numpy(s.episode_ids, {E});
             d["episode_lengths"] = to_numpy(s.episode_lengths, {E});
             d["terminated"] = to_numpy(s.terminated, {E}).attr("astype")("bool");
             d["truncated"] = to_numpy(s.truncated, {E}).attr("astype")("bool");
             d["episode_mean"] = to_numpy(s.episode_mean, {E, D});
             d["episode_m2"] = to_numpy(s.episode_m2, {E, D});
             d["open_episode"] = s.open_episode;
             d["next_episode_id"] = s.next_episode_id;
             d["agg_n"] = s.agg_n;
             d["agg_mean"] = to_numpy(s.agg_mean, {D});
             d["agg_m2"] = to_numpy(s.agg_m2, {D});
             d["removals"] = s.removals;
             return d;
           })
      .def("import_state", [](TrajectoryBufferCore& c, const py::dict& d) {
        TrajectoryBufferCore::State s;
        s.obs = from_numpy(d["observations"].cast<CArray<float>>());
        s.act = from_numpy(d["actions"].cast<CArray<float>>());
        s.rew = from_numpy(d["rewards"].cast<CArray<float>>());
        s.sim = from_numpy(d["sim_states"].cast<CArray<double>>());
        s.episode_ids = from_numpy(d["episode_ids"].cast<CArray<int64_t>>());
        s.episode_lengths = from_numpy(d["episode_lengths"].cast<CArray<int64_t>>());
        s.terminated = from_numpy(d["terminated"].cast<CArray<uint8_t>>());
        s.truncated = from_numpy(d["truncated"].cast<CArray<uint8_t>>());
        s.episode_mean = from_numpy(d["episode_mean"].cast<CArray<double>>());
        s.episode_m2 = from_numpy(d["episode_m2"].cast<CArray<double>>());
        s.open_episode = py::bool_(d["open_episode"]);
        s.next_episode_id = py::int_(d["next_episode_id"]);
        s.agg_n = py::int_(d["agg_n"]);
        s.agg_mean = from_numpy(d["agg_mean"].cast<CArray<double>>());
        s.agg_m2 = from_numpy(d["agg_m2"].cast<CArray<double>>());
        s.removals = py::int_(d["removals"]);
        c.import_state(s);
      });
}
