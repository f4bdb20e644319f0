"""A lean Llama-family forward pass (Llama, Qwen2, Mistral) over a paged KV cache.

Why our own instead of transformers' modules: at batch 1 a decode step is dominated by per-op
overhead, so we fuse QKV and gate/up into one GEMM each, compute logits only where a token is
sampled, and read/write KV through block tables. Numerics follow HF's eager Llama so greedy
output matches `generate()` token for token.

Token layout of one forward call: all scheduled tokens flattened into one [N] vector, decode
tokens (one per sequence) first, then each prefill chunk contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.models.config import ModelConfig


class PagedKVCache:
    """K and V tensors for every layer, carved into fixed-size blocks. Block ids come from the
    pure block pool (runtime.core.block_pool); this class only owns the storage."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]

    def resize(self, num_blocks: int, moves: list[tuple[int, int]] | None = None) -> None:
        """Apply block moves (old -> new id, from compaction), then reallocate to num_blocks.
        New blocks are zeroed: padded attention reads them, and 0 * garbage could be NaN."""
        for li in range(len(self.k)):
            for old, new in moves or ():
                self.k[li][new] = self.k[li][old]
                self.v[li][new] = self.v[li][old]
            keep = min(num_blocks, self.num_blocks)
            for store in (self.k, self.v):
                cur = store[li]
                grown = torch.zeros((num_blocks, *cur.shape[1:]), dtype=cur.dtype)
                grown[:keep] = cur[:keep]
                store[li] = grown  # the old tensor is freed here: RSS follows the budget
        self.num_blocks = num_blocks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype_bytes: int = 4) -> int:
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype_bytes


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's chunk of new tokens [start, end) in the flat token vector."""

    start: int
    end: int
    block_ids: Tensor  # [num_blocks_needed] long
    context_len: int  # tokens in cache after this chunk (prior + chunk)
    mask: Tensor | None  # [T, context_len] bool, None when there is no prior context


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: Tensor  # [N] long
    positions: Tensor  # [N] long
    slot_mapping: Tensor  # [N] long, flat slot (block * block_size + offset) to write K/V
    num_decode: int  # tokens [0, num_decode) are single-token decode steps
    decode_block_tables: Tensor | None  # [num_decode, max_blocks] long
    decode_mask: Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] bool; None if lengths equal
    decode_context_len: int  # when decode_mask is None: the common context length
    prefills: tuple[PrefillSegment, ...]
    logits_indices: Tensor  # [S] long: rows of the flat vector whose logits are needed


_SPLIT = 2  # output halves computed as a batch-2 bmm: MKL runs each half on its own core
_SMALL_M = 64  # below this many rows a GEMM is memory-bound and single-threaded in MKL


