// Checks of csrc/emu/cuda_emu.h, driven by test_emulator.py. `emu_checks NAME [ARGS]` runs one
// check; it exits 0 when the check passes and prints what went wrong otherwise. The kernels are
// written as CUDA source, as the kernels in csrc/*.cu are.
#include "cuda_emu.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

int run_in_second_tu();  // emu_checks_tu2.cpp

namespace {

void expect_success() {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::fprintf(stderr, "launch failed: %s: %s\n", cudaGetErrorString(e), ral_emu::last_error_message());
    std::exit(1);
  }
}

// The last launch failed with `code`, its message contains every part, and the code is cleared.
void expect_failure(cudaError_t code, std::initializer_list<const char*> parts) {
  const cudaError_t e = cudaGetLastError();
  const char* msg = ral_emu::last_error_message();
  if (e != code) {
    std::fprintf(stderr, "expected error %d, got %d (%s)\n", code, e, msg);
    std::exit(1);
  }
  for (const char* part : parts) {
    if (std::strstr(msg, part) == nullptr) {
      std::fprintf(stderr, "error message \"%s\" lacks \"%s\"\n", msg, part);
      std::exit(1);
    }
  }
  CHECK(cudaGetLastError() == cudaSuccess);
}

unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
unsigned threads_per_block() { return blockDim.x * blockDim.y * blockDim.z; }
bool same(dim3 a, dim3 b) { return a.x == b.x && a.y == b.y && a.z == b.z; }

// ---- thread and block indices ----------------------------------------------------------------

struct Seen {
  dim3 thread, block, block_dim, grid_dim;
  int lane;
};

__global__ void record_indices(Seen* seen, unsigned* order, unsigned* n_order) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  seen[block * threads_per_block() + linear_thread()] = {threadIdx, blockIdx, blockDim, gridDim,
                                                         ral_emu::lane_id()};
  if (linear_thread() == 0) order[(*n_order)++] = block;
}

void check_indices() {
  const dim3 grid(3, 2, 2), block(4, 3, 3);  // 36 threads: the second warp is partial
  std::vector<Seen> seen(12 * 36, Seen{dim3(9, 9, 9), dim3(9, 9, 9), dim3(), dim3(), -1});
  std::vector<unsigned> order(12);
  unsigned n_order = 0;
  ral_emu::launch(record_indices, grid, block, 0, seen.data(), order.data(), &n_order);
  expect_success();
  CHECK(n_order == 12);
  for (unsigned b = 0; b < 12; ++b) CHECK(order[b] == b);  // blockIdx.x fastest, then y, then z
  for (unsigned b = 0; b < 12; ++b) {
    for (unsigned t = 0; t < 36; ++t) {
      const Seen& s = seen[b * 36 + t];
      CHECK(same(s.thread, dim3(t % 4, t / 4 % 3, t / 12)));
      CHECK(same(s.block, dim3(b % 3, b / 3 % 2, b / 6)));
      CHECK(same(s.block_dim, block) && same(s.grid_dim, grid));
      CHECK(s.lane == static_cast<int>(t % 32));
    }
  }
}

// ---- __syncthreads ordering through shared memory ----------------------------------------------

// Tree reduction of each block's N inputs; `rotated` checks that every write before a barrier is
// seen after it: thread t reads what thread t + 1 wrote.
template <int N>
__global__ void reduce_static(const float* in, float* sums, float* rotated) {
  __shared__ float s[N];
  const unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * N + t];
  __syncthreads();
  rotated[blockIdx.x * N + t] = s[(t + 1) % N];
  __syncthreads();
  for (unsigned stride = N / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) sums[blockIdx.x] = s[0];
}

__global__ void reduce_dynamic(const float* in, float* sums, float* rotated, int* aligned) {
  float* s = reinterpret_cast<float*>(ral_emu::dynamic_smem());
  const unsigned t = threadIdx.x, n = blockDim.x;
  if (t == 0) aligned[blockIdx.x] = reinterpret_cast<std::uintptr_t>(s) % 16 == 0;
  s[t] = in[blockIdx.x * n + t];
  __syncthreads();
  rotated[blockIdx.x * n + t] = s[(t + 1) % n];
  __syncthreads();
  for (unsigned stride = n / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) sums[blockIdx.x] = s[0];
}

// Integer-valued inputs, so every summation order gives the exact sum.
void check_reduction(bool dynamic) {
  const unsigned n = dynamic ? 128 : 256, blocks = 5;
  std::vector<float> in(n * blocks), sums(blocks), rotated(n * blocks);
  std::vector<int> aligned(blocks);
  for (unsigned i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i * 37) % 101) - 50;
  if (dynamic) {
    ral_emu::launch(reduce_dynamic, dim3(blocks), dim3(n), n * sizeof(float), in.data(),
                    sums.data(), rotated.data(), aligned.data());
  } else {
    ral_emu::launch(reduce_static<256>, dim3(blocks), dim3(n), 0, in.data(), sums.data(),
                    rotated.data());
  }
  expect_success();
  for (unsigned b = 0; b < blocks; ++b) {
    float expected = 0;
    for (unsigned t = 0; t < n; ++t) expected += in[b * n + t];
    CHECK(sums[b] == expected);
    for (unsigned t = 0; t < n; ++t) CHECK(rotated[b * n + t] == in[b * n + (t + 1) % n]);
    CHECK(!dynamic || aligned[b] == 1);
  }
}

