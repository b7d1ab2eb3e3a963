// pybind11 + torch bindings of the CUDA kernels (module ral_kernels._C, or the JIT-built
// equivalent). Every function checks its tensors (device, dtype, shape, contiguity,
// alignment), sets the device guard and calls one launcher of ral_cuda.h on the current
// stream. Outputs are preallocated by ral_kernels/cuda_backend.py, which owns the
// semantics (padding, statistics glue); these functions only launch.
//
// With -DRAL_CPU_EMULATION the same file builds against csrc/emu/cuda_emu.h and takes CPU
// tensors: the kernels then run in the CPU emulator (tests on machines without a GPU).
#include <torch/extension.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "ral_cuda.h"

#ifndef RAL_CPU_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using torch::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef RAL_CPU_EMULATION
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

void check_device(const Tensor& x, const char* name, const Tensor& like) {
  if (kEmulated) {
    TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor for the CPU emulation build, got ", x.device());
  } else {
    TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
    TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but q is on ", like.device());
  }
}

// A contiguous, 16-byte aligned tensor of `dim` dims on q's device.
void check_layout(const Tensor& x, const char* name, int64_t dim, const Tensor& like) {
  check_device(x, name, like);
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dims, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_input(const Tensor& x, const char* name, const Tensor& like, int64_t hd) {
  check_layout(x, name, 4, like);
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), name, " must have q's dtype ", like.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.size(3) == hd, name, " must have head dim ", hd, " (padded like q), got ", x.size(3));
}

void check_f32(const Tensor& x, const char* name, const Tensor& like, c10::IntArrayRef shape) {
  check_layout(x, name, int64_t(shape.size()), like);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

ral::DType dtype_of(const Tensor& q) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat16 || q.scalar_type() == torch::kBFloat16,
              "backend='cuda' takes float16 or bfloat16 inputs, got ", q.scalar_type());
  return q.scalar_type() == torch::kFloat16 ? ral::DType::kHalf : ral::DType::kBF16;
}

int head_dim(const Tensor& q) {
  TORCH_CHECK(q.dim() == 4, "q must have 4 dims [B, H, T, HD], got shape ", q.sizes());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "the CUDA kernels take a padded head dim of 64 or 128, got ",
              q.size(3));
  return int(q.size(3));
}

// Query heads must be a multiple of key heads (GQA); batch x heads is a grid dimension.
void check_heads(int64_t b, int64_t h, int64_t hk, const char* what) {
  TORCH_CHECK(hk > 0 && h % hk == 0, what, ": ", h, " query heads are not a multiple of ", hk, " key heads");
  TORCH_CHECK(b * h <= 65535, what, ": batch x heads = ", b * h, " exceeds the CUDA grid limit of 65535; split the batch");
}

const uint8_t* kmask_ptr(const OptTensor& kmask, const Tensor& q, int64_t B, int64_t Tk) {
  if (!kmask) return nullptr;
  check_device(*kmask, "key_mask", q);
  TORCH_CHECK(kmask->scalar_type() == torch::kBool || kmask->scalar_type() == torch::kUInt8,
              "key_mask must be bool or uint8, got ", kmask->scalar_type());
  TORCH_CHECK(kmask->is_contiguous() && kmask->sizes() == c10::IntArrayRef({B, Tk}), "key_mask must be a contiguous [",
              B, ", ", Tk, "] tensor, got ", kmask->sizes());
  return reinterpret_cast<const uint8_t*>(kmask->data_ptr());
}

// A tensor a launch reads or writes. The emulation build hands these to the emulator, which
// checks per launch that inputs stay unchanged and that each output byte is written by one
// block (blocks run one after another there, at once on a GPU); the CUDA build ignores them.
struct Access {
  const char* name;
  const Tensor* t;
  bool written;
};
Access reads(const char* name, const Tensor& t) { return {name, &t, false}; }
Access reads(const char* name, const OptTensor& t) { return {name, t ? &*t : nullptr, false}; }
Access writes(const char* name, const Tensor& t) { return {name, &t, true}; }
Access writes(const char* name, const OptTensor& t) { return {name, t ? &*t : nullptr, true}; }

