"""Frozen-embedding probes: how well an encoder's clip embeddings separate the classes of a labelled set.

The protocol (``af-probe`` and ``train.probe`` share every step of it):

1. Data: a prepared data set with ``train`` and ``val`` splits (``af-probe`` also scores ``test``),
   each read whole (``af_train.data.clips``), ordered by clip id and, with ``max_clips``, cut to a
   seeded random subset of that many clips per split (``probe_subset``). Splits must share the
   tokenizer and class list and no clip id.
2. Features: each clip's code row framed as in training (BOA + codes + EOA, cropped to
   ``max_length``, padded by the data loader's collator), the encoder's hidden state of a layer
   (0 = the embedding layer, L = the last) mean-pooled over the real tokens (``masked_mean_pool``).
   The encoder runs once per batch for all requested layers (``output_hidden_states``).
3. Probes, fitted on the train split only, the setting chosen on val, test scored once:
   - ``knn``: cosine similarity, the k nearest training clips vote with weights exp(s / 0.07) (DINO's
     weighted kNN); k in ``KNN_K`` (at most the training clips).
   - ``linear``: logistic regression (scikit-learn, lbfgs; one-vs-rest for multi-label data) on
     features standardised with the train split's mean and deviation; C in ``LINEAR_C``. C is chosen
     on the val split, not by cross-validation folds of train: train folds share speakers (or
     recordings), so they would reward memorising them; val is held out the way test is.
   The selection metric is val accuracy for single-label data and val mAP for multi-label data; a
   tie goes to the first setting of the list (smaller k, stronger regularisation). Probing every layer
   (``layer: best``, ``af-probe --layer best``), the layer is chosen the same way (``best_layer``: val
   only; a tie goes to the shallower layer).
4. Numbers: top-1 accuracy (single-label) and mAP (``af_train.metrics``), on test with a percentile
   bootstrap 95 % interval over test clips (``bootstrap_interval``).

Nondeterminism: none by construction (no sampling; ties broken by order), but the features are float32
sums whose rounding depends on the batch a clip is embedded in (batch size, ranks), so two runs of the
same weights may differ in the last bits of the features; a kNN vote or a logistic regression near a
tie can then flip a clip (1 / clips of the split in accuracy).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from af_train.data.collate import Collator
from af_train.metrics import bootstrap_interval, mean_average_precision, top1_accuracy
from af_train.model.heads import masked_mean_pool
from af_train.objectives import row_type_ids
from af_train.tokens import SpecialTokens, frame_rows

if TYPE_CHECKING:
    from af_train.data.clips import Clips

log = logging.getLogger(__name__)

KINDS = ("knn", "linear")
KNN_K = (1, 3, 5, 10, 20, 50)
KNN_TEMPERATURE = 0.07
LINEAR_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
LINEAR_MAX_ITER = 2000
BOOTSTRAP_ROUNDS = 1000


class ProbeError(ValueError):
    """A probe data set or setting that cannot be used as given; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeData:
    """The labelled clips of each split (``train``, ``val``, maybe ``test``) and what they share."""

    root: str
    splits: dict[str, Clips]
    labels: list[str]
    multi_label: bool
    tokenizer: dict[str, Any]
    codebook_size: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def targets(self, split: str) -> np.ndarray:
        """bool [N, C] multi-hot targets of ``split``."""
        from af_train.baselines import multi_hot_lists

        return multi_hot_lists(self.splits[split].labels, self.num_classes)


def probe_subset(clips: Clips, max_clips: int | None, seed: int = 0) -> Clips:
    """The clips ordered by id; with ``max_clips``, a seeded random subset of that many (kept in id order)."""
    order = sorted(range(len(clips)), key=clips.ids.__getitem__)
    if max_clips is not None and len(order) > max_clips:
        picked = np.sort(np.random.default_rng(seed).choice(len(order), size=max_clips, replace=False))
        order = [order[i] for i in picked]
    return clips.subset(order)


