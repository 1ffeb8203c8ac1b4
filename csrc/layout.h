// The memory format fastgen's ops keep: channels_last (channels_last_3d for 5-D video tensors) when
// x is (strictly) in it, else contiguous. The kernels see either as (N, C, L) with unit stride
// along C or along L.
// (fastgen/ops/_util.py memory_format is the same rule.)
#pragma once
#include <ATen/ATen.h>

namespace fastgen {

inline at::MemoryFormat channels_last_format(const at::Tensor& x) {
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

inline bool is_channels_last(const at::Tensor& x) {
  return (x.dim() == 4 || x.dim() == 5) && !x.is_contiguous() && x.is_contiguous(channels_last_format(x));
}

inline at::MemoryFormat output_format(const at::Tensor& x) {
  return is_channels_last(x) ? channels_last_format(x) : at::MemoryFormat::Contiguous;
}

// x dense in the format it keeps: itself when channels_last, else a contiguous copy (or itself).
inline at::Tensor dense(const at::Tensor& x) { return is_channels_last(x) ? x : x.contiguous(); }

// An optional 1-D parameter as the kernels read it: contiguous, or undefined when absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace fastgen