class Linear:
    """y = x W^T (+ b). For few rows, MKL's GEMV uses one core; viewing W as two halves and
    calling bmm puts both cores on the weight read (measured ~1.6x on this machine).
    The view shares W's storage, so no weight is stored twice."""

    __slots__ = ("w", "b", "out", "split")

    def __init__(self, w: Tensor, b: Tensor | None = None):
        self.w = w.contiguous()
        self.b = b
        self.out = w.shape[0]
        self.split = self.w.view(_SPLIT, self.out // _SPLIT, w.shape[1]).transpose(1, 2) if self.out % _SPLIT == 0 else None

    def __call__(self, x: Tensor) -> Tensor:
        m = x.shape[0]
        if self.split is None or m > _SMALL_M:
            return F.linear(x, self.w, self.b)
        y = torch.bmm(x.expand(_SPLIT, m, x.shape[1]), self.split)
        y = y.view(1, self.out) if m == 1 else y.permute(1, 0, 2).reshape(m, self.out)
        return y if self.b is None else y + self.b


_INT8_MM_MAX_M = 16  # rows up to which the int8 kernel beats dequantizing (decode steps)
_QUANT_ROWS = 1024  # rows quantized at a time


class Int8Linear:
    """y = x W^T (+ b) with W stored as int8 and one scale per output row (weight-only, symmetric,
    round to nearest), computed in x's dtype. Few rows (decode) go through torch's int8
    weight-only kernel, which reads a quarter of float32's bytes; more rows (prefill)
    dequantize W for a dense GEMM, where compute, not the weight read, is the cost."""

    __slots__ = ("wq", "scale", "b", "out", "kernel")

    def __init__(self, w: Tensor, b: Tensor | None, dtype: torch.dtype):
        self.wq = torch.empty(w.shape, dtype=torch.int8)
        scale = torch.empty(w.shape[0], dtype=torch.float32)
        # row blocks: the float32 temporaries stay small (a whole tied 49k-row head took ~4 copies)
        for r in range(0, w.shape[0], _QUANT_ROWS):
            wf = w[r:r + _QUANT_ROWS].float()
            s = (wf.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self.wq[r:r + _QUANT_ROWS] = torch.round(wf / s[:, None]).clamp(-127, 127)
            scale[r:r + _QUANT_ROWS] = s
        self.scale = scale.to(dtype)
        self.b = b
        self.out = w.shape[0]
        # The kernel reads K in groups of 16 (other widths crash or give wrong sums in torch 2.13),
        # so it is used only there, and only where it agrees with the dequantized product.
        self.kernel = w.shape[1] % 16 == 0 and self._kernel_agrees(dtype)

    def _kernel_agrees(self, dtype: torch.dtype) -> bool:
        x = torch.randn(2, self.wq.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
        try:
            got = torch._weight_int8pack_mm(x, self.wq, self.scale).float()
        except RuntimeError:
            return False
        want = (x @ self.dense(dtype).T).float()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))

    def dense(self, dtype: torch.dtype) -> Tensor:
        return self.wq.to(dtype) * self.scale[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        if self.kernel and x.shape[0] <= _INT8_MM_MAX_M:
            y = torch._weight_int8pack_mm(x.contiguous(), self.wq, self.scale)
        else:
            y = F.linear(x, self.dense(x.dtype))
        return y if self.b is None else y + self.b


class LlamaModel:
    """Weights as plain tensors (no nn.Module dispatch on the hot path)."""

    def __init__(self, config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype = torch.float32,
                 int8_weights: bool = False):
        """Builds the model from an HF-named state dict, which it consumes: each entry is taken out
        as it is used, so a tensor fused into a new one (q/k/v, gate/up) or quantized is freed
        there, and a load peaks near the model's own size instead of twice it."""
        self.config = config
        self.dtype = dtype  # activations and KV (and weights unless int8); norms, RoPE tables and logits in float32
        self.int8_weights = int8_weights  # the linear layers' weights as int8 (Int8Linear); embeddings stay dtype
        c = config

        def take(name: str) -> Tensor:
            return weights.pop(name).to(dtype)

        def linear(w: Tensor, b: Tensor | None = None) -> Linear | Int8Linear:
            return Int8Linear(w, b, dtype) if int8_weights else Linear(w, b)

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        self.lm_head = linear(self.embed if c.tie_word_embeddings else take("lm_head.weight"))
        self.layers: list[_Layer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv_b = None
            if c.attention_bias:
                qkv_b = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")], 0)
            self.layers.append(_Layer(
                in_norm=take(p + "input_layernorm.weight"),
                qkv=linear(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], 0), qkv_b),
                o=linear(take(p + "self_attn.o_proj.weight")),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=linear(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0)),
                down=linear(take(p + "mlp.down_proj.weight")),
            ))
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        t = torch.arange(c.max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)  # as HF: the tables are cast to the activations' dtype
        self.sin = emb.sin().to(dtype)

    def tensors(self) -> list[Tensor]:
        """Every tensor the model holds, once (a float head tied to the embedding is the embedding)."""
        out = [self.embed, self.norm, self.cos, self.sin]
        for lin in (self.lm_head, *(lin for ly in self.layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down))):
            if isinstance(lin, Int8Linear):
                out += [lin.wq, lin.scale]
            elif lin.w is not self.embed:
                out.append(lin.w)
            if lin.b is not None:
                out.append(lin.b)
        out += [t for ly in self.layers for t in (ly.in_norm, ly.post_norm)]
        return out

    @property
    def nbytes(self) -> int:
        """What the model takes in memory (the host weight cache counts this)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def num_params(self) -> int:
        def size(lin: Linear | Int8Linear) -> int:
            w = lin.wq if isinstance(lin, Int8Linear) else lin.w
            return w.numel() + (lin.b.numel() if lin.b is not None else 0)

        n = self.embed.numel() + self.norm.numel() + (0 if self.config.tie_word_embeddings else size(self.lm_head))
        for ly in self.layers:
            n += ly.in_norm.numel() + ly.post_norm.numel() + sum(map(size, (ly.qkv, ly.o, ly.gate_up, ly.down)))
        return n

    def _rms(self, x: Tensor, w: Tensor) -> Tensor:
        # Same op order as HF's LlamaRMSNorm (in float32, cast back), so results match bit for bit.
        h = x.float()
        var = h.pow(2).mean(-1, keepdim=True)
        return w * (h * torch.rsqrt(var + self.config.rms_norm_eps)).to(x.dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> Tensor:
        """Returns logits [S, vocab] for batch.logits_indices."""
        c = self.config
        n_tok = batch.input_ids.shape[0]
        h_q, h_kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        group = h_q // h_kv
        q_dim, kv_dim = h_q * hd, h_kv * hd
        cos = self.cos[batch.positions].unsqueeze(1)  # [N, 1, hd]
        sin = self.sin[batch.positions].unsqueeze(1)
        half = hd // 2
        nd = batch.num_decode
        bs = cache.block_size
        x = self.embed[batch.input_ids]
        for li, layer in enumerate(self.layers):
            r = self._rms(x, layer.in_norm)
            qkv = layer.qkv(r)
            q = qkv[:, :q_dim].view(n_tok, h_q, hd)
            k = qkv[:, q_dim:q_dim + kv_dim].view(n_tok, h_kv, hd)
            v = qkv[:, q_dim + kv_dim:].view(n_tok, h_kv, hd)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            kc, vc = cache.k[li], cache.v[li]
            kc.view(-1, h_kv, hd).index_copy_(0, batch.slot_mapping, k)
            vc.view(-1, h_kv, hd).index_copy_(0, batch.slot_mapping, v)
            attn = torch.empty(n_tok, h_q, hd, dtype=x.dtype)
            if nd:
                bt = batch.decode_block_tables
                assert bt is not None
                ctx = bt.shape[1] * bs
                kk = kc.index_select(0, bt.reshape(-1)).view(nd, ctx, h_kv, hd)
                vv = vc.index_select(0, bt.reshape(-1)).view(nd, ctx, h_kv, hd)
                if batch.decode_mask is None:  # equal lengths: cut the tail instead of masking
                    kk, vv = kk[:, : batch.decode_context_len], vv[:, : batch.decode_context_len]
                qd = q[:nd].view(nd, h_kv, group, hd)
                od = F.scaled_dot_product_attention(
                    qd, kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=batch.decode_mask
                )
                attn[:nd] = od.reshape(nd, h_q, hd)
            for seg in batch.prefills:
                qs = q[seg.start:seg.end].transpose(0, 1).unsqueeze(0)  # [1, H, T, hd]
                if seg.mask is None:  # fresh prompt: keys are exactly this chunk
                    kk = k[seg.start:seg.end].transpose(0, 1).unsqueeze(0)
                    vv = v[seg.start:seg.end].transpose(0, 1).unsqueeze(0)
                    os_ = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=True)
                else:
                    nb = seg.block_ids.shape[0]
                    kk = kc.index_select(0, seg.block_ids).view(nb * bs, h_kv, hd)[: seg.context_len]
                    vv = vc.index_select(0, seg.block_ids).view(nb * bs, h_kv, hd)[: seg.context_len]
                    os_ = F.scaled_dot_product_attention(
                        qs, kk.transpose(0, 1).unsqueeze(0), vv.transpose(0, 1).unsqueeze(0),
                        attn_mask=seg.mask, enable_gqa=True,
                    )
                attn[seg.start:seg.end] = os_[0].transpose(0, 1)
            x = x + layer.o(attn.view(n_tok, q_dim))
            r = self._rms(x, layer.post_norm)
            gu = layer.gate_up(r)
            inter = c.intermediate_size
            x = x + layer.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        x = x[batch.logits_indices]
        x = self._rms(x, self.norm)
        return self.lm_head(x).float()


@dataclass(frozen=True)
class _Layer:
    in_norm: Tensor
    qkv: Linear | Int8Linear
    o: Linear | Int8Linear
    post_norm: Tensor
    gate_up: Linear | Int8Linear
    down: Linear | Int8Linear


def prefix_mask(prior: int, t: int) -> Tensor:
    """Mask for a chunk of t new tokens after `prior` cached ones: row i sees keys <= prior+i."""
    keys = torch.arange(prior + t)
    rows = prior + torch.arange(t)
    return keys[None, :] <= rows[:, None]
