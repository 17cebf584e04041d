"""`sparsetune analyze`: the structure of a model's activations, measured from one dense pass over held-out text.

The pipeline, one module per step (`command.py` runs them in this order):

  collect.py         one forward per batch: every SparseMLP's activation (its sink) and every attention head's output
                     norm (a hook before o_proj), kept for a bounded sample of sequences
  sparsity.py        per layer: exact-zero and near-zero shares, CETT effective sparsity at 1% / 20% error, and which
                     neurons count as active (a != 0 for the ReLU family, contribution above the CETT-20% threshold
                     for SiLU, so both are compared on one footing)
  inertia.py         overlap (Jaccard) of the active sets of consecutive tokens, of tokens d apart, and of random
                     tokens from other sequences
  history.py         the same token id in different contexts: how much its active set varies, and how much of it
                     the token id explains beyond chance
  prompt_overlap.py  how much of a continuation's active neurons and activation mass the prompt's most active neurons
                     cover, as a function of the kept fraction (what prompt-derived masks rely on)
  heads.py           how concentrated the attention heads' output norms are per token
  report.py          analysis.json, analysis.md, PNG figures, and W&B
"""
