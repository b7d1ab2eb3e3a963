// cuda_emu.h -- run CUDA kernel source on the CPU, for tests on machines without a GPU.
//
// Host-only C++17 with no CUDA headers. Compile the .cu files as C++ (a wrapper .cpp that
// #includes them) with g++ -DRAL_CPU_EMULATION; this header then supplies the CUDA names below.
//
// What is emulated, with CUDA's results
//   * Launch: ral_emu::launch(kernel, grid, block, dyn_smem_bytes, args...) replaces
//     kernel<<<grid, block, dyn_smem_bytes, stream>>>(args...). It is synchronous, runs the
//     blocks one after another (blockIdx.x fastest, then y, then z), and never throws: errors are
//     recorded as CUDA records them (cudaGetLastError, cudaGetErrorString, plus the details in
//     ral_emu::last_error_message()).
//   * Threads: inside a block every CUDA thread is a cooperative fiber with its own 256 KiB stack
//     (a guard page below it turns an overflow into SIGSEGV). Fibers switch only inside barriers
//     and warp collectives, round-robin by linear thread id, starting with thread 0. A warp is
//     32 consecutive linear thread ids; a partial last warp has only its existing lanes.
//   * Barriers and collectives: __syncthreads(_or/_and/_count), __syncwarp, __shfl_sync,
//     __shfl_xor_sync and ral_emu::warp_allgather (kernels build mma.sync emulation on it).
//     Masks must name the whole warp (all its existing lanes). Reading a lane that does not
//     exist (partial warp) yields 0xFF bytes, i.e. NaN for floats.
//   * Shared memory: __shared__ arrays are function statics (blocks run one at a time, so each
//     block sees its own; they keep the previous block's values). Dynamic shared memory is
//     ral_emu::dynamic_smem() (instead of `extern __shared__`): 16-byte aligned and filled with
//     0xFF bytes at the start of every block, so reading it before writing shows up as NaN.
//     Dynamic shared memory above 48 KiB needs cudaFuncSetAttribute(kernel,
//     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first (at most 227 KiB, as on H100),
//     else the launch fails with cudaErrorInvalidValue; static shared memory is not counted.
//   * Types and intrinsics: dim3, uint2/uint4/float2/float4/int4 (CUDA's alignment), __half and
//     __nv_bfloat16 with round-to-nearest-even conversions (NaN becomes CUDA's 0x7fff), bit
//     casts, __expf/__logf/__fdividef (computed exactly, not with the GPU's approximations),
//     atomicAdd.
//
// GPU bugs that become launch failures (cudaErrorLaunchFailure) instead of hangs or garbage
//   * deadlock: live threads wait at a barrier that can never complete, because threads of the
//     block returned before it or wait at another barrier (e.g. __syncwarp vs __syncthreads);
//   * the threads of one barrier arriving from different collectives (__syncwarp in one lane,
//     __shfl_sync in another), a partial mask, a shuffle width that is not a power of two <= 32;
//   * an exception thrown by kernel code.
//   The failing block is unwound (destructors of the kernel's locals run), the remaining blocks
//   do not run, and the next launch starts clean.
//
// Not emulated
//   * The memory model: a write is visible to every thread at once and nothing is reordered, so
//     a kernel with a race (e.g. a missing barrier) sees one fixed interleaving here and can
//     pass, then fail on a GPU.
//   * Independent thread scheduling inside a warp, partial-warp masks, votes, __activemask.
//   * Asynchronous copies (cp.async, TMA), tensor cores, __constant__, streams, textures,
//     atomics other than atomicAdd, the `<<< >>>` syntax, dynamic parallelism.
//   * Collectives called from a catch block or from a destructor during exception unwinding.
//
// Context switch: a small x86-64 assembly routine (no system call) on x86-64 ELF; elsewhere,
// or with -DRAL_EMU_UCONTEXT, POSIX ucontext (swapcontext costs a system call per switch).
// launch() serializes launches from concurrent host threads; the last error is per host
// thread, as in CUDA.