// ---- dynamic shared memory starts as 0xFF bytes in every block ---------------------------------

__global__ void smem_fill(int nbytes, int* all_ff) {
  unsigned char* raw = reinterpret_cast<unsigned char*>(ral_emu::dynamic_smem());
  int ff = 1;
  for (int i = threadIdx.x; i < nbytes; i += blockDim.x) ff &= raw[i] == 0xFF;
  all_ff[blockIdx.x * blockDim.x + threadIdx.x] = ff;
  __syncthreads();
  for (int i = threadIdx.x; i < nbytes; i += blockDim.x) raw[i] = 0;
}

// No barrier between the write and the read: thread t reads its neighbour's slot before the
// neighbour has run, and sees the fill pattern.
__global__ void read_before_write(unsigned* seen) {
  float* s = reinterpret_cast<float*>(ral_emu::dynamic_smem());
  s[threadIdx.x] = 1.0f;
  seen[threadIdx.x] = __float_as_uint(s[(threadIdx.x + 1) % blockDim.x]);
}

void check_smem_fill() {
  const int nbytes = 1000, threads = 64, blocks = 3;
  std::vector<int> all_ff(threads * blocks, 0);
  ral_emu::launch(smem_fill, dim3(blocks), dim3(threads), nbytes, nbytes, all_ff.data());
  expect_success();
  for (int v : all_ff) CHECK(v == 1);

  std::vector<unsigned> seen(threads);
  ral_emu::launch(read_before_write, dim3(1), dim3(threads), threads * sizeof(float), seen.data());
  expect_success();
  for (int t = 0; t + 1 < threads; ++t) CHECK(seen[t] == 0xFFFFFFFFu);
  CHECK(seen[threads - 1] == __float_as_uint(1.0f));
}

// ---- shuffles against CUDA's definitions ------------------------------------------------------

constexpr int kWidths[] = {1, 2, 4, 8, 16, 32};
constexpr int kPerLane = 1000;  // srcLane = (7 * lane + 3) % 32, different in every lane
constexpr int kSrcLanes[] = {-33, -1, 0, 1, 3, 5, 31, 32, 63, kPerLane};
constexpr int kShuffles = 6 * (10 + 32) + 2;

template <class T>
T value_of(unsigned t) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<T>(t) * T(0.5) + T(0.25);
  else return static_cast<T>(t * 3 + 1);
}

template <class T>
__global__ void shuffles(T* out) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  const T v = value_of<T>(t);
  int k = 0;
  for (int width : kWidths) {
    for (int src : kSrcLanes) {
      const int lane = ral_emu::lane_id();
      out[k++ * n + t] = __shfl_sync(0xffffffffu, v, src == kPerLane ? (7 * lane + 3) % 32 : src, width);
    }
    for (int mask = 0; mask < 32; ++mask) out[k++ * n + t] = __shfl_xor_sync(0xffffffffu, v, mask, width);
  }
  out[k++ * n + t] = __shfl_sync(0xffffffffu, v, 7);
  out[k++ * n + t] = __shfl_xor_sync(0xffffffffu, v, 5);
}

// CUDA C++ Programming Guide, warp shuffle functions: within groups of `width` lanes, srcLane is
// taken modulo width; xor may read earlier groups, and reading a later group returns own value.
int ref_idx(int lane, int src, int width) { return lane / width * width + ((src % width) + width) % width; }
int ref_xor(int lane, int mask, int width) {
  const int j = lane ^ mask;
  return j >= (lane / width + 1) * width ? lane : j;
}

template <class T>
void check_shuffles_of() {
  const unsigned n = 64;
  std::vector<T> out(kShuffles * n);
  ral_emu::launch(shuffles<T>, dim3(1), dim3(n), 0, out.data());
  expect_success();
  for (unsigned t = 0; t < n; ++t) {
    const int lane = t % 32, base = t - lane;
    std::vector<int> src;
    for (int width : kWidths) {
      for (int s : kSrcLanes) src.push_back(ref_idx(lane, s == kPerLane ? (7 * lane + 3) % 32 : s, width));
      for (int mask = 0; mask < 32; ++mask) src.push_back(ref_xor(lane, mask, width));
    }
    src.push_back(7);
    src.push_back(lane ^ 5);
    for (int k = 0; k < kShuffles; ++k) {
      if (out[k * n + t] != value_of<T>(base + src[k])) {
        std::fprintf(stderr, "shuffle %d, thread %u: expected lane %d\n", k, t, src[k]);
        std::exit(1);
      }
    }
  }
}

void check_shuffles() {
  check_shuffles_of<float>();
  check_shuffles_of<int>();
  check_shuffles_of<unsigned>();
  check_shuffles_of<double>();
}

// ---- warp_allgather ---------------------------------------------------------------------------

__global__ void gather(float* out, int* out_int, float* out_aliased) {
  const unsigned t = threadIdx.x, lane = ral_emu::lane_id();
  const float mine[3] = {float(t), 2.0f * t, -float(t)};
  float all[32][3];
  ral_emu::warp_allgather(mine, all);
  std::memcpy(out + t * 96, all, sizeof all);

  const int one[1] = {int(t) * 7};
  int all_int[32][1];
  ral_emu::warp_allgather(one, all_int);
  std::memcpy(out_int + t * 32, all_int, sizeof all_int);

  float rows[32][3];  // `mine` is a row of `all`
  rows[lane][0] = float(t);
  rows[lane][1] = 2.0f * t;
  rows[lane][2] = -float(t);
  ral_emu::warp_allgather(rows[lane], rows);
  std::memcpy(out_aliased + t * 96, rows, sizeof rows);
}