def load_probe_data(root: str | Path, splits: tuple[str, ...] = ("train", "val", "test"),
                    max_clips: int | None = None, seed: int = 0) -> ProbeData:
    """``root/<split>`` for each split (local shard directories), checked against each other (see module doc)."""
    from af_train.data.clips import read_clips

    root = Path(root)
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        where = ", ".join(str(root / s) for s in missing)
        raise ProbeError(f"probe data '{root}' has no {', '.join(missing)} split ({where}); a probe fits on train, "
                         "chooses its setting on val and reports test: prepare the data set with af-prepare so "
                         "that it has those splits")
    read = {split: probe_subset(read_clips(root / split), max_clips, seed) for split in splits}
    first = read[splits[0]].manifest
    from af_train.tokenizers.base import TokenizerError, check_same_tokenizer

    for split, clips in read.items():
        manifest = clips.manifest
        if list(manifest.labels) != list(first.labels) or manifest.multi_label != first.multi_label:
            raise ProbeError(f"'{root / split}' lists other classes than '{root / splits[0]}'; every split of a "
                             "probe data set must share one class list (prepare them together)")
        try:
            check_same_tokenizer(first.tokenizer, manifest.tokenizer, f"'{root / splits[0]}'", f"'{root / split}'")
        except TokenizerError as exc:
            raise ProbeError(str(exc)) from None
        if not len(clips):
            raise ProbeError(f"'{root / split}' holds no clips")
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            shared = sorted(set(read[a].ids) & set(read[b].ids))
            if shared:
                raise ProbeError(f"splits {a} and {b} of '{root}' share clip id(s) {shared[:3]}: a probe must never "
                                 "see its val or test clips in training")
    return ProbeData(str(root), read, list(first.labels), bool(first.multi_label), dict(first.tokenizer),
                     int(first.codec.codebook_size))


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How clips become encoder input, as in training: the code row, BOA/EOA, crop and padding length."""

    code_row: int
    max_length: int
    add_boa: bool = True
    add_eoa: bool = True
    dynamic_padding: bool = False
    codebook_size: int = 1024

    @classmethod
    def of_recipe(cls, data: Any, code_row: int, codebook_size: int) -> Framing:
        """From a recipe's ``data`` section."""
        return cls(code_row, int(data.max_length), bool(data.add_boa), bool(data.add_eoa), bool(data.dynamic_padding),
                   int(codebook_size))


def check_layers(layers: list[int], num_layers: int) -> list[int]:
    """Layer indices 0 (embeddings) .. ``num_layers`` (negative counts from the end), deduplicated, in order."""
    chosen = []
    for layer in layers:
        index = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= index <= num_layers:
            raise ProbeError(f"layer {layer} does not exist: the encoder has layers 0 (embeddings) .. {num_layers}")
        if index not in chosen:
            chosen.append(index)
    return chosen


