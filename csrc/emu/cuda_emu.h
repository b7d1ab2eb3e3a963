// cuda_emu.h -- run CUDA kernel source on the CPU, for tests on machines without a GPU.
//
// Host-only C++17 with no CUDA headers. Compile the .cu files as C++ (a wrapper .cpp that
// #includes them) with g++ -DRAL_CPU_EMULATION -fsanitize=alignment; this header then supplies
// the CUDA names below and checks what a GPU would fault on or get wrong.
//
// What is emulated, with CUDA's results
//   * Launch: ral_emu::launch(kernel, grid, block, dyn_smem_bytes, args...) replaces
//     kernel<<<grid, block, dyn_smem_bytes, stream>>>(args...). It is synchronous, runs the
//     blocks one after another (blockIdx.x fastest, then y, then z), and never throws: errors are
//     recorded as CUDA records them (cudaGetLastError, cudaGetErrorString, plus the details in
//     ral_emu::last_error_message()).
//   * Threads: inside a block every CUDA thread is a cooperative fiber with its own 256 KiB stack
//     (a guard page below it turns an overflow into SIGSEGV). Fibers switch only inside barriers,
//     warp collectives and preemption points, in the order the schedule gives (below; by
//     default round-robin by linear thread id, starting with thread 0, with no preemption). A
//     warp is 32 consecutive linear thread ids; a partial last warp has only its existing lanes.
//   * Barriers and collectives: __syncthreads(_or/_and/_count), __syncwarp, __shfl_sync,
//     __shfl_xor_sync and ral_emu::warp_allgather. Masks must name the whole warp (all its
//     existing lanes). Reading a lane that does not exist (partial warp) yields 0xFF bytes, i.e.
//     NaN for floats.
//   * PTX the kernels reach through inline assembly: mma.sync m16n8k16 (fp16 / bf16, fp32
//     accumulation) and ldmatrix.x4 (plain and .trans), computed from the PTX fragment layouts;
//     cp.async 16-byte copies with commit / wait_group, landing at the wait (by default), so a
//     read of a tile before its wait reads the 0xFF fill.
//   * Shared memory: __shared__ arrays are function statics (blocks run one at a time, so each
//     block sees its own; they keep the previous block's values). Dynamic shared memory is
//     ral_emu::dynamic_smem() (instead of `extern __shared__`): 16-byte aligned and filled with
//     0xFF bytes at the start of every block, so reading it before writing shows up as NaN.
//     Dynamic shared memory above 48 KiB needs cudaFuncSetAttribute(kernel,
//     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first, up to the emulated arch's
//     per-block limit (sm_80/87: 163 KiB, sm_86/89/120: 99 KiB, sm_90/100: 227 KiB; default
//     sm_80, or RAL_EMU_ARCH, or ral_emu::set_arch), else the launch fails with
//     cudaErrorInvalidValue; static shared memory is not counted.
//   * Types and intrinsics: dim3, uint2/uint4/float2/float4/int4 (CUDA's alignment), __half and
//     __nv_bfloat16 with round-to-nearest-even conversions (NaN becomes CUDA's 0x7fff), bit
//     casts, __expf/__logf/__fdividef (computed exactly, not with the GPU's approximations),
//     atomicAdd.
//
// Schedules (RAL_EMU_SCHEDULE, read at startup, or ral_emu::set_schedule at any time)
//   A spec ORDER[:seed=N,preempt=P,landing=L] perturbs the interleaving, as a GPU's warps drift
//   apart: ORDER is inorder (the default), reverse (linear ids downwards) or random (seeded);
//   P is the chance that a thread is preempted at each preemption point -- before the stores of
//   the kernels' shared-tile helpers (ral_emu::preemption_point), at every cp.async issue and
//   every ldmatrix; L says when cp.async copies land: wait (the latest legal moment), issue (at
//   once) or random (at any scheduling point before the wait). E.g.
//   "random:seed=3,preempt=0.25,landing=random". The choices of each block depend only on the
//   seed, the block and the number of launches since the schedule was set, so a run replays. A
//   race-free kernel gives bit-identical results under every schedule; one whose barrier is
//   missing gives different ones under some.
//
// GPU bugs that become launch failures (cudaErrorLaunchFailure) instead of hangs or garbage
//   * deadlock: live threads wait at a barrier that can never complete, because threads of the
//     block returned before it or wait at another barrier (e.g. __syncwarp vs __syncthreads);
//   * the threads of one barrier arriving from different collectives (__syncwarp in one lane,
//     __shfl_sync in another), a partial mask, a shuffle width that is not a power of two <= 32;
//   * misalignment: an ldmatrix row or a cp.async source or destination not on 16 bytes, and
//     (with -fsanitize=alignment) any load or store through a pointer misaligned for its type,
//     e.g. a uint4 not on 16 bytes: a GPU faults or misreads;
//   * inter-block races (within a ral_emu::GlobalWatch, which the bindings set up for every
//     launch): a block that changes an input, or a byte of an output that another block of the
//     launch already changed, unless through atomicAdd. Blocks run at once on a GPU, so either
//     is a race. A block that writes back the value a byte already holds goes unseen;
//   * an exception thrown by kernel code.
//   The failing block is unwound (destructors of the kernel's locals run; a thread stopped at a
//   misaligned access is dropped without unwinding), the remaining blocks do not run, and the
//   next launch starts clean. A bad RAL_EMU_SCHEDULE or RAL_EMU_ARCH fails every launch with
//   cudaErrorInvalidValue, saying why.
//
// Not emulated
//   * The memory model: a write is visible to every thread at once and nothing is reordered;
//     schedules perturb the order of threads, not of one thread's memory operations.
//   * Independent thread scheduling inside a warp, partial-warp masks, votes, __activemask.
//   * TMA, wgmma, __constant__, streams, textures, atomics other than atomicAdd, the `<<< >>>`
//     syntax, dynamic parallelism.
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
#include <deque>
#include <exception>
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