void check_allgather_block(unsigned n) {
  std::vector<float> out(n * 96), aliased(n * 96);
  std::vector<int> out_int(n * 32);
  ral_emu::launch(gather, dim3(1), dim3(n), 0, out.data(), out_int.data(), aliased.data());
  expect_success();
  for (unsigned t = 0; t < n; ++t) {
    const unsigned base = t - t % 32;
    for (unsigned s = 0; s < 32; ++s) {
      const unsigned src = base + s;
      const float* got = &out[t * 96 + s * 3];
      const float* got_aliased = &aliased[t * 96 + s * 3];
      if (src < n) {
        const float expected[3] = {float(src), 2.0f * src, -float(src)};
        CHECK(std::memcmp(got, expected, sizeof expected) == 0);
        CHECK(std::memcmp(got_aliased, expected, sizeof expected) == 0);
        CHECK(out_int[t * 32 + s] == int(src) * 7);
      } else {  // the lane does not exist: 0xFF bytes
        for (int k = 0; k < 3; ++k) CHECK(__float_as_uint(got[k]) == 0xFFFFFFFFu);
        CHECK(out_int[t * 32 + s] == -1);
      }
    }
  }
}

void check_allgather() {
  check_allgather_block(64);
  check_allgather_block(40);  // partial second warp of 8 lanes
}

// ---- __syncthreads_or / _and / _count -------------------------------------------------------

__global__ void predicates(int* out) {
  const unsigned t = linear_thread(), n = threads_per_block();
  const int preds[4] = {0, t == n / 2, 1, t % 3 == 0};
  for (int p = 0; p < 4; ++p) {
    out[(p * 3 + 0) * n + t] = __syncthreads_or(preds[p]);
    out[(p * 3 + 1) * n + t] = __syncthreads_and(preds[p]);
    out[(p * 3 + 2) * n + t] = __syncthreads_count(preds[p]);
  }
}

void check_predicates_block(dim3 block) {
  const int n = block.x * block.y * block.z;
  std::vector<int> out(12 * n, -7);
  ral_emu::launch(predicates, dim3(2), block, 0, out.data());
  expect_success();
  const int thirds = (n + 2) / 3;
  const int expected[4][3] = {{0, 0, 0}, {1, n == 1, 1}, {1, 1, n}, {1, n == 1, thirds}};
  for (int p = 0; p < 4; ++p)
    for (int op = 0; op < 3; ++op)
      for (int t = 0; t < n; ++t) CHECK(out[(p * 3 + op) * n + t] == expected[p][op]);
}

void check_predicates() {
  check_predicates_block(dim3(1024));
  check_predicates_block(dim3(3, 5, 7));
}

// ---- a partial last warp ---------------------------------------------------------------------

__global__ void partial_warp(float* sums, unsigned* far, int* count) {
  const unsigned t = threadIdx.x;
  const bool last_warp = t >= 32;  // 16 lanes
  __syncwarp();
  float v = float(t);
  for (int m = 8; m > 0; m /= 2) v += __shfl_xor_sync(last_warp ? 0x0000ffffu : 0xffffffffu, v, m, 16);
  sums[t] = v;
  far[t] = __float_as_uint(__shfl_sync(0xffffffffu, float(t), 20));
  count[t] = __syncthreads_count(1);
}

void check_partial_warp() {
  const unsigned n = 48;
  std::vector<float> sums(n);
  std::vector<unsigned> far(n);
  std::vector<int> count(n);
  ral_emu::launch(partial_warp, dim3(1), dim3(n), 0, sums.data(), far.data(), count.data());
  expect_success();
  for (unsigned t = 0; t < n; ++t) {
    const unsigned first = t / 16 * 16;
    CHECK(sums[t] == float(16 * first + 120));  // first + ... + first + 15
    CHECK(far[t] == (t < 32 ? __float_as_uint(20.0f) : 0xFFFFFFFFu));  // lane 52 does not exist
    CHECK(count[t] == int(n));
  }
}

// ---- failures: deadlocks, mismatched collectives, exceptions --------------------------------------

int g_destroyed = 0;
struct Guard {
  ~Guard() { ++g_destroyed; }
};

__global__ void early_exit(int* passed) {
  Guard guard;
  if (blockIdx.x == 1 && threadIdx.x >= 64) return;
  __syncthreads();
  atomicAdd(passed, 1);
}

__global__ void count_threads(int* n) { atomicAdd(n, 1); }

// After a failed launch the next one runs normally.
void expect_next_launch_works() {
  int n = 0;
  ral_emu::launch(count_threads, dim3(2, 2), dim3(8, 8), 0, &n);
  expect_success();
  CHECK(n == 256);
}