#pragma once

#if defined(__CUDACC__) || !defined(RAL_CPU_EMULATION)
#error "cuda_emu.h is the CPU emulation of CUDA: compile as host C++ with -DRAL_CPU_EMULATION"
#endif

#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__ELF__) && !defined(RAL_EMU_UCONTEXT)
#define RAL_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// GNU form, not alignas: CUDA code writes `__shared__ __align__(16) T x[N];`, where a standard
// attribute may not stand between decl-specifiers.
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------------------------
// Built-in types

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };

struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };

typedef void* cudaStream_t;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError cudaError_t;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ---------------------------------------------------------------------------------------------
// Fiber context switch

#if RAL_EMU_ASM_SWITCH
// ral_emu_switch(save, next): push the callee-saved registers, store the stack pointer in *save,
// load `next` and pop the registers saved there. The fibers never change MXCSR or the x87
// control word, so those are not switched. Every translation unit that includes this header
// carries a copy in a COMDAT group, which the linker keeps once; .ifndef keeps one per assembly
// file when LTO puts several translation units into one.
asm(R"(
  .ifndef ral_emu_switch
  .pushsection .text.ral_emu_switch,"axG",@progbits,ral_emu_switch,comdat
  .weak ral_emu_switch
  .hidden ral_emu_switch
  .type ral_emu_switch,@function
ral_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ral_emu_switch, .-ral_emu_switch
  .popsection
  .endif
)");
extern "C" __attribute__((visibility("hidden"))) void ral_emu_switch(void** save, void* next);
#endif

namespace ral_emu {
namespace detail {

#if RAL_EMU_ASM_SWITCH
struct Context { void* sp = nullptr; };

// A fresh stack holds what ral_emu_switch pops: six zero registers, then `entry` as the return
// address, then 0 as entry's own return address (ends backtraces). Entry starts with
// %rsp = top - 8, the alignment a called function expects.
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  void** sp = reinterpret_cast<void**>(stack + size) - 8;
  std::fill(sp, sp + 8, nullptr);
  sp[6] = reinterpret_cast<void*>(entry);
  c.sp = sp;
}

inline void switch_context(Context& from, Context& to) { ral_emu_switch(&from.sp, to.sp); }

// With CET shadow stacks active, the `ret` into a fresh fiber would fault. rdssp is a no-op
// (leaving 0) when shadow stacks are off.
inline void check_no_shadow_stack() {
  unsigned long long ssp = 0;
  asm volatile("rdsspq %0" : "+r"(ssp));
  if (ssp != 0)
    throw std::runtime_error("ral_emu: CET shadow stacks are active; rebuild with -DRAL_EMU_UCONTEXT");
}
#else
struct Context { ucontext_t uc; };

inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  if (getcontext(&c.uc) != 0) throw std::runtime_error("ral_emu: getcontext failed");
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void check_no_shadow_stack() {}
#endif

// ---------------------------------------------------------------------------------------------
// Scheduler state

constexpr std::size_t kStackBytes = 256 << 10;
constexpr unsigned kMaxThreads = 1024;
constexpr std::size_t kDefaultDynSmem = 48 << 10;
constexpr int kMaxDynSmemOptin = 227 << 10;

struct Barrier;

// One kind of barrier or collective; threads meeting at a barrier must all come from the same.
struct Collective {
  const char* name;
  void (*finish)(Barrier&);  // run by the last thread to arrive, before anyone continues
};

// Generation-counted barrier: a generation completes when `expected` threads have arrived.
struct Barrier {
  unsigned gen = 0, arrived = 0, expected = 0;
  const Collective* kind = nullptr;  // what the current generation gathers for
  int count = 0, result = 0;         // block barrier: true predicates (gathering / last result)
  void* slot[32] = {};               // warp barrier: each lane's operands
};

struct Thread {
  Context ctx;
  const Barrier* waiting = nullptr;  // barrier this thread is blocked on
  unsigned wait_gen = 0;             // generation it waits to complete
  bool exited = false;
  dim3 idx;
  unsigned linear = 0, lane = 0;
  Barrier* warp = nullptr;
};

// Thrown into fibers of a failed block so that they unwind; never escapes fiber_main.
struct Cancelled {};

struct Sched {
  std::mutex mutex;                          // one launch at a time
  std::map<const void*, int> max_dyn_smem;   // per kernel, from cudaFuncSetAttribute
  std::vector<char*> stacks;                 // allocated once, reused by every block
  std::vector<Thread> threads;
  std::vector<Barrier> warps;
  Barrier block_bar;
  std::vector<float4> smem;                  // dynamic shared memory
  dim3 grid, block, block_idx;
  void (*kernel)(const void*) = nullptr;
  const void* kernel_args = nullptr;
  Thread* cur = nullptr;                     // running fiber; nullptr while launch() runs
  Context main_ctx;
  unsigned exited = 0;
  bool cancel = false;                       // the block failed: unwind every fiber
  std::string failure;

