// One-hot check of the tensor-core building blocks of csrc/kernel_utils.cuh -- mma_16816 (fp16
// and bf16) and ldmatrix_x4 (plain and .trans) -- against the fragment layouts as the PTX ISA
// states them ("Matrix Fragments for mma.m16n8k16 with floating point type"; ldmatrix: lanes
// 8i..8i+7 address the rows of matrix i, each lane receives two adjacent elements of row
// lane / 4, or of column lane / 4 with .trans). The expected registers are computed here from
// those tables on the host, independently of the emulator's own code.
//
// The same file builds two ways:
//   nvcc -std=c++17 -arch=sm_90 -I csrc tests/cuda_emu/layout_check.cu   (the GPU itself)
//   g++ -std=c++17 -x c++ -DRAL_CPU_EMULATION -I csrc -I csrc/emu ...     (the CPU emulator)
// It prints one line per check and "mismatches=N"; it exits 1 when N > 0 (or on a CUDA error).
//
// Why a direct test: an error shared by both operands of every S = Q K^T -- say, the two halves of
// every non-.trans ldmatrix register swapped -- permutes k the same way on both sides, so every
// sum keeps its terms and end-to-end results change only by the rounding of the new summation
// order (measured: at most 2.4e-4 absolute, 92% of the outputs bit-identical), well within any
// tolerance of the tests.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernel_utils.cuh"

namespace {

// ------------------------------------------------------------------ the PTX tables

int group_of(int lane) { return lane >> 2; }
int thread_in_group(int lane) { return lane % 4; }

// Element a_i (i = 0..7; register i / 2, low half when i is even) of lane `lane`: row and column
// of the 16x16 A operand.
int a_row(int lane, int i) { return (i < 2 || (i >= 4 && i < 6)) ? group_of(lane) : group_of(lane) + 8; }
int a_col(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
// Element b_i (i = 0..3) of the 16x8 B operand (rows = k).
int b_row(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
int b_col(int lane, int /*i*/) { return group_of(lane); }
// Element c_i (i = 0..3, one fp32 register each) of the 16x8 accumulator C / D.
int c_row(int lane, int i) { return i < 2 ? group_of(lane) : group_of(lane) + 8; }
int c_col(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1); }

// ------------------------------------------------------------------ host <-> device

#ifdef RAL_CPU_EMULATION
template <class T> T* device_alloc(std::size_t n) { return new T[n]; }
template <class T> void device_free(T* p) { delete[] p; }
void to_device(void* dst, const void* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
void to_host(void* dst, const void* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
void finish(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  std::printf("error: %s: %s\n", what, ral_emu::last_error_message());
  std::exit(1);
}
#else
void finish(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess) return;
  std::printf("error: %s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}
template <class T> T* device_alloc(std::size_t n) {
  void* p = nullptr;
  if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) finish("cudaMalloc");
  return static_cast<T*>(p);
}
template <class T> void device_free(T* p) { cudaFree(p); }
void to_device(void* dst, const void* src, std::size_t bytes) { cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice); }
void to_host(void* dst, const void* src, std::size_t bytes) { cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost); }
#endif

std::uint16_t to_bits(float x, bool bf16) {
  std::uint16_t b;
  if (bf16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(&b, &h, 2);
  } else {
    const __half h = __float2half_rn(x);
    std::memcpy(&b, &h, 2);
  }
  return b;
}

// ------------------------------------------------------------------ mma_16816

// One warp per block, one case per block: the lanes' A, B and C registers in, D registers out.
template <typename T>
__global__ void mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x, cs = blockIdx.x;
  const uint32_t ra[4] = {a[(cs * 32 + lane) * 4], a[(cs * 32 + lane) * 4 + 1], a[(cs * 32 + lane) * 4 + 2],
                          a[(cs * 32 + lane) * 4 + 3]};
  const uint32_t rb[2] = {b[(cs * 32 + lane) * 2], b[(cs * 32 + lane) * 2 + 1]};
  float acc[4];
  for (int e = 0; e < 4; ++e) acc[e] = c[(cs * 32 + lane) * 4 + e];
  ral::mma_16816<T>(acc, ra, rb);
  for (int e = 0; e < 4; ++e) d[(cs * 32 + lane) * 4 + e] = acc[e];
}

struct MmaCase {
  float A[16][16], B[16][8], C[16][8];
};

// Cases: A one-hot at every (m, k) against a B of distinct values; B one-hot at every (k, n)
// against a distinct A; and A = B = 0 with a distinct C (the accumulator's layout). All values
// are small integers, exact in fp16 and bf16, so D = C + A B is compared exactly.
std::vector<MmaCase> mma_cases() {
  std::vector<MmaCase> cases;
  MmaCase distinct{};
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) distinct.A[m][k] = float(1 + m * 16 + k);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) distinct.B[k][n] = float(1 + k * 8 + n);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) distinct.C[m][n] = float(1000 + m * 8 + n);
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) {
      MmaCase x{};
      x.A[m][k] = 1.f;
      std::memcpy(x.B, distinct.B, sizeof x.B);
      cases.push_back(x);
    }
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) {
      MmaCase x{};
      std::memcpy(x.A, distinct.A, sizeof x.A);
      x.B[k][n] = 1.f;
      cases.push_back(x);
    }
  MmaCase acc{};
  std::memcpy(acc.C, distinct.C, sizeof acc.C);
  cases.push_back(acc);
  return cases;
}