void check_deadlock_exit() {
  int passed = 0;
  ral_emu::launch(early_exit, dim3(3), dim3(128), 0, &passed);
  expect_failure(cudaErrorLaunchFailure, {"deadlock in block (1,0,0)", "64 thread(s) waiting (64 at __syncthreads)",
                                          "64 of 128 thread(s) exited"});
  CHECK(passed == 128);           // block 0 only: block 1 failed, block 2 never ran
  CHECK(g_destroyed == 2 * 128);  // the 64 stuck threads were unwound
  expect_next_launch_works();
}

__global__ void mixed_barriers() {
  if (threadIdx.x == 0 || threadIdx.x >= 32) __syncthreads();
  else __syncwarp();
}

void check_deadlock_mixed() {
  ral_emu::launch(mixed_barriers, dim3(1), dim3(64), 0);
  expect_failure(cudaErrorLaunchFailure, {"deadlock in block (0,0,0)", "33 at __syncthreads", "31 at __syncwarp",
                                          "0 of 64 thread(s) exited"});
  expect_next_launch_works();
}

__global__ void mismatched() {
  if (threadIdx.x < 16) __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  else __syncwarp();
}

__global__ void bad_mask() { __shfl_sync(0x0000ffffu, 1.0f, 0); }
__global__ void bad_width() { __shfl_xor_sync(0xffffffffu, 1, 1, 3); }

void check_collective_errors() {
  ral_emu::launch(mismatched, dim3(1), dim3(32), 0);
  expect_failure(cudaErrorLaunchFailure, {"thread (16,0,0)", "called __syncwarp while the other threads at this barrier are in __shfl_xor_sync"});
  ral_emu::launch(bad_mask, dim3(1), dim3(32), 0);
  expect_failure(cudaErrorLaunchFailure, {"__shfl_sync with mask 0x0000ffff"});
  ral_emu::launch(bad_width, dim3(1), dim3(32), 0);
  expect_failure(cudaErrorLaunchFailure, {"__shfl_xor_sync with width 3"});
  expect_next_launch_works();
}

__global__ void throws(int* passed) {
  if (blockIdx.x == 2 && threadIdx.x == 5) throw std::runtime_error("boom");
  __syncthreads();
  atomicAdd(passed, 1);
}

__global__ void throws_int() {
  __syncwarp();
  if (threadIdx.x == 40) throw 42;
}

__global__ void nested_launch(int* n) { ral_emu::launch(count_threads, dim3(1), dim3(1), 0, n); }

void check_exception() {
  int passed = 0;
  ral_emu::launch(throws, dim3(4), dim3(64), 0, &passed);
  expect_failure(cudaErrorLaunchFailure, {"kernel threw in block (2,0,0) thread (5,0,0): boom"});
  CHECK(passed == 128);
  ral_emu::launch(throws_int, dim3(1), dim3(64), 0);
  expect_failure(cudaErrorLaunchFailure, {"non-std exception in block (0,0,0) thread (40,0,0)"});
  int n = 0;
  ral_emu::launch(nested_launch, dim3(1), dim3(1), 0, &n);
  expect_failure(cudaErrorLaunchFailure, {"launching a kernel from a kernel"});
  expect_next_launch_works();
}

// ---- launch configuration errors ---------------------------------------------------------------

__global__ void uses_smem(int* n) {
  ral_emu::dynamic_smem()[0] = 1;
  atomicAdd(n, 1);
}

void check_invalid_config() {
  int n = 0;
  for (dim3 block : {dim3(0), dim3(1025), dim3(32, 32, 2), dim3(1, 1, 65), dim3(8, 0)}) {
    ral_emu::launch(count_threads, dim3(1), block, 0, &n);
    expect_failure(cudaErrorInvalidConfiguration, {"block"});
  }
  for (dim3 grid : {dim3(0), dim3(1, 0), dim3(1, 1, 0), dim3(1, 65536)}) {
    ral_emu::launch(count_threads, grid, dim3(32), 0, &n);
    expect_failure(cudaErrorInvalidConfiguration, {"grid"});
  }
  CHECK(n == 0);
  CHECK(std::strcmp(cudaGetErrorString(cudaErrorInvalidConfiguration), "invalid configuration argument") == 0);
  CHECK(std::strcmp(cudaGetErrorString(cudaErrorLaunchFailure), "unspecified launch failure") == 0);
  CHECK(std::strcmp(cudaGetErrorString(cudaSuccess), "no error") == 0);

  ral_emu::launch(uses_smem, dim3(1), dim3(32), 48 << 10, &n);  // the default limit
  expect_success();
  ral_emu::launch(uses_smem, dim3(1), dim3(32), (48 << 10) + 1, &n);
  expect_failure(cudaErrorInvalidValue, {"cudaFuncSetAttribute"});
  CHECK(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000) == cudaSuccess);
  ral_emu::launch(uses_smem, dim3(1), dim3(32), 100000, &n);
  expect_success();
  ral_emu::launch(uses_smem, dim3(1), dim3(32), 100001, &n);
  expect_failure(cudaErrorInvalidValue, {"100001"});
  const int arch = ral_emu::set_arch(90);  // H100: 227 KiB
  const void* as_void = reinterpret_cast<const void*>(uses_smem);
  CHECK(cudaFuncSetAttribute(as_void, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 << 10) == cudaSuccess);
  ral_emu::launch(uses_smem, dim3(1), dim3(32), 227 << 10, &n);
  expect_success();
  CHECK(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, (227 << 10) + 1) ==
        cudaErrorInvalidValue);
  expect_failure(cudaErrorInvalidValue, {"cudaFuncSetAttribute"});
  ral_emu::set_arch(arch);
  CHECK(n == 3 * 32);
}

