"""A Gated DeltaNet layer's decode step on CPU as one op between its input and output products
(`kernels/deltanet_step.cpp`): the conv step, the gated delta rule and the gated RMSNorm, where the module runs
about 40 small torch ops and passes over its float32 state five times. The same roundings to the model dtype;
float32 sums in another order (tests/test_deltanet_op.py bounds the difference)."""

from __future__ import annotations

import torch

from llmcli.models.deltanet import L2_EPS, GatedDeltaNet


class FusedGatedDeltaNet(GatedDeltaNet):
    def forward(self, x: torch.Tensor, layer_cache, index: int = 0, recorder=None) -> torch.Tensor:
        if recorder is not None or not self._fits(x, layer_cache):  # a recorder reads the rule's inner values
            return super().forward(x, layer_cache, index, recorder)
        batch = x.shape[0]
        mixed, z, b, a = self._project(x)
        out = torch.ops.llmcli.deltanet_step(
            mixed.reshape(batch, -1).contiguous(), z.reshape(batch, -1).contiguous(), b.reshape(batch, -1).contiguous(),
            a.reshape(batch, -1).contiguous(), self.conv1d.weight[:, 0], layer_cache.conv, layer_cache.state,
            self.A_log, self.dt_bias, self.norm.weight, self.norm.eps, L2_EPS, self.nk, self.dk, self.dv)
        return self.out_proj(out.reshape(batch, 1, -1))

    def _fits(self, x: torch.Tensor, layer_cache) -> bool:
        """One new token per sequence, eager on CPU, the conv's weight and state in the rows' dtype."""
        return (x.shape[1] == 1 and self.form != "chunked" and x.device.type == "cpu"
                and not torch.compiler.is_compiling() and self.conv1d.weight.dtype == x.dtype
                and layer_cache.conv.dtype == x.dtype and layer_cache.conv.is_contiguous()
                and layer_cache.state.is_contiguous())
