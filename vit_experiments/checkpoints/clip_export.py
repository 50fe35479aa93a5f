"""A vitx CLIP (Radford et al. 2021) in the layouts of other libraries: a Hugging Face folder and open_clip's.

    vitx export --ckpt RUN/checkpoints/last.ckpt --format hf --out clip-hf/          # transformers.CLIPModel
    vitx export --ckpt RUN/checkpoints/last.ckpt --format open_clip --out clip-oc/   # or FILE.bin / .safetensors

- hf: config.json (model_type "clip"), model.safetensors, preprocessor_config.json (the normalisation) and the
  caption tokenizer as tokenizer.json: a folder `transformers.CLIPModel.from_pretrained` loads. A CLIP BPE
  tokenizer (imported weights) also loads with `CLIPTokenizer.from_pretrained`; vitx's own byte-level tokenizer
  with `tokenizers.Tokenizer.from_file("tokenizer.json")` (start, end, padding and context length included).
- open_clip: the state dict in open_clip's (= OpenAI's) key layout; to a folder, as open_clip_pytorch_model.bin
  with open_clip_config.json (model_cfg: sizes, quick_gelu; preprocess_cfg: mean, std) and tokenizer.json, the
  layout of open_clip's hub folders.

Where the caption is read: transformers reads it at the first eos_token_id, or at the highest id when
eos_token_id is 2 (its configs before that id was fixed); open_clip always at the highest id. A model that reads
the highest id is written with eos_token_id 2. A model that reads its end token where that token is not the
tokenizer's highest id (vitx's own tokenizers: the end token is id 2) gets the end token and the tokenizer's
highest id swapped, in the token embedding and in the tokenizer written beside it: the same network over
renumbered ids, with equal outputs on every caption the tokenizer writes.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from vit_experiments.checkpoints.clip_layouts import from_vitx_hf, from_vitx_openai
from vit_experiments.checkpoints.hf_vit import HF_ACT_NAMES
from vit_experiments.checkpoints.info import CheckpointInfo
from vit_experiments.models.clip import CLIPConfig

FORMATS = ("hf", "open_clip")


def _check(info: CheckpointInfo, layout: str) -> CLIPConfig:
    cfg = info.config
    if info.family != "clip" or not isinstance(cfg, CLIPConfig):
        raise ValueError(f"{info.describe()}: --format {layout} writes CLIP models")
    v = cfg.vision
    bad = [what for what, is_bad in (
        ("a patch projection with bias", v.patch_bias), ("average pooling", v.pool != "token"),
        ("distillation or register tokens", v.num_distill_tokens or v.num_reg_tokens), ("fc_norm", v.fc_norm),
        ("no class token", not v.class_token)) if is_bad]
    if layout == "hf" and not v.pre_norm:
        bad.append("no LayerNorm before the blocks (pre_norm=False)")
    if layout == "open_clip":
        if v.act != cfg.text.act or v.act == "gelu_tanh":
            bad.append(f"the activations {v.act}/{cfg.text.act} (open_clip: gelu or quick_gelu, both towers alike)")
        if v.norm_eps != 1e-5 or cfg.text.norm_eps != 1e-5:
            bad.append("a LayerNorm epsilon other than 1e-5")
    if bad:
        raise ValueError(f"the {layout} CLIP has no place for {', '.join(bad)}")
    return cfg


def _state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The weights, with zero q/k/v biases for a model without them (both layouts always have them)."""
    state = {k: v.detach().clone() for k, v in info.state_dict.items()}
    vision = info.config.vision
    if not vision.qkv_bias:  # the text tower always has them
        for i in range(vision.depth):
            w = state[f"visual.blocks.{i}.attn.qkv.weight"]
            state[f"visual.blocks.{i}.attn.qkv.bias"] = w.new_zeros(w.shape[0])
    return state


