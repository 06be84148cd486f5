"""A PyTorch MLP for tabular rows: imputation, scaling and category embeddings inside the graph."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import torch
from torch import nn

from flywheel.config import ModelConfig
from flywheel.core.cpus import usable_cpus
from flywheel.core.progress import Advance
from flywheel.training.evaluate import curve_metrics
from flywheel.training.model import FittedModel, TrainingData
from flywheel.training.onnx import BOTH_CLASSES, ONNX_INPUT, task_output

MLP_DEFAULTS: dict[str, Any] = {
    "hidden": [64, 32],
    "dropout": 0.1,
    "learning_rate": 1e-3,
    "weight_decay": 1e-5,
    "batch_size": 512,
    "max_epochs": 30,
    "patience": 4,
    "embedding_dim": 8,
}


class TabularMLP(nn.Module):
    """Takes the raw feature vector (NaN for missing, codes for categories) and returns the task's
    output: (P(no), P(yes)) for binary, the value for regression (learnt on the standardised target,
    scaled back inside the graph), every class's probability for multiclass."""

    median: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_index: torch.Tensor
    cat_max: torch.Tensor

    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, X_train: np.ndarray, cardinalities: dict[int, int], params: dict[str, Any],
                 task: str = "binary", classes: int = 2, y_train: np.ndarray | None = None):
        super().__init__()
        self.task = task
        y = np.asarray(y_train if y_train is not None and task == "regression" else [0.0], np.float64)
        self.register_buffer("y_mean", torch.tensor(float(y.mean()), dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(float(y.std()) or 1.0, dtype=torch.float32))
        n = X_train.shape[1]
        self.cat_idx = sorted(cardinalities)
        self.num_idx = [i for i in range(n) if i not in cardinalities]
        num = X_train[:, self.num_idx].astype(np.float64)
        median = np.nan_to_num(np.nanmedian(num, axis=0)) if num.size else np.zeros(0)
        filled = np.where(np.isnan(num), median, num)
        std = filled.std(axis=0) if num.size else np.zeros(0)
        self.register_buffer("median", torch.tensor(median, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(filled.mean(axis=0) if num.size else [],
                                                  dtype=torch.float32))
        self.register_buffer("std", torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32))
        self.register_buffer("num_index", torch.tensor(self.num_idx, dtype=torch.long))
        self.register_buffer("cat_max", torch.tensor([cardinalities[i] - 1 for i in self.cat_idx],
                                                     dtype=torch.float32))
        dim = int(params["embedding_dim"])
        embeddings = [nn.Embedding(cardinalities[i], min(dim, cardinalities[i])) for i in self.cat_idx]
        self.embeddings = nn.ModuleList(embeddings)
        width = len(self.num_idx) + sum(e.embedding_dim for e in embeddings)
        layers: list[nn.Module] = []
        for h in params["hidden"]:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(float(params["dropout"]))]
            width = int(h)
        layers.append(nn.Linear(width, classes if task == "multiclass" else 1))
        self.body = nn.Sequential(*layers)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output: a logit (binary), a standardised value, or class logits."""
        parts = []
        if self.num_idx:
            num = torch.index_select(x, 1, self.num_index)
            num = torch.where(torch.isnan(num), self.median.expand_as(num), num)
            parts.append((num - self.mean) / self.std)
        for j, (i, emb) in enumerate(zip(self.cat_idx, self.embeddings, strict=True)):
            code = torch.nan_to_num(x[:, i], nan=0.0)
            code = torch.minimum(torch.clamp(code, min=0.0), self.cat_max[j])
            parts.append(emb(code.long()))
        return self.body(torch.cat(parts, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.raw(x)
        if self.task == "regression":
            return out * self.y_std + self.y_mean
        if self.task == "multiclass":
            return torch.softmax(out, dim=1)
        p = torch.sigmoid(out)
        return torch.cat([1 - p, p], dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.raw(x)
        if self.task == "regression":
            return nn.functional.mse_loss(out[:, 0], (y - self.y_mean) / self.y_std)
        if self.task == "multiclass":
            return nn.functional.cross_entropy(out, y.long())
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], y)


def _seed_and_size(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(usable_cpus())  # torch counts cores, not the CPUs this process may use


def train_mlp(model: ModelConfig, data: TrainingData, progress: Advance | None) -> FittedModel:
    params = {**MLP_DEFAULTS, **model.params}
    _seed_and_size(model.seed)
    net = TabularMLP(data.X_train, data.cardinalities, params, data.task, len(data.classes) or 2,
                     data.y_train)
    opt = torch.optim.AdamW(net.parameters(), lr=float(params["learning_rate"]),
                            weight_decay=float(params["weight_decay"]))
    X = torch.tensor(data.X_train, dtype=torch.float32)
    y = torch.tensor(data.y_train, dtype=torch.float32)
    gen = torch.Generator().manual_seed(model.seed)
    batch, epochs, patience = int(params["batch_size"]), int(params["max_epochs"]), int(params["patience"])

    def predict(arr: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = net(torch.tensor(arr, dtype=torch.float32)).numpy().astype(np.float64)
        return out[:, 1] if data.task == "binary" else out[:, 0] if data.task == "regression" else out

    history: dict[str, list[float]] = {}
    best_score, best_epoch, best_state, stale = np.inf, 0, copy.deepcopy(net.state_dict()), 0
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), batch):
            idx = order[start : start + batch]
            opt.zero_grad()
            net.loss(X[idx], y[idx]).backward()
            opt.step()
        for split, Xs, ys in (("train", data.X_train, data.y_train), ("validation", data.X_val, data.y_val)):
            for name, value in curve_metrics(data, ys, predict(Xs)).items():
                history.setdefault(f"{split}_{name}", []).append(value)
        if progress:
            progress(epoch, epochs)
        first = next(k for k in history if k.startswith("validation_"))
        score = -history[first][-1] if first.endswith("_auc") else history[first][-1]
        if score < best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net, (torch.zeros(2, data.X_train.shape[1]),), buf,  # type: ignore[arg-type]
        input_names=[ONNX_INPUT],
        output_names=[BOTH_CLASSES], dynamic_axes={ONNX_INPUT: {0: "n"}, BOTH_CLASSES: {0: "n"}},
        opset_version=17, dynamo=False,
    )
    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    import onnx

    return FittedModel(kind="torch-mlp", predict=predict,
                       onnx=task_output(onnx.load_from_string(buf.getvalue()), data.task), params=params,
                       history=history, best_iteration=best_epoch,
                       native_files={"mlp_state_dict.pt": state.getvalue()})