// Global memory a launch reads or writes, for the per-launch checks (ral_emu::GlobalWatch).
struct Region {
  std::string name;
  const void* data;
  std::size_t bytes;
  std::size_t elem_bytes;  // messages give an element index: byte offset / elem_bytes
  bool writable;           // an output; else an input that must stay unchanged
};

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

// Dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin) by
// compute capability; 0 for an arch the emulator does not know.
inline int max_dyn_smem_optin(int arch) {
  switch (arch) {
    case 80: case 87: return 163 << 10;
    case 86: case 89: case 120: return 99 << 10;
    case 90: case 100: return 227 << 10;
    default: return 0;
  }
}

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

// One 16-byte cp.async copy: it lands (copies, or zero-fills when !valid) exactly once.
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;
  bool landed;
};

struct Thread {
  Context ctx;
  const Barrier* waiting = nullptr;  // barrier this thread is blocked on
  unsigned wait_gen = 0;             // generation it waits to complete
  bool exited = false;
  dim3 idx;
  unsigned linear = 0, lane = 0;
  Barrier* warp = nullptr;
  std::vector<AsyncCopy> open;                // cp.async copies since the last commit
  std::deque<std::vector<AsyncCopy>> groups;  // committed groups, oldest first
};

// The order in which runnable threads take turns, whether a running thread may lose the
// processor at a preemption point, and when cp.async copies land. The default (in order, no
// preemption, copies landing at their wait) is deterministic and fast; the others stand in
// for a GPU, whose warps drift apart and whose copies land whenever the memory system is done.
struct Schedule {
  enum Order { kInOrder, kReverse, kRandom } order = kInOrder;
  std::uint64_t seed = 0;
  double preempt = 0.0;  // chance of a switch at each preemption point
  enum Landing { kAtWait, kAtIssue, kAnyTime } landing = kAtWait;
};

// splitmix64: small, seedable, the same sequence everywhere.
struct Rng {
  std::uint64_t state = 0;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  unsigned below(std::size_t n) { return static_cast<unsigned>(((next() >> 32) * n) >> 32); }
};

// A region watched during one launch: its bytes after the last block, and who wrote each byte.
struct Watched {
  const Region* region;
  std::vector<unsigned char> before;
  std::vector<std::int32_t> owner;    // linear index of the writing block, -1 while unwritten
  std::vector<unsigned char> atomic;  // 1 where atomicAdd wrote: blocks may share those bytes
};

