"""vitx's TensorBoard logger: Lightning's, with a tidy dashboard.

- No `hp_metric` (Lightning's placeholder of -1) and no `epoch` scalar (Lightning adds the epoch to every batch of
  metrics; the step axis already orders them): only the tags the tasks and callbacks write.
- A custom-scalars layout (TensorBoard's "Custom Scalars" tab) built from the tags as they are written:
  train and val loss on one chart, train and val accuracy on another; every per-layer analysis
  (`analysis/<name>/layer_XX[/<stat>]`) as one multi-line chart of all its layers; the other analyses, the data
  counters and the performance numbers grouped by their first two levels. Each chart selects its tags by a
  regular expression, and the layout is written again when a tag needs a chart that is not there yet, so an
  analysis added later appears by itself.

The tag hierarchy it expects: `train/`, `val/` (and `test/`), `analysis/...`, `data/`, `perf/`.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# Lightning adds these to every logged batch of metrics; they are no quantity of the experiment
DROPPED = ("epoch",)
PER_LAYER = re.compile(r"^analysis/(?P<name>[^/]+)/layer_\d+(?:/(?P<stat>[^/]+))?$")
# (category, chart title, regex) for the task's own metrics: each quantity of train and val on one chart
TRAINING = (
    ("loss", r"^(train|val)/loss$"),
    ("top-1 accuracy", r"^(train|val)/acc1$"),
    ("top-5 accuracy", r"^(train|val)/acc5$"),
    ("learning rate", r"^train/lr(/.*)?$"),
)

Chart = Tuple[str, Tuple[str, ...]]  # (title, regexes)


def chart_for(tag: str) -> Optional[Tuple[str, Chart]]:
    """(category, (title, regexes)) of the custom-scalars chart that shows `tag`, or None for none."""
    for title, regex in TRAINING:
        if re.match(regex, tag):
            return "train and val", (title, (regex,))
    m = PER_LAYER.match(tag)
    if m:
        name, stat = m.group("name"), m.group("stat")
        suffix = rf"/{re.escape(stat)}" if stat else ""
        title = f"{name} per layer" + (f" ({stat})" if stat else "")
        return "analysis: every layer", (title, (rf"^analysis/{re.escape(name)}/layer_\d+{suffix}$",))
    parts = tag.split("/")
    if len(parts) < 2:
        return None
    top = parts[0]
    if top in ("val", "test", "train"):  # further metrics of a stage (zero-shot, retrieval): one chart per family
        family = parts[1]
        return f"{top} metrics", (f"{top}/{family}", (rf"^{top}/{re.escape(family)}(/.*)?$",))
    if top == "analysis":
        return "analysis", (parts[1], (rf"^analysis/{re.escape(parts[1])}/[^/]+$",))
    if top in ("perf", "data"):
        return top, (tag, (rf"^{re.escape(tag)}$",))
    return None


def custom_scalar_layout(tags) -> Dict[str, Dict[str, List[str]]]:
    """{category: {chart title: [regex, ...]}} for SummaryWriter.add_custom_scalars(layout) with multiline
    charts, from the scalar tags written so far. Categories in a fixed order: train and val first."""
    order = ["train and val", "val metrics", "test metrics", "train metrics", "analysis: every layer", "analysis",
             "data", "perf"]
    layout: Dict[str, Dict[str, List[str]]] = {}
    for tag in sorted(tags):
        found = chart_for(tag)
        if found is None:
            continue
        category, (title, regexes) = found
        layout.setdefault(category, {}).setdefault(title, list(regexes))
    return {c: dict(sorted(layout[c].items(), key=lambda kv: _chart_order(c, kv[0]))) for c in order if c in layout}


def _chart_order(category: str, title: str) -> Tuple[int, str]:
    if category == "train and val":
        return [t for t, _ in TRAINING].index(title), title
    return 0, title


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger without `hp_metric` and `epoch`, keeping a custom-scalars layout of its tags
    (see the module docstring). Arguments as Lightning's; `default_hp_metric` is off by default."""

    def __init__(self, save_dir: str, name: Optional[str] = "lightning_logs", version: Optional[Any] = None,
                 log_graph: bool = False, default_hp_metric: bool = False, prefix: str = "",
                 sub_dir: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, log_graph=log_graph,
                         default_hp_metric=default_hp_metric, prefix=prefix, sub_dir=sub_dir, **kwargs)
        self.scalar_tags: set = set()
        self._charts: set = set()  # (category, title) pairs in the layout written last

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k not in DROPPED}
        if not metrics:
            return
        super().log_metrics(metrics, step)
        new = set(metrics) - self.scalar_tags
        if new:
            self.scalar_tags |= new
            self._update_layout(new)

    def _update_layout(self, new_tags) -> None:
        charts = set()
        for tag in new_tags:
            found = chart_for(tag)
            if found is not None:
                charts.add((found[0], found[1][0]))
        if charts <= self._charts:
            return
        layout = custom_scalar_layout(self.scalar_tags)
        self._charts = {(c, t) for c, charts_ in layout.items() for t in charts_}
        # TensorBoard reads the newest layout of a run
        self.experiment.add_custom_scalars(
            {c: {t: ["Multiline", regexes] for t, regexes in charts_.items()} for c, charts_ in layout.items()})
