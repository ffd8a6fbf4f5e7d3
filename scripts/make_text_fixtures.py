"""Build the text-encoder and tokenizer fixtures for tests/clip_parity.rs and tests/tokenizer.rs.

Run from the repository root:

    scripts/.venv/bin/python scripts/make_text_fixtures.py

It needs no network: the tiny CLIP BPE vocabularies are written here (every byte, as CLIP has,
plus merges for a few words), and the models get random weights from fixed seeds. Output goes to
tests/fixtures/text/ (well under 1.5 MB):

    clip_l/      SD 1.x-like: CLIPTextModel, quick_gelu, legacy eos_token_id=2, pads with EOS.
                 tokenizer/ as the original SD repositories ship it (vocab.json + merges.txt +
                 tokenizer_config.json + special_tokens_map.json, no tokenizer.json); weights
                 under `text_model.` as in diffusers checkpoints.
    openclip_h/  SD 2.x-like: CLIPTextModel, gelu, pads with "!" (id 0); saved by transformers 5
                 (tokenizer.json; weights without the `text_model.` prefix).
    sdxl/        text_encoder (CLIPTextModel, quick_gelu) + text_encoder_2
                 (CLIPTextModelWithProjection, gelu, pads with "!"), both with the current
                 eos_token_id convention, and their tokenizers.
    wordlevel/   a word-level tokenizer.json (lowercase, whitespace/punctuation split, <unk>).

Each model directory holds expected.safetensors: the recorded token ids (prompts as diffusers
tokenizes them, and AUTOMATIC1111-style chunks for a prompt longer than 77 tokens) and the
encoder outputs for them: last_hidden_state, pooled, text_embeds, every hidden state, the
context SD pipelines use (diffusers' own encode_prompt where it runs) and the chunked context.
"""

import json
import os
import shutil
import sys
import types

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "text")

# Batch of 2 prompts for the parity outputs; the long one exceeds 75 tokens.
PROMPTS = [
    "anime girl, red hair, blue eyes",
    "a photo of an astronaut riding a horse on mars!! highly detailed 4k",
]
LONG_PROMPT = ", ".join(
    ["masterpiece", "best quality", "anime girl with long red hair", "blue eyes", "smiling"] * 4
)
NEGATIVE = "lowres, bad anatomy"
# Extra prompts for the tokenizer test only.
TOKENIZER_PROMPTS = PROMPTS + [
    "",
    "  Anime   GIRL\tRED!!hair  ",
    "it's a cat's toy, don't stop — café naïve 日本 12345",
    "<|endoftext|> typed literally <|startoftext|>",
    LONG_PROMPT,
]

# Words that get merges, so the BPE is exercised beyond single characters.
MERGE_WORDS = ["anime", "girl", "red", "hair", "blue", "eyes", "photo", "horse", "masterpiece",
               "quality", "the", "a", "of", "with", "long"]


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_vocab(dir_):
    """CLIP's layout: byte chars, the same with </w>, merged tokens, then <|startoftext|>,
    <|endoftext|> (so EOS is the largest id, which the legacy pooling relies on). To stay small
    only the printable ASCII bytes are in (real CLIP has all 256), so non-ASCII text exercises
    the unknown token."""
    chars = [c for b, c in bytes_to_unicode().items() if 33 <= b <= 126]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in MERGE_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            if (a, b) not in merges:
                merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
            parts = [a + b] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(dir_, exist_ok=True)
    with open(os.path.join(dir_, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dir_, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def make_clip_tokenizer(dir_, pad_token, legacy_files):
    """A CLIP tokenizer in `dir_`; returns it loaded back the way diffusers loads it."""
    tmp = dir_ + ".src"
    vocab = write_clip_vocab(tmp)
    if legacy_files:
        # The original SD repositories: vocab/merges and configs with AddedToken dicts.
        os.makedirs(dir_, exist_ok=True)
        for name in ["vocab.json", "merges.txt"]:
            shutil.copy(os.path.join(tmp, name), os.path.join(dir_, name))
        tok = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
                         "rstrip": False, "single_word": False}
        with open(os.path.join(dir_, "tokenizer_config.json"), "w") as f:
            json.dump({"add_prefix_space": False, "bos_token": tok("<|startoftext|>"),
                       "do_lower_case": True, "eos_token": tok("<|endoftext|>"), "errors": "replace",
                       "model_max_length": 77, "pad_token": pad_token,
                       "tokenizer_class": "CLIPTokenizer", "unk_token": tok("<|endoftext|>")}, f, indent=2)
        with open(os.path.join(dir_, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"),
                       "pad_token": pad_token, "unk_token": tok("<|endoftext|>")}, f, indent=2)
    else:
        t = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"),
                          pad_token=pad_token, model_max_length=77)
        t.save_pretrained(dir_)
    shutil.rmtree(tmp)
    return CLIPTokenizer.from_pretrained(dir_), len(vocab)


