// Element-index arithmetic in the CUDA kernels. On the GPU a 64-bit division or remainder is a called
// routine of about 70 instructions, a 32-bit one about 20: every kernel that divides an element index
// per element carries `small` in its parameters (set on the host: every index and size it divides is
// below 2^31, i.e. its tensors have fewer than 2^31 elements) and divides through these, in 32 bits
// then. Operands are non-negative.
#pragma once
#include <cstdint>

namespace fastgen {

constexpr int64_t kIndex32 = int64_t(1) << 31;

// true when every element index of tensors of these sizes fits in 31 bits
inline bool small_indices(int64_t numel_a, int64_t numel_b = 0) { return numel_a < kIndex32 && numel_b < kIndex32; }

__device__ __forceinline__ int64_t idiv(int64_t a, int64_t b, bool small) {
  return small ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}

__device__ __forceinline__ int64_t imod(int64_t a, int64_t b, bool small) {
  return small ? int64_t(uint32_t(a) % uint32_t(b)) : a % b;
}

}  // namespace fastgen
