"""Predictors in PowerInfer's layout, for its converter `convert-hf-to-powerinfer-gguf.py MODEL PREDICTORS`.

PowerInfer reads a folder of `model_{n}.pt` files, one per decoder layer n (loaded with `torch.load`, counted by
their `.pt` suffix), each a state dict of a bias-free `fc1 -> ReLU -> fc2` network: `fc1.weight` [hidden, d] and
`fc2.weight` [m, hidden]; plus an optional `config.json` whose `sparse_threshold` is written into the GGUF file. A
neuron is computed when its predictor output reaches that threshold (logit space: 0 is sigmoid 0.5).

sparsetune's neuron predictors are `Linear(d -> r) [-> act] -> Linear(r -> m)`. They map exactly when:
  - the output layer has no bias (`predictor.output_bias: false`): fc1/fc2 have none;
  - act is relu (as is) or none: a linear map z is written as relu(z) - relu(-z), i.e. fc1 = [W1; -W1] and
    fc2 = [W2, -W2] (twice the rank, the same outputs);
  - one threshold serves every layer: a calibrated per-layer threshold t_l of one sign is folded into the layer's
    fc2 by scaling it with T / t_l (T = +-1), so `output >= T` keeps exactly what `logit >= t_l` kept;
  - no lookahead (PowerInfer feeds layer n's own FFN input to predictor n).
Anything else is refused with one line rather than exported approximately.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.predictors.bank import PredictorBank

FOLDER = "powerinfer_predictors"


def _check(bank: PredictorBank) -> None:
    cfg = bank.cfg
    if cfg.lookahead:
        raise SparsetuneError("--powerinfer: lookahead predictors (predictor.lookahead=true) do not fit PowerInfer, "
                              "which feeds layer n's own FFN input to predictor n")
    if cfg.output_bias:
        raise SparsetuneError("--powerinfer: these predictors have an output bias, which PowerInfer's bias-free "
                              "fc1 -> ReLU -> fc2 cannot hold; train them with predictor.output_bias=false")
    if cfg.nonlinearity not in ("relu", "none"):
        raise SparsetuneError(f"--powerinfer: predictor.nonlinearity={cfg.nonlinearity} cannot be written as "
                              "fc1 -> ReLU -> fc2; use relu or none")


def global_threshold(bank: PredictorBank) -> tuple[float, list[float]]:
    """(PowerInfer's sparse_threshold T, per-layer output scale s_l) with s_l * logit >= T <=> logit >= t_l."""
    if bank.layer_thresholds is None:
        return bank.logit_threshold, [1.0] * bank.num_neuron_predictors
    ts = bank.layer_thresholds
    if all(t < 0 for t in ts) or all(t > 0 for t in ts):
        target = -1.0 if ts[0] < 0 else 1.0
        return target, [target / t for t in ts]
    raise SparsetuneError("--powerinfer: the calibrated per-layer thresholds have mixed signs (or are 0), which one "
                          "global sparse_threshold cannot express; recalibrate or export without --powerinfer")


def powerinfer_layers(bank: PredictorBank) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """(sparse_threshold, per-layer {'fc1.weight', 'fc2.weight'}) reproducing the bank's neuron masks."""
    _check(bank)
    threshold, scales = global_threshold(bank)
    layers = []
    for predictor, scale in zip(bank.neurons, scales):
        w1 = predictor.down.weight.detach().float().cpu()
        w2 = predictor.up.weight.detach().float().cpu() * scale
        if bank.cfg.nonlinearity == "none":
            w1, w2 = torch.cat([w1, -w1]), torch.cat([w2, -w2], dim=1)
        layers.append({"fc1.weight": w1.contiguous(), "fc2.weight": w2.contiguous()})
    return threshold, layers


def write_powerinfer_predictors(bank: PredictorBank, folder: Path) -> Path:
    """Write `folder/powerinfer_predictors/` (model_{n}.pt + config.json); returns that folder."""
    threshold, layers = powerinfer_layers(bank)
    out = folder / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    for n, state in enumerate(layers):
        torch.save(state, out / f"model_{n}.pt")
    (out / "config.json").write_text(json.dumps({"sparse_threshold": threshold}, indent=1) + "\n")
    return out


def load_powerinfer_masks(folder: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The neurons PowerInfer's predictor `layer` keeps for inputs x, read back from the written files."""
    state = torch.load(folder / f"model_{layer}.pt", map_location="cpu", weights_only=True)
    threshold = json.loads((folder / "config.json").read_text())["sparse_threshold"]
    hidden = torch.relu(x.float() @ state["fc1.weight"].t())
    return hidden @ state["fc2.weight"].t() >= threshold