def randomize(model, seed):
    """Weights of a realistic scale (LayerNorms not at 1/0) so every op shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make_encoder(dir_, cls, seed, with_prefix, **cfg):
    torch.manual_seed(seed)
    config = CLIPTextConfig(max_position_embeddings=77, **cfg)
    model = cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(dir_)
    path = os.path.join(dir_, "model.safetensors")
    if with_prefix and cls is CLIPTextModel:
        # diffusers checkpoints keep CLIPTextModel weights under `text_model.`; transformers 5
        # loads both layouts. (CLIPTextModelWithProjection already saves them so.)
        from safetensors.torch import load_file
        sd = load_file(path)
        sd = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous() for k, v in sd.items()}
        save_file(sd, path)
    reloaded = cls.from_pretrained(dir_).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), f"{dir_}: {n1} did not round-trip"
    return reloaded


def diffusers_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def a1111_chunks(tokenizer, prompt):
    """AUTOMATIC1111-style: 75-token chunks, each [BOS] chunk [EOS] padded to 77 with the pad
    token; an empty prompt is one chunk. (Plain cut every 75 tokens, no comma backtracking.)"""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    per = tokenizer.model_max_length - 2
    pieces = [ids[i:i + per] for i in range(0, len(ids), per)] or [[]]
    return [[tokenizer.bos_token_id] + p + [tokenizer.eos_token_id]
            + [tokenizer.pad_token_id] * (per - len(p)) for p in pieces]


def chunked_batch(tokenizer, prompts):
    chunks = [a1111_chunks(tokenizer, p) for p in prompts]
    n = max(len(c) for c in chunks)
    empty = a1111_chunks(tokenizer, "")[0]
    chunks = [c + [empty] * (n - len(c)) for c in chunks]
    return torch.tensor(chunks)  # (B, n, 77)


def tokenizer_record(tokenizer, prefix):
    out = {}
    for i, p in enumerate(TOKENIZER_PROMPTS):
        out[f"{prefix}prompt{i}.ids"] = diffusers_ids(tokenizer, [p])[0].to(torch.int64)
        out[f"{prefix}prompt{i}.chunks"] = torch.tensor(a1111_chunks(tokenizer, p), dtype=torch.int64)
    return out


def run_encoder(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


def sd_encode_prompt(tokenizer, text_encoder, prompt, negative):
    """diffusers' own StableDiffusionPipeline.encode_prompt on a stand-in `self`."""
    from diffusers import StableDiffusionPipeline
    stub = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, unet=None)
    with torch.no_grad():
        pos, neg = StableDiffusionPipeline.encode_prompt(
            stub, prompt, torch.device("cpu"), 1, True, negative_prompt=negative)
    return pos, neg


def sdxl_encode_prompt(tok1, te1, tok2, te2, prompt, negative):
    """diffusers' own StableDiffusionXLPipeline.encode_prompt on a stand-in `self`."""
    from diffusers import StableDiffusionXLPipeline
    stub = types.SimpleNamespace(tokenizer=tok1, text_encoder=te1, tokenizer_2=tok2, text_encoder_2=te2,
                                 unet=None, config=types.SimpleNamespace(force_zeros_for_empty_prompt=True))
    with torch.no_grad():
        return StableDiffusionXLPipeline.encode_prompt(
            stub, prompt, device=torch.device("cpu"), num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative)


def encoder_record(model, tokenizer, prefix, context_layer, full):
    """Outputs for PROMPTS (diffusers' ids) and for [LONG_PROMPT, PROMPTS[0]] chunked.
    context_layer: "final" (SD 1.x/2.x) or "penultimate" (SDXL). `full` adds last_hidden_state
    and the chunked outputs (left out for SDXL's first encoder to keep the fixtures small)."""
    out = {}
    ids = diffusers_ids(tokenizer, PROMPTS)
    res = run_encoder(model, ids)
    out[prefix + "ids"] = ids.to(torch.int64)
    if full:
        out[prefix + "last_hidden_state"] = res.last_hidden_state
    if isinstance(model, CLIPTextModelWithProjection):
        out[prefix + "text_embeds"] = res.text_embeds
        # transformers 5 returns no pooler_output here; recompute it from the inner model.
        with torch.no_grad():
            out[prefix + "pooled"] = model.text_model(ids).pooler_output
    else:
        out[prefix + "pooled"] = res.pooler_output
    inner = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
    with torch.no_grad():
        if context_layer == "final":
            # diffusers SD: clip_skip=k -> final_layer_norm(hidden_states[-(k+1)]).
            out[prefix + "context_clip_skip1"] = inner.final_layer_norm(res.hidden_states[-2])
        else:
            # diffusers SDXL: clip_skip=k -> hidden_states[-(k+2)], no final norm.
            out[prefix + "context_clip_skip1"] = res.hidden_states[-3]
    out[prefix + "hidden_states.0"] = res.hidden_states[0]
    if not full:
        return out
    # A1111-style chunked batch: (B, n*77, D), pooled from the first chunk.
    chunks = chunked_batch(tokenizer, [LONG_PROMPT, PROMPTS[0]])
    assert chunks.shape[1] == 2
    b, n, l = chunks.shape
    res = run_encoder(model, chunks.reshape(b * n, l))
    ctx = res.last_hidden_state if context_layer == "final" else res.hidden_states[-2]
    out[prefix + "chunked.ids"] = chunks.to(torch.int64)
    out[prefix + "chunked.context"] = ctx.reshape(b, n * l, -1)
    pooled = res.text_embeds if isinstance(model, CLIPTextModelWithProjection) else res.pooler_output
    out[prefix + "chunked.pooled"] = pooled.reshape(b, n, -1)[:, 0]
    return out