// Each arch's opt-in limit (CUDA C++ Programming Guide, "Technical Specifications per Compute
// Capability"): up to the limit a launch works, one byte more fails, and a kernel opted in on a
// larger arch fails on a smaller one.
void check_arch_limits() {
  const struct {
    int sm, bytes;
  } kLimits[] = {{80, 163 << 10}, {86, 99 << 10}, {87, 163 << 10}, {89, 99 << 10},
                 {90, 227 << 10}, {100, 227 << 10}, {120, 99 << 10}};
  const int previous = ral_emu::arch();
  int n = 0;
  for (const auto& l : kLimits) {
    CHECK(ral_emu::max_dyn_smem_per_block(l.sm) == l.bytes);
    ral_emu::set_arch(l.sm);
    CHECK(ral_emu::arch() == l.sm);
    CHECK(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, l.bytes) == cudaSuccess);
    ral_emu::launch(uses_smem, dim3(1), dim3(32), l.bytes, &n);
    expect_success();
    CHECK(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, l.bytes + 1) ==
          cudaErrorInvalidValue);
    expect_failure(cudaErrorInvalidValue, {("sm_" + std::to_string(l.sm)).c_str(), std::to_string(l.bytes).c_str()});
  }
  ral_emu::set_arch(90);
  CHECK(cudaFuncSetAttribute(uses_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 120 << 10) == cudaSuccess);
  ral_emu::set_arch(86);
  ral_emu::launch(uses_smem, dim3(1), dim3(32), 120 << 10, &n);
  expect_failure(cudaErrorInvalidValue, {"122880 bytes", "exceed sm_86's 101376"});
  CHECK(n == 7 * 32);
  for (int bad : {75, 0, 91}) {
    bool threw = false;
    try {
      ral_emu::set_arch(bad);
    } catch (const std::invalid_argument& e) {
      threw = std::strstr(e.what(), std::to_string(bad).c_str()) != nullptr;
    }
    CHECK(threw && ral_emu::arch() == 86);
  }
  ral_emu::set_arch(previous);
}

// ---- schedules --------------------------------------------------------------------------------

// Sets a schedule for one scope.
struct ScheduleScope {
  std::string previous;
  explicit ScheduleScope(const std::string& spec) : previous(ral_emu::set_schedule(spec)) {}
  ~ScheduleScope() { ral_emu::set_schedule(previous); }
};

__global__ void record_turns(unsigned* log, unsigned* n) {
  ral_emu::preemption_point();
  log[(*n)++] = linear_thread();
  __syncthreads();
}

std::vector<unsigned> turns(const std::string& spec, unsigned threads) {
  const ScheduleScope scope(spec);
  std::vector<unsigned> log(threads, 9999);
  unsigned n = 0;
  ral_emu::launch(record_turns, dim3(1), dim3(threads), 0, log.data(), &n);
  expect_success();
  CHECK(n == threads);
  std::vector<bool> seen(threads, false);
  for (unsigned t : log) {
    CHECK(t < threads && !seen[t]);  // a permutation
    seen[t] = true;
  }
  return log;
}

// A two-stage pipeline as the kernels run it: each step stores the next stage, then, after a
// barrier, reads a neighbour's value of this stage. Without the barrier that ends a step, a fast
// thread overwrites the stage a slow one has yet to read.
__global__ void pipeline(int steps, bool release, int* out) {
  __shared__ int stage[2][64];
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  stage[0][t] = t;
  int acc = 0;
  for (int s = 0; s < steps; ++s) {
    ral_emu::preemption_point();
    stage[(s + 1) & 1][t] = (s + 1) * 1000 + t;
    __syncthreads();
    acc = acc * 31 + stage[s & 1][(t + 37) % n];
    if (release) __syncthreads();
  }
  out[t] = acc;
}

bool pipeline_correct(const std::string& spec, bool release) {
  const ScheduleScope scope(spec);
  std::vector<int> out(64);
  ral_emu::launch(pipeline, dim3(1), dim3(64), 0, 12, release, out.data());
  expect_success();
  for (int t = 0; t < 64; ++t) {
    int want = 0;
    for (int s = 0; s < 12; ++s) want = want * 31 + s * 1000 + (t + 37) % 64;
    if (out[t] != want) return false;
  }
  return true;
}

