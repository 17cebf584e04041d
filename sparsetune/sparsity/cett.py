"""CETT: the relative error of an MLP's output when its small activations are dropped.

For one token with activation a (after the activation function, before down_proj) and down weight W_d, neuron j
contributes a_j * W_d[:, j] to the output, with magnitude s_j = |a_j| * ||W_d[:, j]||. Dropping every neuron with
s_j < tau gives

    CETT(tau) = || sum_{j: s_j < tau} a_j W_d[:, j] || / || sum_j a_j W_d[:, j] ||

(Luo et al., "Sparsing Law", arXiv 2411.02335; Zhang et al.'s CETT). One threshold tau per layer, shared by all
tokens, is what an engine can apply; the *effective sparsity at a CETT budget* is the share of s_j below the largest
tau whose mean CETT stays within the budget. It compares ReLU-family models (exact zeros, CETT 0 at tau 0) and SiLU
models (no exact zeros) on one scale.

The same error measures a rule an engine applies before computing a_j: drop neuron j when a value read from the gate
alone (the gate for FATReLU, |SiLU(gate)| for CATS) is below a threshold. `values=` gives those per-neuron values in
place of the contributions; `sparsity/thresholds.py` fits per-layer thresholds that way.
"""

from __future__ import annotations

import torch

from sparsetune.surgery.structure import readable_weight


def contributions(a: torch.Tensor, down_norms: torch.Tensor | None) -> torch.Tensor:
    """s_j = |a_j| * ||W_d[:, j]|| (or |a_j| when the down norms are unknown), float32, same shape as `a`."""
    s = a.detach().float().abs()
    return s if down_norms is None else s * down_norms.to(s.device, torch.float32)


def readable_down_weight(mlp) -> torch.Tensor | None:
    """W_d of a SparseMLP as a plain tensor (LoRA delta included), or None when only a shard is here
    (`surgery.structure.readable_weight`)."""
    weight = readable_weight(mlp.projections()[2])
    return None if weight is None else weight.detach()