def _swap_ids(tokenizer_json: str, a: int, b: int) -> str:
    """The tokenizer with the ids of two tokens exchanged (vocabulary, added tokens, post-processor)."""
    d = json.loads(tokenizer_json)
    swap = {a: b, b: a}
    vocab = d["model"]["vocab"]
    for token, i in list(vocab.items()):
        vocab[token] = swap.get(i, i)
    for added in d.get("added_tokens") or []:
        added["id"] = swap.get(added["id"], added["id"])
    for special in ((d.get("post_processor") or {}).get("special_tokens") or {}).values():
        special["ids"] = [swap.get(i, i) for i in special["ids"]]
    if d.get("padding"):
        d["padding"]["pad_id"] = swap.get(d["padding"]["pad_id"], d["padding"]["pad_id"])
    return json.dumps(d, ensure_ascii=False)


def end_token_highest(info: CheckpointInfo, state: dict[str, torch.Tensor], notes: list[str]
                      ) -> tuple[Optional[str], int]:
    """(the tokenizer to write, the end token's id) with the end token the highest id the tokenizer writes (see
    the module docstring); `state` is changed in place when ids are swapped."""
    from data_pipelines.tokenizer import CaptionTokenizer

    text = info.config.text
    if info.tokenizer is None:
        if text.eot_pooling == "first" and text.eot_token_id != text.vocab_size - 1:
            raise ValueError("this model reads captions at their end token, which is not its highest id, and it "
                             "carries no tokenizer to renumber: export a checkpoint written by `vitx fit`")
        return None, text.eot_token_id
    tok = CaptionTokenizer.from_str(info.tokenizer)
    top = tok.vocab_size - 1
    if text.eot_pooling == "argmax" or tok.eot_id == top:
        return info.tokenizer, tok.eot_id
    emb = state["text.token_embedding.weight"]
    emb[[tok.eot_id, top]] = emb[[top, tok.eot_id]].clone()
    notes.append(f"the end token (id {tok.eot_id}) and token {top} swap ids, so that the end token is the highest "
                 "id, where the other library reads the caption; use the tokenizer written beside the weights")
    return _swap_ids(info.tokenizer, tok.eot_id, top), top


def _write_tokenizer(tokenizer: Optional[str], out: str, layout: str) -> list[str]:
    if tokenizer is None:
        return []
    from data_pipelines.bpe import END
    from data_pipelines.tokenizer import CaptionTokenizer

    paths = [os.path.join(out, "tokenizer.json")]
    CaptionTokenizer.from_str(tokenizer).save(paths[0])
    if layout == "hf" and END in json.loads(tokenizer)["model"]["vocab"]:  # CLIP's BPE: transformers' CLIPTokenizer
        paths.append(os.path.join(out, "tokenizer_config.json"))
        with open(paths[1], "w") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": END,
                       "unk_token": END, "pad_token": END, "model_max_length": json.loads(tokenizer)["truncation"]
                       ["max_length"]}, f, indent=2)
    return paths