inline Schedule parse_schedule(const std::string& spec);

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
  Schedule schedule;
  Rng rng;                                   // reseeded per block: seed, launch, block index
  std::uint64_t launches = 0;                // since the schedule was set
  std::size_t pending_copies = 0;            // cp.async copies issued and not landed
  int arch = 80;                             // compute capability whose limits apply
  std::string schedule_error, arch_error;    // a bad RAL_EMU_SCHEDULE / RAL_EMU_ARCH
  std::vector<Watched> watched;              // global memory checked by the running launch

  Sched() { configure_from_environment(); }

  ~Sched() {
    for (char* s : stacks) munmap(s - page_size(), kStackBytes + page_size());
  }
  static std::size_t page_size() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

  // RAL_EMU_SCHEDULE and RAL_EMU_ARCH, read once when the program (or extension) starts; a bad
  // value fails every launch until ral_emu::set_schedule / set_arch replace it.
  void configure_from_environment() {
    try {
      if (const char* spec = std::getenv("RAL_EMU_SCHEDULE")) schedule = parse_schedule(spec);
    } catch (const std::exception& e) {
      schedule_error = std::string("RAL_EMU_SCHEDULE: ") + e.what();
    }
    if (const char* a = std::getenv("RAL_EMU_ARCH")) {
      char* end = nullptr;
      const long v = std::strtol(a, &end, 10);
      if (end == a || *end != '\0' || max_dyn_smem_optin(static_cast<int>(v)) == 0)
        arch_error = std::string("RAL_EMU_ARCH=") + a + ": expected one of 80, 86, 87, 89, 90, 100, 120";
      else
        arch = static_cast<int>(v);
    }
  }
};

inline thread_local std::vector<Region> watch_list;  // set by GlobalWatch on this host thread

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

// The thread to run instead of `me` (blocked, exited or preempted): the next linear id up (in
// order), down (reverse), or the first runnable one from a random id; nullptr when none can run.
inline Thread* next_runnable(const Thread& me) {
  const std::size_t n = sched.threads.size();
  const Schedule::Order order = sched.schedule.order;
  std::size_t i = order == Schedule::kRandom ? sched.rng.below(n) : me.linear;
  for (std::size_t k = 0; k < n; ++k) {
    if (order == Schedule::kReverse)
      i = (i == 0 ? n : i) - 1;
    else if (order == Schedule::kInOrder || k > 0)
      i = i + 1 == n ? 0 : i + 1;
    if (i != me.linear && runnable(sched.threads[i])) return &sched.threads[i];
  }
  return nullptr;
}

inline void land(AsyncCopy& c) {
  if (c.landed) return;
  if (c.valid)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
  c.landed = true;
  --sched.pending_copies;
}

