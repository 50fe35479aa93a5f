"""Feature-cached gradient accumulation of CLIP (vit_experiments.tasks.feature_cache) on one process, through
`vitx fit` of the shipped ContrastivePretraining with the shipped conf/trainer/grad_accum.yaml (4 micro-batches):

* loss, every parameter's gradient, learning rate and parameters equal one batch of all the step's pairs, also
  with gradient clipping (trainer.gradient_clip_val) and with the temperature at its ceiling (clamped after each
  step); under bf16 autocast close to the bf16 run with one batch;
* the run says once that it accumulates by feature caching, and logs the contrastive batch;
* conf/clip/demo.yaml with the overlay resumes exactly from a checkpoint saved between two optimizer steps in the
  middle of an epoch (the real caption stream: positions and augmentation keys in the checkpoint);
* the replayed forward passes draw the dropout and stochastic-depth masks of the cached ones.
(2 processes, DDP and FSDP2: tests/distributed/test_contrastive_accum_ddp.py.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.distributed._contrastive_accum import TINY_CLIP, experiment, steps_of
from tests.models.test_clip import captions, tiny_config
from tests.tasks.test_contrastive import tiny_args
from vit_experiments.cli import main
from vit_experiments.losses import contrastive_loss
from vit_experiments.models.clip import CLIP
from vit_experiments.tasks.feature_cache import FeatureCache

GRAD_ACCUM = REPO / "conf" / "trainer" / "grad_accum.yaml"
DEMO = REPO / "conf" / "clip" / "demo.yaml"
ACCUM = 4  # conf/trainer/grad_accum.yaml
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)  # one batch and 4 micro-batches sum in different orders


def fit(tmp: Path, name: str, split: int, *extra: str, **kwargs) -> list[dict]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp, name, split, **kwargs)))
    overlay = ["--config", str(GRAD_ACCUM)] if split > 1 else []
    main(["fit", "--config", str(path), *overlay, *extra])
    return steps_of(tmp / f"{name}.pt")


def assert_same_steps(reference: list[dict], run: list[dict], grad_tol=GRAD_TOL) -> None:
    assert [s["step"] for s in run] == [s["step"] for s in reference] == [1, 2]
    for ref, got in zip(reference, run):
        assert got["contrastive_batch"] == ref["contrastive_batch"] == 16.0
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        assert got["lr"] == pytest.approx(ref["lr"])
        assert set(got["grads"]) == set(ref["grads"]) == set(ref["params"])
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, **grad_tol,
                                       msg=lambda m, n=name, s=ref["step"]: f"gradient of {n} at step {s}: {m}")
    # AdamW's first step is about lr * sign(gradient): entries whose gradient is zero but for rounding (the key
    # projection's bias) move by +-lr at random, so parameters are compared where the gradient is not
    first = reference[0]
    for name, value in first["params"].items():
        moved = first["grads"][name].abs() > 1e-5
        torch.testing.assert_close(run[0]["params"][name][moved], value[moved], rtol=0, atol=2e-5,
                                   msg=lambda m, n=name: f"{n} after the first step: {m}")


def total_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.square().sum()) for g in grads.values()))


def test_grad_accum_overlay_equals_one_batch_of_all_pairs(tmp_path, capsys):
    last = ({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},)
    reference = fit(tmp_path, "one-batch", 1, callbacks=last, trainer={"enable_checkpointing": True})
    accumulated = fit(tmp_path, "accumulated", split=ACCUM)
    assert_same_steps(reference, accumulated)
    out = capsys.readouterr().out
    assert out.count("feature-cached accumulation") == 1
    assert ("contrastive batch: 16 pairs per optimizer step (4 per device x 1 device x 4 accumulated "
            "micro-batches); feature-cached accumulation") in out
    assert "contrastive batch: 16 pairs per optimizer step (16 per device x 1 device)\n" in out
    # the checkpoint of a run without accumulation resumed with it (Lightning counts steps elsewhere then)
    resumed = fit(tmp_path, "resumed", ACCUM, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), epochs=2)
    assert [s["step"] for s in resumed] == [3, 4]


def test_clipping_and_the_temperature_clamp_under_accumulation(tmp_path):
    """The temperature starts at its ceiling and a fault injected into its gradient makes descent raise it: clamped
    after every step; the gradients are clipped to a norm below theirs; all as in the run with one batch."""
    ceiling = math.log(100.0)
    clip = {**TINY_CLIP, "init_logit_scale": ceiling, "max_logit_scale": ceiling}
    raise_t = ({"class_path": "tests.distributed._contrastive_accum.RaiseTemperature", "init_args": {"by": 100.0}},)
    args = ("--trainer.gradient_clip_val", "0.5")
    reference = fit(tmp_path, "one-batch", 1, *args, clip=clip, callbacks=raise_t)
    accumulated = fit(tmp_path, "accumulated", ACCUM, *args, clip=clip, callbacks=raise_t)
    for ref, got in zip(reference, accumulated):
        assert total_norm(ref["grads"]) == pytest.approx(0.5, rel=1e-4)  # the clip binds in both runs
        assert total_norm(got["grads"]) == pytest.approx(0.5, rel=1e-4)
        assert got["grads"]["model.logit_scale"] < 0  # descent raises it ...
        assert got["params"]["model.logit_scale"] == pytest.approx(ceiling, abs=1e-7)  # ... and the clamp holds
    assert_same_steps(reference, accumulated)


def test_accumulation_under_bf16_stays_close_to_one_bf16_batch(tmp_path):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.bfloat16:
            pytest.skip("this CPU build of torch does not run bf16 autocast")
    bf16 = ("--config", str(REPO / "conf" / "trainer" / "bf16.yaml"))
    reference = fit(tmp_path, "one-batch", 1, *bf16)
    accumulated = fit(tmp_path, "accumulated", ACCUM, *bf16)
    for ref, got in zip(reference, accumulated):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-2)
        cos = torch.nn.functional.cosine_similarity(
            torch.cat([g.flatten() for g in got["grads"].values()]),
            torch.cat([ref["grads"][n].flatten() for n in got["grads"]]), dim=0)
        assert cos > 0.99


# -- the shipped demo with the overlay, resumed between two steps ----------------------------------------------


@pytest.fixture(scope="module")
def corpus(tiny_captions) -> Path:
    return tiny_captions


def demo_args(corpus: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    overlay = tmp / f"{name}-callbacks.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "tests.distributed._contrastive_accum.RecordSteps", "init_args": {"path": str(tmp / f"{name}.pt")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / f"{name}-steps"), "filename": "{step}", "every_n_train_steps": 2,
                       "save_top_k": -1}},
    ]}}))
    # 64 pairs an epoch in micro-batches of 4: 4 optimizer steps of 16 pairs
    return ["fit", *tiny_args(DEMO, corpus, tmp / f"{name}-runs", "--config", str(GRAD_ACCUM), "--config",
                              str(overlay), "--data.batch_size", "4", "--trainer.max_epochs", "1",
                              "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                              "--analysis.enabled", "false", *extra)]


def test_demo_with_the_overlay_resumes_exactly_between_two_steps(corpus, tmp_path, capsys):
    main(demo_args(corpus, tmp_path, "full"))
    assert "contrastive batch: 16 pairs per optimizer step (4 per device x 1 device x 4 accumulated micro-batches); " \
        "feature-cached accumulation" in capsys.readouterr().out
    full = steps_of(tmp_path / "full.pt")
    assert [s["step"] for s in full] == [1, 2, 3, 4]
    assert {s["contrastive_batch"] for s in full} == {16.0}
    ckpt = tmp_path / "full-steps" / "step=2.ckpt"  # after 8 of the epoch's 16 micro-batches
    main(demo_args(corpus, tmp_path, "resumed", "--ckpt_path", str(ckpt)))
    resumed = steps_of(tmp_path / "resumed.pt")
    assert [s["step"] for s in resumed] == [3, 4]
    for ref, got in zip(full[2:], resumed):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert got["lr"] == pytest.approx(ref["lr"])
        for name, value in ref["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-6)


# -- the replay draws the cached pass's random masks -------------------------------------------------------------


def test_replay_reuses_the_dropout_and_stochastic_depth_draws():
    """With dropout and drop-path on, the gradients through the cache equal those of keeping every micro-batch's
    graph (the same draws, in the same order) and back-propagating the loss of all of them at once."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.vision.drop_path_rate, cfg.text.drop_rate = 0.3, 0.3
    model = CLIP(cfg).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), captions(4, seed=i)) for i in range(3)]

    torch.manual_seed(5)
    outs = [model(x, ids) for x, ids in batches]
    loss = contrastive_loss(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch.manual_seed(5)
    cache = FeatureCache()
    for x, ids in batches:
        cache.cache(model, x, ids)
    after_cache = torch.get_rng_state()
    cached_loss, grads, scale_grad = cache.loss_and_gradients(model.logit_scale)
    for j in range(len(cache)):
        cache.replay(model, j, grads[j], scale_grad if j == len(cache) - 1 else None).backward()
    torch.testing.assert_close(cached_loss, loss.detach())
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    assert torch.equal(torch.get_rng_state(), after_cache)  # the replay leaves the generator where the cache did

    torch.manual_seed(6)  # other draws: other gradients, so the comparison above depends on the replay
    model.zero_grad()
    outs = [model(x, ids) for x, ids in batches]
    contrastive_loss(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2]).backward()
    assert not torch.allclose(model.logit_scale.grad, expected["logit_scale"])
