// The memory format fastgen's ops keep: channels_last when x is (strictly) in it, else contiguous.
// (fastgen/ops/_util.py memory_format is the same rule.)
#pragma once
#include <ATen/ATen.h>

namespace fastgen {

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat output_format(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x dense in the format it keeps: itself when channels_last, else a contiguous copy (or itself).
inline at::Tensor dense(const at::Tensor& x) { return is_channels_last(x) ? x : x.contiguous(); }

// An optional 1-D parameter as the kernels read it: contiguous, or undefined when absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace fastgen
