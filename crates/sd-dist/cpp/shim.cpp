// C++ side of sd-dist: a c10d process group (TCPStore rendezvous + ProcessGroupGloo and/or
// ProcessGroupNCCL) behind a plain C API. Compiled by build.rs with SD_DIST_GLOO and/or
// SD_DIST_NCCL defined, depending on which headers were found.
//
// Every extern "C" function catches C++ exceptions and returns them as a malloc'ed error
// string (freed with sddist_free_error), so nothing unwinds across the FFI boundary.

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#ifdef SD_DIST_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef SD_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

char *copy_error(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

// Runs f, turning exceptions into an error string; returns 0 on success.
template <typename F> int guarded(char **err, F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error &e) {
    *err = copy_error(e.what_without_backtrace());
  } catch (const std::exception &e) {
    *err = copy_error(e.what());
  } catch (...) {
    *err = copy_error("unknown C++ exception");
  }
  return 1;
}

bool is_loopback(const std::string &addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

void wait_work(const Group &g, c10::intrusive_ptr<c10d::Work> work) {
  // Gloo enforces the options' timeout itself; wait(timeout) bounds NCCL as well.
  work->wait(g.timeout);
}

} // namespace

extern "C" {

// Builds the process group. backend: 0 = gloo, 1 = nccl.
int sddist_init(int backend, const char *master_addr, int port, int rank, int world,
                int64_t timeout_ms, void **out, char **err) {
  return guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::string addr(master_addr);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(addr, so);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->timeout = timeout;
    if (backend == 0) {
#ifdef SD_DIST_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      const char *ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && *ifname != '\0') {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (is_loopback(addr)) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
#else
      throw std::runtime_error("this build has no Gloo backend");
#endif
    } else {
#ifdef SD_DIST_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error("this build has no NCCL backend");
#endif
    }
    *out = g.release();
  });
}

// In-place sum over all ranks.
int sddist_allreduce_sum(void *group, at::Tensor *t, char **err) {
  return guarded(err, [&] {
    auto &g = *static_cast<Group *>(group);
    std::vector<at::Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g.timeout;
    wait_work(g, g.backend->allreduce(v, o));
  });
}

// In-place broadcast of root's tensor.
int sddist_broadcast(void *group, at::Tensor *t, int root, char **err) {
  return guarded(err, [&] {
    auto &g = *static_cast<Group *>(group);
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g.timeout;
    wait_work(g, g.backend->broadcast(v, o));
  });
}

int sddist_barrier(void *group, char **err) {
  return guarded(err, [&] {
    auto &g = *static_cast<Group *>(group);
    c10d::BarrierOptions o;
    o.timeout = g.timeout;
    wait_work(g, g.backend->barrier(o));
  });
}

void sddist_free(void *group) {
  try {
    delete static_cast<Group *>(group);
  } catch (...) {
  }
}

void sddist_free_error(char *err) { std::free(err); }

} // extern "C"
