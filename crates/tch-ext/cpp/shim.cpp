// C++ side of tch-ext: what tch 0.26 does not expose from libtorch.
//
// Gradient checkpointing as one autograd node per checkpointed call (see
// docs/architecture.md, "Gradient checkpointing"):
//   forward  runs a Rust closure with grad mode off (Function::apply turns it off), saves the
//            inputs, the extra parameters and the RNG state, and keeps the closure;
//   backward restores the RNG state, re-runs the closure on detached inputs with grad mode on,
//            and returns torch::autograd::grad(outputs, inputs + parameters, upstream grads).
// The parameters (e.g. LoRA weights living inside the block) are node inputs, so the node's
// outputs require grad even when the block input does not, and their gradients leave the node
// like any other input's. backward() is never re-entered, so autograd.grad callers work too.
//
// Every extern "C" function catches C++ exceptions and returns them as an error string; the Rust
// closure catches its own panics (it returns non-zero), so neither unwinds across the boundary.

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

typedef at::Tensor *tensor;

extern "C" {
// Runs the closure on `inputs`; each output goes through tchext_sink_push(sink, t). Returns 0, or
// non-zero after tchext_sink_error(sink, message) when the closure panicked.
typedef int (*tchext_run_fn)(void *closure, tensor *inputs, int64_t n_inputs, void *sink);
// Frees the closure.
typedef void (*tchext_drop_fn)(void *closure);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Where the closure writes its outputs (or its panic message).
struct Sink {
  std::vector<at::Tensor> outputs;
  std::string error;
  bool failed = false;
};

// The Rust closure, owned by the autograd node through a capsule; freed with the graph.
struct ClosureHolder : torch::CustomClassHolder {
  void *closure;
  tchext_run_fn run_fn;
  tchext_drop_fn drop_fn;

  ClosureHolder(void *c, tchext_run_fn r, tchext_drop_fn d) : closure(c), run_fn(r), drop_fn(d) {}
  ~ClosureHolder() override {
    if (closure != nullptr) drop_fn(closure);
  }

  std::vector<at::Tensor> run(std::vector<at::Tensor> &inputs) {
    std::vector<tensor> ptrs;
    ptrs.reserve(inputs.size());
    for (auto &t : inputs) ptrs.push_back(&t);
    Sink sink;
    int rc = run_fn(closure, ptrs.data(), (int64_t)ptrs.size(), &sink);
    if (rc != 0 || sink.failed) {
      throw std::runtime_error("checkpointed function panicked: " + sink.error);
    }
    return std::move(sink.outputs);
  }
};

// The default generators a recompute must replay (dropout inside the block): the CPU one always,
// plus the one of the inputs' accelerator device when there is one.
struct RngStates {
  std::vector<at::Generator> generators;
  std::vector<at::Tensor> states;

  static std::vector<at::Generator> relevant(at::TensorList inputs) {
    std::vector<at::Generator> gens{at::detail::getDefaultCPUGenerator()};
    for (const auto &t : inputs) {
      if (t.defined() && !t.device().is_cpu()) {
        gens.push_back(at::globalContext().defaultGenerator(t.device()));
        break;
      }
    }
    return gens;
  }

  static RngStates capture(std::vector<at::Generator> gens) {
    RngStates s;
    for (auto &g : gens) {
      std::lock_guard<std::mutex> lock(g.mutex());
      s.states.push_back(g.get_state());
    }
    s.generators = std::move(gens);
    return s;
  }

  void restore() {
    for (size_t i = 0; i < generators.size(); ++i) {
      std::lock_guard<std::mutex> lock(generators[i].mutex());
      generators[i].set_state(states[i]);
    }
  }
};

struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  // The lists must be at::TensorList: Function::apply only sees tensors in those.
  static variable_list forward(AutogradContext *ctx, at::TensorList inputs, at::TensorList params,
                               c10::intrusive_ptr<ClosureHolder> holder) {
    std::vector<at::Tensor> saved(inputs.begin(), inputs.end());
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n_in"] = (int64_t)inputs.size();
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    auto gens = RngStates::relevant(inputs);
    auto rng = RngStates::capture(gens);
    std::vector<at::Tensor> rng_states = rng.states;
    ctx->saved_data["rng"] = c10::IValue(c10::List<at::Tensor>(rng_states));
    std::vector<at::Tensor> in(inputs.begin(), inputs.end());
    return holder->run(in);  // grad mode is off here
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const int64_t n_in = ctx->saved_data["n_in"].toInt();
    auto holder = c10::static_intrusive_pointer_cast<ClosureHolder>(ctx->saved_data["fn"].toCapsule());

    std::vector<at::Tensor> inputs;
    for (int64_t i = 0; i < n_in; ++i) {
      const auto &s = saved[i];
      if (s.defined()) {
        inputs.push_back(s.detach().requires_grad_(s.requires_grad()));
      } else {
        inputs.push_back(s);
      }
    }

    // Replay the forward's random numbers, then put the generators back where they were.
    auto gens = RngStates::relevant(inputs);
    auto now = RngStates::capture(gens);
    RngStates then;
    then.generators = gens;
    for (const auto &t : ctx->saved_data["rng"].toTensorList()) then.states.push_back(t);
    std::vector<at::Tensor> outputs;
    {
      then.restore();
      at::AutoGradMode grad_on(true);
      try {
        outputs = holder->run(inputs);
      } catch (...) {
        now.restore();
        throw;
      }
      now.restore();
    }

    // Gradients of the outputs that take part, with respect to what requires grad.
    std::vector<at::Tensor> outs, grads;
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); ++i) {
      if (outputs[i].defined() && outputs[i].requires_grad() && grad_outputs[i].defined()) {
        outs.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    std::vector<size_t> wanted;
    std::vector<at::Tensor> targets;
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor &t = (int64_t)i < n_in ? inputs[i] : saved[i];
      if (t.defined() && t.requires_grad()) {
        wanted.push_back(i);
        targets.push_back(t);
      }
    }
    variable_list result(saved.size() + 1);  // + the closure argument (no gradient)
    if (!outs.empty() && !targets.empty()) {
      auto g = torch::autograd::grad(outs, targets, grads, /*retain_graph=*/false,
                                     /*create_graph=*/false, /*allow_unused=*/true);
      for (size_t k = 0; k < wanted.size(); ++k) result[wanted[k]] = g[k];
    }
    return result;
  }
};