  ~Sched() {
    for (char* s : stacks) munmap(s - page_size(), kStackBytes + page_size());
  }
  static std::size_t page_size() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
};

inline Sched sched;

struct LastError {
  cudaError_t code = cudaSuccess;
  std::string message;
};
inline thread_local LastError last_error;
inline thread_local bool in_launch = false;

inline void set_error(cudaError_t code, std::string message) {
  last_error.code = code;
  last_error.message = std::move(message);
}

inline std::string str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline std::string where(const Thread& t) {
  return "block " + str(sched.block_idx) + " thread " + str(t.idx);
}

// Records the block's first failure; every fiber then unwinds back to launch().
inline void fail(std::string message) {
  if (sched.cancel) return;
  sched.failure = std::move(message);
  sched.cancel = true;
}

inline std::string deadlock_message() {
  std::map<std::string, unsigned> at;
  unsigned waiting = 0;
  for (const Thread& t : sched.threads) {
    if (t.exited) continue;
    ++waiting;
    ++at[t.waiting->kind->name];
  }
  std::string msg = "ral_emu: deadlock in block " + str(sched.block_idx) + ": " +
                    std::to_string(waiting) + " thread(s) waiting (";
  for (const auto& [name, n] : at) msg += std::to_string(n) + " at " + name + ", ";
  msg.resize(msg.size() - 2);
  return msg + "), " + std::to_string(sched.exited) + " of " +
         std::to_string(sched.threads.size()) + " thread(s) exited";
}

// ---------------------------------------------------------------------------------------------
// Scheduling

inline bool runnable(const Thread& t) {
  return !t.exited && (t.waiting == nullptr || t.waiting->gen != t.wait_gen);
}

inline Thread* next_runnable(const Thread& me) {
  const std::size_t n = sched.threads.size();
  std::size_t i = me.linear;
  for (std::size_t k = 1; k < n; ++k) {
    if (++i == n) i = 0;
    if (runnable(sched.threads[i])) return &sched.threads[i];
  }
  return nullptr;
}

// Leaves `me` (blocked or exited) for the next runnable thread, or for launch() when the block
// finished, failed or can make no more progress. Returns when `me` is resumed.
inline void schedule(Thread& me) {
  Thread* next = sched.cancel ? nullptr : next_runnable(me);
  if (next == nullptr && !sched.cancel && sched.exited < sched.threads.size()) fail(deadlock_message());
  sched.cur = next;
  switch_context(me.ctx, next ? next->ctx : sched.main_ctx);
}

[[noreturn]] inline void fiber_main() {
  Thread& me = *sched.cur;
  if (!sched.cancel) {
    try {
      sched.kernel(sched.kernel_args);
    } catch (const Cancelled&) {
    } catch (const std::exception& e) {
      fail("ral_emu: kernel threw in " + where(me) + ": " + e.what());
    } catch (...) {
      fail("ral_emu: kernel threw a non-std exception in " + where(me));
    }
  }
  me.exited = true;
  ++sched.exited;
  schedule(me);
  std::abort();  // an exited fiber is never resumed
}

// Arrives at `b` for collective `c` and returns once every participant has arrived; the last
// one to arrive runs c.finish, so results are in place before anyone continues.
inline void sync(Barrier& b, const Collective& c) {
  if (sched.cancel) return;  // only from destructors while a failed block unwinds
  Thread& me = *sched.cur;
  if (b.arrived == 0) {
    b.kind = &c;
  } else if (b.kind != &c) {
    throw std::runtime_error("ral_emu: " + where(me) + " called " + c.name +
                             " while the other threads at this barrier are in " + b.kind->name);
  }
  if (++b.arrived < b.expected) {
    me.waiting = &b;
    me.wait_gen = b.gen;
    schedule(me);
    me.waiting = nullptr;
    if (sched.cancel) throw Cancelled{};
    return;
  }
  b.arrived = 0;
  ++b.gen;
  c.finish(b);
}

// ---------------------------------------------------------------------------------------------
// Collectives

inline void finish_nothing(Barrier&) {}

inline void finish_count(Barrier& b) {
  b.result = b.count;
  b.count = 0;
}

inline constexpr Collective kSyncthreads{"__syncthreads", &finish_count};
inline constexpr Collective kSyncthreadsOr{"__syncthreads_or", &finish_count};
inline constexpr Collective kSyncthreadsAnd{"__syncthreads_and", &finish_count};
inline constexpr Collective kSyncthreadsCount{"__syncthreads_count", &finish_count};
inline constexpr Collective kSyncwarp{"__syncwarp", &finish_nothing};

// Block barrier; returns how many threads passed a nonzero predicate.
inline int block_sync(const Collective& c, int pred) {
  sched.block_bar.count += pred != 0;
  sync(sched.block_bar, c);
  return sched.block_bar.result;
}

// The calling thread's warp, after checking that `mask` names all of its existing lanes.
inline Barrier& warp_of_caller(const Collective& c, unsigned mask) {
  Barrier& w = *sched.cur->warp;
  const unsigned all = w.expected == 32 ? 0xffffffffu : (1u << w.expected) - 1;
  if (mask != 0xffffffffu && mask != all) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", mask);
    throw std::runtime_error(std::string("ral_emu: ") + c.name + " with mask " + hex +
                             ": only whole-warp masks are supported");
  }
  return w;
}

