"""chemprop v2: an MPNN (``BondMessagePassing`` + ``MeanAggregation`` + ``RegressionFFN``) built
as chemprop's training tutorial builds it, on a few SMILES made in code (batches are
``TrainingBatch`` named tuples holding a ``BatchMolGraph`` dataclass)."""

from __future__ import annotations

import _harness


def smiles_and_targets():
    import numpy as np

    rng = np.random.default_rng(0)
    cores = ["C" * k for k in range(1, 9)] + ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCOC1"]
    tails = ["", "O", "N", "Cl", "C(=O)O", "OC", "F", "C#N", "Br", "S"]
    smis = [c + t for c in cores for t in tails]
    ys = []
    for s in smis:  # a smooth property of the molecule: heavy atoms and heteroatoms
        heavy = sum(ch.isalpha() and ch not in "l" for ch in s)
        hetero = sum(s.count(a) for a in "ONSFB")
        ys.append([0.3 * heavy - 0.5 * hetero + 0.1 * rng.normal()])
    return smis, np.array(ys)


def fit(recipe):
    import lightning.pytorch as pl
    import numpy as np
    from chemprop import data, featurizers, models, nn

    pl.seed_everything(0)
    smis, ys = smiles_and_targets()
    all_data = [data.MoleculeDatapoint.from_smi(smi, y) for smi, y in zip(smis, ys)]
    idx = np.random.default_rng(0).permutation(len(all_data))
    train_data = [all_data[i] for i in idx[:96]]
    val_data = [all_data[i] for i in idx[96:]]
    featurizer = featurizers.SimpleMoleculeMolGraphFeaturizer()
    train_dset = data.MoleculeDataset(train_data, featurizer)
    scaler = train_dset.normalize_targets()
    val_dset = data.MoleculeDataset(val_data, featurizer)
    val_dset.normalize_targets(scaler)
    train_loader = data.build_dataloader(train_dset, batch_size=16, num_workers=0)
    val_loader = data.build_dataloader(val_dset, batch_size=16, num_workers=0, shuffle=False)

    mp = nn.BondMessagePassing(d_h=64)
    agg = nn.MeanAggregation()
    output_transform = nn.UnscaleTransform.from_standard_scaler(scaler)
    ffn = nn.RegressionFFN(input_dim=mp.output_dim, hidden_dim=64, output_transform=output_transform)
    metric_list = [nn.metrics.RMSE(), nn.metrics.MAE()]
    mpnn = models.MPNN(mp, agg, ffn, batch_norm=True, metrics=metric_list)

    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(mpnn, train_loader, val_loader)


if __name__ == "__main__":
    _harness.run("chemprop", "MPNN regression", ["chemprop", "rdkit"], fit)