// landing=random: at a quarter of the scheduling points, each copy in flight (of any thread,
// committed or not) lands with probability 1/2.
inline void land_some() {
  if (sched.schedule.landing != Schedule::kAnyTime || sched.pending_copies == 0 || (sched.rng.next() & 3) != 0)
    return;
  for (Thread& t : sched.threads) {
    for (AsyncCopy& c : t.open)
      if (sched.rng.next() & 1) land(c);
    for (std::vector<AsyncCopy>& g : t.groups)
      for (AsyncCopy& c : g)
        if (sched.rng.next() & 1) land(c);
  }
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
  if (sched.cancel) {
    if (std::uncaught_exceptions() == 0) throw Cancelled{};  // the block failed while this thread ran on
    return;  // from a destructor while a failed block unwinds
  }
  land_some();
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

// A point where a running thread may lose the processor, as a GPU warp may at any instruction:
// under a schedule with preempt > 0, with that chance, another runnable thread runs first.
inline void preempt_here() {
  Thread* me = sched.cur;
  if (me == nullptr) return;
  if (sched.cancel) {
    if (std::uncaught_exceptions() == 0) throw Cancelled{};  // the block failed while this thread ran on
    return;
  }
  land_some();
  if (!(sched.schedule.preempt > 0.0) || sched.rng.uniform() >= sched.schedule.preempt) return;
  Thread* next = next_runnable(*me);
  if (next == nullptr) return;
  sched.cur = next;
  switch_context(me->ctx, next->ctx);
  if (sched.cancel) throw Cancelled{};
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
inline void run_block(dim3 block_idx, std::uint64_t linear_block) {
  sched.block_idx = block_idx;
  std::memset(static_cast<void*>(sched.smem.data()), 0xFF, sched.smem.size() * sizeof(float4));
  reset_barrier(sched.block_bar);
  for (Barrier& w : sched.warps) reset_barrier(w);
  for (std::size_t i = 0; i < sched.threads.size(); ++i) {
    Thread& t = sched.threads[i];
    t.waiting = nullptr;
    t.exited = false;
    t.open.clear();
    t.groups.clear();
    make_context(t.ctx, sched.stacks[i], kStackBytes - stack_color(i), &fiber_main);
  }
  sched.exited = 0;
  sched.cancel = false;
  sched.pending_copies = 0;
  // Each block's choices depend only on the seed, the launch and the block: a failure replays.
  sched.rng.state = sched.schedule.seed ^ (sched.launches << 40) ^ linear_block;
  sched.rng.state = sched.rng.next();
  const std::size_t n = sched.threads.size();
  const Schedule::Order order = sched.schedule.order;
  Thread& first = sched.threads[order == Schedule::kInOrder ? 0 : order == Schedule::kReverse ? n - 1 : sched.rng.below(n)];
  sched.cur = &first;
  switch_context(sched.main_ctx, first.ctx);
  if (!sched.cancel) return;
  for (Thread& t : sched.threads) {  // unwind every fiber that has not exited
    if (t.exited) continue;
    sched.cur = &t;
    switch_context(sched.main_ctx, t.ctx);
  }
  throw std::runtime_error(sched.failure);
}

inline std::string arch_name(int arch) { return "sm_" + std::to_string(arch); }

// ---------------------------------------------------------------------------------------------
// Global memory checks: the blocks of a launch run one after another here, at once on a GPU

inline dim3 block_of(std::int64_t linear) {
  const std::int64_t gx = sched.grid.x, gy = sched.grid.y;
  return dim3(static_cast<unsigned>(linear % gx), static_cast<unsigned>(linear / gx % gy),
              static_cast<unsigned>(linear / (gx * gy)));
}

inline std::string byte_of(const Region& r, std::size_t i) {
  std::string at = "byte " + std::to_string(i) + " of " + r.name;
  if (r.elem_bytes > 1) at += " (element " + std::to_string(i / r.elem_bytes) + ")";
  return at;
}

inline void watch_launch() {
  sched.watched.clear();
  for (const Region& r : watch_list) {
    if (r.data == nullptr || r.bytes == 0) continue;
    const auto* bytes = static_cast<const unsigned char*>(r.data);
    sched.watched.push_back(Watched{&r, std::vector<unsigned char>(bytes, bytes + r.bytes),
                                    std::vector<std::int32_t>(r.writable ? r.bytes : 0, -1),
                                    std::vector<unsigned char>(r.writable ? r.bytes : 0, 0)});
  }
}

// Compares the watched memory with what it held before this block ran: a changed byte of an
// input, or of an output that another block already changed (other than through atomicAdd),
// is a race (or a stray write) that a GPU would turn into wrong or nondeterministic results.
// A block that writes back the value a byte already holds goes unseen.
inline std::string check_block_writes(std::int64_t linear_block) {
  for (Watched& w : sched.watched) {
    const Region& r = *w.region;
    const auto* now = static_cast<const unsigned char*>(r.data);
    for (std::size_t i0 = 0; i0 < r.bytes; i0 += 64) {
      const std::size_t n = std::min<std::size_t>(64, r.bytes - i0);
      if (std::memcmp(now + i0, w.before.data() + i0, n) == 0) continue;
      for (std::size_t i = i0; i < i0 + n; ++i) {
        if (now[i] == w.before[i]) continue;
        w.before[i] = now[i];
        if (!r.writable)
          return "ral_emu: block " + str(block_of(linear_block)) + " wrote " + byte_of(r, i) +
                 ", an input of this launch";
        if (w.owner[i] == -1 || w.owner[i] == linear_block || w.atomic[i]) {
          w.owner[i] = static_cast<std::int32_t>(linear_block);
          continue;
        }
        return "ral_emu: blocks " + str(block_of(w.owner[i])) + " and " + str(block_of(linear_block)) + " both wrote " +
               byte_of(r, i) + " in one launch; blocks run concurrently on a GPU, so an address needs one owning "
               "block or atomics";
      }
    }
  }
  return "";
}

// atomicAdd marks its bytes: blocks may share them.
inline void note_atomic(const void* address, std::size_t bytes) {
  const auto* a = static_cast<const unsigned char*>(address);
  for (Watched& w : sched.watched) {
    const auto* base = static_cast<const unsigned char*>(w.region->data);
    if (!w.region->writable || a < base || a + bytes > base + w.region->bytes) continue;
    std::fill_n(w.atomic.begin() + (a - base), bytes, static_cast<unsigned char>(1));
  }
}

inline void run_grid(void (*kernel)(const void*), const void* args, const void* key, dim3 grid,
                     dim3 block, std::size_t dyn_smem) {
  if (in_launch) throw std::runtime_error("ral_emu: launching a kernel from a kernel is not supported");
  const std::string bad_config = config_error(grid, block);
  if (!bad_config.empty()) return set_error(cudaErrorInvalidConfiguration, "ral_emu: " + bad_config);
  std::lock_guard<std::mutex> lock(sched.mutex);
  for (const std::string* e : {&sched.schedule_error, &sched.arch_error})
    if (!e->empty()) return set_error(cudaErrorInvalidValue, "ral_emu: " + *e);
  if (dyn_smem > dyn_smem_limit(key)) {
    return set_error(cudaErrorInvalidValue,
                     "ral_emu: " + std::to_string(dyn_smem) + " bytes of dynamic shared memory exceed "
                     "the kernel's limit of " + std::to_string(dyn_smem_limit(key)) +
                     " (raise it with cudaFuncSetAttribute)");
  }
  const std::size_t arch_limit = static_cast<std::size_t>(max_dyn_smem_optin(sched.arch));
  if (dyn_smem > arch_limit) {
    return set_error(cudaErrorInvalidValue, "ral_emu: " + std::to_string(dyn_smem) +
                                                " bytes of dynamic shared memory exceed " + arch_name(sched.arch) +
                                                "'s " + std::to_string(arch_limit) + " per block");
  }
  in_launch = true;
  try {
    setup(kernel, args, grid, block, dyn_smem);
    watch_launch();
    std::int64_t linear = 0;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x, ++linear) {
          run_block(dim3(x, y, z), static_cast<std::uint64_t>(linear));
          const std::string race = check_block_writes(linear);
          if (!race.empty()) throw std::runtime_error(race);
        }
  } catch (const std::exception& e) {
    set_error(cudaErrorLaunchFailure, e.what());
  }
  sched.watched.clear();
  ++sched.launches;
  sched.cur = nullptr;
  in_launch = false;
}

template <class Call>
void invoke(const void* call) {
  const Call& c = *static_cast<const Call*>(call);
  std::apply(c.kernel, c.params);  // by-value kernel parameters: each thread gets its own copy
}

inline cudaError_t set_func_attribute(const void* kernel, int attr, int value) {
  std::lock_guard<std::mutex> lock(sched.mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > max_dyn_smem_optin(sched.arch)) {
    set_error(cudaErrorInvalidValue, "ral_emu: unsupported cudaFuncSetAttribute(" + std::to_string(attr) + ", " +
                                         std::to_string(value) + ") on " + arch_name(sched.arch) + " (at most " +
                                         std::to_string(max_dyn_smem_optin(sched.arch)) +
                                         " bytes of dynamic shared memory per block)");
    return cudaErrorInvalidValue;
  }
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

inline const char* order_name(Schedule::Order o) {
  return o == Schedule::kInOrder ? "inorder" : o == Schedule::kReverse ? "reverse" : "random";
}

inline const char* landing_name(Schedule::Landing l) {
  return l == Schedule::kAtWait ? "wait" : l == Schedule::kAtIssue ? "issue" : "random";
}

inline std::string format_schedule(const Schedule& s) {
  char preempt[32];
  std::snprintf(preempt, sizeof preempt, "%g", s.preempt);
  return std::string(order_name(s.order)) + ":seed=" + std::to_string(s.seed) + ",preempt=" + preempt +
         ",landing=" + landing_name(s.landing);
}

inline Schedule parse_schedule(const std::string& spec) {
  auto bad = [&](const std::string& why) {
    return std::invalid_argument("bad schedule \"" + spec + "\": " + why +
                                 "; expected ORDER[:seed=N,preempt=P,landing=L] with ORDER inorder, reverse or "
                                 "random, 0 <= P <= 1, L wait, issue or random");
  };
  Schedule s;
  const std::size_t colon = spec.find(':');
  const std::string order = spec.substr(0, colon);
  if (order == "inorder" || order.empty()) {
    s.order = Schedule::kInOrder;
  } else if (order == "reverse") {
    s.order = Schedule::kReverse;
  } else if (order == "random") {
    s.order = Schedule::kRandom;
  } else {
    throw bad("unknown order \"" + order + "\"");
  }
  if (colon == std::string::npos) return s;
  std::size_t pos = colon + 1;
  while (pos <= spec.size()) {
    const std::size_t comma = std::min(spec.find(',', pos), spec.size());
    const std::string item = spec.substr(pos, comma - pos);
    pos = comma + 1;
    const std::size_t eq = item.find('=');
    if (eq == std::string::npos) throw bad("\"" + item + "\" is not key=value");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    char* end = nullptr;
    if (key == "seed") {
      s.seed = std::strtoull(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || value[0] == '-') throw bad("seed must be a non-negative integer");
    } else if (key == "preempt") {
      s.preempt = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(s.preempt >= 0.0 && s.preempt <= 1.0))
        throw bad("preempt must be a number in [0, 1]");
    } else if (key == "landing") {
      if (value == "wait") s.landing = Schedule::kAtWait;
      else if (value == "issue") s.landing = Schedule::kAtIssue;
      else if (value == "random") s.landing = Schedule::kAnyTime;
      else throw bad("unknown landing \"" + value + "\"");
    } else {
      throw bad("unknown key \"" + key + "\"");
    }
  }
  return s;
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

// The schedule of later launches, from a spec (see the top of this file); returns the previous
// schedule's spec. Throws std::invalid_argument for a bad spec.
inline std::string set_schedule(const std::string& spec) {
  const detail::Schedule s = detail::parse_schedule(spec);
  std::lock_guard<std::mutex> lock(detail::sched.mutex);
  std::string previous = detail::format_schedule(detail::sched.schedule);
  detail::sched.schedule = s;
  detail::sched.launches = 0;
  detail::sched.schedule_error.clear();
  return previous;
}

inline std::string schedule() {
  std::lock_guard<std::mutex> lock(detail::sched.mutex);
  return detail::format_schedule(detail::sched.schedule);
}

// Dynamic shared memory a block may use on compute capability `sm` (0 if unknown).
inline int max_dyn_smem_per_block(int sm) { return detail::max_dyn_smem_optin(sm); }

// The compute capability whose limits later launches check; returns the previous one.
// Throws std::invalid_argument for an arch the emulator does not know.
inline int set_arch(int sm) {
  if (detail::max_dyn_smem_optin(sm) == 0)
    throw std::invalid_argument("unknown compute capability " + std::to_string(sm) +
                                ": expected one of 80, 86, 87, 89, 90, 100, 120");
  std::lock_guard<std::mutex> lock(detail::sched.mutex);
  const int previous = detail::sched.arch;
  detail::sched.arch = sm;
  detail::sched.arch_error.clear();
  return previous;
}

inline int arch() {
  std::lock_guard<std::mutex> lock(detail::sched.mutex);
  return detail::sched.arch;
}

// While it lives, every launch from this host thread checks the given global memory: inputs
// stay unchanged, and each byte of an output is written by one block (or through atomicAdd).
class GlobalWatch {
 public:
  explicit GlobalWatch(std::vector<Region> regions) : saved_(std::move(detail::watch_list)) {
    detail::watch_list = std::move(regions);
  }
  ~GlobalWatch() { detail::watch_list = std::move(saved_); }
  GlobalWatch(const GlobalWatch&) = delete;
  GlobalWatch& operator=(const GlobalWatch&) = delete;

 private:
  std::vector<Region> saved_;
};

// Where a thread may be preempted under a perturbed schedule; kernels' helpers call it before
// shared-memory stores (ldmatrix and cp.async are preemption points themselves).
inline void preemption_point() { detail::preempt_here(); }

// ---------------------------------------------------------------------------------------------
// PTX instructions that CUDA code reaches through inline assembly

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 (T = __half or __nv_bfloat16): d += a b for the
// warp's 16x16 A and 16x8 B, computed from the PTX fragment layout (g = lane / 4, c = lane % 4):
// A regs: A[g][2c..], A[g+8][2c..], A[g][2c+8..], A[g+8][2c+8..]; B regs: B[2c..][g],
// B[2c+8..][g]; D: D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1]. Products of 16-bit values are
// exact in fp32; each output sums its 16 products in k order, then adds them to d.
template <class T>
void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma takes fp16 or bf16");
  auto value = [](std::uint32_t reg, int k) {
    const auto bits16 = static_cast<unsigned short>(reg >> (16 * (k & 1)));
    if constexpr (std::is_same_v<T, __half>) return detail::half_to_float(bits16);
    return detail::from_bits(static_cast<std::uint32_t>(bits16) << 16);
  };
  const std::uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  std::uint32_t all[32][6];
  warp_allgather(mine, all);
  const int lane = lane_id(), g = lane >> 2, c = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) {
      const std::uint32_t ra = all[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
      const std::uint32_t rb = all[col * 4 + (k % 8) / 2][4 + (k >= 8)];
      acc += value(ra, k) * value(rb, k);
    }
    d[e] += acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8i..8i+7 give the 16-byte aligned
// row addresses of 8x8 matrix i; each lane receives one register per matrix: row lane / 4,
// elements 2 (lane % 4) and + 1 (low half first) -- or, with .trans, column lane / 4 at rows
// 2 (lane % 4) and + 1. A fragment read, so a preemption point.
template <bool TRANS>
void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  detail::preempt_here();
  const auto address = reinterpret_cast<std::uintptr_t>(row);
  if (address % 16 != 0) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(address));
    throw std::runtime_error(std::string("ldmatrix row address ") + hex +
                             " is not 16-byte aligned (a GPU faults or reads the wrong rows)");
  }
  const std::uint64_t mine[1] = {address};
  std::uint64_t all[32][1];
  warp_allgather(mine, all);
  const int lane = lane_id(), g = lane >> 2, c = lane & 3;
  for (int i = 0; i < 4; ++i) {
    auto at = [&](int rr, int col) { return reinterpret_cast<const std::uint16_t*>(all[8 * i + rr][0])[col]; };
    const std::uint16_t lo = TRANS ? at(2 * c, g) : at(g, 2 * c), hi = TRANS ? at(2 * c + 1, g) : at(g, 2 * c + 1);
    r[i] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
  }
}