template <typename F> void run(const Tensor& q, std::initializer_list<Access> accesses, F&& launch) {
#ifdef RAL_CPU_EMULATION
  std::vector<ral_emu::Region> regions;
  for (const Access& a : accesses)
    if (a.t != nullptr)
      regions.push_back({a.name, a.t->data_ptr(), a.t->nbytes(), size_t(a.t->element_size()), a.written});
  const ral_emu::GlobalWatch watch(std::move(regions));
  const cudaError_t err = launch(cudaStream_t(nullptr));
  TORCH_CHECK(err == cudaSuccess, "ral_kernels CUDA kernel launch failed: ", cudaGetErrorString(err), ": ",
              ral_emu::last_error_message());
#else
  (void)accesses;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaError_t err = launch(at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ral_kernels CUDA kernel launch failed: ", cudaGetErrorString(err));
#endif
}

// Attention forward (v and out given) or the old policy's statistics (v, out None).
void attn_fwd(const Tensor& q, const Tensor& k, const OptTensor& v, const OptTensor& out, const Tensor& lse,
              const OptTensor& mass, const OptTensor& kmask, int64_t Tq, int64_t pos0, int64_t r0, double scale,
              bool causal, bool exclude_self) {
  const int hd = head_dim(q);
  ral::FwdParams p{};
  p.dtype = dtype_of(q);
  p.hd = hd;
  check_input(q, "q", q, hd);
  check_input(k, "k", q, hd);
  p.B = int(q.size(0));
  p.H = int(q.size(1));
  p.rows = int(q.size(2));
  p.HK = int(k.size(1));
  p.Tk = int(k.size(2));
  TORCH_CHECK(k.size(0) == p.B, "k must have batch ", p.B, ", got ", k.size(0));
  check_heads(p.B, p.H, p.HK, "attn_fwd");
  TORCH_CHECK(v.has_value() == out.has_value(), "v and out must be given together");
  if (v) {
    check_input(*v, "v", q, hd);
    TORCH_CHECK(v->sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v->sizes());
    check_input(*out, "out", q, hd);
    TORCH_CHECK(out->sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out->sizes());
  }
  TORCH_CHECK(0 <= r0 && r0 <= Tq && 0 <= pos0 && pos0 + p.rows <= Tq, "bad row range: rows ", p.rows,
              ", pos0 ", pos0, ", r0 ", r0, ", Tq ", Tq);
  check_f32(lse, "lse", q, {p.B, p.H, p.rows});
  if (mass) check_f32(*mass, "mass", q, {p.B, p.H, Tq - r0});
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v ? v->data_ptr() : nullptr;
  p.out = out ? out->data_ptr() : nullptr;
  p.lse = lse.data_ptr<float>();
  p.mass = mass ? mass->data_ptr<float>() : nullptr;
  p.kmask = kmask_ptr(kmask, q, p.B, p.Tk);
  p.Tq = int(Tq);
  p.pos0 = int(pos0);
  p.r0 = int(r0);
  p.scale = float(scale);
  p.causal = causal;
  p.exclude_self = exclude_self;
  run(q,
      {reads("q", q), reads("k", k), reads("v", v), reads("key_mask", kmask), writes("out", out), writes("lse", lse),
       writes("mass", mass)},
      [&](cudaStream_t s) { return ral::attn_fwd(p, s); });
}

void attn_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& lse,
              const Tensor& delta, const Tensor& dq, const Tensor& dk, const Tensor& dv, const OptTensor& kmask,
              double scale, bool causal) {
  const int hd = head_dim(q);
  ral::BwdParams p{};
  p.dtype = dtype_of(q);
  p.hd = hd;
  for (auto [x, name] : {std::pair{&k, "k"}, {&v, "v"}, {&dout, "dout"}}) check_input(*x, name, q, hd);
  p.B = int(q.size(0));
  p.H = int(q.size(1));
  p.Tq = int(q.size(2));
  p.HK = int(k.size(1));
  p.Tk = int(k.size(2));
  check_heads(p.B, p.H, p.HK, "attn_bwd");
  TORCH_CHECK(k.size(0) == p.B && v.sizes() == k.sizes() && dout.sizes() == q.sizes(),
              "k, v, dout must match q's batch and each other's shapes");
  check_f32(lse, "lse", q, {p.B, p.H, p.Tq});
  check_f32(delta, "delta", q, {p.B, p.H, p.Tq});
  check_f32(dq, "dq", q, q.sizes());
  check_f32(dk, "dk", q, k.sizes());
  check_f32(dv, "dv", q, k.sizes());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.kmask = kmask_ptr(kmask, q, p.B, p.Tk);
  p.scale = float(scale);
  p.causal = causal;
  run(q,
      {reads("q", q), reads("k", k), reads("v", v), reads("dout", dout), reads("lse", lse), reads("delta", delta),
       reads("key_mask", kmask), writes("dq", dq), writes("dk", dk), writes("dv", dv)},
      [&](cudaStream_t s) { return ral::attn_bwd(p, s); });
}

