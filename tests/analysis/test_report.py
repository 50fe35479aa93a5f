"""analyze_model and save_report on a real (tiny) VisionTransformer: ViT, DeiT (2 prefix tokens), bf16."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from vit_experiments.analysis import attention_distance_by_layer
from vit_experiments.analysis.report import FIGURES, analyze_model, save_report
from vit_experiments.models.vit import ViTConfig, VisionTransformer


def tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(variant=None, image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    return VisionTransformer(ViTConfig(**{**cfg, **kw}))


def test_numbers_match_the_pure_functions_and_mode_is_restored():
    model = tiny_vit(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    model.train()
    x = torch.randn(3, 3, 32, 32)
    r = analyze_model(model, x, figures=False)
    assert model.training  # restored
    assert r["figures"] == {}
    model.eval()
    with torch.no_grad():
        _, attns = model.forward_features(x, return_attention=True)
    ref = attention_distance_by_layer(attns, (4, 4), 8, 1)
    np.testing.assert_allclose(r["attention_distance"], ref.distance.numpy(), rtol=1e-6)  # eval: no dropout
    np.testing.assert_allclose(r["prefix_attention"], ref.prefix_share.numpy(), rtol=1e-6)
    assert r["attention_distance"].shape == (3, 2)
    np.testing.assert_allclose(r["distance_max"], r["attention_distance"].max(1))
    assert r["position_similarity"].shape == (4, 4, 4, 4)
    assert -1.0 <= r["topology_score"] <= 1.0
    assert r["rollout"].shape == (3, 4, 4)
    assert r["filter_components"].shape == (28, 3, 8, 8) and r["filter_explained_variance"].shape == (28,)
    assert set(r["images"]) == {"position_similarity", "rollout", "patch_filters"}
    assert all(im.ndim == 3 and im.shape[-1] == 3 and im.dtype == np.uint8 for im in r["images"].values())


def test_deit_two_prefix_tokens_and_sincos_topology():
    model = tiny_vit(num_distill_tokens=1, pos_embed_type="sincos", embed_dim=64, depth=2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    r = analyze_model(model, images.float() / 127.5 - 1, images, rollout_token=1, figures=("rollout",))
    assert r["num_prefix_tokens"] == 2 and r["rollout_token"] == 1
    assert r["topology_score"] > 0.9  # the fixed 2-D sin-cos embedding has the grid topology
    assert list(r["figures"]) == ["rollout"]
    assert r["images"]["rollout"].shape[0] == 32 + 2 * 2


def test_bfloat16_model():
    model = tiny_vit().to(torch.bfloat16)
    r = analyze_model(model, torch.randn(2, 3, 32, 32), figures=False)  # images cast to the model's dtype
    assert r["attention_distance"].dtype == np.float32 and np.isfinite(r["attention_distance"]).all()
    ref = analyze_model(model.float(), torch.randn(2, 3, 32, 32), figures=False)
    np.testing.assert_allclose(r["attention_distance"], ref["attention_distance"], rtol=0.05)


def test_save_report_writes_pngs_json_and_csv(tmp_path):
    model = tiny_vit(num_distill_tokens=1)
    r = analyze_model(model, torch.randn(2, 3, 32, 32), figures=("attention_distance",))
    paths = save_report(r, str(tmp_path / "out"), extra={"step": 7})
    for name in FIGURES:  # figures not made by analyze_model are drawn here
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000
    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["step"] == 7 and data["num_prefix_tokens"] == 2
    np.testing.assert_allclose(data["attention_distance"], r["attention_distance"], rtol=1e-5)
    assert np.array(data["position_similarity"]).shape == (4, 4, 4, 4)
    assert math.isclose(data["topology_score"], r["topology_score"], abs_tol=1e-6)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 and rows[0]["layer"] == "1" and rows[-1]["head"] == "2"
    assert float(rows[-1]["mean_attention_distance_px"]) == pytest.approx(r["attention_distance"][-1, -1], rel=1e-5)


def test_bad_inputs_say_what_to_do():
    model = tiny_vit()
    with pytest.raises(ValueError, match="display_images"):
        analyze_model(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resize"):
        analyze_model(model, torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="unknown figure"):
        analyze_model(model, torch.zeros(1, 3, 32, 32), figures=("nope",))


def test_scalars_name_every_layer_from_the_result():
    from vit_experiments.analysis.report import scalars

    r = analyze_model(tiny_vit(), torch.randn(2, 3, 32, 32), figures=False)
    tags = scalars(r)
    for i in (1, 2, 3):
        layer = f"layer_{i:02d}"
        assert tags[f"analysis/attention_distance/{layer}"] == pytest.approx(float(r["distance_mean"][i - 1]))
        assert tags[f"analysis/attention_distance_max/{layer}"] == pytest.approx(float(r["distance_max"][i - 1]))
        assert tags[f"analysis/prefix_attention/{layer}"] == pytest.approx(float(r["prefix_attention"][i - 1].mean()))
    assert tags["analysis/position_embedding/topology_score"] == pytest.approx(r["topology_score"])
    assert "analysis/attention_distance/layer_04" not in tags
    assert all(isinstance(v, float) and math.isfinite(v) for v in tags.values())


def test_entropy_outliers_cka_and_probes_in_the_result_json_and_tags(tmp_path):
    from vit_experiments.analysis.entropy import entropy_by_layer, nmi_by_layer
    from vit_experiments.analysis.report import scalars

    model = tiny_vit()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    rep = torch.randn(24, 3, 32, 32, generator=g)
    labels = torch.arange(24) % 2
    rep[labels == 1, 0] += 3.0  # class 1 is redder: linearly decodable from the first layer on
    r = analyze_model(model, x, representation_images=rep, representation_labels=labels, compare=model,
                      compare_images=rep, representation_batch_size=8, figures=False)
    model.eval()
    with torch.no_grad():
        _, attns = model.forward_features(x, return_attention=True)
    np.testing.assert_allclose(r["entropy"]["entropy"], entropy_by_layer(attns, 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(r["entropy"]["nmi"], nmi_by_layer(attns, 1).numpy(), rtol=1e-4, atol=1e-7)
    assert r["entropy"]["logit_max"].shape == (3,) and r["entropy"]["max_entropy"] == pytest.approx(math.log(17))
    assert r["outlier_tokens"]["share"].shape == (3,) and r["outlier_mask"].shape == (3, 4, 4, 4)
    within, cross = r["cka"]["within"], r["cka"]["compare"]
    assert within.shape == (4, 4) and r["cka"]["num_minibatches"] == 3
    np.testing.assert_allclose(np.diag(within), 1.0, atol=1e-5)
    np.testing.assert_allclose(cross, within, atol=1e-5)  # a model against itself
    assert r["probe"]["num_train"] + r["probe"]["num_test"] == 24
    assert r["probe"]["cls_accuracy"].shape == (3,) and (r["probe"]["patch_accuracy"] == 1.0).all()
    tags = scalars(r)
    for name in ("attention_entropy", "attention_entropy_min", "attention_logit_max", "attention_nmi",
                 "outlier_tokens", "outlier_norm_ratio", "cka_adjacent", "probe_cls", "probe_patch"):
        assert f"analysis/{name}/layer_03" in tags, name
    assert tags["analysis/cka_compare/diagonal_mean"] == pytest.approx(1.0, abs=1e-5)
    assert tags["analysis/probe_patch/layer_01"] == 1.0

    r = analyze_model(model, x, labels=torch.tensor([0, 1, 0, 1]), figures=("rollout",))
    assert r["probe"] is None and "too few" in r["probe_skipped"]  # 4 images: no probe
    assert {"attention_entropy", "outlier_tokens", "cka"} <= set(r["images"])
    assert all(r["images"][k].ndim == 3 and r["images"][k].dtype == np.uint8 for k in ("attention_entropy", "cka"))
    paths = save_report(r, str(tmp_path), figures=False)
    assert (tmp_path / "attention_entropy.png").stat().st_size > 1000 and "cka" in paths
    with open(paths["json"]) as f:
        data = json.load(f)
    assert {"entropy", "cka", "probe", "outlier_tokens"} <= set(data) and "outlier_mask" not in data
    assert np.array(data["cka"]["within"]).shape == (4, 4)
