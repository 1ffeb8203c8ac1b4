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

}  // namespace fastgen