@torch.no_grad()
def embed_clips(encoder: torch.nn.Module, clips: Clips, framing: Framing, layers: list[int], *, batch_size: int = 64,
                device: torch.device | str = "cpu") -> dict[int, np.ndarray]:
    """Mean-pooled hidden states of ``layers`` for every clip: ``{layer: float32 [N, hidden]}``.

    The encoder runs in eval mode (its mode is restored after). Every call runs the same number of
    forward passes for the same number of clips, whatever they hold (ZeRO-3 gathers weights in them).
    """
    device = torch.device(device)
    tokens = SpecialTokens(framing.codebook_size)
    boa = tokens.boa if framing.add_boa else None
    eoa = tokens.eoa if framing.add_eoa else None
    max_codes = framing.max_length - int(framing.add_boa) - int(framing.add_eoa)
    # the data loader's collator: the padding length and attention mask of training batches
    collator = Collator(tokens.pad, framing.max_length, num_classes=1, multi_label=True,
                        dynamic_padding=framing.dynamic_padding)
    pooled: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    was_training = encoder.training
    encoder.eval()
    try:
        for begin in range(0, len(clips), batch_size):
            samples = []
            for clip_id, codes in zip(clips.ids[begin:begin + batch_size], clips.codes[begin:begin + batch_size]):
                row = torch.tensor(codes[framing.code_row:framing.code_row + 1, :max_codes], dtype=torch.long)
                samples.append({"id": clip_id, "input_ids": frame_rows(row, boa, eoa),
                                "labels": torch.empty(0, dtype=torch.long)})
            batch = collator(samples)
            ids, mask = batch["input_ids"][:, 0].to(device), batch["attention_mask"].to(device)
            states = encoder(ids, mask, row_type_ids(encoder, framing.code_row, ids), output_hidden_states=True)
            for layer in layers:
                pooled[layer].append(masked_mean_pool(states[layer], mask).float().cpu().numpy())
    finally:
        encoder.train(was_training)
    width = int(encoder.config.hidden_size)
    return {layer: np.concatenate(parts) if parts else np.zeros((0, width), np.float32)
            for layer, parts in pooled.items()}


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def split_metrics(scores: np.ndarray, targets: np.ndarray, single_label: bool) -> dict[str, float]:
    """``accuracy`` (single-label only) and ``mAP`` of ``scores`` [N, C] against bool ``targets`` [N, C]."""
    result = {}
    if single_label:
        result["accuracy"] = top1_accuracy(scores, targets.argmax(axis=1))
    result["mAP"] = mean_average_precision(scores, targets)
    return result


def metrics_with_intervals(scores: np.ndarray, targets: np.ndarray, single_label: bool,
                           rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {value, low, high}}``: each metric with its bootstrap 95 % interval over the clips (the same
    resamples for every metric and every model scored with the same ``seed``)."""
    out = {}
    classes = targets.argmax(axis=1)
    statistics = {"mAP": lambda i: mean_average_precision(scores[i], targets[i])}
    if single_label:
        statistics = {"accuracy": lambda i: top1_accuracy(scores[i], classes[i]), **statistics}
    for name, statistic in statistics.items():
        interval = bootstrap_interval(statistic, scores.shape[0], rounds=rounds, seed=seed)
        out[name] = {"value": interval["value"], "low": interval["low"], "high": interval["high"]}
    return out


def paired_difference(scores_a: np.ndarray, scores_b: np.ndarray, targets: np.ndarray, single_label: bool,
                      rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {value, low, high}}`` of metric(a) − metric(b) on the same clips: a paired bootstrap (each
    resample scores both models on the same clips), tighter than comparing two separate intervals."""
    classes = targets.argmax(axis=1)
    statistics = {"mAP": lambda i: mean_average_precision(scores_a[i], targets[i])
                  - mean_average_precision(scores_b[i], targets[i])}
    if single_label:
        statistics = {"accuracy": lambda i: top1_accuracy(scores_a[i], classes[i]) - top1_accuracy(scores_b[i],
                                                                                                    classes[i]),
                      **statistics}
    out = {}
    for name, statistic in statistics.items():
        interval = bootstrap_interval(statistic, targets.shape[0], rounds=rounds, seed=seed)
        out[name] = {"value": interval["value"], "low": interval["low"], "high": interval["high"]}
    return out


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, ks: list[int],
               temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> dict[int, np.ndarray]:
    """``{k: [Q, C] vote scores}``: each query's k most cosine-similar training rows vote for their classes
    with weight exp(similarity / temperature), normalised to sum 1. Equal similarities: the earlier row first."""
    train, query = _normalise_rows(train_x), _normalise_rows(query_x)
    labels = np.asarray(train_y, dtype=np.float64)
    k_max = max(ks)
    out = {k: np.zeros((query.shape[0], labels.shape[1])) for k in ks}
    for begin in range(0, query.shape[0], chunk):
        similarity = query[begin:begin + chunk] @ train.T
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k_max]
        top = np.take_along_axis(similarity, nearest, axis=1)
        weights = np.exp((top - top[:, :1]) / temperature)  # the largest weight is 1: no overflow
        votes = weights[:, :, None] * labels[nearest]  # [q, k_max, C]
        for k in ks:
            total = votes[:, :k].sum(axis=1)
            out[k][begin:begin + chunk] = total / weights[:, :k].sum(axis=1, keepdims=True)
    return out