template <typename T>
long check_mma(const char* name, bool bf16) {
  const std::vector<MmaCase> cases = mma_cases();
  const int n = static_cast<int>(cases.size());
  std::vector<uint32_t> a(std::size_t(n) * 32 * 4), b(std::size_t(n) * 32 * 2);
  std::vector<float> c(std::size_t(n) * 32 * 4), d(c.size());
  for (int cs = 0; cs < n; ++cs)
    for (int lane = 0; lane < 32; ++lane) {
      const MmaCase& x = cases[cs];
      for (int i = 0; i < 8; ++i)  // a_i: register i / 2, half i % 2
        a[(cs * 32 + lane) * 4 + i / 2] |= uint32_t(to_bits(x.A[a_row(lane, i)][a_col(lane, i)], bf16)) << (16 * (i % 2));
      for (int i = 0; i < 4; ++i)
        b[(cs * 32 + lane) * 2 + i / 2] |= uint32_t(to_bits(x.B[b_row(lane, i)][b_col(lane, i)], bf16)) << (16 * (i % 2));
      for (int i = 0; i < 4; ++i) c[(cs * 32 + lane) * 4 + i] = x.C[c_row(lane, i)][c_col(lane, i)];
    }
  uint32_t* da = device_alloc<uint32_t>(a.size());
  uint32_t* db = device_alloc<uint32_t>(b.size());
  float* dc = device_alloc<float>(c.size());
  float* dd = device_alloc<float>(d.size());
  to_device(da, a.data(), a.size() * 4);
  to_device(db, b.data(), b.size() * 4);
  to_device(dc, c.data(), c.size() * 4);
  RAL_LAUNCH(mma_probe<T>, dim3(n), dim3(32), 0, nullptr, da, db, dc, dd);
  finish(name);
  to_host(d.data(), dd, d.size() * 4);
  long bad = 0;
  for (int cs = 0; cs < n; ++cs)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const MmaCase& x = cases[cs];
        const int row = c_row(lane, i), col = c_col(lane, i);
        float want = x.C[row][col];
        for (int k = 0; k < 16; ++k) want += x.A[row][k] * x.B[k][col];
        const float got = d[(cs * 32 + lane) * 4 + i];
        if (got != want && bad++ < 5)
          std::printf("  %s case %d lane %d d%d: got %g, want %g (D[%d][%d])\n", name, cs, lane, i, got, want, row, col);
      }
  std::printf("%s: %ld mismatches in %d cases x 32 lanes x 4 registers\n", name, bad, n);
  device_free(da);
  device_free(db);
  device_free(dc);
  device_free(dd);
  return bad;
}

// ------------------------------------------------------------------ ldmatrix_x4

constexpr int kStride = 24;  // halves per shared row: 48 bytes, 16-byte aligned, rows not adjacent

// Matrix i's row r is shared row perm(8 i + r): scattered, so that only the lanes' addresses say
// where each row is.
__host__ __device__ int perm(int row) { return (row * 13 + 5) % 32; }
uint16_t value(int matrix, int row, int col) { return static_cast<uint16_t>(1 + matrix * 64 + row * 8 + col); }

template <bool TRANS>
__global__ void ldmatrix_probe(const uint16_t* tile, uint32_t* regs) {
  RAL_DYN_SMEM(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < 32 * kStride; i += 32) s[i] = tile[i];
  __syncthreads();
  const int lane = threadIdx.x;
  uint32_t r[4];
  ral::ldmatrix_x4<TRANS>(r, s + perm(lane) * kStride);  // lane 8 i + j: row j of matrix i
  for (int i = 0; i < 4; ++i) regs[lane * 4 + i] = r[i];
}

template <bool TRANS>
long check_ldmatrix(const char* name) {
  std::vector<uint16_t> tile(32 * kStride, 0xdead);
  for (int m = 0; m < 4; ++m)
    for (int r = 0; r < 8; ++r)
      for (int col = 0; col < 8; ++col) tile[perm(8 * m + r) * kStride + col] = value(m, r, col);
  uint16_t* dtile = device_alloc<uint16_t>(tile.size());
  uint32_t* dregs = device_alloc<uint32_t>(32 * 4);
  to_device(dtile, tile.data(), tile.size() * 2);
  RAL_LAUNCH(ldmatrix_probe<TRANS>, dim3(1), dim3(32), 32 * kStride * 2, nullptr, dtile, dregs);
  finish(name);
  std::vector<uint32_t> regs(32 * 4);
  to_host(regs.data(), dregs, regs.size() * 4);
  long bad = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      // Element i (i = 0, 1: low, high half) of row lane / 4, columns 2 (lane % 4) + i -- of
      // the stored matrix, or of its transpose.
      uint32_t want = 0;
      for (int i = 0; i < 2; ++i) {
        const int r = group_of(lane), col = 2 * thread_in_group(lane) + i;
        want |= uint32_t(TRANS ? value(m, col, r) : value(m, r, col)) << (16 * i);
      }
      if (regs[lane * 4 + m] != want && bad++ < 5)
        std::printf("  %s lane %d matrix %d: got 0x%08x, want 0x%08x\n", name, lane, m, regs[lane * 4 + m], want);
    }
  std::printf("%s: %ld mismatches in 32 lanes x 4 matrices\n", name, bad);
  device_free(dtile);
  device_free(dregs);
  return bad;
}

}  // namespace

int main() {
  long bad = 0;
  bad += check_mma<__half>("mma_16816 fp16", false);
  bad += check_mma<__nv_bfloat16>("mma_16816 bf16", true);
  bad += check_ldmatrix<false>("ldmatrix_x4");
  bad += check_ldmatrix<true>("ldmatrix_x4.trans");
  std::printf("mismatches=%ld\n", bad);
  return bad == 0 ? 0 : 1;
}