def _normalization(info: CheckpointInfo) -> dict:
    from data_pipelines.transforms import CLIP_MEAN, CLIP_STD

    return info.normalization or {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def hf_config(cfg: CLIPConfig, logit_scale: float, eos: int, bos: int) -> dict:
    """config.json of a transformers CLIPModel with this architecture."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale, "torch_dtype": "float32",
        "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": t.mlp_dim, "num_hidden_layers": t.depth, "num_attention_heads": t.num_heads,
                        "max_position_embeddings": t.context_length, "hidden_act": HF_ACT_NAMES[t.act],
                        "layer_norm_eps": t.norm_eps, "eos_token_id": eos, "bos_token_id": bos, "pad_token_id": 0,
                        "projection_dim": cfg.embed_dim, "attention_dropout": 0.0},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.embed_dim, "intermediate_size": v.mlp_dim,
                          "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": v.in_chans, "hidden_act": HF_ACT_NAMES[v.act],
                          "layer_norm_eps": v.norm_eps, "projection_dim": cfg.embed_dim, "attention_dropout": 0.0},
    }


def export_hf_clip(info: CheckpointInfo, out: str) -> tuple[list[str], list[str]]:
    """Write a transformers CLIPModel folder to `out` (see the module docstring). Returns (paths, notes)."""
    from safetensors.torch import save_file

    from data_pipelines.tokenizer import CaptionTokenizer

    cfg = _check(info, "hf")
    notes: list[str] = []
    state = _state(info)
    tokenizer, eot = end_token_highest(info, state, notes)
    # transformers reads the highest id when eos_token_id is 2: that is how a model reading the argmax is written
    eos = 2 if cfg.text.eot_pooling == "argmax" else eot
    if eos == 2 and cfg.text.eot_pooling == "first":
        raise ValueError("the end token is id 2, which transformers' CLIP reads as 'the highest id'")
    bos = CaptionTokenizer.from_str(tokenizer).sot_id if tokenizer else eot
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, n) for n in ("config.json", "model.safetensors", "preprocessor_config.json")]
    with open(paths[0], "w") as f:
        json.dump(hf_config(cfg, float(state["logit_scale"]), eos, bos), f, indent=2)
    save_file(from_vitx_hf(state), paths[1], metadata={"format": "pt"})
    norm, size = _normalization(info), cfg.vision.image_size
    with open(paths[2], "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                   "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(norm["mean"]),
                   "image_std": list(norm["std"]), "resample": 3, "do_convert_rgb": True}, f, indent=2)
    return paths + _write_tokenizer(tokenizer, out, "hf"), notes


def open_clip_config(cfg: CLIPConfig, normalization: dict) -> dict:
    """open_clip_config.json for this architecture (open_clip's model_cfg and preprocess_cfg)."""
    v, t = cfg.vision, cfg.text
    vision = {"image_size": v.image_size, "layers": v.depth, "width": v.embed_dim, "patch_size": v.patch_size,
              "head_width": v.embed_dim // v.num_heads, "mlp_ratio": v.mlp_dim / v.embed_dim}
    if not v.pre_norm:
        vision["no_ln_pre"] = True
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.num_heads,
            "layers": t.depth, "mlp_ratio": t.mlp_dim / t.width}
    return {"model_cfg": {"embed_dim": cfg.embed_dim, "quick_gelu": v.act == "quick_gelu", "vision_cfg": vision,
                          "text_cfg": text},
            "preprocess_cfg": {"mean": list(normalization["mean"]), "std": list(normalization["std"])}}


def export_open_clip(info: CheckpointInfo, out: str) -> tuple[list[str], list[str]]:
    """Write the open_clip state dict to `out` (.bin/.pt/.pth, .safetensors, or a folder with its config and
    tokenizer). Returns (paths, notes)."""
    cfg = _check(info, "open_clip")
    notes: list[str] = []
    state = _state(info)
    tokenizer, _ = end_token_highest(info, state, notes)
    weights = from_vitx_openai(state)
    if out.endswith((".bin", ".pt", ".pth", ".safetensors")):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if out.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(weights, out, metadata={"format": "pt"})
        else:
            torch.save(weights, out)
        if tokenizer is not None:
            notes.append("a single file holds no tokenizer: export to a folder to get tokenizer.json beside it")
        return [out], notes
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "open_clip_pytorch_model.bin"), os.path.join(out, "open_clip_config.json")]
    torch.save(weights, paths[0])
    with open(paths[1], "w") as f:
        json.dump(open_clip_config(cfg, _normalization(info)), f, indent=2)
    return paths + _write_tokenizer(tokenizer, out, "open_clip"), notes


def export_clip(info: CheckpointInfo, fmt: str, out: str) -> tuple[list[str], list[str]]:
    """`vitx export` of a CLIP: --format hf or open_clip."""
    if fmt == "hf":
        return export_hf_clip(info, out)
    if fmt == "open_clip":
        return export_open_clip(info, out)
    raise ValueError(f"a CLIP exports as {' or '.join(FORMATS)}, not {fmt!r}")