template <class T>
struct ShflSlot {
  T value;
  unsigned src;  // lane to read, or this lane when out of range
  T result;
};

template <class T>
void finish_shfl(Barrier& w) {
  for (unsigned l = 0; l < w.expected; ++l) {
    auto& s = *static_cast<ShflSlot<T>*>(w.slot[l]);
    if (s.src < w.expected)
      s.result = static_cast<ShflSlot<T>*>(w.slot[s.src])->value;
    else
      std::memset(static_cast<void*>(&s.result), 0xFF, sizeof(T));  // lane does not exist
  }
}

template <class T>
inline constexpr Collective kShflIdx{"__shfl_sync", &finish_shfl<T>};
template <class T>
inline constexpr Collective kShflXor{"__shfl_xor_sync", &finish_shfl<T>};

// Source lane as PTX shfl.sync defines it, with CUDA's clamp c = ((32 - width) << 8) | 31.
inline unsigned shfl_src(const Collective& c, unsigned lane, int b, int width, bool bfly) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    throw std::runtime_error(std::string("ral_emu: ") + c.name + " with width " +
                             std::to_string(width) + ": must be a power of two <= 32");
  }
  const unsigned seg = 32u - static_cast<unsigned>(width);
  const unsigned max_lane = (lane & seg) | (31u & ~seg);
  const unsigned bval = static_cast<unsigned>(b) & 31u;
  const unsigned j = bfly ? lane ^ bval : (lane & seg) | (bval & ~seg);
  return j <= max_lane ? j : lane;
}