void check_schedules() {
  CHECK(ral_emu::schedule() == "inorder:seed=0,preempt=0,landing=wait");
  {
    const ScheduleScope scope("random:seed=7,preempt=0.5,landing=random");
    CHECK(ral_emu::schedule() == "random:seed=7,preempt=0.5,landing=random");
  }
  CHECK(ral_emu::schedule() == "inorder:seed=0,preempt=0,landing=wait");
  for (const char* bad : {"sideways", "random:seed=-1", "random:preempt=2", "random:landing=never", "random:speed=3",
                          "reverse:seed"}) {
    bool threw = false;
    try {
      ral_emu::set_schedule(bad);
    } catch (const std::invalid_argument& e) {
      threw = std::strstr(e.what(), bad) != nullptr && std::strstr(e.what(), "expected ORDER") != nullptr;
    }
    CHECK(threw);
  }
  CHECK(ral_emu::schedule() == "inorder:seed=0,preempt=0,landing=wait");

  std::vector<unsigned> in_order(64), reverse(64);
  for (unsigned t = 0; t < 64; ++t) in_order[t] = t, reverse[t] = 63 - t;
  CHECK(turns("", 64) == in_order && turns("inorder:preempt=0", 64) == in_order);
  CHECK(turns("reverse", 64) == reverse);
  const std::vector<unsigned> a = turns("random:seed=1,preempt=1", 64);
  CHECK(a != in_order && a != reverse);
  CHECK(turns("random:seed=1,preempt=1", 64) == a);  // a seed replays
  CHECK(turns("random:seed=2,preempt=1", 64) != a);

  for (const char* spec : {"", "reverse:preempt=0.5", "random:seed=1,preempt=0.3", "random:seed=2,preempt=1"})
    CHECK(pipeline_correct(spec, true));
  bool caught = false;
  for (const char* spec : {"random:seed=1,preempt=0.3", "random:seed=2,preempt=1"})
    caught = caught || !pipeline_correct(spec, false);
  CHECK(caught);
}

// ---- cp.async ---------------------------------------------------------------------------------

bool same(const int4& a, const int4& b) { return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w; }

__global__ void async_copies(const int4* src, int4* seen) {
  int4* sm = reinterpret_cast<int4*>(ral_emu::dynamic_smem());
  if (threadIdx.x != 0) return;
  ral_emu::cp_async_16(&sm[0], &src[0], true);
  ral_emu::cp_async_commit();
  ral_emu::cp_async_16(&sm[1], &src[1], true);
  ral_emu::cp_async_16(&sm[2], &src[2], false);  // zero fill
  ral_emu::cp_async_commit();
  seen[0] = sm[0];
  seen[1] = sm[1];
  ral_emu::cp_async_wait(1);  // the first group has landed
  seen[2] = sm[0];
  seen[3] = sm[1];
  ral_emu::cp_async_wait(0);
  seen[4] = sm[1];
  seen[5] = sm[2];
}

__global__ void async_copy_at(const char* src, int dst_offset, bool valid) {
  ral_emu::cp_async_16(ral_emu::dynamic_smem() + dst_offset, src, valid);
  ral_emu::cp_async_commit();
  ral_emu::cp_async_wait(0);
}

void check_cp_async() {
  const int4 src[3] = {{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}};
  const int4 fill = {-1, -1, -1, -1}, zero = {0, 0, 0, 0};
  for (const char* spec : {"", "random:seed=3,preempt=0.5", "inorder:landing=issue", "random:seed=4,landing=random"}) {
    const ScheduleScope scope(spec);
    int4 seen[6];
    ral_emu::launch(async_copies, dim3(1), dim3(32), 64, src, seen);
    expect_success();
    CHECK(same(seen[2], src[0]) && same(seen[4], src[1]) && same(seen[5], zero));  // after the waits: always
    if (std::strstr(spec, "issue")) {
      CHECK(same(seen[0], src[0]) && same(seen[1], src[1]) && same(seen[3], src[1]));
    } else if (!std::strstr(spec, "random")) {  // the latest legal moment: at the wait
      CHECK(same(seen[0], fill) && same(seen[1], fill) && same(seen[3], fill));
    }
  }
  // Landing at any moment: over a few seeds, both early and late landings occur.
  bool early = false, late = false;
  for (int seed = 0; seed < 16; ++seed) {
    const ScheduleScope scope("random:landing=random,preempt=1,seed=" + std::to_string(seed));
    int4 seen[6];
    ral_emu::launch(async_copies, dim3(1), dim3(32), 64, src, seen);
    expect_success();
    early = early || same(seen[0], src[0]) || same(seen[3], src[1]);
    late = late || same(seen[0], fill) || same(seen[3], fill);
  }
  CHECK(early && late);

  alignas(16) char bytes[48] = {};
  ral_emu::launch(async_copy_at, dim3(1), dim3(1), 64, bytes, 16, true);
  expect_success();
  ral_emu::launch(async_copy_at, dim3(1), dim3(1), 64, bytes, 8, true);
  expect_failure(cudaErrorLaunchFailure, {"cp.async 16-byte copy", "not 16-byte aligned"});
  ral_emu::launch(async_copy_at, dim3(1), dim3(1), 64, bytes + 4, 16, true);
  expect_failure(cudaErrorLaunchFailure, {"cp.async 16-byte copy", "not 16-byte aligned"});
  ral_emu::launch(async_copy_at, dim3(1), dim3(1), 64, bytes + 4, 16, false);
  expect_success();  // a zero fill reads nothing
}

// ---- alignment --------------------------------------------------------------------------------

__global__ void ldmatrix_rows(int offset) {
  std::uint32_t r[4];
  char* sm = ral_emu::dynamic_smem();
  ral_emu::ldmatrix_x4<false>(r, sm + ral_emu::lane_id() * 16 + (ral_emu::lane_id() == 5 ? offset : 0));
}

__global__ void vector_store(int offset) {
  char* sm = ral_emu::dynamic_smem();
  if (threadIdx.x == 3) *reinterpret_cast<uint4*>(sm + 16 + offset) = uint4{1u, 2u, 3u, 4u};
  __syncthreads();
}