def cett(a: torch.Tensor, down_weight: torch.Tensor, threshold: float | torch.Tensor,
         down_norms: torch.Tensor | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token CETT of dropping neurons with contribution below `threshold` (or, given `values` shaped like
    `a`, those whose value is below it: a gate rule). `a`: [tokens, m]; `down_weight`: [d, m] (nn.Linear layout).
    Returns [tokens]; a token whose full output is zero has CETT 0."""
    a = a.detach().float().reshape(-1, a.shape[-1])
    w = down_weight.detach().float().to(a.device)
    if values is None:
        values = contributions(a, w.norm(dim=0) if down_norms is None else down_norms)
    return CettLayer(a, w).per_token(values.reshape(a.shape).float() < threshold)


class CettLayer:
    """One layer's tokens: the full outputs' norms once, then the error of any set of dropped neurons."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor):
        self.a, self.w = a, w
        self.full = (a @ w.T).norm(dim=-1)

    def per_token(self, dropped: torch.Tensor) -> torch.Tensor:
        err = ((self.a * dropped) @ self.w.T).norm(dim=-1)
        tiny = torch.finfo(torch.float32).tiny
        return torch.where(self.full > 0, err / self.full.clamp_min(tiny), torch.zeros_like(self.full))

    def mean(self, values: torch.Tensor, threshold: torch.Tensor) -> float:
        return float(self.per_token(values < threshold).mean())


class CettSearch:
    """The threshold search of one layer's sampled tokens: candidates are the distinct values (contributions, or
    the values of a gate rule), and every mean CETT computed is kept, so searches for several budgets share them."""

    COARSE_TOKENS = 256

    def __init__(self, a: torch.Tensor, down_weight: torch.Tensor, values: torch.Tensor | None = None,
                 floor: float | None = None, resolution: float = 1e-4):
        a = a.detach().float().reshape(-1, a.shape[-1])
        w = down_weight.detach().float().to(a.device)
        self.values = contributions(a, w.norm(dim=0)) if values is None else values.detach().float().reshape(a.shape)
        self.layer = CettLayer(a, w)
        # A search on the first tokens (the rows are a random sample) finds the neighbourhood cheaply first.
        n = self.COARSE_TOKENS
        self.coarse = (CettSearch(a[:n], w, self.values[:n], floor, max(resolution, 1e-3))
                       if len(a) >= 4 * n else None)
        # Candidates: the distinct values among every k-th of the sorted values, finer than any search resolution
        # asked of them (threshold cand[i] drops the values below cand[i]).
        flat = self.values.reshape(-1).sort().values
        cand = torch.unique_consecutive(flat[::max(1, int(flat.numel() * resolution / 4))])
        if floor is not None:
            cand = torch.cat([cand.new_tensor([floor]), cand[cand > floor]])
        top = cand[-1:].clone()
        self.cand = torch.cat([cand, torch.nextafter(top, top.new_tensor([float("inf")]))])  # the last drops all
        self.known: dict[int, float] = {}
        if floor is None:  # no matmul for the ends: the lowest candidate drops nothing, the top one everything
            self.known[0] = 0.0
            self.known[len(self.cand) - 1] = float((self.layer.full > 0).float().mean())

    def mean_cett(self, index: int) -> float:
        if index not in self.known:
            self.known[index] = self.layer.mean(self.values, self.cand[index])
        return self.known[index]

    def result(self, index: int) -> tuple[float, float, float]:
        t = self.cand[index]
        return float(t), self.mean_cett(index), float((self.values < t).float().mean())

    def fit(self, budget: float, resolution: float = 1e-3) -> tuple[float, float, float]:
        """(threshold, mean CETT there, sparsity there) of the highest candidate within `budget`, to `resolution` of
        the candidates."""
        lo, hi = 0, len(self.cand) - 1
        if self.mean_cett(lo) > budget:  # not even the lowest threshold is within the budget
            return self.result(lo)
        if self.mean_cett(hi) <= budget:
            return self.result(hi)
        if self.coarse is not None:
            self._bracket_near(self.coarse.fit(budget, 1e-2)[0], budget)
        lo = max(i for i, e in self.known.items() if e <= budget)  # the tightest bracket known so far
        hi = min(i for i, e in self.known.items() if e > budget and i > lo)
        # Safeguarded secant on the candidate index: mean CETT is a smooth function of the share dropped, so the
        # secant through the last two points lands next to the answer. A step that did not halve the bracket is
        # followed by a probe one resolution step past the end it moved (which usually closes the bracket), and if
        # that does not close it either, by a bisection step; a guess outside the bracket is bisected too.
        step = max(1, int(resolution * len(self.cand)))
        prev, last = (lo, self.known[lo] - budget), (hi, self.known[hi] - budget)
        mode = "secant"
        while hi - lo > step:
            width = hi - lo
            (x0, f0), (x1, f1) = prev, last
            guess = x1 - f1 * (x1 - x0) / (f1 - f0) if f1 != f0 else None
            if mode == "probe":
                mid = lo + step if last[1] <= 0 else hi - step
            elif mode == "bisect" or guess is None or not lo < guess < hi or width <= 2 * step:
                mid = (lo + hi) // 2
            else:
                mid = min(max(round(guess), lo + 1), hi - 1)
            err = self.mean_cett(mid)
            if err <= budget:
                lo = mid
            else:
                hi = mid
            prev, last = last, (mid, err - budget)
            mode = "secant" if hi - lo <= width / 2 else {"secant": "probe", "probe": "bisect"}.get(mode, "secant")
        return self.result(lo)

    def _bracket_near(self, threshold: float, budget: float) -> None:
        """Evaluate around the candidate nearest `threshold`, widening the steps until the budget is crossed."""
        last = len(self.cand) - 1
        k = int(torch.searchsorted(self.cand, torch.tensor(threshold, device=self.cand.device)).clamp(0, last))
        within = self.mean_cett(k) <= budget
        delta = max(1, len(self.cand) // 100)
        while 0 < k < last:
            k = min(last, k + delta) if within else max(0, k - delta)
            if (self.mean_cett(k) <= budget) != within:
                return
            delta *= 2


def threshold_for_cett(a: torch.Tensor, down_weight: torch.Tensor, budget: float, values: torch.Tensor | None = None,
                       floor: float | None = None, resolution: float = 1e-3) -> tuple[float, float, float]:
    """The largest threshold whose mean CETT over the tokens of `a` is within `budget`, searched over the sorted
    candidate values (mean CETT grows with the threshold). The rule drops a neuron whose contribution (or, given
    `values` shaped like `a`, whose value) is strictly below the threshold; thresholds below `floor` are not
    considered. The search stops when the candidates left span `resolution` of them (0.1% of the sparsity by
    default). Returns (threshold, mean CETT there, sparsity there: the share of values strictly below the
    threshold)."""
    return CettSearch(a, down_weight, values, floor, resolution).fit(budget, resolution)


# ---- the CETT metric beside exact-zero sparsity: a sample of held-out tokens per layer, then one fit per budget.
CETT_BUDGETS = (0.01, 0.2)


class TokenSampler:
    """Keeps a random sample of each layer's activation rows (tokens) from the forwards it sees, up to `max_tokens`
    per layer (fewer for very wide layers: at most `max_values` numbers), at most `per_batch` from one batch so the
    sample spans several batches. A recorder consumer (`observe_mlp`) or a SparseMLP sink (`record`). Its own
    seeded generator: sampling never moves the run's RNG."""

    def __init__(self, max_tokens: int = 1024, per_batch: int = 256, seed: int = 0, max_values: int = 1 << 21):
        self.max_tokens, self.per_batch, self.max_values = max_tokens, per_batch, max_values
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: dict[int, list[torch.Tensor]] = {}
        self.counts: dict[int, int] = {}
        self.token_mask: torch.Tensor | None = None  # used by record(); observe_mlp is handed the mask

    def observe_mlp(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor,
                    token_mask: torch.Tensor | None) -> None:
        self.add(layer, activation, token_mask)

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        self.add(layer, activation, self.token_mask)

    def add(self, layer: int, activation: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        width = activation.shape[-1]
        room = min(self.max_tokens, max(16, self.max_values // width)) - self.counts.get(layer, 0)
        if room <= 0:
            return
        rows = activation.detach()
        rows = rows[token_mask.bool()] if token_mask is not None else rows.reshape(-1, width)
        take = min(room, self.per_batch, rows.shape[0])
        if take <= 0:
            return
        idx = torch.randperm(rows.shape[0], generator=self.generator)[:take].to(rows.device)
        self.samples.setdefault(layer, []).append(rows[idx].clone())
        self.counts[layer] = self.counts.get(layer, 0) + take

    def tokens(self, layer: int) -> torch.Tensor | None:
        chunks = self.samples.get(layer)
        return torch.cat(chunks) if chunks else None

    def tee(self, mlp, x: torch.Tensor) -> torch.Tensor:
        """A SparseMLP `override` that computes as usual and also hands the activation to this sampler whenever the
        MLP's own sink takes it (an open recorder: real evaluation batches), with that recorder's token mask."""
        return mlp.dense(x, _Tee(mlp.sink, self))


class _Tee:
    def __init__(self, sink, sampler: TokenSampler):
        self.sink, self.sampler = sink, sampler

    def record(self, layer: int, activation: torch.Tensor, mlp_input: torch.Tensor, gate: torch.Tensor) -> None:
        if self.sink is not None:
            self.sink.record(layer, activation, mlp_input, gate)
        if getattr(self.sink, "is_open", True):
            self.sampler.add(layer, activation, getattr(self.sink, "token_mask", None))


@torch.no_grad()
def cett_report(sampler: TokenSampler, mlps: list, budgets: tuple[float, ...] = CETT_BUDGETS,
                reduce=None) -> dict:
    """Per-layer effective sparsity at each CETT budget from the sampled activations of `mlps` (SparseMLPs):
    {"cett_sparsity": {budget: mean over layers}, "cett_sparsity_per_layer": {budget: [...]},
    "cett_tokens_per_layer": n (summed over ranks)}; budgets are keys like "0.2". {} when the down weights are
    sharded or nothing was sampled. `reduce` (a sum over ranks) averages the figures of the ranks that sampled."""
    weights = [readable_down_weight(m) for m in mlps]
    if any(w is None for w in weights):  # the same on every rank
        return {}
    table = torch.zeros(len(budgets), len(mlps), dtype=torch.float64)
    for i, (mlp, w) in enumerate(zip(mlps, weights)):
        a = sampler.tokens(mlp.layer_idx)
        if a is None:
            continue
        search = CettSearch(a, w)
        for j, budget in enumerate(budgets):
            table[j, i] = search.fit(budget)[2]
    tokens = torch.tensor([min(sampler.counts.values(), default=0)], dtype=torch.float64)
    ranks = torch.tensor([float(bool(sampler.samples))], dtype=torch.float64)
    if reduce is not None:  # every rank takes part, also one that sampled nothing (it adds zeros)
        device = weights[0].device
        table, tokens, ranks = (reduce(t.to(device)).cpu() for t in (table, tokens, ranks))
    if float(ranks[0]) == 0:
        return {}
    table = table / float(ranks[0])
    keys = [f"{b:g}" for b in budgets]
    per_layer = {k: table[j].tolist() for j, k in enumerate(keys)}
    return {"cett_sparsity": {k: sum(v) / len(v) for k, v in per_layer.items()},
            "cett_sparsity_per_layer": per_layer, "cett_tokens_per_layer": int(tokens[0])}