// cp.async.cg.shared.global [dst], [src], 16, (valid ? 16 : 0): starts a 16-byte copy (zero
// fill when !valid); both addresses 16-byte aligned. The copy lands when cp_async_wait retires
// its group, or, under a perturbed schedule, at once (landing=issue) or at any moment up to
// that wait (landing=random). A read of the destination before the wait sees the 0xFF fill.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  detail::preempt_here();
  const auto d = reinterpret_cast<std::uintptr_t>(dst), s = reinterpret_cast<std::uintptr_t>(src);
  if (d % 16 != 0 || (valid && s % 16 != 0)) {
    char hex[80];
    std::snprintf(hex, sizeof hex, "from 0x%llx to 0x%llx", static_cast<unsigned long long>(s),
                  static_cast<unsigned long long>(d));
    throw std::runtime_error(std::string("cp.async 16-byte copy ") + hex +
                             " is not 16-byte aligned (a GPU faults)");
  }
  detail::Thread& me = *detail::sched.cur;
  me.open.push_back(detail::AsyncCopy{dst, src, valid, false});
  ++detail::sched.pending_copies;
  if (detail::sched.schedule.landing == detail::Schedule::kAtIssue) detail::land(me.open.back());
}

// cp.async.commit_group: this thread's copies since the last commit become one group.
inline void cp_async_commit() {
  detail::Thread& me = *detail::sched.cur;
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}