template <class T>
T shuffle(const Collective& c, unsigned mask, T var, int b, int width, bool bfly) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffled types must be trivially copyable");
  Barrier& w = warp_of_caller(c, mask);
  const unsigned lane = sched.cur->lane;
  ShflSlot<T> s{var, shfl_src(c, lane, b, width, bfly), var};
  w.slot[lane] = &s;
  sync(w, c);
  return s.result;
}

template <class T, int N>
struct GatherSlot {
  const T (*mine)[N];
  T (*all)[32][N];
};

// Copies every lane's array first, so `mine` may alias any lane's `all`.
template <class T, int N>
void finish_gather(Barrier& w) {
  T gathered[32][N];
  std::memset(static_cast<void*>(gathered), 0xFF, sizeof gathered);  // lanes that do not exist
  for (unsigned l = 0; l < w.expected; ++l)
    std::memcpy(gathered[l], *static_cast<GatherSlot<T, N>*>(w.slot[l])->mine, sizeof gathered[l]);
  for (unsigned l = 0; l < w.expected; ++l)
    std::memcpy(*static_cast<GatherSlot<T, N>*>(w.slot[l])->all, gathered, sizeof gathered);
}

template <class T, int N>
inline constexpr Collective kGather{"ral_emu::warp_allgather", &finish_gather<T, N>};

// ---------------------------------------------------------------------------------------------
// Launch

inline char* map_stack() {
  const std::size_t guard = Sched::page_size();
  void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, guard, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + guard;
}

inline std::string config_error(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    return "block " + str(block) + " is not a valid block shape (1 to 1024 threads, z <= 64)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    return "grid " + str(grid) + " is not a valid grid shape";
  return "";
}

inline std::size_t dyn_smem_limit(const void* kernel) {
  const auto it = sched.max_dyn_smem.find(kernel);
  return it == sched.max_dyn_smem.end() ? kDefaultDynSmem : static_cast<std::size_t>(it->second);
}

inline void setup(void (*kernel)(const void*), const void* args, dim3 grid, dim3 block,
                  std::size_t dyn_smem) {
  check_no_shadow_stack();
  const unsigned n = block.x * block.y * block.z;
  while (sched.stacks.size() < n) sched.stacks.push_back(map_stack());
  sched.threads.assign(n, Thread{});
  sched.warps.assign((n + 31) / 32, Barrier{});
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = sched.threads[i];
    t.idx = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
    t.linear = i;
    t.lane = i % 32;
    t.warp = &sched.warps[i / 32];
    ++t.warp->expected;
  }
  sched.block_bar = Barrier{};
  sched.block_bar.expected = n;
  sched.smem.resize((dyn_smem + sizeof(float4) - 1) / sizeof(float4));
  sched.grid = grid;
  sched.block = block;
  sched.kernel = kernel;
  sched.kernel_args = args;
}

// The stacks are page aligned, so their hot top frames would all fall into the same L1 cache
// sets; starting each fiber a different number of cache lines below the top spreads them.
inline std::size_t stack_color(std::size_t i) { return i % 64 * 64; }

inline void reset_barrier(Barrier& b) {
  b.arrived = 0;
  b.kind = nullptr;
  b.count = 0;
}

// Runs one block to completion; throws std::runtime_error if it failed or deadlocked.
inline void run_block(dim3 block_idx) {
  sched.block_idx = block_idx;
  std::memset(static_cast<void*>(sched.smem.data()), 0xFF, sched.smem.size() * sizeof(float4));
  reset_barrier(sched.block_bar);
  for (Barrier& w : sched.warps) reset_barrier(w);
  for (std::size_t i = 0; i < sched.threads.size(); ++i) {
    Thread& t = sched.threads[i];
    t.waiting = nullptr;
    t.exited = false;
    make_context(t.ctx, sched.stacks[i], kStackBytes - stack_color(i), &fiber_main);
  }
  sched.exited = 0;
  sched.cancel = false;
  sched.cur = &sched.threads[0];
  switch_context(sched.main_ctx, sched.threads[0].ctx);
  if (!sched.cancel) return;
  for (Thread& t : sched.threads) {  // unwind every fiber that has not exited
    if (t.exited) continue;
    sched.cur = &t;
    switch_context(sched.main_ctx, t.ctx);
  }
  throw std::runtime_error(sched.failure);
}

