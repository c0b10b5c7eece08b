// The float types llmcli's kernels take. torch's AT_DISPATCH_FLOATING_TYPES_AND2 also instantiates every kernel
// for double, which no model runs in: that copy cost about a quarter of each build's compile time.
#pragma once
#include <ATen/Dispatch.h>

#define LLMCLI_DISPATCH_FLOATS(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
