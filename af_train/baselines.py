"""The bars a model of the codes has to clear, computed from labels and codes alone (no encoder).

- label prior: every clip scored with the training-set class frequencies (the AP of a class is then
  its prevalence in the split; the top-1 prediction is the most frequent training class): what a
  model that ignores the audio gets;
- bag of codes: a linear classifier (L2-regularised logistic regression) on each clip's histogram
  of codes, per code row, ignoring their order: what the tokens carry without any sequence model.

Used by ``af-probe`` (next to the probes of frozen embeddings) and by the demo's baselines stage
(``tools/demo_eval.py``). Arrays in, arrays out: reading the shards is the caller's job
(``af_train.data.clips.read_clips``).
"""

from __future__ import annotations

import numpy as np


def multi_hot_lists(labels: list[list[int]], num_classes: int) -> np.ndarray:
    """Label index lists -> bool [N, C]."""
    out = np.zeros((len(labels), num_classes), dtype=bool)
    for i, clip in enumerate(labels):
        out[i, clip] = True
    return out


def label_prior_scores(train_targets: np.ndarray, num_clips: int) -> np.ndarray:
    """Every clip gets the training-set frequency of each class (``train_targets``: bool [M, C])."""
    prior = np.asarray(train_targets).astype(np.float64).mean(axis=0)
    return np.tile(prior, (num_clips, 1))


def code_histograms(codes: list[np.ndarray], codebook_size: int) -> np.ndarray:
    """[N, rows * codebook_size]: each row's code counts over the clip's valid frames, divided by its length.

    ``codes``: one int array [rows, valid frames] per clip.
    """
    rows = codes[0].shape[0]
    features = np.zeros((len(codes), rows * codebook_size), dtype=np.float32)
    for i, clip in enumerate(codes):
        for row in range(rows):
            counts = np.bincount(clip[row].astype(np.int64), minlength=codebook_size)[:codebook_size]
            features[i, row * codebook_size: (row + 1) * codebook_size] = counts / max(1, clip.shape[1])
    return features


def fit_bag_of_codes(train_codes: list[np.ndarray], train_labels: list[list[int]], eval_codes: list[np.ndarray],
                     codebook_size: int, num_classes: int, l2: float = 1e-3, steps: int = 200,
                     ) -> tuple[np.ndarray, bool]:
    """Logistic regression on code histograms fitted on the training clips: (scores [N_eval, C] float64, single_label).

    Softmax over the classes when every training clip has one label, one sigmoid per class otherwise;
    full-batch L-BFGS from zero weights on standardised features (deterministic).
    """
    import torch

    x_train = torch.from_numpy(code_histograms(train_codes, codebook_size)).double()
    x_eval = torch.from_numpy(code_histograms(eval_codes, codebook_size)).double()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    y_train = torch.from_numpy(multi_hot_lists(train_labels, num_classes)).double()
    single = all(len(labels) == 1 for labels in train_labels)
    weight = torch.zeros(x_train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x_train @ weight + bias
        if single:
            loss = torch.nn.functional.cross_entropy(logits, y_train.argmax(1))
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    with torch.no_grad():
        logits = x_eval @ weight + bias
        scores = logits.softmax(1) if single else logits.sigmoid()
    return scores.numpy(), single