// Shared checks of div_fwd / div_bwd; fills everything but the pass-specific pointers.
ral::DivParams div_params(const Tensor& q, const Tensor& k, const Tensor& lse, const Tensor& q_old,
                          const Tensor& k_old, const Tensor& lse_old, const Tensor& z, const Tensor& z_old,
                          const OptTensor& kmask, int64_t r0, double scale, double old_scale, int64_t divergence,
                          bool causal, bool exclude_self) {
  const int hd = head_dim(q);
  ral::DivParams p{};
  p.dtype = dtype_of(q);
  p.hd = hd;
  for (auto [x, name] : {std::pair{&k, "k"}, {&q_old, "q_old"}, {&k_old, "k_old"}}) check_input(*x, name, q, hd);
  p.B = int(q.size(0));
  p.Hq = int(q.size(1));
  p.Tq = int(q.size(2));
  p.Hk = int(k.size(1));
  p.Tk = int(k.size(2));
  p.Ho = int(q_old.size(1));
  p.Hko = int(k_old.size(1));
  p.G = int(z.size(1));
  TORCH_CHECK(0 <= r0 && r0 <= p.Tq, "r0 must be in [0, Tq], got ", r0);
  const int64_t R = p.Tq - r0;
  TORCH_CHECK(k.size(0) == p.B && q_old.size(0) == p.B && k_old.size(0) == p.B, "batch sizes differ");
  TORCH_CHECK(q_old.size(2) == R && k_old.size(2) == p.Tk, "q_old must have R = ", R, " rows and k_old ", p.Tk,
              " keys, got ", q_old.sizes(), " and ", k_old.sizes());
  check_heads(p.B, p.Hq, p.Hk, "current policy");
  check_heads(p.B, p.Ho, p.Hko, "old policy");
  TORCH_CHECK(p.G == 1 || (p.G == p.Hq && p.Ho == p.Hq), "groups must be 1 (mean) or Hq == Ho (none), got ", p.G);
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "divergence code must be 0, 1 or 2, got ", divergence);
  check_f32(lse, "lse", q, {p.B, p.Hq, p.Tq});
  check_f32(lse_old, "lse_old", q, {p.B, p.Ho, R});
  check_f32(z, "z", q, {p.B, p.G, R});
  check_f32(z_old, "z_old", q, {p.B, p.G, R});
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_old = q_old.data_ptr();
  p.k_old = k_old.data_ptr();
  p.lse_old = lse_old.data_ptr<float>();
  p.z = z.data_ptr<float>();
  p.z_old = z_old.data_ptr<float>();
  p.kmask = kmask_ptr(kmask, q, p.B, p.Tk);
  p.r0 = int(r0);
  p.scale = float(scale);
  p.old_scale = float(old_scale);
  p.divergence = int(divergence);
  p.causal = causal;
  p.exclude_self = exclude_self;
  return p;
}