def save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def make_sd(name, pad_token, legacy_tokenizer, seed, act, with_prefix):
    base = os.path.join(ROOT, name)
    tokenizer, vocab_size = make_clip_tokenizer(os.path.join(base, "tokenizer"), pad_token, legacy_tokenizer)
    model = make_encoder(os.path.join(base, "text_encoder"), CLIPTextModel, seed, with_prefix,
                         vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act=act, projection_dim=32,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    rec = encoder_record(model, tokenizer, "", "final", full=True)
    rec.update(tokenizer_record(tokenizer, "tok."))
    pos, neg = sd_encode_prompt(tokenizer, model, PROMPTS, [NEGATIVE, ""])
    # diffusers' prompt embeds are last_hidden_state: checked here, stored once.
    assert torch.equal(pos, rec["last_hidden_state"])
    rec["diffusers.negative_prompt_embeds"] = neg
    rec["diffusers.negative_ids"] = diffusers_ids(tokenizer, [NEGATIVE, ""]).to(torch.int64)
    save(rec, os.path.join(base, "expected.safetensors"))


def make_sdxl(seed):
    base = os.path.join(ROOT, "sdxl")
    tok1, v1 = make_clip_tokenizer(os.path.join(base, "tokenizer"), "<|endoftext|>", False)
    tok2, v2 = make_clip_tokenizer(os.path.join(base, "tokenizer_2"), "!", False)
    te1 = make_encoder(os.path.join(base, "text_encoder"), CLIPTextModel, seed, True,
                       vocab_size=v1, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32,
                       bos_token_id=v1 - 2, eos_token_id=v1 - 1, pad_token_id=1)
    te2 = make_encoder(os.path.join(base, "text_encoder_2"), CLIPTextModelWithProjection, seed + 1, True,
                       vocab_size=v2, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, hidden_act="gelu", projection_dim=16,
                       bos_token_id=v2 - 2, eos_token_id=v2 - 1, pad_token_id=1)
    rec = {}
    rec.update(encoder_record(te1, tok1, "te1.", "penultimate", full=False))
    rec.update(encoder_record(te2, tok2, "te2.", "penultimate", full=True))
    rec.update(tokenizer_record(tok2, "tok2."))
    pe, npe, ppe, nppe = sdxl_encode_prompt(tok1, te1, tok2, te2, PROMPTS, [NEGATIVE, ""])
    rec["diffusers.prompt_embeds"] = pe
    rec["diffusers.negative_prompt_embeds"] = npe
    rec["diffusers.pooled_prompt_embeds"] = ppe
    rec["diffusers.negative_pooled_prompt_embeds"] = nppe
    rec["diffusers.negative_ids"] = diffusers_ids(tok1, [NEGATIVE, ""]).to(torch.int64)
    rec["diffusers.negative_ids_2"] = diffusers_ids(tok2, [NEGATIVE, ""]).to(torch.int64)
    save(rec, os.path.join(base, "expected.safetensors"))


WORDS = ["a", "an", "the", "girl", "boy", "red", "blue", "green", "hair", "eyes", "long", "short",
         "smiling", "anime", "with", "and", ",", "."]
WORD_PROMPTS = [
    "anime girl, red hair",
    "A Girl with LONG blue hair, smiling.",
    "anime boy, purple hair and golden eyes!",
    "",
    "girl " * 80,
]


def make_wordlevel():
    dir_ = os.path.join(ROOT, "wordlevel", "tokenizer")
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=77)
    fast.save_pretrained(dir_)
    loaded = AutoTokenizer.from_pretrained(dir_)
    rec = {}
    for i, p in enumerate(WORD_PROMPTS):
        rec[f"prompt{i}.ids"] = diffusers_ids(loaded, [p])[0].to(torch.int64)
        rec[f"prompt{i}.chunks"] = torch.tensor(a1111_chunks(loaded, p), dtype=torch.int64)
    save(rec, os.path.join(ROOT, "wordlevel", "expected.safetensors"))
    with open(os.path.join(ROOT, "wordlevel", "prompts.json"), "w") as f:
        json.dump(WORD_PROMPTS, f, indent=1)


def main():
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    torch.use_deterministic_algorithms(True)
    make_sd("clip_l", "<|endoftext|>", legacy_tokenizer=True, seed=1, act="quick_gelu", with_prefix=True)
    make_sd("openclip_h", "!", legacy_tokenizer=False, seed=2, act="gelu", with_prefix=False)
    make_sdxl(seed=3)
    make_wordlevel()
    with open(os.path.join(ROOT, "prompts.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "long_prompt": LONG_PROMPT, "negative": NEGATIVE,
                   "tokenizer_prompts": TOKENIZER_PROMPTS}, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