def linear_scores(train_x: np.ndarray, train_y: np.ndarray, eval_xs: list[np.ndarray], cs: list[float],
                  single_label: bool) -> list[list[np.ndarray]]:
    """Logistic regression fitted on (``train_x``, bool ``train_y`` [N, C]) for each inverse regularisation in
    ``cs``: per C, the decision scores [N_i, C] of each of ``eval_xs`` (a class the training rows never show
    scores -1e9 in single-label data). Single-label fits run along ``cs`` in order, each starting from the
    previous solution (scikit-learn's warm start: the same optimum, fewer iterations)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    train_x = np.asarray(train_x, dtype=np.float64)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    inputs = (train_x - mean) / std
    num_classes = train_y.shape[1]
    single = LogisticRegression(max_iter=LINEAR_MAX_ITER, warm_start=True)
    out = []
    for c in cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a loose fit at a large C scores worse on val
            warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
            if single_label:
                model = single.set_params(C=c).fit(inputs, train_y.argmax(axis=1))
            else:
                model = OneVsRestClassifier(LogisticRegression(C=c, max_iter=LINEAR_MAX_ITER)).fit(
                    inputs, train_y.astype(np.int64))
        out.append([_decision(model, (np.asarray(x, dtype=np.float64) - mean) / std, num_classes, single_label)
                    for x in eval_xs])
    return out


def _decision(model: Any, x: np.ndarray, num_classes: int, single_label: bool) -> np.ndarray:
    decision = model.decision_function(x)
    if not single_label:
        return np.asarray(decision, dtype=np.float64).reshape(len(x), num_classes)
    scores = np.full((len(x), num_classes), -1e9)
    seen = model.classes_.astype(np.int64)
    if len(seen) == 2:  # scikit-learn's binary case: one column, the second class's logit
        decision = np.stack([-decision, decision], axis=1) / 2.0
    scores[:, seen] = decision
    return scores


@dataclass
class ProbeResult:
    """One probe of one layer: the chosen setting, its val numbers and (when asked) test with intervals."""

    kind: str
    layer: int
    setting: dict[str, float]
    val: dict[str, float]
    val_by_setting: list[dict[str, float]]
    test: dict[str, dict[str, float]] | None = None
    test_scores: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "setting": self.setting, "val": self.val,
                "val_by_setting": self.val_by_setting, "test": self.test}


def fit_probe(kind: str, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray] | None = None, *, single_label: bool, layer: int = -1,
              rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0, settings: list[float] | None = None) -> ProbeResult:
    """Fit ``kind`` on ``train`` (features, bool targets [N, C]), choose its setting on ``val``, score ``test``.

    Only the train split's features and targets reach the fit, only val's reach the choice; test is
    scored once, with the chosen setting. ``settings``: the k (knn) or C (linear) values to try
    (default ``KNN_K`` / ``LINEAR_C``).
    """
    if kind not in KINDS:
        raise ProbeError(f"probe kind '{kind}' is unknown; choose from {', '.join(KINDS)}")
    (train_x, train_y), (val_x, val_y) = train, val
    present = train_y.any(axis=0)
    if single_label and int(present.sum()) < 2:
        raise ProbeError(f"the probe's train split shows {int(present.sum())} class(es); a probe needs at least two")
    selection = "accuracy" if single_label else "mAP"
    evals = [val_x] + ([test[0]] if test is not None else [])
    if kind == "knn":
        candidates = sorted({min(int(k), len(train_x)) for k in (settings or KNN_K)})
        scored = knn_scores(train_x, train_y, np.concatenate(evals), candidates)
        per_setting = [(k, np.split(scored[k], [len(val_x)])) for k in candidates]
        name = "k"
    else:
        candidates = [float(c) for c in (settings or LINEAR_C)]
        per_setting = list(zip(candidates, linear_scores(train_x, train_y, evals, candidates, single_label)))
        name = "C"
    table = []
    for value, (val_scores, *_) in per_setting:
        table.append({name: value, **split_metrics(val_scores, val_y, single_label)})
    ranked = [-np.inf if np.isnan(row[selection]) else row[selection] for row in table]
    best = max(range(len(table)), key=lambda i: (ranked[i], -i))  # the first of equal scores
    value, scores = per_setting[best]
    result = ProbeResult(kind, layer, {name: value}, {k: v for k, v in table[best].items() if k != name}, table)
    if test is not None:
        result.test_scores = scores[1]
        result.test = metrics_with_intervals(scores[1], test[1], single_label, rounds, seed)
    return result


def best_layer(results: list[ProbeResult], single_label: bool) -> ProbeResult:
    """Of one probe kind fitted on several layers, the result with the best val metric (accuracy, or mAP for
    multi-label data; of equal ones the first, the shallower layer). Only the val numbers are read: a test
    score, when there is one, plays no part in the choice."""
    if not results:
        raise ProbeError("no probed layer to choose from")
    metric = "accuracy" if single_label else "mAP"
    ranked = [-np.inf if np.isnan(r.val[metric]) else r.val[metric] for r in results]
    return results[max(range(len(results)), key=lambda i: (ranked[i], -i))]


# --------------------------------------------------------------------------------------------------
# The probe during training (train.probe)
# --------------------------------------------------------------------------------------------------


class Prober:
    """``train.probe``: the probe of the encoder's frozen embeddings during training (``run`` is collective).

    Reads the probe data set's train and val splits once, never its test split, cut to
    ``max_clips`` clips per split the way ``af-probe --max-clips`` cuts them (seed 0). A probe: every
    rank embeds its share of the clips (clip i on rank i mod world size; the shares padded to one
    length, so every rank runs the same forward passes, as ZeRO-3 needs), the shares are gathered,
    rank 0 fits the probe on train and chooses its setting on val (``fit_probe``), and every rank gets
    the metrics: ``probe/accuracy`` (single-label data) and ``probe/mAP`` of the val clips at the
    chosen setting, ``probe/k`` or ``probe/C``, ``probe/seconds`` (this probe, rank 0's wall time),
    ``probe/time_share`` (all probes so far / wall time since the Prober was built) and ``probe/skipped``
    (periodic probes left out so far to keep that share under ``max_time_share``, see ``due``). With
    ``layer: best`` every layer is probed and the one with the best val metric reported, with
    ``probe/layer`` and each layer's val numbers (``probe/layer<N>/accuracy``, ``.../mAP``).
    """

    def __init__(self, cfg: Any, data_config: Any, manifest: Any, num_layers: int, device: torch.device,
                 default_every: int = 0) -> None:
        from af_train import distributed
        from af_train.tokenizers.base import TokenizerError, check_same_tokenizer

        self.cfg, self.device = cfg, device
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.every = cfg.every if cfg.every is not None else default_every
        try:
            self.data = load_probe_data(cfg.dataset, splits=("train", "val"), max_clips=cfg.max_clips)
            check_same_tokenizer(manifest.tokenizer, self.data.tokenizer, "the training shards",
                                 f"train.probe.dataset '{cfg.dataset}'")
            if cfg.layer == "best":  # every hidden state; the probe's val split picks one at each probe
                self.layers = list(range(num_layers + 1))
            else:
                self.layers = check_layers([num_layers if cfg.layer is None else cfg.layer], num_layers)
        except TokenizerError as exc:
            raise ProbeError(f"train.probe: {exc}") from None
        except ProbeError as exc:
            raise ProbeError(f"train.probe: {exc}") from None
        self.framing = Framing.of_recipe(data_config, data_config.code_rows[0], manifest.codec.codebook_size)
        self.started, self.seconds = time.perf_counter(), 0.0
        self.last_seconds, self.skipped = 0.0, 0

    def due(self, step: int) -> bool:
        """A periodic probe at this step (``every``; 0: none between the first and the last), unless it would
        take the probes' share of the wall time over ``max_time_share``, keeping one more probe in reserve for
        the last step (the engine always probes there). Collective at a step of ``every`` when
        ``max_time_share`` is set: rank 0 decides for every rank (their clocks differ)."""
        if not self.every or step % self.every:
            return False
        budget = self.cfg.max_time_share
        if budget is None:
            return True
        from af_train.distributed import broadcast_from_rank0

        elapsed = time.perf_counter() - self.started
        within = broadcast_from_rank0(self.seconds + 2 * self.last_seconds <= budget * elapsed
                                      if self.rank == 0 else None)
        self.skipped += not within
        return bool(within)

    def _embed(self, encoder: torch.nn.Module, clips: Clips) -> dict[int, np.ndarray]:
        from af_train.distributed import gather_objects

        share = list(range(self.rank, len(clips), self.world_size))
        per_rank = -(-len(clips) // self.world_size)
        padded = share + [share[0] if share else 0] * (per_rank - len(share))
        pooled = embed_clips(encoder, clips.subset(padded), self.framing, self.layers,
                             batch_size=self.cfg.batch_size, device=self.device)
        width = int(encoder.config.hidden_size)
        rows = {layer: np.zeros((len(clips), width), dtype=np.float32) for layer in self.layers}
        for indices, part in gather_objects((share, {layer: x[:len(share)] for layer, x in pooled.items()})):
            for layer in self.layers:
                rows[layer][indices] = part[layer]
        return rows

    def features(self, encoder: torch.nn.Module) -> dict[str, dict[int, np.ndarray]]:
        """Collective: ``{split: {layer: float32 [clips, hidden]}}``, the pooled features of every probe clip, in
        the split's order, on every rank."""
        return {split: self._embed(encoder, clips) for split, clips in self.data.splits.items()}

    def run(self, encoder: torch.nn.Module, step: int) -> dict[str, float]:
        """Collective: the probe of ``encoder``'s current weights (see the class doc)."""
        from af_train.distributed import broadcast_from_rank0, result_or_exception

        started = time.perf_counter()
        features = self.features(encoder)

        def fit() -> dict[str, float]:
            single = not self.data.multi_label
            results = [fit_probe(self.cfg.kind, *((features[s][layer], self.data.targets(s)) for s in ("train", "val")),
                                 single_label=single, layer=layer) for layer in self.layers]
            result = best_layer(results, single)  # one layer: that one
            metrics = {**{f"probe/{k}": v for k, v in result.val.items()},
                       **{f"probe/{k}": float(v) for k, v in result.setting.items()}}
            if len(results) > 1:  # train.probe.layer=best: the chosen layer and every layer's val numbers
                metrics["probe/layer"] = float(result.layer)
                metrics.update({f"probe/layer{r.layer}/{k}": v for r in results for k, v in r.val.items()})
            return metrics

        metrics = broadcast_from_rank0(result_or_exception(fit) if self.rank == 0 else None)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.last_seconds = seconds
        share = self.seconds / max(time.perf_counter() - self.started, 1e-9)
        if self.rank == 0:
            shown = ", ".join(f"{k[len('probe/'):]} {v:.4g}" for k, v in metrics.items() if k.count("/") == 1)
            log.info("step %d probe (%s, layer %s, %d + %d clips): %s; %.2f s, probes so far %.1f s = %.1f%% of "
                     "the wall time", step, self.cfg.kind,
                     "best on val" if len(self.layers) > 1 else self.layers[0], len(self.data.splits["train"]),
                     len(self.data.splits["val"]), shown, seconds, self.seconds, 100 * share)
        return {**metrics, "probe/seconds": seconds, "probe/time_share": share, "probe/skipped": float(self.skipped)}
