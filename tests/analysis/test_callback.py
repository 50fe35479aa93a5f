"""AttentionAnalysis in real (tiny) Lightning runs: TensorBoard tags read back, files, probe, DDP, bf16."""
import json
import os
import signal
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vit_experiments.callbacks.analysis import COST_TAGS, IMAGE_TAGS, AttentionAnalysis, find_backbone

from ._tiny import TinyClassifier, TinyCLIPLike, loaders

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def trainer(tmp_path, callback, **kw):
    args = dict(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                logger=TensorBoardLogger(str(tmp_path), name="run", version=0), enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    return L.Trainer(callbacks=[callback], **{**args, **kw})


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_fit_logs_tags_and_writes_files(tmp_path):
    train, val, x = loaders()
    cb = AttentionAnalysis(num_images=4)
    trainer(tmp_path, cb).fit(TinyClassifier(), train, val)
    log_dir = tmp_path / "run" / "version_0"
    acc = events(log_dir)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for layer in ("layer_01", "layer_02"):
        assert {f"analysis/attention_distance{s}/{layer}" for s in ("", "_min", "_max")} <= scalars
        assert f"analysis/prefix_attention/{layer}" in scalars
    assert {"analysis/position_embedding/topology_score", *COST_TAGS} <= scalars
    ours = {t for t in scalars if not t.startswith(("train/", "val/", "epoch"))}  # the tiny task logs its own
    assert all(t.startswith("analysis/") for t in ours - set(COST_TAGS))  # one group in the Scalars tab
    assert set(IMAGE_TAGS) <= images
    # the labelled figures, not strips of pixels: at least 400 px wide
    assert all(acc.Images(tag)[-1].width >= 400 for tag in IMAGE_TAGS)
    # at start (step 0) and after each of the 2 epochs of 2 steps; at_end adds nothing at step 4
    assert [e.step for e in acc.Scalars("analysis/attention_distance/layer_01")] == [0, 2, 4]
    assert [e.step for e in acc.Images("analysis/position_similarity")] == [0, 2, 4]
    assert sorted(os.listdir(log_dir / "analysis")) == ["step_000000", "step_000002", "step_000004"]
    step_dir = log_dir / "analysis" / "step_000004"
    data = json.loads((step_dir / "analysis.json").read_text())
    assert data["step"] == 4 and data["num_images"] == 4 and len(data["attention_distance"]) == 2
    assert {"attention_distance.png", "position_similarity.png", "rollout.png", "patch_filters.png",
            "attention_distance.csv"} <= set(os.listdir(step_dir))
    # the probe is the first validation images, as the model saw them
    torch.testing.assert_close(cb._probe, x[:4])
    # the topology score at step 0 is the one of the initial random embedding
    first = json.loads((log_dir / "analysis" / "step_000000" / "analysis.json").read_text())
    assert abs(first["topology_score"]) < 0.5


def test_image_classifier_probe_is_denormalised_for_display(tmp_path):
    from vit_experiments.models.vit import ViTConfig
    from vit_experiments.tasks.classification import ImageClassifier

    train, val, x = loaders(uint8=True)
    vit = ViTConfig(variant=None, image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    cb = AttentionAnalysis(num_images=3, every_n_epochs=0, at_end=True, at_start=False, save_figures=False)
    trainer(tmp_path, cb, max_epochs=1).fit(ImageClassifier(vit), train, val)
    assert cb.runs == 1
    assert cb._display.dtype == torch.uint8
    assert (cb._display.int() - x[:3].int()).abs().max() <= 1  # exact up to float rounding
    step_dir = tmp_path / "run" / "version_0" / "analysis" / "step_000002"
    assert (step_dir / "analysis.json").exists() and not (step_dir / "rollout.png").exists()


def test_every_n_steps_and_state_survives_a_checkpoint(tmp_path):
    train, val, x = loaders()
    cb = AttentionAnalysis(num_images=2, every_n_epochs=0, every_n_steps=1, at_start=False, at_end=False,
                           log_images=False, save_figures=False)
    t = trainer(tmp_path, cb, max_epochs=1, limit_train_batches=3)
    t.fit(TinyClassifier(), train, val)
    acc = events(tmp_path / "run" / "version_0")
    assert [e.step for e in acc.Scalars("analysis/attention_distance_max/layer_02")] == [1, 2, 3]
    assert acc.Tags()["images"] == []
    t.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    fresh = AttentionAnalysis(num_images=2)
    fresh.load_state_dict(ckpt["callbacks"][cb.state_key])
    torch.testing.assert_close(fresh._probe, x[:2])


def test_bf16_true_and_no_validation_data(tmp_path):
    train, _, x = loaders()
    cb = AttentionAnalysis(num_images=2, every_n_epochs=1, log_images=False, save_figures=False, raise_errors=True)
    with pytest.warns(UserWarning, match="first training batch"):
        trainer(tmp_path, cb, max_epochs=1, precision="bf16-true", limit_val_batches=0).fit(TinyClassifier(), train)
    assert cb.runs == 2  # at start and at the end of the epoch
    data = json.loads((tmp_path / "run" / "version_0" / "analysis" / "step_000002" / "analysis.json").read_text())
    assert all(d is not None and d > 0 for row in data["attention_distance"] for d in row)


def test_clip_like_module_and_model_attr(tmp_path):
    module = TinyCLIPLike()
    assert find_backbone(module) is module.model.visual
    assert find_backbone(module, "model.visual") is module.model.visual
    with pytest.raises(AttributeError, match="no attribute 'vision'"):
        find_backbone(module, "model.vision")
    with pytest.raises(TypeError, match="model_attr"):
        find_backbone(module, "head")
    train, val, _ = loaders()
    cb = AttentionAnalysis(num_images=2, at_end=False, log_images=False, save_figures=False, raise_errors=True)
    trainer(tmp_path, cb, max_epochs=1).fit(module, train, val)
    assert cb.runs == 2


def test_a_failing_analysis_warns_and_training_goes_on(tmp_path):
    train, val, _ = loaders()
    cb = AttentionAnalysis(num_images=2, model_attr="model.nothing_here")
    t = trainer(tmp_path, cb)
    with pytest.warns(UserWarning, match="failed at step 0"):
        t.fit(TinyClassifier(), train, val)
    assert t.global_step == 4 and cb.runs == 0
    with pytest.raises(AttributeError):
        trainer(tmp_path, AttentionAnalysis(model_attr="model.nothing_here", raise_errors=True)).fit(
            TinyClassifier(), train, val)


def test_enabled_false_does_nothing(tmp_path):
    train, val, _ = loaders()
    cb = AttentionAnalysis(enabled=False)
    trainer(tmp_path, cb).fit(TinyClassifier(), train, val)
    assert cb.runs == 0 and cb._probe is None
    assert not (tmp_path / "run" / "version_0" / "analysis").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        AttentionAnalysis(num_images=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionAnalysis(every_n_steps=-1)


def test_two_processes_finish_and_only_rank_zero_analyses(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = "import sys; from tests.analysis._tiny import ddp_fit; ddp_fit(sys.argv[1])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    try:  # a hang (a collective on one rank only) shows up as a timeout instead of a stuck test run
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, timeout=120,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("2-process run with AttentionAnalysis did not finish within 120 s (a DDP hang?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "done").exists()
    markers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ran_"))
    # at start, after steps 1, 2, 3 (step 3 is also the epoch end): all on rank 0
    assert markers == ["ran_rank0_step0", "ran_rank0_step1", "ran_rank0_step2", "ran_rank0_step3"]
    log_dir = tmp_path / "run" / "version_0"
    assert sorted(os.listdir(log_dir / "analysis")) == [f"step_00000{i}" for i in range(4)]
    acc = events(log_dir)
    assert [e.step for e in acc.Scalars("analysis/attention_distance/layer_01")] == [0, 1, 2, 3]
    assert set(IMAGE_TAGS) <= set(acc.Tags()["images"])
    data = json.loads((log_dir / "analysis" / "step_000003" / "analysis.json").read_text())
    assert data["global_rank"] == 0


class StopsAtStep3(TinyClassifier):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("error, world, analysed", [
    (RuntimeError("disk went away"), 1, True),  # an exception in one process
    (None, 1, True),  # SIGTERM, or a first Ctrl-C (Lightning's SIGTERM path)
    (None, 2, True),  # ... which every rank makes at the same step
    (RuntimeError("one rank's own error"), 2, False),  # the other ranks are elsewhere: not safe
    (KeyboardInterrupt(), 1, False),  # a second Ctrl-C: stop at once
], ids=["exception", "sigterm", "sigterm-2-ranks", "exception-2-ranks", "second-ctrl-c"])
def test_an_interrupted_fit_gets_its_final_analysis_when_stopping_is_safe(error, world, analysed, tmp_path,
                                                                           monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import vit_experiments.callbacks.analysis as analysis

    monkeypatch.setattr(analysis, "rank_world", lambda: (0, world))  # what the process group would say
    train, val, _ = loaders()
    cb = AttentionAnalysis(num_images=2, every_n_epochs=0, at_start=False, at_end=True, log_images=False)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C for good after a KeyboardInterrupt
    try:
        with pytest.raises((RuntimeError, SystemExit)):  # SIGTERMException, Lightning's exit on Ctrl-C: SystemExit
            trainer(tmp_path, cb, max_epochs=3).fit(StopsAtStep3(error or SIGTERMException()), train, val)
    finally:
        signal.signal(signal.SIGINT, sigint)
    done = sorted(os.listdir(tmp_path / "run" / "version_0" / "analysis")) if analysed else []
    assert cb.runs == int(analysed) and done == ["step_000003"][: int(analysed)]
    assert not analysed or (tmp_path / "run" / "version_0" / "analysis" / "step_000003" / "analysis.json").exists()
