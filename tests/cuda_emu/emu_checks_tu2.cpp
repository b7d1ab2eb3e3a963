// A second translation unit that includes cuda_emu.h, linked into emu_checks: the header's
// context-switch routine and globals must exist once per program however many files include it.
#include "cuda_emu.h"

namespace {

__global__ void warp_sum(int* out) {
  int v = threadIdx.x;
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  __syncthreads();
  if (threadIdx.x == 0) *out = v;
}

}  // namespace

int run_in_second_tu() {
  int out = -1;
  ral_emu::launch(warp_sum, dim3(1), dim3(32), 0, &out);
  return cudaGetLastError() == cudaSuccess ? out : -1;
}