__global__ void float_load(int offset, float* out) {
  char* sm = ral_emu::dynamic_smem();
  out[threadIdx.x] = *reinterpret_cast<const float*>(sm + 4 * threadIdx.x + (threadIdx.x == 7 ? offset : 0));
}

void check_alignment() {
  ral_emu::launch(ldmatrix_rows, dim3(1), dim3(32), 1024, 0);
  expect_success();
  ral_emu::launch(ldmatrix_rows, dim3(1), dim3(32), 1024, 8);
  expect_failure(cudaErrorLaunchFailure, {"thread (5,0,0)", "ldmatrix row address", "not 16-byte aligned"});
  ral_emu::launch(vector_store, dim3(2), dim3(64), 64, 0);
  expect_success();
  ral_emu::launch(vector_store, dim3(2), dim3(64), 64, 8);
  expect_failure(cudaErrorLaunchFailure,
                 {"misaligned store to", "uint4", "needs 16-byte alignment", "block (0,0,0) thread (3,0,0)", "emu_checks.cpp"});
  float out[32];
  ral_emu::launch(float_load, dim3(1), dim3(32), 256, 0, out);
  expect_success();
  ral_emu::launch(float_load, dim3(1), dim3(32), 256, 2, out);
  expect_failure(cudaErrorLaunchFailure, {"misaligned load of", "float", "needs 4-byte alignment", "thread (7,0,0)"});
  expect_next_launch_works();
  alignas(16) char host[32] = {};
  volatile int offset = 2;
  float f = *reinterpret_cast<const float*>(host + offset);  // host code is left alone
  CHECK(f == 0.f);
}

// ---- global write ownership -------------------------------------------------------------------

__global__ void write_slot(float* out, int blocks_per_slot) {
  if (threadIdx.x == 0) out[blockIdx.x / blocks_per_slot] = static_cast<float>(blockIdx.x + 1);
}

__global__ void add_atomic(float* out) {
  if (threadIdx.x == 0) atomicAdd(out, 1.0f);
}

__global__ void write_input(const float* in, float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = in[blockIdx.x];
  if (threadIdx.x == 0 && blockIdx.x == 1) const_cast<float*>(in)[3] = 7.f;
}

void check_ownership() {
  std::vector<float> out(4, 0.f), in(8, 1.f);
  {
    const ral_emu::GlobalWatch watch(
        {{"out", out.data(), out.size() * 4, 4, true}, {"in", in.data(), in.size() * 4, 4, false}});
    ral_emu::launch(write_slot, dim3(4), dim3(32), 0, out.data(), 1);  // one block per element
    expect_success();
    std::fill(out.begin(), out.end(), 0.f);
    ral_emu::launch(write_slot, dim3(4), dim3(32), 0, out.data(), 2);  // blocks 0 and 1 write element 0
    expect_failure(cudaErrorLaunchFailure, {"blocks (0,0,0) and (1,0,0) both wrote byte", "of out (element 0)"});
    ral_emu::launch(add_atomic, dim3(4), dim3(32), 0, out.data());
    expect_success();
    ral_emu::launch(write_input, dim3(2), dim3(32), 0, in.data(), out.data());
    expect_failure(cudaErrorLaunchFailure, {"block (1,0,0) wrote byte", "of in (element 3), an input"});
  }
  std::fill(out.begin(), out.end(), 0.f);
  ral_emu::launch(write_slot, dim3(4), dim3(32), 0, out.data(), 2);  // outside a GlobalWatch: unchecked
  expect_success();
  CHECK(out[0] == 2.f && out[1] == 4.f);
}

// ---- types, intrinsics, kernel parameters ----------------------------------------------------

static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8 && sizeof(float2) == 8 && alignof(float2) == 8);
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16 && sizeof(float4) == 16 && alignof(float4) == 16);
static_assert(sizeof(int4) == 16 && alignof(int4) == 16);
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half>);
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);

__device__ __forceinline__ float twice(float x) { return 2.0f * x; }

// Parameters are passed by value: every thread starts from the launch's values.
__global__ void __launch_bounds__(256, 2) by_value(int x, float f, int* out, float* sum) {
  x += threadIdx.x;
  out[threadIdx.x] = x;
  atomicAdd(sum, twice(f));
}

struct __align__(32) Aligned32 { float v; };

__global__ void aligned_shared(int* ok) {
  __shared__ __align__(64) float a[4];
  __align__(128) __shared__ float b[4];
  a[0] = b[0] = 0;
  ok[0] = reinterpret_cast<std::uintptr_t>(a) % 64 == 0 && reinterpret_cast<std::uintptr_t>(b) % 128 == 0;
}

