"""load_file opens folders, .safetensors and .npz files as documented, and every damaged, unsafe or unknown file
gets an error that says what it is and what to do."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vit_experiments.analyze import main_analyze
from vit_experiments.checkpoints import LoadedDirectory, load_file, read_checkpoint


def test_folders_safetensors_and_npz(tmp_path):
    weights = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(weights, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (hf / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3}))
    torch.save({"other": torch.zeros(1)}, hf / "open_clip_pytorch_model.bin")  # another layout's weights
    d = load_file(hf)
    assert isinstance(d, LoadedDirectory) and d.layout == "hf" and d.config == {"model_type": "vit"}
    assert set(d.configs) == {"config.json", "preprocessor_config.json"} and d.files == [str(hf / "model.safetensors")]
    assert d.state_dict.keys() == weights.keys() and torch.equal(d.state_dict["a.weight"], weights["a.weight"])
    (hf / "generation_config.json").write_text("{not json")  # a broken side file does not block the weights
    with pytest.warns(UserWarning, match="generation_config.json"):
        assert load_file(hf).state_dict.keys() == weights.keys()
    (hf / "config.json").write_text("{not json")  # the model's own config does
    with pytest.raises(ValueError, match="config.json as JSON"):
        load_file(hf)

    oc = tmp_path / "open_clip"
    oc.mkdir()
    torch.save({"w": torch.ones(2)}, oc / "open_clip_pytorch_model.bin")
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8}}))
    d = load_file(oc)
    assert (d.layout, d.config, list(d.state_dict)) == ("open_clip", {"model_cfg": {"embed_dim": 8}}, ["w"])

    shards = tmp_path / "shards"  # a sharded save_pretrained: the shards together are the state dict
    shards.mkdir()
    save_file({"x": torch.zeros(1)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.ones(1)}, str(shards / "model-00002-of-00002.safetensors"))
    assert sorted(load_file(shards).state_dict) == ["x", "y"] and load_file(shards).config is None

    save_file(weights, str(tmp_path / "w.safetensors"))
    assert load_file(tmp_path / "w.safetensors").keys() == weights.keys()
    np.savez(tmp_path / "w.npz", **{"embedding/kernel": np.ones((2, 2, 3, 4), np.float32)})
    arrays = load_file(tmp_path / "w.npz")
    assert isinstance(arrays["embedding/kernel"], np.ndarray) and arrays["embedding/kernel"].shape == (2, 2, 3, 4)
    (tmp_path / "w.npz").rename(tmp_path / "w.weights")  # recognised by its bytes, whatever the extension
    (tmp_path / "w.safetensors").rename(tmp_path / "w.bin")
    assert isinstance(load_file(tmp_path / "w.weights"), dict) and load_file(tmp_path / "w.bin").keys() == weights.keys()


@pytest.mark.parametrize("name", ["model.pth", "model.safetensors", "model.npz"])
def test_truncated_files_say_they_are_damaged(name, tmp_path):
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save({"w": torch.randn(64, 64)}, path)
    elif name.endswith(".safetensors"):
        save_file({"w": torch.randn(64, 64)}, str(path))
    else:
        np.savez(path, w=np.random.rand(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged.*copy or save it again"):
        read_checkpoint(str(path))


def test_unsafe_pickles_in_a_folder_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load.*trust-checkpoint"):
        read_checkpoint(str(tmp_path))


def test_unknown_layouts_and_empty_folders(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not a checkpoint vitx can read"):
        read_checkpoint(str(tmp_path / "other.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without weights vitx can read"):
        read_checkpoint(str(tmp_path / "empty"))
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "unknown.pth")  # tensors of an unknown network
    info = read_checkpoint(str(tmp_path / "unknown.pth"))
    assert (info.source, info.family, info.config) == ("state_dict", None, None)
    assert main_analyze(["--ckpt", str(tmp_path / "unknown.pth"), "--images", str(tmp_path), "--out",
                         str(tmp_path / "out")]) == 2
    assert "architecture vitx cannot tell" in capsys.readouterr().err
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "pos_embed": torch.zeros(1, 17, 8),
                "cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
                "blocks.0.mlp.fc1.weight": torch.zeros(32, 8), "blocks.0.ls1.gamma": torch.ones(8)},
               tmp_path / "layerscale.pth")
    with pytest.raises(ValueError, match=r"do not fit a vitx ViT.*unexpected \['blocks.0.ls1.gamma'.*layer scale"):
        read_checkpoint(str(tmp_path / "layerscale.pth#num_heads=2"))