// cp.async.wait_group n: every group but the n most recent of this thread has landed.
inline void cp_async_wait(int n) {
  detail::Thread& me = *detail::sched.cur;
  while (me.groups.size() > static_cast<std::size_t>(n)) {
    for (detail::AsyncCopy& c : me.groups.front()) detail::land(c);
    me.groups.pop_front();
  }
}

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

// Fibers are cooperative, so a plain read-modify-write is atomic. Blocks may share the bytes
// it writes (the per-launch write-ownership check lets them).
template <class T, class U>
T atomicAdd(T* address, U val) {
  ral_emu::detail::note_atomic(address, sizeof(T));
  const T old = *address;
  *address = old + static_cast<T>(val);
  return old;
}

// ---------------------------------------------------------------------------------------------
// Misaligned loads and stores (the emulator builds with -fsanitize=alignment)
//
// The instrumented code calls these UBSan entry points for a load or store through a pointer
// not aligned for its type (a uint4 not on 16 bytes, a float not on 4): an access a GPU faults
// on or silently misreads, and x86 mostly does not notice. Defined here (weak, so that every
// translation unit may carry them), they need no UBSan runtime. Inside a kernel the launch fails
// and the thread stops on the spot: the access never runs (an aligned SSE move would fault) and
// the thread's stack is dropped without unwinding. Host code is left alone (with
// -fno-sanitize-recover, which must not return, it aborts). `data` is UBSan's TypeMismatchData.
namespace ral_emu {
namespace detail {

struct UbsanLocation {
  const char* file;
  std::uint32_t line, column;
};
struct UbsanType {
  std::uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanLocation loc;
  const UbsanType* type;
  unsigned char log_alignment, check_kind;
};

inline std::string misaligned_message(void* data, void* pointer) {
  const auto& d = *static_cast<const UbsanTypeMismatch*>(data);
  static const char* const kKinds[] = {"load of", "store to", "reference to", "member access in",
                                       "member call on", "constructor call on", "downcast of", "downcast of",
                                       "upcast of", "cast of", "binding of", "dynamic operation on"};
  const char* kind = d.check_kind < sizeof kKinds / sizeof kKinds[0] ? kKinds[d.check_kind] : "access to";
  char text[96];
  std::snprintf(text, sizeof text, " at 0x%llx (needs %u-byte alignment)",
                static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(pointer)), 1u << d.log_alignment);
  return "ral_emu: misaligned " + std::string(kind) + " " + d.type->name + text + ", " + d.loc.file + ":" +
         std::to_string(d.loc.line);
}

// In a kernel: fail the launch and leave this fiber for good. Returns only for host code.
inline void misaligned_access(void* data, void* pointer) {
  if (!in_launch || sched.cur == nullptr) return;
  Thread& me = *sched.cur;
  fail(misaligned_message(data, pointer) + ", in " + where(me) + ": a GPU faults or misreads such an access");
  me.exited = true;  // never resumed, never unwound
  ++sched.exited;
  schedule(me);
  std::abort();
}

}  // namespace detail
}  // namespace ral_emu

extern "C" __attribute__((weak)) void __ubsan_handle_type_mismatch_v1(void* data, void* pointer) {
  ral_emu::detail::misaligned_access(data, pointer);
}
extern "C" __attribute__((weak, noreturn)) void __ubsan_handle_type_mismatch_v1_abort(void* data, void* pointer) {
  ral_emu::detail::misaligned_access(data, pointer);
  std::fprintf(stderr, "%s\n", ral_emu::detail::misaligned_message(data, pointer).c_str());
  std::abort();
}