void div_fwd(const Tensor& q, const Tensor& k, const Tensor& lse, const Tensor& q_old, const Tensor& k_old,
             const Tensor& lse_old, const Tensor& z, const Tensor& z_old, const Tensor& div, const Tensor& e,
             const Tensor& a, const OptTensor& kmask, int64_t r0, double scale, double old_scale, int64_t divergence,
             bool causal, bool exclude_self) {
  ral::DivParams p =
      div_params(q, k, lse, q_old, k_old, lse_old, z, z_old, kmask, r0, scale, old_scale, divergence, causal, exclude_self);
  const int64_t R = p.Tq - r0;
  check_f32(div, "div", q, {p.B, p.G, p.Tq});
  check_f32(e, "e", q, {p.B, p.G, R});
  check_f32(a, "a", q, {p.B, p.Hq, R});
  p.div = div.data_ptr<float>();
  p.e_out = e.data_ptr<float>();
  p.a = a.data_ptr<float>();
  run(q,
      {reads("q", q), reads("k", k), reads("lse", lse), reads("q_old", q_old), reads("k_old", k_old),
       reads("lse_old", lse_old), reads("z", z), reads("z_old", z_old), reads("key_mask", kmask), writes("div", div),
       writes("e", e), writes("a", a)},
      [&](cudaStream_t s) { return ral::div_fwd(p, s); });
}

void div_bwd(const Tensor& q, const Tensor& k, const Tensor& lse, const Tensor& q_old, const Tensor& k_old,
             const Tensor& lse_old, const Tensor& z, const Tensor& z_old, const Tensor& e, const Tensor& w,
             const Tensor& dq, const Tensor& dk, const OptTensor& kmask, int64_t r0, double scale, double old_scale,
             int64_t divergence, bool causal, bool exclude_self) {
  ral::DivParams p =
      div_params(q, k, lse, q_old, k_old, lse_old, z, z_old, kmask, r0, scale, old_scale, divergence, causal, exclude_self);
  const int64_t R = p.Tq - r0;
  check_f32(e, "e", q, {p.B, p.G, R});
  check_f32(w, "w", q, {p.B, p.G, R});
  check_f32(dq, "dq", q, q.sizes());
  check_f32(dk, "dk", q, k.sizes());
  p.e = e.data_ptr<float>();
  p.w = w.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  run(q,
      {reads("q", q), reads("k", k), reads("lse", lse), reads("q_old", q_old), reads("k_old", k_old),
       reads("lse_old", lse_old), reads("z", z), reads("z_old", z_old), reads("e", e), reads("w", w),
       reads("key_mask", kmask), writes("dq", dq), writes("dk", dk)},
      [&](cudaStream_t s) { return ral::div_bwd(p, s); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ral_kernels CUDA C++ kernels (fused attention + attention divergence)";
  m.attr("emulated") = kEmulated;
  m.def("attn_fwd", &attn_fwd, "flash forward: out, lse, support mass (or old-policy statistics)");
  m.def("attn_bwd", &attn_bwd, "flash backward with delta_eff: dq, dk, dv (fp32)");
  m.def("div_fwd", &div_fwd, "divergence, E and A_h on the cached rows");
  m.def("div_bwd", &div_bwd, "divergence part of dS into dq (rows) and dk (keys)");
#ifdef RAL_CPU_EMULATION
  m.def("emu_set_schedule", &ral_emu::set_schedule, pybind11::arg("spec"),
        "emulator: schedule of later launches, e.g. 'random:seed=3,preempt=0.25,landing=random' "
        "(csrc/emu/cuda_emu.h); returns the previous schedule's spec");
  m.def("emu_schedule", &ral_emu::schedule, "emulator: the current schedule's spec");
  m.def("emu_set_arch", &ral_emu::set_arch, pybind11::arg("sm"),
        "emulator: compute capability whose shared-memory limit launches check (80, 86, 87, 89, 90, 100, 120); "
        "returns the previous one");
  m.def("emu_arch", &ral_emu::arch, "emulator: the compute capability whose limits launches check");
  m.def("emu_max_dyn_smem", &ral_emu::max_dyn_smem_per_block, pybind11::arg("sm"),
        "emulator: dynamic shared memory a block may use on compute capability sm (0 if unknown)");
#endif
}