void check_misc() {
  std::vector<int> out(256);
  float sum = 0;
  ral_emu::launch(by_value, dim3(1), dim3(256), 0, 10, 1.25, out.data(), &sum);  // 1.25: double -> float
  expect_success();
  for (int t = 0; t < 256; ++t) CHECK(out[t] == 10 + t);
  CHECK(sum == 256 * 2.5f);

  int ok = 0;
  ral_emu::launch(aligned_shared, dim3(1), dim3(1), 0, &ok);
  expect_success();
  CHECK(ok == 1 && alignof(Aligned32) == 32);

  CHECK(__float_as_uint(1.0f) == 0x3f800000u && __uint_as_float(0xc0000000u) == -2.0f);
  CHECK(__float_as_int(-2.0f) == static_cast<int>(0xc0000000u) && __int_as_float(0x3f800000) == 1.0f);
  CHECK(__expf(0.0f) == 1.0f && __logf(1.0f) == 0.0f && __fdividef(3.0f, 4.0f) == 0.75f);
  CHECK(std::isinf(INFINITY) && fmaxf(1.0f, 2.0f) == 2.0f && fminf(1.0f, 2.0f) == 1.0f);
  CHECK(__float2half_rn(1.0f).__x == 0x3c00 && __half2float(__half{0xc000}) == -2.0f);
  CHECK(__float2bfloat16_rn(1.0f).__x == 0x3f80 && __bfloat162float(__nv_bfloat16{0xc000}) == -2.0f);
  const cudaStream_t stream = nullptr;
  CHECK(stream == nullptr);
}

void check_second_tu() { CHECK(run_in_second_tu() == 32 * 31 / 2); }

// ---- conversions: emu_checks convert IN OUT ------------------------------------------------------
// IN holds float32 values; OUT receives their fp16 bits, their bf16 bits, then the float32 bits of
// every fp16 pattern 0..65535 and of every bf16 pattern.

template <class T>
std::vector<T> read_file(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  CHECK(f != nullptr);
  std::vector<T> data;
  T value;
  while (std::fread(&value, sizeof value, 1, f) == 1) data.push_back(value);
  std::fclose(f);
  return data;
}

template <class T>
void write(std::FILE* f, const std::vector<T>& data) {
  CHECK(std::fwrite(data.data(), sizeof(T), data.size(), f) == data.size());
}

void convert(const char* in_path, const char* out_path) {
  const std::vector<float> values = read_file<float>(in_path);
  std::vector<unsigned short> half(values.size()), bf16(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    half[i] = __float2half_rn(values[i]).__x;
    bf16[i] = __float2bfloat16_rn(values[i]).__x;
  }
  std::vector<std::uint32_t> from_half(65536), from_bf16(65536);
  for (unsigned p = 0; p < 65536; ++p) {
    from_half[p] = __float_as_uint(__half2float(__half{static_cast<unsigned short>(p)}));
    from_bf16[p] = __float_as_uint(__bfloat162float(__nv_bfloat16{static_cast<unsigned short>(p)}));
  }
  std::FILE* out = std::fopen(out_path, "wb");
  CHECK(out != nullptr);
  write(out, half);
  write(out, bf16);
  write(out, from_half);
  write(out, from_bf16);
  CHECK(std::fclose(out) == 0);
}

// ---- switch cost: emu_checks bench ITERS --------------------------------------------------------

__global__ void syncwarp_loop(int iters) {
  for (int i = 0; i < iters; ++i) __syncwarp();
}

void bench(int iters) {
  ral_emu::launch(syncwarp_loop, dim3(1), dim3(128), 0, 1);  // warm up: map the stacks
  const auto start = std::chrono::steady_clock::now();
  ral_emu::launch(syncwarp_loop, dim3(1), dim3(128), 0, iters);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  expect_success();
  std::printf("calls=%d seconds=%.6f ns_per_call=%.2f\n", 128 * iters, seconds, seconds * 1e9 / (128.0 * iters));
}

__global__ void empty_kernel() {}

struct Check {
  const char* name;
  void (*run)();
};

const Check kChecks[] = {
    {"indices", check_indices},
    {"reduce_static", [] { check_reduction(false); }},
    {"reduce_dynamic", [] { check_reduction(true); }},
    {"smem_fill", check_smem_fill},
    {"shuffles", check_shuffles},
    {"allgather", check_allgather},
    {"predicates", check_predicates},
    {"partial_warp", check_partial_warp},
    {"deadlock_exit", check_deadlock_exit},
    {"deadlock_mixed", check_deadlock_mixed},
    {"collective_errors", check_collective_errors},
    {"exception", check_exception},
    {"invalid_config", check_invalid_config},
    {"arch_limits", check_arch_limits},
    {"schedules", check_schedules},
    {"cp_async", check_cp_async},
    {"alignment", check_alignment},
    {"ownership", check_ownership},
    {"misc", check_misc},
    {"second_tu", check_second_tu},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "convert") == 0) {
    convert(argv[2], argv[3]);
    return 0;
  }
  if (argc == 2 && std::strcmp(argv[1], "config") == 0) {  // as RAL_EMU_SCHEDULE / RAL_EMU_ARCH set them
    std::printf("schedule=%s arch=%d\n", ral_emu::schedule().c_str(), ral_emu::arch());
    ral_emu::launch(empty_kernel, dim3(1), dim3(32), 0);
    const cudaError_t e = cudaGetLastError();
    std::printf("launch=%s %s\n", cudaGetErrorString(e), e == cudaSuccess ? "" : ral_emu::last_error_message());
    return 0;
  }
  if (argc == 3 && std::strcmp(argv[1], "bench") == 0) {
    bench(std::atoi(argv[2]));
    return 0;
  }
  for (const Check& check : kChecks) {
    if (argc == 2 && std::strcmp(argv[1], check.name) == 0) {
      check.run();
      return 0;
    }
  }
  std::fprintf(stderr, "usage: emu_checks CHECK | config | convert IN OUT | bench ITERS\n");
  return 2;
}
