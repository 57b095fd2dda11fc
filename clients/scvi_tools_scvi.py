"""scvi-tools: ``scvi.model.SCVI`` (a count-data variational autoencoder whose loss is the ELBO
computed inside the module; batches are dicts keyed by AnnData registry names) on a small
AnnData of synthetic negative-binomial counts, set up and trained as scvi's quick-start does."""

from __future__ import annotations

import _harness


def adata():
    import anndata
    import numpy as np

    rng = np.random.default_rng(0)
    cells, genes, types = 400, 60, 3
    profile = rng.gamma(2.0, 1.0, (types, genes))
    kind = rng.integers(0, types, cells)
    size = rng.lognormal(1.5, 0.3, (cells, 1))
    mean = profile[kind] * size
    counts = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(np.float32)
    ad = anndata.AnnData(X=counts)
    ad.obs["cell_type"] = [f"t{k}" for k in kind]
    ad.obs["batch"] = rng.choice(["b0", "b1"], cells)
    return ad


def fit(recipe):
    import scvi

    scvi.settings.seed = 0
    ad = adata()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi.model.SCVI(ad, n_hidden=32, n_latent=5, n_layers=1)
    model.train(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        batch_size=64,
        train_size=0.8,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        default_root_dir=_harness.workdir(),
        log_every_n_steps=1,
        callbacks=recipe(monitor="elbo_validation"),
    )


if __name__ == "__main__":
    _harness.run("scvi-tools", "SCVI", ["scvi-tools", "anndata"], fit)