inline void run_grid(void (*kernel)(const void*), const void* args, const void* key, dim3 grid,
                     dim3 block, std::size_t dyn_smem) {
  if (in_launch) throw std::runtime_error("ral_emu: launching a kernel from a kernel is not supported");
  const std::string bad_config = config_error(grid, block);
  if (!bad_config.empty()) return set_error(cudaErrorInvalidConfiguration, "ral_emu: " + bad_config);
  std::lock_guard<std::mutex> lock(sched.mutex);
  if (dyn_smem > dyn_smem_limit(key)) {
    return set_error(cudaErrorInvalidValue,
                     "ral_emu: " + std::to_string(dyn_smem) + " bytes of dynamic shared memory exceed "
                     "the kernel's limit of " + std::to_string(dyn_smem_limit(key)) +
                     " (raise it with cudaFuncSetAttribute)");
  }
  in_launch = true;
  try {
    setup(kernel, args, grid, block, dyn_smem);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) run_block(dim3(x, y, z));
  } catch (const std::exception& e) {
    set_error(cudaErrorLaunchFailure, e.what());
  }
  sched.cur = nullptr;
  in_launch = false;
}

template <class Call>
void invoke(const void* call) {
  const Call& c = *static_cast<const Call*>(call);
  std::apply(c.kernel, c.params);  // by-value kernel parameters: each thread gets its own copy
}

inline cudaError_t set_func_attribute(const void* kernel, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kMaxDynSmemOptin) {
    set_error(cudaErrorInvalidValue, "ral_emu: unsupported cudaFuncSetAttribute(" +
                                         std::to_string(attr) + ", " + std::to_string(value) + ")");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(sched.mutex);
  sched.max_dyn_smem[kernel] = value;
  return cudaSuccess;
}

inline std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// binary32 -> binary16, round to nearest even; NaN becomes 0x7fff as in CUDA.
inline unsigned short float_to_half(float f) {
  const std::uint32_t x = bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fff;
  if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
  if (ax >= 0x38800000u) {  // normal: rebias the exponent, round the 13 dropped bits
    const std::uint32_t r = ax - 0x38000000u;
    return static_cast<unsigned short>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  const std::uint32_t e = ax >> 23;  // below 2^-14: subnormal half, in units of 2^-24
  if (e < 102) return static_cast<unsigned short>(sign);  // below 2^-25 rounds to zero
  const std::uint32_t mant = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
  const std::uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  std::uint32_t m = mant >> shift;
  m += rem > halfway || (rem == halfway && (m & 1u));
  return static_cast<unsigned short>(sign | m);
}

inline float half_to_float(unsigned short h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
  std::uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return from_bits(sign | 0x7f800000u | (m << 13));
  if (e != 0) return from_bits(sign | ((e + 112) << 23) | (m << 13));
  if (m == 0) return from_bits(sign);
  std::uint32_t exp = 113;  // subnormal: normalize m * 2^-24
  for (; (m & 0x400u) == 0; m <<= 1) --exp;
  return from_bits(sign | (exp << 23) | ((m & 0x3ffu) << 13));
}

// binary32 -> bfloat16, round to nearest even; NaN becomes 0x7fff as in CUDA.
inline unsigned short float_to_bf16(float f) {
  const std::uint32_t x = bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// ral_emu API

// Runs kernel(args...) on a grid of blocks; see the top of this file.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t dyn_smem_bytes,
            Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "ral_emu::launch: wrong number of kernel arguments");
  struct Call {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> params;
  };
  const Call call{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  detail::run_grid(&detail::invoke<Call>, &call, reinterpret_cast<const void*>(kernel), grid,
                   block, dyn_smem_bytes);
}

// Details of the most recent error (kept after cudaGetLastError clears the code).
inline const char* last_error_message() { return detail::last_error.message.c_str(); }

inline char* dynamic_smem() { return reinterpret_cast<char*>(detail::sched.smem.data()); }

inline int lane_id() { return static_cast<int>(detail::sched.cur->lane); }

// Every lane of the calling warp receives all lanes' `mine` arrays: all[l] = lane l's `mine`.
template <typename T, int N>
void warp_allgather(const T (&mine)[N], T (&all)[32][N]) {
  static_assert(std::is_trivially_copyable_v<T>, "gathered types must be trivially copyable");
  const detail::Collective& c = detail::kGather<T, N>;
  detail::Barrier& w = detail::warp_of_caller(c, 0xffffffffu);
  detail::GatherSlot<T, N> slot{&mine, &all};
  w.slot[detail::sched.cur->lane] = &slot;
  detail::sync(w, c);
}

inline const dim3& thread_idx() { return detail::sched.cur->idx; }
inline const dim3& block_idx() { return detail::sched.block_idx; }
inline const dim3& block_dim() { return detail::sched.block; }
inline const dim3& grid_dim() { return detail::sched.grid; }

}  // namespace ral_emu

