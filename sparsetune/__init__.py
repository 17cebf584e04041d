"""sparsetune: sparsity-aware fine-tuning of LLMs.

    sparsetune train recipes/quickstart.yaml       # ReLU-fy + regularize + log + checkpoint
    sparsetune export runs/quickstart --out DIR    # plain HF folder + sparsity report
    sparsetune eval DIR                            # perplexity and activation sparsity

Python API: `load_sparse_model(path)` loads an export with its exact sparse activation;
`load_predictors(path)` loads its co-trained activation predictors.
"""

__version__ = "0.1.0"

__all__ = ["load_sparse_model", "load_predictors", "__version__"]


def __getattr__(name):  # lazy, so `import sparsetune` (and the CLI's --help) stays fast
    if name == "load_sparse_model":
        from sparsetune.models.build import load_sparse_model

        return load_sparse_model
    if name == "load_predictors":
        from sparsetune.predictors.bank import load_predictors

        return load_predictors
    raise AttributeError(name)
