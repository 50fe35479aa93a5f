"""The shipped AttentionAnalysis callback logs the entropy, logit, NMI, outlier-token and CKA analyses of a real
(tiny) run: their scalars per layer, their labelled images, their numbers in analysis.json."""
import json
import warnings

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vit_experiments.callbacks.analysis import AttentionAnalysis

from ._tiny import TinyClassifier, loaders

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_fit_logs_the_attention_statistics_and_cka(tmp_path):
    train, val, _ = loaders()
    cb = AttentionAnalysis(num_images=4, every_n_epochs=1, at_start=True)
    L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
              logger=TensorBoardLogger(str(tmp_path), name="run", version=0), enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(TinyClassifier(), train, val)
    log_dir = tmp_path / "run" / "version_0"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for name in ("attention_entropy", "attention_entropy_min", "attention_logit_max", "attention_nmi",
                 "outlier_tokens", "outlier_norm_ratio", "cka_adjacent"):
        assert {f"analysis/{name}/layer_01", f"analysis/{name}/layer_02"} <= scalars, name
    assert not any(t.startswith("analysis/probe") for t in scalars)  # one validation batch, 8 images: too few
    for name in ("attention_entropy", "outlier_tokens", "cka"):
        assert f"analysis/{name}" in images and acc.Images(f"analysis/{name}")[-1].width >= 400
    entropy = [e.value for e in acc.Scalars("analysis/attention_entropy/layer_01")]
    assert len(entropy) == 2 and all(0 < v <= 2.84 for v in entropy)  # 17 tokens: at most log 17 = 2.833 nats
    record = json.loads((log_dir / "analysis" / "step_000002" / "analysis.json").read_text())
    assert len(record["entropy"]["entropy"]) == 2 and len(record["cka"]["within"]) == 3
    assert record["outlier_tokens"]["k"] == 10.0 and record["probe"] is None
    assert (log_dir / "analysis" / "step_000002" / "cka.png").exists()
