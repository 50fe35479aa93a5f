"""Tiny CLIP models and tokenizer files of other libraries, written by the tests (nothing is downloaded).

The reference is always `transformers.CLIPModel` with random weights; the OpenAI / open_clip state dicts are
written from it here, by the key layout of openai/CLIP's model.py, independently of vitx's own conversion.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import torch

from data_pipelines.bpe import bytes_to_unicode, openai_vocab

CORPUS = [
    "a photo of a dog.", "a photo of the cat", "the dog's photo", "two cats and a dog, photographed",
    "a red circle", "a blue square", "a photo of a red square", "itap of a blue circle",
]
CONTEXT = 16
OPENAI_SIZE = dict(widths=(128, 64), heads=(2, 1))  # 64-wide heads in both towers


def learn_merges(corpus=CORPUS, n: int = 60) -> list[tuple[str, str]]:
    """A few BPE merges learned greedily on the corpus (most frequent pair first, ties by the pair)."""
    b2u = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for line in corpus:
        for w in line.lower().split():
            symbols = [b2u[b] for b in w.encode()]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(n):
        pairs: collections.Counter = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: collections.Counter = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


MERGES = learn_merges()
VOCAB = openai_vocab(MERGES)
SOT, EOT = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]


def write_openai_merges(path: Path) -> Path:
    """bpe_simple_vocab_16e6.txt.gz's format: a header line, then one merge per line, gzipped."""
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [f"{a} {b}" for a, b in MERGES]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
    return path


def hf_tokenizer(folder: Path):
    """transformers' CLIPTokenizer over the tiny vocabulary (vocab.json + merges.txt written to `folder`)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def hf_clip(act: str = "gelu", eos_token_id: int = EOT, seed: int = 0, widths=(48, 32), heads=(3, 4)):
    """A random transformers.CLIPModel: image 32 px in 8-px patches, 2 + 2 layers, text context 16 over the tiny
    vocabulary. The default widths (image 48, text 32) have heads that are not width // 64: the config names
    them; OPENAI_SIZE follows OpenAI's rule (64-wide heads) for the layouts without a config."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=widths[1], intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=heads[1], max_position_embeddings=CONTEXT, hidden_act=act,
                         bos_token_id=SOT, eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=widths[0], intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads[0],
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24, logit_scale_init_value=2.0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # random values everywhere: a swapped norm, bias or transpose shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name != "logit_scale":
                p.normal_(0.0, 0.2)
    return model


def openai_state_dict(model) -> dict[str, torch.Tensor]:
    """The transformers model's weights in openai/CLIP's key layout (visual.conv1, ..., text_projection)."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T,  # applied as x @ proj
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
    }
    for hf, ours in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                     ("text_model.final_layer_norm", "ln_final")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = sd[f"{hf}.{kind}"]
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{tower}.encoder.layers."))
        for i in range(n):
            h, o = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            out[o + "attn.in_proj_weight"] = torch.cat([sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[o + "attn.in_proj_bias"] = torch.cat([sd[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                for kind in ("weight", "bias"):
                    out[o + f"{b}.{kind}"] = sd[h + f"{a}.{kind}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def reference(model, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' own outputs: unit image and text embeddings, and the logits per image."""
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images)
    return {"image": out.image_embeds, "text": out.text_embeds, "logits": out.logits_per_image}


def vitx_outputs(clip, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        img, txt, scale = clip(images, ids)
    return {"image": img, "text": txt, "logits": scale.exp() * img @ txt.T}


def assert_same(expected: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """Image embeddings, text embeddings and logits equal to 1e-5 (fp32)."""
    for key in ("image", "text", "logits"):
        torch.testing.assert_close(ours[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