// ---------------------------------------------------------------------------------------------
// CUDA built-in variables and functions

#define threadIdx (::ral_emu::thread_idx())
#define blockIdx (::ral_emu::block_idx())
#define blockDim (::ral_emu::block_dim())
#define gridDim (::ral_emu::grid_dim())

inline void __syncthreads() { ral_emu::detail::block_sync(ral_emu::detail::kSyncthreads, 0); }

inline int __syncthreads_or(int pred) {
  return ral_emu::detail::block_sync(ral_emu::detail::kSyncthreadsOr, pred) != 0;
}

inline int __syncthreads_and(int pred) {
  const int n = static_cast<int>(ral_emu::detail::sched.threads.size());
  return ral_emu::detail::block_sync(ral_emu::detail::kSyncthreadsAnd, pred) == n;
}

inline int __syncthreads_count(int pred) {
  return ral_emu::detail::block_sync(ral_emu::detail::kSyncthreadsCount, pred);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const ral_emu::detail::Collective& c = ral_emu::detail::kSyncwarp;
  ral_emu::detail::sync(ral_emu::detail::warp_of_caller(c, mask), c);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  return ral_emu::detail::shuffle(ral_emu::detail::kShflIdx<T>, mask, var, srcLane, width, false);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  return ral_emu::detail::shuffle(ral_emu::detail::kShflXor<T>, mask, var, laneMask, width, true);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t code = ral_emu::detail::last_error.code;
  ral_emu::detail::last_error.code = cudaSuccess;
  return code;
}

inline const char* cudaGetErrorString(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

// Accepts a kernel's function pointer or a const void* to it, as CUDA's overloads do.
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, int attr, int value) {
  return ral_emu::detail::set_func_attribute(reinterpret_cast<const void*>(func), attr, value);
}

inline unsigned __float_as_uint(float f) { return ral_emu::detail::bits(f); }
inline float __uint_as_float(unsigned u) { return ral_emu::detail::from_bits(u); }
inline int __float_as_int(float f) { return static_cast<int>(ral_emu::detail::bits(f)); }
inline float __int_as_float(int i) { return ral_emu::detail::from_bits(static_cast<unsigned>(i)); }

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline __half __float2half_rn(float f) { return __half{ral_emu::detail::float_to_half(f)}; }
inline float __half2float(__half h) { return ral_emu::detail::half_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{ral_emu::detail::float_to_bf16(f)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  return ral_emu::detail::from_bits(static_cast<std::uint32_t>(b.__x) << 16);
}

// Fibers are cooperative, so a plain read-modify-write is atomic.
template <class T, class U>
T atomicAdd(T* address, U val) {
  const T old = *address;
  *address = old + static_cast<T>(val);
  return old;
}
