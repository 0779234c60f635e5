"""AdamW with 8-bit optimizer states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Adam keeps two float32 moments per parameter (8 bytes); here each moment is stored as one uint8 code
per value plus one float32 absmax per block of 256 values (~2.03 bytes for both)::

    m, v  = dequantize(codes, absmax)                     (signed map for m, unsigned for v)
    m     = β1 m + (1 - β1) g;   v = β2 v + (1 - β2) g²
    p    -= lr (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + eps) + lr · wd · p
    codes, absmax = quantize(m), quantize(v)              (new absmax per block every step)

Block-wise absmax keeps one outlier from ruining the precision of the whole tensor, and the dynamic
maps give roughly constant relative precision across magnitudes. Tensors with fewer than
``min_8bit_size`` values keep float32 moments (as bitsandbytes does: their saving is negligible and
small tensors such as norms are the most sensitive). Same maps and block size as bitsandbytes, so
the states mean the same thing; the update itself is plain PyTorch and runs on any device.
"""

from __future__ import annotations

import torch

from tuneforge.quant.codebooks import dynamic_map, unsigned_dynamic_map

STATE_BLOCKSIZE = 256


def quantize_state(values: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax + nearest entry of ``table`` (ascending): (uint8 codes, float32 absmax per block)."""
    flat = values.reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % STATE_BLOCKSIZE))
    blocks = padded.view(-1, STATE_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax.clamp(min=1e-38).unsqueeze(1)).reshape(-1)[: flat.numel()]
    above = torch.searchsorted(table, normed).clamp(max=table.numel() - 1)
    below = (above - 1).clamp(min=0)
    pick_below = (normed - table[below]).abs() <= (table[above] - normed).abs()
    codes = torch.where(pick_below, below, above).to(torch.uint8)
    return codes.view(values.shape), absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    flat = table[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(STATE_BLOCKSIZE)[: flat.numel()]
    return (flat * scale).view(codes.shape)


class AdamW8bit(torch.optim.Optimizer):
    """Drop-in ``torch.optim.AdamW`` (decoupled weight decay) with block-wise 8-bit moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, min_8bit_size: int = 4096):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid AdamW8bit settings lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = (dynamic_map().to(device), unsigned_dynamic_map().to(device))
        return self._tables[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        if param.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[param]
        quantized = param.numel() >= self.min_8bit_size
        if not state:
            state["step"] = 0
            if quantized:
                state["m_codes"], state["m_absmax"] = self._zero_codes(param, signed=True)
                state["v_codes"], state["v_absmax"] = self._zero_codes(param, signed=False)
            else:
                state["m"] = torch.zeros_like(param, dtype=torch.float32)
                state["v"] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        grad = param.grad.float()
        signed, unsigned = self._maps(param.device)
        if quantized:
            m = dequantize_state(state["m_codes"], state["m_absmax"], signed)
            v = dequantize_state(state["v_codes"], state["v_absmax"], unsigned)
        else:
            m, v = state["m"], state["v"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        denom = (v / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        update = (m / (1 - beta1 ** step)).div_(denom)
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"])
        if quantized:
            state["m_codes"], state["m_absmax"] = quantize_state(m, signed)
            state["v_codes"], state["v_absmax"] = quantize_state(v, unsigned)

    def _zero_codes(self, param: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._maps(param.device)[0 if signed else 1]
        return quantize_state(torch.zeros_like(param, dtype=torch.float32), table)

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer states (codes, absmax and any float32 moments)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