void set_error(char **err, const char *what) {
  if (err == nullptr) return;
  size_t n = std::strlen(what);
  char *copy = (char *)std::malloc(n + 1);
  if (copy != nullptr) {
    std::memcpy(copy, what, n + 1);
  }
  *err = copy;
}

}  // namespace

extern "C" {

void tchext_sink_push(void *sink, tensor t) { static_cast<Sink *>(sink)->outputs.push_back(*t); }

void tchext_sink_error(void *sink, const char *message, size_t len) {
  auto *s = static_cast<Sink *>(sink);
  s->failed = true;
  s->error.assign(message, len);
}

void tchext_free_error(char *err) { std::free(err); }

// Applies the checkpoint node. On success returns 0 and `*outputs` (length `*n_outputs`) holds
// newly allocated tensors the caller owns (free each with at_free, the array with
// tchext_free_outputs). On failure returns -1 with `*err` set (free with tchext_free_error); the
// closure is then already freed.
int tchext_checkpoint(void *closure, tchext_run_fn run, tchext_drop_fn drop, tensor *inputs,
                      int64_t n_inputs, tensor *params, int64_t n_params, tensor **outputs,
                      int64_t *n_outputs, char **err) {
  try {
    auto holder = c10::make_intrusive<ClosureHolder>(closure, run, drop);
    variable_list in, ps;
    for (int64_t i = 0; i < n_inputs; ++i) in.push_back(*inputs[i]);
    for (int64_t i = 0; i < n_params; ++i) ps.push_back(*params[i]);
    variable_list outs = CheckpointFn::apply(at::TensorList(in), at::TensorList(ps), holder);
    auto *arr = (tensor *)std::malloc(sizeof(tensor) * (outs.size() + 1));
    if (arr == nullptr) throw std::bad_alloc();
    for (size_t i = 0; i < outs.size(); ++i) arr[i] = new at::Tensor(outs[i]);
    *outputs = arr;
    *n_outputs = (int64_t)outs.size();
    return 0;
  } catch (const std::exception &e) {
    set_error(err, e.what());
    return -1;
  } catch (...) {
    set_error(err, "unknown C++ exception");
    return -1;
  }
}

void tchext_free_outputs(tensor *outputs) { std::free(outputs); }

// Whether autograd records operations on this thread (at::GradMode::is_enabled).
int tchext_grad_mode_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Free and total bytes of CUDA device `device` (cudaMemGetInfo). The CUDA runtime is looked up
// among the libraries already loaded (libtorch links libcudart dynamically), so this needs no CUDA
// headers and no CUDA at build time. Returns 0 on success; -1 when no CUDA runtime is loaded,
// otherwise the CUDA error code (e.g. no device or no driver). The calling thread's current device
// is restored.
int tchext_cuda_mem_get_info(int device, size_t *free_bytes, size_t *total_bytes) {
  typedef int (*get_device_fn)(int *);
  typedef int (*set_device_fn)(int);
  typedef int (*mem_get_info_fn)(size_t *, size_t *);
  auto get_device = reinterpret_cast<get_device_fn>(dlsym(RTLD_DEFAULT, "cudaGetDevice"));
  auto set_device = reinterpret_cast<set_device_fn>(dlsym(RTLD_DEFAULT, "cudaSetDevice"));
  auto mem_get_info = reinterpret_cast<mem_get_info_fn>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
  if (get_device == nullptr || set_device == nullptr || mem_get_info == nullptr) return -1;
  int previous = 0;
  int rc = get_device(&previous);
  if (rc != 0) return rc;
  if (previous != device && (rc = set_device(device)) != 0) return rc;
  rc = mem_get_info(free_bytes, total_bytes);
  if (previous != device) set_device(previous);
  return rc;
}

}  // extern "C"
